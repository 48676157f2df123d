"""Each stage on tiny inputs, through its plain function (no Prefect), on a local store.

One module-scoped run of the tiny config goes through every stage of the plan; the
tests then check each stage's outputs against what the stage contract promises.
"""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from opdflow.infra.manifest import Run
from opdflow.infra.store import open_store
from opdflow.infra.tables import parquet_to_table
from opdflow.tasks.shards import read_parts
from opdflow.tasks import evaluate, models, patch, prompts, report, rock, rollout, score, train
from opdflow.tasks.plan import parse, plan

RUNNERS = {"models": models.run, "prompts": prompts.run, "rollout": rollout.run, "score": score.run,
           "train": train.run, "rock-probe": rock.run_probe, "rock-directions": rock.run_directions, "rock": rock.run,
           "patch": patch.run, "eval": evaluate.run, "report": report.run}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_config):
    from opdflow.infra.preflight import preflight
    preflight(tiny_config)
    run = Run.create_or_open(open_store(str(tmp_path_factory.mktemp("store"))), "tiny", tiny_config)
    for stage in plan(tiny_config):
        RUNNERS[parse(stage).kind](run, stage)
    return run


def _table(run, stage, name) -> pa.Table:
    if name in ("rollouts", "scores"):  # sharded stages: a table in parts
        return read_parts(run, stage, name)
    return parquet_to_table(run.read_output(stage, name))


def test_every_stage_committed_with_stack(tiny_run):
    for stage in plan(tiny_run.config):
        e = tiny_run.require(stage)
        assert e["status"] == "committed" and e["outputs"], stage
        assert e["stack"]["torch"] and e["stack"]["opdflow"]


def test_models_and_prompts(tiny_run):
    e = tiny_run.require("models")
    assert any(n.startswith("teacher/") and n.endswith(".safetensors") for n in e["outputs"])
    assert any(n.startswith("student/") and n.endswith("config.json") for n in e["outputs"])
    rows = _table(tiny_run, "prompts", "prompts.parquet").to_pylist()
    c = tiny_run.config.data
    assert [sum(r["split"] == s for r in rows) for s in ("train", "probe", "eval")] == [c.n_train, c.n_probe, c.n_eval]
    assert len({r["prompt_id"] for r in rows}) == len(rows)


def test_rollout_contract(tiny_run):
    c = tiny_run.config
    t = _table(tiny_run, "rollout.r01", "rollouts")
    assert t.num_rows == c.rollout.prompts_per_round * c.rollout.samples_per_prompt
    for r in t.to_pylist():
        assert len(r["response_ids"]) == len(r["logprobs"]) >= 1
        assert all(lp <= 0 for lp in r["logprobs"])
        assert r["finish_reason"] in ("stop", "length")
    e = tiny_run.require("rollout.r01")
    from opdflow.infra.backends import rollout_backend
    assert e["backend"]["name"] == rollout_backend(c) and e["backend"]["configured"] == "auto"
    assert e["backend"]["temperature"] == c.rollout.temperature
    # rounds take different prompts; arms take the same prompts with the same seeds
    r2 = _table(tiny_run, "rollout.r02", "rollouts")
    assert r2["prompt_id"].to_pylist() != t["prompt_id"].to_pylist()
    arm = _table(tiny_run, "ablate-rock.rollout.r01", "rollouts")
    assert arm["seed"].to_pylist() == t["seed"].to_pylist()
    # same start, same seeds: the rock arm's first rollout is the main run's first rollout
    assert arm["response_ids"].to_pylist() == t["response_ids"].to_pylist()


def test_score_contract(tiny_run):
    ro = _table(tiny_run, "rollout.r01", "rollouts").to_pylist()
    sc = _table(tiny_run, "score.r01", "scores").to_pylist()
    assert len(ro) == len(sc)
    for a, b in zip(ro, sc):
        n = len(a["response_ids"])
        assert len(b["teacher_logprobs"]) == len(b["topk_ids"]) == len(b["topk_logprobs"]) == n
        for tok, lp, ids, lps in zip(a["response_ids"], b["teacher_logprobs"], b["topk_ids"], b["topk_logprobs"]):
            assert lps == sorted(lps, reverse=True)
            if tok in ids:
                assert lps[ids.index(tok)] == pytest.approx(lp, abs=1e-5)


def test_train_contract_and_determinism(tiny_run):
    e = tiny_run.require("train.r01")
    m = e["metrics"]
    assert m["steps"] == tiny_run.config.train.steps_per_round and m["bypassed_fraction"] == 0.0
    assert {"optimizer.safetensors", "optimizer.json"} <= set(e["outputs"])
    losses = _table(tiny_run, "train.r01", "token_losses.parquet")
    assert losses.num_rows == m["tokens_trained"]
    # rerunning the stage from the same inputs gives the same weights, bit for bit
    e2, ran = train.run(tiny_run, "train.r01", force=True)
    assert ran and e2["metrics"]["losses"] == m["losses"]
    assert e2["outputs"]["model/model.safetensors"]["sha256"] == e["outputs"]["model/model.safetensors"]["sha256"]
    # round 2 resumed the optimizer: its state has twice the steps
    meta = json.loads(tiny_run.read_output("train.r02", "optimizer.json"))
    steps = [v for k, v in meta["scalars"].items() if k.endswith("::step")]
    if not steps:  # AdamW keeps `step` as a tensor
        from safetensors.torch import load
        t = load(tiny_run.read_output("train.r02", "optimizer.safetensors"))
        steps = [float(v[0]) for k, v in t.items() if k.endswith("::step")]
    assert steps and all(s == 2 * tiny_run.config.train.steps_per_round for s in steps)


def test_train_reports_sampler_vs_trainer_logprobs(tiny_run):
    """The tiny config samples at temperature 1 with the fp32 student the trainer starts from:
    the sampler's and the trainer's logprobs of the first step's tokens agree."""
    e = tiny_run.require("train.r01")
    mm = e["metrics"]["mismatch"]
    assert mm["n_tokens"] > 0 and mm["mean_abs_diff"] < 1e-4 and mm["max_abs_diff"] < 1e-3
    assert "mismatch.png" in e["outputs"]
    records = _table(tiny_run, "train.r01", "token_losses.parquet")
    assert all(lp <= 0 for lp in records["trainer_logprob"].to_pylist())
    md = train.report(tiny_run, e)
    assert "# Sampler vs trainer logprobs" in md and "| mean \\|Δ\\| |" in md and "data:image/png;base64," in md


def test_ablation_arms_bypass_their_tokens(tiny_run):
    sets = json.loads(tiny_run.read_output("rock", "rock_sets.json"))
    for arm, key in (("ablate-rock", "rock"), ("ablate-random", "random_matched")):
        t = _table(tiny_run, f"{arm}.train.r01", "token_losses.parquet").to_pylist()
        assert t and all((r["weight"] == 0.0) == (r["token_id"] in set(sets[key])) for r in t)
    assert set(sets["rock"]).isdisjoint(sets["random_matched"])


def test_rock_outputs(tiny_run):
    c = tiny_run.config.rock
    sets = json.loads(tiny_run.read_output("rock", "rock_sets.json"))
    assert len(sets["rock"]) == c.n_rock and len(sets["control"]) == c.n_control and len(sets["dropped"]) == c.drop_top
    rec = read_parts(tiny_run, "rock", "records")
    assert set(rec["checkpoint"].to_pylist()) == {"initial", "r01", "r02"}
    assert all(k >= -1e-6 for k in rec["kl"].to_pylist())
    final = [r for r in rec.to_pylist() if r["checkpoint"] == "r02"]
    assert all(-1 - 1e-6 <= r["cos_freq_weighted"] <= 1 + 1e-6 for r in final)
    md = tiny_run.read_output("rock", "report.md").decode()
    assert md.count("data:image/png;base64,") == 5


def test_eval_and_report(tiny_run):
    for label in ("teacher", "initial_student", "final_student", "rock_bypass", "random_bypass"):
        e = tiny_run.require(f"eval.{label}")
        res = e["metrics"]["results"]["opdflow_arith"]
        assert 0.0 <= res["exact_match"] <= 1.0
        assert e["backend"]["lm_eval_version"]
    summary = json.loads(tiny_run.read_output("report", "summary.json"))
    assert summary["verdict"]["text"] and {r["model"] for r in summary["evaluation"]} >= {"teacher", "final_student"}


def test_capacity_from_measured_throughputs(tiny_run):
    from opdflow.tasks import capacity
    m = capacity.measured(tiny_run)
    assert m["round"] == tiny_run.config.train.rounds and all(v > 0 for v in m["tokens_per_s"].values())
    rows = capacity.predict({"rollout": 1000, "score": 1000, "train": 1000},
                            {"rollout": 100.0, "score": 1000.0, "train": 50.0}, [1, 4], train_efficiency=0.5)
    assert rows[0] == {"gpus": 1, "rollout_s": 10.0, "score_s": 1.0, "train_s": 40.0, "round_s": 51.0,
                       "bound_by": "train"}
    assert rows[1]["rollout_s"] == 2.5 and rows[1]["train_s"] == 10.0 and rows[1]["bound_by"] == "train"
    assert "| 4 |" in capacity.markdown(m, rows)


def test_patching_stage(tiny_run):
    e = tiny_run.require("patch")
    summary = json.loads(tiny_run.read_output("patch", "patching.json"))
    assert set(summary) == {"none", "rock", "random_matched"}
    assert all(s["n"] == tiny_run.config.data.n_eval for s in summary.values())
    assert summary["none"]["patched_token_share"] == 0.0
    # the unpatched arm is the final student's greedy decoding: lm-eval scored the same thing
    final = tiny_run.require("eval.final_student")["metrics"]["results"]["opdflow_arith"]["exact_match"]
    assert summary["none"]["accuracy"] == pytest.approx(final)
    assert e["metrics"]["accuracy_none"] == round(summary["none"]["accuracy"], 4)
    assert "Inference-time patching" in tiny_run.read_output("report", "report.md").decode()

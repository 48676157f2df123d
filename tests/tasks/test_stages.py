"""Each stage on tiny inputs, through its plain function (no Prefect), on a local store.

One module-scoped run of the tiny config goes through every stage of the plan; the
tests then check each stage's outputs against what the stage contract promises. The last
tests run the real flows over that committed run under Prefect's test harness (a temporary
server and database): the flow's wiring in seconds, where tests/test_lifecycle.py runs it
from scratch against a `prefect server` in minutes.
"""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from opdflow.infra.artifacts.manifest import Run
from opdflow.infra.artifacts.store import open_store
from opdflow.infra.artifacts.tables import parquet_to_table
from opdflow.tasks.shards import read_parts
from opdflow.tasks import train
from opdflow.tasks.plan import plan, stage_of


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_config):
    from opdflow.infra.preflight import preflight
    preflight(tiny_config)
    run = Run.create_or_open(open_store(str(tmp_path_factory.mktemp("store"))), "tiny", tiny_config)
    for stage in plan(tiny_config):
        stage_of(stage).run(run, stage)  # each stage's plain function, from the registry
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


def test_stage_table_counts_a_sharded_stages_shards(tiny_run):
    """The seconds `opdflow run` and `opdflow status` print for a sharded stage are its shards'
    and its merge's, not the merge's alone (which is ~0 s: the work is in the shards)."""
    from opdflow.tasks.report import stage_table
    rows = {r["stage"]: r for r in stage_table(tiny_run)}
    sharded = [s for s in plan(tiny_run.config) if tiny_run.require(s)["metrics"].get("shard_seconds_sum")]
    assert "rollout.r01" in sharded and "score.r01" in sharded
    for s in sharded:
        e = tiny_run.require(s)
        assert rows[s]["seconds"] == pytest.approx(e["seconds"] + e["metrics"]["shard_seconds_sum"], abs=2e-3), s
        assert rows[s]["seconds"] > e["seconds"], s
    # the verdict's compute axis counts the same seconds (an arm's rollout, scoring, training)
    from opdflow.tasks.common import stage_seconds
    from opdflow.tasks.plan import rollout_of, round_stage
    from opdflow.tasks.verdict import _name, compute_spent
    spent = compute_spent(tiny_run, "ablate-rock", 1)
    want = 0.0
    for r, row in enumerate(spent, 1):
        ro, sc = rollout_of(_name("ablate-rock", r, 1))
        want += sum(stage_seconds(tiny_run.require(x)) for x in (ro, sc, round_stage("train", r, "ablate-rock", 1)))
        assert row["wall_seconds"] == pytest.approx(want, abs=0.02)
    assert len(spent) == tiny_run.config.ablation.rounds


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
    from opdflow.infra.sampling.backends import rollout_backend
    assert e["backend"]["name"] == rollout_backend(c) and e["backend"]["configured"] == "auto"
    assert e["backend"]["temperature"] == c.rollout.temperature
    # rounds take different prompts; an ablation seed has its own prompts and sampling seeds
    r2 = _table(tiny_run, "rollout.r02", "rollouts")
    assert r2["prompt_id"].to_pylist() != t["prompt_id"].to_pylist()
    s1, s2 = (_table(tiny_run, f"ablate-uniform.s{s}.rollout.r01", "rollouts") for s in (1, 2))
    assert len({tuple(x["seed"].to_pylist()) for x in (t, s1, s2)}) == 3
    # round 1 is sampled once per seed (same start, same seeds for every arm); later rounds per arm,
    # with the seed's sampling seeds and the arm's own checkpoint
    assert tiny_run.entry("ablate-rock.s1.rollout.r01") is None and "ablate-rock.s1.rollout.r01" not in plan(c)
    rock2 = _table(tiny_run, "ablate-rock.s1.rollout.r02", "rollouts")
    uni2 = _table(tiny_run, "ablate-uniform.s1.rollout.r02", "rollouts")
    assert rock2["seed"].to_pylist() == uni2["seed"].to_pylist()
    assert rock2["prompt_id"].to_pylist() == uni2["prompt_id"].to_pylist()


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
    excluded = set(sets["rock"]) | set(sets["control"]) | set(sets["dropped"]) | set(sets["special"])
    draws = []
    for seed in tiny_run.config.ablation.seeds:
        for arm in ("ablate-uniform", "ablate-rock", "ablate-random"):
            bypass = json.loads(tiny_run.read_output(f"{arm}.s{seed}.train.r01", "bypass.json"))
            ids = set(bypass["ids"])
            for r in (1, 2):  # the set chosen in round 1 is the one every round bypasses
                t = _table(tiny_run, f"{arm}.s{seed}.train.r{r:02d}", "token_losses.parquet").to_pylist()
                assert t and all((row["weight"] == 0.0) == (row["token_id"] in ids) for row in t), (arm, seed, r)
            if arm == "ablate-uniform":
                assert not ids
            elif arm == "ablate-rock":
                assert ids == set(sets["rock"])
            else:
                assert ids.isdisjoint(excluded) and bypass["target_share"] == pytest.approx(bypass["rock_share"])
                draws.append(sorted(ids))
        # round 1 of every arm of a seed trains on the same rows (the uniform arm's rollout)
        m = {a: tiny_run.require(f"{a}.s{seed}.train.r01")["inputs"] for a in ("ablate-uniform", "ablate-rock")}
        assert {k: v["sha256"] for k, v in m["ablate-uniform"].items() if k.startswith("rollouts/")} == \
            {k: v["sha256"] for k, v in m["ablate-rock"].items() if k.startswith("rollouts/")}
    assert len(draws) == len(tiny_run.config.ablation.seeds)  # one independent draw per seed


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
    from opdflow.tasks.plan import eval_labels
    labels = eval_labels(tiny_run.config)
    assert "rock_bypass.s2.r01" in labels and "uniform.s1.r02" in labels and "random_bypass.s2.r02" in labels
    for label in labels:
        e = tiny_run.require(f"eval.{label}")
        res = e["metrics"]["results"]["opdflow_arith"]
        assert 0.0 <= res["exact_match"] <= 1.0
        assert e["backend"]["lm_eval_version"]
    summary = json.loads(tiny_run.read_output("report", "summary.json"))
    assert summary["verdict"]["text"] and {r["model"] for r in summary["evaluation"]} >= {"teacher", "final_student"}
    v = summary["verdict"]
    assert v["outcome"] in ("harm", "benefit", "equivalent", "inconclusive")
    assert [(c["a"], c["b"]) for c in v["comparisons"]] == [("ablate-rock", "ablate-uniform"),
                                                            ("ablate-random", "ablate-uniform"),
                                                            ("ablate-rock", "ablate-random")]
    for c in v["comparisons"]:
        assert c["n_seeds"] == 2 and c["n_items"] == tiny_run.config.data.n_eval
        assert c["ci_low"] <= c["diff"] <= c["ci_high"]
    # the per-seed accuracies are the eval stages' own scores
    for arm, label in (("ablate-uniform", "uniform"), ("ablate-rock", "rock_bypass")):
        for s in (1, 2):
            got = v["arms"][arm]["accuracy_per_seed"][str(s)]
            want = tiny_run.require(f"eval.{label}.s{s}.r02")["metrics"]["results"]["opdflow_arith"]["exact_match"]
            assert got == pytest.approx(want)
    assert len(v["curves"]["ablate-rock"]) == 2 and v["compute"]["ablate-rock"]["1"][-1]["tokens_weighted"] > 0
    md = tiny_run.read_output("report", "verdict.md").decode()
    assert md.count("data:image/png;base64,") == 3 and "Learning curves" in md and "±" in md


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
    assert {"arms", "comparisons", "rock_ids", "random_ids"} <= set(summary)
    arms = summary["arms"]
    assert {"none", "rock", "random"} <= set(arms) <= {"none", "rock", "random", "rock-matched", "random-matched"}
    sm = summary["share_match"]
    assert sm["shares"] == {"rock": arms["rock"]["patched_token_share"], "random": arms["random"]["patched_token_share"]}
    assert sm["matched_arms"] == ([sm["matched_arm"]] if sm["matched_arm"] else [])
    assert all(s["n"] == tiny_run.config.data.n_eval for s in arms.values())
    assert arms["none"]["patched_token_share"] == 0.0
    assert set(summary["comparisons"]) == {"rock_vs_none", "random_vs_none", "rock_vs_random"}
    # the unpatched arm is the final student's greedy decoding: lm-eval scored the same thing
    final = tiny_run.require("eval.final_student")["metrics"]["results"]["opdflow_arith"]["exact_match"]
    assert arms["none"]["accuracy"] == pytest.approx(final)
    assert e["metrics"]["accuracy_none"] == round(arms["none"]["accuracy"], 4)
    assert "Inference-time patching" in tiny_run.read_output("report", "report.md").decode()


def test_flows_on_the_committed_run_under_prefects_test_harness(tiny_run):
    """The lifecycle flow over a run whose every stage is committed: one completed task run per
    stage and shard of the plan, none re-run, each stage's task run waiting on the task runs of
    the stages it needs (what the UI draws as the graph); then `stage_flow` reruns one stage."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.testing.utilities import prefect_test_harness

    from opdflow.flows.lifecycle import lifecycle, stage_flow
    from opdflow.tasks.plan import needs
    from opdflow.tasks.shards import split_shard_name

    c, uri = tiny_run.config, tiny_run.store.uri
    before = tiny_run.require("report")["attempt"]
    with prefect_test_harness(server_startup_timeout=180):
        state = lifecycle(store=uri, run_id="tiny", return_state=True)
        assert state.is_completed(), state
        status = state.result()
        assert [s["name"] for s in status["stages"] if "shard" not in s["name"]] and status["run_id"] == "tiny"
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        by_name = {r.name: r for r in runs}
        assert len(by_name) == len(runs), "one task run per stage or shard"
        assert all(r.state.is_completed() for r in runs), [(r.name, r.state.name) for r in runs if not r.state.is_completed()]
        stages = [n for n in by_name if not split_shard_name(n)]
        assert sorted(stages) == sorted(plan(c))
        ids = {r.id: r.name for r in runs}
        for name in plan(c):
            upstream = {ids.get(i.id) for i in by_name[name].task_inputs.get("wait_for", [])}
            if stage_of(name).sharded:  # its stage task waits on its shards; the shards on the needs
                shards = {ids[i.id] for i in by_name[name].task_inputs["wait_for"]}
                assert shards and all(split_shard_name(s)[0] == name for s in shards), (name, shards)
                upstream = {ids.get(i.id) for s in shards for i in by_name[s].task_inputs.get("wait_for", [])}
            assert upstream == set(needs(c, name)), (name, upstream)
        assert tiny_run.require("report")["attempt"] == before, "a committed stage ran again"

        rerun = stage_flow(stage="report", run_id="tiny", store=uri)
    assert rerun["ran"] is True and tiny_run.require("report")["attempt"] == before + 1

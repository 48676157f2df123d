"""Sharded stages as plain functions: same tables as unsharded, shards committed alone."""
from __future__ import annotations

import json
import os

import pytest

from opdflow.infra.config import load_config
from opdflow.infra.artifacts.manifest import Run
from opdflow.infra.artifacts.store import open_store
from opdflow.tasks import models, prompts, rollout, score
from opdflow.tasks.shards import read_parts, shard_bounds, shard_name, split_shard_name

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_shard_bounds_cover_in_batches():
    assert shard_bounds(100, 3, 16) == [(0, 48), (48, 96), (96, 100)]
    assert shard_bounds(100, 1, 16) == [(0, 100)]
    assert shard_bounds(10, 8, 4) == [(0, 4), (4, 8), (8, 10)]  # fewer shards when batches run out
    for n_items, n, align in ((1, 5, 1), (257, 4, 64), (64, 4, 16)):
        b = shard_bounds(n_items, n, align)
        assert b[0][0] == 0 and b[-1][1] == n_items and all(lo < hi for lo, hi in b)
        assert all(lo == prev_hi for (lo, _), (_, prev_hi) in zip(b[1:], b)) and len(b) <= n
        assert all((hi - lo) % align == 0 for lo, hi in b[:-1])


def test_shard_names_round_trip():
    assert split_shard_name(shard_name("ablate-rock.rollout.r03", 2, 7)) == ("ablate-rock.rollout.r03", 2, 7)
    assert split_shard_name("rollout.r03") is None


def _run(store, run_id: str, shards: int) -> Run:
    config = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                         {"scale": {"shards": shards}, "rollout": {"prompts_per_round": 12, "batch_size": 4}})
    run = Run.create_or_open(store, run_id, config)
    for fn, stage in ((models.run, "models"), (prompts.run, "prompts"), (rollout.run, "rollout.r01"),
                      (score.run, "score.r01")):
        fn(run, stage)
    return run


def test_sharded_stages_equal_unsharded_and_rerun_only_missing_shards(tmp_path):
    store = open_store(str(tmp_path / "store"))
    one, three = _run(store, "one", 1), _run(store, "three", 3)
    for stage, table in (("rollout.r01", "rollouts"), ("score.r01", "scores")):
        assert len(three.outputs_under(stage, table)) == 3 and len(one.outputs_under(stage, table)) == 1
        assert read_parts(three, stage, table).equals(read_parts(one, stage, table)), stage
        assert three.require(stage)["metrics"]["shards"] == 3
    # the stage's metrics come from its shards' counts and sums: the same as one shard's
    for stage, keys in (("rollout.r01", ("n_sequences", "n_tokens", "n_stopped", "stop_rate", "sample_accuracy")),
                        ("score.r01", ("n_tokens", "teacher_logprob_mean", "sampled_reverse_kl_k1"))):
        m1, m3 = one.require(stage)["metrics"], three.require(stage)["metrics"]
        assert {k: m3[k] for k in keys} == {k: m1[k] for k in keys}, stage

    # a lost shard commit: rerunning the stage redoes that shard only, and recommits the stage
    lost = shard_name("rollout.r01", 1, 3)
    store.delete(f"runs/three/manifest/{lost}.json")
    before = {i: len(three.attempts(shard_name("rollout.r01", i, 3))) for i in range(3)}
    entry, ran = rollout.run(three, "rollout.r01")
    after = {i: len(three.attempts(shard_name("rollout.r01", i, 3))) for i in range(3)}
    assert ran and after == {0: before[0], 1: before[1] + 1, 2: before[2]}
    assert read_parts(three, "rollout.r01", "rollouts").equals(read_parts(one, "rollout.r01", "rollouts"))
    assert rollout.run(three, "rollout.r01") == (entry, False)  # now all committed: skipped


def test_execution_settings_do_not_change_the_run(tmp_path):
    """Resuming a run with other shard counts / processes keeps its identity and results."""
    store = open_store(str(tmp_path / "store"))
    run = _run(store, "r", 1)
    config = run.config.model_copy(update={"scale": run.config.scale.model_copy(update={"shards": 2})})
    again = Run.create_or_open(store, "r", config)
    assert again.config.scale.shards == 2 and Run.open(store, "r").config.scale.shards == 2
    other = run.config.model_copy(update={"seed": 1})
    with pytest.raises(Exception, match="different config"):
        Run.create_or_open(store, "r", other)


def test_sharded_evaluation_equals_one_lm_eval_run(tmp_path):
    from opdflow.tasks import evaluate
    store = open_store(str(tmp_path / "store"))
    one, three = _run(store, "one", 1), _run(store, "three", 3)
    e1, _ = evaluate.run(one, "eval.teacher")
    e3, _ = evaluate.run(three, "eval.teacher")
    assert e3["metrics"]["shards"] == 3 and len(three.outputs_under("eval.teacher", "samples")) == 3
    assert e3["metrics"]["n_samples"] == e1["metrics"]["n_samples"] == {"opdflow_arith": one.config.data.n_eval}
    assert e3["metrics"]["results"] == e1["metrics"]["results"]  # the mean over documents, exactly
    r1, r3 = (json.loads(r.read_output("eval.teacher", "results.json")) for r in (one, three))
    assert r3["stderr"]["opdflow_arith"]["exact_match"] == pytest.approx(r1["stderr"]["opdflow_arith"]["exact_match"])
    docs = lambda r: [json.loads(x)["doc_id"] for x in r.read_output("eval.teacher", "samples.jsonl").splitlines()]  # noqa: E731
    assert docs(three) == docs(one) == list(range(one.config.data.n_eval))


@pytest.mark.slow
def test_sharded_rock_analysis_equals_unsharded(tmp_path):
    from opdflow.tasks import train
    from opdflow.tasks.rock import analysis, probe
    store = open_store(str(tmp_path / "store"))
    runs = {}
    for n in (1, 3):
        config = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                             {"scale": {"shards": n}, "train": {"rounds": 1}, "ablation": {"enabled": False},
                              "rock": {"checkpoints": ["initial", "final"]},
                              "data": {"n_probe": 12}, "rollout": {"batch_size": 4}})
        run = runs[n] = Run.create_or_open(store, f"rock{n}", config)
        for fn, stage in ((models.run, "models"), (prompts.run, "prompts"), (rollout.run, "rollout.r01"),
                          (score.run, "score.r01"), (train.run, "train.r01"), (probe.run_probe, "rock-probe"),
                          (probe.run_directions, "rock-directions"), (analysis.run, "rock")):
            fn(run, stage)
    one, three = runs[1], runs[3]
    assert len(three.outputs_under("rock", "records")) == 3 and three.require("rock")["metrics"]["shards"] == 3
    assert read_parts(three, "rock-probe", "probes").equals(read_parts(one, "rock-probe", "probes"))
    order = [("checkpoint", "ascending"), ("prompt_id", "ascending"), ("sample_idx", "ascending"),
             ("position", "ascending")]  # parts hold each shard's positions for every checkpoint
    r1, r3 = (read_parts(r, "rock", "records").sort_by(order) for r in (one, three))
    exact = ["checkpoint", "prompt_id", "sample_idx", "position", "token_id", "student_top1", "teacher_top1"]
    assert r3.select(exact).equals(r1.select(exact))
    for col in ("kl", "grad_norm", "cos_freq_weighted", "cos_freq_balanced"):  # batch padding: float rounding only
        a, b = r1[col].to_pylist(), r3[col].to_pylist()
        assert [x is None for x in a] == [x is None for x in b]
        assert [x for x in b if x is not None] == pytest.approx([x for x in a if x is not None], abs=1e-6), col
    assert json.loads(three.read_output("rock", "rock_sets.json")) == json.loads(one.read_output("rock", "rock_sets.json"))

"""Distributed training: two FSDP2 processes under torchrun (gloo, CPU) against one process.

The global batch is fixed by the config, so the world size may change results only at
float rounding: gradients are reduced across ranks in a different order. Measured on the
tiny demo models over 4 AdamW steps: identical per-step losses to 1e-6 and weights within
TOL (the bound asserted below).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import load as st_load

from opdflow.infra.config import load_config
from opdflow.infra.artifacts.manifest import Run
from opdflow.infra.artifacts.store import open_store
from opdflow.tasks import models, prompts, rollout, score, train

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-5

KILL_SCRIPT = """
import sys
from opdflow.infra.artifacts.manifest import Run
from opdflow.tasks import train
train.run(Run.open(sys.argv[1], "fsdp"), "train.r01", force=True)
"""


def with_world(run: Run, nproc: int, micro: int | None = None, fused: bool = False) -> Run:
    """The same run executed by another number of processes (execution settings only)."""
    t = run.config.train.model_copy(update={"nproc_per_node": nproc, "micro_batch_size": micro,
                                            "fused_lm_head": fused})
    return Run(run.store, run.run_id, run.config.model_copy(update={"train": t}))


def weights(run: Run, entry: dict) -> dict[str, torch.Tensor]:
    return st_load(run.read(entry["outputs"]["model/model.safetensors"]))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    config = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                         {"train": {"steps_per_round": 4, "checkpoint_every": 2, "batch_size": 8}})
    store = open_store(str(tmp_path_factory.mktemp("fsdp") / "store"))
    run = Run.create_or_open(store, "fsdp", config.model_copy(
        update={"train": config.train.model_copy(update={"nproc_per_node": 2})}))
    for fn, stage in ((models.run, "models"), (prompts.run, "prompts"), (rollout.run, "rollout.r01"),
                      (score.run, "score.r01")):
        fn(run, stage)
    one, _ = train.run(with_world(run, 1), "train.r01", force=True)
    return run, one, weights(run, one)


def test_two_fsdp_processes_match_one_process(prepared):
    run, one, w_one = prepared
    two, ran = train.run(run, "train.r01", force=True)
    assert ran and two["key"] == one["key"]  # the world size is not part of the stage's identity
    assert two["backend"]["world_size"] == 2 and two["backend"]["fsdp"] and two["backend"]["process_group"] == "gloo"
    assert one["backend"]["world_size"] == 1
    assert two["metrics"]["losses"] == pytest.approx(one["metrics"]["losses"], abs=1e-6)
    assert max_diff(weights(run, two), w_one) < TOL
    assert max_diff(w_one, st_load(run.read(run.require("models")["outputs"]["student/model.safetensors"]))) > 1e-3

    # gradient accumulation: 2 processes x micro-batches of 3 rows give the same step
    acc, _ = train.run(with_world(run, 2, micro=3), "train.r01", force=True)
    assert acc["metrics"]["losses"] == pytest.approx(one["metrics"]["losses"], abs=1e-6)
    assert max_diff(weights(run, acc), w_one) < TOL


def test_fused_lm_head_under_fsdp_matches_the_logits_path(prepared):
    """`train.fused_lm_head`: the lm_head applied inside the loss (its weight gathered by FSDP's
    root forward, its gradient reduce-scattered by the root's backward) trains like the
    model's own logits, in one process and in two, and gives the same trainer log-probs."""
    run, one, w_one = prepared
    for nproc in (1, 2):
        fused, _ = train.run(with_world(run, nproc, fused=True), "train.r01", force=True)
        assert fused["key"] == one["key"] and fused["backend"]["fused_lm_head"]
        assert fused["metrics"]["losses"] == pytest.approx(one["metrics"]["losses"], abs=1e-6)
        assert max_diff(weights(run, fused), w_one) < TOL
        assert fused["metrics"]["mismatch"]["mean_abs_diff"] == pytest.approx(
            one["metrics"]["mismatch"]["mean_abs_diff"], abs=1e-6)

    # with TIS the trainer's log-probs weight the loss, so they are computed before it
    tis, tis_w = {}, {}
    for fused in (False, True):  # same stage key: read each run's weights before the next
        r = with_world(run, 1, fused=fused)
        r = Run(r.store, r.run_id, r.config.model_copy(
            update={"train": r.config.train.model_copy(update={"tis_cap": 1.05})}))
        tis[fused], _ = train.run(r, "train.r01", force=True)
        tis_w[fused] = weights(run, tis[fused])
    assert tis[True]["metrics"]["losses"] == pytest.approx(tis[False]["metrics"]["losses"], abs=1e-6)
    assert tis[True]["metrics"]["losses"] != pytest.approx(one["metrics"]["losses"], abs=1e-6)
    assert max_diff(tis_w[True], tis_w[False]) < TOL


def test_checkpoint_from_two_processes_resumes_in_one(prepared, kill_when_held):
    """Killed (all processes) right after the two-process checkpoint of step 2 of 4 is
    committed (the round holds there: tests/tasks/conftest.py), resumed by one process."""
    run, one, w_one = prepared
    stage_prefix = "runs/fsdp/stages/train.r01/"
    run.store.delete_prefix(f"{stage_prefix}{one['key'][:16]}/partial/")

    mark = kill_when_held([sys.executable, "-c", KILL_SCRIPT, run.store.uri], "train.r01", 2, ROOT)
    assert mark.startswith(stage_prefix) and mark.endswith("/partial/step-000002/state.json") and run.store.exists(mark)
    shards = [k for k in run.store.list(mark.rsplit("/", 1)[0] + "/dcp/")]
    assert len(shards) >= 2, shards  # one file of shards per rank

    resumed, ran = train.run(with_world(run, 1), "train.r01", force=True)
    assert ran and resumed["metrics"]["resumed_from_step"] == 2 and resumed["backend"]["world_size"] == 1
    assert resumed["metrics"]["losses"] == pytest.approx(one["metrics"]["losses"], abs=1e-6)
    assert max_diff(weights(run, resumed), w_one) < TOL


def test_hidden_signal_under_fsdp_matches_one_process(tmp_path):
    """`scoring.signal: hidden`: each rank rebuilds the teacher's logits from the stored hidden
    states with the teacher's lm_head (loaded once per round by `prepare`, padded rows cut off);
    two processes train like one, with and without `train.fused_lm_head`."""
    config = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                         {"train": {"steps_per_round": 2, "batch_size": 8, "nproc_per_node": 2},
                          "scoring": {"signal": "hidden"}})
    run = Run.create_or_open(open_store(str(tmp_path / "store")), "fsdp-hidden", config)
    for fn, stage in ((models.run, "models"), (prompts.run, "prompts"), (rollout.run, "rollout.r01"),
                      (score.run, "score.r01")):
        fn(run, stage)
    assert run.require("score.r01")["backend"]["signal"] == "hidden"
    one, _ = train.run(with_world(run, 1), "train.r01", force=True)
    w_one = weights(run, one)
    for fused in (False, True):
        two, ran = train.run(with_world(run, 2, fused=fused), "train.r01", force=True)
        assert ran and two["key"] == one["key"] and two["backend"]["world_size"] == 2
        assert two["metrics"]["losses"] == pytest.approx(one["metrics"]["losses"], abs=1e-6)
        assert max_diff(weights(run, two), w_one) < TOL

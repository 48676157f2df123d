"""Crash-safe training: SIGKILL mid-round, retry, same final weights as without the crash.

The kill lands right after the checkpoint of step 9 of 24 is committed: the round holds
there (`OPDFLOW_HOLD_AFTER_CHECKPOINT`, tests/tasks/conftest.py), so no timing is involved."""
from __future__ import annotations

import os
import sys

import pytest

from opdflow.infra.config import load_config
from opdflow.infra.artifacts.manifest import Run
from opdflow.infra.artifacts.store import open_store
from opdflow.tasks import models, prompts, rollout, score, train

pytestmark = pytest.mark.slow

KILL_SCRIPT = """
import sys
from opdflow.infra.artifacts.manifest import Run
from opdflow.tasks import train
train.run(Run.open(sys.argv[1], "resume"), "train.r01", force=True)
"""


def test_sigkill_mid_round_resumes_to_the_same_weights(tmp_path, kill_when_held):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config = load_config(os.path.join(root, "configs", "tiny.yaml"),
                         {"train": {"steps_per_round": 24, "checkpoint_every": 3}})
    store = open_store(str(tmp_path / "store"))
    run = Run.create_or_open(store, "resume", config)
    for fn, stage in ((models.run, "models"), (prompts.run, "prompts"), (rollout.run, "rollout.r01"),
                      (score.run, "score.r01")):
        fn(run, stage)
    clean, _ = train.run(run, "train.r01")
    assert "resumed_from_step" not in clean["metrics"]
    assert not store.list(f"runs/resume/stages/train.r01/{clean['key'][:16]}/partial/")

    mark = kill_when_held([sys.executable, "-c", KILL_SCRIPT, store.uri], "train.r01", 9, root)
    assert mark.startswith("runs/resume/stages/train.r01/") and mark.endswith("/partial/step-000009/state.json")
    assert store.exists(mark)
    assert run.attempts("train.r01")[-1]["status"] == "running"  # died without a word

    resumed, ran = train.run(run, "train.r01", force=True)
    assert ran and resumed["metrics"]["resumed_from_step"] == 9
    assert resumed["metrics"]["losses"] == clean["metrics"]["losses"]
    for name in ("model/model.safetensors", "optimizer.safetensors", "token_losses.parquet"):
        assert resumed["outputs"][name]["sha256"] == clean["outputs"][name]["sha256"], name

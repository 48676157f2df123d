"""Crash-safe training: SIGKILL mid-round, retry, same final weights as without the crash."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from opdflow.infra.config import load_config
from opdflow.infra.manifest import Run
from opdflow.infra.store import open_store
from opdflow.tasks import models, prompts, rollout, score, train

pytestmark = pytest.mark.slow

KILL_SCRIPT = """
import sys
from opdflow.infra.manifest import Run
from opdflow.tasks import train
train.run(Run.open(sys.argv[1], "resume"), "train.r01", force=True)
"""


def test_sigkill_mid_round_resumes_to_the_same_weights(tmp_path):
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

    prefix = f"runs/resume/stages/train.r01/{clean['key'][:16]}/partial/step-000009/state.json"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, store.uri], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not store.exists(prefix):
        assert proc.poll() is None, "the training subprocess ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert run.attempts("train.r01")[-1]["status"] == "running"  # died without a word

    resumed, ran = train.run(run, "train.r01", force=True)
    assert ran and resumed["metrics"]["resumed_from_step"] >= 9
    assert resumed["metrics"]["losses"] == clean["metrics"]["losses"]
    for name in ("model/model.safetensors", "optimizer.safetensors", "token_losses.parquet"):
        assert resumed["outputs"][name]["sha256"] == clean["outputs"][name]["sha256"], name

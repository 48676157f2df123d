"""infra/tracking.py and the per-step log: values computed from a step's tokens, TensorBoard
event files written and read back, the curves' PNG; `opdflow validate` rejecting an lm-eval
task name lm-eval does not have, in seconds. (MLflow against a real server: test_lifecycle.py.)"""
from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opdflow.infra.tracking import curves_png, read_events, train_scalars, write_events
from opdflow.tasks.train_worker import step_metrics

ROOT = Path(__file__).resolve().parents[2]


def test_step_metrics_from_the_steps_tokens():
    batch = [{"logprobs": [-1.0, -2.0]}, {"logprobs": [-0.5]}]
    trainer = [-1.5, -2.0, -0.25]
    m = step_metrics(3, 0.4, batch, per_token=[0.2, 0.6, 1.0], weights=[1.0, 0.0, 1.0], trainer_lp=trainer,
                     extra={"global_step": 7, "grad_norm": 1.5, "lr": 1e-3, "seconds": 0.5})
    assert m["step"] == 3 and m["global_step"] == 7 and m["loss"] == 0.4
    assert m["divergence"] == pytest.approx(0.6)          # all tokens, bypassed ones too
    assert m["bypassed_fraction"] == pytest.approx(1 / 3)
    assert m["tokens_per_s"] == pytest.approx(6.0)
    d = [-0.5, 0.0, 0.25]                                  # trainer - sampler
    assert m["mismatch_abs"] == pytest.approx(0.25)
    assert m["mismatch_k3"] == pytest.approx(sum(math.expm1(x) - x for x in d) / 3, abs=1e-6)
    # no sampler logprobs (a backend that does not return them): no mismatch, the rest stays
    assert "mismatch_k3" not in step_metrics(0, 0.1, [{}], [0.1], [1.0], [-1.0], {"global_step": 0})


def test_tensorboard_events_round_trip(tmp_path):
    steps = [{"global_step": g, "loss": 1.0 / (g + 1), "grad_norm": 2.0 + g, "lr": None} for g in range(5)]
    scalars = train_scalars(steps)
    assert {t for t, _, _ in scalars} == {"train/loss", "train/grad_norm"}  # None values are skipped
    write_events(tmp_path / "tb", scalars + [("eval/t/acc", 0, 0.25), ("eval/t/acc", 2, 0.5)])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    back = read_events(tmp_path / "tb")
    assert [(s, round(v, 6)) for s, v in back["train/loss"]] == [(g, round(1.0 / (g + 1), 6)) for g in range(5)]
    assert back["eval/t/acc"] == [(0, 0.25), (2, 0.5)]
    png = curves_png({"main": scalars + [("eval/t/acc", 0, 0.25)], "teacher": [("eval/t/acc", 0, 0.9)]})
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import io
    from PIL import Image
    width, height = Image.open(io.BytesIO(png)).size  # 3 panels: 2 a row
    assert 800 <= width <= 1000 and height > 500  # the artifact column is ~860 px: labels not shrunk
    assert curves_png({}) is None


@pytest.mark.integration
@pytest.mark.slow
def test_validate_rejects_an_unknown_lm_eval_task(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text((ROOT / "configs" / "tiny.yaml").read_text().replace("tasks: [opdflow_arith]",
                                                                       "tasks: [opdflow_arith, gsm8kk]"))
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "opdflow.flows.cli", "validate", str(cfg)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    secs = time.time() - t0
    assert p.returncode == 2, p.stdout + p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("opdflow: config error: eval.tasks: "), p.stderr
    assert "'gsm8kk'" in err[0] and "did you mean 'gsm8k'" in err[0]
    print(f"validate with an unknown task: {secs:.1f}s")

"""The whole lifecycle through the CLI, against a real `prefect server`.

One run of the tiny config end to end; then: the same command again runs no stage;
`opdflow status --json`; the flow's artifacts read back through the Prefect API;
deleting one stage's outputs and `opdflow stage` recreates them; a corrupted object
makes the next reader fail with a checksum error naming it. A second test runs the
first stages against moto's S3 server over HTTP.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def cli(*args, env=None, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opdflow.flows.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)


def _attempts(store: Path, run_id: str) -> int:
    return len(list((store / "runs" / run_id / "attempts").rglob("*.json")))


def _artifacts(api_url: str) -> dict[str, list]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            out: dict[str, list] = {}
            for a in client.read_artifacts(limit=200):
                out.setdefault(a.key or f"<{a.type}>", []).append(a)
            return out


def _look_at_the_ui(server, arts) -> None:
    """What a person sees: the rock report and the evaluation table, rendered by the
    Prefect UI in headless Chromium; screenshots go to test-output/."""
    import opdflow_tests_ui as ui  # registered by conftest.py
    if ui.chromium_path() is None:
        print("chromium not installed (.ci/install-chromium): UI screenshots skipped")
        return
    out = ROOT / "test-output"
    out.mkdir(exist_ok=True)
    base = server.url[: -len("/api")]
    rock = arts["rock"][0]
    dom = ui.capture(ui.artifact_page_url(base, rock.id), out / "lifecycle-rock-report.png")
    ui.assert_rendered(dom, headings=["Funnel", "Stagnation across checkpoints"], image_prefix="data:image/png;base64,")
    dom = ui.capture(ui.artifact_page_url(base, arts["evaluation"][0].id), out / "lifecycle-evaluation.png")
    ui.assert_rendered(dom, text=["final_student", "exact_match"])
    dom = ui.capture(ui.artifact_page_url(base, arts["train-r01"][0].id), out / "lifecycle-train-mismatch.png")
    ui.assert_rendered(dom, headings=["Sampler vs trainer logprobs"], text=["k3 KL"],
                       image_prefix="data:image/png;base64,")
    dom = ui.capture(ui.flow_run_artifacts_url(base, rock.flow_run_id), out / "lifecycle-flow-run-artifacts.png")
    ui.assert_rendered(dom, text=["run-summary", "evaluation"])


def test_lifecycle_end_to_end(prefect_server, tmp_path):
    store = tmp_path / "store"
    env = {"PREFECT_API_URL": prefect_server.url}
    t0 = time.time()
    first = cli("run", TINY, "--store", store, "--run-id", "e2e", env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    print(f"tiny lifecycle: {time.time() - t0:.1f}s")
    assert "initial student" in first.stdout and "lifecycle wall time" in first.stdout

    status = json.loads(cli("status", "--run-id", "e2e", "--store", store, "--json").stdout)
    assert status["run_id"] == "e2e" and status["wall_seconds"] > 0
    assert all(s["status"] == "committed" for s in status["stages"]), status["stages"]
    for label in ("teacher", "initial_student", "final_student"):
        assert 0.0 <= status["eval"][label]["opdflow_arith"]["exact_match"] <= 1.0

    # Artifacts in the Prefect UI's database, read back through the API.
    arts = _artifacts(prefect_server.url)
    for key in ("evaluation", "rock", "rock-tokens", "ablation-verdict", "run-summary", "train-r01"):
        assert key in arts, sorted(arts)
    assert "Sampler vs trainer logprobs" in arts["train-r01"][0].data  # the logprob mismatch table
    rock_md = arts["rock"][0].data
    assert "data:image/png;base64," in rock_md and "Rock-token report" in rock_md
    assert any(a.type == "progress" for a in arts.get("<progress>", []))
    _look_at_the_ui(prefect_server, arts)

    # The same command again: no stage runs.
    n = _attempts(store, "e2e")
    again = cli("run", TINY, "--store", store, "--run-id", "e2e", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _attempts(store, "e2e") == n

    # Delete one stage's committed outputs; `opdflow stage` recreates them, identical.
    entry = json.loads((store / "runs/e2e/manifest/score.r02.json").read_text())
    for ref in entry["outputs"].values():
        (store / ref["key"]).unlink()
    redo = cli("stage", "score.r02", "--run-id", "e2e", "--store", store, env=env)
    assert redo.returncode == 0, redo.stderr[-3000:]
    new = json.loads((store / "runs/e2e/manifest/score.r02.json").read_text())
    assert {k: r["sha256"] for k, r in new["outputs"].items()} == {k: r["sha256"] for k, r in entry["outputs"].items()}
    assert all((store / r["key"]).exists() for r in new["outputs"].values())

    # A corrupted object: the next reader fails with a checksum error naming it.
    ro = json.loads((store / "runs/e2e/manifest/rollout.r02.json").read_text())["outputs"]["rollouts/part-00000.parquet"]
    with open(store / ro["key"], "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    shard_attempts = store / "runs/e2e/attempts/score.r02.shard-000-of-001"  # the shard reads the rollout
    before = len(list(shard_attempts.glob("*.json")))
    bad = cli("stage", "score.r02", "--run-id", "e2e", "--store", store, env=env)
    assert bad.returncode != 0
    assert "checksum mismatch" in bad.stderr and ro["key"] in bad.stderr, bad.stderr[-3000:]
    # a permanent error: failed at once, not retried
    attempts = sorted(shard_attempts.glob("*.json"))
    assert len(attempts) == before + 1
    assert json.loads(attempts[-1].read_text())["status"] == "failed"


def test_first_stages_on_s3(s3_store_uri, tiny_config):
    """models -> prompts -> one OPD round with the store on a real S3 endpoint."""
    from opdflow.infra.manifest import Run
    from opdflow.infra.store import open_store
    from opdflow.tasks import models, prompts, rollout, score, train
    store = open_store(s3_store_uri)
    store.check()
    run = Run.create_or_open(store, "s3run", tiny_config)
    for fn, stage in ((models.run, "models"), (prompts.run, "prompts"), (rollout.run, "rollout.r01"),
                      (score.run, "score.r01"), (train.run, "train.r01")):
        entry, ran = fn(run, stage)
        assert ran and entry["outputs"]
    keys = [k for k in store.list("runs/s3run/manifest/") if ".shard-" not in k]
    assert len(keys) == 5
    assert any(k.endswith("model.safetensors") for k in store.list("runs/s3run/stages/train.r01/"))
    _, ran = train.run(Run.open(s3_store_uri, "s3run"), "train.r01")
    assert not ran

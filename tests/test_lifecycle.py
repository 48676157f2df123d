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
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            # this run's flow runs only: the server is shared with other tests' runs (dask, ...)
            ours = [f.id for f in client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="e2e")))]
            out: dict[str, list] = {}
            arts, page = [], None
            while page is None or len(page) == 200:  # the API's page limit
                page = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ours)),
                                             limit=200, offset=len(arts))
                arts += page
            for a in arts:
                # keys are namespaced by config name (the run id `e2e` is its own): one key, one line of runs
                assert a.key is None or a.key.startswith("e2e-"), a.key
                out.setdefault(a.key.removeprefix("e2e-") if a.key else f"<{a.type}>", []).append(a)
            return out


def _flow_runs(api_url: str, name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))


def _check_concurrency_and_progress(api_url: str, flow_run_id) -> None:
    """Issue 13: stages that do not need each other ran at the same time (task run start and
    end times), stage tasks waited on what they need (`wait_for`: the UI's graph), and every
    stage of the plan opened a progress artifact (the tiny config runs `scale.shards: 1`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType,
                                                FlowRunFilter, FlowRunFilterId)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from opdflow.infra.config import load_config
    from opdflow.tasks.plan import needs, plan
    from opdflow.tasks.shards import split_shard_name
    config = load_config(TINY)
    stages = plan(config)
    assert config.scale.shards == 1
    def pages(read, **filters) -> list:  # the API returns at most 200 per call
        out: list = []
        while True:
            got = read(**filters, limit=200, offset=len(out))
            out += got
            if len(got) < 200:
                return out

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            task_runs = pages(client.read_task_runs,
                              flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            progress = pages(client.read_artifacts, artifact_filter=ArtifactFilter(
                type=ArtifactFilterType(any_=["progress"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    base = lambda name: (split_shard_name(name) or (name,))[0]  # noqa: E731
    shown = {base(a.description.split(":")[0].removesuffix(" progress")) for a in progress if a.description}
    assert set(stages) <= shown, sorted(set(stages) - shown)
    runs = [t for t in task_runs if t.start_time and t.end_time and base(t.name) in stages]
    assert {base(t.name) for t in runs} == set(stages)
    upstream: dict[str, set[str]] = {}
    for name in stages:  # plan order: what a stage needs, transitively
        upstream[name] = set(needs(config, name)).union(*(upstream[d] for d in needs(config, name)))
    overlaps = [(a.name, b.name) for a in runs for b in runs
                if base(a.name) != base(b.name) and base(a.name) not in upstream[base(b.name)]
                and base(b.name) not in upstream[base(a.name)] and a.start_time < b.end_time
                and b.start_time < a.end_time]
    assert overlaps, "no two independent stages ran at the same time"
    train = next(t for t in runs if t.name == "train.r02")
    assert train.task_inputs.get("wait_for"), train.task_inputs  # submitted waiting on rollout/score/train.r01


def _check_reviewable(prefect_server, mlflow_server, store: Path, arts: dict, subtests) -> None:
    """Issue 18: the flow run named and tagged, the run-summary's headline and order, the
    curves in TensorBoard event files and in MLflow, read back; screenshots of the pages."""
    import re

    from opdflow.infra.tracking import read_events
    runs = _flow_runs(prefect_server.url, "e2e")
    assert len(runs) == 1, [r.name for r in runs]
    assert {"opdflow", "config:e2e", "run:e2e", "teacher:demo", "student:demo"} <= set(runs[0].tags), runs[0].tags
    # the Logs tab: named from its first line, then a line per stage with its time and numbers
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings
    logs: list[str] = []
    deadline = time.time() + 60  # the server writes log batches asynchronously: wait until they are in
    while time.time() < deadline and not any(m.startswith("train.r01 committed in ") for m in logs):
        with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
            with get_client(sync_client=True) as client:
                logs = [log.message for log in client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[runs[0].id])), limit=200)]
        time.sleep(0 if logs else 2)
    assert "Beginning flow run 'e2e' for flow 'opdflow-lifecycle'" in logs, logs[:3]
    assert any(m.startswith("train.r01 committed in ") and "loss_mean" in m for m in logs), logs[:20]
    # the run-summary: a flow-level artifact (listed above the task runs' ones in the V1 UI)
    summary = arts["run-summary"][0]
    assert summary.flow_run_id == runs[0].id and summary.task_run_id is None
    md = summary.data
    assert md.splitlines()[2].startswith("**Completed**"), md[:500]
    assert re.search(r"Student exact_match on `opdflow_arith`: \*\*\d\.\d{3} → \d\.\d{3}\*\* \(teacher", md), md[:800]
    assert "Ablation verdict" in md.split("## Curves")[0]  # the headline holds the verdict's sentence
    assert re.search(r"^Wall time .+; slowest: `", md.split("## Curves")[0], re.M), md[:800]
    order = [md.index(h) for h in ("## Curves", "## Everything else", "## Wall time per stage")]
    assert order == sorted(order), order
    secs = [float(x) for x in re.findall(r"^\| `[^`]+` \| committed \| ([\d.]+) s \|", md, re.M)]
    assert len(secs) > 10 and secs == sorted(secs, reverse=True), secs
    assert "**total** (committed stages)" in md and "data:image/png;base64," in md
    assert "MLflow: run" in md and "e2e-evaluation" in md
    # TensorBoard: each train stage's own events, and the whole run's per line in `report`
    steps = 2 * 2  # tiny: 2 rounds x 2 steps
    tb = read_events(next((store / "runs/e2e/stages/report").glob("*/tensorboard/main")))
    assert [s for s, _ in tb["train/loss"]] == list(range(steps)), tb["train/loss"]
    for tag in ("train/divergence", "train/grad_norm", "train/lr", "train/tokens_per_s", "train/mismatch_k3"):
        assert len(tb[tag]) == steps and all(v == v for _, v in tb[tag]), tag
    assert all(v > 0 for _, v in tb["train/grad_norm"])
    assert [s for s, _ in tb["eval/opdflow_arith/exact_match"]] == [0, 2]
    r1 = read_events(next((store / "runs/e2e/stages/train.r01").glob("*/tensorboard")))
    assert r1["train/loss"] == tb["train/loss"][:2]
    # MLflow: one run for the opdflow run, nested runs per line, read back through its API
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=mlflow_server.url)
    exp = client.get_experiment_by_name("opdflow")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`opdflow.run_id` = 'e2e'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["train.rounds"] == "2" and "final_student.opdflow_arith.exact_match" in parent.data.metrics
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    lines = {c.data.tags["opdflow.line"]: c for c in children}
    assert {"main", "ablate-rock.s1", "ablate-random.s1", "ablate-uniform.s1"} <= set(lines), sorted(lines)
    hist = client.get_metric_history(lines["main"].info.run_id, "train.loss")
    got = sorted((m.step, m.value) for m in hist)  # TensorBoard keeps float32, MLflow float64
    assert [s for s, _ in got] == [s for s, _ in tb["train/loss"]]
    assert [v for _, v in got] == pytest.approx([v for _, v in tb["train/loss"]], rel=1e-6)
    # what a person sees
    import opdflow_tests_ui as ui  # registered by conftest.py
    with subtests.test("run summary and MLflow pages in the browser"):
        ui.require_chromium()  # a skip of this check alone when there is no browser
        out = ROOT / "test-output"
        out.mkdir(exist_ok=True)
        base = prefect_server.url[: -len("/api")]
        dom = ui.capture(ui.artifact_page_url(base, summary.id), out / "lifecycle-run-summary.png")
        ui.assert_rendered(dom, headings=["Run e2e", "Wall time", "Curves"], text=["Completed", "total"],
                           image_prefix="data:image/png;base64,")
        dom = ui.capture(ui.flow_run_url(base, runs[0].id), out / "lifecycle-flow-run.png")
        ui.assert_rendered(dom, text=["e2e"])
        url = f"{mlflow_server.url}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}"
        dom = ui.capture(url, out / "lifecycle-mlflow-run.png")
        assert "e2e" in dom and "final_student.opdflow_arith.exact_match" in dom
        ui.capture(f"{mlflow_server.url}/#/experiments/{exp.experiment_id}/runs/{lines['main'].info.run_id}/"
                   "model-metrics", out / "lifecycle-mlflow-main-curves.png")


def _look_at_the_ui(server, arts) -> None:
    """What a person sees: the rock report and the evaluation table, rendered by the
    Prefect UI in headless Chromium; screenshots go to test-output/."""
    import opdflow_tests_ui as ui  # registered by conftest.py
    ui.require_chromium()  # run in a subtest: a skip of this check alone when there is no browser
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
    dom = ui.capture(ui.artifact_page_url(base, arts["ablation-verdict"][0].id), out / "lifecycle-ablation-verdict.png")
    ui.assert_rendered(dom, headings=["Learning curves", "Compute"], text=["rocks bypassed vs uniform", "95% CI"],
                       image_prefix="data:image/png;base64,")
    dom = ui.capture(ui.flow_run_artifacts_url(base, rock.flow_run_id), out / "lifecycle-flow-run-artifacts.png")
    ui.assert_rendered(dom, text=["run-summary", "evaluation"])


def test_lifecycle_end_to_end(prefect_server, mlflow_server, tmp_path, subtests):
    store = tmp_path / "store"
    # INFO, as a user's run logs (the test session's default is WARNING): the Logs tab is checked
    env = {"PREFECT_API_URL": prefect_server.url, "MLFLOW_TRACKING_URI": mlflow_server.url, "PREFECT_LOGGING_LEVEL": "INFO"}
    t0 = time.time()
    first = cli("run", TINY, "--store", store, "--run-id", "e2e", env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    print(f"tiny lifecycle: {time.time() - t0:.1f}s")
    assert "initial student" in first.stdout and "lifecycle wall time" in first.stdout
    assert "View run" not in first.stdout  # MLflow's own console lines per run are off

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
    with subtests.test("rock, evaluation, train and verdict reports in the Prefect UI"):
        _look_at_the_ui(prefect_server, arts)
    _check_reviewable(prefect_server, mlflow_server, store, arts, subtests)
    _check_concurrency_and_progress(prefect_server.url, _flow_runs(prefect_server.url, "e2e")[0].id)

    # The same command again: no stage runs.
    n = _attempts(store, "e2e")
    again = cli("run", TINY, "--store", store, "--run-id", "e2e", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _attempts(store, "e2e") == n
    # ... and MLflow still holds one run of it, with one child run per line (the earlier ones deleted)
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=mlflow_server.url)
    exp_id = client.get_experiment_by_name("opdflow").experiment_id
    assert len(client.search_runs([exp_id], filter_string="tags.`opdflow.run_id` = 'e2e'")) == 1
    assert len(client.search_runs([exp_id], filter_string="tags.`opdflow.run_id` = 'e2e/main'")) == 1

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
    # one summary, the failure in a line with the command that reruns it, no traceback on the console
    assert "Traceback (most recent call last)" not in bad.stderr + bad.stdout, bad.stderr[-3000:]
    assert f"FAILED: score.r02: " in bad.stderr and "opdflow stage score.r02 --run-id e2e" in bad.stderr
    failed_summary = _artifacts(prefect_server.url)["run-summary"]
    assert any("**FAILED at `score.r02`**" in a.data for a in failed_summary), [a.data[:300] for a in failed_summary]
    # a permanent error: failed at once, not retried
    attempts = sorted(shard_attempts.glob("*.json"))
    assert len(attempts) == before + 1
    assert json.loads(attempts[-1].read_text())["status"] == "failed"


def test_first_stages_on_s3(s3_store_uri, tiny_config):
    """models -> prompts -> one OPD round with the store on a real S3 endpoint."""
    from opdflow.infra.artifacts.manifest import Run
    from opdflow.infra.artifacts.store import open_store
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

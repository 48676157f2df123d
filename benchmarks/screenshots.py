"""Screenshots of what a reviewer sees after a run: docs/screenshots/*.png, made again on demand.

Why: issue 18 asks that a night's run can be reviewed from the Prefect and MLflow UIs; these
pictures show what those pages look like for a real run, and remaking them after a change to
an artifact is how one checks that the page still reads well (a person looks at the PNGs).

What it does, all real: a `prefect server` and an `mlflow server` (from .venv-mlflow, `make
mlflow-server`) on loopback ports with their homes in a temporary directory (the server
classes of tests/conftest.py), `opdflow run` on configs/tiny.yaml cut to one ablation seed
(about 3 minutes on 2 busy cores) with PREFECT_API_URL and MLFLOW_TRACKING_URI set, then
headless Chromium (tests/ui.py) on the flow run page, the run-summary, evaluation and rock
artifacts, and the MLflow run and its main line's metric charts. Each PNG is checked to show
content (no error page or empty shell) and shrunk to a palette PNG when over `--max-kb`.

    .venv/bin/python benchmarks/screenshots.py [--out docs/screenshots] [--keep]

Needs chromium (`make chromium`) and .venv-mlflow. `--keep` leaves the temporary directory
(store, server homes) and prints its path.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RUN_ID = "tiny-screens"  # its own config name: artifact keys `tiny-screens-...`
MLFLOW_HOST = "mlflow.opdflow.test"  # Chromium's name for the MLflow server (see main)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config(tmp: Path) -> Path:
    """configs/tiny.yaml with one ablation seed: every artifact kind, in fewer stages."""
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["ablation"]["seeds"] = [1]
    path = tmp / "tiny-screens.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def shrink(png: Path, max_kb: int) -> None:
    """Rewrite `png` as a 256-colour palette PNG if it is larger than `max_kb` (UI pages have few colours)."""
    if png.stat().st_size <= max_kb * 1024:
        return
    from PIL import Image
    img = Image.open(png).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    png.write_bytes(buf.getvalue())


def artifacts(api_url: str) -> dict:
    """The latest artifact per key, and the flow run (by name) of the run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings
    keys = [f"{RUN_ID}-{k}" for k in ("run-summary", "evaluation", "rock")]
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            arts = {}
            found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)), limit=200)
            for a in sorted(found, key=lambda a: a.created):
                arts[a.key] = a  # the latest of each key
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[RUN_ID])))
    # the latest flow run (with --dir, a rerun that found every stage committed shows them skipped)
    return {"artifacts": arts, "flow_run": max(runs, key=lambda r: r.created)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("--dir", default=None, help="use (and keep) this directory: run again there, only the "
                   "run-summary is made again (committed stages are skipped)")
    p.add_argument("--no-run", action="store_true", help="with --dir: photograph the run already there (the "
                   "servers restart on their databases in --dir), without running anything")
    p.add_argument("--max-kb", type=int, default=300)
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1000)
    a = p.parse_args(argv)
    if a.no_run and not a.dir:
        p.error("--no-run needs --dir")
    ui = _load("opdflow_tests_ui", ROOT / "tests" / "ui.py")
    if ui.chromium_path() is None:
        print("no chromium: make chromium (.ci/install-chromium)", file=sys.stderr)
        return 2
    harness = _load("opdflow_tests_conftest", ROOT / "tests" / "conftest.py")
    if not os.path.exists(harness.MLFLOW_BIN):
        print("no .venv-mlflow: make mlflow-server", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="opdflow-screens-"))
    tmp.mkdir(parents=True, exist_ok=True)
    a.keep = a.keep or a.dir is not None
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", OPDFLOW_CACHE=str(tmp / "cache"),
                      PREFECT_HOME=str(tmp / "prefect-client"))
    servers = []
    try:
        (tmp / "mlflow").mkdir(exist_ok=True)
        prefect = harness.PrefectServer(str(tmp / "prefect-server"))
        servers.append(prefect)
        # the MLflow UI opens its assistant panel over a quarter of the page on the first visit
        # to a loopback host (127.0.0.1, localhost): Chromium reaches the server under another name
        # (its Host header and, for the UI's POST requests, its Origin allowed)
        os.environ["MLFLOW_SERVER_ALLOWED_HOSTS"] = f"127.0.0.1:*,localhost:*,{MLFLOW_HOST}:*"
        os.environ["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"] = f"http://{MLFLOW_HOST}:*"
        mlflow = harness.MlflowServer(str(tmp / "mlflow"))
        servers.append(mlflow)
        env = {**os.environ, "PREFECT_API_URL": prefect.url, "MLFLOW_TRACKING_URI": mlflow.url}
        if not a.no_run:
            t0 = time.time()
            cmd = [sys.executable, "-m", "opdflow.flows.cli", "run", str(config(tmp)), "--store", str(tmp / "store"),
                   "--run-id", RUN_ID]
            proc = subprocess.run(cmd, env=env, cwd=ROOT, text=True, capture_output=True, timeout=1200)
            print(proc.stdout[-1500:])
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                return 1
            print(f"run: {time.time() - t0:.0f} s")
        found = artifacts(prefect.url)
        arts, fr = found["artifacts"], found["flow_run"]
        base = prefect.url[: -len("/api")]
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=mlflow.url)
        exp = client.get_experiment_by_name("opdflow")
        parent = client.search_runs([exp.experiment_id], filter_string=f"tags.`opdflow.run_id` = '{RUN_ID}'")[0]
        main_line = client.search_runs([exp.experiment_id],
                                       filter_string=f"tags.`opdflow.run_id` = '{RUN_ID}/main'")[0]
        from opdflow.infra.tracking import run_page_url
        mf = mlflow.url.replace("127.0.0.1", MLFLOW_HOST)
        # (file, URL, texts the page must show, height)
        shots = [
            ("prefect-flow-run.png", ui.flow_run_url(base, fr.id),
             [f"Beginning flow run '{RUN_ID}'", "committed in"], a.height),
            ("prefect-flow-run-artifacts.png", ui.flow_run_artifacts_url(base, fr.id), ["run-summary"], a.height),
            ("prefect-run-summary.png", ui.artifact_page_url(base, arts[f"{RUN_ID}-run-summary"].id),
             ["Wall time", "Completed", "Curves"], a.height + 400),
            ("prefect-evaluation.png", ui.artifact_page_url(base, arts[f"{RUN_ID}-evaluation"].id), ["final_student"],
             a.height),
            ("prefect-rock.png", ui.artifact_page_url(base, arts[f"{RUN_ID}-rock"].id), ["Funnel", "Stagnation"],
             a.height + 1600),
            ("mlflow-run.png", run_page_url(mf, exp.experiment_id, parent.info.run_id), [RUN_ID], a.height + 400),
            ("mlflow-main-metrics.png", run_page_url(mf, exp.experiment_id, main_line.info.run_id, "model-metrics"),
             ["train.loss"], a.height),
        ]
        failed = 0
        for name, url, texts, height in shots:
            png = out / name
            for wait_ms in (12000, 30000, 60000):  # a busy machine: the charts load late
                dom = ui.capture(url, png, width=a.width, height=height, wait_ms=wait_ms,
                                 chromium_args=(f"--host-resolver-rules=MAP {MLFLOW_HOST} 127.0.0.1",))
                problems = ui.page_problems(dom) + [f"no {t!r}" for t in texts if t not in dom]
                if not problems:
                    break
            failed += bool(problems)
            shrink(png, a.max_kb)
            print(f"{name}: {png.stat().st_size // 1024} KB  {url}" + (f"  PROBLEMS: {problems}" if problems else ""))
        return 1 if failed else 0
    finally:
        for s in reversed(servers):
            s.stop()
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

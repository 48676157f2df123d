"""Curves for people who compare runs: TensorBoard event files in the store, MLflow when set.

Why: users of TRL, verl and NeMo-RL read a distillation run as curves (loss, divergence,
gradient norm per step; evaluation per round) and compare runs side by side in TensorBoard or
MLflow. opdflow's stages already record those numbers in their manifest entries; this module
turns them into both formats, from one place:

* `train_scalars(steps)`: the per-step log a train stage records (`tasks/train_worker.py`,
  `metrics["step_log"]`) as `(tag, step, value)` triples, `train/<name>` at the global step.
* `run_curves(run)`: every committed train stage's steps and every evaluation's score, per
  run line (`main`, `ablate-rock.s1`, ...), with evaluation at the round of its checkpoint
  (`eval/<task>/<metric>`; the initial student is round 0).
* `write_events(logdir, scalars)`: TensorBoard event files (written by the stage into its
  work dir and committed as its outputs: each `train.rNN` commits `tensorboard/`, `report`
  commits `tensorboard/<line>/` for the whole run). `read_events` reads them back.
* `log_mlflow(run)`: with `MLFLOW_TRACKING_URI` set (an `mlflow server`), one MLflow run per
  opdflow run (tag `opdflow.run_id`; an earlier MLflow run of the same opdflow run is
  replaced, so a resumed or retried run leaves one), the resolved config as params, final
  scores as metrics, and one nested run per line with its curves. Unset: nothing is sent.
* `curves_png(curves)`: the same curves as one PNG for the run-summary artifact.

How to look: `tensorboard --logdir <store>/runs/<run_id>/stages/report` (a local store), or
open the MLflow UI at the tracking URI.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable

TRAIN_SCALARS = ("loss", "divergence", "grad_norm", "lr", "tokens_per_s", "mismatch_k3", "mismatch_abs",
                 "bypassed_fraction")
MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"
# MLflow 3's UI shows an experiment without this tag as a GenAI one ("Evaluation runs", traces);
# opdflow's runs are model training: runs table, metric charts
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND: "custom_model_development"}


def train_scalars(steps: list[dict]) -> list[tuple[str, int, float]]:
    """A train stage's per-step log as (tag, global step, value); absent/None values skipped."""
    out = []
    for s in steps:
        for name in TRAIN_SCALARS:
            v = s.get(name)
            if v is not None:
                out.append((f"train/{name}", int(s["global_step"]), float(v)))
    return out


def _line_of(stage_or_label: str) -> str:
    """The run line of a stage (`ablate-rock.s1.train.r02` -> `ablate-rock.s1`) or of an eval
    label (`rock_bypass.s1.r01` -> `ablate-rock.s1`); `main` for the main run's."""
    from opdflow.tasks.plan import parse
    name = parse(stage_or_label)
    return "main" if name.arm == "main" else f"{name.arm}.s{name.seed}"


def _eval_round(run, label: str) -> int | None:
    """The training round of an eval label's checkpoint (None: not on a student line)."""
    from opdflow.tasks.plan import parse
    if label == "initial_student":
        return 0
    if label == "final_student":
        return run.config.train.rounds
    if label == "teacher":
        return None
    name = parse(f"eval.{label}")
    return name.round


def run_curves(run) -> dict[str, list[tuple[str, int, float]]]:
    """Per run line: every committed train step's scalars and every evaluation's scores."""
    from opdflow.tasks.plan import eval_labels, parse, plan
    lines: dict[str, list[tuple[str, int, float]]] = {}
    for name in plan(run.config):
        if ".shard-" in name or parse(name).kind != "train":
            continue
        e = run.entry(name)
        if e is not None:
            lines.setdefault(_line_of(name), []).extend(train_scalars(e["metrics"].get("step_log", [])))
    for label in eval_labels(run.config):
        e = run.entry(f"eval.{label}")
        r = _eval_round(run, label)
        if e is None:
            continue
        line = "main" if label in ("teacher", "initial_student", "final_student") else _line_of(f"eval.{label}")
        for task, metrics in e["metrics"]["results"].items():
            for metric, value in metrics.items():
                if value is None:
                    continue
                if r is None:  # the teacher: a reference line, drawn at every round of the main run
                    for rr in (0, run.config.train.rounds):
                        lines.setdefault("teacher", []).append((f"eval/{task}/{metric}", rr, float(value)))
                else:
                    lines.setdefault(line, []).append((f"eval/{task}/{metric}", r, float(value)))
    # every line starts where the run did: the initial student at round 0
    init = [s for s in lines.get("main", []) if s[0].startswith("eval/") and s[1] == 0]
    for line, scalars in lines.items():
        if line not in ("main", "teacher"):
            scalars.extend(init)
    return lines


def write_events(logdir: Path, scalars: Iterable[tuple[str, int, float]]) -> Path:
    """TensorBoard event files with `scalars` under `logdir` (created); returns `logdir`."""
    from torch.utils.tensorboard import SummaryWriter
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    w = SummaryWriter(log_dir=str(logdir))
    try:
        for tag, step, value in scalars:
            w.add_scalar(tag, value, global_step=step)
    finally:
        w.close()
    return logdir


def read_events(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the event files under `logdir`: {tag: [(step, value), ...]} (tests, tools)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(ev.step, ev.value) for ev in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}


def write_run_events(run, dest: Path) -> list[str]:
    """`dest/<line>/` event files for every run line of `run_curves`; returns the lines."""
    curves = run_curves(run)
    for line, scalars in curves.items():
        write_events(Path(dest) / line, scalars)
    return sorted(curves)


# -- MLflow ----------------------------------------------------------------------------------

def mlflow_uri() -> str | None:
    return os.environ.get(MLFLOW_URI_ENV) or None


def mlflow_problem(uri: str | None = None, timeout: float = 5.0) -> str | None:
    """Why the tracking server at `uri` cannot be used (None: it answers, or none is set).
    Preflight calls it, so an unreachable server fails the run before any work, not at its end."""
    uri = uri or mlflow_uri()
    if not uri or not uri.startswith(("http://", "https://")):
        return None
    import urllib.request
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(uri.rstrip("/") + "/health", timeout=timeout):
            return None
    except OSError as e:
        return f"no MLflow tracking server answers at {uri} ({e}); start one or unset {MLFLOW_URI_ENV}"


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = str(v)[:500]  # MLflow's param value limit
    return out


def final_scores(run) -> dict[str, float]:
    """`<label>.<task>.<metric>` for every committed evaluation: the MLflow run's metrics."""
    from opdflow.tasks.plan import eval_labels
    out = {}
    for label in eval_labels(run.config):
        e = run.entry(f"eval.{label}")
        if e is None:
            continue
        for task, metrics in e["metrics"]["results"].items():
            for metric, value in metrics.items():
                if value is not None:
                    out[f"{label}.{task}.{metric}".replace("/", "_")] = float(value)
    return out


def log_mlflow(run, experiment: str = "opdflow", uri: str | None = None) -> dict | None:
    """One MLflow run for `run` (replacing an earlier one of the same opdflow run), with the
    config as params, final scores as metrics and one nested run per line with its curves.
    Returns {"experiment_id", "run_id", "url"}, or None when no tracking URI is set."""
    uri = uri or mlflow_uri()
    if not uri:
        return None
    import json
    import time

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a server gone mid-run: fail in seconds
    # not two "View run ... at" lines per run line on the console: the run-summary links the run
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, tags=EXPERIMENT_TAGS)
    if exp is not None and exp.tags.get(EXPERIMENT_KIND) is None:
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND, EXPERIMENT_TAGS[EXPERIMENT_KIND])
    for old in client.search_runs([exp_id], filter_string=f"tags.`opdflow.run_id` = '{run.run_id}'"):
        for child in client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{old.info.run_id}'"):
            client.delete_run(child.info.run_id)
        client.delete_run(old.info.run_id)
    now = int(time.time() * 1000)
    config = json.loads(run.config.identity().to_json())
    tags = {"opdflow.run_id": run.run_id, "mlflow.runName": run.run_id, "opdflow.store": run.store.uri,
            "teacher": run.config.teacher.path, "student": run.config.student.path}
    parent = client.create_run(exp_id, run_name=run.run_id, tags=tags)
    pid = parent.info.run_id
    params = [Param(k, v) for k, v in sorted(_flat(config).items())]
    for i in range(0, len(params), 100):  # MLflow's batch limit for params
        client.log_batch(pid, params=params[i:i + 100])
    client.log_batch(pid, metrics=[Metric(k, v, now, 0) for k, v in sorted(final_scores(run).items())])
    for line, scalars in sorted(run_curves(run).items()):
        child = client.create_run(exp_id, run_name=f"{run.run_id}/{line}",
                                  tags={"mlflow.parentRunId": pid, "opdflow.run_id": f"{run.run_id}/{line}",
                                        "opdflow.line": line})
        metrics = [Metric(tag.replace("/", "."), v, now, step) for tag, step, v in scalars]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit for metrics
            client.log_batch(child.info.run_id, metrics=metrics[i:i + 1000])
        client.set_terminated(child.info.run_id)
    client.set_terminated(pid)
    base = uri.rstrip("/")
    url = run_page_url(base, exp_id, pid) if base.startswith("http") else None
    return {"experiment_id": exp_id, "run_id": pid, "url": url}


def run_page_url(base: str, experiment_id: str, run_id: str, tab: str = "") -> str:
    """The MLflow UI's page of a run (`tab`: "" the overview, "model-metrics" its charts), in
    the UI's model-training view (its default view is GenAI's, whatever the experiment).

    >>> run_page_url("http://127.0.0.1:5000/", "1", "ab12", "model-metrics")
    'http://127.0.0.1:5000/#/experiments/1/runs/ab12/model-metrics?workflowType=machine_learning'
    """
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" + (f"/{tab}" if tab else "")
            + "?workflowType=machine_learning")


# -- the same curves as a picture -------------------------------------------------------------

def curves_png(curves: dict[str, list[tuple[str, int, float]]],
               tags: tuple[str, ...] = ("train/loss", "train/grad_norm", "train/mismatch_k3")) -> bytes | None:
    """Training loss, gradient norm and sampler/trainer mismatch per step, and every
    evaluation metric per round, one panel each, a line per run line; None if nothing to draw.

    Two panels a row, 900 px wide: the Prefect UI shows an artifact's image at its column's
    width (about 860 px), so the labels stay at the size they were drawn."""
    evals = sorted({t for sc in curves.values() for t, _, _ in sc if t.startswith("eval/")})
    panels = [t for t in tags if any(tt == t for sc in curves.values() for tt, _, _ in sc)] + evals[:2]
    if not panels:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, panels):
        for line, scalars in sorted(curves.items()):
            pts = sorted((s, v) for t, s, v in scalars if t == tag)
            if pts:
                style = ({"linestyle": "--", "color": "grey"} if line == "teacher"
                         else {"marker": "o" if tag.startswith("eval/") or len(pts) <= 12 else None, "markersize": 3})
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=line, **style)
        ax.set_title(tag, fontsize=11)
        ax.set_xlabel("round" if tag.startswith("eval/") else "step", fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and rounds are whole numbers
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


__all__ = ["train_scalars", "run_curves", "write_events", "read_events", "write_run_events", "log_mlflow",
           "mlflow_uri", "final_scores", "curves_png", "run_page_url", "TRAIN_SCALARS"]

"""The run-summary: what a reviewer reads first, on every run page, also after a failure.

Why: a night's run is reviewed in the morning from the Prefect UI. The summary leads with
the headline (initial -> final student vs the teacher, the ablation verdict in one sentence,
or the failed stage with its reason and the command that reruns it; the wall time, total and
slowest stages), then the curves (training loss, gradient norm and sampler/trainer mismatch
per step, evaluation per round: `infra/tracking.py`), then links to every other artifact of
the run, to its MLflow run and to its TensorBoard event files, and last the wall time of
every stage, slowest first, with the total (a run has tens of stages: the table comes after
what a reader looks for first).

The flow publishes it from its own context (not from a task) when it ends, completed or
not: the Prefect UI's V1 flow-run page lists flow-level artifacts above the task runs'
ones, so it comes first there; the V2 page sorts a run's artifacts by id (random UUIDs), so
there the summary's links are the way to everything else.
"""
from __future__ import annotations

import base64

from opdflow.infra.artifacts.manifest import Run
from opdflow.tasks.common import artifact_key, config_name


def _score(run: Run, label: str) -> tuple[str, str, float, int | None] | None:
    """(task, metric, value, n) of a label's first evaluation score."""
    e = run.entry(f"eval.{label}")
    if e is None:
        return None
    for task, metrics in e["metrics"]["results"].items():
        for metric, value in metrics.items():
            return task, metric, float(value), e["metrics"].get("n_samples", {}).get(task)
    return None


def _first_sentence(text: str) -> str:
    text = " ".join(str(text).split())
    cut = text.find(". ")
    return text if cut < 0 else text[:cut + 1]


def headline(run: Run, rows: list[dict]) -> list[str]:
    """The lines above everything else: outcome, scores, verdict."""
    out = []
    failed = [r for r in rows if r["status"] == "failed" or r.get("rerun_failed")]
    if failed:
        f = failed[0]
        out.append(f"**FAILED at `{f['stage']}`**: {f.get('error') or 'see the task run logs'}")
        out.append(f"Fix the cause, then rerun that stage alone: `opdflow stage {f['stage']} --run-id {run.run_id} "
                   f"--store {run.store.uri}` (or retry this flow run: committed stages are skipped).")
    elif any(r["status"] != "committed" for r in rows):
        pending = [r["stage"] for r in rows if r["status"] != "committed"]
        out.append(f"**Incomplete**: {len(pending)} stage(s) not committed, first `{pending[0]}`.")
    else:
        out.append("**Completed**: every stage committed.")
    init, final, teacher = (_score(run, k) for k in ("initial_student", "final_student", "teacher"))
    if init and final:
        task, metric, _, n = final
        line = f"Student {metric} on `{task}`: **{init[2]:.3f} → {final[2]:.3f}**"
        if teacher:
            gap = teacher[2] - init[2]
            closed = (f", {100 * (final[2] - init[2]) / gap:.0f}% of the gap closed" if gap > 1e-9 else
                      "; the teacher does not score above the initial student, so there is no gap to close")
            line += f" (teacher {teacher[2]:.3f}{closed})"
        out.append(line + (f", n = {n}." if n else "."))
    rep = run.entry("report")
    v = rep["metrics"].get("verdict") if rep else None
    if v:
        outcome = rep["metrics"].get("outcome")
        sentence = _first_sentence(v)
        named = outcome and f"{outcome}:" in sentence  # "rocks bypassed vs uniform: inconclusive: ..."
        out.append(f"Ablation verdict{f' ({outcome})' if outcome and not named else ''}: {sentence}")
    return out


def wall_line(rows: list[dict], flow_seconds: float | None = None, n: int = 3) -> str:
    """The wall time in one line: the flow run's (else the committed stages' sum) and the slowest stages.

    >>> wall_line([{"stage": "models", "seconds": 49.0}, {"stage": "patch", "seconds": 40.9},
    ...            {"stage": "report", "seconds": 1.2}, {"stage": "eval.x", "seconds": None}], 213.0, n=2)
    'Wall time 3 min 33 s (this flow run; 91.1 s summed over the stages); slowest: `models` 49.0 s, `patch` 40.9 s.'
    """
    done = sorted((r for r in rows if r["seconds"] is not None), key=lambda r: -r["seconds"])
    total = sum(r["seconds"] for r in done)
    head = (f"Wall time {_seconds(flow_seconds)} (this flow run; {_seconds(total)} summed over the stages)"
            if flow_seconds is not None
            else f"Wall time of the committed stages, summed: {_seconds(total)}")
    return head + "; slowest: " + ", ".join(f"`{r['stage']}` {_seconds(r['seconds'])}" for r in done[:n]) + "."


def _seconds(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s:.1f} s" if s < 120 else f"{int(s // 60)} min {s % 60:.0f} s"


def time_table(rows: list[dict], flow_seconds: float | None = None) -> list[str]:
    """Stages by wall time, slowest first, uncommitted ones on top, and the total."""
    order = sorted(rows, key=lambda r: (r["status"] == "committed", -(r["seconds"] or 0.0)))
    total = sum(r["seconds"] or 0.0 for r in rows)
    lines = ["| stage | status | wall time | attempts |", "|---|---|---|---|"]
    lines += [f"| `{r['stage']}` | {r['status']} | {_seconds(r['seconds'])} | {r['attempt']} |" for r in order]
    lines.append(f"| **total** (committed stages) | | **{_seconds(total)}** | |")
    if flow_seconds is not None:
        lines.append(f"| this flow run, wall clock | | {_seconds(flow_seconds)} | |")
    return lines


def artifact_links(run: Run, rows: list[dict]) -> list[str]:
    """Every other artifact of the run, linked to its key's page when the UI's address is known."""
    try:
        from prefect.settings import PREFECT_UI_URL
        ui = PREFECT_UI_URL.value()
    except Exception:  # noqa: BLE001 - links are a convenience
        ui = None
    ns = config_name(run.run_id)
    results = ["evaluation", "ablation-verdict", "report", "rock", "rock-tokens", "patch"]
    stages = [r["stage"] for r in rows if r["status"] == "committed" and r["stage"] not in results]

    def link(k: str) -> str:
        key = artifact_key(ns, k)
        return f"[`{key}`]({ui.rstrip('/')}/artifacts/key/{key})" if ui else f"`{key}`"
    return ["Results: " + ", ".join(link(k) for k in results), "Each stage's report: " + ", ".join(map(link, stages))]


def summary_markdown(run: Run, rows: list[dict] | None = None, flow_seconds: float | None = None,
                     mlflow: dict | None = None) -> str:
    from opdflow.infra import tracking
    from opdflow.tasks.report import stage_table
    rows = rows if rows is not None else stage_table(run)
    lines = [f"# Run `{run.run_id}`", "", *[f"{x}  " for x in headline(run, rows)], wall_line(rows, flow_seconds), ""]
    png = tracking.curves_png(tracking.run_curves(run))
    if png:
        lines += ["## Curves", "", f"![curves](data:image/png;base64,{base64.b64encode(png).decode()})", ""]
    rep = run.entry("report")
    where = [f"Store: `{run.store.uri}` (this run: `{run.prefix}/`)."]
    if rep and any(k.startswith("tensorboard/") for k in rep["outputs"]):
        where.append(f"TensorBoard: `tensorboard --logdir {run.store.describe(f'{run.prefix}/stages/report')}` "
                     "(every train stage also commits its own `tensorboard/`).")
    if mlflow:
        link = f", [open it in MLflow]({mlflow['url']})" if mlflow.get("url") else ""
        where.append(f"MLflow: run `{mlflow['run_id']}`{link} (curves: its child runs, one per run line).")
    lines += ["## Everything else", "", *[f"{w}  " for w in where], "", *[f"{x}  " for x in artifact_links(run, rows)],
              ""]
    lines += ["## Wall time per stage", "", *time_table(rows, flow_seconds)]
    return "\n".join(lines)


__all__ = ["summary_markdown", "headline", "time_table", "wall_line"]

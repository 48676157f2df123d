"""Stage `report`: the evaluation table, the ablation verdict and the run summary.

Reads every committed `eval.*` entry, the rock stage's summary and the train stages'
metrics; writes summary.json and report.md, and publishes two Prefect artifacts under
stable keys: `evaluation` (table) and `ablation-verdict` (markdown); it also commits the run's
curves as TensorBoard event files (`tensorboard/<line>/`, infra/tracking.py). The run-summary
(tasks/summary.py) is published by the flow when it ends.

The verdict (tasks/verdict.py, statistics in tasks/stats.py) compares the ablation arms
on the first evaluation task's first metric, per item, over the training seeds: rocks
bypassed vs uniform, random bypassed vs uniform, rocks vs random; each a mean difference
with a 95% hierarchical-bootstrap interval, a paired sign-flip test and an equivalence
test against `ablation.margin`, and one of harm / benefit / equivalent / inconclusive.
The evaluation table lists the main models and each arm x seed's last round; every
round's scores are in the verdict's learning curves.
"""
from __future__ import annotations

import json

from opdflow.infra.artifacts.manifest import Run, StageContext, run_stage
from opdflow.tasks.common import publish_markdown, publish_table, stage_seconds
from opdflow.tasks.plan import eval_labels, instances, patching_enabled, plan
from opdflow.tasks.stage import Stage, single


def eval_table(run: Run) -> list[dict]:
    c = run.config
    last = f".r{c.ablation.rounds:02d}"
    rows = []
    for label in [lab for lab in eval_labels(c) if "." not in lab or lab.endswith(last)]:
        e = run.entry(f"eval.{label}")
        if e is None:
            continue
        for task, metrics in e["metrics"]["results"].items():
            for metric, value in metrics.items():
                n = e["metrics"]["n_samples"].get(task)
                lo_hi = wilson(float(value), n) if _per_document_0_1(metric) else None
                rows.append({"model": label, "task": task, "metric": metric, "value": round(float(value), 4),
                             "n": n, "ci95": f"{lo_hi[0]:.3f}–{lo_hi[1]:.3f}" if lo_hi else ""})
    return rows


def _per_document_0_1(metric: str) -> bool:
    """Metrics that are a mean of per-document 0/1 scores (a binomial proportion)."""
    return metric.split("/")[0] in ("exact_match", "acc", "acc_norm")


def wilson(p: float, n: int | None, z: float = 1.96) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a proportion p over n documents."""
    if not n:
        return None
    d = 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / d
    return max(0.0, mid - half), min(1.0, mid + half)


def label_legend(labels: list[str]) -> str:
    """What each model label in the evaluation table is."""
    known = {"teacher": "the teacher", "initial_student": "the student before distillation",
             "final_student": "the student after every OPD round of the main run"}
    arms = {"uniform": "every token trained (the ablation's baseline)", "rock_bypass": "rock tokens' loss weight zero",
            "random_bypass": "frequency-matched random tokens' loss weight zero"}
    out = []
    for lab in dict.fromkeys(labels):
        if lab in known:
            out.append(f"`{lab}`: {known[lab]}")
        else:
            parts = lab.split(".")
            if parts[0] in arms and len(parts) == 3:
                out.append(f"`{lab}`: ablation seed {parts[1][1:]}, {arms[parts[0]]}, after {int(parts[2][1:])} rounds "
                           "from the initial student")
    return "; ".join(out)


def verdict(run: Run, table: list[dict]) -> dict | None:
    """The ablation verdict (tasks/verdict.py) on the first evaluation task's first metric."""
    if not run.config.ablation.enabled or not table:
        return None
    from opdflow.tasks.verdict import ablation_verdict
    return ablation_verdict(run, table[0]["task"], table[0]["metric"])


def stage_table(run: Run) -> list[dict]:
    rows = []
    for name in plan(run.config):
        e = run.entry(name)
        if e is not None:
            rows.append({"stage": name, "status": "committed", "seconds": stage_seconds(e), "attempt": e["attempt"],
                         "outputs": len(e["outputs"]), "location": run.store.describe(f"{run.prefix}/stages/{name}"),
                         **failed_rerun(run, name, e)})
        else:
            att = run.attempts(name)
            failed = failed_shards(run, name)
            status = "failed" if failed else (att[-1]["status"] if att else "pending")
            last = next(iter(failed.values())) if failed else (att[-1] if att else {})
            rows.append({"stage": name, "status": status,
                         "seconds": None, "attempt": len(att), "outputs": 0, "location": "",
                         **({"failed_shards": list(failed)} if failed else {}),
                         **({"error": last.get("error")} if status == "failed" and last.get("error") else {})})
    return rows


def _latest_attempt(run: Run, stage: str) -> dict | None:
    keys = sorted(run.store.list(f"{run.prefix}/attempts/{stage}/"))
    return run.store.get_json(keys[-1]) if keys else None


def failed_rerun(run: Run, stage: str, entry: dict) -> dict:
    """For a committed stage: `{"rerun_failed": True, "error": ...}` when a later attempt (a
    forced `opdflow stage`, or one of its shards) failed; the committed outputs stay valid, and
    this is what failed last. `{}` otherwise."""
    last = _latest_attempt(run, stage)
    if last is not None and last.get("attempt", 0) > entry["attempt"] and last.get("status") == "failed":
        return {"rerun_failed": True, "error": last.get("error")}
    shards = failed_shards(run, stage)
    if shards:
        return {"rerun_failed": True, "failed_shards": list(shards), "error": next(iter(shards.values())).get("error")}
    return {}


def failed_shards(run: Run, stage: str) -> dict[str, dict]:
    """The shards of `stage` whose latest attempt failed, in shard order: shard -> that attempt."""
    latest: dict[str, str] = {}
    for key in sorted(run.store.list(f"{run.prefix}/attempts/{stage}.shard-")):
        latest[key.split("/")[-2]] = key
    attempts = {shard: json.loads(run.store.get_bytes(key)) for shard, key in sorted(latest.items())}
    return {shard: a for shard, a in attempts.items() if a["status"] == "failed"}


def run(run: Run, stage: str = "report", force: bool = False, progress=None) -> tuple[dict, bool]:
    c = run.config
    inputs = {}
    for label in eval_labels(c):
        inputs[f"eval.{label}"] = run.output(f"eval.{label}", "results.json")
        if "." in label:  # an arm's eval: its per-item scores are the verdict's data
            inputs.update({f"eval.{label}/{k}": ref for k, ref in run.outputs_under(f"eval.{label}", "samples").items()})
    if c.ablation.enabled:
        inputs["rock"] = run.output("rock", "summary.json")
    if patching_enabled(c):
        inputs["patch"] = run.output("patch", "patching.json")
    if c.sensitivity.enabled:  # the backend-sensitivity section (tasks/sensitivity.py)
        inputs["sensitivity"] = run.output("sensitivity", "sensitivity.md")
    params = {"ablation": c.section("ablation")}

    def body(ctx: StageContext) -> None:
        table = eval_table(run)
        v = verdict(run, table)
        rock = json.loads(run.read_output("rock", "summary.json")) if run.entry("rock") else None
        patching = json.loads(run.read(inputs["patch"])) if "patch" in inputs else None
        summary = {"run_id": run.run_id, "evaluation": table, "verdict": v, "patching": patching,
                   "rock": {k: rock[k] for k in ("rock", "control", "random_matched")} if rock else None,
                   "train": {n: run.entry(n)["metrics"].get("loss_mean") for n in plan(c)
                             if n.split(".")[-2:-1] == ["train"] and run.entry(n)}}
        ctx.put_json("summary.json", summary)
        from opdflow.tasks.verdict import markdown as verdict_markdown, plots as verdict_plots
        pngs = verdict_plots(v) if v else {}
        for name, png in pngs.items():
            ctx.put_bytes(f"verdict_{name}.png", png)
        ctx.put_bytes("verdict.md", verdict_markdown(v, pngs).encode())
        sensitivity = run.read(inputs["sensitivity"]).decode() if "sensitivity" in inputs else None
        ctx.put_bytes("report.md", render(run, table, v, patching, sensitivity).encode())
        import tempfile
        from pathlib import Path
        from opdflow.infra.tracking import write_run_events
        with tempfile.TemporaryDirectory() as tmp:  # the whole run's curves, one TensorBoard run per line
            write_run_events(run, Path(tmp))
            ctx.put_dir("tensorboard", Path(tmp))
        ctx.metrics.update(verdict=v["text"] if v else None, outcome=v["outcome"] if v else None)
    return run_stage(run, stage, params=params, inputs=inputs, body=body, force=force, progress=progress)


def render(run: Run, table: list[dict], v: dict | None, patching: dict | None = None,
           sensitivity: str | None = None) -> str:
    lines = [f"# Evaluation — run `{run.run_id}`", "", "| model | task | metric | value | 95% CI | n |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['task']} | {r['metric']} | {r['value']:.4f} | {r.get('ci95', '')} | {r['n']} |"
              for r in table]
    lines += ["", "95% CI: Wilson score interval over the n documents (for per-document 0/1 metrics). "
              + label_legend([r["model"] for r in table]) + "."]
    lines += ["", "## Ablation verdict", "",
              (f"**{v['outcome']}** (rocks bypassed vs uniform). " + v["text"]) if v else "ablation disabled",
              "", "Forest plot, learning curves and compute: the `ablation-verdict` artifact (verdict.md)."]
    from opdflow.tasks.models import testbed_markdown
    testbed = testbed_markdown(run)  # the planted testbed: calibration, rock set vs the planted truth
    if testbed:
        lines += ["", testbed]
    from opdflow.tasks.patch import markdown as patch_markdown
    lines += ["", "## Inference-time patching", "",
              patch_markdown(patching) if patching else "not run (needs demo data or ablation.patch_answer_regex)"]
    if sensitivity:  # already headed "## Backend sensitivity"
        lines += ["", sensitivity]
    return "\n".join(lines)


def summary_markdown(run: Run, **kwargs) -> str:
    """The run-summary artifact (tasks/summary.py); the flow publishes it when it ends."""
    from opdflow.tasks.summary import summary_markdown as render_summary
    return render_summary(run, **kwargs)


def report(run: Run, entry: dict) -> str:
    summary = json.loads(run.read_output("report", "summary.json"))
    publish_table("evaluation", summary["evaluation"], f"lm-eval results of run {run.run_id}")
    if summary["verdict"]:
        from opdflow.tasks.patch import markdown as patch_markdown
        patching = summary.get("patching")
        patched = f"\n\n## Inference-time patching\n\n{patch_markdown(patching)}" if patching else ""
        body = run.read_output("report", "verdict.md").decode()
        publish_markdown("ablation-verdict", f"# Ablation verdict — run `{run.run_id}`\n\n{body}{patched}",
                         f"ablation verdict of run {run.run_id}")
    return run.read_output("report", "report.md").decode()


# the report reads every stage's entry (evaluations, the rock summary, train losses, the run's curves)
STAGES = (Stage("report", run, instances=single("report"), report=report,
                needs=lambda config, stage: [n for n in instances(config) if n != "report"]),)
report_task = STAGES[0].task


def run_status(run: Run) -> dict:
    """The run as one JSON-able object: stages with status, evaluation, verdict."""
    stages = [{"name": r["stage"], "status": r["status"], "seconds": r["seconds"], "attempts": r["attempt"]}
              for r in stage_table(run)]
    evals: dict[str, dict] = {}
    for label in eval_labels(run.config):
        e = run.entry(f"eval.{label}")
        if e is not None:
            evals[label] = e["metrics"]["results"]
    rep = run.entry("report")
    return {"run_id": run.run_id, "store": run.store.uri,
            "wall_seconds": round(sum(s["seconds"] or 0 for s in stages), 1),
            "stages": stages, "eval": evals,
            "verdict": rep["metrics"].get("verdict") if rep else None}

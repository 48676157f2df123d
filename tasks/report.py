"""Stage `report`: the evaluation table, the ablation verdict and the run summary.

Reads every committed `eval.*` entry, the rock stage's summary and the train stages'
metrics; writes summary.json and report.md, and publishes three Prefect artifacts under
stable keys: `evaluation` (table), `ablation-verdict` and `run-summary` (markdown).

The verdict compares the ablation arms on the first evaluation task's first metric at
equal compute: rocks bypassed vs the uniform run (same start, prompts, seeds and
steps) vs a frequency-matched random set bypassed. With n evaluation documents a
difference is called out only when it exceeds two binomial standard errors; otherwise
the verdict says the bypass made no measurable difference, which is the paper's claim.
"""
from __future__ import annotations

import json
import math

from opdflow.infra.manifest import Run, StageContext, run_stage
from opdflow.tasks.common import publish_markdown, publish_table, stage_task
from opdflow.tasks.plan import LABEL_OF_ARM, ablation_arms, eval_labels, patching_enabled, plan, round_stage


def eval_table(run: Run) -> list[dict]:
    rows = []
    for label in eval_labels(run.config):
        e = run.entry(f"eval.{label}")
        if e is None:
            continue
        for task, metrics in e["metrics"]["results"].items():
            for metric, value in metrics.items():
                rows.append({"model": label, "task": task, "metric": metric, "value": round(float(value), 4),
                             "n": e["metrics"]["n_samples"].get(task)})
    return rows


def two_se(a: float, b: float, n: int | None) -> float:
    """Two binomial standard errors of the difference of two accuracies over n documents
    (the larger variance of the two): a difference is called out only beyond this."""
    return 2 * math.sqrt(max(a * (1 - a), b * (1 - b), 1e-12) * 2 / max(1, n or 1))


def verdict(run: Run, table: list[dict]) -> dict | None:
    c = run.config
    if not c.ablation.enabled or not table:
        return None
    task, metric = table[0]["task"], table[0]["metric"]
    score = {r["model"]: (r["value"], r["n"]) for r in table if r["task"] == task and r["metric"] == metric}
    uniform = "final_student" if c.ablation.rounds == c.train.rounds else f"uniform_r{c.ablation.rounds:02d}"
    if uniform not in score:
        return None
    base, n = score[uniform]
    out = {"task": task, "metric": metric, "uniform_label": uniform, "uniform": base, "n": n, "arms": {}}
    for arm in ablation_arms(c):
        label = LABEL_OF_ARM[arm]
        if label not in score:
            continue
        v, _ = score[label]
        bound = two_se(base, v, n)
        tr = run.entry(round_stage("train", c.ablation.rounds, arm))
        out["arms"][label] = {"value": v, "delta": round(v - base, 4), "two_se": round(bound, 4),
                              "significant": abs(v - base) > bound,
                              "bypassed_fraction_last_round": tr["metrics"]["bypassed_fraction"] if tr else None}
    rock = out["arms"].get("rock_bypass")
    if rock is None:
        out["text"] = "no rock-bypass arm was evaluated"
    elif not rock["significant"]:
        out["text"] = (f"Bypassing rock tokens ({rock['bypassed_fraction_last_round']:.1%} of trained tokens) made no "
                       f"measurable difference: {metric} {rock['value']:.3f} vs {base:.3f} uniform "
                       f"(|Δ| = {abs(rock['delta']):.3f} ≤ 2 SE = {rock['two_se']:.3f}, n = {n}).")
    else:
        out["text"] = (f"Bypassing rock tokens changed {metric} by {rock['delta']:+.3f} "
                       f"({rock['value']:.3f} vs {base:.3f} uniform; 2 SE = {rock['two_se']:.3f}, n = {n}).")
    rnd = out["arms"].get("random_bypass")
    if rnd is not None:
        out["text"] += (f" Frequency-matched random bypass: {rnd['value']:.3f} ({rnd['delta']:+.3f}"
                        f"{', significant' if rnd['significant'] else ''}).")
    return out


def stage_table(run: Run) -> list[dict]:
    rows = []
    for name in plan(run.config):
        e = run.entry(name)
        if e is not None:
            rows.append({"stage": name, "status": "committed", "seconds": e["seconds"], "attempt": e["attempt"],
                         "outputs": len(e["outputs"]), "location": run.store.describe(f"{run.prefix}/stages/{name}")})
        else:
            att = run.attempts(name)
            failed = failed_shards(run, name)
            rows.append({"stage": name, "status": "failed" if failed else (att[-1]["status"] if att else "pending"),
                         "seconds": None, "attempt": len(att), "outputs": 0, "location": "",
                         **({"failed_shards": failed} if failed else {})})
    return rows


def failed_shards(run: Run, stage: str) -> list[str]:
    """Shards of an uncommitted stage whose latest attempt failed."""
    latest: dict[str, str] = {}
    for key in sorted(run.store.list(f"{run.prefix}/attempts/{stage}.shard-")):
        latest[key.split("/")[-2]] = key
    return [shard for shard, key in sorted(latest.items())
            if json.loads(run.store.get_bytes(key))["status"] == "failed"]


def run(run: Run, stage: str = "report", force: bool = False, progress=None) -> tuple[dict, bool]:
    c = run.config
    inputs = {}
    for label in eval_labels(c):
        inputs[f"eval.{label}"] = run.output(f"eval.{label}", "results.json")
    if c.ablation.enabled:
        inputs["rock"] = run.output("rock", "summary.json")
    if patching_enabled(c):
        inputs["patch"] = run.output("patch", "patching.json")
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
        ctx.put_bytes("report.md", render(run, table, v, patching).encode())
        ctx.metrics.update(verdict=v["text"] if v else None)
    return run_stage(run, stage, params=params, inputs=inputs, body=body, force=force, progress=progress)


def render(run: Run, table: list[dict], v: dict | None, patching: dict | None = None) -> str:
    lines = [f"# Evaluation — run `{run.run_id}`", "", "| model | task | metric | value | n |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['task']} | {r['metric']} | {r['value']:.4f} | {r['n']} |" for r in table]
    lines += ["", "## Ablation verdict", "", v["text"] if v else "ablation disabled"]
    from opdflow.tasks.patch import markdown as patch_markdown
    lines += ["", "## Inference-time patching", "",
              patch_markdown(patching) if patching else "not run (needs demo data or ablation.patch_answer_regex)"]
    return "\n".join(lines)


def summary_markdown(run: Run) -> str:
    rows = stage_table(run)
    lines = [f"# Run `{run.run_id}`", "", f"Store: `{run.store.uri}`", "",
             "| stage | status | seconds | attempt | outputs | location |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds'] if r['seconds'] is not None else ''} | {r['attempt']} "
              f"| {r['outputs']} | `{r['location']}` |" for r in rows]
    return "\n".join(lines)


def report(run: Run, entry: dict) -> str:
    summary = json.loads(run.read_output("report", "summary.json"))
    publish_table("evaluation", summary["evaluation"], f"lm-eval results of run {run.run_id}")
    if summary["verdict"]:
        from opdflow.tasks.patch import markdown as patch_markdown
        patching = summary.get("patching")
        patched = f"\n\n## Inference-time patching\n\n{patch_markdown(patching)}" if patching else ""
        publish_markdown("ablation-verdict", f"# Ablation verdict — run `{run.run_id}`\n\n{summary['verdict']['text']}"
                         f"{patched}\n\n```json\n{json.dumps(summary['verdict'], indent=2)}\n```",
                         f"ablation verdict of run {run.run_id}")
    publish_markdown("run-summary", summary_markdown(run), f"stages of run {run.run_id}")
    return run.read_output("report", "report.md").decode()


report_task = stage_task("report", run, report)


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

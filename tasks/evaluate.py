"""Stage `eval.<label>`: lm-eval (lm-evaluation-harness) on one model.

Labels: teacher, initial_student, final_student, and the ablation students
(`uniform_rNN` when the ablation ran fewer rounds than the main run, `rock_bypass`,
`random_bypass`). The demo benchmark `opdflow_arith` is written at run time from the
stored eval split as a local lm-eval task (`dataset_path: json`); other lm-eval tasks
come from lm-eval itself or `eval.include_path`. The harness backend and its settings
(model args, generation kwargs, batch size, dtype, device, lm-eval version) are
recorded: scores move with the backend alone.

Outputs: results.json ({results, n_samples, backend}), samples.jsonl (per-document
responses, for review).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from opdflow.infra.manifest import Run, StageContext, run_stage
from opdflow.tasks import prompts as prompts_stage
from opdflow.tasks.common import stage_task
from opdflow.tasks.plan import checkpoint_of, parse

ARITH = "opdflow_arith"


def run(run: Run, stage: str, force: bool = False, progress=None) -> tuple[dict, bool]:
    from opdflow.evals.harness import evaluate, write_arith_task
    c = run.config
    label = parse(stage).label
    src_stage, prefix = checkpoint_of(c, label)
    dtype = c.teacher.dtype if label == "teacher" else c.student.dtype
    inputs = {"prompts": run.output("prompts", "prompts.parquet"), **run.model_inputs(src_stage, prefix, "model")}
    params = {"eval": c.section("eval"), "label": label, "dtype": dtype}

    def body(ctx: StageContext) -> None:
        model_dir = run.materialize(src_stage, prefix)
        with tempfile.TemporaryDirectory(prefix="opdflow-eval-") as tmp:
            includes = [Path(c.eval.include_path)] if c.eval.include_path else []
            if ARITH in c.eval.tasks:
                rows = [r for r in prompts_stage.load(run) if r["split"] == "eval"]
                includes.append(write_arith_task(Path(tmp), [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]))
            ctx.progress(0.05, f"lm-eval on {label}")
            res = evaluate(model_dir, list(c.eval.tasks), include_path=includes or None, limit=c.eval.limit,
                           batch_size=c.eval.batch_size, max_gen_toks=c.eval.max_gen_toks, dtype=dtype, seed=c.seed)
        ctx.put_json("results.json", {k: res[k] for k in ("results", "n_samples", "backend")})
        ctx.put_bytes("samples.jsonl", "".join(json.dumps({"task": t, **s}, default=str) + "\n"
                                                for t, ss in res.get("samples", {}).items() for s in ss).encode())
        ctx.backend.update(res["backend"])
        ctx.metrics.update(results=res["results"], n_samples=res["n_samples"])
    return run_stage(run, stage, params=params, inputs=inputs, body=body, force=force, progress=progress)


def report(run: Run, entry: dict) -> str:
    m = entry["metrics"]
    lines = [f"# {entry['stage']} — run `{run.run_id}`", "", "| task | metric | value | n |", "|---|---|---|---|"]
    for task, metrics in m["results"].items():
        for k, v in metrics.items():
            lines.append(f"| {task} | {k} | {v:.4f} | {m['n_samples'].get(task, '')} |")
    lines += ["", f"Backend: `{json.dumps(entry['backend'])}`"]
    return "\n".join(lines)


eval_task = stage_task("eval", run, report)

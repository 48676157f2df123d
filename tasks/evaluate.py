"""Stage `eval.<label>`: lm-eval (lm-evaluation-harness) on one model.

Labels: teacher, initial_student, final_student, and the ablation students
(`uniform_rNN` when the ablation ran fewer rounds than the main run, `rock_bypass`,
`random_bypass`). The demo benchmark `opdflow_arith` is written at run time from the
stored eval split as a local lm-eval task (`dataset_path: json`); other lm-eval tasks
come from lm-eval itself or `eval.include_path`. The harness backend and its settings
(model args, generation kwargs, batch size, dtype, device, lm-eval version) are
recorded: scores move with the backend alone.

Sharded like rollout (`scale.shards`): shard i evaluates a contiguous range of each
task's documents (lm-eval's `samples=` selection) and writes its per-document scores as
a Parquet part (`samples/part-NNNNN.parquet`); the stage merges them. With more than one
shard every metric must aggregate by mean (accuracy, exact match...): then the merged
score is the mean over documents, exactly what one unsharded lm-eval run reports, and its
standard error is recomputed from the per-document scores. Tasks with corpus-level
metrics (BLEU, F1 over a corpus) need `scale.shards: 1`, and the stage says so.

Outputs: results.json ({results, stderr, n_samples, backend}), samples.jsonl
(per-document responses, for review), samples/part-NNNNN.parquet.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa

from opdflow.evals.harness import (DATA_TASK, evaluate, merge_sample_scores, task_documents, write_arith_task,
                                   write_data_task)
from opdflow.infra.testbeds.builtin import builtin
from opdflow.infra.config import ConfigError
from opdflow.infra.models.lm import ChatFormat, load_tokenizer
from opdflow.infra.artifacts.manifest import Run, StageContext, file_inputs
from opdflow.tasks import prompts as prompts_stage
from opdflow.tasks.plan import checkpoint_of, eval_labels, parse
from opdflow.tasks.shards import concat_parts, run_sharded, shard_bounds
from opdflow.tasks.stage import ShardParts, Stage

ARITH = "opdflow_arith"
SAMPLE_SCHEMA = pa.schema([("task", pa.string()), ("doc_id", pa.int64()), ("record", pa.string())])


def _includes(run: Run, tmp: Path) -> list[Path]:
    c = run.config
    includes = [Path(c.eval.include_path)] if c.eval.include_path else []
    b = builtin(c.data.source)  # demo -> opdflow_arith, planted -> opdflow_planted
    if b and b.eval_task in c.eval.tasks:
        rows = [r for r in prompts_stage.load(run) if r["split"] == "eval"]
        includes.append(write_arith_task(tmp, [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows],
                                         task_name=b.eval_task, template=b.template))
    if DATA_TASK in c.eval.tasks:  # your own data's held-out split, scored with eval.answer_regex
        rows = [r for r in prompts_stage.load(run) if r["split"] == "eval"]
        includes.append(write_data_task(tmp / DATA_TASK, rows, c.eval.answer_regex))
    return includes


def shard_doc_ids(docs: dict[str, dict], i: int, n: int) -> dict[str, list[int]]:
    """Shard i's documents of each task: contiguous ranges, as even as possible."""
    out = {}
    for task, d in docs.items():
        bounds = shard_bounds(d["n_docs"], n, 1)
        if i < len(bounds) and d["n_docs"]:
            out[task] = list(range(*bounds[i]))
    return out


def _stage(run: Run, stage: str) -> ShardParts:
    c = run.config
    label = parse(stage).label
    src_stage, prefix = checkpoint_of(c, label)
    dtype = c.teacher.dtype if label == "teacher" else c.student.dtype
    inputs = {"prompts": run.output("prompts", "prompts.parquet"), **run.model_inputs(src_stage, prefix, "model")}
    if c.eval.include_path:  # the task definitions are read by path: their content is part of the identity
        inputs.update(file_inputs("eval.include_path", c.eval.include_path))
    params = {"eval": c.section("eval"), "label": label, "dtype": dtype,
              "chat": {k: c.section("data")[k] for k in ("chat_template", "system_prompt", "chat_template_kwargs")}}
    if c.data.chat_template not in ("auto", "none"):
        inputs.update(file_inputs("data.chat_template", c.data.chat_template))

    def shard_body(ctx: StageContext, i: int, n: int) -> None:
        with tempfile.TemporaryDirectory(prefix="opdflow-eval-") as tmp:
            includes = _includes(run, Path(tmp))
            docs = task_documents(list(c.eval.tasks), includes or None, c.eval.limit)
            if n > 1:
                for task, d in docs.items():
                    if not d["mean_only"]:
                        raise ConfigError("scale.shards", f"eval task {task} aggregates {d['aggregations']}: "
                                          "only mean-aggregated metrics merge across shards; set scale.shards: 1")
            ids = shard_doc_ids(docs, i, n)
            ctx.progress(0.05, f"lm-eval on {label}, shard {i + 1}/{n}")
            model_dir = run.materialize(src_stage, prefix)
            chat = ChatFormat.from_config(c.data, load_tokenizer(model_dir))  # as the prompts stage renders
            res = evaluate(model_dir, list(c.eval.tasks), include_path=includes or None,
                           batch_size=c.eval.batch_size, max_gen_toks=c.eval.max_gen_toks, dtype=dtype, seed=c.seed,
                           doc_ids=ids, chat=chat) if ids else None
        rows = [{"task": t, "doc_id": s["doc_id"], "record": json.dumps({"task": t, **s}, default=str)}
                for t, ss in (res or {}).get("samples", {}).items() for s in ss]
        ctx.put_table("part.parquet", pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA))
        ctx.put_json("results.json", {k: res[k] for k in ("results", "stderr", "n_samples", "backend")} if res else {})
        ctx.metrics.update(n_docs={t: len(v) for t, v in ids.items()}, metric_names={t: list(m) for t, m in
                                                                                    (res or {}).get("results", {}).items()})
        if res:
            ctx.backend.update(res["backend"])
    return params, inputs, shard_body


def run(run: Run, stage: str, force: bool = False, progress=None) -> tuple[dict, bool]:
    params, inputs, shard_body = _stage(run, stage)
    n = run.config.scale.shards

    def finish(ctx: StageContext, parts: dict, shards: list[dict]) -> None:
        records = [json.loads(r) for r in concat_parts(run, parts)["record"].to_pylist()]
        if n == 1:  # lm-eval's own aggregation, whatever the metric
            out = json.loads(run.read(shards[0]["outputs"]["results.json"]))
        else:
            names: dict[str, list[str]] = {}
            for sh in shards:
                for task, ms in sh["metrics"]["metric_names"].items():
                    names.setdefault(task, ms)
            results, stderr, n_samples = merge_sample_scores(records, names)
            backend = next(sh["backend"] for sh in shards if sh["backend"])
            out = {"results": results, "stderr": stderr, "n_samples": n_samples,
                   "backend": {**backend, "shards": n}}
        ctx.put_json("results.json", out)
        ctx.put_bytes("samples.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in records).encode())
        ctx.metrics.update(results=out["results"], n_samples=out["n_samples"])
    return run_sharded(run, stage, n=n, params=params, inputs=inputs, table="samples", shard_body=shard_body,
                       finish=finish, force=force, progress=progress)


def report(run: Run, entry: dict) -> str:
    m = entry["metrics"]
    lines = [f"# {entry['stage']} — run `{run.run_id}`", "", "| task | metric | value | n |", "|---|---|---|---|"]
    for task, metrics in m["results"].items():
        for k, v in metrics.items():
            lines.append(f"| {task} | {k} | {v:.4f} | {m['n_samples'].get(task, '')} |")
    lines += ["", f"Backend: `{json.dumps(entry['backend'])}`"]
    return "\n".join(lines)


STAGES = (Stage("eval", run, instances=lambda config: [f"eval.{label}" for label in eval_labels(config)],
                needs=lambda config, stage: ["prompts", checkpoint_of(config, parse(stage).label)[0]], report=report,
                shard_parts=_stage, n_shards=lambda run, stage: run.config.scale.shards),)
eval_task, eval_shard_task = STAGES[0].task, STAGES[0].shard_task

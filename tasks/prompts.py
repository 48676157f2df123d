"""Stage `prompts`: the prompt dataset, split and tokenized once, as one Parquet table.

Columns: prompt_id (stable), split (train/probe/eval), prompt, answer, prompt_ids (the prompt
rendered by `data.chat_template` with the student's tokenizer, `infra.models.lm.encode_prompt`).
Every later stage reads prompts from here, so a rerun on another machine sees exactly
the same prompts and token ids.
"""
from __future__ import annotations

import collections

import pyarrow as pa

from opdflow.infra.config import BUILTINS
from opdflow.infra.testbeds.data import load_prompts
from opdflow.infra.models.lm import ChatFormat, encode_prompt, load_tokenizer
from opdflow.infra.artifacts.manifest import Run, StageContext, file_inputs, run_stage
from opdflow.infra.artifacts.tables import parquet_to_table
from opdflow.tasks.stage import Stage, single


def run(run: Run, stage: str = "prompts", force: bool = False, progress=None) -> tuple[dict, bool]:
    c = run.config
    tok_inputs = {n: r for n, r in run.model_inputs("models", "student").items()
                  if "token" in n or n.endswith("/external")}
    params = {"data": c.section("data"), "seed": c.seed}
    if c.data.source not in BUILTINS and not c.data.source.startswith("hf:"):
        tok_inputs.update(file_inputs("data.source", c.data.source))  # read by path: its content is identity
    if c.data.chat_template not in ("auto", "none"):
        tok_inputs.update(file_inputs("data.chat_template", c.data.chat_template))  # a template file: likewise

    def body(ctx: StageContext) -> None:
        rows = load_prompts(c)
        tok = load_tokenizer(run.materialize("models", "student"))
        chat = ChatFormat.from_config(c.data, tok)  # data.chat_template; checked against the teacher's in preflight
        for r in rows:
            r["prompt_ids"] = encode_prompt(tok, r["prompt"], chat)
        ctx.put_table("prompts.parquet", pa.Table.from_pylist(rows))
        counts = collections.Counter(r["split"] for r in rows)
        ctx.metrics.update({f"n_{s}": counts.get(s, 0) for s in ("train", "probe", "eval")},
                           max_prompt_tokens=max(len(r["prompt_ids"]) for r in rows))
    return run_stage(run, stage, params=params, inputs=tok_inputs, body=body, force=force, progress=progress)


def load(run: Run) -> list[dict]:
    return parquet_to_table(run.read_output("prompts", "prompts.parquet")).to_pylist()


def report(run: Run, entry: dict) -> str:
    m = entry["metrics"]
    return (f"# prompts — run `{run.run_id}`\n\nsource `{run.config.data.source}`: "
            f"{m['n_train']} train, {m['n_probe']} probe, {m['n_eval']} eval prompts; "
            f"longest prompt {m['max_prompt_tokens']} tokens.")


STAGES = (Stage("prompts", run, instances=single("prompts"), needs=lambda config, name: ["models"], report=report),)
prompts_task = STAGES[0].task

"""Stage `rollout.rNN`: the current student samples responses on this round's prompts.

On-policy: round r samples from the checkpoint that round r-1 produced (the initial
student for r = 1). Each round takes the next `prompts_per_round` prompts of a seeded
permutation of the train split (wrapping around). An ablation seed
(`ablate-<arm>.sN.rollout.rNN`) has its own permutation and sampling seeds, shared by
that seed's arms (`plan.seed_tag`). Each sequence's sampling seed derives from (run
seed, ablation seed, round, prompt_id, sample index) only, so sharding the stage never
changes its output.

Output `rollouts/part-NNNNN.parquet`, one part per shard (`scale.shards`, see
`opdflow.tasks.shards`): prompt_id, sample_idx, seed, prompt_ids, response_ids,
logprobs (the sampler's own per-token logprob), finish_reason, response_text.
The sampler is `rollout.backend` (see `opdflow.infra.sampling.backends`); it and its settings are
recorded in each shard's manifest entry. A local model is loaded only for the backends
that sample in this process (transformers, native).
"""
from __future__ import annotations

import dataclasses

import random
import time

import pyarrow as pa

from opdflow.infra.sampling import backends
from opdflow.evals.answers import is_correct
from opdflow.infra.testbeds.builtin import answer_pattern
from opdflow.infra.config import Config
from opdflow.infra.models.lm import SampleSettings, derive_seed, load_model, load_tokenizer
from opdflow.infra.artifacts.manifest import Run, StageContext
from opdflow.tasks import prompts as prompts_stage
from opdflow.tasks.plan import parse, round_instances, seed_tag, student_before
from opdflow.tasks.shards import read_parts, run_sharded, shard_bounds
from opdflow.tasks.stage import ShardParts, Stage


def round_prompt_ids(config: Config, train_ids: list[int], r: int, tag: tuple = ()) -> list[int]:
    """Round r's prompts: the next `prompts_per_round` of a seeded permutation of the train
    split; `tag` is an ablation seed's `plan.seed_tag` (its own permutation)."""
    order = sorted(train_ids)
    random.Random(derive_seed(config.seed, *tag, "prompt-order")).shuffle(order)
    k = config.rollout.prompts_per_round
    return [order[(i + (r - 1) * k) % len(order)] for i in range(k)]


def settings(config: Config) -> SampleSettings:
    ro = config.rollout
    return SampleSettings(temperature=ro.temperature, top_p=ro.top_p, max_new_tokens=ro.max_new_tokens,
                          batch_size=ro.batch_size, top_k=ro.top_k)


def check_real_ids(out, vocab: int, backend: str) -> None:
    """Fail when a sampler returned an id at or beyond the tokenizer's size (a padded lm_head
    row: a server that samples over all rows), before the rows are stored or scored."""
    for i, s in enumerate(out):
        bad = [t for t in s.response_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"rollout backend {backend!r} sampled token id {bad[0]} in sequence {i}, beyond the "
                             f"tokenizer's {vocab} tokens (a padded lm_head row decodes as nothing): the backend "
                             "must mask rows beyond the tokenizer")


def backend_record(config: Config, model=None) -> dict:
    """Which sampler ran, where, with which settings (a server: its URL and model, no key)."""
    return backends.sampler_record(config, settings(config), model)


def generate(run: Run, model_dir, jobs: list[tuple[dict, int]], seed_tag: tuple, ctx: StageContext,
             sample: SampleSettings | None = None) -> pa.Table:
    """Sample one response per (prompt row, sample index) job; shared with the rock stage
    (which may pass its own `sample` settings: greedy probing)."""
    c = run.config
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, c.student.dtype) if backends.needs_local_model(backends.rollout_backend(c)) else None
    seeds = [derive_seed(c.seed, *seed_tag, r["prompt_id"], j) for r, j in jobs]
    # the tokenizer's size is the vocabulary: padded lm_head rows are never sampled (infra.models.lm)
    st = dataclasses.replace(sample or settings(c), vocab_size=len(tok))
    t0 = time.time()
    out = backends.sampler_for(c)(model_dir, model, tok, [r["prompt_ids"] for r, _ in jobs], seeds, st,
                                  lambda done: ctx.progress(done / len(jobs), f"{done}/{len(jobs)} sequences"))
    secs = time.time() - t0
    check_real_ids(out, len(tok), backends.rollout_backend(c))
    table = pa.table({
        "prompt_id": [r["prompt_id"] for r, _ in jobs],
        "sample_idx": [j for _, j in jobs],
        "seed": seeds,
        "prompt_ids": [r["prompt_ids"] for r, _ in jobs],
        "response_ids": [s.response_ids for s in out],
        "logprobs": [s.logprobs for s in out],
        "finish_reason": [s.finish_reason for s in out],
        "response_text": [tok.decode(s.response_ids, skip_special_tokens=True) for s in out],
        "answer": [r["answer"] for r, _ in jobs],
    })
    ctx.backend.update(backends.sampler_record(c, st, model))
    ctx.metrics.update(count_metrics(table_counts(c, table)), seconds_sampling=round(secs, 3),
                       tokens_per_s=round(sum(len(s.response_ids) for s in out) / max(secs, 1e-9), 1))
    return table


COUNTS = ("n_sequences", "n_tokens", "n_stopped", "n_correct")


def table_counts(c: Config, table: pa.Table) -> dict:
    """Sequences, tokens, sequences that stopped (and, on the demo task, correct answers)."""
    responses, reasons = table["response_ids"].to_pylist(), table["finish_reason"].to_pylist()
    counts = {"n_sequences": len(responses), "n_tokens": sum(len(r) for r in responses),
              "n_stopped": sum(r == "stop" for r in reasons)}
    pattern = answer_pattern(c.data.source)  # a built-in task (demo, planted) knows its answers
    if pattern:
        counts["n_correct"] = sum(is_correct(t, a, pattern) for t, a in zip(table["response_text"].to_pylist(),
                                                                            table["answer"].to_pylist()))
    return counts


def count_metrics(counts: dict) -> dict:
    """The counts with their rates: mean response length, stop rate, sample accuracy."""
    n = max(1, counts["n_sequences"])
    m = {**counts, "mean_response_tokens": round(counts["n_tokens"] / n, 2),
         "stop_rate": round(counts["n_stopped"] / n, 4)}
    if "n_correct" in counts:
        m["sample_accuracy"] = round(counts["n_correct"] / n, 4)
    return m


def merged_metrics(shards: list[dict]) -> dict:
    """A sharded sampling stage's metrics from its shards' counts (no table read again)."""
    keys = [k for k in COUNTS if all(k in sh["metrics"] for sh in shards)]
    return count_metrics({k: sum(sh["metrics"][k] for sh in shards) for k in keys})


def round_jobs(run: Run, r: int, tag: tuple = ()) -> list[tuple[dict, int]]:
    """This round's (prompt row, sample index) jobs, in a fixed order."""
    c = run.config
    rows = prompts_stage.load(run)
    train = {row["prompt_id"]: row for row in rows if row["split"] == "train"}
    return [(train[i], j) for i in round_prompt_ids(c, list(train), r, tag)
            for j in range(c.rollout.samples_per_prompt)]


def n_shards(config: Config) -> int:
    n_jobs = config.rollout.prompts_per_round * config.rollout.samples_per_prompt
    return len(shard_bounds(n_jobs, config.scale.shards, config.rollout.batch_size))


def _stage(run: Run, stage: str) -> ShardParts:
    """(params, inputs, shard body) of a rollout stage: shared by the stage and its shards."""
    c = run.config
    name = parse(stage)
    src_stage, src_prefix = student_before(c, name.arm, name.round, name.seed)
    student = run.model_inputs(src_stage, src_prefix, "student")  # first: a missing input names the earliest stage
    inputs = {"prompts": run.output("prompts", "prompts.parquet"), **student}
    params = {"rollout": backends.result_settings(c.section("rollout")), "seed": c.seed, "round": name.round,
              "student": c.section("student")}

    def shard_body(ctx: StageContext, i: int, n: int) -> None:
        jobs = round_jobs(run, name.round, seed_tag(name))
        lo, hi = shard_bounds(len(jobs), n, c.rollout.batch_size)[i]
        table = generate(run, run.materialize(src_stage, src_prefix), jobs[lo:hi],
                         (*seed_tag(name), "rollout", name.round), ctx)
        ctx.put_table("part.parquet", table)
    return params, inputs, shard_body


def run(run: Run, stage: str, force: bool = False, progress=None) -> tuple[dict, bool]:
    params, inputs, shard_body = _stage(run, stage)
    c = run.config

    def finish(ctx: StageContext, parts: dict, shards: list[dict]) -> None:
        ctx.metrics.update(merged_metrics(shards))
    return run_sharded(run, stage, n=n_shards(c), params=params, inputs=inputs, table="rollouts",
                       shard_body=shard_body, finish=finish, force=force, progress=progress)


def load(run: Run, stage: str) -> pa.Table:
    return read_parts(run, stage, "rollouts")


def report(run: Run, entry: dict) -> str:
    m, b = entry["metrics"], entry["backend"]
    t = load(run, entry["stage"]).slice(0, 4).to_pylist()
    lines = [f"# {entry['stage']} — run `{run.run_id}`", "",
             "| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in m.items()], "",
             f"Backend: `{b}`", "", "Sample responses:", ""]
    for row in t:  # as the model wrote it: line breaks kept, `<eos>` and markup literal in a code block
        text = row["response_text"][:400].replace("```", "`\u200b``")
        lines += [f"**prompt {row['prompt_id']} #{row['sample_idx']}** ({row['finish_reason']}"
                  f"{', cut at 400 characters' if len(row['response_text']) > 400 else ''}):", "", "```text", text, "```",
                  ""]
    return "\n".join(lines)


def needs(config: Config, stage: str) -> list[str]:
    name = parse(stage)
    return ["models", "prompts", student_before(config, name.arm, name.round, name.seed)[0]]


STAGES = (Stage("rollout", run, instances=round_instances("rollout"), needs=needs, report=report, shard_parts=_stage,
                n_shards=lambda run, stage: n_shards(run.config)),)
rollout_task, rollout_shard_task = STAGES[0].task, STAGES[0].shard_task

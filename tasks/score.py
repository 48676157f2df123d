"""Stage `score.rNN`: the teacher scores every token the student sampled.

For each response token: the teacher's log-prob of the sampled token, its top-k
(token ids, log-probs) over the vocabulary (the tokenizer's: padded lm_head rows are cut off,
see `opdflow.infra.models.lm`), and the log of the teacher's mass outside the top-k, computed from
the full logits without cancellation. The train stage distills against the top-k with that
tail as one bucket (see `opdflow.kernels.reference`); with k >= vocabulary size (the demo)
that is the exact full-vocabulary divergence.

`scoring.signal: sampled` keeps only prompt_id, sample_idx and teacher_logprobs (the other
columns are dropped before writing; training then uses the per-token reverse-KL estimate, see
`opdflow.kernels.loss.sampled_token_loss`).

`scoring.signal: hidden` (transformers backend only: a server returns no hidden states) stores
prompt_id, sample_idx, teacher_logprobs and `teacher_hidden`: per response the teacher's final
hidden states (the lm_head's input, after the final norm) as the bytes of an [n, H] tensor in
the teacher's dtype (`infra.models.scoring.hidden_bytes`; dtype and H are in the manifest's backend,
`hidden_dtype` / `hidden_size`). Training rebuilds the teacher's logits from them and its
lm_head chunk by chunk inside the loss (`kernels.fused_linear`), the exact full-vocabulary
divergence without V floats per token stored.

Output `scores/part-NNNNN.parquet`, one part per rollout part (shard i scores the
rollout's part i, so parts stay row-aligned): prompt_id, sample_idx, teacher_logprobs,
topk_ids, topk_logprobs, teacher_tail_logmass. A scorer that returns only top-k log-probs
(a server: `scoring.backend: openai`) gets its tail rebuilt from them in float64
(`kernels.reference.tail_from_topk`), and the manifest's backend says `tail: from_topk`;
that tail is inexact where the teacher is confident (float32 top-k log-probs have already
lost it), which is why the local scorer stores the exact one (`tail: exact`).

The scorer is `scoring.backend` (see `opdflow.infra.sampling.backends`): transformers runs the teacher
in this process with the chunked LM head of `opdflow.infra.models.scoring` (only `chunk_tokens`
rows of logits at a time; equal to `score_table`, the full-logits reference kept here, to
1e-5), vllm starts a `vllm serve` on the teacher for the shard (`infra.sampling.vllm_backend`), openai
asks a server that serves the teacher. The teacher is loaded only for the
former; its tokenizer is always read (the server's is checked against it).
"""
from __future__ import annotations

import time

import pyarrow as pa
import torch

from opdflow.infra.sampling import backends
from opdflow.infra.models.lm import load_model, load_tokenizer, response_logits
from opdflow.infra.artifacts.manifest import Run, RunError, StageContext
from opdflow.infra.models.scoring import score_logits
from opdflow.infra.artifacts.tables import parquet_to_table
from opdflow.tasks.plan import parse, round_instances, round_stage
from opdflow.tasks.shards import read_parts, run_sharded
from opdflow.tasks.stage import ShardParts, Stage


TAIL_COLUMN = "teacher_tail_logmass"
SAMPLED_COLUMNS = ("prompt_id", "sample_idx", "teacher_logprobs")  # scoring.signal: sampled
HIDDEN_COLUMN = "teacher_hidden"
HIDDEN_COLUMNS = (*SAMPLED_COLUMNS, HIDDEN_COLUMN)  # scoring.signal: hidden


def signal_of(scores: pa.Table) -> str:
    """The teacher signal a committed scores table holds: `topk`, `hidden` (the teacher's final
    hidden states) or `sampled` (the sampled token's log-prob only)."""
    if "topk_ids" in scores.column_names:
        return "topk"
    return "hidden" if HIDDEN_COLUMN in scores.column_names else "sampled"


def hidden_table(rollouts: pa.Table, per_seq: list) -> pa.Table:
    """Per response (teacher logprobs, hidden states [n, H]) -> the `hidden` signal's table."""
    from opdflow.infra.models.scoring import hidden_bytes
    return pa.table({"prompt_id": rollouts["prompt_id"], "sample_idx": rollouts["sample_idx"],
                     "teacher_logprobs": pa.array([lp for lp, _ in per_seq], pa.list_(pa.float64())),
                     HIDDEN_COLUMN: pa.array([hidden_bytes(h) for _, h in per_seq], pa.binary())})


def for_signal(scores: pa.Table, signal: str) -> pa.Table:
    """The columns `signal` stores: all of them for topk, `SAMPLED_COLUMNS` for sampled."""
    if signal == "topk":
        return scores
    if signal == "sampled":
        return scores.select(list(SAMPLED_COLUMNS))
    raise ValueError(f"scoring.signal: {signal!r} is neither 'topk' nor 'sampled'")


def tail_source(scores: list) -> str:
    """`exact` when the scorer gave each token's tail log-mass, `from_topk` when it is rebuilt."""
    return "exact" if all(len(s) >= 4 for s in scores) else "from_topk"


def scores_table(rollouts: pa.Table, scores: list) -> pa.Table:
    """Per-response (teacher logprobs, top-k ids, top-k logprobs[, tail log-mass]) -> the
    stage's table; a missing tail is rebuilt from the top-k (see the module docstring)."""
    from opdflow.kernels.reference import tail_from_topk

    def tail(s) -> list[float]:
        if len(s) >= 4:
            return list(s[3])
        return tail_from_topk(torch.tensor(s[2], dtype=torch.float64)).tolist() if s[2] else []
    return pa.table({"prompt_id": rollouts["prompt_id"], "sample_idx": rollouts["sample_idx"],
                     "teacher_logprobs": [s[0] for s in scores], "topk_ids": [s[1] for s in scores],
                     "topk_logprobs": [s[2] for s in scores],
                     TAIL_COLUMN: pa.array([tail(s) for s in scores], pa.list_(pa.float32()))})


@torch.no_grad()
def score_table(model, pad_id: int, rollouts: pa.Table, top_k: int, batch_size: int, progress,
                vocab: int | None = None) -> pa.Table:
    """The full-logits reference scorer (whole batches of logits; `infra.models.scoring` is the
    chunked one the stage runs), same table."""
    prompts, responses = rollouts["prompt_ids"].to_pylist(), rollouts["response_ids"].to_pylist()
    k = min(top_k, vocab or model.config.vocab_size, model.config.vocab_size)
    per_seq = []
    for lo, logits, lengths in response_logits(model, prompts, responses, pad_id, batch_size):
        sampled = torch.tensor([t for r in responses[lo:lo + len(lengths)] for t in r], dtype=torch.long)
        tok_lp, top_lp, top_ids, tail = (x.cpu() for x in score_logits(logits, sampled, k, vocab))
        start = 0
        for n in lengths:
            sl = slice(start, start + n)
            per_seq.append((tok_lp[sl].tolist(), top_ids[sl].tolist(), top_lp[sl].tolist(), tail[sl].tolist()))
            start += n
        progress((lo + len(lengths)) / len(prompts), f"{lo + len(lengths)}/{len(prompts)} sequences")
    return scores_table(rollouts, per_seq)


def _stage(run: Run, stage: str) -> ShardParts:
    """(params, inputs, shard body) of a scoring stage: shard i scores rollout part i."""
    c = run.config
    ro_stage = round_stage("rollout", parse(stage).round, parse(stage).arm, parse(stage).seed)
    parts = run.outputs_under(ro_stage, "rollouts")
    inputs = {**parts, **run.model_inputs("models", "teacher")}
    scoring = backends.result_settings(c.section("scoring"))
    if scoring.get("signal") == "topk":  # the default keeps the identity stages had before the field existed
        del scoring["signal"]
    params = {"scoring": scoring, "teacher": c.section("teacher")}

    def shard_body(ctx: StageContext, i: int, n: int) -> None:
        tdir = run.materialize("models", "teacher")
        tok = load_tokenizer(tdir)
        model = load_model(tdir, c.teacher.dtype).eval() if backends.needs_local_model(c.scoring.backend) else None
        rollouts = parquet_to_table(run.read(parts[sorted(parts)[i]]))
        if c.scoring.signal == "hidden":
            return hidden_shard(ctx, model, tok, rollouts)
        t0 = time.time()
        per_seq = backends.scorer_for(c, tdir)(model, tok, rollouts["prompt_ids"].to_pylist(),
                                             rollouts["response_ids"].to_pylist(), ctx.progress)
        scores = for_signal(scores_table(rollouts, per_seq), c.scoring.signal)
        secs = time.time() - t0
        ctx.put_table("part.parquet", scores)
        tail = {"tail": tail_source(per_seq)} if c.scoring.signal == "topk" else {}
        ctx.backend.update(backends.scorer_record(c, model), signal=c.scoring.signal, **tail, vocab_size=len(tok))
        sums = score_sums(rollouts, scores)
        ctx.metrics.update(score_metrics(sums), seconds_scoring=round(secs, 3),
                           tokens_per_s=round(sums["n_tokens"] / max(secs, 1e-9), 1))
    def hidden_shard(ctx: StageContext, model, tok, rollouts: pa.Table) -> None:
        from opdflow.infra.models.scoring import teacher_hidden_states
        t0 = time.time()
        per_seq = teacher_hidden_states(model, rollouts["prompt_ids"].to_pylist(), rollouts["response_ids"].to_pylist(),
                                        tok.pad_token_id, c.scoring.batch_size, c.scoring.chunk_tokens, ctx.progress,
                                        vocab=len(tok))
        scores = hidden_table(rollouts, per_seq)
        secs = time.time() - t0
        ctx.put_table("part.parquet", scores)
        record = {k: v for k, v in backends.scorer_record(c, model).items() if k != "top_k"}
        head = model.get_output_embeddings().weight  # its input width is the stored rows' H
        dtype = next((h.dtype for _, h in per_seq if h.numel()), head.dtype)  # the stored bytes' dtype
        ctx.backend.update(record, signal="hidden", hidden_dtype=str(dtype).removeprefix("torch."),
                           hidden_size=int(head.shape[1]), vocab_size=len(tok))
        sums = score_sums(rollouts, scores)
        ctx.metrics.update(score_metrics(sums), seconds_scoring=round(secs, 3),
                           tokens_per_s=round(sums["n_tokens"] / max(secs, 1e-9), 1))
    return params, inputs, shard_body


SUMS = ("n_tokens", "teacher_logprob_sum", "k1_sum")


def score_sums(rollouts: pa.Table, scores: pa.Table) -> dict:
    """Tokens, the sum of the teacher's logprobs and of sampler minus teacher logprobs."""
    t_lp = [x for row in scores["teacher_logprobs"].to_pylist() for x in row]
    s_lp = [x for row in rollouts["logprobs"].to_pylist() for x in row]
    return {"n_tokens": len(t_lp), "teacher_logprob_sum": sum(t_lp), "k1_sum": sum(s - t for s, t in zip(s_lp, t_lp))}


def score_metrics(sums: dict) -> dict:
    """The sums with their means; k1: the estimate of reverse KL(student || teacher) on the sampled tokens."""
    n = max(1, sums["n_tokens"])
    return {**sums, "teacher_logprob_mean": round(sums["teacher_logprob_sum"] / n, 5),
            "sampled_reverse_kl_k1": round(sums["k1_sum"] / n, 5)}


def run(run: Run, stage: str, force: bool = False, progress=None) -> tuple[dict, bool]:
    params, inputs, shard_body = _stage(run, stage)

    def finish(ctx: StageContext, parts: dict, shards: list[dict]) -> None:  # from the shards' sums
        ctx.metrics.update(score_metrics({k: sum(sh["metrics"][k] for sh in shards) for k in SUMS}))
    return run_sharded(run, stage, n=n_shards(run, stage), params=params, inputs=inputs, table="scores",
                       shard_body=shard_body, finish=finish, force=force, progress=progress)


def n_shards(run: Run, stage: str) -> int:
    """Scoring shards follow the rollout's parts."""
    return len(run.outputs_under(round_stage("rollout", parse(stage).round, parse(stage).arm, parse(stage).seed), "rollouts"))


def load(run: Run, stage: str) -> pa.Table:
    """The stage's scores; a table committed before the tail column existed is refused (its
    top-k alone cannot give the exact tail: rescore)."""
    table = read_parts(run, stage, "scores")
    if signal_of(table) == "topk" and TAIL_COLUMN not in table.column_names:
        raise RunError(f"{stage}: the committed scores have no {TAIL_COLUMN!r} column (written by an older "
                       f"opdflow, before the exact top-k tail); rescore it: `opdflow stage {stage} --run-id "
                       f"{run.run_id}`")
    return table


def report(run: Run, entry: dict) -> str:
    m = entry["metrics"]
    return "\n".join([f"# {entry['stage']} — run `{run.run_id}`", "", "| metric | value |", "|---|---|",
                      *[f"| {k} | {v} |" for k, v in m.items()], "", f"Backend: `{entry['backend']}`"])


def needs(config, stage: str) -> list[str]:
    name = parse(stage)
    return ["models", round_stage("rollout", name.round, name.arm, name.seed)]


STAGES = (Stage("score", run, instances=round_instances("score"), needs=needs, report=report, shard_parts=_stage,
                n_shards=n_shards),)
score_task, score_shard_task = STAGES[0].task, STAGES[0].shard_task

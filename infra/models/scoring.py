"""Teacher scoring at scale: per response token, the teacher's logprob and top-k, without full logits.

Why: `tasks.score.score_table` runs the whole causal LM, which materialises logits for every
position of the batch, [batch, width, vocab], then a float32 copy of the response rows. With a
real teacher (vocabulary ~150k) a batch of 64 sequences of 2k tokens is ~40 GB of bf16 logits plus
up to ~80 GB for the float32 copy, so memory, not the GPU's compute, caps the batch size. Only the rows that predict response
tokens are needed, and each row only for one gather and one top-k. Here:

1. the model's base (`model.get_decoder()`: the transformer without the LM head, final norm
   included) runs on the right-padded batch and gives the final hidden states;
2. only the hidden states at the positions that predict a response token are kept ([N, hidden]);
3. the LM head (`model.get_output_embeddings()`) is applied to `chunk_tokens` rows at a time:
   per chunk, log_softmax in float32, the logprob of the sampled token, and the top-k. At most
   `chunk_tokens` x vocab logits exist at once, whatever the batch;
4. the logits are cut to the tokenizer's vocabulary (`vocab`: the padded lm_head rows beyond
   it are no tokens, and a padded teacher's top-k would otherwise hold ids the student cannot
   represent), and each row's *tail log-mass*, the log of the teacher's probability outside its
   top-k, is computed from the full row (`kernels.reference.tail_log_mass`: logsumexp over the
   non-top-k logits minus the full logsumexp, no cancellation however confident the teacher),
   so the train stage's K + 1 category loss is exact where `1 - sum exp(top-k)` cancels.

The batches hold the sequences sorted by length (less padding); results are put back in input
order. With right padding and causal attention, a sequence's numbers do not depend on what it is
batched with (up to kernel rounding), so this equals `score_table` (tests/test_scoring.py checks
1e-5 on the demo models).

Final logit transforms: some architectures change the logits after the LM head. The ones known
here are applied, in the model's dtype and the order the transformers 5 models use: Cohere's
`logit_scale` (multiply), Granite's `logits_scaling` (divide), then the Gemma-style
`final_logit_softcapping` (cap * tanh(logits / cap)). Any other arch-specific step would make the
results silently wrong, so every call first checks the head path against the model's own forward
on a short prefix of the longest sequence (at most `chunk_tokens` and 16 tokens, so the check
also stays within the chunk bound) and refuses the model if they differ.

`teacher_hidden_states` is the scorer of `scoring.signal: hidden`: steps 1-2 only, the hidden
states kept (the lm_head's input, after the final norm) and the LM head applied per chunk just
for the sampled token's log-prob. Training rebuilds the logits as `hidden @ W.T + b` inside its
loss, so a teacher whose logits are transformed after the head is refused here.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from opdflow.infra.config import ScoringConfig, default
from opdflow.infra.models.lm import head_mismatch, real_logits
from opdflow.kernels.reference import check_token_ids, tail_log_mass, token_logprobs

# per response: teacher logprob of each token, top-k ids, top-k logprobs, tail log-mass per token
Scores = tuple[list[float], list[list[int]], list[list[float]], list[float]]

_PROBE_TOKENS = 16


# -- the parts of the model -------------------------------------------------------------------

def split_model(model):
    """(base, head): the transformer that gives final hidden states, and the LM head."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    if base is None or base is model:
        base = getattr(model, "model", None)
    head = model.get_output_embeddings()
    if base is None or base is model or head is None:
        raise ValueError(f"{type(model).__name__}: cannot split into a base model and an LM head")
    return base, head


def text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def logit_transform(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the arch does to the LM head's output (identity for Llama, Qwen2, Mistral...)."""
    cfg = text_config(model)
    scale = getattr(cfg, "logit_scale", None)
    scaling = getattr(cfg, "logits_scaling", None)
    cap = getattr(cfg, "final_logit_softcapping", None)

    def apply(logits: torch.Tensor) -> torch.Tensor:
        if isinstance(scale, (int, float)) and scale != 1:
            logits = logits * scale
        if isinstance(scaling, (int, float)) and scaling != 1:
            logits = logits / scaling
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
    return apply


def vocab_size(model) -> int:
    return int(getattr(model.config, "vocab_size", None) or text_config(model).vocab_size)


# -- batches ----------------------------------------------------------------------------------

def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int):
    """Right-padded ids and mask [B, W], and (row, column) of each position that predicts a
    response token, in order (sequence by sequence, token by token)."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols = [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if r and not p:
            raise ValueError(f"sequence {i}: a response needs a non-empty prompt to be scored")
        ids[i, :len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
        mask[i, :len(seqs[i])] = 1
        rows += [i] * len(r)
        cols += range(len(p) - 1, len(p) - 1 + len(r))
    return ids, mask, torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


def length_batches(prompts, responses, batch_size: int) -> list[list[int]]:
    """Indices in batches of `batch_size`, sequences of similar length together."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    return [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]


def response_hidden(base, ids, mask, rows, cols, dev) -> torch.Tensor:
    """Final hidden states [N, hidden] at the positions that predict response tokens."""
    hidden = base(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
    return hidden[rows.to(dev), cols.to(dev)]


def score_logits(logits: torch.Tensor, tokens: torch.Tensor, k: int, vocab: int | None = None):
    """One chunk of the teacher's logits [n, rows] -> (logprob of each token [n], top-k logprobs
    [n, k], top-k ids [n, k], tail log-mass [n]), over the first `vocab` columns (the
    tokenizer's), in float32. The one scoring step: `score_rows` and `tasks.score.score_table`
    both call it."""
    logits = real_logits(logits, vocab).float()
    check_token_ids(tokens, logits.shape[-1])  # host sync: fail before storing bad rows
    logp = torch.log_softmax(logits, dim=-1)
    tok_lp = logp.gather(-1, tokens[:, None].to(logp.device)).squeeze(-1)
    top_lp, top_ids = logp.topk(k, dim=-1)
    return tok_lp, top_lp, top_ids, tail_log_mass(logits, top_ids)


def score_rows(head, transform, hidden: torch.Tensor, tokens: torch.Tensor, k: int,
               chunk_tokens: int, vocab: int | None = None):
    """(logprob of each token [N], top-k logprobs [N, k], top-k ids [N, k], tail log-mass [N])
    on the CPU, from `chunk_tokens` rows of logits at a time."""
    parts = []
    for lo in range(0, hidden.shape[0], chunk_tokens):
        got = score_logits(transform(head(hidden[lo:lo + chunk_tokens])), tokens[lo:lo + chunk_tokens], k, vocab)
        parts.append([x.cpu() for x in got])
    if not parts:
        return torch.zeros(0), torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long), torch.zeros(0)
    return tuple(torch.cat(xs) for xs in zip(*parts))


def check_head_path(model, base, head, transform, seq: Sequence[int], max_tokens: int) -> None:
    """Refuse a model whose own forward gives other logits than base -> head -> transform
    (`infra.models.lm.head_mismatch` on the first `max_tokens` of `seq`, at most 16)."""
    n = max(1, min(_PROBE_TOKENS, max_tokens, len(seq)))
    err = head_mismatch(model, list(seq[:n]), base=base, head=head, transform=transform)
    if err is not None:
        raise ValueError(f"{type(model).__name__}: hidden states -> LM head does not reproduce the model's logits "
                         f"(max |diff| {err:.3g}); this architecture transforms its logits in a way "
                         "infra.models.scoring does not know: score it with tasks.score.score_table")


# -- the entry point --------------------------------------------------------------------------

@torch.no_grad()
def teacher_scores(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                   top_k: int, batch_size: int, chunk_tokens: int = default(ScoringConfig, "chunk_tokens"),
                   progress: Callable[[float, str], None] | None = None, vocab: int | None = None) -> list[Scores]:
    """Per response: (teacher logprob of each token, top-k ids per token, top-k logprobs per
    token, tail log-mass per token), as `tasks.score.score_table` stores them, with
    k = min(top_k, vocabulary size); `vocab` is the tokenizer's size (padded rows cut off)."""
    transform = logit_transform(model)
    base, head = prepare_teacher(model, prompts, responses, batch_size, chunk_tokens, transform)
    k = min(top_k, vocab or vocab_size(model), vocab_size(model))
    out: list[Scores | None] = [None] * len(prompts)
    for idx, rs, hidden, tokens in teacher_batches(base, prompts, responses, pad_id, batch_size, progress):
        if hidden is not None:
            tok_lp, top_lp, top_ids, tail = score_rows(head, transform, hidden, tokens, k, chunk_tokens, vocab)
            del hidden
        start = 0
        for i, r in zip(idx, rs):
            n = len(r)
            out[i] = ((tok_lp[start:start + n].tolist(), top_ids[start:start + n].tolist(),
                       top_lp[start:start + n].tolist(), tail[start:start + n].tolist()) if n else ([], [], [], []))
            start += n
    return out  # type: ignore[return-value]


def prepare_teacher(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], batch_size: int,
                    chunk_tokens: int, transform) -> tuple:
    """What every teacher pass does before its first batch: check the arguments, put the model
    in eval mode, split it into (base, head), and check that the head path reproduces the
    model's own logits on the longest sequence (`check_head_path`)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if chunk_tokens < 1 or batch_size < 1:
        raise ValueError("chunk_tokens and batch_size must be at least 1")
    model.eval()
    base, head = split_model(model)
    if prompts:
        j = max(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
        if len(prompts[j]) + len(responses[j]):
            check_head_path(model, base, head, transform, list(prompts[j]) + list(responses[j]), chunk_tokens)
    return base, head


def teacher_batches(base, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                    batch_size: int, progress: Callable[[float, str], None] | None):
    """Length-bucketed batches of a teacher pass: (indices, responses, the final hidden states
    of their response tokens [n, H] on the model's device, those tokens), hidden and tokens None
    for a batch of empty responses; reports progress after each batch."""
    dev = next(base.parameters()).device
    done = 0
    for idx in length_batches(prompts, responses, batch_size):
        ps, rs = [prompts[i] for i in idx], [responses[i] for i in idx]
        hidden = tokens = None
        if sum(len(r) for r in rs):
            ids, mask, rows, cols = pack(ps, rs, pad_id)
            hidden = response_hidden(base, ids, mask, rows, cols, dev)
            tokens = torch.tensor([t for r in rs for t in r], dtype=torch.long)
        yield idx, rs, hidden, tokens
        done += len(idx)
        if progress:
            progress(done / len(prompts), f"{done}/{len(prompts)} sequences")


@torch.no_grad()
def teacher_hidden_states(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                          batch_size: int, chunk_tokens: int = default(ScoringConfig, "chunk_tokens"),
                          progress: Callable[[float, str], None] | None = None,
                          vocab: int | None = None) -> list[tuple[list[float], torch.Tensor]]:
    """Per response: (teacher log-prob of each token, final hidden states [n, H] on the CPU in
    the model's dtype), for `scoring.signal: hidden`. The hidden states are what the lm_head
    receives; a model with a logit transform (`logit_transform`: scale, soft-capping) is refused,
    since `hidden @ W.T` would not be its logits, and the head path is checked against the
    model's own forward as `teacher_scores` does."""
    cfg = text_config(model)
    transformed = {a: getattr(cfg, a, None) for a in ("logit_scale", "logits_scaling", "final_logit_softcapping")}
    transformed = {a: v for a, v in transformed.items() if v not in (None, 0, 1, 1.0)}
    if transformed:
        raise ValueError(f"scoring.signal: hidden: {type(model).__name__} transforms its logits after the lm_head "
                         f"({transformed}); training rebuilds the logits as the bare lm_head of the stored hidden "
                         "states, which would be other logits: use scoring.signal: topk")
    base, head = prepare_teacher(model, prompts, responses, batch_size, chunk_tokens, lambda x: x)
    out: list = [None] * len(prompts)
    for idx, rs, hidden, tokens in teacher_batches(base, prompts, responses, pad_id, batch_size, progress):
        tok_lp = torch.zeros(0)
        if hidden is None:  # a batch of empty responses: nothing stored
            hidden = torch.zeros(0, 0)
        else:
            parts = []
            for lo in range(0, hidden.shape[0], chunk_tokens):
                logits = real_logits(head(hidden[lo:lo + chunk_tokens]), vocab)
                parts.append(token_logprobs(logits, tokens[lo:lo + chunk_tokens].to(logits.device)).cpu())
            tok_lp, hidden = torch.cat(parts), hidden.cpu()
        start = 0
        for i, r in zip(idx, rs):
            out[i] = (tok_lp[start:start + len(r)].tolist(), hidden[start:start + len(r)].contiguous())
            start += len(r)
    return out


def hidden_bytes(hidden: torch.Tensor) -> bytes:
    """A response's hidden states [n, H] as stored (`scoring.signal: hidden`): the row-major
    bytes of the tensor in its own dtype (bfloat16 has no Arrow type; its bits are kept as is)."""
    return hidden.contiguous().view(torch.uint8).numpy().tobytes() if hidden.numel() else b""


def hidden_from_bytes(blobs: Sequence[bytes], dtype: str, size: int) -> torch.Tensor:
    """`hidden_bytes` of several responses back to one [N, H] tensor (`dtype` a torch dtype's
    name, `size` H); a blob that is not whole rows of that dtype and size is refused."""
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise ValueError(f"teacher hidden states: {dtype!r} is no torch dtype")
    dt = getattr(torch, dtype)
    row = size * torch.empty(0, dtype=dt).element_size()
    for b in blobs:
        if len(b) % row:
            raise ValueError(f"teacher hidden states: a blob of {len(b)} bytes is not whole rows of {size} {dtype}")
    data = b"".join(blobs)
    if not data:
        return torch.zeros(0, size, dtype=dt)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dt).reshape(-1, size)

"""Measuring a model against the teacher on the probe sequences: per generated position the
full-vocabulary reverse KL, its logit-space gradient norm and cosines to the corpus directions, in
token chunks (memory one chunk x V)."""
from __future__ import annotations


import pyarrow as pa
import torch

from opdflow.infra.config import Config, ScoringConfig, default
from opdflow.infra.models.lm import real_logits
from opdflow.infra.models.scoring import check_head_path, logit_transform, pack, response_hidden, split_model
from opdflow.kernels.loss import divergence_and_grad
from opdflow.tasks.plan import round_stage


# -- the stage -------------------------------------------------------------------------


def checkpoint_labels(config: Config) -> list[tuple[str, str, str]]:
    """(label, stage, prefix) of each compared checkpoint, in training order whatever the
    order of `rock.checkpoints`: the last one is where the rock set is selected."""
    r = config.train.rounds
    named = {"initial": 0, "middle": (r + 1) // 2, "final": r}
    rounds = sorted({min(named[c] if c in named else int(c[1:]), r) for c in config.rock.checkpoints})
    return [("initial", "models", "student") if rr == 0 else (f"r{rr:02d}", round_stage("train", rr), "model")
            for rr in rounds]


def selection_checkpoint(config: Config) -> str:
    """The label of the checkpoint the rock set is selected on: the latest compared one."""
    return checkpoint_labels(config)[-1][0]


@torch.no_grad()
def measure(model, teacher, pad_id: int, table: pa.Table, batch_size: int, counts: torch.Tensor,
            refs: dict[str, torch.Tensor] | None = None, vocab: int | None = None,
            chunk_tokens: int = default(ScoringConfig, "chunk_tokens")) -> tuple[dict[str, list], dict[str, torch.Tensor]]:
    """Per position: reverse KL, its logit-space gradient norm, both top-1s; plus this
    table's share of the two corpus-level gradient directions (sums over positions:
    frequency-weighted, and weighted 1/frequency of the token id, i.e. each token id counts
    once; `counts` are the token frequencies over the whole probe set, so shards' sums add
    up to the corpus sums). With `refs`, also each position's gradient cosine to each
    reference direction. `vocab` (the tokenizer's size) cuts padded lm_head rows off both
    models' logits: the divergence, gradients and top-1s are over the real vocabulary.

    Memory: both model bodies run to final hidden states (`infra.models.scoring`'s split), and the
    lm_heads are applied `chunk_tokens` positions at a time, so no more than a few
    ``[chunk_tokens, V]`` float32 tensors exist at once whatever the batch and sequence
    length; only the running totals of the two V-sized direction sums are float64. The
    divergence and its gradient: the fused kernel on CUDA, the closed form
    (`kernels.reference.dense_reverse_kl_and_grad`) elsewhere."""
    if chunk_tokens < 1 or batch_size < 1:
        raise ValueError("chunk_tokens and batch_size must be at least 1")
    prompts, responses = table["prompt_ids"].to_pylist(), table["response_ids"].to_pylist()
    tokens = torch.tensor([t for r in responses for t in r], dtype=torch.long)
    limit = min(vocab or len(counts), len(counts))
    if tokens.numel() and int(tokens.max()) >= limit:
        raise ValueError(f"a response token id {int(tokens.max())} is beyond the vocabulary ({limit} ids): "
                         "the probe sampled a padded lm_head row")
    inv_freq = 1.0 / counts.double()[tokens]
    out = {k: [] for k in ("kl", "grad_norm", "student_top1", "teacher_top1")}
    out.update({f"cos_{name}": [] for name in (refs or {})})
    sums: dict[str, torch.Tensor] = {}
    parts = [(split_model(m), logit_transform(m), next(m.parameters()).device) for m in (model, teacher)]
    dev = parts[0][2]
    refs32 = {name: (ref.to(dev, torch.float32), float(ref.double().norm())) for name, ref in (refs or {}).items()}
    if prompts:  # refuse an arch whose logits are not base -> head -> transform (as teacher scoring does)
        j = max(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
        if len(prompts[j]) + len(responses[j]):
            for m, ((base, head), transform, _) in zip((model, teacher), parts):
                check_head_path(m, base, head, transform, list(prompts[j]) + list(responses[j]), chunk_tokens)
    pos = 0
    for lo in range(0, len(prompts), batch_size):
        ps, rs = prompts[lo:lo + batch_size], responses[lo:lo + batch_size]
        if not sum(len(r) for r in rs):
            continue
        ids, mask, rows, cols = pack(ps, rs, pad_id)
        (_, s_head), s_tf, _ = parts[0]
        (_, t_head), t_tf, _ = parts[1]
        s_hidden, t_hidden = (response_hidden(base, ids, mask, rows, cols, d) for (base, _), _, d in parts)
        for c in range(0, s_hidden.shape[0], chunk_tokens):
            s_logits = real_logits(s_tf(s_head(s_hidden[c:c + chunk_tokens])), vocab).float()
            t_logits = real_logits(t_tf(t_head(t_hidden[c:c + chunk_tokens])), vocab).float().to(dev)
            out["student_top1"] += s_logits.argmax(-1).tolist()
            out["teacher_top1"] += t_logits.argmax(-1).tolist()
            s_logits = s_logits.contiguous()
            # the gradient replaces the student's logits in place (no second [chunk, V] buffer)
            kl, grad, gnorm = divergence_and_grad(s_logits, teacher_logits=t_logits.contiguous(), kind="reverse_kl",
                                                  grad_out=s_logits)
            del t_logits
            grad = grad.float()
            w = inv_freq[pos:pos + len(kl)].to(dev)
            pos += len(kl)
            # a chunk's sums as float32 matrix-vector products (no [chunk, V] temporary, a chunk of
            # rows per sum); only their running totals over the table are float64
            weights = torch.stack([torch.ones_like(w), w]).to(grad.dtype)
            for name, part in zip(("freq_weighted", "freq_balanced"), (weights @ grad).double()):
                sums[name] = sums[name] + part if name in sums else part
            for name, (ref, ref_norm) in refs32.items():
                cos = (grad @ ref).double() / (gnorm.double() * ref_norm).clamp_min(1e-30)
                out[f"cos_{name}"] += cos.tolist()
            out["kl"] += kl.tolist()
            out["grad_norm"] += gnorm.tolist()
            del s_logits, grad
        del s_hidden, t_hidden
    return out, sums


def mean_cosines(token_ids: list[int], cosines: dict[str, list[float]], sets: dict[str, list[int]]) -> dict:
    """Mean gradient cosine to each corpus-level direction, per token set and overall."""
    out = {}
    for name, ids in {**sets, "all": None}.items():
        keep = [i for i, t in enumerate(token_ids) if ids is None or t in set(ids)]
        out[name] = {ref: (sum(c[i] for i in keep) / len(keep) if keep else float("nan")) for ref, c in cosines.items()}
    return out

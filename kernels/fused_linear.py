"""Fused lm_head + distillation loss: the full N x V student logits never exist at once.

Why this module exists
----------------------
At V ~ 150k the student logits of a long batch dominate training memory (N = 16384 tokens is
~5 GB in bf16, and the loss's backward needs as much again for the gradient). This module takes
the student's final hidden states ``[N, H]`` and the lm_head weight ``[V, H]`` instead, and walks
the tokens in chunks: for each chunk it computes the chunk's logits, the per-token divergence and
its gradient wrt those logits in one call (``loss.divergence_and_grad``, so Triton on CUDA and the
reference elsewhere), and immediately folds that gradient into ``grad_hidden`` and ``grad_weight``.
One ``[chunk, V]`` buffer is alive at a time: the gradient is written over the chunk's logits,
and the per-token scale (weights / token count) is applied on the ``[chunk, H]`` side of the
products. The backward pass scales the stored gradients in place by the incoming grad_output and
hands them over without a copy (so the graph can be backpropagated once).
Normalization and masking are the same as ``DistillationLoss`` (``loss.reduce_per_token``'s rule).

``grad_weight`` is accumulated over the chunks in float32 even for a bf16 / fp16 weight, at the
cost of a float32 ``[V, H]`` buffer (2.5 GB at V = 151936, H = 4096): chunking splits the GEMM's
reduction over tokens, and a 16-bit running sum rounds once per chunk, which users of
Liger-Kernel's fused linear losses reported as unstable or divergent training (its
``accum_dtype`` option and the projects that set it to float32 came from that).
``grad_weight_dtype=weight.dtype`` opts into the 16-bit sum: it saves the float32 buffer and the
per-chunk ``[V, H]`` product (at N = 4096, H = 4096, V = 151936 the counted peak goes from 4.09
to 1.63 GB; ``benchmarks/bench_kernels.py --count-memory``).

The teacher is dense logits ``[N, V]``, a sparse top-k (ids, logprobs), or -- to avoid the
teacher's N x V as well -- the teacher's hidden states and lm_head weight, whose logits are then
computed chunk by chunk under ``no_grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .loss import divergence_and_grad, resolve_backend

__all__ = ["FusedLinearDistillationLoss", "fused_linear_distillation_loss"]


def _teacher_chunk(sl, teacher_logits, ids, logprobs, tail, t_hidden, t_weight, t_bias):
    if t_hidden is not None:
        with torch.no_grad():
            t = t_hidden[sl] @ t_weight.t()
            if t_bias is not None:
                t = t + t_bias
        return dict(teacher_logits=t)
    if teacher_logits is not None:
        return dict(teacher_logits=teacher_logits[sl])
    return dict(teacher_topk_ids=ids[sl], teacher_topk_logprobs=logprobs[sl],
                teacher_tail_logmass=None if tail is None else tail[sl])


class _FusedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, scale, teacher, opts):
        n = hidden.shape[0]
        chunk = opts["chunk_size"]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=opts["grad_weight_dtype"], device=weight.device)
            if ctx.needs_input_grad[1]
            else None
        )
        grad_bias = (
            torch.zeros(weight.shape[0], dtype=scale.dtype, device=weight.device)
            if bias is not None and ctx.needs_input_grad[2]
            else None
        )
        per_token = torch.empty(n, dtype=scale.dtype, device=hidden.device)
        mask = teacher["mask"]
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            logits = hidden[sl] @ weight.t()
            if bias is not None:
                logits = logits + bias
            if teacher["targets"] is not None:  # the sampled token's log-prob, for the trainer
                tgt = teacher["targets"]
                tgt[1][sl] = reference.token_logprobs(logits, tgt[0][sl])
            # The gradient replaces the logits in their buffer: one [chunk, V] tensor per chunk.
            loss_c, grad_c, _ = divergence_and_grad(
                logits,
                **_teacher_chunk(sl, *teacher["args"]),
                kind=opts["kind"],
                beta=opts["beta"],
                temperature=opts["temperature"],
                mask=None if mask is None else mask[sl],
                backend=opts["backend"],
                grad_out=logits,
            )
            per_token[sl] = loss_c.to(scale.dtype)
            # d loss / d logits = scale * grad_c, row by row: the scale goes on the [chunk, H]
            # side of each product, so no scaled [chunk, V] copy is made.
            s_c = scale[sl, None]
            if grad_bias is not None:
                grad_bias += s_c[:, 0] @ grad_c.to(scale.dtype)
            if grad_hidden is not None:
                grad_hidden[sl] = ((grad_c @ weight).to(scale.dtype) * s_c).to(hidden.dtype)
            if grad_weight is not None:
                h_c = (hidden[sl].to(scale.dtype) * s_c).to(weight.dtype)
                if grad_weight.dtype == weight.dtype:  # summed in place, in the weight's dtype
                    grad_weight.addmm_(grad_c.t(), h_c)
                else:  # a 16-bit weight, float32 sum: one [V, H] product per chunk
                    grad_weight += grad_c.t() @ h_c
            del grad_c, logits
        loss = (per_token * scale).sum()
        # Kept on ctx, not save_for_backward: they are this function's own results, and backward
        # hands them over (scaled in place) without a copy, so the graph runs backward once.
        ctx.grads = [
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        ]
        del grad_weight
        ctx.mark_non_differentiable(per_token)
        return loss, per_token

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token):
        if ctx.grads is None:
            raise RuntimeError("the fused linear loss's graph was already backpropagated once")
        grads, ctx.grads = ctx.grads, None
        for g in grads:
            if g is not None:
                g.mul_(grad_loss.to(g.dtype))
        return grads[0], grads[1], grads[2], None, None, None


def fused_linear_distillation_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    teacher_logits: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_tail_logmass: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    backend: str = "auto",
    target_ids: Tensor | None = None,
    target_logprobs_out: Tensor | None = None,
    grad_weight_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``(scalar loss, per-token loss detached [N])`` from ``hidden [N, H]`` and ``weight [V, H]``.

    Same value and gradients as ``distillation_loss(hidden @ weight.T + bias, ...)``, with
    at most ``chunk_size`` rows of logits alive at a time. Leading dims of ``hidden`` are
    flattened. Give exactly one teacher: ``teacher_logits``, the top-k pair, or
    ``teacher_hidden`` + ``teacher_weight`` (+ optional ``teacher_bias``). With ``target_ids``
    (long ``[N]``), ``target_logprobs_out`` (float32 ``[N]``) receives each target's log-prob
    under ``softmax(hidden @ weight.T + bias)``, detached, from the same chunks of logits.

    ``grad_weight_dtype``: the dtype of the running weight-gradient sum over the chunks. By
    default float32 for a 16-bit weight (the weight's own dtype for float32 / float64); passing
    the 16-bit dtype itself sums in place, without the float32 ``[V, H]`` buffer and the
    per-chunk ``[V, H]`` product, rounding once per chunk (see the module docstring for why
    that is not the default).
    """
    if (target_ids is None) != (target_logprobs_out is None):
        raise ValueError("target_ids and target_logprobs_out go together")
    n_teachers = sum(
        x is not None for x in (teacher_logits, teacher_topk_ids, teacher_hidden)
    )
    if n_teachers != 1:
        raise ValueError("give exactly one teacher: logits, top-k pair, or hidden + weight")
    if teacher_hidden is not None and teacher_weight is None:
        raise ValueError("teacher_hidden needs teacher_weight")
    sparse = teacher_topk_ids is not None
    reference.check_args(kind, beta, temperature, sparse=sparse)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if grad_weight_dtype is None:
        grad_weight_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    if grad_weight_dtype not in (torch.float32, weight.dtype):
        raise ValueError(f"grad_weight_dtype must be torch.float32 or the weight's dtype ({weight.dtype}), "
                         f"got {grad_weight_dtype}")
    h = hidden.reshape(-1, hidden.shape[-1])
    n = h.shape[0]
    v = weight.shape[0]
    t = None if teacher_logits is None else teacher_logits.detach().reshape(n, v)
    ids = None if teacher_topk_ids is None else teacher_topk_ids.reshape(n, -1)
    lps = None if teacher_topk_logprobs is None else teacher_topk_logprobs.detach().reshape(n, -1)
    tail = None if teacher_tail_logmass is None else teacher_tail_logmass.detach().reshape(n)
    th = None if teacher_hidden is None else teacher_hidden.detach().reshape(n, -1)
    keep = (
        torch.ones(n, dtype=torch.bool, device=h.device)
        if mask is None
        else mask.reshape(-1).to(device=h.device, dtype=torch.bool)
    )
    cdt = torch.float64 if h.dtype == torch.float64 else torch.float32
    w = torch.ones(n, dtype=cdt, device=h.device)
    if weights is not None:
        w = weights.reshape(-1).to(device=h.device, dtype=cdt)
    # Same rule as loss.reduce_per_token; computed up front because it scales the gradients.
    scale = torch.where(keep, w, torch.zeros_like(w)) / keep.sum().clamp_min(1).to(cdt)
    teacher = dict(
        args=(t, ids, lps, tail, th, teacher_weight, teacher_bias),
        mask=None if mask is None else keep,
        targets=None if target_ids is None else (target_ids.reshape(-1), target_logprobs_out),
    )
    opts = dict(
        kind=kind,
        beta=float(beta),
        temperature=float(temperature),
        chunk_size=int(chunk_size),
        backend=resolve_backend(backend, h.device),
        grad_weight_dtype=grad_weight_dtype,
    )
    return _FusedLinearDivergence.apply(h, weight, bias, scale, teacher, opts)


class FusedLinearDistillationLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_distillation_loss` (hidden states + lm_head weight)."""

    def __init__(
        self,
        kind: str = "reverse_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        chunk_size: int = 1024,
        backend: str = "auto",
        grad_weight_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        reference.check_args(kind, beta, temperature, sparse=False)
        self.kind = kind
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.chunk_size = int(chunk_size)
        self.backend = backend
        self.grad_weight_dtype = grad_weight_dtype

    def forward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None = None, **teacher_and_mask):
        return fused_linear_distillation_loss(
            hidden,
            weight,
            bias,
            kind=self.kind,
            beta=self.beta,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            backend=self.backend,
            grad_weight_dtype=self.grad_weight_dtype,
            **teacher_and_mask,
        )

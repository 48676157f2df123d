"""Training entry points: the distillation loss the train stage calls, on any device.

Why this module exists
----------------------
The train stage needs one call that turns student logits and a teacher (dense logits or stored
top-k log-probs) into a scalar loss plus the per-token losses it logs for the rock-token
analysis. This module owns the shared mask-and-normalize step (written once, here) and picks the
backend: the Triton kernels (``triton_divergence``) on CUDA, the plain-PyTorch reference
(``reference``) elsewhere; either can be forced.

Normalization: ``loss = sum_i mask_i * weight_i * d_i / max(1, sum_i mask_i)`` -- divided by the
number of unmasked tokens, not by the weight sum, so a zero-weighted token (the rock-token
bypass) simply drops out of the numerator. Masked positions never produce NaN, whatever their
logits hold, and their per-token loss is reported as 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference

BACKENDS = ("auto", "reference", "triton")

__all__ = [
    "BACKENDS",
    "DistillationLoss",
    "distillation_loss",
    "divergence_and_grad",
    "reduce_per_token",
    "resolve_backend",
    "sampled_token_loss",
    "triton_available",
]


def triton_available() -> bool:
    """True when the Triton kernels module can be imported (triton installed)."""
    try:
        from . import triton_divergence  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Map ``auto`` to ``triton`` on CUDA (when importable) and ``reference`` elsewhere."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    return backend


def reduce_per_token(per_token: Tensor, mask: Tensor | None, weights: Tensor | None) -> Tensor:
    """The one mask-and-normalize step: ``sum(mask*w*d) / max(1, mask.sum())`` (no host sync)."""
    n = per_token.shape[0]
    if mask is None:
        mask = torch.ones(n, dtype=torch.bool, device=per_token.device)
    mask = mask.reshape(-1).to(device=per_token.device, dtype=torch.bool)
    contrib = per_token
    if weights is not None:
        contrib = contrib * weights.reshape(-1).to(device=per_token.device, dtype=per_token.dtype)
    contrib = torch.where(mask, contrib, torch.zeros_like(contrib))
    denom = mask.sum().clamp_min(1).to(per_token.dtype)
    return contrib.sum() / denom


def _flatten(student_logits, teacher_logits, ids, logprobs, tail, mask, weights):
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v)
    t = None if teacher_logits is None else teacher_logits.reshape(-1, v)
    if ids is not None:
        ids = ids.reshape(s.shape[0], -1)
    if logprobs is not None:
        logprobs = logprobs.reshape(s.shape[0], -1)
    tail = None if tail is None else tail.reshape(-1)
    mask = None if mask is None else mask.reshape(-1)
    weights = None if weights is None else weights.reshape(-1)
    return s, t, ids, logprobs, tail, mask, weights


def _neutralize_masked_rows(s, t, ids, logprobs, tail, mask):
    """Replace masked rows by harmless finite values so the reference never meets NaN there
    (and their ids by 0..K-1, so a masked row's ids are never validated)."""
    if mask is None:
        return s, t, ids, logprobs, tail
    keep = mask.to(device=s.device, dtype=torch.bool)[:, None]
    s = torch.where(keep, s, torch.zeros((), dtype=s.dtype, device=s.device))
    if t is not None:
        t = torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))
    if ids is not None:
        k = ids.shape[1]
        filler = torch.arange(k, device=ids.device).expand_as(ids)
        ids = torch.where(keep, ids.long(), filler)
        uniform = torch.full((), -math.log(k + 1), dtype=logprobs.dtype, device=logprobs.device)
        logprobs = torch.where(keep, logprobs, uniform)
        if tail is not None:
            tail = torch.where(keep[:, 0], tail.to(logprobs.dtype), uniform)
    return s, t, ids, logprobs, tail


def _per_token(s, t, ids, logprobs, tail, mask, kind, beta, temperature, backend):
    if backend == "triton":
        from .triton_divergence import triton_per_token_divergence

        return triton_per_token_divergence(
            s,
            teacher_logits=t,
            teacher_topk_ids=ids,
            teacher_topk_logprobs=logprobs,
            teacher_tail_logmass=tail,
            kind=kind,
            beta=beta,
            temperature=temperature,
            row_mask=mask,
        )
    s, t, ids, logprobs, tail = _neutralize_masked_rows(s, t, ids, logprobs, tail, mask)
    per_token = reference.per_token_divergence(
        s,
        teacher_logits=t,
        teacher_topk_ids=ids,
        teacher_topk_logprobs=logprobs,
        teacher_tail_logmass=tail,
        kind=kind,
        beta=beta,
        temperature=temperature,
    )
    if mask is not None:
        per_token = torch.where(mask.to(per_token.device), per_token, torch.zeros_like(per_token))
    return per_token


def distillation_loss(
    student_logits: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_tail_logmass: Tensor | None = None,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Function form of :class:`DistillationLoss`: ``(scalar loss, per-token loss detached [N])``.

    ``student_logits`` is ``[..., V]`` (leading dims are flattened to N); ``mask`` is bool
    ``[N]`` (False = ignored), ``weights`` float ``[N]``. A top-k teacher is the ids and
    log-probs ``[..., K]`` plus, when the scorer stored it, ``teacher_tail_logmass`` ``[...]``
    (the exact log-mass outside the top-k; see ``reference``'s "Sparse (top-k) teacher").

    >>> import torch
    >>> s = torch.zeros(2, 3, requires_grad=True)
    >>> t = torch.tensor([[0.0, 0.0, 0.0], [9.0, 0.0, 0.0]])
    >>> loss, per_token = distillation_loss(s, teacher_logits=t, mask=torch.tensor([True, False]))
    >>> float(loss.detach()), per_token.tolist()
    (0.0, [0.0, 0.0])
    """
    reference.check_args(kind, beta, temperature, sparse=teacher_logits is None)
    s, t, ids, logprobs, tail, mask, weights = _flatten(
        student_logits, teacher_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logmass,
        mask, weights
    )
    chosen = resolve_backend(backend, s.device)
    per_token = _per_token(s, t, ids, logprobs, tail, mask, kind, float(beta), float(temperature), chosen)
    return reduce_per_token(per_token, mask, weights), per_token.detach()


def sampled_token_loss(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    *,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The sampled-token teacher signal (``scoring.signal: sampled``): ``(scalar loss, per-token
    k1 detached [N])`` from the student's log-prob of each sampled token (with grad) and the
    teacher's (stored).

    This is the on-policy distillation of tinker-cookbook / Thinking Machines: per token,
    ``k1 = log p_student(x) - log p_teacher(x)`` is a one-sample estimate of reverse
    KL(student || teacher) at that position (x was drawn from the student), used as a detached
    per-token advantage ``A = -k1``; the gradient is the policy-gradient surrogate's,
    ``-A * grad log p_student(x)``, whose expectation over x ~ student is the gradient of the
    reverse KL (the score-function term of KL's own dependence on the sampling distribution has
    mean zero). The per-token loss *value* is ``k1`` (``A * (lp - lp.detach()) `` has value 0,
    so ``k1.detach() - A * (lp - lp.detach())`` reports the divergence estimate while giving the
    surrogate's gradient): the logged loss is the reverse-KL estimate, as the topk loss logs
    its divergence. Reduction as ``reduce_per_token`` (divided by unmasked tokens).

    Variants, not options here:

    * **k3** (Schulman's low-variance estimator), ``r = p_teacher / p_student``,
      ``k3 = (r - 1) - log r``: unbiased for the KL *value* and always >= 0, but its gradient as
      a loss (``grad k3 = (1 - r) grad lp``) is the gradient of forward KL under on-policy
      samples, not reverse KL, so it is a different objective; k1 is what tinker-cookbook
      trains on. ``k3`` is computed nowhere in training; ``train_worker`` logs the sampler/
      trainer k3 mismatch only.
    * **importance-weighted**: the advantage was computed for tokens the *sampler* drew; after
      the round's first optimizer step (or with a sampler/trainer numerics mismatch) the
      trainer's distribution differs, and the unbiased surrogate is
      ``-(p_trainer / p_sampler) * A``. With ``train.tis_cap`` the train stage multiplies each
      token's weight by ``min(p_trainer / p_sampler, tis_cap)`` (truncated importance sampling,
      detached), which is that correction applied to this loss through ``weights``.

    >>> import torch
    >>> lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    >>> loss, k1 = sampled_token_loss(lp, torch.tensor([-1.5, -1.0]))
    >>> k1.tolist(), float(loss.detach())
    ([0.5, -1.0], -0.25)
    >>> loss.backward(); lp.grad.tolist()  # -A / N = k1 / N
    [0.25, -0.5]
    """
    if student_logprobs.shape != teacher_logprobs.shape or student_logprobs.dim() != 1:
        raise ValueError(f"sampled_token_loss: student log-probs {tuple(student_logprobs.shape)} and teacher "
                         f"log-probs {tuple(teacher_logprobs.shape)} must be the same 1-d shape [N]")
    lp = student_logprobs.float()
    k1 = lp.detach() - teacher_logprobs.to(lp.device).float()
    per_token = k1 + k1 * (lp - lp.detach())  # value k1; gradient -A * grad lp with A = -k1
    if mask is not None:
        per_token = torch.where(mask.to(per_token.device), per_token, torch.zeros_like(per_token))
    return reduce_per_token(per_token, mask, weights), per_token.detach()


def divergence_and_grad(
    student_logits: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_tail_logmass: Tensor | None = None,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    backend: str = "auto",
    grad_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss [N], grad_logits [N, V], grad_norm [N])`` for analysis (no autograd graph).

    The rock-token analysis calls this: every token's own loss, the gradient of that loss wrt
    its own student logits and the gradient's L2 norm, in one call. Rows where ``mask`` is
    False get loss 0, gradient 0 and norm 0. The Triton backend returns the gradient in the
    student's dtype; the reference returns it in float32 (float64 for float64 input).
    With ``grad_out`` (an ``[N, V]`` buffer, possibly ``student_logits`` itself) the gradient is
    written there, in that buffer's dtype, and that buffer is returned: the fused linear passes
    the chunk's logits, so the gradient replaces them and no second ``[N, V]`` tensor is kept
    (the reference computes in its own buffers and then copies).
    """
    reference.check_args(kind, beta, temperature, sparse=teacher_logits is None)
    chosen = resolve_backend(backend, student_logits.device)
    if chosen == "triton":
        from .triton_divergence import triton_divergence_and_grad

        return triton_divergence_and_grad(
            student_logits.detach(),
            teacher_logits=teacher_logits,
            teacher_topk_ids=teacher_topk_ids,
            teacher_topk_logprobs=teacher_topk_logprobs,
            teacher_tail_logmass=teacher_tail_logmass,
            kind=kind,
            beta=beta,
            temperature=temperature,
            row_mask=mask,
            grad_out=grad_out,
        )
    s, t, ids, logprobs, tail = _neutralize_masked_rows(
        student_logits, teacher_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logmass, mask
    )
    loss, grad, norm = reference.per_token_divergence_and_grad(
        s,
        teacher_logits=t,
        teacher_topk_ids=ids,
        teacher_topk_logprobs=logprobs,
        teacher_tail_logmass=tail,
        kind=kind,
        beta=beta,
        temperature=temperature,
    )
    if mask is not None:
        keep = mask.to(device=loss.device, dtype=torch.bool)
        loss = torch.where(keep, loss, torch.zeros_like(loss))
        grad = torch.where(keep[:, None], grad, torch.zeros_like(grad))
        norm = torch.where(keep, norm, torch.zeros_like(norm))
    if grad_out is not None:
        grad = grad_out.copy_(grad)
    return loss, grad, norm


class DistillationLoss(torch.nn.Module):
    """Per-token distillation loss module used by the train stage (reverse KL by default).

    ``forward`` returns ``(scalar loss, per-token loss detached [N])``; see
    :func:`distillation_loss` for the arguments and the module docstring for normalization.
    """

    def __init__(
        self,
        kind: str = "reverse_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        backend: str = "auto",
    ):
        super().__init__()
        reference.check_args(kind, beta, temperature, sparse=False)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        self.kind = kind
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.backend = backend

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, beta={self.beta}, temperature={self.temperature}, "
            f"backend={self.backend!r}"
        )

    def forward(
        self,
        student_logits: Tensor,
        *,
        teacher_logits: Tensor | None = None,
        teacher_topk_ids: Tensor | None = None,
        teacher_topk_logprobs: Tensor | None = None,
        teacher_tail_logmass: Tensor | None = None,
        mask: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        return distillation_loss(
            student_logits,
            teacher_logits=teacher_logits,
            teacher_topk_ids=teacher_topk_ids,
            teacher_topk_logprobs=teacher_topk_logprobs,
            teacher_tail_logmass=teacher_tail_logmass,
            mask=mask,
            weights=weights,
            kind=self.kind,
            beta=self.beta,
            temperature=self.temperature,
            backend=self.backend,
        )

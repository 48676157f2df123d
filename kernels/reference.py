"""Plain-PyTorch reference for every per-token divergence opdflow trains with.

Why this module exists
----------------------
It is the *one* definition of the math. The tests compare the Triton kernels against it, the
benchmark times it as the naive baseline, and the CPU training path runs it. Nothing else in the
repository may re-implement these formulas. It runs on CPU and on CUDA, in float32 or float64
(bf16/fp16 inputs are upcast to float32), and is safe with ``-inf`` logits and extreme values
(|logit| ~ 1e4): no NaN appears in losses or gradients unless the divergence itself is
infinite (e.g. forward KL where the teacher puts mass on a token the student gives ``-inf``).

Notation and conventions (per token / row)
------------------------------------------
``s`` = student logits, ``t`` = teacher logits, ``T`` = temperature,
``p = softmax(s / T)`` (student), ``q = softmax(t / T)`` (teacher). Sums run over the vocabulary
(or over the K+1 categories of a sparse teacher, below). Losses are *not* multiplied by T**2;
a caller that wants the Hinton scaling multiplies itself.

* ``forward_kl``      KL(q || p) = sum q (log q - log p)
* ``reverse_kl``      KL(p || q) = sum p (log p - log q)          (the OPD default)
* ``jsd``             generalized JSD(beta), GKD convention (Agarwal et al. 2024, and TRL's
  ``GKDTrainer.generalized_jsd_loss``): with the mixture ``m = beta*q + (1-beta)*p``,
  ``JSD(beta) = beta * KL(q || m) + (1-beta) * KL(p || m)``; by definition ``beta = 0`` is
  forward KL(q || p) and ``beta = 1`` is reverse KL(p || q) (the scaled limits; the unscaled
  formula would vanish at both ends).
* ``skew_forward_kl`` DistiLLM (Ko et al. 2024) alpha-skew KL with ``alpha = beta``:
  ``KL(q || alpha*q + (1-alpha)*p)``; alpha = 0 is forward KL. DistiLLM's default is alpha = 0.1;
  this module's default ``beta = 0.5`` is the JSD default, so pass ``beta=0.1`` to match.
* ``skew_reverse_kl`` DistiLLM alpha-skew reverse KL: ``KL(p || alpha*p + (1-alpha)*q)``;
  alpha = 0 is reverse KL.
* ``tvd``             total variation ``0.5 * sum |p - q|`` (subgradient: sign(0) = 0).
* ``akl``             adaptive KL (Wu et al. 2024, "Rethinking KL divergence in knowledge
  distillation for LLMs"), with the head/tail boundary of the authors' code (LLM_KD_AKL's
  ``get_ratio``): sort the teacher's probabilities descending (stable sort), take the
  cumulative sum; the *head* is the largest category plus every category whose descending
  cumulative teacher mass is ``<= AKL_MU`` (= 0.5), the *tail* is the rest, so the category
  whose cumulative mass crosses ``AKL_MU`` is in the tail (q = [.40, .35, .25],
  p = [.20, .30, .50]: head {.40}, weights 0.4 / 0.6; an earlier version of this module put the
  crossing category in the head, 0.5 / 0.5). With ``g_head = sum_head |q - p|`` and
  ``g_tail = sum_tail |q - p|`` (both detached: constants for the gradient),
  ``AKL = g_head/(g_head+g_tail) * KL(q||p) + g_tail/(g_head+g_tail) * KL(p||q)``;
  when ``g_head + g_tail == 0`` both weights are 0.5 (the loss is 0 then anyway).
  ``beta`` is not used by ``akl``.

Sparse (top-k) teacher
----------------------
The teacher-scoring stage stores, per position, the teacher's top-k token ids and their log-probs
*under the teacher's full-vocabulary distribution*. The full teacher distribution is unknown, so
everything outside the top-k is treated as ONE tail bucket and the divergence is computed over
K + 1 categories:

* student: ``P_k = p[id_k]`` and the tail ``log P_tail = logsumexp(s[not top-k]) - logsumexp(s)``,
  computed over the student's own non-top-k logits (the student's full row is always here), so
  it has no cancellation however close ``sum_k P_k`` is to 1;
* teacher: ``Q_k = exp(logprob_k)`` and the tail log-mass ``teacher_tail_logmass`` [N] as the
  scoring stage stored it (``logsumexp(t[not top-k]) - logsumexp(t)`` from the teacher's full
  logits, ``tail_log_mass`` below). Without it (a server that returns only top-k log-probs),
  it is rebuilt as ``log(1 - sum_k Q_k)`` in float64 (``tail_from_topk``): exact in float64
  arithmetic, but a float32-stored top-k that holds all but ~1e-7 of the mass has lost the
  tail already, so that path is a fallback, named where it is used;
* each tail is floored at ``log(TAIL_FLOOR)`` (1e-12) before it enters the divergence, so an
  empty tail on one side never produces an infinite KL; below the floor the tail's gradient is
  zero.

(Before, both tails were ``max(1 - sum_k exp(logprob_k), 0)`` in float32: with the issue-16
reproducer, V = 5, q = [0.6, 0.4 - 1e-9, 3 x 1e-9/3], student uniform, that cancels, and the
loss was several nats off float64; tests/kernels/test_exact_tail.py pins the fix.)

Merging categories can only lose information, so by the data-processing inequality (all these
divergences are f-divergences) the result is a lower bound of the full-vocabulary divergence
against the true teacher; it is exact when K = V (then it equals the dense result up to float
error). Ids must be distinct within a row and lie in ``[0, V)``: ``check_topk_ids`` raises a
``ValueError`` naming the first bad row otherwise (every backend calls it; one sort of the
[N, K] ids and one host sync per call; benchmarks/bench_topk_ids.py measured it at 0.1-1.6% of
the reference loss's forward + backward on CPU, benchmarks/results/topk_id_check.jsonl). A
padded top-k slot may carry a ``-inf`` log-prob (it then has zero teacher mass). A
temperature other than 1.0 is rejected for a sparse teacher (``ValueError``): the stored log-probs cannot be re-tempered without the full
vocabulary. The gradient with respect to the student logits is exact for this K+1-category loss
(the tail's share is distributed over the tail tokens in proportion to ``p``).

Run the tests with ``python -m pytest -q tests/kernels``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "akl")
TAIL_FLOOR = 1e-12
AKL_MU = 0.5

__all__ = [
    "KINDS",
    "TAIL_FLOOR",
    "AKL_MU",
    "per_token_divergence",
    "per_token_divergence_and_grad",
    "category_log_probs",
    "divergence_from_log_probs",
    "akl_weights",
    "check_args",
    "check_topk_ids",
    "tail_log_mass",
    "tail_from_topk",
    "token_logprobs",
    "check_token_ids",
]


def check_args(kind: str, beta: float, temperature: float, sparse: bool) -> None:
    """Validate the divergence hyper-parameters (shared by every backend)."""
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if sparse and float(temperature) != 1.0:
        raise ValueError(
            "a sparse (top-k) teacher requires temperature == 1.0: the stored teacher log-probs "
            "cannot be re-tempered without the full vocabulary"
        )


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _xlogratio(log_w: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """Elementwise ``w * (log_a - log_b)`` with ``w = exp(log_w)`` and 0 wherever ``w == 0``.

    The logs are zeroed where ``w == 0`` *before* the arithmetic so that neither the value nor
    the autograd backward ever sees ``0 * inf``.
    """
    w = torch.exp(log_w)
    dead = w == 0
    a = torch.where(dead, torch.zeros_like(log_a), log_a)
    b = torch.where(dead, torch.zeros_like(log_b), log_b)
    return torch.where(dead, torch.zeros_like(w), w * (a - b))


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(weight_a * exp(log_a) + (1 - weight_a) * exp(log_b))``, NaN-free incl. gradients."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    a = log_a + math.log(weight_a)
    b = log_b + math.log1p(-weight_a)
    both_dead = (a == -math.inf) & (b == -math.inf)
    a = torch.where(both_dead, torch.zeros_like(a), a)
    b = torch.where(both_dead, torch.zeros_like(b), b)
    out = torch.logaddexp(a, b)
    return torch.where(both_dead, torch.full_like(out, -math.inf), out)


def _kl(log_x: Tensor, log_y: Tensor) -> Tensor:
    """KL(x || y) over the last dim from log-probabilities."""
    return _xlogratio(log_x, log_x, log_y).sum(-1)


def akl_weights(log_p: Tensor, log_q: Tensor, mu: float = AKL_MU) -> tuple[Tensor, Tensor]:
    """AKL's detached (head, tail) weights per row, see the module docstring."""
    with torch.no_grad():
        p = torch.exp(log_p)
        q = torch.exp(log_q)
        q_sorted, order = torch.sort(q, dim=-1, descending=True, stable=True)
        gap = (q_sorted - torch.gather(p, -1, order)).abs()
        tail = torch.cumsum(q_sorted, dim=-1) > mu  # the crossing category is in the tail
        tail[..., 0] = False  # the teacher's largest category is always head
        g_tail = torch.where(tail, gap, torch.zeros_like(gap)).sum(-1)
        g_head = torch.where(tail, torch.zeros_like(gap), gap).sum(-1)
        total = g_head + g_tail
        ok = total > 0
        safe = torch.where(ok, total, torch.ones_like(total))
        half = torch.full_like(total, 0.5)
        return torch.where(ok, g_head / safe, half), torch.where(ok, g_tail / safe, half)


def divergence_from_log_probs(log_p: Tensor, log_q: Tensor, kind: str, beta: float) -> Tensor:
    """Per-row divergence between student log-probs ``log_p`` and teacher log-probs ``log_q``.

    Both are ``[N, C]`` normalized log-distributions over the same C categories (C = V for a
    dense teacher, K + 1 for a sparse one). Differentiable wrt ``log_p``.
    """
    if kind == "forward_kl":
        return _kl(log_q, log_p)
    if kind == "reverse_kl":
        return _kl(log_p, log_q)
    if kind == "jsd":
        if beta <= 0.0:
            return _kl(log_q, log_p)
        if beta >= 1.0:
            return _kl(log_p, log_q)
        log_m = _log_mix(log_q, log_p, beta)
        return beta * _kl(log_q, log_m) + (1.0 - beta) * _kl(log_p, log_m)
    if kind == "skew_forward_kl":
        return _kl(log_q, _log_mix(log_q, log_p, beta))
    if kind == "skew_reverse_kl":
        return _kl(log_p, _log_mix(log_p, log_q, beta))
    if kind == "tvd":
        return 0.5 * (torch.exp(log_p) - torch.exp(log_q)).abs().sum(-1)
    if kind == "akl":
        w_head, w_tail = akl_weights(log_p, log_q)
        return w_head * _kl(log_q, log_p) + w_tail * _kl(log_p, log_q)
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")


LOG_TAIL_FLOOR = math.log(TAIL_FLOOR)


def check_topk_ids(ids: Tensor, vocab: int, already_sorted: bool = False) -> None:
    """Raise ``ValueError`` unless every row of ``ids`` [N, K] holds distinct ids in ``[0, vocab)``.

    One sort of [N, K] (none when the caller has sorted each row: the Triton path sorts anyway)
    and one host sync (the ``.item()`` that decides whether to raise): a bad id would otherwise
    read outside the student's row (Triton) or fail far away with an index error (torch).
    """
    if ids.device.type == "meta":  # shape-only tracing (the benchmark's memory count): no values to check
        return
    srt = ids.long() if already_sorted else torch.sort(ids.long(), dim=-1).values
    if srt.numel() == 0:
        return
    bad = (srt[:, 0] < 0) | (srt[:, -1] >= vocab)
    if srt.shape[1] > 1:
        bad = bad | (srt[:, 1:] == srt[:, :-1]).any(-1)
    if bool(bad.any().item()):  # host sync: the error must be raised before any kernel reads
        row = int(bad.nonzero()[0, 0])
        r = srt[row]
        if int(r[0]) < 0 or int(r[-1]) >= vocab:
            raise ValueError(f"teacher top-k ids out of range in row {row}: ids span [{int(r[0])}, {int(r[-1])}] "
                             f"but the student's vocabulary is [0, {vocab}) (a padded or foreign vocabulary?)")
        dup = int(r[1:][r[1:] == r[:-1]][0])
        raise ValueError(f"teacher top-k ids repeat in row {row}: id {dup} appears more than once")


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends (Maechler 2012)."""
    x = x.clamp_max(0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@torch.no_grad()
def tail_log_mass(logits: Tensor, ids: Tensor) -> Tensor:
    """``log sum_{j not in ids} softmax(logits)_j`` [N] without cancellation, in float32 (float64
    for float64 input): logsumexp over the non-top-k logits minus the full logsumexp. ``-inf``
    when the ids cover every non-(-inf) logit."""
    x = logits.to(_compute_dtype(logits))
    rest = x.scatter(-1, ids.long(), -math.inf)
    return torch.logsumexp(rest, -1) - torch.logsumexp(x, -1)


@torch.no_grad()
def tail_from_topk(log_probs_topk: Tensor) -> Tensor:
    """The fallback tail log-mass ``log(1 - sum_k exp(logprob_k))`` [N], in float64 (see the
    module docstring: it cannot recover a tail the float32 top-k has already rounded away)."""
    lse = torch.logsumexp(log_probs_topk.double(), -1)
    return _log1mexp(lse).to(_compute_dtype(log_probs_topk))


def _student_log_tail(log_p: Tensor, ids: Tensor) -> Tensor:
    """The student's tail log-mass [N, 1] over its non-top-k log-probs, differentiable, NaN-free
    (an empty tail is replaced by the dtype's smallest value before logsumexp, so neither the
    value nor the backward sees ``-inf - -inf``)."""
    rest = log_p.scatter(-1, ids, -math.inf)
    rest = torch.where(torch.isneginf(rest), torch.full_like(rest, torch.finfo(rest.dtype).min), rest)
    return torch.logsumexp(rest, -1, keepdim=True).clamp_min(LOG_TAIL_FLOOR)


def category_log_probs(
    student_logits: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_tail_logmass: Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Return ``(log_p, log_q)`` over the categories the divergence is computed on.

    Dense teacher: the V vocabulary entries, both tempered by ``temperature``.
    Sparse teacher: the K top-k ids followed by the tail bucket (K + 1 categories); the
    teacher's tail is ``teacher_tail_logmass`` [N] when given, else ``tail_from_topk``.
    Computation dtype is float64 for float64 input, else float32.
    """
    dense = teacher_logits is not None
    sparse = teacher_topk_ids is not None or teacher_topk_logprobs is not None
    if dense == sparse:
        raise ValueError(
            "give exactly one teacher: teacher_logits, or teacher_topk_ids + teacher_topk_logprobs"
        )
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got shape {tuple(student_logits.shape)}")
    dtype = _compute_dtype(student_logits)
    s = student_logits.to(dtype)
    if dense:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits shape {tuple(teacher_logits.shape)} != student "
                f"{tuple(student_logits.shape)}"
            )
        t = teacher_logits.to(dtype)
        if temperature != 1.0:
            s = s / temperature
            t = t / temperature
        return torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    if teacher_topk_ids is None or teacher_topk_logprobs is None:
        raise ValueError("a sparse teacher needs both teacher_topk_ids and teacher_topk_logprobs")
    if temperature != 1.0:
        check_args("reverse_kl", 0.0, temperature, sparse=True)
    ids = teacher_topk_ids.long()
    if ids.shape != teacher_topk_logprobs.shape or ids.shape[0] != s.shape[0]:
        raise ValueError(
            f"top-k ids {tuple(ids.shape)} / logprobs {tuple(teacher_topk_logprobs.shape)} "
            f"do not match student rows {s.shape[0]}"
        )
    check_topk_ids(ids, s.shape[1])
    log_p_full = torch.log_softmax(s, -1)
    log_p_k = torch.gather(log_p_full, -1, ids)
    log_q_k = teacher_topk_logprobs.to(dtype)
    if teacher_tail_logmass is None:
        q_tail = tail_from_topk(log_q_k)
    else:
        q_tail = teacher_tail_logmass.detach().reshape(-1).to(device=s.device, dtype=dtype)
        if q_tail.shape[0] != s.shape[0]:
            raise ValueError(f"teacher_tail_logmass has {q_tail.shape[0]} rows, student {s.shape[0]}")
    log_p = torch.cat([log_p_k, _student_log_tail(log_p_full, ids)], dim=-1)
    log_q = torch.cat([log_q_k, q_tail.clamp_min(LOG_TAIL_FLOOR)[:, None]], dim=-1)
    return log_p, log_q


def per_token_divergence(
    student_logits: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_tail_logmass: Tensor | None = None,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Per-token divergence ``[N]`` (autograd-differentiable wrt ``student_logits``).

    Output dtype is float64 for float64 student logits, else float32. The teacher never
    receives a gradient (it is a target).

    >>> import torch
    >>> s = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    >>> t = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    >>> round(float(per_token_divergence(s, teacher_logits=t, kind="reverse_kl")[0]), 6)
    0.173287
    """
    check_args(kind, beta, temperature, sparse=teacher_logits is None)
    if teacher_logits is not None:
        teacher_logits = teacher_logits.detach()
    if teacher_topk_logprobs is not None:
        teacher_topk_logprobs = teacher_topk_logprobs.detach()
    log_p, log_q = category_log_probs(
        student_logits,
        teacher_logits=teacher_logits,
        teacher_topk_ids=teacher_topk_ids,
        teacher_topk_logprobs=teacher_topk_logprobs,
        teacher_tail_logmass=teacher_tail_logmass,
        temperature=temperature,
    )
    return divergence_from_log_probs(log_p, log_q, kind, float(beta))


def per_token_divergence_and_grad(
    student_logits: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_tail_logmass: Tensor | None = None,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss [N], grad_logits [N, V], grad_norm [N])`` without keeping an autograd graph.

    ``grad_logits[i]`` is the gradient of row i's own loss wrt row i's student logits (rows are
    independent, so it is the gradient of ``loss.sum()``); ``grad_norm[i]`` is its L2 norm.
    Both are in the computation dtype (float64 for float64 input, else float32).
    """
    if kind == "reverse_kl" and teacher_logits is not None:
        return dense_reverse_kl_and_grad(student_logits, teacher_logits, temperature)
    with torch.enable_grad():
        s = student_logits.detach().to(_compute_dtype(student_logits)).requires_grad_(True)
        loss = per_token_divergence(
            s,
            teacher_logits=teacher_logits,
            teacher_topk_ids=teacher_topk_ids,
            teacher_topk_logprobs=teacher_topk_logprobs,
            teacher_tail_logmass=teacher_tail_logmass,
            kind=kind,
            beta=beta,
            temperature=temperature,
        )
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss.sum(), s)
        else:  # e.g. a skew KL with alpha = 1 is identically 0 and ignores the student
            grad = torch.zeros_like(s)
    return loss.detach(), grad, torch.linalg.vector_norm(grad, dim=-1)


@torch.no_grad()
def dense_reverse_kl_and_grad(student_logits: Tensor, teacher_logits: Tensor,
                              temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Reverse KL against a dense teacher and its gradient in closed form: with p = softmax(s/T),
    q = softmax(t/T) and d = log p - log q, ``KL = sum p d`` and ``dKL/ds = p (d - KL) / T``.

    The same values as autograd through ``per_token_divergence`` (tests/kernels compare them in
    float64), with no graph and about a third of the [N, V] passes: the rock analysis calls this
    per chunk at V = 152k on CPU, where autograd's passes were most of its cost. Categories with
    p = 0 contribute 0 (as ``_xlogratio``), so -inf logits are safe on both sides."""
    check_args("reverse_kl", 0.0, temperature, sparse=False)
    if teacher_logits.shape != student_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"student [N, V] and teacher logits of one shape, got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    dtype = _compute_dtype(student_logits)
    s, t = student_logits.detach().to(dtype), teacher_logits.detach().to(dtype)
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    log_p = torch.log_softmax(s, -1)
    d = torch.log_softmax(t, -1)
    torch.sub(log_p, d, out=d)  # d = log p - log q, in the teacher's buffer
    p = log_p.exp_()  # p, in log_p's buffer
    loss = torch.bmm(p.unsqueeze(1), d.unsqueeze(2)).reshape(-1)  # row-wise sum p d, no [N, V] temporary
    bad = ~torch.isfinite(loss)  # 0 * -inf where p = 0: redo those rows only (rare: masked logits)
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(-1)
        d_bad = d[rows].masked_fill_(p[rows] == 0, 0.0)
        d[rows] = d_bad
        loss[rows] = (p[rows] * d_bad).sum(-1)
    grad = d.sub_(loss[:, None]).mul_(p)
    if temperature != 1.0:
        grad.div_(temperature)
    return loss, grad, torch.linalg.vector_norm(grad, dim=-1)


@torch.no_grad()
def check_token_ids(tokens: Tensor, width: int) -> None:
    """Fail when a token id is at or beyond ``width`` columns of logits: the tokenizer's size once
    padded lm_head rows are cut off, so such an id is a sampled padded row."""
    if tokens.numel() and int(tokens.max()) >= width:
        raise ValueError(f"a response token id {int(tokens.max())} is beyond the vocabulary ({width} ids): "
                         "the rollout sampled a padded lm_head row")


def token_logprobs(logits: Tensor, tokens: Tensor, chunk: int | None = None) -> Tensor:
    """``log_softmax(logits)[i, tokens[i]]`` in float32, ``chunk`` rows at a time when given (so a
    large vocabulary never needs a full float32 copy of the logits). The one teacher-forced
    log-prob: scoring, the trainer and the fused loss call it; it keeps the graph when the
    logits carry one (callers that want none run it under ``no_grad``). A token id outside the
    columns fails (a padded lm_head row cut off, or a bad id), with one host sync."""
    check_token_ids(tokens, logits.shape[-1])
    step = chunk or max(1, logits.shape[0])
    out = [logits[lo:lo + step].float().log_softmax(-1).gather(-1, tokens[lo:lo + step, None]).squeeze(-1)
           for lo in range(0, logits.shape[0], step)]
    return torch.cat(out) if out else torch.zeros(0, device=logits.device)

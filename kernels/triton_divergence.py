"""Triton kernels: per-token divergence, its gradient wrt the student logits, and the grad norm.

Why this module exists
----------------------
A naive PyTorch distillation loss materializes several N x V tensors (two softmaxes, their logs,
a JSD mixture, the gradient) and reduces to a scalar, so the rock-token analysis would need a
second pass for per-token losses and gradient norms. Here one Triton program handles one token
(row): it streams the vocabulary in ``BLOCK`` chunks with an online (running-max) softmax, so
any V works, and writes, per row, the loss, the gradient wrt the student logits (into a
preallocated buffer, which may be the logits tensor itself) and that gradient's L2 norm. The
math is ``reference.py``'s; the tests check this module against it.

Gradient identity used: every divergence here is a sum over categories of ``f(p_j, q_j)``, so
with ``h_j = p_j * df/dp_j`` (a per-element expression, written NaN-free) and ``H = sum_j h_j``
the gradient wrt the logits is ``(h_j - p_j * H) / T``.

Passes over the row (reads of the student and, if dense, the teacher logits):
* A: online max / sum-exp for student and teacher; for reverse KL (and AKL) also the running
  ``sum_j exp(s_j - m)(s_j - t_j)``, which gives ``H = KL(p||q) + 1`` without another pass;
  forward KL has ``H = -1`` exactly.
* B: only for JSD, skew KLs and TVD, whose ``H`` is not an online-computable sum: ``H``.
* C: loss, gradient store, and the squared-norm accumulation.
So forward/reverse KL and AKL read each input twice, the others three times; the gradient is
written once.

Schedules (a design intent, not a measured figure: no session has had a GPU). The issue's
bandwidth target counts each logit read once; a plain two-pass kernel moves 10 B/elem in bf16
instead of 6 unless its later passes hit L2. A bf16 row at V = 151936 is 608 KB (student +
teacher) and ~130 rows are in flight on an H100, more than its 50 MB L2 holds, so a later pass
that starts where the previous one started finds its chunks evicted. Each pass therefore runs
in the opposite direction to the one before (A forwards, B backwards, C forwards after B or
backwards after A), so it begins with the chunks just read; passes that read a chunk again
later load with ``evict_last``, the final pass loads and stores the gradient with
``evict_first`` so the streamed gradient does not push the rows out. That is the default
``schedule="row"``, one program per row.

``schedule="pipelined"`` (dense teacher, opt-in until a GPU run shows it faster) bounds the
distance between a row's two reads instead: each row is split into spans of ``split_chunks``
chunks, one program per (phase, row, span), and rows go in groups of ``rows_per_group``. Phase 0
writes each span's partial statistics (max, sum-exp, the reverse-KL sum) to a workspace and
counts the span done; the next phase combines a row's spans and, for the two-pass kinds, writes
the gradient (three-pass kinds add a phase for ``H``). Programs take a ticket (an atomic
counter) and slot k of tickets holds phase 0 of group k, then phase 1 of group k - 1: a row is
re-read two to three groups' traffic after its first read (a group is 16 rows x 608 KB ~ 10 MB
at V = 151936, so ~20-30 MB), inside an H100's 50 MB L2. ``rows_per_group`` and the chunk
sizes are the knobs a GPU run should sweep. A phase waits (acquire load in a loop) only on
the previous phase of its own row, whose tickets are smaller and so already held by running
programs: it cannot deadlock whatever order the hardware starts programs in. Per-span loss and
squared norm are summed on the host (``[N, spans]``, deterministic). Under ``TRITON_INTERPRET=1`` programs run in ticket
order, so the tests check the mapping and the cross-program reduction; the sm_90 compile test
checks the atomics lower to ``ld.acquire`` / a release ``red`` or ``atom`` add.

Sparse top-k teacher (see ``reference.py`` for the K + 1 category definition): pass A computes
the student's log-sum-exp over the row and over its non-top-k columns (the student's tail
log-mass, exact, instead of ``1 - sum_k p_k``), the K gathered student logits give the category
terms and ``H``, the teacher's tail log-mass comes from the scorer (``teacher_tail_logmass``,
or ``reference.tail_from_topk`` without it), and in pass C each tail token gets
``p_j * (df/dP_tail - H)``. The ids are sorted per row on the host (N x K, cheap) and checked
(``reference.check_topk_ids``: distinct, in ``[0, V)``; one host sync) so each vocab chunk finds
its top-k members with a short loop over the ids falling inside it (no N x V membership mask).

AKL's head/tail weights need a sort of the teacher distribution; they are computed with torch
(``reference.akl_weights``, detached, in blocks of rows so its temporaries stay ~1.4 GB) and
passed to the kernel as per-row weights: correct but not fused, so AKL costs an extra
full-vocab torch pass.

All arithmetic is float32 whatever the input dtype (fp32, bf16, fp16; fp64 is computed in fp32);
the gradient is stored in the buffer's dtype (default: the student logits' dtype).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference

__all__ = [
    "TritonDivergence",
    "triton_divergence_and_grad",
    "triton_per_token_divergence",
    "default_block_size",
]

SCHEDULES = ("row", "pipelined")

# Kind codes shared by host and kernels.
_FKL, _RKL, _JSD, _SFKL, _SRKL, _TVD, _AKL, _ZERO = range(8)


@triton.jit
def _xlogratio(w, log_a, log_b):
    return tl.where(w > 0, w * (log_a - log_b), 0.0)


@triton.jit
def _log_mix(log_a, log_b, log_wa, log_wb):
    a = log_a + log_wa
    b = log_b + log_wb
    mx = tl.maximum(a, b)
    mx_safe = tl.where(mx == -float("inf"), 0.0, mx)
    out = mx_safe + tl.log(tl.exp(a - mx_safe) + tl.exp(b - mx_safe))
    return tl.where(mx == -float("inf"), -float("inf"), out)


@triton.jit
def _terms(logp, logq, beta, log_b, log_1mb, w_head, w_tail, KIND: tl.constexpr):
    """Per-element loss term f and h = p * df/dp (see the module docstring)."""
    p = tl.exp(logp)
    q = tl.exp(logq)
    if KIND == 0:  # forward KL(q || p)
        f = _xlogratio(q, logq, logp)
        h = -q
    elif KIND == 1:  # reverse KL(p || q)
        f = _xlogratio(p, logp, logq)
        h = tl.where(p > 0, p * (logp - logq + 1.0), 0.0)
    elif KIND == 2:  # JSD(beta), m = beta q + (1 - beta) p
        logm = _log_mix(logq, logp, log_b, log_1mb)
        kl_pm = _xlogratio(p, logp, logm)
        f = beta * _xlogratio(q, logq, logm) + (1.0 - beta) * kl_pm
        h = (1.0 - beta) * kl_pm
    elif KIND == 3:  # skew forward KL(q || a q + (1 - a) p)
        logm = _log_mix(logq, logp, log_b, log_1mb)
        f = _xlogratio(q, logq, logm)
        h = -(1.0 - beta) * tl.where(q > 0, q * tl.exp(logp - logm), 0.0)
    elif KIND == 4:  # skew reverse KL(p || a p + (1 - a) q)
        logm = _log_mix(logp, logq, log_b, log_1mb)
        f = _xlogratio(p, logp, logm)
        r = tl.exp(logp - logm)
        h = tl.where(p > 0, p * (logp - logm + 1.0 - beta * r), 0.0)
    elif KIND == 5:  # total variation
        d = p - q
        f = 0.5 * tl.abs(d)
        sgn = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        h = 0.5 * p * sgn
    elif KIND == 6:  # AKL with per-row weights
        f = w_head * _xlogratio(q, logq, logp) + w_tail * _xlogratio(p, logp, logq)
        h = -w_head * q + w_tail * tl.where(p > 0, p * (logp - logq + 1.0), 0.0)
    else:  # identically zero (skew KL with alpha = 1)
        f = p * 0.0
        h = p * 0.0
    return f, h


@triton.jit
def _online_update(m, z, x):
    m_new = tl.maximum(m, x)
    alpha = tl.where(m_new == -float("inf"), 0.0, tl.exp(m - m_new))
    e = tl.where(x == -float("inf"), 0.0, tl.exp(x - m_new))
    return m_new, alpha, e


@triton.jit
def _load_pair(s_row, t_row, offs, inb, inv_temp, EVICT: tl.constexpr):
    x = tl.load(s_row + offs, mask=inb, other=-float("inf"), eviction_policy=EVICT)
    y = tl.load(t_row + offs, mask=inb, other=-float("inf"), eviction_policy=EVICT)
    return x.to(tl.float32) * inv_temp, y.to(tl.float32) * inv_temp


@triton.jit
def _stats_chunk(s_row, t_row, offs, V, inv_temp, m_s, z_s, m_t, z_t, acc, KIND: tl.constexpr):
    """One chunk of pass A: online sum-exps of student and teacher (+ the reverse-KL sum)."""
    x, y = _load_pair(s_row, t_row, offs, offs < V, inv_temp, "evict_last")
    m_s, alpha_s, e_s = _online_update(m_s, z_s, x)
    z_s = z_s * alpha_s + e_s
    m_t, alpha_t, e_t = _online_update(m_t, z_t, y)
    z_t = z_t * alpha_t + e_t
    if KIND == 1 or KIND == 6:
        acc = acc * alpha_s + tl.where(e_s > 0, e_s * (x - y), 0.0)
    return m_s, z_s, m_t, z_t, acc


@triton.jit
def _h_chunk(s_row, t_row, offs, V, inv_temp, lse_s, lse_t, beta, log_b, log_1mb, w_head, w_tail,
             KIND: tl.constexpr):
    """One chunk of pass B: the chunk's h terms (their row sum is H)."""
    inb = offs < V
    x, y = _load_pair(s_row, t_row, offs, inb, inv_temp, "evict_last")
    _f, h = _terms(x - lse_s, y - lse_t, beta, log_b, log_1mb, w_head, w_tail, KIND)
    return tl.where(inb, h, 0.0)


@triton.jit
def _grad_chunk(s_row, t_row, g_row, offs, V, inv_temp, lse_s, lse_t, big_h, beta, log_b, log_1mb,
                w_head, w_tail, KIND: tl.constexpr):
    """One chunk of pass C: stores the gradient; returns the chunk's loss terms and squared grads."""
    inb = offs < V
    x, y = _load_pair(s_row, t_row, offs, inb, inv_temp, "evict_first")
    logp = x - lse_s
    f, h = _terms(logp, y - lse_t, beta, log_b, log_1mb, w_head, w_tail, KIND)
    g = tl.where(inb, (h - tl.exp(logp) * big_h) * inv_temp, 0.0)
    tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=inb, eviction_policy="evict_first")
    return tl.where(inb, f, 0.0), g * g


@triton.jit
def _reduce_lanes(m, z):
    """(max, sum-exp relative to it, per-lane scale) of online-softmax accumulators (lanes or spans)."""
    mx = tl.max(m, axis=0)
    scale = tl.where(m == -float("inf"), 0.0, tl.exp(m - mx))
    return mx, tl.sum(z * scale, axis=0), scale


@triton.jit
def _finish_lse(m, z):
    mx, zsum, scale = _reduce_lanes(m, z)
    return mx + tl.log(zsum), scale


@triton.jit
def _lse_and_rkl(m_s, z_s, m_t, z_t, acc):
    """Row log-sum-exps and ``KL(p||q) + 1`` from partial online accumulators (lanes or spans)."""
    lse_s, scale_s = _finish_lse(m_s, z_s)
    lse_t, _scale_t = _finish_lse(m_t, z_t)
    rkl_plus_1 = tl.sum(acc * scale_s, axis=0) / tl.sum(z_s * scale_s, axis=0) - lse_s + lse_t + 1.0
    return lse_s, lse_t, rkl_plus_1


@triton.jit
def _two_pass_h(rkl_plus_1, w_head, w_tail, KIND: tl.constexpr):
    """``H = sum_j h_j`` for the kinds whose H needs no extra pass (forward KL, reverse KL, AKL)."""
    if KIND == 0:
        big_h = -1.0
    elif KIND == 1:
        big_h = rkl_plus_1
    else:
        big_h = -w_head + w_tail * rkl_plus_1
    return big_h


@triton.jit
def _dense_kernel(
    S, T, G, LOSS, NORM, ROW_MASK, W_HEAD, W_TAIL,
    stride_s, stride_t, stride_g, V,
    inv_temp, beta, log_b, log_1mb,
    KIND: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, LAST_REVERSED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n_chunks = tl.cdiv(V, BLOCK)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    g_row = G + row * stride_g
    cols = tl.arange(0, BLOCK)
    keep = True
    if HAS_MASK:
        keep = tl.load(ROW_MASK + row) != 0
    if keep:
        w_head = 0.0
        w_tail = 0.0
        if KIND == 6:
            w_head = tl.load(W_HEAD + row)
            w_tail = tl.load(W_TAIL + row)
        # Pass A: online log-sum-exp of student and teacher (+ reverse-KL accumulator).
        m_s = tl.full([BLOCK], -float("inf"), tl.float32)
        z_s = tl.zeros([BLOCK], tl.float32)
        m_t = tl.full([BLOCK], -float("inf"), tl.float32)
        z_t = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            m_s, z_s, m_t, z_t, acc = _stats_chunk(s_row, t_row, start + cols, V, inv_temp,
                                                   m_s, z_s, m_t, z_t, acc, KIND)
        lse_s, lse_t, rkl_plus_1 = _lse_and_rkl(m_s, z_s, m_t, z_t, acc)
        # H = sum_j h_j.
        if KIND == 0 or KIND == 1 or KIND == 6:
            big_h = _two_pass_h(rkl_plus_1, w_head, w_tail, KIND)
        else:
            # Pass B: H is not an online sum for these kinds.
            hacc = tl.zeros([BLOCK], tl.float32)
            for i in range(0, n_chunks):
                hacc += _h_chunk(s_row, t_row, (n_chunks - 1 - i) * BLOCK + cols, V, inv_temp,
                                 lse_s, lse_t, beta, log_b, log_1mb, w_head, w_tail, KIND)
            big_h = tl.sum(hacc, axis=0)
        # Pass C: loss, gradient, squared norm.
        facc = tl.zeros([BLOCK], tl.float32)
        nacc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, n_chunks):
            if LAST_REVERSED:
                offs = (n_chunks - 1 - i) * BLOCK + cols
            else:
                offs = i * BLOCK + cols
            f, g2 = _grad_chunk(s_row, t_row, g_row, offs, V, inv_temp, lse_s, lse_t, big_h,
                                beta, log_b, log_1mb, w_head, w_tail, KIND)
            facc += f
            nacc += g2
        tl.store(LOSS + row, tl.sum(facc, axis=0))
        tl.store(NORM + row, tl.sqrt(tl.sum(nacc, axis=0)))
    else:
        for start in range(0, V, BLOCK):
            offs = start + cols
            tl.store(g_row + offs, tl.zeros([BLOCK], tl.float32).to(G.dtype.element_ty), mask=offs < V)
        tl.store(LOSS + row, 0.0)
        tl.store(NORM + row, 0.0)


@triton.jit
def _chunk_members(ids_row, lps_row, ids, kin, start, offs, BLOCK: tl.constexpr):
    """Which columns of the chunk at ``start`` are top-k ids (ids sorted), and their teacher
    log-probs (``-inf`` elsewhere)."""
    lo = tl.sum((kin & (ids < start)).to(tl.int32), axis=0)
    hi = tl.sum((kin & (ids < start + BLOCK)).to(tl.int32), axis=0)
    member = offs < 0
    logq = tl.full([BLOCK], -float("inf"), tl.float32)
    for j in range(lo, hi):
        idj = tl.load(ids_row + j)
        hit = offs == idj
        member = member | hit
        logq = tl.where(hit, tl.load(lps_row + j).to(tl.float32), logq)
    return member, logq


@triton.jit
def _sparse_kernel(
    S, IDS, LPS, TAIL, G, LOSS, NORM, ROW_MASK, W_HEAD, W_TAIL,
    stride_s, stride_ids, stride_lps, stride_g, V, K,
    beta, log_b, log_1mb, log_tail_floor,
    KIND: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n_chunks = tl.cdiv(V, BLOCK)
    s_row = S + row * stride_s
    ids_row = IDS + row * stride_ids
    lps_row = LPS + row * stride_lps
    g_row = G + row * stride_g
    cols = tl.arange(0, BLOCK)
    keep = True
    if HAS_MASK:
        keep = tl.load(ROW_MASK + row) != 0
    if keep:
        w_head = 0.0
        w_tail = 0.0
        if KIND == 6:
            w_head = tl.load(W_HEAD + row)
            w_tail = tl.load(W_TAIL + row)
        kk = tl.arange(0, BLOCK_K)
        kin = kk < K
        ids = tl.load(ids_row + kk, mask=kin, other=0)
        # Pass A: student log-sum-exp over the row and over its non-top-k columns (the tail's
        # log-mass without cancellation, see reference.py).
        m_s = tl.full([BLOCK], -float("inf"), tl.float32)
        z_s = tl.zeros([BLOCK], tl.float32)
        m_r = tl.full([BLOCK], -float("inf"), tl.float32)
        z_r = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + cols
            x = tl.load(s_row + offs, mask=offs < V, other=-float("inf"),
                        eviction_policy="evict_last").to(tl.float32)
            m_s, alpha_s, e_s = _online_update(m_s, z_s, x)
            z_s = z_s * alpha_s + e_s
            member, _lq = _chunk_members(ids_row, lps_row, ids, kin, start, offs, BLOCK)
            xr = tl.where(member, -float("inf"), x)
            m_r, alpha_r, e_r = _online_update(m_r, z_r, xr)
            z_r = z_r * alpha_r + e_r
        lse_s, _scale = _finish_lse(m_s, z_s)
        lse_r, _scale_r = _finish_lse(m_r, z_r)
        # The K + 1 categories.
        logq_k = tl.load(lps_row + kk, mask=kin, other=-float("inf")).to(tl.float32)
        logp_k = tl.load(s_row + ids, mask=kin, other=-float("inf")).to(tl.float32) - lse_s
        f_k, h_k = _terms(logp_k, logq_k, beta, log_b, log_1mb, w_head, w_tail, KIND)
        f_k = tl.where(kin, f_k, 0.0)
        h_k = tl.where(kin, h_k, 0.0)
        logp_tail = lse_r - lse_s  # -inf when the top-k covers the row
        logp_floor = tl.maximum(logp_tail, log_tail_floor)
        logq_floor = tl.maximum(tl.load(TAIL + row).to(tl.float32), log_tail_floor)
        f_tail, h_tail = _terms(logp_floor, logq_floor, beta, log_b, log_1mb, w_head, w_tail, KIND)
        h_tail = tl.where(logp_tail > log_tail_floor, h_tail, 0.0)
        g_tail = h_tail * tl.exp(-logp_floor)  # d f / d P_tail
        big_h = tl.sum(h_k, axis=0) + h_tail
        tl.store(LOSS + row, tl.sum(f_k, axis=0) + f_tail)
        # Pass C: gradient; ids are sorted, so the members of a chunk are ids[lo:hi].
        nacc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, n_chunks):
            start = (n_chunks - 1 - i) * BLOCK
            offs = start + cols
            inb = offs < V
            x = tl.load(s_row + offs, mask=inb, other=-float("inf"),
                        eviction_policy="evict_first").to(tl.float32)
            logp = x - lse_s
            p = tl.exp(logp)
            member, logq = _chunk_members(ids_row, lps_row, ids, kin, start, offs, BLOCK)
            _f, h = _terms(logp, logq, beta, log_b, log_1mb, w_head, w_tail, KIND)
            h = tl.where(member, h, p * g_tail)
            g = tl.where(inb, h - p * big_h, 0.0)
            nacc += g * g
            tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=inb, eviction_policy="evict_first")
        tl.store(NORM + row, tl.sqrt(tl.sum(nacc, axis=0)))
    else:
        for start in range(0, V, BLOCK):
            offs = start + cols
            tl.store(g_row + offs, tl.zeros([BLOCK], tl.float32).to(G.dtype.element_ty), mask=offs < V)
        tl.store(LOSS + row, 0.0)
        tl.store(NORM + row, 0.0)


# --- Pipelined schedule (opt-in, unmeasured): rows split over programs, passes pipelined so a
# row's second read comes from L2. See the module docstring, "Schedules".

_WS_FIELDS = 8  # per (row, split): m_s, z_s, m_t, z_t, rkl acc, H part, loss part, norm^2 part


@triton.jit
def _combine_splits(ws_row, n_splits, S_BLOCK: tl.constexpr):
    """Row log-sum-exps and ``KL(p||q) + 1`` from the splits' partial statistics (read via L2)."""
    jj = tl.arange(0, S_BLOCK)
    ok = jj < n_splits
    p = ws_row + jj * 8
    m_s = tl.load(p + 0, mask=ok, other=-float("inf"), cache_modifier=".cg")
    z_s = tl.load(p + 1, mask=ok, other=0.0, cache_modifier=".cg")
    m_t = tl.load(p + 2, mask=ok, other=-float("inf"), cache_modifier=".cg")
    z_t = tl.load(p + 3, mask=ok, other=0.0, cache_modifier=".cg")
    acc = tl.load(p + 4, mask=ok, other=0.0, cache_modifier=".cg")
    return _lse_and_rkl(m_s, z_s, m_t, z_t, acc)


@triton.jit
def _pipelined_dense_kernel(
    S, T, G, WS, DONE, TICKET, ROW_MASK, W_HEAD, W_TAIL,
    stride_s, stride_t, stride_g, N, V, n_splits, n_groups,
    inv_temp, beta, log_b, log_1mb,
    KIND: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, SPLIT_CHUNKS: tl.constexpr,
    ROWS: tl.constexpr, PHASES: tl.constexpr, S_BLOCK: tl.constexpr,
):
    # Work items are numbered by a ticket taken at start, so an item only ever waits for items
    # with smaller tickets, which running programs already hold: no deadlock, whatever order
    # the hardware launches programs in. Slot k holds phase 0 of row group k, phase 1 of group
    # k - 1 (and phase 2 of group k - 2): a group is re-read two to three groups' traffic after
    # its first read.
    ticket = tl.atomic_add(TICKET, 1)
    per_phase = ROWS * n_splits
    slot = ticket // (PHASES * per_phase)
    u = ticket % (PHASES * per_phase)
    phase = u // per_phase
    group = slot - phase
    row = group * ROWS + (u % per_phase) // n_splits
    j = (u % per_phase) % n_splits
    if (group >= 0) & (group < n_groups) & (row < N):
        row64 = row.to(tl.int64)
        s_row = S + row64 * stride_s
        t_row = T + row64 * stride_t
        g_row = G + row64 * stride_g
        ws_row = WS + row64 * n_splits * 8
        ws = ws_row + j * 8
        done_row = DONE + row64 * PHASES
        col0 = j * (SPLIT_CHUNKS * BLOCK)
        cols = tl.arange(0, BLOCK)
        keep = True
        if HAS_MASK:
            keep = tl.load(ROW_MASK + row64) != 0
        if phase == 0:
            if keep:
                m_s = tl.full([BLOCK], -float("inf"), tl.float32)
                z_s = tl.zeros([BLOCK], tl.float32)
                m_t = tl.full([BLOCK], -float("inf"), tl.float32)
                z_t = tl.zeros([BLOCK], tl.float32)
                acc = tl.zeros([BLOCK], tl.float32)
                for c in range(SPLIT_CHUNKS):
                    m_s, z_s, m_t, z_t, acc = _stats_chunk(s_row, t_row, col0 + c * BLOCK + cols, V,
                                                           inv_temp, m_s, z_s, m_t, z_t, acc, KIND)
                ms, zs, scale_s = _reduce_lanes(m_s, z_s)
                mt, zt, _scale_t = _reduce_lanes(m_t, z_t)
                tl.store(ws + 0, ms)
                tl.store(ws + 1, zs)
                tl.store(ws + 2, mt)
                tl.store(ws + 3, zt)
                tl.store(ws + 4, tl.sum(acc * scale_s, axis=0))
                tl.debug_barrier()
                tl.atomic_add(done_row, 1, sem="release")
        else:
            if keep:
                cnt = tl.atomic_add(done_row + phase - 1, 0, sem="acquire")
                while cnt < n_splits:
                    cnt = tl.atomic_add(done_row + phase - 1, 0, sem="acquire")
                lse_s, lse_t, rkl_plus_1 = _combine_splits(ws_row, n_splits, S_BLOCK)
                w_head = 0.0
                w_tail = 0.0
                if KIND == 6:
                    w_head = tl.load(W_HEAD + row64)
                    w_tail = tl.load(W_TAIL + row64)
                if phase == PHASES - 1:
                    if PHASES == 2:
                        big_h = _two_pass_h(rkl_plus_1, w_head, w_tail, KIND)
                    else:
                        jj = tl.arange(0, S_BLOCK)
                        big_h = tl.sum(tl.load(ws_row + jj * 8 + 5, mask=jj < n_splits, other=0.0,
                                               cache_modifier=".cg"), axis=0)
                    facc = tl.zeros([BLOCK], tl.float32)
                    nacc = tl.zeros([BLOCK], tl.float32)
                    for c in range(SPLIT_CHUNKS):
                        f, g2 = _grad_chunk(s_row, t_row, g_row, col0 + c * BLOCK + cols, V, inv_temp,
                                            lse_s, lse_t, big_h, beta, log_b, log_1mb, w_head,
                                            w_tail, KIND)
                        facc += f
                        nacc += g2
                    tl.store(ws + 6, tl.sum(facc, axis=0))
                    tl.store(ws + 7, tl.sum(nacc, axis=0))
                else:
                    hacc = tl.zeros([BLOCK], tl.float32)
                    for c in range(SPLIT_CHUNKS):
                        hacc += _h_chunk(s_row, t_row, col0 + c * BLOCK + cols, V, inv_temp, lse_s,
                                         lse_t, beta, log_b, log_1mb, w_head, w_tail, KIND)
                    tl.store(ws + 5, tl.sum(hacc, axis=0))
                    tl.debug_barrier()
                    tl.atomic_add(done_row + phase, 1, sem="release")
            elif phase == PHASES - 1:
                for c in range(SPLIT_CHUNKS):
                    offs = col0 + c * BLOCK + cols
                    tl.store(g_row + offs, tl.zeros([BLOCK], tl.float32).to(G.dtype.element_ty),
                             mask=offs < V)
                tl.store(ws + 6, 0.0)
                tl.store(ws + 7, 0.0)


def _launch_pipelined(s, t, grad, loss, norm, mask_t, has_mask, w_head, w_tail, code, block,
                      num_warps, scalars, rows_per_group, split_chunks):
    n, v = s.shape
    if rows_per_group < 1 or split_chunks < 1:
        raise ValueError("rows_per_group and split_chunks must be >= 1")
    n_splits = triton.cdiv(v, split_chunks * block)
    phases = 2 if code in (_FKL, _RKL, _AKL) else 3
    n_groups = triton.cdiv(n, rows_per_group)
    ws = torch.empty(n, n_splits, _WS_FIELDS, dtype=torch.float32, device=s.device)
    done = torch.zeros(n, phases, dtype=torch.int32, device=s.device)
    ticket = torch.zeros(1, dtype=torch.int32, device=s.device)
    grid = ((n_groups + phases - 1) * phases * rows_per_group * n_splits,)
    _pipelined_dense_kernel[grid](
        s, t, grad, ws, done, ticket, mask_t, w_head, w_tail,
        s.stride(0), t.stride(0), grad.stride(0), n, v, n_splits, n_groups, *scalars,
        KIND=code, HAS_MASK=has_mask, BLOCK=block, SPLIT_CHUNKS=split_chunks,
        ROWS=rows_per_group, PHASES=phases, S_BLOCK=max(2, triton.next_power_of_2(n_splits)),
        num_warps=num_warps,
    )
    torch.sum(ws[:, :, 6], dim=1, out=loss)
    torch.sum(ws[:, :, 7], dim=1, out=norm)
    norm.sqrt_()


def default_block_size(v: int) -> int:
    """Vocabulary chunk per loop iteration: the whole row when small, else 4096."""
    return max(16, min(4096, triton.next_power_of_2(v)))


def _kind_code(kind: str, beta: float) -> int:
    if kind == "forward_kl":
        return _FKL
    if kind == "reverse_kl":
        return _RKL
    if kind == "jsd":
        return _FKL if beta <= 0.0 else _RKL if beta >= 1.0 else _JSD
    if kind == "skew_forward_kl":
        return _FKL if beta <= 0.0 else _ZERO if beta >= 1.0 else _SFKL
    if kind == "skew_reverse_kl":
        return _RKL if beta <= 0.0 else _ZERO if beta >= 1.0 else _SRKL
    if kind == "tvd":
        return _TVD
    if kind == "akl":
        return _AKL
    raise ValueError(f"unknown divergence kind {kind!r}")


def _log_weights(beta: float) -> tuple[float, float]:
    log_b = math.log(beta) if beta > 0 else -math.inf
    log_1mb = math.log1p(-beta) if beta < 1 else -math.inf
    return log_b, log_1mb


# AKL's torch pass holds ~a dozen [rows, V] float32 temporaries (log-probs, probs, the sort's
# values and int64 indices, the cumulative sum, ...): over all rows at once that is 102 GB at
# 16384 x 151936, so it walks the rows in blocks of about this many elements (1.4 GB at
# V = 151936; both counted by replaying the pass on meta tensors).
AKL_BLOCK_ELEMS = 1 << 25


def _akl_weights_by_rows(s, teacher_logits, ids, logprobs, tail, temperature) -> tuple[Tensor, Tensor]:
    n, v = s.shape
    rows = max(1, AKL_BLOCK_ELEMS // v)
    w_head = torch.empty(n, dtype=torch.float32, device=s.device)
    w_tail = torch.empty_like(w_head)
    for lo in range(0, n, rows):
        sl = slice(lo, min(lo + rows, n))
        teacher = (dict(teacher_logits=teacher_logits[sl]) if teacher_logits is not None
                   else dict(teacher_topk_ids=ids[sl], teacher_topk_logprobs=logprobs[sl],
                             teacher_tail_logmass=tail[sl]))
        log_p, log_q = reference.category_log_probs(s[sl], **teacher, temperature=temperature)
        w_head[sl], w_tail[sl] = reference.akl_weights(log_p, log_q)
    return w_head, w_tail


def _rows_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_divergence_and_grad(
    student_logits: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_tail_logmass: Tensor | None = None,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    row_mask: Tensor | None = None,
    grad_out: Tensor | None = None,
    loss_out: Tensor | None = None,
    norm_out: Tensor | None = None,
    block_size: int | None = None,
    schedule: str = "row",
    rows_per_group: int = 16,
    split_chunks: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss fp32 [N], grad_logits [N, V], grad_norm fp32 [N])`` from the Triton kernels.

    ``grad_out``: optional preallocated ``[N, V]`` buffer for the gradient (its dtype is kept;
    pass ``student_logits`` itself to compute the gradient in place). ``loss_out`` /
    ``norm_out``: optional preallocated float32 ``[N]`` buffers. Rows where ``row_mask`` is
    False get loss 0, gradient 0 and norm 0 and read no logits. ``block_size`` (a power of 2)
    overrides the vocabulary chunk. ``schedule``: ``"row"`` (one program per row, the default)
    or ``"pipelined"`` (dense teacher only; each row split into ``split_chunks`` chunks per
    program -- default 16384 columns -- and processed in groups of ``rows_per_group`` rows; see
    "Schedules" in the module docstring; unmeasured on a GPU).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    sparse = teacher_logits is None
    reference.check_args(kind, beta, temperature, sparse=sparse)
    beta = float(beta)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    s = _rows_contiguous(student_logits.detach())
    n, v = s.shape
    dev = s.device
    grad = torch.empty_like(s) if grad_out is None else grad_out
    if grad.shape != s.shape or grad.stride(-1) != 1:
        raise ValueError("grad_out must be [N, V] with unit stride in the last dim")
    loss = torch.empty(n, dtype=torch.float32, device=dev) if loss_out is None else loss_out
    norm = torch.empty(n, dtype=torch.float32, device=dev) if norm_out is None else norm_out
    for buf in (loss, norm):
        if buf.shape != (n,) or buf.dtype != torch.float32 or not buf.is_contiguous():
            raise ValueError("loss_out / norm_out must be contiguous float32 [N]")
    if sparse and (teacher_topk_ids is None or teacher_topk_logprobs is None):
        raise ValueError("a sparse teacher needs both teacher_topk_ids and teacher_topk_logprobs")
    if sparse and schedule != "row":
        raise ValueError(f"schedule {schedule!r} needs a dense teacher; the top-k kernel is row-scheduled")
    if not sparse and teacher_logits.shape != s.shape:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} != student {tuple(s.shape)}")
    if n == 0:
        return loss, grad, norm
    code = _kind_code(kind, beta)
    has_mask = row_mask is not None
    mask_t = row_mask.reshape(-1).to(device=dev, dtype=torch.int8) if has_mask else loss
    if sparse:
        # ids sorted per row (each vocab chunk finds its members as a contiguous run), masked
        # rows' ids replaced by 0..K-1 (they are never read), then validated: a bad id would
        # be read out of bounds by the kernel.
        ids, order = torch.sort(teacher_topk_ids.detach().reshape(n, -1).long(), dim=-1)
        if has_mask:
            filler = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            ids = torch.where(row_mask.reshape(-1, 1).to(device=ids.device, dtype=torch.bool), ids, filler)
        reference.check_topk_ids(ids, v, already_sorted=True)
        lps = torch.gather(teacher_topk_logprobs.detach().reshape(n, -1), -1, order).contiguous()
        tail = (reference.tail_from_topk(lps) if teacher_tail_logmass is None
                else teacher_tail_logmass.detach().reshape(n))
        tail = tail.to(device=dev, dtype=torch.float32).contiguous()
    w_head = w_tail = loss
    if code == _AKL:  # detached weights need a sort: torch, see the module docstring
        w_head, w_tail = _akl_weights_by_rows(s, teacher_logits, ids if sparse else None,
                                              lps if sparse else None, tail if sparse else None, temperature)
    log_b, log_1mb = _log_weights(beta)
    block = block_size or default_block_size(v)
    num_warps = 8 if block >= 2048 else 4
    if not sparse:
        t = _rows_contiguous(teacher_logits.detach())
        scalars = (1.0 / float(temperature), beta, log_b, log_1mb)
        if schedule == "pipelined":
            _launch_pipelined(
                s, t, grad, loss, norm, mask_t, has_mask, w_head, w_tail, code, block, num_warps,
                scalars, rows_per_group, split_chunks or max(1, min(triton.cdiv(v, block), 16384 // block)),
            )
            return loss, grad, norm
        _dense_kernel[(n,)](
            s, t, grad, loss, norm, mask_t, w_head, w_tail,
            s.stride(0), t.stride(0), grad.stride(0), v, *scalars,
            KIND=code, HAS_MASK=has_mask, BLOCK=block, num_warps=num_warps,
            LAST_REVERSED=code in (_FKL, _RKL, _AKL),  # two passes: the last one runs backwards
        )
        return loss, grad, norm
    ids = ids.to(torch.int32).contiguous() if v < 2**31 else ids.contiguous()
    k = ids.shape[1]
    _sparse_kernel[(n,)](
        s, ids, lps, tail, grad, loss, norm, mask_t, w_head, w_tail,
        s.stride(0), ids.stride(0), lps.stride(0), grad.stride(0), v, k,
        beta, log_b, log_1mb, reference.LOG_TAIL_FLOOR,
        KIND=code, HAS_MASK=has_mask, BLOCK=block, BLOCK_K=max(16, triton.next_power_of_2(k)),
        num_warps=num_warps,
    )
    return loss, grad, norm


class TritonDivergence(torch.autograd.Function):
    """Autograd glue: the forward computes loss and gradient together; the backward scales.

    Outputs ``(per-token loss fp32 [N], grad norm fp32 [N], non-differentiable)``. The saved
    gradient is scaled in place in ``backward``, so the graph can be backpropagated once.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, ids, logprobs, tail, row_mask, opts):
        loss, grad, norm = triton_divergence_and_grad(
            student_logits,
            teacher_logits=teacher_logits,
            teacher_topk_ids=ids,
            teacher_topk_logprobs=logprobs,
            teacher_tail_logmass=tail,
            row_mask=row_mask,
            **opts,
        )
        ctx.save_for_backward(grad)
        ctx.input_dtype = student_logits.dtype
        ctx.mark_non_differentiable(norm)
        return loss, norm

    @staticmethod
    def backward(ctx, grad_loss, _grad_norm):
        (grad,) = ctx.saved_tensors
        grad.mul_(grad_loss.unsqueeze(1).to(grad.dtype))
        return grad.to(ctx.input_dtype), None, None, None, None, None, None


def triton_per_token_divergence(
    student_logits: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_tail_logmass: Tensor | None = None,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    row_mask: Tensor | None = None,
    block_size: int | None = None,
    schedule: str = "row",
    rows_per_group: int = 16,
) -> Tensor:
    """Differentiable per-token divergence ``[N]`` (fp32) computed by the Triton kernels."""
    opts = dict(kind=kind, beta=beta, temperature=temperature, block_size=block_size,
                schedule=schedule, rows_per_group=rows_per_group)
    loss, _norm = TritonDivergence.apply(
        student_logits, teacher_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logmass,
        row_mask, opts
    )
    return loss

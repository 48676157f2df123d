"""Tests of the plain-PyTorch reference divergences and the loss module's reference path."""

import math

import pytest
import torch

from opdflow.kernels import (
    KINDS,
    DistillationLoss,
    distillation_loss,
    divergence_and_grad,
    per_token_divergence,
    per_token_divergence_and_grad,
)
from opdflow.kernels import reference as R

DTYPE = torch.float64


def _inputs(n=4, v=7, seed=0, dtype=DTYPE):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=dtype) * 2
    t = torch.randn(n, v, generator=g, dtype=dtype) * 2
    return s, t


def _topk(t, k):
    logprobs = torch.log_softmax(t.double(), -1)
    lp, ids = torch.topk(logprobs, k, dim=-1)
    return ids, lp.to(t.dtype)


def _fixed_weight_akl(x, t):
    """AKL with its detached weights frozen at x's current value: what autograd must match."""
    lp, lq = R.category_log_probs(x.detach(), teacher_logits=t)
    w_head, w_tail = R.akl_weights(lp, lq)
    return lambda y: w_head * per_token_divergence(
        y, teacher_logits=t, kind="forward_kl"
    ) + w_tail * per_token_divergence(y, teacher_logits=t, kind="reverse_kl")


BETA_CASES = [(k, 0.3) for k in KINDS] + [
    ("jsd", 0.0),
    ("jsd", 1.0),
    ("skew_forward_kl", 1.0),
    ("skew_reverse_kl", 1.0),
]


@pytest.mark.parametrize("kind,beta", BETA_CASES)
def test_gradcheck_dense(kind, beta):
    s, t = _inputs(n=3, v=5)
    s.requires_grad_(True)
    if kind == "akl":
        fn = _fixed_weight_akl(s, t)
        assert torch.autograd.gradcheck(fn, (s,))
        got = torch.autograd.grad(per_token_divergence(s, teacher_logits=t, kind=kind).sum(), s)
        want = torch.autograd.grad(fn(s).sum(), s)
        torch.testing.assert_close(got[0], want[0])
        return
    fn = lambda x: per_token_divergence(x, teacher_logits=t, kind=kind, beta=beta, temperature=0.7)
    assert torch.autograd.gradcheck(fn, (s,))


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "akl"])
@pytest.mark.parametrize("k", [1, 3])
def test_gradcheck_sparse(kind, k):
    s, t = _inputs(n=3, v=6)
    ids, lp = _topk(t, k)
    s.requires_grad_(True)
    fn = lambda x: per_token_divergence(
        x, teacher_topk_ids=ids, teacher_topk_logprobs=lp, kind=kind, beta=0.3
    )
    assert torch.autograd.gradcheck(fn, (s,))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_full_k_equals_dense(kind, dtype):
    s, t = _inputs(n=5, v=9, dtype=dtype)
    ids, lp = _topk(t, t.shape[1])
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    ids, lp = ids[:, perm], lp[:, perm]  # order of the top-k must not matter
    dense, g_dense, n_dense = per_token_divergence_and_grad(s, teacher_logits=t, kind=kind, beta=0.3)
    sparse, g_sparse, n_sparse = per_token_divergence_and_grad(
        s, teacher_topk_ids=ids, teacher_topk_logprobs=lp, kind=kind, beta=0.3
    )
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(sparse, dense, **tol)
    torch.testing.assert_close(g_sparse, g_dense, **tol)
    torch.testing.assert_close(n_sparse, n_dense, **tol)


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("tvd", "akl")])
def test_sparse_is_lower_bound(kind):
    s, t = _inputs(n=6, v=11, seed=3)
    ids, lp = _topk(t, 4)
    dense = per_token_divergence(s, teacher_logits=t, kind=kind, beta=0.3)
    sparse = per_token_divergence(
        s, teacher_topk_ids=ids, teacher_topk_logprobs=lp, kind=kind, beta=0.3
    )
    assert torch.all(sparse <= dense + 1e-12)
    assert torch.all(sparse >= -1e-12)


def test_known_values_three_token_vocab():
    p = torch.tensor([[0.5, 0.25, 0.25]], dtype=DTYPE)
    q = torch.tensor([[0.25, 0.5, 0.25]], dtype=DTYPE)
    s, t = p.log() + 3.0, q.log() - 1.0  # logits up to a shift
    ln2 = math.log(2.0)
    fkl = 0.25 * math.log(0.25 / 0.5) + 0.5 * math.log(0.5 / 0.25)  # = ln2 / 4
    rkl = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)  # = ln2 / 4
    assert fkl == pytest.approx(ln2 / 4)
    got = lambda kind, **kw: float(per_token_divergence(s, teacher_logits=t, kind=kind, **kw)[0])
    assert got("forward_kl") == pytest.approx(fkl, abs=1e-12)
    assert got("reverse_kl") == pytest.approx(rkl, abs=1e-12)
    assert got("tvd") == pytest.approx(0.25, abs=1e-12)
    m = [0.375, 0.375, 0.25]  # beta = 0.5 mixture
    jsd = 0.5 * sum(qi * math.log(qi / mi) for qi, mi in zip(q[0].tolist(), m))
    jsd += 0.5 * sum(pi * math.log(pi / mi) for pi, mi in zip(p[0].tolist(), m))
    assert got("jsd", beta=0.5) == pytest.approx(jsd, abs=1e-12)
    assert got("jsd", beta=0.0) == pytest.approx(fkl, abs=1e-12)
    assert got("jsd", beta=1.0) == pytest.approx(rkl, abs=1e-12)
    m_sf = [0.1 * qi + 0.9 * pi for pi, qi in zip(p[0].tolist(), q[0].tolist())]
    sfkl = sum(qi * math.log(qi / mi) for qi, mi in zip(q[0].tolist(), m_sf))
    assert got("skew_forward_kl", beta=0.1) == pytest.approx(sfkl, abs=1e-12)
    m_sr = [0.1 * pi + 0.9 * qi for pi, qi in zip(p[0].tolist(), q[0].tolist())]
    srkl = sum(pi * math.log(pi / mi) for pi, mi in zip(p[0].tolist(), m_sr))
    assert got("skew_reverse_kl", beta=0.1) == pytest.approx(srkl, abs=1e-12)
    assert got("skew_forward_kl", beta=0.0) == pytest.approx(fkl, abs=1e-12)
    assert got("skew_reverse_kl", beta=0.0) == pytest.approx(rkl, abs=1e-12)
    # AKL: ascending teacher probs 0.25, 0.25, 0.5 -> cumsum 0.25, 0.5, 1.0; tail = first one
    # (cumsum < 0.5, the stable sort puts token 0 first): |0.25-0.5| = 0.25; head: tokens 2, 1
    # with gaps 0 and 0.25 -> weights 0.5 / 0.5.
    assert got("akl") == pytest.approx(0.5 * fkl + 0.5 * rkl, abs=1e-12)
    # Gradient of forward KL wrt the logits is p - q; of reverse KL p * (log p/q - KL).
    _, g, n = per_token_divergence_and_grad(s, teacher_logits=t, kind="forward_kl")
    torch.testing.assert_close(g, p - q)
    torch.testing.assert_close(n, torch.linalg.vector_norm(p - q, dim=-1))
    _, g, _ = per_token_divergence_and_grad(s, teacher_logits=t, kind="reverse_kl")
    torch.testing.assert_close(g, p * ((p / q).log() - rkl))


def test_temperature_divides_both_logits():
    s, t = _inputs()
    a = per_token_divergence(s, teacher_logits=t, kind="jsd", temperature=2.0)
    b = per_token_divergence(s / 2.0, teacher_logits=t / 2.0, kind="jsd")
    torch.testing.assert_close(a, b)


def test_sparse_rejects_temperature():
    s, t = _inputs()
    ids, lp = _topk(t, 2)
    with pytest.raises(ValueError, match="temperature"):
        per_token_divergence(s, teacher_topk_ids=ids, teacher_topk_logprobs=lp, temperature=2.0)


def test_bad_arguments():
    s, t = _inputs()
    with pytest.raises(ValueError, match="kind"):
        per_token_divergence(s, teacher_logits=t, kind="kl")
    with pytest.raises(ValueError, match="exactly one"):
        per_token_divergence(s)
    with pytest.raises(ValueError, match="beta"):
        per_token_divergence(s, teacher_logits=t, beta=1.5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_and_inf_logits_no_nan(kind, dtype):
    s = torch.tensor(
        [
            [1e4, -1e4, 0.0, -math.inf, 5.0],
            [-1e4, -1e4, -1e4, -math.inf, -1e4],
            [0.0, 1e4, -1e4, -math.inf, 1e4],
        ],
        dtype=dtype,
    )
    t = torch.tensor(
        [
            [-1e4, 1e4, 3.0, -math.inf, 0.0],
            [1e4, -1e4, 0.0, -math.inf, -1e4],
            [0.0, 1e4, -1e4, -math.inf, 1e4],
        ],
        dtype=dtype,
    )
    loss, grad, norm = per_token_divergence_and_grad(s, teacher_logits=t, kind=kind, beta=0.3)
    for x in (loss, grad, norm):
        assert torch.isfinite(x).all(), (kind, x)
    assert loss.dtype == dtype
    assert float(loss[2]) == pytest.approx(0.0, abs=1e-6)  # identical rows
    ids = torch.tensor([[1, 2], [0, 2], [1, 4]])
    lp = torch.log_softmax(t.double(), -1).gather(-1, ids).to(dtype)
    loss, grad, norm = per_token_divergence_and_grad(
        s, teacher_topk_ids=ids, teacher_topk_logprobs=lp, kind=kind, beta=0.3
    )
    for x in (loss, grad, norm):
        assert torch.isfinite(x).all(), (kind, x)


def test_bf16_input_computes_in_float32():
    s, t = _inputs(dtype=torch.bfloat16)
    assert per_token_divergence(s, teacher_logits=t).dtype == torch.float32


@pytest.mark.parametrize("sparse", [False, True])
def test_loss_mask_weights_and_normalization(sparse):
    s, t = _inputs(n=6, v=8, seed=5)
    s[4] = math.nan  # garbage in a masked row must not leak
    teacher = dict(teacher_logits=t)
    if sparse:
        ids, lp = _topk(t, 3)
        lp[4] = math.nan
        teacher = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp)
    mask = torch.tensor([True, True, False, True, False, True])
    weights = torch.tensor([1.0, 0.0, 5.0, 2.0, 1.0, 0.5], dtype=DTYPE)
    x = s.clone().requires_grad_(True)
    loss, per_token = DistillationLoss(kind="jsd", beta=0.3, backend="reference")(
        x, mask=mask, weights=weights, **teacher
    )
    loss.backward()
    keep = torch.tensor([0, 1, 3, 5])
    clean = s[keep].clone().requires_grad_(True)
    sub_teacher = {k: v[keep] for k, v in teacher.items()}
    d = per_token_divergence(clean, kind="jsd", beta=0.3, **sub_teacher)
    want = (d * weights[keep]).sum() / 4
    want.backward()
    torch.testing.assert_close(loss, want)
    assert not per_token.requires_grad
    torch.testing.assert_close(per_token[keep], d.detach())
    assert per_token[2] == 0 and per_token[4] == 0
    torch.testing.assert_close(x.grad[keep], clean.grad)
    assert torch.all(x.grad[[2, 4]] == 0)
    assert torch.all(x.grad[1] == 0)  # zero weight drops out


def test_loss_all_masked_is_zero_without_nan():
    s, t = _inputs()
    x = s.clone().requires_grad_(True)
    loss, per_token = distillation_loss(
        x, teacher_logits=t, mask=torch.zeros(4, dtype=torch.bool), backend="reference"
    )
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(per_token == 0) and torch.all(x.grad == 0)


def test_loss_flattens_leading_dims_and_auto_is_reference_on_cpu():
    s, t = _inputs(n=6, v=5)
    a, pa = distillation_loss(s.view(2, 3, 5), teacher_logits=t.view(2, 3, 5))
    b, pb = distillation_loss(s, teacher_logits=t, backend="reference")
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(pa, pb)


def test_divergence_and_grad_matches_reference_and_masks():
    s, t = _inputs()
    mask = torch.tensor([True, False, True, True])
    loss, grad, norm = divergence_and_grad(s, teacher_logits=t, kind="tvd", mask=mask)
    l2, g2, n2 = per_token_divergence_and_grad(s, teacher_logits=t, kind="tvd")
    torch.testing.assert_close(loss[mask], l2[mask])
    torch.testing.assert_close(grad[mask], g2[mask])
    torch.testing.assert_close(norm[mask], n2[mask])
    assert loss[1] == 0 and norm[1] == 0 and torch.all(grad[1] == 0)


def test_divergence_and_grad_writes_into_grad_out_even_over_the_logits():
    g = torch.Generator().manual_seed(12)
    s, t = torch.randn(5, 40, generator=g), torch.randn(5, 40, generator=g)
    mask = torch.tensor([True, False, True, True, False])
    want = divergence_and_grad(s, teacher_logits=t, kind="jsd", beta=0.3, mask=mask, backend="reference")
    buf = s.clone()
    got = divergence_and_grad(buf, teacher_logits=t, kind="jsd", beta=0.3, mask=mask, backend="reference",
                              grad_out=buf)
    assert got[1] is buf
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_closed_form_reverse_kl_gradient_equals_autograd(temperature):
    """`dense_reverse_kl_and_grad` (what the rock analysis runs per chunk) against autograd
    through `per_token_divergence`, in float64, including -inf (masked) student and teacher
    logits at categories the student gives no mass, and a float32 input."""
    s, t = _inputs(n=6, v=11, seed=3)
    s[0, :4] = -math.inf  # the student masks 4 categories: p = 0 there, the teacher's mass stays
    t[1, 2] = -math.inf
    s[1, 2] = -math.inf  # q = 0 only where p = 0 too: KL finite
    x = s.clone().requires_grad_(True)
    want = per_token_divergence(x, teacher_logits=t, kind="reverse_kl", temperature=temperature)
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    loss, grad, norm = R.dense_reverse_kl_and_grad(s, t, temperature)
    assert torch.allclose(loss, want.detach(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad, want_grad, rtol=1e-10, atol=1e-12) and torch.isfinite(grad).all()
    assert torch.allclose(norm, want_grad.norm(dim=-1), rtol=1e-10, atol=1e-12)
    assert (grad[0, :4] == 0).all() and s.isneginf().sum() == 5  # inputs are not modified
    l32, g32, _ = R.dense_reverse_kl_and_grad(s.float(), t.float(), temperature)
    assert l32.dtype == g32.dtype == torch.float32
    assert torch.allclose(l32.double(), loss, rtol=1e-5, atol=1e-6) and torch.allclose(g32.double(), grad, atol=1e-6)
    # per_token_divergence_and_grad (and so divergence_and_grad's reference path) route reverse KL here
    l2, g2, _ = per_token_divergence_and_grad(s, teacher_logits=t, kind="reverse_kl", temperature=temperature)
    assert torch.equal(l2, loss) and torch.equal(g2, grad)

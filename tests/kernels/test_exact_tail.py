"""The top-k tail without cancellation, top-k id validation, and AKL's head/tail boundary.

Issue 16's reproducer: V = 5, teacher q = [0.6, 0.4 - 1e-9, 3 x 1e-9/3], student uniform,
top-2 teacher. Rebuilt as ``1 - sum exp(logprob)`` in float32 the teacher's tail (1e-9) was
lost and reverse KL / AKL moved by several nats; with the tail log-mass the scorer stores
(``reference.tail_log_mass`` over the teacher's float32 logits) and the student's tail from its
own non-top-k logits, the reference and the Triton kernel (interpreter on CPU) match the float64
K + 1 category divergence.
"""
import math

import pytest
import torch

from opdflow.kernels import distillation_loss, divergence_and_grad
from opdflow.kernels import reference as R

KINDS = ["reverse_kl", "forward_kl", "akl", "jsd"]

# the interpreter evaluates both sides of tl.where with numpy (inf - inf in discarded branches)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _reproducer():
    q = torch.tensor([0.6, 0.4 - 1e-9, 1e-9 / 3, 1e-9 / 3, 1e-9 / 3], dtype=torch.float64)
    t32 = q.log().float()[None]  # the teacher's logits as a float32 model would give them
    lp = torch.log_softmax(t32, -1)
    top_lp, top_ids = lp.topk(2, dim=-1)
    tail = R.tail_log_mass(t32, top_ids)  # what the scoring stage stores
    s = torch.zeros(1, 5)  # uniform student
    # float64 ground truth over the K + 1 = 3 categories
    log_q = torch.tensor([[0.6, 0.4 - 1e-9, 1e-9]], dtype=torch.float64).log()
    log_p = torch.tensor([[0.2, 0.2, 0.6]], dtype=torch.float64).log()
    return s, top_ids, top_lp, tail, log_p, log_q


@pytest.mark.parametrize("kind", KINDS)
def test_reproducer_matches_float64_reference(kind):
    s, ids, lps, tail, log_p, log_q = _reproducer()
    want = float(R.divergence_from_log_probs(log_p, log_q, kind, 0.5))
    got = float(R.per_token_divergence(s, teacher_topk_ids=ids, teacher_topk_logprobs=lps,
                                       teacher_tail_logmass=tail, kind=kind))
    assert got == pytest.approx(want, rel=1e-5)
    assert float(tail) == pytest.approx(math.log(1e-9), abs=1e-5)


def test_reproducer_float32_rebuilt_tail_is_off():
    """The fallback (tail rebuilt from the float32 top-k) cannot recover the tail: this is why
    the scorer stores it; the test would pass vacuously if the reproducer did not cancel."""
    s, ids, lps, tail, log_p, log_q = _reproducer()
    want = float(R.divergence_from_log_probs(log_p, log_q, "reverse_kl", 0.5))
    rebuilt = float(R.per_token_divergence(s, teacher_topk_ids=ids, teacher_topk_logprobs=lps))
    assert abs(rebuilt - want) > 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_reproducer_triton_matches_float64(kind):
    pytest.importorskip("triton")
    from tests.kernels.test_triton import TD  # interpreter-mode import, see that module

    s, ids, lps, tail, log_p, log_q = _reproducer()
    want = float(R.divergence_from_log_probs(log_p, log_q, kind, 0.5))
    loss, grad, _ = TD.triton_divergence_and_grad(s, teacher_topk_ids=ids, teacher_topk_logprobs=lps,
                                                  teacher_tail_logmass=tail, kind=kind, block_size=16)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    _, ref_grad, _ = R.per_token_divergence_and_grad(s.double(), teacher_topk_ids=ids, teacher_topk_logprobs=lps.double(),
                                                     teacher_tail_logmass=tail.double(), kind=kind)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-4)


def test_random_confident_rows_triton_matches_float64():
    """Teachers whose top-k holds all but 1e-12..1e-5 of the mass: float32 student logits,
    stored tail vs the float64 evaluation of the same loss, reference and Triton."""
    pytest.importorskip("triton")
    from tests.kernels.test_triton import TD

    g = torch.Generator().manual_seed(0)
    n, v, k = 24, 37, 4
    head = torch.rand(n, k, generator=g, dtype=torch.float64) + 0.1
    rest = torch.rand(n, v - k, generator=g, dtype=torch.float64) + 0.1
    eps = 10.0 ** -torch.randint(5, 13, (n, 1), generator=g).double()
    q = torch.cat([head / head.sum(-1, keepdim=True) * (1 - eps), rest / rest.sum(-1, keepdim=True) * eps], -1)
    perm = torch.argsort(torch.rand(n, v, generator=g), dim=-1)
    q = torch.gather(q, -1, perm)
    t64 = q.log()
    t32 = t64.float()
    top_lp, top_ids = torch.log_softmax(t32, -1).topk(k, dim=-1)
    tail = R.tail_log_mass(t32, top_ids)
    s = torch.randn(n, v, generator=g)
    want = R.per_token_divergence(s.double(), teacher_topk_ids=top_ids, teacher_topk_logprobs=torch.log_softmax(t64, -1).gather(-1, top_ids),
                                  teacher_tail_logmass=R.tail_log_mass(t64, top_ids), kind="reverse_kl")
    ref = R.per_token_divergence(s, teacher_topk_ids=top_ids, teacher_topk_logprobs=top_lp,
                                 teacher_tail_logmass=tail, kind="reverse_kl")
    tri, _, _ = TD.triton_divergence_and_grad(s, teacher_topk_ids=top_ids, teacher_topk_logprobs=top_lp,
                                              teacher_tail_logmass=tail, kind="reverse_kl", block_size=16)
    torch.testing.assert_close(ref.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tri.double(), want, atol=1e-4, rtol=1e-4)


def test_student_tail_gradient_is_finite_when_topk_covers_the_row():
    s = torch.randn(3, 4, requires_grad=True)
    ids = torch.arange(4).expand(3, 4)
    lps = torch.log_softmax(torch.randn(3, 4), -1)
    loss = R.per_token_divergence(s, teacher_topk_ids=ids, teacher_topk_logprobs=lps,
                                  teacher_tail_logmass=torch.full((3,), -math.inf))
    loss.sum().backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(loss).all()
    dense = R.per_token_divergence(s.detach(), teacher_logits=lps)
    torch.testing.assert_close(loss.detach(), dense, atol=1e-5, rtol=1e-5)


# -- id validation --------------------------------------------------------------------------

def _bad_ids():
    s = torch.randn(3, 10)
    lps = torch.log_softmax(torch.randn(3, 3), -1)
    dup = torch.tensor([[0, 1, 2], [3, 4, 3], [5, 6, 7]])
    oob = torch.tensor([[0, 1, 2], [3, 4, 5], [5, 6, 62]])
    neg = torch.tensor([[0, -1, 2], [3, 4, 5], [5, 6, 7]])
    return s, lps, dup, oob, neg


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_ids_fail_clearly(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        from tests.kernels.test_triton import TD  # noqa: F401  (interpreter-mode import)
    s, lps, dup, oob, neg = _bad_ids()
    with pytest.raises(ValueError, match=r"repeat in row 1: id 3"):
        distillation_loss(s, teacher_topk_ids=dup, teacher_topk_logprobs=lps, backend=backend)
    with pytest.raises(ValueError, match=r"out of range in row 2.*\[5, 62\].*\[0, 10\)"):
        distillation_loss(s, teacher_topk_ids=oob, teacher_topk_logprobs=lps, backend=backend)
    with pytest.raises(ValueError, match=r"out of range in row 0"):
        divergence_and_grad(s, teacher_topk_ids=neg, teacher_topk_logprobs=lps, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_masked_rows_ids_are_not_validated(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        from tests.kernels.test_triton import TD  # noqa: F401
    s, lps, _dup, oob, _neg = _bad_ids()
    mask = torch.tensor([True, True, False])
    loss, per_token = distillation_loss(s, teacher_topk_ids=oob, teacher_topk_logprobs=lps, mask=mask,
                                        backend=backend)
    assert torch.isfinite(loss) and per_token[2] == 0


# -- AKL's boundary ----------------------------------------------------------------------------

def test_akl_boundary_as_the_authors_code():
    """q = [.40, .35, .25], p = [.20, .30, .50]: the category whose cumulative (descending) mass
    crosses 0.5 (.35) is in the tail, so g_head = .20, g_tail = .05 + .25 = .30."""
    log_q = torch.tensor([[0.40, 0.35, 0.25]], dtype=torch.float64).log()
    log_p = torch.tensor([[0.20, 0.30, 0.50]], dtype=torch.float64).log()
    w_head, w_tail = R.akl_weights(log_p, log_q)
    assert float(w_head) == pytest.approx(0.4) and float(w_tail) == pytest.approx(0.6)
    # the teacher's largest category is head even when it alone exceeds mu
    w_head, w_tail = R.akl_weights(torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.9, 0.1]]).log())
    assert float(w_head) == pytest.approx(0.5) and float(w_tail) == pytest.approx(0.5)
    w_head, w_tail = R.akl_weights(torch.tensor([[0.5, 0.3, 0.2]]).log(), torch.tensor([[0.8, 0.15, 0.05]]).log())
    assert float(w_head) == pytest.approx(0.3 / 0.6) and float(w_tail) == pytest.approx(0.3 / 0.6)

"""Triton kernels vs the float64 reference; on CPU they run under TRITON_INTERPRET=1.

Every kernel output is poisoned (filled with NaN) before the call, so an element the kernel
forgets to write fails the comparison. Sizes are small: the interpreter is slow.
"""

import importlib
import math
import os
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: no kernels to test")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from opdflow.kernels import KINDS, DistillationLoss  # noqa: E402
from opdflow.kernels import reference as R  # noqa: E402


def _load_kernels():
    """Import the kernel module; on CPU it needs Triton in interpreter mode (see conftest.py)."""
    if torch.cuda.is_available():
        return importlib.import_module("opdflow.kernels.triton_divergence"), "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1" and not isinstance(
        triton.language.zeros, InterpretedFunction
    ):  # the harness failed: something imported triton before tests/conftest.py set the variable
        pytest.fail("triton was imported before TRITON_INTERPRET=1 took effect: the kernel tests "
                    "cannot run (see tests/conftest.py)", pytrace=False)
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(
            "no GPU and triton was imported without TRITON_INTERPRET=1; run "
            "`TRITON_INTERPRET=1 python -m pytest tests/kernels`",
            allow_module_level=True,
        )
    name = "opdflow.kernels.triton_divergence"
    module = sys.modules.get(name)
    if module is None or not isinstance(module._dense_kernel, InterpretedFunction):
        module = importlib.reload(module) if module else importlib.import_module(name)
    return module, "cpu"


TD, DEVICE = _load_kernels()

# The interpreter evaluates both sides of tl.where with numpy, which warns on inf - inf in the
# discarded branch; those warnings are expected.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# (atol, rtol) per input dtype, for loss / grad / norm against the float64 reference evaluated
# on the same (rounded) input values. bf16 gradients are stored in bf16 (8 mantissa bits).
TOL = {
    torch.float32: {"loss": (2e-5, 1e-5), "grad": (2e-6, 1e-4), "norm": (1e-5, 1e-5)},
    torch.bfloat16: {"loss": (2e-5, 1e-5), "grad": (1e-3, 1e-2), "norm": (1e-5, 1e-5)},
}

KIND_CASES = [(k, 0.3) for k in KINDS] + [
    ("jsd", 0.0),
    ("jsd", 1.0),
    ("skew_forward_kl", 1.0),
    ("skew_reverse_kl", 0.0),
]


def _inputs(n, v, dtype, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * scale).to(dtype)
    t = (torch.randn(n, v, generator=g) * scale).to(dtype)
    return s.to(DEVICE), t.to(DEVICE)


def _topk(t, k):
    lp, ids = torch.topk(torch.log_softmax(t.double(), -1), k, dim=-1)
    return ids, lp.float()


def _poisoned(n, v, dtype):
    nan = float("nan")
    return dict(
        grad_out=torch.full((n, v), nan, dtype=dtype, device=DEVICE),
        loss_out=torch.full((n,), nan, dtype=torch.float32, device=DEVICE),
        norm_out=torch.full((n,), nan, dtype=torch.float32, device=DEVICE),
    )


def _check(got, want, dtype, what=("loss", "grad", "norm"), mask=None):
    for name, g, w in zip(what, got, want):
        atol, rtol = TOL[dtype][name]
        g = g.double().cpu()
        w = w.double().cpu()
        if mask is not None:
            g, w = g[mask], w[mask]
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _run_both(s, *, teacher, kind, beta, temperature=1.0, block_size=None, row_mask=None, **sched):
    n, v = s.shape
    got = TD.triton_divergence_and_grad(
        s, **teacher, kind=kind, beta=beta, temperature=temperature, row_mask=row_mask,
        block_size=block_size, **sched, **_poisoned(n, v, s.dtype),
    )
    ref_teacher = {k: (x.double().cpu() if x.is_floating_point() else x.cpu()) for k, x in teacher.items()}
    want = R.per_token_divergence_and_grad(
        s.double().cpu(), **ref_teacher, kind=kind, beta=beta, temperature=temperature
    )
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,beta", KIND_CASES)
def test_dense_matches_reference(kind, beta, dtype):
    s, t = _inputs(5, 301, dtype)
    got, want = _run_both(s, teacher=dict(teacher_logits=t), kind=kind, beta=beta,
                          temperature=0.8, block_size=128)
    assert got[1].dtype == dtype
    _check(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,beta", KIND_CASES)
def test_sparse_matches_reference(kind, beta, dtype):
    s, t = _inputs(5, 301, dtype, seed=1)
    ids, lp = _topk(t, 6)
    got, want = _run_both(s, teacher=dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp),
                          kind=kind, beta=beta, block_size=64)
    _check(got, want, dtype)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_odd_shape_41_x_1271(kind, beta):
    s, t = _inputs(41, 1271, torch.float32, seed=2)
    got, want = _run_both(s, teacher=dict(teacher_logits=t), kind=kind, beta=beta, block_size=256)
    _check(got, want, torch.float32)


def test_sparse_odd_shape_and_default_block():
    s, t = _inputs(41, 1271, torch.float32, seed=3)
    ids, lp = _topk(t, 20)
    got, want = _run_both(s, teacher=dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp),
                          kind="reverse_kl", beta=0.5, block_size=256)
    _check(got, want, torch.float32)
    got2 = TD.triton_divergence_and_grad(s, teacher_topk_ids=ids, teacher_topk_logprobs=lp)
    _check(got2, want, torch.float32)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_sparse_full_k_equals_dense(kind):
    s, t = _inputs(4, 97, torch.float32, seed=4)
    ids, lp = _topk(t, 97)
    dense = TD.triton_divergence_and_grad(s, teacher_logits=t, kind=kind, block_size=32)
    sparse = TD.triton_divergence_and_grad(s, teacher_topk_ids=ids, teacher_topk_logprobs=lp,
                                           kind=kind, block_size=32)
    for name, a, b in zip(("loss", "grad", "norm"), sparse, dense):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind,beta", KIND_CASES)
def test_extreme_and_inf_logits(kind, beta):
    s = torch.tensor(
        [
            [1e4, -1e4, 0.0, -math.inf, 5.0, 1.0, -3.0],
            [-1e4, -1e4, -1e4, -math.inf, -1e4, -1e4, 1e4],
            [0.0, 1e4, -1e4, -math.inf, 1e4, 2.0, -math.inf],
        ],
        device=DEVICE,
    )
    t = torch.tensor(
        [
            [-1e4, 1e4, 3.0, -math.inf, 0.0, 1.0, 2.0],
            [1e4, -1e4, 0.0, -math.inf, -1e4, 3.0, 0.0],
            [0.0, 1e4, -1e4, -math.inf, 1e4, 2.0, -math.inf],
        ],
        device=DEVICE,
    )
    got, want = _run_both(s, teacher=dict(teacher_logits=t), kind=kind, beta=beta, block_size=4)
    for x in got:
        assert torch.isfinite(x).all(), (kind, x)
    # The fp32 spacing at |x| = 1e4 is ~1e-3, so log-probs carry ~1e-3 absolute rounding;
    # compare at that scale (the point here is finiteness and the right branch).
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), w, atol=1e-2, rtol=1e-3)
    ids = torch.tensor([[1, 2], [0, 6], [1, 4]])
    lp = torch.log_softmax(t.double().cpu(), -1).gather(-1, ids).float()
    got, want = _run_both(s, teacher=dict(teacher_topk_ids=ids.to(DEVICE), teacher_topk_logprobs=lp.to(DEVICE)),
                          kind=kind, beta=beta, block_size=4)
    for x in got:
        assert torch.isfinite(x).all(), (kind, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), w, atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("sparse", [False, True])
def test_masked_rows_write_zeros(sparse):
    s, t = _inputs(6, 150, torch.float32, seed=5)
    s[2] = float("nan")  # a masked row's content is never read
    teacher = dict(teacher_logits=t)
    if sparse:
        ids, lp = _topk(t, 5)
        teacher = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp)
    mask = torch.tensor([True, False, False, True, False, True], device=DEVICE)
    got, want = _run_both(s, teacher=teacher, kind="jsd", beta=0.3, row_mask=mask, block_size=64)
    _check(got, want, torch.float32, mask=mask.cpu())
    loss, grad, norm = got
    assert torch.all(loss[~mask] == 0) and torch.all(norm[~mask] == 0)
    assert torch.all(grad[~mask] == 0)
    none = torch.zeros(6, dtype=torch.bool, device=DEVICE)
    loss, grad, norm = TD.triton_divergence_and_grad(
        s, **teacher, row_mask=none, block_size=64, **_poisoned(6, 150, torch.float32)
    )
    assert torch.all(loss == 0) and torch.all(grad == 0) and torch.all(norm == 0)


@pytest.mark.parametrize("sparse", [False, True])
def test_in_place_gradient(sparse):
    s, t = _inputs(3, 200, torch.float32, seed=6)
    teacher = dict(teacher_logits=t)
    if sparse:
        ids, lp = _topk(t, 7)
        teacher = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp)
    want = TD.triton_divergence_and_grad(s, **teacher, kind="jsd", beta=0.3, block_size=64)
    buf = s.clone()
    got = TD.triton_divergence_and_grad(buf, **teacher, kind="jsd", beta=0.3, grad_out=buf, block_size=64)
    assert got[1].data_ptr() == buf.data_ptr()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_module_triton_vs_reference(sparse, dtype):
    s, t = _inputs(7, 130, dtype, seed=7)
    teacher = dict(teacher_logits=t)
    if sparse:
        ids, lp = _topk(t, 4)
        teacher = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp)
    mask = torch.tensor([True, True, False, True, True, False, True], device=DEVICE)
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5, 3.0, 1.0, 1.0], device=DEVICE)
    results = []
    for backend in ("triton", "reference"):
        x = s.clone().requires_grad_(True)
        loss, per_token = DistillationLoss(kind="reverse_kl", backend=backend)(
            x, mask=mask, weights=weights, **teacher
        )
        (loss * 3.7).backward()  # grad_output != 1
        results.append((loss.detach().double(), per_token.double(), x.grad.double()))
    (tl, tp, tg), (rl, rp, rg) = results
    atol, rtol = TOL[dtype]["grad"]
    torch.testing.assert_close(tl, rl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tp, rp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tg, rg, atol=atol, rtol=rtol)
    assert torch.all(tg[~mask] == 0) and torch.all(tg[1] == 0)


def test_per_token_backward_with_random_grad_output():
    s, t = _inputs(6, 90, torch.float32, seed=8)
    r = torch.randn(6, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    x = s.clone().requires_grad_(True)
    (TD.triton_per_token_divergence(x, teacher_logits=t, kind="jsd", block_size=32) * r).sum().backward()
    y = s.double().clone().requires_grad_(True)
    (R.per_token_divergence(y, teacher_logits=t.double(), kind="jsd") * r.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), y.grad, atol=2e-6, rtol=1e-4)


def test_fused_linear_triton_backend_matches_reference():
    from opdflow.kernels import fused_linear_distillation_loss

    g = torch.Generator().manual_seed(10)
    hidden = torch.randn(9, 8, generator=g).to(DEVICE)
    weight = (torch.randn(70, 8, generator=g) * 0.5).to(DEVICE)
    t_logits = torch.randn(9, 70, generator=g).to(DEVICE)
    mask = torch.tensor([True] * 7 + [False, True], device=DEVICE)
    out = []
    for backend in ("triton", "reference"):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss, per_token = fused_linear_distillation_loss(
            h, w, teacher_logits=t_logits, mask=mask, kind="jsd", chunk_size=4, backend=backend
        )
        loss.backward()
        out.append((loss.detach(), per_token, h.grad, w.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sparse", [False, True])
def test_akl_weights_in_row_blocks(monkeypatch, sparse):
    """AKL's torch pass walks the rows in blocks (here 3 rows of 200): same result as the reference."""
    monkeypatch.setattr(TD, "AKL_BLOCK_ELEMS", 600)
    s, t = _inputs(8, 200, torch.float32, seed=13)
    teacher = dict(teacher_logits=t)
    if sparse:
        ids, lp = _topk(t, 6)
        teacher = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp)
    got, want = _run_both(s, teacher=teacher, kind="akl", beta=0.5, block_size=64)
    _check(got, want, torch.float32)


def test_teacher_errors_come_before_any_work():
    s, t = _inputs(4, 50, torch.float32)
    with pytest.raises(ValueError, match="needs both"):
        TD.triton_divergence_and_grad(s, teacher_topk_ids=t[:, :3].long(), kind="akl")
    with pytest.raises(ValueError, match="!= student"):
        TD.triton_divergence_and_grad(s, teacher_logits=t[:3], kind="akl")


@pytest.mark.parametrize("grad_weight_dtype", [None, torch.bfloat16])
def test_fused_linear_bf16_sparse_teacher_as_the_train_stage_calls_it(grad_weight_dtype):
    """bf16 hidden and lm_head, top-k teacher, token weights, bias, target log-probs: the Triton
    path (gradient written over each chunk's logits; weight-gradient sum in float32, or in bf16
    when asked) against the float64 unfused reference."""
    from opdflow.kernels import distillation_loss, fused_linear_distillation_loss

    g = torch.Generator().manual_seed(11)
    n, h, v = 11, 16, 300
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.3
    bias = torch.randn(v, generator=g) * 0.1
    lp, ids = torch.topk(torch.log_softmax(torch.randn(n, v, generator=g) * 2, -1), 8, dim=-1)
    weights = torch.rand(n, generator=g) * 2
    mask = torch.tensor([True] * 9 + [False, True])
    targets = torch.randint(0, v, (n,), generator=g)
    teacher = dict(teacher_topk_ids=ids.to(DEVICE), teacher_topk_logprobs=lp.to(DEVICE), mask=mask.to(DEVICE),
                   weights=weights.to(DEVICE), kind="reverse_kl")

    leaves = [x.to(DEVICE, torch.bfloat16).requires_grad_(True) for x in (hidden, weight, bias)]
    target_lp = torch.full((n,), float("nan"), device=DEVICE)
    loss, per_token = fused_linear_distillation_loss(*leaves, **teacher, chunk_size=4, backend="triton",
                                                     target_ids=targets.to(DEVICE), target_logprobs_out=target_lp,
                                                     grad_weight_dtype=grad_weight_dtype)
    loss.backward()

    ref = [x.to(DEVICE, torch.bfloat16).double().requires_grad_(True) for x in (hidden, weight, bias)]
    logits = ref[0] @ ref[1].t() + ref[2]
    want_loss, want_per_token = distillation_loss(logits, **teacher, backend="reference")
    want_loss.backward()
    want_lp = torch.log_softmax(logits.detach(), -1).gather(-1, targets.to(DEVICE)[:, None])[:, 0]

    tol = dict(atol=2e-2, rtol=2e-2)  # bf16 logits and gradients
    torch.testing.assert_close(loss.detach().double(), want_loss.detach(), **tol)
    torch.testing.assert_close(per_token.double(), want_per_token.double(), **tol)
    torch.testing.assert_close(target_lp.double(), want_lp, **tol)
    for got, want in zip(leaves, ref):
        assert got.grad.dtype == torch.bfloat16
        torch.testing.assert_close(got.grad.double(), want.grad, **tol)


# The pipelined schedule: rows split over several programs (split_chunks chunks each), row groups
# of rows_per_group, a last group that is only partly filled, and split statistics combined
# across programs. Under the interpreter programs run one after another in ticket order, so
# the waits are satisfied at once; the cross-program reduction and the work mapping are what
# these tests check (their GPU speed is unmeasured).
PIPE = dict(schedule="pipelined", rows_per_group=2, split_chunks=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,beta", KIND_CASES)
def test_pipelined_matches_reference(kind, beta, dtype):
    s, t = _inputs(5, 301, dtype)
    got, want = _run_both(s, teacher=dict(teacher_logits=t), kind=kind, beta=beta,
                          temperature=0.8, block_size=32, **PIPE)  # 5 splits, 3 row groups
    _check(got, want, dtype)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_pipelined_odd_shape_and_default_split(kind, beta):
    s, t = _inputs(41, 1271, torch.float32, seed=2)
    got, want = _run_both(s, teacher=dict(teacher_logits=t), kind=kind, beta=beta, block_size=256,
                          schedule="pipelined", rows_per_group=3, split_chunks=2)
    _check(got, want, torch.float32)
    got2 = TD.triton_divergence_and_grad(s, teacher_logits=t, kind=kind, beta=beta,
                                         schedule="pipelined", block_size=256)
    _check(got2, want, torch.float32)


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 0.3), ("akl", 0.5)])
def test_pipelined_extreme_masked_and_in_place(kind, beta):
    s = torch.tensor([[1e4, -1e4, 0.0, -math.inf, 5.0, 1.0, -3.0],
                      [-1e4, -1e4, -1e4, -math.inf, -1e4, -1e4, 1e4],
                      [float("nan")] * 7,
                      [0.0, 1e4, -1e4, -math.inf, 1e4, 2.0, -math.inf]], device=DEVICE)
    t = torch.tensor([[-1e4, 1e4, 3.0, -math.inf, 0.0, 1.0, 2.0],
                      [1e4, -1e4, 0.0, -math.inf, -1e4, 3.0, 0.0],
                      [0.0] * 7,
                      [0.0, 1e4, -1e4, -math.inf, 1e4, 2.0, -math.inf]], device=DEVICE)
    mask = torch.tensor([True, True, False, True], device=DEVICE)
    opts = dict(kind=kind, beta=beta, block_size=2, schedule="pipelined", rows_per_group=3,
                split_chunks=1)
    got = TD.triton_divergence_and_grad(s, teacher_logits=t, row_mask=mask, **opts,
                                        **_poisoned(4, 7, torch.float32))
    want = R.per_token_divergence_and_grad(s.double().cpu()[mask.cpu()], teacher_logits=t.double().cpu()[mask.cpu()],
                                           kind=kind, beta=beta)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g[mask].double().cpu(), w, atol=1e-2, rtol=1e-3)
    assert got[0][2] == 0 and got[2][2] == 0 and torch.all(got[1][2] == 0)
    buf = s.clone()
    in_place = TD.triton_divergence_and_grad(buf, teacher_logits=t, row_mask=mask, grad_out=buf, **opts)
    assert in_place[1].data_ptr() == buf.data_ptr()
    for a, b in zip(in_place, got):
        torch.testing.assert_close(a, b)


def test_pipelined_refuses_a_sparse_teacher_and_unknown_schedules():
    s, t = _inputs(2, 40, torch.float32)
    ids, lp = _topk(t, 3)
    with pytest.raises(ValueError, match="needs a dense teacher"):
        TD.triton_divergence_and_grad(s, teacher_topk_ids=ids, teacher_topk_logprobs=lp,
                                      schedule="pipelined")
    with pytest.raises(ValueError, match="unknown schedule"):
        TD.triton_divergence_and_grad(s, teacher_logits=t, schedule="split")

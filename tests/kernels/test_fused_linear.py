"""Fused lm_head + loss vs the unfused reference (logits materialized, then the loss)."""

import pytest
import torch

from opdflow.kernels import FusedLinearDistillationLoss, distillation_loss, fused_linear_distillation_loss


def _setup(n=13, h=8, v=37, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype) * 0.5
    bias = torch.randn(v, generator=g, dtype=dtype) * 0.1
    t_hidden = torch.randn(n, h, generator=g, dtype=dtype)
    t_weight = torch.randn(v, h, generator=g, dtype=dtype) * 0.5
    mask = torch.rand(n, generator=g) > 0.2
    weights = torch.rand(n, generator=g, dtype=dtype)
    return hidden, weight, bias, t_hidden, t_weight, mask, weights


def _grads(fn, *tensors):
    leaves = [x.clone().requires_grad_(True) for x in tensors]
    loss, per_token = fn(*leaves)
    (loss * 2.5).backward()
    return loss.detach(), per_token, [x.grad for x in leaves]


@pytest.mark.parametrize("teacher_kind", ["dense", "sparse", "hidden"])
@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_fused_matches_unfused(teacher_kind, kind):
    hidden, weight, bias, th, tw, mask, weights = _setup()
    t_logits = th @ tw.t()
    if teacher_kind == "dense":
        teacher = dict(teacher_logits=t_logits)
    elif teacher_kind == "sparse":
        lp, ids = torch.topk(torch.log_softmax(t_logits, -1), 5, dim=-1)
        teacher = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp)
    else:
        teacher = dict(teacher_hidden=th, teacher_weight=tw)
    ref_teacher = dict(teacher_logits=t_logits) if teacher_kind == "hidden" else teacher

    def unfused(h, w, b):
        return distillation_loss(
            h @ w.t() + b, **ref_teacher, mask=mask, weights=weights, kind=kind, backend="reference"
        )

    def fused(h, w, b):
        return fused_linear_distillation_loss(
            h, w, b, **teacher, mask=mask, weights=weights, kind=kind, chunk_size=4,
            backend="reference",
        )

    want = _grads(unfused, hidden, weight, bias)
    got = _grads(fused, hidden, weight, bias)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1].float() if got[1].dtype == torch.float32 else want[1])
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w)


def test_fused_module_float32_no_bias_and_all_masked():
    hidden, weight, _, th, tw, _, _ = _setup(dtype=torch.float32)
    module = FusedLinearDistillationLoss(kind="forward_kl", chunk_size=5, backend="reference")
    t_logits = th @ tw.t()
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, per_token = module(h, w, teacher_logits=t_logits)
    loss.backward()
    h2 = hidden.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    loss2, per_token2 = distillation_loss(h2 @ w2.t(), teacher_logits=t_logits, kind="forward_kl")
    loss2.backward()
    torch.testing.assert_close(loss.detach(), loss2.detach())
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    none = torch.zeros(hidden.shape[0], dtype=torch.bool)
    h3 = hidden.clone().requires_grad_(True)
    loss3, _ = module(h3, weight, teacher_logits=t_logits, mask=none)
    loss3.backward()
    assert float(loss3.detach()) == 0.0 and torch.all(h3.grad == 0)


def test_target_logprobs_from_the_same_chunks():
    hidden, weight, bias, th, tw, mask, weights = _setup(dtype=torch.float32)
    targets = torch.randint(0, weight.shape[0], (hidden.shape[0],), generator=torch.Generator().manual_seed(3))
    out = torch.full((hidden.shape[0],), float("nan"))
    fused_linear_distillation_loss(hidden, weight, bias, teacher_hidden=th, teacher_weight=tw,
                                   chunk_size=4, target_ids=targets, target_logprobs_out=out)
    want = torch.log_softmax(hidden @ weight.t() + bias, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="go together"):
        fused_linear_distillation_loss(hidden, weight, teacher_hidden=th, teacher_weight=tw, target_ids=targets)


def test_grad_weight_dtype_is_float32_or_the_weights_own():
    hidden, weight, _, th, tw, _, _ = _setup(dtype=torch.float32)
    with pytest.raises(ValueError, match="grad_weight_dtype"):
        fused_linear_distillation_loss(hidden, weight, teacher_logits=th @ tw.t(), grad_weight_dtype=torch.bfloat16)


def test_bf16_weight_gradient_summed_in_bf16_stays_close_to_the_float32_sum():
    hidden, weight, _, th, tw, _, weights = _setup(n=64, h=16, v=50, dtype=torch.float32)
    t_logits = th @ tw.t()
    grads = []
    for dtype in (None, torch.bfloat16):
        w = weight.bfloat16().requires_grad_(True)
        loss, _ = fused_linear_distillation_loss(hidden.bfloat16(), w, teacher_logits=t_logits, weights=weights,
                                                 chunk_size=8, backend="reference", grad_weight_dtype=dtype)
        loss.backward()
        assert w.grad.dtype == torch.bfloat16
        grads.append(w.grad.float())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-3, rtol=3e-2)


def test_the_graph_backpropagates_once_and_says_so_the_second_time():
    hidden, weight, _, th, tw, _, _ = _setup(dtype=torch.float32)
    h = hidden.clone().requires_grad_(True)
    loss, _ = fused_linear_distillation_loss(h, weight, teacher_logits=th @ tw.t(), backend="reference")
    (loss * 3).backward(retain_graph=True)
    first = h.grad.clone()
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()
    torch.testing.assert_close(h.grad, first)

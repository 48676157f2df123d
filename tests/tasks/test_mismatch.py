"""The logprob mismatch report: known answers for the statistics, TIS weights, and the report."""
from __future__ import annotations

import base64
import math

import numpy as np
import pytest
import torch

from opdflow.tasks.mismatch import (K3_WARN, MEAN_ABS_WARN, flat, histogram_png, mismatch_markdown,
                                    mismatch_stats, tis_weights)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_identical_inputs_give_zeros():
    lp = np.log(np.array([0.9, 0.5, 0.01, 0.3]))
    st = mismatch_stats(lp, lp.copy())
    assert st == {"n_tokens": 4, "mean_abs_diff": 0.0, "p99_abs_diff": 0.0, "max_abs_diff": 0.0, "k3_kl": 0.0,
                  "share_abs_diff_gt_0_1": 0.0}


def test_hand_computed_case():
    # p_sampler = 0.5 everywhere; p_trainer = 0.5, 1.0, 0.25, 0.5  ->  r = 1, 2, 1/2, 1
    sampler = np.log([0.5, 0.5, 0.5, 0.5])
    trainer = np.log([0.5, 1.0, 0.25, 0.5])
    st = mismatch_stats(sampler, trainer)
    ln2 = math.log(2)
    # k3 terms (r - 1) - log r: 0, 1 - ln2, -1/2 + ln2, 0  ->  sum 1/2, mean 1/8
    assert st["k3_kl"] == pytest.approx(0.125, abs=1e-12)
    assert st["n_tokens"] == 4
    assert st["mean_abs_diff"] == pytest.approx(ln2 / 2, abs=1e-12)
    assert st["max_abs_diff"] == pytest.approx(ln2, abs=1e-12)
    assert st["share_abs_diff_gt_0_1"] == 0.5
    # sorted |Δ| = 0, 0, ln2, ln2: the 99th percentile (linear) sits between the top two, both ln2
    assert st["p99_abs_diff"] == pytest.approx(ln2, abs=1e-12)


def test_k3_is_nonnegative_and_small_for_small_noise():
    rng = np.random.default_rng(0)
    s = np.log(rng.uniform(0.05, 1.0, 10_000))
    t = s + rng.normal(0, 1e-3, s.size)
    st = mismatch_stats(s, t)
    # for small Δ, (e^Δ - 1) - Δ ≈ Δ²/2
    assert 0 < st["k3_kl"] == pytest.approx(np.mean((t - s) ** 2) / 2, rel=1e-2)
    assert st["mean_abs_diff"] < MEAN_ABS_WARN and st["k3_kl"] < K3_WARN
    assert st["share_abs_diff_gt_0_1"] == 0.0


def test_share_threshold_is_strict():
    st = mismatch_stats(np.zeros(4), np.array([0.1, 0.1000001, -0.2, 0.05]))
    assert st["share_abs_diff_gt_0_1"] == 0.5


def test_p99():
    # |Δ| = 0, 1, ..., 100 (101 tokens): the 99th percentile is exactly 99, the max 100
    d = np.arange(101, dtype=np.float64)
    st = mismatch_stats(np.zeros(101), -d)
    assert st["p99_abs_diff"] == 99.0 and st["max_abs_diff"] == 100.0 and st["mean_abs_diff"] == 50.0


def test_empty_and_bad_inputs():
    assert mismatch_stats(np.array([]), np.array([]))["n_tokens"] == 0
    with pytest.raises(ValueError, match="3 sampler logprobs but 2 trainer"):
        mismatch_stats(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="finite"):
        mismatch_stats(np.array([-np.inf]), np.array([0.0]))


def test_flat_concatenates_ragged_rows():
    assert flat([[-0.1, -0.2], [], [-0.3]]).tolist() == [-0.1, -0.2, -0.3]


def test_tis_weights_numpy_and_cap():
    s = np.log([0.5, 0.5, 0.5, 0.5])
    t = np.log([0.5, 1.0, 0.25, 0.05])  # r = 1, 2, 0.5, 0.1
    assert np.allclose(tis_weights(s, t, cap=10.0), [1.0, 2.0, 0.5, 0.1])
    assert np.allclose(tis_weights(s, t, cap=1.5), [1.0, 1.5, 0.5, 0.1])  # only the upper side is truncated
    with pytest.raises(ValueError, match="positive"):
        tis_weights(s, t, cap=0.0)


def test_tis_weights_torch():
    s = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    t = torch.log(torch.tensor([0.5, 1.0, 0.25]))
    w = tis_weights(s, t, cap=1.2)
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float32
    assert torch.allclose(w, torch.tensor([1.0, 1.2, 0.5]))
    assert torch.equal(tis_weights(s, t, cap=1.2), tis_weights(s, t.numpy(), cap=1.2))


def test_histogram_png_and_markdown():
    rng = np.random.default_rng(1)
    diffs = rng.normal(0, 0.05, 500)
    png = histogram_png(diffs)
    assert png.startswith(PNG_MAGIC)
    assert histogram_png(np.zeros(3)).startswith(PNG_MAGIC)  # all-zero |Δ| still plots
    stats = mismatch_stats(np.zeros(500), diffs)
    md = mismatch_markdown(stats, png)
    assert "| metric | value |" in md and "| tokens | 500 |" in md
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in md
    assert "train.tis_cap" in md and "bf16" in md
    assert "Above the thresholds" in md  # mean |Δ| ~ 0.04 > 1e-2


def test_markdown_verdict_when_agreeing():
    lp = np.log([0.3, 0.6])
    md = mismatch_markdown(mismatch_stats(lp, lp), histogram_png(np.zeros(2)))
    assert "Within the thresholds" in md and "Above the thresholds" not in md


def test_loss_step_records_trainer_logprobs_and_applies_tis():
    """`train_worker.loss_step`: the trainer's logprob of each sampled token, and with a TIS cap
    the loss weights min(p_trainer / p_sampler, cap) (times the bypass weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from opdflow.kernels import DistillationLoss
    from opdflow.tasks.train_worker import loss_step
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=32))
    rows = [{"prompt_ids": [1, 4, 5], "response_ids": [6, 7, 2]}, {"prompt_ids": [1, 3], "response_ids": [8, 9]}]
    for r in rows:
        r["topk_ids"] = [list(range(11))] * len(r["response_ids"])
        r["topk_logprobs"] = [[-math.log(11)] * 11] * len(r["response_ids"])
    loss_fn = DistillationLoss(kind="reverse_kl", backend="reference")
    _, _, w, trainer = loss_step(model, loss_fn, rows, frozenset({7}), 0)
    with torch.no_grad():
        for r, lo in ((rows[0], 0), (rows[1], 3)):
            logits = model(torch.tensor([r["prompt_ids"] + r["response_ids"]])).logits[0].float()
            n_p = len(r["prompt_ids"])
            want = logits.log_softmax(-1)[n_p - 1:n_p - 1 + len(r["response_ids"])]
            want = want.gather(-1, torch.tensor(r["response_ids"])[:, None]).squeeze(-1)
            assert torch.allclose(trainer[lo:lo + len(r["response_ids"])], want, atol=1e-5)
    assert not trainer.requires_grad and w.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]
    shift = torch.tensor([math.log(2), 0.0, -math.log(2), math.log(4), 0.0])  # sampler = trainer - shift
    for r, lo in ((rows[0], 0), (rows[1], 3)):
        r["logprobs"] = (trainer - shift)[lo:lo + len(r["response_ids"])].tolist()
    _, _, w_tis, _ = loss_step(model, loss_fn, rows, frozenset({7}), 0, tis_cap=3.0)
    assert torch.allclose(w_tis, torch.tensor([2.0, 0.0, 0.5, 3.0, 1.0]), atol=1e-5)


def test_train_stage_skips_the_comparison_off_the_models_distribution(tmp_path):
    """At temperature != 1 (or top-p/top-k) the sampler's logprobs are of another distribution:
    the train stage records why it did not compare, and its report says so."""
    from types import SimpleNamespace
    from opdflow.infra.config import parse_config
    from opdflow.tasks import train
    ctx = SimpleNamespace(metrics={})
    config = parse_config({"rollout": {"temperature": 0.7}})
    train.record_mismatch(ctx, config, tmp_path / "unused", tmp_path / "unused")
    assert ctx.metrics == {"mismatch": {"skipped": train.SKIPPED_DISTRIBUTION}}
    section = "\n".join(train.mismatch_section(None, {"metrics": ctx.metrics, "outputs": {}}))
    assert "skipped" in section and "temperature" in section
    assert parse_config({}).samples_the_model() and not parse_config({"rollout": {"top_k": 4}}).samples_the_model()

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

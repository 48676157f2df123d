"""The ablation verdict's statistics on synthetic per-item results whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest

from opdflow.tasks.stats import bootstrap_means, compare, mean_ci, percentile_ci, sign_flip_test, tost


def _arm(rng, p: float, seeds, n_items: int, seed_sd: float = 0.0) -> dict:
    """{seed: {item: 0/1}}, each item correct with probability p (+ a per-seed offset)."""
    out = {}
    for s in seeds:
        ps = min(1.0, max(0.0, p + rng.normal(0, seed_sd))) if seed_sd else p
        out[s] = {i: int(v) for i, v in enumerate(rng.random(n_items) < ps)}
    return out


def test_planted_effect_is_harm_or_benefit():
    rng = np.random.default_rng(1)
    good, bad = _arm(rng, 0.75, [1, 2, 3, 4, 5], 200), _arm(rng, 0.55, [1, 2, 3, 4, 5], 200)
    c = compare(bad, good, margin=0.05, n_resamples=2000, seed=0)
    assert c["outcome"] == "harm" and c["ci_high"] < 0 and c["p_sign_flip"] < 0.01
    assert c["diff"] == pytest.approx(np.mean([np.mean(list(bad[s].values())) - np.mean(list(good[s].values()))
                                               for s in bad]))
    assert compare(good, bad, margin=0.05, n_resamples=2000, seed=0)["outcome"] == "benefit"


def test_no_effect_with_large_n_is_equivalent():
    rng = np.random.default_rng(2)
    a, b = _arm(rng, 0.6, range(5), 2000), _arm(rng, 0.6, range(5), 2000)
    c = compare(a, b, margin=0.05, n_resamples=2000, seed=0)
    assert c["outcome"] == "equivalent" and -0.05 < c["ci90_low"] < c["ci90_high"] < 0.05
    assert c["tost"]["p"] < 0.05


def test_no_effect_with_tiny_n_is_inconclusive():
    a = {1: {i: i % 2 for i in range(10)}, 2: {i: i % 2 for i in range(10)}}
    b = {1: {i: 1 - i % 2 for i in range(10)}, 2: {i: 1 - i % 2 for i in range(10)}}
    c = compare(a, b, margin=0.05, n_resamples=2000, seed=0)
    assert c["diff"] == 0.0 and c["outcome"] == "inconclusive"
    assert c["ci_low"] < -0.05 and c["ci_high"] > 0.05 and c["tost"]["p"] >= 0.05


def test_a_floor_effect_on_few_items_is_not_equivalence():
    """Every item wrong in both arms: the bootstrap collapses to 0, but 2 seeds x 8 items cannot
    bound a 0.05 effect (rule of three: 3/16); with 3 seeds x 200 items they can."""
    zeros = lambda n_seeds, n: {s: {i: 0 for i in range(n)} for s in range(n_seeds)}  # noqa: E731
    c = compare(zeros(2, 8), zeros(2, 8), margin=0.05, n_resamples=200, seed=0)
    assert c["ci_low"] == c["ci_high"] == 0.0 and c["tost"]["p"] < 0.05 and c["outcome"] == "inconclusive"
    assert compare(zeros(3, 200), zeros(3, 200), margin=0.05, n_resamples=200, seed=0)["outcome"] == "equivalent"


def test_pairs_on_shared_seeds_and_items_only():
    a = {1: {0: 1, 1: 1, 2: 0}, 2: {0: 1, 1: 0}}
    b = {1: {0: 0, 1: 1, 2: 1}, 2: {0: 0, 1: 0}, 3: {0: 1, 1: 1}}
    c = compare(a, b, margin=0.1, n_resamples=200, seed=0)
    assert c["seeds"] == [1, 2] and c["n_items"] == 2  # item 2 is missing in seed 2
    assert c["per_seed_diff"] == [0.5, 0.5] and c["diff"] == 0.5
    with pytest.raises(ValueError, match="share no training seed"):
        compare({1: {0: 1}}, {2: {0: 1}}, margin=0.1)


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(3)
    a, b = _arm(rng, 0.5, [1, 2, 3], 50), _arm(rng, 0.6, [1, 2, 3], 50)
    assert compare(a, b, 0.05, 500, seed=7) == compare(a, b, 0.05, 500, seed=7)
    assert compare(a, b, 0.05, 500, seed=7)["ci_low"] != compare(a, b, 0.05, 500, seed=8)["ci_low"]


def test_sign_flip_and_tost_known_values():
    # all differences +1: no sign assignment but the identity reaches |mean| = 1
    assert sign_flip_test(np.ones((2, 10)), 999, 0) < 0.01
    # an exactly symmetric sample: every assignment reaches |mean| >= 0
    assert sign_flip_test(np.array([[1.0, -1.0]]), 99, 0) == 1.0
    t = tost(np.array([-0.01, 0.0, 0.01] * 100), margin=0.05)
    assert t["p"] < 0.01
    assert tost(np.array([0.04, 0.06] * 100), margin=0.05)["p"] > 0.4


@pytest.mark.parametrize("seed_sd, lo, hi", [(0.0, 0.95, 1.0), (0.05, 0.88, 0.99)])
def test_bootstrap_interval_covers_the_true_difference(seed_sd, lo, hi):
    """Coverage sanity: 4 seeds x 80 items, true mean difference 0.10, 150 replicates. With no
    seed-to-seed variation of the effect, the two-stage bootstrap is conservative (it counts
    the item noise at both levels); with an effect that varies by seed (sd 0.05) the seed
    level carries real variance and the interval's coverage is near its nominal 95%."""
    rng = np.random.default_rng(4)
    hits, reps = 0, 150
    for k in range(reps):
        a, b = {}, {}
        for s in range(4):
            off = rng.normal(0, seed_sd) if seed_sd else 0.0
            ua, ub = rng.random(80), rng.random(80)
            a[s] = {i: int(ua[i] < 0.6 + off) for i in range(80)}
            b[s] = {i: int(ub[i] < 0.5) for i in range(80)}
        c = compare(a, b, margin=0.05, n_resamples=400, seed=k)
        hits += c["ci_low"] <= 0.10 <= c["ci_high"]
    coverage = hits / reps
    print(f"seed sd {seed_sd}: coverage of the 95% interval {coverage:.3f}")
    assert lo <= coverage <= hi


def test_mean_ci_brackets_the_mean():
    x = np.array([[1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 0, 1]], dtype=float)
    m = mean_ci(x, 500, 0)
    assert m["mean"] == pytest.approx(0.75) and m["ci_low"] <= 0.75 <= m["ci_high"]
    assert percentile_ci(bootstrap_means(np.ones((2, 3)), 100, 0)) == (1.0, 1.0)

"""The statistics behind the ablation verdict: is bypassing a token set harmful, beneficial,
equivalent to not bypassing it within a declared margin, or is the evidence too thin?

Why not a 2-standard-error rule on one training run: run-to-run variation of one arm
(training seed) is as large as the effects in question, and "within 2 SE" is absence of
evidence, not evidence of absence. So each arm runs once per training seed, every arm of a
seed is evaluated on the same items, and the comparison A - B uses

* the **mean difference** D = mean over seeds of mean over items of (y_A - y_B), where y
  is an item's score (exact match: 0/1), paired on items within a seed (the arms of a seed
  share the evaluation prompts and the seed's training randomness);
* a **95% confidence interval from a hierarchical bootstrap**: resample seeds with
  replacement, then items with replacement within each drawn seed, and recompute D; the
  2.5% and 97.5% percentiles. Both sources of variation, training runs and items, are in
  it. With few seeds (3 on the demo) the seed level is resampled from very few values, so
  the interval is optimistic about training-run variation; more seeds is the remedy;
* a **paired sign-flip test** over seeds x items: under the sharp null that bypassing
  changes nothing, the two arms' outcomes on an item of a seed are exchangeable, so the
  sign of each paired difference is a fair coin; the p-value is the share of random sign
  assignments whose |mean| reaches the observed |D| (two-sided, with the +1 correction so
  it is never 0). It is exact under that null and needs no normality, which a t-test on
  0/1 outcomes with 3 seeds would. It treats items as the unit, so it does not carry the
  seed-level variation: that is why the verdict also asks the bootstrap interval to
  exclude 0 (flipping whole seeds instead would be valid but, with 3 seeds, cannot reach
  p < 0.25);
* an **equivalence test (TOST)** against a declared margin m (absolute accuracy): two
  one-sided tests, H0: D <= -m and H0: D >= m, each at 5% on the bootstrap distribution;
  equivalence is shown when both reject, i.e. the 90% bootstrap interval lies inside
  (-m, m), and there are at least 3/m paired observations (`resolves`: fewer cannot
  bound an effect of size m even when every pair agrees; the bootstrap would collapse).

The verdict (`verdict`): **equivalent** within +-m when TOST rejects (a difference may still
be detectable, but it is smaller than the margin: the text says so); else **harm** (D < 0)
or **benefit** (D > 0) when the 95% interval excludes 0 and the sign-flip test rejects at
5%; else **inconclusive**. A non-significant difference is never reported as "no
difference". Everything is seeded and deterministic (numpy's PCG64 from `seed`).
"""
from __future__ import annotations

import math

import numpy as np

from opdflow.infra.config import AblationConfig, default

N_RESAMPLES = default(AblationConfig, "n_resamples")

ALPHA = 0.05
OUTCOMES = ("harm", "benefit", "equivalent", "inconclusive")
_BLOCK = 256  # bootstrap resamples drawn at once (bounds memory: BLOCK x seeds x items)


def paired_matrix(a: dict[int, dict], b: dict[int, dict]) -> tuple[np.ndarray, list[int], list]:
    """Per-item differences A - B as a [seeds, items] array, on the seeds both arms have and
    the items both have in every one of those seeds (`a`, `b`: {seed: {item_id: score}})."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the two arms share no training seed")
    items = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)), key=repr)
    if not items:
        raise ValueError("the two arms share no evaluation item")
    d = np.array([[float(a[s][i]) - float(b[s][i]) for i in items] for s in seeds], dtype=np.float64)
    return d, seeds, items


def bootstrap_means(x: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Hierarchical bootstrap of the grand mean of x [seeds, items]: each resample draws the
    seeds with replacement, then, for every drawn seed, the items with replacement."""
    rng = np.random.default_rng(seed)
    n_seeds, n_items = x.shape
    out = np.empty(n_resamples)
    for lo in range(0, n_resamples, _BLOCK):
        b = min(_BLOCK, n_resamples - lo)
        s_idx = rng.integers(0, n_seeds, size=(b, n_seeds))
        i_idx = rng.integers(0, n_items, size=(b, n_seeds, n_items))
        out[lo:lo + b] = x[s_idx[:, :, None], i_idx].mean(axis=(1, 2))
    return out


def percentile_ci(boot: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def mean_ci(x: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of x [seeds, items] with its hierarchical-bootstrap interval (the learning curves' band)."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = percentile_ci(bootstrap_means(x, n_resamples, seed), level)
    return {"mean": float(x.mean()), "ci_low": lo, "ci_high": hi, "n_seeds": x.shape[0], "n_items": x.shape[1]}


def sign_flip_test(d: np.ndarray, n_resamples: int, seed: int) -> float:
    """Two-sided paired sign-flip (permutation) test of mean(d) = 0 over all seed x item
    pairs: p = (1 + #{|mean(signs * d)| >= |mean(d)|}) / (1 + n_resamples)."""
    rng = np.random.default_rng(seed)
    flat = np.asarray(d, dtype=np.float64).ravel()
    observed = abs(flat.mean())
    hits = 0
    for lo in range(0, n_resamples, _BLOCK):
        b = min(_BLOCK, n_resamples - lo)
        signs = rng.integers(0, 2, size=(b, flat.size)) * 2 - 1
        hits += int(np.sum(np.abs((signs * flat).mean(axis=1)) >= observed - 1e-12))
    return (1 + hits) / (1 + n_resamples)


def tost(boot: np.ndarray, margin: float) -> dict:
    """Two one-sided tests of |D| < margin on the bootstrap distribution of D: p_lower for
    H0 D <= -margin, p_upper for H0 D >= margin; p = the larger."""
    p_lower = float((1 + np.sum(boot <= -margin)) / (1 + boot.size))
    p_upper = float((1 + np.sum(boot >= margin)) / (1 + boot.size))
    return {"p_lower": p_lower, "p_upper": p_upper, "p": max(p_lower, p_upper)}


def compare(a: dict[int, dict], b: dict[int, dict], margin: float, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """A vs B on per-item scores ({seed: {item_id: score}} each): the difference A - B, its
    95% and 90% hierarchical-bootstrap intervals, the sign-flip p-value, TOST against
    `margin`, and the verdict (see the module docstring)."""
    d, seeds, items = paired_matrix(a, b)
    boot = bootstrap_means(d, n_resamples, seed)
    lo, hi = percentile_ci(boot, 0.95)
    lo90, hi90 = percentile_ci(boot, 0.90)
    out = {"diff": float(d.mean()), "ci_low": lo, "ci_high": hi, "ci90_low": lo90, "ci90_high": hi90,
           "p_sign_flip": sign_flip_test(d, n_resamples, seed + 1), "tost": tost(boot, margin), "margin": margin,
           "n_seeds": len(seeds), "n_items": len(items), "seeds": seeds,
           "per_seed_diff": [float(v) for v in d.mean(axis=1)], "n_resamples": n_resamples, "bootstrap_seed": seed}
    out["outcome"] = verdict(out)
    return out


def resolves(n_pairs: int, margin: float) -> bool:
    """Whether n paired 0/1 observations can resolve an effect of size `margin` at all: with
    none discordant, the 95% upper bound on the discordant share is about 3/n (the rule of
    three), and |D| can be as large as that share. Below n = 3/margin the bootstrap may
    collapse to a point (e.g. every item wrong in both arms) and TOST would call a floor
    effect "equivalent"; the verdict then says inconclusive."""
    return n_pairs * margin >= 3.0


def verdict(c: dict, alpha: float = ALPHA) -> str:
    """harm / benefit / equivalent / inconclusive from a `compare` result."""
    if c["tost"]["p"] < alpha and resolves(c["n_seeds"] * c["n_items"], c["margin"]):
        return "equivalent"
    if (c["ci_low"] > 0 or c["ci_high"] < 0) and c["p_sign_flip"] < alpha:
        return "harm" if c["diff"] < 0 else "benefit"
    return "inconclusive"


def describe(c: dict, what: str, metric: str = "accuracy") -> str:
    """One sentence for a `compare` result, never 'no difference' from a non-significant test."""
    ci = f"{c['diff']:+.3f} [95% CI {c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
    n = f"{c['n_seeds']} seeds x {c['n_items']} items"
    m = c["margin"]
    if c["outcome"] == "equivalent":
        extra = (" The difference is detectable but smaller than the margin."
                 if c["ci_low"] > 0 or c["ci_high"] < 0 else "")
        return (f"{what}: equivalent within ±{m:.3f} {metric} (TOST p = {c['tost']['p']:.3g}); "
                f"difference {ci}, {n}.{extra}")
    if c["outcome"] in ("harm", "benefit"):
        return (f"{what}: {c['outcome']}: {metric} difference {ci}, sign-flip p = {c['p_sign_flip']:.3g}, {n}.")
    return (f"{what}: inconclusive: difference {ci}, sign-flip p = {c['p_sign_flip']:.3g}, TOST p = "
            f"{c['tost']['p']:.3g} against ±{m:.3f}, {n}. The data neither show an effect nor rule out one "
            f"larger than the margin.")


def mcnemar(a: list[bool], b: list[bool], level: float = 0.95) -> dict:
    """McNemar's exact test on paired binary outcomes (item i scored under arm A and arm B).

    Only the discordant pairs carry information: n_ab = A right and B wrong, n_ba = the
    reverse. Under H0 (the arms are exchangeable on every item) n_ab ~ Binomial(n_ab + n_ba,
    1/2); the two-sided p-value is twice the smaller tail (capped at 1; 1 when no pair is
    discordant). Also the paired difference of accuracies A - B with its Wald interval
    (variance from the discordant counts)."""
    if len(a) != len(b):
        raise ValueError(f"mcnemar needs paired outcomes: {len(a)} vs {len(b)} items")
    n = len(a)
    n_ab = sum(bool(x) and not bool(y) for x, y in zip(a, b))
    n_ba = sum(bool(y) and not bool(x) for x, y in zip(a, b))
    k = n_ab + n_ba
    if k == 0:
        p = 1.0
    else:
        tail = sum(math.comb(k, i) for i in range(min(n_ab, n_ba) + 1)) / 2 ** k
        p = min(1.0, 2 * tail)
    diff = (n_ab - n_ba) / n if n else float("nan")
    z = float(_normal_quantile(1 - (1 - level) / 2))
    se = math.sqrt(max(0.0, k - (n_ab - n_ba) ** 2 / n)) / n if n else float("nan")
    return {"n": n, "n_a_only": n_ab, "n_b_only": n_ba, "p_value": p, "diff": diff,
            "ci_low": max(-1.0, diff - z * se), "ci_high": min(1.0, diff + z * se)}


def _normal_quantile(q: float) -> float:
    """Standard normal quantile (inverse CDF) by bisection on math.erf: no scipy needed."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


__all__ = ["paired_matrix", "bootstrap_means", "percentile_ci", "mean_ci", "sign_flip_test", "tost", "compare",
           "resolves", "verdict", "describe", "OUTCOMES", "mcnemar"]

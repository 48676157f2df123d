"""The logprob mismatch report: does the sampler agree with the trainer about the tokens it sampled?

Why: on-policy distillation treats the rollouts as samples from the student the trainer is
updating. The sampler (vLLM, the native sampler, another dtype or kernel) and the trainer compute
the student's distribution separately, and if they disagree the "on-policy" samples come from a
different policy: the gradient is biased without any error being raised. For every sampled token
we have the sampler's logprob (stored with the rollout) and the trainer's recomputed logprob of the
same token; this module summarises the difference.

Pure functions, numpy in and out (torch accepted where noted), so any stage can call them:

- `mismatch_stats(sampler_lp, trainer_lp)`: n_tokens, mean/p99/max of |Δ| with Δ = trainer_lp -
  sampler_lp, the share of tokens with |Δ| > 0.1, and k3_kl, the k3 estimator of
  KL(sampler || trainer) on tokens drawn from the sampler: mean of (r - 1) - log r with
  r = p_trainer / p_sampler = exp(Δ). Each term is >= 0 and the estimator is unbiased for the KL.
- `tis_weights(sampler_lp, trainer_lp, cap)`: truncated importance-sampling weights
  min(exp(Δ), cap), which reweight sampler tokens towards the trainer's policy.
- `histogram_png(diffs)`, `mismatch_markdown(stats, png)`: the report, with the plot embedded.
"""
from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np

MEAN_ABS_WARN = 1e-2  # mean |Δ| above this: the sampler and trainer disagree
K3_WARN = 1e-3  # k3 KL(sampler || trainer) above this: same
BIG_DIFF = 0.1  # a token counts as badly off when |Δ| exceeds this


def flat(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-sequence logprob lists as one float64 array (the rollouts' and the trainer's layout)."""
    return np.asarray([x for row in rows for x in row], dtype=np.float64)


def _pair(sampler_lp, trainer_lp) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(sampler_lp, dtype=np.float64).reshape(-1)
    t = np.asarray(trainer_lp, dtype=np.float64).reshape(-1)
    if s.shape != t.shape:
        raise ValueError(f"{s.size} sampler logprobs but {t.size} trainer logprobs")
    if not (np.isfinite(s).all() and np.isfinite(t).all()):
        raise ValueError("logprobs must be finite (a -inf sampler logprob means a token it could not sample)")
    return s, t


def mismatch_stats(sampler_lp: np.ndarray, trainer_lp: np.ndarray) -> dict:
    """Summary of Δ = trainer_lp - sampler_lp over all tokens (see the module docstring)."""
    s, t = _pair(sampler_lp, trainer_lp)
    if s.size == 0:
        return {"n_tokens": 0, "mean_abs_diff": 0.0, "p99_abs_diff": 0.0, "max_abs_diff": 0.0, "k3_kl": 0.0,
                "share_abs_diff_gt_0_1": 0.0}
    d = t - s
    a = np.abs(d)
    return {
        "n_tokens": int(s.size),
        "mean_abs_diff": float(a.mean()),
        "p99_abs_diff": float(np.percentile(a, 99)),
        "max_abs_diff": float(a.max()),
        "k3_kl": float(np.mean(np.expm1(d) - d)),
        "share_abs_diff_gt_0_1": float(np.mean(a > BIG_DIFF)),
    }


def tis_weights(sampler_lp, trainer_lp, cap: float):
    """min(exp(trainer_lp - sampler_lp), cap) per token; torch in -> torch out, else numpy.
    The torch result keeps autograd history: detach it to use it as a constant loss weight."""
    if not cap > 0:
        raise ValueError(f"the TIS cap must be positive, got {cap}")
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(sampler_lp, torch.Tensor):
        trainer = torch.as_tensor(trainer_lp, dtype=sampler_lp.dtype, device=sampler_lp.device)
        return torch.exp(trainer - sampler_lp).clamp(max=cap)
    s = np.asarray(sampler_lp, dtype=np.float64)
    t = np.asarray(trainer_lp, dtype=np.float64)
    return np.minimum(np.exp(t - s), cap)


def histogram_png(diffs) -> bytes:
    """A histogram of |Δ| with a log-scale count axis, as PNG bytes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    a = np.abs(np.asarray(diffs, dtype=np.float64).reshape(-1))
    top = float(a.max()) if a.size else 0.0
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(a, bins=50, range=(0.0, top if top > 0 else 1e-6), color="#1f77b4")
    ax.set_yscale("log")
    ax.set_xlabel("|trainer logprob - sampler logprob|")
    ax.set_ylabel("tokens")
    ax.set_title(f"Sampler vs trainer logprob of the sampled token ({a.size} tokens)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def verdict(stats: dict) -> str:
    """One sentence: are the numbers within the thresholds?"""
    over = []
    if stats["mean_abs_diff"] > MEAN_ABS_WARN:
        over.append(f"mean |Δ| {stats['mean_abs_diff']:.3g} > {MEAN_ABS_WARN:g}")
    if stats["k3_kl"] > K3_WARN:
        over.append(f"k3 {stats['k3_kl']:.3g} > {K3_WARN:g}")
    if over:
        return "**Above the thresholds** (" + "; ".join(over) + "): the sampler and the trainer disagree."
    return "Within the thresholds: the sampler and the trainer agree."


def mismatch_markdown(stats: dict, png: bytes) -> str:
    """The report: a table, the histogram (embedded PNG) and what the numbers mean."""
    rows = [("tokens", f"{stats['n_tokens']}"), ("mean \\|Δ\\|", f"{stats['mean_abs_diff']:.3g}"),
            ("p99 \\|Δ\\|", f"{stats['p99_abs_diff']:.3g}"), ("max \\|Δ\\|", f"{stats['max_abs_diff']:.3g}"),
            ("k3 KL(sampler ‖ trainer)", f"{stats['k3_kl']:.3g}"),
            (f"share of tokens with \\|Δ\\| > {BIG_DIFF:g}", f"{stats['share_abs_diff_gt_0_1']:.2%}")]
    img = f"![|Δ| histogram](data:image/png;base64,{base64.b64encode(png).decode()})"
    return "\n".join([
        "# Sampler vs trainer logprobs", "",
        "| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
        img, "",
        "Δ is the trainer's recomputed logprob of each sampled token minus the logprob the sampler "
        "reported for it; k3 estimates KL(sampler ‖ trainer) from those same tokens. Both are near zero "
        "when the two compute the same policy (bf16 rounding alone gives small nonzero values). Worry "
        f"when mean |Δ| is above ~{MEAN_ABS_WARN:g} or k3 above ~{K3_WARN:g}: the samples are then not "
        "on-policy for the model being trained, typically from a precision mismatch (bf16 sampler, fp32 "
        "trainer), different sampling settings (temperature or top-p logprobs on one side only), or a "
        "backend bug (stale weights, a wrong token/logprob alignment). Setting `train.tis_cap` turns on "
        "truncated importance-sampling correction: each token's loss is weighted by "
        "min(p_trainer / p_sampler, cap).", "",
        verdict(stats),
    ])

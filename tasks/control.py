"""The random control set of the rock analysis and of the ablation's random arm.

A frequency-matched random set of token ids: the same share of counted positions as the
rock set, drawn from ids that are neither rocks nor excluded. The `rock` stage draws one
over the probe set (its report's random control); the random arm's first training round
draws one per ablation seed over that round's trained positions (`tasks/train.draw_bypass`).
Its own module so that training's code (and so its stage key, `infra/artifacts/provenance`) does not
include the rock analysis and its plots.
"""
from __future__ import annotations

import random

from opdflow.infra.models.lm import derive_seed


def token_share(counts: dict[int, int], ids) -> float:
    """The share of all counted positions whose id is in `ids`."""
    total = sum(counts.values())
    keep = set(ids)
    return sum(n for t, n in counts.items() if t in keep) / total if total else 0.0


def matched_random(counts: dict[int, int], rock: list[int], excluded: set[int], seed: int, tolerance: float,
                   attempts: int = 2000) -> dict:
    """A random control set that takes the same share of `counts` (positions per id) as the
    rock set, within `tolerance` (absolute).

    Candidates: ids with a count that are neither rocks nor in `excluded` (the caller's
    controls, dropped and special ids). Each attempt walks a seeded random permutation of
    the candidates and adds an id when the share stays below target + tolerance, until the
    share reaches target - tolerance; the first attempt inside the window wins. Returns
    {ids, share, target_share, within_tolerance, n_candidates}; when no attempt lands inside
    (the candidates cannot reach the rocks' share), the closest one, with
    within_tolerance false: the report shows both shares, so that is visible, not hidden."""
    target = token_share(counts, rock)
    total = sum(counts.values())
    cands = sorted(t for t, n in counts.items() if n > 0 and t not in set(rock) and t not in excluded)
    rng = random.Random(derive_seed(seed, "matched-random"))
    best: tuple[float, list[int], float] | None = None
    for _ in range(attempts if cands and total else 0):
        order = cands[:]
        rng.shuffle(order)
        picked, share = [], 0.0
        for t in order:
            if share >= target - tolerance:
                break
            s = counts[t] / total
            if share + s <= target + tolerance:
                picked.append(t)
                share += s
        gap = abs(share - target)
        if best is None or gap < best[0]:
            best = (gap, sorted(picked), share)
        if gap <= tolerance:
            break
    gap, ids, share = best if best else (target, [], 0.0)
    return {"ids": ids, "share": share, "target_share": target, "within_tolerance": gap <= tolerance,
            "n_candidates": len(cands)}


__all__ = ["token_share", "matched_random"]

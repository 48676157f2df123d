"""The rock-token method as plain functions, tested with known answers: aggregation by token id,
selection as the reference code does it, shares, stagnation (cross-fitted), selection stability,
categories."""
from __future__ import annotations

import math
import random
import re
from collections import defaultdict


from opdflow.infra.models.lm import derive_seed


# -- the method as plain functions (tested with known answers) ---------------------------


def aggregate(token_ids: list[int], kls: list[float], grad_norms: list[float]) -> dict[int, dict]:
    """Per token id: freq, kl_sum, kl_mean, grad_norm_sum."""
    agg: dict[int, dict] = defaultdict(lambda: {"freq": 0, "kl_sum": 0.0, "grad_norm_sum": 0.0})
    for t, k, g in zip(token_ids, kls, grad_norms):
        a = agg[t]
        a["freq"] += 1
        a["kl_sum"] += k
        a["grad_norm_sum"] += g
    for a in agg.values():
        a["kl_mean"] = a["kl_sum"] / a["freq"]
    return dict(agg)


def select(agg: dict[int, dict], n_rock: int, n_control: int, drop_top: int, min_freq: int = 1,
           ineligible: frozenset[int] | set[int] = frozenset()) -> dict[str, list[int]]:
    """Rock and control sets, as the reference code selects: ids in `ineligible` (the special
    ids unless `rock.special_eligible`) are set aside first; the `drop_top` most frequent of
    the rest are dropped; ids seen fewer than `min_freq` times are not ranked; the others are
    ranked by freq x mean KL (= cumulative KL)."""
    by_freq = sorted((t for t in agg if t not in ineligible), key=lambda t: (-agg[t]["freq"], t))
    dropped = by_freq[:drop_top]
    rest = sorted((t for t in by_freq[drop_top:] if agg[t]["freq"] >= min_freq),
                  key=lambda t: (-agg[t]["freq"] * agg[t]["kl_mean"], t))
    return {"rock": rest[:n_rock], "control": rest[n_rock:n_rock + n_control], "dropped": dropped,
            "ranked": rest}


def shares(agg: dict[int, dict], ids: list[int]) -> dict[str, float]:
    """The set's share of generated tokens, of total KL and of total gradient norm."""
    tot = {k: sum(a[k] for a in agg.values()) for k in ("freq", "kl_sum", "grad_norm_sum")}
    s = {k: sum(agg[t][k] for t in ids if t in agg) for k in tot}
    return {"token_share": s["freq"] / tot["freq"] if tot["freq"] else 0.0,
            "kl_share": s["kl_sum"] / tot["kl_sum"] if tot["kl_sum"] else 0.0,
            "grad_norm_share": s["grad_norm_sum"] / tot["grad_norm_sum"] if tot["grad_norm_sum"] else 0.0}


def set_mean_kl(agg: dict[int, dict], ids: list[int] | None) -> float:
    """Token-weighted mean KL of a set (all tokens when ids is None)."""
    keys = agg.keys() if ids is None else [t for t in ids if t in agg]
    n = sum(agg[t]["freq"] for t in keys)
    return sum(agg[t]["kl_sum"] for t in keys) / n if n else float("nan")


def stagnation(aggs: dict[str, dict[int, dict]], sets: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Mean KL of each set at each checkpoint, and the change first -> last checkpoint.

    Rows: each given set, `non_rock` (every token id seen at any checkpoint that is not in
    `sets["rock"]`, when a rock set is given) and `all` (every token, rocks included)."""
    labels = list(aggs)
    out = {}
    extra: dict[str, list[int] | None] = {}
    if "rock" in sets:
        rock = set(sets["rock"])
        extra["non_rock"] = sorted({t for a in aggs.values() for t in a} - rock)
    for name, ids in {**sets, **extra, "all": None}.items():
        row = {lab: set_mean_kl(aggs[lab], ids) for lab in labels}
        first, last = row[labels[0]], row[labels[-1]]
        row["change"] = last - first
        row["relative_change"] = (last - first) / first if first else float("nan")
        out[name] = row
    return out


def jaccard(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


# -- stagnation without selection bias ---------------------------------------------------
# Selecting rocks for high KL at the last checkpoint and then reading their KL trajectory
# off the same sequences favours "stays high" by construction (the selection picked the
# tokens whose noise was high there). Cross-fitting selects on one half of the probe
# prompts and measures the trajectories on the other half, then the reverse.


def probe_halves(prompt_ids: list[int], seed: int) -> tuple[list[int], list[int]]:
    """The probe prompts cut in two halves at random (seeded), each sorted."""
    ids = sorted(set(prompt_ids))
    random.Random(derive_seed(seed, "cross-fit")).shuffle(ids)
    mid = len(ids) // 2
    return sorted(ids[:mid]), sorted(ids[mid:])


def cross_fitted_stagnation(half_aggs: dict[str, dict[str, dict[int, dict]]], choose) -> dict[str, dict]:
    """`half_aggs[half][checkpoint]`: per-token aggregates of the two probe halves ("a", "b")
    at each compared checkpoint, in training order. For each fold, `choose(agg)` (the rock
    selection, returning {"rock": [...], "control": [...]}) runs on one half's last checkpoint
    and `stagnation` measures those sets on the other half. Returns
    {"select_a_measure_b": {"rock": [...], "control": [...], "stagnation": {...}}, "select_b_measure_a": ...}."""
    halves = list(half_aggs)
    if len(halves) != 2:
        raise ValueError(f"cross-fitting needs two halves, got {halves}")
    out = {}
    for sel_half, meas_half in (halves, halves[::-1]):
        last = list(half_aggs[sel_half])[-1]
        chosen = choose(half_aggs[sel_half][last])
        sets = {"rock": list(chosen["rock"]), "control": list(chosen["control"])}
        out[f"select_{sel_half}_measure_{meas_half}"] = {**sets, "stagnation": stagnation(half_aggs[meas_half], sets)}
    return out


def selection_persistence(aggs: dict[str, dict[int, dict]], choose) -> dict:
    """The rock set selected at every compared checkpoint, and the Jaccard overlap of each
    pair (persistence of the set across training is the paper's stagnation claim in its
    sharpest form: the same tokens stay the worst)."""
    labels = list(aggs)
    sets = {lab: list(choose(aggs[lab])["rock"]) for lab in labels}
    pairs = {f"{a}~{b}": jaccard(sets[a], sets[b]) for i, a in enumerate(labels) for b in labels[i + 1:]}
    return {"rock_sets": sets, "jaccard": pairs,
            "jaccard_with_last": {lab: jaccard(sets[lab], sets[labels[-1]]) for lab in labels}}


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r
    if len(x) < 2:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else float("nan")


def stability(records: dict[str, list], fractions: list[float], rc, seed: int,
              ineligible: frozenset[int] | set[int] = frozenset()) -> list[dict]:
    """Re-select on random subsets of the probe prompts; compare with the full selection."""
    full = aggregate(records["token_id"], records["kl"], records["grad_norm"])
    min_freq = getattr(rc, "min_freq", 1)
    full_sel = select(full, rc.n_rock, rc.n_control, rc.drop_top, min_freq, ineligible)
    prompts = sorted(set(records["prompt_id"]))
    out = []
    for frac in fractions:
        keep = set(random.Random(derive_seed(seed, "stability", frac)).sample(prompts, max(1, int(len(prompts) * frac))))
        idx = [i for i, p in enumerate(records["prompt_id"]) if p in keep]
        sub = aggregate([records["token_id"][i] for i in idx], [records["kl"][i] for i in idx],
                        [records["grad_norm"][i] for i in idx])
        sel = select(sub, rc.n_rock, rc.n_control, rc.drop_top, min_freq, ineligible)
        common = [t for t in full if t in sub]
        out.append({"fraction": frac, "prompts": len(keep), "jaccard_rock": jaccard(sel["rock"], full_sel["rock"]),
                    "spearman_score": spearman([full[t]["kl_sum"] for t in common], [sub[t]["kl_sum"] for t in common])})
    return out


def special_ids(tok) -> list[int]:
    """The tokenizer's special ids (BOS, EOS, pad, unk, ...)."""
    ids = set(getattr(tok, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(tok, name, None) is not None:
            ids.add(getattr(tok, name))
    return sorted(ids)


DISCOURSE = {"so", "then", "thus", "therefore", "because", "but", "and", "first", "next", "now", "wait", "hence"}


def category(s: str) -> str:
    w = s.strip().lower()
    if not s.strip():
        return "whitespace"
    if w.isdigit():
        return "digits"
    if w in DISCOURSE:
        return "discourse"
    if re.fullmatch(r"[+\-*/=<>^%×÷]+", w):
        return "math"
    if re.fullmatch(r"[\W_]+", w):
        return "punctuation"
    return "other"

"""Rock-token selection and figures on per-token data with a known answer."""
from __future__ import annotations


import pytest

from opdflow.tasks.control import matched_random, token_share
from opdflow.tasks.rock.measure import mean_cosines
from opdflow.tasks.rock.method import aggregate, category, jaccard, select, shares, spearman, stability, stagnation

# token id -> (frequency, KL per occurrence, grad norm per occurrence)
SPEC = {1: (10, 0.01, 0.1), 2: (8, 0.02, 0.1), 3: (4, 1.0, 2.0), 4: (6, 0.5, 1.0), 5: (2, 0.9, 1.5),
        6: (3, 0.1, 0.2), 7: (1, 0.05, 0.1)}


def _records():
    ids, kls, gns, prompts = [], [], [], []
    for t, (f, k, g) in SPEC.items():
        for i in range(f):
            ids.append(t)
            kls.append(k)
            gns.append(g)
            prompts.append(i % 4)
    return ids, kls, gns, prompts


def test_aggregate_and_select():
    ids, kls, gns, _ = _records()
    agg = aggregate(ids, kls, gns)
    assert agg[3] == {"freq": 4, "kl_sum": pytest.approx(4.0), "grad_norm_sum": pytest.approx(8.0), "kl_mean": pytest.approx(1.0)}
    sel = select(agg, n_rock=2, n_control=2, drop_top=2)
    # dropped: the two most frequent (1: 10, 2: 8); scores = freq*mean: 3->4.0, 4->3.0, 5->1.8, 6->0.3, 7->0.05
    assert sel["dropped"] == [1, 2]
    assert sel["rock"] == [3, 4] and sel["control"] == [5, 6]


def test_shares_exact():
    ids, kls, gns, _ = _records()
    agg = aggregate(ids, kls, gns)
    s = shares(agg, [3, 4])
    n = sum(f for f, _, _ in SPEC.values())
    kl_tot = sum(f * k for f, k, _ in SPEC.values())
    g_tot = sum(f * g for f, _, g in SPEC.values())
    assert s["token_share"] == pytest.approx(10 / n)
    assert s["kl_share"] == pytest.approx((4.0 + 3.0) / kl_tot)
    assert s["grad_norm_share"] == pytest.approx((8.0 + 6.0) / g_tot)


def test_stagnation_exact():
    early = aggregate([3, 3, 4], [1.0, 1.0, 0.5], [0, 0, 0])
    late = aggregate([3, 3, 4], [0.9, 0.9, 0.1], [0, 0, 0])
    st = stagnation({"initial": early, "r02": late}, {"rock": [3], "control": [4]})
    assert st["rock"]["change"] == pytest.approx(-0.1)
    assert st["rock"]["relative_change"] == pytest.approx(-0.1)
    assert st["control"]["change"] == pytest.approx(-0.4)
    assert st["all"]["initial"] == pytest.approx(2.5 / 3) and st["all"]["r02"] == pytest.approx(1.9 / 3)


def test_stability_full_fraction_is_identity():
    ids, kls, gns, prompts = _records()
    rec = {"token_id": ids, "kl": kls, "grad_norm": gns, "prompt_id": prompts}

    class RC:
        n_rock, n_control, drop_top = 2, 2, 2
    out = stability(rec, [1.0], RC, seed=0)
    assert out[0]["jaccard_rock"] == 1.0 and out[0]["spearman_score"] == pytest.approx(1.0)


def test_jaccard_spearman_known_values():
    assert jaccard([1, 2, 3], [2, 3, 4]) == pytest.approx(0.5)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)


def test_select_min_freq_and_special_ids():
    ids, kls, gns, _ = _records()
    agg = aggregate(ids, kls, gns)
    # id 7 is seen once: below min_freq 2 it is not ranked at all (neither rock nor control)
    sel = select(agg, n_rock=2, n_control=10, drop_top=2, min_freq=2)
    assert 7 not in sel["ranked"] and sel["control"] == [5, 6]
    # an ineligible (special) id is set aside before the most frequent are dropped
    sel = select(agg, n_rock=2, n_control=2, drop_top=2, ineligible={3, 1})
    assert sel["dropped"] == [2, 4] and 3 not in sel["ranked"] and sel["rock"] == [5, 6]


def _counts():
    # id -> positions in the trained tokens: 1000 in all
    return {1: 300, 2: 150, 3: 100, 4: 90, 5: 80, 6: 70, 7: 60, 8: 50, 9: 40, 10: 30, 11: 20, 12: 10}


def test_matched_random_excludes_and_matches_the_trained_share():
    counts = _counts()
    rock, excluded = [3, 5], {1, 2, 12}  # e.g. controls, dropped, special
    d = matched_random(counts, rock, excluded, seed=0, tolerance=0.01)
    assert d["target_share"] == pytest.approx(0.18)
    assert set(d["ids"]).isdisjoint(set(rock) | excluded) and d["ids"]
    assert abs(d["share"] - 0.18) <= 0.01 and d["within_tolerance"]
    assert d["share"] == pytest.approx(token_share(counts, d["ids"]))
    assert d["n_candidates"] == 7  # 4, 6, 7, 8, 9, 10, 11
    # deterministic per seed; another seed is another, independent draw
    assert matched_random(counts, rock, excluded, seed=0, tolerance=0.01) == d
    others = {tuple(matched_random(counts, rock, excluded, seed=s, tolerance=0.01)["ids"]) for s in range(1, 8)}
    assert len(others) > 1
    # ids never seen in the trained tokens are not candidates
    assert 99 not in matched_random({**counts, 99: 0}, rock, excluded, seed=0, tolerance=0.01)["ids"]


def test_matched_random_says_when_the_share_cannot_be_matched():
    counts = {1: 900, 2: 50, 3: 50}
    d = matched_random(counts, [1], set(), seed=0, tolerance=0.02)
    assert d["target_share"] == pytest.approx(0.9) and not d["within_tolerance"]
    assert d["share"] == pytest.approx(0.1) and sorted(d["ids"]) == [2, 3]


def test_selection_is_on_the_last_checkpoint_in_training_order():
    from opdflow.infra.config import parse_config
    from opdflow.tasks.rock.measure import checkpoint_labels, selection_checkpoint
    for order in (["final", "initial", "middle"], ["initial", "middle", "final"], ["r02", "final", "initial"]):
        c = parse_config({"train": {"rounds": 4}, "rock": {"checkpoints": order}})
        labels = [lab for lab, _, _ in checkpoint_labels(c)]
        assert labels == sorted(labels, key=lambda x: 0 if x == "initial" else int(x[1:])), order
        assert selection_checkpoint(c) == "r04"
    c = parse_config({"train": {"rounds": 4}, "rock": {"checkpoints": ["middle", "initial"]}})
    assert [lab for lab, _, _ in checkpoint_labels(c)] == ["initial", "r02"] and selection_checkpoint(c) == "r02"


def test_probe_decoding_modes():
    from opdflow.infra.config import parse_config
    from opdflow.tasks.rock.probe import probe_settings
    sampled = probe_settings(parse_config({"rollout": {"temperature": 0.8}}))
    greedy = probe_settings(parse_config({"rollout": {"temperature": 0.8}, "rock": {"probe_decoding": "greedy"}}))
    assert sampled.temperature == 0.8 and greedy.temperature == 0.0
    assert parse_config({}).rock.probe_decoding == "sampled" and parse_config({}).rock.min_freq == 2
    assert parse_config({}).rock.special_eligible is False


def test_categories():
    assert [category(s) for s in (" ", "\n", "7", "so", "+", "=", ",", "carry")] == \
        ["whitespace", "whitespace", "digits", "discourse", "math", "math", "punctuation", "other"]


def test_mean_cosines_per_set():
    ids = [1, 1, 2, 3]
    cos = {"freq_weighted": [1.0, 0.5, -1.0, 0.0], "freq_balanced": [0.0, 0.0, 1.0, 1.0]}
    out = mean_cosines(ids, cos, {"rock": [1], "control": [2, 3]})
    assert out["rock"] == {"freq_weighted": 0.75, "freq_balanced": 0.0}
    assert out["control"] == {"freq_weighted": -0.5, "freq_balanced": 1.0}
    assert out["all"]["freq_weighted"] == pytest.approx(0.125)

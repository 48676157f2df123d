"""Stagnation without selection bias (tasks/rock/method.py): cross-fitting over probe halves, the non-rock
row, and the persistence of the rock set across checkpoints, on hand-built tables whose answer is
worked out by hand."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from opdflow.infra.artifacts.streaming import aggregate_dataset, token_dataset
from opdflow.tasks.rock.method import cross_fitted_stagnation, probe_halves, select, selection_persistence, stagnation
from opdflow.tasks.rock.analysis import unbiased_stagnation


def _agg(spec: dict[int, tuple[int, float]]) -> dict[int, dict]:
    """token -> (freq, mean KL) as the aggregate the analysis builds."""
    return {t: {"freq": f, "kl_sum": f * k, "kl_mean": k, "grad_norm_sum": 0.0} for t, (f, k) in spec.items()}


def choose(agg):
    return select(agg, n_rock=1, n_control=1, drop_top=0)


def test_probe_halves_are_a_seeded_partition():
    ids = [5, 3, 3, 9, 1, 7, 2, 8]  # repeated ids (several samples per prompt) count once
    a, b = probe_halves(ids, seed=0)
    assert sorted(a + b) == [1, 2, 3, 5, 7, 8, 9] and not set(a) & set(b) and abs(len(a) - len(b)) <= 1
    assert probe_halves(ids, seed=0) == (a, b)
    assert any(probe_halves(ids, seed=s) != (a, b) for s in range(1, 6))


def test_cross_fitting_selects_on_one_half_and_measures_on_the_other():
    # Token 10 looks like a rock on half a at the last checkpoint only by chance: on half b its KL
    # falls like everything else. Token 11 is the reverse. Same-sample analysis of half a would
    # call token 10 stagnant (0.9 -> 0.9); cross-fitted it falls 0.8 -> 0.2.
    half_aggs = {
        "a": {"initial": _agg({10: (10, 0.9), 11: (10, 0.8), 12: (10, 0.5)}),
              "final": _agg({10: (10, 0.9), 11: (10, 0.2), 12: (10, 0.1)})},
        "b": {"initial": _agg({10: (10, 0.8), 11: (10, 0.9), 12: (10, 0.5)}),
              "final": _agg({10: (10, 0.2), 11: (10, 0.9), 12: (10, 0.1)})},
    }
    same = stagnation(half_aggs["a"], {"rock": [10]})
    assert same["rock"]["change"] == pytest.approx(0.0)
    cf = cross_fitted_stagnation(half_aggs, choose)
    ab, ba = cf["select_a_measure_b"], cf["select_b_measure_a"]
    assert ab["rock"] == [10] and ab["control"] == [11]
    assert ab["stagnation"]["rock"]["initial"] == pytest.approx(0.8)
    assert ab["stagnation"]["rock"]["final"] == pytest.approx(0.2)
    assert ab["stagnation"]["rock"]["relative_change"] == pytest.approx(-0.75)
    # non-rock: tokens 11 and 12 on half b, frequency-weighted: (0.9 + 0.5) / 2 -> (0.9 + 0.1) / 2
    assert ab["stagnation"]["non_rock"]["initial"] == pytest.approx(0.7)
    assert ab["stagnation"]["non_rock"]["final"] == pytest.approx(0.5)
    # "all" includes the rock: (0.8 + 0.9 + 0.5) / 3 -> (0.2 + 0.9 + 0.1) / 3
    assert ab["stagnation"]["all"]["final"] == pytest.approx(0.4)
    assert ba["rock"] == [11] and ba["stagnation"]["rock"]["final"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="two halves"):
        cross_fitted_stagnation({"a": half_aggs["a"]}, choose)


def test_non_rock_row_weights_by_frequency_and_excludes_the_rocks():
    aggs = {"initial": _agg({1: (3, 1.0), 2: (1, 0.2)}), "final": _agg({1: (3, 1.0), 2: (1, 0.2), 3: (4, 0.1)})}
    st = stagnation(aggs, {"rock": [1], "control": [2]})
    assert set(st) == {"rock", "control", "non_rock", "all"}
    assert st["non_rock"]["initial"] == pytest.approx(0.2)
    assert st["non_rock"]["final"] == pytest.approx((0.2 + 0.4) / 5)
    assert st["all"]["final"] == pytest.approx((3.0 + 0.2 + 0.4) / 8)


def test_persistence_selects_at_every_checkpoint():
    aggs = {"initial": _agg({1: (5, 0.9), 2: (5, 0.8), 3: (5, 0.1)}),
            "r02": _agg({1: (5, 0.9), 2: (5, 0.1), 3: (5, 0.8)}),
            "r04": _agg({1: (5, 0.7), 2: (5, 0.1), 3: (5, 0.8)})}
    per = selection_persistence(aggs, lambda a: select(a, n_rock=2, n_control=0, drop_top=0))
    assert per["rock_sets"] == {"initial": [1, 2], "r02": [1, 3], "r04": [3, 1]}
    assert per["jaccard"] == {"initial~r02": pytest.approx(1 / 3), "initial~r04": pytest.approx(1 / 3),
                              "r02~r04": 1.0}
    assert per["jaccard_with_last"] == {"initial": pytest.approx(1 / 3), "r02": 1.0, "r04": 1.0}


def test_unbiased_stagnation_reads_the_halves_from_the_records(tmp_path):
    """Through the stage's path: per-position records in Parquet, halves filtered by prompt id."""
    rows = {"checkpoint": [], "prompt_id": [], "token_id": [], "kl": [], "grad_norm": []}
    # prompts 0..3; token 7 is high-KL on every prompt at both checkpoints (a true rock); token 8 low
    for ck, scale in (("initial", 1.0), ("r02", 1.0)):
        for p in range(4):
            for t, k in ((7, 2.0 * scale), (8, 0.1), (8, 0.1), (9, 0.3 if p % 2 else 0.05)):
                for col, v in zip(rows, (ck, p, t, k, 0.0)):
                    rows[col].append(v)
    pq.write_table(pa.table(rows), tmp_path / "part-00000.parquet")
    dataset = token_dataset(tmp_path)
    labels = ["r02", "initial"]  # config order need not be training order
    aggs = {lab: aggregate_dataset(dataset, filter=pc.field("checkpoint") == lab).to_dict() for lab in labels}
    out = unbiased_stagnation(dataset, labels, rows["prompt_id"], aggs, 0, choose)
    assert out["probe_halves"] == {"a": 2, "b": 2}
    for fold in out["cross_fitted"].values():
        assert fold["rock"] == [7]
        assert list(fold["stagnation"]["rock"])[:2] == ["initial", "r02"]
        assert fold["stagnation"]["rock"]["initial"] == pytest.approx(2.0)
        assert fold["stagnation"]["rock"]["change"] == pytest.approx(0.0)
        assert fold["stagnation"]["non_rock"]["initial"] < 0.3
    assert out["persistence"]["rock_sets"] == {"initial": [7], "r02": [7]}

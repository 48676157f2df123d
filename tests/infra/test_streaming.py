"""Streaming per-token aggregation over sharded Parquet, checked against known answers and
against the in-memory reference `opdflow.tasks.rock.method.aggregate`."""
from __future__ import annotations

import weakref

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from opdflow.infra.artifacts.streaming import (TokenAggregate, aggregate_batches, aggregate_dataset, dataset_batches,
                                     token_dataset, write_parts)
from opdflow.tasks.rock.method import aggregate


def _table(ids, kls, gns, **extra) -> pa.Table:
    cols = {"token_id": pa.array(ids, pa.int32()), "kl": pa.array(kls, pa.float32()),
            "grad_norm": pa.array(gns, pa.float32())}
    cols.update({k: pa.array(v) for k, v in extra.items()})
    return pa.table(cols)


def _assert_matches(got: dict, want: dict, rtol: float = 1e-9) -> None:
    assert sorted(got) == sorted(want)
    for t, w in want.items():
        g = got[t]
        assert set(g) == set(w), t
        assert g["freq"] == w["freq"], t
        for key in ("kl_sum", "grad_norm_sum", "kl_mean"):
            assert g[key] == pytest.approx(w[key], rel=rtol, abs=0), (t, key)


def test_known_answer_across_three_parts(tmp_path):
    # token 7: 3 records, kl 0.5 + 0.25 + 1.0, gn 1 + 2 + 3; token 2: 2 records; token 0: 1
    parts = [_table([7, 2], [0.5, 0.125], [1.0, 4.0]),
             _table([7], [0.25], [2.0]),
             _table([0, 7, 2], [2.0, 1.0, 0.375], [0.5, 3.0, 8.0])]
    paths = write_parts(tmp_path, parts)
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    got = aggregate_dataset(token_dataset(tmp_path)).to_dict()
    assert got == {
        7: {"freq": 3, "kl_sum": 1.75, "grad_norm_sum": 6.0, "kl_mean": 1.75 / 3},
        2: {"freq": 2, "kl_sum": 0.5, "grad_norm_sum": 12.0, "kl_mean": 0.25},
        0: {"freq": 1, "kl_sum": 2.0, "grad_norm_sum": 0.5, "kl_mean": 2.0},
    }
    assert all(type(t) is int and type(a["freq"]) is int and type(a["kl_sum"]) is float for t, a in got.items())


def _random_parts(seed: int = 0, n: int = 50_000, vocab: int = 5000):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab + 1, n)  # ids 0..5000 inclusive
    kls = rng.exponential(0.3, n).astype(np.float32)
    gns = rng.gamma(2.0, 0.5, n).astype(np.float32)
    sizes = [12_000, 1, 0, 9_999, 20_000, 3, 50_000 - 12_000 - 1 - 9_999 - 20_000 - 3]
    assert sum(sizes) == n and len(sizes) == 7
    bounds = np.cumsum([0, *sizes])
    tables = [_table(ids[a:b], kls[a:b], gns[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return tables, ids, kls, gns


def test_random_data_equals_reference_aggregate(tmp_path):
    tables, ids, kls, gns = _random_parts()
    write_parts(tmp_path, tables)
    assert tables[2].num_rows == 0
    got = aggregate_dataset(token_dataset(tmp_path), batch_size=4096).to_dict()
    # the reference sums the float32 values as Python floats (float64), as does bincount
    want = aggregate(ids.tolist(), kls.astype(np.float64).tolist(), gns.astype(np.float64).tolist())
    _assert_matches(got, want)
    assert sum(a["freq"] for a in got.values()) == len(ids)


def test_explicit_file_list_is_read_in_name_order(tmp_path):
    tables, ids, kls, gns = _random_parts(seed=1, n=50_000)
    paths = write_parts(tmp_path, tables)
    dataset = token_dataset(list(reversed(paths)))
    assert [p.rsplit("/", 1)[-1] for p in dataset.files] == [p.name for p in paths]
    got = aggregate_dataset(dataset).to_dict()
    _assert_matches(got, aggregate(ids.tolist(), kls.tolist(), gns.tolist()))


def test_merge_of_per_part_aggregates_equals_one_pass(tmp_path):
    tables, *_ = _random_parts(seed=2)
    paths = write_parts(tmp_path, tables)
    one_pass = aggregate_dataset(token_dataset(tmp_path))
    merged = TokenAggregate()
    for path in paths:
        merged.merge(aggregate_dataset(token_dataset([path])))
    n = max(one_pass.capacity, merged.capacity)
    freq_a = np.zeros(n, np.int64)
    freq_b = np.zeros(n, np.int64)
    freq_a[:one_pass.capacity] = one_pass.freq
    freq_b[:merged.capacity] = merged.freq
    np.testing.assert_array_equal(freq_a, freq_b)
    assert merged.n_records == 50_000
    _assert_matches(merged.to_dict(), one_pass.to_dict(), rtol=1e-12)


def test_merge_grows_the_smaller_side_and_rejects_other_columns():
    small, big = TokenAggregate(), TokenAggregate()
    small.update(np.array([1, 1]), {"kl": np.array([1.0, 2.0]), "grad_norm": np.array([0.5, 0.5])})
    big.update(np.array([900, 1]), {"kl": np.array([4.0, 8.0]), "grad_norm": np.array([1.0, 1.0])})
    small.merge(big)
    assert small.to_dict() == {1: {"freq": 3, "kl_sum": 11.0, "grad_norm_sum": 2.0, "kl_mean": 11.0 / 3},
                               900: {"freq": 1, "kl_sum": 4.0, "grad_norm_sum": 1.0, "kl_mean": 4.0}}
    with pytest.raises(ValueError, match="value columns"):
        small.merge(TokenAggregate(value_cols=("kl",)))


def test_filter_aggregates_one_checkpoint_only(tmp_path):
    parts = [_table([1, 1, 2], [1.0, 10.0, 2.0], [1.0, 1.0, 1.0], checkpoint=["final", "init", "final"]),
             _table([2, 3, 3], [20.0, 30.0, 3.0], [2.0, 2.0, 2.0], checkpoint=["init", "init", "final"])]
    write_parts(tmp_path, parts)
    dataset = token_dataset(tmp_path)
    final = aggregate_dataset(dataset, filter=pc.field("checkpoint") == "final").to_dict()
    assert final == {1: {"freq": 1, "kl_sum": 1.0, "grad_norm_sum": 1.0, "kl_mean": 1.0},
                     2: {"freq": 1, "kl_sum": 2.0, "grad_norm_sum": 1.0, "kl_mean": 2.0},
                     3: {"freq": 1, "kl_sum": 3.0, "grad_norm_sum": 2.0, "kl_mean": 3.0}}
    init = aggregate_dataset(dataset, filter=pc.field("checkpoint") == "init").to_dict()
    assert {t: a["kl_sum"] for t, a in init.items()} == {1: 10.0, 2: 20.0, 3: 30.0}


def test_growth_with_increasing_ids_across_batches(tmp_path):
    # one part per batch, ids increasing: 0, then small, then a large id far past capacity
    batches = [[0, 0], [1, 5], [17], [151_935, 0]]
    write_parts(tmp_path, [_table(b, [float(t) + 0.5 for t in b], [1.0] * len(b)) for b in batches])
    agg = aggregate_dataset(token_dataset(tmp_path), batch_size=2)
    assert agg.capacity >= 151_936 and agg.capacity <= 2 * 151_936
    assert agg.freq[0] == 3 and agg.freq[151_935] == 1 and agg.n_records == 7
    got = agg.to_dict()
    assert sorted(got) == [0, 1, 5, 17, 151_935]
    assert got[0] == {"freq": 3, "kl_sum": 1.5, "grad_norm_sum": 3.0, "kl_mean": 0.5}
    assert got[151_935]["kl_sum"] == 151_935.5


def test_update_doubles_capacity_and_keeps_earlier_sums():
    agg = TokenAggregate(value_cols=("kl",))
    sizes = []
    for t in [0, 3, 4, 9, 100]:
        agg.update(np.array([t], np.int32), {"kl": np.array([1.0])})
        sizes.append(agg.capacity)
    assert sizes == [1, 4, 8, 16, 101]
    assert agg.to_dict() == {t: {"freq": 1, "kl_sum": 1.0, "kl_mean": 1.0} for t in [0, 3, 4, 9, 100]}


def test_general_value_columns_without_kl():
    agg = TokenAggregate(value_cols=("loss",))
    agg.update(np.array([2, 2]), {"loss": np.array([0.25, 0.5])})
    assert agg.to_dict() == {2: {"freq": 2, "loss_sum": 0.75}}
    with pytest.raises(KeyError):
        agg.update(np.array([2]), {"kl": np.array([1.0])})


def test_batches_are_consumed_one_at_a_time_and_released():
    # bounded memory: the aggregator must not hold a batch while the next one is produced
    refs = []

    def batches():
        for i in range(4):
            if refs:
                assert refs[-1]() is None, f"batch {i - 1} still referenced while batch {i} is read"
            batch = pa.record_batch(_table([i, i + 1], [1.0, 2.0], [0.5, 0.5]).to_batches()[0])
            refs.append(weakref.ref(batch))
            yield batch
            del batch

    agg = aggregate_batches(batches())
    assert len(refs) == 4
    assert agg.to_dict()[2] == {"freq": 2, "kl_sum": 3.0, "grad_norm_sum": 1.0, "kl_mean": 1.5}


def test_dataset_batches_follow_file_order_and_batch_size(tmp_path):
    write_parts(tmp_path, [_table(list(range(i * 10, i * 10 + 10)), [0.0] * 10, [0.0] * 10) for i in range(3)])
    batches = list(dataset_batches(token_dataset(tmp_path), ["token_id"], batch_size=4))
    assert max(b.num_rows for b in batches) <= 4
    assert [t for b in batches for t in b.column("token_id").to_pylist()] == list(range(30))

"""Streaming per-token aggregation over sharded Parquet: bounded memory, vectorized.

Why this module exists: the rock-token stage aggregates per-position records (token id,
KL, gradient norm) by token id. `opdflow.tasks.rock.method.aggregate` does so over Python lists,
which hold every record in memory and touch each one from the interpreter. Per-token
tables grow with probe prompts x positions x checkpoints, so here they are read as a
pyarrow dataset over `part-NNNNN.parquet` shards, one record batch at a time, and folded
into numpy arrays indexed by token id with `np.bincount`. Memory is O(largest token id)
plus one batch (and a bounded read-ahead), whatever the number of records; the work per
batch is a handful of vectorized passes, no Python loop per record.

`TokenAggregate.to_dict()` returns exactly the structure `rock.aggregate` returns, so the
rest of the rock stage (select, shares, stagnation, ...) works unchanged on its output.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

DEFAULT_VALUE_COLS = ("kl", "grad_norm")
# Scanner read-ahead kept small (pyarrow's defaults are 16 batches and 4 files) so that
# buffered batches, and so the peak memory, stay bounded whatever the number of shards.
BATCH_READAHEAD = 1
FRAGMENT_READAHEAD = 1


# -- writing and opening sharded per-token tables ----------------------------------------


def part_name(index: int, prefix: str = "part") -> str:
    return f"{prefix}-{index:05d}.parquet"


def write_parts(dir: str | os.PathLike, tables_iter: Iterable[pa.Table], prefix: str = "part") -> list[Path]:
    """Write each table as `<prefix>-00000.parquet`, `<prefix>-00001.parquet`, ... (zstd)."""
    out_dir = Path(dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, table in enumerate(tables_iter):
        path = out_dir / part_name(i, prefix)
        pq.write_table(table, path, compression="zstd")
        paths.append(path)
    return paths


def _parquet_files(paths_or_dir) -> list[Path]:
    if isinstance(paths_or_dir, (str, os.PathLike)) and Path(paths_or_dir).is_dir():
        files = list(Path(paths_or_dir).glob("*.parquet"))
    elif isinstance(paths_or_dir, (str, os.PathLike)):
        files = [Path(paths_or_dir)]
    else:
        files = [Path(p) for p in paths_or_dir]
    if not files:
        raise ValueError(f"no parquet files in {paths_or_dir!r}")
    return sorted(files, key=lambda p: (p.name, str(p)))


def token_dataset(paths_or_dir) -> ds.Dataset:
    """A parquet dataset over a directory of parts (or a list of files), in file-name order."""
    return ds.dataset([str(p) for p in _parquet_files(paths_or_dir)], format="parquet")


# -- the aggregate ------------------------------------------------------------------------


def _grown(arr: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=arr.dtype)
    out[:len(arr)] = arr
    return out


@dataclass
class TokenAggregate:
    """Per token id: count (`freq`) and one float64 sum per value column (`sums[col]`).

    Arrays are indexed by token id and grow by doubling when a larger id arrives, so their
    length is at most twice (largest id seen + 1), never a function of the record count.
    """

    value_cols: tuple[str, ...] = DEFAULT_VALUE_COLS
    freq: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sums: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.value_cols = tuple(self.value_cols)
        for col in self.value_cols:
            self.sums.setdefault(col, np.zeros(len(self.freq), dtype=np.float64))

    @property
    def capacity(self) -> int:
        return len(self.freq)

    @property
    def n_records(self) -> int:
        return int(self.freq.sum())

    def _reserve(self, size: int) -> None:
        if size <= self.capacity:
            return
        new_size = max(size, 2 * self.capacity)
        self.freq = _grown(self.freq, new_size)
        self.sums = {col: _grown(arr, new_size) for col, arr in self.sums.items()}

    def update(self, token_ids: np.ndarray, values: Mapping[str, np.ndarray]) -> None:
        """Fold one batch of records in: token_ids[i] with values[col][i] for every column."""
        token_ids = np.asarray(token_ids)
        if token_ids.size == 0:
            return
        _check_batch(token_ids, values, self.value_cols)
        token_ids = token_ids.astype(np.intp, copy=False)  # once, not once per bincount
        self._reserve(int(token_ids.max()) + 1)
        size = self.capacity
        self.freq += np.bincount(token_ids, minlength=size)
        for col in self.value_cols:
            self.sums[col] += np.bincount(token_ids, weights=values[col], minlength=size)

    def merge(self, other: TokenAggregate) -> TokenAggregate:
        """Add another aggregate (e.g. of another shard) into this one; returns self."""
        if set(other.value_cols) != set(self.value_cols):
            raise ValueError(f"value columns differ: {self.value_cols} vs {other.value_cols}")
        self._reserve(other.capacity)
        n = other.capacity
        self.freq[:n] += other.freq
        for col in self.value_cols:
            self.sums[col][:n] += other.sums[col]
        return self

    def to_dict(self) -> dict[int, dict]:
        """`{token_id: {"freq", "<col>_sum"..., "kl_mean"}}` for ids seen, as rock.aggregate."""
        ids = np.flatnonzero(self.freq)
        columns = {"freq": self.freq[ids].tolist()}
        columns.update({f"{col}_sum": self.sums[col][ids].tolist() for col in self.value_cols})
        if "kl" in self.value_cols:
            columns["kl_mean"] = (self.sums["kl"][ids] / self.freq[ids]).tolist()
        names = list(columns)
        return {t: dict(zip(names, row)) for t, row in zip(ids.tolist(), zip(*columns.values()))}


def _check_batch(token_ids: np.ndarray, values: Mapping[str, np.ndarray], value_cols) -> None:
    if token_ids.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got {token_ids.dtype}")
    missing = [c for c in value_cols if c not in values]
    if missing:
        raise KeyError(f"missing value columns: {missing}")
    bad = [c for c in value_cols if len(values[c]) != len(token_ids)]
    if bad:
        raise ValueError(f"value columns {bad} differ in length from token ids ({len(token_ids)})")


# -- streaming over a dataset -------------------------------------------------------------


def _column(batch: pa.RecordBatch, name: str) -> np.ndarray:
    return batch.column(name).to_numpy(zero_copy_only=False)


def aggregate_batches(batches: Iterable[pa.RecordBatch], token_col: str = "token_id",
                      value_cols: Iterable[str] = DEFAULT_VALUE_COLS) -> TokenAggregate:
    """Fold record batches into a TokenAggregate, one batch at a time."""
    agg = TokenAggregate(value_cols=tuple(value_cols))
    for batch in batches:
        if batch.column(token_col).null_count:
            raise ValueError(f"null {token_col!r} in a batch")
        if batch.num_rows:
            agg.update(_column(batch, token_col), {col: _column(batch, col) for col in agg.value_cols})
        del batch  # a batch is a slice of its row group: don't hold it while the next is read
    return agg


def dataset_batches(dataset: ds.Dataset, columns: list[str], filter=None, batch_size: int = 1 << 17,
                    batch_readahead: int = BATCH_READAHEAD, fragment_readahead: int = FRAGMENT_READAHEAD):
    """Record batches of `columns`, one fragment (parquet part) after the other, in file order.

    Each fragment is scanned with `to_batches` on its own rather than through one scan of the
    whole dataset: the dataset-level scanner keeps the decoded row group of the previous
    part alive while it opens the next (a batch is a slice of its row group), which made the
    peak grow with the number of parts (measured with benchmarks/bench_rock_stream.py).
    `yield from` holds no reference to a batch once it is handed on.
    """
    for fragment in dataset.get_fragments(filter=filter):
        yield from fragment.to_batches(schema=dataset.schema, columns=columns, filter=filter, batch_size=batch_size,
                                       batch_readahead=batch_readahead, fragment_readahead=fragment_readahead)


def aggregate_dataset(dataset, token_col: str = "token_id", value_cols: Iterable[str] = DEFAULT_VALUE_COLS,
                      filter=None, batch_size: int = 1 << 17, batch_readahead: int = BATCH_READAHEAD,
                      fragment_readahead: int = FRAGMENT_READAHEAD) -> TokenAggregate:
    """Stream a dataset (or a directory / list of parquet parts) into a TokenAggregate.

    Only `token_col` and `value_cols` are read; `filter` (a pyarrow compute expression,
    e.g. `pc.field("checkpoint") == "final"`) is applied by the scanner. The dataset is
    never materialized: at most one row group's batches plus a bounded read-ahead are in
    memory. `batch_size` 2**17 rows keeps the numpy temporaries small at no cost in speed.
    """
    if not isinstance(dataset, ds.Dataset):
        dataset = token_dataset(dataset)
    value_cols = tuple(value_cols)
    batches = dataset_batches(dataset, [token_col, *value_cols], filter=filter, batch_size=batch_size,
                              batch_readahead=batch_readahead, fragment_readahead=fragment_readahead)
    return aggregate_batches(batches, token_col=token_col, value_cols=value_cols)

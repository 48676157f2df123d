"""Parquet in, Parquet out: the one table format in the store (DESIGN.md)."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq


def table_to_parquet(table) -> bytes:
    """Serialize a pyarrow Table, a dict of columns or a pandas DataFrame."""
    if isinstance(table, dict):
        table = pa.table(table)
    elif not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def parquet_to_table(data: bytes, where: str | None = None) -> pa.Table:
    """Parse Parquet bytes; an unreadable table raises CorruptObject naming its file (`where`,
    or the path that `Run.read` attached to the bytes)."""
    try:
        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as e:
        from opdflow.infra.artifacts.store import CorruptObject
        loc = where or getattr(data, "where", "<bytes not read from the store>")
        raise CorruptObject(loc.rsplit("/", 1)[-1], loc, f"not a readable Parquet table ({e})") from None

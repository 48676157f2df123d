"""Sharded stages: one Prefect task per shard, each shard committed on its own.

Rollout and teacher scoring split their work into `scale.shards` shards. A shard is a
stage of its own in the manifest (`rollout.r01.shard-002-of-004`), with its own key,
attempts and commit, and writes one Parquet part. The stage itself then commits by
linking every shard's part under one prefix (`rollouts/part-00002.parquet`): readers see
one stage whose table is a set of parts, in shard order.

So a retried or rerun stage redoes only the shards that are not committed, shards can
run anywhere the task runner puts them (threads, Dask workers on other machines), and
results never depend on the sharding: every sequence's sampling seed derives from the
run seed and the prompt, and shards are cut at batch boundaries, so every batch a shard
runs is a batch the unsharded stage would have run.
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Callable

from opdflow.infra.artifacts.manifest import Run, StageContext, run_stage

if TYPE_CHECKING:
    import pyarrow as pa

_SHARD = re.compile(r"^(?P<stage>.+)\.shard-(?P<i>\d{3})-of-(?P<n>\d{3})$")


def shard_name(stage: str, i: int, n: int) -> str:
    return f"{stage}.shard-{i:03d}-of-{n:03d}"


def split_shard_name(name: str) -> tuple[str, int, int] | None:
    """(stage, shard index, shard count) of a shard's name; None for a stage's name.

    >>> shard_name("rollout.r01", 1, 2)
    'rollout.r01.shard-001-of-002'
    >>> split_shard_name("rollout.r01.shard-001-of-002"), split_shard_name("rollout.r01")
    (('rollout.r01', 1, 2), None)
    """
    m = _SHARD.match(name)
    return (m["stage"], int(m["i"]), int(m["n"])) if m else None


def part_name(table: str, i: int) -> str:
    return f"{table}/part-{i:05d}.parquet"


def shard_bounds(n_items: int, n_shards: int, align: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges, at most `n_shards`, each a multiple of `align` items
    (but the last), none empty unless there are no items at all.

    >>> shard_bounds(10, 3, align=2)  # 4 items a shard: a multiple of 2 at least 10/3
    [(0, 4), (4, 8), (8, 10)]
    >>> shard_bounds(5, 8, align=1)  # fewer items than shards: fewer shards
    [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    >>> shard_bounds(0, 4, align=1)  # still one shard, so the stage commits an empty table
    [(0, 0)]
    """
    per = math.ceil(math.ceil(n_items / max(1, n_shards)) / align) * align
    return [(lo, min(lo + per, n_items)) for lo in range(0, n_items, max(per, 1))] or [(0, 0)]


def run_sharded(run: Run, stage: str, *, n: int, params: dict, inputs: dict, table: str,
                shard_body: Callable[[StageContext, int, int], None],
                finish: Callable[[StageContext, dict, list[dict]], None], force: bool = False, progress=None) -> tuple[dict, bool]:
    """Commit `stage` from its `n` shards: shards already committed with the right key
    are linked as they are, missing ones run here (a flow runs them first, as mapped
    tasks, so this only happens when the plain function is called alone). `force`
    recommits the stage; rerunning a shard is that shard's own stage (`run_shard` with
    force). A stage whose shards were rerun since its commit is recommitted anyway.
    `finish(ctx, parts, shard_entries)` completes the stage from the parts' refs."""

    def body(ctx: StageContext) -> None:
        seconds, hosts, entries = [], set(), []
        for i in range(n):
            entry, _ = run_shard(run, shard_name(stage, i, n), params=params, inputs=inputs,
                                 shard_body=shard_body)
            entries.append(entry)
            ctx.link(part_name(table, i), entry["outputs"]["part.parquet"])
            seconds.append(entry["seconds"])
            hosts.add(entry["stack"].get("host", "?"))
            ctx.backend.update(entry["backend"])
        ctx.backend["shards"] = n
        ctx.metrics.update(shards=n, shard_seconds_sum=round(sum(seconds), 3), shard_hosts=len(hosts))
        finish(ctx, {k: r for k, r in ctx.outputs.items() if k.startswith(table + "/")}, entries)
    recommit = force or shards_changed(run, stage, n, table)
    return run_stage(run, stage, params=params, inputs=inputs, body=body, force=recommit, progress=progress)


def shards_changed(run: Run, stage: str, n: int, table: str) -> bool:
    """True when a committed stage no longer links its shards' current parts."""
    existing = run.entry(stage)
    if existing is None:
        return False
    for i in range(n):
        shard = run.entry(shard_name(stage, i, n))
        if shard is None or shard["outputs"].get("part.parquet") != existing["outputs"].get(part_name(table, i)):
            return True
    return False


def run_shard(run: Run, name: str, *, params: dict, inputs: dict, shard_body: Callable[[StageContext, int, int], None], force: bool = False,
              progress=None) -> tuple[dict, bool]:
    """Run (or skip) one shard: its identity is the stage's plus (i, n)."""
    _, i, n = split_shard_name(name)
    return run_stage(run, name, params={**params, "shard": [i, n]}, inputs=inputs,
                     body=lambda ctx: shard_body(ctx, i, n), force=force, progress=progress)


def shard_runner(stage_parts: Callable[[Run, str], tuple[dict, dict, Callable[[StageContext, int, int], None]]]):
    """The plain function that runs one shard by name (`rollout.r01.shard-002-of-004`), made
    from the function giving a stage's (params, inputs, shard body)."""

    def run_one_shard(run: Run, name: str, force: bool = False, progress=None) -> tuple[dict, bool]:
        params, inputs, shard_body = stage_parts(run, split_shard_name(name)[0])
        return run_shard(run, name, params=params, inputs=inputs, shard_body=shard_body, force=force,
                         progress=progress)
    return run_one_shard


def concat_parts(run: Run, refs: dict) -> "pa.Table":
    """One table from parts (each verified against its recorded sha256), in name order."""
    import pyarrow as pa

    from opdflow.infra.artifacts.tables import parquet_to_table
    return pa.concat_tables([parquet_to_table(run.read(refs[k])) for k in sorted(refs)])


def read_parts(run: Run, stage: str, table: str) -> "pa.Table":
    """A committed stage's table, from its parts in shard order."""
    return concat_parts(run, run.outputs_under(stage, table))

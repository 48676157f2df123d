"""What a stage is: one `Stage` declaration per stage kind, exported by the stage's module.

A stage module (tasks/rollout.py, ...) keeps its work in plain functions and exports, as
`STAGES`, one declaration per kind it implements:

* `kind`, the name's kind (`rollout`, `eval`, `rock-probe`); its name pattern (one name, one per
  round and arm, one per model label) is its line in `tasks/plan.py`'s `REGISTRY`;
* `instances(config)`: the stage names of this kind a run has (none when the stage is off);
* `needs(config, name)`: the stage names whose committed outputs it reads: the flow submits a
  stage when those have committed (Prefect's `wait_for`, so the UI draws the graph) and runs
  independent stages at the same time; the plan is these names in an order that respects it;
* `run(run, name, force, progress) -> (entry, ran)`: the plain function (tests call it);
* a sharded stage's `shard_parts(run, name) -> (params, inputs, shard body)` and
  `n_shards(run, name)`: the flow maps one task per shard, then the stage task commits the
  stage from the committed shards (`tasks/shards.py`);
* `report(run, entry) -> markdown` (the task publishes it), and `gpus(config)`: GPU slots the
  stage task itself takes on a Dask runner with `scale.gpus_per_worker` (shard tasks take one).

The Prefect tasks are derived here (`task`, `shard_task`, made by `tasks/common.stage_task`),
so a new stage is its module and one registry line (ARCHITECTURE.md shows `sensitivity`).
This module imports nothing from the stage modules or the plan, so each can import it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from opdflow.infra.config import Config
    from opdflow.infra.artifacts.manifest import Run, StageContext

# (params, inputs, shard body(ctx, i, n)): what a sharded stage and each of its shards share
ShardParts = tuple[dict, dict, "Callable[[StageContext, int, int], None]"]


@dataclass(frozen=True)
class Stage:
    kind: str
    run: Callable[..., tuple[dict, bool]]
    instances: Callable[["Config"], list[str]]
    needs: Callable[["Config", str], list[str]]
    report: Callable[["Run", dict], str] | None = None
    shard_parts: Callable[["Run", str], ShardParts] | None = None
    n_shards: Callable[["Run", str], int] | None = None
    gpus: Callable[["Config"], int] = lambda config: 0

    def __post_init__(self) -> None:
        if (self.shard_parts is None) != (self.n_shards is None):
            raise TypeError(f"stage {self.kind}: a sharded stage declares both shard_parts and n_shards")

    @property
    def sharded(self) -> bool:
        return self.shard_parts is not None

    @property
    def module(self) -> str:
        """The module that implements the stage (its code is the stage's code version)."""
        return self.run.__module__

    @functools.cached_property
    def task(self):
        """The Prefect task of the stage (for a sharded stage: the commit from its shards)."""
        from opdflow.tasks.common import stage_task
        return stage_task(self.kind, self.run, self.report)

    @functools.cached_property
    def run_shard(self) -> Callable[..., tuple[dict, bool]]:
        """The plain function running one shard by name (`rollout.r01.shard-002-of-004`)."""
        if not self.sharded:
            raise TypeError(f"stage {self.kind} is not sharded")
        from opdflow.tasks.shards import shard_runner
        return shard_runner(self.shard_parts)

    @functools.cached_property
    def shard_task(self):
        """The Prefect task of one shard (`rollout-shard`, task run `rollout.r01.shard-000-of-004`)."""
        from opdflow.tasks.common import stage_task
        return stage_task(f"{self.kind}-shard", self.run_shard)


def single(name: str) -> Callable[["Config"], list[str]]:
    """`instances` of a stage that a run has once."""
    return lambda config: [name]


__all__ = ["Stage", "ShardParts", "single"]

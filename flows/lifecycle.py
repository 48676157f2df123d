"""The OPD lifecycle as Prefect flows: thin, they only chain stages and pass store keys.

    opdflow-lifecycle   models -> prompts -> R x (rollout -> score -> train)
                        -> rock-probe -> rock-directions -> rock
                        -> ablation arms (rollout -> score -> train, rocks / random
                        tokens bypassed) -> eval per model -> report
                        (the order is tasks/plan.py's `plan`, the one list of stages)
    opdflow-stage       one stage (or one shard) of an existing run, from its stored inputs

Every task takes (store URI, run id, stage name) and finds its inputs in the run's
manifest, so any stage can be rerun alone, on another machine, or by retrying the flow
run in the Prefect UI: committed stages are skipped, the failed one runs again.

Rollout, scoring, the rock stages and evaluation run as `scale.shards` mapped tasks on the flow's task runner:
threads in this process (`scale.task_runner: local`) or prefect-dask's DaskTaskRunner
(`dask`: a local cluster per flow run, or an existing one at `scale.dask_address`), in
which case the lifecycle runs as a subflow on that runner. With
`scale.gpus_per_worker: N` each shard task takes one "GPU" resource of its Dask worker
(workers of the local cluster get N; start your own with `--resources GPU=N`), so a
worker never runs more shard tasks than it has GPUs; the local runner then runs at most
N shard tasks at once.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from prefect import flow, tags, unmapped

from opdflow.infra.config import Config, ConfigError, load_config, parse_config
from opdflow.infra.manifest import Run
from opdflow.infra.preflight import preflight
from opdflow.infra.store import open_store
from opdflow.tasks.common import config_name, publish_markdown, quiet_console_tracebacks
from opdflow.tasks.evaluate import eval_shard_task, eval_task
from opdflow.tasks.models import models_task
from opdflow.tasks.patch import patch_shard_task, patch_task
from opdflow.tasks.plan import parse, plan
from opdflow.tasks.prompts import prompts_task
from opdflow.tasks import patch as patch_stage
from opdflow.tasks import rock as rock_stage
from opdflow.tasks import rollout as rollout_stage
from opdflow.tasks import score as score_stage
from opdflow.tasks.report import report_task, run_status, summary_markdown
from opdflow.tasks.rock import rock_directions_task, rock_probe_task, rock_shard_task, rock_task
from opdflow.tasks.rollout import rollout_shard_task, rollout_task
from opdflow.tasks.score import score_shard_task, score_task
from opdflow.tasks.sensitivity import sensitivity_task
from opdflow.tasks.shards import shard_name, split_shard_name
from opdflow.tasks.train import train_task

TASKS = {"models": models_task, "prompts": prompts_task, "train": train_task, "report": report_task,
         "sensitivity": sensitivity_task}

# sharded stage kinds: (shard task, stage task, number of shards of a stage)
SHARDED = {
    "rollout": (rollout_shard_task, rollout_task, lambda run, stage: rollout_stage.n_shards(run.config)),
    "score": (score_shard_task, score_task, score_stage.n_shards),
    "rock-probe": (rock_shard_task, rock_probe_task, lambda run, stage: rock_stage.probe_shards(run.config)),
    "rock-directions": (rock_shard_task, rock_directions_task, lambda run, stage: rock_stage.n_parts(run)),
    "rock": (rock_shard_task, rock_task, lambda run, stage: rock_stage.n_parts(run)),
    "eval": (eval_shard_task, eval_task, lambda run, stage: run.config.scale.shards),
    "patch": (patch_shard_task, patch_task, lambda run, stage: patch_stage.n_shards(run.config)),
}


def default_run_id(config: Config, config_path: str | None) -> str:
    stem = Path(config_path).stem if config_path else "run"
    digest = hashlib.sha256(config.identity().to_json().encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def start_run(config_path: str | None, store: str | None, run_id: str | None,
              overrides: dict[str, Any] | None = None) -> Run:
    """Validate everything (config, files, store) before writing; then create or open the run."""
    if config_path is None and run_id is not None and store is not None:
        return Run.open(store, run_id)  # resume with the stored config
    config = load_config(config_path, overrides) if config_path else parse_config(overrides or {})
    if store:
        config = config.model_copy(update={"store": store})
    preflight(config)
    st = open_store(config.store)
    st.check()
    return Run.create_or_open(st, run_id or default_run_id(config, config_path), config)


def deployment_run_id(config_path: str | None) -> str | None:
    """In a deployment's flow run with no run id given: one run id per flow run, so each
    scheduled run is a new run while a retry of the same flow run resumes it."""
    from prefect.runtime import deployment, flow_run
    if deployment.id is None:
        return None
    stem = Path(config_path).stem if config_path else "run"
    return f"{stem}-{str(flow_run.id)[:8]}"


def task_runner(config: Config):
    """The task runner `scale` asks for (None: the flow's default, threads in-process)."""
    sc = config.scale
    if sc.task_runner == "local":
        if sc.gpus_per_worker:
            from prefect.task_runners import ThreadPoolTaskRunner
            return ThreadPoolTaskRunner(max_workers=sc.gpus_per_worker)
        return None
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError("scale.task_runner", "dask needs prefect-dask: pip install 'opdflow[dask]'") from None
    if sc.dask_address:
        return DaskTaskRunner(address=sc.dask_address)
    # with GPU slots, one thread more than slots: only the slot keeps a worker to G shard tasks
    kwargs = {"n_workers": sc.dask_workers, "threads_per_worker": sc.gpus_per_worker + 1 if sc.gpus_per_worker else 1,
              "processes": True}
    if sc.gpus_per_worker:
        kwargs["resources"] = {"GPU": sc.gpus_per_worker}
    return DaskTaskRunner(cluster_kwargs=kwargs)


def sharded(shard_task, stage_task_, uri: str, rid: str, stage: str, n: int, gpu: bool, force: bool = False) -> dict:
    """Map a stage's shards over the task runner, then commit the stage from them."""
    if n > 1 or force:
        names = [shard_name(stage, i, n) for i in range(n)]
        with _gpu_slot(gpu):
            futures = shard_task.map(uri, rid, names, force=unmapped(force))
        futures.result()  # raises if a shard failed after its retries
    return stage_task_(uri, rid, stage, force=force)  # commits from the shards (again, if forced)


def uses_gpu_slots(config: Config) -> bool:
    return config.scale.task_runner == "dask" and config.scale.gpus_per_worker > 0


def _gpu_slot(gpu: bool):
    """Each shard task takes one GPU resource of its Dask worker."""
    import contextlib
    if not gpu:
        return contextlib.nullcontext()
    import dask
    return dask.annotate(resources={"GPU": 1})


def stage(run: Run, name: str, force: bool = False) -> dict:
    """Run one stage through its Prefect task(s): a sharded stage maps its shards first."""
    kind = parse(name).kind
    if kind in SHARDED:
        shard_task, task, count = SHARDED[kind]
        return sharded(shard_task, task, run.store.uri, run.run_id, name, count(run, name), uses_gpu_slots(run.config),
                       force=force)
    return TASKS[kind](run.store.uri, run.run_id, name, force=force)


def run_lifecycle(run: Run) -> None:
    """The lifecycle's stages in order (tasks/plan.py), on the current flow's task runner."""
    for name in plan(run.config):
        stage(run, name)


def _lifecycle_or_stage(run: Run, stage: str | None) -> dict | None:
    return run_lifecycle(run) if stage is None else rerun_stage(run, stage)


@flow(name="opdflow-on-runner")
def on_runner(store: str, run_id: str, stage: str | None = None) -> dict | None:
    """The lifecycle (or one stage) as a subflow, when `scale` asks for a task runner of its own."""
    return _lifecycle_or_stage(Run.open(store, run_id), stage)


def with_runner(run: Run, stage: str | None = None) -> dict | None:
    runner = task_runner(run.config)
    if runner is None:
        return _lifecycle_or_stage(run, stage)
    return on_runner.with_options(task_runner=runner)(run.store.uri, run.run_id, stage)


def _model_name(m) -> str:
    return m.path if m.path in ("demo", "planted") else Path(m.path.rstrip("/")).name


def run_tags(run: Run) -> list[str]:
    """The tags a flow run of `run` carries (Prefect's filters and the run list show them)."""
    c = run.config
    return ["opdflow", f"config:{config_name(run.run_id)}", f"run:{run.run_id}",
            f"teacher:{_model_name(c.teacher)}", f"student:{_model_name(c.student)}"]


def label_flow_run(run: Run, stage: str | None = None) -> None:
    """Name the current flow run after the opdflow run id (`<run id>.<stage>` for one stage)
    and add `run_tags`, through the API: the run id is only known once the config is read."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    name = run.run_id if stage is None else f"{run.run_id}.{stage}"
    tags = sorted(set(ctx.flow_run.tags or []) | set(run_tags(run)))
    with get_client(sync_client=True) as client:
        client.update_flow_run(ctx.flow_run.id, name=name, tags=tags)


def finish(run: Run, t0: float, failed: BaseException | None = None) -> None:
    """When a flow ends, completed, failed or cancelled: log the curves to MLflow (if a
    tracking URI is set) and publish the run-summary. Never raises: the run's own outcome
    (and its exception) is what the caller reports."""
    from prefect.logging import get_run_logger
    logger = get_run_logger()
    mlflow = None
    try:
        from opdflow.infra.tracking import log_mlflow
        mlflow = log_mlflow(run)
    except Exception as e:  # noqa: BLE001 - a tracking server down must not hide the run's result
        logger.warning(f"MLflow logging failed ({type(e).__name__}: {e}); the curves are in the store's "
                       "tensorboard/ outputs")
    try:
        publish_markdown("run-summary", summary_markdown(run, flow_seconds=round(time.time() - t0, 1), mlflow=mlflow),
                         f"run {run.run_id}: headline, wall time, curves, links"
                         + (" (FAILED)" if failed is not None else ""), run_id=run.run_id)
    except Exception as e:  # noqa: BLE001
        logger.warning(f"could not publish the run-summary: {type(e).__name__}: {e}")


@flow(name="opdflow-lifecycle")
def lifecycle(config_path: str | None = None, store: str | None = None, run_id: str | None = None,
              overrides: dict[str, Any] | None = None) -> dict:
    """The whole OPD lifecycle on one run id; committed stages are skipped."""
    quiet_console_tracebacks()
    t0 = time.time()
    run = start_run(config_path, store, run_id or deployment_run_id(config_path), overrides)
    label_flow_run(run)
    try:
        with tags(*run_tags(run)):
            with_runner(run)
    except BaseException as e:  # failed or cancelled: the summary still says where it stopped
        finish(run, t0, e)
        raise
    finish(run, t0)
    return {**run_status(run), "flow_seconds": round(time.time() - t0, 1)}


def rerun_stage(run: Run, name: str) -> dict:
    """Run one stage now (forced); a sharded stage reruns all its shards, a shard's name
    (`rollout.r01.shard-000-of-004`) that shard alone."""
    shard = split_shard_name(name)
    if shard:
        shard_task = SHARDED[parse(shard[0]).kind][0]
        return shard_task(run.store.uri, run.run_id, name, force=True)
    return stage(run, name, force=True)


@flow(name="opdflow-stage", flow_run_name="{run_id}.{stage}")
def stage_flow(stage: str, run_id: str, store: str) -> dict:
    """Rerun one stage of an existing run from its stored inputs (always runs it)."""
    quiet_console_tracebacks()
    t0 = time.time()
    run = Run.open(store, run_id)
    label_flow_run(run, stage)
    try:
        with tags(*run_tags(run)):
            result = with_runner(run, stage)
    except BaseException as e:
        finish(run, t0, e)
        raise
    finish(run, t0)
    return result


def repair(run: Run, names: list[str]) -> list[str]:
    """Recompute exactly the stages `opdflow verify` found damaged (`infra.verify.repair_stages`),
    in plan order: a shard alone (forced); a sharded stage's own outputs from its committed
    shards (no shard reruns); any other stage forced; then every stage linking a repaired
    shard, recommitted if that shard's part changed. Returns what ran."""
    order = {n: i for i, n in enumerate(plan(run.config))}
    base = lambda n: (split_shard_name(n) or (n,))[0]  # noqa: E731
    parents: list[str] = []
    for name in sorted(names, key=lambda n: (order.get(base(n), len(order)), n)):
        shard = split_shard_name(name)
        if shard:
            rerun_stage(run, name)
            if shard[0] not in names and shard[0] not in parents:
                parents.append(shard[0])
        elif parse(name).kind in SHARDED:
            SHARDED[parse(name).kind][1](run.store.uri, run.run_id, name, force=True)
        else:
            rerun_stage(run, name)
    for parent in parents:
        stage(run, parent)
    return sorted(names, key=lambda n: (order.get(base(n), len(order)), n)) + parents


@flow(name="opdflow-repair")
def repair_flow(stages: list[str], run_id: str, store: str) -> list[str]:
    """Rerun the damaged stages of an existing run (`opdflow verify --repair`)."""
    run = Run.open(store, run_id)
    return repair(run, stages)

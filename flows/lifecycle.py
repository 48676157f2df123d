"""The OPD lifecycle as Prefect flows: thin, they only chain stages and pass store keys.

    opdflow-lifecycle   models -> prompts -> R x (rollout -> score -> train)
                        -> rock-probe -> rock-directions -> rock
                        -> ablation arms (rollout -> score -> train, rocks / random
                        tokens bypassed) -> eval per model -> report
                        (tasks/plan.py's `plan`: each stage's declaration says what it needs)
    opdflow-stage       one stage (or one shard) of an existing run, from its stored inputs

Each stage is submitted once the stages it `needs` have committed, with `wait_for` on their
futures, so stages that do not depend on each other (the ablation's arms and seeds, the
evaluations of different models) run at the same time, at most `scale.concurrent_stages`
of them, and the Prefect UI draws the dependency graph. A failed stage stops new
submissions; the stages already running finish (and commit), then the flow fails with it.

Every task takes (store URI, run id, stage name) and finds its inputs in the run's
manifest, so any stage can be rerun alone, on another machine, or by retrying the flow
run in the Prefect UI: committed stages are skipped, the failed one runs again.

Every sharded stage (rollout, scoring, the rock stages, patch, evaluation) runs as mapped shard
tasks (`scale.shards` of them; one with the default 1, so each has its progress bar) on the flow's task runner:
threads in this process (`scale.task_runner: local`) or prefect-dask's DaskTaskRunner
(`dask`: a local cluster per flow run, or an existing one at `scale.dask_address`), in
which case the lifecycle runs as a subflow on that runner. With
`scale.gpus_per_worker: N` each shard task takes one "GPU" resource of its Dask worker
(workers of the local cluster get N; start your own with `--resources GPU=N`), so a
worker never runs more shard tasks than it has GPUs; the local runner then runs at most
N tasks at once. On Dask the train and sensitivity stage tasks take GPU slots too (train:
`train.nproc_per_node`, at most `gpus_per_worker`).
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from prefect import flow, tags, unmapped
from prefect.futures import as_completed

from opdflow.infra.config import Config, ConfigError, load_config, parse_config
from opdflow.infra.artifacts.manifest import Run
from opdflow.infra.preflight import preflight
from opdflow.infra.artifacts.store import open_store
from opdflow.tasks.common import config_name, publish_markdown, quiet_console_tracebacks
from opdflow.tasks.plan import needs, plan, stage_of
from opdflow.tasks.report import run_status, summary_markdown
from opdflow.tasks.shards import shard_name, split_shard_name


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


def uses_gpu_slots(config: Config) -> bool:
    return config.scale.task_runner == "dask" and config.scale.gpus_per_worker > 0


def _gpu_slot(gpus: int):
    """A task submitted inside takes `gpus` GPU resources of its Dask worker (0: none)."""
    import contextlib
    if not gpus:
        return contextlib.nullcontext()
    import dask
    return dask.annotate(resources={"GPU": gpus})


def run_stages(run: Run, names: list[str], force: bool = False) -> dict[str, dict]:
    """Run `names` (stages of the plan, in plan order) on the current flow's task runner;
    returns each stage task's result.

    A stage is submitted when every stage it needs (among `names`) has committed, with
    `wait_for` on their futures; at most `scale.concurrent_stages` stages are in flight (a
    sharded stage from its first shard to its commit). A sharded stage maps its shard tasks,
    then, once they all committed, its stage task, which links their parts. Nothing waits
    inside a worker thread, so a bounded runner cannot deadlock. After a failure nothing
    new starts; what runs finishes, then the first failure is raised."""
    c, uri, rid = run.config, run.store.uri, run.run_id
    wanted = set(names)
    deps = {n: [d for d in needs(c, n) if d in wanted] for n in names}
    gpu_slots = uses_gpu_slots(c)
    waiting, pending = list(names), {}      # pending: future -> stage name
    shards: dict[str, list] = {}            # stage -> its shard futures, while they run
    done: dict[str, Any] = {}               # stage -> its stage task's completed future
    results: dict[str, dict] = {}
    failed: list = []

    def submit_stage(name: str, wait_for: list) -> None:
        st = stage_of(name)
        gpus = min(st.gpus(c), c.scale.gpus_per_worker) if gpu_slots else 0
        with _gpu_slot(gpus):
            pending[st.task.submit(uri, rid, name, force=force, wait_for=wait_for)] = name

    def start(name: str) -> None:
        st, wait_for = stage_of(name), [done[d] for d in deps[name]]
        if not st.sharded:
            return submit_stage(name, wait_for)
        n = st.n_shards(run, name)
        with _gpu_slot(1 if gpu_slots else 0):
            futures = list(st.shard_task.map(uri, rid, [shard_name(name, i, n) for i in range(n)],
                                             force=unmapped(force), wait_for=wait_for))
        shards[name] = futures
        pending.update({f: name for f in futures})

    while pending or (waiting and not failed):
        in_flight = len(set(pending.values()))
        for name in [n for n in waiting if all(d in done for d in deps[n])]:
            if failed or in_flight >= c.scale.concurrent_stages:
                break
            waiting.remove(name)
            start(name)
            in_flight += 1
        if not pending:
            raise RuntimeError(f"stages {waiting} wait on stages that never commit")  # needs outside the plan
        future = next(as_completed(list(pending)))
        name = pending.pop(future)
        future.wait()  # done: this records its final state on the future
        if not future.state.is_completed():
            failed.append(future)
        elif name in shards:
            if not any(pending.get(f) == name for f in shards[name]):  # the stage's last shard
                futures = shards.pop(name)
                if all(f.state.is_completed() for f in futures):
                    submit_stage(name, futures)
        else:
            done[name], results[name] = future, future.result()
    if failed:
        failed[0].result()  # raises the stage's exception
    return results


def stage(run: Run, name: str, force: bool = False) -> dict:
    """Run one stage through its Prefect task(s): a sharded stage maps its shards first."""
    return run_stages(run, [name], force=force)[name]


def run_lifecycle(run: Run) -> None:
    """The lifecycle's stages (tasks/plan.py), each once its needs have committed."""
    run_stages(run, plan(run.config))


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


def _lifecycle_run_name() -> str:
    """The flow run's name from its first log line on: the run id when the caller gives it (the
    CLI always does); else Prefect's generated name, until `label_flow_run` renames the run."""
    from prefect.runtime import flow_run
    from prefect.utilities.names import generate_slug
    return (flow_run.parameters or {}).get("run_id") or generate_slug(2)


@flow(name="opdflow-lifecycle", flow_run_name=_lifecycle_run_name)
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
        return stage_of(shard[0]).shard_task(run.store.uri, run.run_id, name, force=True)
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
    """Recompute exactly the stages `opdflow verify` found damaged (`infra.artifacts.verify.repair_stages`),
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
        elif stage_of(name).sharded:
            stage_of(name).task(run.store.uri, run.run_id, name, force=True)
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

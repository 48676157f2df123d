"""The one thin layer between a stage's plain function and Prefect.

Every stage module defines `run(run: Run, stage: str, force: bool) -> entry` (plain,
testable without Prefect) and `report(run, entry) -> markdown`. `stage_task` turns that
pair into a Prefect task that:

* takes only strings (store URI, run id, stage name): tasks pass store keys, not data;
* retries transient failures (store/network hiccups) with backoff, and fails at once on
  permanent ones (bad config, missing inputs, checksum mismatch), with the reason in the
  task's state message;
* publishes the stage's markdown report as an artifact under a stable key, so the
  Artifacts page shows one history per key across runs;
* reports progress through a Prefect progress artifact while the stage runs.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Callable

from prefect import task
from prefect.cache_policies import NONE

from opdflow.infra.config import ConfigError
from opdflow.infra.failures import PermanentFailure, permanent_cause
from opdflow.infra.artifacts.manifest import Run, RunError
from opdflow.infra.artifacts.store import ChecksumError, CorruptObject, InvalidKey

PERMANENT = (ConfigError, RunError, ChecksumError, CorruptObject, InvalidKey, PermanentFailure, ValueError, TypeError,
             KeyError, NotImplementedError, ImportError)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying? No for the PERMANENT types, and no for causes recognised whatever the
    type (corrupt weights, no hub access, out of memory, a failed training subprocess:
    `infra/failures.py`)."""
    return not isinstance(exc, PERMANENT) and permanent_cause(exc) is None


def _retry_condition(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as e:  # noqa: BLE001 - we only classify it
        return is_transient(e)
    return False


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only.

    >>> artifact_key("demo-1a2b3c4d", "eval.rock_bypass.s1.r01")
    'demo-1a2b3c4d-eval-rock-bypass-s1-r01'
    """
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def config_name(run_id: str) -> str:
    """The config a run id was made from: its stem before the 8-hex suffix that default and
    deployment run ids carry (`demo-1a2b3c4d` -> `demo`); a run id without one is its own
    name. Artifact keys start with it, so one key's history is one config's runs.

    >>> config_name("demo-1a2b3c4d"), config_name("planted-seed3")
    ('demo', 'planted-seed3')
    """
    return re.sub(r"-[0-9a-f]{8}$", "", run_id) or run_id


def in_prefect_run() -> bool:
    from prefect.context import TaskRunContext
    return TaskRunContext.get() is not None


def _publish_context(run_id: str | None) -> str | None:
    """The run id whose namespace an artifact goes under, if there is a Prefect run to attach
    it to (a task run: its `run_id` parameter; a flow run: `run_id` must be given)."""
    from prefect.context import FlowRunContext, TaskRunContext
    t = TaskRunContext.get()
    if t is not None:
        return run_id or (t.parameters or {}).get("run_id")
    return run_id if FlowRunContext.get() is not None else None


def prefect_progress(stage: str) -> Callable[[float, str], None]:
    """A progress callback updating a Prefect progress artifact (no-op outside a task run)."""
    if not in_prefect_run():
        return lambda frac, msg="": None
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    art_id = create_progress_artifact(progress=0.0, description=f"{stage} progress")
    last = [0.0]

    def update(frac: float, msg: str = "") -> None:
        pct = round(100.0 * max(0.0, min(1.0, frac)), 1)
        if pct - last[0] >= 5 or pct >= 100:  # throttle API calls
            update_progress_artifact(art_id, progress=pct, description=f"{stage}: {msg}" if msg else None)
            last[0] = pct
    return update


def console_progress(stage: str) -> Callable[[float, str], None]:
    """A console progress bar for a stage (stderr), closed when it reaches 100%."""
    from tqdm.auto import tqdm
    bar = tqdm(total=100, desc=stage, unit="%", leave=False, dynamic_ncols=True)

    def update(frac: float, msg: str = "") -> None:
        bar.n = round(100.0 * max(0.0, min(1.0, frac)), 1)
        if msg:
            bar.set_postfix_str(msg, refresh=False)
        bar.refresh()
        if bar.n >= 100:
            bar.close()
    return update


def progress_for(stage: str) -> Callable[[float, str], None]:
    """Prefect progress artifact + console bar, created on the first report (so a
    skipped stage leaves neither behind)."""
    reporters: list[Callable[[float, str], None]] = []

    def update(frac: float, msg: str = "") -> None:
        if not reporters:
            reporters.extend([prefect_progress(stage), console_progress(stage)])
        for r in reporters:
            r(frac, msg)
    return update


def publish_markdown(key: str, markdown: str, description: str, run_id: str | None = None) -> None:
    """A markdown artifact keyed `<config name>-<key>` on the current task or flow run."""
    rid = _publish_context(run_id)
    if rid is not None:
        from prefect.artifacts import create_markdown_artifact
        create_markdown_artifact(key=artifact_key(config_name(rid), key), markdown=markdown, description=description)


def publish_table(key: str, rows: list[dict], description: str, run_id: str | None = None) -> None:
    rid = _publish_context(run_id)
    if rid is not None and rows:
        from prefect.artifacts import create_table_artifact
        create_table_artifact(key=artifact_key(config_name(rid), key), table=rows, description=description)


def failure_line(stage: str, run_id: str, store_uri: str, exc: BaseException) -> str:
    """What failed and what to do, in one line: the reason, whether it is retried, the rerun command."""
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())
    if len(reason) > 400:
        reason = reason[:400] + " ... (full message and traceback in the task run's log)"
    what = "retrying" if is_transient(exc) else "not retried (a retry cannot fix it)"
    return (f"stage {stage} failed, {what}: {reason} | after fixing: opdflow stage {stage} --run-id {run_id} "
            f"--store {store_uri}")


class _NoTraceback(logging.Formatter):
    """A console formatter that prints a record's message without its traceback (the API
    log handler, i.e. the Prefect UI's Logs tab, still gets the traceback)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


# third-party warnings a user of opdflow cannot act on (they concern the libraries' own calls)
_QUIET_WARNINGS = (
    (FutureWarning, r".*`past_key_values` is deprecated"),   # transformers, once per rollout batch
)


def quiet_third_party_warnings() -> None:
    """Filter `_QUIET_WARNINGS`, and lm-eval's own warnings (its logger at ERROR). Idempotent."""
    import warnings
    for category, message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def quiet_console_tracebacks() -> None:
    """Prefect's console handlers print one line per failed task/flow run, not the traceback
    (set OPDFLOW_TRACEBACKS=1 to keep them); third-party noise filtered. Idempotent."""
    quiet_third_party_warnings()
    if os.environ.get("OPDFLOW_TRACEBACKS") == "1":
        return
    from prefect.logging.handlers import PrefectConsoleHandler
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for h in logging.getLogger(name).handlers:
            if isinstance(h, PrefectConsoleHandler) and not isinstance(h.formatter, _NoTraceback):
                h.setFormatter(_NoTraceback(h.formatter))


def stage_seconds(entry: dict) -> float:
    """The seconds a committed stage took: a sharded stage's own entry is its merge, its work is
    in its shards (`shard_seconds_sum`, summed over them), so both count.

    >>> stage_seconds({"seconds": 0.04, "metrics": {"shards": 2, "shard_seconds_sum": 2.5}})
    2.54
    >>> stage_seconds({"seconds": 7.2, "metrics": {}})
    7.2
    """
    return round(entry["seconds"] + (entry.get("metrics", {}).get("shard_seconds_sum") or 0), 3)


def entry_summary(entry: dict) -> dict:
    """What a task returns to the flow: small, serializable, keys not data."""
    return {"stage": entry["stage"], "key": entry["key"], "seconds": entry["seconds"],
            "metrics": entry.get("metrics", {})}


def done_line(stage: str, entry: dict, ran: bool, n: int = 6) -> str:
    """The task run's log line when its stage ends (the Logs tab's account of the run): time and
    the stage's first `n` scalar metrics.

    >>> done_line("train.r01", {"seconds": 7.23, "metrics": {"steps": 2, "loss_mean": 0.259128,
    ...           "losses": [0.28, 0.23], "tokens_per_s": 215.3, "mismatch": {"k3": 0.0}}}, True)
    'train.r01 committed in 7.2 s: steps 2, loss_mean 0.2591, tokens_per_s 215.3'
    >>> done_line("models", {"seconds": 49.0, "metrics": {}}, False)
    'models: committed earlier, skipped'
    """
    if not ran:
        return f"{stage}: committed earlier, skipped"
    nums = [(k, v) for k, v in entry.get("metrics", {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)][:n]
    return (f"{stage} committed in {entry['seconds']:.1f} s"
            + (": " + ", ".join(f"{k} {v:.4g}" for k, v in nums) if nums else ""))


def stage_task(kind: str, run_fn: Callable[..., tuple[dict, bool]],
               report_fn: Callable[[Run, dict], str] | None = None, retries: int = 2):
    """Wrap a stage's plain `run_fn(run, stage, force, progress)` as a Prefect task."""

    @task(name=kind, task_run_name="{stage}", retries=retries, retry_delay_seconds=[2, 10, 30],
          retry_condition_fn=_retry_condition, cache_policy=NONE, persist_result=False)
    def _task(store_uri: str, run_id: str, stage: str, force: bool = False) -> dict:
        run = Run.open(store_uri, run_id)
        try:
            entry, ran = run_fn(run, stage, force=force, progress=progress_for(stage))
        except Exception as e:
            from prefect.logging import get_run_logger
            get_run_logger().error(failure_line(stage, run_id, store_uri, e))
            raise
        if report_fn is not None:
            publish_markdown(stage, report_fn(run, entry),
                             f"{stage} of run {run_id}" + ("" if ran else " (committed earlier, skipped)"))
        from prefect.logging import get_run_logger
        get_run_logger().info(done_line(stage, entry, ran))
        return {**entry_summary(entry), "ran": ran}

    _task.__doc__ = f"Prefect task for the {kind} stage (see opdflow.tasks.{kind})."
    return _task

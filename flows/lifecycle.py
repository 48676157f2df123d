"""The OPD lifecycle as Prefect flows: thin, they only chain stages and pass store keys.

    opdflow-lifecycle   models -> prompts -> R x (rollout -> score -> train) -> rock
                        -> ablation arms (rollout -> score -> train, rocks / random
                        tokens bypassed) -> eval per model -> report
    opdflow-stage       one stage of an existing run, from its stored inputs

Every task takes (store URI, run id, stage name) and finds its inputs in the run's
manifest, so any stage can be rerun alone, on another machine, or by retrying the flow
run in the Prefect UI: committed stages are skipped, the failed one runs again.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from prefect import flow

from opdflow.infra.config import Config, load_config, parse_config
from opdflow.infra.manifest import Run
from opdflow.infra.preflight import preflight
from opdflow.infra.store import open_store
from opdflow.tasks.common import publish_markdown
from opdflow.tasks.evaluate import eval_task
from opdflow.tasks.models import models_task
from opdflow.tasks.plan import ablation_arms, arm_rounds, eval_labels, parse, round_stage
from opdflow.tasks.prompts import prompts_task
from opdflow.tasks.report import report_task, run_status, summary_markdown
from opdflow.tasks.rock import rock_task
from opdflow.tasks.rollout import rollout_task
from opdflow.tasks.score import score_task
from opdflow.tasks.train import train_task

TASKS = {"models": models_task, "prompts": prompts_task, "rollout": rollout_task, "score": score_task,
         "train": train_task, "rock": rock_task, "eval": eval_task, "report": report_task}


def default_run_id(config: Config, config_path: str | None) -> str:
    stem = Path(config_path).stem if config_path else "run"
    digest = hashlib.sha256(config.model_copy(update={"store": ""}).to_json().encode()).hexdigest()[:8]
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


def opd_round(uri: str, run_id: str, arm: str, r: int) -> None:
    rollout_task(uri, run_id, round_stage("rollout", r, arm))
    score_task(uri, run_id, round_stage("score", r, arm))
    train_task(uri, run_id, round_stage("train", r, arm))


@flow(name="opdflow-lifecycle")
def lifecycle(config_path: str | None = None, store: str | None = None, run_id: str | None = None,
              overrides: dict[str, Any] | None = None) -> dict:
    """The whole OPD lifecycle on one run id; committed stages are skipped."""
    t0 = time.time()
    run = start_run(config_path, store, run_id or deployment_run_id(config_path), overrides)
    uri, rid, c = run.store.uri, run.run_id, run.config
    models_task(uri, rid, "models")
    prompts_task(uri, rid, "prompts")
    for r in range(1, c.train.rounds + 1):
        opd_round(uri, rid, "main", r)
    rock_task(uri, rid, "rock")
    for arm in ablation_arms(c):
        for r in range(1, arm_rounds(c, arm) + 1):
            opd_round(uri, rid, arm, r)
    for label in eval_labels(c):
        eval_task(uri, rid, f"eval.{label}")
    report_task(uri, rid, "report")
    publish_markdown("run-summary", summary_markdown(run), f"stages of run {rid}")
    return {**run_status(run), "flow_seconds": round(time.time() - t0, 1)}


@flow(name="opdflow-stage")
def stage_flow(stage: str, run_id: str, store: str) -> dict:
    """Rerun one stage of an existing run from its stored inputs (always runs it)."""
    run = Run.open(store, run_id)
    kind = parse(stage).kind
    result = TASKS[kind](run.store.uri, run_id, stage, force=True)
    publish_markdown("run-summary", summary_markdown(run), f"stages of run {run_id}")
    return result

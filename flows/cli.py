"""The `opdflow` command.

    opdflow run CONFIG [--store URI] [--run-id ID]     the whole lifecycle (skips committed stages)
    opdflow stage NAME --run-id ID [--store URI]       rerun one stage from its stored inputs
    opdflow status --run-id ID [--store URI] [--json]  stages, evaluation, verdict
    opdflow validate CONFIG                            config + preflight checks only
    opdflow capacity --run-id ID [--gpus 1,2,4,8]      a round's wall time on N GPUs, from the
                  [--train-efficiency E]               throughputs the run measured
    opdflow serve MODEL_DIR [--host H] [--port P]      an OpenAI-compatible completions server
                  [--dtype D] [--name NAME]            (vLLM's API subset; see infra/serve.py)

Config and input errors exit with status 2 and a message naming the field, before
anything is written. `--store` defaults to the config's `store` (run) or to
$OPDFLOW_STORE / ./opdflow-store (stage, status).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from opdflow.infra.config import ConfigError
from opdflow.infra.lm import offline
from opdflow.infra.manifest import RunError
from opdflow.infra.store import StoreError


def _default_store() -> str:
    return os.environ.get("OPDFLOW_STORE", "./opdflow-store")


def _print_status(st: dict) -> None:
    print(f"run {st['run_id']} in {st['store']}")
    for s in st["stages"]:
        secs = f"{s['seconds']:.1f}s" if s["seconds"] is not None else ""
        print(f"  {s['name']:<28} {s['status']:<10} {secs}")
    for label, tasks in st["eval"].items():
        for task, metrics in tasks.items():
            print(f"  eval {label:<22} {task}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if st.get("verdict"):
        print(f"  verdict: {st['verdict']}")


def main(argv: list[str] | None = None) -> int:
    offline()
    # Prefect's ephemeral server (no PREFECT_API_URL) migrates a fresh database at first
    # start, which takes longer than its 20 s default on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    p = argparse.ArgumentParser(prog="opdflow", description="On-policy distillation lifecycle as Prefect flows")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the whole lifecycle")
    r.add_argument("config")
    r.add_argument("--store")
    r.add_argument("--run-id")
    s = sub.add_parser("stage", help="rerun one stage of an existing run")
    s.add_argument("name")
    s.add_argument("--run-id", required=True)
    s.add_argument("--store", default=None)
    t = sub.add_parser("status", help="show a run's stages and results")
    t.add_argument("--run-id", required=True)
    t.add_argument("--store", default=None)
    t.add_argument("--json", action="store_true")
    v = sub.add_parser("validate", help="check a config and its inputs without running")
    v.add_argument("config")
    c = sub.add_parser("capacity", help="predict a round's wall time on N GPUs from a run's measured throughputs")
    c.add_argument("--run-id", required=True)
    c.add_argument("--store", default=None)
    c.add_argument("--gpus", default="1,2,4,8")
    c.add_argument("--train-efficiency", type=float, default=1.0)
    sv = sub.add_parser("serve", help="serve a Hugging Face model dir over an OpenAI-compatible API")
    sv.add_argument("model_dir")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sv.add_argument("--name", default=None, help="model name clients use (default: the dir's name)")
    a = p.parse_args(argv)
    if a.cmd == "serve":
        return _serve(a)
    try:
        if a.cmd == "validate":
            from opdflow.infra.config import load_config
            from opdflow.infra.preflight import preflight
            rows = preflight(load_config(a.config))
            print(f"ok: {a.config} ({len(rows)} prompts)")
            return 0
        if a.cmd == "status":
            from opdflow.infra.manifest import Run
            from opdflow.tasks.report import run_status
            st = run_status(Run.open(a.store or _default_store(), a.run_id))
            print(json.dumps(st, indent=2)) if a.json else _print_status(st)
            return 0
        if a.cmd == "capacity":
            from opdflow.infra.manifest import Run
            from opdflow.tasks import capacity
            m = capacity.measured(Run.open(a.store or _default_store(), a.run_id))
            gpus = [int(g) for g in a.gpus.split(",")]
            print(capacity.markdown(m, capacity.predict(m["tokens"], m["tokens_per_s"], gpus, a.train_efficiency)))
            return 0
        from opdflow.flows.lifecycle import lifecycle, stage_flow, start_run
        if a.cmd == "run":
            run = start_run(a.config, a.store, a.run_id)  # fail fast, before Prefect starts
            st = lifecycle(config_path=a.config, store=run.store.uri, run_id=run.run_id)
            _print_status(st)
            _print_demo_summary(st)
            return 0
        stage_flow(stage=a.name, run_id=a.run_id, store=a.store or _default_store())
        from opdflow.infra.manifest import Run
        from opdflow.tasks.report import run_status
        _print_status(run_status(Run.open(a.store or _default_store(), a.run_id)))
        return 0
    except ConfigError as e:
        print(f"opdflow: config error: {e}", file=sys.stderr)
        return 2
    except (RunError, StoreError, ValueError) as e:
        print(f"opdflow: error: {e}", file=sys.stderr)
        return 2


def _serve(a: argparse.Namespace) -> int:
    if not os.path.isfile(os.path.join(a.model_dir, "config.json")):
        print(f"opdflow: error: {a.model_dir} is not a Hugging Face model dir (no config.json)", file=sys.stderr)
        return 2
    from opdflow.infra.serve import serve
    serve(a.model_dir, host=a.host, port=a.port, dtype=a.dtype, model_name=a.name)
    return 0


def _print_demo_summary(st: dict) -> None:
    ev = st["eval"]
    def acc(label):
        for metrics in ev.get(label, {}).values():
            return next(iter(metrics.values()), None)
    print(f"\nartifacts: {st['store']}/runs/{st['run_id']}/")
    if acc("initial_student") is not None and acc("final_student") is not None:
        print(f"initial student {acc('initial_student'):.3f} -> final student {acc('final_student'):.3f} "
              f"(teacher {acc('teacher'):.3f})")
    print(f"lifecycle wall time: {st.get('flow_seconds', st['wall_seconds'])} s")


if __name__ == "__main__":
    sys.exit(main())

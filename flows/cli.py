"""The `opdflow` command.

    opdflow run CONFIG [--store URI] [--run-id ID]     the whole lifecycle (skips committed stages)
    opdflow run --run-id ID [--store URI]              resume a run with its stored config
    opdflow stage NAME --run-id ID [--store URI]       rerun one stage from its stored inputs
    opdflow status --run-id ID [--store URI] [--json]  stages, evaluation, verdict
    opdflow verify --run-id ID [--store URI] [--repair] every committed object present and intact;
                                                       --repair reruns the damaged stages
    opdflow validate CONFIG                            config + preflight checks only
    opdflow capacity --run-id ID [--gpus 1,2,4,8]      a round's wall time on N GPUs, from the
                  [--train-efficiency E]               throughputs the run measured
    opdflow serve MODEL_DIR [--host H] [--port P]      an OpenAI-compatible completions server
                  [--dtype D] [--name NAME]            (vLLM's API subset; see infra/serving/serve.py), with
                  [--api-key KEY] [--max-* N]          an API key and request limits

Config and input errors exit with status 2 and a message naming the field, before
anything is written. The store of `run` is --store or the config's `store`. The commands
that read an existing run (stage, status, verify, capacity) take it from --store, else
from the run's config file (--config CONFIG, whose default run id is also used when
--run-id is not given), else $OPDFLOW_STORE, else ./opdflow-store; they never create a
directory. `verify` exits 1 when it finds a fault.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from typing import get_args

from opdflow.infra.config import Config, ConfigError, ModelConfig, default
from opdflow.infra.models.lm import offline
from opdflow.infra.artifacts.manifest import RunError
from opdflow.infra.artifacts.store import CorruptObject, StoreError


DEFAULT_STORE = default(Config, "store")


def _run_store(a: argparse.Namespace):
    """The store of an existing run, opened without creating anything (see the module docstring)."""
    from opdflow.infra.artifacts.store import StoreMissing, open_store
    if a.store:
        uri, origin = a.store, "--store"
    elif getattr(a, "config", None):
        from opdflow.infra.config import load_config
        uri, origin = load_config(a.config).store, f"the store of {a.config}"
    elif os.environ.get("OPDFLOW_STORE"):
        uri, origin = os.environ["OPDFLOW_STORE"], "$OPDFLOW_STORE"
    else:
        uri, origin = DEFAULT_STORE, "the default store"
    try:
        return open_store(uri, create=False)
    except StoreMissing:
        raise RunError(f"{origin} {uri} does not exist, so it holds no run: pass the run's store (--store URI) "
                       "or its config file (--config CONFIG)") from None


def _run_id(a: argparse.Namespace) -> str:
    if a.run_id:
        return a.run_id
    if getattr(a, "config", None):
        from opdflow.flows.lifecycle import default_run_id
        from opdflow.infra.config import load_config
        return default_run_id(load_config(a.config), a.config)
    raise RunError("give the run: --run-id ID, or --config CONFIG for the run `opdflow run CONFIG` made")


def _open_run(a: argparse.Namespace):
    from opdflow.infra.artifacts.manifest import Run
    store, run_id = _run_store(a), _run_id(a)
    a.resolved = (run_id, store.uri)  # for the hints below
    try:
        return Run.open(store, run_id)
    except RunError as e:
        if str(e).startswith("no run"):
            raise RunError(f"{e}: pass the run's store (--store URI) or its config file (--config CONFIG)") from None
        raise


def _check_stage_name(run, name: str) -> None:
    """A stage (or shard) of this run's plan, or an error listing them."""
    from opdflow.tasks.plan import plan
    from opdflow.tasks.shards import split_shard_name
    stages = plan(run.config)
    base = (split_shard_name(name) or (name,))[0]
    if base not in stages:
        raise RunError(f"run {run.run_id!r} has no stage {name!r}; its stages: {', '.join(stages)} "
                       f"(opdflow status --run-id {run.run_id} --store {run.store.uri})")


def _verify(a: argparse.Namespace) -> int:
    from opdflow.infra.artifacts.verify import format_report, repair_stages, verify_run
    store, run_id = _run_store(a), _run_id(a)
    a.resolved = (run_id, store.uri)
    rep = verify_run(store, run_id)
    print(json.dumps(rep.to_json(), indent=2) if a.json else format_report(rep))
    if a.repair and rep.faults:
        if any(p.key.endswith(("/run.json", "/execution.json")) for p in rep.run):
            print(f"opdflow: error: cannot repair {run_id}: its run record does not parse (above); restore it "
                  "from a backup or start a new run", file=sys.stderr)
            return 1
        names = repair_stages(rep)
        if names:
            from opdflow.flows.lifecycle import repair_flow
            print(f"repairing {len(names)} stages: {', '.join(names)}", flush=True)
            repair_flow(stages=names, run_id=run_id, store=store.uri)
            rep = verify_run(store, run_id)
            print(json.dumps(rep.to_json(), indent=2) if a.json else format_report(rep))
    return 1 if rep.faults else 0


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
    r.add_argument("config", nargs="?", help="the run's config; without it, --run-id resumes a stored run")
    r.add_argument("--store")
    r.add_argument("--run-id")
    store_help = f"the run's store (default: the store of --config, $OPDFLOW_STORE, {DEFAULT_STORE})"
    config_help = "the run's config file: its store, and its default run id when --run-id is not given"
    s = sub.add_parser("stage", help="rerun one stage of an existing run")
    s.add_argument("name")
    s.add_argument("--run-id")
    s.add_argument("--store", default=None, help=store_help)
    s.add_argument("--config", default=None, help=config_help)
    t = sub.add_parser("status", help="show a run's stages and results")
    t.add_argument("--run-id")
    t.add_argument("--store", default=None, help=store_help)
    t.add_argument("--config", default=None, help=config_help)
    t.add_argument("--json", action="store_true")
    vf = sub.add_parser("verify", help="check every committed object of a run (presence, sha256, parseability)")
    vf.add_argument("--run-id")
    vf.add_argument("--store", default=None, help=store_help)
    vf.add_argument("--config", default=None, help=config_help)
    vf.add_argument("--repair", action="store_true", help="rerun exactly the stages whose outputs are missing or "
                                                          "corrupt, then verify again")
    vf.add_argument("--json", action="store_true")
    v = sub.add_parser("validate", help="check a config and its inputs without running")
    v.add_argument("config")
    c = sub.add_parser("capacity", help="predict a round's wall time on N GPUs from a run's measured throughputs")
    c.add_argument("--run-id")
    c.add_argument("--store", default=None, help=store_help)
    c.add_argument("--config", default=None, help=config_help)
    c.add_argument("--gpus", default="1,2,4,8")
    c.add_argument("--train-efficiency", type=float, default=1.0)
    sv = sub.add_parser("serve", help="serve a Hugging Face model dir over an OpenAI-compatible API")
    sv.add_argument("model_dir")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    dtype = ModelConfig.model_fields["dtype"]
    sv.add_argument("--dtype", default=dtype.default, choices=get_args(dtype.annotation))
    sv.add_argument("--name", default=None, help="model name clients use (default: the dir's name)")
    sv.add_argument("--api-key", default=None, help="clients must send 'Authorization: Bearer KEY' (default: "
                    "$OPDFLOW_SERVE_API_KEY; required for a non-loopback --host; prefer the variable: "
                    "arguments are visible to other users of the machine)")
    from opdflow.infra.serving.serve import Limits
    lim = Limits()  # the flags' defaults are the server's own
    sv.add_argument("--max-n", type=int, default=lim.max_n, help="choices per request")
    sv.add_argument("--max-prompts", type=int, default=lim.max_prompts, help="prompts per request")
    sv.add_argument("--max-tokens", type=int, default=lim.max_tokens, help="max_tokens per request (default: the "
                    "context)")
    sv.add_argument("--max-logprobs", type=int, default=lim.max_logprobs, help="logprobs / prompt_logprobs per "
                    f"position (vLLM's default, {lim.max_logprobs}); -1: no cap (the whole vocabulary)")
    sv.add_argument("--max-response-mb", type=float, default=lim.max_response_mb, help="estimated response size")
    sv.add_argument("--max-request-mb", type=float, default=lim.max_request_mb, help="request body size")
    sv.add_argument("--request-timeout-s", type=float, default=lim.request_timeout_s, help="503 after waiting this "
                    "long for the model, 504 when the answer takes longer")
    a = p.parse_args(argv)
    if a.cmd == "serve":
        return _serve(a)
    try:
        if a.cmd == "validate":
            from opdflow.infra.config import load_config
            from opdflow.infra.preflight import preflight
            cfg = load_config(a.config)
            rows = preflight(cfg)
            from opdflow.infra.preflight import vocab_summary
            print(f"ok: {a.config} ({len(rows)} prompts)")
            for line in vocab_summary(cfg):
                print(f"  {line}")
            return 0
        if a.cmd == "status":
            from opdflow.tasks.report import run_status
            st = run_status(_open_run(a))
            print(json.dumps(st, indent=2)) if a.json else _print_status(st)
            return 0
        if a.cmd == "verify":
            return _verify(a)
        if a.cmd == "capacity":
            from opdflow.tasks import capacity
            m = capacity.measured(_open_run(a))
            gpus = [int(g) for g in a.gpus.split(",")]
            print(capacity.markdown(m, capacity.predict(m["tokens"], m["tokens_per_s"], gpus, a.train_efficiency)))
            return 0
        from opdflow.flows.lifecycle import lifecycle, stage_flow, start_run
        if a.cmd == "run":
            if a.config is None:  # resume a stored run with its stored config
                if not a.run_id:
                    raise RunError("give a CONFIG, or --run-id ID to resume a run with its stored config")
                run = _open_run(a)
            else:
                run = start_run(a.config, a.store, a.run_id)  # fail fast, before Prefect starts
            try:
                st = lifecycle(config_path=a.config, store=run.store.uri, run_id=run.run_id)
            except Exception:
                _print_failure(run)
                raise
            _print_status(st)
            _print_demo_summary(st)
            return 0
        run = _open_run(a)
        _check_stage_name(run, a.name)
        try:
            stage_flow(stage=a.name, run_id=run.run_id, store=run.store.uri)
        except Exception:
            _print_failure(run)
            raise
        from opdflow.infra.artifacts.manifest import Run
        from opdflow.tasks.report import run_status
        _print_status(run_status(Run.open(run.store, run.run_id)))
        return 0
    except ConfigError as e:
        print(f"opdflow: config error: {e}", file=sys.stderr)
        return 2
    except CorruptObject as e:
        hint = ""
        if getattr(a, "resolved", None):
            rid, uri = a.resolved
            hint = f"\n(opdflow verify --run-id {rid} --store {uri} lists every damaged object)"
        print(f"opdflow: error: {e}{hint}", file=sys.stderr)
        return 2
    except (RunError, StoreError, ValueError) as e:
        print(f"opdflow: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a stage failed: its one-line reason above, the traceback in the Prefect log
        if os.environ.get("OPDFLOW_TRACEBACKS") == "1":
            raise
        print(f"opdflow: error: {type(e).__name__}: {' '.join(str(e).split())[:600]}", file=sys.stderr)
        return 1


def _print_failure(run) -> None:
    """The one summary of a failed run: its stages, then what failed and how to rerun it."""
    from opdflow.infra.artifacts.manifest import Run
    from opdflow.tasks.report import run_status, stage_table
    try:
        run = Run.open(run.store, run.run_id)
        _print_status(run_status(run))
        for r in stage_table(run):
            if r["status"] == "failed" or r.get("rerun_failed"):
                kept = " (its earlier committed outputs are kept)" if r.get("rerun_failed") else ""
                print(f"\nFAILED: {r['stage']}: {' '.join(str(r.get('error') or 'see the log').split())[:600]}{kept}\n"
                      f"after fixing the cause: opdflow stage {r['stage']} --run-id {run.run_id} --store {run.store.uri}"
                      " (committed stages are kept; the full traceback is in the Prefect log)", file=sys.stderr)
                break
    except Exception as e:  # noqa: BLE001 - the summary must not hide the failure itself
        print(f"(no run summary: {type(e).__name__}: {e})", file=sys.stderr)


def _serve(a: argparse.Namespace) -> int:
    if not os.path.isfile(os.path.join(a.model_dir, "config.json")):
        print(f"opdflow: error: {a.model_dir} is not a Hugging Face model dir (no config.json)", file=sys.stderr)
        return 2
    from opdflow.infra.serving.serve import Limits, ServeRefused, resolve_api_key, serve
    try:
        resolve_api_key(a.host, a.api_key)  # refuse before loading the model
    except ServeRefused as e:
        print(f"opdflow: error: {e}", file=sys.stderr)
        return 2
    limits = Limits(max_n=a.max_n, max_prompts=a.max_prompts, max_tokens=a.max_tokens, max_logprobs=a.max_logprobs,
                    max_response_mb=a.max_response_mb, max_request_mb=a.max_request_mb,
                    request_timeout_s=a.request_timeout_s)
    serve(a.model_dir, host=a.host, port=a.port, dtype=a.dtype, model_name=a.name, api_key=a.api_key, limits=limits)
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

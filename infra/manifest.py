"""Runs, stages and the manifest: what makes a single stage re-runnable anywhere.

A run lives under `runs/<run_id>/` in the artifact store:

    runs/<run_id>/run.json                      resolved config + creation time (written once)
    runs/<run_id>/execution.json                execution settings of the latest start, when they changed
                                                (shards, task runner, training processes: never results)
    runs/<run_id>/stages/<stage>/<key16>/...    a stage's output objects
    runs/<run_id>/attempts/<stage>/<NNN>.json   one record per attempt (running/failed/committed)
    runs/<run_id>/manifest/<stage>.json         the commit: written last, lists every output's sha256

Rules (DESIGN.md, "Contracts between stages"):
* A stage's identity is its *key*: sha256 of (stage name, its parameters, its input
  objects' sha256, the code version). Same key and outputs present = skip.
* A stage commits by writing its manifest entry last. Objects without a committed entry
  (a crashed attempt) are never read: readers only follow manifest entries.
* Every read of a stage output goes through `Run.read(ref)`, which checks the sha256 the
  manifest recorded and raises `ChecksumError` naming the object on a mismatch.

One file per stage (rather than one manifest file per run) means commits never
read-modify-write a shared object, which S3 could not make atomic.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from opdflow.infra.config import Config, parse_config
from opdflow.infra.provenance import code_version, stack
from opdflow.infra.store import ChecksumError, ObjectMissing, Store, StoreError, open_store, validate_run_id

Ref = dict  # {"key": str, "sha256": str, "size": int}


class RunError(RuntimeError):
    """A run-level problem that retrying cannot fix (unknown run, config mismatch, missing input)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def stage_key(name: str, params: dict, inputs: dict[str, Ref]) -> str:
    h = hashlib.sha256()
    h.update(_canonical({"stage": name, "params": params, "code": code_version(),
                         "inputs": {k: v["sha256"] for k, v in sorted(inputs.items())}}))
    return h.hexdigest()


@dataclass
class Run:
    store: Store
    run_id: str
    config: Config

    @property
    def prefix(self) -> str:
        return f"runs/{self.run_id}"

    # -- creation / opening -------------------------------------------------------------
    @classmethod
    def create_or_open(cls, store: Store, run_id: str, config: Config) -> "Run":
        """Open run_id if it exists with the same config; create it otherwise."""
        validate_run_id(run_id)
        key = f"runs/{run_id}/run.json"
        if store.exists(key):
            run = cls.open(store, run_id)
            if run.config.identity() != config.identity():
                raise RunError(f"run {run_id!r} already exists in {store.uri} with a different config; "
                               "use a new --run-id (or rerun with the stored config: opdflow run --run-id ID)")
            if run.config.execution() != config.execution():  # more GPUs, another cluster: same run
                store.put_bytes(f"runs/{run_id}/execution.json", json.dumps(config.execution(), indent=2).encode())
                run = cls(store, run_id, config.model_copy(update={"store": run.config.store}))
            return run
        store.put_bytes(key, json.dumps({"run_id": run_id, "created_at": _now(),
                                         "config": json.loads(config.to_json())}, indent=2).encode())
        return cls(store, run_id, config)

    @classmethod
    def open(cls, store: Store | str, run_id: str) -> "Run":
        store = open_store(store) if isinstance(store, str) else store
        validate_run_id(run_id)
        try:
            meta = json.loads(store.get_bytes(f"runs/{run_id}/run.json"))
        except ObjectMissing:
            raise RunError(f"no run {run_id!r} in store {store.uri}") from None
        config = parse_config(meta["config"])
        try:  # the execution settings of the run's latest start, if they changed since its creation
            config = config.with_execution(json.loads(store.get_bytes(f"runs/{run_id}/execution.json")))
        except ObjectMissing:
            pass
        return cls(store, run_id, config)

    def meta(self) -> dict:
        return json.loads(self.store.get_bytes(f"{self.prefix}/run.json"))

    # -- manifest ----------------------------------------------------------------------
    def entry(self, stage: str) -> dict | None:
        """The committed manifest entry of a stage, or None."""
        try:
            return json.loads(self.store.get_bytes(f"{self.prefix}/manifest/{stage}.json"))
        except ObjectMissing:
            return None

    def require(self, stage: str) -> dict:
        e = self.entry(stage)
        if e is None:
            raise RunError(f"stage {stage!r} of run {self.run_id!r} is not committed; run it first "
                           f"(opdflow stage {stage} --run-id {self.run_id})")
        return e

    def attempts(self, stage: str) -> list[dict]:
        keys = self.store.list(f"{self.prefix}/attempts/{stage}/")
        return [json.loads(self.store.get_bytes(k)) for k in keys]

    def outputs_present(self, entry: dict) -> bool:
        return all(self.store.exists(ref["key"]) for ref in entry["outputs"].values())

    # -- reading committed outputs ------------------------------------------------------
    def read(self, ref: Ref) -> bytes:
        return self.store.get_bytes(ref["key"], sha256=ref["sha256"])

    def output(self, stage: str, name: str) -> Ref:
        e = self.require(stage)
        try:
            return e["outputs"][name]
        except KeyError:
            raise RunError(f"stage {stage!r} has no output {name!r}") from None

    def read_output(self, stage: str, name: str) -> bytes:
        return self.read(self.output(stage, name))

    def read_json(self, stage: str, name: str) -> Any:
        return json.loads(self.read_output(stage, name))

    def outputs_under(self, stage: str, prefix: str, as_name: str | None = None) -> dict[str, Ref]:
        """A stage's outputs `prefix/*` (a model dir, a table's parts), renamed `as_name/*`."""
        return _under(self.require(stage), stage, prefix, as_name or prefix)

    def model_inputs(self, stage: str, prefix: str, as_name: str | None = None) -> dict[str, Ref]:
        """A model dir that a stage consumes, as that stage's inputs (its identity in the
        stage key): the refs of its objects under `as_name/`, or for a user's own dir its
        path and fingerprint."""
        e = self.require(stage)
        name = as_name or prefix
        refs = _under(e, stage, prefix, name)
        ext = e.get("external", {}).get(prefix)
        if ext is not None:
            refs[f"{name}/external"] = {"key": ext["path"], "sha256": ext["fingerprint"]}
        return refs

    def materialize(self, stage: str, prefix: str) -> Path:
        """A local directory holding the outputs `prefix/*` of a stage (a model dir, say):
        downloaded into the local cache and verified, cached by content. A model the user
        gave as a local dir (recorded under `external`) is used in place after checking
        its fingerprint."""
        e = self.require(stage)
        ext = e.get("external", {}).get(prefix)
        if ext is not None:
            from opdflow.infra.provenance import dir_fingerprint
            actual = dir_fingerprint(Path(ext["path"]))
            if actual != ext["fingerprint"]:
                raise ChecksumError(prefix, f"{ext['path']} (model dir recorded by stage {stage!r}; it changed "
                                    "since: start a new run)", ext["fingerprint"], actual)
            return Path(ext["path"])
        refs = {n[len(prefix) + 1:]: r for n, r in e["outputs"].items() if n.startswith(prefix + "/")}
        if not refs:
            raise RunError(f"stage {stage!r} has no outputs under {prefix!r}")
        return materialize_refs(self.store, refs)


def _under(entry: dict, stage: str, prefix: str, name: str) -> dict[str, Ref]:
    """An entry's outputs `prefix/*` renamed `name/*`; a user's own model dir (`external`) has none."""
    refs = {f"{name}/{n[len(prefix) + 1:]}": r for n, r in entry["outputs"].items() if n.startswith(prefix + "/")}
    if not refs and not entry.get("external", {}).get(prefix):
        raise RunError(f"stage {stage!r} has no outputs under {prefix!r}")
    return refs


def cache_root() -> Path:
    import os
    root = Path(os.environ.get("OPDFLOW_CACHE", Path.home() / ".cache" / "opdflow"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def materialize_refs(store: Store, refs: dict[str, Ref]) -> Path:
    """Verified local copy of a set of objects, as a directory named by their content."""
    digest = hashlib.sha256(_canonical({k: r["sha256"] for k, r in sorted(refs.items())})).hexdigest()[:24]
    dest = cache_root() / "objects" / digest
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".partial-"))
    try:
        for rel, ref in refs.items():
            store.get_file(ref["key"], tmp / rel, sha256=ref["sha256"])
        (tmp / ".complete").write_text("ok")
        if dest.exists():  # a concurrent materialization won, or a stale incomplete copy
            shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# -- running a stage --------------------------------------------------------------------

@dataclass
class StageContext:
    """What a stage body gets: its run, where to write, and how to report progress."""
    run: Run
    name: str
    key: str
    inputs: dict[str, Ref]
    outputs: dict[str, Ref] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    external: dict[str, Any] = field(default_factory=dict)
    backend: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[float, str], None] = lambda frac, msg="": None

    @property
    def out_prefix(self) -> str:
        return f"{self.run.prefix}/stages/{self.name}/{self.key[:16]}"

    def put_bytes(self, name: str, data: bytes) -> Ref:
        key = f"{self.out_prefix}/{name}"
        sha = self.run.store.put_bytes(key, data)
        ref = {"key": key, "sha256": sha, "size": len(data)}
        self.outputs[name] = ref
        return ref

    def put_json(self, name: str, obj: Any) -> Ref:
        return self.put_bytes(name, json.dumps(obj, indent=2, default=str).encode())

    def put_table(self, name: str, table) -> Ref:
        from opdflow.infra.tables import table_to_parquet
        return self.put_bytes(name, table_to_parquet(table))

    def put_file(self, name: str, path: Path) -> Ref:
        key = f"{self.out_prefix}/{name}"
        sha = self.run.store.put_file(key, path)
        ref = {"key": key, "sha256": sha, "size": Path(path).stat().st_size}
        self.outputs[name] = ref
        return ref

    def put_dir(self, name: str, path: Path) -> dict[str, Ref]:
        refs = {}
        for f in sorted(Path(path).rglob("*")):
            if f.is_file():
                rel = f.relative_to(path).as_posix()
                refs[rel] = self.put_file(f"{name}/{rel}", f)
        return refs

    def link(self, name: str, ref: Ref) -> Ref:
        """Record an existing object (e.g. a shared demo model) as this stage's output."""
        self.outputs[name] = dict(ref)
        return ref


def run_stage(run: Run, name: str, *, params: dict, inputs: dict[str, Ref],
              body: Callable[[StageContext], None], force: bool = False,
              progress: Callable[[float, str], None] | None = None) -> tuple[dict, bool]:
    """Run (or skip) one stage; returns (committed entry, ran?).

    Skips when a committed entry with the same key exists and its outputs are present,
    unless `force`. Records an attempt before running and commits the manifest entry
    last. On failure the attempt record says why and the exception propagates.
    """
    key = stage_key(name, params, inputs)
    existing = run.entry(name)
    if existing and not force and existing["key"] == key and run.outputs_present(existing):
        return existing, False

    n = len(run.store.list(f"{run.prefix}/attempts/{name}/")) + 1
    attempt_key = f"{run.prefix}/attempts/{name}/{n:03d}.json"
    started = time.time()
    record = {"stage": name, "attempt": n, "key": key, "status": "running", "started_at": _now(),
              "host": socket.gethostname(), "pid": os.getpid(), "started_unix": round(started, 3)}
    run.store.put_bytes(attempt_key, json.dumps(record).encode())

    ctx = StageContext(run=run, name=name, key=key, inputs=inputs)
    if progress is not None:
        ctx.progress = progress
    try:
        body(ctx)
    except BaseException as e:
        record.update(status="failed", finished_at=_now(), seconds=round(time.time() - started, 3),
                      error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=20))
        try:
            run.store.put_bytes(attempt_key, json.dumps(record).encode())
        except StoreError:
            pass  # the store itself is what failed; the exception below says so
        raise
    seconds = round(time.time() - started, 3)
    entry = {"stage": name, "key": key, "status": "committed", "attempt": n,
             "started_at": record["started_at"], "finished_at": _now(), "seconds": seconds,
             "params": params, "inputs": inputs, "outputs": ctx.outputs, "external": ctx.external, "metrics": ctx.metrics,
             "backend": ctx.backend, "stack": stack()}
    run.store.put_bytes(f"{run.prefix}/manifest/{name}.json", json.dumps(entry, indent=2, default=str).encode())
    record.update(status="committed", finished_at=entry["finished_at"], seconds=seconds,
                  finished_unix=round(time.time(), 3))
    run.store.put_bytes(attempt_key, json.dumps(record).encode())
    return entry, True


__all__ = ["Run", "RunError", "StageContext", "run_stage", "stage_key", "materialize_refs", "ChecksumError",
           "Ref", "cache_root"]

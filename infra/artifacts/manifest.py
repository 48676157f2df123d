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
  objects' sha256, the code version of the stage's module and what it imports,
  `stage_code_version`). Same key and outputs present = skip.
* A stage commits by writing its manifest entry last. Objects without a committed entry
  (a crashed attempt) are never read: readers only follow manifest entries.
* Every read of a stage output goes through `Run.read(ref)`, which checks the sha256 the
  manifest recorded and raises `ChecksumError` naming the object on a mismatch. A local
  cache copy (`materialize_refs`) is checked too, once per process per file: a bad copy is
  evicted and fetched again, with a warning naming it.
* Manifest entries, run.json, execution.json and attempt records that do not parse raise
  `CorruptObject` naming the file; a committed entry whose outputs are gone is recomputed
  with a warning naming the missing object. `opdflow verify` (`infra/artifacts/verify.py`) checks it all.

One file per stage (rather than one manifest file per run) means commits never
read-modify-write a shared object, which S3 could not make atomic.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from opdflow.infra.config import Config, parse_config
from opdflow.infra.artifacts.provenance import code_version, module_code_version, stack
from opdflow.infra.config import ConfigError
from opdflow.infra.failures import explain
from opdflow.infra.artifacts.store import (ChecksumError, CorruptObject, ObjectMissing, Store, StoreError, open_store,
                                 sha256_file, validate_run_id)

Ref = dict  # {"key": str, "sha256": str, "size": int}


class RunError(RuntimeError):
    """A run-level problem that retrying cannot fix (unknown run, config mismatch, missing input)."""


def warn(message: str) -> None:
    """A warning in the Prefect task's log when one is running (the UI shows it), else on stderr."""
    try:
        from prefect.context import TaskRunContext
        if TaskRunContext.get() is not None:
            from prefect.logging import get_run_logger
            get_run_logger().warning(message)
            return
    except Exception:  # noqa: BLE001 - logging must never fail a stage
        pass
    logging.getLogger("opdflow").warning(message)


class StoredBytes(bytes):
    """Bytes read from the store that remember where they came from, so that a reader whose
    parse fails (Parquet, JSON) can name the file (`tables.parquet_to_table` does)."""

    where: str = "<bytes>"


def _stored(data: bytes, where: str) -> StoredBytes:
    out = StoredBytes(data)
    out.where = where
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def stage_code_version(name: str) -> str:
    """The code version in a stage's key: the hash of the sources its declaring module runs
    (`provenance.module_code_version`: the module and what it imports from opdflow); a
    shard's is its stage's. A name that no stage declares (a test's own stage): the whole
    package's `code_version()`."""
    from opdflow.tasks.plan import stage_of
    from opdflow.tasks.shards import split_shard_name
    try:
        declared = stage_of((split_shard_name(name) or (name,))[0])
    except ValueError:
        return code_version()
    return module_code_version(declared.module)


def stage_key(name: str, params: dict, inputs: dict[str, Ref]) -> str:
    """sha256 of the stage's name, parameters, inputs' sha256 and code version."""
    h = hashlib.sha256()
    h.update(_canonical({"stage": name, "params": params, "code": stage_code_version(name),
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
                               f"use a new --run-id, or resume it with its stored config: "
                               f"opdflow run --run-id {run_id} --store {store.uri}")
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
        key = f"runs/{run_id}/run.json"
        try:
            meta = store.get_json(key)
        except ObjectMissing:
            raise RunError(f"no run {run_id!r} in store {store.uri}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise CorruptObject(key, store.describe(key), "not a run record (no 'config' mapping)")
        try:
            config = parse_config(meta["config"])
        except ConfigError as e:  # the stored record, not the user's YAML
            raise CorruptObject(key, store.describe(key), f"the stored config is invalid ({e}): the file was "
                                "edited or damaged; restore it from a backup, or start a new run") from None
        ex_key = f"runs/{run_id}/execution.json"
        try:  # the execution settings of the run's latest start, if they changed since its creation
            ex = store.get_json(ex_key)
        except ObjectMissing:
            return cls(store, run_id, config)
        try:
            config = config.with_execution(ex)
        except (ConfigError, TypeError, AttributeError) as e:
            raise CorruptObject(ex_key, store.describe(ex_key), f"invalid execution settings ({e}): the file was "
                                "edited or damaged; delete it to use the run's original settings") from None
        return cls(store, run_id, config)

    def meta(self) -> dict:
        return self.store.get_json(f"{self.prefix}/run.json")

    # -- manifest ----------------------------------------------------------------------
    def entry(self, stage: str) -> dict | None:
        """The committed manifest entry of a stage, or None."""
        key = f"{self.prefix}/manifest/{stage}.json"
        try:
            entry = self.store.get_json(key)
        except ObjectMissing:
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("outputs"), dict) or "key" not in entry:
            raise CorruptObject(key, self.store.describe(key), "not a manifest entry (no 'key' and 'outputs')")
        return entry

    def require(self, stage: str) -> dict:
        e = self.entry(stage)
        if e is None:
            raise RunError(f"stage {stage!r} of run {self.run_id!r} is not committed; run it first "
                           f"(opdflow stage {stage} --run-id {self.run_id} --store {self.store.uri})")
        return e

    def attempts(self, stage: str) -> list[dict]:
        keys = self.store.list(f"{self.prefix}/attempts/{stage}/")
        return [self.store.get_json(k) for k in keys]

    def outputs_present(self, entry: dict) -> bool:
        return not self.missing_outputs(entry)

    def missing_outputs(self, entry: dict) -> list[str]:
        """The names of a committed entry's outputs that are not in the store."""
        return [name for name, ref in entry["outputs"].items() if not self.store.exists(ref["key"])]

    # -- reading committed outputs ------------------------------------------------------
    def read(self, ref: Ref) -> bytes:
        """A committed object's bytes, verified against its sha256 (a StoredBytes naming the file)."""
        return _stored(self.store.get_bytes(ref["key"], sha256=ref["sha256"]), self.store.describe(ref["key"]))

    def output(self, stage: str, name: str) -> Ref:
        e = self.require(stage)
        try:
            return e["outputs"][name]
        except KeyError:
            raise RunError(f"stage {stage!r} has no output {name!r}") from None

    def read_output(self, stage: str, name: str) -> bytes:
        return self.read(self.output(stage, name))

    def read_json(self, stage: str, name: str) -> Any:
        ref = self.output(stage, name)
        return self.store.get_json(ref["key"], sha256=ref["sha256"])

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
            from opdflow.infra.artifacts.provenance import dir_fingerprint
            actual = dir_fingerprint(Path(ext["path"]))
            if actual != ext["fingerprint"]:
                raise ChecksumError(prefix, f"{ext['path']} (model dir recorded by stage {stage!r}; it changed "
                                    "since: start a new run)", ext["fingerprint"], actual)
            return Path(ext["path"])
        refs = {n[len(prefix) + 1:]: r for n, r in e["outputs"].items() if n.startswith(prefix + "/")}
        if not refs:
            raise RunError(f"stage {stage!r} has no outputs under {prefix!r}")
        return materialize_refs(self.store, refs)


def file_inputs(name: str, path: str | os.PathLike) -> dict[str, Ref]:
    """Files a stage reads by a config path (a dataset, an lm-eval include dir), as stage inputs:
    `{name: ref}` for a file, `{name/rel: ref}` for every file under a dir, each with its content
    sha256, so editing one changes the key of exactly the stages that read it. The `key` is the
    local path (not a store key); `verify` and readers never follow it."""
    p = Path(path).expanduser()
    if p.is_file():
        return {name: {"key": f"file:{p.resolve()}", "sha256": sha256_file(p), "size": p.stat().st_size}}
    if p.is_dir():
        return {f"{name}/{f.relative_to(p).as_posix()}": {"key": f"file:{f.resolve()}", "sha256": sha256_file(f),
                                                           "size": f.stat().st_size}
                for f in sorted(p.rglob("*")) if f.is_file() and "__pycache__" not in f.parts}
    return {}


def _under(entry: dict, stage: str, prefix: str, name: str) -> dict[str, Ref]:
    """An entry's outputs `prefix/*` renamed `name/*`; a user's own model dir (`external`) has none."""
    refs = {f"{name}/{n[len(prefix) + 1:]}": r for n, r in entry["outputs"].items() if n.startswith(prefix + "/")}
    if not refs and not entry.get("external", {}).get(prefix):
        raise RunError(f"stage {stage!r} has no outputs under {prefix!r}")
    return refs


def cache_root() -> Path:
    root = Path(os.environ.get("OPDFLOW_CACHE", Path.home() / ".cache" / "opdflow"))
    root.mkdir(parents=True, exist_ok=True)
    return root


# cache files whose sha256 this process has checked: path -> (size, mtime_ns, sha256)
_VERIFIED: dict[str, tuple[int, int, str]] = {}


def _signature(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _cache_fault(path: Path, ref: Ref) -> str | None:
    """Why a cached copy of `ref` cannot be used (None: it matches). Hashes a file once per
    process; later calls compare its size and mtime with the verified ones."""
    if not path.is_file():
        return "missing"
    sig = _signature(path)
    if _VERIFIED.get(str(path)) == (*sig, ref["sha256"]):
        return None
    actual = sha256_file(path)
    if actual != ref["sha256"]:
        return f"sha256 {actual}, expected {ref['sha256']}"
    _VERIFIED[str(path)] = (*sig, actual)
    return None


# one lock per cache directory: stages running at the same time in this process (the flow's
# threads) that read the same model fetch it once, and never replace a copy another is reading
_DIR_LOCKS: dict[str, threading.Lock] = {}
_DIR_LOCKS_GUARD = threading.Lock()


def _dir_lock(digest: str) -> threading.Lock:
    with _DIR_LOCKS_GUARD:
        return _DIR_LOCKS.setdefault(digest, threading.Lock())


def materialize_refs(store: Store, refs: dict[str, Ref]) -> Path:
    """Verified local copy of a set of objects, as a directory named by their content.

    A copy already in the cache is checked against the refs' sha256 (once per process per
    file); a bad one is evicted and fetched again from the store. If the store's copy is bad
    too, the ChecksumError names both paths. Safe from several threads (a lock per
    directory) and processes (a complete copy that another process renamed into place first
    is kept, never replaced)."""
    digest = hashlib.sha256(_canonical({k: r["sha256"] for k, r in sorted(refs.items())})).hexdigest()[:24]
    with _dir_lock(digest):
        return _materialize(store, refs, cache_root() / "objects" / digest)


def _materialize(store: Store, refs: dict[str, Ref], dest: Path) -> Path:
    evicted = ""
    if (dest / ".complete").exists():
        faults = {rel: f for rel, ref in refs.items() if (f := _cache_fault(dest / rel, ref)) is not None}
        if not faults:
            return dest
        rel, why = next(iter(faults.items()))
        warn(f"cache copy {dest / rel} of {refs[rel]['key']} is bad ({why}"
             + (f"; {len(faults) - 1} more files" if len(faults) > 1 else "")
             + f"): evicted {dest}, fetching again from {store.describe(refs[rel]['key'])}")
        evicted = str(dest / rel)
        shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".partial-"))
    try:
        for rel, ref in refs.items():
            try:
                store.get_file(ref["key"], tmp / rel, sha256=ref["sha256"])
            except ChecksumError as e:
                if not evicted:
                    raise
                raise ChecksumError(e.key, f"{e.location}; the cache copy {evicted} was bad too and was evicted",
                                    e.expected, e.actual) from None
            _VERIFIED[str(dest / rel)] = (*_signature(tmp / rel), ref["sha256"])  # rename keeps size and mtime
        (tmp / ".complete").write_text("ok")
        if (dest / ".complete").exists() and not evicted:  # another process finished first: keep its copy
            return dest
        if dest.exists():  # a stale incomplete copy
            shutil.rmtree(dest, ignore_errors=True)
        try:
            tmp.rename(dest)
        except OSError:  # another process renamed its complete copy into place just now
            if not (dest / ".complete").exists():
                raise
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
        from opdflow.infra.artifacts.tables import table_to_parquet
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
    last. On failure the attempt record says why and the exception propagates. `progress`
    hears 0 when the body starts and 1 once the stage committed (a skipped stage: nothing).
    """
    key = stage_key(name, params, inputs)
    try:
        existing = run.entry(name)
    except CorruptObject as e:  # a forced rerun replaces an entry that does not parse
        if not force:
            raise
        warn(f"stage {name}: recomputing: its manifest entry does not parse ({e})")
        existing = None
    if existing and not force and existing["key"] == key:
        missing = run.missing_outputs(existing)
        if not missing:
            return existing, False
        ref = existing["outputs"][missing[0]]
        warn(f"stage {name}: recomputing: its committed output {missing[0]!r} is missing from the store "
             f"({run.store.describe(ref['key'])})" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))

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
        ctx.progress(0.0, "running")  # every stage that runs shows a bar, even one whose body reports nothing
        body(ctx)
    except BaseException as e:
        explained = explain(e) if isinstance(e, Exception) else None  # says what to change, fails at once
        record.update(status="failed", finished_at=_now(), seconds=round(time.time() - started, 3),
                      error=str(explained) if explained else f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc(limit=20))
        try:
            run.store.put_bytes(attempt_key, json.dumps(record).encode())
        except StoreError:
            pass  # the store itself is what failed; the exception below says so
        if explained is not None:
            raise explained from e
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
    ctx.progress(1.0, "committed")
    return entry, True


__all__ = ["Run", "RunError", "StageContext", "run_stage", "stage_key", "materialize_refs", "ChecksumError",
           "CorruptObject", "Ref", "cache_root", "file_inputs", "warn"]

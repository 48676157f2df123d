"""Stage commits, skips, attempts and checksums, on a local store (no models needed)."""
from __future__ import annotations

import json

import pytest

from opdflow.infra.config import parse_config
from opdflow.infra.artifacts.manifest import Run, RunError, run_stage, stage_key
from opdflow.infra.artifacts.store import ChecksumError, InvalidKey, open_store


@pytest.fixture
def run(tmp_path):
    return Run.create_or_open(open_store(str(tmp_path / "store")), "r1", parse_config({}))


def test_commit_then_skip_then_force(run):
    calls = []

    def body(ctx):
        calls.append(1)
        ctx.put_json("out.json", {"n": len(calls)})

    e1, ran1 = run_stage(run, "s", params={"a": 1}, inputs={}, body=body)
    e2, ran2 = run_stage(run, "s", params={"a": 1}, inputs={}, body=body)
    assert (ran1, ran2) == (True, False) and e1 == e2
    e3, ran3 = run_stage(run, "s", params={"a": 1}, inputs={}, body=body, force=True)
    assert ran3 and json.loads(run.read(e3["outputs"]["out.json"])) == {"n": 2}
    assert [a["status"] for a in run.attempts("s")] == ["committed", "committed"]


def test_changed_params_or_inputs_rerun(run):
    body = lambda ctx: ctx.put_bytes("x", b"1")  # noqa: E731
    e, _ = run_stage(run, "s", params={"a": 1}, inputs={}, body=body)
    _, ran = run_stage(run, "s", params={"a": 2}, inputs={}, body=body)
    assert ran
    ref = {"key": "k", "sha256": "0" * 64}
    assert stage_key("s", {}, {"i": ref}) != stage_key("s", {}, {"i": {**ref, "sha256": "1" * 64}})


def test_crashed_attempt_commits_nothing(run):
    def body(ctx):
        ctx.put_bytes("partial", b"half")
        raise OSError("disk gone")

    with pytest.raises(OSError):
        run_stage(run, "s", params={}, inputs={}, body=body)
    assert run.entry("s") is None
    att = run.attempts("s")
    assert att[-1]["status"] == "failed" and "disk gone" in att[-1]["error"]
    e, ran = run_stage(run, "s", params={}, inputs={}, body=lambda ctx: ctx.put_bytes("partial", b"whole"))
    assert ran and run.read(e["outputs"]["partial"]) == b"whole"


def test_deleted_output_reruns(run):
    body = lambda ctx: ctx.put_bytes("x", b"1")  # noqa: E731
    e, _ = run_stage(run, "s", params={}, inputs={}, body=body)
    run.store.delete(e["outputs"]["x"]["key"])
    _, ran = run_stage(run, "s", params={}, inputs={}, body=body)
    assert ran


def test_corrupted_object_names_it(run):
    e, _ = run_stage(run, "s", params={}, inputs={}, body=lambda ctx: ctx.put_bytes("table.parquet", b"abc"))
    key = e["outputs"]["table.parquet"]["key"]
    run.store.local_path(key).write_bytes(b"abd")
    with pytest.raises(ChecksumError, match="table.parquet"):
        run.read_output("s", "table.parquet")


def test_run_ids_and_config_mismatch(tmp_path):
    store = open_store(str(tmp_path / "s"))
    for bad in ("../x", "a/b", "", ".."):
        with pytest.raises(InvalidKey):
            Run.create_or_open(store, bad, parse_config({}))
    Run.create_or_open(store, "ok", parse_config({}))
    with pytest.raises(RunError, match="different config"):
        Run.create_or_open(store, "ok", parse_config({"seed": 3}))
    with pytest.raises(RunError, match="no run"):
        Run.open(store, "missing")
    with pytest.raises(RunError, match="not committed"):
        Run.open(store, "ok").require("models")

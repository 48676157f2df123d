"""Sharded stages on a Dask cluster through Prefect (prefect-dask's DaskTaskRunner).

A real Prefect server, the CLI in a subprocess, a local Dask cluster of two worker
processes with one "GPU" slot each (and two threads each, so only the slot keeps a worker
to one shard at a time). One worker process is SIGKILLed while it holds a shard: Dask
reschedules the shard on a live worker, the stage completes, every shard is committed
exactly once, and the table equals the unsharded run's (the same tokens; log-probs equal up
to float32 rounding, as the workers run torch with another thread count).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from opdflow.infra.config import load_config
from opdflow.infra.artifacts.manifest import Run
from opdflow.infra.artifacts.store import open_store
from opdflow.tasks import models, prompts, rollout
from opdflow.tasks.shards import read_parts, shard_name

pytestmark = [pytest.mark.slow, pytest.mark.integration]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 4


def _config(**scale):
    return load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                       {"scale": scale, "rollout": {"prompts_per_round": 32, "samples_per_prompt": 2, "batch_size": 8}})


def test_sharded_rollout_on_dask_survives_a_killed_worker(prefect_server, tmp_path):
    store = open_store(str(tmp_path / "store"))
    ref = Run.create_or_open(store, "ref", _config())
    for fn, stage in ((models.run, "models"), (prompts.run, "prompts"), (rollout.run, "rollout.r01")):
        fn(ref, stage)
    run = Run.create_or_open(store, "dask", _config(shards=N, task_runner="dask", dask_workers=2, gpus_per_worker=1))
    models.run(run, "models")
    prompts.run(run, "prompts")

    env = {**prefect_server.env, "OPDFLOW_CACHE": os.environ["OPDFLOW_CACHE"]}
    proc = subprocess.Popen([sys.executable, "-m", "opdflow.flows.cli", "stage", "rollout.r01", "--run-id", "dask",
                             "--store", store.uri], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.monotonic() + 600
    try:
        while killed is None:
            assert proc.poll() is None, "the stage ended before a worker could be killed:\n" + proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline
            for i in range(N):
                attempts = run.attempts(shard_name("rollout.r01", i, N))
                if attempts and attempts[-1]["status"] == "running":
                    pid = attempts[-1]["pid"]
                    assert pid != proc.pid  # shards run in Dask worker processes, not the flow's
                    os.kill(pid, signal.SIGKILL)
                    killed = (i, pid)
                    break
            time.sleep(0.02)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]

    i_killed, pid = killed
    for i in range(N):
        attempts = run.attempts(shard_name("rollout.r01", i, N))
        assert [a["status"] for a in attempts].count("committed") == 1, (i, attempts)
        if i == i_killed:
            assert attempts[0]["status"] == "running" and attempts[0]["pid"] == pid  # died with its worker
            assert attempts[-1]["pid"] != pid
    assert run.require("rollout.r01")["metrics"]["shards"] == N
    got, want = read_parts(run, "rollout.r01", "rollouts"), read_parts(ref, "rollout.r01", "rollouts")
    assert got.drop(["logprobs"]).equals(want.drop(["logprobs"]))  # every sampled token, in order
    # logprobs: Dask workers run torch on 1 thread, this process on more: float32 summation
    # order differs (measured: max 4.8e-7); with equal thread counts they are bitwise equal
    for g, w in zip(got["logprobs"].to_pylist(), want["logprobs"].to_pylist()):
        assert g == pytest.approx(w, abs=1e-5)

    # GPU slots: a worker process never ran two shards at once
    done = [a for i in range(N) for a in run.attempts(shard_name("rollout.r01", i, N)) if a["status"] == "committed"]
    for p in {a["pid"] for a in done}:
        spans = sorted((a["started_unix"], a["finished_unix"]) for a in done if a["pid"] == p)
        assert all(prev_end <= start for (_, prev_end), (start, _) in zip(spans, spans[1:])), spans

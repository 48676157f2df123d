"""Operating opdflow with Prefect, against real servers.

`prefect deploy --all` from this repository's prefect.yaml, a process worker, a
deployment run of the lifecycle (tiny config) to completion; the worker killed while a
train stage runs, then `prefect flow-run retry`: committed stages are skipped and the run
completes. The S3 path through an outage: a TCP proxy in front of moto is cut during a
stage, the Prefect task retries, and no object without a manifest entry is ever read.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _prefect(*args, env, timeout=300) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _client(api_url):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    return temporary_settings(updates={PREFECT_API_URL: api_url}), get_client


def _flow_run(api_url, flow_run_id):
    settings, get_client = _client(api_url)
    with settings, get_client(sync_client=True) as c:
        return c.read_flow_run(flow_run_id)


def _wait(api_url, flow_run_id, done, timeout=900):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fr = _flow_run(api_url, flow_run_id)
        if done(fr):
            return fr
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish: {fr.state}")


class Worker:
    def __init__(self, env, log: Path):
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "opdflow-local",
                                      "--type", "process"], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self):
        """SIGKILL the worker and every process under it (the flow-run process runs in a
        session of its own, so a process-group kill would leave it running): a lost machine."""
        import psutil
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        self.proc.wait(30)


def test_deploy_run_kill_worker_and_retry(prefect_server, tmp_path, subtests):
    env = {**prefect_server.env, "OPDFLOW_CACHE": os.environ["OPDFLOW_CACHE"]}
    _prefect("work-pool", "create", "opdflow-local", "--type", "process", env=env)
    _prefect("deploy", "--all", env=env)
    store = tmp_path / "store"
    # ablation off: what is tested here is the deployment, the lost worker and the retry; the
    # ablation arms (two thirds of the tiny plan's stages) run in test_lifecycle.py
    overrides = json.dumps({"train": {"checkpoint_every": 1, "steps_per_round": 12}, "ablation": {"enabled": False}})
    out = _prefect("deployment", "run", "opdflow-lifecycle/demo", "--param", f"config_path={ROOT}/configs/tiny.yaml",
                   "--param", f"store={store}", "--param", f"overrides={overrides}", env=env)
    flow_run_id = next(line.split()[-1] for line in out.stdout.splitlines() if "UUID" in line)

    # kill the worker (and the flow-run process it started) while round 2 trains: the round holds
    # after its step-3 checkpoint (OPDFLOW_HOLD_AFTER_CHECKPOINT), so the kill cannot come too late
    from opdflow.tasks.train_worker import HOLD_ENV
    worker = Worker({**env, HOLD_ENV: "train.r02:3"}, tmp_path / "worker1.log")
    try:
        deadline = checked = time.monotonic() + 600
        checked = time.monotonic()
        while not list(store.glob("runs/*/stages/train.r02/*/partial/step-000003/state.json")):
            assert time.monotonic() < deadline, (tmp_path / "worker1.log").read_text()[-3000:]
            assert worker.proc.poll() is None, (tmp_path / "worker1.log").read_text()[-3000:]
            if time.monotonic() > checked + 5:  # a flow run that already ended will not get there
                state = _flow_run(prefect_server.url, flow_run_id).state
                assert not state.is_final(), f"{state}\n{(tmp_path / 'worker1.log').read_text()[-3000:]}"
                checked = time.monotonic()
            time.sleep(0.05)
    finally:
        worker.kill()
    run_id = next(store.glob("runs/*")).name
    committed_before = {p.stem for p in (store / "runs" / run_id / "manifest").glob("*.json")}
    assert "train.r01" in committed_before and "train.r02" not in committed_before

    # The run is stuck in Running with nobody behind it; say what a heartbeat monitor would, then retry.
    from prefect.states import Crashed
    settings, get_client = _client(prefect_server.url)
    with settings, get_client(sync_client=True) as c:
        c.set_flow_run_state(flow_run_id, Crashed(message="worker killed"), force=True)
    _prefect("flow-run", "retry", flow_run_id, env=env)
    worker = Worker(env, tmp_path / "worker2.log")
    try:
        fr = _wait(prefect_server.url, flow_run_id, lambda fr: fr.state.is_final())
    finally:
        worker.kill()
    assert fr.state.is_completed(), (tmp_path / "worker2.log").read_text()[-4000:]

    # committed stages were not run again; the interrupted round resumed from its checkpoint
    for stage in committed_before:
        attempts = list((store / "runs" / run_id / "attempts" / stage).glob("*.json"))
        assert len(attempts) == 1, stage
    train2 = json.loads((store / "runs" / run_id / "manifest" / "train.r02.json").read_text())
    assert train2["metrics"]["resumed_from_step"] == 3
    status = json.loads(subprocess.run([sys.executable, "-m", "opdflow.flows.cli", "status", "--run-id", run_id,
                                        "--store", str(store), "--json"], capture_output=True, text=True,
                                       cwd=ROOT).stdout)
    assert all(s["status"] == "committed" for s in status["stages"])

    # what a person sees: the deployment's flow run with its artifacts, in the Prefect UI
    import opdflow_tests_ui as ui  # registered by conftest.py
    with subtests.test("deployment flow run in the Prefect UI"):
        ui.require_chromium()  # a skip of this check alone when there is no browser
        (ROOT / "test-output").mkdir(exist_ok=True)
        dom = ui.capture(ui.flow_run_artifacts_url(prefect_server.url[: -len("/api")], flow_run_id),
                         ROOT / "test-output" / "deployment-flow-run-artifacts.png")
        ui.assert_rendered(dom, text=["run-summary", "evaluation", "rock"])


class TcpProxy:
    """A loopback TCP forwarder we can cut and restore: a network outage in front of S3."""

    def __init__(self, target_port: int):
        self.target = target_port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.server = None
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def _pipe(self, r, w):
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except Exception:  # noqa: BLE001 - a cut connection ends the pipe
            pass
        finally:
            w.close()

    async def _handle(self, r, w):
        try:
            tr, tw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            w.close()
            return
        await asyncio.gather(self._pipe(r, tw), self._pipe(tr, w))

    def up(self):
        async def start():
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def down(self):
        async def stop():
            self.server.close()
            await self.server.wait_closed()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)


def test_s3_outage_during_a_stage_is_retried(moto_server, s3_store_uri, monkeypatch):
    """Cut the S3 endpoint while a stage runs; the Prefect task retries once it is back,
    and everything the manifest names exists and verifies."""
    import boto3
    from prefect import flow

    from opdflow.infra.config import load_config
    from opdflow.infra.artifacts.manifest import Run
    from opdflow.infra.artifacts.store import open_store
    from opdflow.tasks.models import models_task
    from opdflow.tasks.prompts import prompts_task
    from opdflow.tasks.rollout import rollout_task

    bucket, _, prefix = s3_store_uri[len("s3://"):].partition("/")
    direct = boto3.client("s3", endpoint_url=moto_server.endpoint)
    proxy = TcpProxy(moto_server.port)
    proxy.up()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    store = open_store(s3_store_uri)
    run = Run.create_or_open(store, "outage", load_config(ROOT / "configs" / "tiny.yaml"))
    cut, first_attempt_failed = threading.Event(), threading.Event()

    # The endpoint stays down until the stage's first attempt has failed (Prefect is asking whether
    # to retry), not for a fixed time: botocore's own retries can ride out a short outage, and a
    # stage that is computing makes no S3 calls, so a timed cut may never be felt.
    def cut_while_the_first_attempt_runs():
        key = f"{prefix}/runs/outage/attempts/rollout.r01/001.json"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if direct.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount"):
                proxy.down()
                cut.set()
                first_attempt_failed.wait(240)
                proxy.up()
                return
            time.sleep(0.01)

    retry_condition = rollout_task.retry_condition_fn

    def retry_condition_after_the_outage(task, task_run, state):
        first_attempt_failed.set()
        return retry_condition(task, task_run, state)

    @flow
    def f():
        models_task(store.uri, "outage", "models")
        prompts_task(store.uri, "outage", "prompts")
        threading.Thread(target=cut_while_the_first_attempt_runs, daemon=True).start()
        return rollout_task.with_options(retry_condition_fn=retry_condition_after_the_outage)(
            store.uri, "outage", "rollout.r01")

    result = f()
    assert cut.is_set() and first_attempt_failed.is_set() and result["ran"]
    attempts = run.attempts("rollout.r01")
    assert len(attempts) >= 2 and attempts[0]["status"] in ("running", "failed") and attempts[-1]["status"] == "committed"
    entry = run.require("rollout.r01")
    for ref in entry["outputs"].values():
        run.read(ref)
    stage_objects = store.list("runs/outage/stages/rollout.r01")  # the stage's and its shards' objects
    assert sorted(stage_objects) == sorted(r["key"] for r in entry["outputs"].values())

"""Session-wide test harness: markers, and a real S3 server (moto) over HTTP.

The S3 tests talk to moto's standalone server in a subprocess, through boto3's normal
HTTP path, with the endpoint given by the standard `AWS_ENDPOINT_URL` setting: the same
way a user points opdflow at MinIO.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest


def _no_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


# The Triton kernels run under the interpreter when there is no GPU. TRITON_INTERPRET=1 must be
# in the environment before `triton` is first imported (Triton's own standard-library functions
# are decorated at import time), and any test module may import it indirectly (transformers
# pulls in torch._inductor, which imports triton), so it is set here, before collection, unless
# a CUDA device is present or the user already chose a value.
if _no_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # Isolation: no hub, a private model cache and Prefect home per test session.
    _session_tmp = tempfile.mkdtemp(prefix="opdflow-tests-")
    config._opdflow_tmp = _session_tmp
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      OPDFLOW_CACHE=os.path.join(_session_tmp, "cache"),
                      PREFECT_HOME=os.path.join(_session_tmp, "prefect"),
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
                      PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    os.environ.pop("PREFECT_API_URL", None)
    _register_ui_helper()
    config.addinivalue_line("markers", "integration: starts real servers or subprocesses (e.g. the S3 server)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


# The longest test files (minutes each on 2 cores), started first: `make test` runs files on two
# pytest-xdist workers in collection order (`--dist loadfile`), so the long ones would otherwise
# come last (alphabetically) and run while the other worker sits idle.
LONGEST_FIRST = ("test_lifecycle.py", "test_operations.py", "test_vllm_real.py", "test_dask.py",
                 "test_stages.py", "test_fsdp.py", "test_code_identity.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


def _register_ui_helper() -> None:
    """tests/ is not a package (importlib import mode): make tests/ui.py importable as
    `opdflow_tests_ui`, once, for every test that looks at the Prefect UI."""
    import importlib.util
    if "opdflow_tests_ui" not in sys.modules:
        spec = importlib.util.spec_from_file_location("opdflow_tests_ui", os.path.join(os.path.dirname(__file__), "ui.py"))
        module = sys.modules["opdflow_tests_ui"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


def pytest_unconfigure(config):
    import shutil
    tmp = getattr(config, "_opdflow_tmp", None)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's S3 server as a subprocess on a loopback port; `stop()`/`start()` to simulate an outage.

    A restart keeps the port (so the endpoint stays valid) but loses all buckets and objects.
    """

    def __init__(self, port: int | None = None, start_timeout: float = 60.0):
        self.port = port or _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with opener.open(f"{self.endpoint}/", timeout=2):
                    return
            except urllib.error.HTTPError:  # any HTTP answer means the server is up
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not answer at {self.endpoint} within "
                                       f"{self.start_timeout}s:\n{self.log()}")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]


@pytest.fixture(scope="session")
def moto_server():
    """The running MotoServer (for tests that stop/restart it; restart it before returning)."""
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server._log.close()


@pytest.fixture(scope="session")
def s3_endpoint(moto_server) -> str:
    """URL of a real S3-compatible server (moto) on loopback, for the whole session."""
    return moto_server.endpoint


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch, tmp_path):
    """Standard AWS settings pointing boto3 at the test server, isolated from the user's AWS config."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"])))
    return s3_endpoint


@pytest.fixture
def s3_store_uri(s3_env) -> str:
    """`s3://<fresh bucket>/some/prefix` on the test server; AWS env vars set for this test."""
    import boto3
    bucket = f"opdflow-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/some/prefix"


# -- opdflow fixtures -----------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_config():
    from opdflow.infra.config import load_config
    return load_config(TINY)


class ServerProcess:
    """A server as a subprocess on a loopback port, ready once its health URL answers."""

    def __init__(self, cmd: list[str], health_url: str, env: dict, start_timeout: float,
                 new_session: bool = False):
        self._new_session = new_session
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=new_session)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[2:4]} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with opener.open(health_url, timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{cmd[2:4]} did not answer within {start_timeout}s:\n{self.log()}")
                time.sleep(0.2)

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            if self._new_session:
                os.killpg(self.proc.pid, 15)
            else:
                self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9) if self._new_session else self.proc.kill()
                self.proc.wait(10)


class PrefectServer(ServerProcess):
    """`prefect server start` as a subprocess on a loopback port, with its own database."""

    def __init__(self, home: str, start_timeout: float = 180.0):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = {**os.environ, "PREFECT_HOME": home, "PREFECT_API_URL": self.url,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "true"}
        super().__init__([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                          str(self.port)], f"{self.url}/health", self.env, start_timeout, new_session=True)


class OpdflowServe(ServerProcess):
    """`opdflow serve MODEL_DIR` as a subprocess on a loopback port; `url` is its root."""

    # the tests score with k up to the whole (tiny) vocabulary: no logprobs cap unless a test sets one
    def __init__(self, model_dir, name: str = "tiny", start_timeout: float = 120.0,
                 args: tuple[str, ...] = ("--max-logprobs", "-1"), env: dict | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        super().__init__([sys.executable, "-m", "opdflow.flows.cli", "serve", str(model_dir), "--host", "127.0.0.1",
                          "--port", str(self.port), "--name", name, *args], f"{self.url}/health", env, start_timeout)


@pytest.fixture(scope="session")
def opdflow_serve():
    """Start `opdflow serve` subprocesses: `srv = opdflow_serve(model_dir, name)` (srv.url, srv.stop());
    any still running are stopped at the end of the session."""
    started: list[OpdflowServe] = []

    def start(model_dir, name: str = "tiny", **kw) -> OpdflowServe:
        started.append(OpdflowServe(model_dir, name, **kw))
        return started[-1]
    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    server = PrefectServer(str(tmp_path_factory.mktemp("prefect-server-home")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def demo_dirs(tmp_path_factory) -> dict:
    """The tiny demo teacher and student (`DemoSpec.tiny()`), built once per session."""
    from opdflow.infra.testbeds import demo
    return demo.build_demo(demo.DemoSpec.tiny(), tmp_path_factory.mktemp("tiny-demo"))


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models: one torch thread is fastest, and immune to other processes on a small machine."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


MLFLOW_BIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-mlflow", "bin", "mlflow")


class MlflowServer(ServerProcess):
    """A real `mlflow server` (from .venv-mlflow, `make mlflow-server`) on loopback, SQLite-backed."""

    def __init__(self, home: str, start_timeout: float = 180.0):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([MLFLOW_BIN, "server", "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
                          "--default-artifact-root", f"{home}/artifacts", "--host", "127.0.0.1",
                          "--port", str(self.port), "--workers", "1"],
                         f"{self.url}/health", {**os.environ}, start_timeout, new_session=True)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A running MLflow tracking server (`.url`); skipped with the reason when .venv-mlflow is missing."""
    if not os.path.exists(MLFLOW_BIN):
        pytest.skip("no MLflow server: run `make mlflow-server` (builds .venv-mlflow)")
    server = MlflowServer(str(tmp_path_factory.mktemp("mlflow-home")))
    yield server
    server.stop()

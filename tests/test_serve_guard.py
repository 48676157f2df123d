"""`opdflow serve` hardened: API key, request limits, NaN/inf, timeouts, no paths in answers.

A real `opdflow serve` subprocess on loopback with an API key (from OPDFLOW_SERVE_API_KEY) and
small limits, real HTTP requests (a bounded number, each answered in well under a second), and
the `openai` backend sending the key. The timeout checks serve `make_app` with a slow sampler
through uvicorn in a thread, also over real HTTP.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

KEY = "sk-serve-test-0123456789"


def _tiny_model(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from opdflow.infra.testbeds.demo import build_tokenizer
    from opdflow.infra.models.lm import save_model
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return save_model(LlamaForCausalLM(cfg), tok, out)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _tiny_model(tmp_path_factory.mktemp("guard-model") / "secret-dir-name" / "tiny")


@pytest.fixture(scope="module")
def guarded(model_dir, opdflow_serve):
    srv = opdflow_serve(model_dir, "tiny", args=("--max-n", "8", "--max-prompts", "16", "--max-tokens", "64", "--max-response-mb", "0.5",
                                                 "--max-request-mb", "1"),
                        env={"OPDFLOW_SERVE_API_KEY": KEY})
    yield srv
    srv.stop()


def _post(url, body, key=KEY, raw: bytes | None = None):
    import httpx
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(url, content=raw, headers={**headers, "Content-Type": "application/json"}, timeout=60)
    return httpx.post(url, json=body, headers=headers, timeout=60)


def test_api_key_and_no_paths(guarded, model_dir):
    import httpx
    assert httpx.get(f"{guarded.url}/health").status_code == 200  # liveness without the key
    assert httpx.get(f"{guarded.url}/v1/models").status_code == 401
    r = httpx.get(f"{guarded.url}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    assert _post(f"{guarded.url}/v1/completions", {"prompt": [1, 5]}, key="wrong").status_code == 401
    r = httpx.get(f"{guarded.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
    assert "secret-dir-name" not in r.text and str(model_dir) not in r.text
    ok = _post(f"{guarded.url}/v1/completions", {"prompt": [1, 5], "max_tokens": 3, "seed": 1, "logprobs": 1})
    assert ok.status_code == 200 and "secret-dir-name" not in ok.text


def test_limits(guarded):
    url = f"{guarded.url}/v1/completions"

    def refused(body=None, raw=None, status=400):
        r = _post(url, body, raw=raw)
        assert r.status_code == status, r.text
        return r.json()["error"]["message"]

    assert "n=10000 is more than this server allows per request (8" in refused({"prompt": [1, 5], "n": 10000})
    assert "20000 prompts in one request; this server allows 16" in refused({"prompt": [[1, 5]] * 20000})
    # the 117-byte request of the issue: n=1000, whole-vocabulary logprobs, echo
    assert "n=1000" in refused({"prompt": [1, 5], "n": 1000, "logprobs": -1, "prompt_logprobs": -1, "echo": True})
    msg = refused({"prompt": [1, 5], "logprobs": -1, "prompt_logprobs": -1, "echo": True})
    assert "Requested sample logprobs of" in msg and "greater than max allowed: 20" in msg
    assert "Requested prompt logprobs of 21" in refused({"prompt": [1, 5], "prompt_logprobs": 21})
    assert "max_tokens=100000 is more than this server allows (64" in refused({"prompt": [1, 5],
                                                                               "max_tokens": 100000})
    msg = refused({"prompt": [[1, 5]] * 16, "n": 8, "max_tokens": 60, "logprobs": 20})
    assert "the response would be about" in msg and "--max-response-mb" in msg
    for bad in (b'{"prompt": [1, 5], "temperature": NaN}', b'{"prompt": [1, 5], "top_p": Infinity}'):
        assert "invalid request" in refused(raw=bad)
    big = json.dumps({"prompt": [1, 5], "pad": "x" * (2 * 2**20)}).encode()
    assert "more than this server accepts" in refused(raw=big, status=413)


def test_non_loopback_needs_a_key(model_dir):
    out = subprocess.run([sys.executable, "-m", "opdflow.flows.cli", "serve", str(model_dir), "--host", "0.0.0.0",
                          "--port", "1"], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in __import__("os").environ.items() if k != "OPDFLOW_SERVE_API_KEY"})
    assert out.returncode == 2
    assert "--host 0.0.0.0 is reachable from other machines: set an API key (OPDFLOW_SERVE_API_KEY" in out.stderr


def test_openai_backend_sends_the_key(guarded):
    from opdflow.infra.testbeds.demo import build_tokenizer
    from opdflow.infra.models.lm import SampleSettings
    from opdflow.infra.sampling.openai_backend import OpenAIBackend, OpenAIBackendError
    tok = build_tokenizer()
    st = SampleSettings(max_new_tokens=3)
    with OpenAIBackend(guarded.url, "tiny", api_key=KEY) as b:
        [s] = b.sample([[1, 5]], [3], st, tok.eos_token_id, tok.pad_token_id)
        assert 1 <= len(s.response_ids) <= 3
    with OpenAIBackend(guarded.url, "tiny", api_key=None, max_retries=3) as b:
        with pytest.raises(OpenAIBackendError) as e:
            b.sample([[1, 5]], [3], st, tok.eos_token_id, tok.pad_token_id)
        assert e.value.status == 401  # not retried: a 4xx other than 429


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_request_timeouts(model_dir):
    import httpx
    import uvicorn

    from opdflow.infra.models.lm import sample
    from opdflow.infra.serving.serve import Limits, make_app

    def slow(*args, **kw):
        time.sleep(1.5)
        return sample(*args, **kw)
    app = make_app(model_dir, sampler=slow, limits=Limits(request_timeout_s=0.5))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/v1/completions"
        results = {}

        def call(i):
            results[i] = httpx.post(url, json={"prompt": [1, 5], "max_tokens": 2, "seed": i}, timeout=30)
        first = threading.Thread(target=call, args=(0,))
        first.start()
        time.sleep(0.2)  # the first request holds the model; the second waits for it
        call(1)
        first.join()
        assert results[0].status_code == 504 and "took longer than 0.5 s" in results[0].json()["error"]["message"]
        assert results[1].status_code in (503, 504), results[1].text
    finally:
        app.state.served.lock.acquire(timeout=30)  # let the timed-out batch finish before shutting down
        app.state.served.lock.release()
        server.should_exit = True
        t.join(10)

"""`opdflow serve` (infra/serving/serve.py) and the OpenAI-compatible client backend (infra/sampling/openai_backend.py).

Parsing tests use response bodies in vLLM's completions shape (vllm/entrypoints/openai/completion/
protocol.py and serving.py: logprobs blocks with "token_id:N" tokens and k + 1 top entries;
prompt_logprobs lists of {token id: {logprob, rank, decoded_token}} with the actual token first).
Integration tests start `opdflow serve` on a tiny random demo-tokenizer model as a real subprocess
and check that remote sampling and scoring equal the in-process sampler and a teacher-forced
forward; a stdlib HTTP server in a thread plays a flaky upstream for the retry tests.

Run: ``python -m pytest -q tests/test_serve_openai.py`` (about 30-40 s on 2 cores).
"""
from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from opdflow.infra.models.lm import SampleSettings
from opdflow.infra.sampling.openai_backend import (OpenAIBackend, OpenAIBackendError, error_message, parse_completion_choice,
                                          parse_prompt_logprobs, parse_retry_after, retry_delay, server_root,
                                          top_k_entries)

# -- fixtures in vLLM's response shape ------------------------------------------------------

# logprobs=1, return_tokens_as_token_ids=true: per generated token the sampled token first, then
# the top 1; when the sampled token is the top 1 the dict has a single entry.
VLLM_SAMPLE_CHOICE = {
    "index": 0,
    "text": " Paris.",
    "logprobs": {
        "text_offset": [0, 12, 24],
        "token_logprobs": [-0.3125, -2.75, -0.015625],
        "tokens": ["token_id:12366", "token_id:13", "token_id:2"],
        "top_logprobs": [
            {"token_id:12366": -0.3125},
            {"token_id:13": -2.75, "token_id:627": -0.5},
            {"token_id:2": -0.015625},
        ],
    },
    "finish_reason": "stop",
    "stop_reason": None,
    "prompt_logprobs": None,
    "token_ids": None,
    "prompt_token_ids": None,
}

VLLM_SAMPLE_RESPONSE = {
    "id": "cmpl-0d5e9b3f2c1a4e6b8f7a9c0d1e2f3a4b",
    "object": "text_completion",
    "created": 1767225600,
    "model": "teacher",
    "choices": [VLLM_SAMPLE_CHOICE],
    "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
}

# echo=true, max_tokens=0, prompt_logprobs=2 over the 5-token sequence [1, 450, 7483, 338, 3681]:
# position 0 has no logprob; position 2's actual token (7483) is outside the top 2 (rank 7), so
# its dict has 3 entries; at position 3 the actual token is the top 1 (2 entries); at position 4
# it is the top 2, listed first as vLLM inserts it first. -9999.0 is vLLM's clamp of -inf.
VLLM_SCORE_RESPONSE = {
    "id": "cmpl-5b7c9d1e3f5a7b9c1d3e5f7a9b1c3d5e",
    "object": "text_completion",
    "created": 1767225601,
    "model": "teacher",
    "choices": [{
        "index": 0,
        "text": "<s> The capital is Paris",
        "logprobs": None,
        "finish_reason": "length",
        "stop_reason": None,
        "prompt_logprobs": [
            None,
            {"450": {"logprob": -1.5, "rank": 1, "decoded_token": "The"},
             "1576": {"logprob": -2.25, "rank": 2, "decoded_token": "A"}},
            {"7483": {"logprob": -6.5, "rank": 7, "decoded_token": "capital"},
             "937": {"logprob": -1.125, "rank": 1, "decoded_token": "first"},
             "1900": {"logprob": -1.875, "rank": 2, "decoded_token": "best"}},
            {"338": {"logprob": -0.25, "rank": 1, "decoded_token": "is"},
             "310": {"logprob": -9999.0, "rank": 2, "decoded_token": "of"}},
            {"3681": {"logprob": -1.0, "rank": 2, "decoded_token": "Paris"},
             "278": {"logprob": -0.75, "rank": 1, "decoded_token": "the"}},
        ],
        "token_ids": None,
        "prompt_token_ids": None,
    }],
    "usage": {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5},
}


def test_parse_completion_choice_recovers_ids_and_logprobs():
    s = parse_completion_choice(VLLM_SAMPLE_RESPONSE["choices"][0])
    assert s.response_ids == [12366, 13, 2]
    assert s.logprobs == [-0.3125, -2.75, -0.015625]  # token_logprobs, not the top alternative
    assert s.finish_reason == "stop"
    length = {**VLLM_SAMPLE_CHOICE, "finish_reason": "length"}
    assert parse_completion_choice(length).finish_reason == "length"


def test_parse_completion_choice_refuses_what_it_cannot_read():
    text_tokens = json.loads(json.dumps(VLLM_SAMPLE_CHOICE))
    text_tokens["logprobs"]["tokens"] = [" Paris", ".", "</s>"]
    with pytest.raises(ValueError, match="return_tokens_as_token_ids"):
        parse_completion_choice(text_tokens)
    text_tokens["token_ids"] = [12366, 13, 2]  # vLLM's return_token_ids: usable instead
    assert parse_completion_choice(text_tokens).response_ids == [12366, 13, 2]
    with pytest.raises(ValueError, match="abort"):
        parse_completion_choice({**VLLM_SAMPLE_CHOICE, "finish_reason": "abort"})
    with pytest.raises(ValueError, match="logprobs"):
        parse_completion_choice({**VLLM_SAMPLE_CHOICE, "logprobs": None})


def test_parse_prompt_logprobs_top_k_with_extra_actual_token():
    seq = [1, 450, 7483, 338, 3681]
    plp = VLLM_SCORE_RESPONSE["choices"][0]["prompt_logprobs"]
    lps, ids, tlps = parse_prompt_logprobs(plp, seq, top_k=2, start=2)  # the response is seq[2:]
    assert lps == [-6.5, -0.25, -1.0]
    assert ids == [[937, 1900], [338, 310], [278, 3681]]  # k+1 entry dropped, sorted best first
    assert tlps == [[-1.125, -1.875], [-0.25, -9999.0], [-0.75, -1.0]]
    lps, ids, _ = parse_prompt_logprobs(plp, seq, top_k=1)
    assert lps == [-1.5, -6.5, -0.25, -1.0] and ids == [[450], [937], [338], [278]]


def test_parse_prompt_logprobs_errors():
    plp = VLLM_SCORE_RESPONSE["choices"][0]["prompt_logprobs"]
    with pytest.raises(ValueError, match="5 prompt_logprobs entries for 4"):
        parse_prompt_logprobs(plp, [1, 450, 7483, 338], 2)
    with pytest.raises(ValueError, match="no entry for its token 99"):
        parse_prompt_logprobs(plp, [1, 450, 99, 338, 3681], 2)
    with pytest.raises(ValueError, match="prompt_logprobs extension"):
        parse_prompt_logprobs(None, [1, 2], 2)


def test_top_k_entries_without_ranks_keeps_best():
    entry = {"5": {"logprob": -3.0}, "6": {"logprob": -1.0}, "7": {"logprob": -2.0}}
    assert top_k_entries(entry, 2) == ([6, 7], [-1.0, -2.0])


def test_small_helpers():
    assert server_root("http://h:8000/v1/") == "http://h:8000" == server_root("http://h:8000")
    assert error_message({"error": {"message": "The model `x` does not exist.", "code": 404}}) == \
        "The model `x` does not exist."
    assert error_message({"object": "error", "message": "old vllm", "code": 400}) == "old vllm"
    assert error_message({"detail": "Not Found"}) == "Not Found"
    assert error_message(None, "  upstream timed out ") == "upstream timed out"
    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:10 GMT", now=1767225600.0) == 10.0
    rng = random.Random(0)
    delays = [retry_delay(a, 0.5, 4.0, None, rng) for a in range(8)]
    assert all(0 <= d <= min(4.0, 0.5 * 2 ** a) for a, d in enumerate(delays))
    assert retry_delay(0, 0.5, 30.0, 2.0, rng) >= 2.0
    assert retry_delay(0, 0.5, 30.0, 600.0, rng) == 30.0  # capped


def test_cli_serve_refuses_a_non_model_dir(tmp_path, capsys):
    from opdflow.flows.cli import main
    assert main(["serve", str(tmp_path)]) == 2
    assert "not a Hugging Face model dir (no config.json)" in capsys.readouterr().err


# -- integration: a real `opdflow serve` subprocess -----------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_tiny_model(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from opdflow.infra.testbeds.demo import build_tokenizer
    from opdflow.infra.models.lm import save_model
    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return save_model(LlamaForCausalLM(cfg), tok, out)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _save_tiny_model(tmp_path_factory.mktemp("serve-model") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir, opdflow_serve):
    srv = opdflow_serve(model_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local(model_dir):
    from opdflow.infra.models.lm import load_model, load_tokenizer
    return load_model(model_dir).eval(), load_tokenizer(model_dir)


@pytest.fixture
def backend(server):
    with OpenAIBackend(server.url + "/v1", "tiny", timeout_s=60, concurrency=4) as b:
        yield b


def _prompts(tok) -> list[list[int]]:
    return [tok(t)["input_ids"] for t in ["12+34=\n", "5+678=\n", "999+1=\n", "3+4=\n", "100+250=\n"]]


@pytest.mark.integration
def test_check_tokenizer(backend, local, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from opdflow.infra.models.lm import load_tokenizer
    backend.check_tokenizer(local[1])
    # same special tokens, but the digits' ids permuted: a different vocabulary
    vocab = dict(local[1].get_vocab())
    for d in range(5):
        vocab[str(d)], vocab[str(9 - d)] = vocab[str(9 - d)], vocab[str(d)]
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = local[1].backend_tokenizer.pre_tokenizer
    raw.post_processor = local[1].backend_tokenizer.post_processor
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(tmp_path / "other-tokenizer")
    other = load_tokenizer(tmp_path / "other-tokenizer")
    with pytest.raises(ValueError) as e:
        backend.check_tokenizer(other)
    assert "`tiny`" in str(e.value) and "other-tokenizer" in str(e.value) and "mismatch" in str(e.value)


@pytest.mark.integration
def test_sample_is_seeded_and_equals_the_local_sampler(backend, local):
    from opdflow.infra.models.lm import sample
    model, tok = local
    prompts, seeds = _prompts(tok), [11, 22, 33, 44, 55]
    settings = [SampleSettings(temperature=1.0, max_new_tokens=12, batch_size=2),
                SampleSettings(temperature=0.7, top_p=0.9, max_new_tokens=8, batch_size=2)]
    if "top_k" in SampleSettings.__dataclass_fields__:
        settings.append(SampleSettings(temperature=1.2, top_k=5, max_new_tokens=8, batch_size=2))
    for st in settings:
        seen: list[int] = []
        remote = backend.sample(prompts, seeds, st, tok.eos_token_id, tok.pad_token_id, on_batch=seen.append)
        assert seen == [2, 4, 5]
        again = backend.sample(prompts, seeds, st, tok.eos_token_id, tok.pad_token_id)
        assert [s.response_ids for s in remote] == [s.response_ids for s in again]
        for p, seed, got in zip(prompts, seeds, remote):
            ref = sample(model, [p], [seed], st, tok.eos_token_id, tok.pad_token_id)[0]
            assert got.response_ids == ref.response_ids
            assert got.finish_reason == ref.finish_reason
            assert max(abs(a - b) for a, b in zip(got.logprobs, ref.logprobs)) < 1e-5
    other = backend.sample(prompts, [s + 1 for s in seeds], st, tok.eos_token_id, tok.pad_token_id)
    assert [s.response_ids for s in other] != [s.response_ids for s in remote]


@pytest.mark.integration
def test_score_equals_a_local_teacher_forced_forward(backend, local, server):
    import httpx
    import torch
    from opdflow.infra.models.lm import batch_response_logits
    model, tok = local
    prompts = _prompts(tok)
    responses = [s.response_ids for s in backend.sample(prompts, [1, 2, 3, 4, 5], SampleSettings(max_new_tokens=10),
                                                         tok.eos_token_id, tok.pad_token_id)]
    responses[3] = []  # an empty response is scored without a request
    with torch.no_grad():
        logits = batch_response_logits(model, prompts, responses, tok.pad_token_id, torch.device("cpu"))
    logp = torch.log_softmax(logits.float(), -1)
    sampled = torch.tensor([t for r in responses for t in r])
    ref_lp = logp.gather(-1, sampled[:, None]).squeeze(-1)
    vocab = model.config.vocab_size
    for k in (5, vocab + 5):  # a k beyond the vocabulary means the whole vocabulary
        ref_top_lp, ref_top_ids = logp.topk(min(k, vocab), -1)
        got = backend.score(prompts, responses, top_k=k)
        assert got[3] == ([], [], [])
        lp = torch.tensor([x for g in got for x in g[0]])
        top_lp = torch.tensor([row for g in got for row in g[2]])
        top_ids = [row for g in got for row in g[1]]
        assert (lp - ref_lp).abs().max().item() < 1e-5
        assert (top_lp - ref_top_lp).abs().max().item() < 1e-5
        if k == 5:
            assert top_ids == ref_top_ids.tolist()
        else:
            assert all(sorted(row) == list(range(vocab)) for row in top_ids)
    # the raw answer has vLLM's k + 1 entries wherever the actual token is outside the top k
    seq = prompts[0] + responses[0]
    body = httpx.post(f"{server.url}/v1/completions", timeout=60, json={"model": "tiny", "prompt": seq, "max_tokens": 0,
                                                              "echo": True, "prompt_logprobs": 2}).json()
    plp = body["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(seq)
    sizes = {len(e) for e in plp[1:]}
    assert sizes <= {2, 3} and 3 in sizes
    assert all(next(iter(e)) == str(seq[i]) for i, e in enumerate(plp) if e)  # the actual token first


@pytest.mark.integration
def test_a_padded_lm_head_is_never_served(tmp_path, opdflow_serve):
    """A model whose lm_head has rows beyond its tokenizer (as Qwen pads 151,665 tokens to
    151,936 rows), its padded rows made the favourites: the server samples only tokenizer ids,
    and its top-k and log-probs are over the tokenizer's vocabulary (they equal a local forward
    with the padded columns cut off)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from opdflow.infra.testbeds.demo import build_tokenizer
    from opdflow.infra.models.lm import batch_response_logits, sample, save_model
    tok = build_tokenizer()
    v, rows = len(tok), len(tok) + 13
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    with torch.no_grad():
        model.lm_head.weight[v:] = model.lm_head.weight[:rows - v] * 40
    prompts = _prompts(tok)
    unmasked = sample(model, prompts, [1, 2, 3, 4, 5], SampleSettings(max_new_tokens=10), tok.eos_token_id, tok.pad_token_id)
    assert any(t >= v for s_ in unmasked for t in s_.response_ids)  # without the mask, padded rows are sampled
    srv = opdflow_serve(save_model(model, tok, tmp_path / "padded"), "padded")
    try:
        with OpenAIBackend(srv.url + "/v1", "padded", timeout_s=60, concurrency=2) as b:
            got = b.sample(prompts, [1, 2, 3, 4, 5], SampleSettings(max_new_tokens=10), tok.eos_token_id, tok.pad_token_id)
            responses = [g.response_ids for g in got]
            assert all(0 <= t < v for r in responses for t in r) and sum(map(len, responses)) > 0
            scored = b.score(prompts, responses, top_k=8)
    finally:
        srv.stop()
    with torch.no_grad():
        logits = batch_response_logits(model, prompts, responses, tok.pad_token_id, torch.device("cpu"))
    logp = torch.log_softmax(logits[:, :v].float(), -1)
    ref_top_lp, ref_top_ids = logp.topk(8, -1)
    assert [row for g in scored for row in g[1]] == ref_top_ids.tolist()
    assert (torch.tensor([row for g in scored for row in g[2]]) - ref_top_lp).abs().max().item() < 1e-5
    sampled = torch.tensor([t for r in responses for t in r])
    assert (torch.tensor([x for g in scored for x in g[0]]) - logp.gather(-1, sampled[:, None]).squeeze(-1)).abs().max() < 1e-5


@pytest.mark.integration
def test_completion_response_shape(server, local):
    import httpx
    tok = local[1]
    p = tok("12+34=\n")["input_ids"]
    body = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": [p, tok("3+4=\n")["input_ids"]], "n": 2, "max_tokens": 5, "seed": 9,
        "logprobs": 2, "echo": True, "return_tokens_as_token_ids": True}).json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    c = body["choices"][0]
    assert {"index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_logprobs"} <= set(c)
    lp = c["logprobs"]
    assert set(lp) == {"text_offset", "token_logprobs", "tokens", "top_logprobs"}
    n_gen = len(lp["tokens"]) - len(p)
    assert 1 <= n_gen <= 5 and lp["tokens"][:len(p)] == [f"token_id:{t}" for t in p]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(1 <= len(d) <= 3 for d in lp["top_logprobs"][1:])  # the token itself + the top 2
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert len(c["prompt_logprobs"]) == len(p)  # echo computes prompt logprobs with k = logprobs
    assert body["usage"]["completion_tokens"] == sum(len(x["logprobs"]["tokens"]) for x in body["choices"]) - 2 * (
        len(p) + len(tok("3+4=\n")["input_ids"]))
    # stop_token_ids: the same seeded sample, cut at (and keeping) the first stop token
    req = {"model": "tiny", "prompt": p, "max_tokens": 12, "seed": 5, "logprobs": 0, "return_tokens_as_token_ids": True}
    full = httpx.post(f"{server.url}/v1/completions", timeout=60, json=req).json()["choices"][0]
    ids = [int(t.split(":")[1]) for t in full["logprobs"]["tokens"]]
    stop = ids[2]
    cut = httpx.post(f"{server.url}/v1/completions", timeout=60, json={**req, "stop_token_ids": [stop]}).json()["choices"][0]
    cut_ids = [int(t.split(":")[1]) for t in cut["logprobs"]["tokens"]]
    assert cut_ids == ids[:ids.index(stop) + 1]
    assert cut["finish_reason"] == "stop" and cut["stop_reason"] == stop
    text = httpx.post(f"{server.url}/v1/completions", timeout=60, json={"prompt": "12+34=\n", "max_tokens": 3, "seed": 5}).json()
    assert text["usage"]["prompt_tokens"] == len(p)


def test_make_app_uses_the_given_sampler_with_derived_seeds(model_dir):
    from fastapi.testclient import TestClient
    from opdflow.infra.models.lm import Sample, derive_seed
    from opdflow.infra.serving.serve import make_app
    calls = []

    def fake_sampler(model, prompts, seeds, settings, eos_id, pad_id, on_batch=None):
        calls.append((prompts, list(seeds), settings))
        return [Sample([5, 6, eos_id], [-1.0, -2.0, -0.5], "stop") for _ in prompts]

    client = TestClient(make_app(model_dir, model_name="fake", sampler=fake_sampler))
    body = client.post("/v1/completions", json={"model": "fake", "prompt": [[1, 5], [1, 6, 7]], "n": 2, "seed": 42,
                                                "max_tokens": 8, "temperature": 0.5}).json()
    (prompts, seeds, settings), = calls
    assert prompts == [[1, 5], [1, 5], [1, 6, 7], [1, 6, 7]]
    assert seeds == [42, derive_seed(42, 0, 1), derive_seed(42, 1, 0), derive_seed(42, 1, 1)]
    assert settings.temperature == 0.5 and settings.max_new_tokens == 8
    assert [c["finish_reason"] for c in body["choices"]] == ["stop"] * 4 and body["choices"][0]["stop_reason"] is None
    assert client.get("/v1/models").json()["data"][0]["id"] == "fake"
    assert client.post("/v1/completions", json={"prompt": [1], "stream": True}).status_code == 400
    bad = client.post("/v1/completions", json={"prompt": {"not": "a prompt"}})
    assert bad.status_code == 400 and "invalid request" in bad.json()["error"]["message"]


@pytest.mark.integration
def test_server_rejects_bad_requests(backend, server, local):
    tok = local[1]
    st = SampleSettings(max_new_tokens=4)
    with pytest.raises(OpenAIBackendError, match="Token id 999 in prompt 0 is out of vocabulary") as e:
        backend.sample([[1, 999]], [0], st, tok.eos_token_id, tok.pad_token_id)
    assert e.value.status == 400
    with pytest.raises(OpenAIBackendError, match="maximum context length is 128") as e:
        backend.sample([[1, 5]], [0], SampleSettings(max_new_tokens=200), tok.eos_token_id, tok.pad_token_id)
    assert e.value.status == 400
    with OpenAIBackend(server.url, "no-such-model") as wrong:
        with pytest.raises(OpenAIBackendError, match="HTTP 404: The model `no-such-model` does not exist") as e:
            wrong.sample([[1, 5]], [0], st, tok.eos_token_id, tok.pad_token_id)
        assert e.value.status == 404
        with pytest.raises(OpenAIBackendError, match="no-such-model"):
            wrong.check_tokenizer(tok)


# -- retries: a flaky upstream in front of the real server ----------------------------------

class FlakyUpstream:
    """A stdlib HTTP server that answers the first requests from `plan` (status, Retry-After) and
    forwards the rest to `target`; `missing` paths answer 404 like an endpoint that does not exist."""

    def __init__(self, target: str, plan: list[tuple[int, str | None]], missing: tuple[str, ...] = ()):
        self.target, self.plan, self.missing, self.calls = target, list(plan), missing, 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _handle(self, data: bytes | None) -> None:
                with lock:
                    outer.calls += 1
                    step = outer.plan.pop(0) if outer.plan else None
                if self.path in outer.missing:
                    return self._answer(404, b'{"detail": "Not Found"}')
                if step is not None:
                    status, retry_after = step
                    body = json.dumps({"error": {"message": f"injected {status}", "type": "Injected", "param": None,
                                                 "code": status}}).encode()
                    return self._answer(status, body, {"Retry-After": retry_after} if retry_after else None)
                req = urllib.request.Request(outer.target + self.path, data=data, method=self.command,
                                             headers={"Content-Type": "application/json"})
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                try:
                    with opener.open(req, timeout=60) as r:
                        self._answer(r.status, r.read())
                except urllib.error.HTTPError as e:
                    self._answer(e.code, e.read())

            def do_GET(self):
                self._handle(None)

            def do_POST(self):
                self._handle(self.rfile.read(int(self.headers.get("Content-Length", 0))))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def flaky(server):
    made: list[FlakyUpstream] = []

    def make(plan, missing=()):
        made.append(FlakyUpstream(server.url, plan, missing))
        return made[-1]
    yield make
    for f in made:
        f.close()


@pytest.mark.integration
def test_retries_5xx_then_succeeds(flaky, backend, local):
    tok = local[1]
    st = SampleSettings(max_new_tokens=6)
    up = flaky([(503, None), (503, None)])
    with OpenAIBackend(up.url, "tiny", backoff_s=0.01, max_retries=3) as b:
        got = b.sample([tok("12+34=\n")["input_ids"]], [7], st, tok.eos_token_id, tok.pad_token_id)
    assert up.calls == 3
    direct = backend.sample([tok("12+34=\n")["input_ids"]], [7], st, tok.eos_token_id, tok.pad_token_id)
    assert got[0].response_ids == direct[0].response_ids


@pytest.mark.integration
def test_retry_after_is_honoured(flaky, local):
    tok = local[1]
    up = flaky([(429, "1")])
    t0 = time.monotonic()
    with OpenAIBackend(up.url, "tiny", backoff_s=0.01) as b:
        b.score([tok("3+4=\n")["input_ids"]], [[7, 11]], top_k=3)
    assert up.calls == 2 and time.monotonic() - t0 >= 0.95


@pytest.mark.integration
def test_400_is_not_retried_and_retries_are_bounded(flaky, local):
    tok = local[1]
    st = SampleSettings(max_new_tokens=4)
    up = flaky([(400, None)] * 5)
    with OpenAIBackend(up.url, "tiny", backoff_s=0.01) as b:
        with pytest.raises(OpenAIBackendError, match="HTTP 400: injected 400"):
            b.sample([[1, 5]], [0], st, tok.eos_token_id, tok.pad_token_id)
    assert up.calls == 1
    up = flaky([(503, None)] * 5)
    with OpenAIBackend(up.url, "tiny", backoff_s=0.01, max_retries=2) as b:
        with pytest.raises(OpenAIBackendError, match="gave up after 3 attempts; last error: HTTP 503: injected 503"):
            b.sample([[1, 5]], [0], st, tok.eos_token_id, tok.pad_token_id)
    assert up.calls == 3
    with OpenAIBackend(f"http://127.0.0.1:{_free_port()}", "tiny", backoff_s=0.01, max_retries=1) as b:
        with pytest.raises(OpenAIBackendError, match="gave up after 2 attempts; last error: ConnectError"):
            b.sample([[1, 5]], [0], st, tok.eos_token_id, tok.pad_token_id)


@pytest.mark.integration
def test_missing_tokenize_endpoint_is_explained(flaky, local):
    up = flaky([], missing=("/tokenize",))
    with OpenAIBackend(up.url, "tiny", backoff_s=0.01) as b:
        with pytest.raises(OpenAIBackendError, match="tokenizer check could not be done.*no /tokenize.*to skip"):
            b.check_tokenizer(local[1])


def test_ids_beyond_the_tokenizer_are_refused():
    """After check_tokenizer, a server answer holding a padded lm_head row (an id at or beyond the
    tokenizer's size, as a vLLM server on a Qwen-style checkpoint can return) fails naming it."""
    b = OpenAIBackend("http://127.0.0.1:9/v1", "m")
    try:
        b.check_ids([10**6], "top-k")  # before check_tokenizer nothing is known: no check
        b.vocab_size = 50
        b.check_ids([0, 49], "top-k")
        with pytest.raises(OpenAIBackendError, match="token id 50, beyond the tokenizer's 50 ids: a padded lm_head row"):
            b.check_ids([3, 50], "sampled response")
    finally:
        b.close()

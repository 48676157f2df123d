"""`opdflow serve MODEL_DIR`: a Hugging Face model dir behind an OpenAI-compatible completions API.

Why: rollouts and teacher scoring can run against any OpenAI-compatible server (vLLM, SGLang)
through `opdflow.infra.sampling.openai_backend`. This server speaks the same protocol with opdflow's own
seeded sampler (`opdflow.infra.models.lm.sample`), so the remote path can be tested end to end without a
GPU or vLLM, and a small teacher can be served from any machine.

Only the subset of vLLM's OpenAI-compatible server that opdflow uses is served:

    GET  /health, GET /v1/models
    POST /tokenize         {"model", "prompt", "add_special_tokens"} -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /v1/completions   non-streaming; token-id or text prompts; n, seed, temperature, top_p, top_k,
                           max_tokens, logprobs, echo, stop_token_ids, and the vLLM extensions
                           prompt_logprobs, return_tokens_as_token_ids, return_token_ids

Response shape: vLLM's `CompletionResponse` as built by
`vllm/entrypoints/openai/serving_completion.py` (documented for v0.9.2 - v0.12.0) and by its
successor `vllm/entrypoints/openai/completion/{protocol,serving}.py` on vLLM main (vllm-project/vllm
commits 002032ee and 030ea52e); both give the same fields. Per choice: `index` (prompt i, sample j -> i * n + j), `text`,
`logprobs` = {text_offset, token_logprobs, tokens, top_logprobs}, `finish_reason`, `stop_reason`
(the stop token id, null for EOS), `prompt_logprobs`, `token_ids`, `prompt_token_ids`.

- `top_logprobs[t]` maps a token (its text, or "token_id:N" with return_tokens_as_token_ids) to a
  logprob: the sampled token first, then the top `logprobs` tokens, so up to k + 1 entries.
- `prompt_logprobs` is a list as long as the prompt: null for the first token, then per position
  a dict keyed by token id (a JSON string) -> {"logprob", "rank", "decoded_token"}: the actual
  prompt token first (rank = its 1-based rank in the vocabulary), then the top k with ranks 1..k.
  A dict therefore has k + 1 entries when the actual token is outside the top k, else k.
  `prompt_logprobs=-1` means the whole vocabulary. Logprobs are the model's raw distribution
  (teacher scoring), with -inf clamped to -9999.0 as vLLM does.
- With `echo`, vLLM computes prompt logprobs with k = `logprobs` unless `prompt_logprobs` is set;
  `echo` with `max_tokens=0` returns the prompt only (no generation).
- Errors: `{"error": {"message", "type", "param", "code"}}` (vLLM's current ErrorResponse);
  unknown model -> 404, bad request -> 400 (request validation errors too, not FastAPI's 422).

Differences from vLLM, on purpose:
- Sampling is per-sequence seeded (see `opdflow.infra.models.lm`): for request seed s, prompt i and
  choice j the sequence seed is s itself for the first sequence and `derive_seed(s, i, j)` for
  the others; a request without a seed draws one. So a one-prompt request samples exactly what
  `infra.models.lm.sample` samples in process with that seed, and rollouts through `opdflow serve`
  equal in-process rollouts of the same weights.
- `token_logprobs` of generated tokens are under the distribution actually sampled from
  (temperature, top-k and top-p applied), exactly what `infra.models.lm.sample` reports; vLLM reports the raw
  model distribution unless started with `--logprobs-mode processed_logprobs`. At temperature 1
  and top-p 1 (on-policy distillation) the two agree.
- Stop strings, streaming, beam search, penalties and logit bias are not supported (400 for
  `stream`; the others are ignored). Generation stops at the tokenizer's EOS or a
  `stop_token_ids` token, which is kept in the output as vLLM keeps EOS.

One model per process; requests are handled one at a time (a lock around the model), and the
prompts and choices of one request are sampled as one batch.

Guards (`Limits`, each a `opdflow serve` flag), so that a server reachable from other hosts
can be neither used without the key nor made to exhaust memory or hold the model for long:
- an API key (`--api-key`, or the environment variable OPDFLOW_SERVE_API_KEY), compared in
  constant time (`hmac.compare_digest`) with the `Authorization: Bearer KEY` header on every
  route but `/health` (401 otherwise, as vLLM's `--api-key`); required to bind a
  non-loopback address;
- `n` <= --max-n (64), prompts per request <= --max-prompts (64), `max_tokens` <= --max-tokens
  (default: prompt + max_tokens within the model's context), `logprobs` and `prompt_logprobs` <= --max-logprobs (vLLM's
  default, 20; -1 for the whole vocabulary is counted as the vocabulary size, as vLLM does;
  `--max-logprobs -1` lifts the cap), the estimated response size <= --max-response-mb (64),
  the request body <= --max-request-mb (8);
- NaN and infinite numbers rejected (400); a request that waits for the model longer than
  --request-timeout-s (300) is answered 503, one whose answer takes longer 504 (the batch it
  started runs to its end: the limits above bound it);
- no filesystem path in any response (`/v1/models` gives the served name as `root`).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import ipaddress
import os
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pydantic

from opdflow.infra.config import ModelConfig, default

DEFAULT_MAX_TOKENS = 16  # the OpenAI / vLLM default when a request does not say
LOGPROB_FLOOR = -9999.0  # what vLLM sends instead of -inf (not valid JSON)
API_KEY_ENV = "OPDFLOW_SERVE_API_KEY"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (see the module docstring); each is an `opdflow serve` flag."""

    max_n: int = 64
    max_prompts: int = 64
    max_tokens: int | None = None        # None: the model's context length
    max_logprobs: int = 20               # vLLM's --max-logprobs default; -1: no cap
    max_response_mb: float = 64.0
    max_request_mb: float = 8.0
    request_timeout_s: float = 300.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def key_matches(header: str | None, api_key: str) -> bool:
    """`Authorization: Bearer KEY`, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    ok_scheme = hmac.compare_digest(scheme.lower().encode(), b"bearer")
    return hmac.compare_digest(given.strip().encode(), api_key.encode()) and ok_scheme


class ApiError(Exception):
    """An error answered to the client in the OpenAI shape."""

    def __init__(self, status: int, message: str, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param


def error_body(status: int, message: str, err_type: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


class CompletionRequest(pydantic.BaseModel):
    """The fields of vLLM's CompletionRequest that this server honours (others are ignored)."""

    model_config = pydantic.ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    prompt: list[int] | list[list[int]] | str | list[str]
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None
    echo: bool | None = False
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    stop_token_ids: list[int] | None = None
    stream: bool | None = False


class TokenizeRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


@dataclass
class Served:
    """The loaded model and what requests are checked against."""

    model: Any
    tokenizer: Any
    name: str
    root: str
    max_model_len: int
    vocab_size: int  # the tokenizer's size: lm_head rows beyond it (Qwen-style padding) are never served
    eos_id: int
    pad_id: int
    sampler: Callable
    lock: threading.Lock  # one request at a time on the model
    tok_lock: threading.Lock  # a fast tokenizer's encode is not safe from several threads at once
    token_texts: dict[int, str]  # id -> decoded text, filled as tokens are named
    limits: Limits = Limits()


# -- loading --------------------------------------------------------------------------------

def load_served(model_dir: str | Path, dtype: str = default(ModelConfig, "dtype"), model_name: str | None = None,
                sampler: Callable | None = None, limits: Limits | None = None) -> Served:
    from opdflow.infra.models import lm
    model = lm.load_model(model_dir, dtype)
    model.eval()
    tok = lm.load_tokenizer(model_dir)
    max_len = lm.context_length(model_dir) or int(getattr(tok, "model_max_length", 0) or 0)
    return Served(model=model, tokenizer=tok, name=model_name or Path(model_dir).resolve().name,
                  root=str(model_dir), max_model_len=max_len, vocab_size=min(lm.real_vocab(tok), lm.model_rows(model)),
                  eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, sampler=sampler or lm.sample,
                  lock=threading.Lock(), tok_lock=threading.Lock(), token_texts={}, limits=limits or Limits())


def encode(served: Served, text: str, add_special_tokens: bool = True) -> list[int]:
    with served.tok_lock:
        return list(served.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def decode_token(served: Served, tok: int) -> str:
    text = served.token_texts.get(tok)
    if text is None:
        text = served.token_texts.setdefault(tok, served.tokenizer.decode([tok]))
    return text


# -- request checks -------------------------------------------------------------------------

def check_model(served: Served, requested: str | None) -> None:
    if requested is not None and requested != served.name:
        raise ApiError(404, f"The model `{requested}` does not exist. This server serves `{served.name}`.",
                       "NotFoundError", "model")


def normalize_prompts(prompt, served: Served) -> tuple[list[list[int]], list[str | None]]:
    """(token ids per prompt, the prompt text where it was given as text)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)], [None]
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            ids.append(encode(served, p))
            texts.append(p)
        else:
            ids.append(list(p))
            texts.append(None)
    return ids, texts


def check_limits(req: CompletionRequest, lim: Limits, vocab_size: int, max_model_len: int) -> None:
    """What one request may ask for (Limits); vLLM's messages where vLLM has the same check."""
    if req.n > lim.max_n:
        raise ApiError(400, f"n={req.n} is more than this server allows per request ({lim.max_n}; "
                            "opdflow serve --max-n)", param="n")
    cap = lim.max_tokens  # unset: the model's context bounds it (check_prompts, vLLM's message)
    if cap and req.max_tokens is not None and req.max_tokens > cap:
        raise ApiError(400, f"max_tokens={req.max_tokens} is more than this server allows ({cap}; "
                            "opdflow serve --max-tokens)", param="max_tokens")
    for field, what in (("logprobs", "sample"), ("prompt_logprobs", "prompt")):
        k = getattr(req, field)
        if k is None or lim.max_logprobs == -1:
            continue
        k = vocab_size if k == -1 else k
        if k > lim.max_logprobs:
            raise ApiError(400, f"Requested {what} logprobs of {k}, which is greater than max allowed: "
                                f"{lim.max_logprobs} (opdflow serve --max-logprobs)", param=field)


def response_bytes_estimate(n_choices: int, prompt_lens: list[int], n: int, max_tokens: int,
                            k_out: int | None, k_prompt: int | None, echo: bool) -> int:
    """An upper-bound-ish size of the JSON answer, computed before any work: ~40 bytes per
    top-logprob entry, ~90 per prompt-logprob entry, ~16 per token otherwise."""
    total = 0
    for p in prompt_lens:
        tokens = max_tokens + (p if echo else 0)
        per = 300 + 16 * tokens
        if k_out is not None:
            per += 40 * tokens * (k_out + 1)
        if k_prompt is not None:
            per += 90 * p * (k_prompt + 1)
        total += per * n
    return total


def check_sampling(req: CompletionRequest) -> None:
    if req.stream:
        raise ApiError(400, "stream=true is not supported by opdflow serve", param="stream")
    if req.n < 1:
        raise ApiError(400, f"n must be at least 1, got {req.n}", param="n")
    if req.max_tokens is not None and req.max_tokens < 0:
        raise ApiError(400, f"max_tokens must be >= 0, got {req.max_tokens}", param="max_tokens")
    if req.temperature is not None and req.temperature < 0:
        raise ApiError(400, f"temperature must be >= 0, got {req.temperature}", param="temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {req.top_p}", param="top_p")
    if req.top_k is not None and req.top_k < -1:
        raise ApiError(400, f"top_k must be -1 or 0 (off) or a positive integer, got {req.top_k}", param="top_k")
    for field in ("logprobs", "prompt_logprobs"):
        k = getattr(req, field)
        if k is not None and k < -1:
            raise ApiError(400, f"`{field}` must be a non-negative integer or -1, got {k}", param=field)


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_model_len: int, max_tokens: int) -> None:
    for i, p in enumerate(prompts):
        if not p:
            raise ApiError(400, f"prompt {i} is empty", param="prompt")
        bad = [t for t in p if t < 0 or t >= vocab_size]
        if bad:
            raise ApiError(400, f"Token id {bad[0]} in prompt {i} is out of vocabulary "
                                f"(the model's vocabulary size is {vocab_size})", param="prompt")
        if max_model_len and len(p) + max_tokens > max_model_len:
            raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, "
                                f"prompt {i} has {len(p)} tokens and max_tokens is {max_tokens} "
                                f"({len(p) + max_tokens} in all). Reduce the prompt or max_tokens.",
                           param="max_tokens")


def top_k_of(k: int | None, vocab_size: int) -> int | None:
    """Requested k -> the k actually returned (-1 = the whole vocabulary)."""
    if k is None:
        return None
    return vocab_size if k == -1 else min(k, vocab_size)


# -- sampling -------------------------------------------------------------------------------

def sequence_seeds(seed: int | None, n_prompts: int, n: int) -> list[int]:
    """Per-sequence seeds, prompt-major: the request seed for the first sequence,
    derive_seed(request seed, prompt i, choice j) for the others."""
    from opdflow.infra.models.lm import derive_seed
    base = secrets.randbelow(2**31) if seed is None else seed
    return [base if (i, j) == (0, 0) else derive_seed(base, i, j) for i in range(n_prompts) for j in range(n)]


@dataclass
class Generated:
    ids: list[int]
    logprobs: list[float]
    finish_reason: str
    stop_reason: int | None


def apply_stop_ids(ids: list[int], lps: list[float], finish: str, stop_ids: set[int]) -> Generated:
    """Cut a sampled response at its first stop token (kept, as vLLM keeps it). Sequences are
    sampled independently, so cutting afterwards equals stopping there."""
    for t, tok in enumerate(ids):
        if tok in stop_ids:
            return Generated(ids[:t + 1], lps[:t + 1], "stop", tok)
    return Generated(ids, lps, finish, None)


def sample_settings(req: CompletionRequest, max_tokens: int, batch_size: int, vocab_size: int | None = None):
    """The request's sampling parameters as `infra.models.lm.SampleSettings` (OpenAI defaults: 1, 1, off);
    `vocab_size`: the served vocabulary, so padded lm_head rows are never sampled."""
    from opdflow.infra.models.lm import SampleSettings
    kw = dict(temperature=1.0 if req.temperature is None else req.temperature,
              top_p=1.0 if req.top_p is None else req.top_p, max_new_tokens=max_tokens,
              batch_size=max(1, batch_size), vocab_size=vocab_size)
    if (req.top_k or 0) > 0:
        if "top_k" not in SampleSettings.__dataclass_fields__:
            raise ApiError(400, "top_k is not supported by this opdflow version's sampler", param="top_k")
        kw["top_k"] = req.top_k
    return SampleSettings(**kw)


def generate(served: Served, prompts: list[list[int]], seeds: list[int], req: CompletionRequest,
             settings) -> list[Generated]:
    """One batch for all prompts x choices of the request (prompt-major order)."""
    seqs = [p for p in prompts for _ in range(req.n)]
    if settings.max_new_tokens == 0:
        return [Generated([], [], "length", None) for _ in seqs]
    samples = served.sampler(served.model, seqs, seeds, settings, served.eos_id, served.pad_id)
    stop_ids = set(req.stop_token_ids or []) - {served.eos_id}
    return [apply_stop_ids(list(s.response_ids), list(s.logprobs), s.finish_reason, stop_ids) for s in samples]


# -- teacher-forced logprobs ----------------------------------------------------------------

def position_logprobs(served: Served, seqs: list[list[int]]) -> list:
    """Per sequence: raw log-softmax [len - 1, V] (V: the served vocabulary) of the positions
    predicting tokens 1..len-1."""
    import torch
    from opdflow.infra.models.lm import batch_response_logits, real_logits
    out: list = [None] * len(seqs)
    todo = [i for i, s in enumerate(seqs) if len(s) > 1]
    if not todo:
        return out
    dev = next(served.model.parameters()).device
    with torch.no_grad():
        logits = batch_response_logits(served.model, [seqs[i][:1] for i in todo], [seqs[i][1:] for i in todo],
                                       served.pad_id, dev)
    logp = torch.log_softmax(real_logits(logits, served.vocab_size).float(), dim=-1).cpu()  # over the served vocabulary
    start = 0
    for i in todo:
        n = len(seqs[i]) - 1
        out[i] = logp[start:start + n]
        start += n
    return out


def sampling_view(logp_rows, settings):
    """The raw distribution turned into the one sampled from (as `infra.models.lm.sample` does)."""
    from opdflow.infra.models.lm import sampling_logprobs
    if settings.temperature == 0.0:
        return logp_rows
    if getattr(settings, "top_k", 0) > 0:
        return sampling_logprobs(logp_rows, settings.temperature, settings.top_p, settings.top_k)
    return sampling_logprobs(logp_rows, settings.temperature, settings.top_p)


def _lp(x: float) -> float:
    return max(float(x), LOGPROB_FLOOR)


def prompt_position_entry(row, actual: int, k: int, served: Served) -> dict[str, dict]:
    """vLLM's prompt-logprob dict for one position: the actual token first (with its rank), then
    the top k (ranks 1..k); the actual token appears once."""
    import torch
    actual_lp = row[actual].item()
    entry = {str(actual): {"logprob": _lp(actual_lp), "rank": int((row >= actual_lp).sum().item()),
                           "decoded_token": decode_token(served, actual)}}
    if k > 0:
        top_lp, top_ids = torch.topk(row, k)
        for rank, (tok, lp) in enumerate(zip(top_ids.tolist(), top_lp.tolist()), start=1):
            if str(tok) in entry:
                entry[str(tok)]["rank"] = rank
                continue
            entry[str(tok)] = {"logprob": _lp(lp), "rank": rank, "decoded_token": decode_token(served, tok)}
    return entry


def prompt_logprobs_list(logp, prompt: list[int], k: int, served: Served) -> list[dict | None]:
    """[None, entry for token 1, ..., entry for token len-1] from a sequence's position logprobs."""
    return [None] + [prompt_position_entry(logp[t - 1], prompt[t], k, served) for t in range(1, len(prompt))]


@dataclass
class Step:
    """One token of a `logprobs` block: its logprob and the ranked alternatives (id, logprob)."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None


def response_steps(gen: Generated, view_rows, k: int) -> list[Step]:
    """Generated tokens: the sampler's own logprob, then the top k of the sampled-from distribution."""
    import torch
    steps = []
    for t, (tok, lp) in enumerate(zip(gen.ids, gen.logprobs)):
        top: list[tuple[int, float]] = [(tok, lp)]
        if k > 0:
            top_lp, top_ids = torch.topk(view_rows[t], k)
            top += list(zip(top_ids.tolist(), top_lp.tolist()))
        steps.append(Step(tok, lp, top))
    return steps


def prompt_steps(prompt: list[int], plp: list[dict | None] | None, k: int) -> list[Step]:
    """Echoed prompt tokens: from the prompt-logprob dicts, the actual token then at most k more."""
    steps = [Step(prompt[0], None, None)]
    for t in range(1, len(prompt)):
        entry = plp[t]
        items = [(int(key), v["logprob"]) for key, v in entry.items()][:k + 1]
        steps.append(Step(prompt[t], entry[str(prompt[t])]["logprob"], items))
    return steps


def logprobs_block(steps: list[Step], served: Served, as_ids: bool) -> dict:
    """vLLM's CompletionLogProbs: text_offset, token_logprobs, tokens, top_logprobs."""
    def name(tok: int) -> str:
        return f"token_id:{tok}" if as_ids else decode_token(served, tok)
    offsets, lps, tokens, tops = [], [], [], []
    offset = 0
    for s in steps:
        token = name(s.token)
        offsets.append(offset)
        offset += len(token)
        tokens.append(token)
        lps.append(None if s.logprob is None else _lp(s.logprob))
        if s.top is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for tok, lp in s.top:
            top.setdefault(name(tok), _lp(lp))
        tops.append(top)
    return {"text_offset": offsets, "token_logprobs": lps, "tokens": tokens, "top_logprobs": tops}


# -- the completion -------------------------------------------------------------------------

def complete(served: Served, req: CompletionRequest) -> dict:
    lim = served.limits
    check_model(served, req.model)
    check_sampling(req)
    check_limits(req, lim, served.vocab_size, served.max_model_len)
    n_prompts = 1 if isinstance(req.prompt, str) or all(isinstance(t, int) for t in req.prompt) else len(req.prompt)
    if n_prompts > lim.max_prompts:  # before tokenizing any of them
        raise ApiError(400, f"{n_prompts} prompts in one request; this server allows {lim.max_prompts} "
                            "(opdflow serve --max-prompts)", param="prompt")
    prompts, texts = normalize_prompts(req.prompt, served)
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    check_prompts(prompts, served.vocab_size, served.max_model_len, max_tokens)
    k_out = top_k_of(req.logprobs, served.vocab_size)
    k_prompt = top_k_of(req.prompt_logprobs if req.prompt_logprobs is not None
                        else (req.logprobs if req.echo else None), served.vocab_size)
    est = response_bytes_estimate(len(prompts) * req.n, [len(p) for p in prompts], req.n, max_tokens, k_out,
                                  k_prompt, bool(req.echo))
    if est > lim.max_response_mb * 2**20:
        raise ApiError(400, f"the response would be about {est / 2**20:.0f} MB, more than this server sends "
                            f"({lim.max_response_mb:g} MB; opdflow serve --max-response-mb): ask for fewer "
                            "choices, tokens or logprobs")
    settings = sample_settings(req, max_tokens, len(prompts) * req.n, served.vocab_size)
    seeds = sequence_seeds(req.seed, len(prompts), req.n)
    if not served.lock.acquire(timeout=lim.request_timeout_s):
        raise ApiError(503, f"the model was busy for {lim.request_timeout_s:g} s; retry later",
                       "ServiceUnavailableError")
    try:
        gens = generate(served, prompts, seeds, req, settings)
        need_forward = k_prompt is not None or bool(k_out)
        full = [prompts[i // req.n] + g.ids for i, g in enumerate(gens)]
        rows = position_logprobs(served, full) if need_forward else [None] * len(gens)
    finally:
        served.lock.release()
    choices = []
    for i, g in enumerate(gens):
        p, text = prompts[i // req.n], texts[i // req.n]
        choices.append(build_choice(served, req, i, p, text, g, rows[i], k_out, k_prompt, settings))
    n_prompt = sum(len(p) for p in prompts)
    n_completion = sum(len(g.ids) for g in gens)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": served.name, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                      "total_tokens": n_prompt + n_completion}}


def build_choice(served: Served, req: CompletionRequest, index: int, prompt: list[int], prompt_text: str | None,
                 gen: Generated, rows, k_out: int | None, k_prompt: int | None, settings) -> dict:
    tok = served.tokenizer
    n_p = len(prompt)
    plp = prompt_logprobs_list(rows, prompt, k_prompt, served) if k_prompt is not None else None
    text = tok.decode(gen.ids, skip_special_tokens=True)
    steps: list[Step] = []
    if k_out is not None:
        if req.echo:
            steps += prompt_steps(prompt, plp, k_out)
        if gen.ids:
            view = sampling_view(rows[n_p - 1:], settings) if k_out else None
            steps += response_steps(gen, view, k_out)
    if req.echo:
        text = (prompt_text if prompt_text is not None else tok.decode(prompt, skip_special_tokens=True)) + text
    return {"index": index, "text": text,
            "logprobs": logprobs_block(steps, served, bool(req.return_tokens_as_token_ids)) if k_out is not None else None,
            "finish_reason": gen.finish_reason, "stop_reason": gen.stop_reason,
            "prompt_logprobs": plp,
            "token_ids": gen.ids if req.return_token_ids else None,
            "prompt_token_ids": prompt if req.return_token_ids else None}


# -- the app --------------------------------------------------------------------------------

def make_app(model_dir: str | Path, dtype: str = default(ModelConfig, "dtype"), model_name: str | None = None,
             sampler: Callable | None = None, api_key: str | None = None, limits: Limits | None = None):
    """The FastAPI app serving `model_dir`. `sampler` has `infra.models.lm.sample`'s signature (the default);
    with `api_key`, every route but /health needs `Authorization: Bearer <api_key>`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    served = load_served(model_dir, dtype, model_name, sampler, limits)
    lim = served.limits
    app = FastAPI(title=f"opdflow serve {served.name}", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if api_key and request.url.path != "/health" and not key_matches(request.headers.get("authorization"),
                                                                          api_key):
            return JSONResponse(error_body(401, "Unauthorized: send the server's API key as "
                                                "'Authorization: Bearer KEY'", "AuthenticationError"),
                                status_code=401)
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse(error_body(411, "a POST needs a Content-Length header", "BadRequestError"),
                                    status_code=411)
            if int(length) > lim.max_request_mb * 2**20:
                return JSONResponse(error_body(413, f"request body of {int(length)} bytes is more than this server "
                                                    f"accepts ({lim.max_request_mb:g} MB; opdflow serve "
                                                    "--max-request-mb)", "BadRequestError"), status_code=413)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return JSONResponse(error_body(e.status, e.message, e.err_type, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        msg = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors())
        return JSONResponse(error_body(400, f"invalid request: {msg}", "BadRequestError"), status_code=400)

    @app.get("/health")
    def health():
        return Response(status_code=200)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "opdflow", "root": served.name, "parent": None,
                                            "max_model_len": served.max_model_len}]}

    @app.post("/tokenize")
    def tokenize(req: TokenizeRequest):
        check_model(served, req.model)
        ids = encode(served, req.prompt, req.add_special_tokens)
        return {"count": len(ids), "max_model_len": served.max_model_len, "tokens": ids, "token_strs": None}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        try:
            body = await asyncio.wait_for(run_in_threadpool(complete, served, req), lim.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request took longer than {lim.request_timeout_s:g} s (opdflow serve "
                                "--request-timeout-s); ask for less", "TimeoutError") from None
        data = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()  # no re-encoding
        if len(data) > lim.max_response_mb * 2**20:
            raise ApiError(400, f"the response is {len(data) / 2**20:.1f} MB, more than this server sends "
                                f"({lim.max_response_mb:g} MB; opdflow serve --max-response-mb)")
        return Response(data, media_type="application/json")

    return app


class ServeRefused(ValueError):
    """`opdflow serve` will not start as asked (e.g. a public address without an API key)."""


def resolve_api_key(host: str, api_key: str | None) -> str | None:
    """The key from --api-key or OPDFLOW_SERVE_API_KEY; refuses a non-loopback host without one."""
    key = api_key or os.environ.get(API_KEY_ENV) or None
    if key is None and not is_loopback(host):
        raise ServeRefused(f"--host {host} is reachable from other machines: set an API key "
                           f"({API_KEY_ENV}=... in the environment, or --api-key) and give it to the clients "
                           f"(rollout/scoring.openai.api_key_env names the variable that holds it)")
    return key


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000,
          dtype: str = default(ModelConfig, "dtype"),
          model_name: str | None = None, api_key: str | None = None, limits: Limits | None = None) -> None:
    """Run the server in the foreground (uvicorn) until interrupted."""
    import uvicorn
    key = resolve_api_key(host, api_key)
    app = make_app(model_dir, dtype, model_name, api_key=key, limits=limits)
    name = app.state.served.name
    print(f"opdflow serve: `{name}` from {model_dir} on http://{host}:{port}/v1"
          + (" (API key required)" if key else " (no API key: loopback only)"), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_keep_alive=5)

"""Rollouts and teacher scoring through any OpenAI-compatible completions server.

Why: a real student or teacher is served far faster by vLLM or SGLang on a GPU machine than by
transformers in the stage's own process, and a teacher can live on another machine. This
backend talks to such a server (or to `opdflow serve`) over HTTP with the same interface as the
in-process sampler, so the rollout and score stages can use either:

- `sample(prompts, seeds, settings, eos_id, pad_id, on_batch)` -> `list[infra.models.lm.Sample]`, as
  `infra.models.lm.sample`: one request per (prompt, seed) with the seed passed through, token-id
  prompts, `logprobs=1` and `return_tokens_as_token_ids=true`, so the response's tokens
  ("token_id:N") give back the exact ids and `token_logprobs` the sampler's logprobs.
  `allowed_vocab=N` adds vLLM's `allowed_token_ids = range(N)` (the vllm backend on a padded
  lm_head; not sent to a generic server, which may not know it); either way `check_ids`
  refuses an id at or beyond the tokenizer's size after sampling.
  Reproducibility is the server's: `opdflow serve` samples a one-prompt request with its seed
  exactly as `infra.models.lm.sample` would in process; vLLM seeds a per-request generator. vLLM reports raw-model logprobs unless started with
  `--logprobs-mode processed_logprobs` (they agree at temperature 1, top-p 1).
- `score(prompts, responses, top_k)` -> per response (teacher logprob of each token, top-k ids,
  top-k logprobs), as `tasks.score.score_table` stores: the prompt + response is sent as the
  prompt with `echo=true, max_tokens=0, prompt_logprobs=top_k` (vLLM's scoring extension) and
  the response positions of `prompt_logprobs` are read. vLLM caps k at `--max-logprobs` (20 by
  default): start it with a larger value for a larger k.
- `check_tokenizer(tokenizer)`: the ids are only meaningful if the server tokenizes as we do;
  this compares `/tokenize` (vLLM's endpoint) with the local tokenizer on probe texts.

The server must implement the vLLM extensions used here: `return_tokens_as_token_ids` (or
`return_token_ids`) for `sample`, `prompt_logprobs` for `score`, `/tokenize` for the check. vLLM
and `opdflow serve` do; for another server (SGLang...) check its docs: a missing extension
raises an error that names it rather than giving wrong ids.

Transport: httpx, a thread pool of `concurrency` requests, a timeout per request, retries with
exponential backoff and full jitter on 429, 5xx and connection errors (at least `Retry-After`,
capped at `max_backoff_s`, when the server sends one), no retry on other 4xx (the server's
message is raised).

The response parsing is in pure functions (`parse_completion_choice`, `parse_prompt_logprobs`)
that take JSON bodies as vLLM documents them (see `opdflow.infra.serving.serve` for the shape).
"""
from __future__ import annotations

import email.utils
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Sequence

from opdflow.infra.config import OpenAIConfig, default
from opdflow.infra.models.lm import Sample, SampleSettings

PROBE_TEXTS = (
    "12+34=\n",
    "347+485=\n7+5=12 carry 1\nso answer: 832",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnewlines ",
    "numbers 0123456789 and symbols +-*/=:?.,()[]{}",
    "unicode: café, naïve, 東京, emoji 🙂",
)


class OpenAIBackendError(RuntimeError):
    """The server refused a request, or kept failing until the retries ran out."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# -- pure helpers ---------------------------------------------------------------------------

def server_root(base_url: str) -> str:
    """'http://h:8000/v1/' -> 'http://h:8000' (completions live under /v1, /tokenize at the root)."""
    root = base_url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


def parse_token_id(token: str | int) -> int:
    """A token as vLLM renders it with return_tokens_as_token_ids ("token_id:42"), or an id key ("42")."""
    if isinstance(token, int):
        return token
    text = token[len("token_id:"):] if token.startswith("token_id:") else token
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"token {token!r} is not a token id: ask the server for return_tokens_as_token_ids "
                         f"(vLLM and `opdflow serve` support it)") from None


def parse_completion_choice(choice: dict) -> Sample:
    """One choice of a non-echo completion with logprobs -> Sample(ids, sampler logprobs, finish)."""
    block = choice.get("logprobs")
    if not block or block.get("tokens") is None:
        raise ValueError("the completion has no logprobs: the request must set logprobs")
    tokens = block["tokens"]
    if all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
        ids = [parse_token_id(t) for t in tokens]
    elif choice.get("token_ids") is not None:  # vLLM >= 0.10.2 with return_token_ids
        ids = [int(t) for t in choice["token_ids"]]
    else:
        raise ValueError("the completion's tokens are text, not 'token_id:N': the server ignored "
                         "return_tokens_as_token_ids, so the sampled token ids cannot be recovered")
    lps = block.get("token_logprobs") or []
    if len(lps) != len(ids) or any(x is None for x in lps):
        raise ValueError(f"the completion has {len(lps)} token logprobs for {len(ids)} tokens")
    finish = choice.get("finish_reason")
    if finish not in ("stop", "length"):
        raise ValueError(f"the completion finished with {finish!r} (expected 'stop' or 'length')")
    return Sample(response_ids=ids, logprobs=[float(x) for x in lps], finish_reason=finish)


def top_k_entries(entry: dict, k: int) -> tuple[list[int], list[float]]:
    """A vLLM logprob dict (token id string -> {"logprob", "rank", ...}) -> its top k, best first.
    vLLM adds the actual token even when it is outside the top k (k + 1 entries): its rank > k
    drops it; without ranks the k best logprobs are kept."""
    items = [(parse_token_id(key), float(v["logprob"]), v.get("rank")) for key, v in entry.items()]
    if len(items) > k and all(r is not None for _, _, r in items):
        items = [it for it in items if it[2] <= k]
    items.sort(key=lambda it: (-it[1], it[2] if it[2] is not None else 0))
    items = items[:k]
    return [i for i, _, _ in items], [lp for _, lp, _ in items]


def parse_prompt_logprobs(prompt_logprobs: list, token_ids: Sequence[int], top_k: int, start: int = 1
                          ) -> tuple[list[float], list[list[int]], list[list[float]]]:
    """vLLM's prompt_logprobs of the sequence `token_ids` -> for positions start..end: the logprob of
    the actual token, and the top-k ids and logprobs (sorted, best first)."""
    if prompt_logprobs is None:
        raise ValueError("the response has no prompt_logprobs: the server does not support vLLM's "
                         "prompt_logprobs extension (vLLM and `opdflow serve` do)")
    if len(prompt_logprobs) != len(token_ids):
        raise ValueError(f"the server returned {len(prompt_logprobs)} prompt_logprobs entries for "
                         f"{len(token_ids)} prompt tokens")
    lps, ids, tlps = [], [], []
    for pos in range(max(start, 1), len(token_ids)):
        entry = prompt_logprobs[pos]
        actual = entry.get(str(token_ids[pos])) if entry else None
        if actual is None:
            raise ValueError(f"prompt_logprobs at position {pos} has no entry for its token {token_ids[pos]}")
        lps.append(float(actual["logprob"]))
        top_ids, top_lps = top_k_entries(entry, top_k)
        ids.append(top_ids)
        tlps.append(top_lps)
    return lps, ids, tlps


def error_message(body: Any, text: str = "") -> str:
    """The server's message from an OpenAI ({"error": {...}}), older vLLM ({"message"}) or
    FastAPI ({"detail"}) error body."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        for key in ("message", "detail"):
            if body.get(key):
                return str(body[key])
    return text.strip()[:500] or "(no message)"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds or an HTTP date -> seconds to wait (None if absent or unreadable)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def retry_delay(attempt: int, backoff_s: float, max_backoff_s: float, retry_after: float | None,
                rng: random.Random) -> float:
    """Exponential backoff with full jitter; never shorter than the server's Retry-After."""
    delay = rng.uniform(0, min(max_backoff_s, backoff_s * 2 ** attempt))
    if retry_after is not None:
        delay = max(delay, min(retry_after, max_backoff_s))
    return delay


def is_retryable(status: int) -> bool:
    return status == 429 or status >= 500


def completion_request(model: str, prompt: Sequence[int], seed: int, settings: SampleSettings, eos_id: int,
                       allowed_vocab: int | None = None) -> dict:
    """The sampling request. `allowed_vocab` (vLLM's `allowed_token_ids` extension, set only by
    the vllm backend on a padded checkpoint): only ids below it can be sampled."""
    body = {"model": model, "prompt": list(prompt), "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature, "top_p": settings.top_p, "seed": int(seed), "n": 1,
            "logprobs": 1, "return_tokens_as_token_ids": True, "stop_token_ids": [int(eos_id)]}
    if getattr(settings, "top_k", 0) > 0:  # vLLM's extension; off unless set
        body["top_k"] = settings.top_k
    if allowed_vocab is not None:
        body["allowed_token_ids"] = list(range(int(allowed_vocab)))
    return body


def score_request(model: str, prompt: Sequence[int], response: Sequence[int], top_k: int) -> dict:
    return {"model": model, "prompt": list(prompt) + list(response), "max_tokens": 0, "echo": True,
            "prompt_logprobs": int(top_k), "temperature": 0.0}


# -- the client -----------------------------------------------------------------------------

class OpenAIBackend:
    """A client for one model on an OpenAI-compatible completions server."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout_s: float = default(OpenAIConfig, "timeout_s"),
                 max_retries: int = default(OpenAIConfig, "max_retries"),
                 concurrency: int = default(OpenAIConfig, "concurrency"),
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0):
        import httpx
        self.root, self.model = server_root(base_url), model
        self.max_retries, self.concurrency = max_retries, max(1, concurrency)
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)), headers=headers,
                                  limits=httpx.Limits(max_connections=self.concurrency,
                                                      max_keepalive_connections=self.concurrency))
        self._rng = random.Random()
        self._rng_lock = threading.Lock()
        self.vocab_size: int | None = None  # the local tokenizer's size, once check_tokenizer ran

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "OpenAIBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------

    def post(self, path: str, body: dict) -> dict:
        """POST JSON with retries on 429/5xx/connection errors; other 4xx raise at once."""
        import httpx
        url = self.root + path
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                resp = self._http.post(url, json=body)
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code < 400:
                    return self._json(resp, url)
                msg = error_message(self._json_or_none(resp), resp.text)
                if not is_retryable(resp.status_code):
                    raise OpenAIBackendError(f"{url}: HTTP {resp.status_code}: {msg}", resp.status_code)
                last = f"HTTP {resp.status_code}: {msg}"
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            if attempt < self.max_retries:
                with self._rng_lock:
                    delay = retry_delay(attempt, self.backoff_s, self.max_backoff_s, retry_after, self._rng)
                time.sleep(delay)
        raise OpenAIBackendError(f"{url}: gave up after {self.max_retries + 1} attempts; last error: {last}")

    @staticmethod
    def _json_or_none(resp) -> Any:
        try:
            return resp.json()
        except ValueError:
            return None

    def _json(self, resp, url: str) -> dict:
        body = self._json_or_none(resp)
        if not isinstance(body, dict):
            raise OpenAIBackendError(f"{url}: the answer is not a JSON object: {resp.text[:200]!r}", resp.status_code)
        return body

    def map(self, fn: Callable[[Any], Any], items: Sequence, on_done: Callable[[int], None] | None = None) -> list:
        """fn over items with at most `concurrency` in flight; results in order; the first error raises."""
        out: list = [None] * len(items)
        if not items:
            return out
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            futures = {pool.submit(fn, it): i for i, it in enumerate(items)}
            try:
                for done, fut in enumerate(as_completed(futures), start=1):
                    out[futures[fut]] = fut.result()
                    if on_done:
                        on_done(done)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return out

    # -- the API ----------------------------------------------------------------------------

    def check_tokenizer(self, tokenizer, probes: Sequence[str] = PROBE_TEXTS) -> None:
        """Raise ValueError unless the server tokenizes the probe texts exactly as `tokenizer`."""
        local_name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        for text in probes:
            try:
                body = self.post("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": True})
            except OpenAIBackendError as e:
                if e.status == 404 and self._model_listed():
                    raise OpenAIBackendError(
                        f"the tokenizer check could not be done: the server at {self.root} has no /tokenize "
                        f"endpoint (HTTP 404). vLLM and `opdflow serve` have one; to skip the check, do not call "
                        f"check_tokenizer, and only if you are sure the server's model `{self.model}` uses the "
                        f"same tokenizer as {local_name}.", 404) from e
                raise
            remote = [int(t) for t in body.get("tokens", [])]
            local = list(tokenizer(text, add_special_tokens=True)["input_ids"])
            if remote != local:
                raise ValueError(f"tokenizer mismatch: the server's model `{self.model}` at {self.root} and the "
                                 f"local tokenizer {local_name} encode {text!r} differently: server {remote[:24]} vs "
                                 f"local {local[:24]}. Token ids would not mean the same tokens; serve the same "
                                 f"model (or one with the same tokenizer).")
        self.vocab_size = len(tokenizer)

    def check_ids(self, ids, what: str) -> None:
        """Refuse token ids at or beyond the tokenizer's size (after check_tokenizer): the server
        sampled or ranked a padded lm_head row, which is no token (Qwen-style checkpoints have more
        rows than tokens). `opdflow serve` never does; a vLLM server on such a checkpoint can."""
        if self.vocab_size is None:
            return
        bad = [int(i) for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise OpenAIBackendError(
                f"{self.root}: the server's {what} holds token id {bad[0]}, beyond the tokenizer's "
                f"{self.vocab_size} ids: a padded lm_head row of `{self.model}`, which is no token. Serve it with "
                f"`opdflow serve` (which masks padded rows) or with a server that masks them.")

    def _model_listed(self) -> bool:
        """Whether GET /v1/models lists our model (a 404 then means a missing endpoint, not a model)."""
        try:
            resp = self._http.get(self.root + "/v1/models")
            return resp.status_code == 200 and any(m.get("id") == self.model for m in resp.json().get("data", []))
        except Exception:  # noqa: BLE001 -- only to word the error; the 404 is raised either way
            return True

    def sample(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], settings: SampleSettings,
               eos_id: int, pad_id: int, on_batch: Callable[[int], None] | None = None,
               allowed_vocab: int | None = None) -> list[Sample]:
        """As `infra.models.lm.sample`, one request per (prompt, seed). `pad_id` is unused (no padding).
        `allowed_vocab`: send vLLM's `allowed_token_ids = range(allowed_vocab)` with every request
        (the vllm backend on a padded checkpoint; a generic server may not know the field). The
        ids are checked after sampling either way (`check_ids`)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        step = max(1, settings.batch_size)

        def progress(done: int) -> None:
            if on_batch and (done % step == 0 or done == len(prompts)):
                on_batch(done)

        def one(item) -> Sample:
            prompt, seed = item
            body = self.post("/v1/completions", completion_request(self.model, prompt, seed, settings, eos_id,
                                                                      allowed_vocab))
            choices = body.get("choices") or []
            if len(choices) != 1:
                raise OpenAIBackendError(f"{self.root}: expected 1 choice, got {len(choices)}")
            got = parse_completion_choice(choices[0])
            self.check_ids(got.response_ids, "sampled response")
            return got

        return self.map(one, list(zip(prompts, seeds)), progress)

    def score(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], top_k: int
              ) -> list[tuple[list[float], list[list[int]], list[list[float]]]]:
        """Per response: the teacher's logprob of each token and its top-k (ids, logprobs), best first."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")

        def one(item):
            prompt, response = item
            if not response:
                return [], [], []
            if not prompt:
                raise ValueError("score needs a non-empty prompt (the first token has no logprob)")
            body = self.post("/v1/completions", score_request(self.model, prompt, response, top_k))
            choices = body.get("choices") or []
            if not choices:
                raise OpenAIBackendError(f"{self.root}: the scoring answer has no choices")
            seq = list(prompt) + list(response)
            got = parse_prompt_logprobs(choices[0].get("prompt_logprobs"), seq, top_k, start=len(prompt))
            self.check_ids([i for row in got[1] for i in row], "top-k")
            return got

        return self.map(one, list(zip(prompts, responses)))

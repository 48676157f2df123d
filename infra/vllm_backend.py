"""The `vllm` rollout backend: the student samples through an in-process `vllm.LLM`.

Why: on a CUDA machine vLLM (paged KV cache, continuous batching, fused sampling kernels) samples
a real student many times faster than the transformers or native backends. This module gives it
the same interface as `infra.lm.sample` / `infra.native.sample`, except that it takes the model
*directory* (vLLM loads its own copy of the weights) instead of a loaded transformers model:

    sample(model_dir, prompts, seeds, settings, eos_id, pad_id, on_batch=None,
           dtype="bfloat16", gpu_memory_utilization=0.85) -> list[infra.lm.Sample]

API followed: vLLM 0.11 (V1 engine; `logprobs_mode` needs >= 0.10), as documented in vLLM's
`vllm/sampling_params.py`, `vllm/entrypoints/llm.py`, `vllm/outputs.py` and the `logprobs_mode`
field of `vllm/config/model.py` (read in the vLLM repository, not run: vLLM is not installed here):

- prompts are token ids, passed as `{"prompt_token_ids": [...]}` (the `vllm.inputs.TokensPrompt`
  TypedDict; a plain dict is the same object), so vLLM never re-tokenizes;
- `LLM.generate(prompts, [SamplingParams, ...])` with one `SamplingParams` per prompt, because the
  seed is a per-request field and every sequence has its own seed;
- `SamplingParams(n=1, temperature, top_p, top_k, max_tokens, seed, logprobs=0,
  stop_token_ids=[eos], detokenize=False)`: `top_k=-1` means off (recent versions accept 0 too;
  -1 works in all); `logprobs=0` returns the sampled token's logprob only;
- the engine is built with `logprobs_mode="processed_logprobs"` (added in vLLM 0.10.0): the reported
  logprob is then under the distribution sampled from (temperature, top-k, top-p applied), which
  is what `infra.lm.sample` reports. vLLM's default, `raw_logprobs`, is the model's own
  distribution; the two agree only at temperature 1, top-p 1, top-k off.
- each `RequestOutput.outputs[0]` (a `CompletionOutput`) has `token_ids` (the stop/EOS token
  included when it ended the sequence), `logprobs` (one `{token_id: Logprob}` dict per generated
  token; `.logprob` is the float) and `finish_reason` ("stop", "length", or "abort").

What is and is not the same as the other backends: the seed makes a sequence reproducible on the
same vLLM version, GPU and batch mix, but vLLM draws its own noise (a per-request torch
generator), so the tokens differ from `infra.lm.sample`'s for the same seed, and vLLM's kernels
are not batch-invariant, so a sequence's numbers can move slightly with what it was batched with.
The trainer recomputes logprobs itself; `tasks.mismatch` measures how far the two disagree.

Engines and weights: one `vllm.LLM` per process, for one (model dir, dtype, memory share); a call
with another model dir shuts the old engine down and builds a new one. On-policy rounds write a
new student dir every round, so every round pays a full engine start (weight load, profiling, CUDA
graph capture: tens of seconds to minutes for a real model). To avoid that, a user can keep one
engine and update its weights in place with vLLM's own API: build the `LLM` with
`worker_extension_cls="your.module.Extension"`, where the extension defines a method that calls
`self.model_runner.model.load_weights(weights=[(name, tensor), ...])` on each worker, call it with
`llm.collective_rpc("that_method", args=(...))` after each train step (vLLM's
`examples/offline_inference/rlhf*.py` show this, including the NCCL and CUDA-IPC transports), and
then `llm.reset_prefix_cache()`, since cached prefixes hold keys/values computed with the old
weights. (vLLM >= 0.10 also has a built-in `llm.collective_rpc("reload_weights")` that re-reads
the checkpoint; its arguments have changed between versions, later ones take `weights_path`, and
vllm-project/vllm#32718 reports it returning stale weights in 0.14, so check it on your version.)
This module does neither: rebuilding from the round's dir is slower but cannot serve stale
weights.

`vllm` is imported inside functions only, so the module imports (and its pure parts are tested)
where vLLM is not installed.
"""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Callable, Sequence

from opdflow.infra.lm import Sample, SampleSettings

MISSING_VLLM = ("the vllm rollout backend needs vLLM: pip install 'opdflow[vllm]' (on a CUDA machine); "
                "without vLLM, use the transformers or native rollout backend")

FINISH_REASONS = ("stop", "length")  # vLLM's other reason, "abort", is an error here

_ENGINE: dict[str, Any] = {"key": None, "llm": None}


def import_vllm():
    """The `vllm` module, or an ImportError that says how to get it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(MISSING_VLLM) from e
    return vllm


# -- pure parts -----------------------------------------------------------------------------

def sampling_params_kwargs(settings: SampleSettings, seed: int, eos_id: int) -> dict:
    """Keyword arguments of one sequence's `vllm.SamplingParams`."""
    return {
        "n": 1,
        "temperature": float(settings.temperature),
        "top_p": float(settings.top_p),
        "top_k": int(settings.top_k) if settings.top_k > 0 else -1,
        "max_tokens": int(settings.max_new_tokens),
        "seed": int(seed),
        "logprobs": 0,
        "stop_token_ids": [int(eos_id)],
        "detokenize": False,
    }


def token_prompt(prompt_ids: Sequence[int]) -> dict:
    """A token-id prompt (`vllm.inputs.TokensPrompt` is a TypedDict of this shape)."""
    return {"prompt_token_ids": [int(t) for t in prompt_ids]}


def sampled_logprob(step: Any, token_id: int) -> float:
    """The logprob of `token_id` in one step's logprobs entry ({token_id: Logprob})."""
    if step is None or token_id not in step:
        raise ValueError(f"vLLM returned no logprob for sampled token {token_id}: was the request made with logprobs=0?")
    entry = step[token_id]
    return float(getattr(entry, "logprob", entry))


def to_sample(completion_output: Any) -> Sample:
    """A vLLM `CompletionOutput` (token_ids, logprobs, finish_reason) as an `infra.lm.Sample`."""
    token_ids = [int(t) for t in completion_output.token_ids]
    steps = completion_output.logprobs
    if steps is None or len(steps) != len(token_ids):
        raise ValueError(f"vLLM returned {0 if steps is None else len(steps)} logprob entries for "
                         f"{len(token_ids)} tokens")
    reason = completion_output.finish_reason
    if reason not in FINISH_REASONS:
        raise RuntimeError(f"vLLM request did not finish normally (finish_reason={reason!r})")
    return Sample(token_ids, [sampled_logprob(s, t) for s, t in zip(steps, token_ids)], reason)


def engine_key(model_dir: str | Path, dtype: str, gpu_memory_utilization: float) -> str:
    return f"{Path(model_dir).resolve()}|{dtype}|{gpu_memory_utilization}"


def engine_kwargs(model_dir: str | Path, dtype: str, gpu_memory_utilization: float) -> dict:
    """Keyword arguments of `vllm.LLM`."""
    return {"model": str(Path(model_dir).resolve()), "dtype": dtype,
            "gpu_memory_utilization": float(gpu_memory_utilization),
            "logprobs_mode": "processed_logprobs", "seed": 0}


# -- the engine -----------------------------------------------------------------------------

def get_engine(model_dir: str | Path, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.85):
    """This process's `vllm.LLM` for `model_dir`; builds it (and drops any other) when needed."""
    key = engine_key(model_dir, dtype, gpu_memory_utilization)
    if _ENGINE["key"] == key:
        return _ENGINE["llm"]
    vllm = import_vllm()
    close_engine()
    from opdflow.infra.lm import offline
    offline()
    llm = vllm.LLM(**engine_kwargs(model_dir, dtype, gpu_memory_utilization))
    _ENGINE.update(key=key, llm=llm)
    return llm


def close_engine() -> None:
    """Drop the cached engine and give its GPU memory back (as far as vLLM lets go of it)."""
    llm = _ENGINE["llm"]
    _ENGINE.update(key=None, llm=None)
    if llm is None:
        return
    shutdown = getattr(getattr(llm, "llm_engine", None), "shutdown", None)
    if callable(shutdown):
        shutdown()
    del llm
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def sample(model_dir: str | Path, prompts: Sequence[Sequence[int]], seeds: Sequence[int], settings: SampleSettings,
           eos_id: int, pad_id: int, on_batch: Callable[[int], None] | None = None,
           dtype: str = "bfloat16", gpu_memory_utilization: float = 0.85) -> list[Sample]:
    """Sample one response per (prompt, seed) with vLLM. `pad_id` is unused (vLLM does not pad)
    and `settings.batch_size` is ignored: vLLM schedules its own batches. `on_batch` is called
    once, with the number of prompts, when all are done."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts:
        return []
    vllm = import_vllm()
    llm = get_engine(model_dir, dtype, gpu_memory_utilization)
    params = [vllm.SamplingParams(**sampling_params_kwargs(settings, s, eos_id)) for s in seeds]
    outputs = llm.generate([token_prompt(p) for p in prompts], params, use_tqdm=False)
    out = [to_sample(o.outputs[0]) for o in outputs]
    if on_batch:
        on_batch(len(prompts))
    return out

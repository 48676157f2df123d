"""Which code samples the rollouts and scores them, chosen by the config.

Why one place: the rollout stage (and the rock stage, through `tasks.rollout.generate`) and
the score stage each need "the sampler" / "the teacher scorer" without knowing which of the
backends runs them, whether a local model must be loaded, or how a server client is built.

- `sampler_for(config)` -> `sample(model_dir, model, tok, prompts, seeds, settings, on_batch)`,
  a `list[infra.models.lm.Sample]` in input order, for `rollout.backend`:
  transformers (`infra.models.lm.sample`), native (`infra.sampling.native.sample`), vllm
  (`infra.sampling.vllm_backend.sample`: a `vllm serve` started on `model_dir` for the call, in vLLM's own
  environment, `rollout.vllm`) or openai
  (`infra.sampling.openai_backend.OpenAIBackend` on `rollout.openai`; the server's tokenizer is checked
  against ours once per call, before any sampling). `model` is None for the last two:
  `needs_local_model(backend)` says whether the caller must load it.
- `scorer_for(config)` -> `score(model, tok, prompts, responses, progress)`, per response
  (teacher logprobs, top-k ids, top-k logprobs), for `scoring.backend`: transformers
  (`infra.models.scoring.teacher_scores`, chunked LM head), vllm (`infra.sampling.vllm_backend.score`: a server
  started on the teacher with `--max-logprobs = top_k`) or openai (`OpenAIBackend.score`).
- `sampler_record` / `scorer_record`: what the manifest entry says ran, with its settings (for
  a server: its URL and model name; the API key is read from the environment variable
  `api_key_env` names and is never recorded).

Seeds: every sequence's seed is passed to the sampler as is. `opdflow serve` samples a
one-prompt request with its seed exactly as in process, so rollouts through it equal the
transformers backend's on the same weights; vLLM draws its own noise, so the same seed gives
other tokens there; what is reproducible is a backend with its seeds.

A server backend serves whatever model it was started with: for rollouts it must serve the
current student (each round's checkpoint), which this module cannot check; the train stage's
sampler-vs-trainer logprob report (`tasks.mismatch`) is what shows stale or different weights.
"""
from __future__ import annotations

import os
from typing import Callable

from opdflow.infra.config import Config, OpenAIConfig, VllmConfig, without_execution
from opdflow.infra.models.lm import Sample, SampleSettings

LOCAL_MODEL_BACKENDS = ("transformers", "native")
# `auto` picks native on CUDA only once its CUDA-graph path has passed tests/test_native.py's GPU
# tests on a real device (flip this then); until then transformers, which has run everywhere
NATIVE_CUDA_VERIFIED = False

Sampler = Callable[..., list[Sample]]
Scorer = Callable[..., list[tuple[list[float], list[list[int]], list[list[float]]]]]


def needs_local_model(backend: str) -> bool:
    """Whether the stage must load the model in its own process for this backend."""
    return backend in LOCAL_MODEL_BACKENDS


def openai_client(cfg: OpenAIConfig):
    """An OpenAIBackend for a config sub-section; the key comes from the environment."""
    from opdflow.infra.sampling.openai_backend import OpenAIBackend
    return OpenAIBackend(cfg.base_url, cfg.model, api_key=os.environ.get(cfg.api_key_env) or None,
                         timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, concurrency=cfg.concurrency)


def result_settings(section: dict) -> dict:
    """A rollout/scoring config section without the server transport settings (stage params:
    a retry count or concurrency change must not redo a stage). Which settings are transport is
    marked once, in the schema (`infra.config.EXECUTION`)."""
    out = dict(section)
    for key, model in (("openai", OpenAIConfig), ("vllm", VllmConfig)):
        if key in out:
            out[key] = without_execution(out[key], model)
    return out


# -- samplers ---------------------------------------------------------------------------------

def _transformers(model_dir, model, tok, prompts, seeds, settings, on_batch):
    from opdflow.infra.models.lm import sample
    return sample(model, prompts, seeds, settings, tok.eos_token_id, tok.pad_token_id, on_batch=on_batch)


def _native(model_dir, model, tok, prompts, seeds, settings, on_batch):
    from opdflow.infra.sampling.native import clear_samplers, sample
    try:
        return sample(model, prompts, seeds, settings, tok.eos_token_id, tok.pad_token_id, on_batch=on_batch)
    finally:
        # the stage loads a fresh model per call, so a cached sampler (its model, KV cache and
        # CUDA graphs) would never be reused: drop it rather than keep one per round alive
        clear_samplers()


def _vllm(config: Config) -> Sampler:
    def run(model_dir, model, tok, prompts, seeds, settings, on_batch):
        from opdflow.infra.sampling.vllm_backend import sample
        return sample(config.rollout.vllm, model_dir, config.student.dtype, tok, prompts, seeds, settings,
                      on_batch=on_batch)
    return run


def _openai_sampler(cfg: OpenAIConfig) -> Sampler:
    def run(model_dir, model, tok, prompts, seeds, settings, on_batch):
        with openai_client(cfg) as client:
            client.check_tokenizer(tok)
            return client.sample(prompts, seeds, settings, tok.eos_token_id, tok.pad_token_id, on_batch=on_batch)
    return run


def rollout_backend(config: Config) -> str:
    """`rollout.backend`, with `auto` resolved: transformers, and native on CUDA only once
    `NATIVE_CUDA_VERIFIED` (the two sample the same tokens; native is the fast one on a GPU, but
    its CUDA-graph path has not yet run on a real device)."""
    name = config.rollout.backend
    if name == "auto":
        import torch
        return "native" if NATIVE_CUDA_VERIFIED and torch.cuda.is_available() else "transformers"
    return name


def sampler_for(config: Config) -> Sampler:
    """`sample(model_dir, model, tok, prompts, seeds, settings, on_batch) -> list[Sample]` for
    `rollout.backend` (`model` may be None where `needs_local_model` is False)."""
    name = rollout_backend(config)
    if name == "transformers":
        return _transformers
    if name == "native":
        return _native
    if name == "vllm":
        return _vllm(config)
    if name == "openai":
        return _openai_sampler(config.rollout.openai)
    raise ValueError(f"rollout.backend: unknown backend {name!r}")


def sampler_record(config: Config, settings: SampleSettings, model=None) -> dict:
    """The manifest's `backend` of a rollout: which sampler ran, where, with which settings."""
    name = rollout_backend(config)
    rec: dict = {"name": name, "configured": config.rollout.backend, **settings.__dict__}
    if name == "openai":
        rec.update(base_url=config.rollout.openai.base_url, model=config.rollout.openai.model)
    else:
        rec["dtype"] = config.student.dtype
    if model is not None:
        rec["device"] = str(next(model.parameters()).device)
        if name == "native":
            from opdflow.infra.sampling.native import last_warmup_check
            rec["warmup_check"] = last_warmup_check()
    elif name == "vllm":
        from opdflow.infra.sampling.vllm_backend import last_record
        rec.update(last_record())
    return rec


# -- teacher scorers ----------------------------------------------------------------------------

def _transformers_scorer(config: Config) -> Scorer:
    sc = config.scoring

    def run(model, tok, prompts, responses, progress):
        from opdflow.infra.models.scoring import teacher_scores
        return teacher_scores(model, prompts, responses, tok.pad_token_id, sc.top_k, sc.batch_size,
                              chunk_tokens=sc.chunk_tokens, progress=progress, vocab=len(tok))
    return run


def _openai_scorer(config: Config) -> Scorer:
    sc = config.scoring

    def run(model, tok, prompts, responses, progress):
        with openai_client(sc.openai) as client:
            client.check_tokenizer(tok)
            out = client.score(prompts, responses, sc.top_k)
        progress(1.0, f"{len(prompts)}/{len(prompts)} sequences")
        return out
    return run


def _vllm_scorer(config: Config, teacher_dir) -> Scorer:
    sc = config.scoring

    def run(model, tok, prompts, responses, progress):
        from opdflow.infra.sampling.vllm_backend import score
        return score(sc.vllm, teacher_dir, config.teacher.dtype, tok, prompts, responses, sc.top_k, progress)
    return run


def scorer_for(config: Config, teacher_dir=None) -> Scorer:
    """`score(model, tok, prompts, responses, progress)` -> per response (teacher logprobs,
    top-k ids, top-k logprobs) for `scoring.backend` (`model` is None for the server backends;
    vllm starts its server on `teacher_dir`)."""
    name = config.scoring.backend
    if name == "transformers":
        return _transformers_scorer(config)
    if name == "vllm":
        if teacher_dir is None:
            raise ValueError("scoring.backend: vllm needs the teacher's model dir")
        return _vllm_scorer(config, teacher_dir)
    if name == "openai":
        return _openai_scorer(config)
    raise ValueError(f"scoring.backend: unknown backend {name!r}")


def scorer_record(config: Config, model=None) -> dict:
    """The manifest's `backend` of a scoring stage."""
    sc = config.scoring
    if sc.backend == "openai":
        return {"name": "openai", "base_url": sc.openai.base_url, "model": sc.openai.model, "top_k": sc.top_k}
    if sc.backend == "vllm":
        from opdflow.infra.sampling.vllm_backend import last_record
        return {"name": "vllm", "dtype": config.teacher.dtype, "top_k": sc.top_k, **last_record()}
    from opdflow.infra.models.scoring import vocab_size
    return {"name": sc.backend, "dtype": config.teacher.dtype, "device": str(next(model.parameters()).device),
            "top_k": min(sc.top_k, vocab_size(model)), "batch_size": sc.batch_size, "chunk_tokens": sc.chunk_tokens}


__all__ = ["rollout_backend", "sampler_for", "scorer_for", "sampler_record", "scorer_record", "needs_local_model", "result_settings",
           "openai_client"]

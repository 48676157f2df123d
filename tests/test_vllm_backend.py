"""The vllm rollout backend's pure parts.

vLLM itself cannot be installed here (its pins do not resolve on this CPU machine), so these tests
cover only what runs without it: the clear error when it is missing, the SamplingParams keyword
arguments, and the parsing of completion outputs, built as small plain objects
(types.SimpleNamespace) shaped like vLLM 0.11's `CompletionOutput` and `Logprob`. Actual sampling
through `vllm.LLM` is untested here.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from opdflow.infra import vllm_backend
from opdflow.infra.lm import Sample, SampleSettings


def _lp(x: float, rank: int = 1) -> SimpleNamespace:
    return SimpleNamespace(logprob=x, rank=rank, decoded_token=None)


def _completion(token_ids, logprobs, finish_reason, stop_reason=None) -> SimpleNamespace:
    return SimpleNamespace(index=0, text="", token_ids=token_ids, cumulative_logprob=None, logprobs=logprobs,
                           finish_reason=finish_reason, stop_reason=stop_reason)


@pytest.fixture
def no_vllm(monkeypatch):
    """`import vllm` raises ImportError (a None entry in sys.modules does that)."""
    monkeypatch.setitem(sys.modules, "vllm", None)
    vllm_backend.close_engine()


def test_missing_vllm_gives_a_clear_error(no_vllm):
    with pytest.raises(ImportError, match=r"needs vLLM: pip install 'opdflow\[vllm\]' \(on a CUDA machine\)"):
        vllm_backend.import_vllm()
    with pytest.raises(ImportError, match="needs vLLM"):
        vllm_backend.sample("/nowhere", [[1, 2]], [7], SampleSettings(), eos_id=2, pad_id=0)
    with pytest.raises(ImportError, match="needs vLLM"):
        vllm_backend.get_engine("/nowhere")


def test_empty_input_needs_no_engine(no_vllm):
    assert vllm_backend.sample("/nowhere", [], [], SampleSettings(), eos_id=2, pad_id=0) == []
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        vllm_backend.sample("/nowhere", [[1], [2]], [7], SampleSettings(), eos_id=2, pad_id=0)


def test_sampling_params_kwargs():
    st = SampleSettings(temperature=0.7, top_p=0.9, max_new_tokens=33, batch_size=8, top_k=0)
    kw = vllm_backend.sampling_params_kwargs(st, seed=12345, eos_id=2)
    assert kw == {"n": 1, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_tokens": 33, "seed": 12345,
                  "logprobs": 0, "stop_token_ids": [2], "detokenize": False}
    assert vllm_backend.sampling_params_kwargs(SampleSettings(top_k=50), 1, 5)["top_k"] == 50
    greedy = vllm_backend.sampling_params_kwargs(SampleSettings(temperature=0.0), 3, 5)
    assert greedy["temperature"] == 0.0 and greedy["seed"] == 3
    # every sequence gets its own params, differing only in the seed
    a, b = (vllm_backend.sampling_params_kwargs(st, s, 2) for s in (1, 2))
    assert {k for k in a if a[k] != b[k]} == {"seed"}


def test_prompts_and_engine_kwargs(tmp_path):
    assert vllm_backend.token_prompt((5, 6, 7)) == {"prompt_token_ids": [5, 6, 7]}
    kw = vllm_backend.engine_kwargs(tmp_path, "bfloat16", 0.5)
    assert kw["model"] == str(tmp_path.resolve()) and kw["dtype"] == "bfloat16"
    assert kw["gpu_memory_utilization"] == 0.5 and kw["logprobs_mode"] == "processed_logprobs"
    assert vllm_backend.engine_key(tmp_path, "bfloat16", 0.5) != vllm_backend.engine_key(tmp_path / "x", "bfloat16", 0.5)


def test_parse_stopped_on_eos():
    # logprobs=0: each step's dict holds the sampled token only
    out = _completion([11, 12, 2], [{11: _lp(-0.5)}, {12: _lp(-1.25, rank=3)}, {2: _lp(-0.01)}], "stop")
    assert vllm_backend.to_sample(out) == Sample([11, 12, 2], [-0.5, -1.25, -0.01], "stop")


def test_parse_length_and_extra_top_entries():
    # logprobs=1 (or more): the sampled token plus the top ones; the sampled token's entry is taken
    steps = [{7: _lp(-2.0, rank=4), 9: _lp(-0.1)}, {9: _lp(-0.3)}]
    s = vllm_backend.to_sample(_completion((7, 9), steps, "length"))
    assert s.response_ids == [7, 9] and s.logprobs == [-2.0, -0.3] and s.finish_reason == "length"


def test_parse_stop_on_a_stop_token_keeps_it():
    s = vllm_backend.to_sample(_completion([4, 99], [{4: _lp(-1.0)}, {99: _lp(-3.0)}], "stop", stop_reason=99))
    assert s.response_ids == [4, 99] and s.finish_reason == "stop"


def test_parse_empty_response():
    assert vllm_backend.to_sample(_completion([], [], "length")) == Sample([], [], "length")


def test_parse_rejects_bad_outputs():
    with pytest.raises(RuntimeError, match="abort"):
        vllm_backend.to_sample(_completion([1], [{1: _lp(-1.0)}], "abort"))
    with pytest.raises(ValueError, match="0 logprob entries for 2 tokens"):
        vllm_backend.to_sample(_completion([1, 2], None, "stop"))
    with pytest.raises(ValueError, match="1 logprob entries for 2 tokens"):
        vllm_backend.to_sample(_completion([1, 2], [{1: _lp(-1.0)}], "stop"))
    with pytest.raises(ValueError, match="no logprob for sampled token 2"):
        vllm_backend.to_sample(_completion([1, 2], [{1: _lp(-1.0)}, {3: _lp(-1.0)}], "stop"))


def test_sample_with_a_stand_in_engine(monkeypatch):
    """The wiring of `sample`: one SamplingParams per prompt with its own seed, token prompts, order
    kept, on_batch called; vLLM replaced by a stand-in module (not vLLM's behaviour)."""
    seen = {}

    class FakeLLM:
        def __init__(self, **kw):
            seen["engine"] = kw

        def generate(self, prompts, params, use_tqdm=True):
            seen["prompts"], seen["params"] = prompts, params
            return [SimpleNamespace(outputs=[_completion([p["prompt_token_ids"][0], 2],
                                                         [{p["prompt_token_ids"][0]: _lp(-0.5)}, {2: _lp(-0.25)}],
                                                         "stop")]) for p in prompts]

    fake = SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    vllm_backend.close_engine()
    done = []
    try:
        out = vllm_backend.sample("/m", [[5, 1], [6]], [10, 20], SampleSettings(max_new_tokens=4), 2, 0,
                                  on_batch=done.append)
        again = vllm_backend.get_engine("/m")
    finally:
        vllm_backend.close_engine()
    assert [s.response_ids for s in out] == [[5, 2], [6, 2]] and out[0].logprobs == [-0.5, -0.25]
    assert seen["prompts"] == [{"prompt_token_ids": [5, 1]}, {"prompt_token_ids": [6]}]
    assert [p["seed"] for p in seen["params"]] == [10, 20] and seen["params"][0]["max_tokens"] == 4
    assert seen["engine"]["logprobs_mode"] == "processed_logprobs"
    assert isinstance(again, FakeLLM) and done == [2]

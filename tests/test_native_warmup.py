"""The native sampler's warm-up self-check (infra/sampling/native.py `_warmup_check`), run on CPU.

On CUDA the sampler compares one replay of its captured decode step with one eager step on the
first batch and falls back to eager decoding when they differ. Capture needs CUDA, so here the
"captured step" is stood in for by a plain function: the eager step itself (must pass, and the
sampler then gives transformers' tokens), and a step that corrupts one slot's token (must fall
back with a warning naming the slot and tokens). The comparison itself is
`test_vllm_backend.test_warmup_comparison_names_the_difference`.
"""
from __future__ import annotations

import pytest
import torch

from opdflow.infra.testbeds import demo
from opdflow.infra.sampling import native
from opdflow.infra.models.lm import SampleSettings, load_model, load_tokenizer, sample

pytestmark = pytest.mark.usefixtures("torch_one_thread")
ST = SampleSettings(temperature=1.0, max_new_tokens=12, batch_size=4)


@pytest.fixture(scope="module")
def setup(demo_dirs):
    model, tok = load_model(demo_dirs["student"]).eval(), load_tokenizer(demo_dirs["student"])
    prompts = [tok(e["prompt"])["input_ids"] for e in demo.make_examples("eval", 4, seed=0)]
    return model, tok, prompts


def _first_batch(sampler, tok, prompts):
    run = native._Run(prompts, [11, 12, 13, 14], tok.eos_token_id, sampler.max_batch, ST.batch_size, None)
    sampler._admit(run, list(range(sampler.max_batch)), ST, tok.eos_token_id, tok.pad_token_id)
    return run


@torch.no_grad()
def test_a_step_equal_to_eager_passes(setup):
    model, tok, prompts = setup
    sampler = native.NativeSampler(model, 4, 64, use_graph=False)
    run = _first_batch(sampler, tok, prompts)
    sampler.use_graph = True  # pretend the step below was captured
    eager = lambda: sampler._decode(ST, tok.eos_token_id)  # noqa: E731
    assert sampler._warmup_check(eager, ST, tok.eos_token_id, run) is eager
    check = native.last_warmup_check()  # may also hold keys of an earlier check in this process (e.g. "reason")
    assert (check["checked"], check["mode"], check["difference"]) == (True, "graph", None), check
    assert sampler.use_graph


@torch.no_grad()
def test_a_differing_step_falls_back_to_eager_with_a_warning(setup):
    model, tok, prompts = setup
    sampler = native.NativeSampler(model, 4, 64, use_graph=False)
    run = _first_batch(sampler, tok, prompts)
    sampler.use_graph = True

    active = run.active()  # a sequence may have ended on its first token
    bad = active[-1]

    def broken():  # the eager step, then one active slot's token replaced
        sampler._decode(ST, tok.eos_token_id)
        sampler._state["tok_in"][bad] = (sampler._state["tok_in"][bad] + 1) % len(tok)

    with pytest.warns(RuntimeWarning, match=rf"tokens differ in 1 of {len(active)} slots \(first: slot "
                                            rf"{len(active) - 1}, .*falling back to eager"):
        step = sampler._warmup_check(broken, ST, tok.eos_token_id, run)
    assert step is not broken and not sampler.use_graph
    assert native.last_warmup_check()["mode"] == "eager"
    # the check put the state back: the batch then decodes exactly as the transformers backend
    while run.active():
        step()
        finished = sampler._state["finished"].tolist()
        for b in run.active():
            run.n_tokens[b] += 1
        done = [b for b in run.active() if finished[b]]
        if done:
            sampler._retire(run, done)
            sampler._admit(run, done, ST, tok.eos_token_id, tok.pad_token_id)
    ref = sample(model, prompts, [11, 12, 13, 14], ST, tok.eos_token_id, tok.pad_token_id)
    assert [s.response_ids for s in run.results] == [s.response_ids for s in ref]

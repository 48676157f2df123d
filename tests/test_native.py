"""The native sampler (opdflow.infra.sampling.native): same tokens and logprobs as the transformers backend,
whatever the batch, the slot or the refills; weights updated in place; on CUDA, graph == eager.

Run: ``python -m pytest -q tests/test_native.py`` (about 30 s on 2 cores, most of it building the
tiny demo models once). The CUDA tests skip without a GPU.

All comparisons of token ids are exact. They rely on fp32 logits of the same sequence agreeing
between backends to far better than the gap between the two best Gumbel-perturbed scores; a near
tie could in principle flip one token, but none happens on these models and seeds.
"""
from __future__ import annotations

import copy

import pytest
import torch

from opdflow.infra.testbeds import demo
from opdflow.infra.sampling import native
from opdflow.infra.models.lm import (SampleSettings, batch_response_logits, load_model, load_tokenizer, sample,
                              sampling_logprobs, uniform_noise)
from opdflow.infra.sampling.native import NativeSampler

pytestmark = pytest.mark.usefixtures("torch_one_thread")

MAX_LEN = 80
SAMPLING = [
    SampleSettings(temperature=1.0, max_new_tokens=30),
    SampleSettings(temperature=0.7, top_p=0.9, max_new_tokens=30),
    SampleSettings(temperature=1.0, top_k=5, max_new_tokens=30),
]


@pytest.fixture(scope="module")
def models(demo_dirs):
    return {role: load_model(path) for role, path in demo_dirs.items()}


@pytest.fixture(scope="module")
def tok(demo_dirs):
    return load_tokenizer(demo_dirs["student"])


@pytest.fixture(scope="module")
def prompts(tok):
    """Eval prompts plus shorter cuts of them: prompt lengths from 2 to 10 tokens in one batch."""
    full = [tok(e["prompt"])["input_ids"] for e in demo.make_examples("eval", 8, seed=0)]
    return full + [full[0][:2], full[1][:4], full[2][:6], full[3][:3]]


def _seeds(n: int, base: int = 1000) -> list[int]:
    return list(range(base, base + n))


def _ids(samples) -> list[list[int]]:
    return [s.response_ids for s in samples]


def _native(model, tok, prompts, seeds, st, max_batch=None, sampler=None):
    sampler = sampler or NativeSampler(model, max_batch or len(prompts), MAX_LEN)
    return sampler.sample(prompts, seeds, st, tok.eos_token_id, tok.pad_token_id)


# -- the shared pieces ------------------------------------------------------------------------

def test_noise_per_row_steps_match_scalar_steps():
    seeds, dev = torch.tensor([5, 6, 7]), torch.device("cpu")
    steps = torch.tensor([0, 3, 9])
    rows = uniform_noise(seeds, steps, 40, dev)
    for i, t in enumerate(steps.tolist()):
        assert torch.equal(rows[i], uniform_noise(seeds, t, 40, dev)[i])


def test_top_k_off_is_unchanged_and_on_keeps_k():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
        assert torch.equal(sampling_logprobs(logits, temperature, top_p),
                           sampling_logprobs(logits, temperature, top_p, 0))
    lp = sampling_logprobs(logits, 1.0, 1.0, 5)
    assert (torch.isfinite(lp).sum(-1) == 5).all()
    assert torch.allclose(lp.exp().sum(-1), torch.ones(4))
    kept = torch.isfinite(lp)
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(5).indices, True))


# -- greedy -----------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["student", "teacher"])
def test_greedy_matches_generate_and_lm_sample(models, tok, prompts, role):
    model, n_new = models[role], 24
    st = SampleSettings(temperature=0.0, max_new_tokens=n_new, batch_size=len(prompts))
    got = _native(model, tok, prompts, _seeds(len(prompts)), st)
    for p, s in zip(prompts, got):
        gen = model.generate(torch.tensor([p]), max_new_tokens=n_new, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert s.response_ids == gen
        assert s.finish_reason == ("stop" if gen[-1] == tok.eos_token_id else "length")
        assert len(s.logprobs) == len(s.response_ids)
    ref = sample(model, prompts, _seeds(len(prompts)), st, tok.eos_token_id, tok.pad_token_id)
    assert _ids(got) == _ids(ref)
    assert [s.finish_reason for s in got] == [s.finish_reason for s in ref]


def test_eager_attention_gives_the_same_tokens(demo_dirs, models, tok, prompts):
    from transformers import AutoModelForCausalLM
    eager = AutoModelForCausalLM.from_pretrained(demo_dirs["teacher"], attn_implementation="eager").eval()
    st = SampleSettings(temperature=1.0, max_new_tokens=20)
    seeds = _seeds(len(prompts))
    assert _ids(_native(eager, tok, prompts, seeds, st, max_batch=5)) == \
        _ids(_native(models["teacher"], tok, prompts, seeds, st))


# -- sampling ---------------------------------------------------------------------------------

@pytest.mark.parametrize("st", SAMPLING, ids=["t1", "t0.7-p0.9", "k5"])
def test_logprobs_match_teacher_forced_forward(models, tok, prompts, st):
    model = models["teacher"]
    out = _native(model, tok, prompts, _seeds(len(prompts)), st, max_batch=5)
    with torch.no_grad():
        logits = batch_response_logits(model, prompts, _ids(out), tok.pad_token_id, torch.device("cpu"))
    ref_lp = sampling_logprobs(logits, st.temperature, st.top_p, st.top_k)
    toks = torch.tensor([t for s in out for t in s.response_ids])
    ref = ref_lp.gather(-1, toks[:, None]).squeeze(-1)
    got = torch.tensor([x for s in out for x in s.logprobs])
    assert torch.isfinite(got).all()
    assert (ref - got).abs().max().item() < 1e-4


@pytest.mark.parametrize("role", ["student", "teacher"])
@pytest.mark.parametrize("st", SAMPLING, ids=["t1", "t0.7-p0.9", "k5"])
def test_same_tokens_as_lm_sample(models, tok, prompts, role, st):
    model, seeds = models[role], _seeds(len(prompts), base=7)
    ref = sample(model, prompts, seeds, st, tok.eos_token_id, tok.pad_token_id)
    got = _native(model, tok, prompts, seeds, st, max_batch=4)
    assert _ids(got) == _ids(ref)
    assert [s.finish_reason for s in got] == [s.finish_reason for s in ref]
    diffs = [abs(a - b) for g, r in zip(got, ref) for a, b in zip(g.logprobs, r.logprobs)]
    assert max(diffs) < 1e-4


def test_seeded_and_independent_of_batch_and_slot(models, tok, prompts):
    model, st = models["student"], SampleSettings(temperature=1.0, max_new_tokens=30)
    seeds = _seeds(len(prompts))
    sampler = NativeSampler(model, len(prompts), MAX_LEN)
    full = _native(model, tok, prompts, seeds, st, sampler=sampler)
    assert _ids(_native(model, tok, prompts, seeds, st, sampler=sampler)) == _ids(full)  # reproducible
    assert len({len(s.response_ids) for s in full}) > 1  # some stop early: refills do happen below
    refilled = _native(model, tok, prompts, seeds, st, max_batch=3)  # 12 prompts through 3 slots
    assert _ids(refilled) == _ids(full)
    order = list(reversed(range(len(prompts))))
    shuffled = _native(model, tok, [prompts[i] for i in order], [seeds[i] for i in order], st, max_batch=5)
    assert [shuffled[order.index(i)].response_ids for i in range(len(prompts))] == _ids(full)
    alone = NativeSampler(model, 1, MAX_LEN)
    for i in (0, 9):
        assert _native(model, tok, [prompts[i]], [seeds[i]], st, sampler=alone)[0].response_ids == full[i].response_ids
    other = _native(model, tok, prompts, [s + 1 for s in seeds], st, sampler=sampler)
    assert _ids(other) != _ids(full)


def test_stale_cache_contents_are_never_read(models, tok, prompts):
    model, st = models["teacher"], SampleSettings(temperature=1.0, max_new_tokens=30)
    seeds = _seeds(len(prompts))
    clean = _native(model, tok, prompts, seeds, st, max_batch=4)
    sampler = NativeSampler(model, 4, MAX_LEN)
    for layer in sampler._cache.layers:  # finite garbage everywhere: masked keys must not matter
        layer.keys.uniform_(-50, 50)
        layer.values.uniform_(-50, 50)
    assert _ids(_native(model, tok, prompts, seeds, st, sampler=sampler)) == _ids(clean)


def test_lengths_budget_and_progress(models, tok, prompts):
    model = models["student"]
    sampler = NativeSampler(model, 3, MAX_LEN)
    seen: list[int] = []
    out = sampler.sample(prompts, _seeds(len(prompts)), SampleSettings(temperature=1.0, max_new_tokens=1, batch_size=5),
                         tok.eos_token_id, tok.pad_token_id, on_batch=seen.append)
    assert all(len(s.response_ids) == 1 for s in out)
    assert all(s.finish_reason == ("stop" if s.response_ids == [tok.eos_token_id] else "length") for s in out)
    assert seen == sorted(seen) and seen[-1] == len(prompts) and len(seen) >= len(prompts) // 5
    out = sampler.sample(prompts, _seeds(len(prompts)), SampleSettings(max_new_tokens=0), tok.eos_token_id, tok.pad_token_id)
    assert all(s.response_ids == [] and s.finish_reason == "length" for s in out)
    with pytest.raises(ValueError, match="max_len"):
        sampler.sample([[1] * 60], [0], SampleSettings(max_new_tokens=30), tok.eos_token_id, tok.pad_token_id)


# -- weights, caching, drop-in ----------------------------------------------------------------

def _perturbed(model, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """New weights (tied embeddings stay tied), as a state dict on the CPU."""
    other, g = copy.deepcopy(model).cpu(), torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other.state_dict()


def test_update_weights_equals_fresh_sampler(models, tok, prompts, tmp_path):
    model = copy.deepcopy(models["student"])
    st = SampleSettings(temperature=1.0, max_new_tokens=30)
    seeds = _seeds(len(prompts))
    sampler = NativeSampler(model, 4, MAX_LEN)
    before = _native(model, tok, prompts, seeds, st, sampler=sampler)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}

    new_state = _perturbed(models["student"])
    sampler.update_weights(new_state)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs  # same storage
    fresh_model = copy.deepcopy(models["student"])
    fresh_model.load_state_dict(new_state)
    updated = _native(model, tok, prompts, seeds, st, sampler=sampler)
    assert _ids(updated) == _ids(_native(fresh_model, tok, prompts, seeds, st, max_batch=4))
    assert _ids(updated) != _ids(before)

    fresh_model.save_pretrained(tmp_path / "next")  # a round's checkpoint dir
    sampler.update_weights(models["student"])
    assert _ids(_native(model, tok, prompts, seeds, st, sampler=sampler)) == _ids(before)
    sampler.update_weights(tmp_path / "next")
    assert _ids(_native(model, tok, prompts, seeds, st, sampler=sampler)) == _ids(updated)
    with pytest.raises(KeyError):
        sampler.update_weights({})


def test_get_sampler_and_drop_in_sample(models, tok, prompts):
    model = models["student"]
    native.clear_samplers()
    a = native.get_sampler(model, 4, MAX_LEN)
    assert native.get_sampler(model, 4, MAX_LEN) is a
    assert native.get_sampler(model, 8, MAX_LEN) is not a
    assert native.get_sampler(models["teacher"], 4, MAX_LEN) is not a
    st = SampleSettings(temperature=0.7, top_p=0.9, max_new_tokens=30, batch_size=4)
    seeds = _seeds(len(prompts))
    assert _ids(native.sample(model, prompts, seeds, st, tok.eos_token_id, tok.pad_token_id)) == \
        _ids(sample(model, prompts, seeds, st, tok.eos_token_id, tok.pad_token_id))
    native.clear_samplers()


# -- CUDA: the captured graph -----------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("st", [SampleSettings(temperature=0.0, max_new_tokens=30)] + SAMPLING,
                         ids=["greedy", "t1", "t0.7-p0.9", "k5"])
def test_graph_replay_equals_eager(demo_dirs, tok, prompts, st):
    model = load_model(demo_dirs["teacher"], dev=torch.device("cuda"))
    seeds = _seeds(len(prompts))
    eager = _native(model, tok, prompts, seeds, st, sampler=NativeSampler(model, 4, MAX_LEN, use_graph=False))
    graphed = NativeSampler(model, 4, MAX_LEN, use_graph=True)
    first = _native(model, tok, prompts, seeds, st, sampler=graphed)
    again = _native(model, tok, prompts, seeds, st, sampler=graphed)
    assert len(graphed._graphs) == 1 and len(graphed.capture_seconds) == 1  # captured once
    assert _ids(first) == _ids(eager) == _ids(again)
    for g, e in zip(first, eager):
        assert max((abs(a - b) for a, b in zip(g.logprobs, e.logprobs)), default=0.0) < 1e-4
    ref = sample(model, prompts, seeds, st, tok.eos_token_id, tok.pad_token_id)
    assert _ids(first) == _ids(ref)


@pytest.mark.gpu
@cuda
def test_graph_survives_update_weights(demo_dirs, models, tok, prompts):
    model = load_model(demo_dirs["student"], dev=torch.device("cuda"))
    st, seeds = SampleSettings(temperature=1.0, max_new_tokens=30), _seeds(len(prompts))
    graphed = NativeSampler(model, 4, MAX_LEN, use_graph=True)
    _native(model, tok, prompts, seeds, st, sampler=graphed)  # capture on the old weights
    new_state = _perturbed(models["student"])
    graphed.update_weights(new_state)
    fresh = load_model(demo_dirs["student"], dev=torch.device("cuda"))
    fresh.load_state_dict(new_state)
    expected = _native(fresh, tok, prompts, seeds, st, sampler=NativeSampler(fresh, 4, MAX_LEN, use_graph=False))
    assert _ids(_native(model, tok, prompts, seeds, st, sampler=graphed)) == _ids(expected)
    assert len(graphed._graphs) == 1

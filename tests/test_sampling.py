"""The transformers backend's sampler: seeded per sequence, batch-invariant, honest logprobs."""
from __future__ import annotations

import pytest
import torch

from opdflow.infra.models.lm import SampleSettings, batch_response_logits, sample, sampling_logprobs, uniform_noise


@pytest.fixture(scope="module")
def model_and_tok():
    from transformers import LlamaConfig, LlamaForCausalLM
    from opdflow.infra.testbeds.demo import build_tokenizer
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


def _prompts(tok):
    texts = ["12+34=\n", "5+678=\n", "999+1=\n", "3+4=\n", "100+250=\n"]
    return [tok(t)["input_ids"] for t in texts]


def test_noise_is_a_pure_function():
    s = torch.tensor([1, 2, 3])
    a = uniform_noise(s, 5, 50, torch.device("cpu"))
    b = uniform_noise(s[[2, 0, 1]], 5, 50, torch.device("cpu"))
    assert torch.equal(a[[2, 0, 1]], b)
    assert 0 < a.min() and a.max() < 1 and not torch.equal(a[0], a[1])
    assert abs(a.mean().item() - 0.5) < 0.05


def test_seeded_and_batch_invariant(model_and_tok):
    model, tok = model_and_tok
    prompts, seeds = _prompts(tok), [11, 22, 33, 44, 55]
    st = SampleSettings(temperature=1.0, max_new_tokens=20, batch_size=5)
    full = sample(model, prompts, seeds, st, tok.eos_token_id, tok.pad_token_id)
    again = sample(model, prompts, seeds, st, tok.eos_token_id, tok.pad_token_id)
    split = sample(model, prompts[3:] + prompts[:3], seeds[3:] + seeds[:3],
                   SampleSettings(temperature=1.0, max_new_tokens=20, batch_size=2), tok.eos_token_id, tok.pad_token_id)
    split = split[2:] + split[:2]
    assert [s.response_ids for s in full] == [s.response_ids for s in again]
    assert [s.response_ids for s in full] == [s.response_ids for s in split]
    other = sample(model, prompts, [s + 1 for s in seeds], st, tok.eos_token_id, tok.pad_token_id)
    assert [s.response_ids for s in full] != [s.response_ids for s in other]


def test_logprobs_match_teacher_forced_forward(model_and_tok):
    model, tok = model_and_tok
    prompts = _prompts(tok)
    out = sample(model, prompts, [1, 2, 3, 4, 5], SampleSettings(max_new_tokens=16, batch_size=5),
                 tok.eos_token_id, tok.pad_token_id)
    with torch.no_grad():
        logits = batch_response_logits(model, prompts, [s.response_ids for s in out], tok.pad_token_id, torch.device("cpu"))
    lp = torch.log_softmax(logits.float(), -1)
    toks = torch.tensor([t for s in out for t in s.response_ids])
    ref = lp.gather(-1, toks[:, None]).squeeze(-1)
    got = torch.tensor([x for s in out for x in s.logprobs])
    assert (ref - got).abs().max().item() < 1e-4


def test_greedy_matches_generate(model_and_tok):
    model, tok = model_and_tok
    prompts = _prompts(tok)
    out = sample(model, prompts, [0] * 5, SampleSettings(temperature=0.0, max_new_tokens=12, batch_size=5),
                 tok.eos_token_id, tok.pad_token_id)
    for p, s in zip(prompts, out):
        gen = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert s.response_ids == gen[:len(s.response_ids)]
        if s.finish_reason == "length":
            assert len(s.response_ids) == 12


def test_top_p_keeps_smallest_prefix():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    lp = sampling_logprobs(logits, 1.0, 0.75)
    assert torch.isinf(lp[0, 2:]).all()
    assert torch.allclose(lp[0, :2].exp(), torch.tensor([0.625, 0.375]))

"""Which positions a bypassed token zeroes: `ablation.position` target (the paper's equation)
vs input (the reference code), on a hand-built sequence."""
from __future__ import annotations

import math

import torch

from opdflow.tasks.train_worker import bypass_weights, loss_step, zeroed_ids

PROMPT = [1, 4, 5]          # ... the last prompt id (5) is the input of response position 0
RESPONSE = [6, 7, 2, 7, 8]  # rock id 7 is generated at positions 1 and 3


def test_target_zeroes_where_the_generated_token_is_the_rock():
    assert zeroed_ids(PROMPT, RESPONSE, "target") == [6, 7, 2, 7, 8]
    w = bypass_weights([{"prompt_ids": PROMPT, "response_ids": RESPONSE}], frozenset({7}), "target")
    assert w == [1.0, 0.0, 1.0, 0.0, 1.0]  # positions 1 and 3


def test_input_zeroes_one_position_later_where_the_input_id_is_the_rock():
    assert zeroed_ids(PROMPT, RESPONSE, "input") == [5, 6, 7, 2, 7]
    w = bypass_weights([{"prompt_ids": PROMPT, "response_ids": RESPONSE}], frozenset({7}), "input")
    assert w == [1.0, 1.0, 0.0, 1.0, 0.0]  # positions 2 and 4: the tokens generated right after a 7
    # a rock as the prompt's last id zeroes response position 0 under `input` only
    rows = [{"prompt_ids": PROMPT, "response_ids": RESPONSE}]
    assert bypass_weights(rows, frozenset({5}), "input") == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert bypass_weights(rows, frozenset({5}), "target") == [1.0] * 5
    # a rock generated last (EOS-like) has no later position to zero under `input`
    assert bypass_weights(rows, frozenset({8}), "input") == [1.0] * 5


def test_loss_step_uses_the_convention():
    from transformers import LlamaConfig, LlamaForCausalLM
    from opdflow.kernels import DistillationLoss
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=32))
    rows = [{"prompt_ids": PROMPT, "response_ids": RESPONSE, "topk_ids": [list(range(11))] * 5,
             "topk_logprobs": [[-math.log(11)] * 11] * 5}]
    loss_fn = DistillationLoss(kind="reverse_kl", backend="reference")
    loss_t, per_t, w_target, _ = loss_step(model, loss_fn, rows, frozenset({7}), 0, position="target")
    loss_i, per_i, w_input, _ = loss_step(model, loss_fn, rows, frozenset({7}), 0, position="input")
    assert w_target.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0] and w_input.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]
    # the same per-position divergences; the mean over all 5 positions keeps only the weighted ones
    assert torch.allclose(per_t, per_i)
    assert torch.allclose(loss_t, (per_t * w_target).sum() / 5) and torch.allclose(loss_i, (per_i * w_input).sum() / 5)
    assert not torch.allclose(loss_t, loss_i)

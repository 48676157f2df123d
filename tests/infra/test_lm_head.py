"""The fused-lm_head path's inputs: what the lm_head receives, and the check that its output
is the model's logits (real transformers models, random tiny weights)."""
import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from opdflow.infra.models.lm import batch_response_hidden, batch_response_logits, check_head_is_logits

SMALL = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=8)


def llama(tie: bool):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tie)).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_hidden_through_the_head_is_the_logits(tie):
    model = llama(tie)
    prompts, responses = [[3, 4], [5]], [[6, 7, 8], [9, 10]]
    logits = batch_response_logits(model, prompts, responses, 0, "cpu")
    hidden, head = batch_response_hidden(model, prompts, responses, 0, "cpu")
    assert hidden.shape == (5, 16) and head is model.get_output_embeddings()  # the head is put back
    torch.testing.assert_close(head(hidden), logits)
    check_head_is_logits(model)


def test_post_processed_logits_are_refused():
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(**SMALL, final_logit_softcapping=0.5)).eval()
    with pytest.raises(ValueError, match="train.fused_lm_head: Gemma2ForCausalLM's logits are not"):
        check_head_is_logits(model)

"""Chunked teacher scoring (`infra.models.scoring.teacher_scores`) against the full-logits `score_table`."""
from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from opdflow.infra.testbeds import demo
from opdflow.infra.models.lm import SampleSettings, load_model, load_tokenizer, response_logits, sample
from opdflow.infra.models.scoring import check_head_path, logit_transform, split_model, teacher_scores
from opdflow.tasks.score import score_table

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def rollouts(demo_dirs):
    """The student's samples on eval prompts (varied lengths), plus an empty response."""
    tok = load_tokenizer(demo_dirs["student"])
    student = load_model(demo_dirs["student"]).eval()
    prompts = [tok(e["prompt"])["input_ids"] for e in demo.make_examples("eval", 10, seed=0)]
    out = sample(student, prompts, list(range(len(prompts))), SampleSettings(max_new_tokens=24, batch_size=10),
                 tok.eos_token_id, tok.pad_token_id)
    responses = [s.response_ids for s in out]
    responses[3] = []
    assert len({len(r) for r in responses}) > 2
    return prompts, responses, tok.pad_token_id


def _table(prompts, responses) -> pa.Table:
    n = len(prompts)
    return pa.table({"prompt_id": list(range(n)), "sample_idx": [0] * n, "prompt_ids": prompts,
                     "response_ids": responses})


def _assert_same(got, ref: pa.Table, tol: float = 1e-5) -> None:
    assert len(got) == ref.num_rows
    want = zip(ref["teacher_logprobs"].to_pylist(), ref["topk_ids"].to_pylist(), ref["topk_logprobs"].to_pylist(),
               ref["teacher_tail_logmass"].to_pylist())
    for (lp, ids, tlp, tail), (want_lp, want_ids, want_tlp, want_tail) in zip(got, want):
        assert len(lp) == len(want_lp) == len(tail) == len(want_tail)
        assert torch.allclose(torch.tensor(lp), torch.tensor(want_lp), atol=tol, rtol=0)
        assert ids == want_ids
        assert torch.allclose(torch.tensor(tlp).reshape(-1), torch.tensor(want_tlp).reshape(-1), atol=tol, rtol=0)
        # the tail log-mass (-inf when the top-k covers the vocabulary); float32-stored in the table
        assert torch.allclose(torch.tensor(tail), torch.tensor(want_tail), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 100_000])
@pytest.mark.parametrize("top_k", [5, 1000])
def test_equals_score_table_on_the_demo_teacher(demo_dirs, rollouts, chunk_tokens, top_k):
    prompts, responses, pad_id = rollouts
    teacher = load_model(demo_dirs["teacher"]).eval()
    ref = score_table(teacher, pad_id, _table(prompts, responses), top_k, 4, lambda f, m: None)
    seen = []
    got = teacher_scores(teacher, prompts, responses, pad_id, top_k, batch_size=4, chunk_tokens=chunk_tokens,
                         progress=lambda f, m: seen.append(f))
    _assert_same(got, ref)
    assert got[3] == ([], [], [], [])
    assert len(got[0][1][0]) == min(top_k, teacher.config.vocab_size)
    assert seen[-1] == 1.0 and seen == sorted(seen)


def test_batch_size_does_not_change_results(demo_dirs, rollouts):
    prompts, responses, pad_id = rollouts
    teacher = load_model(demo_dirs["teacher"]).eval()
    a = teacher_scores(teacher, prompts, responses, pad_id, 8, batch_size=1, chunk_tokens=5)
    b = teacher_scores(teacher, prompts, responses, pad_id, 8, batch_size=10, chunk_tokens=64)
    for (lp_a, ids_a, *_), (lp_b, ids_b, *_) in zip(a, b):
        assert torch.allclose(torch.tensor(lp_a), torch.tensor(lp_b), atol=1e-5) and ids_a == ids_b


def test_edge_inputs(demo_dirs):
    teacher = load_model(demo_dirs["teacher"]).eval()
    assert teacher_scores(teacher, [], [], 0, 5, 4) == []
    assert teacher_scores(teacher, [[1, 2]], [[]], 0, 5, 4) == [([], [], [], [])]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        teacher_scores(teacher, [[1], [2]], [[3]], 0, 5, 4)
    with pytest.raises(ValueError, match="at least 1"):
        teacher_scores(teacher, [[1]], [[3]], 0, 5, 4, chunk_tokens=0)


def _qwen2(vocab: int = 32000):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    return Qwen2ForCausalLM(cfg).eval()


def test_peak_logits_never_exceed_chunk_rows():
    """Every LM-head call (the forward check included) yields at most chunk_tokens x V logits."""
    model = _qwen2()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 12, 3, 9, 20)]
    responses = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (17, 4, 30, 11, 25)]
    n_tokens = sum(len(r) for r in responses)
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: calls.append((out.shape[:-1].numel(), out.shape[-1])))
    try:
        got = teacher_scores(model, prompts, responses, pad_id=0, top_k=20, batch_size=2, chunk_tokens=8)
    finally:
        hook.remove()
    chunk = 8
    assert max(rows for rows, _ in calls) <= chunk
    assert all(v == vocab for _, v in calls)
    # the forward check calls the head twice (model forward, head path) on min(16, chunk) rows;
    # then every response token's row goes through the head exactly once, in chunks
    assert [rows for rows, _ in calls[:2]] == [chunk, chunk]
    assert sum(rows for rows, _ in calls[2:]) == n_tokens and len(calls) - 2 >= -(-n_tokens // chunk)
    ref = score_table(model, 0, _table(prompts, responses), 20, 2, lambda f, m: None)
    _assert_same(got, ref)


def test_split_model_finds_base_and_head():
    model = _qwen2(vocab=64)
    base, head = split_model(model)
    assert base is model.model and head is model.lm_head


def test_granite_logits_scaling_and_gemma2_softcap():
    """Archs that transform logits after the head: the transform is applied and matches score_table."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM
    small = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    models = [GraniteForCausalLM(GraniteConfig(logits_scaling=0.25, **small)),
              Gemma2ForCausalLM(Gemma2Config(final_logit_softcapping=0.05, head_dim=16, **small))]
    prompts, responses = [[1, 2, 3], [4, 5]], [[6, 7, 8, 9], [10, 11, 12]]
    for model in models:
        model.eval()
        x = torch.linspace(-1, 1, 5)
        assert not torch.allclose(logit_transform(model)(x), x)
        ref = score_table(model, 0, _table(prompts, responses), 10, 2, lambda f, m: None)
        _assert_same(teacher_scores(model, prompts, responses, 0, 10, 2, chunk_tokens=3), ref)


def test_unknown_logit_transform_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    torch.manual_seed(0)
    model = Scaled(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, max_position_embeddings=64)).eval()
    base, head = split_model(model)
    with pytest.raises(ValueError, match="does not reproduce the model's logits"):
        check_head_path(model, base, head, logit_transform(model), [1, 2, 3, 4], 16)
    with pytest.raises(ValueError, match="score_table"):
        teacher_scores(model, [[1, 2]], [[3, 4]], 0, 5, 2)


def test_tail_log_mass_is_the_mass_outside_the_topk():
    """The stored tail equals log(sum of the teacher's probabilities outside its top-k),
    computed in float64 from the same logits."""
    model = _qwen2(vocab=300)
    prompts, responses = [[1, 2, 3], [4, 5]], [[6, 7, 8, 9], [10, 11, 12]]
    got = teacher_scores(model, prompts, responses, 0, 7, 2)
    logits = torch.cat([x for _, x, _ in response_logits(model, prompts, responses, 0, 2)]).double()
    p = torch.softmax(logits, -1)
    ids = torch.tensor([row for s in got for row in s[1]])
    want = torch.log(1 - p.gather(-1, ids).sum(-1))
    torch.testing.assert_close(torch.tensor([x for s in got for x in s[3]]).double(), want, atol=1e-5, rtol=1e-5)


def test_padded_teacher_topk_is_within_the_tokenizer():
    """A teacher whose lm_head has rows beyond the tokenizer (as Qwen pads 151,665 tokens to
    151,936 rows): with `vocab`, no padded id is in the top-k and the log-probs are over the
    real vocabulary; a response token beyond it is refused."""
    model = _qwen2(vocab=64)
    with torch.no_grad():  # make the padded rows the teacher's favourites
        model.lm_head.weight[50:] = model.lm_head.weight[:14] * 50
    prompts, responses = [[1, 2, 3], [4, 5]], [[6, 7, 8, 9], [10, 11, 12]]
    unmasked = teacher_scores(model, prompts, responses, 0, 10, 2)
    assert any(i >= 50 for s in unmasked for row in s[1] for i in row)  # the test can fail
    got = teacher_scores(model, prompts, responses, 0, 10, 2, vocab=50)
    assert all(i < 50 for s in got for row in s[1] for i in row)
    ref = score_table(model, 0, _table(prompts, responses), 10, 2, lambda f, m: None, vocab=50)
    _assert_same(got, ref)
    with pytest.raises(ValueError, match="beyond the vocabulary"):
        teacher_scores(model, [[1]], [[55]], 0, 10, 2, vocab=50)

"""`tasks.rock.measure.measure` computes the rock analysis chunk by chunk (model bodies to hidden
states, lm_heads applied `chunk_tokens` positions at a time) so its memory does not grow with
the batch or the sequence length. Here it is checked against a plain whole-batch float64
recomputation from the models' own logits, with a padded vocabulary whose padded rows are made
"hot" (they would win every argmax and carry most of the softmax mass if they were not cut),
for chunk sizes that do and do not divide the token count."""
from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opdflow.tasks.rock.measure import measure

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REAL, ROWS, PAD = 40, 64, 0


def _model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=ROWS, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD,
                      tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight[REAL:] = m.lm_head.weight[REAL:].sign() * 5.0  # hot padded rows
    return m


def _table(seed: int) -> pa.Table:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, REAL, (n,), generator=g).tolist() for n in (3, 5, 2, 4, 6)]
    responses = [torch.randint(1, REAL, (n,), generator=g).tolist() for n in (4, 7, 1, 5, 6)]
    return pa.table({"prompt_ids": prompts, "response_ids": responses})


def _expected(student, teacher, table, counts, refs):
    """The old whole-batch computation in float64: full logits, cut, reverse KL and its gradient."""
    out = {k: [] for k in ("kl", "grad_norm", "student_top1", "teacher_top1", *(f"cos_{n}" for n in refs))}
    sums = {"freq_weighted": torch.zeros(REAL, dtype=torch.float64),
            "freq_balanced": torch.zeros(REAL, dtype=torch.float64)}
    for p, r in zip(table["prompt_ids"].to_pylist(), table["response_ids"].to_pylist()):
        ids = torch.tensor([p + r])
        at = slice(len(p) - 1, len(p) - 1 + len(r))
        s = student(input_ids=ids).logits[0, at, :REAL].double()
        t = teacher(input_ids=ids).logits[0, at, :REAL].double()
        ls, lt = s.log_softmax(-1), t.log_softmax(-1)
        ps = ls.exp()
        kl = (ps * (ls - lt)).sum(-1)
        grad = ps * ((ls - lt) - kl[:, None])  # d KL(p_s || p_t) / d student logits
        gnorm = grad.norm(dim=-1)
        w = 1.0 / counts.double()[torch.tensor(r)]
        sums["freq_weighted"] += grad.sum(0)
        sums["freq_balanced"] += (w[:, None] * grad).sum(0)
        for n, ref in refs.items():
            out[f"cos_{n}"] += ((grad @ ref.double()) / (gnorm * ref.double().norm())).tolist()
        out["kl"] += kl.tolist()
        out["grad_norm"] += gnorm.tolist()
        out["student_top1"] += s.argmax(-1).tolist()
        out["teacher_top1"] += t.argmax(-1).tolist()
    return out, sums


@pytest.mark.parametrize("chunk_tokens,batch_size", [(1, 5), (4, 2), (7, 3), (23, 5), (1000, 1)])
def test_chunked_measure_equals_whole_batch_float64(chunk_tokens, batch_size):
    student, teacher, table = _model(0), _model(1), _table(2)
    n_tok = sum(len(r) for r in table["response_ids"].to_pylist())
    assert n_tok == 23  # chunk sizes 4 and 7 do not divide it, 1 and 23 do
    toks = torch.tensor([t for r in table["response_ids"].to_pylist() for t in r])
    counts = torch.bincount(toks, minlength=REAL)
    counts[counts == 0] = 1
    g = torch.Generator().manual_seed(3)
    refs = {"freq_weighted": torch.randn(REAL, generator=g, dtype=torch.float64),
            "freq_balanced": torch.randn(REAL, generator=g, dtype=torch.float64)}
    with torch.no_grad():
        want, want_sums = _expected(student, teacher, table, counts, refs)
    got, sums = measure(student, teacher, PAD, table, batch_size, counts, refs=refs, vocab=REAL,
                        chunk_tokens=chunk_tokens)
    assert set(got) == set(want) and set(sums) == set(want_sums)
    for k in ("student_top1", "teacher_top1"):
        assert got[k] == want[k]
        assert max(got[k]) < REAL  # no padded row is anyone's top-1
    for k in ("kl", "grad_norm", "cos_freq_weighted", "cos_freq_balanced"):
        assert len(got[k]) == n_tok
        torch.testing.assert_close(torch.tensor(got[k], dtype=torch.float64), torch.tensor(want[k], dtype=torch.float64),
                                   rtol=1e-4, atol=1e-6)
    for k, v in sums.items():
        assert v.dtype == torch.float64 and v.shape == (REAL,)
        torch.testing.assert_close(v, want_sums[k], rtol=1e-4, atol=1e-6)
    assert torch.tensor(got["kl"]).min() > 0  # two different models: a real divergence is measured


def test_uncut_padded_rows_would_change_the_result():
    """The control: without `vocab`, the hot padded rows enter the softmax and the top-1s."""
    student, teacher, table = _model(0), _model(1), _table(2)
    counts = torch.ones(ROWS, dtype=torch.long)
    cut, _ = measure(student, teacher, PAD, table, 5, counts, vocab=REAL, chunk_tokens=4)
    uncut, _ = measure(student, teacher, PAD, table, 5, counts, vocab=None, chunk_tokens=4)
    assert max(uncut["student_top1"]) >= REAL and max(cut["student_top1"]) < REAL
    assert cut["kl"] != uncut["kl"]


def test_a_padded_token_in_the_probe_is_refused():
    student, teacher = _model(0), _model(1)
    table = pa.table({"prompt_ids": [[1, 2]], "response_ids": [[3, REAL + 1]]})
    with pytest.raises(ValueError, match=r"token id 41 is beyond the vocabulary \(40 ids\)"):
        measure(student, teacher, PAD, table, 1, torch.ones(ROWS, dtype=torch.long), vocab=REAL)

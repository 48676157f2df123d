"""The teacher signals (`scoring.signal`): each is stored by the scoring stage and trained on.

`sampled` keeps only the teacher's log-prob of the student's own token and trains on the
per-token reverse-KL estimate k1 as an advantage (`kernels.loss.sampled_token_loss`); its loss
and gradient are checked against their closed form on a hand-built table. `hidden` keeps the
teacher's final hidden states and rebuilds its logits with the teacher's lm_head inside the
loss (`kernels.fused_linear`); its loss and gradients are checked against the dense
full-vocabulary loss in float64. Every signal goes models -> prompts -> rollout -> score ->
train for one round on the tiny config; for `hidden` the first step's logged loss is checked
against the dense loss of the two models' materialised logits.
"""
from __future__ import annotations

import pytest
import torch

from opdflow.infra.config import parse_config
from opdflow.kernels.loss import sampled_token_loss


def test_sampled_loss_and_gradient_equal_the_closed_form():
    """Student logits [N, V] by hand, teacher log-probs of the sampled tokens by hand: loss =
    sum_i w_i k1_i / N with k1 = lp_s - lp_t, and d loss / d logits_i = w_i k1_i (onehot - p_i) / N
    (the policy-gradient surrogate with the detached advantage -k1)."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 0.0, 3.0, -2.0], [1.0, -1.0, 0.0, 0.5]],
                          dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([0, 3, 1])
    teacher = torch.tensor([-0.1, -4.0, -4.0], dtype=torch.float64)
    weights = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)  # a bypassed token and a doubled one
    lp = logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    loss, per_token = sampled_token_loss(lp, teacher, weights=weights)
    loss.backward()

    with torch.no_grad():
        p = logits.softmax(-1)
        lp_s = p.log().gather(-1, tokens[:, None]).squeeze(-1)
        k1 = lp_s - teacher
        onehot = torch.nn.functional.one_hot(tokens, 4).double()
        want_grad = (weights * k1 / 3)[:, None] * (onehot - p)
    assert per_token.double().tolist() == pytest.approx(k1.tolist(), abs=1e-6)
    assert float(loss.detach()) == pytest.approx(float((weights * k1).sum() / 3), abs=1e-6)
    assert torch.allclose(logits.grad, want_grad, atol=1e-6)
    assert k1[0] < 0 and k1[2] > 0  # both signs occur: the table exercises pushing down and up


def test_sampled_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same 1-d shape"):
        sampled_token_loss(torch.zeros(3), torch.zeros(2))


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_hidden_loss_and_gradient_equal_the_dense_loss(kind):
    """Student hidden [N, Hs] and lm_head [V, Hs] + bias, teacher hidden [N, Ht] and lm_head
    [V, Ht] + bias, Ht != Hs, by hand in float64: the fused loss with the teacher as hidden
    states (chunks of 2 rows, so several chunks and a short last one) equals the reference
    divergence of the materialised logits, loss and gradients wrt hidden, weight and bias."""
    from opdflow.kernels import reference
    from opdflow.kernels.fused_linear import fused_linear_distillation_loss

    g = torch.Generator().manual_seed(0)
    n, hs, ht, v = 5, 3, 4, 6
    h = torch.randn(n, hs, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, hs, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    th = torch.randn(n, ht, generator=g, dtype=torch.float64) * 2
    tw = torch.randn(v, ht, generator=g, dtype=torch.float64)
    tb = torch.randn(v, generator=g, dtype=torch.float64)
    weights = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    mask = torch.tensor([True, True, True, False, True])

    loss, per_token = fused_linear_distillation_loss(h, w, b, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb,
                                                     mask=mask, weights=weights, kind=kind, chunk_size=2,
                                                     backend="reference")
    loss.backward()
    got = (h.grad.clone(), w.grad.clone(), b.grad.clone())
    for x in (h, w, b):
        x.grad = None
    dense = reference.per_token_divergence(h @ w.T + b, teacher_logits=th @ tw.T + tb, kind=kind)
    keep = mask.double()
    want_loss = (dense * weights * keep).sum() / keep.sum()
    want_loss.backward()
    assert float(loss.detach()) == pytest.approx(float(want_loss), rel=1e-12, abs=1e-12)
    assert torch.allclose(per_token[mask], dense.detach()[mask], rtol=1e-12, atol=1e-12)
    for a, e in zip(got, (h.grad, w.grad, b.grad)):
        assert torch.allclose(a, e, rtol=1e-10, atol=1e-12)
    assert float(want_loss) > 1e-3 and float(h.grad.abs().max()) > 1e-3  # not a trivially zero case


def test_hidden_bytes_round_trip_and_refusals():
    from opdflow.infra.models.scoring import hidden_bytes, hidden_from_bytes
    x = torch.randn(3, 4).to(torch.bfloat16)
    y = torch.randn(2, 4).to(torch.bfloat16)
    blobs = [hidden_bytes(x), hidden_bytes(y), hidden_bytes(torch.zeros(0, 4, dtype=torch.bfloat16))]
    assert [len(bl) for bl in blobs] == [3 * 4 * 2, 2 * 4 * 2, 0]
    assert torch.equal(hidden_from_bytes(blobs, "bfloat16", 4), torch.cat([x, y]))
    with pytest.raises(ValueError, match="not whole rows of 3 bfloat16"):
        hidden_from_bytes(blobs, "bfloat16", 3)
    with pytest.raises(ValueError, match="no torch dtype"):
        hidden_from_bytes(blobs, "nonsense", 4)


def test_signal_config():
    assert parse_config({}).scoring.signal == "topk"
    assert parse_config({"scoring": {"signal": "sampled"}}).scoring.signal == "sampled"
    assert parse_config({"scoring": {"signal": "hidden"}, "train": {"loss": {"kind": "jsd"}}}).scoring.signal == "hidden"
    with pytest.raises(ValueError, match="scoring.signal: hidden .* scoring.backend 'vllm'"):
        parse_config({"scoring": {"signal": "hidden", "backend": "vllm"}})
    with pytest.raises(ValueError, match="scoring.signal: sampled .* train.loss.kind 'forward_kl'"):
        parse_config({"scoring": {"signal": "sampled"}, "train": {"loss": {"kind": "forward_kl"}}})
    with pytest.raises(ValueError, match="signal"):
        parse_config({"scoring": {"signal": "logits"}})


@pytest.mark.parametrize("signal", ["sampled", "topk", "hidden"])
def test_signal_end_to_end(tmp_path, tiny_config, signal):
    """One round through the real stages on a local store: the scores hold the signal's
    columns only, training ran on them and moved the student's weights. ~10 s per signal on 2
    cores once the tiny demo models are in the machine cache (`tasks.models`; shared with
    tests/tasks/test_stages.py); the first build of that cache takes ~2 min. For `hidden`, the
    first step's loss is also recomputed densely (`check_hidden_first_step`)."""
    from safetensors.torch import load

    from opdflow.infra.artifacts.manifest import Run
    from opdflow.infra.artifacts.store import open_store
    from opdflow.tasks.plan import stage_of
    from opdflow.tasks.score import HIDDEN_COLUMNS, SAMPLED_COLUMNS
    from opdflow.tasks.shards import read_parts

    config = parse_config({**tiny_config.model_dump(mode="json"),
                           "scoring": {**tiny_config.section("scoring"), "signal": signal},
                           "ablation": {**tiny_config.section("ablation"), "enabled": False},
                           "train": {**tiny_config.section("train"), "rounds": 1}})
    run = Run.create_or_open(open_store(str(tmp_path / "store")), f"sig-{signal}", config)
    for stage in ("models", "prompts", "rollout.r01", "score.r01", "train.r01"):
        stage_of(stage).run(run, stage)
    scores = read_parts(run, "score.r01", "scores")
    rollouts = read_parts(run, "rollout.r01", "rollouts")
    if signal == "sampled":
        assert tuple(scores.column_names) == SAMPLED_COLUMNS
    elif signal == "hidden":
        assert tuple(scores.column_names) == HIDDEN_COLUMNS
        b = run.require("score.r01")["backend"]
        assert (b["hidden_dtype"], b["hidden_size"]) == ("float32", config.demo.teacher.hidden_size)
        assert [len(x) for x in scores["teacher_hidden"].to_pylist()] == [
            len(r) * b["hidden_size"] * 4 for r in rollouts["response_ids"].to_pylist()]
    else:
        assert {"topk_ids", "topk_logprobs", "teacher_tail_logmass"} <= set(scores.column_names)
    assert [len(x) for x in scores["teacher_logprobs"].to_pylist()] == [len(x) for x in rollouts["response_ids"].to_pylist()]
    assert run.require("score.r01")["backend"]["signal"] == signal

    e = run.require("train.r01")
    assert e["metrics"]["steps"] == config.train.steps_per_round
    assert e["metrics"]["tokens_trained"] == sum(len(x) for x in rollouts["response_ids"].to_pylist())
    before = load(run.read_output("models", "student/model.safetensors"))
    after = load(run.read_output("train.r01", "model/model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if signal == "sampled":  # the logged loss is the k1 estimate, whose mean at step 1 is the scoring stage's
        k1 = run.require("score.r01")["metrics"]["sampled_reverse_kl_k1"]
        assert abs(e["metrics"]["losses"][0] - k1) < 1.0
    if signal == "hidden":
        check_hidden_first_step(run, config, e["metrics"]["losses"][0])


def check_hidden_first_step(run, config, logged: float) -> None:
    """The hidden signal's first training step, three ways on the same batch: the train
    stage's logged loss, `train_worker.loss_step` with the fused and the unfused loss on the
    committed rows, and the dense reverse KL of the student's and the teacher's materialised
    logits (both models' own forwards, float64 loss)."""
    from opdflow.infra.models.lm import batch_response_logits, derive_seed, load_model, load_tokenizer, real_head, real_logits
    from opdflow.kernels import DistillationLoss, FusedLinearDistillationLoss
    from opdflow.kernels.loss import distillation_loss
    from opdflow.tasks.train import round_rows
    from opdflow.tasks.train_worker import loss_step, step_batches

    rows = round_rows(run, "rollout.r01", "score.r01").to_pylist()
    first = step_batches(len(rows), config.train.steps_per_round, config.train.batch_size,
                         derive_seed(config.seed, "train-order", 1))[0]
    batch = [rows[i] for i in first]
    cpu = torch.device("cpu")
    tdir, sdir = run.materialize("models", "teacher"), run.materialize("models", "student")
    tok = load_tokenizer(sdir)
    vocab, pad = len(tok), tok.pad_token_id
    student, teacher = load_model(sdir, "float32", cpu), load_model(tdir, "float32", cpu)
    prompts, responses = [r["prompt_ids"] for r in batch], [r["response_ids"] for r in batch]
    with torch.no_grad():
        s_logits = real_logits(batch_response_logits(student, prompts, responses, pad, cpu), vocab).double()
        t_logits = real_logits(batch_response_logits(teacher, prompts, responses, pad, cpu), vocab).double()
    dense = float(distillation_loss(s_logits, teacher_logits=t_logits, kind="reverse_kl", backend="reference")[0])
    w, b = real_head(teacher.get_output_embeddings(), vocab)
    head = {"weight": w.detach(), "bias": None if b is None else b.detach(), "dtype": "float32",
            "size": int(w.shape[1])}
    got = {}
    for name, fn in (("fused", FusedLinearDistillationLoss(backend="reference")),
                     ("unfused", DistillationLoss(backend="reference"))):
        loss, per_token, _, _ = loss_step(student, fn, batch, frozenset(), pad, vocab=vocab, teacher_head=head)
        got[name] = float(loss.detach())
    assert dense > 1e-3  # the student is not the teacher: a loss that could be 0 by accident is no check
    assert logged == pytest.approx(dense, abs=2e-5)  # logged rounded to 5 digits, computed in float32
    assert got["fused"] == pytest.approx(dense, rel=1e-5) and got["unfused"] == pytest.approx(dense, rel=1e-5)
    with pytest.raises(ValueError, match="no teacher lm_head"):
        loss_step(student, DistillationLoss(backend="reference"), batch, frozenset(), pad, vocab=vocab)

"""The teacher signals (`scoring.signal`): each is stored by the scoring stage and trained on.

`sampled` keeps only the teacher's log-prob of the student's own token and trains on the
per-token reverse-KL estimate k1 as an advantage (`kernels.loss.sampled_token_loss`); its loss
and gradient are checked against their closed form on a hand-built table, and both signals go
models -> prompts -> rollout -> score -> train for one round on the tiny config.
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


def test_signal_config():
    assert parse_config({}).scoring.signal == "topk"
    assert parse_config({"scoring": {"signal": "sampled"}}).scoring.signal == "sampled"
    with pytest.raises(ValueError, match="scoring.signal: sampled .* train.loss.kind 'forward_kl'"):
        parse_config({"scoring": {"signal": "sampled"}, "train": {"loss": {"kind": "forward_kl"}}})
    with pytest.raises(ValueError, match="signal"):
        parse_config({"scoring": {"signal": "logits"}})


@pytest.mark.parametrize("signal", ["sampled", "topk"])
def test_signal_end_to_end(tmp_path, tiny_config, signal):
    """One round through the real stages on a local store: the scores hold the signal's
    columns only, training ran on them and moved the student's weights. ~10 s per signal on 2
    cores once the tiny demo models are in the machine cache (`tasks.models`; shared with
    tests/tasks/test_stages.py); the first build of that cache takes ~2 min."""
    from safetensors.torch import load

    from opdflow.infra.manifest import Run
    from opdflow.infra.store import open_store
    from opdflow.tasks.plan import stage_of
    from opdflow.tasks.score import SAMPLED_COLUMNS
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

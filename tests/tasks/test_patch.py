"""Inference-time patching (tasks/patch.py): the decoding rule, checked against its two limits."""
from __future__ import annotations

import pytest
import torch

from opdflow.infra import demo
from opdflow.infra.lm import SampleSettings, load_model, load_tokenizer, sample
from opdflow.tasks.patch import arm_summary, is_correct, patched_greedy  # is_correct: opdflow.evals.answers


@pytest.fixture(scope="module")
def pair(demo_dirs):
    dirs = demo_dirs
    tok = load_tokenizer(dirs["student"])
    prompts = [tok(e["prompt"])["input_ids"]
               for e in demo.make_examples("eval", 6, seed=3)]
    return load_model(dirs["student"]).eval(), load_model(dirs["teacher"]).eval(), tok, prompts


def _greedy(model, tok, prompts, n):
    st = SampleSettings(temperature=0.0, max_new_tokens=n, batch_size=len(prompts))
    return [s.response_ids for s in sample(model, prompts, [0] * len(prompts), st, tok.eos_token_id, tok.pad_token_id)]


def test_no_patch_is_the_student_and_patching_everything_is_the_teacher(pair):
    student, teacher, tok, prompts = pair
    none, n_none = patched_greedy(student, teacher, prompts, set(), 24, tok.eos_token_id, tok.pad_token_id)
    assert none == _greedy(student, tok, prompts, 24) and n_none == [0] * len(prompts)
    everything, n_all = patched_greedy(student, teacher, prompts, set(range(len(tok))), 24, tok.eos_token_id,
                                       tok.pad_token_id)
    assert everything == _greedy(teacher, tok, prompts, 24)
    assert n_all == [len(r) for r in everything]  # every emitted token was the teacher's


def test_patching_one_token_swaps_exactly_where_the_student_would_emit_it(pair):
    student, teacher, tok, prompts = pair
    own = _greedy(student, tok, prompts, 24)
    target = max({t for r in own for t in r}, key=lambda t: sum(r.count(t) for r in own))
    got, n = patched_greedy(student, teacher, prompts, {target}, 24, tok.eos_token_id, tok.pad_token_id)
    for prompt, r_own, r_got, k in zip(prompts, own, got, n):
        first = r_own.index(target) if target in r_own else None
        if first is None:
            assert r_got == r_own and k == 0
        else:  # identical up to the first patched position; there the teacher decided
            assert r_got[:first] == r_own[:first] and k >= 1
            with torch.no_grad():
                logits = teacher(input_ids=torch.tensor([prompt + r_own[:first]])).logits[0, -1]
            assert r_got[first] == int(logits.argmax())


def test_scoring_and_summary():
    assert is_correct("12 + 30 ... answer: 42<eos>", "42", r"answer:\s*(-?\d+)")
    assert not is_correct("answer: 41", "42", r"answer:\s*(-?\d+)") and not is_correct("no answer", "42", r"answer: (\d+)")
    rows = ([{"arm": "none", "correct": c, "n_tokens": 10, "n_patched": 0} for c in [True] * 8 + [False] * 2]
            + [{"arm": "rock", "correct": c, "n_tokens": 10, "n_patched": 2} for c in [True] * 7 + [False] * 3]
            + [{"arm": "random_matched", "correct": c, "n_tokens": 10, "n_patched": 1} for c in [True] * 2 + [False] * 8])
    s = arm_summary(rows)
    assert s["none"]["accuracy"] == 0.8 and s["rock"]["patched_token_share"] == 0.2
    assert s["rock"]["delta"] == pytest.approx(-0.1) and not s["rock"]["significant"]
    assert s["random_matched"]["delta"] == pytest.approx(-0.6) and s["random_matched"]["significant"]

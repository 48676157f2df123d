"""Inference-time interventions (tasks/patch.py): the patching and knockout decoding rules, checked
against their limits on the tiny demo pair, and the paired summaries on stub tables whose answer is
known (McNemar's counts and p-values worked by hand)."""
from __future__ import annotations

import pytest
import torch

from opdflow.infra.testbeds import demo
from opdflow.infra.models.lm import SampleSettings, load_model, load_tokenizer, sample
from opdflow.tasks.patch import (arm_summary, intervened_greedy, is_correct, knockout_arms, knockout_summary,
                                 patched_greedy, share_match)  # is_correct: opdflow.evals.answers
from opdflow.tasks.stats import mcnemar


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
    everything, n_all, n_set = intervened_greedy(student, teacher, prompts, 24, tok.eos_token_id, tok.pad_token_id,
                                                 patch_ids=set(range(len(tok))))
    assert everything == _greedy(teacher, tok, prompts, 24)
    assert n_set == [len(r) for r in everything]  # every emitted token was in the set ...
    # ... but only the steps where the student would have said something else count as patched
    own_choice = []
    for prompt, r in zip(prompts, everything):
        with torch.no_grad():
            logits = student(input_ids=torch.tensor([prompt + r[:-1]])).logits[0, len(prompt) - 1:]
        own_choice.append(sum(int(a) != b for a, b in zip(logits.argmax(-1), r)))
    assert n_all == own_choice and sum(n_all) <= sum(n_set)


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


def test_knockout_never_emits_the_forbidden_token_and_is_a_no_op_on_an_absent_one(pair):
    student, _, tok, prompts = pair
    own = _greedy(student, tok, prompts, 24)
    target = max({t for r in own for t in r if t != tok.eos_token_id}, key=lambda t: sum(r.count(t) for r in own))
    got, n_sub, n_set = intervened_greedy(student, None, prompts, 24, tok.eos_token_id, tok.pad_token_id,
                                          forbid_ids={target})
    assert all(target not in r for r in got) and n_sub == n_set == [0] * len(prompts)
    for r_own, r_got in zip(own, got):  # identical up to the first time the student wanted it
        first = r_own.index(target) if target in r_own else len(r_own)
        assert r_got[:first] == r_own[:first]
    absent = next(t for t in range(len(tok)) if all(t not in r for r in own) and t != tok.eos_token_id)
    same, _, _ = intervened_greedy(student, None, prompts, 24, tok.eos_token_id, tok.pad_token_id,
                                   forbid_ids={absent})
    assert same == own


def test_share_matching_thins_substitutions(pair):
    student, teacher, tok, prompts = pair
    every = set(range(len(tok)))
    _, full, _ = intervened_greedy(student, teacher, prompts, 24, tok.eos_token_id, tok.pad_token_id, patch_ids=every)
    _, none_kept, _ = intervened_greedy(student, teacher, prompts, 24, tok.eos_token_id, tok.pad_token_id,
                                        patch_ids=every, keep_prob=0.0)
    assert sum(full) > 0 and none_kept == [0] * len(prompts)


def test_mcnemar_known_answers():
    # 10 items: A right/B wrong on 6, B right/A wrong on 1, 3 concordant. Exact: 2 * P(X <= 1), X ~ Bin(7, .5)
    a = [1] * 6 + [0] + [1, 1, 0]
    b = [0] * 6 + [1] + [1, 1, 0]
    m = mcnemar(a, b)
    assert (m["n_a_only"], m["n_b_only"], m["n"]) == (6, 1, 10)
    assert m["p_value"] == pytest.approx(2 * (1 + 7) / 2 ** 7)
    assert m["diff"] == pytest.approx(0.5) and m["ci_low"] < 0.5 < m["ci_high"]
    assert mcnemar(a, a)["p_value"] == 1.0 and mcnemar(a, a)["diff"] == 0.0
    strong = mcnemar([1] * 40 + [0] * 10, [0] * 40 + [0] * 10)  # 40 discordant, all one way
    assert strong["p_value"] < 1e-10 and strong["ci_low"] > 0.6
    with pytest.raises(ValueError, match="paired"):
        mcnemar([1, 0], [1])


def test_scoring_and_summary():
    assert is_correct("12 + 30 ... answer: 42<eos>", "42", r"answer:\s*(-?\d+)")
    assert not is_correct("answer: 41", "42", r"answer:\s*(-?\d+)") and not is_correct("no answer", "42", r"answer: (\d+)")
    # 10 prompts; rock patching breaks prompts 0-1 (paired), random breaks 0-5
    base = [True] * 8 + [False] * 2
    rock = [False, False] + [True] * 6 + [False] * 2
    rand = [False] * 6 + [True] * 2 + [False] * 2
    rows = [{"arm": arm, "prompt_id": i, "correct": c, "n_tokens": 10, "n_patched": k, "n_set": k + 1}
            for arm, cs, k in (("none", base, 0), ("rock", rock, 2), ("random", rand, 2)) for i, c in enumerate(cs)]
    s = arm_summary(rows)
    a, cmp = s["arms"], s["comparisons"]
    assert a["none"]["accuracy"] == 0.8 and a["rock"]["patched_token_share"] == 0.2
    assert a["rock"]["set_token_share"] == pytest.approx(0.3)
    assert a["none"]["ci_low"] <= 0.8 <= a["none"]["ci_high"]
    assert (cmp["rock_vs_none"]["n_a_only"], cmp["rock_vs_none"]["n_b_only"]) == (0, 2)
    assert cmp["rock_vs_none"]["p_value"] == pytest.approx(0.5)  # 2 discordant: 2 * 1/4
    assert cmp["random_vs_none"]["diff"] == pytest.approx(-0.6)
    assert cmp["random_vs_none"]["p_value"] == pytest.approx(2 / 2 ** 6)
    assert cmp["rock_vs_random"]["diff"] == pytest.approx(0.4)


def test_share_matching_never_thins_an_arm_to_nothing():
    """The demo's case: the random set's positions were never really substituted. Matching
    rock to a share of 0 would decode the unpatched student again under the name `rock`."""
    m = share_match(0.06, 0.0)
    assert m["matched_arm"] is None and m["keep_prob"] is None and "made no real substitution" in m["reason"]
    m = share_match(0.06, 0.02)
    assert m["matched_arm"] == "rock-matched" and m["keep_prob"] == pytest.approx(1 / 3)
    assert share_match(0.01, 0.04)["matched_arm"] == "random-matched"
    assert share_match(0.0, 0.0)["matched_arm"] is None
    # the matched arm is summarised and compared beside the unmatched ones
    rows = [{"arm": arm, "prompt_id": i, "correct": i < k, "n_tokens": 10, "n_patched": p, "n_set": 3}
            for arm, k, p in (("none", 8, 0), ("rock", 4, 3), ("random", 8, 1), ("rock-matched", 6, 1))
            for i in range(10)]
    s = arm_summary(rows)
    assert list(s["arms"]) == ["none", "rock", "random", "rock-matched"]
    assert s["arms"]["rock-matched"]["patched_token_share"] == pytest.approx(0.1)
    assert s["comparisons"]["rock-matched_vs_random"]["diff"] == pytest.approx(-0.2)
    assert s["comparisons"]["rock_vs_random"]["diff"] == pytest.approx(-0.4)
    assert "rock_vs_random-matched" not in s["comparisons"]


def test_knockout_arms_and_curves():
    arms = knockout_arms([10, 11, 12], [20, 21, 22, 23], n_single=2)
    assert arms == {"ko-rock-1": [10], "ko-random-1": [20], "ko-rock-2": [11], "ko-random-2": [21],
                    "ko-rock-cum-1": [10], "ko-random-cum-1": [20], "ko-rock-cum-2": [10, 11],
                    "ko-random-cum-2": [20, 21], "ko-rock-cum-3": [10, 11, 12], "ko-random-cum-3": [20, 21, 22]}
    # a stub table: knocking out more rock tokens loses one more prompt each time; random never hurts
    n = 8
    rows = [{"arm": "none", "prompt_id": i, "correct": True} for i in range(n)]
    for name in arms:
        k = int(name.rsplit("-", 1)[1])
        lost = k if "rock-cum" in name else 0
        rows += [{"arm": name, "prompt_id": i, "correct": i >= lost} for i in range(n)]
    ko = knockout_summary(rows, arms)
    cum = {(e["set"], e["k"]): e for e in ko["cumulative"]}
    assert [cum[("rock", k)]["accuracy"] for k in (1, 2, 3)] == [7 / 8, 6 / 8, 5 / 8]
    assert all(cum[("random", k)]["accuracy"] == 1.0 for k in (1, 2, 3))
    assert cum[("rock", 3)]["vs_none"]["n_b_only"] == 3 and cum[("rock", 3)]["vs_none"]["diff"] == pytest.approx(-3 / 8)
    assert {(e["set"], e["k"]) for e in ko["single"]} == {("rock", 1), ("rock", 2), ("random", 1), ("random", 2)}

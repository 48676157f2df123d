"""Tests for the embedded demo (opdflow.infra.testbeds.demo): task format, splits, tokenizer, tiny build.

Run: ``python -m pytest -q tests/test_demo.py`` (about 30 s on 2 cores; builds the tiny spec once).
"""

from __future__ import annotations

import json
import os

import pytest

from opdflow.infra.testbeds import demo

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_example_format_and_answer():
    ex = demo.format_problem(999, 999)
    assert ex["prompt"] == "999+999=\n"
    assert ex["answer"] == "1998"
    assert ex["solution"].endswith("so answer: 1998")
    assert demo.extract_answer(ex["solution"]) == "1998"
    for e in demo.make_examples("eval", 50, seed=3):
        assert int(e["answer"]) == sum(map(int, e["prompt"][:-2].split("+")))
        assert demo.extract_answer(e["prompt"] + e["solution"]) == e["answer"]


def test_extract_answer_edge_cases():
    assert demo.extract_answer("no answer here") is None
    assert demo.extract_answer("answer: 12\nanswer: 34<eos>") == "34"
    assert demo.extract_answer("so answer:-7") == "-7"
    assert demo.extract_answer("answer: ") is None


def test_splits_deterministic_and_disjoint():
    assert demo.make_examples("train", 20, seed=1) == demo.make_examples("train", 20, seed=1)
    assert demo.make_examples("train", 20, seed=1) != demo.make_examples("train", 20, seed=2)
    prompts = {s: {e["prompt"] for e in demo.make_examples(s, 2000, seed=0)} for s in demo.SPLITS}
    assert all(len(p) == 2000 for p in prompts.values())  # distinct within a split
    assert not prompts["train"] & prompts["probe"]
    assert not prompts["train"] & prompts["eval"]
    assert not prompts["probe"] & prompts["eval"]
    with pytest.raises(ValueError):
        demo.make_examples("test", 1, seed=0)


def test_tokenizer_round_trip_and_reload(tmp_path):
    from transformers import AutoTokenizer

    tok = demo.build_tokenizer()
    assert 40 <= len(tok) <= 80
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    for word in ("carry", "so", "then", "answer"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1
    assert all(len(tok.encode(str(d), add_special_tokens=False)) == 1 for d in range(10))
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [e["prompt"] + e["solution"] for e in demo.make_examples("probe", 20, seed=0)]
    texts += ["then, the sum is (3*4) - 2 = 10?\n  so: answer: 10.", ""]
    for t in (tok, reloaded):
        for x in texts:
            ids = t.encode(x)
            assert ids[:1] == [t.bos_token_id]  # <bos> is added by default
            assert t.decode(ids, skip_special_tokens=True) == x
            assert t.decode(t.encode(x, add_special_tokens=False)) == x
    # A prompt's tokens are a prefix of prompt+solution's: rollouts can split them by length.
    ex = demo.make_examples("eval", 1, seed=0)[0]
    assert tok.encode(ex["prompt"] + ex["solution"])[: len(tok.encode(ex["prompt"]))] == tok.encode(
        ex["prompt"])
    assert 1 + len(tok.encode(ex["solution"], add_special_tokens=False)) <= demo.MAX_RESPONSE_TOKENS


def test_spec_validation():
    with pytest.raises(Exception):
        demo.DemoSpec(unknown=1)
    with pytest.raises(Exception):
        demo.ModelSpec(hidden_size=30, intermediate_size=8, num_hidden_layers=1,
                       num_attention_heads=4, train_steps=1)
    spec = demo.DemoSpec()
    with pytest.raises(Exception):
        spec.seed = 2  # frozen


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    seen = []
    paths = demo.build_demo(demo.DemoSpec.tiny(), out, progress=lambda label, f: seen.append(label))
    return paths, seen


def test_tiny_build_loads_and_generates(tiny_demo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths, seen = tiny_demo
    assert set(paths) == {"teacher", "student"} and {"teacher", "student"} <= set(seen)
    for role, path in paths.items():
        assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
        summary = json.loads((path / "demo_summary.json").read_text())
        assert summary["role"] == role and summary["steps"] > 0
        assert 0.0 <= summary["eval_greedy_accuracy"] <= 1.0
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert model.config.max_position_embeddings == demo.DemoSpec.tiny().max_position_embeddings
        assert model.config.eos_token_id == tok.eos_token_id
        prompts = [e["prompt"] for e in demo.make_examples("eval", 3, seed=0)]
        enc = tok(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=5, do_sample=False)
        assert out.shape[0] == 3 and out.shape[1] <= enc["input_ids"].shape[1] + 5
        texts = demo.greedy_generate(model, tok, prompts, max_new_tokens=5)
        assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"])
    student = AutoModelForCausalLM.from_pretrained(paths["student"])
    assert student.num_parameters() < teacher.num_parameters()

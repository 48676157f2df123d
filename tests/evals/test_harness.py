"""Tests for the lm-eval integration (opdflow.evals.harness): real lm-eval runs on tiny demo models.

Run: ``python -m pytest -q tests/evals`` (under a minute on 2 idle cores). One model: a tiny
demo-architecture Llama trained to memorise three eval problems. On those its greedy answers are
right, so lm-eval must score it 1.0 and return exactly the responses of opdflow's own greedy
check; on unseen problems it is mostly wrong, which exercises the bookkeeping.
"""

from __future__ import annotations

import os

import pytest
import yaml

from opdflow.evals import harness
from opdflow.infra.testbeds import demo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny demo-architecture model that has memorised three eval problems (and nothing else)."""
    import torch

    out = tmp_path_factory.mktemp("demo")
    spec = demo.DemoSpec.tiny()
    known = demo.make_examples("eval", 3, seed=0)
    tok = demo.build_tokenizer()
    ms = demo.ModelSpec(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, train_steps=300, batch_size=12, lr=3e-3,
                        warmup_steps=5, stop_at_accuracy=1.0, check_every=10, n_check=3)
    model = demo._make_model(ms, tok, spec, seed=0)
    ids, mask = pool = demo._encode_pool(known, tok)

    def all_argmax_right() -> float:
        # Teacher-forced argmax right on every response token <=> greedy decoding reproduces the
        # solutions; one forward pass instead of a generation.
        with torch.no_grad():
            pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
        return float(bool((pred == ids[:, 1:])[mask[:, 1:]].all()))

    demo.train_model(model, ms, pool, seed=0, check=all_argmax_right)
    assert demo.greedy_accuracy(model, tok, known, 48) == 1.0, "could not memorise 3 problems"
    model.save_pretrained(out / "memorised")
    tok.save_pretrained(out / "memorised")
    return {"memorised": out / "memorised", "known": known}


def test_template_matches_demo_answer_regex():
    config = yaml.safe_load(harness.TASK_TEMPLATE.read_text())
    regex = config["filter_list"][0]["filter"][0]
    assert regex["function"] == "regex" and regex["regex_pattern"] == demo.ANSWER_PATTERN
    assert config["output_type"] == "generate_until"
    assert config["generation_kwargs"]["until"] == [demo.EOS]
    assert config["generation_kwargs"]["do_sample"] is False


def test_write_arith_task(tmp_path):
    examples = demo.make_examples("eval", 3, seed=1)
    inc = harness.write_arith_task(tmp_path / "t", examples, task_name="arith_x")
    config = yaml.safe_load((inc / "arith_x.yaml").read_text())
    assert config["task"] == "arith_x"
    data = config["dataset_kwargs"]["data_files"]["test"]
    assert os.path.isabs(data) and len(open(data).read().splitlines()) == 3
    with pytest.raises(ValueError):
        harness.write_arith_task(tmp_path / "empty", [])


def test_flatten_metrics_names():
    metrics, stderr = harness.flatten_metrics(
        {"alias": "x", "exact_match,get_answer": 0.5, "exact_match_stderr,get_answer": "N/A"})
    assert metrics == {"exact_match": 0.5} and stderr == {"exact_match": None}
    metrics, _ = harness.flatten_metrics(
        {"exact_match,strict": 0.25, "exact_match,flex": 0.5, "exact_match_stderr,strict": 0.1})
    assert metrics == {"exact_match/strict": 0.25, "exact_match/flex": 0.5}


def test_evaluate_structure_and_recomputation(models, tmp_path):
    # The three memorised problems first, then five it has never seen: a mix of hits and misses.
    examples = demo.make_examples("eval", 8, seed=0)
    assert examples[:3] == models["known"]
    inc = harness.write_arith_task(tmp_path / "task", examples)
    out = harness.evaluate(models["memorised"], ["opdflow_arith"], include_path=inc, limit=6,
                           batch_size=4, max_gen_toks=48)
    assert set(out) >= {"results", "n_samples", "backend", "samples", "stderr"}
    assert out["n_samples"] == {"opdflow_arith": 6}
    backend = out["backend"]
    assert backend["name"] == "lm-eval hf" and backend["lm_eval_version"]
    assert backend["gen_kwargs"]["do_sample"] is False and backend["gen_kwargs"]["max_gen_toks"] == 48
    assert backend["device"] == "cpu" and backend["dtype"] == "float32" and backend["batch_size"] == 4
    samples = out["samples"]["opdflow_arith"]
    assert len(samples) == 6
    for s, e in zip(samples, examples):
        assert s["doc"]["prompt"] == e["prompt"] and s["target"] == e["answer"]
        assert s["exact_match"] == float(demo.extract_answer(s["response"]) == e["answer"])
    score = out["results"]["opdflow_arith"]["exact_match"]
    assert score == pytest.approx(sum(s["exact_match"] for s in samples) / len(samples))


def test_right_answers_score_one_and_match_greedy_check(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    known = models["known"]
    inc = harness.write_arith_task(tmp_path / "task", known)
    out = harness.evaluate(models["memorised"], ["opdflow_arith"], include_path=inc, batch_size=2)
    assert out["results"]["opdflow_arith"]["exact_match"] == 1.0
    model = AutoModelForCausalLM.from_pretrained(models["memorised"])
    tok = AutoTokenizer.from_pretrained(models["memorised"])
    ours = demo.greedy_generate(model, tok, [e["prompt"] for e in known], max_new_tokens=64)
    assert [s["response"] for s in out["samples"]["opdflow_arith"]] == ours
    assert ours == [e["solution"] for e in known]

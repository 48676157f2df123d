"""The planted-rock testbed (infra/testbeds/planted.py): task format and truth, splits, the built-in task
registry, config wiring, the lm-eval task's pattern, the calibration measure on stub models whose
answer is known, and a tiny build through the models stage (its calibration in the metrics).

Run: ``python -m pytest -q tests/test_planted.py`` (the tiny build takes about half a minute).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from opdflow.infra.testbeds import planted
from opdflow.infra.testbeds.builtin import BUILTINS, answer_pattern, builtin
from opdflow.infra.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_format_truth_and_answer():
    ex = planted.format_problem([("d", "thus"), ("k", "so"), ("x", "hence")], ["k", "d"], 3, 4)
    assert ex == {"prompt": "d=thus k=so x=hence\nk d 3+4=\n", "answer": "7", "connectives": ["so", "thus"],
                  "solution": "k=so d=thus answer: 7"}
    assert planted.extract_answer(ex["solution"]) == "7"
    with pytest.raises(ValueError, match="not bound"):
        planted.format_problem([("d", "thus")], ["k"], 1, 2)
    tok = planted.build_tokenizer()
    for e in planted.make_examples("eval", 30, seed=1):
        first, second = e["prompt"].split("\n")[:2]
        keys = second.split(" ")[:planted.N_QUERIES]
        table = first.split(" ")
        assert [f"{k}={c}" in table for k, c in zip(keys, e["connectives"])] == [True] * planted.N_QUERIES
        assert len(set(table)) == planted.N_PAIRS and len(set(keys)) == planted.N_QUERIES
        ids = tok(e["solution"], add_special_tokens=False)["input_ids"]
        got = [tok.convert_ids_to_tokens(ids[i]) for i in planted.connective_positions(tok, e["solution"])]
        assert got == e["connectives"]
        assert len(ids) + 1 <= planted.MAX_RESPONSE_TOKENS
        assert tok.decode(tok(e["prompt"] + e["solution"])["input_ids"], skip_special_tokens=True) \
            == e["prompt"] + e["solution"]
        assert int(e["answer"]) == sum(int(d) for d in second.split(" ")[-1].rstrip("=").split("+"))


def test_connectives_are_single_tokens_and_splits_disjoint():
    tok = planted.build_tokenizer()
    for w in planted.CONNECTIVES:
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1
    prompts = {s: {e["prompt"] for e in planted.make_examples(s, 500, seed=0)} for s in ("train", "probe", "eval")}
    assert not prompts["train"] & prompts["probe"] and not prompts["train"] & prompts["eval"]
    assert not prompts["probe"] & prompts["eval"]
    assert planted.make_examples("train", 5, seed=2) == planted.make_examples("train", 5, seed=2)


def test_registry_and_eval_task_pattern():
    assert set(BUILTINS) == {"demo", "planted"}
    for b in BUILTINS.values():
        task = yaml.safe_load(b.template.read_text())
        regex = task["filter_list"][0]["filter"][0]
        assert task["task"] == b.eval_task
        assert regex["regex_pattern"] == b.load().ANSWER_PATTERN == answer_pattern(b.name)
        assert regex["group_select"] == -1  # the last match, as opdflow.evals.answers
    assert builtin("some/dir") is None and answer_pattern("data.jsonl") is None


def test_config_wiring():
    c = parse_config({"teacher": {"path": "planted"}, "student": {"path": "planted"},
                      "data": {"source": "planted"}, "eval": {"tasks": ["opdflow_planted"]}})
    assert c.teacher.is_builtin and not c.teacher.is_demo
    with pytest.raises(ConfigError, match="teacher.path: a built-in teacher and student go together"):
        parse_config({"teacher": {"path": "planted"}, "student": {"path": "demo"}})
    with pytest.raises(ConfigError, match="data.source: 'demo' prompts need the 'demo' models"):
        parse_config({"teacher": {"path": "planted"}, "student": {"path": "planted"}, "data": {"source": "demo"}})
    with pytest.raises(ConfigError, match="opdflow_planted is the planted testbed's benchmark"):
        parse_config({"eval": {"tasks": ["opdflow_planted"]}})
    from opdflow.infra.testbeds.data import load_prompts
    rows = load_prompts(c)
    assert {r["split"] for r in rows} == {"train", "probe", "eval"}
    assert rows[0]["prompt"] == planted.make_examples("train", 1, c.seed)[0]["prompt"]
    from opdflow.tasks.models import demo_prefix
    demo_cfg = parse_config({})
    assert demo_prefix(c) != demo_prefix(demo_cfg) and demo_prefix(c).startswith("demo/")


class _Always(torch.nn.Module):
    """A stub causal LM that always predicts token `tid` (its answer on every example is known)."""

    def __init__(self, tid: int, vocab: int):
        super().__init__()
        self.tid, self.vocab = tid, vocab

    def forward(self, input_ids, **_):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.tid] = 1.0
        return type("Out", (), {"logits": logits})()


class _Oracle(_Always):
    """Predicts, at every position, the token that follows the last earlier occurrence of the
    current two-token context: an induction head written by hand; it gets every planted position."""

    def forward(self, input_ids, **_):
        seq = input_ids[0].tolist()
        logits = torch.zeros(1, len(seq), self.vocab)
        for i in range(1, len(seq)):
            for j in range(i - 1, 0, -1):
                if seq[j - 1:j + 1] == seq[i - 1:i + 1] and j + 1 < len(seq):
                    logits[0, i, seq[j + 1]] = 1.0
                    break
        return type("Out", (), {"logits": logits})()


def test_planted_accuracy_known_answers():
    tok = planted.build_tokenizer()
    examples = planted.make_examples("eval", 40, seed=0)
    so = tok.convert_tokens_to_ids("so")
    got = planted.planted_accuracy(_Always(so, len(tok)), tok, examples)
    n_pos = planted.N_QUERIES * 40
    assert got["n_positions"] == n_pos
    assert got["planted_accuracy"] == pytest.approx(sum(c == "so" for e in examples for c in e["connectives"]) / n_pos)
    assert got["first_lookup_accuracy"] == pytest.approx(sum(e["connectives"][0] == "so" for e in examples) / 40)
    in_table = sum("=so " in e["prompt"] + " " or "=so\n" in e["prompt"] for e in examples)
    assert got["planted_in_prompt"] == pytest.approx(in_table / 40)  # 'so', never 'also'
    oracle = planted.planted_accuracy(_Oracle(0, len(tok)), tok, examples)
    assert oracle["planted_accuracy"] == oracle["first_lookup_accuracy"] == oracle["planted_in_prompt"] == 1.0


@pytest.mark.slow
def test_tiny_build_records_the_calibration_in_the_models_stage(tmp_path, monkeypatch):
    from opdflow.infra.config import load_config
    from opdflow.infra.artifacts.manifest import Run
    from opdflow.infra.artifacts.store import open_store
    from opdflow.tasks import models, prompts
    monkeypatch.setenv("OPDFLOW_CACHE", str(tmp_path / "cache"))
    config = load_config(ROOT / "configs" / "planted_tiny.yaml")
    assert config.planted == planted.PlantedSpec.tiny()
    run = Run.create_or_open(open_store(str(tmp_path / "store")), "planted-tiny", config)
    entry, ran = models.run(run)
    assert ran
    cal = entry["metrics"]["calibration"]
    for name in ("teacher", "student", "student_long_ce"):
        assert 0.0 <= cal[name]["planted_accuracy"] <= cal[name]["planted_in_prompt"] + 1e-9 <= 1.0 + 1e-9
        assert 0.0 <= cal[name]["answer_accuracy"] <= 1.0 and cal[name]["n"] == config.planted.n_calibration
    assert cal["student_long_ce"]["steps"] == config.planted.student_long_steps
    assert cal["planted_tokens"] == list(planted.CONNECTIVES)
    assert "| model | planted positions | first lookup |" in models.report(run, entry)
    entry, _ = prompts.run(run)
    assert entry["metrics"]["n_eval"] == 8
    tok_dir = run.materialize("models", "teacher")
    assert json.loads((tok_dir / "calibration.json").read_text()) == cal


def test_installed_lookup_knows_the_rule_and_holds_through_training():
    """install_lookup writes the induction circuit into a fresh 2-layer teacher: before any training it
    gets every planted position of random tables right, and after training steps with restore() as the
    after-step hook every installed weight is exactly as installed and the lookup still holds."""
    from opdflow.infra.testbeds import demo

    spec = planted.PlantedSpec.tiny()
    tok = planted.build_tokenizer()
    examples = planted.make_examples("eval", 64, seed=3)
    model = demo._make_model(spec.teacher, tok, spec, seed=0, attention_bias=True)
    restore = planted.install_lookup(model, tok)
    got = planted.planted_accuracy(model, tok, examples)
    assert got["planted_accuracy"] == got["first_lookup_accuracy"] == 1.0
    # The lookup reads the table, not the key: rebinding the queried key's connective moves the prediction.
    ex = planted.format_problem([("d", "thus"), ("k", "so"), ("x", "hence")], ["k", "d"], 3, 4)
    swapped = planted.format_problem([("d", "thus"), ("k", "next"), ("x", "hence")], ["k", "d"], 3, 4)
    assert planted.planted_accuracy(model, tok, [ex])["planted_accuracy"] == 1.0
    assert planted.planted_accuracy(model, tok, [swapped])["planted_accuracy"] == 1.0
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pool = demo._encode_pool(planted.make_examples("train", 64, seed=0), tok)
    demo.train_model(model, spec.teacher.model_copy(update={"train_steps": 40}), pool, seed=0, after_step=restore)
    after = model.state_dict()
    attn0 = "model.layers.0.self_attn."
    hd = spec.teacher.hidden_size // spec.teacher.num_attention_heads
    assert torch.equal(after[attn0 + "q_proj.bias"][: 2 * hd], before[attn0 + "q_proj.bias"][: 2 * hd])
    assert torch.equal(after["model.layers.1.self_attn.k_proj.weight"][:hd],
                       before["model.layers.1.self_attn.k_proj.weight"][:hd])
    fixed = tok.convert_tokens_to_ids(list(planted.KEYS) + ["="] + list(planted.CONNECTIVES))
    emb = "model.embed_tokens.weight"
    assert torch.equal(after[emb][fixed], before[emb][fixed])
    assert not torch.equal(after[emb], before[emb])  # the rest trained
    assert planted.planted_accuracy(model, tok, examples)["planted_accuracy"] >= 0.9


def test_install_lookup_refuses_models_it_cannot_hold_and_the_format_fits_its_reach():
    from opdflow.infra.testbeds import demo

    spec = planted.PlantedSpec.tiny()
    tok = planted.build_tokenizer()
    with pytest.raises(ValueError, match="attention_bias=True"):
        planted.install_lookup(demo._make_model(spec.teacher, tok, spec, seed=0), tok)
    with pytest.raises(ValueError, match=">= 2 layers"):
        planted.install_lookup(demo._make_model(spec.student, tok, spec, seed=0, attention_bias=True), tok)
    narrow = spec.teacher.model_copy(update={"hidden_size": 16, "num_attention_heads": 2})  # head_dim 8
    with pytest.raises(ValueError, match="RoPE frequencies slow enough"):
        planted.install_lookup(demo._make_model(narrow, tok, spec, seed=0, attention_bias=True), tok)
    # Every lookup reads a table entry within MAX_LOOKUP_DISTANCE tokens (the slow RoPE dimensions' reach).
    for e in planted.make_examples("train", 200, seed=0):
        n = len(tok(e["prompt"])["input_ids"]) + len(tok(e["solution"], add_special_tokens=False)["input_ids"])
        assert n <= planted.MAX_LOOKUP_DISTANCE


def test_connective_noise_swaps_only_connectives_at_the_declared_rate():
    examples = planted.make_examples("train", 2000, seed=0)
    noisy = planted.with_connective_noise(examples, 0.1, seed=0)
    assert planted.with_connective_noise(examples, 0.0, seed=0) == examples
    swapped = 0
    for e, n in zip(examples, noisy):
        assert {k: v for k, v in n.items() if k != "solution"} == {k: v for k, v in e.items() if k != "solution"}
        written = [w.split("=")[1] for w in n["solution"].split(" answer:")[0].split(" ")]
        assert all(w in planted.CONNECTIVES for w in written)
        assert n["solution"].split(" answer:")[1] == e["solution"].split(" answer:")[1]
        swapped += sum(w != c for w, c in zip(written, e["connectives"]))
    assert 0.08 < swapped / (2000 * planted.N_QUERIES) < 0.12

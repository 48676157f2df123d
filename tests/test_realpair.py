"""The realistic local pair (`infra.testbeds.realpair`): a Llama teacher and a Qwen2 student sharing a BPE
tokenizer with ChatML special tokens and a chat template, lm_heads padded to 151,936 rows (the
padded rows made "hot", so an unmasked sampler / top-k / loss would pick them).

Checked: `validate`'s vocabulary report; the chat template renders the prompts (system prompt,
`enable_thinking: false`) and the teacher's rendering is compared before any sampling (a
mismatch names the first differing token); models -> prompts -> rollout -> score -> train run on
it (issue 16's crash was `index 62 is out of bounds` in train with a padded teacher) and no
padded id is sampled, in the teacher's top-k, or trained on; the evaluation passes the template
to lm-eval. Controls show each check can fail: unmasked, the student samples padded ids and the
teacher's top-k holds them (the kernel boundary then refuses them).
"""
from __future__ import annotations

import math

import pytest
import torch

from opdflow.infra.config import ConfigError, parse_config
from opdflow.infra.models.lm import ChatFormat, SampleSettings, encode_prompt, load_model, load_tokenizer, sample
from opdflow.infra.artifacts.manifest import Run
from opdflow.infra.testbeds.realpair import QWEN_ROWS, build_pair
from opdflow.infra.artifacts.store import open_store
from opdflow.tasks import models, prompts, rollout, score, train
from opdflow.tasks.shards import read_parts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("pair"), n_prompts=24)


def _config(pair, **data):
    from opdflow.evals.harness import write_arith_task
    # an lm-eval task of the user's own (not run here; preflight checks it resolves offline)
    inc = write_arith_task(pair["data"].parent / "tasks", [{"prompt": "What is 1 plus 1?", "answer": "2"}],
                           task_name="realpair_add")
    return parse_config({
        "seed": 0, "teacher": {"path": str(pair["teacher"])}, "student": {"path": str(pair["student"])},
        "data": {"source": str(pair["data"]), "prompt_field": "question", "answer_field": "answer", "n_train": 8,
                 "n_probe": 2, "n_eval": 2, "system_prompt": "You add numbers.",
                 "chat_template_kwargs": {"enable_thinking": False}, **data},
        "rollout": {"samples_per_prompt": 1, "prompts_per_round": 4, "max_new_tokens": 6, "batch_size": 4},
        "scoring": {"top_k": 8, "batch_size": 4},
        "train": {"rounds": 1, "steps_per_round": 1, "batch_size": 4},
        "ablation": {"enabled": False},
        "eval": {"tasks": ["realpair_add"], "include_path": str(inc)},
    })


def test_validate_reports_the_padded_vocabulary(pair):
    from opdflow.infra.preflight import preflight, vocab_summary
    c = _config(pair)
    preflight(c)
    n = len(load_tokenizer(pair["student"]))
    lines = vocab_summary(c)
    assert lines == [f"{role}: vocabulary {n} tokens, lm_head {QWEN_ROWS} rows, {QWEN_ROWS - n} padded rows beyond "
                     f"the tokenizer masked out" for role in ("teacher", "student")]


def test_renderings_are_compared_before_sampling(pair, tmp_path):
    from opdflow.infra.testbeds.data import load_prompts
    from opdflow.infra.preflight import check_renderings
    c = _config(pair)
    rows = load_prompts(c)
    s_tok, t_tok = load_tokenizer(pair["student"]), load_tokenizer(pair["teacher"])
    chat = check_renderings(c, rows, t_tok, s_tok)
    text = s_tok.decode(encode_prompt(s_tok, rows[0]["prompt"], chat))
    assert text.startswith("<|im_start|>system\nYou add numbers.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    t_tok.chat_template = "<|endoftext|>" + t_tok.chat_template  # a BOS on the teacher's side only
    with pytest.raises(ConfigError, match=r"differ at token 0: student '<\|im_start\|>' vs teacher '<\|endoftext\|>'"):
        check_renderings(c, rows, t_tok, s_tok)
    # one template file for both models: the mismatch is gone, and the file is what renders
    path = tmp_path / "chat.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ")
    c2 = _config(pair, chat_template=str(path))
    chat2 = check_renderings(c2, rows, t_tok, s_tok)
    assert s_tok.decode(encode_prompt(s_tok, rows[0]["prompt"], chat2)).startswith("[system] You add numbers.\n[user] ")
    with pytest.raises(ConfigError, match="data.system_prompt"):
        check_renderings(_config(pair, chat_template="none"), rows, t_tok, s_tok)


def test_rollout_score_train_on_the_padded_pair(pair, tmp_path):
    c = _config(pair)
    run = Run.create_or_open(open_store(str(tmp_path / "store")), "real", c)
    for fn, stage in ((models.run, "models"), (prompts.run, "prompts"), (rollout.run, "rollout.r01"),
                      (score.run, "score.r01"), (train.run, "train.r01")):
        fn(run, stage)
        assert run.require(stage)["status"] == "committed", stage
    n = len(load_tokenizer(pair["student"]))
    ro, sc = read_parts(run, "rollout.r01", "rollouts"), read_parts(run, "score.r01", "scores")
    sampled = [t for r in ro["response_ids"].to_pylist() for t in r]
    assert sampled and max(sampled) < n
    top = [i for r in sc["topk_ids"].to_pylist() for row in r for i in row]
    assert top and max(top) < n
    tails = [x for r in sc["teacher_tail_logmass"].to_pylist() for x in r]
    assert len(tails) == len(sampled) and all(x <= 0 and math.isfinite(x) for x in tails)
    assert run.require("score.r01")["backend"]["tail"] == "exact"
    assert run.require("rollout.r01")["backend"]["vocab_size"] == n
    prompt_text = load_tokenizer(pair["student"]).decode(ro["prompt_ids"].to_pylist()[0])
    assert "<|im_start|>assistant\n<think>" in prompt_text
    from opdflow.infra.artifacts.tables import parquet_to_table
    rec = parquet_to_table(run.read_output("train.r01", "token_losses.parquet"))
    assert rec.num_rows == len(sampled) and max(rec["token_id"].to_pylist()) < n
    assert all(math.isfinite(x) and x >= 0 for x in rec["loss"].to_pylist())
    # controls: without the vocabulary cut the student samples padded rows ...
    student = load_model(pair["student"]).eval()
    tok = load_tokenizer(pair["student"])
    ids = [ro["prompt_ids"].to_pylist()[0]]
    raw = sample(student, ids, [1], SampleSettings(max_new_tokens=6), tok.eos_token_id, tok.pad_token_id)
    assert max(raw[0].response_ids) >= n
    # ... and the teacher's top-k holds them, which the kernel boundary refuses with a clear error
    from opdflow.infra.models.scoring import teacher_scores
    from opdflow.kernels import distillation_loss
    teacher = load_model(pair["teacher"]).eval()
    unmasked = teacher_scores(teacher, ids, [sampled[:3]], tok.pad_token_id, 8, 1)
    bad_ids = torch.tensor(unmasked[0][1])
    assert int(bad_ids.max()) >= n
    with pytest.raises(ValueError, match=r"out of range in row 0.*\[0, %d\)" % n):
        distillation_loss(torch.zeros(len(bad_ids), n), teacher_topk_ids=bad_ids,
                          teacher_topk_logprobs=torch.tensor(unmasked[0][2]))


@pytest.mark.integration
def test_lm_eval_gets_the_chat_template(pair, tmp_path):
    from opdflow.evals.harness import evaluate, write_arith_task
    tok = load_tokenizer(pair["student"])
    chat = ChatFormat(tok.chat_template, "You add numbers.", (("enable_thinking", False),))
    inc = write_arith_task(tmp_path / "task", [{"prompt": "What is two plus 3?", "answer": "5", "solution": ""}] * 2)
    res = evaluate(pair["student"], ["opdflow_arith"], include_path=inc, limit=2, batch_size=2, max_gen_toks=3,
                   chat=chat)
    ctx = res["samples"]["opdflow_arith"][0]["context"]
    assert ctx == chat.render(tok, "What is two plus 3?")
    assert res["backend"]["apply_chat_template"] is True
    assert res["backend"]["chat_template_args"] == {"enable_thinking": False}


@pytest.mark.integration
def test_whole_plan_on_the_padded_pair(pair, tmp_path):
    """configs/realpair.yaml, every stage of its plan (rock stages and the `opdflow_data`
    evaluation included, ablation off): no padded id is sampled (rollouts, probe), in the
    teacher's top-k, trained on, or counted in the rock analysis."""
    import yaml
    from pathlib import Path
    from opdflow.infra.preflight import preflight
    from opdflow.infra.artifacts.tables import parquet_to_table
    from opdflow.tasks.plan import plan, stage_of
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "realpair.yaml").read_text())
    raw["teacher"]["path"], raw["student"]["path"] = str(pair["teacher"]), str(pair["student"])
    raw["data"]["source"], raw["store"] = str(pair["data"]), str(tmp_path / "store")
    c = parse_config(raw)
    preflight(c)
    run = Run.create_or_open(open_store(raw["store"]), "realpair", c)
    stages = plan(c)
    assert {"rock-probe", "rock-directions", "rock"} <= set(stages) and any(s.startswith("eval") for s in stages)
    for st in stages:
        stage_of(st).run(run, st)
        assert run.require(st)["status"] == "committed", st
    n = len(load_tokenizer(pair["student"]))
    seen = {}
    for st in stages:
        if st.startswith("rollout."):
            seen[st] = [t for r in read_parts(run, st, "rollouts")["response_ids"].to_pylist() for t in r]
        elif st.startswith("score."):
            seen[st] = [i for r in read_parts(run, st, "scores")["topk_ids"].to_pylist() for row in r for i in row]
        elif st.startswith("train."):
            seen[st] = parquet_to_table(run.read_output(st, "token_losses.parquet"))["token_id"].to_pylist()
    probe = [t for ref in run.outputs_under("rock-probe", "probes").values()
             for r in parquet_to_table(run.read(ref))["response_ids"].to_pylist() for t in r]
    seen["rock-probe"] = probe
    rec = read_parts(run, "rock", "records")
    for col in ("token_id", "student_top1", "teacher_top1"):
        seen[f"rock {col}"] = rec[col].to_pylist()
    assert len(seen) >= 9
    for where, ids in seen.items():
        assert ids and max(ids) < n, f"{where}: a padded id (>= {n}) or nothing"
    assert rec.num_rows == len(probe) * len(c.rock.checkpoints)
    assert all(math.isfinite(x) and x >= 0 for x in rec["kl"].to_pylist())

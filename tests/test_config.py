"""Every config error the lifecycle issue lists fails at once, names its field, writes nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opdflow.infra.config import ConfigError, load_config, parse_config
from opdflow.infra.preflight import preflight

ROOT = Path(__file__).resolve().parent.parent


def _tiny() -> dict:
    return yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())


def _expect(raw: dict, field: str, words: str):
    with pytest.raises(ConfigError) as ei:
        preflight(parse_config(raw))
    assert ei.value.field == field, str(ei.value)
    assert words in str(ei.value), str(ei.value)
    return ei.value


def test_every_config_in_the_repo_validates(tmp_path, monkeypatch):
    # configs/realpair.yaml names the pair `python -m opdflow.infra.testbeds.realpair realpair` builds in
    # the working directory (its documented first step): built here, in a scratch working dir
    from opdflow.infra.testbeds.realpair import build_pair
    build_pair(tmp_path / "realpair")
    monkeypatch.chdir(tmp_path)
    found = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(found) >= 2 and ROOT / "configs" / "realpair.yaml" in found
    for p in found:
        preflight(load_config(p))


def test_unknown_key():
    raw = _tiny()
    raw["train"]["learning_rate"] = 0.1
    _expect(raw, "train.learning_rate", "unknown key")


def test_unknown_top_level_section():
    raw = _tiny()
    raw["trainer"] = {}
    _expect(raw, "trainer", "unknown key")


def test_negative_learning_rate():
    raw = _tiny()
    raw["train"]["optimizer"]["lr"] = -1e-3
    _expect(raw, "train.optimizer.lr", "greater than 0")


def test_missing_model_dir(tmp_path):
    raw = _tiny()
    raw["teacher"] = {"path": str(tmp_path / "nope")}
    raw["student"] = {"path": str(tmp_path / "nope2")}
    _expect(raw, "teacher.path", "does not exist")


def _hf_dir(path: Path, extra_token: str | None = None, max_pos: int = 128) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    from opdflow.infra.testbeds.demo import build_tokenizer
    tok = build_tokenizer()
    if extra_token:
        tok.add_tokens([extra_token])
    path.mkdir(parents=True)
    tok.save_pretrained(str(path))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=max_pos)
    LlamaForCausalLM(cfg).save_pretrained(str(path))  # real (tiny) weights: preflight opens their headers
    return path


def _user_models_and_data(tmp_path: Path, student_extra_token: str | None = None, max_pos: int = 128) -> dict:
    """The tiny config pointed at two Hugging Face model dirs and a 40-row JSONL dataset."""
    raw = _tiny()
    raw.pop("demo")
    raw["teacher"] = {"path": str(_hf_dir(tmp_path / "t", max_pos=max_pos))}
    raw["student"] = {"path": str(_hf_dir(tmp_path / "s", extra_token=student_extra_token, max_pos=max_pos))}
    raw["eval"]["tasks"] = ["some_task"]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(40)))
    raw["data"] = {"source": str(data), "n_probe": 4, "n_eval": 4}
    return raw


def test_tokenizers_disagree(tmp_path):
    _expect(_user_models_and_data(tmp_path, student_extra_token="zebra"), "student.path", "tokenizer disagrees")


def test_empty_dataset(tmp_path):
    raw = _user_models_and_data(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    raw["data"] = {"source": str(empty)}
    _expect(raw, "data.source", "is empty")


def test_max_new_tokens_beyond_context():
    raw = _tiny()
    raw["rollout"]["max_new_tokens"] = 500
    _expect(raw, "rollout.max_new_tokens", "context is 128")


def test_max_new_tokens_beyond_context_of_a_model_dir(tmp_path):
    _expect(_user_models_and_data(tmp_path, max_pos=40), "rollout.max_new_tokens", "context is 40")


def test_cli_config_error_writes_nothing(tmp_path):
    raw = _tiny()
    raw["rollout"]["max_new_tokens"] = 500
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    store = tmp_path / "store"
    out = subprocess.run([sys.executable, "-m", "opdflow.flows.cli", "run", str(cfg), "--store", str(store)],
                         capture_output=True, text=True, timeout=120, env={**os.environ})
    assert out.returncode == 2, out.stderr
    assert "rollout.max_new_tokens" in out.stderr
    assert not store.exists()


def test_readme_config_example_uses_real_keys():
    """The README's YAML example, with its model/data paths swapped for the demo's, validates."""
    text = (ROOT / "README.md").read_text()
    block = text.split("```yaml", 1)[1].split("```", 1)[0]
    raw = yaml.safe_load(block)
    assert {"teacher", "student", "data", "rollout", "train", "rock", "eval"} <= set(raw)
    raw.update(teacher={"path": "demo"}, student={"path": "demo"}, store="/tmp/x")
    raw["data"]["source"] = "demo"
    parse_config(raw)


# -- backends ---------------------------------------------------------------------------------

@pytest.mark.parametrize("section", ["rollout", "scoring"])
@pytest.mark.parametrize("missing", ["base_url", "model"])
def test_openai_backend_needs_a_server_and_a_model(section, missing):
    raw = _tiny()
    raw[section]["backend"] = "openai"
    raw[section]["openai"] = {k: v for k, v in {"base_url": "http://127.0.0.1:1/v1", "model": "m"}.items()
                              if k != missing}
    _expect(raw, f"{section}.openai.{missing}", f"{section}.backend: openai needs")


def test_openai_api_key_env_is_a_variable_name():
    raw = _tiny()
    raw["rollout"]["openai"] = {"api_key_env": "sk-abc123 secret"}
    _expect(raw, "rollout.openai.api_key_env", "name of an environment variable")


def test_unknown_rollout_backend():
    raw = _tiny()
    raw["rollout"]["backend"] = "sglang"
    _expect(raw, "rollout.backend", "'auto', 'transformers', 'native', 'vllm' or 'openai'")


def test_vllm_backend_names_the_missing_piece(tmp_path):
    """`rollout.backend: vllm` (and scoring's) needs vLLM's own environment: a missing Python, or a
    Python without vllm, is named before anything runs."""
    raw = _tiny()
    raw["rollout"].update(backend="vllm", vllm={"python": str(tmp_path / "nowhere" / "python")})
    err = _expect(raw, "rollout.vllm.python", "does not exist")
    assert "make vllm-env" in str(err)
    import sys
    raw["rollout"]["vllm"]["python"] = sys.executable  # opdflow's own Python: no vllm in it
    _expect(raw, "rollout.vllm.python", "has no vllm package")
    raw = _tiny()
    raw["scoring"].update(backend="vllm", vllm={"command": [str(tmp_path / "no-such-vllm"), "serve"]})
    _expect(raw, "scoring.vllm.command", "is not an executable")


def test_tis_needs_the_models_own_distribution():
    raw = _tiny()
    raw["train"]["tis_cap"] = 2.0
    parse_config(raw)
    raw["rollout"]["temperature"] = 0.7
    _expect(raw, "train.tis_cap", "temperature 1")
    raw["rollout"].update(temperature=1.0, top_k=5)
    _expect(raw, "train.tis_cap", "top_k 0")


def test_scale_settings_this_machine_cannot_honour(monkeypatch):
    import importlib.util

    import torch
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "prefect_dask" else real(name, *a))
    raw = _tiny()
    raw["scale"] = {"task_runner": "dask"}
    _expect(raw, "scale.task_runner", "needs prefect-dask")
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    raw = _tiny()
    raw["train"]["nproc_per_node"] = 4
    _expect(raw, "train.nproc_per_node", "this machine has 2 GPUs")
    raw["scale"] = {"dask_address": "tcp://scheduler:8786"}
    _expect(raw, "scale.dask_address", "set scale.task_runner: dask")

"""Store integrity on real files: verified cache reads, parse errors that name the file,
`verify_run` on a local store and on S3 (moto over HTTP), file inputs in stage keys, and
failures classified by cause (truncated safetensors, offline hub, OOM, a failed subprocess).

No models are trained here: the stages are small bodies writing real objects through
`run_stage`; the weights are real safetensors files written by `safetensors`.
"""
from __future__ import annotations

import json
import logging
import os

import pytest

from opdflow.infra.artifacts import manifest
from opdflow.infra.config import parse_config
from opdflow.infra.artifacts.manifest import Run, file_inputs, materialize_refs, run_stage, stage_key
from opdflow.infra.artifacts.store import ChecksumError, CorruptObject, open_store
from opdflow.infra.artifacts.verify import format_report, repair_stages, verify_run


def _make_run(store) -> Run:
    run = Run.create_or_open(store, "r1", parse_config({}))
    run_stage(run, "a", params={}, inputs={}, body=lambda ctx: (ctx.put_bytes("x.bin", b"x" * 100),
                                                               ctx.put_json("m.json", {"v": 1})))
    ea = run.entry("a")
    run_stage(run, "b", params={}, inputs={"x": ea["outputs"]["x.bin"]},
              body=lambda ctx: ctx.put_table("t.parquet", {"c": [1, 2, 3]}))
    run_stage(run, "c", params={}, inputs={}, body=lambda ctx: ctx.put_bytes("y.bin", b"y"))
    return run


def _flip(store, key: str) -> None:
    data = bytearray(store.get_bytes(key))
    data[0] ^= 0xFF
    store.put_bytes(key, bytes(data))


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.integration)])
def test_verify_names_every_fault(where, tmp_path, request, capsys):
    uri = str(tmp_path / "store") if where == "local" else request.getfixturevalue("s3_store_uri")
    store = open_store(uri)
    run = _make_run(store)
    rep = verify_run(store, "r1")
    assert rep.faults == 0 and [s.status for s in rep.stages] == ["ok", "ok", "ok"], format_report(rep)

    a, b = run.entry("a"), run.entry("b")
    store.delete(a["outputs"]["x.bin"]["key"])                      # missing
    _flip(store, b["outputs"]["t.parquet"]["key"])                  # corrupt
    store.put_bytes("runs/r1/manifest/c.json", b'{"stage": "c", "ke')  # truncated entry
    orphan = f"{run.prefix}/stages/a/0123456789abcdef/left-by-a-crash.bin"
    store.put_bytes(orphan, b"garbage")
    rep = verify_run(store, "r1")
    by = {s.name: s for s in rep.stages}
    assert (by["a"].status, by["b"].status, by["c"].status) == ("missing", "corrupt", "unreadable")
    text = format_report(rep)
    for key in (a["outputs"]["x.bin"]["key"], b["outputs"]["t.parquet"]["key"], "runs/r1/manifest/c.json", orphan):
        assert store.describe(key) in text, text
    assert rep.faults == 3 and [p.key for p in rep.orphaned] == [orphan]
    assert "expected " + b["outputs"]["t.parquet"]["sha256"] in text
    assert repair_stages(rep) == ["a", "b", "c"]
    assert json.loads(json.dumps(rep.to_json()))["ok"] is False
    from opdflow.flows.cli import main
    assert main(["verify", "--run-id", "r1", "--store", store.uri]) == 1  # the command, on this store
    out = capsys.readouterr().out
    assert f"missing: {store.describe(a['outputs']['x.bin']['key'])}" in out and "3 faults" in out

    # readers name the file too
    with pytest.raises(CorruptObject, match=r"runs/r1/manifest/c\.json"):
        run.entry("c")
    store.put_bytes("runs/r1/run.json", b"\x00garbage")
    with pytest.raises(CorruptObject, match=r"run\.json.*not valid JSON"):
        Run.open(store, "r1")
    rep = verify_run(store, "r1")
    assert [p.key for p in rep.run] == ["runs/r1/run.json"] and rep.faults == 4


def test_invalid_stored_config_and_execution_name_the_file(tmp_path):
    store = open_store(str(tmp_path / "store"))
    run = Run.create_or_open(store, "r1", parse_config({}))
    meta = run.meta()
    meta["config"]["train"]["optimizer"]["lr"] = -1
    store.put_bytes("runs/r1/run.json", json.dumps(meta).encode())
    with pytest.raises(CorruptObject) as e:
        Run.open(store, "r1")
    assert str(store.describe("runs/r1/run.json")) in str(e.value) and "stored config is invalid" in str(e.value)
    assert "train.optimizer.lr" in str(e.value)
    meta["config"]["train"]["optimizer"]["lr"] = 0.001
    store.put_bytes("runs/r1/run.json", json.dumps(meta).encode())
    store.put_bytes("runs/r1/execution.json", b"[1, 2")
    with pytest.raises(CorruptObject, match=r"execution\.json"):
        Run.open(store, "r1")


def test_parquet_parse_error_names_the_file(tmp_path):
    from opdflow.infra.artifacts.tables import parquet_to_table
    store = open_store(str(tmp_path / "store"))
    run = Run.create_or_open(store, "r1", parse_config({}))
    e, _ = run_stage(run, "s", params={}, inputs={}, body=lambda ctx: ctx.put_bytes("t.parquet", b"not parquet"))
    with pytest.raises(CorruptObject) as err:
        parquet_to_table(run.read_output("s", "t.parquet"))
    assert store.describe(e["outputs"]["t.parquet"]["key"]) in str(err.value)


def test_missing_object_is_recomputed_with_a_warning(tmp_path, caplog):
    store = open_store(str(tmp_path / "store"))
    run = Run.create_or_open(store, "r1", parse_config({}))
    e, _ = run_stage(run, "s", params={}, inputs={}, body=lambda ctx: ctx.put_bytes("x", b"1"))
    store.delete(e["outputs"]["x"]["key"])
    with caplog.at_level(logging.WARNING, logger="opdflow"):
        _, ran = run_stage(run, "s", params={}, inputs={}, body=lambda ctx: ctx.put_bytes("x", b"1"))
    assert ran
    assert f"stage s: recomputing: its committed output 'x' is missing from the store " \
           f"({store.describe(e['outputs']['x']['key'])})" in caplog.text


def test_cache_copy_is_verified_evicted_and_refetched(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("OPDFLOW_CACHE", str(tmp_path / "cache"))
    store = open_store(str(tmp_path / "store"))
    data = os.urandom(4096)
    sha = store.put_bytes("objs/w.bin", data)
    refs = {"w.bin": {"key": "objs/w.bin", "sha256": sha, "size": len(data)}}
    d = materialize_refs(store, refs)
    path = d / "w.bin"
    damaged = bytearray(path.read_bytes())
    for i in range(0, 1000):
        damaged[i] ^= 0x5A
    path.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING, logger="opdflow"):
        d2 = materialize_refs(store, refs)
    assert d2 == d and (d / "w.bin").read_bytes() == data
    assert f"cache copy {path} of objs/w.bin is bad" in caplog.text and "evicted" in caplog.text
    # a clean copy is hashed once per process: unchanged size and mtime are trusted afterwards
    calls = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda p: calls.append(p) or real(p))
    materialize_refs(store, refs)
    assert calls == []
    # the store's copy is bad too: both paths are named
    path.write_bytes(b"bad cache")
    _flip(store, "objs/w.bin")
    with pytest.raises(ChecksumError) as e:
        materialize_refs(store, refs)
    assert str(store.describe("objs/w.bin")) in str(e.value) and str(path) in str(e.value)


def test_file_inputs_change_the_key_of_readers_only(tmp_path):
    inc = tmp_path / "tasks"
    inc.mkdir()
    (inc / "t.yaml").write_text("task: t\n")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "answer": "b"}\n')
    k_eval = stage_key("eval.x", {}, file_inputs("eval.include_path", inc))
    k_prompts = stage_key("prompts", {}, file_inputs("data.source", data))
    (inc / "t.yaml").write_text("task: t\nnum_fewshot: 1\n")
    assert stage_key("eval.x", {}, file_inputs("eval.include_path", inc)) != k_eval
    assert stage_key("prompts", {}, file_inputs("data.source", data)) == k_prompts
    (inc / "extra.yaml").write_text("task: u\n")
    assert set(file_inputs("eval.include_path", inc)) == {"eval.include_path/t.yaml", "eval.include_path/extra.yaml"}
    assert file_inputs("data.source", tmp_path / "nope") == {}


# -- failures classified by cause ------------------------------------------------------------

def _weights(path):
    import torch
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(64, 64), "b": torch.ones(64)}, str(path))
    return path


def test_truncated_safetensors_is_found_by_its_header(tmp_path):
    from opdflow.infra.failures import check_weights_dir, weights_header_problem
    f = _weights(tmp_path / "model.safetensors")
    assert weights_header_problem(f) is None
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert "truncated" in weights_header_problem(f)
    f.write_bytes(b"\xff" * 8 + data[8:100])
    assert "header length" in weights_header_problem(f)
    assert [p for p, _ in check_weights_dir(tmp_path)] == [f]


def test_permanent_causes_are_not_retried(tmp_path):
    import torch
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    from safetensors import SafetensorError

    from opdflow.infra.failures import PermanentFailure, SubprocessFailed, explain
    from opdflow.infra.artifacts.store import StoreError
    from opdflow.tasks.common import is_transient
    for exc in (SafetensorError("invalid header length"), torch.OutOfMemoryError("CUDA out of memory"),
                OfflineModeIsEnabled("offline"), LocalEntryNotFoundError("no local file"),
                OSError("We couldn't connect to 'https://huggingface.co' to load the files"),
                SubprocessFailed("torchrun (2 processes) failed with exit code 1"), PermanentFailure("x")):
        assert not is_transient(exc), exc
    assert is_transient(StoreError("S3 put failed")) and is_transient(ConnectionError("reset"))
    assert "train.micro_batch_size" in str(explain(torch.OutOfMemoryError("CUDA out of memory")))
    assert "HF_HUB_OFFLINE" in str(explain(OfflineModeIsEnabled("offline")))
    # through run_stage: the attempt record says what to do
    store = open_store(str(tmp_path / "store"))
    run = Run.create_or_open(store, "r1", parse_config({}))

    def oom(ctx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(PermanentFailure, match="lower train.micro_batch_size"):
        run_stage(run, "s", params={}, inputs={}, body=oom)
    assert "lower train.micro_batch_size" in run.attempts("s")[-1]["error"]


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """A user's model dir (a random tiny Llama with the demo tokenizer) and a JSONL dataset."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from opdflow.infra.testbeds.demo import build_tokenizer
    from opdflow.infra.models.lm import save_model
    root = tmp_path_factory.mktemp("user-model")
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_model(LlamaForCausalLM(cfg), tok, root / "teacher")
    rows = [{"prompt": f"{i}+{i}=\n", "answer": str(2 * i)} for i in range(40)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_validate_and_load_name_a_truncated_weights_file(user_model, tmp_path):
    import shutil

    from opdflow.flows.cli import main
    from opdflow.infra.failures import PermanentFailure
    from opdflow.infra.models.lm import load_model
    bad = tmp_path / "teacher"
    shutil.copytree(user_model / "teacher", bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"teacher": {"path": str(bad)}, "student": {"path": str(user_model / "teacher")},
                               "data": {"source": str(user_model / "data.jsonl"), "n_probe": 4, "n_eval": 4},
                               "rollout": {"max_new_tokens": 8}, "eval": {"tasks": ["gsm8k"]},
                               "ablation": {"enabled": False}}))
    import io
    import contextlib
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["validate", str(cfg)]) == 2
    assert f"teacher.path: {w}: tensors need" in err.getvalue() and "truncated" in err.getvalue()
    with pytest.raises(PermanentFailure) as e:
        load_model(bad)
    assert str(w) in str(e.value) and "rebuild or re-download" in str(e.value)

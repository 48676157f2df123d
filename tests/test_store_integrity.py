"""Store integrity on a real run, through the `opdflow` CLI (in process, real Prefect flows).

One small lifecycle (the tiny config, one round, no ablation, an lm-eval include dir) is run
once; then, on that run: a damaged cache copy of the student's weights is evicted and
refetched, and rerunning `rollout.r01` gives the same table; editing a task YAML under
`eval.include_path` reruns the eval stages and nothing upstream; `opdflow verify` names a
deleted object, a corrupted one and a truncated manifest entry, and `--repair` reruns exactly
those stages; without `--store` the CLI finds the run's store or says where it looked (and
creates nothing); every command the CLI prints as a hint is run and works.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from opdflow.flows.cli import main
from opdflow.infra.config import merge
from opdflow.infra.artifacts.manifest import Run
from opdflow.infra.artifacts.store import open_store, sha256_file

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROBE_TASK = """task: opdflow_integrity_probe
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: answer
generation_kwargs:
  until: ["<eos>"]
  do_sample: false
  max_gen_toks: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    inc = root / "tasks"
    inc.mkdir()
    (root / "probe.jsonl").write_text('{"prompt": "1+1=\\n", "answer": "2"}\n')
    (inc / "probe.yaml").write_text(PROBE_TASK.format(data=root / "probe.jsonl"))
    store = root / "store"
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw = merge(raw, {"store": str(store), "train": {"rounds": 1}, "ablation": {"enabled": False},
                      "eval": {"include_path": str(inc), "limit": 4}})
    cfg = root / "integrity.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["run", str(cfg), "--run-id", "integ"]) == 0
    return {"root": root, "cfg": cfg, "store": store, "inc": inc, "uri": open_store(str(store)).uri}


def _run(world) -> Run:
    return Run.open(str(world["store"]), "integ")


def _attempts(run: Run) -> dict[str, int]:
    base = f"{run.prefix}/attempts/"
    out: dict[str, int] = {}
    for k in run.store.list(base):
        name = k[len(base):].rsplit("/", 1)[0]
        out[name] = out.get(name, 0) + 1
    return out


def _part(run: Run, stage: str) -> dict:
    return next(r for n, r in run.require(stage)["outputs"].items() if n.endswith(".parquet"))


def test_damaged_cache_copy_is_refetched(world):
    run = _run(world)
    before = _part(run, "rollout.r01")
    n_stopped = run.require("rollout.r01")["metrics"].get("n_stopped")
    student = run.materialize("models", "student")
    w = student / "model.safetensors"
    want = run.require("models")["outputs"]["student/model.safetensors"]["sha256"]
    data = bytearray(w.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 1000] = bytes(b ^ 0xFF for b in data[mid:mid + 1000])  # 1,000 bytes in the weights
    w.write_bytes(bytes(data))
    assert main(["stage", "rollout.r01", "--run-id", "integ", "--store", world["uri"]]) == 0
    run = _run(world)
    assert _part(run, "rollout.r01")["sha256"] == before["sha256"]
    assert run.require("rollout.r01")["metrics"].get("n_stopped") == n_stopped
    assert sha256_file(w) == want  # evicted and fetched again


def test_editing_a_task_yaml_reruns_the_eval_stages_only(world):
    run = _run(world)
    keys = {s: run.require(s)["key"] for s in ("models", "prompts", "rollout.r01", "score.r01", "train.r01", "rock")}
    evals = [f"eval.{x}" for x in ("teacher", "initial_student", "final_student")]
    eval_keys = {s: run.require(s)["key"] for s in evals}
    before = _attempts(run)
    y = world["inc"] / "probe.yaml"
    y.write_text(y.read_text().replace("max_gen_toks: 8", "max_gen_toks: 6"))
    assert main(["run", str(world["cfg"]), "--run-id", "integ"]) == 0
    run = _run(world)
    after = _attempts(run)
    changed = {s for s in after if after[s] != before.get(s)}
    assert all(s.startswith("eval.") or s == "report" for s in changed), changed
    assert set(evals) <= changed
    assert all(run.require(s)["key"] != k for s, k in eval_keys.items())
    assert {s: run.require(s)["key"] for s in keys} == keys
    if "report" in changed:  # it reads the eval results: it reran because they changed
        assert before.get("report") is not None


def test_verify_and_repair(world, capsys):
    run = _run(world)
    uri = world["uri"]
    assert main(["verify", "--run-id", "integ", "--store", uri]) == 0
    assert "ok: every committed object is present and intact" in capsys.readouterr().out
    st = run.store
    losses = run.require("train.r01")["outputs"]["token_losses.parquet"]
    results = run.require("eval.teacher")["outputs"]["results.json"]
    st.delete(losses["key"])
    st.put_bytes(results["key"], b'{"results": {"tampered": 1}}')
    st.put_bytes(f"{run.prefix}/manifest/score.r01.json", st.get_bytes(f"{run.prefix}/manifest/score.r01.json")[:50])
    before = _attempts(run)

    assert main(["verify", "--run-id", "integ", "--store", uri]) == 1
    out = capsys.readouterr().out
    assert re.search(r"train\.r01\s+missing", out) and f"missing: {st.describe(losses['key'])}" in out
    assert re.search(r"eval\.teacher\s+corrupt", out) and f"corrupt: {st.describe(results['key'])}" in out
    assert re.search(r"score\.r01\s+unreadable", out)
    assert st.describe(f"{run.prefix}/manifest/score.r01.json") in out and "3 faults" in out
    assert main(["verify", "--run-id", "integ", "--store", uri, "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["faults"] == 3 and not rep["ok"]

    assert main(["verify", "--run-id", "integ", "--store", uri, "--repair"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"repairing 3 stages: (.+)", out)
    assert m and set(m.group(1).split(", ")) == {"train.r01", "eval.teacher", "score.r01"}, out
    assert out.rstrip().endswith("ok: every committed object is present and intact")
    run = _run(world)
    assert run.require("train.r01")["outputs"]["token_losses.parquet"]["sha256"] == losses["sha256"]
    assert run.require("eval.teacher")["outputs"]["results.json"]["sha256"] == results["sha256"]
    after = _attempts(run)
    assert {s for s in after if after[s] != before.get(s)} == {"train.r01", "eval.teacher", "score.r01"}


def _hint(text: str, pattern: str) -> list[str]:
    m = re.search(pattern, text)
    assert m, text
    return shlex.split(m.group(1))[1:]


def test_cli_finds_the_store_and_its_hints_work(world, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPDFLOW_STORE", raising=False)
    assert main(["status", "--run-id", "integ"]) == 2
    assert "the default store ./opdflow-store does not exist" in capsys.readouterr().err
    assert not (tmp_path / "opdflow-store").exists()  # nothing created to say "no run"
    assert main(["status", "--run-id", "integ", "--config", str(world["cfg"])]) == 0
    assert f"run integ in {world['uri']}" in capsys.readouterr().out

    # a changed config: the hint resumes the run with its stored config
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**yaml.safe_load(world["cfg"].read_text()), "seed": 1}))
    assert main(["run", str(other), "--run-id", "integ"]) == 2
    hint = _hint(capsys.readouterr().err, r"(opdflow run --run-id integ --store \S+)")
    assert main(hint) == 0

    # an unknown stage: the hint lists the stages
    assert main(["stage", "rollout.r09", "--run-id", "integ", "--config", str(world["cfg"])]) == 2
    err = capsys.readouterr().err
    assert "run 'integ' has no stage 'rollout.r09'; its stages: models, prompts, rollout.r01" in err
    assert main(_hint(err, r"\((opdflow status --run-id integ --store \S+)\)")) == 0

    # a stage whose inputs are not committed: run what the hint says until it runs
    cfg = _run(world).config
    Run.create_or_open(open_store(str(world["store"])), "hints", cfg)
    ran = []
    for _ in range(4):
        code = main(["stage", "rollout.r01", "--run-id", "hints", "--store", world["uri"]])
        if code == 0:
            break
        hint = _hint(capsys.readouterr().err, r"run it first \((opdflow stage \S+ --run-id hints --store \S+)\)")
        ran.append(hint[1])
        assert main(hint) == 0
    assert code == 0 and ran == ["models", "prompts"]

    # a damaged manifest entry: the hint is `opdflow verify`, which names it
    st = open_store(str(world["store"]))
    st.put_bytes("runs/hints/manifest/prompts.json", b"{")
    assert main(["status", "--run-id", "hints", "--store", world["uri"]]) == 2
    err = capsys.readouterr().err
    assert f"cannot parse 'runs/hints/manifest/prompts.json' ({st.describe('runs/hints/manifest/prompts.json')})" in err
    assert main(_hint(err, r"\((opdflow verify --run-id hints --store \S+) lists")) == 1
    assert re.search(r"prompts\s+unreadable", capsys.readouterr().out)

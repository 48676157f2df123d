"""The rollout and score stages on each backend (`infra/sampling/backends.py`), as plain functions.

- native vs transformers: the same rollouts table on the tiny config (the native sampler is the
  transformers one token for token).
- openai (integration): `opdflow serve` subprocesses serve the run's materialized student and
  teacher; the rollout stage's table equals the transformers backend's (logprobs within 1e-5) and
  the score stage's numbers
  equal the in-process (transformers) scorer's within 1e-5.

Run: ``python -m pytest -q tests/test_backends.py`` (about 40 s on 2 cores).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from opdflow.infra.config import load_config
from opdflow.infra.artifacts.manifest import Run
from opdflow.infra.artifacts.store import open_store
from opdflow.tasks import models, prompts, rollout, score
from opdflow.tasks.shards import read_parts

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"rollout": {"prompts_per_round": 6, "batch_size": 4}}


def _run(store, run_id: str, overrides: dict, stages=("rollout.r01",)) -> Run:
    from opdflow.infra.config import merge
    run = Run.create_or_open(store, run_id, load_config(ROOT / "configs" / "tiny.yaml", merge(SMALL, overrides)))
    models.run(run, "models")
    prompts.run(run, "prompts")
    for stage in stages:
        (rollout.run if stage.startswith("rollout") else score.run)(run, stage)
    return run


def test_native_rollouts_equal_transformers(tmp_path):
    store = open_store(str(tmp_path / "store"))
    ref, nat = _run(store, "transformers", {}), _run(store, "native", {"rollout": {"backend": "native"}})
    a, b = read_parts(ref, "rollout.r01", "rollouts"), read_parts(nat, "rollout.r01", "rollouts")
    assert a.column_names == b.column_names
    for col in a.column_names:
        if col != "logprobs":
            assert a[col].equals(b[col]), col
    for x, y in zip(a["logprobs"].to_pylist(), b["logprobs"].to_pylist()):
        assert len(x) == len(y) and max((abs(p - q) for p, q in zip(x, y)), default=0.0) < 1e-5
    assert nat.require("rollout.r01")["backend"]["name"] == "native"
    assert ref.require("rollout.r01")["backend"]["name"] == "transformers"


# -- openai: real `opdflow serve` subprocesses ------------------------------------------------

def _remote(base_url: str, name: str) -> dict:
    return {"backend": "openai", "openai": {"base_url": base_url, "model": name, "api_key_env": "OPDFLOW_TEST_NO_KEY"}}


@pytest.mark.integration
def test_openai_rollout_and_scoring_equal_the_local_backends(tmp_path, monkeypatch, opdflow_serve):
    from opdflow.infra.sampling import backends
    from opdflow.infra.models.lm import load_model, load_tokenizer
    monkeypatch.setenv("OPDFLOW_TEST_NO_KEY", "sk-test-secret")  # sent as a bearer token, never recorded
    store = open_store(str(tmp_path / "store"))
    ref = _run(store, "local", {}, stages=("rollout.r01",))
    sdir, tdir = ref.materialize("models", "student"), ref.materialize("models", "teacher")
    s_srv, t_srv = opdflow_serve(sdir, "student"), opdflow_serve(tdir, "teacher")
    s_url, t_url = s_srv.url + "/v1", t_srv.url + "/v1"
    try:
        remote = _run(store, "remote", {"rollout": _remote(s_url, "student"), "scoring": _remote(t_url, "teacher")},
                      stages=("rollout.r01", "score.r01"))
    finally:
        s_srv.stop()
        t_srv.stop()
    ro, sc = read_parts(remote, "rollout.r01", "rollouts"), read_parts(remote, "score.r01", "scores")
    for stage, url, name in (("rollout.r01", s_url, "student"), ("score.r01", t_url, "teacher")):
        b = remote.require(stage)["backend"]
        assert (b["name"], b["base_url"], b["model"]) == ("openai", url, name)
        assert "sk-test-secret" not in str(remote.require(stage))

    # rollouts: `opdflow serve` samples a one-prompt request with its seed exactly as the
    # transformers backend does in process: the same table, logprobs up to float rounding
    tok = load_tokenizer(sdir)
    want = read_parts(ref, "rollout.r01", "rollouts")
    assert ro.drop(["logprobs"]).equals(want.drop(["logprobs"]))
    for got_lp, want_lp in zip(ro["logprobs"].to_pylist(), want["logprobs"].to_pylist()):
        assert max((abs(a - b) for a, b in zip(got_lp, want_lp)), default=0.0) < 1e-5

    # scores: the teacher served vs the transformers scorer on the same rollouts
    teacher = load_model(tdir).eval()
    local = backends.scorer_for(ref.config)(teacher, tok, ro["prompt_ids"].to_pylist(), ro["response_ids"].to_pylist(),
                                            lambda f, m="": None)
    assert sc["prompt_id"].equals(ro["prompt_id"]) and sc["sample_idx"].equals(ro["sample_idx"])
    for got_lp, got_ids, got_top, (lp, ids, top, _tail) in zip(sc["teacher_logprobs"].to_pylist(), sc["topk_ids"].to_pylist(),
                                                       sc["topk_logprobs"].to_pylist(), local):
        assert len(got_lp) == len(lp) and max((abs(a - b) for a, b in zip(got_lp, lp)), default=0.0) < 1e-5
        for gi, gt, i, t in zip(got_ids, got_top, ids, top):  # ties may come in another order: compare by id
            assert sorted(gi) == sorted(i)
            want = dict(zip(i, t))
            assert max(abs(want[k] - v) for k, v in zip(gi, gt)) < 1e-5

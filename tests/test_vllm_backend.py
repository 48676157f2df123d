"""The vllm backends' parts that need no vLLM: the server's flags, the environment check that
names the missing piece, the process watcher (a real process tree, killed with its parent), the
native sampler's warm-up comparison, `auto`'s choice, and the sensitivity comparison.

The real-vLLM tests are in tests/test_vllm_real.py. Run: ``python -m pytest -q tests/test_vllm_backend.py``
(a few seconds).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from opdflow.infra.sampling import backends, vllm_backend
from opdflow.infra.config import Config, VllmConfig, parse_config
from opdflow.infra.sampling.native import compare_steps
from opdflow.tasks import sensitivity

WATCHER = Path(vllm_backend.__file__).with_name("procwatch.py")


def test_server_args():
    cfg = VllmConfig(max_model_len=128, kv_cache_gib=0.5, extra_args=["--enforce-eager"])
    args = vllm_backend.server_args("/m", "float32", cfg, max_logprobs=64, logprobs_mode="processed_logprobs", seed=3)
    flags = dict(zip(args[::2], args[1::2]))
    assert flags["--model"] == str(Path("/m").resolve()) and flags["--dtype"] == "float32"
    assert flags["--max-logprobs"] == "64" and flags["--logprobs-mode"] == "processed_logprobs"
    assert flags["--max-model-len"] == "128" and flags["--kv-cache-memory-bytes"] == str(2 ** 29)
    assert flags["--seed"] == "3" and flags["--generation-config"] == "vllm" and args[-1] == "--enforce-eager"
    raw = vllm_backend.server_args("/m", "float32", VllmConfig(kv_cache_gib=None), max_logprobs=1, logprobs_mode=None)
    assert "--logprobs-mode" not in raw and "--kv-cache-memory-bytes" not in raw and "--max-model-len" not in raw
    assert vllm_backend.launcher(VllmConfig(command=["/opt/v/bin/vllm", "serve"])) == ["/opt/v/bin/vllm", "serve"]
    assert vllm_backend.launcher(VllmConfig(python="py"))[1:] == ["-m", vllm_backend.SERVER_MODULE]


def test_check_available_names_the_missing_piece(tmp_path):
    with pytest.raises(vllm_backend.VllmUnavailable, match=r"scoring\.vllm\.python: .* does not exist: .*make vllm-env"):
        vllm_backend.check_available(VllmConfig(python=str(tmp_path / "py")), "scoring.vllm")
    with pytest.raises(vllm_backend.VllmUnavailable, match=r"rollout\.vllm\.python: .* has no vllm package"):
        vllm_backend.check_available(VllmConfig(python=sys.executable))


def test_transport_settings_are_not_part_of_a_result():
    a = Config().section("rollout")
    b = parse_config({"rollout": {"vllm": {"python": "/elsewhere/python", "startup_timeout_s": 5}}}).section("rollout")
    assert backends.result_settings(a) == backends.result_settings(b)
    c = parse_config({"rollout": {"vllm": {"extra_args": ["--enforce-eager"]}}}).section("rollout")
    assert backends.result_settings(a) != backends.result_settings(c)


def test_auto_is_transformers_until_native_is_verified_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backends.rollout_backend(Config()) == "transformers"
    monkeypatch.setattr(backends, "NATIVE_CUDA_VERIFIED", True)
    assert backends.rollout_backend(Config()) == "native"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backends.rollout_backend(Config()) == "transformers"


def test_warmup_comparison_names_the_difference():
    t, lp = torch.tensor([3, 4, 5]), torch.tensor([-0.1, -0.2, -0.3])
    assert compare_steps(t, lp, t.clone(), lp + 1e-5) is None
    msg = compare_steps(t, lp, torch.tensor([3, 9, 5]), lp)
    assert "tokens differ in 1 of 3 slots (first: slot 1, graph 4 vs eager 9)" in msg
    msg = compare_steps(t, lp, t, lp + torch.tensor([0.0, 0.5, 0.0]))
    assert "logprobs differ by up to 0.5" in msg and "tokens" not in msg
    assert "logprobs differ" in compare_steps(t, torch.tensor([float("nan"), -0.2, -0.3]), t, lp)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.integration
def test_watcher_takes_the_tree_down_when_its_parent_is_killed(tmp_path):
    """A parent starts the watcher (as VllmServer does) over a shell that starts two sleeps, one in
    the background; the parent is SIGKILLed; every process of the tree is gone soon after."""
    pids = tmp_path / "pids"
    tree = f"sleep 300 & echo $! >> {pids}; echo $$ >> {pids}; sleep 300"
    parent_code = (f"import subprocess, sys, time\n"
                   f"p = subprocess.Popen([sys.executable, {str(WATCHER)!r}, str(__import__('os').getpid()), '2', '--', "
                   f"'bash', '-c', {tree!r}], start_new_session=True)\n"
                   f"print(p.pid, flush=True); time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    watcher = int(parent.stdout.readline())
    deadline = time.time() + 20
    while time.time() < deadline and (not pids.exists() or len(pids.read_text().split()) < 2):
        time.sleep(0.1)
    tree_pids = [int(x) for x in pids.read_text().split()] + [watcher]
    assert all(_alive(p) for p in tree_pids)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(p) for p in tree_pids):
        time.sleep(0.1)
    left = [p for p in tree_pids if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"still running after the parent's SIGKILL: {left}"


def test_sensitivity_comparison():
    outs = {"a": [[1, 2, 3], [4, 5], [7]], "b": [[1, 2, 3], [4, 6], [7, 8]], "c": [[9], [4, 5], [7]]}
    r = sensitivity.compare(outs, correct={"a": [True, False, True], "b": [True, True, False]},
                            forced={"a": [[-0.1, -0.2, -0.3], [-1.0, -2.0], [-0.5]],
                                    "b": [[-0.1, -0.25, -0.3], [-1.0, -2.0], [-0.5]]}, n_resamples=200)
    pairs = {(p["a"], p["b"]): p for p in r["pairs"]}
    assert pairs[("a", "b")]["n_differ"] == 2 and pairs[("a", "b")]["first_divergence_hist"] == {"1": 2}
    assert pairs[("a", "c")]["share_differ"] == pytest.approx(1 / 3) and pairs[("a", "c")]["first_divergence_hist"] == {"0": 1}
    assert r["per_backend"]["a"]["score"]["mean"] == pytest.approx(2 / 3) and "score" not in r["per_backend"]["c"]
    assert r["teacher_forced_vs_reference"]["b"]["max_abs"] == pytest.approx(0.05)
    assert sensitivity.first_divergence([1, 2], [1, 2]) is None and sensitivity.first_divergence([1], [1, 2]) == 1
    assert sensitivity.histogram([0, 3, 3, 40, 900]) == {"0": 1, "2-3": 2, "32-63": 1, "512+": 1}
    md = sensitivity.markdown(r, {"vllm": "no .venv-vllm"})
    assert "| a vs b | 2/3 (66.7%) | 1: 2 |" in md and "`vllm` did not run: no .venv-vllm" in md


def test_padded_lm_head_masks_rollouts_and_refuses_vllm_scoring(tmp_path):
    """A padded checkpoint (lm_head rows > tokenizer): the vllm rollout requests carry
    `allowed_token_ids = range(tokenizer size)` (none for an unpadded one, nor from a generic
    openai client); `scoring.backend: vllm` is refused by preflight and by `vllm_backend.score`
    before any server starts (vLLM's prompt_logprobs normalise over every row)."""
    import json
    from opdflow.infra.config import ConfigError
    from opdflow.infra.models.lm import SampleSettings, load_tokenizer
    from opdflow.infra.sampling.openai_backend import completion_request
    from opdflow.infra.preflight import preflight
    from opdflow.infra.testbeds.realpair import build_pair
    pair = build_pair(tmp_path / "pair", rows=4096, n_prompts=32)
    tok = load_tokenizer(pair["teacher"])
    n_tok = len(tok)
    assert vllm_backend.lm_head_rows(pair["teacher"]) == 4096 and vllm_backend.sample_mask(pair["student"], tok) == n_tok
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "config.json").write_text(json.dumps({"text_config": {"vocab_size": n_tok}}))
    assert vllm_backend.lm_head_rows(nested) == n_tok and vllm_backend.sample_mask(nested, tok) is None
    st = SampleSettings(max_new_tokens=4)
    assert completion_request("m", [1], 0, st, 2, n_tok)["allowed_token_ids"] == list(range(n_tok))
    assert "allowed_token_ids" not in completion_request("m", [1], 0, st, 2)

    raw = {"teacher": {"path": str(pair["teacher"])}, "student": {"path": str(pair["student"])},
           "data": {"source": str(pair["data"]), "prompt_field": "question", "answer_field": "answer",
                    "n_train": 8, "n_probe": 2, "n_eval": 2},
           "scoring": {"backend": "vllm"}, "eval": {"tasks": ["opdflow_data"], "answer_regex": "([0-9]+)"}}
    with pytest.raises(ConfigError, match=r"padded vocabulary.*normalised over the \d+ padded rows") as ei:
        preflight(parse_config(raw))
    assert ei.value.field == "scoring.backend" and f"4096 rows but its tokenizer {n_tok} tokens" in str(ei.value)
    with pytest.raises(ValueError, match="vllm cannot score this teacher"):  # before check_available: no vLLM here
        vllm_backend.score(VllmConfig(python=str(tmp_path / "no-python")), pair["teacher"], "float32", tok,
                           [[1]], [[2]], 4)

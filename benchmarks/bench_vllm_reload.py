"""vLLM per-round cost: restarting `vllm serve` on a new checkpoint vs reloading its weights in place.

Why: an on-policy round writes a new student checkpoint, and the `vllm` rollout backend
(`infra.sampling.vllm_backend`) starts a fresh server on it every round. vLLM 0.32 can instead re-read a
checkpoint of the same architecture into a running engine (dev mode: `POST /collective_rpc`
`reload_weights(weights_path=...)`, then `POST /reset_prefix_cache`; `VllmServer.reload`). This
script measures both and checks that the reload is real: greedy outputs after reloading
checkpoint B into a server started on A must equal a fresh server's on B (and differ from A's).

Checkpoints: the demo student (`--model-dir`, or a tiny one built here with head_dim 32, which
vLLM's CPU attention needs) as A, and A with every weight perturbed by Gaussian noise as B (same
architecture). Each server runs with `--enforce-eager` unless `--compile`. The demo models tie
the LM head to the input embeddings (as Qwen2-0.5B does), so the check is repeated on an untied
copy of A and B (`lm_head.weight` its own tensor): vLLM 0.32's layerwise in-place reload loads no
weight into a tied `ParallelLMHead` (its log: "ParallelLMHead: Failed to load weights") and puts
the old tensor back, which leaves the head on A's embeddings. Per case the row counts the prompts
whose greedy output after the reload differs from a fresh server's on B and from A's, and keeps
the server's reload warnings.

Results (one JSON line: device, versions, git commit, timestamp, restart_s, reload_s, checks) are
appended to ``benchmarks/results/vllm_reload.jsonl``. CPU figures are not GPU figures: on a GPU a
restart also pays CUDA-graph capture and a real model's weight load.

Run: ``python benchmarks/bench_vllm_reload.py [--python .venv-vllm/bin/python]``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "vllm_reload.jsonl"


def perturbed_copy(src: Path, dest: Path, scale: float, seed: int = 0) -> Path:
    import torch
    from opdflow.infra.models.lm import load_model
    shutil.copytree(src, dest)
    model = load_model(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(dest)
    return dest


def untied_copy(src: Path, dest: Path) -> Path:
    """`src` with its LM head untied from the input embeddings (same values, its own tensor)."""
    import torch
    from opdflow.infra.models.lm import load_model
    shutil.copytree(src, dest)
    model = load_model(src)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.save_pretrained(dest)
    again = load_model(dest)
    assert not again.config.tie_word_embeddings
    assert again.lm_head.weight.data_ptr() != again.get_input_embeddings().weight.data_ptr()
    return dest


def n_differ(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x != y for x, y in zip(a, b))


def reload_warnings(srv) -> list[str]:
    """The server log's lines about weights a reload did not load."""
    text = srv.log_path.read_text(errors="replace") if srv.log_path.exists() else ""
    return sorted({ln.split("] ", 1)[-1].strip() for ln in text.splitlines()
                   if "Failed to load weights" in ln or "were not loaded" in ln})


def greedy(srv, cfg, tok, prompts, n_new: int) -> list[list[int]]:
    from opdflow.infra.sampling import vllm_backend
    from opdflow.tasks.sensitivity import greedy_settings
    with vllm_backend.client(cfg, srv) as c:
        out = c.sample(prompts, list(range(len(prompts))), greedy_settings(n_new, 32), tok.eos_token_id,
                       tok.pad_token_id)
    return [s.response_ids for s in out]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--model-dir", default=None, help="checkpoint A (default: a tiny demo student built here)")
    ap.add_argument("--noise", type=float, default=0.05, help="std of the noise that makes checkpoint B")
    ap.add_argument("--compile", action="store_true", help="let vLLM compile (no --enforce-eager)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()

    from opdflow.infra.testbeds import demo
    from opdflow.infra.artifacts import provenance
    from opdflow.infra.sampling import vllm_backend
    from opdflow.infra.config import VllmConfig
    from opdflow.infra.models.lm import load_tokenizer
    cfg = VllmConfig(python=a.python, extra_args=[] if a.compile else ["--enforce-eager"], kv_cache_gib=0.25)
    version = vllm_backend.check_available(cfg)
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-reload-"))
    try:
        if a.model_dir:
            ckpt_a = Path(a.model_dir)
        else:
            wide = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, batch_size=32, lr=1e-2,
                        warmup_steps=5)
            spec = demo.DemoSpec.tiny().model_copy(update=dict(
                teacher=demo.ModelSpec(num_hidden_layers=2, train_steps=40, **wide),
                student=demo.ModelSpec(num_hidden_layers=1, train_steps=20, **wide)))
            ckpt_a = demo.build_demo(spec, work / "demo")["student"]
        ckpt_b = perturbed_copy(ckpt_a, work / "b", a.noise)
        tok = load_tokenizer(ckpt_a)
        prompts = [tok(e["prompt"])["input_ids"] for e in demo.make_examples("eval", 32, seed=0)]

        def args(d):
            return vllm_backend.server_args(d, "float32", cfg, max_logprobs=1, logprobs_mode=None)

        def reload_case(a_dir: Path, b_dir: Path, fresh_b: list[list[int]] | None) -> dict:
            """A dev-mode server on A, reloaded to B (and back and forth); its outputs against a
            fresh server's on B (started here unless given)."""
            with vllm_backend.VllmServer(cfg, args(a_dir), dev_mode=True) as srv:
                start_a = srv.startup_s
                out_a = greedy(srv, cfg, tok, prompts, 32)
                reloads = [srv.reload(b_dir)]
                out_reloaded = greedy(srv, cfg, tok, prompts, 32)
                reloads += [srv.reload(a_dir), srv.reload(b_dir)]  # more timings, back and forth
                out_reloaded_again = greedy(srv, cfg, tok, prompts, 32)
                warnings = reload_warnings(srv)
            restart = None
            if fresh_b is None:
                with vllm_backend.VllmServer(cfg, args(b_dir)) as srv:
                    restart = srv.startup_s
                    fresh_b = greedy(srv, cfg, tok, prompts, 32)
            return {"start_a_s": round(start_a, 2), "restart_b_s": None if restart is None else round(restart, 2),
                    "reload_s": [round(x, 3) for x in reloads],
                    "reload_equals_fresh_server": out_reloaded == fresh_b and out_reloaded_again == fresh_b,
                    "b_differs_from_a": out_a != fresh_b,
                    "n_differ_reloaded_vs_fresh_b": n_differ(out_reloaded, fresh_b),
                    "n_differ_reloaded_again_vs_fresh_b": n_differ(out_reloaded_again, fresh_b),
                    "n_differ_reloaded_vs_a": n_differ(out_reloaded, out_a), "n_differ_a_vs_b": n_differ(out_a, fresh_b),
                    "reload_warnings": warnings}

        # restart cost: a fresh server on B, stopped, and started again (stop + start = a restart)
        with vllm_backend.VllmServer(cfg, args(ckpt_b)) as srv:
            restart_b = srv.startup_s
            out_b = greedy(srv, cfg, tok, prompts, 32)
            t0 = time.monotonic()
            srv.stop()
            stop_s = time.monotonic() - t0
        tied = reload_case(ckpt_a, ckpt_b, out_b)
        untied = reload_case(untied_copy(ckpt_a, work / "a-untied"), untied_copy(ckpt_b, work / "b-untied"), None)
        row = {"bench": "vllm_reload", "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "device": provenance.device_name(), "cpu_threads": os.cpu_count(),
               "load_avg_1m": round(os.getloadavg()[0], 2), "git_commit": provenance.git_commit(), "vllm": version,
               "torch": provenance.dist_version("torch"), "server_flags": cfg.extra_args,
               "restart_s": [round(restart_b, 2), tied["start_a_s"], untied["start_a_s"], untied["restart_b_s"]],
               "stop_s": round(stop_s, 2), "reload_s": tied["reload_s"] + untied["reload_s"],
               "tied_lm_head": tied, "untied_lm_head": untied,
               "reload_equals_fresh_server": {"tied_lm_head": tied["reload_equals_fresh_server"],
                                              "untied_lm_head": untied["reload_equals_fresh_server"]},
               "n_prompts": len(prompts), "new_tokens": 32, "noise": a.noise}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()

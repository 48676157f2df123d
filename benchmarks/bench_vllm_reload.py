"""vLLM per-round cost: restarting `vllm serve` on a new checkpoint vs reloading its weights in place.

Why: an on-policy round writes a new student checkpoint, and the `vllm` rollout backend
(`infra.vllm_backend`) starts a fresh server on it every round. vLLM 0.32 can instead re-read a
checkpoint of the same architecture into a running engine (dev mode: `POST /collective_rpc`
`reload_weights(weights_path=...)`, then `POST /reset_prefix_cache`; `VllmServer.reload`). This
script measures both and checks that the reload is real: greedy outputs after reloading
checkpoint B into a server started on A must equal a fresh server's on B (and differ from A's).

Checkpoints: the demo student (`--model-dir`, or a tiny one built here with head_dim 32, which
vLLM's CPU attention needs) as A, and A with every weight perturbed by Gaussian noise as B (same
architecture). Each server runs with `--enforce-eager` unless `--compile`.

Results (one JSON line: device, versions, git commit, timestamp, restart_s, reload_s, checks) are
appended to ``benchmarks/results/vllm_reload.jsonl``. CPU figures are not GPU figures: on a GPU a
restart also pays CUDA-graph capture and a real model's weight load.

Run: ``python benchmarks/bench_vllm_reload.py [--python .venv-vllm/bin/python]``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "vllm_reload.jsonl"


def perturbed_copy(src: Path, dest: Path, scale: float, seed: int = 0) -> Path:
    import torch
    from opdflow.infra.lm import load_model
    shutil.copytree(src, dest)
    model = load_model(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(dest)
    return dest


def greedy(srv, cfg, tok, prompts, n_new: int) -> list[list[int]]:
    from opdflow.infra import vllm_backend
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

    from opdflow.infra import demo, provenance, vllm_backend
    from opdflow.infra.config import VllmConfig
    from opdflow.infra.lm import load_tokenizer
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

        with vllm_backend.VllmServer(cfg, args(ckpt_a), dev_mode=True) as srv:
            start_a = srv.startup_s
            out_a = greedy(srv, cfg, tok, prompts, 32)
            reloads = [srv.reload(ckpt_b)]
            out_reloaded = greedy(srv, cfg, tok, prompts, 32)
            reloads += [srv.reload(ckpt_a), srv.reload(ckpt_b)]  # more timings, back and forth
            out_reloaded_again = greedy(srv, cfg, tok, prompts, 32)
        with vllm_backend.VllmServer(cfg, args(ckpt_b)) as srv:
            restart_b = srv.startup_s
            t0 = time.monotonic()
            srv.stop()
            stop_s = time.monotonic() - t0
            srv_b = vllm_backend.VllmServer(cfg, args(ckpt_b)).start()
        try:
            out_b = greedy(srv_b, cfg, tok, prompts, 32)
        finally:
            srv_b.stop()
        row = {"bench": "vllm_reload", "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "device": provenance.device_name(), "git_commit": provenance.git_commit(), "vllm": version,
               "torch": provenance.dist_version("torch"), "server_flags": cfg.extra_args,
               "restart_s": [round(start_a, 2), round(restart_b, 2), round(srv_b.startup_s, 2)],
               "stop_s": round(stop_s, 2), "reload_s": [round(x, 3) for x in reloads],
               "reload_equals_fresh_server": out_reloaded == out_b and out_reloaded_again == out_b,
               "b_differs_from_a": out_a != out_b,
               "n_prompts": len(prompts), "new_tokens": 32, "noise": a.noise}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()

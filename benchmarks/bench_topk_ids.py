"""Benchmark the top-k id check at the kernel boundary (`kernels.reference.check_topk_ids`).

Why this script exists: issue 16 asks that ids be validated where the kernels read them
(duplicates and out-of-range ids fail with a clear error) and that the check be cheap enough
to stay on. It is on unconditionally; this script measures what it costs against the loss it
guards: per shape (N tokens, V vocabulary, K top-k), the median wall time of the check alone
(the reference path's variant: one sort of [N, K] and one host sync; the Triton path sorts
anyway and skips the sort) and of the reference top-k loss + backward
(`kernels.distillation_loss`, backend "reference", which includes the check), over `--repeats`
runs after a warm-up, on this machine's device (CPU here: the GPU figure is not measured).

Results: one JSON line per shape appended to `benchmarks/results/topk_id_check.jsonl`
(device, versions, commit, timestamp, p20/p50/p80) and a markdown table printed.

Run: ``python benchmarks/bench_topk_ids.py`` (``--shapes 1024x4096x64,4096x32000x64 --repeats 5``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from pathlib import Path

import torch

from opdflow.infra.artifacts.provenance import device_name, dist_version, git_commit
from opdflow.kernels import distillation_loss
from opdflow.kernels.reference import check_topk_ids

RESULTS = Path(__file__).resolve().parent / "results" / "topk_id_check.jsonl"


def _pcts(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=10) if len(xs) > 1 else [xs[0]] * 9
    return {"p20": q[1], "p50": statistics.median(xs), "p80": q[7]}


def _time(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench(n: int, v: int, k: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, v, generator=g, requires_grad=True)
    lps, ids = torch.log_softmax(torch.randn(n, v, generator=g), -1).topk(k, dim=-1)
    check = _time(lambda: check_topk_ids(ids, v), repeats)

    def loss():
        out, _ = distillation_loss(s, teacher_topk_ids=ids, teacher_topk_logprobs=lps, backend="reference")
        out.backward()
        s.grad = None
    full = _time(loss, repeats)
    c, f = _pcts(check), _pcts(full)
    return {"n": n, "v": v, "k": k, "check_s": c, "loss_fwd_bwd_s": f, "check_share_p50": c["p50"] / f["p50"],
            "repeats": repeats, "device": device_name(), "threads": torch.get_num_threads(),
            "versions": {"torch": dist_version("torch")}, "git_commit": git_commit(),
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="512x4096x64,2048x4096x64,1024x32000x64")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = [bench(*map(int, sh.split("x")), args.repeats) for sh in args.shapes.split(",")]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    print("| N | V | K | check p50 (ms) | reference loss fwd+bwd p50 (ms) | share |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['v']} | {r['k']} | {r['check_s']['p50'] * 1e3:.3f} | "
              f"{r['loss_fwd_bwd_s']['p50'] * 1e3:.1f} | {r['check_share_p50']:.2%} |")


if __name__ == "__main__":
    main()

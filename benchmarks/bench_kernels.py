"""Benchmark the distillation-loss kernels against Liger-Kernel, naive PyTorch and torch.compile.

Why this script exists: issue 3 sets speed and memory targets (>= 80% of the bandwidth floor
at N=16384, V=151936 bf16; >= 1.5x Liger's JSD; fused-linear peak memory <= 25% of naive at
H=4096). This is the one place that measures them. It is a script, not a test.

What it measures, per (divergence, N, V, provider): forward+backward time of the loss wrt the
student logits (CUDA events, after warm-up; p20/p50/p80 over the repeats), peak extra memory
(``torch.cuda.max_memory_allocated`` above the inputs), and achieved bytes/s against the
bandwidth floor: student logits read once + teacher logits read once + gradient written once
(6 bytes per element in bf16). Providers:

* ``opdflow``        ``DistillationLoss(backend="triton")`` (also returns per-token loss; the
                     kernel computes the grad norm too);
* ``naive``          ``reference.per_token_divergence(...).mean()`` with autograd (the repo's
                     one reference, imported -- never re-implemented here);
* ``compiled``       ``torch.compile`` of that naive loss;
* ``liger``          Liger-Kernel's ``LigerJSD`` (for jsd, forward KL = beta 0, reverse KL =
                     beta 1) and ``LigerKLDIVLoss`` (forward KL), when ``liger_kernel`` imports;
                     the log_softmax their API needs is inside the timed region.

With ``--fused`` (default on CUDA) it also compares the peak memory of
``fused_linear_distillation_loss`` against logits = hidden @ W.T + the naive loss at H = 4096.

Results are appended as JSON lines (device name, versions, git commit, timestamp) to
``benchmarks/results/kernels.jsonl``. Without CUDA it runs a tiny smoke configuration on CPU
(the Triton provider only under ``TRITON_INTERPRET=1``), prints it and writes it to
``--out`` only if given: those numbers are NOT GPU figures.

Run: ``python benchmarks/bench_kernels.py`` (GPU) or ``python benchmarks/bench_kernels.py
--out /tmp/smoke.jsonl`` (CPU smoke).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "kernels.jsonl"
GPU_SIZES = [(4096, 32768), (4096, 131072), (4096, 151936), (16384, 32768), (16384, 131072), (16384, 151936)]
CPU_SIZES = [(32, 1000)]
KIND_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "liger_kernel"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    return out


def _git_commit() -> str | None:
    from opdflow.infra.provenance import git_commit
    return git_commit()


def _percentiles(xs: list[float]) -> dict:
    qs = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
    return {"p20_ms": qs[1], "p50_ms": statistics.median(xs), "p80_ms": qs[7]}


def _providers(kind: str, beta: float, cuda: bool) -> dict:
    from opdflow.kernels import DistillationLoss, reference

    def naive(s, t):
        return reference.per_token_divergence(s, teacher_logits=t, kind=kind, beta=beta).mean()

    provs = {"naive": naive}
    if cuda or os.environ.get("TRITON_INTERPRET") == "1":
        mod = DistillationLoss(kind=kind, beta=beta, backend="triton")
        provs["opdflow"] = lambda s, t: mod(s, teacher_logits=t)[0]
    if cuda:
        provs["compiled"] = torch.compile(naive, dynamic=False)
        try:
            from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
        except ImportError:
            pass
        else:
            jsd = LigerJSD(beta=beta)
            provs["liger_jsd"] = lambda s, t: jsd(
                torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1)
            )
            if kind == "forward_kl":
                kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
                provs["liger_kldiv"] = lambda s, t: kl(
                    torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1)
                )
    return provs


def _time_cuda(fn, s, t, warmup, reps) -> tuple[list[float], int]:
    for _ in range(warmup):
        x = s.detach().requires_grad_(True)
        fn(x, t).backward()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        x = s.detach().requires_grad_(True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x, t).backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        del x
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    x = s.detach().requires_grad_(True)
    fn(x, t).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return times, peak


def _time_cpu(fn, s, t, warmup, reps) -> tuple[list[float], None]:
    for _ in range(warmup):
        fn(s.detach().requires_grad_(True), t).backward()
    times = []
    for _ in range(reps):
        x = s.detach().requires_grad_(True)
        t0 = time.perf_counter()
        fn(x, t).backward()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, None


def bench_losses(sizes, kinds, dtype, device, warmup, reps) -> list[dict]:
    cuda = device.type == "cuda"
    rows = []
    for kind in kinds:
        beta = KIND_BETA[kind]
        provs = _providers(kind, beta, cuda)
        for n, v in sizes:
            g = torch.Generator(device=device).manual_seed(0)
            s = torch.randn(n, v, generator=g, device=device, dtype=torch.float32).to(dtype)
            t = torch.randn(n, v, generator=g, device=device, dtype=torch.float32).to(dtype)
            floor_bytes = 3 * n * v * s.element_size()
            for name, fn in provs.items():
                row = {"bench": "loss", "kind": kind, "beta": beta, "N": n, "V": v,
                       "dtype": str(dtype).removeprefix("torch."), "provider": name}
                try:
                    times, peak = (_time_cuda if cuda else _time_cpu)(fn, s, t, warmup, reps)
                except Exception as exc:  # a provider failing (OOM, missing op) is a result too
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    if cuda:
                        torch.cuda.empty_cache()
                else:
                    row.update(_percentiles(times))
                    row["peak_extra_bytes"] = peak
                    row["floor_bytes"] = floor_bytes
                    row["achieved_GBps"] = floor_bytes / (row["p50_ms"] * 1e-3) / 1e9
                rows.append(row)
                print(json.dumps(row), flush=True)
            del s, t
    return rows


def bench_fused(sizes, hidden_dim, dtype, device, kind="reverse_kl") -> list[dict]:
    from opdflow.kernels import distillation_loss, fused_linear_distillation_loss

    rows = []
    for n, v in sizes:
        g = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(n, hidden_dim, generator=g, device=device, dtype=torch.float32).to(dtype)
        w = (torch.randn(v, hidden_dim, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)
        k = 64
        lp, ids = torch.topk(torch.randn(n, v, generator=g, device=device).log_softmax(-1), k, -1)
        cases = {
            "naive_linear": lambda hh, ww: distillation_loss(
                hh @ ww.t(), teacher_topk_ids=ids, teacher_topk_logprobs=lp, kind=kind)[0],
            "fused_linear": lambda hh, ww: fused_linear_distillation_loss(
                hh, ww, teacher_topk_ids=ids, teacher_topk_logprobs=lp, kind=kind, chunk_size=1024)[0],
        }
        for name, fn in cases.items():
            row = {"bench": "fused_linear", "kind": kind, "N": n, "V": v, "H": hidden_dim, "topk": k,
                   "dtype": str(dtype).removeprefix("torch."), "provider": name}
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                hh = h.detach().requires_grad_(True)
                ww = w.detach().requires_grad_(True)
                fn(hh, ww).backward()
                torch.cuda.synchronize()
                row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
                del hh, ww
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(KIND_BETA), choices=list(KIND_BETA))
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON-lines file to append to (GPU default: {DEFAULT_OUT})")
    parser.add_argument("--no-fused", action="store_true", help="skip the fused-linear memory bench")
    parser.add_argument("--hidden", type=int, default=4096)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    meta = {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "versions": _versions(),
        "git_commit": _git_commit(),
        "gpu_figure": cuda,
    }
    if not cuda:
        print("No CUDA device: tiny CPU smoke run. These are NOT GPU figures.", file=sys.stderr)
        rows = bench_losses(CPU_SIZES, args.kinds, torch.float32, device,
                            args.warmup or 1, args.reps or 3)
        out = args.out
    else:
        rows = bench_losses(GPU_SIZES, args.kinds, torch.bfloat16, device,
                            args.warmup or 5, args.reps or 20)
        if not args.no_fused:
            rows += bench_fused([(4096, 151936), (16384, 151936)], args.hidden, torch.bfloat16, device)
        out = args.out or DEFAULT_OUT
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as fh:
            for row in rows:
                fh.write(json.dumps({**meta, **row}) + "\n")
        print(f"appended {len(rows)} rows to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the distillation-loss kernels against Liger-Kernel, naive PyTorch and torch.compile.

Why this script exists: issue 3 sets speed and memory targets (>= 80% of the bandwidth floor
at N=16384, V=151936 bf16; >= 1.5x Liger's JSD; fused-linear peak memory <= 25% of naive at
H=4096), and ``../shared/ANCHORS.md`` gives reference figures measured on an H100. This is the
one place that measures them, every provider side by side in one run. It is a script, not a test.

What it measures, per (divergence, N, V, provider), on bf16 logits ``randn * --scale`` (3, as
ANCHORS): forward+backward time of a mean loss wrt the student logits (``triton.testing.do_bench``:
L2 flushed between repeats, p20/p50/p80), peak memory beyond the inputs
(``torch.cuda.max_memory_allocated`` above what was allocated before the call; the returned
gradient counts), and achieved bytes/s against the bandwidth floor: student logits read once +
teacher logits read once + gradient written once (6 bytes per element in bf16). The floor in ms
uses the device-to-device copy bandwidth measured at the start of the same run. Providers:

* ``opdflow``            ``triton_per_token_divergence(...).mean()`` (one program per row; the
                         kernel also returns per-token loss and gradient norm);
* ``opdflow_pipelined``  the same with ``schedule="pipelined"`` (rows split over programs; see
                         ``kernels/triton_divergence.py``, "Schedules");
* ``naive``              ``reference.per_token_divergence(...).mean()`` with autograd (the repo's
                         one reference, imported -- never re-implemented here);
* ``compiled``           ``torch.compile`` of that naive loss;
* ``liger_jsd``          Liger-Kernel's ``LigerJSD`` (jsd; forward KL = beta 0, reverse KL =
                         beta 1, the same convention as ours), and ``liger_kldiv``
                         (``LigerKLDIVLoss``, forward KL), when ``liger_kernel`` imports; the
                         ``log_softmax`` their API needs is inside the timed region, as a user of
                         it must run it.

Fused linear (default on CUDA, ``--no-fused`` to skip): peak memory and time of
``fused_linear_distillation_loss`` against ``hidden @ W.T`` + the naive loss at H = ``--hidden``
(4096) with a top-k teacher (the train stage's case), and against Liger's ``LigerFusedLinearJSD``
at ANCHORS' shape (JSD 0.5, N 8192, student H 1536, teacher H 3584, V 151936).

Results are appended as JSON lines (device, versions, git commit, timestamp) to
``benchmarks/results/kernels.jsonl``, each as soon as it is measured. On a GPU the order is by
priority -- copy bandwidth, the target shape 16384 x 151936, the fused linear, the other shapes
-- and ``--budget-s`` starts no measurement after that many seconds, so a short device session
gets the figures the targets need first; ``--table FILE`` prints the markdown tables that
``kernels/README.md`` shows, from such a file. Without CUDA it runs a tiny smoke configuration
on CPU (the Triton providers only under ``TRITON_INTERPRET=1``), and writes it only to ``--out``:
those numbers are NOT GPU figures and ``--table`` leaves them out unless ``--include-cpu``.

Run: ``python benchmarks/bench_kernels.py`` (GPU, everything; ``--sizes 16384x151936
--kinds reverse_kl`` for a part), ``python benchmarks/bench_kernels.py --table
benchmarks/results/kernels.jsonl``, or ``TRITON_INTERPRET=1 python benchmarks/bench_kernels.py
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
import weakref
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "kernels.jsonl"
ISSUE_SIZES = [(4096, 32768), (4096, 131072), (4096, 151936),
               (16384, 32768), (16384, 131072), (16384, 151936)]
ANCHOR_SIZES = [(8192, 151936), (8192, 128256)]
TARGET_SIZE = (16384, 151936)  # where the issue's bandwidth and Liger targets are set
FUSED_SIZES = [(4096, 151936), (16384, 151936)]  # the fused linear's memory target, at H = --hidden
CPU_SIZES = [(32, 1000)]
KIND_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}
PROVIDERS = ("opdflow", "opdflow_pipelined", "naive", "compiled", "liger_jsd", "liger_kldiv")
GB = 1e9


def _versions() -> dict:
    from opdflow.infra.artifacts.provenance import dist_version

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": dist_version("triton"), "liger_kernel": dist_version("liger-kernel")}


def _percentiles(xs: list[float]) -> dict:
    qs = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
    return {"p20_ms": qs[1], "p50_ms": statistics.median(xs), "p80_ms": qs[7]}


def _providers(kind: str, beta: float, cuda: bool, wanted: set[str], rows_per_group: int) -> dict:
    from opdflow.kernels import reference

    def naive(s, t):
        return reference.per_token_divergence(s, teacher_logits=t, kind=kind, beta=beta).mean()

    provs = {"naive": naive}
    if cuda or os.environ.get("TRITON_INTERPRET") == "1":
        from opdflow.kernels.triton_divergence import triton_per_token_divergence

        provs["opdflow"] = lambda s, t: triton_per_token_divergence(
            s, teacher_logits=t, kind=kind, beta=beta).mean()
        provs["opdflow_pipelined"] = lambda s, t: triton_per_token_divergence(
            s, teacher_logits=t, kind=kind, beta=beta, schedule="pipelined",
            rows_per_group=rows_per_group).mean()
    if cuda:
        # A fresh compile per (kind, shape): one `naive` code object compiled for 24 of them would
        # pass dynamo's recompile limit (8) and silently run eagerly from then on.
        torch._dynamo.reset()
        provs["compiled"] = torch.compile(naive, dynamic=False)
        try:
            from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
        except ImportError:
            print("liger_kernel not importable: no Liger rows", file=sys.stderr)
        else:
            jsd = LigerJSD(beta=beta)
            provs["liger_jsd"] = lambda s, t: jsd(
                torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1))
            if kind == "forward_kl":
                kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
                provs["liger_kldiv"] = lambda s, t: kl(
                    torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1))
    return {k: v for k, v in provs.items() if k in wanted}


def _measure(step, params, cuda: bool, cpu_reps: int = 3) -> dict:
    """Time ``step()`` (forward + backward) and its peak memory beyond what is allocated now."""
    if not cuda:
        step()
        times = []
        for _ in range(cpu_reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
            for p in params:
                p.grad = None
        return _percentiles(times)
    import triton.testing

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for p in params:
        p.grad = None
    p20, p50, p80 = triton.testing.do_bench(step, warmup=25, rep=200, grad_to_none=params,
                                            quantiles=[0.2, 0.5, 0.8])
    return {"p20_ms": p20, "p50_ms": p50, "p80_ms": p80, "peak_extra_bytes": peak}


def _row(bench: str, **fields) -> dict:
    return {"bench": bench, **fields}


class Recorder:
    """Appends each result row to the results file as soon as it is measured, so a run cut off
    by a time limit keeps what it measured, and skips measurements once ``budget_s`` is spent
    (a device session is short: the most important shapes run first)."""

    def __init__(self, out: Path | None, meta: dict, budget_s: float | None = None):
        self.out, self.meta, self.written, self.skipped = out, meta, 0, 0
        self.deadline = None if budget_s is None else time.monotonic() + budget_s
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)

    def attempt(self, row: dict, fn, cuda: bool) -> dict | None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.skipped += 1
            return None
        try:
            row.update(fn())
        except Exception as exc:  # a provider failing (out of memory, missing op) is a result too
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if cuda:
            torch.cuda.empty_cache()
        return self.record(row)

    def record(self, row: dict) -> dict:
        print(json.dumps(row), flush=True)
        if self.out is not None:
            with self.out.open("a") as fh:
                fh.write(json.dumps({**self.meta, **row}) + "\n")
            self.written += 1
        return row


def bench_copy(device, rec: Recorder) -> dict:
    """Device-to-device copy bandwidth (bytes read + written): the practical peak for the floor."""
    import triton.testing

    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return rec.record(_row("copy", bytes=2 * x.numel(), p50_ms=ms, GBps=2 * x.numel() / (ms * 1e-3) / GB))


def bench_losses(rec: Recorder, sizes, kinds, providers, dtype, device, scale, rows_per_group) -> None:
    cuda = device.type == "cuda"
    for n, v in sizes:
        g = torch.Generator(device=device).manual_seed(0)
        s = (torch.randn(n, v, generator=g, device=device) * scale).to(dtype)
        t = (torch.randn(n, v, generator=g, device=device) * scale).to(dtype)
        floor_bytes = 3 * n * v * s.element_size()
        for kind in kinds:
            beta = KIND_BETA[kind]
            for name, fn in _providers(kind, beta, cuda, set(providers), rows_per_group).items():
                x = s.detach().requires_grad_(True)
                row = _row("loss", kind=kind, beta=beta, N=n, V=v, dtype=str(dtype).removeprefix("torch."),
                           provider=name, scale=scale, floor_bytes=floor_bytes)
                if name == "opdflow_pipelined":
                    row["rows_per_group"] = rows_per_group

                def measure():
                    res = _measure(lambda: fn(x, t).backward(), [x], cuda)
                    return {**res, "achieved_GBps": floor_bytes / (res["p50_ms"] * 1e-3) / GB}
                rec.attempt(row, measure, cuda)
                del x
        del s, t


def _topk_fused_cases(ids, lp, backend: str = "auto") -> dict:
    """The fused-linear memory comparison with a top-k teacher (the train stage's case), reverse
    KL: ``name -> loss(hidden, weight)`` for the naive path, the fused default and the fused
    16-bit weight-gradient sum."""
    from opdflow.kernels import fused_linear_distillation_loss, reference

    teacher = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp, kind="reverse_kl")
    return {
        "naive_linear": lambda hh, ww: reference.per_token_divergence(hh @ ww.t(), **teacher).mean(),
        "fused_linear": lambda hh, ww: fused_linear_distillation_loss(hh, ww, **teacher, backend=backend)[0],
        "fused_linear_16bit_sum": lambda hh, ww: fused_linear_distillation_loss(
            hh, ww, **teacher, backend=backend, grad_weight_dtype=ww.dtype)[0],
    }


def bench_fused(rec: Recorder, device, hidden_dim, dtype) -> None:
    """Fused linear vs the unfused path: the issue's memory target and ANCHORS' Liger row."""
    from opdflow.kernels import fused_linear_distillation_loss

    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    # 1. Top-k teacher (what the train stage feeds), H = hidden_dim, reverse KL.
    for n, v in FUSED_SIZES:
        h, w = randn(n, hidden_dim), randn(v, hidden_dim, std=0.02)
        lp, ids = torch.topk(torch.randn(n, v, generator=g, device=device).log_softmax(-1), 64, -1)
        for name, fn in _topk_fused_cases(ids, lp).items():
            hh, ww = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
            row = _row("fused_linear", kind="reverse_kl", N=n, V=v, H=hidden_dim, topk=64,
                       dtype=str(dtype).removeprefix("torch."), provider=name)
            rec.attempt(row, lambda: _measure(lambda: fn(hh, ww).backward(), [hh, ww], True), True)
            del hh, ww
        del h, w, lp, ids
    # 2. ANCHORS' shape: dense teacher from its own hidden states and lm_head, JSD(0.5).
    n, v, hs, ht = 8192, 151936, 1536, 3584
    h, w, th, tw = randn(n, hs), randn(v, hs, std=0.02), randn(n, ht), randn(v, ht, std=0.02)
    cases = {"fused_linear": lambda hh, ww: fused_linear_distillation_loss(
        hh, ww, teacher_hidden=th, teacher_weight=tw, kind="jsd", beta=0.5)[0]}
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        pass
    else:
        liger = LigerFusedLinearJSD(jsd_beta=0.5)
        cases["liger_fused_linear_jsd"] = lambda hh, ww: liger(hh, ww, th, tw, None)
    for name, fn in cases.items():
        hh, ww = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
        row = _row("fused_linear", kind="jsd", beta=0.5, N=n, V=v, H=hs, teacher_H=ht,
                   dtype=str(dtype).removeprefix("torch."), provider=name)
        rec.attempt(row, lambda: _measure(lambda: fn(hh, ww).backward(), [hh, ww], True), True)
        del hh, ww


# --- allocation counts on meta tensors (no GPU needed) ---------------------------------------------

class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created inside the mode while a tensor still refers to them.

    Run on meta tensors, this counts what a path allocates (what ``max_memory_allocated`` reports
    on a GPU, less the caching allocator's rounding) without a GPU or any arithmetic. Views of
    memory made outside the mode are not counted; a storage is freed with its last tensor.
    """

    def __init__(self):
        super().__init__()
        self.refs: dict[int, list[int]] = {}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outside = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs or {}))[0]
                   if isinstance(a, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key not in self.refs:
                if key in outside:
                    continue
                self.refs[key] = [t.untyped_storage().nbytes(), 0]
                self.live += self.refs[key][0]
                self.peak = max(self.peak, self.live)
            self.refs[key][1] += 1
            weakref.finalize(t, self._release, key)
        return out

    def _release(self, key: int) -> None:
        ref = self.refs[key]
        ref[1] -= 1
        if ref[1] == 0:
            self.live -= ref[0]
            del self.refs[key]


class _NoLaunch:
    """Stands in for a Triton kernel on meta tensors: the kernel itself allocates nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def count_fused(rec: Recorder, sizes, hidden_dim: int, topk: int = 64) -> None:
    """Peak extra bytes of the fused linear (Triton backend, launches stubbed) and of the naive
    path, forward + backward, counted on meta tensors: the issue's memory target without a GPU."""
    from opdflow.kernels import triton_divergence as TD

    meta = torch.device("meta")
    kernels = TD._sparse_kernel, TD._dense_kernel
    TD._sparse_kernel = TD._dense_kernel = _NoLaunch()
    try:
        for n, v in sizes:
            ids = torch.empty(n, topk, dtype=torch.long, device=meta)
            lp = torch.empty(n, topk, dtype=torch.float32, device=meta)
            for name, fn in _topk_fused_cases(ids, lp, backend="triton").items():
                hh = torch.empty(n, hidden_dim, dtype=torch.bfloat16, device=meta, requires_grad=True)
                ww = torch.empty(v, hidden_dim, dtype=torch.bfloat16, device=meta, requires_grad=True)
                with LiveBytes() as live:
                    fn(hh, ww).backward()
                rec.record(_row("fused_linear", kind="reverse_kl", N=n, V=v, H=hidden_dim, topk=topk,
                                dtype="bfloat16", provider=name, measure="meta_count",
                                peak_extra_bytes=live.peak))
    finally:
        TD._sparse_kernel, TD._dense_kernel = kernels


# --- the markdown tables kernels/README.md shows ------------------------------------------------

def _cell(row: dict | None) -> str:
    if row is None:
        return "–"
    if "error" in row:
        return "out of memory" if "out of memory" in row["error"].lower() else "error"
    extra = row.get("peak_extra_bytes")
    return f"{row['p50_ms']:.2f}" + (f" · {extra / GB:.1f}" if extra is not None else "")


def render_table(rows: list[dict], include_cpu: bool = False) -> str:
    """Markdown tables from result rows: the latest row wins for each (device, bench, shape, provider)."""
    counted = _counted_table(rows)
    rows = [r for r in rows if r.get("measure") != "meta_count"]
    latest: dict[tuple, dict] = {}
    for r in sorted(rows, key=lambda r: r.get("timestamp", "")):
        if not (r.get("gpu_figure") or include_cpu):
            continue
        key = (r["device"], r["bench"], r.get("kind"), r.get("N"), r.get("V"), r.get("H"), r.get("provider"))
        latest[key] = r
    by_device: dict[str, list[dict]] = defaultdict(list)
    for r in latest.values():
        by_device[r["device"]].append(r)
    if not by_device:
        return "No GPU results yet: run `python benchmarks/bench_kernels.py` on a CUDA machine.\n" + counted
    out = []
    for device, rs in sorted(by_device.items()):
        copy = next((r for r in rs if r["bench"] == "copy"), None)
        bw = copy["GBps"] if copy else None
        ref = max(rs, key=lambda r: r.get("timestamp", ""))
        vers = ref.get("versions", {})
        out.append(f"### {device}\n\ntorch {vers.get('torch')}, Triton {vers.get('triton')}, "
                   f"Liger-Kernel {vers.get('liger_kernel')}, commit {str(ref.get('git_commit'))[:12]}, "
                   f"{ref.get('timestamp')}" + (f"; device-to-device copy {bw:,.0f} GB/s" if bw else "") + ".\n")
        loss = [r for r in rs if r["bench"] == "loss"]
        provs = [p for p in PROVIDERS if any(r["provider"] == p for r in loss)]
        if loss:
            out.append("Forward + backward from logits, p50 ms · extra GB; `% floor` = the floor (logits read once, gradient "
                       "written once: 6 B/elem in bf16) at the copy bandwidth over the opdflow time.\n")
            head = ["kind", "N × V", "floor ms"] + provs + ["opdflow % floor", "pipelined % floor"]
            out.append("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
            shapes = sorted({(r["kind"], r["N"], r["V"]) for r in loss}, key=lambda k: (list(KIND_BETA).index(k[0]), k[1], k[2]))
            for kind, n, v in shapes:
                cells = {r["provider"]: r for r in loss if (r["kind"], r["N"], r["V"]) == (kind, n, v)}
                floor_ms = cells[next(iter(cells))]["floor_bytes"] / (bw * GB) * 1e3 if bw else None
                line = [kind, f"{n} × {v}", f"{floor_ms:.2f}" if floor_ms else "–"]
                line += [_cell(cells.get(p)) for p in provs]
                for p in ("opdflow", "opdflow_pipelined"):
                    r = cells.get(p)
                    line.append(f"{100 * floor_ms / r['p50_ms']:.0f}%" if floor_ms and r and "p50_ms" in r else "–")
                out.append("| " + " | ".join(line) + " |")
            out.append("")
        fused = [r for r in rs if r["bench"] == "fused_linear"]
        if fused:
            out.append("Fused linear, p50 ms · extra GB (peak beyond the inputs).\n")
            out.append("| kind | N × V | H (teacher H) | provider | result | vs the unfused path |\n|---|---|---|---|---|---|")
            for r in sorted(fused, key=lambda r: (r["kind"], r["N"], r["provider"])):
                base = next((b for b in fused if b["provider"] == "naive_linear" and b["N"] == r["N"]
                             and b["kind"] == r["kind"]), None)
                ratio = "–"
                if base and r is not base and "peak_extra_bytes" in r and "peak_extra_bytes" in base:
                    ratio = f"{100 * r['peak_extra_bytes'] / base['peak_extra_bytes']:.0f}% memory"
                h = f"{r['H']}" + (f" ({r['teacher_H']})" if r.get("teacher_H") else "")
                out.append(f"| {r['kind']} | {r['N']} × {r['V']} | {h} | {r['provider']} | {_cell(r)} | {ratio} |")
            out.append("")
    return "\n".join(out) + "\n" + counted


def _counted_table(rows: list[dict]) -> str:
    """The fused-linear allocation counts (``--count-memory``), latest row per case."""
    latest = {}
    for r in sorted((r for r in rows if r.get("measure") == "meta_count"), key=lambda r: r.get("timestamp", "")):
        latest[(r["N"], r["V"], r["H"], r["provider"])] = r
    if not latest:
        return ""
    ref = max(latest.values(), key=lambda r: r.get("timestamp", ""))
    out = [f"\nFused linear, peak bytes allocated beyond the inputs, forward + backward, counted on meta tensors "
           f"(no GPU: `--count-memory`; torch {ref.get('versions', {}).get('torch')}, commit "
           f"{str(ref.get('git_commit'))[:12]}). Reverse KL, top-{ref.get('topk')} teacher, bf16.\n",
           "| N × V | H | naive (GB) | fused, float32 sum (default) | fused, 16-bit sum |", "|---|---|---|---|---|"]
    for n, v, h in sorted({k[:3] for k in latest}):
        naive = latest.get((n, v, h, "naive_linear"))
        if not naive:
            continue
        cells = []
        for name in ("fused_linear", "fused_linear_16bit_sum"):
            r = latest.get((n, v, h, name))
            cells.append(f"{r['peak_extra_bytes'] / GB:.2f} GB ({100 * r['peak_extra_bytes'] / naive['peak_extra_bytes']:.0f}%)"
                         if r else "–")
        out.append(f"| {n} × {v} | {h} | {naive['peak_extra_bytes'] / GB:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in part.split("x")) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(KIND_BETA), choices=list(KIND_BETA))
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    parser.add_argument("--sizes", type=_sizes, default=None,
                        help="comma-separated NxV (GPU default: the issue's six and ANCHORS' two)")
    parser.add_argument("--scale", type=float, default=3.0, help="logits = randn * scale")
    parser.add_argument("--rows-per-group", type=int, default=16, help="pipelined schedule")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON-lines file to append to (GPU default: {DEFAULT_OUT})")
    parser.add_argument("--no-fused", action="store_true", help="skip the fused-linear bench")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--table", type=Path, default=None, help="print the tables of a results file and exit")
    parser.add_argument("--include-cpu", action="store_true", help="with --table: CPU smoke rows too")
    parser.add_argument("--count-memory", action="store_true",
                        help="count the fused linear's allocations on meta tensors (no GPU) and exit")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no measurement after this many seconds (rows are written as they come)")
    args = parser.parse_args(argv)

    if args.table is not None:
        rows = [json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]
        print(render_table(rows, include_cpu=args.include_cpu), end="")
        return 0
    from opdflow.infra.artifacts.provenance import git_commit

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    meta = {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "versions": _versions(),
        "git_commit": git_commit(),
        "gpu_figure": cuda,
    }
    if args.count_memory:
        meta.update(device="meta (allocation count)", gpu_figure=False)
        rec = Recorder(args.out or DEFAULT_OUT, meta)
        count_fused(rec, args.sizes or FUSED_SIZES, args.hidden)
    elif not cuda:
        print("No CUDA device: tiny CPU smoke run. These are NOT GPU figures.", file=sys.stderr)
        rec = Recorder(args.out, meta, args.budget_s)
        bench_losses(rec, args.sizes or CPU_SIZES, args.kinds, args.providers, torch.float32,
                     device, args.scale, min(args.rows_per_group, 4))
    else:
        # Priority order, for a short device session: bandwidth, the issue's target shape,
        # the fused-linear memory target, then the other shapes.
        rec = Recorder(args.out or DEFAULT_OUT, meta, args.budget_s)
        sizes = args.sizes or [TARGET_SIZE] + [sz for sz in ISSUE_SIZES + ANCHOR_SIZES if sz != TARGET_SIZE]
        bench_copy(device, rec)
        bench_losses(rec, sizes[:1], args.kinds, args.providers, torch.bfloat16, device, args.scale,
                     args.rows_per_group)
        if not args.no_fused:
            bench_fused(rec, device, args.hidden, torch.bfloat16)
        bench_losses(rec, sizes[1:], args.kinds, args.providers, torch.bfloat16, device, args.scale,
                     args.rows_per_group)
    if rec.out is not None:
        print(f"appended {rec.written} rows to {rec.out}", file=sys.stderr)
    if rec.skipped:
        print(f"time budget spent: {rec.skipped} measurements skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

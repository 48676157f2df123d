"""Benchmark streaming per-token aggregation (`opdflow.infra.artifacts.streaming`) over sharded Parquet.

Why this script exists: the rock stage's per-token aggregation must keep up with large probe
sets without its memory growing with the number of records. Targets: >= 1,000,000 records/s
per core, and peak memory above the post-import baseline flat from 1M to 10M records (10M's
within 1.5x of 1M's). This is the one place that measures them. It is a script, not a test.

What it does, per size N (default 1M, 2M, 5M, 10M records):
1. in a subprocess, writes N synthetic per-token records as `part-NNNNN.parquet` shards
   (zstd, ~1M records each, generated shard by shard) into a temp dir under /tmp: token_id drawn Zipf-like over
   a 151,936-token vocabulary, kl and grad_norm positive float32, prompt_id and position int32;
2. in a fresh subprocess (so the peak RSS is that run's own): imports, records the RSS
   baseline (`ru_maxrss`), limits pyarrow to `--threads` CPU and I/O threads, runs
   `aggregate_dataset` once to warm up, then `--repeats` timed passes (median wall time;
   process CPU time also recorded), then the peak RSS;
3. deletes the temp dataset.

The files were just written, so they are read from the page cache: the figure is decode +
aggregate throughput, not disk bandwidth. Results are appended as JSON lines to
`benchmarks/results/rock_stream.jsonl`, and a markdown table with PASS/FAIL per target is
printed.

Run: ``python benchmarks/bench_rock_stream.py`` (``--sizes 1000000,2000000 --threads 1``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "rock_stream.jsonl"
DEFAULT_SIZES = (1_000_000, 2_000_000, 5_000_000, 10_000_000)
VOCAB = 151_936
ZIPF_S = 1.1
POSITIONS_PER_PROMPT = 512
TARGET_PER_CORE = 1_000_000
FLAT_RATIO = 1.5


# -- synthetic data -------------------------------------------------------------------------


def _zipf_sampler(rng, vocab: int = VOCAB, s: float = ZIPF_S):
    """Token ids with P(rank r) ~ 1/(r+1)^s; ranks mapped to ids by a fixed permutation."""
    import numpy as np

    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** s)
    cdf /= cdf[-1]
    ids_by_rank = rng.permutation(vocab).astype(np.int32)

    def sample(n: int):
        ranks = np.minimum(np.searchsorted(cdf, rng.random(n)), vocab - 1)
        return ids_by_rank[ranks]

    return sample


def _synthetic_parts(n_records: int, part_records: int, seed: int):
    """Yield pyarrow Tables of at most `part_records` rows, one at a time (bounded memory)."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    sample_ids = _zipf_sampler(rng)
    for start in range(0, n_records, part_records):
        n = min(part_records, n_records - start)
        index = np.arange(start, start + n, dtype=np.int64)
        yield pa.table({
            "prompt_id": (index // POSITIONS_PER_PROMPT).astype(np.int32),
            "position": (index % POSITIONS_PER_PROMPT).astype(np.int32),
            "token_id": sample_ids(n),
            "kl": (rng.exponential(0.5, n) + 1e-6).astype(np.float32),
            "grad_norm": (rng.gamma(2.0, 0.5, n) + 1e-6).astype(np.float32),
        })


def writer_main(args) -> None:
    from opdflow.infra.artifacts.streaming import write_parts

    paths = write_parts(args.write, _synthetic_parts(args.records, args.part_records, args.seed))
    print(json.dumps({"parts": len(paths), "dataset_mb": sum(p.stat().st_size for p in paths) / 2**20}))


def _run_self(*flags: str) -> dict:
    """Run this script with `flags` in a fresh interpreter; its last stdout line is JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *flags]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_dataset(data_dir: Path, records: int, args) -> dict:
    """Generate in a subprocess, so this (parent) process stays small: see `run_child`."""
    return _run_self("--write", str(data_dir), "--records", str(records), "--part-records", str(args.part_records),
                     "--seed", str(args.seed))


# -- the measured run (child process) -------------------------------------------------------


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _vmhwm_mb() -> float | None:
    """This process's own peak RSS (VmHWM), a cross-check on ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def child_main(args) -> None:
    import numpy  # noqa: F401  (imports are part of the baseline, not of the measurement)
    import pyarrow as pa

    from opdflow.infra.artifacts.streaming import aggregate_dataset, token_dataset

    pa.set_cpu_count(args.threads)
    pa.set_io_thread_count(args.threads)
    baseline = _maxrss_mb()
    dataset = token_dataset(args.child)
    aggregate_dataset(dataset, batch_size=args.batch_size)  # warm-up
    walls, cpus = [], []
    for _ in range(args.repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        agg = aggregate_dataset(dataset, batch_size=args.batch_size)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    if agg.n_records != args.records:
        raise SystemExit(f"aggregated {agg.n_records} records, expected {args.records}")
    print(json.dumps({"seconds": statistics.median(walls), "seconds_all": walls,
                      "cpu_seconds": statistics.median(cpus), "baseline_rss_mb": baseline,
                      "peak_rss_mb": _maxrss_mb(), "peak_vmhwm_mb": _vmhwm_mb(), "versions": _versions(),
                      "distinct_tokens": int((agg.freq > 0).sum())}))


def run_child(data_dir: Path, records: int, args) -> dict:
    """The measured run. Linux carries the parent's RSS high-water mark across fork+exec into
    the child's `ru_maxrss`, so the parent imports neither numpy nor pyarrow and generates
    no data itself: its few MB stay below the child's own baseline."""
    return _run_self("--child", str(data_dir), "--records", str(records), "--threads", str(args.threads),
                     "--batch-size", str(args.batch_size), "--repeats", str(args.repeats))


# -- provenance -----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict:
    import numpy
    import pyarrow

    return {"python": platform.python_version(), "numpy": numpy.__version__, "pyarrow": pyarrow.__version__}


def provenance(threads: int) -> dict:
    from opdflow.infra.artifacts.provenance import git_commit

    return {"threads": threads, "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
            "git_commit": git_commit(), "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


# -- one size, all sizes, the report --------------------------------------------------------


def measure_size(records: int, args) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="opdflow-rock-stream-", dir=args.tmp))
    try:
        written = write_dataset(data_dir, records, args)
        res = run_child(data_dir, records, args)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    rate = records / res["seconds"]
    return {"records": records, "seconds": res["seconds"], "records_per_s": rate,
            "records_per_s_per_core": rate / args.threads, "cpu_seconds": res["cpu_seconds"],
            "records_per_cpu_s": records / res["cpu_seconds"], "peak_rss_mb": res["peak_rss_mb"],
            "baseline_rss_mb": res["baseline_rss_mb"],
            "peak_minus_baseline_mb": res["peak_rss_mb"] - res["baseline_rss_mb"],
            "seconds_all": res["seconds_all"], "parts": written["parts"], "dataset_mb": written["dataset_mb"],
            "peak_vmhwm_mb": res["peak_vmhwm_mb"], "versions": res["versions"],
            "distinct_tokens": res["distinct_tokens"], "batch_size": args.batch_size, "repeats": args.repeats}


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(rows: list[dict]) -> str:
    lines = ["| records | parts | seconds (median) | records/s | records/s/core | records/CPU-s "
             "| peak RSS MB | baseline MB | peak - baseline MB | >= 1M/s/core |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        lines.append(f"| {r['records']:,} | {r['parts']} | {r['seconds']:.3f} | {r['records_per_s']:,.0f} "
                     f"| {r['records_per_s_per_core']:,.0f} | {r['records_per_cpu_s']:,.0f} | {r['peak_rss_mb']:.1f} "
                     f"| {r['baseline_rss_mb']:.1f} | {r['peak_minus_baseline_mb']:.1f} "
                     f"| {_verdict(r['records_per_s_per_core'] >= TARGET_PER_CORE)} |")
    lines += ["", *targets(rows)]
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    slowest = min(rows, key=lambda r: r["records_per_s_per_core"])
    out = [f"- throughput >= {TARGET_PER_CORE:,} records/s per core: "
           f"{_verdict(slowest['records_per_s_per_core'] >= TARGET_PER_CORE)} "
           f"(slowest {slowest['records_per_s_per_core']:,.0f} at {slowest['records']:,} records)"]
    small, large = min(rows, key=lambda r: r["records"]), max(rows, key=lambda r: r["records"])
    if small is large:
        return out + ["- memory flat: n/a (one size only)"]
    a, b = small["peak_minus_baseline_mb"], large["peak_minus_baseline_mb"]
    ok = b <= FLAT_RATIO * max(a, 0.0)
    out.append(f"- peak - baseline memory flat ({large['records']:,} within {FLAT_RATIO}x of "
               f"{small['records']:,}): {_verdict(ok)} ({b:.1f} MB vs {a:.1f} MB, ratio {b / a if a else float('inf'):.2f})")
    return out


def append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES),
                   help="comma-separated record counts")
    p.add_argument("--threads", type=int, default=1, help="pyarrow CPU and I/O threads (default 1: per core)")
    p.add_argument("--part-records", type=int, default=1_000_000, help="records per parquet part")
    p.add_argument("--batch-size", type=int, default=1 << 17, help="aggregate_dataset batch_size")
    p.add_argument("--repeats", type=int, default=3, help="timed passes after one warm-up (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default="/tmp", help="where the temp datasets go")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--write", help=argparse.SUPPRESS)
    p.add_argument("--records", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    if args.write:
        return writer_main(args)
    meta = provenance(args.threads)
    rows = []
    for records in (int(s) for s in args.sizes.split(",")):
        row = {**measure_size(records, args), **meta}
        print(f"{records:,} records: {row['seconds']:.3f} s, {row['records_per_s_per_core']:,.0f} records/s/core, "
              f"peak - baseline {row['peak_minus_baseline_mb']:.1f} MB", flush=True)
        rows.append(row)
    append_rows(args.out, rows)
    print(f"\n{meta['cpu_model']}, {meta['cpu_count']} CPUs, pyarrow threads {args.threads}, "
          f"versions {rows[-1]['versions']}, commit {meta['git_commit']}\n")
    print(report(rows))
    print(f"\nappended {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()

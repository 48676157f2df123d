"""The kernel benchmark script runs (CPU smoke, Triton interpreted) and renders its tables.

The GPU figures themselves are never produced by tests; this keeps the script that produces
them from rotting between GPU sessions, and checks the table's floor arithmetic.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_kernels.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cpu_only():
    if torch.cuda.is_available():
        pytest.skip("the smoke mode is the CPU run; on a GPU the script runs the full benchmark")


def test_cpu_smoke_run_writes_rows_and_a_table(tmp_path):
    pytest.importorskip("triton")
    _cpu_only()
    out = tmp_path / "smoke.jsonl"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, str(SCRIPT), "--kinds", "reverse_kl", "--sizes", "6x300",
                          "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["provider"] for r in rows} == {"naive", "opdflow", "opdflow_pipelined"}
    for r in rows:
        assert r["gpu_figure"] is False and r["p50_ms"] > 0 and r["device"].startswith("cpu")
        assert r["versions"]["torch"] and r["git_commit"]
    table = subprocess.run([sys.executable, str(SCRIPT), "--table", str(out)],
                           capture_output=True, text=True, check=True).stdout
    assert "No GPU results yet" in table  # CPU rows are not GPU figures
    table = subprocess.run([sys.executable, str(SCRIPT), "--table", str(out), "--include-cpu"],
                           capture_output=True, text=True, check=True).stdout
    assert "| reverse_kl | 6 × 300 |" in table


def test_a_spent_time_budget_skips_measurements_and_writes_nothing(tmp_path):
    _cpu_only()
    out = tmp_path / "none.jsonl"
    res = subprocess.run([sys.executable, str(SCRIPT), "--kinds", "reverse_kl", "--providers", "naive",
                          "--sizes", "6x300", "--budget-s", "0", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "1 measurements skipped" in res.stderr and not out.exists()


def test_table_floor_arithmetic_and_latest_row_wins():
    bench = _module()
    meta = dict(device="GPU X", gpu_figure=True, versions={"torch": "t", "triton": "3"}, git_commit="abc")
    rows = [
        dict(meta, timestamp="1", bench="copy", GBps=3000.0, p50_ms=1.0, bytes=3e9),
        dict(meta, timestamp="1", bench="loss", kind="reverse_kl", N=1, V=2, floor_bytes=6e9,
             provider="opdflow", p50_ms=9.0, peak_extra_bytes=2e9),
        dict(meta, timestamp="2", bench="loss", kind="reverse_kl", N=1, V=2, floor_bytes=6e9,
             provider="opdflow", p50_ms=2.5, peak_extra_bytes=2e9),
        dict(meta, timestamp="2", bench="loss", kind="reverse_kl", N=1, V=2, floor_bytes=6e9,
             provider="naive", error="OutOfMemoryError: CUDA out of memory"),
        dict(meta, timestamp="2", bench="fused_linear", kind="reverse_kl", N=4, V=5, H=8,
             provider="naive_linear", p50_ms=10.0, peak_extra_bytes=8e9),
        dict(meta, timestamp="2", bench="fused_linear", kind="reverse_kl", N=4, V=5, H=8,
             provider="fused_linear", p50_ms=12.0, peak_extra_bytes=1e9),
    ]
    table = bench.render_table(rows)
    # floor: 6e9 B at 3000 GB/s = 2 ms; the later opdflow row (2.5 ms) wins: 80 % of the floor.
    assert "| reverse_kl | 1 × 2 | 2.00 | 2.50 · 2.0 | out of memory | 80% | – |" in table
    assert "| fused_linear | 12.00 · 1.0 | 12% memory |" in table
    assert "device-to-device copy 3,000 GB/s" in table


def test_live_bytes_counts_new_storages_not_views_and_frees_them():
    bench = _module()
    with bench.LiveBytes() as live:
        a = torch.empty(1000, 1000, device="meta")  # 4 MB
        b, c = a.t(), a[:10]                        # views: nothing new
        d = a + 1                                   # 8 MB
        del a, b, c                                 # a's storage goes: 4 MB
        e = torch.empty(500, 1000, device="meta")   # 6 MB
    assert (live.peak, live.live) == (8_000_000, 6_000_000)
    del d, e


def test_count_memory_writes_fused_and_naive_rows_and_their_table(tmp_path):
    out = tmp_path / "count.jsonl"
    res = subprocess.run([sys.executable, str(SCRIPT), "--count-memory", "--sizes", "4096x1000", "--hidden", "16",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["provider"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"naive_linear", "fused_linear", "fused_linear_16bit_sum"}
    assert all(r["measure"] == "meta_count" and r["gpu_figure"] is False for r in rows.values())
    naive, fused, fused16 = (rows[p]["peak_extra_bytes"] for p in ("naive_linear", "fused_linear",
                                                                 "fused_linear_16bit_sum"))
    # naive: [4096, 1000] logits and their float32 log-softmax, gradients...; fused: one 1024-row chunk
    assert naive > 4096 * 1000 * 6 and fused < naive / 4
    assert fused16 < fused  # no float32 [V, H] sum
    table = subprocess.run([sys.executable, str(SCRIPT), "--table", str(out)], capture_output=True, text=True,
                           check=True).stdout
    assert "counted on meta tensors" in table and "| 4096 × 1000 | 16 |" in table

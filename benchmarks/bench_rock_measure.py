"""Rock analysis at a real vocabulary size: peak memory and throughput of `tasks.rock.measure.measure`.

Why: at V = 151,936 (Qwen's padded lm_head) the old whole-batch measurement held full student
and teacher logits, a float32 gradient and a float64 copy for every response token of a batch
(~28 bytes x V per token: ~17 GB for one 4k-token response). `measure` now runs the model
bodies to hidden states and applies the lm_heads `chunk_tokens` positions at a time, so its
peak should be flat in the sequence length. This benchmark builds a small local pair (hidden
size 64, 2 layers, lm_heads with 151,936 rows, 151,643 of them real), measures one response of
512, 1k, 2k, 4k tokens, each in a fresh child process, and records:

- peak memory: the child's VmHWM (peak RSS, from /proc/self/status) during `measure` minus its
  RSS just before (models built and warmed up on a 16-token probe); torch's CPU allocations are
  not visible to tracemalloc, so RSS is the measure;
- the measurement's tokens/s, and the ratio to teacher scoring's (`infra.models.scoring.teacher_scores`,
  one model, top-k 20) on the same model and tokens, same `chunk_tokens` (goal: analysis costs at
  most 2x scoring, i.e. ratio >= 0.5). `measure` runs two models (student and teacher) where
  scoring runs one, so 0.5 is what two scorings would give.

Run: `nice -n 10 .venv/bin/python benchmarks/bench_rock_measure.py` (a few minutes on 2 CPU
cores). Appends to benchmarks/results/rock_measure.jsonl.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "rock_measure.jsonl"
ROWS, REAL, PROMPT = 151_936, 151_643, 8


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _model(seed: int, hidden: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=ROWS, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8192, pad_token_id=0,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def child_main(args) -> None:
    import pyarrow as pa
    import torch
    from opdflow.infra.models.scoring import teacher_scores
    from opdflow.tasks.rock.measure import measure
    torch.set_num_threads(args.threads)
    student, teacher = _model(0, args.hidden), _model(1, args.hidden)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(1, REAL, (PROMPT,), generator=g).tolist()
    response = torch.randint(1, REAL, (args.length,), generator=g).tolist()
    table = pa.table({"prompt_ids": [prompt], "response_ids": [response]})
    counts = torch.bincount(torch.tensor(response), minlength=REAL).clamp_min(1)
    warm = pa.table({"prompt_ids": [prompt], "response_ids": [response[:16]]})
    measure(student, teacher, 0, warm, 1, counts, vocab=REAL, chunk_tokens=args.chunk_tokens)
    teacher_scores(teacher, [prompt], [response[:16]], 0, 20, 1, args.chunk_tokens, vocab=REAL)
    before = _rss_mb("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    out, sums = measure(student, teacher, 0, table, 1, counts, vocab=REAL, chunk_tokens=args.chunk_tokens)
    t_measure = time.perf_counter() - t0
    peak = _rss_mb("VmHWM")
    assert len(out["kl"]) == args.length and sums["freq_weighted"].shape == (REAL,)
    t0 = time.perf_counter()
    teacher_scores(teacher, [prompt], [response], 0, 20, 1, args.chunk_tokens, vocab=REAL)
    t_score = time.perf_counter() - t0
    print(json.dumps({"measure_s": t_measure, "score_s": t_score, "rss_before_mb": before, "peak_rss_mb": peak,
                      "peak_reset": reset, "torch": torch.__version__}))


def _versions(torch_version: str) -> dict:
    import transformers
    return {"python": platform.python_version(), "torch": torch_version, "transformers": transformers.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args)
    from opdflow.infra.artifacts.provenance import git_commit
    rows = []
    for n in args.lengths:
        cmd = [sys.executable, __file__, "--child", "--length", str(n), "--chunk-tokens", str(args.chunk_tokens),
               "--hidden", str(args.hidden), "--threads", str(args.threads)]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        row = {"bench": "rock_measure", "tokens": n, "prompt_tokens": PROMPT, "lm_head_rows": ROWS, "vocab": REAL,
               "hidden": args.hidden, "layers": 2, "chunk_tokens": args.chunk_tokens,
               "memory_measure": "peak RSS (VmHWM) during measure minus RSS before it, fresh child per length",
               "peak_minus_before_mb": res["peak_rss_mb"] - res["rss_before_mb"], **res,
               "measure_tokens_per_s": n / res["measure_s"], "score_tokens_per_s": n / res["score_s"],
               "measure_over_score_throughput": res["score_s"] / res["measure_s"],
               "device": "cpu", "threads": args.threads, "cpu_count": os.cpu_count(),
               "versions": _versions(res.pop("torch")), "git_commit": git_commit(),
               "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        rows.append(row)
        print(f"{n:5d} tokens: peak +{row['peak_minus_before_mb']:.0f} MB, measure {row['measure_tokens_per_s']:.0f} "
              f"tok/s, scoring {row['score_tokens_per_s']:.0f} tok/s, ratio {row['measure_over_score_throughput']:.2f}",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()

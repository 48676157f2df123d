"""Peak memory of one training micro-batch: the model's logits vs `train.fused_lm_head`.

Why this script exists: at a large vocabulary the student's `[tokens, V]` logits, their float32
copies in the loss and their gradient dominate a train step's memory; `train.fused_lm_head`
applies the lm_head inside the loss 1024 rows at a time instead. This measures what that saves,
both paths side by side in one run, through the train stage's own `loss_step` (forward, loss,
backward) on a Llama-shaped student with random weights and a synthetic top-k teacher.

Each (path, repeat) runs in a fresh subprocess. On CUDA the figure is
`torch.cuda.max_memory_allocated()` above what was allocated before the step; on CPU it is the
growth of the process's peak resident set (`ru_maxrss`) over the step, which includes allocator
slack and is coarser. Time is the step's wall time. CPU rows are NOT GPU figures.

Results are appended as JSON lines (device, versions, git commit, timestamp) to
``benchmarks/results/train_memory.jsonl``.

Run: ``python benchmarks/bench_train_memory.py`` (defaults: vocab 65536, hidden 512, 2 layers,
8 sequences of 64 prompt + 448 response tokens, fp32 on CPU / bf16 on CUDA).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "train_memory.jsonl"
PATHS = ("logits", "fused_lm_head")


def _rows(n_seq: int, prompt_len: int, resp_len: int, vocab: int, topk: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_seq):
        resp = torch.randint(0, vocab, (resp_len,), generator=g).tolist()
        ids = torch.stack([torch.randperm(vocab, generator=g)[:topk] for _ in range(resp_len)])
        lps = torch.log_softmax(torch.randn(resp_len, topk, generator=g), -1) - 0.1  # some tail mass
        rows.append({"prompt_ids": torch.randint(0, vocab, (prompt_len,), generator=g).tolist(),
                     "response_ids": resp, "topk_ids": ids.tolist(), "topk_logprobs": lps.tolist(),
                     "logprobs": [0.0] * resp_len})
    return rows


def one_step(args) -> dict:
    """Run in the child: build the model and inputs, then measure one micro-batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from opdflow.kernels import DistillationLoss, FusedLinearDistillationLoss
    from opdflow.tasks.train_worker import loss_step

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 256), tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device=dev, dtype=dtype).train()
    rows = _rows(args.seqs, args.prompt_len, args.resp_len, args.vocab, args.topk, seed=1)
    loss_cls = FusedLinearDistillationLoss if args.path == "fused_lm_head" else DistillationLoss
    loss_fn = loss_cls(kind="reverse_kl")
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss, per_token, _w, trainer_lp = loss_step(model, loss_fn, rows, frozenset(), pad_id=0)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"path": args.path, "seconds": time.perf_counter() - t0, "peak_extra_bytes": peak,
            "loss": float(loss), "trainer_lp_mean": float(trainer_lp.mean()),
            "tokens": args.seqs * args.resp_len, "measure": "cuda_max_allocated" if cuda else "ru_maxrss_growth"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--resp-len", type=int, default=448)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)  # the child's mode
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.path:
        print(json.dumps(one_step(args)))
        return 0

    from opdflow.infra.artifacts.provenance import git_commit
    import transformers

    cuda = torch.cuda.is_available()
    meta = {"bench": "train_memory",
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.machine()})",
            "threads": args.threads, "git_commit": git_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "gpu_figure": cuda,
            "shape": {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "seqs", "prompt_len",
                                                    "resp_len", "topk")}}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = []
    for rep in range(args.repeats):
        for path in PATHS:
            res = subprocess.run([sys.executable, __file__, *passthrough, "--path", path],
                                 capture_output=True, text=True, check=True)
            row = {**meta, "repeat": rep, **json.loads(res.stdout.strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
            results.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        for row in results:
            fh.write(json.dumps(row) + "\n")
    print(f"appended {len(results)} rows to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rollout throughput, side by side in one run: which sampler should produce on-policy samples.

Why this script exists: rollouts dominate a round's wall time once the student is a real model,
and the transformers backend (`infra.models.lm.sample`, dynamic cache, per-step Python) idles a GPU
behind the host. `infra.sampling.native.NativeSampler` (static cache, decode step as a CUDA graph,
continuous batching) is meant to fix that; this is the one place its speed is measured.

Providers, each sampling at temperature 1 (top-p 1, no top-k) the same prompts:

* ``generate_dynamic``  transformers ``model.generate(do_sample=True)``, dynamic KV cache;
* ``generate_static_compiled``  ``generate`` with ``GenerationConfig(cache_implementation="static",
  compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))`` (CUDA only; its first
  call, the compilation, is reported as ``warmup_s``);
* ``lm_sample``  ``opdflow.infra.models.lm.sample`` (the transformers backend);
* ``native``  ``opdflow.infra.sampling.native.NativeSampler`` (building it and capturing the decode graph
  is reported as ``warmup_s``, not in the timed runs).

Every sequence generates exactly ``new_tokens`` tokens (our samplers get an end id no token has;
``generate`` gets ``min_new_tokens``), so tokens/s = sequences x new_tokens / seconds. Seconds
are the median over ``--repeats`` timed runs after one warm-up run. The native rows also record
``same_tokens_as_lm_sample``: the share of sequences identical to ``lm_sample``'s.

Shapes: on CUDA a Qwen2-0.5B-shaped model with random weights (hidden 896, 24 layers, 14 heads,
2 kv heads, intermediate 4864, vocab 151936, bf16), 128-token prompts, 256 new tokens, batch 64
and 256. With ``--demo`` (CPU): the demo teacher and student shapes (``DemoSpec()``; untrained
weights unless ``--demo-dir`` names a built demo), the demo's eval prompts, 48 new tokens, batch
8 and 32, fp32, ``--threads`` torch threads. CPU rows are NOT GPU figures.

Results are appended as JSON lines (device name, versions, git commit, timestamp) to
``benchmarks/results/rollout.jsonl``, each as soon as it is measured.

Run: ``python benchmarks/bench_rollout.py`` (GPU) or ``python benchmarks/bench_rollout.py --demo``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from opdflow.infra.artifacts.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "rollout.jsonl"
NO_EOS = -1  # an end id no token has: every sequence runs its full budget


def _versions() -> dict:
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev: torch.device) -> tuple[float, object]:
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    return time.perf_counter() - t0, out


# -- workloads ----------------------------------------------------------------------------------

def qwen2_shaped(dev: torch.device):
    """A Qwen2-0.5B-shaped causal LM with random weights, bf16."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768,
                      rope_theta=1_000_000.0, tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen2ForCausalLM(cfg)
    return model.to(torch.bfloat16).eval()


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def demo_models(demo_dir: Path | None) -> dict:
    """The demo teacher and student: built weights from `demo_dir`, else untrained ones of the
    same shapes (speed does not depend on the weights)."""
    from opdflow.infra.testbeds import demo
    from opdflow.infra.models.lm import load_model
    if demo_dir is not None:
        return {f"demo-{role}": load_model(demo_dir / role) for role in ("teacher", "student")}
    spec, tok = demo.DemoSpec(), demo.build_tokenizer()
    return {f"demo-{role}": demo._make_model(getattr(spec, role), tok, spec, seed=i).eval()
            for i, role in enumerate(("teacher", "student"))}


def demo_prompts(n: int) -> list[list[int]]:
    from opdflow.infra.testbeds import demo
    tok = demo.build_tokenizer()
    return [tok(e["prompt"])["input_ids"] for e in demo.make_examples("eval", n, seed=0)]


# -- providers ----------------------------------------------------------------------------------

def _generate_call(model, prompts, new_tokens: int, pad_id: int, generation_config=None):
    """`generate` on a left-padded batch; returns the sampled ids per sequence."""
    from transformers import GenerationConfig
    dev = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(dev), mask.to(dev)
    gc = generation_config or GenerationConfig()
    gc.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, pad_token_id=pad_id)
    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)[:, width:].tolist()
    return run


def providers(model, prompts, new_tokens: int, batch: int, pad_id: int, dev: torch.device) -> dict:
    """name -> (warm-up callable or None, timed callable): each returns list of token lists."""
    from transformers import CompileConfig, GenerationConfig
    from opdflow.infra.models.lm import SampleSettings, sample
    from opdflow.infra.sampling.native import NativeSampler

    st = SampleSettings(temperature=1.0, top_p=1.0, max_new_tokens=new_tokens, batch_size=batch)
    seeds = list(range(len(prompts)))
    out = {"generate_dynamic": (None, _generate_call(model, prompts, new_tokens, pad_id))}
    if dev.type == "cuda":
        gc = GenerationConfig(cache_implementation="static",
                              compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))
        out["generate_static_compiled"] = (None, _generate_call(model, prompts, new_tokens, pad_id, gc))
    out["lm_sample"] = (None, lambda: [s.response_ids for s in sample(model, prompts, seeds, st, NO_EOS, pad_id)])
    holder: dict = {}

    def native_warmup():
        holder["sampler"] = NativeSampler(model, batch, max(map(len, prompts)) + new_tokens)
        holder["sampler"].sample(prompts[:1], seeds[:1], SampleSettings(temperature=1.0, max_new_tokens=2), NO_EOS, pad_id)

    out["native"] = (native_warmup, lambda: [s.response_ids for s in holder["sampler"].sample(
        prompts, seeds, st, NO_EOS, pad_id)])
    return out


def measure(name: str, warmup, run, repeats: int, dev: torch.device) -> dict:
    warmup_s = None
    if warmup is not None:
        warmup_s, _ = _timed(warmup, dev)
    first_s, outputs = _timed(run, dev)  # warm-up run (for the compiled provider: compilation)
    if name == "generate_static_compiled":
        warmup_s = first_s
    secs = []
    for _ in range(repeats):
        s, outputs = _timed(run, dev)
        secs.append(s)
    tokens = sum(len(x) for x in outputs)
    med = statistics.median(secs)
    return {"provider": name, "seconds": round(med, 4), "seconds_all": [round(s, 4) for s in secs],
            "tokens": tokens, "tokens_per_s": round(tokens / med, 1),
            "warmup_s": None if warmup_s is None else round(warmup_s, 3), "_outputs": outputs}


# -- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", action="store_true", help="CPU: demo model shapes and small batches")
    ap.add_argument("--demo-dir", type=Path, default=None, help="a built demo (teacher/, student/) to load")
    ap.add_argument("--batches", type=int, nargs="*", default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=128, help="CUDA workload only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads with --demo")
    ap.add_argument("--providers", nargs="*", default=None, help="subset of provider names")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    from opdflow.infra.models.lm import offline
    offline()
    cuda = torch.cuda.is_available() and not args.demo
    dev = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.demo:
        print("no CUDA device: run with --demo for the CPU variant", file=sys.stderr)
        return 2
    if args.demo:
        torch.set_num_threads(args.threads)
        batches, new_tokens = args.batches or [8, 32], args.new_tokens or 48
        models = demo_models(args.demo_dir)
        pad_id, dtype = 0, "float32"
    else:
        batches, new_tokens = args.batches or [64, 256], args.new_tokens or 256
        models = {"qwen2-0.5b-shaped-random": qwen2_shaped(dev)}
        pad_id, dtype = 0, "bfloat16"

    common = {
        "bench": "rollout",
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "threads": None if cuda else torch.get_num_threads(),
        "git_commit": git_commit(),
        **_versions(),
    }
    if not cuda:
        common["note"] = "CPU run on demo shapes: not GPU figures"
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for model_name, model in models.items():
        for batch in batches:
            if args.demo:
                prompts = demo_prompts(batch)
            else:
                prompts = random_prompts(batch, args.prompt_len, model.config.vocab_size)
            ref = None
            for name, (warmup, run) in providers(model, prompts, new_tokens, batch, pad_id, dev).items():
                if args.providers and name not in args.providers:
                    continue
                res = measure(name, warmup, run, args.repeats, dev)
                outputs = res.pop("_outputs")
                if name == "lm_sample":
                    ref = outputs
                if name == "native" and ref is not None:
                    res["same_tokens_as_lm_sample"] = sum(a == b for a, b in zip(outputs, ref)) / len(ref)
                row = {**common, "model": model_name, "dtype": dtype, "batch": batch, "n_sequences": len(prompts),
                       "prompt_len_mean": round(statistics.mean(map(len, prompts)), 2), "new_tokens": new_tokens,
                       **res}
                rows.append(row)
                with args.out.open("a") as fh:  # as it comes: a run cut off keeps what it measured
                    fh.write(json.dumps(row) + "\n")
                print(f"{model_name:28s} batch {batch:4d} {name:26s} {row['tokens_per_s']:10.1f} tok/s "
                      f"({row['seconds']:.3f} s; warm-up {row['warmup_s']})", flush=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    if not cuda:
        print("(generate_static_compiled is CUDA only: not run)")
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

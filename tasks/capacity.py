"""Capacity planning: a round's wall time on N GPUs, from throughputs a run measured.

`opdflow capacity --run-id ID` reads the last committed main round of a run (its
rollout, scoring and training stages record tokens and seconds in their manifest
entries), takes each stage's per-worker throughput, and predicts the round's wall time
on N GPUs: rollout and scoring are sharded (`scale.shards`), so they divide by N; the
train stage is data parallel under FSDP (`train.nproc_per_node`), so it divides by N
times an efficiency factor (1.0 unless you measured otherwise: gradient all-reduce
and the fixed global batch make it sub-linear). The stage with the longest time bounds
the round. A prediction from figures measured on one device class holds for that class.
"""
from __future__ import annotations

from opdflow.infra.artifacts.manifest import Run
from opdflow.tasks.plan import round_stage

STAGES = ("rollout", "score", "train")


def measured(run: Run) -> dict:
    """Tokens per round and per-worker tokens/s of each stage, from the last committed round."""
    for r in range(run.config.train.rounds, 0, -1):
        entries = {k: run.entry(round_stage(k, r)) for k in STAGES}
        if all(entries.values()):
            break
    else:
        raise ValueError(f"run {run.run_id!r} has no fully committed round yet")
    ro, sc, tr = entries["rollout"]["metrics"], entries["score"]["metrics"], entries["train"]["metrics"]
    per_worker = {  # sharded stages: tokens over the sum of their shards' seconds
        "rollout": ro["n_tokens"] / max(ro.get("shard_seconds_sum") or entries["rollout"]["seconds"], 1e-9),
        "score": sc["n_tokens"] / max(sc.get("shard_seconds_sum") or entries["score"]["seconds"], 1e-9),
        "train": tr["tokens_per_s"] / max(1, tr.get("world_size", 1)),
    }
    return {"round": r, "tokens": {"rollout": ro["n_tokens"], "score": sc["n_tokens"], "train": tr["tokens_trained"]},
            "tokens_per_s": per_worker, "device": entries["train"]["backend"].get("device", "?")}


def predict(tokens: dict[str, float], tokens_per_s: dict[str, float], gpus: list[int],
            train_efficiency: float = 1.0) -> list[dict]:
    """Seconds per stage and per round for each GPU count, and the bounding stage."""
    rows = []
    for n in gpus:
        secs = {k: tokens[k] / (tokens_per_s[k] * n * (train_efficiency if k == "train" else 1.0)) for k in STAGES}
        rows.append({"gpus": n, **{f"{k}_s": round(v, 3) for k, v in secs.items()},
                     "round_s": round(sum(secs.values()), 3), "bound_by": max(secs, key=secs.get)})
    return rows


def markdown(m: dict, rows: list[dict]) -> str:
    head = [f"Measured on round {m['round']} ({m['device']}): per-worker tokens/s "
            + ", ".join(f"{k} {v:,.0f}" for k, v in m["tokens_per_s"].items())
            + "; tokens per round: " + ", ".join(f"{k} {v:,}" for k, v in m["tokens"].items()), "",
            "| GPUs | rollout s | scoring s | training s | round s | bounded by |", "|---:|---:|---:|---:|---:|---|"]
    return "\n".join(head + [f"| {r['gpus']} | {r['rollout_s']} | {r['score_s']} | {r['train_s']} | {r['round_s']} | "
                             f"{r['bound_by']} |" for r in rows])

"""Stage `train.rNN`: update the student on the per-token distillation objective.

Round r starts from round r-1's checkpoint and optimizer state (the initial student and
a fresh optimizer for r = 1) and takes `train.steps_per_round` optimizer steps over
the round's rollouts, `train.batch_size` sequences each, in a seeded order. The loss is
`opdflow.kernels.DistillationLoss` (reverse KL by default, as OPD uses) between the
student's full-vocabulary logits and the teacher's stored top-k, averaged over response
tokens. Triton kernels on CUDA, the PyTorch reference elsewhere (`train.kernel`).

Ablation arms (`ablate-rock.*`, `ablate-random.*`) are this same stage with the loss
weight of some token ids set to zero: the rock tokens found by the `rock` stage, or a
frequency-matched random set. Zero-weighted tokens drop out of the sum; the mean is
still over all response tokens, so the other tokens' gradients are unchanged.

Outputs: `model/*` (safetensors + config + tokenizer), `optimizer.safetensors` and
`optimizer.json` (the state the next round resumes), `token_losses.parquet` (every
token's loss, weight and the trainer's own log-prob of it at every step it was trained
on), and `mismatch.png`.

Sampler vs trainer: the rollout stored the sampler's log-prob of every token it sampled;
the trainer recomputes it in its forward. At the round's first step the trainer's weights
are the sampler's, so the two should agree up to numerics; `metrics["mismatch"]`
(`opdflow.tasks.mismatch`) summarises the difference on that step's tokens and the report
shows it with a histogram. It is skipped when the sampler's log-probs are of a modified
distribution (temperature != 1, top-p < 1, top-k). `train.tis_cap` turns on truncated
importance sampling: each token's loss weight is multiplied by min(p_trainer / p_sampler, cap).

Where it runs: `train.nproc_per_node: 1` (the default) trains in the task's own
process; N > 1 launches `torchrun --standalone --nproc-per-node N` on this machine, a
subprocess the task owns, with FSDP2 per decoder layer (NCCL on GPUs, gloo on CPU). The
loop is `opdflow.tasks.train_worker` either way; the global batch is fixed by the config,
so the world size changes results only at float rounding (see tests/tasks/test_fsdp.py
for the measured tolerance) and is not part of the stage key.

Crash safety: with `train.checkpoint_every: N` the round also writes an in-round
checkpoint every N steps under its output prefix (`partial/step-NNNNNN/`: DCP shards of
weights and optimizer in safetensors, RNG state, the log so far; `state.json` written
last commits it). A retry of the same stage (same key) resumes from the latest committed
one, under any world size, and reaches the same weights as an uninterrupted run:
batches are a fixed seeded sequence, so the data position is just the step number.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from opdflow.infra.manifest import Run, RunError, StageContext, run_stage
from opdflow.tasks import rollout as rollout_stage
from opdflow.tasks import score as score_stage
from opdflow.tasks.common import stage_task
from opdflow.tasks.plan import parse, round_stage, student_before
from opdflow.tasks.train_worker import PROGRESS, train_round


def bypass_tokens(run: Run, arm: str) -> list[int]:
    if arm == "main":
        return []
    sets = json.loads(run.read_output("rock", "rock_sets.json"))
    return sorted(sets["rock" if arm == "ablate-rock" else "random_matched"])


def round_rows(run: Run, ro_stage: str, sc_stage: str) -> pa.Table:
    """The round's rollouts with the teacher's top-k beside each response."""
    ro, sc = rollout_stage.load(run, ro_stage), score_stage.load(run, sc_stage)
    return ro.select(["prompt_id", "sample_idx", "prompt_ids", "response_ids", "logprobs"]).append_column(
        "topk_ids", sc["topk_ids"]).append_column("topk_logprobs", sc["topk_logprobs"])


def latest_partial(store, prefix: str, dest: Path) -> Path | None:
    """Download (verified) the latest committed in-round checkpoint under `prefix`."""
    marks = sorted(k for k in store.list(prefix + "/") if k.endswith("/state.json"))
    if not marks:
        return None
    meta = json.loads(store.get_bytes(marks[-1]))
    base = marks[-1][: -len("/state.json")]
    for rel, sha in meta["sha256"].items():
        store.get_file(f"{base}/{rel}", dest / rel, sha256=sha)
    (dest / "state.json").write_text(json.dumps(meta))
    return dest


def launch(spec_path: Path, nproc: int, progress) -> None:
    """torchrun on this machine, N processes; progress lines from rank 0 are forwarded."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "opdflow.tasks.train_worker", str(spec_path)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tail: list[str] = []
    for line in proc.stdout:
        if line.startswith(PROGRESS):
            _, frac, *msg = line.rstrip("\n").split(" ", 2)
            progress(float(frac), msg[0] if msg else "")
        else:
            tail = (tail + [line.rstrip()])[-60:]
    if proc.wait() != 0:
        raise RuntimeError(f"torchrun ({nproc} processes) failed with exit code {proc.returncode}:\n" + "\n".join(tail))


def run(run: Run, stage: str, force: bool = False, progress=None) -> tuple[dict, bool]:
    c = run.config
    name = parse(stage)
    src_stage, src_prefix = student_before(c, name.arm, name.round)
    src = run.require(src_stage)
    ro_stage, sc_stage = round_stage("rollout", name.round, name.arm), round_stage("score", name.round, name.arm)
    inputs = {**run.outputs_under(ro_stage, "rollouts"), **run.outputs_under(sc_stage, "scores"),
              **run.model_inputs(src_stage, src_prefix, "student")}
    if name.round > 1:
        inputs.update({n: src["outputs"][n] for n in ("optimizer.safetensors", "optimizer.json")})
    if name.arm != "main":
        inputs["rock_sets"] = run.output("rock", "rock_sets.json")
    train_params = {k: v for k, v in c.section("train").items() if k not in c.EXECUTION_TRAIN}
    params = {"train": train_params, "seed": c.seed, "round": name.round, "arm": name.arm,
              "student": c.section("student")}

    def body(ctx: StageContext) -> None:
        with tempfile.TemporaryDirectory(prefix="opdflow-train-") as tmp:
            work = Path(tmp)
            spec = prepare(run, ctx, work, name, src_stage, src_prefix, ro_stage, sc_stage, inputs)
            spec_path = work / "spec.json"
            spec_path.write_text(json.dumps(spec))
            if c.train.nproc_per_node == 1:
                train_round(spec, ctx.progress)
            else:
                launch(spec_path, c.train.nproc_per_node, ctx.progress)
            commit_outputs(ctx, Path(spec["out"]))
            record_mismatch(ctx, c, Path(spec["rows"]), Path(spec["out"]) / "token_losses.parquet")

    entry, ran = run_stage(run, stage, params=params, inputs=inputs, body=body, force=force, progress=progress)
    if ran:  # in-round checkpoints are only for resuming this attempt; the commit supersedes them
        run.store.delete_prefix(f"{run.prefix}/stages/{stage}/{entry['key'][:16]}/partial/")
    return entry, ran


def prepare(run: Run, ctx: StageContext, work: Path, name, src_stage, src_prefix, ro_stage, sc_stage,
            inputs) -> dict:
    """The work directory a round trains from: everything local, verified, no store reads
    left for the (possibly many) training processes except their checkpoint uploads."""
    pq.write_table(round_rows(run, ro_stage, sc_stage), work / "rows.parquet")
    spec = {"config": json.loads(run.config.to_json()), "arm": name.arm, "round": name.round,
            "src_model": str(run.materialize(src_stage, src_prefix)), "rows": str(work / "rows.parquet"),
            "bypass": bypass_tokens(run, name.arm), "store": run.store.uri, "work": str(work),
            "partial_prefix": f"{ctx.out_prefix}/partial", "out": str(work / "out"), "optimizer": None,
            "resume": None}
    if name.round > 1:
        (work / "optimizer.safetensors").write_bytes(run.read(inputs["optimizer.safetensors"]))
        (work / "optimizer.json").write_bytes(run.read(inputs["optimizer.json"]))
        spec["optimizer"] = {"data": str(work / "optimizer.safetensors"), "meta": str(work / "optimizer.json")}
    resume = latest_partial(run.store, spec["partial_prefix"], work / "resume")
    spec["resume"] = str(resume) if resume else None
    (work / "out").mkdir()
    return spec


def commit_outputs(ctx: StageContext, out: Path) -> None:
    if not (out / "result.json").is_file():
        raise RunError("training finished without writing its outputs (rank 0 wrote no result.json)")
    result = json.loads((out / "result.json").read_text())
    ctx.put_dir("model", out / "model")
    for name in ("optimizer.safetensors", "optimizer.json", "token_losses.parquet"):
        ctx.put_file(name, out / name)
    ctx.metrics.update(result["metrics"])
    ctx.backend.update(result["backend"])


SKIPPED_DISTRIBUTION = "sampling distribution differs from the model's (temperature/top-p/top-k)"


def first_step_logprobs(rows_path: Path, losses_path: Path) -> tuple[list[float], list[float]]:
    """(sampler, trainer) log-probs of the tokens of the round's first step, aligned: the
    sampler's from the rollout rows, the trainer's from that step's records (same weights)."""
    rows = pq.read_table(rows_path, columns=["prompt_id", "sample_idx", "logprobs"]).to_pylist()
    sampler = {(r["prompt_id"], r["sample_idx"]): r["logprobs"] for r in rows}
    rec = pq.read_table(losses_path, columns=["step", "prompt_id", "sample_idx", "position", "trainer_logprob"],
                        filters=[("step", "==", 0)]).to_pylist()
    return ([sampler[(r["prompt_id"], r["sample_idx"])][r["position"]] for r in rec],
            [r["trainer_logprob"] for r in rec])


def record_mismatch(ctx: StageContext, c, rows_path: Path, losses_path: Path) -> None:
    """metrics["mismatch"] and `mismatch.png`: sampler vs trainer log-probs at the first step."""
    from opdflow.tasks.mismatch import histogram_png, mismatch_stats
    if not c.samples_the_model():
        ctx.metrics["mismatch"] = {"skipped": SKIPPED_DISTRIBUTION}
        return
    sampler, trainer = first_step_logprobs(rows_path, losses_path)
    ctx.metrics["mismatch"] = mismatch_stats(sampler, trainer)
    ctx.put_bytes("mismatch.png", histogram_png([t - s for s, t in zip(sampler, trainer)]))


def mismatch_section(run: Run, entry: dict) -> list[str]:
    """The report's sampler-vs-trainer part (empty for entries from before it existed)."""
    from opdflow.tasks.mismatch import mismatch_markdown
    stats = entry["metrics"].get("mismatch")
    if not stats:
        return []
    if "skipped" in stats:
        return ["", f"Sampler vs trainer logprobs: skipped ({stats['skipped']})."]
    png = run.read(entry["outputs"]["mismatch.png"]) if "mismatch.png" in entry["outputs"] else b""
    return ["", mismatch_markdown(stats, png)]


def report(run: Run, entry: dict) -> str:
    m = dict(entry["metrics"])
    losses = m.pop("losses", [])
    m.pop("mismatch", None)
    return "\n".join([f"# {entry['stage']} — run `{run.run_id}`", "", "| metric | value |", "|---|---|",
                      *[f"| {k} | {v} |" for k, v in m.items()], "",
                      f"Loss per step: {', '.join(f'{x:.4f}' for x in losses)}", "",
                      f"Kernel/device: `{entry['backend']}`", *mismatch_section(run, entry)])


train_task = stage_task("train", run, report)

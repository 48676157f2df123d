"""Stage `train.rNN`: update the student on the per-token distillation objective.

Round r starts from round r-1's checkpoint and optimizer state (the initial student and
a fresh optimizer for r = 1) and takes `train.steps_per_round` optimizer steps over
the round's rollouts, `train.batch_size` sequences each, in a seeded order. The loss is
`opdflow.kernels.DistillationLoss` (reverse KL by default, as OPD uses) between the
student's full-vocabulary logits and the teacher's stored top-k, averaged over response
tokens. Triton kernels on CUDA, the PyTorch reference elsewhere (`train.kernel`).

Ablation arms (`ablate-uniform.sN.*`, `ablate-rock.sN.*`, `ablate-random.sN.*`, one
run per arm and seed N) are this same stage with the loss weight of some token ids set
to zero: none (uniform), the rock tokens found by the `rock` stage, or a random control
set. Zero-weighted tokens drop out of the sum; the mean is still over all response
tokens, so the other tokens' gradients are unchanged. Which position is zeroed is
`ablation.position` (`train_worker.zeroed_ids`): `target` (default), the position whose
generated token is in the set, as the paper's equation charges the KL to the generated
token; `input`, the position whose input id is in the set (one later), as the paper's
reference code does.

The bypass set is fixed in an arm's round 1 and written as `bypass.json` (rounds 2..R
copy it). The random control is drawn there, once per seed, from ids that are not rocks,
controls, dropped or special, to match the share of the round's trained positions that
the rock set takes (`control.matched_random`, within `ablation.random_share_tolerance`):
round 1 trains every arm of a seed on the same rollouts, so that share is exactly what the
rock arm bypasses in its first round. Later rounds' realised shares are in each round's
`bypassed_fraction`, shown side by side in the report.

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

Teacher signal (`scoring.signal`): the rows carry what the score stage stored. With `hidden`
they carry the teacher's final hidden states, and the stage also takes the teacher's model dir
as an input (so only that signal's stage key changes): `prepare` loads the teacher on the CPU
once per round to take its lm_head (padded rows beyond the tokenizer cut off,
`infra.models.lm.real_head`) and writes it to the work dir (`teacher_head.safetensors`); every
training process moves it to its device, and the loss rebuilds the teacher's logits chunk by
chunk from it (`train_worker.loss_step`). That costs the teacher's size in CPU memory while
the head is extracted and V x H teacher weights on each training device.

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
Each committed checkpoint is announced on stderr and in the task's log (`opdflow-checkpoint
step N KEY`); `OPDFLOW_HOLD_AFTER_CHECKPOINT=[STAGE:]STEP` stops the round there until it is
killed, which is how the crash tests kill it at a known point (`train_worker`).
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from opdflow.infra.artifacts.manifest import Run, RunError, StageContext, run_stage
from opdflow.tasks import rollout as rollout_stage
from opdflow.tasks import score as score_stage
from opdflow.infra.models.lm import derive_seed
from opdflow.tasks.plan import ARMS, parse, rollout_of, round_instances, round_stage, seed_tag, student_before
from opdflow.tasks.stage import Stage
from opdflow.tasks.train_worker import CHECKPOINT, PROGRESS, announce, train_round, zeroed_ids


def zeroed_counts(rows: pa.Table, position: str) -> dict[int, int]:
    """How often each id decides a position's weight in these rows (`train_worker.zeroed_ids`)."""
    counts: dict[int, int] = {}
    for p, r in zip(rows["prompt_ids"].to_pylist(), rows["response_ids"].to_pylist()):
        for t in zeroed_ids(p, r, position):
            counts[t] = counts.get(t, 0) + 1
    return counts


def draw_bypass(c, name, rock_sets: dict, rows: pa.Table) -> dict:
    """An arm's bypass set for its seed (bypass.json), chosen in round 1 on that round's rows."""
    from opdflow.tasks.control import matched_random, token_share
    counts = zeroed_counts(rows, c.ablation.position)
    rock = sorted(rock_sets["rock"])
    out = {"arm": name.arm, "seed": name.seed, "position": c.ablation.position,
           "rock_share": token_share(counts, rock)}
    if name.arm == ARMS["uniform"]:
        return {**out, "ids": [], "share": 0.0}
    if name.arm == ARMS["rock"]:
        return {**out, "ids": rock, "share": out["rock_share"]}
    excluded = set(rock) | set(rock_sets["control"]) | set(rock_sets["dropped"]) | set(rock_sets.get("special", []))
    draw = matched_random(counts, rock, excluded, derive_seed(c.seed, *seed_tag(name), "random-control"),
                          c.ablation.random_share_tolerance)
    return {**out, **draw}


def round_rows(run: Run, ro_stage: str, sc_stage: str) -> pa.Table:
    """The round's rollouts with the teacher's signal beside each response: top-k and tail
    log-mass (`scoring.signal: topk`) or the sampled token's log-prob (`sampled`)."""
    ro, sc = rollout_stage.load(run, ro_stage), score_stage.load(run, sc_stage)
    base = ro.select(["prompt_id", "sample_idx", "prompt_ids", "response_ids", "logprobs"])
    if score_stage.signal_of(sc) == "sampled":  # the teacher's log-prob of each sampled token only
        return base.append_column("teacher_logprobs", sc["teacher_logprobs"])
    if score_stage.signal_of(sc) == "hidden":  # the teacher's final hidden states, bytes per response
        return base.append_column(score_stage.HIDDEN_COLUMN, sc[score_stage.HIDDEN_COLUMN])
    return ro.select(["prompt_id", "sample_idx", "prompt_ids", "response_ids", "logprobs"]).append_column(
        "topk_ids", sc["topk_ids"]).append_column("topk_logprobs", sc["topk_logprobs"]).append_column(
        score_stage.TAIL_COLUMN, sc[score_stage.TAIL_COLUMN])


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
    """torchrun on this machine, N processes; rank 0's progress and checkpoint lines are forwarded."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "opdflow.tasks.train_worker", str(spec_path)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tail: list[str] = []
    for line in proc.stdout:
        if line.startswith(PROGRESS):
            _, frac, *msg = line.rstrip("\n").split(" ", 2)
            progress(float(frac), msg[0] if msg else "")
        elif CHECKPOINT in line:
            announce(line[line.index(CHECKPOINT):].rstrip("\n"))
        else:
            tail = (tail + [line.rstrip()])[-60:]
    if proc.wait() != 0:
        from opdflow.infra.failures import SubprocessFailed
        raise SubprocessFailed(f"torchrun ({nproc} processes) failed with exit code {proc.returncode}:\n"
                               + "\n".join(tail))


def run(run: Run, stage: str, force: bool = False, progress=None) -> tuple[dict, bool]:
    c = run.config
    name = parse(stage)
    src_stage, src_prefix = student_before(c, name.arm, name.round, name.seed)
    src = run.require(src_stage)
    ro_stage, sc_stage = rollout_of(name)
    inputs = {**run.outputs_under(ro_stage, "rollouts"), **run.outputs_under(sc_stage, "scores"),
              **run.model_inputs(src_stage, src_prefix, "student")}
    if c.scoring.signal == "hidden":  # the teacher's lm_head rebuilds its logits in the loss
        inputs.update(run.model_inputs("models", "teacher"))
    if name.round > 1:
        inputs.update({n: src["outputs"][n] for n in ("optimizer.safetensors", "optimizer.json")})
    if name.arm != "main" and name.round == 1:
        inputs["rock_sets"] = run.output("rock", "rock_sets.json")
    elif name.arm != "main":
        inputs["bypass.json"] = run.output(round_stage("train", 1, name.arm, name.seed), "bypass.json")
    train_params = c.result_section("train")
    params = {"train": train_params, "seed": c.seed, "round": name.round, "arm": name.arm,
              "student": c.section("student")}
    if name.arm != "main":
        params.update(ablation_seed=name.seed, position=c.ablation.position,
                      random_share_tolerance=c.ablation.random_share_tolerance)

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
            if name.arm != "main":
                ctx.put_json("bypass.json", spec["bypass_record"])
                ctx.metrics["bypass"] = {**{k: v for k, v in spec["bypass_record"].items() if k != "ids"},
                                         "n_ids": len(spec["bypass_record"]["ids"])}
            record_mismatch(ctx, c, Path(spec["rows"]), Path(spec["out"]) / "token_losses.parquet")
            from opdflow.infra.tracking import train_scalars, write_events  # per-step curves for TensorBoard
            ctx.put_dir("tensorboard", write_events(work / "tensorboard", train_scalars(ctx.metrics.get("step_log", []))))

    entry, ran = run_stage(run, stage, params=params, inputs=inputs, body=body, force=force, progress=progress)
    if ran:  # in-round checkpoints are only for resuming this attempt; the commit supersedes them
        run.store.delete_prefix(f"{run.prefix}/stages/{stage}/{entry['key'][:16]}/partial/")
    return entry, ran


def prepare(run: Run, ctx: StageContext, work: Path, name, src_stage, src_prefix, ro_stage, sc_stage,
            inputs) -> dict:
    """The work directory a round trains from: everything local, verified, no store reads
    left for the (possibly many) training processes except their checkpoint uploads."""
    rows = round_rows(run, ro_stage, sc_stage)
    pq.write_table(rows, work / "rows.parquet")
    record = None
    if name.arm != "main" and name.round == 1:
        record = draw_bypass(run.config, name, json.loads(run.read(inputs["rock_sets"])), rows)
    elif name.arm != "main":
        record = json.loads(run.read(inputs["bypass.json"]))
    spec = {"config": json.loads(run.config.to_json()), "arm": name.arm, "round": name.round,
            "seed_tag": list(seed_tag(name)),
            "src_model": str(run.materialize(src_stage, src_prefix)), "rows": str(work / "rows.parquet"),
            "bypass": sorted(record["ids"]) if record else [], "bypass_record": record,
            "stage": str(name), "store": run.store.uri, "work": str(work),
            "partial_prefix": f"{ctx.out_prefix}/partial", "out": str(work / "out"), "optimizer": None,
            "resume": None}
    if name.round > 1:
        (work / "optimizer.safetensors").write_bytes(run.read(inputs["optimizer.safetensors"]))
        (work / "optimizer.json").write_bytes(run.read(inputs["optimizer.json"]))
        spec["optimizer"] = {"data": str(work / "optimizer.safetensors"), "meta": str(work / "optimizer.json")}
    if score_stage.signal_of(rows) == "hidden":
        spec["teacher_hidden"] = teacher_head(run, run.require(sc_stage), work / "teacher_head.safetensors")
    resume = latest_partial(run.store, spec["partial_prefix"], work / "resume")
    spec["resume"] = str(resume) if resume else None
    (work / "out").mkdir()
    return spec


def teacher_head(run: Run, score_entry: dict, path: Path) -> dict:
    """The teacher's lm_head, padded rows cut off (`infra.models.lm.real_head`), written to `path`
    (safetensors: weight, and bias when it has one) in the dtype its hidden states were stored
    in; returns the spec's `teacher_hidden` ({head, dtype, size}). Refused when the stored
    hidden states' width or dtype is not the head's (the scores are of another teacher)."""
    import torch
    from safetensors.torch import save_file

    from opdflow.infra.models.lm import load_model, load_tokenizer, real_head
    b = score_entry["backend"]
    tdir = run.materialize("models", "teacher")
    model = load_model(tdir, run.config.teacher.dtype, dev=torch.device("cpu"))
    w, bias = real_head(model.get_output_embeddings(), len(load_tokenizer(tdir)))
    if int(w.shape[1]) != int(b["hidden_size"]) or str(w.dtype).removeprefix("torch.") != b["hidden_dtype"]:
        raise RunError(f"{score_entry['stage']}: the stored teacher hidden states are {b['hidden_size']} "
                       f"{b['hidden_dtype']} values per token, the teacher's lm_head takes {int(w.shape[1])} "
                       f"{str(w.dtype).removeprefix('torch.')}: rescore with this teacher")
    tensors = {"weight": w.detach().contiguous().clone()}
    if bias is not None:
        tensors["bias"] = bias.detach().contiguous().clone()
    save_file(tensors, str(path))
    del model
    return {"head": str(path), "dtype": b["hidden_dtype"], "size": int(b["hidden_size"])}


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
    m.pop("losses", [])
    m.pop("mismatch", None)
    from opdflow.infra.tracking import curves_png, train_scalars
    png = curves_png({entry["stage"]: train_scalars(m.pop("step_log", []))},
                     tags=("train/loss", "train/divergence", "train/grad_norm", "train/mismatch_k3"))
    curves = ["## Per step", "", f"![curves](data:image/png;base64,{base64.b64encode(png).decode()})",
              "", "The same curves: this stage's `tensorboard/` output (TensorBoard event files)."] if png else []
    return "\n".join([f"# {entry['stage']} — run `{run.run_id}`", "", "| metric | value |", "|---|---|",
                      *[f"| {k} | {v} |" for k, v in m.items()], "", *curves, "",
                      f"Kernel/device: `{entry['backend']}`", *mismatch_section(run, entry)])


def needs(config, stage: str) -> list[str]:
    """The round's rollout and scores, the checkpoint it starts from; an arm's round 1 the rock
    sets, its later rounds round 1's bypass set."""
    name = parse(stage)
    out = [*rollout_of(name), student_before(config, name.arm, name.round, name.seed)[0]]
    if name.arm != "main":
        out.append("rock" if name.round == 1 else round_stage("train", 1, name.arm, name.seed))
    return list(dict.fromkeys(out))


STAGES = (Stage("train", run, instances=round_instances("train"), needs=needs, report=report,
                gpus=lambda config: config.train.nproc_per_node),)
train_task = STAGES[0].task

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
token's loss at every step it was trained on).

Crash safety: with `train.checkpoint_every: N` the round also writes an in-round
checkpoint every N steps under its output prefix (`partial/step-NNNNNN/`: weights,
optimizer, RNG state, the log so far; `state.json` written last commits it). A retry
of the same stage (same key) resumes from the latest committed one and reaches the
same weights as an uninterrupted run: batches are a fixed seeded sequence, so the data
position is just the step number.
"""
from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from opdflow.infra.config import Config
from opdflow.infra.lm import batch_response_logits, derive_seed, load_model, load_tokenizer, save_model
from opdflow.infra.manifest import Run, StageContext, run_stage
from opdflow.infra.tables import parquet_to_table, table_to_parquet
from opdflow.kernels import DistillationLoss, resolve_backend
from opdflow.tasks import rollout as rollout_stage
from opdflow.tasks import score as score_stage
from opdflow.tasks.common import stage_task
from opdflow.tasks.plan import parse, round_stage, student_before


def make_optimizer(model, config: Config) -> torch.optim.Optimizer:
    o = config.train.optimizer
    if o.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def set_lr(opt: torch.optim.Optimizer, config: Config, global_step: int) -> None:
    """Linear warmup over the run's first `warmup_steps` optimizer steps, then constant."""
    o = config.train.optimizer
    lr = o.lr * min(1.0, (global_step + 1) / o.warmup_steps) if o.warmup_steps else o.lr
    for g in opt.param_groups:
        g["lr"] = lr


def optimizer_to_bytes(opt: torch.optim.Optimizer) -> tuple[bytes, dict]:
    """Optimizer state as safetensors (tensors) + JSON (the rest): never pickle in the store."""
    sd = opt.state_dict()
    tensors, shapes, scalars = {}, {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().reshape(-1).contiguous().cpu()
                shapes[f"{pid}.{k}"] = list(v.shape)
            else:
                scalars[f"{pid}.{k}"] = v
    return st_save(tensors), {"param_groups": sd["param_groups"], "shapes": shapes, "scalars": scalars}


def optimizer_from_bytes(opt: torch.optim.Optimizer, data: bytes, meta: dict) -> None:
    tensors = st_load(data)
    state: dict[int, dict] = {}
    for name, flat in tensors.items():
        pid, k = name.split(".", 1)
        state.setdefault(int(pid), {})[k] = flat.reshape(meta["shapes"][name])
    for name, v in meta["scalars"].items():
        pid, k = name.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def step_batches(n_rows: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Row indices of each step: successive seeded permutations (one per epoch)."""
    order: list[int] = []
    epoch = 0
    while len(order) < steps * batch_size:
        perm = list(range(n_rows))
        random.Random(derive_seed(seed, "epoch", epoch)).shuffle(perm)
        order += perm
        epoch += 1
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def loss_step(model, loss_fn, rows: list[dict], bypass: frozenset[int], pad_id: int):
    """One batch: student logits at response positions vs the teacher's stored top-k."""
    dev = next(model.parameters()).device
    logits = batch_response_logits(model, [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows],
                                   pad_id, dev, grad=True)
    tokens = [t for r in rows for t in r["response_ids"]]
    ids = torch.tensor([k for r in rows for k in r["topk_ids"]], dtype=torch.long, device=dev)
    lps = torch.tensor([k for r in rows for k in r["topk_logprobs"]], dtype=torch.float32, device=dev)
    weights = torch.tensor([0.0 if t in bypass else 1.0 for t in tokens], device=dev)
    mask = torch.ones(len(tokens), dtype=torch.bool, device=dev)
    loss, per_token = loss_fn(logits, teacher_topk_ids=ids, teacher_topk_logprobs=lps, mask=mask, weights=weights)
    return loss, per_token, tokens, weights


def bypass_tokens(run: Run, arm: str) -> frozenset[int]:
    if arm == "main":
        return frozenset()
    sets = json.loads(run.read_output("rock", "rock_sets.json"))
    return frozenset(sets["rock" if arm == "ablate-rock" else "random_matched"])


def run(run: Run, stage: str, force: bool = False, progress=None) -> tuple[dict, bool]:
    c = run.config
    name = parse(stage)
    src_stage, src_prefix = student_before(c, name.arm, name.round)
    src = run.require(src_stage)
    ro_stage, sc_stage = round_stage("rollout", name.round, name.arm), round_stage("score", name.round, name.arm)
    inputs = {"rollouts": run.output(ro_stage, "rollouts.parquet"), "scores": run.output(sc_stage, "scores.parquet"),
              **run.model_inputs(src_stage, src_prefix, "student")}
    if name.round > 1:
        inputs.update({n: src["outputs"][n] for n in ("optimizer.safetensors", "optimizer.json")})
    if name.arm != "main":
        inputs["rock_sets"] = run.output("rock", "rock_sets.json")
    train_params = {k: v for k, v in c.section("train").items() if k != "checkpoint_every"}  # no effect on results
    params = {"train": train_params, "seed": c.seed, "round": name.round, "arm": name.arm,
              "student": c.section("student")}

    def body(ctx: StageContext) -> None:
        src_dir = run.materialize(src_stage, src_prefix)
        tok = load_tokenizer(src_dir)
        model = load_model(src_dir, c.student.dtype)
        model.train()
        opt = make_optimizer(model, c)
        if name.round > 1:
            optimizer_from_bytes(opt, run.read(inputs["optimizer.safetensors"]),
                                 json.loads(run.read(inputs["optimizer.json"])))
        loss_fn = DistillationLoss(kind=c.train.loss.kind, beta=c.train.loss.beta,
                                   temperature=c.train.loss.temperature, backend=c.train.kernel)
        bypass = bypass_tokens(run, name.arm)
        rows = rollout_stage.load(run, ro_stage).to_pylist()
        for row, s in zip(rows, score_stage.load(run, sc_stage).to_pylist()):
            row.update(topk_ids=s["topk_ids"], topk_logprobs=s["topk_logprobs"])
        batches = step_batches(len(rows), c.train.steps_per_round, c.train.batch_size,
                               derive_seed(c.seed, "train-order", name.round))
        torch.manual_seed(derive_seed(c.seed, "train", name.arm, name.round))
        state = TrainState()
        partial = f"{ctx.out_prefix}/partial"
        if resume_partial(run.store, partial, model, opt, state):
            ctx.metrics["resumed_from_step"] = state.step
        t0 = time.time()
        while state.step < len(batches):
            batch = [rows[i] for i in batches[state.step]]
            loss, per_token, tokens, weights = loss_step(model, loss_fn, batch, bypass, tok.pad_token_id)
            set_lr(opt, c, (name.round - 1) * c.train.steps_per_round + state.step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if c.train.optimizer.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.train.optimizer.grad_clip)
            opt.step()
            state.record(float(loss.detach()), batch, tokens, per_token, weights)  # one host sync per step
            ctx.progress(state.step / len(batches), f"step {state.step}/{len(batches)} loss {state.losses[-1]:.4f}")
            every = c.train.checkpoint_every
            if every and state.step % every == 0 and state.step < len(batches):
                save_partial(run.store, partial, model, opt, state)
        secs = time.time() - t0
        with tempfile.TemporaryDirectory(prefix="opdflow-ckpt-") as tmp:
            ctx.put_dir("model", save_model(model, tok, Path(tmp) / "model"))
        data, meta = optimizer_to_bytes(opt)
        ctx.put_bytes("optimizer.safetensors", data)
        ctx.put_json("optimizer.json", meta)
        ctx.put_table("token_losses.parquet", pa.table(state.records))
        dev = next(model.parameters()).device
        ctx.backend.update({"kernel": resolve_backend(c.train.kernel, dev), "device": str(dev), "dtype": c.student.dtype})
        losses = state.losses
        ctx.metrics.update(steps=len(batches), loss_first=round(losses[0], 5), loss_last=round(losses[-1], 5),
                           loss_mean=round(sum(losses) / len(losses), 5), losses=[round(x, 5) for x in losses],
                           tokens_trained=state.n_tok, bypassed_fraction=round(state.n_bypassed / max(1, state.n_tok), 4),
                           tokens_per_s=round(state.n_tok / max(secs, 1e-9), 1))

    entry, ran = run_stage(run, stage, params=params, inputs=inputs, body=body, force=force, progress=progress)
    if ran:  # in-round checkpoints are only for resuming this attempt; the commit supersedes them
        run.store.delete_prefix(f"{run.prefix}/stages/{stage}/{entry['key'][:16]}/partial/")
    return entry, ran


RECORD_COLUMNS = ("step", "prompt_id", "sample_idx", "position", "token_id", "loss", "weight")


@dataclass
class TrainState:
    """Everything a resumed round needs besides weights and optimizer: the data position
    (steps are a fixed, seeded sequence of batches), the log, and the RNG."""
    step: int = 0
    losses: list[float] = field(default_factory=list)
    n_tok: int = 0
    n_bypassed: int = 0
    records: dict[str, list] = field(default_factory=lambda: {k: [] for k in RECORD_COLUMNS})

    def record(self, loss: float, batch: list[dict], tokens: list[int], per_token, weights) -> None:
        _record(self.records, self.step, batch, tokens, per_token, weights)
        self.losses.append(loss)
        self.n_tok += len(tokens)
        self.n_bypassed += int((weights == 0).sum())
        self.step += 1


def save_partial(store, prefix: str, model, opt, state: TrainState) -> None:
    """An in-round checkpoint: weights, optimizer, RNG, records; `state.json` last commits it."""
    base = f"{prefix}/step-{state.step:06d}"
    weights = st_save({k: v.detach().clone().contiguous().cpu() for k, v in model.state_dict().items()})
    opt_data, opt_meta = optimizer_to_bytes(opt)
    objects = {"model.safetensors": weights, "optimizer.safetensors": opt_data,
               "optimizer.json": json.dumps(opt_meta).encode(),
               "rng.safetensors": st_save({"cpu": torch.get_rng_state()}),
               "records.parquet": table_to_parquet(pa.table(state.records))}
    shas = {name: store.put_bytes(f"{base}/{name}", data) for name, data in objects.items()}
    meta = {"step": state.step, "losses": state.losses, "n_tok": state.n_tok, "n_bypassed": state.n_bypassed,
            "sha256": shas}
    store.put_bytes(f"{base}/state.json", json.dumps(meta).encode())


def resume_partial(store, prefix: str, model, opt, state: TrainState) -> bool:
    """Load the latest committed in-round checkpoint under `prefix`, if any (verified)."""
    marks = sorted(k for k in store.list(prefix + "/") if k.endswith("/state.json"))
    if not marks:
        return False
    meta = json.loads(store.get_bytes(marks[-1]))
    base = marks[-1][: -len("/state.json")]
    read = lambda name: store.get_bytes(f"{base}/{name}", sha256=meta["sha256"][name])  # noqa: E731
    model.load_state_dict(st_load(read("model.safetensors")))
    optimizer_from_bytes(opt, read("optimizer.safetensors"), json.loads(read("optimizer.json")))
    torch.set_rng_state(st_load(read("rng.safetensors"))["cpu"])
    state.step, state.losses = meta["step"], meta["losses"]
    state.n_tok, state.n_bypassed = meta["n_tok"], meta["n_bypassed"]
    state.records = parquet_to_table(read("records.parquet")).to_pydict()
    return True


def _record(records: dict, step: int, batch: list[dict], tokens: list[int], per_token, weights) -> None:
    vals, ws = per_token.detach().float().cpu().tolist(), weights.cpu().tolist()
    i = 0
    for r in batch:
        for pos in range(len(r["response_ids"])):
            records["step"].append(step)
            records["prompt_id"].append(r["prompt_id"])
            records["sample_idx"].append(r["sample_idx"])
            records["position"].append(pos)
            records["token_id"].append(tokens[i])
            records["loss"].append(vals[i])
            records["weight"].append(ws[i])
            i += 1


def report(run: Run, entry: dict) -> str:
    m = dict(entry["metrics"])
    losses = m.pop("losses", [])
    return "\n".join([f"# {entry['stage']} — run `{run.run_id}`", "", "| metric | value |", "|---|---|",
                      *[f"| {k} | {v} |" for k, v in m.items()], "",
                      f"Loss per step: {', '.join(f'{x:.4f}' for x in losses)}", "",
                      f"Kernel/device: `{entry['backend']}`"])


train_task = stage_task("train", run, report)

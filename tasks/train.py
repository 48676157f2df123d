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
"""
from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from opdflow.infra.config import Config
from opdflow.infra.lm import batch_response_logits, derive_seed, load_model, load_tokenizer, save_model
from opdflow.infra.manifest import Run, StageContext, run_stage
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
              **{f"student/{n}": r for n, r in src["outputs"].items() if n.startswith(src_prefix + "/")}}
    inputs.update({f"external/{k}": {"key": v["path"], "sha256": v["fingerprint"]}
                   for k, v in src.get("external", {}).items() if k == src_prefix})
    if name.round > 1:
        inputs.update({n: src["outputs"][n] for n in ("optimizer.safetensors", "optimizer.json")})
    if name.arm != "main":
        inputs["rock_sets"] = run.output("rock", "rock_sets.json")
    params = {"train": c.section("train"), "seed": c.seed, "round": name.round, "arm": name.arm,
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
        torch.manual_seed(derive_seed(c.seed, "train", name.arm, name.round))
        records: dict[str, list] = {k: [] for k in ("step", "prompt_id", "sample_idx", "position", "token_id",
                                                    "loss", "weight")}
        losses, n_tok, n_bypassed, t0 = [], 0, 0, time.time()
        batches = step_batches(len(rows), c.train.steps_per_round, c.train.batch_size,
                               derive_seed(c.seed, "train-order", name.round))
        for step, idx in enumerate(batches):
            batch = [rows[i] for i in idx]
            loss, per_token, tokens, weights = loss_step(model, loss_fn, batch, bypass, tok.pad_token_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if c.train.optimizer.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.train.optimizer.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))  # host sync once per step, for the log
            _record(records, step, batch, tokens, per_token, weights)
            n_tok += len(tokens)
            n_bypassed += int((weights == 0).sum())
            ctx.progress((step + 1) / len(batches), f"step {step + 1}/{len(batches)} loss {losses[-1]:.4f}")
        secs = time.time() - t0
        with tempfile.TemporaryDirectory(prefix="opdflow-ckpt-") as tmp:
            ctx.put_dir("model", save_model(model, tok, Path(tmp) / "model"))
        data, meta = optimizer_to_bytes(opt)
        ctx.put_bytes("optimizer.safetensors", data)
        ctx.put_json("optimizer.json", meta)
        ctx.put_table("token_losses.parquet", pa.table(records))
        dev = next(model.parameters()).device
        ctx.backend.update({"kernel": resolve_backend(c.train.kernel, dev), "device": str(dev), "dtype": c.student.dtype})
        ctx.metrics.update(steps=len(batches), loss_first=round(losses[0], 5), loss_last=round(losses[-1], 5),
                           loss_mean=round(sum(losses) / len(losses), 5), losses=[round(x, 5) for x in losses],
                           tokens_trained=n_tok, bypassed_fraction=round(n_bypassed / max(1, n_tok), 4),
                           tokens_per_s=round(n_tok / max(secs, 1e-9), 1))
    return run_stage(run, stage, params=params, inputs=inputs, body=body, force=force, progress=progress)


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

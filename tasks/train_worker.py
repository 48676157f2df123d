"""The training loop of one `train.rNN` round, for one process or N under torchrun.

The train stage (`opdflow.tasks.train`) prepares a work directory (the spec, the round's
rows, the starting model and optimizer state, an in-round checkpoint to resume from) and
then either calls `main(spec_path)` in its own process (`train.nproc_per_node: 1`) or
launches `torchrun --nproc-per-node N -m opdflow.tasks.train_worker SPEC`. The loop is
the same code either way:

* The global batch is fixed by the config (`train.batch_size` sequences per optimizer
  step), not by the world size: rank k takes rows k, k+N, ... of each step's batch and
  splits them into micro-batches (`train.micro_batch_size`, default all of them);
  gradients accumulate over micro-batches and FSDP averages them over ranks. Each
  micro-batch's loss is scaled so that the step's gradient is that of the mean loss over
  all response tokens of the global batch, whatever N and the micro-batch size.
* Per-token losses are gathered to rank 0, which alone writes outputs (to the work
  directory; the stage commits them) and in-round checkpoints (to the store).
* In-round checkpoints are `torch.distributed.checkpoint` shards (safetensors), so a round
  interrupted under N processes resumes under M. Each committed one is announced on stderr
  (and in the Prefect task's log) as `opdflow-checkpoint step N <store key of state.json>`:
  the point a retry would resume from. Under torchrun the stage forwards rank 0's line.
* `OPDFLOW_HOLD_AFTER_CHECKPOINT=[STAGE:]STEP` (opt-in, for crash tests and for trying a
  resume by hand) makes every rank stop after that checkpoint is committed and wait until
  the process is killed; the announcement then ends in `held`. A kill after that line
  lands, deterministically, between a committed checkpoint and the end of the round.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

from opdflow.infra import distributed
from opdflow.infra.config import Config, parse_config
from opdflow.infra.models.lm import (batch_response_hidden, batch_response_logits, check_head_is_logits, derive_seed,
                               load_model, load_tokenizer, real_head, real_logits, save_model)
from opdflow.kernels import DistillationLoss, FusedLinearDistillationLoss, resolve_backend
from opdflow.kernels.reference import token_logprobs

PROGRESS = "opdflow-progress"
CHECKPOINT = "opdflow-checkpoint"  # the line announcing a committed in-round checkpoint
HOLD_ENV = "OPDFLOW_HOLD_AFTER_CHECKPOINT"
# trainer_logprob: the trainer's own log-prob of the sampled token (float32, before the step's
# update), for the sampler-vs-trainer mismatch report (`opdflow.tasks.mismatch`)
RECORD_COLUMNS = ("step", "prompt_id", "sample_idx", "position", "token_id", "loss", "weight", "trainer_logprob")
LOGPROB_CHUNK = 4096  # rows of logits turned into float32 at once for the trainer's logprobs


# -- plain pieces ---------------------------------------------------------------------------

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


def step_batches(n_rows: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Row indices of each step: successive seeded permutations (one per epoch)."""
    import random
    order: list[int] = []
    epoch = 0
    while len(order) < steps * batch_size:
        perm = list(range(n_rows))
        random.Random(derive_seed(seed, "epoch", epoch)).shuffle(perm)
        order += perm
        epoch += 1
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def rank_micro_batches(batch: list[int], rank: int, world: int, micro: int | None) -> list[list[int]]:
    """Positions (in the global batch) this rank trains on, as micro-batches. Every rank
    gets the same number of micro-batches (FSDP's collectives must line up); a rank with
    fewer rows gets empty ones, which it runs as a zero-weight forward."""
    per_rank = math.ceil(len(batch) / world)
    size = micro or per_rank
    n_micro = max(1, math.ceil(per_rank / size))
    mine = list(range(rank, len(batch), world))
    return [mine[i * size:(i + 1) * size] for i in range(n_micro)]


def zeroed_ids(prompt_ids: list[int], response_ids: list[int], position: str = "target") -> list[int]:
    """Per response position, the id whose membership in a bypass set zeroes that position's
    loss weight. Position i predicts response token i from the inputs before it.

    * `target` (opdflow's default, the paper's equation): the generated token, response[i].
    * `input` (the reference code's convention): the position's input id, response[i-1]
      (the prompt's last id for i = 0), so a rock's loss is zeroed one position later:
      at the token generated right after it.
    """
    if position == "target":
        return list(response_ids)
    if position == "input":
        return ([prompt_ids[-1]] if prompt_ids else [-1])[:len(response_ids)] + list(response_ids[:-1])
    raise ValueError(f"ablation.position: {position!r} is neither 'target' nor 'input'")


def bypass_weights(rows: list[dict], bypass: frozenset[int], position: str = "target") -> list[float]:
    """Loss weights of the rows' response positions, flattened: 0 where `zeroed_ids` is in `bypass`."""
    return [0.0 if t in bypass else 1.0 for r in rows for t in zeroed_ids(r["prompt_ids"], r["response_ids"], position)]


def loss_step(model, loss_fn, rows: list[dict], bypass: frozenset[int], pad_id: int, tis_cap: float | None = None,
              position: str = "target", vocab: int | None = None, teacher_head: dict | None = None):
    """One micro-batch: student logits at response positions vs the teacher's stored top-k.
    Returns (mean loss over the micro-batch's tokens, per-token loss, weights, the trainer's
    log-prob of each sampled token). With `tis_cap`, each token's weight is multiplied by
    min(p_trainer / p_sampler, tis_cap), the sampler's logprobs being the rows' `logprobs`.

    `loss_fn` is a `DistillationLoss` (the model's logits) or a `FusedLinearDistillationLoss`
    (`train.fused_lm_head`: the lm_head's input, the head applied chunk by chunk in the loss,
    which also yields the trainer's log-probs; with TIS those are needed before the loss, so
    they take one more chunked no-grad pass of the head).

    `vocab` (the tokenizer's size) cuts a padded lm_head's extra rows off the student's logits,
    so its distribution is over the real vocabulary only, as the sampler's and the teacher's
    (`infra.models.lm.real_logits`). The teacher's tail log-mass is the rows' `teacher_tail_logmass`
    when present (the score stage always writes it).

    Rows with `teacher_hidden` (`scoring.signal: hidden`) carry the teacher's final hidden
    states instead of a top-k; `teacher_head` ({weight, bias, dtype, size}, see
    `load_teacher_head`) is its lm_head. The fused loss rebuilds the teacher's logits from them
    chunk by chunk (`fused_linear_distillation_loss(teacher_hidden=, teacher_weight=,
    teacher_bias=)`); the unfused one, which has the student's [N, V] logits anyway, computes
    the teacher's [N, V] once under no_grad. Either way the divergence is the exact
    full-vocabulary one."""
    dev = next(model.parameters()).device
    prompts, responses = [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows]
    tokens = torch.tensor([t for r in responses for t in r], dtype=torch.long, device=dev)
    if rows and "topk_ids" not in rows[0] and "teacher_hidden" not in rows[0]:  # scoring.signal: sampled
        return sampled_loss_step(model, rows, bypass, pad_id, tokens, isinstance(loss_fn, FusedLinearDistillationLoss),
                                 tis_cap, position, vocab)
    fused = isinstance(loss_fn, FusedLinearDistillationLoss)
    if fused:
        hidden, head = batch_response_hidden(model, prompts, responses, pad_id, dev, grad=True)
        head_w, head_b = real_head(head, vocab)
        trainer_lp = torch.empty(len(tokens), dtype=torch.float32, device=dev)
        if tis_cap is not None:
            with torch.no_grad():
                for lo in range(0, len(tokens), LOGPROB_CHUNK):
                    trainer_lp[lo:lo + LOGPROB_CHUNK] = token_logprobs(
                        torch.nn.functional.linear(hidden[lo:lo + LOGPROB_CHUNK], head_w, head_b),
                        tokens[lo:lo + LOGPROB_CHUNK])
    else:
        logits = real_logits(batch_response_logits(model, prompts, responses, pad_id, dev, grad=True), vocab)
        with torch.no_grad():  # a record and the TIS weight's input, never a path for the gradient
            trainer_lp = token_logprobs(logits, tokens, LOGPROB_CHUNK)
    weights = torch.tensor(bypass_weights(rows, bypass, position), device=dev)
    if tis_cap is not None:
        from opdflow.tasks.mismatch import tis_weights
        sampler_lp = torch.tensor([x for r in rows for x in r["logprobs"]], dtype=torch.float32, device=dev)
        weights = weights * tis_weights(sampler_lp, trainer_lp, tis_cap)
    if rows and "teacher_hidden" in rows[0]:  # scoring.signal: hidden
        teacher = hidden_teacher(rows, teacher_head, len(tokens), fused, dev)
    else:
        ids = torch.tensor([k for r in rows for k in r["topk_ids"]], dtype=torch.long, device=dev)
        lps = torch.tensor([k for r in rows for k in r["topk_logprobs"]], dtype=torch.float32, device=dev)
        tail = (torch.tensor([x for r in rows for x in r["teacher_tail_logmass"]], dtype=torch.float32, device=dev)
                if rows and "teacher_tail_logmass" in rows[0] else None)
        teacher = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lps, teacher_tail_logmass=tail)
    teacher.update(mask=torch.ones(len(tokens), dtype=torch.bool, device=dev), weights=weights)
    if fused:
        targets = {} if tis_cap is not None else dict(target_ids=tokens, target_logprobs_out=trainer_lp)
        loss, per_token = loss_fn(hidden, head_w, head_b, **teacher, **targets)
    else:
        loss, per_token = loss_fn(logits, **teacher)
    return loss, per_token, weights, trainer_lp


def load_teacher_head(spec_hidden: dict, vocab: int, dev: torch.device) -> dict:
    """The teacher's lm_head the train stage wrote (`tasks.train.teacher_head`), on `dev`:
    {weight [V, H], bias [V] or None, dtype, size}. Its rows must be the student's vocabulary
    (`vocab`, the tokenizer's size): the two distributions are compared id by id."""
    tensors = st_load_file(spec_hidden["head"])
    w = tensors["weight"]
    if w.shape[0] != vocab:
        raise ValueError(f"scoring.signal: hidden: the teacher's lm_head has {w.shape[0]} rows after its padded rows "
                         f"are cut off, the student's vocabulary {vocab} ids; OPD needs one shared vocabulary")
    return {"weight": w.to(dev), "bias": None if "bias" not in tensors else tensors["bias"].to(dev),
            "dtype": spec_hidden["dtype"], "size": int(spec_hidden["size"])}


def hidden_teacher(rows: list[dict], teacher_head: dict | None, n_tokens: int, fused: bool, dev) -> dict:
    """The loss's teacher arguments from rows with `teacher_hidden` (see `loss_step`)."""
    from opdflow.infra.models.scoring import hidden_from_bytes
    if teacher_head is None:
        raise ValueError("rows hold the teacher's hidden states (scoring.signal: hidden) but no teacher lm_head "
                         "was given to rebuild its logits")
    th = hidden_from_bytes([r["teacher_hidden"] for r in rows], teacher_head["dtype"], teacher_head["size"]).to(dev)
    if th.shape[0] != n_tokens:
        raise ValueError(f"teacher hidden states: {th.shape[0]} rows for {n_tokens} response tokens")
    w, b = teacher_head["weight"], teacher_head["bias"]
    if fused:
        return dict(teacher_hidden=th, teacher_weight=w, teacher_bias=b)
    with torch.no_grad():
        return dict(teacher_logits=torch.nn.functional.linear(th, w, b))


def sampled_loss_step(model, rows: list[dict], bypass: frozenset[int], pad_id: int, tokens: torch.Tensor,
                      fused: bool, tis_cap: float | None, position: str, vocab: int | None):
    """`loss_step` for `scoring.signal: sampled`: the rows carry only the teacher's log-prob of
    each sampled token (`teacher_logprobs`); the loss is `kernels.loss.sampled_token_loss` (k1 as
    a detached advantage, policy-gradient surrogate) on the trainer's log-probs of those tokens,
    which need the gradient here. With `train.fused_lm_head` the head is applied `LOGPROB_CHUNK`
    rows at a time (each chunk's logits are kept for the backward pass: memory is not bounded by
    one chunk on this path). `tis_cap` weights each token by min(p_trainer / p_sampler, cap), the
    truncated importance correction for tokens the sampler drew."""
    from opdflow.kernels.loss import sampled_token_loss
    dev = tokens.device
    prompts, responses = [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows]
    if fused:
        hidden, head = batch_response_hidden(model, prompts, responses, pad_id, dev, grad=True)
        head_w, head_b = real_head(head, vocab)
        chunks = [torch.nn.functional.linear(hidden[lo:lo + LOGPROB_CHUNK], head_w, head_b)
                  for lo in range(0, len(tokens), LOGPROB_CHUNK)]
    else:
        logits = real_logits(batch_response_logits(model, prompts, responses, pad_id, dev, grad=True), vocab)
        chunks = [logits[lo:lo + LOGPROB_CHUNK] for lo in range(0, len(tokens), LOGPROB_CHUNK)]
    lp = torch.cat([token_logprobs(c, tokens[i * LOGPROB_CHUNK:(i + 1) * LOGPROB_CHUNK])
                    for i, c in enumerate(chunks)]) if chunks else torch.zeros(0, device=dev)
    trainer_lp = lp.detach()
    weights = torch.tensor(bypass_weights(rows, bypass, position), device=dev)
    if tis_cap is not None:
        from opdflow.tasks.mismatch import tis_weights
        sampler_lp = torch.tensor([x for r in rows for x in r["logprobs"]], dtype=torch.float32, device=dev)
        weights = weights * tis_weights(sampler_lp, trainer_lp, tis_cap)
    teacher_lp = torch.tensor([x for r in rows for x in r["teacher_logprobs"]], dtype=torch.float32, device=dev)
    loss, per_token = sampled_token_loss(lp, teacher_lp, weights=weights)
    return loss, per_token, weights, trainer_lp


# -- optimizer state as safetensors + JSON (never pickle in the store) ------------------------

def optimizer_to_files(state: dict, out: Path) -> None:
    """A full, name-keyed optimizer state dict -> optimizer.safetensors + optimizer.json."""
    tensors, shapes, scalars = {}, {}, {}
    for name, st in state["state"].items():
        for k, v in st.items():
            key = f"{name}::{k}"
            if torch.is_tensor(v):
                tensors[key] = v.detach().reshape(-1).contiguous().cpu()
                shapes[key] = list(v.shape)
            else:
                scalars[key] = v
    st_save_file(tensors, str(out / "optimizer.safetensors"))
    (out / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"], "shapes": shapes,
                                                    "scalars": scalars}, indent=1))


def optimizer_from_files(data: bytes, meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, flat in st_load(data).items():
        name, k = key.rsplit("::", 1)
        state.setdefault(name, {})[k] = flat.reshape(meta["shapes"][key])
    for key, v in meta["scalars"].items():
        name, k = key.rsplit("::", 1)
        state.setdefault(name, {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


# -- the log a round keeps --------------------------------------------------------------------

@dataclass
class TrainState:
    """Everything a resumed round needs besides weights and optimizer: the data position
    (steps are a fixed, seeded sequence of batches) and the log."""
    step: int = 0
    losses: list[float] = field(default_factory=list)
    n_tok: int = 0
    n_bypassed: int = 0
    records: dict[str, list] = field(default_factory=lambda: {k: [] for k in RECORD_COLUMNS})
    step_log: list[dict] = field(default_factory=list)  # per step: what infra/tracking.py draws

    def record(self, loss: float, batch: list[dict], per_token: list[float], weights: list[float],
               trainer_lp: list[float], extra: dict | None = None) -> None:
        if extra is not None:
            self.step_log.append(step_metrics(self.step, loss, batch, per_token, weights, trainer_lp, extra))
        i = 0
        for r in batch:
            for pos, tok in enumerate(r["response_ids"]):
                for col, val in zip(RECORD_COLUMNS, (self.step, r["prompt_id"], r["sample_idx"], pos, tok,
                                                     per_token[i], weights[i], trainer_lp[i])):
                    self.records[col].append(val)
                i += 1
        self.losses.append(loss)
        self.n_tok += i
        self.n_bypassed += sum(1 for w in weights if w == 0)
        self.step += 1

    def meta(self) -> dict:
        return {"step": self.step, "losses": self.losses, "n_tok": self.n_tok, "n_bypassed": self.n_bypassed,
                "step_log": self.step_log}


def step_metrics(step: int, loss: float, batch: list[dict], per_token: list[float], weights: list[float],
                 trainer_lp: list[float], extra: dict) -> dict:
    """One step's curve values: the (weighted) loss, the mean per-token divergence over all
    tokens (bypassed ones too), the bypassed share, and the sampler/trainer mismatch on the
    step's tokens: mean |trainer - sampler| log-prob and the k3 estimate of KL(sampler ||
    trainer) (exact on-policy only at a round's first step; later steps also measure how far
    the round's updates moved the student). `extra`: global_step, grad_norm, lr, seconds."""
    sampler = [x for r in batch for x in (r.get("logprobs") or [])]
    n = len(per_token)
    out = {"step": step, "loss": loss, "divergence": sum(per_token) / max(1, n),
           "bypassed_fraction": sum(1 for w in weights if w == 0) / max(1, n), "tokens": n,
           "tokens_per_s": n / max(extra.get("seconds", 0.0), 1e-9), **extra}
    if sampler and len(sampler) == len(trainer_lp):
        d = [t - s for s, t in zip(sampler, trainer_lp)]
        out["mismatch_abs"] = sum(abs(x) for x in d) / max(1, len(d))
        out["mismatch_k3"] = sum(math.expm1(x) - x for x in d) / max(1, len(d))
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


# -- in-round checkpoints ----------------------------------------------------------------------

def save_partial(d: distributed.Dist, spec: dict, model, opt, state: TrainState) -> None:
    """All ranks write their DCP shards to the work dir; rank 0 uploads them, the log and
    the RNG state to the store, `state.json` (with every file's sha256) last."""
    local = Path(spec["work"]) / "partial" / f"step-{state.step:06d}"
    distributed.save_sharded(local / "dcp", model, opt)
    distributed.barrier(d)
    if d.is_main:
        from opdflow.infra.artifacts.store import open_store
        st_save_file({"cpu": torch.get_rng_state()}, str(local / "rng.safetensors"))
        pq.write_table(pa.table(state.records), local / "records.parquet", compression="zstd")
        store, base = open_store(spec["store"]), f"{spec['partial_prefix']}/step-{state.step:06d}"
        shas = {f.relative_to(local).as_posix(): store.put_file(f"{base}/{f.relative_to(local).as_posix()}", f)
                for f in sorted(local.rglob("*")) if f.is_file()}
        store.put_bytes(f"{base}/state.json", json.dumps({**state.meta(), "sha256": shas}).encode())
        held = " held" if holds_after(os.environ.get(HOLD_ENV, ""), spec.get("stage", ""), state.step) else ""
        announce(f"{CHECKPOINT} step {state.step} {base}/state.json{held}")
    distributed.barrier(d)
    if holds_after(os.environ.get(HOLD_ENV, ""), spec.get("stage", ""), state.step):
        parent = os.getppid()
        while os.getppid() == parent:  # until killed (see the module docstring), or orphaned: a torchrun
            time.sleep(0.5)            # rank is its own process group, and must not outlive the kill
        os._exit(137)


def holds_after(hold: str, stage: str, step: int) -> bool:
    """Whether `OPDFLOW_HOLD_AFTER_CHECKPOINT=hold` stops stage `stage` after checkpoint `step`.

    >>> holds_after("9", "train.r01", 9), holds_after("9", "train.r01", 6)
    (True, False)
    >>> holds_after("train.r02:3", "train.r01", 3), holds_after("train.r02:3", "train.r02", 3)
    (False, True)
    >>> holds_after("", "train.r01", 3)
    False
    """
    if not hold:
        return False
    want_stage, _, want_step = hold.rpartition(":")
    return int(want_step) == step and want_stage in ("", stage)


def announce(line: str) -> None:
    """A line for whoever watches the round: stderr (above any progress bar) and, inside a
    Prefect task run, the task's log."""
    from tqdm import tqdm
    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()
    if "prefect" in sys.modules:  # never import Prefect into a torchrun worker for this
        try:
            from prefect.context import TaskRunContext
            if TaskRunContext.get() is not None:
                from prefect.logging import get_run_logger
                get_run_logger().info(line)
        except Exception:  # noqa: BLE001 - logging must never fail a round
            pass


def load_partial(resume: Path, model, opt, state: TrainState) -> None:
    meta = json.loads((resume / "state.json").read_text())
    distributed.load_sharded(resume / "dcp", model, opt)
    torch.set_rng_state(st_load_file(str(resume / "rng.safetensors"))["cpu"])
    state.step, state.losses, state.n_tok, state.n_bypassed = meta["step"], meta["losses"], meta["n_tok"], meta["n_bypassed"]
    state.step_log = meta.get("step_log", [])
    state.records = pq.read_table(resume / "records.parquet").to_pydict()


# -- the loop ----------------------------------------------------------------------------------

def train_step(d: distributed.Dist, model, opt, loss_fn, c: Config, batch: list[dict], bypass: frozenset[int],
               pad_id: int, global_step: int, vocab: int | None = None,
               stats: dict | None = None,
               teacher_head: dict | None = None) -> tuple[float, list[float], list[float], list[float]]:
    """One optimizer step over the global batch; returns (loss, per-token losses, weights and
    trainer logprobs in batch order) on rank 0. `stats` gets the step's gradient norm (before
    clipping) and learning rate. `teacher_head`: `loss_step`'s, for `scoring.signal: hidden`."""
    n_global = sum(len(r["response_ids"]) for r in batch)
    micros = rank_micro_batches(batch, d.rank, d.world, c.train.micro_batch_size)
    loss_sum, mine = 0.0, []
    for i, pos in enumerate(micros):
        distributed.set_gradient_sync(model, i == len(micros) - 1)
        rows = [batch[p] for p in pos] or batch[:1]  # an empty micro-batch runs with zero weight
        loss, per_token, weights, trainer_lp = loss_step(model, loss_fn, rows, bypass, pad_id, c.train.tis_cap,
                                                         c.ablation.position, vocab=vocab, teacher_head=teacher_head)
        n_micro = sum(len(r["response_ids"]) for r in rows)
        scale = (n_micro / n_global) * d.world if pos else 0.0  # FSDP averages over ranks
        (loss * scale).backward()
        if pos:
            loss_sum += float(loss.detach()) * n_micro  # host sync: the log needs the value
            vals, ws, tlp = per_token.detach().float().cpu().tolist(), weights.cpu().tolist(), trainer_lp.cpu().tolist()
            start = 0
            for p, r in zip(pos, rows):
                n = len(r["response_ids"])
                mine.append((p, vals[start:start + n], ws[start:start + n], tlp[start:start + n]))
                start += n
    set_lr(opt, c, global_step)
    if c.train.optimizer.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.train.optimizer.grad_clip)
    elif stats is not None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if stats is not None:
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # an FSDP DTensor
        stats.update(grad_norm=float(norm), lr=opt.param_groups[0]["lr"])  # host sync: once per step, for the log
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss_value = distributed.all_sum(d, loss_sum) / max(1, n_global)
    gathered = distributed.gather_to_main(d, mine)
    if gathered is None:
        return loss_value, [], [], []
    by_pos = sorted((item for part in gathered for item in part), key=lambda x: x[0])
    return (loss_value, [v for _, vals, _, _ in by_pos for v in vals], [w for _, _, ws, _ in by_pos for w in ws],
            [x for _, _, _, tlp in by_pos for x in tlp])


def train_round(spec: dict, progress=lambda frac, msg="": None) -> dict:
    """Run one round as described by `spec`; rank 0 writes the outputs to spec['out']."""
    d = distributed.init()
    try:
        return _train_round(d, spec, progress)
    finally:
        distributed.shutdown(d)


def _train_round(d: distributed.Dist, spec: dict, progress) -> dict:
    c = parse_config(spec["config"])
    tag = tuple(spec.get("seed_tag") or ())  # an ablation seed's prefix (plan.seed_tag); () for the main run
    torch.manual_seed(derive_seed(c.seed, *tag, "train", spec["arm"], spec["round"]))
    tok = load_tokenizer(spec["src_model"])
    model = load_model(spec["src_model"], c.student.dtype, dev=d.device)
    model.train()
    distributed.shard_model(model, d)
    opt = make_optimizer(model, c)
    if spec.get("optimizer"):
        full = optimizer_from_files(Path(spec["optimizer"]["data"]).read_bytes(),
                                    json.loads(Path(spec["optimizer"]["meta"]).read_text())) if d.is_main else {}
        distributed.load_full_optimizer_state(d, model, opt, full)
    loss_cls = FusedLinearDistillationLoss if c.train.fused_lm_head else DistillationLoss
    loss_fn = loss_cls(kind=c.train.loss.kind, beta=c.train.loss.beta, temperature=c.train.loss.temperature,
                       backend=c.train.kernel)
    if c.train.fused_lm_head:
        check_head_is_logits(model)
    rows = pq.read_table(spec["rows"]).to_pylist()
    head = load_teacher_head(spec["teacher_hidden"], len(tok), d.device) if spec.get("teacher_hidden") else None
    batches = step_batches(len(rows), c.train.steps_per_round, c.train.batch_size,
                           derive_seed(c.seed, *tag, "train-order", spec["round"]))
    bypass = frozenset(spec["bypass"])
    state = TrainState()
    resumed = None
    if spec.get("resume"):
        load_partial(Path(spec["resume"]), model, opt, state)
        resumed = state.step
    t0 = time.time()
    while state.step < len(batches):
        batch = [rows[i] for i in batches[state.step]]
        global_step = (spec["round"] - 1) * c.train.steps_per_round + state.step
        t_step, stats = time.time(), {"global_step": global_step}
        loss, per_token, weights, trainer_lp = train_step(d, model, opt, loss_fn, c, batch, bypass, tok.pad_token_id,
                                                          global_step, vocab=len(tok), stats=stats, teacher_head=head)
        if d.is_main:
            state.record(loss, batch, per_token, weights, trainer_lp, {**stats, "seconds": time.time() - t_step})
        else:
            state.step += 1
        progress(state.step / len(batches), f"step {state.step}/{len(batches)} loss {loss:.4f}")
        every = c.train.checkpoint_every
        if every and state.step % every == 0 and state.step < len(batches):
            save_partial(d, spec, model, opt, state)
    secs = time.time() - t0
    return _write_outputs(d, spec, c, model, opt, tok, state, secs, resumed)


def _write_outputs(d, spec, c: Config, model, opt, tok, state: TrainState, secs: float, resumed) -> dict:
    weights = distributed.full_model_state(model)
    optim = distributed.full_optimizer_state(model, opt)
    if not d.is_main:
        return {}
    out = Path(spec["out"])
    fresh = load_model(spec["src_model"], c.student.dtype, dev=torch.device("cpu"))
    fresh.load_state_dict(weights)
    save_model(fresh, tok, out / "model")
    optimizer_to_files(optim, out)
    pq.write_table(pa.table(state.records), out / "token_losses.parquet", compression="zstd")
    losses = state.losses
    metrics = {"steps": state.step, "loss_first": round(losses[0], 5), "loss_last": round(losses[-1], 5),
               "loss_mean": round(sum(losses) / len(losses), 5), "losses": [round(x, 5) for x in losses],
               "tokens_trained": state.n_tok, "tokens_weighted": state.n_tok - state.n_bypassed,
               "seconds_training": round(secs, 3), "bypassed_fraction": round(state.n_bypassed / max(1, state.n_tok), 4),
               "tokens_per_s": round(state.n_tok / max(secs, 1e-9), 1), "world_size": d.world,
               "step_log": state.step_log}
    if resumed is not None:
        metrics["resumed_from_step"] = resumed
    backend = {"kernel": resolve_backend(c.train.kernel, d.device), "device": str(d.device), "dtype": c.student.dtype,
               "world_size": d.world, "process_group": distributed.backend_name(d), "fsdp": d.sharded,
               "micro_batch_size": c.train.micro_batch_size, "fused_lm_head": c.train.fused_lm_head}
    result = {"metrics": metrics, "backend": backend, "losses_exact": losses}
    (out / "result.json").write_text(json.dumps(result))
    return result


def print_progress(frac: float, msg: str = "") -> None:
    """Under torchrun, rank 0 reports progress on stdout; the stage forwards it to Prefect."""
    print(f"{PROGRESS} {frac:.6f} {msg}", flush=True)


def main(argv: list[str] | None = None) -> None:
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    rank0 = int(os.environ.get("RANK", "0")) == 0
    train_round(spec, print_progress if rank0 else (lambda frac, msg="": None))


if __name__ == "__main__":
    main()


__all__ = ["train_round", "TrainState", "step_batches", "make_optimizer", "set_lr", "rank_micro_batches",
           "optimizer_to_files", "optimizer_from_files", "loss_step", "zeroed_ids", "bypass_weights"]

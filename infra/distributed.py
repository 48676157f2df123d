"""Distributed training plumbing: torch.distributed, FSDP2 and distributed checkpoints.

Why a module of its own: the train stage runs the same loop whether it is one process
(in the Prefect task itself) or N processes under `torchrun` (a subprocess the task
owns). Everything that differs between the two lives here, behind small functions that
are no-ops for one process:

* `init()`             reads torchrun's environment; NCCL on GPUs, gloo on CPU, chosen
                       automatically; one process needs no process group at all.
* `shard_model()`      FSDP2 `fully_shard` on every decoder layer (the classes a
                       transformers model lists in `_no_split_modules`), then the root.
* `full_*_state()`     the whole model / optimizer state gathered on rank 0 (CPU), keyed by
                       parameter name: the world-size-independent form a round hands to the
                       next one.
* `save_sharded()` / `load_sharded()`
                       `torch.distributed.checkpoint` with its safetensors storage (no
                       pickle): each rank writes its own shards, and a checkpoint written by
                       N processes loads into M (DCP reshards on load). Tied weights (an
                       lm_head sharing the embedding) are stored once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1


def init() -> Dist:
    """Join the process group torchrun describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local,
                device=torch.device(f"cuda:{local}") if cuda else torch.device("cpu"))


def shutdown(d: Dist) -> None:
    if d.sharded and dist.is_initialized():
        dist.destroy_process_group()


def backend_name(d: Dist) -> str:
    return dist.get_backend() if d.sharded else "none"


def shard_model(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """FSDP2 per decoder layer, then the root (embeddings, final norm, lm_head)."""
    if not d.sharded:
        return model
    from torch.distributed.fsdp import fully_shard
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    if not layer_classes:
        raise ValueError(f"{type(model).__name__} does not name its decoder layer classes "
                         "(_no_split_modules); FSDP needs them to shard per layer")
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module)
    fully_shard(model)
    return model


def set_gradient_sync(model: torch.nn.Module, on: bool) -> None:
    """Gradient accumulation: skip the reduce-scatter on all but the last micro-batch."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(on)


def all_sum(d: Dist, value: float) -> float:
    if not d.sharded:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t.item())


def gather_to_main(d: Dist, obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (in rank order); None elsewhere."""
    if not d.sharded:
        return [obj]
    out = [None] * d.world if d.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(d: Dist) -> None:
    if d.sharded:
        dist.barrier()


# -- whole state on rank 0: the hand-off between rounds --------------------------------------

def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(**kw)


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The full model state dict on rank 0 (CPU); empty on other ranks."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model, opt) -> dict:
    """The full optimizer state keyed by parameter name, on rank 0 (CPU)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=_options(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(d: Dist, model, opt, state: dict) -> None:
    """Load a full, name-keyed optimizer state (held by rank 0) into a possibly sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state,
                             options=_options(full_state_dict=True, broadcast_from_rank0=d.sharded))


# -- sharded checkpoints (DCP, safetensors storage) ------------------------------------------

def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _checkpoint_state(model, opt) -> dict[str, dict[str, torch.Tensor]]:
    """What DCP saves and loads: model tensors (tied ones once) and the optimizer's tensors."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    seen: set[int] = set()
    weights = {}
    for k, v in get_model_state_dict(model).items():
        ptr = _local(v).data_ptr()
        if ptr in seen:
            continue  # a tied weight: stored once, restored through the tie
        seen.add(ptr)
        weights[k] = v
    optim = get_optimizer_state_dict(model, opt, options=_options(flatten_optimizer_state_dict=True))
    return {"model": weights, "optim": {k: v for k, v in optim.items() if torch.is_tensor(v)}}


def save_sharded(path: Path, model, opt) -> None:
    """Every rank writes its shards of weights and optimizer state under `path`."""
    import torch.distributed.checkpoint as dcp
    dcp.save(_checkpoint_state(model, opt),
             storage_writer=dcp.HuggingFaceStorageWriter(str(path), save_distributed=True),
             no_dist=not dist.is_initialized())


def load_sharded(path: Path, model, opt) -> None:
    """Load a checkpoint written by any number of processes into this (possibly sharded) model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    state = _checkpoint_state(model, opt)
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(path)), no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"], options=_options(strict=False))
    flat = get_optimizer_state_dict(model, opt, options=_options(flatten_optimizer_state_dict=True))
    flat.update(state["optim"])
    set_optimizer_state_dict(model, opt, flat, options=_options(flatten_optimizer_state_dict=True))

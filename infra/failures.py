"""Why a stage failed, by cause: the failures a retry cannot fix, and what to do instead.

A stage task retries transient failures (a store or network hiccup) and fails at once on
permanent ones (`tasks/common.py`'s `is_transient`). Some permanent failures arrive as
exceptions whose type says nothing (a `RuntimeError` from a subprocess, an `OSError` from
transformers) or whose message names no file (`SafetensorError: invalid header length`).
This module recognises them by cause, so they fail on the first attempt with a message
that says what to change:

* corrupt or truncated weights (`safetensors.SafetensorError`, a header check that fails):
  the file is named; rebuild or re-download the model dir;
* no hub access (`huggingface_hub`'s `OfflineModeIsEnabled`, `LocalEntryNotFoundError`,
  transformers' "couldn't connect ... offline mode" `OSError`): opdflow runs offline, the
  model must be a complete local dir;
* out of memory: CUDA (`torch.OutOfMemoryError`), host memory (`MemoryError`, or torch's
  CPU allocator's `RuntimeError: ... can't allocate memory`): the same batch runs out again;
  the settings that bound memory are named;
* a training subprocess (torchrun) that exited non-zero: `SubprocessFailed`, with its log
  tail; out of memory when the tail says so (or a process was SIGKILLed, as the kernel's
  OOM killer does), else: fix what the tail names, and the retry resumes from the round's
  last in-round checkpoint.

`weights_header_problem(path)` reads a safetensors file's header and checks that every
tensor's bytes are inside the file, without loading any tensor: `opdflow validate` runs it
over the model dirs, so a truncated file fails in seconds, before any work.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path


class PermanentFailure(RuntimeError):
    """A failure a retry cannot fix; the message says what to change."""


class SubprocessFailed(RuntimeError):
    """A worker subprocess (torchrun) exited non-zero; its log tail is in the message."""


OOM_HINT = ("the same work runs out of memory again on a retry: lower train.micro_batch_size (or train.batch_size), "
            "rollout.batch_size, scoring.batch_size / scoring.chunk_tokens, or set train.fused_lm_head: true, "
            "or use a larger GPU / more train.nproc_per_node")
OFFLINE_HINT = ("opdflow runs with the Hugging Face hub offline (HF_HUB_OFFLINE=1): point the config at a complete "
                "local model dir (config.json, tokenizer files, *.safetensors)")
WEIGHTS_HINT = "the weights file is corrupt or truncated: rebuild or re-download the model dir"
SUBPROCESS_HINT = ("a retry runs the same command and fails the same way: fix what the log tail above names (a setting, "
                   "a file, the machine), then run the stage again; it resumes from the round's last in-round "
                   "checkpoint (train.checkpoint_every)")
KILLED_HINT = ("a training process was SIGKILLed, most often by the kernel's out-of-memory killer (see dmesg): "
               "give it more host memory or bound it: ")
# how running out of memory reads in a message or a subprocess's log (CUDA, torch's CPU allocator)
OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "can't allocate memory", "MemoryError")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA or host memory ran out (torch's CPU allocator raises a plain RuntimeError).

    >>> is_out_of_memory(MemoryError()), is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    (True, True)
    >>> is_out_of_memory(RuntimeError("NCCL timeout"))
    False
    """
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"OutOfMemoryError", "MemoryError"}) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _is_offline_error(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError"}:
        return True
    if isinstance(exc, OSError):
        msg = str(exc)
        return ("offline mode" in msg or "couldn't connect to" in msg.lower()
                or "HF_HUB_OFFLINE" in msg)
    return False


def permanent_cause(exc: BaseException) -> str | None:
    """What to do about a permanent failure recognised by its cause; None when it is not one."""
    names = {c.__name__ for c in type(exc).__mro__}
    if isinstance(exc, PermanentFailure):
        return str(exc)
    if "SafetensorError" in names:
        return WEIGHTS_HINT
    if isinstance(exc, SubprocessFailed):
        tail = str(exc)
        if any(m in tail for m in OOM_MARKERS):
            return OOM_HINT
        if "SIGKILL" in tail or "exit code -9" in tail:
            return KILLED_HINT + OOM_HINT.split(": ", 1)[1]
        return SUBPROCESS_HINT
    if is_out_of_memory(exc):  # torch.OutOfMemoryError (= torch.cuda.OutOfMemoryError), host memory
        return OOM_HINT
    if _is_offline_error(exc):
        return OFFLINE_HINT
    return None


def explain(exc: BaseException) -> PermanentFailure | None:
    """`exc` as a PermanentFailure whose message says what to do (None: not a known permanent cause)."""
    if isinstance(exc, PermanentFailure):
        return None
    hint = permanent_cause(exc)
    if hint is None:
        return None
    return PermanentFailure(f"{type(exc).__name__}: {exc} -- {hint}")


# -- safetensors headers --------------------------------------------------------------------

def weights_header_problem(path: str | Path) -> str | None:
    """Why a .safetensors file is unusable (None: its header parses and every tensor's data lies
    inside the file). Reads the 8-byte length and the JSON header only."""
    p = Path(path)
    size = p.stat().st_size
    if size < 8:
        return f"{size} bytes: shorter than the 8-byte header length (truncated)"
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > 100 * 2**20:
            return f"header length {n} bytes but the file has {size} bytes (truncated or not safetensors)"
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return f"header is not valid JSON ({e})"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    data = size - 8 - n
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = t["data_offsets"]
        except (TypeError, KeyError, ValueError):
            return f"tensor {name!r} has no valid data_offsets"
        if not 0 <= lo <= hi:
            return f"tensor {name!r} has invalid data_offsets {lo}, {hi}"
        end = max(end, hi)
    if end > data:
        return f"tensors need {end} data bytes but the file has {data} after its header (truncated)"
    return None


def check_weights_dir(model_dir: str | Path) -> list[tuple[Path, str]]:
    """(file, problem) for every unusable *.safetensors file under a model dir."""
    out = []
    for f in sorted(Path(model_dir).rglob("*.safetensors")):
        problem = weights_header_problem(f)
        if problem is not None:
            out.append((f, problem))
    return out

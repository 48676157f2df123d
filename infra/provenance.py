"""Provenance: what code and which software stack produced an artifact.

Scores move with the inference backend and the stack (transformers and lm-eval
versions, dtype, device), so every manifest entry records `stack()`, and stages that
generate text also record their backend settings. `code_version()` enters every stage
key: changing opdflow's code invalidates committed stages instead of silently mixing
outputs of two versions.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata as md
import platform
import socket
import subprocess
import sys
from pathlib import Path

PACKAGE_DIRS = ("flows", "tasks", "kernels", "evals", "infra")
ROOT = Path(__file__).resolve().parent.parent


def dist_version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """opdflow's version plus a hash of its Python sources (stable across checkouts)."""
    h = hashlib.sha256()
    for d in PACKAGE_DIRS:
        for f in sorted((ROOT / d).rglob("*.py")):
            h.update(f.relative_to(ROOT).as_posix().encode())
            h.update(f.read_bytes())
    return f"{dist_version('opdflow') or '0'}+{h.hexdigest()[:12]}"


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
        if not commit:
            return None
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name() -> str:
    import torch
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu:{platform.processor() or platform.machine()}"


@functools.lru_cache(maxsize=1)
def stack() -> dict:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "device": device_name(),
        "opdflow": code_version(),
        "git_commit": git_commit(),
        **{name: dist_version(name) for name in ("torch", "transformers", "lm_eval", "vllm", "prefect", "triton")},
    }


def dir_fingerprint(path: Path) -> str:
    """Identity of a user's model dir without hashing gigabytes of weights: every file's
    name and size, plus the full sha256 of the small files (configs, tokenizer)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        rel, size = f.relative_to(path).as_posix(), f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if size <= 16 * 2**20:
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()

"""Provenance: what code and which software stack produced an artifact.

Scores move with the inference backend and the stack (transformers and lm-eval
versions, dtype, device), so every manifest entry records `stack()` (with `code_version()`,
the whole package's), and stages that generate text also record their backend settings.

A stage's key holds `module_code_version(its module)`: a hash of the sources of the stage's
module and of every opdflow module it imports, transitively, found statically (`ast`, over
the package's source, imports inside functions included). So changing code a stage runs
invalidates it, instead of silently mixing outputs of two versions, and changing code it
does not run (a report caption, a plot, another stage) leaves its committed outputs valid:
`opdflow run` after a fix recomputes what the fix touched. Chosen over an explicit per-stage
version because nothing has to be remembered: a bump that was forgotten would keep stale
outputs, while the closure over-approximates at worst (a module it imports for one helper,
`infra/config.py`'s descriptions, count in full: source bytes, comments included). Dynamic
imports (`importlib`, the stage registry's) are not followed: `tasks/plan.stages()` loads
every stage module, but a stage runs only its own. Files that are not Python (evaluation
templates) are not in it; built-in models hash their own files (`infra/testbeds/builtin.py`).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata as md
import platform
import socket
import subprocess
import sys
import threading
from pathlib import Path

PACKAGE_DIRS = ("flows", "tasks", "kernels", "evals", "infra")
ROOT = Path(__file__).resolve().parents[2]


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


def module_file(module: str) -> Path | None:
    """The source file of an opdflow module (`opdflow.tasks.train` -> tasks/train.py; a
    package: its __init__.py), or None when it is not one."""
    parts = module.split(".")
    if parts[0] != "opdflow" or len(parts) < 2 or parts[1] not in PACKAGE_DIRS:
        return None
    base = ROOT.joinpath(*parts[1:])
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imported(module: str, tree: ast.AST) -> set[str]:
    """The opdflow modules a module's source imports, anywhere in it (inside functions too):
    `import opdflow.a.b`, `from opdflow.a import b` (b a module, or a name of opdflow.a),
    relative imports resolved against the module's package."""
    package = module if module_file(module) and module_file(module).name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    found = set()
    for name in out:
        parts = name.split(".")
        for i in range(2, len(parts) + 1):  # a package's __init__ runs for every module under it
            if module_file(".".join(parts[:i])):
                found.add(".".join(parts[:i]))
    return found


# CPython 3.11's `ast.parse` is not safe to call from two threads at once ("SystemError: AST
# constructor recursion depth mismatch", fixed in 3.12): concurrent stage tasks compute their keys
# in threads of one flow process, so parsing is serialised.
_PARSE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def module_closure(module: str) -> tuple[str, ...]:
    """`module` and every opdflow module it imports, transitively, sorted."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        f = module_file(m)
        if m in seen or f is None:
            continue
        seen.add(m)
        with _PARSE_LOCK:
            tree = ast.parse(f.read_bytes(), filename=str(f))
        todo.extend(_imported(m, tree) - seen)
    return tuple(sorted(seen))


@functools.lru_cache(maxsize=None)
def module_code_version(module: str) -> str:
    """opdflow's version plus a hash of the sources of `module_closure(module)` (paths
    relative to the package, so stable across checkouts)."""
    h = hashlib.sha256()
    for m in module_closure(module):
        f = module_file(m)
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0")
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

"""The checkout's top-level directories do not shadow installed packages of the same name.

The repository root holds `kernels/` (installed as `opdflow.kernels`); a process started in the
root (`python -m ...`, pytest, Prefect's process worker) has the root on sys.path, so `import
kernels` would find this directory instead of the `kernels` distribution that transformers
(>= 5.25) requires and imports at load (`ImportError: cannot import name 'CUDAProperties' from
'kernels'` in every stage that loads a model). `kernels/__init__.py` hands such an import over to
the installed distribution, or fails as a missing module would.
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str) -> subprocess.CompletedProcess:
    # `-c` puts the working directory (the checkout's root) first on sys.path, as `python -m` does
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_top_level_kernels_is_the_installed_distribution():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the `kernels` distribution is not installed (transformers < 5.25 does not require it)")
    out = _python("import sys; assert sys.path[0] == ''; import transformers.integrations.hub_kernels, kernels, "
                  "opdflow.kernels as ok; print(kernels.__file__); print(ok.__file__); print(ok.distillation_loss)")
    assert out.returncode == 0, out.stderr[-3000:]
    real, ours, fn = out.stdout.splitlines()
    assert Path(real).resolve() != ROOT / "kernels" / "__init__.py" and "site-packages" in real, real
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py" and "distillation_loss" in fn


def test_top_level_kernels_without_the_distribution_is_a_missing_module():
    out = _python("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
                  "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print(e.name, '|', e)\n")
    assert out.returncode == 0, out.stderr[-3000:]
    name, _, msg = out.stdout.strip().partition(" | ")
    assert name == "kernels" and "is opdflow.kernels, not a top-level package" in msg, out.stdout

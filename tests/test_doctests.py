"""The docstring examples (`>>>`) of the package run, as part of `pytest tests`.

Every module of flows/ tasks/ infra/ kernels/ evals/ whose source has an example is
imported by its real name (`opdflow.tasks.shards`; pytest's `--doctest-modules` would
import tasks/shards.py a second time as `tasks.shards`, because the repository root is
the package under another name) and all its examples run with the standard `doctest`
runner. A module that cannot be imported because a third-party dependency is missing
on this machine (a GPU-only package) is reported as a skip with the missing name; a
missing opdflow module is a failure.
"""
from __future__ import annotations

import doctest
import importlib
import io

import pytest

from opdflow.infra.artifacts.provenance import PACKAGE_DIRS, ROOT


def modules_with_examples() -> list[str]:
    found = []
    for d in PACKAGE_DIRS:
        for f in sorted((ROOT / d).rglob("*.py")):
            if ">>>" in f.read_text(encoding="utf-8"):
                rel = f.relative_to(ROOT).with_suffix("")
                parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
                found.append(".".join(("opdflow", *parts)))
    return found


MODULES = modules_with_examples()


def test_examples_are_found():
    assert {"opdflow.tasks.shards", "opdflow.tasks.common", "opdflow.evals.answers",
            "opdflow.kernels.reference"} <= set(MODULES), MODULES


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        if (e.name or "").split(".")[0] == "opdflow":
            raise
        pytest.skip(f"{module} cannot be imported here: {e.name or e} is not installed ({e})")
    tests = [t for t in doctest.DocTestFinder().find(mod, module) if t.examples]
    assert tests, f"{module} has '>>>' in its source but no docstring example doctest can find"
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, out.getvalue()

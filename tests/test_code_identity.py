"""A stage's identity follows the code it runs (`infra/artifacts/provenance.module_code_version`).

A fresh copy of the package runs a tiny config (one round, no ablation) through the stages'
plain functions in a subprocess; then a caption of `tasks/report.py` is edited in the copy
and the same run is run again: `report` runs (no stage needs it), and no rollout, scoring or
training round, rock stage or evaluation does. The copy is frozen for the test, so edits to
the checkout while the tests run do not matter.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.integration, pytest.mark.slow]

OVERRIDES = {"train": {"rounds": 1}, "ablation": {"enabled": False}}
CAPTION = "95% CI: Wilson score interval over the n documents"

_RUN = """
import json, sys
import opdflow.tasks.report
from opdflow.infra.config import load_config
from opdflow.infra.artifacts.manifest import Run
from opdflow.infra.artifacts.store import open_store
from opdflow.tasks.plan import plan, stage_of
config = load_config(sys.argv[1], json.loads(sys.argv[2]))
run = Run.create_or_open(open_store(sys.argv[3]), "edit", config)
ran = [name for name in plan(config) if stage_of(name).run(run, name)[1]]
keys = {name: run.require(name)["key"] for name in plan(config)}
print(json.dumps({"ran": ran, "keys": keys, "report_module": opdflow.tasks.report.__file__}))
"""


def test_a_report_caption_edit_reruns_the_report_alone(tmp_path):
    from opdflow.infra.artifacts.provenance import PACKAGE_DIRS
    copy = tmp_path / "copy"
    for d in PACKAGE_DIRS:
        shutil.copytree(ROOT / d, copy / "opdflow" / d, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "opdflow" / "__init__.py").write_text("")  # a regular package: found before the editable install
    store = tmp_path / "store"

    def run() -> dict:
        out = subprocess.run([sys.executable, "-c", _RUN, str(ROOT / "configs" / "tiny.yaml"), json.dumps(OVERRIDES),
                              str(store)], cwd=copy, env={**os.environ, "PYTHONPATH": str(copy)},
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-4000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["report_module"] == str(copy / "opdflow" / "tasks" / "report.py")  # the copy's code ran
        return got

    first = run()
    assert first["ran"] == list(first["keys"])  # a new run: every stage ran
    assert {"rollout.r01", "score.r01", "train.r01", "rock", "eval.final_student", "report"} <= set(first["ran"])
    report_py = copy / "opdflow" / "tasks" / "report.py"
    src = report_py.read_text()
    assert CAPTION in src
    report_py.write_text(src.replace(CAPTION, "95% CI (Wilson score interval) over the n documents"))
    second = run()
    assert second["ran"] == ["report"]
    assert [n for n in first["keys"] if first["keys"][n] != second["keys"][n]] == ["report"]
    report = (store / "runs" / "edit" / "manifest" / "report.json").read_text()
    md_key = json.loads(report)["outputs"]["report.md"]["key"]
    assert "95% CI (Wilson score interval)" in (store / md_key).read_text()

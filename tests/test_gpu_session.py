"""benchmarks/gpu_session.sh, the prepared command for a short GPU session, keeps working.

Its GPU work cannot run here; this runs its plumbing on CPU with a budget too small for any
step, so a broken script is found before a GPU session spends its minutes on it.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, wheels):
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "run", "40"], cwd=ROOT,
                         env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, "WHEELS": str(wheels)},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_a_tiny_budget_skips_every_step_and_reports_it(tmp_path):
    out = _run(tmp_path, tmp_path / "no-wheels")
    summary = (out / "summary.txt").read_text()
    for step in ("kernel-tests", "native-tests", "bench-kernels"):
        assert f"{step}: skipped" in summary, summary
    assert "total " in summary and "of 40s" in summary
    assert "torch" in (out / "env.txt").read_text()  # the versions line ran in the prepared environment


def test_wheels_that_do_not_install_cost_only_themselves(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "broken-1.0-py3-none-any.whl").write_text("not a zip")
    summary = (_run(tmp_path, wheels) / "summary.txt").read_text()
    assert "wheels: install failed" in summary and "total " in summary


def test_unknown_subcommand_is_refused():
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "bogus"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "usage" in res.stderr

"""A failed training subprocess and running out of memory fail the stage at once (a retry
would run the same thing again), with a message that says what to change.

Real failures: torchrun launched on a spec file that does not exist (the worker exits 1 with
its traceback in the log tail), and a real allocation torch's CPU allocator refuses (a plain
`RuntimeError`, which counted as transient before). The CUDA case is `torch.OutOfMemoryError`,
classified by type (tests/infra/test_integrity.py).
"""
from __future__ import annotations

import pytest

from opdflow.infra.config import parse_config
from opdflow.infra.failures import PermanentFailure, SubprocessFailed, explain
from opdflow.infra.artifacts.manifest import Run, run_stage
from opdflow.infra.artifacts.store import open_store
from opdflow.tasks.common import is_transient
from opdflow.tasks.train import launch


@pytest.fixture
def run(tmp_path):
    return Run.create_or_open(open_store(str(tmp_path / "store")), "r1", parse_config({}))


def test_failed_torchrun_is_permanent_and_names_the_cause(run, tmp_path):
    spec = tmp_path / "no-such-spec.json"

    def body(ctx):
        launch(spec, 1, lambda frac, msg="": None)
    with pytest.raises(PermanentFailure) as e:
        run_stage(run, "train.r01", params={}, inputs={}, body=body)
    msg = str(e.value)
    assert msg.startswith("SubprocessFailed: torchrun (1 processes) failed with exit code 1")
    assert "FileNotFoundError" in msg and str(spec) in msg  # the worker's own error, from the log tail
    assert "fix what the log tail above names" in msg and "in-round checkpoint" in msg
    assert "fix what the log tail above names" in run.attempts("train.r01")[-1]["error"]
    assert not is_transient(e.value)


def test_host_out_of_memory_is_permanent_with_the_memory_settings(run):
    import torch

    def body(ctx):
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: refused by the CPU allocator
    with pytest.raises(PermanentFailure, match="lower train.micro_batch_size") as e:
        run_stage(run, "train.r01", params={}, inputs={}, body=body)
    assert str(e.value).startswith("RuntimeError:") and "can't allocate memory" in str(e.value)
    assert not is_transient(e.value)


def test_subprocess_tail_says_which_failure_it_was():
    oom = SubprocessFailed("torchrun (2 processes) failed with exit code 1:\n"
                           "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    killed = SubprocessFailed("torchrun (2 processes) failed with exit code 1:\n"
                              "exitcode  : -9 (pid: 4242)\ntraceback : Signal 9 (SIGKILL) received by PID 4242")
    other = SubprocessFailed("torchrun (2 processes) failed with exit code 1:\nKeyError: 'rows'")
    assert "lower train.micro_batch_size" in str(explain(oom))
    assert "out-of-memory killer" in str(explain(killed)) and "train.micro_batch_size" in str(explain(killed))
    assert "fix what the log tail above names" in str(explain(other))
    assert not any(is_transient(x) for x in (oom, killed, other))
    assert is_transient(RuntimeError("NCCL watchdog timeout"))  # an unknown RuntimeError is still retried

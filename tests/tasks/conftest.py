"""Killing a training round at a known point, for the crash tests.

The round is started in a process group of its own with `OPDFLOW_HOLD_AFTER_CHECKPOINT`
set (`opdflow.tasks.train_worker`): after the named checkpoint is committed, every
training process announces it on stderr and waits. The test reads stderr until that
line and SIGKILLs the whole group (the stage and any torchrun processes: a lost machine).
No polling, no timing: the kill always lands after the checkpoint and before the round ends.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytest

from opdflow.tasks.train_worker import CHECKPOINT, HOLD_ENV


def _kill_when_held(cmd: list[str], stage: str, step: int, cwd: str, timeout: float = 300) -> str:
    """Run `cmd` (a process that trains `stage`), SIGKILL its process group once the
    checkpoint of `step` is committed; returns the store key of its `state.json`."""
    env = {**os.environ, HOLD_ENV: f"{stage}:{step}"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    tail: list[str] = []
    try:
        for line in proc.stderr:
            tail = (tail + [line.rstrip()])[-40:]
            if CHECKPOINT in line:
                _, _, n, key, *held = line[line.index(CHECKPOINT):].split()
                assert int(n) <= step, f"checkpoint {n} announced after {step}: the hold did not stop the round"
                if int(n) == step:
                    assert held == ["held"], line
                    break
        else:
            pytest.fail(f"the training process ended before checkpoint {step} was held "
                        f"(exit {proc.wait()}):\n" + "\n".join(tail))
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    return key


@pytest.fixture
def kill_when_held():
    """`kill_when_held(cmd, stage, step, cwd) -> state.json key`: see the module docstring."""
    return _kill_when_held

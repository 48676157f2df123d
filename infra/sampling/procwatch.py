"""A watcher that keeps a server process tree from outliving the process that started it.

Why: opdflow starts `vllm serve` (an API server plus the engine processes it spawns) from a
stage. A `finally` block or an `atexit` hook stops it when the stage fails or exits, but not
when the stage's process is killed with SIGKILL (an OOM kill, a worker shut down hard, a test
that kills it): then nothing in that process runs, and the server would keep its port, its
memory and its GPU. This watcher is a separate, single-threaded process that notices the death
of its parent and takes the server down with it.

    python procwatch.py PARENT_PID GRACE_S -- CMD ARG ...

It is started by `infra.sampling.vllm_backend` as the leader of a new process group (Popen
`start_new_session=True`) and starts CMD inside that group with `PR_SET_PDEATHSIG = SIGKILL`
(Linux), so CMD is killed by the kernel if the watcher itself dies. Then it waits, and stops
the tree (SIGTERM to every process of the group and every descendant of CMD, SIGKILL to what
is left after GRACE_S seconds) when:

- its parent is gone (`os.getppid()` is no longer PARENT_PID: it was re-parented),
- it receives SIGTERM, SIGINT or SIGHUP (what `VllmServer.stop` sends), or
- CMD exits by itself (whatever CMD left behind is stopped; the watcher exits with CMD's code).

Standard library only, and run as a script by path, so it starts in milliseconds and needs
nothing from opdflow's environment or vLLM's.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
POLL_S = 0.2


def _die_with_parent() -> None:
    """preexec_fn of CMD: the kernel sends SIGKILL to CMD when the watcher exits."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:  # not Linux: the watcher's own polling still stops CMD
        pass


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, pgid) of a live process, from /proc (None if it is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[2])


def tree(root: int, pgid: int) -> set[int]:
    """Every live process in process group `pgid` or descended from `root` (self excluded)."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_stat(int(name))
            if st:
                stats[int(name)] = st
    out = {pid for pid, (_, g) in stats.items() if g == pgid}
    frontier = {root}
    while frontier:
        children = {pid for pid, (pp, _) in stats.items() if pp in frontier and pid not in out}
        out |= children
        frontier = children
    if root in stats:
        out.add(root)
    out.discard(os.getpid())
    return out


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_tree(child: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the group and CMD's descendants, wait up to grace_s, SIGKILL the rest."""
    pgid = os.getpgid(0)
    pids = tree(child.pid, pgid)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        child.poll()
        pids = {p for p in pids | tree(child.pid, pgid) if _proc_stat(p)}
        if not pids:
            return
        time.sleep(POLL_S)
    _signal_all(pids | tree(child.pid, pgid), signal.SIGKILL)
    child.poll()


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: procwatch.py PARENT_PID GRACE_S -- CMD ...", file=sys.stderr)
        return 2
    parent, grace_s, cmd = int(argv[0]), float(argv[1]), argv[3:]
    asked = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: asked.append(signum))
    child = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
    while True:
        code = child.poll()
        if code is not None:
            stop_tree(child, grace_s)
            return code
        if asked or os.getppid() != parent:
            stop_tree(child, grace_s)
            return 0
        time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Shared by red team rounds 15b and 16 (test_red_round15b.py, test_red_round16.py): an
agent that leaves many processes in its cage, and a host thread that takes each cage pid
freed while hive-priv stops that cage (as a host process or thread gets one when the
host's pids wrap; here forced with ``ns_last_pid``, as root on the host)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Callable, Iterator

from hive_fixture import HIVE, HiveProcess

PIDS_MAX = 4096
MEMORY_MIB = 4096
AGENT = {"runtime": "command", "command": ["true"], "pids_max": PIDS_MAX, "memory_mib": MEMORY_MIB}

# Run as the agent in its cage (hive exec --as-agent): leave N sleeping processes in the
# cage's pid namespace (a session of their own, the exec's init killed: like anything an
# earlier turn left running), then say how many processes the cage has.
SPREAD_OUT = r"""
import os, signal, sys
n = int(sys.argv[1])
init = os.getppid()
r, w = os.pipe()
ready_r, ready_w = os.pipe()
if os.fork() == 0:
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    # Children are reaped as they exit (their pids are free at once), and nobody here
    # ends on SIGTERM: root's SIGKILL round comes, its first SIGKILLs (bwrap's, lower
    # pids than any here) end the cage's pid namespace, and the kernel ends every
    # process here while root is still going down its list of their pids.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for i in range(n):
        if os.fork() == 0:
            os.close(w)
            os.read(r, 1)  # until the cage ends
            os._exit(0)
    os.write(ready_w, b"!")
    os.read(r, 1)
    os._exit(0)
os.read(ready_r, 1)  # every child forked
print(len([p for p in os.listdir("/proc") if p.isdigit()]), flush=True)
if init > 1:
    os.kill(init, signal.SIGKILL)
"""


def spread_out(hive: HiveProcess, name: str, n: int) -> list[int]:
    """The agent leaves ``n`` processes in its cage; returns the cage's pids (host view)."""
    argv = [str(HIVE), "--run-dir", str(hive.run_dir), "exec", "--as-agent", name, "--",
            "python3", "-c", SPREAD_OUT, str(n)]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    cage_pids = hive.cgroup(name).pids()
    assert len(cage_pids) >= n, (len(cage_pids), out.stdout, out.stderr[-300:])
    return cage_pids


def set_next_pid(pid: int) -> None:
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))


@contextlib.contextmanager
def freed_pids_taken(cage_pids: list[int], n: int, take: Callable[[], None]) -> Iterator[None]:
    """While in the block, a host thread watches the ``n`` highest of ``cage_pids`` (the
    ones root reaches last: the first freed before root gets to them), highest first: a
    spin on the kernel's word for each (ESRCH once the pid is free, not merely exited),
    then ``take()`` at once with the next pid set to it. Leaving the block ends the watch."""
    done = threading.Event()

    def watch() -> None:
        for pid in sorted(cage_pids)[-n:][::-1]:
            while not done.is_set():
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
            if done.is_set():
                return
            set_next_pid(pid)
            take()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(10)


def restart(hive: HiveProcess, name: str) -> None:
    """Starts the agent's cage again after a stop (hive-priv's verb, as the core calls it)."""
    start = hive.priv("start", name=name, pids_max=PIDS_MAX, memory_mib=MEMORY_MIB)
    assert start.get("ok"), start

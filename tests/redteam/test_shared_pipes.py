"""No hive process shares a pipe with the agent's processes.

A pipe is one object with one lock (``pipe->mutex``) that both ends take, and a process
holding either end can hold that lock as long as it likes (``splice`` from a socket nobody
writes to into it, or from it into a socket nobody reads); whoever holds the other end
then sleeps uninterruptibly in its next read, write or last close. hive-priv's exec relay
(session 30, ``test_red_exec30.py``) and the harness's turn loop (session 31,
``test_red_turn31.py``) each slept so. The rule since: nothing of the hive's holds a pipe
whose other end the agent's uid holds; what they share are sockets (a lock each, and
``splice`` needs a pipe on one side).

This checks the rule as a whole, from the host, while everything that hands the agent
stdio is live at once: a turn (the runtime's stdin, stdout and stderr from the harness),
``hive exec --as-agent`` and a clean ``hive exec`` (hive-priv's relay). Every pipe any
process of the agent's uid holds must be held by processes of that uid alone.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hive_fixture import HIVE, HiveProcess, proc_cmdline, proc_uid, running_hive

NAME = "sp31"
RUNTIME = ["python3", "-c", textwrap.dedent("""
    import sys, time
    sys.stdin.read()
    print("up", flush=True)
    time.sleep(600)
""")]
AGENTS: dict[str, dict[str, Any]] = {NAME: {"runtime": "command", "command": RUNTIME, "turn_timeout": 120}}


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(AGENTS))


def _pipes() -> dict[int, set[str]]:
    """Every host process -> the pipes it holds ("pipe:[inode]")."""
    out: dict[int, set[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        found = set()
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("pipe:["):
                found.add(link)
        if found:
            out[int(entry)] = found
    return out


def _shared(uid: int) -> dict[str, list[tuple[int, int | None, str]]]:
    """Each pipe a process of ``uid`` holds that a process of another uid holds too ->
    those others (pid, uid, command line)."""
    held = _pipes()
    mine = set().union(*(ps for p, ps in held.items() if proc_uid(p) == uid))
    out: dict[str, list[tuple[int, int | None, str]]] = {}
    for p, ps in held.items():
        if proc_uid(p) != uid:
            for pipe in ps & mine:
                out.setdefault(pipe, []).append((p, proc_uid(p), " ".join(proc_cmdline(p))[:60]))
    return out


def _wait_for(what: str, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.attack("harness.turn", ref="sessions 30 and 31: no pipe shared with a cage (the exec's stdio, the runtime's)")
def test_no_hive_process_shares_a_pipe_with_the_agents_processes(hive: HiveProcess) -> None:
    uid = hive.cage(NAME)["uid"]
    msg = hive.host_call("send", to=NAME, body="go")
    assert msg.get("ok"), msg

    def turn_up() -> bool:
        entries = hive.host_call("transcript", name=NAME, limit=50)["entries"]
        return any(e["kind"] == "stdout" and e["data"] == "up" for e in entries)

    _wait_for("the turn's runtime", turn_up)
    execs = [
        subprocess.Popen(
            [str(HIVE), "--run-dir", str(hive.run_dir), "exec", *flags, NAME, "--", "sleep", marker],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for flags, marker in ((("--as-agent",), "31.1"), ((), "31.2"))
    ]
    try:
        def agent_sleeps() -> list[int]:
            found = [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                     if proc_cmdline(p)[:1] == ["sleep"] and proc_cmdline(p)[1:] in (["31.1"], ["31.2"])]
            return found if len(found) == 2 else []

        sleeps = _wait_for("both execs' commands", agent_sleeps)
        assert all(proc_uid(p) == uid for p in sleeps), [(p, proc_uid(p)) for p in sleeps]
        # The check itself finds a shared pipe: a process of the agent's uid on the host,
        # its stdout a pipe to this (root) test.
        control = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                                    "sleep", "31.3"], stdout=subprocess.PIPE)
        try:
            _wait_for("the control", lambda: proc_uid(control.pid) == uid)
            assert control.stdout is not None
            assert os.readlink(f"/proc/self/fd/{control.stdout.fileno()}") in _shared(uid)
        finally:
            control.kill()
            control.wait()
            if control.stdout is not None:
                control.stdout.close()
        shared = _shared(uid)
        assert not shared, f"pipes the agent's processes share with others: {shared}"
        # The check sees the agent's processes at all: the runtime and both sleeps are there.
        everyone = {p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if proc_uid(p) == uid}
        assert set(sleeps) <= everyone and len(everyone) >= 3, everyone
    finally:
        for p in execs:
            p.kill()
            p.wait()
        hive.host_call("interrupt", name=NAME)

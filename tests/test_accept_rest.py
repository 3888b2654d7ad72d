"""A core out of descriptors rests its listener instead of spinning on accept(2).

A connection the core cannot accept (EMFILE) stays in the kernel's backlog, so a
level-triggered reader would be called again at once, forever: one agent filling the
core's descriptors then cost a whole core of CPU and a log line per try. The listener
now rests ``ACCEPT_RETRY`` seconds (connlimit.rest_listener) and serves again once
descriptors are free.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers import CoreProcess, assert_ok, wait_for
from hyperhive.client import Client
from hyperhive.core.connlimit import ACCEPT_RETRY


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _egress_answers(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
        return s.recv(64)


@pytest.mark.parametrize("listener", ["agent.sock", "egress.sock"])
def test_a_core_out_of_descriptors_rests_and_serves_again(core: CoreProcess, listener: str) -> None:
    assert_ok(core.agent_call("alice", "whoami"))
    operator = core.host()  # connected before the descriptors run out
    assert core.proc is not None
    pid = core.proc.pid
    open_now = len(os.listdir(f"/proc/{pid}/fd"))
    # Room for a few more descriptors only: the connections below use them up.
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={open_now + 4}:"], check=True)
    held: list[socket.socket] = []
    try:
        for _ in range(12):  # more than fit; the rest wait in the listener's backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(core.agent_sock("bob").with_name(listener)))
            except BlockingIOError:
                pass  # the backlog is full: this one waits in the kernel
            held.append(s)
        wait_for(lambda: "accept failed" in core.log_tail(200), timeout=10)
        cpu0, t0 = _cpu_seconds(pid), time.monotonic()
        time.sleep(2.0)
        spent = _cpu_seconds(pid) - cpu0
        elapsed = time.monotonic() - t0
        # Spinning on the queued connection took the whole of one CPU.
        assert spent < 0.25 * elapsed, f"the core spent {spent:.2f} s of CPU in {elapsed:.1f} s"
        tries = core.log_tail(400).count("accept failed")
        assert tries <= elapsed / ACCEPT_RETRY + 4, f"{tries} failed accepts logged"
        # A connection made before is still served meanwhile.
        assert assert_ok(operator.call("agent_status"))["agent_statuses"]
    finally:
        for s in held:
            s.close()
    # Descriptors free again: the rested listener accepts within a retry or two.
    if listener == "agent.sock":
        with Client(core.agent_sock("bob"), timeout=10) as bob:
            assert assert_ok(bob.call("whoami"))["name"] == "bob"
    else:  # refused by policy, but answered: the listener reads again
        assert _egress_answers(str(core.agent_sock("bob").with_name(listener))).startswith(
            b"HTTP/1."
        )

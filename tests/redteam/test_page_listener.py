"""A compromised harness against its agent's page: web.sock's listener.

hive-priv binds web.sock once a cage start; init handed the listener itself to each
harness, and a harness that shut it down (a unix listener shut down stays dead, listening
or not) left the agent's page refused until the cage restarted (red team round 27's
Known limit). Now init keeps the listener, accepts on it, and hands the harness each
connection on a page pair of its own (SCM_RIGHTS): what a harness does to what it holds
ends with it. The first case failed before (the page refused after the restart).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hive_fixture import HiveProcess, proc_cmdline, proc_uid, running_hive, wait_until

from .conftest import harness_or_none, held_sockets, page_answers

REF = "session 25: web.sock's listener handed to each harness (red team round 27, Known limits)"
NAME = "pglisten"


@pytest.fixture(scope="module")
def h() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess({NAME: {"runtime": "command", "command": ["true"], "peers": []}}))




@pytest.mark.attack("harness.fork-inheritance", ref=REF)
def test_what_a_dead_harness_did_to_its_page_sockets_ends_with_it(h: HiveProcess) -> None:
    """The harness shuts down every unix socket it holds that listens (web.sock's listener,
    before) and its page pair (now), then dies. The next harness serves the page."""
    assert page_answers(h, NAME).startswith("HTTP/1."), "the control"
    old = h.harness_pid(NAME)
    socks = [s for _, s in held_sockets(old) if s.family == socket.AF_UNIX or s.close()]
    listening = [s for s in socks if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)]
    for s in socks:
        if s in listening or s.type == socket.SOCK_SEQPACKET:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        s.close()
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: (p := harness_or_none(h, NAME)) and p != old, 30, "init to start a new harness")
    answer = wait_until(lambda: (a := page_answers(h, NAME, 2.0)).startswith("HTTP/1.") and a, 10,
                        "the page from the next harness")
    print(f"listeners the harness held: {len(listening)}; after its restart: {answer}")
    assert listening == [], "the harness holds no listener"


@pytest.mark.attack("budget.exhaustion", ref=REF + "; connections init can't hand over")
def test_a_harness_that_takes_no_page_connection_holds_init_up_in_nothing(h: HiveProcess) -> None:
    """The harness stops taking page connections (SIGSTOP: it reads nothing). 300
    connections to web.sock: init hands over what the pair holds and closes the rest,
    never blocking (it waits in its poll meanwhile); once the harness goes on, the page
    answers."""
    pid = h.harness_pid(NAME)
    os.kill(pid, signal.SIGSTOP)
    try:
        conns = []
        for _ in range(300):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(str(h.run_dir / "ui" / NAME / "web.sock"))
            except (BlockingIOError, OSError):
                pass
            conns.append(s)
        time.sleep(1.0)
        inits = [p for p in h.cage_procs(NAME) if proc_uid(p) == 0 and proc_cmdline(p)[:1] != ["bwrap"]]
        assert len(inits) == 1, inits
        wchan = Path(f"/proc/{inits[0]}/wchan").read_text()
        assert "poll" in wchan, wchan  # waiting in its poll, not in a send to the harness
    finally:
        os.kill(pid, signal.SIGCONT)
    for s in conns:
        s.close()
    answer = wait_until(lambda: (a := page_answers(h, NAME, 2.0)).startswith("HTTP/1.") and a, 15,
                        "the page once the harness goes on")
    assert h.harness_pid(NAME) == pid
    print(f"after 300 connections with the harness stopped: {answer}")

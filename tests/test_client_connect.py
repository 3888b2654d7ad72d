"""``Client``'s connect waits for room in a full listen backlog (up to its timeout).

A socket with a timeout is non-blocking underneath, and a unix connect to a full backlog
then fails at once with EAGAIN: agent.sock's backlog is 8, so an agent's parallel
``hive agent`` or MCP calls to a core slow to accept (a loaded machine) failed with a
BlockingIOError (the red team's slow-loris probe, which connects as ``Client`` did, with
it too). Real unix sockets in a directory of the test's."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperhive.client import Client, HiveUnavailable


@pytest.fixture
def full(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    """A listener nobody accepts on, its backlog filled by connections that say nothing."""
    path = tmp_path / "busy.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    fillers: list[socket.socket] = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError:  # full: the next connect would have to wait
                s.close()
                break
            fillers.append(s)
            assert len(fillers) < 100, "the backlog never filled"
        yield path, listener
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_connect_waits_for_room_in_the_backlog(full: tuple[Path, socket.socket]) -> None:
    """The listener accepts half a second later: the client gets in and is served."""
    path, listener = full
    served: list[str] = []

    def serve() -> None:
        time.sleep(0.5)
        listener.settimeout(10)
        while not served:
            conn, _ = listener.accept()
            with conn, conn.makefile("rb") as f:
                conn.settimeout(0.3)  # a filler says nothing
                try:
                    line = f.readline()
                except TimeoutError:
                    continue
                if line:
                    served.append(json.loads(line)["cmd"])
                    conn.sendall(b'{"version": 1, "ok": true, "name": "x"}\n')

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    t0 = time.monotonic()
    with Client(path, timeout=10) as c:
        waited = time.monotonic() - t0
        assert c.call("whoami") == {"version": 1, "ok": True, "name": "x"}
    thread.join(10)
    assert served == ["whoami"]
    assert waited >= 0.4, waited  # it waited for the accept, not failed before it


def test_a_backlog_full_for_the_whole_timeout_is_one_line(full: tuple[Path, socket.socket]) -> None:
    """Nobody accepts: after its timeout, HiveUnavailable with one line to print (the
    CLI's ``request`` prints it and exits 1), not a BlockingIOError at once."""
    path, _ = full
    t0 = time.monotonic()
    with pytest.raises(HiveUnavailable) as e:
        Client(path, timeout=0.5)
    assert time.monotonic() - t0 >= 0.4
    assert str(e.value) == f"the hive is busy: {path} took no connection within 0.5 s"

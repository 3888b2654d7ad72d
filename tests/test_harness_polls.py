"""The harness's idle long-polls (issue 17): seldom, out of step across harnesses, and
never outliving the turn connection they belong to. In process, over a real unix socket
this test listens on (the core's side of it played here)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

from hyperhive.cage import harness
from hyperhive.wire.harness import Control, TurnNext


def test_long_poll_waits_are_spread_over_the_second_half_of_the_period() -> None:
    waits = [harness.long_poll_wait() for _ in range(2000)]
    assert all(harness.LONG_POLL / 2 <= w <= harness.LONG_POLL for w in waits)
    # Out of step: a herd that polled together is spread over half the period.
    assert max(waits) - min(waits) > harness.LONG_POLL * 0.45
    assert len(set(waits)) > 1000
    # Within what the core accepts of a long-poll.
    for w in (min(waits), max(waits)):
        Control.model_validate({"cmd": "control", "wait": w})
        TurnNext.model_validate({"cmd": "turn_next", "wait": w})


def test_a_control_poll_ends_with_its_turn_connection(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    listener.settimeout(10)
    control = harness.ControlPoll(path, threading.Event())
    control.start()
    conn, _ = listener.accept()  # the poll's connection: its request comes, no answer
    conn.settimeout(10)
    request = json.loads(conn.recv(65536))
    assert request["cmd"] == "control"
    assert harness.LONG_POLL / 2 <= request["wait"] <= harness.LONG_POLL
    started = time.monotonic()
    control.end()
    assert conn.recv(65536) == b"", "the poll's connection was not ended"
    assert time.monotonic() - started < 2
    listener.settimeout(1.0)
    try:
        again, _ = listener.accept()
    except TimeoutError:
        pass
    else:
        again.close()
        raise AssertionError("the ended control poll connected again")
    conn.close()
    listener.close()


def test_a_refused_request_does_not_end_the_harness(tmp_path: Path) -> None:
    """A core that refuses a harness request (a full disk refused a write, say) gets the
    harness back on a new connection; it used to exit, and the agent showed as failed."""
    path = str(tmp_path / "agent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    listener.settimeout(10)
    threading.Thread(target=harness.serve_forever, args=(path, None), daemon=True).start()

    def reply(conn: socket.socket, **fields: object) -> None:
        conn.sendall(json.dumps({"version": 1, **fields}).encode() + b"\n")

    first, _ = listener.accept()
    first.settimeout(10)
    assert json.loads(first.makefile("rb").readline())["cmd"] == "harness_config"
    reply(first, ok=False, error="the disk is full: nothing was stored; try again later")
    again, _ = listener.accept()  # a new connection, after a short pause
    again.settimeout(10)
    reader = again.makefile("rb")

    def next_request() -> dict:
        line = reader.readline()
        assert line, "the harness closed its connection"
        return json.loads(line)

    assert next_request()["cmd"] == "harness_config"
    reply(again, ok=True, name="a", spec={"runtime": "command", "command": ["true"]}, env={})
    assert next_request()["cmd"] == "harness_state"
    reply(again, ok=True)
    assert next_request()["cmd"] == "turn_next"  # serving turns again
    first.close()
    again.close()
    listener.close()

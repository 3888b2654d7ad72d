"""Session 31: the runtime's stdio, as the harness holds them (``cage/harness.py``
``Turn.run``).

Session 30 took pipes out of ``hive exec`` (``test_red_exec30.py``); its note left the same
class open for the harness: the runtime's stdin, stdout and stderr were pipes, and a pipe
is one object with one lock (``pipe->mutex``) that both ends take. The runtime (here a
command runtime: the agent's code, as a tool of Claude Code's would be) keeps its
stdout and ``splice``s from a socket nobody writes to into it: the splice holds the pipe's
lock while it waits for data. To make the harness read meanwhile, it lets one byte at a
time through (each wakes the harness with data in the pipe, and the splice, called again
at once, takes the lock back first); the harness's read then sleeps in ``pipe_read``,
uninterruptibly (``D``). The stdin case: the runtime reads a little of a large message,
making room, and splices the rest into a socket nobody reads, which holds the lock while
it waits for room; the harness's next write sleeps the same way.

A harness asleep in a pipe runs nothing of its turn loop: no time-out, no interrupt, no
transcript, and the agent shows "busy" until the operator stops the cage.

Broke before the change (2 CPUs, kernel 6.18): stdout, the turn (turn_timeout 3 s) had not
ended at 20 s, the harness's thread in ``pipe_read``.

Now the three are unix socket pairs (``unixsock.stdio_pair``), as ``hive exec``'s are: a
splice needs a pipe on one side, so the runtime's is refused (EINVAL) and one through a
pipe of its own holds only its own lock. The turn ends at its time-out, with every byte let
through in its transcript.

Session 32: the runtime's stdio are pipes again, but its own: their other ends are held by
its relay (``cage/stdio_relay.py``), a process of the runtime's uid, which passes them on
to the harness's sockets. The splice now goes through and holds the relay, never the
harness: the turn still ends at its time-out, and no harness thread is in a pipe.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hive_fixture import HiveProcess, running_hive

from .conftest import threads_in

REF = "session 31: the runtime's stdio pipes"
TIMEOUT = 3  # the agents' turn_timeout, seconds
PIPE_FRAMES = ("pipe_read", "pipe_write", "pipe_release", "anon_pipe_")


def _py(script: str) -> list[str]:
    return ["python3", "-c", textwrap.dedent(script)]


# stdout: splice from an idle socket into fd 1, letting one "y" line through at a time;
# if the kernel refuses (no pipe on either side), the same through a pipe of its own.
STDOUT = _py("""
    import os, socket, sys, threading, time
    sys.stdin.read()
    print("start", flush=True)
    a, b = socket.socketpair()
    how = []
    def hold(src, dst):
        while True:
            try:
                if os.splice(src, dst, 65536) == 0:
                    return
            except OSError as e:
                how.append(e.errno)
                return
    t = threading.Thread(target=hold, args=(a.fileno(), 1), daemon=True)
    t.start()
    t.join(0.2)
    if how:  # refused: through a pipe of our own
        print(f"refused {how[0]}", file=sys.stderr, flush=True)
        r, w = os.pipe()
        threading.Thread(target=hold, args=(a.fileno(), w), daemon=True).start()
        threading.Thread(target=hold, args=(r, 1), daemon=True).start()
    for _ in range(40):
        b.send(b"y\\n")
        time.sleep(0.02)
    time.sleep(600)  # until the turn's time-out
""")

# stdin: splice from fd 0 into a socket nobody reads but a page at a time, so each splice
# frees one page of the pipe (waking the harness to write into it) and the next one, called
# at once, takes the lock back first; then the reading stops.
STDIN = _py("""
    import os, socket, sys, threading, time
    full, peer = socket.socketpair()
    full.setblocking(False)
    try:
        while True:
            full.send(b"x" * 4096)
    except BlockingIOError:
        pass
    full.setblocking(True)
    print("start", flush=True)
    how = []
    def hold():
        while True:
            try:
                if os.splice(0, full.fileno(), 4096) == 0:
                    return
            except OSError as e:
                how.append(e.errno)
                return
    t = threading.Thread(target=hold, daemon=True)
    t.start()
    t.join(0.2)
    if how:
        print(f"refused {how[0]}", file=sys.stderr, flush=True)
    for _ in range(40):
        peer.recv(4096)
        time.sleep(0.02)
    time.sleep(600)
""")

AGENTS: dict[str, dict[str, Any]] = {
    "rt31out": {"runtime": "command", "command": STDOUT, "turn_timeout": TIMEOUT},
    "rt31in": {"runtime": "command", "command": STDIN, "turn_timeout": TIMEOUT},
}


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(AGENTS))


def _ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("ok") is True, reply
    return reply


def _turn(hive: HiveProcess, name: str, body: str, within: float) -> list[dict[str, Any]]:
    """Sends ``body`` to ``name``; the entries of its turn once ended (fails, naming the
    harness's threads in a pipe, if it has not within ``within`` seconds)."""
    before = _ok(hive.host_call("transcript", name=name, limit=1))["entries"]
    after = before[-1]["id"] if before else 0
    msg = _ok(hive.host_call("send", to=name, body=body))["id"]
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        entries = [e for e in _ok(hive.host_call("transcript", name=name, after=after, limit=5000))["entries"]
                   if e["turn"] == msg]
        if any(e["kind"] == "exit" for e in entries):
            return entries
        time.sleep(0.1)
    stuck = threads_in(hive.harness_pid(name), *PIPE_FRAMES)
    pytest.fail(f"{name}'s turn had not ended after {within:.0f} s; harness threads in a pipe: {stuck}")


@pytest.mark.attack("harness.turn", ref=REF + ": a splice into the runtime's stdout holds the pipe's lock")
def test_a_splice_into_the_runtimes_stdout_never_holds_the_harness(hive: HiveProcess) -> None:
    entries = _turn(hive, "rt31out", "go", TIMEOUT + 17)
    end = entries[-1]["data"]
    assert end["timed_out"] is True, end
    assert end["duration_ms"] < (TIMEOUT + 4) * 1000, end  # the time-out, then SIGTERM's end
    texts = [(e["kind"], e["data"]) for e in entries]
    # The splice took the runtime's own pipe (no refusal): it held the relay, not us. What
    # the relay got through, between the splice's turns, is in the transcript.
    assert ("stderr", "refused 22") not in texts, texts
    outs = [d for k, d in texts if k == "stdout"]
    assert outs[:1] == ["start"] and set(outs[1:]) <= {"y"}, texts
    assert not threads_in(hive.harness_pid("rt31out"), *PIPE_FRAMES)
    # The harness is whole: the next turn runs (and times out) as any other.
    assert _turn(hive, "rt31out", "again", TIMEOUT + 17)[-1]["data"]["timed_out"] is True


@pytest.mark.attack("harness.turn", ref=REF + ": a splice from the runtime's stdin holds the pipe's lock")
def test_a_splice_from_the_runtimes_stdin_never_holds_the_harness(hive: HiveProcess) -> None:
    entries = _turn(hive, "rt31in", "z" * 200_000, TIMEOUT + 17)
    end = entries[-1]["data"]
    assert end["timed_out"] is True, end
    assert end["duration_ms"] < (TIMEOUT + 4) * 1000, end
    texts = [(e["kind"], e["data"]) for e in entries]
    assert ("stderr", "refused 22") not in texts, texts  # the relay's pipe, held
    assert not threads_in(hive.harness_pid("rt31in"), *PIPE_FRAMES)

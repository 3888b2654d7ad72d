"""agent.sock's connection loop driven by protocol callbacks (core/agent_conn.py): the
edges of serve_lines it must keep, on raw sockets against a live hive-core."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, cast

import pytest

from helpers import CoreProcess, assert_ok, send_until_full_all, strict_loads, wait_for
from hyperhive.core.agent_conn import AgentConnection
from hyperhive.wire.framing import MAX_LINE


def _connect(core: CoreProcess, name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(str(core.agent_sock(name)))
    return s


def _lines(s: socket.socket, n: int) -> list[dict[str, Any]]:
    """``n`` reply lines (fewer if the core closes first)."""
    f = s.makefile("rb")
    out = []
    for _ in range(n):
        raw = f.readline()
        if not raw:
            break
        out.append(strict_loads(raw))
    return out


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def test_one_write_of_mixed_requests_is_answered_in_order(core: CoreProcess) -> None:
    """Pipelined sends, a recv, bad JSON and a blank line in one write: one reply each
    (none for the blank), in order; the sends are stored in order."""
    with _connect(core, "alice") as s:
        s.sendall(
            _line({"cmd": "send", "to": "bob", "body": "one"})
            + _line({"cmd": "send", "to": "bob", "body": "two"})
            + b"{not json\n"
            + _line({"cmd": "send", "to": "nobody", "body": "x"})
            + b"   \n"
            + _line({"cmd": "recv", "wait": 0})
            + _line({"cmd": "send", "to": "bob", "body": "three"})
            + _line({"cmd": "whoami"})
        )
        replies = _lines(s, 7)
    assert [r["ok"] for r in replies] == [True, True, False, False, True, True, True]
    assert replies[0]["id"] < replies[1]["id"] < replies[5]["id"]
    assert replies[4]["messages"] == []
    assert replies[6]["name"] == "alice"
    with core.agent("bob") as bob:
        got = assert_ok(bob.call("recv", wait=5))["messages"]
    assert [m["body"] for m in got] == ["one", "two", "three"]


def test_an_oversized_line_after_a_send_answers_the_send_then_closes(core: CoreProcess) -> None:
    """The send before it in the same write is stored and answered; then the one error
    line, and the connection ends (no resync)."""
    with _connect(core, "alice") as s:
        try:
            s.sendall(
                _line({"cmd": "send", "to": "bob", "body": "before"})
                + b'{"cmd":"send","to":"bob","body":"'
                + b"x" * (MAX_LINE + 10)
                + b'"}\n'
            )
        except (BrokenPipeError, ConnectionResetError):
            pass  # the core may hang up before it all went: its replies are readable still
        replies = _lines(s, 3)
    assert replies[0]["ok"] is True
    assert replies[1] == {
        "version": 1,
        "ok": False,
        "error": f"line exceeds {MAX_LINE} bytes; closing connection",
    }
    assert len(replies) == 2  # closed after it
    with core.agent("bob") as bob:
        got = assert_ok(bob.call("recv", wait=5))["messages"]
    assert [m["body"] for m in got] == ["before"]


def test_a_last_line_without_newline_is_answered_after_a_half_close(core: CoreProcess) -> None:
    with _connect(core, "alice") as s:
        s.sendall(b'{"cmd":"whoami"}\n{"cmd":"peers"}')
        s.shutdown(socket.SHUT_WR)  # nothing more is coming; the replies still go out
        replies = _lines(s, 3)
    assert [r.get("name", r.get("peers")) for r in replies] == ["alice", ["bob"]]


def _connect_when_accepted(core: CoreProcess, name: str) -> socket.socket:
    for _retry in range(100):  # the listener's backlog is small: one at a time
        try:
            return _connect(core, name)
        except BlockingIOError:
            time.sleep(0.02)
    raise AssertionError(f"{name}'s agent.sock never took the connection")


def _recvs_waiting(core: CoreProcess, n: int, half_close: bool = False) -> list[socket.socket]:
    """``n`` of bob's connections, each a recv waiting 60 s (and its writing half shut,
    with ``half_close``)."""
    conns = []
    for _ in range(n):
        conns.append(_connect_when_accepted(core, "bob"))
        conns[-1].sendall(_line({"cmd": "recv", "wait": 60}))
        if half_close:
            conns[-1].shutdown(socket.SHUT_WR)
    assert len(conns) == n
    return conns


def _next_message_is_the_next_recvs(core: CoreProcess) -> None:
    """A message sent now comes at once to a new recv: no connection gone took it."""
    assert_ok(core.agent_call("alice", "send", to="bob", body="after"))
    t0 = time.monotonic()
    with core.agent("bob") as bob:
        got = assert_ok(bob.call("recv", wait=10))["messages"]
    assert [m["body"] for m in got] == ["after"]
    assert time.monotonic() - t0 < 5


def test_a_recv_waiting_when_its_peer_hangs_up_takes_nothing(core: CoreProcess) -> None:
    """A hang-up ends a recv's wait at once: the next message is not held for the dead
    connection (and handed back only when the wait would have ended), it is for the next
    recv now."""
    (s,) = _recvs_waiting(core, 1)
    time.sleep(0.3)  # the recv waits in the core
    s.close()
    time.sleep(0.3)  # the core has seen the hang-up
    _next_message_is_the_next_recvs(core)


def test_closed_connections_waiting_in_recv_are_dropped_at_once(core: CoreProcess) -> None:
    """A connection closed while its recv waits is gone when the peer is: it holds no
    descriptor, no wake-up and no claim on the agent's connection cap (32 per uid) until
    its wait would have ended. Kept, a runtime reconnecting that often within a recv's
    wait was refused, and each woke for every message (bench/warm.py)."""
    before = _open_sockets(core)
    for _ in range(2):  # twice the cap, closed as they go: every one must be accepted
        conns = _recvs_waiting(core, 32)
        time.sleep(0.5)  # every recv waits in the core
        for s in conns:
            s.close()
        time.sleep(0.5)  # the core has seen the hang-ups
    assert _open_sockets(core) <= before
    _next_message_is_the_next_recvs(core)


def _open_sockets(core: CoreProcess) -> int:
    """The core's open sockets (its other descriptors come and go with SQLite's files)."""
    assert core.proc is not None
    count = 0
    for fd in Path(f"/proc/{core.proc.pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except FileNotFoundError:  # closed between the listing and the read
            pass
    return count


def test_a_recv_whose_peer_left_during_its_ack_does_not_wait(core: CoreProcess) -> None:
    """A recv with an ack, the peer gone before or while the ack commits: the ack stands,
    and the recv does not wait for the inbox with nobody to reply to (on main its
    connection stayed open until the wait's end, or until the next message woke it, took
    the message and wrote it to nobody)."""
    assert_ok(core.agent_call("alice", "whoami"))
    before = _open_sockets(core)

    for i in range(3):
        assert_ok(core.agent_call("alice", "send", to="bob", body=f"m{i}"))
        with _connect(core, "bob") as s:
            s.sendall(_line({"cmd": "recv", "wait": 5}))
            (got,) = _lines(s, 1)
            ids = [m["id"] for m in assert_ok(got)["messages"]]
            assert len(ids) == 1
            s.sendall(_line({"cmd": "recv", "wait": 60, "ack": ids}))
        # closed at once: the ack may still be committing
        time.sleep(0.2)
    assert _open_sockets(core) <= before
    with core.agent("bob") as bob:  # every ack stood: nothing comes back
        assert assert_ok(bob.call("recv", wait=0))["messages"] == []


def test_a_recv_waiting_after_a_half_close_still_gets_its_reply(core: CoreProcess) -> None:
    """A peer that only shut its writing half is still there: its recv waits on and its
    message comes (only a socket closed whole ends the wait)."""
    with _connect(core, "bob") as s:
        s.sendall(_line({"cmd": "recv", "wait": 10}))
        s.shutdown(socket.SHUT_WR)
        time.sleep(0.3)  # the core has seen the end of input
        assert_ok(core.agent_call("alice", "send", to="bob", body="still here"))
        replies = _lines(s, 2)
    assert [m["body"] for m in assert_ok(replies[0])["messages"]] == ["still here"]
    assert len(replies) == 1  # and then closed, at the end of input


def test_a_recv_waiting_after_a_half_close_ends_when_the_socket_closes_whole(core: CoreProcess) -> None:
    """A peer that shut its writing half, then closed its socket whole, while its recv
    waits: the close ends the wait as a plain close does (the half-close alone keeps the
    reply, above). Twice the cap (32 per uid) of such connections, each gone with its
    descriptor and its claim at once, not when its wait of 60 s would have ended (the end
    of input came first, so the close itself was never read: on main every one stayed,
    and the second round was refused at the cap); the next message is the next recv's."""
    before = _open_sockets(core)
    for _ in range(2):
        conns = _recvs_waiting(core, 32, half_close=True)
        time.sleep(0.5)  # every recv waits in the core, its input over
        for s in conns:
            s.close()
        wait_for(lambda: _open_sockets(core) <= before, timeout=10)
    _next_message_is_the_next_recvs(core)


# What a peer may send after its recv line before it goes (red team round 18): a byte, a
# partial line, a blank line, a whole request, many, more than the core buffers (its
# reading pauses past twice the line limit, so it no longer reads the socket at all).
TAILS: dict[str, bytes] = {
    "space": b" ",
    "partial line": b'{"cmd":"whoami"',
    "blank line": b"\n",
    "a request": _line({"cmd": "whoami"}),
    "64 requests": _line({"cmd": "whoami"}) * 64,
    "past the buffer": b"x" * (3 * MAX_LINE),
}
GOES = ("close", "half, then close", "shut both, kept open", "linger 0, a reply unread")


def _recvs_then_go(core: CoreProcess, pairs: list[tuple[bytes, str]], kept: list[socket.socket]) -> None:
    """One of bob's connections for each (``tail``, ``how``): a recv waiting 60 s, ``tail``
    after its line, then the peer goes ``how``. All are set up first and go together, so
    one pause (not one each) lets every recv reach the core before its peer goes."""
    conns = []
    for _tail, how in pairs:
        s = _connect_when_accepted(core, "bob")
        head = _line({"cmd": "whoami"}) if how.startswith("linger") else b""  # its reply unread
        s.sendall(head + _line({"cmd": "recv", "wait": 60}))
        conns.append((s, how))
    for tail in {tail for tail, _ in pairs}:  # each tail on its sockets at once
        send_until_full_all([s for (s, _), (t, _) in zip(conns, pairs, strict=True) if t == tail], tail)
    for s, _ in conns:
        s.settimeout(20)
    time.sleep(0.1)  # the recvs wait in the core (or one goes first: the same must hold)
    for s, how in conns:
        if how == "half, then close":
            s.shutdown(socket.SHUT_WR)
    time.sleep(0.1)  # the core reads the ends of input before the closes
    for s, how in conns:
        if how == "shut both, kept open":
            s.shutdown(socket.SHUT_RDWR)
            kept.append(s)
            continue
        if how.startswith("linger"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_recv_waiting_with_input_left_ends_when_its_peer_goes(core: CoreProcess) -> None:
    """A recv's peer that sent anything after the recv line (each of TAILS) and then went
    (closed whole, half-closed then closed, shut both halves and kept the socket, closed
    with the core's reply unread): the wait ends then, not when its 60 s would. Two rounds
    of every pair, 48 connections of bob's against a cap of 32: each gone from the core
    (its descriptor, its claim) once its peer is, and the core's loop idle meanwhile (no
    spin on the sockets kept open); the next message is the next recv's. Before the fix
    only the ones with nothing after the recv line (none here) or a reset went: the rest
    waited out their 60 s, and the second round was refused at the cap."""
    assert core.proc is not None
    before = _open_sockets(core)
    kept: list[socket.socket] = []
    try:
        for _ in range(2):  # 24 a round (under the cap): the second round only fits if the first went
            _recvs_then_go(core, [(tail, how) for tail in TAILS.values() for how in GOES], kept)
            wait_for(lambda: _open_sockets(core) <= before, timeout=10)
        cpu0 = _cpu(core.proc.pid)
        time.sleep(2)  # the shut-both peers still hold their sockets
        assert _cpu(core.proc.pid) - cpu0 < 0.3
        _next_message_is_the_next_recvs(core)
    finally:
        for s in kept:
            s.close()


def test_the_lines_a_closed_recv_left_are_taken_and_its_ack_stands(core: CoreProcess) -> None:
    """bob's recv waits with requests pipelined after it: two sends, a recv acking the
    message bob holds on another connection, and a last send without its newline; then
    bob closes. The wait ends at once and reads nothing; the lines left are taken as at
    any end of input, in order, with no one to answer: the three sends stored in order
    (the last line too, as on any connection that ends without a newline), the ack stands
    (the held message is not handed out again when its connection closes), and the
    next message is the next recv's. Before the fix all of it waited in the core for the
    recv's 60 s."""
    held = assert_ok(core.agent_call("alice", "send", to="bob", body="held"))["id"]
    with _connect(core, "bob") as first:
        first.sendall(_line({"cmd": "recv", "wait": 5}))
        (got,) = _lines(first, 1)
        assert [m["id"] for m in assert_ok(got)["messages"]] == [held]  # in flight on `first`
        before = _open_sockets(core)
        s = _connect(core, "bob")
        s.sendall(
            _line({"cmd": "recv", "wait": 60})
            + _line({"cmd": "send", "to": "alice", "body": "left-1"})
            + _line({"cmd": "send", "to": "alice", "body": "left-2"})
            + _line({"cmd": "recv", "wait": 60, "ack": [held]})
            + b'{"cmd":"send","to":"alice","body":"left-3"}'
        )
        time.sleep(0.3)  # the recv waits in the core
        s.close()
        wait_for(lambda: _open_sockets(core) <= before, timeout=10)
    with core.agent("alice") as alice:
        got = assert_ok(alice.call("recv", wait=5))["messages"]
    assert [m["body"] for m in got] == ["left-1", "left-2", "left-3"]
    _next_message_is_the_next_recvs(core)  # not "held": acked


def test_thousands_of_answered_at_once_requests_in_one_write(core: CoreProcess) -> None:
    """Requests answered without waiting (recv of an empty inbox, wait 0) are taken in a
    loop, not by the loop calling itself: 5,000 in one write are all answered."""
    n = 5000
    with _connect(core, "carol") as s:
        s.sendall(_line({"cmd": "recv", "wait": 0}) * n)
        replies = _lines(s, n)
    assert len(replies) == n
    assert all(r == {"version": 1, "ok": True, "messages": []} for r in replies)
    assert assert_ok(core.agent_call("carol", "whoami"))["name"] == "carol"


def test_a_refused_recv_ack_reads_nothing_and_the_connection_goes_on(core: CoreProcess) -> None:
    sent = assert_ok(core.agent_call("alice", "send", to="bob", body="mine"))["id"]
    with _connect(core, "carol") as s:  # not carol's message: refused, nothing read
        s.sendall(_line({"cmd": "recv", "wait": 0, "ack": [sent]}) + _line({"cmd": "whoami"}))
        refused, who = _lines(s, 2)
    assert refused["ok"] is False and str(sent) in refused["error"]
    assert who["name"] == "carol"
    with core.agent("bob") as bob:
        got = assert_ok(bob.call("recv", wait=5))["messages"]
    assert [m["id"] for m in got] == [sent]


# -- the line buffer itself (core/lineconn.py), on a real socket pair -------------------


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    """Both loops: the core runs on uvloop, whose transports are not asyncio's."""
    return str(request.param)


def _on_socketpair(kind: str, limit: int, peer_writes: bytes, close: bool, then: Any) -> Any:
    """Run ``then(conn)`` on a LineConnection over one end of a socket pair, the peer
    having written ``peer_writes`` (and half-closed when ``close``)."""
    import asyncio

    import uvloop

    from hyperhive.core.lineconn import LineConnection

    async def main() -> Any:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_unix_connection(lambda: LineConnection(limit), sock=ours)
        theirs.setblocking(False)
        sent = 0
        while sent < len(peer_writes):  # as much as the core takes (it may stop reading)
            try:
                sent += theirs.send(peer_writes[sent : sent + 65536])
            except BlockingIOError:
                await asyncio.sleep(0.05)
                if not conn._paused:
                    continue
                break
        if close:
            theirs.shutdown(socket.SHUT_WR)
        await asyncio.sleep(0.1)
        try:
            return await then(conn), sent
        finally:
            conn.close()
            theirs.close()

    factory = uvloop.new_event_loop if kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def test_the_line_buffer_splits_lines_and_returns_the_last_one_at_the_end(loop_kind: str) -> None:
    async def read_all(conn: Any) -> list[bytes]:
        out = [await conn.readline() for _ in range(4)]
        return out

    lines, _ = _on_socketpair(loop_kind, 100, b'{"a":1}\n\n{"b":2}', True, read_all)
    assert lines == [b'{"a":1}\n', b"\n", b'{"b":2}', b""]


def test_a_line_over_the_limit_is_refused_and_dropped(loop_kind: str) -> None:
    async def read_one(conn: Any) -> str:
        try:
            await conn.readline()
        except ValueError as e:
            return str(e)
        return "read"

    err, _ = _on_socketpair(loop_kind, 100, b"x" * 101 + b"\n", False, read_one)
    assert err == "a line exceeds 100 bytes"
    ok_line, _ = _on_socketpair(loop_kind, 100, b"x" * 100 + b"\n", False, lambda c: c.readline())
    assert ok_line == b"x" * 100 + b"\n"  # exactly the limit before the newline: taken


def test_the_line_buffer_stops_reading_past_twice_the_limit(loop_kind: str) -> None:
    """A peer writing whole lines faster than they are taken: what the core holds stays
    about twice the limit (one read's chunk over it at most), the rest waits in the
    kernel; taking lines lets it read again."""

    async def held(conn: Any) -> tuple[int, bool, bytes]:
        size, paused = len(conn._buffer), conn._paused
        first = await conn.readline()
        return size, paused, first

    limit = 1000
    flood = (b"y" * 99 + b"\n") * 100_000  # 10 MB of 100-byte lines
    (size, paused, first), sent = _on_socketpair(loop_kind, limit, flood, False, held)
    assert paused is True
    assert size <= 2 * limit + 256 * 1024  # one read's chunk past the bound at most
    assert sent < len(flood)  # the rest was never taken from the peer
    assert first == b"y" * 99 + b"\n"


def test_one_connections_buffered_lines_are_taken_one_a_loop_turn(tmp_path: Path) -> None:
    """2,000 lines answered at once (bad JSON: one error line each, no task, no commit) in
    one write: a ticker task runs between any two of them, so one connection's buffer
    can't hold the core's loop (red team cheap-verb-flood; serve_lines' rule, see
    tests/test_loop_fairness.py). In process, on a real unix socket."""
    n = 2000

    async def go() -> list[int]:
        ticks = 0
        seen: list[int] = []

        class Counted(AgentConnection):
            def write(self, data: bytes) -> None:  # type: ignore[override]
                seen.append(ticks)
                super().write(data)

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        loop = asyncio.get_running_loop()
        path = str(tmp_path / "s.sock")
        server = await loop.create_unix_server(
            lambda: Counted(MAX_LINE, cast(Any, None), lambda n: 0.0, frozenset()), path
        )
        tick = asyncio.ensure_future(ticker())
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"{not json\n" * n)
            await writer.drain()
            replies = [await reader.readline() for _ in range(n)]
            assert all(b'"ok":false' in r for r in replies)
            writer.close()
        finally:
            tick.cancel()
            server.close()
        return seen

    seen = asyncio.run(go())
    assert len(seen) == n
    same_turn = sum(1 for x, y in itertools.pairwise(seen) if x == y)
    assert same_turn == 0, f"{same_turn} of {n} lines were taken in the turn of the one before"

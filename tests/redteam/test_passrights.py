"""Session 27: the hive's unix sockets that carry no descriptors refuse them
(``unixsock.refuse_descriptors``: ``SO_PASSRIGHTS`` 0, Linux 6.16 or later).

A descriptor sent with SCM_RIGHTS waits in the receiver's queue, in flight and charged to
its sender's uid, until the receiver reads its byte; a socket queued that way keeps alive
whatever is queued on it in turn. A compromised harness holds its page pair's end with up
to six of root's descriptors on it (the page connections init hands over): sent into a
connection the core leaves unread (agent.sock past its paused buffer), that end would
outlive the harness and keep root's six in flight at each restart (round 29's "not
tried"). Now agent.sock, host.sock, core.sock, web.sock and init's own ends of the page
pair and of the harness's log refuse them: the sender's ``sendmsg`` fails with EPERM and
sends nothing. priv.sock (``exec``'s stdio) and egress-handover.sock (a handed TCP stream,
one message a connection) take them, as their protocols need; egress.sock (requests sent
straight to the proxy) refuses them from session 28 on.

On a kernel before 6.16 the option does not exist, the sockets take descriptors as before
(a plain read drops them), and these cases fail: they say which the hive runs on."""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from hive_fixture import HiveProcess, running_hive
from hyperhive.cage.layout import HANDOVER
from hyperhive.core import egress
from hyperhive.unixsock import bind_listener

from .conftest import PASSRIGHTS, cage_run

AGENT = "r27pass"

pytestmark = pytest.mark.attack("budget.exhaustion", ref="session 27: descriptors parked in the hive's sockets")


@pytest.fixture(scope="module")
def h() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess({AGENT: {"runtime": "command", "command": ["true"]}}))


def test_this_kernel_lets_a_socket_refuse_descriptors() -> None:
    assert PASSRIGHTS, f"{os.uname().release}: no SO_PASSRIGHTS (Linux 6.16 or later)"


def test_a_listener_refuses_descriptors_unless_told_and_its_connections_inherit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """bind_listener's connections refuse descriptors (EPERM, nothing sent, the
    connection still good), unless ``descriptors=True``."""
    seen = {}
    for takes in (False, True):
        path = tmp_path / f"l{takes}.sock"
        with bind_listener(path, descriptors=takes) as listener, socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))
            conn, _ = listener.accept()
            with conn:
                try:
                    socket.send_fds(c, [b"fd"], [c.fileno()])
                    seen[takes] = "sent"
                except PermissionError:
                    seen[takes] = "EPERM"
                c.sendall(b"line\n")
                conn.settimeout(5)
                data, fds = b"", 0
                while not data.endswith(b"\n"):  # a read stops where descriptors came
                    chunk, got, _, _ = socket.recv_fds(conn, 100, 1)
                    data, fds = data + chunk, fds + len(got)
                    for fd in got:
                        os.close(fd)
                seen[f"{takes} read"] = (data, fds)
    assert seen == {
        False: "EPERM",
        "False read": (b"line\n", 0),
        True: "sent",
        "True read": (b"fdline\n", 1),
    }, seen


CAGED = '''
import os, socket
pipe_r, pipe_w = os.pipe()
out = {}
c = Conn()
try:
    socket.send_fds(c.s, [b'{"cmd": "whoami"}\\n'], [pipe_r])
    out["agent.sock, descriptor"] = "sent"
except OSError as e:
    out["agent.sock, descriptor"] = errname(e)
out["agent.sock, then a plain call"] = c.call({"cmd": "whoami"}).get("ok")
c.close()
for path in ("/run/hive/egress.sock", "/run/hive/egress-handover.sock"):
    e = socket.socket(socket.AF_UNIX)
    e.connect(path)
    tcp = socket.socket()
    try:
        socket.send_fds(e, [b"\\0"], [tcp.fileno()])
        out[path + ", a TCP socket"] = "sent"
    except OSError as err_:
        out[path + ", a TCP socket"] = errname(err_)
    e.close()
result(**out)
'''


def test_from_a_cage_agent_sock_and_egress_sock_refuse_descriptors_the_handover_takes_one(
        h: HiveProcess) -> None:
    got = cage_run(h, AGENT, CAGED)
    print(f"\nfrom the cage: {got}")
    assert got == {
        "agent.sock, descriptor": "EPERM",
        "agent.sock, then a plain call": True,
        "/run/hive/egress.sock, a TCP socket": "EPERM",
        "/run/hive/egress-handover.sock, a TCP socket": "sent",
    }, got


def test_the_hosts_sockets_refuse_descriptors_but_priv_sock(h: HiveProcess) -> None:
    """As root on the host (what a compromised gateway or a local process with the
    socket's group could send): host.sock, core.sock and the cage's web.sock refuse;
    priv.sock takes them (``exec``)."""
    paths = {
        "host.sock": h.host_sock,
        "core.sock": h.run_dir / "core.sock",
        "web.sock": h.run_dir / "ui" / AGENT / "web.sock",
        "priv.sock": h.priv_sock,
    }
    seen = {}
    for what, path in paths.items():
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))
            try:
                socket.send_fds(c, [b"\n"], [c.fileno()])
                seen[what] = "sent"
            except PermissionError:
                seen[what] = "EPERM"
    print(f"\nfrom the host: {seen}")
    assert seen == {"host.sock": "EPERM", "core.sock": "EPERM", "web.sock": "EPERM", "priv.sock": "sent"}, seen


# -- egress: descriptors only on the handover socket, one message a connection ----------


def test_a_direct_egress_request_is_read_plainly_and_a_handover_connection_ends_after_one_message(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    """egress.sock refuses descriptors from its listener on (EPERM, before any byte of the
    request arrives: no window to race, nothing to look through); the handover socket
    takes one message and closes the connection, and with it whatever its peer queued
    behind that message (a pipe's write end: EOF once the core's read is done)."""
    import asyncio

    async def main() -> dict[str, object]:
        proxy = egress.EgressProxy(lambda a: (), lambda d: None)
        path = tmp_path / "egress.sock"
        proxy.listen("a", path, 0o600)
        out: dict[str, object] = {"names": sorted(p.name for p in tmp_path.iterdir())}
        r, w = os.pipe()
        with socket.socket(socket.AF_UNIX) as direct:
            direct.connect(str(path))
            try:
                socket.send_fds(direct, [b"CONNECT x.test:443 HTTP/1.1\r\n\r\n"], [w])
                out["direct"] = "sent"
            except PermissionError:
                out["direct"] = "EPERM"
        with socket.socket(socket.AF_UNIX) as hand, socket.create_server(("127.0.0.1", 0)) as srv:
            tcp = socket.create_connection(srv.getsockname())
            hand.connect(str(egress.handover_path(path)))
            socket.send_fds(hand, [HANDOVER], [tcp.fileno()])
            socket.send_fds(hand, [b"behind"], [w])  # queued behind the handover
            os.close(w)
            tcp.close()
            ready = await asyncio.to_thread(select.select, [r], [], [], 5)
            out["pipe"] = ("EOF" if os.read(r, 1) == b"" else "data") if ready[0] else "held"
            os.close(r)
        proxy.close("a", path)
        out["after close"] = sorted(p.name for p in tmp_path.iterdir())
        return out

    got = asyncio.run(main())
    assert got == {
        "names": ["egress-handover.sock", "egress.sock"],
        "direct": "EPERM",
        "pipe": "EOF",
        "after close": [],
    }, got


def test_a_handed_over_unix_stream_is_refused() -> None:
    """The bridge hands over TCP connections: a unix stream handed over (whose peer could
    send descriptors into the core's copy) is refused, and the core keeps no copy."""
    bridge, conn = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with bridge, conn, mine:
        socket.send_fds(bridge, [HANDOVER], [theirs.fileno()])
        theirs.close()
        with pytest.raises(egress.Refusal) as e:
            egress._receive(conn, time.monotonic() + 5, handover=True)
        assert (e.value.status, e.value.reason) == (400, "a handed-over connection must be a TCP stream socket")
        mine.settimeout(5)
        assert mine.recv(1) == b""  # no copy of its peer left in the core: EOF


def test_a_handover_at_the_cap_is_closed_unread_not_left_in_the_backlog(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """At the agent's cap the direct listener waits (its backlog holds requests, which
    carry no descriptors), but a handover is taken and closed at once: left in the
    backlog, what its peer queued behind it (a page pair's end with root's descriptors)
    would stay in flight for as long as the agent's connections last (a tunnel to an
    upstream that never reads: for good). FAILS if the pipe's write end stays alive."""
    import asyncio

    from hyperhive.core.budget import EGRESS_REFUSING

    async def main() -> dict[str, object]:
        proxy = egress.EgressProxy(lambda a: (), lambda d: None, max_connections=2)
        path = tmp_path / "egress.sock"
        proxy.listen("a", path, 0o600)
        proxy._live["a"] = 2 + EGRESS_REFUSING  # the cap, as held tunnels hold it
        out: dict[str, object] = {}
        r, w = os.pipe()
        with socket.socket(socket.AF_UNIX) as direct, socket.socket(socket.AF_UNIX) as hand:
            direct.connect(str(path))
            direct.sendall(b"CONNECT x.test:443 HTTP/1.1\r\n\r\n")
            hand.connect(str(egress.handover_path(path)))
            socket.send_fds(hand, [HANDOVER], [w])
            os.close(w)
            ready = await asyncio.to_thread(select.select, [r], [], [], 5)
            out["pipe"] = ("EOF" if os.read(r, 1) == b"" else "data") if ready[0] else "held"
            os.close(r)
            direct.settimeout(0.3)
            try:
                out["direct"] = direct.recv(100) or "EOF"
            except TimeoutError:
                out["direct"] = "waiting"
        proxy._live.pop("a")
        proxy.close("a", path)
        return out

    got = asyncio.run(main())
    assert got == {"pipe": "EOF", "direct": "waiting"}, got


def _lingering_pair() -> tuple[socket.socket, socket.socket]:
    """A TCP pair on loopback whose first end has ~MBs queued that the second never reads,
    and SO_LINGER on for ~68 years: the last close of the first waits for the second."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    a.setblocking(False)
    try:
        while True:
            a.send(b"x" * 65536)
    except BlockingIOError:
        pass
    a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 2**31 - 1))
    return a, b


def test_a_lingering_socket_handed_over_at_the_cap_never_holds_the_event_loop(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """At the cap a handover is let go of unread; what it carries (a TCP socket whose sender
    set SO_LINGER and filled its queue, with that socket's own peer after it) is released
    where it is let go of, and the last close of such a socket waits for its peer to read:
    forever, if the peer is in the same message. Done in the event loop (session 28's first
    form of the cap), that hung the whole core. The loop must answer within a second, and a
    pipe's write end in the same message must be let go of. FAILS (times out) otherwise."""
    import asyncio

    from hyperhive.core import received_fds
    from hyperhive.core.budget import EGRESS_REFUSING

    received_fds.arm()  # as hive-core does at its start: the pair's wait is cut short
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner = threading.Thread(target=lambda: (asyncio.set_event_loop(loop), ready.set(), loop.run_forever()),
                              daemon=True)
    runner.start()
    ready.wait(5)
    proxy = egress.EgressProxy(lambda a: (), lambda d: None, max_connections=2)
    path = tmp_path / "egress.sock"

    async def serve() -> None:
        proxy.listen("a", path, 0o600)
        proxy._live["a"] = 2 + EGRESS_REFUSING  # the cap

    asyncio.run_coroutine_threadsafe(serve(), loop).result(5)
    a, b = _lingering_pair()
    r, w = os.pipe()
    # The loop kept busy meanwhile: the message is in before the accept (dropped at once at
    # the cap, a connection not yet written to met EPIPE).
    loop.call_soon_threadsafe(time.sleep, 0.3)
    time.sleep(0.02)
    with socket.socket(socket.AF_UNIX) as hand:
        hand.connect(str(egress.handover_path(path)))
        socket.send_fds(hand, [HANDOVER], [a.fileno(), b.fileno(), w])
    for s in (a, b):
        s.close()
    os.close(w)

    async def tick() -> float:
        t0 = time.monotonic()
        await asyncio.sleep(0.05)
        return time.monotonic() - t0

    answered = []
    for _ in range(5):
        answered.append(round(asyncio.run_coroutine_threadsafe(tick(), loop).result(2), 3))
        time.sleep(0.1)
    eof = bool(select.select([r], [], [], 3)[0]) and os.read(r, 1) == b""
    os.close(r)
    print(f"\nthe loop's ticks with a lingering pair dropped at the cap: {answered}; pipe at EOF {eof}")
    assert eof, "the pipe's write end is still held"
    loop.call_soon_threadsafe(loop.stop)


def test_a_nested_lingering_pair_is_let_go_of_within_a_second() -> None:
    """What no reset reaches: a unix socket whose own queue holds a lingering pair, both
    orders ([a, b, b', a']: whichever the kernel lets go of first, a lingering end goes
    before its peer). Its close drops the queue in the closing thread, whose last close of
    the lingering end waits forever for a peer that is next in line. ``watched`` (armed)
    nudges the thread past PATIENCE: the close must return within a second, with the
    watchdog's nudges seen. FAILS (the thread never returns) without the watchdog."""
    from hyperhive.core import received_fds

    received_fds.arm()
    x, y = socket.socketpair()
    a, b = _lingering_pair()
    a2, b2 = _lingering_pair()
    socket.send_fds(y, [b"\0"], [a.fileno(), b.fileno(), b2.fileno(), a2.fileno()])
    for s in (a, b, a2, b2, y):
        s.close()
    nudged = received_fds.nudges()
    t0 = time.monotonic()
    closer = threading.Thread(target=received_fds.close_received, args=([x.detach()],), daemon=True)
    closer.start()
    closer.join(3)
    took = time.monotonic() - t0
    print(f"\na nest let go of in {took:.3f} s, {received_fds.nudges() - nudged} nudge(s)")
    assert not closer.is_alive(), "the closing thread still waits on the nested lingering pair"
    assert took < 1.0 and received_fds.nudges() > nudged, (took, received_fds.nudges() - nudged)


def _nest() -> socket.socket:
    """A unix socket whose own queue holds a lingering pair (its close waits for good)."""
    x, y = socket.socketpair()
    a, b = _lingering_pair()
    socket.send_fds(y, [b"\0"], [a.fileno(), b.fileno()])
    for s in (a, b, y):
        s.close()
    return x


def test_a_handover_message_of_many_descriptors_puts_one_in_the_core_and_waits_on_none() -> None:
    """A handover message carrying a TCP socket, then 120 nests and a pipe's write end: the
    read has room for one (the kernel drops the rest in the reading thread, one run of its
    deferred work, which one nudge cuts short), the handover is refused, the pipe's write
    end is let go of, and it all takes under a second. Then a connection whose queue holds
    100 messages, a nest each, behind a good handover: its close (``let_go``) lets go of
    them all in one nudge. FAILS (hangs, or 100 nudges of 20 ms each) otherwise."""
    from hyperhive.core import received_fds

    received_fds.arm()
    bridge, conn = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    tcp_a, tcp_b = _lingering_pair()
    nests = [_nest() for _ in range(120)]
    r, w = os.pipe()
    with bridge:
        socket.send_fds(bridge, [HANDOVER], [tcp_a.fileno(), *(n.fileno() for n in nests), w])
        for s in (tcp_a, *nests):
            s.close()
        os.close(w)
        before, t0 = received_fds.nudges(), time.monotonic()
        with pytest.raises(egress.Refusal) as e:
            egress._receive(conn, time.monotonic() + 5, handover=True)
        took = time.monotonic() - t0
    conn.close()
    eof = bool(select.select([r], [], [], 3)[0]) and os.read(r, 1) == b""
    os.close(r)
    tcp_b.close()
    print(f"\n122 descriptors in one handover: refused in {took:.3f} s, "
          f"{received_fds.nudges() - before} nudge(s), pipe at EOF {eof}")
    assert e.value.status == 400 and eof and took < 1.0, (e.value, eof, took)

    bridge, conn = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    bridge.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        peer, _ = srv.accept()
    with bridge, client, peer:
        socket.send_fds(bridge, [HANDOVER], [client.fileno()])
        for _ in range(100):
            n = _nest()
            socket.send_fds(bridge, [b"\0"], [n.fileno()])
            n.close()
        before, t0 = received_fds.nudges(), time.monotonic()
        got, rest = egress._receive(conn, time.monotonic() + 5, handover=True)
        took = time.monotonic() - t0
        nudged = received_fds.nudges() - before
        got.close()
    print(f"a handover with 100 nests queued behind it: taken in {took:.3f} s, {nudged} nudge(s)")
    assert conn.fileno() == -1 and rest == b"" and took < 0.5 and nudged <= 3, (took, nudged)


def test_a_close_asleep_uninterruptibly_names_the_agent_once() -> None:
    """No signal ends an uninterruptible sleep: a pipe's last close takes the pipe's lock,
    held by a thread splicing into it from a socket nobody writes to. The watchdog must
    report the agent the closing thread acts for (``when_stuck``) once, after STUCK_AFTER
    s, and never for a thread that is merely slow (a lingering close, interruptible, cut
    short before that). FAILS without the report (hive-core would never restart the cage
    that holds the lock)."""
    from hyperhive.core import received_fds

    received_fds.arm()
    told: list[tuple[str, float]] = []
    t0 = time.monotonic()
    received_fds.when_stuck(lambda agent: told.append((agent, round(time.monotonic() - t0, 3))))
    try:
        a, b = socket.socketpair()
        r, w = os.pipe()
        splicer = threading.Thread(target=lambda: os.splice(a.fileno(), w, 65536), daemon=True)
        splicer.start()
        time.sleep(0.05)  # the splice waits, the pipe's lock held

        def close() -> None:
            with received_fds.acting_for("r29held"):
                received_fds.close_received([r])

        closer = threading.Thread(target=close, daemon=True)
        closer.start()
        time.sleep(received_fds.STUCK_AFTER + 0.6)
        still = closer.is_alive()
        b.send(b"x")  # the splice returns, the lock goes
        closer.join(3)
        splicer.join(3)
        for x in (a, b):
            x.close()
        os.close(w)
        nest = _nest()  # a lingering close: interruptible, let go of before STUCK_AFTER
        with received_fds.acting_for("r29slow"):
            received_fds.close_received([nest.detach()])
        time.sleep(0.1)
    finally:
        received_fds.when_stuck(None)
    print(f"\nreported: {told}; the close still asleep before the splice returned: {still}")
    assert still and not closer.is_alive(), "the pipe's close did not wait on the splice's lock"
    assert [agent for agent, _ in told] == ["r29held"], told
    assert received_fds.STUCK_AFTER <= told[0][1] < received_fds.STUCK_AFTER + 0.5, told

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
sends nothing. priv.sock (``exec``'s stdio) and egress.sock (a handed TCP stream) take
them, as their protocols need.

On a kernel before 6.16 the option does not exist, the sockets take descriptors as before
(a plain read drops them), and these cases fail: they say which the hive runs on."""

from __future__ import annotations

import os
import socket
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
e = socket.socket(socket.AF_UNIX)
e.connect(P["egress"])
tcp = socket.socket()
try:
    socket.send_fds(e, [b"x"], [tcp.fileno()])
    out["egress.sock, a TCP socket"] = "sent"
except OSError as err_:
    out["egress.sock, a TCP socket"] = errname(err_)
result(**out)
'''


def test_from_a_cage_agent_sock_refuses_descriptors_and_egress_sock_takes_one(h: HiveProcess) -> None:
    got = cage_run(h, AGENT, CAGED, egress="/run/hive/egress.sock")
    print(f"\nfrom the cage: {got}")
    assert got == {
        "agent.sock, descriptor": "EPERM",
        "agent.sock, then a plain call": True,
        "egress.sock, a TCP socket": "sent",
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


# -- egress.sock: it takes descriptors (the bridge's handover), but only there ------------


def test_a_direct_egress_request_with_descriptors_sent_before_it_refused_them_is_refused() -> None:
    """A request sent straight to egress.sock: descriptors sent between the core's first
    read and its refusing more (a race a peer may win) are seen in the queue, which is
    looked through, not read, and the request is refused (the core then closes it, and
    the queue with it); one with none keeps its queue whole for the relay; after the
    refusal a send with descriptors is refused (EPERM)."""
    client, conn = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    with client, conn:
        client.sendall(b"CONNECT example.test:443 HTTP/1.1\r\n\r\n")
        assert conn.recv(100).startswith(b"CONNECT")  # the first read
        client.sendall(b"x" * 100_000)  # more than one look (PEEK_CHUNK) takes
        socket.send_fds(client, [b"in the window"], [w])  # before the refusal
        os.close(w)
        with pytest.raises(egress.Refusal) as e:
            egress._refuse_more_descriptors(conn)
        assert e.value.status == 400, e.value.reason
        with pytest.raises(PermissionError):
            socket.send_fds(client, [b"after"], [r])
    os.set_blocking(r, False)
    assert os.read(r, 1) == b""  # closed with the connection: no copy of the write end left
    os.close(r)
    client, conn = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with client, conn:
        client.sendall(b"CONNECT example.test:443 HTTP/1.1\r\n\r\n")
        conn.recv(100)
        client.sendall(b"y" * 100_000)
        egress._refuse_more_descriptors(conn)  # none: taken
        conn.settimeout(5)
        got = b""
        while len(got) < 100_000:
            got += conn.recv(1 << 20)
        assert got == b"y" * 100_000  # nothing of it read by the look


def test_a_handed_over_unix_stream_is_refused() -> None:
    """The bridge hands over TCP connections: a unix stream handed over (whose peer could
    send descriptors into the core's copy) is refused, and the core keeps no copy."""
    bridge, conn = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with bridge, conn, mine:
        socket.send_fds(bridge, [HANDOVER], [theirs.fileno()])
        theirs.close()
        with pytest.raises(egress.Refusal) as e:
            egress._receive(conn, time.monotonic() + 5)
        assert (e.value.status, e.value.reason) == (400, "a handed-over connection must be a TCP stream socket")
        mine.settimeout(5)
        assert mine.recv(1) == b""  # no copy of its peer left in the core: EOF

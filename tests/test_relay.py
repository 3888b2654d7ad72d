"""hyperhive.relay, the egress proxy's byte tunnel, on real loopback TCP connections:
bytes arrive whole and in order both ways (through the buffer's growth), a half-close
reaches the other side and the answer still comes back, and a peer that never reads
holds the tunnel only until it goes away. tests/test_egress.py runs the same through
the proxy from a cage."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest

from hyperhive.relay import BUFFER_MAX, BUFFER_START, relay


def _pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback (client end, server end)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


class Tunnel:
    """cage <-> [proxy_in  relay  proxy_out] <-> upstream, the relay in a thread."""

    def __init__(self) -> None:
        self.cage, self.proxy_in = _pair()
        self.proxy_out, self.upstream = _pair()
        self.result: tuple[int, int] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.result = relay(self.proxy_in, self.proxy_out)

    def join(self, timeout: float = 10) -> tuple[int, int]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the relay did not end"
        assert self.result is not None
        return self.result

    def close(self) -> None:
        for s in (self.cage, self.proxy_in, self.proxy_out, self.upstream):
            s.close()


def _read_all(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(1 << 20):
        parts.append(chunk)
    return b"".join(parts)


@pytest.fixture
def tunnel() -> Tunnel:
    t = Tunnel()
    yield t
    t.close()


def test_bytes_arrive_whole_both_ways_past_the_largest_buffer(tunnel: Tunnel) -> None:
    up = os.urandom(3 * BUFFER_MAX + 12345)  # grows the buffer from BUFFER_START to BUFFER_MAX
    down = os.urandom(2 * BUFFER_MAX + 777)
    got: dict[str, bytes] = {}

    def upstream() -> None:
        got["up"] = _read_all(tunnel.upstream)  # until the cage's half-close comes through
        tunnel.upstream.sendall(down)
        tunnel.upstream.shutdown(socket.SHUT_WR)

    server = threading.Thread(target=upstream, daemon=True)
    server.start()
    tunnel.cage.sendall(up)
    tunnel.cage.shutdown(socket.SHUT_WR)  # half-close: the answer must still come back
    got["down"] = _read_all(tunnel.cage)
    server.join(10)
    assert hashlib.sha256(got["up"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got["down"]).digest() == hashlib.sha256(down).digest()
    assert tunnel.join() == (len(up), len(down))
    assert BUFFER_START < BUFFER_MAX


def test_a_small_message_goes_on_at_once(tunnel: Tunnel) -> None:
    """Nothing waits for a buffer to fill: a request line crosses alone, and its answer."""
    tunnel.cage.sendall(b"ping\n")
    tunnel.upstream.settimeout(5)
    assert tunnel.upstream.recv(100) == b"ping\n"
    tunnel.upstream.sendall(b"pong\n")
    tunnel.cage.settimeout(5)
    assert tunnel.cage.recv(100) == b"pong\n"
    tunnel.cage.close()
    tunnel.upstream.settimeout(5)
    assert tunnel.upstream.recv(100) == b""  # the cage's end reached the upstream
    tunnel.upstream.close()
    assert tunnel.join() == (5, 5)


def test_the_upstream_half_closing_first_still_lets_the_cage_send(tunnel: Tunnel) -> None:
    tunnel.upstream.sendall(b"banner\n")
    tunnel.upstream.shutdown(socket.SHUT_WR)
    tunnel.cage.settimeout(5)
    assert _read_all(tunnel.cage) == b"banner\n"  # and then the end of stream
    tunnel.cage.sendall(b"still here\n")
    tunnel.cage.shutdown(socket.SHUT_WR)
    tunnel.upstream.settimeout(5)
    assert _read_all(tunnel.upstream) == b"still here\n"
    assert tunnel.join() == (len(b"still here\n"), len(b"banner\n"))


def test_a_cage_that_never_reads_holds_the_tunnel_only_until_it_goes(tunnel: Tunnel) -> None:
    """The upstream floods, the cage reads nothing: the relay waits on a full window
    (as any TCP sender must) and ends as soon as the cage closes."""
    stop = threading.Event()

    def flood() -> None:
        block = b"x" * (1 << 16)
        try:
            while not stop.is_set():
                tunnel.upstream.sendall(block)
        except OSError:
            pass

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    time.sleep(0.5)  # every buffer on the way fills
    assert tunnel.thread.is_alive()
    tunnel.cage.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    tunnel.cage.close()  # unread bytes: a reset
    up, down = tunnel.join()
    stop.set()
    tunnel.upstream.shutdown(socket.SHUT_RDWR)  # (wakes the flooder's blocked send)
    flooder.join(10)
    assert not flooder.is_alive()
    assert up == 0 and down > 0


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_pipes_are_closed_when_the_tunnel_ends() -> None:
    """Each direction splices through a pipe of its own (two descriptors): both are
    closed with the relay's end, whichever side ended it."""
    before = _fds()
    t = Tunnel()
    t.cage.sendall(b"x" * (1 << 20))  # past PIPE_GROW: the pipe grows
    t.cage.shutdown(socket.SHUT_WR)
    t.upstream.settimeout(5)
    assert len(_read_all(t.upstream)) == 1 << 20
    t.upstream.close()
    assert t.join() == (1 << 20, 0)
    t.close()
    assert _fds() == before


def test_without_a_pipe_a_direction_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """No pipe to be had (descriptors short, or the user past its pipe pages): the same
    bytes through the copying pump."""
    from hyperhive import relay as relay_module

    monkeypatch.setattr(relay_module, "_pipe", lambda: None)
    t = Tunnel()
    up, down = os.urandom(BUFFER_MAX + 3), os.urandom(3 * BUFFER_START + 1)
    t.cage.sendall(up)
    t.cage.shutdown(socket.SHUT_WR)
    t.upstream.settimeout(5)
    assert _read_all(t.upstream) == up
    t.upstream.sendall(down)
    t.upstream.shutdown(socket.SHUT_WR)
    t.cage.settimeout(5)
    assert _read_all(t.cage) == down
    assert t.join() == (len(up), len(down))
    t.close()

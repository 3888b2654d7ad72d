"""``egress_tls.send_within`` over a real TLS pair on loopback: a write to a peer that
reads slowly goes through whole without ``interrupt`` being asked; a peer that takes
nothing gets ``interrupt`` asked once it has taken nothing for two waits (the early
answer's relay: ``Terminated._answer_arrived``), and without one the write ends at the
stall."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperhive.core.egress_tls import Interrupted, send_within, sni_check
from hyperhive.core.tls import HiveCA

BODY = 384 * 1024
SIP = 96 * 1024  # what the slow reader takes each time
BUFFER = 32 * 1024  # each side's, so that the writer blocks within the body


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[ssl.SSLSocket, ssl.SSLSocket]]:
    """(the writer's end, the reader's end), TLS, over loopback TCP with small buffers."""
    ca = HiveCA(tmp_path / "ca")
    server_ctx = ca.server_context("peer.test", sni_check("peer.test"))
    client_ctx = ssl.create_default_context(cadata=ca.pem.decode())
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)  # (the accepted one's)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
    raw.connect(listener.getsockname())
    conn, _ = listener.accept()
    ends: dict[str, ssl.SSLSocket] = {}
    th = threading.Thread(target=lambda: ends.update(s=server_ctx.wrap_socket(conn, server_side=True)))
    th.start()
    writer = client_ctx.wrap_socket(raw, server_hostname="peer.test")
    th.join(10)
    try:
        yield writer, ends["s"]
    finally:
        for s in (writer, ends.get("s"), listener):
            if s is not None:
                s.close()


def read_slowly(reader: ssl.SSLSocket, pause: float, got: list[int]) -> None:
    """Every ``pause`` seconds, read SIP bytes (less if they have not come); until BODY
    bytes or the end."""
    reader.settimeout(0.05)
    while sum(got) < BODY:
        time.sleep(pause)
        sip = 0
        try:
            while sum(got) < BODY and sip < SIP:
                data = reader.recv(min(65536, SIP - sip))
                sip += len(data)
                if not data:
                    return
                got.append(len(data))
        except (TimeoutError, ssl.SSLWantReadError):
            continue
        except OSError:
            return


def test_a_slow_reader_gets_it_all_and_interrupt_is_never_asked(pair: tuple[ssl.SSLSocket, ssl.SSLSocket]) -> None:
    """The peer reads 96 KiB every 0.7 s (a server that reads, slowly, after it has
    answered): each 1 s wait sees the send queue move, so ``interrupt`` is never asked and
    every byte arrives."""
    writer, reader = pair
    got: list[int] = []
    asked: list[float] = []
    th = threading.Thread(target=read_slowly, args=(reader, 0.7, got))
    th.start()
    t0 = time.monotonic()
    send_within(writer, b"s" * BODY, 10.0, None, lambda: asked.append(time.monotonic()) or True)
    took = time.monotonic() - t0
    th.join(30)
    print(f"{BODY} bytes to a reader every 0.7 s in {took:.1f} s; interrupt asked {len(asked)} times")
    assert sum(got) == BODY and not asked, (sum(got), asked)
    assert took > 1.0, took  # (the write did block: the waits were exercised)


def test_a_peer_that_takes_nothing_is_interrupted_after_two_waits(pair: tuple[ssl.SSLSocket, ssl.SSLSocket]) -> None:
    """The peer reads nothing: ``interrupt`` is asked once the queue has not moved for two
    waits, and its True ends the write (Interrupted) long before the stall; asked no more
    than once."""
    writer, _ = pair
    asked: list[float] = []
    t0 = time.monotonic()
    with pytest.raises(Interrupted):
        send_within(writer, b"n" * BODY, 30.0, None, lambda: asked.append(time.monotonic() - t0) or True)
    print(f"interrupt asked at {asked} s")
    assert len(asked) == 1 and 1.5 <= asked[0] < 5.0, asked


def test_without_interrupt_a_stalled_write_ends_at_the_stall(pair: tuple[ssl.SSLSocket, ssl.SSLSocket]) -> None:
    """The same peer, no ``interrupt`` (or one that says no): TimeoutError once nothing has
    moved for the stall (2 s here), the socket's timeout set back."""
    writer, _ = pair
    asked: list[float] = []
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        send_within(writer, b"n" * BODY, 2.0, 7.0, lambda: asked.append(time.monotonic()) and False)
    took = time.monotonic() - t0
    assert 2.0 <= took < 5.0, took
    assert writer.gettimeout() == 7.0
    assert asked, "interrupt was never asked while the write stalled"

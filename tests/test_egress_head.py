"""The egress proxy's request-head reader (``core/egress._read_head``): what it returns
however the bytes arrive, and what a head sent a byte at a time costs it.

Session 21 made it search only what each read added (and the 3 bytes before) and charge
its reads to the agent's CPU meter; the red team of session 21 had held the core at 1.5
CPUs with heads sent a byte at a time and refused (tests/redteam/test_red_diff21.py).
"""

from __future__ import annotations

import itertools
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperhive.core import egress
from hyperhive.core.egress import MAX_HEAD, Refusal, _read_head

HEAD = b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\nbody after the head"


def read_in_pieces(data: bytes, cuts: list[int], first: int = 0) -> tuple[bytes, bytes]:
    """``_read_head`` of ``data`` with ``first`` bytes already read, the rest sent in
    pieces cut at ``cuts``, each sent after the last is read, then the end."""
    a, b = socket.socketpair()
    with a, b:
        rest = data[first:]
        bounds = sorted({0, len(rest), *(c % (len(rest) + 1) for c in cuts)})

        def send() -> None:
            for lo, hi in itertools.pairwise(bounds):
                a.sendall(rest[lo:hi])
                time.sleep(0.0005)
            a.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=send)
        t.start()
        try:
            return _read_head(b, data[:first], time.monotonic() + 10)
        finally:
            t.join()


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, len(HEAD)), max_size=12), first=st.integers(0, len(HEAD)))
def test_a_head_cut_anywhere_reads_as_partition_does(cuts: list[int], first: int) -> None:
    """The blank line split over reads (``\\r\\n`` | ``\\r\\n``, one byte a read), or in
    what came before: the same head and rest as one ``partition`` of the whole."""
    head, rest = read_in_pieces(HEAD, cuts, first)
    assert head == HEAD.partition(b"\r\n\r\n")[0]
    # the rest: what came with the read that completed the head (or with ``first``)
    assert HEAD.startswith(head + b"\r\n\r\n" + rest)
    if first >= HEAD.index(b"\r\n\r\n") + 4:
        assert rest == HEAD[len(head) + 4 : first]  # no read at all


def test_a_head_a_byte_at_a_time_is_paced_and_refused_past_max_head() -> None:
    """A head sent a byte at a time never completes: refused at MAX_HEAD (431), its reads
    charged to the meter every PACE_EVERY of them."""
    paces: list[int] = []

    class Meter:
        def pace(self) -> None:
            paces.append(1)

    a, b = socket.socketpair()
    with a, b:

        def send() -> None:
            try:
                for _ in range(MAX_HEAD + 2):
                    a.send(b"a")
                    time.sleep(0.00002)
            except OSError:
                pass

        t = threading.Thread(target=send, daemon=True)
        t.start()
        with pytest.raises(Refusal) as e:
            _read_head(b, b"", time.monotonic() + 30, Meter())  # type: ignore[arg-type]
        assert e.value.status == 431
    reads = len(paces) * egress.PACE_EVERY
    assert len(paces) >= 1 and reads <= MAX_HEAD + egress.PACE_EVERY, len(paces)

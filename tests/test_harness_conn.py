"""The harness's own line reader (cage/harness.py ``Conn.readline``): whatever way the
core's replies are cut into ``recv``s, the lines come back whole, in order, each once;
at the end of the stream what is left, then b""."""

from __future__ import annotations

import socket
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from hyperhive.cage.harness import Conn

lines_st = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"") + b"\n"), max_size=60
)


def _reader_over(chunks: list[bytes], tail: bytes = b"") -> tuple[Conn, threading.Thread]:
    ours, theirs = socket.socketpair()

    def feed() -> None:
        for c in chunks:
            theirs.sendall(c)
        if tail:
            theirs.sendall(tail)
        theirs.close()

    writer = threading.Thread(target=feed)
    writer.start()
    return Conn("", fd=ours.detach()), writer


@settings(max_examples=200, deadline=None)
@given(
    lines_st,
    st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=8),
    st.binary(max_size=20),
)
def test_lines_come_back_whole_however_they_are_cut(
    lines: list[bytes], cuts: list[int], tail: bytes
) -> None:
    data = b"".join(lines)
    tail = tail.replace(b"\n", b"")
    chunks, i, k = [], 0, 0
    while i < len(data):
        n = cuts[k % len(cuts)]
        chunks.append(data[i : i + n])
        i, k = i + n, k + 1
    conn, writer = _reader_over(chunks, tail)
    try:
        got = [conn.readline() for _ in lines]
        assert got == lines
        assert conn.readline() == tail  # the end of the stream: what is left of a line
        assert conn.readline() == b""
    finally:
        writer.join()
        conn.close()


def test_many_short_lines_in_one_recv() -> None:
    """64 KiB of one-byte lines sent at once: every one read, in order (each readline
    copies its own line only, not the rest of what came: red team round 21)."""
    lines = [bytes([97 + i % 26]) + b"\n" for i in range(32768)]
    conn, writer = _reader_over([b"".join(lines)])
    try:
        assert [conn.readline() for _ in lines] == lines
        assert conn.readline() == b""
    finally:
        writer.join()
        conn.close()

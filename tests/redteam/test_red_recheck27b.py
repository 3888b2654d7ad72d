"""Re-check of 00dc4a0 (egress: a direct request's queue is peeked through for
descriptors from a moving SO_PEEK_OFF, 64 KiB at a time; an urgent byte refuses).

In-process only: the very functions the core runs (``egress._receive``,
``_refuse_more_descriptors``, ``_descriptors_queued``, ``_urgent_byte``, ``_read_head``)
on socket pairs, the peer (attacker) in this thread or a sender thread. A leftover copy of
a descriptor is detected with a pipe: its write end is what is sent; once every copy the
sender had is closed, the read end sees EOF only if none is left anywhere (queued in the
core's connection, in flight, or in the core's descriptor table).

Findings (figures printed by each case):
- the peek skips an urgent-mark skb at the head of the queue, and the moving offset counts
  from the skb after it; if the mark is superseded (a second MSG_OOB) between two peeks,
  the first skb is a plain byte again and the next peek's offset counts it: it is never
  looked at. ``_descriptors_queued`` alone then misses its descriptors (returns False with
  the descriptor still queued). Held overall: the superseding send leaves an urgent mark,
  so ``_urgent_byte`` (after the peek) refuses. The correctness of the pair rests on that
  ordering; see test_superseded_mark_at_the_head.
- the rest: see each case.
"""

from __future__ import annotations

import array
import hashlib
import os
import select
import socket
import threading
import time

import pytest

from hyperhive.core import egress
from hyperhive.unixsock import refuse_descriptors

SO_PEEK_OFF = egress.SO_PEEK_OFF


def _passrights() -> bool:
    a, b = socket.socketpair()
    with a, b:
        return refuse_descriptors(b)


pytestmark = pytest.mark.skipif(not _passrights(), reason="Linux 6.16+ (SO_PASSRIGHTS) needed")

REF = "re-check of 00dc4a0 (the peek)"
HEAD = b"CONNECT x.test:443 HTTP/1.1\r\n\r\n"


def rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def at_eof(r: int, wait: float = 0.3) -> bool:
    if not select.select([r], [], [], wait)[0]:
        return False
    return os.read(r, 1) == b""


class Counting(socket.socket):
    """The core's connection, with its peeks counted and a hook after each."""

    calls = 0
    after = None  # called with the call's number after each recvmsg

    def recvmsg(self, *a, **k):  # type: ignore[no-untyped-def, override]
        out = super().recvmsg(*a, **k)
        self.calls += 1
        if self.after is not None:
            self.after(self.calls)
        return out


def pair(sndbuf: int | None = None) -> tuple[socket.socket, Counting]:
    a, b = socket.socketpair()
    if sndbuf is not None:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    core = Counting(socket.AF_UNIX, socket.SOCK_STREAM, fileno=b.detach())
    return a, core


def fill(a: socket.socket, size: int) -> int:
    """Send ``size``-byte chunks until the peer's send buffer is full; bytes sent."""
    a.setblocking(False)
    total = 0
    chunk = b"x" * size
    try:
        while True:
            total += a.send(chunk)
    except BlockingIOError:
        pass
    a.setblocking(True)
    return total


@pytest.mark.attack("budget.exhaustion", ref=REF + ": an urgent mark at the head superseded between peeks")
def test_superseded_mark_at_the_head() -> None:
    """The head of the queue after the first read is an urgent mark O1 carrying a pipe's
    write end (the first read stops before a mark), then 100 KB of data. The first peek
    passes over O1 (manage_oob) and advances the offset by 64 KiB counted from the byte
    after O1; the attacker then sends a second urgent byte O2 (no descriptor: allowed
    after SO_PASSRIGHTS 0). O1 is now a plain byte, and the next peek's offset counts
    it: O1 is never looked at. FAILS if ``_receive`` returns without refusing, or if a
    copy of the write end is left after the core closes. Figure: what
    ``_descriptors_queued`` alone returns, and whether O1's descriptor stays queued."""
    out = {}
    for whole in (False, True):
        a, core = pair()
        r, w = os.pipe()
        a.sendall(HEAD)
        a.sendmsg([b"Q"], rights([w]), socket.MSG_OOB)
        os.close(w)
        a.sendall(b"d" * 100_000)

        def after(n: int, a: socket.socket = a) -> None:
            if n == 1:
                a.send(b"Z", socket.MSG_OOB)

        core.after = after
        verdict = "taken"
        try:
            if whole:
                core, _first = egress._receive(core, time.monotonic() + 5)
            else:
                core.recv(65536)
                refuse_descriptors(core)
                verdict = f"_descriptors_queued={egress._descriptors_queued(core)}"
                core.after = None
                left_queued = not at_eof(r, 0.1)
                verdict += f", O1's descriptor still queued={left_queued}"
                verdict += f", _urgent_byte={egress._urgent_byte(core)}"
        except egress.Refusal as e:
            verdict = f"{e.status}"
        peeks = core.calls
        core.close()
        a.close()
        out["_receive" if whole else "parts"] = (verdict, f"peeks {peeks}", "EOF" if at_eof(r) else "ALIVE")
        os.close(r)
    print(f"\nsuperseded mark at the head: {out}")
    assert out["_receive"][0] == "400", out
    assert all(v[2] == "EOF" for v in out.values()), out


@pytest.mark.attack("budget.exhaustion", ref=REF + ": CPU of the peek on a full queue")
@pytest.mark.parametrize("size", [1, 700, 65536])
def test_cpu_of_the_peek_on_a_full_queue(size: int) -> None:
    """The peer raises its send buffer to the most an unprivileged process may (2 x
    wmem_max; 8 MiB on this host) and fills it with ``size``-byte sends (1: the most
    skbs; 700: most skbs x bytes, each peek walking all skbs before its offset; 64 KiB:
    the most bytes). FAILS if ``_refuse_more_descriptors`` takes over 0.5 s of CPU or the
    bytes read afterwards differ from what was sent (the offset reset). Figures: bytes
    queued, peeks, CPU and wall time."""
    a, core = pair(sndbuf=1 << 30)
    core.sendall(b"")
    a.sendall(HEAD)
    first = core.recv(65536)
    digest = hashlib.sha256()
    queued = fill(a, size)
    digest.update(b"x" * queued)
    refuse_descriptors(core)
    c0, t0 = time.thread_time(), time.monotonic()
    egress._refuse_more_descriptors(core)
    cpu, wall = time.thread_time() - c0, time.monotonic() - t0
    off = core.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
    peeks = core.calls
    # everything still there, from the start, in order
    got = hashlib.sha256()
    n = 0
    core.setblocking(False)
    try:
        while n < queued:
            d = core.recv(1 << 20)
            if not d:
                break
            got.update(d)
            n += len(d)
    except BlockingIOError:
        pass
    a.close()
    core.close()
    print(f"\nfull queue, {size}-byte sends: first {len(first)}, queued {queued:,} B, peeks {peeks},"
          f" cpu {cpu * 1000:.1f} ms, wall {wall * 1000:.1f} ms, SO_PEEK_OFF after {off}, read back {n:,} B")
    assert cpu < 0.5, cpu
    assert off == -1
    assert n == queued and got.digest() == digest.digest()


@pytest.mark.attack("budget.exhaustion", ref=REF + ": a peer sending during the peek")
def test_peer_sending_during_the_peek_cannot_keep_it_going() -> None:
    """A thread sends 1-byte chunks as fast as it can for the whole peek (the peek never
    sees the queue's end while the peer keeps adding). The core reads nothing, so the
    queue is bounded by the peer's send buffer: FAILS if the peek takes more than
    (8 MiB / 64 KiB) + 16 calls or over 1 s wall. Figures: peeks, bytes the peer got in."""
    a, core = pair(sndbuf=1 << 30)
    a.sendall(HEAD)
    core.recv(65536)
    stop = threading.Event()
    sent = [0]

    def spam() -> None:
        while not stop.is_set():
            try:
                sent[0] += a.send(b"y" * 4096)
            except OSError:
                return

    a.settimeout(0.2)
    t = threading.Thread(target=spam)
    t.start()
    time.sleep(0.01)
    refuse_descriptors(core)
    t0 = time.monotonic()
    try:
        egress._refuse_more_descriptors(core)
        verdict = "taken"
    except egress.Refusal as e:
        verdict = f"{e.status}"
    wall = time.monotonic() - t0
    stop.set()
    t.join()
    print(f"\npeer sending during the peek: {verdict}, peeks {core.calls}, wall {wall * 1000:.1f} ms,"
          f" sent {sent[0]:,} B")
    a.close()
    core.close()
    assert core.calls <= (8 << 20) // 65536 + 16
    assert wall < 1.0


@pytest.mark.attack("budget.exhaustion", ref=REF + ": descriptors in places of the queue a peek could miss")
def test_shapes_of_the_queue() -> None:
    """Descriptors in places of the queue a peek could miss, each queued after the first
    read (as in the window) and before SO_PASSRIGHTS 0: right behind exactly 65,536 bytes
    (the first read's size) and behind 200 KB (several peeks in); five descriptors (more
    than the peek's room of four: MSG_CTRUNC); several urgent bytes, descriptors on a
    superseded one and on the last (the mark); a mark in the middle with descriptors
    after it; the peer's shutdown (EOF) right after the descriptor; descriptors with no
    byte at all (a stream sends no skb: nothing queued). FAILS if a request with a
    descriptor still queued is taken, or a copy is left after the core closes."""
    shapes = {}

    def run(name: str, send) -> None:  # type: ignore[no-untyped-def]
        a, core = pair()
        r, w = os.pipe()
        a.sendall(HEAD)
        core.recv(65536) if name != "exactly 65536 first" else None
        send(a, w)
        os.close(w)
        try:
            if name == "exactly 65536 first":
                core, _first = egress._receive(core, time.monotonic() + 5)
            else:
                egress._refuse_more_descriptors(core)
            verdict = "taken"
            queued_after = not at_eof(r, 0.1)  # the core still has the connection open
        except egress.Refusal as e:
            verdict, queued_after = f"{e.status}", False
        core.close()
        a.close()
        shapes[name] = (verdict, "EOF" if at_eof(r) else "ALIVE", f"queued while taken={queued_after}")
        os.close(r)

    def exactly(a, w):  # type: ignore[no-untyped-def]
        a.sendall(b"h" * (65536 - len(HEAD)))
        a.sendmsg([b"F"], rights([w]))

    run("exactly 65536 first", exactly)
    run("behind 200 KB", lambda a, w: (a.sendall(b"d" * 200_000), a.sendmsg([b"F"], rights([w]))))
    run("five descriptors", lambda a, w: a.sendmsg([b"F"], rights([w] * 5)))
    run("oob superseded", lambda a, w: (a.sendmsg([b"A"], rights([w]), socket.MSG_OOB),
                                         a.sendall(b"d" * 70_000), a.send(b"B", socket.MSG_OOB)))
    run("oob x3, last with fds", lambda a, w: (a.send(b"A", socket.MSG_OOB), a.send(b"B", socket.MSG_OOB),
                                                a.sendmsg([b"C"], rights([w]), socket.MSG_OOB)))
    run("mark mid, fds after", lambda a, w: (a.sendall(b"d" * 70_000), a.send(b"M", socket.MSG_OOB),
                                              a.sendall(b"e" * 70_000), a.sendmsg([b"F"], rights([w]))))
    run("fds then shutdown", lambda a, w: (a.sendall(b"d" * 70_000), a.sendmsg([b"F"], rights([w])),
                                           a.shutdown(socket.SHUT_WR)))
    run("no byte with fds", lambda a, w: a.sendmsg([], rights([w])))
    print(f"\nqueue shapes: {shapes}")
    for name, (_verdict, eof, queued) in shapes.items():
        assert eof == "EOF", (name, shapes[name])
        assert queued.endswith("False"), (name, shapes[name])


@pytest.mark.attack("budget.exhaustion", ref=REF + ": SO_PEEK_OFF restored for _read_head and the relay")
def test_peek_offset_and_blocking_are_restored() -> None:
    """After ``_refuse_more_descriptors`` (taken, and refused), the connection's SO_PEEK_OFF
    is -1 and a plain read starts at the first unread byte: ``_read_head`` gets the head
    and everything after it as sent (a relay reading from a stale offset would skip or
    repeat bytes). FAILS otherwise. Figure: the head and rest lengths."""
    a, core = pair()
    a.sendall(b"CONNECT x.test:443 HTTP/1.1\r\n")
    first = core.recv(65536)
    a.sendall(b"Host: x.test:443\r\n\r\n" + b"r" * 150_000)
    refuse_descriptors(core)
    egress._refuse_more_descriptors(core)
    off = core.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
    timeout = core.gettimeout()
    head, rest = egress._read_head(core, first, time.monotonic() + 5)
    n = len(rest)
    core.setblocking(False)
    try:
        while True:
            d = core.recv(1 << 20)
            if not d:
                break
            n += len(d)
    except BlockingIOError:
        pass
    a.close()
    core.close()
    print(f"\npeek offset after: {off}, timeout {timeout}, head {len(head)} B, rest+queue {n:,} B")
    assert off == -1 and head == b"CONNECT x.test:443 HTTP/1.1\r\nHost: x.test:443" and n == 150_000

    a, core = pair()
    r, w = os.pipe()
    a.sendall(HEAD)
    core.recv(65536)
    a.sendall(b"d" * 100_000)
    a.sendmsg([b"F"], rights([w]))
    os.close(w)
    refuse_descriptors(core)
    with pytest.raises(egress.Refusal):
        egress._refuse_more_descriptors(core)
    off = core.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
    fds_open = len(os.listdir("/proc/self/fd"))
    core.close()
    a.close()
    eof = at_eof(r)
    os.close(r)
    print(f"after a refusal: SO_PEEK_OFF {off}, pipe EOF {eof}, fds open {fds_open}")
    assert off == -1 and eof


@pytest.mark.attack("budget.exhaustion", ref=REF + ": urgent bytes and descriptors raced into the window")
def test_race_urgent_with_descriptors_in_the_window() -> None:
    """400 pairs: the head sent, then a thread alternates, as fast as it can until EPERM,
    an urgent byte carrying a pipe's write end, 3 KB of data, a plain urgent byte (which
    supersedes the previous mark) and a byte with a descriptor, while the core does
    ``_receive``. FAILS if a request is taken with a copy of the write end still queued
    (the pipe not at EOF while the core holds the connection) or one is left after.
    Figures: taken / refused, descriptors the thread got in."""
    stats = {"taken": 0, "refused": 0, "sent with fds": 0, "left while taken": 0}
    r, w = os.pipe()
    t_end = time.monotonic() + 6
    for _i in range(400):
        if time.monotonic() > t_end:
            break
        a, core = pair()
        go = threading.Event()

        def spam(a: socket.socket = a, go: threading.Event = go) -> None:
            go.wait()
            k = 0
            while True:
                try:
                    m = k % 4
                    if m == 0:
                        a.sendmsg([b"Q"], rights([w]), socket.MSG_OOB)
                        stats["sent with fds"] += 1
                    elif m == 1:
                        a.sendall(b"d" * 3000)
                    elif m == 2:
                        a.send(b"Z", socket.MSG_OOB)
                    else:
                        a.sendmsg([b"F"], rights([w]))
                        stats["sent with fds"] += 1
                    k += 1
                except OSError:
                    return

        t = threading.Thread(target=spam)
        t.start()
        a.sendall(HEAD)
        go.set()
        try:
            core, _ = egress._receive(core, time.monotonic() + 5)
            stats["taken"] += 1
            t.join()
            rr, ww = os.pipe()  # whether this pair holds a copy: a sentinel written in 1
            # (any copy of w still queued keeps r from EOF at the end; counted here by
            # looking at the whole queue with plain reads that pass descriptors to us)
            core.setblocking(False)
            try:
                while True:
                    d, fds, _, _ = socket.recv_fds(core, 1 << 20, 16)
                    if fds:
                        stats["left while taken"] += len(fds)
                        for fd in fds:
                            os.close(fd)
                    if not d:
                        break
            except BlockingIOError:
                pass
            os.close(rr)
            os.close(ww)
        except egress.Refusal:
            stats["refused"] += 1
            core.close()
            t.join()
        core.close()
        a.close()
    os.close(w)
    eof = at_eof(r)
    os.close(r)
    print(f"\nurgent race: {stats}, pipe EOF {eof}")
    assert stats["left while taken"] == 0, stats
    assert eof

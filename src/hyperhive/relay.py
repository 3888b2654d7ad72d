"""Moving bytes between two connected sockets, both ways, until both sides end,
for the egress proxy (hive-core). Standard library only.

Bytes move with ``splice(2)`` through a pipe a direction: the kernel moves page
references from one socket to the pipe and on to the other, with no copy into
userspace and back. Session 9 chose a copy (``recv_into`` a buffer, ``send``
from it) over splice: then the cage's client spent more receiving spliced pages
than the proxy saved. Session 12 measured again on this machine (kernel 6.x,
docs/performance.md, "Egress: splice again"): hive-core's CPU per GiB relayed
fell from 0.31–0.39 to 0.13–0.16 s (plain HTTP) while curl's rose from 0.24–0.29
to 0.31–0.39, the three parties together ~10 % less, and plain HTTP through the
proxy moved 1,978 against 1,754 MB/s (medians of four alternate runs). The copy
(``pump``) stays for a direction whose pipe can't be had: descriptors short, or
the core's user past ``fs/pipe-user-pages-soft``, whose new pipes hold two pages.

Each direction's thread may carry a ``Meter`` (hive-core's ``egress_tls.CpuMeter``): what
the thread spends, the kernel's splicing too, is charged to its agent every PACE_EVERY
passes and once more when the direction ends, and a debt is slept off in the thread, so
an agent's tunnels cost the core no more CPU than its share (docs/security.md, "Egress").
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import threading
import time
from typing import Protocol

# A pass is one read and its write: a thread's CPU is read (a system call) and charged
# every this many, and whatever is left when the direction ends. A pass is ~10 µs of
# 1-byte pieces, or up to 1 MiB of a bulk transfer (~0.2 ms).
PACE_EVERY = 16


class Meter(Protocol):
    """One direction's CPU, charged in the thread that moves its bytes."""

    def begin(self) -> None:
        """This thread's CPU counts from now (a direction run in a thread of its own)."""

    def pace(self) -> None:
        """Charge what this thread spent since the last call; sleep off a debt."""


# A direction's buffer starts small (most tunnels carry a request and its answer,
# or sit idle) and doubles each time one read fills it, up to BUFFER_MAX: a bulk
# transfer then moves up to 1 MiB a wake-up, and an idle tunnel holds 64 KiB a side.
BUFFER_START = 64 * 1024
BUFFER_MAX = 1 << 20


def abort(src: socket.socket, dst: socket.socket) -> None:
    """A direction's write failed (the reader gone, or a peer that took nothing for the
    relay's ``stall``: ``[egress] stall_seconds``): both sockets are shut both ways, so the other
    direction's wait (a read from a server that never answers) ends too, and ``dst`` will
    close with a reset, dropping what is queued for it. Before, a tunnel to a server that
    stopped reading outlived the cage that opened it, with 60 MiB of its upload still
    queued in the core (red team of session 32)."""
    reset_on_close(dst)
    for sock in (src, dst):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger: on, 0 s


def reset_on_close(sock: socket.socket) -> None:
    """``sock``'s close will be a reset, dropping what is queued to send: a close behind
    unsent bytes that the peer takes nothing of leaves the connection to the kernel
    (established on the peer's side, its window shut) for minutes."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass


# With a stall bound, each blocked write waits at most this long before the relay looks at
# the time since the last write that moved anything. (A kernel timer alone can't tell:
# SO_SNDTIMEO waits anew once a splice's send moved a byte, ~245 s for 60; TCP_USER_TIMEOUT
# reset a slow but honest reader's connection at the bound: re-check of session 32.)
_SLICE = struct.pack("ll", 1, 0)


def pump(
    src: socket.socket, dst: socket.socket, meter: Meter | None = None, stall: float = 0.0
) -> int:
    """Move bytes src -> dst until src's end of stream (or an error); then shut
    down dst's sending side so the peer sees the end too. Returns bytes moved.

    Each read is sent whole before the next: what a peer wrote goes on at once,
    however small (a request line never waits for more to fill a buffer)."""
    moved = passes = 0
    since = time.monotonic()  # the last read, or write that moved anything

    def stalled(last: float) -> bool:
        return not stall or time.monotonic() - last >= stall

    buf = memoryview(bytearray(BUFFER_START))
    try:
        while True:
            passes += 1
            if meter is not None and passes % PACE_EVERY == 0:
                meter.pace()
            try:
                n = src.recv_into(buf)
            except OSError:
                break
            if n == 0:
                break
            since = time.monotonic()  # (the stall is timed from here)
            view = buf[:n]
            while view:
                try:
                    sent = dst.send(view)
                except BlockingIOError:  # a SO_SNDTIMEO slice passed with no room
                    if stalled(since):
                        abort(src, dst)
                        return moved
                    continue
                except OSError:
                    abort(src, dst)
                    return moved
                since = time.monotonic()
                view = view[sent:]
                moved += sent
            if n == len(buf) and n < BUFFER_MAX:
                # ``view`` too: left as an empty slice of the old buffer, it kept that
                # alive through the next read, 1.5 MiB a direction on an idle tunnel grown
                # to the top (red team round 14), past the budget's 2 MiB a tunnel.
                buf = view = memoryview(bytearray(min(2 * n, BUFFER_MAX)))
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if meter is not None:
            meter.pace()
    return moved


# A direction's pipe starts at the kernel's default (16 pages: the user's soft limit
# counts them, fs/pipe-user-pages-soft) and grows to PIPE_MAX once a read brings
# PIPE_GROW or more (a bulk transfer): then up to 1 MiB moves a wake-up, as the copy's
# buffer did. A pipe holds pages only between a read and its write: the write drains
# it before the next read, so an idle tunnel pins none.
PIPE_MAX = 1 << 20
PIPE_GROW = 16 * 1024
PIPE_MIN = 16 * 4096  # a smaller new pipe: past the soft limit, where splicing 2 pages a call loses


def _pipe() -> tuple[int, int] | None:
    """A pipe for one direction (read end, write end), or None (then it copies)."""
    try:
        r, w = os.pipe2(os.O_CLOEXEC)
    except OSError:
        return None
    if fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) < PIPE_MIN:
        os.close(r)
        os.close(w)
        return None
    return r, w


def splice_pump(
    src: socket.socket,
    dst: socket.socket,
    pipe: tuple[int, int],
    meter: Meter | None = None,
    stall: float = 0.0,
) -> int:
    """``pump``, through ``pipe`` (closed here) with splice(2): no copy in userspace.
    The same ends: src's end of stream, or an error either side, ends it and shuts
    down dst's sending side; each read is written whole before the next."""
    r, w = pipe
    moved = passes = 0
    since = time.monotonic()  # the last read, or write that moved anything

    def stalled(last: float) -> bool:
        return not stall or time.monotonic() - last >= stall

    size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    s, d = src.fileno(), dst.fileno()
    try:
        while True:
            passes += 1
            if meter is not None and passes % PACE_EVERY == 0:
                meter.pace()
            try:
                n = os.splice(s, w, size, flags=os.SPLICE_F_MOVE)
            except OSError:
                break
            if n == 0:
                break
            since = time.monotonic()  # (the stall is timed from here)
            while n:
                try:
                    sent = os.splice(r, d, n, flags=os.SPLICE_F_MOVE)
                except BlockingIOError:  # a SO_SNDTIMEO slice passed with no room
                    if stalled(since):
                        abort(src, dst)
                        return moved
                    continue
                except OSError:
                    abort(src, dst)
                    return moved
                since = time.monotonic()
                n -= sent
                moved += sent
            if n == 0 and size < PIPE_MAX and moved >= PIPE_GROW:
                try:
                    size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_MAX)
                except OSError:  # EPERM past the user's soft limit: it stays as it is
                    size = PIPE_MAX  # (asked once)
    finally:
        os.close(r)
        os.close(w)
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if meter is not None:
            meter.pace()
    return moved


def _direction(
    src: socket.socket,
    dst: socket.socket,
    pipe: tuple[int, int] | None,
    meter: Meter | None,
    stall: float,
) -> int:
    if pipe is None:
        return pump(src, dst, meter, stall)
    return splice_pump(src, dst, pipe, meter, stall)


def relay(
    a: socket.socket,
    b: socket.socket,
    meters: tuple[Meter, Meter] | None = None,
    stall: float = 0.0,
) -> tuple[int, int]:
    """Both directions at once (one in a helper thread); returns (a->b, b->a) bytes.
    Both sockets must be blocking. Closes neither (the pipes, yes). ``meters``: a->b's
    (begun in the helper thread) and b->a's (this thread's); each direction's last debt is
    slept off before it ends, so before this returns."""
    up: list[int] = [0]
    if stall:
        for sock in (a, b):  # a write waits in slices, so a stall is timed here (``stalled``)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _SLICE)
    pipes = (_pipe(), _pipe())
    up_meter, down_meter = (None, None) if meters is None else meters

    def upstream() -> None:
        if up_meter is not None:
            up_meter.begin()
        up[0] = _direction(a, b, pipes[0], up_meter, stall)

    try:
        t = threading.Thread(target=upstream, daemon=True)
        t.start()
    except BaseException:
        for p in pipes:
            if p is not None:
                os.close(p[0])
                os.close(p[1])
        raise
    down = _direction(b, a, pipes[1], down_meter, stall)
    t.join()
    return up[0], down

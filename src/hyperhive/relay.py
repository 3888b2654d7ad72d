"""Copying bytes between two connected sockets, both ways, until both sides
end, for the egress proxy (hive-core); and the handover byte the cage's bridge
(harness) sends it. Standard library only.

Bytes move with ``recv_into`` a buffer of the direction's own and ``send`` from
it; both release the GIL while they wait or copy. It was ``splice(2)`` through a
pipe (no copy in userspace) until measured end to end (session 9, bench/egress.py
and a loopback model of it): the proxy's own CPU per GiB was lower with splice
(0.2 s against 0.4 s) but the cage's client spent 0.35 s/GiB more receiving the
spliced pages (still referenced from the upstream socket's page fragments, so the
sender allocates new ones and the receiver frees them), and the three together
used about 10 % more CPU than with the copy: on a machine whose cores the server,
the proxy and the client share, that CPU is the throughput. A copy also needs no
pipe: two descriptors a tunnel, not six (core/budget.py).
"""

from __future__ import annotations

import socket
import threading

# The cage's egress bridge sends this one byte with the client's fd attached
# (SCM_RIGHTS); a proxy request never starts with NUL.
HANDOVER = b"\0"
# A direction's buffer starts small (most tunnels carry a request and its answer,
# or sit idle) and doubles each time one read fills it, up to BUFFER_MAX: a bulk
# transfer then moves up to 1 MiB a wake-up, and an idle tunnel holds 64 KiB a side.
BUFFER_START = 64 * 1024
BUFFER_MAX = 1 << 20


def pump(src: socket.socket, dst: socket.socket) -> int:
    """Move bytes src -> dst until src's end of stream (or an error); then shut
    down dst's sending side so the peer sees the end too. Returns bytes moved.

    Each read is sent whole before the next: what a peer wrote goes on at once,
    however small (a request line never waits for more to fill a buffer)."""
    moved = 0
    buf = memoryview(bytearray(BUFFER_START))
    try:
        while True:
            try:
                n = src.recv_into(buf)
            except OSError:
                break
            if n == 0:
                break
            view = buf[:n]
            while view:
                try:
                    sent = dst.send(view)
                except OSError:
                    return moved
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
    return moved


def relay(a: socket.socket, b: socket.socket) -> tuple[int, int]:
    """Both directions at once (one in a helper thread); returns (a->b, b->a) bytes.
    Both sockets must be blocking. Closes neither."""
    up: list[int] = [0]

    def upstream() -> None:
        up[0] = pump(a, b)

    t = threading.Thread(target=upstream, daemon=True)
    t.start()
    down = pump(b, a)
    t.join()
    return up[0], down

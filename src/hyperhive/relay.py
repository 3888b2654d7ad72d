"""Copying bytes between two connected sockets, both ways, until both sides
end, for the egress proxy (hive-core); and the handover byte the cage's bridge
(harness) sends it. Standard library only. Bytes move with ``splice(2)``
through a pipe, so they never enter Python and the GIL is released while they
move; that is what keeps the proxy close to a direct connection in throughput.
"""

from __future__ import annotations

import os
import socket
import threading

# The cage's egress bridge sends this one byte with the client's fd attached
# (SCM_RIGHTS); a proxy request never starts with NUL.
HANDOVER = b"\0"
CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    try:
        import fcntl

        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size: the default size still works
    return r, w


def pump(src: socket.socket, dst: socket.socket) -> int:
    """Move bytes src -> dst until src's end of stream (or an error); then shut
    down dst's sending side so the peer sees the end too. Returns bytes moved.

    Each write splices exactly what the read brought in. Asking splice(2) for
    more than the pipe holds, with a writer still attached (e.g. a second thread
    filling the pipe), makes the kernel treat the data as "more to come" and
    cork it on a TCP socket: a small request then never leaves."""
    moved = 0
    r, w = _pipe()
    try:
        while True:
            try:
                n = os.splice(src.fileno(), w, CHUNK)
            except OSError:
                break
            if n == 0:
                break
            left = n
            while left:
                try:
                    sent = os.splice(r, dst.fileno(), left)
                except OSError:
                    return moved
                left -= sent
                moved += sent
    finally:
        os.close(r)
        os.close(w)
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

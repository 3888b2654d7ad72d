"""The cage's end of egress: a TCP listener on the cage's own loopback (the
port in HTTPS_PROXY / HTTP_PROXY / ALL_PROXY) that the harness bridges, one
connection each, to the agent's egress socket. The proxy behind that socket
knows the agent from the socket itself; nothing said on the wire can change it.

The bridge does not copy bytes: it connects to egress-handover.sock and hands the
accepted connection over (SCM_RIGHTS, with the one-byte HANDOVER message), so
the proxy serves the runtime's own TCP connection directly. That keeps a hop,
two threads and a copy out of every request.
Standard library only (it runs in the harness)."""

from __future__ import annotations

import _socket
import _struct
import errno as _errno
import os
import sys
import threading
import time

from hyperhive.cage import layout
from hyperhive.cage.layout import HANDOVER

# _socket, not socket: see harness.py.

CONNECT_TIMEOUT = 5.0
ACCEPT_FAILURES = 1000  # accept errors in a row (each 50 ms apart) before the loop gives up


def _hand_over(client: _socket.socket, egress_path: str) -> None:
    upstream = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    # SO_SNDTIMEO, not settimeout: a unix connect waits for room in a full backlog (the
    # proxy busy, or paused at the agent's cap) only on a blocking socket; settimeout made
    # it non-blocking underneath and such a connect failed at once with EAGAIN, a 502 for
    # a burst of the runtime's own connections (red team round 21). The bound also
    # holds for the sendmsg.
    upstream.setsockopt(
        _socket.SOL_SOCKET, _socket.SO_SNDTIMEO, _struct.pack("ll", int(CONNECT_TIMEOUT), 0)
    )
    try:
        try:
            upstream.connect(egress_path)
            rights = client.fileno().to_bytes(4, sys.byteorder, signed=True)
            upstream.sendmsg([HANDOVER], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
        except OSError as e:
            reason = f"hive egress: the hive's egress proxy is not reachable ({e.strerror or e})"
            client.settimeout(CONNECT_TIMEOUT)
            client.sendall(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s\n" % (len(reason) + 1, reason.encode())
            )
    except OSError:
        pass
    finally:
        upstream.close()
        client.close()  # the proxy holds its own copy now


def handed_listener() -> _socket.socket | None:
    """The listener init bound for the cage's life (``HIVE_BRIDGE_FD``), if it handed one:
    a TCP socket listening on the cage's loopback, else None."""
    raw = os.environ.pop(layout.BRIDGE_FD_ENV, "")
    if not raw.isdigit():
        return None
    try:
        os.set_inheritable(int(raw), False)  # an exec'd harness got it inheritable
        listener = _socket.socket(fileno=int(raw))
    except OSError:
        return None
    if listener.family != _socket.AF_INET or not listener.getsockopt(
        _socket.SOL_SOCKET, _socket.SO_ACCEPTCONN
    ):
        listener.detach()
        return None
    return listener


def serve_bridge(
    port: int = layout.EGRESS_PORT, egress_path: str = layout.EGRESS_HANDOVER_SOCKET
) -> _socket.socket:
    """Serve init's listener (a fresh one for each harness: ``init.rebind_bridge``), or
    listen on 127.0.0.1:port now if init handed none (so the runtime finds it from its
    first turn); serve from a daemon thread."""
    listener = handed_listener()
    if listener is None:
        listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            listener.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(128)
        except BaseException:
            listener.close()
            raise

    def accept_loop() -> None:
        failures = 0
        while True:
            try:
                fd, _ = listener._accept()  # type: ignore[attr-defined]  # (fd, address)
            except OSError as e:
                # Out of descriptors or memory for a moment, a peer gone before its accept:
                # wait and go on (the runtime's proxy URL must not die with one error).
                # Closed under it (EBADF), or failing for good: say so, and stop.
                if e.errno == _errno.EBADF or failures >= ACCEPT_FAILURES:
                    print(f"harness: egress bridge stopped: {e}", file=sys.stderr, flush=True)
                    return
                failures += 1
                time.sleep(0.05)
                continue
            failures = 0
            client = _socket.socket(fileno=fd)
            try:
                client.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            except OSError:
                pass  # reset already: the hand-over fails and closes it
            _hand_over(client, egress_path)

    threading.Thread(target=accept_loop, name="egress-bridge", daemon=True).start()
    return listener

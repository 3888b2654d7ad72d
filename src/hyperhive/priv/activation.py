"""Socket activation, as systemd does it: the listener is inherited as fd 3 with
``LISTEN_FDS=1`` and ``LISTEN_PID`` = our pid. There is no self-bind fallback."""

from __future__ import annotations

import os
import socket
import stat

SD_LISTEN_FDS_START = 3


class NotActivated(Exception):
    """Why this process can't serve; one line."""


def inherited_listener(environ: dict[str, str] | None = None) -> socket.socket:
    env = os.environ if environ is None else environ
    pid, fds = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if pid is None or fds is None:
        raise NotActivated(
            "not socket-activated: LISTEN_PID/LISTEN_FDS are not set "
            "(start it through hive-priv.socket or `hive up`; it never binds a socket itself)"
        )
    if pid != str(os.getpid()):
        raise NotActivated(
            f"not socket-activated: LISTEN_PID={pid} is not this process ({os.getpid()})"
        )
    if fds != "1":
        raise NotActivated(
            f"expected exactly one inherited socket (LISTEN_FDS=1), got LISTEN_FDS={fds}"
        )
    fd = SD_LISTEN_FDS_START
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise NotActivated("LISTEN_FDS=1 but fd 3 is not open") from None
    if not stat.S_ISSOCK(mode):
        raise NotActivated("fd 3 is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise NotActivated("fd 3 is not an AF_UNIX stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise NotActivated("fd 3 is not a listening socket")
    # Don't leak the activation variables to the cages we start.
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return sock

"""Socket activation, as systemd does it: the listeners are inherited from fd 3 on, with
``LISTEN_FDS`` = their number, ``LISTEN_PID`` = our pid and, for more than one,
``LISTEN_FDNAMES`` naming each (``host.sock:core.sock``). hive-priv takes one and never
binds itself; hive-core takes host.sock and core.sock when ``hive up`` or systemd binds
them (so the core needs neither socket's group). Standard library only."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Mapping

SD_LISTEN_FDS_START = 3
MAX_LISTEN_FDS = 8  # far above what any of our processes is handed


class NotActivated(Exception):
    """Why this process can't serve; one line."""


def inherited_listener(environ: dict[str, str] | None = None) -> socket.socket:
    """hive-priv's one listener (fd 3)."""
    env = os.environ if environ is None else environ
    fds = env.get("LISTEN_FDS")
    if fds not in (None, "1") and env.get("LISTEN_PID") == str(os.getpid()):
        raise NotActivated(
            f"expected exactly one inherited socket (LISTEN_FDS=1), got LISTEN_FDS={fds}"
        )
    socks, _ = _listeners(env)
    if len(socks) != 1:
        for s in socks:
            s.detach()
        raise NotActivated(
            f"expected exactly one inherited socket (LISTEN_FDS=1), got LISTEN_FDS={len(socks)}"
        )
    return socks[0]


def inherited_listeners(names: tuple[str, ...]) -> dict[str, socket.socket]:
    """The listeners named ``names`` in ``LISTEN_FDNAMES``, or {} if this process was
    not socket-activated at all (then it binds its own). Handed some, but not exactly
    these names: NotActivated."""
    if "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ:
        return {}
    socks, given = _listeners(os.environ)
    if sorted(given) != sorted(names) or len(given) != len(socks):
        for s in socks:
            s.detach()
        raise NotActivated(
            f"handed sockets named {':'.join(given) or '(none)'}, expected {':'.join(names)}"
        )
    return dict(zip(given, socks, strict=True))


def _listeners(env: Mapping[str, str]) -> tuple[list[socket.socket], list[str]]:
    """The inherited listeners and their names (LISTEN_FDNAMES, possibly empty)."""
    pid, fds = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if pid is None or fds is None:
        raise NotActivated(
            "not socket-activated: LISTEN_PID/LISTEN_FDS are not set "
            "(start it through its systemd socket unit or `hive up`)"
        )
    if pid != str(os.getpid()):
        raise NotActivated(
            f"not socket-activated: LISTEN_PID={pid} is not this process ({os.getpid()})"
        )
    if not fds.isdigit() or not 1 <= int(fds) <= MAX_LISTEN_FDS:
        raise NotActivated(f"LISTEN_FDS={fds} is not a count of 1 to {MAX_LISTEN_FDS}")
    socks: list[socket.socket] = []
    try:
        for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(fds)):
            socks.append(_listening_unix_socket(fd))
    except NotActivated:
        for s in socks:
            s.detach()
        raise
    names = env.get("LISTEN_FDNAMES", "")
    # Don't leak the activation variables to what we start (cages, a shell).
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return socks, names.split(":") if names else []


def _listening_unix_socket(fd: int) -> socket.socket:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise NotActivated(f"fd {fd} is not open") from None
    if not stat.S_ISSOCK(mode):
        raise NotActivated(f"fd {fd} is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise NotActivated(f"fd {fd} is not an AF_UNIX stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise NotActivated(f"fd {fd} is not a listening socket")
    return sock

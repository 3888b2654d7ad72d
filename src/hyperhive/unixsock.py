"""Binding a listening unix socket with the owner group and mode it must have
from its first instant (no window in which it is more open)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def bind_listener(path: Path, gid: int | None, mode: int = 0o660, backlog: int = 128) -> socket.socket:
    if os.path.lexists(path):
        os.unlink(path)  # a stale socket from a process that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # 0600 until chown/chmod below
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    sock.listen(backlog)
    return sock

"""Binding a unix socket with the owner and mode it must have, with no window in
which anyone else could connect, and without touching the process's umask (which
every thread shares: a umask changed for one bind would apply to whatever another
thread creates meanwhile).

How: the socket's node is born from the socket's own inode mode, less the umask
(Linux ``unix_bind``), so an ``fchmod`` to 0600 before ``bind`` makes it ours
alone; then ``chown``/``chmod`` give it its owner and mode; only then does it
``listen`` (until then a connect is refused anyway). Standard library only: the
harness uses it in the cage.
"""

from __future__ import annotations

import os
import stat

# pathlib and socket only name types here: importing them would cost every cage's harness
# ~1 MiB and ~2 ms (it binds the page socket with this module, a _socket.socket). mypy reads
# TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    import socket
    from pathlib import Path

BORN = 0o600  # the node's mode between bind and chmod: only our own uid


def bind_socket(
    sock: socket.socket | _socket.socket,
    path: Path | str,
    *,
    uid: int | None = None,
    gid: int | None = None,
    mode: int = 0o660,
) -> None:
    """Bind ``sock`` (AF_UNIX, not yet bound) at ``path``, replacing a stale socket
    there, and give the node ``uid``/``gid`` (None: leave as created) and ``mode``.
    The caller listens afterwards (``bind_listener`` does both)."""
    if os.path.lexists(path):
        os.unlink(path)  # a stale socket from a process that died
    os.fchmod(sock.fileno(), BORN)
    sock.bind(str(path))
    born = stat.S_IMODE(os.lstat(path).st_mode)
    if born & ~BORN:  # a kernel that ignored the fchmod: say so rather than be open
        os.unlink(path)
        raise OSError(f"{path}: socket created with mode {born:o}, wider than {BORN:o}")
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    os.chmod(path, mode)


def bind_listener(
    path: Path | str,
    gid: int | None = None,
    mode: int = 0o660,
    backlog: int = 128,
    *,
    uid: int | None = None,
) -> socket.socket:
    """A listening AF_UNIX stream socket at ``path`` with this owner and mode."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bind_socket(sock, path, uid=uid, gid=gid, mode=mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock

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

import _socket
import _thread
import errno
import os
import stat
import sys

# pathlib and socket only name types here (_socket, built in, is loaded by any socket's
# maker): importing them would cost every cage's harness
# ~1 MiB and ~2 ms (it binds the page socket with this module, a _socket.socket). mypy reads
# TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from pathlib import Path

BORN = 0o600  # the node's mode between bind and chmod: only our own uid
# Linux 6.16's socket option (asm-generic's number: x86, arm64, riscv); Python 3.11's
# socket module does not name it.
SO_PASSRIGHTS = getattr(_socket, "SO_PASSRIGHTS", 83)


def refuse_descriptors(sock: socket.socket | _socket.socket) -> bool:
    """Make ``sock`` refuse SCM_RIGHTS (``SO_PASSRIGHTS`` 0): a peer's ``sendmsg`` with
    descriptors fails with EPERM and sends nothing, so no descriptor a peer sends can wait
    in our receive queue, in flight and charged to its sender's uid, for as long as we
    leave it unread (a compromised harness could so park its page pair, six of root's
    descriptors, past its own death). Connections a listener accepts inherit it. False on
    a kernel before 6.16 (ENOPROTOOPT): there the socket takes descriptors as before, and
    a plain read drops them as it consumes their byte."""
    try:
        sock.setsockopt(_socket.SOL_SOCKET, SO_PASSRIGHTS, 0)
    except OSError as e:
        if e.errno in (errno.ENOPROTOOPT, errno.EINVAL):
            return False
        raise
    return True


def stdio_pair(*, ours_reads: bool) -> tuple[int, int]:
    """Our end and the other process's of one stdio stream (stdin, stdout or stderr of
    ``hive exec``'s command, or of a turn's runtime): a unix socket pair, as OpenSSH's
    sshd gives a session's command unless built with USE_PIPES.

    Not a pipe: a pipe is one object with one lock (``pipe->mutex``) that both ends take,
    and a cage process that holds the other end can hold it for as long as it likes
    (``splice`` from a socket nobody writes to into the write end, or from the read end
    into a socket nobody reads), so our read, write and last close would sleep
    uninterruptibly (red team of session 30: hive-priv's relay; session 31: the harness's
    turn loop). Two sockets have a lock each, and ``splice`` needs a pipe on one side: a
    cage process can only splice through a pipe of its own. Ours refuses descriptors
    (nothing sent to it is closed by us) and is shut in the direction it does not carry,
    so the other side reads EOF from its stdout and gets EPIPE writing to its stdin, as
    with a pipe. Ours never blocks, and takes an out-of-band byte as a byte like any other
    (with SO_OOBINLINE off one made poll say "ready" while a read found nothing: red team
    of session 30). The price: the other process can't open /dev/stdout and the like by
    name (ENXIO)."""
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    refuse_descriptors(ours)
    ours.shutdown(_socket.SHUT_WR if ours_reads else _socket.SHUT_RD)
    ours.setsockopt(_socket.SOL_SOCKET, _socket.SO_OOBINLINE, 1)
    ours.setblocking(False)
    return ours.detach(), theirs.detach()


# Room for one message's descriptors: the kernel attaches at most SCM_MAX_FD (253) to one,
# and a stream read stops after the first message that carries any.
_RIGHTS_ROOM = _socket.CMSG_SPACE(253 * 4)


def read_stream(fd: int, n: int) -> bytes:
    """Up to ``n`` bytes from our end of a ``stdio_pair`` (``os.read``'s errors: a
    non-blocking end with nothing to read raises BlockingIOError).

    Where the kernel can't refuse descriptors (before 6.16), one the other side sends
    arrives with its byte, and a plain read would drop it here: if that was its last
    reference, its release runs in this thread and can sleep uninterruptibly on a lock the
    sender holds (a pipe's end it splices into), and this thread with it (red team of
    session 31). So the read takes them, and a thread of their own closes them."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, fd)  # (no probing)
    try:
        data, ancdata, _flags, _addr = sock.recvmsg(n, _RIGHTS_ROOM, _socket.MSG_CMSG_CLOEXEC)
    finally:
        sock.detach()
    taken = [
        int.from_bytes(item[i : i + 4], sys.byteorder, signed=True)
        for level, kind, item in ancdata
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS
        for i in range(0, len(item) - len(item) % 4, 4)
    ]
    if taken:
        _close_aside(taken)
    return data


# Descriptors a closer thread could not be had for yet (the process at its thread or pids
# limit: a runtime can fill its cage's pids.max), closed with the next that can.
_parked: list[int] = []
# hive-priv's relay reads two streams in two threads: without it both could take the same
# parked descriptors and close them twice (the second close hitting a reused number).
_parked_lock = _thread.allocate_lock()
PARKED_MAX = 256  # past this, closed here after all: the descriptor table is finite too


def _close_aside(fds: list[int]) -> None:
    # Here, not at the top: init imports this module before it forks the harness, and
    # threading (with collections and functools) would be every cage's cold start.
    import threading

    with _parked_lock:
        fds = _parked + fds
        _parked.clear()
        try:
            threading.Thread(target=_close_all, args=(fds,), daemon=True).start()
            return
        except RuntimeError:  # "can't start new thread" (re-check of session 31)
            if len(fds) <= PARKED_MAX:
                _parked.extend(fds)
                return
    _close_all(fds)  # (out of the lock: this close may wait)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


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
    descriptors: bool = False,
) -> socket.socket:
    """A listening AF_UNIX stream socket at ``path`` with this owner and mode; its
    connections refuse descriptors (``refuse_descriptors``) unless ``descriptors``: the
    hive's protocols carry none but on priv.sock and egress-handover.sock."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not descriptors:
            refuse_descriptors(sock)
        bind_socket(sock, path, uid=uid, gid=gid, mode=mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock

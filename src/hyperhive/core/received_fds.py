"""Descriptors an agent handed the core, let go of without waiting (runs in hive-core).

Closing the last reference to a TCP socket whose sender set ``SO_LINGER`` (on, with a long
time) and filled its send queue makes the close wait until the peer reads, for as long as
the linger says. The core is the last holder of whatever it received and did not keep,
including what waits unread in a unix connection it closes and what a read without room
for it discards (the kernel lets go of those in the closing or reading thread). A pair's
two ends sent together waited for each other in the core's thread forever (re-check of
session 28: the agent's egress slots and root's page pair end kept for the core's
lifetime).

So a received descriptor that is not kept is closed here (``close_received``: a TCP
socket reset first, linger 0 s and disconnected, so that a socket in CLOSE waits for
nothing), and everything else that may let go of what an agent sent runs ``watched``: a
unix connection's close (``let_go``), a listener's with its backlog (``close_listener``),
a served client's (``close_client``), a read that drops what it has no room for. What no
reset reaches (a unix socket received in turn holds a queue of its own; a sender that
keeps a copy can race the reset: set its linger again, close its copy first) is cut
short: a thread still at it after ``PATIENCE`` s is sent ``WAKE`` every ``NUDGE_EVERY`` s
until it is done. A linger's wait (the kernel's ``sk_stream_wait_close``) ends at a
pending signal; the socket is orphaned and the kernel finishes it. One close (or read)
lets go of all it drops in one run of the thread's deferred work, with the signal
pending throughout: one nudge ends every wait among them, however many (a connection's
queue of 200 messages, each a nest: 0.1 s). Closed one by one, each took a nudge of its
own, 20 ms: so nothing here reads a queue to close what it holds.

No signal ends an uninterruptible sleep: a pipe's last close takes the pipe's lock, which
a cage process holds for as long as it likes while it ``splice``s into the pipe from a
socket nobody writes to (red team of session 29: the agent's slots and drop thread held,
a parked handover in flight, for as long as the cage lived). Only the holder's death ends
that, and only a process of the agent's own cage can hold it: a thread that has been
letting go for ``STUCK_AFTER`` s and sleeps uninterruptibly (``D`` in its
``/proc/self/task/<tid>/stat``) is reported once to ``when_stuck``'s callback with the
agent it acts for (``acting_for``), and hive-core restarts that agent's cage.

``arm`` installs the no-op handler and starts the watchdog; ``hive-core`` calls it at
start-up, in its main thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: the close resets, never waits
_NO_LINGER = struct.pack("ii", 0, 0)  # SO_LINGER off: the close sends FIN, never waits

PATIENCE = 0.1  # s a thread may take to let go before the watchdog nudges it
STUCK_AFTER = 1.0  # s letting go, asleep uninterruptibly, before its agent is reported
NUDGE_EVERY = 0.02  # s between nudges (one that lands before the wait is lost)
# Ignored by default, so a stray one (a TCP socket's urgent data to its owner: the core
# sets no owner) costs nothing; with the handler installed it ends a wait, nothing else.
WAKE = signal.SIGURG

_libc = ctypes.CDLL(None, use_errno=True)


class _Watchdog:
    """Threads letting go of what an agent handed over: since when (monotonic), their
    kernel thread id, and the agent they act for."""

    def __init__(self) -> None:
        self.armed = False
        self.nudges = 0  # signals sent (for the logs and the tests)
        self.on_stuck: Callable[[str], object] | None = None
        self._since: dict[int, float] = {}
        self._depth: dict[int, int] = {}
        self._native: dict[int, int] = {}
        self._owner: dict[int, str | None] = {}
        self._told: set[int] = set()  # reported once a registration
        self._changed = threading.Condition()

    def enter(self, ident: int, owner: str | None) -> None:
        with self._changed:
            depth = self._depth.get(ident, 0)
            self._depth[ident] = depth + 1
            if depth == 0:
                self._since[ident] = time.monotonic()
                self._native[ident] = threading.get_native_id()
                self._owner[ident] = owner
                self._changed.notify()

    def leave(self, ident: int) -> None:
        with self._changed:
            depth = self._depth.pop(ident) - 1
            if depth:
                self._depth[ident] = depth
            else:
                del self._since[ident], self._native[ident], self._owner[ident]
                self._told.discard(ident)

    def run(self) -> None:
        while True:
            stuck: list[str] = []
            with self._changed:
                while not self._since:
                    self._changed.wait()
                now = time.monotonic()
                overdue = [i for i, t in self._since.items() if now - t >= PATIENCE]
                first = min(self._since.values())
                # Under the lock: a thread still registered is alive (it waits here to
                # leave), and a dead thread's id must never be signalled.
                for ident in overdue:
                    with contextlib.suppress(OSError):
                        signal.pthread_kill(ident, WAKE)
                        self.nudges += 1
                    owner = self._owner[ident]
                    if (
                        owner is not None
                        and ident not in self._told
                        and now - self._since[ident] >= STUCK_AFTER
                        and _uninterruptible(self._native[ident])
                    ):
                        self._told.add(ident)
                        stuck.append(owner)
            for owner in stuck:  # outside the lock: the callback may take it
                try:
                    if self.on_stuck is not None:
                        self.on_stuck(owner)
                except Exception:  # told again at the next look
                    with self._changed:
                        self._told.difference_update(
                            i for i, o in self._owner.items() if o == owner
                        )
            time.sleep(NUDGE_EVERY if overdue else max(0.0, first + PATIENCE - now))


def _uninterruptible(native_id: int) -> bool:
    """Whether this process's thread ``native_id`` sleeps uninterruptibly (state D)."""
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"D"


_watchdog = _Watchdog()


def arm() -> None:
    """Install ``WAKE``'s no-op handler and start the watchdog (from the main thread, as
    Python's ``signal.signal`` requires). Idempotent."""
    if _watchdog.armed:
        return
    signal.signal(WAKE, lambda _signum, _frame: None)
    threading.Thread(target=_watchdog.run, name="received-fds-watchdog", daemon=True).start()
    _watchdog.armed = True


def nudges() -> int:
    """Signals the watchdog has sent so far."""
    return _watchdog.nudges


def held_by() -> set[str]:
    """The agents some thread is letting go of something for right now."""
    with _watchdog._changed:
        return {o for o in _watchdog._owner.values() if o is not None}


def wait_idle(seconds: float) -> bool:
    """Wait up to ``seconds`` for every letting go on behalf of an agent to end; whether
    they all did."""
    deadline = time.monotonic() + seconds
    while held_by():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def when_stuck(callback: Callable[[str], object] | None) -> None:
    """``callback(agent)``, from the watchdog's thread, once for each letting go on behalf
    of ``agent`` found asleep uninterruptibly after STUCK_AFTER s (a lock its cage holds)."""
    _watchdog.on_stuck = callback


_acting = threading.local()


@contextlib.contextmanager
def acting_for(agent: str) -> Iterator[None]:
    """This thread lets go of what ``agent`` handed over (``when_stuck`` names it)."""
    before = getattr(_acting, "agent", None)
    _acting.agent = agent
    try:
        yield
    finally:
        _acting.agent = before


@contextlib.contextmanager
def watched() -> Iterator[None]:
    """This thread lets go of something an agent handed over (or could have): past
    ``PATIENCE`` s the watchdog interrupts its waits. Nests; free when not armed."""
    if not _watchdog.armed:
        yield
        return
    ident = threading.get_ident()
    _watchdog.enter(ident, getattr(_acting, "agent", None))
    try:
        yield
    finally:
        _watchdog.leave(ident)


class _SockaddrUnspec(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("data", ctypes.c_char * 14)]


def _inet_stream(fd: int) -> bool:
    try:
        probe = socket.socket(fileno=fd)
    except OSError:  # ENOTSOCK: no socket
        return False
    try:
        return (
            probe.family in (socket.AF_INET, socket.AF_INET6) and probe.type == socket.SOCK_STREAM
        )
    finally:
        probe.detach()


def _reset_and_close(fd: int) -> None:
    """A TCP socket closed at once: reset, and disconnected (``connect`` with AF_UNSPEC)."""
    sock = socket.socket(fileno=fd)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    address = _SockaddrUnspec(socket.AF_UNSPEC)
    _libc.connect(fd, ctypes.byref(address), ctypes.sizeof(address))  # errors: closed anyway
    sock.close()


def close_received(fds: list[int]) -> None:
    """Close descriptors received and not kept: all but TCP sockets first (the sender's
    peer of a lingering socket among them goes before that socket does), then each TCP
    socket reset. Never raises."""
    with watched():
        streams = []
        for fd in fds:
            if _inet_stream(fd):
                streams.append(fd)
            else:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for fd in streams:
            with contextlib.suppress(OSError):
                _reset_and_close(fd)


def let_go(conn: socket.socket) -> None:
    """Close a unix connection that may hold descriptors in its queue (a handover's),
    watched: its close drops them in this thread, in one run. Never raises."""
    with watched(), contextlib.suppress(OSError):
        conn.close()


def close_listener(listener: socket.socket) -> None:
    """Close a listener that takes descriptors: its backlog's connections, and what their
    peers queued, go with it in this thread, watched."""
    with watched():
        listener.close()


def close_client(sock: socket.socket) -> None:
    """Close a connection the core served (a handed-over TCP client's last close): linger
    off first, so that a sender's SO_LINGER can't make the close wait for its peer (one
    that races to set it again is cut short: ``watched``)."""
    with watched():
        if sock.fileno() >= 0 and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
        sock.close()

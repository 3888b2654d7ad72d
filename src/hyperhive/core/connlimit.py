"""How many connections one peer uid may hold open on one listening socket.

Each listener has its own ``ConnectionLimiter`` (agent.sock takes the budgeted
``[limits] agent_connections``). Without a bound, an agent holding thousands of idle
connections to its own ``agent.sock`` used up the core's file descriptors (and, with a
partial line on each, its memory), and with them every other agent's and the operator's.
Root is not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from hyperhive.logthrottle import LogThrottle

log = logging.getLogger("hive.core")
MAX_CONNECTIONS_PER_PEER = 32  # the default, per listening socket and peer uid
REFUSAL_LOG_EVERY = 10.0  # seconds: at most one warning per listener and uid in this long


class ConnectionLimiter:
    def __init__(self, where: str, cap: int = MAX_CONNECTIONS_PER_PEER) -> None:
        self.where = where  # for the log: the socket's path
        self.cap = cap
        self._open: dict[int, int] = {}  # peer uid -> connections open now
        self._refusal_log: LogThrottle[int] = LogThrottle(REFUSAL_LOG_EVERY, self._log_refused)

    def claim(self, uid: int) -> bool:
        """Count one more connection from ``uid``; False (and nothing counted) at the cap."""
        if uid == 0:
            return True
        if self._open.get(uid, 0) >= self.cap:
            self._refusal_log.event(uid)
            return False
        self._open[uid] = self._open.get(uid, 0) + 1
        return True

    def _log_refused(self, uid: int, refused: int) -> None:
        log.warning(
            "%s: refused %d connection(s) from uid %d: it has %d open",
            self.where,
            refused,
            uid,
            self.cap,
        )

    def refusal(self, uid: int) -> str:
        """The one line a connection over the cap gets before it is closed."""
        return (
            f"too many connections: uid {uid} may have at most {self.cap} open"
            " on this socket at once; closing connection"
        )

    def release(self, uid: int) -> None:
        if uid == 0:
            return
        left = self._open.get(uid, 0) - 1
        if left > 0:
            self._open[uid] = left
        else:
            self._open.pop(uid, None)

    def open_for(self, uid: int) -> int:
        return self._open.get(uid, 0)


ACCEPT_RETRY = 1.0  # seconds a listener rests after accept(2) failed for want of a resource


def rest_listener(
    loop: asyncio.AbstractEventLoop,
    listener: socket.socket,
    resume: Callable[[], None],
    where: str,
    error: OSError,
) -> None:
    """Stop watching ``listener`` for ``ACCEPT_RETRY`` seconds after ``accept`` failed
    (EMFILE, ENFILE, ENOBUFS, ENOMEM): the connection stays queued in the kernel, so a
    level-triggered reader would otherwise be called again at once, forever, logging each
    time and starving every other agent's socket. ``resume`` watches it again (it checks
    that the listener still serves). asyncio's own servers do the same."""
    log.warning("%s: accept failed (%s); accepting again in %.0f s", where, error, ACCEPT_RETRY)
    with contextlib.suppress(ValueError, OSError):  # closed meanwhile
        loop.remove_reader(listener.fileno())
    loop.call_later(ACCEPT_RETRY, resume)

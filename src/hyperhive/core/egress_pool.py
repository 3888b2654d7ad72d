"""Idle upstream connections of TLS-terminated egress (core/egress_tls.py), kept a short
while for the same agent's next connection to the same destination.

A cage's client that opens a fresh connection per request (a CLI run per call, most
scripts) would otherwise cost the upstream a TCP connect and a TLS handshake each time,
two round trips to the real server. A connection is kept only if its last exchange
ended cleanly (both sides' h11 at a message boundary, nothing unread), only for
``IDLE_REUSE`` seconds (below the 5 s keep-alive timeout of the most impatient common
servers, Node's and Apache's), only for the agent whose connection made it and the
``host:port`` whose certificate it verified, and only if its address is still one the
destination's fresh check allows. One that has anything to read when taken (the server
closed it, or sent bytes nobody asked for) is closed, never used. At most ``per_agent``
are kept per agent (``PER_AGENT``, or the agent's ``[egress] max_connections`` if fewer:
the core's descriptor budget counts them, core/budget.py), none holds a thread.
"""

from __future__ import annotations

import select
import ssl
import threading
import time
from dataclasses import dataclass

from hyperhive.wire.egress import IPAddress

IDLE_REUSE = 2.0
PER_AGENT = 4


def pool_size(max_connections: int) -> int:
    """Idle connections kept per agent: PER_AGENT, or its tunnels' cap if fewer."""
    return min(PER_AGENT, max_connections)


@dataclass(frozen=True)
class Idle:
    host: str
    port: int
    sock: ssl.SSLSocket
    address: IPAddress
    since: float  # time.monotonic() of its last exchange


def _readable(sock: ssl.SSLSocket) -> bool:
    if sock.pending():
        return True
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(p.poll(0))


class UpstreamPool:
    def __init__(self, per_agent: int = PER_AGENT) -> None:
        self.per_agent = per_agent
        self._lock = threading.Lock()
        self._idle: dict[str, list[Idle]] = {}  # by agent, oldest first

    def take(
        self, agent: str, host: str, port: int, addresses: list[IPAddress]
    ) -> tuple[ssl.SSLSocket, IPAddress] | None:
        """The newest idle connection of ``agent``'s to ``host:port`` at one of
        ``addresses`` (just checked), or None."""
        now = time.monotonic()
        found: Idle | None = None
        stale: list[Idle] = []
        with self._lock:
            keep: list[Idle] = []
            for e in reversed(self._idle.get(agent, [])):
                if now - e.since > IDLE_REUSE:
                    stale.append(e)
                elif found is None and (e.host, e.port) == (host, port) and e.address in addresses:
                    found = e
                else:
                    keep.append(e)
            self._idle[agent] = keep[::-1]
        for e in stale:
            e.sock.close()
        if found is None:
            return None
        if _readable(found.sock):
            found.sock.close()
            return None
        return found.sock, found.address

    def give(self, agent: str, entry: Idle) -> None:
        with self._lock:
            entries = self._idle.setdefault(agent, [])
            entries.append(entry)
            evicted = entries[: -self.per_agent]
            del entries[: -self.per_agent]
        for e in evicted:
            e.sock.close()

    def sweep(self) -> None:
        """Close every connection idle too long (the proxy calls this a little after
        each give, so none outlives its time by much)."""
        now = time.monotonic()
        stale: list[Idle] = []
        with self._lock:
            for agent, entries in self._idle.items():
                stale += [e for e in entries if now - e.since > IDLE_REUSE]
                self._idle[agent] = [e for e in entries if now - e.since <= IDLE_REUSE]
        for e in stale:
            e.sock.close()

    def drop(self, agent: str) -> None:
        with self._lock:
            entries = self._idle.pop(agent, [])
        for e in entries:
            e.sock.close()

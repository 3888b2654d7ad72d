"""Per-agent rate limits: on what an agent pushes at others (send, ask,
request_approval), a token bucket per agent, refused with the wait in the error; and on
the bytes an agent's connections send the core, paced (reading waits) rather than refused."""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimited(Exception):
    """One line: the limit and when to retry."""


class TokenBuckets:
    def __init__(
        self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_second = per_second
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # agent -> (tokens, at)

    def take(self, agent: str) -> None:
        """A token of ``agent``'s, or RateLimited (one line, with when to retry)."""
        if (wait := self.wait(agent)) > 0:
            raise RateLimited(
                f"rate limit: an agent may send, ask or request at most {self.per_second:g}/s"
                f" (burst {self.burst}); retry in {wait:.2f} s"
            )

    def wait(self, agent: str) -> float:
        """0 if a token of ``agent``'s was taken now, else the seconds until one will be."""
        if self.per_second <= 0:
            return 0.0  # 0 turns the limit off
        now = self.clock()
        tokens, at = self._buckets.get(agent, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.per_second)
        if tokens < 1.0:
            self._buckets[agent] = (tokens, now)
            return (1.0 - tokens) / self.per_second
        self._buckets[agent] = (tokens - 1.0, now)
        return 0.0

    def forget(self, agent: str) -> None:
        self._buckets.pop(agent, None)


# What any line costs the core's event loop besides its bytes, as bytes of the pacer's
# bucket: reading it, dispatching it and writing its reply took ~16 µs of the core's CPU
# for a 24-byte ack that changed nothing (bench/run.py, the empty-ack flood), what
# decoding ~2 KiB of JSON takes. Charged per line, it bounds the requests an agent makes
# past its burst (8 MiB/s: 4,096 a second), whatever they are (red team cheap-verb-flood).
LINE_COST_BYTES = 2048
# What a container (``[`` or ``{``) of a long line costs besides its bytes: decoding walks
# each one in Python (framing.depth), ~0.5 us, what ~64 bytes of the bucket stand for (red
# team round 23a: a 1 MiB line of 350,000 empty lists cost the loop ~45 times its bytes'
# worth; the re-check: 4 KiB lines of 1,360 empty objects, as costly). Counted in every
# line (``bytes.count``, C speed) past CONTAINERS_FREE, which its LINE_COST_BYTES pays for.
CONTAINER_COST_BYTES = 64
CONTAINERS_FREE = 16
# A reply's bytes past this are taken from its agent's bucket: reading and writing them
# cost the loop in proportion (red team round 23a: a 21-byte ``loose_ends`` built 3.8 MB).
REPLY_FREE_BYTES = 4096
# An ack's ids past IDS_FREE are each taken from the bucket as ID_COST_BYTES: each is
# looked up (~0.6 us of the loop), past what its few bytes pay for (red team round 23a:
# acks of 10,000 ids not its own held ~0.75 of a CPU for as long as an agent kept at it).
IDS_FREE = 64
ID_COST_BYTES = 96


def line_cost(line: bytes) -> int:
    """What a request line takes from its agent's bucket (with LINE_COST_BYTES, added by
    ``BytePacer.debt``): its bytes, and its containers past CONTAINERS_FREE."""
    containers = line.count(b"[") + line.count(b"{")
    if containers <= CONTAINERS_FREE:
        return len(line)
    return len(line) + CONTAINER_COST_BYTES * (containers - CONTAINERS_FREE)


class BytePacer:
    """Paces the request bytes one agent sends on all its connections together: decoding
    and checking a request costs the core's one event loop time in proportion to its size,
    so an agent writing as fast as it can would slow every other socket. Each line counts
    its size plus ``LINE_COST_BYTES`` (what any request costs, small or not: the cheap
    verbs are as many requests as an agent can write), and a long line its containers
    (``line_cost``); a reply's bytes past REPLY_FREE_BYTES are taken too (``charge``).
    Past ``burst`` bytes, reading its next line waits until the bucket refills at
    ``per_second``; nothing is refused, and a request never waits more than its own cost's
    worth and what its replies took beyond the debt its connection may run up first
    (``jsonlines.PACE_SLACK``, 10 ms). 0 turns it off."""

    def __init__(
        self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_second = per_second
        self.burst = float(burst)
        self.clock = clock
        self._tokens, self._at = float(burst), clock()

    def debt(self, nbytes: int) -> float:
        """Take a line of ``nbytes`` (and ``LINE_COST_BYTES``) from the bucket; the seconds
        to wait before handling it."""
        if self.per_second <= 0:
            return 0.0
        now = self.clock()
        refilled = min(self.burst, self._tokens + (now - self._at) * self.per_second)
        self._tokens = refilled - nbytes - LINE_COST_BYTES
        self._at = now
        return max(0.0, -self._tokens / self.per_second)

    def charge(self, nbytes: int) -> None:
        """Take ``nbytes`` from the bucket, no line's cost with them (a reply's bytes past
        REPLY_FREE_BYTES): the agent's next line, on any of its connections, waits for it."""
        if self.per_second <= 0:
            return
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_second) - nbytes
        self._at = now

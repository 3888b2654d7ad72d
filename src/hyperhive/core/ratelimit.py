"""Per-agent rate limit on what an agent pushes at others (send, ask,
request_approval): a token bucket per agent, refused with the wait in the error."""

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
        if self.per_second <= 0:
            return  # 0 turns the limit off
        now = self.clock()
        tokens, at = self._buckets.get(agent, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.per_second)
        if tokens < 1.0:
            self._buckets[agent] = (tokens, now)
            wait = (1.0 - tokens) / self.per_second
            raise RateLimited(
                f"rate limit: an agent may send, ask or request at most {self.per_second:g}/s"
                f" (burst {self.burst}); retry in {wait:.2f} s"
            )
        self._buckets[agent] = (tokens - 1.0, now)

    def forget(self, agent: str) -> None:
        self._buckets.pop(agent, None)

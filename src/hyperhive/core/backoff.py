"""How long hive-core waits before starting again a cage it restarted to end a hold
(``Hive.cage_holds_a_close``: a process of the cage holds a lock a core thread sleeps on).

The stop is never delayed (only the holder's death ends the wait); the start is. An agent
that re-arms the hold after each start was restarted ~48 times a minute, each a log
line, an ``agent_status`` event and a cage start (re-check of session 29). Now the first
``free`` restarts in ``window`` seconds start at once, and each one after waits twice as
long as the one before (2 s, 4 s, ...), at most ``max_delay``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

FREE = 3  # restarts in a row that start again at once
WINDOW = 600.0  # seconds without a restart that end a row
MAX_DELAY = 300.0  # seconds, at most, between a stop and the start after it


class RestartBackoff:
    def __init__(
        self,
        free: int = FREE,
        window: float = WINDOW,
        max_delay: float = MAX_DELAY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free, self.window, self.max_delay, self.clock = free, window, max_delay, clock
        self._rows: dict[str, tuple[int, float]] = {}  # name -> (restarts in a row, last start)

    def next_delay(self, name: str) -> float:
        """Seconds to wait before this restart's start, and note that start. A row ends
        after ``window`` seconds without one (counted from the last start), so an agent
        that keeps re-arming the hold stays at ``max_delay``."""
        now = self.clock()
        count, last = self._rows.get(name, (0, now))
        count = 1 if now - last > self.window else count + 1
        over = count - self.free
        delay = 0.0 if over <= 0 else min(self.max_delay, 2.0 ** min(over, 30))
        self._rows[name] = (count, now + delay)
        return delay

    def forget(self, name: str) -> None:
        self._rows.pop(name, None)

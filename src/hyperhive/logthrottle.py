"""At most one log line per key in a while, with how many were held back.

A refusal a hostile peer can cause at will (a connection over its cap, a stranger's uid
on an agent's socket) must not write a line each: thousands a second fill the disk and
hit journald's per-unit rate limit, which then drops the lines that matter, the record of
what the hive did (red team round 16). The first event of a key is reported at once; the
rest of its period are counted and reported when the period ends (a timer thread, only
while something is held), so a burst that stops is still told whole (red team round 21:
with the count carried only by the key's next event, 1,001 refusals that then stopped
read as one). Thread-safe: hive-priv and the egress proxy refuse on threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
MAX_KEYS = 4096  # keys remembered at once; beyond, those quiet for a whole period go


class LogThrottle(Generic[K]):
    def __init__(self, every: float, report: Callable[[K, int], None]) -> None:
        """``report(key, n)`` writes the line: ``n`` events of ``key`` since its last."""
        self.every = every
        self._report = report
        self._lock = threading.Lock()
        self._logged_at: dict[K, float] = {}
        self._held: dict[K, int] = {}  # events of the key since its last line
        self._timer: threading.Timer | None = None

    def event(self, key: K) -> None:
        """One more event of ``key``: reported now if its last line is a period old, else
        counted and reported when the period ends."""
        now = time.monotonic()
        with self._lock:
            held = self._held.get(key, 0) + 1
            last = self._logged_at.get(key)
            if last is not None and now - last < self.every:
                self._held[key] = held
                self._arm(now)
                return
            if len(self._logged_at) >= MAX_KEYS:
                self._forget_quiet(now)
            self._logged_at[key] = now
            self._held.pop(key, None)
        self._report(key, held)

    def flush(self) -> None:
        """Report every key whose period has ended with events held (the timer's work)."""
        now = time.monotonic()
        due: list[tuple[K, int]] = []
        with self._lock:
            self._timer = None
            for key, held in list(self._held.items()):
                if now - self._logged_at[key] >= self.every:
                    due.append((key, held))
                    self._logged_at[key] = now
                    del self._held[key]
            if self._held:
                self._arm(now)
        for key, held in due:
            self._report(key, held)

    def _arm(self, now: float) -> None:
        """A timer for the earliest held key's end of period, unless one is set (lock held)."""
        if self._timer is not None:
            return
        first = min(self._logged_at[k] for k in self._held)
        timer = threading.Timer(max(0.0, first + self.every - now), self.flush)
        timer.daemon = True
        try:
            timer.start()
        except RuntimeError:  # no thread to be had (TasksMax): the key's next event tells
            return
        self._timer = timer

    def _forget_quiet(self, now: float) -> None:
        """Keys with nothing held and no line for a period (lock held)."""
        quiet = [
            k for k, at in self._logged_at.items() if now - at >= self.every and k not in self._held
        ]
        for k in quiet:
            del self._logged_at[k]

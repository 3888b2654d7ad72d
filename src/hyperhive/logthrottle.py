"""At most one log line per key in a while, with how many were held back.

A refusal a hostile peer can cause at will (a connection over its cap, a stranger's uid
on an agent's socket) must not write a line each: thousands a second fill the disk and
hit journald's per-unit rate limit, which then drops the lines that matter, the record of
what the hive did (red team round 16). Thread-safe: hive-priv and the egress proxy
refuse on threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
MAX_KEYS = 4096  # keys remembered at once; beyond, those quiet for a whole period go


class LogThrottle(Generic[K]):
    def __init__(self, every: float) -> None:
        self.every = every
        self._lock = threading.Lock()
        self._logged_at: dict[K, float] = {}
        self._held: dict[K, int] = {}  # events of the key since its last line

    def count(self, key: K) -> int:
        """One more event of ``key``: how many to report in a line now (this one and
        those held back since the key's last line), or 0 to stay quiet."""
        now = time.monotonic()
        with self._lock:
            held = self._held.get(key, 0) + 1
            if now - self._logged_at.get(key, now - self.every) < self.every:
                self._held[key] = held
                return 0
            if len(self._logged_at) >= MAX_KEYS:
                self._forget_quiet(now)
            self._logged_at[key] = now
            self._held.pop(key, None)
            return held

    def _forget_quiet(self, now: float) -> None:
        quiet = [k for k, at in self._logged_at.items() if now - at >= self.every]
        for k in quiet:
            del self._logged_at[k]
            self._held.pop(k, None)

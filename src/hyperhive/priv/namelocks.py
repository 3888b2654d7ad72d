"""One lock per agent name, for as long as a request holds or waits for it.

The core may name any number of agents (``stop`` of a name nobody has is fine), so
hive-priv must not keep a lock for every name it was ever asked about: root's memory
would grow without bound. An entry goes when its last request does.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class NameLocks:
    def __init__(self) -> None:
        self._entries: dict[str, tuple[threading.Lock, int]] = {}  # name -> (lock, users)
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._entries.get(name, (threading.Lock(), 0))
            self._entries[name] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                _, users = self._entries[name]
                if users > 1:
                    self._entries[name] = (lock, users - 1)
                else:
                    del self._entries[name]

    def held(self, name: str) -> bool:
        with self._guard:
            entry = self._entries.get(name)
        return entry is not None and entry[0].locked()

    def __len__(self) -> int:
        with self._guard:
            return len(self._entries)

"""Stable per-agent ids, allocated and kept by hive-priv (the core can't pick them).

Each agent gets a block of two uids from a range no host account uses: the
runtime's uid (= the agent's gid) and the harness's uid (primary gid the same, so
both can reach the agent's socket; distinct uids, so the runtime can't signal
or ptrace the harness)."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

BASE_UID = 200_000
BLOCK = 2
MAX_AGENTS = 30_000


@dataclass(frozen=True)
class AgentIds:
    uid: int  # the runtime (the agent itself)
    gid: int  # the agent's group: runtime and harness
    harness_uid: int


class IdAllocator:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def _load(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads(self.path.read_text()).items()}
        except FileNotFoundError:
            return {}

    def _save(self, table: dict[str, int]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, sort_keys=True))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    @staticmethod
    def _ids(base: int) -> AgentIds:
        return AgentIds(uid=base, gid=base, harness_uid=base + 1)

    def get(self, name: str) -> AgentIds | None:
        base = self._load().get(name)
        return None if base is None else self._ids(base)

    def allocate(self, name: str) -> AgentIds:
        with self._lock:
            table = self._load()
            if name not in table:
                used = set(table.values())
                base = next((b for b in range(BASE_UID, BASE_UID + BLOCK * MAX_AGENTS, BLOCK) if b not in used), None)
                if base is None:
                    raise RuntimeError("no free agent ids left")
                table[name] = base
                self._save(table)
            return self._ids(table[name])

    def release(self, name: str) -> None:
        with self._lock:
            table = self._load()
            if table.pop(name, None) is not None:
                self._save(table)

    def all(self) -> dict[str, AgentIds]:
        return {n: self._ids(b) for n, b in self._load().items()}

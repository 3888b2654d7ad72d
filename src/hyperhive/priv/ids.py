"""Stable per-agent ids, allocated by hive-priv (the core can't pick them), unique on
the host and never reused.

Each agent gets a block of two ids: the runtime's uid (= the agent's gid) and the
harness's uid (primary gid the same, so both can reach the agent's socket;
distinct uids, so the runtime can't signal or ptrace the harness).

Blocks come from one host-wide registry (``/var/lib/hyperhive/ids``), shared by
every hive on the host and taken under an exclusive ``flock``: two hives never hand
out the same uid. The registry keeps a high-water mark and only moves it up, so a
destroyed agent's uid is never given to a later agent (whatever the old one left
behind — a file in a shared place, a kernel object keyed by uid — can't be
inherited). A block is skipped when any id in it belongs to a host account or group
(NSS) or lies in a subordinate range of ``/etc/subuid`` or ``/etc/subgid`` (a
rootless container user's range often covers 200000). Each hive also keeps its own
name -> block table in its root-only ``priv/`` directory.
"""

from __future__ import annotations

import fcntl
import grp
import json
import os
import pwd
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyperhive.priv import safefs

BASE_UID = 200_000
BLOCK = 2
LAST_UID = 2**31 - 2  # ids above 2^31 confuse too many tools
HOST_REGISTRY = Path("/var/lib/hyperhive/ids")
MAX_AGENTS_PER_HIVE = 10_000  # hive-priv's bound (the core's [limits] max_agents is at most this)
TABLE_LIMIT = 16 << 20  # ids.json holds at most MAX_AGENTS_PER_HIVE short lines: far below this
SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))


class IdsExhausted(Exception):
    """No free block of ids is left in the range."""


@dataclass(frozen=True)
class AgentIds:
    uid: int  # the runtime (the agent itself)
    gid: int  # the agent's group: runtime and harness
    harness_uid: int


def subordinate_ranges(files: Iterable[Path] = SUBID_FILES) -> list[tuple[int, int]]:
    """(first, last) of every range in /etc/subuid and /etc/subgid (``user:start:count``)."""
    out = []
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                start, count = int(parts[1]), int(parts[2])
                if count:
                    out.append((start, start + count - 1))
    return out


def host_ids() -> set[int]:
    """Every uid and gid of a host account or group, as NSS lists them."""
    return {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}


@dataclass
class HostIds:
    """What the host already uses; a function so tests can give their own."""

    accounts: Callable[[], set[int]] = host_ids
    ranges: Callable[[], list[tuple[int, int]]] = subordinate_ranges

    def free_block(self, start: int, used: set[int]) -> int:
        taken, ranges = self.accounts(), self.ranges()
        base = start
        while base + BLOCK - 1 <= LAST_UID:
            ids = range(base, base + BLOCK)
            clash = [hi for lo, hi in ranges if lo <= ids[-1] and ids[0] <= hi]
            if clash:
                base = _aligned(max(clash) + 1)
            elif any(i in taken or i in used for i in ids):
                base += BLOCK
            else:
                return base
        raise IdsExhausted(
            f"no free agent ids between {BASE_UID} and {LAST_UID}: every block is used by "
            "an agent, a host account or a subordinate id range"
        )


def _aligned(n: int) -> int:
    return BASE_UID + -(-(n - BASE_UID) // BLOCK) * BLOCK


@dataclass
class HostRegistry:
    """The host-wide record of allocated blocks: ``registry.json`` next to the lock
    file ``registry.lock``, in a root-only directory."""

    root: Path = HOST_REGISTRY
    host: HostIds = field(default_factory=HostIds)

    def _open_dir(self) -> int:
        parent = self.root.parent
        parent.mkdir(parents=True, exist_ok=True)
        anchor = safefs.open_anchor(parent)
        with safefs.opened(anchor):
            return safefs.ensure_dir(anchor, self.root.name, 0, 0, 0o700, trusted=True)

    @contextmanager
    def _locked(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """The registry's directory and table, under its exclusive lock."""
        with safefs.opened(self._open_dir()) as d:
            lock = os.open(
                "registry.lock",
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=d,
            )
            with safefs.opened(lock):
                fcntl.flock(lock, fcntl.LOCK_EX)
                raw = safefs.read_file(d, "registry.json", limit=64 << 20)
                yield d, json.loads(raw) if raw else {"next": BASE_UID, "owners": {}}

    def claim(self, owner: str) -> int:
        """A new block for ``owner`` (``state-dir:name``), above every block ever handed out."""
        with self._locked() as (d, table):
            owners: dict[str, str] = table["owners"]
            used = {int(b) + i for b in owners for i in range(BLOCK)}
            base = self.host.free_block(max(int(table["next"]), BASE_UID), used)
            owners[str(base)] = owner
            table["next"] = base + BLOCK
            safefs.write_file(d, "registry.json", json.dumps(table, sort_keys=True).encode())
            return base

    def release(self, base: int, owner: str) -> None:
        """Forget the owner; the high-water mark stays, so the block is never handed out again."""
        with self._locked() as (d, table):
            if table["owners"].get(str(base)) == owner:
                del table["owners"][str(base)]
                safefs.write_file(d, "registry.json", json.dumps(table, sort_keys=True).encode())


class IdAllocator:
    """One hive's name -> block table (``ids.json`` in its root-only ``priv/``),
    allocating through the host registry."""

    def __init__(self, priv_dir: int, hive: str, registry: HostRegistry | None = None) -> None:
        self.priv_dir = priv_dir  # a descriptor of the hive's root-only priv/ directory
        self.hive = hive
        self.registry = registry or HostRegistry()
        self._lock = threading.Lock()

    def _load(self) -> dict[str, int]:
        raw = safefs.read_file(self.priv_dir, "ids.json", limit=TABLE_LIMIT)
        try:
            return {k: int(v) for k, v in json.loads(raw).items()} if raw else {}
        except (ValueError, AttributeError) as e:
            raise IdsExhausted(
                f"state/priv/ids.json is unreadable ({e}); hive-priv wrote it, so "
                "restore it from a backup"
            ) from None

    def _save(self, table: dict[str, int]) -> None:
        safefs.write_file(self.priv_dir, "ids.json", json.dumps(table, sort_keys=True).encode())

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
                # hive-priv's own bound, whatever the core asks: the table (read whole on
                # every verb) stays small, and a core can't use up the host's id range fast.
                if len(table) >= MAX_AGENTS_PER_HIVE:
                    raise IdsExhausted(
                        f"this hive has {len(table)} agents: hive-priv keeps at most "
                        f"{MAX_AGENTS_PER_HIVE} per hive"
                    )
                table[name] = self.registry.claim(f"{self.hive}:{name}")
                self._save(table)
            return self._ids(table[name])

    def release(self, name: str) -> None:
        with self._lock:
            table = self._load()
            base = table.pop(name, None)
            if base is not None:
                self._save(table)
                self.registry.release(base, f"{self.hive}:{name}")

    def all(self) -> dict[str, AgentIds]:
        return {n: self._ids(b) for n, b in self._load().items()}

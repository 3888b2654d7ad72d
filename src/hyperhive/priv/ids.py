"""Stable per-agent ids, allocated by hive-priv (the core can't pick them), unique on
the host and never reused.

Each agent gets a block of two ids: the runtime's uid (= the agent's gid) and the
harness's uid (primary gid the same, so both can reach the agent's socket;
distinct uids, so the runtime can't signal or ptrace the harness).

Blocks come from one host-wide registry (``/var/lib/hyperhive/ids``: an SQLite
table, and the mark alone in ``registry.json`` for older versions), shared by every
hive on the host and taken under an exclusive ``flock``: two hives never hand out
the same uid. The registry keeps a high-water mark and only moves it up, so a
destroyed agent's uid is never given to a later agent (whatever the old one left
behind — a file in a shared place, a kernel object keyed by uid — can't be
inherited). A block is skipped when any id in it belongs to a host account or group
(NSS: listed, or looked up id by id, since a directory service such as sssd or LDAP
with ``enumerate = false`` answers for its users but lists none) or lies in a
subordinate range of ``/etc/subuid`` or ``/etc/subgid`` (a rootless container user's
range often covers 200000). Each hive also keeps its own
name -> block table in its root-only ``priv/`` directory.
"""

from __future__ import annotations

import fcntl
import grp
import json
import os
import pwd
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hyperhive.priv import nss, safefs

BASE_UID = 200_000
BLOCK = 2
LAST_UID = 2**31 - 2  # ids above 2^31 confuse too many tools
HOST_REGISTRY = Path("/var/lib/hyperhive/ids")
MAX_AGENTS_PER_HIVE = 10_000  # hive-priv's bound (the core's [limits] max_agents is at most this)
HELD_SKIPS_MAX = 512  # blocks one claim passes over because NSS answered for an id in them
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
    """(first, last) of every range in /etc/subuid and /etc/subgid (``user:start:count``),
    the numbers read as shadow's ``newuidmap`` reads them (``_shadow_number``); a line
    shadow would not take is skipped, as shadow skips it."""
    out = []
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            parts = line.split(":")
            if len(parts) != 3:
                continue
            start, count = _shadow_number(parts[1]), _shadow_number(parts[2])
            if start is not None and count:
                out.append((start, start + count - 1))
    return out


def _shadow_number(text: str) -> int | None:
    """A number as shadow's ``getulong`` reads it (``strtoul(s, &end, 0)``, the whole field):
    leading white space, an optional ``+`` or ``-``, then ``0x`` hexadecimal, a leading ``0`` octal,
    or decimal, ASCII digits only; None if it takes none (a reading that differed let a
    range newuidmap maps into a user namespace pass as free: red team of session 18)."""
    s = text.lstrip(" \t\n\v\f\r")
    negative = s.startswith("-")
    if s[:1] in ("+", "-"):
        s = s[1:]
    base, digits = 10, "0123456789"
    if s[:2] in ("0x", "0X"):
        base, digits, s = 16, "0123456789abcdefABCDEF", s[2:]
    elif s.startswith("0"):
        base, digits = 8, "01234567"
    if not s or any(c not in digits for c in s):
        return None
    value = int(s, base)
    if value >= 1 << 64:
        return None
    # strtoul negates a "-" number in unsigned arithmetic: "-0" is 0 (the re-check of
    # session 18), any other lies far above the agents' range.
    return (-value) % (1 << 64) if negative else value


def host_ids() -> set[int]:
    """Every uid and gid of a host account or group, as NSS lists them."""
    return {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}


CLAIM_DEADLINE = nss.LOOKUP_DEADLINE  # seconds a claim's lookups may take in all


class HostLookupFailed(IdsExhausted):
    """The host's user database (NSS) did not answer for an id: not known to be free, so
    neither handed out nor started as."""


def held_by_host(ids: Iterable[int], deadline: float = nss.LOOKUP_DEADLINE) -> bool:
    """Whether NSS knows one of ``ids`` as a uid or a gid when asked for it (all at once,
    within ``deadline``, the wait for lookup threads included: a claim holds the registry's
    lock meanwhile): a directory service may list none of its users (``getpwall``) yet
    answer for each. HostLookupFailed if it did not answer (in time)."""
    queries = [(kind, i) for i in ids for kind in ("uid", "gid")]
    try:
        names = nss.names_of(queries, deadline, slot_wait=deadline)
        return any(name is not None for name in names)
    except nss.LookupFailed as e:
        raise HostLookupFailed(f"{e}: no agent ids handed out") from None


def given_to_host(ids: Iterable[int]) -> str | None:
    """Whether the host gave one of ``ids`` to something else after the registry handed
    it out (``useradd -u``, a directory service's users, a new subordinate range), said
    in a few words; None if not. Each id looked up as a uid and as a gid, all at once;
    HostLookupFailed if the host's user database did not answer (in time)."""
    ids = sorted(set(ids))
    queries = [(kind, i) for i in ids for kind in ("uid", "gid")]
    try:
        names = nss.names_of(queries)  # at once, within nss.LOOKUP_DEADLINE
    except nss.LookupFailed as e:
        raise HostLookupFailed(f"{e}: its ids can't be checked") from None
    for (kind, i), name in zip(queries, names, strict=True):
        if name is not None:
            what = "account" if kind == "uid" else "group"
            return f"{kind} {i} is now the {what} {name!r}"
    for lo, hi in subordinate_ranges():
        if lo <= ids[-1] and ids[0] <= hi:
            return f"ids {lo}-{hi} are now a subordinate range (/etc/subuid, /etc/subgid)"
    return None


@dataclass
class HostIds:
    """What the host already uses; functions so tests can give their own."""

    accounts: Callable[[], set[int]] = host_ids
    ranges: Callable[[], list[tuple[int, int]]] = subordinate_ranges
    held: Callable[[Iterable[int], float], bool] = held_by_host

    def free_block(self, start: int, used: set[int]) -> int:
        return self.free_blocks(start, 1, used)[0]

    def free_blocks(self, start: int, count: int, used: set[int] | None = None) -> list[int]:
        """``count`` free blocks from ``start`` up: NSS's listing and the subordinate ranges
        are read once for all of them; each candidate's ids are then looked up one by one
        (``held``). WalkedFar past ``HELD_SKIPS_MAX`` blocks the lookups found held."""
        taken, ranges = self.accounts() | (used or set()), self.ranges()
        out: list[int] = []
        base, skipped = start, 0
        # One deadline for the claim's lookups in all: it holds the registry's lock, which
        # every hive's claims wait on (red team of session 19: a directory answering in
        # 3 s held a claim, and a known agent's start behind it, 15 s)
        end = time.monotonic() + CLAIM_DEADLINE
        while len(out) < count:
            base = _next_free(base, taken, ranges)
            left = end - time.monotonic()
            try:
                if left <= 0:
                    raise HostLookupFailed(
                        f"the host's user database took over {CLAIM_DEADLINE:g} s to answer"
                        f" for the ids from {start} to {base - 1}"
                    )
                held = self.held(range(base, base + BLOCK), left)
            except HostLookupFailed as e:
                # What was answered stands (re-check of session 19: a claim cut here walked
                # the same slow range again each time and never got past it): the blocks
                # found free are handed out, else the mark moves past those found held.
                if out:
                    return out
                if base == start:
                    raise
                raise ClaimCut(start, base, str(e)) from None
            if held:
                skipped += 1
                if skipped > HELD_SKIPS_MAX:
                    raise WalkedFar(start, base)
            else:
                out.append(base)
            base += BLOCK
        return out


class WalkedFar(IdsExhausted):
    """A claim found ``HELD_SKIPS_MAX`` blocks held by accounts NSS answers for but does
    not list (a directory's range): the claim stops there, and the registry's mark moves
    past what it walked, so the next claim goes on from ``upto`` (each walk is short: the
    registry's lock, and every hive's claims, wait on it)."""

    def __init__(self, start: int, upto: int) -> None:
        super().__init__(
            f"ids {start}-{upto - 1} are held by accounts of the host's user database that"
            f" it does not list (a directory's range?): no agent ids handed out this time;"
            f" the next claim goes on from {upto}"
        )
        self.upto = upto


class ClaimCut(WalkedFar):
    """A claim's lookups ran past its deadline (or the host's user database stopped
    answering) after blocks it found held: the registry's mark moves past those, as for
    WalkedFar, so the next claim goes on from ``upto``."""

    def __init__(self, start: int, upto: int, why: str) -> None:
        IdsExhausted.__init__(
            self, f"{why}: no agent ids handed out this time; the next claim goes on from {upto}"
        )
        self.upto = upto


def _next_free(base: int, taken: set[int], ranges: list[tuple[int, int]]) -> int:
    while base + BLOCK - 1 <= LAST_UID:
        ids = range(base, base + BLOCK)
        clash = [hi for lo, hi in ranges if lo <= ids[-1] and ids[0] <= hi]
        if clash:
            base = _aligned(max(clash) + 1)
        elif any(i in taken for i in ids):
            base += BLOCK
        else:
            return base
    raise IdsExhausted(
        f"no free agent ids between {BASE_UID} and {LAST_UID}: every block is used by "
        "an agent, a host account or a subordinate id range"
    )


def _aligned(n: int) -> int:
    return BASE_UID + -(-(n - BASE_UID) // BLOCK) * BLOCK


DB = "registry.db"
MARK = "registry.json"  # the high-water mark, in the format older versions read and write
HEADROOM = 64  # blocks registry.json's mark stays ahead of the table's: one rewrite per 64
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS owners (base INTEGER PRIMARY KEY, owner TEXT NOT NULL);"
)


@dataclass
class HostRegistry:
    """The host-wide record of allocated blocks, in a root-only directory, under the
    exclusive ``flock`` of ``registry.lock``:

    * ``registry.db`` (SQLite): the high-water mark and one row per block's owner.
      Indexed, so a claim writes a row, not the whole record (``registry.json`` was
      parsed and rewritten whole, with an fsync, on every claim: ~40 ms with thousands
      of owners); ``claim_many`` commits many claims at once.
    * ``registry.json``: ``{"next": <mark>, "owners": {}}``, the format an older
      hive-priv reads and writes: kept ahead of the table's mark (``_raise_json``) so
      an older version on the same host still claims above every block handed out. Owners
      found in it (a whole older registry, read once; or an older version's claims
      since) go into the table, and the mark is the higher of the two."""

    root: Path = HOST_REGISTRY
    host: HostIds = field(default_factory=HostIds)
    _db: sqlite3.Connection | None = field(default=None, init=False, repr=False)
    _dir: int = field(default=-1, init=False, repr=False)
    _mutex: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def _open_dir(self) -> int:
        parent = self.root.parent
        parent.mkdir(parents=True, exist_ok=True)
        anchor = safefs.open_anchor(parent)
        with safefs.opened(anchor):
            return safefs.ensure_dir(anchor, self.root.name, 0, 0, 0o700, trusted=True)

    def _connect(self) -> sqlite3.Connection:
        """The table, opened once per process. The directory's descriptor stays open
        with it: SQLite opens its WAL files later by the path, ``/proc/self/fd/N/…``,
        which must keep naming this directory."""
        if self._db is None:
            d = self._open_dir()
            try:
                # Created root-only before SQLite sees it (its WAL files copy this mode).
                flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                os.close(os.open(DB, flags, 0o600, dir_fd=d))
                db = sqlite3.connect(
                    f"/proc/self/fd/{d}/{DB}", isolation_level=None, check_same_thread=False
                )
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before its ids are used
                db.executescript(SCHEMA)
            except BaseException:
                os.close(d)
                raise
            self._db, self._dir = db, d
        return self._db

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        """The table, in one transaction, under the registry's exclusive lock (other
        hives' hive-priv processes, of this version or an older one)."""
        with self._mutex:
            db = self._connect()
            lock = os.open(
                "registry.lock",
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=self._dir,
            )
            with safefs.opened(lock):
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._take_json(db)
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")

    def _take_json(self, db: sqlite3.Connection) -> None:
        """Take what ``registry.json`` holds beyond the table: an older registry's owners
        (once), an older version's claims, a higher mark. Usually it holds only the
        table's own mark: a read of a few bytes."""
        raw = safefs.read_file(self._dir, MARK, limit=64 << 20)
        if not raw:
            return
        try:
            table = json.loads(raw)
            mark = int(table["next"])
            rows = [(int(b), str(o)) for b, o in table["owners"].items()]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IdsExhausted(
                f"{self.root / MARK} is unreadable ({e}): it is the record of every agent "
                "id handed out on this host; restore it from a backup"
            ) from None
        if not rows and mark == self._meta(db, "json"):
            return  # only the mark this version wrote
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT OR IGNORE INTO owners (base, owner) VALUES (?, ?)", rows)
        top = max([mark, self._mark(db), *(b + BLOCK for b, _ in rows)])
        db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('next', ?)", (top,))
        # The rows are durable before the JSON forgets them (a crash in between reads
        # them again: INSERT OR IGNORE).
        self._raise_json(db, top)
        db.execute("COMMIT")

    def _raise_json(self, db: sqlite3.Connection, used_to: int) -> None:
        """Keep registry.json's mark at or above ``used_to`` (the table's next block),
        with headroom: rewritten (an fsync) once per ``HEADROOM`` blocks, not per
        claim. An older version claims above it; the blocks in between are this
        version's to hand out. Called before the commit: a crash in between leaves a
        mark the table doesn't know, taken as an older version's (blocks skipped)."""
        if self._meta(db, "json") >= used_to:
            return
        mark = used_to + HEADROOM * BLOCK
        safefs.write_file(self._dir, MARK, json.dumps({"next": mark, "owners": {}}).encode())
        db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('json', ?)", (mark,))

    @staticmethod
    def _meta(db: sqlite3.Connection, key: str) -> int:
        row = db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _mark(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT v FROM meta WHERE k = 'next'").fetchone()
        return max(int(row[0]), BASE_UID) if row else BASE_UID

    def claim(self, owner: str) -> int:
        """A new block for ``owner`` (``state-dir:name``), above every block ever handed out."""
        return self.claim_many([owner])[0]

    def claim_many(self, owners: list[str]) -> list[int]:
        """A new block for each of ``owners``, in one commit; for the first ones only if the
        host's user database took the claim's deadline to answer for the rest."""
        if not owners:
            return []
        with self._locked() as db:
            try:
                bases = self.host.free_blocks(self._mark(db), len(owners))
            except WalkedFar as e:
                walked = e  # never handed out: the mark moves past what was walked
                db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('next', ?)", (e.upto,))
                self._raise_json(db, e.upto)
            else:  # (fewer than asked: the rest of the batch waits for the next claim)
                db.executemany(
                    "INSERT INTO owners (base, owner) VALUES (?, ?)",
                    list(zip(bases, owners[: len(bases)], strict=True)),
                )
                db.execute(
                    "INSERT OR REPLACE INTO meta (k, v) VALUES ('next', ?)", (bases[-1] + BLOCK,)
                )
                self._raise_json(db, bases[-1] + BLOCK)
                return bases
        raise walked

    def owner(self, base: int) -> str | None:
        with self._locked() as db:
            row = db.execute("SELECT owner FROM owners WHERE base = ?", (base,)).fetchone()
            return None if row is None else str(row[0])

    def release(self, base: int, owner: str) -> None:
        """Forget the owner; the high-water mark stays, so the block is never handed out again."""
        with self._locked() as db:
            db.execute("DELETE FROM owners WHERE base = ? AND owner = ?", (base, owner))


@dataclass
class _Pending:
    """One name's place in ``IdAllocator.allocate``'s next batch."""

    done: threading.Event = field(default_factory=threading.Event)
    base: int | None = None
    error: Exception | None = None


class IdAllocator:
    """One hive's name -> block table (``ids.json`` in its root-only ``priv/``),
    allocating through the host registry."""

    def __init__(self, priv_dir: int, hive: str, registry: HostRegistry | None = None) -> None:
        self.priv_dir = priv_dir  # a descriptor of the hive's root-only priv/ directory
        self.hive = hive
        self.registry = registry or HostRegistry()
        self._lock = threading.Lock()  # the table's: one writer
        self._pending_lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}  # names waiting for the next batch

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
        """``name``'s block, claimed if it has none. Concurrent calls are served in one
        batch: whoever holds the table's lock claims for every name waiting meanwhile,
        so a start-up of hundreds of agents costs a commit per batch, not per agent."""
        with self._pending_lock:
            wait = self._pending.setdefault(name, _Pending())
        with self._lock:
            if not wait.done.is_set():
                with self._pending_lock:
                    batch, self._pending = self._pending, {}
                try:
                    got = self._allocate_many(list(batch))
                except Exception as e:  # each waiting name's request fails with it
                    for p in batch.values():
                        p.error = e
                else:
                    for n, p in batch.items():
                        if isinstance(v := got[n], IdsExhausted):
                            p.error = v
                        else:
                            p.base = v
                finally:
                    for p in batch.values():
                        p.done.set()
        if wait.error is not None:
            raise wait.error
        assert wait.base is not None
        return self._ids(wait.base)

    def _allocate_many(self, names: list[str]) -> dict[str, int | IdsExhausted]:
        table = self._load()
        new = [n for n in names if n not in table]
        # hive-priv's own bound, whatever the core asks: the table (read whole on every
        # verb) stays small, and a core can't use up the host's id range fast.
        room = max(0, MAX_AGENTS_PER_HIVE - len(table))
        claimed = 0
        if new[:room]:
            bases = self.registry.claim_many([f"{self.hive}:{n}" for n in new[:room]])
            claimed = len(bases)
            table.update(zip(new[:claimed], bases, strict=True))
            self._save(table)
        full = IdsExhausted(
            f"this hive has {len(table)} agents: hive-priv keeps at most "
            f"{MAX_AGENTS_PER_HIVE} per hive"
        )
        later = IdsExhausted(
            f"the host's user database took over {CLAIM_DEADLINE:g} s to answer for a claim of"
            f" {len(new[:room])} blocks: {claimed} handed out, none for this agent yet"
            " (start it again)"
        )
        cut = set(new[claimed:room])
        return {n: table.get(n, later if n in cut else full) for n in names}

    def release(self, name: str) -> None:
        with self._lock:
            table = self._load()
            base = table.pop(name, None)
            if base is not None:
                self._save(table)
                self.registry.release(base, f"{self.hive}:{name}")

    def all(self) -> dict[str, AgentIds]:
        return {n: self._ids(b) for n, b in self._load().items()}

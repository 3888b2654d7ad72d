"""The one SQLite connection (WAL), its migrations, and the one write transaction.

Every method that changes state commits before it returns, so a response that
acknowledges a change is only sent once the change is in the database. Compound
changes (answering a question *and* delivering the answer) are one transaction.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeAlias

from hyperhive.core.store.common import StoreError
from hyperhive.core.store.schema import MIGRATIONS, apply_migration

Params: TypeAlias = Sequence[Any] | Mapping[str, Any]

# A write that rides along in every transaction its task commits (``riding``): what makes
# "this was done" commit in the same transaction as the doing (swarm/opstore.py marks a
# carried operator action applied so; a redelivery after a crash then finds it done).
Rider: TypeAlias = Callable[["Tx"], None]
# The rider, and whether it waits for the write that completes its verb (``completing``).
_RIDER: ContextVar[tuple[Rider, bool] | None] = ContextVar("hive_store_rider", default=None)
_COMPLETING: ContextVar[bool] = ContextVar("hive_store_completing", default=False)


@contextmanager
def riding(rider: Rider, at_completion: bool = False) -> Iterator[None]:
    """Within this block (this task, and tasks it starts), every ``Database.tx`` and every
    write queued to a group commit (core/groupcommit.py) also runs ``rider`` in its
    transaction, just before the commit; it must be idempotent and cheap.

    ``at_completion``: only the transactions inside a ``completing`` block: a verb with
    several steps (a destroy: the cage, then the row) says which write completes it, so
    "done" is never committed with a step that a crash could leave the later ones undone
    after (the lifecycle verbs of core/hive.py)."""
    token = _RIDER.set((rider, at_completion))
    try:
        yield
    finally:
        _RIDER.reset(token)


@contextmanager
def completing() -> Iterator[None]:
    """The writes in this block complete the verb being carried out (see ``riding``)."""
    token = _COMPLETING.set(True)
    try:
        yield
    finally:
        _COMPLETING.reset(token)


def current_rider() -> Rider | None:
    """The rider of the running task that rides a write made now, if any (a group commit
    takes it at submit time)."""
    held = _RIDER.get()
    if held is None or (held[1] and not _COMPLETING.get()):
        return None
    return held[0]


class Tx:
    """A write transaction in progress: what the repositories write through. Only
    ``Database.tx()`` makes one, for the length of its block.

    It also carries what its message rows change in ``agent_usage`` (``held``), written
    as one row per agent whose count moved, once, just before the commit
    (``flush_usage``): the message paths count in Python, not in triggers (a trigger
    cost ~17,000 instructions a row, ~6,000 of them only to be called; the 64 pairs'
    batch, each sender's next message with the ack of its last, nets to nothing)."""

    __slots__ = ("_conn", "_usage")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        # agent -> [rows, bytes, of which to the operator: rows, bytes], not yet written
        self._usage: dict[str, list[int]] = {}

    def execute(self, sql: str, params: Params = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, params: Iterable[Params]) -> sqlite3.Cursor:
        return self._conn.executemany(sql, params)

    def last_insert_rowid(self) -> int:
        """The rowid of this connection's last insert (after ``executemany`` too, where
        the cursor's ``lastrowid`` is not kept)."""
        return int(self._conn.execute("SELECT last_insert_rowid()").fetchone()[0])

    def held(self, agent: str, rows: int, nbytes: int, to_operator: bool) -> None:
        """``agent`` holds ``rows`` more messages of ``nbytes`` (fewer, if negative), to
        the operator or not: in ``agent_usage`` at this transaction's commit."""
        d = self._usage.get(agent)
        if d is None:
            self._usage[agent] = (
                [rows, nbytes, rows, nbytes] if to_operator else [rows, nbytes, 0, 0]
            )
        else:
            d[0] += rows
            d[1] += nbytes
            if to_operator:
                d[2] += rows
                d[3] += nbytes

    def flush_usage(self) -> None:
        """Write what ``held`` counted so far (before a read of ``agent_usage`` in this
        transaction, and before its commit). Upserts of differences: they commute with
        every other change to a count (the delete trigger's, swarm/quota.py's)."""
        usage = self._usage
        if not usage:
            return
        self._usage = {}
        rows = [(a, *d) for a, d in usage.items() if d[0] or d[1] or d[2] or d[3]]
        if rows:
            self._conn.executemany(USAGE_ADD, rows)

    @contextmanager
    def savepoint(self, name: str) -> Iterator[None]:
        """A nested part that an exception undoes alone (the exception goes on)."""
        self.flush_usage()  # what ``held`` counts from here on is this part's alone
        self._conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self._usage = {}  # undone with its rows
            # SQLite may have rolled back the whole transaction already (e.g. SQLITE_FULL):
            # then there is no savepoint left, and the first error is the one to report.
            if self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute(f"ROLLBACK TO {name}")
                    self._conn.execute(f"RELEASE {name}")
            raise
        self._conn.execute(f"RELEASE {name}")


# One agent's counts moved by (rows, bytes, to the operator: rows, bytes).
USAGE_ADD = (
    "INSERT INTO agent_usage (agent, pending, bytes, op_pending, op_bytes) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (agent) DO UPDATE SET pending = pending + excluded.pending,"
    " bytes = bytes + excluded.bytes, op_pending = op_pending + excluded.op_pending,"
    " op_bytes = op_bytes + excluded.op_bytes"
)


class Database:
    """Owns the connection. Reads go through ``conn`` (a read sees every commit: one
    connection, one thread); writes only through ``tx()``."""

    def __init__(self, path: Path, synchronous: str = "NORMAL") -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a crash of the process (kill -9);
        # FULL also survives power loss, at an fsync per commit.
        self.conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute("PRAGMA busy_timeout=5000")
        # Checkpoints run from a thread (see checkpoint()), not inside a request.
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        # Counts commits: what was read since the last one still holds (a cache's key).
        self.commits = 0
        self.migrate()

    def close(self) -> None:
        self.conn.close()

    def rows(self, sql: str, params: Params = ()) -> Generator[Any, None, None]:
        """A query's rows one at a time, for a caller that may stop early (a reply's byte
        budget): only the rows it takes are read. Closing the iterator ends the query."""
        cur = self.conn.execute(sql, params)
        try:
            while (row := cur.fetchone()) is not None:
                yield row
        finally:
            cur.close()

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        """One write transaction; rolled back whole on any error. A SQLite error (e.g.
        "database or disk is full" on an insert) becomes one StoreError line."""
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise StoreError(f"storage error: {e}") from None
        try:
            try:
                tx = Tx(conn)
                yield tx
                if (rider := current_rider()) is not None:
                    rider(tx)
                tx.flush_usage()
            except sqlite3.Error as e:
                self._rollback()
                raise StoreError(f"storage error: {e}") from None
            except BaseException:
                self._rollback()
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise StoreError(f"storage error: {e}") from None
        finally:
            # Committed or rolled back: a read made inside or before it may be stale now.
            self.commits += 1

    def completed(self) -> None:
        """A verb whose last step is not a store write (a stop's cage) is complete now: a
        transaction of its own for what rides its completion (``riding``), if anything
        does; nothing at all otherwise (an operator's own stop costs no commit)."""
        with completing():
            if current_rider() is None:
                return
            with self.tx():
                pass

    def _rollback(self) -> None:
        if self.conn.in_transaction:  # SQLite may already have rolled back (e.g. SQLITE_FULL)
            self.conn.execute("ROLLBACK")

    def checkpoint(self) -> None:
        """Copy the WAL into the database, on a connection of its own (call from a thread).

        Its close leaves one descriptor of hive.db open, by design (SQLite's unix VFS):
        ``conn`` holds a POSIX read lock on hive.db for as long as it is open (WAL mode),
        and closing any descriptor of a file drops every POSIX lock this process holds on
        it. So SQLite keeps the closed connection's descriptor and reuses it for the next
        connection to hive.db (this method's, a second later): one, never more, closed with
        ``conn`` (tests/test_store.py). The checkpoint stays off ``conn``: on it, a request
        would wait for the checkpoint's copying and fsync."""
        db = sqlite3.connect(self.path, timeout=5)
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        current = self.schema_version
        if current > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {current},"
                f" newer than this hive ({len(MIGRATIONS)})"
            )
        for version, migration in enumerate(MIGRATIONS[current:], start=current + 1):
            with self.tx() as tx:
                apply_migration(tx, migration)
                tx.execute(f"PRAGMA user_version={version}")
        if current < len(MIGRATIONS):
            # Migrations write many pages: leave no large WAL behind for later writes to reuse.
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

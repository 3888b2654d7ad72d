"""Egress allowlists (per agent) and the log of every egress decision."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, TypedDict

from hyperhive.core.store.common import Unreadable, readable
from hyperhive.core.store.db import Database, Tx

FAIR_WINDOW = 2000  # the newest decisions the dashboard's fair share is taken from
FAIR_EACH = 3  # and each agent's newest, when a flood fills that window
_ENTRY_SQL = (
    "SELECT id, agent, at, host, port, address, allowed, reason, bytes_up, bytes_down,"
    " closed_at FROM egress_log"
)

EGRESS_LOG_KEEP = 5_000  # decisions per agent (the default of [limits] history_keep)
EGRESS_PRUNE_EVERY = 16  # decisions of one agent between two prunes of its log


# The two row types are TypedDicts: they go out as they are, in JSON replies and events.
class EgressRule(TypedDict):
    rule: str
    source: str
    added_at: float


class EgressDecision(TypedDict):
    """One decision of the proxy, as logged."""

    agent: str
    at: float
    host: str
    port: int
    address: str | None
    allowed: bool
    reason: str
    bytes_up: int
    bytes_down: int
    closed_at: float | None


class EgressLogEntry(EgressDecision):
    id: int


def insert_rule(tx: Tx, agent: str, rule: str, source: str, now: float) -> bool:
    """Add ``rule`` to ``agent``'s allowlist (in the caller's transaction); False if there."""
    cur = tx.execute(
        "INSERT OR IGNORE INTO egress_rules (agent, rule, source, added_at) VALUES (?, ?, ?, ?)",
        (agent, rule, source, now),
    )
    return cur.rowcount == 1


def close_in(
    tx: Tx,
    rowid: int,
    bytes_up: int,
    bytes_down: int,
    closed_at: float,
    decided: tuple[bool, str] | None = None,
) -> None:
    """A logged connection ended (in the caller's transaction): its byte counts and when;
    ``decided``: what became of it, if that changed once it was open (a tunnel refused at
    its first record for fronting an L7 name was left "allowed": red team of session 15)."""
    if decided is None:
        tx.execute(
            "UPDATE egress_log SET bytes_up=?, bytes_down=?, closed_at=? WHERE id=?",
            (bytes_up, bytes_down, closed_at, rowid),
        )
    else:
        tx.execute(
            "UPDATE egress_log SET bytes_up=?, bytes_down=?, closed_at=?, allowed=?, reason=?"
            " WHERE id=?",
            (bytes_up, bytes_down, closed_at, decided[0], decided[1], rowid),
        )


class EgressRepo:
    def __init__(self, db: Database) -> None:
        self._db = db
        self.history_keep = EGRESS_LOG_KEEP  # per agent ([limits] history_keep, set by Store)
        self._since_prune: dict[str, int] = {}

    def rules(self, agent: str | None = None) -> dict[str, list[EgressRule]]:
        sql = "SELECT agent, rule, source, added_at FROM egress_rules"
        sql += (" WHERE agent=?" if agent else "") + " ORDER BY agent, rule"
        out: dict[str, list[EgressRule]] = {}
        for who, rule, source, added_at in self._db.conn.execute(sql, (agent,) if agent else ()):
            out.setdefault(who, []).append({"rule": rule, "source": source, "added_at": added_at})
        return out

    def add_rule(self, agent: str, rule: str, source: str) -> bool:
        with self._db.tx() as tx:
            return insert_rule(tx, agent, rule, source, time.time())

    def remove_rule(self, agent: str, rule: str) -> bool:
        with self._db.tx() as tx:
            sql = "DELETE FROM egress_rules WHERE agent=? AND rule=?"
            return tx.execute(sql, (agent, rule)).rowcount == 1

    def log(self, row: EgressDecision) -> int:
        """Log one decision; returns its row id (for ``close``)."""
        with self._db.tx() as tx:
            return self.log_in(tx, row)

    def log_in(self, tx: Tx, row: EgressDecision) -> int:
        """``log`` in the caller's transaction (the core's group commit: a flood of
        refusals is a few commits, not one each; red team round 22)."""
        agent = row["agent"]
        cur = tx.execute(
            "INSERT INTO egress_log (agent, at, host, port, address, allowed, reason, bytes_up,"
            " bytes_down, closed_at) VALUES (:agent, :at, :host, :port, :address, :allowed,"
            " :reason, :bytes_up, :bytes_down, :closed_at)",
            row,
        )
        rowid = int(cur.lastrowid or 0)
        # Every EGRESS_PRUNE_EVERY decisions of this agent: keep its newest history_keep,
        # so one agent's traffic can't grow the log (and hive.db) without bound.
        since = self._since_prune.get(agent, 0) + 1
        if since >= min(EGRESS_PRUNE_EVERY, self.history_keep):
            since = 0
            tx.execute(
                "DELETE FROM egress_log WHERE agent=? AND id <= (SELECT id FROM egress_log"
                " WHERE agent=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (agent, agent, self.history_keep),
            )
        self._since_prune[agent] = since
        return rowid

    def close(self, rowid: int, bytes_up: int, bytes_down: int, closed_at: float) -> None:
        """A logged connection ended: its byte counts and when."""
        with self._db.tx() as tx:
            close_in(tx, rowid, bytes_up, bytes_down, closed_at)

    def forget(self, agent: str) -> None:
        """The agent is gone: drop its prune counter."""
        self._since_prune.pop(agent, None)

    def entries(
        self, agent: str | None = None, limit: int = 100, before: int | None = None
    ) -> Iterator[EgressLogEntry | Unreadable]:
        """The newest ``limit`` decisions (of ``agent``, older than id ``before``), newest
        first, read one row at a time (the caller stops at its reply's byte budget)."""
        sql = _ENTRY_SQL
        where: list[str] = []
        args: list[object] = []
        if agent:
            where.append("agent=?")
            args.append(agent)
        if before is not None:
            where.append("id<?")
            args.append(before)
        sql += (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id DESC LIMIT ?"
        rows = self._db.rows(sql, (*args, limit))
        return (readable(_to_entry, r) for r in rows)

    def fair_recent(
        self, limit: int, window: int = FAIR_WINDOW
    ) -> list[EgressLogEntry | Unreadable]:
        """The dashboard's recent decisions of all agents, newest first: of the newest
        ``window``, ``limit`` at most, and where they hold more than ``limit``, each agent's
        newest up to one share (the largest cap that fits), so one agent's flood of refusals
        can't push every other agent's off (507 in 3 s did: red team of session 32)."""
        conn = self._db.conn
        rows = conn.execute(_ENTRY_SQL + " ORDER BY id DESC LIMIT ?", (window,)).fetchall()
        if len(rows) == window:
            # A flood fills the window: each agent not in it gets its newest few too (the
            # agents found by a seek each on egress_log_agent), or a flood longer than the
            # window pushed them all off (re-check of session 32: 2,100 of one agent's, the
            # other's gone).
            present = {r[1] for r in rows}
            name = ""
            while found := conn.execute(
                "SELECT agent FROM egress_log WHERE agent > ? ORDER BY agent LIMIT 1", (name,)
            ).fetchone():
                name = found[0]
                if name not in present:
                    rows += conn.execute(
                        _ENTRY_SQL + " WHERE agent=? ORDER BY id DESC LIMIT ?",
                        (name, FAIR_EACH),
                    ).fetchall()
            rows.sort(key=lambda r: r[0], reverse=True)
        counts: dict[Any, int] = {}
        for r in rows:
            counts[r[1]] = counts.get(r[1], 0) + 1
        cap = fair_cap(list(counts.values()), limit)
        taken: dict[Any, int] = {}
        out = []
        for r in rows:
            if taken.get(r[1], 0) < cap:
                taken[r[1]] = taken.get(r[1], 0) + 1
                out.append(readable(_to_entry, r))
                if len(out) >= limit:
                    break
        return out


def fair_cap(counts: list[int], limit: int) -> int:
    """The largest per-agent cap ``c`` with sum(min(n, c)) <= ``limit`` (at least 1)."""
    if sum(counts) <= limit:
        return max(counts, default=1)
    lo, hi = 1, max(counts)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in counts) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


_NUMBER = (int, float)
# Each column's JSON types: a row that holds anything else (a blob, a string where a count
# goes) is unreadable, not an error in the middle of a listing.
_ENTRY_TYPES: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("id", (int,)), ("agent", (str,)), ("at", _NUMBER), ("host", (str,)), ("port", (int,)),
    ("address", (str, type(None))), ("allowed", (int,)), ("reason", (str,)),
    ("bytes_up", (int,)), ("bytes_down", (int,)), ("closed_at", (*_NUMBER, type(None))),
)  # fmt: skip


def _to_entry(r: Any) -> EgressLogEntry:
    for (name, types), value in zip(_ENTRY_TYPES, r, strict=True):
        if type(value) not in types:
            raise ValueError(f"{name}: {type(value).__name__} where {types[0].__name__} goes")
    return {
        "id": r[0],
        "agent": r[1],
        "at": r[2],
        "host": r[3],
        "port": r[4],
        "address": r[5],
        "allowed": bool(r[6]),
        "reason": r[7],
        "bytes_up": r[8],
        "bytes_down": r[9],
        "closed_at": r[10],
    }

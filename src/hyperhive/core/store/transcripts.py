"""Turn transcripts, written by each agent's harness."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, TypedDict

from hyperhive.core.refusals import NotFound
from hyperhive.core.store.common import Unreadable, canonical_json, load_json, readable
from hyperhive.core.store.db import Database, Tx
from hyperhive.core.store.messages import HELD_BYTES, HOLDER

TRANSCRIPT_KEEP = 20_000  # entries per agent
TRANSCRIPT_MIB = 32  # stored bytes per agent (the default of [limits] transcript_mib)

# One entry: its stored size (kind and data, as SQLite counts them) is written beside it.
_INSERT = (
    "INSERT INTO transcript (agent, turn, kind, data, at, size)"
    " VALUES (?1, ?2, ?3, ?4, ?5, length(CAST(?3 AS BLOB)) + length(CAST(?4 AS BLOB)))"
    " RETURNING id, size"
)
_MEASURE = (
    "SELECT length(CAST(kind AS BLOB)) + length(CAST(data AS BLOB)) FROM transcript WHERE id=?"
)


class TranscriptEntry(TypedDict):
    """A TypedDict: entries go out as they are, in JSON replies and events."""

    id: int
    turn: int
    kind: str
    data: object  # the harness's JSON, parsed
    at: float


def _to_entry(r: Any) -> TranscriptEntry:
    if type(r[1]) is not int or type(r[2]) is not str or type(r[4]) not in (int, float):
        raise ValueError("turn, kind or time of the wrong type")
    return {"id": r[0], "turn": r[1], "kind": r[2], "data": load_json(r[3], "data"), "at": r[4]}


class TranscriptRepo:
    """Each agent's transcript: its newest ``keep`` entries of at most ``max_bytes`` stored
    bytes in all, trimmed oldest first in the transaction that adds (a harness that never
    ends its turn is bounded too)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.keep = TRANSCRIPT_KEEP
        self.max_bytes = TRANSCRIPT_MIB << 20  # [limits] transcript_mib, set by Store

    def add(
        self, agent: str, turn: int, entries: list[tuple[str, object]]
    ) -> list[TranscriptEntry]:
        now = time.time()
        out: list[TranscriptEntry] = []
        added = 0
        with self._db.tx() as tx:
            for kind, data in entries:
                rowid, size = tx.execute(
                    _INSERT, (agent, turn, kind, canonical_json(data), now)
                ).fetchone()
                added += size
                out.append({"id": rowid, "turn": turn, "kind": kind, "data": data, "at": now})
            self._grew(tx, agent, len(out), added)
        return out

    def finish_turn(self, agent: str, turn: int, end: dict[str, object]) -> TranscriptEntry:
        """Record the end of a turn and ack its message, in one transaction."""
        now = time.time()
        with self._db.tx() as tx:
            row = tx.execute(
                f"SELECT acked_at, {HOLDER}, {HELD_BYTES} FROM messages WHERE id=? AND recipient=?",
                (turn, agent),
            ).fetchone()
            if row is None:
                raise NotFound(f"no message {turn} in this inbox")
            rowid, size = tx.execute(
                _INSERT, (agent, turn, "exit", canonical_json(end), now)
            ).fetchone()
            if row[0] is None:
                tx.execute("UPDATE messages SET acked_at=? WHERE id=?", (now, turn))
                tx.held(row[1], -1, -row[2], agent == "operator")  # row[1]: its holder
            self._grew(tx, agent, 1, size)
        return {"id": rowid, "turn": turn, "kind": "exit", "data": end, "at": now}

    def usage(self, agent: str) -> tuple[int, int]:
        """The entries and stored bytes ``agent``'s transcript holds."""
        row = self._db.conn.execute(
            "SELECT entries, bytes FROM transcript_usage WHERE agent=?", (agent,)
        ).fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def _grew(self, tx: Tx, agent: str, entries: int, size: int) -> None:
        """Count what was added, then drop the oldest entries past either bound."""
        held, held_bytes = tx.execute(
            "INSERT INTO transcript_usage (agent, entries, bytes) VALUES (?, ?, ?)"
            " ON CONFLICT (agent) DO UPDATE SET entries = entries + excluded.entries,"
            " bytes = bytes + excluded.bytes RETURNING entries, bytes",
            (agent, entries, size),
        ).fetchone()
        over, over_bytes = held - self.keep, held_bytes - self.max_bytes
        if over <= 0 and over_bytes <= 0:
            return
        cut, dropped, freed = 0, 0, 0
        # (agent, id, size) is an index: this walk reads no entry's data (but a row from
        # before migration 14's, size -1, measured once as it goes).
        oldest = tx.execute("SELECT id, size FROM transcript WHERE agent=? ORDER BY id", (agent,))
        for rowid, entry_size in oldest:
            if dropped >= over and freed >= over_bytes:
                break
            if entry_size < 0:
                entry_size = tx.execute(_MEASURE, (rowid,)).fetchone()[0]
            cut, dropped, freed = rowid, dropped + 1, freed + entry_size
        oldest.close()
        tx.execute("DELETE FROM transcript WHERE agent=? AND id<=?", (agent, cut))
        tx.execute(
            "UPDATE transcript_usage SET entries = entries - ?, bytes = bytes - ? WHERE agent=?",
            (dropped, freed, agent),
        )

    def entries(
        self, agent: str, after: int = 0, limit: int = 500
    ) -> Iterator[TranscriptEntry | Unreadable]:
        """The newest ``limit`` entries after id ``after``, oldest first, read one row at a
        time (the caller stops at its reply's byte budget; the next batch starts after
        the last entry it took)."""
        first = self._db.conn.execute(
            "SELECT id FROM transcript WHERE agent=? AND id>? ORDER BY id DESC LIMIT 1 OFFSET ?",
            (agent, after, limit - 1),
        ).fetchone()
        start = after + 1 if first is None else first[0]
        rows = self._db.rows(
            "SELECT id, turn, kind, data, at FROM transcript WHERE agent=? AND id>=?"
            " ORDER BY id LIMIT ?",
            (agent, start, limit),
        )
        return (readable(_to_entry, r) for r in rows)

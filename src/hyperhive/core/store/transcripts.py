"""Turn transcripts, written by each agent's harness."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, TypedDict

from hyperhive.core.refusals import NotFound
from hyperhive.core.store.common import Unreadable, canonical_json, load_json, readable
from hyperhive.core.store.db import Database
from hyperhive.core.store.messages import HELD_BYTES, HOLDER

TRANSCRIPT_KEEP = 20_000  # entries per agent


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
    def __init__(self, db: Database) -> None:
        self._db = db

    def add(
        self, agent: str, turn: int, entries: list[tuple[str, object]]
    ) -> list[TranscriptEntry]:
        now = time.time()
        out: list[TranscriptEntry] = []
        with self._db.tx() as tx:
            for kind, data in entries:
                cur = tx.execute(
                    "INSERT INTO transcript (agent, turn, kind, data, at) VALUES (?, ?, ?, ?, ?)",
                    (agent, turn, kind, canonical_json(data), now),
                )
                rowid = int(cur.lastrowid or 0)
                out.append({"id": rowid, "turn": turn, "kind": kind, "data": data, "at": now})
        return out

    def finish_turn(self, agent: str, turn: int, end: dict[str, object]) -> TranscriptEntry:
        """Record the end of a turn and ack its message, in one transaction; trim old entries."""
        now = time.time()
        with self._db.tx() as tx:
            row = tx.execute(
                f"SELECT acked_at, {HOLDER}, {HELD_BYTES} FROM messages WHERE id=? AND recipient=?",
                (turn, agent),
            ).fetchone()
            if row is None:
                raise NotFound(f"no message {turn} in this inbox")
            cur = tx.execute(
                "INSERT INTO transcript (agent, turn, kind, data, at) VALUES (?, ?, 'exit', ?, ?)",
                (agent, turn, canonical_json(end), now),
            )
            if row[0] is None:
                tx.execute("UPDATE messages SET acked_at=? WHERE id=?", (now, turn))
                tx.held(row[1], -1, -row[2], agent == "operator")  # row[1]: its holder
            tx.execute(
                "DELETE FROM transcript WHERE agent=? AND id <= ("
                " SELECT id FROM transcript WHERE agent=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (agent, agent, TRANSCRIPT_KEEP),
            )
        return {"id": int(cur.lastrowid or 0), "turn": turn, "kind": "exit", "data": end, "at": now}

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

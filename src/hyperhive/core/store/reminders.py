"""Reminders: a text an agent gets as a ``reminder`` message once it is due."""

from __future__ import annotations

import time

from hyperhive.core.store.db import Database
from hyperhive.core.store.messages import REMINDER_SENDER, insert_message
from hyperhive.wire.common import Message

# One delivery transaction's bounds: a mass of reminders falling due at once is delivered
# in batches like this, the event loop serving other requests between them.
DELIVER_ROWS = 100
DELIVER_CHARS = 1 << 20  # of reminder text


class ReminderRepo:
    def __init__(self, db: Database) -> None:
        self._db = db

    def add(self, agent: str, due_at: float, text: str) -> int:
        with self._db.tx() as tx:
            cur = tx.execute(
                "INSERT INTO reminders (agent, due_at, text, created_at) VALUES (?, ?, ?, ?)",
                (agent, due_at, text, time.time()),
            )
        return int(cur.lastrowid or 0)

    def next_due(self) -> float | None:
        row = self._db.conn.execute(
            "SELECT MIN(due_at) FROM reminders WHERE delivered_at IS NULL"
        ).fetchone()
        due: float | None = row[0]
        return due

    def deliver_due(
        self, now: float, max_rows: int = DELIVER_ROWS, max_chars: int = DELIVER_CHARS
    ) -> list[Message]:
        """Turn the earliest reminders due by ``now`` into ``reminder`` messages, in one
        transaction: at most ``max_rows`` of them, and no more once ``max_chars`` of text
        is reached (always at least one). The caller asks again until it gets none back."""
        with self._db.tx() as tx:
            cur = tx.execute(
                "SELECT id, agent, text FROM reminders WHERE delivered_at IS NULL AND due_at<=?"
                " ORDER BY due_at, id",
                (now,),
            )
            due, chars = [], 0
            for row in cur:  # read lazily: a batch never holds more than its bounds
                due.append(row)
                chars += len(row[2])
                if len(due) >= max_rows or chars >= max_chars:
                    break
            cur.close()
            out = []
            for rid, agent, text in due:
                out.append(insert_message(tx, agent, REMINDER_SENDER, "reminder", text, rid))
                tx.execute("UPDATE reminders SET delivered_at=? WHERE id=?", (now, rid))
        return out

    def pending_of(self, agent: str) -> dict[str, int]:
        """``pending`` for one agent: its own rows only (the partial index
        reminders_pending). A count of the whole hive's in every status change let agents
        that filled their reminder quotas tax every other agent's and the operator's
        (2.9 ms a ``set_status`` at 20,000 reminders: red team of session 32)."""
        (n,) = self._db.conn.execute(
            "SELECT COUNT(*) FROM reminders WHERE agent=? AND delivered_at IS NULL", (agent,)
        ).fetchone()
        return {agent: n} if n else {}

    def pending(self) -> dict[str, int]:
        """How many undelivered reminders each agent has (agents with none are absent)."""
        rows = self._db.conn.execute(
            "SELECT agent, COUNT(*) FROM reminders WHERE delivered_at IS NULL GROUP BY agent"
        ).fetchall()
        return {agent: n for agent, n in rows}

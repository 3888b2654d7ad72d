"""Reminders: a text an agent gets as a ``reminder`` message once it is due."""

from __future__ import annotations

import time

from hyperhive.core.store.db import Database
from hyperhive.core.store.messages import insert_message
from hyperhive.wire.common import Message


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

    def deliver_due(self, now: float) -> list[Message]:
        """Turn every due reminder into a ``reminder`` message, in one transaction."""
        with self._db.tx() as tx:
            due = tx.execute(
                "SELECT id, agent, text FROM reminders WHERE delivered_at IS NULL AND due_at<=?"
                " ORDER BY due_at, id",
                (now,),
            ).fetchall()
            out = []
            for rid, agent, text in due:
                out.append(insert_message(tx, agent, "hive", "reminder", text, rid))
                tx.execute("UPDATE reminders SET delivered_at=? WHERE id=?", (now, rid))
        return out

    def pending(self) -> dict[str, int]:
        """How many undelivered reminders each agent has (agents with none are absent)."""
        rows = self._db.conn.execute(
            "SELECT agent, COUNT(*) FROM reminders WHERE delivered_at IS NULL GROUP BY agent"
        ).fetchall()
        return {agent: n for agent, n in rows}

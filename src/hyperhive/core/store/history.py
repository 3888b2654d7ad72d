"""Pruning: each agent's logs kept to its newest ``keep`` rows ([limits] history_keep)."""

from __future__ import annotations

from hyperhive.core.store.db import Database
from hyperhive.core.store.egress import EGRESS_LOG_KEEP

# (table, the agent's column, which rows are history: done with, safe to drop)
_LOGS = (
    ("messages", "recipient", "acked_at IS NOT NULL"),
    ("messages", "sender", "recipient = 'operator'"),
    ("questions", "asker", "(answer IS NOT NULL OR cancelled != 0)"),
    ("approvals", "agent", "status != 'pending'"),
    ("reminders", "agent", "delivered_at IS NOT NULL"),
    ("egress_log", "agent", "1"),
)


class HistoryRepo:
    def __init__(self, db: Database) -> None:
        self._db = db
        self.keep = EGRESS_LOG_KEEP  # set by Store.history_keep

    def prune(self, agent: str) -> int:
        """Keep the newest ``keep`` of each of ``agent``'s logs: messages it acked, its
        resolved questions and approvals, its delivered reminders, its egress decisions
        and its messages to the operator. Returns how many rows went.

        Read first: a log within ``keep`` (nearly every one, every minute) costs no write
        transaction. Each agent's empty prune was a commit a minute, and any commit but
        the message lane's makes every known inbox be read again (core/inboxes.py)."""
        if not any(self._past_keep(table, who, done, agent) for table, who, done in _LOGS):
            return 0
        gone = 0
        with self._db.tx() as tx:
            for table, who, done in _LOGS:
                gone += tx.execute(
                    f"DELETE FROM {table} WHERE {who}=? AND {done} AND id <= (SELECT id FROM"
                    f" {table} WHERE {who}=? AND {done} ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (agent, agent, self.keep),
                ).rowcount
        return gone

    def _past_keep(self, table: str, who: str, done: str, agent: str) -> bool:
        """Whether ``agent``'s log in ``table`` holds more than ``keep`` rows (the row the
        DELETE's subquery finds exists)."""
        row = self._db.conn.execute(
            f"SELECT 1 FROM {table} WHERE {who}=? AND {done} ORDER BY id DESC LIMIT 1 OFFSET ?",
            (agent, self.keep),
        ).fetchone()
        return row is not None

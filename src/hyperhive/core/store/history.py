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
        and its messages to the operator. Returns how many rows went."""
        gone = 0
        with self._db.tx() as tx:
            for table, who, done in _LOGS:
                gone += tx.execute(
                    f"DELETE FROM {table} WHERE {who}=? AND {done} AND id <= (SELECT id FROM"
                    f" {table} WHERE {who}=? AND {done} ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (agent, agent, self.keep),
                ).rowcount
        return gone

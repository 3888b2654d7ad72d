"""What each agent holds in the hive (its storage quota). agent_usage is kept right in
the same transaction as every change, so a check is one primary-key read: by triggers
for questions, approvals, reminders and a message's delete, by the code that inserts or
acks a message for those (``Tx.held``, store/messages.py; schema migration 9)."""

from __future__ import annotations

from typing import NamedTuple

from hyperhive.core.store.db import Database, Tx


class Usage(NamedTuple):
    """Held rows and bytes, and of those, the ones in messages to the operator."""

    rows: int
    bytes: int
    op_rows: int
    op_bytes: int


_NONE = Usage(0, 0, 0, 0)


class UsageRepo:
    def __init__(self, db: Database) -> None:
        self._db = db

    def of(self, agent: str) -> Usage:
        """What ``agent`` holds: (rows, bytes, of which to the operator: rows, bytes)."""
        row = self._db.conn.execute(
            "SELECT pending, bytes, op_pending, op_bytes FROM agent_usage WHERE agent=?", (agent,)
        ).fetchone()
        return _NONE if row is None else Usage(row[0], row[1], row[2], row[3])

    def to_operator(self) -> int:
        """How many messages to the operator the store holds: the senders' ``op_pending``
        summed (one row an agent; nothing acks a message to the operator, so each is held
        by its sender until the sender's quota drops it: tests/test_inbox_read.py checks
        the two agree). A count of the messages cost ~100 ms at 1,000,000."""
        row = self._db.conn.execute("SELECT coalesce(sum(op_pending), 0) FROM agent_usage")
        return int(row.fetchone()[0])


def make_room(tx: Tx, sender: str, need: int, quota: tuple[int, int]) -> None:
    """Delete ``sender``'s oldest messages to the operator until one more of ``need``
    bytes fits its quota (or none is left). The delete trigger keeps agent_usage right."""
    max_rows, max_bytes = quota
    while True:
        tx.flush_usage()  # this transaction's counts so far, before reading them
        row = tx.execute(
            "SELECT pending, bytes FROM agent_usage WHERE agent=?", (sender,)
        ).fetchone()
        if row is None or (row[0] + 1 <= max_rows and row[1] + need <= max_bytes):
            return
        oldest = tx.execute(
            "SELECT id FROM messages WHERE sender=? AND recipient='operator' ORDER BY id LIMIT 64",
            (sender,),
        ).fetchall()
        if not oldest:
            return
        over_rows, over_bytes = row[0] + 1 - max_rows, row[1] + need - max_bytes
        for (mid,) in oldest:
            gone = tx.execute(
                "DELETE FROM messages WHERE id=? RETURNING length(CAST(body AS BLOB))"
                " + coalesce(length(CAST(options AS BLOB)), 0)",
                (mid,),
            ).fetchone()
            over_rows -= 1
            over_bytes -= gone[0] if gone else 0
            if over_rows <= 0 and over_bytes <= 0:
                return

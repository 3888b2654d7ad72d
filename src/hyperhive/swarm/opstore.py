"""The ids of the operator actions this host took from the swarm (``swarm_ops_seen``),
so each is carried out once: a replayed action (the same signed bytes again, inside
the time an action is good for) is refused. Kept longer than an action lives
(signing.TTL_SECONDS), so a replay can never outlive its id here.

Created here (``IF NOT EXISTS``) only with ``[swarm]``, like ``swarm/outbox.py``'s tables.
"""

from __future__ import annotations

import time

from hyperhive.core.store import Database
from hyperhive.swarm.signing import SKEW_SECONDS, TTL_SECONDS

KEEP_SECONDS = 4 * (TTL_SECONDS + SKEW_SECONDS)

_TABLE = """
CREATE TABLE IF NOT EXISTS swarm_ops_seen (
    action_id TEXT PRIMARY KEY,
    from_host TEXT NOT NULL,
    received_at REAL NOT NULL
)
"""


class OpsSeen:
    def __init__(self, db: Database) -> None:
        self._db = db
        with db.tx() as tx:
            tx.execute(_TABLE)

    def claim(self, action_id: str, from_host: str) -> bool:
        """Remember ``action_id`` (committed on return); False if it was taken before."""
        with self._db.tx() as tx:
            cur = tx.execute(
                "INSERT OR IGNORE INTO swarm_ops_seen (action_id, from_host, received_at)"
                " VALUES (?, ?, ?)",
                (action_id, from_host, time.time()),
            )
        return cur.rowcount == 1

    def prune(self) -> None:
        with self._db.tx() as tx:
            tx.execute(
                "DELETE FROM swarm_ops_seen WHERE received_at < ?", (time.time() - KEEP_SECONDS,)
            )

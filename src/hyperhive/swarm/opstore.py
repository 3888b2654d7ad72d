"""The operator actions this host took from the swarm and what became of each
(``swarm_ops``), so each is carried out once and its outcome survives a crash.

A row is keyed by the sending host and the action id (an id is bound to the host whose
operator signed it: another host's action under the same id is another row, and can
neither take this one's place nor pre-empt it), and holds the sha256 of
the signed action and the stream sequence of the message that brought it. Its state:

- ``taken``: committed before the action is carried out; nothing of it is in the store yet;
- ``applied``: its effect is committed. For the verbs that change the hive's store (an
  answer, an approval, a message, a spawn, ...) this is written in the same transaction
  as the effect (``rider``: store/db.py's ``riding``), so a crash can't fall between them;
  for a lifecycle verb (a stop, a destroy, ...: a cage's steps and the store's), in the
  transaction of the write that completes it (store/db.py's ``completing``), so one cut
  short is carried out again and one completed is not;
- ``done``: its outcome is recorded (``outcome``), as published to ``results.<host>.<from>-<id>``.

The same message delivered again (the core died before its ack) finds the row: ``done``
or ``applied`` re-publishes the outcome without carrying anything out; ``taken`` carries
it out (nothing was done). Another message with the same id (a replay, even of the same
signed bytes) is refused. Rows are kept past the longest a message of ``HIVE_OPS`` may
be delivered (its max age), so no delivery outlives its row.

Created here (``IF NOT EXISTS``) only with ``[swarm]``, like ``swarm/outbox.py``'s tables.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from hyperhive.core.store import Database
from hyperhive.core.store.db import Tx
from hyperhive.swarm.subjects import OPS_MAX_AGE_SECONDS

KEEP_SECONDS = OPS_MAX_AGE_SECONDS + 600.0  # past any delivery of a stored action

_TABLE = """
CREATE TABLE IF NOT EXISTS swarm_ops (
    from_host TEXT NOT NULL,
    action_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    stream_seq INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('taken', 'applied', 'done')),
    outcome TEXT,
    received_at REAL NOT NULL,
    PRIMARY KEY (from_host, action_id)
)
"""
_BY_AGE = "CREATE INDEX IF NOT EXISTS swarm_ops_age ON swarm_ops (received_at)"


@dataclass(frozen=True, slots=True)
class Taken:
    """An action's row."""

    from_host: str
    action_id: str
    digest: str
    stream_seq: int
    state: str
    outcome: dict[str, Any] | None
    received_at: float


class Applied:
    """A ``Rider``: marks one action applied in each transaction it rides (the first one
    that commits is the one that counts), until ``end()``. Ended once the action is
    carried out: a task the action started (an agent's socket, say) inherits the rider
    with its context and must not write the row for ever after."""

    __slots__ = ("action_id", "from_host", "live")

    def __init__(self, from_host: str, action_id: str) -> None:
        self.from_host = from_host
        self.action_id = action_id
        self.live = True

    def end(self) -> None:
        self.live = False

    def __call__(self, tx: Tx) -> None:
        if self.live:
            tx.execute(
                "UPDATE swarm_ops SET state='applied'"
                " WHERE from_host=? AND action_id=? AND state='taken'",
                (self.from_host, self.action_id),
            )


class OpsSeen:
    def __init__(self, db: Database) -> None:
        self._db = db
        with db.tx() as tx:
            tx.execute(_TABLE)
            tx.execute(_BY_AGE)
            # The table before this one kept only ids (taken = done, no outcome): its
            # rows still refuse their replays until they are pruned.
            old = tx.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='swarm_ops_seen'"
            ).fetchone()
            if old is not None:
                tx.execute(
                    "INSERT OR IGNORE INTO swarm_ops (from_host, action_id, digest, stream_seq,"
                    " state, outcome, received_at) SELECT from_host, action_id, '', -1, 'done',"
                    " NULL, received_at FROM swarm_ops_seen"
                )
                tx.execute("DROP TABLE swarm_ops_seen")

    def get(self, from_host: str, action_id: str) -> Taken | None:
        row = self._db.conn.execute(
            "SELECT from_host, action_id, digest, stream_seq, state, outcome, received_at"
            " FROM swarm_ops WHERE from_host=? AND action_id=?",
            (from_host, action_id),
        ).fetchone()
        if row is None:
            return None
        outcome = json.loads(row[5]) if row[5] is not None else None
        return Taken(row[0], row[1], row[2], row[3], row[4], outcome, row[6])

    def claim(self, from_host: str, action_id: str, digest: str, stream_seq: int) -> bool:
        """Record the action as taken (committed on return); False if it was before.
        Another host's action with the same id is another row: it neither takes nor
        blocks this one (and its outcome has a key of its own: subjects.result_key)."""
        with self._db.tx() as tx:
            cur = tx.execute(
                "INSERT OR IGNORE INTO swarm_ops (from_host, action_id, digest, stream_seq,"
                " state, received_at) VALUES (?, ?, ?, ?, 'taken', ?)",
                (from_host, action_id, digest, stream_seq, time.time()),
            )
        return cur.rowcount == 1

    def rider(self, from_host: str, action_id: str) -> Applied:
        """What marks the action applied inside the transaction of its effect."""
        return Applied(from_host, action_id)

    def done(self, from_host: str, action_id: str, outcome: dict[str, Any]) -> None:
        with self._db.tx() as tx:
            tx.execute(
                "UPDATE swarm_ops SET state='done', outcome=? WHERE from_host=? AND action_id=?",
                (json.dumps(outcome), from_host, action_id),
            )

    def prune(self) -> None:
        with self._db.tx() as tx:
            tx.execute("DELETE FROM swarm_ops WHERE received_at < ?", (time.time() - KEEP_SECONDS,))

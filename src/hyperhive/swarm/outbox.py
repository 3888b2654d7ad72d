"""The swarm's two tables in the host's own SQLite store.

``swarm_outbox``: messages from this host's agents to agents on other hosts, committed
before the sender's reply and kept until JetStream acks their publish. ``swarm_seen``:
the ids of messages received from other hosts, written in the same transaction as the
message itself, so a redelivered one is dropped.

Created here (``IF NOT EXISTS``) when ``[swarm]`` is configured, not in
``store/schema.py``: a single-host hive's schema stays exactly as it is.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from hyperhive.core.store import Database
from hyperhive.core.store.messages import insert_message
from hyperhive.wire.common import Message

SEEN_KEEP = 1_000_000  # received ids remembered (far past any redelivery)

_TABLES = """
CREATE TABLE IF NOT EXISTS swarm_outbox (
    id INTEGER PRIMARY KEY,
    msg_id TEXT NOT NULL UNIQUE,
    to_host TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL,
    sent_at REAL
);
CREATE INDEX IF NOT EXISTS swarm_outbox_unsent ON swarm_outbox (id) WHERE sent_at IS NULL;
CREATE TABLE IF NOT EXISTS swarm_seen (
    msg_id TEXT PRIMARY KEY,
    message_id INTEGER NOT NULL,
    received_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Outgoing:
    row: int
    msg_id: str
    to_host: str
    payload: bytes


class SwarmStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        with db.tx() as tx:
            for statement in _TABLES.split(";"):
                if statement.strip():
                    tx.execute(statement)

    def queue(self, to_host: str, sender: str, to: str, kind: str, body: str) -> Message:
        """Store one outgoing message (committed on return); its id is the outbox row."""
        now, msg_id = time.time(), uuid.uuid4().hex
        payload = json.dumps(
            {"id": msg_id, "from": sender, "to": to, "kind": kind, "body": body, "sent_at": now},
            ensure_ascii=False,
        )
        with self._db.tx() as tx:
            cur = tx.execute(
                "INSERT INTO swarm_outbox (msg_id, to_host, payload, created_at)"
                " VALUES (?, ?, ?, ?)",
                (msg_id, to_host, payload, now),
            )
        return Message(
            id=int(cur.lastrowid or 0), from_=sender, kind=kind, body=body, sent_at=now, to=to
        )

    def unsent(self, limit: int) -> list[Outgoing]:
        rows = self._db.conn.execute(
            "SELECT id, msg_id, to_host, payload FROM swarm_outbox WHERE sent_at IS NULL"
            " ORDER BY id LIMIT ?",
            (limit,),
        ).fetchall()
        return [Outgoing(r[0], r[1], r[2], r[3].encode()) for r in rows]

    def mark_sent(self, rows: list[int]) -> None:
        now = time.time()
        with self._db.tx() as tx:
            tx.executemany("UPDATE swarm_outbox SET sent_at=? WHERE id=?", [(now, r) for r in rows])

    def counts(self) -> tuple[int, int]:
        """(unsent, sent) rows of the outbox."""
        r = self._db.conn.execute(
            "SELECT count(*) FILTER (WHERE sent_at IS NULL), count(*) FILTER (WHERE sent_at"
            " IS NOT NULL) FROM swarm_outbox"
        ).fetchone()
        return int(r[0]), int(r[1])

    def receive(self, items: list[dict[str, str]]) -> list[Message]:
        """Put messages from another host (``id``, ``to``, ``from``, ``kind``, ``body``
        each) in their recipients' inboxes and remember their ids, in one transaction;
        an id received before is skipped. The messages stored, in order."""
        out = []
        with self._db.tx() as tx:
            for p in items:
                if tx.execute("SELECT 1 FROM swarm_seen WHERE msg_id=?", (p["id"],)).fetchone():
                    continue
                msg = insert_message(tx, p["to"], p["from"], p["kind"], p["body"])
                tx.execute(
                    "INSERT INTO swarm_seen (msg_id, message_id, received_at) VALUES (?, ?, ?)",
                    (p["id"], msg.id, time.time()),
                )
                out.append(msg)
        return out

    def prune(self, keep_sent: int = 10_000) -> None:
        """Forget sent outbox rows and received ids past what is worth keeping."""
        with self._db.tx() as tx:
            tx.execute(
                "DELETE FROM swarm_outbox WHERE sent_at IS NOT NULL AND id <= (SELECT id FROM"
                " swarm_outbox WHERE sent_at IS NOT NULL ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (keep_sent,),
            )
            tx.execute(
                "DELETE FROM swarm_seen WHERE rowid <= (SELECT rowid FROM swarm_seen"
                " ORDER BY rowid DESC LIMIT 1 OFFSET ?)",
                (SEEN_KEEP,),
            )

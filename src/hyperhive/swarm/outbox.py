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
from typing import Any

from hyperhive.core.store import Database
from hyperhive.core.store.db import Tx
from hyperhive.core.store.messages import insert_message
from hyperhive.swarm import asks
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


def queue_tx(tx: Tx, to_host: str, sender: str, to: str, kind: str, body: str, **extra: Any) -> int:
    """Store one outgoing message in the caller's transaction; its outbox row. ``extra``:
    a question's ``qid`` and ``options``, an answer's ``qid`` (swarm/asks.py)."""
    now, msg_id = time.time(), uuid.uuid4().hex
    item = {"id": msg_id, "from": sender, "to": to, "kind": kind, "body": body, "sent_at": now}
    payload = json.dumps({**item, **extra}, ensure_ascii=False)
    cur = tx.execute(
        "INSERT INTO swarm_outbox (msg_id, to_host, payload, created_at) VALUES (?, ?, ?, ?)",
        (msg_id, to_host, payload, now),
    )
    return int(cur.lastrowid or 0)


class SwarmStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self.dropped = 0  # received questions and answers refused (swarm/asks.py)
        with db.tx() as tx:
            for statement in (_TABLES + asks.TABLES).split(";"):
                if statement.strip():
                    tx.execute(statement)

    @property
    def db(self) -> Database:
        return self._db

    def queue(self, to_host: str, sender: str, to: str, kind: str, body: str) -> Message:
        """Store one outgoing message (committed on return); its id is the outbox row."""
        with self._db.tx() as tx:
            row = queue_tx(tx, to_host, sender, to, kind, body)
        return Message(id=row, from_=sender, kind=kind, body=body, sent_at=time.time(), to=to)

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

    def receive(self, items: list[dict[str, Any]], from_host: str = "") -> list[Message]:
        """Put messages from host ``from_host`` (``id``, ``to``, ``from``, ``kind``,
        ``body`` each; a question or an answer also ``qid``: swarm/asks.py) in their
        recipients' inboxes and remember their ids, in one transaction; an id received
        before is skipped, and so is an answer to no question asked of that host. The
        messages stored, in order."""
        out = []
        with self._db.tx() as tx:
            seen = self._seen(tx, [p["id"] for p in items])
            for p in items:
                if p["id"] in seen:
                    continue
                seen.add(p["id"])  # the same id twice in one bundle: once
                if p["kind"] == "message":
                    msg: Message | None = insert_message(
                        tx, p["to"], p["from"], p["kind"], p["body"]
                    )
                else:
                    got = asks.receive(tx, from_host, p)
                    self.dropped += got == "dropped"
                    msg = got if isinstance(got, Message) else None
                tx.execute(
                    "INSERT INTO swarm_seen (msg_id, message_id, received_at) VALUES (?, ?, ?)",
                    (p["id"], 0 if msg is None else msg.id, time.time()),
                )
                if msg is not None:
                    out.append(msg)
        return out

    @staticmethod
    def _seen(tx: Tx, ids: list[str]) -> set[str]:
        """Which of ``ids`` were received before (one query per bundle, not per message)."""
        found: set[str] = set()
        for i in range(0, len(ids), 500):  # under SQLite's bound on parameters
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = tx.execute(f"SELECT msg_id FROM swarm_seen WHERE msg_id IN ({marks})", chunk)
            found.update(r[0] for r in rows.fetchall())
        return found

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

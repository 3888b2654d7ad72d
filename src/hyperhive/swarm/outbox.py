"""The swarm's two tables in the host's own SQLite store.

``swarm_outbox``: messages from this host's agents to agents on other hosts, committed
before the sender's reply and kept until JetStream acks their publish. ``swarm_seen``:
the ids of messages received from other hosts, written in the same transaction as the
message itself, so a redelivered one is dropped.

Created here (``IF NOT EXISTS``) when ``[swarm]`` is configured, not in
``store/schema.py``: a single-host hive's schema stays exactly as it is.
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from hyperhive.core.store import Database
from hyperhive.core.store.db import Tx
from hyperhive.core.store.messages import insert_message
from hyperhive.swarm import asks, quota
from hyperhive.wire.common import Message

SEEN_KEEP = 1_000_000  # received ids remembered (far past any redelivery)
NO_BOUND = (1 << 62, 1 << 62)

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


@dataclass(frozen=True, slots=True)
class Outgoing:
    row: int
    msg_id: str
    to_host: str
    payload: bytes
    # The payload's "from" and "kind", read by SQLite: the publisher parses no payload.
    sender: str
    kind: str


# A message's swarm-wide id (the receivers' dedup key): this process's 128 random bits and
# a count, as unique as a uuid4 each, without a getrandom call and a UUID per message.
_ID_PREFIX = secrets.token_hex(16)
_id_count = itertools.count(1)
_ENCODER = json.JSONEncoder(ensure_ascii=False)  # json.dumps with an option builds one a call


def new_msg_id() -> str:
    return f"{_ID_PREFIX}{next(_id_count):x}"


def seen_key(from_host: str, msg_id: str) -> str:
    """A received id as ``swarm_seen`` remembers it: per sending host. An id is unique,
    not secret (every host we write reads our prefix and count off our messages), so a
    host could send its own messages under another host's next ids; remembered whoever
    sent them, they made the receiver skip the real ones as seen (red team round 11).
    ``/`` is in no host name."""
    return f"{from_host}/{msg_id}"


def queue_tx(tx: Tx, to_host: str, sender: str, to: str, kind: str, body: str, **extra: Any) -> int:
    """Store one outgoing message in the caller's transaction; its outbox row. ``extra``:
    a question's ``qid`` and ``options``, an answer's ``qid`` (swarm/asks.py). One that
    will sit in an inbox there counts in ``sender``'s quota until that host releases it
    (swarm/quota.py)."""
    now, msg_id = time.time(), new_msg_id()
    if kind in quota.COUNTED:
        quota.sent_tx(tx, sender, to_host, quota.item_bytes(body, extra.get("options")))
    item = {"id": msg_id, "from": sender, "to": to, "kind": kind, "body": body, "sent_at": now}
    payload = _ENCODER.encode({**item, **extra} if extra else item)
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
            for statement in (_TABLES + asks.TABLES + quota.TABLES).split(";"):
                if statement.strip():
                    tx.execute(statement)
            quota.migrate_tx(tx)  # swarm_held's gen and the triggers that read it
            self.epoch = quota.store_epoch(tx)  # named in this store's quota reports

    @property
    def db(self) -> Database:
        return self._db

    def queue(self, to_host: str, sender: str, to: str, kind: str, body: str) -> Message:
        """Store one outgoing message (committed on return); its id is the outbox row."""
        with self._db.tx() as tx:
            row = queue_tx(tx, to_host, sender, to, kind, body)
        return Message(id=row, from_=sender, kind=kind, body=body, sent_at=time.time(), to=to)

    def unsent(self, limit: int, skip: Collection[str] = ()) -> list[Outgoing]:
        """The oldest unsent rows, but none to the hosts in ``skip`` (whose pair on the bus
        is at its bound: bridge.py; theirs wait, in order, and the others' go on)."""
        # The index named: left to choose, SQLite's planning cost more than the read (as
        # for messages.unacked).
        but = f" AND to_host NOT IN ({','.join('?' * len(skip))})" if skip else ""
        rows = self._db.conn.execute(
            "SELECT id, msg_id, to_host, payload, json_extract(payload, '$.from'),"
            " json_extract(payload, '$.kind')"
            f" FROM swarm_outbox INDEXED BY swarm_outbox_unsent WHERE sent_at IS NULL{but}"
            " ORDER BY id LIMIT ?",
            (*sorted(skip), limit),
        ).fetchall()
        return [Outgoing(r[0], r[1], r[2], r[3].encode(), r[4], r[5]) for r in rows]

    def mark_sent(self, rows: list[int]) -> None:
        """The bus has these: their payloads go at once (a sent row is only counted, and
        ``prune`` keeps up to 10,000 of them: at up to 1 MiB a message, that was up to
        10 GiB of bodies nobody reads)."""
        now = time.time()
        with self._db.tx() as tx:
            tx.executemany(
                "UPDATE swarm_outbox SET sent_at=?, payload='' WHERE id=?", [(now, r) for r in rows]
            )

    def counts(self) -> tuple[int, int]:
        """(unsent, sent) rows of the outbox."""
        r = self._db.conn.execute(
            "SELECT count(*) FILTER (WHERE sent_at IS NULL), count(*) FILTER (WHERE sent_at"
            " IS NOT NULL) FROM swarm_outbox"
        ).fetchone()
        return int(r[0]), int(r[1])

    def receive(
        self, items: list[dict[str, Any]], from_host: str = "", sender_epoch: str | None = None
    ) -> list[Message]:
        """``take`` with every item deliverable and no bound (the tests' shorthand)."""
        return self.take([(p, True) for p in items], from_host, NO_BOUND, NO_BOUND, sender_epoch)[0]

    def take(
        self,
        items: list[tuple[dict[str, Any], bool]],
        from_host: str,
        per_agent: tuple[int, int],
        per_host: tuple[int, int],
        sender_epoch: str | None = None,
    ) -> tuple[list[Message], bool]:
        """Put messages from host ``from_host`` (``id``, ``to``, ``from``, ``kind``,
        ``body`` each; a question or an answer also ``qid``: swarm/asks.py) in their
        recipients' inboxes and remember their ids, in one transaction; an id received
        before is skipped, and so is an answer to no question asked of that host. Each
        item comes with whether it may be delivered: one that may not (no such recipient)
        is only released in its sender's quota (swarm/quota.py). The messages stored, in
        order, and whether all were: storing stops at the first item past what this host
        holds for one sender (``per_agent``: rows, bytes) or for ``from_host`` in all
        (``per_host``); the rest wait for a later try. ``sender_epoch``: the store of
        ``from_host`` that published them (None: it named none), whose count what this
        host reports of them is (quota.sender_gen_tx)."""
        out = []
        whole = True
        with self._db.tx() as tx:
            seen = self._seen(tx, from_host, [p["id"] for p, _ in items])
            gen = quota.sender_gen_tx(tx, from_host, sender_epoch)
            room = quota.Room(tx, from_host, per_agent, per_host, gen)
            for p, deliverable in items:
                if p["id"] in seen:
                    continue
                counted = p["kind"] in quota.COUNTED
                nbytes = quota.item_bytes(p["body"], p.get("options")) if counted else 0
                if counted and deliverable and not room.fits(p["from"], nbytes):
                    whole = False  # back-pressure: this one and the rest wait
                    break
                seen.add(p["id"])  # the same id twice in one bundle: once
                msg: Message | None = None
                if not deliverable:
                    pass
                elif p["kind"] == "message":
                    msg = insert_message(tx, p["to"], p["from"], p["kind"], p["body"])
                else:
                    got = asks.receive(tx, from_host, p)
                    self.dropped += got == "dropped"
                    msg = got if isinstance(got, Message) else None
                if counted:
                    if msg is not None:
                        room.hold(msg.id, p["from"], nbytes)
                    else:
                        room.release(p["from"], nbytes)
                tx.execute(
                    "INSERT INTO swarm_seen (msg_id, message_id, received_at) VALUES (?, ?, ?)",
                    (seen_key(from_host, p["id"]), 0 if msg is None else msg.id, time.time()),
                )
                if msg is not None:
                    out.append(msg)
        return out, whole

    def unreported(self, limit: int) -> list[quota.Unreported]:
        """Released counts of other hosts' agents not yet published (swarm/quota.py)."""
        return quota.unreported(self._db.conn, limit)

    def reported(self, done: list[quota.Unreported]) -> None:
        with self._db.tx() as tx:
            quota.reported_tx(tx, done)

    def release(self, reports: dict[tuple[str, str], tuple[int, int, str, str]]) -> int:
        """Other hosts' reports of what they released of this host's agents' items, (host,
        agent) -> (rows, bytes in all, the reporting store's epoch, the store of ours they
        count for: "" if none is named), applied in one transaction; how many changed. A
        report counting for another store of ours (this one's before its reset) is not
        this store's count: ignored."""
        with self._db.tx() as tx:
            return sum(
                quota.release_tx(tx, host, agent, rows, nbytes, epoch)
                for (host, agent), (rows, nbytes, epoch, ours) in reports.items()
                if ours in ("", self.epoch)
            )

    def host_epoch(self, host: str, epoch: str) -> int:
        """``host``'s heartbeat named its store (quota.host_epoch_tx); agents freed."""
        with self._db.tx() as tx:
            return quota.host_epoch_tx(tx, host, epoch)

    @staticmethod
    def _seen(tx: Tx, from_host: str, ids: list[str]) -> set[str]:
        """Which of ``ids`` were received from ``from_host`` before (one query per bundle,
        not per message)."""
        found: set[str] = set()
        prefix = seen_key(from_host, "")
        keys = [seen_key(from_host, i) for i in ids]
        for i in range(0, len(keys), 500):  # under SQLite's bound on parameters
            chunk = keys[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = tx.execute(f"SELECT msg_id FROM swarm_seen WHERE msg_id IN ({marks})", chunk)
            found.update(r[0][len(prefix) :] for r in rows.fetchall())
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

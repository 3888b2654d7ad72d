"""Messages: the inboxes (unacked until the recipient acks) and the operator's."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import closing
from typing import Any, get_args

from hyperhive.core.refusals import NotFound
from hyperhive.core.store.common import Unreadable, load_options, readable
from hyperhive.core.store.db import Database, Tx
from hyperhive.core.store.usage import make_room
from hyperhive.core.summary import cut_sql, fair_ids, is_cut, options_prefix, shown
from hyperhive.wire.agent import AT_MAX, AT_MIN
from hyperhive.wire.common import Message, MessageKind
from hyperhive.wire.framing import model_fields_only
from hyperhive.wire.timestamps import rfc3339

_COLUMNS = "id, sender, kind, body, sent_at, ref, options, recipient"
_Row = tuple[int, str, str, str, float, "int | None", "str | None", str]
# A recv's query names its index: left to choose, the same plan (this index) cost ~13 µs
# a run on an empty inbox, against ~2.4 µs with the index named (SQLite 3.40, measured on
# a cached statement), and a receiver runs it at least once a message (bench 64 pairs).
_UNACKED = "messages INDEXED BY messages_unacked"
# What a row holds of its sender's quota, in bytes (agent_usage): its stored text, read
# from the generated lengths (no overflow page), the text itself only for a row whose
# body or options is not text (a store written by hand).
HELD_BYTES = (
    "coalesce(body_bytes, length(CAST(body AS BLOB)))"
    " + coalesce(options_bytes, length(CAST(options AS BLOB)), 0)"
)


# Who holds a message in its quota (agent_usage): its sender, but a reminder delivered
# (sender "hive", a reserved name) is held by the agent that set it, its recipient, until
# acked: it was the quota's while undelivered, and an agent taking its due reminders and
# never acking them stored without bound (red team round 25a). The delete trigger
# (schema.py, migration 13) and the tests' sums say the same.
REMINDER_SENDER = "hive"
HOLDER = f"CASE WHEN sender = '{REMINDER_SENDER}' THEN recipient ELSE sender END"


def holder_of(recipient: str, sender: str) -> str:
    """``HOLDER`` for a message being stored."""
    return recipient if sender == REMINDER_SENDER else sender


def to_message(r: _Row, with_to: bool = False) -> Message:
    return Message(
        id=r[0],
        from_=r[1],
        kind=r[2],
        body=r[3],
        sent_at=r[4],
        ref=r[5],
        options=load_options(r[6]),
        to=r[7] if with_to else None,
    )


# A listing's columns: the body and options cut in SQL, with the full lengths.
_SUMMARY = f"id, sender, kind, {cut_sql('body')}, sent_at, ref, {cut_sql('options')}, recipient"


def _to_summary(r: tuple[object, ...]) -> Message:
    truncated = {f: n for f, n in (("body", r[4]), ("options", r[8])) if is_cut(n)}
    options: list[str] | None
    if "options" in truncated:
        # Only the options complete within the cut: a cut option would be another answer.
        options = options_prefix(str(shown(r[7], r[8])))
    else:
        options = load_options(r[7])
    return Message(
        id=r[0],
        from_=r[1],
        kind=r[2],
        body=shown(r[3], r[4]),
        sent_at=r[5],
        ref=r[6],
        options=options,
        to=r[9],
        truncated=truncated or None,
    )


def _with_to(r: _Row) -> Message:
    return to_message(r, with_to=True)


def _for_recipient(r: _Row) -> Message:
    """An unacked message as its recipient gets it; an unreadable one as a note from the
    hive naming it (it still takes its place in the inbox and is acked like any other)."""
    msg = readable(to_message, r)
    if not isinstance(msg, Unreadable):
        return msg
    return Message(
        id=r[0],
        from_="hive",
        kind="message",
        body=f"[message {r[0]} is unreadable: {msg.reason}]",
        sent_at=r[4] if type(r[4]) in (int, float) else 0.0,
    )


_KINDS = frozenset(get_args(MessageKind))


def wire_for_recipient(r: _Row) -> dict[str, Any]:
    """An unacked message as its recipient's ``recv`` line carries it: exactly
    ``model_fields_only(_for_recipient(r))`` without ``to``, built straight from a row of
    the usual types (the model's checks and dump were most of a recv's cost); any other
    row goes through the model as before."""
    mid, sender, kind, body, sent_at, ref, options = r[0], r[1], r[2], r[3], r[4], r[5], r[6]
    if (
        type(mid) is int
        and type(sender) is str
        and kind in _KINDS
        and type(body) is str
        and type(sent_at) is float
        and math.isfinite(sent_at)
        and AT_MIN <= sent_at <= AT_MAX
        and (ref is None or type(ref) is int)
        and options is None
    ):
        d: dict[str, Any] = {
            "id": mid, "from": sender, "kind": kind, "body": body, "sent_at": rfc3339(sent_at)
        }  # fmt: skip
        if ref is not None:
            d["ref"] = ref
        return d
    d = model_fields_only(_for_recipient(r))
    d.pop("to", None)
    return d


def insert_message(
    tx: Tx,
    recipient: str,
    sender: str,
    kind: str,
    body: str,
    ref: int | None = None,
    options: list[str] | None = None,
) -> Message:
    """Store one message in the caller's transaction."""
    now = time.time()
    stored = None if options is None else json.dumps(options)
    cur = tx.execute(
        "INSERT INTO messages (recipient, sender, kind, body, ref, options, sent_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        # json.dumps inline, not dump_options: one call fewer per message on the send path
        (recipient, sender, kind, body, ref, stored, now),
    )
    nbytes = len(body) if body.isascii() else len(body.encode())  # its UTF-8 size
    if stored is not None:
        nbytes += len(stored.encode())
    tx.held(holder_of(recipient, sender), 1, nbytes, recipient == "operator")
    return Message(
        id=int(cur.lastrowid or 0),
        from_=sender,
        kind=kind,
        body=body,
        sent_at=now,
        ref=ref,
        options=options,
        to=recipient,
    )


# One agent's message to another as the group commit's message lane queues it:
# (recipient, sender, body, the body's UTF-8 bytes).
MessageItem = tuple[str, str, str, int]


def insert_messages(tx: Tx, items: list[MessageItem], now: float) -> int:
    """Store ``items`` (kind "message", sent ``now``) in the caller's transaction, in
    order; the last one's id. Their ids are consecutive: this connection is the only
    writer and AUTOINCREMENT gives each insert the next id (or fails the statement)."""
    tx.executemany(
        "INSERT INTO messages (recipient, sender, kind, body, sent_at)"
        " VALUES (?, ?, 'message', ?, ?)",
        [(it[0], it[1], it[2], now) for it in items],
    )
    held = tx.held
    for it in items:
        held(it[1], 1, it[3], it[0] == "operator")
    return tx.last_insert_rowid()


def send_in(
    tx: Tx, item: tuple[str, str, str, str], quota: tuple[int, int] | None = None
) -> Message:
    """One (recipient, sender, kind, body) in the caller's transaction. With ``quota``
    (rows, bytes one sender may hold), a message to the operator first drops the sender's
    oldest messages to the operator until it fits."""
    if quota is not None and item[0] == "operator":
        make_room(tx, item[1], len(item[3].encode()), quota)
    return insert_message(tx, *item)


def held_size(recipient: str, m: dict[str, Any]) -> tuple[str, int] | None:
    """``HOLDER`` and ``HELD_BYTES`` of a message as its recipient's ``recv`` line carries
    it (``wire_for_recipient``), when the line alone tells them (no options: their stored
    form is not the line's); None otherwise. A message is never changed, so what this says
    of an id stays true for as long as the row lives (``ack_in``'s ``known``)."""
    sender, body = m.get("from"), m.get("body")
    if type(sender) is not str or type(body) is not str or "options" in m:
        return None
    nbytes = len(body) if body.isascii() else len(body.encode())
    return holder_of(recipient, sender), nbytes


def ack_in(tx: Tx, recipient: str, ids: list[int], known: tuple[str, int] | None = None) -> int:
    """Ack ``ids`` in the caller's transaction, all of which must be messages to
    ``recipient`` (NotFound before anything is written, if one is not); how many were new.
    ``known``: the one id's holder and held bytes (``held_size``), if its ``recv`` told them,
    so that a receiver's ack a round is the one statement."""
    if len(ids) == 1:  # a receiver's ack a round: one row by its key
        mid = ids[0]
        # The usual ack (its own, not acked yet) is this one statement; only when it changes
        # no row is the row read, to tell "already acked" (0) from "not yours" (refused,
        # and nothing was written).
        if tx.execute(
            "UPDATE messages SET acked_at=? WHERE id=? AND recipient=? AND acked_at IS NULL",
            (time.time(), mid, recipient),
        ).rowcount:
            if known is None:
                known = tx.execute(
                    f"SELECT {HOLDER}, {HELD_BYTES} FROM messages WHERE id=?", (mid,)
                ).fetchone()
                assert known is not None  # the row the update just changed
            tx.held(known[0], -1, -known[1], recipient == "operator")
            return 1
        row = tx.execute("SELECT recipient, acked_at FROM messages WHERE id=?", (mid,)).fetchone()
        if row is None or row[0] != recipient:
            raise NotFound(f"no message {mid} in this inbox")
        return 0  # its own, and acked already (the update above took any other)
    unique = sorted(set(ids))
    found: dict[int, tuple[float | None, str, int]] = (
        {
            r[0]: (r[1], r[2], r[3])
            for r in tx.execute(
                f"SELECT id, acked_at, {HOLDER}, {HELD_BYTES} FROM messages WHERE recipient=?"
                f" AND id IN ({','.join('?' * len(unique))})",
                (recipient, *unique),
            )
        }
        if unique
        else {}
    )
    missing = [i for i in unique if i not in found]
    if missing:
        raise NotFound(f"no message {missing[0]} in this inbox")
    fresh = [i for i in unique if found[i][0] is None]
    now = time.time()
    tx.executemany("UPDATE messages SET acked_at=? WHERE id=?", [(now, i) for i in fresh])
    for i in fresh:
        tx.held(found[i][1], -1, -found[i][2], recipient == "operator")
    return len(fresh)


class MessageRepo:
    def __init__(self, db: Database) -> None:
        self._db = db

    def send(
        self, recipient: str, sender: str, kind: str, body: str, ref: int | None = None
    ) -> Message:
        with self._db.tx() as tx:
            return insert_message(tx, recipient, sender, kind, body, ref)

    def send_many(
        self, batch: Iterable[tuple[str, str, str, str]], quota: tuple[int, int] | None = None
    ) -> list[Message]:
        """(recipient, sender, kind, body) each, in order, in one transaction (group commit).
        With ``quota``, see ``send_in``."""
        with self._db.tx() as tx:
            return [send_in(tx, item, quota) for item in batch]

    def unacked(self, recipient: str, limit: int, skip: set[int]) -> Iterator[Message]:
        """``unacked_rows``, each as its Message."""
        return (_for_recipient(r) for r in self.unacked_rows(recipient, limit, skip))

    def unacked_wire(self, recipient: str, limit: int, skip: set[int]) -> Iterator[dict[str, Any]]:
        """``unacked_rows``, each as its recipient's recv line carries it."""
        return (wire_for_recipient(r) for r in self.unacked_rows(recipient, limit, skip))

    def unacked_rows(self, recipient: str, limit: int, skip: set[int]) -> Iterator[_Row]:
        """Unacked messages to ``recipient`` not in ``skip``, oldest first, at most ``limit``,
        read one row at a time. Not recv's path since session 22 (``Hive.recv_now`` seeks
        past what it handed out: this walks ``skip`` whole, O(held) a call); kept as the
        plain statement of what recv returns, which the tests check recv against, and for
        readers of a whole inbox (``unacked``)."""
        if not skip:  # the usual case (a receiver that acks as it goes): no json_each to scan
            rows = self._db.rows(
                f"SELECT {_COLUMNS} FROM {_UNACKED} WHERE recipient=? AND acked_at IS NULL"
                " ORDER BY id LIMIT ?",
                (recipient, limit),
            )
        else:
            rows = self._db.rows(
                f"SELECT {_COLUMNS} FROM {_UNACKED} WHERE recipient=? AND acked_at IS NULL"
                " AND id NOT IN (SELECT value FROM json_each(?)) ORDER BY id LIMIT ?",
                (recipient, json.dumps(sorted(skip)), limit),
            )
        return rows

    def unacked_above(self, recipient: str, limit: int, above: int) -> Iterator[_Row]:
        """Unacked messages to ``recipient`` with an id above ``above``, oldest first, at
        most ``limit``, read one row at a time: a seek in the index, whatever lies below."""
        return self._db.rows(
            f"SELECT {_COLUMNS} FROM {_UNACKED} WHERE recipient=? AND acked_at IS NULL"
            " AND id>? ORDER BY id LIMIT ?",
            (recipient, above, limit),
        )

    def unacked_of(self, recipient: str, ids: list[int]) -> list[_Row]:
        """Those of ``ids`` (at most 1,001) that are unacked messages to ``recipient``,
        oldest first: one look up by key each."""
        return self._db.conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE id IN ({','.join('?' * len(ids))})"
            " AND recipient=? AND acked_at IS NULL ORDER BY id",
            (*ids, recipient),
        ).fetchall()

    def unacked_among(self, recipient: str, ids: list[int]) -> int:
        """How many of ``ids`` an ack by ``recipient`` would ack now, read without a write
        transaction: NotFound (``ack_in``'s words) if one is not a message to it. What lets
        an ack that would change nothing (acked already, or refused) skip the group commit:
        a cage flooding such acks cost one empty commit each (issue 17)."""
        unique = sorted(set(ids))
        if not unique:
            return 0
        found: dict[int, float | None] = dict(
            self._db.conn.execute(
                "SELECT id, acked_at FROM messages WHERE recipient=? AND id IN"
                f" ({','.join('?' * len(unique))})",
                (recipient, *unique),
            ).fetchall()
        )
        for i in unique:
            if i not in found:
                raise NotFound(f"no message {i} in this inbox")
        return sum(1 for i in unique if found[i] is None)

    def ack(self, recipient: str, ids: list[int]) -> int:
        """Ack ``ids``, all of which must be messages to ``recipient``; how many were new."""
        with self._db.tx() as tx:
            return ack_in(tx, recipient, ids)

    def recent(self, limit: int) -> list[Message | Unreadable]:
        """The newest ``limit`` messages of the hive, oldest first."""
        rows = self._db.conn.execute(
            f"SELECT {_COLUMNS} FROM (SELECT * FROM messages ORDER BY id DESC LIMIT ?) ORDER BY id",
            (limit,),
        ).fetchall()
        return [readable(_with_to, r) for r in rows]

    def recent_summaries(self, limit: int) -> list[Message | Unreadable]:
        """The newest ``limit`` messages of the hive, oldest first, as summaries."""
        rows = self._db.conn.execute(
            f"SELECT {_SUMMARY} FROM messages"
            " WHERE id IN (SELECT id FROM messages ORDER BY id DESC LIMIT ?) ORDER BY id",
            (limit,),
        ).fetchall()
        return [readable(_to_summary, r) for r in rows]

    def newest_to(self, recipient: str, limit: int) -> list[Message | Unreadable]:
        """The newest ``limit`` messages to ``recipient``, newest first, as summaries (the
        operator's inbox on the dashboard)."""
        rows = self._db.conn.execute(
            f"SELECT {_SUMMARY} FROM messages WHERE recipient=? ORDER BY id DESC LIMIT ?",
            (recipient, limit),
        ).fetchall()
        return [readable(_to_summary, r) for r in rows]

    def older_unread(
        self, recipient: str, after: int, below: int, read: set[int], per_sender: int, limit: int
    ) -> list[Message | Unreadable]:
        """Messages to ``recipient`` with an id above ``after`` and below ``below``, not in
        ``read``: the oldest, at most ``per_sender`` of any one sender (summary.fair_ids),
        newest first, as summaries (the dashboard's unread inbox past its newest page: one
        sender's flood pushes no other's off it, older or newer: red team round 23b and its
        re-check)."""
        rows = self._db.rows(
            "SELECT id, sender FROM messages WHERE recipient=? AND id>? AND id<? ORDER BY id",
            (recipient, after, below),
        )
        with closing(rows):
            ids, _ = fair_ids(((i, w) for i, w in rows if i not in read), per_sender, limit)
        if not ids:
            return []
        found = self._db.conn.execute(
            f"SELECT {_SUMMARY} FROM messages WHERE id IN ({','.join('?' * len(ids))})"
            " ORDER BY id DESC",
            ids,
        ).fetchall()
        return [readable(_to_summary, r) for r in found]

    def get(self, mid: int) -> Message | Unreadable | None:
        """One message, whole (with its recipient)."""
        r = self._db.conn.execute(f"SELECT {_COLUMNS} FROM messages WHERE id=?", (mid,)).fetchone()
        return None if r is None else readable(_with_to, r)

    def inbox(self, recipient: str, after: int, limit: int) -> Iterator[Message | Unreadable]:
        """Messages to ``recipient`` after id ``after``, acked or not, oldest first, at most
        ``limit``, read one row at a time (see ``unacked``)."""
        rows = self._db.rows(
            f"SELECT {_COLUMNS} FROM messages WHERE recipient=? AND id>? ORDER BY id LIMIT ?",
            (recipient, after, limit),
        )
        return (readable(_with_to, r) for r in rows)

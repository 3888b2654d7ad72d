"""Inboxes known whole without reading them: ``recv``'s way round its query.

A receiver in a steady exchange reads its inbox empty, is woken by one message, reads
it, acks it with its next ``recv`` and reads its inbox empty again: two queries a
message, most of the CPU a ``recv`` costs (bench: 64 pairs). Every message of the group
commit's lane is committed with everything ``recv`` would read of it (``message_stored``
has its id, sender, body and time), and every ack is committed with the ids it acks. So
an inbox read empty, kept up to date from those two hooks, holds exactly what a query
would return for as long as only batches of lane messages and acks were committed since
it was read (``Hive._unchanged_since``, the same test the quota reads use): any other
write (a message to or from the operator, a question, a reminder, a turn, an agent
deleted) can change an inbox unseen, and the next ``recv`` reads it again.

Each entry is a message as its recipient's ``recv`` line carries it, built by
``wire_for_recipient`` from the row the insert wrote, so a reply from here is the reply
the query gives. Memory is bounded: an inbox known past ``KNOWN_MESSAGES`` messages or
``KNOWN_CHARS`` characters of bodies is forgotten (read from the store until it is read
empty again), so a receiver that stops reading holds no more than that in the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hyperhive.core.store.messages import wire_for_recipient

KNOWN_MESSAGES = 16  # an inbox holding more is read from the store
KNOWN_CHARS = 16 * 1024  # characters of bodies, likewise
# The most a known inbox's messages take in a reply: a body's character escapes to at most
# 6 bytes, and the rest of a message (id, sender, kind, time, keys) takes under 256. Far
# below ``[limits] reply_bytes`` (at least replies.MAX_ITEM_BYTES, config.py), so no byte
# budget ever cuts a page of a known inbox: recv does not count one (tests/test_recv_empty.py).
KNOWN_BYTES_MAX = 6 * KNOWN_CHARS + 256 * KNOWN_MESSAGES


@dataclass(slots=True)
class _Known:
    at: int  # the database's commit count when the inbox was read empty
    items: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    chars: int = 0


class KnownInboxes:
    """The unacked messages of the inboxes read empty since, per recipient."""

    def __init__(self) -> None:
        self._known: dict[str, _Known] = {}

    def since(self, name: str) -> int | None:
        """The commit count ``name``'s inbox is known from; None if it is not known."""
        known = self._known.get(name)
        return None if known is None else known.at

    def items(self, name: str) -> list[dict[str, Any]]:
        """``name``'s unacked messages, oldest first (its inbox is known: ``since``)."""
        return self._known[name].items

    def read_empty(self, name: str, at: int) -> None:
        """A query found no unacked message to ``name`` (none held either) at commit ``at``."""
        self._known[name] = _Known(at)

    def forget(self, name: str) -> None:
        self._known.pop(name, None)

    def stored(self, to: str, mid: int, sender: str, body: str, sent_at: float) -> None:
        """A message of the lane is committed (``GroupCommit``'s ``message_stored``)."""
        known = self._known.get(to)
        if known is None:
            return
        known.chars += len(body)
        if len(known.items) >= KNOWN_MESSAGES or known.chars > KNOWN_CHARS:
            del self._known[to]  # read from the store until it is read empty again
            return
        # The row the lane's insert wrote (store/messages.py insert_messages), as a query
        # returns it: the same function makes the same line.
        known.items.append(
            wire_for_recipient((mid, sender, "message", body, sent_at, None, None, to))
        )

    def acked(self, name: str, ids: list[int], fresh: int) -> None:
        """An ack of ``ids`` by ``name`` is committed, ``fresh`` of them acked only now.
        Each of those is a message of the known inbox, if it is known right: one that is
        not was stored in the same batch (an id is a count anyone can guess: the batch
        inserts its messages before its acks, and this hook runs before that message's
        ``stored``, which would then add a message already acked). Then the inbox is
        forgotten, and read again (red team round 12)."""
        known = self._known.get(name)
        if known is None:
            return
        if not known.items:
            if fresh:
                del self._known[name]
            return
        items = known.items
        if len(ids) == 1 and items[0]["id"] == ids[0]:  # a receiver's ack a round: the oldest
            gone = [items.pop(0)]
        else:
            drop = set(ids)
            gone = [m for m in items if m["id"] in drop]
            if gone:
                known.items = [m for m in items if m["id"] not in drop]
        for m in gone:
            known.chars -= len(m["body"])
        if len(gone) < fresh:
            del self._known[name]

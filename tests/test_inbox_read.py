"""The operator's read marks (store/inbox.py): kept in the store, so every session and a
reopened store see the same unread messages; "mark read" marks only the ids given that are
messages to the operator; the unread count never goes below 0 when the sender's quota
drops messages marked read."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperhive.core.store import Store
from hyperhive.core.store import inbox as inbox_module
from hyperhive.wire.common import AgentSpec


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "hive.db")
    yield s
    s.close()


def to_operator(store: Store, sender: str, n: int) -> list[int]:
    return [store.messages.send("operator", sender, "message", f"{sender} {i}").id for i in range(n)]


def test_marks_move_over_what_is_read_in_a_row_and_keep_the_rest(store: Store) -> None:
    ids = to_operator(store, "alice", 5)
    other = store.messages.send("bob", "alice", "message", "not the operator's").id
    assert store.inbox_read.state() == (0, set()) and store.inbox_read.unread() == 5
    store.inbox_read.take({ids[0], ids[2], other, 10**12})
    # the first in a row moves the mark; the third stays above it; the others are no one's
    assert store.inbox_read.state() == (ids[0], {ids[2]})
    assert store.inbox_read.unread() == 3
    store.inbox_read.take({ids[1]})
    assert store.inbox_read.state() == (ids[2], set())
    assert store.inbox_read.unread() == 2


def test_marks_outlive_the_store_and_belong_to_no_session(tmp_path: Path) -> None:
    path = tmp_path / "hive.db"
    s = Store(path)
    ids = to_operator(s, "alice", 3)
    s.inbox_read.take({ids[1]})
    s.close()
    again = Store(path)
    try:
        assert again.inbox_read.state() == (0, {ids[1]})
        assert again.inbox_read.unread() == 2
    finally:
        again.close()


def test_a_dropped_message_marked_read_leaves_the_count_whole(store: Store) -> None:
    ids = to_operator(store, "alice", 4)
    store.inbox_read.take({ids[1], ids[2]})
    assert store.inbox_read.unread() == 2
    # the sender's quota drops its oldest messages to the operator, read or not
    (new,) = store.messages.send_many([("operator", "alice", "message", "x")], quota=(2, 1 << 20))
    left = [r[0] for r in store.db.conn.execute("SELECT id FROM messages ORDER BY id")]
    assert left == [ids[3], new.id], left  # both read ones dropped
    # before (marks in memory): 4 above the mark less 2 read = 2 then, 0 now; both unread
    assert store.inbox_read.unread() == 2
    store.inbox_read.take(set())  # forgets the ids of messages gone
    assert store.inbox_read.state() == (0, set())


def test_marks_above_the_mark_are_bounded(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inbox_module, "READ_MAX", 3)
    ids = to_operator(store, "alice", 8)
    store.inbox_read.take(set(ids[1:]))  # ids[0] unread: nothing moves the mark
    mark, read = store.inbox_read.state()
    assert mark == 0 and read == set(ids[1:4]), read
    assert store.inbox_read.unread() == 5


def test_the_inbox_counts_read_the_operators_messages_only(store: Store) -> None:
    """Migration 11's ``messages_operator``: the counts and pages of the inbox seek the
    operator's messages by id; without it they read every message above the mark, the
    agents' to each other too (16 ms a count at 300,000 messages)."""
    queries = [
        ("SELECT count(*) FROM (SELECT 1 FROM messages m WHERE m.recipient=? AND m.id>?"
         " AND NOT EXISTS (SELECT 1 FROM inbox_read r WHERE r.id = m.id) LIMIT ?)",
         ("operator", 0, 10)),
        ("SELECT id, sender FROM messages WHERE recipient=? AND id>? AND id<? ORDER BY id",
         ("operator", 0, 10)),
    ]  # fmt: skip
    for sql, args in queries:
        plan = " ".join(r[3] for r in store.db.conn.execute("EXPLAIN QUERY PLAN " + sql, args))
        assert "USING INDEX messages_operator" in plan, (sql, plan)


def test_the_inbox_total_is_the_senders_held_messages_to_the_operator(store: Store) -> None:
    """store.usage.to_operator (the inbox's "of N", one row an agent) agrees with a count
    of the messages to the operator through sends, messages between agents and their
    acks, quota drops and a sender destroyed (its messages to the operator stay)."""
    from hyperhive.core.store.messages import ack_in

    def count() -> int:
        return int(store.db.conn.execute(
            "SELECT count(*) FROM messages WHERE recipient='operator'").fetchone()[0])

    to_operator(store, "alice", 5)
    to_operator(store, "bob", 3)
    between = store.messages.send("bob", "alice", "message", "hi").id
    with store.db.tx() as tx:
        ack_in(tx, "bob", [between])
    store.messages.send_many([("operator", "alice", "message", "x")], quota=(3, 1 << 20))
    assert store.usage.to_operator() == count() == 6
    spec = AgentSpec.model_validate({"runtime": "command", "command": ["true"]})
    store.agents.create("carol", spec, None, "operator")
    to_operator(store, "carol", 2)
    store.messages.send("carol", "alice", "message", "to carol, unread")
    store.agents.delete("carol")  # its inbox goes, its messages to the operator stay
    assert store.usage.to_operator() == count() == 8


def test_unread_is_counted_up_to_its_bound(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inbox_module, "UNREAD_COUNTED", 5)
    ids = to_operator(store, "alice", 9)
    assert store.inbox_read.unread() == 6  # past the bound: 5 + 1 ("5+" on the page)
    store.inbox_read.take(set(ids[:6]))
    assert store.inbox_read.unread() == 3

"""The storage quota's counters (agent_usage) on every path that adds or removes a
message row, checked against a SUM over the rows after each change: a send (one, a
batch, the group commit's lane, to the operator making room), an ack (one id, several,
twice, refused, a turn's), a question and its answer, an approval's outcome, a reminder,
a history prune, an agent deleted, a savepoint or a whole transaction rolled back, and a
store migrated from an older schema. All four counters, for every agent that holds
anything: a drift on any path fails here (the hot path keeps the counters in Python,
not in triggers, since session 12)."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import USAGE_SUM, store_at_version
from hyperhive.core.groupcommit import GroupCommit
from hyperhive.core.refusals import NotFound
from hyperhive.core.store import Store, StoreError
from hyperhive.core.store.messages import (
    HELD_BYTES,
    HOLDER,
    REMINDER_SENDER,
    MessageItem,
    ack_in,
    held_size,
    insert_message,
    insert_messages,
    send_in,
    wire_for_recipient,
)
from hyperhive.wire.common import AgentSpec

SPEC = AgentSpec.model_validate({"runtime": "command", "command": ["true"]})


def summed(conn: sqlite3.Connection) -> dict[str, tuple[int, int, int, int]]:
    """What agent_usage must say, by a SUM over every row."""
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in conn.execute(USAGE_SUM)}


def counted(conn: sqlite3.Connection) -> dict[str, tuple[int, int, int, int]]:
    """What agent_usage says (a row of zeros is the same as no row)."""
    rows = conn.execute("SELECT agent, pending, bytes, op_pending, op_bytes FROM agent_usage")
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows if any(r[1:])}


def check(store: Store) -> dict[str, tuple[int, int, int, int]]:
    want = summed(store.db.conn)
    assert counted(store.db.conn) == want
    return want


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "hive.db")
    s.agents.sync_config({})
    for name in ("x", "y", "z"):
        s.agents.create(name, SPEC, None, "operator")
    yield s
    s.close()


def test_every_path_keeps_the_counters(store: Store) -> None:
    held = check(store)
    assert held == {}
    # One message, and one with options (a question's copy), non-ASCII bodies.
    m1 = store.messages.send("y", "x", "message", "héllo wörld")
    q, qm = store.questions.ask("x", "y", "which?", ["à", "b"])
    assert qm is not None
    held = check(store)
    assert held["x"] == (
        3,
        2 * (len("which?") + len('["\\u00e0", "b"]')) + len("héllo wörld".encode()),
        0,
        0,
    )
    # The group commit's lane: several senders, one sender twice, one executemany.
    items: list[MessageItem] = [("y", "x", "ab", 2), ("x", "y", "ç", 2), ("z", "x", "", 0)]
    with store.db.tx() as tx:
        last = insert_messages(tx, items, 1.0)
    lane_ids = [last - 2, last - 1, last]
    check(store)
    # Sends to the operator, with and without room to make.
    store.messages.send_many([("operator", "y", "message", "to you")])
    for i in range(4):
        store.messages.send_many(
            [("operator", "x", "message", f"op{i}" + "." * 50)], quota=(8, 10_000)
        )
    held = check(store)
    assert held["x"][0] == 8 and held["x"][2] == 3  # room made: the oldest to the operator went
    # Acks: one id, several ids (one acked already), again (nothing new), a refusal.
    assert store.messages.ack("y", [m1.id]) == 1
    check(store)
    assert store.messages.ack("y", [lane_ids[0], m1.id, qm.id]) == 2
    check(store)
    assert store.messages.ack("y", [qm.id]) == 0
    with pytest.raises(NotFound):
        store.messages.ack("y", [lane_ids[1]])  # x's, not y's: nothing written
    with pytest.raises(NotFound):
        store.messages.ack("x", [lane_ids[1], 10**9])
    check(store)
    # The answer (a message to x) and the question closed.
    _, answer = store.questions.answer(q.id, "y", "à")
    check(store)
    # A turn ends: its message acked with the transcript's exit.
    store.transcripts.finish_turn("x", answer.id, {"ok": True})
    store.transcripts.finish_turn("x", answer.id, {"ok": True})  # acked already
    check(store)
    # An approval, resolved: the operator's message about it is held by "operator".
    a = store.approvals.request("z", "custom", "please", {"k": "v"})
    check(store)
    store.approvals.resolve(a.id, "denied", "no")
    check(store)
    # A reminder, delivered as a message from the hive: held by the agent that set it
    # until acked (red team round 25a), like a message it sent.
    before = check(store).get("z", (0, 0, 0, 0))
    store.reminders.add("z", 0.0, "ping")
    check(store)
    (delivered,) = store.reminders.deliver_due(1.0)
    held = check(store)
    assert held["z"][:2] == (before[0] + 1, before[1] + 4) and "hive" not in held
    assert store.messages.ack("z", [delivered.id]) == 1
    assert check(store).get("z", (0, 0, 0, 0)) == before
    store.reminders.add("z", 0.0, "pong")
    store.reminders.deliver_due(1.0)  # left unacked: the agent's deletion below takes it
    check(store)
    # A history prune: x's messages to the operator past keep go, unacked as they are.
    store.history_keep = 2
    store.history.prune("x")
    held = check(store)
    assert held["x"][2] == 2
    # An agent deleted: the unacked messages to it go (their senders hold less), its own
    # question to the operator is cancelled.
    store.messages.send("z", "y", "message", "for z")
    store.questions.ask("z", "operator", "may I?", None)
    check(store)
    store.agents.delete("z")
    held = check(store)
    assert "z" not in held


def test_a_rolled_back_part_counts_nothing(store: Store) -> None:
    store.messages.send("y", "x", "message", "kept")
    before = check(store)
    with pytest.raises(RuntimeError), store.db.tx() as tx:
        insert_message(tx, "y", "x", "message", "gone")
        insert_messages(tx, [("y", "x", "gone too", 8)], 1.0)
        raise RuntimeError("rolled back")
    assert check(store) == before
    with store.db.tx() as tx:
        insert_message(tx, "y", "x", "message", "kept too")
        with pytest.raises(RuntimeError), tx.savepoint("part"):
            insert_message(tx, "y", "x", "message", "undone")
            insert_messages(tx, [("y", "z", "undone too", 10)], 1.0)
            ack_in(tx, "y", [1])
            raise RuntimeError("this part only")
        insert_messages(tx, [("x", "z", "after", 5)], 1.0)
    held = check(store)
    assert held["x"] == (2, len("kept") + len("kept too"), 0, 0) and held["z"] == (1, 5, 0, 0)


def test_the_group_commit_counts_a_batch_of_sends_and_acks(store: Store) -> None:
    """The 64 pairs' batch: each sender's next message and the ack of its previous one
    in one commit; a refused ack, and a batch rolled back whole, count nothing."""

    class Hooks:
        def message_taken(self, item: MessageItem) -> None:
            pass

        def message_stored(self, mid: int, item: MessageItem, sent_at: float) -> None:
            pass

        def lane_committed(self, before: int, after: int) -> None:
            pass

    async def run() -> None:
        gc = GroupCommit(store.db, Hooks())
        first = await asyncio.gather(
            *(gc.submit_message(("y", s, "m" * n, n)) for s, n in (("x", 3), ("z", 5)))
        )
        check(store)
        second = [
            gc.submit_message(("y", "x", "next", 4)),
            gc.submit_message(("y", "z", "nëxt", 5)),
        ]
        acks = [gc.submit(lambda tx, i=i: ack_in(tx, "y", [i]), shrinks=True) for i in first]
        refused = gc.submit(lambda tx: ack_in(tx, "y", [10**9]), shrinks=True)
        to_op = gc.submit(
            lambda tx: send_in(tx, ("operator", "x", "message", "hi"), (100, 1 << 20))
        )
        done = await asyncio.gather(*second, *acks, refused, to_op, return_exceptions=True)
        assert isinstance(done[4], NotFound) and done[2:4] == [1, 1]
        held = check(store)
        assert held["x"] == (2, 4 + 2, 1, 2) and held["z"] == (1, 5, 0, 0)

        def broken(tx: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        futs = [
            gc.submit_message(("y", "x", "lost", 4)),
            gc.submit(lambda tx: ack_in(tx, "y", [second[0].result()]), shrinks=True),
            gc.submit(broken),
        ]
        out = await asyncio.gather(*futs, return_exceptions=True)
        assert all(isinstance(e, StoreError | sqlite3.Error) for e in out)
        assert check(store) == held

    asyncio.run(run())


def test_a_random_mix_of_every_path(store: Store) -> None:
    """Seeded: sends (one, lane batches, to the operator with room made), acks of one or
    several ids (some not the acker's), answers, turns, prunes, in any order."""
    rnd = random.Random(1712)
    agents = ["x", "y", "z"]
    store.history_keep = 3
    for _ in range(400):
        op = rnd.randrange(8)
        a, b = rnd.sample(agents, 2)
        body = rnd.choice(["", "a", "héllo", "ü" * rnd.randrange(40), "x" * rnd.randrange(300)])
        unacked = [
            r[0]
            for r in store.db.conn.execute(
                "SELECT id FROM messages WHERE recipient=? AND acked_at IS NULL", (a,)
            )
        ]
        if op == 0:
            store.messages.send(a, b, "message", body)
        elif op == 1:
            n = rnd.randrange(1, 6)
            with store.db.tx() as tx:
                insert_messages(
                    tx,
                    [
                        (rnd.choice(agents), rnd.choice(agents), body, len(body.encode()))
                        for _ in range(n)
                    ],
                    1.0,
                )
        elif op == 2:
            store.messages.send_many([("operator", a, "message", body)], quota=(5, 2000))
        elif op == 3 and unacked:
            ids = rnd.sample(unacked, rnd.randrange(1, min(4, len(unacked)) + 1))
            if rnd.random() < 0.2:
                ids.append(rnd.randrange(1, 2000))  # maybe another's: the whole ack refused
            try:
                store.messages.ack(a, ids)
            except NotFound:
                pass
        elif op == 4:
            q, _ = store.questions.ask(a, b, body or "?", ["o"] if rnd.random() < 0.5 else None)
            if rnd.random() < 0.5:
                store.questions.answer(q.id, b, body)
        elif op == 5 and unacked:
            store.transcripts.finish_turn(a, rnd.choice(unacked), {})
        elif op == 6:
            store.history.prune(a)
        elif op == 7 and unacked:
            with store.db.tx() as tx:
                ack_in(tx, a, [rnd.choice(unacked)])
                insert_messages(tx, [(b, a, body, len(body.encode()))], 1.0)
        check(store)


@pytest.mark.parametrize("version", [5, 8])
def test_a_migrated_store_keeps_its_counts_and_keeps_them_right(
    tmp_path: Path, version: int
) -> None:
    """A store of before (counted by its triggers) opens with its counts as they were, and
    every later change keeps them right."""
    path = tmp_path / "old.db"
    store_at_version(path, version)
    db = sqlite3.connect(path, isolation_level=None)
    for i in range(5):
        db.execute(
            "INSERT INTO messages (recipient, sender, kind, body, sent_at) VALUES ('y', 'x', 'message', ?, 1)",
            ("é" * i,),
        )
    db.execute(
        "INSERT INTO messages (recipient, sender, kind, body, sent_at) VALUES ('operator', 'x', 'message', 'op', 1)"
    )
    db.execute("UPDATE messages SET acked_at = 2 WHERE id = 1")
    db.close()
    s = Store(path)
    try:
        held = check(s)
        assert held["x"] == (5, 2 + 4 + 6 + 8 + 2, 1, 2)
        s.messages.ack("y", [2, 3])
        s.messages.send("y", "x", "message", "new")
        with s.db.tx() as tx:
            insert_messages(tx, [("y", "x", "lane", 4)], 1.0)
        s.history_keep = 1
        s.history.prune("x")
        assert check(s)["x"] == (5, 6 + 8 + 2 + 3 + 4, 1, 2)
    finally:
        s.close()


def test_migration_13_moves_delivered_reminders_to_the_agents_that_set_them(tmp_path: Path) -> None:
    """A store of before (its delivered, unacked reminders counted in the "hive" row) opens
    with them in their agents' counts, and an ack or a deletion takes them out there."""
    path = tmp_path / "old.db"
    store_at_version(path, 12)
    db = sqlite3.connect(path, isolation_level=None)
    for recipient, body in (("x", "ping"), ("x", "été"), ("y", "p")):
        db.execute(
            "INSERT INTO messages (recipient, sender, kind, body, sent_at) VALUES (?, 'hive', 'reminder', ?, 1)",
            (recipient, body),
        )
    db.execute("INSERT INTO messages (recipient, sender, kind, body, sent_at, acked_at) VALUES ('x', 'hive', 'reminder', 'old', 1, 2)")
    # What session 21's code counted for them: the "hive" row; and x's own message to y.
    db.execute("INSERT INTO agent_usage (agent, pending, bytes) VALUES ('hive', 3, 4 + 5 + 1)")
    db.execute("INSERT INTO messages (recipient, sender, kind, body, sent_at) VALUES ('y', 'x', 'message', 'hi', 1)")
    db.execute("INSERT INTO agent_usage (agent, pending, bytes) VALUES ('x', 1, 2)")
    db.close()
    s = Store(path)
    try:
        assert check(s) == {"x": (3, 2 + 4 + 5, 0, 0), "y": (1, 1, 0, 0)}
        assert s.messages.ack("x", [1]) == 1
        assert check(s)["x"] == (2, 2 + 5, 0, 0)
        s.db.conn.execute("DELETE FROM messages WHERE recipient='y' AND sender='hive'")
        assert check(s) == {"x": (2, 2 + 5, 0, 0)}
    finally:
        s.close()


def test_room_is_made_counting_the_same_transactions_sends(store: Store) -> None:
    """Two messages to the operator in one transaction (one group commit), a quota of one:
    the second makes room by dropping the first, which only its own transaction counts."""
    with store.db.tx() as tx:
        send_in(tx, ("operator", "x", "message", "first"), (1, 1 << 20))
        send_in(tx, ("operator", "x", "message", "second"), (1, 1 << 20))
    assert check(store)["x"] == (1, len("second"), 1, len("second"))
    assert [m.body for m in store.messages.inbox("operator", 0, 10)] == ["second"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.text(max_size=300),
    sender=st.sampled_from(["x", REMINDER_SENDER]),
    kind=st.sampled_from(["message", "answer", "reminder"]),
    options=st.none() | st.lists(st.text(max_size=20), min_size=1, max_size=3),
)
def test_what_a_recv_line_tells_of_a_message_is_what_its_row_holds(
    store: Store, body: str, sender: str, kind: str, options: list[str] | None
) -> None:
    """``held_size`` (the holder and held bytes an ack takes off, read from the recv line
    instead of the row since session 30) is the row's ``HOLDER`` and ``HELD_BYTES``
    whenever it answers, for any text (non-ASCII, NUL, surrogate-free), a reminder's sender
    and any kind; a message with options is left to the row. The ack with what it
    said keeps the counters."""
    with store.db.tx() as tx:
        m = insert_message(tx, "y", sender, kind, body, None, options)
    row = next(iter(store.messages.unacked_above("y", 1, m.id - 1)))
    size = held_size("y", wire_for_recipient(row))
    truth = store.db.conn.execute(
        f"SELECT {HOLDER}, {HELD_BYTES} FROM messages WHERE id=?", (m.id,)
    ).fetchone()
    if options is None:
        assert size == tuple(truth)
    else:
        assert size is None
    with store.db.tx() as tx:
        assert ack_in(tx, "y", [m.id], size) == 1
    check(store)

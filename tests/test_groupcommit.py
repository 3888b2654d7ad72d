"""Group commit (core/groupcommit.py) on a real store: the writes of one loop turn share a
transaction; a refusal refuses its own write alone, any other error refuses them all and
stores none; each caller resumes only once its write is committed."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperhive.core.groupcommit import GroupCommit
from hyperhive.core.refusals import NotFound
from hyperhive.core.store import Store, StoreError
from hyperhive.core.store.db import Tx
from hyperhive.core.store.messages import MessageItem, ack_in, send_in


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "hive.db")
    yield s
    s.close()


def count(db_path: Path) -> int:
    """Messages committed, as another connection sees them (what a crash would leave)."""
    with sqlite3.connect(db_path) as other:
        return int(other.execute("SELECT count(*) FROM messages").fetchone()[0])


def test_one_turn_is_one_commit_and_a_refusal_is_its_own(store: Store, tmp_path: Path) -> None:
    seen: list[Any] = []

    async def turn() -> list[Any]:
        gc = GroupCommit(store.db)
        before = store.db.commits
        futs = [
            gc.submit(lambda tx: send_in(tx, ("bob", "alice", "message", "one")), seen.append),
            gc.submit(lambda tx: ack_in(tx, "bob", [424242])),  # not in bob's inbox
            gc.submit(lambda tx: send_in(tx, ("bob", "alice", "message", "two")), seen.append),
        ]
        assert count(tmp_path / "hive.db") == 0  # queued, not yet committed
        out = await asyncio.gather(*futs, return_exceptions=True)
        assert store.db.commits == before + 1  # the three shared one transaction
        return out

    one, refused, two = asyncio.run(turn())
    assert isinstance(refused, NotFound) and str(refused) == "no message 424242 in this inbox"
    assert (one.body, two.body) == ("one", "two") and two.id == one.id + 1
    assert seen == [one, two]  # `done` ran for each committed write, in order
    assert count(tmp_path / "hive.db") == 2


def test_an_error_refuses_the_whole_batch_and_stores_nothing(store: Store, tmp_path: Path) -> None:
    def broken(tx: Tx) -> None:
        tx.execute("INSERT INTO no_such_table VALUES (1)")

    async def turn() -> list[Any]:
        gc = GroupCommit(store.db)
        futs = [
            gc.submit(lambda tx: send_in(tx, ("bob", "alice", "message", "lost"))),
            gc.submit(broken),
        ]
        return await asyncio.gather(*futs, return_exceptions=True)

    results = asyncio.run(turn())
    assert all(isinstance(r, StoreError) and "no such table" in str(r) for r in results), results
    assert count(tmp_path / "hive.db") == 0


def test_a_cancelled_caller_write_still_commits(store: Store, tmp_path: Path) -> None:
    """A sender that hangs up after its send was queued: the message is stored and its
    recipient told (``done``) all the same."""
    delivered: list[Any] = []

    async def turn() -> None:
        gc = GroupCommit(store.db)
        fut = gc.submit(lambda tx: send_in(tx, ("bob", "alice", "message", "m")), delivered.append)
        fut.cancel()
        await asyncio.sleep(0)  # the flush runs
        await asyncio.sleep(0)

    asyncio.run(turn())
    assert [m.body for m in delivered] == ["m"] and count(tmp_path / "hive.db") == 1


class Hooks:
    """The hive's side of the message lane, recorded."""

    def __init__(self) -> None:
        self.taken: list[MessageItem] = []
        self.stored: list[tuple[int, MessageItem]] = []
        self.lanes: list[tuple[int, int]] = []

    def message_taken(self, item: MessageItem) -> None:
        self.taken.append(item)

    def message_stored(self, mid: int, item: MessageItem, sent_at: float) -> None:
        self.stored.append((mid, item))

    def lane_committed(self, before: int, after: int) -> None:
        assert not self.stored, "lane_committed runs before the batch's message_stored"
        self.lanes.append((before, after))


def test_the_message_lane_keeps_order_and_ids_among_other_writes(
    store: Store, tmp_path: Path
) -> None:
    """Lane messages around a generic write in one turn: one commit, each its own id in
    queue order (a run is one executemany), the rows as queued, the hooks for each."""
    hooks = Hooks()
    items: list[MessageItem] = [("bob", "alice", f"l{i}", 2) for i in range(5)]

    async def turn() -> list[Any]:
        gc = GroupCommit(store.db, hooks)
        before = store.db.commits
        futs: list[asyncio.Future[Any]] = [gc.submit_message(it) for it in items[:3]]
        futs.append(gc.submit(lambda tx: send_in(tx, ("bob", "carol", "message", "g"))))
        futs += [gc.submit_message(it) for it in items[3:]]
        out = await asyncio.gather(*futs)
        assert store.db.commits == before + 1
        return out

    ids = asyncio.run(turn())
    lane = ids[:3] + ids[4:]
    generic = ids[3].id
    assert lane[:3] == [generic - 3, generic - 2, generic - 1] and lane[3:] == [
        generic + 1,
        generic + 2,
    ]
    assert hooks.taken == items and hooks.stored == list(zip(lane, items, strict=True))
    rows = [
        r
        for r in sqlite3.connect(tmp_path / "hive.db").execute(
            "SELECT id, recipient, sender, kind, body, acked_at FROM messages ORDER BY id"
        )
    ]
    assert [r[4] for r in rows] == ["l0", "l1", "l2", "g", "l3", "l4"]
    assert all(r[3] == "message" and r[5] is None for r in rows)
    assert [r[0] for r in rows] == sorted([*lane, generic])


def test_an_error_refuses_the_lane_too(store: Store, tmp_path: Path) -> None:
    hooks = Hooks()

    def broken(tx: Tx) -> None:
        tx.execute("INSERT INTO no_such_table VALUES (1)")

    async def turn() -> list[Any]:
        gc = GroupCommit(store.db, hooks)
        futs = [gc.submit_message(("bob", "alice", "lost", 4)), gc.submit(broken)]
        return await asyncio.gather(*futs, return_exceptions=True)

    results = asyncio.run(turn())
    assert all(isinstance(r, StoreError) for r in results), results
    assert count(tmp_path / "hive.db") == 0 and hooks.stored == [] and len(hooks.taken) == 1


def test_a_batch_of_messages_and_acks_alone_is_said_to_be_one(store: Store) -> None:
    """lane_committed (what lets the hive keep its quota reads) for a batch of lane messages
    and ``shrinks`` writes, with the commit count before and after; never for a batch with
    any other write, nor for one rolled back."""
    first = store.messages.send("bob", "alice", "message", "old").id

    async def turn(generic: bool) -> list[Any]:
        gc = GroupCommit(store.db, hooks)
        futs: list[asyncio.Future[Any]] = [gc.submit_message(("bob", "alice", "m", 1))]
        futs.append(gc.submit(lambda tx: ack_in(tx, "bob", [first]), shrinks=True))
        futs.append(gc.submit_message(("bob", "alice", "n", 1)))
        if generic:
            futs.append(gc.submit(lambda tx: send_in(tx, ("bob", "carol", "message", "g"))))
        return await asyncio.gather(*futs)

    hooks = Hooks()
    before = store.db.commits
    # The ack between two messages: both messages one executemany (consecutive ids, in
    # queue order), the ack applied, each reply its own.
    m, acked, n = asyncio.run(turn(generic=False))
    assert (m, n, acked) == (first + 1, first + 2, 1)
    assert hooks.lanes == [(before, before + 1)] and [i for i, _ in hooks.stored] == [m, n]
    hooks = Hooks()
    assert asyncio.run(turn(generic=True))[1] == 0  # acked before
    assert hooks.lanes == [] and len(hooks.stored) == 2

    async def broken() -> list[Any]:
        gc = GroupCommit(store.db, hooks)
        futs = [
            gc.submit_message(("bob", "alice", "lost", 4)),
            gc.submit(lambda tx: tx.execute("INSERT INTO no_such_table VALUES (1)"), shrinks=True),
        ]
        return await asyncio.gather(*futs, return_exceptions=True)

    hooks = Hooks()
    assert all(isinstance(r, StoreError) for r in asyncio.run(broken()))
    assert hooks.lanes == [] and hooks.stored == []

"""A request that changes nothing writes nothing and waits on no commit (issue 17): an
ack of ids acked already, not the agent's or not stored yet; ``recv`` of an empty inbox;
``set_status`` of the text it has. On a real store (the database's commit count), in
process; tests/redteam/test_cheap_verb_flood.py floods them from a real cage."""

from __future__ import annotations

import asyncio

import pytest

from hyperhive.core.actors import Agent
from hyperhive.core.hive import Hive
from hyperhive.core.refusals import Conflict, NotFound
from test_replies import hive  # noqa: F401  (agents a and b, peers)

A, B = Agent("a"), Agent("b")


def test_acks_that_change_nothing_commit_nothing(hive: Hive) -> None:
    async def run() -> None:
        mine = await hive.send(A, "b", "to b")
        theirs = await hive.send(B, "a", "to a")
        assert await hive.ack(B, [mine]) == 1  # a change: committed
        before = hive.store.db.commits
        assert await hive.ack(B, [mine]) == 0  # acked already
        assert await hive.ack(B, [mine, mine]) == 0
        assert await hive.ack(B, []) == 0
        for ids, missing in (([theirs], theirs), ([mine, theirs], theirs), ([10**12], 10**12)):
            with pytest.raises(NotFound, match=f"^no message {missing} in this inbox$"):
                await hive.ack(B, ids)
        page = await hive.recv(B, 1, 0, 10)  # empty inbox
        assert page.items == []
        assert hive.store.db.commits == before
        # ...and the other agent's message is still unacked, its own still acked once.
        row = hive.store.db.conn.execute("SELECT acked_at FROM messages WHERE id=?", (theirs,))
        assert row.fetchone()[0] is None

    asyncio.run(run())


def test_an_ack_of_a_message_handed_out_still_commits(hive: Hive) -> None:
    """The receiver's round: ids all in flight to it skip the read and are committed."""

    async def run() -> None:
        mid = await hive.send(A, "b", "hi")
        page = await hive.recv(B, 7, 0, 10)
        assert [m["id"] for m in page.items] == [mid]
        before = hive.store.db.commits
        assert await hive.ack(B, [mid]) == 1
        assert hive.store.db.commits == before + 1
        # Acked now, and no longer in flight: read, acked 0, no commit.
        assert await hive.ack(B, [mid]) == 0
        assert hive.store.db.commits == before + 1

    asyncio.run(run())


def test_an_ack_of_an_id_not_yet_committed_is_refused(hive: Hive) -> None:
    """In the same turn as the send that takes the id: nobody can have been handed it."""

    async def run() -> None:
        guess = await hive.send(B, "a", "count") + 1
        results = await asyncio.gather(hive.ack(B, [guess]), hive.send(A, "b", "next"), return_exceptions=True)
        assert results[1] == guess
        assert isinstance(results[0], NotFound) and str(results[0]) == f"no message {guess} in this inbox"

    asyncio.run(run())


def test_set_status_of_the_text_it_has_writes_nothing(hive: Hive) -> None:
    at = hive.set_status(A, "busy")
    before = hive.store.db.commits
    assert hive.set_status(A, "busy") == at
    assert hive.store.db.commits == before
    assert hive.set_status(A, "free") >= at
    assert hive.store.db.commits == before + 1


def test_a_refused_answer_opens_no_write_transaction(hive: Hive) -> None:
    """No such question, another's, answered already: refused on a read. Before, each was
    a write transaction rolled back (the commit count a cache's key: every known inbox
    read again)."""
    qid = hive.ask(A, "b", "ready?", None)
    assert hive.answer(B, qid, "yes") == qid
    before = hive.store.db.commits
    with pytest.raises(Conflict, match=f"^question {qid} is already answered$"):
        hive.answer(B, qid, "again")
    with pytest.raises(NotFound, match=f"^no question {qid} addressed to a$"):
        hive.answer(A, qid, "not mine")
    with pytest.raises(NotFound, match=r"^no question 999999 addressed to b$"):
        hive.answer(B, 999999, "nothing")
    assert hive.store.db.commits == before

"""A rider (core/store/db.py's ``riding``) commits in the transaction of the write it
rides, and only with it: what marks a carried operator action applied in the same
transaction as its effect (swarm/opstore.py; docs/swarm.md, "Carried out concurrently,
and once"). On a real store: a plain transaction, a refused one, and a group commit
batching several tasks' writes, each with its own rider or none."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hyperhive.core.groupcommit import GroupCommit
from hyperhive.core.refusals import Conflict
from hyperhive.core.store import Store
from hyperhive.core.store.db import Tx, riding
from hyperhive.swarm.opstore import OpsSeen


def state(seen: OpsSeen, action_id: str) -> str:
    row = seen.get("a", action_id)
    assert row is not None
    return row.state


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = Store(tmp_path / "hive.db")
    yield st
    st.close()


def test_a_rider_commits_with_the_transaction_it_rides_and_not_without(store: Store) -> None:
    seen = OpsSeen(store.db)
    for n, aid in enumerate(("x" * 32, "y" * 32, "z" * 32)):
        assert seen.claim("a", aid, "0" * 64, n)
    with riding(seen.rider("a", "x" * 32)), store.db.tx() as tx:
        tx.execute("CREATE TABLE effect (v INTEGER)")
    assert state(seen, "x" * 32) == "applied"
    # Refused half-way: the effect and the mark are undone together.
    with pytest.raises(Conflict), riding(seen.rider("a", "y" * 32)), store.db.tx() as tx:
        tx.execute("INSERT INTO effect VALUES (1)")
        raise Conflict("no")
    assert state(seen, "y" * 32) == "taken"
    assert store.db.conn.execute("SELECT count(*) FROM effect").fetchone()[0] == 0
    # Ended (the action carried out): a task that inherited it writes no mark any more.
    rider = seen.rider("a", "z" * 32)
    rider.end()
    with riding(rider), store.db.tx() as tx:
        tx.execute("INSERT INTO effect VALUES (2)")
    assert state(seen, "z" * 32) == "taken"
    # Done is done: a late rider doesn't take it back to applied.
    seen.done("a", "x" * 32, {"ok": True})
    with riding(seen.rider("a", "x" * 32)), store.db.tx() as tx:
        tx.execute("INSERT INTO effect VALUES (3)")
    assert state(seen, "x" * 32) == "done"


def test_a_group_commit_runs_each_writes_rider_and_only_for_a_write_that_stood(store: Store) -> None:
    seen = OpsSeen(store.db)
    ids = ["1" * 32, "2" * 32, "3" * 32]
    for n, aid in enumerate(ids):
        assert seen.claim("a", aid, "0" * 64, n)
    with store.db.tx() as tx:
        tx.execute("CREATE TABLE effect (v INTEGER)")

    def write(v: int) -> Callable[[Tx], int]:
        def work(tx: Tx) -> int:
            if v == 2:
                raise Conflict("refused before it wrote anything")
            tx.execute("INSERT INTO effect VALUES (?)", (v,))
            return v

        return work

    async def main() -> list[object]:
        commits = GroupCommit(store.db)

        async def one(v: int, rider_id: str | None) -> object:
            if rider_id is None:
                return await commits.submit(write(v))
            with riding(seen.rider("a", rider_id)):
                return await commits.submit(write(v))

        # One turn of the loop: one batch, one transaction. Action 2's write is refused (it
        # comes first: the batch is not run as its first submitter's), action 1's stands,
        # and a write with no rider (any other task's) marks nothing.
        return await asyncio.gather(one(2, ids[1]), one(1, ids[0]), one(4, None),
                                    return_exceptions=True)  # fmt: skip

    results = asyncio.run(main())
    assert isinstance(results[0], Conflict) and results[1:] == [1, 4]
    assert [state(seen, i) for i in ids] == ["applied", "taken", "taken"]
    assert sorted(r[0] for r in store.db.conn.execute("SELECT v FROM effect")) == [1, 4]

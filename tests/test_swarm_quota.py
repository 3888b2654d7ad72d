"""The storage quota across hosts (swarm/quota.py) on two stores of their own, no bus:
what host a queues counts in its sender's quota until host b's report says the recipient
acked it; b bounds what it holds per remote sender and per sending host, storing a bundle
up to the bound and the rest on a later try. The bus end to end:
redteam/test_red_round7.py (a caged-sender flood) and test_swarm.py (normal traffic)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperhive.core.store import Store
from hyperhive.swarm import asks
from hyperhive.swarm.outbox import NO_BOUND, SwarmStore


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Store, SwarmStore, Store, SwarmStore]]:
    a_store, b_store = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    yield a_store, SwarmStore(a_store.db), b_store, SwarmStore(b_store.db)
    a_store.close()
    b_store.close()


def usage(store: Store, agent: str) -> tuple[int, int]:
    u = store.usage.of(agent)
    return u.rows, u.bytes


def carried(src: SwarmStore) -> list[dict[str, Any]]:
    rows = src.unsent(100)
    src.mark_sent([o.row for o in rows])
    return [json.loads(o.payload) for o in rows]


def item(i: int, sender: str = "alice", body: str = "hello") -> dict[str, Any]:
    return {"id": f"{sender}-{i}", "from": sender, "to": "bob", "kind": "message", "body": body}


def test_a_cross_host_message_counts_until_the_other_host_releases_it(hosts: Any) -> None:
    a_store, a, b_store, b = hosts
    for i in range(3):
        a.queue("b", "alice", "bob", "message", f"m{i}")
    assert usage(a_store, "alice") == (3, 6)  # in the outbox: counted, as a local send
    msgs = b.receive(carried(a), "a")
    assert usage(a_store, "alice") == (3, 6)  # carried: still (b has not said bob read them)
    assert b.unreported(10) == []
    b_store.messages.ack("bob", [msgs[0].id, msgs[1].id])
    report = b.unreported(10)
    assert report == [("a", "alice", 2, 4)]
    b.reported(report)
    assert b.unreported(10) == []
    assert a.release({("b", "alice"): (2, 4)}) == 1
    assert usage(a_store, "alice") == (1, 2)
    assert a.release({("b", "alice"): (2, 4)}) == 0  # the same report again: nothing
    assert a.release({("b", "alice"): (1, 2)}) == 0  # never downward
    # A hostile b can release no more than was sent to it, and nothing sent elsewhere.
    a.queue("c", "alice", "carol", "message", "to c")
    assert a.release({("b", "alice"): (10**9, 10**12), ("b", "zed"): (5, 5)}) == 1
    assert usage(a_store, "alice") == (1, 4)  # "to c" only


def test_a_question_counts_twice_and_an_undeliverable_item_is_released_at_once(hosts: Any) -> None:
    a_store, a, _, b = hosts
    asks.ask(a.db, "b", "alice", "bob", "lunch?", ["yes", "no"])
    nbytes = len("lunch?") + len(json.dumps(["yes", "no"]))
    assert usage(a_store, "alice") == (2, 2 * nbytes)  # its row here, its copy there (as on one host)
    [q] = carried(a)
    a.queue("b", "alice", "nobody", "message", "lost")
    lost = carried(a)[0]
    msgs, whole = b.take([(q, True), (lost, False)], "a", NO_BOUND, NO_BOUND)
    assert whole and [m.kind for m in msgs] == ["question"]
    assert b.unreported(10) == [("a", "alice", 1, 4)]  # "lost" only; the question waits for bob


def test_the_receiving_host_bounds_each_sender_and_each_host(hosts: Any) -> None:
    _, _, b_store, b = hosts
    per_agent, per_host = (3, 1 << 30), (5, 1 << 30)
    alice = [item(i) for i in range(4)]
    msgs, whole = b.take([(p, True) for p in alice], "a", per_agent, per_host)
    assert not whole and [m.body for m in msgs] == ["hello"] * 3  # the 4th waits
    msgs, whole = b.take([(p, True) for p in alice], "a", per_agent, per_host)
    assert (msgs, whole) == ([], False)  # tried again: the 3 are seen, the 4th still waits
    carl = [item(i, "carl") for i in range(3)]
    msgs, whole = b.take([(p, True) for p in carl], "a", per_agent, per_host)
    assert not whole and len(msgs) == 2  # host a's bound: 5 in all
    # Another host's traffic has room of its own.
    msgs, whole = b.take([(item(0, "cora"), True)], "c", per_agent, per_host)
    assert whole and len(msgs) == 1
    # bob reads one of alice's: room for her 4th, in order after the 3.
    first = next(iter(b_store.messages.unacked("bob", 1, set())))
    b_store.messages.ack("bob", [first.id])
    msgs, whole = b.take([(p, True) for p in alice], "a", per_agent, per_host)
    assert whole and [m.from_ for m in msgs] == ["alice"]
    bodies = [(m.from_, m.id) for m in b_store.messages.unacked("bob", 100, set())]
    assert [f for f, _ in bodies].count("alice") == 3 and len(bodies) == 6
    # One item alone always fits (a bound smaller than one message stops no sender for good).
    msgs, whole = b.take([(item(0, "dora", "x" * 100), True)], "d", (10, 10), (10, 10))
    assert whole and len(msgs) == 1

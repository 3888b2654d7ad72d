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
from hyperhive.swarm import asks, quota
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
    assert report == [("a", "alice", 2, 4, "")]
    b.reported(report)
    assert b.unreported(10) == []
    assert a.release({("b", "alice"): (2, 4, b.epoch, "")}) == 1
    assert usage(a_store, "alice") == (1, 2)
    assert a.release({("b", "alice"): (2, 4, b.epoch, "")}) == 0  # the same report again: nothing
    assert a.release({("b", "alice"): (1, 2, b.epoch, "")}) == 0  # never downward
    # A hostile b can release no more than was sent to it, and nothing sent elsewhere.
    a.queue("c", "alice", "carol", "message", "to c")
    assert (
        a.release({("b", "alice"): (10**9, 10**12, b.epoch, ""), ("b", "zed"): (5, 5, b.epoch, "")})
        == 1
    )
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
    assert b.unreported(10) == [("a", "alice", 1, 4, "")]  # "lost" only; the question waits for bob


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


def test_a_receiver_whose_store_is_reset_gives_the_quota_back(hosts: Any, tmp_path: Path) -> None:
    """b's store is reset (installed again: its counts start at 0, under a new epoch).
    Before, a applied reports only upward: alice, who had sent b more than her quota
    ever held, got nothing back until b's new counts passed the old ones, and with her
    quota full of messages the old store took with it she could send nothing to anyone.
    Now b's heartbeat names its new store: what alice sent there and b never released is
    released, and the new store's reports count from there (what was in flight at the reset: twice)."""
    a_store, a, b_store, b = hosts
    old_epoch = b.epoch
    assert SwarmStore(b_store.db).epoch == old_epoch  # drawn once per store, kept
    assert a.host_epoch("b", old_epoch) == 0  # the first heartbeat a hears: nothing to do
    for i in range(5):
        a.queue("b", "alice", "bob", "message", f"m{i}")
    msgs = b.receive(carried(a), "a")
    b_store.messages.ack("bob", [m.id for m in msgs[:2]])
    [(_, _, rows, nbytes, _)] = b.unreported(10)
    assert a.release({("b", "alice"): (rows, nbytes, b.epoch, "")}) == 1
    assert usage(a_store, "alice") == (3, 6)  # 3 unread on b
    # b's store is lost with its 3 unread messages; a new one (a new epoch) starts at 0.
    new_store = Store(tmp_path / "b-new.db")
    try:
        new_b = SwarmStore(new_store.db)
        assert new_b.epoch != old_epoch
        a.queue("b", "alice", "bob", "message", "m5")  # in flight as the store is reset
        # The old store's counts are higher than anything the new one reports for a while:
        # before, a report of (1, 2) was "downward" and released nothing.
        assert a.release({("b", "alice"): (0, 0, old_epoch, "")}) == 0
        assert usage(a_store, "alice") == (4, 8)
        assert a.host_epoch("b", new_b.epoch) == 1  # b's heartbeat: a new store
        assert usage(a_store, "alice") == (0, 0)  # the 3 lost and m5 in flight: released
        assert a.host_epoch("b", new_b.epoch) == 0  # each heartbeat after: nothing
        # The new store reads m5 (counted twice: released already, capped at what was sent).
        got = new_b.receive(carried(a), "a")
        new_store.messages.ack("bob", [got[0].id])
        [(_, _, rows, nbytes, _)] = new_b.unreported(10)
        assert (rows, nbytes) == (1, 2)
        assert a.release({("b", "alice"): (rows, nbytes, new_b.epoch, "")}) == 0
        assert usage(a_store, "alice") == (0, 0)
        # Later messages count and are released as before, from the new store's counts.
        for i in range(3):
            a.queue("b", "alice", "bob", "message", f"n{i}")
        assert usage(a_store, "alice") == (3, 6)
        got = new_b.receive(carried(a), "a")
        new_store.messages.ack("bob", [got[0].id])
        [(_, _, rows, nbytes, _)] = new_b.unreported(10)
        assert (rows, nbytes) == (2, 4)  # m5 and n0
        assert a.release({("b", "alice"): (rows, nbytes, new_b.epoch, "")}) == 1
        # n1, n2 unread; m5, in flight at the reset, was released twice (by the reset and
        # by the new store's count): the quota undercounts by what was in flight, never more.
        assert usage(a_store, "alice") == (1, 2)
        # The old store's last report, replayed (a's watch started again): not the store
        # b's heartbeat names, so nothing (taken for a new store, it released n1 and n2).
        assert a.release({("b", "alice"): (10**6, 10**9, old_epoch, "")}) == 0
        assert usage(a_store, "alice") == (1, 2)
    finally:
        new_store.close()


def test_a_report_from_a_new_store_releases_what_the_old_one_held(hosts: Any) -> None:
    """The report (not only the heartbeat) names its store: a report from another store
    than the last one's releases what was sent there and then counts on from that; a
    hostile host switching stores gains nothing it could not release anyway (what was
    sent to it, no more)."""
    a_store, a, _, _ = hosts
    for i in range(4):
        a.queue("b", "alice", "bob", "message", f"m{i}")
    assert a.release({("b", "alice"): (1, 2, "one", "")}) == 1
    assert usage(a_store, "alice") == (3, 6)
    assert a.release({("b", "alice"): (0, 0, "two", "")}) == 1  # a new store: all released
    assert usage(a_store, "alice") == (0, 0)
    a.queue("b", "alice", "bob", "message", "m4")
    assert a.release({("b", "alice"): (10**9, 10**12, "three", "")}) == 1
    assert usage(a_store, "alice") == (0, 0)  # never past what was sent
    a.queue("c", "alice", "carol", "message", "to c")
    assert a.release({("b", "alice"): (0, 0, "four", "")}) == 0
    assert usage(a_store, "alice") == (1, 4)  # what went to c is c's to release


def test_a_report_counts_only_what_the_senders_store_counted(hosts: Any) -> None:
    """A message on a's pair that no store of a's counted (a core of before names no
    store; here, published by someone with a's credentials after a's bundles named one)
    is delivered and held on b, but not counted in what b reports: before, bob's read of
    it put b's report one ahead of what a counted, for good, and a gave alice's next
    unread message back early (her usage read 0 with one unread)."""
    a_store, a, b_store, b = hosts
    a.queue("b", "alice", "bob", "message", "m0")
    msgs = b.receive(carried(a), "a", a.epoch)  # a's bundle names a's store
    stray = b.receive([item(99, body="stray")], "a")  # names none
    assert [m.body for m in msgs + stray] == ["m0", "stray"]
    # b holds it for a all the same: in its bound until read (2 held; a third won't fit).
    assert b.take([(item(100), True)], "a", (2, 100), NO_BOUND, a.epoch)[1] is False
    b_store.messages.ack("bob", [msgs[0].id, stray[0].id])
    assert b.unreported(10) == [("a", "alice", 1, 2, a.epoch)]  # m0 only, for a's store
    a.queue("b", "alice", "bob", "message", "m1")
    a.queue("b", "alice", "bob", "message", "m2")
    msgs = b.receive(carried(a), "a", a.epoch)
    b_store.messages.ack("bob", [msgs[0].id])
    [report] = b.unreported(10)
    assert a.release({("b", "alice"): (*report[2:4], b.epoch, report[4])}) == 1
    assert usage(a_store, "alice") == (1, 2)  # m2, unread on b (before: 0, 0)


def test_a_senders_store_reset_starts_its_count_there_again(hosts: Any, tmp_path: Path) -> None:
    """a's store is reset (a installed again): its counts start at 0 under a new epoch,
    while b's of what alice sent there went on. Before, b's report (cumulative since b's
    store began) was far ahead of what the new store counted: alice's messages were
    given back as soon as b reported anything, unread or not. Now a's bundles name its
    store: b counts what came in the new store's bundles from 0, names the store it
    counts for, and the new store ignores reports that count for the old one."""
    _, a, b_store, b = hosts
    for i in range(3):
        a.queue("b", "alice", "bob", "message", f"m{i}")
    msgs = b.receive(carried(a), "a", a.epoch)
    b_store.messages.ack("bob", [m.id for m in msgs[:2]])  # m2 unread at the reset
    [old] = b.unreported(10)
    b.reported([old])
    assert old == ("a", "alice", 2, 4, a.epoch)
    new_store = Store(tmp_path / "a-new.db")
    try:
        new_a = SwarmStore(new_store.db)
        assert new_a.epoch != a.epoch
        for i in range(2):
            new_a.queue("b", "alice", "bob", "message", f"n{i}")
        assert usage(new_store, "alice") == (2, 4)
        # The old store's report, replayed to the new one's watch: not its count.
        assert new_a.release({("b", "alice"): (2, 4, b.epoch, a.epoch)}) == 0
        # The new store's first bundle on b (ana's, then alice's): m2, the old store's,
        # read on b between them, is out of what b holds and in no store's count.
        new_a.queue("b", "ana", "bob", "message", "hi")
        rows = new_a.unsent(100)
        new_a.mark_sent([o.row for o in rows])
        ana, alices = [json.loads(rows[-1].payload)], [json.loads(o.payload) for o in rows[:-1]]
        b.receive(ana, "a", new_a.epoch)
        m2 = [m.id for m in b_store.messages.unacked("bob", 10, set()) if m.body == "m2"]
        b_store.messages.ack("bob", m2)
        assert b.unreported(10) == [] and len(m2) == 1
        msgs = b.receive(alices, "a", new_a.epoch)
        assert b.unreported(10) == []  # nothing the new store sent is read yet
        b_store.messages.ack("bob", [msgs[0].id])
        [report] = b.unreported(10)
        assert report == ("a", "alice", 1, 2, new_a.epoch)  # n0 (before: 4, m0 m1 m2 n0)
        assert new_a.release({("b", "alice"): (1, 2, b.epoch, new_a.epoch)}) == 1
        assert usage(new_store, "alice") == (1, 2)  # n1 unread
    finally:
        new_store.close()


def test_a_store_of_before_counts_on(tmp_path: Path) -> None:
    """A receiver's store of before (swarm_held and swarm_from without ``gen``, its
    triggers without it): made whole at start, and what it held, and what the first
    bundle naming its sender's store brings, count on (that store counted both)."""
    store = Store(tmp_path / "b.db")
    try:
        b = SwarmStore(store.db)
        held = b.receive([item(0)], "a")
        with store.db.tx() as tx:
            for name in quota.TRIGGER_NAMES:
                tx.execute(f"DROP TRIGGER {name}")
            for table in ("swarm_held", "swarm_from"):
                tx.execute(f"ALTER TABLE {table} DROP COLUMN gen")
        b = SwarmStore(store.db)
        held += b.receive([item(1)], "a", "e1")
        store.messages.ack("bob", [m.id for m in held])
        assert b.unreported(10) == [("a", "alice", 2, 10, "e1")]
    finally:
        store.close()

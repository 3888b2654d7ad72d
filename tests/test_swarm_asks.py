"""Questions across hosts (swarm/asks.py) on two stores of their own, no bus: what host
a queues is what host b receives, and back; an answer is applied only from the host and
agent the question was asked of, once; an agent destroyed on one host closes its open
questions on the other. The bus end to end: test_swarm.py, test_swarm_listing.py and
redteam/test_swarm_answer_spoofing.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hyperhive.core.refusals import Conflict, NotFound
from hyperhive.core.store import Store
from hyperhive.swarm import asks
from hyperhive.swarm.outbox import SwarmStore


def carried(src: SwarmStore) -> list[dict]:
    """The unsent outbox rows (what the bridge would publish), marked sent."""
    rows = src.unsent(100)
    src.mark_sent([o.row for o in rows])
    return [json.loads(o.payload) for o in rows]


def test_a_question_and_its_answer_between_two_hosts(tmp_path: Path) -> None:
    a_store, b_store = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    a, b = SwarmStore(a_store.db), SwarmStore(b_store.db)
    try:
        # a's own question 1 to the operator first: a's and b's ids differ from here on.
        a_store.questions.ask("alice", "operator", "local?", None)
        q = asks.ask(a.db, "b", "alice", "bob", "lunch?", ["yes", "no"])
        [item] = carried(a)
        assert (item["kind"], item["qid"], item["options"]) == ("question", q.id, ["yes", "no"])
        [msg] = b.receive([item], "a")
        assert (msg.kind, msg.to, msg.from_, msg.options) == ("question", "bob", "alice",
                                                             ["yes", "no"])
        assert msg.ref != q.id  # b's own id
        assert b.receive([{**item, "id": "again"}], "a") == []  # asked once, whatever the id
        assert b.dropped == 1
        with pytest.raises(NotFound):
            asks.answer(b.db, msg.ref, "carol", "no")  # not carol's question
        assert asks.answer(b.db, 999, "bob", "x") is None  # no other host asked it
        answered = asks.answer(b.db, msg.ref, "bob", "yes")
        assert answered is not None and answered.answer == "yes"
        with pytest.raises(Conflict):
            asks.answer(b.db, msg.ref, "bob", "no")
        [reply] = carried(b)
        assert (reply["kind"], reply["qid"], reply["from"], reply["to"]) == ("answer", q.id,
                                                                             "bob", "alice")
        # From the wrong host, or naming another agent: dropped, the question still open.
        assert a.receive([{**reply, "id": "r1"}], "c") == []
        assert a.receive([{**reply, "id": "r2", "from": "carol"}], "b") == []
        assert a.dropped == 2
        assert [x.id for x in a_store.questions.open(asker="alice", target="bob")] == [q.id]
        [got] = a.receive([reply], "b")
        assert (got.kind, got.to, got.ref, got.body) == ("answer", "alice", q.id, "yes")
        assert a_store.questions.open(asker="alice", target="bob") == []
        assert a.receive([{**reply, "id": "r3"}], "b") == []  # answered already
    finally:
        a_store.close()
        b_store.close()


def test_a_destroyed_agent_closes_its_questions_on_the_other_host(tmp_path: Path) -> None:
    """alice (a) asks bob (b) twice and carol (c) once. alice is destroyed: a withdraws
    her open questions (b cancels its copy, only of a question a asked). bob is then
    destroyed with a question of dave's (a) open: b cancels it to a, and dave is told."""
    a_store, b_store = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    a, b = SwarmStore(a_store.db), SwarmStore(b_store.db)
    try:
        asks.ask(a.db, "b", "alice", "bob", "one?", None)
        q2 = asks.ask(a.db, "b", "alice", "bob", "two?", None)
        asks.ask(a.db, "c", "alice", "carol", "three?", None)
        qd = asks.ask(a.db, "b", "dave", "bob", "four?", None)
        got = b.receive([i for i in carried(a) if i["to"] != "carol"], "a")  # c's: to c
        assert [m.body for m in got] == ["one?", "two?", "four?"]
        b1, b2, bd = (m.ref for m in got)
        assert b1 is not None and b2 is not None and bd is not None
        asks.answer(b.db, b2, "bob", "yes")  # answered before alice is gone: kept
        assert [m.ref for m in a.receive(carried(b), "b")] == [q2.id]

        assert asks.forget(a.db, "alice") == 2  # q1 to b and the one to c; q2 is answered
        out = carried(a)
        assert sorted((o["kind"], o["to"], o["from"]) for o in out) == [
            ("withdraw", "bob", "alice", ), ("withdraw", "carol", "alice")]  # fmt: skip
        assert a_store.questions.open(asker="alice") == []
        to_b = [o for o in out if o["to"] == "bob"]
        # From another host (c relaying it), or naming another asker: dropped, still open.
        assert b.receive([{**to_b[0], "id": "w1"}], "c") == []
        assert b.receive([{**to_b[0], "id": "w2", "qid": qd.id}], "a") == []
        assert b.dropped == 2
        assert sorted(x.id for x in b_store.questions.open(target="bob")) == [b1, bd]
        assert b.receive(to_b, "a") == []  # applied: nothing delivered, nothing dropped
        assert b.dropped == 2
        assert [x.id for x in b_store.questions.open(target="bob")] == [bd]
        with pytest.raises(Conflict, match="cancelled"):
            asks.answer(b.db, b1, "bob", "late")

        assert asks.forget(b.db, "bob") == 1  # dave's question, cancelled back to a
        [cancel] = carried(b)
        assert (cancel["kind"], cancel["qid"], cancel["to"]) == ("cancel", qd.id, "dave")
        assert a.receive([{**cancel, "id": "c1"}], "c") == []  # not asked of c
        [told] = a.receive([cancel], "b")
        assert (told.kind, told.to, told.ref) == ("answer", "dave", qd.id)
        assert told.body == "cancelled: bob was destroyed on host b"
        assert a_store.questions.open(asker="dave") == []
        assert a.receive([{**cancel, "id": "c2"}], "b") == []  # closed already
        assert asks.forget(a.db, "alice") == 0  # nothing left open
    finally:
        a_store.close()
        b_store.close()


@pytest.mark.parametrize(
    "item",
    [
        {"kind": "question", "qid": "1"},
        {"kind": "question", "qid": 0},
        {"kind": "question", "qid": True},
        {"kind": "question", "qid": 1, "options": "yes"},
        {"kind": "question", "qid": 1, "options": [1]},
        {"kind": "question", "qid": 1, "options": ["x"] * 51},
        {"kind": "answer", "qid": 1, "options": ["x"]},
        {"kind": "answer", "qid": 1 << 63},
    ],
)
def test_malformed_question_items(item: dict) -> None:
    assert not asks.well_formed(item)


def test_well_formed_question_items() -> None:
    assert asks.well_formed({"kind": "question", "qid": 1, "options": None})
    assert asks.well_formed({"kind": "question", "qid": 7, "options": ["a", "b"]})
    assert asks.well_formed({"kind": "answer", "qid": 7})
    assert asks.well_formed({"kind": "withdraw", "qid": 7})
    assert not asks.well_formed({"kind": "cancel", "qid": 7, "options": ["x"]})

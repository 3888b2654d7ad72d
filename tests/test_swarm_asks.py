"""Questions across hosts (swarm/asks.py) on two stores of their own, no bus: what host
a queues is what host b receives, and back; an answer is applied only from the host and
agent the question was asked of, once. The bus end to end: test_swarm.py and
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

"""Red team, round 12: session 8's changes, attacked.

- recv's known inboxes (core/inboxes.py): an inbox read empty is served from the lane's
  hooks, not the store. An agent acks an id it guessed (ids are a count) in the same
  group commit as the message that gets it: the batch inserts its messages before its
  acks, so the ack stands, but its hook ran before the message's, and the known copy
  added a message already acked, served again and again (broke; fixed). From a real
  cage: two connections, acks of another agent's ids, a mixed ack, a hang-up and a
  pipelined recv-with-ack: what recv serves is what the store holds (held).
- Riders (store/db.py ``riding``): an operator action carried here and refused leaves
  its row ``taken`` even when an agent's sends and acks share its group commit; one
  that stands marks it ``applied`` in the same commit (held).

One hive (r12a, r12b: command runtimes, paused: their inboxes are the test's) for the
cage case; a real store in process for the others.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import assert_ok, wait_for
from hive_fixture import HiveProcess, running_hive
from hyperhive.core.actors import OPERATOR, Agent
from hyperhive.core.hive import Hive
from hyperhive.core.host_socket import HOST, OperatorSession
from hyperhive.core.refusals import Refused
from hyperhive.core.store.db import riding
from hyperhive.swarm.opstore import OpsSeen
from test_replies import hive as store_hive  # noqa: F401  (agents a and b, peers)

from .conftest import cage_run

# -- recv's known inbox: an ack guessed into its message's batch ---------------------------


@pytest.mark.attack(
    "core.known-inbox", ref="red team round 12: an ack in the batch of its own message"
)
def test_an_ack_guessed_into_its_messages_batch_is_never_served_after_it(
    store_hive: Hive,
) -> None:
    """b reads its inbox empty (known from then on), learns the id counter from a send of
    its own, and acks the next id in the same turn as a's send that takes it: one batch,
    the message inserted first, then b's ack, which stood (acked: 1) and the known copy
    then held the message (broke, fixed). Since an ack is checked against the store before
    it is queued (session 9: an ack that changes nothing commits nothing), an id not yet
    committed is refused, as an ack a turn earlier was: nothing acked. Either way recv
    serves what the store holds."""
    hive, a, b = store_hive, Agent("a"), Agent("b")

    async def attack() -> tuple[int | BaseException, int, list[dict[str, Any]], list[dict[str, Any]]]:
        assert (await hive.recv(b, 1, 0, 10)).items == []  # b's inbox: known, empty
        guess = await hive.send(b, "a", "what is the count now?") + 1
        # Submitted in this order in one turn of the loop.
        acked, mid = await asyncio.gather(
            hive.ack(b, [guess]), hive.send(a, "b", "hi b"), return_exceptions=True
        )
        assert mid == guess  # the guess was right: the attack is set up
        served = (await hive.recv(b, 2, 0, 10)).items
        # A write of another kind (a status) makes the next recv read the store.
        hive.set_status(b, "read the store")
        queried = (await hive.recv(b, 3, 0, 10)).items
        return acked, mid, served, queried

    acked, mid, served, queried = asyncio.run(attack())
    row = hive.store.db.conn.execute("SELECT acked_at FROM messages WHERE id=?", (mid,)).fetchone()
    assert isinstance(acked, Refused) and str(acked) == f"no message {mid} in this inbox", acked
    assert row[0] is None  # b's guessed ack took nothing
    # Held by connection 2 (served there), so connection 3's read of the store skips it.
    assert [m["id"] for m in served] == [mid] and queried == []
    assert served[0]["body"] == "hi b"


# -- recv's known inbox from a real cage ---------------------------------------------------

A, B = "r12a", "r12b"
TRUE = {"runtime": "command", "command": ["true"]}
PEERS = {A: {**TRUE, "peers": [B]}, B: {**TRUE, "peers": [A]}}


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(PEERS))


KNOWN_PROBE = """
import json

def ids(reply):
    return [m["id"] for m in reply.get("messages", [])] if reply and reply.get("ok") else reply

c1, c2 = Conn(), Conn()
r = {}
r["foreign"] = f = c1.call({"cmd": "send", "to": P["a"], "body": "to a"})["id"]
r["p1"] = p1 = ids(c1.call({"cmd": "recv", "wait": 0, "max": 2}))
r["p2"] = p2 = ids(c2.call({"cmd": "recv", "wait": 0, "max": 10}))
r["mixed"] = c2.call({"cmd": "ack", "ids": [p1[1], f]})
r["foreign_ack"] = c2.call({"cmd": "ack", "ids": [f]})
r["guessed_ahead"] = c2.call({"cmd": "ack", "ids": [max(p1 + p2) + 1]})
r["held_elsewhere"] = c2.call({"cmd": "ack", "ids": [p1[0]]})
r["c2_again"] = ids(c2.call({"cmd": "recv", "wait": 0}))
c1.close()  # p1[1] goes back to the inbox
time.sleep(0.5)
lines = [{"cmd": "recv", "wait": 0}, {"cmd": "recv", "wait": 0, "ack": [p1[1], *p2]},
         {"cmd": "recv", "wait": 0}]
c2.send(b"".join(json.dumps(x).encode() + b"\\n" for x in lines))
r["piped"] = [ids(c2.line()) for _ in lines]
r["c3"] = ids(Conn().call({"cmd": "recv", "wait": 0}))
result(**r)
"""


def _unacked(hive: HiveProcess, name: str) -> list[int]:
    db = sqlite3.connect(f"file:{hive.state_dir / 'hive.db'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT id FROM messages WHERE recipient=? AND acked_at IS NULL ORDER BY id", (name,)
        ).fetchall()
    finally:
        db.close()
    return [r[0] for r in rows]


@pytest.mark.attack(
    "core.known-inbox", ref="red team round 12: recv's known inbox from a real cage"
)
def test_a_caged_agent_gets_only_its_own_unacked_messages_from_a_known_inbox(
    hive: HiveProcess,
) -> None:
    """r12b's inbox read empty (known), then five messages from r12a. From r12b's cage,
    on two connections: each gets what the other doesn't hold; an ack of r12a's message
    id, alone or mixed with its own, is refused and acks nothing; one guessed ahead is
    refused; an ack of a message the other connection holds takes it for both; after a
    hang-up its held message comes back once; a pipelined recv, recv-with-ack, recv
    serves nothing acked. What recv then serves is what the store holds."""
    for name in (A, B):
        assert_ok(hive.host_call("set_paused", name=name, paused=True))
    try:
        # Drain what the harnesses left, then read empty: known from here on.
        while page := assert_ok(hive.agent_call(B, "recv", wait=0, max=1000))["messages"]:
            assert_ok(hive.agent_call(B, "ack", ids=[m["id"] for m in page]))
        sent = [assert_ok(hive.agent_call(A, "send", to=B, body=f"m{i}"))["id"] for i in range(5)]
        got = cage_run(hive, B, KNOWN_PROBE, a=A)
        foreign_unacked = got["foreign"] in _unacked(hive, A)
    finally:
        for name in (A, B):
            assert_ok(hive.host_call("set_paused", name=name, paused=False))
    assert got["p1"] == sent[:2] and got["p2"] == sent[2:], got
    for k in ("mixed", "foreign_ack", "guessed_ahead"):
        assert got[k]["ok"] is False and "no message" in got[k]["error"], (k, got[k])
    assert foreign_unacked, "r12b's ack of r12a's message took it"
    assert got["held_elsewhere"]["ok"] is True and got["held_elsewhere"]["acked"] == 1, got
    assert got["c2_again"] == [], got
    assert got["piped"] == [[sent[1]], [], []], got
    assert got["c3"] == [], got
    assert _unacked(hive, B) == []


# -- riders: an operator action carried here, refused or applied ---------------------------


def _request(hive: Hive, kind: str) -> dict[str, Any]:
    """A carried request this hive refuses (each checked when it runs, not decoded)."""
    if kind == "answer_unknown":
        return {"cmd": "answer_question", "id": 999, "answer": "no such question"}
    if kind == "answer_twice":
        qid = hive.ask(Agent("a"), "operator", "twice?", None)
        hive.answer(OPERATOR, qid, "once")
        return {"cmd": "answer_question", "id": qid, "answer": "twice"}
    if kind == "approve_wrong_sha":
        approval = hive.request_approval(Agent("a"), "custom", "d", {"x": 1})
        return {"cmd": "approve", "id": approval.id, "payload_sha256": "0" * 64}
    if kind == "send_nobody":
        return {"cmd": "send", "to": "nobody", "body": "x"}
    assert kind == "spawn_existing"
    return {"cmd": "spawn", "name": "a", "spec": {"runtime": "command", "command": ["true"]}}


REFUSED = ["answer_unknown", "answer_twice", "approve_wrong_sha", "send_nobody", "spawn_existing"]


@pytest.mark.attack("swarm-ops-rider", ref="red team round 12: riders next to agents' writes")
@pytest.mark.parametrize("kind", REFUSED)
def test_a_refused_carried_action_is_not_marked_applied_by_writes_beside_it(
    store_hive: Hive,
    kind: str,
) -> None:
    """The action's rider is set, as operator.py's _apply sets it, while agents a and b
    send and ack in the same turns (their writes share its group commits): refused, its
    row stays ``taken`` (a crash now would carry it out again, not say it was)."""
    hive = store_hive
    seen = OpsSeen(hive.store.db)
    request = _request(hive, kind)
    assert seen.claim("h", "x" * 32, "0" * 64, 1)
    rider = seen.rider("h", "x" * 32)

    async def action() -> object:
        try:
            with riding(rider):
                return await HOST.call(OperatorSession(hive), HOST.decode(request))
        except Refused as e:
            return e
        finally:
            rider.end()

    async def main() -> list[object]:
        async def agents() -> None:
            for i in range(5):
                mid = await hive.send(Agent("a"), "b", f"beside {i}")
                await hive.ack(Agent("b"), [mid])

        return await asyncio.gather(action(), agents())

    out = asyncio.run(main())
    assert isinstance(out[0], Refused), out
    row = seen.get("h", "x" * 32)
    assert row is not None and row.state == "taken", (kind, row)


@pytest.mark.attack("swarm-ops-rider", ref="red team round 12: riders next to agents' writes")
def test_a_carried_send_in_an_agents_batch_marks_its_own_action_only(
    store_hive: Hive,
) -> None:
    """The operator's carried send rides the lane, batched with a's send and b's acks
    (another action's rider ended): its own row is ``applied``, the other's not."""
    hive = store_hive
    seen = OpsSeen(hive.store.db)
    for aid in ("y" * 32, "z" * 32):
        assert seen.claim("h", aid, "0" * 64, 1)
    ended = seen.rider("h", "z" * 32)
    ended.end()
    rider = seen.rider("h", "y" * 32)

    async def carried() -> object:
        with riding(rider):
            reply = await HOST.call(OperatorSession(hive), HOST.decode(
                {"cmd": "send", "to": "b", "body": "from the operator"}))  # fmt: skip
        rider.end()
        return reply

    async def beside() -> None:
        with riding(ended):
            mid = await hive.send(Agent("a"), "b", "beside")
        await hive.ack(Agent("b"), [mid])

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(carried(), beside()), 10)

    asyncio.run(main())
    states = {aid: getattr(seen.get("h", aid), "state", None) for aid in ("y" * 32, "z" * 32)}
    assert states == {"y" * 32: "applied", "z" * 32: "taken"}, states


GUESS_PROBE = """
import json, selectors

def ids(reply):
    return [m["id"] for m in reply.get("messages", [])]

first = Conn()
assert ids(first.call({"cmd": "recv", "wait": 0})) == []  # known, empty
guess = first.call({"cmd": "send", "to": P["a"], "body": "the count"})["id"] + 1
line = json.dumps({"cmd": "ack", "ids": [guess]}).encode() + b"\\n"
sel = selectors.DefaultSelector()
conns = [Conn() for _ in range(P["conns"])]
for c in conns:
    c.send(line)
    sel.register(c.s, selectors.EVENT_READ, c)
open(P["flag"], "w").close()  # the acks are spinning: the test sends now
acked, tries, end = None, 0, time.monotonic() + P["seconds"]
while acked is None and time.monotonic() < end:
    for key, _ in sel.select(timeout=0.5):
        c = key.data
        reply = c.line()
        tries += 1
        if reply.get("ok") is True and reply.get("acked") == 1:
            acked = guess
        elif acked is None:
            c.send(line)
served = ids(Conn().call({"cmd": "recv", "wait": 0}))
result(guess=guess, acked=acked, tries=tries, served=served)
"""


@pytest.mark.attack(
    "core.known-inbox", ref="red team round 12: an ack in the batch of its own message"
)
def test_from_a_cage_an_ack_racing_its_message_is_never_served_after_it(hive: HiveProcess) -> None:
    """From r12b's cage: its inbox read empty, the id counter learnt from a send of its
    own, then 8 connections ack the next id over and over while r12a sends it a message
    (some of those acks share the message's group commit; one stands). Whatever the race
    gave, a message r12b's ack took is never served to it after."""

    for name in (A, B):
        assert_ok(hive.host_call("set_paused", name=name, paused=True))
    rounds: list[dict[str, Any]] = []
    try:
        for k in range(10):
            while page := assert_ok(hive.agent_call(B, "recv", wait=0, max=1000))["messages"]:
                assert_ok(hive.agent_call(B, "ack", ids=[m["id"] for m in page]))
            out: dict[str, Any] = {}
            flag = hive.home(B) / f"r12-spinning-{k}"
            flag.unlink(missing_ok=True)

            def probe(out: dict[str, Any] = out, flag: str = flag.name) -> None:
                out.update(cage_run(hive, B, GUESS_PROBE, a=A, conns=8, seconds=6, flag=flag))

            th = threading.Thread(target=probe)
            th.start()
            wait_for(flag.exists, timeout=30)  # the probe's send made, its acks spinning
            time.sleep(0.2)
            out["sent"] = assert_ok(hive.agent_call(A, "send", to=B, body="raced"))["id"]
            th.join(60)
            rounds.append(out)
    finally:
        for name in (A, B):
            assert_ok(hive.host_call("set_paused", name=name, paused=False))
    print("\n" + "\n".join(str(r) for r in rounds))
    hit = [r for r in rounds if r.get("acked") is not None and r["acked"] == r["sent"]]
    assert hit, rounds  # the guessed ack took the message in some round
    served_after = [r for r in hit if r["acked"] in r["served"]]
    assert served_after == [], served_after

"""A compromised host against what issue 18's last round added (docs/swarm.md, "Questions
across hosts" and "Whole items from other hosts"). Host c's core is the attacker, with c's
own NATS credentials (nats-py, no hive code).

- It closes questions that are not its to close: a ``withdraw`` of alice's question to bob
  sent to b, a ``cancel`` of it sent to a (NATS lets c publish only on its own subjects,
  and each host closes only questions asked by, or of, the sending host): both dropped,
  and the question is still answered.
- It answers for another host's items, or lies about its own: NATS refuses c another
  host's show subjects; a payload that is not its sha256, or not the roster's, is refused
  on a.

Each host runs a whole hive (the session's ``hives``: tests/swarm_fixture.py, the agents
paused); the agents' own calls (the questions, the answer, the approval requests, the
inbox reads) are made from their cages."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
from typing import Any

import pytest

from helpers import assert_ok, assert_refused, wait_for
from hive_fixture import HiveProcess
from hyperhive.core.store.common import canonical_json, sha256_hex
from hyperhive.swarm import subjects as s
from swarm_faults import drain
from swarm_fixture import Swarm

from .test_swarm_hostile import as_host_c, violation

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def open_on(swarm: Swarm, host: str, qid: int) -> bool:
    """Whether question ``qid`` is open in ``host``'s store (read only)."""
    db = swarm.cores[host].state_dir / "hive.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT answer IS NULL AND cancelled=0 FROM questions WHERE id=?", (qid,)
        ).fetchone()
    return bool(row and row[0])


@pytest.mark.attack("swarm-host-spoofing", ref="issue 18: questions closed when an agent is destroyed")
def test_a_host_cannot_close_questions_it_did_not_ask_or_was_not_asked(hives: Swarm[HiveProcess]) -> None:
    swarm = hives
    alice, bob = swarm.cores["a"].caged("alice"), swarm.cores["b"].caged("bob")
    qa = assert_ok(alice.call("ask", to="bob", question="merge?", options=["yes", "no"]))["id"]
    [q] = drain(swarm, "b", "bob", 1)
    dropped = {h: swarm.status(h)["dropped"] for h in ("a", "b")}

    def item(n: int, kind: str, sender: str, to: str) -> dict[str, Any]:
        return {"id": f"forged-close-{qa}-{n}", "from": sender, "to": to, "kind": kind,
                "body": "", "qid": qa, "sent_at": 0}  # fmt: skip

    async def attack(nc: Any) -> None:
        js = nc.jetstream()
        # To b: alice withdraws her question (c never asked it). To a: bob, then c's own
        # carol, cancel it (it was asked of b, not c).
        for subject, it in (
            (s.msg_subject("b", "c"), item(0, "withdraw", "alice", "bob")),
            (s.msg_subject("a", "c"), item(1, "cancel", "bob", "alice")),
            (s.msg_subject("a", "c"), item(2, "cancel", "carol", "alice")),
        ):
            await js.publish(subject, json.dumps([it]).encode(), headers={"Nats-Msg-Id": it["id"]})

    assert as_host_c(swarm, attack) == []  # NATS lets c publish on its own subjects
    wait_for(lambda: swarm.status("b")["dropped"] == dropped["b"] + 1, timeout=15)
    wait_for(lambda: swarm.status("a")["dropped"] == dropped["a"] + 2, timeout=15)
    assert open_on(swarm, "a", qa) and open_on(swarm, "b", q["ref"])
    assert assert_ok(alice.call("recv", wait=0.3))["messages"] == []
    # c can't publish the closing items on another host's subject at all.
    forged = item(3, "withdraw", "alice", "bob")

    async def as_a(nc: Any) -> None:
        await nc.publish(s.msg_subject("b", "a"), json.dumps([forged]).encode())
        await nc.flush()

    violation(as_host_c(swarm, as_a), f'publish to "{s.msg_subject("b", "a")}"')
    # The question is still bob's to answer, and alice gets his answer.
    assert_ok(bob.call("answer", id=q["ref"], answer="no"))
    [a] = drain(swarm, "a", "alice", 1)
    assert (a["kind"], a["from"], a["body"], a["ref"]) == ("answer", "bob", "no", qa)


@pytest.mark.attack("swarm-host-spoofing", ref="issue 18: another host's item whole")
def test_a_host_cannot_answer_for_another_host_or_show_a_payload_it_did_not_list(
    hives: Swarm[HiveProcess],
) -> None:
    swarm = hives
    # NATS: c can't take b's requests, answer as b, or read a's answers.
    for op, subject in (
        ("sub", s.show_subject("b", "a")),
        ("sub", s.shown_subject("a", "b")),
        ("pub", s.shown_subject("a", "b")),
        ("pub", s.show_subject("b", "a")),
    ):

        async def go(nc: Any, op: str = op, subject: str = subject) -> None:
            if op == "sub":
                await nc.subscribe(subject)
            else:
                await nc.publish(subject, b'{"rid":"x","ok":true}')
            await nc.flush()

        word = "subscription to" if op == "sub" else f'publish to "{subject}"'
        violation(as_host_c(swarm, go), word)

    # c may ask b (its own subject), but b shows its items whole only to the hosts whose
    # operator it obeys (a): c gets no more than the roster's summary.
    bob = swarm.cores["b"].caged("bob")
    bid = assert_ok(bob.call("request_approval", kind="custom", description="b's",
                             payload={"secret-ish": "x" * 5000}))["id"]  # fmt: skip
    answers: list[dict[str, Any]] = []

    async def ask_b(nc: Any) -> None:
        got = asyncio.Event()

        async def on(m: Any) -> None:
            answers.append(json.loads(m.data))
            got.set()

        await nc.subscribe(s.shown_subject("c", "b"), cb=on)
        await nc.publish(s.show_subject("b", "c"),
                         json.dumps({"rid": "r1", "kind": "approval", "id": bid}).encode())  # fmt: skip
        await asyncio.wait_for(got.wait(), 5)

    assert as_host_c(swarm, ask_b, settle=0) == []
    assert [(x["rid"], x["ok"], x["status"]) for x in answers] == [("r1", False, 403)]
    assert "approval" not in answers[0] and "obeys" in answers[0]["error"]
    assert_ok(swarm.cores["b"].host_call("deny", id=bid))
    drain(swarm, "b", "bob", 1, timeout=5)  # the denial

    # c's own approval, answered by c with another payload than the roster lists: c's core
    # is stopped, so the attacker's connection is the one that answers a's requests.
    carol = swarm.cores["c"].caged("carol")
    listed = {"rule": "api.example.com:443"}
    aid = assert_ok(carol.call("request_approval", kind="custom", description="listed",
                               payload=listed))["id"]  # fmt: skip
    a = swarm.cores["a"]
    wait_for(lambda: any(r["id"] == aid for r in assert_ok(a.host_call("pending")).get(
        "swarm_approvals", []) if r["host"] == "c"), timeout=10)  # fmt: skip
    evil = {"rule": "*:*"}
    lies = [
        {"id": aid, "payload": evil, "payload_sha256": sha256_hex(canonical_json(listed))},
        {"id": aid, "payload": evil, "payload_sha256": sha256_hex(canonical_json(evil))},
    ]
    shown: list[dict[str, Any]] = []

    async def lie(nc: Any) -> None:
        async def answer(m: Any) -> None:
            req = json.loads(m.data)
            row = {"agent": "carol", "kind": "custom", "description": "listed", **lies.pop(0)}
            await nc.publish(s.shown_subject("a", "c"),
                             json.dumps({"rid": req["rid"], "ok": True, "approval": row}).encode())  # fmt: skip

        await nc.subscribe(s.show_subject("c", "a"), cb=answer)
        await nc.flush()
        for _ in range(2):
            shown.append(await asyncio.to_thread(a.host_call, "show_approval", id=aid, host="c"))

    core_c = swarm.cores["c"]
    pid = core_c.core_pid()  # c's hive-core, not its hive up (which stays up)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        assert as_host_c(swarm, lie, settle=0) == []
    finally:
        os.kill(pid, signal.SIGCONT)
    assert lies == []  # both were asked for, and answered by the attacker
    assert_refused(shown[0], "host c:", "is not its payload_sha256")
    assert_refused(shown[1], "host c:", "not the one the roster lists")
    # c's own answer, once it runs again: the listed payload, whole.
    got = wait_for(lambda: (r := a.host_call("show_approval", id=aid, host="c"))["ok"] and r,
                   timeout=15)  # fmt: skip
    assert got["approval"]["payload"] == listed
    assert_ok(core_c.host_call("deny", id=aid))
    drain(swarm, "c", "carol", 1, timeout=5)  # the denial

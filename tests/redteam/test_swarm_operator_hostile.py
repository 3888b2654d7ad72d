"""A compromised host against the operator's actions (docs/swarm.md, "The operator's roster
and actions"; docs/security.md). b and c obey only host a's operator (they pin a's key).
Host c, with its own NATS credentials and its own operator key, tries to answer and
approve as the operator for an agent on b; a signed action of a's is replayed; an
approval is signed for another payload; actions too large or malformed are sent. Each
is refused, and b's question or approval stays as it was. Each host runs a whole hive
(the session's ``hives``: tests/swarm_fixture.py; the agents paused, so the test reads
their inboxes itself). The agents' own calls (bob's question and approval requests,
alice's message, carol's question, every inbox read) are made from their cages; the
operator's, on the hosts' host.sock."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from typing import Any

import nats
import pytest

from helpers import assert_ok, assert_refused, wait_for
from hive_fixture import HiveProcess
from hyperhive.swarm import subjects as s
from hyperhive.swarm.operator import KEY_FILE
from hyperhive.swarm.signing import MAX_ACTION_BYTES, canonical, load_or_create_key, seal
from redteam.test_swarm_hostile import as_host_c, violation
from swarm_faults import drain, take
from swarm_fixture import Swarm

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.attack(
        "swarm-operator-forgery",
        ref="issue 18: a compromised host can't act as the operator for another host's agents",
    ),
]


def open_question(swarm: Swarm) -> int:
    """A question from bob (on b) to the operator, listed on a."""
    bob = swarm.cores["b"].caged("bob")
    qid: int = assert_ok(bob.call("ask", to="operator", question="which way?"))["id"]
    wait_for(lambda: any(q["id"] == qid for q in swarm.status("a")["questions"]), timeout=10)
    return qid


def still_open(swarm: Swarm, qid: int) -> None:
    """Nothing answered bob's question: it is open on b, and bob has no answer."""
    q = assert_ok(swarm.cores["b"].host_call("show_question", id=qid))["question"]
    assert q["question"] and "answer" not in q, q
    assert qid in [r["id"] for r in assert_ok(swarm.cores["b"].host_call("questions"))["questions"]]
    assert take(swarm, "b", "bob", wait=0.2) == []


def close_question(swarm: Swarm, qid: int) -> None:
    assert_ok(swarm.cores["b"].host_call("answer_question", id=qid, answer="cleanup"))
    empty_bobs_inbox(swarm)


def deny_on_b(swarm: Swarm, aid: int) -> None:
    assert_ok(swarm.cores["b"].host_call("deny", id=aid))
    empty_bobs_inbox(swarm)


def empty_bobs_inbox(swarm: Swarm) -> None:
    """What the clean-up delivered to bob (an answer, a denial), acked (from his cage)."""
    drain(swarm, "b", "bob", 1, timeout=5)


def refused_on_b(swarm: Swarm, before: int, n: int) -> None:
    wait_for(lambda: swarm.status("b")["actions_refused"] >= before + n, timeout=15)
    assert swarm.status("b")["actions_refused"] == before + n


def c_pending_on_b(swarm: Swarm) -> int:
    """As the admin: the actions on c's subject to b that b has not read (``ops-b_c``)."""

    async def go() -> int:
        user, password = swarm.net.admin()
        nc = await nats.connect(swarm.net.urls("a"), user=user, password=password)
        try:
            info = await nc.jetstream().consumer_info(s.OPS_STREAM, s.ops_consumer("b", "c"))
            return (info.num_pending or 0) + (info.num_ack_pending or 0)
        finally:
            await nc.close()

    return asyncio.run(go())


def unread_on_b(swarm: Swarm, before: tuple[int, int], n: int) -> None:
    """b obeys no operator of c's, so it reads nothing c publishes on its own actions
    subject to b (red team round 11: each sending host has its own consumer, and b pulls
    only its pinned operators' hosts'): c's ``n`` actions wait unread in ``ops-b_c``, and b
    refused and applied none. ``before``: (c's pending there, b's refused + applied)."""
    wait_for(lambda: c_pending_on_b(swarm) >= before[0] + n, timeout=15)
    time.sleep(0.5)  # had b read any, it would have by now
    assert c_pending_on_b(swarm) == before[0] + n
    status = swarm.status("b")
    assert status["actions_refused"] + status["actions_applied"] == before[1], status


def unread_before(swarm: Swarm) -> tuple[int, int]:
    status = swarm.status("b")
    return c_pending_on_b(swarm), status["actions_refused"] + status["actions_applied"]


def sealed(key: Any, frm: str, to: str, request: dict[str, Any], at: float) -> bytes:
    """An action as signing.seal makes it, with a chosen time."""
    action = {"v": 1, "id": os.urandom(16).hex(), "from": frm, "to": to, "at": at,
              "request": request}  # fmt: skip
    sig = base64.b64encode(key.sign(canonical(action))).decode()
    return json.dumps({"action": action, "sig": sig}).encode()


def publish_all(swarm: Swarm, host: str, items: list[tuple[str, bytes]]) -> list[str]:
    """Publish ``items`` (subject, data) to JetStream as ``host``; the errors sent back."""
    out: list[str] = []

    async def attack(nc: Any) -> None:
        for subject, data in items:
            reply = await nc.request(subject, data, timeout=10)
            answer = json.loads(reply.data)
            if "error" in answer:
                out.append(answer["error"]["description"])

    # Each request got its reply, so no permissions error is on its way: no need to wait.
    assert as_host_c(swarm, attack, host, settle=0) == []
    return out


def test_host_c_cannot_publish_as_host_a_or_write_its_rows(hives: Swarm[HiveProcess]) -> None:
    for subject in (
        s.op_subject("b", "a"),
        s.kv_subject("b", s.result_key("b", "a", "f" * 32)),
        s.kv_subject("a", s.question_key("a", 1)),
        s.kv_subject("b", s.approval_key("b", 1)),
    ):

        async def attack(nc: Any, subject: str = subject) -> None:
            await nc.publish(subject, b"{}")
            await nc.flush()

        violation(as_host_c(hives, attack), f'publish to "{subject}"')

    async def pull(nc: Any) -> None:  # b's actions are b's to take
        await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{s.OPS_STREAM}.{s.ops_consumer('b', 'a')}",
                         b'{"batch":1}', reply=f"{s.inbox_prefix('c')}.x")  # fmt: skip
        await nc.flush()

    violation(as_host_c(hives, pull), f"consumer.msg.next.{s.OPS_STREAM}.{s.ops_consumer('b', 'a')}")


def test_host_c_cannot_answer_as_the_operator_for_bs_agent(hives: Swarm[HiveProcess]) -> None:
    """On its own subject (all NATS lets it): signed with its own operator key (b doesn't
    pin it), signed with it but saying it is from a, and a's genuine signature relayed."""
    qid = open_question(hives)
    before = unread_before(hives)
    c_key = load_or_create_key(hives.cores["c"].state_dir / KEY_FILE)
    a_key = load_or_create_key(hives.operator_key)  # type: ignore[arg-type]
    answer = {"cmd": "answer_question", "id": qid, "answer": "forged"}
    own = seal(c_key, "c", "b", answer)[1]
    posing = seal(c_key, "a", "b", answer)[1]
    relayed = seal(a_key, "a", "b", answer)[1]
    subject = s.op_subject("b", "c")
    assert publish_all(hives, "c", [(subject, own), (subject, posing), (subject, relayed)]) == []
    unread_on_b(hives, before, 3)
    still_open(hives, qid)
    # And an approval the same way: bob's stays pending.
    asked = assert_ok(hives.cores["b"].caged("bob").call("request_approval", kind="custom",
                                                        description="deploy", payload={"v": 1}))  # fmt: skip
    approve = {"cmd": "approve", "id": asked["id"], "payload_sha256": asked["payload_sha256"]}
    assert publish_all(hives, "c", [(subject, seal(c_key, "c", "b", approve)[1])]) == []
    unread_on_b(hives, before, 4)
    a = assert_ok(hives.cores["b"].host_call("show_approval", id=asked["id"]))["approval"]
    assert a["status"] == "pending"
    deny_on_b(hives, asked["id"])
    close_question(hives, qid)


@pytest.mark.attack("swarm-operator-forgery", ref="issue 18: replays refused, applied once")
def test_a_replayed_or_stale_operator_action_is_refused(hives: Swarm[HiveProcess]) -> None:
    """a's genuine signed answer, published twice (a's stolen NATS credentials, or the
    bus itself replaying it) with new Nats-Msg-Ids: applied once; one signed ten minutes
    ago: refused."""
    qid = open_question(hives)
    a_key = load_or_create_key(hives.operator_key)  # type: ignore[arg-type]
    stale = sealed(a_key, "a", "b", {"cmd": "answer_question", "id": qid, "answer": "old"},
                   time.time() - 600)  # fmt: skip
    before = hives.status("b")["actions_refused"]
    assert publish_all(hives, "a", [(s.op_subject("b", "a"), stale)]) == []
    refused_on_b(hives, before, 1)
    still_open(hives, qid)

    data = seal(a_key, "a", "b", {"cmd": "answer_question", "id": qid, "answer": "once"})[1]

    async def twice(nc: Any) -> None:
        js = nc.jetstream()
        for n in range(2):
            await js.publish(s.op_subject("b", "a"), data, headers={"Nats-Msg-Id": f"r{n}{qid}"})

    assert as_host_c(hives, twice, "a", settle=0) == []  # both acked by JetStream
    refused_on_b(hives, before, 2)
    msgs = drain(hives, "b", "bob", 1, timeout=2, extra=1.0)  # a second would come by then
    assert [(m["kind"], m["body"]) for m in msgs] == [("answer", "once")]


@pytest.mark.attack("swarm-operator-forgery", ref="issue 18: an approval bound to its sha256")
def test_an_approval_for_another_payload_is_refused(hives: Swarm[HiveProcess]) -> None:
    """The operator on a approves or denies bob's approval naming another payload_sha256
    (what a stale or doctored listing would show): b refuses; it stays pending. Signed by
    a with no sha256 at all: refused too."""
    asked = assert_ok(hives.cores["b"].caged("bob").call("request_approval", kind="spawn",
                                                        description="x", payload={"name": "bobx",
                                                        "spec": {"runtime": "command",
                                                                 "command": ["true"]}}))  # fmt: skip
    aid = asked["id"]
    wait_for(lambda: any(r["id"] == aid for r in hives.status("a")["approvals"]), timeout=10)
    a = hives.cores["a"]
    for verb in ("approve", "deny"):
        resp = a.host_call(verb, id=aid, host="b", payload_sha256="0" * 64)
        assert_refused(resp, "host b:", "payload_sha256 is not 000000000000")
    a_key = load_or_create_key(hives.operator_key)  # type: ignore[arg-type]
    bare = seal(a_key, "a", "b", {"cmd": "approve", "id": aid})[1]
    applied = hives.status("b")["actions_applied"]
    assert publish_all(hives, "a", [(s.op_subject("b", "a"), bare)]) == []
    wait_for(lambda: hives.status("b")["actions_applied"] == applied + 1, timeout=15)
    row = assert_ok(hives.cores["b"].host_call("show_approval", id=aid))["approval"]
    assert row["status"] == "pending"
    assert "bobx" not in assert_ok(hives.cores["b"].host_call("list"))["agents"]
    deny_on_b(hives, aid)


@pytest.mark.attack("swarm-operator-forgery", ref="issue 18: bounded, malformed actions")
def test_oversized_and_malformed_actions_are_refused(hives: Swarm[HiveProcess]) -> None:
    """Too large for the stream: JetStream refuses it. Malformed (not JSON, not sealed,
    a bad signature, a verb no host carries, deep nesting): b refuses each, nothing else."""
    qid = open_question(hives)
    subject = s.op_subject("b", "c")
    errors = publish_all(hives, "c", [(subject, b"x" * (MAX_ACTION_BYTES + 1))])
    assert len(errors) == 1 and "size" in errors[0], errors
    c_key = load_or_create_key(hives.cores["c"].state_dir / KEY_FILE)
    good = json.loads(seal(c_key, "c", "b", {"cmd": "answer_question", "id": qid,
                                             "answer": "x"})[1])  # fmt: skip
    bad = [
        b"{not json",
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps({"action": good["action"]}).encode(),
        json.dumps({**good, "sig": "!!"}).encode(),
        json.dumps({**good, "extra": 1}).encode(),
        json.dumps(
            {"action": {**good["action"], "request": {"cmd": "egress_allow", "name": "bob",
                                                      "rule": "evil.example:443"}},
             "sig": good["sig"]}
        ).encode(),
    ]
    before = unread_before(hives)
    assert publish_all(hives, "c", [(subject, d) for d in bad]) == []
    unread_on_b(hives, before, len(bad))
    still_open(hives, qid)
    assert "bob" in assert_ok(hives.cores["b"].host_call("list"))["agents"]
    close_question(hives, qid)


@pytest.mark.attack("swarm-host-spoofing", ref="found with the operator's actions: a deeply"
                    " nested bundle stopped b's inbox (redelivered forever)")  # fmt: skip
def test_a_deeply_nested_bundle_is_dropped_not_redelivered_forever(hives: Swarm[HiveProcess]) -> None:
    """c puts a bundle nested too deep to decode on its own subject to b. b drops it (it
    used to raise in b's consumer, be redelivered, and hold every later bundle back), and
    alice's next message to bob arrives."""
    dropped = hives.status("b")["dropped"]
    assert publish_all(hives, "c", [(s.msg_subject("b", "c"), b"[" * 100_000)]) == []
    wait_for(lambda: hives.status("b")["dropped"] == dropped + 1, timeout=15)
    assert_ok(hives.cores["a"].caged("alice").call("send", to="bob", body="after the pill"))
    msgs = drain(hives, "b", "bob", 1, timeout=10)
    assert [m["body"] for m in msgs] == ["after the pill"]


@pytest.mark.attack("swarm-host-spoofing", ref="found with the operator's roster: a roster"
                    " value nested too deep stopped every host's roster watch")  # fmt: skip
def test_a_deeply_nested_roster_value_does_not_stop_the_watch(hives: Swarm[HiveProcess]) -> None:
    """c writes its own keys (all NATS lets it) with values nested too deep to decode: an
    agent row and a question. Every host's watch used to raise on them and start over
    forever, its roster frozen; now they are ignored, and carol's question still shows."""
    pill = b"[" * 60_000
    keys = [s.row_key("c", "deep"), s.question_key("c", 99999)]
    try:
        assert publish_all(hives, "c", [(s.kv_subject("c", k), pill) for k in keys]) == []
        carol = hives.cores["c"].caged("carol")
        qid = assert_ok(carol.call("ask", to="operator", question="still there?"))["id"]
        wait_for(lambda: any((q["host"], q["id"]) == ("c", qid)
                             for q in hives.status("a")["questions"]), timeout=10)  # fmt: skip
        assert all(q["id"] != 99999 for q in hives.status("a")["questions"])
        assert "deep" not in {r["name"] for r in hives.status("a")["agents"]}
        assert_ok(hives.cores["c"].host_call("answer_question", id=qid, answer="yes"))
        [answer] = drain(hives, "c", "carol", 1, timeout=2)
        assert (answer["kind"], answer["body"], answer["ref"]) == ("answer", "yes", qid)
    finally:
        async def clean(nc: Any) -> None:
            for k in keys:
                await nc.request(s.kv_subject("c", k), b"", headers={"KV-Operation": "DEL"})

        as_host_c(hives, clean, settle=0)

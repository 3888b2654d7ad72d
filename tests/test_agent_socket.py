"""agent.sock: every agent verb, happy path and refusal, against a live hive-core."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from helpers import CoreProcess, assert_ok, assert_refused, no_nulls, wire_time


def recv_all(core: CoreProcess, name: str, wait: float = 10.0, ack: bool = True) -> list[dict[str, Any]]:
    """Receive (and by default ack) whatever is in ``name``'s inbox, waiting up to ``wait`` for the first."""
    with core.agent(name) as c:
        msgs = assert_ok(c.call("recv", wait=wait))["messages"]
        if ack and msgs:
            assert_ok(c.call("ack", ids=[m["id"] for m in msgs]))
    return msgs


def inbox_is_empty(core: CoreProcess, name: str) -> bool:
    with core.agent(name) as c:
        return assert_ok(c.call("recv", wait=0))["messages"] == []


# -- whoami / peers ------------------------------------------------------------------


def test_whoami_names_the_socket_owner(module_core: CoreProcess) -> None:
    core = module_core  # shared: only looked at
    for name in ("alice", "bob", "carol"):
        resp = assert_ok(core.agent_call(name, "whoami"))
        assert resp["name"] == name
        assert "parent" not in resp  # config agents have none; absent, not null
        no_nulls(resp)


def test_peers(module_core: CoreProcess) -> None:
    core = module_core  # shared: only looked at
    assert assert_ok(core.agent_call("alice", "peers"))["peers"] == ["bob"]
    assert assert_ok(core.agent_call("bob", "peers"))["peers"] == ["alice", "carol"]
    assert assert_ok(core.agent_call("carol", "peers"))["peers"] == []


def test_many_requests_on_one_connection(module_core: CoreProcess) -> None:
    with module_core.agent("bob") as c:  # shared core: only looked at
        for _ in range(50):
            assert assert_ok(c.call("whoami"))["name"] == "bob"


# -- send / recv / ack ----------------------------------------------------------------


def test_send_to_peer_is_delivered_with_all_fields(core: CoreProcess) -> None:
    before = time.time()
    resp = assert_ok(core.agent("alice").call("send", to="bob", body="hello bob"))
    assert isinstance(resp["id"], int) and resp["id"] >= 1
    msgs = recv_all(core, "bob")
    assert len(msgs) == 1
    m = msgs[0]
    assert m["id"] == resp["id"]
    assert m["from"] == "alice"
    assert m["kind"] == "message"
    assert m["body"] == "hello bob"
    assert before - 1 <= wire_time(m["sent_at"]) <= time.time() + 1
    assert "ref" not in m and "to" not in m
    no_nulls(m)
    assert inbox_is_empty(core, "bob")


def test_send_to_operator_lands_in_operator_inbox(core: CoreProcess) -> None:
    resp = assert_ok(core.agent("carol").call("send", to="operator", body="hi boss"))
    msgs = core.host_call("inbox")["messages"]
    assert [(m["id"], m["from"], m["to"], m["body"]) for m in msgs] == [
        (resp["id"], "carol", "operator", "hi boss")
    ]


def test_unicode_body_round_trips(core: CoreProcess) -> None:
    body = "grüße 🐝 \u2028 line\nbreak \"quoted\""
    assert_ok(core.agent("bob").call("send", to="alice", body=body))
    assert recv_all(core, "alice")[0]["body"] == body


@pytest.mark.parametrize(
    ("sender", "to", "needle"),
    [
        ("alice", "carol", "not one of alice's peers"),  # carol exists but isn't alice's peer
        ("carol", "bob", "not one of carol's peers"),  # peering is not symmetric
        ("alice", "zed", "no agent named 'zed'"),
        ("alice", "alice", "itself"),
    ],
)
def test_send_refused(module_core: CoreProcess, sender: str, to: str, needle: str) -> None:
    core = module_core  # shared: a refusal changes nothing, and that is checked
    assert_refused(core.agent_call(sender, "send", to=to, body="x"), needle)
    for name in ("alice", "bob", "carol"):
        assert inbox_is_empty(core, name)
    assert core.host_call("inbox")["messages"] == []


def test_recv_empty_returns_immediately_without_wait(module_core: CoreProcess) -> None:
    t = time.monotonic()  # shared core: alice's inbox is empty there (its sends are refused)
    assert assert_ok(module_core.agent_call("alice", "recv"))["messages"] == []
    assert time.monotonic() - t < 2


def test_recv_wait_expires_empty(module_core: CoreProcess) -> None:
    t = time.monotonic()  # shared core: alice's inbox is empty there (its sends are refused)
    assert assert_ok(module_core.agent_call("alice", "recv", wait=0.5))["messages"] == []
    assert time.monotonic() - t >= 0.45


def test_recv_long_poll_wakes_on_arrival(core: CoreProcess) -> None:
    waiter = core.agent("bob", timeout=60)
    result: dict[str, Any] = {}

    def long_poll() -> None:
        t = time.monotonic()
        result["resp"] = waiter.call("recv", wait=30)
        result["elapsed"] = time.monotonic() - t

    th = threading.Thread(target=long_poll)
    th.start()
    time.sleep(0.5)  # let the recv block first: we are testing the wake-up, not the fast path
    assert "resp" not in result, "recv returned before any message was sent"
    assert_ok(core.agent("alice").call("send", to="bob", body="wake up"))
    th.join(35)
    assert not th.is_alive()
    msgs = assert_ok(result["resp"])["messages"]
    assert [m["body"] for m in msgs] == ["wake up"]
    assert 0.4 <= result["elapsed"] < 5, result["elapsed"]  # woken, well before the 30 s wait


def test_recv_max_limits_batch(core: CoreProcess) -> None:
    a = core.agent("alice")
    for i in range(5):
        assert_ok(a.call("send", to="bob", body=str(i)))
    b = core.agent("bob")
    first = assert_ok(b.call("recv", max=2))["messages"]
    assert [m["body"] for m in first] == ["0", "1"]
    # the same connection doesn't get its own unacked messages again; it gets the next ones
    second = assert_ok(b.call("recv", max=10))["messages"]
    assert [m["body"] for m in second] == ["2", "3", "4"]


def test_ack_removes_from_inbox_and_is_idempotent(core: CoreProcess) -> None:
    mid = assert_ok(core.agent("alice").call("send", to="bob", body="x"))["id"]
    b = core.agent("bob")
    assert [m["id"] for m in assert_ok(b.call("recv"))["messages"]] == [mid]
    assert assert_ok(b.call("ack", ids=[mid]))["acked"] == 1
    assert assert_ok(b.call("ack", ids=[mid]))["acked"] == 0
    b.close()
    assert inbox_is_empty(core, "bob")


def test_ack_of_someone_elses_message_refused(core: CoreProcess) -> None:
    mid = assert_ok(core.agent("alice").call("send", to="bob", body="for bob"))["id"]
    own = assert_ok(core.agent("bob").call("send", to="carol", body="for carol"))["id"]
    # carol acks bob's message (and her own): refused whole, nothing acked
    assert_refused(core.agent("carol").call("ack", ids=[own, mid]), f"no message {mid}")
    assert_refused(core.agent("carol").call("ack", ids=[10_000]), "no message 10000")
    assert [m["id"] for m in recv_all(core, "bob")] == [mid]
    assert [m["id"] for m in recv_all(core, "carol")] == [own]


def test_at_least_once_redelivery_after_disconnect(core: CoreProcess) -> None:
    mid = assert_ok(core.agent("alice").call("send", to="bob", body="important"))["id"]
    conn1 = core.agent("bob")
    assert [m["id"] for m in assert_ok(conn1.call("recv"))["messages"]] == [mid]
    # While conn1 holds it unacked, another connection doesn't get it too.
    with core.agent("bob") as other:
        assert assert_ok(other.call("recv", wait=0))["messages"] == []
    conn1.close()
    # After conn1 closed without acking, a new connection gets the same message.
    with core.agent("bob") as conn2:
        msgs = assert_ok(conn2.call("recv", wait=15))["messages"]
        assert [(m["id"], m["body"]) for m in msgs] == [(mid, "important")]
        assert_ok(conn2.call("ack", ids=[mid]))
    assert inbox_is_empty(core, "bob")


def test_per_sender_order_over_200_messages(core: CoreProcess) -> None:
    a = core.agent("alice")
    h = core.host()
    sent_alice, sent_op = [], []
    for i in range(200):
        sent_alice.append(assert_ok(a.call("send", to="bob", body=f"a{i}"))["id"])
        if i % 3 == 0:
            sent_op.append(assert_ok(h.call("send", to="bob", body=f"o{i}"))["id"])
    b = core.agent("bob")
    got: list[dict[str, Any]] = []
    while True:
        msgs = assert_ok(b.call("recv", max=37))["messages"]
        if not msgs:
            break
        got += msgs
        assert_ok(b.call("ack", ids=[m["id"] for m in msgs]))
    from_alice = [m for m in got if m["from"] == "alice"]
    from_op = [m for m in got if m["from"] == "operator"]
    assert [m["body"] for m in from_alice] == [f"a{i}" for i in range(200)]
    assert [m["id"] for m in from_alice] == sent_alice
    assert [m["body"] for m in from_op] == [f"o{i}" for i in range(0, 200, 3)]
    assert [m["id"] for m in from_op] == sent_op
    assert len(got) == len(sent_alice) + len(sent_op)


def test_pipelined_sends_keep_their_order_and_replies(core: CoreProcess) -> None:
    """Sends written in one go are handled together (one commit, one write of replies):
    each still gets its own reply, in request order, a malformed or refused line among
    them its own refusal in its place, and a non-send after them sees them committed."""
    a = core.agent("alice")
    lines = [b'{"cmd":"send","to":"bob","body":"p%d"}\n' % i for i in range(40)]
    lines[7] = b'{"cmd":"send","to":"bob"\n'  # malformed JSON
    lines[13] = b'{"cmd":"send","to":"carol","body":"not a peer"}\n'
    lines[20] = b"\n"  # blank: no reply
    a.send_raw(b"".join(lines) + b'{"cmd":"whoami"}\n')
    replies = [a.read() for _ in range(40)]  # 39 sends (one line blank) and the whoami
    assert replies[-1]["ok"] and replies[-1]["name"] == "alice"
    sends = replies[:-1]
    assert not sends[7]["ok"] and not sends[13]["ok"], (sends[7], sends[13])
    ids = [r["id"] for i, r in enumerate(sends) if i not in (7, 13)]
    assert ids == sorted(ids) and len(set(ids)) == 37
    got = recv_all(core, "bob")
    want = [f"p{i}" for i in range(40) if i not in (7, 13, 20)]
    assert [m["body"] for m in got] == want and [m["id"] for m in got] == ids


def test_recv_acks_what_the_last_recv_returned(core: CoreProcess) -> None:
    """``recv {ack}``: a receiver's round in one request. Acked first, then read; a
    refused ack acks nothing and reads nothing; a hang-up returns only what is unacked."""
    alice = core.agent("alice")
    ids = [assert_ok(alice.call("send", to="bob", body=f"m{i}"))["id"] for i in range(3)]
    bob = core.agent("bob")
    reply = assert_ok(bob.call("recv", max=2))
    assert [m["id"] for m in reply["messages"]] == ids[:2] and "acked" not in reply
    # one id not in bob's inbox: refused whole, so m0 stays unacked and m2 unread
    assert_refused(bob.call("recv", ack=[ids[0], 999999]), "no message 999999 in this inbox")
    reply = assert_ok(bob.call("recv", ack=ids[:2]))
    assert reply["acked"] == 2 and [m["id"] for m in reply["messages"]] == [ids[2]]
    bob.close()  # m2, unacked, goes back to the inbox; m0 and m1 don't
    with core.agent("bob") as again:
        reply = assert_ok(again.call("recv", wait=5, ack=ids[:2]))  # acked again: counts 0
        assert reply["acked"] == 0 and [m["id"] for m in reply["messages"]] == [ids[2]]
        assert_refused(again.call("recv", ack=["1"]), "field 'ack.0': Input should be a valid integer")
        assert_refused(again.call("recv", ack=[0]), "field 'ack.0'")
        assert assert_ok(again.call("recv", ack=[ids[2]]))["acked"] == 1
    assert inbox_is_empty(core, "bob")


# -- ask / answer ---------------------------------------------------------------------


def test_ask_operator_shows_in_questions_and_loose_ends(core: CoreProcess) -> None:
    resp = assert_ok(core.agent("alice").call("ask", to="operator", question="deploy?", options=["yes", "no"]))
    qid = resp["id"]
    qs = core.host_call("questions")["questions"]
    assert len(qs) == 1
    q = qs[0]
    assert (q["id"], q["asker"], q["to"], q["question"], q["options"]) == (qid, "alice", "operator", "deploy?", ["yes", "no"])
    assert "answer" not in q and "answered_at" not in q
    ends = assert_ok(core.agent("alice").call("loose_ends"))
    assert [x["id"] for x in ends["questions"]] == [qid]
    # nothing lands in an agent inbox for a question to the operator
    assert inbox_is_empty(core, "bob")


def test_ask_peer_and_answer(core: CoreProcess) -> None:
    qid = assert_ok(core.agent("alice").call("ask", to="bob", question="lunch?", options=["now", "later"]))["id"]
    msgs = recv_all(core, "bob")
    assert len(msgs) == 1
    q = msgs[0]
    assert (q["kind"], q["from"], q["body"], q["ref"], q["options"]) == ("question", "alice", "lunch?", qid, ["now", "later"])
    # bob has it to answer
    assert [x["id"] for x in assert_ok(core.agent("bob").call("loose_ends"))["to_answer"]] == [qid]
    # carol may not answer a question addressed to bob; the asker may not either
    assert_refused(core.agent("carol").call("answer", id=qid, answer="hijack"), f"no question {qid}")
    assert_refused(core.agent("alice").call("answer", id=qid, answer="self"), f"no question {qid}")
    assert_ok(core.agent("bob").call("answer", id=qid, answer="now"))
    answers = recv_all(core, "alice")
    assert [(m["kind"], m["from"], m["body"], m["ref"]) for m in answers] == [("answer", "bob", "now", qid)]
    # answered once only
    assert_refused(core.agent("bob").call("answer", id=qid, answer="later"), "already answered")
    assert assert_ok(core.agent("alice").call("loose_ends"))["questions"] == []
    assert assert_ok(core.agent("bob").call("loose_ends"))["to_answer"] == []
    assert recv_all(core, "alice", wait=0) == []


def test_ask_refused_to_non_peer_and_unknown(module_core: CoreProcess) -> None:
    core = module_core  # shared: a refusal changes nothing, and that is checked
    assert_refused(core.agent_call("carol", "ask", to="alice", question="?"), "not one of carol's peers")
    assert_refused(core.agent_call("alice", "ask", to="nobody-here", question="?"), "no agent named")
    assert_refused(core.agent_call("alice", "ask", to="alice", question="?"), "itself")
    assert core.host_call("questions")["questions"] == []
    assert inbox_is_empty(core, "alice")


def test_answer_unknown_question_refused(module_core: CoreProcess) -> None:
    assert_refused(module_core.agent_call("bob", "answer", id=999, answer="x"), "no question 999")


# -- approvals -------------------------------------------------------------------------


def test_request_approval_custom(core: CoreProcess) -> None:
    payload = {"what": "reboot", "when": [1, 2]}
    resp = assert_ok(core.agent("alice").call("request_approval", kind="custom", description="may I?", payload=payload))
    assert len(resp["payload_sha256"]) == 64
    rows = core.host_call("pending")["approvals"]
    assert [(r["id"], r["agent"], r["kind"], r["status"], r["payload"]) for r in rows] == [
        (resp["id"], "alice", "custom", "pending", payload)
    ]
    assert rows[0]["payload_sha256"] == resp["payload_sha256"]
    ends = assert_ok(core.agent("alice").call("loose_ends"))
    assert [a["id"] for a in ends["approvals"]] == [resp["id"]]
    assert assert_ok(core.agent("bob").call("loose_ends"))["approvals"] == []


def test_request_approval_spawn(core: CoreProcess) -> None:
    payload = {"name": "helper", "spec": {"runtime": "command", "command": ["true"]}}
    resp = assert_ok(core.agent("bob").call("request_approval", kind="spawn", description="a helper", payload=payload))
    rows = core.host_call("pending")["approvals"]
    assert [(r["id"], r["kind"], r["agent"]) for r in rows] == [(resp["id"], "spawn", "bob")]
    # not applied before approval
    assert "helper" not in core.host_call("list")["agents"]


@pytest.mark.parametrize(
    ("kind", "payload", "needle"),
    [
        ("launch-missiles", {}, "unknown approval kind"),
        ("spawn", None, "spawn payload"),
        ("spawn", {"name": "helper"}, "missing field 'spec'"),
        ("spawn", {"name": "Helper", "spec": {"command": ["true"]}}, "bad agent name"),
        ("spawn", {"name": "operator", "spec": {"command": ["true"]}}, "reserved"),
        ("spawn", {"name": "helper", "spec": {"runtime": "command"}}, "command"),
        ("spawn", {"name": "helper", "spec": {"command": ["true"]}, "parent": "carol"}, "unknown field 'parent'"),
        ("spawn", {"name": "bob", "spec": {"command": ["true"]}}, "already exists"),
    ],
)
def test_request_approval_refused(module_core: CoreProcess, kind: str, payload: Any, needle: str) -> None:
    core = module_core  # shared: a refusal changes nothing, and that is checked
    assert_refused(core.agent_call("alice", "request_approval", kind=kind, description="d", payload=payload), needle)
    assert core.host_call("pending")["approvals"] == []


# -- status / reminders / loose ends ----------------------------------------------------


def test_set_status(core: CoreProcess) -> None:
    assert "status_text" not in core.status("carol")
    resp = assert_ok(core.agent("carol").call("set_status", text="reading the docs"))
    row = core.status("carol")
    assert row["status_text"] == "reading the docs"
    assert row["status_set_at"] == resp["status_set_at"]
    assert "status_text" not in core.status("alice")
    assert_refused(core.agent("carol").call("set_status", text="x" * 5000), "text")
    assert core.status("carol")["status_text"] == "reading the docs"


def test_remind_in_seconds_is_delivered(core: CoreProcess) -> None:
    before = time.time()
    resp = assert_ok(core.agent("alice").call("remind", in_seconds=0.5, text="stretch"))
    assert before - 0.6 <= wire_time(resp["due_at"]) <= time.time() + 0.6  # to the second
    msgs = recv_all(core, "alice", wait=15)
    assert [(m["kind"], m["from"], m["body"], m["ref"]) for m in msgs] == [("reminder", "hive", "stretch", resp["id"])]
    assert time.time() >= wire_time(resp["due_at"])
    assert core.status("alice")["pending_reminders"] == 0


def test_remind_at_iso_is_delivered(core: CoreProcess) -> None:
    at = datetime.now(UTC) + timedelta(seconds=1)
    resp = assert_ok(core.agent("bob").call("remind", at=at.isoformat(), text="standup"))
    assert abs(wire_time(resp["due_at"]) - at.timestamp()) < 1  # to the second
    # pending until due (it is due in about a second)
    assert core.status("bob")["pending_reminders"] == 1
    msgs = recv_all(core, "bob", wait=15)
    assert [(m["kind"], m["body"]) for m in msgs] == [("reminder", "standup")]
    assert time.time() >= at.timestamp()
    assert core.status("bob")["pending_reminders"] == 0


def test_remind_counts_pending(core: CoreProcess) -> None:
    a = core.agent("alice")
    assert_ok(a.call("remind", in_seconds=3600, text="one"))
    assert_ok(a.call("remind", at=(datetime.now(UTC) + timedelta(days=2)).isoformat(), text="two"))
    assert_ok(a.call("remind", at=time.time() + 7200, text="three"))
    assert core.status("alice")["pending_reminders"] == 3
    assert core.status("bob")["pending_reminders"] == 0


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"in_seconds": 10, "at": "2030-01-01T00:00:00+00:00"}, "exactly one"),
        ({}, "exactly one"),
        ({"at": "2030-01-01T00:00:00"}, "timezone"),
        ({"at": "next tuesday"}, "iso 8601"),
        ({"in_seconds": 0}, "in_seconds"),
        ({"in_seconds": -5}, "in_seconds"),
        ({"in_seconds": 400 * 24 * 3600}, "in_seconds"),
        ({"at": "2999-01-01T00:00:00+00:00"}, "a year"),
    ],
)
def test_remind_refused(module_core: CoreProcess, fields: dict[str, Any], needle: str) -> None:
    core = module_core  # shared: a refusal changes nothing, and that is checked
    assert_refused(core.agent_call("alice", "remind", text="t", **fields), needle)
    assert core.status("alice")["pending_reminders"] == 0


def test_loose_ends_lists_only_own_open_items(core: CoreProcess) -> None:
    a, b = core.agent("alice"), core.agent("bob")
    q_op = assert_ok(a.call("ask", to="operator", question="q1"))["id"]
    q_bob = assert_ok(a.call("ask", to="bob", question="q2"))["id"]
    q_from_bob = assert_ok(b.call("ask", to="alice", question="q3"))["id"]
    aid = assert_ok(a.call("request_approval", kind="custom", description="d", payload=1))["id"]
    assert_ok(b.call("request_approval", kind="custom", description="d", payload=2))
    ends = assert_ok(a.call("loose_ends"))
    no_nulls(ends)
    assert [q["id"] for q in ends["questions"]] == [q_op, q_bob]
    assert [q["id"] for q in ends["to_answer"]] == [q_from_bob]
    assert [x["id"] for x in ends["approvals"]] == [aid]
    # resolving things removes them
    assert_ok(core.host_call("answer_question", id=q_op, answer="ok"))
    assert_ok(core.host_call("deny", id=aid))
    assert_ok(a.call("answer", id=q_from_bob, answer="sure"))
    ends = assert_ok(a.call("loose_ends"))
    assert [q["id"] for q in ends["questions"]] == [q_bob]
    assert ends["to_answer"] == [] and ends["approvals"] == []

"""Identity = socket: no field in an agent.sock request can name a sender, and no
request on an agent.sock can do what only the operator may do."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import CoreProcess, assert_ok, assert_refused
from hyperhive.client import Client
from hyperhive.wire.agent import AGENT_VERBS, agent_request
from hyperhive.wire.host import HOST_MODELS

SPOOF_FIELDS = ("from", "as", "agent", "sender", "operator", "by", "user", "name", "identity", "on_behalf_of")
SPOOF_VALUES: tuple[Any, ...] = ("bob", "operator", {"name": "operator"}, True)
HOST_VERBS = tuple(m.model_fields["cmd"].annotation.__args__[0] for m in HOST_MODELS)  # type: ignore[union-attr]


class World:
    """State set up once for the module: questions and approvals to aim at."""

    q_to_alice: int  # bob asked alice: alice may answer it
    q_to_operator: int  # alice asked the operator: nobody on an agent.sock may answer it
    q_to_bob: int  # alice asked bob
    approval: int  # alice's pending custom approval
    spawn_approval: int  # bob's pending spawn approval
    msg_to_alice: int


@pytest.fixture(scope="module")
def world(module_core: CoreProcess) -> World:
    core = module_core
    w = World()
    w.q_to_alice = assert_ok(core.agent_call("bob", "ask", to="alice", question="for alice"))["id"]
    w.q_to_operator = assert_ok(core.agent_call("alice", "ask", to="operator", question="for the operator"))["id"]
    w.q_to_bob = assert_ok(core.agent_call("alice", "ask", to="bob", question="for bob"))["id"]
    w.approval = assert_ok(core.agent_call("alice", "request_approval", kind="custom", description="d", payload={"x": 1}))["id"]
    payload = {"name": "mallory", "spec": {"runtime": "command", "command": ["true"]}}
    w.spawn_approval = assert_ok(core.agent_call("bob", "request_approval", kind="spawn", description="d", payload=payload))["id"]
    w.msg_to_alice = assert_ok(core.agent_call("bob", "send", to="alice", body="hi alice"))["id"]
    assert_ok(core.host_call("send", to="alice", body="from the operator"))
    return w


def base_request(verb: str, w: World) -> dict[str, Any]:
    """A valid request for each agent verb, as alice."""
    fields: dict[str, dict[str, Any]] = {
        "whoami": {},
        "peers": {},
        "send": {"to": "bob", "body": "spoofed?"},
        "recv": {"wait": 0, "max": 5},
        "ack": {"ids": [w.msg_to_alice]},
        "ask": {"to": "operator", "question": "spoofed?"},
        "answer": {"id": w.q_to_alice, "answer": "spoofed?"},
        "request_approval": {"kind": "custom", "description": "spoofed?", "payload": {"a": 1}},
        "set_status": {"text": "spoofed?"},
        "remind": {"in_seconds": 600, "text": "spoofed?"},
        "loose_ends": {},
    }
    req = {"cmd": verb, **fields[verb]}
    agent_request.validate_python(req)  # the base itself is valid
    return req


def snapshot(core: CoreProcess) -> str:
    """A checksum of everything the operator can see."""
    parts = {cmd: core.host_call(cmd) for cmd in ("agent_status", "pending", "questions", "inbox", "list")}
    for resp in parts.values():
        assert_ok(resp)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@pytest.fixture
def watcher(module_core: CoreProcess) -> Iterator[Client]:
    """A subscriber to every event kind: a refused request must publish nothing."""
    sub = Client(module_core.host_sock, timeout=15)
    stream = sub.stream("subscribe")
    assert_ok(next(stream))
    yield sub
    sub.close()


def assert_no_events(core: CoreProcess, sub: Client) -> None:
    """Publish a sentinel event; it must be the first event the watcher sees."""
    # A new text each time: carol's status set again to the text it has publishes nothing.
    marker = json.dumps(["sentinel", secrets.token_hex(8)])
    assert_ok(core.agent_call("carol", "set_status", text=marker))
    ev = assert_ok(sub.read())["event"]
    assert ev["kind"] == "agent_status" and ev["agent"]["status_text"] == marker, ev


def test_all_agent_verbs_covered() -> None:
    assert set(AGENT_VERBS) == {
        "whoami", "peers", "send", "recv", "ack", "ask", "answer", "request_approval", "set_status",
        "remind", "loose_ends",
    }


@pytest.mark.parametrize("verb", AGENT_VERBS)
def test_spoofing_fields_refused(module_core: CoreProcess, world: World, watcher: Client, verb: str) -> None:
    core = module_core
    before = snapshot(core)
    c = core.agent("alice")
    base = base_request(verb, world)
    for field in SPOOF_FIELDS:
        for value in SPOOF_VALUES:
            req = {**base, field: value}
            c.send_raw(json.dumps(req).encode() + b"\n")
            assert_refused(c.read(), f"unknown field '{field}'")
    # the connection is still alice's and still usable
    assert assert_ok(c.call("whoami"))["name"] == "alice"
    c.close()
    assert snapshot(core) == before
    assert_no_events(core, watcher)
    # nothing arrived in bob's inbox (a spoofed send would land there) and alice's is intact
    with core.agent("bob") as b:
        msgs = assert_ok(b.call("recv", wait=0, max=1000))["messages"]
        assert [m for m in msgs if m["body"] == "spoofed?"] == []
    with core.agent("alice") as a:
        msgs = assert_ok(a.call("recv", wait=0, max=1000))["messages"]
        assert world.msg_to_alice in [m["id"] for m in msgs]


@pytest.mark.parametrize("verb", [v for v in HOST_VERBS if v not in AGENT_VERBS])
def test_host_verbs_unknown_on_agent_sock(module_core: CoreProcess, world: World, watcher: Client, verb: str) -> None:
    core = module_core
    before = snapshot(core)
    attempts = [
        {},
        {"id": world.approval},
        {"id": world.spawn_approval, "note": "no"},
        {"id": world.q_to_operator, "answer": "forged operator answer"},
        {"name": "bob"},
        {"name": "bob", "paused": True},
        {"scope": {}},
        {"scope": {"agent_names": ["bob"]}, "graceful": False},
        {"name": "mallory", "spec": {"runtime": "command", "command": ["true"]}},
        {"to": "bob", "body": "x"},
        {"kinds": ["message"]},
    ]
    with core.agent("alice") as c:
        for extra in attempts:
            resp = c.call(verb, **extra)
            assert_refused(resp, f"unknown command '{verb}'")
        assert assert_ok(c.call("whoami"))["name"] == "alice"
    assert snapshot(core) == before
    assert_no_events(core, watcher)
    pending = {a["id"]: a["status"] for a in core.host_call("pending")["approvals"]}
    assert pending == {world.approval: "pending", world.spawn_approval: "pending"}
    assert "mallory" not in core.host_call("list")["agents"]


@pytest.mark.parametrize("name", ["alice", "bob", "carol"])
def test_agent_cannot_answer_operator_question(module_core: CoreProcess, world: World, watcher: Client, name: str) -> None:
    core = module_core
    before = snapshot(core)
    with core.agent(name) as c:
        assert_refused(c.call("answer", id=world.q_to_operator, answer="forged"), f"no question {world.q_to_operator}")
        # the same refusal for a question to another agent: no probing which exists
        assert_refused(c.call("answer", id=world.q_to_bob if name != "bob" else world.q_to_alice, answer="forged"), "no question")
        # and for extra fields that try to claim operator authority
        for extra in ({"as": "operator"}, {"operator": True}, {"to": "operator"}, {"from": "operator"}):
            assert_refused(c.call("answer", id=world.q_to_operator, answer="forged", **extra), "unknown field")
    assert snapshot(core) == before
    assert_no_events(core, watcher)
    open_ids = [q["id"] for q in core.host_call("questions")["questions"]]
    assert world.q_to_operator in open_ids


def test_agent_cannot_act_for_another_agent(module_core: CoreProcess, world: World, watcher: Client) -> None:
    """carol may not answer what was asked of bob, ack bob's messages or read his inbox."""
    core = module_core
    before = snapshot(core)
    with core.agent("carol") as c:
        assert_refused(c.call("answer", id=world.q_to_bob, answer="as bob"), "no question")
        assert_refused(c.call("ack", ids=[world.msg_to_alice]), f"no message {world.msg_to_alice}")
        msgs = assert_ok(c.call("recv", wait=0, max=1000))["messages"]
        assert all(m["id"] != world.msg_to_alice for m in msgs)
    assert snapshot(core) == before
    assert_no_events(core, watcher)

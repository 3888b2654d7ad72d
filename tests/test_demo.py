"""The demo story (examples/demo/hive.toml), end to end in real cages, every step
checked through ``host.sock`` as the operator sees it:

operator → lead; lead asks scout, scout answers (the answer carries the
question's id as ``ref``); lead asks the operator; the operator says yes; lead
asks for approval to spawn ``helper`` (payload and sha256 shown); the operator
approves; helper starts in its own cage (hostname helper, its own uid) with
parent lead; helper reports to lead, lead forwards the report to the operator;
lead's reminder fires.

Waits are on ``subscribe`` events or on polling with deadlines; no fixed sleeps.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import threading
import time
import tomllib
from collections.abc import Callable
from typing import Any

from hive_fixture import REPO, HiveFactory, HiveProcess
from hyperhive.client import Client

DEMO_CONFIG = REPO / "examples" / "demo" / "hive.toml"
TURN_PY = "/opt/hive/src/hyperhive/demo/turn.py"  # as every cage sees the hive's code
DEADLINE = 30.0  # seconds: the machine is small and shared
# Cages are keyed by agent name on the host: another demo hive on this machine (someone
# else's test run, scripts/demo.sh) must be gone before this one starts.


class Events:
    """A ``subscribe`` stream on host.sock, collected by a thread."""

    def __init__(self, hive: HiveProcess, kinds: list[str]) -> None:
        self.client = Client(hive.host_sock, timeout=None)
        first = self.client.call("subscribe", kinds=kinds)
        assert first.get("ok") and first.get("subscribed") == sorted(kinds), first
        self.events: list[dict[str, Any]] = []
        self.error: str | None = None
        self.cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                reply = self.client.read()
            except (OSError, ValueError, ConnectionError) as e:
                with self.cond:
                    self.error = self.error or f"subscription ended: {e}"
                    self.cond.notify_all()
                return
            with self.cond:
                if reply.get("ok"):
                    self.events.append(reply["event"])
                else:
                    self.error = f"subscription error: {reply}"
                self.cond.notify_all()

    def wait_for(self, pred: Callable[[dict[str, Any]], Any], what: str, timeout: float = DEADLINE) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            seen = 0
            while True:
                for event in self.events[seen:]:
                    if pred(event):
                        return event
                seen = len(self.events)
                if self.error:
                    raise AssertionError(f"{self.error} while waiting for {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no event for {what} within {timeout:.0f} s; events: {self.events[-20:]}")
                self.cond.wait(left)

    def close(self) -> None:
        try:
            self.client.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.client.close()


def poll(fn: Callable[[], Any], what: str, timeout: float = DEADLINE, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("ok") is True, reply
    return reply


def canonical_sha256(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def test_demo_story_end_to_end(hive_factory: HiveFactory) -> None:
    declared = tomllib.loads(DEMO_CONFIG.read_text())["agents"]
    assert sorted(declared) == ["lead", "scout"]
    hive = hive_factory(declared, start=False)
    shutil.copyfile(DEMO_CONFIG, hive.config_path)  # the example file itself, not a rendering of it
    hive.config_path.chmod(0o644)
    hive.start()  # waits until lead and scout are running (harness connected)
    # helper's cage is checked at teardown too (it must be gone after hive up stops).
    hive.agents["helper"] = {"runtime": "command", "command": ["python3", TURN_PY], "peers": ["lead"]}

    events = Events(hive, ["message", "question", "answer", "approval", "agent_status", "reminder"])
    try:
        _story(hive, events)
    finally:
        events.close()


def _story(hive: HiveProcess, events: Events) -> None:
    call = hive.host_call
    rows = hive.agent_status()
    assert {n: (r["running"], r["failed"], r.get("parent")) for n, r in rows.items()} == {
        "lead": (True, False, None), "scout": (True, False, None),
    }

    # 1. The operator messages lead.
    sent = ok(call("send", to="lead", body="Can we ship?"))
    events.wait_for(
        lambda e: e.get("message", {}).get("id") == sent["id"]
        and e["message"]["from"] == "operator" and e["message"]["to"] == "lead",
        "the operator's message to lead",
    )

    # 2. lead asks scout; scout answers; the answer reaches lead with ref = the question.
    asked = events.wait_for(
        lambda e: e.get("question", {}).get("asker") == "lead" and e["question"]["to"] == "scout"
        and e["question"].get("answer") is None,
        "lead's question to scout",
    )["question"]
    assert "Can we ship?" in asked["question"]
    answered = events.wait_for(
        lambda e: "question" in e and e["question"]["id"] == asked["id"] and e["question"].get("answer"),
        "scout's answer",
    )["question"]
    assert answered["answer"] == "Nothing blocks it: all tests are green."
    answer_msg = events.wait_for(
        lambda e: e.get("message", {}).get("kind") == "answer" and e["message"]["from"] == "scout",
        "the answer delivered to lead",
    )["message"]
    assert answer_msg["to"] == "lead"
    assert answer_msg["ref"] == asked["id"]
    assert answer_msg["body"] == answered["answer"]

    # 3. lead asks the operator; the question shows in `questions`.
    def operator_question() -> dict[str, Any] | None:
        qs = ok(call("questions"))["questions"]
        return next((q for q in qs if q["asker"] == "lead"), None)

    question = poll(operator_question, "lead's question in `questions`")
    assert question["to"] == "operator"
    assert question["options"] == ["yes", "no"]
    assert "Nothing blocks it" in question["question"] and "Ship the release?" in question["question"]
    assert question.get("answer") is None
    poll(lambda: hive.agent_status()["lead"].get("status_text") == "waiting for the operator's go-ahead",
         "lead's status: waiting for the operator")

    # 4. The operator answers yes → lead requests approval to spawn helper.
    ok(call("answer_question", id=question["id"], answer="yes"))
    assert all(q["id"] != question["id"] for q in ok(call("questions"))["questions"])

    def spawn_approval() -> dict[str, Any] | None:
        rows = ok(call("pending"))["approvals"]
        return next((a for a in rows if a["agent"] == "lead" and a["kind"] == "spawn"), None)

    approval = poll(spawn_approval, "a pending spawn approval from lead")
    assert approval["status"] == "pending"
    assert approval["payload"] == {
        "name": "helper",
        "spec": {"runtime": "command", "command": ["python3", TURN_PY], "peers": ["lead"]},
    }
    assert approval["payload_sha256"] == canonical_sha256(approval["payload"])
    assert "helper" in approval["description"]
    assert "helper" not in hive.agent_status()  # nothing applied before the operator approves
    poll(lambda: hive.agent_status()["lead"].get("status_text") == f"waiting for approval {approval['id']} to spawn helper",
         "lead's status: waiting for approval")

    # 5. Approve → helper exists, child of lead, and comes up in its own cage.
    resolved = ok(call("approve", id=approval["id"]))["approval"]
    assert resolved["status"] == "approved" and resolved["payload_sha256"] == approval["payload_sha256"]
    assert not any(a["id"] == approval["id"] for a in ok(call("pending"))["approvals"])
    helper = poll(lambda: (r := hive.agent_status().get("helper")) and r["running"] and r,
                  "helper to be running (harness connected)")
    assert helper["parent"] == "lead"
    assert helper["failed"] is False
    assert "helper" in ok(call("list"))["agents"]

    hostname = hive.exec("helper", "hostname")
    assert (hostname.returncode, hostname.stdout.strip()) == (0, "helper"), hostname.stderr
    uids = {n: hive.exec(n, "id", "-u") for n in ("helper", "lead")}
    for n, p in uids.items():
        assert p.returncode == 0, (n, p.stderr)
    helper_uid, lead_uid = int(uids["helper"].stdout), int(uids["lead"].stdout)
    assert helper_uid != lead_uid and 0 not in (helper_uid, lead_uid)
    cages = {n: hive.cage(n) for n in ("helper", "lead")}
    assert cages["helper"]["running"] and cages["helper"]["uid"] == helper_uid
    assert cages["lead"]["uid"] == lead_uid
    assert cages["helper"]["pid"] != cages["lead"]["pid"]
    assert set(hive.cgroup("helper").pids()).isdisjoint(hive.cgroup("lead").pids())

    # 6. helper reports to lead; lead forwards the report to the operator's inbox.
    report = events.wait_for(
        lambda e: e.get("message", {}).get("from") == "helper" and e["message"]["to"] == "lead",
        "helper's report to lead",
    )["message"]
    assert report["body"] == "Release notes written: 3 features, 2 fixes."
    forwarded = poll(
        lambda: next((m for m in ok(call("inbox"))["messages"]
                      if m["from"] == "lead" and m["body"].startswith("helper reports:")), None),
        "lead's forward of helper's report in the operator's inbox",
    )
    assert forwarded["body"] == "helper reports: Release notes written: 3 features, 2 fixes."

    # 7. The reminder lead set (2 s after the approval) fires.
    reminder = events.wait_for(lambda e: e.get("agent") == "lead" and "reminder_id" in e, "lead's reminder")
    assert reminder["text"] == "check that helper reported back"
    fired = poll(
        lambda: next((m for m in ok(call("inbox"))["messages"]
                      if m["from"] == "lead" and m["body"].startswith("Reminder fired:")), None),
        "the reminder's note in the operator's inbox",
    )
    assert fired["body"] == "Reminder fired: check that helper reported back"
    poll(lambda: hive.agent_status()["lead"].get("status_text") == "reminder fired: check that helper reported back",
         "lead's status text after the reminder")
    assert hive.agent_status()["lead"]["pending_reminders"] == 0

    # Every turn of every demo agent ran to a clean end (turn.py never failed).
    for name, at_least in (("lead", 6), ("scout", 1), ("helper", 1)):
        entries = poll(lambda name=name, at_least=at_least: _finished_turns(hive, name, at_least), f"{name}'s turns to finish")
        exits = [e for e in entries if e["kind"] == "exit"]
        assert all(e["data"]["exit_status"] == 0 for e in exits), (name, entries)
        assert not [e for e in entries if e["kind"] == "stderr"], (name, entries)

    statuses = hive.agent_status()
    assert {n: (r["running"], r["failed"]) for n, r in statuses.items()} == {
        "lead": (True, False), "scout": (True, False), "helper": (True, False),
    }
    assert ok(call("questions"))["questions"] == []
    assert ok(call("pending"))["approvals"] == []


def _finished_turns(hive: HiveProcess, name: str, at_least: int) -> list[dict[str, Any]] | None:
    entries = ok(hive.host_call("transcript", name=name))["entries"]
    return entries if sum(e["kind"] == "exit" for e in entries) >= at_least else None

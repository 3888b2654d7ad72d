"""What the core acknowledged survives a crash (kill -9) and a restart."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

from helpers import CoreProcess, assert_ok, wire_time
from hyperhive.client import Client


def drain(core: CoreProcess, name: str, wait: float = 15.0) -> list[dict]:
    with core.agent(name, timeout=wait + 15) as c:
        msgs = assert_ok(c.call("recv", wait=wait, max=1000))["messages"]
        if msgs:
            assert_ok(c.call("ack", ids=[m["id"] for m in msgs]))
        return msgs


def test_send_acknowledged_then_kill9_is_delivered(core: CoreProcess) -> None:
    a = core.agent("alice")
    mid = assert_ok(a.call("send", to="bob", body="survive the crash"))["id"]
    core.kill9()  # right after the acknowledgement
    core.start()
    msgs = drain(core, "bob", wait=0)
    assert [(m["id"], m["from"], m["body"]) for m in msgs] == [(mid, "alice", "survive the crash")]


def test_everything_acknowledged_before_kill9_survives(core: CoreProcess) -> None:
    a, b, h = core.agent("alice"), core.agent("bob"), core.host()
    ids = [assert_ok(a.call("send", to="bob", body=f"m{i}"))["id"] for i in range(50)]
    op = assert_ok(b.call("send", to="operator", body="to the operator"))["id"]
    qid = assert_ok(a.call("ask", to="operator", question="still there?"))["id"]
    aid = assert_ok(b.call("request_approval", kind="custom", description="d", payload={"k": [1, 2]}))["id"]
    set_at = assert_ok(a.call("set_status", text="mid-crash"))["status_set_at"]
    assert_ok(h.call("set_paused", name="carol", paused=True))
    assert_ok(h.call("spawn", name="dave", spec={"runtime": "command", "command": ["true"]}))
    core.kill9()
    core.start()
    assert [m["id"] for m in drain(core, "bob", wait=0)] == ids
    assert [m["id"] for m in core.host_call("inbox")["messages"]] == [op]
    assert [q["id"] for q in core.host_call("questions")["questions"]] == [qid]
    pending = core.host_call("pending")["approvals"]
    assert [(p["id"], p["payload"]) for p in pending] == [(aid, {"k": [1, 2]})]
    alice = core.status("alice")
    assert (alice["status_text"], alice["status_set_at"]) == ("mid-crash", set_at)
    assert core.status("carol")["paused"] is True
    assert assert_ok(core.agent_call("dave", "whoami"))["name"] == "dave"


def test_acked_messages_stay_acked_after_kill9(core: CoreProcess) -> None:
    a = core.agent("alice")
    first = assert_ok(a.call("send", to="bob", body="one"))["id"]
    second = assert_ok(a.call("send", to="bob", body="two"))["id"]
    b = core.agent("bob")
    assert [m["id"] for m in assert_ok(b.call("recv", max=1))["messages"]] == [first]
    assert_ok(b.call("ack", ids=[first]))
    core.kill9()
    core.start()
    assert [m["id"] for m in drain(core, "bob", wait=0)] == [second]


def test_unacked_in_flight_message_redelivered_after_kill9(core: CoreProcess) -> None:
    mid = assert_ok(core.agent("alice").call("send", to="bob", body="in flight"))["id"]
    b = core.agent("bob")
    assert [m["id"] for m in assert_ok(b.call("recv"))["messages"]] == [mid]
    core.kill9()  # received but never acked
    core.start()
    assert [m["id"] for m in drain(core, "bob", wait=0)] == [mid]


def test_sends_racing_a_kill9_are_all_or_nothing(core: CoreProcess) -> None:
    """Every send acknowledged before the crash is there afterwards; none is half there."""
    acked: list[int] = []
    stop = threading.Event()

    def sender() -> None:
        try:
            with core.agent("alice", timeout=10) as c:
                i = 0
                while not stop.is_set():
                    resp = c.call("send", to="bob", body=f"r{i}")
                    acked.append(resp["id"])
                    i += 1
        except (ConnectionError, OSError, ValueError):
            pass  # the core went away mid-request

    th = threading.Thread(target=sender)
    th.start()
    deadline = time.monotonic() + 20
    while len(acked) < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(acked) >= 100
    core.kill9()
    stop.set()
    th.join(15)
    assert not th.is_alive()
    core.start()
    got = drain(core, "bob", wait=0)
    got_ids = [m["id"] for m in got]
    assert set(acked) <= set(got_ids)
    assert got_ids == sorted(got_ids)
    assert all(m["body"] == f"r{k}" for k, m in enumerate(got))  # no gaps, no torn rows


def test_reminders_survive_restart_and_downtime(core: CoreProcess) -> None:
    a = core.agent("alice")
    soon = assert_ok(a.call("remind", in_seconds=1, text="due while down"))
    at = datetime.now(UTC) + timedelta(seconds=8)
    later = assert_ok(a.call("remind", at=at.isoformat(), text="due after restart"))
    far = assert_ok(core.agent("bob").call("remind", in_seconds=3600, text="far future"))
    assert core.status("alice")["pending_reminders"] == 2
    assert core.status("bob")["pending_reminders"] == 1
    core.stop_clean()
    # stay down until the first reminder is due
    while time.time() < wire_time(soon["due_at"]) + 1.5:  # the wire time is to the second
        time.sleep(0.1)
    core.start()
    first = drain(core, "alice", wait=15)
    assert [(m["kind"], m["from"], m["body"], m["ref"]) for m in first] == [
        ("reminder", "hive", "due while down", soon["id"])
    ]
    assert time.time() < wire_time(later["due_at"]), "restart too slow for this test's timing"
    assert core.status("alice")["pending_reminders"] == 1
    second = drain(core, "alice", wait=30)
    assert [(m["kind"], m["body"], m["ref"]) for m in second] == [("reminder", "due after restart", later["id"])]
    assert time.time() >= wire_time(later["due_at"])
    assert core.status("alice")["pending_reminders"] == 0
    assert core.status("bob")["pending_reminders"] == 1
    assert wire_time(far["due_at"]) > time.time() + 3000


def test_reminder_due_while_killed_is_delivered_once(core: CoreProcess) -> None:
    r = assert_ok(core.agent("carol").call("remind", in_seconds=0.5, text="tick"))
    core.kill9()
    while time.time() < wire_time(r["due_at"]) + 1.3:  # the wire time is to the second
        time.sleep(0.05)
    core.start()
    msgs = drain(core, "carol", wait=15)
    assert [(m["kind"], m["body"], m["ref"]) for m in msgs] == [("reminder", "tick", r["id"])]
    assert core.status("carol")["pending_reminders"] == 0
    # delivered once: not again after another restart
    core.restart()
    assert drain(core, "carol", wait=1) == []
    assert core.status("carol")["pending_reminders"] == 0


def test_pending_approval_can_be_approved_after_restart(core: CoreProcess) -> None:
    payload = {"name": "late", "spec": {"runtime": "command", "command": ["true"]}}
    resp = assert_ok(core.agent("alice").call("request_approval", kind="spawn", description="d", payload=payload))
    core.kill9()
    core.start()
    row = core.host_call("pending")["approvals"][0]
    assert (row["id"], row["payload_sha256"]) == (resp["id"], resp["payload_sha256"])
    assert_ok(core.host_call("approve", id=resp["id"]))
    assert core.status("late")["parent"] == "alice"
    core.restart()
    assert assert_ok(core.agent_call("late", "whoami")) == {"version": 1, "ok": True, "name": "late", "parent": "alice"}


def test_sigterm_with_open_connections_exits_cleanly(core: CoreProcess) -> None:
    """Shutdown doesn't wait on (or crash over) clients that are mid long-poll or subscribed."""
    sub = Client(core.host_sock, timeout=15)
    assert_ok(next(sub.stream("subscribe")))
    poller = Client(core.agent_sock("bob"), timeout=30)
    idle = Client(core.agent_sock("alice"), timeout=15)
    assert_ok(idle.call("whoami"))
    result: dict[str, BaseException | dict] = {}

    def long_poll() -> None:
        try:
            result["resp"] = poller.call("recv", wait=600)
        except BaseException as e:
            result["resp"] = e

    th = threading.Thread(target=long_poll)
    th.start()
    time.sleep(0.3)  # let the recv block
    t = time.monotonic()
    assert core.stop() == 0
    assert time.monotonic() - t < 10
    th.join(15)
    assert not th.is_alive()
    assert isinstance(result["resp"], ConnectionError)  # told by EOF, not left hanging
    for c in (sub, idle):
        assert c._file.readline() == b""
        c.close()
    poller.close()
    assert not core.host_sock.exists()
    assert not core.agent_sock("alice").exists()
    core.start()
    assert assert_ok(core.agent_call("bob", "whoami"))["name"] == "bob"

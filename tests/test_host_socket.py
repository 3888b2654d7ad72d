"""host.sock: every operator verb of DESIGN.md, and who may connect (SO_PEERCRED)."""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import socket
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import CoreProcess, assert_ok, assert_refused, no_nulls, strict_loads, wire_time
from hyperhive.client import Client, HiveUnavailable

ROW_FIELDS = {
    "name", "running", "failed", "needs_update", "needs_login", "deployed_sha", "pending_reminders",
    "paused", "parent", "active_model", "status_text", "status_set_at", "url",
    "created_at",  # ours, beside hyperhive's: the agent's incarnation (``--created-at``)
}
APPROVAL_FIELDS = {
    "id", "agent", "kind", "commit_ref", "requested_at", "status", "resolved_at", "note", "description",
    "payload", "payload_sha256",
}
SPEC = {"runtime": "command", "command": ["true"]}


def canonical_sha(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def sock_exists(core: CoreProcess, name: str) -> bool:
    return core.agent_sock(name).exists()


def agent_reachable(core: CoreProcess, name: str) -> bool:
    try:
        with Client(core.agent_sock(name), timeout=10) as c:
            return c.call("whoami").get("name") == name
    except HiveUnavailable:
        return False


def running(core: CoreProcess) -> dict[str, bool]:
    return {r["name"]: r["running"] for r in core.host_call("agent_status")["agent_statuses"]}


def inbox(core: CoreProcess, name: str) -> list[dict[str, Any]]:
    with core.agent(name) as c:
        msgs = assert_ok(c.call("recv", wait=10))["messages"]
        if msgs:
            assert_ok(c.call("ack", ids=[m["id"] for m in msgs]))
        return msgs


# -- list / agent_status -------------------------------------------------------------------


def test_list(module_core: CoreProcess) -> None:
    core = module_core  # shared: only looked at (no test sharing it changes it)
    resp = assert_ok(core.host_call("list"))
    assert resp["agents"] == ["alice", "bob", "carol"]


def test_agent_status_rows(module_core: CoreProcess) -> None:
    core = module_core  # shared: only looked at (no test sharing it changes it)
    resp = assert_ok(core.host_call("agent_status"))
    no_nulls(resp)
    rows = resp["agent_statuses"]
    assert [r["name"] for r in rows] == ["alice", "bob", "carol"]
    for r in rows:
        assert set(r) <= ROW_FIELDS, set(r) - ROW_FIELDS
        assert r["running"] is True
        assert r["failed"] is False and r["needs_update"] is False and r["needs_login"] is False
        assert r["paused"] is False
        assert r["pending_reminders"] == 0
        assert r["url"] == f"http://127.0.0.1:8080/agent/{r['name']}/"
        assert type(r["created_at"]) is float and r["created_at"] > 0  # a number: pasted, compared exactly
        # optional fields with no value are absent, not null
        for absent in ("parent", "active_model", "status_text", "status_set_at", "deployed_sha"):
            assert absent not in r


def test_agent_status_optional_fields_appear_when_set(core_factory: Any) -> None:
    agents = {
        "alice": {"runtime": "command", "command": ["true"], "peers": ["bob"]},
        "bob": {"runtime": "claude", "model": "claude-test-model"},
    }
    core = core_factory(agents, hive={"listen": "127.0.0.1:9191"})
    at = assert_ok(core.agent("alice").call("set_status", text="busy"))["status_set_at"]
    wire_time(at)
    assert_ok(core.agent("alice").call("remind", in_seconds=3600, text="later"))
    payload = {"name": "kid", "spec": SPEC}
    aid = assert_ok(core.agent("alice").call("request_approval", kind="spawn", description="d", payload=payload))["id"]
    assert_ok(core.host_call("approve", id=aid))
    rows = {r["name"]: r for r in assert_ok(core.host_call("agent_status"))["agent_statuses"]}
    no_nulls(rows)
    assert rows["alice"]["status_text"] == "busy" and rows["alice"]["status_set_at"] == at
    assert rows["alice"]["pending_reminders"] == 1
    assert rows["bob"]["active_model"] == "claude-test-model"
    assert "active_model" not in rows["alice"]  # command runtimes have no model
    assert rows["kid"]["parent"] == "alice"
    assert rows["kid"]["url"] == "http://127.0.0.1:9191/agent/kid/"


# -- start / stop / restart / set_paused ---------------------------------------------------


def test_stop_and_start_with_scope(core: CoreProcess) -> None:
    resp = assert_ok(core.host_call("stop", scope={"agent_names": ["carol"]}))
    assert resp["stopped"] == ["carol"]
    assert running(core) == {"alice": True, "bob": True, "carol": False}
    assert not sock_exists(core, "carol")
    with pytest.raises(HiveUnavailable):
        Client(core.agent_sock("carol"))
    assert agent_reachable(core, "alice")
    # messages to a stopped agent wait for it
    assert_ok(core.agent("bob").call("send", to="carol", body="when you're back"))
    resp = assert_ok(core.host_call("start", scope={"agent_names": ["carol"]}))
    assert resp["started"] == ["carol"]
    assert running(core)["carol"] is True
    assert [m["body"] for m in inbox(core, "carol")] == ["when you're back"]


def test_stop_closes_open_connections(core: CoreProcess) -> None:
    c = core.agent("carol", timeout=10)
    assert_ok(c.call("whoami"))
    assert_ok(core.host_call("stop", scope={"agent_names": ["carol"]}, graceful=False))
    with pytest.raises(ConnectionError):
        c.call("whoami")


def test_stop_and_start_empty_scope_is_whole_hive(core: CoreProcess) -> None:
    resp = assert_ok(core.host_call("stop", scope={}))
    assert resp["stopped"] == ["alice", "bob", "carol"]
    assert running(core) == {"alice": False, "bob": False, "carol": False}
    assert not any(sock_exists(core, n) for n in ("alice", "bob", "carol"))
    resp = assert_ok(core.host_call("start"))  # scope omitted = empty scope
    assert resp["started"] == ["alice", "bob", "carol"]
    assert all(agent_reachable(core, n) for n in ("alice", "bob", "carol"))


def test_stop_with_unknown_name_changes_nothing(core: CoreProcess) -> None:
    assert_refused(core.host_call("stop", scope={"agent_names": ["carol", "zed"]}), "no agent named 'zed'")
    assert running(core) == {"alice": True, "bob": True, "carol": True}
    assert_refused(core.host_call("start", scope={"agent_names": ["zed"]}), "zed")
    assert_refused(core.host_call("stop", scope={"agent_names": ["Bad/Name"]}), "bad agent name")


def test_stopped_agent_stays_stopped_across_core_restart(core: CoreProcess) -> None:
    assert_ok(core.host_call("stop", scope={"agent_names": ["bob"]}))
    core.restart()
    assert running(core) == {"alice": True, "bob": False, "carol": True}
    assert not sock_exists(core, "bob")


def test_restart_agent(core: CoreProcess) -> None:
    old = core.agent("alice", timeout=10)
    assert_ok(old.call("whoami"))
    assert assert_ok(core.host_call("restart", name="alice")) == {"version": 1, "ok": True}
    with pytest.raises(ConnectionError):
        old.call("whoami")  # the old connection was closed by the restart
    assert agent_reachable(core, "alice")
    assert running(core)["alice"] is True
    assert_refused(core.host_call("restart", name="zed"), "no agent named 'zed'")


def test_set_paused(core: CoreProcess) -> None:
    resp = assert_ok(core.host_call("set_paused", name="bob", paused=True))
    assert (resp["name"], resp["paused"]) == ("bob", True)
    assert core.status("bob")["paused"] is True
    assert core.status("alice")["paused"] is False
    assert_ok(core.host_call("set_paused", name="bob", paused=False))
    assert core.status("bob")["paused"] is False
    assert_refused(core.host_call("set_paused", name="zed", paused=True), "no agent named 'zed'")
    assert_refused(core.host_call("set_paused", name="bob", paused="yes"), "paused")
    assert core.status("bob")["paused"] is False


# -- approvals -------------------------------------------------------------------------------


def test_pending_rows_payload_and_sha256(core: CoreProcess) -> None:
    payload = {"z": 1, "a": ["ü", {"y": None, "b": 2.5}], "emoji": "🐝"}
    resp = assert_ok(core.agent("bob").call("request_approval", kind="custom", description="check this", payload=payload))
    pending = assert_ok(core.host_call("pending"))
    rows = pending["approvals"]
    assert len(rows) == 1
    row = rows[0]
    assert set(row) <= APPROVAL_FIELDS
    assert row["id"] == resp["id"]
    assert (row["agent"], row["kind"], row["status"], row["description"]) == ("bob", "custom", "pending", "check this")
    assert row["payload"] == payload
    assert row["payload_sha256"] == canonical_sha(payload) == resp["payload_sha256"]
    for absent in ("resolved_at", "note"):
        assert absent not in row
    assert row["commit_ref"] == row["payload_sha256"]  # always a string, as hyperhive's
    wire_time(row["requested_at"])
    # the only null allowed is inside the agent-supplied payload
    no_nulls({k: v for k, v in row.items() if k != "payload"})


def test_approve_spawn_applies_exactly_once(core: CoreProcess) -> None:
    payload = {"name": "dave", "spec": {"runtime": "command", "command": ["true"], "peers": ["carol"]}}
    aid = assert_ok(core.agent("alice").call("request_approval", kind="spawn", description="helper", payload=payload))["id"]
    assert not sock_exists(core, "dave")
    resp = assert_ok(core.host_call("approve", id=aid))
    assert resp["approval"]["status"] == "approved" and resp["approval"]["id"] == aid
    wire_time(resp["approval"]["resolved_at"])
    assert sock_exists(core, "dave")
    assert "dave" in core.host_call("list")["agents"]
    assert core.status("dave")["parent"] == "alice"
    who = assert_ok(core.agent("dave").call("whoami"))
    assert who == {"version": 1, "ok": True, "name": "dave", "parent": "alice"}
    # parent and child may talk; the child's declared peers apply too
    assert assert_ok(core.agent("dave").call("peers"))["peers"] == ["alice", "carol"]
    assert "dave" in assert_ok(core.agent("alice").call("peers"))["peers"]
    # the requester is told
    msgs = inbox(core, "alice")
    assert [(m["kind"], m["from"], m["ref"], m["body"]) for m in msgs] == [("approval", "operator", aid, "approved")]
    # a second approve is refused and changes nothing
    assert_refused(core.host_call("approve", id=aid), "already approved")
    assert_refused(core.host_call("deny", id=aid), "already approved")
    assert core.host_call("list")["agents"] == ["alice", "bob", "carol", "dave"]
    assert core.host_call("pending")["approvals"] == []
    with core.agent("alice") as c:
        assert c.call("recv", wait=0)["messages"] == []


def test_approve_spawn_when_name_taken_meanwhile_fails(core: CoreProcess) -> None:
    payload = {"name": "eve", "spec": SPEC}
    aid = assert_ok(core.agent("bob").call("request_approval", kind="spawn", description="d", payload=payload))["id"]
    assert_ok(core.host_call("spawn", name="eve", spec={"runtime": "claude"}))
    resp = assert_ok(core.host_call("approve", id=aid))
    assert resp["approval"]["status"] == "failed"
    assert "already exists" in resp["approval"]["note"]
    assert "parent" not in core.status("eve")  # the operator's eve, untouched
    msgs = inbox(core, "bob")
    assert msgs[0]["kind"] == "approval" and msgs[0]["ref"] == aid and msgs[0]["body"].startswith("failed")


def test_approve_custom_and_unknown(core: CoreProcess) -> None:
    aid = assert_ok(core.agent("carol").call("request_approval", kind="custom", description="d", payload=[1]))["id"]
    assert assert_ok(core.host_call("approve", id=aid))["approval"]["status"] == "approved"
    assert [(m["kind"], m["ref"]) for m in inbox(core, "carol")] == [("approval", aid)]
    assert_refused(core.host_call("approve", id=4242), "no approval 4242")
    assert_refused(core.host_call("deny", id=4242), "no approval 4242")


def test_deny_with_note_is_delivered(core: CoreProcess) -> None:
    payload = {"name": "frank", "spec": SPEC}
    aid = assert_ok(core.agent("bob").call("request_approval", kind="spawn", description="d", payload=payload))["id"]
    resp = assert_ok(core.host_call("deny", id=aid, note="not today"))
    assert (resp["approval"]["status"], resp["approval"]["note"]) == ("denied", "not today")
    assert core.host_call("pending")["approvals"] == []
    assert "frank" not in core.host_call("list")["agents"]
    assert not sock_exists(core, "frank")
    msgs = inbox(core, "bob")
    assert len(msgs) == 1
    m = msgs[0]
    assert (m["kind"], m["from"], m["ref"]) == ("approval", "operator", aid)
    assert "denied" in m["body"] and "not today" in m["body"]
    assert_refused(core.host_call("approve", id=aid), "already denied")
    assert "frank" not in core.host_call("list")["agents"]


def test_deny_without_note(core: CoreProcess) -> None:
    aid = assert_ok(core.agent("alice").call("request_approval", kind="custom", description="d", payload=None))["id"]
    resp = assert_ok(core.host_call("deny", id=aid))
    assert resp["approval"]["status"] == "denied"
    assert "note" not in resp["approval"]
    assert [m["body"] for m in inbox(core, "alice")] == ["denied"]


# -- questions -------------------------------------------------------------------------------


def test_questions_and_answer_question(core: CoreProcess) -> None:
    qid = assert_ok(core.agent("bob").call("ask", to="operator", question="which branch?", options=["main", "dev"]))["id"]
    peer_q = assert_ok(core.agent("alice").call("ask", to="bob", question="not for the operator"))["id"]
    qs = assert_ok(core.host_call("questions"))["questions"]
    no_nulls(qs)
    assert [(q["id"], q["asker"], q["to"], q["question"], q["options"]) for q in qs] == [
        (qid, "bob", "operator", "which branch?", ["main", "dev"])
    ]
    # the operator can't answer a question addressed to an agent
    assert_refused(core.host_call("answer_question", id=peer_q, answer="x"), f"no question {peer_q}")
    assert assert_ok(core.host_call("answer_question", id=qid, answer="main"))["id"] == qid
    msgs = [m for m in inbox(core, "bob") if m["kind"] == "answer"]
    assert [(m["kind"], m["from"], m["body"], m["ref"]) for m in msgs] == [("answer", "operator", "main", qid)]
    assert core.host_call("questions")["questions"] == []
    assert_refused(core.host_call("answer_question", id=qid, answer="dev"), "already answered")
    assert_refused(core.host_call("answer_question", id=777, answer="dev"), "no question 777")


# -- send / inbox ----------------------------------------------------------------------------


def test_operator_send(core: CoreProcess) -> None:
    mid = assert_ok(core.host_call("send", to="carol", body="hello from the operator"))["id"]
    msgs = inbox(core, "carol")
    assert [(m["id"], m["from"], m["kind"], m["body"]) for m in msgs] == [(mid, "operator", "message", "hello from the operator")]
    assert_refused(core.host_call("send", to="zed", body="x"), "no agent named 'zed'")
    assert_refused(core.host_call("send", to="operator", body="x"), "reserved")


def test_inbox_after(core: CoreProcess) -> None:
    assert assert_ok(core.host_call("inbox"))["messages"] == []
    ids = [assert_ok(core.agent(n).call("send", to="operator", body=f"from {n}"))["id"] for n in ("alice", "bob", "carol")]
    assert_ok(core.agent("alice").call("send", to="bob", body="not for the operator"))
    msgs = assert_ok(core.host_call("inbox"))["messages"]
    no_nulls(msgs)
    assert [(m["id"], m["from"], m["to"], m["kind"], m["body"]) for m in msgs] == [
        (ids[0], "alice", "operator", "message", "from alice"),
        (ids[1], "bob", "operator", "message", "from bob"),
        (ids[2], "carol", "operator", "message", "from carol"),
    ]
    assert [m["id"] for m in core.host_call("inbox", after=ids[0])["messages"]] == ids[1:]
    assert core.host_call("inbox", after=ids[2])["messages"] == []
    assert [m["id"] for m in core.host_call("inbox", max=2)["messages"]] == ids[:2]
    # reading the inbox doesn't consume it
    assert [m["id"] for m in core.host_call("inbox")["messages"]] == ids


# -- spawn / destroy -----------------------------------------------------------------------


def test_spawn(core: CoreProcess) -> None:
    assert not sock_exists(core, "gina")
    resp = assert_ok(core.host_call("spawn", name="gina", spec={"runtime": "command", "command": ["true"], "peers": ["alice"]}))
    assert resp["name"] == "gina"
    assert sock_exists(core, "gina")
    assert stat.S_IMODE(core.agent_sock("gina").stat().st_mode) == 0o600
    assert assert_ok(core.agent("gina").call("whoami")) == {"version": 1, "ok": True, "name": "gina"}
    assert "parent" not in core.status("gina")
    assert_ok(core.agent("gina").call("send", to="alice", body="hi"))
    assert_refused(core.host_call("spawn", name="gina", spec=SPEC), "already exists")
    assert_refused(core.host_call("spawn", name="hal", spec={"runtime": "command"}), "command")
    assert "hal" not in core.host_call("list")["agents"]
    # spawned agents survive a core restart
    core.restart()
    assert agent_reachable(core, "gina")


def test_destroy(core: CoreProcess) -> None:
    assert_ok(core.agent("bob").call("send", to="carol", body="pending"))
    aid = assert_ok(core.agent("carol").call("request_approval", kind="custom", description="d", payload={}))["id"]
    qid = assert_ok(core.agent("carol").call("ask", to="operator", question="?"))["id"]
    c = core.agent("carol", timeout=10)
    assert_ok(c.call("whoami"))
    assert assert_ok(core.host_call("destroy", name="carol"))["name"] == "carol"
    assert not sock_exists(core, "carol")
    with pytest.raises(HiveUnavailable):
        Client(core.agent_sock("carol"))
    with pytest.raises(ConnectionError):
        c.call("whoami")
    assert core.host_call("list")["agents"] == ["alice", "bob"]
    assert [r["name"] for r in core.host_call("agent_status")["agent_statuses"]] == ["alice", "bob"]
    # its open items are closed, not left dangling
    assert aid not in [a["id"] for a in core.host_call("pending")["approvals"]]
    assert qid not in [q["id"] for q in core.host_call("questions")["questions"]]
    assert "carol" not in assert_ok(core.agent("bob").call("peers"))["peers"]
    assert_refused(core.agent("bob").call("send", to="carol", body="x"), "no agent named 'carol'")
    assert_refused(core.host_call("destroy", name="carol"), "no agent named 'carol'")
    assert_refused(core.host_call("approve", id=aid), "already cancelled")


def test_urls(module_core: CoreProcess) -> None:
    core = module_core  # shared: only looked at (no test sharing it changes it)
    resp = assert_ok(core.host_call("urls"))
    no_nulls(resp)
    assert resp["urls"]["domain"] == "127.0.0.1"
    assert resp["urls"]["home"] == "http://127.0.0.1:8080/"
    assert set(resp["urls"]) <= {"domain", "home", "forge", "matrix"}


# -- streams ---------------------------------------------------------------------------------


def test_subscribe_agent_status(core: CoreProcess) -> None:
    # hyperhive's shape: a bare ack, then one single-row agent_statuses line per change.
    sub = core.host(timeout=15)
    stream = sub.stream("subscribe_agent_status")
    first = assert_ok(next(stream))
    assert first == {"version": 1, "ok": True}
    assert_ok(core.host_call("set_paused", name="alice", paused=True))
    rows = assert_ok(next(stream))["agent_statuses"]
    assert len(rows) == 1 and rows[0]["name"] == "alice" and rows[0]["paused"] is True
    no_nulls(rows)
    assert_ok(core.agent("bob").call("set_status", text="thinking"))
    (row,) = assert_ok(next(stream))["agent_statuses"]
    assert (row["name"], row["status_text"]) == ("bob", "thinking")
    wire_time(row["status_set_at"])
    assert_ok(core.host_call("destroy", name="carol"))  # no row for it: the next poll drops it
    assert_ok(core.host_call("set_paused", name="alice", paused=False))
    (row,) = assert_ok(next(stream))["agent_statuses"]
    assert (row["name"], row["paused"]) == ("alice", False)


def test_subscribe_kinds_filters_events(core: CoreProcess) -> None:
    sub = core.host(timeout=15)
    stream = sub.stream("subscribe", kinds=["question", "approval"])
    assert assert_ok(next(stream))["subscribed"] == ["approval", "question"]
    assert_ok(core.agent("alice").call("send", to="bob", body="not streamed"))  # a message: filtered out
    assert_ok(core.agent("alice").call("set_status", text="not streamed either"))
    qid = assert_ok(core.agent("alice").call("ask", to="operator", question="streamed?"))["id"]
    ev = assert_ok(next(stream))["event"]
    assert ev["kind"] == "question"
    assert (ev["question"]["id"], ev["question"]["asker"], ev["question"]["question"]) == (qid, "alice", "streamed?")
    aid = assert_ok(core.agent("bob").call("request_approval", kind="custom", description="d", payload={"k": 1}))["id"]
    ev = assert_ok(next(stream))["event"]
    assert (ev["kind"], ev["approval"]["id"], ev["approval"]["status"]) == ("approval", aid, "pending")
    assert ev["approval"]["payload_sha256"] == canonical_sha({"k": 1})


def test_subscribe_all_kinds_streams_messages(core: CoreProcess) -> None:
    sub = core.host(timeout=15)
    stream = sub.stream("subscribe")
    first = assert_ok(next(stream))
    assert set(first["subscribed"]) == {
        "message", "question", "answer", "approval", "agent_status", "reminder", "transcript", "egress",
        "secret",
    }
    mid = assert_ok(core.agent("alice").call("send", to="bob", body="watched"))["id"]
    ev = assert_ok(next(stream))["event"]
    assert ev["kind"] == "message"
    m = ev["message"]
    assert (m["id"], m["from"], m["to"], m["body"]) == (mid, "alice", "bob", "watched")
    assert_refused(core.host_call("subscribe", kinds=["gossip"]), "kinds")
    assert_refused(core.host_call("subscribe", kinds=[]), "kinds")


def test_subscriber_disconnect_does_not_disturb_core(core: CoreProcess) -> None:
    for _ in range(5):
        sub = Client(core.host_sock, timeout=10)
        assert_ok(next(sub.stream("subscribe")))
        sub.close()
    assert_ok(core.agent("alice").call("send", to="bob", body="after"))
    assert assert_ok(core.host_call("list"))["agents"] == ["alice", "bob", "carol"]


# -- who may connect (SO_PEERCRED) ---------------------------------------------------------


def connect_as(path: Path, uid: int, gid: int, groups: list[int], request: bytes = b'{"cmd":"list"}\n') -> tuple[str, bytes]:
    """Fork a child that drops to uid/gid/groups, connects to ``path``, sends ``request``
    and reports ("ok", reply line) or ("error", errno name)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, just a socket
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect(str(path))
            except OSError as e:
                os.write(w, b"error " + str(e.errno).encode())
                os._exit(0)
            try:
                s.sendall(request)
            except OSError:
                pass  # the core may already have refused and closed
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            os.write(w, b"ok " + data)
            os._exit(0)
        except BaseException as e:
            os.write(w, b"crash " + repr(e).encode())
            os._exit(1)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    tag, _, rest = out.partition(b" ")
    return tag.decode(), rest


def test_host_sock_mode(module_core: CoreProcess) -> None:
    core = module_core  # shared: only looked at (no test sharing it changes it)
    st = core.host_sock.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_non_admin_uid_refused_by_peercred(core: CoreProcess) -> None:
    nobody = pwd.getpwnam("nobody")
    assert nobody.pw_uid == 65534
    os.chmod(core.host_sock, 0o666)  # take the file mode out of the way: SO_PEERCRED must still refuse
    tag, reply = connect_as(core.host_sock, 65534, nobody.pw_gid, [])
    assert tag == "ok", reply
    resp = strict_loads(reply)
    err = assert_refused(resp, "65534", "permission denied")
    assert "hive-admin" in err
    assert reply.count(b"\n") == 1
    # nothing leaked: no agents listed
    assert "agents" not in resp
    # root still is served
    assert assert_ok(core.host_call("list"))["agents"] == ["alice", "bob", "carol"]


def test_a_peer_in_hive_admin_by_its_kernel_credentials_only_is_accepted(
    admin_user: pwd.struct_passwd, core: CoreProcess
) -> None:
    """nobody, with hive-admin among its supplementary groups (as ``SupplementaryGroups=``
    or ``sg`` give it) but not in the group database: SO_PEERGROUPS says it is an admin.
    Until red team round 7 the groups were asked for with a 4 KiB buffer, which CPython
    refuses, so they were never read and this peer was refused."""
    admin = grp.getgrnam("hive-admin").gr_gid  # (admin_user: the group exists)
    assert "nobody" not in grp.getgrgid(admin).gr_mem
    os.chmod(core.host_sock, 0o666)  # the file mode aside: SO_PEERGROUPS decides
    tag, reply = connect_as(core.host_sock, 65534, 65534, [admin])
    assert tag == "ok", reply
    assert assert_ok(strict_loads(reply))["agents"] == ["alice", "bob", "carol"]


def test_non_admin_blocked_by_file_mode(module_core: CoreProcess) -> None:
    core = module_core  # shared: only looked at (no test sharing it changes it)
    nobody = pwd.getpwnam("nobody")
    tag, reply = connect_as(core.host_sock, 65534, nobody.pw_gid, [])
    assert (tag, reply) == ("error", b"13")  # EACCES: 0660, not owner, not in the group


def test_agent_sock_not_connectable_by_other_uid(module_core: CoreProcess) -> None:
    core = module_core  # shared: only looked at (no test sharing it changes it)
    tag, reply = connect_as(core.agent_sock("alice"), 65534, 65534, [], b'{"cmd":"whoami"}\n')
    assert (tag, reply) == ("error", b"13")


@pytest.fixture
def admin_user() -> Iterator[pwd.struct_passwd]:
    """A throwaway user in group hive-admin (group created if missing; user removed after)."""
    created_group = False
    try:
        grp.getgrnam("hive-admin")
    except KeyError:
        subprocess.run(["groupadd", "--system", "hive-admin"], check=True)
        created_group = True
    name = f"hvt{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G", "hive-admin", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)
        try:  # useradd may have created a same-named personal group
            grp.getgrnam(name)
            subprocess.run(["groupdel", name], check=False)
        except KeyError:
            pass
        if created_group:
            subprocess.run(["groupdel", "hive-admin"], check=False)


def test_hive_admin_member_accepted(admin_user: pwd.struct_passwd, core_factory: Any) -> None:
    admin_gid = grp.getgrnam("hive-admin").gr_gid
    core = core_factory()  # started after the group exists: host.sock is root:hive-admin 0660
    st = core.host_sock.stat()
    assert st.st_gid == admin_gid and stat.S_IMODE(st.st_mode) == 0o660
    groups = os.getgrouplist(admin_user.pw_name, admin_user.pw_gid)
    assert admin_gid in groups
    tag, reply = connect_as(core.host_sock, admin_user.pw_uid, admin_user.pw_gid, groups)
    assert tag == "ok", reply
    resp = strict_loads(reply)
    assert assert_ok(resp)["agents"] == ["alice", "bob", "carol"]
    # a non-member on the same hive is still refused by SO_PEERCRED
    os.chmod(core.host_sock, 0o666)
    tag, reply = connect_as(core.host_sock, 65534, 65534, [])
    assert tag == "ok"
    assert_refused(strict_loads(reply), "uid 65534")

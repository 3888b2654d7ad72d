"""One deep payload killed the approval views (issue 13 item 1): a ``custom`` approval
payload nested 300 deep was stored, then could not be serialised (pydantic stops at
255): ``hive pending`` answered "internal error", ``/`` and ``/api/state`` 500.

Two things must hold. Every parser of a surface (agent.sock, host.sock, priv.sock, the
spawn spec posted over HTTP) refuses nesting past 64 levels with one line, before
anything is stored. And no row in hive.db can make a listing fail: rows written
straight into the database (a payload nested 300 deep, invalid JSON, a blob where text
goes) show as ``{"id", "unreadable": why}`` and every view goes on.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hive_fixture import HIVE, HiveProcess, running_hive
from web_fixture import Web

from .conftest import cage_run

AGENTS: dict[str, dict[str, Any]] = {
    "rtnest": {"runtime": "command", "command": ["true"]},
    "rtnest-b": {"runtime": "command", "command": ["true"]},
}
TOO_DEEP = "malformed JSON: nested too deeply"
MAX_DEPTH = 64  # hyperhive.wire.framing.MAX_DEPTH (not imported: this test runs on older code too)


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(AGENTS))


def nested(levels: int) -> str:
    """JSON text of ``levels`` lists, one inside the other."""
    return "[" * levels + "]" * levels


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("ok") is True, reply
    return reply


def cli(hive: HiveProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HIVE), "--run-dir", str(hive.run_dir), *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "400"})


DEEP = """
out = {}
c = Conn()
for levels in P["levels"]:
    line = '{"cmd": "request_approval", "kind": "custom", "description": "deep", "payload": ' + "[" * levels + "]" * levels + "}"
    out[str(levels)] = c.raw(line.encode() + b"\\n")
out["after"] = c.call({"cmd": "whoami"})
result(**out)
"""


@pytest.mark.attack("wire.deep-nesting", ref="issue 13 item 1")
def test_deep_payload_refused_on_every_surface(hive: HiveProcess) -> None:
    before = ok(hive.host_call("pending"))["approvals"]
    # From inside the cage: the request object is level 1, so a payload of MAX_DEPTH - 1
    # levels is the deepest that passes.
    res = cage_run(hive, "rtnest", DEEP, levels=[MAX_DEPTH, 100, 256, 300, 900])
    for levels in (MAX_DEPTH, 100, 256, 300, 900):
        assert res[str(levels)] == {"version": 1, "ok": False, "error": TOO_DEEP}, levels
    assert res["after"] == {"version": 1, "ok": True, "name": "rtnest"}
    assert ok(hive.host_call("pending"))["approvals"] == before  # nothing stored
    # host.sock: a spawn spec nested too deep, refused by the parser, nothing created.
    with _raw(hive.host_sock) as send:
        spec = '{"runtime": "command", "command": ["true"], "x": ' + nested(300) + "}"
        reply = send('{"cmd": "spawn", "name": "rtnest-kid", "spec": ' + spec + "}")
    assert reply == {"version": 1, "ok": False, "error": TOO_DEEP}
    # priv.sock parses with the same parser.
    with _raw(hive.priv_sock) as send:
        assert send('{"cmd": "status", "names": ' + nested(300) + "}") == {
            "version": 1, "ok": False, "error": TOO_DEEP}
    # HTTP: the spawn form's JSON spec.
    web = Web(hive)
    login = web.login()
    spec = '{"runtime": "command", "command": ["true"], "peers": ' + nested(200) + "}"
    r = web.post("/api/spawn", login, data={"name": "rtnest-kid", "spec": spec})
    assert r.status_code == 422 and r.json() == {"ok": False, "error": f"spec: {TOO_DEEP}"}, r.text
    assert "rtnest-kid" not in ok(hive.host_call("list"))["agents"]
    # A payload just within the limit is stored, listed and served.
    deepest = json.loads(nested(MAX_DEPTH - 1))
    a = ok(hive.agent_call("rtnest", "request_approval", kind="custom", description="deepest", payload=deepest))
    try:
        shown = {x["id"]: x for x in ok(hive.host_call("pending"))["approvals"]}
        assert shown[a["id"]]["payload"] == deepest
        assert web.get("/api/state", login=login).status_code == 200
        assert cli(hive, "pending").returncode == 0
    finally:
        ok(hive.host_call("deny", id=a["id"]))


class _raw:
    """One JSON-lines connection to a unix socket: send a raw line, get the reply."""

    def __init__(self, path: Any) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(30)
        self.s.connect(str(path))
        self.f = self.s.makefile("rb")

    def __enter__(self) -> Any:
        def send(line: str) -> dict[str, Any]:
            self.s.sendall(line.encode() + b"\n")
            reply: dict[str, Any] = json.loads(self.f.readline())
            return reply

        return send

    def __exit__(self, *exc: object) -> None:
        self.f.close()
        self.s.close()


def write_rows(hive: HiveProcess, now: float) -> dict[str, int]:
    """Bad rows straight into the live hive.db, as an older version or a hand could leave them."""
    db = sqlite3.connect(hive.state_dir / "hive.db", timeout=30)
    ids: dict[str, int] = {}
    try:
        with db:
            def insert(key: str, sql: str, args: tuple[Any, ...]) -> None:
                ids[key] = int(db.execute(sql, args).lastrowid or 0)

            approval = ("INSERT INTO approvals (agent, kind, description, payload, payload_sha256, requested_at)"
                        " VALUES (?, ?, ?, ?, ?, ?)")
            insert("deep", approval, ("rtnest", "custom", "deep", nested(300), "0" * 64, now))
            insert("broken", approval, ("rtnest", "custom", "broken", '{"a": ', "0" * 64, now))
            insert("question", "INSERT INTO questions (asker, target, question, options, asked_at)"
                   " VALUES (?, ?, ?, ?, ?)", ("rtnest", "operator", "which?", "[not json", now))
            message = ("INSERT INTO messages (recipient, sender, kind, body, options, sent_at)"
                       " VALUES (?, ?, ?, ?, ?, ?)")
            insert("message", message, ("operator", "rtnest", "message", "hi", nested(300), now))
            insert("kind", message, ("operator", "rtnest", "no-such-kind", "hi", None, now))
            insert("entry", "INSERT INTO transcript (agent, turn, kind, data, at) VALUES (?, ?, ?, ?, ?)",
                   ("rtnest", 1, "stdout", nested(300), now))
            insert("egress", "INSERT INTO egress_log (agent, at, host, port, allowed, reason)"
                   " VALUES (?, ?, ?, ?, ?, ?)", ("rtnest", now, b"\xff\x00", 443, 0, "x"))
    finally:
        db.close()
    return ids


@pytest.mark.attack("store.unreadable-row", ref="issue 13 item 1")
def test_unreadable_rows_do_not_break_listings(hive: HiveProcess) -> None:
    now = time.time()
    good = ok(hive.agent_call("rtnest", "request_approval", kind="custom", description="good", payload={"x": 1}))
    ok(hive.agent_call("rtnest", "ask", to="operator", question="still readable?"))
    ids = write_rows(hive, now)

    def unreadable(rows: list[dict[str, Any]], key: str) -> str:
        found = [r for r in rows if r["id"] == ids[key]]
        assert len(found) == 1 and set(found[0]) == {"id", "unreadable"}, found
        reason: str = found[0]["unreadable"]
        assert reason and "\n" not in reason
        return reason

    approvals = ok(hive.host_call("pending"))["approvals"]
    assert unreadable(approvals, "deep") == f"payload: nested deeper than {MAX_DEPTH} levels"
    assert unreadable(approvals, "broken").startswith("payload: invalid JSON")
    assert [a["description"] for a in approvals if a["id"] == good["id"]] == ["good"]
    questions = ok(hive.host_call("questions"))["questions"]
    assert unreadable(questions, "question").startswith("options: invalid JSON")
    assert "still readable?" in [q.get("question") for q in questions]
    inbox = ok(hive.host_call("inbox"))["messages"]
    unreadable(inbox, "message")
    unreadable(inbox, "kind")
    unreadable(ok(hive.host_call("transcript", name="rtnest"))["entries"], "entry")
    unreadable(ok(hive.host_call("egress_log"))["entries"], "egress")

    # The CLI: every listing prints, with the bad rows marked.
    for args in (["pending"], ["questions"], ["inbox"], ["transcript", "rtnest"], ["egress", "log"]):
        proc = cli(hive, *args)
        assert proc.returncode == 0 and "unreadable" in proc.stdout, (args, proc.stdout, proc.stderr)

    # The dashboard, /api/state and the agent's own page.
    web = Web(hive)
    login = web.login()
    state = web.get("/api/state", login=login)
    assert state.status_code == 200, state.text
    s = state.json()
    unreadable(s["approvals"], "deep")
    unreadable(s["questions"], "question")
    unreadable(s["messages"], "kind")
    unreadable(s["egress_log"], "egress")
    page = web.get("/", login=login)
    assert page.status_code == 200 and f"approval {ids['deep']} is unreadable" in page.text
    agent_state = web.get("/agent/rtnest/state", login=login)
    assert agent_state.status_code == 200, agent_state.text
    unreadable(agent_state.json()["approvals"], "deep")
    agent_page = web.get("/agent/rtnest/", login=login)
    assert agent_page.status_code == 200 and f"entry {ids['entry']} is unreadable" in agent_page.text

    # Approving or denying the others still works; an unreadable one can only be denied.
    assert ok(hive.host_call("approve", id=good["id"]))["approval"]["status"] == "approved"
    refused = hive.host_call("approve", id=ids["deep"])
    assert refused == {"version": 1, "ok": False, "error": f"approval {ids['deep']} is unreadable"
                       f" (payload: nested deeper than {MAX_DEPTH} levels); it can only be denied"}
    assert ok(hive.host_call("deny", id=ids["deep"]))["approval"] == {
        "id": ids["deep"], "unreadable": f"payload: nested deeper than {MAX_DEPTH} levels"}
    r = web.post(f"/deny/{ids['broken']}", login)
    assert r.status_code == 200, r.text
    assert {a["id"] for a in ok(hive.host_call("pending"))["approvals"]}.isdisjoint(
        {ids["deep"], ids["broken"], good["id"]})
    assert web.get("/api/state", login=login).status_code == 200


@pytest.mark.attack("store.unreadable-row", ref="issue 13 item 1")
def test_unreadable_message_reaches_its_agent_as_a_note(hive: HiveProcess) -> None:
    ok(hive.host_call("set_paused", name="rtnest-b", paused=True))  # its harness takes no turns
    try:
        db = sqlite3.connect(hive.state_dir / "hive.db", timeout=30)
        try:
            with db:
                mid = int(db.execute(
                    "INSERT INTO messages (recipient, sender, kind, body, options, sent_at) VALUES (?, ?, ?, ?, ?, ?)",
                    ("rtnest-b", "rtnest", "question", "q?", "{broken", 1.0)).lastrowid or 0)
        finally:
            db.close()
        res = cage_run(hive, "rtnest-b", """
c = Conn()
got = c.call({"cmd": "recv", "wait": 0})
result(got=got, ack=c.call({"cmd": "ack", "ids": [m["id"] for m in got.get("messages", [])]}))
""")
        assert res["got"]["ok"] is True, res
        note = [m for m in res["got"]["messages"] if m["id"] == mid]
        assert len(note) == 1 and note[0]["from"] == "hive" and note[0]["kind"] == "message", note
        assert note[0]["body"].startswith(f"[message {mid} is unreadable: options: invalid JSON")
        assert res["ack"]["ok"] is True, res
    finally:
        ok(hive.host_call("set_paused", name="rtnest-b", paused=False))

"""Malformed, oversized, mistyped and misnamed requests on both sockets; a full disk."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import CoreProcess, assert_ok, assert_refused, read_line, strict_loads
from hyperhive.client import Client
from hyperhive.wire.framing import MAX_LINE

BAD_LINES: list[tuple[bytes, str]] = [
    (b"{", "malformed json"),
    (b'{"cmd": "CMD"', "malformed json"),
    (b'{"cmd": whoami}', "malformed json"),
    (b"not json at all", "malformed json"),
    (b'{"cmd": "whoami"} {"cmd": "whoami"}', "malformed json"),
    (b"{'cmd': 'whoami'}", "malformed json"),
    (b"[]", "json object"),
    (b'["whoami"]', "json object"),
    (b'"whoami"', "json object"),
    (b"42", "json object"),
    (b"null", "json object"),
    (b"true", "json object"),
    (b'{"cmd": "recv", "wait": NaN}', "nan"),
    (b'{"cmd": "recv", "wait": Infinity}', "infinity"),
    (b'{"cmd": "recv", "wait": -Infinity}', "infinity"),
    (b'{"cmd": "whoami", "x": "\xff\xfe"}', "utf-8"),
    (b"\xc3\x28", "utf-8"),
    (b'{"cmd": "whoami\xed\xa0\x80"}', "utf-8"),  # an encoded surrogate
    (b"[" * 100_000, "malformed json"),
    (b'{"a":' * 50_000, "malformed json"),
    (b'{"cmd": "CMD", "x": 1e400}', "out of range"),
    (b'{"cmd": "CMD", "x": -1e400}', "out of range"),
    (b'{"cmd": "CMD", "x": 100000000000000000000000}', "out of range"),
    (b'{"cmd": "CMD", "x": -9223372036854775809}', "out of range"),
    (b'{"cmd": "CMD", "x": ' + b"9" * 5000 + b"}", "out of range"),
    (b"{}", "missing field 'cmd'"),
    (b'{"cmd": null}', ""),
    (b'{"cmd": 7}', ""),
    (b'{"cmd": ["whoami"]}', ""),
    (b'{"cmd": "WHOAMI"}', "unknown command"),
    (b'{"cmd": "launch"}', "unknown command 'launch'"),
    (b'{"cmd": ""}', "unknown command"),
    (b'{"cmd": "CMD", "extra": 1}', "unknown field 'extra'"),
]

AGENT_TYPE_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"cmd": "send", "to": "bob", "body": 5}, "body"),
    ({"cmd": "send", "to": "bob", "body": None}, "body"),
    ({"cmd": "send", "to": ["bob"], "body": "x"}, "to"),
    ({"cmd": "send", "to": "bob"}, "missing field 'body'"),
    ({"cmd": "send", "body": "x"}, "missing field 'to'"),
    ({"cmd": "send", "to": "bob", "body": "x" * (256 * 1024 + 1)}, "body"),
    ({"cmd": "recv", "wait": "5"}, "wait"),
    ({"cmd": "recv", "wait": -1}, "wait"),
    ({"cmd": "recv", "wait": 1e9}, "wait"),
    ({"cmd": "recv", "max": 0}, "max"),
    ({"cmd": "recv", "max": 1.5}, "max"),
    ({"cmd": "recv", "max": True}, "max"),
    ({"cmd": "ack", "ids": "1"}, "ids"),
    ({"cmd": "ack", "ids": ["1"]}, "ids"),
    ({"cmd": "ack", "ids": [0]}, "ids"),
    ({"cmd": "ack", "ids": [True]}, "ids"),
    ({"cmd": "ack"}, "missing field 'ids'"),
    ({"cmd": "ask", "to": "operator", "question": "q", "options": "yes"}, "options"),
    ({"cmd": "ask", "to": "operator", "question": "q", "options": [1, 2]}, "options"),
    ({"cmd": "answer", "id": "1", "answer": "a"}, "id"),
    ({"cmd": "answer", "id": 1.0, "answer": "a"}, "id"),
    ({"cmd": "request_approval", "kind": 1, "description": "d"}, "kind"),
    ({"cmd": "request_approval", "kind": "custom"}, "missing field 'description'"),
    ({"cmd": "set_status", "text": {"a": 1}}, "text"),
    ({"cmd": "remind", "in_seconds": "10", "text": "t"}, "in_seconds"),
    ({"cmd": "remind", "in_seconds": 10, "text": 1}, "text"),
    ({"cmd": "remind", "at": [2030], "text": "t"}, "at"),
]

HOST_TYPE_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"cmd": "set_paused", "name": "bob", "paused": "true"}, "paused"),
    ({"cmd": "set_paused", "name": "bob", "paused": 1}, "paused"),
    ({"cmd": "set_paused", "name": "bob"}, "missing field 'paused'"),
    ({"cmd": "stop", "scope": ["bob"]}, "scope"),
    ({"cmd": "stop", "scope": {"agent_names": "bob"}}, "agent_names"),
    ({"cmd": "stop", "scope": {"names": ["bob"]}}, "unknown field 'scope.names'"),
    ({"cmd": "stop", "graceful": "no"}, "graceful"),
    ({"cmd": "approve", "id": "1"}, "id"),
    ({"cmd": "approve"}, "missing field 'id'"),
    ({"cmd": "deny", "id": 1, "note": 5}, "note"),
    ({"cmd": "answer_question", "id": 1}, "missing field 'answer'"),
    ({"cmd": "inbox", "after": -1}, "after"),
    ({"cmd": "inbox", "after": "0"}, "after"),
    ({"cmd": "spawn", "name": "newbie", "spec": "command"}, "spec"),
    ({"cmd": "spawn", "name": "newbie", "spec": {"runtime": "python", "command": ["x"]}}, "runtime"),
    ({"cmd": "spawn", "name": "newbie", "spec": {"command": "true"}}, "command"),
    ({"cmd": "spawn", "name": "newbie", "spec": {"command": ["true"], "peers": ["Bob"]}}, "bad agent name"),
    ({"cmd": "spawn", "name": "newbie", "spec": {"command": ["true"], "uid": 0}}, "unknown field 'spec.uid'"),
    ({"cmd": "subscribe", "kinds": "message"}, "kinds"),
    ({"cmd": "send", "to": "bob", "body": 1}, "body"),
    ({"cmd": "list", "verbose": True}, "unknown field 'verbose'"),
]

BAD_NAMES = ["operator", "core", "hive", "all", "..", ".", "a/b", "../alice", "Alice", "a" * 32, "", "1abc", "-a", "a_b", "a b", "bob\n", "bob\x00", "é"]
RESERVED = {"operator", "core", "hive", "all"}


def check_error_line(line: bytes) -> dict[str, Any]:
    assert line.endswith(b"\n") and line.count(b"\n") == 1, line[:200]
    resp = strict_loads(line)
    assert isinstance(resp, dict)
    assert_refused(resp)
    assert set(resp) == {"version", "ok", "error"}
    return resp


def send_line(c: Client, raw: bytes) -> dict[str, Any]:
    c.send_raw(raw + b"\n")
    return check_error_line(read_line(c))


@pytest.fixture(params=["agent", "host"])
def conn(request: pytest.FixtureRequest, module_core: CoreProcess) -> Iterator[Client]:
    """A connection to the module's shared core (these lines change nothing: the tests
    below that share it check that; a fresh core each cost a second of start-up)."""
    with module_core.agent("alice") if request.param == "agent" else module_core.host() as c:
        yield c


def probe(c: Client) -> None:
    """The connection is still usable."""
    cmd = "whoami" if "agents" in str(c.path) else "list"
    assert_ok(c.call(cmd))


def test_malformed_lines_refused_and_connection_survives(conn: Client) -> None:
    cmd = b"whoami" if "agents" in str(conn.path) else b"list"
    for raw, needle in BAD_LINES:
        raw = raw.replace(b"CMD", cmd)
        resp = send_line(conn, raw)
        assert needle.lower() in resp["error"].lower(), (raw[:60], resp)
        probe(conn)


@pytest.mark.parametrize(
    ("sock", "line"),
    [
        ("agent", b'{"cmd":"remind","at":-1e400,"text":"t"}'),
        ("agent", b'{"cmd":"remind","in_seconds":1e400,"text":"t"}'),
        ("agent", b'{"cmd":"ack","ids":[100000000000000000000000]}'),
        ("agent", b'{"cmd":"answer","id":9223372036854775808,"answer":"x"}'),
        ("agent", b'{"cmd":"request_approval","kind":"custom","description":"d","payload":[1e999]}'),
        ("host", b'{"cmd":"approve","id":100000000000000000000000}'),
        ("host", b'{"cmd":"deny","id":100000000000000000000000}'),
        ("host", b'{"cmd":"answer_question","id":100000000000000000000000,"answer":"x"}'),
        ("host", b'{"cmd":"inbox","after":100000000000000000000000}'),
    ],
)
def test_out_of_range_numbers_refused(module_core: CoreProcess, sock: str, line: bytes) -> None:
    """Numbers JSON can carry but the hive can't store: a clear refusal, never an
    internal error, and never a non-JSON ``Infinity`` in a reply."""
    core = module_core  # shared: a refusal changes nothing, and that is checked
    with core.agent("alice") if sock == "agent" else core.host() as c:
        resp = send_line(c, line)
        assert "out of range" in resp["error"], resp
        probe(c)
    assert core.status("alice")["pending_reminders"] == 0
    assert core.host_call("pending")["approvals"] == []


def test_largest_ids_are_plain_refusals(core: CoreProcess) -> None:
    big = 2**63 - 1
    assert_refused(core.agent_call("alice", "ack", ids=[big]), f"no message {big}")
    assert_refused(core.agent_call("alice", "answer", id=big, answer="x"), f"no question {big}")
    assert_refused(core.host_call("approve", id=big), f"no approval {big}")
    assert assert_ok(core.host_call("inbox", after=big))["messages"] == []


def test_crlf_line_endings_accepted(conn: Client) -> None:
    cmd = b"whoami" if "agents" in str(conn.path) else b"list"
    conn.send_raw(b'{"cmd":"' + cmd + b'"}\r\n')
    assert_ok(strict_loads(read_line(conn)))


def test_blank_lines_get_no_reply_and_are_harmless(conn: Client) -> None:
    # Blank lines are skipped (no reply); the next request's reply is the next line.
    conn.send_raw(b"\n \n\t\r\n")
    probe(conn)


def test_pipelined_requests_answered_in_order(core: CoreProcess) -> None:
    c = core.agent("bob")
    lines = [b'{"cmd":"whoami"}', b"{", b'{"cmd":"peers"}', b'{"cmd":"nope"}', b'{"cmd":"whoami"}']
    c.send_raw(b"\n".join(lines) + b"\n")
    replies = [strict_loads(read_line(c)) for _ in lines]
    assert [r["ok"] for r in replies] == [True, False, True, False, True]
    assert replies[0]["name"] == "bob" and replies[2]["peers"] == ["alice", "carol"]


@pytest.mark.parametrize(("req", "needle"), AGENT_TYPE_ERRORS)
def test_agent_wrong_types(module_core: CoreProcess, req: dict[str, Any], needle: str) -> None:
    core = module_core  # shared: a refusal changes nothing, and that is checked
    with core.agent("alice") as c:
        resp = send_line(c, json.dumps(req).encode())
        assert needle.lower() in resp["error"].lower(), resp
        probe(c)
    assert core.host_call("inbox")["messages"] == []
    assert core.host_call("pending")["approvals"] == []
    assert core.host_call("questions")["questions"] == []
    assert core.status("alice")["pending_reminders"] == 0
    assert "status_text" not in core.status("alice")
    with core.agent("bob") as b:
        assert b.call("recv")["messages"] == []


@pytest.mark.parametrize(("req", "needle"), HOST_TYPE_ERRORS)
def test_host_wrong_types(module_core: CoreProcess, req: dict[str, Any], needle: str) -> None:
    core = module_core  # shared: a refusal changes nothing, and that is checked
    before = [core.host_call(c) for c in ("agent_status", "pending", "questions", "inbox")]
    with core.host() as c:
        resp = send_line(c, json.dumps(req).encode())
        assert needle.lower() in resp["error"].lower(), resp
        probe(c)
    assert [core.host_call(c) for c in ("agent_status", "pending", "questions", "inbox")] == before


def test_bad_and_reserved_names(core: CoreProcess) -> None:
    h = core.host()
    a = core.agent("alice")
    for name in BAD_NAMES:
        want = "reserved" if name in RESERVED else "bad agent name"
        for req in (
            {"cmd": "spawn", "name": name, "spec": {"runtime": "command", "command": ["true"]}},
            {"cmd": "destroy", "name": name},
            {"cmd": "restart", "name": name},
            {"cmd": "set_paused", "name": name, "paused": True},
            {"cmd": "send", "to": name, "body": "x"},
            {"cmd": "stop", "scope": {"agent_names": [name]}},
        ):
            resp = send_line(h, json.dumps(req).encode())
            assert want in resp["error"], (req, resp)
            probe(h)
        payload = {"name": name, "spec": {"runtime": "command", "command": ["true"]}}
        resp = send_line(a, json.dumps({"cmd": "request_approval", "kind": "spawn", "description": "d", "payload": payload}).encode())
        assert want in resp["error"], (name, resp)
        if name != "operator":  # an agent may address the operator
            for cmd, extra in (("send", {"body": "x"}), ("ask", {"question": "q"})):
                resp = send_line(a, json.dumps({"cmd": cmd, "to": name, **extra}).encode())
                assert want in resp["error"], (name, resp)
        probe(a)
    # nothing was created anywhere
    assert core.host_call("list")["agents"] == ["alice", "bob", "carol"]
    assert sorted(p.name for p in (core.run_dir / "agents").iterdir()) == ["alice", "bob", "carol"]
    assert sorted(p.name for p in core.run_dir.iterdir()) == ["agents", "core.sock", "host.sock"]
    assert core.host_call("pending")["approvals"] == []


def test_longest_name_accepted(core: CoreProcess) -> None:
    name = "a" + "b" * 30  # 31 characters: the longest valid name
    assert_ok(core.host_call("spawn", name=name, spec={"runtime": "command", "command": ["true"]}))
    assert assert_ok(core.agent_call(name, "whoami"))["name"] == name


# -- line length -------------------------------------------------------------------------


def padded(obj: dict[str, Any], size: int) -> bytes:
    """``obj`` as JSON, padded with spaces inside the object to exactly ``size`` bytes."""
    raw = json.dumps(obj).encode()
    assert raw.endswith(b"}")
    line = raw[:-1] + b" " * (size - len(raw)) + b"}"
    assert len(line) == size
    return line


def test_line_of_exactly_max_is_accepted(core: CoreProcess) -> None:
    with core.agent("alice") as c:
        c.send_raw(padded({"cmd": "whoami"}, MAX_LINE) + b"\n")
        assert assert_ok(strict_loads(read_line(c)))["name"] == "alice"
        # a max-size line with a too-long body: a normal validation error
        raw = json.dumps({"cmd": "send", "to": "bob", "body": ""}).encode()
        body = b"x" * (MAX_LINE - len(raw))
        line = raw[:-2] + body + b'"}'
        assert len(line) == MAX_LINE
        c.send_raw(line + b"\n")
        resp = check_error_line(read_line(c))
        assert "body" in resp["error"]
        probe(c)


@pytest.mark.parametrize("over", [1, 2, 4096, MAX_LINE])
def test_oversized_line_refused_others_unaffected(core: CoreProcess, over: int) -> None:
    other = core.agent("bob")
    host = core.host()
    c = core.agent("alice")
    line = padded({"cmd": "send", "to": "bob", "body": "big"}, MAX_LINE + over)
    try:
        c.send_raw(line + b"\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the core may hang up before we finish writing; its reply is still readable
    resp = check_error_line(read_line(c))
    assert "exceeds" in resp["error"] and str(MAX_LINE) in resp["error"]
    # after the reply the connection may be closed; if it's not, it still works
    try:
        c.send_raw(b'{"cmd":"whoami"}\n')
        follow = c._file.readline()
    except (BrokenPipeError, ConnectionResetError):
        follow = b""
    if follow:
        assert assert_ok(strict_loads(follow))["name"] == "alice"
    # nothing was sent, other clients and new connections are unaffected
    assert assert_ok(other.call("recv"))["messages"] == []
    assert assert_ok(host.call("list"))["agents"] == ["alice", "bob", "carol"]
    assert assert_ok(core.agent_call("alice", "whoami"))["name"] == "alice"


def test_oversized_line_on_host_sock(core: CoreProcess) -> None:
    c = core.host()
    try:
        c.send_raw(b'{"cmd":"list","x":"' + b"y" * (2 * MAX_LINE) + b'"}\n')
    except (BrokenPipeError, ConnectionResetError):
        pass
    resp = check_error_line(read_line(c))
    assert "exceeds" in resp["error"]
    assert assert_ok(core.host_call("list"))["agents"] == ["alice", "bob", "carol"]


# -- full disk -----------------------------------------------------------------------------


@pytest.fixture
def small_state_dir(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small-state"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0750", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def fill(path: Path) -> None:
    """Write until the filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.statvfs(path.parent).f_bavail == 0


def test_full_disk_refuses_cleanly_and_recovers(small_state_dir: Path, core_factory: Any) -> None:
    core = core_factory(state_dir=small_state_dir)
    a = core.agent("alice")
    kept = [assert_ok(a.call("send", to="bob", body=f"before {i}"))["id"] for i in range(3)]
    qid = assert_ok(a.call("ask", to="operator", question="still there?"))["id"]
    before = {c: core.host_call(c) for c in ("agent_status", "pending", "questions", "inbox")}
    filler = small_state_dir / "filler"
    fill(filler)

    for req in (
        {"cmd": "send", "to": "bob", "body": "x" * 20_000},
        {"cmd": "ask", "to": "bob", "question": "y" * 20_000},
        {"cmd": "request_approval", "kind": "custom", "description": "z" * 20_000, "payload": {}},
        {"cmd": "remind", "in_seconds": 3600, "text": "w" * 20_000},
    ):
        resp = a.call(**req)
        assert_refused(resp)
        assert "full" in resp["error"].lower() or "storage" in resp["error"].lower(), resp
        assert "internal error" not in resp["error"]
        probe(a)  # the connection stays usable
    resp = core.host_call("send", to="bob", body="q" * 20_000)
    assert_refused(resp, "full")
    # no partial state: nothing the failed requests would have added is visible
    assert {c: core.host_call(c) for c in ("agent_status", "pending", "questions", "inbox")} == before
    with core.agent("bob") as b:
        got = assert_ok(b.call("recv", max=100))["messages"]
        assert [m["id"] for m in got] == kept
        assert all(m["kind"] == "message" for m in got)  # no half-delivered question
    # reads still work while full
    assert assert_ok(core.host_call("list"))["agents"] == ["alice", "bob", "carol"]

    filler.unlink()
    new = assert_ok(a.call("send", to="bob", body="after"))["id"]
    with core.agent("bob") as b:
        got = assert_ok(b.call("recv", max=100))["messages"]
        assert [m["body"] for m in got] == ["before 0", "before 1", "before 2", "after"]
        assert [m["id"] for m in got] == [*kept, new]
    assert [q["id"] for q in core.host_call("questions")["questions"]] == [qid]
    # and the database on disk is consistent after a restart
    core.restart()
    with core.agent("bob") as b:
        assert [m["body"] for m in assert_ok(b.call("recv", max=100))["messages"]][-1] == "after"
    core.stop_clean()
    db = sqlite3.connect(small_state_dir / "hive.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()

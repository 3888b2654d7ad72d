"""``hive mcp``: the agent verbs as an MCP stdio tool server, driven by the official
SDK's own client (``mcp.client.stdio.stdio_client`` + ``ClientSession``).

The server runs on the host against alice's agent.sock of a core-only hive
(``core`` fixture: alice -> bob, bob -> alice and carol, carol with no peers);
every tool's effect is checked through host.sock (or the receiving agent's
socket). The last tests run ``hive agent`` and ``hive mcp`` inside a real cage
(``/opt/hive/bin/hive``, through ``hive exec``), speaking MCP as JSON-RPC lines on
stdin/stdout."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import CallToolResult, TextContent

from helpers import CoreProcess, assert_ok, wait_for, wire_time
from hive_fixture import HIVE, HiveProcess, running_hive

T = TypeVar("T")

TOOLS = {
    "whoami", "peers", "send_message", "ask", "answer", "request_approval", "set_status", "remind", "loose_ends",
}
MCP_TIMEOUT = 60.0


# -- driving `hive mcp` with the SDK's client ------------------------------------------


def run_mcp(
    sock: Path | None, body: Callable[[ClientSession], Awaitable[T]], errlog: Path, env: dict[str, str] | None = None,
) -> T:
    """Start ``hive mcp [--socket SOCK]``, initialize a session, run ``body`` on it, shut down."""
    args = ["mcp"] + (["--socket", str(sock)] if sock is not None else [])
    params = StdioServerParameters(command=str(HIVE), args=args, env=env)

    async def main() -> T:
        with errlog.open("a") as err, anyio.fail_after(MCP_TIMEOUT):
            async with stdio_client(params, errlog=err) as (read, write), ClientSession(
                read, write, read_timeout_seconds=timedelta(seconds=30),
            ) as session:
                init = await session.initialize()
                assert init.serverInfo.name == "hive"
                assert init.capabilities.tools is not None
                return await body(session)

    return anyio.run(main)


@pytest.fixture
def mcp_errlog(tmp_path: Path) -> Iterator[Path]:
    """The server's stderr; shown when a test fails."""
    path = tmp_path / "mcp-stderr.log"
    path.touch()
    yield path


def ok_result(result: CallToolResult) -> dict[str, Any]:
    """A successful tool call: structured content, and the same JSON as text."""
    assert not result.isError, result.content
    assert result.structuredContent is not None, result
    [content] = result.content
    assert isinstance(content, TextContent)
    assert json.loads(content.text) == result.structuredContent
    return result.structuredContent


def error_text(result: CallToolResult) -> str:
    """A refused tool call: an MCP tool error (isError), one line of text."""
    assert result.isError, result
    [content] = result.content
    assert isinstance(content, TextContent)
    assert content.text and "\n" not in content.text and "\r" not in content.text, content.text
    return content.text


def canonical_sha256(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class LineReader:
    """stdout lines of a child, read on a thread (so a read can time out)."""

    def __init__(self, stream: Any) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            for line in stream:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float = 30.0) -> dict[str, Any]:
        line = self.lines.get(timeout=timeout)
        assert line is not None, "hive mcp closed its stdout"
        return json.loads(line)


# -- the tool list -----------------------------------------------------------------------


def test_lists_the_agent_verbs_as_tools(module_core: CoreProcess, mcp_errlog: Path) -> None:
    core = module_core  # shared: this changes nothing
    async def body(s: ClientSession) -> Any:
        return (await s.list_tools()).tools

    tools = {t.name: t for t in run_mcp(core.agent_sock("alice"), body, mcp_errlog)}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description, tool.name
        schema = tool.inputSchema
        assert schema["type"] == "object"
        # identity = socket: no tool takes a sender.
        assert not {"from", "sender", "agent", "name", "as"} & set(schema.get("properties", {})), (tool.name, schema)
    assert set(tools["send_message"].inputSchema["required"]) == {"to", "body"}
    assert set(tools["ask"].inputSchema["required"]) == {"to", "question"}
    assert set(tools["answer"].inputSchema["required"]) == {"question_id", "answer"}
    assert set(tools["request_approval"].inputSchema["required"]) == {"kind", "description"}
    assert set(tools["set_status"].inputSchema["required"]) == {"text"}
    assert set(tools["remind"].inputSchema["required"]) == {"text"}
    for name in ("whoami", "peers", "loose_ends"):
        assert not tools[name].inputSchema.get("required"), name


# -- each tool, its effect seen through host.sock -----------------------------------------


def test_whoami_and_peers(module_core: CoreProcess, mcp_errlog: Path) -> None:
    core = module_core  # shared: this changes nothing
    async def body(s: ClientSession) -> tuple[dict[str, Any], dict[str, Any]]:
        return ok_result(await s.call_tool("whoami", {})), ok_result(await s.call_tool("peers", {}))

    assert run_mcp(core.agent_sock("alice"), body, mcp_errlog) == ({"name": "alice"}, {"peers": ["bob"]})
    assert run_mcp(core.agent_sock("bob"), body, mcp_errlog) == ({"name": "bob"}, {"peers": ["alice", "carol"]})


def test_socket_from_hive_socket_env(module_core: CoreProcess, mcp_errlog: Path) -> None:
    core = module_core  # shared: this changes nothing
    async def body(s: ClientSession) -> dict[str, Any]:
        return ok_result(await s.call_tool("whoami", {}))

    env = {"PATH": "/usr/bin:/bin", "HIVE_SOCKET": str(core.agent_sock("carol"))}
    assert run_mcp(None, body, mcp_errlog, env=env) == {"name": "carol"}


def test_send_message_to_operator_shows_in_inbox(core: CoreProcess, mcp_errlog: Path) -> None:
    async def body(s: ClientSession) -> dict[str, Any]:
        return ok_result(await s.call_tool("send_message", {"to": "operator", "body": "build is green ✓"}))

    sent = run_mcp(core.agent_sock("alice"), body, mcp_errlog)
    inbox = assert_ok(core.host_call("inbox"))["messages"]
    assert [(m["id"], m["from"], m["to"], m["kind"], m["body"]) for m in inbox] == [
        (sent["id"], "alice", "operator", "message", "build is green ✓")
    ]


def test_send_message_to_peer_reaches_it(core: CoreProcess, mcp_errlog: Path) -> None:
    async def body(s: ClientSession) -> dict[str, Any]:
        return ok_result(await s.call_tool("send_message", {"to": "bob", "body": "hello bob"}))

    sent = run_mcp(core.agent_sock("alice"), body, mcp_errlog)
    msgs = assert_ok(core.agent_call("bob", "recv", wait=5))["messages"]
    assert [(m["id"], m["from"], m["body"]) for m in msgs] == [(sent["id"], "alice", "hello bob")]
    assert assert_ok(core.host_call("inbox"))["messages"] == []


def test_refused_calls_are_tool_errors_with_the_reason(module_core: CoreProcess, mcp_errlog: Path) -> None:
    core = module_core  # shared: this changes nothing (checked)
    # What the socket itself says to the same requests, for comparison.
    not_peer = core.agent_call("alice", "send", to="carol", body="psst")["error"]
    no_question = core.agent_call("alice", "answer", id=4242, answer="yes")["error"]
    before = {cmd: core.host_call(cmd) for cmd in ("inbox", "questions", "pending")}

    async def body(s: ClientSession) -> list[str]:
        return [
            error_text(await s.call_tool("send_message", {"to": "carol", "body": "psst"})),
            error_text(await s.call_tool("ask", {"to": "carol", "question": "secret?"})),
            error_text(await s.call_tool("answer", {"question_id": 4242, "answer": "yes"})),
            error_text(await s.call_tool("send_message", {"to": "no-such-agent", "body": "x"})),
            error_text(await s.call_tool("remind", {"text": "when?"})),  # neither in_seconds nor at
            error_text(await s.call_tool("set_status", {"text": "x" * 5000})),
        ]

    errors = run_mcp(core.agent_sock("alice"), body, mcp_errlog)
    assert not_peer in errors[0] and "send_message" in errors[0]
    assert "carol" in errors[1] and "peer" in errors[1]
    assert no_question in errors[2]
    assert "no-such-agent" in errors[3]
    assert "in_seconds" in errors[4] and "at" in errors[4]
    assert "text" in errors[5]
    # A refusal changes nothing.
    assert {cmd: core.host_call(cmd) for cmd in before} == before
    assert assert_ok(core.agent_call("carol", "recv", wait=0))["messages"] == []


def test_ask_operator_shows_in_questions(core: CoreProcess, mcp_errlog: Path) -> None:
    async def body(s: ClientSession) -> dict[str, Any]:
        return ok_result(await s.call_tool(
            "ask", {"to": "operator", "question": "deploy now?", "options": ["yes", "no"]},
        ))

    asked = run_mcp(core.agent_sock("alice"), body, mcp_errlog)
    questions = assert_ok(core.host_call("questions"))["questions"]
    assert len(questions) == 1, questions
    q = questions[0]
    assert (q["id"], q["asker"], q["to"], q["question"], q["options"]) == (
        asked["id"], "alice", "operator", "deploy now?", ["yes", "no"],
    )
    # The operator's answer comes back to alice as a message referring to the question.
    assert_ok(core.host_call("answer_question", id=asked["id"], answer="yes"))
    msgs = assert_ok(core.agent_call("alice", "recv", wait=5))["messages"]
    assert [(m["kind"], m["from"], m["ref"], m["body"]) for m in msgs] == [("answer", "operator", asked["id"], "yes")]


def test_ask_peer_and_answer_a_peers_question(core: CoreProcess, mcp_errlog: Path) -> None:
    # bob asks alice (a peer question never shows in the operator's `questions`).
    qid = assert_ok(core.agent_call("bob", "ask", to="alice", question="ready?"))["id"]
    assert assert_ok(core.host_call("questions"))["questions"] == []
    with core.host() as sub:
        events = sub.stream("subscribe", kinds=["answer"])
        assert assert_ok(next(events))["subscribed"] == ["answer"]

        async def body(s: ClientSession) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
            ends = ok_result(await s.call_tool("loose_ends", {}))
            answered = ok_result(await s.call_tool("answer", {"question_id": qid, "answer": "ready"}))
            return ends, answered, ok_result(await s.call_tool("loose_ends", {}))

        ends, answered, ends_after = run_mcp(core.agent_sock("alice"), body, mcp_errlog)
        event = assert_ok(next(events))["event"]
    assert [q["id"] for q in ends["to_answer"]] == [qid]
    assert answered == {"id": qid}
    assert ends_after["to_answer"] == []
    assert event["kind"] == "answer", event
    assert event["question"]["id"] == qid and event["question"]["answer"] == "ready", event
    msgs = assert_ok(core.agent_call("bob", "recv", wait=5))["messages"]
    assert [(m["kind"], m["from"], m["ref"], m["body"]) for m in msgs] == [("answer", "alice", qid, "ready")]


def test_request_approval_shows_in_pending_with_its_sha256(core: CoreProcess, mcp_errlog: Path) -> None:
    payload = {"what": "rotate the keys", "hosts": ["a", "b"], "dry_run": False, "n": 2.5, "note": "größer"}

    async def body(s: ClientSession) -> dict[str, Any]:
        return ok_result(await s.call_tool(
            "request_approval", {"kind": "custom", "description": "may I rotate?", "payload": payload},
        ))

    req = run_mcp(core.agent_sock("alice"), body, mcp_errlog)
    assert req["payload_sha256"] == canonical_sha256(payload)  # the payload arrived unchanged
    rows = assert_ok(core.host_call("pending"))["approvals"]
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["id"], row["agent"], row["kind"], row["status"], row["description"]) == (
        req["id"], "alice", "custom", "pending", "may I rotate?",
    )
    assert row["payload"] == payload
    assert row["payload_sha256"] == req["payload_sha256"]


def test_request_approval_refused_kind(module_core: CoreProcess, mcp_errlog: Path) -> None:
    core = module_core  # shared: this changes nothing (checked)
    reason = core.agent_call("alice", "request_approval", kind="root-me", description="x")["error"]

    async def body(s: ClientSession) -> str:
        return error_text(await s.call_tool("request_approval", {"kind": "root-me", "description": "x"}))

    assert reason in run_mcp(core.agent_sock("alice"), body, mcp_errlog)
    assert assert_ok(core.host_call("pending"))["approvals"] == []


def test_set_status_shows_in_agent_status(core: CoreProcess, mcp_errlog: Path) -> None:
    async def body(s: ClientSession) -> dict[str, Any]:
        return ok_result(await s.call_tool("set_status", {"text": "reviewing PR 7"}))

    res = run_mcp(core.agent_sock("alice"), body, mcp_errlog)
    row = core.status("alice")
    assert row["status_text"] == "reviewing PR 7"
    assert row["status_set_at"] == res["status_set_at"]
    wire_time(row["status_set_at"])
    assert "status_text" not in core.status("bob")


def test_remind_in_seconds_and_at(core: CoreProcess, mcp_errlog: Path) -> None:
    at = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)

    async def body(s: ClientSession) -> tuple[dict[str, Any], dict[str, Any]]:
        return (
            ok_result(await s.call_tool("remind", {"text": "check CI", "in_seconds": 3600})),
            ok_result(await s.call_tool("remind", {"text": "standup", "at": at.isoformat()})),
        )

    first, second = run_mcp(core.agent_sock("alice"), body, mcp_errlog)
    assert first["id"] != second["id"]
    assert wire_time(second["due_at"]) == at.timestamp()
    assert core.status("alice")["pending_reminders"] == 2
    assert core.status("bob")["pending_reminders"] == 0


def test_remind_fires_as_a_message(core: CoreProcess, mcp_errlog: Path) -> None:
    async def body(s: ClientSession) -> dict[str, Any]:
        return ok_result(await s.call_tool("remind", {"text": "time's up", "in_seconds": 0.5}))

    rid = run_mcp(core.agent_sock("alice"), body, mcp_errlog)["id"]
    msgs = assert_ok(core.agent_call("alice", "recv", wait=10))["messages"]
    assert [(m["kind"], m["body"]) for m in msgs] == [("reminder", "time's up")], (rid, msgs)
    wait_for(lambda: core.status("alice")["pending_reminders"] == 0, timeout=10)


def test_loose_ends_lists_open_questions_and_approvals(core: CoreProcess, mcp_errlog: Path) -> None:
    async def body(s: ClientSession) -> tuple[int, int, dict[str, Any]]:
        q = ok_result(await s.call_tool("ask", {"to": "operator", "question": "which branch?"}))
        a = ok_result(await s.call_tool("request_approval", {"kind": "custom", "description": "merge?"}))
        return q["id"], a["id"], ok_result(await s.call_tool("loose_ends", {}))

    qid, aid, ends = run_mcp(core.agent_sock("alice"), body, mcp_errlog)
    assert [(q["id"], q["question"]) for q in ends["questions"]] == [(qid, "which branch?")]
    assert [(a["id"], a["description"], a["status"]) for a in ends["approvals"]] == [(aid, "merge?", "pending")]
    assert ends["to_answer"] == []
    # The same things, as the operator sees them.
    assert [q["id"] for q in assert_ok(core.host_call("questions"))["questions"]] == [qid]
    assert [a["id"] for a in assert_ok(core.host_call("pending"))["approvals"]] == [aid]


def test_hive_not_running_is_a_tool_error_naming_the_socket(tmp_path: Path, mcp_errlog: Path) -> None:
    missing = tmp_path / "nowhere" / "agent.sock"

    async def body(s: ClientSession) -> tuple[set[str], str]:
        tools = {t.name for t in (await s.list_tools()).tools}  # the tool list needs no hive
        return tools, error_text(await s.call_tool("whoami", {}))

    tools, err = run_mcp(missing, body, mcp_errlog)
    assert tools == TOOLS
    assert "not running" in err and str(missing) in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stops_at_once_on_a_signal_with_stdin_open(core: CoreProcess, sig: signal.Signals) -> None:
    """Claude Code stops its MCP servers with SIGINT and, 100 ms later, SIGTERM."""
    proc = subprocess.Popen(
        [str(HIVE), "mcp", "--socket", str(core.agent_sock("alice"))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"},
        }}) + "\n")
        proc.stdin.flush()
        assert LineReader(proc.stdout).next()["id"] == 1
        proc.send_signal(sig)
        assert proc.wait(timeout=5) == 128 + sig  # stdin is still open
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()


# -- inside a real cage ---------------------------------------------------------------

CAGED = "mcp-cage"  # a name no other test module's hive uses (cages are keyed by name)


@pytest.fixture(scope="module")
def mcp_hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess({CAGED: {"runtime": "command", "command": ["true"], "peers": []}}))


def test_hive_agent_whoami_in_a_cage(mcp_hive: HiveProcess) -> None:
    proc = mcp_hive.exec(CAGED, "/opt/hive/bin/hive", "agent", "whoami")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{CAGED}\n", "")
    proc = mcp_hive.exec(CAGED, "/opt/hive/bin/hive", "agent", "send", "operator", "from the cage")
    assert proc.returncode == 0, proc.stderr
    inbox = assert_ok(mcp_hive.host_call("inbox"))["messages"]
    assert [(m["from"], m["body"]) for m in inbox] == [(CAGED, "from the cage")]


def test_hive_mcp_in_a_cage_speaks_json_rpc_on_stdio(mcp_hive: HiveProcess) -> None:
    cmd = [str(HIVE), "--run-dir", str(mcp_hive.run_dir), "exec", CAGED, "--", "/opt/hive/bin/hive", "mcp"]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
    )
    assert proc.stdin is not None and proc.stdout is not None
    out = LineReader(proc.stdout)

    def send(obj: dict[str, Any]) -> None:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"jsonrpc": "2.0", **obj}) + "\n")
        proc.stdin.flush()

    try:
        send({"id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "hive-tests", "version": "0"},
        }})
        init = out.next()
        assert init["id"] == 1 and "error" not in init, init
        assert init["result"]["serverInfo"]["name"] == "hive"
        assert "tools" in init["result"]["capabilities"]
        send({"method": "notifications/initialized"})
        send({"id": 2, "method": "tools/list"})
        listed = out.next()
        assert listed["id"] == 2 and "error" not in listed, listed
        assert {t["name"] for t in listed["result"]["tools"]} == TOOLS
        send({"id": 3, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}})
        called = out.next()
        assert called["id"] == 3 and not called["result"].get("isError"), called
        assert called["result"]["structuredContent"] == {"name": CAGED}
        proc.stdin.close()  # EOF: the server ends
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in stderr, stderr
    assert os.path.exists(mcp_hive.host_sock)

"""The ``claude`` runtime against the real Claude Code CLI (installed from the npm
registry by scripts/setup.sh) and, for the turns that need a model, a stand-in.

(a) On the host: the real CLI, run exactly as ``ClaudeRuntime.argv`` builds it,
    with an empty HOME and no ANTHROPIC_API_KEY. It starts the hive's MCP server
    (here ``.venv/bin/hive mcp --socket <alice's agent.sock>`` of a core-only hive;
    in a cage it is ``/opt/hive/bin/hive mcp``), prints its ``system``/``init`` event
    and stops at its first model call with "Not logged in". Works without network.
    Then whole turns of the real CLI with the model replaced by a stand-in Messages
    API on 127.0.0.1 (tests/fake_anthropic.py): the model's hive tool calls must
    reach the hive, and the next turn must resume the session.
(b) In a real cage: an agent with ``runtime = "claude"`` and no credentials shows
    ``needs_login`` and its model in ``agent_status``; a real turn runs the CLI in
    the cage, which reaches ``hive mcp`` there.
(c) In a real cage: a stand-in executable (``command = ["/home/agent/claude-standin"]``)
    that prints the documented stream-json events, really calls a hive tool through
    the ``--mcp-config`` it was given, and records its argv: two turns, the second
    resuming the first's session.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fake_anthropic import FakeAnthropic
from helpers import CoreProcess, assert_ok, wire_time
from hive_fixture import VENV_BIN, HiveProcess, proc_cmdline, proc_uid, running_hive, wait_until
from hyperhive.cage import layout
from hyperhive.cage.runtimes import SYSTEM_PROMPT, ClaudeRuntime

MODEL = "claude-sonnet-4-5"
HIVE_TOOLS = {
    f"mcp__hive__{t}" for t in
    ("whoami", "peers", "send_message", "ask", "answer", "request_approval", "set_status", "remind", "loose_ends")
}
CLAUDE_TIMEOUT = 120.0


def claude_path() -> str:
    """``claude`` where a cage finds it: on the cage's PATH, under /usr."""
    found = shutil.which("claude", path=layout.PATH.replace(f"{layout.BIN}:", ""))
    assert found, "the claude CLI is not installed: run scripts/setup.sh"
    assert os.path.realpath(found).startswith("/usr/"), f"{found} is not under /usr, a cage can't see it"
    return found


def message(mid: int, body: str, kind: str = "message", sender: str = "operator") -> dict[str, Any]:
    return {"id": mid, "from": sender, "kind": kind, "body": body, "sent_at": 0.0}


def events_of(stdout: str) -> list[dict[str, Any]]:
    out = []
    for line in stdout.splitlines():
        if line.strip():
            event = json.loads(line)  # stream-json: every stdout line is one JSON object
            assert isinstance(event, dict), line
            out.append(event)
    return out


# -- (a) the real CLI on the host --------------------------------------------------------


class HostClaudeRuntime(ClaudeRuntime):
    """ClaudeRuntime with the MCP server as the host reaches it (outside a cage
    there is no /opt/hive/bin/hive nor /run/hive/agent.sock)."""

    def __init__(self, name: str, spec: dict[str, Any], agent_sock: Path) -> None:
        super().__init__(name, spec)
        self.agent_sock = agent_sock

    def mcp_config(self) -> str:
        inside = json.loads(super().mcp_config())["mcpServers"]["hive"]
        assert inside == {"command": f"{layout.BIN}/hive", "args": ["mcp"]}
        return json.dumps({"mcpServers": {"hive": {
            "command": str(VENV_BIN / "hive"), "args": ["mcp", "--socket", str(self.agent_sock)],
        }}})


@pytest.fixture
def empty_home() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="cchome-", dir="/tmp"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


def run_turn(
    runtime: ClaudeRuntime, msg: dict[str, Any], home: Path, extra_env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """One turn as the harness runs it (argv, env, stdin of the runtime), with HOME
    moved to ``home``; returns the process and the argv it ran."""
    argv = runtime.argv(msg)
    env = {**runtime.env(msg), "HOME": str(home)}
    assert "ANTHROPIC_API_KEY" not in env
    # On a host with a network, never let the CLI update the pinned install (a cage's
    # /usr is read-only and has no route out, so there it can't).
    env["DISABLE_AUTOUPDATER"] = "1"
    env.update(extra_env or {})
    proc = subprocess.run(
        argv, input=runtime.stdin(msg).decode(), capture_output=True, text=True, env=env, cwd=home,
        timeout=CLAUDE_TIMEOUT, check=False,
    )
    return proc, argv


def test_argv_is_print_mode_stream_json_with_the_hive_mcp_server() -> None:
    rt = ClaudeRuntime("alice", {"runtime": "claude", "model": MODEL, "peers": []})
    argv = rt.argv(message(7, "hello"))
    assert argv[:2] == ["claude", "-p"]
    # The prompt is on stdin, never in argv (one argv string is limited to 128 KiB).
    assert not any("hello" in a for a in argv)
    assert json.loads(rt.stdin(message(7, "hello"))) == {
        "hive_item": {"id": 7, "kind": "message", "from": "operator"}, "body": "hello",
    }
    assert argv[argv.index("--append-system-prompt") + 1] == SYSTEM_PROMPT
    i = argv.index("--output-format")
    assert argv[i + 1] == "stream-json" and "--verbose" in argv
    config = json.loads(argv[argv.index("--mcp-config") + 1])
    assert config == {"mcpServers": {"hive": {"command": "/opt/hive/bin/hive", "args": ["mcp"]}}}
    assert argv[argv.index("--allowedTools") + 1] == "mcp__hive"  # every hive tool, no others
    assert argv[argv.index("--model") + 1] == MODEL
    assert "--resume" not in argv
    rt.session_id = "abc"
    assert argv_resume(rt.argv(message(8, "again"))) == "abc"
    assert json.loads(rt.stdin(message(8, "again")))["body"] == "again"
    assert ClaudeRuntime("x", {"runtime": "claude", "command": ["/home/agent/cc"]}).argv(message(1, "x"))[0] == (
        "/home/agent/cc"
    )


def argv_resume(argv: list[str]) -> str | None:
    return argv[argv.index("--resume") + 1] if "--resume" in argv else None


def test_real_cli_starts_the_hive_mcp_server_and_needs_login(core: CoreProcess, empty_home: Path) -> None:
    claude_path()
    rt = HostClaudeRuntime("alice", {"runtime": "claude", "model": MODEL, "peers": ["bob"]}, core.agent_sock("alice"))
    assert rt.needs_login is False
    proc, _ = run_turn(rt, message(1, "Say hello to bob."), empty_home)
    assert proc.returncode != 0, proc
    events = events_of(proc.stdout)
    assert events, f"no stream-json output\nstderr: {proc.stderr}"

    init = events[0]
    assert (init["type"], init["subtype"]) == ("system", "init"), init
    assert init["session_id"]
    assert init["model"] == MODEL
    assert "apiKeySource" in init  # "none" here: no key, no login
    servers = {s["name"]: s for s in init["mcp_servers"]}
    assert set(servers) == {"hive"}, init["mcp_servers"]
    # "connected": Claude Code started `hive mcp`, initialized it and listed its tools.
    assert servers["hive"]["status"] == "connected", (
        f"{servers['hive']}; the MCP log is under {empty_home}/.cache/claude-cli-nodejs"
    )
    assert set(init["tools"]) >= HIVE_TOOLS, init["tools"]

    results = [e for e in events if e.get("type") == "result"]
    assert len(results) == 1 and events[-1] is results[0], events
    assert results[0]["is_error"] is True
    assert "Not logged in" in results[0]["result"]
    assert results[0]["session_id"] == init["session_id"]

    kinds = [rt.stdout_entry(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [k for k, _ in kinds] == ["event"] * len(events)  # no tool was called
    assert rt.needs_login is True
    assert rt.session_id == init["session_id"]
    assert rt.active_model == MODEL
    assert argv_resume(rt.argv(message(2, "again"))) == init["session_id"]
    # Nothing reached the hive: the model was never called, so no tool was.
    assert assert_ok(core.host_call("inbox"))["messages"] == []


def test_real_cli_resuming_a_lost_session_starts_a_new_one(empty_home: Path) -> None:
    claude_path()
    rt = ClaudeRuntime("alice", {"runtime": "claude", "model": MODEL})
    lost = str(uuid.uuid4())
    rt.session_id = lost
    proc, argv = run_turn(rt, message(3, "hello"), empty_home)
    assert argv_resume(argv) == lost
    events = events_of(proc.stdout)
    assert [e["type"] for e in events] == ["result"], events
    assert events[0]["is_error"] is True
    assert any(lost in str(e) for e in events[0].get("errors", [])), events[0]
    for line in proc.stdout.splitlines():
        rt.stdout_entry(line)
    assert rt.session_id is None  # the next turn starts a new session instead of failing forever
    assert "--resume" not in rt.argv(message(4, "hello"))


def test_real_cli_calls_hive_tools_with_a_stand_in_model_api(core: CoreProcess, empty_home: Path) -> None:
    """Whole turns of the real CLI, the model replaced by tests/fake_anthropic.py: the
    model's tool calls must go through `hive mcp` (allowed up front: print mode can't
    ask), and the second turn must resume the first one's session."""
    claude_path()
    actions = [
        ("mcp__hive__send_message", {"to": "operator", "body": "hello from claude"}),
        ("mcp__hive__set_status", {"text": "second turn, resumed"}),
    ]
    rt = HostClaudeRuntime("alice", {"runtime": "claude", "model": MODEL, "peers": ["bob"]}, core.agent_sock("alice"))
    with FakeAnthropic(actions) as api:
        env = {"ANTHROPIC_API_KEY": "sk-ant-test-not-a-real-key", "ANTHROPIC_BASE_URL": api.base_url}
        turns = []
        for mid, body in ((1, "Tell the operator hello."), (2, "Now set your status.")):
            proc, argv = run_turn(rt, message(mid, body), empty_home, env)
            assert proc.returncode == 0, f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
            kinds = [rt.stdout_entry(line)[0] for line in proc.stdout.splitlines() if line.strip()]
            turns.append((argv, events_of(proc.stdout), kinds))
        requests = list(api.requests)

    sessions = []
    for (argv, events, kinds), (tool, tool_input) in zip(turns, actions, strict=True):
        assert "--allowedTools" in argv
        init = events[0]
        assert (init["type"], init["subtype"], init["apiKeySource"]) == ("system", "init", "ANTHROPIC_API_KEY")
        assert {s["name"]: s["status"] for s in init["mcp_servers"]} == {"hive": "connected"}
        sessions.append(init["session_id"])
        assert not [e for e in events if e.get("subtype") == "permission_denied"], events
        [call] = [e for e in events if e["type"] == "assistant" and e["message"]["content"][0]["type"] == "tool_use"]
        assert (call["message"]["content"][0]["name"], call["message"]["content"][0]["input"]) == (tool, tool_input)
        [tool_result] = [e for e in events if e["type"] == "user"]
        block = tool_result["message"]["content"][0]
        assert block["type"] == "tool_result" and not block.get("is_error"), block
        result = events[-1]
        assert result["type"] == "result" and result["is_error"] is False, result
        assert result["permission_denials"] == []
        assert kinds.count("tool_call") == 1 and set(kinds) == {"event", "tool_call"}, kinds
    assert argv_resume(turns[0][0]) is None
    assert argv_resume(turns[1][0]) == sessions[0] == sessions[1]
    # Resumed: the second turn's first model request carries the first turn's conversation.
    second = [r for r in requests if r.get("tools") and "Now set your status." in json.dumps(r["messages"])]
    assert second and "Tell the operator hello." in json.dumps(second[0]["messages"])

    assert (rt.needs_login, rt.login_probe()) == (False, None)
    inbox = assert_ok(core.host_call("inbox"))["messages"]
    assert [(m["from"], m["body"]) for m in inbox] == [("alice", "hello from claude")]
    assert core.status("alice")["status_text"] == "second turn, resumed"


def test_stdout_entry_kinds_and_login_state() -> None:
    rt = ClaudeRuntime("alice", {"runtime": "claude", "model": MODEL})
    assert rt.login_probe() is not None  # before any turn: look at the credentials
    # apiKeySource "none" is what a claude.ai (OAuth) login reports too: not a login verdict.
    init = {"type": "system", "subtype": "init", "session_id": "s1", "model": "claude-opus-4-1", "apiKeySource": "none"}
    assert rt.stdout_entry(json.dumps(init)) == ("event", init)
    assert (rt.needs_login, rt.session_id, rt.active_model) == (False, "s1", "claude-opus-4-1")
    tool_use = {"type": "assistant", "message": {"content": [
        {"type": "text", "text": "on it"},
        {"type": "tool_use", "id": "t1", "name": "mcp__hive__whoami", "input": {}},
    ]}}
    assert rt.stdout_entry(json.dumps(tool_use))[0] == "tool_call"
    assert rt.stdout_entry("not json") == ("stdout", "not json")
    assert rt.stdout_entry("[1, 2]") == ("stdout", "[1, 2]")
    failed = {"type": "result", "is_error": True, "result": "Not logged in · Please run /login"}
    rt.stdout_entry(json.dumps(failed))
    assert rt.needs_login is True and rt.login_probe() is None  # the CLI's word beats a file check
    other = {"type": "result", "is_error": True, "result": "API Error: 529 overloaded"}
    rt.stdout_entry(json.dumps(other))
    assert rt.needs_login is True and rt.session_id == "s1"
    rt.stdout_entry(json.dumps({"type": "result", "is_error": False, "result": "done"}))
    assert rt.needs_login is False and rt.login_probe() is None


# -- (b), (c) in real cages ----------------------------------------------------------------

REAL = "cc-real"  # names no other module's hive uses: cages are keyed by name on the host
STANDIN = "cc-standin"
STOPPER = "cc-stopper"
STANDIN_PATH = f"{layout.HOME}/claude-standin"
ARGV_LOG = "standin-argv.jsonl"

# The stand-in: the documented stream-json events of a turn with one tool call.
# The tool call is real: it starts the MCP server named in --mcp-config and calls
# set_status through it (JSON-RPC on stdio), as Claude Code would.
STANDIN_SCRIPT = textwrap.dedent("""\
    #!/usr/bin/python3
    import json, os, subprocess, sys, uuid

    argv = sys.argv[1:]
    prompt = sys.stdin.read()
    with open(os.path.expanduser("~/standin-argv.jsonl"), "a") as f:
        f.write(json.dumps({"argv": argv, "stdin": prompt}) + "\\n")

    def opt(name):
        return argv[argv.index(name) + 1] if name in argv else None

    def emit(event):
        print(json.dumps(event), flush=True)

    session = opt("--resume") or str(uuid.uuid4())
    server = json.loads(opt("--mcp-config"))["mcpServers"]["hive"]
    emit({"type": "system", "subtype": "init", "session_id": session, "model": opt("--model") or "default",
          "cwd": os.getcwd(), "tools": ["mcp__hive__set_status"], "apiKeySource": "none",
          "mcp_servers": [{"name": "hive", "status": "connected"}]})
    turn = str(json.loads(prompt)["hive_item"]["id"])
    text = "standin turn for hive message " + turn
    emit({"type": "assistant", "session_id": session, "message": {"role": "assistant", "content": [
        {"type": "text", "text": "Setting my status."},
        {"type": "tool_use", "id": "toolu_" + turn, "name": "mcp__hive__set_status", "input": {"text": text}}]}})

    mcp = subprocess.Popen([server["command"], *server.get("args", [])], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    def rpc(obj):
        mcp.stdin.write(json.dumps({"jsonrpc": "2.0", **obj}) + "\\n")
        mcp.stdin.flush()
        if "id" in obj:
            return json.loads(mcp.stdout.readline())
    rpc({"id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                                      "clientInfo": {"name": "claude-standin", "version": "0"}}})
    rpc({"method": "notifications/initialized"})
    result = rpc({"id": 2, "method": "tools/call", "params": {"name": "set_status", "arguments": {"text": text}}})
    mcp.stdin.close()
    mcp.wait(timeout=30)
    content = result["result"]["content"]
    emit({"type": "user", "session_id": session, "message": {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_" + turn, "content": content,
         "is_error": bool(result["result"].get("isError"))}]}})
    emit({"type": "assistant", "session_id": session, "message": {"role": "assistant", "content": [
        {"type": "text", "text": "Done."}]}})
    emit({"type": "result", "subtype": "success", "is_error": False, "result": "Done.", "session_id": session,
          "num_turns": 2, "duration_ms": 1, "total_cost_usd": 0})
""")


@pytest.fixture(scope="module")
def claude_hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess({
        REAL: {"runtime": "claude", "model": MODEL, "peers": []},
        STANDIN: {"runtime": "claude", "model": MODEL, "command": [STANDIN_PATH], "peers": []},
        STOPPER: {"runtime": "claude", "model": MODEL, "command": [STANDIN_PATH], "peers": []},
    }))


def turns_done(hive: HiveProcess, name: str, count: int, timeout: float = CLAUDE_TIMEOUT) -> list[dict[str, Any]]:
    """Wait until ``name``'s transcript has ``count`` finished turns; return its entries."""
    def done() -> list[dict[str, Any]] | None:
        entries = assert_ok(hive.host_call("transcript", name=name))["entries"]
        return entries if sum(e["kind"] == "exit" for e in entries) >= count else None

    try:
        return wait_until(done, timeout, f"{count} turns of {name}", interval=0.2)
    except AssertionError as e:
        entries = assert_ok(hive.host_call("transcript", name=name))["entries"]
        raise AssertionError(f"{e}\ntranscript: {json.dumps(entries)[-4000:]}\nlog:\n{hive.log_tail()}") from None


def by_turn(entries: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    turns: dict[int, list[dict[str, Any]]] = {}
    for e in entries:
        turns.setdefault(e["turn"], []).append(e)
    return turns


def test_caged_claude_agent_needs_login_and_shows_its_model(claude_hive: HiveProcess) -> None:
    # needs_login is the harness's report, which comes just after it connects.
    row = wait_until(lambda: (lambda r: r if r["needs_login"] else None)(claude_hive.agent_status()[REAL]),
                     30, "the harness's needs_login report")
    assert (row["running"], row["needs_login"], row["active_model"]) == (True, True, MODEL)
    assert not (claude_hive.home(REAL) / ".claude" / ".credentials.json").exists()


def test_caged_real_cli_reaches_hive_mcp_and_stops_at_login(claude_hive: HiveProcess) -> None:
    proc = claude_hive.exec(REAL, "sh", "-c", "command -v claude && claude --version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].startswith("2."), proc.stdout
    mid = assert_ok(claude_hive.host_call("send", to=REAL, body="Say hello to the operator."))["id"]
    [turn] = by_turn(turns_done(claude_hive, REAL, 1)).values()
    assert turn[0]["kind"] == "input" and turn[0]["data"]["id"] == mid
    events = [e["data"] for e in turn if e["kind"] == "event"]
    assert events, turn
    init = events[0]
    assert (init["type"], init["subtype"], init["cwd"]) == ("system", "init", layout.HOME), init
    assert {s["name"]: s["status"] for s in init["mcp_servers"]} == {"hive": "connected"}, init["mcp_servers"]
    assert set(init["tools"]) >= HIVE_TOOLS
    result = events[-1]
    assert result["type"] == "result" and result["is_error"] is True and "Not logged in" in result["result"]
    exit_entry = turn[-1]
    assert exit_entry["kind"] == "exit" and exit_entry["data"]["exit_status"] == 1, exit_entry
    row = claude_hive.agent_status()[REAL]
    assert (row["needs_login"], row["active_model"]) == (True, MODEL)
    assert assert_ok(claude_hive.host_call("inbox"))["messages"] == []


def test_standin_two_turns_resume_the_session(claude_hive: HiveProcess) -> None:
    assert claude_hive.agent_status()[STANDIN]["needs_login"] is True  # no credentials yet
    write = claude_hive.exec(
        STANDIN, "sh", "-c", f"cat > {STANDIN_PATH} && chmod 755 {STANDIN_PATH}", input=STANDIN_SCRIPT,
    )
    assert write.returncode == 0, write.stderr
    first = assert_ok(claude_hive.host_call("send", to=STANDIN, body="first"))["id"]
    second = assert_ok(claude_hive.host_call("send", to=STANDIN, body="second"))["id"]
    turns = by_turn(turns_done(claude_hive, STANDIN, 2))
    assert len(turns) == 2, turns

    sessions = []
    for (_, entries), mid in zip(sorted(turns.items()), (first, second), strict=True):
        kinds = [e["kind"] for e in entries]
        assert kinds == ["input", "event", "tool_call", "event", "event", "event", "exit"], entries
        assert entries[0]["data"]["id"] == mid
        init, call, tool_result, _, result = (e["data"] for e in entries[1:6])
        assert (init["type"], init["subtype"]) == ("system", "init")
        assert call["message"]["content"][1]["type"] == "tool_use"
        assert call["message"]["content"][1]["name"] == "mcp__hive__set_status"
        block = tool_result["message"]["content"][0]
        assert block["type"] == "tool_result" and block["is_error"] is False, block
        assert wire_time(json.loads(block["content"][0]["text"])["status_set_at"]) > 0  # hive mcp's answer
        assert result["type"] == "result" and result["is_error"] is False
        assert entries[-1]["data"]["exit_status"] == 0
        sessions.append(init["session_id"])
    assert sessions[0] == sessions[1]

    logged = [json.loads(line) for line in (claude_hive.home(STANDIN) / ARGV_LOG).read_text().splitlines()]
    argvs = [entry["argv"] for entry in logged]
    assert len(argvs) == 2
    for entry, mid in zip(logged, (first, second), strict=True):
        argv = entry["argv"]
        # The harness gave the framed prompt on stdin (see ClaudeRuntime.prompt).
        assert argv[0] == "-p" and json.loads(entry["stdin"])["hive_item"]["id"] == mid
        assert argv[argv.index("--append-system-prompt") + 1] == SYSTEM_PROMPT
        assert argv[argv.index("--output-format") + 1] == "stream-json" and "--verbose" in argv
        assert json.loads(argv[argv.index("--mcp-config") + 1]) == {
            "mcpServers": {"hive": {"command": "/opt/hive/bin/hive", "args": ["mcp"]}}
        }
        assert argv[argv.index("--allowedTools") + 1] == "mcp__hive"
        assert argv[argv.index("--model") + 1] == MODEL
    assert "--resume" not in argvs[0]
    assert argv_resume(argvs[1]) == sessions[0]

    # The tool calls reached the hive: the last one set the status line.
    def settled() -> dict[str, Any] | None:
        row = claude_hive.agent_status()[STANDIN]
        return row if row["needs_login"] is False else None

    row = wait_until(settled, 20, "needs_login to become false after a successful result")
    assert row["status_text"] == f"standin turn for hive message {second}"
    assert row["active_model"] == MODEL


# A turn that names another model and ends with no result (so the harness probes the login
# again), leaving a setsid'd process of the runtime uid that SIGSTOPs every process of that
# uid it may signal: the login probe the harness spawns next among them.
STOPPER_SCRIPT = textwrap.dedent("""\
    #!/usr/bin/python3
    import json, os, signal, subprocess, sys

    sys.stdin.read()
    if os.environ.get("STOPPER_PARENT"):
        parent = int(os.environ["STOPPER_PARENT"])
        relay = int(os.environ["STOPPER_RELAY"])
        os.write(1, b"ready")
        os.close(1)
        while os.getppid() == parent:  # until the turn's own process has exited
            pass
        # and its relay (the turn's end): stopped earlier, the relay (of this uid) keeps
        # the turn to its time-out, as a runtime that never exits would
        while os.path.exists(f"/proc/{relay}"):
            pass
        while True:  # flat out: the probe (a shell's `test`) lives a millisecond or two
            os.kill(-1, signal.SIGSTOP)
    print(json.dumps({"type": "system", "subtype": "init", "session_id": "s-stop", "model": "stopper-model"}),
          flush=True)
    child = subprocess.Popen([sys.argv[0]], env={**os.environ, "STOPPER_PARENT": str(os.getpid()),
                                                 "STOPPER_RELAY": str(os.getppid())},
                             start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    child.stdout.read()  # it is ready
""")


def test_a_login_probe_stopped_by_the_runtime_is_killed_not_left_behind(claude_hive: HiveProcess) -> None:
    """The harness waits LOGIN_PROBE_WAIT (10 s) for its login probe, then reports
    needs_login and kills it (init's kill: its group and every runtime-uid process). Before,
    a probe a runtime process kept stopped stayed in the cage, stopped, for good."""
    write = claude_hive.exec(
        STOPPER, "sh", "-c", f"cat > {STANDIN_PATH} && chmod 755 {STANDIN_PATH}", input=STOPPER_SCRIPT,
    )
    assert write.returncode == 0, write.stderr
    runtime_uid = claude_hive.cage(STOPPER)["uid"]

    def runtime_procs() -> list[tuple[int, str, list[str]]]:
        found = []
        for pid in claude_hive.cage_procs(STOPPER):
            try:
                state = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("State:"))
                if proc_uid(pid) == runtime_uid:
                    found.append((pid, state.split()[1], proc_cmdline(pid)))
            except (OSError, StopIteration):
                continue  # gone meanwhile
        return found

    assert_ok(claude_hive.host_call("send", to=STOPPER, body="stop what comes next"))
    row = wait_until(
        lambda: (lambda r: r if r["active_model"] == "stopper-model" else None)(claude_hive.agent_status()[STOPPER]),
        40, "the harness's report after the probe's wait",
    )
    assert row["needs_login"] is True
    seen = runtime_procs()
    print(f"\nat the report: runtime-uid processes in the cage {seen}")
    # Killed before the report; a moment for init to reap them (a stopped probe stays).
    wait_until(lambda: runtime_procs() == [], 3, f"no runtime-uid process left: {runtime_procs()}")

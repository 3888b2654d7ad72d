"""``hive mcp``: the agent verbs as an MCP stdio tool server (official ``mcp`` SDK).

It runs inside the cage next to the agent's runtime (e.g. Claude Code) and
talks to ``/run/hive/agent.sock`` (``$HIVE_SOCKET``): the socket is the
identity, so no tool takes a sender."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from mcp.server.fastmcp import FastMCP
from mcp.server.fastmcp.exceptions import ToolError

from hyperhive.client import Client, HiveUnavailable

DEFAULT_AGENT_SOCK = "/run/hive/agent.sock"

# Every agent verb (wire/agent.py) is either served as a tool (TOOL_VERBS) or named in
# NOT_TOOLS with the reason; tests/test_consistency.py holds both tables to the verbs and
# to the tools build_server registers (and to the verb each tool sends).
TOOL_VERBS: dict[str, str] = {  # MCP tool name -> the agent verb it calls
    "whoami": "whoami",
    "peers": "peers",
    "send_message": "send",
    "ask": "ask",
    "answer": "answer",
    "request_approval": "request_approval",
    "set_status": "set_status",
    "remind": "remind",
    "loose_ends": "loose_ends",
}
NOT_TOOLS: dict[str, str] = {  # agent verb -> why no tool serves it
    "recv": (
        "messages reach the runtime as turns: the harness takes each one from the same inbox "
        "(turn_next) and hands it over as the prompt; a tool that received would take "
        "messages out of the turn loop"
    ),
    "ack": (
        "the harness acks a message once the turn it started has ended; a runtime that acked "
        "would drop messages the turn loop holds, or was never given"
    ),
}


def build_server(socket_path: Path) -> FastMCP:
    server = FastMCP(
        "hive",
        instructions=(
            "Tools of the hive this agent runs in. Message peers or the operator, ask questions, "
            "request the operator's approval, set your status line and schedule reminders. "
            "Replies and answers arrive as new messages (new turns)."
        ),
    )

    def call(cmd: str, **fields: Any) -> dict[str, Any]:
        try:
            with Client(socket_path) as c:
                reply = c.call(cmd, **{k: v for k, v in fields.items() if v is not None})
        except HiveUnavailable as e:
            raise ToolError(str(e)) from None
        if not reply.get("ok"):
            raise ToolError(str(reply.get("error")))
        reply.pop("version", None)
        reply.pop("ok", None)
        return reply

    @server.tool()
    def whoami() -> dict[str, Any]:
        """This agent's name (and its parent, if it was spawned)."""
        return call("whoami")

    @server.tool()
    def peers() -> dict[str, Any]:
        """The agents this one may message and ask.
        The operator is always reachable as "operator"."""
        return call("peers")

    @server.tool()
    def send_message(to: str, body: str) -> dict[str, Any]:
        """Send a message to a peer agent or to "operator"."""
        return call("send", to=to, body=body)

    @server.tool()
    def ask(to: str, question: str, options: list[str] | None = None) -> dict[str, Any]:
        """Ask a peer or "operator" a question;
        the answer arrives later as a message with ref = the question id."""
        return call("ask", to=to, question=question, options=options)

    @server.tool()
    def answer(question_id: int, answer: str) -> dict[str, Any]:
        """Answer a question that a peer addressed to this agent."""
        return call("answer", id=question_id, answer=answer)

    @server.tool()
    def request_approval(kind: str, description: str, payload: Any = None) -> dict[str, Any]:
        """Ask the operator to approve something. kind "custom": a decision comes back as a message;
        kind "spawn": payload {"name": ..., "spec": {"command": [...], "peers": [...]}}
        creates a helper agent;
        kind "egress": payload {"host": "pypi.org", "port": 443}, or for one method and
        path glob {"host": "api.github.com", "port": 443, "method": "GET",
        "path": "/repos/acme/*"}
        adds that destination to this agent's allowlist."""
        return call("request_approval", kind=kind, description=description, payload=payload)

    @server.tool()
    def set_status(text: str) -> dict[str, Any]:
        """Set this agent's one-line status, shown to the operator."""
        return call("set_status", text=text)

    @server.tool()
    def remind(text: str, in_seconds: float | None = None, at: str | None = None) -> dict[str, Any]:
        """Schedule a reminder message to this agent, in_seconds from now or at an ISO 8601 time."""
        return call("remind", text=text, in_seconds=in_seconds, at=at)

    @server.tool()
    def loose_ends() -> dict[str, Any]:
        """This agent's open questions, pending approvals and questions waiting for its answer."""
        return call("loose_ends")

    return server


def _exit_now(signum: int, frame: object) -> None:
    os._exit(128 + signum)


def serve(sock: Path | None) -> None:
    path = sock or Path(os.environ.get("HIVE_SOCKET") or DEFAULT_AGENT_SOCK)
    server = build_server(path)
    # A client stops its server with SIGINT, then SIGTERM (Claude Code does, 100 ms
    # apart). The SDK reads stdin on a worker thread that a cancelled event loop still
    # waits for, so SIGINT alone would wait for EOF; there is no state to save (every
    # tool call is finished when it answers), so stop at once.
    signal.signal(signal.SIGINT, _exit_now)
    signal.signal(signal.SIGTERM, _exit_now)
    server.run("stdio")

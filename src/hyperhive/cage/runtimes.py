"""Agent runtimes: how one turn runs. A runtime turns an inbox message into an
argv, its stdin and its environment, and its output into transcript entries.
To add one, subclass Runtime and register it in RUNTIMES (and in AgentSpec's
``runtime`` literal: tests/test_consistency.py fails while the two differ)."""

from __future__ import annotations

import json
from typing import Any

from hyperhive.cage import layout


class Runtime:
    """Base: the message as JSON on stdin; stdout/stderr lines become entries."""

    def __init__(self, name: str, spec: dict[str, Any]) -> None:
        self.name = name
        self.spec = spec
        self.needs_login = False
        self.active_model: str | None = spec.get("model")

    def argv(self, message: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def stdin(self, message: dict[str, Any]) -> bytes:
        return json.dumps(message, ensure_ascii=False).encode() + b"\n"

    def env(self, message: dict[str, Any]) -> dict[str, str]:
        return {**layout.base_env(self.name), "HIVE_TURN": str(message["id"])}

    def stdout_entry(self, line: str) -> tuple[str, Any]:
        return "stdout", line

    def login_probe(self) -> list[str] | None:
        """An argv (run as the runtime uid) that exits 0 when the runtime is logged in."""
        return None


class CommandRuntime(Runtime):
    """``command``: the configured argv, run once per turn."""

    def argv(self, message: dict[str, Any]) -> list[str]:
        return list(self.spec["command"])


HIVE_TOOLS = "mcp__hive"  # Claude Code's permission rule for every tool of the MCP server "hive"


class ClaudeRuntime(Runtime):
    """``claude``: Claude Code in print mode, stream-json output, the hive's MCP
    server configured, one session resumed across turns."""

    def __init__(self, name: str, spec: dict[str, Any]) -> None:
        super().__init__(name, spec)
        self.session_id: str | None = None
        self.executable = (spec.get("command") or ["claude"])[0]
        # Set once a turn's result said whether the CLI is logged in; from then on
        # that, not a look at the credentials file, is what needs_login reports.
        self.login_known = False

    def login_probe(self) -> list[str] | None:
        if self.login_known:
            return None
        # Credentials live in the agent's home, which only the runtime uid can read.
        return [
            "/bin/sh",
            "-c",
            'test -s "$HOME/.claude/.credentials.json" || test -n "$ANTHROPIC_API_KEY"',
        ]

    def mcp_config(self) -> str:
        return json.dumps(
            {"mcpServers": {"hive": {"command": f"{layout.BIN}/hive", "args": ["mcp"]}}}
        )

    @staticmethod
    def prompt(message: dict[str, Any]) -> str:
        kind, sender = message.get("kind"), message.get("from")
        head = {
            "message": f"Message from {sender}",
            "question": (
                f"Question {message.get('ref')} from {sender} "
                "(answer it with the hive `answer` tool)"
            ),
            "answer": f"Answer from {sender} to your question {message.get('ref')}",
            "reminder": "Reminder you scheduled",
            "approval": f"The operator's decision on your approval request {message.get('ref')}",
        }.get(str(kind), f"{kind} from {sender}")
        return f"{head} (hive message {message.get('id')}):\n\n{message.get('body')}"

    def argv(self, message: dict[str, Any]) -> list[str]:
        # In print mode nobody can grant a permission, so a tool not allowed up front is
        # denied ("... you haven't granted it yet"): allow every tool of the hive server.
        a = [
            self.executable,
            "-p",
            self.prompt(message),
            "--output-format",
            "stream-json",
            "--verbose",
            "--mcp-config",
            self.mcp_config(),
            "--allowedTools",
            HIVE_TOOLS,
        ]
        if self.spec.get("model"):
            a += ["--model", self.spec["model"]]
        if self.session_id:
            a += ["--resume", self.session_id]
        return a

    def stdin(self, message: dict[str, Any]) -> bytes:
        return b""

    def stdout_entry(self, line: str) -> tuple[str, Any]:
        try:
            event = json.loads(line)
        except ValueError:
            return "stdout", line
        if not isinstance(event, dict):
            return "stdout", line
        if event.get("type") == "system" and event.get("subtype") == "init":
            # (Not apiKeySource: it is "none" for a claude.ai (OAuth) login too.)
            self.session_id = event.get("session_id") or self.session_id
            self.active_model = event.get("model") or self.active_model
        if event.get("type") == "result":
            text = str(event.get("result", ""))
            if event.get("is_error") and ("Not logged in" in text or "/login" in text):
                self.needs_login, self.login_known = True, True
            elif not event.get("is_error"):
                self.needs_login, self.login_known = False, True
            elif any("No conversation found" in str(e) for e in event.get("errors") or []):
                # The session to resume is gone (e.g. ~/.claude was cleared): without
                # this every later turn would fail the same way. Start a new one.
                self.session_id = None
        if event.get("type") == "assistant":
            for block in (event.get("message") or {}).get("content") or []:
                if isinstance(block, dict) and block.get("type") == "tool_use":
                    return "tool_call", event
        return "event", event


RUNTIMES: dict[str, type[Runtime]] = {"command": CommandRuntime, "claude": ClaudeRuntime}

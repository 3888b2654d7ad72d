"""Tables that must agree with each other, checked without running a hive.

- The runtime registry (``cage/runtimes.py`` RUNTIMES) and the ``runtime`` literal of
  AgentSpec (hive.toml and spawn requests) name the same runtimes.
- Every agent verb (``wire/agent.py``) is an MCP tool of ``hive mcp`` or is named in
  ``cli/mcp.py`` NOT_TOOLS with the reason; no tool serves a verb that does not exist,
  and each tool sends the verb its table row says.
- No harness verb (the turn loop's, refused to the runtime's uid) is an MCP tool."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, get_args

import pytest
from mcp.server.fastmcp import FastMCP

from hyperhive.cage.runtimes import RUNTIMES, Runtime
from hyperhive.cli import mcp
from hyperhive.wire.agent import AGENT_VERBS
from hyperhive.wire.common import AgentSpec
from hyperhive.wire.harness import HARNESS_VERBS

# -- runtimes --------------------------------------------------------------------------


def spec_runtimes() -> set[str]:
    return set(get_args(AgentSpec.model_fields["runtime"].annotation))


def test_every_registered_runtime_is_in_the_spec_literal() -> None:
    missing = set(RUNTIMES) - spec_runtimes()
    assert not missing, f"in RUNTIMES but not in AgentSpec.runtime: {sorted(missing)}"


def test_every_runtime_of_the_spec_literal_is_registered() -> None:
    missing = spec_runtimes() - set(RUNTIMES)
    assert not missing, f"in AgentSpec.runtime but not in RUNTIMES: {sorted(missing)}"


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_a_spec_of_each_registered_runtime_is_accepted(runtime: str) -> None:
    assert issubclass(RUNTIMES[runtime], Runtime)
    assert AgentSpec.model_validate({"runtime": runtime, "command": ["true"]}).runtime == runtime


# -- agent verbs and MCP tools ---------------------------------------------------------


class RecordingClient:
    """Stands in for hyperhive.client.Client in cli/mcp.py: records what each call sends."""

    sent: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def __init__(self, path: Path, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> RecordingClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass

    def call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        self.sent.append((cmd, fields))
        return {"version": 1, "ok": True}


def _tools(server: FastMCP) -> dict[str, dict[str, Any]]:
    return {t.name: t.inputSchema for t in asyncio.run(server.list_tools())}


def _example(schema: dict[str, Any]) -> Any:
    """A value of a JSON schema's type; the fake client takes anything."""
    if "anyOf" in schema:
        return _example(next(s for s in schema["anyOf"] if s.get("type") != "null"))
    return {"string": "x", "integer": 1, "number": 1.0, "boolean": True, "array": []}.get(
        schema.get("type", "string"), {}
    )


def _sent_verbs(server: FastMCP, tool: str, schema: dict[str, Any]) -> list[str]:
    """The verbs one call of ``tool`` (with its required arguments) sends to agent.sock."""
    props = schema.get("properties", {})
    args = {name: _example(props[name]) for name in schema.get("required", [])}
    RecordingClient.sent = []
    asyncio.run(server.call_tool(tool, args))
    return [cmd for cmd, _ in RecordingClient.sent]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> FastMCP:
    monkeypatch.setattr(mcp, "Client", RecordingClient)
    return mcp.build_server(Path("/nonexistent/agent.sock"))


def test_every_agent_verb_has_a_tool_or_a_reason() -> None:
    served, refused = set(mcp.TOOL_VERBS.values()), set(mcp.NOT_TOOLS)
    neither = set(AGENT_VERBS) - served - refused
    assert not neither, f"agent verbs with no MCP tool and no reason in NOT_TOOLS: {neither}"
    both = served & refused
    assert not both, f"agent verbs both served as a tool and in NOT_TOOLS: {both}"
    for verb, why in mcp.NOT_TOOLS.items():
        assert why.strip(), f"NOT_TOOLS[{verb!r}] gives no reason"


def test_no_tool_or_reason_for_a_verb_that_does_not_exist() -> None:
    unknown = (set(mcp.TOOL_VERBS.values()) | set(mcp.NOT_TOOLS)) - set(AGENT_VERBS)
    assert not unknown, f"cli/mcp.py names verbs that wire/agent.py does not have: {unknown}"


def test_the_tool_table_is_the_tools_served(server: FastMCP) -> None:
    tools = set(_tools(server))
    assert tools == set(mcp.TOOL_VERBS), (
        f"served but not in TOOL_VERBS: {tools - set(mcp.TOOL_VERBS)}; "
        f"in TOOL_VERBS but not served: {set(mcp.TOOL_VERBS) - tools}"
    )


def test_each_tool_sends_the_verb_of_its_row(server: FastMCP) -> None:
    for tool, schema in _tools(server).items():
        assert _sent_verbs(server, tool, schema) == [mcp.TOOL_VERBS[tool]], tool


def test_no_harness_verb_is_a_tool(server: FastMCP) -> None:
    tools = _tools(server)
    assert not set(tools) & HARNESS_VERBS, "a harness verb's name is an MCP tool"
    assert not set(mcp.TOOL_VERBS.values()) & HARNESS_VERBS
    sent = {verb for tool, schema in tools.items() for verb in _sent_verbs(server, tool, schema)}
    assert not sent & HARNESS_VERBS, f"MCP tools send harness verbs: {sent & HARNESS_VERBS}"

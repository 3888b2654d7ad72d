"""``hive``: the operator's command line (see ``hive --help``)."""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from hyperhive import __version__
from hyperhive.paths import DEFAULT_RUN_DIR

# Each verb's module, imported when the verb is run (or --help lists them all): `hive
# agent ...` (what an agent runs in its cage) and `hive exec` loaded every verb's code
# (the operator's tables and TUI, `hive up`'s gateway templates): ~0.4 s of CPU more per
# call, twice what they need. The operator's flat verbs (operator.register) come with
# any name not found here.
LAZY_VERBS: dict[str, tuple[str, str]] = {
    "up": ("hyperhive.cli.up", "up"),
    "reset": ("hyperhive.cli.reset", "reset"),
    "core-id": ("hyperhive.cli.core_identity", "core_id"),
    "agent": ("hyperhive.cli.agent", "agent_group"),
    "exec": ("hyperhive.cli.exec_", "exec_cmd"),
    "egress": ("hyperhive.cli.egress", "egress_group"),
    "swarm": ("hyperhive.cli.swarm", "swarm_group"),
    "secret": ("hyperhive.cli.secret", "secret_group"),
}


class LazyGroup(click.Group):
    """A group whose verbs are imported on first use (click's lazy-loading pattern)."""

    _operator_loaded = False

    def _load_operator(self) -> None:
        if not self._operator_loaded:
            from hyperhive.cli import operator

            operator.register(self)
            self._operator_loaded = True

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if cmd_name in LAZY_VERBS:
            module, attr = LAZY_VERBS[cmd_name]
            cmd = getattr(importlib.import_module(module), attr)
            assert isinstance(cmd, click.Command) and cmd.name == cmd_name, (cmd_name, cmd)
            self.add_command(cmd)
            return cmd
        self._load_operator()
        return self.commands.get(cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_operator()
        for name in LAZY_VERBS:
            self.get_command(ctx, name)
        return sorted(self.commands)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_RUN_DIR,
    show_default=True,
    envvar="HIVE_RUN_DIR",
    help="Where the hive's sockets are.",
)
@click.version_option(__version__, prog_name="hive")
@click.pass_context
def cli(ctx: click.Context, run_dir: Path) -> None:
    """hyperhive: run a swarm of AI agents, each in its own cage, and stay in charge.

    `hive up` runs the hive; the other verbs talk to it over host.sock
    (root or group hive-admin). Every verb takes --json.
    """
    ctx.ensure_object(dict)
    ctx.obj["run_dir"] = run_dir


@cli.command("mcp")
@click.option(
    "--socket",
    "sock",
    type=click.Path(path_type=Path),
    help="The agent socket (default $HIVE_SOCKET or /run/hive/agent.sock).",
)
def mcp_cmd(sock: Path | None) -> None:
    """Serve the agent verbs as MCP tools on stdio (for Claude Code and other MCP clients)."""
    from hyperhive.cli.mcp import serve  # the MCP SDK is heavy; load it only here

    serve(sock)


def main() -> None:
    cli(prog_name="hive")

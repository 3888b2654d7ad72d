"""``hive``: the operator's command line (see ``hive --help``)."""

from __future__ import annotations

from pathlib import Path

import click

from hyperhive import __version__
from hyperhive.cli import operator
from hyperhive.cli.agent import agent_group
from hyperhive.cli.egress import egress_group
from hyperhive.cli.exec_ import exec_cmd
from hyperhive.cli.reset import reset
from hyperhive.cli.secret import secret_group
from hyperhive.cli.swarm import swarm_group
from hyperhive.cli.up import up
from hyperhive.paths import DEFAULT_RUN_DIR


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


operator.register(cli)
cli.add_command(up)
cli.add_command(reset)
cli.add_command(agent_group)
cli.add_command(exec_cmd)
cli.add_command(egress_group)
cli.add_command(swarm_group)
cli.add_command(secret_group)


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

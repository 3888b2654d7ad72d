"""``hive exec NAME -- CMD...``: run a command inside an agent's cage, as the agent.

hive-priv does it (root only): it enters the cage's namespaces and cgroup and
becomes the agent's uid with no capabilities and no_new_privs, so this is never
a wider sandbox than the agent's own. Our stdin/stdout/stderr are passed to it
as file descriptors, and its exit status becomes ours."""

from __future__ import annotations

import os
from pathlib import Path

import click

from hyperhive.client import priv_call


@click.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--env", "env", multiple=True, help="KEY=VALUE to set in the command's environment (repeatable).")
@click.pass_context
def exec_cmd(ctx: click.Context, name: str, argv: tuple[str, ...], env: tuple[str, ...]) -> None:
    """Run ARGV in agent NAME's cage as the agent (root only); e.g. hive exec alice -- ls -la."""
    priv_sock: Path = ctx.obj["run_dir"] / "priv.sock"
    environment = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.ClickException(f"--env {item!r}: expected KEY=VALUE")
        environment[key] = value
    request = {"cmd": "exec", "name": name, "argv": list(argv), "env": environment}
    try:
        reply = priv_call(str(priv_sock), request, fds=[0, 1, 2], timeout=None)
    except PermissionError:
        raise click.ClickException(f"hive exec needs root (permission denied on {priv_sock})") from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise click.ClickException(f"the hive is not running: can't connect to {priv_sock}") from None
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("error")))
    os._exit(int(reply["exit_status"]))

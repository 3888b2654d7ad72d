"""``hive secret``: the operator's credentials, kept by the hive outside every cage.
A value is read from stdin or ``--file``, never from argv (which other users see in
``ps``), and never printed back."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from hyperhive.cli.output import fail, json_option, request, say, table, when

MAX_INPUT = 16 * 1024 + 2


def _host_sock(ctx: click.Context) -> Path:
    return ctx.obj["run_dir"] / "host.sock"


@click.group("secret")
def secret_group() -> None:
    """Secrets (API keys, tokens) that agents use without holding them: the egress proxy
    puts one in a bound header on requests to its one destination; the cage sees a
    placeholder."""


@secret_group.command("set")
@json_option
@click.argument("name")
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the value from this file (else from stdin).",
)
@click.pass_context
def set_(ctx: click.Context, as_json: bool, name: str, path: Path | None) -> None:
    """Keep a value as secret NAME (from stdin or --file; one trailing newline dropped).

    \b
    Example:  printf %s "$ANTHROPIC_API_KEY" | hive secret set anthropic
    """
    if path is None and sys.stdin.isatty():
        value = str(click.prompt("value (not echoed)", hide_input=True, err=True))
    else:
        raw = path.read_bytes()[:MAX_INPUT] if path else sys.stdin.buffer.read(MAX_INPUT)
        try:
            value = raw.decode("ascii")
        except UnicodeDecodeError:
            fail("the secret's value must be printable ASCII")
            sys.exit(1)
    resp = request(_host_sock(ctx), "secret_set", as_json, name=name, value=value)
    if not as_json:
        say(f"secret {name} {'set' if resp['new'] else 'replaced'}")


@secret_group.command("ls")
@json_option
@click.pass_context
def ls(ctx: click.Context, as_json: bool) -> None:
    """Every secret: its name, when it was set and its bindings (never its value)."""
    resp = request(_host_sock(ctx), "secret_ls", as_json)
    if not as_json:
        rows = []
        for s in resp["secrets"]:
            set_at = when(s["set_at"]) if s["set"] else "NOT SET"
            if not s["bindings"]:
                rows.append([s["name"], set_at, "", "", "", ""])
            for b in s["bindings"]:
                rows.append([s["name"], set_at, b["agent"], b["to"], b["header"], b.get("env", "")])
        table("secrets", ["name", "set", "agent", "to", "header", "env"], rows)


@secret_group.command("rm")
@json_option
@click.argument("name")
@click.pass_context
def rm(ctx: click.Context, as_json: bool, name: str) -> None:
    """Forget secret NAME (its bindings stay, and inject nothing until it is set again)."""
    request(_host_sock(ctx), "secret_rm", as_json, name=name)
    if not as_json:
        say(f"secret {name} removed")


@secret_group.command("bind")
@json_option
@click.argument("name")
@click.option("--agent", "agents", multiple=True, required=True, help="An agent (repeatable).")
@click.option("--to", "to", required=True, help="The one destination, NAME:PORT.")
@click.option(
    "--header",
    required=True,
    help="Where the secret goes: 'x-api-key: {}', 'Authorization: Bearer {}'.",
)
@click.option("--env", default=None, help="The cage's variable that holds the placeholder.")
@click.pass_context
def bind(
    ctx: click.Context,
    as_json: bool,
    name: str,
    agents: tuple[str, ...],
    to: str,
    header: str,
    env: str | None,
) -> None:
    """Bind secret NAME for --agent(s) to one destination and header.

    \b
    Example:  hive secret bind anthropic --agent alice --to api.anthropic.com:443 \\
                --header 'x-api-key: {}' --env ANTHROPIC_API_KEY
    The proxy uses it at once; the placeholder is in the cage's env from its next start.
    """
    resp = request(
        _host_sock(ctx), "secret_bind", as_json, name=name, agents=list(agents), to=to,
        header=header, env=env,
    )  # fmt: skip
    if not as_json:
        say(f"secret {name} bound for {', '.join(resp['agents'])} to {resp['to']}")


@secret_group.command("unbind")
@json_option
@click.argument("name")
@click.option("--agent", "agents", multiple=True, help="An agent (repeatable); none: all.")
@click.pass_context
def unbind(ctx: click.Context, as_json: bool, name: str, agents: tuple[str, ...]) -> None:
    """Remove secret NAME's bindings (for --agent(s), or all of them)."""
    resp = request(_host_sock(ctx), "secret_unbind", as_json, name=name, agents=list(agents))
    if not as_json:
        say(f"secret {name}: {resp['removed']} binding(s) removed")

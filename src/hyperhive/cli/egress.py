"""``hive egress``: the operator's view of, and hand on, every agent's egress allowlist."""

from __future__ import annotations

from pathlib import Path

import click

from hyperhive.cli.output import json_option, paged, request, say, table, when


def _host_sock(ctx: click.Context) -> Path:
    return ctx.obj["run_dir"] / "host.sock"


@click.group("egress")
def egress_group() -> None:
    """Egress allowlists (HOST:PORT rules: name, *.wildcard, IP or CIDR) and the proxy's log."""


@egress_group.command("ls")
@json_option
@click.argument("name", required=False)
@click.pass_context
def ls(ctx: click.Context, as_json: bool, name: str | None) -> None:
    """Every agent's rules (or agent NAME's), with where each came from."""
    resp = request(_host_sock(ctx), "egress_rules", as_json, name=name)
    if not as_json:
        table(
            "egress rules",
            ["agent", "rule", "source", "added"],
            (
                [agent, r["rule"], r["source"], when(r["added_at"])]
                for agent, rules in resp["rules"].items()
                for r in rules
            ),
        )


@egress_group.command("allow")
@json_option
@click.argument("name")
@click.argument("rule")
@click.pass_context
def allow(ctx: click.Context, as_json: bool, name: str, rule: str) -> None:
    """Let agent NAME reach RULE (e.g. pypi.org:443, *.pypi.org:443, 198.18.0.0/15:80), at once."""
    resp = request(_host_sock(ctx), "egress_allow", as_json, name=name, rule=rule)
    if not as_json:
        say(f"{name}: {resp['rule']} {'allowed' if resp['added'] else 'was already allowed'}")


@egress_group.command("rm")
@json_option
@click.argument("name")
@click.argument("rule")
@click.pass_context
def rm(ctx: click.Context, as_json: bool, name: str, rule: str) -> None:
    """Take RULE away from agent NAME, at once (a hive.toml rule returns on the next restart)."""
    resp = request(_host_sock(ctx), "egress_remove", as_json, name=name, rule=rule)
    if not as_json:
        say(f"{name}: {resp['rule']} removed")


@egress_group.command("log")
@json_option
@click.argument("name", required=False)
@click.option("--limit", type=click.IntRange(1, 5000), default=50, show_default=True)
@click.pass_context
def log(ctx: click.Context, as_json: bool, name: str | None, limit: int) -> None:
    """The proxy's decisions, newest first: agent, destination, allowed or refused, bytes."""
    resp = paged(
        _host_sock(ctx), "egress_log", as_json, "entries", "before", ("limit", limit), name=name
    )
    if not as_json:
        table(
            "egress log",
            ["at", "agent", "destination", "address", "decision", "reason", "up", "down"],
            (
                ["", "", "", "", "", f"decision {e['id']} unreadable: {e['unreadable']}", "", ""]
                if "unreadable" in e
                else [
                    when(e["at"]),
                    e["agent"],
                    f"{e['host']}:{e['port']}",
                    e["address"],
                    "allowed" if e["allowed"] else "REFUSED",
                    e["reason"],
                    e["bytes_up"],
                    e["bytes_down"],
                ]
                for e in resp["entries"]
            ),
        )

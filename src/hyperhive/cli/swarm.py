"""``hive swarm``: this host's view of the swarm of hives (docs/swarm.md)."""

from __future__ import annotations

from pathlib import Path

import click

from hyperhive.cli.output import json_option, request, say, table


def _host_sock(ctx: click.Context) -> Path:
    return ctx.obj["run_dir"] / "host.sock"


def _yn(flag: object) -> str:
    return "yes" if flag else "no"


@click.group("swarm")
def swarm_group() -> None:
    """The swarm: several hives as one over NATS JetStream ([swarm] in hive.toml)."""


@swarm_group.command("status")
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """This host, whether the bus answers, the hosts in the roster and their agents,
    and the messages waiting in this host's outbox."""
    resp = request(_host_sock(ctx), "swarm_status", as_json)
    if as_json:
        return
    sw = resp.get("swarm")
    if sw is None:
        say("not in a swarm (no [swarm] in hive.toml)")
        return
    bus = f"connected to {sw['server']}" if sw["connected"] else "unreachable"
    say(f"host {sw['host']}: bus {bus}; roster {sw['roster']} agents")
    if sw["connected"] and sw.get("roster_bucket") is False:
        say(f"no roster bucket HIVE_ROSTER_{sw['host']} on the bus yet: as the admin, render the"
            " nodes' configs again (python -m hyperhive.swarm.natsconf), restart them one at a"
            " time and run ensure_streams (docs/swarm.md, Upgrading)")  # fmt: skip
    say(f"outbox: {sw['outbox_unsent']} waiting, {sw['outbox_sent']} sent; "
        f"received {sw['received']}, dropped {sw['dropped']}")  # fmt: skip
    if sw.get("waiting"):
        say(f"messages waiting for room here (storage bounds): from {', '.join(sw['waiting'])}")
    if sw.get("full"):
        say(f"messages to {', '.join(sw['full'])} wait here: that host has not read the"
            " last of ours on the bus (48 bundles)")  # fmt: skip
    if sw.get("restarts"):
        loops = ", ".join(f"{name} {n}x" for name, n in sw["restarts"].items())
        say(f"loops started again after a failure (see hive-core's log): {loops}")
    if sw.get("held"):
        say(f"names held here, no agent (another host claimed them while they were this"
            f" host's): {', '.join(sw['held'])}")  # fmt: skip
    table(
        "hosts",
        ["host", "agents", "reachable"],
        ([h["host"], h["agents"], _yn(h.get("reachable"))] for h in sw["hosts"]),
    )
    say(f"operator key (pin it on the hosts that obey this one): {sw['operator_key']}")
    say(f"obeys the operator of: {', '.join(sw['operators']) or 'no other host'}; actions"
        f" applied {sw['actions_applied']}, refused {sw['actions_refused']},"
        f" delivered again after a crash {sw.get('actions_recovered', 0)}")  # fmt: skip
    table(
        "questions to the operator",
        ["host", "id", "from", "question"],
        ([q["host"], q["id"], q.get("asker") or "", q["question"]] for q in sw["questions"]),
    )
    table(
        "pending approvals",
        ["host", "id", "agent", "kind", "description", "sha256"],
        (
            [a["host"], a["id"], a.get("agent") or "", a["kind"], a["description"],
             a["payload_sha256"]]
            for a in sw["approvals"]
        ),
    )  # fmt: skip
    table(
        "roster",
        ["agent", "host", "running", "reachable", "status"],
        (
            [
                a["name"],
                a["host"],
                _yn(a.get("running")),
                _yn(a.get("reachable")),
                a.get("status_text") or "",
            ]
            for a in sw.get("agents", [])
        ),
    )

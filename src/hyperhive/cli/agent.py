"""``hive agent <verb>``: the agent verbs for scripts and people inside a cage.

The socket is the identity: this talks to ``$HIVE_SOCKET`` (default
``/run/hive/agent.sock``, the only hive socket a cage has) and names no one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from hyperhive.cli.output import (
    FiniteRange,
    fail,
    json_option,
    print_messages,
    report,
    request,
    say,
    table,
    when,
)
from hyperhive.client import Client, HiveUnavailable

DEFAULT_AGENT_SOCK = Path("/run/hive/agent.sock")


@click.group("agent")
@click.option(
    "--socket",
    "sock",
    type=click.Path(path_type=Path),
    help="The agent socket (default $HIVE_SOCKET or /run/hive/agent.sock).",
)
@click.pass_context
def agent_group(ctx: click.Context, sock: Path | None) -> None:
    """Agent verbs over this cage's agent.sock."""
    ctx.ensure_object(dict)
    ctx.obj["agent_sock"] = sock or Path(os.environ.get("HIVE_SOCKET") or DEFAULT_AGENT_SOCK)


def _sock(ctx: click.Context) -> Path:
    return ctx.obj["agent_sock"]


@agent_group.command()
@json_option
@click.pass_context
def whoami(ctx: click.Context, as_json: bool) -> None:
    """This agent's name."""
    resp = request(_sock(ctx), "whoami", as_json)
    if not as_json:
        say(resp["name"])


@agent_group.command()
@json_option
@click.pass_context
def peers(ctx: click.Context, as_json: bool) -> None:
    """Agents this one may message (the operator always)."""
    resp = request(_sock(ctx), "peers", as_json)
    if not as_json:
        for p in resp["peers"]:
            say(p)


@agent_group.command()
@json_option
@click.argument("to")
@click.argument("body")
@click.pass_context
def send(ctx: click.Context, as_json: bool, to: str, body: str) -> None:
    """Send BODY to a peer or to "operator"."""
    resp = request(_sock(ctx), "send", as_json, to=to, body=body)
    if not as_json:
        say(f"sent message {resp['id']} to {to}")


@agent_group.command()
@json_option
@click.option(
    "--wait", type=FiniteRange(0, 3600), default=0, help="Seconds to wait for a message (0–3600)."
)
@click.option("--max", "max_", type=int, default=100)
@click.option("--ack", is_flag=True, help="Acknowledge what was received.")
@click.pass_context
def recv(ctx: click.Context, as_json: bool, wait: float, max_: int, ack: bool) -> None:
    """Receive messages (unacknowledged ones come back on the next connection)."""
    path = _sock(ctx)
    try:
        # recv and ack on one connection: what this connection received is what it may ack.
        with Client(path, timeout=wait + 30) as c:
            resp = c.call("recv", wait=wait, max=max_)
            if resp.get("ok") and ack and resp["messages"]:
                acked = c.call("ack", ids=[m["id"] for m in resp["messages"]])
                if not acked.get("ok"):
                    resp = acked  # not acked: they come back; say so rather than print them as done
    except HiveUnavailable as e:
        fail(str(e))
    except (ConnectionError, TimeoutError) as e:
        fail(f"{path}: {e}")
    report(resp, as_json)
    if not as_json:
        print_messages(resp["messages"])
        if resp.get("more"):
            say("more messages are waiting: receive again" + (" (these are acked)" if ack else ""))


@agent_group.command()
@json_option
@click.argument("ids", nargs=-1, type=int, required=True)
@click.pass_context
def ack(ctx: click.Context, as_json: bool, ids: tuple[int, ...]) -> None:
    """Acknowledge messages IDS."""
    resp = request(_sock(ctx), "ack", as_json, ids=list(ids))
    if not as_json:
        say(f"acked {resp['acked']}")


@agent_group.command()
@json_option
@click.argument("to")
@click.argument("question")
@click.option("--option", "options", multiple=True, help="A suggested answer (repeatable).")
@click.pass_context
def ask(
    ctx: click.Context, as_json: bool, to: str, question: str, options: tuple[str, ...]
) -> None:
    """Ask a peer or "operator" a QUESTION; the answer arrives as a message."""
    resp = request(
        _sock(ctx), "ask", as_json, to=to, question=question, options=list(options) or None
    )
    if not as_json:
        say(f"question {resp['id']} asked")


@agent_group.command()
@json_option
@click.argument("question_id", type=int)
@click.argument("answer")
@click.pass_context
def answer(ctx: click.Context, as_json: bool, question_id: int, answer: str) -> None:
    """Answer a question a peer addressed to this agent."""
    request(_sock(ctx), "answer", as_json, id=question_id, answer=answer)
    if not as_json:
        say(f"answered question {question_id}")


@agent_group.command("request-approval")
@json_option
@click.argument("kind", type=click.Choice(["custom", "spawn", "egress"]))
@click.argument("description")
@click.option(
    "--payload",
    default="null",
    help=(
        'The payload as JSON (spawn: {"name": ..., "spec": {...}}; '
        'egress: {"host": ..., "port": ...[, "method": "GET", "path": "/x/*"]}).'
    ),
)
@click.pass_context
def request_approval(
    ctx: click.Context, as_json: bool, kind: str, description: str, payload: str
) -> None:
    """Ask the operator to approve something."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as e:
        fail(f"--payload is not valid JSON: {e}")
    resp = request(
        _sock(ctx), "request_approval", as_json, kind=kind, description=description, payload=data
    )
    if not as_json:
        say(f"approval {resp['id']} requested (payload sha256 {resp['payload_sha256']})")


@agent_group.command("status")
@json_option
@click.argument("text")
@click.pass_context
def set_status(ctx: click.Context, as_json: bool, text: str) -> None:
    """Set this agent's status line."""
    request(_sock(ctx), "set_status", as_json, text=text)
    if not as_json:
        say("status set")


@agent_group.command()
@json_option
@click.option(
    "--in",
    "in_seconds",
    type=FiniteRange(0, 31_622_400, min_open=True),
    help="Seconds from now (at most 366 days).",
)
@click.option("--at", help="An ISO 8601 time with timezone.")
@click.argument("text")
@click.pass_context
def remind(
    ctx: click.Context, as_json: bool, in_seconds: float | None, at: str | None, text: str
) -> None:
    """Schedule a reminder message to this agent."""
    resp = request(_sock(ctx), "remind", as_json, in_seconds=in_seconds, at=at, text=text)
    if not as_json:
        say(f"reminder {resp['id']} due {when(resp['due_at'])}")


@agent_group.command("loose-ends")
@json_option
@click.pass_context
def loose_ends(ctx: click.Context, as_json: bool) -> None:
    """This agent's open questions and pending approvals."""
    resp = request(_sock(ctx), "loose_ends", as_json)
    if not as_json:
        table(
            "open questions",
            ["id", "to", "question"],
            (
                [q["id"], q.get("to", ""), q.get("question", q.get("unreadable"))]
                for q in resp["questions"]
            ),
        )
        table(
            "pending approvals",
            ["id", "kind", "description"],
            (
                [a["id"], a.get("kind", ""), a.get("description", a.get("unreadable"))]
                for a in resp["approvals"]
            ),
        )
        table(
            "questions to answer",
            ["id", "from", "question"],
            (
                [q["id"], q.get("asker", ""), q.get("question", q.get("unreadable"))]
                for q in resp["to_answer"]
            ),
        )
        if resp.get("more"):  # one reply's byte budget was full; the rest comes by cursor
            say("more loose ends follow: ask loose_ends with questions_after, approvals_after,")
            say("to_answer_after = the last id of each list above")

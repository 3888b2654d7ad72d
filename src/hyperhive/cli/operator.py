"""Operator verbs over ``host.sock``: ``hive ls``, ``hive approve 3``, …"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from hyperhive.cli.event_lines import event_line
from hyperhive.cli.output import (
    FiniteRange,
    fail,
    json_option,
    paged,
    print_messages,
    request,
    say,
    stream,
    table,
    when,
)
from hyperhive.display import dumps, left_to_right_json_text, visible, visible_json_text
from hyperhive.wire.host import EVENT_KINDS

F = TypeVar("F", bound=Callable[..., Any])
# `hive inbox`'s page: a full inbox of 1 MiB messages is a gigabyte; a page is what a
# person reads (it was 1000, which took more than 10 s to print).
INBOX_PAGE = 50
ALL_ROWS = 1 << 62  # --all: no count; the batches stop when the hive says no `more`


def host_sock(ctx: click.Context) -> Path:
    return ctx.obj["run_dir"] / "host.sock"


def _yn(flag: bool) -> str:
    return "yes" if flag else ""


def _state(a: dict[str, Any]) -> str:
    if a.get("failed"):
        return "failed"
    if a.get("needs_login"):
        return "needs-login"
    if not a["running"]:
        return "stopped"
    return "paused" if a.get("paused") else "running"


def page_options(fn: F) -> F:
    fn = click.option("--all", "every", is_flag=True, help="Every page, not only one.")(fn)
    fn = click.option(
        "--limit", type=click.IntRange(1, 200), default=50, show_default=True, help="Rows a page."
    )(fn)
    return click.option("--after", type=click.IntRange(0), default=0, help="Rows after this id.")(
        fn
    )


def pages(
    path: Path, cmd: str, as_json: bool, after: int, limit: int, every: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One page of listing ``cmd`` after ``after`` (or, with ``every``, each page in turn:
    --json prints each reply); its rows and the last reply."""
    key = "approvals" if cmd == "pending" else cmd
    rows: list[dict[str, Any]] = []
    swarm: dict[str, Any] = {}  # the other hosts' rows come with the first page
    while True:
        reply = request(path, cmd, as_json, after=after, limit=limit)
        swarm = swarm or {k: v for k, v in reply.items() if k.startswith("swarm_")}
        page = reply[key]
        rows.extend(page)
        if not (every and reply.get("more") and page):
            return rows, {**reply, **swarm}
        after = max(r["id"] for r in page if type(r.get("id")) is int)


def host_option(fn: F) -> F:
    return click.option(
        "--host",
        help="The swarm host the agent is on (docs/swarm.md): the action is signed and"
        " carried there. Default: this host.",
    )(fn)


INCARNATION_HELP = (
    "The agent's incarnation to act on: its created_at, as `hive status` and its --json show"
    " it (agent_statuses, swarm_agents). Refused, nothing done, if the agent was destroyed"
    " and spawned again since. With --host and none given, the one this host's roster shows"
    " (the reply's created_at, with --json; `destroy` asks about the one it looked up and"
    " binds it)."
)


def incarnation_option(fn: F) -> F:
    return click.option("--created-at", "created_at", type=FiniteRange(0), help=INCARNATION_HELP)(
        fn
    )


def incarnations_option(fn: F) -> F:
    return click.option(
        "--created-at",
        "created_at",
        type=FiniteRange(0),
        multiple=True,
        help=INCARNATION_HELP + " One for each NAME, in order.",
    )(fn)


def bound_names(names: tuple[str, ...], created_at: tuple[float, ...]) -> dict[str, float] | None:
    """``--created-at`` of ``start``/``stop``: one for each NAME, in order (none: unbound)."""
    if not created_at:
        return None
    if len(created_at) != len(names):
        fail(f"{len(created_at)} --created-at for {len(names)} NAMES: give one for each NAME")
    return dict(zip(names, created_at, strict=True))


def roster_row(ctx: click.Context, host: str, name: str) -> dict[str, Any] | None:
    """Agent ``name``'s row on swarm host ``host`` as this host's roster shows it (what
    ``hive status`` lists): the incarnation a prompt shows is the one acted on."""
    rows = request(host_sock(ctx), "agent_status", False).get("swarm_agents") or []
    return next((r for r in rows if r.get("host") == host and r.get("name") == name), None)


def created(created_at: float) -> str:
    """``created <local time>, `` for a person, or nothing: another host's row says its
    agent's created_at, any finite number ≥ 0 (1e300 is no time a date can show)."""
    try:
        return f"created {when(created_at)}, "
    except (OverflowError, ValueError, OSError):
        return ""


def carried(resp: dict[str, Any], what: str) -> str:
    """What became of an action carried to another host."""
    if resp.get("applied"):
        return f"{what}: applied on host {resp['host']}"
    return (
        f"{what}: carried to host {resp['host']} (action {resp['action']}), not applied yet;"
        " it is applied when that host takes it, or refused as too old after 5 minutes"
    )


def cut_note(row: dict[str, Any], field: str, what: str) -> str:
    """The marker for a field a listing cut: how long it is, and how to see it whole."""
    full = (row.get("truncated") or {}).get(field)
    if full is None:
        return ""
    return f" … [cut: {full} bytes in all; hive show {what} {row['id']}]"


def _granted(approval: dict[str, Any]) -> str:
    """What approving gives, worked out by the hive from the whole payload (a spawn's
    ``grants``, an egress request's ``allows``), on a line of its own above the payload,
    which a listing cuts (re-check of session 20: a long ``command`` hid it here)."""
    for field in ("grants", "allows"):
        if approval.get(field):
            return f"{field}: {approval[field]}\n"
    return ""


def cut(row: dict[str, Any], field: str, what: str) -> str:
    return str(row.get(field) or "") + cut_note(row, field, what)


def page_footer(cmd: str, rows: list[dict[str, Any]], reply: dict[str, Any]) -> None:
    total = reply.get("total")
    if reply.get("more") and rows:
        last = max(r["id"] for r in rows if type(r.get("id")) is int)
        say(f"{len(rows)} shown of {total}; next page: hive {cmd} --after {last} (or --all)")


def register(group: click.Group) -> None:  # a flat list of small verbs
    @group.command("ls")
    @json_option
    @click.pass_context
    def ls(ctx: click.Context, as_json: bool) -> None:
        """List the hive's agents."""
        resp = request(host_sock(ctx), "list", as_json)
        if not as_json:
            for name in resp["agents"]:
                say(name)

    @group.command("status")
    @json_option
    @click.option("--watch", is_flag=True, help="Keep printing status changes as they happen.")
    @click.pass_context
    def status(ctx: click.Context, as_json: bool, watch: bool) -> None:
        """Every agent's state, status text and parent."""
        if watch:

            def render(item: dict[str, Any]) -> None:
                # The ack has no rows; each change is one row (hyperhive's shape).
                for a in item.get("agent_statuses", ()):
                    # one line each: a newline in the status text is shown, not made
                    say(f"{a['name']}: {_state(a)}  {a.get('status_text') or ''}")

            if not as_json:
                _status_table(request(host_sock(ctx), "agent_status", False)["agent_statuses"])
            stream(host_sock(ctx), "subscribe_agent_status", as_json, render)
            return
        resp = request(host_sock(ctx), "agent_status", as_json)
        if not as_json:
            _status_table(resp["agent_statuses"])
            if resp.get("swarm_agents"):  # with [swarm]: the other hosts' agents
                _swarm_table(resp["swarm_agents"])

    @group.command("send")
    @json_option
    @host_option
    @click.argument("name")
    @click.argument("body")
    @click.pass_context
    def send(ctx: click.Context, as_json: bool, host: str | None, name: str, body: str) -> None:
        """Message agent NAME as the operator."""
        resp = request(host_sock(ctx), "send", as_json, to=name, body=body, host=host)
        if as_json:
            return
        if "applied" not in resp:
            say(f"sent message {resp['id']} to {name}")
        else:  # its id is the one the other host gave it
            number = f" (message {resp['id']} there)" if "id" in resp else ""
            say(carried(resp, f"message to {name}") + (number if resp["applied"] else ""))

    @group.command("inbox")
    @json_option
    @click.option("--after", type=int, default=0, help="Only messages with an id above this.")
    @click.option(
        "--max",
        "max_",
        type=click.IntRange(1, 10_000),
        default=INBOX_PAGE,
        show_default=True,
        help="Messages a page.",
    )
    @click.option("--all", "every", is_flag=True, help="Every message after --after, not a page.")
    @click.pass_context
    def inbox(ctx: click.Context, as_json: bool, after: int, max_: int, every: bool) -> None:
        """Messages the agents sent to the operator, oldest first, a page of MAX (the hive
        sends them in batches); the footer says how to get the next page. --all: every
        one (--json: still one reply, all its ``messages``)."""
        path = host_sock(ctx)
        wanted = ALL_ROWS if every else max_
        resp = paged(path, "inbox", as_json, "messages", "after", ("max", wanted), after=after)
        if not as_json:
            print_messages(resp["messages"], "inbox")
            rows = resp["messages"]
            if resp.get("more") and rows:
                say(f"{len(rows)} shown; next page: hive inbox --after {rows[-1]['id']} (or --all)")

    @group.command("questions")
    @json_option
    @page_options
    @click.pass_context
    def questions(ctx: click.Context, as_json: bool, after: int, limit: int, every: bool) -> None:
        """Open questions addressed to the operator, oldest first, a page at a time; long
        text is cut (``hive show question ID`` prints one whole)."""
        rows, reply = pages(host_sock(ctx), "questions", as_json, after, limit, every)
        if not as_json:
            table(
                "questions",
                ["id", "from", "asked", "question", "options"],
                (
                    [q["id"], "", "", f"unreadable: {q['unreadable']}", ""]
                    if "unreadable" in q
                    else [
                        q["id"],
                        q["asker"],
                        when(q["asked_at"]),
                        cut(q, "question", "question"),
                        ", ".join(q.get("options") or []) + cut_note(q, "options", "question"),
                    ]
                    for q in rows
                ),
            )
            page_footer("questions", rows, reply)
            if reply.get("swarm_questions"):
                table(
                    "other hosts' questions (answer with --host HOST)",
                    ["host", "id", "from", "asked", "question", "options"],
                    (
                        [q["host"], q["id"], q.get("asker") or "", when(q.get("asked_at")),
                         cut(q, "question", "question"), ", ".join(q.get("options") or [])]
                        for q in reply["swarm_questions"]
                    ),
                )  # fmt: skip

    @group.command("answer")
    @json_option
    @host_option
    @click.argument("question_id", type=int)
    @click.argument("answer")
    @click.pass_context
    def answer(
        ctx: click.Context, as_json: bool, host: str | None, question_id: int, answer: str
    ) -> None:
        """Answer question QUESTION_ID (addressed to the operator)."""
        resp = request(
            host_sock(ctx), "answer_question", as_json, id=question_id, answer=answer, host=host
        )
        if not as_json:
            what = f"question {question_id}"
            say(carried(resp, what) if "applied" in resp else f"answered {what}")

    @group.command("pending")
    @json_option
    @page_options
    @click.pass_context
    def pending(ctx: click.Context, as_json: bool, after: int, limit: int, every: bool) -> None:
        """Pending approvals, oldest first, a page at a time, with the payload and its sha256;
        a long description or payload is cut: ``hive show approval ID`` prints the exact
        payload approving applies."""
        rows, reply = pages(host_sock(ctx), "pending", as_json, after, limit, every)
        if not as_json:
            table(
                "pending approvals",
                ["id", "agent", "kind", "requested", "description", "payload", "sha256"],
                (
                    [a["id"], "", "", "", f"unreadable: {a['unreadable']}", "", ""]
                    if "unreadable" in a
                    else [
                        a["id"],
                        a["agent"],
                        a["kind"],
                        when(a["requested_at"]),
                        cut(a, "description", "approval"),
                        _granted(a)
                        + _left_to_right(
                            a["payload"] + cut_note(a, "payload", "approval")
                            if "payload" in (a.get("truncated") or {})
                            else dumps(a.get("payload"))
                        ),
                        a["payload_sha256"],
                    ]
                    for a in rows
                ),
            )
            page_footer("pending", rows, reply)
            if reply.get("swarm_approvals"):
                table(
                    "other hosts' pending approvals (approve with --host HOST)",
                    ["host", "id", "agent", "kind", "requested", "description", "sha256"],
                    (
                        [a["host"], a["id"], a.get("agent") or "", a["kind"],
                         when(a.get("requested_at")), cut(a, "description", "approval"),
                         a["payload_sha256"]]
                        for a in reply["swarm_approvals"]
                    ),
                )  # fmt: skip

    def _left_to_right(text: str) -> str:
        """A payload as ``hive show approval`` draws it: right-to-left letters as JSON
        escapes, so a terminal draws it in stored order (``hive pending`` drew
        ["א","100","5000000","ב"] with 5000000 first: red team of session 32)."""
        shown, escaped = left_to_right_json_text(text)
        return shown + (" (right-to-left letters as \\u escapes)" if escaped else "")

    @group.group("show")
    def show() -> None:
        """Print one approval, question or message whole (listings cut long text)."""

    def on_host(fn: F) -> F:
        return click.option(
            "--host",
            help="The swarm host it is on (docs/swarm.md): asked of that host. Default: this host.",
        )(fn)

    @show.command("approval")
    @json_option
    @on_host
    @click.argument("approval_id", type=int)
    @click.pass_context
    def show_approval(
        ctx: click.Context, as_json: bool, host: str | None, approval_id: int
    ) -> None:
        """Approval APPROVAL_ID whole: the exact payload (canonical JSON, the text its sha256
        is of) that approving applies. With --host, another host's pending approval, its
        payload checked against its sha256 here."""
        a = request(host_sock(ctx), "show_approval", as_json, id=approval_id, host=host)["approval"]
        if as_json:
            return
        if "unreadable" in a:
            say(f"approval {a['id']} is unreadable: {a['unreadable']}")
            return
        for field in (
            "host",
            "id",
            "agent",
            "kind",
            "status",
            "allows",
            "grants",
            "note",
            "payload_sha256",
        ):
            if a.get(field) is not None:
                say(f"{field}: {a[field]}")
        say(f"requested: {when(a['requested_at'])}")
        say("description:")
        click.echo(visible(a["description"]))
        # Canonical JSON: the text payload_sha256 is the sha256 of.
        text = json.dumps(
            a.get("payload"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        shown, escaped = left_to_right_json_text(visible_json_text(text))
        if escaped:  # the same JSON value; the sha256 is of the text with the letters
            say("payload (its right-to-left letters as \\u escapes, so nothing is reordered):")
        else:
            say("payload:")
        click.echo(shown)

    @show.command("question")
    @json_option
    @on_host
    @click.argument("question_id", type=int)
    @click.pass_context
    def show_question(
        ctx: click.Context, as_json: bool, host: str | None, question_id: int
    ) -> None:
        """Question QUESTION_ID whole, with its options (and answer, if answered). With
        --host, another host's open question to the operator."""
        q = request(host_sock(ctx), "show_question", as_json, id=question_id, host=host)["question"]
        if as_json:
            return
        if "unreadable" in q:
            say(f"question {q['id']} is unreadable: {q['unreadable']}")
            return
        if q.get("host"):
            say(f"host: {q['host']}")
        say(f"id: {q['id']}")
        say(f"from: {q['asker']} to: {q['to']} asked: {when(q['asked_at'])}")
        say("question:")
        click.echo(visible(q["question"]))
        for option in q.get("options") or []:
            say(f"option: {option}")
        if q.get("answer") is not None:
            say(f"answered: {when(q.get('answered_at'))}")
            click.echo(visible(q["answer"]))
        elif q.get("cancelled"):
            say("cancelled: its asker or the agent it asked was destroyed; it takes no answer")

    @show.command("message")
    @json_option
    @click.argument("message_id", type=int)
    @click.pass_context
    def show_message(ctx: click.Context, as_json: bool, message_id: int) -> None:
        """Message MESSAGE_ID whole."""
        m = request(host_sock(ctx), "show_message", as_json, id=message_id)["message"]
        if as_json:
            return
        if "unreadable" in m:
            say(f"message {m['id']} is unreadable: {m['unreadable']}")
            return
        say(f"id: {m['id']}")
        say(f"from: {m['from']} to: {m.get('to')} kind: {m['kind']} sent: {when(m['sent_at'])}")
        for option in m.get("options") or []:
            say(f"option: {option}")
        click.echo(visible(m["body"]))

    @group.command("approve")
    @json_option
    @host_option
    @click.option("--sha256", help="Refused unless the approval's payload_sha256 is this.")
    @click.argument("approval_id", type=int)
    @click.pass_context
    def approve(
        ctx: click.Context, as_json: bool, host: str | None, sha256: str | None, approval_id: int
    ) -> None:
        """Approve APPROVAL_ID: applies exactly the stored payload, once. With --host, the
        one the roster shows (bound to its sha256)."""
        resp = request(
            host_sock(ctx), "approve", as_json, id=approval_id, host=host, payload_sha256=sha256
        )
        if "applied" in resp:
            if not as_json:
                say(carried(resp, f"approval {approval_id}"))
            return
        if not as_json:
            a = resp["approval"]
            note = f" ({a['note']})" if a.get("note") else ""
            say(f"approval {approval_id}: {a['status']}{note}")

    @group.command("deny")
    @json_option
    @click.argument("approval_id", type=int)
    @click.option("--note", help="Why; delivered to the agent.")
    @host_option
    @click.pass_context
    def deny(
        ctx: click.Context, as_json: bool, approval_id: int, note: str | None, host: str | None
    ) -> None:
        """Deny APPROVAL_ID."""
        resp = request(host_sock(ctx), "deny", as_json, id=approval_id, note=note, host=host)
        if not as_json:
            what = f"approval {approval_id}"
            say(carried(resp, what) if "applied" in resp else f"{what}: denied")

    @group.command("start")
    @json_option
    @host_option
    @incarnations_option
    @click.argument("names", nargs=-1)
    @click.pass_context
    def start(
        ctx: click.Context,
        as_json: bool,
        host: str | None,
        created_at: tuple[float, ...],
        names: tuple[str, ...],
    ) -> None:
        """Start NAMES (default: every agent; with --host, every agent of that host)."""
        resp = request(host_sock(ctx), "start", as_json, scope={"agent_names": list(names)},
                       host=host, created_at=bound_names(names, created_at))  # fmt: skip
        if not as_json:
            if "applied" in resp:
                say(carried(resp, f"start {' '.join(names) or 'every agent'}"))
            else:
                say(f"started: {', '.join(resp['started']) or 'nothing'}")

    @group.command("stop")
    @json_option
    @click.argument("names", nargs=-1)
    @click.option("--force", is_flag=True, help="Don't wait for the current turn to end.")
    @host_option
    @incarnations_option
    @click.pass_context
    def stop(
        ctx: click.Context,
        as_json: bool,
        names: tuple[str, ...],
        force: bool,
        host: str | None,
        created_at: tuple[float, ...],
    ) -> None:
        """Stop NAMES (default: every agent; with --host, every agent of that host)."""
        resp = request(host_sock(ctx), "stop", as_json, scope={"agent_names": list(names)},
                       graceful=not force, host=host,
                       created_at=bound_names(names, created_at))  # fmt: skip
        if not as_json:
            if "applied" in resp:
                say(carried(resp, f"stop {' '.join(names) or 'every agent'}"))
            else:
                say(f"stopped: {', '.join(resp['stopped']) or 'nothing'}")

    @group.command("restart")
    @json_option
    @host_option
    @incarnation_option
    @click.argument("name")
    @click.pass_context
    def restart(
        ctx: click.Context, as_json: bool, host: str | None, created_at: float | None, name: str
    ) -> None:
        """Restart agent NAME."""
        resp = request(
            host_sock(ctx), "restart", as_json, name=name, host=host, created_at=created_at
        )
        if not as_json:
            say(carried(resp, f"restart {name}") if "applied" in resp else f"restarted {name}")

    for verb, paused in (("pause", True), ("resume", False)):

        def make(paused: bool = paused, verb: str = verb) -> None:
            @group.command(
                verb,
                help=(
                    f"{verb.capitalize()} agent NAME "
                    f"({'messages queue, no turns' if paused else 'turns resume'})."
                ),
            )
            @json_option
            @host_option
            @incarnation_option
            @click.argument("name")
            @click.pass_context
            def cmd(
                ctx: click.Context,
                as_json: bool,
                host: str | None,
                created_at: float | None,
                name: str,
            ) -> None:
                resp = request(host_sock(ctx), "set_paused", as_json, name=name, paused=paused,
                               host=host, created_at=created_at)  # fmt: skip
                if as_json:
                    return
                if "applied" in resp:
                    say(carried(resp, f"{verb} {name}"))
                else:
                    say(f"{name}: {'paused' if paused else 'resumed'}")

        make()

    def spec_options(fn: F) -> F:
        fn = click.option(
            "--peer", "peers", multiple=True, help="A peer the agent may message (repeatable)."
        )(fn)
        fn = click.option(
            "--command",
            "command",
            multiple=True,
            help="Runtime 'command': one argv word per --command.",
        )(fn)
        return click.option(
            "--spec",
            "spec_json",
            help='The agent spec as JSON, e.g. \'{"command": ["python3", "/srv/turn.py"]}\'.',
        )(fn)

    def spec_of(spec_json: str | None, command: tuple[str, ...], peers: tuple[str, ...]) -> Any:
        if spec_json:
            try:
                return json.loads(spec_json)
            except json.JSONDecodeError as e:
                fail(f"--spec is not valid JSON: {e}")
        return {"runtime": "command", "command": list(command), "peers": list(peers)}

    @group.command("spawn")
    @json_option
    @click.argument("name")
    @spec_options
    @host_option
    @click.pass_context
    def spawn(
        ctx: click.Context,
        as_json: bool,
        name: str,
        spec_json: str | None,
        command: tuple[str, ...],
        peers: tuple[str, ...],
        host: str | None,
    ) -> None:
        """Create and start agent NAME."""
        spec = spec_of(spec_json, command, peers)
        resp = request(host_sock(ctx), "spawn", as_json, name=name, spec=spec, host=host)
        if not as_json:
            say(carried(resp, f"spawn {name}") if "applied" in resp else f"spawned {name}")

    @group.command("request-spawn")
    @json_option
    @click.argument("name")
    @spec_options
    @click.option("--description", help="What the approval says it is for.")
    @host_option
    @click.pass_context
    def request_spawn(
        ctx: click.Context,
        as_json: bool,
        name: str,
        spec_json: str | None,
        command: tuple[str, ...],
        peers: tuple[str, ...],
        description: str | None,
        host: str | None,
    ) -> None:
        """Queue a spawn approval for agent NAME (approve it to spawn it); with --host, on
        that host of the swarm."""
        spec = spec_of(spec_json, command, peers)
        resp = request(host_sock(ctx), "request_spawn", as_json, name=name, spec=spec,
                       description=description, host=host)  # fmt: skip
        if as_json:
            return
        where = f" on host {resp['host']}" if "host" in resp else ""
        if "id" in resp:
            say(f"spawn approval {resp['id']}{where} (payload_sha256 {resp['payload_sha256']})")
        else:
            say(carried(resp, f"request-spawn {name}"))

    @group.command("set-parent")
    @json_option
    @click.argument("name")
    @click.argument("parent", required=False)
    @click.pass_context
    def set_parent(ctx: click.Context, as_json: bool, name: str, parent: str | None) -> None:
        """Put agent NAME under PARENT in the tree (no PARENT: root-level)."""
        request(host_sock(ctx), "set_parent", as_json, name=name, parent=parent)
        if not as_json:
            say(f"{name}: parent {parent}" if parent else f"{name}: root-level")

    @group.command("limits")
    @json_option
    @click.argument("name")
    @click.option("--memory-mib", type=int, help="The cage's memory limit, MiB.")
    @click.option("--pids-max", type=int, help="The cage's task limit.")
    @click.pass_context
    def limits(
        ctx: click.Context, as_json: bool, name: str, memory_mib: int | None, pids_max: int | None
    ) -> None:
        """Set agent NAME's cage limits (applied when its cage next starts; show them
        when no option is given)."""
        resp = request(
            host_sock(ctx), "set_resource_limits", as_json, name=name,
            memory_mib=memory_mib, pids_max=pids_max,
        )  # fmt: skip
        if not as_json:
            mem, pids = resp.get("memory_mib", "default"), resp.get("pids_max", "default")
            say(f"{name}: memory_mib {mem}, pids_max {pids} (from its next start)")

    @group.command("destroy")
    @json_option
    @click.argument("name")
    @click.option("--yes", is_flag=True, help="Don't ask for confirmation.")
    @host_option
    @incarnation_option
    @click.pass_context
    def destroy(
        ctx: click.Context,
        as_json: bool,
        name: str,
        yes: bool,
        host: str | None,
        created_at: float | None,
    ) -> None:
        """Stop agent NAME and delete it and its undelivered messages."""
        if not yes and not as_json:
            what = f"agent {name}"
            if host:
                # The one asked about is the one destroyed: looked up in this host's
                # roster now and bound, so an agent destroyed and spawned again under the
                # name while the question waits is refused there, not destroyed.
                row = roster_row(ctx, host, name) if created_at is None else None
                if row is not None and isinstance(row.get("created_at"), float):
                    created_at = row["created_at"]
                what += f" on host {host}"
                if created_at is not None:
                    what += f" ({created(created_at)}created_at {created_at!r})"
            click.confirm(f"destroy {what}?", abort=True)
        resp = request(
            host_sock(ctx), "destroy", as_json, name=name, host=host, created_at=created_at
        )
        if not as_json:
            say(carried(resp, f"destroy {name}") if "applied" in resp else f"destroyed {name}")

    @group.command("interrupt")
    @json_option
    @host_option
    @incarnation_option
    @click.argument("name")
    @click.pass_context
    def interrupt(
        ctx: click.Context, as_json: bool, host: str | None, created_at: float | None, name: str
    ) -> None:
        """Stop agent NAME's current turn."""
        resp = request(
            host_sock(ctx), "interrupt", as_json, name=name, host=host, created_at=created_at
        )
        if not as_json:
            here = f"{name}: interrupt sent"
            say(carried(resp, f"interrupt {name}") if "applied" in resp else here)

    @group.command("transcript")
    @json_option
    @click.argument("name")
    @click.option("--after", type=int, default=0, help="Only entries with an id above this.")
    @click.option("--limit", type=int, default=100, show_default=True)
    @click.pass_context
    def transcript(ctx: click.Context, as_json: bool, name: str, after: int, limit: int) -> None:
        """Agent NAME's turn transcript (latest entries)."""
        resp = paged(
            host_sock(ctx), "transcript", as_json, "entries", "after", ("limit", limit),
            name=name, after=after,
        )  # fmt: skip
        if not as_json:
            table(
                f"{name} transcript",
                ["id", "turn", "kind", "at", "data"],
                (
                    [e["id"], "", "", "", f"unreadable: {e['unreadable']}"]
                    if "unreadable" in e
                    else [
                        e["id"],
                        e["turn"],
                        e["kind"],
                        when(e["at"]),
                        e["data"] if isinstance(e["data"], str) else dumps(e["data"]),
                    ]
                    for e in resp["entries"]
                ),
            )

    @group.command("urls")
    @json_option
    @click.pass_context
    def urls(ctx: click.Context, as_json: bool) -> None:
        """Where the hive's web surfaces are."""
        resp = request(host_sock(ctx), "urls", as_json)
        if not as_json:
            for k, v in resp["urls"].items():
                say(f"{k}: {v}")

    @group.command("core-stats")
    @json_option
    @click.pass_context
    def core_stats(ctx: click.Context, as_json: bool) -> None:
        """hive-core's counters since it started: its store's commits (a group commit is
        one, however many sends and acks it holds)."""
        resp = request(host_sock(ctx), "core_stats", as_json)
        if not as_json:
            say(f"commits: {resp['commits']}")

    @group.command("events")
    @json_option
    @click.option(
        "--kind",
        "kinds",
        multiple=True,
        type=click.Choice(list(EVENT_KINDS)),
        help="Only these kinds (repeatable; default all).",
    )
    @click.pass_context
    def events(ctx: click.Context, as_json: bool, kinds: tuple[str, ...]) -> None:
        """Follow the hive's events live (Ctrl-C to stop): one line each, TIME KIND WHO
        SUMMARY (the time it arrived; long agent text cut, with the command that shows it
        whole). --json: every reply line whole, one JSON object a line (NDJSON), the
        subscription's ack first; each line is flushed as it comes, so it works in a pipe."""

        def render(item: dict[str, Any]) -> None:
            if isinstance(item.get("event"), dict):  # never through rich: no cut, no wrap
                say(event_line(item["event"], datetime.now()))

        fields: dict[str, Any] = {"kinds": list(kinds)} if kinds else {}
        stream(host_sock(ctx), "subscribe", as_json, render, **fields)


def _swarm_table(rows: list[dict[str, Any]]) -> None:
    table(
        "other hosts' agents",
        ["host", "name", "state", "paused", "created_at", "status"],
        (
            [
                a["host"],
                a["name"],
                "unreachable" if not a.get("reachable") else _state(a),
                _yn(a.get("paused", False)),
                _incarnation(a.get("created_at")),
                a.get("status_text"),
            ]
            for a in rows
        ),
        whole={"host", "name", "created_at"},
    )


def _incarnation(created_at: Any) -> str:
    """A row's created_at as ``--json`` prints it (JSON's shortest repr of the float), to be
    pasted into ``--created-at``; nothing for a row without one (an older host's)."""
    if isinstance(created_at, bool) or not isinstance(created_at, int | float):
        return ""
    return json.dumps(created_at)


def _hits(a: dict[str, Any]) -> str:
    """An agent's cage limit hits, as its state column shows them; nothing if none."""
    hits = []
    if a.get("oom_kills"):
        hits.append(f"{a['oom_kills']} OOM-killed")
    if a.get("pids_refused"):
        hits.append(f"{a['pids_refused']} forks refused")
    return f" ({', '.join(hits)})" if hits else ""


def _status_table(rows: list[dict[str, Any]]) -> None:
    table(
        "agents",
        ["name", "state", "paused", "parent", "reminders", "created_at", "status", "since"],
        (
            [
                a["name"],
                _state(a) + _hits(a),
                _yn(a.get("paused", False)),
                a.get("parent"),
                a.get("pending_reminders") or "",
                _incarnation(a.get("created_at")),
                a.get("status_text"),
                when(a.get("status_set_at")),
            ]
            for a in rows
        ),
        whole={"name", "created_at"},
    )

"""``hive events``: one readable line per hive event.

``TIME KIND WHO SUMMARY``: the time the line arrived (events carry no time of their
own; they are sent as the change commits), the event's kind, who it is about
(``from -> to`` for messages and questions) and a short summary. Agent-written text
longer than ``SUMMARY_CHARS`` is cut, with how long it is and the command that shows
it whole; ``--json`` gives every event whole. The caller prints the line with ``say``
(``hyperhive.display``: controls and bidi escaped, a newline shown, never made)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from hyperhive.display import dumps

SUMMARY_CHARS = 200  # of one agent-written text in a line; --json has it whole
KIND_WIDTH = 12  # "agent_status", the longest kind: the summaries line up


def short(text: Any, show: str | None = None, full: int | None = None) -> str:
    """``text`` cut to SUMMARY_CHARS; a cut (here, or the hive's: ``full`` bytes in all)
    says so and how to see it whole (``show``, a command)."""
    s = text if isinstance(text, str) else dumps(text)
    cut = len(s) > SUMMARY_CHARS
    if not cut and full is None:
        return s
    size = f"{full} bytes" if full is not None else f"{len(s)} characters"
    where = f"; {show}" if show else ""
    return f"{s[:SUMMARY_CHARS]} … [cut: {size} in all{where}]"


def _full(row: dict[str, Any], field: str) -> int | None:
    """The whole length of ``field`` when the hive already cut it (a summarised row)."""
    value = (row.get("truncated") or {}).get(field)
    return value if isinstance(value, int) else None


def _message(e: dict[str, Any]) -> tuple[str, str]:
    m = e["message"]
    if "unreadable" in m:
        return "", f"message {m['id']} unreadable: {m['unreadable']}"
    kind = "" if m.get("kind") == "message" else f" ({m.get('kind')})"
    body = short(m.get("body"), f"hive show message {m['id']}", _full(m, "body"))
    return f"{m.get('from')} -> {m.get('to')}", f"#{m['id']}{kind}: {body}"


def _question(e: dict[str, Any]) -> tuple[str, str]:
    q = e["question"]
    if "unreadable" in q:
        return "", f"question {q['id']} unreadable: {q['unreadable']}"
    show = f"hive show question {q['id']}"
    text = short(q.get("question"), show, _full(q, "question"))
    if e.get("kind") == "answer":
        answer = short(q.get("answer"), show, _full(q, "answer"))
        return f"{q.get('to')} -> {q.get('asker')}", f"#{q['id']} {text} => {answer}"
    options = q.get("options") or []
    offered = f" [{' / '.join(short(o) for o in options)}]" if options else ""
    return f"{q.get('asker')} -> {q.get('to')}", f"#{q['id']}: {text}{offered}"


def _approval(e: dict[str, Any]) -> tuple[str, str]:
    a = e["approval"]
    if "unreadable" in a:
        return "", f"approval {a['id']} unreadable: {a['unreadable']}"
    note = f" ({short(a['note'])})" if a.get("note") else ""
    show = f"hive show approval {a['id']}"
    text = short(a.get("description"), show, _full(a, "description"))
    return str(a.get("agent")), f"#{a['id']} {a.get('kind')} {a.get('status')}{note}: {text}"


def _agent_status(e: dict[str, Any]) -> tuple[str, str]:
    if e.get("destroyed"):
        return str(e.get("name")), "destroyed"
    a = e["agent"]
    if e.get("trouble"):  # the hive's own line (a cage limit hit), not the agent's
        return str(a.get("name")), short(e["trouble"])
    if a.get("failed"):
        state = "failed"
    elif a.get("needs_login"):
        state = "needs-login"
    elif not a.get("running"):
        state = "stopped"
    else:
        state = "paused" if a.get("paused") else "running"
    text = a.get("status_text")
    return str(a.get("name")), state + (f": {short(text)}" if text else "")


def _reminder(e: dict[str, Any]) -> tuple[str, str]:
    return str(e.get("agent")), f"reminder {e.get('reminder_id')} due: {short(e.get('text'))}"


def _transcript(e: dict[str, Any]) -> tuple[str, str]:
    entries = e.get("entries") or []
    kinds = ", ".join(dict.fromkeys(str(x.get("kind")) for x in entries if isinstance(x, dict)))
    rows = [x for x in entries if isinstance(x, dict)]
    turns = sorted({x["turn"] for x in rows if type(x.get("turn")) is int})
    turn = f"turn {turns[0]}" if len(turns) == 1 else f"{len(turns)} turns"
    n = len(entries)
    return str(e.get("agent")), f"{n} entr{'y' if n == 1 else 'ies'} ({turn}: {kinds})"


def _egress(e: dict[str, Any]) -> tuple[str, str]:
    who = str(e.get("agent"))
    if "rules" in e:
        rules = e.get("rules") or []
        return who, f"rules now: {short(', '.join(map(str, rules))) or 'none'}"
    x = e["entry"]
    if "unreadable" in x:
        return who, f"decision {x['id']} unreadable: {x['unreadable']}"
    verdict = "allowed" if x.get("allowed") else "REFUSED"
    why = f" ({short(x['reason'])})" if x.get("reason") else ""
    moved = f", {x.get('bytes_up')} up / {x.get('bytes_down')} down bytes"
    return who, f"{x.get('host')}:{x.get('port')} {verdict}{why}{moved}"


def _secret(e: dict[str, Any]) -> tuple[str, str]:
    agents = e.get("agents")
    whom = f" ({', '.join(map(str, agents))})" if agents else ""
    return "", f"secret {e.get('secret')} {e.get('change')}{whom}"


SUMMARIES: dict[str, Callable[[dict[str, Any]], tuple[str, str]]] = {
    "message": _message,
    "question": _question,
    "answer": _question,
    "approval": _approval,
    "agent_status": _agent_status,
    "reminder": _reminder,
    "transcript": _transcript,
    "egress": _egress,
    "secret": _secret,
}


def event_line(event: dict[str, Any], at: datetime) -> str:
    """One line for ``event``, received at ``at`` (unescaped: print it with ``say``).
    A kind or shape this version does not know is shown as its JSON, never dropped."""
    kind = str(event.get("kind"))
    try:
        who, text = SUMMARIES[kind](event)
    except (KeyError, TypeError, AttributeError, ValueError):
        who, text = "", dumps({k: v for k, v in event.items() if k != "kind"})
    return f"{at:%Y-%m-%d %H:%M:%S} {kind:<{KIND_WIDTH}} {who}  {text}".rstrip()

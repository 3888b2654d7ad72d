"""The operator's cockpit (the dashboard, ``GET /``): what each of its sections shows, and
which sections a hive event changes.

The page is server-rendered, one template per section (``templates/cockpit/``), each
section one element with a fixed id. The live stream (``/api/dashboard/stream?view=html``)
sends the sections an event touched, rendered again, as htmx out-of-band swaps that
idiomorph morphs into the page in place (``static/dashboard.js`` keeps typed input and
focus). So the page and its updates come from one template, and no script draws rows."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from hyperhive.wire.timestamps import parse_timestamp

AGENTS_PER_PAGE = 50  # the agents table's page (server-side, any number of agents)
INBOX_SHOWN = 20  # the operator's inbox: the newest messages
NO_RULES_NAMED = 100  # agents named on the egress table's one "no rules" line, at most
STATES = ("running", "paused", "stopped", "failed", "needs-login")
# With [swarm]: another host's agent whose host's heartbeat is stale (docs/swarm.md).
UNREACHABLE = "unreachable"
SWARM_STATES = (*STATES, UNREACHABLE)
FOCUS = re.compile(r"(question|approval)-[1-9][0-9]{0,17}")
SECTIONS = ("attention", "agents", "inbox", "messages", "rules", "secrets", "log")

# Which sections each event kind changes (the stream re-renders those).
TOUCHES: dict[str, frozenset[str]] = {
    "agent_status": frozenset({"attention", "agents", "rules"}),
    "reminder": frozenset({"agents"}),
    "question": frozenset({"attention"}),
    "answer": frozenset({"attention"}),
    "approval": frozenset({"attention"}),
    "message": frozenset({"inbox", "messages"}),
    "egress": frozenset({"rules", "log"}),
    # Another swarm host's agents, questions or approvals changed, or its reachability
    # (swarm/bridge.py, swarm/operator.py).
    "swarm": frozenset({"attention", "agents"}),
    "secret": frozenset({"secrets"}),
}


def state_of(agent: Mapping[str, Any]) -> str:
    """One word for an agent's state (failed and needs-login before the rest; another
    swarm host's agent whose host is unreachable: that, whatever its row said last)."""
    if agent.get("reachable") is False:
        return UNREACHABLE
    if agent.get("failed"):
        return "failed"
    if agent.get("needs_login"):
        return "needs-login"
    if not agent.get("running"):
        return "stopped"
    return "paused" if agent.get("paused") else "running"


def actions_for(agent: Mapping[str, Any]) -> list[str]:
    """The lifecycle actions that make sense now: no start on a running agent, no resume
    on one that isn't paused, no pause or interrupt on one that isn't running. Another
    swarm host's agent gets the same (each carried to its host, signed), by the state its
    roster row says; none while that host is unreachable (an action would only wait)."""
    if agent.get("reachable") is False:
        return []
    if not agent.get("running"):
        return ["start", "destroy"]
    if agent.get("paused"):
        return ["resume", "stop", "destroy"]
    return ["pause", "interrupt", "restart", "stop", "destroy"]


@dataclass(frozen=True)
class View:
    """What the agents table shows: a state filter, a name search and a page (1-based).
    The page's URL carries it (plain GET links, so it works without a script), and so
    does its live stream's."""

    state: str = ""
    q: str = ""
    page: int = 1
    # ``question-N`` or ``approval-N``: a notification's link shows that item (while it is
    # open) wherever it stands in the queue, on the page and in its stream's redraws.
    focus: str = ""

    @staticmethod
    def of(params: Mapping[str, str]) -> View:
        state = params.get("state", "")
        q = params.get("q", "").strip()[:64]
        try:
            page = max(1, min(int(params.get("page", "1")), 10**6))
        except ValueError:
            page = 1
        focus = params.get("focus", "")
        focus = focus if FOCUS.fullmatch(focus) else ""
        return View(state if state in SWARM_STATES else "", q, page, focus)

    def query(self, **changes: Any) -> str:
        """This view's query string, with ``changes``; empty fields left out."""
        fields = {
            "state": self.state,
            "q": self.q,
            "page": self.page,
            "focus": self.focus,
            **changes,
        }
        if fields["page"] == 1:
            fields["page"] = ""
        return urlencode({k: v for k, v in fields.items() if v})


@dataclass(frozen=True)
class AgentTable:
    rows: list[dict[str, Any]]
    total: int  # every agent
    matching: int  # the agents the filter and search leave
    page: int
    pages: int
    counts: dict[str, int]  # agents by state
    here: str | None = None  # with [swarm]: this host's name (the table shows a host column)


def agent_table(
    agents: Iterable[Mapping[str, Any]], view: View, here: str | None = None
) -> AgentTable:
    """One page of the agents, by name, after the view's filter and search. With [swarm]
    (``here``: this host), ``agents`` also holds the other hosts' rows (each with its
    ``host`` and ``reachable``), paged and filtered with this host's."""
    counts = dict.fromkeys(STATES if here is None else SWARM_STATES, 0)
    matching: list[dict[str, Any]] = []
    total = 0
    for a in agents:
        total += 1
        state = state_of(a)
        counts[state] += 1
        if view.state and state != view.state:
            continue
        if view.q and view.q.lower() not in str(a.get("name", "")):
            continue
        matching.append({**a, "state": state, "actions": actions_for(a)})
    matching.sort(key=lambda a: str(a.get("name", "")))
    pages = max(1, -(-len(matching) // AGENTS_PER_PAGE))
    page = min(view.page, pages)
    start = (page - 1) * AGENTS_PER_PAGE
    return AgentTable(
        matching[start : start + AGENTS_PER_PAGE], total, len(matching), page, pages, counts, here
    )


def troubled(agents: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The agents that need the operator (failed, or waiting for a login), longest first."""
    out = [{**a, "state": state_of(a)} for a in agents if a.get("failed") or a.get("needs_login")]
    out.sort(key=lambda a: (_seconds(a.get("status_set_at")) or 0.0, str(a.get("name"))))
    return out


def _seconds(at: object) -> float | None:
    if at is None or at == "":
        return None
    try:
        return parse_timestamp(at)
    except ValueError:
        return None


def clock(at: object) -> str:
    """A time as the dashboard's tables show it: UTC, to the second."""
    t = _seconds(at)
    return "" if t is None else time.strftime("%H:%M:%S", time.gmtime(t))


def ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 10:
        return "just now"
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        return f"{s // 60} min ago"
    if s < 86400:
        return f"{s // 3600} h ago"
    return f"{s // 86400} d ago"


def when(at: object, now: float | None = None) -> str:
    """A time in words: UTC, with the date unless it is today, and how long ago
    (``12:34 UTC, 5 min ago``)."""
    t = _seconds(at)
    if t is None:
        return ""
    now = time.time() if now is None else now
    same_day = time.gmtime(t)[:3] == time.gmtime(now)[:3]
    shown = time.strftime("%H:%M UTC" if same_day else "%Y-%m-%d %H:%M UTC", time.gmtime(t))
    return f"{shown}, {ago(now - t)}"


def iso(at: object) -> str:
    """A time as a ``<time datetime>`` attribute (RFC 3339 UTC)."""
    t = _seconds(at)
    return "" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def no_rules(names: list[str]) -> tuple[list[str], int]:
    """The agents named on the "no rules" line, and how many more there are."""
    return names[:NO_RULES_NAMED], max(0, len(names) - NO_RULES_NAMED)


def carried(words: str, reply: Mapping[str, Any]) -> str:
    """The toast of an action carried to another swarm host (its reply has ``applied``):
    that it was carried, and whether that host has applied it yet."""
    if "applied" not in reply:
        return words
    host = reply.get("host", "")
    if reply["applied"]:
        return f"{words} on host {host} (carried there, applied)"
    return (
        f"carried to host {host}, not applied yet: {words} (applied when that host takes it,"
        " refused as too old after 5 minutes)"
    )


# What a finished action says, in words (the toast), by host.sock verb.
def said(verb: str, **what: Any) -> str:
    name, ident = what.get("name", ""), what.get("id", "")
    return {
        "approve": f"approved approval {ident}",
        "deny": f"denied approval {ident}",
        "answer_question": f"answered question {ident}",
        "send": f"sent the message to {name}",
        "start": f"started {name}",
        "stop": f"stopped {name}",
        "restart": f"restarted {name}",
        "pause": f"paused {name}",
        "resume": f"resumed {name}",
        "destroy": f"destroyed {name}",
        "interrupt": f"interrupted {name}'s turn",
        "spawn": f"spawned {name}",
        "egress_allow": f"{name} may now reach {what.get('rule', '')}",
        "egress_remove": f"{name} may no longer reach {what.get('rule', '')}",
        "inbox_read": "marked the inbox read",
        "secret_bind": f"secret {name} bound for {what.get('agents', '')} to {what.get('to', '')}",
        "secret_unbind": f"secret {name} unbound from {what.get('agents') or 'every agent'}",
    }.get(verb, "done")

"""The core's HTTP surface on ``core.sock``, behind the gateway: the operator's
login, the dashboard, the operator's view of each agent (``/agent/NAME/``, rendered here
from the core's own store: the agent's harness never serves script in this origin), and
the operator-authority actions as POSTs.

Every action goes through the same handlers as ``host.sock`` (one code path,
one set of refusals); HTTP only adds the session, the CSRF token and the
same-origin check. An agent can't reach any of this: its cage has no route to
the gateway, and core.sock is ``hive-core:hive-gateway 0660``."""

import asyncio
import contextlib
import grp
import json
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import jinja2
import uvicorn
from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import escape
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from hyperhive import display
from hyperhive.core import cockpit
from hyperhive.core.actors import OPERATOR
from hyperhive.core.approvals import allows_of, shown
from hyperhive.core.hive import Hive
from hyperhive.core.host_socket import HOST, OperatorSession
from hyperhive.core.listing import rows_out, rules_out
from hyperhive.core.refusals import Refused
from hyperhive.core.sessions import COOKIE, SESSION_TTL, Session, Sessions
from hyperhive.core.sse import CONNECTED, KEEP_ALIVE, events_or_quiet, sse, sse_response
from hyperhive.core.store import canonical_json
from hyperhive.core.summary import PAGE, PAGE_MAX, PER_AGENT_SHOWN, summarise_event
from hyperhive.display import visible, visible_json_text, visible_value
from hyperhive.names import NAME_RE
from hyperhive.unixsock import bind_listener
from hyperhive.wire.common import AgentStatus, Approval, Question
from hyperhive.wire.egress import MAX_RULE
from hyperhive.wire.framing import WireError, parse_line
from hyperhive.wire.timestamps import Timestamp, rfc3339

HERE = Path(__file__).parent
EGRESS_LOG_SHOWN = 100  # the dashboard's recent decisions, all agents
MARK_READ_SETTLE = 1.0  # seconds a message is on the page before "mark read" marks it
LIVE_COALESCE = 0.2  # seconds: a burst of events becomes one redraw of what it touched
AGENT_EGRESS_SHOWN = 50  # an agent page's recent decisions
TRANSCRIPT_SHOWN = 200  # entries an agent page opens with (and the stream's batch)


class PendingApproval(Approval):
    """A pending approval as the dashboard shows it. For kind ``egress``, ``allows`` is
    the rule approving would add, worked out by the hive from the payload (not the
    agent's description)."""

    allows: str | None = None


class ApprovalPage(BaseModel):
    approvals: list[PendingApproval]
    total: int
    more: bool


class QuestionPage(BaseModel):
    questions: list[Question]
    total: int
    more: bool


class EgressRuleRow(BaseModel):
    rule: str
    source: Literal["spec", "approval", "operator"]
    added_at: Timestamp


class EgressEntry(BaseModel):
    """One decision of the egress proxy; ``bytes_*`` and ``closed_at`` are filled in
    when an allowed connection closes (the same ``id`` again)."""

    id: int
    agent: str
    at: Timestamp
    host: str
    port: int
    address: str | None = None
    allowed: bool
    reason: str
    bytes_up: int
    bytes_down: int
    closed_at: Timestamp | None = None


class StateModel(BaseModel):
    """The dashboard's first screen: the first page (oldest first) of the pending approvals
    and of the open questions, with how many there are in all and whether more follow
    (``/api/approvals``, ``/api/questions`` page on); the newest messages. Rows are
    summaries: agent-written text cut at 2048 characters, ``truncated`` naming each cut
    field with its full length; ``/api/{approvals,questions,messages}/{id}`` give one whole."""

    agents: list[AgentStatus]
    approvals: list[PendingApproval]
    approvals_total: int
    approvals_more: bool
    questions: list[Question]
    questions_total: int
    questions_more: bool
    messages: list[dict[str, Any]]
    egress_rules: dict[str, list[EgressRuleRow]]
    egress_log: list[EgressEntry]
    # With [swarm] (docs/swarm.md): the other hosts' agents (``name, host, running, paused,
    # status_text, reachable``: false when that host's heartbeat is stale), open questions
    # and pending approvals, each with its ``host``; answer or approve one with ``host``
    # in the form.
    swarm_agents: list[dict[str, Any]] = []
    swarm_questions: list[dict[str, Any]] = []
    swarm_approvals: list[dict[str, Any]] = []


def _on(host: str | None) -> dict[str, str]:
    """A form's ``host`` (the swarm host an action is for) as host.sock's field."""
    return {"host": host} if host else {}


def payload_json(value: Any) -> str:
    """The payload as the text its sha256 was taken of. A row leaves a null payload out,
    so the template meets Jinja's Undefined there: that is ``null``, not a 500."""
    return canonical_json(None if isinstance(value, jinja2.Undefined) else value)


def destination(host: str, port: int) -> str:
    if host == "-" or not port:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _text(value: object) -> str:
    return value if isinstance(value, str) else display.dumps(value)


# Claude Code's stream-json event types (--output-format stream-json), shown as named.
RUNTIME_EVENT_TYPES = frozenset({"system", "assistant", "user", "result", "stream_event"})


def readable(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A transcript entry as the agent page shows it: who or what (``who``), its text
    (``text``, or None), and what is folded (``fold``, its summary; ``folded``, its body).
    The raw JSON is always one click away as well."""
    kind, data = entry.get("kind"), entry.get("data")
    out: dict[str, Any] = {"who": "", "text": None, "fold": None, "folded": None}
    if kind == "input" and isinstance(data, dict):
        sender, what = data.get("from", "?"), data.get("kind", "message")
        out["who"] = f"from {_text(sender)} ({_text(what)} {_text(data.get('id', ''))})"
        out["text"] = _text(data.get("body", ""))
    elif kind in ("stdout", "stderr", "note"):
        out["text"] = _text(data)
    elif kind == "exit" and isinstance(data, dict):
        out["who"] = "turn ended"
        out["text"] = ", ".join(f"{k} {_text(v)}" for k, v in data.items())
    elif isinstance(data, dict):  # a runtime's JSON event (Claude Code's stream-json)
        message = data.get("message")
        blocks = message.get("content") if isinstance(message, dict) else None
        blocks = [b for b in blocks if isinstance(b, dict)] if isinstance(blocks, list) else []
        texts = [_text(b.get("text", "")) for b in blocks if b.get("type") == "text"]
        tools = [b for b in blocks if b.get("type") == "tool_use"]
        # The runtime names its event: Claude Code's own types as they are, any other
        # quoted and marked, so no event reads as the hive's "from operator (message N)"
        # or "turn ended" (red team round 26).
        kind_of = data.get("type")
        if isinstance(kind_of, str) and kind_of in RUNTIME_EVENT_TYPES:
            out["who"] = kind_of
        else:
            out["who"] = "runtime event" + ("" if kind_of in (None, "") else f" {kind_of!r}")
        if texts:
            out["text"] = "\n".join(texts)
        elif data.get("type") == "result":
            out["text"] = _text(data.get("result", ""))
        if tools:
            out["fold"] = "tool call: " + ", ".join(_text(b.get("name", "?")) for b in tools)
            out["folded"] = folded_input([b.get("input") for b in tools])
    else:
        out["text"] = _text(data)
    return out


# A tool call's input as the agent page unfolds it: indented only when small, and cut past
# FOLDED_MAX (the raw JSON is a click away). Indented whole, a list nested 41 deep around
# 7,900 zeros (16 KB stored) drew ~680 KB of HTML an entry, in the core's loop: one page
# of 200 such calls was 135 MB and stalled every agent 2.9 s (red team of session 32).
FOLDED_MAX = 16 * 1024
FOLDED_INDENT_UNDER = 2 * 1024


def folded_input(inputs: list[Any]) -> str:
    compact = display.dumps(inputs)
    if len(compact) <= FOLDED_INDENT_UNDER:
        pretty = display.dumps(inputs, indent=2)
        if len(pretty) <= FOLDED_MAX:
            return pretty
    if len(compact) <= FOLDED_MAX:
        return compact
    return f"{compact[:FOLDED_MAX]}… ({len(compact):,} characters: the raw JSON has it whole)"


# Which part of an agent's page each kind of hive event changes.
PAGE_PARTS = {
    "question": "questions",
    "answer": "questions",
    "approval": "approvals",
    "agent_status": "head",
    "egress": "egress",
    "transcript": "transcript",
}


def concerns(event: dict[str, Any], name: str) -> str | None:
    """Which part of agent NAME's page a hive event changes (``PAGE_PARTS``), or None
    (another agent's). Only that part is drawn again: an agent's flood of refused
    connections redraws its egress table, never its loose ends."""
    kind = event.get("kind")
    row = event.get("question") or event.get("approval") or event.get("agent")
    if isinstance(row, dict):
        who = row.get("asker") if "question" in event else row.get("agent", row.get("name"))
    else:
        who = event.get("agent", event.get("name"))
    if who != name:
        return None
    return PAGE_PARTS.get(str(kind))


class Refusal(BaseModel):
    """Every refusal: why, in one line (plain text instead for a browser's form post)."""

    ok: Literal[False]
    error: str


class Reply(BaseModel):
    """The hive's reply to an operator action: host.sock's reply to the same verb."""

    model_config = ConfigDict(extra="allow")
    version: int
    ok: Literal[True]


def _refused(description: str) -> dict[str, Any]:
    return {
        "model": Refusal,
        "description": description,
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }


Responses = dict[int | str, dict[str, Any]]
NOT_LOGGED_IN: Responses = {401: _refused("Not logged in (no or expired session cookie).")}
REFUSED: Responses = {
    404: _refused("No such agent, question or approval."),
    409: _refused("Refused by the hive; the reason says why."),
    422: _refused("Bad input; the reason names the field."),
    429: _refused("A limit of the hive: the agent limit ([limits] max_agents)."),
    503: _refused("hive-priv is unavailable; the agent's cage could not be started or stopped."),
}
# The gateway's, before the core sees the request: a path parameter with %-escapes (any
# character outside RFC 3986's path characters) is not a path the hive builds; a request
# line over nginx's large_client_header_buffers (8 KiB), longer than any the dashboard or
# CLI sends, never reaches the core.
BAD_PATH: Responses = {
    400: _refused("A path with %-escapes, // or dot segments (refused by the gateway)."),
    414: {"description": "A request line over 8 KiB (refused by the gateway)."},
}
GET_RESPONSES: dict[int | str, dict[str, Any]] = {**BAD_PATH, **NOT_LOGGED_IN, **REFUSED}
POST_RESPONSES: dict[int | str, dict[str, Any]] = {
    **BAD_PATH,
    200: {"model": Reply, "description": "Done (with Accept: application/json)."},
    303: {"description": "Done: back to the page the form was on (a plain form post)."},
    **NOT_LOGGED_IN,
    403: _refused("Cross-origin request, or missing or wrong CSRF token."),
    **REFUSED,
    413: {
        "description": "Request body over the gateway's 1 MiB limit.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
}


def _one_line(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "bad request"
    err = errors[0]
    where = ".".join(str(p) for p in err.get("loc", ())[1:]) or ".".join(
        str(p) for p in err.get("loc", ())
    )
    if err.get("type") == "missing":
        return f"missing field {where!r}"
    return " ".join(f"field {where!r}: {err.get('msg', 'invalid value')}".split())


# Integers as host.sock's JSON parser takes them (64-bit): larger ones can't reach SQLite.
Id = Annotated[int, PathParam(ge=1, lt=2**63)]
GATEWAY_GROUP = "hive-gateway"
# A notification's link (core/notify.py: 32 random bytes, base64url), and the cookie that
# carries it through the login when the operator had no session.
LINK_PATH = re.compile(r"/n/[A-Za-z0-9_-]{20,100}")
NEXT_COOKIE = "hive_next"
ACTIONS: dict[str, Callable[[str], dict[str, Any]]] = {
    "start": lambda n: {"cmd": "start", "scope": {"agent_names": [n]}},
    "stop": lambda n: {"cmd": "stop", "scope": {"agent_names": [n]}},
    "restart": lambda n: {"cmd": "restart", "name": n},
    "pause": lambda n: {"cmd": "set_paused", "name": n, "paused": True},
    "resume": lambda n: {"cmd": "set_paused", "name": n, "paused": False},
    "destroy": lambda n: {"cmd": "destroy", "name": n},
    "interrupt": lambda n: {"cmd": "interrupt", "name": n},
}


def back_to(referer: str | None) -> str:
    """Where a plain form post sends the browser back to: the dashboard, or the agent page
    the form was on. Always a path built here from a known route; the Referer only picks
    which (its text is never echoed: ``//evil.example/...`` would leave the origin)."""
    try:
        parts = urlsplit(referer or "").path.split("/")
    except ValueError:  # e.g. a malformed IPv6 host
        return "/"
    if len(parts) >= 4 and parts[:2] == ["", "agent"] and NAME_RE.fullmatch(parts[2]):
        return f"/agent/{parts[2]}/"
    if (
        len(parts) >= 6
        and parts[:2] == ["", "swarm"]
        and parts[3] == "agent"
        and NAME_RE.fullmatch(parts[2])
        and NAME_RE.fullmatch(parts[4])
    ):
        return remote_page(parts[2], parts[4])
    return "/"


def remote_page(host: str, name: str) -> str:
    """Another swarm host's agent's page (both names already NAME_RE's)."""
    return f"/swarm/{host}/agent/{name}/"


async def display_js() -> Response:
    return FileResponse(display.JS, media_type="text/javascript; charset=utf-8")


def create_app(hive: Hive, sessions: Sessions) -> FastAPI:
    # The schema is served below, behind the session like everything else.
    app = FastAPI(
        title="hyperhive core", version="1", openapi_url=None, docs_url=None, redoc_url=None
    )
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    # The payload as the text its sha256 was taken of (autoescaped like any other text;
    # Jinja's tojson would show "<" as "\\u003c").
    templates.env.filters["canonical_json"] = payload_json
    # Every {{ … }} shows controls, C1 and bidi characters as escapes (hyperhive.display);
    # the payload's JSON shows them as JSON escapes. Set before any template is compiled.
    templates.env.finalize = visible_value
    templates.env.filters["visible_json"] = visible_json_text
    templates.env.filters["clock"] = cockpit.clock
    templates.env.filters["when"] = cockpit.when
    templates.env.filters["iso"] = cockpit.iso
    templates.env.globals["destination"] = destination
    templates.env.filters["readable"] = readable
    templates.env.filters["rfc3339"] = lambda at: rfc3339(at) if isinstance(at, int | float) else at
    templates.env.filters["raw_json"] = display.dumps
    # The browser's escaping, one file shared with the agent pages (before the mount,
    # which would answer 404 for it).
    app.add_api_route("/static/display.js", display_js, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def session_of(request: Request) -> Session | None:
        return sessions.get(request.cookies.get(COOKIE))

    # async: a plain def dependency runs on the thread pool, a hop per request for a dict
    # lookup, and the first one imported anyio's thread backend (compiled from source: the
    # core's user can't write its bytecode): 80-240 ms on a start's first /api/state.
    async def require_session(request: Request) -> Session:
        session = session_of(request)
        if session is None:
            raise HTTPException(401, "not logged in: open the login URL that `hive up` printed")
        return session

    async def posted_token(request: Request) -> str | None:
        """A POST's CSRF token (header or form field), once its Origin is this origin."""
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if not origin or urlsplit(origin).netloc != host:
            raise HTTPException(403, "cross-origin request refused: Origin must be this origin")
        presented = request.headers.get("x-csrf-token")
        if presented is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")
        ):
            presented = str((await request.form()).get("csrf_token") or "")
        return presented

    async def require_post(
        request: Request, session: Annotated[Session, Depends(require_session)]
    ) -> Session:
        presented = await posted_token(request)
        if not sessions.csrf_ok(session, presented):
            raise HTTPException(403, "missing or wrong CSRF token")
        return session

    @app.get("/api/openapi.json", include_in_schema=False)
    async def openapi(session: Annotated[Session, Depends(require_session)]) -> Response:
        return JSONResponse(app.openapi())

    session_actor = OperatorSession(hive, OPERATOR)  # a web session is the operator

    async def operator(obj: dict[str, Any]) -> dict[str, Any]:
        """The host.sock verb ``obj``, through host.sock's own table: one code path, one
        set of refusals; a refusal's class gives the HTTP status."""
        try:
            reply = await HOST.call(session_actor, HOST.decode(obj))
        except Refused as e:
            raise HTTPException(e.status, str(e)) from None
        assert isinstance(reply, dict)
        return reply

    def escaped_json(reply: dict[str, Any]) -> Response:
        """A reply as /api/state is written: an agent's C1 controls, bidi overrides and
        line separators as escapes (FastAPI's encoder let them through raw to the
        operator's curl and the browser's JSON view: red team of session 32)."""
        return Response(display.dumps_bytes(reply), media_type="application/json")

    def done(request: Request, reply: dict[str, Any], words: str = "done") -> Response:
        """JSON for scripts; a toast in words for the cockpit's htmx post (an action carried
        to another swarm host: that it was, and what became of it); back to the page for a
        plain form."""
        if "application/json" in request.headers.get("accept", ""):
            return escaped_json(reply)
        words = cockpit.carried(words, reply)
        if request.headers.get("hx-request") == "true":
            return HTMLResponse(f'<div class="toast">{escape(visible(words))}</div>')
        return RedirectResponse(back_to(request.headers.get("referer")), status_code=303)

    def refuse(
        request: Request, status: int, reason: str, headers: Mapping[str, str] | None = None
    ) -> Response:
        if request.headers.get("hx-request") == "true":  # the cockpit's post: a red toast
            toast = f'<div class="toast bad">{escape(visible(reason))}</div>'
            return HTMLResponse(toast, status_code=status, headers=headers)
        if "application/json" in request.headers.get("accept", "") or request.url.path.startswith(
            "/api/"
        ):
            body = display.dumps_bytes({"ok": False, "error": reason})  # (agent text escaped)
            return Response(body, status, headers, media_type="application/json")
        return PlainTextResponse(f"{visible(reason, one_line=True)}\n", status, headers)

    @app.exception_handler(StarletteHTTPException)  # ours and Starlette's own (404, 405)
    async def refusal(request: Request, exc: StarletteHTTPException) -> Response:
        return refuse(request, exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_input(request: Request, exc: RequestValidationError) -> Response:
        return refuse(request, 422, _one_line(exc))

    @app.get("/login", include_in_schema=False)
    async def login(request: Request, token: str = "") -> Response:
        session = sessions.login(token)
        if session is None:
            return PlainTextResponse("bad or missing login token\n", status_code=401)
        # Back to the notification link that sent the operator here (only ever /n/<token>).
        after = request.cookies.get(NEXT_COOKIE, "")
        resp = RedirectResponse(after if LINK_PATH.fullmatch(after) else "/", status_code=303)
        resp.set_cookie(
            COOKIE, session.id, max_age=int(SESSION_TTL), httponly=True, samesite="strict", path="/"
        )
        if NEXT_COOKIE in request.cookies:
            resp.delete_cookie(NEXT_COOKIE, path="/login")
        return resp

    @app.get("/n/{token}", include_in_schema=False)
    async def notified(request: Request, token: str, again: int = 0) -> Response:
        """A notification's one-use link (core/notify.py): once logged in, to the dashboard
        focused on its item. It only navigates; acting needs the session and CSRF token."""
        if not LINK_PATH.fullmatch(f"/n/{token}"):
            raise HTTPException(404, "no such link")
        private = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
        if session_of(request) is None:
            if not again:
                # Opened from a notification (another site, an app): the browser leaves the
                # SameSite=Strict session cookie out; one same-origin step brings it along.
                page = (
                    f'<!doctype html><meta http-equiv="refresh" content="0;url=/n/{token}?again=1">'
                    "<title>hive</title><p>opening…</p>\n"
                )
                return HTMLResponse(page, headers=private)
            resp = PlainTextResponse(
                "not logged in: open the login URL that `hive up` printed;"
                " you will land on this item after\n",
                status_code=401,
                headers=private,
            )
            resp.set_cookie(
                NEXT_COOKIE,
                f"/n/{token}",
                max_age=3600,
                httponly=True,
                samesite="lax",
                path="/login",
            )
            return resp
        try:
            focus = hive.follow_link(OPERATOR, token)
        except Refused as e:
            return refuse(request, e.status, str(e), private)
        return RedirectResponse(f"/?focus={focus}", status_code=303, headers=private)

    @app.post("/logout", include_in_schema=False)
    async def logout(
        request: Request, session: Annotated[Session, Depends(require_post)]
    ) -> Response:
        sessions.logout(session)
        resp = RedirectResponse("/", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    def navigation(request: Request) -> bool:
        """Whether the browser is opening this page itself (or a client that isn't a
        browser asks): only then does a page carry the session's CSRF token. A script's
        fetch() (``Sec-Fetch-Mode: cors``/``same-origin``, ``Sec-Fetch-Dest: empty``; the
        browser sets these, no script can) gets the page without it. Red team round 4;
        no agent's script runs in this origin any more (harness pages are sandboxed), so
        this is a second wall."""
        mode = request.headers.get("sec-fetch-mode")
        if mode is None:
            return True
        return mode == "navigate" and request.headers.get("sec-fetch-dest") == "document"

    @app.get("/auth", include_in_schema=False)
    async def auth(request: Request) -> Response:
        """For the gateway's auth_request before a harness's page (``/agent/NAME/page/``):
        204 if the session is valid, 401 if not. No token of any kind: the harness's page
        is sandboxed (an opaque origin) and posts nothing as the operator."""
        return Response(status_code=204 if session_of(request) is not None else 401)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard(request: Request) -> Response:
        session = session_of(request)
        if session is None:
            return PlainTextResponse(
                "not logged in: open the login URL that `hive up` printed\n", status_code=401
            )
        # The token only to a page the browser opens: a script's fetch of "/" (an agent
        # page's, in this origin) gets the page without it.
        csrf = session.csrf if navigation(request) else ""
        view = cockpit.View.of(request.query_params)
        context = {
            **cockpit_context(cockpit.SECTIONS, view, session),
            "csrf_token": csrf,
            "states": cockpit.STATES if hive.swarm_host() is None else cockpit.SWARM_STATES,
        }
        return templates.TemplateResponse(request, "dashboard.html", context)

    status_cache: dict[str, Any] = {"version": None, "second": None, "rows": []}

    def statuses() -> list[dict[str, Any]]:
        """Every agent's status row, built once per change of the hive: at 1,000 agents the
        rows are most of a first screen's cost, and every open cockpit's stream redraws
        from them. ``failed`` also turns on with time alone (a start that never came up),
        so once a second the flags are read again, and only rows whose flags changed are
        copied (rebuilding every row each second cost the first screen's p99)."""
        version, second = hive.bus.version, int(time.monotonic())
        if status_cache["version"] != version:
            status_cache.update(version=version, second=second, rows=hive.statuses())
        elif status_cache["second"] != second:
            rows = status_cache["rows"]
            for i, row in enumerate(rows):
                name = str(row["name"])
                flags = {"running": hive.lifecycle.running(name)}
                flags["failed"] = hive.lifecycle.failed(name)
                if any(row.get(k) != v for k, v in flags.items()):
                    rows[i] = {**row, **flags}
            status_cache["second"] = second
        return list(status_cache["rows"])

    def cockpit_context(
        wanted: Iterable[str], view: cockpit.View, session: Session
    ) -> dict[str, Any]:
        """What the cockpit's sections ``wanted`` show (each reads only its own part)."""
        wanted = set(wanted)
        ctx: dict[str, Any] = {"view": view, "oob": False, "csrf_token": ""}
        agents = statuses() if wanted & {"attention", "agents", "rules"} else []
        if "attention" in wanted:
            approvals, questions = first_screen(view.focus)
            troubled = cockpit.troubled(agents)
            # With [swarm]: the other hosts' questions and approvals (docs/swarm.md).
            elsewhere = {
                f"swarm_{kind}": hive.swarm_listing(OPERATOR, kind) or []
                for kind in ("questions", "approvals")
            }
            ctx.update(
                approvals=approvals["approvals"],
                approvals_total=approvals["total"],
                approvals_more=approvals["more"],
                questions=questions["questions"],
                questions_total=questions["total"],
                questions_more=questions["more"],
                questions_capped=questions["capped"],
                approvals_capped=approvals["capped"],
                per_agent=PER_AGENT_SHOWN,
                troubled=troubled,
                attention_count=approvals["total"]
                + questions["total"]
                + len(troubled)
                + sum(len(rows) for rows in elsewhere.values()),
                **elsewhere,
            )
        if "agents" in wanted:
            # With [swarm]: the other hosts' agents too, in the same filter and paging.
            elsewhere_agents = hive.swarm_listing(OPERATOR, "agents")
            if elsewhere_agents is None:
                ctx["table"] = cockpit.agent_table(agents, view)
            else:
                ctx["table"] = cockpit.agent_table(
                    [*agents, *elsewhere_agents], view, here=hive.swarm_host()
                )
                # The send box's hosts (its datalist lives in this section, so it is fresh).
                ctx["swarm_hosts"] = sorted({str(r["host"]) for r in elsewhere_agents})
        if "inbox" in wanted:
            mark, read = hive.inbox_read_state(OPERATOR)
            newest = hive.inbox_newest(OPERATOR, cockpit.INBOX_SHOWN)
            unread = hive.inbox_unread(OPERATOR)
            # Unread messages older than the newest page, fair by sender: no flood, before or
            # after another agent's message, keeps it off the screen (red team round 23b).
            older = (
                hive.inbox_older_unread(
                    OPERATOR,
                    mark,
                    min(m.id or 0 for m in newest),
                    read,
                    PER_AGENT_SHOWN,
                    cockpit.INBOX_SHOWN,
                )
                if newest and unread
                else []
            )
            shown_unread = [
                m
                for m in [*newest, *older]
                if m.id is not None and m.id > mark and m.id not in read
            ]
            # "mark read" marks what the page has shown for a moment: a message drawn just
            # now (below the button: nothing moves) is left for the next redraw (re-check
            # of session 19: one arriving under the operator's click was marked read)
            settled = time.time() - MARK_READ_SETTLE
            to_mark = [m.id for m in shown_unread if getattr(m, "sent_at", 0) <= settled]
            ctx.update(
                inbox=rows_out(newest),
                inbox_older=rows_out(older),
                inbox_total=hive.inbox_count(OPERATOR),
                inbox_unread=unread,
                inbox_unread_shown=f"{hive.UNREAD_COUNTED}+"
                if unread > hive.UNREAD_COUNTED
                else unread,
                inbox_unread_ids={m.id for m in shown_unread},
                inbox_shown=",".join(map(str, to_mark)),
                per_agent=PER_AGENT_SHOWN,
            )
        if "messages" in wanted:
            ctx["messages"] = rows_out(hive.recent_messages(OPERATOR, 50))
        if "rules" in wanted:
            rules = rules_out(hive.egress_rules(OPERATOR, None))
            names = sorted(str(a["name"]) for a in agents)
            ctx["rule_rows"] = [(n, rules[n]) for n in names if rules.get(n)]
            ctx["no_rules"], ctx["no_rules_more"] = cockpit.no_rules(
                [n for n in names if not rules.get(n)]
            )
        if "secrets" in wanted:
            ctx["secrets"] = hive.secret_ls(OPERATOR)  # names and bindings, never a value
        if "log" in wanted:
            ctx["egress_log"] = hive.egress_log_fair(OPERATOR, EGRESS_LOG_SHOWN)
        return ctx

    def render_sections(wanted: Iterable[str], view: cockpit.View, session: Session) -> str:
        """The sections ``wanted`` as out-of-band swaps (no CSRF token: a stream is read by
        script, and a page's script must never get the session's token)."""
        wanted = [s for s in cockpit.SECTIONS if s in set(wanted)]
        ctx = {**cockpit_context(wanted, view, session), "oob": True}
        return "".join(templates.get_template(f"cockpit/{s}.html").render(ctx) for s in wanted)

    def agent_context(name: str) -> dict[str, Any]:
        """What the operator's view of agent NAME shows (but its transcript)."""
        try:
            state = hive.agent_page(OPERATOR, name, AGENT_EGRESS_SHOWN)
        except Refused:
            raise HTTPException(404, "no such agent") from None
        return {
            "agent": state["agent"],
            "questions_rows": state["questions"],
            "questions_total": state["questions_total"],
            "approvals_rows": state["approvals"],
            "approvals_total": state["approvals_total"],
            "egress_rules": state["egress_rules"],
            "egress_log": state["egress_log"],
        }

    @app.get("/agent/{name}/", response_class=HTMLResponse, include_in_schema=False)
    async def agent_view(
        request: Request, name: str, session: Annotated[Session, Depends(require_session)]
    ) -> Response:
        """The operator's view of agent NAME: rendered here, from the core's store. The
        agent's harness serves a page of its own at ``/agent/NAME/page/``, sandboxed."""
        context = agent_context(name)
        entries = hive.transcript(OPERATOR, name, 0, TRANSCRIPT_SHOWN).items
        csrf = session.csrf if navigation(request) else ""
        return templates.TemplateResponse(
            request,
            "agent.html",
            {
                **context,
                "entries": entries,
                "last_id": entries[-1]["id"] if entries else 0,
                # What the open page keeps of the stream's entries (static/agent.js): what it
                # opens with at most, each entry drawn as its text and its JSON.
                "transcript_max_entries": TRANSCRIPT_SHOWN,
                "transcript_max_chars": 2 * hive.config.limits.reply_bytes,
                "csrf_token": csrf,
            },
        )

    @app.get("/agent/{name}/state", include_in_schema=False)
    async def agent_state(
        name: str, session: Annotated[Session, Depends(require_session)]
    ) -> Response:
        """Agent NAME's page state as JSON: status, the first page of its questions to the
        operator and of its pending approvals (summaries, with counts), its egress."""
        try:
            state = hive.agent_page(OPERATOR, name, AGENT_EGRESS_SHOWN)
        except Refused:
            raise HTTPException(404, "no such agent") from None
        return Response(display.dumps_bytes(state), media_type="application/json")

    @app.get("/agent/{name}/events", include_in_schema=False)
    async def agent_events(
        name: str,
        session: Annotated[Session, Depends(require_session)],
        after: Annotated[int, Query(ge=0, lt=2**63)] = 0,
    ) -> Response:
        """Agent NAME's page, live (server-sent events of HTML for htmx): ``state``, the
        header, loose ends and egress as out-of-band fragments keyed by id, at once and
        after each change; ``transcript``, the entries after AFTER, then each new one."""
        agent_context(name)  # 404 before the stream starts
        state_html = templates.env.get_template("agent_live_state.html")
        entries_html = templates.env.get_template("agent_entries.html")
        kinds = frozenset(PAGE_PARTS)

        async def events() -> AsyncIterator[bytes]:
            sub = hive.events(OPERATOR, kinds)
            last, due = after, set(PAGE_PARTS.values())
            try:
                yield CONNECTED
                quiet = events_or_quiet(sub)
                while True:
                    if due - {"transcript"}:
                        try:
                            context = agent_context(name)
                        except HTTPException:
                            return  # the agent is gone
                        yield sse("state", state_html.render(parts=due, **context))
                    while "transcript" in due:
                        try:
                            page = hive.transcript(OPERATOR, name, last, TRANSCRIPT_SHOWN)
                        except Refused:
                            return
                        if page.items:
                            last = page.items[-1]["id"]
                            yield sse("transcript", entries_html.render(entries=page.items))
                        if not page.more:
                            break
                    due = set()
                    try:
                        event = await anext(quiet)
                    except StopAsyncIteration:
                        return  # cut off (fell behind): the browser reconnects
                    if event is None:
                        yield KEEP_ALIVE
                        continue
                    while True:  # a burst of events: one redraw of each part
                        part = concerns(event, name)
                        if part is not None:
                            due.add(part)
                        if sub.queue.empty():
                            break
                        event = await sub.get()
                        if event is None:
                            return
            finally:
                hive.bus.unsubscribe(sub)

        return sse_response(events())

    def remote_context(host: str, name: str) -> dict[str, Any]:
        """What this host's copy of the swarm's roster knows of agent NAME on host HOST: its
        row (None: not listed), with its state and the actions that make sense now, and its
        open questions to the operator and pending approvals. Rows are matched on the roster
        key's host and name (what NATS vouches for), never on a field a row's value says."""
        row = next(
            (
                r
                for r in hive.swarm_listing(OPERATOR, "agents") or []
                if r.get("host") == host and r.get("name") == name
            ),
            None,
        )
        if row is not None:
            row = {**row, "state": cockpit.state_of(row), "actions": cockpit.actions_for(row)}
        mine = {"questions": "asker", "approvals": "agent"}
        items = {
            f"remote_{kind}": [
                r
                for r in hive.swarm_listing(OPERATOR, kind) or []
                if r.get("host") == host and r.get(who) == name
            ]
            for kind, who in mine.items()
        }
        return {"host": host, "name": name, "here": hive.swarm_host(), "row": row, **items}

    def remote_or_refuse(host: str, name: str) -> str | None:
        """None when agent NAME on host HOST can have a page here; else this host's own
        name (its page is /agent/NAME/). Refused (404) without a swarm or with a name
        that could not be a host's or an agent's."""
        here = hive.swarm_host()
        if here is None:
            raise HTTPException(404, "this hive is not in a swarm")
        if not (NAME_RE.fullmatch(host) and NAME_RE.fullmatch(name)):
            raise HTTPException(404, "no such host or agent")
        return here if host == here else None

    @app.get("/swarm/{host}/agent/{name}/", response_class=HTMLResponse, include_in_schema=False)
    async def remote_agent_view(
        request: Request,
        host: str,
        name: str,
        session: Annotated[Session, Depends(require_session)],
    ) -> Response:
        """Agent NAME on another swarm host HOST, as the roster shows it (docs/swarm.md):
        its state, status and questions and approvals, with the steering actions carried
        there. This host's own name: its agent page."""
        if remote_or_refuse(host, name) is not None:
            return RedirectResponse(f"/agent/{name}/", status_code=303)
        context = remote_context(host, name)
        if context["row"] is None:
            hosts = {h["host"] for h in (hive.swarm_status(OPERATOR) or {}).get("hosts", [])}
            if host not in hosts:
                raise HTTPException(404, f"no host {host!r} in the swarm")
            raise HTTPException(404, f"no agent {name!r} on host {host} in the swarm's roster")
        csrf = session.csrf if navigation(request) else ""
        return templates.TemplateResponse(
            request, "remote_agent.html", {**context, "oob": False, "csrf_token": csrf}
        )

    @app.get("/swarm/{host}/agent/{name}/events", include_in_schema=False)
    async def remote_agent_events(
        host: str, name: str, session: Annotated[Session, Depends(require_session)]
    ) -> Response:
        """That page, live: its section drawn again (an out-of-band morph, no CSRF token)
        once, then after each burst of changes to the other hosts' roster."""
        if remote_or_refuse(host, name) is not None:
            raise HTTPException(404, "this host's agent: see /agent/NAME/")
        section = templates.get_template("cockpit/remote_agent.html")

        def draw() -> bytes:
            context = {**remote_context(host, name), "oob": True, "csrf_token": ""}
            return sse("update", section.render(context))

        async def events() -> AsyncIterator[bytes]:
            sub = hive.events(OPERATOR, frozenset({"swarm"}), lossy=True)
            loop = asyncio.get_running_loop()
            try:
                yield draw()
                async for event in events_or_quiet(sub):
                    if event is None:
                        yield KEEP_ALIVE
                        continue
                    until = loop.time() + LIVE_COALESCE
                    while (left := until - loop.time()) > 0:  # a burst: one redraw
                        try:
                            if await asyncio.wait_for(sub.get(), left) is None:
                                return
                        except TimeoutError:
                            break
                    yield draw()
            finally:
                hive.bus.unsubscribe(sub)

        return sse_response(events())

    @app.get("/agent/{name}/{rest:path}", include_in_schema=False)
    async def agent_other(
        name: str, rest: str, session: Annotated[Session, Depends(require_session)]
    ) -> Response:
        agent_context(name)
        raise HTTPException(404, "no such page")

    def approval_page(after: int, limit: int) -> dict[str, Any]:
        page = hive.pending_page(OPERATOR, after, limit)
        return {"approvals": [shown(a) for a in page.items], "total": page.total, "more": page.more}

    def question_page(after: int, limit: int) -> dict[str, Any]:
        page = hive.questions_for(OPERATOR, after, limit)
        return {"questions": rows_out(page.items), "total": page.total, "more": page.more}

    def first_screen(focus: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The cockpit's pending approvals and open questions: the oldest, at most
        PER_AGENT_SHOWN of any one agent; and the item a notification's link names
        (``?focus=question-N``), if it is still open, wherever it stands in the queue."""
        apage = hive.pending_first_screen(OPERATOR, PER_AGENT_SHOWN, PAGE)
        qpage = hive.questions_first_screen(OPERATOR, PER_AGENT_SHOWN, PAGE)
        approvals = [shown(a) for a in apage.items]
        questions = rows_out(qpage.items)
        kind, _, ident = (focus or "").partition("-")
        if kind == "question" and all(q["id"] != int(ident) for q in questions):
            page = hive.questions_for(OPERATOR, int(ident) - 1, 1)
            if page.items and page.items[0].id == int(ident):
                questions += rows_out(page.items)
        elif kind == "approval" and all(a["id"] != int(ident) for a in approvals):
            pending = hive.pending_page(OPERATOR, int(ident) - 1, 1)
            if pending.items and pending.items[0].id == int(ident):
                approvals.append(shown(pending.items[0]))
        return (
            {
                "approvals": approvals,
                "total": apage.total,
                "more": apage.more,
                "capped": apage.capped,
            },
            {
                "questions": questions,
                "total": qpage.total,
                "more": qpage.more,
                "capped": qpage.capped,
            },
        )

    def state() -> dict[str, Any]:
        approvals, questions = approval_page(0, PAGE), question_page(0, PAGE)
        return {
            "agents": statuses(),
            "approvals": approvals["approvals"],
            "approvals_total": approvals["total"],
            "approvals_more": approvals["more"],
            "questions": questions["questions"],
            "questions_total": questions["total"],
            "questions_more": questions["more"],
            "messages": rows_out(hive.recent_messages(OPERATOR, 50)),
            # Every change to either publishes an "egress" event, which bumps the bus version
            # the cache below keys on.
            "egress_rules": rules_out(hive.egress_rules(OPERATOR, None)),
            "egress_log": hive.egress_log_fair(OPERATOR, EGRESS_LOG_SHOWN),
            **{
                f"swarm_{kind}": rows
                for kind in ("agents", "questions", "approvals")
                if (rows := hive.swarm_listing(OPERATOR, kind)) is not None
            },
        }

    cache: dict[str, Any] = {"key": None, "body": b""}

    @app.get("/api/state", response_model=StateModel, responses=NOT_LOGGED_IN)
    async def api_state(session: Annotated[Session, Depends(require_session)]) -> Response:
        """Everything the dashboard's first screen shows: agents, the first page of the pending
        approvals and of the open questions (with their counts), recent messages (summaries),
        every agent's egress rules and the egress proxy's latest decisions (newest first)."""
        # Rendered once per change (and at least once a second, for time-based flags like failed).
        key = (hive.bus.version, int(time.monotonic()))
        if cache["key"] != key:
            cache["key"], cache["body"] = key, display.dumps_bytes(state())
        return Response(cache["body"], media_type="application/json")

    def as_listed(event: dict[str, Any]) -> dict[str, Any]:
        """An event with what /api/state adds to its row, so the dashboard can redraw it
        without reading the state again: an approval's ``allows``; a change of an agent's
        egress rules, with the rules as /api/state lists them (source, added_at)."""
        approval = event.get("approval")
        if isinstance(approval, dict) and "unreadable" not in approval:
            rule = allows_of(approval.get("kind"), approval.get("payload"))
            return event if rule is None else {**event, "approval": {**approval, "allows": rule}}
        if event.get("kind") != "egress" or "rules" not in event:
            return event
        try:
            rows = hive.egress_rules(OPERATOR, str(event.get("agent"))).get(event["agent"], [])
        except Refused:  # the agent is gone: it has no rules
            rows = []
        return {**event, "rows": rows}

    @app.get("/api/dashboard/stream", include_in_schema=False)
    async def stream(
        request: Request,
        session: Annotated[Session, Depends(require_session)],
        view: Literal["json", "html"] = "json",
    ) -> Response:
        kinds = frozenset(cockpit.TOUCHES)
        if view == "html":
            return sse_response(
                live_sections(cockpit.View.of(request.query_params), session, kinds)
            )

        async def events() -> AsyncIterator[bytes]:
            sub = hive.events(OPERATOR, kinds)
            try:
                yield CONNECTED
                async for event in events_or_quiet(sub):
                    if event is None:
                        yield KEEP_ALIVE
                        continue
                    # The changed row itself, summarised as /api/state shows it.
                    data = display.dumps(summarise_event(as_listed(event)))
                    yield f"event: {event['kind']}\ndata: {data}\n\n".encode()
            finally:
                hive.bus.unsubscribe(sub)

        return sse_response(events())

    async def live_sections(
        view: cockpit.View, session: Session, kinds: frozenset[str]
    ) -> AsyncIterator[bytes]:
        """The cockpit's live stream: every section once (what changed since the page was
        rendered, or while the stream was down), then, for each burst of events, the
        sections they touched, rendered again (at most every LIVE_COALESCE seconds)."""
        sub = hive.events(OPERATOR, kinds, lossy=True)  # lossy: a section is redrawn whole
        loop = asyncio.get_running_loop()
        try:
            yield sse("update", render_sections(cockpit.SECTIONS, view, session))
            async for event in events_or_quiet(sub):
                if event is None:
                    yield KEEP_ALIVE
                    continue
                touched = set(cockpit.TOUCHES.get(str(event.get("kind")), ()))
                until = loop.time() + LIVE_COALESCE
                while (left := until - loop.time()) > 0:
                    try:
                        more = await asyncio.wait_for(sub.get(), left)
                    except TimeoutError:
                        break
                    if more is None:
                        return
                    touched |= cockpit.TOUCHES.get(str(more.get("kind")), frozenset())
                if touched:
                    yield sse("update", render_sections(touched, view, session))
        finally:
            hive.bus.unsubscribe(sub)

    Page = Annotated[int, Query(ge=1, le=PAGE_MAX)]
    After = Annotated[int, Query(ge=0, lt=2**63)]

    @app.get("/api/approvals", response_model=ApprovalPage, responses=GET_RESPONSES)
    async def api_approvals(
        session: Annotated[Session, Depends(require_session)], after: After = 0, limit: Page = PAGE
    ) -> Response:
        """Pending approvals with an id above AFTER, oldest first, as summaries."""
        return Response(
            display.dumps_bytes(approval_page(after, limit)), media_type="application/json"
        )

    @app.get("/api/questions", response_model=QuestionPage, responses=GET_RESPONSES)
    async def api_questions(
        session: Annotated[Session, Depends(require_session)], after: After = 0, limit: Page = PAGE
    ) -> Response:
        """Open questions to the operator with an id above AFTER, oldest first, as summaries."""
        return Response(
            display.dumps_bytes(question_page(after, limit)), media_type="application/json"
        )

    # With [swarm]: another host's item, asked of that host (docs/swarm.md).
    OnHost = Annotated[str | None, Query(pattern=NAME_RE.pattern)]

    @app.get("/api/approvals/{aid}", response_model=Reply, responses=GET_RESPONSES)
    async def api_approval(
        aid: Id, session: Annotated[Session, Depends(require_session)], host: OnHost = None
    ) -> Any:
        """Approval AID whole (``approval``): the exact payload approving applies. HOST:
        another swarm host's pending approval, its payload checked against its sha256."""
        return escaped_json(await operator({"cmd": "show_approval", "id": aid, **_on(host)}))

    @app.get("/api/questions/{qid}", response_model=Reply, responses=GET_RESPONSES)
    async def api_question(
        qid: Id, session: Annotated[Session, Depends(require_session)], host: OnHost = None
    ) -> Any:
        """Question QID whole (``question``); HOST: another swarm host's open question."""
        return escaped_json(await operator({"cmd": "show_question", "id": qid, **_on(host)}))

    @app.get("/api/messages/{mid}", response_model=Reply, responses=GET_RESPONSES)
    async def api_message(mid: Id, session: Annotated[Session, Depends(require_session)]) -> Any:
        """Message MID whole (``message``)."""
        return escaped_json(await operator({"cmd": "show_message", "id": mid}))

    @app.get("/api/agents/{name}/transcript", response_model=Reply, responses=GET_RESPONSES)
    async def transcript(
        name: str,
        session: Annotated[Session, Depends(require_session)],
        after: Annotated[int, Query(ge=0, lt=2**63)] = 0,
        limit: Annotated[int, Query(ge=1, le=5000)] = 200,
    ) -> Response:
        """Agent NAME's transcript entries after AFTER."""
        return escaped_json(
            await operator({"cmd": "transcript", "name": name, "after": after, "limit": limit})
        )

    @app.post("/answer-question/{qid}", responses=POST_RESPONSES)
    async def answer_question(
        request: Request,
        qid: Id,
        session: Annotated[Session, Depends(require_post)],
        answer: Annotated[str | None, Form(max_length=262144)] = None,
        option: Annotated[str | None, Form(max_length=6 * 262144)] = None,
        check_options: Annotated[str | None, Form(max_length=8)] = None,
        other: Annotated[str | None, Form(max_length=8)] = None,
        host: Annotated[str | None, Form(max_length=64)] = None,
    ) -> Response:
        """Answer a question an agent addressed to the operator (operator authority): the
        text ``answer``, or ``option``, an option as a JSON string (the cockpit's buttons:
        a value attribute drew it through ``visible``, so an option with a right-to-left
        mark or a CR was answered with its escapes, none of the options: red team of
        session 32; HTML would turn its CR into LF). With ``check_options`` (the cockpit's
        free-text answer), an answer that is not one of the question's options is refused
        unless ``other`` says it is meant. ``host``: the swarm host the question is on (the
        answer is carried there)."""
        if option is not None:
            try:
                answer = json.loads(option)
            except ValueError:
                answer = None
            if not isinstance(answer, str):
                raise HTTPException(422, "option must be a JSON string")
        if answer is None:
            raise HTTPException(422, "an answer is required (answer, or option)")
        if check_options and not other and not host:
            q = await operator({"cmd": "show_question", "id": qid})
            options = (q.get("question") or {}).get("options") or []
            if options and answer not in options:
                listed = ", ".join(repr(o) for o in options[:10])
                raise HTTPException(
                    422,
                    f"{answer!r} is not one of question {qid}'s options ({listed}); tick"
                    " 'not one of the options' to send it anyway",
                )
        reply = await operator({"cmd": "answer_question", "id": qid, "answer": answer, **_on(host)})
        return done(request, reply, cockpit.said("answer_question", id=qid))

    @app.post("/approve/{aid}", responses=POST_RESPONSES)
    async def approve(
        request: Request,
        aid: Id,
        session: Annotated[Session, Depends(require_post)],
        host: Annotated[str | None, Form(max_length=64)] = None,
        payload_sha256: Annotated[str | None, Form(max_length=64)] = None,
    ) -> Response:
        """Approve: applies exactly the stored payload, once (``payload_sha256``: refused
        unless it is that payload's; ``host``: the swarm host the approval is on)."""
        sha = {"payload_sha256": payload_sha256} if payload_sha256 else {}
        reply = await operator({"cmd": "approve", "id": aid, **sha, **_on(host)})
        return done(request, reply, cockpit.said("approve", id=aid))

    @app.post("/deny/{aid}", responses=POST_RESPONSES)
    async def deny(
        request: Request,
        aid: Id,
        session: Annotated[Session, Depends(require_post)],
        note: Annotated[str | None, Form(max_length=4096)] = None,
        host: Annotated[str | None, Form(max_length=64)] = None,
    ) -> Response:
        """Deny an approval, with an optional note for the agent (``host``: the swarm host
        the approval is on)."""
        reply = await operator(
            {"cmd": "deny", "id": aid, **({"note": note} if note else {}), **_on(host)}
        )
        return done(request, reply, cockpit.said("deny", id=aid))

    # Before /api/agents/{name}/{action}: not that they could clash (three segments, not two).
    @app.post("/api/agents/{name}/egress/allow", responses=POST_RESPONSES)
    async def egress_allow(
        request: Request,
        name: str,
        rule: Annotated[str, Form(max_length=MAX_RULE)],
        session: Annotated[Session, Depends(require_post)],
        agent: Annotated[str | None, Form(max_length=64)] = None,
    ) -> Response:
        """Add RULE (``HOST:PORT``) to agent NAME's egress allowlist (source ``operator``),
        live at once. NAME ``_`` takes the agent from the form's ``agent`` field (the
        cockpit's form, posted without a script)."""
        name = agent if name == "_" and agent else name
        reply = await operator({"cmd": "egress_allow", "name": name, "rule": rule})
        return done(request, reply, cockpit.said("egress_allow", name=name, rule=rule))

    @app.post("/api/agents/{name}/egress/remove", responses=POST_RESPONSES)
    async def egress_remove(
        request: Request,
        name: str,
        rule: Annotated[str, Form(max_length=MAX_RULE)],
        session: Annotated[Session, Depends(require_post)],
    ) -> Response:
        """Remove RULE from agent NAME's egress allowlist, whatever its source; refused at
        once after."""
        reply = await operator({"cmd": "egress_remove", "name": name, "rule": rule})
        return done(request, reply, cockpit.said("egress_remove", name=name, rule=rule))

    @app.post("/api/secrets/{name}/bind", responses=POST_RESPONSES)
    async def secret_bind(
        request: Request,
        name: str,
        agents: Annotated[str, Form(max_length=65536)],
        to: Annotated[str, Form(max_length=300)],
        header: Annotated[str, Form(max_length=200)],
        session: Annotated[Session, Depends(require_post)],
        secret: Annotated[str | None, Form(max_length=64)] = None,
        env: Annotated[str | None, Form(max_length=64)] = None,
    ) -> Response:
        """Bind secret NAME for AGENTS (names, split at commas or spaces) to TO (``HOST:PORT``)
        and HEADER (``x-api-key: {}``), the placeholder in ENV; host.sock's ``secret_bind``,
        as ``hive secret bind``. NAME ``_`` takes the form's ``secret`` field. No value is
        ever taken here: a secret is set only from the command line (stdin or a file)."""
        name = secret if name == "_" and secret else name
        names = [a for a in re.split(r"[\s,]+", agents) if a]
        cmd = {"cmd": "secret_bind", "name": name, "agents": names, "to": to, "header": header}
        reply = await operator({**cmd, **({"env": env} if env else {})})
        words = cockpit.said("secret_bind", name=name, agents=", ".join(names), to=reply.get("to"))
        return done(request, reply, words)

    @app.post("/api/secrets/{name}/unbind", responses=POST_RESPONSES)
    async def secret_unbind(
        request: Request,
        name: str,
        session: Annotated[Session, Depends(require_post)],
        agent: Annotated[str | None, Form(max_length=64)] = None,
    ) -> Response:
        """Remove secret NAME's binding for AGENT (every binding of it without one); the
        proxy stops using it at once. host.sock's ``secret_unbind``, as ``hive secret unbind``."""
        agents = [agent] if agent else []
        reply = await operator({"cmd": "secret_unbind", "name": name, "agents": agents})
        return done(request, reply, cockpit.said("secret_unbind", name=name, agents=agent))

    @app.post("/api/agents/{name}/send", responses=POST_RESPONSES)
    async def send(
        request: Request,
        name: str,
        body: Annotated[str, Form(max_length=262144)],
        session: Annotated[Session, Depends(require_post)],
        to: Annotated[str | None, Form(max_length=64)] = None,
        host: Annotated[str | None, Form(max_length=64)] = None,
    ) -> Response:
        """Message agent NAME as the operator (NAME ``_``: the form's ``to`` field;
        ``host``: the swarm host the agent is on, where the message is carried)."""
        name = to if name == "_" and to else name
        reply = await operator({"cmd": "send", "to": name, "body": body, **_on(host)})
        return done(request, reply, cockpit.said("send", name=name))

    @app.post("/api/agents/{name}/{action}", responses=POST_RESPONSES)
    async def lifecycle(
        request: Request,
        name: str,
        action: str,
        session: Annotated[Session, Depends(require_post)],
        host: Annotated[str | None, Form(max_length=64)] = None,
        created_at: Annotated[float | None, Form(ge=0, allow_inf_nan=False)] = None,
    ) -> Response:
        """start, stop, restart, pause, resume, destroy or interrupt agent NAME (``host``:
        the swarm host the agent is on; the action is signed and carried there;
        ``created_at``: the agent as the page drew it, the action refused if it is not
        that one any more)."""
        make = ACTIONS.get(action)
        if make is None:
            raise HTTPException(404, f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        wanted = make(name)
        if created_at is not None:  # start and stop name agents in a scope: bound by name
            wanted["created_at"] = {name: created_at} if "scope" in wanted else created_at
        reply = await operator({**wanted, **_on(host)})
        return done(request, reply, cockpit.said(action, name=name))

    @app.post("/api/spawn", responses=POST_RESPONSES)
    async def spawn(
        request: Request,
        name: Annotated[str, Form(max_length=64)],
        spec: Annotated[str, Form(max_length=65536)],
        session: Annotated[Session, Depends(require_post)],
        host: Annotated[str | None, Form(max_length=64)] = None,
    ) -> Response:
        """Create and start an agent; SPEC is its JSON spec (``host``: on that swarm host)."""
        try:  # parsed as host.sock parses a request: a JSON object, 64-bit integers, finite numbers
            parsed = parse_line(spec.encode())
        except WireError as e:
            raise HTTPException(422, f"spec: {e}") from None
        reply = await operator({"cmd": "spawn", "name": name, "spec": parsed, **_on(host)})
        return done(request, reply, cockpit.said("spawn", name=name))

    @app.post("/inbox/read", include_in_schema=False)
    async def inbox_read(
        request: Request,
        session: Annotated[Session, Depends(require_post)],
        upto: Annotated[int, Form(ge=0, lt=2**63)] = 0,
        shown: Annotated[str, Form(max_length=64 * 21)] = "",
    ) -> Response:
        """Mark read the unread messages the page showed (``shown``: their ids), for the
        operator (every session: store/inbox.py); one not shown stays unread (red team
        round 23b: "mark read" up to the newest marked read what a flood had pushed off
        the page). Without ``shown``, those up to UPTO of the newest page."""
        try:
            ids = {int(i) for i in shown.split(",") if i.strip()}
        except ValueError:
            raise HTTPException(422, "shown: message ids, separated by commas") from None
        if not ids and upto:
            ids = {m.id for m in hive.inbox_newest(OPERATOR, cockpit.INBOX_SHOWN) if m.id}
            ids = {i for i in ids if i <= upto}
        hive.inbox_mark_read(OPERATOR, ids)
        reply = done(request, {"version": 1, "ok": True}, cockpit.said("inbox_read"))
        if request.headers.get("hx-request") == "true":  # no event says so: the inbox too
            inbox = render_sections(["inbox"], cockpit.View(), session)
            return HTMLResponse(bytes(reply.body).decode() + inbox)
        return reply

    WHOLE: dict[str, tuple[str, str, tuple[str, ...]]] = {
        "questions": ("show_question", "question", ("question", "options")),
        "approvals": ("show_approval", "approval", ("description", "payload")),
        "messages": ("show_message", "message", ("body",)),
    }

    @app.get("/cockpit/{kind}/{rid}", response_class=HTMLResponse, include_in_schema=False)
    async def whole(
        kind: Literal["questions", "approvals", "messages"],
        rid: Id,
        session: Annotated[Session, Depends(require_session)],
        host: OnHost = None,
    ) -> Response:
        """A cut row's fields whole, as text (a listing's "show all"); HOST: another swarm
        host's question or approval, asked of that host."""
        verb, key, fields = WHOLE[kind]
        on = _on(host) if kind != "messages" else {}
        row = (await operator({"cmd": verb, "id": rid, **on})).get(key) or {}
        parts = [
            (f, v if isinstance(v, str) else payload_json(v)) for f in fields if (v := row.get(f))
        ]
        html = templates.get_template("cockpit/whole.html").render(parts=parts)
        return HTMLResponse(html)

    return app


class _Server(uvicorn.Server):
    """uvicorn's server, stopped at once: its own main loop looks at ``should_exit`` every
    0.1 s and its shutdown sleeps 0.1 s for connections to see theirs, ~0.2 s of every
    stop of the core (and of every restart, which every agent waits for)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._exit = asyncio.Event()

    def stop(self) -> None:
        self.should_exit = True
        self._exit.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # hive-core handles SIGINT/SIGTERM itself

    async def main_loop(self) -> None:
        # on_tick refreshes the Date header when its counter is a multiple of 10: each
        # second, as uvicorn's does, but woken at once by stop().
        ticks = 0
        while not await self.on_tick(ticks):
            ticks += 10
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit.wait(), 1.0)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.server_state.connections or self.server_state.tasks:
            await super().shutdown(sockets)
            return
        for server in self.servers:  # nothing to tell anyone: stop accepting, and go
            server.close()
        for sock in sockets or []:
            sock.close()


def bind_core_socket(path: Path) -> socket.socket:
    """core.sock: ours, the gateway's group, 0660 (uvicorn would make it 0666).
    Without a gateway group on this host (the core alone, in tests): root and the core only."""
    try:
        gid: int | None = grp.getgrnam(GATEWAY_GROUP).gr_gid
        if gid not in os.getgroups() and os.geteuid() != 0:
            gid = None
    except KeyError:
        gid = None
    sock = bind_listener(path, gid, 0o660, backlog=512)
    sock.setblocking(False)
    return sock


async def serve_http(
    app: FastAPI, path: Path, handed: socket.socket | None = None
) -> tuple[asyncio.Task[None], _Server]:
    """Serve core.sock: the listener ``hive up`` (or systemd) ``handed`` us, or our own."""
    if handed is not None:
        handed.setblocking(False)
    sock = handed or bind_core_socket(path)
    server = _Server(
        uvicorn.Config(
            app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=2
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    return task, server

"""The core's HTTP surface on ``core.sock``, behind the gateway: the operator's
login, the dashboard, and the operator-authority actions as POSTs.

Every action goes through the same handlers as ``host.sock`` (one code path,
one set of refusals); HTTP only adds the session, the CSRF token and the
same-origin check. An agent can't reach any of this: its cage has no route to
the gateway, and core.sock is ``hive-core:hive-gateway 0660``."""


import asyncio
import contextlib
import grp
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import uvicorn
from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.responses import StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from hyperhive.core.hive import Hive
from hyperhive.core.host_socket import OperatorSession
from hyperhive.core.sessions import COOKIE, SESSION_TTL, Session, Sessions
from hyperhive.names import OPERATOR
from hyperhive.wire.common import AgentStatus, Approval, Question
from pydantic import BaseModel
from hyperhive.wire.framing import model_fields_only

HERE = Path(__file__).parent


class StateModel(BaseModel):
    agents: list[AgentStatus]
    approvals: list[Approval]
    questions: list[Question]
    messages: list[dict[str, Any]]
GATEWAY_GROUP = "hive-gateway"
ACTIONS = {
    "start": lambda n: {"cmd": "start", "scope": {"agent_names": [n]}},
    "stop": lambda n: {"cmd": "stop", "scope": {"agent_names": [n]}},
    "restart": lambda n: {"cmd": "restart", "name": n},
    "pause": lambda n: {"cmd": "set_paused", "name": n, "paused": True},
    "resume": lambda n: {"cmd": "set_paused", "name": n, "paused": False},
    "destroy": lambda n: {"cmd": "destroy", "name": n},
    "interrupt": lambda n: {"cmd": "interrupt", "name": n},
}


def create_app(hive: Hive, sessions: Sessions) -> FastAPI:
    app = FastAPI(title="hyperhive core", version="1", openapi_url="/api/openapi.json", docs_url=None,
                  redoc_url=None)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def session_of(request: Request) -> Session | None:
        return sessions.get(request.cookies.get(COOKIE))

    def require_session(request: Request) -> Session:
        session = session_of(request)
        if session is None:
            raise HTTPException(401, "not logged in: open the login URL that `hive up` printed")
        return session

    async def require_post(request: Request, session: Annotated[Session, Depends(require_session)]) -> Session:
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if not origin or urlsplit(origin).netloc != host:
            raise HTTPException(403, "cross-origin request refused: Origin must be this origin")
        presented = request.headers.get("x-csrf-token")
        if presented is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")
        ):
            presented = str((await request.form()).get("csrf_token") or "")
        if not sessions.csrf_ok(session, presented):
            raise HTTPException(403, "missing or wrong CSRF token")
        return session

    async def operator(obj: dict[str, Any]) -> dict[str, Any]:
        reply = await OperatorSession(hive).handle(obj)
        assert isinstance(reply, dict)
        if not reply.get("ok"):
            error = str(reply.get("error"))
            raise HTTPException(404 if error.startswith("no ") else 409, error)
        return reply

    def done(request: Request, reply: dict[str, Any]) -> Response:
        """JSON for scripts and the dashboard's fetch; back to the page for a plain form."""
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse(reply)
        back = urlsplit(request.headers.get("referer", "/"))
        return RedirectResponse(back.path if back.path.startswith("/") else "/", status_code=303)

    @app.exception_handler(HTTPException)
    async def refusal(request: Request, exc: HTTPException) -> Response:
        if "application/json" in request.headers.get("accept", "") or request.url.path.startswith("/api/"):
            return JSONResponse({"ok": False, "error": exc.detail}, status_code=exc.status_code)
        return PlainTextResponse(f"{exc.detail}\n", status_code=exc.status_code)

    @app.get("/login", include_in_schema=False)
    async def login(token: str = "") -> Response:
        session = sessions.login(token)
        if session is None:
            return PlainTextResponse("bad or missing login token\n", status_code=401)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(COOKIE, session.id, max_age=int(SESSION_TTL), httponly=True, samesite="strict", path="/")
        return resp

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request, session: Annotated[Session, Depends(require_post)]) -> Response:
        sessions.logout(session.id)
        resp = RedirectResponse("/", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    @app.get("/auth", include_in_schema=False)
    async def auth(request: Request) -> Response:
        """For the gateway's auth_request: 204 and the CSRF token if the session is valid."""
        session = session_of(request)
        if session is None:
            return Response(status_code=401)
        return Response(status_code=204, headers={"X-CSRF-Token": session.csrf})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard(request: Request) -> Response:
        session = session_of(request)
        if session is None:
            return PlainTextResponse("not logged in: open the login URL that `hive up` printed\n", status_code=401)
        return templates.TemplateResponse(request, "dashboard.html", {"csrf_token": session.csrf, **state()})

    def state() -> dict[str, Any]:
        store = hive.store
        return {
            "agents": hive.statuses(),
            "approvals": [model_fields_only(a) for a in store.approvals(status="pending")],
            "questions": [model_fields_only(q) for q in store.open_questions(target=OPERATOR)],
            "messages": [model_fields_only(m) for m in store.recent_messages(50)],
        }

    cache: dict[str, Any] = {"key": None, "body": b""}

    @app.get("/api/state", response_model=StateModel)
    async def api_state(session: Annotated[Session, Depends(require_session)]) -> Response:
        """Everything the dashboard shows: agents, pending approvals, open questions, recent messages."""
        # Rendered once per change (and at least once a second, for time-based flags like failed).
        key = (hive.bus.version, int(time.monotonic()))
        if cache["key"] != key:
            cache["key"], cache["body"] = key, json.dumps(state(), ensure_ascii=False).encode()
        return Response(cache["body"], media_type="application/json")

    @app.get("/api/dashboard/stream", include_in_schema=False)
    async def stream(session: Annotated[Session, Depends(require_session)]) -> Response:
        async def events() -> AsyncIterator[bytes]:
            sub = hive.bus.subscribe(frozenset({"message", "question", "answer", "approval", "agent_status",
                                                "reminder"}))
            try:
                yield b": connected\n\n"
                while True:
                    try:
                        event = await asyncio.wait_for(sub.queue.get(), 15)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    if event is None:
                        return
                    yield f"event: {event['kind']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
            finally:
                hive.bus.unsubscribe(sub)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.get("/api/agents/{name}/transcript")
    async def transcript(name: str, session: Annotated[Session, Depends(require_session)],
                         after: int = 0, limit: int = 200) -> dict[str, Any]:
        """Agent NAME's transcript entries after AFTER."""
        return await operator({"cmd": "transcript", "name": name, "after": after, "limit": limit})

    @app.post("/answer-question/{qid}")
    async def answer_question(request: Request, qid: int, answer: Annotated[str, Form(max_length=262144)],
                              session: Annotated[Session, Depends(require_post)]) -> Response:
        """Answer a question an agent addressed to the operator (operator authority)."""
        return done(request, await operator({"cmd": "answer_question", "id": qid, "answer": answer}))

    @app.post("/approve/{aid}")
    async def approve(request: Request, aid: int, session: Annotated[Session, Depends(require_post)]) -> Response:
        """Approve: applies exactly the stored payload, once."""
        return done(request, await operator({"cmd": "approve", "id": aid}))

    @app.post("/deny/{aid}")
    async def deny(request: Request, aid: int, session: Annotated[Session, Depends(require_post)],
                   note: Annotated[str | None, Form(max_length=4096)] = None) -> Response:
        """Deny an approval, with an optional note for the agent."""
        return done(request, await operator({"cmd": "deny", "id": aid, **({"note": note} if note else {})}))

    @app.post("/api/agents/{name}/send")
    async def send(request: Request, name: str, body: Annotated[str, Form(max_length=262144)],
                   session: Annotated[Session, Depends(require_post)]) -> Response:
        """Message agent NAME as the operator."""
        return done(request, await operator({"cmd": "send", "to": name, "body": body}))

    @app.post("/api/agents/{name}/{action}")
    async def lifecycle(request: Request, name: str, action: str,
                        session: Annotated[Session, Depends(require_post)]) -> Response:
        """start, stop, restart, pause, resume, destroy or interrupt agent NAME."""
        make = ACTIONS.get(action)
        if make is None:
            raise HTTPException(404, f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        return done(request, await operator(make(name)))

    @app.post("/api/spawn")
    async def spawn(request: Request, name: Annotated[str, Form(max_length=64)],
                    spec: Annotated[str, Form(max_length=65536)],
                    session: Annotated[Session, Depends(require_post)]) -> Response:
        """Create and start an agent; SPEC is its JSON spec."""
        try:
            parsed = json.loads(spec)
        except ValueError:
            raise HTTPException(422, "spec is not valid JSON") from None
        return done(request, await operator({"cmd": "spawn", "name": name, "spec": parsed}))

    return app


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # hive-core handles SIGINT/SIGTERM itself


def bind_core_socket(path: Path) -> socket.socket:
    """core.sock: ours, the gateway's group, 0660 (uvicorn would make it 0666)."""
    if os.path.lexists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    try:
        os.chown(path, -1, grp.getgrnam(GATEWAY_GROUP).gr_gid)
    except (KeyError, PermissionError):
        pass  # no gateway on this host (tests of the core alone): root and the core only
    os.chmod(path, 0o660)
    sock.listen(512)
    sock.setblocking(False)
    return sock


async def serve_http(app: FastAPI, path: Path) -> tuple[asyncio.Task[None], _Server]:
    sock = bind_core_socket(path)
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                    timeout_graceful_shutdown=2))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    return task, server

"""Notifications (``[notify]``, core/notify.py) against real local receivers, from a real
hive (real cages, nginx, Chromium): every new question to the operator and approval
request reaches each webhook format once; retries; a dead receiver doesn't slow the hive;
agent-written text arrives inert; a receiver can't redirect the hive; a flooding agent is
coalesced; the one-use link; and spawn approvals' ``grants`` (issue 15).

One hive for the module. Its webhooks: ntfy, Matrix (client-server PUT) and Slack on one
recording receiver, and a fourth on a "black hole" that accepts connections and never
answers (so every notification is stuck there for the whole module: the hive must not
notice)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from playwright.sync_api import Browser

from hive_fixture import probe_result
from web_fixture import Web, artifact, browser, wait_for, web_hive  # noqa: F401 (browser: a fixture)

from .conftest import CLIENT

REF = "issue 15 (notifications)"
SECRET = "syt_notify_secret_token"
MATRIX_PATH = "/_matrix/client/v3/rooms/!room:hive/send/m.room.message"
INTERVAL = 1.0  # [notify] agent_interval_seconds
BURST = 8  # each agent but ntflood stays within it
AGENTS: dict[str, dict[str, Any]] = {
    name: {"runtime": "command", "command": ["true"]} for name in ("nta", "ntb", "ntflood")
}


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def fmt(self) -> str:
        return self.path.strip("/").split("/")[0].split("?")[0] if not self.path.startswith("/_matrix") else "matrix"

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        """What a person reads, whatever the format."""
        if self.fmt == "ntfy":
            return self.body.decode()
        body = self.json()
        return str(body["text"] if self.fmt == "slack" else body["body"])


class Receiver:
    """A recording HTTP receiver on loopback. ``script[path]``: statuses to answer before
    the next 200 (a 307 goes to ``redirect_to``)."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.script: dict[str, list[int]] = {}
        self.redirect_to = ""
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                if self.path.startswith("/page?to="):  # another site linking to the hive
                    page = f'<!doctype html><a id="go" href="{self.path[9:]}">open</a>'.encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                key = self.path.split("?")[0]
                key = MATRIX_PATH if key.startswith(MATRIX_PATH) else key
                with outer.lock:
                    if self.command != "GET":  # a browser's /favicon.ico is no notification
                        outer.hits.append(Hit(self.command, self.path, dict(self.headers), body))
                    queued = outer.script.get(key) or []
                    status = queued.pop(0) if queued else 200
                self.send_response(status)
                if status == 307:
                    self.send_header("Location", outer.redirect_to)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_POST = do_PUT = do_GET = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def about(self, needle: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if needle in h.text]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class BlackHole:
    """Accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.conns.append(self.sock.accept()[0])

    def close(self) -> None:
        for c in [*self.conns, self.sock]:
            c.close()


@dataclass
class Env:
    web: Web
    rx: Receiver
    other: Receiver
    hole: BlackHole


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    rx, other, hole = Receiver(), Receiver(), BlackHole()
    notify = {
        "webhooks": [
            {"url": rx.url("/ntfy/hive-topic"), "format": "ntfy"},
            {"url": rx.url(f"{MATRIX_PATH}?access_token={SECRET}"), "format": "matrix"},
            {"url": rx.url("/slack/T000/B000"), "format": "slack"},
            {"url": f"http://127.0.0.1:{hole.port}/dead", "format": "ntfy"},
        ],
        "backoff_seconds": 0.05,
        "timeout_seconds": 120,
        "agent_burst": BURST,
        "agent_interval_seconds": INTERVAL,
    }
    try:
        with web_hive(AGENTS, sections={"notify": notify}) as web:
            yield Env(web, rx, other, hole)
    finally:
        rx.close()
        other.close()
        hole.close()


def ask(web: Web, agent: str, text: str) -> int:
    reply = web.hive.agent_call(agent, "ask", to="operator", question=text)
    assert reply.get("ok"), reply
    return int(reply["id"])


def arrived(rx: Receiver, needle: str, n: int = 3) -> list[Hit]:
    """Wait for ``n`` notifications mentioning ``needle`` (one per live format)."""
    return wait_for(lambda: (lambda h: h if len(h) >= n else None)(rx.about(needle)), f"{n} notifications of {needle}")


def link_of(hit: Hit) -> str:
    if hit.fmt == "ntfy":
        return hit.headers["Click"]
    return hit.text.rsplit("<", 1)[1].split("|")[0] if hit.fmt == "slack" else hit.text.rsplit("\n", 1)[1]


@pytest.mark.attack("notify.delivery", ref=REF)
def test_question_and_approval_reach_every_format_once(env: Env) -> None:
    web, rx = env.web, env.rx
    qid = ask(web, "nta", "which branch do I deploy?")
    reply = web.hive.agent_call("nta", "request_approval", kind="egress", description="need pypi",
                                payload={"host": "pypi.org", "port": 443})
    aid = reply["id"]
    q_hits, a_hits = arrived(rx, f"question {qid})"), arrived(rx, f"approval {aid} ")
    for hits in (q_hits, a_hits):
        assert sorted(h.fmt for h in hits) == ["matrix", "ntfy", "slack"]
        for h in hits:
            assert f"{web.base}/n/" in link_of(h)
    assert "pypi.org:443" in a_hits[0].text  # what approving allows, worked out by the hive
    by = {h.fmt: h for h in q_hits}
    assert by["ntfy"].method == "POST" and by["ntfy"].headers["Title"] == f"hive: question {qid} from nta"
    matrix = by["matrix"]
    assert matrix.method == "PUT" and matrix.path.startswith(MATRIX_PATH + "/")
    assert matrix.path.endswith(f"?access_token={SECRET}")
    assert matrix.json()["msgtype"] == "m.text" and matrix.json()["m.mentions"] == {}
    assert set(by["slack"].json()) == {"text", "unfurl_links", "unfurl_media"}
    # each link is its own one-use token
    assert len({link_of(h) for h in q_hits + a_hits}) == 6
    # the answer and the resolution are not notified
    before = len(rx.hits)
    assert web.hive.host_call("answer_question", id=qid, answer="main").get("ok")
    assert web.hive.host_call("deny", id=aid).get("ok")
    ask(web, "nta", "marker after resolution")
    arrived(rx, "marker after resolution")
    assert len(rx.hits) == before + 3
    assert SECRET not in web.hive.log_tail(100_000)  # the URL's secret is never logged


@pytest.mark.attack("notify.delivery", ref=REF)
def test_receiver_failing_twice_gets_it_on_retry(env: Env) -> None:
    env.rx.script["/slack/T000/B000"] = [500, 503]
    qid = ask(env.web, "nta", "retry me")
    hits = wait_for(lambda: (lambda h: h if len(h) >= 5 else None)(env.rx.about("retry me")), "retries")
    slack = [h for h in hits if h.fmt == "slack"]
    assert len(slack) == 3 and len({h.body for h in slack}) == 1  # the same notification, resent
    assert len(hits) == 5
    assert "attempt 2/6 failed (HTTP 503, refused); retrying" in env.web.hive.log_tail(100_000)
    wait_for(lambda: f"question {qid} sent on attempt 3" in env.web.hive.log_tail(100_000), "the log line")


@pytest.mark.attack("notify.slow-receiver", ref=REF)
def test_dead_receiver_does_not_slow_the_hive(env: Env) -> None:
    # The black hole holds the fourth webhook's first notification (timeout 120 s) from the
    # first test on: every other verb goes on meanwhile.
    wait_for(lambda: env.hole.conns, "the dead receiver holding a connection")
    for i in range(2):
        ask(env.web, "ntb", f"dead {i}")
        assert env.web.hive.host_call("list").get("ok")
        assert env.web.hive.agent_call("ntb", "send", to="operator", body=f"hello {i}").get("ok")
    arrived(env.rx, "dead 1")  # the live receivers still get theirs


HOSTILE = (
    'x"}], "text": "<!channel> &lt; pwned", "m.mentions": {"room": true}, "z": ["'
    "\x1b]8;;http://evil.example\x07click\x1b]8;;\x07 \u202egnp.exe <!channel> <!here> @room "
    "<http://evil.example|open the approval> &lt; \r\nTitle: forged\r\n"
) + "A" * 5000


@pytest.mark.attack("notify.injection", ref=REF)
def test_agent_text_arrives_inert(env: Env) -> None:
    """Asked from inside the agent's cage: nothing it writes escapes its field."""
    web, rx = env.web, env.rx
    qid = probe_result(web.hive.probe("ntb", CLIENT + """
c = Conn()
result(r=c.call({"cmd": "ask", "to": "operator", "question": P["q"]}))
""", q=HOSTILE))["r"]["id"]
    hits = arrived(rx, f"question {qid})")
    for h in hits:
        text = h.text
        for raw in ("\x1b", "\x07", "\u202e", "\r"):
            assert raw not in text, (h.fmt, raw)
        assert "\\x1b" in text and "\\u202e" in text  # shown as escapes
        assert len(text) < 600 and "A" * 201 not in text  # cut at 200 characters
        assert "Title: forged" not in str(h.headers)
    by = {h.fmt: h for h in hits}
    slack = by["slack"].json()
    assert set(slack) == {"text", "unfurl_links", "unfurl_media"}
    assert "<!channel>" not in slack["text"] and "<!here>" not in slack["text"]
    assert "&lt;!channel&gt;" in slack["text"] and "&amp;lt;" in slack["text"]
    assert slack["text"].count("<") == 1 and "<http://evil" not in slack["text"]  # only our link
    assert slack["text"].endswith("|open question>")
    matrix = by["matrix"].json()
    assert set(matrix) == {"msgtype", "body", "m.mentions"} and matrix["m.mentions"] == {}
    assert by["ntfy"].headers["Title"] == f"hive: question {qid} from ntb"
    assert by["ntfy"].body.decode().count("\n") == 1  # the text, then the link


@pytest.mark.attack("notify.redirect", ref=REF)
def test_receiver_cannot_redirect_the_hive(env: Env) -> None:
    env.rx.redirect_to = env.other.url("/stolen")
    env.rx.script["/ntfy/hive-topic"] = [307]
    qid = ask(env.web, "nta", "follow me elsewhere")
    hits = arrived(env.rx, f"question {qid})")
    wait_for(lambda: "redirect not followed" in env.web.hive.log_tail(100_000), "the refusal logged")
    assert [h.fmt for h in env.rx.about(f"question {qid})")].count("ntfy") == 1 == len(hits) - 2
    assert env.other.hits == []


@pytest.mark.attack("notify.flood", ref=REF)
def test_flooding_agent_is_coalesced(env: Env) -> None:
    for i in range(12):
        ask(env.web, "ntflood", f"flood {i}")
    digest = wait_for(lambda: [h for h in env.rx.about("ntflood: ") if "more" in h.text] or None, "the digest",
                      timeout=INTERVAL * 10)
    assert f"{12 - BURST} question(s) more" in digest[0].text
    singles = [h for h in env.rx.hits if "flood " in h.text and "ntflood asks" in h.text]
    assert len(singles) == BURST * 3  # the burst, in each live format; the rest coalesced


def planted_link(web: Web, aid: int, sha: str) -> str:
    """A link as a notification about approval ``aid`` with payload ``sha`` would carry
    (the payload itself can't change: a trigger keeps it immutable)."""
    token = secrets.token_urlsafe(32)
    db = sqlite3.connect(web.hive.state_dir / "hive.db", timeout=30)
    with db:
        db.execute("INSERT INTO notify_links VALUES (?, 'approval', ?, ?, ?, NULL)",
                   (hashlib.sha256(token.encode()).hexdigest(), aid, sha, time.time() + 600))
    db.close()
    return f"/n/{token}"


@pytest.mark.attack("notify.link", ref=REF)
def test_link_is_one_use_and_bound_to_the_item(env: Env, browser: Browser) -> None:
    web, rx = env.web, env.rx
    qid = ask(web, "ntb", "open me from the phone")
    q_links = [link_of(h) for h in arrived(rx, f"question {qid})")]
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        # No session: the link goes through the login, then on to the item.
        page.goto(q_links[0], wait_until="commit")
        page.wait_for_url(f"{q_links[0]}?again=1", wait_until="commit")
        page.wait_for_load_state("domcontentloaded")
        assert "not logged in" in page.content()
        page.screenshot(path=str(artifact("notify-1-link-before-login.png")))
        page.goto(web.login_url, wait_until="commit")
        page.wait_for_url(f"{web.base}/?focus=question-{qid}", wait_until="commit")
        page.wait_for_selector(f"#question-{qid}", timeout=10_000)
        page.screenshot(path=str(artifact("notify-2-link-opens-the-question.png")))
        # Second use: a one-line 410, nothing else.
        resp = page.goto(q_links[0])
        assert resp is not None and resp.status == 410
        assert resp.text().strip() == "this link was already used; open the dashboard instead"
        page.screenshot(path=str(artifact("notify-3-link-used-twice.png")))
        # Logged in, the link clicked on another site (as from a phone's app): the browser
        # leaves the SameSite=Strict cookie out; the hive's one same-origin step brings it.
        asked: list[str] = []
        page.on("request", lambda req: asked.append(req.url))
        page.goto(f"http://localhost:{rx.port}/page?to={q_links[1]}", wait_until="commit")
        page.click("#go")
        page.wait_for_url(f"{web.base}/?focus=question-{qid}", wait_until="commit")
        assert f"{q_links[1]}?again=1" in asked  # the cookie-less first arrival, then the step
    finally:
        ctx.close()
    # An approval's link: navigates only (the approval stays pending) ...
    login = web.login()
    aid = web.hive.agent_call("ntb", "request_approval", kind="custom", description="ship it",
                              payload={"v": 1})["id"]
    a_links = [link_of(h) for h in arrived(rx, f"approval {aid} ")]
    r = web.get(a_links[0].removeprefix(web.base), login=login)
    assert (r.status_code, r.headers["location"]) == (303, f"/?focus=approval-{aid}")
    assert web.hive.host_call("show_approval", id=aid)["approval"]["status"] == "pending"
    # ... and is refused if the payload is not the one notified.
    r = web.get(planted_link(web, aid, "0" * 64), login=login)
    assert r.status_code == 409 and "payload changed" in r.text and "\n" not in r.text.strip()
    assert web.get(a_links[1].removeprefix(web.base), login=login).status_code == 303
    # A made-up or malformed token: 404, one line.
    for bad in ("/n/" + "A" * 43, "/n/short", "/n/" + "%3C" * 20):
        r = web.get(bad, login=login)
        assert r.status_code in (400, 404), (bad, r.status_code)
    assert web.hive.host_call("show_approval", id=aid)["approval"]["status"] == "pending"


@pytest.mark.attack("approval.hidden-grant", ref=REF)
def test_spawn_grants_shown_whole_before_a_long_command(env: Env) -> None:
    web = env.web
    payload = {"name": "ntchild", "spec": {"runtime": "command", "command": ["x" * 4000] * 25,
                                            "egress": ["evil.example:443"], "peers": ["nta", "ntb"]}}
    aid = web.hive.agent_call("ntb", "request_approval", kind="spawn", description="a helper",
                              payload=payload)["id"]
    grants = "agent ntchild: runtime command; egress evil.example:443; peers nta, ntb; memory default; pids default"
    rows = web.hive.host_call("pending", limit=200)["approvals"]
    row = next(r for r in rows if r["id"] == aid)
    assert "payload" in row["truncated"] and "evil.example" not in row["payload"]  # cut before egress
    assert row["grants"] == grants
    assert web.hive.host_call("show_approval", id=aid)["approval"]["grants"] == grants
    login = web.login()
    state = web.get("/api/state", login=login).json()
    assert next(a for a in state["approvals"] if a["id"] == aid)["grants"] == grants
    assert f'<code class="grants">{grants}</code>' in web.get("/", login=login).text
    hits = arrived(env.rx, f"approval {aid} ")
    assert all("egress evil.example:443; peers nta, ntb" in h.text for h in hits)
    assert web.hive.host_call("deny", id=aid).get("ok")

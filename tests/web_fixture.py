"""A whole hive reached the way the operator reaches it: over HTTP, through the
gateway (real nginx in front of the real core and the agents' harnesses in
real cages).

``web_hive(agents)`` runs ``hive up`` through ``hive_fixture.HiveProcess``
(``.venv/bin/hive --run-dir R up --config C --state-dir S --listen
127.0.0.1:PORT`` in a 0755 temp dir under /tmp) and yields a ``Web`` handle.
The login URL is the one ``hive up`` printed on its ``hive: ready`` line.

Requests go through ``httpx.request`` (a fresh client each time, so no cookie
jar carries a session from one request to the next): every test says exactly
which cookie, CSRF token and Origin a request carries.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright

from hive_fixture import REPO, HiveProcess, wait_until
from hyperhive.core.sessions import COOKIE
from hyperhive.gateway.config import CSP

# Debian's chromium, never a downloaded browser.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

ARTIFACTS = REPO / "artifacts"
# The dashboard's vendored scripts (htmx, its SSE extension, idiomorph), before the shared
# escaping and its own: a page's scripts are exactly these, never anything an agent wrote.
DASHBOARD_VENDOR = ["/static/vendor/htmx-2.0.11.min.js", "/static/vendor/htmx-ext-sse-2.2.4.min.js",
                    "/static/vendor/idiomorph-ext-0.7.4.min.js"]


def page_scripts(script: str, vendored: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The scripts a page loads: its vendored libraries (the dashboard's by default), the
    shared escaping (display.js, beside the page's own script), on the core's own pages
    the pointer's steadiness (steady.js), and the page's own."""
    vendor = DASHBOARD_VENDOR if script == "/static/dashboard.js" and not vendored else vendored
    steady = ["/static/steady.js"] if script.startswith("/static/") else []
    return [*vendor, script.rsplit("/", 1)[0] + "/display.js", *steady, script]


READY_LINE = re.compile(r"^hive: ready: log in at (http://\S+/login\?token=\S+)")
META_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]*)">')


@dataclass
class Login:
    """One operator session: its cookie and its CSRF token."""

    cookie: str
    csrf: str

    @property
    def cookies(self) -> dict[str, str]:
        return {"Cookie": f"{COOKIE}={self.cookie}"}


class Web:
    """The gateway of a running hive, as the operator's browser sees it."""

    def __init__(self, hive: HiveProcess) -> None:
        self.hive = hive
        self.base = f"http://{hive.listen_host}:{hive.port}"
        self.origin = self.base

    @property
    def login_url(self) -> str:
        for line in self.hive.stdout_lines:
            m = READY_LINE.match(line)
            if m:
                return m.group(1)
        raise AssertionError(f"no login URL in hive up's output: {self.hive.stdout_lines}")

    @property
    def token(self) -> str:
        return parse_qs(urlsplit(self.login_url).query)["token"][0]

    def url(self, path: str) -> str:
        return self.base + path

    def request(self, method: str, path: str, *, login: Login | None = None, csrf: str | None = None,
                origin: str | None = None, headers: dict[str, str] | None = None,
                **kw: Any) -> httpx.Response:
        """One request; ``login`` adds the session cookie, ``csrf`` the X-CSRF-Token header,
        ``origin`` the Origin header. Nothing else is added."""
        h: dict[str, str] = {}
        if login is not None:
            h.update(login.cookies)
        if csrf is not None:
            h["X-CSRF-Token"] = csrf
        if origin is not None:
            h["Origin"] = origin
        h.update(headers or {})
        return httpx.request(method, self.url(path), headers=h, timeout=30, follow_redirects=False, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)

    def login(self) -> Login:
        """Log in with the URL ``hive up`` printed; read the CSRF token off the dashboard."""
        r = httpx.get(self.login_url, timeout=30, follow_redirects=False)
        assert r.status_code == 303, (r.status_code, r.text)
        cookie = r.cookies.get(COOKIE)
        assert cookie, r.headers
        page = self.get("/", login=Login(cookie, ""))
        assert page.status_code == 200, (page.status_code, page.text)
        m = META_CSRF.search(page.text)
        assert m and m.group(1), "the dashboard carries no csrf-token meta"
        return Login(cookie, m.group(1))

    def post(self, path: str, login: Login, *, data: dict[str, Any] | None = None,
             json_reply: bool = True, **kw: Any) -> httpx.Response:
        """A well-formed operator POST: session, CSRF header, this origin."""
        headers = {"Accept": "application/json"} if json_reply else {}
        return self.request("POST", path, login=login, csrf=login.csrf, origin=self.origin, data=data,
                            headers=headers, **kw)


def reason(r: httpx.Response) -> str:
    """The refusal's reason: the JSON ``error`` field or the plain-text body."""
    if r.headers.get("content-type", "").startswith("application/json"):
        body = r.json()
        assert body.get("ok") is False, body
        return str(body["error"])
    return r.text


def assert_one_line_reason(r: httpx.Response) -> str:
    text = reason(r).strip()
    assert text, f"{r.status_code} with no reason"
    assert "\n" not in text, f"reason is not one line: {text!r}"
    assert "<" not in text, f"reason is not plain text: {text!r}"
    return text


def assert_csp(r: httpx.Response) -> None:
    values = r.headers.get_list("content-security-policy")
    assert values == [CSP], f"{r.request.method} {r.request.url.path} -> {r.status_code}: CSP {values}"


def wait_for(pred: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    return wait_until(pred, timeout, what, interval=0.1)


# What "nothing changed" compares besides host.sock's view (HiveProcess.state()), which
# leaves out messages between others (an operator's send shows in no host.sock listing).
# A message's acked_at is left out: an agent acking earlier mail is not a change made now.
DB_TABLES = {
    "agents": "name, spec, parent, origin, paused, stopped, status_text, status_set_at",
    "messages": "id, recipient, sender, kind, body, ref, options, sent_at",
    # Named, in the order first shipped: tests read rows by position (migration 6 moved
    # the long columns last and added summary columns).
    "questions": "id, asker, target, question, options, asked_at, answer, answered_at, cancelled",
    "approvals": "id, agent, kind, description, payload, payload_sha256, status, requested_at,"
    " resolved_at, note",
    "reminders": "id, agent, due_at, text, created_at",
}


def snapshot(hive: HiveProcess) -> dict[str, Any]:
    """The hive's state: host.sock's view plus the rows of its database (read-only)."""
    db = sqlite3.connect(f"file:{hive.state_dir / 'hive.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = {t: db.execute(f"SELECT {cols} FROM {t} ORDER BY 1").fetchall() for t, cols in DB_TABLES.items()}
    finally:
        db.close()
    return {"host": hive.state(), "db": rows}


@contextlib.contextmanager
def unchanged(hive: HiveProcess) -> Iterator[None]:
    before = snapshot(hive)
    yield
    after = snapshot(hive)
    for part in ("host", "db"):
        for key in before[part]:
            assert after[part][key] == before[part][key], (
                f"the hive's state changed ({part} {key}):\nbefore {before[part][key]}\nafter  {after[part][key]}")


def transcript(hive: HiveProcess, name: str) -> list[dict[str, Any]]:
    reply = hive.host_call("transcript", name=name, limit=5000)
    assert reply.get("ok"), reply
    return reply["entries"]


@contextlib.contextmanager
def web_hive(agents: dict[str, dict[str, Any]], extra_names: tuple[str, ...] = (),
             sections: dict[str, dict[str, Any]] | None = None) -> Iterator[Web]:
    """Run a hive with ``agents`` (and other hive.toml tables in ``sections``); at the end
    SIGTERM it and require exit 0 and every cage (including the agents in ``extra_names``,
    e.g. spawned ones) empty."""
    hive = HiveProcess(agents, sections=sections)
    try:
        hive.start()
        try:
            yield Web(hive)
        except BaseException:
            print(f"--- the hive's log (hive up, nginx, hive-core, hive-priv) ---\n{hive.log_tail(300)}")
            raise
    finally:
        try:
            if hive.running:
                rc = hive.stop()
                assert rc == 0, f"hive up exited with {rc}\n{hive.log_tail()}"
            left = {n: hive.cgroup(n).pids() for n in (*hive.names, *extra_names)}
            left = {n: pids for n, pids in left.items() if pids}
            if left:
                for n in left:
                    hive.cgroup(n).kill_all(1.0)
            assert not left, f"processes left in cage cgroups after stop: {left}"
        finally:
            hive.cleanup()


def artifact(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name


def deadline(seconds: float) -> float:
    return time.monotonic() + seconds


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()

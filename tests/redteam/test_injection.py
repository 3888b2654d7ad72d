"""Script injection into the operator's pages, from inside a cage. rtmallory
writes HTML, script, ``javascript:`` links, template syntax and SSE framing into
everything it controls: its status text, messages and a question to the
operator (and the question's option buttons), an approval's description and
payload, its own transcript (a reminder to itself, which its runtime, ``cat``,
echoes to stdout) and the egress proxy's decision log (a request line the proxy
refuses, whose reason quotes it).

The dashboard and rtmallory's page are then loaded in headless chromium, as
first served and as updated live: an init script traps ``window.__pwned``, CSP
violations and dialogs; no agent markup may become an element; every payload is
shown as text; loading the pages changes nothing in the hive (no form was
posted by itself); and every response carries the CSP."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Dialog, Page, Request, expect

from hive_fixture import HiveProcess, wait_until
from hyperhive.gateway.config import CSP
from web_fixture import Web, browser, page_scripts  # noqa: F401 (fixture)

from .conftest import World, cage_run, changes, unchanged

pytestmark = pytest.mark.attack('surface.script-injection', ref='vibe-kanban#2348')

WAIT_MS = 30_000
AGENT = "rtmallory"
# The agent page's scripts (the core's page since issue 15, live through the vendored htmx).
AGENT_PAGE = ("/static/agent.js",
              ("/static/vendor/htmx-2.0.11.min.js", "/static/vendor/htmx-ext-sse-2.2.4.min.js"))

PAYLOADS = [
    '<img src=x onerror="window.__pwned=1;alert(1)">',
    "<script>window.__pwned=2;alert(2)</script>",
    '"><svg onload="window.__pwned=3">',
    '<a href="javascript:window.__pwned=4" id="rt-link">click me</a>',
    "javascript:window.__pwned=5",
    '<iframe srcdoc="<script>parent.__pwned=6</script>"></iframe>',
    '<math><mtext><table><mglyph><style><img src=x onerror="window.__pwned=7">',
    '<noscript><p title="</noscript><img src=x onerror=window.__pwned=8>">',
    "</textarea></pre></li></ol></ul></script><script>window.__pwned=9</script>",
    '<base href="javascript:/"><form action="/approve/1" method="post"><button id="rt-form">go</button></form>',
    '<meta http-equiv="refresh" content="0;url=/logout">',
    "{{constructor.constructor('window.__pwned=10')()}} ${7*7} {% raw %} <%= 7*7 %>",
    '<object data="javascript:window.__pwned=11"></object><embed src="javascript:window.__pwned=12">',
    '<details open ontoggle="window.__pwned=13"><summary>x</summary></details>',
]
SSE_FORGERY = 'line one\ndata: {"forged": true}\nevent: message\n\nid: 999\nretry: 1\n\nline after'

INSTRUMENT = """
(() => {
  const hits = [], csp = [];
  Object.defineProperty(window, "__hits", { value: hits });
  Object.defineProperty(window, "__csp", { value: csp });
  Object.defineProperty(window, "__pwned", {
    configurable: false, get() { return undefined; }, set(v) { hits.push("window.__pwned = " + String(v)); },
  });
  document.addEventListener("securitypolicyviolation", (e) => {
    csp.push(e.violatedDirective + " blocked " + e.blockedURI + " " + (e.sample || ""));
  }, true);
})();
"""

NO_MARKUP = """() => {
  const bad = document.querySelectorAll(
    // (The agent page folds tool calls and raw JSON in <details> of its own classes.)
    'img, svg, math, iframe, style, textarea, object, embed, noscript, details:not(.raw):not(.fold), '
    + 'meta[http-equiv], base, '
    + '#rt-link, #rt-form, a[href^="javascript:" i], form[action^="javascript:" i], [onerror], [onload], [ontoggle]');
  return { bad: [...bad].map(e => e.outerHTML.slice(0, 200)),
           scripts: [...document.scripts].map(s => s.getAttribute("src")),
           text: document.body.textContent };
}"""


class Watch:
    """Everything a page did that it must not: dialogs, uncaught errors, POSTs."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.posts: list[str] = []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", self._request)

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _request(self, req: Request) -> None:
        if req.method != "GET":
            self.posts.append(f"{req.method} {req.url}")

    def assert_clean(self, script: str, vendored: tuple[str, ...] = ()) -> dict[str, Any]:
        assert self.page.evaluate("window.__pwned") is None
        assert self.page.evaluate("window.__hits") == [], "agent-controlled script ran"
        assert self.page.evaluate("window.__csp") == [], "CSP violations: something inline got into the page"
        assert self.dialogs == [] and self.errors == [], (self.dialogs, self.errors)
        assert self.posts == [], f"the page sent requests by itself: {self.posts}"
        found = self.page.evaluate(NO_MARKUP)
        assert found["bad"] == [], f"agent markup became elements: {found['bad']}"
        # Our scripts only: the vendored libraries the page names, the shared escaping
        # (display.js, beside the page's own script) and the page's own.
        assert found["scripts"] == page_scripts(script, vendored), found["scripts"]
        return found


PLANT = """
P_ = P["payloads"]
text = P["label"] + " " + " ".join(P_)
out = {
    "status": call({"cmd": "set_status", "text": text}),
    "send": call({"cmd": "send", "to": "operator", "body": text}),
    "sse": call({"cmd": "send", "to": "operator", "body": P["sse"]}),
    "ask": call({"cmd": "ask", "to": "operator", "question": text, "options": P_[:6]}),
    "approval": call({"cmd": "request_approval", "kind": "custom", "description": text,
                      "payload": {"html": text, P_[0]: P_[1], "all": P_}}),
    "remind": call({"cmd": "remind", "in_seconds": 0.1, "text": text}),
}
egress = []
for line in P["egress"]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect("/run/hive/egress.sock")
    s.sendall(line.encode() + b"\\r\\n\\r\\n")
    egress.append(s.makefile("rb").readline().decode().strip())
    s.close()
result(out=out, egress=egress)
"""
# Request lines the proxy refuses, quoting the agent's text in the reason it logs.
EGRESS_LINES = ["CONNECT example.com:443 HTTP/<svg/onload=1>", "GET http://<img/src=x>:80/ HTTP/1.1",
                "CONNECT <b>x</b>:443 HTTP/1.1"]
EGRESS_REASONS = ["unsupported protocol 'HTTP/<svg/onload=1>'", "not a valid hostname: '<img'",
                  "not a valid hostname: '<b>x</b>'"]


def plant(h: HiveProcess, label: str) -> dict[str, Any]:
    res = cage_run(h, AGENT, PLANT, label=label, payloads=PAYLOADS, sse=SSE_FORGERY, egress=EGRESS_LINES)
    assert all(r["ok"] for r in res["out"].values()), res
    assert res["egress"] == ["HTTP/1.1 400 Bad Request"] * len(EGRESS_LINES), res["egress"]

    def turn_done() -> bool:
        entries = h.host_call("transcript", name=AGENT, limit=5000)["entries"]
        return any(e["kind"] == "stdout" and label in json.dumps(e["data"]) for e in entries)

    wait_until(turn_done, 30, f"{AGENT}'s reminder turn ({label})")
    return res


def hostile(label: str) -> str:
    return label + " " + " ".join(PAYLOADS)


@pytest.fixture(scope="module")
def web(rt: HiveProcess, world: World) -> Web:
    plant(rt, "turn-1")
    return Web(rt)


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.add_init_script(INSTRUMENT)
    ctx.set_default_timeout(WAIT_MS)
    try:
        yield ctx
    finally:
        ctx.close()


def open_dashboard(web: Web, context: BrowserContext) -> tuple[Page, Watch]:
    page = context.new_page()
    watch = Watch(page)
    with page.expect_response(lambda r: urlsplit(r.url).path == "/api/dashboard/stream"):
        page.goto(web.login_url)
    expect(page).to_have_url(web.url("/"), timeout=WAIT_MS)
    return page, watch


def shown_as_text(text: str, label: str) -> None:
    for p in PAYLOADS:
        assert p in text, f"{p!r} is not shown as text"
    assert hostile(label) in text


def test_dashboard_shows_agent_markup_as_text_and_runs_none_of_it(rt: HiveProcess, web: Web,
                                                                  context: BrowserContext) -> None:
    with unchanged(rt):
        page, watch = open_dashboard(web, context)
        row = page.locator(f'#agents tr[data-name="{AGENT}"]')
        expect(row).to_be_visible(timeout=WAIT_MS)
        assert row.locator(".status-text").text_content() == hostile("turn-1")
        page.wait_for_timeout(500)  # anything deferred (onerror of a broken image, a meta refresh) has fired
        found = watch.assert_clean("/static/dashboard.js")
    shown_as_text(found["text"], "turn-1")
    for reason in EGRESS_REASONS:  # the egress log quotes the refused requests' text, as text
        assert reason in found["text"], reason
    assert page.url == web.url("/")  # no meta refresh, no navigation


def test_agent_page_shows_agent_markup_as_text_and_runs_none_of_it(rt: HiveProcess, web: Web,
                                                                   context: BrowserContext) -> None:
    with unchanged(rt):
        page, watch = open_dashboard(web, context)
        with page.expect_response(lambda r: urlsplit(r.url).path == f"/agent/{AGENT}/events"):
            page.goto(web.url(f"/agent/{AGENT}/"))
        expect(page.locator("#status-text")).to_have_text(hostile("turn-1"), timeout=WAIT_MS)
        page.wait_for_timeout(500)
        found = watch.assert_clean(*AGENT_PAGE)
    shown_as_text(found["text"], "turn-1")
    transcript = page.locator("#transcript pre").all_text_contents()
    # The reminder's input and cat's stdout: JSON of the message, so look for quote-free payloads.
    mine = [t for t in transcript if "turn-1" in t]
    assert len(mine) >= 2 and all(PAYLOADS[1] in t and "{{constructor" in t for t in mine), mine[:2]
    assert page.url == web.url(f"/agent/{AGENT}/")


def test_live_updates_run_no_agent_script(rt: HiveProcess, web: Web, context: BrowserContext) -> None:
    """Both pages open while the agent writes again: the live redraws (SSE, the pages'
    scripts) show it as text, too."""
    with unchanged(rt):
        dash, dash_watch = open_dashboard(web, context)
        agent_page = context.new_page()
        agent_watch = Watch(agent_page)
        with agent_page.expect_response(lambda r: urlsplit(r.url).path == f"/agent/{AGENT}/events"):
            agent_page.goto(web.url(f"/agent/{AGENT}/"))
    dash.evaluate("window.__sameDocument = true")
    agent_page.evaluate("window.__sameDocument = true")
    plant(rt, "turn-2")
    with unchanged(rt):  # the live redraws post nothing and change nothing
        _expect_turn_2(dash, agent_page)
    shown_as_text(dash_watch.assert_clean("/static/dashboard.js")["text"], "turn-2")
    shown_as_text(agent_watch.assert_clean(*AGENT_PAGE)["text"], "turn-2")
    assert dash.evaluate("window.__sameDocument") is True and agent_page.evaluate("window.__sameDocument") is True


def _expect_turn_2(dash: Page, agent_page: Page) -> None:
    expect(dash.locator(f'#agents tr[data-name="{AGENT}"] .status-text')).to_have_text(hostile("turn-2"),
                                                                                       timeout=WAIT_MS)
    expect(agent_page.locator("#status-text")).to_have_text(hostile("turn-2"), timeout=WAIT_MS)
    expect(agent_page.locator("#transcript")).to_contain_text("turn-2 ", timeout=WAIT_MS)
    dash.wait_for_timeout(500)


def test_sse_framing_in_agent_text_forges_no_event(rt: HiveProcess, web: Web) -> None:
    """A status text with newlines, ``data:``, ``event:`` and ``id:`` lines: on the raw
    event stream it is one JSON string inside one ``data:`` line, never a line of its own."""
    login = web.login()
    seen: list[str] = []
    with changes(rt) as ch:
        _watch_stream(rt, web, login, seen)
    assert ch.count() == {"agents": (1, 1)}  # rtmallory's status, and nothing else
    assert ch.added["agents"][0][0] == AGENT and SSE_FORGERY in ch.added["agents"][0]
    forged = [line for line in seen if "forged" in line]
    assert forged, seen[-10:]
    for line in seen:
        assert line == "" or line.startswith(("data: ", "event: ", "id: ", ":", "retry: ")), line
        assert not line.startswith(("id: 999", "retry: 1")), line
    for line in forged:
        assert line.startswith("data: {") and json.loads(line.removeprefix("data: "))  # one JSON document
        assert '\\ndata: {\\"forged\\": true}\\nevent: message' in line


def _watch_stream(rt: HiveProcess, web: Web, login: Any, seen: list[str]) -> None:
    with (
        httpx.Client(timeout=httpx.Timeout(10, read=10)) as client,
        client.stream("GET", web.url("/api/dashboard/stream"), headers=login.cookies) as r,
    ):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers.get_list("content-security-policy") == [CSP]
        cage_run(rt, AGENT, """result(r=call({"cmd": "set_status", "text": P["sse"]}))""", sse=SSE_FORGERY)
        deadline = time.monotonic() + 15
        for line in r.iter_lines():
            seen.append(line)
            if "forged" in line or time.monotonic() > deadline:
                break


# path -> (content type when logged in, status without a session)
PAGES: dict[str, tuple[str | None, int]] = {
    "/": ("text/html", 401),
    f"/agent/{AGENT}/": ("text/html", 401),
    "/static/agent.js": ("javascript", 200),  # the agent page's code (the core's, since issue 15)
    "/api/state": ("application/json", 401),
    f"/agent/{AGENT}/no-such-page": (None, 401),
    "/static/dashboard.js": ("javascript", 200),  # the dashboard's own code: no agent data, anyone may load it
    "/api/openapi.json": ("application/json", 401),  # the schema, like every page, needs a session
    "/no-such-page": (None, 404),
}


@pytest.mark.parametrize("path", list(PAGES))
def test_every_page_carries_the_csp(rt: HiveProcess, web: Web, path: str) -> None:
    """The CSP (no inline script, nothing from elsewhere) and ``nosniff`` are on every
    response, logged in or not, and agent data in JSON is served as JSON, never as
    something a browser would render."""
    kind, anonymous_status = PAGES[path]
    login = web.login()
    with unchanged(rt):
        anonymous = web.get(path)
        r = web.get(path, login=login)
    for resp in (anonymous, r):
        assert resp.headers.get_list("content-security-policy") == [CSP], (path, resp.status_code)
        assert resp.headers.get("x-content-type-options") == "nosniff", (path, resp.headers)
    assert anonymous.status_code == anonymous_status, (path, anonymous.status_code)
    if kind is None:
        assert r.status_code == 404
    else:
        assert r.status_code == 200 and kind in r.headers["content-type"], (path, r.status_code, r.headers)
    if path == "/api/state":
        assert hostile("turn-1") in [m.get("body") for m in r.json()["messages"]]

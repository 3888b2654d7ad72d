"""The harness's page, sandboxed (issue 15, the page-origin hole).

``/agent/NAME/page/`` is served by NAME's harness, which a compromised cage may control,
so the gateway serves it with ``Content-Security-Policy: sandbox allow-scripts
allow-forms``: an opaque origin, no cookie with anything it loads or sends, no window it
can open, no token. Played here as rtcarol's compromised harness (its web.sock moved
aside, as in test_red_round3.py), in Debian's Chromium, logged in as the operator. The
gateway refuses the page's own script (it goes without the cookie); the attacks below are
handed to the browser as if it had not, the worst case.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Route

from hive_fixture import HiveProcess
from web_fixture import Web, browser  # noqa: F401 (fixture)

from .test_red_round3 import PAGE_AGENT, ScriptPage

REF = "issue 15: the page-origin hole (docs/security.md)"
pytestmark = pytest.mark.attack("surface.page-sandbox", ref=REF)

PAGE_URL = f"/agent/{PAGE_AGENT}/page/"
PAGE = (
    '<!doctype html><html><head><meta charset="utf-8"><title>agent</title>'
    f'<script src="{PAGE_URL}x.js"></script></head>'
    '<body><button id="go">show details</button>'
    '<form id="f" method="post" action="/approve/{aid}"><input name="csrf_token" value="">'
    "</form></body></html>"
)
# Every attack a script of the page's own could try, one after another; what each got
# goes into window.result, then (last) a plain form posts /approve/N (allow-forms).
ATTACKS = """
window.result = {origin: String(window.origin)};
function note(k) { return function (v) { window.result[k] = v; }; }
function read(url, opts) {
  return fetch(url, opts).then(function (r) { return r.type + ' ' + r.status + ' ' + (r.type === 'opaque' ? '' : 'read'); },
                               function (e) { return 'error ' + e; });
}
document.addEventListener('DOMContentLoaded', function () {
  document.getElementById('go').addEventListener('click', function () {
    var w = null;
    try { w = window.open('/'); } catch (e) { window.result.open_error = String(e); }
    window.result.window = w === null ? 'none' : 'opened';
    read('/api/state', {credentials: 'include'}).then(note('state_include'))
    .then(function () { return read('/api/state', {credentials: 'include', mode: 'no-cors'}); }).then(note('state_no_cors'))
    .then(function () { return read('/', {credentials: 'include'}); }).then(note('dashboard'))
    .then(function () { return read('/agent/rtbob/', {credentials: 'include'}); }).then(note('other_agent'))
    .then(function () { return read(%(approve)r, {method: 'POST', mode: 'no-cors', credentials: 'include',
                                              body: new URLSearchParams({csrf_token: ''})}); }).then(note('approve'))
    .then(function () { return read(%(answer)r, {method: 'POST', mode: 'no-cors', credentials: 'include',
                                              body: new URLSearchParams({answer: 'yes, says rtcarol'})}); }).then(note('answer'))
    .then(function () { document.title = 'done ' + JSON.stringify(window.result); });
  });
});
"""


@pytest.fixture(scope="module")
def attacked(rt: HiveProcess, browser: Browser) -> Iterator[dict[str, Any]]:
    """Run the attacks once; yield what the script saw and the ids it went for."""
    aid = rt.agent_call(PAGE_AGENT, "request_approval", kind="custom", description="rt-sandbox",
                        payload={"want": "approved from a sandboxed page"})["id"]
    qid = rt.agent_call(PAGE_AGENT, "ask", to="operator", question="rt-sandbox: shall I?")["id"]
    web = Web(rt)
    script = ATTACKS % {"approve": f"/approve/{aid}", "answer": f"/answer-question/{qid}"}
    page = PAGE.replace("{aid}", str(aid))
    ctx = browser.new_context()
    ctx.set_default_timeout(30_000)

    def fulfil(route: Route) -> None:
        route.fulfill(status=200, content_type="text/javascript; charset=utf-8", body=script)

    try:
        with ScriptPage(rt.run_dir / "ui" / PAGE_AGENT / "web.sock",
                        {"/": ("text/html; charset=utf-8", page)}):
            ctx.route(web.url(f"{PAGE_URL}x.js"), fulfil)
            tab = ctx.new_page()
            tab.goto(web.login_url)
            tab.goto(web.url(PAGE_URL))
            tab.click("#go")
            deadline = time.monotonic() + 20  # (wait_for_function would need eval: CSP)
            while not tab.title().startswith("done") and time.monotonic() < deadline:
                tab.wait_for_timeout(100)
            seen = json.loads(tab.title()[len("done "):])
            pages = len(ctx.pages)
            # last, a plain form post as the page may send one (allow-forms): Origin null
            with tab.expect_navigation():
                tab.evaluate("document.getElementById('f').submit()")
            seen["form"] = tab.inner_text("body").strip()
        yield {"seen": seen, "pages": pages, "aid": aid, "qid": qid}
    finally:
        ctx.close()
        with contextlib.suppress(Exception):
            rt.host_call("deny", id=aid)
        with contextlib.suppress(Exception):
            rt.host_call("answer_question", id=qid, answer="no")


def test_sandboxed_page_script_cannot_read_what_the_session_reads(attacked: dict[str, Any]) -> None:
    """The page's script fetches ``/api/state``, ``/`` and another agent's page with
    ``credentials: 'include'``. Must hold: its origin is opaque, and every read fails (a
    cross-origin request the core answers with no CORS grant; no cookie goes with it)."""
    seen = attacked["seen"]
    assert seen["origin"] == "null", seen
    for key in ("state_include", "dashboard", "other_agent"):
        assert seen[key].startswith("error"), (key, seen)
    assert seen["state_no_cors"].startswith("opaque"), seen  # a response it can't read


def test_sandboxed_page_script_cannot_open_a_window(attacked: dict[str, Any]) -> None:
    """On the operator's click the script opens ``/`` (to read the token from the window it
    opened: the round-4 hole). Must hold: no window opens."""
    assert attacked["seen"]["window"] == "none", attacked["seen"]
    assert attacked["pages"] == 1, attacked


def test_sandboxed_page_cannot_approve_or_answer_as_the_operator(
    rt: HiveProcess, attacked: dict[str, Any]
) -> None:
    """The script posts ``/approve/N`` and ``/answer-question/N`` (no-cors, credentials
    included), then a plain form on the page posts ``/approve/N``. Must hold: the approval
    stays pending and the question open (no cookie goes from an opaque origin, and its
    Origin is ``null``)."""
    seen = attacked["seen"]
    assert "not logged in" in seen["form"] or "Origin" in seen["form"], seen
    assert rt.host_call("show_approval", id=attacked["aid"])["approval"]["status"] == "pending"
    assert attacked["qid"] in [q["id"] for q in rt.host_call("questions")["questions"]]


def test_sandboxed_page_loads_nothing_of_its_harness(rt: HiveProcess, browser: Browser) -> None:
    """Left alone, the page's own script (from its harness, under ``/agent/NAME/page/``)
    goes without the operator's cookie, so the gateway refuses it before the harness sees
    it: no script of a harness's runs at all, sandboxed or not."""
    web = Web(rt)
    page = PAGE.replace("{aid}", "1")
    statuses: dict[str, int] = {}
    ctx = browser.new_context()
    ctx.set_default_timeout(30_000)
    try:
        with ScriptPage(rt.run_dir / "ui" / PAGE_AGENT / "web.sock",
                        {"/": ("text/html; charset=utf-8", page),
                         "/x.js": ("text/javascript", "document.title = 'ran';")}):
            tab = ctx.new_page()
            tab.on("response", lambda r: statuses.__setitem__(r.url, r.status))
            tab.goto(web.login_url)
            with tab.expect_response(web.url(f"{PAGE_URL}x.js")) as script:
                tab.goto(web.url(PAGE_URL))
            assert script.value.status == 401, script.value.status
            assert tab.title() == "agent", tab.title()
            assert statuses[web.url(PAGE_URL)] == 200, statuses
    finally:
        ctx.close()

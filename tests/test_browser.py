"""The operator's web surfaces in a real browser (Debian's chromium, driven by
playwright) against a real hive: nginx, the core, and agents in cages.

- The demo story (examples/demo/hive.toml), done as a person would: log in
  with the URL ``hive up`` printed, see the agents, send lead a message from the
  dashboard's send box, answer lead's question inline on lead's agent page,
  approve the spawn on the dashboard (payload and sha256 shown) and watch
  helper appear in the agents table live, with no reload.
- A hostile agent writes HTML and script into every field it can reach (its
  status, messages and a question to the operator, an approval's description
  and payload, its stdout and stderr); the dashboard and its agent page, both
  as first served and as updated live, show all of it as text and run none of
  it (an init script traps ``window.__pwned``, CSP violations and dialogs).

Screenshots go to artifacts/ (gitignored).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Dialog, Page, expect

from hyperhive.core.sessions import COOKIE
from hyperhive.core.store import canonical_json
from web_fixture import REPO, Web, artifact, browser, page_scripts, transcript, wait_for, web_hive  # noqa: F401 (browser)

DEMO_AGENTS: dict[str, dict[str, Any]] = tomllib.loads((REPO / "examples" / "demo" / "hive.toml").read_text())["agents"]
WAIT_MS = 30_000  # the machine is small and shared

expect.set_options(timeout=WAIT_MS)

# Installed in every page before any of its own scripts: records any attempt to run
# agent-controlled script (the payloads below all set window.__pwned or open a dialog)
# and every CSP violation (there should be none: nothing inline is ever in the page).
INSTRUMENT = """
(() => {
  const hits = [];
  const csp = [];
  Object.defineProperty(window, "__hits", { value: hits });
  Object.defineProperty(window, "__csp", { value: csp });
  Object.defineProperty(window, "__pwned", {
    configurable: false,
    get() { return undefined; },
    set(v) { hits.push("window.__pwned = " + String(v)); },
  });
  document.addEventListener("securitypolicyviolation", (e) => {
    csp.push(e.violatedDirective + " blocked " + e.blockedURI + " " + (e.sample || ""));
  }, true);
})();
"""


class Watch:
    """What a page did that it shouldn't: dialogs, uncaught errors, console errors."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.console: list[str] = []
        self.navigations: list[str] = []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("console", self._console)
        page.on("framenavigated", lambda f: self.navigations.append(f.url) if f == page.main_frame else None)

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error" and "favicon.ico" not in (msg.location or {}).get("url", ""):
            self.console.append(msg.text)

    def assert_clean(self) -> None:
        assert self.page.evaluate("window.__pwned") is None
        assert self.page.evaluate("window.__hits") == [], "agent-controlled script ran"
        assert self.page.evaluate("window.__csp") == [], "CSP violations (something inline got into the page)"
        assert self.dialogs == [], self.dialogs
        assert self.errors == [], self.errors
        assert [c for c in self.console if "Failed to load resource" not in c] == [], self.console


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.add_init_script(INSTRUMENT)
    try:
        yield ctx
    finally:
        ctx.close()


def row(page: Page, name: str) -> Any:
    return page.locator(f'#agents tr[data-name="{name}"]')


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(artifact(f"browser-{name}.png")), full_page=True)


# -- the demo --------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_demo_in_the_browser(context: BrowserContext) -> None:
    with web_hive(DEMO_AGENTS, extra_names=("helper",)) as web:
        run_demo(web, context)


def run_demo(web: Web, context: BrowserContext) -> None:
    page = context.new_page()
    watch = Watch(page)
    # Log in with the URL `hive up` printed: it lands on the dashboard, which opens its
    # live stream (server-sent events).
    with page.expect_response(lambda r: urlsplit(r.url).path == "/api/dashboard/stream") as stream:
        page.goto(web.login_url)
    expect(page).to_have_url(web.url("/"))
    assert stream.value.status == 200
    assert stream.value.headers["content-type"].startswith("text/event-stream"), stream.value.headers
    expect(row(page, "lead")).to_be_visible()
    expect(row(page, "scout")).to_be_visible()
    expect(page.locator("#agent-count")).to_have_text("2")
    for name in ("lead", "scout"):
        expect(row(page, name).locator(".state")).to_have_text("running")
        expect(row(page, name).locator("a")).to_have_attribute("href", f"/agent/{name}/")
    csrf = page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert csrf
    shot(page, "demo-1-dashboard")

    # From here on the dashboard must never reload: everything arrives live.
    page.evaluate("window.__sameDocument = true")
    navigations = len(watch.navigations)

    # Live over SSE: something happens in the hive that the browser had no part in.
    assert web.hive.agent_call("scout", "set_status", text="scouting the release")["ok"]
    expect(row(page, "scout").locator(".status-text")).to_have_text("scouting the release")

    # Send lead a message with the dashboard's send box.
    page.locator('#send-form input[name="to"]').fill("lead")
    page.locator('#send-form input[name="body"]').fill("Can we ship?")
    with page.expect_response(lambda r: urlsplit(r.url).path == "/api/agents/lead/send") as sent:
        page.locator("#send-form button").click()
    assert sent.value.status == 200, sent.value.text()
    assert sent.value.request.headers.get("x-csrf-token") == csrf

    # lead asks scout, scout answers, lead asks the operator: it all shows up live.
    question = page.locator("#questions li")
    expect(question).to_have_count(1)
    expect(question.locator(".q-text")).to_contain_text("Ship the release?")
    expect(row(page, "lead").locator(".status-text")).to_have_text("waiting for the operator's go-ahead")
    expect(page.locator("#messages")).to_contain_text("Can we ship?")
    expect(page.locator("#messages")).to_contain_text("Nothing blocks it")
    assert page.evaluate("window.__sameDocument") is True
    assert len(watch.navigations) == navigations, watch.navigations
    shot(page, "demo-2-question")

    # lead's page: its loose ends, with the question and an inline answer form.
    row(page, "lead").locator("a").click()
    expect(page).to_have_url(web.url("/agent/lead/"))
    expect(page.locator("h1")).to_have_text("lead")
    expect(page.locator("#status-text")).to_have_text("waiting for the operator's go-ahead")
    expect(page.locator("#transcript")).to_contain_text("Can we ship?")
    open_q = page.locator("#questions li.question")
    expect(open_q).to_have_count(1)
    expect(open_q.locator(".q-text")).to_contain_text("Ship the release?")
    qid = open_q.get_attribute("data-id")
    assert qid and qid.isdigit()
    # The page is the core's (issue 15: no harness code runs in this origin), so it
    # holds the session's own token, like the dashboard.
    page_token = page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert page_token == csrf
    shot(page, "demo-3-agent-page")

    with page.expect_request(lambda r: r.method == "POST" and urlsplit(r.url).path == f"/answer-question/{qid}") as req:
        open_q.get_by_role("button", name="yes", exact=True).click()
    form = parse_qs(req.value.post_data or "")
    # (an option as a JSON string: the button's value is never drawn through visible())
    assert form == {"csrf_token": [page_token], "option": ['"yes"']}, form
    assert req.value.all_headers().get("origin") == web.origin  # (htmx's: a fetch, all headers)
    # Still on lead's page (answered in place), with the question gone live.
    expect(page).to_have_url(web.url("/agent/lead/"))
    expect(page.locator("#questions li.question")).to_have_count(0)
    assert int(qid) not in [q["id"] for q in web.hive.host_call("questions")["questions"]]
    shot(page, "demo-4-answered")

    # lead got the answer and asks for approval to spawn helper.
    with page.expect_response(lambda r: urlsplit(r.url).path == "/api/dashboard/stream"):
        page.locator("header a", has_text="hive").click()
    expect(page).to_have_url(web.url("/"))
    page.evaluate("window.__sameDocument = true")
    navigations = len(watch.navigations)
    approval = page.locator("#approvals li")
    expect(approval).to_have_count(1)
    pending = wait_for(lambda: web.hive.host_call("pending")["approvals"], "lead's approval request")
    assert len(pending) == 1, pending
    expect(approval).to_contain_text("spawn helper to write the release notes")
    expect(approval.locator(".kind")).to_have_text("spawn")
    expect(approval.locator(".sha")).to_have_text(f"sha256 {pending[0]['payload_sha256']}")
    assert_payload_shown(approval, pending[0]["payload"])
    assert pending[0]["payload"]["name"] == "helper"
    shot(page, "demo-5-approval")

    with page.expect_response(lambda r: urlsplit(r.url).path == f"/approve/{pending[0]['id']}") as approved:
        approval.get_by_role("button", name="approve").click()
    assert approved.value.status == 200, approved.value.text()

    # helper appears in the agents table live, child of lead, running in its own cage.
    expect(row(page, "helper")).to_be_visible()
    expect(row(page, "helper").locator(".state")).to_have_text("running")
    expect(row(page, "helper").locator("td").nth(2)).to_have_text("lead")
    expect(page.locator("#agent-count")).to_have_text("3")
    expect(page.locator("#approvals li")).to_have_count(0)
    # lead received the approval: it asks helper for the notes and forwards helper's report.
    expect(page.locator("#messages")).to_contain_text("approved")
    expect(page.locator("#messages")).to_contain_text("helper reports: Release notes written")
    assert page.evaluate("window.__sameDocument") is True
    assert len(watch.navigations) == navigations, watch.navigations
    shot(page, "demo-6-helper")

    lead_inputs = [e["data"] for e in transcript(web.hive, "lead") if e["kind"] == "input"]
    assert any(d.get("kind") == "approval" and str(d.get("body", "")).startswith("approved") for d in lead_inputs)
    assert web.hive.agent_status()["helper"]["running"]
    watch.assert_clean()

    # Log out: the session is gone, and with it the dashboard and the agent pages.
    page.get_by_role("button", name="log out").click()
    expect(page.locator("body")).to_contain_text("not logged in")
    assert not [c for c in page.context.cookies() if c["name"] == COOKIE]
    page.goto(web.url("/agent/lead/"))
    expect(page.locator("body")).to_contain_text("not logged in")
    shot(page, "demo-7-logged-out")


# -- a hostile agent -------------------------------------------------------------------

HOSTILE = "hostile"
PAYLOADS = [
    '<img src=x onerror="window.__pwned=1;alert(1)">',
    "<script>window.__pwned=2;alert(2)</script>",
    '"><svg onload="window.__pwned=3">',
    "'><svg/onload=window.__pwned=4>",
    '<a href="javascript:window.__pwned=5" id="hostile-link">click me</a>',
    "javascript:window.__pwned=6",
    "</pre></li></ol></ul><script>window.__pwned=7</script>",
    '<iframe srcdoc="<script>parent.__pwned=8</script>"></iframe>',
    "<style>body{display:none}</style><b>bold?</b>",
    '<meta http-equiv="refresh" content="0;url=javascript:window.__pwned=9">',
    "{{ 7*7 }} ${7*7} {% raw %} <%= 7*7 %>",
    "<textarea><!-- &lt;script&gt; &amp;",
    "line one\ndata: {\"forged\": true}\nevent: message\n\nline after",  # SSE framing
]
SINGLE_LINE = [p for p in PAYLOADS if "\n" not in p]

# The agent's runtime: one run per message. It puts the operator's message (a turn
# label) and every payload into everything it can reach.
HOSTILE_TURN = f"""
import json, os, socket, sys
P = json.loads({json.dumps(json.dumps(PAYLOADS))})
msg = json.load(sys.stdin)
def hive(cmd, **fields):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.environ["HIVE_SOCKET"])
    s.sendall(json.dumps({{"cmd": cmd, **fields}}).encode() + b"\\n")
    reply = json.loads(s.makefile("rb").readline())
    s.close()
    if not reply.get("ok"):
        raise SystemExit(cmd + ": " + str(reply))
    return reply
if msg["kind"] != "message":
    raise SystemExit(0)
text = msg["body"] + " " + " ".join(P)
hive("set_status", text=text)
hive("send", to="operator", body=text)
hive("ask", to="operator", question=text, options=P[:5])
hive("request_approval", kind="custom", description=text, payload={{"html": text, P[0]: P[1], "all": P}})
for p in P:
    print(p, flush=True)
    print(p, file=sys.stderr, flush=True)
print(json.dumps({{"html": P[1], "turn": msg["body"]}}), flush=True)
"""
HOSTILE_AGENTS = {HOSTILE: {"runtime": "command", "command": ["python3", "-c", HOSTILE_TURN]}}


def hostile_text(label: str) -> str:
    return label + " " + " ".join(PAYLOADS)


def run_turn(web: Web, label: str) -> None:
    """Message the hostile agent and wait until its turn has written everything."""
    assert web.hive.host_call("send", to=HOSTILE, body=label)["ok"]

    def done() -> bool:
        entries = transcript(web.hive, HOSTILE)
        turn = [e["turn"] for e in entries if e["kind"] == "input" and e["data"].get("body") == label]
        return bool(turn) and any(e["kind"] == "exit" and e["turn"] == turn[0] for e in entries)

    wait_for(done, f"{HOSTILE}'s turn {label!r}")
    exits = [e["data"] for e in transcript(web.hive, HOSTILE) if e["kind"] == "exit"]
    assert exits[-1]["exit_status"] == 0, transcript(web.hive, HOSTILE)[-30:]


NO_MARKUP = """() => {
  const bad = document.querySelectorAll(
    'img, svg, iframe, style, textarea, object, embed, meta[http-equiv], base, #hostile-link, a[href^="javascript:" i]');
  const scripts = [...document.scripts].map(s => s.getAttribute("src"));
  return { bad: [...bad].map(e => e.outerHTML), scripts };
}"""


def assert_no_markup(page: Page, script: str, vendored: tuple[str, ...] = ()) -> None:
    found = page.evaluate(NO_MARKUP)
    assert found["bad"] == [], f"agent markup became elements: {found['bad']}"
    # Our scripts only: the vendored libraries the page names, the shared escaping
    # (display.js, beside the page's own script) and the page's own.
    assert found["scripts"] == page_scripts(script, vendored), found["scripts"]


def texts(locator: Any) -> list[str]:
    return [t or "" for t in locator.all_text_contents()]


def assert_payload_shown(approval: Any, payload: Any) -> None:
    """The operator sees exactly the text the sha256 beside it was taken of."""
    shown = approval.locator(".payload").text_content()
    assert shown == canonical_json(payload), shown
    assert approval.locator(".sha").text_content() == "sha256 " + hashlib.sha256(shown.encode()).hexdigest()


def check_dashboard(page: Page, label: str, latest: bool = True) -> None:
    text = hostile_text(label)
    if latest:  # the status is the latest turn's
        expect(row(page, HOSTILE).locator(".status-text")).to_have_text(text, use_inner_text=False)
        assert row(page, HOSTILE).locator(".status-text").text_content() == text
    assert text in texts(page.locator("#messages .body"))
    assert text in texts(page.locator("#questions .q-text"))
    li = page.locator("#questions li").filter(has_text=label)
    for p in PAYLOADS[:5]:
        expect(li.get_by_role("button", name=p, exact=True)).to_have_count(1)
    approval = page.locator("#approvals li").filter(has_text=label)
    expect(approval).to_have_count(1)
    assert text in approval.text_content()
    assert_payload_shown(approval, {"html": text, PAYLOADS[0]: PAYLOADS[1], "all": PAYLOADS})
    assert_no_markup(page, "/static/dashboard.js")


AGENT_PAGE_VENDORED = ("/static/vendor/htmx-2.0.11.min.js", "/static/vendor/htmx-ext-sse-2.2.4.min.js")


def check_agent_page(page: Page, label: str) -> None:
    text = hostile_text(label)
    assert page.locator("#status-text").text_content() == text
    shown = texts(page.locator("#transcript pre"))
    for p in SINGLE_LINE:
        assert shown.count(p) >= 2, f"{p!r} not shown as stdout and stderr text"
    assert any(label in s for s in shown), shown[-5:]
    # The agent page is the core's since issue 15, live through the vendored htmx.
    assert_no_markup(page, "/static/agent.js", AGENT_PAGE_VENDORED)


@pytest.mark.timeout(300)
def test_hostile_agent_runs_no_script(context: BrowserContext) -> None:
    with web_hive(HOSTILE_AGENTS) as web:
        run_turn(web, "turn-1")
        state = web.hive.host_call("questions")["questions"]
        assert [q["question"] for q in state] == [hostile_text("turn-1")]

        # The dashboard as first served (the server's template)...
        page = context.new_page()
        watch = Watch(page)
        with page.expect_response(lambda r: urlsplit(r.url).path == "/api/dashboard/stream"):
            page.goto(web.login_url)
        expect(page).to_have_url(web.url("/"))
        check_dashboard(page, "turn-1")
        watch.assert_clean()
        shot(page, "hostile-1-dashboard")

        # ...and as redrawn live (the dashboard's script), on the next turn's events.
        page.evaluate("window.__sameDocument = true")
        run_turn(web, "turn-2")
        expect(row(page, HOSTILE).locator(".status-text")).to_contain_text("turn-2 ")
        expect(page.locator("#questions li")).to_have_count(2)
        expect(page.locator("#approvals li")).to_have_count(2)
        check_dashboard(page, "turn-2")
        check_dashboard(page, "turn-1", latest=False)
        assert page.evaluate("window.__sameDocument") is True
        watch.assert_clean()
        shot(page, "hostile-2-dashboard-live")

        # Its agent page as first served...
        with page.expect_response(lambda r: urlsplit(r.url).path == f"/agent/{HOSTILE}/events"):
            row(page, HOSTILE).locator("a").click()
        expect(page).to_have_url(web.url(f"/agent/{HOSTILE}/"))
        check_agent_page(page, "turn-2")
        expect(page.locator("#questions li.question")).to_have_count(2)
        assert hostile_text("turn-1") in texts(page.locator("#questions .q-text"))
        assert hostile_text("turn-2") in texts(page.locator("#approvals li.approval"))[-1]
        payloads = [json.loads(t) for t in texts(page.locator("#approvals .payload"))]
        assert {"html": hostile_text("turn-2"), PAYLOADS[0]: PAYLOADS[1], "all": PAYLOADS} in payloads
        for p in PAYLOADS[:5]:
            expect(page.locator("#questions li.question").first.get_by_role("button", name=p, exact=True)) \
                .to_have_count(1)
        watch.assert_clean()
        shot(page, "hostile-3-agent-page")

        # ...and with the transcript and status updated live.
        page.evaluate("window.__sameDocument = true")
        before = page.locator("#transcript li").count()
        run_turn(web, "turn-3")
        expect(page.locator("#transcript li.entry.exit")).to_have_count(3)
        assert page.locator("#transcript li").count() > before
        expect(page.locator("#status-text")).to_contain_text("turn-3 ")
        check_agent_page(page, "turn-3")
        live = texts(page.locator("#transcript li").nth(before).locator("pre"))
        assert live and "turn-3" in live[0], live
        assert page.evaluate("window.__sameDocument") is True
        watch.assert_clean()
        shot(page, "hostile-4-agent-page-live")

        # Answering with one of its options sends exactly that text back to it.
        page.goto(web.url("/"))
        li = page.locator("#questions li").filter(has_text="turn-1")
        qid = int(li.get_attribute("data-id"))
        li.get_by_role("button", name=PAYLOADS[1], exact=True).click()
        expect(page.locator(f'#questions li[data-id="{qid}"]')).to_have_count(0)

        def answered() -> Any:
            return [e for e in transcript(web.hive, HOSTILE)
                    if e["kind"] == "input" and e["data"].get("kind") == "answer" and e["data"].get("ref") == qid]

        entry = wait_for(answered, "the answer to reach the hostile agent")[0]
        assert entry["data"]["body"] == PAYLOADS[1]
        watch.assert_clean()

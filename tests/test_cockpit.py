"""The operator's cockpit (the dashboard, issue 15) in a real browser (Debian's chromium,
driven by playwright) against one real hive for the module: nginx, the core, agents in
cages.

- Live without loss: a half-typed answer and a deny note survive a burst of events that
  redraws their rows (htmx's SSE extension, idiomorph morphing the server's sections by
  id); the focused box keeps its focus; the page never reloads.
- The attention queue sits at the top, with ids, times and counts (also in the title);
  each item is actionable in place; an answer outside the options is refused in words
  until the operator says it is meant; toasts say what was done, in words.
- A visible connection state ("live", "disconnected: reconnecting…").
- Agents at 1,000 (rows put straight into the hive's SQLite; the agents cache reloads
  on the next agent write): a page of 50, state filter and name search, a failed agent in
  the queue, the egress "no rules" agents on one line; the first screen stays small.
- Secrets (issue 16): every secret's name and bindings, bound and unbound with the
  cockpit's forms (host.sock's verbs), its value in no page, stream or /api/state.
- A phone-width screen (375 px) doesn't scroll sideways.
- The htmx config keeps the gateway's CSP (script-src 'self', no eval): no violations.

Screenshots go to artifacts/cockpit-*.png (linked from the README's tour).
"""

from __future__ import annotations

import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from test_browser import INSTRUMENT, Watch
from web_fixture import Web, artifact, browser, wait_for, web_hive  # noqa: F401 (browser)

ASKER, FLAKY = "ckasker", "ckflaky"
CALM = ASKER  # the agent the operator messages (two cages keep the module's hive quick)
AGENTS: dict[str, dict[str, Any]] = {
    ASKER: {"runtime": "command", "command": ["true"], "peers": []},
    FLAKY: {"runtime": "command", "command": ["true"], "peers": []},
}
BULK = 1000  # agent rows put straight into the store
SCRIPTS = ["/static/vendor/htmx-2.0.11.min.js", "/static/vendor/htmx-ext-sse-2.2.4.min.js",
           "/static/vendor/idiomorph-ext-0.7.4.min.js", "/static/display.js", "/static/steady.js",
           "/static/dashboard.js"]

expect.set_options(timeout=30_000)


@pytest.fixture(scope="module")
def web() -> Iterator[Web]:
    with web_hive(AGENTS) as w:
        yield w


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.add_init_script(INSTRUMENT)
    try:
        yield ctx
    finally:
        ctx.close()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(artifact(f"cockpit-{name}.png")))


def open_cockpit(web: Web, context: BrowserContext, path: str = "/") -> tuple[Page, Watch]:
    page = context.new_page()
    watch = Watch(page)
    page.goto(web.login_url)
    if path != "/":
        page.goto(web.url(path))
    expect(page.locator("#conn")).to_have_text("live")
    page.evaluate("window.__sameDocument = true")
    return page, watch


def clean(page: Page, watch: Watch) -> None:
    watch.assert_clean()
    scripts = page.evaluate("[...document.scripts].map(s => s.getAttribute('src'))")
    assert scripts == SCRIPTS, scripts
    assert page.evaluate("window.__sameDocument") is True, "the page reloaded"


def ask(web: Web, question: str, options: list[str] | None = None) -> int:
    reply = web.hive.agent_call(ASKER, "ask", to="operator", question=question,
                                **({"options": options} if options else {}))
    assert reply["ok"], reply
    return int(reply["id"])


def test_typing_survives_a_burst_of_events(web: Web, context: BrowserContext) -> None:
    qid = ask(web, "Which branch do we release?")
    req = web.hive.agent_call(ASKER, "request_approval", kind="custom", description="rotate the keys",
                              payload={"rotate": True})
    assert req["ok"], req
    aid = int(req["id"])
    page, watch = open_cockpit(web, context)
    item = page.locator(f"#question-{qid}")
    expect(item.locator(".ident")).to_have_text(f"question {qid}")
    expect(item.locator(".head")).to_contain_text(ASKER)
    expect(item.locator("time")).to_contain_text("UTC")
    expect(page.locator(f"#approval-{aid} .ident")).to_have_text(f"approval {aid}")
    expect(page).to_have_title(re.compile(r"^\(2\) hyperhive$"))

    # A half-written deny note, then a half-written answer (which keeps the focus).
    note = page.locator(f"#note-{aid}")
    note.fill("not this week")
    box = page.locator(f"#answer-{qid}")
    box.click()
    box.press_sequentially("main, after the")

    # A burst: each event redraws the sections around both boxes.
    for i in range(12):
        assert web.hive.agent_call(ASKER, "set_status", text=f"busy {i}")["ok"]
        assert web.hive.agent_call(ASKER, "send", to="operator", body=f"report {i}")["ok"]
    qid2 = ask(web, "Tag it?", ["yes", "no"])
    expect(page.locator(f"#question-{qid2}")).to_be_visible()
    expect(page.locator("#inbox-list")).to_contain_text("report 11")
    expect(page.locator(f'#agents tr[data-name="{ASKER}"] .status-text')).to_have_text("busy 11")
    expect(page).to_have_title(re.compile(r"^\(3\) hyperhive$"))
    assert box.input_value() == "main, after the"
    assert note.input_value() == "not this week"
    assert page.evaluate("document.activeElement && document.activeElement.id") == f"answer-{qid}"
    box.press_sequentially(" freeze")  # the focus never left: typing goes on
    assert box.input_value() == "main, after the freeze"
    shot(page, "1-typing-during-a-burst")

    # Answered in place: the toast says what was done, in words; the item goes.
    box.press("Enter")
    expect(page.locator(".toast").filter(has_text=f"answered question {qid}")).to_have_count(1)
    expect(page.locator(f"#question-{qid}")).to_have_count(0)
    assert not [q for q in web.hive.host_call("questions")["questions"] if q["id"] == qid]

    # An answer outside the offered options is refused in words, until it is meant.
    free = page.locator(f"#answer-{qid2}")
    free.fill("maybe")
    free.press("Enter")
    expect(page.locator(".toast.bad").filter(has_text="is not one of question")).to_have_count(1)
    assert any(q["id"] == qid2 for q in web.hive.host_call("questions")["questions"])
    assert free.input_value() == "maybe"
    page.locator(f"#other-{qid2}").check()
    free.press("Enter")
    expect(page.locator(".toast").filter(has_text=f"answered question {qid2}")).to_have_count(1)
    expect(page.locator(f"#question-{qid2}")).to_have_count(0)

    # Deny with the note typed before the burst.
    page.locator(f"#approval-{aid}").get_by_role("button", name="deny").click()
    expect(page.locator(".toast").filter(has_text=f"denied approval {aid}")).to_have_count(1)
    expect(page.locator(f"#approval-{aid}")).to_have_count(0)
    expect(page).to_have_title("hyperhive")
    # The message box clears after sending.
    send = page.locator("#send-form")
    send.locator('input[name="to"]').fill(CALM)
    send.locator('input[name="body"]').fill("all clear")
    with page.expect_response(lambda r: urlsplit(r.url).path == f"/api/agents/{CALM}/send") as sent:
        send.get_by_role("button", name="send").click()
    assert sent.value.status == 200
    expect(page.locator(".toast").filter(has_text=f"sent the message to {CALM}")).to_have_count(1)
    expect(send.locator('input[name="body"]')).to_have_value("")
    # The inbox: newest first, with times, unread count; marking read clears it.
    inbox = page.locator("#inbox-list li")
    expect(inbox.first).to_contain_text("report 11")
    expect(inbox.first.locator("time")).to_contain_text("UTC")
    expect(page.locator("#inbox-unread")).to_have_text("12 unread")
    page.locator("#inbox").get_by_role("button", name="mark read").click()
    expect(page.locator("#inbox-unread")).to_have_text("0 unread")
    shot(page, "2-answered")
    clean(page, watch)


def test_connection_state_is_visible(web: Web, context: BrowserContext) -> None:
    page, watch = open_cockpit(web, context)
    context.set_offline(True)
    # Cut the stream from the page's side: the EventSource errors, the extension retries.
    page.evaluate("""() => {
        const es = htmx.find('#live')['htmx-internal-data'].sseEventSource;
        es.onerror(new Event('error')); es.close(); es.onerror(new Event('error'));
    }""")
    expect(page.locator("#conn")).to_have_text("disconnected: reconnecting…")
    shot(page, "3-disconnected")
    context.set_offline(False)
    expect(page.locator("#conn")).to_have_text("live")
    assert web.hive.agent_call(CALM, "set_status", text="back again")["ok"]
    expect(page.locator(f'#agents tr[data-name="{CALM}"] .status-text')).to_have_text("back again")
    watch.console.clear()  # the offline stream's "Failed to load resource" is expected
    clean(page, watch)


def test_forms_work_without_a_script(web: Web) -> None:
    """Plain form posts (CSRF field, this origin): done, then 303 back to the page."""
    login = web.login()

    def post(path: str, **data: str) -> httpx.Response:
        return web.request("POST", path, login=login, origin=web.origin,
                           data={"csrf_token": login.csrf, **data})

    r = post("/api/agents/_/send", to=ASKER, body="sent by a plain form")
    assert r.status_code == 303 and r.headers["location"] == "/", (r.status_code, r.text)
    qid = ask(web, "Plain?", ["yes", "no"])
    r = post(f"/answer-question/{qid}", answer="maybe", check_options="1")
    assert r.status_code == 422 and "'maybe' is not one of question" in r.text, r.text
    assert r.text.count("\n") == 1
    r = post(f"/answer-question/{qid}", answer="maybe", check_options="1", other="1")
    assert r.status_code == 303, r.text
    page = web.get(f"/?state=running&q={ASKER[:4]}", login=login)
    assert page.status_code == 200 and f'data-name="{ASKER}"' in page.text


def test_read_marks_are_the_operators_in_every_login(web: Web) -> None:
    """"mark read" in one login marks the messages read in another (and across a core
    restart: they are in the store, tests/test_inbox_read.py); before, each session had
    its own marks in the core's memory, and a new login started with everything unread."""
    first = web.login()
    sent = [web.hive.agent_call(ASKER, "send", to="operator", body=f"read me {i}")["id"] for i in range(2)]
    page = web.get("/", login=first).text
    for mid in sent:
        assert re.search(rf'id="inbox-{mid}" data-id="{mid}" class="unread"', page), mid
    r = web.request("POST", "/inbox/read", login=first, csrf=first.csrf, origin=web.origin,
                    headers={"HX-Request": "true"}, data={"shown": str(sent[0])})
    assert r.status_code == 200, r.text
    other = web.get("/", login=web.login()).text
    assert re.search(rf'id="inbox-{sent[0]}" data-id="{sent[0]}" class="read"', other), other[:300]
    assert re.search(rf'id="inbox-{sent[1]}" data-id="{sent[1]}" class="unread"', other)


class StreamTap:
    """Reads a live stream (as the operator's browser would) in a thread until ``until``
    says it read enough, or ``seconds`` pass; ``text`` is all of it."""

    def __init__(self, web: Web, path: str, cookies: dict[str, str], until: Callable[[str], bool],
                 seconds: float = 60) -> None:
        self.text, self.until = "", until
        self.thread = threading.Thread(target=self._read, args=(web.url(path), cookies, seconds), daemon=True)
        self.thread.start()

    def _read(self, url: str, cookies: dict[str, str], seconds: float) -> None:
        end = time.monotonic() + seconds
        try:
            with httpx.stream("GET", url, headers=cookies, timeout=20) as r:
                for chunk in r.iter_text():
                    self.text += chunk
                    if self.until(self.text) or time.monotonic() > end:
                        return
        except httpx.HTTPError as e:  # the hive went away: what was read is kept
            self.text += f"\n[stream cut: {e}]"

    def done(self) -> str:
        self.thread.join(70)
        return self.text


def test_secret_bindings_from_the_cockpit_never_show_a_value(web: Web) -> None:
    """The operator binds and unbinds a secret with the cockpit's plain forms (no script):
    the section lists its name and bindings, the live streams redraw it, and its value is
    in no page, no stream and not in /api/state."""
    login = web.login()
    name, value = "ckapi", "sk-cockpit-" + secrets.token_hex(16)
    assert web.hive.host_call("secret_set", name=name, value=value)["ok"]
    bound, unbound = f'id="binding-{name}-', f'id="secret-{name}"'

    def bound_then_unbound(text: str) -> bool:
        return bound in text and unbound in text.rsplit(bound, 1)[1]

    html_tap = StreamTap(web, "/api/dashboard/stream?view=html", login.cookies, bound_then_unbound)
    json_tap = StreamTap(web, "/api/dashboard/stream", login.cookies, lambda t: t.count('"change": "unbound"') == 2)
    time.sleep(0.5)  # both streams subscribed before the changes (each starts with the whole page)

    def post(path: str, **data: str) -> httpx.Response:
        return web.request("POST", path, login=login, origin=web.origin, data={"csrf_token": login.csrf, **data})

    page = web.get("/", login=login).text
    assert f'<tr id="secret-{name}"' in page and "bound for no agent" in page
    assert "hive secret set NAME" in page and "never takes one" in page  # values: command line only
    assert 'name="value"' not in page
    # A bad binding: one line, nothing bound.
    r = post("/api/secrets/_/bind", secret=name, agents=ASKER, to="api.test:443", header="x-api-key: none")
    assert r.status_code == 422 and "exactly one {}" in r.text and r.text.count("\n") <= 1, (r.status_code, r.text)
    r = post("/api/secrets/_/bind", secret=name, agents=f"{ASKER}, {FLAKY}", to="API.test.:443",
             header="x-api-key: {}", env="CK_API_KEY")
    assert r.status_code == 303 and r.headers["location"] == "/", (r.status_code, r.text)
    [row] = [x for x in web.hive.host_call("secret_ls")["secrets"] if x["name"] == name]
    assert [(b["agent"], b["to"], b["env"]) for b in row["bindings"]] == [
        (ASKER, "api.test:443", "CK_API_KEY"), (FLAKY, "api.test:443", "CK_API_KEY")]
    page = web.get("/", login=login).text
    for agent in (ASKER, FLAKY):
        assert f'<tr id="binding-{name}-{agent}" class="binding-row" data-secret="{name}" data-agent="{agent}">' in page
    assert "<code>x-api-key: {}</code>" in page and f'id="secret-{name}"' not in page
    # The live stream draws the binding (it coalesces a burst: wait before changing it again).
    wait_for(lambda: f'id="binding-{name}-{ASKER}"' in html_tap.text, "the stream to draw the binding")
    # Unbind one with the row's form posted by htmx (a toast in words), the other plainly.
    r = web.request("POST", f"/api/secrets/{name}/unbind", login=login, origin=web.origin,
                    headers={"HX-Request": "true"}, data={"csrf_token": login.csrf, "agent": FLAKY})
    assert r.status_code == 200 and f"secret {name} unbound from {FLAKY}" in r.text, r.text
    r = post(f"/api/secrets/{name}/unbind", agent=ASKER)
    assert r.status_code == 303, (r.status_code, r.text)
    [row] = [x for x in web.hive.host_call("secret_ls")["secrets"] if x["name"] == name]
    assert row["bindings"] == [] and row["set"] is True
    page = web.get("/", login=login).text
    assert f'id="binding-{name}-' not in page and f'<tr id="secret-{name}"' in page
    r = post(f"/api/secrets/{name}/unbind", agent=ASKER)  # nothing left to unbind: refused
    assert r.status_code == 404 and "no binding of secret" in r.text, (r.status_code, r.text)

    streamed_html, streamed_json = html_tap.done(), json_tap.done()
    assert f'id="binding-{name}-{ASKER}"' in streamed_html, streamed_html[-2000:]  # the stream redrew it
    assert bound_then_unbound(streamed_html), streamed_html[-2000:]
    assert '"kind": "secret"' in streamed_json and '"change": "unbound"' in streamed_json, streamed_json[-2000:]
    state = web.get("/api/state", login=login)
    assert state.status_code == 200
    for text in (page, streamed_html, streamed_json, state.text, web.hive.log_tail(2000)):
        assert value not in text
    assert web.hive.host_call("secret_rm", name=name)["ok"]


def test_secrets_section_binds_and_unbinds_in_place(web: Web, context: BrowserContext) -> None:
    """In Chromium, with htmx: the bind form posts in place (a toast in words, the form
    cleared), the live stream draws the binding, its unbind button removes it; the value
    is never in the page."""
    name, value = "ckweb", "sk-web-" + secrets.token_hex(16)
    assert web.hive.host_call("secret_set", name=name, value=value)["ok"]
    page, watch = open_cockpit(web, context)
    expect(page.locator(f"#secret-{name} .value-state")).to_contain_text("set ")
    form = page.locator("#secret-bind-form")
    for field, text in (("secret", name), ("agents", CALM), ("to", "web.test:443"),
                        ("header", "Authorization: Bearer {}"), ("env", "WEB_TOKEN")):
        form.locator(f'input[name="{field}"]').fill(text)
    form.get_by_role("button", name="bind").click()
    expect(page.locator(".toast").filter(has_text=f"secret {name} bound for {CALM} to web.test:443")).to_have_count(1)
    row = page.locator(f"#binding-{name}-{CALM}")
    expect(row).to_contain_text("Authorization: Bearer {}")
    expect(row).to_contain_text("WEB_TOKEN")
    expect(form.locator('input[name="secret"]')).to_have_value("")
    row.get_by_role("button", name="unbind").click()
    expect(page.locator(".toast").filter(has_text=f"secret {name} unbound from {CALM}")).to_have_count(1)
    expect(row).to_have_count(0)
    expect(page.locator(f"#secret-{name}")).to_contain_text("bound for no agent")
    assert value not in page.content()
    clean(page, watch)
    assert web.hive.host_call("secret_rm", name=name)["ok"]


def insert_agents(web: Web, n: int) -> None:
    """``n`` agent rows straight into the hive's SQLite (stopped: no cage is started).
    The core's agents cache replaces one row on a one-row write (a status, a pause), so
    a whole-table write makes it read them: an agent spawned and destroyed."""
    db = sqlite3.connect(web.hive.state_dir / "hive.db", timeout=30)
    try:
        spec = db.execute("SELECT spec FROM agents WHERE name=?", (CALM,)).fetchone()[0]
        now = time.time()
        with db:
            db.executemany(
                "INSERT INTO agents (name, spec, parent, origin, paused, stopped, status_text,"
                " status_set_at, created_at) VALUES (?, ?, NULL, 'operator', ?, 1, ?, ?, ?)",
                [(f"bulk-{i:04d}", spec, i % 7 == 0, f"idle {i}", now, now) for i in range(n)])
    finally:
        db.close()
    for cmd, fields in (("spawn", {"spec": {"runtime": "command", "command": ["true"]}}), ("destroy", {})):
        done = web.hive.host_call(cmd, name="bulk-gone", **fields)
        assert done["ok"], done
    assert web.hive.agent_call(CALM, "set_status", text="a thousand neighbours")["ok"]
    wait_for(lambda: len(web.hive.agent_status()) == n + len(AGENTS), "the bulk agents")


def test_attention_queue_with_a_thousand_agents(web: Web, context: BrowserContext) -> None:
    insert_agents(web, BULK)
    qid = ask(web, "Still there?")
    web.hive.cgroup(FLAKY).kill_all(1.0)  # its harness goes away: a failed agent
    login = web.login()
    first = web.get("/", login=login)
    assert first.status_code == 200 and len(first.content) < 400_000, len(first.content)
    page, watch = open_cockpit(web, context)
    expect(page.locator("#agent-count")).to_have_text(str(BULK + len(AGENTS)))
    expect(page.locator("#agents tbody tr")).to_have_count(50)
    expect(page.locator("#agents-pager")).to_contain_text("page 1 of 21")
    trouble = page.locator(f"#trouble-{FLAKY}")
    expect(trouble).to_contain_text("failed")
    expect(trouble.get_by_role("button", name="start")).to_have_count(1)
    q = page.locator(f"#question-{qid}")
    expect(q).to_be_visible()
    assert q.bounding_box()["y"] < page.locator("#agents").bounding_box()["y"]  # first, at the top
    assert q.bounding_box()["y"] < 900
    expect(page).to_have_title(re.compile(r"^\(2\) hyperhive$"))
    # One line for the agents without egress rules, not a thousand rows.
    expect(page.locator("#egress-rules tr.no-rules")).to_have_count(1)
    expect(page.locator("#egress-rules tr.no-rules")).to_contain_text("more")
    # States look different and actions fit them: no start on a running agent.
    stopped = page.locator('#agents tr[data-name="bulk-0001"]')
    expect(stopped.locator(".state")).to_have_text("stopped")
    expect(stopped.locator("button")).to_have_text(["start", "destroy"])
    shot(page, "4-a-thousand-agents")

    # Filter by state and search by name (plain GET links and a GET form).
    page.locator("#agent-filter select").select_option("running")
    page.locator("#agent-filter button").click()
    expect(page.locator("#agents tbody tr")).to_have_count(1)
    running = page.locator(f'#agents tr[data-name="{CALM}"]')
    expect(running.locator(".state")).to_have_text("running")
    expect(running.locator("button")).to_have_text(["pause", "interrupt", "restart", "stop", "destroy"])
    page.locator("#agent-filter select").select_option("")
    page.locator('#agent-filter input[name="q"]').fill("bulk-099")
    page.locator("#agent-filter button").click()
    expect(page.locator("#agents tbody tr")).to_have_count(10)
    expect(page.locator("#conn")).to_have_text("live")
    # Still live on a filtered page: a status change shows.
    assert web.hive.host_call("answer_question", id=qid, answer="yes")["ok"]
    expect(page.locator(f"#question-{qid}")).to_have_count(0)

    # A phone-width screen (375 px) doesn't scroll sideways, a long question and all.
    ask(web, "A long question for a small screen: " + "words " * 40, ["yes", "no"])
    page.goto(web.url("/"))
    page.set_viewport_size({"width": 375, "height": 800})
    expect(page.locator("#questions li")).not_to_have_count(0)
    width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], width
    shot(page, "5-phone")
    watch.assert_clean()

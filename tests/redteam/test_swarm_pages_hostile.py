"""A hostile host and the operator's pages of other hosts' agents (issue 18, the cockpit's
``/swarm/HOST/agent/NAME/`` and the dashboard's send box): host c, with its core's real
NATS credentials, writes roster rows whose every field is markup, whose value claims
another host and another agent (b's bob), and whose status text is far longer than an
agent may set. On a, the operator's pages show all of it as text, bounded, and every
action they offer names the roster key's host and agent (what NATS vouches for), never
what a row's value says: c can't steer the operator's click to b's bob."""

from __future__ import annotations

import html
import json
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, expect

from helpers import wait_for
from hive_fixture import HiveProcess
from hyperhive.swarm import subjects as s
from hyperhive.wire.common import SHORT_TEXT_CHARS
from swarm_fixture import Swarm
from test_browser import INSTRUMENT
from web_fixture import META_CSRF, Web, browser  # noqa: F401 (browser: the module's chromium)

from .test_swarm_hostile import as_host_c

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.attack("swarm-page-injection", ref="issue 18: another host's agent's page in the cockpit"),
]

MARKUP = '<script>window.__pwned=1</script><img src=x onerror="alert(1)"><a href="//evil.example/">x</a>'
QID, AID = 990001, 990002


def put(swarm: Swarm[Any], items: dict[str, Any], delete: bool = False) -> None:
    """As host c: put (or delete) keys of its own roster bucket, values as given."""
    async def attack(nc: Any) -> None:
        for key, value in items.items():
            subject = s.kv_subject("c", key)
            if delete:
                await nc.request(subject, b"", headers={"KV-Operation": "DEL"}, timeout=10)
            else:
                reply = await nc.request(subject, json.dumps(value).encode(), timeout=10)
                assert "error" not in json.loads(reply.data), reply.data

    # In a thread of its own: playwright's sync API holds this thread's event loop.
    with ThreadPoolExecutor(1) as pool:
        errors = pool.submit(as_host_c, swarm, attack, settle=0).result()
    assert errors == []  # its own keys: NATS lets them through


def hostile_fields(swarm: Swarm[Any], page: str) -> None:
    """What a page of a's must never have: c's markup as markup, a host or agent c named."""
    assert "<script>window.__pwned" not in page and "<img src=x" not in page, page
    assert 'href="//evil.example/' not in page
    assert set(re.findall(r'name="host" value="([^"]*)"', page)) <= {"c"}, page
    assert "/api/agents/bob/" not in page


def part(page: str, start: str, end: str) -> str:
    """The piece of ``page`` from ``start`` to the first ``end`` after it."""
    assert start in page, start
    piece = page[page.index(start):]
    return piece[: piece.index(end)]


def login(swarm: Swarm) -> httpx.Client:
    a = swarm.cores["a"]
    token = (a.state_dir / "operator.token").read_text().strip()
    web = httpx.Client(transport=httpx.HTTPTransport(uds=str(a.run_dir / "core.sock")),
                       base_url="http://core", timeout=30)  # fmt: skip
    assert web.get("/login", params={"token": token}).status_code == 303
    return web


def test_c_s_rows_are_text_on_a_and_its_actions_stay_on_c(swarm: Swarm) -> None:
    """c's row ``agents.c.evil`` (value: name bob, host b, markup in every field, 20,000
    characters of status) and ``agents.c.bob`` (b's agent's name): a's page of each shows
    the markup as text, the status cut to what an agent may set, host c on every form and
    the key's name on every action; b's bob's page is b's. Then, with c's core stopped (its
    own relay would delete them at once), c's question and approval rows of evil: shown on
    evil's page and the dashboard as text, answered or approved only on host c."""
    rows = {
        s.row_key("c", "evil"): {"name": "bob", "host": "b", "running": True, "paused": MARKUP,
                                 "status_text": MARKUP + "y" * 20_000},
        s.row_key("c", "bob"): {"name": MARKUP, "host": "b", "running": True, "status_text": MARKUP},
    }  # fmt: skip
    items = {
        s.question_key("c", QID): {"asker": "evil", "question": MARKUP, "options": [MARKUP, "yes"],
                                   "asked_at": MARKUP, "host": "b", "id": 1},
        s.approval_key("c", AID): {"agent": "evil", "kind": MARKUP, "description": MARKUP,
                                   "payload": {"x": "</pre>" + MARKUP}, "payload_sha256": "a" * 64,
                                   "allows": MARKUP, "grants": MARKUP, "host": "b"},
    }  # fmt: skip
    web = login(swarm)
    core_c = swarm.cores["c"]
    assert core_c.proc is not None
    try:
        put(swarm, rows)

        def page_of(path: str) -> str | None:
            r = web.get(path)
            return r.text if r.status_code == 200 else None

        evil = wait_for(lambda: page_of("/swarm/c/agent/evil/"), timeout=10)
        hostile_fields(swarm, evil)
        status = re.search(r'<span id="remote-status-text" class="status-text">([^<]*)</span>', evil)
        assert status, evil
        shown = html.unescape(status.group(1))
        assert shown.startswith(MARKUP) and len(shown) == SHORT_TEXT_CHARS, len(shown)
        assert 'data-host="c" data-name="evil" data-state="running"' in evil
        assert 'hx-post="/api/agents/evil/stop"' in evil and "paused: no" in evil
        other = wait_for(lambda: page_of("/swarm/c/agent/bob/"), timeout=10)
        hostile_fields(swarm, other.replace("/api/agents/bob/", "/api/agents/BOB-ON-C/"))
        assert set(re.findall(r'name="host" value="([^"]*)"', other)) == {"c"}
        theirs = web.get("/swarm/b/agent/bob/").text  # b's own bob, b's row
        assert 'data-host="b" data-name="bob"' in theirs and "window.__pwned" not in theirs
        dashboard = web.get("/", params={"q": "evil"}).text
        hostile_fields(swarm, part(dashboard, 'id="agent-evil@c"', "</tr>"))
        assert '<a href="/swarm/c/agent/evil/">evil</a>' in dashboard
        assert "<script>window.__pwned" not in dashboard

        core_c.proc.send_signal(signal.SIGSTOP)
        try:
            put(swarm, items)
            evil = wait_for(lambda: (p := page_of("/swarm/c/agent/evil/")) and f'id="approval-c-{AID}"' in p
                            and f'id="question-c-{QID}"' in p and p, timeout=10)  # fmt: skip
            hostile_fields(swarm, evil)
            assert f'hx-post="/answer-question/{QID}"' in evil and f'hx-post="/approve/{AID}"' in evil
            assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in evil
            dashboard = web.get("/").text
            assert "<script>window.__pwned" not in dashboard and "<img src=x" not in dashboard
            for item in (f'id="question-c-{QID}"', f'id="approval-c-{AID}"'):
                hostile_fields(swarm, part(dashboard, item, "</li>"))
            # The host an action goes to is the operator's form's (the key's), never the
            # row's "host": told to carry a message to evil on b, b (no evil) refuses it.
            m = META_CSRF.search(web.get("/").text)
            assert m
            r = web.post("/api/agents/evil/send", data={"body": "x", "host": "b"},
                         headers={"Origin": "http://core", "X-CSRF-Token": m.group(1),
                                  "Accept": "application/json"})  # fmt: skip
            assert r.status_code == 404 and "host b: no agent named 'evil'" in r.json()["error"], r.text
        finally:
            put(swarm, items, delete=True)
            core_c.proc.send_signal(signal.SIGCONT)
    finally:
        put(swarm, rows, delete=True)
        web.close()
    wait_for(lambda: web_gone(swarm), timeout=15)


def web_gone(swarm: Swarm) -> bool:
    """c's hostile rows are gone from a's roster, and c is reachable again."""
    st = swarm.status("a")
    names = {(r["host"], r["name"]) for r in st["agents"]}
    up = any(h["host"] == "c" and h["reachable"] for h in st["hosts"])
    return up and not names & {("c", "evil"), ("c", "bob")}


def test_c_s_row_runs_no_script_in_a_s_browser(hive_swarm: Swarm[HiveProcess], browser: Browser) -> None:
    """Whole hives, a's nginx, Debian's chromium: c's row ``agents.c.evil`` with markup in
    its status shows as text in a's agents table and on evil's page on a, drawn first and
    again by the page's live stream; no script of it runs (the page is instrumented as
    tests/test_browser.py's are), and every button on the page carries to host c."""
    rows = {s.row_key("c", "evil"): {"name": "bob", "host": "b", "running": True, "status_text": MARKUP}}
    a = hive_swarm.cores["a"]
    web = Web(a)
    ctx = browser.new_context()
    ctx.add_init_script(INSTRUMENT)
    dialogs: list[str] = []
    try:
        put(hive_swarm, rows)
        page = ctx.new_page()
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(web.login_url)
        expect(page.locator("#conn")).to_have_text("live", timeout=30_000)
        row = page.locator('#agents tr[data-name="evil"][data-host="c"]')
        expect(row.locator(".status-text")).to_have_text(MARKUP, timeout=15_000)
        row.locator('a[href="/swarm/c/agent/evil/"]').click()
        page.wait_for_url("**/swarm/c/agent/evil/")
        expect(page.locator("#conn")).to_have_text("live", timeout=30_000)  # redrawn once by now
        expect(page.locator("#remote-status-text")).to_have_text(MARKUP)
        hosts = page.locator('input[name="host"]')
        assert hosts.count() >= 2 and {hosts.nth(i).input_value() for i in range(hosts.count())} == {"c"}
        actions = page.locator("#remote-actions button")
        assert actions.count() >= 2
        for i in range(actions.count()):
            assert (actions.nth(i).get_attribute("hx-post") or "").startswith("/api/agents/evil/")
            assert (actions.nth(i).text_content() or "").endswith(" on host c")
        assert page.evaluate("window.__hits") == [] and page.evaluate("window.__csp") == []
        assert dialogs == [] and page.locator("img[src='x'], a[href^='//evil']").count() == 0
    finally:
        ctx.close()
        put(hive_swarm, rows, delete=True)
    wait_for(lambda: not [r for r in hive_swarm.status("a")["agents"] if r["host"] == "c"
                          and r["name"] == "evil"], timeout=15)  # fmt: skip

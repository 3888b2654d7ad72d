"""Red team, round 4: agent pages' page tokens, paced agent input, schema migration 6's
stored summaries and spawn limits, attacked from inside real cages (and, where said, as the
cage's compromised harness, which serves its page on web.sock).

Since issue 15 the harness's page lives at ``/agent/NAME/page/``, sandboxed (an opaque
origin), with no token at all, and the operator's view of an agent is the core's. A
sandboxed page's own script is refused by the gateway (it goes without the cookie), so the
page tests here play the worst case: the browser is handed the harness's script as if the
gateway had served it (``script_route``), and the script's attacks must still fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Route

from hive_fixture import HiveProcess, running_hive
from web_fixture import Web, browser  # noqa: F401 (fixture)

from .conftest import RT_AGENTS, cage_run
from .test_red_round3 import PAGE_AGENT, ScriptPage

REF = "red team round 4"


@pytest.fixture(scope="module")
def rt() -> Iterator[HiveProcess]:
    """The red team's agents in a hive of this module's own: its floods (gigabytes to the
    operator's inbox, a thousand statuses) must not slow the other modules' listings."""
    yield from running_hive(HiveProcess(RT_AGENTS))

PAGE_URL = f"/agent/{PAGE_AGENT}/page/"  # the harness's page, sandboxed
SCRIPT_URL = f"/agent/{PAGE_AGENT}/page/x.js"
PAGE = (
    '<!doctype html><html><head><meta charset="utf-8"><title>agent</title>'
    '<meta name="given" content="{csrf}">'
    f'<script src="{SCRIPT_URL}"></script></head><body>hello</body></html>'
)


def script_route(ctx: BrowserContext, web: Web, script: str) -> None:
    """Hand the browser SCRIPT for the page's x.js, as if the gateway had let the sandboxed
    page load a script of its harness's (it refuses: no cookie goes from an opaque origin)."""

    def fulfil(route: Route) -> None:
        route.fulfill(status=200, content_type="text/javascript; charset=utf-8", body=script)

    ctx.route(web.url(SCRIPT_URL), fulfil)
# Reads a same-origin page the operator's session may read, takes the token in its
# <meta name="csrf-token">, and posts TARGET with it (what a compromised harness's page
# script can do: the gateway's CSP allows same-origin script, and reads are open).
STEAL = """
fetch(%(source)r, {credentials: 'same-origin'}).then(function (r) { return r.text(); })
.then(function (html) {
  var m = html.match(/name="csrf-token" content="([^"]+)"/);
  document.title = 'token ' + (m ? m[1].slice(0, 5) : 'none');
  return fetch(%(target)r, {method: 'POST', credentials: 'same-origin',
    headers: {'X-CSRF-Token': m ? m[1] : '', 'Accept': 'application/json'},
    body: new URLSearchParams(%(form)s)});
}).then(function (r) { document.title = 'posted ' + r.status; },
        function (e) { document.title = 'posted error ' + e; });
"""


def run_page_script(rt: HiveProcess, browser: Browser, script: str) -> str:
    """Open PAGE_AGENT's page, as its compromised harness serves it, in a logged-in
    browser; return the document title the script left."""
    web = Web(rt)
    responses = {
        "/": ("text/html; charset=utf-8", PAGE),
        "/x.js": ("text/javascript; charset=utf-8", script),
    }
    ctx = browser.new_context()
    ctx.set_default_timeout(30_000)
    try:
        with ScriptPage(rt.run_dir / "ui" / PAGE_AGENT / "web.sock", responses):
            script_route(ctx, web, script)
            tab = ctx.new_page()
            tab.goto(web.login_url)
            tab.goto(web.url(PAGE_URL))
            # the page the browser opens gets no token at all any more (it had its own
            # page token, for its answer forms, until issue 15)
            given = tab.get_attribute('meta[name="given"]', "content")
            assert given == "", given
            deadline = time.monotonic() + 15
            title = tab.title()
            while not title.startswith("posted") and time.monotonic() < deadline:
                tab.wait_for_timeout(200)
                title = tab.title()
            return title
    finally:
        ctx.close()


@pytest.mark.attack("surface.script-injection", ref=REF)
def test_page_script_cannot_take_the_session_token_from_the_dashboard(
    rt: HiveProcess, browser: Browser
) -> None:
    """rtcarol's compromised harness serves a page whose script fetches ``/`` (same origin,
    the operator's cookie goes along), takes the session's CSRF token from the dashboard's
    meta tag and posts ``/approve/N`` with it. Must hold: the approval stays pending (the
    page token was meant to leave a page nothing but answering its agent's questions)."""
    res = cage_run(rt, PAGE_AGENT, """
result(reply=call({"cmd": "request_approval", "kind": "custom", "description": "rt-round4-page",
                   "payload": {"want": "approved through the dashboard's token"}}))
""")
    aid = res["reply"]["id"]
    try:
        title = run_page_script(rt, browser, STEAL % {
            "source": "/", "target": f"/approve/{aid}", "form": "{}"})
        assert title.startswith("posted"), title  # the script ran and posted
        shown = rt.host_call("show_approval", id=aid)["approval"]
        assert shown["status"] == "pending", (title, shown)
    finally:
        with contextlib.suppress(Exception):
            rt.host_call("deny", id=aid)


@pytest.mark.attack("surface.script-injection", ref=REF)
def test_page_script_cannot_answer_another_agents_question(
    rt: HiveProcess, browser: Browser
) -> None:
    """rtcarol's compromised harness's page script fetches rtbob's page (served by rtbob's own,
    honest harness), takes the page token the gateway gave it and answers rtbob's question to
    the operator with it. Must hold: rtbob's question stays unanswered."""
    asked = rt.agent_call("rtbob", "ask", to="operator", question="rt-round4: shall I?")
    assert asked.get("ok"), asked
    qid = asked["id"]
    try:
        title = run_page_script(rt, browser, STEAL % {
            "source": "/agent/rtbob/", "target": f"/answer-question/{qid}",
            "form": "{answer: 'yes, says rtcarol'}"})
        assert title.startswith("posted"), title  # the script ran and posted
        pending = [q["id"] for q in rt.host_call("questions")["questions"]]
        assert qid in pending, (title, pending)
    finally:
        with contextlib.suppress(Exception):
            rt.host_call("answer_question", id=qid, answer="no")


# Asks the core's /auth itself (through the gateway's "/" location), naming another
# agent's page in X-Original-URI, and posts TARGET with the token in its answer.
ASK_AUTH = """
fetch('/auth', {credentials: 'same-origin', headers: {'X-Original-URI': %(uri)r}})
.then(function (r) {
  var t = r.headers.get('X-CSRF-Token') || '';
  return fetch(%(target)r, {method: 'POST', credentials: 'same-origin',
    headers: {'X-CSRF-Token': t, 'Accept': 'application/json'},
    body: new URLSearchParams(%(form)s)});
}).then(function (r) { document.title = 'posted ' + r.status; },
        function (e) { document.title = 'posted error ' + e; });
"""


@pytest.mark.attack("surface.script-injection", ref=REF)
def test_page_script_cannot_get_a_page_token_from_auth(rt: HiveProcess, browser: Browser) -> None:
    """The gateway's auth subrequest is internal, but the core's ``/auth`` is reachable
    through ``/`` like every core route, and reads the page it is asked about from a
    request header. rtcarol's page script asks it for rtbob's page and answers rtbob's
    question with the token. Must hold: the question stays unanswered."""
    asked = rt.agent_call("rtbob", "ask", to="operator", question="rt-round4: via /auth?")
    assert asked.get("ok"), asked
    qid = asked["id"]
    try:
        title = run_page_script(rt, browser, ASK_AUTH % {
            "uri": "/agent/rtbob/", "target": f"/answer-question/{qid}",
            "form": "{answer: 'yes, says rtcarol'}"})
        assert title.startswith("posted"), title
        pending = [q["id"] for q in rt.host_call("questions")["questions"]]
        assert qid in pending, (title, pending)
    finally:
        with contextlib.suppress(Exception):
            rt.host_call("answer_question", id=qid, answer="no")


POPUP_PAGE = (
    '<!doctype html><html><head><meta charset="utf-8"><title>agent</title>'
    '<meta name="given" content="{csrf}">'
    f'<script src="{SCRIPT_URL}"></script></head>'
    '<body><button id="go">show details</button></body></html>'
)
# On the operator's click, opens the dashboard in a window of its own (same origin, so
# the opener reads it), takes the token from it and posts TARGET.
POPUP = """
document.addEventListener('DOMContentLoaded', function () {
  document.getElementById('go').addEventListener('click', function () {
    var w = window.open('/');
    var tries = 0;
    var t = setInterval(function () {
      tries += 1;
      var m = null;
      try { m = w.document.querySelector('meta[name="csrf-token"]'); } catch (e) {}
      if ((!m || !m.content) && tries < 100 && w) { return; }
      clearInterval(t);
      fetch(%(target)r, {method: 'POST', credentials: 'same-origin',
        headers: {'X-CSRF-Token': m ? m.content : '', 'Accept': 'application/json'},
        body: new URLSearchParams({})})
      .then(function (r) { document.title = 'posted ' + r.status; },
            function (e) { document.title = 'posted error ' + e; });
    }, 100);
  });
});
"""


@pytest.mark.attack("surface.script-injection", ref=REF)
def test_page_script_cannot_take_the_token_from_a_window_it_opens(
    rt: HiveProcess, browser: Browser
) -> None:
    """As above, but the script opens ``/`` in a new window when the operator clicks a
    button on the agent's page, and reads the dashboard's token from that window. Was the
    page-origin hole (a strict xfail until issue 15): the harness's page is now sandboxed,
    without allow-popups, so no window opens (and one would not be same-origin to it)."""
    res = cage_run(rt, PAGE_AGENT, """
result(reply=call({"cmd": "request_approval", "kind": "custom", "description": "rt-round4-popup",
                   "payload": {"want": "approved through a popup's token"}}))
""")
    aid = res["reply"]["id"]
    web = Web(rt)
    responses = {
        "/": ("text/html; charset=utf-8", POPUP_PAGE),
        "/x.js": ("text/javascript; charset=utf-8", POPUP % {"target": f"/approve/{aid}"}),
    }
    ctx = browser.new_context()
    ctx.set_default_timeout(30_000)
    try:
        with ScriptPage(rt.run_dir / "ui" / PAGE_AGENT / "web.sock", responses):
            script_route(ctx, web, POPUP % {"target": f"/approve/{aid}"})
            tab = ctx.new_page()
            tab.goto(web.login_url)
            tab.goto(web.url(PAGE_URL))
            tab.click("#go")
            deadline = time.monotonic() + 20
            while not tab.title().startswith("posted") and time.monotonic() < deadline:
                tab.wait_for_timeout(200)
            assert tab.title().startswith("posted"), tab.title()  # the script ran and posted
            assert len(ctx.pages) == 1, [p.url for p in ctx.pages]  # no window opened
        shown = rt.host_call("show_approval", id=aid)["approval"]
        assert shown["status"] == "pending", shown
    finally:
        ctx.close()
        with contextlib.suppress(Exception):
            rt.host_call("deny", id=aid)


# -- paced request bytes: lines the pacer never sees ------------------------------------------

FLOOD_LINES = """
import threading
MiB = 1 << 20
line = P["fill"].encode() * (MiB - 1) + b"\\n"
sent = [0] * P["conns"]
stop = time.monotonic() + P["seconds"]

def flood(i):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(AGENT_SOCK)
    s.settimeout(P.get("sock_timeout", 1))
    while time.monotonic() < stop:
        try:
            s.sendall(line)
        except (TimeoutError, OSError):
            break
        sent[i] += len(line)
    s.close()

threads = [threading.Thread(target=flood, args=(i,)) for i in range(P["conns"])]
for t in threads:
    t.start()
for t in threads:
    t.join()
result(sent=sum(sent))
"""


@pytest.mark.attack("budget.exhaustion", ref=REF)
def test_blank_lines_are_paced_like_requests(rt: HiveProcess) -> None:
    """The core paces an agent's request bytes ([limits] input_bytes_per_second, 8 MiB/s
    past a 64 MiB burst) so that one agent writing as fast as it can doesn't hold the
    core's one loop. A line of only whitespace was skipped before it was paced: rtmule
    writes 1 MiB lines of spaces on 8 connections for 6 s. Must hold: the core takes no more
    than the burst, the rate and what the connections' buffers hold."""
    seconds, conns = 6, 8
    res = cage_run(rt, "rtmule", FLOOD_LINES, fill=" ", seconds=seconds, conns=conns, timeout=60)
    limit = (64 << 20) + (8 << 20) * seconds + conns * (4 << 20)
    assert (64 << 20) <= res["sent"] <= limit, (res["sent"] >> 20, limit >> 20)


HARNESS_ASKS = """
import json, socket, sys, time
out = []
for _ in range(3):
    t = time.monotonic()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    s.sendall(b'{"cmd": "whoami"}\\n')
    reply = s.makefile("rb").readline()
    out.append(time.monotonic() - t)
    assert json.loads(reply).get("ok"), reply
    s.close()
print(json.dumps(out))
"""


@pytest.mark.attack("budget.exhaustion", ref=REF)
def test_runtime_flood_does_not_delay_its_harness(rt: HiveProcess) -> None:
    """One byte bucket paces all an agent's connections, its harness's too. rtmule's
    runtime keeps 31 connections each holding a paced 1 MiB line; its harness (played from
    the host with the harness's uid) asks ``whoami``. Must hold: the harness is answered
    at once (the docstring's bound for one request, its own size's worth, 0.125 s for a
    whole line), not after the runtime's ~4 s of debt (the harness relays the operator's
    messages and the agent's turns: the runtime could hold them up)."""
    harness_uid = rt.cage("rtmule")["harness_uid"]
    flood: dict[str, object] = {}

    def run_flood() -> None:
        flood.update(cage_run(rt, "rtmule", FLOOD_LINES, fill=" ", seconds=7, conns=31, sock_timeout=10,
                              timeout=90))

    t = threading.Thread(target=run_flood)
    t.start()
    try:
        time.sleep(5)  # the burst is spent, every flood connection waits paced
        out = subprocess.run(
            # cwd set before the uid changes: the harness reaches the socket by its own mount
            ["/usr/bin/python3", "-c", HARNESS_ASKS, "agent.sock"],
            cwd=rt.run_dir / "agents" / "rtmule", user=harness_uid, extra_groups=[],
            group=os.stat(rt.run_dir / "agents" / "rtmule" / "agent.sock").st_gid, capture_output=True, text=True, timeout=60, check=True,
        )
        waits = json.loads(out.stdout)
    finally:
        t.join(120)
    assert flood.get("sent", 0) > 0, flood
    assert max(waits) < 1.0, waits


# -- spawn requests can't carry cage limits -------------------------------------------------

SPAWN_LIMITS = """
out = {}
for key, spec in P["specs"].items():
    out[key] = call({"cmd": "request_approval", "kind": "spawn", "description": "rt-round4",
                     "payload": {"name": "rtr4child", "spec": spec}})
result(**out)
"""


@pytest.mark.attack("privsep.core-misuse", ref=REF)
def test_spawn_request_cannot_carry_cage_limits_in_any_spelling(rt: HiveProcess) -> None:
    """An agent's spawn spec may not set ``memory_mib``/``pids_max`` (the operator's, by
    set_resource_limits). Spellings: an explicit null, the smallest and largest values,
    both at once. Must hold: each refused, nothing pending."""
    base = {"runtime": "command", "command": ["true"]}
    specs = {
        "null": {**base, "memory_mib": None},
        "pids": {**base, "pids_max": 8192},
        "memory": {**base, "memory_mib": 16384},
        "both": {**base, "memory_mib": 32, "pids_max": 16},
    }
    res = cage_run(rt, "rtmule", SPAWN_LIMITS, specs=specs)
    for key, reply in res.items():
        assert reply.get("ok") is False, (key, reply)
        assert "unknown field 'spec." in reply["error"], (key, reply)
    pending = rt.host_call("pending")
    assert not [a for a in pending.get("approvals", []) if a.get("kind") == "spawn"], pending


# -- stored summaries (schema migration 6) --------------------------------------------------

ODD_APPROVAL = """
result(reply=call({"cmd": "request_approval", "kind": "custom", "description": P["description"],
                   "payload": P["payload"]}))
"""


@pytest.mark.attack("surface.unpaged-listing", ref=REF)
def test_stored_summaries_match_the_whole_row(rt: HiveProcess) -> None:
    """Listings read each long column's length and first 2048 bytes from stored generated
    columns. rtmule asks for an approval whose description has NULs and a 2-byte character
    across the cut, and whose payload has NULs (6-byte JSON escapes as stored), a 4-byte
    character across the cut and keys in reverse order. Must hold: the listing's text is a prefix of the whole (as
    show_approval gives it), its ``truncated`` lengths are the whole's in bytes."""
    description = "\x00" * 5 + "a" * 2042 + "é" * 600 + "\x00tail"
    payload = {"z": "\x00" * 301 + "\U0001f600" * 400 + "apply this", "a": [1, 2.5, None]}
    res = cage_run(rt, "rtmule", ODD_APPROVAL, description=description, payload=payload)
    aid = res["reply"]["id"]
    try:
        whole = rt.host_call("show_approval", id=aid)["approval"]
        assert whole["description"] == description and whole["payload"] == payload, whole
        row = next(a for a in rt.host_call("pending")["approvals"] if a["id"] == aid)
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert description.startswith(row["description"]), row["description"][-20:]
        assert row["truncated"]["description"] == len(description.encode()), row["truncated"]
        assert isinstance(row["payload"], str) and canonical.startswith(row["payload"]), row
        assert row["truncated"]["payload"] == len(canonical.encode()), row["truncated"]
    finally:
        with contextlib.suppress(Exception):
            rt.host_call("deny", id=aid)

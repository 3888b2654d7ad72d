"""The operator's HTTP surface, through the real gateway (nginx) in front of the
real core and the agents' harnesses in real cages (``hive up``).

- Every POST route is refused without a session (401), without the CSRF token
  or with another session's (403), and from a foreign or missing Origin (403):
  each refusal says why in one line, and the hive's state as host.sock shows it
  (egress rules included) is the same afterwards.
- Login: a bad token is refused (401); the session cookie is HttpOnly,
  SameSite=Strict, with a Max-Age; logout ends the session.
- Agent pages need a session (401); an unknown agent is 404.
- Every response, whoever produced it (core, harness, nginx itself), carries
  the CSP header.
- A cage can't reach the gateway at all.
- A valid answer to a question (POST /answer-question/{id}) reaches the agent's
  runtime.
"""

from __future__ import annotations

import json
import re
import socket
import textwrap
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from hyperhive.core.sessions import COOKIE
from hyperhive.gateway.config import PAGE_CSP
from web_fixture import (  # noqa: F401 (browser: a fixture)
    Login,
    Web,
    artifact,
    assert_csp,
    assert_one_line_reason,
    browser,
    snapshot,
    transcript,
    unchanged,
    wait_for,
    web_hive,
)

ECHO = "web-echo"  # prints every message it gets: what its runtime received is in its transcript
IDLE = "web-idle"
NEW = "web-new"  # what the refused spawn would have created
AGENTS: dict[str, dict[str, Any]] = {
    ECHO: {"runtime": "command",
           "command": ["python3", "-c", "import sys; print('runtime got: ' + sys.stdin.read(), flush=True)"],
           "egress": ["kept.test:443"]},  # what the refused egress-remove would remove
    IDLE: {"runtime": "command", "command": ["true"], "peers": [ECHO]},
}
ACTIONS = ["start", "stop", "restart", "pause", "resume", "interrupt", "destroy"]
FOREIGN = "http://attacker.invalid"  # only ever a header value: nothing connects to it


@pytest.fixture(scope="module")
def web() -> Iterator[Web]:
    with web_hive(AGENTS, extra_names=(NEW,)) as w:
        yield w


@pytest.fixture(scope="module")
def login(web: Web) -> Login:
    return web.login()


@pytest.fixture(scope="module")
def targets(web: Web) -> dict[str, int]:
    """An open question to the operator and a pending approval: what the refused POSTs
    would answer, approve or deny if they went through."""
    q = web.hive.agent_call(ECHO, "ask", to="operator", question="refused tests: never answered?")
    a = web.hive.agent_call(ECHO, "request_approval", kind="custom", description="refused tests: never decided",
                            payload={"x": 1})
    assert q.get("ok") and a.get("ok"), (q, a)
    return {"question": q["id"], "approval": a["id"]}


def post_routes(t: dict[str, int]) -> dict[str, tuple[str, dict[str, str] | None]]:
    """Every POST route, each with a body that would succeed with a session, token and origin."""
    routes: dict[str, tuple[str, dict[str, str] | None]] = {
        "answer-question": (f"/answer-question/{t['question']}", {"answer": "yes"}),
        "approve": (f"/approve/{t['approval']}", None),
        "deny": (f"/deny/{t['approval']}", {"note": "no"}),
        "send": (f"/api/agents/{IDLE}/send", {"body": "hello"}),
        "spawn": ("/api/spawn", {"name": NEW, "spec": json.dumps({"runtime": "command", "command": ["true"]})}),
        "egress-allow": (f"/api/agents/{IDLE}/egress/allow", {"rule": "refused.test:443"}),
        "egress-remove": (f"/api/agents/{ECHO}/egress/remove", {"rule": "kept.test:443"}),
        "logout": ("/logout", None),
    }
    for action in ACTIONS:
        routes[action] = (f"/api/agents/{IDLE}/{action}", None)
    return routes


ROUTES = ["answer-question", "approve", "deny", "send", "spawn", "egress-allow", "egress-remove", "logout", *ACTIONS]
# refusal -> (status, what the reason must mention)
REFUSALS = {
    "no-session": (401, "not logged in"),
    "bogus-session": (401, "not logged in"),
    "no-csrf": (403, "csrf"),
    "wrong-csrf": (403, "csrf"),
    "other-sessions-csrf": (403, "csrf"),
    "csrf-field-wrong": (403, "csrf"),
    "foreign-origin": (403, "origin"),
    "no-origin": (403, "origin"),
    "null-origin": (403, "origin"),
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
@pytest.mark.parametrize("route", ROUTES)
def test_post_refused(web: Web, login: Login, targets: dict[str, int], route: str, refusal: str) -> None:
    path, data = post_routes(targets)[route]
    status, mention = REFUSALS[refusal]
    cookie: Login | None = login
    csrf: str | None = login.csrf
    origin: str | None = web.origin
    form = dict(data or {})
    if refusal == "no-session":
        cookie = None  # the token is right, but no cookie
    elif refusal == "bogus-session":
        cookie = Login("x" * 43, "")
    elif refusal == "no-csrf":
        csrf = None
    elif refusal == "wrong-csrf":
        csrf = "x" * len(login.csrf)
    elif refusal == "other-sessions-csrf":
        csrf = web.login().csrf
    elif refusal == "csrf-field-wrong":  # a plain form post with the token as a field
        csrf = None
        form["csrf_token"] = login.csrf[:-1] + ("A" if login.csrf[-1] != "A" else "B")
    elif refusal == "foreign-origin":
        origin = FOREIGN
    elif refusal == "no-origin":
        origin = None
    elif refusal == "null-origin":
        origin = "null"

    rules = web.hive.host_call("egress_rules")["rules"]  # not in unchanged()'s view
    assert [r["rule"] for r in rules[ECHO]] == ["kept.test:443"] and IDLE not in rules, rules
    with unchanged(web.hive):
        r = web.request("POST", path, login=cookie, csrf=csrf, origin=origin, data=form or None)
        assert r.status_code == status, (r.status_code, r.text)
        why = assert_one_line_reason(r)
        assert mention in why.lower(), why
        assert_csp(r)
        assert "set-cookie" not in r.headers
    assert web.hive.host_call("egress_rules")["rules"] == rules
    # The session that was refused is still good (a refused logout logged nobody out).
    assert web.get("/api/state", login=login).status_code == 200


def test_post_with_everything_right_works(web: Web, login: Login) -> None:
    """The control for the refusals above: the same kind of request, complete, goes through,
    with the token as a header (scripts, the dashboard) or as a form field (plain forms)."""
    before = snapshot(web.hive)
    r = web.post(f"/api/agents/{IDLE}/send", login, data={"body": "from a script"})
    assert r.status_code == 200, r.text
    assert r.json()["ok"] is True
    r = web.request("POST", f"/api/agents/{IDLE}/send", login=login, origin=web.origin,
                    headers={"Referer": web.url("/")}, data={"body": "from a form", "csrf_token": login.csrf})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/"
    sent = [m["body"] for m in web.get("/api/state", login=login).json()["messages"] if m["to"] == IDLE]
    assert sent[-2:] == ["from a script", "from a form"], sent
    assert snapshot(web.hive)["db"]["messages"] != before["db"]["messages"]


def test_login_bad_token(web: Web) -> None:
    good = web.token
    for query in ["", "?token=", f"?token={'x' * len(good)}", f"?token={good[:-1]}", f"?token={good}x",
                  f"?token={good.upper() if good.upper() != good else good.lower()}"]:
        r = web.get(f"/login{query}")
        assert r.status_code == 401, (query, r.status_code)
        assert "set-cookie" not in r.headers, query
        assert "token" in assert_one_line_reason(r), query
        assert_csp(r)


def parse_set_cookie(header: str) -> tuple[str, str, dict[str, str]]:
    first, *attrs = [p.strip() for p in header.split(";")]
    name, _, value = first.partition("=")
    out = {}
    for a in attrs:
        k, _, v = a.partition("=")
        out[k.strip().lower()] = v.strip()
    return name, value, out


def test_login_cookie(web: Web) -> None:
    r = httpx.get(web.login_url, timeout=30, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/", (r.status_code, r.headers)
    cookies = r.headers.get_list("set-cookie")
    assert len(cookies) == 1, cookies
    name, value, attrs = parse_set_cookie(cookies[0])
    assert name == COOKIE and len(value) >= 32, cookies
    assert "httponly" in attrs, cookies
    assert attrs.get("samesite", "").lower() == "strict", cookies
    assert 0 < int(attrs["max-age"]) <= 24 * 3600, cookies
    assert attrs.get("path") == "/", cookies
    assert_csp(r)
    # Each login is its own session.
    assert web.login().cookie != web.login().cookie


def test_logout_ends_session(web: Web, login: Login) -> None:
    mine = web.login()
    assert web.get("/api/state", login=mine).status_code == 200
    assert web.get(f"/agent/{ECHO}/", login=mine).status_code == 200

    r = web.request("POST", "/logout", login=mine, csrf=mine.csrf, origin=web.origin)
    assert r.status_code == 303, r.text
    name, value, attrs = parse_set_cookie(r.headers["set-cookie"])
    assert name == COOKIE and (value in ("", '""') or attrs.get("max-age") == "0"), r.headers["set-cookie"]

    for path in ["/", "/api/state", f"/agent/{ECHO}/", f"/agent/{ECHO}/state"]:
        r = web.get(path, login=mine)
        assert r.status_code == 401, (path, r.status_code)
        assert_one_line_reason(r)
    with unchanged(web.hive):
        r = web.request("POST", f"/api/agents/{IDLE}/pause", login=mine, csrf=mine.csrf, origin=web.origin)
        assert r.status_code == 401, r.text
    # Logging one session out leaves the others alone.
    assert web.get("/api/state", login=login).status_code == 200


@pytest.mark.parametrize("path", [f"/agent/{ECHO}/", f"/agent/{ECHO}/state", f"/agent/{ECHO}/events",
                                  f"/agent/{ECHO}/page/", f"/agent/{ECHO}/page/x.js",
                                  f"/agent/{ECHO}/static/agent.js", "/agent/nosuch/", "/", "/api/state",
                                  "/api/dashboard/stream", f"/api/agents/{ECHO}/transcript",
                                  "/api/openapi.json", f"/swarm/b/agent/{ECHO}/",
                                  f"/swarm/b/agent/{ECHO}/events"])
def test_pages_need_a_session(web: Web, path: str) -> None:
    for cookie in [None, Login("x" * 43, "")]:
        r = web.get(path, login=cookie)
        assert r.status_code == 401, (path, r.status_code, r.text)
        assert "not logged in" in assert_one_line_reason(r)
        assert_csp(r)


def test_agent_page_with_session(web: Web, login: Login) -> None:
    r = web.get(f"/agent/{ECHO}/", login=login)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    # The core renders the operator's view of an agent (no harness code runs in this
    # origin), so it carries the session's token for its forms, like the dashboard.
    assert f'<meta name="csrf-token" content="{login.csrf}">' in r.text
    assert_csp(r)
    # The harness's own page: sandboxed (an opaque origin), and with no token at all.
    r = web.get(f"/agent/{ECHO}/page/", login=login)
    assert r.status_code == 200, r.text
    assert r.headers.get_list("content-security-policy") == [PAGE_CSP], r.headers
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "csrf" not in r.text.lower() and login.csrf not in r.text
    for path in ["/agent/nosuch/", "/agent/nosuch/state", "/agent/Not_A_Name/", "/agent/operator/"]:
        r = web.get(path, login=login)
        assert r.status_code == 404, (path, r.status_code)
        assert "no such agent" in assert_one_line_reason(r)
        assert r.headers["content-type"].startswith("text/plain"), r.headers
        assert_csp(r)
    # Without [swarm]: no other host's agent page, and the send box has no host field.
    for path in [f"/swarm/b/agent/{ECHO}/", f"/swarm/b/agent/{ECHO}/events"]:
        r = web.get(path, login=login)
        assert r.status_code == 404 and "this hive is not in a swarm" in assert_one_line_reason(r), r.text
    page = web.get("/", login=login).text
    form = page[page.index('id="send-form"'):]
    assert 'name="to"' in form[: form.index("</form>")] and 'name="host"' not in form[: form.index("</form>")]
    assert "swarm-hosts" not in page


def test_csp_on_every_response(web: Web, login: Login, targets: dict[str, int]) -> None:
    responses: list[httpx.Response] = []
    for cookie in [None, login]:
        for path in ["/", "/login", f"/login?token={web.token}", "/api/state", "/api/openapi.json",
                     "/static/dashboard.js", "/static/dashboard.css", "/static/nope.js", "/nope",
                     f"/api/agents/{ECHO}/transcript", "/api/agents/nosuch/transcript",
                     f"/agent/{ECHO}/", f"/agent/{ECHO}/state", f"/agent/{ECHO}/static/agent.js",
                     f"/agent/{ECHO}/static/agent.css", f"/agent/{ECHO}/nope", "/agent/nosuch/", "/agent/X/"]:
            responses.append(web.get(path, login=cookie))
    with unchanged(web.hive):
        responses.append(web.request("POST", f"/approve/{targets['approval']}"))
        responses.append(web.request("POST", f"/approve/{targets['approval']}", login=login, origin=FOREIGN,
                                     csrf=login.csrf))
        responses.append(web.request("PUT", "/api/state", login=login))
        responses.append(web.post("/approve/999999", login))
        responses.append(web.request("POST", f"/agent/{ECHO}/", login=login, content=b"x" * (2 << 20)))
    # The two live streams: headers only.
    for path in ["/api/dashboard/stream", f"/agent/{ECHO}/events"]:
        with httpx.stream("GET", web.url(path), headers=login.cookies, timeout=30) as r:
            assert r.status_code == 200, path
            assert r.headers["content-type"].startswith("text/event-stream"), (path, r.headers)
            responses.append(r)
    statuses = sorted({r.status_code for r in responses})
    assert {200, 303, 401, 403, 404, 405, 413} <= set(statuses), statuses
    for r in responses:
        assert_csp(r)
        assert r.headers.get("x-content-type-options") == "nosniff", (r.request.url, r.headers)
    # And the policy is one that allows no inline script, no eval, nothing from elsewhere.
    csp = responses[0].headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert "unsafe" not in csp
    assert directives["frame-ancestors"] == "'none'"


def test_cage_cannot_reach_gateway(web: Web) -> None:
    port = web.hive.port
    # The gateway is up and serving on the host...
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    # ...and from inside the cage there is no way to it.
    script = textwrap.dedent(f"""\
        import json, os, socket, sys
        if os.getuid() == 0 or socket.gethostname() != {ECHO!r}:
            print("NOT IN A CAGE"); sys.exit(97)
        out = {{"interfaces": [n for _, n in socket.if_nameindex()]}}
        for host in ["127.0.0.1", "localhost", "::1", "0.0.0.0"]:
            try:
                socket.create_connection((host, {port}), timeout=3).close()
                out[host] = "connected"
            except OSError as e:
                out[host] = type(e).__name__ + ": " + str(e)
        print("RESULT " + json.dumps(out))
    """)
    proc = web.hive.exec(ECHO, "python3", "-c", script, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0][len("RESULT "):])
    assert result.pop("interfaces") == ["lo"], result
    for host, outcome in result.items():
        assert outcome != "connected", f"the cage reached the gateway at {host}:{port}"
        assert re.match(r"(ConnectionRefusedError|OSError|TimeoutError|socket\.gaierror|gaierror)", outcome), outcome


def test_answer_reaches_the_agent(web: Web, login: Login) -> None:
    asked = web.hive.agent_call(ECHO, "ask", to="operator", question="Ship it?", options=["yes", "no"])
    assert asked.get("ok"), asked
    qid = asked["id"]
    answer = "yes — ship it <b>now</b>"
    # The agent page's free-text form asks the core to check the options, and says when
    # an answer outside them is meant (as the dashboard's does).
    page = web.get(f"/agent/{ECHO}/", login=login).text
    form = page[page.index(f'id="question-{qid}"'):]
    form = form[: form.index("</li>")]
    assert 'name="check_options" value="1"' in form and 'name="other" value="1"' in form

    # As the agent page's inline form sends it: a plain form post, the token as a field.
    r = web.request("POST", f"/answer-question/{qid}", login=login, origin=web.origin,
                    headers={"Referer": web.url(f"/agent/{ECHO}/")},
                    data={"csrf_token": login.csrf, "answer": answer})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == f"/agent/{ECHO}/"  # back to the page the form was on
    assert qid not in [q["id"] for q in web.hive.host_call("questions")["questions"]]

    def delivered() -> dict[str, Any] | None:
        for e in transcript(web.hive, ECHO):
            d = e["data"]
            if e["kind"] == "input" and isinstance(d, dict) and d.get("kind") == "answer" and d.get("ref") == qid:
                return e
        return None

    entry = wait_for(delivered, f"the answer to question {qid} to reach {ECHO}")
    assert entry["data"]["from"] == "operator"
    assert entry["data"]["body"] == answer

    def runtime_saw_it() -> bool:
        return any(e["kind"] == "stdout" and e["turn"] == entry["turn"] and "runtime got:" in str(e["data"])
                   and json.dumps(answer, ensure_ascii=False)[1:-1] in str(e["data"])
                   for e in transcript(web.hive, ECHO))

    wait_for(runtime_saw_it, f"{ECHO}'s runtime to print the answer")

    # Answering again is refused, and changes nothing.
    with unchanged(web.hive):
        r = web.post(f"/answer-question/{qid}", login, data={"answer": "no"})
        assert r.status_code in (404, 409), r.text
        assert_one_line_reason(r)


def test_no_page_tokens_any_more(web: Web, login: Login) -> None:
    """Agent pages used to hold a token derived from the session's (a compromised harness
    saw it). The operator's view of an agent is now the core's, and the harness's page is
    sandboxed and gets nothing: the gateway's auth subrequest hands out no token, a
    page-token-shaped value is just a wrong token, and the core's page answers with the
    session's own, back to the page the form was on."""
    r = web.get("/auth", login=login)
    assert r.status_code == 204 and "x-csrf-token" not in r.headers, r.headers
    mine = web.hive.agent_call(ECHO, "ask", to="operator", question="mine?")["id"]
    with unchanged(web.hive):
        r = web.request("POST", f"/answer-question/{mine}", login=login, origin=web.origin,
                        data={"csrf_token": f"page.{ECHO}." + "0" * 32, "answer": "x"})
    assert r.status_code == 403 and "missing or wrong CSRF token" in r.text, r.text
    r = web.request("POST", f"/answer-question/{mine}", login=login, origin=web.origin,
                    headers={"Referer": web.url(f"/agent/{ECHO}/")},
                    data={"csrf_token": login.csrf, "answer": "yes"})
    assert r.status_code == 303 and r.headers["location"] == f"/agent/{ECHO}/", r.text
    assert mine not in [q["id"] for q in web.hive.host_call("questions")["questions"]]


def test_sessions_outlive_a_core_restart(web: Web) -> None:
    """It kills hive-core (hive up starts it again) and waits for the agents to settle."""
    import hashlib
    import os
    import signal
    import sqlite3

    from hyperhive.client import HiveUnavailable

    kept, ended = web.login(), web.login()
    r = web.request("POST", "/logout", login=ended, csrf=ended.csrf, origin=web.origin)
    assert r.status_code == 303, r.text
    db = sqlite3.connect(f"file:{web.hive.state_dir / 'hive.db'}?mode=ro", uri=True, timeout=30)
    try:
        stored = {row[0] for row in db.execute("SELECT id_sha256 FROM sessions")}
    finally:
        db.close()
    assert hashlib.sha256(kept.cookie.encode()).hexdigest() in stored  # a hash, never the id itself
    assert hashlib.sha256(ended.cookie.encode()).hexdigest() not in stored
    assert kept.cookie not in stored

    running = {name: row["running"] for name, row in web.hive.agent_status().items()}
    pid = web.hive.core_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    def core_back() -> bool:
        try:
            return web.hive.core_pid() not in (None, pid) and web.hive.host_call("list")["ok"]
        except HiveUnavailable:
            return False

    wait_for(core_back, "hive-core to come back")
    wait_for(lambda: web.get("/api/state", login=kept).status_code == 200, "the kept session to work again")
    assert web.get("/api/state", login=ended).status_code == 401
    # the CSRF token is the session's, as before
    assert web.request("POST", "/logout", login=kept, csrf="x" * 43, origin=web.origin).status_code == 403
    assert web.request("POST", "/logout", login=kept, csrf=kept.csrf, origin=web.origin).status_code == 303
    assert web.get("/api/state", login=kept).status_code == 401
    # The tests after this one find the agents as they were (the new core restarts cages).
    wait_for(lambda: {n: r["running"] for n, r in web.hive.agent_status().items()} == running,
             "the agents to be back as they were")


# -- the agent page, live (issue 15 item 3) ---------------------------------------------


def test_agent_page_goes_live_and_keeps_what_is_typed(web: Web, login: Login, browser: Browser) -> None:
    """The operator's view of ECHO (the core's page): a question and an approval appear
    without a reload; an answer half typed into the first survives a burst of transcript
    entries and another question arriving (focus and text kept); answering, denying with
    a note and approving happen in place, each item going as it is resolved."""
    ctx = browser.new_context(viewport={"width": 1100, "height": 900})
    ctx.set_default_timeout(30_000)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(web.login_url)
        with page.expect_response(lambda r: urlsplit(r.url).path == f"/agent/{ECHO}/events"):
            page.goto(web.url(f"/agent/{ECHO}/"))
        expect(page.locator("#live")).to_have_text("live")
        page.evaluate("window.__sameDocument = true")

        call = web.hive.agent_call
        qid = call(ECHO, "ask", to="operator", question="live: which colour?", options=["red", "blue"])["id"]
        question = page.locator(f"#question-{qid}")
        expect(question.locator(".q-text")).to_have_text("live: which colour?")
        aid = call(ECHO, "request_approval", kind="custom", description="live: rotate", payload={"n": 1})["id"]
        approval = page.locator(f"#approval-{aid}")
        expect(approval.locator(".description")).to_have_text("live: rotate")
        expect(approval.locator(".sha")).to_contain_text("sha256 ")
        shot(page, "1-appeared")

        box = question.locator('input[name="answer"]')
        box.click()
        box.press_sequentially("green, half typ")
        before = page.locator("#transcript li").count()
        for i in range(8):  # a burst of turns: each writes its input, its output and its exit
            assert web.hive.host_call("send", to=ECHO, body=f"live burst {i}")["ok"]
        qid2 = call(ECHO, "ask", to="operator", question="live: and the second?")["id"]
        expect(page.locator(f"#question-{qid2}")).to_be_visible()  # the list was redrawn around it
        expect(page.locator("#transcript li.entry.exit").filter(has_text="exit_status 0")).not_to_have_count(0)
        wait_for(lambda: page.locator("#transcript li").count() >= before + 24, "the burst's entries")
        assert box.input_value() == "green, half typ"
        assert page.evaluate("sel => document.activeElement === document.querySelector(sel)",
                             f'#question-{qid} input[name="answer"]')
        box.press_sequentially("ed")  # where the caret was
        burst = page.locator("#transcript li.entry.input").filter(has_text="live burst 3")
        expect(burst.locator(".who")).to_contain_text("from operator")
        expect(burst.locator("time")).to_have_attribute("datetime", re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"))
        burst.locator("details.raw summary").click()  # the raw JSON, on demand
        expect(burst.locator("details.raw pre")).to_contain_text('"body": "live burst 3"')
        shot(page, "2-typing-through-a-burst")

        # Not one of the offered options: refused (the page says why, the text stays) ...
        with page.expect_response(lambda r: urlsplit(r.url).path == f"/answer-question/{qid}") as refused:
            question.get_by_role("button", name="Answer").click()
        assert refused.value.status == 422 and "is not one of question" in refused.value.text()
        expect(page.locator("#notice")).to_contain_text(f"refused: question {qid}: ")
        expect(page.locator("#notice")).to_have_class(re.compile(r"\bbad\b"))
        assert box.input_value() == "green, half typed"
        # ... until the operator says it is meant.
        question.locator('input[name="other"]').check()
        with page.expect_response(lambda r: urlsplit(r.url).path == f"/answer-question/{qid}") as answered:
            question.get_by_role("button", name="Answer").click()
        assert answered.value.status == 200, answered.value.text()
        expect(question).to_have_count(0)
        assert web.hive.host_call("show_question", id=qid)["question"]["answer"] == "green, half typed"

        approval.locator('input[name="note"]').fill("not this week")
        approval.get_by_role("button", name="Deny").click()
        expect(approval).to_have_count(0)
        denied = web.hive.host_call("show_approval", id=aid)["approval"]
        assert (denied["status"], denied.get("note")) == ("denied", "not this week"), denied
        aid2 = call(ECHO, "request_approval", kind="custom", description="live: second", payload={"n": 2})["id"]
        page.locator(f"#approval-{aid2}").get_by_role("button", name="Approve").click()
        expect(page.locator(f"#approval-{aid2}")).to_have_count(0)
        assert web.hive.host_call("show_approval", id=aid2)["approval"]["status"] == "approved"
        expect(page.locator("#notice")).to_have_text(f"approved approval {aid2}")
        shot(page, "3-resolved-in-place")
        assert page.evaluate("window.__sameDocument") is True  # never reloaded
        assert errors == [], errors
        web.hive.host_call("answer_question", id=qid2, answer="done")
    finally:
        ctx.close()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(artifact(f"agent-page-{name}.png")), full_page=True)


def test_agent_page_stream_framing_and_readable_entries() -> None:
    """The agent page's stream sends HTML a line per ``data:`` field: agent text with
    newlines, ``event:``/``id:`` lines, a blank line or a CR forges no event. A
    transcript entry reads as who and what, a tool call folded."""
    from hyperhive.core.http import readable
    from hyperhive.core.sse import sse

    hostile = 'x\nevent: transcript\nid: 999\n\ndata: <li id="q-1">\r\nretry: 1'
    raw = sse("state", hostile).decode()
    assert raw.endswith("\n\n") and raw.count("\n\n") == 1, raw  # one event
    lines = raw.rstrip("\n").split("\n")
    assert lines[0] == "event: state" and all(line.startswith("data: ") for line in lines[1:]), lines
    assert "\n".join(line[len("data: "):] for line in lines[1:]) == hostile.replace("\r", "&#13;")
    tool = {"type": "assistant", "message": {"content": [
        {"type": "text", "text": "checking"}, {"type": "tool_use", "name": "Bash", "input": {"command": "ls"}}]}}
    assert readable({"kind": "tool_call", "data": tool}) == {
        "who": "assistant", "text": "checking", "fold": "tool call: Bash",
        "folded": '[\n  {\n    "command": "ls"\n  }\n]'}
    message = {"id": 7, "from": "bob", "kind": "question", "body": "ship it?"}
    assert readable({"kind": "input", "data": message})["who"] == "from bob (question 7)"
    assert readable({"kind": "exit", "data": {"exit_status": 0}})["text"] == "exit_status 0"

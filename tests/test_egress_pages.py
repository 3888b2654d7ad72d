"""Egress on the operator's pages, in a real browser (Debian's chromium, driven by
playwright) against a real hive: nginx, the core and its egress proxy, agents in
cages. Test servers live in a network namespace (tests/testnet.py) on
198.18.42.0/24; the proxy learns their names from hive.toml ``[egress] hosts``.

- The dashboard lists every agent's rules with their source, and each decision
  of the proxy (agent, destination, address, allowed or refused, reason, bytes)
  as it happens, live from the event stream, and again as first served.
- An egress approval says in the approvals panel exactly what approving adds
  (worked out by the hive, not taken from the agent's description).
- The operator removes a rule with a click (the agent is refused at once after)
  and adds one with the form; a bad rule is refused with the reason shown.
- Those POSTs are refused without the CSRF token, from another origin, or
  without a session, and change nothing then.
- An agent's page shows its own rules and decisions and nobody else's.
- Markup in the log (an agent can put any text in a CONNECT target) is shown as
  text on both pages and runs nothing.

Screenshots go to artifacts/ (gitignored).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from helpers import wire_time
from hive_fixture import probe_result, wait_until
from test_browser import (  # noqa: F401  (fixtures)
    AGENT_PAGE_VENDORED,
    Watch,
    assert_no_markup,
    browser,
    context,
)
from testnet import TestNet
from web_fixture import Login, Web, artifact, assert_csp, assert_one_line_reason, web_hive

SUBNET = 42
NET = TestNet(SUBNET, prefix="hvui")
ALLOWED, OTHER, THIRD = NET.address(2), NET.address(3), NET.address(4)
HOSTS = {"allowed.test": ALLOWED, "other.test": OTHER, "third.test": THIRD}
WEB, PEER = "uiweb", "uipeer"
AGENTS: dict[str, dict[str, Any]] = {
    # 198.18.0.0/15 is not the public internet: a name rule reaches it only with an IP rule within it
    WEB: {"runtime": "command", "command": ["true"],
          "egress": ["allowed.test:80", "other.test:80", f"198.18.{SUBNET}.0/24:80"]},
    PEER: {"runtime": "command", "command": ["true"]},  # no rules: reaches nothing
}
FOREIGN = "http://attacker.invalid"  # only ever a header value


# -- the hive ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net() -> Iterator[TestNet]:
    with NET as n:
        for address in (ALLOWED, OTHER, THIRD):
            n.serve(address, 80)
        yield n


@pytest.fixture(scope="module")
def web(net: TestNet) -> Iterator[Web]:
    with web_hive(AGENTS, sections={"egress": {"hosts": HOSTS}}) as w:
        yield w


@pytest.fixture(scope="module")
def login(web: Web) -> Login:
    return web.login()


# -- helpers -------------------------------------------------------------------------------


def curl(web: Web, name: str, url: str) -> tuple[int, str]:
    """curl inside NAME's cage, with the cage's own environment (HTTP_PROXY: the hive's proxy)."""
    proc = web.hive.exec(name, "curl", "-sS", "-m", "10", "-o", "-", "-w", "\n%{http_code}", url, timeout=60)
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body.rstrip("\n")


def log_entries(web: Web, name: str) -> list[dict[str, Any]]:
    """NAME's egress log as host.sock shows it, newest first."""
    reply = web.hive.host_call("egress_log", name=name, limit=500)
    assert reply["ok"], reply
    return reply["entries"]


def newest(web: Web, name: str, host: str) -> dict[str, Any]:
    return next(e for e in log_entries(web, name) if e["host"] == host)


def closed(web: Web, name: str, entry_id: int) -> dict[str, Any]:
    """The entry once its connection's close is logged (with the bytes)."""
    def done() -> dict[str, Any] | None:
        e = next(e for e in log_entries(web, name) if e["id"] == entry_id)
        return e if e["closed_at"] else None

    return wait_until(done, 20, f"egress entry {entry_id} to be closed")


def rules(web: Web, name: str) -> list[dict[str, str]]:
    reply = web.hive.host_call("egress_rules", name=name)
    assert reply["ok"], reply
    return [{"rule": r["rule"], "source": r["source"]} for r in reply["rules"].get(name, [])]


def clock(at: str) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(wire_time(at)))  # the wire's RFC 3339


def open_dashboard(context: BrowserContext, web: Web) -> tuple[Page, Watch]:
    """Log in with the URL ``hive up`` printed; the dashboard is up with its stream open."""
    page = context.new_page()
    watch = Watch(page)
    with page.expect_response(lambda r: urlsplit(r.url).path == "/api/dashboard/stream") as stream:
        page.goto(web.login_url)
    expect(page).to_have_url(web.url("/"))
    assert stream.value.status == 200
    page.evaluate("window.__sameDocument = true")  # from here on: no reload, everything live
    return page, watch


def still_same_document(page: Page) -> None:
    assert page.evaluate("window.__sameDocument") is True, "the page reloaded"


def rule_row(page: Page, agent: str, rule: str) -> Any:
    return page.locator(f'#egress-rules tr.rule-row[data-agent="{agent}"][data-rule="{rule}"]')


def log_row(page: Page, entry_id: int) -> Any:
    return page.locator(f'#egress-log tbody tr[data-id="{entry_id}"]')


def expect_entry(row: Any, entry: dict[str, Any], destination: str, agent: str | None = None) -> None:
    """The row shows the entry: time, (agent,) destination, address, decision, reason, bytes."""
    expect(row).to_have_count(1)
    if agent is not None:
        expect(row.locator(".agent")).to_have_text(agent)
    expect(row.locator(".destination")).to_have_text(destination, use_inner_text=False)
    expect(row.locator(".address")).to_have_text(entry["address"] or "")
    decision = "allowed" if entry["allowed"] else "refused"
    expect(row.locator(".decision")).to_have_text(decision)
    expect(row).to_have_class(re.compile(rf"\b{decision}\b"))
    expect(row.locator(".reason")).to_have_text(entry["reason"], use_inner_text=False)
    expect(row.locator(".up")).to_have_text(str(entry["bytes_up"]))
    expect(row.locator(".down")).to_have_text(str(entry["bytes_down"]))
    expect(row.locator("td").first).to_have_text(clock(entry["at"]))


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(artifact(f"egress-{name}.png")), full_page=True)


# -- the dashboard -------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_dashboard_lists_rules_and_decisions_live(web: Web, login: Login, context: BrowserContext) -> None:
    page, watch = open_dashboard(context, web)
    for rule in ("allowed.test:80", "other.test:80"):
        expect(rule_row(page, WEB, rule).locator(".rule")).to_have_text(rule)
        expect(rule_row(page, WEB, rule).locator(".source")).to_have_text("spec")
    expect(page.locator(f'#egress-rules tr.rule-row[data-agent="{PEER}"]')).to_have_count(0)
    # The agents without rules: named on one line, not a row each (issue 15).
    expect(page.locator(f'#egress-rules tr.no-rules [data-agent="{PEER}"]')).to_have_text(PEER)
    expect(page.locator("#egress-rules tr.no-rules")).to_contain_text("no rules")

    # A refused destination, tried from inside the cage: the decision shows up live.
    code, body = curl(web, WEB, "http://nowhere.test/")
    assert code == 403 and "not in this agent's egress allowlist" in body, (code, body)
    refused = newest(web, WEB, "nowhere.test")
    assert refused["allowed"] is False and refused["port"] == 80
    expect_entry(log_row(page, refused["id"]), refused, "nowhere.test:80", agent=WEB)

    # An allowed one: shown when decided, then with its bytes when the connection closes.
    code, body = curl(web, WEB, "http://allowed.test/")
    assert (code, body) == (200, f"hello from {ALLOWED}:80")
    allowed = closed(web, WEB, newest(web, WEB, "allowed.test")["id"])
    assert allowed["allowed"] is True and allowed["address"] == ALLOWED and allowed["bytes_down"] > 0
    expect_entry(log_row(page, allowed["id"]), allowed, "allowed.test:80", agent=WEB)
    assert page.locator("#egress-log tbody tr").first.get_attribute("data-id") == str(allowed["id"])  # newest first
    still_same_document(page)
    shot(page, "1-dashboard-live")

    # /api/state carries the same (what the page redraws from).
    state = web.get("/api/state", login=login).json()
    assert [{"rule": r["rule"], "source": r["source"]} for r in state["egress_rules"][WEB]] == rules(web, WEB)
    assert PEER not in state["egress_rules"]
    shown = {e["id"]: e for e in state["egress_log"]}
    assert shown[refused["id"]] == refused and shown[allowed["id"]] == allowed
    assert [e["id"] for e in state["egress_log"]] == sorted(shown, reverse=True)

    # And the dashboard as first served (the server's template) shows the same rows.
    with page.expect_response(lambda r: urlsplit(r.url).path == "/api/dashboard/stream"):
        page.reload()
    expect_entry(log_row(page, refused["id"]), refused, "nowhere.test:80", agent=WEB)
    expect_entry(log_row(page, allowed["id"]), allowed, "allowed.test:80", agent=WEB)
    expect(rule_row(page, WEB, "allowed.test:80").locator(".source")).to_have_text("spec")
    watch.assert_clean()


@pytest.mark.timeout(300)
def test_an_egress_approval_says_what_it_allows(web: Web, login: Login, context: BrowserContext) -> None:
    page, watch = open_dashboard(context, web)
    assert curl(web, WEB, "http://third.test/")[0] == 403
    # The description is the agent's to write, and may say anything.
    req = web.hive.agent_call(WEB, "request_approval", kind="egress",
                              description="allow egress to harmless.test:80 <b>only</b>",
                              payload={"host": "Third.Test", "port": 80})
    assert req["ok"], req
    li = page.locator(f'#approvals li[data-id="{req["id"]}"]')
    expect(li.locator(".grant .allows")).to_have_text("third.test:80")  # live, worked out by the hive
    expect(li.locator(".grant")).to_have_text(f"approving will allow egress to third.test:80 for {WEB}")
    expect(li).to_contain_text("allow egress to harmless.test:80 <b>only</b>")  # the description, as text
    still_same_document(page)
    shot(page, "2-approval")

    # The agent's page shows it the same way.
    agent_page = context.new_page()
    agent_watch = Watch(agent_page)
    agent_page.goto(web.url(f"/agent/{WEB}/"))
    expect(agent_page.locator(f'#approvals li[data-id="{req["id"]}"] .grant .allows')).to_have_text("third.test:80")
    agent_watch.assert_clean()
    agent_page.close()

    # As first served, too; then approve it with a click: the rule appears, live.
    with page.expect_response(lambda r: urlsplit(r.url).path == "/api/dashboard/stream"):
        page.reload()
    page.evaluate("window.__sameDocument = true")
    expect(li.locator(".grant .allows")).to_have_text("third.test:80")
    with page.expect_response(lambda r: urlsplit(r.url).path == f"/approve/{req['id']}") as approved:
        li.get_by_role("button", name="approve").click()
    assert approved.value.status == 200, approved.value.text()
    expect(rule_row(page, WEB, "third.test:80").locator(".source")).to_have_text("approval")
    expect(li).to_have_count(0)
    assert {"rule": "third.test:80", "source": "approval"} in rules(web, WEB)
    assert curl(web, WEB, "http://third.test/") == (200, f"hello from {THIRD}:80")
    still_same_document(page)
    watch.assert_clean()


@pytest.mark.timeout(300)
def test_the_operator_removes_a_rule_by_clicking(web: Web, login: Login, context: BrowserContext) -> None:
    assert curl(web, WEB, "http://other.test/") == (200, f"hello from {OTHER}:80")
    page, watch = open_dashboard(context, web)
    csrf = page.locator('meta[name="csrf-token"]').get_attribute("content")
    row = rule_row(page, WEB, "other.test:80")
    expect(row.locator(".source")).to_have_text("spec")
    with page.expect_response(lambda r: urlsplit(r.url).path == f"/api/agents/{WEB}/egress/remove") as removed:
        row.get_by_role("button", name="remove").click()
    assert removed.value.status == 200, removed.value.text()
    sent = removed.value.request
    headers = sent.all_headers()  # as sent on the wire
    assert sent.method == "POST" and headers.get("x-csrf-token") == csrf
    assert headers.get("origin") == web.origin
    assert parse_qs(sent.post_data or "") == {"rule": ["other.test:80"]}
    expect(row).to_have_count(0)  # gone, live
    expect(rule_row(page, WEB, "allowed.test:80")).to_have_count(1)  # the others stay
    assert "other.test:80" not in [r["rule"] for r in rules(web, WEB)]

    # Refused at once, and the refusal shows up on the dashboard.
    code, body = curl(web, WEB, "http://other.test/")
    assert code == 403 and "not in this agent's egress allowlist" in body, (code, body)
    refused = newest(web, WEB, "other.test")
    assert refused["allowed"] is False
    expect_entry(log_row(page, refused["id"]), refused, "other.test:80", agent=WEB)
    still_same_document(page)
    watch.assert_clean()
    shot(page, "3-removed")


@pytest.mark.timeout(300)
def test_the_operator_adds_a_rule_from_the_dashboard(web: Web, login: Login, context: BrowserContext) -> None:
    assert curl(web, PEER, "http://third.test/")[0] == 403
    page, watch = open_dashboard(context, web)
    form = page.locator("#egress-allow-form")
    form.locator('input[name="agent"]').fill(PEER)
    form.locator('input[name="rule"]').fill("Third.TEST:80")
    with page.expect_response(lambda r: urlsplit(r.url).path == f"/api/agents/{PEER}/egress/allow") as added:
        form.get_by_role("button", name="allow").click()
    assert added.value.status == 200, added.value.text()
    assert parse_qs(added.value.request.post_data or "") == {"rule": ["Third.TEST:80"]}
    expect(rule_row(page, PEER, "third.test:80").locator(".source")).to_have_text("operator")  # canonical, live
    expect(page.locator(f'#egress-rules tr.no-rules [data-agent="{PEER}"]')).to_have_count(0)
    assert rules(web, PEER) == [{"rule": "third.test:80", "source": "operator"}]
    assert web.hive.host_call("egress_allow", name=PEER, rule=f"{THIRD}:80")["ok"]  # its address: a test range
    assert curl(web, PEER, "http://third.test/") == (200, f"hello from {THIRD}:80")
    assert web.hive.host_call("egress_remove", name=PEER, rule=f"{THIRD}:80")["ok"]

    # A bad rule, or an unknown agent: refused with the reason, nothing added.
    for agent, rule, status, why in [(PEER, "third.test", 422, "expected HOST:PORT"),
                                     (PEER, "third.test:http", 422, "port must be 1-65535"),
                                     ("uinosuch", "third.test:80", 404, "no agent named 'uinosuch'")]:
        form.locator('input[name="agent"]').fill(agent)
        form.locator('input[name="rule"]').fill(rule)
        with page.expect_response(lambda r, agent=agent: urlsplit(r.url).path == f"/api/agents/{agent}/egress/allow") as bad:
            form.get_by_role("button", name="allow").click()
        assert bad.value.status == status, (rule, bad.value.status, bad.value.text())
        expect(page.locator(".toast.bad").filter(has_text=why)).to_have_count(1)
    assert rules(web, PEER) == [{"rule": "third.test:80", "source": "operator"}]
    expect(page.locator(f'#egress-rules tr.rule-row[data-agent="{PEER}"]')).to_have_count(1)
    still_same_document(page)
    watch.assert_clean()
    shot(page, "4-added")


def test_egress_posts_need_csrf_origin_and_session(web: Web, login: Login) -> None:
    before = web.hive.host_call("egress_rules")["rules"]
    assert "csrf.test:80" not in [r["rule"] for r in before.get(PEER, [])]
    assert "allowed.test:80" in [r["rule"] for r in before[WEB]]
    posts = [(f"/api/agents/{PEER}/egress/allow", {"rule": "csrf.test:80"}),
             (f"/api/agents/{WEB}/egress/remove", {"rule": "allowed.test:80"})]
    for path, data in posts:
        for kw, status, why in [
            ({"login": login, "origin": web.origin}, 403, "csrf"),  # no token at all
            ({"login": login, "origin": web.origin, "csrf": "x" * len(login.csrf)}, 403, "csrf"),
            ({"login": login, "origin": web.origin, "extra": {"csrf_token": login.csrf[:-1] + "~"}}, 403, "csrf"),
            ({"login": login, "origin": FOREIGN, "csrf": login.csrf}, 403, "origin"),
            ({"login": login, "csrf": login.csrf}, 403, "origin"),  # no Origin
            ({"origin": web.origin, "csrf": login.csrf}, 401, "not logged in"),  # no session
        ]:
            form = {**data, **kw.pop("extra", {})}
            r = web.request("POST", path, data=form, **kw)
            assert r.status_code == status, (path, kw, r.status_code, r.text)
            assert why in assert_one_line_reason(r).lower(), (path, r.text)
            assert_csp(r)
    assert web.hive.host_call("egress_rules")["rules"] == before
    assert curl(web, WEB, "http://allowed.test/")[0] == 200  # the refused remove removed nothing

    # The control: the same requests, complete, go through (a script's, then a plain form's).
    r = web.post(f"/api/agents/{PEER}/egress/allow", login, data={"rule": "csrf.test:80"})
    assert r.status_code == 200 and r.json()["added"] is True, r.text
    r = web.request("POST", f"/api/agents/{PEER}/egress/remove", login=login, origin=web.origin,
                    headers={"Referer": web.url("/")}, data={"rule": "csrf.test:80", "csrf_token": login.csrf})
    assert r.status_code == 303 and r.headers["location"] == "/", r.text
    assert web.hive.host_call("egress_rules")["rules"] == before
    r = web.post(f"/api/agents/{PEER}/egress/remove", login, data={"rule": "csrf.test:80"})
    assert r.status_code == 409 and "has no egress rule" in assert_one_line_reason(r), r.text


# -- the agent's page ----------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_the_agent_page_shows_its_own_egress_only(web: Web, login: Login, context: BrowserContext) -> None:
    assert web.hive.host_call("egress_allow", name=PEER, rule="peer-only.test:80")["ok"]
    assert curl(web, WEB, "http://web-only.test/")[0] == 403
    assert curl(web, PEER, "http://peer-only.test:81/")[0] == 403
    mine, theirs = log_entries(web, WEB), log_entries(web, PEER)
    assert mine and theirs

    page = context.new_page()
    watch = Watch(page)
    page.goto(web.login_url)
    with page.expect_response(lambda r: urlsplit(r.url).path == f"/agent/{WEB}/events"):
        page.goto(web.url(f"/agent/{WEB}/"))
    expect(page.locator("h1")).to_have_text(WEB)
    shown_rules = page.locator("#egress-rules li.rule")
    expect(shown_rules).to_have_count(len(rules(web, WEB)))
    assert [li.get_attribute("data-rule") for li in shown_rules.all()] == [r["rule"] for r in rules(web, WEB)]
    assert [t.strip() for t in page.locator("#egress-rules li.rule .source").all_text_contents()] == \
        [r["source"] for r in rules(web, WEB)]
    rows = page.locator("#egress-log tbody tr")
    expect(rows).to_have_count(min(len(mine), 50))
    ids = [int(r.get_attribute("data-id") or 0) for r in rows.all()]
    assert ids == [e["id"] for e in mine[:50]]  # its own, newest first
    assert not set(ids) & {e["id"] for e in theirs}
    expect_entry(log_row(page, mine[0]["id"]), mine[0], "web-only.test:80")
    destinations = page.locator("#egress-log .destination").all_text_contents()
    assert "web-only.test:80" in destinations and "peer-only.test:81" not in destinations
    assert "peer-only.test:80" not in page.locator("#egress-rules").text_content()
    watch.assert_clean()
    shot(page, "5-agent-page")

    # Live (the page's stream): the peer's new decision never shows, its own does.
    page.evaluate("window.__sameDocument = true")
    assert curl(web, PEER, "http://peer-later.test/")[0] == 403
    assert curl(web, WEB, "http://web-later.test/")[0] == 403
    later = newest(web, WEB, "web-later.test")
    expect_entry(log_row(page, later["id"]), later, "web-later.test:80")
    assert "peer-later.test:80" not in page.locator("#egress-log").text_content()
    # A rule change shows up live too.
    assert web.hive.host_call("egress_allow", name=WEB, rule="live.test:443")["ok"]
    expect(page.locator('#egress-rules li.rule[data-rule="live.test:443"] .source')).to_have_text("operator")
    assert web.hive.host_call("egress_remove", name=WEB, rule="live.test:443")["ok"]
    expect(page.locator('#egress-rules li.rule[data-rule="live.test:443"]')).to_have_count(0)
    still_same_document(page)
    watch.assert_clean()

    # What the page reads: the agent's own entries only.
    state = web.get(f"/agent/{WEB}/state", login=login).json()
    assert state["egress_log"] and {e["agent"] for e in state["egress_log"]} == {WEB}
    assert [r["rule"] for r in state["egress_rules"]] == [r["rule"] for r in rules(web, WEB)]
    peer_state = web.get(f"/agent/{PEER}/state", login=login).json()
    assert {e["agent"] for e in peer_state["egress_log"]} == {PEER}
    assert [r["rule"] for r in peer_state["egress_rules"]] == [r["rule"] for r in rules(web, PEER)]
    assert "peer-only.test:80" in [r["rule"] for r in peer_state["egress_rules"]]


# -- hostile text in the log ---------------------------------------------------------------

# CONNECT targets (no spaces: one request line). The proxy refuses each; it logs only
# a valid name or address as the host ("-" here), so the markup is in the reason.
HOSTILE_TARGETS = [
    "<img/src=x/onerror=window.__pwned=1>:80",
    "<svg/onload=window.__pwned=2>:80",
    "<script>window.__pwned=3</script>:80",
    '"><svg/onload=window.__pwned=4>:80',
    "<iframe/srcdoc=<script>parent.__pwned=5</script>>:80",
    "<svg/onload=window.__pwned=6>::80",  # not even HOST:PORT: logged with host "-"
]
SEND_CONNECTS = """
out = []
for target in P["targets"]:
    s = socket.create_connection(("127.0.0.1", 3128), timeout=15)
    s.sendall(("CONNECT %s HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n" % target).encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    out.append(int(data.split(b" ")[1]))
result(statuses=out)
"""


@pytest.mark.timeout(300)
def test_markup_in_the_log_is_text(web: Web, login: Login, context: BrowserContext) -> None:
    page, watch = open_dashboard(context, web)
    res = probe_result(web.hive.probe(WEB, SEND_CONNECTS, targets=HOSTILE_TARGETS))
    assert res["statuses"] == [400] * len(HOSTILE_TARGETS), res
    entries = log_entries(web, WEB)[: len(HOSTILE_TARGETS)][::-1]  # in the order sent
    assert [e["allowed"] for e in entries] == [False] * len(HOSTILE_TARGETS)
    for _target, e in zip(HOSTILE_TARGETS, entries, strict=False):
        assert e["host"] == "-" and e["port"] == 0, e
        assert e["reason"].startswith("CONNECT target: ") and "<" in e["reason"], e

    def check(p: Page, agent: str | None) -> None:
        for e in entries:
            expect_entry(log_row(p, e["id"]), e, "-", agent=agent)

    check(page, WEB)  # live
    assert_no_markup(page, "/static/dashboard.js")
    still_same_document(page)
    watch.assert_clean()
    shot(page, "6-hostile-live")
    with page.expect_response(lambda r: urlsplit(r.url).path == "/api/dashboard/stream"):
        page.reload()
    check(page, WEB)  # as served
    assert_no_markup(page, "/static/dashboard.js")
    watch.assert_clean()

    # The agent's page (the core's since issue 15): as served, and as redrawn by its live
    # stream (a rule added and removed redraws the egress section, served marker and all).
    page.goto(web.url(f"/agent/{WEB}/"))
    check(page, None)
    assert_no_markup(page, "/static/agent.js", AGENT_PAGE_VENDORED)
    page.evaluate("document.getElementById('egress').dataset.served = '1'")
    assert web.hive.host_call("egress_allow", name=WEB, rule="redraw.test:443")["ok"]
    expect(page.locator('#egress-rules li.rule[data-rule="redraw.test:443"]')).to_have_count(1)
    assert web.hive.host_call("egress_remove", name=WEB, rule="redraw.test:443")["ok"]
    expect(page.locator('#egress-rules li.rule[data-rule="redraw.test:443"]')).to_have_count(0)
    expect(page.locator("#egress[data-served]")).to_have_count(0)
    check(page, None)
    assert_no_markup(page, "/static/agent.js", AGENT_PAGE_VENDORED)
    watch.assert_clean()
    shot(page, "7-hostile-agent-page")

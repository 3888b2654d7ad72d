"""An approval without a payload took the dashboard down (found by the agent-verb fuzzer,
tests/test_fuzz_agent_verbs.py, issue 13): ``request_approval`` with no ``payload`` (or
``null``) is valid and stored, and its row leaves the null payload out (docs/protocol.md:
absent optional fields are left out). The dashboard's template then fed Jinja's Undefined
to the payload's JSON and ``/`` answered 500; its script, redrawing from ``/api/state``,
called ``JSON.stringify(undefined).replace`` and threw. One request of a few bytes, from
any agent, and the operator had no dashboard.

Must hold: an approval whose payload is null shows on ``/`` (as served and as redrawn by
its script) with the payload ``null``, the value its sha256 is of.
"""

from __future__ import annotations

import hashlib
import html
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, expect

from hive_fixture import HiveProcess
from web_fixture import Web, browser  # noqa: F401 (fixture)

from .conftest import cage_run

pytestmark = pytest.mark.attack("surface.dashboard-dos", ref="issue 13 (the agent-verb fuzzer's finding)")

NO_PAYLOAD = """
c = Conn()
result(
    absent=c.call({"cmd": "request_approval", "kind": "custom", "description": P["desc"] + "-absent"}),
    null=c.call({"cmd": "request_approval", "kind": "custom", "description": P["desc"] + "-null", "payload": None}),
)
"""
NULL_SHA = hashlib.sha256(b"null").hexdigest()


def request_without_payload(rt: HiveProcess, desc: str) -> list[int]:
    """From inside a cage: two approvals, one leaving the payload out, one sending null."""
    res: dict[str, Any] = cage_run(rt, "rtmule", NO_PAYLOAD, desc=desc)
    ids = []
    for key in ("absent", "null"):
        reply = res[key]
        assert reply.get("ok") is True and reply["payload_sha256"] == NULL_SHA, reply
        ids.append(reply["id"])
    return ids


def test_approval_without_payload_served_on_the_dashboard(rt: HiveProcess) -> None:
    web = Web(rt)
    login = web.login()
    ids = request_without_payload(rt, "rt-no-payload")
    try:
        page = web.get("/", login=login)
        assert page.status_code == 200, page.text[:300]
        for aid, suffix in zip(ids, ("absent", "null"), strict=True):
            item = page.text.split(f'<li data-id="{aid}"', 1)[1].split("</li>", 1)[0]
            assert html.escape(f"rt-no-payload-{suffix}") in item, item
            assert '<pre class="payload">null</pre>' in item, item
        state = web.get("/api/state", login=login)
        assert state.status_code == 200, state.text[:300]
        shown = {a["id"]: a for a in state.json()["approvals"]}
        for aid in ids:  # the row as documented: a null payload is left out
            assert "payload" not in shown[aid] and shown[aid]["payload_sha256"] == NULL_SHA, shown[aid]
    finally:
        for aid in ids:
            assert rt.host_call("deny", id=aid)["ok"]


def test_approval_without_payload_redrawn_by_the_dashboard(rt: HiveProcess, browser: Browser) -> None:
    web = Web(rt)
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(30_000)
    errors: list[str] = []
    ids: list[int] = []
    try:
        dash = ctx.new_page()
        dash.on("pageerror", lambda e: errors.append(str(e)))
        with dash.expect_response(lambda r: urlsplit(r.url).path == "/api/dashboard/stream"):
            dash.goto(web.login_url)
        ids = request_without_payload(rt, "rt-live-no-payload")  # the script redraws from /api/state
        for aid in ids:
            item = dash.locator(f'#approvals li[data-id="{aid}"]')
            expect(item).to_contain_text("rt-live-no-payload")
            expect(item.locator("pre.payload")).to_have_text("null")
        assert errors == [], errors
    finally:
        ctx.close()
        for aid in ids:
            assert rt.host_call("deny", id=aid)["ok"]

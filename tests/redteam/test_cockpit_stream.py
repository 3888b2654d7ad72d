"""The cockpit's live stream sends HTML now (issue 15): the sections an event touched,
rendered by the server and morphed into the dashboard by htmx. What an agent controls
goes into that HTML, and a page script in the operator's origin (a compromised harness's)
can open the stream with the operator's cookie.

Must hold: the stream's sections and a row shown whole (``/cockpit/{kind}/{id}``) carry
the agent's markup as escaped text only (no element, no htmx attribute, no extra SSE
field); the stream carries no CSRF token, whoever opens it; the cockpit's own posts
(mark the inbox read, an htmx-flavoured approve) still need the token and this origin.
"""

from __future__ import annotations

import html
from typing import Any

import httpx
import pytest

from hive_fixture import HiveProcess
from hyperhive.core import cockpit
from web_fixture import Web

AGENT = "rtmule"
# Markup, htmx attributes, an out-of-band swap and SSE framing, in one status and message.
HOSTILE = ('<img src=x onerror="alert(1)"><div id="attention" hx-swap-oob="true" hx-post="/approve/1"'
           ' hx-trigger="load">owned</div>\r\nevent: update\r\ndata: <b hx-get="/logout">x</b>\n\n')
FETCH = {"Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty", "Sec-Fetch-Site": "same-origin"}


def first_update(web: Web, headers: dict[str, str]) -> str:
    """The stream's first event (every section, once), as its data text."""
    url = web.url("/api/dashboard/stream?view=html")
    with httpx.stream("GET", url, headers=headers, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines: list[str] = []
        for line in r.iter_lines():
            if line == "" and any(ln.startswith("data:") for ln in lines):
                break
            lines.append(line)
    assert lines[0] == "event: update", lines[:3]
    assert all(ln.startswith("data: ") or ln == "data:" for ln in lines[1:]), \
        [ln for ln in lines[1:] if not ln.startswith("data:")][:3]
    return "\n".join(ln[6:] for ln in lines[1:])


@pytest.mark.attack("surface.cockpit-stream", ref="issue 15 item 1 (the live sections are HTML)")
def test_live_sections_escape_agent_markup_and_carry_no_token(rt: HiveProcess) -> None:
    web = Web(rt)
    login = web.login()
    assert rt.agent_call(AGENT, "set_status", text=HOSTILE)["ok"]
    sent = rt.agent_call(AGENT, "send", to="operator", body=HOSTILE)
    assert sent["ok"], sent
    for headers in ({**login.cookies, **FETCH}, login.cookies):  # a page script's, a navigation's
        data = first_update(web, headers)
        assert login.csrf not in data, "the stream carries the session's CSRF token"
        assert 'name="csrf_token"' not in data
        for raw in ("<img", '<div id="attention" hx-swap-oob="true" hx-post', "<b hx-get", "\r"):
            assert raw not in data, f"agent markup reached the stream raw: {raw!r}"
        shown = html.unescape(data)
        assert '<img src=x onerror="alert(1)">' in shown  # as text, in the agent's row and the inbox
        # Every section once, each a morph of its own id (none of the agent's).
        assert data.count('hx-swap-oob="morph"') == len(cockpit.SECTIONS), data.count('hx-swap-oob="morph"')
    whole = web.get(f"/cockpit/messages/{sent['id']}", login=login)
    assert whole.status_code == 200 and "<img" not in whole.text and "&lt;img" in whole.text


@pytest.mark.attack("surface.cockpit-stream", ref="issue 15 item 1 (the cockpit's posts)")
def test_cockpit_posts_need_token_and_origin(rt: HiveProcess) -> None:
    web = Web(rt)
    login = web.login()
    htmx = {"HX-Request": "true"}
    cases: list[tuple[str, dict[str, Any]]] = [
        ("no token", {"login": login, "origin": web.origin, "headers": htmx}),
        ("other origin", {"login": login, "csrf": login.csrf, "origin": "http://attacker.invalid",
                          "headers": htmx}),
        ("no session", {"csrf": login.csrf, "origin": web.origin, "headers": htmx}),
    ]
    for why, kw in cases:
        for path in ("/inbox/read", "/approve/999999"):
            r = web.request("POST", path, data={"upto": "1"}, **kw)
            assert r.status_code in (401, 403), (why, path, r.status_code, r.text)
            assert r.text.startswith('<div class="toast bad">'), (why, path, r.text)  # refused, in words
    ok = web.request("POST", "/inbox/read", login=login, csrf=login.csrf, origin=web.origin,
                     headers=htmx, data={"upto": "1"})
    assert ok.status_code == 200 and '<div class="toast">marked the inbox read</div>' in ok.text, ok.text

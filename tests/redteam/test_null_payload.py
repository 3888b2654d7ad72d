"""An approval without a payload took the dashboard down (found by the agent-verb fuzzer,
tests/test_fuzz_agent_verbs.py, issue 13): ``request_approval`` with no ``payload`` (or
``null``) is valid and stored, but the approval's row then had no ``payload`` field, so
``/`` answered 500 (its template fed Jinja's Undefined to the payload's JSON) and the
dashboard's script would call ``JSON.stringify(undefined).replace`` on a redraw. One
request of a few bytes, from any agent, and the operator had no dashboard.

Must hold: an approval whose payload is null shows on ``/`` and in ``/api/state`` with
``payload: null`` (the value its sha256 is of), like any other.
"""

from __future__ import annotations

import hashlib
import html
from typing import Any

import pytest

from hive_fixture import HiveProcess
from web_fixture import Web

from .conftest import cage_run

pytestmark = pytest.mark.attack("surface.dashboard-dos", ref="issue 13 (the agent-verb fuzzer's finding)")

NO_PAYLOAD = """
c = Conn()
result(
    absent=c.call({"cmd": "request_approval", "kind": "custom", "description": "rt-no-payload"}),
    null=c.call({"cmd": "request_approval", "kind": "custom", "description": "rt-null-payload", "payload": None}),
)
"""


def test_approval_without_payload_keeps_the_dashboard_up(rt: HiveProcess) -> None:
    web = Web(rt)
    login = web.login()
    res: dict[str, Any] = cage_run(rt, "rtmule", NO_PAYLOAD)
    ids = []
    try:
        for key in ("absent", "null"):
            reply = res[key]
            assert reply.get("ok") is True, reply
            assert reply["payload_sha256"] == hashlib.sha256(b"null").hexdigest(), reply
            ids.append(reply["id"])
        page = web.get("/", login=login)
        assert page.status_code == 200, page.text[:300]
        for aid, desc in zip(ids, ("rt-no-payload", "rt-null-payload"), strict=True):
            item = page.text.split(f'<li data-id="{aid}"', 1)[1].split("</li>", 1)[0]
            assert html.escape(desc) in item and '<pre class="payload">null</pre>' in item, item
        state = web.get("/api/state", login=login)
        assert state.status_code == 200, state.text[:300]
        shown = {a["id"]: a for a in state.json()["approvals"]}
        for aid in ids:
            assert "payload" in shown[aid] and shown[aid]["payload"] is None, shown[aid]
    finally:
        for aid in ids:
            assert rt.host_call("deny", id=aid)["ok"]

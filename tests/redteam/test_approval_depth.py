"""Found by the red team of issue 12, fixed by the nesting limit (issue 13 item 1): one ``request_approval`` from a cage, of kind ``custom`` with a payload nested
300 deep (``[[[…]]]``: 600 bytes, far below every size limit), is answered
``internal error; see the hive-core log`` and yet STORED as a pending approval. From
then on every operator surface that lists pending approvals fails: host.sock
``pending`` answers ``internal error``, the dashboard ``GET /`` and ``GET /api/state``
are HTTP 500, until the operator denies an approval whose id no surface shows.

Why: the payload is ``Any`` (free JSON) and parses fine (json.loads allows ~1000
levels), is stored (canonical_json), and then ``model_fields_only(approval)``
(pydantic ``model_dump``) raises ``ValueError: Maximum serialization depth exceeded``
(pydantic-core's serializer limit, well below json's): after the commit when
publishing the ``approval`` event (so the refusal comes with a state change), and on
every later read that dumps the row. Fix: bound the nesting of free-form JSON at the
door (``_decode`` already walks every value: count depth there, refuse past e.g. 64
with a one-line ``BadRequest``), and don't let a dump of a stored row fail a listing."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from hive_fixture import HiveProcess
from web_fixture import Web

from .conftest import cage_run

pytestmark = pytest.mark.attack("wire.malformed", ref="CVE-2020-10735 / json nesting DoS (CWE-674); tinyproxy#627")

DEPTH = 300
PROBE = r'''
line = ('{"cmd":"request_approval","kind":"custom","description":"deep","payload":'
        + "[" * DEPTH + "]" * DEPTH + "}").encode()
c = Conn()
try:
    reply = c.raw(line + b"\n")
finally:
    c.close()
result(reply=reply)
'''


def pending_ids(rt: HiveProcess) -> list[int]:
    db = sqlite3.connect(f"file:{rt.state_dir / 'hive.db'}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute(
            "SELECT id FROM approvals WHERE agent='rtmule' AND status='pending'")]
    finally:
        db.close()


def test_deep_payload_is_refused_in_one_line_and_the_dashboard_survives(rt: HiveProcess) -> None:
    web = Web(rt)
    login = web.login()
    before = pending_ids(rt)
    try:
        reply: dict[str, Any] = cage_run(rt, "rtmule", f"DEPTH = {DEPTH}\n" + PROBE)["reply"]
        stored = [i for i in pending_ids(rt) if i not in before]
        pending = rt.host_call("pending")
        codes = {p: web.get(p, login=login).status_code for p in ("/", "/api/state")}
        broken = {
            "internal error reply": "internal error" in reply.get("error", ""),
            "stored despite refusal": not reply["ok"] and bool(stored),
            "host.sock pending fails": not pending["ok"],
            "dashboard fails": codes != {"/": 200, "/api/state": 200},
        }
        assert not any(broken.values()), (broken, reply, stored, pending, codes)
    finally:
        for i in pending_ids(rt):
            if i not in before:
                rt.host_call("deny", id=i)
        assert pending_ids(rt) == before

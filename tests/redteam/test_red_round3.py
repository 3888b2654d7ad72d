"""Red team, round 3: the paged and summarised listings, the model framing, hyperhive v1
compatibility on host.sock (RFC 3339 times, the lossy status feed, set_parent,
request_spawn, cage limits in the spec), attacked from inside real cages (and, where
said, as the cage's compromised harness).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser

from hive_fixture import HiveProcess, running_hive
from hyperhive.client import Client
from web_fixture import Web, browser  # noqa: F401 (fixture)

from .conftest import RT_AGENTS, cage_run

REF = "red team round 3"


@pytest.fixture(scope="module")
def rt() -> Iterator[HiveProcess]:
    """The red team's agents in a hive of this module's own: its floods (gigabytes to the
    operator's inbox, a thousand statuses) must not slow the other modules' listings.
    Its agents' request bytes are not paced (``input_bytes_per_second = 0``): the pacer
    is tested elsewhere (test_pacing.py), and here it only made the 240 MB flood of the
    stalled-subscriber case wait ~20 s past the burst; every other flood here fits in
    the default 64 MiB burst, paced or not."""
    yield from running_hive(HiveProcess(RT_AGENTS, sections={"limits": {"input_bytes_per_second": 0}}))


# -- a reminder "at" a time no wire can write ------------------------------------------------

REMIND_PAST = """
out = {}
for at in P["ats"]:
    out[str(at)] = call({"cmd": "remind", "at": at, "text": P["text"]})
result(**out)
"""


@pytest.mark.attack("wire.timestamps", ref=REF)
def test_remind_at_a_time_outside_rfc3339_is_refused_and_stores_nothing(rt: HiveProcess) -> None:
    """``remind at`` took any number as unix seconds with no lower bound: -1e300 (or any time
    before year 1) was stored, then formatting its RFC 3339 ``due_at`` for the reply and the
    event raised (OverflowError, ValueError "year 0 is out of range"): the agent got
    "internal error" although its reminder was stored (and then delivered). Must be: a
    one-line refusal and nothing stored."""
    text = "rt-round3-remind-past"
    ats = [-1e300, -62135596801, -1e12]
    res = cage_run(rt, "rtmule", REMIND_PAST, ats=ats, text=text)
    for at in ats:
        reply = res[str(at)]
        assert reply.get("ok") is False, reply
        assert "internal error" not in reply["error"], reply
    # nothing was stored: no reminder message with this text ever reaches rtmule
    time.sleep(1.5)
    got = cage_run(rt, "rtmule", """
msgs = call({"cmd": "recv", "max": 1000})["messages"]
mine = [m for m in msgs if m.get("body") == P["text"]]
call({"cmd": "ack", "ids": [m["id"] for m in mine]})
result(n=len(mine))
""", text=text)
    assert got["n"] == 0, got


# -- a compromised harness's page runs script in the operator's origin -----------------------

PAGE_AGENT = "rtcarol"


class ScriptPage:
    """A compromised harness's page server on ``sock_path``: ``responses`` maps a path to
    (content type, body); a body may hold ``{csrf}``, filled with the X-Hive-CSRF header the
    gateway gives the page."""

    def __init__(self, sock_path: Path, responses: dict[str, tuple[str, str]]) -> None:
        self.path = sock_path
        self.aside = sock_path.with_name("web.sock.harness")
        self.responses = responses
        self.stop = threading.Event()

    def __enter__(self) -> ScriptPage:
        st = os.stat(self.path)
        os.rename(self.path, self.aside)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        os.chown(self.path, st.st_uid, st.st_gid)
        os.chmod(self.path, 0o660)
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close()
        os.unlink(self.path)
        os.rename(self.aside, self.path)

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head = data.split(b"\r\n\r\n", 1)[0].decode(errors="replace")
            lines = head.split("\r\n")
            target = lines[0].split(" ")[1].split("?")[0]
            csrf = ""
            for line in lines[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "x-hive-csrf":
                    csrf = v.strip()
            ctype, body = self.responses.get(target, ("text/plain; charset=utf-8", "not here\n"))
            raw = body.replace("{csrf}", csrf).encode()
            out = [
                "HTTP/1.1 200 OK", f"Content-Type: {ctype}", f"Content-Length: {len(raw)}",
                "Connection: close",
            ]
            conn.sendall("\r\n".join(out).encode() + b"\r\n\r\n" + raw)


@pytest.mark.attack("surface.script-injection", ref=REF)
def test_compromised_page_cannot_approve_as_the_operator(rt: HiveProcess, browser: Browser) -> None:
    """As rtcarol's compromised harness (its web.sock: played from the host, as in
    test_gateway_pages.py): its page loads a script of its own from its own path, which the
    gateway's CSP (script-src 'self') lets run in the operator's origin. The script posts
    ``/approve/N`` (N: rtcarol's own pending approval) with the CSRF token the gateway handed
    the page. Must hold: the approval stays pending (docs/security.md: "Nothing an agent
    controls runs as script in the operator's origin")."""
    web = Web(rt)
    res = cage_run(rt, PAGE_AGENT, """
result(reply=call({"cmd": "request_approval", "kind": "custom", "description": "rt-round3-page",
                   "payload": {"want": "approved by my own page"}}))
""")
    aid = res["reply"]["id"]
    # Since issue 15 the harness's page is /agent/rtcarol/page/, sandboxed, and given no
    # token; its own script is refused by the gateway (no cookie from an opaque origin), so
    # the browser is handed it directly below, the worst case.
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>agent</title>'
        '<script src="/agent/rtcarol/page/x.js"></script></head><body>hello</body></html>'
    )
    script = (
        "fetch('/approve/" + str(aid) + "', {method: 'POST', credentials: 'same-origin',"
        " headers: {'X-CSRF-Token': '{csrf}', 'Accept': 'application/json'},"
        " body: new URLSearchParams({})})"
        ".then(function (r) { document.title = 'posted ' + r.status; },"
        " function (e) { document.title = 'posted error ' + e; });"
    )
    responses = {
        "/": ("text/html; charset=utf-8", page),
        "/x.js": ("text/javascript; charset=utf-8", script),
    }
    ctx = browser.new_context()
    ctx.set_default_timeout(30_000)
    try:
        with ScriptPage(rt.run_dir / "ui" / PAGE_AGENT / "web.sock", responses):
            ctx.route(web.url("/agent/rtcarol/page/x.js"), lambda route: route.fulfill(
                status=200, content_type="text/javascript", body=script.replace("{csrf}", "")))
            tab = ctx.new_page()
            tab.goto(web.login_url)
            tab.goto(web.url(f"/agent/{PAGE_AGENT}/page/"))
            with contextlib.suppress(Exception):
                tab.wait_for_function("document.title.startsWith('posted')", timeout=10_000)
        shown = rt.host_call("show_approval", id=aid)["approval"]
        assert shown["status"] == "pending", shown
    finally:
        ctx.close()
        with contextlib.suppress(Exception):
            rt.host_call("deny", id=aid)


# -- the lossy status feed: one agent's flood pushes another's change out --------------------

FLOOD_STATUS = """
c = Conn()
out = []
for i in range(P["n"]):
    r = c.call({"cmd": "set_status", "text": "rt-round3-flood %d " % i + "x" * 3000})
    if not r.get("ok"):
        out.append(r)
        time.sleep(0.05)
result(errors=out[:3], n_err=len(out))
"""


@pytest.mark.attack("core.status-feed", ref=REF)
def test_status_flood_does_not_hide_another_agents_change(rt: HiveProcess) -> None:
    """subscribe_agent_status is lossy: a slow reader's oldest events are dropped, silently.
    The operator's feed is slow for a moment (not reading) while rtmule sets its status
    hundreds of times from its cage; rtbob is paused (the change that matters) in the middle. When the
    reader reads on, rtbob's change must still be there (the newest state per agent is
    kept), or the feed must say that changes were dropped so the reader re-polls."""
    with Client(rt.host_sock) as c:
        c.send_raw(json.dumps({"cmd": "subscribe_agent_status"}).encode() + b"\n")
        ack = c.read()
        assert ack.get("ok") is True, ack
        try:
            # the reader's buffers fill up first, so rtbob's change waits in the core's queue
            res = cage_run(rt, "rtmule", FLOOD_STATUS, n=600, timeout=180)
            assert res["n_err"] == 0, res
            assert rt.host_call("set_paused", name="rtbob", paused=True)["ok"]
            res = cage_run(rt, "rtmule", FLOOD_STATUS, n=400, timeout=180)
            assert res["n_err"] == 0, res
            seen_bob = False
            told = False
            c.sock.settimeout(3)
            with contextlib.suppress(TimeoutError, OSError, ConnectionError):
                while True:
                    item = c.read()
                    if set(item) - {"version", "ok", "agent_statuses"}:
                        told = True
                    for a in item.get("agent_statuses", []):
                        if a.get("name") == "rtbob" and a.get("paused"):
                            seen_bob = True
            assert seen_bob or told, "rtbob's pause was dropped from the feed, and nothing said so"
        finally:
            rt.host_call("set_paused", name="rtbob", paused=False)


# -- a stalled event stream pins every whole row it has not sent -----------------------------

FLOOD_OPERATOR = """
c = Conn(timeout=120)
body = "\\U0001F600" * P["chars"]  # 4 bytes a character: the most a Text holds, as a line
errors = []
for i in range(P["n"]):
    r = c.raw(json.dumps({"cmd": "send", "to": "operator", "body": body}, ensure_ascii=False).encode() + b"\\n")
    if not r.get("ok"):
        errors.append(r)
        time.sleep(0.2)
result(errors=errors[:3], n_err=len(errors))
"""


@pytest.mark.attack("core.reply-memory", ref=REF)
def test_stalled_subscriber_does_not_pin_whole_rows(rt: HiveProcess) -> None:
    """An event stream (host.sock ``subscribe``; the dashboard's SSE alike) that is not
    read queues up to 10,000 events, each holding its row whole: from its cage rtmule
    sends the operator messages of 200 Ki 4-byte characters (800 KB each; older ones are
    evicted from the store, so no quota stops it), and the core keeps every one of them
    for the stalled reader. Must hold: the core grows by less than 256 MiB (a subscriber's
    backlog is bounded in bytes too, as a reply is). 300 messages, not the 1,000 of the
    round (1.5 GiB pinned then, ~1.5 MiB a message): unbounded they pin ~475 MiB (checked
    at 400: with SUBSCRIBER_CHARS lifted the core grew by 633 MiB; bounded, 250 grew it
    by 136 MiB), and each costs the core ~90 ms (a minute saved, or more)."""
    from .conftest import core_rss_kib

    n = 300
    with Client(rt.host_sock) as c:
        c.send_raw(json.dumps({"cmd": "subscribe", "kinds": ["message"]}).encode() + b"\n")
        assert c.read().get("ok") is True
        before = core_rss_kib(rt)
        res = cage_run(rt, "rtmule", FLOOD_OPERATOR, n=n, chars=200 * 1024, timeout=600)
        grown = core_rss_kib(rt) - before
    print(f"{n} messages of 800 KB to a stalled subscriber: the core grew by {grown // 1024} MiB")
    assert res["n_err"] < n // 2, res
    assert grown < 256 * 1024, f"the core grew by {grown // 1024} MiB for one stalled subscriber of {n}"


# -- the new operator verbs, from a cage -----------------------------------------------------

NEW_VERBS = """
out = {}
for verb, fields in P["verbs"].items():
    out[verb] = err({"cmd": verb, **fields})
out["spawn_self_limits"] = err({"cmd": "request_approval", "kind": "spawn", "description": "more room",
    "payload": {"name": "rtmule", "spec": {"runtime": "command", "command": ["true"], "memory_mib": 16384}}})
out["spawn_huge"] = err({"cmd": "request_approval", "kind": "spawn", "description": "x",
    "payload": {"name": "rtround3x", "spec": {"runtime": "command", "command": ["true"], "memory_mib": 10**6}}})
out["as_operator"] = err({"cmd": "request_approval", "kind": "spawn", "agent": "operator", "description": "x",
    "payload": {"name": "rtround3y", "spec": {"runtime": "command", "command": ["true"]}}})
result(**out)
"""


@pytest.mark.attack("identity.forge-operator", ref=REF)
def test_new_operator_verbs_are_not_on_agent_sock(rt: HiveProcess) -> None:
    """From rtmule's cage: request_spawn, set_parent (rtmule under rtbob, to reach it),
    set_resource_limits (its own), show_approval/question/message (read others' text),
    subscribe_agent_status; a spawn request naming itself with 16 GiB, one with a
    memory_mib past hive-priv's bound, one claiming agent "operator". Each is refused and
    nothing changes: the new verbs are host.sock's only, limits only reach a cage through a
    spawn the operator approves (within hive-priv's bounds)."""
    before = rt.host_call("pending")
    verbs = {
        "request_spawn": {"name": "rtround3z", "spec": {"runtime": "command", "command": ["true"]}},
        "set_parent": {"name": "rtmule", "parent": "rtbob"},
        "set_resource_limits": {"name": "rtmule", "memory_mib": 16384, "pids_max": 8192},
        "show_approval": {"id": 1},
        "show_question": {"id": 1},
        "show_message": {"id": 1},
        "subscribe_agent_status": {},
    }
    res = cage_run(rt, "rtmule", NEW_VERBS, verbs=verbs)
    for verb in verbs:
        assert isinstance(res[verb], str) and res[verb].startswith("unknown command"), (verb, res[verb])
    # An agent's spawn spec carries no limits (they are the operator's to set).
    assert res["spawn_self_limits"] == "spawn payload: unknown field 'spec.memory_mib'", res
    assert "memory_mib" in res["spawn_huge"], res
    assert "agent" in res["as_operator"] and isinstance(res["as_operator"], str), res
    after = rt.host_call("pending")
    assert after["total"] == before["total"], (before, after)
    me = next(a for a in rt.host_call("agent_status")["agent_statuses"] if a["name"] == "rtmule")
    assert me.get("parent") is None, me

"""One roster for the operator across the swarm (docs/swarm.md, "The operator's roster
and actions"), on the three test hosts of the session swarm: every host's questions and
approvals are listed on host a with their host; the operator on a answers a question from
an agent on c, approves a spawn an agent on b asked for, and spawns on b; each is
carried, signed, to its host and applied there once."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, expect

from helpers import assert_ok, assert_refused, wait_for
from hive_fixture import HIVE, HiveProcess
from hyperhive.config import ConfigError, load_config
from hyperhive.swarm.signing import (
    MAX_ACTION_BYTES,
    ActionError,
    load_or_create_key,
    open_sealed,
    parse_public,
    public_b64,
    seal,
)
from swarm_fixture import Swarm, hears
from swarm_fixture import listed as listed_on
from test_browser import INSTRUMENT, Watch
from web_fixture import META_CSRF, Web, artifact, browser  # noqa: F401 (browser: the module's chromium)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

CHILD = {"runtime": "command", "command": ["true"]}


def listed(swarm: Swarm, cmd: str, key: str, host: str, rid: int) -> dict[str, Any] | None:
    """Row ``rid`` of ``host`` in host a's ``cmd`` listing (the other hosts' rows)."""
    return listed_on(swarm.cores["a"], cmd, key, host, rid)


@needs_root
def test_operator_on_a_answers_a_question_from_an_agent_on_c(swarm: Swarm) -> None:
    carol = swarm.cores["c"].agent("carol")
    qid = assert_ok(carol.call("ask", to="operator", question="ship it?", options=["yes", "no"]))["id"]
    # Listed on a with its host (host.sock's questions; and in `hive swarm status`).
    row = wait_for(lambda: listed(swarm, "questions", "swarm_questions", "c", qid), timeout=10)
    assert (row["asker"], row["question"], row["options"]) == ("carol", "ship it?", ["yes", "no"])
    # b's own watch of c's bucket brings it too (not necessarily the same instant as a's).
    wait_for(lambda: any(q["host"] == "c" and q["id"] == qid for q in swarm.status("b")["questions"]),
             timeout=10)
    applied = swarm.status("c")["actions_applied"]

    reply = assert_ok(swarm.cores["a"].host_call("answer_question", id=qid, answer="yes", host="c"))
    assert reply["host"] == "c" and reply["applied"] is True, reply
    msgs = assert_ok(carol.call("recv", wait=5.0))["messages"]
    assert [(m["kind"], m["from"], m["body"], m["ref"]) for m in msgs] == [
        ("answer", "operator", "yes", qid)
    ]
    assert_ok(carol.call("ack", ids=[m["id"] for m in msgs]))
    assert swarm.status("c")["actions_applied"] == applied + 1
    # Answered on c: gone from c's own listing and, once c's row is deleted, from a's.
    assert assert_ok(swarm.cores["c"].host_call("questions"))["total"] == 0
    wait_for(lambda: listed(swarm, "questions", "swarm_questions", "c", qid) is None, timeout=10)
    # A second answer is c's to refuse (the question is answered): nothing is delivered.
    again = swarm.cores["a"].host_call("answer_question", id=qid, answer="no", host="c")
    assert_refused(again, "host c:", "already answered")
    assert assert_ok(carol.call("recv", wait=0.5))["messages"] == []


@needs_root
def test_operator_on_a_approves_a_spawn_asked_for_on_b(swarm: Swarm) -> None:
    bob = swarm.cores["b"].agent("bob")
    payload = {"name": "bobkid", "spec": CHILD}
    asked = assert_ok(bob.call("request_approval", kind="spawn", description="a helper",
                               payload=payload))  # fmt: skip
    aid, sha = asked["id"], asked["payload_sha256"]
    row = wait_for(lambda: listed(swarm, "pending", "swarm_approvals", "b", aid), timeout=10)
    assert (row["agent"], row["kind"], row["payload_sha256"]) == ("bob", "spawn", sha)
    try:
        # The operator approves what a's listing showed: a binds it to that sha256.
        reply = assert_ok(swarm.cores["a"].host_call("approve", id=aid, host="b"))
        assert reply["applied"] is True, reply
        kid = swarm.cores["b"].status("bobkid")
        assert kid["parent"] == "bob"
        msgs = assert_ok(bob.call("recv", wait=5.0))["messages"]  # bob hears of it, once
        assert [(m["kind"], m["body"], m["ref"]) for m in msgs] == [("approval", "approved", aid)]
        assert_ok(bob.call("ack", ids=[m["id"] for m in msgs]))
        assert "bobkid" not in assert_ok(swarm.cores["a"].host_call("list"))["agents"]
        # The roster shows it on b, from every host.
        wait_for(lambda: ("bobkid", "b") in {(r["name"], r["host"])
                                             for r in swarm.status("c")["agents"]}, timeout=10)  # fmt: skip
        wait_for(lambda: listed(swarm, "pending", "swarm_approvals", "b", aid) is None, timeout=10)
        # Approving it again: b refuses (resolved), and no second agent comes of it.
        assert_refused(swarm.cores["a"].host_call("approve", id=aid, host="b",
                                                  payload_sha256=sha), "host b:")  # fmt: skip
    finally:
        swarm.cores["b"].host_call("destroy", name="bobkid")
    wait_for(lambda: "bobkid" not in {r["name"] for r in swarm.status("a")["agents"]}, timeout=10)


@needs_root
def test_operator_on_a_spawns_on_b(swarm: Swarm) -> None:
    """``spawn`` with a host (``hive spawn --host b``): carried to b, made there."""
    try:
        reply = assert_ok(swarm.cores["a"].host_call("spawn", name="onb", spec=CHILD, host="b"))
        assert reply["applied"] is True, reply
        assert "onb" in assert_ok(swarm.cores["b"].host_call("list"))["agents"]
        assert "onb" not in assert_ok(swarm.cores["a"].host_call("list"))["agents"]
        # The name is b's swarm-wide: a can't spawn it too.
        wait_for(lambda: "onb" in {r["name"] for r in swarm.status("a")["agents"]}, timeout=10)
        assert_refused(swarm.cores["a"].host_call("spawn", name="onb", spec=CHILD),
                       "already exists on host b")  # fmt: skip
        # A host the swarm doesn't know: refused on a, nothing carried.
        assert_refused(swarm.cores["a"].host_call("spawn", name="onz", spec=CHILD, host="zz"),
                       "no host 'zz'")  # fmt: skip
        # This host's own name: spawned here, as without a host.
        assert_ok(swarm.cores["a"].host_call("spawn", name="ona", spec=CHILD, host="a"))
        assert "ona" in assert_ok(swarm.cores["a"].host_call("list"))["agents"]
    finally:
        swarm.cores["b"].host_call("destroy", name="onb")
        swarm.cores["a"].host_call("destroy", name="ona")


@needs_root
def test_the_cli_on_a_lists_and_answers_other_hosts_questions(swarm: Swarm) -> None:
    """``hive questions`` on a lists b's question with its host; ``hive answer --host b``
    answers it there; ``hive swarm status`` shows a's operator key and b's question."""
    a = swarm.cores["a"]

    def hive(*args: str) -> str:
        done = subprocess.run([str(HIVE), "--run-dir", str(a.run_dir), *args],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    bob = swarm.cores["b"].agent("bob")
    qid = assert_ok(bob.call("ask", to="operator", question="cli or web?"))["id"]
    wait_for(lambda: listed(swarm, "questions", "swarm_questions", "b", qid), timeout=10)
    out = hive("questions")
    assert "other hosts' questions" in out and "cli or web?" in out, out
    status = hive("swarm", "status")
    assert swarm.status("a")["operator_key"] in status and "cli or web?" in status, status
    assert "applied on host b" in hive("answer", "--host", "b", str(qid), "cli")
    msgs = assert_ok(bob.call("recv", wait=5.0))["messages"]
    assert [(m["kind"], m["body"]) for m in msgs] == [("answer", "cli")]
    assert_ok(bob.call("ack", ids=[m["id"] for m in msgs]))


def test_sealed_actions(tmp_path: Path) -> None:
    """What a host makes of a sealed action, with no bus: only a recent action from the
    subject's host, to this one, signed by the key pinned for it, of a carried verb."""
    key = load_or_create_key(tmp_path / "a.key")
    assert (tmp_path / "a.key").stat().st_mode & 0o777 == 0o600
    assert public_b64(load_or_create_key(tmp_path / "a.key")) == public_b64(key)  # kept
    pinned = {"a": parse_public(public_b64(key))}
    req = {"cmd": "approve", "id": 3, "payload_sha256": "0" * 64}
    _, data = seal(key, "a", "b", req)
    assert open_sealed(data, "a", "b", pinned)["request"] == req
    # Steering another host's agent (docs/swarm.md): carried as the roster's actions are.
    for verb in ({"cmd": "destroy", "name": "x"}, {"cmd": "stop", "scope": {"agent_names": ["x"]}},
                 {"cmd": "send", "to": "x", "body": "hi"}, {"cmd": "set_paused", "name": "x", "paused": True}):
        assert open_sealed(seal(key, "a", "b", verb)[1], "a", "b", pinned)["request"] == verb
    other = load_or_create_key(tmp_path / "c.key")
    env = json.loads(data)
    cases = {
        "published an action from 'a'": (data, "c", "b", pinned),
        "not this one": (data, "a", "c", pinned),
        "not one this host obeys": (data, "a", "b", {}),
        "bad signature": (seal(other, "a", "b", req)[1], "a", "b", pinned),
        "bad signature ": (json.dumps({**env, "action": {**env["action"], "at": env["action"]["at"] + 1}}).encode(), "a", "b", pinned),
        "carries out": (seal(key, "a", "b", {"cmd": "egress_allow", "name": "x", "rule": "x.example:443"})[1], "a", "b", pinned),
        "carries out  ": (seal(key, "a", "b", {"cmd": "secret_set", "name": "x", "value": "v"})[1], "a", "b", pinned),
        "carries out ": (seal(key, "a", "b", {**req, "host": "b"})[1], "a", "b", pinned),
        "not JSON": (b"[" * 100_000, "a", "b", pinned),
        "bytes; at most": (b" " * (MAX_ACTION_BYTES + 1), "a", "b", pinned),
    }  # fmt: skip
    for needle, (raw, subject_host, here, ops) in cases.items():
        with pytest.raises(ActionError, match=needle.strip()):
            open_sealed(raw, subject_host, here, ops)
    with pytest.raises(ActionError, match="s old"):
        open_sealed(data, "a", "b", pinned, now=time.time() + 3600)
    with pytest.raises(ActionError, match="s old"):
        open_sealed(data, "a", "b", pinned, now=time.time() - 3600)


def test_a_bad_operator_key_in_hive_toml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "hive.toml"
    path.write_text('[swarm]\nhost = "b"\nurls = ["nats://x:4222"]\ncredentials = "/s"\n'
                    'operators = {a = "bm90IGEga2V5"}\n')  # fmt: skip
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "\n" not in str(e.value) and "operators.a" in str(e.value), str(e.value)


@needs_root
def test_the_dashboard_on_a_lists_and_denies_an_approval_on_b(swarm: Swarm) -> None:
    """a's core HTTP (what the gateway serves as the dashboard): ``/api/state`` has b's
    approval with its host; ``POST /deny/{id}`` with ``host=b`` denies it on b."""
    a = swarm.cores["a"]
    token = (a.state_dir / "operator.token").read_text().strip()
    transport = httpx.HTTPTransport(uds=str(a.run_dir / "core.sock"))
    with httpx.Client(transport=transport, base_url="http://core", timeout=30) as web:
        assert web.get("/login", params={"token": token}).status_code == 303
        m = META_CSRF.search(web.get("/").text)
        assert m, "no csrf token on the dashboard"
        # An open cockpit's live stream draws b's new approval (no event on a of its own).
        with web.stream("GET", "/api/dashboard/stream", params={"view": "html"}) as live:
            lines = live.iter_lines()
            assert next(lines) == "event: update"  # every section, once
            asked = assert_ok(swarm.cores["b"].agent_call(
                "bob", "request_approval", kind="custom", description="from the web", payload={}
            ))  # fmt: skip
            aid = asked["id"]
            deadline = time.monotonic() + 10
            for line in lines:
                assert time.monotonic() < deadline, "b's approval was not drawn live on a"
                if f'id="approval-b-{aid}"' in line:
                    break

        def shown() -> dict[str, Any] | None:
            rows = web.get("/api/state").json()["swarm_approvals"]
            return next((r for r in rows if (r["host"], r["id"]) == ("b", aid)), None)

        row = wait_for(shown, timeout=10)
        assert (row["agent"], row["payload_sha256"]) == ("bob", asked["payload_sha256"])
        # The cockpit lists it under "On other hosts", its forms naming the host and sha256.
        page = web.get("/").text
        item = page[page.index(f'id="approval-b-{aid}"'):]
        item = item[: item.index("</li>")]
        assert "from the web" in item and '<input type="hidden" name="host" value="b">' in item
        assert f'name="payload_sha256" value="{asked["payload_sha256"]}"' in item
        r = web.post(f"/deny/{aid}", data={"host": "b", "note": "web says no"},
                     headers={"Origin": "http://core", "X-CSRF-Token": m.group(1),
                              "Accept": "application/json"})  # fmt: skip
        assert r.status_code == 200 and r.json()["applied"] is True, r.text
    bob = swarm.cores["b"].agent("bob")
    msgs = assert_ok(bob.call("recv", wait=5.0))["messages"]
    assert [(m["kind"], m["body"], m["ref"]) for m in msgs] == [
        ("approval", "denied: web says no", aid)
    ]
    assert_ok(bob.call("ack", ids=[m["id"] for m in msgs]))


def _web(swarm: Swarm, host: str) -> tuple[httpx.Client, str]:
    """A logged-in client of ``host``'s core HTTP (what the gateway serves) and its CSRF token."""
    core = swarm.cores[host]
    token = (core.state_dir / "operator.token").read_text().strip()
    transport = httpx.HTTPTransport(uds=str(core.run_dir / "core.sock"))
    web = httpx.Client(transport=transport, base_url="http://core", timeout=30)
    assert web.get("/login", params={"token": token}).status_code == 303
    m = META_CSRF.search(web.get("/").text)
    assert m and m.group(1), "no csrf token on the dashboard"
    return web, m.group(1)


@needs_root
def test_the_dashboards_send_box_carries_a_message_to_bob_on_b(swarm: Swarm) -> None:
    """a's send box has a host field (with [swarm]; the roster's hosts offered): to=bob,
    host=b, posted as the cockpit posts it, is carried to b and lands in bob's inbox
    once; the toast says so. Without the CSRF token, with a host that could not be one
    or one the swarm doesn't know: a one-line refusal, nothing delivered."""
    web, csrf = _web(swarm, "a")
    bob = swarm.cores["b"].agent("bob")
    posted = {"Origin": "http://core", "X-CSRF-Token": csrf, "HX-Request": "true"}
    try:
        wait_for(lambda: '<option value="b">' in web.get("/").text, timeout=10)
        page = web.get("/").text
        form = page[page.index('id="send-form"'):]
        form = form[: form.index("</form>")]
        assert 'name="host" list="swarm-hosts"' in form and "host (empty: a)" in form, form
        datalist = page[page.index('<datalist id="swarm-hosts">'):]
        assert datalist[: datalist.index("</datalist>")].count("<option") == 2  # b and c
        # The row's name leads to bob's page on this host, as the roster shows him.
        assert '<a href="/swarm/b/agent/bob/">bob</a>' in page

        refusals = {
            "missing or wrong CSRF token": ({"Origin": "http://core", "HX-Request": "true"}, "b"),
            "field 'host'": (posted, "B!"),
            "no host 'zz' in the swarm": (posted, "zz"),
        }
        for needle, (headers, host) in refusals.items():
            r = web.post("/api/agents/bob/send", data={"body": "never", "host": host}, headers=headers)
            assert r.status_code in (403, 404, 422) and needle in html.unescape(r.text), (needle, r.text)
            assert r.text.startswith('<div class="toast bad">') and "\n" not in r.text.strip()
        # As the page's script posts it: the to field in the path, the host in the body.
        r = web.post("/api/agents/bob/send", data={"body": "from a's send box", "host": "b"},
                     headers=posted)  # fmt: skip
        assert r.status_code == 200, r.text
        assert "sent the message to bob on host b (carried there, applied)" in r.text, r.text
        # The same form without a script: /api/agents/_/send with to, host and the token.
        r = web.post("/api/agents/_/send", data={"to": "bob", "host": "b", "body": "plain form",
                                                 "csrf_token": csrf},
                     headers={"Origin": "http://core", "Referer": "http://core/"})  # fmt: skip
        assert r.status_code == 303 and r.headers["location"] == "/", r.text
        msgs = assert_ok(bob.call("recv", wait=5.0))["messages"]
        while len(msgs) < 2:
            more = assert_ok(bob.call("recv", wait=5.0))["messages"]
            assert more, msgs
            msgs += more
        assert [(m["kind"], m["from"], m["body"]) for m in msgs] == [
            ("message", "operator", "from a's send box"), ("message", "operator", "plain form")]  # fmt: skip
        assert_ok(bob.call("ack", ids=[m["id"] for m in msgs]))
        assert assert_ok(bob.call("recv", wait=1.0))["messages"] == []  # once each
    finally:
        web.close()


@needs_root
def test_bobs_page_on_a_shows_the_roster_and_steers_him_on_b(swarm: Swarm) -> None:
    """``/swarm/b/agent/bob/`` on a: bob as the roster shows him (state, host b), his
    question to the operator with its answer forms naming host b, the actions carried to
    b; pause from it pauses bob on b, and the page's live stream draws him paused. This
    host's own agent: its own page; no such host or agent: 404."""
    web, csrf = _web(swarm, "a")
    b = swarm.cores["b"]
    bob = b.agent("bob")
    qid = assert_ok(bob.call("ask", to="operator", question="from bob's page?"))["id"]
    posted = {"Origin": "http://core", "X-CSRF-Token": csrf, "Accept": "application/json",
              "Referer": "http://core/swarm/b/agent/bob/"}  # fmt: skip
    try:
        def page() -> str:
            r = web.get("/swarm/b/agent/bob/")
            assert r.status_code == 200, r.text
            return r.text

        def with_question() -> str | None:
            text = page()
            return text if f'id="question-b-{qid}"' in text else None

        text = wait_for(with_question, timeout=10)
        assert '<h1><a href="/">hyperhive</a> / bob <span class="on-host">on host b</span></h1>' in text
        assert 'data-host="b" data-name="bob" data-state="running"' in text, text
        assert '<input type="hidden" name="host" value="b">' in text
        assert 'hx-post="/api/agents/bob/pause" data-action="pause"' in text
        assert "from bob&#39;s page?" in text or "from bob's page?" in text
        assert f'hx-post="/answer-question/{qid}"' in text
        assert 'id="remote-send-form" method="post" action="/api/agents/bob/send"' in text
        # Every host field on the page names b; every action is bob's.
        assert set(re.findall(r'name="host" value="([^"]*)"', text)) == {"b"}
        assert {p.split("/")[3] for p in re.findall(r'hx-post="(/api/agents/[^"]*)"', text)} == {"bob"}
        with web.stream("GET", "/swarm/b/agent/bob/events") as live:
            lines = live.iter_lines()
            assert next(lines) == "event: update"
            assert 'id="remote-agent"' in next(lines)
            r = web.post("/api/agents/bob/pause", data={"host": "b"}, headers=posted)
            assert r.status_code == 200 and r.json()["applied"] is True, r.text
            assert b.status("bob")["paused"] is True
            deadline = time.monotonic() + 10
            for line in lines:  # the roster's new row, drawn live
                assert time.monotonic() < deadline, "bob's pause was not drawn live"
                if 'data-state="paused"' in line:
                    break
        # A plain form post from the page goes back to it.
        r = web.post("/api/agents/bob/resume", data={"host": "b", "csrf_token": csrf},
                     headers={"Origin": "http://core", "Referer": "http://core/swarm/b/agent/bob/"})  # fmt: skip
        assert r.status_code == 303 and r.headers["location"] == "/swarm/b/agent/bob/", r.text
        assert b.status("bob")["paused"] is False

        r = web.get("/swarm/a/agent/alice/")
        assert r.status_code == 303 and r.headers["location"] == "/agent/alice/"
        for path, needle in (("/swarm/zz/agent/bob/", "no host 'zz'"),
                             ("/swarm/b/agent/nobody/", "no agent 'nobody' on host b"),
                             ("/swarm/B/agent/bob/", "no such host or agent"),
                             ("/swarm/b/agent/carol/", "no agent 'carol' on host b")):  # fmt: skip
            r = web.get(path)
            assert r.status_code == 404 and needle in r.text, (path, r.text)
    finally:
        b.host_call("set_paused", name="bob", paused=False)
        assert_ok(b.host_call("answer_question", id=qid, answer="done"))
        msgs = assert_ok(bob.call("recv", wait=2.0))["messages"]
        assert_ok(bob.call("ack", ids=[m["id"] for m in msgs]))
        web.close()


@needs_root
def test_an_action_from_a_remote_agents_page_is_bound_to_the_agent_it_drew(swarm: Swarm) -> None:
    """a's page of ``twin`` on b carries the roster's created_at in its action form; twin
    destroyed and spawned again on b meanwhile, the page's pause (the old created_at) is
    refused and the new twin is left alone; the redrawn page's pause pauses it. The
    dashboard's agents table carries it too."""
    web, csrf = _web(swarm, "a")
    b = swarm.cores["b"]
    posted = {"Origin": "http://core", "X-CSRF-Token": csrf, "Accept": "application/json"}
    drawn = re.compile(r'name="created_at" value="([^"]+)"')

    def incarnation_drawn(path: str) -> float | None:
        r = web.get(path)
        m = drawn.search(r.text) if r.status_code == 200 else None
        return float(m.group(1)) if m else None

    try:
        assert_ok(b.host_call("spawn", name="twin", spec=CHILD))
        old = wait_for(lambda: incarnation_drawn("/swarm/b/agent/twin/"), timeout=10)
        assert_ok(b.host_call("destroy", name="twin"))
        assert_ok(b.host_call("spawn", name="twin", spec=CHILD))
        new = wait_for(lambda: (c := incarnation_drawn("/swarm/b/agent/twin/")) != old and c, timeout=10)
        assert new > old
        r = web.post("/api/agents/twin/pause", data={"host": "b", "created_at": repr(old)}, headers=posted)
        assert r.status_code == 409 and "is not the one acted on" in r.text, r.text
        assert b.status("twin")["paused"] is False
        dashboard = web.get("/", params={"q": "twin"}).text
        assert f'name="created_at" value="{new!r}"' in dashboard
        r = web.post("/api/agents/twin/pause", data={"host": "b", "created_at": repr(new)}, headers=posted)
        assert r.status_code == 200 and r.json()["applied"] is True, r.text
        assert b.status("twin")["paused"] is True
    finally:
        b.host_call("destroy", name="twin")
        web.close()


def _roster_incarnation(hive: Any, host: str, name: str) -> float | None:
    """``name``'s created_at on ``host`` as ``hive status --json`` on a lists it."""
    rows = json.loads(hive("status", "--json"))["swarm_agents"]
    return next((r["created_at"] for r in rows if (r["host"], r["name"]) == (host, name)), None)


def _read_until(proc: subprocess.Popen[bytes], end: bytes, timeout: float = 30) -> bytes:
    """What ``proc`` printed up to and with ``end`` (a prompt: no newline after it)."""
    import select

    assert proc.stdout is not None
    got, deadline = b"", time.monotonic() + timeout
    while end not in got:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([proc.stdout], [], [], left)[0], got
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, got
        got += chunk
    return got


@needs_root
def test_the_cli_binds_a_lifecycle_verb_to_the_agent_it_looked_up(swarm: Swarm) -> None:
    """The CLI's lifecycle verbs for another host's agent bind the incarnation the operator
    saw, as the dashboard's forms do. ``twin`` on b is destroyed and spawned again after
    ``hive status --json`` on a listed it: ``hive pause --host b --created-at <the old one>``
    is refused (409's line), the new twin left alone; with none given the reply says the
    one a's roster bound (the new one). ``hive destroy --host b twin`` asks about the twin
    a's roster shows and binds it: twin spawned again on b while the question waits, the
    yes is refused there and the newest twin runs on (without the binding a's core would
    bind whatever its roster showed when the yes came: the newest, destroyed)."""
    a, b = swarm.cores["a"], swarm.cores["b"]

    def hive(*args: str, ok: bool = True) -> Any:
        done = subprocess.run([str(HIVE), "--run-dir", str(a.run_dir), *args],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert (done.returncode == 0) is ok, (done.stdout, done.stderr)
        return done.stdout if ok else done.stderr

    def respawned(seen: float) -> float:
        assert_ok(b.host_call("destroy", name="twin"))
        assert_ok(b.host_call("spawn", name="twin", spec=CHILD))
        return wait_for(lambda: (c := _roster_incarnation(hive, "b", "twin")) != seen and c, timeout=10)

    try:
        assert_ok(b.host_call("spawn", name="twin", spec=CHILD))
        old = wait_for(lambda: _roster_incarnation(hive, "b", "twin"), timeout=10)
        new = respawned(old)
        err = hive("pause", "--host", "b", "--created-at", repr(old), "twin", ok=False)
        assert "is not the one acted on" in err and err.count("\n") == 1, err
        assert b.status("twin")["paused"] is False
        reply = json.loads(hive("pause", "--host", "b", "--json", "twin"))
        assert reply["applied"] is True and reply["created_at"] == new, reply
        assert b.status("twin")["paused"] is True
        out = hive("resume", "--host", "b", "--created-at", repr(new), "twin")
        assert "resume twin: applied on host b" in out, out
        err = hive("stop", "--host", "b", "--created-at", repr(new), "--created-at", "1", "twin", ok=False)
        assert "give one for each NAME" in err, err
        reply = json.loads(hive("stop", "--host", "b", "--json", "--created-at", repr(new), "twin"))
        assert reply["applied"] is True and reply["created_at"] == {"twin": new}, reply

        asking = subprocess.Popen([str(HIVE), "--run-dir", str(a.run_dir), "destroy", "--host", "b", "twin"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        try:
            prompt = _read_until(asking, b"[y/N]: ").decode()
            assert f"created_at {new!r}" in prompt, prompt
            newest = respawned(new)  # while the operator reads the question
            out, err = asking.communicate(b"y\n", timeout=60)
        finally:
            if asking.poll() is None:
                asking.kill()
        assert asking.returncode == 1 and b"is not the one acted on" in err, (out, err)
        assert b.host_call("agent_status")["ok"] and _roster_incarnation(hive, "b", "twin") == newest
        assert any(r["name"] == "twin" for r in b.host_call("agent_status")["agent_statuses"])
    finally:
        b.host_call("destroy", name="twin")


@needs_root
def test_a_remote_agents_page_says_when_it_is_gone(swarm: Swarm) -> None:
    """An open page of ``onbgone`` on b (a's ``/swarm/b/agent/onbgone/``): destroyed on b,
    its live stream draws that b's roster lists it no more, with nothing to act on; the
    page itself is then a 404."""
    web, _ = _web(swarm, "a")
    b = swarm.cores["b"]
    try:
        assert_ok(b.host_call("spawn", name="onbgone", spec=CHILD))
        wait_for(lambda: web.get("/swarm/b/agent/onbgone/").status_code == 200, timeout=10)
        with web.stream("GET", "/swarm/b/agent/onbgone/events") as live:
            lines = live.iter_lines()
            assert next(lines) == "event: update"
            first = next(lines)
            assert 'data-name="onbgone"' in first and "remote-gone" not in first, first
            assert_ok(b.host_call("destroy", name="onbgone"))
            deadline = time.monotonic() + 10
            for line in lines:
                assert time.monotonic() < deadline, "the page did not say onbgone is gone"
                if 'id="remote-gone"' in line:
                    assert "/api/agents/onbgone/" not in line
                    break
        r = web.get("/swarm/b/agent/onbgone/")
        assert r.status_code == 404 and "no agent 'onbgone' on host b" in r.text, r.text
    finally:
        b.host_call("destroy", name="onbgone")
        web.close()


@needs_root
def test_typing_on_bobs_page_on_a_survives_its_redraws(hive_swarm: Swarm[HiveProcess], browser: Browser) -> None:
    """test_cockpit.py's ``test_typing_survives_a_burst_of_events`` on another host's
    agent's page: a's ``/swarm/b/agent/bob/`` in Debian's chromium (whole hives, a's nginx),
    its section morphed again by each change to b's roster row. An answer half typed into
    bob's question (focused) and a deny note into his approval keep their text and the
    focus through bob's statuses, each drawn live; the page shows what it lacks. Then the
    answer goes with Enter and the denial with its note, each carried to b: bob hears
    both, once, and both items go from the page."""
    a, b = hive_swarm.cores["a"], hive_swarm.cores["b"]
    qid = assert_ok(b.agent_call("bob", "ask", to="operator", question="which tag, from b?"))["id"]
    aid = assert_ok(b.agent_call("bob", "request_approval", kind="custom", description="rotate b's keys",
                                 payload={"rotate": True}))["id"]  # fmt: skip
    wait_for(lambda: listed_on(a, "questions", "swarm_questions", "b", qid), timeout=10)
    wait_for(lambda: listed_on(a, "pending", "swarm_approvals", "b", aid), timeout=10)
    web = Web(a)
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.add_init_script(INSTRUMENT)
    try:
        page = ctx.new_page()
        watch = Watch(page)
        page.goto(web.login_url)
        page.goto(web.url("/swarm/b/agent/bob/"))
        expect(page.locator("#conn")).to_have_text("live", timeout=30_000)  # drawn once more by now
        page.evaluate("window.__sameDocument = true")
        item = page.locator(f"#question-b-{qid}")
        expect(item.locator(".q-text")).to_have_text("which tag, from b?")
        expect(page.locator("#remote-state")).to_have_text("running")
        expect(page.locator("#remote-lacks")).to_contain_text("transcript")
        expect(page.locator(f"#approval-b-{aid} .description")).to_have_text("rotate b's keys")

        note = page.locator(f"#note-b-{aid}")
        note.fill("not this week")
        box = page.locator(f"#answer-b-{qid}")
        box.click()
        box.press_sequentially("v2, after the")
        for i in range(3):  # each a new roster row from b, each a redraw of the section
            assert_ok(b.agent_call("bob", "set_status", text=f"tagging {i}"))
            expect(page.locator("#remote-status-text")).to_have_text(f"tagging {i}", timeout=15_000)
        assert box.input_value() == "v2, after the"
        assert note.input_value() == "not this week"
        assert page.evaluate("document.activeElement && document.activeElement.id") == f"answer-b-{qid}"
        box.press_sequentially(" freeze")  # the focus never left: typing goes on
        assert box.input_value() == "v2, after the freeze"
        page.screenshot(path=str(artifact("swarm-remote-agent-page.png")))

        box.press("Enter")
        expect(page.locator(".toast").filter(has_text=f"answered question {qid}")).to_have_count(1)
        assert hears(b, "bob", kind="answer", ref=qid)["body"] == "v2, after the freeze"
        expect(item).to_have_count(0, timeout=15_000)  # gone from b's roster, drawn live
        page.locator(f"#approval-b-{aid}").get_by_role("button", name="deny").click()
        expect(page.locator(".toast").filter(has_text=f"denied approval {aid}")).to_have_count(1)
        assert "not this week" in hears(b, "bob", kind="approval", ref=aid)["body"]
        expect(page.locator(f"#approval-b-{aid}")).to_have_count(0, timeout=15_000)
        assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
        watch.assert_clean()
    finally:
        ctx.close()
        b.host_call("answer_question", id=qid, answer="done")
        b.host_call("deny", id=aid)
        assert_ok(b.agent_call("bob", "set_status", text=""))

"""The swarm with a whole hive on each test host (docs/swarm.md, issue 18): ``hive up``
(hive-priv, hive-core, the nginx gateway, real cages) in each of the three test hosts'
network namespaces, each host's ``[swarm]`` pointing at its own NATS node first: the
session's ``hive_swarm`` (tests/swarm_fixture.py), shared with the fault runs and the
hostile-host cases. Everything an agent does here it does from inside its cage, on its
own agent socket (``/run/hive/agent.sock``, through ``hive exec --as-agent``), as the
cage tests do.

    a: alice (peers: bob, carol)
    b: bob (peers: alice, bea), bea (peers: bob)
    c: carol (peers: alice)

Host a is the operator's console (b and c pin its operator key)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Browser, expect

from helpers import assert_ok, assert_refused, wait_for
from hive_fixture import HIVE, HiveProcess, children, in_cage, proc_cmdline
from swarm_fixture import CAGED, HIVE_AGENTS, Swarm, heard, hears, listed
from web_fixture import Web, browser  # noqa: F401 (browser: the module's chromium)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and cages need root")


def test_each_host_runs_a_whole_hive_in_its_network_namespace(hive_swarm: Swarm[HiveProcess]) -> None:
    """hive-priv, hive-core and the gateway's nginx of each host's ``hive up`` are in that
    host's network namespace (not the machine's), and its agents' cages are up."""
    def netns(pid: int | None) -> int:
        assert pid is not None
        return os.stat(f"/proc/{pid}/ns/net").st_ino

    machine = netns(os.getpid())
    for h, hive in hive_swarm.cores.items():
        assert hive.proc is not None
        own = os.stat(f"/run/netns/{hive_swarm.net.ns[h]}").st_ino
        nginx = [p for p in children(hive.proc.pid) if "nginx" in " ".join(proc_cmdline(p))]
        assert len(nginx) == 1, nginx
        pids = {"hive up": hive.proc.pid, "hive-priv": hive.priv_pid(), "hive-core": hive.core_pid(),
                "gateway": nginx[0]}  # fmt: skip
        assert {k: netns(p) for k, p in pids.items()} == dict.fromkeys(pids, own) and own != machine
        for name in HIVE_AGENTS[h]:
            assert hive.cage(name)["running"] and hive.cgroup(name).pids(), (h, name)


def test_caged_agents_message_across_hosts_under_the_peer_acl(hive_swarm: Swarm[HiveProcess]) -> None:
    """alice (a) pings bob (b) from her cage; bob's runtime, in its turn in its cage on b,
    answers on its own socket; alice's runtime gets the pong. bea (b) is not alice's peer."""
    a, b = hive_swarm.cores["a"], hive_swarm.cores["b"]
    sent, refused = in_cage(a, "alice", ("send", {"to": "bob", "body": "ping 1"}),
                            ("send", {"to": "bea", "body": "not a peer"}))  # fmt: skip
    assert_ok(sent)
    assert_refused(refused, "not one of alice's peers")
    assert hears(b, "bob", kind="message", body="ping 1")["from"] == "alice"
    assert hears(a, "alice", kind="message", body="pong 1")["from"] == "bob"
    assert not [m for m in heard(b, "bea") if m["body"] == "not a peer"]


def test_operator_on_a_answers_c_and_approves_a_spawn_on_b(hive_swarm: Swarm[HiveProcess]) -> None:
    a, b, c = hive_swarm.cores["a"], hive_swarm.cores["b"], hive_swarm.cores["c"]
    # carol, caged on c, asks the operator; the operator answers with `hive` on a (host.sock).
    [asked] = in_cage(c, "carol", ("ask", {"to": "operator", "question": "ship it?",
                                           "options": ["yes", "no"]}))  # fmt: skip
    qid = assert_ok(asked)["id"]
    row = wait_for(lambda: listed(a, "questions", "swarm_questions", "c", qid), timeout=10)
    assert (row["asker"], row["question"]) == ("carol", "ship it?")
    done = subprocess.run([str(HIVE), "--run-dir", str(a.run_dir), "answer", "--host", "c", str(qid), "yes"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and "applied on host c" in done.stdout, (done.stdout, done.stderr)
    assert hears(c, "carol", kind="answer", ref=qid) == {"kind": "answer", "from": "operator",
                                                         "body": "yes", "ref": qid}  # fmt: skip

    # bob, caged on b, asks for a child; the operator approves it on a; its cage starts on b.
    [asked] = in_cage(b, "bob", ("request_approval", {"kind": "spawn", "description": "a helper",
                                                      "payload": {"name": "bobkid", "spec": CAGED}}))  # fmt: skip
    aid, sha = assert_ok(asked)["id"], asked["payload_sha256"]
    # The operator, logged in to a's gateway (nginx, on a's address), sees it and approves it.
    web = Web(a)
    login = web.login()

    def shown() -> dict[str, Any] | None:
        rows = web.get("/api/state", login=login).json()["swarm_approvals"]
        return next((r for r in rows if (r["host"], r["id"]) == ("b", aid)), None)

    row = wait_for(shown, timeout=10)
    assert (row["agent"], row["kind"], row["payload_sha256"]) == ("bob", "spawn", sha)
    b.agents["bobkid"] = CAGED  # the teardown checks that its cage is emptied too
    r = web.post(f"/approve/{aid}", login, data={"host": "b", "payload_sha256": row["payload_sha256"]})
    assert r.status_code == 200 and r.json()["applied"] is True, r.text
    rows = b.wait_running(["bobkid"])  # its harness, in its cage on b, has connected
    assert rows["bobkid"]["running"] and b.cage("bobkid")["running"], rows["bobkid"]
    assert b.cgroup("bobkid").pids(), "no process in bobkid's cage on b"
    assert "bobkid" not in a.agent_status() and "bobkid" not in c.agent_status()
    [whoami] = in_cage(b, "bobkid", ("whoami", {}))
    assert assert_ok(whoami)["name"] == "bobkid"
    assert hears(b, "bob", kind="approval", ref=aid)["body"] == "approved"


def test_a_host_cut_off_works_alone_and_its_message_arrives_once_after(hive_swarm: Swarm[HiveProcess]) -> None:
    """b cut off the bridge (its NATS node too): bob's send to bea (on b) is delivered and
    taken by bea's runtime; his send to alice (a) waits in b's outbox and arrives once
    after the heal."""
    a, b = hive_swarm.cores["a"], hive_swarm.cores["b"]
    # Every stream and consumer led and current first: a node still catching up from b
    # can't stand for leader, so cutting b then could leave a stream with no quorum.
    hive_swarm.wait_bus_whole()
    hive_swarm.net.cut("b")
    try:
        local, remote = in_cage(b, "bob", ("send", {"to": "bea", "body": "during the cut"}),
                                ("send", {"to": "alice", "body": "across the cut"}))  # fmt: skip
        assert_ok(local), assert_ok(remote)  # both committed on b: the outbox keeps alice's
        assert hears(b, "bea", body="during the cut")["from"] == "bob"
        time.sleep(1.0)  # across the bridge it would take milliseconds
        assert assert_ok(b.host_call("swarm_status"))["swarm"]["outbox_unsent"] == 1
        assert not [m for m in heard(a, "alice") if m["body"] == "across the cut"]
    finally:
        hive_swarm.net.heal("b")
    assert hears(a, "alice", timeout=40, body="across the cut")["from"] == "bob"
    time.sleep(1.0)  # a second copy would come right behind it
    assert len([m for m in heard(a, "alice") if m["body"] == "across the cut"]) == 1


def hive_on(hive: HiveProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``hive`` CLI on ``hive``'s host.sock (the operator's terminal on that host)."""
    done = subprocess.run([str(HIVE), "--run-dir", str(hive.run_dir), *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    return done


def roster_row(hive: HiveProcess, host: str, name: str) -> dict[str, Any] | None:
    """``hive``'s row of agent ``name`` on ``host`` among the other hosts' agents."""
    rows = assert_ok(hive.host_call("agent_status")).get("swarm_agents", [])
    return next((r for r in rows if (r["host"], r["name"]) == (host, name)), None)


def cage_stopped(hive: HiveProcess, name: str) -> None:
    """``name``'s cage on ``hive`` really stopped: hive-priv says so, its cgroup is empty,
    its core shows it stopped."""
    assert not hive.cage(name)["running"] and hive.cgroup(name).pids() == []
    assert not hive.agent_status()[name]["running"]


def test_operator_on_a_steers_bob_on_b_and_destroys_an_agent_on_c(hive_swarm: Swarm[HiveProcess]) -> None:
    """From a's ``hive`` with ``--host``, each verb signed and carried, applied on the
    agent's host: bob's cage on b stopped and started (checked on b), restarted (a new
    harness), paused and resumed; a message to him as the operator, which his runtime takes
    in his cage; a throwaway agent on c destroyed (its cage emptied, its name gone from a's
    roster); c's refusal comes back to a's terminal."""
    a, b, c = hive_swarm.cores["a"], hive_swarm.cores["b"], hive_swarm.cores["c"]
    b.caged("bob").close()  # its caller in his cage ends with the cage: a new one after
    assert "stop bob: applied on host b" in hive_on(a, "stop", "--host", "b", "bob").stdout
    cage_stopped(b, "bob")
    wait_for(lambda: roster_row(a, "b", "bob")["running"] is False, timeout=10)  # type: ignore[index]
    reply = json.loads(hive_on(a, "start", "--host", "b", "bob", "--json").stdout)
    assert (reply["ok"], reply["host"], reply["applied"]) == (True, "b", True), reply
    b.wait_running(["bob"])
    assert b.cage("bob")["running"]
    harness = b.harness_pid("bob")
    # The rest on a's host.sock, as the CLI calls it (a `hive` process is about a second here).
    assert assert_ok(a.host_call("restart", name="bob", host="b"))["applied"]
    b.wait_running(["bob"])
    assert b.harness_pid("bob") != harness
    for paused in (True, False):
        assert assert_ok(a.host_call("set_paused", name="bob", paused=paused, host="b"))["applied"]
        assert b.agent_status()["bob"]["paused"] is paused
    out = hive_on(a, "send", "--host", "b", "bob", "from the console").stdout
    assert "message to bob: applied on host b (message " in out, out
    assert hears(b, "bob", body="from the console") == {
        "kind": "message", "from": "operator", "body": "from the console", "ref": None}  # fmt: skip

    assert_ok(c.host_call("spawn", name="ctmp", spec=CAGED))
    c.wait_running(["ctmp"])
    assert c.cgroup("ctmp").pids()
    wait_for(lambda: roster_row(a, "c", "ctmp"), timeout=10)
    out = hive_on(a, "destroy", "--host", "c", "ctmp", "--yes").stdout
    assert "destroy ctmp: applied on host c" in out, out
    assert "ctmp" not in c.agent_status() and c.cgroup("ctmp").pids() == []
    assert "ctmp" not in assert_ok(c.host_call("list"))["agents"]
    wait_for(lambda: roster_row(a, "c", "ctmp") is None, timeout=10)
    # Gone from the roster: refused here, nothing carried (a stop is bound to the
    # incarnation the roster shows, and it shows none).
    assert_refused(a.host_call("stop", scope={"agent_names": ["ctmp"]}, host="c"),
                   "no agent 'ctmp' on host c in the swarm's roster: nothing was carried")  # fmt: skip


def test_the_remote_rows_stop_button_carries_in_the_browser(
    hive_swarm: Swarm[HiveProcess], browser: Browser
) -> None:
    """On a's dashboard (through a's nginx), bob's row (host b) has the local rows'
    buttons: stop takes two clicks and posts to the same endpoint with ``host=b`` and the
    CSRF token; the toast says it was carried and applied; bob's cage on b stops, and his
    row, redrawn live from the roster, offers start, which starts it again. A message to
    him posted to the send route with ``host=b`` is carried and taken by his runtime."""
    a, b = hive_swarm.cores["a"], hive_swarm.cores["b"]
    b.caged("bob").close()  # its caller in his cage ends with the cage: a new one after
    web = Web(a)
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        page.goto(web.login_url)
        expect(page.locator("#conn")).to_have_text("live", timeout=30_000)
        row = page.locator('#agents tr[data-name="bob"][data-host="b"]')
        expect(row.locator(".state")).to_have_text("running", timeout=15_000)
        stop = row.locator('button[data-action="stop"]')
        stop.click()  # the first click only arms it
        expect(stop).to_have_text("confirm stop")
        assert b.cage("bob")["running"]
        with page.expect_request(lambda r: r.method == "POST"
                                 and urlsplit(r.url).path == "/api/agents/bob/stop") as req:  # fmt: skip
            stop.click()
        csrf = page.locator('meta[name="csrf-token"]').get_attribute("content")
        assert parse_qs(req.value.post_data or "")["host"] == ["b"], req.value.post_data
        assert csrf and req.value.headers.get("x-csrf-token") == csrf
        toasts = page.locator("#toasts")
        expect(toasts).to_contain_text("stopped bob on host b (carried there, applied)", timeout=20_000)
        cage_stopped(b, "bob")
        expect(row.locator(".state")).to_have_text("stopped", timeout=15_000)
        row.locator('button[data-action="start"]').click()
        expect(toasts).to_contain_text("started bob on host b (carried there, applied)", timeout=20_000)
        b.wait_running(["bob"])
        expect(row.locator(".state")).to_have_text("running", timeout=15_000)
    finally:
        ctx.close()
    # The same send route as this host's agents, with the host: carried, b's message id.
    r = web.post("/api/agents/bob/send", web.login(), data={"body": "from a's page", "host": "b"})
    assert r.status_code == 200 and r.json()["applied"] is True and type(r.json()["id"]) is int, r.text
    assert hears(b, "bob", body="from a's page")["from"] == "operator"


def test_the_send_box_and_bobs_page_on_a_in_the_browser(
    hive_swarm: Swarm[HiveProcess], browser: Browser
) -> None:
    """On a's dashboard (through a's nginx), the send box's host field: what the operator
    typed stays through a live redraw and through a refusal (a host the swarm doesn't know:
    a red toast); with host b it is carried, the toast says applied, and bob's runtime on
    b takes it once. bob's row leads to his page on a (host b), whose pause and resume are
    carried to b and drawn live from the roster, with a half-typed message kept; that
    message, sent from his page, reaches him once too."""
    a, b = hive_swarm.cores["a"], hive_swarm.cores["b"]
    web = Web(a)
    ctx = browser.new_context()
    errors: list[str] = []
    try:
        page = ctx.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(web.login_url)
        expect(page.locator("#conn")).to_have_text("live", timeout=30_000)
        form = page.locator("#send-form")
        expect(page.locator('#swarm-hosts option[value="b"]')).to_have_count(1, timeout=15_000)
        form.locator('input[name="to"]').fill("bob")
        form.locator('input[name="host"]').fill("zz")
        form.locator('input[name="body"]').fill("from a's send box")
        # A live redraw of the agents section (alice paused and back on a): nothing typed is lost.
        alice = page.locator('#agents tr[data-name="alice"]:not([data-host]) .state')
        for paused, state in ((True, "paused"), (False, "running")):
            assert_ok(a.host_call("set_paused", name="alice", paused=paused))
            expect(alice).to_have_text(state, timeout=15_000)
        typed = {n: form.locator(f'input[name="{n}"]').input_value() for n in ("to", "host", "body")}
        assert typed == {"to": "bob", "host": "zz", "body": "from a's send box"}, typed
        toasts = page.locator("#toasts")
        form.locator("button").click()
        expect(toasts.locator(".toast.bad")).to_contain_text("no host 'zz' in the swarm", timeout=20_000)
        assert form.locator('input[name="body"]').input_value() == "from a's send box"  # kept to fix
        form.locator('input[name="host"]').fill("b")
        form.locator("button").click()
        expect(toasts).to_contain_text("sent the message to bob on host b (carried there, applied)",
                                       timeout=20_000)  # fmt: skip
        expect(form.locator('input[name="body"]')).to_have_value("")  # done: the form is cleared
        assert hears(b, "bob", body="from a's send box")["from"] == "operator"

        # bob's page on a, from his row.
        page.locator('#agents tr[data-name="bob"][data-host="b"] a[href="/swarm/b/agent/bob/"]').click()
        page.wait_for_url("**/swarm/b/agent/bob/")
        expect(page.locator("h1")).to_contain_text("bob on host b")
        expect(page.locator("#conn")).to_have_text("live", timeout=30_000)
        state = page.locator("#remote-state")
        expect(state).to_have_text("running", timeout=15_000)
        body = page.locator('#remote-send-form input[name="body"]')
        body.fill("from bob's page")
        page.locator('#remote-actions button[data-action="pause"]').click()
        expect(page.locator("#toasts")).to_contain_text("paused bob on host b (carried there, applied)",
                                                        timeout=20_000)  # fmt: skip
        assert b.agent_status()["bob"]["paused"] is True
        expect(state).to_have_text("paused", timeout=15_000)  # the roster's row, drawn live
        assert body.input_value() == "from bob's page"
        # "pause" became "resume" under the pointer: steady.js holds that button's clicks
        # for 0.8 s (a button morphed into another), as it would an agent's change
        page.wait_for_timeout(900)
        page.locator('#remote-actions button[data-action="resume"]').click()
        expect(state).to_have_text("running", timeout=20_000)
        assert b.agent_status()["bob"]["paused"] is False
        page.locator("#remote-send-form button").click()
        expect(page.locator("#toasts")).to_contain_text("sent the message to bob on host b", timeout=20_000)
        assert hears(b, "bob", body="from bob's page")["from"] == "operator"
        assert errors == [], errors
    finally:
        ctx.close()
        b.host_call("set_paused", name="bob", paused=False)
    time.sleep(1)  # anything carried twice would have arrived by now: each was taken once
    bodies = [m.get("body") for m in heard(b, "bob")]
    assert (bodies.count("from a's send box"), bodies.count("from bob's page")) == (1, 1), bodies

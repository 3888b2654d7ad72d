"""The swarm's listings and reads past one host (docs/swarm.md), on the three test hosts
of the session swarm: the other hosts' agents in ``hive status`` and the dashboard (with
their host, unreachable when their host's heartbeat is stale, paged with this host's);
another host's approval and question whole (bound to the approval's payload_sha256); a
spawn approval queued on another host; questions across hosts closed when their asker
or their target is destroyed."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from helpers import assert_ok, assert_refused, wait_for
from hive_fixture import HIVE
from hyperhive.core import cockpit
from hyperhive.core.store.common import canonical_json, sha256_hex
from swarm_faults import drain
from swarm_fixture import Swarm

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

CHILD = {"runtime": "command", "command": ["true"]}


def hive(swarm: Swarm, host: str, *args: str) -> str:
    """The ``hive`` CLI on ``host``'s host.sock."""
    done = subprocess.run([str(HIVE), "--run-dir", str(swarm.cores[host].run_dir), *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


@contextmanager
def dashboard(swarm: Swarm, host: str) -> Iterator[httpx.Client]:
    """A logged-in client of ``host``'s core HTTP (what the gateway serves)."""
    core = swarm.cores[host]
    token = (core.state_dir / "operator.token").read_text().strip()
    transport = httpx.HTTPTransport(uds=str(core.run_dir / "core.sock"))
    with httpx.Client(transport=transport, base_url="http://core", timeout=30) as web:
        assert web.get("/login", params={"token": token}).status_code == 303
        yield web


def test_the_agents_table_pages_every_hosts_agents_together() -> None:
    """1,000 agents here and 2,000 on two other hosts (one of them unreachable): one page
    of 50 by name across hosts, the filter and the search over all of them, the counts
    with ``unreachable``; without a swarm, the states and counts are as before."""
    here = [{"name": f"a{i:04d}", "running": True} for i in range(1000)]
    there = [
        {"name": f"{h}{i:04d}", "host": h, "running": True, "paused": False,
         "status_text": None, "reachable": h == "b"}
        for h in ("b", "c") for i in range(1000)
    ]  # fmt: skip
    table = cockpit.agent_table([*here, *there], cockpit.View(), here="a")
    assert (table.total, table.pages, len(table.rows), table.here) == (3000, 60, 50, "a")
    assert table.counts == {**dict.fromkeys(cockpit.SWARM_STATES, 0), "running": 2000,
                            "unreachable": 1000}  # fmt: skip
    last = cockpit.agent_table([*here, *there], cockpit.View(page=60), here="a")
    assert [r["name"] for r in last.rows][-1] == "c0999" and last.rows[0]["actions"] == []
    down = cockpit.agent_table([*here, *there], cockpit.View(state="unreachable", q="c09"), "a")
    assert (down.matching, down.pages) == (100, 2) and {r["host"] for r in down.rows} == {"c"}
    mixed = cockpit.agent_table([*here, *there], cockpit.View(q="0999"), here="a")
    assert [(r["name"], r.get("host")) for r in mixed.rows] == [
        ("a0999", None), ("b0999", "b"), ("c0999", "c")]  # fmt: skip
    # Another host's agent: the same actions (carried there), none while it is unreachable.
    acts = ["pause", "interrupt", "restart", "stop", "destroy"]
    assert [r["actions"] for r in mixed.rows] == [acts, acts, []]
    alone = cockpit.agent_table(here, cockpit.View())
    assert alone.here is None and list(alone.counts) == list(cockpit.STATES)


def test_the_toast_of_a_carried_action_says_so() -> None:
    """The cockpit's toast for an action carried to another host: applied there, or carried
    and not applied yet; this host's own actions say what they did, as before."""
    words = cockpit.said("stop", name="bob")
    assert cockpit.carried(words, {"ok": True, "stopped": ["bob"]}) == "stopped bob"
    applied = {"host": "b", "action": "f" * 32, "applied": True}
    assert cockpit.carried(words, applied) == "stopped bob on host b (carried there, applied)"
    waiting = cockpit.carried(words, {**applied, "applied": False})
    assert waiting.startswith("carried to host b, not applied yet: stopped bob"), waiting


def elsewhere(swarm: Swarm, host: str) -> dict[tuple[str, str], dict[str, Any]]:
    """``host``'s ``agent_status`` rows of the other hosts' agents, by (host, name)."""
    rows = assert_ok(swarm.cores[host].host_call("agent_status")).get("swarm_agents", [])
    return {(r["host"], r["name"]): r for r in rows}


@needs_root
def test_other_hosts_agents_in_status_and_on_the_dashboard(swarm: Swarm) -> None:
    """a's ``hive status`` (and --json) and /api/state list bob (b) and carol (c) with
    their host; the cockpit's table pages and filters them with a's own; c's core stopped
    (SIGSTOP) past the heartbeat's 5 s: carol shows unreachable (her page on a too, with no
    action), then back."""
    wait_for(lambda: len(elsewhere(swarm, "a")) >= 2, timeout=10)
    rows = elsewhere(swarm, "a")
    assert ("a", "alice") not in rows  # a's own are the agent_statuses, as without a swarm
    bob = rows[("b", "bob")]
    assert bob["reachable"] is True and set(bob) >= {"running", "paused", "status_text"}, bob
    out = hive(swarm, "a", "status")
    assert "other hosts' agents" in out and "carol" in out and "alice" in out, out
    as_json = json.loads(hive(swarm, "a", "status", "--json"))
    assert {(r["host"], r["name"]) for r in as_json["swarm_agents"]} >= {("b", "bob"), ("c", "carol")}
    assert [a["name"] for a in as_json["agent_statuses"]] == ["alice"]

    with dashboard(swarm, "a") as web:
        state = web.get("/api/state").json()
        assert [a["name"] for a in state["agents"]] == ["alice"]
        assert {(r["host"], r["name"]) for r in state["swarm_agents"]} >= {("b", "bob"), ("c", "carol")}
        # The cockpit's table: one paging and filter over every host's agents.
        page = web.get("/", params={"q": "o"}).text  # bob and carol, not alice
        assert 'id="agent-bob@b"' in page and 'id="agent-carol@c"' in page
        assert 'id="agent-alice"' not in page and "<th>host</th>" in page
        row = page[page.index('id="agent-bob@b"'):]
        row = row[: row.index("</tr>")]
        assert '<td class="host">b</td>' in row
        # Its actions post to the same endpoints, the host in the form (carried there).
        assert '<input type="hidden" name="host" value="b">' in row, row
        assert 'hx-post="/api/agents/bob/stop" data-action="stop" data-confirm="stop"' in row

        core_c = swarm.cores["c"]
        assert core_c.proc is not None
        core_c.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: not elsewhere(swarm, "a")[("c", "carol")]["reachable"], timeout=15)
            assert elsewhere(swarm, "a")[("b", "bob")]["reachable"]
            assert "unreachable" in hive(swarm, "a", "status")
            page = web.get("/", params={"state": "unreachable"}).text
            assert 'id="agent-carol@c"' in page and 'id="agent-bob@b"' not in page
            assert "unreachable 1" in page
            # carol's page on a says so, from her last roster row, with no action to carry.
            page = web.get("/swarm/c/agent/carol/").text
            assert 'id="remote-unreachable"' in page and "host c is unreachable" in page, page
            assert 'data-state="unreachable"' in page and "/api/agents/carol/stop" not in page
        finally:
            core_c.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: elsewhere(swarm, "a")[("c", "carol")]["reachable"], timeout=15)


@needs_root
def test_another_hosts_approval_and_question_whole(swarm: Swarm) -> None:
    """An approval on b whose payload the roster cuts, and a question on c whose text it
    cuts: a's host.sock, CLI and HTTP give them whole, asked of their host; the payload
    shown is the one its sha256 (the roster's, what an approval from a is bound to) is of."""
    bob = swarm.cores["b"].agent("bob")
    payload = {"notes": ["x" * 100 for _ in range(120)], "end": "the last word"}
    asked = assert_ok(bob.call("request_approval", kind="custom", description="long one",
                               payload=payload))  # fmt: skip
    aid, sha = asked["id"], asked["payload_sha256"]
    assert sha == sha256_hex(canonical_json(payload))
    carol = swarm.cores["c"].agent("carol")
    text = "why? " * 2000  # 10,000 characters: the roster carries the first 4,096
    qid = assert_ok(carol.call("ask", to="operator", question=text))["id"]
    a = swarm.cores["a"]
    try:

        def listed(cmd: str, key: str, host: str, rid: int) -> dict[str, Any] | None:
            rows = assert_ok(a.host_call(cmd)).get(key, [])
            return next((r for r in rows if (r["host"], r["id"]) == (host, rid)), None)

        row = wait_for(lambda: listed("pending", "swarm_approvals", "b", aid), timeout=10)
        assert row["payload"] != payload and row["truncated"]  # the roster's summary
        whole = assert_ok(a.host_call("show_approval", id=aid, host="b"))["approval"]
        assert (whole["host"], whole["payload"], whole["payload_sha256"]) == ("b", payload, sha)
        assert whole["truncated"] is None and whole["description"] == "long one"
        out = hive(swarm, "a", "show", "approval", "--host", "b", str(aid))
        assert "the last word" in out and sha in out and "host: b" in out, out

        q = wait_for(lambda: listed("questions", "swarm_questions", "c", qid), timeout=10)
        assert len(q["question"]) < len(text)
        got = assert_ok(a.host_call("show_question", id=qid, host="c"))["question"]
        assert (got["host"], got["asker"], got["question"]) == ("c", "carol", text)
        with dashboard(swarm, "a") as web:
            r = web.get(f"/api/questions/{qid}", params={"host": "c"})
            assert r.status_code == 200 and r.json()["question"]["question"] == text, r.text
            r = web.get(f"/api/approvals/{aid}", params={"host": "b"})
            assert r.json()["approval"]["payload"] == payload, r.text
            assert web.get(f"/api/approvals/{aid}", params={"host": "B!"}).status_code == 422
            # The cockpit's "show all" of a cut row on another host asks that host.
            page = web.get("/").text
            link = f'href="/cockpit/approvals/{aid}?host=b"'
            assert link in page and f'href="/cockpit/questions/{qid}?host=c"' in page
            shown = web.get(f"/cockpit/approvals/{aid}", params={"host": "b"}).text
            assert "the last word" in shown and "long one" in shown
        # Only what the host's roster lists: not another host's, not a resolved one, not
        # a host the swarm doesn't know.
        assert_refused(a.host_call("show_approval", id=aid, host="c"), "host c:", "no pending")
        assert_refused(a.host_call("show_question", id=qid, host="zz"), "no host 'zz'")
        # This host's own name: read here, as without a host.
        assert_refused(a.host_call("show_question", id=10**12, host="a"), "no question 1000000000000")
        # Approved with the sha256 that was shown: applied on b.
        reply = assert_ok(a.host_call("deny", id=aid, host="b", payload_sha256=whole["payload_sha256"]))
        assert reply["applied"] is True
        assert_refused(a.host_call("show_approval", id=aid, host="b"), "host b:", "no pending")
    finally:
        swarm.cores["b"].host_call("deny", id=aid)
        swarm.cores["c"].host_call("answer_question", id=qid, answer="done")
    for m in (bob, carol):  # what they were told: read, so the next test starts empty
        msgs = assert_ok(m.call("recv", wait=2.0))["messages"]
        assert_ok(m.call("ack", ids=[x["id"] for x in msgs]))


@needs_root
def test_request_spawn_on_another_host(swarm: Swarm) -> None:
    """``hive request-spawn --host b``: the operator's spawn approval is queued on b (signed
    and carried), listed on a, and approved from a: the agent is spawned on b."""
    out = hive(swarm, "a", "request-spawn", "--host", "b", "--command", "true",
               "--description", "a reviewer for b", "fromreq")  # fmt: skip
    assert "on host b" in out, out
    aid = int(out.split("spawn approval ")[1].split()[0])
    try:
        pending = assert_ok(swarm.cores["b"].host_call("pending"))["approvals"]
        mine = [p for p in pending if p["id"] == aid]
        assert [(p["agent"], p["kind"], p["payload"]["name"]) for p in mine] == [
            ("operator", "spawn", "fromreq")
        ]
        reply = assert_ok(swarm.cores["a"].host_call(
            "request_spawn", name="fromreq2", spec=CHILD, host="b"))  # fmt: skip
        assert reply["applied"] is True and len(reply["payload_sha256"]) == 64, reply
        assert_ok(swarm.cores["b"].host_call("deny", id=reply["id"]))
        wait_for(lambda: any(r["id"] == aid for r in assert_ok(
            swarm.cores["a"].host_call("pending")).get("swarm_approvals", [])), timeout=10)  # fmt: skip
        assert_ok(swarm.cores["a"].host_call("approve", id=aid, host="b"))
        assert "fromreq" in assert_ok(swarm.cores["b"].host_call("list"))["agents"]
        assert "fromreq" not in assert_ok(swarm.cores["a"].host_call("list"))["agents"]
        # A name b already holds: b refuses to queue it.
        assert_refused(swarm.cores["a"].host_call("request_spawn", name="bob", spec=CHILD,
                                                  host="b"), "host b:")  # fmt: skip
    finally:
        swarm.cores["b"].host_call("deny", id=aid)
        swarm.cores["b"].host_call("destroy", name="fromreq")
    wait_for(lambda: "fromreq" not in {r["name"] for r in swarm.status("a")["agents"]}, timeout=10)


def cancelled_on(swarm: Swarm, host: str, qid: int) -> bool:
    """Whether question ``qid`` is cancelled in ``host``'s store (read only)."""
    db = swarm.cores[host].state_dir / "hive.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT cancelled FROM questions WHERE id=?", (qid,)).fetchone()
    return bool(row and row[0])


@needs_root
def test_destroying_an_asker_or_a_target_closes_questions_across_hosts(swarm: Swarm) -> None:
    """askr (a) asks bob (b) and tgt (b). tgt destroyed on b: askr is told its question
    was cancelled. askr destroyed on a: b cancels its copy of the question to bob, which
    bob can then no longer answer."""
    a, b = swarm.cores["a"], swarm.cores["b"]
    assert_ok(b.host_call("spawn", name="tgt", spec=CHILD))
    assert_ok(a.host_call("spawn", name="askr", spec={**CHILD, "peers": ["bob", "tgt"]}))
    try:
        wait_for(lambda: ("b", "tgt") in elsewhere(swarm, "a"), timeout=10)
        askr = a.agent("askr")
        q_bob = assert_ok(askr.call("ask", to="bob", question="still there?"))["id"]
        q_tgt = assert_ok(askr.call("ask", to="tgt", question="and you?"))["id"]
        [on_b] = drain(swarm, "b", "bob", 1)
        drain(swarm, "b", "tgt", 1)

        assert_ok(b.host_call("destroy", name="tgt"))
        [told] = drain(swarm, "a", "askr", 1)
        assert (told["kind"], told["from"], told["ref"]) == ("answer", "tgt", q_tgt)
        assert told["body"] == "cancelled: tgt was destroyed on host b"
        assert [q["id"] for q in assert_ok(askr.call("loose_ends"))["questions"]] == [q_bob]

        assert_ok(a.host_call("destroy", name="askr"))
        wait_for(lambda: cancelled_on(swarm, "b", on_b["ref"]), timeout=10)
        assert_refused(swarm.cores["b"].agent("bob").call("answer", id=on_b["ref"], answer="yes"),
                       "cancelled")  # fmt: skip
        # Neither name was taken again by the items that closed their questions.
        wait_for(lambda: not {"askr", "tgt"} & {r["name"] for r in swarm.status("c")["agents"]},
                 timeout=10)  # fmt: skip
    finally:
        b.host_call("destroy", name="tgt")
        a.host_call("destroy", name="askr")

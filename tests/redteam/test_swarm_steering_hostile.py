"""A compromised host steers another host's agent (docs/swarm.md, "Steering another host's
agents"): host c, with its own NATS credentials and its own operator key, forges a
carried stop or destroy of bob (on b), and a's genuine ones are replayed. b obeys only
a's operator (it pins a's key). c's, on its own subject, are never read by b (it pulls
only its pinned operators' hosts' consumers: red team round 11); a's replayed ones are
refused before anything is done, counted in b's ``actions_refused``: bob's cage keeps running, the same harness process in it, his row
and his name stay. The whole hives of the session (``hive_swarm``: real cages); the
operator's own calls on the hosts' host.sock."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from typing import Any

import pytest

from helpers import assert_ok, wait_for
from hive_fixture import HIVE, HiveProcess
from hyperhive.swarm import subjects as s
from hyperhive.swarm.operator import KEY_FILE
from hyperhive.swarm.signing import load_or_create_key, seal
from redteam.test_swarm_hostile import as_host_c, violation
from redteam.test_swarm_operator_hostile import (
    publish_all,
    refused_on_b,
    sealed,
    unread_before,
    unread_on_b,
)
from swarm_fixture import Swarm

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and cages need root"),
    pytest.mark.attack(
        "swarm-remote-steering",
        ref="issue 18: the operator steers other hosts' agents; a compromised host can't",
    ),
]

STOP_BOB = {"cmd": "stop", "scope": {"agent_names": ["bob"]}, "graceful": False}
DESTROY_BOB = {"cmd": "destroy", "name": "bob"}


def untouched(swarm: Swarm[HiveProcess], harness: int) -> None:
    """bob on b as he was: his cage running with the same harness, listed, not stopped."""
    b = swarm.cores["b"]
    assert b.cage("bob")["running"] and b.harness_pid("bob") == harness
    assert b.agent_status()["bob"]["running"]
    assert "bob" in assert_ok(b.host_call("list"))["agents"]


def test_host_c_cannot_stop_or_destroy_bob_on_b(hive_swarm: Swarm[HiveProcess]) -> None:
    """On its own subject (all NATS lets it): a stop and a destroy of bob signed with c's own
    key (b doesn't pin it), a destroy signed with it but saying it is from a, and a's
    genuine signed destroy relayed; on a's subject: a permissions violation."""
    b = hive_swarm.cores["b"]
    b.wait_running(["bob"])
    harness = b.harness_pid("bob")
    c_key = load_or_create_key(hive_swarm.cores["c"].state_dir / KEY_FILE)
    a_key = load_or_create_key(hive_swarm.operator_key)  # type: ignore[arg-type]
    before = unread_before(hive_swarm)
    subject = s.op_subject("b", "c")
    forged = [
        seal(c_key, "c", "b", STOP_BOB)[1],
        seal(c_key, "c", "b", DESTROY_BOB)[1],
        seal(c_key, "a", "b", DESTROY_BOB)[1],
        seal(a_key, "a", "b", DESTROY_BOB)[1],  # a's, relayed (c can't read a's; say it got one)
    ]
    assert publish_all(hive_swarm, "c", [(subject, data) for data in forged]) == []
    unread_on_b(hive_swarm, before, len(forged))
    untouched(hive_swarm, harness)

    async def as_a(nc: Any) -> None:
        await nc.publish(s.op_subject("b", "a"), seal(a_key, "a", "b", STOP_BOB)[1])
        await nc.flush()

    violation(as_host_c(hive_swarm, as_a), f'publish to "{s.op_subject("b", "a")}"')
    time.sleep(0.5)  # had b taken it, its cage would be stopping by now
    unread_on_b(hive_swarm, before, len(forged))
    untouched(hive_swarm, harness)


def test_a_replayed_stop_or_a_stale_destroy_does_nothing(hive_swarm: Swarm[HiveProcess]) -> None:
    """a's genuine stop of bob, published on a's subject (a's stolen NATS credentials, or
    the bus replaying it): applied once, bob's cage stops; started again on b. The same
    bytes again with a fresh ``Nats-Msg-Id``, and a genuine destroy signed ten minutes
    ago: refused, and bob keeps running. a's genuine destroys of bob bound to no
    incarnation, or to another than his: refused there (an outcome each), bob stays."""
    b = hive_swarm.cores["b"]
    b.caged("bob").close()  # its caller in his cage ends with the cage: a new one after
    a_key = load_or_create_key(hive_swarm.operator_key)  # type: ignore[arg-type]
    born = created_at(b, "bob")
    stop = seal(a_key, "a", "b", {**STOP_BOB, "created_at": {"bob": born}})[1]
    stale = sealed(a_key, "a", "b", {**DESTROY_BOB, "created_at": born}, time.time() - 600)
    subject = s.op_subject("b", "a")

    def publish(*items: tuple[bytes, str]) -> None:
        async def attack(nc: Any) -> None:
            js = nc.jetstream()
            for data, msg_id in items:
                await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})

        assert as_host_c(hive_swarm, attack, "a", settle=0) == []  # each acked by JetStream

    tag = os.urandom(4).hex()
    applied = hive_swarm.status("b")["actions_applied"]
    publish((stop, f"first-{tag}"))
    wait_for(lambda: hive_swarm.status("b")["actions_applied"] == applied + 1, timeout=15)
    assert not b.cage("bob")["running"] and b.cgroup("bob").pids() == []
    assert_ok(b.host_call("start", scope={"agent_names": ["bob"]}))
    b.wait_running(["bob"])
    harness = b.harness_pid("bob")
    before = hive_swarm.status("b")["actions_refused"]
    publish((stop, f"again-{tag}"), (stale, f"stale-{tag}"))
    refused_on_b(hive_swarm, before, 2)
    assert hive_swarm.status("b")["actions_applied"] == applied + 1
    untouched(hive_swarm, harness)
    # a's genuine destroys, fresh, but bound to no incarnation of bob or to another (one
    # destroyed since, say): opened, then refused as their outcomes; bob stays.
    unbound = seal(a_key, "a", "b", DESTROY_BOB)[1]
    earlier = seal(a_key, "a", "b", {**DESTROY_BOB, "created_at": born - 1.0})[1]
    publish((unbound, f"unbound-{tag}"), (earlier, f"earlier-{tag}"))
    wait_for(lambda: hive_swarm.status("b")["actions_applied"] == applied + 3, timeout=15)
    assert hive_swarm.status("b")["actions_refused"] == before + 2
    untouched(hive_swarm, harness)
    assert created_at(b, "bob") == born


def created_at(hive: HiveProcess, name: str) -> float:
    """Agent ``name``'s incarnation in ``hive``'s store, as committed."""
    db = sqlite3.connect(f"file:{hive.state_dir / 'hive.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT created_at FROM agents WHERE name=?", (name,)).fetchone()
    finally:
        db.close()
    assert row is not None, name
    return float(row[0])


def test_cs_rows_make_a_s_cli_destroy_ask_in_one_line(swarm: Swarm) -> None:
    """``hive destroy --host c NAME`` on a asks about the row a's roster shows for c's
    agent, and c writes that row: a created_at of 1e300 (finite, ≥ 0: a number a store
    could hold, and no date) and one of ``true`` (none). The question is one line, with
    the number and no date; the other is refused in one line (no created_at: nothing
    carried); neither is a traceback."""
    rows = {"r18far": b"1e300", "r18none": b"true"}
    keys = {n: s.row_key("c", n) for n in rows}

    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        for name, created in rows.items():
            row = (b'{"name": "%s", "host": "c", "running": true, "paused": false,'
                   b' "status_text": "x", "created_at": %s}') % (name.encode(), created)  # fmt: skip
            await js.publish(s.kv_subject("c", keys[name]), row)

    async def tidy(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        for key in keys.values():
            await js.publish(s.kv_subject("c", key), b"", headers={"KV-Operation": "DEL"})

    a = swarm.cores["a"]

    def destroy(name: str, answer: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(HIVE), "--run-dir", str(a.run_dir), "destroy", "--host", "c", name],
                              input=answer, capture_output=True, text=True, timeout=60)  # fmt: skip

    try:
        assert as_host_c(swarm, attack, settle=0) == []
        listed = lambda: {r["name"] for r in swarm.status("a")["agents"] if r["host"] == "c"}  # noqa: E731
        wait_for(lambda: set(rows) <= listed(), timeout=15)
        far = destroy("r18far", "n\n")
        assert far.returncode == 1 and "Traceback" not in far.stderr, far
        assert far.stdout.startswith("destroy agent r18far on host c (created_at 1e+300)? [y/N]"), far
        assert "\n" not in far.stdout, far  # the question alone, on its line
        none = destroy("r18none", "y\n")
        assert none.returncode == 1 and "Traceback" not in none.stderr, none
        assert none.stderr.count("\n") == 1 and "has no created_at" in none.stderr, none
    finally:
        as_host_c(swarm, tidy, settle=0)

"""The operator's actions as the host they are for carries them out (docs/swarm.md, "The
operator's roster and actions": "Carried out concurrently, and once"), on the session's
whole-hive swarm (each host ``hive up`` in its own network namespace, real cages):

- a stop of an agent on b whose runtime takes its time to exit doesn't hold up an
  answer to another agent on b (one lane per agent, the lanes at once);
- b's hive-core killed (SIGKILL) right after a spawn carried from a is committed there,
  before its outcome is recorded or the action acked: after the restart the bus hands
  the same action over again, b finds it applied and publishes that, and spawns nothing
  twice (a second spawn would be b's refusal "already exists");
- a lifecycle action is bound to the agent's incarnation (its ``created_at`` as the
  roster showed it): one bound to an agent destroyed and spawned again under its name
  since is refused, reported back, and the new agent is left alone;
- b's core killed (fault points, ``hyperhive/faults.py``) right after a carried approval
  of a spawn commits, and right after it is applied: the agent is spawned once and runs;
- b's core killed right after a carried restart or destroy is applied, before its
  outcome is recorded: neither is carried out again (the cage is restarted once; the
  destroy's outcome is what it did, not "no agent named ...")."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import nats
import pytest

from helpers import assert_ok, wait_for
from hive_fixture import HiveProcess, proc_cmdline
from hyperhive.swarm import subjects as s
from swarm_faults import drain
from swarm_fixture import CAGED, Swarm
from swarm_fixture import listed as listed_on

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

# A turn that ignores SIGTERM (inherited by its sleep): stopping the cage waits out the
# graceful 5 s before SIGKILL.
STUBBORN = {"runtime": "command", "command": ["sh", "-c", "trap '' TERM; sleep 60"]}


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """``fn`` run on a thread; its reply and how long it took, in the dict once joined."""
    out: dict[str, Any] = {}

    def go() -> None:
        t0 = time.monotonic()
        out["reply"] = fn()
        out["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=go)
    t.start()
    return t, out


def flag(hive: HiveProcess, name: str, column: str) -> Any:
    """Agent ``name``'s ``column`` in ``hive``'s store, read as it is committed."""
    db = sqlite3.connect(f"file:{hive.state_dir / 'hive.db'}?mode=ro", uri=True)
    try:
        row = db.execute(f"SELECT {column} FROM agents WHERE name=?", (name,)).fetchone()
    finally:
        db.close()
    return None if row is None else row[0]


def turn_running(hive: HiveProcess, name: str) -> bool:
    """A ``sleep`` of ``name``'s runtime is running in its cage."""
    return any(proc_cmdline(pid)[:1] == ["sleep"] for pid in hive.cage_procs(name))


def test_a_slow_stop_on_b_does_not_hold_up_an_answer_to_another_agent_there(
    hives: Swarm[HiveProcess],
) -> None:
    a, b = hives.cores["a"], hives.cores["b"]
    assert_ok(b.host_call("spawn", name="slowb", spec=STUBBORN))
    try:
        b.wait_running(["slowb"])
        assert_ok(b.host_call("send", to="slowb", body="take a turn"))
        wait_for(lambda: turn_running(b, "slowb"), timeout=20)
        wait_for(lambda: any(r["host"] == "b" and r["name"] == "slowb"
                             for r in hives.status("a")["agents"]), timeout=10)  # fmt: skip
        qid = assert_ok(b.caged("bea").call("ask", to="operator", question="go on?"))["id"]
        wait_for(lambda: listed_on(a, "questions", "swarm_questions", "b", qid), timeout=10)

        counts = hives.status("b")
        stop, stopped = in_thread(lambda: a.host_call(
            "stop", scope={"agent_names": ["slowb"]}, host="b"))  # fmt: skip
        # b took the stop (its store says slowb is stopped: the stop's first step), and
        # its cage is still being waited out.
        wait_for(lambda: flag(b, "slowb", "stopped"), timeout=10)
        assert turn_running(b, "slowb")
        t0 = time.monotonic()
        answer = assert_ok(a.host_call("answer_question", id=qid, answer="yes", host="b"))
        answered_in = time.monotonic() - t0
        stop.join(30)
        print(f"answer carried and applied in {answered_in:.3f} s while the stop took"
              f" {stopped['seconds']:.2f} s")
        assert answer["applied"] is True, answer
        assert assert_ok(stopped["reply"])["applied"] is True, stopped
        assert stopped["seconds"] > 4.0  # it was slow (5 s of grace), and the answer didn't wait
        assert answered_in < 2.5
        # The stop outlasted the consumer's ack wait (5 s): carried out once all the same
        # (b tells the bus it is in progress, and ignores a delivery of it meanwhile), and
        # nothing refused (a delivery again is no replay).
        # (b counts an action applied before it publishes the outcome and acks it; a's
        # reply comes with the outcome, so b may still be acking the stop.)
        after = wait_for(lambda: (st := hives.status("b"))["actions_carrying"] == 0 and st, timeout=10)
        assert after["actions_applied"] == counts["actions_applied"] + 2
        assert after["actions_refused"] == counts["actions_refused"]
        [got] = drain(hives, "b", "bea", 1, timeout=10)
        assert (got["kind"], got["body"], got["ref"]) == ("answer", "yes", qid)
    finally:
        assert_ok(b.host_call("destroy", name="slowb"))


async def result_on_bus(swarm: Swarm[HiveProcess], host: str, action: str) -> dict[str, Any] | None:
    """``host``'s outcome of host a's ``action`` in its roster bucket (read as the admin)."""
    user, password = swarm.net.admin()
    nc = await nats.connect([swarm.net.url("a")], user=user, password=password, connect_timeout=5)
    try:
        kv = await nc.jetstream().key_value(s.bucket(host))
        try:
            entry = await kv.get(s.result_key(host, "a", action))
        except Exception:
            return None
        return json.loads(entry.value or b"null")
    finally:
        await nc.close()


def test_kill9_of_b_right_after_a_carried_spawn_is_applied_spawns_once(
    hives: Swarm[HiveProcess],
) -> None:
    a, b = hives.cores["a"], hives.cores["b"]
    old = b.core_pid()
    assert old is not None
    db = sqlite3.connect(f"file:{b.state_dir / 'hive.db'}?mode=ro", uri=True)
    created = "agent kspawn created"
    before = b.log_path.read_text(errors="replace").count(created)
    spawn, spawned = in_thread(lambda: a.host_call("spawn", name="kspawn", spec=CAGED, host="b"))
    try:
        # The spawn's row is committed on b (and with it, in the same transaction, the
        # action marked applied); its cage is still being made: b dies now.
        deadline = time.monotonic() + 20
        while db.execute("SELECT 1 FROM agents WHERE name='kspawn'").fetchone() is None:
            assert time.monotonic() < deadline, "the spawn never reached b's store"
            time.sleep(0.002)
        os.kill(old, signal.SIGKILL)
        db.close()
        spawn.join(30)
        reply = assert_ok(spawned["reply"])
        action = reply["action"]
        wait_for(lambda: b.core_pid() not in (None, old), timeout=30)
        b.wait_running()
        # Delivered again once b is back (after the consumer's ack wait): found applied,
        # not spawned again; its outcome published where a looks for it.
        wait_for(lambda: hives.status("b")["actions_recovered"] == 1, timeout=30)
        outcome = wait_for(lambda: asyncio.run(result_on_bus(hives, "b", action)), timeout=10)
        print(f"a's reply: {reply}; b's outcome after its restart: {outcome}")
        assert outcome["ok"] is True, outcome
        assert reply["applied"] in (True, False)  # a waited 10 s: b's restart may be longer
        if reply["applied"] is False:
            assert hives.status("b")["actions_applied"] == 0  # nothing carried out again
        # Created once: its log line follows the row's commit, and the kill may come
        # between (on a loaded machine it did), so at most once; a second spawn would
        # have been b's refusal "already exists", not the outcome above.
        assert b.log_path.read_text(errors="replace").count(created) <= before + 1
        assert hives.status("b")["actions_applied"] == 0  # nothing carried out again
        b.wait_running(["kspawn"])  # started by b's restart (its row says it should run)
    finally:
        spawn.join(30)
        wait_for(lambda: b.core_pid() is not None, timeout=30)
        b.wait_running()
        assert_ok(b.host_call("destroy", name="kspawn"))


# -- bound to the agent's incarnation; applied once across a kill -9 ------------------


def created_at_on(swarm: Swarm[HiveProcess], host: str, name: str) -> float | None:
    """Agent ``name`` of ``host`` as host a's roster shows it: its created_at."""
    for row in swarm.status("a")["agents"]:
        if (row["host"], row["name"]) == (host, name):
            return row.get("created_at")  # type: ignore[no-any-return]
    return None


def fault(hive: HiveProcess, point: str) -> None:
    """``hive``'s core kills itself at ``point`` next time it passes it (faults.py)."""
    path = hive.state_dir / "fault.kill"
    path.write_text(point)
    os.chown(path, *hive.core_ids)  # its own to remove (the directory is sticky)


def cage_pid(hive: HiveProcess, name: str) -> int:
    return int(hive.cage(name)["pid"])


def nothing_left_for(swarm: Swarm[HiveProcess], host: str, from_host: str) -> bool:
    """``host``'s consumer of ``from_host``'s actions holds nothing: none waiting, none
    handed out and not yet acked (read as the admin)."""

    async def go() -> bool:
        user, password = swarm.net.admin()
        nc = await nats.connect([swarm.net.url("a")], user=user, password=password, connect_timeout=5)
        try:
            info = await nc.jetstream(timeout=10).consumer_info(s.OPS_STREAM, s.ops_consumer(host, from_host))
            return info.num_pending == 0 and info.num_ack_pending == 0
        finally:
            await nc.close()

    return asyncio.run(go())


def recovered_after_kill(swarm: Swarm[HiveProcess], old_pid: int) -> None:
    """b's core was killed (it was ``old_pid``) and is back, and the action it was carrying
    was delivered to it again and found applied (not carried out again)."""
    b = swarm.cores["b"]
    wait_for(lambda: b.core_pid() not in (None, old_pid), timeout=30)
    b.wait_running()
    wait_for(lambda: swarm.status("b")["actions_recovered"] == 1, timeout=30)
    assert swarm.status("b")["actions_applied"] == 0  # nothing carried out again


def test_a_roster_rows_created_at_is_kept_only_as_a_number_a_store_could_hold() -> None:
    """Another host's row's ``created_at`` (what the operator's lifecycle actions on its
    agent are bound to) is the writing host's to say: kept only as a finite number >= 0,
    else None (and an action on that agent is refused on this host, nothing carried)."""
    from hyperhive.swarm.bridge import incarnation

    assert incarnation(1764739000.5) == 1764739000.5
    assert incarnation(0) == 0.0 and isinstance(incarnation(7), float)
    for bad in (True, False, None, "1764739000.5", -1.0, float("nan"), float("inf"), [1.0], {"a": 1}):
        assert incarnation(bad) is None, bad


def test_a_carried_lifecycle_action_bound_to_an_earlier_incarnation_is_refused(
    hives: Swarm[HiveProcess],
) -> None:
    a, b = hives.cores["a"], hives.cores["b"]
    assert_ok(b.host_call("spawn", name="again", spec=CAGED))
    try:
        b.wait_running(["again"])
        old = wait_for(lambda: created_at_on(hives, "b", "again"), timeout=10)
        assert old == flag(b, "again", "created_at")
        # Destroyed and spawned again under the name on b after the operator on a saw it.
        assert_ok(b.host_call("destroy", name="again"))
        assert_ok(b.host_call("spawn", name="again", spec=CAGED))
        b.wait_running(["again"])
        new = flag(b, "again", "created_at")
        assert new != old
        wait_for(lambda: created_at_on(hives, "b", "again") == new, timeout=10)
        counts = hives.status("b")
        for cmd, fields in (
            ("destroy", {"name": "again"}),
            ("restart", {"name": "again"}),
            ("set_paused", {"name": "again", "paused": True}),
            ("stop", {"scope": {"agent_names": ["again", "bob"]}}),
        ):
            bound = old if cmd != "stop" else {"again": old, "bob": flag(b, "bob", "created_at")}
            reply = a.host_call(cmd, **fields, host="b", created_at=bound)
            print(f"{cmd} bound to the agent destroyed since: {reply}")
            assert reply["ok"] is False, reply
            assert reply["error"].startswith("host b: agent 'again' is not the one acted on")
        # Refused there as outcomes (recorded, reported back), nothing done: the new agent
        # runs on, not paused, not stopped; bob (named beside it) not stopped either.
        after = hives.status("b")
        assert after["actions_applied"] == counts["actions_applied"] + 4
        assert flag(b, "again", "created_at") == new
        assert (flag(b, "again", "paused"), flag(b, "again", "stopped")) == (0, 0)
        assert flag(b, "bob", "stopped") == 0
        b.wait_running(["again", "bob"])
        # Unbound on a (the CLI's, the dashboard's): bound to what a's roster shows now.
        assert assert_ok(a.host_call("destroy", name="again", host="b"))["applied"] is True
        assert flag(b, "again", "created_at") is None
        # A name the roster doesn't show on b is refused on a: nothing carried.
        gone = a.host_call("stop", scope={"agent_names": ["nosuch"]}, host="b")
        assert gone["ok"] is False and "in the swarm's roster" in gone["error"], gone
    finally:
        if flag(b, "again", "created_at") is not None:
            assert_ok(b.host_call("destroy", name="again"))


@pytest.mark.parametrize("point", ["approval-committed", "carried-applied"])
def test_kill9_of_b_as_a_carried_approval_of_a_spawn_is_applied_spawns_once(
    hives: Swarm[HiveProcess], point: str
) -> None:
    a, b = hives.cores["a"], hives.cores["b"]
    name = f"appr{point[:4]}"
    asked = assert_ok(a.host_call("request_spawn", name=name, spec=CAGED, host="b"))
    assert asked["applied"] is True, asked
    old = b.core_pid()
    assert old is not None
    fault(b, point)
    approve, approved = in_thread(lambda: a.host_call(
        "approve", id=asked["id"], payload_sha256=asked["payload_sha256"], host="b"))  # fmt: skip
    try:
        approve.join(30)
        reply = assert_ok(approved["reply"])
        recovered_after_kill(hives, old)
        outcome = wait_for(lambda: asyncio.run(result_on_bus(hives, "b", reply["action"])), 10)
        print(f"killed at {point}; a's reply: {reply}; b's outcome after its restart: {outcome}")
        assert outcome["ok"] is True, outcome
        assert not (b.state_dir / "fault.kill").exists()  # b passed the point, and died there
        # Spawned once (one row, the approval's), and it runs: started by b's restart if
        # the kill came before its cage was.
        shown = assert_ok(b.host_call("show_approval", id=asked["id"]))["approval"]
        assert shown["status"] == "approved", shown
        b.wait_running([name])
        log = b.log_path.read_text(errors="replace")
        assert "is already approved" not in log and "already exists" not in log
    finally:
        (b.state_dir / "fault.kill").unlink(missing_ok=True)
        wait_for(lambda: b.core_pid() is not None, timeout=30)
        b.wait_running()
        if flag(b, name, "created_at") is not None:
            assert_ok(b.host_call("destroy", name=name))


def test_kill9_of_b_right_after_a_carried_restart_or_destroy_is_applied_does_not_repeat_it(
    hives: Swarm[HiveProcess],
) -> None:
    a, b = hives.cores["a"], hives.cores["b"]
    assert_ok(b.host_call("spawn", name="twice", spec=CAGED))
    try:
        b.wait_running(["twice"])
        wait_for(lambda: created_at_on(hives, "b", "twice"), timeout=10)
        first = cage_pid(b, "twice")
        for cmd in ("restart", "destroy"):
            old = b.core_pid()
            assert old is not None
            fault(b, "carried-applied")
            go, went = in_thread(lambda: a.host_call(cmd, name="twice", host="b"))  # noqa: B023
            go.join(30)
            reply = assert_ok(went["reply"])
            recovered_after_kill(hives, old)
            action = reply["action"]
            outcome = wait_for(lambda: asyncio.run(result_on_bus(hives, "b", action)), 10)  # noqa: B023
            print(f"{cmd} killed once applied; a's reply: {reply}; b's outcome: {outcome}")
            # What it did, not "no agent named 'twice'" of a destroy carried out again.
            assert outcome["ok"] is True, outcome
            if cmd == "restart":
                b.wait_running(["twice"])
                restarted = cage_pid(b, "twice")
                assert restarted != first  # restarted once ...
                # Every delivery of it is done: b has acked it (after it applied or found
                # it applied and published that), and the bus holds nothing more for b
                # from a, so no delivery again can come (a waited ack would redeliver it).
                wait_for(lambda: nothing_left_for(hives, "b", "a"), timeout=3 * s.ACK_WAIT_SECONDS)
                assert cage_pid(b, "twice") == restarted  # ... and only once
                assert hives.status("b")["actions_applied"] == 0
            else:
                assert flag(b, "twice", "created_at") is None
    finally:
        (b.state_dir / "fault.kill").unlink(missing_ok=True)
        wait_for(lambda: b.core_pid() is not None, timeout=30)
        b.wait_running()
        if flag(b, "twice", "created_at") is not None:
            assert_ok(b.host_call("destroy", name="twice"))

"""The operator's actions as the host they are for carries them out (docs/swarm.md, "The
operator's roster and actions": "Carried out concurrently, and once"), on the session's
whole-hive swarm (each host ``hive up`` in its own network namespace, real cages):

- a stop of an agent on b whose runtime takes its time to exit doesn't hold up an
  answer to another agent on b (one lane per agent, the lanes at once);
- b's hive-core killed (SIGKILL) right after a spawn carried from a is committed there,
  before its outcome is recorded or the action acked: after the restart the bus hands
  the same action over again, b finds it applied and publishes that, and spawns nothing
  twice (a second spawn would be b's refusal "already exists")."""

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
        after = hives.status("b")
        assert after["actions_applied"] == counts["actions_applied"] + 2
        assert after["actions_refused"] == counts["actions_refused"]
        assert after["actions_carrying"] == 0
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
        assert b.log_path.read_text(errors="replace").count(created) == before + 1
        b.wait_running(["kspawn"])  # started by b's restart (its row says it should run)
    finally:
        spawn.join(30)
        wait_for(lambda: b.core_pid() is not None, timeout=30)
        b.wait_running()
        assert_ok(b.host_call("destroy", name="kspawn"))

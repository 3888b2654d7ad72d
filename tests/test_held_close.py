"""``Hive.cage_holds_a_close``: the watchdog (core/received_fds.py) found a core thread
letting go of what an agent handed over asleep uninterruptibly, on a lock only a process
of that agent's cage can hold; the cage is restarted to end it. Once at a time, never an
agent the operator stopped or destroyed (before or during the restart), and the operator
is told (an ``agent_status`` event with a ``trouble`` line)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from hyperhive.config import HiveConfig
from hyperhive.core.backoff import RestartBackoff
from hyperhive.core.events import EventBus
from hyperhive.core.hive import Hive, Lifecycle
from hyperhive.core.store import Store
from hyperhive.wire.common import AgentSpec


class Recording(Lifecycle):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.during_stop: Any = None  # run inside the stop (the operator acting meanwhile)

    async def start(self, name: str, hive: Hive) -> None:
        self.calls.append(("start", name))

    async def stop(self, name: str, graceful: bool) -> None:
        self.calls.append(("stop" if graceful else "kill", name))
        await asyncio.sleep(0.01)
        if self.during_stop is not None:
            self.during_stop()
            self.during_stop = None


def make(tmp_path: Path) -> tuple[Hive, Recording, list[dict[str, Any]]]:
    store = Store(tmp_path / "hive.db")
    spec = AgentSpec.model_validate({"runtime": "command", "command": ["true"]})
    store.agents.sync_config({"a": spec, "b": spec})
    life = Recording()
    bus = EventBus()
    hive = Hive(store, HiveConfig.model_validate({}), life, bus)
    seen: list[dict[str, Any]] = []
    bus.publish = lambda kind, data: seen.append({"kind": kind, **data})  # type: ignore[method-assign]
    return hive, life, seen


def test_the_holding_cage_is_restarted_once_and_the_operator_told(tmp_path: Path) -> None:
    hive, life, seen = make(tmp_path)

    async def main() -> None:
        hive.cage_holds_a_close("a")
        hive.cage_holds_a_close("a")  # reported again while the restart runs: one restart
        hive.cage_holds_a_close("nobody")
        await asyncio.sleep(0.1)

    asyncio.run(main())
    assert life.calls == [("kill", "a"), ("start", "a")], life.calls
    troubles = [e["trouble"] for e in seen if "trouble" in e]
    assert len(troubles) == 1 and troubles[0].startswith("agent a: a close of what its cage"), seen
    assert not hive.store.agents.get("a").stopped  # type: ignore[union-attr]


def test_a_cage_the_operator_stops_during_the_restart_is_not_started_again(tmp_path: Path) -> None:
    hive, life, _ = make(tmp_path)
    life.during_stop = lambda: hive.store.agents.set_flag("a", "stopped", True)

    async def main() -> None:
        hive.cage_holds_a_close("a")
        await asyncio.sleep(0.1)
        hive.store.agents.set_flag("b", "stopped", True)
        hive.cage_holds_a_close("b")  # stopped before: not even killed again
        await asyncio.sleep(0.1)

    asyncio.run(main())
    assert life.calls == [("kill", "a")], life.calls


def test_the_backoff_starts_at_once_then_waits_twice_as_long_each_time() -> None:
    now = [1000.0]
    backoff = RestartBackoff(free=3, window=600.0, max_delay=300.0, clock=lambda: now[0])
    delays = []
    for _ in range(14):
        delays.append(backoff.next_delay("a"))
        now[0] += 1.0 + delays[-1]  # the next hold comes a second after the start
    assert delays == [0, 0, 0, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300], delays
    assert backoff.next_delay("b") == 0  # per agent
    now[0] += 601.0  # a quiet window after the last start ends the row: at once again
    assert [backoff.next_delay("a") for _ in range(4)] == [0, 0, 0, 2]
    backoff.forget("a")
    assert backoff.next_delay("a") == 0


def test_a_cage_restarted_again_and_again_starts_later_and_not_after_a_stop(tmp_path: Path) -> None:
    hive, life, seen = make(tmp_path)
    hive.held_backoff = RestartBackoff(free=1, max_delay=0.3)

    async def main() -> None:
        for _ in range(2):  # the first at once, the second 0.3 s after its stop
            before = life.calls.count(("start", "a"))
            hive.cage_holds_a_close("a")
            t0 = asyncio.get_running_loop().time()
            while life.calls.count(("start", "a")) == before:
                await asyncio.sleep(0.01)
            took = asyncio.get_running_loop().time() - t0
        assert took >= 0.3, took
        hive.cage_holds_a_close("a")  # the third waits; the operator stops it meanwhile
        await asyncio.sleep(0.1)
        hive.store.agents.set_flag("a", "stopped", True)
        await asyncio.sleep(0.4)

    asyncio.run(main())
    assert life.calls == [("kill", "a"), ("start", "a")] * 2 + [("kill", "a")], life.calls
    troubles = [e["trouble"] for e in seen if e.get("trouble")]
    assert len(troubles) == 3, troubles
    assert troubles[0].endswith("its cage is restarted"), troubles
    assert troubles[1].endswith("its cage is restarted in 0 s (restarted again and again)"), troubles


def test_a_hold_reported_during_the_wait_is_stopped_at_once_and_owns_the_next_start(tmp_path: Path) -> None:
    """Re-check of session 31: while a restart waited to start, the agent's name stayed
    among those being restarted, so a hold re-armed in a cage the operator started
    meanwhile was never handled. Now that report stops the cage at once, the waiting
    restart starts nothing, and the newer one starts the cage after its own wait."""
    hive, life, _ = make(tmp_path)
    hive.held_backoff = RestartBackoff(free=1, max_delay=0.3)

    async def main() -> None:
        hive.cage_holds_a_close("a")  # at once
        await asyncio.sleep(0.05)
        hive.cage_holds_a_close("a")  # waits 0.3 s
        await asyncio.sleep(0.1)
        await life.start("a", hive)  # the operator starts it meanwhile; the hold again
        hive.cage_holds_a_close("a")
        await asyncio.sleep(0.05)
        assert life.calls[-1] == ("kill", "a"), life.calls  # stopped at once
        await asyncio.sleep(0.6)

    asyncio.run(main())
    assert life.calls == [("kill", "a"), ("start", "a"), ("kill", "a"), ("start", "a"), ("kill", "a"), ("start", "a")], life.calls


def test_a_restart_waiting_to_start_an_agent_destroyed_meanwhile_starts_nothing(tmp_path: Path) -> None:
    hive, life, _ = make(tmp_path)
    hive.held_backoff = RestartBackoff(free=0, max_delay=0.2)

    async def main() -> None:
        hive.cage_holds_a_close("a")
        await asyncio.sleep(0.05)
        hive._forget("a")  # what a destroy does, before a new agent of that name may come
        await asyncio.sleep(0.4)

    asyncio.run(main())
    assert life.calls == [("kill", "a")], life.calls

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

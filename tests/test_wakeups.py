"""Inbox wake-ups' deadlines (core/events.py ``Deadlines``): one loop timer for every
waiting ``recv``, not one each. Each wait still ends at its own time, in whatever order
they were set, on uvloop (the core's loop) and on asyncio's; a wait woken first leaves
nothing behind that grows with the rounds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from hyperhive.core.events import _DEAD_MIN, InboxWakeups

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


def run(factory: Callable[[], asyncio.AbstractEventLoop], main: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_each_wait_ends_at_its_own_time_in_any_order(loop_name: str) -> None:
    wakeups = InboxWakeups()
    waits = [0.25, 0.05, 0.15, 0.1, 0.2, 0.05]

    async def one(i: int, wait: float) -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await wakeups.wait(f"agent{i}", wait)
        return loop.time() - start

    async def main() -> list[float]:
        return await asyncio.gather(*(one(i, w) for i, w in enumerate(waits)))

    took = run(LOOPS[loop_name], main())
    for wait, t in zip(waits, took, strict=True):
        # Not before its time (the clock counts milliseconds), and not held for a later one.
        assert wait - 0.002 <= t < wait + 0.045, (wait, t)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_notified_wait_ends_at_once_and_others_keep_their_time(loop_name: str) -> None:
    wakeups = InboxWakeups()

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        long = asyncio.ensure_future(wakeups.wait("b", 0.2))
        early = asyncio.ensure_future(wakeups.wait("a", 30))
        await asyncio.sleep(0.02)
        wakeups.notify("a")
        await early
        woke = loop.time() - start
        await long
        return woke, loop.time() - start

    woke, timed_out = run(LOOPS[loop_name], main())
    assert woke < 0.15
    assert 0.198 <= timed_out < 0.3


def test_woken_waits_leave_a_bounded_heap() -> None:
    """A receiver in a closed loop sets a 30 s deadline and is woken long before it, once a
    message: the withdrawn deadlines are dropped, not kept for 30 s each."""
    wakeups = InboxWakeups()

    async def main() -> int:
        for _ in range(20 * _DEAD_MIN):
            fut, deadline = wakeups.watch("b", 30)
            wakeups.notify("b")
            await fut
            wakeups.unwatch("b", fut, deadline)
        return len(wakeups._deadlines._heap)

    assert run(uvloop.new_event_loop, main()) <= 2 * _DEAD_MIN + 2


def test_a_new_loop_starts_afresh() -> None:
    """A deadline set on a loop that has since stopped does not hold the next loop's waits
    (the tests run a loop each; the core one)."""
    wakeups = InboxWakeups()

    async def left_waiting() -> None:
        wakeups.watch("a", 0.03)  # due before the next loop's wait, but its loop ends first

    async def timed(wait: float) -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.wait_for(wakeups.wait("b", wait), 2.0)  # not a timer of the old loop's
        return loop.time() - start

    run(uvloop.new_event_loop, left_waiting())
    assert 0.048 <= run(uvloop.new_event_loop, timed(0.05)) < 0.1

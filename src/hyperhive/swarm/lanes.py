"""Work run in order per key and at once across keys, a few at a time: the operator
actions carried to this host (swarm/operator.py), one lane per agent they act on. A slow
stop of bob (his runtime takes its time to exit) holds up bob's later actions only, not
an answer for carol; two actions for bob are carried out in the order they came.

A job names its keys (``run``): it starts once every earlier job sharing one of them has
ended. A job with no keys named (``None``: a stop of every agent) waits for every earlier
job and every later one waits for it. At most ``at_once`` jobs run at a time, and a job
takes its place only once the jobs before it in its lanes have ended (a job waiting for
its turn holds no place, so the places can't all be held by waiters).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable


class Lanes:
    def __init__(self, at_once: int) -> None:
        self._places = asyncio.Semaphore(at_once)
        self._tails: dict[str, asyncio.Task[None]] = {}  # each key's last job
        self._all: asyncio.Task[None] | None = None  # the last job of every key
        self.jobs: set[asyncio.Task[None]] = set()  # not ended yet

    def run(self, keys: Iterable[str] | None, job: Callable[[], Awaitable[None]]) -> None:
        """Start ``job`` after the earlier jobs of its ``keys`` (of all, for None)."""
        before: set[asyncio.Task[None]] = set()
        if self._all is not None:
            before.add(self._all)
        if keys is None:
            before.update(self._tails.values())
        else:
            keys = set(keys)
            before.update(t for k in keys if (t := self._tails.get(k)) is not None)
        task = asyncio.get_running_loop().create_task(self._after(before, job))
        self.jobs.add(task)
        if keys is None:
            self._all = task
            self._tails.clear()  # each later job waits for this one, which waited for them
        else:
            for k in keys:
                self._tails[k] = task
        task.add_done_callback(self._ended)

    async def _after(
        self, before: set[asyncio.Task[None]], job: Callable[[], Awaitable[None]]
    ) -> None:
        if before:
            await asyncio.wait(before)  # ended, however (a failed job fails itself only)
        async with self._places:
            await job()

    def _ended(self, task: asyncio.Task[None]) -> None:
        self.jobs.discard(task)
        if self._all is task:
            self._all = None
        for k in [k for k, t in self._tails.items() if t is task]:
            del self._tails[k]
        if not task.cancelled():
            # The job logs its own failures; retrieved here so asyncio doesn't say
            # "exception never retrieved" of one that got through.
            task.exception()

    async def cancel(self) -> None:
        """End every job (the consumer is going away); an action cut short is not acked,
        so the bus hands it over again."""
        jobs = list(self.jobs)
        for t in jobs:
            t.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

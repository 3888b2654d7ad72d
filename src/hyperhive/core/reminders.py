"""Delivers due reminders. The schedule lives in the database, so reminders
survive restarts; this task only sleeps until the earliest one is due."""

from __future__ import annotations

import asyncio
import logging
import time

from hyperhive.core.events import EventBus
from hyperhive.core.hive import Hive
from hyperhive.core.store import StoreError

log = logging.getLogger("hive.core")
MAX_SLEEP = 60.0  # re-read the schedule at least this often
BATCH_PAUSE = 0.005  # seconds, at least, between two delivery batches


class ReminderScheduler:
    def __init__(self, hive: Hive, bus: EventBus) -> None:
        self.hive = hive
        self._poke = asyncio.Event()
        bus.listen("reminder_added", lambda event: self._poke.set())

    async def deliver_all(self, now: float) -> None:
        """Every reminder due by ``now``, a bounded batch per transaction. Between two
        batches the loop is left to the sockets for as long as the batch took (at least
        BATCH_PAUSE): a request needs several turns of the loop, so yielding one turn
        (``sleep(0)``) would still hold it up for many batches. A mass falling due at
        once takes about twice as long to deliver, and no socket waits more than about
        one batch."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            if not self.hive.deliver_due_reminders(now):
                return
            await asyncio.sleep(max(BATCH_PAUSE, loop.time() - started))

    async def run(self) -> None:
        while True:
            try:
                await self.deliver_all(time.time())
            except StoreError as e:
                log.error("could not deliver reminders: %s", e)
            due = self.hive.store.reminders.next_due()
            delay = MAX_SLEEP if due is None else min(MAX_SLEEP, max(0.0, due - time.time()))
            self._poke.clear()
            try:
                await asyncio.wait_for(self._poke.wait(), delay)
            except TimeoutError:
                pass

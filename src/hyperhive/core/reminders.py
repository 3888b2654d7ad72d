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


class ReminderScheduler:
    def __init__(self, hive: Hive, bus: EventBus) -> None:
        self.hive = hive
        self._poke = asyncio.Event()
        bus.listen("reminder_added", lambda event: self._poke.set())

    async def deliver_all(self, now: float) -> None:
        """Every reminder due by ``now``, a bounded batch per transaction; between two
        batches the loop serves whatever else is waiting (a mass falling due at once
        must not stall the sockets)."""
        while self.hive.deliver_due_reminders(now):
            await asyncio.sleep(0)

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

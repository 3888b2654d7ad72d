"""Delivers due reminders. The schedule lives in the database, so reminders
survive restarts; this task only sleeps until the earliest one is due."""

from __future__ import annotations

import asyncio
import logging
import time

from hyperhive.core.hive import Hive
from hyperhive.core.store import StoreError

log = logging.getLogger("hive.core")
MAX_SLEEP = 60.0  # re-read the schedule at least this often


class ReminderScheduler:
    def __init__(self, hive: Hive) -> None:
        self.hive = hive
        self._poke = asyncio.Event()
        hive.on_reminder_added = self._poke.set

    async def run(self) -> None:
        while True:
            try:
                self._deliver_due()
            except StoreError as e:
                log.error("could not deliver reminders: %s", e)
            due = self.hive.store.reminders.next_due()
            delay = MAX_SLEEP if due is None else min(MAX_SLEEP, max(0.0, due - time.time()))
            self._poke.clear()
            try:
                await asyncio.wait_for(self._poke.wait(), delay)
            except TimeoutError:
                pass

    def _deliver_due(self) -> None:
        for msg in self.hive.store.reminders.deliver_due(time.time()):
            log.info("reminder %s delivered to %s", msg.ref, msg.to)
            self.hive.delivered(msg)
            self.hive.bus.publish("reminder", {"agent": msg.to, "reminder_id": msg.ref, "text": msg.body})
            assert msg.to is not None
            self.hive.publish_status(msg.to)

"""A watch of one host's roster bucket (docs/swarm.md, "Permissions"): the one push
consumer this host may have on that bucket, named ``w_<reader>`` (subjects.watcher).

NATS lets each host create consumers on a roster bucket under that one name only (red
team round 9: unnamed creates let a host leave any number of consumers nobody but the
admin could remove), so nats-py's KV watch (an ordered consumer the server names) is
replaced here by what it did, under our own name: deliver every key's last value, then
each change; track the stream sequence; on a gap, a stall or a reconnect, delete our
own consumer and make it again from the next sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from hyperhive.swarm import subjects as s

IDLE_THRESHOLD = 30.0  # a consumer whose subscriber is gone: the server drops it after this
HEARTBEAT = 2.0  # the server's idle heartbeat on a quiet consumer
STALLED = 3 * HEARTBEAT  # nothing heard for this long: the consumer is gone (its node died)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def stored_at_ns(ns: int) -> datetime:
    """A stream time in nanoseconds as a datetime, truncated to the microsecond: the
    instant nats-py's STREAM.MSG.GET gives for it (bridge.live_claims), so a watch and a
    lookup order the name claims alike."""
    return _EPOCH + timedelta(microseconds=ns // 1000)


def is_delivery(m: Msg) -> bool:
    """A message JetStream delivers from a stream (its reply is the ack subject), not one
    of the server's own status messages."""
    return (m.reply or "").startswith("$JS.ACK.")


@dataclass(frozen=True)
class Entry:
    """One key's value as the bucket stored it (``operation`` DEL/PURGE: gone)."""

    key: str
    value: bytes
    operation: str | None
    revision: int
    created: datetime


class Gap(Exception):
    """The deliveries skipped one, or stopped: the consumer is made again."""


class RosterWatch:
    """``reader``'s watch of ``host``'s bucket. ``updates`` gives each entry, with None
    once after the initial load (every key's last value) is through."""

    def __init__(self, nc: NATS, reader: str, host: str) -> None:
        self.nc = nc
        self.reader = reader
        self.host = host
        self.stream = s.kv_stream(host)
        self.name = s.watcher(reader)
        self._prefix = s.kv_subject(host, "")
        self._queue: asyncio.Queue[Entry | Gap | None] = asyncio.Queue()
        self._sub: Subscription | None = None
        self._seq = 0  # the last stream sequence handed out (0: none yet)
        self._dseq = 0  # the consumer's last delivery sequence seen
        self._heard = time.monotonic()
        self._loaded = False  # the end-of-data marker given
        self._reconnects = 0
        self._broken = False

    async def start(self) -> None:
        await self._make()

    async def stop(self) -> None:
        """Unsubscribe and delete our consumer (ours to delete; the server would drop it
        after IDLE_THRESHOLD anyway)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self.nc.jetstream(timeout=2.0).delete_consumer(self.stream, self.name)

    async def updates(self, timeout: float) -> Entry | None:
        """The next entry (None: the initial load is through); TimeoutError if nothing
        came for ``timeout`` seconds. A gap, a stall or a reconnect remakes the consumer
        from the next sequence on the way (an error doing so raises: start afresh)."""
        deadline = time.monotonic() + timeout
        while True:
            reconnects = self.nc.stats["reconnects"]
            stalled = time.monotonic() - self._heard > STALLED
            if self._broken or stalled or reconnects != self._reconnects:
                await self._make()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            try:
                got = await asyncio.wait_for(self._queue.get(), min(left, HEARTBEAT))
            except TimeoutError:
                continue
            if isinstance(got, Gap):
                self._broken = True
                continue
            return got

    async def _make(self) -> None:
        """(Re)make our consumer: delete the one of this name (ours: a watch of before, or
        one the bus left broken), then create it from the next sequence."""
        self._broken = False
        self._reconnects = self.nc.stats["reconnects"]
        old, self._sub = self._sub, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()
        self._queue = asyncio.Queue()  # what the old subscription left is dropped
        js = self.nc.jetstream(timeout=2.0)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(self.stream, self.name)
        # A fresh deliver subject each time: a late delivery of the old consumer is not ours.
        deliver = f"{s.inbox_prefix(self.reader)}.w.{self.host}.{secrets.token_hex(6)}"
        queue = self._queue

        async def on(m: Msg) -> None:
            await self._on(m, queue)

        self._sub = await self.nc.subscribe(deliver, cb=on)
        self._dseq = 0
        config = ConsumerConfig(
            name=self.name,
            deliver_subject=deliver,
            filter_subject=f"{self._prefix}>",
            ack_policy=AckPolicy.NONE,
            flow_control=True,
            idle_heartbeat=HEARTBEAT,
            inactive_threshold=IDLE_THRESHOLD,
            mem_storage=True,
            num_replicas=1,
            **(
                {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": self._seq + 1}
                if self._seq
                else {"deliver_policy": DeliverPolicy.LAST_PER_SUBJECT}
            ),
        )
        try:
            info = await js.add_consumer(self.stream, config)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
            raise
        self._heard = time.monotonic()
        if not self._loaded and not info.num_pending:
            self._loaded = True
            queue.put_nowait(None)  # an empty bucket: the initial load is through already

    async def _on(self, m: Msg, queue: asyncio.Queue[Entry | Gap | None]) -> None:
        if queue is not self._queue:
            return  # a remade consumer's predecessor
        self._heard = time.monotonic()
        headers = m.headers or {}
        # A stored message keeps the headers its writer gave it, and NATS's permissions
        # don't see headers: a host's own value with "Status: 100" was taken for the
        # server's heartbeat, and its "Nats-Consumer-Stalled" made every watcher publish
        # where it said (a's own bucket purged; red team round 10). Whatever comes with a
        # $JS.ACK reply is a stored message; the server's own have none, or a $JS.FC one,
        # and carry no data.
        if headers.get("Status") == "100" and not m.data and not is_delivery(m):
            # Flow control asks for a reply on m.reply; an idle heartbeat names the last
            # delivery (behind it: a gap) and, if the consumer stalled, where to answer:
            # only ever a flow-control subject of this stream.
            flow = f"$JS.FC.{self.stream}."
            with contextlib.suppress(nats.errors.Error):
                if m.reply and m.reply.startswith(flow):
                    await self.nc.publish(m.reply, b"")
                stalled = headers.get("Nats-Consumer-Stalled")
                if stalled and stalled.startswith(flow):
                    await self.nc.publish(stalled, b"")
            last = headers.get("Nats-Last-Consumer")
            if last is not None and last.isdigit() and int(last) != self._dseq:
                queue.put_nowait(Gap())
            return
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ns>.<pending>, or (newer
        # servers) with <domain>.<account hash> before the stream and a token after.
        parts = (m.reply or "").split(".")
        at = 2 if len(parts) == 9 else 4 if len(parts) >= 11 else None
        if at is None or parts[at] != self.stream or not m.subject.startswith(self._prefix):
            return
        try:
            sseq, dseq, ns, pending = (int(x) for x in parts[at + 3 : at + 7])
        except ValueError:
            return
        if dseq != self._dseq + 1:
            queue.put_nowait(Gap())
            return
        self._dseq = dseq
        self._seq = sseq
        op = headers.get("KV-Operation")
        key = m.subject[len(self._prefix) :]
        queue.put_nowait(Entry(key, m.data, op, sseq, stored_at_ns(ns)))
        if not self._loaded and pending == 0:
            self._loaded = True
            queue.put_nowait(None)

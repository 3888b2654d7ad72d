"""One stored message at a time from a pull consumer, read raw (``CONSUMER.MSG.NEXT``).

nats-py's ``fetch`` (and ``request``) read a message's ``Status`` header as the
server's: a 100 is dropped as a heartbeat unacked, a 503 raises "no responders", any
other raises. A stored message keeps the headers its publisher gave it, and NATS's
permissions don't see headers, so a host put ``Status: 100`` on its own operator actions
to b: b's one actions consumer handed them back first after every ack wait and the
operator's real actions waited behind them (red team round 10, ``swarm-ops-jam``). Here a
stored message is told by its reply subject (``$JS.ACK.``), which only the server sets;
everything else is the server's status for the request, and ends it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from hyperhive.swarm.watch import is_delivery

PAUSE = 0.25  # seconds after a status that came at once (503: no consumer, no leader)


class Puller:
    """Stored messages of ``consumer`` on ``stream``, one request at a time, answered on
    an inbox of this host's own (the only subjects it may subscribe to)."""

    def __init__(self, nc: NATS, stream: str, consumer: str, inbox_prefix: str) -> None:
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = f"{inbox_prefix}.pull.{uuid.uuid4().hex}"
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.inbox)

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()

    async def next(self, wait: float) -> Msg | None:
        """The next stored message, or None once the server said there was none within
        ``wait`` seconds (or said nothing a second longer)."""
        assert self._sub is not None, "start() first"
        request = json.dumps({"batch": 1, "expires": int(wait * 1e9)}).encode()
        await self.nc.publish(self.subject, request, reply=self.inbox)
        deadline = time.monotonic() + wait + 1.0
        while (left := deadline - time.monotonic()) > 0:
            try:
                m = await self._sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                return None
            if is_delivery(m):
                return m
            # The server's status: this request is over. A 408 is its end after ``wait``;
            # the others (409 a leader change, 503 no consumer or no leader yet) come at
            # once, and a caller asking again at once would spin.
            if (m.headers or {}).get("Status") != "408":
                await asyncio.sleep(PAUSE)
            return None
        return None

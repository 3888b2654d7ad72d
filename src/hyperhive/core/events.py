"""In-process notification: inbox wake-ups for long-polling ``recv`` and the event bus
behind ``subscribe`` / ``subscribe_agent_status``. Nothing here is state: the
database is; these only say "look again"."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

SUBSCRIBER_QUEUE = 10_000
# A subscriber's backlog in characters of its events' JSON, as well as in events: the queue
# holds whole rows (a message of 256 Ki characters), so 10,000 of them unread pinned
# gigabytes in the core (red team round 3: one stalled ``subscribe``, one agent sending
# the operator 800 KB messages, 1.5 GiB). Past it, a lossless subscriber is cut off.
SUBSCRIBER_CHARS = 16 << 20


def _weight(event: dict[str, Any]) -> int:
    """About what ``event`` holds, in characters of its JSON (what the backlog counts)."""
    return len(json.dumps(event, ensure_ascii=False, default=str))


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# The loop's clock counts whole milliseconds, and a loop timer fires up to half of one early
# by it: a deadline this close to now is due (its waiter looks at the time again anyway).
_CLOCK_SLACK = 0.001
# Withdrawn deadlines kept in the heap before it is rebuilt without them (also at most as
# many as the live ones): memory stays bounded by the waits in progress.
_DEAD_MIN = 64

# One wait's place in ``Deadlines``: [when, order, its future (None once withdrawn)].
Deadline = list[Any]


class Deadlines:
    """Futures resolved at their deadlines by one loop timer, set for the earliest, rather
    than a timer each: a receiver waits once a message (bench: 64 pairs), and a uvloop
    timer started and cancelled cost it ~2 µs. A withdrawn deadline (its waiter was woken
    first, the usual case) is only marked; the heap drops it when it comes up, or is
    rebuilt once the marked ones outnumber the rest."""

    def __init__(self) -> None:
        self._heap: list[Deadline] = []
        self._dead = 0
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(
        self, loop: asyncio.AbstractEventLoop, at: float, fut: asyncio.Future[None]
    ) -> Deadline:
        """Resolve ``fut`` at loop time ``at`` unless ``withdraw``n first."""
        if loop is not self._loop:  # a new loop (a test's next one): nothing carries over
            self._heap, self._dead, self._timer, self._timer_at = [], 0, None, math.inf
            self._loop = loop
        entry = [at, next(self._order), fut]
        heapq.heappush(self._heap, entry)
        if at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = loop.call_at(at, self._fire), at
        return entry

    def withdraw(self, entry: Deadline) -> None:
        if entry[2] is None:
            return
        entry[2] = None
        self._dead += 1
        if self._dead > _DEAD_MIN and 2 * self._dead > len(self._heap):
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._dead = 0

    def _fire(self) -> None:
        loop = self._loop
        assert loop is not None
        self._timer, self._timer_at = None, math.inf
        heap, due = self._heap, loop.time() + _CLOCK_SLACK
        while heap and heap[0][0] <= due:
            entry = heapq.heappop(heap)
            fut, entry[2] = entry[2], None
            if fut is None:
                self._dead -= 1
            else:
                _resolve(fut)
        if heap:
            self._timer_at = heap[0][0]
            self._timer = loop.call_at(self._timer_at, self._fire)


class InboxWakeups:
    """Wakes the ``recv`` calls waiting on an agent's inbox; no polling."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = defaultdict(set)
        self._deadlines = Deadlines()
        # The loop, looked up again only once it has stopped (a test's next loop): on 3.11
        # asyncio.get_running_loop() is a getpid() system call each time it is asked, and
        # a receiver waits once a message.
        self._loop: asyncio.AbstractEventLoop | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (see ``_loop``)."""
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def notify(self, recipient: str) -> None:
        for fut in self._waiters.pop(recipient, ()):
            if not fut.done():
                fut.set_result(None)

    async def wait(self, recipient: str, timeout: float) -> None:
        fut, deadline = self.watch(recipient, timeout)
        try:
            await fut
        finally:
            self.unwatch(recipient, fut, deadline)

    def watch(self, recipient: str, timeout: float) -> tuple[asyncio.Future[None], Deadline]:
        """A future resolved by the next ``notify`` of ``recipient`` or after ``timeout``
        seconds, whichever is first; ``unwatch`` it once done (or to give up)."""
        loop = self.loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters[recipient].add(fut)
        # Not asyncio.wait_for (a second future, a done callback and a timeout context
        # each wait), nor a loop timer each (see Deadlines).
        return fut, self._deadlines.add(loop, loop.time() + timeout, fut)

    def unwatch(self, recipient: str, fut: asyncio.Future[None], deadline: Deadline) -> None:
        self._deadlines.withdraw(deadline)
        waiters = self._waiters.get(recipient)
        if waiters is not None:
            waiters.discard(fut)
            if not waiters:
                del self._waiters[recipient]


LOSSY_QUEUE = 256  # a lossy subscriber's backlog: the newest changes, the oldest dropped


def _state_key(event: dict[str, Any] | None) -> object:
    """What a lossy feed's event is the state of (an agent's name), or None."""
    if event is None:
        return None
    agent = event.get("agent")
    return agent.get("name") if isinstance(agent, dict) else event.get("name")


def _make_room(sub: Subscription, event: dict[str, Any]) -> None:
    """Free one place in a full lossy queue for ``event``: drop an older event of the same
    agent (``event`` supersedes it), else the oldest one a later event supersedes, else the
    oldest. So one agent's flood only ever pushes out its own older states, never the one
    change of another agent (red team round 3: 1000 ``set_status`` from one cage dropped
    another agent's pause from the operator's feed, and nothing said so)."""
    items = []
    while not sub.queue.empty():
        items.append(sub.queue.get_nowait())
    keys = [_state_key(e) for e, _ in items]
    new = _state_key(event)
    drop = next((i for i, k in enumerate(keys) if k is not None and k == new), None)
    if drop is None:
        drop = next((i for i, k in enumerate(keys) if k is not None and k in keys[i + 1 :]), 0)
    sub.nbytes -= items.pop(drop)[1]
    for item in items:
        sub.queue.put_nowait(item)


class Subscription:
    """One subscriber's queue. A lossless one (``subscribe``) that can't keep up is cut
    off and told so; a lossy one (``subscribe_agent_status``, as hyperhive's) drops its
    oldest events instead and stays connected: its reader re-polls to reconcile."""

    def __init__(self, kinds: frozenset[str], lossy: bool = False) -> None:
        self.kinds = kinds
        self.lossy = lossy
        # (event, its weight); None: the subscriber fell behind and was cut off
        self.queue: asyncio.Queue[tuple[dict[str, Any] | None, int]] = asyncio.Queue(
            LOSSY_QUEUE if lossy else SUBSCRIBER_QUEUE
        )
        self.nbytes = 0  # the queued events' weight (SUBSCRIBER_CHARS)
        self.overflowed = False
        self.dropped = 0

    async def get(self) -> dict[str, Any] | None:
        """The next event (None: cut off, nothing more will come)."""
        event, weight = await self.queue.get()
        self.nbytes -= weight
        return event

    def offer(self, event: dict[str, Any], weight: int) -> None:
        """Queue ``event``; QueueFull when the backlog has no room (events or characters)."""
        if self.nbytes + weight > SUBSCRIBER_CHARS and not self.queue.empty():
            raise asyncio.QueueFull
        self.queue.put_nowait((event, weight))
        self.nbytes += weight


Listener = Callable[[dict[str, Any]], None]


class EventBus:
    """Fan-out of hive events: to operator subscribers (a queue each; one that can't
    keep up is cut off, told so, rather than slowing the hive down) and to in-process
    listeners (called at once, in the loop: the reminder scheduler, say)."""

    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self._listeners: dict[str, list[Listener]] = defaultdict(list)
        self.version = 0  # bumped on every event, subscribed or not: caches key on it

    def listen(self, kind: str, listener: Listener) -> None:
        """Call ``listener(event)`` for every event of ``kind`` (for the process's life)."""
        self._listeners[kind].append(listener)

    def subscribe(self, kinds: frozenset[str], lossy: bool = False) -> Subscription:
        sub = Subscription(kinds, lossy)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def wants(self, kind: str) -> bool:
        return any(kind in sub.kinds for sub in self._subs)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        self.version += 1
        event = {"kind": kind, **data}
        for listener in self._listeners.get(kind, ()):
            listener(event)
        weight: int | None = None
        for sub in list(self._subs):
            if kind not in sub.kinds:
                continue
            if weight is None:  # once per event, and only when someone wants it
                weight = _weight(event)
            try:
                sub.offer(event, weight)
            except asyncio.QueueFull:
                if sub.lossy:  # drop a superseded event: the newest state is what a reader wants
                    while not sub.queue.empty():
                        _make_room(sub, event)
                        with contextlib.suppress(asyncio.QueueFull):
                            sub.offer(event, weight)
                            break
                    else:
                        sub.offer(event, weight)
                    sub.dropped += 1
                    continue
                sub.overflowed = True
                self._subs.discard(sub)
                while not sub.queue.empty():  # make room for the one "you fell behind"
                    sub.queue.get_nowait()
                sub.nbytes = 0
                sub.queue.put_nowait((None, 0))

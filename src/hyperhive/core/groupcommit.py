"""Group commit: the writes of the message hot path (sends and acks) that arrive in the
same turn of the event loop share one transaction.

A commit that wrote pages costs far more than the rows in it (SQLite writes each dirty
page to the WAL, checksummed: ~50 µs of CPU here, against ~12 µs per inserted message),
so 64 agents acking in the same turn pay for one commit, not 64. Each caller still gets
its reply only after the commit that holds its write, so what the hive acknowledges
survives a kill -9 (tests/test_durability.py).

A write's ``work`` runs inside the shared transaction. A refusal (``Refused``) it raises
refuses that write alone, and must be raised before the work writes anything (a check,
then the writes), so the others go on. Any other error rolls the whole transaction back
and refuses every write in it alike: none is half-stored.

The hot write, one agent's message to another, has a lane of its own (``submit_message``):
no closure per message, and a run of them in a batch is one ``executemany`` (its ids are
consecutive: one connection writes, AUTOINCREMENT hands out the next id each insert). The
hooks (``MessageHooks``) are the hive's, set once.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from hyperhive.core.refusals import Refused
from hyperhive.core.store.db import Database, Rider, Tx, current_rider
from hyperhive.core.store.messages import MessageItem, insert_messages

T = TypeVar("T")


class MessageHooks(Protocol):
    """What the hive does around each message of the message lane."""

    def message_taken(self, item: MessageItem) -> None:
        """The batch holding it is taken, committed or not (a count of what is queued)."""

    def message_stored(self, mid: int, item: MessageItem, sent_at: float) -> None:
        """It is committed, as message ``mid``: before its sender's reply."""

    def lane_committed(self, before: int, after: int) -> None:
        """A batch of only lane messages and ``shrinks`` writes was committed: the database's
        commit count went from ``before`` to ``after``. Called before ``message_stored``."""


@dataclass(slots=True)
class _Write:
    work: Callable[[Tx], Any] | None  # None: ``item`` is a message (the message lane)
    done: Callable[[Any], None] | None  # after the commit, before the caller resumes
    taken: Callable[[], None] | None  # when the batch is taken, whatever becomes of it
    fut: asyncio.Future[Any]
    item: MessageItem | None = None
    shrinks: bool = False  # holds nobody more in the store (an ack): see lane_committed
    rider: Rider | None = None  # its submitter's (store/db.py's ``riding``), run if it stood

    @property
    def runs_in_place(self) -> bool:
        """A write the batch's others keep their order around: neither a message of the
        lane nor a ``shrinks`` write (those two commute: see GroupCommit._segment)."""
        return self.work is not None and not self.shrinks


class GroupCommit:
    """Queue writes for the next commit; ``submit`` resolves once its write is committed."""

    def __init__(self, db: Database, hooks: MessageHooks | None = None) -> None:
        self._db = db
        self._queue: list[_Write] = []
        self._hooks = hooks
        # The loop, looked up again only once it has stopped (a test's next loop): on 3.11
        # asyncio.get_running_loop() is a getpid() system call each time it is asked.
        self._loop: asyncio.AbstractEventLoop | None = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def submit(
        self,
        work: Callable[[Tx], T],
        done: Callable[[T], None] | None = None,
        taken: Callable[[], None] | None = None,
        shrinks: bool = False,
    ) -> asyncio.Future[T]:
        """Queue ``work`` (run in order with the rest of this turn's writes); ``done`` runs
        with its result once committed, even if the caller is gone by then (a message
        committed is delivered whether or not its sender still waits for the reply);
        ``taken`` runs just before the transaction, committed or not (a count of what is
        queued goes down). ``shrinks``: an ack's work, which adds to no agent's storage and
        needs no message of its own batch (see _segment and MessageHooks.lane_committed)."""
        fut: asyncio.Future[T] = self._running_loop().create_future()
        self._enqueue(_Write(work, done, taken, fut, shrinks=shrinks, rider=current_rider()))
        return fut

    def submit_message(self, item: MessageItem) -> asyncio.Future[int]:
        """Queue one message (never to the operator: those make room first, a ``work``);
        resolves to its id once committed. The hooks run for it as ``taken`` and ``done``
        would."""
        assert self._hooks is not None, "a GroupCommit without hooks has no message lane"
        fut: asyncio.Future[int] = self._running_loop().create_future()
        self._enqueue(_Write(None, None, None, fut, item, rider=current_rider()))
        return fut

    def _enqueue(self, w: _Write) -> None:
        self._queue.append(w)
        if len(self._queue) == 1:  # after every handler this turn has started
            # In a context of its own: the batch is many submitters' writes, each with its
            # own rider (run below), not the first submitter's for all of them.
            self._running_loop().call_soon(self._flush, context=contextvars.Context())

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        hooks = self._hooks
        for w in batch:
            if w.taken is not None:
                w.taken()
            elif w.item is not None and hooks is not None:
                hooks.message_taken(w.item)
        n = len(batch)
        results: list[tuple[bool, Any]] = [(False, None)] * n
        now = time.time()
        before = self._db.commits
        try:
            with self._db.tx() as tx:
                i = 0
                while i < n:
                    if not batch[i].runs_in_place:  # messages and acks up to the next other
                        i = self._segment(tx, batch, i, now, results)
                        continue
                    results[i] = _run(batch[i], tx)
                    i += 1
                for w, (ok, _) in zip(batch, results, strict=True):
                    if ok and w.rider is not None:  # in the transaction of the write it rides
                        w.rider(tx)
        except Exception as e:  # rolled back whole: every write in it is refused alike
            for w in batch:
                if not w.fut.done():
                    w.fut.set_exception(e)
            return
        if hooks is not None and not any(w.runs_in_place for w in batch):
            hooks.lane_committed(before, self._db.commits)
        for w, (ok, value) in zip(batch, results, strict=True):  # in queue order
            if ok:
                if w.done is not None:
                    w.done(value)
                elif w.item is not None and hooks is not None:
                    hooks.message_stored(value, w.item, now)
            if w.fut.done():
                continue  # its caller was cancelled (hung up): the write stands all the same
            if ok:
                w.fut.set_result(value)
            else:
                w.fut.set_exception(value)

    @staticmethod
    def _segment(
        tx: Tx, batch: list[_Write], i: int, now: float, results: list[tuple[bool, Any]]
    ) -> int:
        """The messages and ``shrinks`` writes from ``i`` up to the next other write: the
        messages first, as one executemany (consecutive ids), then the acks in order. An
        ack can't need to come before a message of its own batch (no client has that id
        before the commit), and a 64-pair round alternates the two: in queue order, each
        message was an executemany of its own. Where the next segment starts."""
        n = len(batch)
        j = i
        while j < n and not batch[j].runs_in_place:
            j += 1
        lane = [k for k in range(i, j) if batch[k].item is not None]
        if lane:
            items = [it for k in lane if (it := batch[k].item) is not None]
            last = insert_messages(tx, items, now)
            for pos, k in enumerate(lane):
                results[k] = (True, last - (len(lane) - 1 - pos))
        for k in range(i, j):
            if batch[k].item is None:
                results[k] = _run(batch[k], tx)
        return j


def _run(w: _Write, tx: Tx) -> tuple[bool, Any]:
    """One write's work in the transaction: (True, its result) or (False, its refusal)."""
    assert w.work is not None
    try:
        return True, w.work(tx)
    except Refused as e:  # this write alone; it wrote nothing
        return False, e

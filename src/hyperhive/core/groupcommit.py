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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from hyperhive.core.refusals import Refused
from hyperhive.core.store.db import Database, Tx
from hyperhive.core.store.messages import MessageItem, insert_messages

T = TypeVar("T")


class MessageHooks(Protocol):
    """What the hive does around each message of the message lane."""

    def message_taken(self, item: MessageItem) -> None:
        """The batch holding it is taken, committed or not (a count of what is queued)."""

    def message_stored(self, mid: int, item: MessageItem, sent_at: float) -> None:
        """It is committed, as message ``mid``: before its sender's reply."""


@dataclass(slots=True)
class _Write:
    work: Callable[[Tx], Any] | None  # None: ``item`` is a message (the message lane)
    done: Callable[[Any], None] | None  # after the commit, before the caller resumes
    taken: Callable[[], None] | None  # when the batch is taken, whatever becomes of it
    fut: asyncio.Future[Any]
    item: MessageItem | None = None


class GroupCommit:
    """Queue writes for the next commit; ``submit`` resolves once its write is committed."""

    def __init__(self, db: Database, hooks: MessageHooks | None = None) -> None:
        self._db = db
        self._queue: list[_Write] = []
        self._hooks = hooks

    def submit(
        self,
        work: Callable[[Tx], T],
        done: Callable[[T], None] | None = None,
        taken: Callable[[], None] | None = None,
    ) -> asyncio.Future[T]:
        """Queue ``work`` (run in order with the rest of this turn's writes); ``done`` runs
        with its result once committed, even if the caller is gone by then (a message
        committed is delivered whether or not its sender still waits for the reply);
        ``taken`` runs just before the transaction, committed or not (a count of what is
        queued goes down)."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._enqueue(_Write(work, done, taken, fut))
        return fut

    def submit_message(self, item: MessageItem) -> asyncio.Future[int]:
        """Queue one message (never to the operator: those make room first, a ``work``);
        resolves to its id once committed. The hooks run for it as ``taken`` and ``done``
        would."""
        assert self._hooks is not None, "a GroupCommit without hooks has no message lane"
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._enqueue(_Write(None, None, None, fut, item))
        return fut

    def _enqueue(self, w: _Write) -> None:
        self._queue.append(w)
        if len(self._queue) == 1:  # after every handler this turn has started
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        hooks = self._hooks
        for w in batch:
            if w.taken is not None:
                w.taken()
            elif w.item is not None and hooks is not None:
                hooks.message_taken(w.item)
        results: list[tuple[bool, Any]] = []
        now = time.time()
        try:
            with self._db.tx() as tx:
                i, n = 0, len(batch)
                while i < n:
                    work = batch[i].work
                    if work is not None:
                        try:
                            results.append((True, work(tx)))
                        except Refused as e:  # this write alone; it wrote nothing
                            results.append((False, e))
                        i += 1
                        continue
                    j = i  # a run of messages: one executemany, consecutive ids
                    while j < n and batch[j].work is None:
                        j += 1
                    items = [w.item for w in batch[i:j] if w.item is not None]
                    last = insert_messages(tx, items, now)
                    results.extend((True, last - (j - 1 - k)) for k in range(i, j))
                    i = j
        except Exception as e:  # rolled back whole: every write in it is refused alike
            for w in batch:
                if not w.fut.done():
                    w.fut.set_exception(e)
            return
        for w, (ok, value) in zip(batch, results, strict=True):
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

"""Group commit of the swarm's outbox: the cross-host sends that arrive in one turn of
the event loop share one SQLite transaction (as ``Hive._queue_send`` does for a host's
own messages). Each sender still gets its reply only after the commit, and a failed
commit refuses every send in it (none is half-stored). Rows keep the order the sends
came in, so the order per sender holds. No ``nats`` here."""

from __future__ import annotations

import asyncio

from hyperhive.swarm.outbox import SwarmStore, queue_tx

_Item = tuple[str, str, str, str]  # to_host, sender, to, body


class GroupQueue:
    def __init__(self, store: SwarmStore) -> None:
        self._store = store
        self._pending: list[tuple[_Item, asyncio.Future[int]]] = []

    async def put(self, to_host: str, sender: str, to: str, body: str) -> int:
        """Commit one message to ``to`` (on ``to_host``) to the outbox; its outbox row."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._pending.append(((to_host, sender, to, body), fut))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        try:
            with self._store.db.tx() as tx:
                rows = [queue_tx(tx, h, s, t, "message", b) for (h, s, t, b), _ in pending]
        except Exception as e:  # a full disk, say: every send in this commit is refused
            for _, fut in pending:
                if not fut.done():
                    fut.set_exception(e)
            return
        for row, (_, fut) in zip(rows, pending, strict=True):
            if not fut.done():  # its sender may have gone (cancelled): the row stays
                fut.set_result(row)

"""A receiver's inbox read empty is not read again on its next recv (the one that acks)
while nothing could have come for it (core/hive.py ``recv``): only batches of messages and
acks were committed since, and no message woke it. In process, on a real store: the read is
skipped when it may be, and never when a message came by any other way."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from hyperhive.core.actors import Agent
from hyperhive.core.hive import Hive
from test_replies import hive  # noqa: F401  (the fixture: agents a and b, peers)

A, B = Agent("a"), Agent("b")


@pytest.fixture
def reads(hive: Hive, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The inbox reads recv makes, by recipient (the store's own query still runs)."""
    seen: list[str] = []
    real = hive.store.messages.unacked_wire

    def counted(recipient: str, *args: Any) -> Any:
        seen.append(recipient)
        return real(recipient, *args)

    monkeypatch.setattr(hive.store.messages, "unacked_wire", counted)
    yield seen


def bodies(hive: Hive) -> list[str]:
    page = asyncio.run(hive.recv(B, 1, 0, 10))
    return [m["body"] for m in page.items]


def test_an_empty_inbox_is_not_read_again_over_messages_and_acks(
    hive: Hive,
    reads: list[str],
) -> None:
    assert bodies(hive) == [] and reads == ["b"]

    async def round_trip() -> None:  # b sends to a, a reads and acks: messages and acks only
        mid = await hive.send(B, "a", "to a")
        page = await hive.recv(A, 2, 0, 10)
        await hive.ack(A, [m["id"] for m in page.items])
        assert [m["id"] for m in page.items] == [mid]

    asyncio.run(round_trip())
    reads.clear()
    assert bodies(hive) == [] and reads == []  # b's inbox: skipped, still empty
    asyncio.run(hive.send(A, "b", "lane"))  # woke b: read again
    assert bodies(hive) == ["lane"] and reads == ["b"]


def test_a_message_stored_any_other_way_is_read(hive: Hive, reads: list[str]) -> None:
    assert bodies(hive) == []
    # Stored in a transaction of its own, with no wake-up at all (not the group commit's
    # messages and acks): recv reads the inbox again all the same.
    hive.store.messages.send("b", "a", "message", "direct")
    assert bodies(hive) == ["direct"] and reads == ["b", "b"]


def test_a_released_message_is_read_again(hive: Hive, reads: list[str]) -> None:
    asyncio.run(hive.send(A, "b", "held"))
    assert asyncio.run(hive.recv(B, 1, 0, 10)).items  # held by connection 1
    assert bodies(hive) == []  # connection 1 holds it: nothing for another
    hive.release("b", 1)  # connection 1 hung up without acking
    assert bodies(hive) == ["held"]

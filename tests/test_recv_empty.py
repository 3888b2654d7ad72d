"""A receiver's inbox read empty is not read again while only batches of lane messages and
acks were committed since (core/inboxes.py, core/hive.py ``recv``): the messages that came
are served from what their commits stored, and acks take them out. In process, on a real
store: the read is skipped when it may be, and never when a message came by any other way;
what is served is what the query returns."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import USAGE_SUM
from hyperhive.core.actors import Agent
from hyperhive.core.hive import Hive
from test_replies import hive  # noqa: F401  (the fixture: agents a and b, peers)

A, B = Agent("a"), Agent("b")


@pytest.fixture
def reads(hive: Hive, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The inbox reads recv makes, by recipient (the store's own query still runs)."""
    seen: list[str] = []
    real = hive.store.messages.unacked_above

    def counted(recipient: str, *args: Any) -> Any:
        seen.append(recipient)
        return real(recipient, *args)

    monkeypatch.setattr(hive.store.messages, "unacked_above", counted)
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
    mid = asyncio.run(hive.send(A, "b", "lane"))  # woke b: known from its commit
    assert bodies(hive) == ["lane"] and reads == []
    assert asyncio.run(hive.ack(B, [mid])) == 1
    assert bodies(hive) == [] and reads == []  # acked: known empty again


def test_a_known_inbox_serves_what_the_query_would(hive: Hive, reads: list[str]) -> None:
    """The same lines, held messages left out, the limit and ``more`` as the query's."""
    assert bodies(hive) == []
    ids = [asyncio.run(hive.send(A, "b", f"m{i}")) for i in range(4)]

    async def pages() -> list[Any]:
        first = await hive.recv(B, 1, 0, 2)  # connection 1 holds m0, m1
        second = await hive.recv(B, 2, 0, 10)  # the rest, for connection 2
        return [first, second]

    reads.clear()
    first, second = asyncio.run(pages())
    assert reads == []
    assert [m["id"] for m in first.items] == ids[:2] and first.more
    assert [m["id"] for m in second.items] == ids[2:] and not second.more
    queried = list(hive.store.messages.unacked_wire("b", 10, set()))  # the query's lines
    assert first.items + second.items == queried
    assert asyncio.run(hive.ack(B, [ids[1], ids[3]])) == 2
    hive.release("b", 1)
    hive.release("b", 2)
    reads.clear()
    assert bodies(hive) == ["m0", "m2"] and reads == []


def test_a_write_of_another_kind_makes_the_next_recv_read(hive: Hive, reads: list[str]) -> None:
    assert bodies(hive) == []
    asyncio.run(hive.send(A, "b", "lane"))
    hive.set_status(A, "busy")  # a commit that is not the lane's: the inbox may have changed
    reads.clear()
    assert bodies(hive) == ["lane"] and reads == ["b"]


def test_an_inbox_past_its_bound_is_read_from_the_store(hive: Hive, reads: list[str]) -> None:
    """A receiver that stops reading holds no more than KNOWN_MESSAGES in the core."""
    from hyperhive.core.inboxes import KNOWN_MESSAGES

    assert bodies(hive) == []
    for i in range(KNOWN_MESSAGES + 1):
        asyncio.run(hive.send(A, "b", f"m{i}"))
    assert hive.inboxes.since("b") is None  # forgotten
    reads.clear()
    page = asyncio.run(hive.recv(B, 1, 0, 100))
    assert len(page.items) == KNOWN_MESSAGES + 1 and reads == ["b"]


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


def test_a_known_inbox_fits_any_reply() -> None:
    """recv counts no byte budget for a known inbox: the largest one fits the smallest
    reply_bytes config.py allows, the worst-escaping body and longest names included."""
    from hyperhive.core.inboxes import KNOWN_BYTES_MAX, KNOWN_CHARS, KNOWN_MESSAGES
    from hyperhive.core.replies import ENVELOPE_BYTES, MAX_ITEM_BYTES, encoded_size
    from hyperhive.core.store.messages import wire_for_recipient
    from hyperhive.wire.agent import AT_MAX

    name = "a" + "-" * 30  # NAME_RE's longest
    body = "\x01" * (KNOWN_CHARS // KNOWN_MESSAGES)  # six bytes each, escaped
    row = (2**63 - 1, name, "message", body, AT_MAX, None, None, name)
    # Each message: 6 bytes a body character and under 256 for the rest (and its comma).
    assert encoded_size(wire_for_recipient(row)) + 1 <= 6 * len(body) + 256
    assert 6 * KNOWN_CHARS + 256 * KNOWN_MESSAGES <= KNOWN_BYTES_MAX
    assert KNOWN_BYTES_MAX <= MAX_ITEM_BYTES - ENVELOPE_BYTES


# One step of an exchange between a and b, as drawn: what b's recv returns must be what
# the store's query returns at that moment, whichever way recv served it.
_STEP = st.one_of(
    st.tuples(st.just("send"), st.integers(0, 3000)),  # a body of that many characters
    st.tuples(st.just("sends"), st.integers(2, 5)),  # several in one turn: one batch
    st.tuples(st.just("recv"), st.integers(1, 2), st.integers(1, 5)),  # connection, max
    st.tuples(st.just("ack"), st.integers(0, 3)),  # how many of the ids b got last
    st.tuples(st.just("ack_send"), st.integers(0, 3)),  # an ack and a send in one batch
    st.tuples(st.just("ack_foreign")),  # an id not b's: refused, nothing acked
    st.tuples(st.just("release"), st.integers(1, 2)),
    st.tuples(st.just("status")),  # a write of another kind
    st.tuples(st.just("direct")),  # a message stored outside the group commit
)


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(_STEP, max_size=40))
def test_recv_returns_what_the_query_returns(steps: list[tuple[Any, ...]]) -> None:
    import tempfile
    from pathlib import Path

    from hyperhive.config import HiveConfig
    from hyperhive.core.events import EventBus
    from hyperhive.core.hive import Lifecycle
    from hyperhive.core.refusals import Refused
    from hyperhive.core.replies import ReplyBudget, encoded_size, take
    from hyperhive.core.store import Store
    from test_replies import BUDGET, spec

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "hive.db")
        store.agents.sync_config({"a": spec("b"), "b": spec("a")})
        config = HiveConfig.model_validate(
            {"limits": {"reply_bytes": BUDGET, "agent_pending_max": 100_000}}
        )
        h = Hive(store, config, Lifecycle(), EventBus())
        foreign = store.messages.send("a", "b", "message", "to a").id
        got: list[int] = []
        real = store.messages.unacked_wire  # the query, as recv would make it

        async def run() -> None:
            nonlocal got
            for step in steps:
                kind = step[0]
                if kind == "send":
                    await h.send(A, "b", "é\x01" * (step[1] // 2))
                elif kind == "sends":
                    await asyncio.gather(*(h.send(A, "b", f"m{i}") for i in range(step[1])))
                elif kind == "recv":
                    held = set(h._in_flight["b"])
                    want = take(
                        real("b", step[2] + 1, held), ReplyBudget(BUDGET), step[2], encoded_size
                    )
                    page = await h.recv(B, step[1], 0, step[2])
                    assert (page.items, page.more) == (want.items, want.more)
                    got = [m["id"] for m in page.items]
                elif kind in ("ack", "ack_send"):
                    ids = got[: step[1]]
                    if kind == "ack":
                        await h.ack(B, ids)
                    else:
                        await asyncio.gather(h.ack(B, ids), h.send(A, "b", "with an ack"))
                elif kind == "ack_foreign":
                    with pytest.raises(Refused):
                        await h.ack(B, [foreign])
                elif kind == "release":
                    h.release("b", step[1])
                elif kind == "status":
                    h.set_status(A, "busy")
                else:
                    store.messages.send("b", "a", "message", "direct")

        asyncio.run(run())
        store.close()


def test_an_ack_of_what_recv_handed_out_keeps_the_quota_counts(hive: Hive) -> None:
    """An ack of a message its recv handed out takes off the holder and bytes the recv's
    line told (Hive._sizes, store/messages.py held_size) without reading the row: after
    round trips of non-ASCII, empty and NUL bodies, from the known inbox and from the
    query alike, agent_usage is what a SUM over the rows says (zero: all acked)."""
    async def rounds() -> None:
        for body in ("héllo ✓", "", "nul\0byte", "x" * 5000, "ascii"):
            mid = await hive.send(A, "b", body)
            page = await hive.recv(B, 1, 0, 10)
            assert [m["id"] for m in page.items] == [mid]
            assert mid in hive._sizes  # what the ack will use
            assert await hive.ack(B, [mid]) == 1
            assert mid not in hive._sizes  # let go with the id

    assert bodies(hive) == []  # b's inbox known empty: the lane's messages served from memory
    asyncio.run(rounds())
    assert_counts_match(hive)


def test_the_sizes_kept_for_acks_are_bounded(hive: Hive, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``SIZES_MAX`` ids in flight a recv keeps no more sizes, and those ids' acks read
    their rows as before: the counts stay right either way."""
    from hyperhive.core import hive as hive_module

    monkeypatch.setattr(hive_module, "SIZES_MAX", 3)

    async def run() -> None:
        ids = [await hive.send(A, "b", f"m{i} é") for i in range(6)]
        for _ in ids:  # one a recv, none acked: in flight
            await hive.recv(B, 1, 0, 1)
        assert len(hive._sizes) == 3 and set(hive._sizes) == set(ids[:3])
        for mid in ids:
            assert await hive.ack(B, [mid]) == 1
        assert hive._sizes == {}

    asyncio.run(run())
    assert_counts_match(hive)


def assert_counts_match(hive: Hive) -> None:
    """agent_usage says what a SUM over the rows says (a row of zeros is no row)."""
    conn = hive.store.db.conn
    summed = {r[0]: tuple(r[1:]) for r in conn.execute(USAGE_SUM)}
    counted = {
        r[0]: tuple(r[1:])
        for r in conn.execute("SELECT agent, pending, bytes, op_pending, op_bytes FROM agent_usage")
        if any(r[1:])
    }
    assert counted == summed

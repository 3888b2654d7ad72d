"""Every listing reply has a byte budget as well as a count (issue 13 item 3), in
process: the service's pages stop at the budget, never drop, split or reorder a row,
and the next batch (by the last id) goes on where the last stopped. The red team's
case through the real sockets is tests/redteam/test_reply_budget.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperhive.config import ConfigError, HiveConfig, load_config
from hyperhive.core.actors import OPERATOR, Agent
from hyperhive.core.events import EventBus
from hyperhive.core.hive import Hive, Lifecycle
from hyperhive.core.refusals import BadRequest
from hyperhive.core.replies import (
    ENVELOPE_BYTES,
    MAX_ITEM_BYTES,
    ReplyBudget,
    encoded_size,
    take,
)
from hyperhive.core.store import Store
from hyperhive.wire.common import AgentSpec
from hyperhive.wire.framing import MAX_LINE, dump_line, ok

BUDGET = MAX_ITEM_BYTES  # the smallest budget the config allows
BIG = "\x01" * (200 * 1024)  # 200 Ki characters, 1.2 MB as JSON
def spec(peer: str) -> AgentSpec:
    return AgentSpec.model_validate({"runtime": "command", "command": ["true"], "peers": [peer]})


@pytest.fixture
def hive(tmp_path: Path) -> Iterator[Hive]:
    store = Store(tmp_path / "hive.db")
    store.agents.sync_config({"a": spec("b"), "b": spec("a")})
    config = HiveConfig.model_validate(
        {"limits": {"reply_bytes": BUDGET, "agent_store_mib": 1024, "agent_pending_max": 100_000}}
    )
    yield Hive(store, config, Lifecycle(), EventBus())
    store.close()


def line_bytes(reply: dict[str, Any]) -> int:
    return len(dump_line(reply))


def test_take_stops_before_the_row_that_does_not_fit() -> None:
    rows = [{"id": i, "body": "x" * 1000} for i in range(100)]
    size = encoded_size(rows[0])
    budget = ReplyBudget(ENVELOPE_BYTES + 10 * (size + 1))
    page = take(iter(rows), budget, 1000, encoded_size)
    assert [r["id"] for r in page.items] == list(range(10)) and page.more
    # The first row always goes, however big; the count is a bound too.
    page = take(iter(rows), ReplyBudget(ENVELOPE_BYTES + 1), 1000, encoded_size)
    assert [r["id"] for r in page.items] == [0] and page.more
    page = take(iter(rows), ReplyBudget(1 << 30), 7, encoded_size)
    assert len(page.items) == 7 and page.more
    page = take(iter(rows[:7]), ReplyBudget(1 << 30), 7, encoded_size)
    assert len(page.items) == 7 and not page.more


def test_take_reads_no_row_past_the_next() -> None:
    read: list[int] = []

    def rows() -> Iterator[dict[str, Any]]:
        for i in range(1000):
            read.append(i)
            yield {"id": i, "body": "x" * 100_000}

    page = take(rows(), ReplyBudget(ENVELOPE_BYTES + 350_000), 1000, encoded_size)
    assert len(page.items) == 3 and read == [0, 1, 2, 3]


def test_reply_bytes_must_hold_the_largest_row(tmp_path: Path) -> None:
    assert HiveConfig().limits.reply_bytes == 4 << 20 > MAX_ITEM_BYTES
    toml = tmp_path / "hive.toml"
    toml.write_text("[limits]\nreply_bytes = 1048576\n")
    with pytest.raises(ConfigError, match="reply_bytes"):
        load_config(toml)


def test_recv_batches_fit_the_budget_in_order_exactly_once(hive: Hive) -> None:
    async def run() -> list[dict[str, Any]]:
        for _ in range(20):
            await hive.send(Agent("b"), "a", BIG)
        replies = []
        while True:
            page = await hive.recv(Agent("a"), 1, 0, 1000)
            if not page.items:
                return replies
            replies.append(ok(messages=page.items))
            assert page.more == (sum(len(r["messages"]) for r in replies) < 20)

    replies = asyncio.run(run())
    assert len(replies) > 1
    assert all(line_bytes(r) <= BUDGET for r in replies)
    ids = [m["id"] for r in replies for m in r["messages"]]
    assert ids == sorted(ids) and len(set(ids)) == 20


def test_inbox_pages_by_after(hive: Hive) -> None:
    async def fill() -> None:
        for _ in range(12):
            await hive.send(Agent("a"), "operator", BIG)

    asyncio.run(fill())
    after, got, batches = 0, [], 0
    while True:
        page = hive.inbox(OPERATOR, after, 10_000)
        assert line_bytes(ok(messages=page.items, more=True)) <= BUDGET
        got += [m["id"] for m in page.items]
        batches += 1
        if not page.more:
            break
        after = page.items[-1]["id"]
    assert batches > 1 and len(got) == len(set(got)) == 12 and got == sorted(got)


def test_transcript_pages_within_its_window(hive: Hive) -> None:
    entries = [("stdout", "\x02" * (60 * 1024)) for _ in range(40)]  # 360 KB each as JSON
    hive.turn_record(Agent("a", harness=True), 1, entries)
    # The window: the newest 30 after 0; the budget cuts it, the next batch goes on.
    after, got = 0, []
    first = None
    while True:
        page = hive.transcript(OPERATOR, "a", after, 30)
        assert line_bytes(ok(entries=page.items, more=True)) <= BUDGET
        first = first or page.items[0]["id"]
        got += [e["id"] for e in page.items]
        if not page.more:
            break
        after = page.items[-1]["id"]
    assert len(got) == 30 and got == list(range(first, first + 30))


def test_loose_ends_share_one_budget(hive: Hive) -> None:
    a = Agent("a")
    for _ in range(6):
        hive.ask(a, "operator", BIG, None)
        hive.request_approval(a, "custom", "d" * 1000, {"x": "\x03" * (100 * 1024)})
    seen: dict[str, list[int]] = {"questions": [], "approvals": [], "to_answer": []}
    cursors = {"questions": 0, "approvals": 0, "to_answer": 0}
    for _ in range(20):
        reply = hive.loose_ends(a, *cursors.values())
        assert line_bytes(ok(**reply)) <= BUDGET
        for key in seen:
            seen[key] += [r["id"] for r in reply[key]]
            if reply[key]:
                cursors[key] = reply[key][-1]["id"]
        if not reply.get("more"):
            break
    assert len(seen["questions"]) == len(set(seen["questions"])) == 6
    assert len(seen["approvals"]) == len(set(seen["approvals"])) == 6


def test_egress_log_pages_by_before(hive: Hive) -> None:
    row = {"agent": "a", "at": 0.0, "port": 443, "address": None, "allowed": False,
           "reason": "r" * 10_000, "bytes_up": 0, "bytes_down": 0, "closed_at": 0.0}
    for i in range(800):
        hive.store.egress.log({**row, "host": f"h{i}.example"})
    page = hive.egress_log(OPERATOR, None, 5000)
    assert page.more and line_bytes(ok(entries=page.items, more=True)) <= BUDGET
    ids = [e["id"] for e in page.items]
    while page.more:
        page = hive.egress_log(OPERATOR, None, 5000, before=ids[-1])
        ids += [e["id"] for e in page.items]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 800


def test_an_approval_payload_that_grows_past_a_line_is_refused(hive: Hive) -> None:
    payload = json.loads("[" + ",".join(["1e15"] * (MAX_LINE // 5)) + "]")
    with pytest.raises(BadRequest, match="payload too large"):
        hive.request_approval(Agent("a"), "custom", "grows", payload)
    assert hive.store.approvals.list() == []

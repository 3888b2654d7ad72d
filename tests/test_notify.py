"""core/notify.py without a hive: the queue bound, the per-agent coalescing, the link's
store, and a cage's limit hits sent to a local receiver (the whole path, with real
receivers and a real hive: tests/redteam/test_notify.py)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import WebhookReceiver
from hyperhive.config import NotifySection
from hyperhive.core.events import EventBus
from hyperhive.core.limit_hits import describe
from hyperhive.core.notify import Item, Notifier
from hyperhive.core.store import Store
from hyperhive.core.store.links import LinkTarget, LinkUsed


def question(qid: int, asker: str = "alice") -> dict[str, object]:
    return {"kind": "question", "question": {"id": qid, "asker": asker, "to": "operator", "question": "q"}}


def notifier(tmp_path: Path, **cfg: object) -> Notifier:
    config = NotifySection.model_validate({"webhooks": [{"url": "http://127.0.0.1:9/x", "format": "ntfy"}], **cfg})
    return Notifier(config, "http://hive.test", Store(tmp_path / "hive.db").links)


def test_past_the_queue_bound_new_ones_are_dropped_and_said(tmp_path: Path) -> None:
    async def run() -> None:
        n = notifier(tmp_path, queue=2, agent_interval_seconds=0)
        for qid in range(1, 6):
            n.on_event(question(qid))
        assert n.queues[0].qsize() == 2 and n.dropped == [3]
        first = n.queues[0].get_nowait()
        assert first.id == 1
        note = n.note(first, n.dropped[0])
        assert note.text.endswith("(3 earlier notification(s) dropped: the queue was full)")
        assert note.link.startswith("http://hive.test/n/")

    asyncio.run(run())


def test_an_agent_past_its_burst_is_held_for_one_digest(tmp_path: Path) -> None:
    async def run() -> None:
        n = notifier(tmp_path, agent_burst=2, agent_interval_seconds=3600)
        for qid in range(1, 6):
            n.on_event(question(qid))
        n.on_event(question(9, asker="bob"))  # another agent is not held back
        assert [n.queues[0].get_nowait().id for _ in range(3)] == [1, 2, 9] and n.queues[0].empty()
        assert dict(n._buckets["alice"].held) == {"question": 3}
        # the operator's own request and resolutions are not notified
        n.on_event({"kind": "approval", "approval": {"id": 1, "agent": "operator", "status": "pending"}})
        n.on_event({"kind": "approval", "approval": {"id": 2, "agent": "bob", "status": "approved"}})
        n.on_event({"kind": "question", "question": {"id": 3, "asker": "a", "to": "bob", "question": "q"}})
        assert n.queues[0].empty()

    asyncio.run(run())


def test_link_works_once_then_410_and_expires(tmp_path: Path) -> None:
    links = Store(tmp_path / "hive.db").links
    key = hashlib.sha256(b"t").hexdigest()
    links.save(key, LinkTarget("approval", 4, "ab" * 32), expires=1000.0, now=0.0)
    assert links.redeem(key, now=1.0) == LinkTarget("approval", 4, "ab" * 32)
    with pytest.raises(LinkUsed, match="already used"):
        links.redeem(key, now=2.0)
    other = hashlib.sha256(b"u").hexdigest()
    links.save(other, LinkTarget("question", 5, None), expires=10.0, now=0.0)
    with pytest.raises(LinkUsed, match="expired"):
        links.redeem(other, now=11.0)
    assert links.redeem(hashlib.sha256(b"nope").hexdigest()) is None


def test_item_of_an_egress_approval_says_what_it_allows() -> None:
    item = Notifier._item({"kind": "approval", "approval": {
        "id": 3, "agent": "bob", "status": "pending", "kind": "egress", "description": "d",
        "payload": {"host": "pypi.org", "port": 443}, "payload_sha256": "x"}})
    assert item == Item("approval", 3, "bob", "d", "x", "egress: allows pypi.org:443")


# -- a cage's limit hits, to a local receiver ----------------------------------------------


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    rx = WebhookReceiver()
    yield rx
    rx.server.shutdown()
    rx.server.server_close()


def status_event(name: str, trouble: str | None = None) -> dict[str, Any]:
    return {"agent": {"name": name, "running": True}, **({"trouble": trouble} if trouble else {})}


def test_a_limit_hit_reaches_every_webhook_as_one_line_within_the_agents_rate(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    """The ``trouble`` line of an ``agent_status`` event (a cage's OOM kill or refused
    forks, core/limit_hits.py) goes to each webhook once, as that line and a link to the
    agent's page; agent_status events without one (a start, a status text) are not sent;
    an agent past its burst is held for the digest, as questions and approvals are."""
    url = f"http://127.0.0.1:{receiver.port}"
    config = NotifySection.model_validate({
        "webhooks": [{"url": f"{url}/ntfy", "format": "ntfy"}, {"url": f"{url}/slack", "format": "slack"}],
        "agent_burst": 1, "agent_interval_seconds": 1.0, "backoff_seconds": 0.1,
    })
    oom = describe("bob", "oom_kills", 3, 1, 64)
    forks = describe("bob", "pids_refused", 40, 12, 64)

    async def run() -> None:
        bus = EventBus()
        n = Notifier(config, "http://hive.test", Store(tmp_path / "hive.db").links, bus)
        n.start()
        try:
            bus.publish("agent_status", status_event("bob"))  # started, say: not the operator's
            bus.publish("agent_status", status_event("bob", oom))
            bus.publish("agent_status", status_event("bob", forks))  # past bob's burst of 1: held
            bus.publish("agent_status", status_event("carol"))
            deadline = time.monotonic() + 20
            while n.sent != [2, 2]:  # bob's line, then the digest of the one held
                assert time.monotonic() < deadline, (n.sent, receiver.hits)
                await asyncio.sleep(0.05)
        finally:
            await n.close()

    asyncio.run(run())
    ntfy = receiver.sent("/ntfy")
    assert ntfy[0] == f"{oom}\nhttp://hive.test/agent/bob/"
    assert ntfy[1] == "bob: 1 limit hit(s) more (rate-limited, not sent one by one)\nhttp://hive.test/"
    assert receiver.sent("/slack")[0] == f"{oom}\n<http://hive.test/agent/bob/|open agent>"
    assert len(receiver.hits) == 4

"""core/notify.py without a hive: the queue bound, the per-agent coalescing and the link's
store (the whole path, with real receivers and a real hive: tests/redteam/test_notify.py)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from hyperhive.config import NotifySection
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

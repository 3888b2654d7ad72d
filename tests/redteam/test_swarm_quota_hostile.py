"""A compromised host fills another host's store (docs/swarm.md, "Quotas across hosts").
Host c (its own NATS credentials, nats-py, no hive code) ignores the sending side's quota:
it claims a name of its own and publishes bundles from it to bob on b, past what b holds
for one remote sender (b's own storage quota, 10,000 by default). b stores up to the
bound and leaves the rest unacked on the bus (back-pressure on c's consumer only): a's
messages to bob keep flowing, nothing the bus took is lost, and once bob reads, the
rest arrive once, in order. Each host runs a whole hive (the session's ``hives``:
tests/swarm_fixture.py, the agents paused); alice's send and bob's inbox reads are made
from their cages."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from helpers import assert_ok, wait_for
from hive_fixture import HiveProcess
from hyperhive.swarm import subjects as s
from swarm_fixture import Swarm

from .test_swarm_hostile import as_host_c

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]

NAME = "r7flood"
BOUND = 10_000  # b's default agent_pending_max: what b holds for one remote sender
BUNDLE = 1024  # the most items a bundle carries (bridge.BATCH)


@pytest.mark.attack("budget.store", ref="red team round 7: a hostile host past the receiving host's bound")
def test_a_hostile_host_cannot_fill_another_hosts_store(hives: Swarm[HiveProcess]) -> None:
    swarm, n = hives, BOUND + 240
    bob = swarm.cores["b"].caged("bob")
    bodies = [f"flood{i}" for i in range(n)]

    async def flood(nc: Any) -> None:
        kv = await nc.jetstream().key_value(s.bucket("c"))
        await kv.create(s.name_key(NAME, "c"), b"c")
        js = nc.jetstream()
        for start in range(0, n, BUNDLE):
            items = [{"id": f"r7f-{i}", "from": NAME, "to": "bob", "kind": "message", "body": bodies[i],
                      "sent_at": 0} for i in range(start, min(n, start + BUNDLE))]
            await js.publish(s.msg_subject("b", "c"), json.dumps(items).encode(), timeout=10)

    async def unclaim(nc: Any) -> None:
        await (await nc.jetstream().key_value(s.bucket("c"))).delete(s.name_key(NAME, "c"))

    got: list[dict[str, Any]] = []

    def read() -> bool:
        msgs = assert_ok(bob.call("recv", wait=0.3, max=1000))["messages"]
        if msgs:
            assert_ok(bob.call("ack", ids=[m["id"] for m in msgs]))
        got.extend(msgs)
        return bool(msgs)

    def flooded() -> list[str]:
        return [m["body"] for m in got if m["from"] == NAME]

    received = swarm.status("b")["received"]
    try:
        as_host_c(swarm, flood, settle=0)
        wait_for(lambda: "c" in swarm.status("b")["waiting"], timeout=30)
        # b holds exactly its bound of c's agent's messages; the rest wait on the bus, unacked.
        assert swarm.status("b")["received"] - received == BOUND
        # Another host's traffic still flows to bob meanwhile.
        assert_ok(swarm.cores["a"].caged("alice").call("send", to="bob", body="r7 still flowing"))
        wait_for(lambda: swarm.status("b")["received"] - received == BOUND + 1, timeout=15)
        assert swarm.status("b")["waiting"] == ["c"]
        # bob reads: room again, and the rest arrive, each once, in order, none lost.
        def all_came() -> bool:
            read()
            return len(flooded()) >= n

        wait_for(all_came, timeout=60)
        read()
        assert flooded() == bodies, (len(flooded()), flooded()[-3:])
        assert sum(m["body"] == "r7 still flowing" for m in got) == 1
        wait_for(lambda: swarm.status("b")["waiting"] == [], timeout=10)
    finally:
        as_host_c(swarm, unclaim, settle=0)
        while read():
            pass

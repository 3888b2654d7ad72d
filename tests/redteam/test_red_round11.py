"""Red team round 11: a hostile host (c, with its core's real NATS credentials, as
``as_host_c`` does) against the operator's steering of other hosts' agents (signed
actions carried on ``hive.op.<r>.from.<s>``, read raw by ``swarm/pull.py``), round 10's
fixes (the watch's and the puller's reading of stored Status headers) and the per-host
roster buckets.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any

import nats
import pytest

from helpers import assert_ok
from hyperhive.swarm import subjects as s
from swarm_faults import drain
from swarm_fixture import Swarm

from .test_swarm_hostile import as_host_c

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


async def _admin(swarm: Swarm) -> Any:
    user, password = swarm.net.admin()
    return await nats.connect(swarm.net.urls("a"), user=user, password=password)


def _row(sender: str, to: str, body: str) -> dict[str, Any]:
    return {"id": f"r11-{uuid.uuid4().hex}", "from": sender, "to": to, "kind": "message",
            "body": body, "sent_at": time.time()}


@pytest.mark.attack("swarm-reserved-sender", ref="red team round 11: c claims the name 'operator' and speaks for it")
@pytest.mark.parametrize("reserved", ["operator", "hive"])
def test_c_cannot_speak_to_bob_as_the_operator(swarm: Swarm, reserved: str) -> None:
    """No agent may be named ``operator`` (or ``hive``, ``core``, ``all``), so no honest
    host ever claims those names; but a claim key ``names.<n>.c`` is one c may write
    (``names.*.c``), and a received message's sender need only be a name (NAME_RE) that
    the roster gives to the sending host. So c claims ``operator`` in its own bucket,
    owns it, and publishes on its own subject to b a message "from operator" to bob.
    bob must never get it: the operator's word reaches another host's agent only as a
    signed action (``send`` carried from a pinned operator). A message from c's own
    carol after it (the same consumer, in order) shows b has read past it."""
    claim = s.kv_subject("c", s.name_key(reserved, "c"))
    forged = _row(reserved, "bob", f"r11 forged from {reserved}")
    marker = _row("carol", "bob", "r11 after the forged one")

    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        await js.publish(claim, b"c")
        for row in (forged, marker):
            await js.publish(s.msg_subject("b", "c"), json.dumps([row]).encode(),
                             headers={"Nats-Msg-Id": f"{row['id']}:1"})

    async def tidy(nc: Any) -> None:
        await nc.jetstream(timeout=10).publish(claim, b"", headers={"KV-Operation": "DEL"})

    try:
        assert as_host_c(swarm, attack, settle=0) == []
        got = drain(swarm, "b", "bob", 1, timeout=15, extra=1.0)
        assert [(m["from"], m["body"]) for m in got] == [("carol", marker["body"])], got
    finally:
        as_host_c(swarm, tidy, settle=0)

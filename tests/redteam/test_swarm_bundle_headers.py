"""A hostile host's bundles whose own headers read as the server's status (issue 18,
after red team round 10): host c (its core's real NATS credentials, as ``as_host_c``
does) against b's bundle consumer of c's messages (``inbox-b_c``), on whole hives (the
session's ``hives``: real cages, the agents paused; bob's inbox read from his cage,
alice's sends made from hers).

The break: b read its bundles with nats-py's ``fetch``, which takes a message's
``Status`` header for the server's reply to the pull. A stored message keeps the
headers its publisher gave it, and NATS's permissions don't see headers: a bundle c
stores with ``Status: 400`` (404, 408, 409, 503) made fetch raise, and b's consumer of
c's messages was started again (0.25 s later; the same message first, every time); one
with ``Status: 100`` was dropped as a heartbeat, unacked, and handed back after each ack
wait, before anything newer. Now b reads raw (swarm/pull.py: a stored message is one
with a ``$JS.ACK`` reply, which only the server sets) and refuses a bundle with a
``Status`` header of its own: dropped, counted, logged, acked.

Held: c's honest bundles between the forged ones reach bob each once, in order, and
none of the forged ones; alice's messages from a, sent meanwhile, too; b's consumers of
c's and a's bundles never restart (``swarm_status`` ``restarts``); every forged bundle
is refused once (``dropped``, one log line each) and acked: nothing of c's is left
pending or waiting for a redelivery.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import threading
from typing import Any

import nats
import pytest

from helpers import wait_for
from hive_fixture import HiveProcess
from hyperhive.swarm import subjects as s
from swarm_faults import drain, take
from swarm_fixture import Swarm

from .test_swarm_hostile import as_host_c

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

# The statuses nats-py's fetch reads (each raised, or a 100 dropped unacked), as headers
# c gives its own bundles; the last is the status line itself (HPUB's first header line:
# nats-py reads "NATS/1.0 400 ..." as Status and Description too).
FORGED: list[dict[str, str] | bytes] = [
    {"Status": "400", "Description": "Bad Request"},
    {"Status": "404", "Description": "No Messages"},
    {"Status": "408", "Description": "Request Timeout"},
    {"Status": "409", "Description": "Consumer Deleted"},
    {"Status": "409", "Description": "Exceeded MaxWaiting"},
    {"Status": "503"},
    {"Status": "100"},
    {"Status": "100", "Description": "Idle Heartbeat"},
    {"Status": "100", "Description": "FlowControl Request"},
    b"NATS/1.0 400 Bad Request\r\n\r\n",
]
REFUSED_LINE = "dropped a bundle on {}: a Status header of its own"
BUNDLES = ("bundles from a", "bundles from c")  # b's consumers (bridge._forever's names)


def bundle(tag: str, kind: str, i: int) -> bytes:
    """One bundle from carol (c's own agent: b takes it as c's) to bob."""
    return json.dumps([{"id": f"r18{kind}-{tag}-{i}", "from": "carol", "to": "bob", "kind": "message",
                        "body": f"{kind} {tag} {i}", "sent_at": 0}]).encode()  # fmt: skip


def _inbox_consumer(swarm: Swarm) -> tuple[int, int]:
    """As the admin: b's consumer of c's bundles, (pending, ack pending)."""

    async def go() -> tuple[int, int]:
        user, password = swarm.net.admin()
        nc = await nats.connect(swarm.net.urls("a"), user=user, password=password)
        try:
            info = await nc.jetstream().consumer_info(s.STREAM, s.consumer("b", "c"))
            return info.num_pending or 0, info.num_ack_pending or 0
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.mark.attack(
    "swarm-bundle-header-forgery",
    ref="issue 18: c's bundles with Status headers restarted b's consumer of them (nats-py's fetch)",
)
def test_status_headers_on_cs_bundles_are_refused_and_nothing_honest_is_lost(hives: Swarm[HiveProcess]) -> None:
    swarm, b, tag = hives, hives.cores["b"], secrets.token_hex(4)
    subject = s.msg_subject("b", "c")
    n = int(os.environ.get("R18N", "3"))  # rounds of every forgery (R18N=0: the control run)
    forged = [f for _ in range(n) for f in FORGED]
    honest = [f"honest {tag} {i}" for i in range(len(forged) + 1)]
    from_alice = [f"alice {tag} {i}" for i in range(10)]
    before = swarm.status("b")

    def refusals() -> int:  # b's log lines for a forged bundle refused
        return b.log_path.read_text(errors="replace").count(REFUSED_LINE.format(subject))

    log_before = refusals()

    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        for i, headers in enumerate([*forged, None]):
            await js.publish(subject, bundle(tag, "honest", i), headers={"Nats-Msg-Id": f"r18h-{tag}-{i}"})
            data = bundle(tag, "forged", i)
            if isinstance(headers, dict):
                await js.publish(subject, data, headers=headers)
            elif isinstance(headers, bytes):  # the raw protocol: a status line of c's own
                cmd = f"HPUB {subject} {len(headers)} {len(headers) + len(data)}\r\n".encode()
                await nc._send_command(cmd + headers + data + b"\r\n")
                await nc.flush()

    alice = swarm.cores["a"].caged("alice")
    replies: list[dict[str, Any]] = []

    def send_from_alice() -> None:
        replies.extend(alice.call("send", to="bob", body=body) for body in from_alice)

    try:
        sender = threading.Thread(target=send_from_alice)
        sender.start()  # alice's messages cross b's consumer of a's while c's are refused
        try:
            assert as_host_c(swarm, attack, settle=0) == []
        finally:
            sender.join()
        assert all(r.get("ok") for r in replies), replies
        # Every forged bundle was stored (the raw one too): b must refuse what it reads (each
        # refusal is counted below). HIVE_MAIL is a work queue: what b acked is gone, and
        # c's pair never holds more than its bound (session 9).
        assert sum(_inbox_consumer(swarm)) <= s.MAIL_PAIR_MSGS

        got = drain(swarm, "b", "bob", len(honest) + len(from_alice), timeout=60, extra=1.0)
        bodies = [(m["from"], m["body"]) for m in got]
        assert [x for x in bodies if x[0] == "carol"] == [("carol", h) for h in honest], bodies
        assert [x for x in bodies if x[0] == "alice"] == [("alice", a) for a in from_alice], bodies
        assert len(bodies) == len(honest) + len(from_alice), bodies  # nothing forged, nothing twice

        after = swarm.status("b")
        restarts = {k: (before["restarts"].get(k, 0), after["restarts"].get(k, 0)) for k in BUNDLES}
        assert all(x == y for x, y in restarts.values()), restarts
        assert after["dropped"] - before["dropped"] == len(forged), (before["dropped"], after["dropped"])
        # Each refused once (one line each), and acked: nothing of c's left to hand over again.
        wait_for(lambda: refusals() - log_before == len(forged), timeout=10)
        assert _inbox_consumer(swarm) == (0, 0)

        # And c's next honest bundle still comes, alone.
        async def later(nc: Any) -> None:
            await nc.jetstream().publish(subject, bundle(tag, "later", 0))

        assert as_host_c(swarm, later, settle=0) == []
        got = drain(swarm, "b", "bob", 1, timeout=15)
        assert [(m["from"], m["body"]) for m in got] == [("carol", f"later {tag} 0")], got
    finally:  # the session's swarm as it was: nothing of c's left on the bus, bob's inbox empty
        asyncio.run(_purge(swarm, subject))
        take(swarm, "b", "bob")


async def _purge(swarm: Swarm, subject: str) -> None:
    user, password = swarm.net.admin()
    nc = await nats.connect(swarm.net.urls("a"), user=user, password=password)
    try:
        await nc.jetstream().purge_stream(s.STREAM, subject=subject)
    finally:
        await nc.close()

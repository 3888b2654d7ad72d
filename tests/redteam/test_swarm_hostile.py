"""A compromised host in the swarm (docs/swarm.md, "Permissions"): host c's core is the
attacker and uses c's own NATS credentials directly (nats-py, no hive code), against
whole hives (the session's ``hive_swarm``: hive up, real cages, on each test host). NATS's
authorization refuses it everything that would speak for another host or read its
private subjects; what NATS lets through (a message on c's own subject that claims
another host's agent) the receiving host drops against the roster."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from helpers import assert_ok, wait_for
from hive_fixture import HiveProcess
from hyperhive.swarm import subjects as s
from swarm_fixture import Swarm, heard, hears

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.attack("swarm-host-spoofing", ref="issue 18: a compromised host gains nothing"),
]

Attack = Callable[[Any], Awaitable[None]]


def as_host_c(swarm: Swarm, attack: Attack, host: str = "c", settle: float = 2.0) -> list[str]:
    """Run ``attack(nc)`` on a connection as host c (or ``host``: its stolen NATS
    credentials, say); the errors the server sent (waiting up to ``settle`` seconds for
    one: 0 when the attack's own requests got their replies)."""
    errors: list[str] = []

    async def go() -> None:
        async def on_error(e: Exception) -> None:
            errors.append(str(e).lower())

        nc = await nats.connect(
            swarm.net.urls(host), user=f"host-{host}", password=swarm.net.passwords[host],
            inbox_prefix=s.inbox_prefix(host), error_cb=on_error,
        )
        try:
            await attack(nc)
            for _ in range(int(settle / 0.02)):  # the server's -ERR comes asynchronously
                if errors:
                    break
                await asyncio.sleep(0.02)
        finally:
            await nc.close()

    asyncio.run(go())
    return errors


def cpu_seconds(pid: int) -> float:
    """A process's CPU time (user + system), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flood_while_calling(swarm: Swarm, attack: Attack, agent: Any) -> float:
    """Run ``attack`` as host c in a thread while ``agent`` asks ``whoami`` every 10 ms
    (each call must succeed); the slowest call, seconds."""
    slowest = 0.0
    flood = threading.Thread(target=as_host_c, args=(swarm, attack), kwargs={"settle": 0})
    flood.start()
    try:
        while flood.is_alive():
            t = time.perf_counter()
            assert_ok(agent.call("whoami"))
            slowest = max(slowest, time.perf_counter() - t)
            time.sleep(0.01)
    finally:
        flood.join()
    return slowest


def stream_seq(swarm: Swarm, subject: str) -> int:
    """As the admin: the sequence of the newest message on ``subject`` (0: none)."""

    async def go() -> int:
        user, password = swarm.net.admin()
        nc = await nats.connect(swarm.net.urls("a"), user=user, password=password)
        try:
            return (await nc.jetstream().get_last_msg(s.STREAM, subject)).seq or 0
        except nats.js.errors.NotFoundError:
            return 0
        finally:
            await nc.close()

    return asyncio.run(go())


def violation(errors: list[str], what: str) -> None:
    assert any("permissions violation" in e and what.lower() in e for e in errors), errors


def test_host_cannot_publish_as_another_host(hives: Swarm[HiveProcess]) -> None:
    subject = s.msg_subject("b", "a")
    before = stream_seq(hives, subject)
    body = json.dumps([{"id": "forged1", "from": "alice", "to": "bob", "kind": "message",
                        "body": "forged", "sent_at": 0}]).encode()

    async def attack(nc: Any) -> None:
        await nc.publish(subject, body, headers={"Nats-Msg-Id": "forged1"})
        await nc.flush()

    violation(as_host_c(hives, attack), f'publish to "{subject}"')
    assert stream_seq(hives, subject) == before


def test_host_cannot_read_another_hosts_inbox(hives: Swarm[HiveProcess]) -> None:
    async def subscribe(nc: Any) -> None:
        await nc.subscribe(s.inbox_filter("b"))
        await nc.flush()

    violation(as_host_c(hives, subscribe), "subscription to")

    for sender in ("a", "c"):  # b's inbox of a's messages, and even of c's own
        durable = s.consumer("b", sender)

        async def pull(nc: Any, durable: str = durable) -> None:
            await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{s.STREAM}.{durable}",
                             b'{"batch":1}', reply=f"{s.inbox_prefix('c')}.x")
            await nc.flush()

        violation(as_host_c(hives, pull), f"consumer.msg.next.{s.STREAM}.{durable}")

    async def get(nc: Any) -> None:
        await nc.publish(f"$JS.API.STREAM.MSG.GET.{s.STREAM}", b'{"seq":1}',
                         reply=f"{s.inbox_prefix('c')}.x")
        await nc.flush()

    violation(as_host_c(hives, get), f"stream.msg.get.{s.STREAM}")

    async def snoop(nc: Any) -> None:  # another host's reply subjects (its pulled messages)
        await nc.subscribe(f"{s.inbox_prefix('b')}.>")
        await nc.flush()

    violation(as_host_c(hives, snoop), "subscription to")


def test_host_cannot_write_another_hosts_roster_rows(hives: Swarm[HiveProcess]) -> None:
    subject = s.kv_subject("a", s.row_key("a", "alice"))

    async def attack(nc: Any) -> None:
        await nc.publish(subject, b'{"name": "alice", "host": "c"}')
        await nc.flush()

    violation(as_host_c(hives, attack), f'publish to "{subject}"')


@pytest.mark.attack("swarm-host-spoofing", ref="red team round 5: the roster bucket had no size limits")
def test_host_cannot_write_an_oversized_roster_row(hives: Swarm[HiveProcess]) -> None:
    """Its own row key, but a value over the bucket's limit: JetStream refuses it."""
    subject = s.kv_subject("c", s.row_key("c", "bulky"))
    replies: list[dict[str, Any]] = []

    async def attack(nc: Any) -> None:
        reply = await nc.request(subject, b"x" * (s.ROSTER_VALUE_BYTES + 1), timeout=10)
        replies.append(json.loads(reply.data))

    assert as_host_c(hives, attack) == []  # its own key: no permission error ...
    assert "error" in replies[0] and "size" in replies[0]["error"]["description"], replies


def test_own_subject_claiming_another_hosts_agent_is_dropped(hive_swarm: Swarm[HiveProcess]) -> None:
    """NATS lets c publish on its own subject; b checks the claimed sender against the
    roster (alice is a's) and drops it: bob's runtime, taking his inbox in his cage on
    b, never gets a forged alice; alice's real message after it, sent from her cage on
    a, it gets once."""
    hives, b, tag = hive_swarm, hive_swarm.cores["b"], secrets.token_hex(4)
    dropped = hives.status("b")["dropped"]
    body = json.dumps([{"id": f"forged2-{tag}", "from": "alice", "to": "bob", "kind": "message",
                        "body": f"forged {tag}", "sent_at": 0}]).encode()

    async def attack(nc: Any) -> None:
        await nc.jetstream().publish(s.msg_subject("b", "c"), body)

    assert as_host_c(hives, attack) == []

    wait_for(lambda: hives.status("b")["dropped"] == dropped + 1, timeout=15)
    assert_ok(hives.cores["a"].caged("alice").call("send", to="bob", body=f"real {tag}"))
    assert hears(b, "bob", body=f"real {tag}")["from"] == "alice"
    assert [m for m in heard(b, "bob") if m["body"] == f"forged {tag}"] == []

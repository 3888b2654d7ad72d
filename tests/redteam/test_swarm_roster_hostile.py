"""A hostile host and the swarm's roster (issue 18): with its core's real NATS
credentials, host c tries to fill the roster so the other hosts can no longer write
their rows, heartbeats and name claims, and to delete the other hosts' roster watches.

Each host's roster keys live in a bucket of its own (``HIVE_ROSTER_<host>``, bounded by
NATS on its own), and a host may create, and delete, one consumer a bucket only, under
its own name (``w_<host>``, its watch): c fills only its own bucket (NATS refuses its
puts past the bound) while a and b go on writing theirs; its delete of b's watch is a
permissions violation, and so is any consumer it makes under another name (red team
round 9). A watch the bus drops (the admin deletes it here) is started again by its
host, and the roster goes on arriving.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from typing import Any

import nats
import pytest

from helpers import assert_ok, wait_for
from hyperhive.swarm import subjects as s
from swarm_fixture import Swarm

from .test_swarm_hostile import as_host_c, violation

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

FILL = "rfill"  # c's filler keys: results.c.rfill-<i>, purged (by c itself) afterwards
VALUE = b"x" * (s.ROSTER_VALUE_BYTES - 1024)  # just under the largest value a key may hold
SPEC = {"runtime": "command", "command": ["true"]}


async def _admin(swarm: Swarm) -> Any:
    user, password = swarm.net.admin()
    return await nats.connect(swarm.net.urls("a"), user=user, password=password)


def _rows(swarm: Swarm, host: str) -> set[tuple[str, str]]:
    return {(r["name"], r["host"]) for r in swarm.status(host)["agents"]}


@pytest.mark.attack("swarm-roster-fill", ref="issue 18: one shared 128 MiB roster bucket, fillable by one host")
def test_a_hostile_host_fills_only_its_own_roster_bucket(swarm: Swarm) -> None:
    """c puts 64 KiB values under its own keys until NATS refuses them (its bucket's
    bound, ROSTER_HOST_BYTES); with c's bucket full, a spawns an agent and b sees its
    row and its claim (b's owner of the name is a), and b's and a's heartbeats go on (each
    sees the other reachable). c then purges its own filler (all a purge of it can reach)."""
    refused: list[str] = []
    stored = [0]

    async def fill(nc: Any) -> None:
        async def put(i: int) -> str | None:
            reply = await nc.request(s.kv_subject("c", s.results_key("c", f"{FILL}-{i}")), VALUE, timeout=10)
            answer = json.loads(reply.data)
            return answer["error"]["description"] if "error" in answer else None

        limit = s.ROSTER_HOST_BYTES // len(VALUE) + 64  # past the bound, whatever c held before
        for start in range(0, limit, 32):
            for err in await asyncio.gather(*(put(i) for i in range(start, min(limit, start + 32)))):
                if err is None:
                    stored[0] += 1
                else:
                    refused.append(err)
            if refused:
                return

    async def purge(nc: Any) -> None:  # c's own bucket only: its permissions allow that
        await nc.jetstream().purge_stream(s.kv_stream("c"), subject=s.kv_subject("c", s.results_key("c", ">")))

    name = "rfill-new"
    try:
        assert as_host_c(swarm, fill, settle=0) == []  # its own keys: no permissions error
        assert refused and all("maximum bytes" in e for e in refused), (refused[:3], stored)
        assert stored[0] * len(VALUE) > s.ROSTER_HOST_BYTES // 2, stored  # most of the bound
        # The others' writes go on: a's new agent (its row, its claim) reaches b's roster.
        assert_ok(swarm.cores["a"].host_call("spawn", name=name, spec=SPEC))
        wait_for(lambda: (name, "a") in _rows(swarm, "b"), timeout=15)
        resp = swarm.cores["c"].host_call("spawn", name=name, spec=SPEC)
        assert not resp.get("ok"), resp  # a's claim stands: taken, even for c
        for host, other in (("a", "b"), ("b", "a")):
            wait_for(lambda host=host, other=other: any(  # type: ignore[misc]
                h["host"] == other and h["reachable"] for h in swarm.status(host)["hosts"]), timeout=10)
    finally:
        as_host_c(swarm, purge, settle=0)
        swarm.cores["a"].host_call("destroy", name=name)
    # c's heartbeat is written again once its own bucket has room: back for the next tests.
    wait_for(lambda: any(h["host"] == "c" and h["reachable"] for h in swarm.status("a")["hosts"]), timeout=15)


@pytest.mark.attack("swarm-roster-consumer", ref="issue 18: CONSUMER.DELETE on the roster allowed to every host")
def test_a_hostile_host_cannot_delete_another_hosts_roster_watch(swarm: Swarm) -> None:
    """c deletes b's watch of a's roster bucket (and of its own): a permissions violation,
    and the consumer is still there (c may delete only its own, ``w_c``). Then the
    admin deletes every watch of b's bucket (as a node's loss would): the hosts watch it
    afresh, and b's new agent still reaches a's roster."""

    async def consumers(stream: str) -> list[str]:
        nc = await _admin(swarm)
        try:
            return [c.name for c in await nc.jetstream().consumers_info(stream)]
        finally:
            await nc.close()

    victim = s.watcher("b")
    assert victim in asyncio.run(consumers(s.kv_stream("a")))
    for stream in (s.kv_stream("a"), s.kv_stream("c")):  # another's, and even its own bucket's
        subject = f"$JS.API.CONSUMER.DELETE.{stream}.{victim}"

        async def delete(nc: Any, subject: str = subject) -> None:
            await nc.publish(subject, b"", reply=nc.new_inbox())
            await nc.flush()

        violation(as_host_c(swarm, delete), f'publish to "{subject}"')
    assert victim in asyncio.run(consumers(s.kv_stream("a")))

    async def drop_all(stream: str) -> int:
        nc = await _admin(swarm)
        try:
            js = nc.jetstream()
            names = [c.name for c in await js.consumers_info(stream)]
            for n in names:
                await js.delete_consumer(stream, n)
            return len(names)
        finally:
            await nc.close()

    name = "rwatch-new"
    assert asyncio.run(drop_all(s.kv_stream("b"))) >= 2  # a's and c's watches (b's own, too)
    try:
        assert_ok(swarm.cores["b"].host_call("spawn", name=name, spec=SPEC))
        wait_for(lambda: (name, "b") in _rows(swarm, "a") and (name, "b") in _rows(swarm, "c"), timeout=20)
    finally:
        swarm.cores["b"].host_call("destroy", name=name)


@pytest.mark.attack("swarm-push-delivery", ref="issue 18: a consumer's deliver subject is the creator's choice; NATS 2.9 checks no publish permission on it")
def test_a_hostile_hosts_push_consumer_cannot_speak_for_another_host(swarm: Swarm) -> None:
    """c may make a consumer on every roster bucket (its watch, ``w_c``), and a push
    consumer's deliver subject is whatever c writes in its config: the server then
    publishes c's own bucket values on a subject c may not publish to. c deletes its own
    watch of its own bucket and makes it again aimed at a's show requests
    "from b" (``hive.show.a.from.b``) with a request it wrote in its own bucket: a must
    not take a delivery by the bus for a request from b (it would answer b, doing work
    on c's word), and answers nothing, while a real request from b is still answered.
    (The server delivers it under the subject it was stored with, c's own: the sender
    read from the subject could not be b. a drops any delivery first all the same.)"""
    forged = {"rid": "forged-by-c", "kind": "question", "id": 1}
    key = s.results_key("c", "pushed")
    seen: list[bytes] = []

    async def attack(nc: Any) -> None:
        reply = await nc.request(s.kv_subject("c", key), json.dumps(forged).encode(), timeout=10)
        assert "error" not in json.loads(reply.data), reply.data
        config = {
            "deliver_subject": s.show_subject("a", "b"),
            "filter_subject": s.kv_subject("c", key),
            "deliver_policy": "last_per_subject",
            "ack_policy": "none",
            "inactive_threshold": 5_000_000_000,
        }
        stream, name = s.kv_stream("c"), s.watcher("c")
        await nc.request(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b"", timeout=10)
        body = json.dumps({"stream_name": stream, "config": {**config, "name": name}}).encode()
        create = f"$JS.API.CONSUMER.CREATE.{stream}.{name}.{config['filter_subject']}"
        made = json.loads((await nc.request(create, body, timeout=10)).data)
        seen.append(json.dumps(made).encode())

    async def listen_then_attack() -> None:
        admin = await _admin(swarm)
        got: list[bytes] = []

        async def on_shown(m: Any) -> None:
            got.append(m.data)

        await admin.subscribe(s.shown_subject("b", "a"), cb=on_shown)
        await admin.subscribe(s.show_subject("a", "b"), cb=on_shown)
        await admin.flush()
        try:
            await asyncio.get_running_loop().run_in_executor(None, lambda: as_host_c(swarm, attack, settle=0))
            await asyncio.sleep(2.0)  # a delivery, if the server makes one, comes at once
            real = {"rid": "really-from-b", "kind": "question", "id": 1}
            await admin.publish(s.show_subject("a", "b"), json.dumps(real).encode())
            await asyncio.sleep(1.0)
        finally:
            await admin.close()
        # The server did deliver it (the lever is real), and a took nothing from it.
        assert got[0] == json.dumps(forged).encode(), got
        assert not [d for d in got[1:] if b"forged-by-c" in d], got
        assert any(b'"really-from-b", "ok"' in d for d in got), got  # b's own is answered
        log = swarm.cores["a"].log_path.read_text(errors="replace")
        # The delivery keeps the subject it was stored under (c's own), so the sender
        # read from the subject would be c anyway; a drops it before that, as a delivery.
        assert f"dropped a delivery by the bus on {s.kv_subject('c', key)}" in log

    asyncio.run(listen_then_attack())
    assert seen and b'"error"' not in seen[0], seen  # the consumer was made: the lever is real


YEARS = 10 * 365 * 86400 * 10**9  # an inactive threshold, in nanoseconds


@pytest.mark.attack("swarm-consumer-flood", ref="red team round 9: consumers a host leaves on the roster buckets")
def test_a_hostile_host_holds_at_most_one_consumer_a_roster_bucket(swarm: Swarm) -> None:
    """Red team round 9: c made consumers on a's bucket with nobody subscribed, on every
    node (R3, on disk), with a ten-year inactive threshold, by the plain create and under
    durable names of its own; 300 of them made b's name-claim reads fail, and only the
    admin could remove them. Now c's plain create, its durable create and a create under
    a's name (``w_a``) are permissions violations; under its own name, ``w_c``, c makes
    (deleting it first, as it may) five such consumers in a row: a's bucket holds one of
    c's, and only the hosts' watches. c's core then finds its watch gone quiet and makes
    it again (threshold 30 s, in memory, one replica)."""
    stream = s.kv_stream("a")
    tag = secrets.token_hex(4)
    base = {
        "deliver_policy": "last_per_subject",
        "ack_policy": "none",
        "num_replicas": 3,
        "filter_subject": s.kv_subject("a", ">"),
        "inactive_threshold": YEARS,
        "mem_storage": False,
        "deliver_subject": f"{s.inbox_prefix('c')}.r9{tag}",
    }
    durable = f"r9dur{tag}"
    refused = [
        (f"$JS.API.CONSUMER.CREATE.{stream}", base),
        (f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}", {**base, "durable_name": durable}),
        (f"$JS.API.CONSUMER.CREATE.{stream}.{s.watcher('a')}", {**base, "name": s.watcher("a")}),
        (f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.{base['filter_subject']}", {**base, "name": durable}),
    ]
    for subject, config in refused:
        body = json.dumps({"stream_name": stream, "config": config}).encode()

        async def create(nc: Any, subject: str = subject, body: bytes = body) -> None:
            await nc.publish(subject, body, reply=nc.new_inbox())
            await nc.flush()

        violation(as_host_c(swarm, create), f'publish to "{subject}"')

    own = s.watcher("c")
    replies: list[dict[str, Any]] = []

    async def flood(nc: Any) -> None:
        for i in range(5):
            await nc.request(f"$JS.API.CONSUMER.DELETE.{stream}.{own}", b"", timeout=10)
            config = {**base, "name": own, "deliver_subject": f"{s.inbox_prefix('c')}.r9{tag}.{i}"}
            body = json.dumps({"stream_name": stream, "config": config}).encode()
            subject = f"$JS.API.CONSUMER.CREATE.{stream}.{own}.{base['filter_subject']}"
            replies.append(json.loads((await nc.request(subject, body, timeout=10)).data))

    async def left() -> dict[str, float]:  # as the admin: a's bucket's consumers, thresholds
        nc = await _admin(swarm)
        try:
            infos = await nc.jetstream().consumers_info(stream)
            return {c.name: c.config.inactive_threshold or 0.0 for c in infos}
        finally:
            await nc.close()

    assert as_host_c(swarm, flood, settle=0) == []
    assert all("error" not in r for r in replies), replies  # its own name: allowed
    kept = asyncio.run(left())
    assert set(kept) <= {s.watcher(h) for h in ("a", "b", "c")}, kept
    assert kept[own] > 300, kept  # c's last one stands, alone (the lever, bounded)
    # c's core sees its watch of a's bucket stall, deletes c's leftover and makes its own.
    wait_for(lambda: 0 < asyncio.run(left()).get(own, 0) <= 60, timeout=30, interval=1.0)

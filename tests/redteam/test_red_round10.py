"""Red team round 10: a hostile host (c, with its core's real NATS credentials, as
``as_host_c`` does) against round 9's roster watches (each host's one push consumer
``w_<host>`` a bucket, swarm/watch.py), the claims read by STREAM.MSG.GET, and the
rendered NATS permissions (docs/swarm.md, "Permissions").

The break: a watch takes any delivery with a ``Status: 100`` header as the server's
flow control or idle heartbeat and publishes, as its own host, an empty message to the
subject named in its ``Nats-Consumer-Stalled`` header. A stored message keeps the
headers its writer gave it, and every host watches c's bucket: so c puts one value in
its own bucket with those two headers, naming ``$JS.API.STREAM.PURGE.KV_HIVE_ROSTER_a``,
and a purges its own roster bucket (an empty purge request: every row, heartbeat and
name claim of a's), which a never writes again (its rows and claims are cached as
published). Its name claims gone, c's claim of a's agent is the only live one.
(The forged value also leaves the watch's sequence behind it, so the next delivery is a
"gap" and the watch is made again from it: the value is replayed, and obeyed, again.)

The same header on an operator action c publishes on its own subject to b jams b's one
actions consumer: nats-py's fetch drops the stored message as a heartbeat, unacked, and
the bus hands it back first every 5 s, so the operator's actions to b wait an hour.

Held: a create under ``w_c`` whose config names ``w_a``; INFO of another's watch; a
push consumer aimed at the JetStream API or at another host's stream subjects; the
rendered permissions (every consumer a host may touch is its own, every token exact).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import nats
import pytest

from helpers import assert_ok
from hyperhive.swarm import subjects as s
from hyperhive.swarm.bridge import earliest, live_claims
from hyperhive.swarm.natsconf import host_permissions, server_config
from swarm_faults import drain
from swarm_fixture import Swarm

from .test_swarm_hostile import as_host_c, stream_seq, violation

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


async def _admin(swarm: Swarm) -> Any:
    user, password = swarm.net.admin()
    return await nats.connect(swarm.net.urls("a"), user=user, password=password)


def _consumers(swarm: Swarm, stream: str) -> dict[str, str]:
    """As the admin: ``stream``'s consumers, name -> deliver subject."""

    async def go() -> dict[str, str]:
        nc = await _admin(swarm)
        try:
            return {c.name: c.config.deliver_subject or "" for c in await nc.jetstream().consumers_info(stream)}
        finally:
            await nc.close()

    return asyncio.run(go())


def _claim_seq(swarm: Swarm, host: str, agent: str) -> int:
    """As the admin: the stream sequence of ``host``'s live claim of ``agent`` (0: none)."""

    async def go() -> int:
        nc = await _admin(swarm)
        try:
            msg = await nc.jetstream().get_last_msg(s.kv_stream(host), s.kv_subject(host, s.name_key(agent, host)))
            return 0 if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE") else msg.seq or 0
        except nats.js.errors.NotFoundError:
            return 0
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.mark.attack("swarm-host-spoofing", ref="red team round 10: the rendered permissions against docs/swarm.md")
def test_rendered_permissions_name_only_own_consumers() -> None:
    """Read the rendered config: every JetStream consumer a host's user may create, read,
    delete, pull or ack is its own (``w_<host>`` on a bucket, ``inbox-<host>_*`` and
    ``ops-<host>_*``, on the streams of now and of before: HIVE_MSGS, HIVE_OPS, read to
    their end after an upgrade), every token exact (no wildcard before the filter's ``.>``); no
    ``>`` or ``*`` anywhere in a ``$JS.API`` subject but the DIRECT.GET key and the
    create's filter; subscribe is the three entries docs/swarm.md lists."""
    conf = server_config(name="n1", listen="10.0.0.1", routes=[], store_dir=Path("/x"),
                         admin_password="p", hosts={h: "pw" for h in "abc"})
    assert conf.count("permissions:") == 3
    for host in ("a", "b", "c"):
        perms = host_permissions(host, ["a", "b", "c"])
        for subject in perms["publish"]["allow"]:
            assert f'"{subject}"' in conf
            if not subject.startswith("$JS.API.CONSUMER."):
                if subject.startswith("$JS.API."):
                    assert "*" not in subject, subject
                    assert not subject.endswith(">") or subject.startswith("$JS.API.DIRECT.GET.KV_HIVE_ROSTER_"), subject
                continue
            tokens = subject.split(".")
            verb, stream, name = tokens[3], tokens[4], tokens[5] if len(tokens) > 5 else ""
            if verb == "MSG":  # MSG.NEXT.<stream>.<consumer>
                stream, name = tokens[5], tokens[6]
            assert "*" not in stream and ">" not in stream and "*" not in name and ">" not in name, subject
            own = {s.watcher(host)} if stream.startswith("KV_HIVE_ROSTER_") else (
                {s.ops_consumer(host, o) for o in "abc" if o != host} if stream in (s.OPS_STREAM, s.LEGACY_OPS_STREAM) else {s.consumer(host, o) for o in "abc" if o != host})
            if verb == "INFO" and stream in (s.STREAM, s.OPS_STREAM):  # (session 9) how far the
                # others have read its own pairs: INFO of their consumers of them, nothing else
                own |= {(s.ops_consumer if stream == s.OPS_STREAM else s.consumer)(o, host) for o in "abc" if o != host}
            assert name in own, subject
            assert tokens[6:] in ([], [">"]) or verb == "MSG", subject
        assert perms["subscribe"]["allow"] == [f"_INBOX_{host}.>", s.show_subject(host, "*"), s.shown_subject(host, "*")]


@pytest.mark.attack("swarm-roster-consumer", ref="red team round 10: a create under c's own name whose config names another host's watch")
def test_c_cannot_reconfigure_another_hosts_watch_through_its_own_name(swarm: Swarm) -> None:
    """c's create subject names its own watch (``w_c``, allowed) while the config it sends
    names a's (``w_a``, as ``name`` or as ``durable_name``), with c's own deliver subject: had
    the server taken the config's name, c would redirect a's watch of b's bucket to itself
    (a's watch would stall, or replay from where c chose). The server refuses the mismatch;
    a's watch keeps a's own deliver subject; and c can't read a's watch (INFO) to learn
    its deliver subject to aim at."""
    stream = s.kv_stream("b")
    before = _consumers(swarm, stream)
    assert before[s.watcher("a")].startswith(s.inbox_prefix("a") + ".")
    replies: list[dict[str, Any]] = []
    own = s.watcher("c")
    base = {"deliver_subject": f"{s.inbox_prefix('c')}.r10", "ack_policy": "none",
            "deliver_policy": "all", "filter_subject": s.kv_subject("b", ">")}

    async def attack(nc: Any) -> None:
        for config in ({**base, "name": s.watcher("a")}, {**base, "durable_name": s.watcher("a")},
                       {**base, "name": s.watcher("a"), "durable_name": s.watcher("a")}):
            body = json.dumps({"stream_name": stream, "config": config}).encode()
            for subject in (f"$JS.API.CONSUMER.CREATE.{stream}.{own}",
                            f"$JS.API.CONSUMER.CREATE.{stream}.{own}.{base['filter_subject']}"):
                replies.append(json.loads((await nc.request(subject, body, timeout=10)).data))

    assert as_host_c(swarm, attack, settle=0) == []
    assert replies and all("error" in r for r in replies), replies
    after = _consumers(swarm, stream)
    assert after[s.watcher("a")].startswith(s.inbox_prefix("a") + "."), after
    assert set(after) <= {s.watcher(h) for h in "abc"}, after

    subject = f"$JS.API.CONSUMER.INFO.{stream}.{s.watcher('a')}"

    async def info(nc: Any) -> None:
        await nc.publish(subject, b"", reply=nc.new_inbox())
        await nc.flush()

    violation(as_host_c(swarm, info), f'publish to "{subject}"')


def _stored(swarm: Swarm, host: str) -> int:
    """As the admin: how many messages ``host``'s roster bucket holds."""

    async def go() -> int:
        nc = await _admin(swarm)
        try:
            return (await nc.jetstream().stream_info(s.kv_stream(host))).state.messages
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.mark.attack(
    "swarm-push-delivery",
    ref="red team round 10: a push consumer's deliver subject aimed at the JetStream API",
)
def test_c_push_consumer_aimed_at_the_js_api_purges_nothing(swarm: Swarm) -> None:
    """c remakes its watch of its own bucket with the deliver subject
    ``$JS.API.STREAM.PURGE.KV_HIVE_ROSTER_b`` (NATS 2.9 checks no publish permission on
    a deliver subject) and puts a value there, once plain and once with a forged
    ``Nats-Request-Info`` header naming b's user: the server's delivery must not be
    taken as an API request; b's bucket keeps what it holds."""
    key = s.kv_subject("c", s.row_key("c", "r10api"))
    before = _stored(swarm, "b")
    assert before > 0
    made: list[dict[str, Any]] = []
    stream, name = s.kv_stream("c"), s.watcher("c")

    async def attack(nc: Any) -> None:
        config = {"name": name, "deliver_subject": f"$JS.API.STREAM.PURGE.{s.kv_stream('b')}",
                  "filter_subject": key, "deliver_policy": "new", "ack_policy": "none",
                  "inactive_threshold": 5_000_000_000}
        await nc.request(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b"", timeout=10)
        body = json.dumps({"stream_name": stream, "config": config}).encode()
        made.append(json.loads((await nc.request(f"$JS.API.CONSUMER.CREATE.{stream}.{name}.{key}", body, timeout=10)).data))
        info = json.dumps({"acc": "HIVE", "user": "host-b", "server": "n1"})
        for headers in (None, {"Nats-Request-Info": info}):
            reply = await nc.request(key, b"", headers=headers, timeout=10)
            assert "error" not in json.loads(reply.data), reply.data
        await asyncio.sleep(1.0)

    async def tidy(nc: Any) -> None:
        await nc.jetstream().purge_stream(stream, subject=key)
        await nc.request(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b"", timeout=10)

    try:
        assert as_host_c(swarm, attack, settle=0) == []
        assert made and "error" not in made[0], made  # the consumer was made: the lever is real
        assert _stored(swarm, "b") >= before, (before, _stored(swarm, "b"))
    finally:
        as_host_c(swarm, tidy, settle=0)


@pytest.mark.attack(
    "swarm-push-delivery",
    ref="red team round 10: a push consumer's deliver subject aimed at a stream's subject",
)
def test_c_push_consumer_aimed_at_a_stream_subject_stores_nothing(swarm: Swarm) -> None:
    """c remakes its watch of its own bucket with the deliver subject of a's claim of
    alice (``$KV.HIVE_ROSTER_a.names.alice.a``), then of a message from a to b
    (``hive.msg.b.from.a``), and puts values there (a delete, by its header; a bundle from
    alice to bob): a stream listening on that subject must not store the server's
    delivery as a's write. a's claim stands, alice stays a's, and no message from a is
    stored on c's word."""
    key = s.kv_subject("c", s.row_key("c", "r10kv"))
    stream, name = s.kv_stream("c"), s.watcher("c")
    msgs_subject = s.msg_subject("b", "a")
    before = stream_seq(swarm, msgs_subject)
    assert _claim_seq(swarm, "a", "alice") > 0
    made: list[dict[str, Any]] = []
    bundle = json.dumps([{"id": "r10-forged", "from": "alice", "to": "bob", "kind": "message",
                          "body": "forged by c", "sent_at": 0}]).encode()

    async def attack(nc: Any) -> None:
        for target, data, headers in (
            (s.kv_subject("a", s.name_key("alice", "a")), b"", {"KV-Operation": "DEL"}),
            (msgs_subject, bundle, {"Nats-Msg-Id": "r10-forged"}),
        ):
            config = {"name": name, "deliver_subject": target, "filter_subject": key,
                      "deliver_policy": "new", "ack_policy": "none",
                      "inactive_threshold": 5_000_000_000}
            await nc.request(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b"", timeout=10)
            body = json.dumps({"stream_name": stream, "config": config}).encode()
            create = f"$JS.API.CONSUMER.CREATE.{stream}.{name}.{key}"
            made.append(json.loads((await nc.request(create, body, timeout=10)).data))
            reply = await nc.request(key, data, headers=headers, timeout=10)
            assert "error" not in json.loads(reply.data), reply.data
            await asyncio.sleep(0.5)

    async def tidy(nc: Any) -> None:
        await nc.jetstream().purge_stream(stream, subject=key)
        await nc.request(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b"", timeout=10)

    try:
        assert as_host_c(swarm, attack, settle=0) == []
        assert len(made) == 2 and all("error" not in m for m in made), made
        seq, owner = _claim_seq(swarm, "a", "alice"), _owner(swarm, "alice")
        after = stream_seq(swarm, msgs_subject)
        assert (seq > 0, owner, after) == (True, "a", before), (
            f"a's claim of alice: {seq or 'deleted'}; owner {owner}; hive.msg.b.from.a: {before} -> {after}"
        )
    finally:
        as_host_c(swarm, tidy, settle=0)


@pytest.mark.attack(
    "swarm-ops-jam",
    ref="red team round 10: status headers on c's own messages to b jam only c's own inbox",
)
def test_status_headers_on_cs_messages_to_b_jam_only_cs_own_inbox(swarm: Swarm) -> None:
    """The same ``Status: 100`` header on bundles c publishes on its own subject to b
    (``hive.msg.b.from.c``): b's fetch dropped them unacked, but each sending host has its
    own consumer on b (``inbox-b_c``): alice's message from a still reaches bob. (Since
    issue 18 b reads them raw and refuses them: test_swarm_bundle_headers.py.)"""
    subject = s.msg_subject("b", "c")

    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        for _ in range(3):
            await js.publish(subject, b"[]", headers={"Status": "100"})

    async def tidy() -> None:
        nc = await _admin(swarm)
        try:
            await nc.jetstream().purge_stream(s.STREAM, subject=subject)
        finally:
            await nc.close()

    try:
        assert as_host_c(swarm, attack, settle=0) == []
        assert_ok(swarm.cores["a"].agent("alice").call("send", to="bob", body="r10 after c's"))
        got = drain(swarm, "b", "bob", 1, timeout=10)
        assert [(m["from"], m["body"]) for m in got] == [("alice", "r10 after c's")], got
    finally:
        asyncio.run(tidy())


def _ops_ack_pending(swarm: Swarm, host: str) -> tuple[int, int]:
    """As the admin: ``host``'s actions consumer, (ack pending, its bound)."""

    async def go() -> tuple[int, int]:
        nc = await _admin(swarm)
        try:
            info = await nc.jetstream().consumer_info(s.OPS_STREAM, s.ops_consumer(host, "c"))
            return info.num_ack_pending or 0, info.config.max_ack_pending or 0
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.mark.attack("swarm-ops-jam", ref="red team round 10: stored messages whose headers read as a status, never acked")
def test_c_cannot_jam_bs_operator_actions_with_status_headers(swarm: Swarm) -> None:
    """c may publish on its own actions subject to b (``hive.op.b.from.c``): each is
    refused by b (no pinned key) and acked. c gives 20 of them a ``Status: 100`` header:
    nats-py's fetch takes a stored message with it for the server's idle heartbeat, drops
    it unacked and waits out its 1 s timeout; ``ops-b`` (b's one actions consumer, every
    sender's) hands it over again after 5 s, before anything newer. So b spends every
    fetch on c's, until the stream's max age (an hour). a's (the operator's) pause of bob
    must still be applied on b within the 10 s its request waits. (R10N=0: the control
    run, no forged message, is applied.)"""
    n = int(os.environ.get("R10N", "20"))
    subject = s.op_subject("b", "c")

    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        for start in range(0, n, 200):
            await asyncio.gather(*(js.publish(subject, b"{}", headers={"Status": "100"})
                                   for _ in range(start, min(n, start + 200))))

    async def tidy() -> None:
        nc = await _admin(swarm)
        try:
            await nc.jetstream().purge_stream(s.OPS_STREAM, subject=subject)
        finally:
            await nc.close()

    a = swarm.cores["a"]
    try:
        assert as_host_c(swarm, attack, settle=0) == []
        time.sleep(2.0)  # b's puller hands them out (one fetch each)
        pending = _ops_ack_pending(swarm, "b")
        reply = a.host_call("set_paused", name="bob", paused=True, host="b")
        assert reply.get("ok") and reply.get("applied"), (reply, "ops-b ack pending", pending)
    finally:
        asyncio.run(tidy())
        a.host_call("set_paused", name="bob", paused=False, host="b")
        swarm.cores["b"].host_call("set_paused", name="bob", paused=False)


def _owner(swarm: Swarm, agent: str) -> str | None:
    """As the admin: ``agent``'s owner as every host's lookup decides it (bridge.py)."""

    async def go() -> str | None:
        nc = await _admin(swarm)
        try:
            return earliest(await live_claims(nc, "abc", agent))
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.mark.attack("swarm-watch-header-forgery", ref="red team round 10: a stored value's headers read as the server's control message")
def test_a_value_in_cs_bucket_with_control_headers_makes_no_host_publish(swarm: Swarm) -> None:
    """c puts one value under its own key with ``Status: 100`` and
    ``Nats-Consumer-Stalled: $JS.API.STREAM.PURGE.KV_HIVE_ROSTER_a``, and claims a's
    alice in its own bucket (a later claim: owns nothing while a's stands). a's watch of
    c's bucket must take the value as c's (or skip it), never as the server's heartbeat:
    a's roster bucket keeps its claim, and alice stays a's. (Run last: when it breaks,
    a's bucket is purged for the rest of the session.)"""
    assert _claim_seq(swarm, "a", "alice") > 0 and _owner(swarm, "alice") == "a"
    target = f"$JS.API.STREAM.PURGE.{s.kv_stream('a')}"
    key = s.kv_subject("c", s.row_key("c", "r10hdr"))
    claim = s.kv_subject("c", s.name_key("alice", "c"))

    async def attack(nc: Any) -> None:
        headers = {"Status": "100", "Description": "Idle Heartbeat", "Nats-Consumer-Stalled": target}
        reply = await nc.request(key, b"{}", headers=headers, timeout=10)
        assert "error" not in json.loads(reply.data), reply.data
        await asyncio.sleep(2.0)  # each watch of c's bucket gets it at once (a live push consumer)
        reply = await nc.request(claim, b"", timeout=10)  # its own claim subject: allowed
        assert "error" not in json.loads(reply.data), reply.data

    async def tidy(nc: Any) -> None:  # c's own keys, c's own bucket
        # Deleted, not purged: a purge is no message, so the watchers (which now take
        # the value as c's row) would keep r10hdr for the rest of the session.
        for subject in (key, claim):
            await nc.request(subject, b"", headers={"KV-Operation": "DEL"}, timeout=10)

    try:
        assert as_host_c(swarm, attack, settle=0) == []
        seq, owner = _claim_seq(swarm, "a", "alice"), _owner(swarm, "alice")
        assert (seq > 0, owner) == (True, "a"), (
            f"a purged its own roster bucket on c's word (a's claim of alice: {seq or 'gone'});"
            f" alice's owner now: {owner}"
        )
    finally:
        as_host_c(swarm, tidy, settle=0)

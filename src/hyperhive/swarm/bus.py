"""Connecting to the swarm's NATS cluster, and creating its streams (the admin's job).

Imports ``nats``: loaded only when ``[swarm]`` is configured, or by the admin's setup.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import nats
from nats.aio.client import Client as NATS
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from hyperhive.swarm import subjects as s
from hyperhive.swarm.signing import MAX_ACTION_BYTES

log = logging.getLogger("hive.swarm")

PING_SECONDS = 1.0


async def connect(
    urls: Sequence[str],
    user: str,
    password: str,
    inbox_prefix: str | None = None,
    name: str = "hive",
    connect_timeout: float = 2.0,
) -> NATS:
    """One connection that keeps reconnecting (to any of ``urls``) for as long as it lives.
    Errors the server sends (a permissions violation, say) are logged, not raised."""

    async def on_error(e: Exception) -> None:
        log.warning("nats: %s", e)

    async def on_disconnect() -> None:
        log.info("nats: disconnected")

    async def on_reconnect() -> None:
        log.info("nats: reconnected")

    kw = {} if inbox_prefix is None else {"inbox_prefix": inbox_prefix}
    return await nats.connect(
        servers=list(urls),
        user=user,
        password=password,
        name=name,
        connect_timeout=connect_timeout,
        dont_randomize=True,  # the URLs in order: a host's own node first
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        # A node cut off by a partition sends no RST: without pings the client would sit on
        # the dead connection for minutes (nats-py's default, 2 min x 2). Three unanswered
        # pings a second apart: it moves to another node within a few seconds.
        ping_interval=PING_SECONDS,
        max_outstanding_pings=3,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **kw,
    )


async def ensure_streams(
    nc: NATS, hosts: Sequence[str], replicas: int = s.REPLICAS, timeout: float = 30.0
) -> None:
    """As the admin: the message and action streams, one durable consumer of each per
    (receiving, sending) host, and each host's roster bucket. Idempotent (for a swarm
    already running too: the streams of before are left alone); retries while the cluster elects
    its leaders."""
    js = nc.jetstream(timeout=2.0)  # short: while leaders are elected, try again soon
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await _ensure(js, hosts, replicas)
            return
        except Exception as e:  # no JetStream leader yet, a timeout: try again
            if loop.time() > deadline:
                raise
            log.info("swarm: waiting for JetStream (%s)", e)
            await asyncio.sleep(0.2)


def _work_queue(
    name: str, root: str, max_age: float, pair_msgs: int, msg_bytes: int, replicas: int
) -> StreamConfig:
    """A stream of ``<root>.<to>.from.<from>``, one subject per pair of hosts, each read by
    its pair's one consumer: what the receiver acks leaves the stream (work queue), and a
    pair keeps at most its newest ``pair_msgs`` messages of ``msg_bytes``. Limits retention
    kept everything for ``max_age``, read or not: one host could fill every node's store
    (red team round 11, ``swarm-store-fill``). A message published before its pair's
    consumer exists waits for it (interest retention would drop it at once).

    Past the bound the oldest of the pair goes (discard old), not the new one refused
    (discard new per subject): nats-server 2.9.10 checks that limit on each replica as it
    stores, and a replica that has applied the receiver's latest ack (the message gone)
    stores what one that hasn't refuses, and from then numbers the stream's messages one
    off (its ``clfs``). Trimming the oldest converges instead: the pair's oldest is the one
    its consumer (one in hand at a time, in order) acks next. An honest sender never gets
    there (bridge.py and operator.py keep below the bound): only a host's own flood of
    its own pair is trimmed."""
    return StreamConfig(
        name=name,
        subjects=[f"{root}.*.from.*"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_msgs_per_subject=pair_msgs,
        max_msg_size=msg_bytes,
        max_age=max_age,
        duplicate_window=s.DEDUP_SECONDS,
        num_replicas=replicas,
    )


async def _ensure(js: nats.js.JetStreamContext, hosts: Sequence[str], replicas: int) -> None:
    # New names, not the limits-retention HIVE_MSGS / HIVE_OPS of before (a stream's
    # retention can't change in place): those are left as they are, for the receivers to
    # read their pairs' bundles to the end (bridge.py), then for an admin to delete.
    await js.add_stream(
        _work_queue(
            s.STREAM, s.MSG_ROOT, s.MAX_AGE_SECONDS, s.MAIL_PAIR_MSGS, s.MAIL_MSG_BYTES, replicas
        )
    )
    consumers = [
        js.add_consumer(
            s.STREAM,
            ConsumerConfig(
                durable_name=s.consumer(host, sender),
                filter_subject=s.msg_subject(host, sender),
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=s.ACK_WAIT_SECONDS,
                # One bundle in hand at a time: a core killed holding one gets it again
                # (after ack_wait) before anything later, so the order per sender holds
                # across a crash; a bundle carries up to BUNDLE_BYTES of messages. One
                # consumer per (receiving, sending) host: the hosts don't wait on
                # each other's bundles.
                max_ack_pending=1,
                num_replicas=replicas,
            ),
        )
        for host in hosts
        for sender in hosts
        if sender != host
    ]
    await asyncio.gather(
        *consumers,
        *(_ensure_roster(js, host, replicas) for host in hosts),
        _ensure_ops(js, hosts, replicas),
    )


async def _ensure_roster(js: nats.js.JetStreamContext, host: str, replicas: int) -> None:
    """``host``'s roster bucket: only ``host`` writes it (natsconf.py), and NATS bounds it
    on its own (ROSTER_HOST_BYTES, ROSTER_HOST_KEYS, ROSTER_VALUE_BYTES a key; past them
    a put is refused), so a hostile host that fills its bucket stops no other host's rows,
    heartbeats, claims, questions, approvals or counts (one shared bucket before: filled
    by one host, it took every host's writes). Its stream refuses rollup headers: a
    ``Nats-Rollup: all`` on one key purges the whole stream (red team round 7, on the
    shared bucket); in a host's own bucket that would only harm itself, but the hive
    never uses rollups (nats-py makes KV streams allowing them, for ``kv.purge``)."""
    stream = s.kv_stream(host)
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        await js.create_key_value(
            KeyValueConfig(
                bucket=s.bucket(host),
                history=1,
                replicas=replicas,
                storage=StorageType.FILE,
                max_value_size=s.ROSTER_VALUE_BYTES,
                max_bytes=s.ROSTER_HOST_BYTES,
            )
        )
        info = await js.stream_info(stream)
    if info.config.allow_rollup_hdrs or info.config.max_msgs != s.ROSTER_HOST_KEYS:
        info.config.allow_rollup_hdrs = False
        info.config.max_msgs = s.ROSTER_HOST_KEYS  # (nats-py's KeyValueConfig has no field)
        await js.update_stream(info.config)


async def _ensure_ops(js: nats.js.JetStreamContext, hosts: Sequence[str], replicas: int) -> None:
    """The signed operator actions (swarm/operator.py): one stream, one consumer per
    (receiving, sending) host, as the inboxes: a host that floods its own subject to b
    (each action refused by b, one at a time) queues nothing ahead of another host's
    operator (red team round 11: 20,000 of c's held a's pause of bob past its 10 s wait;
    enough of them would have held it past its 5 minutes). A message is bounded
    (MAX_ACTION_BYTES), and old ones expire (each is refused after TTL_SECONDS anyway); a
    replayed Nats-Msg-Id is dropped, a replayed action id refused."""
    await js.add_stream(
        _work_queue(
            s.OPS_STREAM,
            s.OPS_ROOT,
            s.OPS_MAX_AGE_SECONDS,
            s.ACTIONS_PAIR_MSGS,
            MAX_ACTION_BYTES,
            replicas,
        )
    )
    await asyncio.gather(
        *(
            js.add_consumer(
                s.OPS_STREAM,
                ConsumerConfig(
                    durable_name=s.ops_consumer(host, sender),
                    filter_subject=s.ops_filter(host, sender),
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=s.ACK_WAIT_SECONDS,
                    num_replicas=replicas,
                ),
            )
            for host in hosts
            for sender in hosts
            if sender != host
        )
    )  # each is a round of the cluster's consensus

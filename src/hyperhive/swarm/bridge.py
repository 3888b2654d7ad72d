"""The swarm bridge: the task in hive-core that carries what crosses hosts
(docs/swarm.md). It imports ``nats``; the daemon imports it only with ``[swarm]``.

Four loops share one connection, each restarting on its own after a failure:
- ``_publish_loop``: the outbox, in order, one publish at a time, each marked sent
  only on JetStream's ack;
- ``_consume_loop``: one puller per other host, on this host's durable consumer of what
  that host sent, read raw (swarm/pull.py): commit (dedup by id), then ack;
- ``_roster_loop``: this host's agent rows and name claims into its own KV bucket;
- ``_watch_loop``: the roster cache (agent -> host, rows) from a watch of every
  host's bucket (swarm/watch.py: the one consumer this host may have on each);
- ``_quota_loop``: the storage quota across hosts (swarm/quota.py): what this host
  released of other hosts' agents' messages out to the bucket, and what the others
  released of this host's agents' in from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from hyperhive.core.refusals import NotFound
from hyperhive.core.store import StoreError
from hyperhive.names import NAME_RE, RESERVED
from hyperhive.swarm import asks, jsontext, quota
from hyperhive.swarm import subjects as s
from hyperhive.swarm.bus import connect
from hyperhive.swarm.operator import OperatorRelay
from hyperhive.swarm.outbox import Outgoing, SwarmStore, queue_tx
from hyperhive.swarm.pull import Puller
from hyperhive.swarm.settings import SwarmSection
from hyperhive.swarm.show import ShowRelay
from hyperhive.swarm.watch import Entry, RosterWatch
from hyperhive.wire.common import SHORT_TEXT_CHARS, Question

if TYPE_CHECKING:
    from hyperhive.core.hive import Hive

log = logging.getLogger("hive.swarm")

RETRY = 0.25  # seconds between two tries of a failed publish or a broken loop
LEGACY_EVERY = 30.0  # seconds between two looks at a pair's consumer on HIVE_MSGS
BATCH = 1024  # outbox rows read at once, and the most rows one bundle carries
ROSTER_EVERY = 1.0  # seconds between two looks at this host's agents
PRUNE_ROUNDS = 300  # roster rounds between two prunes of the swarm's tables
MAX_BODY = 1 << 20  # a received message larger than a line could be is dropped
# created_at: the agent's incarnation, what the operator's lifecycle actions on it are bound to
ROW_FIELDS = ("name", "host", "running", "paused", "status_text", "created_at")
MAX_LISTED = 10_000  # roster rows in one status reply (a sanity bound, not a page)
BUNDLE_BYTES = 512 << 10  # outbox rows to one host ride one JetStream message up to this
# A received message whose sender the cache gives to another host (or to none) is checked
# against the buckets (a lookup: one read per host's bucket, ~0.5 ms of the core's CPU). A
# host sends any sender names it likes at no cost to itself: 1,024 a bundle, each looked
# up, kept ~50% of the receiver's core busy for as long as it kept sending (red team
# round 13). A sender is looked up once a bundle, and each try of a bundle looks up at most
# this many, the next ones in its next try (after the retry's pause, a second): an honest
# host's bundle of senders this host has not seen yet (a core just started) goes on then.
LOOKUPS_PER_TRY = 64
QUOTA_EVERY = 0.25  # seconds between two rounds of quota reports, out and in
REPORTS = 1024  # released counts published in one round (the rest: the next rounds)
BUCKETS_EVERY = 2.0  # seconds between two looks for the hosts' roster buckets
SAY_EVERY = 30.0  # seconds between two log lines of "no roster bucket yet"
PURGE_EVERY = 300.0  # seconds between two purges of this host's old deletes (its bucket)
AWAY_QUIET = 6  # quiet periods (STALE_SECONDS each) before an away host's watch starts again
# Names held (ours, no agent here: another host's claim came while we held them; see
# _let_go): at most this many (each one key in our bucket: a hostile host's claims must
# not fill it), each read from the bus again every [swarm] held_recheck_seconds (a purge
# is no message for the watch), and at most LET_GO_EACH_ROUND such reads a roster round.
# HELD_MAX: the default and the most of [swarm] held_names_max (swarm/settings.py).
HELD_MAX = s.ROSTER_HOST_KEYS // 8
LET_GO_EACH_ROUND = 32


class _LookupsSpent(Exception):
    """A bundle's try has looked up as many senders as it may (LOOKUPS_PER_TRY)."""


class NoRecipient(str):
    """A refusal of a message its host's own agent sent to no agent here: nothing is
    delivered, and what it cost its sender is released at once (swarm/quota.py)."""


def roster_row(host: str, name: str, row: dict[str, Any]) -> dict[str, Any]:
    """A roster row as this host keeps it. The value is the writing host's to say (NATS
    only checks the key), so its name and host are the key's, its flags booleans and its
    status text a string no longer than an agent may set (red team round 5: a hostile
    host's row named another host's agent, with fields of any type and size)."""
    text = row.get("status_text")
    return {
        "name": name,
        "host": host,
        "running": row.get("running") is True,
        "paused": row.get("paused") is True,
        "status_text": text[:SHORT_TEXT_CHARS] if isinstance(text, str) else None,
        "created_at": incarnation(row.get("created_at")),
        "seen": time.time(),
    }


Row = tuple[tuple[str, str], dict[str, Any]]


def shares(rows: list[Row], limit: int) -> list[Row]:
    """``rows`` (sorted by host, then name) cut to ``limit``, each host given an equal
    share of it and a host with fewer rows leaving the rest of its share to the others.
    Cut in that order alone, the rows of one host that sorts first, as many as it likes
    in its own bucket, left none of the hosts after it listed: ``hive status`` showed
    none of their agents and ``hive destroy --host`` asked about no incarnation of theirs
    (red team round 15)."""
    counts = Counter(host for (host, _), _ in rows)
    share: dict[str, int] = {}
    left = limit
    for i, (host, n) in enumerate(sorted(counts.items(), key=lambda hn: hn[1])):
        share[host] = min(n, left // (len(counts) - i))
        left -= share[host]
    taken: Counter[str] = Counter()
    out: list[Row] = []
    for row in rows:
        host = row[0][0]
        if taken[host] < share[host]:
            taken[host] += 1
            out.append(row)
    return out


def incarnation(value: object) -> float | None:
    """A row's ``created_at`` if it is one a store could hold (a finite, non-negative
    number; a bool is no number), else None: an action then binds to none and is refused
    by the sending host (operator.py's ``carry``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        value = float(value)
    except OverflowError:
        # An integer past a double's range (JSON's digits have no bound): raised, it
        # ended the watch of that host's bucket at its row, every try, so none of its
        # later keys were seen and its whole bucket was replayed each second (red team
        # round 14).
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _reserved(parts: list[str]) -> bool:
    """A name claim (``names.<agent>.<host>``) or agent row (``agents.<host>.<agent>``)
    of a reserved name (``operator``, ...): no host's agent has one."""
    return (parts[1] if parts[0] == "names" else parts[2]) in RESERVED


def earliest(claims: dict[str, datetime]) -> str | None:
    """The owner of a name: the host of its live claim the bus stored first (its time
    is the server's, not the host's; a tie goes to the lower host name). An earlier claim
    can't be forged: each host may write only its own, and a claim it already has keeps
    its time (a create)."""
    return min(claims, key=lambda host: (claims[host], host)) if claims else None


async def live_claims(nc: NATS, hosts: Iterable[str], agent: str) -> dict[str, datetime]:
    """``agent``'s live claims, host -> when the bus stored it: in each host's bucket, the
    last message on ``names.<agent>.<host>`` (a delete or purge: none), read from the
    stream's leader by STREAM.MSG.GET. No consumer: a lookup makes none (red team round
    9: consumers a hostile host piled up made these reads fail)."""
    js = nc.jetstream(timeout=5.0)

    async def one(host: str) -> datetime | None:
        try:
            msg = await js.get_last_msg(
                s.kv_stream(host), s.kv_subject(host, s.name_key(agent, host))
            )
        except nats.js.errors.NotFoundError:
            return None
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE") or msg.time is None:
            return None
        return msg.time

    names = sorted(hosts)
    got = await asyncio.gather(*(one(h) for h in names))
    return {h: when for h, when in zip(names, got, strict=True) if when is not None}


def bundles(batch: list[Outgoing]) -> list[list[Outgoing]]:
    """Consecutive rows to the same host, in order, each run at most BUNDLE_BYTES (a
    row alone may be larger: NATS's max_payload, 1 MiB, is above any one message)."""
    out: list[list[Outgoing]] = []
    size = 0
    for o in batch:
        if out and out[-1][0].to_host == o.to_host and size + len(o.payload) <= BUNDLE_BYTES:
            out[-1].append(o)
            size += len(o.payload)
        else:
            out.append([o])
            size = len(o.payload)
    return out


class Bridge:
    """This host's end of the swarm; ``hive.swarm`` while it runs (see SwarmPort)."""

    def __init__(self, hive: Hive, settings: SwarmSection) -> None:
        self.hive = hive
        self.settings = settings
        self.host = settings.host
        self.store = SwarmStore(hive.store.db)
        self.nc: NATS | None = None
        self.kv: KeyValue | None = None  # this host's own roster bucket (it writes only this)
        self.buckets: dict[str, KeyValue] = {}  # host -> its roster bucket (read, watched)
        self._listed_at = -1e9  # when the hosts' buckets were last looked for
        self._missing_said_at = -1e9  # when "no roster bucket yet" was last logged
        self._bucket_missing = False  # the bus said it has no roster bucket of ours (yet)
        self._purged_at = time.monotonic()  # old deletes purged from our bucket (not at start)
        self.names: dict[str, str] = {}  # agent -> owning host, every host's (the roster cache)
        self.claims: dict[str, dict[str, datetime]] = {}  # agent -> {host: stored at}, live
        self._deletes: dict[str, datetime] = {}  # our own bucket's deletes, key -> stored at
        self._beats: dict[str, int] = {}  # host -> its heartbeat key's last revision seen
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}  # (host, agent) -> row
        self._wake = asyncio.Event()
        self._claimed: set[str] = set()  # local agents' names this host owns (claimed)
        # Names whose claim in our bucket is our doing: made by this process, or found there
        # when it started (our watch's first load). A claim that turns up later without
        # being ours to make (our credentials in another's hands) is not ours to let go.
        self._mine: set[str] = set()
        self._own_loaded = False  # our watch of our own bucket has loaded once
        self._held: dict[str, float] = {}  # name -> when to read its claims again (_let_go)
        self._read_at: dict[str, float] = {}  # a name of _mine -> when _let_go last read it
        self.waiting: set[str] = set()  # other hosts whose bundles wait for room here
        self.full: set[str] = set()  # other hosts that have not read our last MAIL_WINDOW
        self._published: dict[str, str] = {}
        self._conflicts: set[str] = set()
        self.heartbeats: dict[str, float] = {}  # host -> when (our monotonic clock) seen
        self._reachable: set[str] = set()  # the other hosts reachable at the last look
        self.received = 0
        self.dropped = 0
        # Loop -> how often it failed and was started again since the core started: a
        # bundle consumer's ("bundles from c") must not move whatever c stores (issue 18,
        # after red team round 10: c's own Status headers made nats-py's fetch raise).
        self.restarts: dict[str, int] = {}
        self._releases: dict[tuple[str, str], tuple[int, int, str, str]] = {}  # not yet applied
        self._epochs: dict[str, str] = {}  # host -> its store's epoch, as its heartbeat said
        self._epochs_due: dict[str, str] = {}  # new ones not yet applied (the quota loop)
        self.operator = OperatorRelay(self)  # the operator's roster and actions (operator.py)
        self.show = ShowRelay(self)  # other hosts' items whole (show.py)

    # -- the port (called by core/hive.py) ---------------------------------------------

    def host_of(self, agent: str) -> str | None:
        host = self.names.get(agent)
        return host if host is not None and host != self.host else None

    async def locate(self, agent: str) -> str | None:
        """The other host that owns ``agent``: the cache, else the bucket when reachable."""
        host = self.names.get(agent)
        if host is None and self.kv is not None and NAME_RE.fullmatch(agent):
            with contextlib.suppress(Exception):  # the bus is away: unknown
                host = await self._lookup(agent)
        return host if host != self.host else None

    async def send(
        self, sender: str, to: str, body: str, taken: Callable[[], None] | None = None
    ) -> int:
        try:
            host = await self.locate(to)
        except BaseException:
            if taken is not None:
                taken()
            raise
        if host is None:
            if taken is not None:
                taken()
            raise NotFound(f"no agent named {to!r}")
        # Cross-host sends of one loop turn share the core's group commit (core/
        # groupcommit.py) with local sends and acks: one transaction, each reply after it.
        row = await self.hive.commits.submit(
            lambda tx: queue_tx(tx, host, sender, to, "message", body), taken=taken
        )
        self._wake.set()
        return row

    def ask(self, asker: str, to: str, question: str, options: list[str] | None) -> Question:
        host = self.host_of(to)
        if host is None:
            raise NotFound(f"no agent named {to!r}")
        q = asks.ask(self.store.db, host, asker, to, question, options)
        self._wake.set()
        return q

    def answer(self, target: str, qid: int, text: str) -> Question | None:
        q = asks.answer(self.store.db, qid, target, text)
        if q is not None:
            self._wake.set()
        return q

    def forget(self, name: str) -> None:
        if asks.forget(self.store.db, name):
            self._wake.set()

    def status(self) -> dict[str, Any]:
        nc = self.nc
        connected = nc is not None and nc.is_connected
        hosts: dict[str, int] = dict.fromkeys(self.heartbeats, 0)
        hosts[self.host] = 0
        for host, _ in self.rows:
            hosts[host] = hosts.get(host, 0) + 1
        reachable = {h: self.reachable(h, connected) for h in hosts}
        unsent, sent = self.store.counts()
        return {
            "host": self.host,
            "connected": connected,
            "server": (
                str(nc.connected_url.geturl()) if connected and nc and nc.connected_url else None
            ),
            "hosts": [
                {"host": h, "agents": n, "reachable": reachable[h]}
                for h, n in sorted(hosts.items())
            ],
            "roster": len(self.rows),
            # False while the bus has no roster bucket of this host's (a layout of before:
            # _bucket says what to do; `hive swarm status` says it too).
            "roster_bucket": not self._bucket_missing,
            "outbox_unsent": unsent,
            "outbox_sent": sent,
            "received": self.received,
            "dropped": self.dropped + self.store.dropped,
            # Hosts whose messages wait here for room (swarm/quota.py: the bounds).
            "waiting": sorted(self.waiting),
            "full": sorted(self.full),
            "restarts": dict(sorted(self.restarts.items())),
            # Names this host holds with no agent: another host claimed them while they
            # were ours, and would inherit them (_let_go).
            "held": sorted(self._held)[:MAX_LISTED],
            # The one roster: every host's agents, this host's own included.
            "agents": [
                {**{k: row.get(k) for k in ROW_FIELDS}, "reachable": reachable.get(host, False)}
                for (host, _), row in shares(sorted(self.rows.items()), MAX_LISTED)
            ],
            **self.operator.status(),
        }

    async def carry(self, host: str, request: dict[str, Any]) -> dict[str, Any]:
        return await self.operator.carry(host, request)

    async def fetch(self, host: str, kind: str, ident: int) -> dict[str, Any]:
        return await self.show.fetch(host, kind, ident)

    def listed(self, kind: str) -> list[dict[str, Any]]:
        if kind != "agents":
            return self.operator.listed(kind)
        # The other hosts' agents, as listings beside this host's show them.
        nc = self.nc
        connected = nc is not None and nc.is_connected
        up = {h: self.reachable(h, connected) for h in {h for h, _ in self.rows}}
        others = sorted((key, row) for key, row in self.rows.items() if key[0] != self.host)
        return [
            {**{k: row.get(k) for k in ROW_FIELDS}, "reachable": up[host]}
            for (host, _), row in shares(others, MAX_LISTED)
        ]

    def reachable(self, host: str, connected: bool) -> bool:
        """This host: the bus answers. Another: its heartbeat came within STALE_SECONDS."""
        if host == self.host:
            return connected
        seen = self.heartbeats.get(host)
        return connected and seen is not None and time.monotonic() - seen < s.STALE_SECONDS

    # -- the task ----------------------------------------------------------------------

    async def run(self) -> None:
        """Connect (retrying while the bus is away: the hive works alone meanwhile),
        then run the four loops until cancelled."""
        while self.nc is None:
            try:
                self.nc = await connect(
                    self.settings.urls,
                    self.settings.user(),
                    self.settings.password(),
                    inbox_prefix=s.inbox_prefix(self.host),
                    name=f"hive-{self.host}",
                )
            except Exception as e:
                log.warning("swarm: can't reach the bus yet (%s); retrying", e)
                await asyncio.sleep(1.0)
        log.info("swarm: host %s connected to %s", self.host, self.nc.connected_url)
        print(f"hive-core: swarm host={self.host} connected", flush=True)
        loops: list[Callable[[], Awaitable[None]]] = [
            self._publish_loop, self._consume_loop, self._roster_loop, self._watch_loop,
            self._quota_loop,
        ]  # fmt: skip
        loops += self.operator.loops() + self.show.loops()
        try:
            await asyncio.gather(*(self._forever(f) for f in loops))
        finally:
            await self.close()

    async def close(self) -> None:
        nc, self.nc = self.nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _forever(
        self, loop: Callable[[], Awaitable[None]], retry: float = RETRY, name: str | None = None
    ) -> None:
        """Run ``loop`` again after each failure (counted in ``restarts[name]``; a bound
        method's name by default, its class's too: the operator has a _consume_loop)."""
        name = name or getattr(loop, "__qualname__", None) or repr(loop)
        while True:
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the bus went away mid-call, say: start the loop again
                self.restarts[name] = self.restarts.get(name, 0) + 1
                log.warning("swarm: %s failed (%s: %s); restarting it", name, type(e).__name__, e)
                await asyncio.sleep(retry)

    def _js(self) -> nats.js.JetStreamContext:
        assert self.nc is not None
        return self.nc.jetstream(timeout=2.0)

    async def _bucket(self) -> KeyValue:
        """This host's own roster bucket, waiting (and saying so every SAY_EVERY seconds)
        while the bus has none for it: a swarm set up before per-host buckets, whose
        admin has not run ``ensure_streams`` (nor rendered the nodes' configs) again."""
        while self.kv is None:
            try:
                self.kv = await self._js().key_value(s.bucket(self.host))
            except (nats.js.errors.BucketNotFoundError, nats.errors.TimeoutError) as e:
                self._bucket_missing = True
                if time.monotonic() - self._missing_said_at > SAY_EVERY:
                    self._missing_said_at = time.monotonic()
                    log.warning(
                        "swarm: no roster bucket %s on the bus yet (%s): as the admin, render"
                        " the nodes' configs again (python -m hyperhive.swarm.natsconf), restart"
                        " them one at a time and run ensure_streams (docs/swarm.md, Upgrading)",
                        s.bucket(self.host),
                        type(e).__name__,
                    )
                await asyncio.sleep(1.0)
        self._bucket_missing = False
        return self.kv

    async def _buckets(self, fresh: bool = False) -> dict[str, KeyValue]:
        """Every host's roster bucket, found by the streams' names (the admin makes one per
        host; only the admin can), looked for again at most every BUCKETS_EVERY seconds."""
        now = time.monotonic()
        if self.buckets and not fresh and now - self._listed_at < BUCKETS_EVERY:
            return self.buckets
        self._listed_at = now
        own = await self._bucket()
        self.buckets.setdefault(self.host, own)
        assert self.nc is not None
        reply = await self.nc.request("$JS.API.STREAM.NAMES", b"{}", timeout=2.0)
        names = json.loads(reply.data).get("streams") or []
        for stream in names if isinstance(names, list) else []:
            host = s.host_of_stream(stream) if isinstance(stream, str) else None
            if host is not None and NAME_RE.fullmatch(host) and host not in self.buckets:
                with contextlib.suppress(nats.js.errors.BucketNotFoundError):
                    self.buckets[host] = await self._js().key_value(s.bucket(host))
        return self.buckets

    # -- outgoing ------------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        js = self._js()
        # Hosts with s.MAIL_WINDOW of our bundles unacked on their pair (down, or slow) ->
        # when to ask again. Their rows wait in the outbox, in order; the other hosts' go
        # on meanwhile. Past the pair's bound (s.MAIL_PAIR_MSGS) the bus drops its oldest
        # (bus.py): an honest sender must never get there, and so counts: what it published
        # since it last asked the pair's consumer, plus what that had yet to ack.
        full: dict[str, float] = {}
        unacked: dict[str, int] = {}  # host -> at most this many of our bundles unacked
        while True:
            now = time.monotonic()
            for host in [h for h, at in full.items() if at <= now]:
                del full[host]
            batch = self.store.unsent(BATCH, skip=full)
            if not batch:
                self._wake.clear()
                if not self.store.unsent(1, skip=full):  # nothing queued since the read
                    soonest = min(full.values(), default=None)
                    wait = None if soonest is None else max(0.0, soonest - time.monotonic())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                continue
            held: set[str] = set()
            for bundle in bundles(batch):
                to_host = bundle[0].to_host
                if to_host in held:
                    continue  # an earlier bundle to it waits: so does this one, behind it
                if unacked.get(to_host, s.MAIL_WINDOW) >= s.MAIL_WINDOW:
                    unacked[to_host] = await self._unacked(to_host)
                    if unacked[to_host] >= s.MAIL_WINDOW:
                        if to_host not in self.full:
                            log.info(
                                "swarm: messages to host %s wait: it has not read ours", to_host
                            )
                        self.full.add(to_host)
                        full[to_host] = time.monotonic() + RETRY
                        held.add(to_host)
                        continue
                # Its senders' names are claimed before their messages go out, so the
                # receiver finds them in the bucket (an agent spawned a moment ago, say).
                # Not a withdraw's or cancel's: its sender was destroyed (asks.forget), and
                # its name must stay free (the receiver checks those against its tables).
                senders = {o.sender for o in bundle if o.kind not in asks.CLOSING}
                for sender in senders - self._claimed - self._conflicts:
                    await self._claim(await self._bucket(), sender)
                # One bundle at a time, retried until acked: a later one never overtakes it.
                # Its Nats-Msg-Id is fixed for its tries: a retry of the same bundle is
                # dropped by JetStream; the receiver drops each message it has already.
                # Random, not only its rows' ids: the dedup window is the stream's, whatever
                # the subject, and a row id is a prefix and a count that every host we
                # write reads off our bundles: c published our next ids first, and the bus
                # dropped our bundles as duplicates (red team round 11).
                payload = b"[" + b",".join(o.payload for o in bundle) + b"]"
                dedup = f"{bundle[0].msg_id}.{len(bundle)}.{secrets.token_hex(8)}"
                said = False
                while True:
                    try:
                        await js.publish(
                            s.msg_subject(to_host, self.host),
                            payload,
                            timeout=2.0,
                            # The store whose count these rows are in (quota.sender_gen_tx).
                            headers={"Nats-Msg-Id": dedup, s.STORE_HEADER: self.store.epoch},
                        )
                        break
                    except (nats.errors.Error, TimeoutError, nats.js.errors.Error) as e:
                        if not said:
                            log.info("swarm: publish of %s waits (%s)", bundle[0].msg_id, e)
                            said = True
                        await asyncio.sleep(RETRY)
                unacked[to_host] += 1
                self.full.discard(to_host)
                self.store.mark_sent([o.row for o in bundle])

    async def _unacked(self, to_host: str) -> int:
        """How many of our bundles ``to_host``'s consumer of them has yet to ack (pending
        and in hand); the window, so that we wait, when the bus can't say."""
        try:
            info = await self._js().consumer_info(s.STREAM, s.consumer(to_host, self.host))
        except (nats.errors.Error, TimeoutError, nats.js.errors.Error) as e:
            log.info("swarm: can't see how far host %s has read: %s", to_host, e)
            return s.MAIL_WINDOW
        return (info.num_pending or 0) + (info.num_ack_pending or 0)

    # -- incoming ------------------------------------------------------------------------

    async def _consume_loop(self) -> None:
        """One puller per other host, each on its own durable consumer, started as the
        host shows up in the roster: its heartbeat key, which only that host may write
        (a name claim's value could name any host)."""
        pullers: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                for host in [h for h in self.heartbeats if h != self.host]:
                    if host not in pullers:
                        pullers[host] = asyncio.create_task(
                            self._forever(
                                functools.partial(self._consume_from, host),
                                name=f"bundles from {host}",
                            )
                        )
                await asyncio.sleep(ROSTER_EVERY / 4)
        finally:
            for task in pullers.values():
                task.cancel()
            await asyncio.gather(*pullers.values(), return_exceptions=True)

    async def _consume_from(self, from_host: str) -> None:
        # Read raw, not with nats-py's fetch: fetch takes a stored message's own Status
        # header for the server's (a 400, 404, 408 or 409 raised, a 100 was dropped
        # unacked), and c may store any header on its own subject to us. The Puller
        # tells the server's replies from stored messages by their reply subject (pull.py).
        assert self.nc is not None
        puller = Puller(
            self.nc, s.STREAM, s.consumer(self.host, from_host), s.inbox_prefix(self.host)
        )
        await puller.start()
        legacy_left, legacy_at = True, -1e9
        try:
            while True:
                # What that host sent us on the stream of before, first (an upgrade from
                # HIVE_MSGS: subjects.py), and again now and then while it may hold some.
                if legacy_left and time.monotonic() - legacy_at >= LEGACY_EVERY:
                    legacy_left = await self._drain_legacy(from_host)
                    legacy_at = time.monotonic()
                # One at a time: the consumer hands out one bundle at a time (bus.py).
                m = await puller.next(wait=1.0)
                if m is None:
                    continue  # nothing waiting
                await self._commit(m)
        finally:
            with contextlib.suppress(Exception):
                await puller.stop()

    async def _commit(self, m: Msg) -> None:
        # Until it is stored (a full disk, say): the ones after it wait, so the order per
        # sender holds; the bus is told it is still in hand. Its senders looked up so far
        # are kept between its tries (LOOKUPS_PER_TRY).
        looked: dict[str, str | None] = {}
        while not await self._receive(m, looked):
            with contextlib.suppress(Exception):
                await m.in_progress()
            await asyncio.sleep(RETRY * 4)

    async def _drain_legacy(self, from_host: str) -> bool:
        """Read what ``from_host`` sent here on the limits-retention stream of before
        (``HIVE_MSGS``), to its end, before its bundles on ``HIVE_MAIL``: no host may
        publish there any more (natsconf.py), and an acked bundle there must still arrive,
        in order. False once there is no such stream or consumer (nothing to read, ever);
        True if it is read to its end for now, or the bus could not say (tried again
        after LEGACY_EVERY seconds)."""
        assert self.nc is not None
        js, durable = self._js(), s.consumer(self.host, from_host)
        puller: Puller | None = None
        try:
            while True:
                try:
                    info = await js.consumer_info(s.LEGACY_STREAM, durable)
                except nats.js.errors.NotFoundError:
                    return False
                except (nats.errors.Error, TimeoutError, nats.js.errors.Error) as e:
                    log.info("swarm: can't read %s on %s yet: %s", durable, s.LEGACY_STREAM, e)
                    return True
                if not (info.num_pending or info.num_ack_pending):
                    return True
                if puller is None:
                    log.info("swarm: reading host %s's bundles on %s", from_host, s.LEGACY_STREAM)
                    puller = Puller(self.nc, s.LEGACY_STREAM, durable, s.inbox_prefix(self.host))
                    await puller.start()
                m = await puller.next(wait=1.0)
                if m is not None:
                    await self._commit(m)
        finally:
            if puller is not None:
                with contextlib.suppress(Exception):
                    await puller.stop()

    async def _receive(self, m: Msg, looked: dict[str, str | None]) -> bool:
        """Commit one bundle to its recipients' inboxes, then ack it; False if it could not
        be stored (left unacked: try again). A message that can never be delivered is
        dropped. ``looked``: its senders' owners as the buckets said in its earlier tries."""
        budget = [LOOKUPS_PER_TRY]  # lookups left to this try
        from_host = s.from_host_of(m.subject)
        # A bridge publishes a bundle with a Nats-Msg-Id header and its store's (no
        # other): a Status header is its sending host's forgery (the server's statuses
        # never reach here: pull.py), and the whole bundle is refused with it (issue 18).
        forged = "Status" in (m.headers or {})
        store = (m.headers or {}).get(s.STORE_HEADER)
        sender_epoch = store if quota.is_epoch(store) else None
        try:
            items = jsontext.loads(m.data) if from_host is not None and not forged else None
        except (ValueError, RecursionError):  # deep nesting too: dropped, not redelivered forever
            items = None
        if from_host is None or not isinstance(items, list) or not 0 < len(items) <= BATCH:
            self.dropped += 1
            what = "a Status header of its own" if forged else "not a list of messages"
            log.warning("swarm: dropped a bundle on %s: %s", m.subject, what)
            await m.ack()
            return True
        good: list[tuple[dict[str, Any], bool]] = []
        known: set[tuple[str, str]] = set()  # (from, to) pairs found good in this bundle
        refused: list[str] = []  # counted and said once the whole bundle is checked
        for p in items:
            try:
                why = await self._refusal(from_host, p, known, looked, budget)
            except (nats.errors.Error, TimeoutError, nats.js.errors.Error) as e:
                log.info("swarm: can't check a sender on %s yet: %s", m.subject, e)
                return False
            except _LookupsSpent:
                return False  # the rest in the next try, after the caller's pause
            if why is None:
                good.append((p, True))
            else:
                refused.append(why)
                if isinstance(why, NoRecipient):  # sent by that host's own agent: released
                    good.append((p, False))
        for why in refused:
            self.dropped += 1
            log.warning("swarm: dropped a message on %s: %s", m.subject, why)
        limits = self.hive.config.limits
        try:
            msgs, whole = self.store.take(
                good,
                from_host,
                (limits.agent_pending_max, limits.agent_store_mib << 20),
                (self.settings.host_pending_max, self.settings.host_store_mib << 20),
                sender_epoch,
            )
        except StoreError as e:
            log.warning("swarm: can't store %d message(s) yet: %s", len(good), e)
            return False
        self.received += len(msgs)
        for msg in msgs:
            self.hive.delivered(msg)
        if not whole:
            # Past what this host holds for a sender, or for that host: the rest of the
            # bundle (and that host's later ones) wait until recipients read; never dropped.
            if from_host not in self.waiting:
                log.warning("swarm: host %s's messages wait: its storage bound here", from_host)
            self.waiting.add(from_host)
            return False
        self.waiting.discard(from_host)
        await m.ack()  # only now: a crash before it means a redelivery, dropped as seen
        return True

    async def _refusal(
        self,
        from_host: str,
        p: object,
        known: set[tuple[str, str]],
        looked: dict[str, str | None],
        budget: list[int],
    ) -> str | None:
        """Why a received message can't be delivered, or None. The subject's sending host
        is vouched for by NATS's permissions; its agent must be that host's in the roster.
        ``known``: the (from, to) pairs of the bundle found good so far (checked once);
        ``looked``: the senders the bucket was read for in this bundle, and ``budget``
        what is left of this try's lookups (_LookupsSpent when none is)."""
        if not (
            isinstance(p, dict)
            and isinstance(p.get("id"), str)
            and 0 < len(p["id"]) <= 64
            and isinstance(p.get("body"), str)
            and len(p["body"]) <= MAX_BODY
            and p.get("kind") in ("message", *asks.KINDS)
            and all(isinstance(p.get(k), str) and NAME_RE.fullmatch(p[k]) for k in ("from", "to"))
            and (p["kind"] == "message" or asks.well_formed(p))
        ):
            return "malformed"
        if p["from"] in RESERVED or p["to"] in RESERVED:
            # Between hosts a message is always an agent's to an agent: no host claims
            # "operator" (no agent may be named so), but a hostile one could, in its own
            # bucket, and speak as the operator to our agents (red team round 11). The
            # operator's word reaches another host only as a signed action (operator.py).
            return f"{p['from']!r} to {p['to']!r}: a reserved name is no agent's"
        if p["kind"] in asks.CLOSING:
            # Its sender (or recipient) may be gone already: what it may close is decided by
            # the sending host alone (NATS vouches for it) and this host's tables (asks.py).
            return None
        if (p["from"], p["to"]) in known:
            return None
        owner = self.names.get(p["from"])
        if owner != from_host:
            # The cache may be behind (a core just started, an agent just spawned): the
            # bucket decides. A bus error raises, and the bundle is tried again: dropping
            # it would lose a message the bus has acked to its sender. Once a bundle per
            # sender, and no more than the try's budget (LOOKUPS_PER_TRY).
            if p["from"] in looked:
                owner = looked[p["from"]]
            else:
                if budget[0] <= 0:
                    raise _LookupsSpent
                budget[0] -= 1
                owner = looked[p["from"]] = await self._lookup(p["from"])
        if owner != from_host:
            return f"host {from_host} spoke for agent {p['from']!r}, which is {owner or 'no one'}'s"
        if not self.hive.exists(p["to"]):
            return NoRecipient(f"no agent named {p['to']!r} here")
        known.add((p["from"], p["to"]))
        return None

    # -- the roster ----------------------------------------------------------------------

    async def _roster_loop(self) -> None:
        kv = await self._bucket()
        rounds = 0
        while True:
            await self._publish_roster(kv)
            self._reachability()
            if rounds % PRUNE_ROUNDS == 0:
                self.store.prune()  # sent outbox rows and old received ids
            if time.monotonic() - self._purged_at > PURGE_EVERY:
                self._purged_at = time.monotonic()  # (a failure waits for the next turn)
                try:
                    await self._purge_deletes(kv)
                except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as e:
                    log.info(
                        "swarm: can't purge old deletes from %s now (%s)", s.bucket(self.host), e
                    )
            rounds += 1
            await asyncio.sleep(ROSTER_EVERY)

    def _reachability(self) -> None:
        """Tell open dashboards when another host turns unreachable or back (its agents'
        state): a heartbeat going stale is no event of its own."""
        nc = self.nc
        connected = nc is not None and nc.is_connected
        now = {h for h in self.heartbeats if h != self.host and self.reachable(h, connected)}
        if now != self._reachable:
            for host in now ^ self._reachable:
                self.hive.bus.publish("swarm", {"host": host, "what": "reachable"})
            self._reachable = now

    async def _publish_roster(self, kv: KeyValue) -> None:
        # The store's epoch: a new one tells the others this host's store was reset (the
        # quota it held for their agents is theirs again: quota.host_epoch_tx).
        beat = {"at": time.time(), "epoch": self.store.epoch}
        await kv.put(s.host_key(self.host), json.dumps(beat).encode())
        local = {r.name: r for r in self.hive.store.agents.all()}
        for name, row in local.items():
            if name not in self._claimed:
                await self._claim(kv, name)
            data = json.dumps(
                {
                    "name": name,
                    "host": self.host,
                    "running": self.hive.lifecycle.running(name),
                    "paused": bool(row.paused),
                    "status_text": row.status_text,
                    "created_at": row.created_at,
                },
                sort_keys=True,
            )
            if self._published.get(name) != data:
                await kv.put(s.row_key(self.host, name), data.encode())
                self._published[name] = data
        for name in [n for n in self._published if n not in local]:
            await kv.delete(s.row_key(self.host, name))
            del self._published[name]
            self._claimed.discard(name)
        await self._let_go(kv)

    async def _let_go(self, kv: KeyValue) -> None:
        """Delete our claims of names no agent here has (destroyed, or gone while this
        core was down): free again, swarm-wide. Unless we own the name and another host's
        claim of it is live: that claim was stored while the name was ours, and with ours
        gone it would be the earliest, its host the owner (red team round 9: a hostile
        host kept each losing claim and inherited every name its owner let go, even one
        destroyed and spawned again a moment later). Such a name is **held**: our claim
        stays, with no agent, until no other host claims it (then it is let go), or an
        agent of that name is spawned here again (then it is simply ours). The decision
        is the bus's claims, read afresh (the cache may be behind), right before a delete.
        A hold costs one key of our bucket: past [swarm] held_names_max (at most
        HELD_MAX), the oldest are let go."""
        now = time.monotonic()
        reads = 0

        def turn(name: str) -> tuple[int, float]:
            """When ``name`` is next read. First the names the cache says no other host
            claims (to be let go) or that are not held yet (to be held), the one read
            longest ago first; then the held ones whose recheck is due, soonest first.
            By name, the reads went to the first ~930 held names over and over (32 a
            round, each again after 30 s): the holds stopped growing there, and a name past
            them was never read again, not even once the other host's claim was deleted
            (tests/test_swarm_limits.py). Longest ago first, a host that deletes and
            makes again its claims of names that sort first can't keep a let-go waiting:
            each such name, once read, waits behind the others."""
            cached = self.claims.get(name, {})
            if not (earliest(cached) == self.host and len(cached) > 1):
                return (0, self._read_at.get(name, 0.0))
            if name not in self._held:
                return (0, self._read_at.get(name, 0.0))
            return (1, self._held[name])

        gone = [n for n in self._mine if n not in self._claimed]
        for _, name in sorted((turn(n), n) for n in gone):
            kind, at = turn(name)
            if kind == 1 and at > now:
                break  # held, and the rest's rechecks are later still
            if reads >= LET_GO_EACH_ROUND:
                break  # the rest: the next rounds'
            if self.hive.exists(name):
                continue  # being spawned: _claim's
            if not reads:
                await self._buckets()  # every host's bucket (one found since, say)
            reads += 1
            self._read_at[name] = now
            await self._lookup(name)
            claims = self.claims.get(name, {})
            if self.host not in claims:
                self._mine.discard(name)  # gone already (deleted before a restart, say)
                self._held.pop(name, None)
                self._read_at.pop(name, None)
            elif earliest(claims) == self.host and len(claims) > 1:
                if name not in self._held:
                    others = sorted(h for h in claims if h != self.host)
                    log.warning(
                        "swarm: agent name %r is gone here but stays claimed: host(s) %s"
                        " claimed it while it was ours, and would inherit it",
                        name,
                        ", ".join(others),
                    )
                self._held[name] = now + self.settings.held_recheck_seconds
            elif not self.hive.exists(name):
                await self._unclaim(kv, name)
        most = self.settings.held_names_max
        if len(self._held) > most:

            def claimed_at(name: str) -> float:
                at = self.claims.get(name, {}).get(self.host)
                return at.timestamp() if at is not None else 0.0

            for name in sorted(self._held, key=claimed_at)[: len(self._held) - most]:
                log.warning("swarm: agent name %r let go: more than %d held", name, most)
                await self._unclaim(kv, name)

    async def _unclaim(self, kv: KeyValue, name: str) -> None:
        """Delete our claim of ``name`` (free again, swarm-wide, unless an earlier one
        stands)."""
        await kv.delete(s.name_key(name, self.host))
        self._mine.discard(name)
        self._held.pop(name, None)
        self._read_at.pop(name, None)
        self.claims.get(name, {}).pop(self.host, None)
        self._own(name)
        if self.hive.exists(name):  # spawned meanwhile: claimed again next round
            self._claimed.discard(name)

    async def _purge_deletes(self, kv: KeyValue, older: float = s.PURGE_AFTER_SECONDS) -> None:
        """Purge this host's own deletes older than ``older`` seconds (every question,
        approval and outcome leaves one), so its bucket's bound is spent on live keys.
        Every watcher has seen them by then; a new one needs no delete of a key it never
        saw. Which they are, our watch of our own bucket says (``_own_entry``): a scan of
        its own would be a second consumer, and NATS lets us have one a bucket."""
        now = time.time()
        old = [k for k, at in self._deletes.items() if now - at.timestamp() > older]
        for key in old:
            await self._js().purge_stream(
                s.kv_stream(self.host), subject=s.kv_subject(self.host, key)
            )
            self._deletes.pop(key, None)

    def _own_entry(self, entry: Entry | None) -> None:
        """Note a delete in our own bucket (to purge it later), or a put that undoes one;
        and, in the first load of our bucket (None: through), the claims and rows found
        there (what a core of before left: _let_go and _publish_roster see to them)."""
        if entry is None:
            self._own_loaded = True
            return
        if entry.operation in ("DEL", "PURGE"):
            self._deletes[entry.key] = entry.created
        else:
            self._deletes.pop(entry.key, None)
            parts = entry.key.split(".")
            if not self._own_loaded and len(parts) == 3:
                if parts[0] == "names" and parts[2] == self.host:
                    self._mine.add(parts[1])
                elif parts[0] == "agents" and parts[1] == self.host:
                    # A row left by a core stopped before its next round (an agent
                    # destroyed just before): put again if the agent is here, else deleted.
                    self._published.setdefault(parts[2], "")

    async def _claim(self, kv: KeyValue, name: str) -> None:
        """Make ``name`` this host's swarm-wide: write our own claim (a create keeps an
        existing claim's revision), then the earliest live claim owns it. A name another
        host holds is a conflict: our claim is taken back, and tried again next round."""
        holder = self.names.get(name)
        if holder in (None, self.host):
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):  # ours already
                await kv.create(s.name_key(name, self.host), self.host.encode())
            self._mine.add(name)
            holder = await self._lookup(name)
            if holder == self.host:
                self._claimed.add(name)
                self._conflicts.discard(name)
                self._held.pop(name, None)  # held no more: its agent is here again
                return
            await kv.delete(s.name_key(name, self.host))
            self._mine.discard(name)
        if holder is not None and name not in self._conflicts:
            self._conflicts.add(name)
            log.error("swarm: agent name %r is held by host %s; not claimed here", name, holder)

    async def _lookup(self, agent: str) -> str | None:
        """``agent``'s owner as the buckets say now (the cache may be behind); cached."""
        # The buckets the watch loop has found (it looks every BUCKETS_EVERY seconds).
        assert self.nc is not None
        claims = await live_claims(self.nc, self.buckets or await self._buckets(), agent)
        self.claims[agent] = claims  # the bucket now: the watch may be behind
        self._own(agent)
        return earliest(claims)

    def _own(self, agent: str) -> None:
        """Recompute ``agent``'s owner in the cache from its live claims."""
        owner = earliest(self.claims.get(agent, {}))
        if owner is None:
            self.claims.pop(agent, None)
            self.names.pop(agent, None)
        else:
            self.names[agent] = owner

    async def _watch_loop(self) -> None:
        """One watch per host's bucket, started as the bucket is found."""
        watches: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                try:
                    found = await self._buckets(fresh=True)
                except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as e:
                    # No answer while the bus elects its leaders, say: the watches go on.
                    log.info("swarm: can't look for the hosts' roster buckets now (%s)", e)
                    found = self.buckets
                for host in list(found):
                    if host not in watches:
                        # A watch that fails (no leader for that bucket yet) is tried
                        # again after a second: each try is a consumer made, on a bus that
                        # may be electing its leaders.
                        watches[host] = asyncio.create_task(
                            self._forever(
                                functools.partial(self._watch, host),
                                retry=1.0,
                                name=f"watch of {host}",
                            )
                        )
                await asyncio.sleep(BUCKETS_EVERY)
        finally:
            for task in watches.values():
                task.cancel()
            await asyncio.gather(*watches.values(), return_exceptions=True)

    async def _watch(self, host: str) -> None:
        assert self.nc is not None
        watcher = RosterWatch(self.nc, self.host, host)
        quiet = 0
        try:
            await watcher.start()
            while True:
                try:
                    entry = await watcher.updates(timeout=s.STALE_SECONDS)
                except TimeoutError:
                    # A live host puts its heartbeat every second: a watch that brings
                    # nothing for this long is stuck (its node died, say), or the host is
                    # away (then looked at again less often). A new watch replays every
                    # key's latest value, deletes included (a replayed heartbeat is no
                    # news: its revision is the one seen).
                    quiet += 1
                    seen = self.heartbeats.get(host)
                    beating = seen is not None and time.monotonic() - seen < 2 * s.STALE_SECONDS
                    if beating or quiet >= AWAY_QUIET:
                        log.debug(
                            "swarm: the watch of %s's roster went quiet; watching afresh", host
                        )
                        return
                    continue
                quiet = 0
                if host == self.host:
                    self._own_entry(entry)
                if entry is None:
                    continue  # the initial load is through
                self._apply(
                    host, entry.key, entry.value, entry.operation, entry.revision, entry.created
                )
        finally:
            await watcher.stop()

    # -- the storage quota across hosts (swarm/quota.py) ------------------------------

    async def _quota_loop(self) -> None:
        kv = await self._bucket()
        while True:
            done = self.store.unreported(REPORTS)
            for host, agent, rows, nbytes, theirs in done:
                # Which store of theirs this counts for: the one whose bundles it came in.
                said = [rows, nbytes, self.store.epoch, *([theirs] if theirs else [])]
                value = json.dumps(said).encode()
                await kv.put(s.released_key(self.host, host, agent), value)
            if done:
                self.store.reported(done)
            self._apply_epochs()
            reports, self._releases = self._releases, {}
            if reports:
                self.store.release(reports)  # a commit: the quota's next read sees it
            await asyncio.sleep(QUOTA_EVERY)

    def _released(self, parts: list[str], value: bytes | None) -> None:
        """``released.<host>.<us>.<agent>`` = [rows, bytes, epoch, ours]: what ``host``'s
        store ``epoch`` has released in all of our ``agent``'s messages that came in the
        bundles of our store ``ours``; applied by the quota loop (only upward, capped; a
        new epoch: a store reset there, quota.release_tx; another ``ours``: not this
        store's count). [rows, bytes, epoch] is a report of before (counting whatever came),
        [rows, bytes] one of before epochs (the same store counting on)."""
        _, host, to, agent = parts
        if to != self.host or host == self.host or value is None:
            return
        if not (NAME_RE.fullmatch(host) and NAME_RE.fullmatch(agent)):
            return
        with contextlib.suppress(ValueError, RecursionError):
            got = jsontext.loads(value)
            if (
                isinstance(got, list)
                and len(got) in (2, 3, 4)
                and all(type(n) is int and 0 <= n < 1 << 62 for n in got[:2])
                and all(quota.is_epoch(e) for e in got[2:])
            ):
                epoch, ours = [*got[2:], "", ""][:2]
                self._releases[(host, agent)] = (got[0], got[1], epoch, ours)

    def _epoch(self, host: str, value: bytes) -> None:
        """A heartbeat's store epoch: a new one is a store reset there (quota.host_epoch_tx),
        applied once (a commit only when it changes, not each beat), by the quota loop."""
        with contextlib.suppress(ValueError, RecursionError):
            beat = jsontext.loads(value)
            epoch = beat.get("epoch") if isinstance(beat, dict) else None
            if quota.is_epoch(epoch) and self._epochs.get(host) != epoch:
                # Applied by the quota loop, the newest a host's only: the heartbeat key is
                # that host's to write as often as it likes, and a new epoch costs a write
                # transaction over each of our agents that sent there (~10 µs an agent):
                # applied as the watch took it, c's epoch flipped every 2 ms kept a's core
                # busy, ~1.3 ms a flip with 90 senders (red team round 15).
                self._epochs_due[host] = epoch
                self._epochs[host] = epoch

    def _apply_epochs(self) -> None:
        """The new store epochs heartbeats named since the last round (``_epoch``), each
        host's newest, before that round's reports (a report of a new store is then taken
        against it, not refused as ahead of its heartbeat)."""
        for host, epoch in list(self._epochs_due.items()):
            freed = self.store.host_epoch(host, epoch)
            del self._epochs_due[host]  # once committed: a store error leaves it to retry
            if freed:
                log.warning(
                    "swarm: host %s's store is new (epoch %s): what %d agent(s) of ours"
                    " had sent there is released",
                    host,
                    epoch,
                    freed,
                )

    def _apply(
        self,
        bucket: str,
        key: str,
        value: bytes | None,
        op: str | None,
        revision: int | None,
        created: datetime | None,
    ) -> None:
        """One key of ``bucket``'s host's roster. A key that names another host is not
        that host's word (NATS lets no host write one; checked here too) and is skipped."""
        if s.key_host(key) != bucket:
            return
        parts = key.split(".")
        if parts[0] in ("names", "agents") and len(parts) == 3 and _reserved(parts):
            return  # no agent has a reserved name: a claim or row of one is a lie
        deleted = op in ("DEL", "PURGE") or not value
        if parts[0] == "released":
            if len(parts) == 4 and not deleted:
                self._released(parts, value)
            return
        if self.operator.watched(parts, value, deleted):
            return
        # A heartbeat is fresh only if it is a new put: a watch started again replays the last.
        beat = parts[0] == "hosts" and len(parts) == 2 and not deleted
        if beat and (revision is None or revision != self._beats.get(parts[1])):
            self.heartbeats[parts[1]] = time.monotonic()
            if revision is not None:
                self._beats[parts[1]] = revision
            if parts[1] != self.host and value is not None:
                self._epoch(parts[1], value)
        if parts[0] == "names" and len(parts) == 3:
            # A claim is live until deleted or purged, whatever its value (as live_claims
            # sees it); the name is the earliest live claim's.
            claims = self.claims.setdefault(parts[1], {})
            if op in ("DEL", "PURGE") or created is None:
                claims.pop(parts[2], None)
            else:
                claims[parts[2]] = created
            self._own(parts[1])
        elif parts[0] == "agents" and len(parts) == 3:
            if parts[1] != self.host:  # dashboards draw the other hosts' agents again
                self.hive.bus.publish("swarm", {"host": parts[1], "what": "agents"})
            if deleted:
                self.rows.pop((parts[1], parts[2]), None)
            else:
                assert value is not None
                with contextlib.suppress(ValueError, RecursionError):  # nested too deep too
                    row = jsontext.loads(value)
                    if isinstance(row, dict) and NAME_RE.fullmatch(parts[2]):
                        self.rows[(parts[1], parts[2])] = roster_row(parts[1], parts[2], row)

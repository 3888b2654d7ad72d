"""The hive's rules, in one place: who may talk to whom, delivery, questions,
approvals, budgets, egress and agent lifecycle.

Every domain action is a method here that takes the actor it acts for (``Agent`` or
``Operator``, from ``core/actors.py``); only the listener modules make actors. The
socket and HTTP modules are translation tables over these methods: decode a request,
call one method, encode the result. Nothing here reads an identity out of a request.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

from hyperhive import faults
from hyperhive.config import HiveConfig
from hyperhive.core import approvals, received_fds
from hyperhive.core.actors import Actor, Agent, Operator
from hyperhive.core.backoff import RestartBackoff
from hyperhive.core.egress import Decision, EgressProxy, Resolver
from hyperhive.core.egress_tls import CpuPacer, Injection, Plan, default_cpu_total
from hyperhive.core.events import EventBus, InboxWakeups, Subscription
from hyperhive.core.groupcommit import GroupCommit
from hyperhive.core.inboxes import KnownInboxes
from hyperhive.core.limit_hits import LIMITS_POLL, LimitWatch, describe
from hyperhive.core.listing import row_out, rows_out
from hyperhive.core.ratelimit import RateLimited, TokenBuckets
from hyperhive.core.refusals import (
    BadRequest,
    Busy,
    Conflict,
    Forbidden,
    Gone,
    NotFound,
    Refused,
)
from hyperhive.core.replies import Page, ReplyBudget, encoded_size, take
from hyperhive.core.secrets import SecretError, SecretStore, check_value, new_placeholder
from hyperhive.core.store import (
    AgentRow,
    Binding,
    EgressDecision,
    EgressRule,
    Store,
    TranscriptEntry,
    Unreadable,
)
from hyperhive.core.store.db import Tx, completing
from hyperhive.core.store.egress import close_in
from hyperhive.core.store.inbox import UNREAD_COUNTED
from hyperhive.core.store.links import LinkUsed
from hyperhive.core.store.messages import (
    MessageItem,
    ack_in,
    held_size,
    send_in,
    wire_for_recipient,
)
from hyperhive.core.store.usage import Usage
from hyperhive.core.summary import PAGE, Listing
from hyperhive.core.tls import HiveCA, upstream_context
from hyperhive.logthrottle import LogThrottle
from hyperhive.names import OPERATOR
from hyperhive.swarm.port import SwarmPort
from hyperhive.wire import priv as wp
from hyperhive.wire.agent import MAX_REMIND_SECONDS
from hyperhive.wire.common import AgentSpec, AgentStatus, Approval, Message, Question
from hyperhive.wire.egress import Rule, parse_rules
from hyperhive.wire.framing import model_fields_only
from hyperhive.wire.harness import MAX_ENTRY_CHARS
from hyperhive.wire.secrets import parse_destination, parse_header
from hyperhive.wire.timestamps import rfc3339, stamped, stamped_all

EGRESS_REFUSAL_LOG_EVERY = 10.0  # seconds: an agent's refused egress, one log line
# seconds: egress decisions written together at most this often (a flood of refusals from a
# cage was a commit each); one alone is written at once
EGRESS_LOG_BATCH = 0.05

log = logging.getLogger("hive.core")
# Agents' incarnations (created_at) a lifecycle verb is bound to, by name (None: any).
Incarnations = dict[str, float] | None

__all__ = ["Hive", "Lifecycle", "Refused"]


class Lifecycle:
    """What starting and stopping an agent means. hive-core serves the agent's
    socket (for ``hive``: the service passes itself, the one its socket serves);
    the cage (through hive-priv) plugs in here."""

    async def start(self, name: str, hive: Hive) -> None: ...

    async def stop(self, name: str, graceful: bool) -> None: ...

    async def destroy(self, name: str) -> None:
        await self.stop(name, graceful=False)

    def running(self, name: str) -> bool:
        return False

    def failed(self, name: str) -> bool:
        return False

    async def found_running(self, names: list[str], hive: Hive) -> list[str]:
        """At start-up, before ``start``: which of ``names`` still run (a restart of the
        core finds its cages again), already served again here; the rest are started."""
        return []

    async def still_running(self, names: list[str]) -> list[str]:
        """At start-up: which of ``names`` (agents the operator stopped) still run, not
        served again here (a stop cut short by a crash of the core)."""
        return []

    async def leftovers(self, agents: set[str]) -> list[str]:
        """The names with a cage, home or ids but not in ``agents``."""
        return []

    async def holding(self, names: list[str]) -> list[str]:
        """Those of ``names`` with a cage, home or ids."""
        return []

    async def limit_hits(self, names: list[str]) -> dict[str, dict[str, int]]:
        """Each of ``names``' cage limit hits (``limit_hits.COUNTERS``) as the kernel
        counts them; no entry for one that has no cage (or no such count)."""
        return {}


# Agents started at once at start-up (resume_agents). 8, not 4: a start waits mostly on
# hive-priv's forks, mounts and fsyncs, and concurrent prepares share one id commit
# (`hive up` of 1,000 on 2 CPUs: 87-92 s with 4, 66-76 s with 8).
RESUME_AT_ONCE = 8
# Seconds between tries of destroy_leftovers while hive-priv doesn't answer or a destroy fails.
LEFTOVERS_RETRY = 30.0


# Given-back messages a recv reads at once (Hive._given_back_rows): at most this many past
# what its reply takes.
GIVEN_BACK_CHUNK = 16


# Ids in flight whose holder and held bytes are kept for their ack (Hive._sizes): the
# memory of an agent that takes its inbox and never acks stays bounded (~10 MiB).
SIZES_MAX = 65536


class Hive:
    def __init__(
        self, store: Store, config: HiveConfig, lifecycle: Lifecycle, bus: EventBus
    ) -> None:
        self.store = store
        self.config = config
        self.lifecycle = lifecycle
        self.bus = bus
        self.wakeups = InboxWakeups()
        # message id -> connection id holding it unacked; released when that connection ends
        self._in_flight: dict[str, dict[int, int]] = defaultdict(dict)
        # Per agent, the highest id recv ever handed out, and the ids at or below it that a
        # connection's end gave back, ascending: every unacked message at or below the
        # first is in flight or given back, so a recv reads the given-back ones by key,
        # then seeks above it, never walking past what other connections hold (red team
        # round 25a: 30,000 held made each recv's skip list cost the loop ~12 ms).
        self._handed_high: dict[str, int] = {}
        # connection id (unique in the core) -> the ids of _in_flight it holds: a
        # connection's end gives back its own, never walking what the others hold.
        self._held_by: dict[int, set[int]] = {}
        self._given_back: dict[str, list[int]] = {}
        # Message id in flight -> its holder and held bytes, as its recv's line told them
        # (store/messages.py held_size): its ack then writes without reading the row.
        self._sizes: dict[int, tuple[str, int]] = {}
        # Inboxes read empty and kept up to date by the lane's hooks: recv without a query.
        self.inboxes = KnownInboxes()
        # Sends and acks of one turn of the loop share one commit (core/groupcommit.py).
        self.commits = GroupCommit(store.db, self)  # self: its message lane's hooks
        self.controls = InboxWakeups()  # wakes a harness's `control` long-poll
        self.limit_watch = LimitWatch()  # cages' OOM kills and refused forks (watch_limits)
        # Cages being restarted for holding a core thread in a close (cage_holds_a_close),
        # and the tasks doing it (kept: the loop holds only weak references to tasks).
        self._restarting_held: set[str] = set()
        self.held_backoff = RestartBackoff()  # such restarts again and again: later starts
        self._held_restarts: dict[str, int] = {}  # each agent's latest such restart's number
        self._background: set[asyncio.Future[None]] = set()
        self.transcript_wakeups = InboxWakeups()  # wakes an agent page's transcript stream
        self._interrupts: set[str] = set()
        self.harness_state: dict[str, dict[str, Any]] = {}  # needs_login, active_model, reported
        self.rates = TokenBuckets(config.limits.messages_per_second, config.limits.message_burst)
        store.history_keep = config.limits.history_keep
        store.transcripts.max_bytes = config.limits.transcript_mib << 20
        # Sends queued for the next group commit, per sender: (rows, bytes) not yet in agent_usage.
        self._queued: dict[str, tuple[int, int]] = {}
        # agent_usage rows read since commit _usage_at, or more: carried over the group
        # commit's batches of messages and acks (lane_committed), they only ever overstate
        # what an agent holds (an ack frees room unseen), so a check that passes on them is
        # right, and one that fails reads the row again (check_store_quota).
        self._usage: dict[str, Usage] = {}
        self._usage_at = -1
        # The last run of commits that were all batches of messages and acks (lane_committed):
        # from commit count _lane_from to _lane_to.
        self._lane_from = self._lane_to = -1
        # Egress: the rules the proxy threads read (replaced whole, never mutated in place).
        self._egress_rules: dict[str, tuple[Rule, ...]] = {}
        # decision key -> its log row's id (filled in by the write that inserts it: the
        # close may be queued in the same group commit), while its connection lasts
        self._egress_open: dict[int, list[int]] = {}
        # Decisions waiting for their write (_write_egress), and when the last was written.
        self._egress_pending: list[
            tuple[Callable[[Tx], int], Callable[[int], None], EgressDecision]
        ] = []
        self._egress_written_at = 0.0
        # A refusal's log line: one an agent a period, with the count (the rows are whole).
        self._egress_refused: dict[str, tuple[str, int, str]] = {}
        self._egress_refusals: LogThrottle[str] = LogThrottle(
            EGRESS_REFUSAL_LOG_EVERY, self._log_egress_refusals
        )
        # Secrets and the CA live beside the database, outside every cage (core/secrets.py).
        self.secrets = SecretStore(store.path.parent / "secrets")
        self.ca = HiveCA(store.path.parent / "ca")
        self._bindings: dict[tuple[str, str, int], tuple[Binding, ...]] = {}
        self.egress = EgressProxy(
            self.egress_rules_for,
            self.record_egress,
            Resolver({k: str(v) for k, v in config.egress.hosts.items()}),
            config.egress.max_connections,
            plan_for=self.egress_plan,
            ca=self.ca,
            upstream_tls=upstream_context(config.egress.upstream_ca),
            connections_per_second=config.egress.connections_per_second,
            stall_seconds=config.egress.stall_seconds,
            cpu=CpuPacer(
                config.egress.cpu,
                default_cpu_total() if config.egress.cpu_total is None else config.egress.cpu_total,
            ),
        )
        self.reload_egress()
        # The swarm bridge (swarm/bridge.py), set by the daemon only with [swarm].
        self.swarm: SwarmPort | None = None
        self.reload_bindings()

    # -- agents: existence, peers, status ------------------------------------------

    def exists(self, name: str) -> bool:
        return self.store.agents.get(name) is not None

    def require_agent(self, name: str) -> AgentRow:
        row = self.store.agents.get(name)
        if row is None:
            raise NotFound(f"no agent named {name!r}")
        return row

    def require_self(self, actor: Agent) -> AgentRow:
        """The caller's own row; an agent destroyed while connected is refused everything."""
        row = self.store.agents.get(actor.name)
        if row is None:
            raise NotFound(f"agent {actor.name!r} no longer exists")
        return row

    def spec(self, name: str) -> AgentSpec:
        return self.require_agent(name).spec

    def may_address(self, sender: str, target: str) -> bool:
        """Its declared peers, its parent and its children (spawned helpers report back)."""
        me, them = self.store.agents.get(sender), self.store.agents.get(target)
        if me is None or them is None or sender == target:
            return False
        return target in me.spec.peers or me.parent == target or them.parent == sender

    def peers(self, actor: Agent) -> list[str]:
        """Agents the caller may message and ask, that exist now: of its declared peers,
        its parent and its children, those ``may_address`` takes. Not every agent asked
        about in turn: that was ~55 µs a request with 150 agents (docs/security.md)."""
        me = self.store.agents.get(actor.name)
        if me is None:
            return []
        candidates = {*me.spec.peers, *self.store.agents.children_of(actor.name)}
        if me.parent is not None:
            candidates.add(me.parent)
        return sorted(n for n in candidates if self.may_address(actor.name, n))

    def whoami(self, actor: Agent) -> str | None:
        """The caller's parent, if it was spawned."""
        return self.require_agent(actor.name).parent

    def list_agents(self, actor: Operator) -> list[str]:
        return [r.name for r in self.store.agents.all()]

    def _take_rate(self, actor: Agent) -> None:
        try:
            self.rates.take(actor.name)
        except RateLimited as e:
            raise Busy(str(e)) from None

    def _check_may_address(self, sender: str, target: str) -> None:
        if target == OPERATOR:
            return
        if target == sender:
            raise Conflict("an agent can't message itself")
        if not self.may_address(sender, target):
            if not self.exists(target):
                raise NotFound(f"no agent named {target!r}")
            raise Forbidden(f"{target!r} is not one of {sender}'s peers")

    def status_row(self, row: AgentRow, reminders: dict[str, int]) -> AgentStatus:
        spec = row.spec
        state = self.harness_state.get(row.name, {})
        return AgentStatus(
            name=row.name,
            running=self.lifecycle.running(row.name),
            failed=self.lifecycle.failed(row.name),
            pending_reminders=reminders.get(row.name, 0),
            paused=bool(row.paused),
            parent=row.parent,
            needs_login=bool(state.get("needs_login")),
            active_model=state.get("active_model")
            or (spec.model if spec.runtime == "claude" else None),
            status_text=row.status_text,
            status_set_at=row.status_set_at,
            url=f"http://{self.config.hive.listen}/agent/{row.name}/",
            created_at=row.created_at,
            **self.limit_watch.counts.get(row.name, {}),
        )

    def statuses(self) -> list[dict[str, Any]]:
        reminders = self.store.reminders.pending()
        return [model_fields_only(self.status_row(r, reminders)) for r in self.store.agents.all()]

    def status_of(self, actor: Agent) -> AgentStatus:
        return self.status_row(
            self.require_agent(actor.name), self.store.reminders.pending_of(actor.name)
        )

    def publish_status(self, name: str, trouble: str | None = None) -> None:
        """``trouble``: one line for the operator on what befell the agent (its cage
        hitting a limit), with its status as it is now."""
        row = self.store.agents.get(name)
        if row is None:
            self.bus.publish("agent_status", {"name": name, "destroyed": True})
            return
        reminders = self.store.reminders.pending_of(name)
        status = model_fields_only(self.status_row(row, reminders))
        extra = {"trouble": trouble} if trouble is not None else {}
        self.bus.publish("agent_status", {"agent": status, **extra})

    def cage_holds_a_close(self, name: str) -> None:
        """A core thread letting go of what agent ``name`` handed over has slept
        uninterruptibly for received_fds.STUCK_AFTER s: a lock a process of its cage holds
        (a pipe it splices into). Only that process's death ends the wait, so the cage is
        restarted (its row stays as it is: not stopped), and the operator told."""
        if name in self._restarting_held or not self.exists(name):
            return
        text = (
            f"agent {name}: a close of what its cage handed the egress proxy has waited"
            f" {received_fds.STUCK_AFTER:.0f} s on a lock its cage holds; its cage is restarted"
        )
        log.warning("%s", text)
        self._restarting_held.add(name)
        task = asyncio.ensure_future(self._restart_held(name, text))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _restart_held(self, name: str, text: str) -> None:
        number = self._held_restarts[name] = self._held_restarts.get(name, 0) + 1
        waiting = False
        try:
            row = self.store.agents.get(name)
            if row is None or row.stopped:  # stopped meanwhile: its cage is gone already
                return
            await self.lifecycle.stop(name, graceful=False)
            delay = self.held_backoff.next_delay(name)
            if delay:
                text = f"{text} in {delay:.0f} s (restarted again and again)"
                log.warning("agent %s: its cage starts again in %.0f s", name, delay)
                self.publish_status(name, trouble=text)
                # While this waits, a hold re-armed in a cage the operator started meanwhile
                # is reported anew: its own stop at once, and the start after it is that
                # restart's (re-check of session 31: the report was dropped while the name
                # was here, and the hold lasted as long as the cage).
                self._restarting_held.discard(name)
                waiting = True
                await asyncio.sleep(delay)
                if self._held_restarts.get(name) != number:  # a later restart, or a destroy
                    return
            row = self.store.agents.get(name)
            if row is None or row.stopped:  # the operator stopped or destroyed it meanwhile
                self.publish_status(name, trouble=None if delay else text)
                return
            await self.lifecycle.start(name, self)
            self.publish_status(name, trouble=None if delay else text)
        except Exception as e:  # the operator sees the agent as it is; the log says why
            log.warning("agent %s: restarting its cage failed: %s", name, e)
        finally:
            if not waiting:  # (once waiting, the name may be a later restart's)
                self._restarting_held.discard(name)

    async def watch_limits(self, every: float = LIMITS_POLL) -> None:
        """For the core's lifetime: ``check_limits`` now (the baseline), then every
        ``every`` seconds."""
        while True:
            await self.check_limits()
            await asyncio.sleep(every)

    async def check_limits(self) -> None:
        """Read every agent's cage limit hits in one request; tell the operator of each
        that grew (core/limit_hits.py). Stopped ones too: a stopped cage keeps its cgroup
        and counts, which the first read must take as the baseline, or its next start
        would tell them as new."""
        rows = {r.name: r for r in self.store.agents.all()}
        try:
            hits = await self.lifecycle.limit_hits(sorted(rows))
        except Refused as e:
            log.warning("reading the cages' limit hits failed: %s", e)
            return
        at = time.monotonic()
        for name, counts in hits.items():
            row = rows.get(name)
            if row is None:
                continue
            for counter, total, new in self.limit_watch.observe(name, counts, at):
                pids_max = row.spec.pids_max or wp.StartCage(name=name).pids_max
                text = describe(name, counter, total, new, pids_max)
                log.warning("%s", text)
                self.publish_status(name, trouble=text)
        self.limit_watch.started = True

    def harness_changed(self, name: str) -> None:
        """The agent's harness connected or went away (its socket's listener says so)."""
        self.publish_status(name)

    def set_status(self, actor: Agent, text: str) -> float:
        """Set the caller's status text; when it was set. The text it has already is not
        set again: no write, no event, and the time it was set to that text (a cage
        repeating one status as fast as it could wrote a commit and published an event
        to every dashboard each time: red team cheap-verb-flood)."""
        row = self.require_self(actor)
        if row.status_text == text and row.status_set_at is not None:
            return row.status_set_at
        at = self.store.agents.set_status_text(actor.name, text)
        self.publish_status(actor.name)
        return at

    # -- budgets ------------------------------------------------------------------

    def check_agent_room(self) -> None:
        """Refuse one more agent beyond ``[limits] max_agents`` (the core's budget)."""
        n, limit = len(self.store.agents.all()), self.config.limits.max_agents
        if n >= limit:
            raise Busy(f"agent limit: the hive has {n} agents, [limits] max_agents is {limit}")

    def check_not_declared(self, name: str) -> None:
        """Refuse an agent's spawn of a name hive.toml declares: at the next start hive.toml
        would adopt its child, parent, home and all, with what hive.toml gives that name
        (its secrets, rules and peers: red team round 24). Destroyed, a declared agent is
        created again, empty, by the next start (or by the operator's own spawn)."""
        if name in self.config.agents:
            raise Conflict(
                f"{name!r} is declared in hive.toml: only hive.toml makes it (a destroyed one"
                " is created again, empty, when the hive next starts)"
            )

    def check_store_quota(
        self, agent: str, rows: int, nbytes: int, to_operator: bool = False
    ) -> None:
        """Refuse, before anything is stored, what would take ``agent`` over its storage
        quota: ``rows`` more undelivered messages, open questions, pending approvals or
        reminders of ``nbytes`` bytes. A message to the operator may push out the agent's
        own oldest messages to the operator (see Store.send_many), so those don't count."""
        if agent == OPERATOR:
            return  # the operator's own messages are not an agent's to bound
        if self._fits(self._usage_of(agent), agent, rows, nbytes, to_operator):
            return
        # Over, on a read that may overstate (see _usage): read the row again to be sure.
        usage = self._usage[agent] = self.store.usage.of(agent)
        held_rows, held_bytes = self._held(usage, agent, to_operator)
        limits = self.config.limits
        if held_rows + rows > limits.agent_pending_max:
            raise Busy(
                f"storage quota: agent {agent} holds {held_rows} undelivered messages,"
                f" questions, approvals and reminders, limit {limits.agent_pending_max}"
            )
        if held_bytes + nbytes > limits.agent_store_mib << 20:
            raise Busy(
                f"storage quota: agent {agent} holds {held_bytes / (1 << 20):.1f} MiB of"
                f" undelivered messages, limit {limits.agent_store_mib} MiB"
            )

    def _held(self, usage: Usage, agent: str, to_operator: bool) -> tuple[int, int]:
        """The rows and bytes ``agent`` holds on ``usage``, with its queued sends."""
        q_rows, q_bytes = self._queued.get(agent, (0, 0))
        held_rows, held_bytes = usage.rows + q_rows, usage.bytes + q_bytes
        if to_operator:
            held_rows, held_bytes = held_rows - usage.op_rows, held_bytes - usage.op_bytes
        return held_rows, held_bytes

    def _fits(self, usage: Usage, agent: str, rows: int, nbytes: int, to_operator: bool) -> bool:
        """Whether ``rows`` more of ``nbytes`` fit ``agent``'s quota on ``usage``."""
        held_rows, held_bytes = self._held(usage, agent, to_operator)
        limits = self.config.limits
        return (
            held_rows + rows <= limits.agent_pending_max
            and held_bytes + nbytes <= limits.agent_store_mib << 20
        )

    def lane_committed(self, before: int, after: int) -> None:
        """GroupCommit hook: a batch of messages and acks only was committed. What was read
        before it still bounds what each agent holds (acks only free room), once the
        batch's messages are added (message_stored), so the reads are kept."""
        if self._usage_at == before:
            self._usage_at = after
        if self._lane_to != before:  # another write came between: a new run starts here
            self._lane_from = before
        self._lane_to = after

    def _unchanged_since(self, at: int) -> bool:
        """Whether every commit since the database's commit count was ``at`` was a batch of
        messages and acks only (each of those messages woke its recipient)."""
        now = self.store.db.commits
        return at == now or (self._lane_to == now and self._lane_from <= at)

    def _usage_of(self, agent: str) -> Usage:
        """``store.usage.of(agent)``, read once per commit: pipelined sends check their
        quota one after another with no commit between them (their rows are counted in
        ``_queued`` until theirs), so one read serves them all."""
        if self._usage_at != self.store.db.commits:
            self._usage_at = self.store.db.commits
            self._usage.clear()
        usage = self._usage.get(agent)
        if usage is None:
            usage = self._usage[agent] = self.store.usage.of(agent)
        return usage

    def store_quota(self) -> tuple[int, int]:
        return self.config.limits.agent_pending_max, self.config.limits.agent_store_mib << 20

    # -- messages -----------------------------------------------------------------

    def delivered(self, msg: Message) -> None:
        """After a message is committed: wake its recipient and tell subscribers."""
        assert msg.to is not None
        self.wakeups.notify(msg.to)
        self.bus.version += 1
        if self.bus.wants("message"):
            self.bus.publish("message", {"message": model_fields_only(msg)})

    def message_taken(self, item: MessageItem) -> None:
        """GroupCommit hook: a queued message's batch is taken (in agent_usage from its
        commit on, or refused): no longer counted in ``_queued``."""
        self._uncount(item[1], item[3])

    def message_stored(self, mid: int, item: MessageItem, sent_at: float) -> None:
        """GroupCommit hook: a message of the lane is committed (``delivered``, with the
        Message built only for a subscriber that wants it)."""
        to = item[0]
        if self._usage_at == self.store.db.commits:  # carried over this commit: add it
            usage = self._usage.get(item[1])
            if usage is not None:
                # Built whole: NamedTuple._replace is a map over its fields, a call a message.
                self._usage[item[1]] = Usage(
                    usage.rows + 1, usage.bytes + item[3], usage.op_rows, usage.op_bytes
                )
        self.inboxes.stored(to, mid, item[1], item[2], sent_at)
        self.wakeups.notify(to)
        self.bus.version += 1
        if self.bus.wants("message"):
            msg = Message(
                id=mid, from_=item[1], kind="message", body=item[2], sent_at=sent_at, to=to
            )
            self.bus.publish("message", {"message": model_fields_only(msg)})

    async def send(self, actor: Actor, to: str, body: str) -> int:
        """An agent messages a peer (or the operator); the operator messages any agent.
        The new message's id, once committed."""
        return await self.start_send(actor, to, body)

    def start_send(self, actor: Actor, to: str, body: str) -> asyncio.Future[int]:
        """``send`` up to its message being queued: the checks run now (a refusal is raised
        now, nothing queued); what is left to await is the id once committed. One
        connection's pipelined sends start one after another, so they are stored in order
        (agent_socket.py), each task-free."""
        if isinstance(actor, Agent):
            if self.swarm is not None and to != OPERATOR and not self.exists(to):
                return asyncio.ensure_future(self._send_remote(actor, to, body))  # another host
            self._check_may_address(actor.name, to)
            self._take_rate(actor)
        else:
            self.require_agent(to)
        if to == OPERATOR:  # makes room first: a write of its own (send_in)
            return asyncio.ensure_future(_id_of(self._queue_send(actor.name, to, body)))
        # An ASCII body's length is its UTF-8 size: no copy to count it (most bodies).
        nbytes = len(body) if body.isascii() else len(body.encode())
        self._count(actor.name, nbytes, to_operator=False)  # uncounted by message_taken
        return self.commits.submit_message((to, actor.name, body, nbytes))

    async def _send_remote(self, actor: Agent, to: str, body: str) -> int:
        """To an agent the swarm's roster gives to another host: the same peer ACL as
        today (its declared ``peers``), checked here, on the sender's host; the message
        is committed to the outbox before the reply (docs/swarm.md)."""
        assert self.swarm is not None
        self._check_remote_peer(actor, to)
        self._take_rate(actor)
        # The same storage quota as a local send: it counts from the outbox's commit until
        # the other host releases it (its recipient acked it; swarm/quota.py).
        taken = self._hold(actor.name, len(body.encode()), to_operator=False)
        return await self.swarm.send(actor.name, to, body, taken)

    def _check_remote_peer(self, actor: Agent, to: str) -> None:
        """The peer ACL for an agent on another host: one of the caller's ``peers``."""
        assert self.swarm is not None
        me = self.require_self(actor)
        if to not in me.spec.peers:
            if self.swarm.host_of(to) is None:
                raise NotFound(f"no agent named {to!r}")
            raise Forbidden(f"{to!r} is not one of {actor.name}'s peers")

    def swarm_status(self, actor: Operator) -> dict[str, Any] | None:
        """The swarm as this host sees it (``hive swarm status``); None without [swarm]."""
        return None if self.swarm is None else self.swarm.status()

    async def carry(
        self, actor: Operator, host: str, request: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The operator's ``request`` (a host.sock request) for another host of the swarm:
        signed, carried there and applied once (docs/swarm.md); None if ``host`` is this
        one (the caller acts here)."""
        if self.swarm is None:
            raise BadRequest(f"no host {host!r}: this hive is not in a swarm")
        if host == self.swarm.host:
            return None
        return await self.swarm.carry(host, request)

    async def fetch_remote(
        self, actor: Operator, host: str, kind: str, ident: int
    ) -> dict[str, Any] | None:
        """Another host's pending approval or open question (``kind``), whole, with its
        host; None if ``host`` is this one (the caller reads it here)."""
        if self.swarm is None:
            raise BadRequest(f"no host {host!r}: this hive is not in a swarm")
        if host == self.swarm.host:
            return None
        return await self.swarm.fetch(host, kind, ident)

    def core_stats(self, actor: Operator) -> dict[str, int]:
        """Counters since this core started. ``commits``: write transactions ended
        (committed or rolled back; a group commit is one however many writes it holds):
        a request that changes nothing adds none (red team ``cheap-verb-flood``)."""
        return {"commits": self.store.db.commits}

    def swarm_host(self) -> str | None:
        """This host's name in the swarm; None without [swarm]."""
        return None if self.swarm is None else self.swarm.host

    def swarm_listing(self, actor: Operator, kind: str) -> list[dict[str, Any]] | None:
        """The other hosts' ``agents`` (each with ``reachable``), open ``questions`` or
        pending ``approvals``, each with its host; None without [swarm]."""
        return None if self.swarm is None else self.swarm.listed(kind)

    def _queue_send(self, sender: str, to: str, body: str) -> asyncio.Future[Message]:
        """Queue a message (to the operator: it makes room first) for the next group
        commit; the future resolves once it is committed.

        Sends that arrive in the same turn of the event loop share one
        transaction: the reply still only goes out after the commit, and a
        failed commit refuses every send in it (none is half-stored)."""
        taken = self._hold(sender, len(body.encode()), to_operator=to == OPERATOR)
        item = (to, sender, "message", body)
        quota = self.store_quota()
        return self.commits.submit(lambda tx: send_in(tx, item, quota), self.delivered, taken)

    def _hold(self, sender: str, nbytes: int, to_operator: bool) -> Callable[[], None]:
        """Check one more message of ``nbytes`` against ``sender``'s storage quota and count
        it until the group commit takes it; the callback the commit calls then."""
        self._count(sender, nbytes, to_operator)

        def taken() -> None:  # in agent_usage from the commit on (or refused)
            self._uncount(sender, nbytes)

        return taken

    def _count(self, sender: str, nbytes: int, to_operator: bool) -> None:
        """Check one more message against ``sender``'s quota; count it until its commit."""
        self.check_store_quota(sender, 1, nbytes, to_operator=to_operator)
        rows, held = self._queued.get(sender, (0, 0))
        self._queued[sender] = (rows + 1, held + nbytes)

    def _uncount(self, sender: str, nbytes: int) -> None:
        """A counted message's commit took it (in agent_usage from then on, or refused)."""
        rows, held = self._queued.pop(sender, (0, 0))
        if rows > 1:
            self._queued[sender] = (rows - 1, held - nbytes)

    def _reply_budget(self) -> ReplyBudget:
        """A fresh byte budget for one reply (``[limits] reply_bytes``, core/replies.py)."""
        return ReplyBudget(self.config.limits.reply_bytes)

    async def recv(self, actor: Agent, conn: int, wait: float, limit: int) -> Page[dict[str, Any]]:
        """Up to ``limit`` unacked messages not held by another connection, and no more than
        fit one reply's byte budget, waiting up to ``wait`` seconds for the first; they stay
        the caller's until acked or it hangs up. ``more``: others are waiting now. Each as
        the recipient's line carries it (store/messages.py ``wire_for_recipient``)."""
        name, wakeups = actor.name, self.wakeups
        loop = wakeups.loop()
        deadline = loop.time() + wait
        while True:
            page = self.recv_now(actor, conn, limit)
            if page.items or loop.time() >= deadline:
                return page
            await wakeups.wait(name, deadline - loop.time())

    def recv_now(self, actor: Agent, conn: int, limit: int) -> Page[dict[str, Any]]:
        """One look at the caller's inbox for ``recv`` (without waiting): what it returns now,
        held by ``conn`` from here on; empty if nothing is there. agent_conn.py waits for
        the wake-up itself (a callback, not a task)."""
        name = actor.name
        in_flight = self._in_flight[name]
        # An inbox read empty, with nothing held, is known still if only batches of lane
        # messages and acks were committed since (core/inboxes.py): a receiver's round
        # reads no query.
        known_at = self.inboxes.since(name)
        if known_at is not None and self._unchanged_since(known_at):
            known = self.inboxes.items(name)
            if in_flight:
                known = [m for m in known if m["id"] not in in_flight]
            # No byte budget to count: a known inbox is too small to reach one
            # (inboxes.KNOWN_BYTES_MAX; config.py keeps reply_bytes above it).
            page = Page(known[:limit], len(known) > limit)
        else:
            if known_at is not None:
                self.inboxes.forget(name)  # out of date: read until read empty again
            messages = self.store.messages
            rows = messages.unacked_above(name, limit + 1, self._handed_high.get(name, 0))
            if self._given_back.get(name):
                rows = itertools.chain(self._given_back_rows(name, limit + 1), rows)
            unacked = (wire_for_recipient(r) for r in rows)
            page = take(unacked, self._reply_budget(), limit, encoded_size)
            if not page.items and not in_flight:
                self.inboxes.read_empty(name, self.store.db.commits)
        if page.items:
            self._hand_out(name, conn, [m["id"] for m in page.items])
            sizes = self._sizes
            if len(sizes) < SIZES_MAX:  # past it, an ack reads its row as before
                for m in page.items:
                    if (size := held_size(name, m)) is not None:
                        sizes[m["id"]] = size
        return page

    def _given_back_rows(self, name: str, need: int) -> Iterator[Any]:
        """Up to ``need`` unacked messages among those given back to ``name``'s inbox,
        oldest first, read GIVEN_BACK_CHUNK at a time as the reply takes them (it stops
        at its byte budget: 1,001 of 256 KiB each read at once held the loop ~0.35 s, a
        re-check of session 22); the ids acked or deleted since leave the list as they
        are met."""
        back = self._given_back[name]
        start = served = 0
        while start < len(back) and served < need:
            chunk = back[start : start + min(GIVEN_BACK_CHUNK, need - served)]
            rows = self.store.messages.unacked_of(name, chunk)
            if len(rows) < len(chunk):
                found = {r[0] for r in rows}
                back[start : start + len(chunk)] = [i for i in chunk if i in found]
            start += len(rows)
            for row in rows:
                yield row
                served += 1

    def _hand_out(self, name: str, conn: int, ids: list[int]) -> None:
        """``ids`` (a recv's page) are held by ``conn`` from now on."""
        in_flight = self._in_flight[name]
        held = self._held_by.get(conn)
        if held is None:
            held = self._held_by[conn] = set()
        for i in ids:
            in_flight[i] = conn
            held.add(i)
        high = self._handed_high.get(name, 0)
        top = max(ids)
        if top > high:
            self._handed_high[name] = top
        back = self._given_back.get(name)
        if back and min(ids) <= high:  # some were given back: they leave the list
            again = {i for i in ids if i <= high}
            # Only the list up to the last of them is walked: in a page read from the store
            # they are its first entries (the list's stale ids went as they were met).
            end = bisect.bisect_right(back, max(again))
            back[:end] = [i for i in back[:end] if i not in again]

    def _let_go(self, name: str, ids: Iterable[int]) -> None:
        """``ids`` are no longer in flight (acked)."""
        in_flight, sizes = self._in_flight[name], self._sizes
        for i in ids:
            sizes.pop(i, None)
            conn = in_flight.pop(i, None)
            if conn is not None and (held := self._held_by.get(conn)) is not None:
                held.discard(i)

    async def ack(self, actor: Agent, ids: list[int]) -> int:
        """Ack messages to the caller (committed with this turn's other sends and acks);
        how many were not acked before. One not in its inbox: refused, nothing acked.

        An ack that would change nothing is answered without the group commit: one of ids
        all in flight to the caller (handed out by its ``recv``, not acked since) changes
        a row; any other is read first (``unacked_among``), and if none of its ids is
        unacked it is answered (0) or refused there and then, writing nothing and waiting
        on no commit. A cage flooding acks of ids not its own, or acked already, made one
        empty commit each (~10,000 a second); the write transaction still checks
        everything again (``ack_in``), so the read only ever saves a commit."""
        return await self.start_ack(actor, ids)

    def start_ack(self, actor: Agent, ids: list[int]) -> asyncio.Future[int]:
        """``ack`` queued for the next group commit: its future resolves once committed
        (at once when it would change nothing; a refusal is its exception)."""
        name = actor.name
        in_flight = self._in_flight.get(name)
        if in_flight is None:
            held = False
        elif len(ids) == 1:  # a receiver's ack a round: no generator for one id
            held = ids[0] in in_flight
        else:
            held = all(i in in_flight for i in ids)
        if not ids or not held:
            answered = self.wakeups.loop().create_future()
            try:
                if not ids or self.store.messages.unacked_among(name, ids) == 0:
                    answered.set_result(0)
                    return answered
            except Exception as e:  # refused (not in its inbox) or the store failed
                answered.set_exception(e)
                return answered

        def done(fresh: int) -> None:
            self._let_go(name, ids)
            self.inboxes.acked(name, ids, fresh)

        known = self._sizes.get(ids[0]) if len(ids) == 1 else None
        return self.commits.submit(lambda tx: ack_in(tx, name, ids, known), done, shrinks=True)

    def release(self, name: str, conn: int) -> None:
        """A connection ended: its unacked messages go back to the inbox."""
        released = self._held_by.pop(conn, None)  # what it holds alone: never all in flight
        if not released:
            return
        in_flight, sizes = self._in_flight[name], self._sizes
        for i in released:
            in_flight.pop(i, None)
            sizes.pop(i, None)
        back = self._given_back.setdefault(name, [])
        back.extend(released)
        back.sort()
        self.wakeups.notify(name)

    def inbox(self, actor: Operator, after: int, limit: int) -> Page[dict[str, Any]]:
        """Messages to the operator after id ``after``, as sent: at most ``limit`` and one
        reply's byte budget; ``more`` when the next batch (after the last id) has some."""
        rows = self.store.messages.inbox(OPERATOR, after, limit + 1)
        return _page(rows, self._reply_budget(), limit)

    def recent_messages(self, actor: Operator, limit: int) -> list[Message | Unreadable]:
        """The newest messages between anyone, oldest first, as summaries (the dashboard's
        feed: bodies cut, see core/summary.py)."""
        return self.store.messages.recent_summaries(limit)

    def inbox_newest(self, actor: Operator, limit: int) -> list[Message | Unreadable]:
        """The newest messages to the operator, newest first, as summaries."""
        return self.store.messages.newest_to(OPERATOR, limit)

    def inbox_older_unread(
        self, actor: Operator, after: int, below: int, read: set[int], per_sender: int, limit: int
    ) -> list[Message | Unreadable]:
        """Unread messages to the operator older than the dashboard's newest page (id
        ``below``): above ``after`` (the last one marked read in a row), not in ``read``,
        the oldest, at most ``per_sender`` of any one sender (red team round 23b)."""
        return self.store.messages.older_unread(OPERATOR, after, below, read, per_sender, limit)

    def inbox_read_state(self, actor: Operator) -> tuple[int, set[int]]:
        """The operator's read marks (store/inbox.py): every message up to the mark is
        read, and the ids of the set above it."""
        return self.store.inbox_read.state()

    UNREAD_COUNTED = UNREAD_COUNTED  # past it, inbox_unread says UNREAD_COUNTED + 1

    def inbox_unread(self, actor: Operator) -> int:
        """How many messages to the operator are unread (up to UNREAD_COUNTED + 1)."""
        return self.store.inbox_read.unread()

    def inbox_mark_read(self, actor: Operator, ids: set[int]) -> None:
        """Mark read the messages to the operator of ``ids`` (the ones the page showed)."""
        self.store.inbox_read.take(ids)

    def inbox_count(self, actor: Operator) -> int:
        """How many messages to the operator the store holds (store/usage.py)."""
        return self.store.usage.to_operator()

    def message(self, actor: Operator, mid: int) -> Message | Unreadable:
        """One message between anyone, whole (a listing's "show all")."""
        msg = self.store.messages.get(mid)
        if msg is None:
            raise NotFound(f"no message {mid}")
        return msg

    # -- questions ------------------------------------------------------------------

    def ask(self, actor: Agent, to: str, question: str, options: list[str] | None) -> int:
        """A question (to an agent, also delivered to its inbox: stored twice)."""
        if self.swarm is not None and to != OPERATOR and not self.exists(to):
            return self._ask_remote(actor, to, question, options)  # swarm: another host's
        self._check_may_address(actor.name, to)
        self._take_rate(actor)
        nbytes = len(question.encode()) + (
            0 if options is None else len(json.dumps(options).encode())
        )
        copies = 1 if to == OPERATOR else 2
        self.check_store_quota(actor.name, copies, copies * nbytes)
        q, delivered = self.store.questions.ask(actor.name, to, question, options)
        self.bus.publish("question", {"question": model_fields_only(q)})
        if delivered is not None:
            self.delivered(delivered)
        return q.id

    def answer(self, actor: Actor, qid: int, answer: str) -> int:
        """The caller answers question ``qid`` addressed to it: an agent only a peer's
        question to it, the operator only a question to the operator. The answer is a
        message to the asker."""
        self.check_store_quota(actor.name, 1, len(answer.encode()))
        if self.swarm is not None and (rq := self.swarm.answer(actor.name, qid, answer)):
            self.bus.publish("answer", {"question": row_out(rq)})  # asked from another host
            return qid
        q, msg = self.store.questions.answer(qid, actor.name, answer)
        self.delivered(msg)
        self.bus.publish("answer", {"question": row_out(q)})
        return qid

    def _ask_remote(self, actor: Agent, to: str, question: str, options: list[str] | None) -> int:
        """To an agent on another host: the peer ACL and the quota here; the question is
        stored here and queued to its host in one commit (swarm/asks.py)."""
        assert self.swarm is not None
        self._check_remote_peer(actor, to)
        self._take_rate(actor)
        nbytes = len(question.encode()) + len(json.dumps(options).encode() if options else b"")
        # Stored twice, as on one host: here, and in the target's inbox there (counted here
        # until that host releases it; swarm/quota.py).
        self.check_store_quota(actor.name, 2, 2 * nbytes)
        q = self.swarm.ask(actor.name, to, question, options)
        self.bus.publish("question", {"question": model_fields_only(q)})
        return q.id

    def questions_for(
        self, actor: Operator, after: int = 0, limit: int = PAGE
    ) -> Listing[Question | Unreadable]:
        """One page of the open questions to the operator, oldest first, as summaries."""
        return self.store.questions.open_page(target=OPERATOR, after=after, limit=limit)

    def questions_first_screen(
        self, actor: Operator, per_agent: int, limit: int
    ) -> Listing[Question | Unreadable]:
        """The dashboard's open questions to the operator: the oldest, at most ``per_agent``
        from any one agent (the rest on its own page), so one agent's questions never push
        another's off the operator's first screen (red team round 23b)."""
        return self.store.questions.first_screen(target=OPERATOR, per_agent=per_agent, limit=limit)

    def question(self, actor: Operator, qid: int) -> Question | Unreadable:
        """One question, whole (a listing's "show all")."""
        q = self.store.questions.get(qid)
        if q is None:
            raise NotFound(f"no question {qid}")
        return q

    def loose_ends(
        self,
        actor: Agent,
        questions_after: int = 0,
        approvals_after: int = 0,
        to_answer_after: int = 0,
    ) -> dict[str, Any]:
        """What the caller still waits on, and what still waits on it: the three lists
        share one reply's byte budget, filled in this order. ``more``: one of them was cut
        (ask again with each ``<list>_after`` = the last id got of that list)."""
        store, budget, name = self.store, self._reply_budget(), actor.name
        lists: dict[str, Callable[[], Iterable[Any]]] = {
            "questions": lambda: store.questions.open_after(questions_after, asker=name),
            "approvals": lambda: store.approvals.pending_after(name, approvals_after),
            "to_answer": lambda: store.questions.open_after(to_answer_after, target=name),
        }
        out: dict[str, Any] = {}
        cut = False
        for key, rows in lists.items():
            # Once a list is cut, the later ones wait for the next batch too.
            page: Page[dict[str, Any]] = Page() if cut else _page(rows(), budget)
            out[key], cut = page.items, cut or page.more
        return {**out, **({"more": True} if cut else {})}

    # -- reminders ------------------------------------------------------------------

    def remind(self, actor: Agent, due: float, text: str) -> int:
        if due > time.time() + MAX_REMIND_SECONDS:
            raise Conflict("a reminder can be at most a year ahead")
        self._take_rate(actor)
        self.check_store_quota(actor.name, 1, len(text.encode()))
        rid = self.store.reminders.add(actor.name, due, text)
        self.bus.publish("reminder_added", {"agent": actor.name, "due_at": rfc3339(due)})
        self.publish_status(actor.name)
        return rid

    def deliver_due_reminders(self, now: float) -> list[Message]:
        """One bounded batch of the reminders due by ``now`` becomes messages (the
        scheduler calls this until it returns none, yielding to the loop in between)."""
        msgs = self.store.reminders.deliver_due(now)
        for msg in msgs:
            assert msg.to is not None
            log.info("reminder %s delivered to %s", msg.ref, msg.to)
            self.delivered(msg)
            self.bus.publish(
                "reminder", {"agent": msg.to, "reminder_id": msg.ref, "text": msg.body}
            )
        for name in dict.fromkeys(m.to for m in msgs if m.to is not None):
            self.publish_status(name)  # once per agent and batch, not once per reminder
        return msgs

    # -- approvals ------------------------------------------------------------------

    def request_approval(self, actor: Agent, kind: str, description: str, payload: Any) -> Approval:
        self._take_rate(actor)
        return approvals.request(self, actor.name, kind, description, payload)

    async def resolve_approval(
        self,
        actor: Operator,
        aid: int,
        decision: str,
        note: str | None = None,
        sha256: str | None = None,
    ) -> Approval | Unreadable:
        """``sha256``: refused unless it is the approval's payload_sha256."""
        return await approvals.resolve(self, aid, decision, note, sha256)

    def pending_approvals(self, agent: str | None = None) -> list[Approval | Unreadable]:
        return self.store.approvals.list(status="pending", agent=agent)

    def pending_page(
        self, actor: Operator, after: int = 0, limit: int = PAGE
    ) -> Listing[Approval | Unreadable]:
        """One page of the pending approvals, oldest first, as summaries (a cut payload says
        so in ``truncated``; ``approval`` shows it whole, as approving would apply it)."""
        return self.store.approvals.page(status="pending", after=after, limit=limit)

    def pending_first_screen(
        self, actor: Operator, per_agent: int, limit: int
    ) -> Listing[Approval | Unreadable]:
        """The dashboard's pending approvals: the oldest, at most ``per_agent`` from any one
        agent (see ``questions_first_screen``)."""
        return self.store.approvals.first_screen(per_agent=per_agent, limit=limit)

    def approval(self, actor: Operator, aid: int) -> Approval | Unreadable:
        """One approval, whole: the exact payload its sha256 was taken of."""
        a = self.store.approvals.get(aid)
        if a is None:
            raise NotFound(f"no approval {aid}")
        return a

    def follow_link(self, actor: Operator, token: str) -> str:
        """Where a notification's one-use link leads, as the dashboard's ``focus``
        (``question-7``); the link is used up. It only navigates: nothing is approved or
        answered. An approval's link is refused if its payload is not the one notified."""
        try:
            target = self.store.links.redeem(hashlib.sha256(token.encode()).hexdigest())
        except LinkUsed as e:
            raise Gone(str(e)) from None
        if target is None:
            raise NotFound("no such link (a notification's link works once, for a while)")
        if target.kind == "approval":
            a = self.store.approvals.get(target.id)
            sha = None if a is None or isinstance(a, Unreadable) else a.payload_sha256
            if sha != target.payload_sha256:
                raise Conflict(
                    f"approval {target.id} is not the one notified (its payload changed):"
                    " this link is refused; see the dashboard"
                )
        return f"{target.kind}-{target.id}"

    # -- the harness's turn loop ----------------------------------------------------

    def harness_config(self, actor: Agent) -> dict[str, Any]:
        row = self.require_agent(actor.name)
        spec = self.spec(actor.name).model_dump(mode="json")
        env = self._runtime_env(actor.name)
        return {"name": actor.name, "spec": spec, "paused": bool(row.paused), "env": env}

    def _runtime_env(self, name: str) -> dict[str, str]:
        """The placeholders of agent ``name``'s bindings (never a secret), by variable:
        its runtime's env beyond the cage's base one (the harness reads it at start)."""
        return {
            b.env: b.placeholder
            for bs in self._bindings.values()
            for b in bs
            if b.agent == name and b.env
        }

    def agent_env(self, actor: Operator, name: str) -> dict[str, str]:
        """What ``hive exec`` adds to the base environment, so a command run by the
        operator in the cage sees what the agent's runtime sees."""
        self.require_agent(name)
        return self._runtime_env(name)

    async def turn_next(self, actor: Agent, conn: int, wait: float) -> dict[str, Any] | None:
        """The next message for a turn; while the agent is paused, none (messages
        stay queued, unacked). Resuming wakes the waiting harness."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            row = self.store.agents.get(actor.name)
            if row is None:
                return None
            if not row.paused:
                page = await self.recv(actor, conn, 0, 1)
                if page.items:
                    return page.items[0]
            if loop.time() >= deadline:
                return None
            await self.wakeups.wait(actor.name, deadline - loop.time())

    def turn_record(self, actor: Agent, turn: int, entries: Sequence[tuple[str, Any]]) -> int:
        recorded = self.store.transcripts.add(
            actor.name, turn, [(kind, _bounded(data)) for kind, data in entries]
        )
        self._transcript_grew(actor.name, recorded)
        return len(recorded)

    def turn_done(self, actor: Agent, turn: int, end: dict[str, Any]) -> None:
        entry = self.store.transcripts.finish_turn(actor.name, turn, end)
        self._let_go(actor.name, (turn,))
        self._transcript_grew(actor.name, [entry])

    def _transcript_grew(self, name: str, entries: list[TranscriptEntry]) -> None:
        self.transcript_wakeups.notify(name)
        if self.bus.wants("transcript"):
            self.bus.publish("transcript", {"agent": name, "entries": stamped_all(entries)})

    def harness_report(self, actor: Agent, state: dict[str, Any]) -> None:
        self.harness_state[actor.name] = state
        self.publish_status(actor.name)

    async def control(self, actor: Agent, wait: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while actor.name not in self._interrupts and loop.time() < deadline:
            await self.controls.wait(actor.name, deadline - loop.time())
        if actor.name in self._interrupts:
            self._interrupts.discard(actor.name)
            return {"interrupt": True}
        return {}

    async def transcript_read(
        self, actor: Agent, after: int, limit: int, wait: float
    ) -> Page[dict[str, Any]]:
        """The caller's own transcript (its page streams it), waiting for new entries."""
        return await self._transcript_wait(actor.name, after, limit, wait)

    async def _transcript_wait(
        self, name: str, after: int, limit: int, wait: float
    ) -> Page[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            page = self._transcript(name, after, limit)
            if page.items or loop.time() >= deadline:
                return page
            await self.transcript_wakeups.wait(name, deadline - loop.time())

    def transcript(
        self, actor: Operator, name: str, after: int, limit: int
    ) -> Page[dict[str, Any]]:
        self.require_agent(name)
        return self._transcript(name, after, limit)

    def _transcript(self, name: str, after: int, limit: int) -> Page[dict[str, Any]]:
        """The newest ``limit`` entries after ``after``, oldest first, as many as fit one
        reply; ``more``: the entries after the last one sent were left for the next."""
        return _page(self.store.transcripts.entries(name, after, limit), self._reply_budget())

    def page_state(self, actor: Agent, egress_limit: int) -> dict[str, Any]:
        """What the agent's own (harness's) page shows: only the caller's own rows."""
        return self._page_state(self.status_of(actor), egress_limit)

    def agent_page(self, actor: Operator, name: str, egress_limit: int) -> dict[str, Any]:
        """What the operator's view of agent NAME shows (``/agent/NAME/``, rendered by the
        core): the same rows as the agent's own page."""
        row = self.require_agent(name)
        return self._page_state(
            self.status_row(row, self.store.reminders.pending_of(row.name)), egress_limit
        )

    async def transcript_wait(
        self, actor: Operator, name: str, after: int, limit: int, wait: float
    ) -> Page[dict[str, Any]]:
        """Agent NAME's transcript after AFTER, waiting up to WAIT seconds for an entry (the
        operator's agent page streams it)."""
        self.require_agent(name)
        return await self._transcript_wait(name, after, limit, wait)

    def _page_state(self, status: AgentStatus, egress_limit: int) -> dict[str, Any]:
        """Its questions to the operator and pending approvals: the first page of each, as
        summaries, and how many there are (each links to the operator's one-item view)."""
        name = status.name
        store = self.store
        questions = store.questions.open_page(asker=name, target=OPERATOR, limit=PAGE)
        pending = store.approvals.page(status="pending", agent=name, limit=PAGE)
        return {
            "agent": model_fields_only(status),
            "questions": rows_out(questions.items),
            "questions_total": questions.total,
            "approvals": [approvals.shown(a) for a in pending.items],
            "approvals_total": pending.total,
            "egress_rules": stamped_all(store.egress.rules(name).get(name, [])),
            # A quarter of a reply: the rest of the page's state shares the same line.
            **_egress_log(
                store.egress.entries(name, egress_limit + 1),
                ReplyBudget(self.config.limits.reply_bytes // 4),
                egress_limit,
            ),
        }

    # -- egress ---------------------------------------------------------------------

    def egress_rules_for(self, name: str) -> tuple[Rule, ...]:
        return self._egress_rules.get(name, ())

    def reload_egress(self, name: str | None = None) -> None:
        rules = self.store.egress.rules(name)
        names = [name] if name else list(set(rules) | set(self._egress_rules))
        fresh = dict(self._egress_rules)
        for n in names:
            fresh[n] = parse_rules([r["rule"] for r in rules.get(n, [])])
        self._egress_rules = fresh
        for n in names:
            self.bus.publish("egress", {"agent": n, "rules": [r.text for r in fresh[n]]})
            self.egress.revalidate(n)  # what a rule taken back allowed ends now

    def record_egress(self, d: Decision) -> None:
        """Every decision of the proxy, in the log (and to subscribers); called in the loop.
        Written by the group commit: the decisions of a loop turn share one transaction
        (a cage making refused requests as fast as it can cost the core a commit each;
        red team round 22); a refusal's log line is throttled per agent."""
        closed_at = time.time() if d.closed else None
        row: EgressDecision = {
            "agent": d.agent, "at": d.at, "host": d.host, "port": d.port,
            "address": d.address, "allowed": d.allowed, "reason": d.reason,
            "bytes_up": d.bytes_up, "bytes_down": d.bytes_down,
            "closed_at": closed_at,
        }  # fmt: skip
        was_open = self._egress_open.pop(d.key, None)
        opened: list[int] = [0] if was_open is None else was_open
        if was_open is not None:
            ended = closed_at if closed_at is not None else time.time()

            def work(tx: Tx) -> int:
                close_in(tx, opened[0], d.bytes_up, d.bytes_down, ended, (d.allowed, d.reason))
                return opened[0]

        else:
            if not d.closed:
                self._egress_open[d.key] = opened

            def work(tx: Tx) -> int:
                opened[0] = self.store.egress.log_in(tx, row)
                return opened[0]

        def done(rowid: int) -> None:
            self.bus.publish("egress", {"agent": d.agent, "entry": stamped({"id": rowid, **row})})

        self._egress_pending.append((work, done, row))
        if len(self._egress_pending) == 1:
            # One write for the decisions of EGRESS_LOG_BATCH seconds: at once if the last
            # was longer ago (a decision alone is in the log at once), else at its end.
            wait = self._egress_written_at + EGRESS_LOG_BATCH - time.monotonic()
            loop = self.wakeups.loop()
            if wait <= 0:
                loop.call_soon(self._write_egress)
            else:
                loop.call_later(wait, self._write_egress)
        if d.allowed:
            log.info(
                "egress %s: allowed %s:%s (%s)%s", d.agent, d.host, d.port, d.reason,
                f" up {d.bytes_up} B down {d.bytes_down} B" if d.closed else "",
            )  # fmt: skip
        else:
            self._egress_refused[d.agent] = (d.host, d.port, d.reason)
            self._egress_refusals.event(d.agent)

    async def write_pending_egress(self) -> None:
        """At shutdown: the decisions still waiting for their write, written (or said in
        the log as not written)."""
        fut = self._write_egress()
        if fut is not None:
            await asyncio.wait({fut})

    def _write_egress(self) -> asyncio.Future[list[int]] | None:
        """The decisions pending, in order, in one write of the group commit."""
        batch, self._egress_pending = self._egress_pending, []
        self._egress_written_at = time.monotonic()
        if not batch:
            return None

        def work(tx: Tx) -> list[int]:
            return [write(tx) for write, _, _ in batch]

        def done(rowids: list[int]) -> None:
            for (_, each, _), rowid in zip(batch, rowids, strict=True):
                each(rowid)

        rows = [row for _, _, row in batch]
        fut = self.commits.submit(work, done)
        fut.add_done_callback(functools.partial(_egress_written, rows))
        return fut

    def _log_egress_refusals(self, agent: str, n: int) -> None:
        """LogThrottle's report: an agent's refusals, one line a period (each is a row of
        the egress log all the same)."""
        host, port, reason = self._egress_refused.get(agent, ("?", 0, "?"))
        if n == 1:
            log.info("egress %s: refused %s:%s (%s)", agent, host, port, reason)
        else:
            log.info(
                "egress %s: refused %d requests in %g s (the last: %s:%s, %s)",
                agent, n, EGRESS_REFUSAL_LOG_EVERY, host, port, reason,
            )  # fmt: skip

    # -- secrets and their bindings --------------------------------------------------

    def reload_bindings(self) -> None:
        fresh: dict[tuple[str, str, int], list[Binding]] = {}
        for b in self.store.bindings.all():
            fresh.setdefault((b.agent, b.host, b.port), []).append(b)
        self._bindings = {k: tuple(v) for k, v in fresh.items()}

    def egress_plan(self, agent: str, host: str, port: int, rules: tuple[Rule, ...]) -> Plan | None:
        """Whether the proxy terminates TLS for ``agent``'s connection to ``host:port``
        (called from its threads): with a binding, or L7 rules and no plain rule."""
        bindings = self._bindings.get((agent, host, port), ())
        l7 = tuple(r for r in rules if r.l7 and r.matches_name(host, port))
        plain = any(
            not r.l7 and r.name is not None and r.matches_name(host, port) for r in rules
        ) or any(not r.l7 and r.suffix is not None and r.matches_name(host, port) for r in rules)
        if not bindings and (not l7 or plain):
            return None
        injections = tuple(
            Injection(
                secret=b.secret,
                header=parse_header(b.header)[0].encode(),
                template=parse_header(b.header)[1],
                placeholder=b.placeholder,
                value=functools.partial(self.secrets.get, b.secret),
            )
            for b in bindings
        )
        return Plan(host, port, None if plain or not l7 else l7, injections)

    def secret_set(self, actor: Operator, name: str, value: str) -> bool:
        """Keep ``value`` as ``name``; refusals never quote the value."""
        value = value.rstrip("\r\n")
        try:
            check_value(value)
            new = self.secrets.set(name, value)
        except SecretError as e:
            raise BadRequest(str(e)) from None
        log.info("secret %s %s (value not logged)", name, "set" if new else "replaced")
        self._secret_changed(name, "set" if new else "replaced")
        return new

    def _secret_changed(self, name: str, change: str, agents: list[str] | None = None) -> None:
        """An event for the operator's surfaces: the secret's name and what changed, never
        its value. No top-level ``name``: a lossy feed would take it for an agent's."""
        event: dict[str, Any] = {"secret": name, "change": change}
        if agents:
            event["agents"] = agents
        self.bus.publish("secret", event)

    def secret_rm(self, actor: Operator, name: str) -> None:
        if not self.secrets.remove(name):
            raise NotFound(f"no secret named {name!r}")
        log.info("secret %s removed", name)
        self._secret_changed(name, "removed")

    def secret_ls(self, actor: Operator) -> list[dict[str, Any]]:
        """Names, when set, and bindings; never a value."""
        out: dict[str, dict[str, Any]] = {
            i.name: {"name": i.name, "set": True, "set_at": rfc3339(i.set_at), "bindings": []}
            for i in self.secrets.ls()
        }
        for b in self.store.bindings.all():
            row = out.setdefault(b.secret, {"name": b.secret, "set": False, "bindings": []})
            row["bindings"].append(
                {
                    "agent": b.agent,
                    "to": f"{b.host}:{b.port}",
                    "header": b.header,
                    **({"env": b.env} if b.env else {}),
                    "source": b.source,
                    "added_at": rfc3339(b.added_at),
                }
            )
        return [out[k] for k in sorted(out)]

    def secret_bind(
        self,
        actor: Operator,
        name: str,
        agents: list[str],
        to: str,
        header: str,
        env: str | None,
    ) -> str:
        """Bind ``name`` for ``agents`` to ``to`` and ``header``; live for the proxy at
        once, the placeholder in the cage's env from the agent's next start."""
        for agent in agents:
            self.require_agent(agent)
        host, port = parse_destination(to)
        existing = [b for b in self.store.bindings.all() if b.secret == name]
        placeholder = existing[0].placeholder if existing else new_placeholder()
        same_header = parse_header(header)[0]
        for b in self.store.bindings.all():
            clash = b.agent in agents and b.secret != name and (b.host, b.port) == (host, port)
            if clash and parse_header(b.header)[0] == same_header:
                raise Conflict(f"{b.agent} already has secret {b.secret!r} in that header for {to}")
        self.store.bindings.bind(name, agents, host, port, header, env, "operator", placeholder)
        self.reload_bindings()
        log.info("secret %s bound for %s to %s:%d", name, ", ".join(agents), host, port)
        self._secret_changed(name, f"bound to {host}:{port}", agents)
        return f"{host}:{port}"

    def secret_unbind(self, actor: Operator, name: str, agents: list[str]) -> int:
        n = self.store.bindings.unbind(name, agents)
        self.reload_bindings()
        if n == 0:
            raise NotFound(f"no binding of secret {name!r} for those agents")
        self._secret_changed(name, "unbound", agents)
        return n

    def egress_rules(self, actor: Operator, name: str | None) -> dict[str, list[EgressRule]]:
        if name is not None:
            self.require_agent(name)
        return self.store.egress.rules(name)

    def allow_egress(self, actor: Operator, name: str, rule: str) -> bool:
        """Add ``rule`` to ``name``'s allowlist (source ``operator``), live at once."""
        self.require_agent(name)
        added = self.store.egress.add_rule(name, rule, "operator")
        self.reload_egress(name)
        return added

    def remove_egress(self, actor: Operator, name: str, rule: str) -> None:
        self.require_agent(name)
        removed = self.store.egress.remove_rule(name, rule)
        self.reload_egress(name)
        if not removed:
            raise Conflict(f"{name} has no egress rule {rule!r}")

    def egress_log(
        self, actor: Operator, name: str | None, limit: int, before: int | None = None
    ) -> Page[dict[str, Any]]:
        """The newest ``limit`` decisions older than ``before``, newest first, as many as
        fit one reply; ``more``: older ones were left (ask with ``before`` = the last id)."""
        if name is not None:
            self.require_agent(name)
        rows = self.store.egress.entries(name, limit + 1, before)
        return _page(rows, self._reply_budget(), limit)

    def egress_log_fair(self, actor: Operator, limit: int) -> list[Any]:
        """The dashboard's recent decisions: the newest, each agent's fair share of them
        (``EgressRepo.fair_recent``); ``egress_log`` gives them all, page by page."""
        return _page(self.store.egress.fair_recent(limit), self._reply_budget(), limit).items

    def events(self, actor: Operator, kinds: frozenset[str], lossy: bool = False) -> Subscription:
        """A subscription to the hive's events; the caller unsubscribes. A ``lossy`` one
        drops its oldest events when its reader is slow, instead of being cut off."""
        return self.bus.subscribe(kinds, lossy)

    # -- lifecycle (the operator's) -----------------------------------------------

    # ``created_at``: each named agent's as the operator saw it (a carried action is bound
    # to it, docs/swarm.md): refused, nothing done, if that agent was destroyed and one of
    # the same name spawned since. Each verb marks the write that completes it
    # (``completing``: what a carried action's "applied" commits with, so a crash never
    # leaves it marked with a step undone, nor carried out twice once it was).

    async def start_all(
        self, actor: Operator, names: list[str], created_at: Incarnations = None
    ) -> list[str]:
        async def start_one(name: str) -> None:
            await self._start(name, complete=len(names) == 1)

        return await self._run_all(start_one, names, created_at)

    async def stop_all(
        self, actor: Operator, names: list[str], graceful: bool, created_at: Incarnations = None
    ) -> list[str]:
        async def stop_one(name: str) -> None:
            await self._stop(name, graceful)

        return await self._run_all(stop_one, names, created_at)

    async def restart(self, actor: Operator, name: str, created_at: float | None = None) -> None:
        self._require_incarnation(name, created_at)
        # Its start's write completes it: a crash after it is finished by the core's own
        # start-up (the agent is not stopped); before it, the restart is carried out again.
        await self._stop(name, graceful=True)
        await self._start(name, complete=True)

    def set_paused(
        self, actor: Operator, name: str, paused: bool, created_at: float | None = None
    ) -> None:
        self._require_incarnation(name, created_at)
        with completing():
            self.store.agents.set_flag(name, "paused", paused)
        self.wakeups.notify(name)  # a harness waiting for its next turn looks again
        self.publish_status(name)

    def interrupt(self, actor: Operator, name: str, created_at: float | None = None) -> None:
        self._require_incarnation(name, created_at)
        self._interrupts.add(name)
        self.controls.notify(name)
        # At most once: an interrupt carried out again after a crash would stop a turn the
        # operator never saw (the one it meant ended with the crash, or long ago).
        self.store.db.completed()

    def _require_incarnation(self, name: str, created_at: float | None) -> AgentRow:
        """Agent ``name``'s row, refused unless it is the one created at ``created_at``
        (None: any). Checked with no await before the verb's first write."""
        row = self.require_agent(name)
        if created_at is not None and row.created_at != created_at:
            raise Conflict(
                f"agent {name!r} is not the one acted on: it was created at {row.created_at!r},"
                f" not {created_at!r} (destroyed and spawned again since); nothing was done"
            )
        return row

    async def spawn(self, actor: Operator, name: str, spec: AgentSpec) -> None:
        if self.exists(name):
            raise Conflict(f"an agent named {name!r} already exists")
        if self.swarm is not None and (host := self.swarm.host_of(name)) is not None:
            raise Conflict(f"an agent named {name!r} already exists on host {host}")
        self.check_agent_room()
        self.store.agents.create(name, spec, None, "operator")
        await self.after_create(name)

    def request_spawn(
        self, actor: Operator, name: str, spec: AgentSpec, description: str | None
    ) -> Approval:
        """hyperhive's operator-side spawn request: a pending ``spawn`` approval (a
        root-level agent once approved), checked now as an agent's would be."""
        payload = {"name": name, "spec": spec.model_dump(mode="json", exclude_none=True)}
        text = description or f"spawn {name} (requested by the operator)"
        return approvals.request(self, OPERATOR, "spawn", text, payload)

    def set_parent(self, actor: Operator, name: str, parent: str | None) -> None:
        """Move ``name`` under ``parent`` (None: root-level); never into its own subtree."""
        self.require_agent(name)
        if parent is not None:
            self.require_agent(parent)
            seen: set[str] = set()
            up: str | None = parent
            while up is not None and up not in seen:  # walk up from the new parent
                if up == name:
                    raise Conflict(f"{parent!r} is {name!r} or below it; that would be a cycle")
                seen.add(up)
                row = self.store.agents.get(up)
                up = row.parent if row is not None else None
        self.store.agents.set_parent(name, parent)
        self.publish_status(name)

    def set_resource_limits(
        self, actor: Operator, name: str, limits: dict[str, int | None]
    ) -> AgentSpec:
        """Store ``name``'s cage limits in its spec (None: the default); they apply when
        its cage next starts. Returns the new spec."""
        row = self.require_agent(name)
        spec = row.spec.model_copy(update=limits)
        self.store.agents.set_spec(name, spec)
        return spec

    async def destroy(self, actor: Operator, name: str, created_at: float | None = None) -> None:
        self._require_incarnation(name, created_at)
        await self.lifecycle.destroy(name)
        if self.swarm is not None:  # its questions across hosts: closed there too
            self.swarm.forget(name)
        with completing():  # the row goes last: each step before it may be taken again
            self.store.agents.delete(name)
        self._forget(name)
        self.reload_egress(name)
        log.info("agent %s destroyed", name)
        self.publish_status(name)

    async def resume_running(self) -> list[str]:
        """At start-up, first: every agent not stopped by the operator whose cage still
        runs (after a restart of the core: all of them) is found in one request and served
        again at once. Returns the others, for ``resume_agents``."""
        # Asking hive-priv twice per agent, four at a time, was most of a restart's 13.8 s
        # with 600 cages.
        rows = self.store.agents.all()
        wanted = [row.name for row in rows if not row.stopped]
        try:
            found = set(await self.lifecycle.found_running(wanted, self))
        except Refused as e:  # hive-priv away: each start says so, one by one
            log.warning("finding the running cages failed: %s", e)
            found = set()
        await self._finish_stops([row.name for row in rows if row.stopped])
        return [name for name in wanted if name not in found]

    async def destroy_leftovers(self, retry_every: float = LEFTOVERS_RETRY) -> None:
        """After start-up, in the background: destroy every cage, home and block of ids
        hive-priv holds for a name that is no agent (taken out of hive.toml, or a destroy
        cut short by a crash), and what the core kept of it, so no cage runs out of every
        verb's reach (red team round 24). Again every ``retry_every`` seconds while
        hive-priv doesn't answer or a destroy fails. A new agent never depends on it: its
        own name's leftovers are destroyed before it starts (``after_create``)."""
        while True:
            agents = {row.name for row in self.store.agents.all()}
            try:
                gone = await self.lifecycle.leftovers(agents)
            except Refused as e:
                log.warning(
                    "finding cages of agents gone failed (again in %gs): %s", retry_every, e
                )
                await asyncio.sleep(retry_every)
                continue
            failed = 0
            for name in gone:
                if self.exists(name):  # spawned meanwhile: after_create cleared it
                    continue
                log.warning(
                    "agent %s is gone (taken out of hive.toml, or its destroy cut short):"
                    " destroying its cage, home and ids",
                    name,
                )
                try:
                    await self.lifecycle.destroy(name)
                except Refused as e:
                    failed += 1
                    log.error("agent %s: destroying what was left failed: %s", name, e)
                    continue
                self._forget(name)
            if not failed:
                return
            await asyncio.sleep(retry_every)

    async def clear_leftovers(self, names: list[str]) -> None:
        """``names`` are new agents (just spawned, or just declared in hive.toml): whatever
        hive-priv still holds for them is a gone agent's (its home, its ids, its running
        processes) and is destroyed before they start, or they don't start (Refused)."""
        for name in await self.lifecycle.holding(names):
            log.warning("agent %s is new: destroying what a gone agent of its name left", name)
            try:
                await self.lifecycle.destroy(name)
            except Refused as e:
                raise Refused(
                    f"agent {name}: what a gone agent of that name left could not be destroyed"
                    f" ({e}); it was not started"
                ) from None
            # (not _forget: the store's rows of the name are the new agent's, hive.toml's
            # bindings of it among them; the gone one's went with its row)

    async def _finish_stops(self, stopped: list[str]) -> None:
        """Stop the cages of agents marked stopped that still run: a stop marks the row
        first, and a core killed before the cage was stopped left it running for good."""
        if not stopped:
            return
        try:
            running = await self.lifecycle.still_running(stopped)
        except Refused as e:
            log.warning("finding the stopped agents' cages failed: %s", e)
            return
        for name in running:
            log.info("agent %s is stopped but its cage runs (a stop cut short): stopping it", name)
            try:
                await self.lifecycle.stop(name, graceful=False)
            except Refused as e:
                log.error("agent %s: stopping its cage failed: %s", name, e)

    async def resume_agents(self, names: list[str]) -> None:
        """At start-up, then: start ``names`` (``resume_running``'s rest); one that can't
        start is logged, not fatal."""
        # A few at once: hive-priv serves each request on a thread of its own and locks
        # per agent, so with hundreds of agents the start-up is not one cage after another.
        gate = asyncio.Semaphore(RESUME_AT_ONCE)

        async def resume(name: str) -> None:
            async with gate:
                try:
                    await self.lifecycle.start(name, self)
                except Refused as e:
                    log.error("agent %s did not start: %s", name, e)

        await asyncio.gather(*(resume(name) for name in names))

    async def after_create(self, name: str) -> None:
        await self.clear_leftovers([name])  # a new agent never starts on what a gone one left
        log.info("agent %s created", name)
        self.reload_egress(name)  # the spec's rules
        await self.lifecycle.start(name, self)
        self.publish_status(name)

    async def _start(self, name: str, complete: bool = False) -> None:
        """``complete``: this write completes the verb (a crash after it: the core's own
        start-up starts the agent, whose row says it is not stopped)."""
        self.require_agent(name)
        with completing() if complete else contextlib.nullcontext():
            self.store.agents.set_flag(name, "stopped", False)
        await self.lifecycle.start(name, self)
        self.publish_status(name)

    async def _stop(self, name: str, graceful: bool) -> None:
        self.require_agent(name)
        self.store.agents.set_flag(name, "stopped", True)
        # A crash here (tests/test_faults.py): marked stopped, its cage still running.
        faults.point(self.store.path.parent, "stop-marked")
        await self.lifecycle.stop(name, graceful)
        self.publish_status(name)

    def _forget(self, name: str) -> None:
        self.held_backoff.forget(name)
        self._held_restarts.pop(name, None)  # a restart waiting to start a cage: not this one's
        in_flight = self._in_flight.pop(name, {})
        for conn in set(in_flight.values()):
            self._held_by.pop(conn, None)
        for i in in_flight:
            self._sizes.pop(i, None)
        self._handed_high.pop(name, None)
        self._given_back.pop(name, None)
        self.limit_watch.forget(name)
        self.inboxes.forget(name)
        self._interrupts.discard(name)
        self.harness_state.pop(name, None)
        self.rates.forget(name)
        self.store.egress.forget(name)
        self.store.bindings.forget_agent(name)
        self.reload_bindings()

    async def _run_all(
        self, fn: Callable[[str], Awaitable[None]], names: list[str], created_at: Incarnations
    ) -> list[str]:
        """``fn`` of each of ``names`` (none: every agent), in turn; complete once all are
        (a stop's cage, the last of several starts): carried out again after a crash
        before that, each leaves its agent as asked whatever it finds."""
        targets = names or [r.name for r in self.store.agents.all()]
        for n in targets:  # refuse the whole request before changing anything
            self._require_incarnation(n, None if created_at is None else created_at.get(n))
        for n in targets:
            await fn(n)
        self.store.db.completed()
        return targets


def _page(
    rows: Iterable[Any], budget: ReplyBudget, limit: int | None = None
) -> Page[dict[str, Any]]:
    """Rows (typed, or Unreadable) as sent, while they fit ``budget`` and ``limit``."""
    return take((row_out(r) for r in rows), budget, limit or sys.maxsize, encoded_size)


def _egress_written(rows: list[EgressDecision], fut: asyncio.Future[list[int]]) -> None:
    """A batch of decisions failed to be written (a full disk): said in one line (a batch
    holds up to EGRESS_LOG_BATCH's worth of a flood: a line each was a flood of its own),
    with each agent's count and the last decision; their connections go on."""
    if fut.cancelled() or (exc := fut.exception()) is None:
        return
    per_agent = collections.Counter(row["agent"] for row in rows)
    log.error(
        "egress: %d decision(s) not logged (%s): %s; the last: %s",
        len(rows),
        exc,
        ", ".join(f"{agent} {n}" for agent, n in sorted(per_agent.items())),
        rows[-1],
    )


def _egress_log(rows: Iterable[Any], budget: ReplyBudget, limit: int) -> dict[str, Any]:
    page = _page(rows, budget, limit)
    return {"egress_log": page.items, **({"egress_log_more": True} if page.more else {})}


def _bounded(data: Any) -> Any:
    """Transcript entries are data the agent produced: cap what one entry may hold."""
    if isinstance(data, str) and len(data) > MAX_ENTRY_CHARS:
        return data[:MAX_ENTRY_CHARS] + f"… [{len(data) - MAX_ENTRY_CHARS} more characters dropped]"
    if not isinstance(data, str):
        text = json.dumps(data, ensure_ascii=False)
        if len(text) > MAX_ENTRY_CHARS:
            dropped = len(text) - MAX_ENTRY_CHARS
            return text[:MAX_ENTRY_CHARS] + f"… [{dropped} more characters dropped]"
    return data


async def _id_of(committed: Awaitable[Message]) -> int:
    return (await committed).id

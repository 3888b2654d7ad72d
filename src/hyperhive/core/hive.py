"""The hive's behaviour, shared by both sockets: who may talk to whom, delivery,
questions, approvals and agent lifecycle. Both socket modules are thin
dispatchers over this; neither decides identity here (the caller passes it)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from hyperhive.config import HiveConfig
from hyperhive.core.egress import Decision, EgressProxy, Resolver
from hyperhive.core.events import EventBus, InboxWakeups
from hyperhive.core.ratelimit import RateLimited, TokenBuckets
from hyperhive.core.store import AgentRow, EgressDecision, Store, StoreError
from hyperhive.names import OPERATOR
from hyperhive.wire.common import AgentSpec, AgentStatus, Message
from hyperhive.wire.egress import Rule, parse_rules
from hyperhive.wire.framing import model_fields_only

log = logging.getLogger("hive.core")


class Refused(Exception):
    """A request the hive refuses; ``str(self)`` is the one-line reason."""


class Lifecycle:
    """What starting and stopping an agent means. hive-core serves the agent's
    socket; the cage (through hive-priv) plugs in here."""

    async def start(self, name: str) -> None: ...
    async def stop(self, name: str, graceful: bool) -> None: ...
    async def destroy(self, name: str) -> None:
        await self.stop(name, graceful=False)

    def running(self, name: str) -> bool:
        return False

    def failed(self, name: str) -> bool:
        return False


class Hive:
    def __init__(self, store: Store, config: HiveConfig, lifecycle: Lifecycle) -> None:
        self.store = store
        self.config = config
        self.lifecycle = lifecycle
        self.wakeups = InboxWakeups()
        self.bus = EventBus()
        # message id -> connection id holding it unacked; released when that connection ends
        self._in_flight: dict[str, dict[int, int]] = defaultdict(dict)
        self.on_reminder_added: Callable[[], None] = lambda: None
        self._send_batch: list[tuple[tuple[str, str, str, str], asyncio.Future[Message]]] = []
        self.controls = InboxWakeups()  # wakes a harness's `control` long-poll
        self.transcript_wakeups = InboxWakeups()  # wakes an agent page's transcript stream
        self._interrupts: set[str] = set()
        self.harness_state: dict[str, dict[str, Any]] = {}  # needs_login, active_model, reported
        self.rates = TokenBuckets(config.limits.messages_per_second, config.limits.message_burst)
        store.history_keep = config.limits.history_keep
        # Sends queued for the next group commit, per sender: (rows, bytes) not yet in agent_usage.
        self._queued: dict[str, tuple[int, int]] = {}
        # Egress: the rules the proxy threads read (replaced whole, never mutated in place).
        self._egress_rules: dict[str, tuple[Rule, ...]] = {}
        self._egress_open: dict[int, int] = {}  # decision key -> log row, while its connection lasts
        self.egress = EgressProxy(
            self.egress_rules_for, self.record_egress,
            Resolver({k: str(v) for k, v in config.egress.hosts.items()}), config.egress.max_connections,
        )
        self.reload_egress()

    # -- agents ------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        return self.store.agents.get(name) is not None

    def require_agent(self, name: str) -> AgentRow:
        row = self.store.agents.get(name)
        if row is None:
            raise Refused(f"no agent named {name!r}")
        return row

    def spec(self, name: str) -> AgentSpec:
        return self.require_agent(name).spec

    def peers(self, name: str) -> list[str]:
        """Agents ``name`` may message and ask: its declared peers, its parent and
        its children (spawned helpers report back), that exist now."""
        return sorted(r.name for r in self.store.agents.all() if self.may_address(name, r.name))

    def may_address(self, sender: str, target: str) -> bool:
        me, them = self.store.agents.get(sender), self.store.agents.get(target)
        if me is None or them is None or sender == target:
            return False
        return target in me.spec.peers or me.parent == target or them.parent == sender

    def take_rate(self, name: str) -> None:
        try:
            self.rates.take(name)
        except RateLimited as e:
            raise Refused(str(e)) from None

    # -- budgets ------------------------------------------------------------------

    def check_agent_room(self) -> None:
        """Refuse one more agent beyond ``[limits] max_agents`` (the core's budget)."""
        n, limit = len(self.store.agents.all()), self.config.limits.max_agents
        if n >= limit:
            raise Refused(f"agent limit: the hive has {n} agents, [limits] max_agents is {limit}")

    def check_store_quota(self, agent: str, rows: int, nbytes: int, to_operator: bool = False) -> None:
        """Refuse, before anything is stored, what would take ``agent`` over its storage
        quota: ``rows`` more undelivered messages, open questions, pending approvals or
        reminders of ``nbytes`` bytes. A message to the operator may push out the agent's
        own oldest messages to the operator (see store.messages.send_many), so those don't count."""
        if agent == OPERATOR:
            return  # the operator's own messages are not an agent's to bound
        limits = self.config.limits
        held_rows, held_bytes, op_rows, op_bytes = self.store.usage.of(agent)
        q_rows, q_bytes = self._queued.get(agent, (0, 0))
        held_rows, held_bytes = held_rows + q_rows, held_bytes + q_bytes
        if to_operator:
            held_rows, held_bytes = held_rows - op_rows, held_bytes - op_bytes
        if held_rows + rows > limits.agent_pending_max:
            raise Refused(
                f"storage quota: agent {agent} holds {held_rows} undelivered messages, questions, approvals"
                f" and reminders, limit {limits.agent_pending_max}")
        if held_bytes + nbytes > limits.agent_store_mib << 20:
            raise Refused(
                f"storage quota: agent {agent} holds {held_bytes / (1 << 20):.1f} MiB of undelivered messages,"
                f" limit {limits.agent_store_mib} MiB")

    def store_quota(self) -> tuple[int, int]:
        return self.config.limits.agent_pending_max, self.config.limits.agent_store_mib << 20

    def check_may_address(self, sender: str, target: str) -> None:
        if target == OPERATOR:
            return
        if target == sender:
            raise Refused("an agent can't message itself")
        if not self.may_address(sender, target):
            if not self.exists(target):
                raise Refused(f"no agent named {target!r}")
            raise Refused(f"{target!r} is not one of {sender}'s peers")

    def status_row(self, row: AgentRow, reminders: dict[str, int]) -> AgentStatus:
        spec = row.spec
        return AgentStatus(
            name=row.name,
            running=self.lifecycle.running(row.name),
            failed=self.lifecycle.failed(row.name),
            pending_reminders=reminders.get(row.name, 0),
            paused=row.paused,
            parent=row.parent,
            needs_login=bool(self.harness_state.get(row.name, {}).get("needs_login")),
            active_model=self.harness_state.get(row.name, {}).get("active_model")
            or (spec.model if spec.runtime == "claude" else None),
            status_text=row.status_text,
            status_set_at=row.status_set_at,
            url=f"http://{self.config.hive.listen}/agent/{row.name}/",
        )

    def statuses(self) -> list[dict[str, Any]]:
        reminders = self.store.reminders.pending()
        return [model_fields_only(self.status_row(r, reminders)) for r in self.store.agents.all()]

    def publish_status(self, name: str) -> None:
        row = self.store.agents.get(name)
        if row is None:
            self.bus.publish("agent_status", {"name": name, "destroyed": True})
            return
        reminders = self.store.reminders.pending()
        self.bus.publish("agent_status", {"agent": model_fields_only(self.status_row(row, reminders))})

    # -- delivery -----------------------------------------------------------------

    def delivered(self, msg: Message) -> None:
        """After a message is committed: wake its recipient and tell subscribers."""
        assert msg.to is not None
        self.wakeups.notify(msg.to)
        self.bus.version += 1
        if self.bus.wants("message"):
            self.bus.publish("message", {"message": model_fields_only(msg)})

    async def send(self, sender: str, to: str, body: str) -> Message:
        """Queue a message for the next group commit; return once it is committed.

        Sends that arrive in the same turn of the event loop share one
        transaction: the reply still only goes out after the commit, and a
        failed commit refuses every send in it (none is half-stored)."""
        nbytes = len(body.encode())
        self.check_store_quota(sender, 1, nbytes, to_operator=to == OPERATOR)
        rows, held = self._queued.get(sender, (0, 0))
        self._queued[sender] = (rows + 1, held + nbytes)  # counted until the commit
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Message] = loop.create_future()
        self._send_batch.append(((to, sender, "message", body), fut))
        if len(self._send_batch) == 1:
            loop.call_soon(self._flush_sends)
        return await fut

    def _flush_sends(self) -> None:
        batch, self._send_batch = self._send_batch, []
        for (_, sender, _, body), _ in batch:
            rows, held = self._queued.pop(sender, (0, 0))
            if rows > 1:
                self._queued[sender] = (rows - 1, held - len(body.encode()))
        try:
            msgs = self.store.messages.send_many([item for item, _ in batch], quota=self.store_quota())
        except Exception as e:  # every send in the batch is refused alike
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        for (_, fut), msg in zip(batch, msgs):
            self.delivered(msg)
            if not fut.done():
                fut.set_result(msg)

    async def recv(self, name: str, conn: int, wait: float, limit: int) -> list[Message]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            in_flight = self._in_flight[name]
            msgs = self.store.messages.unacked(name, limit, skip=set(in_flight))
            if msgs or loop.time() >= deadline:
                for m in msgs:
                    in_flight[m.id] = conn
                return msgs
            await self.wakeups.wait(name, deadline - loop.time())

    async def turn_next(self, name: str, conn: int, wait: float) -> Message | None:
        """The next message for a turn; while the agent is paused, none (messages
        stay queued, unacked). Resuming wakes the waiting harness."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            row = self.store.agents.get(name)
            if row is None:
                return None
            if not row.paused:
                msgs = await self.recv(name, conn, 0, 1)
                if msgs:
                    return msgs[0]
            if loop.time() >= deadline:
                return None
            await self.wakeups.wait(name, deadline - loop.time())

    def ask(self, asker: str, to: str, question: str, options: list[str] | None) -> int:
        """A question (to an agent, also delivered to its inbox: stored twice)."""
        nbytes = len(question.encode()) + (0 if options is None else len(json.dumps(options).encode()))
        copies = 1 if to == OPERATOR else 2
        self.check_store_quota(asker, copies, copies * nbytes)
        q, delivered = self.store.questions.ask(asker, to, question, options)
        self.bus.publish("question", {"question": model_fields_only(q)})
        if delivered is not None:
            self.delivered(delivered)
        return q.id

    def answer(self, target: str, qid: int, answer: str) -> int:
        """``target`` answers question ``qid`` addressed to it; the answer is a message it holds."""
        self.check_store_quota(target, 1, len(answer.encode()))
        try:
            q, msg = self.store.questions.answer(qid, target, answer)
        except LookupError as e:
            raise Refused(str(e)) from None
        self.delivered(msg)
        self.bus.publish("answer", {"question": model_fields_only(q)})
        return q.id

    def remind(self, agent: str, due: float, text: str) -> int:
        self.check_store_quota(agent, 1, len(text.encode()))
        rid = self.store.reminders.add(agent, due, text)
        self.on_reminder_added()
        self.publish_status(agent)
        return rid

    def interrupt(self, name: str) -> None:
        self.require_agent(name)
        self._interrupts.add(name)
        self.controls.notify(name)

    async def control(self, name: str, wait: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while name not in self._interrupts and loop.time() < deadline:
            await self.controls.wait(name, deadline - loop.time())
        if name in self._interrupts:
            self._interrupts.discard(name)
            return {"interrupt": True}
        return {}

    def ack(self, name: str, ids: list[int]) -> int:
        n = self.store.messages.ack(name, ids)
        in_flight = self._in_flight[name]
        for i in ids:
            in_flight.pop(i, None)
        return n

    def ack_in_flight(self, name: str, message_id: int) -> None:
        self._in_flight[name].pop(message_id, None)

    def release(self, name: str, conn: int) -> None:
        """A connection ended: its unacked messages go back to the inbox."""
        in_flight = self._in_flight.get(name)
        if not in_flight:
            return
        released = [i for i, c in in_flight.items() if c == conn]
        for i in released:
            del in_flight[i]
        if released:
            self.wakeups.notify(name)

    def forget(self, name: str) -> None:
        self._in_flight.pop(name, None)
        self._interrupts.discard(name)
        self.harness_state.pop(name, None)
        self.rates.forget(name)
        self.store.egress.forget(name)

    # -- egress -------------------------------------------------------------------

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

    def record_egress(self, d: Decision) -> None:
        """Every decision of the proxy, in the log (and to subscribers); called in the loop."""
        row: EgressDecision = {"agent": d.agent, "at": d.at, "host": d.host, "port": d.port, "address": d.address,
               "allowed": d.allowed, "reason": d.reason, "bytes_up": d.bytes_up, "bytes_down": d.bytes_down,
               "closed_at": time.time() if d.closed else None}
        try:
            rowid = self._egress_open.pop(d.key, None)
            if rowid is not None:
                self.store.egress.close(rowid, d.bytes_up, d.bytes_down, row["closed_at"] or time.time())
            else:
                rowid = self.store.egress.log(row)
                if not d.closed:
                    self._egress_open[d.key] = rowid
        except StoreError as e:
            log.error("egress %s: decision not logged (%s): %s", d.agent, e, row)
            return
        log.info("egress %s: %s %s:%s (%s)%s", d.agent, "allowed" if d.allowed else "refused", d.host, d.port,
                 d.reason, f" up {d.bytes_up} B down {d.bytes_down} B" if d.closed and d.allowed else "")
        self.bus.publish("egress", {"agent": d.agent, "entry": {"id": rowid, **row}})

    def allow_egress(self, name: str, rule: str, source: str) -> bool:
        self.require_agent(name)
        added = self.store.egress.add_rule(name, rule, source)
        self.reload_egress(name)
        return added

    def remove_egress(self, name: str, rule: str) -> bool:
        self.require_agent(name)
        removed = self.store.egress.remove_rule(name, rule)
        self.reload_egress(name)
        return removed

    # -- lifecycle ----------------------------------------------------------------

    async def start(self, name: str) -> None:
        self.require_agent(name)
        self.store.agents.set_flag(name, "stopped", False)
        await self.lifecycle.start(name)
        self.publish_status(name)

    async def stop(self, name: str, graceful: bool) -> None:
        self.require_agent(name)
        self.store.agents.set_flag(name, "stopped", True)
        await self.lifecycle.stop(name, graceful)
        self.publish_status(name)

    async def create(self, name: str, spec: AgentSpec, parent: str | None, origin: str) -> None:
        if self.exists(name):
            raise Refused(f"an agent named {name!r} already exists")
        self.check_agent_room()
        self.store.agents.create(name, spec, parent, origin)
        await self.after_create(name)

    async def after_create(self, name: str) -> None:
        log.info("agent %s created", name)
        self.reload_egress(name)  # the spec's rules
        await self.lifecycle.start(name)
        self.publish_status(name)

    async def destroy(self, name: str) -> None:
        self.require_agent(name)
        await self.lifecycle.destroy(name)
        self.store.agents.delete(name)
        self.forget(name)
        self.reload_egress(name)
        log.info("agent %s destroyed", name)
        self.publish_status(name)

    async def run_all(self, fn: Callable[[str], Awaitable[None]], names: list[str]) -> list[str]:
        targets = names or [r.name for r in self.store.agents.all()]
        for n in targets:
            self.require_agent(n)  # refuse the whole request before changing anything
        for n in targets:
            await fn(n)
        return targets

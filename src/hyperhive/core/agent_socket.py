"""``agent.sock``: one listener per agent. The listener *is* the identity: every
handler gets the agent's name from the listener it was accepted on, and the
request models have no field that could name anyone else."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from hyperhive.core import approvals
from hyperhive.core.budget import AGENT_SOCK_BACKLOG
from hyperhive.core.hive import Hive, Lifecycle, Refused
from hyperhive.core.jsonlines import STREAM_LIMIT, Reply, serve_lines
from hyperhive.paths import RunDir
from hyperhive.peercred import peer_cred
from hyperhive.wire import agent as w
from hyperhive.wire import harness as wh
from hyperhive.wire.framing import (
    describe_validation_error,
    dump_line,
    error,
    model_fields_only,
    ok,
)

log = logging.getLogger("hive.core")
_conn_ids = itertools.count(1)


def _msg(m: Any) -> dict[str, Any]:
    d = model_fields_only(m)
    d.pop("to", None)  # the recipient is the caller
    return d


class AgentSession:
    """One connection on one agent's socket."""

    def __init__(self, hive: Hive, name: str, is_harness: bool = False) -> None:
        self.hive = hive
        self.name = name
        self.is_harness = is_harness  # the kernel said so: peer uid = this agent's harness uid
        self.conn = next(_conn_ids)

    async def handle(self, obj: dict[str, Any]) -> Reply:
        cmd = obj.get("cmd")
        harness_verb = isinstance(cmd, str) and cmd in wh.HARNESS_VERBS  # any JSON may come: {"cmd": []}
        if harness_verb and not self.is_harness:
            return error(f"{obj['cmd']!r} is for the agent's harness only")
        try:
            req = (wh.harness_request if harness_verb else w.agent_request).validate_python(obj)
        except ValidationError as e:
            return error(describe_validation_error(e))
        if not self.hive.exists(self.name):
            return error(f"agent {self.name!r} no longer exists")
        try:
            return await HANDLERS[type(req)](self, req)
        except Refused as e:
            return error(str(e))

    async def whoami(self, req: w.Whoami) -> Reply:
        row = self.hive.require_agent(self.name)
        return ok(name=self.name, **({"parent": row.parent} if row.parent else {}))

    async def peers(self, req: w.Peers) -> Reply:
        return ok(peers=self.hive.peers(self.name))

    async def send(self, req: w.Send) -> Reply:
        self.hive.check_may_address(self.name, req.to)
        self.hive.take_rate(self.name)
        msg = await self.hive.send(self.name, req.to, req.body)
        return ok(id=msg.id)

    async def recv(self, req: w.Recv) -> Reply:
        msgs = await self.hive.recv(self.name, self.conn, req.wait, req.max)
        return ok(messages=[_msg(m) for m in msgs])

    async def ack(self, req: w.Ack) -> Reply:
        try:
            return ok(acked=self.hive.ack(self.name, req.ids))
        except LookupError as e:
            raise Refused(str(e)) from None

    async def ask(self, req: w.Ask) -> Reply:
        self.hive.check_may_address(self.name, req.to)
        self.hive.take_rate(self.name)
        return ok(id=self.hive.ask(self.name, req.to, req.question, req.options))

    async def answer(self, req: w.Answer) -> Reply:
        return ok(id=self.hive.answer(self.name, req.id, req.answer))

    async def request_approval(self, req: w.RequestApproval) -> Reply:
        self.hive.take_rate(self.name)
        approval = approvals.request(self.hive, self.name, req.kind, req.description, req.payload)
        return ok(id=approval.id, payload_sha256=approval.payload_sha256)

    async def set_status(self, req: w.SetStatus) -> Reply:
        at = self.hive.store.agents.set_status_text(self.name, req.text)
        self.hive.publish_status(self.name)
        return ok(status_set_at=at)

    async def remind(self, req: w.Remind) -> Reply:
        now = time.time()
        due = req.due_at(now)
        if due > now + w.MAX_REMIND_SECONDS:
            raise Refused("a reminder can be at most a year ahead")
        self.hive.take_rate(self.name)
        return ok(id=self.hive.remind(self.name, due, req.text), due_at=due)

    async def loose_ends(self, req: w.LooseEnds) -> Reply:
        store = self.hive.store
        return ok(
            questions=[model_fields_only(q) for q in store.questions.open(asker=self.name)],
            approvals=[model_fields_only(a) for a in store.approvals.list(status="pending", agent=self.name)],
            to_answer=[model_fields_only(q) for q in store.questions.open(target=self.name)],
        )


    # -- harness verbs (the turn loop) --------------------------------------------

    async def harness_config(self, req: wh.HarnessConfig) -> Reply:
        row = self.hive.require_agent(self.name)
        return ok(name=self.name, spec=self.hive.spec(self.name).model_dump(mode="json"),
                  paused=row.paused)

    async def turn_next(self, req: wh.TurnNext) -> Reply:
        msg = await self.hive.turn_next(self.name, self.conn, req.wait)
        return ok(message=_msg(msg)) if msg is not None else ok()

    async def turn_record(self, req: wh.TurnRecord) -> Reply:
        entries = self.hive.store.transcripts.add(
            self.name, req.turn, [(e.kind, _bounded(e.data)) for e in req.entries]
        )
        self.hive.transcript_wakeups.notify(self.name)
        if self.hive.bus.wants("transcript"):
            self.hive.bus.publish("transcript", {"agent": self.name, "entries": entries})
        return ok(recorded=len(entries))

    async def turn_done(self, req: wh.TurnDone) -> Reply:
        end = req.model_dump(exclude={"cmd", "turn"})
        try:
            entry = self.hive.store.transcripts.finish_turn(self.name, req.turn, end)
        except LookupError as e:
            raise Refused(str(e)) from None
        self.hive.ack_in_flight(self.name, req.turn)
        self.hive.transcript_wakeups.notify(self.name)
        if self.hive.bus.wants("transcript"):
            self.hive.bus.publish("transcript", {"agent": self.name, "entries": [entry]})
        return ok()

    async def harness_state(self, req: wh.HarnessState) -> Reply:
        self.hive.harness_state[self.name] = req.model_dump(exclude={"cmd"}, exclude_none=True)
        self.hive.publish_status(self.name)
        return ok()

    async def control(self, req: wh.Control) -> Reply:
        return ok(**await self.hive.control(self.name, req.wait))

    async def transcript_read(self, req: wh.TranscriptRead) -> Reply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + req.wait
        while True:
            entries = self.hive.store.transcripts.entries(self.name, req.after, req.limit)
            if entries or loop.time() >= deadline:
                return ok(entries=entries)
            await self.hive.transcript_wakeups.wait(self.name, deadline - loop.time())

    async def page_state(self, req: wh.PageState) -> Reply:
        from hyperhive.wire.egress import EgressPayload, RuleError

        row = self.hive.require_agent(self.name)
        status = self.hive.status_row(row, self.hive.store.reminders.pending())
        store = self.hive.store
        approvals = []
        for a in store.approvals.list(status="pending", agent=self.name):
            shown = model_fields_only(a)
            if a.kind == "egress":  # what approving adds, worked out by the hive (as the dashboard shows it)
                try:
                    shown["allows"] = EgressPayload.model_validate(a.payload).rule()
                except (ValidationError, RuleError):
                    pass
            approvals.append(shown)
        return ok(
            agent=model_fields_only(status),
            questions=[model_fields_only(q) for q in store.questions.open(asker=self.name, target="operator")],
            approvals=approvals,
            # This agent's own egress only: the listener is the identity, as for everything here.
            egress_rules=store.egress.rules(self.name).get(self.name, []),
            egress_log=store.egress.entries(self.name, req.egress_limit),
        )


def _bounded(data: Any) -> Any:
    """Transcript entries are data the agent produced: cap what one entry may hold."""
    if isinstance(data, str) and len(data) > wh.MAX_ENTRY_CHARS:
        return data[: wh.MAX_ENTRY_CHARS] + f"… [{len(data) - wh.MAX_ENTRY_CHARS} more characters dropped]"
    if not isinstance(data, str):
        text = json.dumps(data, ensure_ascii=False)
        if len(text) > wh.MAX_ENTRY_CHARS:
            return text[: wh.MAX_ENTRY_CHARS] + f"… [{len(text) - wh.MAX_ENTRY_CHARS} more characters dropped]"
    return data


HANDLERS: dict[type, Callable[[AgentSession, Any], Awaitable[Reply]]] = {
    wh.HarnessConfig: AgentSession.harness_config,
    wh.TurnNext: AgentSession.turn_next,
    wh.TurnRecord: AgentSession.turn_record,
    wh.TurnDone: AgentSession.turn_done,
    wh.HarnessState: AgentSession.harness_state,
    wh.Control: AgentSession.control,
    wh.TranscriptRead: AgentSession.transcript_read,
    wh.PageState: AgentSession.page_state,
    w.Whoami: AgentSession.whoami,
    w.Peers: AgentSession.peers,
    w.Send: AgentSession.send,
    w.Recv: AgentSession.recv,
    w.Ack: AgentSession.ack,
    w.Ask: AgentSession.ask,
    w.Answer: AgentSession.answer,
    w.RequestApproval: AgentSession.request_approval,
    w.SetStatus: AgentSession.set_status,
    w.Remind: AgentSession.remind,
    w.LooseEnds: AgentSession.loose_ends,
}
assert set(HANDLERS) == set(w.AGENT_MODELS) | set(wh.HARNESS_MODELS)


class AgentSockets:
    """Serves ``agents/<name>/agent.sock`` for every running agent.

    With cages, hive-priv creates each socket directory (ours, group = the
    agent's, setgid) and tells us the agent's uids; a connection from any other
    uid (root aside) is refused, and one from the harness uid marks the agent
    as running while it lasts."""

    def __init__(self, run_dir: RunDir, manage_dirs: bool = True) -> None:
        self.run_dir = run_dir
        self.manage_dirs = manage_dirs
        self.hive: Hive | None = None
        self.on_harness_change: Callable[[str], None] = lambda name: None
        self._servers: dict[str, asyncio.AbstractServer] = {}
        self._writers: dict[str, set[asyncio.StreamWriter]] = {}
        self._allowed: dict[str, frozenset[int]] = {}
        self._harness_uid: dict[str, int] = {}
        self._harness_conns: dict[str, int] = {}

    def set_uids(self, name: str, uid: int, harness_uid: int) -> None:
        self._allowed[name] = frozenset({0, uid, harness_uid})
        self._harness_uid[name] = harness_uid
        if self.hive is not None:
            self.hive.egress.set_uids(name, self._allowed[name])

    def serving(self, name: str) -> bool:
        return name in self._servers

    def harness_connected(self, name: str) -> bool:
        return self._harness_conns.get(name, 0) > 0

    async def start(self, name: str) -> None:
        if name in self._servers:
            return
        assert self.hive is not None
        hive = self.hive
        directory = self.run_dir.agent_dir(name)
        if self.manage_dirs:
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o755)
        path = self.run_dir.agent_sock(name)
        path.unlink(missing_ok=True)  # a stale socket from a crashed core
        writers: set[asyncio.StreamWriter] = set()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            cred = peer_cred(writer.get_extra_info("socket"))
            allowed = self._allowed.get(name)
            if allowed is not None and cred.uid not in allowed:
                log.warning("agent %s: refused uid %d (pid %d) on its socket", name, cred.uid, cred.pid)
                writer.write(dump_line(error(f"permission denied: uid {cred.uid} is not agent {name}")))
                writer.close()
                return
            is_harness = cred.uid == self._harness_uid.get(name)
            session = AgentSession(hive, name, is_harness)  # identity = this listener's name
            writers.add(writer)
            if is_harness:
                self._harness_conns[name] = self._harness_conns.get(name, 0) + 1
                self.on_harness_change(name)
            try:
                # A harness's long-polls end when it dies: it stops counting as running at once.
                await serve_lines(reader, writer, session.handle, watch_hangup=is_harness,
                                  max_per_peer=hive.config.limits.agent_connections)
            finally:
                writers.discard(writer)
                hive.release(name, session.conn)
                if is_harness:
                    self._harness_conns[name] -= 1
                    if name in self._servers:  # not once its socket is closed (stop, or the core stopping)
                        self.on_harness_change(name)

        # Group-writable only: with cages the directory's setgid group is the agent's.
        old_umask = os.umask(0o117 if not self.manage_dirs else 0o177)
        try:
            # A small backlog: asyncio accepts up to that many per loop turn, which bounds the
            # descriptors refused connections hold before they are closed (see budget).
            server = await asyncio.start_unix_server(on_connect, path, limit=STREAM_LIMIT,
                                                     backlog=AGENT_SOCK_BACKLOG)
        finally:
            os.umask(old_umask)
        self._servers[name] = server
        self._writers[name] = writers
        # Same directory, same mode: only the agent's own uids (and the gateway-less core) reach it.
        hive.egress.listen(name, self.run_dir.egress_sock(name), 0o117 if not self.manage_dirs else 0o177)
        log.info("agent %s: serving %s", name, path)

    async def stop(self, name: str) -> None:
        server = self._servers.pop(name, None)
        if server is None:
            return
        server.close()
        if self.hive is not None:
            self.hive.egress.close(name, self.run_dir.egress_sock(name))
        for writer in list(self._writers.pop(name, ())):
            writer.close()
        await server.wait_closed()
        self.run_dir.agent_sock(name).unlink(missing_ok=True)
        log.info("agent %s: socket closed", name)

    async def close_all(self) -> None:
        for name in list(self._servers):
            await self.stop(name)


class SocketsOnly(Lifecycle):
    """Agents without cages (``hive-core`` run on its own, e.g. to test the
    protocol): starting an agent serves its socket; running = served."""

    def __init__(self, sockets: AgentSockets) -> None:
        self.sockets = sockets

    async def start(self, name: str) -> None:
        await self.sockets.start(name)

    async def stop(self, name: str, graceful: bool) -> None:
        await self.sockets.stop(name)

    def running(self, name: str) -> bool:
        return self.sockets.serving(name)

"""``host.sock``: the operator's verbs, hyperhive host.sock v1 names and shapes.

Who may connect is decided by the kernel twice over: the socket file is
``0660 <core>:hive-admin``, and each connection's ``SO_PEERCRED`` must be root
or a member of ``hive-admin``."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from hyperhive.config import parse_listen
from hyperhive.core import approvals
from hyperhive.core.hive import Hive, Refused
from hyperhive.core.jsonlines import STREAM_LIMIT, Reply, serve_lines
from hyperhive.peercred import group_gid, peer_cred, peer_groups, uid_in_group
from hyperhive.names import OPERATOR
from hyperhive.wire import host as w
from hyperhive.wire.framing import describe_validation_error, dump_line, error, model_fields_only, ok

log = logging.getLogger("hive.core")
ADMIN_GROUP = "hive-admin"


class OperatorSession:
    def __init__(self, hive: Hive) -> None:
        self.hive = hive

    async def handle(self, obj: dict[str, Any]) -> Reply:
        try:
            req = w.host_request.validate_python(obj)
        except ValidationError as e:
            return error(describe_validation_error(e))
        try:
            return await HANDLERS[type(req)](self, req)
        except Refused as e:
            return error(str(e))

    async def list_(self, req: w.List_) -> Reply:
        return ok(agents=[r.name for r in self.hive.store.agents.all()])

    async def agent_status(self, req: w.AgentStatusReq) -> Reply:
        return ok(agent_statuses=self.hive.statuses())

    async def start(self, req: w.Start) -> Reply:
        return ok(started=await self.hive.run_all(self.hive.start, req.scope.agent_names))

    async def stop(self, req: w.Stop) -> Reply:
        async def stop_one(name: str) -> None:
            await self.hive.stop(name, req.graceful)

        return ok(stopped=await self.hive.run_all(stop_one, req.scope.agent_names))

    async def restart(self, req: w.Restart) -> Reply:
        await self.hive.stop(req.name, graceful=True)
        await self.hive.start(req.name)
        return ok()

    async def set_paused(self, req: w.SetPaused) -> Reply:
        self.hive.require_agent(req.name)
        self.hive.store.agents.set_flag(req.name, "paused", req.paused)
        self.hive.wakeups.notify(req.name)  # a harness waiting for its next turn looks again
        self.hive.publish_status(req.name)
        return ok(name=req.name, paused=req.paused)

    async def interrupt(self, req: w.Interrupt) -> Reply:
        self.hive.interrupt(req.name)
        return ok(name=req.name)

    async def transcript(self, req: w.Transcript) -> Reply:
        self.hive.require_agent(req.name)
        return ok(entries=self.hive.store.transcripts.entries(req.name, req.after, req.limit))

    async def pending(self, req: w.Pending) -> Reply:
        rows = self.hive.store.approvals.list(status="pending")
        return ok(approvals=[model_fields_only(a) for a in rows])

    async def approve(self, req: w.Approve) -> Reply:
        approval = await approvals.resolve(self.hive, req.id, "approved")
        return ok(approval=model_fields_only(approval))

    async def deny(self, req: w.Deny) -> Reply:
        approval = await approvals.resolve(self.hive, req.id, "denied", req.note)
        return ok(approval=model_fields_only(approval))

    async def questions(self, req: w.Questions) -> Reply:
        rows = self.hive.store.questions.open(target=OPERATOR)
        return ok(questions=[model_fields_only(q) for q in rows])

    async def answer_question(self, req: w.AnswerQuestion) -> Reply:
        try:
            question, msg = self.hive.store.questions.answer(req.id, OPERATOR, req.answer)
        except LookupError as e:
            raise Refused(str(e)) from None
        self.hive.delivered(msg)
        self.hive.bus.publish("answer", {"question": model_fields_only(question)})
        return ok(id=question.id)

    async def send(self, req: w.OperatorSend) -> Reply:
        self.hive.require_agent(req.to)
        msg = await self.hive.send(OPERATOR, req.to, req.body)
        return ok(id=msg.id)

    async def inbox(self, req: w.Inbox) -> Reply:
        msgs = self.hive.store.messages.inbox(OPERATOR, req.after, req.max)
        return ok(messages=[model_fields_only(m) for m in msgs])

    async def spawn(self, req: w.Spawn) -> Reply:
        await self.hive.create(req.name, req.spec, parent=None, origin="operator")
        return ok(name=req.name)

    async def destroy(self, req: w.Destroy) -> Reply:
        await self.hive.destroy(req.name)
        return ok(name=req.name)

    async def egress_rules(self, req: w.EgressRules) -> Reply:
        if req.name is not None:
            self.hive.require_agent(req.name)
        return ok(rules=self.hive.store.egress.rules(req.name))

    async def egress_allow(self, req: w.EgressAllow) -> Reply:
        added = self.hive.allow_egress(req.name, req.rule, "operator")
        return ok(name=req.name, rule=req.rule, added=added)

    async def egress_remove(self, req: w.EgressRemove) -> Reply:
        if not self.hive.remove_egress(req.name, req.rule):
            raise Refused(f"{req.name} has no egress rule {req.rule!r}")
        return ok(name=req.name, rule=req.rule)

    async def egress_log(self, req: w.EgressLog) -> Reply:
        if req.name is not None:
            self.hive.require_agent(req.name)
        return ok(entries=self.hive.store.egress.entries(req.name, req.limit))

    async def urls(self, req: w.Urls) -> Reply:
        listen = self.hive.config.hive.listen
        host, _ = parse_listen(listen)
        # forge and matrix: hyperhive v1 fields this hive has no service for; left out.
        return ok(urls={"domain": host, "home": f"http://{listen}/"})

    async def subscribe_agent_status(self, req: w.SubscribeAgentStatus) -> Reply:
        return self._stream(frozenset({"agent_status"}), snapshot=True)

    async def subscribe(self, req: w.Subscribe) -> Reply:
        return self._stream(frozenset(req.kinds), snapshot=False)

    async def _stream(self, kinds: frozenset[str], snapshot: bool) -> AsyncIterator[dict[str, Any]]:
        sub = self.hive.bus.subscribe(kinds)
        try:
            first: dict[str, Any] = {"subscribed": sorted(kinds)}
            if snapshot:
                first["agent_statuses"] = self.hive.statuses()
            yield ok(**first)
            while True:
                event = await sub.queue.get()
                if event is None:
                    yield error("subscriber fell too far behind; events dropped; resubscribe")
                    return
                yield ok(event=event)
        finally:
            self.hive.bus.unsubscribe(sub)


HANDLERS: dict[type, Callable[[OperatorSession, Any], Awaitable[Reply]]] = {
    w.List_: OperatorSession.list_,
    w.AgentStatusReq: OperatorSession.agent_status,
    w.Start: OperatorSession.start,
    w.Stop: OperatorSession.stop,
    w.Restart: OperatorSession.restart,
    w.SetPaused: OperatorSession.set_paused,
    w.Pending: OperatorSession.pending,
    w.Approve: OperatorSession.approve,
    w.Deny: OperatorSession.deny,
    w.Questions: OperatorSession.questions,
    w.AnswerQuestion: OperatorSession.answer_question,
    w.OperatorSend: OperatorSession.send,
    w.Inbox: OperatorSession.inbox,
    w.Spawn: OperatorSession.spawn,
    w.Destroy: OperatorSession.destroy,
    w.Urls: OperatorSession.urls,
    w.SubscribeAgentStatus: OperatorSession.subscribe_agent_status,
    w.Subscribe: OperatorSession.subscribe,
    w.Interrupt: OperatorSession.interrupt,
    w.Transcript: OperatorSession.transcript,
    w.EgressRules: OperatorSession.egress_rules,
    w.EgressAllow: OperatorSession.egress_allow,
    w.EgressRemove: OperatorSession.egress_remove,
    w.EgressLog: OperatorSession.egress_log,
}
assert set(HANDLERS) == set(w.HOST_MODELS)


def operator_allowed(uid: int, gid: int, groups: list[int] | None = None) -> bool:
    """Root, or in group hive-admin: as its primary group, among the supplementary
    groups the kernel reports for the peer, or per the group database."""
    if uid == 0:
        return True
    admin = group_gid(ADMIN_GROUP)
    if admin is None:
        return False
    return (groups is not None and admin in groups) or uid_in_group(uid, gid, admin)


async def serve_host_socket(hive: Hive, path: os.PathLike[str]) -> asyncio.AbstractServer:
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        cred = peer_cred(sock)
        if not operator_allowed(cred.uid, cred.gid, peer_groups(sock)):
            log.warning("host.sock: refused uid %d (pid %d): not root or %s", cred.uid, cred.pid, ADMIN_GROUP)
            writer.write(dump_line(error(f"permission denied: uid {cred.uid} is not root or in group {ADMIN_GROUP}")))
            try:
                await writer.drain()
            finally:
                writer.close()
            return
        await serve_lines(reader, writer, OperatorSession(hive).handle)

    if os.path.lexists(path):
        os.unlink(path)  # a stale socket from a crashed core
    old_umask = os.umask(0o117)
    try:
        server = await asyncio.start_unix_server(on_connect, path, limit=STREAM_LIMIT)
    finally:
        os.umask(old_umask)
    admin = group_gid(ADMIN_GROUP)
    if admin is not None:
        os.chown(path, -1, admin)
    os.chmod(path, 0o660)
    return server

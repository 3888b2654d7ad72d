"""``host.sock``: the operator's verbs, hyperhive host.sock v1 names and shapes.

Who may connect is decided by the kernel twice over: the socket file is
``0660 <core>:hive-admin``, and each connection's ``SO_PEERCRED`` must be root
or a member of ``hive-admin``."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from hyperhive.config import parse_listen
from hyperhive.core.actors import OPERATOR, Operator
from hyperhive.core.approvals import shown
from hyperhive.core.connlimit import ConnectionLimiter
from hyperhive.core.hive import Hive
from hyperhive.core.jsonlines import STREAM_LIMIT, Dispatcher, Reply, serve_lines
from hyperhive.core.listing import row_out, rows_out, rules_out
from hyperhive.core.refusals import BadRequest
from hyperhive.core.replies import more
from hyperhive.peercred import group_gid, peer_cred, peer_groups, uid_in_group
from hyperhive.unixsock import bind_listener
from hyperhive.wire import host as w
from hyperhive.wire.framing import dump_line, error, ok

log = logging.getLogger("hive.core")
ADMIN_GROUP = "hive-admin"


class OperatorSession:
    """One operator connection (host.sock) or web request: the hive and the actor."""

    def __init__(self, hive: Hive, actor: Operator = OPERATOR) -> None:
        self.hive = hive
        self.actor = actor

    async def handle(self, obj: dict[str, Any]) -> Reply:
        return await HOST.handle(self, obj)


Verb = Callable[[OperatorSession, Any], Awaitable[Reply]]


async def list_(s: OperatorSession, req: w.List_) -> Reply:
    return ok(agents=s.hive.list_agents(s.actor))


async def agent_status(s: OperatorSession, req: w.AgentStatusReq) -> Reply:
    # With [swarm]: the other hosts' agents beside this host's (docs/swarm.md).
    elsewhere = s.hive.swarm_listing(s.actor, "agents")
    return ok(
        agent_statuses=s.hive.statuses(),
        **({} if elsewhere is None else {"swarm_agents": elsewhere}),
    )


async def start(s: OperatorSession, req: w.Start) -> Reply:
    if (reply := await carried(s, req)) is not None:
        return reply
    names = req.scope.agent_targets()
    if names == []:  # only services this hive doesn't run (forge, matrix, ...)
        return ok(started=[])
    return ok(started=await s.hive.start_all(s.actor, names or [], req.created_at))


async def stop(s: OperatorSession, req: w.Stop) -> Reply:
    if (reply := await carried(s, req)) is not None:
        return reply
    names = req.scope.agent_targets()
    if names == []:
        return ok(stopped=[])
    return ok(stopped=await s.hive.stop_all(s.actor, names or [], req.graceful, req.created_at))


async def restart(s: OperatorSession, req: w.Restart) -> Reply:
    if (reply := await carried(s, req)) is not None:
        return reply
    await s.hive.restart(s.actor, req.name, req.created_at)
    return ok()


async def set_paused(s: OperatorSession, req: w.SetPaused) -> Reply:
    if (reply := await carried(s, req)) is not None:
        return reply
    s.hive.set_paused(s.actor, req.name, req.paused, req.created_at)
    return ok(name=req.name, paused=req.paused)


async def interrupt(s: OperatorSession, req: w.Interrupt) -> Reply:
    if (reply := await carried(s, req)) is not None:
        return reply
    s.hive.interrupt(s.actor, req.name, req.created_at)
    return ok(name=req.name)


async def transcript(s: OperatorSession, req: w.Transcript) -> Reply:
    page = s.hive.transcript(s.actor, req.name, req.after, req.limit)
    return ok(entries=page.items, **more(page))


# The verbs that take a ``host``: carried to that host of the swarm (swarm/signing.py's
# CARRIED: the roster's items, and steering another host's agents).
Carried = (
    w.Approve | w.Deny | w.AnswerQuestion | w.Spawn | w.RequestSpawn | w.OperatorSend
    | w.Start | w.Stop | w.Restart | w.SetPaused | w.Interrupt | w.Destroy
)  # fmt: skip


async def carried(s: OperatorSession, req: Carried) -> Reply | None:
    """A verb naming another host of the swarm: carried there (signed); None: act here."""
    if req.host is None:
        return None
    request = req.model_dump(mode="json", by_alias=True, exclude={"host"}, exclude_none=True)
    out = await s.hive.carry(s.actor, req.host, request)
    return None if out is None else ok(**out)


def swarm_rows(s: OperatorSession, kind: str, after: int) -> dict[str, Any]:
    """With [swarm], beside the first page of a listing: the other hosts' rows of it."""
    rows = s.hive.swarm_listing(s.actor, kind) if after == 0 else None
    return {} if rows is None else {f"swarm_{kind}": rows}


async def pending(s: OperatorSession, req: w.Pending) -> Reply:
    page = s.hive.pending_page(s.actor, req.after, req.limit)
    return ok(
        approvals=rows_out(page.items),
        total=page.total,
        more=page.more,
        **swarm_rows(s, "approvals", req.after),
    )


async def show_approval(s: OperatorSession, req: w.ShowApproval) -> Reply:
    if req.host is not None and (row := await s.hive.fetch_remote(
            s.actor, req.host, "approval", req.id)) is not None:  # fmt: skip
        return ok(approval=row)  # another host's, checked against its payload_sha256
    return ok(approval=shown(s.hive.approval(s.actor, req.id)))


async def show_question(s: OperatorSession, req: w.ShowQuestion) -> Reply:
    if req.host is not None and (row := await s.hive.fetch_remote(
            s.actor, req.host, "question", req.id)) is not None:  # fmt: skip
        return ok(question=row)
    return ok(question=row_out(s.hive.question(s.actor, req.id)))


async def show_message(s: OperatorSession, req: w.ShowMessage) -> Reply:
    return ok(message=row_out(s.hive.message(s.actor, req.id)))


async def approve(s: OperatorSession, req: w.Approve) -> Reply:
    if (reply := await carried(s, req)) is not None:
        return reply
    approval = await s.hive.resolve_approval(s.actor, req.id, "approved", sha256=req.payload_sha256)
    return ok(approval=row_out(approval))


async def deny(s: OperatorSession, req: w.Deny) -> Reply:
    if (reply := await carried(s, req)) is not None:
        return reply
    approval = await s.hive.resolve_approval(
        s.actor, req.id, "denied", req.note, sha256=req.payload_sha256
    )
    return ok(approval=row_out(approval))


async def questions(s: OperatorSession, req: w.Questions) -> Reply:
    page = s.hive.questions_for(s.actor, req.after, req.limit)
    return ok(
        questions=rows_out(page.items),
        total=page.total,
        more=page.more,
        **swarm_rows(s, "questions", req.after),
    )


async def answer_question(s: OperatorSession, req: w.AnswerQuestion) -> Reply:
    if (reply := await carried(s, req)) is not None:
        return reply
    return ok(id=s.hive.answer(s.actor, req.id, req.answer))


async def send(s: OperatorSession, req: w.OperatorSend) -> Reply:
    if (reply := await carried(s, req)) is not None:
        return reply  # with that host's message id
    return ok(id=await s.hive.send(s.actor, req.to, req.body))


async def inbox(s: OperatorSession, req: w.Inbox) -> Reply:
    page = s.hive.inbox(s.actor, req.after, req.max)
    return ok(messages=page.items, **more(page))


async def spawn(s: OperatorSession, req: w.Spawn) -> Reply:
    if (reply := await carried(s, req)) is not None:
        return reply
    await s.hive.spawn(s.actor, req.name, req.spec)
    return ok(name=req.name)


async def request_spawn(s: OperatorSession, req: w.RequestSpawn) -> Reply:
    if (reply := await carried(s, req)) is not None:
        return reply  # with that host's approval id and payload_sha256
    approval = s.hive.request_spawn(s.actor, req.name, req.spec, req.description)
    return ok(id=approval.id, payload_sha256=approval.payload_sha256)


async def set_parent(s: OperatorSession, req: w.SetParent) -> Reply:
    s.hive.set_parent(s.actor, req.name, req.parent)
    return ok(name=req.name, **({} if req.parent is None else {"parent": req.parent}))


async def set_resource_limits(s: OperatorSession, req: w.SetResourceLimits) -> Reply:
    if req.cpu_max is not None:
        raise BadRequest(
            "cpu_max: this hive's cages have no CPU limit (only memory_mib and pids_max);"
            " nothing was changed"
        )
    limits = {k: getattr(req, k) for k in ("memory_mib", "pids_max") if k in req.model_fields_set}
    spec = s.hive.set_resource_limits(s.actor, req.name, limits)
    now = {"memory_mib": spec.memory_mib, "pids_max": spec.pids_max}
    return ok(name=req.name, **{k: v for k, v in now.items() if v is not None})


async def destroy(s: OperatorSession, req: w.Destroy) -> Reply:
    if (reply := await carried(s, req)) is not None:
        return reply
    await s.hive.destroy(s.actor, req.name, req.created_at)
    return ok(name=req.name)


async def egress_rules(s: OperatorSession, req: w.EgressRules) -> Reply:
    return ok(rules=rules_out(s.hive.egress_rules(s.actor, req.name)))


async def egress_allow(s: OperatorSession, req: w.EgressAllow) -> Reply:
    added = s.hive.allow_egress(s.actor, req.name, req.rule)
    return ok(name=req.name, rule=req.rule, added=added)


async def egress_remove(s: OperatorSession, req: w.EgressRemove) -> Reply:
    s.hive.remove_egress(s.actor, req.name, req.rule)
    return ok(name=req.name, rule=req.rule)


async def secret_set(s: OperatorSession, req: w.SecretSet) -> Reply:
    return ok(name=req.name, new=s.hive.secret_set(s.actor, req.name, req.value))


async def secret_ls(s: OperatorSession, req: w.SecretLs) -> Reply:
    return ok(secrets=s.hive.secret_ls(s.actor))


async def secret_rm(s: OperatorSession, req: w.SecretRm) -> Reply:
    s.hive.secret_rm(s.actor, req.name)
    return ok(name=req.name)


async def secret_bind(s: OperatorSession, req: w.SecretBind) -> Reply:
    to = s.hive.secret_bind(s.actor, req.name, list(req.agents), req.to, req.header, req.env)
    return ok(name=req.name, agents=list(req.agents), to=to)


async def agent_env(s: OperatorSession, req: w.AgentEnv) -> Reply:
    return ok(name=req.name, env=s.hive.agent_env(s.actor, req.name))


async def secret_unbind(s: OperatorSession, req: w.SecretUnbind) -> Reply:
    return ok(name=req.name, removed=s.hive.secret_unbind(s.actor, req.name, list(req.agents)))


async def egress_log(s: OperatorSession, req: w.EgressLog) -> Reply:
    await s.hive.write_pending_egress()  # every decision made before this request, shown
    page = s.hive.egress_log(s.actor, req.name, req.limit, req.before)
    return ok(entries=page.items, **more(page))


async def urls(s: OperatorSession, req: w.Urls) -> Reply:
    section = s.hive.config.hive
    host, _ = parse_listen(section.listen)
    # forge and matrix: hyperhive's fields, for services this hive doesn't run; sent
    # when hive.toml names them, else left out (hyperhive's "not published").
    out = {"domain": host, "home": f"http://{section.listen}/"}
    if section.forge_url is not None:
        out["forge"] = section.forge_url
    if section.matrix_url is not None:
        out["matrix"] = section.matrix_url
    return ok(urls=out)


async def swarm_status(s: OperatorSession, req: w.SwarmStatus) -> Reply:
    return ok(swarm=s.hive.swarm_status(s.actor))


async def core_stats(s: OperatorSession, req: w.CoreStats) -> Reply:
    return ok(**s.hive.core_stats(s.actor))


async def subscribe_agent_status(s: OperatorSession, req: w.SubscribeAgentStatus) -> Reply:
    return _status_feed(s)


async def _status_feed(s: OperatorSession) -> AsyncIterator[dict[str, Any]]:
    """hyperhive's shape: a bare ack, then one ``agent_statuses: [row]`` line per change.
    A slow reader misses changes (the oldest are dropped) and stays connected; nothing
    it writes is read. A destroyed agent has no row: a reader's next poll drops it."""
    sub = s.hive.events(s.actor, frozenset({"agent_status"}), lossy=True)
    try:
        yield ok()
        while True:
            event = await sub.get()
            if event is not None and "agent" in event:
                yield ok(agent_statuses=[event["agent"]])
    finally:
        s.hive.bus.unsubscribe(sub)


async def subscribe(s: OperatorSession, req: w.Subscribe) -> Reply:
    return _stream(s, frozenset(req.kinds))


async def _stream(s: OperatorSession, kinds: frozenset[str]) -> AsyncIterator[dict[str, Any]]:
    sub = s.hive.events(s.actor, kinds)
    try:
        yield ok(subscribed=sorted(kinds))
        while True:
            event = await sub.get()
            if event is None:
                yield error("subscriber fell too far behind; events dropped; resubscribe")
                return
            yield ok(event=event)
    finally:
        s.hive.bus.unsubscribe(sub)


HOST_VERBS: dict[type, Verb] = {
    w.List_: list_,
    w.AgentStatusReq: agent_status,
    w.Start: start,
    w.Stop: stop,
    w.Restart: restart,
    w.SetPaused: set_paused,
    w.Pending: pending,
    w.Approve: approve,
    w.Deny: deny,
    w.Questions: questions,
    w.AnswerQuestion: answer_question,
    w.OperatorSend: send,
    w.Inbox: inbox,
    w.Spawn: spawn,
    w.RequestSpawn: request_spawn,
    w.SetParent: set_parent,
    w.SetResourceLimits: set_resource_limits,
    w.Destroy: destroy,
    w.Urls: urls,
    w.SwarmStatus: swarm_status,
    w.CoreStats: core_stats,
    w.SubscribeAgentStatus: subscribe_agent_status,
    w.Subscribe: subscribe,
    w.Interrupt: interrupt,
    w.Transcript: transcript,
    w.EgressRules: egress_rules,
    w.EgressAllow: egress_allow,
    w.EgressRemove: egress_remove,
    w.EgressLog: egress_log,
    w.SecretSet: secret_set,
    w.SecretLs: secret_ls,
    w.SecretRm: secret_rm,
    w.SecretBind: secret_bind,
    w.SecretUnbind: secret_unbind,
    w.AgentEnv: agent_env,
    w.ShowApproval: show_approval,
    w.ShowQuestion: show_question,
    w.ShowMessage: show_message,
}
HOST = Dispatcher[OperatorSession](w.host_request, HOST_VERBS, frozenset(w.HOST_MODELS))
__all__ = ["HOST", "OperatorSession", "serve_host_socket", "shown"]


def operator_allowed(uid: int, gid: int, groups: list[int] | None = None) -> bool:
    """Root, or in group hive-admin: as its primary group, among the supplementary
    groups the kernel reports for the peer, or per the group database."""
    if uid == 0:
        return True
    admin = group_gid(ADMIN_GROUP)
    if admin is None:
        return False
    return (groups is not None and admin in groups) or uid_in_group(uid, gid, admin)


async def serve_host_socket(
    hive: Hive, path: os.PathLike[str], handed: socket.socket | None = None
) -> asyncio.AbstractServer:
    """Serve host.sock: the listener ``hive up`` (or systemd) bound and ``handed`` us, or
    one of our own at ``path`` (a core run by hand: it needs the group hive-admin)."""
    limiter = ConnectionLimiter(os.fspath(path))

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        cred = peer_cred(sock)
        if not operator_allowed(cred.uid, cred.gid, peer_groups(sock)):
            log.warning(
                "host.sock: refused uid %d (pid %d): not root or %s",
                cred.uid,
                cred.pid,
                ADMIN_GROUP,
            )
            refusal = f"permission denied: uid {cred.uid} is not root or in group {ADMIN_GROUP}"
            writer.write(dump_line(error(refusal)))
            try:
                await writer.drain()
            finally:
                writer.close()
            return
        await serve_lines(reader, writer, OperatorSession(hive).handle, limiter)

    sock = handed or bind_listener(Path(path), group_gid(ADMIN_GROUP), 0o660)
    return await asyncio.start_unix_server(on_connect, sock=sock, limit=STREAM_LIMIT)

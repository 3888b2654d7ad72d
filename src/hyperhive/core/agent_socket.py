"""``agent.sock``: one listener per agent. The listener *is* the identity: each
connection's actor is ``Agent(<the listener's name>)``, and the request models have no
field that could name anyone else.

The verbs are a translation table: decode, call one ``Hive`` method with the actor,
encode the reply. The hive's rules live in ``core/hive.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hyperhive.core.actors import Agent
from hyperhive.core.agent_conn import AgentConnection, Started
from hyperhive.core.budget import AGENT_SOCK_BACKLOG
from hyperhive.core.connlimit import ConnectionLimiter, rest_listener
from hyperhive.core.hive import Hive, Lifecycle
from hyperhive.core.jsonlines import STREAM_LIMIT, Dispatcher, Reply, serve_lines
from hyperhive.core.lineconn import LineConnection
from hyperhive.core.ratelimit import BytePacer
from hyperhive.core.refusals import Conflict, Forbidden, Refused
from hyperhive.core.replies import more
from hyperhive.names import NAME_RE, OPERATOR, RESERVED
from hyperhive.paths import RunDir
from hyperhive.peercred import peer_cred
from hyperhive.unixsock import bind_listener
from hyperhive.wire import agent as w
from hyperhive.wire import harness as wh
from hyperhive.wire.common import TEXT_CHARS
from hyperhive.wire.framing import dump_line, error, ok
from hyperhive.wire.timestamps import rfc3339

log = logging.getLogger("hive.core")
_conn_ids = itertools.count(1)


# Sends a peer has written in a row are handled together: one group commit, one write of
# their replies (jsonlines._take_pipelined). Their effects and replies keep their order.
PIPELINED = frozenset({"send"})


class AgentSession:
    """One connection on one agent's socket: the hive, the actor, the connection id
    (messages a connection holds unacked go back to the inbox when it ends)."""

    def __init__(self, hive: Hive, actor: Agent) -> None:
        self.hive = hive
        self.actor = actor
        self.conn = next(_conn_ids)

    def start(self, obj: dict[str, Any]) -> dict[str, Any] | Awaitable[Reply]:
        """A pipelined request (a send) up to its write being queued: a refusal's line now,
        or what to await for its reply. No task per request: the connection's own task
        starts its pipelined sends in order, then awaits their replies in order."""
        if not _plain_send(obj):  # anything else (a refusal, as it happens) as always,
            return asyncio.ensure_future(self.handle(obj))  # started now: in its turn
        try:
            self.hive.require_self(self.actor)
            committed = self.hive.start_send(self.actor, obj["to"], obj["body"])
        except Refused as e:
            return error(str(e))
        return _sent(committed)

    def start_send(self, obj: dict[str, Any]) -> Started:
        """``start`` for agent_conn.py: a refusal's line now, or the future to wait on and
        whether it gives the message's id (a plain send: no coroutine around the commit's
        future) or the whole reply (anything else: a task)."""
        if not _plain_send(obj):
            return asyncio.ensure_future(self.handle(obj)), False
        try:
            self.hive.require_self(self.actor)
            committed = self.hive.start_send(self.actor, obj["to"], obj["body"])
        except Refused as e:
            return error(str(e))
        return committed, True

    @staticmethod
    def recv_args(obj: dict[str, Any]) -> tuple[float, int, list[int] | None] | None:
        """``plain_recv``, for agent_conn.py."""
        return plain_recv(obj)

    async def handle(self, obj: dict[str, Any]) -> Reply:
        cmd = obj.get("cmd")
        if cmd == "recv" and (plain := plain_recv(obj)) is not None:  # a receiver's round
            try:
                self.hive.require_self(self.actor)
                return await _recv(self, *plain)
            except Refused as e:
                return error(str(e))
        harness_verb = isinstance(cmd, str) and cmd in wh.HARNESS_VERBS  # any JSON: {"cmd": []}
        dispatcher = HARNESS if harness_verb else AGENT
        try:
            if harness_verb and not self.actor.harness:
                raise Forbidden(f"{cmd!r} is for the agent's harness only")
            req = dispatcher.decode(obj)
            self.hive.require_self(self.actor)
            return await dispatcher.call(self, req)
        except Refused as e:
            return error(str(e))


Verb = Callable[[AgentSession, Any], Awaitable[Reply]]

_SEND_KEYS = frozenset({"cmd", "to", "body"})


def _plain_send(obj: dict[str, Any]) -> bool:
    """A ``send`` that ``w.Send`` takes as it is: its three fields, two strings within
    bounds. Checked here without building the model (its cost was a visible part of a
    message's); whatever this does not pass goes through the model, which accepts or
    refuses it with its own words, so no refusal changes."""
    if obj.keys() != _SEND_KEYS or obj["cmd"] != "send":
        return False
    to, body = obj["to"], obj["body"]
    if type(to) is not str or type(body) is not str or len(body) > TEXT_CHARS:
        return False
    if to == OPERATOR:
        return True
    return NAME_RE.fullmatch(to) is not None and to not in RESERVED


_RECV_KEYS = frozenset({"cmd", "wait", "max", "ack"})
_RECV_WAIT = w.Recv.model_fields["wait"].default
_RECV_MAX = w.Recv.model_fields["max"].default


def plain_recv(obj: dict[str, Any]) -> tuple[float, int, list[int] | None] | None:
    """A ``recv`` that ``w.Recv`` takes as it is, as (wait, max, ack); None for anything
    else, which goes through the model and is accepted or refused in its words. The same
    bounds as the model's (tests/test_agent_socket_fastpath.py checks it against the model
    with hypothesis); JSON's true/false are bools, which the strict model refuses as
    numbers, hence ``type(...) is``, not isinstance."""
    if obj["cmd"] != "recv" or not _RECV_KEYS.issuperset(obj.keys()):
        return None
    wait, limit, ack = obj.get("wait", _RECV_WAIT), obj.get("max", _RECV_MAX), obj.get("ack")
    if type(wait) is int or type(wait) is float:
        if not 0 <= wait <= 3600:
            return None
    else:
        return None
    if type(limit) is not int or not 1 <= limit <= 1000:
        return None
    if ack is not None:
        if type(ack) is not list or len(ack) > 10_000:
            return None
        for i in ack:
            if type(i) is not int or i < 1:
                return None
    return float(wait), limit, ack


async def _sent(committed: Awaitable[int]) -> dict[str, Any]:
    try:
        return ok(id=await committed)
    except Refused as e:  # found on the way (another host's agent, not a peer, say)
        return error(str(e))


async def whoami(s: AgentSession, req: w.Whoami) -> Reply:
    parent = s.hive.whoami(s.actor)
    return ok(name=s.actor.name, **({"parent": parent} if parent else {}))


async def peers(s: AgentSession, req: w.Peers) -> Reply:
    return ok(peers=s.hive.peers(s.actor))


async def send(s: AgentSession, req: w.Send) -> Reply:
    return ok(id=await s.hive.send(s.actor, req.to, req.body))


async def recv(s: AgentSession, req: w.Recv) -> Reply:
    return await _recv(s, req.wait, req.max, req.ack)


async def _recv(s: AgentSession, wait: float, limit: int, ack_ids: list[int] | None) -> Reply:
    # ``ack``: the messages the last recv returned, acked (committed) before this one reads,
    # so a receiver's round is one request, not two. Refused: nothing acked, nothing read.
    acked = {} if ack_ids is None else {"acked": await s.hive.ack(s.actor, ack_ids)}
    page = await s.hive.recv(s.actor, s.conn, wait, limit)
    return ok(messages=page.items, **more(page), **acked)


async def ack(s: AgentSession, req: w.Ack) -> Reply:
    return ok(acked=await s.hive.ack(s.actor, req.ids))


async def ask(s: AgentSession, req: w.Ask) -> Reply:
    return ok(id=s.hive.ask(s.actor, req.to, req.question, req.options))


async def answer(s: AgentSession, req: w.Answer) -> Reply:
    return ok(id=s.hive.answer(s.actor, req.id, req.answer))


async def request_approval(s: AgentSession, req: w.RequestApproval) -> Reply:
    approval = s.hive.request_approval(s.actor, req.kind, req.description, req.payload)
    return ok(id=approval.id, payload_sha256=approval.payload_sha256)


async def set_status(s: AgentSession, req: w.SetStatus) -> Reply:
    return ok(status_set_at=rfc3339(s.hive.set_status(s.actor, req.text)))


async def remind(s: AgentSession, req: w.Remind) -> Reply:
    due = req.due_at(time.time())
    return ok(id=s.hive.remind(s.actor, due, req.text), due_at=rfc3339(due))


async def loose_ends(s: AgentSession, req: w.LooseEnds) -> Reply:
    return ok(
        **s.hive.loose_ends(s.actor, req.questions_after, req.approvals_after, req.to_answer_after)
    )


# -- harness verbs (the turn loop): only on a connection from the harness uid -------


async def harness_config(s: AgentSession, req: wh.HarnessConfig) -> Reply:
    return ok(**s.hive.harness_config(s.actor))


async def turn_next(s: AgentSession, req: wh.TurnNext) -> Reply:
    msg = await s.hive.turn_next(s.actor, s.conn, req.wait)
    return ok(message=msg) if msg is not None else ok()


async def turn_record(s: AgentSession, req: wh.TurnRecord) -> Reply:
    entries = [(e.kind, e.data) for e in req.entries]
    return ok(recorded=s.hive.turn_record(s.actor, req.turn, entries))


async def turn_done(s: AgentSession, req: wh.TurnDone) -> Reply:
    s.hive.turn_done(s.actor, req.turn, req.model_dump(exclude={"cmd", "turn"}))
    return ok()


async def harness_state(s: AgentSession, req: wh.HarnessState) -> Reply:
    s.hive.harness_report(s.actor, req.model_dump(exclude={"cmd"}, exclude_none=True))
    return ok()


async def control(s: AgentSession, req: wh.Control) -> Reply:
    return ok(**await s.hive.control(s.actor, req.wait))


async def transcript_read(s: AgentSession, req: wh.TranscriptRead) -> Reply:
    page = await s.hive.transcript_read(s.actor, req.after, req.limit, req.wait)
    return ok(entries=page.items, **more(page))


async def page_state(s: AgentSession, req: wh.PageState) -> Reply:
    return ok(**s.hive.page_state(s.actor, req.egress_limit))


AGENT_VERBS: dict[type, Verb] = {
    w.Whoami: whoami,
    w.Peers: peers,
    w.Send: send,
    w.Recv: recv,
    w.Ack: ack,
    w.Ask: ask,
    w.Answer: answer,
    w.RequestApproval: request_approval,
    w.SetStatus: set_status,
    w.Remind: remind,
    w.LooseEnds: loose_ends,
}
HARNESS_VERBS: dict[type, Verb] = {
    wh.HarnessConfig: harness_config,
    wh.TurnNext: turn_next,
    wh.TurnRecord: turn_record,
    wh.TurnDone: turn_done,
    wh.HarnessState: harness_state,
    wh.Control: control,
    wh.TranscriptRead: transcript_read,
    wh.PageState: page_state,
}
AGENT = Dispatcher[AgentSession](w.agent_request, AGENT_VERBS, frozenset(w.AGENT_MODELS))
HARNESS = Dispatcher[AgentSession](wh.harness_request, HARNESS_VERBS, frozenset(wh.HARNESS_MODELS))


class AgentSockets:
    """Serves ``agents/<name>/agent.sock`` for every running agent.

    With cages, hive-priv creates each socket directory (ours, group = the
    agent's, setgid) and tells us the agent's uids; a connection from any other
    uid (root aside) is refused, and one from the harness uid marks the agent
    as running while it lasts."""

    def __init__(
        self, run_dir: RunDir, connections_per_peer: int, manage_dirs: bool = True
    ) -> None:
        self.run_dir = run_dir
        self.connections_per_peer = connections_per_peer  # [limits] agent_connections
        self.manage_dirs = manage_dirs
        self._listeners: dict[str, socket.socket] = {}
        self._writers: dict[str, set[LineConnection]] = {}
        self._hives: dict[str, Hive] = {}
        self._allowed: dict[str, frozenset[int]] = {}
        self._harness_uid: dict[str, int] = {}
        self._harness_conns: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # held: the loop keeps weak references

    @property
    def socket_mode(self) -> int:
        # Group-writable with cages: the directory's setgid group is the agent's.
        return 0o660 if not self.manage_dirs else 0o600

    def set_uids(self, name: str, uid: int, harness_uid: int) -> None:
        self._allowed[name] = frozenset({0, uid, harness_uid})
        self._harness_uid[name] = harness_uid

    def serving(self, name: str) -> bool:
        return name in self._listeners

    def harness_connected(self, name: str) -> bool:
        return self._harness_conns.get(name, 0) > 0

    async def start(self, name: str, hive: Hive) -> None:
        """Serve ``hive`` to agent ``name`` on its own socket (and its egress socket)."""
        if name in self._listeners:
            return
        directory = self.run_dir.agent_dir(name)
        if self.manage_dirs:
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o755)
        path = self.run_dir.agent_sock(name)
        writers: set[LineConnection] = set()
        limiter = ConnectionLimiter(str(path), self.connections_per_peer)
        limits = hive.config.limits
        # One bucket for all the runtime's connections, one for the harness's: the runtime
        # (untrusted) filling its bucket held each of its harness's requests ~4 s behind
        # its debt (red team round 4).
        pacer = BytePacer(limits.input_bytes_per_second, limits.input_burst_bytes)
        harness_pacer = BytePacer(limits.input_bytes_per_second, limits.input_burst_bytes)
        loop = asyncio.get_running_loop()

        def on_accept() -> None:
            # One connection per call, refused here and now (a uid not the agent's, or over
            # its cap): a refused connection's descriptor is closed before the loop runs
            # anything else, so refusals hold none (see budget: no spare per agent).
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                return
            except OSError as e:  # EMFILE, say: the connection waits in the backlog
                rest_listener(loop, listener, resume, f"agent {name}", e)
                return
            cred = peer_cred(conn)
            allowed = self._allowed.get(name)
            if allowed is not None and cred.uid not in allowed:
                log.warning(
                    "agent %s: refused uid %d (pid %d) on its socket", name, cred.uid, cred.pid
                )
                _refuse(conn, f"permission denied: uid {cred.uid} is not agent {name}")
                return
            if not limiter.claim(cred.uid):
                _refuse(conn, limiter.refusal(cred.uid))
                return
            task = loop.create_task(serve(conn, cred.uid))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        def resume() -> None:
            if self._listeners.get(name) is listener:  # not stopped meanwhile
                loop.add_reader(listener.fileno(), on_accept)

        async def serve(conn: socket.socket, uid: int) -> None:
            try:
                if self._listeners.get(name) is not listener:  # stopped meanwhile
                    conn.close()
                    return
                is_harness = uid == self._harness_uid.get(name)
                session = AgentSession(hive, Agent(name, harness=is_harness))  # the listener's
                # Protocols of our own, not asyncio's streams: the runtime's connections are
                # served from callbacks (core/agent_conn.py), the harness's by serve_lines,
                # which watches for its hang-up during a long-poll (core/lineconn.py).
                factory: Callable[[], LineConnection]
                if is_harness:
                    factory = lambda: LineConnection(STREAM_LIMIT)  # noqa: E731
                else:
                    factory = lambda: AgentConnection(  # noqa: E731
                        STREAM_LIMIT, session, pacer.debt, PIPELINED, pacer.charge
                    )
                try:
                    _, line_conn = await loop.create_unix_connection(factory, sock=conn)
                except OSError:
                    conn.close()
                    return
                await on_connect(line_conn, session)
            finally:
                limiter.release(uid)

        async def on_connect(writer: LineConnection, session: AgentSession) -> None:
            is_harness = session.actor.harness
            writers.add(writer)
            if is_harness:
                self._harness_conns[name] = self._harness_conns.get(name, 0) + 1
                hive.harness_changed(name)
            try:
                if isinstance(writer, AgentConnection):
                    await writer.wait_closed()  # served from its own callbacks meanwhile
                else:
                    # A harness's long-polls end when it dies: it stops counting as running
                    # at once.
                    await serve_lines(
                        writer,  # the reader too
                        writer,
                        session.handle,
                        None,
                        True,
                        harness_pacer.debt,
                        PIPELINED,
                        session.start,
                    )
            finally:
                writers.discard(writer)
                hive.release(name, session.conn)
                if is_harness:
                    self._harness_conns[name] -= 1
                    if self._listeners.get(name) is listener:  # not once its socket is closed
                        hive.harness_changed(name)

        # A small backlog: connections beyond it wait in the connecting process (the kernel
        # holds what is queued; no descriptor of ours until accepted). A directory that
        # refuses it (full, or something left where the socket goes) refuses this agent
        # in one line, never the core (red team of session 17: a crash loop).
        try:
            listener = bind_listener(path, None, self.socket_mode, backlog=AGENT_SOCK_BACKLOG)
        except OSError as e:
            raise Conflict(f"agent {name}: could not serve its socket: {e}") from None
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), on_accept)
        self._listeners[name] = listener
        self._writers[name] = writers
        self._hives[name] = hive
        # Same directory, same mode: only the agent's own uids (and the gateway-less core).
        allowed = self._allowed.get(name)
        if allowed is not None:
            hive.egress.set_uids(name, allowed)
        try:
            hive.egress.listen(name, self.run_dir.egress_sock(name), self.socket_mode)
        except OSError as e:
            await self.stop(name)
            raise Conflict(f"agent {name}: could not serve its egress socket: {e}") from None
        log.info("agent %s: serving %s", name, path)

    async def stop(self, name: str) -> None:
        listener = self._listeners.pop(name, None)
        if listener is None:
            return
        asyncio.get_running_loop().remove_reader(listener.fileno())
        listener.close()
        hive = self._hives.pop(name, None)
        if hive is not None:
            hive.egress.close(name, self.run_dir.egress_sock(name))
        for writer in list(self._writers.pop(name, ())):
            writer.abort()  # a close would wait, for good, on a peer that reads nothing
        self.run_dir.agent_sock(name).unlink(missing_ok=True)
        log.info("agent %s: socket closed", name)

    async def close_all(self) -> None:
        for name in list(self._listeners):
            await self.stop(name)


def _refuse(conn: socket.socket, text: str) -> None:
    """One error line, if the peer's buffer takes it at once, and the connection closed."""
    try:
        conn.setblocking(False)
        conn.send(dump_line(error(text)))
    except OSError:
        pass
    conn.close()


class SocketsOnly(Lifecycle):
    """Agents without cages (``hive-core`` run on its own, e.g. to test the
    protocol): starting an agent serves its socket; running = served."""

    def __init__(self, sockets: AgentSockets) -> None:
        self.sockets = sockets

    async def start(self, name: str, hive: Hive) -> None:
        await self.sockets.start(name, hive)

    async def stop(self, name: str, graceful: bool) -> None:
        await self.sockets.stop(name)

    def running(self, name: str) -> bool:
        return self.sockets.serving(name)

"""An agent's connection on ``agent.sock`` (the runtime's, not the harness's): the
JSON-lines loop of ``jsonlines.serve_lines`` driven by the protocol's callbacks, not by a
task awaiting a reader.

A receiver's round (64 pairs in a closed loop: bench/run.py) was the connection task
woken to read a line, a coroutine per request, a task step when its ack committed and
another when its message came. Here the line is taken in ``data_received``, a plain
``send`` or ``recv`` is started there, and its reply is written from the callback of the
future it waits on (the group commit's, or the inbox's wake-up), with no task at all.
Any other request runs as a task (``AgentSession.handle``), one at a time, as before.

The rules are ``serve_lines``' (tests/test_agent_socket.py, tests/test_pacing.py and the
red team check them on this loop):

* One request at a time, in order: the next line is taken only once the reply to the
  last one is written, and not while the transport holds more than its high-water mark
  of unsent replies (``pause_writing``): the core holds one reply per connection.
* Sends the peer has pipelined (whole lines buffered already, up to ``PIPELINE_MAX``)
  are started together, in order, and their replies go out in order in one write.
* Every line is paced (``pace``: the agent's byte bucket) before it is decoded, a blank
  one too; a line owing time waits for it with nothing else taken meanwhile.
* A line longer than the limit: paced as ``MAX_LINE`` bytes, one error line, closed.
* Bad input (not JSON, not a request): one error line, and the connection goes on.
* The input buffer is bounded (lineconn.py: reading pauses past twice the limit).
* A hang-up ends what waits on it: a ``recv`` waiting for its inbox stops waiting (its
  ack, committed or not, stands; it reads nothing, so what the inbox holds is the next
  recv's) as soon as the peer has closed its socket (POLLHUP: closed whole, or both
  halves shut; a peer that only shut its writing half still gets the reply, and its wait
  ends when it closes the socket whole: ``_HangUps``), whatever it sent after the recv
  line. The lines it left are then taken as at any end of input, in order and paced (a
  last one without its newline too), their effects standing and their replies written
  to nobody (``_gone``), and the connection ends (a reset, the peer gone with replies
  unread, ends it at once: what was not taken yet is dropped, as on any connection). A
  send's write stands, a task is let finish, and only then are the messages this
  connection holds released (``wait_closed``).
"""

from __future__ import annotations

import asyncio
import logging
import select
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hyperhive.core.events import Deadline
from hyperhive.core.jsonlines import PACE_SLACK, PIPELINE_MAX, _decode, _is_pipelined, _stream
from hyperhive.core.lineconn import LineConnection
from hyperhive.core.ratelimit import ID_COST_BYTES, IDS_FREE, REPLY_FREE_BYTES, line_cost
from hyperhive.core.refusals import Refused
from hyperhive.core.replies import more
from hyperhive.core.store import StoreError
from hyperhive.wire.framing import MAX_LINE, WireError, dump_line, error, ok

if TYPE_CHECKING:
    from hyperhive.core.agent_socket import AgentSession

log = logging.getLogger("hive.core")

INTERNAL = "internal error; see the hive-core log"
# A started pipelined request: its reply line now, or a future and whether its result is
# a message id (the group commit's lane) rather than a whole reply (a task's).
Started = dict[str, Any] | tuple["asyncio.Future[Any]", bool]


class _HangUps:
    """The connections the loop no longer reads while a recv waits (the peer shut its
    writing half, or reading is paused on a full buffer: lines sent after the recv line),
    told when their peer closes the socket. The loop can't watch for that on the socket:
    a socket at the end of input is always readable (a reader on it would spin), and the
    transport stopped reading it at the end of input, or while its buffer is full; so the
    close itself was never seen, and the wait lasted to its end. One epoll of the loop's
    for all of them, no descriptor per connection (the agents' descriptor budget,
    core/budget.py), each socket registered for no event: epoll reports a hang-up
    (EPOLLHUP) whatever is asked; one-shot, so an entry whose socket closed before it was
    taken off (epoll keeps it while the socket is open anywhere) fires once, not on every
    turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll: select.epoll | None = None
        self._conns: dict[int, AgentConnection] = {}

    def watch(self, fd: int, conn: AgentConnection) -> None:
        if self._epoll is None:
            self._epoll = select.epoll()
            self._loop.add_reader(self._epoll.fileno(), self._ready)
        if fd in self._conns:
            self._epoll.modify(fd, select.EPOLLONESHOT)  # armed again
        else:
            self._epoll.register(fd, select.EPOLLONESHOT)
        self._conns[fd] = conn

    def unwatch(self, fd: int, conn: AgentConnection) -> None:
        if self._conns.get(fd) is not conn:
            return
        del self._conns[fd]
        assert self._epoll is not None
        try:
            self._epoll.unregister(fd)
        except OSError:  # closed already (epoll dropped it)
            pass
        if not self._conns:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None

    def _ready(self) -> None:
        if self._epoll is None:
            return
        for fd, _ in self._epoll.poll(0):
            conn = self._conns.get(fd)
            if conn is not None:
                self.unwatch(fd, conn)
                conn._peer_closed()  # it checks the socket itself: an old entry's is no hang-up


_HANG_UPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _HangUps] = (
    weakref.WeakKeyDictionary()
)


def _hang_ups(loop: asyncio.AbstractEventLoop) -> _HangUps:
    if (watcher := _HANG_UPS.get(loop)) is None:
        watcher = _HANG_UPS[loop] = _HangUps(loop)
    return watcher


def _failure(e: BaseException) -> dict[str, Any]:
    """A request's exception as its one-line reply (serve_lines' mapping)."""
    if isinstance(e, Refused | WireError | StoreError):
        return error(str(e))
    log.error("internal error handling a request", exc_info=e)
    return error(INTERNAL)


def _reply_of(fut: asyncio.Future[Any], is_id: bool) -> dict[str, Any]:
    """A finished pipelined request's reply line, whatever became of it."""
    if fut.cancelled():
        return error(INTERNAL)
    exc = fut.exception()
    if exc is not None:
        return _failure(exc)
    if is_id:
        return ok(id=fut.result())
    reply = fut.result()
    if not isinstance(reply, dict):  # a pipelined verb never streams
        log.error("a pipelined request got a stream; refused")
        return error(INTERNAL)
    return reply


class AgentConnection(LineConnection):
    """One agent connection, served from the protocol's callbacks (see the module)."""

    def __init__(
        self,
        limit: int,
        session: AgentSession,
        pace: Callable[[int], float],
        pipelined: frozenset[str],
        charge: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(limit)
        self.session = session  # the agent's: hive, actor, connection id
        self._pace = pace  # a line's cost: the seconds to wait before handling it
        self._charge = charge  # a large reply's bytes, taken from the same bucket
        self._pipelined = pipelined
        self._loop = asyncio.get_running_loop()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._busy = False  # a request is being handled: no line is taken meanwhile
        # _pump is on the stack: a request answered at once returns to its loop rather than
        # calling it again (no recursion a request, whatever the peer pipelines).
        self._pumping = False
        self._task: asyncio.Future[Any] | None = None  # a request handled by a task
        self._carried: dict[str, Any] | None = None  # decoded after a batch: handled next
        # A recv between its ack and its reply: its wait, limit, deadline and ack count.
        self._recv: tuple[float, int, float | None, int | None] | None = None
        self._watch: tuple[asyncio.Future[None], Deadline] | None = None
        # A batch of pipelined sends: what each was started as, and how many still wait.
        self._batch: list[Started] = []
        self._batch_left = 0
        self._batch_overflow = False
        self._batch_next: tuple[bytes, float] | None = None  # a line owing time, after it
        self._hup_fd: int | None = None  # watched for the peer's close (_HangUps)
        # The peer closed its socket while a recv waited: the lines it left are still
        # taken, their replies written to nobody.
        self._gone = False

    # -- asyncio.Protocol ----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._busy:
            self._pump()
        elif self._paused and self._watch is not None and self._hup_fd is None:
            self._watch_hang_up()  # a recv waits, and the loop stopped reading: a full buffer

    def eof_received(self) -> bool:
        super().eof_received()
        if self._watch is not None:
            self._peer_closed()
        elif not self._busy:
            self._pump()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._unwatch_hang_up()  # the socket is still open here (asyncio's and uvloop's)
        super().connection_lost(exc)
        if self._watch is not None:
            self._watch[0].cancel()  # a recv waiting for its inbox: nobody to reply to
        if not self._closed.done():
            self._closed.set_result(None)

    def resume_writing(self) -> None:
        super().resume_writing()
        if not self._busy:
            self._pump()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self._gone:  # gone: a reply to nobody
            transport.write(data)
        if len(data) > REPLY_FREE_BYTES and self._charge is not None:
            self._charge(len(data) - REPLY_FREE_BYTES)  # built for the agent all the same

    def _hung_up(self) -> bool:
        """Whether a recv about to wait (or waiting) for its inbox has nobody to reply to:
        the peer closed its socket (not only its writing half: a Unix socket's peer gone
        whole, or with both halves shut, shows as POLLHUP, a ``shutdown(SHUT_WR)`` only as
        the end of input, and a half-closed peer still reads the replies;
        test_agent_conn.py). Whatever it sent after the recv line: that used to keep the
        wait (session 11 asked for an empty buffer, the lines left being still to take),
        so a peer that wrote a byte more and closed held its wait to its end (red team
        round 18); the lines left are taken all the same (``_hang_up``).

        Such a wait used to last until its end (up to the recv's wait): it held the
        connection's descriptor and its claim on the agent's connection cap, and its
        wake-up was answered each time a message came for the agent: the read of the
        inbox, often the message taken, written to nobody and handed back only once the
        write failed. A runtime reconnecting after each closed loop paid for each such
        connection on every round (bench/warm.py, docs/performance.md). Its ack,
        committed or not, stands."""
        sock = self.get_extra_info("socket")
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return any(ev & select.POLLHUP for _, ev in poller.poll(0))

    def _peer_closed(self) -> None:
        """The input ended, or the peer's close was seen, while a recv waits: nobody to
        reply to if the peer closed whole; else (a half-close) its close is watched for."""
        if self._watch is None or self._lost:
            return
        if self._hung_up():
            self._hang_up()
        elif self._eof or self._paused:
            self._watch_hang_up()

    def _hang_up(self) -> None:
        """The peer is gone while a recv waits (or was about to): the wait ends with no
        reply and nothing read, and the loop goes on with the lines the peer left, as at
        any end of input (the transport reads what the kernel still holds if a full buffer
        had paused it): each taken in order and paced, its effects standing, its reply
        written to nobody; then the connection ends. Nothing is left waiting for a peer
        that can't read: a hostile agent's closed waits no longer hold its connections (and
        the core's descriptors) to the waits' end (red team round 18)."""
        self._gone = True
        self._recv = None
        self._unwatch_hang_up()
        watch, self._watch = self._watch, None
        if watch is not None:
            self.session.hive.wakeups.unwatch(self.session.actor.name, *watch)
            watch[0].cancel()  # _woken sees it is no longer the connection's watch
        self._busy = False
        self._pump()  # at once, or (called from it) when control returns to it

    def _watch_hang_up(self) -> None:
        sock = self.get_extra_info("socket")
        if sock is not None:
            self._hup_fd = sock.fileno()
            _hang_ups(self._loop).watch(self._hup_fd, self)

    def _unwatch_hang_up(self) -> None:
        if self._hup_fd is not None:
            _hang_ups(self._loop).unwatch(self._hup_fd, self)
            self._hup_fd = None

    async def wait_closed(self) -> None:
        """Until the connection is gone and the request a task was handling is done (the
        messages this connection holds can be released then, not before)."""
        await self._closed
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    # -- the loop ------------------------------------------------------------------

    def _pump(self) -> None:
        """Take and handle lines until one waits (a commit, an inbox, a task, pacing) or
        none is whole yet."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._busy and not self._lost:
                if self._write_paused:
                    return  # resume_writing goes on
                if self._carried is not None:
                    obj, self._carried = self._carried, None
                    self._request(obj)
                    continue
                line = self._next_line()
                if line is None:
                    return
                if (owed := self._pace(line_cost(line))) > PACE_SLACK:
                    self._busy = True
                    self._loop.call_later(owed, self._paced, line)
                    return
                self._line(line)
                if not self._busy and not self._lost and self._buffer.find(b"\n") >= 0:
                    # Answered at once, and the next request is here already: taking it
                    # now would not give the loop back, and a buffer of requests that
                    # change nothing held every other socket (red team cheap-verb-flood).
                    # One request a loop turn per connection, as in serve_lines.
                    self._busy = True
                    self._loop.call_soon(self._next_turn)
                    return
        finally:
            self._pumping = False

    def _next_line(self) -> bytes | None:
        """The next whole line (at the end of input, what is left of one); None when none
        is here yet, or the connection is over (an overflow, the end of input)."""
        try:
            line = self.take_line()
        except ValueError:
            self._overflow(0.0)
            return None
        if line is None:
            if self._paused:  # nothing whole to take, and the peer is held: let it send
                self._paused = False
                assert self.transport is not None
                self.transport.resume_reading()
            return None
        if not line:
            self._busy = True  # the end of input: nothing more to serve
            self.close()
        return line or None

    def _next_turn(self) -> None:
        self._busy = False
        if not self._lost:
            self._pump()

    def _paced(self, line: bytes) -> None:
        self._busy = False
        if self._lost:
            return
        self._line(line)
        self._pump()

    def _overflow(self, owed_before: float) -> None:
        """A line over the limit: dropped, paced as ``MAX_LINE`` bytes (what the core read
        of it), then one error line and the connection closed: no resync."""
        self._busy = True
        self._buffer.clear()
        self._scanned = 0
        owed = max(0.0, owed_before) + max(0.0, self._pace(MAX_LINE))
        self._loop.call_later(owed, self._close_with, f"line exceeds {MAX_LINE} bytes")

    def _close_with(self, text: str) -> None:
        if not self._lost:
            self.write(dump_line(error(f"{text}; closing connection")))
            self.close()

    def _line(self, line: bytes) -> None:
        raw = line.rstrip(b"\r\n")
        if not raw.strip():
            return
        try:
            obj = _decode(raw)
        except WireError as e:
            self.write(dump_line(error(str(e))))
            return
        self._request(obj)

    def _request(self, obj: dict[str, Any]) -> None:
        if _is_pipelined(obj, self._pipelined):
            self._sends(obj)
            return
        cmd = obj.get("cmd")
        if cmd == "recv" and (plain := self.session.recv_args(obj)) is not None:
            if plain[2] is not None and len(plain[2]) > IDS_FREE:
                self._charge_ids(plain[2])
            self._start_recv(*plain)
            return
        if cmd == "ack":
            self._charge_ids(obj.get("ids"))
        self._busy = True
        task = self._task = asyncio.ensure_future(self.session.handle(obj))
        task.add_done_callback(self._handled)

    def _charge_ids(self, ids: object) -> None:
        """An ack's ids past IDS_FREE, taken from the agent's bucket (ratelimit.py)."""
        if isinstance(ids, list) and len(ids) > IDS_FREE and self._charge is not None:
            self._charge(ID_COST_BYTES * len(ids))

    def _done(self, reply: dict[str, Any]) -> None:
        """A request that waited is answered: its reply written, the next line taken."""
        self._busy = False
        if self._lost:
            return
        self.write(dump_line(reply))
        self._pump()  # returns at once when called from within it

    # -- any request but the hot two: a task -----------------------------------------

    def _handled(self, task: asyncio.Future[Any]) -> None:
        if task.cancelled():  # the core is stopping: no reply (as serve_lines' task)
            self.close()
            return
        exc = task.exception()
        if exc is not None:
            self._done(_failure(exc))
            return
        reply = task.result()
        if isinstance(reply, dict):
            self._done(reply)
            return
        # A stream (ended at once if the peer is gone: _stream sees the end of input).
        self._task = asyncio.ensure_future(self._streaming(reply))

    async def _streaming(self, events: Any) -> None:
        """A stream's events until it ends or the peer hangs up; then the connection ends
        (as in serve_lines)."""
        try:
            await _stream(self, self, events)
        except ConnectionError:
            pass
        finally:
            self.close()

    # -- recv: ack (a group commit), look, wait for the inbox's wake-up ---------------

    def _start_recv(self, wait: float, limit: int, ack: list[int] | None) -> None:
        session = self.session
        try:
            session.hive.require_self(session.actor)
        except Refused as e:
            self.write(dump_line(error(str(e))))
            return
        self._busy = True
        self._recv = (wait, limit, None, None)
        if ack is None:
            self._look()
            return
        # The messages the last recv returned, acked (committed) before this one reads.
        session.hive.start_ack(session.actor, ack).add_done_callback(self._acked)

    def _acked(self, fut: asyncio.Future[int]) -> None:
        if self._lost:
            return  # the ack stands; nobody waits for the read
        exc = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        if exc is not None:  # refused: nothing acked, nothing read
            self._recv = None
            self._done(_failure(exc))
            return
        assert self._recv is not None
        wait, limit, _, _ = self._recv
        self._recv = (wait, limit, None, fut.result())
        self._look()

    def _look(self) -> None:
        assert self._recv is not None
        wait, limit, deadline, acked = self._recv
        now = self._loop.time()
        if deadline is None:  # the wait starts once the ack is committed (as Hive.recv)
            deadline = now + wait
            self._recv = (wait, limit, deadline, acked)
        if self._gone or ((self._eof or self._paused) and self._hung_up()):
            self._hang_up()  # nobody to reply to (it left while the ack committed, say)
            return
        session = self.session
        try:
            page = session.hive.recv_now(session.actor, session.conn, limit)
        except Exception as e:  # a store error reading the inbox, say
            self._recv = None
            self._done(_failure(e))
            return
        if page.items or now >= deadline:
            self._recv = None
            extra = more(page) if acked is None else {**more(page), "acked": acked}
            self._done(ok(messages=page.items, **extra))
            return
        watch = self._watch = session.hive.wakeups.watch(session.actor.name, deadline - now)
        watch[0].add_done_callback(self._woken)
        if self._eof or self._paused:  # the loop reads no more: its close ends the wait
            self._watch_hang_up()

    def _woken(self, fut: asyncio.Future[None]) -> None:
        watch = self._watch
        if watch is None or watch[0] is not fut:
            return  # ended already (_hang_up)
        self._watch = None
        self._unwatch_hang_up()
        self.session.hive.wakeups.unwatch(self.session.actor.name, *watch)
        if self._lost or self._recv is None:
            return
        self._look()

    # -- pipelined sends: started together, answered in one write ------------------

    def _sends(self, first: dict[str, Any]) -> None:
        """``first`` and the pipelined requests right after it that are buffered whole
        already (taking them never waits for the peer), started in order."""
        # find, not ``in``: a bytearray's ``in`` first tries its operand as an integer, and
        # raises and clears a formatted TypeError for a bytes one (~70 ns, twice a round).
        if self._buffer.find(b"\n") < 0:  # nothing pipelined after it (a closed loop's send)
            started = self._start_send(first)
            if isinstance(started, dict):
                self.write(dump_line(started))  # refused now: _pump goes on
                return
            if started[1]:  # a plain send: its id once committed, no batch to keep
                self._busy = True
                started[0].add_done_callback(self._sent_alone)
                return
            self._batch, self._batch_left, self._busy = [started], 1, True
            started[0].add_done_callback(self._sent)
            return
        objs: list[dict[str, Any] | WireError] = [first]
        buf = self._buffer
        while len(objs) < PIPELINE_MAX:
            i = buf.find(b"\n")
            if i < 0:
                break
            if i > self._limit:
                buf.clear()
                self._scanned = 0
                self._batch_overflow = True
                break
            line = bytes(buf[: i + 1])
            del buf[: i + 1]
            self._scanned = 0
            owed = self._pace(line_cost(line))
            if owed > PACE_SLACK:  # it waits its time after this batch, then is handled
                self._batch_next = (line, owed)
                break
            raw = line.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                obj = _decode(raw)
            except WireError as e:
                objs.append(e)
                continue
            if not _is_pipelined(obj, self._pipelined):
                self._carried = obj
                break
            objs.append(obj)
        self._maybe_resume()
        batch = self._batch = [self._start_send(o) for o in objs]
        waiting = [s for s in batch if not isinstance(s, dict)]
        self._batch_left = len(waiting)
        if not waiting:  # all answered now (refusals): written, and _pump goes on
            self._batch_done()
            return
        self._busy = True
        for fut, _ in waiting:
            fut.add_done_callback(self._sent)

    def _start_send(self, obj: dict[str, Any] | WireError) -> Started:
        if isinstance(obj, WireError):
            return error(str(obj))
        try:
            return self.session.start_send(obj)  # refused now, or queued
        except Exception as e:
            return _failure(e)

    def _sent_alone(self, fut: asyncio.Future[Any]) -> None:
        self._done(_reply_of(fut, True))

    def _sent(self, fut: asyncio.Future[Any]) -> None:
        self._batch_left -= 1
        if self._batch_left == 0:
            self._batch_done()

    def _batch_done(self) -> None:
        batch, self._batch = self._batch, []
        self._busy = False
        if self._lost:
            return  # the writes stand
        self.write(b"".join(dump_line(s if isinstance(s, dict) else _reply_of(*s)) for s in batch))
        if self._batch_overflow:
            self._batch_overflow = False
            self._carried = None
            self._overflow(0.0)
            return
        if self._batch_next is not None:
            line, owed = self._batch_next
            self._batch_next = None
            self._busy = True
            self._loop.call_later(owed, self._paced, line)
            return
        self._pump()

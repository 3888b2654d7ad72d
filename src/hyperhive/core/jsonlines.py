"""The JSON-lines connection loop and dispatch shared by every hive-core socket.

A socket module is a translation table: request model -> handler. ``Dispatcher``
decodes a request object into one of those models, calls the handler, and turns a
refusal into the one-line ``ok:false`` reply; ``serve_lines`` runs a connection,
line by line. A handler returns either a response dict or an async iterator of dicts
(a stream, which ends the connection when done). Whatever goes wrong with one request
becomes a one-line reply; the connection stays usable, except after an oversized line
(we can't resync).

Each listener passes its own ``ConnectionLimiter``: one peer uid (root aside) may hold
at most its cap of connections on it at once; one more gets a one-line refusal and is
closed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from hyperhive.core.connlimit import MAX_CONNECTIONS_PER_PEER, ConnectionLimiter
from hyperhive.core.lineconn import LineConnection
from hyperhive.core.refusals import BadRequest, Refused
from hyperhive.core.store import StoreError
from hyperhive.peercred import peer_cred
from hyperhive.wire.framing import (
    MAX_LINE,
    WireError,
    describe_validation_error,
    dump_line,
    error,
    parse_line,
)

log = logging.getLogger("hive.core")

Reply = dict[str, Any] | AsyncIterator[dict[str, Any]]
Handler = Callable[[dict[str, Any]], Awaitable[Reply]]
# Starts a pipelined request: its reply line now (a refusal), or what to await for it.
Starter = Callable[[dict[str, Any]], dict[str, Any] | Awaitable[Reply]]
S = TypeVar("S")  # what a handler serves: a connection's session
# A connection's two sides: asyncio's streams, or one LineConnection (agent.sock: both).
Reader = asyncio.StreamReader | LineConnection
Writer = asyncio.StreamWriter | LineConnection

STREAM_LIMIT = MAX_LINE  # asyncio's readline limit: bytes before the newline
# Seconds of pacing debt a peer may run up before reading its next line waits (the whole
# debt then). Past its burst, each line owes the pacer ~0.25 ms (2 KiB at 8 MiB/s): a
# timer for each cost the core ~40 µs, more than the request; one wait per ~10 ms of
# lines keeps the rate and costs a timer per ~40 lines (bench: the empty-ack flood).
PACE_SLACK = 0.01
__all__ = ["MAX_CONNECTIONS_PER_PEER", "STREAM_LIMIT", "Dispatcher", "Reply", "serve_lines"]


class Dispatcher(Generic[S]):
    """One socket's verbs: the request union it accepts and, per request model, its
    handler ``(session, request) -> reply``. Every model in the union has a row."""

    def __init__(
        self,
        adapter: TypeAdapter[Any],
        table: Mapping[type[BaseModel], Callable[[S, Any], Awaitable[Reply]]],
        models: frozenset[type[BaseModel]],
    ) -> None:
        missing = models - set(table)
        extra = set(table) - models
        if missing or extra:  # checked once, at import: a verb without a handler can't ship
            raise TypeError(f"dispatch table out of step: no row for {missing}, stray {extra}")
        self.adapter = adapter
        self.table = table

    def decode(self, obj: dict[str, Any]) -> BaseModel:
        try:
            req: BaseModel = self.adapter.validate_python(obj)
        except ValidationError as e:
            raise BadRequest(describe_validation_error(e)) from None
        return req

    async def call(self, session: S, req: BaseModel) -> Reply:
        """Run ``req``'s handler; a refusal propagates (HTTP maps it to its status)."""
        return await self.table[type(req)](session, req)

    async def handle(self, session: S, obj: dict[str, Any]) -> Reply:
        """For a JSON-lines socket: a refusal becomes the ``ok:false`` line."""
        try:
            return await self.call(session, self.decode(obj))
        except Refused as e:
            return error(str(e))


def _peer_uid(writer: Writer) -> int | None:
    """The peer's uid on a unix socket; None when there is nothing to count."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        return peer_cred(sock).uid
    except OSError:
        return None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _decode(raw: bytes) -> dict[str, Any]:
    """``parse_line``, and every string in the request must be Unicode text: a JSON
    ``\\ud800`` escape decodes to a lone surrogate, which no model field of type
    ``str`` takes but a free-form one (an approval's payload) would, and which
    can't be encoded, hashed or stored later (it was an internal error)."""
    obj = parse_line(raw)
    # A surrogate can only come from a \uD800-\uDFFF escape (UTF-8 has none): the walk is
    # for those lines alone (red team round 23a: any \u escape walked a 1 MiB line twice).
    if _SURROGATE_ESCAPE.search(raw) is None:
        return obj
    stack: list[Any] = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                bad = ord(item[e.start])
                raise WireError(
                    f"malformed request: a string holds a lone surrogate (\\u{bad:04x})"
                ) from None
    return obj


async def _wait(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


async def _write(writer: Writer, obj: dict[str, Any]) -> None:
    writer.write(dump_line(obj))
    if _unsent(writer):
        await writer.drain()


def _unsent(writer: Writer) -> int:
    """Bytes of the replies written that the transport still holds: ``writer.drain()`` is
    awaited only then. A reply the socket took whole (nearly every one: the transport
    writes at once) leaves nothing to wait for, and a peer gone is seen by the next read."""
    if isinstance(writer, LineConnection):
        return writer.pending_write_bytes()
    return writer.transport.get_write_buffer_size()


async def _drain(writer: Writer) -> None:
    if _unsent(writer):
        await writer.drain()


async def serve_lines(
    reader: Reader,
    writer: Writer,
    handle: Handler,
    limiter: ConnectionLimiter | None = None,
    watch_hangup: bool = False,
    pace: Callable[[int], float] | None = None,
    pipelined: frozenset[str] = frozenset(),
    start: Starter | None = None,
) -> None:
    """With ``watch_hangup``, a request still being handled (a long-poll) is cancelled as
    soon as the peer hangs up, so the connection ends then and not when the poll would.
    ``limiter``: this listener's bound on connections per peer uid. ``pace``: called with
    each line's size before it is decoded, the seconds to wait first (the peer's byte rate;
    a plain call, not a coroutine: it is 0 for nearly every line). ``pipelined``: verbs
    whose requests, when the peer has sent several in a row already, are handled together
    (see ``_take_pipelined``), each started by ``start`` (needed with ``pipelined``)."""
    uid = _peer_uid(writer) if limiter is not None else None
    if limiter is not None and uid is not None and not limiter.claim(uid):
        writer.write(dump_line(error(limiter.refusal(uid))))
        writer.close()
        return
    try:
        await _serve_lines(reader, writer, handle, watch_hangup, pace, pipelined, start)
    finally:
        if limiter is not None and uid is not None:
            limiter.release(uid)


async def _serve_lines(
    reader: Reader,
    writer: Writer,
    handle: Handler,
    watch_hangup: bool,
    pace: Callable[[int], float] | None,
    pipelined: frozenset[str] = frozenset(),
    start: Starter | None = None,
) -> None:
    ahead: asyncio.Future[bytes] | None = None  # the next line, read while handling a request
    # A request read (paced and decoded) ahead by _take_pipelined, not yet handled.
    carried: dict[str, Any] | None = None
    # The last request awaited what was not done yet (a pipelined send's commit): the
    # loop has turned since, and the next buffered line needs no turn of its own.
    waited = False
    try:
        while True:
            decoded, carried = carried, None
            try:
                if ahead is not None:
                    line, ahead = await ahead, None
                elif decoded is not None:
                    line = b"-"  # stands for the carried request: read and paced already
                else:
                    if not waited and _line_buffered(reader):
                        # The next request is here already, so reading it would not give
                        # the loop back: a request that changes nothing (an empty ack, a
                        # whoami) waits on nothing either, and one connection's buffer of
                        # them (~8,700 acks a 256 KiB read) held every other socket ~40 ms
                        # (red team cheap-verb-flood). One request a turn per connection.
                        await asyncio.sleep(0)
                    line = await reader.readline()
                waited = False
            except ValueError:
                if pace is not None:  # the core read (and dropped) that much of it
                    await _wait(pace(MAX_LINE))
                await _write(writer, error(f"line exceeds {MAX_LINE} bytes; closing connection"))
                return
            if not line:
                return
            # Every line is paced, a blank one too (read and scanned all the same: 1 MiB of
            # spaces unpaced let one agent push ~470 MiB/s through the loop; red team round 4).
            if pace is not None and decoded is None and (owed := pace(len(line))) > PACE_SLACK:
                await asyncio.sleep(owed)
            raw = line.rstrip(b"\r\n")
            if not raw.strip():
                continue
            if pipelined and start is not None and not watch_hangup:
                if decoded is None:
                    try:
                        decoded = _decode(raw)
                    except WireError as e:
                        await _write(writer, error(str(e)))
                        continue
                if _is_pipelined(decoded, pipelined):
                    objs, carried, overflow = await _take_pipelined(
                        reader, decoded, pace, pipelined
                    )
                    # All started in order (their writes queued in order), then their
                    # replies awaited in order: no task per request.
                    started = [_start(start, o) for o in objs]
                    # Awaiting one not done yet gives the loop back: a send waits for its
                    # group commit, which runs in a later callback.
                    waited = any(not isinstance(r, dict) for r in started)
                    replies = await _replies(started)
                    writer.write(b"".join(map(dump_line, replies)))  # one write for them all
                    await _drain(writer)
                    if overflow:
                        await _write(
                            writer,
                            error(f"line exceeds {MAX_LINE} bytes; closing connection"),
                        )
                        return
                    continue
            try:
                if watch_hangup:
                    ahead = asyncio.ensure_future(reader.readline())
                    reply = await _handle_watching(handle(_decode(raw)), ahead)
                    if reply is None:
                        return  # the peer hung up: nobody to reply to
                else:
                    reply = await handle(decoded if decoded is not None else _decode(raw))
            except (WireError, StoreError) as e:
                reply = error(str(e))
            except Exception:
                log.exception("internal error handling a request")
                reply = error("internal error; see the hive-core log")
            if isinstance(reply, dict):
                await _write(writer, reply)
                continue
            if ahead is not None:
                ahead.cancel()  # the stream watches the reader itself
            await _stream(reader, writer, reply)
            return
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        if ahead is not None:
            ahead.cancel()
        writer.close()


PIPELINE_MAX = 64  # requests of one connection handled together, at most


async def _take_pipelined(
    reader: Reader,
    first: dict[str, Any],
    pace: Callable[[int], float] | None,
    pipelined: frozenset[str],
) -> tuple[list[dict[str, Any] | WireError], dict[str, Any] | None, bool]:
    """``first`` and the pipelined requests right after it that the peer has sent already
    (whole lines in the reader's buffer: taking them never waits for the peer). Handled
    together, their handlers start in order, so a verb that queues its work in order (a
    send's group commit) keeps their order, and the replies go out in order in one write.
    Returns the requests (a malformed one as its WireError, answered in its place), a
    request read that is not one of them (handled next, as usual) and whether a line
    overflowed."""
    objs: list[dict[str, Any] | WireError] = [first]
    while len(objs) < PIPELINE_MAX:
        if not _line_buffered(reader):
            break
        try:
            line = await reader.readline()  # a whole line is buffered: returns at once
        except ValueError:
            if pace is not None:
                await _wait(pace(MAX_LINE))
            return objs, None, True
        if pace is not None and (owed := pace(len(line))) > PACE_SLACK:
            await asyncio.sleep(owed)
        raw = line.rstrip(b"\r\n")
        if not raw.strip():
            continue
        try:
            obj = _decode(raw)
        except WireError as e:
            objs.append(e)
            continue
        if not _is_pipelined(obj, pipelined):
            return objs, obj, False
        objs.append(obj)
    return objs, None, False


def _line_buffered(reader: Reader) -> bool:
    """Is the next line here already (its readline returns without waiting)?"""
    if isinstance(reader, LineConnection):
        return reader.has_line()
    # asyncio's buffer, read-only (if the attribute ever goes, requests are simply
    # handled one at a time again)
    return getattr(reader, "_buffer", b"").find(b"\n") >= 0


def _is_pipelined(obj: dict[str, Any], pipelined: frozenset[str]) -> bool:
    cmd = obj.get("cmd")
    return isinstance(cmd, str) and cmd in pipelined  # any JSON: {"cmd": []} is unhashable


def _start(start: Starter, obj: dict[str, Any] | WireError) -> dict[str, Any] | Awaitable[Reply]:
    """Start one pipelined request: its reply line now, or what to await (``_finish``)."""
    if isinstance(obj, WireError):
        return error(str(obj))
    try:
        return start(obj)
    except (WireError, StoreError) as e:
        return error(str(e))
    except Exception:
        log.exception("internal error handling a request")
        return error("internal error; see the hive-core log")


async def _replies(
    started: list[dict[str, Any] | Awaitable[Reply]],
) -> list[dict[str, Any]]:
    """The started requests' reply lines, in order. Cut short (the connection ends), the
    rest are closed unawaited: their writes are queued already and stand."""
    out: list[dict[str, Any]] = []
    try:
        for r in started:
            out.append(r if isinstance(r, dict) else await _finish(r))
    finally:
        for r in started[len(out) :]:
            if inspect.iscoroutine(r):
                r.close()
    return out


async def _finish(started: Awaitable[Any]) -> dict[str, Any]:
    """One started pipelined request's reply line, whatever happens to it."""
    try:
        reply = await started
    except (WireError, StoreError) as e:
        return error(str(e))
    except Exception:
        log.exception("internal error handling a request")
        return error("internal error; see the hive-core log")
    if not isinstance(reply, dict):  # a pipelined verb never streams
        log.error("a pipelined request got a stream; refused")
        return error("internal error; see the hive-core log")
    return reply


async def _handle_watching(request: Awaitable[Reply], ahead: asyncio.Future[bytes]) -> Reply | None:
    """Handle a request while ``ahead`` reads the next line; None if that read
    found the peer gone first (the request is cancelled)."""
    task: asyncio.Future[Reply] = asyncio.ensure_future(request)
    pending: set[asyncio.Future[Any]] = {task, ahead}
    try:
        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if (
        not task.done()
        and not ahead.cancelled()
        and ahead.exception() is None
        and ahead.result() == b""
    ):
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        return None
    return await task  # a pipelined request (or a read error) waits its turn


async def _stream(
    reader: Reader,
    writer: Writer,
    events: AsyncIterator[dict[str, Any]],
) -> None:
    """Forward a stream until it ends or the client hangs up."""

    async def client_gone() -> None:
        while await reader.read(65536):
            pass  # a subscriber has nothing more to say; ignore input

    watcher = asyncio.ensure_future(client_gone())
    try:
        while True:
            nxt = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                return
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            await _write(writer, item)
    finally:
        watcher.cancel()
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except RuntimeError:
                pass  # the generator was mid-await when cancelled; it is being torn down

"""The JSON-lines connection loop shared by every hive-core socket.

A handler gets one decoded request object and returns either a response dict
or an async iterator of dicts (a stream, which ends the connection when done).
Whatever goes wrong with one request becomes a one-line ``ok:false`` reply; the
connection stays usable, except after an oversized line (we can't resync).

Each peer uid (root aside) may hold at most ``MAX_CONNECTIONS_PER_PEER``
connections at once on one listening socket (agent.sock passes the hive's budgeted
``[limits] agent_connections`` instead); one more gets a one-line refusal and is closed. Without that bound an agent holding thousands of idle
connections to its own ``agent.sock`` used up the core's file descriptors (and,
with a partial line on each, its memory), and with them every other agent's and
the operator's connections.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from hyperhive.core.store import StoreError
from hyperhive.peercred import peer_cred
from hyperhive.wire.framing import MAX_LINE, WireError, dump_line, error, parse_line

log = logging.getLogger("hive.core")

Reply = dict[str, Any] | AsyncIterator[dict[str, Any]]
Handler = Callable[[dict[str, Any]], Awaitable[Reply]]

STREAM_LIMIT = MAX_LINE  # asyncio's readline limit: bytes before the newline
MAX_CONNECTIONS_PER_PEER = 32  # open at once, per listening socket and peer uid (root is not counted)
_REFUSAL_LOG_EVERY = 10.0  # seconds: at most one warning per socket and uid in this long

_open: dict[tuple[str, int], int] = {}  # (socket path, peer uid) -> connections open now
_last_refusal_log: dict[tuple[str, int], float] = {}


def _peer_key(writer: asyncio.StreamWriter) -> tuple[str, int] | None:
    """(listening socket path, peer uid) for a unix-socket peer other than root; None
    when there is nothing to count (root, or not a unix socket)."""
    sock = writer.get_extra_info("socket")
    path = writer.get_extra_info("sockname")
    if sock is None or sock.family != socket.AF_UNIX or not isinstance(path, str) or not path:
        return None
    try:
        uid = peer_cred(sock).uid
    except OSError:
        return None
    return None if uid == 0 else (path, uid)


def _claim(key: tuple[str, int] | None, cap: int) -> bool:
    if key is None:
        return True
    if _open.get(key, 0) >= cap:
        now = time.monotonic()
        if now - _last_refusal_log.get(key, -_REFUSAL_LOG_EVERY) >= _REFUSAL_LOG_EVERY:
            _last_refusal_log[key] = now
            log.warning("%s: refused connections from uid %d: it has %d open", key[0], key[1], cap)
        return False
    _open[key] = _open.get(key, 0) + 1
    return True


def _release(key: tuple[str, int] | None) -> None:
    if key is None:
        return
    left = _open.get(key, 0) - 1
    if left > 0:
        _open[key] = left
    else:
        _open.pop(key, None)


def _decode(raw: bytes) -> dict[str, Any]:
    """``parse_line``, and every string in the request must be Unicode text: a JSON
    ``\\ud800`` escape decodes to a lone surrogate, which no model field of type
    ``str`` takes but a free-form one (an approval's payload) would, and which
    can't be encoded, hashed or stored later (it was an internal error)."""
    obj = parse_line(raw)
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
                raise WireError(f"malformed request: a string holds a lone surrogate (\\u{bad:04x})") from None
    return obj


async def _write(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(dump_line(obj))
    await writer.drain()


async def serve_lines(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handle: Handler, watch_hangup: bool = False,
    max_per_peer: int = MAX_CONNECTIONS_PER_PEER,
) -> None:
    """With ``watch_hangup``, a request still being handled (a long-poll) is cancelled as
    soon as the peer hangs up, so the connection ends then and not when the poll would.
    ``max_per_peer``: connections one uid may hold open on this socket at once."""
    key = _peer_key(writer)
    if not _claim(key, max_per_peer):
        assert key is not None
        writer.write(dump_line(error(
            f"too many connections: uid {key[1]} may have at most {max_per_peer} open"
            " on this socket at once; closing connection")))
        writer.close()
        return
    try:
        await _serve_lines(reader, writer, handle, watch_hangup)
    finally:
        _release(key)


async def _serve_lines(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handle: Handler, watch_hangup: bool,
) -> None:
    ahead: asyncio.Future[bytes] | None = None  # the next line, read while handling a request
    try:
        while True:
            try:
                if ahead is not None:
                    line, ahead = await ahead, None
                else:
                    line = await reader.readline()
            except ValueError:
                await _write(writer, error(f"line exceeds {MAX_LINE} bytes; closing connection"))
                return
            if not line:
                return
            raw = line.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                if watch_hangup:
                    ahead = asyncio.ensure_future(reader.readline())
                    reply = await _handle_watching(handle(_decode(raw)), ahead)
                    if reply is None:
                        return  # the peer hung up: nobody to reply to
                else:
                    reply = await handle(_decode(raw))
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


async def _handle_watching(request: Awaitable[Reply], ahead: asyncio.Future[bytes]) -> Reply | None:
    """Handle a request while ``ahead`` reads the next line; None if that read
    found the peer gone first (the request is cancelled)."""
    task = asyncio.ensure_future(request)
    try:
        await asyncio.wait({task, ahead}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not task.done() and not ahead.cancelled() and ahead.exception() is None and ahead.result() == b"":
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        return None
    return await task  # a pipelined request (or a read error) waits its turn


async def _stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, events: AsyncIterator[dict[str, Any]]
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

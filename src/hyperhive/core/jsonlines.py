"""The JSON-lines connection loop shared by every hive-core socket.

A handler gets one decoded request object and returns either a response dict
or an async iterator of dicts (a stream, which ends the connection when done).
Whatever goes wrong with one request becomes a one-line ``ok:false`` reply; the
connection stays usable, except after an oversized line (we can't resync).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from hyperhive.core.store import StoreError
from hyperhive.wire.framing import MAX_LINE, WireError, dump_line, error, parse_line

log = logging.getLogger("hive.core")

Reply = dict[str, Any] | AsyncIterator[dict[str, Any]]
Handler = Callable[[dict[str, Any]], Awaitable[Reply]]

STREAM_LIMIT = MAX_LINE  # asyncio's readline limit: bytes before the newline


async def _write(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(dump_line(obj))
    await writer.drain()


async def serve_lines(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handle: Handler, watch_hangup: bool = False,
) -> None:
    """With ``watch_hangup``, a request still being handled (a long-poll) is cancelled as
    soon as the peer hangs up, so the connection ends then and not when the poll would."""
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
                    reply = await _handle_watching(handle(parse_line(raw)), ahead)
                    if reply is None:
                        return  # the peer hung up: nobody to reply to
                else:
                    reply = await handle(parse_line(raw))
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

"""One connection's pipelined requests can't hold the core's event loop (issue 17).

A request that waits on nothing (an ack that changes nothing, ``whoami``) gave the loop
back only when the next line was not read yet: a client that wrote thousands of them at
once had them all handled in one turn, every other socket waiting (~40 ms for a 256 KiB
read of empty acks). ``serve_lines`` now yields before a request that is already
buffered. On a real unix socket and event loop: a ticker task must run between
consecutive requests of one write.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

from hyperhive.core.jsonlines import Reply, serve_lines
from hyperhive.wire.framing import ok

REQUESTS = 2000


async def _serve_and_flood(path: Path) -> list[int]:
    ticks = 0
    seen: list[int] = []  # the ticker's count as each request is handled

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async def handle(obj: dict[str, Any]) -> Reply:
        seen.append(ticks)  # waits on nothing: gives the loop nothing back by itself
        return ok(n=obj["n"])

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_lines(reader, writer, handle)

    server = await asyncio.start_unix_server(on_connect, path=str(path))
    tick = asyncio.ensure_future(ticker())
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"".join(b'{"cmd":"whoami","n":%d}\n' % i for i in range(REQUESTS)))
        await writer.drain()
        replies = [await reader.readline() for _ in range(REQUESTS)]
        assert all(b'"ok":true' in r for r in replies)
        assert replies[-1].startswith(b'{"version":1,"ok":true,"n":%d' % (REQUESTS - 1))
        writer.close()
    finally:
        tick.cancel()
        server.close()
        await server.wait_closed()
    return seen


def test_one_connections_buffered_requests_are_handled_one_a_turn(tmp_path: Path) -> None:
    seen = asyncio.run(_serve_and_flood(tmp_path / "s.sock"))
    assert len(seen) == REQUESTS
    # Each request in a turn of its own: the ticker ran between any two of them.
    same_turn = sum(1 for a, b in itertools.pairwise(seen) if a == b)
    assert same_turn == 0, f"{same_turn} of {REQUESTS} requests handled in the turn of the one before"


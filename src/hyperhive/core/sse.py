"""Server-sent events, as the core's live pages and streams send them: the framing of
an event carrying HTML, the keep-alive comment sent after a quiet spell (so nginx and
the browser keep the stream open), and the response that carries them unbuffered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from hyperhive.core.events import Subscription

QUIET_SECONDS = 15.0  # a keep-alive after this long without an event
CONNECTED = b": connected\n\n"
KEEP_ALIVE = b": keep-alive\n\n"


def sse(event: str, html: str) -> bytes:
    """One server-sent event whose data is HTML: each line its own ``data:`` field (the
    browser joins them with newlines again). Agent text reaches the HTML only through
    ``visible``, which shows CR as an escape; a raw one, which SSE also takes as a line
    end, is sent as a character reference all the same."""
    lines = "".join(f"data: {line}\n" for line in html.replace("\r", "&#13;").split("\n"))
    return f"event: {event}\n{lines}\n".encode()


async def events_or_quiet(sub: Subscription) -> AsyncIterator[dict[str, Any] | None]:
    """Each event of ``sub`` as it comes, and None after each QUIET_SECONDS without one
    (the caller sends KEEP_ALIVE); it ends when ``sub`` is cut off for falling behind
    (the browser reconnects and reads the state afresh)."""
    while True:
        try:
            event = await asyncio.wait_for(sub.get(), QUIET_SECONDS)
        except TimeoutError:
            yield None
            continue
        if event is None:
            return
        yield event


def sse_response(events: AsyncIterator[bytes]) -> StreamingResponse:
    """The stream, never cached and never buffered by nginx."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )

"""An agent connection's transport side: an ``asyncio.Protocol`` that splits what the
peer sends into lines in a bounded buffer, for ``jsonlines.serve_lines``.

It replaces asyncio's StreamReader/StreamWriter pair on ``agent.sock`` (the message hot
path): same limits, less Python a request. ``readline`` returns a buffered line without
suspending (a StreamReader goes through ``readuntil`` and its waiter each line), the
reply is handed to the transport directly (uvloop's ``write`` is C and sends at once),
and the buffer is a ``bytearray`` searched once per line.

What StreamReader guaranteed and this keeps (``serve_lines`` relies on each):

* A line is at most ``limit`` bytes before its newline; a longer one raises ValueError
  from ``readline`` (the loop answers one error line and closes: no resync), and what
  was buffered of it is dropped.
* What the core holds of one connection's input is bounded: reading stops while more
  than ``2 * limit`` bytes are buffered and resumes once at most ``limit`` are.
* End of input: a last line without its newline is returned as it is, then ``b""``;
  the peer's half-close (``shutdown(SHUT_WR)``) keeps the connection open for replies.
* A connection lost with an error raises it from the read waiting on it (a
  ``ConnectionError``: the loop ends quietly); a write that waits (``drain``) while the
  peer is gone raises ConnectionResetError.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast


class LineConnection(asyncio.Protocol):
    """One connection: the reader (``readline``, ``read``) and the writer (``write``,
    ``drain``, ``close``) ``serve_lines`` uses. One reader at a time, as a StreamReader."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._scanned = 0  # bytes at the buffer's start known to hold no newline
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None  # a read waiting for data
        self._paused = False  # reading paused: the buffer is full
        self._write_paused = False  # the transport's buffer is above its high-water mark
        self._drain_waiter: asyncio.Future[None] | None = None
        self._lost = False
        self.transport: asyncio.Transport | None = None

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are stream ones.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._wake()
        if not self._paused and len(self._buffer) > 2 * self._limit:
            assert self.transport is not None
            try:
                self.transport.pause_reading()
            except NotImplementedError:  # pragma: no cover - every stream transport has it
                pass
            else:
                self._paused = True

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True  # half-closed: the replies still go out (as StreamReaderProtocol)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._eof = True
        if exc is not None:
            self._error = exc
        self._wake()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the reader ----------------------------------------------------------------

    def has_line(self) -> bool:
        """A whole line is buffered: ``readline`` returns it without waiting."""
        return self._buffer.find(b"\n", self._scanned) >= 0

    def take_line(self) -> bytes | None:
        """The next line with its newline, without waiting: at end of input what is left
        (no newline), then b""; None while no whole line is buffered. ValueError for a line
        longer than the limit (what is buffered of it is dropped). ``readline`` and the
        agent connection's callbacks (agent_conn.py) both take their lines here."""
        buf = self._buffer
        i = buf.find(b"\n", self._scanned)
        if i >= 0:
            if i > self._limit:
                self._overrun(i + 1)
            line = bytes(buf[: i + 1])
            del buf[: i + 1]
            self._scanned = 0
            self._maybe_resume()
            return line
        self._scanned = len(buf)
        if len(buf) > self._limit:
            self._overrun(len(buf))
        if not self._eof:
            return None
        line = bytes(buf)
        buf.clear()
        self._scanned = 0
        return line

    async def readline(self) -> bytes:
        """The next line with its newline; at end of input what is left (no newline),
        then b"". ValueError for a line longer than the limit (dropped)."""
        while (line := self.take_line()) is None:
            await self._wait()
        if not line and self._error is not None:
            raise self._error
        return line

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes, waiting for some; b"" at end of input."""
        while not self._buffer:
            if self._eof:
                if self._error is not None:
                    raise self._error
                return b""
            await self._wait()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        self._scanned = 0
        self._maybe_resume()
        return data

    def _overrun(self, drop: int) -> None:
        del self._buffer[:drop]
        self._scanned = 0
        self._maybe_resume()
        raise ValueError(f"a line exceeds {self._limit} bytes")

    async def _wait(self) -> None:
        if self._waiter is not None:
            raise RuntimeError("a read is already waiting on this connection")
        assert self.transport is not None
        if self._paused:  # nothing whole to take, and the peer is held: let it send more
            self._paused = False
            self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _maybe_resume(self) -> None:
        if self._paused and len(self._buffer) <= self._limit:
            self._paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    # -- the writer ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def pending_write_bytes(self) -> int:
        """What the transport holds unsent (0 when the socket took the reply whole)."""
        assert self.transport is not None
        return self.transport.get_write_buffer_size()

    async def drain(self) -> None:
        """Wait while the transport's buffer is above its high-water mark."""
        if self._lost:
            raise ConnectionResetError("connection lost")
        if not self._write_paused:
            return
        waiter = self._drain_waiter
        if waiter is None:
            waiter = self._drain_waiter = asyncio.get_running_loop().create_future()
        await waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Closed now, whatever is unsent (``close`` waits to flush it, for good if the
        peer never reads)."""
        if self.transport is not None:
            self.transport.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default if self.transport is None else self.transport.get_extra_info(name, default)

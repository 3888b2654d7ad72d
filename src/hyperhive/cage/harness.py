"""The harness: hive code inside the cage, under its own uid (not the runtime's),
so the agent's runtime can't modify, replace or signal it. It holds a
connection to the agent's socket (the agent counts as running while it does)
and runs the turn loop: one turn per inbox message, strictly one at a time,
the message acked only when its turn ended (a crash mid-turn redelivers it).
Standard library only, so it starts fast."""

from __future__ import annotations

import _socket
import os
import select
import sys
import threading
import time

from hyperhive.cage import layout, wirejson
from hyperhive.cage.initclient import InitChannel
from hyperhive.cage.runtimes import RUNTIMES, Runtime
from hyperhive.unixsock import read_stream, stdio_pair

# typing costs the cage ~2 ms of its cold start; annotations are never evaluated here.
# Nor json, socket, signal or selectors: their enums and json's regular expressions were
# ~7.7 ms of CPU of every harness start (cage/wirejson.py); the C modules do the work.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from typing import Any
else:
    import _signal

# Between attempts to (re)connect: from 50 ms, doubling, at most 0.5 s, each wait jittered
# (50 to 100 %) so a thousand harnesses whose core restarted don't all knock at once. A
# reconnect lands at most ~0.5 s after the core serves the agent's socket again.
MAX_BACKOFF = 0.5
STDIN_CHUNK = 65536  # bytes of the runtime's stdin a write: a pipe's default capacity
MAX_TURN_OUTPUT = 1024 * 1024  # bytes of stdout+stderr kept per turn; the rest is drained
# Output lines (entries) kept per turn: a whole turn (with its input, notes and exit) fits in
# one host `transcript` request (at most 5000 entries), and a flood of short lines can't push
# the agent's other turns out of the 20,000 entries it keeps.
MAX_TURN_LINES = 4000
MAX_ENTRY = 16 * 1024  # characters per transcript line entry
# What the core keeps of one entry (wire/harness.py's MAX_ENTRY_CHARS, not imported: pydantic
# is no part of the cage), and what one turn_record request carries at most, as JSON. The
# request is one line to a core that reads lines of 1 MiB at most (wire/framing.py), and
# JSON is up to 6 bytes a character (a control character: \\u0001) or 12 (outside the
# BMP: a surrogate pair): 64 lines of 16,000 \\x01 flushed together were a 6 MiB line, and
# a message of 250,000 emoji recorded as the turn's input a 3 MiB one. The core closed the
# connection, the turn was delivered again, and again: the agent (or any sender of a
# message to it) kept its turns from ever ending (red team round 13).
ENTRY_CHARS = 64 * 1024
RECORD_BYTES = 512 * 1024
# How deep an entry's data may nest and still go as it is: the core refuses a request
# nesting past 64 (wire/framing.py's MAX_DEPTH), and a turn_record's entry data sits 3
# below its top (the request, its entries, the entry). A runtime's JSON event (a model's
# tool call input, say) nested deeper was refused, the harness connected again and the
# turn was delivered again, and again (red team round 14): sent as its JSON text instead.
ENTRY_DEPTH = 48
FLUSH_EVERY = 0.25  # seconds between transcript writes during a turn
KILL_GRACE = 3.0
LOGIN_PROBE_WAIT = 10.0  # seconds a login probe may take; then it is killed
# An idle harness's long-polls (its next turn, the operator's interrupts) last this long at
# most, each cut to 50 to 100 % of it at random. Every poll that ends empty is a request the
# core serves and a wake-up of the harness for nothing: two per agent every 30 s were, with
# 1,000 agents, 67 requests a second; and harnesses that connected together (a core
# restart: all of them within a second) polled in step, so every 30 s the core and the cages
# had ~2,000 requests to serve at once, and a cold start that fell on one waited behind them
# (cold start p99). The jitter spreads a herd over half the period within a round or two.
# Nothing is lost by polling seldom: a message, a pause or an interrupt ends a poll at once,
# and a closed connection (the core restarting) ends it too.
LONG_POLL = 300.0


class Conn:
    """A JSON-lines connection to the agent's socket."""

    def __init__(self, path: str, fd: int | None = None) -> None:
        """Connected to ``path``, or the connection ``fd`` already is (init's fork connects
        before this module loads)."""
        if fd is not None:
            self.sock = _socket.socket(fileno=fd)
        else:
            self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
            except BaseException:
                self.sock.close()
                raise
        # What came after the last line read: the last chunk received and where its unread
        # part starts (an offset, not a copy of the rest a line: 64 KiB of short lines in
        # one recv cost ~0.1 s of copies; red team round 21).
        self._buf = b""
        self._pos = 0

    def readline(self) -> bytes:
        """The next line with its newline; at the end of the stream what is left (b"": the
        core closed the connection, or ``abort``)."""
        buf, pos = self._buf, self._pos
        end = buf.find(b"\n", pos)
        if end >= 0:
            self._pos = end + 1
            return buf[pos : end + 1]
        parts = [buf[pos:]] if pos < len(buf) else []
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                self._buf, self._pos = b"", 0
                return b"".join(parts)
            end = chunk.find(b"\n")
            if end >= 0:
                parts.append(chunk[: end + 1])
                self._buf, self._pos = chunk, end + 1
                return b"".join(parts)
            parts.append(chunk)

    def call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        self.sock.sendall(wirejson.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        line = self.readline()
        if not line:
            raise ConnectionError("the core closed the connection")
        reply = wirejson.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"{cmd}: {reply.get('error')}")
        return reply

    def close(self) -> None:
        self.sock.close()

    def abort(self) -> None:
        """End the connection from another thread: a call waiting on it returns at once."""
        try:
            self.sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass


def fit_entry(data: Any) -> Any:
    """``data`` cut to ENTRY_CHARS characters (its JSON text, for anything but a string),
    as the core would keep it (core/hive.py ``_bounded``), so one entry's request is never
    more than ~0.8 MiB however its characters escape; the marker fits within the bound,
    and the core keeps the entry as it is."""
    text = data if isinstance(data, str) else wirejson.dumps(data, ensure_ascii=False)
    if not isinstance(data, str):
        depth, numbers_fit = _shape(data)
        if depth > ENTRY_DEPTH:
            data = text = f"[nested deeper than {ENTRY_DEPTH}, kept as text] {text}"
        elif not numbers_fit:
            # NaN, ±Infinity (1e400 reads as one) or an integer past 64 bits: json reads
            # and writes them, the core's wire refuses them, and the refused turn_record
            # was the turn's again and again (red team round 26). Kept as text, marked.
            data = text = f"[numbers JSON has no room for, kept as text] {text}"
    try:
        text.encode()
    except UnicodeEncodeError:
        # A lone surrogate: a runtime's JSON line may spell one ("\\ud800"), and the core
        # refuses a request holding one; the entry, refused, would be its turn's again and
        # again (the harness connects again after a refusal). Kept as text, marked.
        data = text = text.encode(errors="replace").decode()
    if len(text) <= ENTRY_CHARS:
        return data
    keep = ENTRY_CHARS - 64
    return text[:keep] + f"… [{len(text) - keep} more characters dropped]"


def _shape(value: Any) -> tuple[int, bool]:
    """How many containers deep ``value`` nests, and whether every number in it is one the
    core's wire takes (a finite float, an integer from -2**63 to 2**63 - 1); level by
    level, no recursion."""
    level = [value] if isinstance(value, dict | list) else []
    fits = _number_fits(value)
    n = 0
    while level:
        n += 1
        below: list[Any] = []
        for item in level:
            for c in item.values() if isinstance(item, dict) else item:
                if isinstance(c, dict | list):
                    below.append(c)
                elif fits and not _number_fits(c):
                    fits = False
        level = below
    return n, fits


def _number_fits(value: Any) -> bool:
    if isinstance(value, float):
        return value - value == 0.0  # finite (NaN and ±inf give NaN); math not loaded for it
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**63) <= value < 2**63  # the core's wire: a signed 64-bit integer
    return True


def long_poll_wait() -> float:
    """A long-poll's wait: LONG_POLL, cut to 50 to 100 % of it at random."""
    return round(LONG_POLL * (0.5 + int.from_bytes(os.urandom(2), "big") / 131070), 3)


def _pause(backoff: float) -> float:
    """Sleep about ``backoff`` seconds (jittered); return the next backoff."""
    time.sleep(backoff * (0.5 + os.urandom(1)[0] / 510))
    return min(backoff * 2, MAX_BACKOFF)


def log(text: str) -> None:
    print(f"harness: {text}", file=sys.stderr, flush=True)


class Turn:
    """One run of the runtime for one message, bounded in time and output."""

    def __init__(
        self,
        conn: Conn,
        init: InitChannel,
        runtime: Runtime,
        message: dict[str, Any],
        interrupt: threading.Event,
        timeout: float,
    ) -> None:
        self.conn, self.init, self.runtime, self.message = conn, init, runtime, message
        self.interrupt, self.timeout = interrupt, timeout
        self.pending: list[dict[str, Any]] = []
        self.kept = 0
        self.lines = 0
        self.dropped = 0
        self.full = False  # over a bound: everything after is drained, not kept

    def record(self, kind: str, data: Any) -> None:
        self.pending.append({"kind": kind, "data": fit_entry(data)})

    def flush(self) -> None:
        """The pending entries, in requests of at most 200 entries and RECORD_BYTES (one
        entry alone may be more: at most ENTRY_CHARS characters, under 1 MiB as JSON)."""
        while self.pending:
            size = count = 0
            for entry in self.pending[:200]:
                size += len(wirejson.dumps(entry)) + 2
                if count and size > RECORD_BYTES:
                    break
                count += 1
            batch, self.pending = self.pending[:count], self.pending[count:]
            self.conn.call("turn_record", turn=self.message["id"], entries=batch)

    def line(self, stream: str, raw: bytes, size: int) -> None:
        """One line of output; ``size`` counts its newline, if it had one."""
        if self.full or self.kept + size > MAX_TURN_OUTPUT or self.lines >= MAX_TURN_LINES:
            self.full = True
            self.dropped += size
            return
        self.kept += size
        self.lines += 1
        text = raw.decode(errors="replace").rstrip("\n")
        if len(text) > MAX_ENTRY:
            text = text[:MAX_ENTRY] + f"… [{len(text) - MAX_ENTRY} more characters dropped]"
        if stream == "stdout":
            try:
                kind, data = self.runtime.stdout_entry(text)
                self.record(kind, data)
            except Exception:
                # The runtime's line is its own to shape: nothing in it may end the turn.
                # Out of the turn, an exception ended the harness (serve_forever catches
                # the connection's errors only: red team round 26) or was a refused
                # request to it (an event the decoder read but the encoder, a frame
                # deeper, can't write: round 21), the turn delivered again for good.
                # A plain line, as a line too deep to decode is.
                self.record("stdout", text)
        else:
            self.record("stderr", text)

    def run(self) -> None:
        started = time.monotonic()
        self.record("input", self.message)
        # Socket pairs, not pipes: a runtime holding a pipe's other end (its own, or one
        # it handed on) could hold the pipe's lock from a splice, and this loop's next
        # read, write or close of it would sleep uninterruptibly, time-out and interrupt
        # with it (red team of session 31). Ours never block.
        in_w, in_r = stdio_pair(ours_reads=False)
        out_r, out_w = stdio_pair(ours_reads=True)
        err_r, err_w = stdio_pair(ours_reads=True)
        try:
            pid = self.init.spawn(
                self.runtime.argv(self.message),
                self.runtime.env(self.message),
                [in_r, out_w, err_w],
            )
        except RuntimeError as e:
            for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            self.record("note", f"could not start the runtime: {e}")
            self.flush()
            self.conn.call(
                "turn_done",
                turn=self.message["id"],
                exit_status=None,
                duration_ms=(time.monotonic() - started) * 1000,
            )
            return
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        interrupted = timed_out = False
        poll = select.poll()
        bufs = {out_r: b"", err_r: b""}
        names = {out_r: "stdout", err_r: "stderr"}
        for fd in bufs:
            poll.register(fd, select.POLLIN)
        # The runtime's stdin, written as it reads it, in this loop: never a thread that
        # blocks (a runtime that never reads, while a process it left holds the pipe, kept
        # one thread and descriptor of the harness's for good, a turn at a time).
        stdin = memoryview(self.runtime.stdin(self.message))
        feeding = in_w
        poll.register(in_w, select.POLLOUT)
        deadline = started + self.timeout
        last_flush = time.monotonic()
        killed_at: float | None = None  # SIGTERM sent
        sigkill_at: float | None = None
        code: int | None = None
        exited = False
        try:
            # Until the runtime has exited, not just closed its output: a runtime that closes
            # stdout and keeps running is still bound by the time-out and interrupts.
            while bufs or not exited:
                if not bufs:  # (no waiting here while stdin is still being written)
                    code = self.init.wait(pid, timeout=0.1 if feeding < 0 else 0)
                    exited = code is not None
                for fd, _ in poll.poll(100) if bufs or feeding >= 0 else ():  # ms
                    if fd == feeding:
                        try:
                            stdin = stdin[os.write(fd, stdin[:STDIN_CHUNK]) :]
                        except BlockingIOError:
                            continue
                        except OSError:  # EPIPE: no reader left
                            stdin = stdin[:0]
                        if not stdin:
                            poll.unregister(fd)
                            os.close(fd)
                            feeding = -1
                        continue
                    try:
                        chunk = read_stream(fd, 65536)
                    except BlockingIOError:  # POLLHUP or POLLERR with nothing to read yet
                        continue
                    except OSError:  # a socket's error (ECONNRESET): its end, as EOF is
                        chunk = b""
                    if not chunk:
                        if bufs[fd]:
                            self.line(names[fd], bufs[fd], len(bufs[fd]))
                        poll.unregister(fd)
                        os.close(fd)
                        del bufs[fd]
                        continue
                    # Drain without splitting lines: a flood costs no more than reading it.
                    if self.full:
                        self.dropped += len(bufs[fd]) + len(chunk)
                        bufs[fd] = b""
                        continue
                    data = bufs[fd] + chunk
                    *lines, rest = data.split(b"\n")
                    for ln in lines:
                        self.line(names[fd], ln, len(ln) + 1)
                    if len(rest) > MAX_ENTRY * 4:  # a line with no end: cut it
                        self.line(names[fd], rest, len(rest))
                        rest = b""
                    bufs[fd] = rest
                if exited and not bufs:
                    break
                now = time.monotonic()
                if killed_at is None and (self.interrupt.is_set() or now > deadline):
                    interrupted, timed_out = self.interrupt.is_set(), not self.interrupt.is_set()
                    self.record(
                        "note",
                        "interrupted by the operator"
                        if interrupted
                        else f"turn timed out after {self.timeout:.0f} s",
                    )
                    self.init.kill(pid, _signal.SIGTERM)
                    killed_at = now
                elif killed_at is not None and sigkill_at is None and now - killed_at > KILL_GRACE:
                    self.init.kill(pid, _signal.SIGKILL)
                    sigkill_at = now
                elif sigkill_at is not None and now - sigkill_at > KILL_GRACE + 5:
                    self.record("note", "the runtime's processes did not end after SIGKILL")
                    break
                if now - last_flush > FLUSH_EVERY:
                    self.flush()
                    last_flush = now
        finally:
            if not exited:
                # The core went away mid-turn (the message will be redelivered) or the runtime
                # would not die: never leave it running into a retry or the next turn.
                self.init.kill(pid, _signal.SIGKILL)
                code = self.init.wait(pid, timeout=KILL_GRACE + 5 if sigkill_at is None else 1.0)
            for fd in bufs:
                os.close(fd)
            if feeding >= 0:
                os.close(feeding)
        if self.dropped:
            self.record(
                "note",
                f"output over {MAX_TURN_OUTPUT} bytes or {MAX_TURN_LINES} lines: "
                f"{self.dropped} bytes dropped",
            )
        self.flush()
        self.conn.call(
            "turn_done",
            turn=self.message["id"],
            exit_status=code,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            interrupted=interrupted,
            timed_out=timed_out,
        )


class ControlPoll:
    """The operator's interrupts arrive on a second connection (long-poll), served by a
    thread of its own until ``end``: which cuts its connection at once, so a poll of up to
    LONG_POLL seconds never outlives the turn connection it belongs to (it would hold one
    of the harness uid's few connections to the core meanwhile)."""

    def __init__(self, path: str, interrupt: threading.Event) -> None:
        self.path, self.interrupt = path, interrupt
        self.stop = threading.Event()
        self.conn: Conn | None = None
        self.lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self.run, name="control", daemon=True).start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                conn = Conn(self.path)
                with self.lock:
                    self.conn = conn
                    if self.stop.is_set():  # ended while connecting
                        conn.abort()
                while not self.stop.is_set():
                    if conn.call("control", wait=long_poll_wait()).get("interrupt"):
                        self.interrupt.set()
            except (OSError, ValueError, RuntimeError, ConnectionError):
                time.sleep(0.2)

    def end(self) -> None:
        with self.lock:
            self.stop.set()
            if self.conn is not None:
                self.conn.abort()


def report_state(conn: Conn, init: InitChannel, runtime: Runtime) -> None:
    probe = runtime.login_probe()
    if probe is not None:
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            pid = init.spawn(probe, runtime.env({"id": 0}), [devnull, devnull, devnull])
        finally:
            os.close(devnull)
        code = init.wait(pid, timeout=LOGIN_PROBE_WAIT)
        if code is None:
            # Hung, or stopped: a runtime process left running by a turn can SIGSTOP it.
            # Not logged in, and not left behind in the cage for good.
            init.kill(pid, _signal.SIGKILL)
            init.wait(pid, timeout=KILL_GRACE)
        runtime.needs_login = code != 0
    state: dict[str, Any] = {"needs_login": runtime.needs_login}
    if runtime.active_model:
        state["active_model"] = runtime.active_model
    conn.call("harness_state", **state)


def serve(path: str, init: InitChannel, conn: Conn | None = None) -> None:
    conn = conn or Conn(path)
    control: ControlPoll | None = None
    try:
        config = conn.call("harness_config")
        spec = config["spec"]
        runtime = RUNTIMES[spec["runtime"]](config["name"], spec)
        runtime.extra_env = {str(k): str(v) for k, v in (config.get("env") or {}).items()}
        log(f"connected as {config['name']} (runtime {spec['runtime']})")
        report_state(conn, init, runtime)
        interrupt = threading.Event()
        control = ControlPoll(path, interrupt)
        control.start()
        while True:
            reply = conn.call("turn_next", wait=long_poll_wait())
            message = reply.get("message")
            if message is None:
                continue
            interrupt.clear()
            before = (runtime.needs_login, runtime.active_model)
            Turn(
                conn, init, runtime, message, interrupt, float(spec.get("turn_timeout", 300))
            ).run()
            if (runtime.needs_login, runtime.active_model) != before:
                report_state(conn, init, runtime)
    finally:
        if control is not None:
            control.end()
        conn.close()


def serve_page_on_demand(agent_socket: str) -> None:
    """The page on web.sock's connections, which init hands over on the harness's page
    pair (``HIVE_PAGE_FD``: nothing of the harness's on the host's filesystem, red team
    round 22; not the listener itself, session 25); its code
    (http.server, email, Jinja2: ~3 MiB) loaded when the first request arrives, so a
    cage nobody looks at never holds it."""
    fd = os.environ.pop(layout.PAGE_FD_ENV, None)
    if fd is None:
        log("no page: no web.sock was handed in (a cage started by an older hive-priv)")
        return
    try:
        os.set_inheritable(int(fd), False)  # an exec'd harness got it inheritable
        raw = _socket.socket(fileno=int(fd))
    except (OSError, ValueError) as e:
        log(f"no page: {layout.PAGE_FD_ENV}={fd}: {e}")
        return

    def on_first_request() -> None:
        waiting = select.poll()  # until a connection is waiting
        waiting.register(raw.fileno(), select.POLLIN)
        while not waiting.poll():
            pass
        # No TLS in the harness (the runtime's own TLS is its business): http.client
        # imports ssl only if it can, and libssl would cost the cage ~1.3 MiB.
        sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]  # None: not importable
        import socket

        from hyperhive.cage.page import serve_page

        serve_page(agent_socket, socket.socket(fileno=raw.detach()))

    threading.Thread(target=on_first_request, name="page", daemon=True).start()


def main(args: list[str], connected: int | None = None) -> None:
    """``connected``: the first connection, made by init's fork before this module loaded
    (``init.run_harness``); None for an exec'd harness, or if that connect failed."""
    path = os.environ.get("HIVE_SOCKET", layout.AGENT_SOCKET)
    backoff = 0.05
    first: Conn | None = None if connected is None else Conn(path, connected)
    while first is None:  # connected first: the agent runs from here (cold start's end) ...
        try:
            first = Conn(path)
        except OSError:
            backoff = _pause(backoff)
    # ... then init's channel (its reader thread), the page and the egress bridge, whose
    # imports (http.server: email, ssl) are most of the harness's start-up; the turn
    # loop's first request waits for them.
    init = InitChannel(int(os.environ["HIVE_INIT_FD"]))
    from hyperhive.cage.egress_bridge import serve_bridge

    serve_page_on_demand(path)
    try:
        serve_bridge()
    except OSError as e:  # e.g. the port is taken: turns still run, egress is refused
        log(f"egress bridge not started: {e}")
    serve_forever(path, init, first)


def serve_forever(path: str, init: InitChannel, first: Conn | None = None) -> None:
    """Serve turns for good: ``first`` once, then a new connection whenever one ends."""
    backoff = 0.05
    while True:
        try:
            conn, first = first, None  # the first connection serves once
            serve(path, init, conn)
        except (OSError, ConnectionError, ValueError, RuntimeError) as e:
            # The core is (re)starting (the socket comes back in the same directory), or it
            # refused a request (a full disk, say): either way connect again, never exit.
            if not isinstance(e, (FileNotFoundError, ConnectionRefusedError)):
                log(f"connection lost: {e}")
            backoff = _pause(backoff)
            continue
        backoff = 0.05

"""TLS termination at the egress proxy, for destinations that have a secret binding or
L7 rules (every other CONNECT stays a byte tunnel).

The proxy has already checked the CONNECT destination, connected to it and verified
its certificate (the host's trust store plus ``[egress] upstream_ca``). Here it shows
the cage a leaf for that name signed by the hive's CA, refuses a ClientHello whose SNI
names anything else, then reads each request with h11 (a real HTTP/1.1 parser) and
re-frames it upstream, so a request is read one way only: a head with obsolete line
folding, a bare LF, two Content-Lengths or both Content-Length and Transfer-Encoding
is refused, and so is a second request pipelined behind the first. ``Host`` must name
the destination. With L7 rules each request's method and normalised path must match
one; with a binding the placeholder in the bound header is replaced by the secret,
on requests to this destination only.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import re
import select
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import h11

from hyperhive.wire.egress import PathError, Rule, RuleError, destination, normal_path

log = logging.getLogger("hive.egress")

_T = TypeVar("_T")

MAX_HEAD = 16 * 1024
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0  # a kept-alive connection with nothing said is closed
MAX_INTERIM = 16  # 1xx answers to one request before the answer is refused (502)
# A final answer read while the request's write is blocked is taken as the server's last
# word once it is whole, or once this much of it has come (a large answer, flowing).
EARLY_BUFFER = 256 * 1024
# After an answer that came before the request's end: how long the cage's unread rest is
# read and dropped before the close, at most in all and between two reads (nginx's
# lingering_time and lingering_timeout).
LINGER_TIME = 30.0
LINGER_WAIT = 5.0
CHUNK = 256 * 1024
# h11 parses a body in Python, under the core's one GIL: ~9 us a piece (a chunk, or what
# one read brought), whatever its size. Past BODY_EVENTS_FREE pieces averaging under
# BODY_PIECE_MIN bytes, a request's or an answer's small pieces come at most
# SMALL_PIECES_PER_SECOND for all of its agent's connections together (a burst as many),
# the relay's thread asleep meanwhile with the GIL free (red team round 23a: 16
# connections of one-byte chunks held the core at a whole CPU for ~20 s; refusing them
# refused Java's 4,089-byte chunks and a CSV streamed a line a chunk: its re-check). A
# model's event stream sends tens of small pieces a second: never paced.
BODY_EVENTS_FREE = 256
BODY_PIECE_MIN = 1024
SMALL_PIECES_PER_SECOND = 2000.0
PIECES_PAUSE_MIN = 0.05  # a pause owed is taken once this long: a write and a sleep a batch


FORGET_PAST = 256  # buckets kept before the full ones are dropped


class PiecePacer:
    """Small pieces of answers, per agent, across its terminated connections' threads: a
    token bucket each, ``per_second`` a second and as many at most."""

    def __init__(self, per_second: float = SMALL_PIECES_PER_SECOND) -> None:
        self.per_second = per_second
        self.capacity = per_second
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}
        self._forget_past = FORGET_PAST

    def owed(self, agent: str, amount: float = 1.0) -> float:
        """Take ``amount`` of ``agent``'s; the seconds to wait before going on."""
        with self._lock:
            now = time.monotonic()
            tokens, at = self._buckets.get(agent, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - at) * self.per_second) - amount
            self._buckets[agent] = (tokens, now)
            if len(self._buckets) > self._forget_past:
                self._forget_full(now)
        return max(0.0, -tokens / self.per_second)

    def _forget_full(self, now: float) -> None:
        """Drop the buckets refilled by now (a new one starts full: nothing changes), so
        agents come and gone leave none behind."""
        full = [
            a
            for a, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.per_second >= self.capacity
        ]
        for a in full:
            del self._buckets[a]
        # twice what is left before the next sweep: each costs what the growth since
        self._forget_past = max(FORGET_PAST, 2 * len(self._buckets))


# What an egress connection costs the core besides Python: a terminated one decrypting
# what one side sent and encrypting it for the other, ~1.6 s of CPU a GiB (bench/run.py),
# a tunnel or plain relay splicing, ~0.2 s a GiB, in the relay's threads with the GIL free,
# so on the core's other CPUs, where no cgroup of the agent's charges it. Each thread
# serving a connection (a tunnel's two: relay.py) measures its own CPU (``time.thread_time``) as it
# goes and takes it from its agent's bucket (``CpuPacer``); in debt, the thread sleeps it
# off. An agent's rate is ``per_agent``, or the hive's ``total`` shared evenly by the
# agents that used some in the last ACTIVE_SECONDS, whichever is less: however many
# connections one agent opens, another's get as much. A bucket holds CPU_BURST_SECONDS.
CPU_BURST_SECONDS = 1.0
CPU_PAUSE_MIN = 0.02  # a debt is slept off once this long: a sleep every few chunks at most
ACTIVE_SECONDS = 1.0
ACTIVE_FLOOR = 0.01  # CPU seconds within ACTIVE_SECONDS to count as using some


def default_cpu_total() -> float:
    """Every agent's egress connections together: half the CPUs the core may run on, at
    least one."""
    return max(1.0, len(os.sched_getaffinity(0)) / 2)


class CpuPacer:
    """The CPU seconds egress connections' threads spend, a second: for one agent's
    together at most ``per_agent``, and ``total`` shared by the agents using some (0: no
    bound). An agent counts as using some while it spent ACTIVE_FLOOR in the last
    ACTIVE_SECONDS, or owes: charges of a few ms now and then (a handshake dropped) don't
    halve the others' share (re-check of session 20). Each of them gets an even part of
    ``total``, or, if more, what it used in the last ACTIVE_SECONDS plus an even part of
    what all of them left of ``total`` (as the last sweep saw it): what one agent doesn't
    use goes to the others (session 21; before, to nobody), the parts add up to ``total``,
    and one that starts using more gets its even part at once. A bucket holds at most a
    burst of the even part, so an agent back from idle can't bring more."""

    def __init__(self, per_agent: float, total: float) -> None:
        self.per_agent = per_agent
        self.total = total
        self._lock = threading.Lock()
        # agent -> (CPU seconds in its bucket, at, CPU seconds spent lately, decaying)
        self._buckets: dict[str, tuple[float, float, float]] = {}
        self._active: set[str] = set()  # as of the last sweep
        # CPU seconds spent lately (ACTIVE_SECONDS), as of the last sweep: each active
        # agent's, and all of them together
        self._used: dict[str, float] = {}
        self._used_sum = 0.0
        self._swept = time.monotonic()

    def rate(self, active: int) -> float:
        """An agent's even part, CPU seconds a second with ``active`` agents using some
        (what it gets at least); 0: no bound."""
        rates = [r for r in (self.per_agent, self.total / max(1, active)) if r > 0]
        return min(rates, default=0.0)

    def rate_of(self, agent: str, active: int) -> float:
        """``agent``'s CPU seconds a second: its even part, or its own recent use plus an
        even part of what every agent left of the hive's share, if more (never past
        ``per_agent``); 0: no bound. Giving each agent all that the others left, as this
        did first, let agents taking turns get 1.4 to 1.7 times ``total`` together
        (re-check of session 21)."""
        parts = max(1, active)
        share = self.total / parts
        if self.total > 0:
            # (negative when they used more than ``total``: each gives back its part)
            left = self.total - self._used_sum / ACTIVE_SECONDS
            share = max(share, self._used.get(agent, 0.0) / ACTIVE_SECONDS + left / parts)
        rates = [r for r in (self.per_agent, share) if r > 0]
        return min(rates, default=0.0)

    def owed(self, agent: str, spent: float) -> float:
        """Take ``spent`` CPU seconds of ``agent``'s; the seconds its thread waits."""
        if self.per_agent <= 0 and self.total <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            if now - self._swept > ACTIVE_SECONDS / 4:
                self._sweep(now)
            active = len(self._active) + (agent not in self._active)
            rate = self.rate_of(agent, active)
            capacity = self.rate(active) * CPU_BURST_SECONDS
            tokens, at, used = self._buckets.get(agent, (capacity, now, 0.0))
            tokens = min(capacity, tokens + (now - at) * rate) - spent
            self._buckets[agent] = (tokens, now, _decayed(used, now - at) + spent)
        return max(0.0, -tokens / rate)

    def charge(self, agent: str, spent: float) -> None:
        """Take ``spent`` CPU seconds of ``agent``'s that a thread which can't wait spent
        for it (the event loop's part of its connections): its connections' threads sleep
        the debt off at their next ``pace``."""
        self.owed(agent, spent)

    def _sweep(self, now: float) -> None:
        """Who uses some now (the hive's share is split among them); forget the agents
        that used none for ACTIVE_SECONDS and owe nothing (a debt is never forgotten)."""
        self._swept = now
        active_before = len(self._active)
        active, quiet, used_by = set(), [], {}
        for a, (tokens, at, used) in self._buckets.items():
            owes = tokens + (now - at) * self.rate_of(a, active_before) < 0
            lately = _decayed(used, now - at)
            if owes or lately >= ACTIVE_FLOOR:
                active.add(a)
                used_by[a] = lately
            elif now - at > ACTIVE_SECONDS:
                quiet.append(a)
        for a in quiet:
            del self._buckets[a]
        self._active = active
        self._used, self._used_sum = used_by, sum(used_by.values())


def _decayed(used: float, elapsed: float) -> float:
    """CPU seconds spent lately, ``elapsed`` seconds on: gone after ACTIVE_SECONDS."""
    return used * max(0.0, 1.0 - elapsed / ACTIVE_SECONDS)


# A pause is at most this long: a longer debt is slept in turns, the relay's connection
# seen between (and a rate of 1e-300 in hive.toml is a long pause, never an overflow).
MAX_PAUSE = 60.0


class CpuMeter:
    """One terminated connection's CPU, or one direction of a tunnel's, in the thread
    serving it: what the thread spent
    since it last asked (``time.thread_time``, from ``since``), and another thread's on its
    behalf (``add``), taken from its agent's bucket (``CpuPacer``), a debt slept off
    (``pace``). ``wake`` ends a pause, and every later one, at once (the connection was
    ended): the debt stays the agent's for its next connection."""

    def __init__(self, pacer: CpuPacer | None, agent: str, since: float | None = None) -> None:
        self.pacer = pacer
        self.agent = agent
        self._at = time.thread_time() if since is None else since
        self._ended = threading.Event()

    def sibling(self) -> CpuMeter:
        """A meter for another thread of the same connection (a tunnel's other direction):
        the same agent's, ended by the same ``wake``; ``begin`` it in its thread."""
        other = CpuMeter(self.pacer, self.agent)
        other._ended = self._ended
        return other

    def begin(self) -> None:
        """The calling thread's CPU counts from now (a relay direction's own thread)."""
        self._at = time.thread_time()

    def add(self, seconds: float) -> None:
        """Charge ``seconds`` of another thread's CPU with this one's, at the next ``pace``."""
        self._at -= seconds

    def pace(self) -> None:
        """Take what was spent since the last call; sleep a debt off once it is long enough."""
        if self.pacer is None:
            return
        now = time.thread_time()
        spent, self._at = now - self._at, now
        if (wait := self.pacer.owed(self.agent, spent)) > CPU_PAUSE_MIN:
            self.pause(wait)

    def pause(self, seconds: float) -> None:
        """Wait ``seconds`` (at most MAX_PAUSE) with the GIL free, or until ``wake``."""
        self._ended.wait(min(seconds, MAX_PAUSE))

    def wake(self) -> None:
        self._ended.set()


SMALL_PIECES = PiecePacer()
DROP = {b"proxy-authorization", b"proxy-connection", b"keep-alive", b"expect"}
# TRACE (and IIS's TRACK) make the server echo the request it received: with a secret
# swapped in, the answer would carry it back to the cage (cross-site tracing). Refused in
# any case spelling (some servers read methods case-insensitively).
ECHO_METHODS = {"TRACE", "TRACK"}
# Headers by which many servers (Google APIs, ASP.NET, Express's method-override) act on
# another method than the request line's: an L7 rule checks the request line's.
METHOD_OVERRIDES = {b"x-http-method-override", b"x-http-method", b"x-method-override"}
# Headers by which front ends and frameworks take the request's host or path from the
# request instead of its Host and target (Symfony's and Laravel's trusted proxies, IIS's
# URL rewrite, Django's USE_X_FORWARDED_HOST, RFC 7239): the proxy checked Host and the
# target, so a server honouring one could route a bound secret to another virtual host
# or an L7-ruled request to another path (re-check of session 32).
ROUTING_OVERRIDES = {
    b"forwarded",
    b"x-forwarded-host",
    b"x-forwarded-server",
    b"x-host",
    b"x-http-host-override",
    b"x-original-host",
    b"x-original-url",
    b"x-rewrite-url",
}


@dataclass(frozen=True)
class Injection:
    """One binding, as the proxy applies it."""

    secret: str  # its name (logged; never its value)
    header: bytes  # lower-case header name
    template: str  # the header's value with {} where the secret goes
    placeholder: str
    value: Callable[[], str | None]  # read at request time: a rotated secret applies at once


@dataclass(frozen=True)
class Plan:
    host: str
    port: int
    rules: tuple[Rule, ...] | None  # L7 rules each request must match; None: any request
    injections: tuple[Injection, ...]


class Refused(Exception):
    def __init__(self, status: int, reason: str, log_it: bool = True) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.log_it = log_it


def sni_check(host: str) -> Callable[[ssl.SSLObject, str, ssl.SSLContext], int | None]:
    # (typeshed says str; a ClientHello without SNI gives None)
    def check(_sock: ssl.SSLObject, name: str, _ctx: ssl.SSLContext) -> int | None:
        if name is None or name.lower().removesuffix(".") != host:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None

    return check


# Reads a batch makes after its first: 16 KiB records fill CHUNK in 16; one-byte records
# (decrypting each costs ~3 us) would take 262,144 reads, ~0.8 s of CPU before the relay
# could charge it (red team of session 20): this many, then the batch goes through.
BATCH_READS = 64


def recv_batch(sock: ssl.SSLSocket, limit: int = CHUNK) -> bytes:
    """One read that may wait (as the socket's timeout says), then whatever else has
    already arrived, without waiting again, up to ``limit`` (and BATCH_READS reads). An SSL
    read gives one TLS record (16 KiB at most) and each pass through h11 costs about the
    same whatever its size, so a bulk transfer goes through in batches, not records. b""
    at the end."""
    data = sock.recv(limit)
    if not data or len(data) >= limit or not _waiting(sock):
        return data
    parts, n = [data], len(data)
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        while n < limit and len(parts) <= BATCH_READS:
            try:
                more = sock.recv(limit - n)
            except (ssl.SSLWantReadError, BlockingIOError):
                break
            if not more:
                break  # the end: the next read sees it again
            parts.append(more)
            n += len(more)
    finally:
        sock.settimeout(timeout)
    return b"".join(parts)


def recv_batch_into(sock: ssl.SSLSocket, view: memoryview) -> int:
    """recv_batch, into ``view`` (up to its length): the bytes are read once, by the
    decryption, and never copied in Python. 0 at the end."""
    n = sock.recv_into(view)
    if not n or n >= len(view) or not _waiting(sock):
        return n
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        for _ in range(BATCH_READS):
            if n >= len(view):
                break
            try:
                more = sock.recv_into(view[n:])
            except (ssl.SSLWantReadError, BlockingIOError):
                break
            if not more:
                break
            n += more
    finally:
        sock.settimeout(timeout)
    return n


def _recv_into(view: memoryview, sock: ssl.SSLSocket) -> int:
    return recv_batch_into(sock, view)


def _waiting(sock: ssl.SSLSocket) -> bool:
    """Decrypted bytes not yet read, or bytes on the socket (a poll, never a wait)."""
    if sock.pending():
        return True
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN)
    return bool(p.poll(0))


_FOLD = re.compile(rb"\r\n[ \t]")
# A header value as RFC 9110 (and h11) take it: visible characters, spaces and tabs only
# between them.
_FIELD_VALUE = re.compile(rb"(?:[\x21-\x7e](?:[ \t\x21-\x7e]*[\x21-\x7e])?)?")


# An escaped "/", "\\" or control character (tab, LF, CR, NUL, DEL) in a path.
_ESCAPED_IN_PATH = re.compile(r"%(?:2f|5c|[01][0-9a-f]|7f)", re.IGNORECASE)
_NOT_ALNUM = re.compile(rb"[^a-z0-9]")


def canonical_name(name: bytes) -> bytes:
    """A header name (h11 gives it lower case) as the most lenient server may read it:
    every character but a letter or a digit as "-"."""
    return _NOT_ALNUM.sub(b"-", name)


STALL_SLICE = 1.0  # a blocked write waits this long at a time, then looks for progress
DRAIN_SLICE = 0.01  # the same while what the peer sends is read and dropped meanwhile


def _unsent(sock: socket.socket) -> int:
    """Bytes in ``sock``'s send queue the peer has not acknowledged (SIOCOUTQ)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])


class Interrupted(Exception):
    """A blocked write given up for good (``send_within``'s ``interrupt`` said so): the
    connection's output that way ends here, its last write never finished."""


def send_within(
    sock: ssl.SSLSocket,
    data: bytes,
    stall: float,
    restore: float | None,
    interrupt: Callable[[], bool] | None = None,
    meanwhile: Callable[[], bool] | None = None,
) -> None:
    """``sock.sendall(data)``, ended (TimeoutError) once nothing has moved for ``stall``
    seconds, then the socket's timeout set back to ``restore``. CPython gives one
    ``SSL_write`` one deadline whatever it carries, so a 256 KiB piece timed out whole
    under an honest reader slower than 256 KiB a stall (re-check of session 33). Here each
    wait is STALL_SLICE, and a write that times out is made again with the same bytes (as
    OpenSSL requires; it goes on where it stopped) as long as the socket's send queue
    changed within ``stall``: the peer took something, or room came. Once the peer has
    taken nothing for two waits, ``interrupt()`` (if given) may end the write (Interrupted),
    asked again after each further wait, and once more if the write fails (the peer closed
    or reset: what it sent before may still be read). ``meanwhile()`` (if given) runs after
    every wait that timed out, the waits then DRAIN_SLICE; its True counts as progress."""
    wait = min(DRAIN_SLICE if meanwhile is not None else STALL_SLICE, stall)
    try:
        queued, moved_at = -1, time.monotonic()
        while True:
            sock.settimeout(wait)
            try:
                sock.sendall(data)
                return
            except TimeoutError:
                now, unsent = time.monotonic(), _unsent(sock)
                if unsent != queued or (meanwhile is not None and meanwhile()):
                    queued, moved_at = unsent, now
                # (two waits alike, not one: a queue refilled to the same size can look
                # unmoved once)
                elif now - moved_at >= 1.5 * wait and interrupt is not None and interrupt():
                    raise Interrupted from None
                elif now - moved_at >= stall:
                    raise
            except OSError:
                if interrupt is not None and interrupt():
                    raise Interrupted from None
                raise
    finally:
        sock.settimeout(restore)


def strict_head(raw: bytes) -> None:
    """What h11 would accept but a server behind us might read otherwise."""
    head = raw.partition(b"\r\n\r\n")[0]
    if b"\n" in head.replace(b"\r\n", b"") or b"\r" in head.replace(b"\r\n", b""):
        raise Refused(400, "a bare CR or LF in the request head is refused")
    if _FOLD.search(head):
        raise Refused(400, "obsolete line folding in the request head is refused")
    names = [line.partition(b":")[0].lower() for line in head.split(b"\r\n")[1:]]
    if names.count(b"content-length") > 1:
        raise Refused(400, "more than one Content-Length is refused")
    if b"content-length" in names and b"transfer-encoding" in names:
        raise Refused(400, "Content-Length with Transfer-Encoding is refused (smuggling)")
    if names.count(b"transfer-encoding") > 1:
        raise Refused(400, "more than one Transfer-Encoding is refused")


def _whole(response: h11.Response, held: bytes) -> bool:
    """Whether ``held`` (what h11 holds past ``response``'s head) is its whole body, as far
    as the head tells: a Content-Length's worth, a chunked body's last chunk, or none (a
    1xx-free 204 or 304)."""
    if response.status_code in (204, 304):
        return True
    length = _content_length(response)
    if length is not None:
        return len(held) >= length
    if any(k == b"transfer-encoding" and b"chunked" in v.lower() for k, v in response.headers):
        return held.endswith(b"0\r\n\r\n")
    return False  # (read until the close: the server's end says)


def _content_length(response: h11.Response) -> int | None:
    """The body's length if a Content-Length frames it (h11 has checked the head: one
    value, no Transfer-Encoding beside it), else None."""
    if response.status_code < 200:
        return None
    values = [v for n, v in response.headers if n == b"content-length"]
    if len(values) != 1 or any(n == b"transfer-encoding" for n, _ in response.headers):
        return None
    return int(values[0])


def _keeps_alive(message: h11.Request | h11.Response) -> bool:
    """h11's own rule: HTTP/1.1 and no ``Connection: close``."""
    tokens = {
        t.strip().lower() for n, v in message.headers if n == b"connection" for t in v.split(b",")
    }
    return b"close" not in tokens and message.http_version >= b"1.1"


def refusal_events(status: int, reason: str) -> list[Any]:
    body = f"hive egress: {reason}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    return [
        h11.Response(status_code=status, headers=headers),
        h11.Data(data=body),
        h11.EndOfMessage(),
    ]


# A kept-alive connection's next request after the agent's rules or bindings changed so
# that this connection would not be made now.
CHANGED = "{}:{}: this agent's egress rules or secret bindings changed; connect again"


class Terminated:
    """One terminated connection: ``client`` (TLS, the cage) and ``upstream`` (TLS,
    verified). ``refuse(reason)`` logs a refused request."""

    def __init__(
        self,
        agent: str,
        client: ssl.SSLSocket,
        upstream: ssl.SSLSocket,
        plan: Plan,
        refuse: Callable[[str], None],
        replan: Callable[[], Plan | None] | None = None,
        meter: CpuMeter | None = None,
        stall: float = IDLE_TIMEOUT,
    ) -> None:
        self.agent = agent
        # How long a write to the cage may move nothing before the connection ends (the
        # proxy's ``[egress] stall_seconds``, as for a tunnel); a read waits IDLE_TIMEOUT.
        self.stall = stall
        # The CPU this thread spends relaying, charged as it goes, and its pauses (woken
        # when the proxy ends the connection: a rule taken back).
        self.meter = meter or CpuMeter(None, agent)
        self.client = client
        self.upstream = upstream
        self.plan = plan
        self.refuse = refuse
        # The plan as the hive's rules and bindings make it now, asked before each request:
        # a rule taken back, a secret unbound, an L7 rule removed reach a kept-alive
        # connection at its next request (red team round 22); None: it ends there.
        self.replan = replan
        self.srv = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.cli = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.up = 0
        self.down = 0
        self._raw = b""  # the bytes of the request head being read (for strict_head)
        self._out_client: list[bytes] = []
        self._out_upstream: list[bytes] = []
        self._pending = 0
        self._request_closes = False
        self._closing = False  # the last answer's body bypassed h11, which said to close
        self._fresh_cli = False  # self.cli was renewed after a body that bypassed it
        # The cage closed between requests with the upstream at a message boundary,
        # nothing unread or unsent: the upstream connection may serve another (egress_pool).
        self.clean_end = False
        self.last_exchange = time.monotonic()
        self.injected: dict[tuple[str, str], int] = {}  # (secret, header): requests
        # The server answered while it still had the request's body to take, and took no
        # more: its answer (read by ``_answer_arrived``) goes to the cage, nothing more of
        # the request goes out, and the connection ends after it (``_answer_early``).
        self._early: h11.Response | None = None
        self._upstream_over = False
        self._early_at = 0.0
        # The upstream connection ends with a reset, what is queued to it dropped (its
        # request cut short: an early answer, a write that stalled).
        self.reset_upstream = False
        self._interim = 0  # 1xx answers to this request so far

    def _srv_event(self) -> Any:
        while True:
            ev = self.srv.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            self._flush()  # what is owed goes out before waiting for more
            try:
                data = recv_batch(self.client)
            except TimeoutError:
                return h11.ConnectionClosed()
            if self.srv.their_state is h11.IDLE and len(self._raw) <= MAX_HEAD:
                self._raw += data
            self.srv.receive_data(data)

    def _client_left(self) -> bool:
        """Wait until the upstream has something to read; True if the cage closed (or
        shut down) its end first. A wait on the upstream alone outlived the cage: a server
        that never answered, or sent 100 Continue for ever, held the connection, one of
        the agent's, and the flood a whole CPU, after the cage had given up (red team of
        session 32)."""
        if self.upstream.pending():
            return False
        p = select.poll()
        p.register(self.upstream.fileno(), select.POLLIN)
        p.register(self.client.fileno(), select.POLLRDHUP)  # (HUP and ERR come anyway)
        # After an early answer the cage may still be sending what nobody reads: the rest
        # of the answer comes within ``stall``, or the connection ends (an echo that waits
        # for the body it answers).
        wait = round(self.stall * 1000) if self._upstream_over else None
        while True:
            ready = p.poll(wait)
            if any(fd == self.client.fileno() for fd, _ in ready) or (wait and not ready):
                return True
            if ready:
                return False

    def _from_upstream(self, read: Callable[[ssl.SSLSocket], _T]) -> _T | None:
        """``read(upstream)`` once it has something (None: the cage left first). Read
        without waiting: a socket that polls readable may hold no data for us (a TLS 1.3
        session ticket), and a blocking read then waited for good (red team of session 32)."""
        while True:
            if self._client_left():
                return None
            self.upstream.settimeout(0.0)
            try:
                return read(self.upstream)
            except (ssl.SSLWantReadError, BlockingIOError):
                continue
            finally:
                self.upstream.settimeout(None)

    def _cli_event(self) -> Any:
        while True:
            ev = self.cli.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            self._flush()
            data = self._from_upstream(recv_batch)
            if data is None:
                return h11.ConnectionClosed()
            self.down += len(data)
            self.cli.receive_data(data)

    # Output is gathered and sent when the proxy would otherwise wait (or a message
    # ends, or enough is gathered): a response's head and a small body go out as one
    # TLS record and one write, not three, and a request's head and its end as one.
    # Nothing is held back while the proxy waits for more: a streamed body (SSE) flows.

    def _to_client(self, event: Any) -> None:
        # (a body's bytes pass through as they are, not joined into a copy)
        for out in self.srv.send_with_data_passthrough(event) or ():
            if out:
                self._out_client.append(out)
                self._pending += len(out)
        if self._pending >= CHUNK:
            self._flush()

    def _to_upstream(self, event: Any) -> None:
        out = self.cli.send(event)
        if out:
            self._out_upstream.append(out)
            self._pending += len(out)
            if self._pending >= CHUNK:
                self._flush()

    def _send_client(self, data: bytes) -> None:
        """``data`` to the cage; a cage that takes nothing for ``stall`` seconds ends the
        connection (TimeoutError): before, a cage that stopped reading held the thread and
        its buffers for IDLE_TIMEOUT, 300 s."""
        drain = self._drain_cage if self._upstream_over else None
        send_within(self.client, data, self.stall, IDLE_TIMEOUT, meanwhile=drain)

    def _drain_cage(self) -> bool:
        """While an early answer goes to a cage that takes nothing: what the cage has sent
        (the rest of its request, never sent on) read and dropped without waiting, up to
        CHUNK a read and BATCH_READS reads; True if anything came. A cage that sends its
        whole body before it reads (http.client, requests) otherwise never read an answer
        larger than the buffers: each side waited for the other until the stall (re-check
        of session 34). Not past LINGER_TIME after the answer came."""
        if time.monotonic() > self._early_at + LINGER_TIME:
            return False
        self.client.settimeout(0.0)
        came = False
        try:
            for _ in range(BATCH_READS):
                if not self.client.recv(CHUNK):
                    break
                came = True
        except OSError:  # (nothing more now, or TLS's or the connection's end)
            pass
        self.meter.pace()
        return came

    def _send_upstream(self, data: bytes) -> None:
        """``data`` to the server, bounded the same way: a server that takes nothing held
        the connection (a thread, one of the agent's slots, its buffers) for good, after
        the cage had left, and so did an honest full-duplex exchange (an echo answering
        while it reads: this proxy reads the answer once the request is sent), deadlocked
        (re-check of session 33)."""
        send_within(self.upstream, data, self.stall, None, self._answer_arrived)

    def _answer_arrived(self) -> bool:
        """While a write to the server is blocked and it has taken nothing for two waits
        (a server still reading, however slowly, gets the whole request whatever it has
        answered meanwhile, as before), or the write failed: whether the server has
        answered for good, so that the rest of the request is not to be sent. That is a
        final answer (its head kept in ``self._early``) that has come whole, or one whose
        body has come past EARLY_BUFFER (a large answer, flowing: the server is not waiting
        for the request), or the server's end, or what is not HTTP. A head alone, or a
        little of a body, is not: an upload's progress stream (``200`` and a chunked head
        at once, then the body read after a pause) was cut (re-check of session 34). A
        1xx is passed over, up to MAX_INTERIM. Before, a server that answered a 413 on the
        head and read no more held the write until ``stall`` ended it, and the cage saw a
        reset, not the answer."""
        ended = self._take_upstream()
        try:
            while self._early is None:
                ev = self.cli.next_event()
                if ev is h11.NEED_DATA:
                    return ended
                if isinstance(ev, h11.InformationalResponse):
                    self._interim += 1
                    if self._interim > MAX_INTERIM:
                        return True  # refused by _relay_response (h11 says it again)
                    continue
                if isinstance(ev, h11.Response):
                    self._early = ev
                    break
                return True  # (the upstream's end)
        except h11.RemoteProtocolError:
            return True  # _relay_response refuses it (h11 raises it again)
        held = self.cli.trailing_data[0]
        return ended or len(held) >= EARLY_BUFFER or _whole(self._early, held)

    def _take_upstream(self) -> bool:
        """What the server has sent, into ``self.cli``, without waiting, until EARLY_BUFFER
        bytes are held there; True once the server has ended (closed, or reset: what came
        before a reset is read all the same)."""
        self.upstream.settimeout(0.0)
        try:
            while len(self.cli.trailing_data[0]) < EARLY_BUFFER:
                try:
                    data = self.upstream.recv(CHUNK)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    return False  # (a TLS 1.3 session ticket alone, say: nothing for us)
                except OSError:
                    data = b""
                if not data:
                    if not self.cli.trailing_data[1]:
                        self.cli.receive_data(b"")
                    return True
                self.down += len(data)
                self.cli.receive_data(data)
            return False
        finally:
            self.upstream.settimeout(None)

    def _flush(self) -> None:
        # (upstream first: a request's bytes never wait behind the answer to the last)
        if self._upstream_over:
            self._out_upstream.clear()  # the server answered and took no more: none goes
        if self._out_upstream:
            data = b"".join(self._out_upstream)
            self._out_upstream.clear()
            self._send_upstream(data)
            self.up += len(data)
        if self._out_client:
            out = self._out_client
            self._out_client = []
            if len(out) == 1 or self._pending >= CHUNK:
                for piece in out:  # (a large piece goes as it is: no copy to join it)
                    self._send_client(piece)
            else:
                self._send_client(b"".join(out))
        self._pending = 0
        self.meter.pace()

    def _reply(self, status: int, reason: str) -> None:
        """A refusal to the cage (then the connection closes)."""
        if self.srv.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        self._out_upstream.clear()  # a refused request's bytes never go out
        try:
            for event in refusal_events(status, reason):
                self._to_client(event)  # (to HEAD, h11 refuses the body: the head goes)
        except h11.LocalProtocolError:
            pass
        try:
            self._flush()
        except OSError:
            pass

    def run(self) -> None:
        self.client.settimeout(IDLE_TIMEOUT)
        while True:
            self._raw = b""
            try:
                ev = self._srv_event()
            except h11.RemoteProtocolError as e:
                self._refused(Refused(400, f"malformed request: {e}"))
                return
            if isinstance(ev, h11.ConnectionClosed):
                self.clean_end = (
                    self.cli.our_state is h11.IDLE
                    and self.cli.their_state is h11.IDLE
                    and not self.cli.trailing_data[0]
                    and not self._out_upstream
                )
                return
            assert isinstance(ev, h11.Request), ev
            if self.replan is not None:
                plan = self.replan()
                if plan is None:
                    self._refused(Refused(403, CHANGED.format(self.plan.host, self.plan.port)))
                    return
                self.plan = plan
            try:
                headers = self._check(ev)
            except Refused as e:
                self._refused(e)
                return
            if self.srv.client_is_waiting_for_100_continue:
                self._to_client(h11.InformationalResponse(status_code=100, headers=[]))
            self._request_closes = not _keeps_alive(ev)
            self._interim = 0
            self._to_upstream(h11.Request(method=ev.method, target=ev.target, headers=headers))
            pieces = received = 0
            try:
                while True:
                    body = self._srv_event()
                    if isinstance(body, h11.Data):
                        pieces += 1
                        received += len(body.data)
                        self._pace_pieces(pieces, received)
                        self._to_upstream(body)
                    elif isinstance(body, h11.EndOfMessage):
                        self._to_upstream(h11.EndOfMessage())
                        break
                    else:
                        return  # the client went away mid-body
            except h11.RemoteProtocolError as e:
                self._refused(Refused(400, f"malformed request body: {e}"))
                return
            except Interrupted:
                self._answer_early()
                return
            pipelined = bool(self.srv.trailing_data[0])
            try:
                relayed = self._relay_response()
            except Interrupted:  # (the request's last bytes, blocked: see _answer_arrived)
                self._answer_early()
                return
            if not relayed:
                return
            self.last_exchange = time.monotonic()
            if pipelined:
                # A second request sent before the first was answered: never forwarded.
                self.refuse("a pipelined request (sent before the answer) was refused")
                return
            if self._closing or h11.MUST_CLOSE in (
                self.srv.our_state,
                self.cli.their_state,
                self.cli.our_state,
            ):
                return
            try:
                self.srv.start_next_cycle()
                if not self._fresh_cli:
                    self.cli.start_next_cycle()
            except h11.LocalProtocolError:
                return
            self._fresh_cli = False

    def _pace_pieces(self, pieces: int, received: int) -> None:
        """A body's small pieces, paced per agent (``SMALL_PIECES``): the pause, once owed
        long enough, taken here with what was relayed sent first."""
        if (
            pieces > BODY_EVENTS_FREE
            and received < pieces * BODY_PIECE_MIN
            and (wait := SMALL_PIECES.owed(self.agent)) > PIECES_PAUSE_MIN
        ):
            self._flush()
            self.meter.pause(wait)

    def _answer_early(self) -> None:
        """The server answered before it had the whole request, and took no more of it:
        its answer goes to the cage, then what the cage still sends is read and dropped
        for a while (``_linger``) so that the answer is not lost to a reset, and the
        connection ends: the rest of the request is never sent, the upstream connection
        never kept."""
        self._upstream_over = True
        self._early_at = time.monotonic()
        self._out_upstream.clear()
        self._closing = True
        self.reset_upstream = True
        log.info("egress %s: %s answered before the request's end", self.agent, self.plan.host)
        self._relay_response()
        self._linger()  # (after a 502 of ours too: it says why)

    def _linger(self) -> None:
        """Read what the cage sends and drop it, until it closes, sends nothing for
        LINGER_WAIT seconds, or LINGER_TIME has passed (nginx's lingering close): a close
        with its unread request in our receive queue is a reset, and a reset can take the
        answer from the cage's receive queue before the cage reads it. Our side is ended
        first (``_end_output``): what is read then is the raw stream, never decrypted."""
        self._end_output()
        end = time.monotonic() + LINGER_TIME
        while (left := end - time.monotonic()) > 0:
            self.client.settimeout(min(LINGER_WAIT, left))
            try:
                if not self.client.recv(CHUNK):
                    return
            except OSError:  # (a timeout, a reset, TLS's end)
                return
            self.meter.pace()

    def _relay_response(self) -> bool:
        pieces = received = 0
        try:
            while True:
                if (ev := self._early) is not None:
                    self._early = None  # (its head was read while the request was going out)
                else:
                    ev = self._cli_event()
                if isinstance(ev, h11.InformationalResponse):
                    # A 100 Continue of its own: ours was sent already. A flood of them was
                    # a whole CPU for as long as the server liked (red team of session 32).
                    self._interim += 1
                    if self._interim > MAX_INTERIM:
                        self._reply(502, f"the upstream server sent over {MAX_INTERIM} 1xx answers")
                        return False
                    continue
                if isinstance(ev, h11.Response):
                    headers = list(ev.headers)
                    if self._upstream_over:  # the connection ends after it: the cage is told
                        headers = [(k, v) for k, v in headers if k != b"connection"]
                        headers.append((b"connection", b"close"))
                    self._to_client(
                        h11.Response(status_code=ev.status_code, headers=headers, reason=ev.reason)
                    )
                    length = _content_length(ev)
                    if length is not None:
                        return self._relay_body(ev, length)
                elif isinstance(ev, h11.Data):
                    pieces += 1
                    received += len(ev.data)
                    self._pace_pieces(pieces, received)
                    self._to_client(ev)
                elif isinstance(ev, h11.EndOfMessage):
                    self._to_client(h11.EndOfMessage())
                    self._flush()
                    return True
                else:  # upstream closed before the end
                    return False
        except (h11.RemoteProtocolError, h11.LocalProtocolError) as e:
            log.info("egress %s: upstream %s: %s", self.agent, self.plan.host, e)
            self._reply(502, "the upstream server's answer was not valid HTTP/1.1")
            return False

    def _relay_body(self, response: h11.Response, length: int) -> bool:
        """A body of ``length`` bytes (Content-Length): what h11 holds of it already goes
        through h11; the rest, when there is any, is read from the upstream into one
        buffer and written to the cage from it (h11 still frames what the cage gets),
        without passing through h11's buffers: two copies less for every byte. The
        upstream's h11 is then renewed at the message's end, which is known exactly
        (nothing past it was read)."""
        seen = 0
        while True:  # (HEAD, 204 and 304 answers end here: h11 knows they have no body)
            ev = self.cli.next_event()
            if isinstance(ev, h11.Data):
                seen += len(ev.data)
                self._to_client(ev)
            elif isinstance(ev, h11.EndOfMessage):
                self._to_client(h11.EndOfMessage())
                self._flush()
                return True
            elif ev is h11.NEED_DATA:
                break
            else:
                return False
        self._flush()
        left = length - seen
        view = memoryview(bytearray(min(left, CHUNK)))  # (per answer: idle connections hold none)
        while left > 0:
            got = self._from_upstream(functools.partial(_recv_into, view[: min(left, len(view))]))
            if got is None:
                return False
            n = got
            if not n:
                return False  # upstream closed before the end
            self.down += n
            left -= n
            # (h11 passes any bytes-like object through untouched: its "sendfile" use)
            data = cast(bytes, view[:n])
            for out in self.srv.send_with_data_passthrough(h11.Data(data=data)) or ():
                self._send_client(out)
            self.meter.pace()
        self._to_client(h11.EndOfMessage())
        self._flush()
        if self._request_closes or not _keeps_alive(response):
            self._closing = True
        else:
            self.cli = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
            self._fresh_cli = True
        return True

    def _refused(self, e: Refused) -> None:
        self._reply(e.status, e.reason)
        if e.log_it:
            self.refuse(e.reason)
        if self.srv.their_state is h11.SEND_BODY:
            # Its body is still coming: read and dropped for a while, so that the refusal,
            # which says why, is not lost to the reset a close over it would be.
            self._linger()

    def _end_output(self) -> None:
        """Our side of the cage's connection ends now: TLS's close_notify (not waiting for
        the cage's), then TCP's FIN. A client that reads to the end got it only when the
        linger ended, LINGER_WAIT later (re-check of session 34). What is read afterwards
        is the raw stream (CPython drops the TLS object at a shutdown): dropped unread."""
        self.client.settimeout(0.0)
        try:
            self.client.unwrap()
        except (OSError, ValueError):
            pass  # (the cage's close_notify not here yet, or the connection's end)
        try:
            self.client.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _check(self, req: h11.Request) -> list[tuple[bytes, bytes]]:
        strict_head(self._raw)
        plan = self.plan
        hosts = [v for n, v in req.headers if n == b"host"]
        try:
            host_text = hosts[0].decode("ascii")
            name, _, port_text = (
                host_text.rpartition(":") if ":" in host_text else (host_text, "", "")
            )
            port = int(port_text) if port_text else 443
            same = destination(name, port)[0] == plan.host and port == plan.port
        except (UnicodeDecodeError, ValueError, IndexError, RuleError):
            same = False
        if not same:
            shown = hosts[0][:80].decode("ascii", "replace") if hosts else ""
            raise Refused(
                403,
                f"Host {shown!r} is not {plan.host}:{plan.port}, the destination of this tunnel",
            )
        method = req.method.decode("ascii", "replace")
        target = req.target.decode("ascii", "replace")
        # Names as the most lenient server reads them, any character but a letter or a
        # digit as "-": CGI and WSGI make X_Forwarded_Host HTTP_X_FORWARDED_HOST, and PHP
        # makes "." and " " "_" too (X.Forwarded.Host, under php -S or FrankenPHP); those
        # spellings took the bound key past ROUTING_OVERRIDES and a DELETE past an L7 rule
        # (the re-checks of session 33).
        names = {canonical_name(n) for n, _ in req.headers}
        if method == "CONNECT" or b"upgrade" in names:
            raise Refused(400, "CONNECT and protocol upgrades are not relayed inside TLS")
        # Origin-form only ("/path", or "*" for OPTIONS): a server takes an absolute-form
        # target's authority over Host (RFC 9112 3.2.2), so "GET http://other/" with the
        # checked Host took a bound secret to another site on the same server (red team
        # of session 32: one nginx with two names echoed the real key back).
        # "//host/x" is no origin-form path (RFC 3986 3.3: a path-absolute never starts
        # with "//") but a network-path reference that frameworks and redirects resolve to
        # another host; a backslash, which no URI holds, is read as "/" by some servers.
        # Escaped, "/%2Fhost" and "/%5Chost" are the same to a server that decodes the
        # path before it routes or joins it (wsgiref's PATH_INFO; re-check of session 33);
        # the query may hold them.
        # So are an escaped tab, LF or CR ("/%09/host": WHATWG-style URL parsers, Python's
        # urljoin among them, drop them before parsing) and any other escaped control.
        path_part = target.partition("?")[0]
        if not (
            (
                target.startswith("/")
                and not target.startswith("//")
                and "\\" not in target
                and not _ESCAPED_IN_PATH.search(path_part)
            )
            or (target == "*" and method == "OPTIONS")
        ):
            raise Refused(
                400,
                f"{method[:20]} {target[:80]!r}: only an origin-form target ('/path', not"
                " '//', no backslash, no escaped '/', '\\' or control in the path) is"
                " relayed inside TLS",
            )
        override = next((n for n in names if n in ROUTING_OVERRIDES), None)
        if override is not None:
            raise Refused(
                400,
                f"{override.decode()} (in any spelling): a header that names another"
                " host or path than Host and the request line is refused inside TLS (the"
                " proxy checked those)",
            )
        if method.upper() in ECHO_METHODS:
            raise Refused(
                405, f"{method[:20]}: TRACE and TRACK (the server echoes the request) are refused"
            )
        if plan.rules is not None:
            if names & METHOD_OVERRIDES:
                raise Refused(
                    400,
                    "a method override header (X-HTTP-Method-Override, X-HTTP-Method,"
                    " X-Method-Override) is refused where L7 rules check the method",
                )
            try:
                path = normal_path(target)
            except PathError as e:
                raise Refused(400, f"{method} {plan.host}:{plan.port}: {e}") from None
            if not any(r.allows(method, path) for r in plan.rules):
                raise Refused(
                    403,
                    f"no egress rule allows {method} {plan.host}:{plan.port}{path}"
                    f" (rules for it: {', '.join(r.text for r in plan.rules)});"
                    " ask for one with request_approval kind=egress",
                )
        out: list[tuple[bytes, bytes]] = []
        for n, v in req.headers:
            if canonical_name(n) in DROP:
                continue
            if n == b"host":  # the destination as checked, however the cage spelled it
                shown = plan.host if plan.port == 443 else f"{plan.host}:{plan.port}"
                out.append((n, shown.encode()))
                continue
            for inj in plan.injections:
                if n == inj.header and v == inj.template.format(inj.placeholder).encode():
                    secret = inj.value()
                    if secret is None:
                        log.warning(
                            "egress %s: secret %s is bound but not set; placeholder sent",
                            self.agent,
                            inj.secret,
                        )
                    else:
                        v = inj.template.format(secret).encode()
                        if not _FIELD_VALUE.fullmatch(v):
                            # h11 refused it later with the value in its message, which
                            # the connection's log.exception wrote out (red team of
                            # session 32): refused here, by name only.
                            raise Refused(
                                502,
                                f"secret {inj.secret} can't be sent in {n.decode()}: its"
                                " value (or the binding's header) has a character or space"
                                " an HTTP header can't carry",
                            )
                        self._note_injection(inj.secret, n.decode())
            out.append((n, v))
        return out

    def _note_injection(self, secret: str, header: str) -> None:
        """The first injection of a connection is logged; the rest are counted, and the
        count is logged at its end (a line a request was ~2,000 lines a second from one
        agent's kept-alive connections: red team of session 32)."""
        key = (secret, header)
        seen = self.injected.get(key, 0)
        self.injected[key] = seen + 1
        if not seen:
            log.info(
                "egress %s: secret %s put in %s for %s:%d",
                self.agent,
                secret,
                header,
                self.plan.host,
                self.plan.port,
            )

    def log_injections(self) -> None:
        """The connection's count of injections past its first, one line each secret."""
        for (secret, header), count in self.injected.items():
            if count > 1:
                log.info(
                    "egress %s: secret %s put in %s for %s:%d %d times on one connection",
                    self.agent,
                    secret,
                    header,
                    self.plan.host,
                    self.plan.port,
                    count,
                )


def answer_first(client: ssl.SSLSocket, status: int, reason: str) -> None:
    """The answer to the cage's first request when there is no upstream to send it to
    (it could not be reached, or its certificate did not verify): the request's head is
    read, so the cage is not cut off mid-send, and refused."""
    srv = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    client.settimeout(HANDSHAKE_TIMEOUT)
    out: list[bytes] = []
    try:
        while srv.next_event() is h11.NEED_DATA:
            srv.receive_data(client.recv(CHUNK))
        for event in refusal_events(status, reason):
            out.append(srv.send(event) or b"")  # (to HEAD, h11 refuses the body)
    except (h11.ProtocolError, OSError):
        pass
    try:
        client.sendall(b"".join(out))
    except OSError:
        pass


def handshake_client(conn: socket.socket, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    conn.settimeout(HANDSHAKE_TIMEOUT)
    tls = ctx.wrap_socket(conn, server_side=True)
    return tls


def handshake_upstream(
    sock: socket.socket, ctx: ssl.SSLContext, host: str, session: ssl.SSLSession | None = None
) -> ssl.SSLSocket:
    sock.settimeout(HANDSHAKE_TIMEOUT)
    tls = ctx.wrap_socket(sock, server_hostname=host, session=session)
    tls.settimeout(None)
    return tls

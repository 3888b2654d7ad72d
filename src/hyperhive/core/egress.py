"""The egress proxy (runs in hive-core): two listening sockets per agent,
``agents/<name>/egress.sock`` for requests sent straight to it (it refuses
descriptors) and ``egress-handover.sock`` for the cage's bridge, which hands over
the runtime's TCP connection there (one message: the HANDOVER byte and the
socket). The agent is the socket a connection came in on, never anything it says.
Each connection makes one request, either ``CONNECT host:port`` (a tunnel, e.g. for
HTTPS) or a plain-HTTP request with an absolute URI; the destination is checked
against the agent's rules, DNS is resolved here (the cage has no resolver) and only
for names a name rule covers (a lookup is a message out), and every address it would
connect to is checked again: never loopback, link-local, metadata services or the host
itself, and private or other non-public ranges only through an IP or CIDR rule within
them, so an allowlisted name can't lead back into the host or the network around it.
A plain-HTTP request goes upstream with the destination as its Host.

Connections run in threads with blocking sockets, a tunnel's bytes copied through
a buffer per direction (``hyperhive.relay``): the event loop only accepts, and hears
about decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import itertools
import logging
import os
import re
import select
import socket
import ssl
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import h11

from hyperhive.cage.layout import HANDOVER
from hyperhive.core import egress_tls, received_fds
from hyperhive.core.budget import EGRESS_REFUSING
from hyperhive.core.connlimit import rest_listener
from hyperhive.core.egress_pool import IDLE_REUSE, Idle, UpstreamPool, pool_size
from hyperhive.core.egress_tls import Plan
from hyperhive.core.ratelimit import TokenBuckets
from hyperhive.core.tls import HiveCA
from hyperhive.logthrottle import LogThrottle
from hyperhive.peercred import peer_cred
from hyperhive.relay import PACE_EVERY, relay, reset_on_close
from hyperhive.unixsock import bind_listener
from hyperhive.wire.egress import (
    IPAddress,
    IPNetwork,
    Rule,
    RuleError,
    destination,
    parse_port,
    split_host_port,
)

log = logging.getLogger("hive.egress")

MAX_HEAD = 16 * 1024  # request line + headers
HEAD_TIMEOUT = 10.0  # seconds to send them (slow clients are cut off)
STRANGER_LOG_EVERY = 10.0  # seconds between warnings of a foreign uid refused on one socket
REFUSE_READ = 1.0  # seconds a connection refused before its head is read may take to send it
# Connections the kernel queues on an agent's handover socket: what a peer queues behind a
# handover waits there, in flight, until the core accepts it (at its own bucket's rate), so
# few (the bridge hands over one at a time; its blocking connect waits for room, up to 5 s).
HANDOVER_BACKLOG = 4
OFF_LOOP_RETRY = 0.1  # s before letting go is tried again when no thread could be had
TRUST_REREAD = 5.0  # seconds: the host's CA bundle is read again after this long
CONNECT_TIMEOUT = 10.0
# Socket buffers, fixed (``cap_buffers``; the kernel doubles each): what a cage sends
# (its connection's receive side, the server's send side) and what it is sent (the
# server's receive side). On loopback a fraction of either carries GB/s; at 100 ms
# round trips they allow ~20 MB/s up and ~80 MB/s down a connection.
UPLOAD_BUF = 1 << 20  # (also what the proxy sends the cage: a cage that stops reading)
DOWNLOAD_BUF = 1 << 20
# Seconds a tunnel's or plain relay's peer (the server, or the cage) may take no byte of
# what is sent before the connection ends (relay.relay's ``stall``; ``[egress]
# stall_seconds``).
UPSTREAM_STALL = 60
_keys = itertools.count(1)
HOP_HEADERS = {b"proxy-connection", b"proxy-authorization", b"connection", b"keep-alive"}


class Refusal(Exception):
    """The request is refused: (HTTP status, one-line reason)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Decision:
    """One request and what became of it; logged when decided and again when closed."""

    agent: str
    host: str
    port: int
    allowed: bool
    reason: str
    address: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    at: float = field(default_factory=time.time)
    closed: bool = False
    key: int = field(default_factory=lambda: next(_keys))  # ties the close to its decision


@dataclass(frozen=True)
class _Open:
    """An allowed connection while it lasts (EgressProxy.revalidate)."""

    host: str
    port: int
    address: IPAddress
    sockets: tuple[socket.socket, socket.socket]
    kind: str  # "tunnel" (bytes), "plain" (a plain-HTTP request) or "terminated" (TLS)
    # The names with L7 rules (and no plain rule) on its port when it was made: a byte
    # tunnel may carry TLS to any name at its address, so one more of those ends it.
    l7_names: frozenset[str] = frozenset()
    # A terminated connection's current plan (egress_tls.Terminated, whose replan may
    # adopt a newer one than it was made with); None for the others.
    current: Callable[[], Plan | None] | None = None
    # Ends the connection's pauses (egress_tls.CpuMeter.wake: a tunnel's two directions too).
    wake: Callable[[], None] | None = None


class _Listeners(NamedTuple):
    direct: socket.socket  # egress.sock: requests sent straight to it, no descriptors
    handover: socket.socket  # egress-handover.sock: the bridge's handover, one message


@dataclass(frozen=True)
class Block:
    """A range the proxy does not connect into by default."""

    network: IPNetwork
    label: str
    always: bool  # refused whatever the rules say; else only an IP or CIDR rule within it opens it


def _table(rows: list[tuple[str, str, bool]]) -> list[Block]:
    return [Block(ipaddress.ip_network(net), label, always) for net, label, always in rows]


# Every range that is not the public internet, most specific first (the first match
# names the refusal). Modelled on srt's resolved-address guard and the IANA special-
# purpose registries; ipaddress.is_global backs them up below, but Python 3.11's
# tables are older than the registries (64:ff9b:1::/48, 3fff::/20, 5f00::/16).
# ``always``: loopback, link-local, unspecified, multicast, broadcast and the cloud
# metadata services (credentials) are never reached, as today; every other range
# is opened only by an operator's IP or CIDR rule that lies within it.
BLOCKS_V4 = _table(
    [
        ("0.0.0.0/32", "unspecified address", True),
        ("0.0.0.0/8", "'this network' (0.0.0.0/8)", True),
        ("127.0.0.0/8", "loopback", True),
        ("169.254.0.0/16", "link-local", True),  # incl. 169.254.169.254, the usual metadata service
        ("100.100.100.200/32", "cloud metadata service (Alibaba)", True),
        ("168.63.129.16/32", "cloud metadata service (Azure WireServer)", True),
        ("192.0.0.192/32", "cloud metadata service (Oracle)", True),
        ("224.0.0.0/4", "multicast", True),
        ("255.255.255.255/32", "broadcast", True),
        ("10.0.0.0/8", "private (RFC 1918)", False),
        ("172.16.0.0/12", "private (RFC 1918)", False),
        ("192.168.0.0/16", "private (RFC 1918)", False),
        ("100.64.0.0/10", "shared address space (CGNAT, RFC 6598)", False),
        ("192.0.0.0/24", "IETF protocol assignments", False),
        ("192.0.2.0/24", "documentation (TEST-NET-1)", False),
        ("198.51.100.0/24", "documentation (TEST-NET-2)", False),
        ("203.0.113.0/24", "documentation (TEST-NET-3)", False),
        ("192.88.99.0/24", "6to4 relay anycast (deprecated)", False),
        ("198.18.0.0/15", "benchmarking (RFC 2544)", False),
        ("240.0.0.0/4", "reserved (240.0.0.0/4)", False),
    ]
)
BLOCKS_V6 = _table(
    [
        ("::/128", "unspecified address", True),
        ("::1/128", "loopback", True),
        ("fe80::/10", "link-local", True),
        ("ff00::/8", "multicast", True),
        ("fd00:ec2::/32", "cloud metadata service (AWS)", True),
        ("fd20:ce::254/128", "cloud metadata service (Google)", True),
        ("fd00:c1::a9fe:a9fe/128", "cloud metadata service (Oracle)", True),
        ("fd00:42::42/128", "cloud metadata service (Scaleway)", True),
        ("fd00:a9fe:a9fe::1/128", "cloud metadata service (Akamai)", True),
        ("fd00:100::100:200/128", "cloud metadata service (Alibaba)", True),
        ("fc00::/7", "unique local (ULA)", False),
        ("fec0::/10", "site-local (deprecated)", False),
        ("64:ff9b:1::/48", "NAT64 local-use (RFC 8215)", False),
        ("100::/64", "discard-only", False),
        ("2001:db8::/32", "documentation", False),
        ("3fff::/20", "documentation", False),
        ("2001::/32", "Teredo", False),
        ("2001::/23", "IETF protocol assignments", False),
        ("2002::/16", "6to4", False),
        ("5f00::/16", "segment routing (SRv6)", False),
    ]
)
GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address is delivered to, and the form that carries it:
    mapped and translated (the host's own stack), IPv4-compatible (deprecated, tunnels),
    NAT64 (a gateway translates), 6to4 and Teredo (relays)."""
    n = int(address)
    low = ipaddress.IPv4Address(n & 0xFFFFFFFF)
    if address.ipv4_mapped is not None:
        return "IPv4-mapped", address.ipv4_mapped
    if n >> 32 == 0xFFFF0000:
        return "IPv4-translated", low
    if n >> 32 == 0 and n > 1:
        return "IPv4-compatible", low
    if address in NAT64 or address in NAT64_LOCAL:
        return "NAT64", low
    if address.sixtofour is not None:
        return "6to4", address.sixtofour
    if address.teredo is not None:
        server, client = (
            address.teredo
        )  # packets go to the client via the server (a relay): check both
        return "Teredo", client if block(client) is not None or block(server) is None else server
    return None


def block(address: IPAddress) -> Block | None:
    """The range ``address`` lies in if it is not a public internet address (None: it is)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = embedded_ipv4(address)
        if embedded is not None:
            form, v4 = embedded
            inner = block(v4)
            if inner is not None:  # the carried address decides, and never earns a carve-out
                label = (
                    inner.label if form == "IPv4-mapped" else f"{inner.label} ({v4} in {form} form)"
                )
                return Block(ipaddress.ip_network(address), label, True)
            if form in ("IPv4-mapped", "NAT64") and address not in NAT64_LOCAL:
                return None  # delivered to a public IPv4 address
    for b in BLOCKS_V4 if address.version == 4 else BLOCKS_V6:
        if address in b.network:
            return b
    if isinstance(address, ipaddress.IPv6Address) and address not in GLOBAL_UNICAST_V6:
        return Block(
            ipaddress.ip_network((address, 8), strict=False), "reserved (outside 2000::/3)", False
        )
    if not address.is_global:
        return Block(ipaddress.ip_network(address), "not globally reachable", False)
    return None


def refusal(address: IPAddress, port: int, rules: tuple[Rule, ...]) -> str | None:
    """Why the proxy won't connect to ``address`` on ``port`` (None: it may). A name
    rule never opens a blocked range; an IP or CIDR rule for that port does, if it lies
    within the range (``10.0.0.0/8:443`` opens 10/8, ``0.0.0.0/0:443`` opens none)."""
    b = block(address)
    if b is not None and b.always:
        return f"{b.label}: never reachable through the proxy"
    own = [address]
    if (
        isinstance(address, ipaddress.IPv6Address)
        and (embedded := embedded_ipv4(address)) is not None
    ):
        own.append(embedded[1])
    if any(_is_own_address(a) for a in own):  # whatever range it is in, and whatever the rules
        return "one of this host's own addresses: never reachable through the proxy"
    if b is not None and not any(
        r.network is not None
        and r.port == port
        and address in r.network
        and r.network.version == b.network.version
        and r.network.subnet_of(b.network)  # type: ignore[arg-type]
        for r in rules
    ):
        return f"{b.label}: reachable only through an IP or CIDR rule within {b.network}"
    return None


def _is_own_address(address: IPAddress) -> bool:
    """True if ``address`` is configured on this host: binding to it only succeeds then
    (always current, no interface list to keep)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.bind((str(address), 0))
        return True
    except OSError as e:
        return e.errno != errno.EADDRNOTAVAIL and e.errno != errno.EINVAL
    finally:
        s.close()


class Resolver:
    """Names to addresses, for the proxy only. ``hosts`` (hive.toml ``[egress] hosts``)
    is consulted first, like /etc/hosts."""

    def __init__(self, hosts: dict[str, str] | None = None) -> None:
        self.hosts = {
            k.lower().rstrip("."): ipaddress.ip_address(v) for k, v in (hosts or {}).items()
        }

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        # Logged: a lookup is itself a message out, so the log shows every one made.
        if host in self.hosts:
            log.info("egress: looking up %s for port %d (hive.toml hosts)", host, port)
            return [self.hosts[host]]
        log.info("egress: looking up %s for port %d (DNS)", host, port)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise Refusal(502, f"cannot resolve {host}: {e}") from None
        out: list[IPAddress] = []
        for info in infos:
            a = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if a not in out:
                out.append(a)
        return out


def check(rules: tuple[Rule, ...], host: str, port: int, resolver: Resolver) -> list[IPAddress]:
    """The addresses the proxy may connect to for ``host:port``; Refusal otherwise.
    A name is looked up only if a name rule covers it on that port: a lookup is
    itself a message out (to whoever serves the name's zone), so a name no rule
    covers is refused before any resolver hears of it."""
    try:
        name, literal = destination(host, port)
    except RuleError as e:
        raise Refusal(400, str(e)) from None
    if literal is not None:
        if not any(r.matches_address(literal, port) for r in rules):
            raise Refusal(403, f"{_show(name, port)} is not in this agent's egress allowlist")
        addresses = [literal]
    else:
        if not any(r.matches_name(name, port) for r in rules):
            raise Refusal(
                403,
                f"{_show(name, port)} is not in this agent's egress allowlist"
                " (no name rule covers it; not looked up)",
            )
        addresses = resolver.resolve(name, port)
        if not addresses:
            raise Refusal(502, f"cannot resolve {name}: no addresses")
    for a in addresses:
        why = refusal(a, port, rules)
        if why is not None:
            raise Refusal(403, f"{_show(name, port)} resolves to {a}, {why}")
    return addresses


def l7_only_names(rules: tuple[Rule, ...], port: int) -> frozenset[str]:
    """The names with L7 rules on ``port`` and no plain rule there (l7_by_address's set):
    a tunnel on that port must not carry TLS to one of them."""
    plain = {r.name for r in rules if not r.l7 and r.name is not None and r.port == port}
    return frozenset(r.name for r in rules if r.l7 and r.port == port and r.name) - plain


# What the log row of a connection ``revalidate`` ended says after its reason.
ENDED = " (ended: the agent's egress rules changed)"
ENDED_STOPPED = " (ended: the agent stopped)"


def _end(o: _Open, decision: Decision, why: str = ENDED) -> None:
    """Both sockets shut down, from another thread than the one relaying them, and the
    decision's log row (written when the relay ends) saying why. The plain socket's
    shutdown, never SSLSocket's: that drops its TLS object first, and a send racing it
    went out in cleartext, an injected secret with it (red team of session 15)."""
    if not decision.reason.endswith((ENDED, ENDED_STOPPED)):
        decision.reason += why
    for sock in o.sockets:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
    if o.wake is not None:
        o.wake()


def still_allowed(rules: tuple[Rule, ...], host: str, port: int, address: IPAddress) -> bool:
    """Whether ``rules`` would allow a connection to ``host:port`` at ``address`` (one the
    proxy made): ``check`` without a lookup (the address is the one connected to)."""
    try:
        name, literal = destination(host, port)
    except RuleError:
        return False
    if literal is not None:
        covered = any(r.matches_address(literal, port) for r in rules)
    else:
        covered = any(r.matches_name(name, port) for r in rules)
    return covered and refusal(address, port, rules) is None


def l7_by_address(
    rules: tuple[Rule, ...], host: str, port: int, addresses: list[IPAddress], resolver: Resolver
) -> None:
    """Refuse an address (an IP literal) that a name with L7 rules on ``port`` resolves
    to: an address rule (which a private address needs beside the L7 rules) would make
    it a byte tunnel, TLS to the name inside, and no request of it checked. Those names
    are the operator's, so looking them up tells no one anything the agent chose."""
    if destination(host, port)[1] is None:
        return
    for name in sorted(l7_only_names(rules, port)):
        try:
            theirs = resolver.resolve(name, port)
        except Refusal:
            continue
        if set(theirs) & set(addresses):
            raise Refusal(
                403,
                f"{_show(host, port)} is {name}'s address, which has L7 rules: reach it by"
                " name (the proxy checks each request inside its TLS)",
            )


TLS_RECORD_MAX = 5 + (1 << 14) + 2048  # a record's header, its largest body, slack


def client_hello_sni(record: bytes) -> str | None:
    """The server name a TLS ClientHello in ``record`` (one whole record) asks for; None
    if it names none. ValueError if it is a handshake record but not one whole
    ClientHello (split over records, a way to hide the name from this reader)."""
    body = record[5 : 5 + int.from_bytes(record[3:5], "big")]
    if len(body) < 4 or body[0] != 1 or 4 + int.from_bytes(body[1:4], "big") > len(body):
        raise ValueError("not one whole ClientHello in the first TLS record")
    hello = body[4 : 4 + int.from_bytes(body[1:4], "big")]
    i = 2 + 32
    i += 1 + hello[i] if i < len(hello) else 0  # session id
    i += 2 + int.from_bytes(hello[i : i + 2], "big")  # cipher suites
    i += 1 + hello[i] if i < len(hello) else 0  # compression methods
    end = min(len(hello), i + 2 + int.from_bytes(hello[i : i + 2], "big"))
    i += 2
    while i + 4 <= end:
        kind, size = (
            int.from_bytes(hello[i : i + 2], "big"),
            int.from_bytes(hello[i + 2 : i + 4], "big"),
        )
        i += 4
        if kind == 0:  # server_name: list length, name type, name length, name
            name = hello[i + 5 : i + 5 + int.from_bytes(hello[i + 3 : i + 5], "big")]
            return name.decode("ascii", "replace").lower().removesuffix(".")
        i += size
    return None


def fronted_l7_name(rules: tuple[Rule, ...], host: str, port: int, first: bytes) -> str | None:
    """Why a byte tunnel to ``host:port`` whose client sent ``first`` (its first TLS
    record) is refused, or None: its SNI names another name that has L7 rules on this
    port (TLS to it inside another allowed name's tunnel: domain fronting)."""
    plain = {r.name for r in rules if not r.l7 and r.name is not None and r.port == port}
    l7 = {r.name for r in rules if r.l7 and r.port == port and r.name} - plain
    if not l7 or not first or first[0] != 0x16:
        return None
    try:
        sni = client_hello_sni(first)
    except ValueError as e:
        return f"{e} (this agent has L7 rules on port {port})"
    if sni is not None and sni in l7 and sni != host:
        return (
            f"TLS to {sni} (which has L7 rules) inside a tunnel to {_show(host, port)}:"
            f" connect to {sni} itself"
        )
    return None


def _first_record(conn: socket.socket, have: bytes, deadline: float) -> bytes:
    """At least the client's first TLS record (5-byte header and body), or what came
    before the deadline or the end."""
    data = have
    while True:
        if len(data) >= 5 and (
            data[0] != 0x16 or len(data) >= 5 + int.from_bytes(data[3:5], "big")
        ):
            return data
        if len(data) >= TLS_RECORD_MAX:
            return data
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = conn.recv(TLS_RECORD_MAX - len(data))
        except TimeoutError:
            return data
        if not chunk:
            return data
        data += chunk


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def handover_path(path: Path) -> Path:
    """The handover socket beside egress socket ``path``: ``egress.sock`` →
    ``egress-handover.sock`` (the cage's ``layout.EGRESS_HANDOVER_SOCKET``)."""
    return path.with_name(f"{path.stem}-handover.sock")


def _receive(conn: socket.socket, deadline: float, handover: bool) -> tuple[socket.socket, bytes]:
    """The client: the connection itself (a request sent straight to egress.sock), or
    the TCP connection the cage's bridge handed over on egress-handover.sock. Returns it
    and any request bytes already read.

    Descriptors come only on the handover socket, in its one message, read with room for
    one (what else it carries the kernel drops, watched); the connection is then closed
    with anything queued behind it (``received_fds.let_go``). egress.sock
    refuses them from its listener on (``bind_listener``: a peer's ``sendmsg`` gets EPERM),
    so none can wait in a direct request's queue behind a relay whose upstream stopped
    reading (red team round 30: a harness's page pair, six of root's, kept past the
    harness's death).
    That replaces session 27's peek through a direct request's queue (two re-checks broke
    its first forms)."""
    conn.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        if not handover:
            oob_inline(conn)
            return conn, conn.recv(65536)
        # The wait for the message unwatched (a silent peer would be nudged 50 times a
        # second until the deadline); the read watched: room for one, and what else the
        # message carries the kernel drops in this thread (a lingering TCP socket's last
        # close waits; received_fds). At most one descriptor in the core's table a read
        # (room for 253 took that many).
        poller = select.poll()  # not select(2): the core's descriptors pass 1,023
        poller.register(conn, select.POLLIN)
        if not poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            raise TimeoutError
        with received_fds.watched():
            data, fds, flags, _ = socket.recv_fds(
                conn, 65536, 1, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
            )
    except TimeoutError:
        raise Refusal(408, f"request head not complete within {HEAD_TIMEOUT:.0f} s") from None
    for fd in fds:
        # Python 3.11's recv_fds drops its flags (CPython gh-107898): close-on-exec here.
        # hive-core starts no process, so nothing can inherit them meanwhile.
        os.set_inheritable(fd, False)
    try:
        if (
            data != HANDOVER
            or len(fds) != 1
            or flags & socket.MSG_CTRUNC
            or not stat.S_ISSOCK(os.fstat(fds[0]).st_mode)
        ):
            raise Refusal(
                400, "a handed-over connection is one stream socket with the handover byte"
            )
        client = socket.socket(fileno=fds.pop())
    finally:
        received_fds.close_received(fds)
    # TCP only, what the bridge hands over: a unix stream's peer could send descriptors
    # into it that wait there, in flight, behind a relay its upstream stalls (red team
    # round 30).
    families = (socket.AF_INET, socket.AF_INET6)
    if client.type != socket.SOCK_STREAM or client.family not in families:
        received_fds.close_received([client.detach()])
        raise Refusal(400, "a handed-over connection must be a TCP stream socket")
    # Connected, not a listener: a harness handing its bridge listener over left a copy
    # in the core that outlived the harness and took a share of the next one's
    # connections (re-check of session 24).
    try:
        listening = client.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        client.getpeername()
    except OSError:
        listening = 1
    if listening:
        received_fds.close_received([client.detach()])
        raise Refusal(400, "a handed-over connection must be a connected socket")
    received_fds.let_go(conn)  # with what the peer queued behind the handover
    oob_inline(client)
    return client, b""


def _read_head(
    conn: socket.socket, first: bytes, deadline: float, meter: egress_tls.CpuMeter | None = None
) -> tuple[bytes, bytes]:
    """The request head (up to the blank line) and whatever came after it, all
    within one deadline (a client sending a byte at a time gets no longer). Each read
    looks for the blank line only in what it added (and the 3 bytes before), and
    ``meter`` charges the reads every PACE_EVERY of them: a head sent a byte at a
    time and refused held the core at 1.5 CPUs, uncharged and each read searching the
    whole head again (red team of session 21)."""
    buf = bytearray(first)
    end = buf.find(b"\r\n\r\n")
    reads = 0
    while end < 0:
        if len(buf) > MAX_HEAD:
            raise Refusal(431, f"request head over {MAX_HEAD} bytes")
        if time.monotonic() > deadline:
            raise Refusal(408, f"request head not complete within {HEAD_TIMEOUT:.0f} s")
        reads += 1
        if meter is not None and reads % PACE_EVERY == 0:
            meter.pace()
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            raise Refusal(408, f"request head not complete within {HEAD_TIMEOUT:.0f} s") from None
        if not chunk:
            raise Refusal(400, "connection closed before a complete request")
        start = max(0, len(buf) - 3)
        buf += chunk
        end = buf.find(b"\r\n\r\n", start)
    if end > MAX_HEAD:
        raise Refusal(431, f"request head over {MAX_HEAD} bytes")
    conn.settimeout(None)
    return bytes(buf[:end]), bytes(buf[end + 4 :])


@dataclass
class Request:
    method: str
    host: str  # as shown and checked (destination()'s first part)
    port: int
    forward: bytes | None  # the head to send upstream (plain HTTP); None for CONNECT
    host_header: str | None = None  # the client's Host (plain HTTP), checked against host:port


_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # in a field value: all but HTAB (RFC 9110 5.5)


def _headers(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The header lines as (name, value), strictly: a folded line, a name with spaces
    (``Host : x``) or no colon is a 400, so no header is read one way here and
    another way upstream (RFC 9112 5.1, 5.2)."""
    out = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise Refusal(400, "malformed header line (obsolete folding, or a bad header name)")
        value = value.strip(b" \t")
        if _CONTROL.search(value):
            raise Refusal(400, "a control character in a header value")
        out.append((name, value))
    return out


def _authority(authority: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; RuleError otherwise."""
    if authority.startswith("[") and authority.endswith("]"):
        return authority[1:-1], default_port
    if authority.startswith("[") or authority.count(":") == 1:
        host, port_text = split_host_port(authority)
        return host, parse_port(port_text)
    if ":" in authority:
        raise RuleError(f"an IPv6 address needs brackets: {authority[:80]!r}")
    return authority, default_port


def _host_value(host: str, port: int) -> bytes:
    """The Host header for a request the proxy forwards to ``host:port`` (checked)."""
    literal = destination(host, port)[1]
    shown = host if literal is None else (f"[{literal}]" if literal.version == 6 else str(literal))
    return (shown if port == 80 else f"{shown}:{port}").encode()


def parse_request(head: bytes) -> Request:
    lines = head.split(b"\r\n")
    # A bare CR or LF ends a line for some servers and not for us: a second Host (or a
    # request line of its own) would reach the server past the check (red team round 22).
    if any(b"\r" in line or b"\n" in line for line in lines):
        raise Refusal(400, "a bare CR or LF in the request head")
    try:
        method, target, version = lines[0].decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise Refusal(400, "malformed request line") from None
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise Refusal(400, f"unsupported protocol {version[:20]!r}")
    if not _TOKEN.match(method.encode()):
        raise Refusal(400, "malformed request line (the method is not a token)")
    if _CONTROL.search(target.encode()) or "\t" in target:
        raise Refusal(400, "a control character in the request target")
    headers = _headers(lines[1:])
    if method == "CONNECT":
        # The tunnel goes to the authority on the request line; a Host header is not
        # read, checked or forwarded (the bytes in the tunnel are the client's own).
        try:
            host, port_text = split_host_port(target)
            port = parse_port(port_text)
            return Request(method, destination(host, port)[0], port, None)
        except RuleError as e:
            raise Refusal(400, f"CONNECT target: {e}") from None
    if not target.startswith("http://"):
        raise Refusal(
            400, "only CONNECT, or plain HTTP with an absolute http:// URI, goes through this proxy"
        )
    rest = target[len("http://") :]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, path = rest[:end], rest[end:]
    if (
        "@" in authority
    ):  # http://allowed.test@evil.test/: which host is meant depends on the reader
        raise Refusal(400, "URI: userinfo (user@host) is not accepted by this proxy")
    try:
        host, port = _authority(authority, 80)
        host = destination(host, port)[0]  # only a valid name or address is ever logged
    except RuleError as e:
        raise Refusal(400, f"URI: {e}") from None
    hosts = [v for n, v in headers if n.lower() == b"host"]
    if len(hosts) > 1:
        raise Refusal(400, "more than one Host header")
    # The forwarded request names the destination that was checked, and only it: the
    # client's Host (if any) is compared with it in check_host_header, then replaced.
    kept = [
        n + b": " + v for n, v in headers if n.lower() not in HOP_HEADERS and n.lower() != b"host"
    ]
    if not path.startswith("/"):
        path = "/" + path
    request_line = f"{method} {path} {version}".encode()
    forward = b"\r\n".join(
        [request_line, b"Host: " + _host_value(host, port), *kept, b"Connection: close"]
    )
    return Request(
        method,
        host,
        port,
        forward + b"\r\n\r\n",
        hosts[0].decode("ascii", "replace") if hosts else None,
    )


def check_host_header(req: Request) -> None:
    """A plain-HTTP request whose Host names another server than its URI is refused,
    not rewritten: the client asked for that other virtual host (on a shared address,
    a CDN, a reverse proxy), and sending it the allowed one instead would answer a
    question it did not ask; the refusal, logged, shows what was tried."""
    if req.forward is None or req.host_header is None or req.host_header == "":
        return
    try:
        host, port = _authority(req.host_header, 80)
        name, literal = destination(host, port)
        want_name, want_literal = destination(req.host, req.port)
    except RuleError:
        raise Refusal(400, f"malformed Host header {req.host_header[:80]!r}") from None
    same = (
        (literal == want_literal)
        if literal is not None or want_literal is not None
        else name == want_name
    )
    if not same or port != req.port:
        raise Refusal(
            403,
            f"Host header {req.host_header[:80]!r} is not the destination "
            f"{_show(req.host, req.port)}: a request goes only to the host its URI names",
        )


def _reply(conn: socket.socket, status: int, reason: str) -> None:
    text = {
        400: "Bad Request",
        403: "Forbidden",
        408: "Request Timeout",
        431: "Request Header Fields Too Large",
        502: "Bad Gateway",
        503: "Service Unavailable",
    }.get(status, "Error")
    body = f"hive egress: {reason}\n".encode()
    try:
        conn.sendall(
            f"HTTP/1.1 {status} {text}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
    except OSError:
        pass


def _log_stranger(key: tuple[str, int], refused: int) -> None:
    log.warning(
        "egress %s: refused %d connection(s) of uid %d on its socket", *key[:1], refused, key[1]
    )


def _refuse_unread(
    conn: socket.socket,
    status: int,
    reason: str,
    listeners: tuple[socket.socket, ...],
    handover: bool = False,
) -> None:
    """Refuse before reading the request, but first take what the client sends (one read,
    within ``REFUSE_READ`` s), so that its own write of the request does not meet a closed
    socket (EPIPE) and lose the reply: a client that connects at the cap and is slow to
    write (descheduled, say) reads its 503. The wait ends at once when the agent's
    ``listeners`` (either of its two) has another connection waiting: a flood of silent
    connections is refused at the pace it comes, not one a second. A direct request's read
    is a plain one (egress.sock takes no descriptors); a handover's too, watched, with no
    room for descriptors: the kernel drops what its message carries in this thread, in
    one run (nothing of it enters the core's table; what it queued after that message,
    its close lets go of: ``received_fds.let_go``)."""
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    for listener in listeners:
        if listener.fileno() >= 0:  # -1: closed meanwhile (a stop)
            poller.register(listener.fileno(), select.POLLIN)
    ready = {fd for fd, _ in poller.poll(REFUSE_READ * 1000)}
    if conn.fileno() in ready:
        with received_fds.watched() if handover else contextlib.nullcontext():
            try:
                conn.recv(65536, socket.MSG_DONTWAIT)
            except OSError:
                pass
    _reply(conn, status, reason)


def oob_inline(sock: socket.socket) -> None:
    """A client's out-of-band byte read as data, in its place. Left out of band, one
    pending byte made the socket poll readable while a read found nothing: each wait for
    the client (a head, a TLS record, a linger) spun until its timeout, a byte at a time
    in lockstep, at 4-6 times the agent's CPU share (re-check of session 34; MSG_OOB on a
    unix socket since Linux 5.15, TCP's urgent byte likewise)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    except OSError:
        pass  # (a kernel whose unix sockets have no out-of-band data: nothing to read)


def _linger(conn: socket.socket, meter: egress_tls.CpuMeter) -> None:
    """After the refusal of a request whose body may still be coming: the refusal ended by
    our side's shutdown for writing, then what the client sends read and dropped until its
    end, ``LINGER_WAIT`` s of silence or ``LINGER_TIME`` in all (nginx's lingering close).
    A close over unread input is a reset, which can take the refusal from the client
    before it reads it: a refused upload saw "connection reset", not why. (``conn`` is the
    request's own connection or the TCP one a handover brought: neither carries
    descriptors.) The reads' CPU is the agent's, paced as its uploads are."""
    end = time.monotonic() + egress_tls.LINGER_TIME
    try:
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        return
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    idle = 0
    while (left := end - time.monotonic()) > 0:
        if not poller.poll(round(min(egress_tls.LINGER_WAIT, left) * 1000)):
            return
        try:
            if not conn.recv(65536, socket.MSG_DONTWAIT):
                return
            idle = 0
        except BlockingIOError:  # readable, and nothing to read: twice in a row ends it
            idle += 1
            if idle >= 2:
                return
        except OSError:
            return
        meter.pace()


class _Opening(threading.Thread):
    """The upstream of a terminated connection: TCP to the first address that answers,
    then TLS with the server's certificate verified; ``result`` is the socket and the
    address, or the Refusal saying why not. ``opened(address)`` is called as soon as it is
    ready (the decision is logged then, while the cage is still in its handshake)."""

    def __init__(
        self,
        proxy: EgressProxy,
        addresses: list[IPAddress],
        plan: Plan,
        opened: Callable[[IPAddress], None],
    ) -> None:
        super().__init__(name="egress-upstream", daemon=True)
        self.proxy, self.addresses, self.plan, self.opened = proxy, addresses, plan, opened
        self.result: tuple[ssl.SSLSocket, IPAddress] | Refusal | None = None
        self.cpu = 0.0  # this thread's CPU (the upstream's handshake), charged to the agent

    def run(self) -> None:
        started = time.thread_time()
        try:
            sock, address = self.proxy._connect(self.addresses, self.plan.port)
            self.result = (self.proxy._upstream_tls(sock, self.plan), address)
            self.opened(address)
        except Refusal as e:
            self.result = e
        except Exception as e:  # a bug costs this connection only
            log.exception("egress: upstream %s:%d failed", self.plan.host, self.plan.port)
            self.result = Refusal(502, f"{self.plan.host}:{self.plan.port}: {type(e).__name__}")
        finally:
            self.cpu = time.thread_time() - started


class EgressProxy:
    """``rules_for(agent)`` gives the agent's current rules (read from any thread);
    ``record(decision)`` is called in the event loop for every decision and close."""

    def __init__(
        self,
        rules_for: Callable[[str], tuple[Rule, ...]],
        record: Callable[[Decision], None],
        resolver: Resolver | None = None,
        max_connections: int = 64,
        plan_for: Callable[[str, str, int, tuple[Rule, ...]], Plan | None] | None = None,
        ca: HiveCA | None = None,
        upstream_tls: ssl.SSLContext | None = None,
        connections_per_second: float = 0.0,
        cpu: egress_tls.CpuPacer | None = None,
        stall_seconds: int = UPSTREAM_STALL,
    ) -> None:
        self.rules_for = rules_for
        self.stall_seconds = stall_seconds  # a relayed write with no room that long ends it
        # What connections' threads may spend of the core's CPU (egress_tls.CpuPacer).
        self.cpu = cpu
        # TLS termination (core/egress_tls.py): which destinations get it, and how.
        self.plan_for = plan_for
        self.ca = ca
        self.upstream_tls = upstream_tls
        # The last TLS session per upstream name: resumed, it saves the next handshake's
        # certificate check (a ticket the server issued to the proxy, never to a cage).
        self._sessions: dict[tuple[str, int], ssl.SSLSession] = {}
        # Idle upstream connections, per agent (egress_pool.py), as many as its budget counts.
        self._pool = UpstreamPool(pool_size(max_connections))
        self.record = record
        self.resolver = resolver or Resolver()
        self.max_connections = max_connections  # per agent, at once
        # Each agent's two listeners: egress.sock (direct requests) and its handover socket.
        self._listeners: dict[str, _Listeners] = {}
        self._allowed: dict[str, frozenset[int]] = {}
        self._active: dict[str, int] = {}
        # Connections accepted whose thread has not ended, per agent: at most
        # max_connections + EGRESS_REFUSING; past that the listener waits (the kernel's
        # backlog holds the rest), so refusals can't pile up descriptors (see budget).
        self._live: dict[str, int] = {}
        self._waiting: set[str] = set()  # listeners not read until a thread ends
        self._dropping: set[str] = set()  # agents with a handover at the cap being dropped
        # Connections accepted per agent and second (0: no bound), a burst of twice that:
        # each is a thread, a parse, a decision and its log row, and a cage connecting as
        # fast as it can held a core's worth of CPU with refusals (red team round 22).
        # Past it the listener rests; the kernel's backlog holds the rest.
        self.connections_per_second = connections_per_second
        # Each agent's allowed connections while they last: what ``revalidate`` ends when
        # the rules that allowed one are taken back.
        self._open: dict[str, dict[int, tuple[_Open, Decision]]] = {}
        # Each agent's connections' meters, from their thread's start to its end: ``close``
        # wakes them all (one asleep on a debt in its head's read or after its refusal, not
        # only an allowed one: re-check of session 21).
        self._meters: dict[str, set[egress_tls.CpuMeter]] = {}
        # One bucket per listener: with one for both, a flood of direct requests took every
        # token and the handover listener went unread, a parked handover with it (red team
        # of session 28).
        burst = max(1, int(2 * connections_per_second))
        self._accepts = TokenBuckets(connections_per_second, burst=burst)
        self._handover_accepts = TokenBuckets(connections_per_second, burst=burst)
        self._lock = threading.Lock()
        # A host process in the agent's group can connect as fast as it likes: one line
        # per agent and uid every STRANGER_LOG_EVERY seconds, with the count.
        self._stranger_log: LogThrottle[tuple[str, int]] = LogThrottle(
            STRANGER_LOG_EVERY, _log_stranger
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._trust: tuple[float, tuple[tuple[str, bytes], ...]] | None = None

    def set_uids(self, name: str, uids: frozenset[int]) -> None:
        self._allowed[name] = uids

    def listen(self, name: str, path: Path, mode: int) -> None:
        """Serve ``name``'s egress.sock at ``path`` and its handover socket beside it
        (``handover_path``), both with ``mode`` (0660: the agent's group too, with cages;
        0600 without)."""
        if name in self._listeners:
            return
        self._loop = asyncio.get_running_loop()
        if self.ca is not None:
            try:
                self.write_trust(path.parent)
            except OSError as e:  # its TLS through the proxy fails; the agent is served
                log.error(
                    "agent %s: could not write the hive CA where its cage reads it: %s", name, e
                )
        direct = bind_listener(path, mode=mode)  # refuses descriptors
        try:
            handing = bind_listener(
                handover_path(path), mode=mode, backlog=HANDOVER_BACKLOG, descriptors=True
            )
        except BaseException:
            direct.close()
            path.unlink(missing_ok=True)
            raise
        listeners = _Listeners(direct, handing)
        self._listeners[name] = listeners
        for listener in listeners:
            listener.setblocking(False)
            self._loop.add_reader(listener.fileno(), self._accept, name, listener)

    def _trust_files(self) -> tuple[tuple[str, bytes], ...]:
        """What ``write_trust`` writes. The host's bundle is read again after
        ``TRUST_REREAD`` seconds, not for each agent: a restart of the core serves every
        agent's sockets again in a row (a thousand reads of ~200 KiB)."""
        assert self.ca is not None
        now = time.monotonic()
        if self._trust is None or now - self._trust[0] > TRUST_REREAD:
            self._trust = (now, (("hive-ca.pem", self.ca.pem), ("ca-bundle.pem", self.ca.bundle())))
        return self._trust[1]

    def write_trust(self, directory: Path) -> None:
        """The hive CA (and the host bundle with it) where the cage sees them, read-only:
        ``/run/hive/hive-ca.pem`` and ``/run/hive/ca-bundle.pem`` (layout.base_env).
        A file that holds them already (a restart of the core) is left as it is: reading
        it costs a fraction of writing it anew."""
        for name, data in self._trust_files():
            if _holds(directory / name, data):
                continue
            # A name of its own each time: nothing left at a fixed one (a directory, a
            # full file system's half-written file) can stop the next write.
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
            try:
                try:
                    view = memoryview(data)
                    while view:  # a short write (ENOSPC comes on the next one)
                        view = view[os.write(fd, view) :]
                    os.fchmod(fd, 0o644)
                finally:
                    os.close(fd)
                os.replace(tmp, directory / name)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    def close(self, name: str, path: Path) -> None:
        listeners = self._listeners.pop(name, None)
        if listeners is None:
            return
        for listener in listeners:
            if self._loop is not None:
                self._loop.remove_reader(listener.fileno())
        listeners.direct.close()
        # The handover listener's close drops what its backlog's connections hold, in the
        # closing thread (a lingering socket among it would wait there): not the loop's.
        handover = listeners.handover
        self._off_loop(name, lambda: received_fds.close_listener(handover), "egress-close")
        path.unlink(missing_ok=True)
        handover_path(path).unlink(missing_ok=True)
        self._pool.drop(name)
        self._accepts.forget(name)
        self._handover_accepts.forget(name)
        # Its connections end with it: a relay asleep on a CPU debt would hold its sockets
        # (an upstream's too) for up to a pause, MAX_PAUSE (red team of session 21), and
        # every thread of its connections stops pausing.
        with self._lock:
            live = list(self._open.get(name, {}).values())
            meters = list(self._meters.get(name, ()))
        for opened, decision in live:
            _end(opened, decision, ENDED_STOPPED)
        for meter in meters:
            meter.wake()

    def close_all(self, paths: Callable[[str], Path]) -> None:
        for name in list(self._listeners):
            self.close(name, paths(name))

    def _track(self, agent: str, decision: Decision, opened: _Open) -> None:
        """``opened`` is live until ``_untrack``; ended at once if the rules changed since
        it was decided (``reload_egress`` swaps the rules before it calls ``revalidate``:
        one of the two sees the other). A terminated connection is not: its ``replan``
        asks before its first request, and answers the cage a 403. Called inside the
        ``try`` whose ``finally`` untracks it."""
        with self._lock:
            self._open.setdefault(agent, {})[decision.key] = (opened, decision)
        if opened.kind != "terminated" and not self._allows_or_not(agent, opened):
            _end(opened, decision)

    def _untrack(self, agent: str, decision: Decision) -> None:
        with self._lock:
            live = self._open.get(agent)
            if live is not None:
                live.pop(decision.key, None)
                if not live:
                    del self._open[agent]

    def _allows(self, agent: str, o: _Open) -> bool:
        """Whether ``agent``'s rules now would make connection ``o`` as it is: the
        destination still allowed, and the same kind of connection: a byte tunnel (or a
        plain relay) neither to a destination now terminated for L7 rules or a binding nor
        on a port where a name got L7 rules since (it may carry TLS to that name: fronting,
        an IP literal); a terminated connection whose L7 rules are still those of the plan
        it runs under (a request in flight, an endless upload, was checked against them;
        its bindings are asked again at its next request)."""
        now = self._rules_and_plan(agent, o.host, o.port, o.address)
        if now is None:
            return False
        rules, plan = now
        if o.kind == "terminated":
            current = None if o.current is None else o.current()
            return plan is not None and current is not None and plan.rules == current.rules
        if not l7_only_names(rules, o.port) <= o.l7_names:
            return False
        if o.kind == "tunnel":
            return plan is None
        return plan is None or plan.rules is None

    def _rules_and_plan(
        self, agent: str, host: str, port: int, address: IPAddress
    ) -> tuple[tuple[Rule, ...], Plan | None] | None:
        """``agent``'s rules now and the plan they give ``host:port`` (None: no
        termination), or None if they no longer allow it at all."""
        rules = self.rules_for(agent)
        if not still_allowed(rules, host, port, address):
            return None
        return rules, None if self.plan_for is None else self.plan_for(agent, host, port, rules)

    def _allows_or_not(self, agent: str, o: _Open) -> bool:
        """``_allows``, closed on any failure: a check that raised (EMFILE in the own-address
        check, say) ends the connection, never lets it on (red team of session 15)."""
        try:
            return self._allows(agent, o)
        except Exception:
            log.exception("egress %s: checking an open connection failed; ending it", agent)
            return False

    def revalidate(self, agent: str) -> int:
        """``agent``'s rules changed: end its open connections (tunnels, plain HTTP,
        terminated TLS) that they would not make now (``_allows``), both sockets shut down
        so the thread relaying them ends (red team round 22: a tunnel outlived the rule that
        opened it, with no idle timeout). How many were ended. Each checked on its own: one
        that fails is ended, the others are checked all the same."""
        with self._lock:
            live = list(self._open.get(agent, {}).values())
        gone = [(o, d) for o, d in live if not self._allows_or_not(agent, o)]
        for o, d in gone:
            _end(o, d)
        if gone:
            log.info(
                "egress %s: ended %d open connection(s) its rules no longer allow", agent, len(gone)
            )
        return len(gone)

    def _accept(self, name: str, listener: socket.socket) -> None:
        """One connection accepted and its thread started, in the loop: what that costs the
        loop is charged to the agent too (``_charge_loop``)."""
        started = time.thread_time()
        try:
            self._accept_one(name, listener)
        finally:
            self._charge_loop(name, started)

    def _charge_loop(self, agent: str, started: float) -> None:
        """The loop's CPU since ``started`` on ``agent``'s behalf, taken from its share: a
        cage opening connections as fast as it can cost the loop ~0.08 CPUs uncharged
        beside a share of 0.1 (red team of session 21)."""
        if self.cpu is not None:
            self.cpu.charge(agent, time.thread_time() - started)

    def _rest(self, name: str, only: socket.socket | None = None) -> None:
        """``name``'s listeners (or ``only``) are not read until ``_read_again``."""
        listeners = self._listeners.get(name)
        if listeners is not None and self._loop is not None:
            for listener in listeners if only is None else (only,):
                self._loop.remove_reader(listener.fileno())

    def _accept_one(self, name: str, listener: socket.socket) -> None:
        listeners = self._listeners.get(name)
        handover = listeners is not None and listener is listeners.handover
        with self._lock:
            at_cap = self._live.get(name, 0) >= self.max_connections + EGRESS_REFUSING
            if at_cap and (not handover or name in self._dropping):
                # A handover waits too while the agent's one drop is under way.
                self._waiting.add(name)
                self._rest(name, only=listener)
                return
            bucket = self._handover_accepts if handover else self._accepts
            if (wait := bucket.wait(name)) > 0:
                self._rest(name, only=listener)
                if self._loop is not None:
                    self._loop.call_later(wait, self._read_again, name, listener)
                return
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                return
            except OSError as e:  # EMFILE, say: the connection waits in the backlog
                if self._loop is not None:
                    self._rest(name)
                    rest_listener(
                        self._loop, listener, lambda: self._read_again(name), f"egress {name}", e
                    )
                return
            if at_cap:
                # A handover at the cap is dropped unread: left in the backlog it would hold
                # whatever its peer queued (descriptors in flight: a harness's page pair with
                # root's on it) for as long as the agent's connections last, a tunnel to an
                # upstream that never reads for good. The bridge closes the runtime's
                # connection: the same end a 503 to the bridge had. In a thread of its own,
                # one an agent: what it lets go of may be a lingering socket, whose close
                # must never be the event loop's (received_fds).
                self._dropping.add(name)
            else:
                self._live[name] = self._live.get(name, 0) + 1
        if at_cap:
            self._off_loop(name, lambda: self._drop(name, conn), f"egress-drop-{name}")
            return
        conn.setblocking(True)
        try:
            threading.Thread(
                target=self._serve_counted,
                args=(name, conn, handover),
                name=f"egress-{name}",
                daemon=True,
            ).start()
        except RuntimeError as e:  # no thread to be had (TasksMax): this one is refused
            log.warning("egress %s: connection refused: %s", name, e)
            if handover:
                self._off_loop(name, lambda: self._drop(name, conn, refused=True), "egress-drop")
            else:
                conn.close()
                self._release_slot(name)

    def _off_loop(self, name: str, work: Callable[[], None], thread: str) -> None:
        """``work``, letting go of what ``name`` handed over, in a thread of its own acting
        for ``name``: never in the event loop, whose thread a close that waits would
        freeze (a lock the agent's cage holds: a sleep no nudge ends), and never for
        nobody, so that the watchdog lays such a wait at the agent's cage (restarted; at
        the core's exit, stopped: red team re-check of session 29, a listener's close
        acting for nobody left the core unreaped and `hive up` stopped every cage). No
        thread to be had: tried again shortly."""

        def run() -> None:
            with received_fds.acting_for(name):
                work()

        try:
            threading.Thread(target=run, name=thread, daemon=True).start()
        except RuntimeError:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_later(OFF_LOOP_RETRY, self._off_loop, name, work, thread)
            else:
                run()  # no loop to come back to: here, as a last resort

    def _drop(self, name: str, conn: socket.socket, refused: bool = False) -> None:
        """A handover taken at the cap, let go of unread (in its thread); ``refused``: one
        taken below the cap that no thread could be had for (its slot given back)."""
        try:
            received_fds.let_go(conn)
        finally:
            if refused:
                self._release_slot(name)
            else:
                self._dropped(name)

    def _dropped(self, name: str) -> None:
        with self._lock:
            self._dropping.discard(name)
            self._waiting.discard(name)
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is shutting down
                self._loop.call_soon_threadsafe(self._read_again, name)

    def _serve_counted(self, name: str, conn: socket.socket, handover: bool) -> None:
        try:
            with received_fds.acting_for(name):
                self._serve(name, conn, handover)
        finally:  # every descriptor of this connection closed by now
            self._release_slot(name)

    def _release_slot(self, name: str) -> None:
        """One connection of ``name``'s fewer; a listener paused at the cap reads again."""
        with self._lock:
            self._live[name] -= 1
            if not self._live[name]:
                del self._live[name]
            resume = name in self._waiting
            self._waiting.discard(name)
        if resume and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is shutting down
                self._loop.call_soon_threadsafe(self._read_again, name)

    def _read_again(self, name: str, only: socket.socket | None = None) -> None:
        """``name``'s listeners (or ``only``, if it is still one of them) read again."""
        listeners = self._listeners.get(name)
        if listeners is not None and self._loop is not None:
            # add_reader replaces a reader already there: resuming twice is harmless.
            for listener in listeners:
                if only is None or listener is only:
                    self._loop.add_reader(listener.fileno(), self._accept, name, listener)

    def _emit(self, decision: Decision) -> None:
        snapshot = Decision(**decision.__dict__)
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._record, snapshot)
            except RuntimeError:
                pass  # the loop is shutting down

    def _record(self, decision: Decision) -> None:
        """A decision logged, in the loop, charged to its agent (the row's SQL runs later,
        in the group commit's shared transaction: not charged)."""
        started = time.thread_time()
        try:
            self.record(decision)
        finally:
            self._charge_loop(decision.agent, started)

    def _serve(self, agent: str, conn: socket.socket, handover: bool) -> None:
        # This thread is the connection's own: its CPU from here (the head read and
        # checked, a refusal, a terminated connection's handshakes and relay, or one
        # direction of a tunnel's) is what the connection charges its agent
        # (egress_tls.CpuPacer), as it goes and, whatever the ending, in the ``finally``.
        meter = egress_tls.CpuMeter(self.cpu, agent)
        with self._lock:
            self._meters.setdefault(agent, set()).add(meter)
        upstream: socket.socket | None = None
        counted = False
        try:
            cred = peer_cred(conn)
            waiting = self._listeners.get(agent, ())  # a refusal's wait ends when they queue
            allowed = self._allowed.get(agent)
            if allowed is not None and cred.uid not in allowed:
                self._stranger_log.event((agent, cred.uid))
                _refuse_unread(conn, 403, f"uid {cred.uid} is not agent {agent}", waiting, handover)
                return
            with self._lock:
                if self._active.get(agent, 0) < self.max_connections:
                    self._active[agent] = self._active.get(agent, 0) + 1
                    counted = True
            if not counted:  # refused outside the lock: the refusal waits for the request
                _refuse_unread(
                    conn,
                    503,
                    f"at most {self.max_connections} egress connections at once per agent",
                    waiting,
                    handover,
                )
                return
            received = False
            try:
                deadline = time.monotonic() + HEAD_TIMEOUT
                conn, first = _receive(conn, deadline, handover)
                received = True
                cap_buffers(conn, receive=UPLOAD_BUF, send=UPLOAD_BUF)
                head, rest = _read_head(conn, first, deadline, meter)
                req = parse_request(head)
            except Refusal as e:
                _reply(conn, e.status, e.reason)
                self._emit(Decision(agent, "-", 0, False, e.reason, closed=True))
                if received and e.status != 408:  # (the client's own connection, not silent)
                    _linger(conn, meter)
                return
            decision = Decision(agent, req.host, req.port, False, "")
            plan: Plan | None = None
            try:
                check_host_header(req)
                rules = self.rules_for(agent)
                addresses = check(rules, req.host, req.port, self.resolver)
                l7_by_address(rules, req.host, req.port, addresses, self.resolver)
                if self.plan_for is not None:
                    plan = self.plan_for(agent, req.host, req.port, rules)
                if plan is not None and req.forward is not None and plan.rules is not None:
                    raise Refusal(
                        403,
                        f"{_show(req.host, req.port)} has L7 rules: reachable over HTTPS"
                        " only (the proxy checks each request inside TLS)",
                    )
                if plan is not None and req.forward is not None:
                    plan = None  # plain HTTP goes out as it is: no secret over cleartext
                if plan is not None and rest:
                    raise Refusal(400, "send the TLS handshake after the CONNECT's 200")
                if plan is not None:
                    conn = self._terminate(agent, conn, addresses, plan, decision, meter)
                    return
                upstream, address = self._connect(addresses, req.port)
            except Refusal as e:
                decision.reason, decision.closed = e.reason, True
                _reply(conn, e.status, e.reason)
                self._emit(decision)
                if req.forward is not None:  # a plain request: its body may still be coming
                    _linger(conn, meter)
                return
            decision.allowed, decision.address = True, str(address)
            decision.reason = "CONNECT" if req.forward is None else f"HTTP {req.method}"
            self._emit(decision)
            # Tracked before any byte goes either way (the 200, the head): a rule taken back
            # from here on ends it (a tunnel waiting for its first record, a slow connect
            # outlasted the removal: red team of session 15).
            kind = "tunnel" if req.forward is None else "plain"
            l7_names = l7_only_names(rules, req.port)
            # Each direction's thread charges its CPU (the kernel's splicing too) as it goes,
            # this one's on the connection's meter; a debt is slept off with the slot held.
            meters = (meter.sibling(), meter)
            opened_ = _Open(
                req.host,
                req.port,
                address,
                (conn, upstream),
                kind,
                l7_names,
                wake=meter.wake,
            )
            try:
                self._track(agent, decision, opened_)
                if req.forward is None:
                    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    # (only on a port with L7 rules: a server-speaks-first protocol on
                    # another port must not wait for a ClientHello that never comes)
                    if any(r.l7 and r.port == req.port for r in rules):
                        rest = _first_record(conn, rest, time.monotonic() + HEAD_TIMEOUT)
                        conn.settimeout(None)
                        why = fronted_l7_name(rules, req.host, req.port, rest)
                        if why is not None:
                            decision.allowed, decision.reason, decision.closed = False, why, True
                            self._emit(decision)
                            return
                else:
                    upstream.sendall(req.forward)
                    decision.bytes_up += len(req.forward)
                if rest:
                    upstream.sendall(rest)
                    decision.bytes_up += len(rest)
                up, down = relay(conn, upstream, meters, self.stall_seconds)
            finally:
                self._untrack(agent, decision)
            decision.bytes_up += up
            decision.bytes_down += down
            decision.closed = True
            self._emit(decision)
        except OSError as e:
            log.info("egress %s: connection ended: %s", agent, e)
        except Exception:  # a bug must cost this connection only, never the proxy
            log.exception("egress %s: connection failed", agent)
        finally:
            # Closed before the count drops: a connection that holds more than its own
            # descriptor is always one of the agent's max_connections (the budget's sum).
            if upstream is not None:
                upstream.close()
            if handover and conn.family == socket.AF_UNIX:  # refused before the handover
                received_fds.let_go(conn)
            else:
                received_fds.close_client(conn)
            # A refused connection's CPU too (a head sent a byte at a time, then refused,
            # cost the core 1.5 CPUs uncharged: red team of session 21), slept off with
            # the connection's slot held.
            meter.pace()
            with self._lock:
                mine = self._meters.get(agent)
                if mine is not None:
                    mine.discard(meter)
                    if not mine:
                        del self._meters[agent]
            if counted:
                with self._lock:
                    self._active[agent] -= 1

    def _upstream_tls(self, upstream: socket.socket, plan: Plan) -> ssl.SSLSocket:
        ctx = self.upstream_tls or ssl.create_default_context()
        session = self._sessions.get((plan.host, plan.port))
        try:
            return egress_tls.handshake_upstream(upstream, ctx, plan.host, session)
        except (ssl.SSLError, OSError) as e:
            upstream.close()
            why = getattr(e, "verify_message", None) or getattr(e, "reason", None) or str(e)
            raise Refusal(
                502, f"{plan.host}:{plan.port}: the server's TLS did not verify ({why})"
            ) from None

    def _terminate(
        self,
        agent: str,
        conn: socket.socket,
        addresses: list[IPAddress],
        plan: Plan,
        decision: Decision,
        meter: egress_tls.CpuMeter,
    ) -> socket.socket:
        """Serve one terminated connection; returns the socket to close. The upstream is
        an idle one of this agent's to this destination (egress_pool.py), or is
        connected and its certificate verified in a helper thread while the cage makes
        its TLS handshake with the proxy: the two handshakes overlap instead of adding
        up. Nothing goes upstream before both are done, and a server that can't be
        reached or doesn't verify is the answer to the cage's first request (502).
        ``meter``: the connection's, charged as it goes (the helper thread's CPU too); what
        is left when it ends, however it ends, is charged in ``_serve``'s ``finally``."""
        assert self.ca is not None

        def refuse(reason: str) -> None:
            self._emit(Decision(agent, plan.host, plan.port, False, reason, closed=True))

        def opened(address: IPAddress) -> None:
            decision.allowed, decision.address = True, str(address)
            decision.reason = "CONNECT (TLS terminated)"
            self._emit(decision)

        # The 200 first: the cage starts its handshake while the helper thread starts.
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        pooled = self._pool.take(agent, plan.host, plan.port, addresses)
        opening = _Opening(self, addresses, plan, opened)
        if pooled is None:
            opening.start()
        else:  # an idle connection of this agent's to this destination: no new one
            opening.result = pooled
            opened(pooled[1])
        ctx = self.ca.server_context(plan.host, egress_tls.sni_check(plan.host))
        client: ssl.SSLSocket | None = None
        try:
            client = egress_tls.handshake_client(conn, ctx)
        except (ssl.SSLError, OSError) as e:
            reason = getattr(e, "reason", None) or str(e)
            refuse(f"TLS handshake with the cage failed ({reason}); SNI must be {plan.host}")
        if pooled is None:
            opening.join()
            meter.add(opening.cpu)  # as if this thread had made the upstream's handshake
        if isinstance(opening.result, Refusal):
            decision.reason, decision.closed = opening.result.reason, True
            self._emit(decision)
            if client is not None:
                egress_tls.answer_first(client, opening.result.status, opening.result.reason)
            return client or conn
        assert opening.result is not None
        upstream, address = opening.result
        if client is None:
            decision.closed = True
            self._emit(decision)
            upstream.close()
            return conn

        def replan() -> Plan | None:
            now = self._rules_and_plan(agent, plan.host, plan.port, address)
            if now is None:
                return None
            return plan if self.plan_for is None else now[1]

        t = egress_tls.Terminated(
            agent, client, upstream, plan, refuse, replan, meter, stall=self.stall_seconds
        )
        # The plan it runs under now: replan may adopt a newer one than it was made with.
        opened_ = _Open(
            plan.host,
            plan.port,
            address,
            (client, upstream),
            "terminated",
            current=lambda: t.plan,
            wake=meter.wake,
        )
        try:
            self._track(agent, decision, opened_)
            t.run()
        except OSError as e:
            log.info("egress %s: terminated connection ended: %s", agent, e)
            t.reset_upstream = True  # (a stalled write's bytes may still be queued to it)
        except h11.ProtocolError as e:
            # Never the exception's text: h11's names the header value it refused, and
            # one could hold a secret put in (red team of session 32).
            log.warning("egress %s: terminated connection ended: h11 %s", agent, type(e).__name__)
            t.clean_end = False
        finally:
            t.log_injections()
            self._untrack(agent, decision)
            decision.bytes_up += t.up
            decision.bytes_down += t.down
            decision.closed = True
            self._emit(decision)
            if t.clean_end and time.monotonic() - t.last_exchange < IDLE_REUSE:
                self._pool.give(
                    agent, Idle(plan.host, plan.port, upstream, address, t.last_exchange)
                )
                self._sweep_later()
            else:  # (its session is kept for the next handshake: a kept connection needs none)
                session = upstream.session
                if session is not None and session.has_ticket:
                    self._sessions[(plan.host, plan.port)] = session
                if t.reset_upstream:
                    reset_on_close(upstream)
                upstream.close()
        return client

    def _sweep_later(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(loop.call_later, IDLE_REUSE + 0.5, self._pool.sweep)
            except RuntimeError:
                pass  # the loop is shutting down

    @staticmethod
    def _connect(addresses: list[IPAddress], port: int) -> tuple[socket.socket, IPAddress]:
        last: OSError | None = None
        for a in addresses:
            family = socket.AF_INET6 if a.version == 6 else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(CONNECT_TIMEOUT)
            try:
                s.connect((str(a), port))
            except OSError as e:
                s.close()
                last = e
                continue
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cap_buffers(s, send=UPLOAD_BUF, receive=DOWNLOAD_BUF)
            return s, a
        raise Refusal(
            502, f"cannot connect to port {port}: {last.strerror if last else 'no address'}"
        )


def cap_buffers(sock: socket.socket, *, send: int = 0, receive: int = 0) -> None:
    """Fixed socket buffers (the kernel doubles what is asked, up to wmem_max/rmem_max):
    left to grow, a tunnel whose server stopped reading held ~32 MiB in the cage's
    connection (tcp_rmem's top, reached in a second of fast reads) and ~4 MiB queued
    upstream; 16 such tunnels took 500 MiB of the host's TCP memory, which no cgroup
    is charged for (red team of session 32). A fixed size also stops the growth."""
    for option, size in ((socket.SO_SNDBUF, send), (socket.SO_RCVBUF, receive)):
        if size:
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, size)
            except OSError:
                pass


def _holds(path: Path, data: bytes) -> bool:
    """Whether the file at ``path`` (not a link) holds exactly ``data``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(len(data) + 1) == data
    finally:
        os.close(fd)

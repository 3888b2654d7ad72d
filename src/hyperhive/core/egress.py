"""The egress proxy (runs in hive-core): one listening socket per agent,
``agents/<name>/egress.sock``. The agent is the socket a connection came in
on, never anything it says. Each connection makes one request, either
``CONNECT host:port`` (a tunnel, e.g. for HTTPS) or a plain-HTTP request with
an absolute URI; the destination is checked against the agent's rules, DNS is
resolved here (the cage has no resolver), and every address it would connect
to is checked again, so an allowlisted name can't lead back into the host.

Connections run in threads with blocking sockets and bytes move by splice(2)
(``hyperhive.relay``): the event loop only accepts, and hears about decisions.
"""

from __future__ import annotations

import array
import asyncio
import errno
import ipaddress
import logging
import itertools
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hyperhive.peercred import peer_cred
from hyperhive.relay import HANDOVER, relay
from hyperhive.wire.egress import IPAddress, Rule, RuleError, destination, parse_port, split_host_port

log = logging.getLogger("hive.egress")

MAX_HEAD = 16 * 1024  # request line + headers
HEAD_TIMEOUT = 10.0  # seconds to send them (slow clients are cut off)
CONNECT_TIMEOUT = 10.0
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


def forbidden_address(address: IPAddress) -> str | None:
    """Why the proxy never connects to ``address`` (None: it may)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified:
        return "unspecified address"
    if address.is_multicast:
        return "multicast"
    if _is_own_address(address):
        return "one of this host's own addresses"
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
        self.hosts = {k.lower().rstrip("."): ipaddress.ip_address(v) for k, v in (hosts or {}).items()}

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        if host in self.hosts:
            return [self.hosts[host]]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise Refusal(502, f"cannot resolve {host}: {e}") from None
        out: list[IPAddress] = []
        for info in infos:
            a = ipaddress.ip_address(info[4][0].split("%")[0])
            if a not in out:
                out.append(a)
        return out


def check(rules: tuple[Rule, ...], host: str, port: int, resolver: Resolver) -> list[IPAddress]:
    """The addresses the proxy may connect to for ``host:port``; Refusal otherwise."""
    try:
        name, literal = destination(host, port)
    except RuleError as e:
        raise Refusal(400, str(e)) from None
    if literal is not None:
        if not any(r.matches_address(literal, port) for r in rules):
            raise Refusal(403, f"{_show(name, port)} is not in this agent's egress allowlist")
        addresses = [literal]
    else:
        by_name = any(r.matches_name(name, port) for r in rules)
        by_cidr = [r for r in rules if r.network is not None and r.port == port]
        if not by_name and not by_cidr:
            raise Refusal(403, f"{_show(name, port)} is not in this agent's egress allowlist")
        addresses = resolver.resolve(name, port)
        if not by_name:  # allowed only if every address it has is in an allowed network
            if not addresses or not all(any(r.matches_address(a, port) for r in by_cidr) for a in addresses):
                raise Refusal(403, f"{_show(name, port)} is not in this agent's egress allowlist")
    for a in addresses:
        why = forbidden_address(a)
        if why is not None:
            raise Refusal(403, f"{_show(name, port)} resolves to {a}, {why}: never reachable through the proxy")
    return addresses


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _receive(conn: socket.socket, deadline: float) -> tuple[socket.socket, bytes]:
    """The client: the connection itself (a request sent straight to egress.sock), or
    the TCP connection the cage's bridge handed over on it. Returns it and any
    request bytes already read."""
    conn.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        data, ancdata, _flags, _ = conn.recvmsg(65536, socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC)
    except TimeoutError:
        raise Refusal(408, f"request head not complete within {HEAD_TIMEOUT:.0f} s") from None
    fds = [fd for level, kind, raw in ancdata if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
           for fd in array.array("i", raw[: len(raw) - len(raw) % 4])]
    if not fds:
        return conn, data
    try:
        if data != HANDOVER or len(fds) != 1 or not stat.S_ISSOCK(os.fstat(fds[0]).st_mode):
            raise Refusal(400, "a handed-over connection is one stream socket with the handover byte")
        client = socket.socket(fileno=fds.pop())
    finally:
        for fd in fds:
            os.close(fd)
    if client.type != socket.SOCK_STREAM or client.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        client.close()
        raise Refusal(400, "a handed-over connection must be a stream socket")
    conn.close()
    return client, b""


def _read_head(conn: socket.socket, buf: bytes, deadline: float) -> tuple[bytes, bytes]:
    """The request head (up to the blank line) and whatever came after it, all
    within one deadline (a client sending a byte at a time gets no longer)."""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD:
            raise Refusal(431, f"request head over {MAX_HEAD} bytes")
        if time.monotonic() > deadline:
            raise Refusal(408, f"request head not complete within {HEAD_TIMEOUT:.0f} s")
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            raise Refusal(408, f"request head not complete within {HEAD_TIMEOUT:.0f} s") from None
        if not chunk:
            raise Refusal(400, "connection closed before a complete request")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    if len(head) > MAX_HEAD:
        raise Refusal(431, f"request head over {MAX_HEAD} bytes")
    conn.settimeout(None)
    return head, rest


@dataclass
class Request:
    method: str
    host: str
    port: int
    forward: bytes | None  # the head to send upstream (plain HTTP); None for CONNECT


def parse_request(head: bytes) -> Request:
    lines = head.split(b"\r\n")
    try:
        method, target, version = lines[0].decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise Refusal(400, "malformed request line") from None
    if not version.startswith("HTTP/1."):
        raise Refusal(400, f"unsupported protocol {version[:20]!r}")
    if method == "CONNECT":
        try:
            host, port_text = split_host_port(target)
            port = parse_port(port_text)
            return Request(method, destination(host, port)[0], port, None)
        except RuleError as e:
            raise Refusal(400, f"CONNECT target: {e}") from None
    if not target.startswith("http://"):
        raise Refusal(400, "only CONNECT, or plain HTTP with an absolute http:// URI, goes through this proxy")
    authority, slash, path = target[len("http://"):].partition("/")
    authority = authority.rpartition("@")[2]  # never forward userinfo as part of the host
    try:
        if authority.startswith("[") or authority.count(":") == 1:
            host, port_text = split_host_port(authority)
            port = parse_port(port_text)
        else:
            host, port = authority, 80
        host = destination(host, port)[0]  # only a valid name or address is ever logged
    except RuleError as e:
        raise Refusal(400, f"URI: {e}") from None
    headers = [h for h in lines[1:] if h.split(b":", 1)[0].strip().lower() not in HOP_HEADERS]
    request_line = f"{method} {slash}{path} {version}".encode()
    forward = b"\r\n".join([request_line, *headers, b"Connection: close"]) + b"\r\n\r\n"
    return Request(method, host, port, forward)


def _reply(conn: socket.socket, status: int, reason: str) -> None:
    text = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            502: "Bad Gateway", 503: "Service Unavailable"}.get(status, "Error")
    body = f"hive egress: {reason}\n".encode()
    try:
        conn.sendall(f"HTTP/1.1 {status} {text}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    except OSError:
        pass


class EgressProxy:
    """``rules_for(agent)`` gives the agent's current rules (read from any thread);
    ``record(decision)`` is called in the event loop for every decision and close."""

    def __init__(self, rules_for: Callable[[str], tuple[Rule, ...]], record: Callable[[Decision], None],
                 resolver: Resolver | None = None, max_connections: int = 64) -> None:
        self.rules_for = rules_for
        self.record = record
        self.resolver = resolver or Resolver()
        self.max_connections = max_connections  # per agent, at once
        self._listeners: dict[str, socket.socket] = {}
        self._allowed: dict[str, frozenset[int]] = {}
        self._active: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def set_uids(self, name: str, uids: frozenset[int]) -> None:
        self._allowed[name] = uids

    def listen(self, name: str, path: Path, umask: int) -> None:
        if name in self._listeners:
            return
        self._loop = asyncio.get_running_loop()
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(umask)
        try:
            listener.bind(str(path))
        finally:
            os.umask(old)
        listener.listen(128)
        listener.setblocking(False)
        self._listeners[name] = listener
        self._loop.add_reader(listener.fileno(), self._accept, name, listener)

    def close(self, name: str, path: Path) -> None:
        listener = self._listeners.pop(name, None)
        if listener is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(listener.fileno())
        listener.close()
        path.unlink(missing_ok=True)

    def close_all(self, paths: Callable[[str], Path]) -> None:
        for name in list(self._listeners):
            self.close(name, paths(name))

    def _accept(self, name: str, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("egress %s: accept failed: %s", name, e)
            return
        conn.setblocking(True)
        threading.Thread(target=self._serve, args=(name, conn), name=f"egress-{name}", daemon=True).start()

    def _emit(self, decision: Decision) -> None:
        snapshot = Decision(**decision.__dict__)
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self.record, snapshot)
            except RuntimeError:
                pass  # the loop is shutting down

    def _serve(self, agent: str, conn: socket.socket) -> None:
        upstream: socket.socket | None = None
        counted = False
        try:
            cred = peer_cred(conn)
            allowed = self._allowed.get(agent)
            if allowed is not None and cred.uid not in allowed:
                log.warning("egress %s: refused uid %d (pid %d) on its socket", agent, cred.uid, cred.pid)
                _reply(conn, 403, f"uid {cred.uid} is not agent {agent}")
                return
            with self._lock:
                if self._active.get(agent, 0) >= self.max_connections:
                    _reply(conn, 503, f"at most {self.max_connections} egress connections at once per agent")
                    return
                self._active[agent] = self._active.get(agent, 0) + 1
                counted = True
            try:
                deadline = time.monotonic() + HEAD_TIMEOUT
                conn, first = _receive(conn, deadline)
                head, rest = _read_head(conn, first, deadline)
                req = parse_request(head)
            except Refusal as e:
                _reply(conn, e.status, e.reason)
                self._emit(Decision(agent, "-", 0, False, e.reason, closed=True))
                return
            decision = Decision(agent, req.host, req.port, False, "")
            try:
                addresses = check(self.rules_for(agent), req.host, req.port, self.resolver)
                upstream, address = self._connect(addresses, req.port)
            except Refusal as e:
                decision.reason, decision.closed = e.reason, True
                _reply(conn, e.status, e.reason)
                self._emit(decision)
                return
            decision.allowed, decision.address = True, str(address)
            decision.reason = "CONNECT" if req.forward is None else f"HTTP {req.method}"
            self._emit(decision)
            if req.forward is None:
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                upstream.sendall(req.forward)
                decision.bytes_up += len(req.forward)
            if rest:
                upstream.sendall(rest)
                decision.bytes_up += len(rest)
            up, down = relay(conn, upstream)
            decision.bytes_up += up
            decision.bytes_down += down
            decision.closed = True
            self._emit(decision)
        except OSError as e:
            log.info("egress %s: connection ended: %s", agent, e)
        except Exception:  # a bug must cost this connection only, never the proxy
            log.exception("egress %s: connection failed", agent)
        finally:
            if counted:
                with self._lock:
                    self._active[agent] -= 1
            if upstream is not None:
                upstream.close()
            conn.close()

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
            return s, a
        raise Refusal(502, f"cannot connect to port {port}: {last.strerror if last else 'no address'}")

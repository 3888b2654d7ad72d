"""TLS termination at the egress proxy as a relay (core/egress_tls.py): what its speed-ups
must not change. From a real cage, through the proxy with TLS terminated (a binding),
to an HTTPS server in a test network namespace (198.18.63.0/24):

- bodies larger than a read (uploads with Content-Length and chunked, a download) arrive
  byte for byte, and a connection kept alive carries the next request after them;
- a streamed answer is not held back: its head and first part reach the cage while
  the server still waits to send the rest (what an SSE stream needs);
- an upstream connection left idle by a cage's connection serves that agent's next one
  to that destination for a short while (core/egress_pool.py), and no one else's;
- the upstream is connected and its certificate verified while the cage makes its own
  handshake: a server whose certificate does not name the destination, or one that
  can't be reached, is the answer to the cage's first request (502, logged), and
  that request never reaches a server.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import assert_ok
from hive_fixture import HiveProcess, probe_result, running_hive
from hyperhive.core.egress_pool import IDLE_REUSE, PER_AGENT, Idle, UpstreamPool
from redteam.test_secrets_egress import cert_dir
from testnet import TestNet, ip

AGENT = "tlsrelay"
NET = TestNet(63, prefix="hvtr")
SERVER = NET.address(2)
# bulk.test is in the server's certificate; wrong.test (same server) is not; gone.test
# resolves to an address where nothing listens.
HOSTS = {"bulk.test": SERVER, "wrong.test": SERVER, "gone.test": NET.address(3)}
BINDINGS = "".join(
    f'\n[[secret_binding]]\nsecret = "relay{i}"\nagents = ["{AGENT}"]\nto = "{name}:443"\n'
    f'header = "authorization: Bearer {{}}"\nenv = "RELAY_TOKEN_{i}"\n'
    for i, name in enumerate(HOSTS)
)

# POST: the body's length and sha256 (Content-Length or chunked); GET /bytes/N: N
# bytes of a pattern; GET /slow: the head and "first", a pause, then "last".
SERVER_SCRIPT = r"""
import hashlib, json, socket, ssl, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
ADDR, CERT, SEEN = sys.argv[1], sys.argv[2], sys.argv[3]
PATTERN = bytes(range(256)) * 4096

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def setup(self):
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def _seen(self, **kw):
        with open(SEEN, "a") as f:
            f.write(json.dumps({"method": self.command, "path": self.path, "port": self.client_address[1], **kw}) + "\n")
    def _send(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        h = hashlib.sha256(); n = 0
        if self.headers.get("Transfer-Encoding") == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline(); break
                data = self.rfile.read(size); self.rfile.readline()
                h.update(data); n += len(data)
        else:
            left = int(self.headers["Content-Length"])
            while left:
                data = self.rfile.read(min(left, 1 << 16)); h.update(data); n += len(data); left -= len(data)
        self._seen(length=n)
        self._send(json.dumps({"length": n, "sha256": h.hexdigest()}).encode())
    def do_GET(self):
        self._seen()
        if self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            while n:
                k = min(n, len(PATTERN)); self.wfile.write(PATTERN[:k]); n -= k
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", str(len("first\n") + len("last\n")))
            self.end_headers()
            self.wfile.write(b"first\n")
            time.sleep(1.5)
            self.wfile.write(b"last\n")
        else:
            self._send(b"ok")

ThreadingHTTPServer.daemon_threads = True
srv = ThreadingHTTPServer((ADDR, 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(CERT)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"""

# In the cage: one terminated connection to bulk.test, kept alive through four
# requests; then /slow timed; then wrong.test and gone.test.
PROBE = r"""
import hashlib, ssl, time
PATTERN = bytes(range(256)) * 4096

def connect(host):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem")
    return ctx.wrap_socket(s, server_hostname=host)

def response(t):
    # (status, body): Content-Length framing only (what the test server sends)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = t.recv(65536)
        if not chunk:
            return 0, buf
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = int([l.split(":", 1)[1] for l in lines if l.lower().startswith("content-length:")][0])
    while len(body) < length:
        chunk = t.recv(1 << 20)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), body

out = {}
big = PATTERN * 3 + b"tail"  # over 3 MiB
t = connect("bulk.test")
t.sendall(b"POST /up HTTP/1.1\r\nHost: bulk.test\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
status, body = response(t)
out["upload"] = {"status": status, "body": json.loads(body), "sha256": hashlib.sha256(big).hexdigest()}
t.sendall(b"POST /chunked HTTP/1.1\r\nHost: bulk.test\r\nTransfer-Encoding: chunked\r\n\r\n")
for i in range(0, len(big), 700000):
    part = big[i:i + 700000]
    t.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
t.sendall(b"0\r\n\r\n")
status, body = response(t)
out["chunked"] = {"status": status, "body": json.loads(body)}
n = 5 * (1 << 20) + 3
t.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: bulk.test\r\n\r\n" % n)
status, body = response(t)
want = (PATTERN * (n // len(PATTERN) + 1))[:n]
out["download"] = {"status": status, "length": len(body), "same": body == want}
t.sendall(b"GET /after HTTP/1.1\r\nHost: bulk.test\r\nConnection: close\r\n\r\n")
out["after"] = list(map(lambda x: x if isinstance(x, int) else x.decode(), response(t)))
t.close()

t = connect("bulk.test")
t0 = time.monotonic()
t.sendall(b"GET /slow HTTP/1.1\r\nHost: bulk.test\r\nConnection: close\r\n\r\n")
first = b""
while b"first" not in first:
    first += t.recv(65536)
t1 = time.monotonic()
rest = b""
while b"last" not in rest:
    rest += t.recv(65536)
out["slow"] = {"first_after": t1 - t0, "last_after": time.monotonic() - t0, "head": first.decode()}
t.close()

# fresh connections, each closed after its answer: the second within the pool's time
for path, pause in (("/reuse1", 0.3), ("/reuse2", 2.6), ("/reuse3", 0)):
    t = connect("bulk.test")
    t.sendall(f"GET {path} HTTP/1.1\r\nHost: bulk.test\r\n\r\n".encode())
    assert response(t)[0] == 200
    t.close()
    time.sleep(pause)

for host in ("wrong.test", "gone.test"):
    t = connect(host)
    t.sendall(f"GET /{host} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    status, body = response(t)
    out[host] = {"status": status, "body": body.decode(errors="replace")}
result(**out)
"""


@pytest.fixture(scope="module")
def certs() -> Iterator[Path]:
    with cert_dir("hvtr", "relay test CA", "relay test server", ["bulk.test"]) as (d, _):  # not wrong.test
        yield d


@pytest.fixture(scope="module")
def hive(certs: Path) -> Iterator[HiveProcess]:
    with NET as n:
        n.serve(SERVER, 443, [sys.executable, "-c", SERVER_SCRIPT, SERVER, str(certs / "server.pem"),
                              str(certs / "seen.jsonl")])
        ip("-n", n.ns, "addr", "add", f"{HOSTS['gone.test']}/24", "dev", n.ns_if)  # nothing listens there
        rules = [f"{name}:443" for name in HOSTS] + [f"{a}:443" for a in set(HOSTS.values())]
        h = HiveProcess({AGENT: {"command": ["true"], "egress": rules}},
                        sections={"egress": {"hosts": HOSTS, "upstream_ca": str(certs / "ca.pem")}})
        h.config_path.write_text(h.config_path.read_text() + BINDINGS)
        h.write_config = lambda agents: None  # type: ignore[method-assign]  # keep the bindings
        for hv in running_hive(h):
            for i in range(len(HOSTS)):  # (one binding per secret and agent)
                assert_ok(hv.host_call("secret_set", name=f"relay{i}", value="relay-secret"))
            yield hv


@pytest.fixture(scope="module")
def res(hive: HiveProcess) -> dict[str, Any]:
    return probe_result(hive.probe(AGENT, PROBE, timeout=120))


def _seen(certs: Path) -> list[dict[str, Any]]:
    path = certs / "seen.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_large_bodies_pass_intact_on_a_kept_alive_connection(res: dict[str, Any], certs: Path) -> None:
    up = res["upload"]
    assert up["status"] == 200 and up["body"] == {"length": 3 * (1 << 20) + 4, "sha256": up["sha256"]}, up
    assert res["chunked"] == {"status": 200, "body": up["body"]}, res["chunked"]
    assert res["download"] == {"status": 200, "length": 5 * (1 << 20) + 3, "same": True}, res["download"]
    assert res["after"] == [200, "ok"], res["after"]
    assert [s["path"] for s in _seen(certs)][:4] == ["/up", "/chunked", "/bytes/5242883", "/after"]


def test_a_streamed_answer_is_not_held_back(res: dict[str, Any]) -> None:
    slow = res["slow"]
    assert slow["head"].startswith("HTTP/1.1 200"), slow
    assert slow["first_after"] < 1.0 and slow["last_after"] >= 1.4, slow


def test_an_idle_upstream_connection_serves_the_next_connection_for_a_short_while(
    res: dict[str, Any], certs: Path
) -> None:
    port = {s["path"]: s["port"] for s in _seen(certs)}
    assert port["/reuse1"] == port["/reuse2"] != port["/reuse3"], port
    assert port["/after"] != port["/slow"]  # (Connection: close: never kept)


def test_the_pool_keeps_a_connection_for_its_agent_and_destination_only() -> None:
    """UpstreamPool's rules, on real sockets (its TLS is beside the point here)."""

    class Conn:  # what the pool uses of an SSLSocket: pending, fileno, close
        def __init__(self) -> None:
            self.sock, self.peer = socket.socketpair()
            self.closed = False

        def pending(self) -> int:
            return 0

        def fileno(self) -> int:
            return self.sock.fileno()

        def close(self) -> None:
            self.closed = True

    a, b = ipaddress.ip_address("198.18.63.2"), ipaddress.ip_address("198.18.63.9")
    pool = UpstreamPool()
    c = Conn()
    pool.give("alice", Idle("bulk.test", 443, c, a, time.monotonic()))  # type: ignore[arg-type]
    assert pool.take("bob", "bulk.test", 443, [a]) is None  # another agent's
    assert pool.take("alice", "other.test", 443, [a]) is None  # another destination
    assert pool.take("alice", "bulk.test", 8443, [a]) is None
    assert pool.take("alice", "bulk.test", 443, [b]) is None  # the name resolves elsewhere now
    assert pool.take("alice", "bulk.test", 443, [a]) == (c, a) and not c.closed
    assert pool.take("alice", "bulk.test", 443, [a]) is None  # taken once
    c.peer.sendall(b"HTTP/1.1 200 OK\r\n")  # bytes nobody asked for: never used
    pool.give("alice", Idle("bulk.test", 443, c, a, time.monotonic()))  # type: ignore[arg-type]
    assert pool.take("alice", "bulk.test", 443, [a]) is None and c.closed
    old = Conn()
    pool.give("alice", Idle("bulk.test", 443, old, a, time.monotonic() - IDLE_REUSE - 1))  # type: ignore[arg-type]
    pool.sweep()
    assert old.closed
    many = [Conn() for _ in range(PER_AGENT + 2)]
    for m in many:
        pool.give("alice", Idle("bulk.test", 443, m, a, time.monotonic()))  # type: ignore[arg-type]
    assert [m.closed for m in many] == [True, True] + [False] * PER_AGENT
    pool.drop("alice")
    assert all(m.closed for m in many)


def test_an_upstream_that_does_not_verify_or_answer_gets_no_request(
    res: dict[str, Any], hive: HiveProcess, certs: Path
) -> None:
    wrong, gone = res["wrong.test"], res["gone.test"]
    assert wrong["status"] == 502 and "wrong.test:443: the server's TLS did not verify" in wrong["body"], wrong
    assert gone["status"] == 502 and "cannot connect to port 443" in gone["body"], gone
    assert not {"/wrong.test", "/gone.test"} & {s["path"] for s in _seen(certs)}
    entries = assert_ok(hive.host_call("egress_log", name=AGENT, limit=100))["entries"]
    refused = {e["host"]: e["reason"] for e in entries if not e["allowed"]}
    assert "did not verify" in refused["wrong.test"] and "cannot connect" in refused["gone.test"], refused

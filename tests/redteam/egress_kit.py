"""Shared by the egress red-team modules (tests/redteam/test_egress_*.py): a probe
that sends raw proxy requests from inside a cage to 127.0.0.1:3128 (the harness's
bridge to the agent's egress.sock, the way every client in the cage goes out), and
a recording HTTP server in a test network namespace (tests/testnet.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from helpers import assert_ok
from hive_fixture import HiveProcess, running_hive
from testnet import TestNet, ip

from .conftest import cage_run

# In the cage: P["requests"] is {key: [head, tunnelled bytes or ""]}; the result maps
# each key to {"status", "body"} (body: what came after the proxy's head, or, for a
# tunnel, what came back through it).
ASK = """
def ask(head, tunnel):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
    s.sendall(head.encode("latin-1"))
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    top, _, rest = data.partition(b"\\r\\n\\r\\n")
    parts = top.split(b" ")
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if status == 200 and tunnel:
        s.sendall(tunnel.encode("latin-1"))
    while True:
        try:
            chunk = s.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        rest += chunk
    s.close()
    return {"status": status, "body": rest.decode(errors="replace")}

result(**{key: ask(head, tunnel) for key, (head, tunnel) in P["requests"].items()})
"""


def ask_all(hive: HiveProcess, agent: str, requests: dict[str, tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """Send every request from inside ``agent``'s cage, one connection each."""
    return cage_run(hive, agent, ASK, timeout=240, requests={k: list(v) for k, v in requests.items()})


def connect_head(target: str, host: str | None = None) -> str:
    return f"CONNECT {target} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host else "") + "\r\n"


def get_head(uri: str, *headers: str) -> str:
    return f"GET {uri} HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"


def reason(body: str) -> str:
    """The proxy's one-line refusal, without the ``hive egress: `` prefix."""
    assert body.startswith("hive egress: ") and body.count("\n") == 1, body
    return body[len("hive egress: "):].rstrip("\n")


# Answers every request with "<its own address> host=<Host header> path=<path>" and
# remembers each; GET /__seen returns what it saw (then forgets it).
RECORDER = r"""
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ADDR, PORT = sys.argv[1], int(sys.argv[2])
SEEN, LOCK = [], threading.Lock()

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/__seen":
            with LOCK:
                body = json.dumps(SEEN).encode()
                SEEN.clear()
        else:
            with LOCK:
                SEEN.append({"path": self.path, "host": self.headers.get_all("Host") or []})
            body = f"{ADDR} host={self.headers.get('Host')} path={self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer((ADDR, PORT), H).serve_forever()
"""


def serve_recorder(net: TestNet, address: str, port: int = 80) -> None:
    """A RECORDER at ADDRESS:PORT inside ``net``'s namespace; returns once it accepts."""
    if address not in net.added:
        ip("-n", net.ns, "addr", "add", f"{address}/24", "dev", net.ns_if)
        net.added.append(address)
    proc = subprocess.Popen(["ip", "netns", "exec", net.ns, sys.executable, "-c", RECORDER, address, str(port)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    net.procs.append(proc)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((address, port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"recorder {address}:{port} did not start") from None
            time.sleep(0.05)


def seen(address: str, port: int = 80) -> list[dict[str, Any]]:
    """What the recorder at ADDRESS:PORT was asked since the last call (from the host)."""
    with socket.create_connection((address, port), timeout=10) as s:
        s.sendall(b"GET /__seen HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


# In the cage: ``each_conn(one, **extra)`` runs ``one(i, out)`` on P["conns"] threads; the
# result's ``out`` lists what each put (an exception: its line), with ``extra`` beside it.
EACH_CONN = r"""
import threading


class NoTunnel(Exception):
    pass


def each_conn(one, **extra):
    out = {}

    def run(i):
        try:
            one(i, out)
        except NoTunnel as e:
            out[i] = str(e)
        except Exception as e:
            out[i] = "error: " + type(e).__name__ + ": " + str(e)[:200]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(P["conns"])]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    result(out=[out.get(i) for i in range(P["conns"])], **extra)
"""

# In the cage, with EACH_CONN: ``tls_to`` (CONNECT through the proxy, on 127.0.0.1:3128 or
# egress.sock itself, then TLS with the hive's CA); a refused CONNECT raises NoTunnel,
# which ``each_conn`` reports as that connection's line.
# ``tunnel_to``: a CONNECT through the proxy (its TCP port, or with ``unix`` its own
# socket), the 200 read; the socket, or NoTunnel with what the proxy said.
TUNNEL_TO = EACH_CONN + r"""
import socket


def tunnel_to(host, port, unix=False, timeout=150):
    if unix:  # the proxy's own socket: no TCP (no Nagle, no delayed ACK)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect("/run/hive/egress.sock")
    else:
        s = socket.create_connection(("127.0.0.1", 3128), timeout=timeout)
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise NoTunnel("connect closed: " + head.decode(errors="replace"))
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise NoTunnel("connect: " + head.decode(errors="replace")[:200])
    return s
"""

TLS_CONNS = TUNNEL_TO + r"""
import ssl


def tls_to(host, port, unix=False, timeout=150):
    s = tunnel_to(host, port, unix, timeout)
    ctx = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem")
    return ctx.wrap_socket(s, server_hostname=host)
"""


# A TLS test server for a test network namespace (argv: address, port, the key and
# leaf's PEM, then the server's own): ``TLS_SERVER_HEAD + <def answer(t, head)> +
# TLS_SERVER_LOOP``. Each connection is a thread; ``answer`` gets its TLS socket and
# what was read up to the end of the request's head (with any body bytes after it).
TLS_SERVER_HEAD = r"""
import socket, ssl, sys, threading
ADDR, PORT, CERT = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(CERT)
"""
TLS_SERVER_LOOP = r"""
def serve(c):
    try:
        t = ctx.wrap_socket(c, server_side=True)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = t.recv(65536)
            if not chunk:
                return
            data += chunk
        answer(t, data)
    except (OSError, ssl.SSLError, ValueError):
        pass
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ADDR, PORT))
s.listen(256)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


# In the cage, for the handover red-team modules (session 28's and their re-checks):
# the two egress sockets, a TCP pair whose first end lingers, a pipe's EOF within a
# time, and one CONNECT through the agent's own bridge.
HANDOVER_KIT = r'''
import os, select, socket, struct, threading, time
D, HO = "/run/hive/egress.sock", "/run/hive/egress-handover.sock"
LONG = struct.pack("ii", 1, 2**31 - 1)  # SO_LINGER on, ~68 years

def lingering_pair(sndbuf=0):
    """a: unsent data its peer b never reads, and SO_LINGER ~68 years: the last close of
    a waits for b to read. ``sndbuf``: a's send queue (a small one is enough)."""
    L = socket.socket()
    L.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    L.bind(("127.0.0.1", 0))
    L.listen(1)
    a = socket.create_connection(L.getsockname())
    if sndbuf:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    b, _ = L.accept()
    L.close()
    a.setblocking(False)
    sent = 0
    try:
        while True:
            sent += a.send(b"\0" * 65536)
    except BlockingIOError:
        pass
    a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LONG)
    return a, b, sent

def connect_ho(timeout=5):
    """A connection to the handover socket; its connect and sends time out (SO_SNDTIMEO)."""
    s = socket.socket(socket.AF_UNIX)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", timeout, 0))
    s.connect(HO)
    return s

def hand(fds, data=b"\0", timeout=5):
    """One handover message of ``data`` and ``fds``; the connection, left open."""
    s = connect_ho(timeout)
    socket.send_fds(s, [data], fds)
    return s

def locked_pipe(settle=0.02):
    """A pipe whose lock a thread of ours holds: splice(2) from a socket nobody writes to
    into its write end waits for data with the pipe's mutex held (splice_file_to_pipe).
    The read end's last close (pipe_release) takes that mutex: an uninterruptible sleep,
    which no signal ends. Returns (a, b, r, w): b lets go (a byte, or its close: EOF)."""
    a, b = socket.socketpair()
    r, w = os.pipe()
    th = threading.Thread(target=lambda: os.splice(a.fileno(), w, 65536), daemon=True)
    th.start()
    time.sleep(settle)
    return a, b, r, w

def eof_within(r, seconds):
    """Seconds until the pipe's read end r sees EOF (no write end left), or None."""
    t0 = time.monotonic()
    if select.select([r], [], [], seconds)[0] and os.read(r, 1) == b"":
        return round(time.monotonic() - t0, 3)
    return None

def bridge(timeout=2.0):
    """One CONNECT through the agent's bridge: the first 12 bytes back, and how long."""
    t0 = time.monotonic()
    try:
        b = socket.create_connection(("127.0.0.1", 3128), timeout=timeout)
        b.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        got = b.recv(100).decode(errors="replace")[:12] or "closed"
        b.close()
    except OSError as e:
        got = type(e).__name__
    return got, round(time.monotonic() - t0, 3)
'''


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time so far (s)."""
    f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def tcp_mem_pages() -> int:
    """The kernel's TCP memory in use, host-wide (pages): /proc/net/sockstat's ``mem``."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            f = line.split()
            return int(f[f.index("mem") + 1])
    return 0


def latencies(hive: HiveProcess, agent: str, seconds: float) -> list[float]:
    """Round trips of ``whoami`` on ``agent``'s agent.sock (a kept client), for ``seconds``, sorted."""
    out = []
    with hive.agent(agent) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.monotonic()
            assert c.call("whoami")["ok"]
            out.append(time.monotonic() - t)
            time.sleep(0.01)
    return sorted(out)


def egress_hive(agent: str, egress: list[str], section: dict[str, Any], bindings: str = "",
                secrets: dict[str, str] | None = None) -> Iterator[HiveProcess]:
    """A running hive of one command agent with ``egress`` rules and this ``[egress]``
    ``section``, ``bindings`` ([[secret_binding]] tables) added to its config and kept
    there, and each of ``secrets`` set by root (as ``hive secret set``). A generator: a
    module's fixture yields from it."""
    h = HiveProcess({agent: {"runtime": "command", "command": ["true"], "egress": egress}},
                    sections={"egress": section})
    if bindings:
        h.config_path.write_text(h.config_path.read_text() + bindings)
        h.write_config = lambda agents: None  # type: ignore[method-assign]  # keep the binding
    for hv in running_hive(h):
        for name, value in (secrets or {}).items():
            assert_ok(hv.host_call("secret_set", name=name, value=value))
        yield hv

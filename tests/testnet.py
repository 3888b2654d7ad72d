"""Test servers in a network namespace of their own, on addresses from
198.18.0.0/15 (reserved for benchmarking), reached from the host over a veth
pair. Used by the egress tests and the egress benchmark (root only).

    with TestNet(subnet=7) as net:          # 198.18.7.0/24; the host side is .1
        net.serve("198.18.7.2")             # HTTP on port 80 in the namespace
        ...
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

# GET /          -> "hello from ADDR:PORT\n"
# GET /bytes/N   -> N bytes (for throughput)
SERVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ADDR, PORT = sys.argv[1], int(sys.argv[2])
CHUNK = b"\0" * (1 << 20)

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            while n > 0:
                k = min(n, len(CHUNK))
                self.wfile.write(CHUNK[:k])
                n -= k
            return
        body = f"hello from {ADDR}:{PORT}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer((ADDR, PORT), H).serve_forever()
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _is_python(pid: str) -> bool:
    """Whether /proc/<pid> is a live Python process (a test run; pids are reused)."""
    try:
        return pid.isdigit() and b"python" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def clear_stale(subnet: int) -> None:
    """Remove what a killed test run left on 198.18.<subnet>.0/24: its host-side link
    (a bridge or a veth end) would keep the subnet's route, and this run's packets
    would go to the dead run's namespaces. Refuses (one line) when the address is held
    by something that is not a test network of a dead process."""
    shown = subprocess.run(["ip", "-j", "addr", "show"], check=True, capture_output=True, text=True)
    mine = str(os.getpid() % 100000)
    for link in json.loads(shown.stdout):
        name = link["ifname"]
        if not any(a.get("local", "").startswith(f"198.18.{subnet}.") for a in link.get("addr_info", [])):
            continue
        # A test network's names: a prefix, the subnet, "x", the creating process's pid
        # (cut short where a link name reaches 15 characters), a suffix.
        found = re.match(rf"^([a-z][a-z0-9]*){subnet}x(\d+)", name)
        if not found:
            raise RuntimeError(f"198.18.{subnet}.0/24 is taken by {name}, not a test network")
        pid = found[2]
        if not mine.startswith(pid) and any(p.startswith(pid) and _is_python(p) for p in os.listdir("/proc")):
            raise RuntimeError(f"198.18.{subnet}.0/24 is in use by {name}, a running process's test network")
        for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n"):
            ns = ns.split(" ")[0]
            if ns.startswith(f"{found[1]}{subnet}x{pid}"):
                pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
                for p in pids:
                    try:
                        os.kill(int(p), 9)
                    except ProcessLookupError:
                        pass
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", name], capture_output=True)


class TestNet:
    """A namespace ``ns`` with addresses 198.18.<subnet>.2.. and the host at .1."""

    __test__ = False  # not a pytest class

    def __init__(self, subnet: int, prefix: str = "hv") -> None:
        assert 0 <= subnet <= 255
        self.subnet = subnet
        tag = f"{prefix}{subnet}x{os.getpid() % 100000}"
        self.ns = tag
        self.host_if = tag[:12] + "a"
        self.ns_if = tag[:12] + "b"
        self.host_address = self.address(1)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.added: list[str] = []

    def address(self, n: int) -> str:
        return f"198.18.{self.subnet}.{n}"

    def __enter__(self) -> TestNet:
        self.close()  # leftovers of a crashed run with the same pid
        clear_stale(self.subnet)  # and of one with another pid
        ip("netns", "add", self.ns)
        try:
            ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.ns)
            ip("addr", "add", f"{self.host_address}/24", "dev", self.host_if)
            ip("link", "set", self.host_if, "up")
            ip("-n", self.ns, "link", "set", "lo", "up")
            ip("-n", self.ns, "link", "set", self.ns_if, "up")
        except BaseException:
            self.close()
            raise
        return self

    def serve(self, address: str, port: int = 80, argv: list[str] | None = None) -> None:
        """An HTTP server at ADDRESS:PORT inside the namespace (or ``argv``, a server
        of the caller's that listens there); returns once it accepts."""
        if address not in self.added:
            ip("-n", self.ns, "addr", "add", f"{address}/24", "dev", self.ns_if)
            self.added.append(address)
        argv = argv or [sys.executable, "-c", SERVER, address, str(port)]
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, *argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((address, port), timeout=0.5).close()
                return
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr and proc.poll() is not None else ""
                    raise RuntimeError(f"test server {address}:{port} did not start: {err}") from None
                time.sleep(0.05)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.procs.clear()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)  # takes the veth pair with it
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        Path(f"/run/netns/{self.ns}").unlink(missing_ok=True)

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

"""Red team round 23a: what the 22 rounds before did not try.

See docs/security.md's rounds table (red team round 23a) and the report of this round.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HiveProcess, running_hive
from hyperhive.client import Client
from testnet import TestNet

from .conftest import cage_run
from .test_secrets_egress import cert_dir

# -- one agent's terminated upload against the core's GIL ----------------------------------

SINK_NET = TestNet(231, prefix="hvr23a")
SINK_ADDR = SINK_NET.address(2)
SINK_HOSTS = {"sink.r23a.test": SINK_ADDR}
SINK_RULE = (
    "POST sink.r23a.test:443/*"  # an L7 rule: the proxy terminates TLS and checks each request
)
FLOODER, BYSTANDER = "rt23flood", "rt23calm"

# A TLS server that takes any request, reads its body to the end of a chunked body (or
# Content-Length), answers 200 "ok" and closes.
SINK_SERVER = r"""
import socket, ssl, sys, threading
ADDR, CERT = sys.argv[1], sys.argv[2]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(CERT)
def serve(c):
    try:
        t = ctx.wrap_socket(c, server_side=True)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = t.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, tail = data.partition(b"\r\n\r\n")
        length = None
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v.strip())
        got = len(tail)
        last = tail[-16:]
        while (got < length) if length is not None else not last.endswith(b"0\r\n\r\n"):
            chunk = t.recv(262144)
            if not chunk:
                return
            got += len(chunk)
            last = (last + chunk)[-16:]
        t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        t.close()
    except (OSError, ssl.SSLError, ValueError):
        pass
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ADDR, 443))
s.listen(256)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# In the cage: P["conns"] connections, each CONNECT sink, TLS (the hive's CA), a POST whose
# body is P["chunk"] repeated for P["bytes"] bytes, then the body's end; the answers.
UPLOAD = r"""
import ssl, threading
HOST = P["host"]
def one(i, out):
    try:
        s = socket.create_connection(("127.0.0.1", 3128), timeout=150)
        s.sendall(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                out[i] = "connect closed: " + head.decode(errors="replace")
                return
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            out[i] = "connect: " + head.decode(errors="replace")[:200]
            return
        ctx = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem")
        t = ctx.wrap_socket(s, server_hostname=HOST)
        t.sendall(f"POST /up HTTP/1.1\r\nHost: {HOST}\r\n{P['framing']}\r\n\r\n".encode())
        block = P["chunk"].encode("latin-1") * (65536 // len(P["chunk"]))
        sent = 0
        while sent < P["bytes"]:
            t.sendall(block)
            sent += len(block)
        if not P["tail"]:  # a body with no end: hang up
            t.close()
            out[i] = {"sent": sent, "answer": None}
            return
        t.sendall(P["tail"].encode("latin-1"))
        data = b""
        while True:
            try:
                chunk = t.recv(65536)
            except (OSError, ssl.SSLError):
                break
            if not chunk:
                break
            data += chunk
        out[i] = {"sent": sent, "answer": data.split(b"\r\n")[0].decode(errors="replace")}
    except Exception as e:
        out[i] = "error: " + type(e).__name__ + ": " + str(e)[:200]
out = {}
threads = [threading.Thread(target=one, args=(i, out)) for i in range(P["conns"])]
for th in threads:
    th.start()
for th in threads:
    th.join()
result(out=[out[i] for i in range(P["conns"])])
"""


@pytest.fixture(scope="module")
def sink_hive() -> Iterator[HiveProcess]:
    with (
        cert_dir("hvr23a", "round23a upstream CA", "round23a sink", list(SINK_HOSTS)) as (d, _),
        SINK_NET as n,
    ):
        n.serve(
            SINK_ADDR, 443, [sys.executable, "-c", SINK_SERVER, SINK_ADDR, str(d / "server.pem")]
        )
        agents = {
            FLOODER: {
                "runtime": "command",
                "command": ["true"],
                "egress": [SINK_RULE, f"{SINK_ADDR}:443"],
            },
            BYSTANDER: {"runtime": "command", "command": ["true"]},
        }
        h = HiveProcess(
            agents, sections={"egress": {"hosts": SINK_HOSTS, "upstream_ca": str(d / "ca.pem")}}
        )
        yield from running_hive(h)


def core_cpu(h: HiveProcess) -> float:
    """The core's CPU seconds so far (user + system)."""
    pid = h.core_pid()
    assert pid is not None
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latencies(h: HiveProcess, seconds: float) -> list[float]:
    """Round trips of the bystander's whoami (a fresh connection each), back to back."""
    out: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        with Client(h.agent_sock(BYSTANDER), timeout=30) as c:
            assert c.call("whoami")["name"] == BYSTANDER
        out.append(time.monotonic() - t0)
        time.sleep(0.01)
    return out


def p(samples: list[float], q: float) -> float:
    return sorted(samples)[min(len(samples) - 1, int(q * len(samples)))]


def upload_while_timing(
    h: HiveProcess, size: int, **framing: str
) -> tuple[list[float], float, dict[str, Any]]:
    """The flooder's 16 uploads of ``size`` bytes each (``framing``: the body's header, its
    repeated piece and its end) while the bystander's whoami is timed, from the uploads'
    start until the last one is answered; with the core's CPU (cores) over that time."""
    holder: dict[str, Any] = {}

    def run() -> None:
        try:
            holder.update(cage_run(h, FLOODER, UPLOAD, timeout=170, host="sink.r23a.test", conns=16,
                                   bytes=size, **framing))  # fmt: skip
        except BaseException as e:  # shown by the caller
            holder["error"] = repr(e)[:2000]

    t = threading.Thread(target=run)
    cpu0, t0 = core_cpu(h), time.monotonic()
    t.start()
    time.sleep(1.5)  # the probe's start (hive exec) and its 16 handshakes
    during = latencies(h, 1.0)  # at least a second of samples, however quick the uploads
    while t.is_alive():
        during += latencies(h, 1.0)
    cpu = (core_cpu(h) - cpu0) / (time.monotonic() - t0)
    return during, cpu, holder


@pytest.mark.attack(
    "budget.exhaustion",
    ref="red team round 23a: h11 parses a terminated upload in the core, under the GIL",
)
def test_a_terminated_upload_of_tiny_chunks_does_not_starve_the_core(
    sink_hive: HiveProcess,
) -> None:
    """**Broke.** A terminated connection (an L7 rule or a secret binding on its host) is
    parsed by h11, in pure Python, in a thread of the core: ~9 us of the core's one GIL
    for every chunk of a chunked body, whatever its size. The agent's 16 connections (its
    ``max_connections``) each stream 1 MiB of one-byte chunks (``1\\r\\nx\\r\\n``, 6 bytes
    each; its TLS and its repetition cost the cage next to nothing, and the kernel buffers
    what the core has not read yet): the core parses at a whole CPU for as long as it
    takes, and every other agent's and the operator's requests wait behind the GIL. Before:
    another agent's whoami went from ~0.5 ms (p95) to ~0.7 s (p95; max 1.3 s); 2 s of
    upload (57 MB) held the core at 0.98 CPUs for 70 s. Another agent's request must stay
    within 100 ms (p95) while one agent uploads."""
    h = sink_hive
    base = latencies(h, 2.0)
    during, cpu, holder = upload_while_timing(
        h, 1 << 20, framing="Transfer-Encoding: chunked", chunk="1\r\nx\r\n", tail="0\r\n\r\n"
    )
    print(f"base p50 {p(base, .5):.4f} p95 {p(base, .95):.4f}; during p50 {p(during, .5):.4f} "
          f"p95 {p(during, .95):.4f} max {max(during):.4f} n={len(during)}; core {cpu:.2f} CPUs; {holder}")  # fmt: skip
    assert "error" not in holder, holder
    answers = [o["answer"] for o in holder["out"] if isinstance(o, dict)]
    print(f"uploaded {sum(o['sent'] for o in holder['out'] if isinstance(o, dict)) / 1e6:.1f} MB")
    assert "HTTP/1.1 200 OK" in answers, holder  # the uploads were served
    assert p(during, 0.95) < 0.1, (
        f"another agent's whoami: p95 {p(during, 0.95):.3f} s, max {max(during):.3f} s, p50 {p(during, 0.5):.3f} s "
        f"(before: p95 {p(base, 0.95):.4f} s), while one agent's 16 MiB upload of one-byte chunks on terminated "
        f"connections kept the core at {cpu:.2f} CPUs for {len(during)} samples"
    )


@pytest.mark.attack(
    "budget.exhaustion", ref="red team round 23a: the same bytes in big pieces (the control)"
)
def test_a_terminated_upload_of_the_same_bytes_in_one_piece_leaves_the_core_free(
    sink_hive: HiveProcess,
) -> None:
    """The control: the same 16 connections, the body sent as Content-Length bytes (h11
    passes each read through as one Data event). Another agent's whoami stays quick."""
    h = sink_hive
    during, cpu, holder = upload_while_timing(
        h, 1 << 20, framing="Content-Length: 1000000000", chunk="x" * 64, tail=""
    )
    print(
        f"during p50 {p(during, 0.5):.4f} p95 {p(during, 0.95):.4f} n={len(during)}; core {cpu:.2f} CPUs"
    )
    assert "error" not in holder, holder
    assert statistics.median(during) < 0.05, (statistics.median(during), cpu)


# -- set_status of a new text each time: a write each, not rate-limited --------------------

STATUS_FLOOD = r"""
import threading
def flood(i, out):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(AGENT_SOCK)
    s.settimeout(120)
    n, batch, got, buf = P["per_conn"], 200, 0, b""
    t0 = time.monotonic()
    for start in range(0, n, batch):
        s.sendall(b"".join(json.dumps({"cmd": "set_status", "text": "s%d-%d %s" % (i, k, P["pad"])}).encode() + b"\n"
                           for k in range(start, min(n, start + batch))))
        want = min(n, start + batch)
        while got < want:
            chunk = s.recv(1 << 20)
            if not chunk:
                out[i] = "closed after %d" % got
                return
            buf += chunk
            got += buf.count(b"\n")
            buf = buf[buf.rfind(b"\n") + 1:]
    out[i] = {"n": got, "s": round(time.monotonic() - t0, 2)}
out = {}
ths = [threading.Thread(target=flood, args=(i, out)) for i in range(P["conns"])]
for th in ths:
    th.start()
for th in ths:
    th.join()
result(out=[out.get(i) for i in range(P["conns"])])
"""


@pytest.mark.attack(
    "core.cheap-verb-flood",
    ref="red team round 23a: set_status of a new text each time (a write each, unpaced but for bytes)",
)
def test_a_status_flood_of_new_texts_does_not_starve_the_core(sink_hive: HiveProcess) -> None:
    """Held. ``set_status`` is not rate-limited, and a status that changes is a write: 8
    connections pipeline 3,000 each, every text new (~12,000 writes a second, only the
    byte pacer in the way). The group commit takes them in batches: another agent's
    whoami stays within 100 ms (p95; ~3 ms seen), and the last status stands."""
    h = sink_hive
    base = latencies(h, 1.0)
    holder: dict[str, Any] = {}

    def run() -> None:
        try:
            holder.update(
                cage_run(
                    h, FLOODER, STATUS_FLOOD, timeout=170, conns=8, per_conn=3000, pad="p" * 100
                )
            )
        except BaseException as e:  # shown below
            holder["error"] = repr(e)[:2000]

    t = threading.Thread(target=run)
    cpu0, t0 = core_cpu(h), time.monotonic()
    t.start()
    during = latencies(h, 1.0)
    while t.is_alive():
        during += latencies(h, 1.0)
    cpu = (core_cpu(h) - cpu0) / (time.monotonic() - t0)
    print(
        f"status: base p95 {p(base, 0.95):.4f}; during p50 {p(during, 0.5):.4f} p95 {p(during, 0.95):.4f} max {max(during):.4f} n={len(during)}; core {cpu:.2f} CPUs; {holder}"
    )
    assert "error" not in holder, holder
    assert holder["out"] == [{"n": 3000, "s": o["s"]} for o in holder["out"]], holder
    status = [a for a in h.host_call("agent_status")["agent_statuses"] if a["name"] == FLOODER]
    text = json.dumps(status)
    assert any(f"s{i}-2999 " in text for i in range(8)), text[:2000]
    assert p(during, 0.95) < 0.1, (p(during, 0.95), max(during), cpu)

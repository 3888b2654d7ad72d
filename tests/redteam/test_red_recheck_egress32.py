"""Re-check of session 32's egress fixes (red team of session 32): the byte tunnel's
stall timer (``SO_SNDTIMEO`` ``UPSTREAM_STALL`` on the upstream, ``relay.abort``) and the
fixed socket buffers (``egress.cap_buffers``), from a hostile cage and from servers in a
test network namespace (198.18.193.0/24) that the agent's rules open by address.

- FIREHOSE (:9001) writes to each connection as fast as it takes, for good.
- TRICKLE (:9002) reads each connection 8 KiB every 0.5 s (16 KiB/s, a slow but honest
  upload endpoint) and never stops.
- SINK (:9003) reads nothing (the control of the stall timer: a server that takes nothing).
- slow.test:8443 (terminated too) writes each answer one byte a send.
- slow.test (:443, TLS the proxy terminates: L7 rules): /poll answers after 20 s (a
  long poll), /hints after three 103 Early Hints of ~8 KiB each, POST /slow reads its
  body 16 KiB every 0.5 s (32 KB/s: at the hive's STALL of 8 s what ~4 KB/s is at the
  default 60 s; a slow reader's window opens ~95 KB at a time, so at 8 KB/s TCP itself
  moved nothing for ~12 s, session 33).

Broke (failing cases): a cage that stops reading its downloads holds ~186 MiB of host TCP
memory per agent in the core's sockets for good (no stall bound on the cage's side, the
cage connection's send side not capped); a server that takes nothing ends its tunnel
after ~245 s, not 60; ``say``/``fit`` count cells from Python 3.11's Unicode 14 tables,
so hexagrams, U+3248.., U+302E and U+00AD wrap an 80-column line the host counts wider;
the dashboard's fair egress log is fair only within its 2,000-row window (~10-12 s of one
agent's refusals). Held: slow honest uploads (byte tunnel 300 s, terminated 150 s), a
long poll answered after 90 s (the figures of the helper's runs against the default 60 s
stall; since the fixes this hive runs with ``[egress] stall_seconds`` = STALL, 8, and
the holds and bounds below are scaled to it), three 8 KiB 103 Early Hints, an answer dribbled a byte a
segment (other agents' calls p99 7.6 ms, though the core spent ~1 CPU on 280 KB/s).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HiveProcess, probe_result, running_hive
from testnet import TestNet

from .egress_kit import TLS_SERVER_HEAD, TLS_SERVER_LOOP, cpu_seconds, latencies, tcp_mem_pages
from .test_secrets_egress import cert_dir

STALL = 8  # the hive's [egress] stall_seconds here (60 by default; TRICKLE opens its
# window about every 4 s: a loopback segment is 64 KiB, read 16 KiB a second)

AGENT, OTHER = "rcx", "rcy"
NET = TestNet(193, prefix="hvrx")
SRV = NET.address(2)

FIREHOSE = r"""
import socket, sys, threading
def serve(c):
    block = b"y" * 65536
    try:
        while True:
            c.sendall(block)
    except OSError:
        pass
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # (its own queue small: a remote host's)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(64)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

TRICKLE = r"""
import socket, sys, threading, time
def serve(c):
    try:
        while True:
            if not c.recv(8192):
                return
            time.sleep(0.5)
    except OSError:
        pass
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(64)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

SLOW_ANSWER = r"""
import time
def answer(t, head):
    if head.startswith(b"GET /poll"):
        time.sleep(20)
        t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
    elif head.startswith(b"GET /hints"):
        hint = b"HTTP/1.1 103 Early Hints\r\nLink: </" + b"h" * 8000 + b">; rel=preload\r\n\r\n"
        t.sendall(hint * 3 + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhints")
    elif head.startswith(b"GET /big"):
        block = b"b" * 65536
        t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1024 * len(block)))
        for _ in range(1024):
            t.sendall(block)
    elif head.startswith(b"POST /slow"):
        while t.recv(16384):
            time.sleep(0.5)
    while t.recv(65536):
        pass
"""

# slow.test:8443: TLS by memory BIOs, each answer (384 KiB) written one byte a send(2),
# TCP_NODELAY: a TLS record reaches the proxy a segment at a time.
DRIB = r"""
import socket, ssl, sys, threading
ADDR, PORT, CERT = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(CERT)
def serve(c):
    try:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        o = ctx.wrap_bio(inc, out, server_side=True)
        def more():
            d = out.read()
            if d:
                c.sendall(d)
            d = c.recv(65536)
            if not d:
                raise EOFError
            inc.write(d)
        while True:
            try:
                o.do_handshake()
                break
            except ssl.SSLWantReadError:
                more()
        c.sendall(out.read())
        data = b""
        while b"\r\n\r\n" not in data:
            try:
                data += o.read(65536)
            except ssl.SSLWantReadError:
                more()
        body = b"d" * (384 << 10)  # (1 MiB in the helper's runs: 30-35 s; the suite's time)
        o.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        enc = out.read()
        for i in range(len(enc)):
            c.send(enc[i:i + 1])
        c.recv(1)
    except (OSError, EOFError, ssl.SSLError):
        pass
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ADDR, PORT))
s.listen(64)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

SINK = r"""
import socket, sys, threading, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(64)
held = []
while True:
    c, _ = s.accept()
    held.append(c)
"""


@pytest.fixture(scope="module")
def certs() -> Iterator[Path]:
    with cert_dir("hvrx", "rc32 upstream CA", "slow server", ["slow.test"]) as (d, _):
        yield d


@pytest.fixture(scope="module")
def net(certs: Path) -> Iterator[TestNet]:
    with NET as n:
        n.serve(SRV, 443, [sys.executable, "-c", TLS_SERVER_HEAD + SLOW_ANSWER + TLS_SERVER_LOOP, SRV, "443",
                           str(certs / "server.pem")])
        n.serve(SRV, 8443, [sys.executable, "-c", DRIB, SRV, "8443", str(certs / "server.pem")])
        n.serve(SRV, 9001, [sys.executable, "-c", FIREHOSE, SRV, "9001"])
        n.serve(SRV, 9002, [sys.executable, "-c", TRICKLE, SRV, "9002"])
        n.serve(SRV, 9003, [sys.executable, "-c", SINK, SRV, "9003"])
        yield n


@pytest.fixture(scope="module")
def hive(net: TestNet, certs: Path) -> Iterator[HiveProcess]:
    agents = {AGENT: {"runtime": "command", "command": ["true"],
                      "egress": [f"{SRV}:9001", f"{SRV}:9002", f"{SRV}:9003", f"{SRV}:443",
                                 "GET slow.test:443/*", "POST slow.test:443/*", f"{SRV}:8443",
                                 "GET slow.test:8443/*"]},
              OTHER: {"runtime": "command", "command": ["true"]}}
    # (stall_seconds 10, not the default 60: the stalls below end within the suite's time)
    yield from running_hive(HiveProcess(agents, sections={"egress": {"hosts": {"slow.test": SRV},
                                                                      "upstream_ca": str(certs / "ca.pem"),
                                                                      "stall_seconds": STALL}}))


# In the cage: P["conns"] CONNECTs to P["target"]; once each is open nothing more is read
# from it (the download direction stalled by the cage); held P["hold"] s, then each is
# checked: "open" (still a live tunnel: no EOF, no reset) or how it ended.
HOLD_UNREAD = r"""
import threading, time
socks = []
def one(i):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
    s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (P["target"], P["target"])).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    socks.append(s)
th = [threading.Thread(target=one, args=(i,)) for i in range(P["conns"])]
for x in th: x.start()
for x in th: x.join()
time.sleep(P["hold"])
state = []
for s in socks:
    s.settimeout(0.05)
    got = 0
    end = time.monotonic() + 0.5
    try:
        while time.monotonic() < end:
            n = len(s.recv(1 << 20))
            if not n:
                state.append("eof after %d" % got)
                break
            got += n
        else:
            state.append("open, %d read in 0.5 s" % got)
    except TimeoutError:
        state.append("open")
    except OSError as e:
        state.append(type(e).__name__)
result(conns=len(socks), state=state)
"""


def queued(prefix: list[str], filt: str) -> tuple[int, int]:
    """(receive, send) queue bytes (skmem r, w) of the TCP sockets ``ss`` shows matching ``filt``."""
    out = subprocess.run([*prefix, "ss", "-Htnm", "state", "established", filt], capture_output=True, text=True).stdout
    pairs = re.findall(r"skmem:\(r(\d+),rb\d+,t\d+,tb\d+,f\d+,w(\d+)", out)
    return sum(int(r) for r, _ in pairs), sum(int(w) for _, w in pairs)



def rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) >> 10
    return 0


@pytest.mark.timeout(300)
@pytest.mark.attack("budget.exhaustion", ref="session 32 cap_buffers / UPSTREAM_STALL (the upload direction only)")
def test_a_cage_that_stops_reading_its_downloads_holds_no_socket_memory_for_good(hive: HiveProcess) -> None:
    """The download direction of the stalled-tunnel hog: rcx opens its 16 byte tunnels to
    FIREHOSE (an allowed address that writes as fast as it is read) and never reads them,
    holding them 75 s. What the cage doesn't take waits in the hive-core's sockets: the
    upstream's receive queue (``DOWNLOAD_BUF``, 4 MiB, doubled: 8 MiB) and the send queue
    of the cage's handed-over connection (not capped by ``cap_buffers``: it grows to
    ``tcp_wmem``'s max), host TCP memory no cgroup is charged for. Session 32 ends a tunnel
    whose *server* takes nothing for 60 s (``UPSTREAM_STALL``) but a tunnel whose *cage*
    takes nothing has no such bound: the pump writing to the cage's connection blocks for
    good. Measured: from 10 s to 75 s the core's upstream receive queues held 127 MiB and
    its send queues to the cage 59 MiB (186 MiB; host TCP memory +188 MiB), flat, core
    idle; every tunnel still open at 75 s. ~8 such agents reach ``tcp_mem``'s pressure
    mark here (1.46 GiB), ~12 its hard limit (2.2 GiB). Safe: as for the upload
    direction, by 75 s the proxy's sockets for the tunnels hold under 16 MiB (they were
    ended, or never held more)."""
    base = tcp_mem_pages()
    core = hive.core_pid()
    assert core
    cpu0 = cpu_seconds(core)
    got: dict[str, Any] = {}
    th = threading.Thread(target=lambda: got.update(out=probe_result(hive.probe(
        AGENT, HOLD_UNREAD, timeout=150, conns=16, hold=2 * STALL + 5, target=f"{SRV}:9001"))))
    th.start()
    cage = ["nsenter", "-t", str(hive.harness_pid(AGENT)), "-n"]
    samples = []
    t0 = time.monotonic()
    peak = base
    while th.is_alive():
        now = tcp_mem_pages()
        peak = max(peak, now)
        el = time.monotonic() - t0
        if not samples or el - samples[-1][0] >= 10:
            up = queued([], f"( dst {SRV}:9001 )")
            cg = queued(cage, "( sport = :3128 )")  # the core's end of each cage connection
            samples.append((round(el), up[0] >> 20, cg[1] >> 20, (now - base) * 4096 >> 20, rss_mib(core)))
        time.sleep(0.5)
    th.join()
    cpu = cpu_seconds(core) - cpu0
    out = got["out"]
    grew = (peak - base) * os.sysconf("SC_PAGE_SIZE") >> 20
    print(f"16 tunnels unread by the cage: samples (s, core upstream recv MiB, core->cage send MiB,"
          f" host TCP +MiB, core RSS MiB) {samples}; host TCP memory +{grew} MiB at peak; core CPU"
          f" {cpu:.2f} s; the tunnels at 75 s: {out['state']}")
    # the proxy's sockets of the tunnels, sampled in the last 10 s of the hold
    last = samples[-1]
    assert last[1] + last[2] < 16, (samples, out["state"])


# In the cage: one CONNECT to P["target"], written as fast as it takes (an upload) for up
# to P["hold"] s; when (s after the 200) the tunnel ended (EOF or reset seen), or None.
UPLOAD = r"""
import threading, time
s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (P["target"], P["target"])).encode())
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1)
assert head.startswith(b"HTTP/1.1 200"), head
t0 = time.monotonic()
ended = []
sent = [0]
def reader():
    s2 = s
    try:
        while True:
            try:
                if not s2.recv(65536):
                    break
            except TimeoutError:
                continue
        ended.append(("eof", round(time.monotonic() - t0, 1)))
    except OSError as e:
        ended.append((type(e).__name__, round(time.monotonic() - t0, 1)))
threading.Thread(target=reader, daemon=True).start()
s.settimeout(1.0)
block = b"u" * 65536
while time.monotonic() - t0 < P["hold"] and not ended:
    try:
        sent[0] += s.send(block)
    except TimeoutError:
        pass
    except OSError as e:
        ended.append(("send " + type(e).__name__, round(time.monotonic() - t0, 1)))
        break
time.sleep(0.5)
result(ended=ended[:1], sent=sent[0])
"""


@pytest.fixture(scope="module")
def slow(hive: HiveProcess) -> dict[str, Any]:
    """At once from rcx, for 3 × STALL s (one wait for the suite instead of two):
    - through byte tunnels, uploads to TRICKLE (8 KiB/s read) and to SINK (nothing read);
    - through terminated TLS to slow.test, a long poll, three Early Hints, a slow upload,
      and a 64 MiB download it never reads.
    What each probe saw, by name."""
    jobs: dict[str, tuple[str, dict[str, Any]]] = {
        "trickle": (UPLOAD, {"hold": 3 * STALL, "target": f"{SRV}:9002"}),
        "sink": (UPLOAD, {"hold": 3 * STALL, "target": f"{SRV}:9003"}),
        "poll": (TERMINATED, {"kind": "get", "path": "/poll"}),
        "hints": (TERMINATED, {"kind": "get", "path": "/hints"}),
        "upload": (TERMINATED, {"kind": "upload", "hold": 3 * STALL}),
        "unread": (TERMINATED, {"kind": "unread", "hold": 3 * STALL}),
    }
    out: dict[str, Any] = {}
    ths = [threading.Thread(target=lambda k=k, script=script, p=p: out.update({k: probe_result(hive.probe(
        AGENT, script, timeout=240, **p))})) for k, (script, p) in jobs.items()]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    print(f"slow jobs: {out}")
    return out


@pytest.fixture(scope="module")
def uploads(slow: dict[str, Any]) -> dict[str, Any]:
    return slow


@pytest.fixture(scope="module")
def terminated(slow: dict[str, Any]) -> dict[str, Any]:
    return slow


@pytest.mark.timeout(400)
@pytest.mark.attack("egress.relay", ref="session 32 UPSTREAM_STALL ('a server that takes nothing for 60 s'); tcp sk_stream_wait_memory")
def test_a_slow_but_honest_upload_is_not_reset_at_the_stall_timer(uploads: dict[str, Any]) -> None:
    """Does the stall timer break legitimate traffic? rcx uploads through a byte tunnel to
    TRICKLE, a server that keeps reading, 8 KiB/s (a throttled upload endpoint, a slow
    link), for 150 s. ``SO_SNDTIMEO`` times a send that copies nothing; a blocked send
    wakes when enough of the 2 MiB send buffer is free. Safe: the tunnel is still open at
    150 s (held: 300 s in a longer run, 9.1 MB written by the cage)."""
    assert not uploads["trickle"]["ended"], uploads["trickle"]


@pytest.mark.timeout(400)
@pytest.mark.attack("budget.exhaustion", ref="session 32 UPSTREAM_STALL = 60 ('a server that takes nothing for 60 s ends the connection'); fs/splice.c splice_to_socket")
def test_a_server_that_takes_nothing_ends_its_tunnel_within_the_stall_timer(uploads: dict[str, Any]) -> None:
    """rcx uploads through a byte tunnel to SINK, a server that reads nothing, the tunnel's
    buffers full within a second (~8 MB written by the cage: the cage connection's 2 MiB
    receive side, the upstream's 2 MiB send side, the rest the cage's own). The docs and
    ``UPSTREAM_STALL`` say such a server ends the connection after 60 s. The relay's
    ``os.splice`` of up to 1 MiB into the upstream is a loop of sends in the kernel
    (``splice_to_socket``): each one that moved anything before its 60 s wait returns that,
    and the next waits again; Python's next splice waits once more. The tunnel ended after
    245 s (one run of 300 s), its ~4 MiB held in the core that long, and the thread pair
    and one of the agent's 16 connections. Safe: the cage sees its tunnel end within 90 s
    (the timer and a margin)."""
    ended = uploads["sink"]["ended"]
    assert ended and ended[0][1] <= STALL + 15, uploads["sink"]


def _glibc_cells(text: str) -> int:
    """Terminal cells as the host's C library counts them (``wcwidth(3)`` under C.UTF-8,
    the table xterm, VTE and tmux follow on this host)."""
    import ctypes
    import locale
    old = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.wcwidth.argtypes = [ctypes.c_wchar]
        return sum(max(libc.wcwidth(ch), 0) for ch in text)
    finally:
        locale.setlocale(locale.LC_CTYPE, old)


@pytest.mark.parametrize("filler", ["\u4dc0", "\u00ad", "\u3248", "\u302e"])
@pytest.mark.attack("surface.terminal-injection", ref="session 32 cli/output.py say/fit (cells from Python 3.11's Unicode 14 tables)")
def test_a_line_cut_to_the_terminal_does_not_wrap_where_the_host_counts_wider(
        monkeypatch: pytest.MonkeyPatch, filler: str) -> None:
    """``say`` cuts a line to the terminal's width so an agent's text padded to the edge
    cannot start a row of its own (``hive status --watch``). ``fit`` counts cells with
    Python's ``unicodedata`` (Unicode 14 in 3.11: the Yijing hexagrams U+4DC0.. are
    narrow, U+302E a combining mark, U+00AD a format character of no width); the host's
    terminal counts them as its C library does (Unicode 16: hexagrams and U+3248.. wide,
    U+00AD and U+302E one or two cells). An agent's status of 32 such characters and then
    ``opsok: stopped`` fits by ``fit``'s count and is printed whole, and on an 80-column
    terminal the wrap starts the second row with the forged text. Safe: what ``say`` prints takes
    at most 80 cells as the host counts them."""
    import io
    import shutil

    from hyperhive.cli import output

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a, **k: os.terminal_size((80, 24)))
    head = "opsev: running  "
    forged = "opsok: stopped  it crashed"
    # as many as fill the row to its 80th cell as the host counts them: the forged text
    # then starts the second row
    line = head + filler * ((80 - len(head)) // _glibc_cells(filler)) + forged
    assert _glibc_cells(line) > 80  # (fit counted it 80 or fewer before the fix)
    output.say(line)
    shown = out.getvalue().rstrip("\n")
    cells = _glibc_cells(shown)
    print(f"{filler!r}: say printed {len(shown)} characters, {cells} cells by wcwidth(3) on an 80-column terminal")
    assert cells <= 80, (cells, shown[-40:])


# In the cage: through the proxy's terminated TLS to slow.test, P["kind"]: "get" sends
# GET P["path"] and reads the answer (status, body, seconds); "upload" sends a POST of
# 64 MiB to /slow as fast as it is taken for P["hold"] s (when the connection ended).
TERMINATED = r"""
import ssl, threading, time
s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
s.sendall(b"CONNECT slow.test:443 HTTP/1.1\r\nHost: slow.test:443\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1)
assert head.startswith(b"HTTP/1.1 200"), head
t = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem").wrap_socket(s, server_hostname="slow.test")
t0 = time.monotonic()
if P["kind"] == "get":
    t.settimeout(150)
    t.sendall(("GET %s HTTP/1.1\r\nHost: slow.test\r\nConnection: close\r\n\r\n" % P["path"]).encode())
    out = b""
    try:
        while True:
            chunk = t.recv(65536)
            if not chunk:
                break
            out += chunk
    except OSError as e:
        out += b"[" + type(e).__name__.encode() + b"]"
    result(seconds=round(time.monotonic() - t0, 1), status=out[:12].decode(errors="replace"),
           body=out.partition(b"\r\n\r\n")[2][-60:].decode(errors="replace"))
elif P["kind"] == "unread":
    t.sendall(b"GET /big HTTP/1.1\r\nHost: slow.test\r\n\r\n")
    time.sleep(P["hold"])
    t.settimeout(0.5)
    got, state = 0, None
    try:
        while True:
            chunk = t.recv(1 << 20)
            if not chunk:
                state = "eof"
                break
            got += len(chunk)
    except TimeoutError:
        state = "open"
    except OSError as e:
        state = type(e).__name__
    result(state=state, read=got)
else:
    t.sendall(b"POST /slow HTTP/1.1\r\nHost: slow.test\r\nContent-Length: 67108864\r\n\r\n")
    t.settimeout(1.0)
    block = b"u" * 65536
    sent, ended = 0, None
    while time.monotonic() - t0 < P["hold"]:
        try:
            sent += t.send(block)
        except (TimeoutError, ssl.SSLWantWriteError):
            continue
        except OSError as e:
            ended = (type(e).__name__, round(time.monotonic() - t0, 1))
            break
    result(ended=ended, sent=sent)
"""


@pytest.mark.timeout(400)
@pytest.mark.attack("egress.relay", ref="session 32 Terminated._client_left/_from_upstream, MAX_INTERIM, UPSTREAM_STALL")
def test_legitimate_slow_answers_and_uploads_through_terminated_tls(terminated: dict[str, Any]) -> None:
    """Did the client watch, the 1xx cap or the stall timer break legitimate traffic inside
    terminated TLS? At once from rcx: a long poll answered after 90 s (the proxy waits on
    the upstream with the cage's side watched, no timeout of its own under 300 s); three
    103 Early Hints of ~8 KiB each before the answer (under ``MAX_INTERIM``); a 64 MiB POST
    body read by the server slowly for 150 s (the helper's run: 4 KiB every 0.5 s; here 16
    KiB, scaled to STALL). Since session 33 the proxy's write to the server ends once TCP
    has moved nothing for ``stall_seconds``. Safe: the poll's and the hints' answers arrive whole, and the upload is still
    going at 150 s."""
    out = terminated
    assert out["hints"]["status"] == "HTTP/1.1 200" and out["hints"]["body"] == "hints", out["hints"]
    assert out["poll"]["status"] == "HTTP/1.1 200" and out["poll"]["body"] == "done", out["poll"]
    assert out["upload"]["ended"] is None, out["upload"]


@pytest.mark.timeout(400)
@pytest.mark.attack("budget.exhaustion", ref="session 32's note: 'a terminated download to a cage that stops reading is bounded in memory, not in time'")
def test_a_terminated_download_the_cage_stops_reading_ends_within_the_stall_timer(terminated: dict[str, Any]) -> None:
    """rcx asks slow.test (terminated TLS) for 64 MiB and reads none of it. The proxy's
    write to the cage waited up to IDLE_TIMEOUT (300 s) with nothing moving, its thread,
    its ~2 MiB of buffers and one of the agent's connections held. Safe: like a tunnel's,
    a write that moves nothing for ``[egress] stall_seconds`` ends the connection: after
    3 × STALL s the cage reads what was queued and then the end."""
    unread = terminated["unread"]
    assert unread["state"] in ("eof", "ConnectionResetError"), unread
    assert unread["read"] < 16 << 20, unread


# In the cage: P["conns"] terminated connections to slow.test:8443, each GET /drib and its
# answer read whole; bytes and seconds each.
DRIBBLED = r"""
import ssl, threading, time
CTX = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem")
out = [None] * P["conns"]
def one(i):
    t0 = time.monotonic()
    try:
        s = socket.create_connection(("127.0.0.1", 3128), timeout=120)
        s.sendall(b"CONNECT slow.test:8443 HTTP/1.1\r\nHost: slow.test:8443\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        t = CTX.wrap_socket(s, server_hostname="slow.test")
        t.sendall(b"GET /drib HTTP/1.1\r\nHost: slow.test:8443\r\nConnection: close\r\n\r\n")
        n = 0
        while True:
            d = t.recv(65536)
            if not d:
                break
            n += len(d)
        out[i] = [n, round(time.monotonic() - t0, 1)]
    except Exception as e:
        out[i] = [type(e).__name__, round(time.monotonic() - t0, 1)]
th = [threading.Thread(target=one, args=(i,)) for i in range(P["conns"])]
for x in th: x.start()
for x in th: x.join()
result(out=out)
"""



@pytest.mark.timeout(300)
@pytest.mark.attack("budget.exhaustion", ref="session 32 Terminated._from_upstream (a non-blocking read, a poll, per wake-up)")
def test_an_answer_dribbled_a_segment_at_a_time_does_not_spin_the_core(hive: HiveProcess) -> None:
    """Since session 32 a terminated connection reads its upstream without blocking, after a
    poll of both sides, in Python: each TCP segment that brings part of a TLS record (no
    byte for h11 yet: the body pacer never sees it) is a loop under the core's GIL (a poll
    object, two registrations, two ``settimeout``, an SSLWantReadError raised and caught),
    where a blocking ``SSL_read`` waited for the whole record in C without the GIL. An
    upstream (an L7-ruled destination) writes its 1 MiB answer one byte a send; rcx reads
    it on 8 connections while the host calls ``whoami`` on rcy's agent.sock every 10 ms.
    Safe: rcy's calls keep their latency (p99 under 50 ms, none over 250 ms)."""
    core = hive.core_pid()
    assert core
    idle = latencies(hive, OTHER, 2)
    got: dict[str, Any] = {}
    th = threading.Thread(target=lambda: got.update(out=probe_result(hive.probe(
        AGENT, DRIBBLED, timeout=240, conns=8))))
    c0, t0 = cpu_seconds(core), time.monotonic()
    th.start()
    time.sleep(2)
    busy = latencies(hive, OTHER, 8)
    c1, t1 = cpu_seconds(core), time.monotonic()
    th.join()

    def p(xs: list[float], q: float) -> float:
        return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1)

    print(f"dribble: idle p50 {p(idle, .5)} p99 {p(idle, .99)} max {p(idle, 1)} ms; busy p50 {p(busy, .5)}"
          f" p99 {p(busy, .99)} max {p(busy, 1)} ms ({len(busy)} calls); core CPU {(c1 - c0) / (t1 - t0):.2f}"
          f" of a CPU over {t1 - t0:.0f} s; answers {got['out']['out']}")
    assert p(busy, .99) < 50 and p(busy, 1) < 250, (p(idle, .99), p(busy, .5), p(busy, .99), p(busy, 1))


@pytest.mark.attack("budget.exhaustion", ref="session 32 store/egress.py fair_recent (FAIR_WINDOW 2000); ops32 test_one_agents_refusals_do_not_push_anothers_off_the_dashboard")
def test_a_flood_longer_than_the_fair_window_does_not_push_anothers_decisions_off(tmp_path: Path) -> None:
    """The dashboard's egress log is each agent's fair share of the newest
    ``FAIR_WINDOW`` (2,000) decisions. An agent refuses at the proxy's pace (~170-200 a
    second, ``connections_per_second`` 100 on each of its two listeners): in ~10-12 s its
    flood is the whole window, and every other agent's decisions, however recent in time,
    are outside it: the dashboard (``EGRESS_LOG_SHOWN`` 100) shows only the flooder again,
    as before the fix (ops32 flooded for 3 s, 507 decisions). Here, in the store: bob's
    decision, then 2,100 of the flooder's. Safe: bob's decision is among the 100 shown."""
    from hyperhive.core.store import Store

    store = Store(tmp_path / "hive.db")
    try:
        def row(agent: str, at: float) -> Any:
            return {"agent": agent, "at": at, "host": "x.test", "port": 443, "address": None,
                    "allowed": False, "reason": "not allowed", "bytes_up": 0, "bytes_down": 0,
                    "closed_at": at}
        now = time.time()
        store.egress.log(row("bob", now))
        for i in range(2100):
            store.egress.log(row("flooder", now + 0.005 * i))  # 200 a second: 10.5 s
        shown = store.egress.fair_recent(100)
        agents = [r["agent"] for r in shown]
        print(f"shown: {len(agents)}, bob's: {agents.count('bob')}")
        assert "bob" in agents, f"{len(agents)} shown, all the flooder's"
    finally:
        store.close()

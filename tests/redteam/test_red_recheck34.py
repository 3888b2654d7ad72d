"""Re-check of session 34: inside terminated TLS, an answer that comes before the request's
end (``egress_tls.send_within``'s ``interrupt``, ``Terminated._answer_arrived``,
``_answer_early``, ``_linger``).

One agent (rc34) with L7 rules ``POST``/``GET early.test:443/*`` (terminated).
``early.test`` (198.18.136.2) is a TLS server of the test's own; it keeps what it saw per
connection and tells it on a plain port (8080) to the host only:
``POST /early`` answers 413 on the head (keep-alive, then an unasked second answer
``SMUGGLED``), waits 4 s and then reads whatever still comes until the end;
``POST /slowstream`` sends ``200`` with a chunked body's head at once (an upload's progress
stream), pauses 6 s, then reads the body whole, answering ``read N`` at its end;
``POST /bigearly`` answers 413 with an 8 MiB body on the head and reads nothing;
``POST /flood1xx`` sends 5,000 ``100 Continue`` and reads nothing; ``POST /dribble`` sends
an answer's head 8 bytes every 0.2 s and reads nothing; ``GET /conn`` answers, kept alive,
with its connection's number; ``POST /closes`` answers 413 and closes at once (Python's
http.server), ``POST /halfcloses`` after a close_notify and 0.5 s (Go's net/http).
``[egress] stall_seconds`` = STALL (8).

Broke (the failing cases, all fixed after this re-check): any final answer's head read during a 1 s wait of a blocked write
ends the request, whether or not the server will read again: an upload to a server that
sends ``200`` and a chunked progress head at once, pauses 6 s and then reads is cut (the
server read 1,540,096 of 8,388,608 bytes), the cage gets the head and an empty body, the
end 11 s in (before the change: the whole upload, then the answer; a 128 KB/s reader with
the same head was cut in some runs, 1,572,792 of 2,097,152). An early answer larger than the
buffers (8 MiB) to a cage that sends its whole body before reading is lost to the stall
(the cage got SSLEOFError at 10.1 s, nothing of the 413): the proxy writes the answer
without reading the cage. A server that answers 413 and closes (at once, or after a
close_notify and 0.5 s) makes the proxy's write fail within ~50 ms (SSLEOFError) before
``interrupt`` is ever asked: the connection ends with the 413 unread (it stays readable
after the reset), the cage sees the end within 0.1 s; all four cases, as before the change.
Held: nothing sent after the early answer reaches the server (the body's last MiB with a
marker and a second request: read and dropped); the early connection is never pooled, the
server's unasked second answer never relayed; the early answer after a kept-alive
exchange, to a chunked body, behind 100-continue; 5,000 1xx (502 in 1.1 s) and a dribbled
head (ended at 9.1 s) with the core at 0.003 CPU; one-byte records into 12 lingers held
at the agent's CPU share (~1.0) with verbs at p99 < 10 ms; a rule taken back ends a
lingering connection within 0.2 s; the core's threads and descriptors back afterwards.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hive_fixture import HiveProcess, probe_result, running_hive
from testnet import TestNet

from .egress_kit import cpu_seconds, latencies
from .test_red_recheck33 import OPEN_TLS
from .test_secrets_egress import cert_dir

AGENT = "rc34"
STALL = 8
BODY = 4 << 20
NET = TestNet(136, prefix="hvq34")
SERVER = NET.address(2)

EARLY_SERVER = r"""
import json, socket, ssl, sys, threading, time
ADDR, CERT = sys.argv[1], sys.argv[2]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(CERT)
SEEN, LOCK, COUNT = {}, threading.Lock(), [0]

def note(cid, **kw):
    with LOCK:
        SEEN.setdefault(str(cid), {}).update(kw)

def clen(head):
    for l in head.split(b"\r\n"):
        if l.lower().startswith(b"content-length:"):
            return int(l.split(b":")[1])
    return 0

def drain(t, cid, wait, first):
    time.sleep(wait)
    n, marks, tail, ended = len(first), set(), first[-64:], "eof"
    t.settimeout(20)
    try:
        while True:
            d = t.recv(65536)
            if not d:
                break
            n += len(d)
            w = tail + d
            for m in (b"MARK-END", b"GET /second"):
                if m in w:
                    marks.add(m.decode())
            tail = w[-64:]
    except (OSError, ssl.SSLError) as e:
        ended = type(e).__name__
    note(cid, body_read=n, marks=sorted(marks), ended=ended)

def read_head(t, data=b""):
    while b"\r\n\r\n" not in data:
        c = t.recv(65536)
        if not c:
            return None, b""
        data += c
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest

def answer(t, cid, head, rest):
    note(cid, path=head.split(b" ")[1].decode(errors="replace"), heads=SEEN.get(str(cid), {}).get("heads", 0) + 1)
    if head.startswith(b"POST /early"):
        body = b"too large c=%d" % cid
        t.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                  + b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED")
        drain(t, cid, 4, rest)
    elif head.startswith(b"POST /slowstream"):
        n, got = clen(head), len(rest)
        t.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        t.settimeout(30)
        time.sleep(6)  # (a pause, under the stall: a file opened, a backend asked), then reads it all
        while got < n:
            left = 65536
            while left > 0 and got < n:
                try:
                    d = t.recv(min(left, n - got))
                except (OSError, ssl.SSLError) as e:
                    d = b""
                if not d:
                    note(cid, read=got, cut=True)
                    return
                got += len(d)
                left -= len(d)
        note(cid, read=got)
        msg = b"read %d" % got
        t.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(msg), msg))
        time.sleep(1)
    elif head.startswith(b"POST /bigearly"):
        big = b"E" * ((1 << 20) if head.startswith(b"POST /bigearly1m") else (8 << 20))
        t.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(big) + big)
        time.sleep(40)
    elif head.startswith(b"POST /closes"):  # Python's http.server: answer, then close
        t.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large")
        t.close()  # (its unread input makes the close a reset)
    elif head.startswith(b"POST /halfcloses"):  # Go's net/http: answer, close_notify, 0.5 s, close
        t.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large")
        t.settimeout(0.5)
        try:
            t.unwrap()
        except (OSError, ssl.SSLError, ValueError):
            pass
        t.close()
    elif head.startswith(b"POST /flood1xx"):
        t.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" * 5000)
        time.sleep(40)
    elif head.startswith(b"POST /dribble"):
        t.sendall(b"HTTP/1.1 200 OK\r\n")
        for _ in range(300):
            time.sleep(0.2)
            t.sendall(b"X-D: 123\r\n")
    elif head.startswith(b"GET /conn"):
        with LOCK:
            k = SEEN[str(cid)]["gets"] = SEEN[str(cid)].get("gets", 0) + 1
        body = b"conn=%d n=%d" % (cid, k)
        t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        return rest  # (kept alive: the next request)

def serve(c):
    with LOCK:
        COUNT[0] += 1
        cid = COUNT[0]
    try:
        t = ctx.wrap_socket(c, server_side=True)
        head, rest = read_head(t)
        while head is not None:
            rest = answer(t, cid, head, rest)
            if rest is None:
                break
            head, rest = read_head(t, rest)
    except (OSError, ssl.SSLError, ValueError):
        pass
    finally:
        c.close()

def seen_server():
    p = socket.socket()
    p.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    p.bind((ADDR, 8080))
    p.listen(8)
    while True:
        c, _ = p.accept()
        with LOCK:
            body = json.dumps(SEEN).encode()
        c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        c.close()

threading.Thread(target=seen_server, daemon=True).start()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ADDR, 443))
s.listen(256)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def server_seen() -> dict[str, Any]:
    """What early.test saw, per connection (asked from the host, plain HTTP on 8080)."""
    with socket.create_connection((SERVER, 8080), timeout=10) as s:
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


# In the cage: ``post(path, n, mode, tail)``: a POST of n bytes to early.test; mode "all"
# sends the whole body, then reads (http.client); "duplex" reads while sending and stops
# once an answer comes (curl), then sends ``tail`` (the body's rest, then more) if given.
# What came back, how it ended and when.
POST = OPEN_TLS + r"""
import select, threading
def read_answer(t):
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
            [l.split(b":")[1] for l in data.partition(b"\r\n\r\n")[0].split(b"\r\n") if l.lower().startswith(b"content-length")][0]):
        c = t.recv(65536)
        if not c:
            break
        data += c
    return data

def post(path, n, mode, tail=b"", want=7, extra=b"", chunked=False, pre=False):
    t0 = time.monotonic()
    t = open_tls("early.test")
    t.settimeout(60)
    first = None
    if pre:  # a kept-alive exchange first, on the same connection
        t.sendall(b"GET /conn HTTP/1.1\r\nHost: early.test\r\n\r\n")
        first = read_answer(t).partition(b"\r\n\r\n")[2].decode(errors="replace")
    length = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % n
    t.sendall(b"POST %s HTTP/1.1\r\nHost: early.test\r\n%s\r\n%s\r\n" % (path.encode(), length, extra))
    interim = None
    if b"100-continue" in extra:
        interim = t.recv(4096).decode(errors="replace")[:30]
    data, err, sent, tail_sent = b"", None, 0, None
    block = b"10000\r\n" + b"x" * 65536 + b"\r\n" if chunked else b"x" * 65536
    try:
        if mode == "all":
            while sent < n:
                sent += t.send(block[:n - sent])
        else:
            t.setblocking(False)
            while sent < n and not data:
                r, w, _ = select.select([t], [t], [], 1)
                if r or t.pending():
                    try:
                        c = t.recv(65536)
                        if not c:
                            break  # (the end: read below, which sees it again)
                        data += c
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        pass
                elif w:
                    try:
                        sent += t.send(block if chunked else block[:min(65536, n - sent - len(tail))])
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        pass
                if time.monotonic() - t0 > 60:
                    break
            t.setblocking(True)
            t.settimeout(60)
        if tail:
            t.sendall(tail)
            tail_sent = round(time.monotonic() - t0, 1)
        while True:
            c = t.recv(65536)
            if not c:
                break
            data += c
            if data.endswith(b"\r\n0\r\n\r\n"):
                break
            if want and b"\r\n\r\n" in data and len(data.partition(b"\r\n\r\n")[2]) >= want and not tail:
                break
    except (OSError, ssl.SSLError) as e:
        err = type(e).__name__ + ": " + str(e)[:80]
    head, _, body = data.partition(b"\r\n\r\n")
    return dict(first=first, interim=interim, status=data[9:12].decode(errors="replace"), head=head.decode(errors="replace")[:300],
                body_len=len(body), tail=body.decode(errors="replace")[-60:], err=err, sent=sent,
                tail_sent=tail_sent, took=round(time.monotonic() - t0, 1))

def get_conn(k):
    t = open_tls("early.test")
    t.settimeout(30)
    out = []
    for _ in range(k):
        t.sendall(b"GET /conn HTTP/1.1\r\nHost: early.test\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
                [l.split(b":")[1] for l in data.partition(b"\r\n\r\n")[0].split(b"\r\n") if l.lower().startswith(b"content-length")][0]):
            c = t.recv(65536)
            if not c:
                break
            data += c
        out.append(data.partition(b"\r\n\r\n")[2].decode(errors="replace"))
    t.close()
    return out
"""

# The early answer on a connection, then the body's rest with a marker at its end and a
# second request sent on the same connection after it (both must be read and dropped);
# then a new connection's two GETs (the pool: never the early one's upstream).
EARLY = POST + r"""
n = P["n"]
tail = b"y" * (1 << 20) + b"MARK-END" + b"GET /second HTTP/1.1\r\nHost: early.test\r\n\r\n"
early = post("/early", n, "duplex", tail=tail)
time.sleep(0.5)
gets = get_conn(2)
result(early=early, gets=gets)
"""


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    with cert_dir("hvq34", "rc34 upstream CA", "rc34 servers", ["early.test"]) as (certs, _), NET as net:
        net.serve(SERVER, 443, [sys.executable, "-c", EARLY_SERVER, SERVER, str(certs / "server.pem")])
        agents = {AGENT: {"runtime": "command", "command": ["true"],
                          "egress": ["POST early.test:443/*", "GET early.test:443/*", f"{SERVER}:443"]}}
        h = HiveProcess(agents, sections={"egress": {"hosts": {"early.test": SERVER},
                                                     "upstream_ca": str(certs / "ca.pem"),
                                                     "stall_seconds": STALL}})
        for hv in running_hive(h):
            pid = hv.core_pid()
            assert pid is not None
            BASELINE.update(pid=pid, threads=len(os.listdir(f"/proc/{pid}/task")),
                            fds=len(os.listdir(f"/proc/{pid}/fd")))
            yield hv


BASELINE: dict[str, int] = {}


@pytest.fixture(scope="module")
def early(hive: HiveProcess) -> dict[str, Any]:
    out = probe_result(hive.probe(AGENT, EARLY, timeout=150, n=BODY))
    time.sleep(5)  # (the server reads what still comes 4 s after its answer)
    out["seen"] = server_seen()
    print(json.dumps(out, indent=1))
    return out


@pytest.mark.timeout(300)
@pytest.mark.attack("egress.request-smuggling", ref="session 34 Terminated._answer_early / _linger / _flush (_upstream_over)")
def test_nothing_the_cage_sends_after_an_early_answer_reaches_the_server(early: dict[str, Any]) -> None:
    """Held: a 4 MiB POST answered 413 on its head; once the answer came the cage sends the
    body's last MiB with ``MARK-END`` at its end and then a second request (``GET
    /second``) on the same connection. Safe: the cage gets the 413 with ``Connection:
    close``; the server, reading all that still comes 10 s later, never sees the marker nor
    the second request (the rest is read and dropped by ``_linger``), and far less than
    the body."""
    e = early["early"]
    assert e["status"] == "413" and "too large" in e["tail"], e
    assert "connection: close" in e["head"].lower(), e
    cid = e["tail"].rpartition("c=")[2][:4].strip()
    s = early["seen"][cid]
    assert s["path"] == "/early" and s["marks"] == [], s
    assert s["body_read"] < BODY // 2, s


@pytest.mark.timeout(300)
@pytest.mark.attack("egress.pool-desync", ref="session 34 Terminated._answer_early (never pooled); red team round 7 (pool-desync)")
def test_an_early_answer_connection_is_never_pooled_nor_its_extra_answer_relayed(early: dict[str, Any]) -> None:
    """Held: the server follows its early 413 with an unasked second answer (``SMUGGLED``).
    The cage's next connection (within the pool's 2 s) asks GET /conn twice. Safe: neither
    answer is ``SMUGGLED`` nor the 413's; both come from one new upstream connection, not
    the early one's."""
    e = early["early"]
    assert "SMUGGLED" not in e["tail"], e
    cid = e["tail"].rpartition("c=")[2][:4].strip()
    g = early["gets"]
    assert len(g) == 2 and all(x.startswith("conn=") for x in g), g
    assert g[0].split()[0] == g[1].split()[0] != f"conn={cid}", g


# -- 2. honest answers: a progress stream, a large early answer ---------------------------------

HONEST = POST + r"""
out = {}
def run(k, path, n, mode, want):
    out[k] = post(path, n, mode, want=want)
threads = [threading.Thread(target=run, args=(k, *v)) for k, v in P["cases"].items()]
for th in threads:
    th.start()
for th in threads:
    th.join()
result(**out)
"""
SLOW_N = 8 << 20
BIG_ANSWER = 8 << 20
BIG_BODY = 32 << 20
HONEST_CASES = {
    "slowstream": ("/slowstream", SLOW_N, "all", 0),
    "bigearly-all": ("/bigearly", BIG_BODY, "all", BIG_ANSWER),
    "bigearly-duplex": ("/bigearly", BIG_BODY, "duplex", BIG_ANSWER),
    "bigearly1m-all": ("/bigearly1m", BIG_BODY, "all", 1 << 20),
}


@pytest.fixture(scope="module")
def honest(hive: HiveProcess) -> dict[str, Any]:
    out = probe_result(hive.probe(AGENT, HONEST, timeout=150, cases=HONEST_CASES))
    # (the slow reader notes what it read once it has read what the buffers held and met
    # the proxy's end)
    end = time.monotonic() + 40
    while True:
        out["seen"] = server_seen()
        slow = [v for v in out["seen"].values() if v.get("path") == "/slowstream"]
        if time.monotonic() > end or (slow and "read" in slow[0]):
            break
        time.sleep(1)
    print(json.dumps(out, indent=1))
    print("\n".join(x for x in hive.log_tail(400).splitlines() if "egress rc34" in x)[-3000:])
    return out


@pytest.mark.timeout(300)
@pytest.mark.attack("egress.relay", ref="session 34 send_within's interrupt / Terminated._answer_arrived (a 2xx head taken for a final early answer)")
def test_an_upload_with_an_early_progress_head_reaches_the_server_whole(honest: dict[str, Any]) -> None:
    """An honest server that sends ``200`` with a chunked head at once (an upload's
    progress stream), pauses 6 s (under the stall: a file opened, a backend asked), then
    reads the 8 MiB body whole and answers ``read N``. Before session 34 the blocked write
    waited (the stall not reached) and went on. Now the first 1 s wait in which nothing
    moved finds the head and takes it for a final early answer, whether or not the server
    will read again: the upload is cut (the server read 1,540,096 of 8,388,608 bytes), the
    cage gets the head with ``Connection: close`` and an empty body, the end at 11 s.
    Safe: the server reads the whole body, the cage gets ``read 8388608``."""
    out = honest["slowstream"]
    seen = [v for v in honest["seen"].values() if v.get("path") == "/slowstream"]
    assert seen and seen[0].get("read") == SLOW_N and not seen[0].get("cut"), (out, seen)
    assert out["err"] is None and out["tail"].endswith(f"read {SLOW_N}\r\n0\r\n\r\n"), (out, seen)


@pytest.mark.timeout(300)
@pytest.mark.attack("egress.relay", ref="session 34 Terminated._answer_early (the answer written to a cage still blocked sending)")
def test_a_large_early_answer_reaches_a_cage_that_sends_before_it_reads(honest: dict[str, Any]) -> None:
    """A 32 MiB POST answered on its head with a 413 carrying 8 MiB (a large error page) by a
    server that reads no more. A cage that sends its whole body before it reads
    (http.client, requests) is blocked in its send while the proxy writes the answer, and
    the proxy reads nothing of the cage until the answer is out: each waits for the other
    until the stall ends it, the cage sees a reset (the symptom session 34 fixed, for an
    answer larger than the buffers). Safe (nginx discards the body while it sends the
    answer): the cage gets the whole 8 MiB, well within the stall. A cage reading as it
    sends (curl) gets it either way."""
    assert honest["bigearly-duplex"]["status"] == "413", honest["bigearly-duplex"]
    assert honest["bigearly-duplex"]["body_len"] == BIG_ANSWER, honest["bigearly-duplex"]
    out = honest["bigearly-all"]
    assert out["status"] == "413" and out["body_len"] == BIG_ANSWER and out["err"] is None, out
    assert out["took"] < 2 * STALL, out  # (6.4 s on a quiet machine; the stall's reset came at 10.1 s)


# -- 3. hostile servers: a 1xx flood, a dribbled head (both reading nothing) ------------------------

HOSTILE_CASES = {
    "flood1xx": ("/flood1xx", BODY, "duplex", 1),
    "dribble": ("/dribble", BODY, "duplex", 1),
}
CLOSING_CASES = {
    "closes-all": ("/closes", BODY, "all", 9),
    "closes-duplex": ("/closes", BODY, "duplex", 9),
    "halfcloses-all": ("/halfcloses", BODY, "all", 9),
    "halfcloses-duplex": ("/halfcloses", BODY, "duplex", 9),
}


@pytest.fixture(scope="module")
def hostile(hive: HiveProcess) -> dict[str, Any]:
    pid = hive.core_pid()
    assert pid is not None
    c0, t0 = cpu_seconds(pid), time.monotonic()
    out = probe_result(hive.probe(AGENT, HONEST, timeout=150, cases=HOSTILE_CASES))
    out["core_cpu"] = round((cpu_seconds(pid) - c0) / (time.monotonic() - t0), 3)
    print(json.dumps(out, indent=1))
    print("\n".join(x for x in hive.log_tail(300).splitlines() if "egress rc34" in x)[-3000:])
    return out


@pytest.mark.timeout(300)
@pytest.mark.attack("budget.exhaustion", ref="session 34 Terminated._answer_arrived (MAX_INTERIM; a head never whole)")
def test_a_1xx_flood_or_a_dribbled_head_during_a_blocked_write_ends(hostile: dict[str, Any]) -> None:
    """Held: servers that read nothing of a 4 MiB body and send 5,000 ``100 Continue``
    (one write) or an answer's head 8 bytes every 0.2 s, never whole. Safe: the flood is a
    502 within a few seconds (MAX_INTERIM counted across the blocked write and the relay),
    the dribble ends within the stall (a reset: there is no answer), and the core spends
    no more than a fraction of a CPU meanwhile."""
    f, d = hostile["flood1xx"], hostile["dribble"]
    print(hostile)
    assert f["status"] == "502" and f["took"] < STALL, f
    assert d["took"] < 2 * STALL + 4 and not d["status"].startswith("2"), d
    assert hostile["core_cpu"] < 0.3, hostile


# -- 4. the linger: one-byte TLS records from every connection the agent may open -----------------

# In the cage: P["conns"] connections each POST 64 MiB to /early (TLS over a memory BIO, so
# one send carries thousands of records), reading as they send; once the 413 came, each
# sends one-byte records (a fresh batch of 4,096 a write) for P["flood"] s, into _linger.
LINGER_FLOOD = OPEN_TLS + r"""
import select, threading
def bio_tls(host):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        c = s.recv(1)
        assert c, head
        head += c
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem")
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    o = ctx.wrap_bio(inc, out, server_hostname=host)
    while True:
        try:
            o.do_handshake()
            break
        except ssl.SSLWantReadError:
            s.sendall(out.read())
            d = s.recv(65536)
            assert d
            inc.write(d)
    s.sendall(out.read())
    return s, o, inc, out

res = {}
def one(i):
    t0 = time.monotonic()
    s, o, inc, out = bio_tls("early.test")
    n = 64 << 20
    o.write(b"POST /early HTTP/1.1\r\nHost: early.test\r\nContent-Length: %d\r\n\r\n" % n)
    s.sendall(out.read())
    got, pend, sent = b"", b"", 0
    s.setblocking(False)
    while b"too large" not in got and time.monotonic() - t0 < 30:
        if not pend:
            o.write(b"x" * 16384)
            pend = out.read()
        r, w, _ = select.select([s], [s], [], 1)
        if r:
            d = s.recv(65536)
            if not d:
                break
            inc.write(d)
            try:
                got += o.read(65536)
            except ssl.SSLWantReadError:
                pass
        elif w:
            try:
                k = s.send(pend)
                pend = pend[k:]
                sent += k
            except BlockingIOError:
                pass
    answered = round(time.monotonic() - t0, 1)
    s.setblocking(True)
    s.settimeout(10)
    if pend:
        s.sendall(pend)
    records, err, t1 = 0, None, time.monotonic()
    try:
        while time.monotonic() - t1 < P["flood"]:
            for _ in range(4096):
                o.write(b"z")
            s.sendall(out.read())
            records += 4096
    except OSError as e:
        err = type(e).__name__
    res[i] = dict(answered=answered, status=got[9:12].decode(errors="replace"), records=records,
                  per_s=round(records / (time.monotonic() - t1)), err=err, held=round(time.monotonic() - t1, 1))
    s.close()
threads = [threading.Thread(target=one, args=(i,)) for i in range(P["conns"])]
for th in threads:
    th.start()
for th in threads:
    th.join()
result(conns=[res.get(i) for i in range(P["conns"])])
"""
FLOOD_CONNS = 12
FLOOD = 9


@pytest.fixture(scope="module")
def lingering(hive: HiveProcess) -> dict[str, Any]:
    pid = hive.core_pid()
    assert pid is not None
    box: dict[str, Any] = {}

    def cage() -> None:
        box["out"] = probe_result(hive.probe(AGENT, LINGER_FLOOD, timeout=150, conns=FLOOD_CONNS, flood=FLOOD))

    th = threading.Thread(target=cage)
    th.start()
    time.sleep(4)  # (the early answers come within a few seconds; the flood runs FLOOD s)
    c0, t0 = cpu_seconds(pid), time.monotonic()
    lat = latencies(hive, AGENT, 4)
    core = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
    th.join()
    out = box["out"]
    out["core_cpu"] = round(core, 3)
    out["p50_ms"] = round(lat[len(lat) // 2] * 1000, 1)
    out["p99_ms"] = round(lat[int(len(lat) * 0.99)] * 1000, 1)
    out["records_per_s"] = sum(c["per_s"] for c in out["conns"] if c)
    print(json.dumps(out, indent=1))
    return out


@pytest.mark.timeout(300)
@pytest.mark.attack("budget.exhaustion", ref="session 34 Terminated._linger (one record a read, CpuMeter.pace only); red team round 23a (SMALL_PIECES)")
def test_one_byte_records_into_the_linger_stay_within_the_agents_cpu_share(lingering: dict[str, Any]) -> None:
    """Held: 12 connections each get the early 413, then send one-byte TLS records as fast
    as they can for 9 s into ``_linger`` (one record a read: no batching, no small-piece
    pacing as a body's pieces have). Safe: the core spends no more than the agent's egress
    share (``[egress] cpu`` 1.0) plus slack, its verbs answer at p99 under 50 ms, and
    each linger ends by LINGER_TIME. (Seen: ~17,000 records a second per lingering
    connection, the agent's other connections starved of its share for the rest.)"""
    conns = [c for c in lingering["conns"] if c and c["status"] == "413"]
    assert conns, lingering
    assert all(c["held"] < 31 for c in conns), lingering
    assert lingering["p99_ms"] < 50, lingering
    assert lingering["core_cpu"] < 1.3, lingering


# -- 5. servers that close after their early answer ------------------------------------------------


@pytest.fixture(scope="module")
def closing(hive: HiveProcess) -> dict[str, Any]:
    out = probe_result(hive.probe(AGENT, HONEST, timeout=150, cases=CLOSING_CASES))
    print(json.dumps(out, indent=1))
    return out


@pytest.mark.timeout(300)
@pytest.mark.attack("egress.relay", ref="session 34 send_within (a reset ends the write before interrupt is asked); Python http.server, Go net/http closeWriteAndWait")
@pytest.mark.parametrize("case", list(CLOSING_CASES))
def test_an_early_answer_followed_by_the_servers_close_reaches_the_cage(closing: dict[str, Any], case: str) -> None:
    """A 4 MiB POST answered 413 on its head by a server that then closes: at once (Python's
    http.server: its unread input makes the close a reset) or after a close_notify and
    0.5 s (Go's net/http). The proxy's write fails (SSLEOFError, EPIPE, ECONNRESET) within
    ~50 ms, before any 1 s wait ends and ``interrupt`` is asked: the connection ends with
    the 413 unread in the proxy's receive queue (on Linux it stays readable after the
    reset, through the failed SSL object too), and the cage sees the end within 0.1 s,
    the symptom session 34 fixed only for a server that stays. Safe: the cage gets the
    413 (``too large``)."""
    out = closing[case]
    print(case, out)
    assert out["status"] == "413" and out["tail"].endswith("too large"), out


# -- 6. the early answer after a kept-alive exchange, to a chunked body, behind 100-continue ----------

VARIANTS = POST + r"""
out = {}
def run(k, kw):
    out[k] = post("/early", P["n"], "duplex", **{a: (v.encode() if isinstance(v, str) else v) for a, v in kw.items()})
threads = [threading.Thread(target=run, args=(k, v)) for k, v in P["cases"].items()]
for th in threads:
    th.start()
for th in threads:
    th.join()
result(**out)
"""
VARIANT_CASES = {
    "kept-alive": {"pre": True},
    "chunked": {"chunked": True},
    "expect-100": {"extra": "Expect: 100-continue\r\n"},
}


@pytest.fixture(scope="module")
def variants(hive: HiveProcess) -> dict[str, Any]:
    out = probe_result(hive.probe(AGENT, VARIANTS, timeout=150, n=BODY, cases=VARIANT_CASES))
    time.sleep(5)
    out["seen"] = server_seen()
    print(json.dumps(out, indent=1))
    return out


@pytest.mark.timeout(300)
@pytest.mark.attack("egress.relay", ref="session 34 Terminated._answer_early after start_next_cycle / a fresh h11; chunked bodies; the proxy's own 100 Continue")
@pytest.mark.parametrize("case", list(VARIANT_CASES))
def test_an_early_answer_after_keep_alive_to_chunked_or_expect_bodies(variants: dict[str, Any], case: str) -> None:
    """Held: the early 413 on the second request of a kept-alive connection (after a GET
    answered with Content-Length: the upstream h11 renewed), to a chunked body, and to a
    body behind ``Expect: 100-continue`` (the proxy's own 100). Safe: the cage gets the
    413 of this connection with ``Connection: close``, never the server's unasked second
    answer; the server reads far less than the body and no second request."""
    out = variants[case]
    assert out["status"] == "413" and "too large" in out["tail"] and "SMUGGLED" not in out["tail"], out
    assert "connection: close" in out["head"].lower(), out
    cid = out["tail"].rpartition("c=")[2][:4].strip()
    s = variants["seen"][cid]
    assert s["path"] == "/early" and s["marks"] == [] and s["body_read"] < BODY // 2, (out, s)
    if case == "kept-alive":
        assert out["first"] == f"conn={cid} n=1" and s["heads"] == 2, (out, s)
    if case == "expect-100":
        assert out["interim"].startswith("HTTP/1.1 100"), out


# -- 7. the operator takes a rule back during the linger ------------------------------------------

# In the cage: the early 413, then a byte every 0.5 s for 25 s (the linger goes on); when
# the connection ended (wall clock), seen as an error or the end on a read or a write.
LINGER_REVOKED = POST + r"""
import select
t0 = time.monotonic()
t = open_tls("early.test")
t.sendall(b"POST /early HTTP/1.1\r\nHost: early.test\r\nContent-Length: %d\r\n\r\n" % P["n"])
t.setblocking(False)
data, sent = b"", 0
while b"too large" not in data and time.monotonic() - t0 < 30:
    r, w, _ = select.select([t], [t], [], 1)
    try:
        if r or t.pending():
            c = t.recv(65536)
            if not c:
                break
            data += c
        elif w:
            sent += t.send(b"x" * 65536)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        pass
answered, ended, how, drips = time.time(), None, None, 0
while time.time() - answered < 25 and ended is None:
    time.sleep(0.5)
    try:
        r, _, _ = select.select([t], [], [], 0)
        if r and not t.recv(65536):
            ended, how = time.time(), "eof"
        else:
            drips += t.send(b"z")
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        pass
    except (OSError, ssl.SSLError) as e:
        ended, how = time.time(), type(e).__name__
result(status=data[9:12].decode(errors="replace"), answered=answered, ended=ended, how=how, drips=drips)
"""


@pytest.mark.timeout(300)
@pytest.mark.attack("egress.l7-bypass", ref="session 34 Terminated._linger vs Proxy.revalidate (_end: both sockets shut down, wake)")
def test_a_rule_taken_back_ends_a_lingering_connection(hive: HiveProcess) -> None:
    """Held: with an extra rule ``PUT early.test:443/*``, a connection gets the early 413 and
    keeps the linger going (a byte every 0.5 s). The operator removes the PUT rule 8 s
    into the probe (the answer came a few seconds in). Safe: the lingering connection is ended (the rules that made it
    changed) within 2 s of the removal, not when the linger's 30 s are up."""
    assert hive.host_call("egress_allow", name=AGENT, rule="PUT early.test:443/*")["ok"]
    box: dict[str, Any] = {}

    def cage() -> None:
        box["out"] = probe_result(hive.probe(AGENT, LINGER_REVOKED, timeout=120, n=BODY))

    th = threading.Thread(target=cage)
    th.start()
    time.sleep(8)
    removed = time.time()
    assert hive.host_call("egress_remove", name=AGENT, rule="PUT early.test:443/*")["ok"]
    th.join()
    out = box["out"]
    print(f"removed at {removed:.1f}: {out}")
    assert out["status"] == "413" and out["answered"] < removed, out
    assert out["ended"] is not None and out["ended"] - removed < 2, out



# -- 8. what is left once every connection above has ended ------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.attack("budget.exhaustion", ref="session 34 _answer_early / _linger: threads and descriptors after the early answers, the resets and the lingers")
def test_threads_and_descriptors_come_back_after_the_early_answers(hive: HiveProcess) -> None:
    """Held: after every case above (early answers relayed, lingering, cut, reset, refused),
    within LINGER_TIME + STALL + 5 s the core's threads and descriptors are back to what
    they were when the hive started (a few more at most)."""
    pid = BASELINE["pid"]

    def now() -> tuple[int, int]:
        return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))

    end = time.monotonic() + 30 + STALL + 5
    while time.monotonic() < end:
        threads, fds = now()
        if threads <= BASELINE["threads"] + 2 and fds <= BASELINE["fds"] + 4:
            break
        time.sleep(1)
    print(f"baseline {BASELINE}, now threads={threads} fds={fds}")
    assert threads <= BASELINE["threads"] + 2 and fds <= BASELINE["fds"] + 4, (BASELINE, threads, fds)

"""Red team of session 20's diff: terminated TLS's CPU paced per agent and hive-wide
(``egress_tls.CpuPacer``, ``[egress] terminated_cpu`` and ``terminated_cpu_total``), a
paused relay woken when its connection is ended, and the inbox read set's sweep.

The hives here run /work/main's code (the venv's editable install), which moved during
the review: 2cfe19d (handshakes charged, early ends too) and cd8f4b9 (one bucket an
agent, the hive's total shared by the active agents). The unit cases run this worktree's.

Broke:
- a relay that ends with an exception is charged nothing since its last pace point.
  ``recv_batch`` reads up to 256 KiB one TLS record a ``recv``; a cage sends a request
  body of one-byte records and then a record with a bad MAC: the proxy decrypts the whole
  batch (~3 us a record), ssl.SSLError (an OSError) leaves ``Terminated.run`` and
  ``_terminate`` logs it, uncharged. An agent at ``terminated_cpu = 0.1`` held the core
  at 0.75 to 1.45 CPUs over four runs (the control, the same batches ended by a clean
  close: charged, 0.01 once its debt was owed); 0.18 s spent, 0 charged in the unit case;
  on 3f990dd and on main alike;
- ``terminated_cpu = 1e-300`` passes the config check; the first charge owes ~1e297 s
  and the pause raises OverflowError (``Event.wait``; main's ``time.sleep`` too), so every
  terminated connection dies in ``_serve``'s catch-all (low: the operator's config).
- (3f990dd only, fixed on main by 2cfe19d before this file ran there) a TLS 1.3
  ClientHello offering only ffdhe8192 with a key share of 4 costs the proxy's OpenSSL
  ~100 ms (measured locally with the hive's leaf context) and the cage ~0.3 ms; hung up
  after the ServerHello, no ``Terminated`` was made and nothing was charged.

Held (on main): that ffdhe8192 flood is charged and the core stays near the agent's 1
CPU; another agent's small calls meanwhile and during a one-byte-record upload flood
stay fast (per-agent buckets); the loop's whoami and agent_status stay fast; NaN, inf,
negative and huge settings are refused; a relay asleep on minutes of debt ends at once
when ``_end`` wakes it, and pauses no more; the read set's sweep (NOT EXISTS) keeps
exactly the operator's marks above the mark against SQL-shaped contents, a planted stray
row and ids out of range.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from hive_fixture import HiveProcess, running_hive
from hyperhive.config import EgressSection
from testnet import TestNet

from . import test_red_round23a as round23a
from .conftest import cage_run
from .egress_kit import EACH_CONN, TLS_CONNS
from .test_egress_cpu import core_cpu
from .test_secrets_egress import cert_dir

NET = TestNet(246, prefix="hvd20")
ADDR = NET.address(2)
HOST = "big.d20.test"
FLOOD, HOG, CALM = "d20flood", "d20hog", "d20calm"
# The defaults on the 2-CPU test machine (1 an agent; half the CPUs, at least 1, in all),
# written out so the case means the same on another machine.
PER_AGENT = TOTAL = 1.0
LOW = 0.1  # low_hive's agent
TINY_PARAMS = {"host": HOST, "procs": 2, "conns": 3, "seconds": 7.0, "records": 150_000}

# A TLS server: GET /small is answered "ok" (kept alive), anything else with an endless
# body as fast as it is read.
SERVER = r"""
import socket, ssl, sys, threading
ADDR, CERT = sys.argv[1], sys.argv[2]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(CERT)
BLOCK = b"\0" * 262144
def serve(c):
    try:
        t = ctx.wrap_socket(c, server_side=True)
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                chunk = t.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            if not head.startswith(b"GET /small "):
                break
            t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\n")
        while True:
            t.sendall(BLOCK)
    except (OSError, ssl.SSLError, ValueError):
        pass
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ADDR, 443))
s.listen(64)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# In the cage: for P["seconds"] s, a new terminated connection after another, each a
# GET /small and its answer; how long each took, CONNECT to "ok" (an agent's API calls).
SMALL_CALLS = (
    TLS_CONNS
    + r"""
def one(i, out):
    took, end = [], time.monotonic() + P["seconds"]
    while time.monotonic() < end:
        t0 = time.monotonic()
        t = tls_to(P["host"], 443, timeout=60)
        t.sendall(f"GET /small HTTP/1.1\r\nHost: {P['host']}\r\n\r\n".encode())
        got = b""
        while not got.endswith(b"ok"):
            chunk = t.recv(65536)
            if not chunk:
                break
            got += chunk
        t.close()
        took.append(round(time.monotonic() - t0, 3) if got.endswith(b"ok") else -1)
    out[i] = took
each_conn(one)
"""
)

# In the cage: P["conns"] threads, each for P["seconds"] s: CONNECT, a TLS 1.3 ClientHello
# offering only ffdhe8192 with a key share of 4 (a square: valid for any safe prime, so
# the server takes it), the first 5 bytes of the answer (the ServerHello's record header:
# the proxy has done its Diffie-Hellman by then), hang up. The handshakes each got.
HELLO_FLOOD = (
    EACH_CONN
    + r"""
import os, struct


def ext(t, body):
    return struct.pack("!HH", t, len(body)) + body


def client_hello(sni, group=0x0104, size=1024):
    name = sni.encode()
    exts = b"".join([
        ext(0, struct.pack("!HBH", len(name) + 3, 0, len(name)) + name),
        ext(43, b"\x02\x03\x04"),
        ext(10, struct.pack("!HH", 2, group)),
        ext(13, struct.pack("!HHHH", 6, 0x0403, 0x0804, 0x0401)),
        ext(51, struct.pack("!HHH", size + 4, group, size) + (4).to_bytes(size, "big")),
    ])
    body = (b"\x03\x03" + os.urandom(32) + b"\x20" + os.urandom(32)
            + struct.pack("!H", 6) + b"\x13\x01\x13\x02\x13\x03" + b"\x01\x00"
            + struct.pack("!H", len(exts)) + exts)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


def one(i, out):
    hello = client_hello(P["host"])
    done = refused = 0
    why = []
    end = time.monotonic() + P["seconds"]
    while time.monotonic() < end:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect("/run/hive/egress.sock")
            s.sendall(f"CONNECT {P['host']}:443 HTTP/1.1\r\nHost: {P['host']}:443\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    break
                head += chunk
            if not head.startswith(b"HTTP/1.1 200"):
                refused += 1
                why.append(head[:120].decode(errors="replace"))
                continue
            s.sendall(hello)
            if s.recv(5)[:1] == b"\x16":
                done += 1
        except OSError as e:
            refused += 1
            why.append(repr(e)[:120])
        finally:
            s.close()
    out[i] = [done, refused, sorted(set(why))[:3]]


each_conn(one)
"""
)


# In the cage: P["conns"] threads, each a terminated connection sending one GET whose
# body (a huge Content-Length) goes in TLS records of one byte each, P["burst"] records
# a write (made in a MemoryBIO: ~1 us of the cage's CPU a record), a pause of P["gap"] s
# between writes, for P["seconds"] s. The proxy reads a batch of up to 256 KiB of it in
# ``recv_batch``, one ``recv`` (one record) at a time: ~4 us a record, up to ~1.7 s of
# its CPU in one batch, charged only when the batch is through.
TINY_RECORDS = (
    EACH_CONN
    + r"""
import ssl


def one(i, out):
    host = P["host"]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect("/run/hive/egress.sock")
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise NoTunnel("connect closed: " + head.decode(errors="replace"))
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise NoTunnel("connect: " + head.decode(errors="replace")[:200])
    ctx = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem")
    inc, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
    o = ctx.wrap_bio(inc, outb, server_hostname=host)
    while True:
        try:
            o.do_handshake()
            break
        except ssl.SSLWantReadError:
            data = outb.read()
            if data:
                s.sendall(data)
            got = s.recv(65536)
            if not got:
                raise NoTunnel("closed in the handshake")
            inc.write(got)
    o.write(f"GET /up HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000000000000\r\n\r\n".encode())
    s.sendall(outb.read())
    sent, end = 0, time.monotonic() + P["seconds"]
    try:
        while time.monotonic() < end:
            for _ in range(P["burst"]):
                o.write(b"x")
            data = outb.read()
            # a send blocked on the proxy (its relay asleep on the debt) waits until the
            # end at most (it waited P["seconds"] more, the core's window long over)
            s.settimeout(max(0.05, end - time.monotonic()))
            while data:
                n = s.send(data)
                data = data[n:]
                sent += n // 22
            time.sleep(P["gap"])
    except OSError:
        pass
    s.close()
    out[i] = sent


each_conn(one)
"""
)


# In the cage: TINY_RECORDS' connection, but each sends P["records"] one-byte records of
# its body at once and then a record that does not decrypt (a bad MAC): the proxy reads
# them all in one ``recv_batch`` (~4 us a record) before the bad one raises ssl.SSLError,
# an OSError, which ends the relay before its next pace point: the batch's CPU is never
# charged. Then another connection, for P["seconds"] s; how many each made.
TINY_ABORT = (
    EACH_CONN
    + r"""
import ssl


# Each wait of the cage's at most ``most`` s and not past ``end`` (P["seconds"] in): the
# core's CPU window (2.5 to 6.5 s in) is over by then; a debt slept off longer ends the
# wait (before, each waited up to 8 s past the end: ~10 s of nothing a case).
def until(s, end, most=8.0):
    s.settimeout(min(most, max(0.05, end - time.monotonic())))


def tls_bio(host, end):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)  # a batch's records at once
    until(s, end)
    s.connect("/run/hive/egress.sock")
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise NoTunnel("connect closed: " + head.decode(errors="replace"))
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise NoTunnel("connect: " + head.decode(errors="replace")[:200])
    ctx = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem")
    inc, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
    o = ctx.wrap_bio(inc, outb, server_hostname=host)
    while True:
        try:
            o.do_handshake()
            break
        except ssl.SSLWantReadError:
            data = outb.read()
            if data:
                s.sendall(data)
            until(s, end)
            got = s.recv(65536)
            if not got:
                raise NoTunnel("closed in the handshake")
            inc.write(got)
    return s, o, outb


def one(i, out):
    host, made, end = P["host"], 0, time.monotonic() + P["seconds"]
    while time.monotonic() < end:
        try:
            s, o, outb = tls_bio(host, end)
        except TimeoutError:  # the end came in its CONNECT or handshake
            break
        try:
            o.write(f"GET /up HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100000000\r\n\r\n".encode())
            until(s, end)
            s.sendall(outb.read())
            for _ in range(P["records"]):
                o.write(b"x")
            until(s, end)
            if P["bad"]:
                s.sendall(outb.read() + b"\x17\x03\x03\x00\x20" + os.urandom(32))
            else:  # the control: the same batch, then a clean end
                s.sendall(outb.read())
                s.shutdown(socket.SHUT_WR)
                until(s, end, 2)  # (the relay sleeps its debt off before it closes)
            while s.recv(65536):
                pass
            made += 1
        except OSError:
            pass
        finally:
            s.close()
    out[i] = made


# P["procs"] processes (one GIL each), P["conns"] threads each; the connections each made.
pipes = []
for _ in range(P["procs"] - 1):
    r, w = os.pipe()
    if os.fork() == 0:
        got = {}
        threads = [threading.Thread(target=one, args=(i, got)) for i in range(P["conns"])]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        os.write(w, json.dumps([got.get(i, 0) for i in range(P["conns"])]).encode())
        os._exit(0)
    os.close(w)
    pipes.append(r)
# (each_conn's, the children's counts read after this process's threads: read as each_conn's
# argument, they were read first, and the processes ran one after the other, 7 s each)
got = {}


def run(i):
    try:
        one(i, got)
    except NoTunnel as e:
        got[i] = str(e)
    except Exception as e:
        got[i] = "error: " + type(e).__name__ + ": " + str(e)[:200]


threads = [threading.Thread(target=run, args=(i,)) for i in range(P["conns"])]
for th in threads:
    th.start()
for th in threads:
    th.join()
result(
    out=[got.get(i) for i in range(P["conns"])],
    others=[json.loads(os.read(r, 65536) or b"[]") for r in pipes],
)
"""
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Path]:
    """The upstream TLS server (SERVER) in the test namespace; the directory of its CA."""
    with cert_dir("hvd20", "d20 test CA", "d20 test upstream", [HOST]) as (d, _), NET as n:
        n.serve(ADDR, 443, [sys.executable, "-c", SERVER, ADDR, str(d / "server.pem")])
        yield d


def paced_hive(
    certs: Path, agents: tuple[str, ...], per_agent: float, total: float
) -> Iterator[HiveProcess]:
    egress = [f"GET {HOST}:443/*", f"{ADDR}:443"]  # an L7 rule: terminated
    specs = {a: {"runtime": "command", "command": ["true"], "egress": egress} for a in agents}
    sections = {
        "egress": {
            "hosts": {HOST: ADDR},
            "upstream_ca": str(certs / "ca.pem"),
            "terminated_cpu": per_agent,
            "terminated_cpu_total": total,
        }
    }
    yield from running_hive(HiveProcess(specs, sections=sections))


@pytest.fixture(scope="module")
def hive(upstream: Path) -> Iterator[HiveProcess]:
    yield from paced_hive(upstream, (FLOOD, CALM), PER_AGENT, TOTAL)


@pytest.fixture(scope="module")
def low_hive(upstream: Path) -> Iterator[HiveProcess]:
    """HOG alone, at LOW CPUs: its connections' setup, charged, is well within it."""
    yield from paced_hive(upstream, (HOG,), LOW, 0)


@pytest.fixture(scope="module")
def calm_alone(hive: HiveProcess) -> dict[str, Any]:
    """CALM's small calls alone for 2 s (tens of ms each), FLOOD quiet: the baseline of
    both cases that time them beside a flood (taken once, at the first; it was taken for
    3 s for each)."""
    return in_cages(hive, {CALM: (SMALL_CALLS, {"host": HOST, "conns": 1, "seconds": 2.0})})


def in_cages(h: HiveProcess, runs: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Each agent's script at once; what each returned (or its error)."""
    got: dict[str, Any] = {}

    def run(agent: str, script: str, params: dict[str, Any]) -> None:
        try:
            got[agent] = cage_run(h, agent, script, timeout=120, **params)
        except BaseException as e:  # shown by the caller
            got[agent] = {"error": repr(e)[:2000]}

    threads = [threading.Thread(target=run, args=(a, s, p)) for a, (s, p) in runs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def measured(
    h: HiveProcess, runs: dict[str, tuple[str, dict[str, Any]]]
) -> tuple[float, dict[str, Any]]:
    """``in_cages``, with the core's CPU a second from 2.5 s in to 6.5 s in."""
    rate: list[float] = []

    series: list[float] = []
    ran = threading.Event()

    def watch() -> None:  # every half second's too, for the print: up to 12 s, or the runs' end
        last = core_cpu(h)
        for k in range(24):
            time.sleep(0.5)
            now = core_cpu(h)
            series.append(round((now - last) / 0.5, 2))
            last = now
            if k == 4:
                cpu0, t0 = now, time.monotonic()
            if k == 12:
                rate.append((now - cpu0) / (time.monotonic() - t0))
            if k >= 12 and ran.is_set():
                break
        print("SERIES", series)

    w = threading.Thread(target=watch)
    w.start()
    got = in_cages(h, runs)
    ran.set()
    w.join()
    print(f"the core at {rate[0]:.3f} CPUs; got {got}")
    return rate[0], got


@pytest.mark.attack(
    "budget.exhaustion", ref="session 20: a cage's handshake charged only once it completes"
)
def test_aborted_ffdhe_handshakes_are_charged_to_the_agent(hive: HiveProcess) -> None:
    """16 threads in the cage, each a CONNECT and an ffdhe8192 ClientHello after another,
    hung up after the ServerHello's header, for 7 s: ~100 ms of the proxy's CPU each,
    ~0.3 ms of the cage's. On the diff as reviewed (3f990dd) a handshake that never
    completes made no ``Terminated`` and was never charged; main's 2cfe19d charges a
    connection that ends before its relay (``EgressProxy._pace_cpu``): the core stays
    near the agent's 1 CPU."""
    # (7 s: 8 before the CI trim; the core's window is 2.5-6.5 s from measured's start,
    # and the cage starts after it, so the flood covers it)
    rate, got = measured(hive, {FLOOD: (HELLO_FLOOD, {"host": HOST, "conns": 16, "seconds": 7.0})})
    out = got[FLOOD]
    assert "error" not in out, out
    done = sum(c[0] for c in out["out"] if isinstance(c, list))
    assert done > 20, out  # the proxy answered the hellos: it did the work
    # (1.40, not 1.30: a loaded CI run measured 1.307 once; uncharged, the flood takes the
    # core past the agent's share, unpaced)
    assert rate < PER_AGENT * 1.35 + 0.05, (rate, done)


@pytest.mark.attack(
    "budget.exhaustion", ref="session 20: one agent's debt in the hive's bucket, another's wait"
)
def test_one_agents_debt_does_not_stall_another_agents_calls(
    hive: HiveProcess, calm_alone: dict[str, Any]
) -> None:
    """CALM makes small API calls (a new terminated connection, GET /small, "ok"), alone
    and then while FLOOD sends ffdhe8192 hellos on 16 connections. FLOOD's charges (~100
    ms each, 16 at once) put the hive's bucket a second or more in debt; every pause point
    of CALM's (its handshake's charge, each flush) waits for the whole hive debt whatever
    CALM spent, so each call of CALM's, tens of ms alone, took seconds: FLOOD, paced to
    its own 1 CPU, denies every other agent's terminated egress (the runtime's model
    calls with a secret binding among them)."""
    alone = calm_alone
    assert "error" not in alone[CALM], alone
    base = sorted(alone[CALM]["out"][0])
    assert base and base[0] > 0, alone
    both = in_cages(
        hive,
        {
            FLOOD: (HELLO_FLOOD, {"host": HOST, "conns": 16, "seconds": 7.0}),
            CALM: (SMALL_CALLS, {"host": HOST, "conns": 1, "seconds": 7.0}),
        },
    )
    assert "error" not in both[CALM] and "error" not in both[FLOOD], both
    took = sorted(both[CALM]["out"][0])
    print(f"CALM alone: {base}; while FLOOD: {took}")
    assert took and min(took) > 0, both
    median = took[len(took) // 2]
    assert median < max(0.5, 5 * base[len(base) // 2]), (median, took, base)


@pytest.mark.attack("config.hostile", ref="session 20: terminated_cpu values")
@pytest.mark.parametrize("field", ["cpu", "cpu_total", "terminated_cpu", "terminated_cpu_total"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, -0.0001, 1025.0, "1e400"])
def test_hostile_cpu_settings_are_refused(field: str, value: Any) -> None:
    """(Session 21 named them ``cpu`` and ``cpu_total``, as tunnels are charged too;
    session 20's names still read.)"""
    with pytest.raises(ValidationError) as e:
        EgressSection.model_validate({field: value})
    assert field in str(e.value)
    dumped = EgressSection.model_validate({field: 0}).model_dump()
    assert dumped[field.removeprefix("terminated_")] == 0  # 0: no bound


@pytest.mark.attack(
    "egress.l7-bypass", ref="session 20: a relay asleep on a CPU debt, its connection ended"
)
def test_a_relay_asleep_on_a_cpu_debt_of_minutes_ends_when_woken() -> None:
    """A relay whose agent owes minutes of CPU at a low rate sleeps in its meter's
    ``pace``; ``_end`` (a rule taken back) wakes it at once, and every later pause of that
    connection is none. (Written against one hive-wide bucket, another agent's debt; since
    the buckets are per agent, the agent's own.)"""
    import ipaddress

    from hyperhive.core import egress
    from hyperhive.core.egress_tls import CpuMeter, CpuPacer, Plan, Terminated

    a, b = socket.socketpair()
    try:
        pacer = CpuPacer(per_agent=0.01, total=0.01)
        pacer.owed(FLOOD, 1.6)  # minutes of FLOOD's own debt (a pause is at most MAX_PAUSE)
        plan = Plan(host=HOST, port=443, rules=None, injections=())
        made: list[Terminated] = []
        ready = threading.Event()

        def relay() -> None:  # (thread_time is per thread: made and paced in one)
            t = Terminated(FLOOD, a, b, plan, lambda _r: None, meter=CpuMeter(pacer, FLOOD))  # type: ignore[arg-type]
            made.append(t)
            ready.set()
            t.meter.pace()

        paused = threading.Thread(target=relay)
        t0 = time.monotonic()
        paused.start()
        assert ready.wait(5.0)
        time.sleep(0.3)
        assert paused.is_alive()  # asleep on the hive's debt of minutes
        opened = egress._Open(
            HOST, 443, ipaddress.ip_address(ADDR), (a, b), "terminated", wake=made[0].meter.wake
        )
        egress._end(opened, egress.Decision(FLOOD, HOST, 443, True, "CONNECT (TLS terminated)"))
        paused.join(5.0)
        assert not paused.is_alive() and time.monotonic() - t0 < 1.5
        t1 = time.monotonic()
        made[0].meter.pace()  # a later debt: no pause
        assert time.monotonic() - t1 < 0.5
        assert a.recv(1) == b""  # and its sockets are shut down
    finally:
        a.close()
        b.close()


@pytest.mark.attack(
    "budget.exhaustion", ref="session 20: a relay ended by an exception is never charged"
)
def test_a_batch_ended_by_a_bad_record_is_charged(low_hive: HiveProcess) -> None:
    """HOG (``terminated_cpu = 0.1``), 2 processes of 3 threads in its cage, each a
    terminated connection after another: a GET whose body is 150,000 one-byte TLS records
    (sent at once: SO_SNDBUF holds them), then a record with a bad MAC. The proxy decrypts
    the batch in ``recv_batch``, the bad record raises ssl.SSLError out of
    ``Terminated.run`` and ``_terminate`` ends the relay (``except OSError``) with nothing
    charged since the handshake: the core spent what HOG's cage did and more, far past
    HOG's 0.1 CPU (0.75 to 1.45 CPUs in four runs). **Fixed**: ~0.10."""
    rate, got = measured(
        low_hive,
        {
            HOG: (
                TINY_ABORT,
                {**TINY_PARAMS, "bad": True},
            )
        },
    )
    out = got[HOG]
    assert "error" not in out, out
    made = [n for n in out["out"] + [m for o in out["others"] for m in o] if isinstance(n, int)]
    assert len(made) == 6, out  # every thread's flood ran (what each completed depends on
    # how long its debt is slept off before the proxy closes: past the cage's 8 s timeout
    # on a loaded machine, none)
    # Fixed: what a relay spent is charged however it ends (``_terminate``'s meter), and a
    # batch is at most BATCH_READS records: HOG's threads sleep their debt off.
    assert rate < LOW * 1.25 + 0.1, rate


@pytest.mark.attack(
    "budget.exhaustion", ref="session 20: a relay ended by an exception is never charged"
)
def test_the_same_batch_ended_cleanly_is_charged(low_hive: HiveProcess) -> None:
    """The control of the case above: the same connections and batches, each ended by
        the cage's clean close instead of a bad record. The batch is charged at the relay's
        next pace point and the core stays near HOG's 0.1 CPU (after the case above, which
        left HOG no debt: what it spent there was never charged). The batches' CPU is spent
    before it is charged (~2.5 s of it in the first 2 s here, HOG's bucket holding 0.1 s),
    then HOG's relays sleep it off, ~25 s."""
    rate, got = measured(low_hive, {HOG: (TINY_ABORT, {**TINY_PARAMS, "bad": False})})
    out = got[HOG]
    assert "error" not in out, out
    # (its relays asleep on their debt hold HOG's 16 slots: its later CONNECTs get 503s)
    assert len(out["out"]) == TINY_PARAMS["conns"], out
    assert rate < LOW * 1.25 + 0.1, rate


@pytest.fixture(scope="module")
def tiny_flood(hive: HiveProcess, calm_alone: dict[str, Any]) -> dict[str, Any]:
    """CALM's small calls alone (``calm_alone``); then TINY_RECORDS from FLOOD on 16
    connections for 7 s (10 before: the core's window is the same), CALM's calls beside
    it, the core's CPU measured from 2.5 s to 6.5 s in, and CALM's whoami and the
    operator's agent_status on host.sock timed from the host meanwhile (printed). Run
    once, last (it leaves FLOOD deep in debt)."""
    alone = calm_alone
    before = latencies(hive, 0.5)  # only printed (0.5 s: ~100 samples)
    tiny = {"host": HOST, "conns": 16, "seconds": 7.0, "burst": 65536, "gap": 0.0}
    during: list[float] = []
    timer = threading.Thread(target=lambda: during.extend(latencies(hive, 6.0, start=1.0)))
    timer.start()
    rate, both = measured(
        hive,
        {
            FLOOD: (TINY_RECORDS, tiny),
            CALM: (SMALL_CALLS, {"host": HOST, "conns": 1, "seconds": 7.0}),
        },
    )
    timer.join()
    print(
        f"latencies before: p50 {p(before, 0.5):.3f} p95 {p(before, 0.95):.3f}; during:"
        f" p50 {p(during, 0.5):.3f} p95 {p(during, 0.95):.3f} max {max(during):.3f}"
    )
    return {"alone": alone, "both": both, "rate": rate, "before": before, "during": during}


def latencies(h: HiveProcess, seconds: float, start: float = 0.0) -> list[float]:
    """CALM's whoami and the operator's agent_status, timed (round 23a's)."""
    return round23a.latencies(h, seconds, start, agent=CALM)


p = round23a.p


@pytest.mark.attack(
    "budget.exhaustion", ref="session 20: a charge after a 256 KiB batch of 1-byte records"
)
def test_tiny_records_hold_the_core_to_the_agents_bound(tiny_flood: dict[str, Any]) -> None:
    """FLOOD's 16 uploads of one-byte TLS records: each batch costs the proxy up to ~1.7 s
    of CPU before it is charged, 16 batches at once; the core must stay near FLOOD's 1
    CPU."""
    out = tiny_flood["both"][FLOOD]
    assert "error" not in out, out
    assert all(isinstance(n, int) and n > 0 for n in out["out"]), out
    assert tiny_flood["rate"] < PER_AGENT * 1.25 + 0.05, tiny_flood["rate"]


@pytest.mark.attack(
    "budget.exhaustion", ref="session 20: one agent's debt in the hive's bucket, another's wait"
)
def test_tiny_records_do_not_stall_another_agents_calls(tiny_flood: dict[str, Any]) -> None:
    """CALM's small API calls (a new terminated connection, GET /small, "ok") while FLOOD
    uploads in one-byte records: FLOOD's big charges put the hive's bucket seconds in
    debt, and each pause point of CALM's (its handshake's charge) waits for the whole hive
    debt whatever CALM spent. Alone, tens of ms a call."""
    alone, both = tiny_flood["alone"][CALM], tiny_flood["both"][CALM]
    assert "error" not in alone and "error" not in both, (alone, both)
    base, took = sorted(alone["out"][0]), sorted(both["out"][0])
    print(f"CALM alone: {base}; while FLOOD: {took}")
    assert base and took and min(base) > 0 and min(took) > 0, (base, took)
    median = took[len(took) // 2]
    assert median < max(0.5, 5 * base[len(base) // 2]), (median, took, base)


@pytest.mark.attack(
    "budget.exhaustion", ref="session 20: a relay ended by an exception is never charged"
)
def test_a_relay_ended_by_a_bad_record_is_charged_its_cpu(tmp_path: Path) -> None:
    """The relay of ``TINY_ABORT``'s connection, in this process: a GET whose body is
    one-byte TLS records, then one that does not decrypt. ``recv_batch`` reads the records
    one ``recv`` each, then the bad one raises ssl.SSLError out of ``Terminated.run``
    (``_terminate`` catches it as an OSError) with nothing charged since the last pace
    point: the whole batch's CPU is the core's, not the agent's."""
    import ssl

    from hyperhive.core.egress_tls import CpuMeter, CpuPacer, Plan, Terminated, sni_check
    from hyperhive.core.tls import HiveCA

    ca = HiveCA(tmp_path)
    server_ctx = ca.server_context(HOST, sni_check(HOST))
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cadata=ca.pem.decode())
    cage, proxy = socket.socketpair()
    up_proxy, up_far = socket.socketpair()
    rate = 0.01
    pacer = CpuPacer(per_agent=rate, total=0)
    spent: list[float] = []
    ended: list[BaseException] = []

    def relay() -> None:
        tls = server_ctx.wrap_socket(proxy, server_side=True)
        plan = Plan(host=HOST, port=443, rules=None, injections=())
        meter = CpuMeter(pacer, FLOOD)
        meter.wake()  # every pause returns at once: the charges alone are measured
        t = Terminated(FLOOD, tls, up_proxy, plan, lambda _r: None, meter=meter)  # type: ignore[arg-type]
        t0 = time.thread_time()
        try:
            t.run()
        except OSError as e:  # what _terminate catches
            ended.append(e)
        finally:
            meter.pace()  # what _terminate does (session 20's fix), however the relay ended
        spent.append(time.thread_time() - t0)

    def drain() -> None:  # the upstream takes what it is sent
        with contextlib.suppress(OSError):
            while up_far.recv(1 << 20):
                pass

    threads = [threading.Thread(target=relay), threading.Thread(target=drain, daemon=True)]
    for th in threads:
        th.start()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    o = client_ctx.wrap_bio(inc, out, server_hostname=HOST)
    while True:
        try:
            o.do_handshake()
            break
        except ssl.SSLWantReadError:
            cage.sendall(out.read())
            inc.write(cage.recv(65536))
    cage.sendall(out.read())
    o.write(f"GET /up HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 100000000\r\n\r\n".encode())
    for _ in range(60_000):
        o.write(b"x")
    try:
        cage.sendall(out.read() + b"\x17\x03\x03\x00\x20" + bytes(32))
    finally:
        threads[0].join(30.0)
        for s in (cage, proxy, up_proxy, up_far):
            s.close()
    assert ended and isinstance(ended[0], ssl.SSLError), ended  # the bad record ended it
    charged = pacer.owed(FLOOD, 0.0) * rate  # (a lower bound: the debt past the burst)
    print(f"relay spent {spent[0]:.3f} s of CPU, charged at least {charged:.3f}")
    assert spent[0] > 0.05, spent  # the batch cost the relay's thread real CPU
    assert charged >= 0.5 * spent[0] - rate, (charged, spent)


@pytest.mark.attack("config.hostile", ref="session 20: terminated_cpu values")
def test_a_tiny_rate_in_hive_toml_does_not_crash_the_relays() -> None:
    """``terminated_cpu = 1e-300`` passed the config's check (ge=0); the first charge then
    owed ~1e297 s, and the relay's pause raised OverflowError instead of sleeping: every
    terminated connection died in ``_serve``'s catch-all with a traceback logged.
    **Fixed**: a rate is 0 or at least 0.01 CPU, and a pause is at most MAX_PAUSE (one
    owed longer sleeps in turns)."""
    from pydantic import ValidationError

    from hyperhive.core.egress_tls import CpuMeter, CpuPacer

    for field in ("cpu", "cpu_total", "terminated_cpu", "terminated_cpu_total"):
        with pytest.raises(ValidationError, match=r"must be 0 \(no bound\) or at least 0.01 CPU"):
            EgressSection.model_validate({field: 1e-300})
    pacer = CpuPacer(per_agent=1e-300, total=0)  # (past the config: the pacer alone)
    meters: list[CpuMeter] = []
    raised: list[BaseException] = []

    def pause() -> None:  # (thread_time is per thread: the meter made and paced in one)
        meters.append(CpuMeter(pacer, FLOOD, since=time.thread_time() - 1.0))  # 1 s spent
        try:
            meters[0].pace()
        except BaseException as e:
            raised.append(e)

    th = threading.Thread(target=pause, daemon=True)
    th.start()
    time.sleep(0.3)
    assert th.is_alive(), raised  # asleep, not crashed
    meters[0].wake()
    th.join(5.0)
    assert not th.is_alive()
    assert not raised, raised


@pytest.mark.attack("surface.unpaged-listing", ref="session 20: the read set's sweep, NOT EXISTS")
def test_the_read_sets_sweep_keeps_exactly_the_operators_marks(tmp_path: Path) -> None:
    """The sweep's NOT EXISTS against hostile inbox contents: bodies and a sender's text
    shaped as SQL, a stray read row of another agent's message (planted, as an older
    store could hold), ids out of range. It keeps the marks above the mark that are
    messages to the operator, and nothing else."""
    from hyperhive.core.store import Store

    store = Store(tmp_path / "hive.db")
    try:
        hostile = "') OR 1=1; DELETE FROM inbox_read; --"
        ids = [store.messages.send("operator", "alice", "message", hostile).id for _ in range(5)]
        other = store.messages.send("bob", "alice", "message", "operator").id
        store.inbox_read.take({ids[1], ids[3], other, -5, 0, 2**63, 2**64})
        assert store.inbox_read.state() == (0, {ids[1], ids[3]})
        with store.db.tx() as tx:
            tx.execute("INSERT INTO inbox_read VALUES (?)", (other,))
        store.inbox_read.take({ids[0]})  # the mark moves over 0 and 1; the sweep runs
        assert store.inbox_read.state() == (ids[1], {ids[3]})
        assert store.inbox_read.unread() == 2
    finally:
        store.close()

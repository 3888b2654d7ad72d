"""Red team of session 21's two changes: tunnels and plain-HTTP relays charged to the
agent's egress CPU share (relay.py's Meter, core/egress.py's _serve, egress_tls.CpuPacer,
[egress] cpu / cpu_total with session 20's names as aliases), and e66ba55 (the operator's
spawn of a declared name adopted; an agent's refused; DeclaredNameTaken for 'spawn' rows).

Agents at [egress] cpu = 0.1, cpu_total = 0 (each its own
bucket), downloading from a zeros server in a test netns (TestNet 242); the core's CPU
read from /proc every 0.5 s, the rate over 2.5-6.5 s in. 2-CPU machine.

Broke, and fixed in session 21:
- a request head read a byte at a time is never charged when it ends refused (431 past
  16 KiB, 400, 403, 408): ``_serve``'s meter is made only once the connection is allowed,
  and ``_read_head`` paces nothing. 16 connections held the core at 1.45-1.56 CPUs (three runs) against
  the agent's 0.1, for as long as the cage likes (others' whoami/agent_status p95 0.7-0.8 ms
  -> 4.5-6.4 ms, max 14-88 ms). Medium (pre-existing, but the change claims "whatever kind").
- the same heads completed and allowed: charged only at the relay's first pace, after the
  fact: 1.54-1.66 CPUs for ~2.5 s (~4 CPU-s, 40x the 1 s burst) before 16 slots sleep
  40+ s of debt. Low (the long-run average is bounded; the "within 16 reads" claim isn't).

Held: many short tunnels (0.18-0.24: the charged 0.1 plus the loop's known per-connection
cost at ~110 connections/s: its thread start, two decision rows; noticed: at cpu = 0.1 that
uncharged part is as big as the share); uploads (0.104); directions ended by the peer's RST cost as clean
closes (0.200 vs 0.176); the copy path (pump) ended by EPIPE paces after its last work;
the pacer forgets 20,000 quiet names and keeps a debt; both alias names at once are refused
(pydantic extra_forbidden), NaN/huge already covered by test_red_diff20; an agent's spawn
of a destroyed declared name is refused; the operator's own request_spawn of it is adopted
with no parent and is never applied twice; an agent's child whose parent is destroyed stays
origin 'spawn' and a hive.toml declaring it is still refused.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hive_fixture import HiveProcess, running_hive
from testnet import TestNet

from . import test_red_round23a as round23a
from .conftest import cage_run
from .egress_kit import EACH_CONN
from .test_egress_cpu import core_cpu

NET = TestNet(242, prefix="hvd21")
ADDR = NET.address(2)
PORT = 9000
SLOW, LATE, SHORT, UP, RST, CALM = "rtslow", "rtlate", "rtshort", "rtup", "rtrst", "rtcalm"
FIN = "rtfin"  # the RST case's control, an agent of its own: both start with no debt
AGENTS = (SLOW, LATE, SHORT, UP, RST, CALM, FIN)
# What the loop spends logging ~100 decisions a second, uncharged (docs/security.md, Known
# limits: bounded by [egress] connections_per_second; the loop also starts each
# connection's thread): 0.08-0.14 measured here at ~110 tunnels a second.
LOOP_SHARE = 0.1
PER_AGENT, TOTAL = 0.1, 0  # each agent its own bucket: one's debt never slows another's test

SERVER = r"""
import socket, struct, sys, threading
BLOCK = b"\0" * 262144
def serve(c):
    try:
        mode = c.recv(1)
        if mode == b"u":  # an upload: take everything
            while c.recv(1 << 20):
                pass
        elif mode == b"r":  # 4 MiB, then a reset (SO_LINGER 0)
            c.sendall(b"\0" * (4 << 20))
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif mode == b"f":  # 4 MiB, then a clean close (the control)
            c.sendall(b"\0" * (4 << 20))
        else:
            while True:
                c.sendall(BLOCK)
    except OSError:
        pass
    finally:
        c.close()
srv = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=256)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    with NET as n:
        n.serve(ADDR, PORT, [sys.executable, "-c", SERVER, ADDR, str(PORT)])
        egress = [f"{ADDR}:{PORT}"]
        specs = {a: {"runtime": "command", "command": ["true"], "egress": egress} for a in AGENTS}
        sections = {"egress": {"cpu": PER_AGENT, "cpu_total": TOTAL}}
        yield from running_hive(HiveProcess(specs, sections=sections))


def measured(
    h: HiveProcess, agent: str, script: str, **params: Any
) -> tuple[float, list[float], dict[str, Any]]:
    """``script`` in ``agent``'s cage (P["seconds"] long); the core's CPU a second from 2.5 s
    to 6.5 s in, and every half second's. (The cases' floods last 6.5 s, 7 before the CI
    trim: the cage starts after this does, so its flood still covers the window.)"""
    got: dict[str, Any] = {}
    series: list[float] = []

    def run() -> None:
        try:
            got.update(cage_run(h, agent, script, timeout=120, **params))
        except BaseException as e:
            got["error"] = repr(e)[:2000]

    t = threading.Thread(target=run)
    t.start()
    last = core_cpu(h)
    cpu0 = t0 = 0.0
    rate = 0.0
    for k in range(14):
        time.sleep(0.5)
        now = core_cpu(h)
        series.append(round((now - last) / 0.5, 2))
        last = now
        if k == 4:
            cpu0, t0 = now, time.monotonic()
        if k == 12:
            rate = (now - cpu0) / (time.monotonic() - t0)
    t.join()
    print(f"the core at {rate:.3f} CPUs; series {series}; got {str(got)[:600]}")
    return rate, series, got


# In the cage: P["conns"] connections straight to egress.sock, each sending a plain-HTTP
# head one byte at a time, round robin, never finishing it: the proxy refuses each at
# 16 KiB (431), unread by any meter; then a new one, for P["seconds"] s.
SLOW_HEAD = r"""
import socket, time
def fresh():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("/run/hive/egress.sock")
    s.sendall(b"GET http://%s:%d/ HTTP/1.1\r\nX-Pad: " % (P["addr"].encode(), P["port"]))
    return s
conns = [fresh() for _ in range(P["conns"])]
count = [0] * len(conns)
sent = refused = finished = 0
end = time.monotonic() + P["seconds"]
while time.monotonic() < end:
    for i in range(len(conns)):
        try:
            if P["finish"] and count[i] >= 12000:  # a head the proxy allows, then gone
                conns[i].send(b"\r\n\r\n")
                conns[i].close()
                finished += 1
                conns[i], count[i] = fresh(), 0
                continue
            conns[i].send(b"a")
            sent += 1
            count[i] += 1
        except OSError:
            refused += 1
            conns[i].close()
            try:
                conns[i], count[i] = fresh(), 0
            except OSError:
                time.sleep(0.01)
result(sent=sent, refused=refused, finished=finished)
"""


def latencies(h: HiveProcess, seconds: float, start: float = 0.0) -> list[float]:
    """CALM's whoami and the operator's agent_status, timed (round 23a's)."""
    return round23a.latencies(h, seconds, start, agent=CALM)


pct = round23a.p


@pytest.mark.attack(
    "budget.exhaustion", ref="red team of session 21: a head read a byte at a time, then refused"
)
def test_slow_heads_refused_are_charged(hive: HiveProcess) -> None:
    """**Broke, fixed** (medium): 16 connections straight to egress.sock, each sending a plain-HTTP
    head one byte at a time (round robin) until the proxy refuses it at 16 KiB (431), then
    a new one. ``_serve`` makes its CpuMeter only after the decision allows the
    connection, and ``_read_head`` (recv, ``buf += chunk``, a search of the whole buffer
    each byte) never paces: every refused connection's CPU is charged to nobody. Measured:
    the core at 1.45-1.56 CPUs against the agent's 0.1, sustained; another agent's calls
    p95 0.7 -> 6.4 ms. Fix: make the meter at ``_serve``'s start (before ``_receive``),
    pace it in ``_read_head``'s loop (every few reads; its sleep with the slot held, the
    head deadline extended by nothing) and once in ``_serve``'s ``finally`` on every path,
    refusals too, before the slot is freed; read the head into a bytearray and search
    only the new bytes (plus 3) to end the quadratic cost. **Fixed** as suggested (the
    finally's pace after the sockets are closed): 0.16-0.2, of which ~0.08 is the loop's
    (accepting, and its GIL taken back from 16 reading threads), uncharged as the short
    tunnels' is."""
    before = latencies(hive, 0.5)  # only printed, beside ``during`` (0.5 s: ~100 samples)
    during: list[float] = []
    timer = threading.Thread(target=lambda: during.extend(latencies(hive, 5.0, start=2.0)))
    timer.start()
    rate, series, got = measured(
        hive, SLOW, SLOW_HEAD, conns=16, seconds=6.5, addr=ADDR, port=PORT, finish=False
    )
    timer.join()
    print(
        f"latency before p50 {pct(before, 0.5):.4f} p95 {pct(before, 0.95):.4f}; during p50 {pct(during, 0.5):.4f} p95 {pct(during, 0.95):.4f} max {max(during):.3f}"
    )
    assert "error" not in got, got
    assert rate < PER_AGENT * 1.25 + 0.05 + LOOP_SHARE, (rate, series, got)


# In the cage: P["conns"] threads, each opening tunnel after tunnel (CONNECT, P["take"]
# bytes down, close) for P["seconds"] s: every tunnel ends before its 16th pass.
SHORT_TUNNELS = (
    EACH_CONN
    + r"""
import socket, time
def one(i, out):
    n = busy = 0
    end = time.monotonic() + P["seconds"]
    buf = bytearray(1 << 16)
    while time.monotonic() < end:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        try:
            s.connect("/run/hive/egress.sock")
            t = "%s:%d" % (P["addr"], P["port"])
            s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n%s" % (t, t, P["mode"])).encode())
            head = b""
            while b"\r\n\r\n" not in head:
                c = s.recv(4096)
                if not c:
                    break
                head += c
            if not head.startswith(b"HTTP/1.1 200"):
                busy += 1  # 503 while the agent's slots sleep off its debt
                time.sleep(0.02)
                continue
            got = 0
            while got < P["take"]:
                k = s.recv_into(buf)
                if not k:
                    break
                got += k
            n += 1
        except OSError:
            pass
        finally:
            s.close()
    out[i] = (n, busy)
each_conn(one)
"""
)


@pytest.mark.attack(
    "budget.exhaustion", ref="red team of session 21: many short tunnels, each below a pace"
)
def test_many_short_tunnels_are_charged(hive: HiveProcess) -> None:
    """Held: 16 threads, tunnel after tunnel (256 KiB each, fewer than 16 passes): each
    direction's last pace charges it; the core at 0.18-0.24 (the charged 0.1 plus the
    loop's thread start and logging at ~110 connections/s, a Known limit), the debt slept with slots held (503s)."""
    rate, series, got = measured(
        hive,
        SHORT,
        SHORT_TUNNELS,
        conns=16,
        seconds=6.5,
        addr=ADDR,
        port=PORT,
        take=256 << 10,
        mode="d",
    )
    assert "error" not in got, got
    assert sum(n for n, _ in got["out"]) > 16, got
    # (+ LOOP_SHARE: the loop's logging of each decision, at connections_per_second)
    assert rate < PER_AGENT * 1.25 + 0.05 + LOOP_SHARE, (rate, series, got)


# In the cage: P["conns"] tunnels uploading zeros as fast as the proxy takes them.
UPLOAD = (
    EACH_CONN
    + r"""
import socket, time
def one(i, out):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect("/run/hive/egress.sock")
    t = "%s:%d" % (P["addr"], P["port"])
    s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\nu" % (t, t)).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        c = s.recv(4096)
        if not c:
            raise NoTunnel(head.decode(errors="replace"))
        head += c
    block = b"\0" * (1 << 20)
    sent, end = 0, time.monotonic() + P["seconds"]
    while time.monotonic() < end:
        sent += s.send(block)
    s.close()
    out[i] = sent
each_conn(one)
"""
)


@pytest.mark.attack("budget.exhaustion", ref="red team of session 21: uploading through tunnels")
def test_uploads_through_tunnels_are_charged(hive: HiveProcess) -> None:
    """Held: 4 tunnels uploading as fast as they go (the helper thread's meter): 0.104."""
    rate, series, got = measured(hive, UP, UPLOAD, conns=4, seconds=6.5, addr=ADDR, port=PORT)
    assert "error" not in got, got
    assert all(isinstance(n, int) and n > 1 << 20 for n in got["out"]), got
    assert rate < PER_AGENT * 1.25 + 0.05, (rate, series, got)


@pytest.mark.attack(
    "budget.exhaustion", ref="red team of session 21: tunnels ended by the peer's RST"
)
def test_tunnels_reset_by_the_peer_cost_no_more_than_closed_ones(hive: HiveProcess) -> None:
    """Held: 8 threads of tunnels, 4 MiB each then the server's close: a FIN (control)
    0.176, a RST (SO_LINGER 0; directions end by ECONNRESET/EPIPE) 0.200 (0.186 / 0.198 again).
    Each run is its own agent's (each bucket its own), so neither starts in the other's debt
    (one agent for both, with 3 s to pay the last run's debt before each, took 6 s more)."""
    rates = {}
    for mode, agent in (("f", FIN), ("r", RST)):
        rates[mode], _series, got = measured(
            hive,
            agent,
            SHORT_TUNNELS,
            conns=8,
            seconds=6.5,
            addr=ADDR,
            port=PORT,
            take=8 << 20,
            mode=mode,
        )
        assert "error" not in got, got
        assert sum(n for n, _ in got["out"]) > 8, got
    print("FIN vs RST", rates)
    assert rates["r"] < rates["f"] * 1.3 + 0.03, rates


@pytest.mark.attack(
    "budget.exhaustion", ref="red team of session 21: a head read a byte at a time, then allowed"
)
def test_slow_heads_allowed_are_charged(hive: HiveProcess) -> None:
    """**Broke, fixed** (low): the same 16 slow heads, each completed at 12,000 bytes into a GET
    the rules allow, then closed. Their head's CPU is charged, but only at the relay's
    end: the core ran at 1.54-1.66 CPUs for ~2.5 s (~4 CPU-s, 40 times the agent's 1 s
    burst of 0.1) before the 16 slots slept off ~40 s of debt (503s meanwhile). Fix: as
    above (pace while the head is read). **Fixed**: 0.16-0.2 a half second after the
    first (its burst: 0.3-0.4)."""
    rate, series, got = measured(
        hive, LATE, SLOW_HEAD, conns=16, seconds=8.0, addr=ADDR, port=PORT, finish=True
    )
    assert "error" not in got, got
    # (16 heads of 12,000 bytes: 192,000 sends; 230,000 to 336,000 go in 8 s here)
    assert got["finished"] >= 16, got
    # A second's burst (PER_AGENT CPU-seconds) and the rate: no half second near 1 CPU.
    assert max(series) < 0.5, (rate, series, got)


# -- in this process: the relay's copy path, the pacer's state ------------------------------


class Recording:
    """A relay Meter that records, per thread, the thread's CPU at each pace."""

    def __init__(self) -> None:
        self.paces: list[tuple[str, float]] = []

    def begin(self) -> None:
        pass

    def pace(self) -> None:
        self.paces.append((threading.current_thread().name, time.thread_time()))


@pytest.mark.attack(
    "budget.exhaustion", ref="red team of session 21: the copy path (pump) ended by an error"
)
def test_the_copy_path_ended_by_an_error_paces_after_its_last_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Held: with no pipe to be had (``pump``), a direction ended by the destination's
    error (EPIPE mid-write) and the other by the peer's end still pace once more after
    their last work: nothing a thread spent goes uncharged."""
    import socket

    from hyperhive import relay as relay_mod

    monkeypatch.setattr(relay_mod, "_pipe", lambda: None)
    a, cage = socket.socketpair()
    b, server = socket.socketpair()
    up, down = Recording(), Recording()
    done: list[float] = []

    def run() -> None:
        relay_mod.relay(a, b, (up, down))
        done.append(time.thread_time())

    t = threading.Thread(target=run, name="relay-down")
    t.start()
    end = time.monotonic() + 0.5
    while time.monotonic() < end:  # one-byte pieces up, as fast as they go
        cage.send(b"x")
        server.recv(65536)
    server.close()  # the upstream gone: the up direction's next send fails
    for _ in range(200):
        with contextlib.suppress(OSError):
            cage.send(b"x")
    cage.close()
    t.join(10)
    assert not t.is_alive() and done
    ups = [at for name, at in up.paces]
    downs = [at for name, at in down.paces if name == "relay-down"]
    print(f"up paces {len(ups)}, down paces {len(downs)}")
    assert len(ups) > 16, len(ups)  # paced along the way, every 16 passes
    assert downs and done[0] - downs[-1] < 0.005, (downs[-1:], done)


@pytest.mark.attack(
    "budget.exhaustion", ref="red team of session 21: the pacer's state across many names"
)
def test_the_pacers_buckets_do_not_grow_with_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Held: 20,000 agent names each charged 1 ms once (a hive's worth of agents come and
    gone, many times over): the sweep forgets the quiet ones that owe nothing, and a debt
    is kept."""
    from hyperhive.core import egress_tls

    clock = [1000.0]
    monkeypatch.setattr(egress_tls.time, "monotonic", lambda: clock[0])
    pacer = egress_tls.CpuPacer(per_agent=0.1, total=1.0)
    for i in range(20000):
        pacer.owed(f"a{i}", 0.001)
        clock[0] += 0.0001
    pacer.owed("owes", 5.0)
    clock[0] += 2.0
    pacer.owed("late", 0.001)
    clock[0] += 0.3
    pacer.owed("late", 0.001)
    assert len(pacer._buckets) <= 3, len(pacer._buckets)
    assert "owes" in pacer._buckets


# -- the spawn change (e66ba55), in process --------------------------------------------------


def _in_process_hive(tmp_path: Any, agents: dict[str, Any]) -> Any:
    from hyperhive.config import HiveConfig
    from hyperhive.core.events import EventBus
    from hyperhive.core.hive import Hive
    from hyperhive.core.store import Store

    from .test_red_recheck20 import Leftovers

    store = Store(tmp_path / "hive.db")
    config = HiveConfig.model_validate({"agents": agents})
    store.agents.sync_config(config.agents)
    life = Leftovers(set())
    return Hive(store, config, life, EventBus()), life


SPEC = {"runtime": "command", "command": ["true"]}


@pytest.mark.attack(
    "identity.forge-agent",
    ref="red team of session 21: an agent's spawn of a destroyed declared name",
)
def test_an_agent_cannot_spawn_a_destroyed_declared_agents_name(tmp_path: Any) -> None:
    """Held: the declared ``d21lead`` is destroyed by the operator; the hostile ``d21evil``
    asks to spawn ``d21lead`` (its home, uid, secrets and grants would follow the name at
    the next start): refused at the request. The operator's own request_spawn of it,
    approved, makes a root-level agent that the next start adopts (no parent), and the
    approval can't be applied twice."""
    import asyncio

    from hyperhive.core import approvals
    from hyperhive.core.actors import OPERATOR
    from hyperhive.core.refusals import Conflict
    from hyperhive.core.store.agents import DeclaredNameTaken  # noqa: F401

    hive, _life = _in_process_hive(tmp_path, {"d21lead": SPEC, "d21evil": SPEC})
    try:
        asyncio.run(hive.destroy(OPERATOR, "d21lead"))
        assert not hive.exists("d21lead")
        with pytest.raises(Conflict, match=r"declared in hive\.toml"):
            approvals.request(
                hive, "d21evil", "spawn", "a helper", {"name": "d21lead", "spec": SPEC}
            )
        mine = approvals.request(
            hive, "operator", "spawn", "remake it", {"name": "d21lead", "spec": SPEC}
        )
        asyncio.run(approvals.resolve(hive, mine.id, "approved", sha256=mine.payload_sha256))
        row = hive.store.agents.get("d21lead")
        assert row is not None and row.parent is None and row.origin == "operator"
        hive.store.agents.sync_config(hive.config.agents)  # the next start: adopted
        hive.store.agents.invalidate()
        row = hive.store.agents.get("d21lead")
        assert row is not None and row.parent is None
        asyncio.run(hive.destroy(OPERATOR, "d21lead"))
        with pytest.raises(Conflict):  # not pending any more: never applied again
            asyncio.run(approvals.resolve(hive, mine.id, "approved", sha256=mine.payload_sha256))
        assert not hive.exists("d21lead")
    finally:
        hive.store.close()


@pytest.mark.attack(
    "identity.forge-agent",
    ref="red team of session 21: an agent's child named like a declared agent after its parent is gone",
)
def test_an_agents_child_keeps_its_origin_when_its_parent_is_destroyed(tmp_path: Any) -> None:
    """Held: ``d21evil``'s child ``d21kid`` (origin spawn); ``d21evil`` is destroyed (the
    child loses its parent), then hive.toml declares ``d21kid``: the start is still refused
    (DeclaredNameTaken), not adopted as if the operator had made it."""
    import asyncio

    from hyperhive.core import approvals
    from hyperhive.core.actors import OPERATOR
    from hyperhive.core.store.agents import DeclaredNameTaken

    hive, _life = _in_process_hive(tmp_path, {"d21evil": SPEC})
    try:
        req = approvals.request(
            hive, "d21evil", "spawn", "a helper", {"name": "d21kid", "spec": SPEC}
        )
        asyncio.run(approvals.resolve(hive, req.id, "approved", sha256=req.payload_sha256))
        assert hive.store.agents.get("d21kid").origin == "spawn"
        asyncio.run(hive.destroy(OPERATOR, "d21evil"))
        hive.store.agents.invalidate()
        kid = hive.store.agents.get("d21kid")
        print("kid after its parent's destroy:", kid and (kid.origin, kid.parent))
        if kid is not None:
            from hyperhive.wire.common import AgentSpec

            with pytest.raises(DeclaredNameTaken):
                hive.store.agents.sync_config({"d21kid": AgentSpec.model_validate(SPEC)})
    finally:
        hive.store.close()

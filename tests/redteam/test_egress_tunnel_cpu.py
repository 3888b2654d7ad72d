"""What tunnels and plain-HTTP relays cost the core's CPU, charged to the agent's egress
share like terminated TLS's (``[egress] cpu`` and ``cpu_total``, core/egress_tls.CpuPacer;
relay.py's ``Meter``).

A tunnel's bytes move by ``splice(2)`` in two threads of the core's, ~0.2 s of CPU a GiB
in the kernel, with the GIL free: on the core's other CPUs, where no cgroup of the agent's
charges it. Before session 21 that was a Known limit of docs/security.md: an agent
downloading through a few tunnels from an allowed address held the core at what the
link could carry. Here the agents run in real cages, the upstream is a TCP server in a
test network namespace sending zeros as fast as it can, and the core's CPU is read from
/proc while they download.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hive_fixture import HiveProcess, running_hive
from testnet import TestNet

from .egress_kit import TUNNEL_TO
from .test_egress_cpu import download

NET = TestNet(241, prefix="hvtun")
ADDR = NET.address(2)
PORT = 9000
AGENTS = ("tun1", "tun2", "tun3")
PER_AGENT, TOTAL = 0.1, 0.15  # CPU seconds a second

# Zeros to every connection, as fast as it reads, whatever it sent.
SERVER = r"""
import socket, sys, threading
BLOCK = b"\0" * 262144
def serve(c):
    try:
        while True:
            c.sendall(BLOCK)
    except OSError:
        pass
    finally:
        c.close()
srv = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=128)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# In the cage: P["conns"] connections through the proxy, even ones a CONNECT tunnel, odd
# ones a plain-HTTP GET (the proxy's other relay), each read for P["seconds"] s; the
# bytes each got.
DOWNLOAD = (
    TUNNEL_TO
    + r"""
import time
def one(i, out):
    target = f"{P['addr']}:{P['port']}"
    if i % 2 == 0:
        s = tunnel_to(P["addr"], P["port"], unix=True, timeout=30)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect("/run/hive/egress.sock")
        s.sendall(f"GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    got, end = 0, time.monotonic() + P["seconds"]
    buf = bytearray(1 << 20)
    while time.monotonic() < end:
        n = s.recv_into(buf)
        if not n:
            break
        got += n
    s.close()
    out[i] = got
each_conn(one)
"""
)


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    with NET as n:
        n.serve(ADDR, PORT, [sys.executable, "-c", SERVER, ADDR, str(PORT)])
        egress = [f"{ADDR}:{PORT}"]  # an address rule, no L7: a byte tunnel
        specs = {a: {"runtime": "command", "command": ["true"], "egress": egress} for a in AGENTS}
        sections = {"egress": {"cpu": PER_AGENT, "cpu_total": TOTAL}}
        yield from running_hive(HiveProcess(specs, sections=sections))


def served(got: dict[str, object], agent: str) -> None:
    out = got[agent]
    assert isinstance(out, dict) and "error" not in out, (agent, out)
    assert all(isinstance(n, int) and n > 1 << 20 for n in out["out"]), (agent, out)


@pytest.mark.attack("budget.exhaustion", ref="Known limits: tunnels' CPU charged to no bucket")
def test_an_agents_tunnels_cost_the_core_its_share_only(hive: HiveProcess) -> None:
    """One agent downloads as fast as the upstream sends on 2 tunnels and 2 plain-HTTP
    relays. Uncharged (main before this change), the core ran at ~0.4 CPUs on the 2-CPU
    test machine for as long as the agent kept at it; it must stay near the agent's 0.1."""
    rate, got = download(hive, AGENTS[:1], conns=4, script=DOWNLOAD, addr=ADDR, port=PORT)
    served(got, AGENTS[0])
    assert rate < PER_AGENT * 1.25 + 0.05, rate


@pytest.mark.attack("budget.exhaustion", ref="Known limits: tunnels' CPU charged to no bucket")
def test_every_agents_tunnels_together_cost_the_core_the_hives_share(hive: HiveProcess) -> None:
    """Three agents at once, 2 connections each: 0.1 each would be 0.3 CPUs; the hive's
    0.15 is shared, 0.05 each, and each agent still gets its downloads served."""
    rate, got = download(hive, AGENTS, conns=2, script=DOWNLOAD, addr=ADDR, port=PORT)
    for agent in AGENTS:
        served(got, agent)
    assert rate < TOTAL * 1.25 + 0.05, rate


@pytest.mark.attack("egress.l7-bypass", ref="session 21: a tunnel's direction asleep on a debt")
def test_a_tunnels_two_directions_wake_together_when_it_is_ended() -> None:
    """A tunnel's two threads each pace on a meter of their own (``thread_time`` is per
    thread); ``_end`` (a rule taken back) wakes the one ``_Open`` holds, and that must end
    the other's pause too, or the direction asleep holds the slot for its debt."""
    import threading
    import time

    from hyperhive.core.egress_tls import CpuMeter, CpuPacer

    pacer = CpuPacer(per_agent=0.01, total=0)
    down = CpuMeter(pacer, AGENTS[0])
    up = down.sibling()
    slept: list[float] = []

    def owe_and_sleep() -> None:
        up.begin()
        up.add(5.0)  # 5 s of CPU at 0.01 CPU: a 60 s pause (MAX_PAUSE)
        t0 = time.monotonic()
        up.pace()
        slept.append(time.monotonic() - t0)

    th = threading.Thread(target=owe_and_sleep, daemon=True)
    th.start()
    time.sleep(0.3)
    assert th.is_alive() and not slept  # asleep on its debt
    down.wake()
    th.join(5)
    assert slept and slept[0] < 2.0, slept
    t0 = time.monotonic()
    up.pause(30.0)  # every later pause of the connection is none
    assert time.monotonic() - t0 < 1.0


@pytest.mark.attack("budget.exhaustion", ref="red team of session 21: a relay asleep when its agent stops")
def test_an_agents_stop_ends_its_connections_and_wakes_their_relays(tmp_path: Path) -> None:
    """The red team of session 21 noticed: stopping an agent closed its egress listener
    but not its connections, so a relay asleep on a CPU debt held its sockets (an
    upstream's too) for up to a pause (60 s). Now ``close`` ends each of them: sockets
    shut down, the pause woken, the log row saying why."""
    import socket
    import threading
    import time
    from ipaddress import ip_address

    from hyperhive.core import egress
    from hyperhive.core.egress_tls import CpuMeter, CpuPacer

    proxy = egress.EgressProxy(lambda _a: (), lambda _d: None)
    listeners = egress._Listeners(socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX))
    proxy._listeners[AGENTS[0]] = listeners  # (as listen() leaves them, without a loop)
    a, b = socket.socketpair()
    meter = CpuMeter(CpuPacer(0.01, 0), AGENTS[0])
    asleep = threading.Thread(target=meter.pause, args=(30.0,))
    t0 = time.monotonic()
    asleep.start()
    opened = egress._Open(ADDR, PORT, ip_address(ADDR), (a, b), "tunnel", wake=meter.wake)
    decision = egress.Decision(AGENTS[0], ADDR, PORT, True, "CONNECT")
    proxy._open[AGENTS[0]] = {decision.key: (opened, decision)}
    try:
        proxy.close(AGENTS[0], tmp_path / "egress.sock")
        asleep.join(5.0)
        assert not asleep.is_alive() and time.monotonic() - t0 < 1.0
        assert a.recv(1) == b"" and b.recv(1) == b""  # both sides shut down
        assert decision.reason == "CONNECT (ended: the agent stopped)", decision.reason
    finally:
        a.close()
        b.close()

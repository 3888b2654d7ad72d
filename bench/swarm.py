"""The swarm benchmark (issue 18; root: three network-namespace hosts, a 3-node NATS
JetStream cluster, a hive-core per host: tests/swarm_fixture.py). Only when named:
`bench/run.py --only swarm`.

  * send → recv p50 / p99, one message at a time: alice (host a) to dave (host a, the
    same hive) beside alice to bob (host b, through the bus); bob's recv is waiting in
    his core when alice sends; the time is alice's send line written → bob's reply read;
  * cross-host messages/s: alice (a) and carol (c) each send N to bob (b) at once; from
    the first send to the last message in bob's inbox (recv + ack);
  * messages/s at the window: b's hive-core stopped (SIGSTOP) while alice sends N to bob
    one at a time, so a holds 48 bundles on the pair and the rest in its outbox; from b's
    SIGCONT to the last message in bob's inbox (tests/test_swarm_limits.py asserts it);
  * the kills of tests/test_swarm_faults.py at 10,000 messages (the suite runs them on
    whole hives, these on hive-cores):
    alice streams to bob while b's hive-core, then a's NATS node, is killed with SIGKILL;
    the figure is how many places bob's inbox differs from what alice's host
    acknowledged (lost, duplicated or out of order; target 0).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from run import ROOT, Context, Row, Target, _cpu_seconds, percentile  # type: ignore[import-not-found]

sys.path.insert(0, str(ROOT / "tests"))
from swarm_faults import Run, kill9_nats_node, kill9_receiving_core  # type: ignore[import-not-found]
from swarm_fixture import Swarm, make_swarm  # type: ignore[import-not-found]

CMD = {"runtime": "command", "command": ["true"]}
AGENTS = {
    "a": {"alice": {**CMD, "peers": ["bob", "dave"]}, "dave": {**CMD, "peers": ["alice"]}},
    "b": {"bob": {**CMD, "peers": ["alice", "carol"]}},
    "c": {"carol": {**CMD, "peers": ["bob"]}},
}


class Line:
    """One agent.sock connection, blocking, one JSON line each way."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def write(self, **req: Any) -> None:
        self.sock.sendall(json.dumps(req).encode() + b"\n")

    def read(self) -> dict[str, Any]:
        reply: dict[str, Any] = json.loads(self.file.readline())
        assert reply.get("ok"), reply
        return reply

    def call(self, **req: Any) -> dict[str, Any]:
        self.write(**req)
        return self.read()


def _latency(swarm: Swarm, to_host: str, to: str, n: int) -> list[float]:
    alice = Line(swarm.cores["a"].agent_sock("alice"))
    rx = Line(swarm.cores[to_host].agent_sock(to))
    samples = []
    for i in range(n + 10):
        rx.write(cmd="recv", wait=10.0, max=1)
        time.sleep(0.001)  # the recv is parked in the core before the send
        t0 = time.perf_counter()
        alice.call(cmd="send", to=to, body=f"p{i}")
        got = rx.read()
        dt = time.perf_counter() - t0
        assert got["messages"], got
        rx.call(cmd="ack", ids=[m["id"] for m in got["messages"]])
        if i >= 10:  # warm-up
            samples.append(dt)
    return samples


def _pids(swarm: Swarm) -> list[int]:
    """The three hive-cores and the three NATS nodes (``ip netns exec`` execs the core)."""
    cores = [c.proc.pid for c in swarm.cores.values() if c.proc is not None]
    return cores + [p.pid for p in swarm.net.procs.values()]


def _throughput(swarm: Swarm, n: int) -> tuple[float, float]:
    """Messages/s, and the CPU the cores and nodes spent per message (µs): a figure the
    machine's other load moves far less than the rate."""
    pids = _pids(swarm)
    cpu0 = sum(_cpu_seconds(p) for p in pids)

    def sender(host: str, name: str) -> None:
        c = Line(swarm.cores[host].agent_sock(name))
        for i in range(n):
            c.write(cmd="send", to="bob", body=f"t{i}")
            if i % 64 == 63:
                for _ in range(64):
                    c.read()
        for _ in range(n % 64):
            c.read()

    bob = Line(swarm.cores["b"].agent_sock("bob"))
    got = 0
    t0 = time.perf_counter()
    threads = [threading.Thread(target=sender, args=hn) for hn in (("a", "alice"), ("c", "carol"))]
    for t in threads:
        t.start()
    while got < 2 * n:
        msgs = bob.call(cmd="recv", wait=10.0, max=500)["messages"]
        if not msgs:
            raise RuntimeError(f"bob got {got} of {2 * n}")
        got += len(msgs)
        bob.call(cmd="ack", ids=[m["id"] for m in msgs])
    dt = time.perf_counter() - t0
    for t in threads:
        t.join()
    cpu = sum(_cpu_seconds(p) for p in pids) - cpu0
    return 2 * n / dt, cpu / (2 * n) * 1e6


def _window(swarm: Swarm, n: int) -> tuple[float, int]:
    """Messages/s from b's resume to bob's last, with a held at the window meanwhile; and
    how many waited in a's outbox (the rest: the window's bundles on the bus)."""
    b = swarm.cores["b"]
    assert b.proc is not None
    alice = Line(swarm.cores["a"].agent_sock("alice"))
    os.kill(b.proc.pid, signal.SIGSTOP)
    try:
        for i in range(n):
            alice.call(cmd="send", to="bob", body=f"w{i}")
        waited = swarm.status("a")["outbox_unsent"]
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    bob, got, t0 = Line(b.agent_sock("bob")), 0, time.perf_counter()
    while got < n:
        msgs = bob.call(cmd="recv", wait=10.0, max=500)["messages"]
        if not msgs:
            raise RuntimeError(f"bob got {got} of {n}")
        got += len(msgs)
        bob.call(cmd="ack", ids=[m["id"] for m in msgs])
    return n / (time.perf_counter() - t0), waited


def bench_swarm(ctx: Context) -> list[Row]:
    if os.geteuid() != 0:
        return []
    with tempfile.TemporaryDirectory(prefix="hive-swarm-") as tmp:
        gen = make_swarm(
            Path(tmp),
            subnet=int(os.environ.get("HIVE_TEST_SWARM_SUBNET", "182")),
            agents=AGENTS,
            limits={"messages_per_second": 0},
        )
        swarm = next(gen)
        try:
            n, n_faults = ctx.n(500, 50), ctx.n(10_000, 1_000)
            same = _latency(swarm, "a", "dave", n)
            cross = _latency(swarm, "b", "bob", n)
            _throughput(swarm, ctx.n(500, 50))  # warm-up: the pullers, the roster cache
            rate, cpu = _throughput(swarm, ctx.n(5000, 500))
            at_window, waited = _window(swarm, ctx.n(3000, 100))
            faults = {
                "kill -9 of the receiving hive-core": kill9_receiving_core(swarm, n_faults),
                "kill -9 of the sender's NATS node": kill9_nats_node(swarm, n_faults),
            }
        finally:
            gen.close()
    note = f"{n} samples"
    ms = 1e3
    return [
        Row("swarm", "same-host send→recv p50", percentile(same, 50) * ms, "ms", None, note),
        Row("swarm", "same-host send→recv p99", percentile(same, 99) * ms, "ms", None, note),
        Row("swarm", "cross-host send→recv p50", percentile(cross, 50) * ms, "ms",
            Target("<=", 5.0), note),
        Row("swarm", "cross-host send→recv p99", percentile(cross, 99) * ms, "ms",
            Target("<=", 20.0), note),
        Row("swarm", "cross-host messages/s (a, c → b)", rate, "msg/s", Target(">=", 10_000),
            f"{2 * ctx.n(5000, 500)} messages"),
        Row("swarm", "CPU per cross-host message", cpu, "µs", None,
            "3 hive-cores + 3 NATS nodes, user+system"),
        Row("swarm", "cross-host messages/s from the window (b stopped, resumed)", at_window,
            "msg/s", None, f"{ctx.n(3000, 100)} sent, {waited} waited in a's outbox"),
    ] + [
        Row("swarm", f"{what} mid-stream: acked not once in order", run.wrong, "msgs",
            Target("<=", 0), _fault_note(run))
        for what, run in faults.items()
    ]  # fmt: skip


def _fault_note(run: Run) -> str:
    return (f"{len(run.acked):,} acked, {run.lost} lost, {run.duplicates} dup;"
            f" {run.seconds:.1f} s")  # fmt: skip


SWARM_BENCHMARKS = [bench_swarm]

"""Fault runs on the swarm's three test hosts, shared by tests/test_swarm_faults.py (a
suite-sized count) and bench/swarm.py (10,000 messages): a stream of messages from
alice (a) to bob (b), pipelined on one agent socket, with a fault partway through; then
everything alice's host acknowledged must be in bob's inbox once, in order.

A message counts as acknowledged when alice's ``send`` replied ok: her host committed
it (to its outbox) before that reply, so from then on the swarm owes its delivery."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any

from helpers import assert_ok, wait_for
from swarm_fixture import Swarm

WINDOW = 64  # sends written before their replies are read


@dataclass
class Run:
    acked: list[str] = field(default_factory=list)  # bodies alice's host acknowledged
    got: list[str] = field(default_factory=list)  # bodies in bob's inbox, in order
    seconds: float = 0.0

    @property
    def lost(self) -> int:
        return len(set(self.acked) - set(self.got))

    @property
    def duplicates(self) -> int:
        return len(self.got) - len(set(self.got))

    @property
    def in_order(self) -> bool:
        return self.got == self.acked

    @property
    def wrong(self) -> int:
        """Places where bob's inbox differs from what was acknowledged (0: each once, in
        order)."""
        return sum(x != y for x, y in zip_longest(self.acked, self.got))


def stream(swarm: Swarm, n: int, prefix: str, faults: dict[int, Callable[[], None]],
           host: str = "a", sender: str = "alice", to: str = "bob") -> list[str]:
    """Send ``n`` messages from ``sender``, calling ``faults[i]`` before message ``i``
    (at the window that holds it); the bodies acknowledged, in order."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(swarm.cores[host].agent_sock(sender)))
    lines = sock.makefile("rb")
    acked: list[str] = []
    pending = list(faults.items())
    try:
        for start in range(0, n, WINDOW):
            while pending and pending[0][0] < start + WINDOW:
                pending.pop(0)[1]()
            bodies = [f"{prefix}{i}" for i in range(start, min(n, start + WINDOW))]
            sock.sendall(b"".join(
                json.dumps({"cmd": "send", "to": to, "body": b}).encode() + b"\n" for b in bodies
            ))
            for body in bodies:
                reply: dict[str, Any] = json.loads(lines.readline())
                if reply.get("ok"):
                    acked.append(body)
    finally:
        sock.close()
    return acked


def drain(swarm: Swarm, host: str, agent: str, n: int, timeout: float = 30.0) -> list[dict]:
    """Receive and ack until ``n`` messages came (or the time is up); all of them."""
    got: list[dict] = []
    c = swarm.cores[host].agent(agent)

    def more() -> bool:
        resp = assert_ok(c.call("recv", wait=1.0, max=500))
        if resp["messages"]:
            got.extend(resp["messages"])
            assert_ok(c.call("ack", ids=[m["id"] for m in resp["messages"]]))
        return len(got) >= n

    try:
        wait_for(more, timeout=timeout, interval=0)
    except AssertionError as e:
        raise AssertionError(f"{e}: {len(got)} of {n} came (the swarm: {swarm.status(host)})") from None
    extra = assert_ok(c.call("recv", wait=0.3, max=500))["messages"]
    return got + extra


def kill9_receiving_core(swarm: Swarm, n: int) -> Run:
    """b's hive-core dies (SIGKILL) a third of the way in, with a bundle committed and
    maybe not yet acked on the bus; the rest wait in the stream until b is back."""
    t0 = time.perf_counter()
    run = Run(acked=stream(swarm, n, "d", {n // 3: swarm.cores["b"].kill9}))
    wait_for(lambda: not swarm.status("a")["hosts"][1]["reachable"], timeout=15)
    swarm.cores["b"].start()
    run.got = [m["body"] for m in drain(swarm, "b", "bob", len(run.acked), timeout=60)]
    run.seconds = time.perf_counter() - t0
    return run


def kill9_nats_node(swarm: Swarm, n: int) -> Run:
    """Host a's own NATS node dies a third of the way in; a's client moves to another
    node; R3 keeps what JetStream acked and a's outbox what it did not. The node is back
    at the end, and a's outbox empty."""
    t0 = time.perf_counter()
    run = Run(acked=stream(swarm, n, "k", {n // 3: lambda: swarm.net.kill9("a")}))
    run.got = [m["body"] for m in drain(swarm, "b", "bob", len(run.acked), timeout=60)]
    run.seconds = time.perf_counter() - t0
    swarm.net.start_node("a")
    wait_for(lambda: swarm.status("a")["outbox_unsent"] == 0, timeout=20)
    return run

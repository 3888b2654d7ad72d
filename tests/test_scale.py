"""Scale: many agents in real cages on one box, correct rather than fast (issue 17).

``N_AGENTS`` agents (``scNNN``), each a real cage whose harness holds its agent.sock
and whose ``command`` runtime writes the message it is given to ``$HOME/turn.json``:

1. ``hive up`` until every harness is connected (``agent_status``: running).
2. Every agent paused (its inbox left to the test) sends ``SENDS`` messages to the
   next one over its agent.sock, eight senders at a time; once a third are
   acknowledged, hive-core is killed with SIGKILL. ``hive up`` starts it again and
   each sender, refused or cut off meanwhile, reconnects and tries again (a new
   attempt number in the body).
3. Every agent reachable again, then each receives and acks its inbox: every send
   acknowledged to its sender is there exactly once (its id, its body), anything else
   there is an attempt the sender made whose reply the crash lost, no message twice,
   and nothing is left after the ack.
4. Unpaused, each agent gets a message from the operator, and its runtime, run by its
   harness in its cage, writes it to its home: every agent is reachable end to end.

hive-core's budget at the least per agent ([limits] agent_connections = 4, [egress]
max_connections = 1) is 19 descriptors an agent plus a reserve of 512: 1,000 agents fit
this machine's hard RLIMIT_NOFILE of 20,000 (``bench/run.py --only scale`` runs them);
here 300 fit CI's time.
``HIVE_TEST_SCALE`` runs another count by hand.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import hive_fixture
from hive_fixture import HiveFactory, HiveProcess, wait_until
from hyperhive.client import Client, HiveUnavailable

N_AGENTS = int(os.environ.get("HIVE_TEST_SCALE", "300"))
AGENTS = [f"sc{i:03d}" for i in range(N_AGENTS)]
SENDS = 10  # per agent: under the default burst, so no send is refused for its rate
SENDERS = 8  # threads: each sends for N_AGENTS / SENDERS agents in turn
WRITE_TURN = ["sh", "-c", 'cat > "$HOME/turn.json"']
# The least each agent may cost hive-core (see the docstring): what lets N agents fit.
SECTIONS = {"limits": {"max_agents": N_AGENTS, "agent_connections": 4},
            "egress": {"max_connections": 1}}


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("ok") is True, reply
    return reply


class Sender:
    """One agent's sends over its own agent.sock, reconnecting when the core goes away."""

    def __init__(self, hive: HiveProcess, name: str, to: str) -> None:
        self.hive, self.name, self.to = hive, name, to
        self.conn: Client | None = None
        self.acked: dict[int, str] = {}  # id -> body, every send the core acknowledged
        self.attempted: set[str] = set()  # every body written to the socket
        self.attempt = 0

    def send(self, seq: int, deadline: float) -> None:
        """Until ``seq`` is acknowledged (a new attempt after each failure)."""
        while True:
            body = f"{self.name}:{seq}:{self.attempt}"
            try:
                if self.conn is None:
                    self.conn = Client(self.hive.agent_sock(self.name), timeout=30)
                self.attempted.add(body)
                reply = self.conn.call("send", to=self.to, body=body)
                if reply.get("ok"):
                    self.acked[reply["id"]] = body
                    return
                raise ConnectionError(reply)  # refused while the core starts: try again
            except (OSError, ValueError, HiveUnavailable):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
            self.attempt += 1
            assert time.monotonic() < deadline, f"{self.name}: seq {seq} never acknowledged"
            time.sleep(0.1)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


@pytest.mark.timeout(600)
def test_agents_at_scale_deliver_exactly_once_across_a_core_kill(
    hive_factory: HiveFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    t_start = time.monotonic()
    agents = {name: {"runtime": "command", "command": WRITE_TURN, "peers": [AGENTS[(i + 1) % N_AGENTS]]}
              for i, name in enumerate(AGENTS)}
    monkeypatch.setattr(hive_fixture, "READY_TIMEOUT", 400.0)  # `hive: ready` waits for all
    hive = hive_factory(agents, start=False, sections=SECTIONS)
    hive.wait_running = functools.partial(HiveProcess.wait_running, hive, timeout=300)  # type: ignore[method-assign]
    hive.start()  # returns once agent_status shows every harness connected
    up = time.monotonic() - t_start
    rows = hive.agent_status()
    assert sorted(n for n, r in rows.items() if r["running"]) == AGENTS

    for name in AGENTS:  # paused: their harnesses take no turns, the test reads their inboxes
        ok(hive.host_call("set_paused", name=name, paused=True))
    old_core = hive.core_pid()
    assert old_core is not None
    senders = [Sender(hive, name, AGENTS[(i + 1) % N_AGENTS]) for i, name in enumerate(AGENTS)]
    deadline = time.monotonic() + 300
    acked_count = Counter[str]()
    lock = threading.Lock()

    def run(group: list[Sender]) -> None:
        for seq in range(SENDS):
            for s in group:
                s.send(seq, deadline)
                with lock:
                    acked_count["n"] += 1

    t_send = time.monotonic()
    with ThreadPoolExecutor(max_workers=SENDERS) as pool:
        futures = [pool.submit(run, senders[k::SENDERS]) for k in range(SENDERS)]
        wait_until(lambda: acked_count["n"] >= N_AGENTS * SENDS // 3 or any(f.done() for f in futures),
                   120, "a third of the sends to be acknowledged", interval=0.01)
        at_kill = acked_count["n"]
        os.kill(old_core, signal.SIGKILL)
        killed = time.monotonic()
        new_core = wait_until(lambda: (p := hive.core_pid()) not in (None, old_core) and p, 120,
                              "hive up to start hive-core again")
        hive.wait_running(timeout=300)  # every harness connected again
        back = time.monotonic() - killed
        for f in futures:
            f.result()
    sending = time.monotonic() - t_send
    for s in senders:
        s.close()
    assert 0 < at_kill < N_AGENTS * SENDS, f"the kill came after all sends or before any: {at_kill}"
    assert "hive-core exited with status -9" in hive.log_path.read_text()

    # Every acknowledged send delivered exactly once; nothing invented, nothing twice.
    delivered = unacked_stored = 0
    for i, name in enumerate(AGENTS):
        sender = senders[i - 1]
        got = ok(hive.agent_call(name, "recv", wait=0, max=1000))["messages"]
        ids = [m["id"] for m in got]
        assert len(ids) == len(set(ids)), f"{name}: a message twice in one recv: {ids}"
        bodies = {m["id"]: m["body"] for m in got}
        assert all(m["from"] == sender.name for m in got), (name, got)
        assert all(n == 1 for n in Counter(bodies.values()).values()), f"{name}: one body under two ids"
        for mid, body in sender.acked.items():
            assert bodies.get(mid) == body, f"{sender.name} -> {name}: acked {mid} {body!r}, got {bodies.get(mid)!r}"
        for mid, body in bodies.items():
            if mid not in sender.acked:  # stored, but its reply was lost to the crash
                assert body in sender.attempted, (name, mid, body)
                unacked_stored += 1
        assert sorted(int(b.split(":")[1]) for b in sender.acked.values()) == list(range(SENDS)), sender.name
        ok(hive.agent_call(name, "ack", ids=ids))
        assert ok(hive.agent_call(name, "recv", wait=0, max=1000))["messages"] == [], name
        delivered += len(got)

    # Every agent reachable end to end: its harness runs its runtime in its cage.
    t_reach = time.monotonic()
    for name in AGENTS:
        ok(hive.host_call("set_paused", name=name, paused=False))
        ok(hive.host_call("send", to=name, body=f"reach {name}"))

    def reached(name: str) -> bool:
        try:
            return json.loads((hive.home(name) / "turn.json").read_text())["body"] == f"reach {name}"
        except (OSError, ValueError):
            return False

    wait_until(lambda: all(reached(n) for n in AGENTS), 300, "every agent's runtime to take its turn",
               interval=0.2)
    reach = time.monotonic() - t_reach
    rows = hive.agent_status()
    assert all(rows[a]["running"] and not rows[a]["failed"] for a in AGENTS)
    print(f"\nscale: {N_AGENTS} cages up in {up:.1f} s; {sum(len(s.acked) for s in senders)} sends "
          f"acknowledged in {sending:.1f} s ({at_kill} before the kill -9 of hive-core {old_core} -> "
          f"{new_core}), every harness back {back:.1f} s after it; {delivered} delivered "
          f"({unacked_stored} stored without an acknowledgement); every runtime reached in {reach:.1f} s; "
          f"{time.monotonic() - t_start:.1f} s in all")

"""Fault runs on the swarm's three test hosts, shared by tests/test_swarm_faults.py
(whole hives, 10,000 messages) and bench/swarm.py (hive-cores): a stream of messages
from alice (a) to bob (b), pipelined on alice's agent socket, with a fault partway
through; then everything alice's host acknowledged must be in bob's inbox once, in order.

The stream is sent by one process speaking as alice: on a whole hive it runs in alice's
cage (``hive exec --as-agent``: her uid, on her ``/run/hive/agent.sock``, whose listener
takes a connection only from her uids or root's, by SO_PEERCRED); on a hive-core, as
root on her socket's path. It stops at each fault (a line on its stdout)
until the test has done it (a line on its stdin). The receiver's inbox is read the same
way (``drain``): from bob's cage on a whole hive, as root on his socket on a hive-core.

A message counts as acknowledged when alice's ``send`` replied ok: her host committed
it (to its outbox) before that reply, so from then on the swarm owes its delivery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any

from helpers import assert_ok, wait_for
from hive_fixture import HIVE, HiveProcess
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


# The sender: argv is the socket, the recipient, the bodies' prefix, n, the window and
# the fault indexes (JSON); it prints "me <uid> <name>", "fault <i>" (then waits for a
# line on stdin) and at the end "acked <the bodies acknowledged, JSON>".
SENDER = """
import json, os, socket, sys
path, to, prefix, n, window, faults = sys.argv[1:]
n, window, faults = int(n), int(window), json.loads(faults)
s = socket.socket(socket.AF_UNIX)
s.connect(path)
lines = s.makefile("rb")
s.sendall(b'{"cmd": "whoami"}\\n')
print("me", os.getuid(), json.loads(lines.readline())["name"], flush=True)
acked = []
for start in range(0, n, window):
    while faults and faults[0] < start + window:
        print("fault", faults.pop(0), flush=True)
        sys.stdin.readline()
    bodies = [prefix + str(i) for i in range(start, min(n, start + window))]
    s.sendall(b"".join(json.dumps({"cmd": "send", "to": to, "body": b}).encode() + b"\\n"
                       for b in bodies))
    for b in bodies:
        if json.loads(lines.readline()).get("ok"):
            acked.append(b)
print("acked", json.dumps(acked), flush=True)
"""


def sender_argv(node: Any, name: str) -> list[str]:
    """The sender speaking as ``name``: in its cage on a whole hive, else on its socket."""
    if isinstance(node, HiveProcess):
        return [str(HIVE), "--run-dir", str(node.run_dir), "exec", "--as-agent", name, "--",
                "python3", "-u", "-c", SENDER, "/run/hive/agent.sock"]  # fmt: skip
    return [sys.executable, "-u", "-c", SENDER, str(node.agent_sock(name))]


def stream(swarm: Swarm, n: int, prefix: str, faults: dict[int, Callable[[], None]],
           host: str = "a", sender: str = "alice", to: str = "bob") -> list[str]:
    """Send ``n`` messages from ``sender``, calling ``faults[i]`` before message ``i``
    (at the window that holds it); the bodies acknowledged, in order."""
    node = swarm.cores[host]
    argv = [*sender_argv(node, sender), to, prefix, str(n), str(WINDOW), json.dumps(sorted(faults))]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    acked: list[str] | None = None
    try:
        for line in proc.stdout:
            word, _, rest = line.rstrip("\n").partition(" ")
            if word == "me":  # the uid it runs as, and whom the hive takes it for
                uid, name = rest.split(" ")
                assert name == sender, name
                if isinstance(node, HiveProcess):
                    assert int(uid) == node.cage(sender)["uid"] != 0, (uid, node.cage(sender))
            elif word == "fault":
                faults[int(rest)]()
                proc.stdin.write("\n")
                proc.stdin.flush()
            elif word == "acked":
                acked = json.loads(rest)
        assert proc.wait(60) == 0 and acked is not None, f"the sender exited with {proc.returncode}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return acked


def drain(swarm: Swarm, host: str, agent: str, n: int, timeout: float = 30.0, extra: float = 0.3) -> list[dict]:
    """Receive and ack until ``n`` messages came (or the time is up), then whatever
    comes within ``extra`` seconds more (acked too); all of them. On a whole hive
    ``agent`` does it from its cage (``Caged``), on a hive-core root on its socket."""
    got: list[dict] = []
    node = swarm.cores[host]
    c = node.caged(agent) if isinstance(node, HiveProcess) else node.agent(agent)

    def more(wait: float = 1.0) -> bool:
        resp = assert_ok(c.call("recv", wait=wait, max=500))
        if resp["messages"]:
            got.extend(resp["messages"])
            assert_ok(c.call("ack", ids=[m["id"] for m in resp["messages"]]))
        return len(got) >= n

    try:
        if n:
            wait_for(more, timeout=timeout, interval=0)
    except AssertionError as e:
        raise AssertionError(f"{e}: {len(got)} of {n} came (the swarm: {swarm.status(host)})") from None
    more(extra)
    return got


def take(swarm: Swarm, host: str, agent: str, wait: float = 0.3) -> list[dict]:
    """What comes to ``agent``'s inbox within ``wait`` seconds, taken and acked (``drain``
    of none: from its cage on a whole hive)."""
    return drain(swarm, host, agent, 0, extra=wait)


def kill9_receiving_core(swarm: Swarm, n: int) -> Run:
    """b's hive-core dies (SIGKILL) a third of the way in, with a bundle committed and
    maybe not yet acked on the bus; the rest wait in the stream until b is back. A whole
    hive's ``hive up`` starts it again itself (half a second later: a's heartbeat of b
    may not even go stale); a lone hive-core is started again here, once a saw b gone."""
    b = swarm.cores["b"]
    t0 = time.perf_counter()
    if isinstance(b, HiveProcess):
        old = b.core_pid()
        assert old is not None
        run = Run(acked=stream(swarm, n, "d", {n // 3: lambda: os.kill(old, signal.SIGKILL)}))
        wait_for(lambda: b.core_pid() not in (None, old), timeout=30)
        b.wait_running()  # every harness on b connected again
    else:
        run = Run(acked=stream(swarm, n, "d", {n // 3: b.kill9}))
        wait_for(lambda: not swarm.status("a")["hosts"][1]["reachable"], timeout=15)
        b.start()
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

"""The swarm's faults (docs/swarm.md, "Faults") on the three test hosts: a receiving
hive-core and a NATS node killed with SIGKILL mid-stream of SUITE_N (10,000) messages
alice sends from her cage, each host running a whole hive (the session's
``hive_swarm``, its agents paused: the test reads bob's inbox); and a partition that
heals, on the hosts' hive-cores (the session's ``swarm``; a whole host cut off is
tests/test_swarm_hives.py's; see docs/swarm.md, "The test hosts"). Each time,
every message alice's host acknowledged is in bob's inbox once, in order.

bench/swarm.py runs the same kills on hive-cores (`bench/run.py --only swarm`)."""

from __future__ import annotations

import os
import time

import pytest

from helpers import wait_for
from hive_fixture import HiveProcess
from swarm_faults import drain, kill9_nats_node, kill9_receiving_core, stream
from swarm_fixture import Swarm

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SUITE_N = int(os.environ.get("HIVE_TEST_SWARM_FAULT_N", "10000"))


def test_kill9_of_the_receiving_core_mid_stream(hives: Swarm[HiveProcess]) -> None:
    """b's hive-core killed; b's ``hive up`` starts it again, its cages kept."""
    swarm, b = hives, hives.cores["b"]
    died = "hive-core exited with status -9"
    before, cages = b.log_path.read_text().count(died), {n: b.cage(n)["pid"] for n in b.names}
    run = kill9_receiving_core(swarm, SUITE_N)
    assert b.log_path.read_text().count(died) == before + 1
    assert {n: b.cage(n)["pid"] for n in b.names} == cages  # hive-priv kept them; harnesses back
    assert len(run.acked) == SUITE_N  # b down: a still takes every message
    assert (run.lost, run.duplicates, run.in_order) == (0, 0, True)
    wait_for(lambda: all(r["reachable"] for r in swarm.status("a")["agents"]), timeout=15)


def test_kill9_of_a_nats_node_loses_no_acknowledged_message(hives: Swarm[HiveProcess]) -> None:
    swarm = hives
    run = kill9_nats_node(swarm, SUITE_N)
    swarm.wait_bus_whole()  # the node is back and caught up before the next test
    assert len(run.acked) == SUITE_N
    assert (run.lost, run.duplicates, run.in_order) == (0, 0, True)


def test_a_partition_that_heals(swarm: Swarm) -> None:
    """First a is cut off: alice's messages are acknowledged by her host and wait in its
    outbox (a's node alone is no quorum), while carol's to alice go into the stream (b
    and c are one). Then a is back and b is cut off: the stream takes alice's messages
    and they wait for b. Once b is back too, everything acknowledged arrives once, in
    order per sender. Each fault starts on a whole bus (every stream and consumer led, every
    replica current): one node away at a time, what R3 survives. Cut b while a's node is
    still catching up and two are away at once (a stream's leader went unelected for the
    whole 30 s wait on the shared machine: a follower catching up stands for no leader)."""
    swarm.wait_bus_whole()  # the session's swarm may still be settling from its start
    net = swarm.net
    net.cut("a")
    try:
        first = stream(swarm, 100, "p", {})
        from_carol = stream(swarm, 50, "c", {}, host="c", sender="carol", to="alice")
        time.sleep(2.0)  # long enough for a publish to time out and be tried again
        assert swarm.status("a")["outbox_unsent"] == len(first) == 100  # nothing got out
        assert len(from_carol) == 50
        wait_for(lambda: swarm.status("c")["outbox_unsent"] == 0, timeout=20)
    finally:
        net.heal("a")
    swarm.wait_bus_whole()  # a's node back in the cluster and caught up before b goes
    received = swarm.status("b")["received"]
    net.cut("b")
    try:
        second = stream(swarm, 100, "q", {})
        # The bus acknowledged all of alice's messages with b away (the first 100 went out
        # once a was back, maybe before b's cut: bob's inbox has them after the heal).
        wait_for(lambda: swarm.status("a")["outbox_unsent"] == 0, timeout=30)
        assert swarm.status("b")["received"] == received
    finally:
        net.heal("b")
    got = [m["body"] for m in drain(swarm, "b", "bob", 200, timeout=60)]
    assert got == first + second
    assert [m["body"] for m in drain(swarm, "a", "alice", 50, timeout=30)] == from_carol
    swarm.wait_bus_whole()  # the session's swarm, whole again for the tests after this one

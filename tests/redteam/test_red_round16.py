"""Red team round 16: the changes merged after round 15b, attacked from a cage and as a
compromised hive-core.

Broke (fixed in this round):

- ``priv.pid-reuse``: ``signal_all`` pins each pid it read from the cage's cgroup with
  ``pidfd_open`` and treated only ESRCH as "gone". A pid freed meanwhile and taken by a
  *thread* (of any process: a host daemon's, or the agent's own threads churning the
  host's 32,768 pids) is no process: ``pidfd_open`` fails with ENOENT (EINVAL on older
  kernels). That OSError ended ``signal_all`` there, ``stop`` answered with "[Errno 2] No
  such file or directory", and the rest of the list (and the SIGKILL round) was never
  signalled: a cage whose pids sort before bwrap's (the host's pids wrap) outlives its
  stop. Now a pid that cannot be pinned as a process is passed over like one that is
  gone (cgroups.py): a thread's pid is never in a cgroup's ``cgroup.procs``, its process
  is listed under its own pid.

- ``priv.pid-reuse`` (cost): to signal only pinned processes still in the cage,
  ``signal_all`` read the cage's cgroup again for each batch of 16 pidfds: quadratic in
  the cage's processes, which the agent chooses (up to its pids_max). A stop of 4,000
  processes cost hive-priv 1.97 s of CPU (0.38 s read once). Now each pinned process's
  ``/proc/<pid>/cgroup`` is read and the pidfd checked alive after it (a process not
  yet reaped keeps its pid): 0.40 s.

Held: see docs/security.md's rounds table (red team round 16).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import assert_ok
from hive_fixture import HIVE, HiveProcess, running_hive

from .pid_spread import AGENT, freed_pids_taken, restart, spread_out

NAME = "r16kill"
ROUNDS = 3
SPREAD = 1500  # processes the agent keeps: the longer root's list, the wider the window
AGENTS = {NAME: AGENT}


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(AGENTS))


def _spread_and_stop_with_threads(hive: HiveProcess) -> tuple[dict[str, object], int]:
    """The agent spreads out; the core stops its cage while host *threads* (this test's)
    take the cage pids freed before hive-priv pins them. Returns (stop's reply, threads
    that took a cage pid)."""
    cage_pids = set(spread_out(hive, NAME, SPREAD))
    release = threading.Event()
    tids: list[int] = []
    holders: list[threading.Thread] = []

    def take() -> None:
        t = threading.Thread(target=release.wait, daemon=True)
        t.start()
        holders.append(t)
        if t.native_id is not None:
            tids.append(t.native_id)

    try:
        with freed_pids_taken(list(cage_pids), SPREAD // 2, take):
            reply = hive.priv("stop", name=NAME, timeout=1)
    finally:
        release.set()
        for t in holders:
            t.join(5)
    return reply, len([t for t in tids if t in cage_pids])


@pytest.mark.attack("priv.pid-reuse", ref="red team round 16: a freed cage pid taken by a thread; pidfd_open ENOENT")
def test_stop_survives_a_cage_pid_taken_by_a_thread(hive: HiveProcess) -> None:
    """As round 15b's probe, but what takes each freed cage pid is a thread (the test's, on
    the host; an agent churning threads gets the same from the host's wrapping pids).
    hive-priv's ``pidfd_open`` of a thread's pid is ENOENT, not ESRCH: before the fix the
    stop ended there with that error, the rest of the cage unsignalled and no SIGKILL
    round. Each stop must be answered ok and leave the cage empty."""
    took_total = 0
    for _ in range(ROUNDS):
        reply, took = _spread_and_stop_with_threads(hive)
        took_total += took
        assert reply.get("ok"), f"stop failed with threads on {took} freed cage pids: {reply}"
        assert not hive.cgroup(NAME).pids(), "processes left in the cage after its stop"
        restart(hive, NAME)
    assert took_total >= ROUNDS, f"threads took {took_total} freed cage pids: the probe proved too little"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


BIG_SPREAD = 4000  # near the agent's pids_max (4,096): 250 batches of PIN_BATCH


@pytest.mark.attack("priv.pid-reuse", ref="red team round 16: the cgroup read again for each batch of 16 pidfds")
def test_stop_of_a_full_cage_costs_root_little(hive: HiveProcess) -> None:
    """signal_all read the cage's cgroup again for each batch of 16 pinned processes: a
    cage of 4,000 processes was 250 reads of up to 4,000 pids, 1.97 s of hive-priv's CPU
    for one stop (0.38 s with one read; quadratic: a cage at pids_max 8,192 is four
    times that, and stops run side by side). Now each pinned process's own cgroup is
    checked: the stop is answered ok, the cage empty, and hive-priv spends under 1.5 s."""
    pid = hive.priv_pid()
    assert pid is not None
    spread_out(hive, NAME, BIG_SPREAD)
    before = _cpu_seconds(pid)
    reply = hive.priv("stop", name=NAME, timeout=1)
    spent = _cpu_seconds(pid) - before
    print(f"hive-priv CPU for the stop of {BIG_SPREAD} processes: {spent:.2f} s")
    assert reply.get("ok"), reply
    assert not hive.cgroup(NAME).pids()
    # 0.40 s on the machine the fix was measured on; 1.11 s once on a slower one (session
    # 15's CI check): the bound is for the quadratic reads (1.97 s there), not the machine.
    assert spent < 1.5, f"hive-priv spent {spent:.2f} s of CPU on one stop"
    restart(hive, NAME)


# -- agent.sock: recv waits ended by a hang-up (agent_conn.py, POLLHUP at the end of input) --


def _connect(core: Any, name: str) -> socket.socket:
    for _ in range(100):  # the listener's backlog is small: retried, one at a time
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(20)
        try:
            s.connect(str(core.agent_sock(name)))
            return s
        except BlockingIOError:
            s.close()
            time.sleep(0.02)
    raise AssertionError("agent.sock never took the connection")


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _reply(s: socket.socket) -> dict[str, Any] | None:
    raw = s.makefile("rb").readline()
    return json.loads(raw) if raw else None


@pytest.mark.attack("wire.recv-ack-kill9", ref="red team round 16: recv waits ended by POLLHUP, every way of leaving")
def test_hang_ups_around_recv_waits_lose_or_double_nothing(core: Any) -> None:
    """bob, three rounds of 30 connections (the cap is 32 per uid: a claim kept would be
    refused by the second round), each a recv waiting 60 s left three ways: closed whole,
    ``shutdown(SHUT_RDWR)`` with the socket kept open (POLLHUP, the process alive), and a
    recv with the ack of a message read just before, closed at once (the ack committing
    meanwhile). Beside them a live recv waits, and a half-closed one (SHUT_WR: still a
    reader). Held: every connection is accepted, every ack stands (nothing acked comes
    back), and the live reader, acking as it goes, gets each message alice sends then
    once (the half-closed one's, never acked, are handed out again: by design)."""
    kept: list[socket.socket] = []
    acked: list[int] = []
    try:
        for rnd in range(3):
            conns = []
            for k in sorted(range(30), key=lambda k: k % 3 != 2):  # the acks first: no waiter takes theirs
                s = _connect(core, "bob")
                if k % 3 == 2:
                    assert_ok(core.agent_call("alice", "send", to="bob", body=f"ack {rnd} {k}"))
                    s.sendall(_line({"cmd": "recv", "wait": 5}))
                    got = _reply(s)
                    assert got is not None and got["ok"], got
                    ids = [m["id"] for m in got["messages"]]
                    assert len(ids) == 1, got
                    acked += ids
                    s.sendall(_line({"cmd": "recv", "wait": 60, "ack": ids}))
                    s.close()
                    continue
                s.sendall(_line({"cmd": "recv", "wait": 60}))
                conns.append((k, s))
            time.sleep(0.3)  # every recv waits in the core
            for k, s in conns:
                if k % 3 == 0:
                    s.close()
                else:
                    s.shutdown(socket.SHUT_RDWR)
                    kept.append(s)
            time.sleep(0.3)  # the core has seen the hang-ups
        live = _connect(core, "bob")
        live.sendall(_line({"cmd": "recv", "wait": 20, "max": 100}))
        half = _connect(core, "bob")
        half.sendall(_line({"cmd": "recv", "wait": 20, "max": 100}))
        half.shutdown(socket.SHUT_WR)
        time.sleep(0.3)
        sent = [assert_ok(core.agent_call("alice", "send", to="bob", body=f"m{i}"))["id"] for i in range(10)]
        # The half-closed reader's reply comes, then its connection ends (the end of
        # input) and what it was given, never acked, is handed out again: at least once,
        # by design. The live reader acks as it goes: it must see each message once.
        got = _reply(half)
        assert got is not None and got["ok"], got
        seen: list[int] = []
        reply = _reply(live)
        deadline = time.monotonic() + 15
        while reply is not None and time.monotonic() < deadline:
            assert reply["ok"], reply
            ids = [m["id"] for m in reply["messages"]]
            seen += ids
            if len(seen) >= len(sent):
                live.sendall(_line({"cmd": "recv", "wait": 0, "ack": ids}))
                assert _reply(live) == {"version": 1, "ok": True, "messages": [], "acked": len(ids)}
                break
            live.sendall(_line({"cmd": "recv", "wait": 5, "max": 100, "ack": ids}))
            reply = _reply(live)
        live.close()
        half.close()
    finally:
        for s in kept:
            s.close()
    assert sorted(seen) == sorted(sent), (seen, sent)  # each once, none lost
    assert not set(seen) & set(acked)
    with core.agent("bob") as bob:
        left = assert_ok(bob.call("recv", wait=0, max=100))["messages"]
    assert not {m["id"] for m in left} & (set(acked) | set(sent)), left


# -- priv.sock: a compromised hive-core at its 64 connections, then churning more ---------

# Runs as hive-core: holds HELD connections (a request line never ended), then for
# FLOOD_S seconds connects and hangs up as fast as it can (each refused: one line), and
# says how many it was refused and what the refusals said.
HOLD_AND_CHURN = r"""
import json, socket, sys, time
path, held_n, flood_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
held = []
for _ in range(held_n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(b'{"cmd": "status", "pad": "')
    held.append(s)
time.sleep(0.5)
churned, replies = 0, set()
end = time.monotonic() + flood_s
while time.monotonic() < end:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
        replies.add(s.makefile("rb").readline().decode())
        churned += 1
    except OSError:
        pass
    s.close()
print(json.dumps({"churned": churned, "replies": sorted(replies)}), flush=True)
sys.stdin.read()
"""
FLOOD_S = 5.0


@pytest.mark.attack("privsep.core-misuse", ref="red team round 16: the core at MAX_CORE_CONNECTIONS, churning refused connections")
def test_core_churning_refused_connections_does_not_starve_root(hive: HiveProcess) -> None:
    """A compromised hive-core holds MAX_CORE_CONNECTIONS (each an unfinished line), then
    connects and hangs up as fast as it can for FLOOD_S seconds (each accepted, given a
    thread, refused in one line). Held: every refusal is the one line; root's ``status``
    meanwhile is answered each time, within 1 s; hive-priv's threads go back to where
    they were once the core lets go (printed: refusals, root's slowest answer, CPU).
    Broke: each refusal was a warning line in hive-priv's log (11,288 to 12,995 in 5 s),
    enough for journald's per-unit rate limit (10,000 in 30 s by default) to drop
    hive-priv's lines, the record of what the core asks next among them; now one every
    REFUSAL_LOG_EVERY seconds, with the count."""
    from hyperhive.priv.server import MAX_CORE_CONNECTIONS, REFUSAL_LOG_EVERY

    pid = hive.priv_pid()
    assert pid is not None
    threads_before = len(os.listdir(f"/proc/{pid}/task"))
    cpu_before = _cpu_seconds(pid)
    proc = subprocess.Popen(
        [str(HIVE.parent / "python"), "-c", HOLD_AND_CHURN, str(hive.priv_sock),
         str(MAX_CORE_CONNECTIONS), str(FLOOD_S)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **hive.as_core(),
    )  # fmt: skip
    slowest = 0.0
    answered = 0
    try:
        time.sleep(1.0)
        end = time.monotonic() + FLOOD_S - 1.0
        while time.monotonic() < end:
            t0 = time.monotonic()
            status = hive.priv("status", names=[NAME])
            slowest = max(slowest, time.monotonic() - t0)
            assert status.get("ok"), status
            answered += 1
            time.sleep(0.1)
        assert proc.stdout is not None
        out = json.loads(proc.stdout.readline())
    finally:
        proc.communicate("", timeout=30)
    cpu = _cpu_seconds(pid) - cpu_before
    time.sleep(0.5)
    threads_after = len(os.listdir(f"/proc/{pid}/task"))
    logged = sum(  # hive-priv's warnings of refused core connections, in either wording
        1
        for line in hive.log_path.read_text(errors="replace").splitlines()
        if "hive.priv WARNING" in line and "refused" in line and "hive-core" in line
    )
    print(json.dumps({**out, "logged": logged, "root_answered": answered, "root_slowest_s": round(slowest, 3),
                      "priv_cpu_s": round(cpu, 2), "threads": [threads_before, threads_after]}))  # fmt: skip
    refusal = {"version": 1, "ok": False, "error": f"hive-core holds {MAX_CORE_CONNECTIONS} connections already"}
    assert [json.loads(r) for r in out["replies"]] == [refusal], out["replies"]
    assert out["churned"] > 100, out
    assert answered >= 10 and slowest < 1.0, (answered, slowest)
    assert threads_after <= threads_before + 2, (threads_before, threads_after)
    # One warning at most every REFUSAL_LOG_EVERY seconds (main: one a refusal).
    assert 1 <= logged <= FLOOD_S / REFUSAL_LOG_EVERY + 2, logged

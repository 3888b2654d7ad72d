"""Red team round 30: a compromised harness's page pair (and so the up to 6 page
connections init, root, queued on it with SCM_RIGHTS, counted in root's host-wide
``unix_inflight``) parked in a socket of the CORE, where init's sweep can't reach it, so
that it outlives the harness's death and restart (round 29's "not tried").

Method as round 29's (its helpers are used): root's descriptors in flight are read from
the host by a capless root probe bisecting its own RLIMIT_NOFILE; the harness uid's the
same way, the probe run as that uid. The compromised harness is simulated from the host:
its page pair's end taken with ``pidfd_getfd``, the harness SIGSTOPped while 10
connections reach its web.sock (init hands 6, the rest closed), the sends made by a child
of the test dropped to the harness's ids (as the harness's own would be, charged to its
uid), then the harness killed and init's restart awaited.

The code under test moved during the round: the tree gained ``unixsock.refuse_descriptors``
(SO_PASSRIGHTS 0, Linux 6.16; this host runs 6.18) on every listener ``bind_listener``
makes but priv.sock and egress.sock (``descriptors=True``), and on init's page pair and
log socket. "Before" is the tree without it (794f267); "now" the tree with it and the
egress fixes below (session 27).

Broke (before), held (now): agent.sock (``test_page_pair_parked_in_the_cores_agent_sock_...``).
  A new connection as the harness uid (or the runtime uid, handed the end as round 29's
  keeper is) sends 5,000 ``{}`` lines and never reads the replies: the core's write
  stalls (``jsonlines._write`` -> ``LineConnection.drain`` waits with no bound; the
  runtime's loop returns on ``_write_paused``) and no line is taken any more; then 2 MiB +
  with no newline: the LineConnection pauses reading past 2 x MAX_LINE; then one byte with
  SCM_RIGHTS carrying the page pair's end and the connection's own client end (so the
  core's peer never closes: no hang-up, no EPIPE). Before: root's count 0 -> 6 -> 12 -> 18
  over 3 harness deaths (the last parked by the runtime uid), the same 3 s on; the harness
  uid's 0 -> 2 -> 4, the runtime uid's 0 -> 2; the core +1 descriptor and ~8 MiB of RSS a
  park (76 -> 100 MiB), its unread sockets 0 -> 3; and the operator's ``stop`` of the agent
  released none (root still 18, 3 unread sockets: uvloop's ``close`` waits to flush the
  stalled replies for good), the agent shown ``running`` after its stop (the parked
  harness-uid connections count as its harness). Bounded only by the per-uid cap (32 on
  each of two uids: ~63 parks, ~378 of root's a compromised agent, ~500 MiB of the core's
  memory) until the core exits. Now: the send is refused (EPERM) and root's count is back
  to 0 after each restart.

Broke (before, and with SO_PASSRIGHTS alone), fixed: egress
(``test_page_pair_parked_in_a_stalled_egress_tunnel_...``).
  A connection to egress.sock itself (a unix stream) CONNECTs to an allowed upstream in
  the test's network namespace that never reads; bytes through the tunnel until the
  relay's send to the upstream blocks (~0.9-1.0 MB), then one byte with SCM_RIGHTS carrying
  the page pair's end and the client end. Root's count 0 -> 6 -> 12 -> 18 over 3 deaths, the
  same 3 s on; the core +6 descriptors a park (the client, the upstream, two pipes), RSS
  flat; back to 0 only when the operator stops the agent. Bounded by ``[egress]
  max_connections`` (16: ~96 of root's an agent) and the upstream's patience; no idle
  timeout ends a tunnel. egress.sock takes descriptors (the bridge's handover), and the
  connection, direct or a handed-over AF_UNIX stream, kept taking them after its first
  read. Now (``core/egress.py``): a handed-over connection must be TCP (AF_INET or
  AF_INET6, what the bridge hands; no peer can send descriptors into it), and a request
  sent straight to egress.sock refuses descriptors from its first read on
  (``_refuse_more_descriptors``: SO_PASSRIGHTS 0 on the connection, then what came in
  between looked through, and the request refused if it carries any): the park's send is refused
  (EPERM), root's count 6 with the harness stopped and 0 after each restart and 3 s on.
  Also: the operator's ``stop`` aborts the agent's connections (``LineConnection.abort``)
  instead of closing them, which waited for good to flush replies a peer never read.
  Session 28: egress.sock refuses descriptors from its listener on (the window and its
  look-through are gone) and the bridge hands over on egress-handover.sock instead; the
  park's send is refused with EPERM from the connect.

Each death's other figures: the other agent's page ``HTTP/1.1 200 OK`` throughout (18-36
of root's in flight here, far under init's 20,000).

Not tried (by reading): the gateway (nginx) as the parking place: a page connection's
peer is nginx's upstream socket, which reads (and drops) what comes, buffering to disk,
within ``proxy_read_timeout``. hive-priv's sockets are not reachable from a cage.
"""

from __future__ import annotations

import array
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hive_fixture import HiveProcess, running_hive, wait_until
from hyperhive.wire.framing import MAX_LINE
from testnet import TestNet

from .conftest import core_fds, core_rss_kib, harness_end, page_answers
from .test_red_round29 import INFLIGHT, as_uid, kill_quietly, wait_new_harness

REF = "red team round 30"
AGS, OTHER, EGR = "r30ag", "r30ot", "r30eg"
NET = TestNet(130, prefix="hvr30")
ADDR, PORT = NET.address(2), 8130
DEATHS = 3  # harness deaths per case

# An upstream (in the test's own network namespace) that accepts and never reads: a tunnel
# to it stops once its receive window and the proxy's send buffer are full.
SINK = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(64)
held = []
while True:
    c, _ = s.accept()
    held.append(c)
"""


@pytest.fixture(scope="module")
def h() -> Iterator[HiveProcess]:
    with NET as n:
        n.serve(ADDR, PORT, [sys.executable, "-c", SINK, ADDR, str(PORT)])
        agents: dict[str, dict[str, Any]] = {
            AGS: {"runtime": "command", "command": ["true"], "peers": []},
            OTHER: {"runtime": "command", "command": ["true"], "peers": []},
            EGR: {"runtime": "command", "command": ["true"], "peers": [], "egress": [f"{ADDR}:{PORT}"]},
        }
        yield from running_hive(HiveProcess(agents))


# -- measuring -------------------------------------------------------------------------------


def in_flight(uid: int = 0, gid: int = 0) -> int:
    """``uid``'s descriptors in flight (host-wide), the least of three readings, by a capless
    probe of that uid (round 29's INFLIGHT)."""
    ids = [f"--reuid={uid}", f"--regid={gid}", "--clear-groups"] if uid else []
    got = []
    for _ in range(3):
        out = subprocess.run(
            ["setpriv", *ids, "--inh-caps=-all", "--bounding-set=-all", "/usr/bin/python3", "-c", INFLIGHT],
            capture_output=True, text=True, timeout=20, cwd="/")
        assert out.returncode == 0, out.stderr
        got.append(int(out.stdout.strip()))
    return min(got)


def outq(s: socket.socket) -> int:
    return int(struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])


def inq(s: socket.socket) -> int:
    return int(struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0" * 4))[0])


def stable(read: Any, seconds: float, timeout: float) -> int:
    """``read()`` once it has not changed for ``seconds``."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return int(now)
    raise AssertionError(f"never settled: {last}")


def pad_until_stalled(s: socket.socket, at_least: int, settle: float = 1.0, timeout: float = 40) -> int:
    """Bytes (no newline) into ``s`` until its reader has stopped reading: what the peer has
    not taken (SIOCOUTQ) stays put for ``settle`` s, with at least ``at_least`` sent. Never
    lets the queue near the send buffer, so one small message more still fits."""
    s.setblocking(False)
    chunk = b"x" * 32768
    sent, last, since = 0, -1, time.monotonic()
    deadline = time.monotonic() + timeout
    seen: list[int] = []
    while time.monotonic() < deadline:
        q = outq(s)
        if not seen or seen[-1] != q:
            seen = [*seen, q][-12:]
        if q < 96 * 1024 and sent < (64 << 20):
            try:
                sent += s.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
            last, since = -1, time.monotonic()
            continue
        if q != last:
            last, since = q, time.monotonic()
        elif sent >= at_least and time.monotonic() - since >= settle:
            return sent
        time.sleep(0.05)
    raise AssertionError(f"the reader never stopped: {sent} bytes sent, {outq(s)} unread; last {seen}")


def core_unread(h: HiveProcess) -> int:
    """The core's unix sockets with input it has not read (``ss``: Recv-Q > 0)."""
    pid = h.core_pid()
    out = subprocess.run(["ss", "-xHpna"], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines()
               if f"pid={pid}," in line and len(f := line.split()) > 3 and f[2].isdigit() and int(f[2]) > 0)


def send_rights(s: socket.socket, fds: list[int]) -> str:
    """One byte carrying ``fds``: "sent", or "refused" (EPERM: the receiving socket has
    SO_PASSRIGHTS off, Linux 6.16)."""
    s.setblocking(True)
    try:
        s.sendmsg([b"z"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    except PermissionError:
        return "refused"
    return "sent"


# -- the harness's page pair, stopped with 6 connections queued ------------------------------


def queue_six(h: HiveProcess, name: str) -> tuple[int, socket.socket, int]:
    """The harness stopped, 10 connections on web.sock (init hands 6, root's, in flight on
    the page pair); returns the harness, a copy of its page pair's end and root's count."""
    harness = h.harness_pid(name)
    page = harness_end(h, name, page=True)
    os.kill(harness, signal.SIGSTOP)
    clients = []
    before = in_flight()
    for _ in range(10):
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(h.run_dir / "ui" / name / "web.sock"))
        clients.append(c)
    got = wait_until(lambda: (n := in_flight()) >= before + 6 and n, 10, "init's 6 page connections in flight")
    for c in clients:  # nothing rests on the gateway's side: the 6 stay in flight regardless
        c.close()
    return harness, page, got


def die_and_restart(h: HiveProcess, name: str, harness: int) -> int:
    kill_quietly(harness)
    new = wait_new_harness(h, name, harness)
    wait_until(lambda: page_answers(h, name).startswith("HTTP/1."), 15, f"{name}'s page from the new harness")
    return new


# -- the cases ---------------------------------------------------------------------------------


@pytest.mark.attack("budget.exhaustion", ref=REF + ": the page pair parked in a stalled agent.sock connection of the core")
def test_page_pair_parked_in_the_cores_agent_sock_connection_does_not_outlive_the_harness(h: HiveProcess) -> None:
    """Per harness death: the harness stopped with 6 page connections queued on its pair;
    as the harness uid, a new connection to agent.sock sends 5,000 ``{}`` lines and never
    reads the replies (the core's writes stall past its high-water mark: ``_write``'s
    ``drain`` waits, and no line is taken any more), then 2 MiB + of bytes without a
    newline (the core's LineConnection buffers them and pauses reading past 2 x MAX_LINE),
    then one byte with SCM_RIGHTS carrying the page pair's end and the connection's own
    client end (so the client end is never closed: the core sees no hang-up and its drain
    never fails). The harness is killed; init restarts it.

    Held if root's count is back at its base after each restart (as round 29 found for
    parking inside the cage). Also: the harness uid's count, the core's descriptors and
    RSS, the other agent's page, and what stopping the agent does.

    FAILED before SO_PASSRIGHTS (root 0, 6, 12, 18; 18 after the agent's stop); passes on
    the tree with it (the rights send refused, EPERM; root 0 after each restart)."""
    name = AGS
    ids = h.cage(name)
    uid, gid = ids["harness_uid"], ids["gid"]
    sock_path = str(h.agent_sock(name))
    runtime_uid = ids["uid"]
    fig: dict[str, Any] = {"root": [in_flight()], "harness uid": [in_flight(uid, gid)],
                           "runtime uid": [in_flight(runtime_uid, gid)], "core fds": [core_fds(h)],
                           "core rss KiB": [core_rss_kib(h)], "core sockets unread": [core_unread(h)]}
    fig["queued, stopped"] = []
    parked: list[dict[str, Any]] = []
    for death in range(DEATHS):
        harness, page, queued = queue_six(h, name)
        fig["queued, stopped"].append(queued)
        # The last death's park made by a runtime process (its own uid, its own cap of
        # connections; the harness hands it the end as stdin, as round 29's keeper).
        parker = runtime_uid if death == DEATHS - 1 else uid
        info: dict[str, Any] = {"parked by": "runtime" if parker == runtime_uid else "harness"}

        r, w = os.pipe()

        def park(page: socket.socket = page, w: int = w) -> None:
            step = "connect"
            try:
                a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                a.settimeout(10)
                a.connect(sock_path)
                step = "lines"
                a.sendall(b"{}\n" * 5000)
                replies = stable(lambda: inq(a), 0.5, 20)  # the core stopped answering
                step = "pad"
                padded = pad_until_stalled(a, 2 * MAX_LINE + 65536)
                step = "rights"
                sent = send_rights(a, [page.fileno(), a.fileno()])
            except OSError as e:
                raise OSError(e.errno, f"{step}: {e.strerror}") from None
            os.write(w, f"{replies} {padded}, rights {sent}".encode())

        try:
            as_uid(parker, gid, park)
            os.close(w)
            info["replies unread, bytes sent"] = os.read(r, 100).decode()
        finally:
            os.close(r)
            page.close()
        info["root parked, harness stopped"] = in_flight()
        die_and_restart(h, name, harness)
        time.sleep(0.3)
        info["root after restart"] = in_flight()
        parked.append(info)
        fig["root"].append(info["root after restart"])
        fig["harness uid"].append(in_flight(uid, gid))
        fig["runtime uid"].append(in_flight(runtime_uid, gid))
        fig["core fds"].append(core_fds(h))
        fig["core rss KiB"].append(core_rss_kib(h))
        fig["core sockets unread"].append(core_unread(h))
    time.sleep(3.0)
    fig["root, 3 s on"] = in_flight()
    fig["other agent's page"] = page_answers(h, OTHER)
    fig["agent running (as the core sees it)"] = h.agent_status()[name].get("running")
    # The operator stops the agent: its socket and every connection on it closed.
    stopped = h.host_call("stop", scope={"agent_names": [name]}, graceful=False)
    time.sleep(1.0)
    fig["stop"] = stopped.get("ok")
    fig["root after the agent's stop"] = in_flight()
    fig["harness uid after the agent's stop"] = in_flight(uid, gid)
    fig["core fds after the agent's stop"] = core_fds(h)
    fig["core sockets unread after the agent's stop"] = core_unread(h)
    fig["agent running after its stop (as the core sees it)"] = h.agent_status()[name].get("running")
    print(f"\nagent.sock park: per death {parked}\nfigures {fig}")
    base = fig["root"][0]
    assert fig["other agent's page"].startswith("HTTP/1."), fig
    assert all(n <= base for n in fig["root"][1:]), (
        f"root's descriptors in flight grow by 6 a harness death (parked in the core): {fig['root']}")
    assert fig["root after the agent's stop"] <= base, fig


@pytest.mark.attack("budget.exhaustion", ref=REF + ": the page pair parked in a stalled egress tunnel of the core")
def test_page_pair_parked_in_a_stalled_egress_tunnel_does_not_outlive_the_harness(h: HiveProcess) -> None:
    """Per harness death: the harness stopped with 6 page connections queued on its pair;
    as the harness uid, a connection to egress.sock itself (a unix stream: SCM_RIGHTS can
    ride it, unlike the TCP leg) makes a CONNECT to an allowed upstream in the test's
    network namespace that accepts and never reads; bytes through the tunnel until the
    proxy's relay stops reading (its send to the upstream blocks), then one byte with
    SCM_RIGHTS carrying the page pair's end and the connection's own client end (never
    closed, so no end of input reaches the relay). The harness is killed; init restarts it.
    Held if root's count is back at its base after each restart.

    FAILS before and with SO_PASSRIGHTS (egress.sock takes descriptors): root 0, 6, 12, 18,
    back to 0 only at the agent's stop."""
    name = EGR
    ids = h.cage(name)
    uid, gid = ids["harness_uid"], ids["gid"]
    sock_path = str(h.run_dir / "agents" / name / "egress.sock")
    fig: dict[str, Any] = {"root": [in_flight()], "harness uid": [in_flight(uid, gid)],
                           "core fds": [core_fds(h)], "core rss KiB": [core_rss_kib(h)]}
    parked: list[dict[str, Any]] = []
    for _ in range(DEATHS):
        harness, page, queued = queue_six(h, name)
        info: dict[str, Any] = {"queued, stopped": queued}

        r, w = os.pipe()

        def park(page: socket.socket = page, w: int = w) -> None:
            e = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            e.settimeout(15)
            e.connect(sock_path)
            e.sendall(f"CONNECT {ADDR}:{PORT} HTTP/1.1\r\nHost: {ADDR}:{PORT}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = e.recv(4096)
                assert chunk, head
                head += chunk
            assert head.startswith(b"HTTP/1.1 200"), head
            padded = pad_until_stalled(e, 256 * 1024, settle=1.5)
            sent = send_rights(e, [page.fileno(), e.fileno()])
            os.write(w, f"{padded}, rights {sent}".encode())

        try:
            as_uid(uid, gid, park)
            os.close(w)
            info["bytes sent"] = os.read(r, 100).decode()
        finally:
            os.close(r)
            page.close()
        info["root parked, harness stopped"] = in_flight()
        die_and_restart(h, name, harness)
        time.sleep(0.3)
        info["root after restart"] = in_flight()
        parked.append(info)
        fig["root"].append(info["root after restart"])
        fig["harness uid"].append(in_flight(uid, gid))
        fig["core fds"].append(core_fds(h))
        fig["core rss KiB"].append(core_rss_kib(h))
        fig.setdefault("core sockets unread", []).append(core_unread(h))
    time.sleep(3.0)
    fig["root, 3 s on"] = in_flight()
    fig["other agent's page"] = page_answers(h, OTHER)
    stopped = h.host_call("stop", scope={"agent_names": [name]}, graceful=False)
    time.sleep(1.0)
    fig["stop"] = stopped.get("ok")
    fig["root after the agent's stop"] = in_flight()
    fig["core fds after the agent's stop"] = core_fds(h)
    fig["core sockets unread after the agent's stop"] = core_unread(h)
    print(f"\negress park: per death {parked}\nfigures {fig}")
    base = fig["root"][0]
    assert fig["other agent's page"].startswith("HTTP/1."), fig
    assert all(n <= base for n in fig["root"][1:]), (
        f"root's descriptors in flight grow by 6 a harness death (parked in the core): {fig['root']}")
    assert fig["root after the agent's stop"] <= base, fig

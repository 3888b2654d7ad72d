"""Re-check of session 25 and red team round 28's fixes, from real cages.

The changes: init relays the harness's stdout/stderr to cage.log over a stream socket
pair (``HARNESS_LOG_MAX``) and budgets its own lines (``note``, ``INIT_LOG_MAX``); init's
sends to the harness never wait (``Init.send``, MSG_DONTWAIT: a full channel kills the
harness); init keeps web.sock's listener and hands each connection to the harness over a
SOCK_SEQPACKET page pair (``Init.hand_page_connections``, SCM_RIGHTS); the harness writes
the runtime's stdin from the turn's poll loop (``Turn.run``, ``STDIN_CHUNK``).

The hostile party is the agent's runtime and, where said, a compromised harness
(simulated from the host: SIGSTOP, or its descriptors taken with ``pidfd_getfd``).

Broke (the case FAILED at a6ecd99; fixed the same session, see below):
- (low, cross-cage, needs compromised harnesses) every connection init hands over is an
  SCM_RIGHTS descriptor in flight until the harness takes it, and the kernel charges
  descriptors in flight to the *sender's user*: init is host uid 0 in every cage, so all
  cages' inits (and every other root process on the host) share one counter, and a
  sender without CAP_SYS_RESOURCE/CAP_SYS_ADMIN (init) is refused with ETOOMANYREFS once
  it passes the sender's RLIMIT_NOFILE (init's soft limit: 1024, ``CAGE_NOFILE``). A
  harness that takes nothing leaves up to 278 connections in flight on its page pair
  (init's end's 212,992-byte send buffer): with four such harnesses (1,025 in flight)
  every other agent's page is refused (its connection reset at once; the gateway's
  ``@no_agent``, 404) until they are released, and so is any page connection of any
  hive's cage on the host (``test_page_connections_a_stuck_harness_holds_in_flight_refuse_other_cages_pages``;
  the counter is host-wide: the case holds it past 1024 for about half a second).
  Fixed: init's end of each page pair has the least send buffer (4,608 bytes), so at most
  6 connections wait unread a cage and one past that is closed; the four stuck harnesses
  now hold 24, and the healthy page answers. (171 compromised harnesses at once would
  reach 1024 again: fixed in session 26, init's soft RLIMIT_NOFILE is its hard one and
  its children get the cage's back; ``test_root_past_1024_descriptors_in_flight_leaves_every_init_handing_pages``.)

Held (figures in each case's output):
- a runtime flooding stdout (~4 MiB) with three CPU hogs in the cage while the harness
  feeds it 256 KiB of stdin: init's channel backlog 0-768 bytes (at most one message's
  truesize; ~750 samples; init sends only a reply per request and an event per exit of a
  process it spawned, and the harness's reader thread takes each at once), the harness
  never killed as ``deaf``, the stdin delivered byte for byte (turn 1.6 s);
- a runtime that closes stdout and stderr first and then reads stdin 1 KiB at a time: every
  byte delivered, the turn ends (0.62 s; noticed: with no output left the loop blocked
  ~0.1 s in ``init.wait`` between 64 KiB writes, ≤ 640 KiB/s of stdin; fixed: it doesn't
  wait there while stdin is still being written); one that closes
  stdin at once while the harness still has ~190 KiB to write: EPIPE taken, exit 0,
  the same harness (0.36 s);
- what a compromised harness sends back on its page pair (data until its buffer is full,
  descriptors) is never read by init: no descriptor lands in init, init sleeps in poll;
  90 messages and 8 descriptors sent, init 0 ticks in 0.5 s, 10 descriptors before and
  after; with the harness stopped, 300 connections (278 in flight), init 0 ticks, then the
  harness killed, twice: every connection closed, init's descriptors 10 each time (the
  stale pair closed with its connections), the page 200 through the real gateway
  (``/agent/NAME/page/``);
- ``note``: unraisable exceptions of 100 KB each, restart lines, a 3 MiB line, then more of
  both: 844,102 bytes and the one notice written (INIT_LOG_MAX: 1,048,576). Noticed, not
  a case: with INIT_LOG_MAX beside HARNESS_LOG_MAX a start may add ~2 MiB to a cage.log
  rotate left at just under 1 MiB, so cage.log and cage.log.1 hold up to ~3 MiB each
  (security.md says "about 2 MiB" for both); init's own lines come at most one a 0.5 s
  restart, so the runtime can't get near that in practice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import assert_ok
from hive_fixture import HiveProcess, running_hive, wait_until
from hyperhive.cage import layout
from hyperhive.cage.init import INIT_LOG_MAX
from web_fixture import Login, Web

from .conftest import (
    PASSRIGHTS,
    cpu_ticks,
    harness_end,
    harness_or_none,
    init_pid,
    nofile,
    page_answers,
    pidfd_getfd,
    seqpackets,
)

REF = "re-check of session 25 and red team round 28"
STUCK = ["r25s1", "r25s2", "r25s3", "r25s4"]
TARGET, FEED, PAGE = "r25tg", "r25in", "r25pg"
RUNTIME_PATH = f"{layout.HOME}/r25-runtime"
MODE_FILE, OUT_FILE = "r25mode", "r25-out.json"

# The runtime of FEED: what it does is read from a file the test writes into its home.
RUNTIME = r"""#!/usr/bin/python3
import hashlib, json, os, time
HOME = "/home/agent"
mode = open(HOME + "/r25mode").read().strip()
got = bytearray()
t0 = time.monotonic()

def result(**kw):
    with open(HOME + "/r25-out.json", "w") as f:
        json.dump(dict(mode=mode, took=round(time.monotonic() - t0, 3), **kw), f)

def finish():
    try:
        body, parsed = json.loads(bytes(got))["body"], True
    except Exception as e:
        body, parsed = "", repr(e)
    result(n=len(got), parsed=parsed, nl=got.endswith(b"\n"),
           sha=hashlib.sha256(body.encode()).hexdigest())

if mode == "flood":  # 64 KiB of stdout for each 4 KiB of stdin read, beside CPU hogs
    hogs = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                pass
            os._exit(0)
        hogs.append(pid)
    chunk = b"f" * 65535 + b"\n"
    while True:
        os.write(1, chunk)
        data = os.read(0, 4096)
        if not data:
            break
        got += data
    for _ in range(16):
        os.write(1, chunk)
    for p in hogs:
        os.waitpid(p, 0)
    finish()
elif mode == "closefirst":  # no stdout, no stderr, then stdin slowly
    os.close(1)
    os.close(2)
    time.sleep(0.2)
    while True:
        data = os.read(0, 1024)
        if not data:
            break
        got += data
        time.sleep(0.0005)
    finish()
elif mode == "closein":  # stdin closed at once, while the harness has most of it to write
    os.close(0)
    print("stdin closed", flush=True)
    time.sleep(0.3)
    result()
"""


@pytest.fixture(scope="module")
def h() -> Iterator[HiveProcess]:
    agents: dict[str, dict[str, Any]] = {
        n: {"runtime": "command", "command": ["true"], "peers": []} for n in [*STUCK, TARGET, PAGE]
    }
    agents[FEED] = {"runtime": "command", "command": [RUNTIME_PATH], "peers": []}
    yield from running_hive(HiveProcess(agents))


@pytest.fixture(scope="module")
def login(h: HiveProcess) -> Login:
    return Web(h).login()


# -- helpers --------------------------------------------------------------------------------





def init_channel_fd(ipid: int) -> int:
    """Init's end of the harness's channel: its one blocking SEQPACKET socket (the page
    pair's end is non-blocking)."""
    (fd,) = [fd for fd, (_, nonblocking) in seqpackets(ipid).items() if not nonblocking]
    return fd



def outq(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4))[0]


def inq(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]



def fds_of(pid: int) -> list[str]:
    """``pid``'s descriptors, each a file's path or "socket" (a socket's inode, and its
    number, change with each new pair and listener)."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        out.append("socket" if target.startswith("socket:") else target)
    return sorted(out)


def web_sock(h: HiveProcess, name: str) -> str:
    return str(h.run_dir / "ui" / name / "web.sock")



def connect_many(h: HiveProcess, name: str, n: int) -> list[socket.socket]:
    """``n`` connections to web.sock (as the gateway makes them), each waited for in the
    backlog; what init closed shows as EOF."""
    conns = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        # A blocking connect bounded by SO_SNDTIMEO: it waits for room in the backlog (with
        # settimeout the socket is non-blocking underneath and a full backlog is EAGAIN).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 1, 0))
        try:
            s.connect(web_sock(h, name))
        except OSError:
            s.close()
            continue
        s.setblocking(False)
        conns.append(s)
    return conns


def still_held(conns: list[socket.socket]) -> int:
    """Connections neither answered nor closed: in flight to (or held by) the harness."""
    held = 0
    for c in conns:
        try:
            c.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            held += 1
        except OSError:
            pass
    return held


def wait_new_harness(h: HiveProcess, name: str, old: int, timeout: float = 20) -> int:
    return wait_until(lambda: (p := harness_or_none(h, name)) and p != old and p, timeout,
                      f"a new harness in {name}")


def cage_log(h: HiveProcess, name: str) -> Path:
    return h.state_dir / "priv" / "cages" / name / "cage.log"


def last_id(h: HiveProcess, name: str) -> int:
    entries = assert_ok(h.host_call("transcript", name=name, limit=1))["entries"]
    return entries[-1]["id"] if entries else 0


def run_turn(h: HiveProcess, name: str, body: str, timeout: float = 20) -> tuple[list[dict[str, Any]], float]:
    """Send ``body``; the turn's entries once its exit is recorded, and how long it took."""
    after = last_id(h, name)
    t0 = time.monotonic()
    turn = assert_ok(h.host_call("send", to=name, body=body))["id"]

    def ended() -> list[dict[str, Any]] | None:
        es = [e for e in assert_ok(h.host_call("transcript", name=name, after=after, limit=5000))["entries"]
              if e["turn"] == turn]
        return es if any(e["kind"] == "exit" for e in es) else None

    entries = wait_until(ended, timeout, f"turn {turn} of {name} to end", interval=0.05)
    return entries, time.monotonic() - t0


def exit_status(entries: list[dict[str, Any]]) -> Any:
    (ex,) = [e for e in entries if e["kind"] == "exit"]
    return ex["data"].get("exit_status") if isinstance(ex["data"], dict) else ex["data"]


# 256,000 characters, every 8 a different number: a lost, doubled or reordered chunk shows.
BODY = "".join(f"{i:08d}" for i in range(32_000))
BODY_SHA = hashlib.sha256(BODY.encode()).hexdigest()


def feed_runtime(h: HiveProcess, mode: str) -> Path:
    home = h.home(FEED)
    if not (home / "r25-runtime").exists():
        (home / "r25-runtime").write_text(RUNTIME)
        os.chmod(home / "r25-runtime", 0o755)
    (home / MODE_FILE).write_text(mode)
    out = home / OUT_FILE
    out.unlink(missing_ok=True)
    return out


# -- broke: page connections in flight are charged to root, every cage's ------------------


@pytest.mark.attack("budget.exhaustion", ref=REF + ": web.sock connections in flight on the page pair (SCM_RIGHTS, root's count)")
def test_page_connections_a_stuck_harness_holds_in_flight_refuse_other_cages_pages(h: HiveProcess, login: Login) -> None:
    """Four harnesses take nothing of their page pairs (compromised: here SIGSTOPped) while
    the gateway connects to their web.sock 300 times each. Init hands each what its pair's
    send buffer holds (~278) and closes the rest: never blocking, as designed. But each
    handed connection is a descriptor in flight, charged by the kernel to the sender's
    user, host uid 0, which every cage's init shares; past the sender's RLIMIT_NOFILE (1024
    for init, which has neither CAP_SYS_RESOURCE nor CAP_SYS_ADMIN) every sendmsg with
    SCM_RIGHTS by any cage's init fails with ETOOMANYREFS: another, healthy agent's page
    must still answer.

    FAILED at a6ecd99: with 1,025 in flight the healthy agent's page connection is reset
    unanswered (the gateway's ``@no_agent``: 404), and a capless root process's own
    SCM_RIGHTS send gets ETOOMANYREFS; it answers again once they are released. Fix:
    bound what init leaves in flight per pair (a small SO_SNDBUF on ``page_ours``, or
    accept only while the pair is nearly empty and leave the rest in the listen backlog),
    and raise init's soft RLIMIT_NOFILE to its hard limit at start (it costs nothing)."""
    web = Web(h)
    assert page_answers(h, TARGET).startswith("HTTP/1."), "the control"
    assert web.get(f"/agent/{TARGET}/page/", login=login).status_code == 200, "the control, through the gateway"
    stopped, conns, held = [], [], {}
    try:
        for name in STUCK:
            pid = h.harness_pid(name)
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
            mine = connect_many(h, name, 300)
            conns += mine
            time.sleep(0.05)
            held[name] = still_held(mine)
        time.sleep(0.2)
        direct = page_answers(h, TARGET)
        through = web.get(f"/agent/{TARGET}/page/", login=login).status_code
        refused = capless_root_send()
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        for c in conns:
            c.close()
    after = wait_until(lambda: (a := page_answers(h, TARGET)).startswith("HTTP/1.") and a, 10,
                       "the healthy page once the connections are released")
    print(f"in flight on the stopped harnesses' pairs {held} (total {sum(held.values())}); "
          f"the healthy agent's page: {direct!r} on web.sock, {through} through the gateway; "
          f"a root process without CAP_SYS_RESOURCE sending one descriptor meanwhile: {refused!r}; "
          f"released: {after!r}")
    assert direct.startswith("HTTP/1.") and through == 200, (
        f"another agent's page refused while {sum(held.values())} page connections are in flight: {direct!r}, {through}")


def capless_root_send() -> str:
    """What one SCM_RIGHTS send by a root process with init's old soft limit (1024) and no
    capabilities gets: 'sent', or the error (the counter's state, as an old init saw it)."""
    return subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c",
         "import resource, socket\n"
         "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
         "a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
         "try:\n    socket.send_fds(a, [b'x'], [b.fileno()]); print('sent')\n"
         "except OSError as e:\n    print(e)\n"],
        capture_output=True, text=True, timeout=10).stdout.strip()


@pytest.mark.attack("budget.exhaustion", ref=REF + ": root's descriptors in flight past 1024, as ~171 stuck harnesses would hold them")
def test_root_past_1024_descriptors_in_flight_leaves_every_init_handing_pages(h: HiveProcess, login: Login) -> None:
    """The rest of the first case (session 26). With 6 a cage, ~171 compromised harnesses
    at once would still put root's descriptors in flight past 1,024, init's old soft
    limit, and no init on the host could hand a page connection. The test holds 2,000 in
    flight itself (root with CAP_SYS_RESOURCE may; on a pair it never reads), as ~334 such
    harnesses would: a capless root sender with a soft limit of 1,024 is refused meanwhile
    (the counter really is past it), and another agent's page still answers, on web.sock
    and through the gateway, because init's soft RLIMIT_NOFILE is its hard one (65,536 at
    most: ~10,900 harnesses). Its children keep the cage's 1,024: the first harness (init's
    fork) and a restarted one (exec'd).

    FAILED before the fix (init at 1,024): the page's connection was reset unanswered."""
    web = Web(h)
    assert page_answers(h, TARGET).startswith("HTTP/1."), "the control"
    ipid, first = init_pid(h, TARGET), h.harness_pid(TARGET)
    limits = {"init": nofile(ipid), "first harness": nofile(first)}
    os.kill(first, signal.SIGKILL)
    restarted = wait_new_harness(h, TARGET, first)
    limits["restarted harness"] = nofile(restarted)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        for _ in range(8):
            socket.send_fds(a, [b"r26"], [b.fileno()] * 250)
        refused = capless_root_send()
        direct = page_answers(h, TARGET)
        through = web.get(f"/agent/{TARGET}/page/", login=login).status_code
    finally:
        a.close()
        b.close()
    print(f"2,000 in flight as root; a capless root sender at 1,024: {refused!r}; the page: {direct!r} on"
          f" web.sock, {through} through the gateway; RLIMIT_NOFILE {limits}")
    assert "Too many references" in refused, refused
    assert direct.startswith("HTTP/1.") and through == 200, (direct, through)
    soft, hard = limits["init"]
    assert soft == hard >= 4096, limits
    assert limits["first harness"] == limits["restarted harness"] == (1024, hard), limits


# -- held: init's channel under a runtime flood; the runtime's stdin --------------------------


@pytest.mark.attack("init.runtime-inheritance", ref=REF + ": a runtime flooding stdout with CPU hogs while fed 256 KiB of stdin")
def test_a_runtime_flood_leaves_init_no_backlog_and_the_harness_alive(h: HiveProcess) -> None:
    """The runtime floods stdout (~4 MiB, 64 KiB for each 4 KiB of stdin it reads) beside
    three CPU hogs, while the harness writes it 256 KiB of stdin from the turn's loop. Init's
    channel backlog (SIOCOUTQ on init's end, sampled every ~2 ms) stays within one message
    (0-768 bytes): the harness is never killed as deaf; the stdin arrives byte for byte."""
    out = feed_runtime(h, "flood")
    harness, ipid = h.harness_pid(FEED), init_pid(h, FEED)
    chan = pidfd_getfd(ipid, init_channel_fd(ipid))
    log_before = cage_log(h, FEED).stat().st_size
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(outq(chan))
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        entries, took = run_turn(h, FEED, BODY)
    finally:
        stop.set()
        t.join()
        os.close(chan)
    got = json.loads(out.read_text())
    log_tail = cage_log(h, FEED).read_bytes()[log_before:]
    print(f"turn {took:.2f} s; init's channel backlog: max {max(samples)} bytes over {len(samples)} samples; "
          f"the runtime got {got['n']} bytes of stdin (parsed {got['parsed']}, in {got['took']} s); "
          f"cage.log +{len(log_tail)} bytes")
    assert exit_status(entries) == 0, entries[-3:]
    assert got["parsed"] is True and got["sha"] == BODY_SHA and got["nl"], got
    assert max(samples) <= 4096, max(samples)
    assert h.harness_pid(FEED) == harness
    assert b"reads nothing of its channel" not in log_tail, log_tail[-300:]


@pytest.mark.attack("init.runtime-inheritance", ref=REF + ": a runtime that closes stdout and stderr, then reads stdin slowly")
def test_a_runtime_that_closes_its_output_first_still_gets_all_its_stdin(h: HiveProcess) -> None:
    """The runtime closes stdout and stderr at once, then reads 256 KiB of stdin 1 KiB at a
    time. The turn's loop, with no output left to poll, alternates ``init.wait`` and a poll
    for stdin: every byte arrives, and the turn ends."""
    out = feed_runtime(h, "closefirst")
    harness = h.harness_pid(FEED)
    entries, took = run_turn(h, FEED, BODY)
    got = json.loads(out.read_text())
    print(f"turn {took:.2f} s; the runtime read {got['n']} bytes of stdin in {got['took']} s (parsed {got['parsed']})")
    assert exit_status(entries) == 0, entries[-3:]
    assert got["parsed"] is True and got["sha"] == BODY_SHA and got["nl"], got
    assert h.harness_pid(FEED) == harness


@pytest.mark.attack("init.runtime-inheritance", ref=REF + ": a runtime that closes stdin while the harness still writes it")
def test_a_runtime_that_closes_stdin_at_once_ends_its_turn_cleanly(h: HiveProcess) -> None:
    """The runtime closes stdin at once; the harness still has ~190 KiB of the message to
    write (EPIPE; SIGPIPE is ignored in the harness, forked or exec'd). The turn ends with
    the runtime's own exit status and output; the harness is the same."""
    out = feed_runtime(h, "closein")
    harness = h.harness_pid(FEED)
    entries, took = run_turn(h, FEED, BODY)
    said = [e["data"] for e in entries if e["kind"] == "stdout"]
    print(f"turn {took:.2f} s; stdout {said}; result {out.read_text()}")
    assert exit_status(entries) == 0, entries[-3:]
    assert said == ["stdin closed"], said
    assert took < 5, took
    assert h.harness_pid(FEED) == harness


# -- held: the page pair, what a harness sends back, restarts --------------------------------


@pytest.mark.attack("harness.fork-inheritance", ref=REF + ": the page pair, what a compromised harness sends back, floods and restarts")
def test_the_page_pair_leaks_nothing_into_init_across_floods_and_restarts(h: HiveProcess, login: Login) -> None:
    """A compromised harness sends on its page pair (1 KiB messages until its buffer is
    full, and 8 with a descriptor each): init never reads that end, so nothing lands in
    init and it sleeps in poll. Then, twice, the harness stopped with 300 connections on
    web.sock (what its pair holds in flight) and killed: init's descriptors are those it had
    before each time (the stale pair and its connections closed), it did not spin, and the
    page answers through the real gateway."""
    web = Web(h)
    assert page_answers(h, PAGE).startswith("HTTP/1."), "the control"
    ipid = init_pid(h, PAGE)
    before = fds_of(ipid)
    end = harness_end(h, PAGE, page=True)
    sent = passed = 0
    end.setblocking(False)
    null = os.open(os.devnull, os.O_RDONLY)
    refused = 0
    try:
        for _ in range(8):
            try:
                socket.send_fds(end, [b"r25fd"], [null])
                passed += 1
            except PermissionError:  # init's end refuses them (SO_PASSRIGHTS, session 27)
                refused += 1
        assert refused == (8 if PASSRIGHTS else 0), (passed, refused)
        while sent < 20_000:
            end.send(b"r25" * 341)
            sent += 1
    except BlockingIOError:
        pass
    finally:
        os.close(null)
        end.close()
    t0 = cpu_ticks(ipid)
    time.sleep(0.5)
    idle = cpu_ticks(ipid) - t0
    wchan = Path(f"/proc/{ipid}/wchan").read_text()
    after_send = fds_of(ipid)
    answer = page_answers(h, PAGE)
    print(f"sent back {sent} messages and {passed} descriptors ({refused} refused); init {idle} ticks in 0.5 s, waits in {wchan};"
          f" its descriptors {len(before)} -> {len(after_send)}; page {answer!r}")
    assert after_send == before, (before, after_send)
    assert idle <= 5 and "poll" in wchan, (idle, wchan)
    assert answer.startswith("HTTP/1."), answer
    rounds = []
    for _ in range(2):
        old = h.harness_pid(PAGE)
        os.kill(old, signal.SIGSTOP)
        conns = connect_many(h, PAGE, 300)
        time.sleep(0.1)
        held = still_held(conns)
        t0 = cpu_ticks(ipid)
        time.sleep(0.3)
        spun = cpu_ticks(ipid) - t0
        os.kill(old, signal.SIGKILL)
        wait_new_harness(h, PAGE, old)
        left_open = still_held(conns)
        for c in conns:
            c.close()
        try:
            fds = wait_until(lambda: (f := fds_of(ipid)) == before and f, 5, "init's descriptors as before")
        except AssertionError:
            raise AssertionError(f"init's descriptors {before} -> {fds_of(ipid)}") from None
        status = web.get(f"/agent/{PAGE}/page/", login=login).status_code
        rounds.append((held, spun, left_open, len(fds), status))
    print("restarts (in flight, init's ticks in 0.3 s, left open after the restart, init's descriptors,"
          f" the page through the gateway): {rounds}")
    assert all(r[1] <= 3 and r[2] == 0 and r[4] == 200 for r in rounds), rounds


# -- held: init's own lines ---------------------------------------------------------------------

NOTE_PROBE = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
os.dup2(fd, 2)
from hyperhive.cage import init
i = init.Init(60000, 60000, 60001)
i.catch_children()

class Boom:
    def __del__(self):
        raise ValueError("y" * 100_000)

def unraisable(n):
    for _ in range(n):
        Boom()

unraisable(5)  # ~500 KB, within the budget
for k in range(5_000):  # ~350 KB more
    init.note(f"cage-init: harness exited with status -9; restarting in 0.5 s ({k})\n")
init.note("x" * (3 << 20) + "\n")  # past it: the notice instead
for k in range(20_000):
    init.note(f"cage-init: harness exited with status -9; restarting in 0.5 s ({k})\n")
unraisable(50)
"""


@pytest.mark.attack("budget.exhaustion", ref=REF + ": init's own lines (note, the unraisable hook) against INIT_LOG_MAX")
def test_init_own_lines_stop_at_their_budget() -> None:
    """Unraisable exceptions of 100 KB each (routed to ``note`` by init's hook), restart
    lines, one 3 MiB line, then 20,000 more lines and 50 more exceptions, through init's own
    writer: at most INIT_LOG_MAX bytes and the one notice reach its stderr (cage.log)."""
    with tempfile.NamedTemporaryFile() as f:
        r = subprocess.run([sys.executable, "-c", NOTE_PROBE, f.name], capture_output=True, text=True, timeout=30)
        data = Path(f.name).read_bytes()
    assert r.returncode == 0, r.stderr
    notice = data.count(b"its own lines reached")
    print(f"wrote {len(data)} bytes (budget {INIT_LOG_MAX}); {notice} notice; last line {data.splitlines()[-1][:100]!r}")
    assert len(data) <= INIT_LOG_MAX + 200 and notice == 1, (len(data), notice)
    assert b"x" * 1000 not in data and data.count(b"y" * 100_000) == 5, data.count(b"y" * 100_000)

"""Red team round 19: session 12's changes attacked: the cage's init forking the first
harness before it loads json/signal/socket/selectors (the fork connects to the agent's
socket with ``_socket`` before the harness's modules load: ``connect_first``), init's
own reading of the harness's requests (``recv_request`` on the C module's socket), the
end of a closed recv's wait whatever its peer left after the recv line (``_hang_up``:
the lines left still taken, their replies to nobody; paused sockets watched for their
close) and ``[swarm] held_names_max``.

Broke (fixed in this round): see docs/security.md's rounds table (red team round 19).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import CoreProcess, assert_ok, send_until_full, send_until_full_all, wait_for
from hyperhive.cage import init as cage_init
from hyperhive.cage import layout

from .conftest import MAX_CORE_LATENCY, cage_run

SRC = Path(__file__).resolve().parents[2] / "src"

# -- the first harness, caught in its connect ------------------------------------------

# Ids no hive of the machine uses (hive-priv allocates from its own range).
RUNTIME_UID, HARNESS_UID, CAGE_GID = 59731, 59732, 59733


def _status(pid: int) -> dict[str, str]:
    return {k: v.strip() for k, v in
            (line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())}


def _same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """kcmp(KCMP_FILE): the two descriptors are one open file."""
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(312, pid1, pid2, 0, fd1, fd2)  # SYS_kcmp on x86_64
    if rc < 0:
        raise OSError(ctypes.get_errno(), f"kcmp {pid1}/{fd1} {pid2}/{fd2}")
    return bool(rc == 0)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return out


# What the runtime's uid tries on the harness caught in its connect (from the host: no
# seccomp in its way, only the kernel's own checks between two uids).
AT_THE_HARNESS = r"""
import ctypes, errno, json, os, sys
h = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
def sys_call(*args):  # every argument a long: syscall(2) reads them so
    if libc.syscall(*(ctypes.c_long(a) if isinstance(a, int) else a for a in args)) < 0:
        raise OSError(ctypes.get_errno(), "")
attempt("signal", lambda: os.kill(h, 0))
attempt("mem", lambda: open(f"/proc/{h}/mem", "rb").close())
attempt("environ", lambda: open(f"/proc/{h}/environ", "rb").read())
attempt("fd", lambda: os.listdir(f"/proc/{h}/fd"))
attempt("ptrace", lambda: sys_call(101, 16, h, 0, 0))  # PTRACE_ATTACH
attempt("seize", lambda: sys_call(101, 0x4206, h, 0, 0))  # PTRACE_SEIZE
def getfd():
    pidfd = os.pidfd_open(h)
    try:
        sys_call(438, pidfd, 3, 0)  # pidfd_getfd: the channel to init, say
    finally:
        os.close(pidfd)
attempt("pidfd_getfd", getfd)
def vm_read():
    buf = ctypes.create_string_buffer(8)
    local = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
    remote = (ctypes.c_void_p * 2)(0x400000, 8)
    sys_call(310, h, local, 1, remote, 1, 0)  # process_vm_readv
attempt("process_vm_readv", vm_read)
print(json.dumps(out))
"""


def _listening_on_3128(pid: int) -> set[str]:
    """``socket:[INODE]`` of each TCP socket listening on 127.0.0.1:3128 in ``pid``'s
    network namespace."""
    rows = [line.split() for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]]
    return {f"socket:[{f[9]}]" for f in rows if f[1] == "0100007F:0C38" and f[3] == "0A"}


@pytest.fixture
def init_at_connect() -> Iterator[dict[str, Any]]:
    """The cage's init (its own code, as root, its own argv), its first harness held in
    its ``connect`` to the agent's socket: a listener of backlog 0 already holding one
    connection not accepted, so the harness's blocking connect waits in the kernel."""
    tmp_path = Path(tempfile.mkdtemp(prefix="r19-init-", dir="/tmp"))  # (pytest's: 0700 parents)
    tmp_path.chmod(0o755)
    path = tmp_path / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    path.chmod(0o777)
    listener.listen(0)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler.connect(str(path))  # the one place backlog 0 has: the next connect waits
    log = (tmp_path / "init.log").open("wb")
    code = (f"import sys; sys.path[:0] = [{str(SRC)!r}]; "
            "from hyperhive.cage.init import main; main(sys.argv[1:])")
    # In a network namespace of its own, as in a cage (its loopback up): init binds the
    # egress bridge's 127.0.0.1:3128 there, not on the host (session 24).
    init_argv = [layout.CAGE_PYTHON, "-I", "-S", "-c", code, "--uid", str(RUNTIME_UID), "--gid", str(CAGE_GID),
                 "--harness-uid", str(HARNESS_UID)]
    proc = subprocess.Popen(
        ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *init_argv],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        env={"HIVE_SOCKET": str(path), "PATH": "/usr/bin:/bin"},
    )
    try:
        harness: list[int] = []

        def in_connect() -> bool:
            harness[:] = _children(proc.pid)
            if len(harness) != 1:
                return False
            try:
                return Path(f"/proc/{harness[0]}/syscall").read_text().split()[0] == "42"  # connect
            except (FileNotFoundError, IndexError):
                return False

        wait_for(in_connect, timeout=20)
        yield {"init": proc.pid, "harness": harness[0], "listener": listener, "log": tmp_path / "init.log"}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # init and its harness: the group this test made
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()
        filler.close()
        listener.close()
        shutil.rmtree(tmp_path)


@pytest.mark.attack("harness.fork-inheritance",
                    ref="session 12 connect_first: the first harness connects before its modules load")
def test_the_first_harness_is_confined_and_itself_while_in_its_connect(init_at_connect: dict[str, Any]) -> None:
    """Caught inside its ``connect`` (the earliest moment anything outside init hears from
    it), the first harness already is what it is later: the harness uid and the cage's
    gid (real, effective, saved, fs) with no groups, no capability in any set, no_new_privs
    and init's seccomp filter, no signal blocked, only SIGPIPE and SIGXFSZ ignored and
    none of init's handlers (SIGCHLD, SIGTERM, SIGINT) caught, init's limits and
    oom_score_adj, no descriptor init holds but stdout and stderr (its wake-up pipe, its
    end of the channel), non-dumpable; the runtime's uid can't signal it, read its memory,
    environment or descriptors, trace it or take a descriptor from it (pidfd_getfd); and
    the peer the agent's socket accepts is the harness's pid, uid and gid (SO_PEERCRED,
    taken at the connect)."""
    h, i = init_at_connect["harness"], init_at_connect["init"]
    st, ist = _status(h), _status(i)
    assert st["Uid"].split() == [str(HARNESS_UID)] * 4, st["Uid"]
    assert st["Gid"].split() == [str(CAGE_GID)] * 4, st["Gid"]
    assert st["Groups"] == ""
    for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[k], 16) == 0, (k, st[k])
    assert (st["NoNewPrivs"], st["Seccomp"]) == ("1", "2")
    assert st["Seccomp_filters"] == ist["Seccomp_filters"] != "0"
    assert int(st["SigBlk"], 16) == 0, st["SigBlk"]
    assert int(st["SigIgn"], 16) == (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1)), st["SigIgn"]
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        assert int(ist["SigCgt"], 16) & 1 << (sig - 1), ("init catches", sig)
        assert not int(st["SigCgt"], 16) & 1 << (sig - 1), ("the harness catches", sig)
    assert Path(f"/proc/{h}/limits").read_text() == Path(f"/proc/{i}/limits").read_text()
    assert Path(f"/proc/{h}/oom_score_adj").read_text() == Path(f"/proc/{i}/oom_score_adj").read_text()
    for f in ("mem", "environ", "fd", "maps"):
        assert os.stat(f"/proc/{h}/{f}").st_uid == 0, f  # non-dumpable: its /proc files are root's
    mine = [int(fd) for fd in os.listdir(f"/proc/{h}/fd")]
    inits = [int(fd) for fd in os.listdir(f"/proc/{i}/fd")]
    shared = {(fd, ifd) for fd in mine for ifd in inits if _same_file(h, fd, i, ifd)}
    # stdio and, since session 24, the egress bridge's listener init bound (the same number).
    bridge = shared - {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert len(bridge) == 1 and all(fd == ifd for fd, ifd in bridge), (shared, mine, inits)
    ((fd, _),) = bridge
    assert os.readlink(f"/proc/{h}/fd/{fd}") in _listening_on_3128(h), (fd, shared)
    # stdio, the channel to init, the bridge's listener and the socket it is connecting:
    # nothing else yet.
    assert len(mine) == 6 and os.readlink(f"/proc/{h}/fd/0") == "/dev/null", mine
    # The runtime's uid at it.
    done = subprocess.run([sys.executable, "-I", "-c", AT_THE_HARNESS, str(h)], user=RUNTIME_UID,
                          group=CAGE_GID, extra_groups=[], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    print(f"the runtime's uid at the harness in its connect: {got}")
    assert all(v in ("EPERM", "EACCES") for v in got.values()), got
    # The connection it makes is the harness's, by its credentials at the connect.
    listener = init_at_connect["listener"]
    listener.settimeout(10)
    first, _ = listener.accept()  # the filler
    conn, _ = listener.accept()
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    assert (pid, uid, gid) == (h, HARNESS_UID, CAGE_GID)
    # It goes on as the harness: its first request comes on that connection.
    conn.settimeout(20)
    line = conn.makefile("rb").readline()
    assert json.loads(line).get("cmd"), line
    first.close()
    conn.close()


# -- init's reading of the harness's requests -------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _send(sock: socket.socket, data: bytes, fds: list[int] | None = None,
          anc: list[tuple[int, int, bytes]] | None = None) -> None:
    anc = list(anc or [])
    if fds:
        anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds)))
    sock.sendmsg([data], anc)


@pytest.fixture
def channel() -> Iterator[tuple[socket.socket, socket.socket]]:
    """init's end and the harness's of a channel like init's (SOCK_SEQPACKET)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield ours, theirs
    ours.close()
    theirs.close()


def _read(ours: socket.socket) -> tuple[Any, list[int]]:
    """One request as init's loop reads it, and what init would be left holding: the
    descriptors of a request it takes are closed after the reply (``Init.run``); those of
    a message it reads as none (``None``: a hang-up) are not."""
    before = _open_fds()
    req, fds = cage_init.recv_request(ours)
    held = _open_fds() - before
    if req is not None:
        for fd in fds:
            os.close(fd)
        held = _open_fds() - before
    return req, [held]


@pytest.mark.attack("init.status-parse",
                    ref="session 12 recv_request on _socket: SCM_RIGHTS, MSG_CTRUNC; a message with no bytes")
def test_what_the_harness_sends_init_never_leaves_it_holding_descriptors(
        channel: tuple[socket.socket, socket.socket]) -> None:
    """The harness's requests as init reads them (a compromised harness: the runtime can't
    reach the channel): 200 descriptors in one request (the kernel passes 4, the room
    init gives, and closes the rest), an SCM_CREDENTIALS beside SCM_RIGHTS, two SCM_RIGHTS
    in one message, a message of no bytes with 3 descriptors (read as a hang-up: init's
    loop goes on without closing them; before this round they stayed open in init, one
    message after another, up to its descriptor limit), and JSON that is no object
    (``null``: a hang-up too). After each, init holds no descriptor more than before."""
    ours, theirs = channel
    r, w = os.pipe()
    try:
        spawn = json.dumps({"op": "spawn", "argv": ["true"], "seq": 1}).encode()
        cases: list[tuple[str, bytes, list[int], list[tuple[int, int, bytes]]]] = [
            ("200 fds", spawn, [r] * 200, []),
            ("credentials and fds", spawn, [r, w, r],
             [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, struct.pack("3i", os.getpid(), 0, 0))]),
            ("two SCM_RIGHTS", spawn, [],
             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", r, w, r)),
              (socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", w, r, w))]),
            ("no bytes, 3 fds", b"", [r, w, r], []),
            ("null, 3 fds", b"null", [r, w, r], []),
        ]
        for what, data, fds, anc in cases:
            for _ in range(3):
                try:
                    _send(theirs, data, fds, anc)
                except OSError as e:  # the kernel's own refusal (too many, say): nothing sent
                    print(f"{what}: refused by the kernel ({e})")
                    break
                req, (held,) = _read(ours)
                assert held == 0, (what, req, held)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.attack("init.status-parse", ref="session 12 recv_request: json.loads of what the harness sends")
def test_no_request_shape_ends_init_by_an_exception(channel: tuple[socket.socket, socket.socket]) -> None:
    """Init's loop calls ``req.get`` on what ``recv_request`` returns: a request that is
    JSON but no object (a list, a number, a string), nested past the recursion limit, or
    longer than MSG_MAX (cut by SOCK_SEQPACKET) is read as an unknown request (a dict),
    never an exception out of init's loop (which ends the cage: before this round a
    ``[]`` from the harness did, and 300,000 ``[`` did with a RecursionError)."""
    ours, theirs = channel
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    for data in (b"[]", b"5", b'"spawn"', b"true", b"[" * 200_000, b'{"op":"kill","pid":' + b"1" * 5000 + b"}",
                 b'{"op":"spawn","argv":["' + b"a" * cage_init.MSG_MAX + b'"]}', b"\xff\xfe", b"{}" * 10):
        _send(theirs, data)
        req, fds = cage_init.recv_request(ours)
        assert isinstance(req, dict) and not fds, (data[:40], req)


# -- agent.sock: what a closed wait's peer left -------------------------------------------


def _connect(core: CoreProcess, name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    for _ in range(200):
        try:
            s.connect(str(core.agent_sock(name)))
            return s
        except (BlockingIOError, TimeoutError):
            time.sleep(0.02)
    raise AssertionError("agent.sock never took the connection")


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _go(s: socket.socket, how: str) -> None:
    if how == "reset":  # gone with what the core wrote unread
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif how == "shut both":
        s.shutdown(socket.SHUT_RDWR)
    s.close()


def _fds(core: CoreProcess) -> dict[str, int]:
    assert core.proc is not None
    kinds: dict[str, int] = {}
    for fd in Path(f"/proc/{core.proc.pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except FileNotFoundError:
            continue
        kind = "socket" if link.startswith("socket:") else link if link.startswith("anon_inode:") else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _drain(core: CoreProcess, name: str, want: int, seconds: float = 30) -> list[str]:
    """What a well-behaved receiver gets, each recv acking the last: bodies in order."""
    got: list[str] = []
    ack: list[int] = []
    deadline = time.monotonic() + seconds
    with core.agent(name) as c:
        while time.monotonic() < deadline:
            reply = assert_ok(c.call("recv", wait=1, max=100, ack=ack))
            ack = [m["id"] for m in reply["messages"]]
            got += [m["body"] for m in reply["messages"]]
            if len(got) >= want and not ack:
                break
        if ack:
            assert_ok(c.call("recv", wait=0, ack=ack))
    return got


TAILS = [b"", b" ", b'{"cmd":"whoami"', _line({"cmd": "whoami"}), _line({"cmd": "recv", "wait": 0}),
         _line({"cmd": "recv", "wait": 3600, "max": 1000}) * 3, _line({"cmd": "whoami"}) * 200]
GOES = ["close", "reset", "shut both"]


@pytest.mark.attack("wire.recv-ack-kill9",
                    ref="session 12 _hang_up: a message's wake-up racing its waiter's close; at-least-once")
def test_a_message_racing_a_closed_waits_end_is_delivered_once_and_never_lost(core: CoreProcess) -> None:
    """300 rounds: a recv of an hour on bob's socket with something after its line (a
    byte, a partial line, requests, more recvs of their own), and alice's message to bob
    sent just before, or just after, that peer goes (closed, reset with a reply unread,
    both halves shut); the wake-up and the hang-up meet in every order. A message a gone
    wait took (its reply written as the peer left) is handed back when its connection
    ends; one the hang-up beat stays in the inbox; the recvs left after the line read
    nothing. Then a well-behaved receiver gets each of the 300 exactly once, and nothing
    more; every socket of those rounds is gone from the core."""
    before = _fds(core).get("socket", 0)
    n = 300
    with core.agent("alice") as alice:
        for i in range(n):
            s = _connect(core, "bob")
            s.sendall(_line({"cmd": "recv", "wait": 3600}) + TAILS[i % len(TAILS)])
            how = GOES[(i // len(TAILS)) % len(GOES)]
            if i % 2:
                assert_ok(alice.call("send", to="bob", body=f"r19-{i}"))
                _go(s, how)
            else:
                _go(s, how)
                assert_ok(alice.call("send", to="bob", body=f"r19-{i}"))
    wait_for(lambda: _fds(core).get("socket", 0) <= before + 1, timeout=20)  # (+ alice's client, closing)
    got = _drain(core, "bob", n)
    dupes = sorted({b for b in got if got.count(b) > 1})
    lost = sorted(set(f"r19-{i}" for i in range(n)) - set(got))
    print(f"racing closes: {len(got)} received, {len(dupes)} twice, {len(lost)} lost")
    assert not dupes and not lost, (dupes[:10], lost[:10])
    assert sorted(got) == sorted(f"r19-{i}" for i in range(n))
    with core.agent("bob") as bob:
        assert assert_ok(bob.call("recv", wait=0.5))["messages"] == []


@pytest.mark.attack("budget.core-descriptors",
                    ref="session 12 _hang_up: lines left after a closed wait taken with replies to nobody")
def test_closed_waits_at_the_cap_with_megabytes_left_cost_no_more_than_a_live_agent(core: CoreProcess) -> None:
    """bob at his cap of 32 connections, each a recv of an hour and then as many cheap
    requests (``whoami``) as the core buffers (2 MiB before it stops reading, and what the
    kernel holds), then all gone at once. The core goes on with those lines, replies to
    nobody (no write buffer holds it back, as a live peer's unread replies would), but at
    bob's own pace (the byte pacer shared by all his connections: ~4,096 requests a
    second past the burst), so the cost is what a live bob reading his replies could
    impose: over 8 s alice is answered within MAX_CORE_LATENCY, the core's CPU stays
    under half a core, its memory grows by no more than the 32 buffers, no epoll is
    added; the connections go as their lines run out (figures printed: how many are
    still there, at 8 s). A connection reset with a reply unread drops its lines at once."""
    assert core.proc is not None
    pid = core.proc.pid
    before = _fds(core)
    rss0 = int(_status(pid)["VmRSS"].split()[0])
    conns = []
    cheap = _line({"cmd": "whoami"}) * ((3 << 20) // len(_line({"cmd": "whoami"})))
    for _ in range(32):
        s = _connect(core, "bob")
        s.sendall(_line({"cmd": "recv", "wait": 3600}))
        conns.append(s)
    left = sum(send_until_full_all(conns, cheap))  # filled together: their idle waits overlap
    worst, stop = [0.0], threading.Event()

    def other() -> None:
        with core.agent("alice") as alice:
            while not stop.is_set():
                t0 = time.monotonic()
                assert assert_ok(alice.call("whoami"))["name"] == "alice"
                worst[0] = max(worst[0], time.monotonic() - t0)
                time.sleep(0.05)

    watcher = threading.Thread(target=other)
    watcher.start()
    try:
        cpu0 = _cpu(pid)
        for s in conns:
            _go(s, "close")
        time.sleep(8)
        spent = _cpu(pid) - cpu0
        held = _fds(core).get("socket", 0) - before.get("socket", 0) - 1  # (alice's client aside)
        rss = int(_status(pid)["VmRSS"].split()[0])
    finally:
        stop.set()
        watcher.join()
    print(f"32 closed waits with {left / 2**20:.1f} MiB of whoami left: at 8 s {held} of them still taken, "
          f"the core's CPU {spent:.2f} s, its RSS {rss0 // 1024} -> {rss // 1024} MiB, "
          f"alice's slowest whoami {worst[0]:.3f} s")
    assert worst[0] < MAX_CORE_LATENCY, worst
    assert spent < 4.0, spent
    assert rss - rss0 < 32 * 4 * 1024 + 64 * 1024, (rss0, rss)
    after = _fds(core)
    assert after.get("anon_inode:[eventpoll]", 0) <= before.get("anon_inode:[eventpoll]", 0), (before, after)
    # One more, reset with a reply unread: its lines are dropped, its socket goes at once.
    s = _connect(core, "carol")
    s.sendall(_line({"cmd": "whoami"}) + _line({"cmd": "recv", "wait": 3600}))
    s.recv(1)  # the whoami's reply begun: the rest of it stays unread
    send_until_full(s, cheap)
    n = _fds(core).get("socket", 0)
    _go(s, "reset")
    wait_for(lambda: _fds(core).get("socket", 0) < n, timeout=10)


@pytest.mark.attack("budget.exhaustion",
                    ref="session 12 _hang_up: pipelined sends left after a closed wait; [limits] agent_pending_max")
def test_sends_left_after_a_closed_wait_stay_within_the_senders_quota(core_factory: Any) -> None:
    """bob's pending quota is 10. Eight connections, each a recv of an hour, then 40
    pipelined sends to alice (in one write with the recv line, or after it), then gone:
    the sends are taken after the hang-up (their effects stand), but past the quota each
    is refused as on any connection: alice holds exactly 10 of bob's, in the order sent."""
    core = core_factory(sections={"limits": {"agent_pending_max": 10}})
    for k in range(8):
        s = _connect(core, "bob")
        sends = b"".join(_line({"cmd": "send", "to": "alice", "body": f"q{k}-{j}"}) for j in range(40))
        head = _line({"cmd": "recv", "wait": 3600})
        if k % 2:
            s.sendall(head + sends)
        else:
            s.sendall(head)
            time.sleep(0.05)  # the wait begun
            s.sendall(sends)
        _go(s, GOES[k % len(GOES)])
    time.sleep(1)  # (the lines left are taken after the close: nothing to wait on from here)
    got = _drain(core, "alice", 10, seconds=10)
    print(f"sends left after closed waits: alice got {len(got)}: {got[:3]}...")
    assert len(got) == 10, got
    assert got == [f"q0-{j}" for j in range(10)], got


# Three lines of ~900 KiB (refused at once: an unknown field): past the 2 MiB at which the
# core stops reading, and quickly taken once it goes on (paced by size: ~0.1 s each).
BIG = _line({"cmd": "whoami", "x": "a" * (900 << 10)}) * 3


@pytest.mark.attack("core.reply-memory",
                    ref="session 12 _HangUps: a paused socket watched for its close; descriptor numbers reused")
def test_paused_waits_on_reused_descriptors_end_only_their_own(core: CoreProcess) -> None:
    """A hostile agent cycles connections so that the core's descriptor numbers are reused
    while its paused waits are watched (a recv waiting, 2.7 MiB after its line: the core
    stopped reading and watches the socket for its close): each round a paused wait is
    closed (it must end, its lines be taken, its descriptor freed), then a new paused wait,
    most likely on the number just freed, must keep waiting and get its message (a stale
    entry of the old one must not end it), then the replies to the lines it left. Then 32
    paused waits of bob's and 32 of carol's, closed together: every socket and the
    watcher's epoll gone afterwards."""
    before = _fds(core)
    for i in range(4):  # (12 in the round: 40 s of the suite; each round is the same)
        old = _connect(core, "bob")
        old.sendall(_line({"cmd": "recv", "wait": 60}))
        assert send_until_full(old, BIG) > 2 << 20
        old.close()
        try:
            wait_for(lambda: _fds(core).get("socket", 0) <= before.get("socket", 0), timeout=20)
        except AssertionError:
            raise AssertionError(f"round {i}: {_fds(core)} {before}") from None
        new = _connect(core, "bob")
        new.sendall(_line({"cmd": "recv", "wait": 30}))
        sent = send_until_full(new, BIG)
        assert sent > 2 << 20
        time.sleep(0.1)
        assert_ok(core.agent_call("alice", "send", to="bob", body=f"r19p-{i}"))
        new.settimeout(20)
        f = new.makefile("rb")
        raw = f.readline()
        assert raw, f"round {i}: the live paused wait was ended without its reply"
        got = assert_ok(json.loads(raw))["messages"]
        assert [m["body"] for m in got] == [f"r19p-{i}"], got
        new.sendall(BIG[sent:])  # the rest, once the core reads again
        for _ in range(3):  # the lines it left, refused one by one
            assert "unknown field" in json.loads(f.readline())["error"]
        f.close()  # (the makefile holds the descriptor open past the socket's close)
        new.close()
        assert_ok(core.agent_call("bob", "recv", wait=0, ack=[m["id"] for m in got]))
    conns = []
    for name in ("bob", "carol"):
        for _ in range(32):
            s = _connect(core, name)
            s.sendall(_line({"cmd": "recv", "wait": 60}))
            conns.append(s)
    sent = send_until_full_all(conns, BIG)  # filled together: their idle waits overlap
    assert min(sent) > 2 << 20, sent  # every one paused: the core stopped reading it
    during = _fds(core)
    assert during.get("anon_inode:[eventpoll]", 0) <= before.get("anon_inode:[eventpoll]", 0) + 1, during
    for s in conns:
        s.close()
    wait_for(lambda: _fds(core).get("socket", 0) <= before.get("socket", 0), timeout=60)
    after = _fds(core)
    assert after.get("anon_inode:[eventpoll]", 0) <= before.get("anon_inode:[eventpoll]", 0), (before, after)
    assert_ok(core.agent_call("alice", "send", to="bob", body="after"))
    with core.agent("bob") as bob:
        assert [m["body"] for m in assert_ok(bob.call("recv", wait=10))["messages"]] == ["after"]


# -- [swarm] held_names_max ------------------------------------------------------------


@pytest.mark.attack("swarm-roster-fill", ref="session 12 [swarm] held_names_max (64..HELD_MAX); TOML 1.0 types")
@pytest.mark.parametrize("value", ["true", "false", "64.0", "64.5", '"8192"', "1e9", "-1", "0", "8192.0", "8193.0",
                                   "0x2000", "0x2001", "9_000", "inf", "nan", "[64]", "{a = 1}"])
def test_held_names_max_is_an_integer_within_its_bounds_whatever_toml_gives(tmp_path: Path, value: str) -> None:
    """The operator's bound on the names a host holds (each one key of its roster bucket,
    which a hostile host's later claims make it hold) takes whatever TOML can say, a
    boolean, a float, a string of digits, hex, infinity, a list: each is refused in one
    line, or is an integer from 64 to HELD_MAX (an eighth of the bucket's keys), never
    more: with the agents a host may declare ([limits] max_agents at most), its keys stay
    within the bucket's ROSTER_HOST_KEYS."""
    from hyperhive.config import ConfigError, LimitsSection, load_config
    from hyperhive.swarm import subjects
    from hyperhive.swarm.bridge import HELD_MAX

    path = tmp_path / "hive.toml"
    path.write_text(f'[swarm]\nhost = "a"\nurls = ["nats://x:4222"]\ncredentials = "/s"\nheld_names_max = {value}\n')
    try:
        swarm = load_config(path).swarm
    except ConfigError as e:
        assert "\n" not in str(e) and "held_names_max" in str(e), str(e)
        return
    assert swarm is not None
    got = swarm.held_names_max
    print(f"held_names_max = {value} -> {got!r}")
    assert type(got) is int and 64 <= got <= HELD_MAX, (value, got)
    max_agents = LimitsSection.model_fields["max_agents"].metadata
    most = max(m.le for m in max_agents if getattr(m, "le", None) is not None)
    assert most + HELD_MAX <= subjects.ROSTER_HOST_KEYS


# -- from inside a cage: the runtime's gone connections and its harness -----------------

CAPPED, CAP_OTHER = "r19cap", "r19oth"


@pytest.fixture(scope="module")
def capped_hive() -> Iterator[Any]:
    from hive_fixture import HiveProcess, running_hive

    yield from running_hive(HiveProcess({
        CAPPED: {"runtime": "command", "command": ["true"]},
        CAP_OTHER: {"runtime": "command", "command": ["true"]},
    }))


# The runtime's uid at its cap: 32 recv waits, each with as many whoami lines after it as
# the core takes, all closed; then what a new connection of its own gets.
FILL_THE_CAP = """
import socket, time
line = b'{"cmd":"whoami"}\\n'
cheap = line * ((3 << 20) // len(line))
opened, left = 0, 0
socks = []
for _ in range(32):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(AGENT_SOCK)
        s.sendall(b'{"cmd":"recv","wait":3600}\\n')
    except OSError:
        s.close()
        continue
    s.setblocking(False)
    opened += 1
    socks.append(s)
# All filled together (as helpers.send_until_full_all): until 0.2 s pass with room on none.
sent, idle = [0] * len(socks), 0
while idle < 10:
    moved = False
    for i, s in enumerate(socks):
        if sent[i] < len(cheap):
            try:
                sent[i] += s.send(cheap[sent[i]:sent[i] + 65536])
                moved = True
            except BlockingIOError:
                pass
    if not any(n < len(cheap) for n in sent):
        break
    idle = 0 if moved else idle + 1
    if not moved:
        time.sleep(0.02)
left = sum(sent)
for s in socks:
    s.close()
time.sleep(1)
try:
    own = call({"cmd": "whoami"})
except OSError as e:
    own = {"error": errname(e)}
result(opened=opened, left=left, own=own)
"""


@pytest.mark.attack("budget.core-descriptors",
                    ref="session 12 _hang_up: a gone connection's lines hold the runtime's cap; the harness's own")
def test_the_runtimes_gone_connections_at_its_cap_leave_its_harness_served(capped_hive: Any) -> None:
    """From inside the cage, the runtime's uid fills its 32 connections with closed recv
    waits, each with 3 MiB of ``whoami`` after the recv line (taken after the close at the
    runtime's pace, replies to nobody: they keep its connections for minutes). Its
    harness is another uid, with its own cap and its own pacer: an operator's message
    to the agent is still taken as a turn (its transcript grows) within 30 s, and the
    other agent is served at once meanwhile. Figures: what the runtime's own next
    connection got."""
    hive = capped_hive

    def entries() -> int:
        reply = hive.host_call("transcript", name=CAPPED, limit=5000)
        assert reply.get("ok"), reply
        return len(reply.get("entries") or reply.get("transcript") or [])

    assert hive.host_call("send", to=CAPPED, body="r19 before").get("ok")
    wait_for(lambda: entries() > 0, timeout=60, interval=0.5)
    before = entries()
    out = cage_run(hive, CAPPED, FILL_THE_CAP, timeout=120)
    print(f"the runtime's 32 gone connections with {out['left'] / 2**20:.1f} MiB left: its own next one got {out['own']}")
    assert out["opened"] == 32, out
    t0 = time.monotonic()
    assert hive.host_call("send", to=CAPPED, body="r19 after").get("ok")
    wait_for(lambda: entries() > before, timeout=30, interval=0.5)
    print(f"the harness took the operator's message as a turn after {time.monotonic() - t0:.1f} s")
    t1 = time.monotonic()
    assert hive.agent_call(CAP_OTHER, "whoami").get("name") == CAP_OTHER
    assert time.monotonic() - t1 < MAX_CORE_LATENCY

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

from helpers import CoreProcess, assert_ok, wait_for
from hyperhive.cage import init as cage_init
from hyperhive.cage import layout

from .conftest import MAX_CORE_LATENCY

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
    proc = subprocess.Popen(
        [layout.CAGE_PYTHON, "-I", "-S", "-c", code, "--uid", str(RUNTIME_UID), "--gid", str(CAGE_GID),
         "--harness-uid", str(HARNESS_UID)],
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
    assert shared == {(1, 1), (1, 2), (2, 1), (2, 2)}, (shared, mine, inits)
    # stdio, the channel to init and the socket it is connecting: nothing else yet.
    assert len(mine) == 5 and os.readlink(f"/proc/{h}/fd/0") == "/dev/null", mine
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

"""Red-team suite: attacks on the hive, each run from INSIDE a real cage.

One hive (``rt``, package-scoped) serves every module of this directory, so the
suite stays fast; modules that need other settings (a rate limit, a small state
filesystem) start their own. Agent names all start with ``rt`` so nothing
collides with other test modules running on the same machine.

Every case asserts two things:

- the refusal itself, as exact as the interface allows (the one-line ``error``,
  an errno name, an HTTP status);
- that nothing else changed: ``unchanged(hive)`` takes a digest of the hive's
  state before and after (host.sock's view, the database rows, every cage's
  pid, the run and state directory trees) and compares them.

Probes go through ``HiveProcess.probe`` (the script first proves that it is in a
cage) with ``CLIENT`` prepended: a tiny JSON-lines client for the cage's
``/run/hive/agent.sock``.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import hashlib
import json
import os
import select
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import (  # noqa: F401 (host_addresses: for the tests)
    HiveProcess,
    host_addresses,
    probe_result,
    proc_cmdline,
    proc_uid,
    running_hive,
)
from hyperhive.cage import layout
from hyperhive.client import Client
from hyperhive.unixsock import refuse_descriptors
from web_fixture import snapshot as web_snapshot

# alice -> bob; bob -> alice, carol; carol, mule (takes the exhaustion probes) and
# mallory (the injection agent: its runtime echoes every message it gets) have no peers.
RT_AGENTS: dict[str, dict[str, Any]] = {
    "rtalice": {"runtime": "command", "command": ["true"], "peers": ["rtbob"]},
    "rtbob": {"runtime": "command", "command": ["true"], "peers": ["rtalice", "rtcarol"]},
    "rtcarol": {"runtime": "command", "command": ["true"]},
    "rtmule": {"runtime": "command", "command": ["true"]},
    "rtmallory": {"runtime": "command", "command": ["cat"]},
}
MAX_CORE_LATENCY = 3.0  # seconds: the core must keep answering others while a cage attacks it

# Prepended to every probe: a JSON-lines client for the cage's own agent.sock.
CLIENT = '''
import errno, json, socket, struct, time

AGENT_SOCK = "/run/hive/agent.sock"

def errname(e):
    return errno.errorcode.get(e.errno, str(e)) if getattr(e, "errno", None) else type(e).__name__

class Conn:
    def __init__(self, path=AGENT_SOCK, timeout=30):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A blocking connect, bounded by SO_SNDTIMEO: it waits for room in the listen
        # backlog. With settimeout first the socket is non-blocking underneath, and a unix
        # connect to a full backlog (8 on agent.sock; the core slow to accept on a loaded
        # machine) fails at once with EAGAIN instead of waiting.
        if timeout is not None:
            whole = int(timeout)
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                              struct.pack("ll", whole, int((timeout - whole) * 1e6)))
        self.s.connect(path)
        self.s.settimeout(timeout)
        self.f = self.s.makefile("rb")

    def send(self, data):
        self.s.sendall(data)

    def line(self):
        raw = self.f.readline()
        return json.loads(raw) if raw else None

    def raw(self, data):
        self.send(data)
        return self.line()

    def call(self, req):
        return self.raw(json.dumps(req).encode() + b"\\n")

    def close(self):
        try:
            self.f.close()
            self.s.close()
        except OSError:
            pass

def call(req):
    c = Conn()
    try:
        return c.call(req)
    finally:
        c.close()

def call_when_free(req, seconds=10.0):
    """``call``, retried while the core is still letting go of this uid's earlier
    connections (refused as too many, or hung up on)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            reply = call(req)
            busy = reply is None or (reply.get("ok") is False and reply["error"].startswith("too many connections"))
        except OSError as e:
            reply, busy = {"error": errname(e)}, True
        if not busy or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)

def err(req):
    """The refusal of one request (the whole reply if it was not refused)."""
    reply = call(req)
    return reply["error"] if reply and reply.get("ok") is False and set(reply) == {"version", "ok", "error"} else reply
'''


def cage_run(hive: HiveProcess, name: str, script: str, *, timeout: float = 90, **params: Any) -> dict[str, Any]:
    """Run ``script`` (with CLIENT) inside ``name``'s cage; return what it passed to result()."""
    return probe_result(hive.probe(name, textwrap.dedent(CLIENT) + textwrap.dedent(script), timeout=timeout, **params))


# -- the digest --------------------------------------------------------------------------


def tree(root: Path, skip: tuple[str, ...] = ()) -> list[tuple[str, int, int, int]]:
    """Every path under ``root`` with its owner, group and mode (not contents: the
    database and logs change by themselves)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if any(rel == s or rel.startswith(s + "/") for s in skip):
            dirnames[:] = []
            continue
        for n in sorted(dirnames + filenames):
            p = Path(dirpath) / n
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            if n.startswith("hive.db") or n.endswith((".log", ".pid")):
                continue
            out.append((os.path.join(rel, n), st.st_uid, st.st_gid, st.st_mode))
    return sorted(out)


def digest_parts(hive: HiveProcess) -> dict[str, Any]:
    """What no refused attack may change: host.sock's view and the database rows
    (web_fixture.snapshot), each cage's init pid and uids, and the directory trees."""
    cages = hive.priv("status")
    assert cages.get("ok"), cages
    homes = tuple(f"agents/{n}/home" for n in hive.names)
    return {
        **web_snapshot(hive),
        "cages": {n: {k: v for k, v in row.items() if k not in ("memory_bytes", "oom_kills", "pids_refused")}
                  for n, row in sorted(cages["cages"].items())},
        "run_tree": tree(hive.run_dir, skip=("gateway",)),
        "state_tree": tree(hive.state_dir, skip=homes),
    }


def digest(hive: HiveProcess) -> str:
    return hashlib.sha256(json.dumps(digest_parts(hive), sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def unchanged(hive: HiveProcess) -> Iterator[None]:
    """The hive's digest is the same afterwards (and its parts, for the message)."""
    before = digest_parts(hive)
    yield
    after = digest_parts(hive)
    for key in before:
        assert after[key] == before[key], (
            f"the hive's state changed ({key}):\nbefore {before[key]}\nafter  {after[key]}")
    assert json.dumps(after, sort_keys=True, default=str) == json.dumps(before, sort_keys=True, default=str)


@dataclass
class Changes:
    """Rows each table gained and lost (a changed row is one lost and one gained)."""

    added: dict[str, list[tuple[Any, ...]]]
    removed: dict[str, list[tuple[Any, ...]]]

    def count(self) -> dict[str, tuple[int, int]]:
        return {t: (len(self.added.get(t, [])), len(self.removed.get(t, [])))
                for t in sorted(set(self.added) | set(self.removed))}


@contextlib.contextmanager
def changes(hive: HiveProcess) -> Iterator[Changes]:
    """For an attack whose legitimate part changes something (a message sent, a
    request made): afterwards ``Changes`` holds exactly what changed in the database,
    for the test to compare with what it expects; the cages and the directory trees
    must not have changed at all."""
    before = digest_parts(hive)
    ch = Changes({}, {})
    yield ch
    after = digest_parts(hive)
    for key in ("cages", "run_tree", "state_tree"):
        assert after[key] == before[key], f"{key} changed:\nbefore {before[key]}\nafter  {after[key]}"
    for table, rows in before["db"].items():
        b, a = {tuple(r) for r in rows}, {tuple(r) for r in after["db"][table]}
        if a - b:
            ch.added[table] = sorted(a - b, key=repr)
        if b - a:
            ch.removed[table] = sorted(b - a, key=repr)


def db_rows(hive: HiveProcess, table: str) -> list[tuple[Any, ...]]:
    return web_snapshot(hive)["db"][table]


# -- the core keeps serving others -----------------------------------------------------


@dataclass
class Latency:
    samples: list[float]
    errors: list[str]


@contextlib.contextmanager
def others_keep_working(hive: HiveProcess, other: str = "rtcarol", *, max_latency: float = MAX_CORE_LATENCY
                        ) -> Iterator[Latency]:
    """While the body runs, call host.sock's agent_status and ``other``'s whoami over
    and over (fresh connections each time); each must be answered quickly."""
    lat = Latency([], [])
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                with Client(hive.host_sock, timeout=15) as c:
                    assert c.call("agent_status")["ok"]
                with Client(hive.agent_sock(other), timeout=15) as c:
                    reply = c.call("whoami")
                    assert reply == {"version": 1, "ok": True, "name": other}, reply
            except Exception as e:  # reported below
                lat.errors.append(repr(e))
            lat.samples.append(time.monotonic() - t0)
            stop.wait(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield lat
    finally:
        stop.set()
        thread.join(30)
    assert not lat.errors, lat.errors[:5]
    assert len(lat.samples) >= 3, lat.samples
    assert max(lat.samples) < max_latency, f"the core was slow to answer others: max {max(lat.samples):.2f} s"


# -- processes -----------------------------------------------------------------------------


def core_fds(hive: HiveProcess) -> int:
    pid = hive.core_pid()
    assert pid is not None
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(hive: HiveProcess) -> list[str]:
    """What the core's descriptors name (sockets, pipes, files), for a failure's message."""
    pid = hive.core_pid()
    assert pid is not None
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return sorted(out)


def core_rss_kib(hive: HiveProcess) -> int:
    pid = hive.core_pid()
    assert pid is not None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- the shared hive ---------------------------------------------------------------------


@dataclass
class World:
    """State the attacks aim at, set up once."""

    q_op: int  # rtalice asked the operator
    q_bob: int  # rtalice asked rtbob
    approval: int  # rtbob's pending custom approval
    approval_sha: str
    spawn: int  # rtalice's pending spawn approval (of rtkid)
    spawn_sha: str
    msg_op: int  # rtalice -> operator
    msg_bob: int  # rtalice -> rtbob


@pytest.fixture(scope="package")
def rt() -> Iterator[HiveProcess]:
    """The red team's hive: five agents in cages, behind the gateway."""
    yield from running_hive(HiveProcess(RT_AGENTS))


@pytest.fixture(scope="package")
def world(rt: HiveProcess) -> World:
    h = rt

    def ok(reply: dict[str, Any]) -> dict[str, Any]:
        assert reply.get("ok"), reply
        return reply

    q_op = ok(h.agent_call("rtalice", "ask", to="operator", question="may I deploy?", options=["yes", "no"]))["id"]
    q_bob = ok(h.agent_call("rtalice", "ask", to="rtbob", question="for bob only"))["id"]
    a = ok(h.agent_call("rtbob", "request_approval", kind="custom", description="rotate the keys", payload={"x": 1}))
    spawn_payload = {"name": "rtkid", "spec": {"runtime": "command", "command": ["true"]}}
    s = ok(h.agent_call("rtalice", "request_approval", kind="spawn", description="a helper", payload=spawn_payload))
    msg_op = ok(h.agent_call("rtalice", "send", to="operator", body="hello operator"))["id"]
    msg_bob = ok(h.agent_call("rtalice", "send", to="rtbob", body="hello bob"))["id"]
    ok(h.agent_call("rtcarol", "set_status", text="working"))
    return World(q_op=q_op, q_bob=q_bob, approval=a["id"], approval_sha=a["payload_sha256"], spawn=s["id"],
                 spawn_sha=s["payload_sha256"], msg_op=msg_op, msg_bob=msg_bob)




# -- the catalogue -----------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every red-team case names its class (``pytest.mark.attack``): the suite is a
    catalogue, and ``test_catalogue.py`` checks that every class is covered."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents and item.get_closest_marker("attack") is None:
            raise pytest.UsageError(f"{item.nodeid}: a red-team case needs @pytest.mark.attack(CLASS, ref=...)")


# -- the harness and its bridge listener, from the host (round 27, re-checks) ----------------


def harness_or_none(h: HiveProcess, name: str) -> int | None:
    """The agent's harness pid, or None while init restarts it."""
    try:
        return h.harness_pid(name)
    except (AssertionError, OSError):
        return None


def pidfd_getfd(pid: int, fd: int) -> int:
    """``pid``'s descriptor ``fd``, as root on the host: what that process (a harness,
    init) holds, to act as it would when compromised."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        got = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
        if got < 0:
            raise OSError(ctypes.get_errno(), f"pidfd_getfd({pid}, {fd})")
        return int(got)
    finally:
        os.close(pidfd)


def held_sockets(pid: int) -> list[tuple[int, socket.socket]]:
    """Every socket ``pid`` holds: its descriptor number and a copy (``pidfd_getfd``; the
    caller closes them)."""
    got = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                got.append((int(name), socket.socket(fileno=pidfd_getfd(pid, int(name)))))
        except OSError:
            continue
    return got


def grab_bridge_listener(pid: int) -> socket.socket:
    """The harness's copy of init's bridge listener, as root on the host (pidfd_getfd):
    what the harness itself holds, to act as a compromised harness would."""
    found = None
    for _, s in held_sockets(pid):
        with contextlib.suppress(OSError):
            if (found is None and s.family == socket.AF_INET
                    and s.getsockname() == ("127.0.0.1", layout.EGRESS_PORT)
                    and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                found = s
                continue
        s.close()
    if found is None:
        raise AssertionError(f"no listener on 127.0.0.1:{layout.EGRESS_PORT} in the harness {pid}")
    return found


def init_pid(h: HiveProcess, name: str) -> int:
    """The cage's init: its one process of uid 0 that is not bwrap."""
    found = [p for p in h.cage_procs(name) if proc_uid(p) == 0 and proc_cmdline(p)[:1] != ["bwrap"]]
    assert len(found) == 1, [(p, proc_uid(p), proc_cmdline(p)) for p in h.cage_procs(name)]
    return found[0]


def seqpackets(pid: int) -> dict[int, tuple[int, bool]]:
    """``pid``'s SOCK_SEQPACKET descriptors: fd -> (socket inode, non-blocking)."""
    out = {}
    for fd, s in held_sockets(pid):
        with s:
            if s.type != socket.SOCK_SEQPACKET:
                continue
            with contextlib.suppress(OSError, IndexError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
                out[fd] = (int(target[8:-1]), bool(flags & os.O_NONBLOCK))
    return out


def harness_end(h: HiveProcess, name: str, page: bool = False) -> socket.socket:
    """The harness's end (a copy, pidfd_getfd) of its channel to init, or with ``page`` of
    its page pair: the peer, in the cage's socket table (``ss``), of init's blocking
    SEQPACKET end (the channel) or its non-blocking one (the page pair)."""
    ipid, harness = init_pid(h, name), h.harness_pid(name)
    (ours,) = [ino for ino, nonblocking in seqpackets(ipid).values() if nonblocking == page]
    table = subprocess.run(["nsenter", "-t", str(ipid), "-n", "ss", "-xaH"], capture_output=True,
                           text=True, check=True).stdout
    peers = {int(f[5]): int(f[7]) for f in (line.split() for line in table.splitlines())
             if len(f) >= 8 and f[0] == "u_seq" and f[5].isdigit() and f[7].isdigit()}
    theirs = [fd for fd, (ino, _) in seqpackets(harness).items() if ino == peers[ours]]
    assert len(theirs) == 1, (ours, peers, seqpackets(harness))
    return socket.socket(fileno=pidfd_getfd(harness, theirs[0]))


def cpu_ticks(pid: int) -> int:
    """``pid``'s user and system time, in clock ticks."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return "?"


def page_answers(h: HiveProcess, name: str, timeout: float = 3.0) -> str:
    """The first line of the agent's page's answer on its web.sock, asked as the gateway
    asks; or the error."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(h.run_dir / "ui" / name / "web.sock"))
            s.sendall(b"GET / HTTP/1.0\r\nHost: page\r\n\r\n")
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def nofile(pid: int) -> tuple[int, int]:
    """``pid``'s RLIMIT_NOFILE, soft and hard, as /proc shows it."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no descriptor limit for {pid}")


def _passrights() -> bool:
    a, b = socket.socketpair()
    with a, b:
        return refuse_descriptors(a)


# Whether this kernel (6.16 or later) lets a socket refuse SCM_RIGHTS: where it does, the
# hive's sockets that carry no descriptors refuse them (unixsock.refuse_descriptors).
PASSRIGHTS = _passrights()


def rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """Ancillary data for ``sendmsg`` that passes ``fds`` (SCM_RIGHTS)."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def at_eof(r: int, wait: float = 0.5) -> bool:
    """The pipe's read end sees EOF: no copy of its write end is left anywhere."""
    if not select.select([r], [], [], wait)[0]:
        return False
    return os.read(r, 1) == b""


def threads_in(pid: int, *frames: str) -> dict[str, str]:
    """``pid``'s threads whose kernel stack names any of ``frames``: tid -> thread name
    (empty if the process is gone)."""
    found: dict[str, str] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/stack") as f:
                stack = f.read()
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if any(fr in stack for fr in frames):
            found[t] = comm
    return found

"""Re-check of session 24 (red team round 27's fixes), from real cages.

The hostile party is the agent's runtime (every process of the runtime uid in the cage,
its output, its home, its timing) and, where said, a compromised harness (the harness
uid's process, which holds init's bridge listener; simulated from the host: its copy
taken with ``pidfd_getfd``, or a process of the harness uid entered into the cage's
namespaces with that copy, as the harness's own child would hold it).

The change under test: init binds 127.0.0.1:3128 (SO_REUSEPORT) for the cage's life,
binds a fresh listener beside the old one for each restarted harness
(``init.rebind_bridge``) and closes the old, re-arms the page's listener, and after a
harness dies sweeps the harness uid as well as the runtime's (``Init.kill_uid``); the
bridge's accept loop rides out errors; the transcript is bounded in stored bytes with
``transcript_usage`` counts, migration 14 leaving old rows' size -1.

Broke, fixed the same session (low): a harness-uid process handed the harness's copy of
the bridge listener to hive-core's egress proxy over egress.sock as if it were an
accepted connection (the handover byte and SCM_RIGHTS): the core kept 16 of 40 past the
harness's death and init's rebind, in the same reuseport group as the new listener, and
1-2 of 12 connections to the proxy URL were reset (3 of 3 runs). Now the proxy takes a
handed descriptor only if it is a connected socket (``_receive``: not ``SO_ACCEPTCONN``,
``getpeername`` answers). Held: a locked drop-all filter, SO_REUSEPORT off and SO_RCVLOWAT
on the old listener die with it; restarts leak no descriptor in init; a harness-uid child
holding the listener is swept; the counts match a recount in a running hive and after
migrating odd old rows.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import assert_ok, store_at_version
from hive_fixture import HiveProcess, proc_cmdline, proc_uid, running_hive, wait_until
from hyperhive.cage import layout
from hyperhive.core.store import Store
from hyperhive.wire.common import AgentSpec

from .conftest import cage_run, grab_bridge_listener, harness_or_none

REF = "re-check of session 24"
PORT = layout.EGRESS_PORT
SABOTAGE, SQUAT, HANDER = "rc24sab", "rc24squat", "rc24hand"
RUNTIME_PATH = f"{layout.HOME}/rc24-runtime"
OUT_PATH = f"{layout.HOME}/rc24-out.json"
FORBIDDEN = "HTTP/1.1 403 Forbidden"

# The runtime of SABOTAGE's turns (after the harness restarts: an exec'd harness, the
# listener handed through fork_exec's keep): what listener it holds, what env it sees,
# whether SO_REUSEPORT lets it join the bridge's group.
RUNTIME_SCRIPT = r"""#!/usr/bin/python3
import errno, json, os, socket, sys
sys.stdin.read()
out = {"uid": os.getuid(), "env": sorted(k for k in os.environ if "BRIDGE" in k or "PAGE" in k),
       "listeners": [], "binds": {}}
for name in os.listdir("/proc/self/fd"):
    try:
        s = socket.socket(fileno=os.dup(int(name)))
    except OSError:
        continue
    try:
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            out["listeners"].append([int(name), repr(s.getsockname())])
    except OSError:
        pass
    s.close()
for key, opts in (("reuseport", [socket.SO_REUSEPORT]), ("both", [socket.SO_REUSEPORT, socket.SO_REUSEADDR])):
    s = socket.socket()
    for o in opts:
        s.setsockopt(socket.SOL_SOCKET, o, 1)
    try:
        s.bind(("127.0.0.1", PORTNUM))
        s.listen(4)
        out["binds"][key] = "bound"
    except OSError as e:
        out["binds"][key] = errno.errorcode.get(e.errno, str(e))
    s.close()
with open(OUTPATH, "w") as f:
    json.dump(out, f)
print("rc24 probed", flush=True)
""".replace("PORTNUM", str(PORT)).replace("OUTPATH", repr(OUT_PATH))

ANSWER = r"""
def answer(timeout=3):
    try:
        s = socket.create_connection(("127.0.0.1", P["port"]), timeout=timeout)
    except OSError as e:
        return type(e).__name__
    try:
        s.sendall(b"CONNECT rc24.invalid:443 HTTP/1.1\r\nHost: rc24.invalid:443\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
        return head.split(b"\r\n")[0].decode(errors="replace")
    except OSError as e:
        return type(e).__name__
    finally:
        s.close()
result(answers=[answer() for _ in range(P["n"])])
"""


@pytest.fixture(scope="module")
def h() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess({
        SABOTAGE: {"runtime": "command", "command": [RUNTIME_PATH], "peers": []},
        SQUAT: {"runtime": "command", "command": ["true"], "peers": []},
        HANDER: {"runtime": "command", "command": ["true"], "peers": []},
    }))


def _answers(h: HiveProcess, name: str, n: int = 6) -> list[str]:
    return cage_run(h, name, ANSWER, port=PORT, n=n)["answers"]


def _init_pid(h: HiveProcess, name: str) -> int:
    found = [p for p in h.cage_procs(name) if proc_uid(p) == 0 and proc_cmdline(p)[:1] != ["bwrap"]]
    assert len(found) == 1, [(p, proc_uid(p), proc_cmdline(p)) for p in h.cage_procs(name)]
    return found[0]


def _listening_3128(init_pid: int) -> list[int]:
    """Inodes of the sockets listening on 127.0.0.1:3128 in the cage's netns."""
    inodes = []
    for line in Path(f"/proc/{init_pid}/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == f"0100007F:{PORT:04X}" and f[3] == "0A":
            inodes.append(int(f[9]))
    return inodes


def _fds(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return out


def _restart(h: HiveProcess, name: str, old: int) -> int:
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: (p := harness_or_none(h, name)) and p != old, 30, "init to start a new harness",
               interval=0.05)
    return h.harness_pid(name)


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


SO_ATTACH_FILTER, SO_LOCK_FILTER = 26, 44


def _sabotage_socket(s: socket.socket) -> dict[str, str]:
    """What a compromised harness can do to the listening *socket* (not its open file
    description): shared with init, and with the next harness if init kept it. A locked
    drop-all filter (every SYN dropped: clients hang), SO_REUSEPORT off (so a bind beside
    it conflicts and init keeps this one), SO_RCVLOWAT at its most (inherited by every
    accepted connection: the proxy never sees the request readable)."""
    libc = ctypes.CDLL(None, use_errno=True)
    done = {}
    prog = (SockFilter * 1)(SockFilter(0x06, 0, 0, 0))  # BPF_RET|BPF_K 0: drop
    fprog = SockFprog(1, prog)
    rc = libc.setsockopt(s.fileno(), socket.SOL_SOCKET, SO_ATTACH_FILTER, ctypes.byref(fprog), ctypes.sizeof(fprog))
    done["filter"] = "ok" if rc == 0 else os.strerror(ctypes.get_errno())
    one = ctypes.c_int(1)
    rc = libc.setsockopt(s.fileno(), socket.SOL_SOCKET, SO_LOCK_FILTER, ctypes.byref(one), 4)
    done["lock"] = "ok" if rc == 0 else os.strerror(ctypes.get_errno())
    for key, opt, val in (("reuseport_off", socket.SO_REUSEPORT, 0), ("rcvlowat", socket.SO_RCVLOWAT, 0x7FFFFFFF)):
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, val)
            done[key] = "ok"
        except OSError as e:
            done[key] = str(e)
    return done


# -- a compromised harness's sabotage of the shared socket, then a restart storm -------------


@pytest.mark.attack("harness.fork-inheritance", ref=REF + ": socket options on init's listener (locked drop filter, SO_REUSEPORT off, SO_RCVLOWAT), then 3 restarts: init's fds, listeners, the runtime's reach")
def test_socket_sabotage_dies_with_the_harness_and_restarts_leak_nothing(h: HiveProcess) -> None:
    """Round 27 fixed the open file description (O_NONBLOCK, shutdown); the socket itself
    is shared too. If a compromised harness can make init's ``rebind_bridge`` fail (a bind
    beside a socket whose SO_REUSEPORT it turned off), init keeps the old socket and the
    harness's locked filter / rcvlowat outlive it. Then two more restarts: init's
    descriptors and the number of listeners on 3128 stay the same, and a turn's runtime
    after an exec'd harness holds no listener and can't join the reuseport group."""
    name = SABOTAGE
    write = h.exec(name, "sh", "-c", f"cat > {RUNTIME_PATH} && chmod 755 {RUNTIME_PATH}", input=RUNTIME_SCRIPT)
    assert write.returncode == 0, write.stderr
    assert _answers(h, name, 1) == [FORBIDDEN]  # the control
    init = _init_pid(h, name)
    fds0, listen0 = _fds(init), _listening_3128(init)
    old = h.harness_pid(name)
    listener = grab_bridge_listener(old)
    old_inode = os.fstat(listener.fileno()).st_ino
    done = _sabotage_socket(listener)
    listener.close()  # our copy only
    harness = _restart(h, name, old)
    time.sleep(0.3)
    after = _answers(h, name, 4)
    listen1 = _listening_3128(init)
    fds = [len(_fds(init))]
    for _ in range(2):  # the restart storm (init's backoff doubles: 1 s, 2 s)
        harness = _restart(h, name, harness)
        time.sleep(0.3)
        fds.append(len(_fds(init)))
    listen3 = _listening_3128(init)
    storm = _answers(h, name, 4)
    turn = assert_ok(h.host_call("send", to=name, body="probe"))["id"]
    wait_until(lambda: any(e["kind"] == "exit" and e["turn"] == turn
                           for e in assert_ok(h.host_call("transcript", name=name))["entries"]),
               20, "the probe's turn to end", interval=0.1)
    ran = json.loads(h.exec(name, "cat", OUT_PATH).stdout)
    print(f"sabotage {done}; old inode {old_inode}, listening {listen0} -> {listen1} -> {listen3};"
          f" answers after {after}, after the storm {storm}; init fds {len(fds0)} -> {fds}; runtime {ran}")
    assert after == [FORBIDDEN] * 4, after
    assert storm == [FORBIDDEN] * 4, storm
    assert old_inode not in listen1 and len(listen1) == 1 and len(listen3) == 1, (old_inode, listen1, listen3)
    assert fds == [len(fds0)] * 3, (len(fds0), fds)
    assert ran["uid"] == h.cage(name)["uid"] and ran["listeners"] == [], ran
    assert "HIVE_BRIDGE_FD" not in ran["env"], ran
    assert set(ran["binds"].values()) == {"EADDRINUSE"}, ran["binds"]


# -- a compromised harness's child, holding the listener past its death ---------------------

SQUATTER = r"""
import os, socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
os.set_blocking(s.fileno(), True)
print("squatting", os.getuid(), os.getpid(), flush=True)
while True:
    c, _ = s.accept()
    try:
        c.recv(4096)
        c.sendall(b"HTTP/1.1 200 squatter\r\n\r\n")
    except OSError:
        pass
    c.close()
"""


@pytest.mark.attack("harness.fork-inheritance", ref=REF + ": a harness-uid process holding the bridge's listener, swept by kill_uid(harness_uid)")
def test_a_harness_childs_copy_of_the_listener_dies_with_the_harness(h: HiveProcess) -> None:
    """A compromised harness leaves a child (its uid, the cage's namespaces) holding its
    copy of init's listener and answering the runtime's proxy connections itself. While
    the harness lives that is the harness's own doing; once it dies, init's sweep of the
    harness uid must kill the child before the next harness serves, and no connection
    after must reach it."""
    name = SQUAT
    cage = h.cage(name)
    old = h.harness_pid(name)
    listener = grab_bridge_listener(old)
    fd = listener.fileno()
    os.set_inheritable(fd, True)
    child = subprocess.Popen(
        ["nsenter", "-t", str(old), "-m", "-u", "-i", "-n", "-p", "-r", "-w",
         "setpriv", f"--reuid={cage['harness_uid']}", f"--regid={cage['gid']}", "--clear-groups",
         "/usr/bin/python3", "-c", SQUATTER, str(fd)],
        pass_fds=(fd,), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listener.close()
    try:
        line = child.stdout.readline()
        assert line.startswith("squatting"), (line, child.stderr.read() if child.poll() is not None else "")
        before = _answers(h, name, 12)  # the control: the squatter takes a share
        _restart(h, name, old)
        time.sleep(0.3)
        after = _answers(h, name, 12)
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        print(f"{line.strip()}; before the restart {sorted(set(before))}; after {sorted(set(after))};"
              f" squatter exit {child.returncode}")
        assert any("squatter" in a for a in before), before  # the simulation caught connections
        assert after == [FORBIDDEN] * 12, after
        assert child.returncode is not None, "the harness uid's child outlived the harness"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


HAND_LISTENER = r"""
import os, socket, struct, sys, time
fd = int(sys.argv[1])
sent = []
for _ in range(int(sys.argv[3])):
    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        u.connect(sys.argv[2])
        u.sendmsg([bytes.fromhex(sys.argv[4])], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
        sent.append("ok")
    except OSError as e:
        sent.append(str(e))
    u.close()
print("handed", sorted(set(sent)), flush=True)
os.close(fd)
time.sleep(3600)
"""


@pytest.mark.attack("harness.fork-inheritance", ref=REF + ": the listener itself handed to the egress proxy (outside the cage) as a client connection")
def test_the_listener_handed_to_the_proxy_does_not_outlive_the_harness(h: HiveProcess) -> None:
    """The egress proxy (hive-core, on the host) is out of init's sweep. A compromised
    harness hands it init's listener in place of an accepted connection, many times: if
    the proxy keeps a copy, the old listener stays in the reuseport group beside the
    next harness's and takes a share of the proxy URL's connections, never accepted.

    Broke at 2de8db3: hive-core took 16 copies (of 40 handed), still held them after the
    restart, the old listener listening beside the new; of 12 connections one was reset
    (the core let the copies go within ~2 s)."""
    name = HANDER
    cage = h.cage(name)
    old = h.harness_pid(name)
    listener = grab_bridge_listener(old)
    old_inode = os.fstat(listener.fileno()).st_ino
    fd = listener.fileno()
    os.set_inheritable(fd, True)
    child = subprocess.Popen(
        ["nsenter", "-t", str(old), "-m", "-u", "-i", "-n", "-p", "-r", "-w",
         "setpriv", f"--reuid={cage['harness_uid']}", f"--regid={cage['gid']}", "--clear-groups",
         "/usr/bin/python3", "-c", HAND_LISTENER, str(fd), layout.EGRESS_HANDOVER_SOCKET, "40",
         layout.HANDOVER.hex()],
        pass_fds=(fd,), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listener.close()
    try:
        line = child.stdout.readline()
        assert line.startswith("handed"), (line, child.stderr.read() if child.poll() is not None else "")
        time.sleep(0.2)
        init = _init_pid(h, name)
        held_by_core = sum(1 for t in _fds(h.core_pid()).values() if t == f"socket:[{old_inode}]")
        _restart(h, name, old)
        time.sleep(0.3)
        listening = _listening_3128(init)
        held_after = sum(1 for t in _fds(h.core_pid()).values() if t == f"socket:[{old_inode}]")
        t0 = time.monotonic()
        after = _answers(h, name, 12)
        took = round(time.monotonic() - t0, 2)
        print(f"{line.strip()}; core held {held_by_core} copies, after the restart {held_after};"
              f" listening {listening} (old {old_inode}); answers {sorted(set(after))} in {took} s")
        assert after == [FORBIDDEN] * 12, after
        assert held_after == 0 and old_inode not in listening, (held_after, listening)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# -- the transcript's counts ------------------------------------------------------------------


@pytest.mark.attack("budget.store", ref=REF + ": transcript_usage against a recount after real cages' turns")
def test_transcript_usage_matches_a_recount_in_the_running_hive(h: HiveProcess) -> None:
    """After this module's turns (redelivered across killed harnesses), every agent's
    ``transcript_usage`` row equals its transcript's rows, and no row is unsized."""
    db = sqlite3.connect(f"file:{h.state_dir / 'hive.db'}?mode=ro", uri=True)
    try:
        usage = {a: (e, b) for a, e, b in db.execute("SELECT agent, entries, bytes FROM transcript_usage")}
        counted = {a: (e, b) for a, e, b in db.execute(
            "SELECT agent, count(*), sum(length(CAST(kind AS BLOB)) + length(CAST(data AS BLOB)))"
            " FROM transcript GROUP BY agent")}
        sized = db.execute("SELECT count(*) FROM transcript WHERE size < 0 OR size !="
                           " length(CAST(kind AS BLOB)) + length(CAST(data AS BLOB))").fetchone()[0]
    finally:
        db.close()
    print(f"usage {usage}; counted {counted}; mis-sized rows {sized}")
    assert counted, "no transcript at all"
    assert {a: u for a, u in usage.items() if u != (0, 0)} == counted
    assert sized == 0


SPEC = AgentSpec.model_validate({"runtime": "command", "command": ["true"]})


@pytest.mark.attack("budget.store", ref=REF + ": migration 14 on odd old rows (blob data, empty data, blob kind, an orphan agent, none at all)")
def test_migration_14_on_odd_old_rows_counts_and_trims_exactly(tmp_path: Path) -> None:
    """An old database's transcript may hold what SQLite's TEXT affinity lets in: blob
    data and kinds (invalid UTF-8), empty data, rows of an agent since gone. Migration 14
    counts them, the trim measures them (size -1) as it cuts: the counts stay exact
    through trims that cut only old rows, old and new, and everything."""
    path = tmp_path / "v13.db"
    store_at_version(path, 13)
    db = sqlite3.connect(path, isolation_level=None)
    rows = [("ann", "stdout", b"\x00\xff\xfe" * 100), ("ann", b"\xff\x00kind", '"x"'), ("ann", "stdout", ""),
            ("ann", "stdout", '"' + "é" * 500 + '"'), ("ghost", "stdout", '"gone"'), ("ann", "stderr", 12345)]
    for agent, kind, data in rows * 3:
        db.execute("INSERT INTO transcript (agent, turn, kind, data, at) VALUES (?, 1, ?, ?, 0)", (agent, kind, data))
    db.close()
    store = Store(path)
    results = []

    def check(label: str) -> None:
        for agent in ("ann", "ghost", "bob"):
            counted = store.db.conn.execute(
                "SELECT count(*), coalesce(sum(length(CAST(kind AS BLOB)) + length(CAST(data AS BLOB))), 0)"
                " FROM transcript WHERE agent=?", (agent,)).fetchone()
            results.append((label, agent, store.transcripts.usage(agent), tuple(counted)))

    try:
        store.agents.sync_config({"ann": SPEC, "bob": SPEC})
        check("migrated")
        turn = store.messages.send("ann", "operator", "message", "go").id
        store.transcripts.keep = 10  # trims old rows only
        store.transcripts.add("ann", turn, [("stdout", "a")])
        check("keep 10")
        store.transcripts.keep = 3  # old and new
        store.transcripts.add("ann", turn, [("stdout", "b"), ("stdout", "c")])
        check("keep 3")
        store.transcripts.max_bytes = 1  # everything
        store.transcripts.add("ann", turn, [("stdout", "d")])
        store.transcripts.finish_turn("ann", turn, {"code": 0})
        check("1 byte")
    finally:
        store.close()
    print("\n".join(map(str, results)))
    bad = [r for r in results if r[2] != r[3]]
    assert not bad, bad

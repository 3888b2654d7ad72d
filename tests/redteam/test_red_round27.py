"""Red team round 27: init's shared egress-bridge listener and the transcript's byte bound.

The hostile party is the agent's runtime (every process of the runtime uid in the cage,
its output, its home, its timing); where said, a compromised harness (the harness uid's
process, which holds the bridge's listener).

The change under test (8b1c805, 80b34ee):
- init binds 127.0.0.1:3128 once for the cage's life (``init.bind_bridge``) and hands the
  listener to each harness (``HIVE_BRIDGE_FD``, ``egress_bridge.handed_listener``);
- each agent's transcript is bounded in stored bytes (``[limits] transcript_mib``) besides
  entries; migration 14 counts the old rows in ``transcript_usage``.

Held: no runtime process (a turn, or ``hive exec``) holds or can take the listener (own
descriptors, /proc, pidfd_getfd), nor bind anything that catches 127.0.0.1:3128 (0.0.0.0,
SO_REUSEADDR, SO_REUSEPORT, dual-stack ::, ::ffff:127.0.0.1); a flood of connections reset
before accept doesn't stop the bridge; one add's trim walk stays milliseconds in the
worst steady-state arrangement.

Broke, fixed in session 24 (each case below failed at 8b1c805):
- (low) a compromised harness can end the shared listener's listening (``shutdown``) or
  make it non-blocking (the open file description is init's too): every later harness
  found it unusable (not listening → its own bind, which init's still-bound socket
  refuses: connections refused; non-blocking → ``accept`` EAGAIN ended the accept loop
  while the kernel still queued connections: every client of the proxy URL hung), and
  the cage had no egress until it restarted. Now init binds a fresh listener beside
  the old for each harness (SO_REUSEPORT, init's uid only) and closes the old, the
  bridge's accept loop rides out errors, and init sweeps the harness uid's leftovers as
  it does the runtime's.
- (low–medium, at the upgrade) migration 14 rewrote every old transcript row (``UPDATE …
  SET size``): the WAL grew by the whole old transcript (round 26: up to ~1.75 GiB per
  agent) before the core served; and the first add of each bloated agent trimmed
  everything past the bound in one transaction on the core's event loop (90 MiB: 0.47 s
  warm; 270 MB: 0.75 s cold). Now the migration deletes what is past the default bounds
  (no page of it copied) and leaves the rest's size -1, measured as it is trimmed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import assert_ok, store_at_version
from hive_fixture import HiveProcess, running_hive, wait_until
from hyperhive.cage import layout
from hyperhive.core.store import Store
from hyperhive.wire.common import AgentSpec

from .conftest import cage_run, grab_bridge_listener, harness_or_none

REF = "red team round 27"
PORT = layout.EGRESS_PORT

PROBE, SHUT, NONBLOCK = "r27probe", "r27shut", "r27nb"
RUNTIME_PATH = f"{layout.HOME}/r27-runtime"
FDS_PATH = f"{layout.HOME}/r27-fds.json"

# What a process of the runtime uid can reach of the bridge's listener: its own
# descriptors, every process's /proc/PID/fd, pidfd_getfd on every pid. Printed as JSON
# (a turn writes it to FDS_PATH).
REACH = r"""
import ctypes, errno, json, os, socket

def errname(e):
    return errno.errorcode.get(e.errno, str(e)) if getattr(e, "errno", None) else type(e).__name__

def listening(fd):
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return repr(s.getsockname())
    except OSError:
        return None
    finally:
        s.close()
    return None

out = {"uid": os.getuid(), "env": sorted(k for k in os.environ if "BRIDGE" in k or k.startswith("HIVE_")),
       "own_listeners": [], "proc_fd": {}, "pidfd_getfd": {}, "stolen": []}
for name in os.listdir("/proc/self/fd"):
    where = listening(int(name))
    if where:
        out["own_listeners"].append([int(name), where])
libc = ctypes.CDLL(None, use_errno=True)
me = os.getpid()
for entry in os.listdir("/proc"):
    if not entry.isdigit() or int(entry) == me:
        continue
    pid = int(entry)
    try:
        os.listdir(f"/proc/{pid}/fd")
        out["proc_fd"][entry] = os.stat(f"/proc/{pid}").st_uid  # listed: whose process
    except OSError as e:
        out["proc_fd"][entry] = errname(e)
    pidfd = libc.syscall(434, pid, 0)  # pidfd_open
    if pidfd < 0:
        out["pidfd_getfd"][entry] = "open " + errno.errorcode.get(ctypes.get_errno(), "?")
        continue
    errs = set()
    for fd in range(0, 64):
        got = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
        if got < 0:
            errs.add(errno.errorcode.get(ctypes.get_errno(), "?"))
            continue
        where = listening(got)
        if where:
            out["stolen"].append([pid, fd, where])
        os.close(got)
    os.close(pidfd)
    out["pidfd_getfd"][entry] = sorted(errs)
"""
RUNTIME_SCRIPT = ("#!/usr/bin/python3\nimport sys\nsys.stdin.read()\n" + REACH
                  + f"\nwith open({FDS_PATH!r}, 'w') as f:\n    json.dump(out, f)\nprint('r27 probed', flush=True)\n")

# The hive's proxy behind the bridge answers a CONNECT to a name no rule allows with 403.
BRIDGE_ANSWER = r"""
def answer(timeout=10):
    s = socket.create_connection(("127.0.0.1", P["port"]), timeout=timeout)
    try:
        s.sendall(b"CONNECT r27.invalid:443 HTTP/1.1\r\nHost: r27.invalid:443\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
        return head.split(b"\r\n")[0].decode(errors="replace")
    finally:
        s.close()
"""
FORBIDDEN = "HTTP/1.1 403 Forbidden"


@pytest.fixture(scope="module")
def h() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess({
        PROBE: {"runtime": "command", "command": [RUNTIME_PATH], "peers": []},
        SHUT: {"runtime": "command", "command": ["true"], "peers": []},
        NONBLOCK: {"runtime": "command", "command": ["true"], "peers": []},
    }))


def _turn_ended(h: HiveProcess, name: str, turn: int) -> bool:
    return any(e["kind"] == "exit" and e["turn"] == turn
               for e in assert_ok(h.host_call("transcript", name=name))["entries"])


# -- the bridge's listener: out of the runtime's reach ---------------------------------------


@pytest.mark.attack("init.runtime-inheritance", ref=REF + "; init's bridge listener: own fds, /proc/PID/fd, pidfd_getfd")
def test_no_runtime_process_holds_or_can_take_the_bridges_listener(h: HiveProcess) -> None:
    """A turn's runtime process (spawned by init's fork_exec) and a ``hive exec`` process
    of the runtime uid hold no listening socket, can't list another uid's /proc/PID/fd
    (init's, the harness's) and can't pidfd_getfd anything listening from any pid."""
    write = h.exec(PROBE, "sh", "-c", f"cat > {RUNTIME_PATH} && chmod 755 {RUNTIME_PATH}", input=RUNTIME_SCRIPT)
    assert write.returncode == 0, write.stderr
    turn = assert_ok(h.host_call("send", to=PROBE, body="probe"))["id"]
    wait_until(lambda: _turn_ended(h, PROBE, turn), 30, "the probe's turn to end", interval=0.1)
    in_turn = json.loads(h.exec(PROBE, "cat", FDS_PATH).stdout)
    by_exec = cage_run(h, PROBE, REACH + "\nresult(**out)\n")
    cage = h.cage(PROBE)
    for where, got in (("turn", in_turn), ("exec", by_exec)):
        print(f"{where}: uid {got['uid']} env {got['env']} own listeners {got['own_listeners']} "
              f"stolen {got['stolen']}\n  /proc/PID/fd {got['proc_fd']}\n  pidfd_getfd {got['pidfd_getfd']}")
        assert got["uid"] == cage["uid"], got["uid"]
        assert got["own_listeners"] == [], got["own_listeners"]
        assert got["stolen"] == [], got["stolen"]
        assert layout.BRIDGE_FD_ENV not in got["env"], got["env"]
        # the processes whose descriptors it may list are its own uid's only
        listed = {pid: uid for pid, uid in got["proc_fd"].items() if isinstance(uid, int)}
        assert set(listed.values()) <= {cage["uid"]}, listed
        assert len(got["proc_fd"]) > len(listed), got["proc_fd"]  # init and the harness are there, unlisted


# Binds a runtime process might try, to catch 127.0.0.1:3128's traffic.
BINDS = r"""
import errno
attempts = [
    ("127.0.0.1", socket.AF_INET, []), ("127.0.0.1", socket.AF_INET, ["reuseaddr"]),
    ("127.0.0.1", socket.AF_INET, ["reuseport"]), ("127.0.0.1", socket.AF_INET, ["reuseaddr", "reuseport"]),
    ("0.0.0.0", socket.AF_INET, []), ("0.0.0.0", socket.AF_INET, ["reuseaddr", "reuseport"]),
    ("::", socket.AF_INET6, ["dualstack"]), ("::", socket.AF_INET6, ["dualstack", "reuseaddr", "reuseport"]),
    ("::ffff:127.0.0.1", socket.AF_INET6, ["dualstack"]),
    ("::1", socket.AF_INET6, []), ("127.0.0.2", socket.AF_INET, []),
]
outcome, held = {}, []
for addr, family, opts in attempts:
    s = socket.socket(family, socket.SOCK_STREAM)
    if "reuseaddr" in opts:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if "reuseport" in opts:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if "dualstack" in opts:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    key = addr + " " + "+".join(opts)
    try:
        s.bind((addr, P["port"]))
        s.listen(16)
        s.setblocking(False)
        held.append((key, s))
        outcome[key] = "bound"
    except OSError as e:
        outcome[key] = errno.errorcode.get(e.errno, str(e))
        s.close()
answers = [answer() for _ in range(10)]
caught = []
for key, s in held:
    try:
        s.accept()
        caught.append(key)
    except BlockingIOError:
        pass
localhost = sorted({ai[4][0] for ai in socket.getaddrinfo("localhost", P["port"], type=socket.SOCK_STREAM)})
result(outcome=outcome, answers=sorted(set(answers)), caught=caught, localhost=localhost)
"""
# Binds that would take 127.0.0.1:3128's connections (or share them) if they succeeded.
CATCHING = ("127.0.0.1", "0.0.0.0", ":: ", "::ffff:")


@pytest.mark.attack("reach.other-surfaces", ref=REF + "; binding 3128 on 0.0.0.0, ::, ::ffff:127.0.0.1, SO_REUSEPORT beside init's listener")
def test_the_runtime_binds_nothing_that_catches_the_proxy_urls_connections(h: HiveProcess) -> None:
    """While init's listener holds 127.0.0.1:3128 (no SO_REUSEADDR, no SO_REUSEPORT),
    every bind that would take or share its connections fails EADDRINUSE; what may bind
    (::1, 127.0.0.2) catches none of the proxy URL's connections, which get the hive's 403."""
    got = cage_run(h, PROBE, BRIDGE_ANSWER + BINDS, port=PORT)
    print(json.dumps(got, indent=1))
    for key, what in got["outcome"].items():
        if key.startswith(CATCHING):
            assert what == "EADDRINUSE", (key, what)
    assert got["answers"] == [FORBIDDEN], got["answers"]
    assert got["caught"] == [], got["caught"]


RESET_FLOOD = r"""
import struct, time
linger = struct.pack("ii", 1, 0)
t0 = time.monotonic()
made = 0
for i in range(P["n"]):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    try:
        s.connect(("127.0.0.1", P["port"]))
        made += 1
    except OSError:
        pass
    s.close()  # an RST: the connection is reset in the accept queue, or as it is handed over
flood = round(time.monotonic() - t0, 2)
time.sleep(0.5)
after = [answer() for _ in range(3)]
result(made=made, flood_s=flood, after=after)
"""


@pytest.mark.attack("budget.exhaustion", ref=REF + "; connections reset before accept: the shared listener's accept loop must not end")
def test_a_reset_flood_does_not_stop_the_bridge(h: HiveProcess) -> None:
    """The accept loop ends on any OSError from accept; the listener now outlives each
    harness. Connections reset in the accept queue (SO_LINGER 0) must not end it."""
    got = cage_run(h, PROBE, BRIDGE_ANSWER + RESET_FLOOD, port=PORT, n=300)
    log = (h.state_dir / "priv" / "cages" / PROBE / "cage.log").read_text(errors="replace")
    print(got, [line for line in log.splitlines() if "bridge" in line][-3:])
    assert got["made"] == 300, got
    assert got["after"] == [FORBIDDEN] * 3, got
    assert "egress bridge stopped" not in log


# -- a compromised harness: what it leaves for the next one ----------------------------------


@pytest.mark.attack("harness.fork-inheritance", ref=REF + "; the listener's socket and open file description are init's too")
@pytest.mark.parametrize("what", ["shutdown", "nonblocking"])
def test_a_dead_compromised_harness_leaves_the_next_one_a_working_bridge(h: HiveProcess, what: str) -> None:
    """A compromised harness holds init's listener: it may ``shutdown`` it (no longer
    listening, still bound) or set O_NONBLOCK (on the open file description init and each
    later harness share). Either is the harness denying its own agent's egress while it
    lives; once it dies (init restarts a harness), the next harness must serve the bridge
    again, as it did when each harness bound its own listener."""
    name = SHUT if what == "shutdown" else NONBLOCK
    before = cage_run(h, name, BRIDGE_ANSWER + "result(status=answer())", port=PORT)
    assert before == {"status": FORBIDDEN}, before  # the control
    old = h.harness_pid(name)
    listener = grab_bridge_listener(old)
    if what == "shutdown":
        listener.shutdown(socket.SHUT_RD)
    else:
        listener.setblocking(False)
    listener.close()  # our copy only
    os.kill(old, signal.SIGKILL)  # the compromised harness dies (or crashes itself)
    wait_until(lambda: (p := harness_or_none(h, name)) and p != old, 30, "init to start a new harness")
    time.sleep(1.0)  # the new harness serves the bridge as it starts
    after = cage_run(h, name, BRIDGE_ANSWER + """
try:
    result(status=answer(timeout=3))
except OSError as e:
    result(status=type(e).__name__ + ": " + str(e))
""", port=PORT)
    log = (h.state_dir / "priv" / "cages" / name / "cage.log").read_text(errors="replace")
    print(f"{what}: before {before}, after {after}; cage.log:",
          [line for line in log.splitlines() if "bridge" in line][-3:])
    assert after == {"status": FORBIDDEN}, after


# -- the transcript's byte bound: what migration 14 and the first trim cost ------------------

SPEC = AgentSpec.model_validate({"runtime": "command", "command": ["true"]})


def _wal_peak(path: Path, body: Any) -> tuple[Any, int]:
    """``body()``'s result and the largest the WAL beside ``path`` grew meanwhile."""
    wal = Path(str(path) + "-wal")
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], wal.stat().st_size)
            except FileNotFoundError:
                pass
            stop.wait(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        out = body()
    finally:
        stop.set()
        t.join()
    return out, peak[0]


@pytest.mark.attack("budget.store", ref=REF + "; migration 14 sizes old rows by rewriting them; the first add trims it all at once")
def test_upgrading_a_bloated_transcript_costs_no_more_than_the_bound(tmp_path: Path) -> None:
    """An older hive's transcript could hold ~1.75 GiB per agent (round 26): what the
    upgrade costs must not scale with it. At 8b1c805 migration 14's ``UPDATE transcript
    SET size`` rewrote every old row (the WAL grew by the whole old transcript before the
    core served: a state disk without that much room couldn't start the hive), and the
    bloat was left for the agent's first add to trim, in one transaction on the core's
    event loop. Here 96 MB of one agent's old transcript: the migration's WAL stays far
    below it, what is kept is within the default bound (32 MiB), counted exactly; with
    the bound at its least (8 MiB), the first add trims the rest and the counts stay
    exact."""
    path = tmp_path / "v13.db"
    store_at_version(path, 13)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    row = '"' + "\\u0001" * 16000 + '"'  # ~96 KB: one line of 16,000 \x01 as round 26's harness stored it
    db.execute("BEGIN")
    for _ in range(1000):
        db.execute("INSERT INTO transcript (agent, turn, kind, data, at) VALUES ('ann', 1, 'stdout', ?, 0)", (row,))
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    old_bytes = 1000 * (len("stdout") + len(row))

    t0 = time.monotonic()
    store, wal = _wal_peak(path, lambda: Store(path))
    migrated_s = time.monotonic() - t0
    try:
        store.agents.sync_config({"ann": SPEC})
        kept = store.transcripts.usage("ann")
        counted = store.db.conn.execute(
            "SELECT count(*), sum(length(CAST(kind AS BLOB)) + length(CAST(data AS BLOB)))"
            " FROM transcript WHERE agent='ann'").fetchone()
        store.transcripts.max_bytes = 8 << 20
        turn = store.messages.send("ann", "operator", "message", "go").id
        t0 = time.monotonic()
        store.transcripts.add("ann", turn, [("stdout", "x")])
        add_s = time.monotonic() - t0
        after = store.transcripts.usage("ann")
        counted_after = store.db.conn.execute(
            "SELECT count(*), sum(length(CAST(kind AS BLOB)) + length(CAST(data AS BLOB)))"
            " FROM transcript WHERE agent='ann'").fetchone()
    finally:
        store.close()
    print(f"old transcript {old_bytes >> 20} MiB: migration {migrated_s:.2f} s, WAL peak {wal >> 20} MiB;"
          f" kept {kept}; one add at 8 MiB: {after} in {add_s:.3f} s")
    assert wal < 16 << 20, f"migration 14 wrote {wal >> 20} MiB of WAL for {old_bytes >> 20} MiB of old transcript"
    assert kept == tuple(counted) and (32 << 20) - 100_000 < kept[1] <= 32 << 20, (kept, counted)
    assert after == tuple(counted_after) and after[1] <= 8 << 20, (after, counted_after)
    assert add_s < 1.0, add_s  # ~24 MiB of old rows measured and deleted, once


@pytest.mark.attack("budget.exhaustion", ref=REF + "; the trim walk's worst steady-state arrangement (tiny entries oldest)")
def test_one_add_trims_in_milliseconds_whatever_the_transcript_holds(tmp_path: Path) -> None:
    """A compromised harness arranges the transcript so one add must walk and delete the
    most rows: ~19,800 tiny entries oldest, then large ones up to the byte bound; then a
    full request's worth of bytes. That add (the core's event loop waits on it) and the
    next stay far below a second."""
    store = Store(tmp_path / "hive.db")
    try:
        store.agents.sync_config({"ann": SPEC})
        turn = store.messages.send("ann", "operator", "message", "go").id
        for _ in range(99):
            store.transcripts.add("ann", turn, [("stdout", "t")] * 200)
        store.transcripts.add("ann", turn, [("stdout", "\x01" * 27000)] * 200)  # ~32 MiB stored
        took = []
        for _ in range(3):
            t0 = time.monotonic()
            store.transcripts.add("ann", turn, [("stdout", "\x01" * 1000)] * 170)  # ~1 MiB
            took.append(round(time.monotonic() - t0, 3))
        usage = store.transcripts.usage("ann")
        counted = store.db.conn.execute(
            "SELECT count(*), sum(length(CAST(kind AS BLOB)) + length(CAST(data AS BLOB)))"
            " FROM transcript WHERE agent='ann'").fetchone()
    finally:
        store.close()
    print(f"adds took {took} s; usage {usage}, counted {counted}")
    assert max(took) < 0.25, took
    assert usage == tuple(counted) and usage[1] <= 32 << 20, (usage, counted)

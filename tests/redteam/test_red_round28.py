"""Red team round 28: session 25's change, cage.log through init (from real cages).

The hostile party is the agent's runtime (every process of the runtime uid in the cage)
and, where said, a compromised harness (the harness uid's process; simulated from the
host: its descriptors taken with ``pidfd_getfd``, the harness SIGSTOPped where it must
not read, or a process of the harness uid entered into the cage's namespaces, as the
harness's own child would be).

The change under test: the harness's stdout and stderr are a pipe init relays to
cage.log (``Init.relay_log``, ``HARNESS_LOG_MAX`` = 1 MiB a cage start, then a notice and
/dev/null for later harnesses), drained at the harness's death (at most 64 reads); init's
own lines go through ``say`` (never raises); hive-priv moves a cage.log past 1 MiB aside
at each start (``safefs.rotate``) and reads a failed start's last line from its tail.

Broke (each case FAILS against the current code):
- (medium, a compromised harness) init's *other* writer to cage.log is CPython itself:
  ``set_wakeup_fd`` is called with ``warn_on_full_buffer`` left True, so once init's
  64 KiB wake-up pipe is full every SIGCHLD makes the interpreter write "Exception
  ignored when trying to write to the signal wakeup fd" and a traceback (~280 bytes) to
  init's stderr, cage.log. A harness that stops reading its init channel and sends
  ~190 requests holds init in ``send`` (a blocking socket: ``sock_alloc_send_pskb``);
  any child of init that stops and continues (a runtime process the harness had init
  spawn, and its own child sending SIGSTOP/SIGCONT) then fills the pipe and writes
  ~1.4 MB/s into cage.log on the host's disk, with no bound
  (``test_a_harness_holding_init_in_send_makes_init_write_cage_log_without_bound``:
  4.9 MB in 3.5 s, 17,274 tracebacks, when let run).
- (medium, same cause) a harness-uid child holding a copy of the harness's channel end,
  never reading, holds init in that ``send`` past the harness's death: init never sees
  the death, never sweeps either uid, never restarts the harness; the flood above goes on
  with no harness at all (``test_a_channel_copy_left_behind_holds_init_past_the_harness``).
- (low, not of this change: the loop is older) a harness that shuts down its end of the
  channel and lives on makes init spin at 100 % of a CPU: the channel polls POLLHUP,
  ``recv_request`` returns None, ``continue`` (``test_a_hung_up_channel_does_not_make_init_spin``).

Held: no runtime process (a turn's, or ``hive exec --as-agent``) holds the harness's log
pipe or can take it (``/proc/PID/fd`` EACCES, ``pidfd_getfd`` EPERM on init and the
harness); a harness-uid child holding the pipe's write end and writing flat out is swept
at the harness's death, the new harness is up in ~0.6 s, cage.log grew by at most the
budget, the notice and init's line; the next (exec'd) harness has /dev/null for stdout
and stderr and serves a turn. hive-priv's cages directory is root's 0700: nothing in a
cage can plant a link or a FIFO for ``rotate``/``read_tail``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import assert_ok
from hive_fixture import HiveProcess, proc_uid, running_hive, wait_until
from hyperhive.cage import layout
from hyperhive.cage.init import HARNESS_LOG_MAX

from .conftest import (
    cage_run,
    cpu_ticks,
    harness_end,
    harness_or_none,
    init_pid,
    pidfd_getfd,
    wchan,
)

REF = "red team round 28 (session 25: cage.log through init)"
WAKE, WEDGE, SPIN, REACH, LEFT = "r28wake", "r28wedge", "r28spin", "r28reach", "r28left"
RUNTIME_PATH = f"{layout.HOME}/r28-runtime"
OUT_PATH = f"{layout.HOME}/r28-out.json"
NOTICE = b"the harness's output reached"
WAKEUP_NOISE = b"Exception ignored when trying to write to the signal wakeup fd"


@pytest.fixture(scope="module")
def h() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess({
        WAKE: {"runtime": "command", "command": ["true"], "peers": []},
        WEDGE: {"runtime": "command", "command": ["true"], "peers": []},
        SPIN: {"runtime": "command", "command": ["true"], "peers": []},
        REACH: {"runtime": "command", "command": [RUNTIME_PATH], "peers": []},
        LEFT: {"runtime": "command", "command": ["true"], "peers": []},
    }))


# -- helpers: acting as a compromised harness from the host -------------------------------


def cage_log(h: HiveProcess, name: str) -> Path:
    return h.state_dir / "priv" / "cages" / name / "cage.log"







def as_harness_uid(h: HiveProcess, name: str, harness: int, code: str, *args: str, fd: int) -> subprocess.Popen[str]:
    """A process of the harness uid in the cage's namespaces holding ``fd``: what a
    compromised harness's own child would be."""
    cage = h.cage(name)
    os.set_inheritable(fd, True)
    return subprocess.Popen(
        ["nsenter", "-t", str(harness), "-m", "-u", "-i", "-n", "-p", "-r", "-w",
         "setpriv", f"--reuid={cage['harness_uid']}", f"--regid={cage['gid']}", "--clear-groups",
         "/usr/bin/python3", "-c", code, str(fd), *args],
        pass_fds=(fd,), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def tree_of(pid: int) -> list[int]:
    """``pid`` and its descendants (nsenter -p forks: the holder is its child)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return out


def kill_tree(proc: subprocess.Popen[str]) -> None:
    for p in reversed(tree_of(proc.pid)):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def hold_init_in_send(chan: socket.socket, ipid: int) -> tuple[int, list[str]]:
    """As a harness that no longer reads its channel: requests until init's replies fill
    its send buffer (init blocked in send() before session 25's fix; now it kills the
    harness, and the channel is reset); the requests sent, and where init waited."""
    sent, t0, seen = 0, time.monotonic(), []
    while time.monotonic() - t0 < 1.0 and "sock_alloc_send" not in wchan(ipid):
        try:
            chan.send(json.dumps({"op": "r28" + "x" * 1000, "seq": 1000 + sent}).encode(), socket.MSG_DONTWAIT)
            sent += 1
        except BlockingIOError:
            time.sleep(0.01)
        except OSError:  # ECONNRESET, EPIPE: init killed the harness and closed its end
            break
        seen.append(wchan(ipid))
    time.sleep(0.1)
    return sent, seen


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def spawn_through(chan: socket.socket, argv: list[str]) -> None:
    """A spawn request on the harness's channel (stdin, stdout, stderr: /dev/null)."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        req = json.dumps({"op": "spawn", "argv": argv, "env": {}, "seq": 1}).encode()
        chan.sendmsg([req], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview((ctypes.c_int * 3)(null, null, null))))])
    finally:
        os.close(null)


# A runtime process (init's child) whose own child stops and continues it, each change of
# state a SIGCHLD to init: after a delay, for a while.
FLIPPER = r"""
import os, signal, sys, time
time.sleep(float(sys.argv[1]))
me = os.getpid()
pid = os.fork()
if pid == 0:
    fd = os.open(f"/proc/{me}/stat", os.O_RDONLY)
    def state():
        return os.pread(fd, 200, 0).rsplit(b")", 1)[1].split()[0]
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        os.kill(me, signal.SIGSTOP)
        while state() != b"T":
            pass
        os.kill(me, signal.SIGCONT)
        while state() == b"T":
            pass
    os._exit(0)
while True:
    try:
        os.waitpid(pid, 0)
        break
    except ChildProcessError:
        break
    except InterruptedError:
        pass
"""


def wait_new_harness(h: HiveProcess, name: str, old: int, timeout: float = 30) -> int:
    return wait_until(lambda: (p := harness_or_none(h, name)) and p != old and p, timeout,
                      f"a new harness in {name}")


# -- broke: init's interpreter writes cage.log without bound -----------------------------


@pytest.mark.attack("budget.exhaustion", ref=REF + ": init held in send(), SIGCHLDs past its full wake-up pipe")
def test_a_harness_holding_init_in_send_makes_init_write_cage_log_without_bound(h: HiveProcess) -> None:
    """A compromised harness has init spawn a process that (through its own child) stops
    and continues over and over, stops reading its channel and sends requests until
    init's replies fill the socket's send buffer: init blocks in ``send`` and stops
    reading its wake-up pipe. The SIGCHLDs fill it, and from then on each one makes
    CPython print "Exception ignored when trying to write to the signal wakeup fd" and a
    traceback to init's stderr: cage.log. The harness writes nothing to its own stderr;
    cage.log may grow by a few of init's lines.

    FAILED at 2727d0f: 1 MiB in ~3 s (the wake-up pipe's 65,536 SIGCHLDs first; then
    ~280 bytes a SIGCHLD, ~1.4 MB/s: 4.9 MB, 17,274 tracebacks in 3.5 s when let run),
    stopped here at 1 MiB by killing the harness. Fixed: init's sends never wait (a
    harness whose channel is full is killed and restarted), the wake-up pair's overflow
    warns nothing, and init's own lines have a budget."""
    name = WAKE
    log = cage_log(h, name)
    harness = h.harness_pid(name)
    ipid = init_pid(h, name)
    chan = harness_end(h, name)
    os.kill(harness, signal.SIGSTOP)  # the compromised harness reads nothing more
    before = log.stat().st_size
    grew, took, sent, where = 0, 0.0, 0, "?"
    try:
        spawn_through(chan, ["/usr/bin/python3", "-c", FLIPPER, "1.2", "10"])
        sent, seen = hold_init_in_send(chan, ipid)
        where = wchan(ipid)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4 and log.stat().st_size - before < 1 << 20:
            time.sleep(0.1)
        took = time.monotonic() - t0
        grew = log.stat().st_size - before
    finally:
        chan.close()
        kill_quietly(harness)
    wait_new_harness(h, name, harness)
    tail = log.read_bytes()[before:before + grew]
    assert not any("sock_alloc_send" in w for w in seen), seen
    print(f"requests sent {sent}; init waits in {where}; cage.log grew {grew} bytes in {took:.1f} s,"
          f" {tail.count(WAKEUP_NOISE)} wake-up tracebacks")
    assert grew <= 64 * 1024, (grew, tail[:300])


@pytest.mark.attack("harness.fork-inheritance", ref=REF + ": a harness-uid child keeps the channel, init held in send()")
def test_a_channel_copy_left_behind_holds_init_past_the_harness(h: HiveProcess) -> None:
    """As above, init held in ``send``; then the compromised harness leaves a child of its
    uid holding its channel end (never reading) and dies. Init must see the death, sweep
    the harness uid (the child too) and start a new harness, as after any death.

    FAILED at 2727d0f: no new harness in 5 s, init still in sock_alloc_send_pskb, the child
    alive (it would be for good; killed here from the host). Fixed: init kills a harness
    whose channel is full (its sends never wait), then sweeps the harness uid."""
    name = WEDGE
    harness = h.harness_pid(name)
    ipid = init_pid(h, name)
    chan = harness_end(h, name)
    holder = None
    try:
        holder = as_harness_uid(h, name, harness, "import sys, time; print('holding', flush=True); time.sleep(60)",
                                fd=chan.fileno())
        assert (holder.stdout.readline() if holder.stdout else "").startswith("holding")
        held_by = [p for p in tree_of(holder.pid) if proc_uid(p) == h.cage(name)["harness_uid"]]
        os.kill(harness, signal.SIGSTOP)
        sent, _ = hold_init_in_send(chan, ipid)
        chan.close()
        kill_quietly(harness)
        t0 = time.monotonic()
        new = None
        while time.monotonic() - t0 < 5 and new is None:
            p = harness_or_none(h, name)
            new = p if p != harness else None
            time.sleep(0.1)
        where = wchan(ipid)
        holder_alive = any(os.path.exists(f"/proc/{p}") for p in held_by)
        print(f"requests sent {sent}; 5 s after the harness's death: new harness {new}, init waits in {where},"
              f" the holder (harness uid, {held_by}) alive: {holder_alive}")
    finally:
        if holder is not None:
            kill_tree(holder)  # what init's sweep should have done
        chan.close()
    wait_new_harness(h, name, harness, 10)
    assert new is not None, f"init never restarted the harness (waits in {where})"
    assert not holder_alive


# -- broke (older): a hung-up channel makes init spin ---------------------------------


@pytest.mark.attack("init.idle-sleep", ref=REF + ": the harness shuts down its channel and lives on")
def test_a_hung_up_channel_does_not_make_init_spin(h: HiveProcess) -> None:
    """A compromised harness shuts down its end of init's channel (``shutdown``; it need
    not close it) and lives on. Init's poll reports the hang-up at once each time,
    ``recv_request`` reads nothing and the loop goes on: init must not spin.

    FAILED at 2727d0f (and before session 25): 100 of 100 ticks of a second (one CPU) in
    init until the harness dies. Fixed: a hung-up channel is no longer polled, and its
    harness is killed (and restarted)."""
    name = SPIN
    harness = h.harness_pid(name)
    ipid = init_pid(h, name)
    chan = harness_end(h, name)
    try:
        t0 = cpu_ticks(ipid)
        time.sleep(0.5)
        idle = cpu_ticks(ipid) - t0
        chan.shutdown(socket.SHUT_RDWR)
        t0 = cpu_ticks(ipid)
        time.sleep(1.0)
        spun = cpu_ticks(ipid) - t0
    finally:
        chan.close()
        kill_quietly(harness)
    wait_new_harness(h, name, harness)
    hz = os.sysconf("SC_CLK_TCK")
    print(f"init's CPU: idle {idle}/{hz // 2} ticks, after the hang-up {spun}/{hz} ticks")
    assert spun <= hz // 10, spun


# -- held: the runtime can't reach the pipe ------------------------------------------------

# What a runtime-uid process can reach of pipes: its own descriptors, every
# /proc/PID/fd (listed, and fds 1 and 2 opened for writing), pidfd_getfd on every pid.
REACH_SCRIPT = r"""
import ctypes, errno, json, os

def errname(e):
    return errno.errorcode.get(e.errno, str(e)) if getattr(e, "errno", None) else type(e).__name__

out = {"uid": os.getuid(), "own": {}, "proc_fd": {}, "open_fd": {}, "pidfd_getfd": {}, "got": []}
for name in os.listdir("/proc/self/fd"):
    try:
        out["own"][name] = os.readlink(f"/proc/self/fd/{name}")
    except OSError:
        pass
libc = ctypes.CDLL(None, use_errno=True)
me = os.getpid()
for entry in os.listdir("/proc"):
    if not entry.isdigit() or int(entry) == me:
        continue
    pid = int(entry)
    try:
        os.listdir(f"/proc/{pid}/fd")
        out["proc_fd"][entry] = os.stat(f"/proc/{pid}").st_uid
    except OSError as e:
        out["proc_fd"][entry] = errname(e)
    for k in (1, 2):
        try:
            fd = os.open(f"/proc/{pid}/fd/{k}", os.O_WRONLY | os.O_NONBLOCK)
            out["got"].append([pid, k, os.readlink(f"/proc/self/fd/{fd}")])
            os.close(fd)
        except OSError as e:
            out["open_fd"].setdefault(errname(e), []).append(pid)
    pidfd = libc.syscall(434, pid, 0)
    if pidfd < 0:
        out["pidfd_getfd"][entry] = "open " + errno.errorcode.get(ctypes.get_errno(), "?")
        continue
    errs = set()
    for fd in range(64):
        got = libc.syscall(438, pidfd, fd, 0)
        if got < 0:
            errs.add(errno.errorcode.get(ctypes.get_errno(), "?"))
            continue
        out["got"].append([pid, fd, os.readlink(f"/proc/self/fd/{got}")])
        os.close(got)
    os.close(pidfd)
    out["pidfd_getfd"][entry] = sorted(errs)
"""
RUNTIME_SCRIPT = ("#!/usr/bin/python3\nimport sys\nsys.stdin.read()\n" + REACH_SCRIPT
                  + f"\nwith open({OUT_PATH!r}, 'w') as f:\n    json.dump(out, f)\n")


def turn_ended(h: HiveProcess, name: str, turn: int) -> bool:
    return any(e["kind"] == "exit" and e["turn"] == turn
               for e in assert_ok(h.host_call("transcript", name=name))["entries"])


@pytest.mark.attack("init.runtime-inheritance", ref=REF + ": the harness's log pipe from a turn and hive exec")
def test_no_runtime_process_holds_or_can_take_the_harness_log_pipe(h: HiveProcess) -> None:
    """A turn's process and a ``hive exec --as-agent`` process (both the runtime uid)
    hold nothing of the harness's log pipe, can't list init's or the harness's
    descriptors, open their fd 1 or 2 for writing, or pidfd_getfd them; only their own
    uid's processes give anything. hive-priv's directory of cage.log is root's 0700."""
    name = REACH
    write = h.exec(name, "sh", "-c", f"cat > {RUNTIME_PATH} && chmod 755 {RUNTIME_PATH}", input=RUNTIME_SCRIPT)
    assert write.returncode == 0, write.stderr
    harness = h.harness_pid(name)
    pipe = os.readlink(f"/proc/{harness}/fd/2")  # a socket since round 28 (F_SETPIPE_SZ)
    assert pipe.startswith("socket:") and os.readlink(f"/proc/{harness}/fd/1") == pipe, pipe
    turn = assert_ok(h.host_call("send", to=name, body="probe"))["id"]
    wait_until(lambda: turn_ended(h, name, turn), 30, "the probe's turn", interval=0.1)
    in_turn = json.loads(h.exec(name, "cat", OUT_PATH).stdout)
    by_exec = cage_run(h, name, REACH_SCRIPT + "\nresult(**out)\n")
    cage = h.cage(name)
    for where, got in (("turn", in_turn), ("exec", by_exec)):
        print(f"{where}: own {sorted(set(got['own'].values()))}; got {got['got']};"
              f" open {{errno: pids}} {got['open_fd']}; pidfd_getfd {got['pidfd_getfd']}")
        assert got["uid"] == cage["uid"]
        assert pipe not in got["own"].values(), got["own"]
        assert all(target != pipe for _, _, target in got["got"]), got["got"]
        listed = {pid: uid for pid, uid in got["proc_fd"].items() if isinstance(uid, int)}
        assert set(listed.values()) <= {cage["uid"]}, listed
        assert set(got["open_fd"]) <= {"EACCES", "ENOENT", "EPERM", "ENXIO"}, got["open_fd"]
    st = os.stat(cage_log(h, name).parent)
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o700), (st.st_uid, oct(st.st_mode))


# -- held: a harness-uid writer left behind, the budget, /dev/null after ---------------------

WRITER = r"""
import fcntl, os, sys, time
fd = int(sys.argv[1])
try:
    size = fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ
except OSError as e:
    size = str(e)
print("writing, pipe size", size, flush=True)
os.set_blocking(fd, False)
line = b"r28 left behind " + b"y" * 1000 + b"\n"
while True:
    try:
        os.write(fd, line)
    except BlockingIOError:
        time.sleep(0.0005)
"""


@pytest.mark.attack("harness.fork-inheritance", ref=REF + ": a harness-uid child writing the log pipe flat out across the harness's death")
def test_a_writer_left_behind_is_swept_and_the_budget_holds(h: HiveProcess) -> None:
    """A compromised harness leaves a child of its uid holding its stdout/stderr pipe and
    writing as fast as it can, and dies. Init sweeps the child, drains, says the harness
    exited and starts the next (exec'd) one promptly; cage.log grew by at most the budget,
    the one notice and init's line; the next harness's stdout and stderr are /dev/null
    (the budget spent) and it serves a turn."""
    name = LEFT
    log = cage_log(h, name)
    harness = h.harness_pid(name)
    before = log.stat().st_size
    fd = pidfd_getfd(harness, 2)
    writer = as_harness_uid(h, name, harness, WRITER, fd=fd)
    os.close(fd)
    try:
        line = writer.stdout.readline() if writer.stdout else ""
        assert line.startswith("writing"), (line, writer.stderr.read() if writer.poll() is not None else "")
        kids = [p for p in tree_of(writer.pid) if proc_uid(p) == h.cage(name)["harness_uid"]]
        assert kids, tree_of(writer.pid)
        time.sleep(0.5)
        os.kill(harness, signal.SIGKILL)
        t0 = time.monotonic()
        new = wait_new_harness(h, name, harness, 10)
        took = time.monotonic() - t0
        writer_left = [p for p in kids if os.path.exists(f"/proc/{p}")]
    finally:
        kill_tree(writer)
    time.sleep(0.2)
    tail = log.read_bytes()[before:]
    stdio = [os.readlink(f"/proc/{new}/fd/{k}") for k in (1, 2)]
    print(f"{line.strip()}; new harness in {took:.2f} s; the writer's processes left {writer_left}; cage.log grew {len(tail)}"
          f" ({tail.count(NOTICE)} notice); the new harness's stdout, stderr {stdio}")
    assert writer_left == [], "the harness uid's writer outlived the harness"
    assert took < 3, took
    assert len(tail) <= HARNESS_LOG_MAX + 512, len(tail)
    assert tail.count(NOTICE) == 1 and b"harness exited with status" in tail.split(NOTICE)[1], tail[-400:]
    assert stdio == ["/dev/null", "/dev/null"], stdio
    turn = assert_ok(h.host_call("send", to=name, body="after the flood"))["id"]
    wait_until(lambda: turn_ended(h, name, turn), 30, "a turn of the harness with /dev/null for stderr")
    assert h.harness_pid(name) == new

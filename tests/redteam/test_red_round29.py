"""Red team round 29: session 26's change (init's soft RLIMIT_NOFILE at its hard one, its
children given the cage's back: ``raise_own_nofile``, ``child_nofile``) and init's handling
of the harness's channel and page pair around it, from real cages.

The hostile party is a compromised harness, simulated from the host (its descriptors taken
with ``pidfd_getfd``, stopped with SIGSTOP; where its sends must be charged to its own uid,
a child of the test that drops to the harness's ids makes them). Root's descriptors in
flight (the per-user counter the change is about: ``user->unix_inflight`` of uid 0, every
cage's init's) are read from the host by a capless root probe that bisects its own soft
RLIMIT_NOFILE: the kernel refuses its SCM_RIGHTS send exactly while root has more in
flight than that limit (``INFLIGHT``), so the least limit that sends is the count.

Broke (the case FAILED against 8932e49; fixed the same session: ``Init.spawn`` refuses an
``env`` that is no object, ``Init.kill`` takes exact ints only, and ``Init.run`` answers
any request that still raises with ``bad request`` and a line in cage.log):
- (low, needs a compromised harness; the same class as round 19's ``req.get`` on a list)
  init trusts the types of a request's fields past ``op``: a spawn whose ``env`` is a
  JSON list, string or number (``req.get("env") or {}`` then ``env.items()``:
  AttributeError), or a kill whose ``pid`` is a list or object (``pid not in
  self.groups``: TypeError, unhashable), or a float naming a live group (``os.killpg``:
  TypeError), raises out of ``Init.run``: init exits, and with it the cage, the agent's
  runtime and turn, its page and its egress bridge; the harness restart, backoff and
  sweep are skipped, and nothing starts the cage again: the core shows the agent
  ``running: False, failed: True`` (still so 8 s on, when looked at by hand), until the
  operator starts it. One message of ~60 bytes each, all three kinds
  (``test_malformed_spawn_or_kill_fields_end_init_and_the_cage``: init gone within 0.3 s
  of each; cage.log's last line the AttributeError / TypeError). A compromised harness
  could only stop serving before; now it takes its whole agent down, past the restart
  that would bring a clean harness back.

Held (figures in each case's output):
- root's descriptors in flight stay at 6 a cage across a compromised harness's attempts
  to keep its page pair (and so its 6 unread page connections, root's) alive past its
  own death: the pair's end sent into init's own end of it (never read by init), into
  its log socket (stream, read by init with ``read``), into its channel (read, closed),
  and handed as stdin to a runtime process init spawns, whose setsid'd child keeps it;
  then the harness killed. Root's count: 0 before, 6 with the harness stopped and 10
  connections on web.sock (4 closed by init), still 6 once parked, 0 after the restart
  (the runtime and its child swept, the page ``HTTP/1.1 200 OK`` from the new harness);
- the change's limits: init's soft limit is its hard one (20,000 here); the first harness
  (init's fork), a runtime process (``fork_exec`` from a spawn) and a restarted harness
  (exec'd) have the cage's 1,024 soft and the same hard, 20,000; init's descriptors 10
  before and after the restart (nothing left open in it by the attempts above). (Each
  child may raise its own soft limit back to that hard one, as before the change: its
  sends are charged to its own uid, not root's, so nothing rests on the 1,024.)
- by reading (no case): the sweep child of ``sweep_runtime_uid`` keeps init's soft limit
  but never execs and lives only for its ``kill(-1)``; its real and saved uid 65534 keep
  the runtime from ``/proc/PID/fd`` and ``pidfd_getfd`` on it. A request nested to the
  decoder's limit (995 levels) in ``seq`` or ``op`` is echoed without a RecursionError.

Not tried (each would need more than this machine may take, or is the core's): parking
the pair's end in the core (an egress tunnel whose allowed upstream stops reading, so
the proxy's relay stops reading the handed stream socket carrying it; or agent.sock past
its 2 MiB paused buffer) could keep 6 more root descriptors in flight per harness death;
the core's hang-up watch and the relay's upstream bound how long. ``fs.file-max`` is
round 17's known limit.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HiveProcess, proc_cmdline, proc_uid, running_hive, wait_until

from .conftest import (
    PASSRIGHTS,
    harness_end,
    harness_or_none,
    init_pid,
    nofile,
    page_answers,
    pidfd_getfd,
)

REF = "red team round 29"
PARK, CRASH_ENV, CRASH_PID, CRASH_FLOAT = "r29pk", "r29ce", "r29cp", "r29cf"

# Root's descriptors in flight, as a capless root process sees them (run under setpriv).
INFLIGHT = r"""
import os, resource, socket
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
def sends(n):
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        socket.send_fds(a, [b"x"], [b.fileno()])
        ok = True
    except OSError:
        ok = False
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if ok:
        for fd in socket.recv_fds(b, 1, 1)[1]:
            os.close(fd)
    return ok
lo, hi = 0, 16384
if not sends(hi):
    print(-1)
else:
    while lo < hi:
        mid = (lo + hi) // 2
        if sends(mid):
            hi = mid
        else:
            lo = mid + 1
    print(lo)
"""

# A runtime process keeping its stdin (the page pair's end) in a child of its own session.
KEEPER = "import os, time\nif os.fork() == 0:\n    os.setsid()\ntime.sleep(120)\n"


@pytest.fixture(scope="module")
def h() -> Iterator[HiveProcess]:
    agents: dict[str, dict[str, Any]] = {
        n: {"runtime": "command", "command": ["true"], "peers": []} for n in (PARK, CRASH_ENV, CRASH_PID, CRASH_FLOAT)
    }
    yield from running_hive(HiveProcess(agents))


def root_in_flight() -> int:
    """Root's descriptors in flight (host-wide), the least of three readings (another root
    sender on the host may add a few for a moment)."""
    got = []
    for _ in range(3):
        out = subprocess.run(
            ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", INFLIGHT],
            capture_output=True, text=True, timeout=20).stdout.strip()
        got.append(int(out))
    return min(got)


def wait_new_harness(h: HiveProcess, name: str, old: int, timeout: float = 30) -> int:
    return wait_until(lambda: (p := harness_or_none(h, name)) and p != old and p, timeout,
                      f"a new harness in {name}")


def as_uid(uid: int, gid: int, act: Any) -> None:
    """``act()`` in a child of the test dropped to ``uid``/``gid`` (its SCM_RIGHTS sends are
    charged to that uid, as the harness's own are); raises if it failed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            act()
            code = 0
        except BaseException as e:  # reported to the parent
            os.write(w, repr(e).encode()[:500])
        finally:
            os._exit(code)
    os.close(w)
    err = b""
    while chunk := os.read(r, 4096):
        err += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, err.decode(errors="replace")


def send_request(chan: socket.socket, req: dict[str, Any], fds: list[int]) -> None:
    data = json.dumps(req).encode()
    if fds:
        chan.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview((ctypes.c_int * len(fds))(*fds))))])
    else:
        chan.send(data)


def replies(chan: socket.socket, wait: float = 2.0) -> list[dict[str, Any]]:
    """What init sent on the channel (read from the copy: the harness is stopped)."""
    out = []
    chan.settimeout(wait)
    try:
        while True:
            data = chan.recv(65536)
            if not data:
                break
            out.append(json.loads(data))
            chan.settimeout(0.2)
    except (TimeoutError, BlockingIOError):
        pass
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- broke: init ends on a field of the wrong type ------------------------------------------


@pytest.mark.attack("wire.malformed", ref=REF + ": a spawn's env or a kill's pid of the wrong type ends init")
def test_malformed_spawn_or_kill_fields_end_init_and_the_cage(h: HiveProcess) -> None:
    """As a compromised harness, on its channel: one spawn with ``"env": ["x"]`` (and its
    three descriptors) in one cage, one kill with ``"pid": [1]`` in another. Each should be
    refused with an error reply, as an unknown op or a non-object request is (round 19);
    init should live on and answer the next request.

    A third cage: a kill whose ``pid`` is a live group's pid as a float (8.0; ``in`` the
    set, then ``os.killpg`` raises TypeError).

    FAILED against 8932e49: ``env.items()`` raises AttributeError, ``[1] in set`` and
    ``os.killpg(8.0, 15)`` TypeError out of ``Init.run``; init exits at once and the cage
    with it (the agent shown failed, not restarted)."""
    outcome: dict[str, Any] = {}
    for name, req, with_fds in (
        (CRASH_ENV, {"op": "spawn", "argv": ["/bin/true"], "env": ["x"], "seq": 1}, True),
        (CRASH_PID, {"op": "kill", "pid": [1], "signal": 15, "seq": 1}, False),
        (CRASH_FLOAT, {"op": "kill", "pid": None, "signal": 15, "seq": 1}, False),
    ):
        ipid, harness = init_pid(h, name), h.harness_pid(name)
        chan = harness_end(h, name)
        os.kill(harness, signal.SIGSTOP)
        null = os.open(os.devnull, os.O_RDWR)
        try:
            if req["pid" if "pid" in req else "op"] is None:  # a live group's pid, as a float
                send_request(chan, {"op": "spawn", "argv": ["/bin/sleep", "30"], "env": {}, "seq": 0}, [null] * 3)
                group = next(r["reply"]["pid"] for r in replies(chan, 2.0) if r.get("seq") == 0)
                req = {**req, "pid": float(group)}
            send_request(chan, req, [null] * 3 if with_fds else [])
            got = replies(chan, 1.0)
            time.sleep(0.3)
            init_lives = alive(ipid)
            after = None
            if init_lives:  # the next request still answered
                send_request(chan, {"op": "kill", "pid": 999999, "seq": 2}, [])
                after = replies(chan, 1.0)
        finally:
            os.close(null)
            chan.close()
            kill_quietly(harness)
        log = h.state_dir / "priv" / "cages" / name / "cage.log"
        last = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        outcome[name] = {"request": req, "replies": got, "init alive": init_lives, "next": after,
                         "cage running": h.cage(name).get("running"), "cage.log's last line": last}
    time.sleep(1.0)
    status = h.agent_status()
    for name, o in outcome.items():  # what the operator sees a second on (no restart came)
        o["agent"] = {k: status.get(name, {}).get(k) for k in ("running", "failed")}
    print(f"malformed requests: {outcome}")
    for name, o in outcome.items():
        assert o["init alive"], f"{name}: init ended on {o['request']} (the cage with it): {o}"
        assert o["replies"] and o["replies"][0].get("reply", {}).get("ok") is False, o
        assert o["next"] and o["next"][0].get("seq") == 2, o


# -- held: root's descriptors in flight stay at 6 a cage ------------------------------------


@pytest.mark.attack("budget.exhaustion", ref=REF + ": the page pair kept past its harness's death, root's descriptors in flight")
def test_page_pair_kept_past_the_harness_leaves_nothing_in_flight_as_root(h: HiveProcess) -> None:
    """A compromised harness, stopped while 10 connections reach its web.sock (init hands
    6, root's, in flight on the page pair), tries to keep its end of the pair alive past
    its own death, so that each restart would add 6 more to root's count, host-wide: it
    sends the end (as its own uid) into init's end of the pair, into its log socket and
    into its channel, and has init spawn a runtime process with it as stdin whose
    setsid'd child keeps it; then it is killed. Held if root's count is back where it was
    once the new harness runs. Also the change's limits, for each kind of process."""
    name = PARK
    ids = h.cage(name)
    ipid, first = init_pid(h, name), h.harness_pid(name)
    limits = {"init": nofile(ipid), "first harness": nofile(first)}
    init_fds_before = len(os.listdir(f"/proc/{ipid}/fd"))
    base = root_in_flight()
    page = harness_end(h, name, page=True)
    chan = harness_end(h, name)
    log_w = socket.socket(fileno=pidfd_getfd(first, 1))
    os.kill(first, signal.SIGSTOP)
    clients: list[socket.socket] = []
    counts: dict[str, Any] = {"before": base}
    keeper = None
    try:
        for _ in range(10):
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(h.run_dir / "ui" / name / "web.sock"))
            clients.append(c)
        counts["stopped, 10 connections"] = wait_until(
            lambda: (n := root_in_flight()) >= base + 6 and n, 10, "init's 6 page connections in flight")

        def park() -> None:
            # Init's end of the pair and its log socket refuse descriptors (SO_PASSRIGHTS,
            # session 27; on a kernel before 6.16 they take them, and init drops them).
            for into, what in ((page, b"p"), (log_w, b"l")):  # init's end; its log socket
                try:
                    socket.send_fds(into, [what], [page.fileno()])
                except PermissionError:
                    pass
                else:
                    assert not PASSRIGHTS, f"{what!r}: init's end took a descriptor"
            socket.send_fds(chan, [b"{}"], [page.fileno()])  # on the channel
            null = os.open(os.devnull, os.O_RDWR)
            send_request(chan, {"op": "spawn", "argv": ["/usr/bin/python3", "-c", KEEPER], "env": {}, "seq": 7},
                         [page.fileno(), null, null])
        as_uid(ids["harness_uid"], ids["gid"], park)
        got = replies(chan, 2.0)
        spawned = next((r["reply"] for r in got if r.get("seq") == 7), None)
        assert spawned and spawned.get("ok"), got
        keeper = wait_until(lambda: [p for p in h.cage_procs(name) if proc_uid(p) == ids["uid"]
                                     and "python3" in " ".join(proc_cmdline(p))], 10, "the keeper")
        limits["runtime process"] = nofile(keeper[0])
        counts["parked"] = root_in_flight()
    finally:
        page.close()
        chan.close()
        log_w.close()
        kill_quietly(first)
    restarted = wait_new_harness(h, name, first)
    limits["restarted harness"] = nofile(restarted)
    wait_until(lambda: not [p for p in h.cage_procs(name) if proc_uid(p) == ids["uid"]], 10,
               "the runtime swept")
    time.sleep(0.3)
    counts["after the restart"] = root_in_flight()
    answers = wait_until(lambda: (a := page_answers(h, name)).startswith("HTTP/1.") and a, 10, "the page")
    for c in clients:
        c.close()
    init_fds_after = len(os.listdir(f"/proc/{ipid}/fd"))
    print(f"root's descriptors in flight: {counts}; the page after: {answers!r}; RLIMIT_NOFILE {limits};"
          f" init's descriptors {init_fds_before} -> {init_fds_after}; keeper {keeper}")
    assert counts["stopped, 10 connections"] - base <= 6, counts
    assert counts["after the restart"] <= base, counts
    assert init_fds_after == init_fds_before
    soft, hard = limits["init"]
    assert soft == hard >= 4096, limits
    for who in ("first harness", "runtime process", "restarted harness"):
        assert limits[who] == (1024, hard), limits

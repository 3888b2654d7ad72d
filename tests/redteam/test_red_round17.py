"""Red team round 17: host-wide kernel counters and limits a cage inherits, attacked from
inside real cages.

Broke (fixed in this round):

- ``kernel.host-counters``: ``io_setup`` was allowed. Linux AIO contexts are counted
  against one host-wide budget (``fs.aio-max-nr``, 65,536 events here; each
  ``io_setup(n)`` takes about 2n of it), shared by the host and every cage. One agent took
  all of it in a loop and held it: the host's own ``io_setup(1)`` and another cage's then
  failed with EAGAIN for as long as it liked (anything on the host using native AIO:
  databases, QEMU, nginx's ``aio``). The cage's seccomp table now refuses ``io_setup``
  (and the calls that use a context) with ENOSYS, as a kernel without ``CONFIG_AIO``
  answers; glibc's POSIX aio is threads and unaffected, libaio users fall back.

- ``kernel.host-counters`` (ptys): bwrap mounts each cage's devpts as a new instance
  with no bound of its own, and every instance but the host's draws on one host-wide
  count (``kernel.pty.max`` less ``kernel.pty.reserve``: 3,072). One agent opened ptys
  (raising its soft descriptor limit, keeping the masters) until ENOSPC, 3,071 of them,
  and every other cage's ``openpty`` (a tmux, ``script``, an ``expect``) then failed
  with ENOSPC. hive-priv now mounts each cage's devpts itself, ``max=64``
  (``cage_mounts.pts_view``, bound over bwrap's with ``--dev-bind``).

- ``cage.core-dumps``: nothing set ``RLIMIT_CORE`` in a cage, so it kept hive-priv's hard
  limit (unlimited under ``hive up``, systemd's default too): a runtime raised its soft
  limit and every crash of its was a core dump, handed to the host's ``core_pattern``
  (here ``core``, written into the crashing process's directory; on a host with a pipe
  there, systemd-coredump or apport, a root program of the host's run for each crash,
  its store and journal outside every quota of the agent's). A ``hive exec`` command
  kept the same limit, so the operator's process crashing in a directory of the
  agent's left its memory (what the operator typed into it) for the agent to read.
  hive-priv now sets ``RLIMIT_CORE`` to 0, soft and hard, for the cage and for every
  exec (``priv/cages.py``, ``enter_cage_limits``).

Held: see docs/security.md's rounds table (red team round 17).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HiveProcess, probe_result, running_hive
from hyperhive.priv.cage_mounts import CAGE_PTYS

from .conftest import CLIENT, cage_run

HOLDER, VICTIM = "r17hold", "r17other"
AGENTS: dict[str, dict[str, Any]] = {
    HOLDER: {"runtime": "command", "command": ["true"]},
    VICTIM: {"runtime": "command", "command": ["true"]},
}
RELEASE = "r17-release"  # a file the host puts in the holder's /run/hive when it is done looking


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(AGENTS))


def _read_int(path: str) -> int:
    return int(Path(path).read_text().split()[0])


def _host_io_setup() -> str:
    """io_setup(1) on the host (this test's process), destroyed at once: OK or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    ctx = ctypes.c_ulong(0)
    nr_setup, nr_destroy = (206, 207) if os.uname().machine == "x86_64" else (0, 1)
    if libc.syscall(ctypes.c_long(nr_setup), ctypes.c_long(1), ctypes.byref(ctx)) != 0:
        return errno.errorcode[ctypes.get_errno()]
    libc.syscall(ctypes.c_long(nr_destroy), ctx)
    return "OK"


# The holder: takes as much of a host-wide budget as the kernel lets it, says so with its
# status, keeps it until the host's release file appears in /run/hive (at most 60 s).
HOLD = """
import ctypes, resource, time
libc = ctypes.CDLL(None, use_errno=True)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
taken = {"aio_contexts": 0, "aio_events": 0, "aio_error": None, "ptys": 0, "pty_error": None}
ctxs = []
nr = 4096
while nr >= 1 and len(ctxs) < 10000:
    ctx = ctypes.c_ulong(0)
    if libc.syscall(ctypes.c_long(P["io_setup"]), ctypes.c_long(nr), ctypes.byref(ctx)) == 0:
        ctxs.append(ctx)
        taken["aio_contexts"] += 1
        taken["aio_events"] += nr
        continue
    taken["aio_error"] = errno.errorcode[ctypes.get_errno()]
    if taken["aio_error"] != "EAGAIN":
        break
    nr //= 2  # take what is left, in smaller pieces
masters = []
while len(masters) < P["max_ptys"]:
    try:
        m, s = os.openpty()
    except OSError as e:
        taken["pty_error"] = errname(e)
        break
    os.close(s)  # the master alone keeps the pty's index taken
    masters.append(m)
    taken["ptys"] += 1
call({"cmd": "set_status", "text": "r17 holding " + json.dumps(taken)})
deadline = time.monotonic() + 60
while not os.path.exists("/run/hive/" + P["release"]) and time.monotonic() < deadline:
    time.sleep(0.05)
result(**taken)
"""

# Another cage (and the agent's own second process) asks for one of each.
ONE_EACH = """
import ctypes, pty
libc = ctypes.CDLL(None, use_errno=True)
out = {}
ctx = ctypes.c_ulong(0)
if libc.syscall(ctypes.c_long(P["io_setup"]), ctypes.c_long(16), ctypes.byref(ctx)) == 0:
    out["io_setup"] = "OK"
    libc.syscall(ctypes.c_long(P["io_destroy"]), ctx)
else:
    out["io_setup"] = errno.errorcode[ctypes.get_errno()]
try:
    m, s = os.openpty()
    os.close(m), os.close(s)
    out["openpty"] = "OK"
except OSError as e:
    out["openpty"] = errname(e)
result(**out)
"""

NRS = {"io_setup": 206, "io_destroy": 207} if os.uname().machine == "x86_64" else {"io_setup": 0, "io_destroy": 1}


def _holding(hive: HiveProcess, timeout: float = 90) -> dict[str, Any]:
    """Wait for the holder's status to say what it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = hive.agent_status()[HOLDER].get("status_text") or ""
        if text.startswith("r17 holding "):
            held: dict[str, Any] = json.loads(text[len("r17 holding "):])
            return held
        time.sleep(0.1)
    raise AssertionError("the holder never said what it holds")


@pytest.mark.attack("kernel.host-counters",
                    ref="fs.aio-max-nr (a host-wide AIO budget; Docker's profile allows io_setup); "
                        "kernel.pty.max shared by every devpts instance (pty(7), devpts max=)")
def test_a_cage_cannot_take_the_hosts_aio_or_pty_budget(hive: HiveProcess) -> None:
    """The holder takes every AIO event and pty the kernel gives it, and keeps them. The
    host's io_setup(1) and another cage's io_setup and openpty must still work, and the
    host's AIO count must not have moved. Before the fix the holder took all 65,536
    events (16 contexts), the host's count at its limit, and the host's and the other
    cage's io_setup failed with EAGAIN; it took 3,071 ptys and the other cage's openpty
    failed with ENOSPC."""
    aio_before = _read_int("/proc/sys/fs/aio-nr")
    ptys_before = _read_int("/proc/sys/kernel/pty/nr")
    holder_out: dict[str, Any] = {}

    def hold() -> None:
        holder_out.update(probe_result(hive.probe(
            HOLDER, CLIENT + HOLD, timeout=120, release=RELEASE, max_ptys=4096, **NRS)))

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    release = hive.run_dir / "agents" / HOLDER / RELEASE
    try:
        held = _holding(hive)
        aio_held = _read_int("/proc/sys/fs/aio-nr")
        ptys_held = _read_int("/proc/sys/kernel/pty/nr")
        host = _host_io_setup()
        other = cage_run(hive, VICTIM, ONE_EACH, **NRS)
    finally:
        release.touch()
        t.join(120)
        release.unlink(missing_ok=True)
    assert holder_out, "the holder's probe gave no result"
    seen = dict(held=held, aio_before=aio_before, aio_held=aio_held, ptys_before=ptys_before,
                ptys_held=ptys_held, host=host, other=other)
    # Taken nothing of the host's AIO budget: io_setup is not there for a cage.
    assert held["aio_contexts"] == 0 and held["aio_error"] == "ENOSYS", json.dumps(seen)
    assert aio_held <= aio_before, (aio_before, aio_held)
    assert host == "OK", f"the host's io_setup failed while a cage held AIO contexts: {host}"
    assert other["io_setup"] == "ENOSYS", other
    # Ptys: the holder's instance has a bound of its own (before: it took all 3,071 the
    # host leaves to devpts instances but its own), and another cage still opens one.
    assert held["ptys"] == CAGE_PTYS and held["pty_error"] == "ENOSPC", json.dumps(seen)
    assert ptys_held - ptys_before <= CAGE_PTYS + 16, json.dumps(seen)  # (others' tests on this host)
    assert other["openpty"] == "OK", (
        f"another cage could not open a pty: {other}; the holder keeps {held['ptys']} "
        f"({held['pty_error']}), the host counts {ptys_held}")


CORE = """
import resource, signal, subprocess
before = resource.getrlimit(resource.RLIMIT_CORE)
try:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    raised = "OK"
except (ValueError, OSError) as e:
    raised = type(e).__name__
try:
    resource.setrlimit(resource.RLIMIT_CORE, (before[1], before[1]))
except (ValueError, OSError):
    pass
after = resource.getrlimit(resource.RLIMIT_CORE)
d = P["dir"]
os.makedirs(d, exist_ok=True)
# A crash of the agent's own: a child that aborts (SIGABRT dumps core) in a directory it owns.
pid = os.fork()
if pid == 0:
    os.chdir(d)
    os.abort()
_, status = os.waitpid(pid, 0)
files = sorted(n for n in os.listdir(d) if n.startswith("core"))
for n in files:
    os.unlink(os.path.join(d, n))
result(before=list(before), raised=raised, after=list(after), dumped=os.WCOREDUMP(status),
       signal=os.WTERMSIG(status), files=files)
"""


@pytest.mark.attack("cage.core-dumps",
                    ref="OpenShell core_dump_hardening.rs; NemoClaw#4825 (secrets in core dumps); "
                        "systemd-coredump/apport run as root on the host for every crash")
def test_a_cage_process_can_not_dump_core(hive: HiveProcess) -> None:
    """RLIMIT_CORE is 0, soft and hard, in the cage: the runtime can't raise it, and an
    aborted child leaves no core (before the fix: hard unlimited inherited from
    hive-priv, raised, dumped, a ``core`` file in the directory)."""
    out = cage_run(hive, HOLDER, CORE, dir="/tmp/r17core")
    assert out["signal"] == 6, out
    assert out["before"] == [0, 0] and out["after"] == [0, 0], out
    assert out["raised"] == "ValueError", out  # the kernel's EPERM, as Python reports it
    assert not out["dumped"] and out["files"] == [], out


@pytest.mark.attack("cage.core-dumps", ref="NemoClaw#4825 (secrets in core dumps); OpenShell core_dump_hardening.rs")
def test_a_hive_exec_can_not_dump_core(hive: HiveProcess) -> None:
    """The operator's ``hive exec`` (the clean one: its own pid namespace, a fresh HOME) has
    RLIMIT_CORE 0 too: a command of the operator's that crashes in a directory of the
    agent's leaves none of its memory there."""
    script = ("import resource, json; "
              "print(json.dumps(resource.getrlimit(resource.RLIMIT_CORE)))")
    done = hive.exec(HOLDER, "/usr/bin/python3", "-c", script, flags=())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [0, 0], done.stdout


COMM = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
# PR_SET_NAME: 15 bytes of comm; a newline and a forged Uid line, so that a reader of
# /proc/PID/status taking the first line starting "Uid:" (the cage's init, choosing which
# processes to kill on an interrupt) would take root's for this process.
name = b"x\\nUid:\\t0\\t0\\t0"
ok = libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0)
with open("/proc/self/status") as f:
    lines = f.read().splitlines()
uid_lines = [l for l in lines if l.startswith("Uid:")]
result(set=ok, name=lines[0], uid_lines=uid_lines, uid=os.getuid())
"""


@pytest.mark.attack("init.status-parse",
                    ref="/proc/PID/status parsed by a privileged reader (comm is the process's to set: "
                        "prctl PR_SET_NAME); cage/init.py runtime_uid_pids")
def test_a_forged_uid_line_in_comm_does_not_fool_init(hive: HiveProcess) -> None:
    """The cage's init (root, CAP_KILL) picks the runtime's processes to signal by the
    first ``Uid:`` line of each ``/proc/PID/status``. A runtime's comm with a newline and
    a forged ``Uid:`` line would come first (``Name:`` is the first line): the kernel
    shows the newline escaped, so the only ``Uid:`` line is the real one."""
    out = cage_run(hive, HOLDER, COMM)
    assert out["set"] == 0, out
    assert out["name"].startswith("Name:\tx\\nUid:"), out  # the newline shown as \n
    assert out["uid_lines"] == [f"Uid:\t{out['uid']}\t{out['uid']}\t{out['uid']}\t{out['uid']}"], out


SCHED = """
import resource
out = {"rtprio": list(resource.getrlimit(resource.RLIMIT_RTPRIO)),
       "nice": list(resource.getrlimit(resource.RLIMIT_NICE))}
for which, lim in (("rtprio", resource.RLIMIT_RTPRIO), ("nice", resource.RLIMIT_NICE)):
    hard = resource.getrlimit(lim)[1]
    try:
        resource.setrlimit(lim, (hard, hard))
    except (ValueError, OSError) as e:
        out[which + "_raise"] = type(e).__name__
try:
    # A real-time policy, dropped again at once: a busy loop at SCHED_FIFO would take 95%
    # of a CPU from every ordinary process of the host (hive-core, hive-priv, sshd).
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    out["fifo"] = "OK"
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
except OSError as e:
    out["fifo"] = errname(e)
try:
    os.setpriority(os.PRIO_PROCESS, 0, -10)
    out["nice_minus_10"] = "OK"
except OSError as e:
    out["nice_minus_10"] = errname(e)
result(**out)
"""


@pytest.mark.attack("cage.scheduling",
                    ref="sched(7) RLIMIT_RTPRIO for unprivileged real-time policies; LimitRTPRIO= in "
                        "systemd.exec(5); the cage has no CPU limit (docs/security.md, Known limits)")
def test_a_cage_can_not_take_a_real_time_policy(hive: HiveProcess) -> None:
    """A cage gets RLIMIT_RTPRIO and RLIMIT_NICE 0, soft and hard, whatever hive-priv was
    given (a unit's LimitRTPRIO=, a shell's ``ulimit -r``): no SCHED_FIFO, no nice below 0.
    With a real-time policy a busy loop (cages have no CPU limit) would take 95% of a CPU
    from every ordinary process of the host. (This host's root has no CAP_SYS_RESOURCE, so
    the test can't give hive-priv a nonzero limit to show the cage dropping it: it checks
    what the cage gets.)"""
    out = cage_run(hive, HOLDER, SCHED)
    assert out["rtprio"] == [0, 0] and out["nice"] == [0, 0], out
    assert out["fifo"] == "EPERM" and out["nice_minus_10"] == "EACCES", out


LINK = """
import json, os, sys
ui, target = sys.argv[1], sys.argv[2]
sock = os.path.join(ui, "web.sock")
if target == "restore":
    os.rename(sock + ".r17", sock) if os.path.lexists(sock + ".r17") else None
    if os.path.islink(sock):
        os.unlink(sock)
        os.rename(sock + ".r17", sock)
else:
    if not os.path.lexists(sock + ".r17"):
        os.rename(sock, sock + ".r17")
    tmp = os.path.join(ui, "r17.tmp")
    os.symlink(target, tmp)
    os.rename(tmp, sock)
print(json.dumps(sorted(os.listdir(ui))))
"""


@pytest.mark.attack("gateway.page-socket-link",
                    ref="a compromised harness (its uid owns run/ui/NAME): nginx follows a link at web.sock "
                        "as the core's user; CVE-2026-39861 class (a privileged reader following links)")
def test_a_harness_linking_its_page_socket_elsewhere_reaches_nothing(hive: HiveProcess) -> None:
    """As the harness's uid (a compromised harness), web.sock is to be replaced by a link
    to the core's HTTP socket, hive-priv's, host.sock, another agent's agent.sock and its
    page socket. Since session 16 the harness owns nothing there (hive-priv binds web.sock
    in a directory root:hive-gateway 0750 and hands the listener in): the rename is
    refused. In depth, the same links planted by root: the gateway (nginx's workers,
    user hive-gateway) then proxies the operator's own visit to the page, with the
    session, there. None of it may serve the operator's state or act: the core's surface
    sees no cookie (the page location strips it) and answers as to a stranger; priv.sock,
    host.sock and agent.sock speak no HTTP or refuse the gateway's user."""
    import subprocess
    import sys

    from web_fixture import Web

    web = Web(hive)
    login = web.login()
    cage = hive.cage(HOLDER)
    ui = hive.run_dir / "ui" / HOLDER
    run = hive.run_dir
    targets = {
        "core.sock": run / "core.sock", "priv.sock": hive.priv_sock, "host.sock": hive.host_sock,
        "other agent.sock": run / "agents" / VICTIM / "agent.sock",
        "other web.sock": run / "ui" / VICTIM / "web.sock",
    }
    state = web.get("/api/state", login=login)
    assert state.status_code == 200 and HOLDER in state.text, state.status_code

    def link(target: str) -> None:  # as root: a directory the harness could write, were it so
        done = subprocess.run([sys.executable, "-c", LINK, str(ui), target], capture_output=True, text=True,
                              timeout=30)  # fmt: skip
        assert done.returncode == 0, done.stderr

    as_harness = subprocess.run([sys.executable, "-c", LINK, str(ui), str(run / "core.sock")], capture_output=True,
                                text=True, timeout=30, user=cage["harness_uid"], group=cage["gid"],
                                extra_groups=[ui.stat().st_gid])  # fmt: skip
    assert as_harness.returncode != 0 and "PermissionError" in as_harness.stderr, as_harness
    assert sorted(p.name for p in ui.iterdir()) == ["web.sock"] and (ui / "web.sock").is_socket()

    seen: dict[str, list[tuple[int, str]]] = {}
    def cages() -> dict[str, Any]:
        reply = hive.priv("status")
        assert reply.get("ok"), reply
        return {n: {k: v for k, v in row.items() if k not in ("memory_bytes", "oom_kills", "pids_refused")} for n, row in reply["cages"].items()}

    priv_before = cages()
    try:
        for label, path in targets.items():
            link(str(path))
            seen[label] = [(r.status_code, r.text[:300]) for r in (
                web.get(f"/agent/{HOLDER}/page/", login=login),
                web.get(f"/agent/{HOLDER}/page/api/state", login=login),
                web.get(f"/agent/{HOLDER}/page/agent/{VICTIM}/", login=login))]
    finally:
        link("restore")
    assert cages() == priv_before
    for label, replies in seen.items():
        for status, text in replies:
            # Nothing of the operator's view: no state, no dashboard, no other agent's page.
            assert "agent_statuses" not in text and "csrf-token" not in text, (label, status, text)
            assert not (status == 200 and label != "other web.sock"), (label, status, text)
    assert web.get(f"/agent/{HOLDER}/page/", login=login).status_code in (200, 404)

"""Red team round 25b: session 22's change (`hive up` waits for hive.toml to change before
it starts again a core that exited with status 78, `config.CONFIG_REFUSED`), from a
compromised core (which can exit 78 whenever it likes: here root makes the live core call
``exit_group(78)`` through ptrace, what its own code could do) and from a hostile agent; and one
new angle on what a cage observes of the host (page-cache residency through
``preadv2(RWF_NOWAIT)``).

Each test starts its own hive (agents ``r25b*``): the core's exits change it.

Broke (both fixed the same session):
- a core that exits 78 is not followed by the kill of its ids' processes: what it left
  running (here a process of its ids holding a copy of host.sock's listener, taken from
  it) lives on, and answers the operator on host.sock, for as long as `hive up` waits for
  hive.toml; before, any exit was a restart within 10 s, and each start kills every
  process of the core's ids and binds host.sock and core.sock afresh (the control, a
  core exiting 1: its helper SIGKILLed, host.sock answered by the new core). Low. Now
  `hive up` kills the core's ids' processes and binds its listeners afresh as soon as it
  exits (``Supervised.after_exit``), before any wait.
- hive up takes hive.toml's state (inode, size, times) only after the core exited 78, not
  as the core read it: a fix saved between the core's read and hive up's first look
  (here right after the core's read, seen by inotify) is the state it waits to see
  change, so the fixed hive is never started again until another edit. Low
  (availability, the operator's own file). Now the state is taken as each start begins.

Held: `hive up` waits (no start for seconds) after a 78 and stops on SIGTERM at once,
exit 0, the cages and every process of the core's ids gone; a change of hive.toml starts
the core again, and a core killed by SIGKILL afterwards is restarted with the backoff's
line; an agent can't reach hive.toml, nor make the core refuse it (a spawn of a declared
name is refused, a pending spawn of a new name leaves the restarted core serving);
``preadv2(RWF_NOWAIT)``, which on the host tells whether a file's pages are cached (EAGAIN,
then 4096 once read), is ENOTSUP on the cage's /usr overlay before and after the host's read.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HiveProcess, running_hive, wait_until
from hyperhive.cli.up import processes_of

from .conftest import cage_run

A, B = "r25ba", "r25bb"
SPECS: dict[str, dict[str, Any]] = {
    A: {"runtime": "command", "command": ["true"], "peers": [B]},
    B: {"runtime": "command", "command": ["true"]},
}
REF = "red team round 25b: "
REFUSED_LINE = "refused {path} (see its line above); it starts again once the file changes"


@pytest.fixture
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(SPECS))


def log_text(h: HiveProcess) -> str:
    return h.log_path.read_text(errors="replace")


# ptrace on x86-64 (no gdb on a fresh machine): the live core made to call exit_group itself.
PTRACE_PEEKTEXT, PTRACE_GETREGS, PTRACE_SETREGS, PTRACE_ATTACH, PTRACE_DETACH = 1, 12, 13, 16, 17
_REGS = ["r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs"]
class _Regs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_ulonglong) for n in _REGS]
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long
SYSCALL_INSN = 0x050F  # x86-64 `syscall`, little-endian
EXIT_GROUP = 231

def _force_exit(pid: int, status: int, tries: int = 200) -> None:
    """Make ``pid`` call exit_group(status) itself, as its own code could (ptrace, x86-64):
    stopped while it waits in a system call, its registers are set to make that call again
    as exit_group."""
    for _ in range(tries):
        if _libc.ptrace(PTRACE_ATTACH, pid, None, None) != 0:
            raise OSError(ctypes.get_errno(), "PTRACE_ATTACH")
        os.waitpid(pid, 0x40000000)  # __WALL: its stop
        regs = _Regs()
        if _libc.ptrace(PTRACE_GETREGS, pid, None, ctypes.byref(regs)) != 0:
            raise OSError(ctypes.get_errno(), "PTRACE_GETREGS")
        ctypes.set_errno(0)
        word = _libc.ptrace(PTRACE_PEEKTEXT, pid, ctypes.c_void_p(regs.rip - 2), None)
        if (word & 0xFFFF) == SYSCALL_INSN and regs.orig_rax != 2**64 - 1:
            regs.rip -= 2
            regs.rax = EXIT_GROUP
            regs.orig_rax = EXIT_GROUP
            regs.rdi = status
            if _libc.ptrace(PTRACE_SETREGS, pid, None, ctypes.byref(regs)) != 0:
                raise OSError(ctypes.get_errno(), "PTRACE_SETREGS")
            _libc.ptrace(PTRACE_DETACH, pid, None, None)
            return
        _libc.ptrace(PTRACE_DETACH, pid, None, None)
        time.sleep(0.01)
    raise RuntimeError(f"{pid} was never found in a system call")


def make_core_exit(h: HiveProcess, status: int) -> int:
    """The live core calls ``exit_group(status)`` (root through ptrace: what a compromised
    core's own code could call). Returns the pid that exited."""
    pid = h.core_pid()
    assert pid is not None, h.log_tail()
    _force_exit(pid, status)
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or h.core_pid() != pid, 30,
               f"core {pid} to exit")
    return pid


def wait_refused(h: HiveProcess) -> None:
    line = REFUSED_LINE.format(path=h.config_path)
    wait_until(lambda: line in log_text(h), 20, f"hive up's line {line!r}\n{h.log_tail()}")


def raw_host_call(h: HiveProcess, timeout: float = 3.0) -> str:
    """One agent_status line on host.sock; what answered, or why none did."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(h.host_sock))
            s.sendall(b'{"cmd": "agent_status"}\n')
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data.decode(errors="replace")
    except OSError as e:
        return f"no answer: {type(e).__name__}"


_libc = ctypes.CDLL(None, use_errno=True)
SYS_PIDFD_GETFD = 438


def listener_of(pid: int, path: Path) -> int:
    """A copy of the listening socket ``pid`` holds bound at ``path`` (root's
    ``pidfd_getfd``): what a compromised core hands a helper of its own."""
    pidfd = os.pidfd_open(pid)
    try:
        for entry in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{entry}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = _libc.syscall(SYS_PIDFD_GETFD, pidfd, int(entry), 0)
            if fd < 0:
                continue
            s = socket.socket(fileno=fd)
            try:
                if (s.family == socket.AF_UNIX and s.getsockname() == str(path)
                        and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                    return s.detach()
            except OSError:
                pass
            s.close()
    finally:
        os.close(pidfd)
    raise AssertionError(f"no listener at {path} in {pid}")


# A helper of the compromised core's ids, in a session of its own, serving host.sock on
# the listener's copy it was handed: every operator request gets its answer.
LEFTOVER = r"""
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
s.setblocking(True)
while True:
    c, _ = s.accept()
    try:
        c.settimeout(2)
        c.recv(65536)
        c.sendall(b'{"ok": true, "agent_statuses": [], "answered_by": "a leftover of the core"}\n')
    except OSError:
        pass
    finally:
        c.close()
"""


@contextlib.contextmanager
def core_helper(h: HiveProcess) -> Iterator[subprocess.Popen[bytes]]:
    """A process of the core's ids serving a copy of the live core's host.sock listener
    (what a compromised core could leave behind), killed at the end whatever happened."""
    uid, _ = h.core_ids
    core = h.core_pid()
    assert core is not None
    fd = listener_of(core, h.host_sock)
    helper = subprocess.Popen(
        [sys.executable, "-c", LEFTOVER, str(fd)], pass_fds=(fd,), start_new_session=True,
        stdin=subprocess.DEVNULL, **h.as_core(),
    )
    os.close(fd)
    try:
        wait_until(lambda: helper.pid in processes_of(uid), 10, "the helper to run as the core")
        yield helper
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(helper.pid, signal.SIGKILL)
        helper.wait(10)


@pytest.mark.attack("launcher.core-leftovers", ref=REF + "a compromised core exits 78 and its helper keeps host.sock")
def test_a_core_that_exits_78_leaves_nothing_of_its_ids_running(hive: HiveProcess) -> None:
    h = hive
    uid, _ = h.core_ids
    with core_helper(h):
        make_core_exit(h, 78)
        wait_refused(h)
        # Before the change: a restart within 0.1 s, and the kill of its ids' processes
        # first; 1 s is ten times that (3 s before: the same check, two seconds later).
        time.sleep(1.0)
        assert h.core_pid() is None, "hive up started the core again without a change of hive.toml"
        left = processes_of(uid)
        answer = raw_host_call(h)
        print(f"left of uid {uid}: {left}; host.sock answered: {answer!r}")
        # The safe behaviour: nothing of the core's ids outlives the core, and host.sock
        # is answered by no process of a dead core's.
        assert left == [], f"processes of the core's uid {uid} still running: {left}; host.sock: {answer!r}"
        assert "a leftover of the core" not in answer


@pytest.mark.attack("launcher.core-leftovers", ref=REF + "the control: a core exiting 1 has its helper killed at the restart")
def test_a_core_that_exits_1_has_what_it_left_killed_at_once(hive: HiveProcess) -> None:
    """The same helper, the core exiting with status 1: restarted within 0.1 s, its ids'
    processes killed first and host.sock bound afresh (what the 78 above no longer gets)."""
    h = hive
    core = h.core_pid()
    with core_helper(h) as helper:
        make_core_exit(h, 1)
        assert helper.wait(10) == -signal.SIGKILL
        wait_until(lambda: (p := h.core_pid()) is not None and p != core, 20, "the core back")
        h.wait_running(timeout=30)
        answer = raw_host_call(h, timeout=10)
        assert "a leftover of the core" not in answer and '"ok": true' in answer.replace('"ok":true', '"ok": true'), answer
        assert "killed 1 process(es) a core of this hive left running" in log_text(h)


IN_CLOSE_NOWRITE = 0x10


def after_next_read(path: Path, then: Any, timeout: float = 30.0) -> None:
    """Call ``then()`` as soon as a process has read ``path`` and closed it (inotify)."""
    libc = ctypes.CDLL(None, use_errno=True)
    ifd = libc.inotify_init1(os.O_CLOEXEC)
    assert ifd >= 0
    try:
        assert libc.inotify_add_watch(ifd, str(path).encode(), IN_CLOSE_NOWRITE) >= 0
        ready, _, _ = select.select([ifd], [], [], timeout)
        assert ready, f"nobody read {path} within {timeout:.0f} s"
        then()
    finally:
        os.close(ifd)


@pytest.mark.attack("launcher.core-refused", ref=REF + "hive.toml fixed between the core's read and hive up's first look")
def test_a_fix_saved_while_the_core_refuses_starts_it_again(hive: HiveProcess) -> None:
    h = hive
    good = h.config_path.read_text()
    h.config_path.write_text(good + "\n[[[ not toml\n")
    pid = h.core_pid()
    assert pid is not None
    fixer = threading.Thread(target=after_next_read, args=(h.config_path, lambda: h.config_path.write_text(good)))
    fixer.start()
    os.kill(pid, signal.SIGKILL)  # restarted at once: the new core reads the broken file
    fixer.join(40)
    wait_refused(h)
    assert "not valid TOML" in log_text(h)
    assert tomllib_ok(h.config_path)
    # The file the core refused is not the file there now: the operator's fix is in.
    # Safe: the core is started again (it would take the fixed file).
    try:
        wait_until(h.core_pid, 10, "the core to start again on the fixed hive.toml")
    finally:
        print(h.log_tail(8))
    h.wait_running(timeout=30)


def tomllib_ok(path: Path) -> bool:
    import tomllib

    tomllib.loads(path.read_text())
    return True


@pytest.mark.attack("launcher.core-refused", ref=REF + "hive up waiting for hive.toml still stops on SIGTERM")
def test_hive_up_stops_cleanly_while_it_waits_for_hive_toml() -> None:
    h = HiveProcess(SPECS)
    h.start()
    try:
        uid, _ = h.core_ids
        make_core_exit(h, 78)
        wait_refused(h)
        for _ in range(30):  # 3 s: no start meanwhile (the change: not every 10 s, not at once)
            assert h.core_pid() is None, h.log_tail()
            time.sleep(0.1)
        assert h.proc is not None and h.proc.poll() is None
        t0 = time.monotonic()
        h.proc.send_signal(signal.SIGTERM)
        rc = h.proc.wait(30)
        took = time.monotonic() - t0
        print(f"hive up stopped in {took:.2f} s, status {rc}")
        assert rc == 0, h.log_tail()
        assert took < 15, f"hive up took {took:.1f} s to stop while it waited"
        h.assert_cages_empty()
        assert processes_of(uid) == []
        for name in ("host.sock", "core.sock", "priv.sock"):
            assert not (h.run_dir / name).exists(), name
        assert "starting hive-core again" not in log_text(h)
    finally:
        if h.running:
            h.kill_everything()
        h.cleanup()


@pytest.mark.attack("launcher.core-refused", ref=REF + "a change of hive.toml starts the core; a killed one still backs off")
def test_a_refused_core_starts_on_a_change_and_a_killed_one_is_restarted(hive: HiveProcess) -> None:
    h = hive
    first = make_core_exit(h, 78)
    wait_refused(h)
    time.sleep(2.5)
    assert h.core_pid() is None, h.log_tail()
    # The operator saves hive.toml (the same text: its times change).
    h.config_path.write_text(h.config_path.read_text())
    back = wait_until(h.core_pid, 15, "the core to start again after hive.toml changed")
    assert back != first
    assert f"{h.config_path} changed: starting hive-core again" in log_text(h)
    h.wait_running(timeout=30)
    # A core killed by another signal: restarted, with the backoff's line, as before.
    for _ in range(2):
        pid = h.core_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda pid=pid: (p := h.core_pid()) is not None and p != pid, 20,
                   f"the core killed ({pid}) to be restarted\n{h.log_tail()}")
        h.wait_running(timeout=30)
    assert len(re.findall(r"hive-core exited with status -9; restarting in 0\.1 s", log_text(h))) >= 2


# In the cage: hive.toml by its host path and through /proc; a spawn of the declared peer's
# name, and of a new name (left pending).
HIVE_TOML = r"""
out = {}
for p in (P["toml"], "/proc/1/root" + P["toml"], "/proc/self/root" + P["toml"], P["dir"]):
    try:
        os.stat(p)
        out[p] = "reached"
    except OSError as e:
        out[p] = errname(e)
def spawn(name):
    payload = {"name": name, "spec": {"runtime": "command", "command": ["true"]}}
    return call({"cmd": "request_approval", "kind": "spawn", "description": "d", "payload": payload})
out["declared"] = spawn(P["declared"])
out["new"] = spawn("r25bnew")
result(**out)
"""


@pytest.mark.attack("launcher.core-refused", ref=REF + "an agent can't make the core refuse hive.toml")
def test_an_agent_cannot_make_the_core_refuse_hive_toml(hive: HiveProcess) -> None:
    h = hive
    got = cage_run(h, A, HIVE_TOML, toml=str(h.config_path), dir=str(h.config_path.parent), declared=B)
    print(got)
    toml = str(h.config_path)
    expected = {toml: "ENOENT", "/proc/1/root" + toml: "EACCES",  # init's (root's) /proc
                "/proc/self/root" + toml: "ENOENT", str(h.config_path.parent): "ENOENT"}
    assert {p: got[p] for p in expected} == expected
    assert got["declared"]["ok"] is False
    assert got["declared"]["error"] == f"spawn payload: an agent named '{B}' already exists"
    assert got["new"]["ok"] is True, got["new"]
    pid = h.core_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: (p := h.core_pid()) is not None and p != pid, 20, "the core back")
    h.wait_running(timeout=30)
    assert "refused" not in log_text(h).split("hive-core exited with status -9")[-1]
    pending = h.host_call("pending")
    assert pending["ok"], pending
    assert "r25bnew" in str(pending)


# -- page-cache residency -----------------------------------------------------------------

# A file of the host's /usr that nothing maps or reads (the cage's /usr is an overlay of it).
CACHE_FILE = "/usr/share/vim/vim90/doc/version5.txt"

NOWAIT = r"""
fd = os.open(P["file"], os.O_RDONLY)
b = bytearray(4096)
out = []
for off in P["offsets"]:
    try:
        out.append(os.preadv(fd, [b], off, os.RWF_NOWAIT))
    except OSError as e:
        out.append(errname(e))
result(seen=out)
"""


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.attack("observe.host-activity", ref=REF + "page-cache residency by preadv2(RWF_NOWAIT)")
def test_a_cage_cannot_tell_what_the_host_has_read(hive: HiveProcess) -> None:
    h = hive
    if not os.path.isfile(CACHE_FILE):
        pytest.fail(f"{CACHE_FILE} is not on this host: pick another file of /usr")
    size = os.path.getsize(CACHE_FILE)
    offsets = [0, size // 2, size - 1]
    evict(CACHE_FILE)
    before = cage_run(h, A, NOWAIT, file=CACHE_FILE, offsets=offsets)["seen"]
    with open(CACHE_FILE, "rb") as f:  # the host reads it (an operator's `less`, a build)
        f.read()
    after = cage_run(h, A, NOWAIT, file=CACHE_FILE, offsets=offsets)["seen"]
    evict(CACHE_FILE)
    print(f"before the host's read: {before}; after: {after}")
    # The cage's /usr is an overlay, which has no nowait reads: refused whatever the host
    # read (on the host's own file the same calls say EAGAIN, then 4096: resident).
    assert before == after == ["ENOTSUP"] * 3

"""Red team re-check of session 16's fixes (after tests/redteam/test_red_diff16.py):
``kill_all_of`` before each core start and after stop, the handed listeners bound afresh,
the core's stderr relayed, the page's web.sock handed through bwrap to init and the
harness (HIVE_PAGE_FD), bwrap's options from a memfd, the adoption's gate. One hive
(``rc16``) serves the module; the cases that stop it come last.

Run against main at 30f217e. Broke:
- ``kill_all_of``'s killer runs as the core's uid, so a process the compromised core
  left (its ids, its own session) may signal it: it watches /proc, SIGKILLs the killer
  before its kill(-1) (its exit status is not looked at) and lives on, at a core restart
  and at `hive up`'s stop; it then takes the next core's new host.sock and core.sock
  listeners with pidfd_getfd (the shim and the core are dumpable until the core's prctl).
  With SIGSTOP instead, `hive up` waits on the killer forever: no core.
- a regular file with two links of the legacy ``hive-core``'s at the state dir's top is
  never adopted, so the adoption's gate never closes: a tree past MAX_DEPTH the new core
  plants in its own files then stops every later `hive up`.
- (hardening) an exec'd harness holds the page listener inheritable (``keep=``).

Held: the runtime reaches no copy of the page listener (its fds, /proc/PID/fd,
pidfd_getfd, env; also after a harness restart); nothing the runtime can read in the
cage (bwrap's cmdline, environ, maps, fds, /proc/PID/mem) names the run or state dir;
the stderr relay stays bounded and escaped (a 10 MiB line, escapes); kill(-1) takes a
fork chain of the core's ids whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HIVE, HiveProcess, probe_result, proc_cmdline, wait_until

PY = str(HIVE.parent / "python")
NAME = "rc16"


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    h = HiveProcess({NAME: {"runtime": "command", "command": ["sleep", "3600"]}})
    try:
        h.start()
        h.wait_running()
        yield h
    finally:
        try:
            if h.running:
                h.stop()
        finally:
            h.kill_everything()
            h.cleanup()


def _restart_core(h: HiveProcess) -> int:
    old = h.core_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    new = wait_until(lambda: (p := h.core_pid()) and p != old and p, 40, "the core's restart")
    wait_until(lambda: h.host_call("agent_status").get("ok"), 40, "host.sock to answer again")
    return int(new)


# A process a compromised core leaves behind (its ids, a session of its own). It watches
# /proc for a new process of its uid that is `hive up`'s killer (python -c "...os.kill(-1,
# SIGKILL)...") and SIGKILLs it first: the killer starts as the core's uid, so the
# leftover may signal it, and python takes tens of milliseconds to reach its kill(-1).
# kill_all_of ignores how its killer ended.
KILLS_THE_KILLER = r"""
import ctypes, os, signal, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
tried, stolen = set(), []
out = open(1, "w", buffering=1, closefd=False)
uid = os.getuid()
me = os.getpid()
old = {int(p) for p in os.listdir("/proc") if p.isdigit()}
first_seen = {}
out.write("ready\n")
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    now = time.monotonic()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        pid = int(p)
        if pid in old or pid == me:
            continue
        if now - first_seen.setdefault(pid, now) > 5:
            old.add(pid)
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
            real = int(status.split("\nUid:", 1)[1].split()[0])
            if real != uid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if b"hyperhive" in cmd and pid not in tried:  # the next core (its shim, then itself)
            tried.add(pid)
            pfd = libc.syscall(434, pid, 0)  # pidfd_open
            if pfd >= 0:
                for n in range(3, 16):
                    got = libc.syscall(438, pfd, n, 0)  # pidfd_getfd
                    if got < 0:
                        continue
                    try:
                        s = socket.socket(fileno=got)
                        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                            stolen.append(s)
                            out.write(f"stole listener {s.getsockname()!r} from {pid}\n")
                        else:
                            s.close()
                    except OSError:
                        os.close(got)
                os.close(pfd)
        if b"os.kill(-1" in cmd:
            try:
                os.kill(pid, getattr(signal, sys.argv[3]))
                out.write(f"{sys.argv[3]} to the killer {pid}\n")
            except OSError as e:
                out.write(f"could not kill {pid}: {e}\n")
            old.add(pid)
    time.sleep(0.001)
"""


@pytest.mark.attack(
    "privsep.core-misuse", ref="session 16 re-check: kill_all_of's killer killed by the leftover"
)
def test_a_leftover_that_kills_the_killer_does_not_outlive_a_core_restart(
    hive: HiveProcess, tmp_path: Path
) -> None:
    """``kill_all_of`` runs ``python -c 'os.kill(-1, SIGKILL)'`` as the core's uid and
    awaits it, not looking at how it ended. A process the compromised core left (its own
    session, its ids) sees the killer appear in /proc (its uid: it may read its status
    and cmdline) and SIGKILLs it before its kill(-1). The core is restarted: the leftover
    must be dead once the new core serves (else it owns the new core: same ids, and the
    core is dumpable until its prctl; it can take host.sock's new listener)."""
    log = tmp_path / "leftover.log"
    with open(log, "wb") as sink:  # its stdout: the file is root's
        left = subprocess.Popen(
            [PY, "-I", "-S", "-c", KILLS_THE_KILLER, "-", "60", "SIGKILL"],
            cwd="/", start_new_session=True, stdin=subprocess.DEVNULL, stdout=sink,
            **hive.as_core(),
        )  # fmt: skip
    try:
        wait_until(lambda: "ready" in log.read_text(), 20, "the leftover to watch")
        _restart_core(hive)
        time.sleep(1.0)
        alive = left.poll() is None
        print(log.read_text())
    finally:
        left.kill()
        left.wait()
    assert not alive, (
        "a process left with the core's ids killed kill_all_of's killer and outlived the "
        f"core's restart: {log.read_text()!r}"
    )
    assert "stole" not in log.read_text(), log.read_text()


PAGE_PROBE = r"""
import errno, os, socket
def socks_of(pid):
    out = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
    for f in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{f}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out[f] = int(link[8:-1])
    return out
seen = {p: socks_of(p) for p in os.listdir("/proc") if p.isdigit()}
mine = []
for f in os.listdir("/proc/self/fd"):
    try:
        s = socket.socket(fileno=int(f))
    except OSError:
        continue
    try:
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            mine.append(int(f))
    except OSError:
        pass
    finally:
        s.detach()
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
got = {}
for pid in (1, 2, 3):
    pfd = libc.syscall(434, pid, 0)  # pidfd_open
    if pfd < 0:
        got[pid] = "open:" + errno.errorcode.get(ctypes.get_errno(), "?")
        continue
    res = []
    for n in range(3, 12):
        r = libc.syscall(438, pfd, n, 0)  # pidfd_getfd
        res.append(r if r >= 0 else errno.errorcode.get(ctypes.get_errno(), "?"))
    got[pid] = res
result(seen=seen, mine=mine, env=sorted(k for k in os.environ if "PAGE" in k), got=got)
"""


def _page_inode(h: HiveProcess) -> int:
    """The page's listener: bound by hive-priv through /proc/self/fd/N/web.sock, so found
    as the listening socket of that name a process of the cage holds (init, since session
    25; init and each harness before)."""
    held = set()
    for pid in h.cage_procs(NAME):
        for f in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{f}")
                if link.startswith("socket:["):
                    held.add(int(link[8:-1]))
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[7].endswith("/web.sock") and int(f[6]) in held:
            return int(f[6])
    raise AssertionError(f"no web.sock listener in {NAME}'s cage")


def _runtime_reaches_page(h: HiveProcess) -> list[str]:
    inode = _page_inode(h)
    res: dict[str, Any] = probe_result(h.probe(NAME, PAGE_PROBE))
    wrong = []
    for pid, socks in res["seen"].items():
        if isinstance(socks, dict) and inode in socks.values():
            wrong.append(f"the page's listener readable at /proc/{pid}/fd")
    if res["mine"]:
        wrong.append(f"the runtime holds listeners {res['mine']}")
    if res["env"]:
        wrong.append(f"the runtime has {res['env']}")
    for pid, r in res["got"].items():
        if isinstance(r, list) and any(isinstance(x, int) for x in r):
            wrong.append(f"pidfd_getfd of cage pid {pid} gave descriptors: {r}")
    return wrong


@pytest.mark.attack(
    "reach.other-surfaces", ref="session 16 re-check: HIVE_PAGE_FD from the runtime"
)
def test_the_runtime_reaches_no_copy_of_the_page_listener_even_after_a_harness_restart(
    hive: HiveProcess,
) -> None:
    """web.sock's listener is init's and the harness's. The runtime (a probe run as the
    agent's processes are) must hold none, see none in any /proc/PID/fd it can read, have
    no HIVE_PAGE_FD, and take none with pidfd_getfd; also after the harness was killed
    and init exec'd a new one (``keep=`` makes the descriptor inheritable in it)."""
    wrong = _runtime_reaches_page(hive)
    old = hive.harness_pid(NAME)
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: (p := _harness(hive)) and p != old, 30, "init to exec a new harness")
    time.sleep(1.0)
    wrong += [f"after restart: {w}" for w in _runtime_reaches_page(hive)]
    assert not wrong, wrong


def _harness(h: HiveProcess) -> int | None:
    try:
        return h.harness_pid(NAME)
    except (AssertionError, Exception):
        return None


@pytest.mark.attack(
    "privsep.core-misuse", ref="session 16 re-check: the page listener in the harness"
)
def test_an_execd_harness_keeps_the_page_listener_close_on_exec(hive: HiveProcess) -> None:
    """The first harness (init's fork) inherits init's close-on-exec page descriptor; a
    restarted one is exec'd with ``keep=`` (inheritable) and wrapped it with
    ``socket.socket(fileno=)``, which left it inheritable: anything it exec'd would get
    the operator's page listener. (Hardening: the harness execs nothing today.) Since
    session 25 no harness holds the listener (init hands it each connection on a page
    pair): the exec'd harness holds no listener, and its pair is close-on-exec."""
    old = _harness(hive)
    assert old
    os.kill(old, signal.SIGKILL)
    pid = wait_until(lambda: (p := _harness(hive)) and p != old and p, 30, "a new harness")
    time.sleep(0.5)
    inode = _page_inode(hive)
    held = [f for f in os.listdir(f"/proc/{pid}/fd")
            if os.readlink(f"/proc/{pid}/fd/{f}") == f"socket:[{inode}]"]
    assert held == [], "the harness holds the page listener"
    env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
    fd = env["HIVE_PAGE_FD"]
    assert os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")
    flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
    assert flags & 0o2000000, f"the harness's page pair is inheritable (flags {flags:o})"


def _answers(h: HiveProcess) -> bool:
    try:
        return bool(h.host_call("agent_status").get("ok"))
    except OSError:
        return False


def _killers_of(uid: int) -> list[int]:
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            with contextlib.suppress(OSError):
                st = Path(f"/proc/{p}/status").read_text()
                if int(st.split("\nUid:", 1)[1].split()[0]) == uid and "os.kill(-1" in " ".join(
                    proc_cmdline(int(p))
                ):
                    found.append(int(p))
    return found


@pytest.mark.attack(
    "launcher.readiness", ref="session 16 re-check: kill_all_of's killer stopped by the leftover"
)
def test_a_leftover_that_stops_the_killer_does_not_hang_the_cores_restart(
    hive: HiveProcess, tmp_path: Path
) -> None:
    """As above, but the leftover sends the killer SIGSTOP: ``kill_all_of`` awaits it with
    no timeout, so `hive up` waits forever before the core's start (the hive has no
    core, hence no operator socket, until root kills the stopped process by hand)."""
    log = tmp_path / "leftover.log"
    uid, _ = hive.core_ids
    with open(log, "wb") as sink:
        left = subprocess.Popen(
            [PY, "-I", "-S", "-c", KILLS_THE_KILLER, "-", "60", "SIGSTOP"],
            cwd="/", start_new_session=True, stdin=subprocess.DEVNULL, stdout=sink,
            **hive.as_core(),
        )  # fmt: skip
    back = False
    try:
        wait_until(lambda: "ready" in log.read_text(), 20, "the leftover to watch")
        old = hive.core_pid()
        assert old
        os.kill(old, signal.SIGKILL)
        try:
            wait_until(lambda: (p := hive.core_pid()) and p != old, 15, "the core's restart")
            back = True
        except AssertionError:
            pass
        print(log.read_text())
    finally:
        left.kill()
        left.wait()
        for pid in _killers_of(uid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: _answers(hive), 60, "the core back")
    assert back, f"`hive up` hung before the core's restart: {log.read_text()!r}"


@pytest.mark.attack("launcher.readiness", ref="session 16 re-check: the core's stderr relayed")
def test_the_relay_of_the_cores_stderr_stays_bounded_and_escaped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a compromised core writes on its stderr reaches root's: a 10 MiB line with no
    newline (in pipe-sized pieces, as the pipe gives it, and at once), an escape sequence,
    then a plain line. The relay must go on (a later line still shown), show nothing
    unescaped, and never hold or print more than about one reader's limit a line."""
    import io

    from hyperhive.cli.up import RELAY, Supervised

    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    core = Supervised("hive-core", ["/bin/true"], None)

    async def run(chunked: bool) -> None:
        reader = asyncio.StreamReader(limit=2**16)
        relay = asyncio.ensure_future(core._relay(reader))
        blob = b"A" * (10 << 20)
        if chunked:
            for i in range(0, len(blob), 1 << 16):
                reader.feed_data(blob[i : i + (1 << 16)])
                await asyncio.sleep(0)
                assert len(reader._buffer) <= 3 << 16, len(reader._buffer)
        else:
            reader.feed_data(blob)
        reader.feed_data(b"\x1b]0;owned\x07\x1b[2Jred\r\nplain line\n")
        reader.feed_eof()
        await asyncio.wait_for(relay, 20)

    for chunked in (True, False):
        out.seek(0)
        out.truncate()
        asyncio.run(run(chunked))
        RELAY.drain(10)  # written by the relay's thread (session 17)
        text = out.getvalue()
        assert "plain line" in text, text[-300:]
        assert all(line.startswith("hive-core: ") for line in text.splitlines()), text[:300]
        assert "\x1b" not in text and "\x07" not in text and "\r" not in text
        assert max(len(line) for line in text.splitlines()) <= 4 * (1 << 16)


# Root (a subreaper, so the chain's exited parents are reaped here, not by the host's
# pid 1) forks a chain of processes of the core's ids whose pid changes all the time:
# each forks and exits at once. kill(-1) must take the chain in one go.
CHURN = r"""
import ctypes, os, sys, time
uid, gid = int(sys.argv[1]), int(sys.argv[2])
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
if os.fork() == 0:
    os.setsid()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    end = time.monotonic() + 40
    while time.monotonic() < end:
        if os.fork():
            os._exit(0)
        time.sleep(0.0005)
    os._exit(0)
print("churning", flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
print("chain ended", flush=True)
"""


def _kill_chain(h: HiveProcess, uid: int) -> None:
    core = h.core_pid()
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == core:
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            st = Path(f"/proc/{p}/status").read_text()
            real = int(st.split("\nUid:", 1)[1].split()[0])
            if real == uid and "hyperhive" not in " ".join(proc_cmdline(int(p))):
                os.kill(int(p), signal.SIGKILL)


@pytest.mark.attack("privsep.core-misuse", ref="session 16 re-check: kill(-1) against a fork chain")
def test_a_fork_chain_of_the_cores_ids_does_not_survive_a_core_restart(hive: HiveProcess) -> None:
    """A leftover that never keeps its pid (each generation forks and exits) against
    `hive up`'s kill(-1) before the core's restart: none of the chain may live on."""
    uid, gid = hive.core_ids
    ended = False
    reaper = subprocess.Popen(
        [PY, "-I", "-S", "-c", CHURN, str(uid), str(gid)],
        stdout=subprocess.PIPE, text=True, cwd="/",
    )  # fmt: skip
    try:
        assert reaper.stdout is not None
        assert reaper.stdout.readline().strip() == "churning"
        time.sleep(0.3)
        _restart_core(hive)
        try:
            reaper.wait(5)
            ended = True
        except subprocess.TimeoutExpired:
            pass
    finally:
        deadline = time.monotonic() + 45
        while reaper.poll() is None and time.monotonic() < deadline:
            _kill_chain(hive, uid)  # every process of the core's ids but the core's own
            time.sleep(0.01)
        reaper.kill()
        reaper.wait()
    assert ended, "a fork chain of the core's ids outlived kill(-1) and the core's restart"


PROC_PROBE = r"""
import errno, os
found, opened = [], {}
needles = [n.encode() for n in P["needles"]]
def look(pid, what, data):
    for n in needles:
        if n in data:
            found.append(f"/proc/{pid}/{what} names {n.decode()}")
for p in sorted(x for x in os.listdir("/proc") if x.isdigit() and x != str(os.getpid())):
    for what in ("cmdline", "environ", "maps", "fd"):
        try:
            if what == "fd":
                links = []
                for f in os.listdir(f"/proc/{p}/fd"):
                    try:
                        links.append(os.readlink(f"/proc/{p}/fd/{f}"))
                    except OSError:
                        pass
                data = "\n".join(links).encode()
                if "memfd:" in data.decode() and p != str(os.getpid()):
                    found.append(f"/proc/{p}/fd holds {[x for x in links if 'memfd' in x]}")
            else:
                with open(f"/proc/{p}/{what}", "rb") as f:
                    data = f.read()
            opened.setdefault(p, []).append(what)
            look(p, what, data)
        except OSError:
            pass
    try:
        with open(f"/proc/{p}/maps") as f:
            regions = [l.split()[0].split("-") for l in f if " rw" in l]
        with open(f"/proc/{p}/mem", "rb", buffering=0) as m:
            for lo, hi in regions[:200]:
                try:
                    m.seek(int(lo, 16))
                    look(p, "mem", m.read(min(int(hi, 16) - int(lo, 16), 1 << 24)))
                except OSError:
                    pass
        opened.setdefault(p, []).append("mem")
    except OSError:
        pass
cmds = {}
for p in opened:
    try:
        cmds[p] = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")[:4]
    except OSError:
        pass
result(found=found, opened=opened, me=os.getpid(), cmds={k: [x.decode() for x in v] for k, v in cmds.items()})
"""


@pytest.mark.attack("reach.other-surfaces", ref="session 16 re-check: bwrap --args from the cage")
def test_no_process_in_the_cage_gives_the_runtime_the_host_paths_bwrap_was_given(
    hive: HiveProcess,
) -> None:
    """bwrap now takes its options from a memfd (--args): its cmdline no longer names the
    run and state dirs. The runtime reads what it can of every process in the cage (pid 1
    is bwrap): cmdline, environ, maps, the memfd among its descriptors, its memory
    (/proc/PID/mem: a file, not the ptrace syscall seccomp refuses). None may name the
    host's run dir, state dir or the hive's base directory."""
    needles = [str(hive.run_dir), str(hive.state_dir), str(hive.base)]
    res = probe_result(hive.probe(NAME, PROC_PROBE, needles=needles))
    print(res["opened"], res["cmds"], res["me"])
    assert not res["found"], res["found"]


@pytest.mark.attack(
    "privsep.core-misuse", ref="session 16 re-check: kill_all_of's killer killed at stop"
)
def test_a_leftover_that_kills_the_killer_does_not_outlive_hive_up_stop(
    hive: HiveProcess, tmp_path: Path
) -> None:
    """Last (it stops the hive). The same leftover at `hive up`'s stop: the killer run
    after the core has stopped is SIGKILLed by it first; `hive up` exits 0 and the
    process of the core's ids lives on ("nothing of a compromised core outlives it"),
    waiting for the next start of the hive (same ids: core.id)."""
    log = tmp_path / "leftover.log"
    with open(log, "wb") as sink:
        left = subprocess.Popen(
            [PY, "-I", "-S", "-c", KILLS_THE_KILLER, "-", "60", "SIGKILL"],
            cwd="/", start_new_session=True, stdin=subprocess.DEVNULL, stdout=sink,
            **hive.as_core(),
        )  # fmt: skip
    try:
        wait_until(lambda: "ready" in log.read_text(), 20, "the leftover to watch")
        rc = hive.stop()
        time.sleep(0.5)
        alive = left.poll() is None
        print(rc, log.read_text())
    finally:
        left.kill()
        left.wait()
    assert not alive, f"a process of the core's ids outlived `hive up`'s stop: {log.read_text()!r}"


@pytest.mark.attack(
    "launcher.readiness", ref="session 16 re-check: adoption's gate held open by a linked file"
)
def test_an_unadoptable_legacy_entry_and_a_deep_tree_do_not_stop_every_start(
    hive: HiveProcess,
) -> None:
    """After the stop above. The adoption walks the whole state dir at each `hive up`
    while some top-level entry is an earlier core's; a regular file with two links is
    never adopted. The shared legacy ``hive-core`` (every hive's core before the upgrade)
    leaves one at the top: a file of its own linked twice (it may link its own files).
    The gate then never closes, and the new core plants a tree past MAX_DEPTH anywhere in
    its own files: every later `hive up` refuses ("move it away"), or, with a flat
    directory of millions of entries, walks them all at each start."""
    import pwd

    legacy = pwd.getpwnam("hive-core")
    if hive.running:
        hive.stop()
    uid, gid = hive.core_ids
    a, b = hive.state_dir / "legacy-a", hive.state_dir / "legacy-b"
    a.write_text("x")
    os.chown(a, legacy.pw_uid, legacy.pw_gid)
    os.link(a, b)
    plant = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
for _ in range(4200):
    os.mkdir("d", dir_fd=fd)
    nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    os.close(fd)
    fd = nfd
"""
    top = hive.state_dir / "secrets" / "rc16-deep"
    top.parent.mkdir(exist_ok=True)
    top.mkdir()
    os.chown(top, uid, gid)
    subprocess.run([PY, "-I", "-c", plant, str(top)], check=True, cwd="/", **hive.as_core())
    try:
        try:
            hive.start()
            started, why = True, ""
        except AssertionError:
            started, why = False, hive.log_tail(4)
    finally:
        subprocess.run(["rm", "-rf", str(top)], check=True)
        for f in (a, b):
            f.unlink(missing_ok=True)
    assert started, f"hive up no longer starts: {why}"

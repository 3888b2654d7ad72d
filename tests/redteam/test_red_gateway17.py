"""Red team of session 17's change: each hive's gateway has ids of its own (the second id
of its core's registry block), nginx's master starts through ``cli/gateway_users.py`` in
a mount namespace of its own (a slave of the host's) where ``hive-gateway`` means those
ids, core.sock, ``ui/NAME`` and web.sock are that gid's, and the gateway's leftovers are
killed before each start of nginx and after the stop.

Played as: a compromised nginx worker of one hive (its uid and gid read from a live
worker, ``as_user``), a compromised hive-core (``HiveProcess.core_ids``), and root's view
of what the new mount namespace keeps. Run against 08dc2ed.

Broke (each fails on 08dc2ed; fixed in session 17 but the cookies, a strict xfail: nginx's
master is no longer root nor in a namespace of its own (`hive up` binds its port and
hands it in, ``NGINX=FD;``; no ``user`` directive, no name to look up, no namespace to pin
mounts), every start looks the core's and the gateway's ids up one by one and claims new
ones if the host gave any away since, `hive up` runs under umask 022 and ``gateway/tmp``
is the gateway ids' 0700):
- the gateway's mount namespace is a copy of the host's mounts at nginx's start; on a
  host whose mounts are private (here ``/`` is private, as in most containers) a mount
  the host later detaches stays mounted in every gateway namespace that copied it:
  another hive's ``run/agents`` tmpfs outlives that hive's stop, and a filesystem the
  operator unmounts stays busy, for as long as this hive's nginx runs (new with the
  change: nginx ran in the host's namespace);
- the gateway ids are checked against host accounts and subordinate ranges only when
  the registry hands out the core's block: an account or a user's subordinate range
  made since (useradd -u, sssd's ids from 200000, useradd's next 65536 subordinate ids)
  has the gateway run as that account's uid at the next start (the core's ids alike);
- cookies are per host, not per port: the operator's ``hive_session`` for hive A is sent
  to hive B's gateway on the same 127.0.0.1, where B's compromised worker (or B's core,
  which gets the Cookie header on core.sock) replays it to A's gateway over TCP: A's
  dashboard, its CSRF token, and an action on A's agent (paused). The per-hive ids stop
  B's workers at A's sockets, not at A (pre-existing; not closed by the change);
- ``gateway/config.write`` makes run/gateway/tmp under root's umask and never sets its
  mode: under ``umask 000`` it is 0777, the worker swaps its temp dir tmp/body for a
  link, and nginx's master (root) chowns to the gateway uid and chmods u+rwx whatever the
  link names at its next start or reload (the core may ask ``reload_gateway``): a root
  file given to the worker (pre-existing; in the function the change rewrote).

Held: one hive's workers reach nothing of another hive (sockets, run/gateway files and
temp dirs, ui dirs, its nginx master and workers: signals, /proc, ptrace, pidfd_getfd),
also from a user namespace of the worker's own (unshare -Urm);
the core and its own gateway reach nothing of each other; the gateway ids are no
account, no registry block's base, no agent's and no other hive's; a copied core.id
gives the second hive gateway ids of its own; the passwd/group/nginx.conf written by
``hive up`` replace planted links (never followed), are root's 0644 in a root:gateway
0750 directory, bound read-only in nginx's namespace only; no home or state-dir mount is
in that namespace; a worker's leftover (own session, double fork, ignoring polite
signals) dies before the next nginx and at the stop, and no process of the gateway's
ids is left; a reload the core asks keeps the hive's ids and no supplementary group; an
agent sees no gateway process, port or path; the dashboard, an agent's page, its SSE
stream and a large static file are served through the gateway.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from hive_fixture import HiveFactory, HiveProcess, as_user, children, proc_start_time, wait_until

from .conftest import cage_run

CMD = {"runtime": "command", "command": ["sleep", "3600"]}
REF = "session 17: each hive's gateway has ids of its own (cli/gateway_users.py)"

# One attempt per (label, kind, argument); each answers "ok" or an errno name.
PROBE = r"""
import ctypes, errno, json, os, signal, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def err(e):
    return errno.errorcode.get(e.errno, str(e))
for label, kind, arg in json.loads(sys.argv[1]):
    try:
        if kind == "connect":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(arg)
            finally:
                s.close()
        elif kind == "listdir":
            os.listdir(arg)
        elif kind == "read":
            with open(arg, "rb") as f:
                f.read(1)
        elif kind == "write":
            fd = os.open(arg, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(arg)
        elif kind == "signal":
            os.kill(int(arg), 0)
        elif kind == "sigterm":
            os.kill(int(arg), signal.SIGCONT)
        elif kind == "ptrace":
            if libc.ptrace(16, int(arg), 0, 0) != 0:  # PTRACE_ATTACH
                raise OSError(ctypes.get_errno(), "ptrace")
            libc.ptrace(17, int(arg), 0, 0)  # PTRACE_DETACH
        elif kind == "pidfd_getfd":
            pidfd = os.pidfd_open(int(arg))
            try:
                fd = libc.syscall(438, pidfd, 3, 0)  # pidfd_getfd(pidfd, 3, 0), x86_64
                if fd < 0:
                    raise OSError(ctypes.get_errno(), "pidfd_getfd")
                os.close(fd)
            finally:
                os.close(pidfd)
        else:
            raise SystemExit(f"unknown kind {kind}")
        out[label] = "ok"
    except OSError as e:
        out[label] = err(e)
print(json.dumps(out))
"""


def run_as(
    ids: tuple[int, int], ops: list[tuple[str, str, str]], wrap: tuple[str, ...] = ()
) -> dict[str, str]:
    """``ops`` as a process with exactly ``ids`` (``wrap``: e.g. ``unshare -Urm``, a user
    namespace of its own where it is "root")."""
    proc = subprocess.run(
        [*wrap, sys.executable, "-I", "-c", PROBE, json.dumps(ops)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        **as_user(ids),
    )
    assert proc.returncode == 0, proc.stderr
    got: dict[str, str] = json.loads(proc.stdout)
    print(got)
    return got


def masters(h: HiveProcess) -> list[int]:
    assert h.proc is not None
    return [p for p in children(h.proc.pid) if _comm(p) == "nginx"]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def master(h: HiveProcess) -> int:
    (m,) = wait_until(lambda: masters(h) or None, 30, "nginx's master")
    return m


def workers(h: HiveProcess) -> list[int]:
    return [w for m in masters(h) for w in children(m)]


def ids_of(pid: int) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    status = Path(f"/proc/{pid}/status").read_text()
    uid = re.search(r"^Uid:\s+(.*)$", status, re.M)
    gid = re.search(r"^Gid:\s+(.*)$", status, re.M)
    groups = re.search(r"^Groups:(.*)$", status, re.M)
    assert uid and gid and groups
    return tuple(map(int, uid[1].split())), tuple(map(int, gid[1].split())), groups[1].strip()


def gateway_ids(h: HiveProcess) -> tuple[int, int]:
    """The ids of the hive's live nginx workers (one set, or the test fails)."""
    found = wait_until(lambda: {ids_of(w)[:2] for w in workers(h)} or None, 30, "nginx workers")
    assert len(found) == 1, found
    ((uids, gids),) = found
    assert len(set(uids)) == 1 and len(set(gids)) == 1, (uids, gids)
    return uids[0], gids[0]


def mount_points(pid: int | str) -> list[str]:
    out = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        out.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]))
    return out


def alive(pid: int, started: int | None) -> bool:
    """Still running (not a zombie its new parent has yet to reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return started is not None and proc_start_time(pid) == started and state not in ("Z", "X")


# -- the gateway's mount namespace -----------------------------------------------------


@pytest.mark.attack("reach.other-surfaces", ref=REF + ": the gateway's mount namespace")
def test_the_gateway_namespace_keeps_no_mount_the_host_let_go(hive_factory: HiveFactory) -> None:
    """Hive B's nginx starts while hive A runs (and while the operator has a filesystem
    mounted). A stops (its run/agents tmpfs is detached) and the operator unmounts theirs:
    neither may stay mounted in B's gateway namespace. On 08dc2ed both do (a private
    host: the namespace's copies get no umount event), for as long as B's nginx runs."""
    a = hive_factory({"nsa": CMD})
    operators = a.base / "operators-disk"
    operators.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "operators-disk", str(operators)], check=True
    )
    try:
        b = hive_factory({"nsb": CMD})
        b_master = master(b)
        a_agents = str(a.run_dir / "agents")
        before = mount_points(b_master)
        # B's namespace is a copy of the host's: A's tmpfs and the operator's disk are in it
        assert a_agents in before and str(operators) in before, before
        a.stop_clean()
        subprocess.run(["umount", str(operators)], check=True)
        host = set(mount_points("self"))
        assert a_agents not in host and str(operators) not in host
        time.sleep(0.5)
        after = mount_points(b_master)
        # Nothing beyond the host's own mounts and the namespace's two binds.
        kept = sorted(set(after) - host - {"/etc/passwd", "/etc/group"})
        assert kept == [], f"B's gateway namespace still holds {kept} (the host detached them)"
    finally:
        subprocess.run(["umount", "-l", str(operators)], capture_output=True)


@pytest.mark.attack(
    "reset.planted-link", ref=REF + ": run/gateway/nginx.conf and tmp, written by root"
)
def test_write_replaces_planted_links_and_never_follows_them(tmp_path: Path) -> None:
    """Whatever stands at run/gateway/nginx.conf before ``hive up`` writes it (a link to
    a file of root's) is replaced, not written through; a link at ``tmp`` is refused.
    The config is root's, 0640, the gateway group's to read; ``tmp`` the gateway ids'
    0700 (since this red team nginx's master is not root, so nothing in ``tmp`` can have
    root chown a file)."""
    from hyperhive.gateway import config as gateway_config
    from hyperhive.priv import safefs

    run_dir = tmp_path / "run"
    gdir = run_dir / "gateway"
    gdir.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("root's own\n")
    os.symlink(victim, gdir / "nginx.conf")
    os.umask(old := os.umask(0))  # under umask 000 as well
    try:
        gateway_config.write("127.0.0.1:1", run_dir, 345678, 345679)
    finally:
        os.umask(old)
    assert victim.read_text() == "root's own\n"
    st = os.lstat(gdir / "nginx.conf")
    assert stat.S_ISREG(st.st_mode) and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        0,
        345679,
        0o640,
    )
    st = os.lstat(gdir / "tmp")
    assert stat.S_ISDIR(st.st_mode) and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        345678,
        345679,
        0o700,
    )
    assert "\nuser " not in (gdir / "nginx.conf").read_text()  # its master is not root
    (gdir / "tmp").rmdir()
    os.symlink(victim, gdir / "tmp")
    with pytest.raises(safefs.UnsafePath):
        gateway_config.write("127.0.0.1:1", run_dir, 345678, 345679)
    assert os.lstat(victim).st_uid == 0


# -- one hive's worker against another hive ---------------------------------------------


@pytest.mark.attack("privsep.core-misuse", ref=REF + ": a compromised worker of another hive")
@pytest.mark.parametrize("userns", [False, True], ids=["plain", "in-a-user-namespace"])
def test_one_hives_worker_reaches_nothing_of_another_hives_gateway(
    hive_factory: HiveFactory, userns: bool
) -> None:
    """B's worker's ids against A; also from a user namespace of its own (unprivileged
    ones are allowed here, and no_new_privs does not stop them), where it holds every
    capability over its namespace and none over A's files or processes."""
    a = hive_factory({"rwa": CMD})
    b = hive_factory({"rwb": CMD})
    a_gw, b_gw = gateway_ids(a), gateway_ids(b)
    assert a_gw != b_gw
    # Both on 127.0.0.1: B's `hive up` said that A serves there too (session 19)
    told = f"hive: warning: the hive of {a.run_dir} serves on this address too (port {a.port})"
    assert told in b.log_path.read_text(), b.log_tail()
    a_master, a_workers = master(a), workers(a)
    b_workers = workers(b)
    assert a_workers and b_workers
    ga, gb = a.run_dir / "gateway", b.run_dir / "gateway"
    ops: list[tuple[str, str, str]] = [
        ("a core.sock", "connect", str(a.run_dir / "core.sock")),
        ("a web.sock", "connect", str(a.run_dir / "ui" / "rwa" / "web.sock")),
        ("a priv.sock", "connect", str(a.priv_sock)),
        ("a host.sock", "connect", str(a.host_sock)),
        ("a ui dir", "listdir", str(a.run_dir / "ui" / "rwa")),
        ("a gateway dir", "listdir", str(ga)),
        ("a nginx.conf", "read", str(ga / "nginx.conf")),
        ("a passwd", "read", str(ga / "passwd")),
        ("a temp dir", "listdir", str(ga / "tmp" / "proxy")),
        ("a state dir", "listdir", str(a.state_dir)),
        ("a master signal", "signal", str(a_master)),
        ("a master environ", "read", f"/proc/{a_master}/environ"),
        ("a master root", "listdir", f"/proc/{a_master}/root/"),
        ("a master ptrace", "ptrace", str(a_master)),
    ]
    for w in a_workers:
        ops += [
            (f"a worker {w} signal", "signal", str(w)),
            (f"a worker {w} SIGCONT", "sigterm", str(w)),
            (f"a worker {w} environ", "read", f"/proc/{w}/environ"),
            (f"a worker {w} fds", "listdir", f"/proc/{w}/fd"),
            (f"a worker {w} root", "listdir", f"/proc/{w}/root/"),
            (f"a worker {w} mem", "read", f"/proc/{w}/mem"),
            (f"a worker {w} ptrace", "ptrace", str(w)),
            (f"a worker {w} pidfd_getfd", "pidfd_getfd", str(w)),
        ]
    ops += [
        ("b core.sock", "connect", str(b.run_dir / "core.sock")),
        ("b web.sock", "connect", str(b.run_dir / "ui" / "rwb" / "web.sock")),
        ("b temp dir", "listdir", str(gb / "tmp" / "proxy")),
    ]
    got = run_as(b_gw, ops, ("unshare", "-Urm", "--") if userns else ())
    # the control: B's own
    assert (got.pop("b core.sock"), got.pop("b web.sock"), got.pop("b temp dir")) == (
        "ok",
        "ok",
        "ok",
    )
    reached = {k: v for k, v in got.items() if v not in ("EACCES", "EPERM")}
    assert reached == {}, reached


@pytest.mark.attack("privsep.core-misuse", ref=REF + ": the core and its own gateway")
def test_the_core_and_its_gateway_reach_nothing_of_each_other(hive_factory: HiveFactory) -> None:
    h = hive_factory({"cg": CMD})
    core, gw = h.core_ids, gateway_ids(h)
    assert gw == (core[0] + 1, core[1] + 1)
    core_pid = h.core_pid()
    assert core_pid is not None
    m, ws = master(h), workers(h)
    g = h.run_dir / "gateway"
    ops: list[tuple[str, str, str]] = [
        ("core.sock", "connect", str(h.run_dir / "core.sock")),
        ("web.sock", "connect", str(h.run_dir / "ui" / "cg" / "web.sock")),
        ("gateway dir", "listdir", str(g)),
        ("temp dir", "listdir", str(g / "tmp" / "body")),
        ("master ptrace", "ptrace", str(m)),
    ]
    for w in ws:
        ops += [
            (f"worker {w} signal", "signal", str(w)),
            (f"worker {w} ptrace", "ptrace", str(w)),
            (f"worker {w} fds", "listdir", f"/proc/{w}/fd"),
        ]
    got = run_as(core, ops)
    assert {k: v for k, v in got.items() if v not in ("EACCES", "EPERM")} == {}, got
    # and the gateway's workers against the core and its files
    got = run_as(
        gw,
        [
            ("core signal", "signal", str(core_pid)),
            ("core ptrace", "ptrace", str(core_pid)),
            ("core fds", "listdir", f"/proc/{core_pid}/fd"),
            ("core pidfd_getfd", "pidfd_getfd", str(core_pid)),
            ("priv.sock", "connect", str(h.priv_sock)),
            ("host.sock", "connect", str(h.host_sock)),
            ("agent.sock", "connect", str(h.agent_sock("cg"))),
            ("state dir", "listdir", str(h.state_dir)),
            ("token", "read", str(h.state_dir / "operator.token")),
        ],
    )
    assert {k: v for k, v in got.items() if v not in ("EACCES", "EPERM")} == {}, got


# -- the ids are nobody else's --------------------------------------------------------------


@pytest.mark.attack("launcher.second-hive", ref=REF + ": the gateway ids are the hive's alone")
def test_the_gateway_ids_are_no_account_agent_block_or_other_hives(
    hive_factory: HiveFactory,
) -> None:
    import grp
    import pwd

    from hyperhive.cli.core_identity import host_registry

    a = hive_factory({"ida": CMD, "idb": CMD})
    b = hive_factory({"ida": CMD})
    reg = host_registry()
    taken: dict[int, str] = {}
    for h in (a, b):
        cu, _ = h.core_ids
        assert reg.owner(cu) == f"{h.state_dir.absolute()}#core"
        assert (cu - 200_000) % 2 == 0 or reg.owner(cu - 1) is None
        for name, base in json.loads((h.state_dir / "priv" / "ids.json").read_text()).items():
            for i in (base, base + 1):
                taken[i] = f"{h.base.name} agent {name}"
        taken[cu] = f"{h.base.name} core"
    for h in (a, b):
        gu, gg = gateway_ids(h)
        assert (gu, gg) == (h.core_ids[0] + 1, h.core_ids[1] + 1)
        assert gu not in taken and gg not in taken, (gu, taken.get(gu), taken.get(gg))
        assert reg.owner(gu) is None  # not the first id of any block: the core's second
        with pytest.raises(KeyError):
            pwd.getpwuid(gu)
        with pytest.raises(KeyError):
            grp.getgrgid(gg)
        for path in ("/etc/subuid", "/etc/subgid"):
            try:
                text = Path(path).read_text()
            except FileNotFoundError:
                continue
            for line in text.splitlines():
                parts = line.split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    assert not int(parts[1]) <= gu < int(parts[1]) + int(parts[2]), line


# -- leftovers and reloads ---------------------------------------------------------------

LEFTOVER = r"""
import os, signal, sys, time
if os.fork():
    os._exit(0)
os.setsid()
r, w = os.pipe()
if os.fork():
    os._exit(0)
for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1):
    signal.signal(s, signal.SIG_IGN)
print(os.getpid(), flush=True)
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
time.sleep(3600)
"""


def leave_behind(ids: tuple[int, int]) -> tuple[int, int | None]:
    """A process of ``ids`` in a session of its own, reparented away, ignoring the polite
    signals: what a compromised worker would leave. (pid, start time)"""
    out = subprocess.run(
        [sys.executable, "-I", "-c", LEFTOVER],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        **as_user(ids),
    )
    pid = int(out.stdout.split()[0])
    started = proc_start_time(pid)
    assert started is not None and ids_of(pid)[0][0] == ids[0]
    return pid, started


@pytest.mark.attack("launcher.readiness", ref=REF + ": a worker's leftovers and the next nginx")
def test_a_workers_leftover_dies_before_the_next_nginx_and_at_the_stop(
    hive_factory: HiveFactory,
) -> None:
    h = hive_factory({"lo": CMD})
    gw = gateway_ids(h)
    first = master(h)
    pid, started = leave_behind(gw)
    assert alive(pid, started)
    os.kill(first, signal.SIGKILL)  # the master dies: `hive up` starts another nginx
    wait_until(lambda: (ms := masters(h)) and ms != [first] and workers(h), 30, "a new nginx")
    assert not alive(pid, started), (
        f"a worker's leftover outlived the nginx that followed: "
        f"{Path(f'/proc/{pid}/status').read_text()[:400]}\n{h.log_tail(30)}"
    )
    assert gateway_ids(h) == gw
    r = httpx.get(f"http://127.0.0.1:{h.port}/", timeout=10)
    assert r.status_code in (200, 303, 401, 403), r.status_code
    # and one left while the hive runs dies with the stop
    pid, started = leave_behind(gw)
    h.stop_clean()
    assert not alive(pid, started), "a worker's leftover outlived the hive"
    # so did every process of the gateway's ids
    left = [
        p
        for p in os.listdir("/proc")
        if p.isdigit() and _uid(int(p)) == gw[0] and alive(int(p), proc_start_time(int(p)))
    ]
    assert left == [], left


def _uid(pid: int) -> int | None:
    try:
        return ids_of(pid)[0][0]
    except (OSError, AssertionError):
        return None


@pytest.mark.attack(
    "privsep.core-misuse", ref=REF + ": a reload the core asks keeps the hive's ids"
)
def test_a_reload_keeps_the_hives_own_gateway_ids(hive_factory: HiveFactory) -> None:
    """The core may ask hive-priv for ``reload_gateway`` (SIGHUP): nginx's master reads
    its config again, ``user hive-gateway`` included, in its own namespace."""
    h = hive_factory({"rl": CMD})
    gw = gateway_ids(h)
    old = set(workers(h))
    # as the core: its ids, on priv.sock
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            "import json, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            's.sendall(b\'{"cmd": "reload_gateway"}\\n\'); print(s.makefile().readline())',
            str(h.priv_sock),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        **h.as_core(),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout).get("ok") is True, proc.stdout
    new = wait_until(lambda: (set(workers(h)) - old) or None, 30, "workers of the reloaded config")
    for w in new:
        uids, gids, groups = ids_of(w)
        assert set(uids) == {gw[0]} and set(gids) == {gw[1]} and groups in ("", str(gw[1])), (
            uids,
            gids,
            groups,
        )


# -- the gateway still serves ------------------------------------------------------------


@pytest.mark.attack("launcher.readiness", ref=REF + ": the operator's view through the gateway")
def test_the_gateway_serves_dashboard_page_events_and_large_files(
    hive_factory: HiveFactory,
) -> None:
    from web_fixture import DASHBOARD_VENDOR, Web

    h = hive_factory({"srv": CMD})
    web = Web(h)
    login = web.login()
    dash = web.get("/", login=login)
    assert dash.status_code == 200 and "srv" in dash.text
    page = web.get("/agent/srv/page/", login=login)
    assert page.status_code == 200, (page.status_code, page.text[:200])
    assert web.get("/agent/srv/page/").status_code in (401, 403, 303)  # no session: not served
    # a large file goes through nginx's proxy buffers (and its temp dir, the workers')
    big = web.get(DASHBOARD_VENDOR[0], login=login)
    assert big.status_code == 200 and len(big.content) > 20_000
    with httpx.stream("GET", web.url("/agent/srv/events"), headers=login.cookies, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        first = next(r.iter_bytes())
        assert first, "no event"


@pytest.mark.attack(
    "launcher.second-hive", ref=REF + ": an account or a subordinate range made later"
)
@pytest.mark.parametrize("made", ["account", "subuid"])
def test_the_gateway_never_runs_as_ids_the_host_gave_away_since(
    hive_factory: HiveFactory, made: str
) -> None:
    """The registry skips host accounts and subordinate ranges when it hands out the
    core's block, once; an account made later (useradd -u; a directory service's ids:
    sssd maps from 200000 and does not enumerate) or a user's subordinate range
    (useradd gives each new user the next 65536 ids from 100000) may take
    the block's second id. Played in a mount namespace of the test's own where
    /etc/passwd and /etc/group, or /etc/subuid and /etc/subgid, say so (the host's files
    untouched): the hive must not run its gateway under those ids (refused, or others)."""
    h = hive_factory({"acct": CMD}, start=False)
    core_uid, core_gid = h.core_ids  # claimed now, as at the hive's first start
    gw = (core_uid + 1, core_gid + 1)
    etc = h.base / "etc"
    etc.mkdir()
    if made == "account":
        files = {
            "/etc/passwd": f"intruder:x:{gw[0]}:{gw[1]}::/home/intruder:/bin/sh\n",
            "/etc/group": f"intruder:x:{gw[1]}:\n",
        }
    else:
        # the range useradd gives the n-th user (SUB_UID_MIN 100000, SUB_UID_COUNT 65536)
        first = 100_000 + (gw[0] - 100_000) // 65_536 * 65_536
        files = {t: f"podman:{first}:65536\n" for t in ("/etc/subuid", "/etc/subgid")}
    binds = []
    for target, line in files.items():
        copy = etc / Path(target).name
        copy.write_text(Path(target).read_text() + line)
        os.chmod(copy, 0o644)
        binds.append(f"mount --bind {copy} {target}")
    h.wrap = ["unshare", "-m", "--propagation", "slave", "--",
              "sh", "-c", " && ".join(binds) + ' && exec "$@"', "sh"]  # fmt: skip
    try:
        h.start()
    except AssertionError as e:  # refused: what a fix may do (one line in its log)
        assert str(gw[0]) in h.log_tail(), e
        return
    seen = {ids_of(w)[0][0] for w in workers(h)}
    assert seen, "no workers"
    root = f"/proc/{h.proc.pid}/root"  # hive up's view (the host's, as the case made it)
    if made == "account":
        text = Path(f"{root}/etc/passwd").read_text()
        taken = {int(line.split(":")[2]) for line in text.splitlines() if line.count(":") >= 6}
    else:
        taken = set()
        for line in Path(f"{root}/etc/subuid").read_text().splitlines():
            _, first, count = line.split(":")
            taken |= set(range(int(first), int(first) + int(count)))
    assert not seen & taken, f"the gateway's workers run as uid {seen & taken}: the host's {made}"


# -- the operator's browser between two hives ----------------------------------------------

REPLAY = r"""
import http.client, json, re, sys
port, cookie, name = int(sys.argv[1]), sys.argv[2], sys.argv[3]
c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
c.request("GET", "/", headers={"Cookie": "hive_session=" + cookie})
r = c.getresponse()
page = r.read().decode(errors="replace")
out = {"dashboard": r.status, "lists the agent": name in page}
m = re.search(r'<meta name="csrf-token" content="([^"]*)">', page)
if m:
    origin = "http://127.0.0.1:%d" % port
    c.request("POST", "/api/agents/%s/pause" % name, body="",
              headers={"Cookie": "hive_session=" + cookie, "X-CSRF-Token": m.group(1),
                       "Origin": origin, "Host": "127.0.0.1:%d" % port, "Accept": "application/json",
                       "Content-Type": "application/x-www-form-urlencoded"})
    r = c.getresponse()
    out["pause"] = r.status
    r.read()
print(json.dumps(out))
"""


@pytest.mark.attack(
    "privsep.core-misuse", ref=REF + ": the operator's cookie reaches every hive's gateway"
)
@pytest.mark.parametrize("replayer", ["b-worker", "b-core"])
@pytest.mark.xfail(
    strict=True,
    reason="known limit (docs/security.md): hives on one host name share the operator's"
    " cookies (per host, not per port); a loopback address or host name per hive would"
    " close it",
)
def test_another_hives_worker_never_gets_this_hives_operator_session(
    hive_factory: HiveFactory, replayer: str
) -> None:
    """Two hives on one host, their gateways on 127.0.0.1 (ports differ; the default
    listen of each is 127.0.0.1). The operator logs in to A, then opens B's dashboard in
    the same browser: cookies are per host, not per port, so the request to B carries
    A's ``hive_session``, and B's nginx worker (compromised) replays it to A's gateway
    over TCP (any local process may connect): A's dashboard, its CSRF token, an action
    on A's agent. The ids of B's workers reach none of A's sockets, yet all of A. B's
    core gets the same cookie (nginx hands the Cookie header on to core.sock)."""
    from web_fixture import Web

    a = hive_factory({"cka": CMD})
    b = hive_factory({"ckb": CMD})
    b_ids = gateway_ids(b) if replayer == "b-worker" else b.core_ids
    browser = httpx.Client(timeout=20, follow_redirects=False)
    r = browser.get(Web(a).login_url)
    assert r.status_code == 303
    a_cookie = browser.cookies.get("hive_session")
    assert a_cookie
    r = browser.get(Web(b).url("/"))  # the operator looks at B in another tab
    sent = r.request.headers.get("cookie", "")
    print("B got:", sent)
    leaked = a_cookie in sent
    # What B's worker does with what it got: as B's gateway ids, over TCP to A's gateway.
    proc = subprocess.run(
        [sys.executable, "-I", "-c", REPLAY, str(a.port), a_cookie if leaked else "none", "cka"],
        capture_output=True, text=True, timeout=60, cwd="/", **as_user(b_ids),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    print(got)
    paused = a.agent_status()["cka"].get("paused")
    assert not leaked and got.get("dashboard") != 200 and got.get("pause") is None and not paused, (
        f"hive A's operator session reached hive B's gateway ({sent!r}); {replayer} used it "
        f"on A: {got}, A's agent paused: {paused}"
    )


# -- a hostile agent ---------------------------------------------------------------------

CAGE_PROBE = r"""
import errno, os, socket
out = {}
for label, port in P["ports"].items():
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect(("127.0.0.1", port))
        out[label] = "connected"
    except OSError as e:
        out[label] = errno.errorcode.get(e.errno, str(e))
    finally:
        s.close()
seen = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            st = os.stat("/proc/" + pid)
        except OSError:
            continue
        if st.st_uid in P["uids"] or st.st_gid in P["uids"]:
            seen.append(pid)
out["gateway processes"] = seen
out["paths"] = [p for p in P["paths"] if os.path.lexists(p)]
result(**out)
"""


@pytest.mark.attack("reach.other-surfaces", ref=REF + ": an agent and the gateways")
def test_an_agent_reaches_no_gateway_of_its_hive_or_another(hive_factory: HiveFactory) -> None:
    a = hive_factory({"cga": CMD})
    b = hive_factory({"cgb": CMD})
    uids = sorted({*gateway_ids(a), *gateway_ids(b)})
    paths = [
        str(p)
        for h in (a, b)
        for p in (h.run_dir / "gateway", h.run_dir / "core.sock", h.run_dir / "ui")
    ]
    out = cage_run(a, "cga", CAGE_PROBE, ports={"a": a.port, "b": b.port}, uids=uids, paths=paths)
    print(out)
    assert out["a"] != "connected" and out["b"] != "connected", out
    assert out["gateway processes"] == [], out
    assert out["paths"] == [], out
    # the gateways still serve their own hives' operators
    for h in (a, b):
        assert httpx.get(f"http://127.0.0.1:{h.port}/login", timeout=10).status_code < 500


# -- root's umask and the workers' temp dirs ----------------------------------------------

PLANT = r"""
import os, sys
tmp, victim = sys.argv[1], sys.argv[2]
try:
    os.rename(os.path.join(tmp, "body"), os.path.join(tmp, "body.old"))
    os.symlink(victim, os.path.join(tmp, "body"))
    print("planted")
except OSError as e:
    print("refused", e.strerror)
"""


@pytest.mark.attack("reset.planted-link", ref=REF + ": run/gateway/tmp is made under root's umask")
def test_a_worker_cannot_have_root_chown_a_file_through_the_temp_dir(
    hive_factory: HiveFactory,
) -> None:
    """``gateway/config.write`` makes run/gateway/tmp with mkdir's default mode less
    root's umask, and never sets it (run/gateway, agents/ and ui/ get theirs). Under
    ``umask 000`` (a root shell or a service started so) it is 0777: the worker replaces
    its temp dir tmp/body with a link, and nginx's master (root) chowns and chmods u+rwx
    whatever the link names at its next start or reload (ngx_create_paths follows it).
    The core may ask that reload (``reload_gateway``)."""
    h = hive_factory({"um": CMD}, start=False)
    assert h.core_ids  # the state dir as an earlier start left it; the run dir fresh (reboot)
    h.wrap = ["sh", "-c", 'umask 000 && exec "$@"', "sh"]
    h.start()
    gw = gateway_ids(h)
    tmp = h.run_dir / "gateway" / "tmp"
    mode = stat.S_IMODE(os.stat(tmp).st_mode)
    victim = h.base / "root-only"
    victim.write_text("root's\n")
    os.chmod(victim, 0o600)
    out = subprocess.run(
        [sys.executable, "-I", "-c", PLANT, str(tmp), str(victim)],
        capture_output=True, text=True, timeout=30, cwd="/", **as_user(gw),
    )  # fmt: skip
    print(oct(mode), out.stdout, out.stderr)
    if out.stdout.startswith("planted"):
        reload = subprocess.run(
            [sys.executable, "-I", "-c",
             "import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
             "s.sendall(b'{\"cmd\": \"reload_gateway\"}\\n'); print(s.makefile().readline())",
             str(h.priv_sock)],
            capture_output=True, text=True, timeout=30, cwd="/", **h.as_core(),
        )  # fmt: skip
        print(reload.stdout)
        time.sleep(2)
    st = os.stat(victim)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), (
        f"run/gateway/tmp is {oct(mode)}; the worker's link had root give {victim} to uid "
        f"{st.st_uid}, mode {oct(stat.S_IMODE(st.st_mode))}"
    )
    assert not mode & 0o022, oct(mode)


@pytest.mark.attack("launcher.second-hive", ref=REF + ": a core.id copied into another state dir")
def test_a_copied_core_id_gives_the_second_hive_gateway_ids_of_its_own(
    hive_factory: HiveFactory,
) -> None:
    """``cp STATE/core.id`` into a second hive's state dir (or ``cp -a`` of the whole dir):
    the second hive's core gets new ids (session 16), and so must its gateway; both
    gateways serve, and neither hive's workers reach the other's core.sock."""
    import shutil

    a = hive_factory({"cpa": CMD})
    b = hive_factory({"cpb": CMD}, start=False)
    b.state_dir.mkdir(parents=True)
    os.chmod(b.state_dir, 0o755)
    shutil.copy2(a.state_dir / "core.id", b.state_dir / "core.id")
    b.start()
    a_gw, b_gw = gateway_ids(a), gateway_ids(b)
    assert a_gw != b_gw and b.core_ids != a.core_ids
    assert b_gw == (b.core_ids[0] + 1, b.core_ids[1] + 1)
    got = run_as(b_gw, [("a core.sock", "connect", str(a.run_dir / "core.sock"))])
    assert got == {"a core.sock": "EACCES"}, got
    got = run_as(a_gw, [("b core.sock", "connect", str(b.run_dir / "core.sock"))])
    assert got == {"b core.sock": "EACCES"}, got
    for h in (a, b):
        assert httpx.get(f"http://127.0.0.1:{h.port}/login", timeout=10).status_code < 500

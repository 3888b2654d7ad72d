"""Cages: bubblewrap sandboxes started and found again by hive-priv (root).

Every path here is derived from a validated agent name and hive-priv's own
``--run-dir`` / ``--state-dir``; nothing in a request is ever used as a path.
A cage is found again after a restart of hive-priv or hive-core through its
cgroup (the processes in it) and the info file written when it started.
"""

from __future__ import annotations

import compileall
import contextlib
import json
import logging
import math
import os
import resource
import select
import socket
import stat
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import hyperhive
from hyperhive.cage import layout, setpriv
from hyperhive.names import check_name
from hyperhive.paths import RunDir, StateDir
from hyperhive.priv import cage_mounts, homes, safefs
from hyperhive.priv.cgroups import Cgroup, Pinned, hive_key
from hyperhive.priv.ids import (
    AgentIds,
    HostRegistry,
    IdAllocator,
    IdsExhausted,
    given_to_host,
)
from hyperhive.priv.namelocks import NameLocks
from hyperhive.unixsock import bind_listener

# What of /proc a cage sees read-only, where the kernel has it (bwrap covers /proc/irq and
# /proc/bus itself, when it can).
PROC_READ_ONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/fs", "/proc/irq", "/proc/bus")

log = logging.getLogger("hive.priv")

START_TIMEOUT = 10.0
# cage.log past this at a cage's start becomes cage.log.1 (the last one's replaced). In a
# cage's life init writes at most the harnesses' HARNESS_LOG_MAX and its own INIT_LOG_MAX
# (1 MiB each), so one cage keeps at most about 2 × 3 MiB of log.
CAGE_LOG_ROTATE = 1 << 20
LOG_TAIL = 64 * 1024  # bytes of cage.log read for a failed start's last line
# A cage's descriptor limit (soft, hard): an ordinary process's, at most hive-priv's.
CAGE_NOFILE = (1024, 65536)
# Third-party code the harness may import (the agent page: jinja2; its egress log's times:
# pydantic), compiled with the hive's own (HiveCode.compile).
CAGE_SITE_PACKAGES = (
    "jinja2",
    "markupsafe",
    "pydantic",
    "pydantic_core",
    "annotated_types",
    "typing_inspection",
    "typing_extensions.py",
)
# Read-only from the host's /etc: only what programs need to run. No shadow, no
# host accounts (the cage gets its own passwd/group), no resolv.conf (no DNS).
ETC_ALLOW = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "localtime",
    "nsswitch.conf",
    "protocols",
    "services",
    "mime.types",
    "python3",
    "python3.11",
    "login.defs",
    "profile",
    "bash.bashrc",
    "inputrc",
    "terminfo",
)
ETC_VIEW = "etc-view"  # in state/priv: see Cages.__init__
HOME_VIEW = "home-view"  # in state/priv: where each start attaches its home (cage_mounts)
PTS_VIEW = "pts-view"  # in state/priv: where each start mounts its cage's devpts (cage_mounts)
ETC_OWN = ("passwd", "group", "hosts")  # the cage's own, not the host's (_etc_files)
# Merged-/usr hosts have these as symlinks into /usr; others get read-only binds.
TOP_LEVEL = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


class CageError(Exception):
    """A refusal or failure, one line."""


SET_UP_WAIT = 2.0  # seconds an exec waits for a cage just started to finish building its root
WARM_CORE = "import hyperhive.core.__main__, hyperhive.core.http, anyio._backends._asyncio"


class CageEntry:
    """The way into a running cage for ``hive exec`` (``Cages.enter``): the cage's init
    (bwrap's pid 1), pinned and checked to be that very process, and its namespaces and
    root opened through its own /proc directory. nsenter gets them as
    /proc/<hive-priv>/fd/N, which it opens before it enters anything (as it opens every
    file it is given); hive-priv keeps them until the exec is over, and no copy reaches
    the exec's processes (passed down instead, nothing would close them before the
    command: the cage's original root would reach past the clean exec's private /tmp
    and /home)."""

    def __init__(self, name: str, cgroup: Cgroup, init: Pinned) -> None:
        self.name, self.cgroup, self.init = name, cgroup, init
        self.fds: dict[str, int] = {}

    def open(self) -> None:
        for what in ("mnt", "uts", "ipc", "net", "pid"):
            self.fds[what] = self.init.open_in(f"ns/{what}")
        self.fds["root"] = self.init.open_in("root", os.O_RDONLY | os.O_DIRECTORY)

    def set_up(self) -> bool:
        """Whether the init's root (as opened) is the cage's own, built: not the host's
        root, and the hive's code is there. bwrap writes the init's pid (``start``'s
        info) as soon as it has cloned it, while the init is still building the cage:
        its root is the host's / until its pivot_root (8 of 20 right after ``start``
        answered, red team round 18), and nsenter given that root ran the exec's chain,
        root's steps first, in a copy of the host's whole mount tree."""
        root = os.fstat(self.fds["root"])
        host = os.stat("/")
        if (root.st_dev, root.st_ino) == (host.st_dev, host.st_ino):
            return False
        try:
            code = os.stat(
                layout.HIVE_SRC.lstrip("/"), dir_fd=self.fds["root"], follow_symlinks=False
            )
        except OSError:
            return False
        return stat.S_ISDIR(code.st_mode)

    def close_fds(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def nsenter(self, *, pid: bool) -> list[str]:
        """nsenter's options: the cage's mount, uts, ipc and net namespaces (and its pid
        namespace if ``pid``), its root, and / in it as the working directory."""
        fd = {what: f"/proc/{os.getpid()}/fd/{n}" for what, n in self.fds.items()}
        a = ["nsenter", f"--mount={fd['mnt']}", f"--uts={fd['uts']}", f"--ipc={fd['ipc']}"]
        a += [f"--net={fd['net']}", f"--root={fd['root']}", "--wdns=/"]
        return a + ([f"--pid={fd['pid']}"] if pid else [])

    def join(self) -> None:
        """In the exec's child, before it executes anything: the cage's cgroup and limits,
        then the cage's init found still running. A stop that ended the cage since it was
        pinned saw no such child in the cgroup; the exec would have run in what is left of
        the cage's namespaces, in a cgroup its stop had found empty."""
        enter_cage_limits(self.cgroup)
        if not self.init.running():
            raise CageError(f"cage {self.name} is not running")

    def close(self) -> None:
        self.close_fds()
        self.init.close()


@dataclass(frozen=True)
class HiveCode:
    """Where the hive's own code is on the host, mounted read-only into every cage."""

    src: Path
    site: Path

    def compile(self) -> None:
        """Write the bytecode of what the cage imports, beside its source. Cages see
        this code read-only, so a module without a current ``.pyc`` (a checkout, or a
        package installed without compiling: uv's default) is compiled again by every
        cage's init and harness: most of a cold start. For the cage's interpreter only."""
        self.warm_core()
        if os.path.realpath(sys.executable) != os.path.realpath(layout.CAGE_PYTHON):
            log.info("not compiling the cage's code: this is not the cage's python")
            return
        started = time.monotonic()
        compileall.compile_dir(self.src / "hyperhive", quiet=2, workers=1)
        for name in CAGE_SITE_PACKAGES:
            path = self.site / name
            if path.is_dir():
                compileall.compile_dir(path, quiet=2, workers=1)
            elif path.is_file():
                compileall.compile_file(path, quiet=2)
        log.info("cage code compiled in %.2f s", time.monotonic() - started)

    @staticmethod
    def warm_core() -> None:
        """Import what hive-core imports, once, as root: the interpreter writes each
        module's ``.pyc`` beside its source, which hive-core's own user may not. Without
        them every start of the core (a restart: every agent waits for it) compiled
        fastapi, httpx, pygments and the rest again: a third of its start-up."""
        started = time.monotonic()
        try:
            subprocess.run(
                # And what the core imports later: the dashboard's code (fastapi,
                # starlette, uvicorn: loaded once the agents are served) and anyio's
                # backend (on its first thread-pool hop); these were compiled from
                # source by every start of the core.
                [sys.executable, "-I", "-c", WARM_CORE],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as e:
            log.info("hive-core's bytecode not written: %s", e)
            return
        log.info("hive-core's bytecode written in %.2f s", time.monotonic() - started)

    @classmethod
    def of_this_install(cls) -> HiveCode:
        return cls(
            src=Path(hyperhive.__file__).resolve().parent.parent,
            site=Path(sysconfig.get_paths()["purelib"]).resolve(),
        )


def enter_cage_limits(cgroup: Cgroup) -> None:
    """In a child about to become (or enter) a cage: the cage's cgroup, and not hive-priv's
    descriptor limit, raised for max_agents (budget.fit_nofile), but an ordinary one that
    nothing in the cage can raise past CAGE_NOFILE[1]. Syscalls only: safe in preexec_fn.

    No core dumps, soft or hard: a crash would hand the process's memory to the host's
    core_pattern (a root program of the host's, systemd-coredump or apport, whose store
    and journal no quota of the agent's bounds; or a file in the crashing process's
    directory, where an operator's ``hive exec`` crashing in the agent's home left its
    memory for the agent; red team round 17)."""
    cgroup.join()
    hard = min(CAGE_NOFILE[1], resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(CAGE_NOFILE[0], hard), hard))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # No real-time policy and no nice below 0, whatever hive-priv was given (a unit's
    # LimitRTPRIO=): a cage's CPU share is a weight among ordinary tasks, and a SCHED_FIFO
    # busy loop would take 95% of a CPU from every ordinary process of the host (red team
    # round 17).
    resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
    resource.setrlimit(resource.RLIMIT_NICE, (0, 0))


class Cages:
    """Every directory hive-priv trusts is root's and opened without following links:
    the run and state directories (root's; hive-core may add its own files, never
    rename root's: they are sticky), ``state/priv`` (root, 0700: ids, per-cage
    files), ``state/agents`` and ``state/agents/<name>`` (root, 0711), ``run/agents``
    and ``run/ui`` (root, 0711). What the core or an agent owns (``run/agents/<name>``,
    the home's contents) is only ever reached through those, by descriptor."""

    def __init__(
        self,
        run_dir: RunDir,
        state_dir: StateDir,
        core_uid: int,
        gateway_gid: int = 0,
        code: HiveCode | None = None,
        registry: HostRegistry | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.state_dir = state_dir
        self.core_uid = core_uid
        self.gateway_gid = gateway_gid
        self.code = code or HiveCode.of_this_install()
        try:
            self.state_fd = safefs.open_anchor(state_dir.root)
            self.run_fd = safefs.open_anchor(run_dir.root)
            self.priv_fd = safefs.ensure_dir(self.state_fd, "priv", 0, 0, 0o700, trusted=True)
            self.agents_fd = safefs.ensure_dir(self.state_fd, "agents", 0, 0, 0o711, trusted=True)
            self.cages_fd = safefs.ensure_dir(self.priv_fd, "cages", 0, 0, 0o700, trusted=True)
            self.run_agents_fd = safefs.ensure_dir(self.run_fd, "agents", 0, 0, 0o711, trusted=True)
            self.run_ui_fd = safefs.ensure_dir(self.run_fd, "ui", 0, 0, 0o711, trusted=True)
        except (OSError, safefs.UnsafePath) as e:
            raise CageError(f"refusing to run on these directories: {e}") from None
        self.priv_dir = state_dir.root / "priv"
        # Where each cage start's /etc is put together (cage_mounts.etc_view), in the
        # starting child's own mount namespace; on the host an empty directory.
        self.etc_view = self.priv_dir / ETC_VIEW
        # Likewise the agent's home (cage_mounts.attach_home): on the host, empty.
        self.home_view = self.priv_dir / HOME_VIEW
        # And its devpts instance, with a bound of its own (cage_mounts.pts_view).
        self.pts_view = self.priv_dir / PTS_VIEW
        try:
            for view in (ETC_VIEW, HOME_VIEW, PTS_VIEW):
                os.close(safefs.ensure_dir(self.priv_fd, view, 0, 0, 0o700, trusted=True))
        except (OSError, safefs.UnsafePath) as e:
            raise CageError(f"refusing to run on these directories: {e}") from None
        self.ids = IdAllocator(self.priv_fd, str(state_dir.root), registry)
        self.cgroup_key = hive_key(state_dir.root)
        self.locks = NameLocks()
        self.scan_lock = threading.Lock()  # the core's verbs that read every cage (verbs.py)
        # In the background: only the first run after an install has work to do. A cage
        # started meanwhile compiles in memory as before (.pyc files are written atomically).
        threading.Thread(target=self.code.compile, name="compile", daemon=True).start()

    def lock(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Hold ``name``'s lock: one request at a time per agent."""
        return self.locks.hold(check_name(name))

    # -- verbs -------------------------------------------------------------------

    def prepare(self, name: str) -> AgentIds:
        """Allocate ids; create the home's directory (root's: the home itself is made
        by ``start``, and mounted in the cage only), the socket directory (the core's, group = the
        agent's, setgid so sockets inherit the group) and the page directory."""
        check_name(name)
        try:
            ids = self.ids.allocate(name)
        except IdsExhausted as e:
            raise CageError(str(e)) from None
        # Checked at every start: the host may have given an id away since the claim, and
        # a cage run as a host account would share its files and signals.
        try:
            taken = given_to_host((ids.uid, ids.harness_uid))
        except IdsExhausted as e:  # the host's user database did not answer
            raise CageError(f"agent {name!r}: {e}: not started") from None
        if taken is not None:
            raise CageError(
                f"agent {name!r} runs as ids {ids.uid}-{ids.harness_uid}, but {taken} since"
                " the hive took them: not started (free the ids, or destroy the agent)"
            )
        for parent, mode_args in (
            (self.agents_fd, (0, 0, 0o711)),
            (self.run_agents_fd, (self.core_uid, ids.gid, 0o2750)),
            # root's and the gateway's: web.sock is bound here by start and handed in, so
            # nothing in the cage can write the host's run dir (red team round 22)
            (self.run_ui_fd, (0, self.gateway_gid, 0o750)),
            (self.cages_fd, (0, 0, 0o700)),
        ):
            os.close(safefs.ensure_dir(parent, name, *mode_args))
        return ids

    def _home(self, name: str, ids: AgentIds, disk_mib: int) -> homes.Home:
        with safefs.opened(safefs.open_dir(self.agents_fd, name)) as agent_dir:
            try:
                return homes.open_home(
                    agent_dir, ids.uid, ids.gid, disk_mib, templates=self.priv_fd
                )
            except (homes.HomeError, OSError, subprocess.SubprocessError) as e:
                raise CageError(f"cage {name}: its home: {e}") from None

    def info(self, name: str) -> dict[str, int] | None:
        try:
            with safefs.opened(safefs.open_dir(self.cages_fd, check_name(name))) as cage_dir:
                raw = safefs.read_file(cage_dir, "info.json")
            return json.loads(raw) if raw else None
        except (OSError, ValueError, safefs.UnsafePath):
            return None

    def _write_info(self, name: str, info: dict[str, float] | None) -> None:
        with safefs.opened(safefs.open_dir(self.cages_fd, name)) as cage_dir:
            if info is None:
                with safefs.suppress_missing():
                    os.unlink("info.json", dir_fd=cage_dir)
            else:
                # No fsync: a running cage's pid means nothing after a reboot (~5% of
                # hive-priv's time in a `hive up` of hundreds of cages was this fsync).
                safefs.write_file(cage_dir, "info.json", json.dumps(info).encode(), durable=False)

    def running(self, name: str) -> bool:
        return bool(self.cgroup(name).pids())

    def start(
        self, name: str, memory_mib: int, pids_max: int, disk_mib: int = homes.DEFAULT_DISK_MIB
    ) -> tuple[int, bool]:
        """Start the cage unless it runs. Returns (pid of the cage's init, started now)."""
        t0 = time.monotonic()
        ids = self.prepare(name)
        cgroup = self.cgroup(name)
        info = self.info(name)
        if cgroup.pids():
            return (info or {}).get("child_pid", 0), False
        with contextlib.ExitStack() as opened:
            home = self._home(name, ids, disk_mib)
            opened.callback(os.close, home.fd)  # the child's attach holds the mount after
            t_home = time.monotonic()
            cgroup.create(memory_mib, pids_max)
            read_fd, write_fd = os.pipe()
            system_dirs = self.system_dirs()
            home_view = str(self.home_view)

            def in_child() -> None:  # the cgroup, the OOM order, limits, the mounts
                enter_cage_limits(cgroup)
                cage_mounts.lower_oom_score()
                cage_mounts.private_overlays(system_dirs)
                cage_mounts.etc_view(str(self.etc_view), "/etc", ETC_ALLOW, ETC_OWN)
                cage_mounts.pts_view(str(self.pts_view))
                if home.detached:
                    cage_mounts.attach_home(home.fd, home_view)

            binds = self._bind_fds(name, ids, home.fd, opened)
            page = self._page_listener(name)
            opened.callback(page.close)
            cage_dir = opened.enter_context(safefs.opened(safefs.open_dir(self.cages_fd, name)))
            safefs.rotate(cage_dir, "cage.log", CAGE_LOG_ROTATE)
            log_fd = opened.enter_context(safefs.opened(safefs.open_append(cage_dir, "cage.log")))
            bwrap = self.bwrap_argv(name, ids, info_fd=write_fd, binds=binds, page_fd=page.fileno())
            # Its options from a memfd (--args; bwrap takes the command itself only on its
            # command line): bwrap is the cage's pid 1, and its cmdline, readable in the
            # cage, named the run and state dirs (red team round 22).
            cut = bwrap.index("--")
            args_fd = os.memfd_create("cage-bwrap-args", os.MFD_CLOEXEC)
            opened.callback(os.close, args_fd)
            os.write(args_fd, b"".join(arg.encode() + b"\0" for arg in bwrap[1:cut]))
            os.lseek(args_fd, 0, os.SEEK_SET)
            argv = ["setsid", "--fork", bwrap[0], "--args", str(args_fd), *bwrap[cut:]]
            # setsid --fork: bwrap is orphaned at once, so the cage outlives hive-priv.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                pass_fds=(write_fd, page.fileno(), args_fd, *binds.values()),
                close_fds=True,
                preexec_fn=in_child,  # file writes and syscalls only, no locks: safe with threads
            )
            os.close(write_fd)
            try:
                proc.wait(timeout=START_TIMEOUT)
                data = _read_all(read_fd, START_TIMEOUT)
            finally:
                os.close(read_fd)
        try:
            child_pid = int(json.loads(data)["child-pid"])
        except (ValueError, KeyError, TypeError):
            raise CageError(f"cage {name} failed to start: {self._log_tail(name)}") from None
        # The init's start time with its pid: what makes it that process for `enter`.
        init = cgroup.pin(child_pid)
        try:
            if init is None:
                raise FileNotFoundError
            start_time = init.start_time()
        except OSError:
            raise CageError(f"cage {name} exited at once: {self._log_tail(name)}") from None
        finally:
            if init is not None:
                init.close()
        self._write_info(
            name, {"child_pid": child_pid, "start_time": start_time, "started_at": time.time()}
        )
        t_end = time.monotonic()
        log.info(
            "cage %s started (init pid %d, uid %d, harness uid %d) in %.1f ms"
            " (home %.1f ms, bwrap %.1f ms)",
            name,
            child_pid,
            ids.uid,
            ids.harness_uid,
            (t_end - t0) * 1e3,
            (t_home - t0) * 1e3,
            (t_end - t_home) * 1e3,
        )
        return child_pid, True

    def _log_tail(self, name: str) -> str:
        with safefs.opened(safefs.open_dir(self.cages_fd, name)) as cage_dir:
            raw = safefs.read_tail(cage_dir, "cage.log", LOG_TAIL) or b""
        return (raw.decode(errors="replace").strip().splitlines()[-1:] or ["no output"])[0]

    @staticmethod
    def _etc_files(name: str, ids: AgentIds) -> dict[str, str]:
        """The cage's own passwd, group and hosts: no host accounts."""
        return {
            "passwd": f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
            f"agent:x:{ids.uid}:{ids.gid}:{name}:{layout.HOME}:/bin/bash\n"
            f"harness:x:{ids.harness_uid}:{ids.gid}:hive harness:/nonexistent:/usr/sbin/nologin\n"
            f"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
            "group": f"root:x:0:\nagent:x:{ids.gid}:\nnogroup:x:65534:\n",
            "hosts": f"127.0.0.1 localhost {name}\n::1 localhost\n",
        }

    def _bind_fds(
        self, name: str, ids: AgentIds, home: int, stack: contextlib.ExitStack
    ) -> dict[str, int]:
        """Descriptors of everything bound into the cage, opened here without following
        links: bwrap binds exactly these (``--bind-fd``), never a path it would resolve.
        The home is its mount's descriptor (homes.open_home; the caller closes it).
        passwd, group and hosts are memfds bwrap copies (``--ro-bind-data``): no host
        file, and no host path in the cage's mountinfo."""

        def keep(fd: int) -> int:
            stack.callback(os.close, fd)
            return fd

        fds = {
            "home": home,
            "sockets": keep(safefs.open_dir(self.run_agents_fd, name)),
        }
        for f, text in self._etc_files(name, ids).items():
            fd = keep(os.memfd_create(f"cage-{f}", os.MFD_CLOEXEC))
            os.write(fd, text.encode())
            os.lseek(fd, 0, os.SEEK_SET)
            fds[f] = fd
        return fds

    def system_dirs(self) -> list[str]:
        """The host directories bound read-only into a cage, which hive-priv's child
        covers with overlays of their own (cage_mounts) before bwrap binds them: the
        system's and the hive's code."""
        dirs = [
            "/usr",
            *(
                f"/{t}"
                for t in TOP_LEVEL
                if Path(f"/{t}").is_dir() and not Path(f"/{t}").is_symlink()
            ),
            "/etc",
            str(self.code.src),
        ]
        return dirs + ([str(self.code.site)] if self.code.site != self.code.src else [])

    # fmt: off
    # The argv lists below keep each option with its arguments on one line.
    def _page_listener(self, name: str) -> socket.socket:
        """The cage's web.sock, bound here (root and the gateway's group, 0660) in the
        cage's page directory, through its descriptor (no path to race), and handed to
        init, which keeps it for each harness. Before red team round 22 the directory was
        the harness's, bound read-write into the cage so it could bind web.sock itself:
        a compromised harness could fill the run dir's filesystem through it."""
        with safefs.opened(safefs.open_dir(self.run_ui_fd, name)) as ui:
            return bind_listener(
                f"/proc/self/fd/{ui}/web.sock", self.gateway_gid, 0o660, backlog=5, uid=0
            )

    def bwrap_argv(
        self, name: str, ids: AgentIds, info_fd: int, binds: dict[str, int], page_fd: int = -1
    ) -> list[str]:
        a = [
            "bwrap",
            "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try",
            "--new-session",
            "--hostname", name,
            "--ro-bind", "/usr", "/usr",
        ]
        for top in TOP_LEVEL:
            p = Path("/") / top
            if p.is_symlink():
                a += ["--symlink", os.readlink(p), str(p)]
            elif p.is_dir():
                a += ["--ro-bind", str(p), str(p)]
        a += ["--ro-bind", str(self.etc_view), "/etc"]  # ETC_ALLOW, put together in_child
        for f in ETC_OWN:
            a += ["--perms", "0644", "--ro-bind-data", str(binds[f]), f"/etc/{f}"]
        a += [
            "--proc", "/proc",
            # Read-only over the cage's proc: bwrap covers /proc/sys only if access(W_OK)
            # on it succeeds, and the kernel answers EACCES for the root of /proc/sys, so
            # it was left writable to the cage's euid 0 (init): a sysctl checks the mode,
            # not a capability (kernel/core_pattern is run as host root). runc's read-only
            # set (red team round 22). The host's /proc/sys shows what the cage's own
            # would: a sysctl answers for the reader's namespaces.
            *(arg for p in PROC_READ_ONLY for arg in ("--ro-bind-try", p, p)),
            "--dev", "/dev",
            # bwrap's devpts has no bound but the host's (kernel.pty.max, shared by every
            # instance): this one, mounted in_child, has CAGE_PTYS (its /dev/ptmx is pts/ptmx).
            "--dev-bind", str(self.pts_view), "/dev/pts",
            "--perms", "1777", "--size", str(256 * 1024 * 1024), "--tmpfs", "/tmp",
            "--perms", "0755", "--dir", "/run",
            "--perms", "0755", "--dir", "/home",
            "--ro-bind-fd", str(binds["sockets"]), layout.SOCKET_DIR,
            "--bind-fd", str(binds["home"]), layout.HOME,
            "--perms", "0755", "--dir", "/opt",
            "--perms", "0755", "--dir", "/opt/hive",
            "--ro-bind", str(self.code.src), layout.HIVE_SRC,
        ]
        if self.code.site != self.code.src:
            a += ["--ro-bind", str(self.code.site), layout.HIVE_SITE]
        a += ["--perms", "0755", "--dir", layout.BIN,
              "--symlink", f"{layout.HIVE_SRC}/hyperhive/cage/bin/hive", f"{layout.BIN}/hive"]
        a += [
            "--chdir", "/",  # init has no CAP_DAC_OVERRIDE to enter the runtime's 0700 home
            "--clearenv",
            *(arg for k, v in layout.base_env(name).items() for arg in ("--setenv", k, v)),
            *(("--setenv", layout.PAGE_FD_ENV, str(page_fd)) if page_fd >= 0 else ()),
            # The cage's init keeps only what it needs to start the harness and the
            # runtime's processes under their own uids, and to signal the latter.
            "--cap-drop", "ALL",
            "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP",
            "--cap-add", "CAP_KILL",
            "--info-fd", str(info_fd),
            "--",
            *layout.python_argv(
                "init",
                "--uid", str(ids.uid), "--gid", str(ids.gid), "--harness-uid", str(ids.harness_uid),
            ),
        ]
        return a

    def stop(self, name: str, timeout: float) -> bool:
        cgroup = self.cgroup(name)
        was_running = bool(cgroup.pids())
        if not cgroup.kill_all(timeout):
            raise CageError(f"cage {name}: processes survived SIGKILL")
        with contextlib.suppress(FileNotFoundError):
            self._write_info(name, None)
        # The home's filesystem went with the cage's namespaces; one a hive-priv from
        # before mounted on the host is unmounted there.
        try:
            with safefs.opened(safefs.open_dir(self.agents_fd, name)) as agent_dir:
                homes.unmount_home(agent_dir)
        except FileNotFoundError:
            pass
        except (homes.HomeError, OSError) as e:
            raise CageError(f"cage {name}: {e}") from None
        if was_running:
            log.info("cage %s stopped", name)
        return was_running

    def destroy(self, name: str) -> None:
        """Stop the cage, then remove everything of the agent's: its home (whatever the
        agent built there: any depth, links, odd modes), its directories and its
        cgroup. Its ids are released but never handed out again."""
        self.stop(name, timeout=2.0)
        self.cgroup(name).remove()
        for parent in (self.agents_fd, self.run_agents_fd, self.run_ui_fd, self.cages_fd):
            try:
                safefs.remove_tree(parent, name)
            except (OSError, safefs.UnsafePath) as e:
                raise CageError(f"cage {name}: could not remove its files: {e}") from None
        self.ids.release(name)
        log.info("cage %s destroyed", name)

    def enter(self, name: str) -> CageEntry:
        """The cage's init, pinned (``Cgroup.pin``: in the cage's cgroup), checked to be
        the process that started as the cage's init (its start time, recorded with its pid
        at ``start``), and its namespaces and root opened through it (``CageEntry``); the
        caller closes it. Not nsenter --target <pid>: that opened /proc/<pid>/ns/* by number
        later, when the cage's init may have ended and a host process taken its pid (the
        host's pids wrap), and the exec ran in that process's namespaces and root. Being in
        the cage's cgroup is not enough either: root's own processes are put there (the
        next start's bwrap, still in the host's namespaces; an exec's chain before it
        enters)."""
        info = self.info(name) or {}
        cgroup = self.cgroup(name)
        init = cgroup.pin(info["child_pid"]) if "child_pid" in info else None
        if init is None:
            raise CageError(f"cage {name} is not running")
        entry = CageEntry(name, cgroup, init)
        try:
            if not self._is_init(init, info):
                raise CageError(f"cage {name} is not running")
            # A cage just started may still be building its root: waited for, briefly.
            deadline = time.monotonic() + SET_UP_WAIT
            entry.open()
            while not entry.set_up():
                entry.close_fds()
                if time.monotonic() > deadline or not init.running():
                    raise CageError(f"cage {name} is not running (still starting?)")
                time.sleep(0.01)
                entry.open()
        except OSError:  # reaped meanwhile: what it held is gone
            entry.close()
            raise CageError(f"cage {name} is not running") from None
        except BaseException:
            entry.close()
            raise
        return entry

    @staticmethod
    def _is_init(init: Pinned, info: dict[str, int]) -> bool:
        if "start_time" in info:
            return init.start_time() == info["start_time"]
        # Started by a hive-priv that recorded no start time: at least pid 1 of a pid
        # namespace below hive-priv's, as a cage's init is (NSpid: its pid in each).
        for line in init.read("status").splitlines():
            if line.startswith("NSpid:"):
                pids = line.split()[1:]
                return len(pids) >= 2 and pids[-1] == "1"
        return False

    def exec_argv(
        self, entry: CageEntry, argv: list[str], env: dict[str, str], *,
        tty: bool = False, trust_home: bool = False, as_agent: bool = False,
    ) -> list[str]:
        """The chain ``hive exec`` runs (hyperhive.cage.exec_ has the in-cage steps), run
        with ``entry.join`` as its preexec_fn and ``entry`` open until it is over.

        nsenter the cage's mount, uts, ipc and net namespaces and its root (``entry``'s
        descriptors); then, unless ``as_agent``, ``unshare`` a NEW pid namespace (a
        sibling of the cage's, not inside it: nothing the agent runs can see, signal,
        trace or read any process of this exec) with its own /proc, in a private copy of
        the mount namespace, where a fresh empty HOME is mounted (unless ``trust_home``);
        then become the agent for good (setpriv), a clean environment (env -i), and the
        exec's init, which installs the cage's seccomp filter and runs argv."""
        from hyperhive.cage import exec_  # here: this method is all of exec in this module

        name = entry.name
        ids = self.ids.get(name)
        if ids is None:
            raise CageError(f"cage {name} is not running")
        trust_home = trust_home or as_agent
        clean = {} if trust_home else {
            "HOME": exec_.EXEC_HOME, "PYTHONNOUSERSITE": "1", "PYTHONSAFEPATH": "1",
        }
        # Without a pty the command's stdin is a socket (exec_relay._pair), and bash takes a
        # socket on stdin for rshd's: a top-level `bash -c` then sources ~/.bashrc (the
        # agent's, under --trust-home) instead of $BASH_ENV. One level up, it behaves as
        # it did on a pipe.
        nested = {} if tty else {"SHLVL": "1"}
        base_env = {**layout.base_env(name), **nested, **clean, **env}
        enter = entry.nsenter(pid=as_agent)
        if as_agent:
            enter += ["--"]
        else:
            enter += ["--", "/usr/bin/unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
                      "--propagation", "private", "--"]
            if not trust_home:
                enter += layout.python_argv(
                    "exec-home", "--uid", str(ids.uid), "--gid", str(ids.gid), "--"
                )
        return [
            *enter,
            *setpriv.drop_to(ids.uid, ids.gid),
            "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in base_env.items()),
            *layout.python_argv(
                "exec", *(["--tty"] if tty else []),
                "--cwd", layout.HOME if trust_home else "/",
                "--", *argv,
            ),
        ]

    # fmt: on
    def cgroup(self, name: str) -> Cgroup:
        return Cgroup(name, self.cgroup_key)


def _dir(path: Path, uid: int, gid: int, mode: int) -> None:
    """A directory with exactly this owner and mode, whether it existed or not."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _read_all(fd: int, timeout: float) -> bytes:
    """bwrap's info (a JSON object) from ``fd``: until EOF, a ``}`` or ``timeout``. poll, not
    select: hive-priv's descriptors may be numbered past select's 1,023."""
    chunks, deadline = [], time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while time.monotonic() < deadline:
        if not poller.poll(math.ceil(max(0.0, deadline - time.monotonic()) * 1000)):
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        if b"}" in chunk:
            break
    return b"".join(chunks)

"""Cages: bubblewrap sandboxes started and found again by hive-priv (root).

Every path here is derived from a validated agent name and hive-priv's own
``--run-dir`` / ``--state-dir``; nothing in a request is ever used as a path.
A cage is found again after a restart of hive-priv or hive-core through its
cgroup (the processes in it) and the info file written when it started.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import subprocess
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import hyperhive
from hyperhive.cage import layout
from hyperhive.names import check_name
from hyperhive.paths import RunDir, StateDir
from hyperhive.priv.cgroups import Cgroup, hive_key
from hyperhive.priv.ids import AgentIds, IdAllocator

log = logging.getLogger("hive.priv")

START_TIMEOUT = 10.0
# Read-only from the host's /etc: only what programs need to run. No shadow, no
# host accounts (the cage gets its own passwd/group), no resolv.conf (no DNS).
ETC_ALLOW = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "ssl", "ca-certificates",
    "ca-certificates.conf", "localtime", "nsswitch.conf", "protocols", "services", "mime.types",
    "python3", "python3.11", "login.defs", "profile", "bash.bashrc", "inputrc", "terminfo",
)
# Merged-/usr hosts have these as symlinks into /usr; others get read-only binds.
TOP_LEVEL = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


class CageError(Exception):
    """A refusal or failure, one line."""


@dataclass(frozen=True)
class HiveCode:
    """Where the hive's own code is on the host, mounted read-only into every cage."""

    src: Path
    site: Path

    @classmethod
    def of_this_install(cls) -> HiveCode:
        return cls(
            src=Path(hyperhive.__file__).resolve().parent.parent,
            site=Path(sysconfig.get_paths()["purelib"]).resolve(),
        )


class Cages:
    def __init__(self, run_dir: RunDir, state_dir: StateDir, core_uid: int, gateway_gid: int = 0,
                 code: HiveCode | None = None) -> None:
        self.run_dir = run_dir
        self.state_dir = state_dir
        self.core_uid = core_uid
        self.gateway_gid = gateway_gid
        self.code = code or HiveCode.of_this_install()
        self.priv_dir = state_dir.root / "priv"
        self.priv_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.priv_dir, 0o700)
        self.ids = IdAllocator(self.priv_dir / "ids.json")
        self.cgroup_key = hive_key(state_dir.root)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(check_name(name), threading.Lock())

    # -- derived paths ---------------------------------------------------------------

    def _cage_dir(self, name: str) -> Path:
        return self.priv_dir / "cages" / check_name(name)

    def _agent_state(self, name: str) -> Path:
        return self.state_dir.root / "agents" / check_name(name)

    # -- verbs -------------------------------------------------------------------

    def prepare(self, name: str) -> AgentIds:
        """Allocate ids; create the home (runtime's, 0700) and the socket directory
        (the core's, group = the agent's, setgid so sockets inherit the group)."""
        ids = self.ids.allocate(name)
        _dir(self.state_dir.root / "agents", 0, 0, 0o711)
        _dir(self._agent_state(name), 0, 0, 0o711)
        _dir(self.state_dir.agent_home(name), ids.uid, ids.gid, 0o700)
        _dir(self.run_dir.agents, 0, 0, 0o711)
        _dir(self.run_dir.agent_dir(name), self.core_uid, ids.gid, 0o2750)
        _dir(self.run_dir.ui, 0, 0, 0o711)
        _dir(self.run_dir.ui_dir(name), ids.harness_uid, self.gateway_gid, 0o2750)

        cage_dir = self._cage_dir(name)
        cage_dir.mkdir(parents=True, exist_ok=True)
        (cage_dir / "passwd").write_text(
            f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
            f"agent:x:{ids.uid}:{ids.gid}:{name}:{layout.HOME}:/bin/bash\n"
            f"harness:x:{ids.harness_uid}:{ids.gid}:hive harness:/nonexistent:/usr/sbin/nologin\n"
            f"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        )
        (cage_dir / "group").write_text(f"root:x:0:\nagent:x:{ids.gid}:\nnogroup:x:65534:\n")
        (cage_dir / "hosts").write_text(f"127.0.0.1 localhost {name}\n::1 localhost\n")
        for f in ("passwd", "group", "hosts"):
            os.chmod(cage_dir / f, 0o644)
        return ids

    def _info_file(self, name: str) -> Path:
        return self._cage_dir(name) / "info.json"

    def info(self, name: str) -> dict[str, int] | None:
        try:
            return json.loads(self._info_file(name).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def running(self, name: str) -> bool:
        return bool(self.cgroup(name).pids())

    def start(self, name: str, memory_mib: int, pids_max: int) -> tuple[int, bool]:
        """Start the cage unless it runs. Returns (pid of the cage's init, started now)."""
        ids = self.prepare(name)
        cgroup = self.cgroup(name)
        info = self.info(name)
        if cgroup.pids():
            return (info or {}).get("child_pid", 0), False
        cgroup.create(memory_mib, pids_max)
        log_path = self._cage_dir(name) / "cage.log"
        read_fd, write_fd = os.pipe()
        argv = ["setsid", "--fork", *self.bwrap_argv(name, ids, info_fd=write_fd)]
        with open(log_path, "ab") as log_file:
            # setsid --fork: bwrap is orphaned at once, so the cage outlives hive-priv.
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                pass_fds=(write_fd,), preexec_fn=cgroup.join, close_fds=True,
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
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise CageError(f"cage {name} failed to start: {tail[0]}") from None
        if not cgroup.pids():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise CageError(f"cage {name} exited at once: {tail[0]}")
        self._info_file(name).write_text(json.dumps({"child_pid": child_pid, "started_at": time.time()}))
        log.info("cage %s started (init pid %d, uid %d, harness uid %d)", name, child_pid, ids.uid, ids.harness_uid)
        return child_pid, True

    def bwrap_argv(self, name: str, ids: AgentIds, info_fd: int) -> list[str]:
        cage_dir = self._cage_dir(name)
        a = [
            "bwrap",
            "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
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
        a += ["--perms", "0755", "--dir", "/etc"]
        for entry in ETC_ALLOW:
            p = Path("/etc") / entry
            if p.exists():
                a += ["--ro-bind", str(p), str(p)]
        for f in ("passwd", "group", "hosts"):
            a += ["--ro-bind", str(cage_dir / f), f"/etc/{f}"]
        a += [
            "--proc", "/proc",
            "--dev", "/dev",
            "--perms", "1777", "--size", str(256 * 1024 * 1024), "--tmpfs", "/tmp",
            "--perms", "0755", "--dir", "/run",
            "--perms", "0755", "--dir", "/home",
            "--ro-bind", str(self.run_dir.agent_dir(name)), layout.SOCKET_DIR,
            "--bind", str(self.run_dir.ui_dir(name)), layout.WEB_DIR,
            "--bind", str(self.state_dir.agent_home(name)), layout.HOME,
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
            # The cage's init keeps only what it needs to start the harness and the
            # runtime's processes under their own uids, and to signal the latter.
            "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP",
            "--cap-add", "CAP_KILL",
            "--info-fd", str(info_fd),
            "--",
            *layout.python_argv(
                "init", "--uid", str(ids.uid), "--gid", str(ids.gid), "--harness-uid", str(ids.harness_uid)
            ),
        ]
        return a

    def stop(self, name: str, timeout: float) -> bool:
        cgroup = self.cgroup(name)
        was_running = bool(cgroup.pids())
        if not cgroup.kill_all(timeout):
            raise CageError(f"cage {name}: processes survived SIGKILL")
        self._info_file(name).unlink(missing_ok=True)
        if was_running:
            log.info("cage %s stopped", name)
        return was_running

    def destroy(self, name: str) -> None:
        self.stop(name, timeout=2.0)
        self.cgroup(name).remove()
        shutil.rmtree(self._agent_state(name), ignore_errors=True)
        shutil.rmtree(self.run_dir.agent_dir(name), ignore_errors=True)
        shutil.rmtree(self.run_dir.ui_dir(name), ignore_errors=True)
        shutil.rmtree(self._cage_dir(name), ignore_errors=True)
        self.ids.release(name)
        log.info("cage %s destroyed", name)

    def exec_argv(
        self, name: str, argv: list[str], env: dict[str, str], *,
        tty: bool = False, trust_home: bool = False, as_agent: bool = False,
    ) -> list[str]:
        """The chain ``hive exec`` runs (hyperhive.cage.exec_ has the in-cage steps).

        nsenter the cage's mount, uts, ipc and net namespaces and its root; then, unless
        ``as_agent``, ``unshare`` a NEW pid namespace (a sibling of the cage's, not
        inside it: nothing the agent runs can see, signal, trace or read any process
        of this exec) with its own /proc, in a private copy of the mount namespace,
        where a fresh empty HOME is mounted (unless ``trust_home``); then become the
        agent for good (setpriv), a clean environment (env -i), and the exec's init,
        which installs the cage's seccomp filter and runs argv."""
        from hyperhive.cage import exec_  # here: this method is all of exec in this module

        ids = self.ids.get(name)
        info = self.info(name)
        cgroup = self.cgroup(name)
        if ids is None or info is None or info.get("child_pid") not in cgroup.pids():
            raise CageError(f"cage {name} is not running")
        trust_home = trust_home or as_agent
        clean = {} if trust_home else {
            "HOME": exec_.EXEC_HOME, "PYTHONNOUSERSITE": "1", "PYTHONSAFEPATH": "1",
        }
        base_env = {**layout.base_env(name), **clean, **env}
        enter = [
            "nsenter", "--target", str(info["child_pid"]),
            "--mount", "--uts", "--ipc", "--net", "--root", "--wdns=/",
        ]
        if as_agent:
            enter += ["--pid", "--"]
        else:
            enter += ["--", "/usr/bin/unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
                      "--propagation", "private", "--"]
            if not trust_home:
                enter += layout.python_argv("exec-home", "--uid", str(ids.uid), "--gid", str(ids.gid), "--")
        return [
            *enter,
            "/usr/bin/setpriv", "--reuid", str(ids.uid), "--regid", str(ids.gid), "--clear-groups",
            "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs",
            "--", "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in base_env.items()),
            *layout.python_argv(
                "exec", *(["--tty"] if tty else []), "--cwd", layout.HOME if trust_home else "/", "--", *argv
            ),
        ]

    def cgroup(self, name: str) -> Cgroup:
        return Cgroup(name, self.cgroup_key)


def _dir(path: Path, uid: int, gid: int, mode: int) -> None:
    """A directory with exactly this owner and mode, whether it existed or not."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _read_all(fd: int, timeout: float) -> bytes:
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        if b"}" in chunk:
            break
    return b"".join(chunks)


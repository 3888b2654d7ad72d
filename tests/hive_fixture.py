"""A whole hive (``hive up``) as a subprocess, for the cage, hive-priv and
``hive exec`` tests. These need root (CI runs as root) and never skip.

``HiveProcess`` runs ``.venv/bin/hive --run-dir R up --config C --state-dir S
--listen 127.0.0.1:<free port>`` (``wrap`` goes before it, e.g. a network namespace's
``nsenter``; ``listen_host`` replaces 127.0.0.1) in a directory made with
``tempfile.mkdtemp(dir="/tmp")`` and opened to 0755 (hive-core runs as user
hive-core and must reach its state dir; pytest's /tmp/pytest-of-root is 0700).
``start()`` waits for ``hive: ready`` and then until ``agent_status`` shows every
agent running (its harness connected). ``stop()`` sends SIGTERM; the fixtures
assert exit status 0 and that no process is left in any cage's cgroup.

Each hive's cgroups live under its own key (/sys/fs/cgroup/…/hive/<key>/<name>,
``HiveProcess.cgroup``), so hives with the same agent names may run at once.
``caged_hive`` is module-scoped (pytest ends it with its module),
``hive_factory`` is function-scoped.

Probes that could harm the host if ``hive exec`` were broken (fork bomb, memory
hog, writes to system directories, mount, kill) go through ``probe()``: the
script first checks that it runs in a cage (uid != 0, /work, /root and the
hive's state and run dirs not visible, hostname == the agent's name) and exits
with ``NOT_CAGED`` otherwise; ``assert_caged`` checks that this sanity check ran
and passed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import render_toml
from hyperhive.cage import layout
from hyperhive.client import Client, HiveUnavailable, priv_send
from hyperhive.priv.cgroups import Cgroup, hive_key, remove_hive

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
HIVE = VENV_BIN / "hive"
READY_TIMEOUT = 90.0  # `hive: ready` now also waits for every agent to connect
RUNNING_TIMEOUT = 20.0
STOP_TIMEOUT = 45.0

AGENTS: dict[str, dict[str, Any]] = {
    "alice": {"runtime": "command", "command": ["true"], "peers": ["bob"]},
    "bob": {"runtime": "command", "command": ["true"]},
    "carol": {"runtime": "command", "command": ["true"]},
}
# Fields of an agent_status row that may change without anyone doing anything.
# While every agent stays up there are none but its cage's limit hits, which the kernel
# counts (an attack stopped at a limit is still counted and shown: that is the point).
VOLATILE_STATUS_FIELDS: frozenset[str] = frozenset({"oom_kills", "pids_refused"})

NOT_CAGED = 97  # a probe's exit status when it finds it is not inside a cage
CAGE_CHECK_OK = "cage-check: ok"
RESULT_PREFIX = "PROBE-RESULT "


def ensure_user(name: str) -> None:
    """Create a system user with its own group, no home, no shell (idempotent): the
    accounts of the legacy layout, which `hive up` no longer makes (it gives the core and
    the gateway ids of the host's registry, with no account)."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            check=True,
            capture_output=True,
        )



def host_addresses() -> list[str]:
    """The host's own non-loopback addresses (IPv4 and IPv6, global scope)."""
    out = subprocess.run(["ip", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
    addrs = []
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[2] in ("inet", "inet6"):
            addrs.append(parts[3].split("/")[0])
    return addrs


@contextlib.contextmanager
def host_abstract_listeners(names: list[str]) -> Iterator[None]:
    """Abstract unix sockets listening on the host, one per name, reachable from the
    host (checked first); afterwards, assert that nobody else connected to any."""
    listeners = []
    try:
        for n in names:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind("\0" + n)
            s.listen(8)
            s.setblocking(False)
            listeners.append(s)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:  # control: the host can connect
            c.connect("\0" + names[0])
        listeners[0].accept()[0].close()
        yield
        for s in listeners:
            with pytest.raises(BlockingIOError):
                s.accept()
    finally:
        for s in listeners:
            s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
    except OSError:
        pass
    return out


def proc_uid(pid: int) -> int | None:
    uid = proc_status(pid).get("Uid")
    return int(uid.split()[0]) if uid else None


def proc_start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def children(ppid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == ppid:
            out.append(int(entry))
    return out


def as_user(user: str | int | tuple[int, int] | None) -> dict[str, Any]:
    """subprocess keyword arguments to run as ``user`` (name or uid) with its primary
    group and no supplementary groups; or as ids with no account, ``(uid, gid)`` (a
    hive's core)."""
    if user is None:
        return {}
    if isinstance(user, tuple):
        return {"user": user[0], "group": user[1], "extra_groups": []}
    pw = pwd.getpwnam(user) if isinstance(user, str) else pwd.getpwuid(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class HiveProcess:
    """One ``hive up`` and helpers to look at and into it."""

    def __init__(self, agents: dict[str, dict[str, Any]] | None = None, base: Path | None = None,
                 sections: dict[str, dict[str, Any]] | None = None, wrap: list[str] | None = None,
                 listen_host: str = "127.0.0.1") -> None:
        if base is None:
            base = Path(tempfile.mkdtemp(prefix="hv", dir="/tmp"))
            os.chmod(base, 0o755)
        self.base = base
        self.run_dir = base / "run"
        self.state_dir = base / "state"
        self.config_path = base / "hive.toml"
        self.log_path = base / "up.log"
        self.port = free_port()
        self.listen_host = listen_host  # the gateway's address (a test host's, in its namespace)
        self.agents: dict[str, dict[str, Any]] = {}
        self.sections = dict(sections or {})  # other hive.toml tables, e.g. limits, egress
        self.wrap = list(wrap or [])  # e.g. SwarmNet.net_prefix(host): run `hive up` there
        self.write_config(AGENTS if agents is None else agents)
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout_lines: list[str] = []
        self.starts = 0
        self._caged: dict[str, Caged] = {}  # the agents' callers in their cages (caged())

    # -- configuration and paths -------------------------------------------------

    def write_config(self, agents: dict[str, dict[str, Any]]) -> None:
        self.agents = dict(agents)
        self.config_path.write_text(render_toml(self.agents, sections=self.sections))
        os.chmod(self.config_path, 0o644)

    @property
    def names(self) -> list[str]:
        return sorted(self.agents)

    @property
    def host_sock(self) -> Path:
        return self.run_dir / "host.sock"

    @property
    def priv_sock(self) -> Path:
        return self.run_dir / "priv.sock"

    def agent_sock(self, name: str) -> Path:
        return self.run_dir / "agents" / name / "agent.sock"

    def home(self, name: str) -> Path:
        """The agent's home as the host reaches it: through its running cage's root.
        The home is mounted in the cage's own mount namespace only (homes.open_home);
        on the host, ``agents/<name>/home`` is an empty root-only directory."""
        info = json.loads((self.state_dir / "priv" / "cages" / name / "info.json").read_text())
        return Path(f"/proc/{info['child_pid']}/root{layout.HOME}")

    # -- process -----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def start(self) -> None:
        assert not self.running, "this hive is already running"
        for name in self.names:  # a cage left over from an earlier run would be "found again"
            assert not self.cgroup(name).pids(), f"cgroup of {name} is busy: a cage of this hive is left over"
        cmd = [
            *self.wrap, str(HIVE), "--run-dir", str(self.run_dir), "up", "--config", str(self.config_path),
            "--state-dir", str(self.state_dir), "--listen", f"{self.listen_host}:{self.port}",
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, cwd=self.base,
            )
        finally:
            log.close()
        ready, said_ready = threading.Event(), threading.Event()
        proc = self.proc

        def pump() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:  # keep draining so `hive up` never blocks on stdout
                line = raw.decode(errors="replace").rstrip("\n")
                self.stdout_lines.append(line)
                if line.startswith("hive: ready"):
                    said_ready.set()
                    ready.set()
            ready.set()  # its stdout closed: it is exiting (not reaped yet, maybe)

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(READY_TIMEOUT) or not said_ready.is_set() or proc.poll() is not None:
            if not said_ready.is_set():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)  # its exit status, for the message
            rc = proc.poll()
            self.kill_everything()
            raise AssertionError(
                f"hive up did not print 'hive: ready' within {READY_TIMEOUT:.0f} s (exit {rc})\n"
                f"stdout: {self.stdout_lines}\nlog:\n{self.log_tail()}"
            )
        self.starts += 1
        try:
            self.wait_running()
        except AssertionError:
            self.kill_everything()
            raise

    def wait_running(self, names: list[str] | None = None, timeout: float = RUNNING_TIMEOUT) -> dict[str, Any]:
        """Until agent_status shows each agent running (harness connected)."""
        names = self.names if names is None else names

        def all_up() -> dict[str, Any] | None:
            try:
                rows = self.agent_status()
            except (OSError, ValueError, HiveUnavailable):  # the core may be (re)starting
                return None
            if not all(rows.get(n, {}).get("running") for n in names):
                return None
            # A caged harness binds its page's web.sock just after it connects (cold start:
            # init.connect_first), so "running" can come a moment before it: the tests that
            # compare the run directory before and after want it there.
            ui = self.run_dir / "ui"
            if not all((ui / n / "web.sock").is_socket() for n in names if (ui / n).is_dir()):
                return None
            return rows

        try:
            return wait_until(all_up, timeout, f"{names} to be running", interval=0.02)
        except AssertionError as e:
            raise AssertionError(f"{e}\nlog:\n{self.log_tail()}") from None

    def stop(self) -> int:
        """SIGTERM ``hive up`` and wait; returns its exit status."""
        assert self.proc is not None
        self.close_caged()  # their hive exec ends with their cages, but not before
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill_everything()
            raise AssertionError(f"hive up ignored SIGTERM for {STOP_TIMEOUT:.0f} s\n{self.log_tail()}") from None

    def stop_clean(self) -> None:
        rc = self.stop()
        assert rc == 0, f"hive up exited with {rc}\n{self.log_tail()}"
        self.assert_cages_empty()

    def assert_cages_empty(self) -> None:
        left = {name: self.cgroup(name).pids() for name in self.names}
        left = {name: pids for name, pids in left.items() if pids}
        assert not left, f"processes left in cage cgroups after stop: {left}"

    def kill_everything(self) -> None:
        """Last resort (a failed start or stop): kill hive up, its children and every cage."""
        self.close_caged()
        if self.proc is not None and self.proc.poll() is None:
            for pid in children(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    # nginx leads a process group of its own: take its workers too
                    os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()
        for name in self.names:
            self.cgroup(name).kill_all(1.0)

    def cleanup(self) -> None:
        key = hive_key(self.state_dir)  # while the path resolves as the hive's did
        unmount_below(self.base)
        shutil.rmtree(self.base, ignore_errors=True)
        # Its cages' cgroups: nothing else would remove them once the state dir is gone
        # (each a memory cgroup the kernel keeps; see cgroups.remove_hive).
        remove_hive(key)

    # -- processes of the hive ------------------------------------------------------

    def _child_running(self, module: str) -> int | None:
        assert self.proc is not None
        for pid in children(self.proc.pid):
            argv = proc_cmdline(pid)
            if "-m" in argv and module in argv:
                return pid
        return None

    @property
    def core_ids(self) -> tuple[int, int]:
        """(uid, gid) this hive's core runs under: its own, in STATE/core.id (made as
        ``hive core-id`` makes it if the hive never ran)."""
        from hyperhive.cli.core_identity import core_ids

        ids = core_ids(self.state_dir)
        return ids.uid, ids.gid

    def as_core(self) -> dict[str, Any]:
        """subprocess keyword arguments to run as this hive's core (no supplementary group)."""
        return as_user(self.core_ids)

    def core_pid(self) -> int | None:
        return self._child_running("hyperhive.core")

    def priv_pid(self) -> int | None:
        return self._child_running("hyperhive.priv")

    def cgroup(self, name: str) -> Cgroup:
        """The cage's cgroup, under this hive's own key."""
        return Cgroup(name, hive_key(self.state_dir))

    def cage_procs(self, name: str) -> list[int]:
        return self.cgroup(name).pids()

    def harness_pid(self, name: str) -> int:
        """The harness as the host sees it: the process in the cage with the harness uid."""
        harness_uid = self.cage(name)["harness_uid"]
        found = [
            pid for pid in self.cage_procs(name)
            if proc_uid(pid) == harness_uid and proc_cmdline(pid)[-1:] == ["harness"]
        ]
        assert len(found) == 1, (name, found, [(p, proc_cmdline(p)) for p in self.cage_procs(name)])
        return found[0]

    # -- sockets ---------------------------------------------------------------------

    def host_call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        with Client(self.host_sock, timeout=30) as c:
            return c.call(cmd, **fields)

    def agent_call(self, name: str, cmd: str, **fields: Any) -> dict[str, Any]:
        """On ``name``'s agent.sock from the host (root may connect; it speaks as ``name``)."""
        with Client(self.agent_sock(name), timeout=30) as c:
            return c.call(cmd, **fields)

    def agent(self, name: str, timeout: float = 30.0) -> Client:
        """A client on ``name``'s agent.sock from the host, kept open (as ``CoreProcess.agent``:
        the swarm tests use either); it speaks as ``name``."""
        return Client(self.agent_sock(name), timeout=timeout)

    def caged(self, name: str) -> Caged:
        """``name``'s calls made from inside its cage (``Caged``, one per agent, kept until
        ``stop``): what ``agent`` is from the host."""
        if name not in self._caged:
            self._caged[name] = Caged(self, name)
        return self._caged[name]

    def close_caged(self) -> None:
        for caged in self._caged.values():
            caged.close()

    def priv(self, cmd: str, **fields: Any) -> dict[str, Any]:
        return priv_send(str(self.priv_sock), json.dumps({"cmd": cmd, **fields}).encode() + b"\n")

    def cage(self, name: str) -> dict[str, Any]:
        """hive-priv's status row for ``name`` (running, pid, uid, gid, harness_uid)."""
        reply = self.priv("status", names=[name])
        assert reply.get("ok"), reply
        return reply["cages"][name]

    def agent_status(self) -> dict[str, dict[str, Any]]:
        reply = self.host_call("agent_status")
        assert reply.get("ok"), reply
        return {row["name"]: row for row in reply["agent_statuses"]}

    def state(self) -> dict[str, Any]:
        """Everything the operator sees of the hive, minus fields that change by themselves."""
        rows = [
            {k: v for k, v in row.items() if k not in VOLATILE_STATUS_FIELDS}
            for _, row in sorted(self.agent_status().items())
        ]
        out: dict[str, Any] = {"agent_status": rows}
        for cmd in ("pending", "questions", "inbox", "list"):
            reply = self.host_call(cmd)
            assert reply.get("ok"), reply
            out[cmd] = {k: v for k, v in reply.items() if k not in ("ok", "version")}
        return out

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.state(), sort_keys=True).encode()).hexdigest()

    @contextlib.contextmanager
    def unchanged(self) -> Iterator[None]:
        """Assert that the hive's state (as host.sock shows it) is the same afterwards."""
        before, digest = self.state(), self.digest()
        yield
        after = self.state()
        assert self.digest() == digest, f"the hive's state changed:\nbefore {before}\nafter  {after}"

    # -- hive exec ---------------------------------------------------------------------

    def exec(
        self, name: str, *argv: str, input: str | bytes | None = None, timeout: float = 60,
        user: str | int | tuple[int, int] | None = None, flags: tuple[str, ...] = ("--as-agent",),
    ) -> subprocess.CompletedProcess[Any]:
        """``hive --run-dir R exec FLAGS NAME -- ARGV...``; text unless ``input`` is bytes.
        By default ``--as-agent``: probes must act exactly as the agent's own processes
        (its pid namespace, home and cwd); test_exec.py passes ``flags=()``."""
        cmd = [str(HIVE), "--run-dir", str(self.run_dir), "exec", *flags, name, "--", *argv]
        text = not isinstance(input, bytes)
        return subprocess.run(
            cmd, input=input, capture_output=True, timeout=timeout, text=text,
            **({"errors": "replace"} if text else {}),
            **as_user(user),
        )

    def host_paths(self) -> list[str]:
        """Paths of the host that must not exist inside any cage."""
        return ["/work", "/root", str(self.state_dir), str(self.run_dir), str(self.base), str(REPO)]

    def probe(self, name: str, script: str, *, timeout: float = 90, **params: Any) -> subprocess.CompletedProcess[str]:
        """Run a Python probe in ``name``'s cage (on stdin of ``python3 -``), behind the
        cage sanity check. ``params`` are available to the script as ``P``."""
        guard = textwrap.dedent(f"""\
            import json, os, socket, sys
            P = json.loads({json.dumps(json.dumps(params))})

            def _not_caged():
                if os.getuid() == 0 or os.geteuid() == 0 or os.getgid() == 0:
                    return "running as root"
                for p in {self.host_paths()!r}:
                    if os.path.lexists(p):
                        return p + " is visible"
                if socket.gethostname() != {name!r}:
                    return "hostname is " + socket.gethostname()
                return None

            _why = _not_caged()
            if _why:
                print("NOT IN A CAGE: " + _why, flush=True)
                sys.stdout.flush()
                os._exit({NOT_CAGED})
            print({CAGE_CHECK_OK!r}, flush=True)

            def result(**kw):
                print({RESULT_PREFIX!r} + json.dumps(kw), flush=True)
        """)
        return self.exec(name, "python3", "-", input=guard + textwrap.dedent(script), timeout=timeout)


def assert_caged(proc: subprocess.CompletedProcess[str]) -> None:
    """The probe's own sanity check ran and passed: it was inside a cage."""
    assert proc.returncode != NOT_CAGED, f"probe ran OUTSIDE a cage: {proc.stdout}{proc.stderr}"
    assert CAGE_CHECK_OK in proc.stdout.splitlines(), (
        f"the probe's cage check did not run (exit {proc.returncode})\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    )


def probe_result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert_caged(proc)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert len(lines) == 1, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return json.loads(lines[0][len(RESULT_PREFIX):])


# In the cage, for ``Caged``: first who and where it is (its uid, its hostname, which of
# the host's paths in argv it can see), then each request line on stdin to the agent's
# own socket (a connection each: a hive-core started again meanwhile is no matter) and
# the reply line to stdout.
RELAY = """
import json, os, socket, sys
seen = [p for p in sys.argv[1:] if os.path.lexists(p)]
print(json.dumps({"uid": os.getuid(), "host": socket.gethostname(), "seen": seen}), flush=True)
for line in sys.stdin:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(120)
        s.connect("/run/hive/agent.sock")
        s.sendall(line.encode())
        sys.stdout.write(s.makefile("r").readline())
        sys.stdout.flush()
"""


class Caged:
    """An agent whose every ``call`` is made from inside its cage: one process there
    (``hive exec --as-agent``: its uid, its pid namespace, on its ``/run/hive/agent.sock``,
    whose listener takes it as the agent by SO_PEERCRED), started at the first call and
    kept for the next ones (a call costs a socket round trip, not a cage entry), ended
    by ``close`` (``HiveProcess.stop`` closes its own). A stand-in for
    ``HiveProcess.agent``'s client where a test must show the agent itself acted, not
    root on its socket. Before its first call it checks that it is in the cage: its uid
    is the one hive-priv gave the agent, its hostname the agent's name, and none of the
    host's paths (``HiveProcess.host_paths``) is visible."""

    def __init__(self, hive: HiveProcess, name: str) -> None:
        self.hive, self.name = hive, name
        self.proc: subprocess.Popen[str] | None = None
        self.lock = threading.Lock()  # one request in flight: replies come in order

    def _start(self) -> subprocess.Popen[str]:
        argv = [str(HIVE), "--run-dir", str(self.hive.run_dir), "exec", "--as-agent", self.name, "--",
                "python3", "-u", "-c", RELAY, *self.hive.host_paths()]  # fmt: skip
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        uid = self.hive.cage(self.name)["uid"]
        if not first or json.loads(first) != {"uid": uid, "host": self.name, "seen": []} or uid == 0:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{self.name}'s caller is not in its cage: {first!r} (its uid {uid})")
        return proc

    def call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = self._start()
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            assert line, f"{self.name}'s caller in its cage ended (exit {self.proc.poll()})"
            reply: dict[str, Any] = json.loads(line)
            return reply

    def close(self) -> None:
        with self.lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def in_cage(hive: HiveProcess, name: str, *calls: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``calls`` made in turn by ``name`` from inside its cage (``Caged``); their replies."""
    caged = hive.caged(name)
    return [caged.call(cmd, **fields) for cmd, fields in calls]


def _finish(hives: list[HiveProcess]) -> None:
    failures = []
    for h in hives:
        try:
            if h.running:
                rc = h.stop()
                if rc != 0:
                    failures.append(f"hive up exited with {rc} at teardown\n{h.log_tail()}")
            left = {n: h.cgroup(n).pids() for n in h.names}
            if any(left.values()):
                failures.append(f"processes left in cage cgroups: {left}\n{h.log_tail()}")
                for n in h.names:
                    h.cgroup(n).kill_all(1.0)
        finally:
            h.cleanup()
    assert not failures, "\n".join(failures)


HiveFactory = Callable[..., HiveProcess]


def unmount_below(base: Path) -> None:
    """Detach every filesystem mounted under ``base`` (agent homes left mounted by a
    hive that was killed rather than stopped), so removing ``base`` can't reach into them."""
    prefix = str(Path(base).resolve()) + "/"
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True)


def running_hive(hive: HiveProcess) -> Iterator[HiveProcess]:
    """Start HIVE for a fixture to yield (cleaned up if it can't start), stopped and checked after."""
    try:
        hive.start()
    except BaseException:
        hive.cleanup()
        raise
    yield hive
    _finish([hive])


@pytest.fixture(scope="module")
def caged_hive() -> Iterator[HiveProcess]:
    """One hive (alice -> bob, bob, carol; all in cages) shared by a module's tests."""
    yield from running_hive(HiveProcess())


@pytest.fixture
def hive_factory() -> Iterator[HiveFactory]:
    """Build (and by default start) hives; each still running at teardown gets SIGTERM,
    must exit 0 and leave no process in its cages."""
    made: list[HiveProcess] = []

    def make(agents: dict[str, dict[str, Any]] | None = None, *, start: bool = True, **kw: Any) -> HiveProcess:
        hive = HiveProcess(agents, **kw)
        made.append(hive)
        if start:
            hive.start()
        return hive

    yield make
    _finish(made)

"""The launcher, ``hive up``, attacked from where the operator stands.

- ``launcher.import-path``: root's children (hive-priv, the socket-activation
  shim) and hive-core must not import code from the directory ``hive up`` was
  started in, nor obey the ``PYTHON*`` variables (or any other variable) of the
  operator's shell. Each planted module writes a marker file when imported; the
  children must run ``python -I`` from ``/`` with an explicit environment.
- ``launcher.second-hive``: a second ``hive up`` on a run dir or state dir in use
  is refused at once, naming the pid that holds it, and changes nothing; the
  locks can't be faked or denied by the hive-core user.
- ``launcher.readiness``: ``hive: ready`` only when every surface serves (our
  nginx holds the port, agents' harnesses connected); a port someone else holds
  is a one-line error, non-zero exit, nothing left running.

These start real ``hive up`` processes (temp dirs under /tmp, free ports); most
hives have no agents, so they start fast.
"""

from __future__ import annotations

import contextlib
import os
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

from hive_fixture import (
    HIVE,
    READY_TIMEOUT,
    VENV_BIN,
    HiveProcess,
    children,
    proc_cmdline,
    wait_until,
)
from hyperhive.cli.instance_lock import LOCK_DIR, lock_name

REF_PATH = "CVE-2008-5983 (Python puts the working directory on sys.path)"
REF_SINGLE = "systemd socket activation: one owner per socket; lock files only root can create"
REF_READY = "omnigent PR#1717: fail closed when the sandbox cannot be applied"
# What a Python child of `hive up` may find in its environment, and nothing else (TMPDIR:
# the core's, its state dir, set by core_sandbox: its /tmp is read-only).
CHILD_ENV = {"PATH", "LANG", "HIVE_LOG_LEVEL", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "TMPDIR"}
REFUSE_TIMEOUT = 20.0  # seconds: a refusal happens before anything starts


class Launched(HiveProcess):
    """A ``hive up`` started from a chosen directory with a chosen environment, on
    chosen (possibly someone else's) run and state dirs."""

    def __init__(self, agents: dict[str, dict[str, Any]] | None = None, *, cwd: Path | None = None,
                 env: dict[str, str] | None = None, run_dir: Path | None = None,
                 state_dir: Path | None = None, port: int | None = None) -> None:
        super().__init__({} if agents is None else agents)
        os.chmod(self.base, 0o755)
        self.cwd = cwd or self.base
        self.clean_exit = True  # whether teardown requires exit status 0
        self.env = env
        if run_dir is not None:
            self.run_dir = run_dir
        if state_dir is not None:
            self.state_dir = state_dir
        if port is not None:
            self.port = port

    def cmd(self) -> list[str]:
        return [str(HIVE), "--run-dir", str(self.run_dir), "up", "--config", str(self.config_path),
                "--state-dir", str(self.state_dir), "--listen", f"127.0.0.1:{self.port}"]

    def start(self) -> None:
        assert not self.running
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(self.cmd(), stdout=subprocess.PIPE, stderr=log,
                                         stdin=subprocess.DEVNULL, cwd=self.cwd, env=self.env)
        finally:
            log.close()
        ready = threading.Event()
        proc = self.proc
        self.ready_at: float | None = None
        self.ready_rows: dict[str, Any] | None = None

        def pump() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                self.stdout_lines.append(line)
                if line.startswith("hive: ready"):
                    # The very first look after `ready`: every agent must already be up.
                    with contextlib.suppress(Exception):
                        self.ready_rows = self.agent_status()
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(READY_TIMEOUT + 30) or proc.poll() is not None:
            rc = proc.poll()
            self.kill_everything()
            raise AssertionError(f"hive up did not get ready (exit {rc})\nstdout: {self.stdout_lines}\n"
                                 f"log:\n{self.log_tail()}")
        self.starts += 1

    def attempt(self) -> subprocess.CompletedProcess[str]:
        """Run a ``hive up`` that is expected to refuse: it must exit by itself, quickly."""
        try:
            return subprocess.run(self.cmd(), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  cwd=self.cwd, env=self.env, timeout=REFUSE_TIMEOUT, check=False)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"hive up did not refuse within {REFUSE_TIMEOUT:.0f} s: "
                                 f"stdout {e.stdout!r} stderr {e.stderr!r}") from None


@pytest.fixture
def launch() -> Iterator[Any]:
    made: list[Launched] = []

    def make(agents: dict[str, dict[str, Any]] | None = None, *, start: bool = True, **kw: Any) -> Launched:
        h = Launched(agents, **kw)
        made.append(h)
        if start:
            h.start()
        return h

    yield make
    failures = []
    for h in reversed(made):
        if h.running:
            rc = h.stop()
            if rc != 0 and h.clean_exit:
                failures.append(f"hive up exited with {rc}\n{h.log_tail()}")
        for n in h.names:
            h.cgroup(n).kill_all(1.0)
    for h in made:
        h.cleanup()
    assert not failures, "\n".join(failures)


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(e.decode(errors="replace").partition("=")[::2] for e in raw.split(b"\0") if e)


def nginx_pid(h: Launched) -> int:
    assert h.proc is not None
    found = [p for p in children(h.proc.pid) if "nginx" in " ".join(proc_cmdline(p)[:1])]
    assert len(found) == 1, [(p, proc_cmdline(p)) for p in children(h.proc.pid)]
    return found[0]


def assert_isolated(h: Launched) -> None:
    """hive-priv and hive-core: ``python -I``, working directory ``/``, an environment of
    our own making; nginx: our prefix and config, from ``/``."""
    pids = {"hive-priv": h.priv_pid(), "hive-core": h.core_pid()}
    for name, pid in pids.items():
        assert pid is not None, (name, h.stdout_lines)
        argv = proc_cmdline(pid)
        assert argv[1:3] == ["-I", "-m"], f"{name} runs without -I: {argv}"
        env = proc_environ(pid)
        assert set(env) <= CHILD_ENV, f"{name} got the operator's environment: {sorted(set(env) - CHILD_ENV)}"
        assert env.get("TMPDIR", str(h.state_dir)) == str(h.state_dir), f"{name}'s TMPDIR: {env['TMPDIR']}"
        assert os.readlink(f"/proc/{pid}/cwd") == "/", f"{name} runs in {os.readlink(f'/proc/{pid}/cwd')}"
    ngx = nginx_pid(h)
    argv = " ".join(proc_cmdline(ngx)).split()  # nginx rewrites its title: "nginx: master process ..."
    assert "-p" in argv and "-c" in argv and Path(argv[argv.index("-c") + 1]).is_absolute(), argv
    assert os.readlink(f"/proc/{ngx}/cwd") == "/"


def evil_dir(base: Path) -> tuple[Path, Path]:
    """A directory to plant code in, and the (world-writable) directory its markers go to."""
    evil = base / "evil"
    marks = base / "marks"
    evil.mkdir()
    marks.mkdir()
    os.chmod(evil, 0o755)
    os.chmod(marks, 0o777)  # hive-core must be able to leave its mark too
    return evil, marks


def payload(marks: Path, tag: str) -> str:
    """Leaves a marker when imported by a child of ``hive up`` (``python [-I] -m ...``). The
    launcher itself is the operator's own process: PYTHONPATH reaches it by design, and
    the marker must tell its children apart."""
    return (f"import os, sys\nif '-m' in sys.orig_argv:\n"
            f"    open({str(marks)!r} + '/{tag}-' + str(os.getuid()) + '-' + str(os.getpid()), 'w')"
            ".write('imported')\n")


def plant(evil: Path, marks: Path, rel: str) -> None:
    path = evil / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(payload(marks, rel.replace("/", "_")))
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o644)


def assert_no_marks(marks: Path) -> None:
    left = sorted(p.name for p in marks.iterdir())
    assert not left, f"planted code ran (marker: tag-uid-pid): {left}"


# -- launcher.import-path ------------------------------------------------------------------

PLANTED = ["click.py", "pydantic.py", "jinja2.py", "json.py", "typing_extensions.py", "uvicorn.py",
           "hyperhive/__init__.py", "sitecustomize.py", "usercustomize.py"]


@pytest.mark.attack("launcher.import-path", ref=REF_PATH)
@pytest.mark.parametrize("rel", PLANTED)
def test_code_planted_in_the_working_directory_never_runs(launch: Any, rel: str) -> None:
    h = launch(start=False)
    evil, marks = evil_dir(h.base)
    plant(evil, marks, rel)
    h.cwd = evil
    h.start()
    assert_no_marks(marks)
    assert_isolated(h)


def env_case(name: str, evil: Path, marks: Path) -> dict[str, str]:
    """The hostile variables of case ``name`` (files they point at are planted in ``evil``)."""
    if name == "PYTHONPATH-uvicorn":  # hive-core imports it, the launcher does not
        plant(evil, marks, "uvicorn.py")
        return {"PYTHONPATH": str(evil)}
    if name == "PYTHONPATH-sitecustomize":
        plant(evil, marks, "sitecustomize.py")
        return {"PYTHONPATH": str(evil)}
    if name == "PYTHONSTARTUP+PYTHONINSPECT":
        plant(evil, marks, "startup.py")
        return {"PYTHONSTARTUP": str(evil / "startup.py"), "PYTHONINSPECT": "1"}
    if name == "PYTHONUSERBASE":
        plant(evil, marks, f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages/"
                           "usercustomize.py")
        return {"PYTHONUSERBASE": str(evil)}
    if name == "PYTHONPYCACHEPREFIX":
        (evil / "pycache").mkdir()
        os.chmod(evil / "pycache", 0o777)
        return {"PYTHONPYCACHEPREFIX": str(evil / "pycache")}
    return {
        "PYTHONINSPECT": {"PYTHONINSPECT": "1"},
        "PYTHONBREAKPOINT": {"PYTHONBREAKPOINT": "os.system"},
        "PYTHONOPTIMIZE": {"PYTHONOPTIMIZE": "2"},  # would strip every assert in hive-priv
        "PYTHONWARNINGS": {"PYTHONWARNINGS": "ignore"},
        "PYTHONDEVMODE": {"PYTHONDEVMODE": "1"},
        "PYTHONMALLOC": {"PYTHONMALLOC": "malloc"},
        "PYTHONHOME": {"PYTHONHOME": sys.base_prefix},
        "LD_LIBRARY_PATH": {"LD_LIBRARY_PATH": str(evil)},
        "HOME": {"HOME": str(evil)},
    }[name]


ENV_CASES = ["PYTHONPATH-uvicorn", "PYTHONPATH-sitecustomize", "PYTHONSTARTUP+PYTHONINSPECT", "PYTHONUSERBASE",
             "PYTHONPYCACHEPREFIX", "PYTHONINSPECT", "PYTHONBREAKPOINT", "PYTHONOPTIMIZE", "PYTHONWARNINGS",
             "PYTHONDEVMODE", "PYTHONMALLOC", "PYTHONHOME", "LD_LIBRARY_PATH", "HOME"]


@pytest.mark.attack("launcher.import-path", ref=REF_PATH)
@pytest.mark.parametrize("case", ENV_CASES)
def test_the_operators_environment_never_reaches_the_children(launch: Any, case: str) -> None:
    h = launch(start=False)
    evil, marks = evil_dir(h.base)
    hostile = env_case(case, evil, marks)
    # The launcher itself is the operator's process and takes their variables as given.
    h.env = {**os.environ, **hostile}
    # PYTHONINSPECT keeps the launcher's own interpreter going after SystemExit (a
    # traceback, status 1): the operator's variables are theirs to set for it.
    h.clean_exit = "PYTHONINSPECT" not in hostile
    h.start()
    assert_no_marks(marks)
    assert_isolated(h)
    for pid in (h.priv_pid(), h.core_pid()):
        assert pid is not None
        env = proc_environ(pid)
        assert not set(hostile) & set(env), f"{case} reached pid {pid}: {env}"
    if case == "PYTHONPYCACHEPREFIX":
        assert not any((evil / "pycache").iterdir()), "a child wrote bytecode where the variable said"


@pytest.mark.attack("launcher.import-path", ref=REF_PATH)
def test_hive_priv_run_by_hand_from_a_hostile_directory_fails_closed(tmp_path: Path) -> None:
    """``python -m hyperhive.priv`` as root (no -I) from a directory with a click.py:
    it refuses before importing click."""
    evil, marks = evil_dir(tmp_path)
    plant(evil, marks, "click.py")
    proc = subprocess.run([str(VENV_BIN / "python"), "-m", "hyperhive.priv"], cwd=evil, capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 1, proc
    assert "refusing to run as root with the working directory" in proc.stderr
    assert_no_marks(marks)


@pytest.mark.attack("launcher.import-path", ref=REF_PATH)
@pytest.mark.parametrize("script", ["hive", "hive-priv", "hive-core"])
def test_console_scripts_do_not_import_from_the_working_directory(tmp_path: Path, script: str) -> None:
    """The console scripts (systemd runs hive-priv and hive-core this way; the operator
    runs ``hive``) put their own bin directory first on sys.path, not the cwd."""
    evil, marks = evil_dir(tmp_path)
    plant(evil, marks, "click.py")
    proc = subprocess.run([str(VENV_BIN / script), "--help"], cwd=evil, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc
    assert_no_marks(marks)


# -- launcher.second-hive ----------------------------------------------------------------

def tree(path: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every entry under ``path``: (inode, mode, uid, mtime_ns): what a refusal must not touch."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(root) / name
            with contextlib.suppress(FileNotFoundError):
                st = p.lstat()
                out[str(p.relative_to(path))] = (st.st_ino, st.st_mode, st.st_uid, st.st_mtime_ns)
    st = path.lstat()
    out["."] = (st.st_ino, st.st_mode, st.st_uid, st.st_mtime_ns)
    return out


def snapshot(h: Launched) -> dict[str, Any]:
    skip = ("hive.db", "hive.db-wal", "hive.db-shm")  # the running core writes these
    state = {k: v for k, v in tree(h.state_dir).items() if not k.endswith(skip) and k != "."}
    return {"run": tree(h.run_dir), "state": state, "priv": h.priv_pid(), "core": h.core_pid(),
            "nginx": nginx_pid(h), "cages": {n: h.cage(n).get("pid") for n in h.names}}


def assert_refused(proc: subprocess.CompletedProcess[str], what: Path, pid: int) -> None:
    assert proc.returncode != 0, proc
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"hive: {what} is in use by hive up (pid {pid})"], proc.stderr
    assert "hive: ready" not in proc.stdout and "hive: starting" not in proc.stdout, proc.stdout


SOLO = {"lnsolo": {"runtime": "command", "command": ["true"]}}


@pytest.mark.attack("launcher.second-hive", ref=REF_SINGLE)
@pytest.mark.parametrize("shared", ["run", "state", "both", "run-via-symlink", "run-as-state"])
def test_a_second_hive_on_dirs_in_use_is_refused_and_changes_nothing(launch: Any, shared: str) -> None:
    first = launch(SOLO if shared == "run" else {})
    assert first.proc is not None
    if shared == "run":  # its cage settled (the harness makes its files as it comes up)
        first.wait_running()
        # and init has relayed the harness's first line to cage.log: the harness is seen
        # running as it connects, and the line can reach the file a moment later
        log = first.state_dir / "priv" / "cages" / "lnsolo" / "cage.log"
        wait_until(lambda: b"connected as lnsolo" in log.read_bytes(), 10, "the harness's line in cage.log")
    before = snapshot(first)
    second = launch(start=False)
    if shared in ("run", "both"):
        second.run_dir, what = first.run_dir, first.run_dir
    if shared in ("state", "both"):
        second.state_dir = first.state_dir
        what = first.run_dir if shared == "both" else first.state_dir
    if shared == "run-via-symlink":
        link = second.base / "link"
        link.symlink_to(first.base)
        second.run_dir = what = link / "run"
    if shared == "run-as-state":  # one hive's state dir as the other's run dir
        second.run_dir = what = first.state_dir
    proc = second.attempt()
    assert_refused(proc, what, first.proc.pid)
    assert snapshot(first) == before
    assert first.running
    assert first.host_call("agent_status")["ok"]
    if shared == "run":  # its cage was not stopped by the second hive's exit
        first.wait_running()
        assert first.cage("lnsolo")["running"]


@pytest.mark.attack("launcher.second-hive", ref=REF_SINGLE)
def test_the_lock_is_released_when_the_hive_stops(launch: Any) -> None:
    first = launch()
    assert first.stop() == 0
    assert not (LOCK_DIR / lock_name(first.run_dir)).exists()
    assert not (LOCK_DIR / lock_name(first.state_dir)).exists()
    second = launch(run_dir=first.run_dir, state_dir=first.state_dir)
    assert second.running and second.proc is not None
    assert (LOCK_DIR / lock_name(first.run_dir)).read_text().split()[0] == str(second.proc.pid)


@pytest.mark.attack("launcher.second-hive", ref=REF_SINGLE)
def test_the_lock_directory_is_roots_alone(launch: Any) -> None:
    h = launch()
    st = LOCK_DIR.lstat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o700)
    lock = LOCK_DIR / lock_name(h.run_dir)
    assert lock.lstat().st_uid == 0
    # The hive's core can neither create a lock file, nor open (and so flock) a held one.
    probe = ("import os, sys\n"
             "for f in sys.argv[1:]:\n"
             "    try:\n"
             "        os.open(f, os.O_RDONLY | os.O_CREAT, 0o644)\n"
             "        print('opened', f)\n"
             "    except OSError as e:\n"
             "        print('refused', e.errno)\n")
    proc = subprocess.run([sys.executable, "-c", probe, str(lock), str(LOCK_DIR / lock_name(Path("/x")))],
                          capture_output=True, text=True, timeout=30, check=False, **h.as_core())
    assert proc.stdout.split("\n")[:2] == ["refused 13", "refused 13"], proc


@contextlib.contextmanager
def core_holds(h: HiveProcess, paths: list[Path]) -> Iterator[None]:
    """``h``'s core creates these files and holds a flock on each (a decoy lock)."""
    script = ("import fcntl, os, sys, time\n"
              "fds = []\n"
              "for f in sys.argv[1:]:\n"
              "    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)\n"
              "    fcntl.flock(fd, fcntl.LOCK_EX)\n"
              "    os.write(fd, b'1\\n')\n"
              "    fds.append(fd)\n"
              "print('held', flush=True)\n"
              "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, paths)], stdout=subprocess.PIPE,
                            text=True, **h.as_core())
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield
    finally:
        proc.kill()
        proc.wait()


def core_writable(h: HiveProcess, *dirs: Path) -> None:
    """Dirs as ``h``'s core finds them once the hive ran: root and the core's group, 1775."""
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, 0, h.core_ids[1])
        os.chmod(d, 0o1775)


@pytest.mark.attack("launcher.second-hive", ref=REF_SINGLE)
@pytest.mark.parametrize("decoy", ["run/hive.lock", "run/.lock", "state/hive.lock", "run/up.lock"])
def test_core_decoy_locks_neither_deny_nor_fake_the_lock(launch: Any, decoy: str) -> None:
    """Files hive-core can create (in the run dir, the state dir) and hold do not keep a
    hive from starting; and the real lock still refuses a second hive."""
    first = launch(start=False)
    core_writable(first, first.run_dir, first.state_dir)
    with core_holds(first, [first.base / decoy]):
        first.start()
    assert first.proc is not None
    second = launch(start=False, run_dir=first.run_dir)
    assert_refused(second.attempt(), first.run_dir, first.proc.pid)


@pytest.mark.attack("launcher.second-hive", ref=REF_SINGLE)
def test_a_socket_hive_core_leaves_at_priv_sock_does_not_deny_the_hive(launch: Any) -> None:
    first = launch(start=False)
    core_writable(first, first.run_dir)
    script = ("import socket, sys, time\n"
              "s = socket.socket(socket.AF_UNIX)\n"
              "s.bind(sys.argv[1]); s.listen(1)\n"
              "print('listening', flush=True)\n"
              "time.sleep(600)\n")
    squatter = subprocess.Popen([sys.executable, "-c", script, str(first.priv_sock)], stdout=subprocess.PIPE,
                                text=True, **first.as_core())
    try:
        assert squatter.stdout is not None and squatter.stdout.readline().strip() == "listening"
        first.start()
        assert first.priv_sock.lstat().st_uid == 0
        assert first.priv("status")["ok"]
    finally:
        squatter.kill()
        squatter.wait()


@pytest.mark.attack("launcher.second-hive", ref=REF_SINGLE)
def test_a_live_root_priv_sock_not_run_by_hive_up_is_refused(launch: Any) -> None:
    """A hive run by systemd holds priv.sock (root's, listening) but no hive-up lock."""
    h = launch(start=False)
    h.run_dir.mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(h.priv_sock))
        s.listen(1)
        proc = h.attempt()
        assert proc.returncode != 0
        assert proc.stderr.strip().splitlines() == [
            f"hive: {h.run_dir} is in use by a running hive-priv (its priv.sock was opened by pid {os.getpid()})"
        ], proc.stderr
        s.getsockname()  # still ours, still bound
        assert h.priv_sock.lstat().st_uid == 0 and h.priv_sock.is_socket()


@pytest.mark.attack("launcher.second-hive", ref=REF_SINGLE)
@pytest.mark.parametrize("kind", ["symlink", "not-roots"])
def test_a_tampered_lock_file_refuses_and_is_never_followed(launch: Any, kind: str) -> None:
    h = launch(start=False)
    LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    lock = LOCK_DIR / lock_name(h.run_dir)
    target = h.base / "victim"
    target.write_text("precious\n")
    if kind == "symlink":
        lock.symlink_to(target)
    else:
        lock.write_text("")
        os.chown(lock, h.core_ids[0], 0)
    try:
        proc = h.attempt()
        assert proc.returncode != 0, proc
        assert len(proc.stderr.strip().splitlines()) == 1 and str(h.run_dir) in proc.stderr, proc.stderr
        assert target.read_text() == "precious\n"
        assert not h.run_dir.exists(), "a refused hive up created its run dir"
    finally:
        lock.unlink(missing_ok=True)


# -- launcher.readiness ------------------------------------------------------------------------

@contextlib.contextmanager
def listener(host: str, port: int, http: bool) -> Iterator[None]:
    """Someone else's server on the port; with ``http``, one that answers every request 200."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(16)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            with conn, contextlib.suppress(OSError):
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")

    t = threading.Thread(target=serve, daemon=True)
    if http:
        t.start()
    try:
        yield
    finally:
        stop.set()
        if http:
            t.join()
        srv.close()


@pytest.mark.attack("launcher.readiness", ref=REF_READY)
@pytest.mark.parametrize("bind,http", [("127.0.0.1", False), ("127.0.0.1", True), ("0.0.0.0", False),
                                       ("0.0.0.0", True)])
def test_a_taken_port_is_a_one_line_error_and_nothing_runs(launch: Any, bind: str, http: bool) -> None:
    h = launch(start=False)
    with listener(bind, h.port, http):
        proc = h.attempt()
    assert proc.returncode != 0, proc
    assert "hive: ready" not in proc.stdout, proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hive:")]
    expected = (f"hive: 127.0.0.1:{h.port} is already in use by another program (pid {os.getpid()}); "
                "choose another with --listen")
    assert errors == [expected], proc.stderr
    assert not h.run_dir.exists(), "the refused hive up prepared its run dir"
    assert not list(LOCK_DIR.glob(lock_name(h.run_dir))), "the refused hive up left its lock file"


@pytest.mark.attack("launcher.readiness", ref=REF_READY)
@pytest.mark.parametrize("n", [1, 3])
def test_ready_only_once_every_agent_is_connected(launch: Any, n: int) -> None:
    agents = {f"lnrdy{i}": {"runtime": "command", "command": ["true"]} for i in range(n)}
    h = launch(agents)
    assert h.ready_rows is not None, h.stdout_lines
    assert {name: row["running"] for name, row in h.ready_rows.items()} == dict.fromkeys(agents, True)
    ready = next(i for i, line in enumerate(h.stdout_lines) if line.startswith("hive: ready"))
    waits = [line for line in h.stdout_lines[:ready] if line.startswith("hive: waiting for")]
    assert all(line.endswith(")") for line in waits), waits


@pytest.mark.attack("launcher.readiness", ref=REF_READY)
def test_a_stopped_agent_does_not_hold_up_ready(launch: Any) -> None:
    agents = {"lnup": {"runtime": "command", "command": ["true"]}, "lndown": {"runtime": "command",
                                                                             "command": ["true"]}}
    h = launch(agents)
    h.wait_running()
    assert h.host_call("stop", scope={"agent_names": ["lndown"]})["ok"]
    assert h.stop() == 0
    h.start()
    assert h.ready_rows is not None
    assert {n: r["running"] for n, r in h.ready_rows.items()} == {"lnup": True, "lndown": False}


@pytest.mark.attack("launcher.readiness", ref=REF_READY)
def test_ready_means_our_nginx_holds_the_port_and_reaches_our_core(launch: Any) -> None:
    h = launch()
    master = nginx_pid(h)
    port_inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == h.port:
                port_inodes.add(f"socket:[{f[9]}]")
    fds = {os.readlink(f"/proc/{master}/fd/{fd}") for fd in os.listdir(f"/proc/{master}/fd")}
    assert port_inodes and port_inodes <= fds
    assert Path(" ".join(proc_cmdline(master)).split()[-1]).parent == h.run_dir / "gateway"


@pytest.mark.attack("launcher.readiness", ref=REF_READY)
def test_sigterm_while_starting_stops_everything(launch: Any) -> None:
    h = launch({"lnsig": {"runtime": "command", "command": ["true"]}}, start=False)
    proc = subprocess.Popen(h.cmd(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, cwd=h.base)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("hive: starting")
    wait_until(lambda: h.priv_sock.exists(), 20, "priv.sock")
    kids = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert "hive: ready" not in out, out
    assert proc.returncode == 0, (out, err)
    deadline = time.monotonic() + 0.5  # its children gone within 0.5 s of its exit
    while [k for k in kids if Path(f"/proc/{k}").exists()] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [k for k in kids if Path(f"/proc/{k}").exists()], "children left behind"
    assert not h.cgroup("lnsig").pids()
    assert not h.priv_sock.exists()


@pytest.mark.attack("launcher.readiness", ref=REF_READY)
@pytest.mark.parametrize("listen", ["192.0.2.1", "not-a-host.invalid"])
def test_an_address_the_gateway_cannot_listen_on_is_a_one_line_error(launch: Any, listen: str) -> None:
    """Not an address of this host (TEST-NET-1), or no address at all: refused before
    anything starts, not after hive-priv, hive-core and the cages did."""
    h = launch(start=False)
    cmd = h.cmd()
    cmd[-1] = f"{listen}:{h.port}"
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=h.base,
                          timeout=REFUSE_TIMEOUT, check=False)
    assert proc.returncode != 0, proc
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hive:")]
    assert len(errors) == 1 and errors[0].startswith(f"hive: cannot listen on {listen}:{h.port}: "), proc.stderr
    assert "hive: starting" not in proc.stdout, proc.stdout
    assert not h.run_dir.exists()

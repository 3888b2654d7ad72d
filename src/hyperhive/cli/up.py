"""``hive up``: the whole hive in the foreground, playing the part systemd plays
in production: it starts each process, restarts one that dies, and on SIGINT /
SIGTERM stops everything cleanly.

Like systemd, it starts its children the same way whoever runs it and wherever:
Python children (hive-priv and the socket-activation shim as root, hive-core)
run isolated (``python -I``: neither the current directory nor ``PYTHON*``
variables reach ``sys.path`` or run code), every child gets a small explicit
environment and ``/`` as its working directory, and nginx gets its own prefix.
Only one ``hive up`` may use a run dir or a state dir (``instance_lock``), and
``hive: ready`` means every surface serves: hive-priv, host.sock, the gateway
(our nginx holds the port and reaches core.sock) and every agent that should run."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import grp
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import click

from hyperhive.cli import agents_fs, instance_lock
from hyperhive.cli.core_identity import (
    CoreIdentityError,
    CoreIds,
    adopt_files,
    core_identity,
    gateway_ids,
)
from hyperhive.cli.instance_lock import InUse
from hyperhive.client import Client, HiveUnavailable, priv_call
from hyperhive.config import CONFIG_REFUSED, ConfigError, load_config, parse_listen
from hyperhive.display import dumps, visible
from hyperhive.gateway import config as gateway_config
from hyperhive.paths import DEFAULT_RUN_DIR, DEFAULT_STATE_DIR
from hyperhive.priv import safefs
from hyperhive.priv.ids import BASE_UID, IdsExhausted
from hyperhive.unixsock import bind_listener
from hyperhive.wire import priv as wp

log = logging.getLogger("hive.up")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
UNREAPED_AFTER = 5.0  # s a process's main thread may be a zombie before `unreaped` runs
MAX_BACKOFF = 10.0
# The first restart comes at once: every agent is unreachable until hive-core is back (the
# restart's target is 5 s at 1,000 cages); a crash loop still backs off, doubling.
FIRST_BACKOFF = 0.1
EXIT_POLL = 0.05  # seconds between looks at whether a supervised process has exited
CONFIG_POLL = 1.0  # seconds between looks at hive.toml while the core waits for a change
ADMIN_GROUP = "hive-admin"
AGENTS_TIMEOUT = 60.0  # seconds for every agent that should run to connect its harness
PROGRESS_EVERY = 5.0  # seconds between "waiting for N agents" lines
# The children's whole environment: nothing of the operator's shell (PYTHON*, LD_*, ...).
CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Progress:
    """What ``hive up`` tells whoever started it: ``hive: …`` lines (failures on
    stderr), or with ``--json`` one JSON object a line on stdout, flushed at once:
    ``{"version": 1, "ok": true, "phase": PHASE, ...}`` for starting, address_shared
    (run_dir, port: another hive's gateway on this address), waiting (agents),
    agent_failed (agents; the rest go on), ready (login, host_sock), stopping and
    stopped; ``{"version": 1, "ok": false, "phase": "error", "error": ...}`` when it
    can't start or stop cleanly (exit 1). The log lines stay on stderr."""

    as_json = False

    def say(self, phase: str, text: str, **fields: Any) -> None:
        if self.as_json:
            line = {"version": 1, "ok": True, "phase": phase, **fields}
            print(dumps(line), flush=True)
        else:
            print(f"hive: {visible(text, one_line=True)}", flush=True)

    def warn(self, phase: str, text: str, **fields: Any) -> None:
        if self.as_json:
            self.say(phase, text, message=text, **fields)
        else:
            RELAY.put(f"hive: {visible(text, one_line=True)}", own=True)

    def error(self, text: str) -> None:
        if self.as_json:
            line = {"version": 1, "ok": False, "phase": "error", "error": text}
            print(dumps(line), flush=True)
        else:
            RELAY.put(f"hive: {visible(text, one_line=True)}", own=True)


PROGRESS = Progress()


def python_argv(module: str, *args: str) -> list[str]:
    """``python -I -m MODULE ARGS``: isolated mode ignores every ``PYTHON*`` variable
    (-E), the user's site directory (-s) and puts neither the working directory nor
    a script's directory on ``sys.path`` (-P), so a ``click.py`` or ``sitecustomize.py``
    where the operator happens to stand is never imported (as root). The venv's
    site-packages, and the editable install's .pth in it, are still found: they
    come from ``sys.executable``'s pyvenv.cfg, not from the environment."""
    return [sys.executable, "-I", "-m", module, *args]


def child_env() -> dict[str, str]:
    """The explicit environment of every child (hive-priv, hive-core, nginx)."""
    env = {"PATH": CHILD_PATH, "LANG": "C.UTF-8"}
    level = os.environ.get("HIVE_LOG_LEVEL", "")
    if level.isalpha():  # the one knob the operator may pass down
        env["HIVE_LOG_LEVEL"] = level
    return env


def ensure_group(name: str) -> None:
    """Create a system group if it's missing (idempotent)."""
    try:
        grp.getgrnam(name)
    except KeyError:
        subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
        log.info("created group %s", name)


class StderrRelay:
    """The children's stderr lines onto ours from a thread of its own: a terminal that
    stops reading (Ctrl-S, a stalled ssh session) stalls that thread, never `hive up`'s
    loop (which supervises, and takes SIGTERM), and never the children, whose pipes are
    still read. Past ``limit`` characters waiting, lines are dropped and counted; the
    count is told once there is room again (red team of session 17: a worker's flood on
    a stalled terminal froze `hive up`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lines: collections.deque[str] = collections.deque()
        self.held = 0  # characters waiting
        self.unwritten = 0  # lines taken and not yet written out
        self.dropped = 0
        self.ready = threading.Condition()
        self.thread: threading.Thread | None = None

    def put(self, text: str, own: bool = False) -> None:
        """``own``: a line of `hive up`'s own (its log, its failures), never dropped."""
        with self.ready:
            if self.thread is None:
                self.thread = threading.Thread(target=self._write, name="stderr-relay", daemon=True)
                self.thread.start()
            if not own and self.held + len(text) > self.limit:
                self.dropped += 1
                return
            if self.dropped:
                self.lines.append(f"hive: {self.dropped} line(s) of the children's dropped")
                self.unwritten += 1
                self.dropped = 0
            self.lines.append(text)
            self.unwritten += 1
            self.held += len(text)
            self.ready.notify()

    def drain(self, timeout: float) -> None:
        """Wait until every line was written (at most ``timeout`` s: a stalled terminal)."""
        deadline = time.monotonic() + timeout
        while self.unwritten and time.monotonic() < deadline:
            time.sleep(0.01)

    def _write(self) -> None:
        while True:
            with self.ready:
                while not self.lines:
                    self.ready.wait()
                text = self.lines.popleft()
                self.held -= len(text)
            try:
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass  # our stderr gone: nothing to tell it
            with self.ready:
                self.unwritten -= 1


RELAY = StderrRelay(4 << 20)  # characters waiting for a stalled terminal, at most


class RelayedLog(logging.Handler):
    """`hive up`'s own log lines, through RELAY: in order with the children's, and never
    a write from the event loop to a terminal that may have stalled."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            RELAY.put(self.format(record), own=True)
        except Exception:
            self.handleError(record)


def _file_state(path: Path) -> tuple[int, ...] | str:
    """What tells a file's change: its inode, size and times (an editor's rename too), or
    why it can't be read."""
    try:
        st = path.stat()
    except OSError as e:
        return e.strerror or str(e)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Supervised:
    """One child process, restarted with backoff if it dies while the hive runs.

    With ``own_group`` it runs in a session (and process group) of its own, and
    whatever is left in that group when it exits is killed before it starts
    again: an nginx master killed with SIGKILL leaves its workers running, and
    they would keep the listening port (the new master could not bind it) and
    serve with the old configuration."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        ready_prefix: str | None,
        ready_check: Callable[[], Awaitable[bool]] | None = None,
        own_group: bool = False,
        ready_timeout: float = READY_TIMEOUT,
        before_start: Callable[[], Awaitable[None]] | None = None,
        relay_stderr: bool = False,
        extra_env: dict[str, str] | None = None,
        after_start: Callable[[int], None] | None = None,
        on_exit: Callable[[], None] | None = None,
        config: Path | None = None,
        after_exit: Callable[[], Awaitable[None]] | None = None,
        unreaped: Callable[[], Awaitable[object]] | None = None,
        **popen: Any,
    ) -> None:
        self.name = name
        # Run once when its main thread has exited (or it was killed) but the process
        # stays unreaped for UNREAPED_AFTER s: a thread of it asleep uninterruptibly on a
        # lock another process holds (the core's: a cage's; re-check of session 29).
        self.unreaped = unreaped
        # The file whose refusal (exit status CONFIG_REFUSED) only a change of it can
        # undo: no start again until it changes (None: none ever will, hive.toml embedded).
        # What it was as the last start began: an edit made while that start read it counts.
        self.config = config
        self.config_seen: tuple[int, ...] | str | None = None
        # Run as soon as it has exited, before any wait (the core's leftovers killed and
        # its listeners bound afresh: nothing of its ids serves while none runs).
        self.after_exit = after_exit
        self.cleared = False  # after_exit, being before_start, ran since the last start
        self.extra_env = extra_env or {}
        # Told the pid of each start once it is ready (nginx's pid file for hive-priv),
        # and that it exited (the pid file removed).
        self.after_start = after_start
        self.on_exit = on_exit
        # Run before each start (a restart too): the core's leftovers killed, its
        # listeners bound afresh.
        self.before_start = before_start
        # Its stderr through a pipe, each line shown escaped on ours: a child that is not
        # root (the core, nginx's workers) never holds the operator's terminal (TIOCSTI,
        # escape sequences, reading what is typed).
        self.relay_stderr = relay_stderr
        self.relayer: asyncio.Future[None] | None = None
        self.ready_timeout = ready_timeout
        self.argv = argv
        self.ready_prefix = ready_prefix
        self.ready_check = ready_check
        self.own_group = own_group
        self.popen = popen
        self.proc: asyncio.subprocess.Process | None = None
        # Held: the event loop keeps only a weak reference to a task.
        self.drainer: asyncio.Future[None] | None = None
        self.stopping = False

    def stop_requested(self) -> bool:
        # A call, not the attribute: stop() sets it while supervise() awaits, and mypy
        # would take the attribute for still False after `while not self.stopping`.
        return self.stopping

    async def start(self) -> None:
        # Not again right after ``after_exit`` (the same clearing, for the core): nothing
        # has run since with its ids (only `hive up` starts a process as them), and a
        # clearing scans /proc twice or more (~0.5 s among 1,000 cages).
        if self.before_start is not None and not self.cleared:
            await self.before_start()
        self.cleared = False
        if self.stop_requested():  # asked meanwhile: nothing is started after a stop
            return
        if self.config is not None:
            self.config_seen = await asyncio.to_thread(_file_state, self.config)
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdout=asyncio.subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=self.own_group,
            env={**child_env(), **self.extra_env},
            cwd="/",
            stderr=asyncio.subprocess.PIPE if self.relay_stderr else None,
            **self.popen,
        )
        if self.stop_requested():  # asked while it was being spawned: stop() saw none
            self.proc.kill()
            await self.exited()
            return
        assert self.proc.stdout is not None
        if self.relay_stderr:
            assert self.proc.stderr is not None
            self.relayer = asyncio.ensure_future(self._relay(self.proc.stderr))
        deadline = time.monotonic() + self.ready_timeout
        pause = 0.005
        while self.ready_check is not None:
            if await self.ready_check():
                break
            if self.proc.returncode is not None or time.monotonic() > deadline:
                if self.proc.returncode is None:
                    self.proc.kill()
                code = await self.exited()
                raise RuntimeError(
                    f"{self.name} did not become ready (status {code}; its log is above)"
                )
            await asyncio.sleep(pause)
            pause = min(0.05, pause * 2)
        while self.ready_check is None:
            try:
                line = await asyncio.wait_for(
                    self.proc.stdout.readline(), deadline - time.monotonic()
                )
            except TimeoutError:
                self.proc.kill()
                await self.exited()
                raise RuntimeError(
                    f"{self.name} did not become ready within {self.ready_timeout:.0f} s"
                ) from None
            if not line:
                code = await self.exited()
                raise RuntimeError(
                    f"{self.name} exited with status {code} before it was ready (its log is above)"
                )
            if self.ready_prefix and line.decode(errors="replace").startswith(self.ready_prefix):
                break
        self.drainer = asyncio.ensure_future(self._drain(self.proc.stdout))
        if self.after_start is not None:
            self.after_start(self.proc.pid)

    @staticmethod
    async def _drain(stream: asyncio.StreamReader) -> None:
        while await stream.readline():
            pass

    async def _relay(self, stream: asyncio.StreamReader) -> None:
        """Each line of the child's stderr on ours, escaped and named (``gateway: …``: no
        child's line reads as ``hive: …``), through RELAY's thread (a line past the
        reader's limit is dropped: asyncio discards it)."""
        while True:
            try:
                line = await stream.readline()
            except ValueError:
                continue
            if not line:
                return
            RELAY.put(
                f"{self.name}: "
                + visible(line.decode(errors="replace").rstrip("\n"), one_line=True)
            )

    async def exited(self) -> int:
        """Its exit status, as soon as it has exited (and its group, if its own, is cleared).

        Not ``proc.wait()``: on Python 3.11 that also waits until the stdout pipe is
        closed, and a process left behind (an nginx worker whose master was killed)
        holds it open for as long as it lives, so the exit would go unnoticed."""
        assert self.proc is not None
        wait = EXIT_POLL / 16  # soon at first: a stop waits on each of three in turn
        dead_since: float | None = None
        while self.proc.returncode is None:
            await asyncio.sleep(wait)
            wait = min(EXIT_POLL, wait * 2)
            if self.unreaped is None or self.proc.returncode is not None:
                continue
            if _leader_state(self.proc.pid) != "Z":
                dead_since = None
            elif dead_since is None:
                dead_since = time.monotonic()
            elif time.monotonic() - dead_since > UNREAPED_AFTER:
                log.warning(
                    "%s exited but a thread of it is still asleep in the kernel after %.0f s"
                    " (a lock a cage holds): stopping the cages",
                    self.name,
                    UNREAPED_AFTER,
                )
                hook, self.unreaped = self.unreaped, None
                await hook()
        if self.on_exit is not None:
            self.on_exit()
        self.kill_group()
        return self.proc.returncode

    def kill_group(self) -> None:
        """SIGKILL whatever is left in its own process group (nothing, unless it died abruptly)."""
        if self.own_group and self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group's id is the leader's pid
            except ProcessLookupError:
                pass  # the group is empty
            else:
                log.warning("%s: killed the processes it left behind", self.name)

    async def supervise(self) -> None:
        backoff = FIRST_BACKOFF
        while not self.stop_requested():
            code = await self.exited()
            if self.stop_requested():
                return
            if self.after_exit is not None:
                await self.after_exit()
                self.cleared = self.after_exit is self.before_start
            if code == CONFIG_REFUSED:
                await self._config_changed()
            else:
                log.error(
                    "%s exited with status %s; restarting in %.1f s", self.name, code, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            if self.stop_requested():  # asked while it waited: not started again
                return
            try:
                await self.start()
                if self.stop_requested():
                    return
                backoff = FIRST_BACKOFF
                log.info("%s is back", self.name)
            except RuntimeError as e:
                log.error("%s", e)

    async def _config_changed(self) -> None:
        """After a refusal of its configuration (its line is above): wait, saying so once,
        until the file changes; forever if there is none (the hive runs on, its agents
        unreachable until then)."""
        path = self.config
        if path is None:
            log.error(
                "%s refused its embedded configuration; it will not start again until"
                " `hive up` is restarted",
                self.name,
            )
            await asyncio.Event().wait()
            return
        log.error(
            "%s refused %s (see its line above); it starts again once the file changes",
            self.name,
            path,
        )
        seen = self.config_seen
        while not self.stop_requested():
            if await asyncio.to_thread(_file_state, path) != seen:
                log.info("%s changed: starting %s again", path, self.name)
                return
            await asyncio.sleep(CONFIG_POLL)

    async def stop(self) -> None:
        self.stopping = True
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        # A process of its own ids may have stopped it (SIGSTOP: a compromised nginx
        # worker stopping its master, red team re-check 17): continued, it takes the
        # SIGTERM now rather than being killed after STOP_TIMEOUT.
        self.proc.send_signal(signal.SIGCONT)
        try:
            await asyncio.wait_for(self.exited(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("%s did not stop within %.0f s; killing it", self.name, STOP_TIMEOUT)
            self.proc.kill()
            await self.exited()


class SocketActivated(Supervised):
    """hive-priv, the way systemd runs it: we hold the listening socket; the
    service gets it as fd 3. When the service exits, the socket stays open and the
    next connection starts it again."""

    def __init__(self, name: str, argv: list[str], listener: socket.socket) -> None:
        self.listener = listener
        activate = python_argv("hyperhive.cli.socket_activate", str(listener.fileno()), "--")
        super().__init__(
            name,
            activate + argv,
            "hive-priv: ready",
            pass_fds=(listener.fileno(),),
            # Through RELAY too: a terminal that stalled must not block root's log lines
            # (and with them the cages' stop).
            relay_stderr=True,
        )

    async def supervise(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stop_requested():
            code = await self.exited()
            if self.stop_requested():
                return
            log.warning(
                "%s exited with status %s; it starts again on the next connection", self.name, code
            )
            pending: asyncio.Future[None] = loop.create_future()

            def wake(p: asyncio.Future[None] = pending) -> None:
                if not p.done():
                    p.set_result(None)

            loop.add_reader(self.listener.fileno(), wake)
            try:
                await pending
            finally:
                loop.remove_reader(self.listener.fileno())
            if self.stop_requested():
                return
            try:
                await self.start()
                log.info("%s activated by a connection", self.name)
            except RuntimeError as e:
                log.error("%s", e)
                await asyncio.sleep(1.0)


async def first_failure(*steps: Awaitable[None]) -> None:
    """Run ``steps`` side by side until all are done; the first to fail cancels the rest
    and its error is raised."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and (error := task.exception()) is not None:
                raise error
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def bind_priv_socket(path: Path, core: CoreIds) -> socket.socket:
    """priv.sock as hive-priv.socket makes it: root and the hive's core group, 0660. It
    takes descriptors: ``exec``'s, the operator's stdio."""
    return bind_listener(path, core.gid, 0o660, descriptors=True)


# host.sock (root:hive-admin 0660) and core.sock (root and this hive's gateway group, 0660):
# bound by us and handed to the core, so the core needs neither group. Their backlogs.
HANDED = {"host.sock": 128, "core.sock": 512}


def _handed_gid(name: str, core: CoreIds) -> int:
    if name == "core.sock":
        return gateway_ids(core).gid
    return grp.getgrnam(ADMIN_GROUP).gr_gid


def _bind_handed(run_dir: Path, name: str, core: CoreIds) -> socket.socket:
    gid = _handed_gid(name, core)
    return bind_listener(run_dir / name, gid, 0o660, backlog=HANDED[name])


def bind_core_listeners(run_dir: Path, core: CoreIds) -> dict[str, socket.socket]:
    """The core's listeners, bound; ``rebind_core_listeners`` binds them afresh before
    each start of the core."""
    socks: dict[str, socket.socket] = {}
    try:
        for name in HANDED:
            socks[name] = _bind_handed(run_dir, name, core)
    except BaseException:
        for sock in socks.values():
            sock.close()
        raise
    return socks


def rebind_core_listeners(run_dir: Path, socks: dict[str, socket.socket], core: CoreIds) -> None:
    """New listeners in place of the last core's, on the same descriptor numbers (the
    core's argv names them): a copy a compromised core kept elsewhere, or a listener it
    shut down, is not what the next core serves (red team of session 16)."""
    for name, sock in socks.items():
        fresh = _bind_handed(run_dir, name, core)
        os.dup2(fresh.fileno(), sock.fileno(), inheritable=False)
        fresh.close()


KILL_ROUNDS = 50  # kill(-1) rounds before the core's leftovers are given up on (logged)


def _uids_of(pid: int) -> set[int]:
    """Real, effective, saved and filesystem uid of ``pid``, empty if it is gone or a
    zombie (dead: only its parent's wait is left), read by root from /proc/PID/status (a
    process made non-dumpable shows /proc/PID as root's; its status still says)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"State:") and line.split()[1:2] in ([b"Z"], [b"X"]):
                    return set()
                if line.startswith(b"Uid:"):
                    return {int(x) for x in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def processes_of(uid: int) -> list[int]:
    """Pids of the live processes running with ``uid`` as any of their uids."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and uid in _uids_of(int(e))]


def kill_all_of(core: CoreIds) -> int:
    """SIGKILL every process running as this hive's core: its uid is the hive's alone
    (the host's id registry), so whatever a core left running (a compromised one's
    helpers, which could take a later core's descriptors) is ended before the next core
    starts and after the hive stops. A fork of ours takes the core's ids and at once
    sends ``kill(-1, SIGKILL)``: the kernel signals, in one pass, every process that uid
    may (a fork chain can't slip through: a fork with SIGKILL pending fails), so a round
    whose fork reports it sent it leaves none. No exec, so the moment a leftover could
    stop or kill that fork is a few microseconds; one that doesn't end within a second
    is killed by us and the round sent again (red team of session 16: an exec'd killer
    was killed, or stopped and hung the restart). Rounds until one was sent and /proc
    shows none of that uid alive (a scan alone can miss a fork chain). The number of
    processes seen before."""
    if core.uid < BASE_UID or core.gid < BASE_UID:  # never an account's, never root's
        raise RuntimeError(f"refusing to kill the processes of uid {core.uid}")
    seen = len(processes_of(core.uid))
    for _ in range(KILL_ROUNDS):
        sent = _kill_as(core)
        deadline = time.monotonic() + 1.0
        while (left := processes_of(core.uid)) and sent and time.monotonic() < deadline:
            time.sleep(0.005)  # SIGKILLed, still exiting
        if sent and not left:
            return seen
    log.error("processes of the core's uid %d still running: %s", core.uid, left[:20])
    return seen


def _kill_as(core: CoreIds) -> bool:
    """One ``kill(-1, SIGKILL)`` sent with the core's ids, from a fork of ours: whether
    it was sent (the fork exited 0 only after it)."""
    pid = os.fork()
    if pid == 0:  # the child: syscalls only, then out
        code = 1
        try:
            os.setgroups([])
            os.setresgid(core.gid, core.gid, core.gid)
            os.setresuid(core.uid, core.uid, core.uid)
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass  # none to signal
            code = 0
        except BaseException:
            pass
        os._exit(code)
    deadline = time.monotonic() + 1.0
    while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        if time.monotonic() > deadline:  # stopped by a leftover: ours to end
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return False
        time.sleep(0.002)
    return os.waitstatus_to_exitcode(done[1]) == 0


def prepare_dirs(state_dir: Path, run_dir: Path, core: CoreIds) -> None:
    """Root owns the state and run directories. This hive's core (its group) may add its
    own files to the state dir (the database, its token, ca/, secrets/) but, it being
    sticky, never rename or replace root's (``priv/``, ``agents/``, ``core.id``): hive-priv
    and we trust those. The run dir is root's alone (0755): we bind its sockets, hive-priv
    makes agents/NAME and ui/NAME; the core binds only in agents/NAME, which hive-priv
    gives it. (It was the core's group's, sticky: an earlier core could leave a link at
    gateway/ for root to follow, red team of session 16.)"""
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chown(state_dir, 0, core.gid)
    os.chmod(state_dir, 0o1770)
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chown(run_dir, 0, 0)
    os.chmod(run_dir, 0o755)
    for sub in ("agents", "ui", "gateway"):  # what root writes in, by path
        path = run_dir / sub
        if path.is_symlink() or (path.exists() and path.stat().st_uid != 0):
            raise click.ClickException(f"{path} is not root's: refusing to start (remove it)")
    for sub in ("agents", "ui"):
        path = run_dir / sub
        path.mkdir(exist_ok=True)
        os.chown(path, 0, 0)
        os.chmod(path, 0o711)
    # hive-priv's own directories, made here as root before anything starts: the core
    # starts beside hive-priv, and its group may write the state dir, so a core that ran
    # first could make ``priv`` its own and keep every start refused (re-check of session
    # 26). hive-priv finds them as it wants them (``Cages``: root's, these modes).
    anchor = safefs.open_anchor(state_dir.absolute())
    try:
        for name, mode in (("priv", 0o700), ("agents", 0o711)):
            try:
                os.close(safefs.ensure_dir(anchor, name, 0, 0, mode, trusted=True))
            except (OSError, safefs.UnsafePath) as e:
                raise click.ClickException(
                    f"{state_dir / name}: {e} (remove it to start)"
                ) from None
    finally:
        os.close(anchor)


TOKEN_RE = re.compile(rb"[A-Za-z0-9_-]{20,200}")


def read_token(state_dir: Path, core_uid: int) -> str:
    """The operator's token, which hive-core wrote. hive-core owns that name, so it is
    opened without following a link and without blocking (a FIFO renamed over it would
    hang us, locks held), and must be a regular file of hive-core's with one link (a
    hard link to a root-only file would have us print that file)."""
    path = state_dir / "operator.token"
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != core_uid:
            raise RuntimeError(f"{path} is not a plain file of the core's; not reading it")
        raw = f.read(256).strip()
    # The core wrote it and we print it: only what secrets.token_urlsafe makes (an escape
    # sequence in it would reach root's terminal: red team of session 16).
    if not TOKEN_RE.fullmatch(raw):
        raise RuntimeError(f"{path} does not hold a token (URL-safe base64, 20 to 200 characters)")
    return raw.decode()


# Cages stopped at once when the hive stops: one at a time, each waited for its cgroup to
# empty (~0.1 s), 100 cages took 12 s and 1,000 two minutes; hive-priv serves each of
# root's connections in a thread of its own.
STOP_AT_ONCE = 8


def _leader_state(pid: int) -> str:
    """The state letter of ``pid``'s main thread ("Z": it has exited, another thread of
    the process has not); "" if it can't be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return ""
    end = stat.rfind(b")")
    return stat[end + 2 : end + 3].decode()


async def stop_all_cages(priv_sock: Path) -> bool:
    """Stop every running cage. False (the reasons logged) if any may still be running."""
    try:
        status = await asyncio.to_thread(priv_call, str(priv_sock), wp.CageStatus())
        if not status.get("ok"):
            log.error("could not stop the cages: hive-priv: %s", status.get("error"))
            return False
        slots = asyncio.Semaphore(STOP_AT_ONCE)

        async def stop(name: str) -> bool:
            async with slots:
                reply = await asyncio.to_thread(priv_call, str(priv_sock), wp.StopCage(name=name))
            if reply.get("ok"):
                log.info("cage %s stopped", name)
                return True
            log.error("could not stop cage %s: %s", name, reply.get("error"))
            return False

        running = [name for name, cage in status.get("cages", {}).items() if cage.get("running")]
        return all(await asyncio.gather(*(stop(name) for name in running)))
    except (OSError, ValueError) as e:
        log.error("could not stop the cages: %s", e)
        return False


def listening_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets listening on ``port`` (any address) in our network namespace."""
    return {inode for _, at, inode in _listeners() if at == port}


def _holders(
    inodes: set[int], pids: Iterable[int] | None = None, deadline: float | None = None
) -> dict[int, set[int]]:
    """The processes (of ``pids``, or all) with a descriptor on one of these sockets:
    pid -> the inodes it holds; past ``deadline`` (monotonic) no more are read."""
    wanted = {f"socket:[{i}]": i for i in inodes}
    held: dict[int, set[int]] = {}
    entries = os.listdir("/proc") if pids is None else [str(pid) for pid in pids]
    for entry in entries:
        if not entry.isdigit():
            continue
        if deadline is not None and time.monotonic() > deadline:
            break
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if (inode := wanted.get(os.readlink(f"/proc/{entry}/fd/{fd}"))) is not None:
                    held.setdefault(int(entry), set()).add(inode)
    return held


def socket_holders(inodes: set[int]) -> list[int]:
    """Pids of the processes with a descriptor on one of these sockets."""
    return sorted(_holders(inodes))


def holds_listener(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself has a socket listening on ``port``."""
    wanted = {f"socket:[{i}]" for i in listening_inodes(port)}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                return True
    return False


def _addresses(host: str, port: int) -> set[str]:
    """The addresses ``host`` names, as text (``0.0.0.0`` and ``::`` for every address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return set()
    return {str(info[4][0]) for info in infos}


def _listeners() -> list[tuple[str, int, int]]:
    """(address, port, inode) of every TCP socket listening in our network namespace."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) <= 9 or f[3] != "0A":
                continue
            hex_addr, hex_port = f[1].rsplit(":", 1)
            raw = bytes.fromhex(hex_addr)
            # /proc prints each 32-bit word in host order (little-endian here)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((socket.inet_ntop(family, raw), int(hex_port, 16), int(f[9])))
    return found


def _gateway_run_dir(pid: int) -> str | None:
    """The run dir of the hive whose nginx ``pid`` is (its ``-c RUN/gateway/nginx.conf``)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # (nginx's master rewrites its title: "nginx: master process nginx -p … -c …")
    for word in raw.replace(b"\0", b" ").decode(errors="replace").split():
        if word.endswith("/gateway/nginx.conf"):
            return word.removesuffix("/gateway/nginx.conf")
    return None


SHARING_SAID = 3  # other hives named in `hive up`'s warning; the rest counted


def _hive_gateways(deadline: float) -> dict[int, str]:
    """pid -> run dir of the processes that are a hive's nginx: the nginx binary
    (``/proc/PID/exe``) with ``-c RUN/gateway/nginx.conf``, that file root's (as `hive up`
    writes it). A host user's process with such a command line is not one (red team of
    session 19); past ``deadline`` (monotonic) the rest are not looked at."""
    found: dict[int, str] = {}
    nginx = os.path.realpath(shutil.which("nginx", path=CHILD_PATH) or "/usr/sbin/nginx")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        if time.monotonic() > deadline:
            break
        try:  # the host's nginx itself, not a user's file of that name (re-check of 19)
            if os.readlink(f"/proc/{entry}/exe") != nginx:
                continue
        except OSError:
            continue
        if (run_dir := _gateway_run_dir(int(entry))) is None or not _roots_path(run_dir):
            continue
        try:
            st = os.lstat(f"{run_dir}/gateway/nginx.conf")
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == 0:
            found[int(entry)] = run_dir
    return found


def _roots_path(run_dir: str) -> bool:
    """Whether RUN/gateway is a path of root's own directories, no link on the way (a
    user's link to /etc/nginx is not a hive's gateway directory)."""
    path = os.path.join(run_dir, "gateway")
    if not os.path.isabs(path) or os.path.realpath(path) != os.path.normpath(path):
        return False
    try:
        st = os.lstat(path)
    except (OSError, ValueError):
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0


def hives_sharing_address(listen: str, seconds: float = 2.0) -> list[tuple[str, int]]:
    """Other hives' gateways listening on an address of ``listen``'s (or on every
    address) at another port: (their run dir, port). A browser sends a host's cookies to
    every port of it, so the operator's session of one goes to the other as well (Known
    limits in docs/security.md). Only hives' nginx processes are read (their descriptors),
    for ``seconds`` at most: a host user's thousands of descriptors hold no `hive up`."""
    deadline = time.monotonic() + seconds
    host, port = parse_listen(listen)
    mine = _addresses(host, port)
    wild = {"0.0.0.0", "::"}
    ports = {
        inode: at
        for address, at, inode in _listeners()
        if at != port and (address in mine or address in wild or mine & wild)
    }
    if not ports:
        return []
    gateways = _hive_gateways(deadline)
    found: dict[str, int] = {}
    for pid, held in _holders(set(ports), gateways, deadline).items():
        found.setdefault(gateways[pid], ports[min(held)])
    return sorted(found.items())


def port_problem(listen: str) -> str | None:
    """Why the gateway could not listen on ``listen`` (taken, not an address of this
    host), found before anything starts; None if it can."""
    host, port = parse_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"cannot listen on {listen}: {e.strerror}"
    for family, type_, proto, _, addr in infos:
        with socket.socket(family, type_, proto) as s:
            # As nginx binds: SO_REUSEADDR, which still fails while anyone listens there.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    return f"cannot listen on {listen}: {e.strerror}"
                holders = socket_holders(listening_inodes(port))
                by = f" (pid {', '.join(map(str, holders))})" if holders else ""
                return (
                    f"{listen} is already in use by another program{by}; "
                    "choose another with --listen"
                )
    return None


def bind_gateway_listeners(listen: str) -> list[socket.socket]:
    """The gateway's listening sockets, bound by us (root: any port) and handed to nginx
    (``NGINX=FD;…``, nginx's own way to inherit them), whose master then needs no root:
    one for each address ``listen`` names, as nginx would bind them."""
    host, port = parse_listen(listen)
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        ):
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as nginx's default
            sock.bind(addr)
            sock.listen(511)  # nginx's default backlog
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


async def http_status(host: str, port: int, path: str) -> int | None:
    """The status of ``GET path`` on host:port, or None if nothing sensible answered."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5.0)
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
    parts = line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return None
    return int(parts[1])


def gateway_ready(gateway: Supervised, listen: str) -> Callable[[], Awaitable[bool]]:
    """Ready when our nginx (its master, the process we started) holds the listening
    socket, and a page through it comes from hive-core over core.sock (nginx answers
    502 while core.sock does not). Someone else listening on the port is not ready."""
    host, port = parse_listen(listen)

    async def check() -> bool:
        proc = gateway.proc
        if proc is None or proc.returncode is not None or not holds_listener(proc.pid, port):
            return False
        status = await http_status(host, port, "/login")
        return status is not None and status < 500

    return check


def priv_running_cages(priv_sock: Path) -> dict[str, bool]:
    reply = priv_call(str(priv_sock), wp.CageStatus())
    if not reply.get("ok"):
        raise RuntimeError(f"hive-priv does not answer status: {reply.get('error')}")
    return {name: bool(c.get("running")) for name, c in reply.get("cages", {}).items()}


def host_statuses(host_sock: Path) -> dict[str, dict[str, Any]]:
    with Client(host_sock, timeout=10) as c:
        reply = c.call("agent_status")
    if not reply.get("ok"):
        raise RuntimeError(f"host.sock does not answer agent_status: {reply.get('error')}")
    return {row["name"]: row for row in reply["agent_statuses"]}


async def wait_for_agents(
    priv_sock: Path, host_sock: Path, timeout: float = AGENTS_TIMEOUT
) -> None:
    """Until every agent that should run has its harness connected.

    The agents that should run are those whose cage hive-priv reports running once
    the core is ready (the core starts every agent not stopped before it says
    ready), and those the core reports failed (it tried and could not). An agent
    that failed and has no running cage is reported and no longer waited for; the
    rest get ``timeout`` seconds."""
    cages = await asyncio.to_thread(priv_running_cages, priv_sock)
    wanted = {name for name, running in cages.items() if running}
    deadline = time.monotonic() + timeout
    said: tuple[str, ...] = ()
    said_at = 0.0
    given_up: set[str] = set()
    # Soon at first: the harnesses connect ~40 ms after their cages start, just after the
    # core says ready; a fixed 0.2 s cost every `hive up` most of one.
    pause = 0.01
    while True:
        try:
            rows = await asyncio.to_thread(host_statuses, host_sock)
        except (OSError, ValueError, HiveUnavailable) as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"host.sock ({host_sock}) does not answer: {e}") from None
            await asyncio.sleep(0.2)
            continue
        wanted |= {name for name, row in rows.items() if row.get("failed")}
        wanted -= given_up
        missing = sorted(n for n in wanted if n in rows and not rows[n].get("running"))
        if not missing:
            return
        cages = await asyncio.to_thread(priv_running_cages, priv_sock)
        dead = [n for n in missing if rows[n].get("failed") and not cages.get(n)]
        if dead:
            # One broken agent spec must not keep the operator out of the rest of the hive:
            # it is reported (its row shows failed) and the others are waited for.
            PROGRESS.warn(
                "agent_failed",
                f"agent {', '.join(dead)} could not start (the log above says why); "
                "the rest of the hive goes on",
                agents=dead,
            )
            given_up.update(dead)
            continue
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"agent {', '.join(missing)} did not connect within {timeout:.0f} s "
                "(the log above may say why)"
            )
        if tuple(missing) != said or time.monotonic() - said_at > PROGRESS_EVERY:
            s = "" if len(missing) == 1 else "s"
            text = f"waiting for {len(missing)} agent{s} ({', '.join(missing)})"
            PROGRESS.say("waiting", text, agents=missing)
            said, said_at = tuple(missing), time.monotonic()
        await asyncio.sleep(pause)
        pause = min(0.2, pause * 2)


def refusal(
    run_dir: Path, state_dir: Path, listen: str
) -> tuple[instance_lock.InstanceLock | None, str | None]:
    """Take the instance locks and check what must be free, before anything changes:
    (the locks, None) to go on, or (None, the one-line reason) to refuse."""
    try:
        lock = instance_lock.acquire([run_dir, state_dir])
    except InUse as e:
        return None, str(e)
    pid = instance_lock.live_priv_socket(run_dir)
    problem = (
        f"{run_dir} is in use by a running hive-priv (its priv.sock was opened by pid {pid})"
        if pid is not None
        else port_problem(listen)
    )
    if problem is None and shutil.which("nginx", path=CHILD_PATH) is None:
        problem = f"nginx is not installed (looked in {CHILD_PATH})"
    if problem is not None:
        lock.release()
        return None, problem
    return lock, None


async def run_hive(
    config: Path | None, state_dir: Path, run_dir: Path, listen: str, max_agents: int = 100
) -> int:
    lock, problem = refusal(run_dir, state_dir, listen)
    if lock is None:
        PROGRESS.error(str(problem))
        return 1
    sharing = hives_sharing_address(listen)
    for other, port in sharing[:SHARING_SAID]:
        other = other if len(other) <= 200 else other[:200] + "…"
        PROGRESS.warn(
            "address_shared",
            f"warning: the hive of {other} serves on this address too (port {port}): a browser"
            " sends one hive's login cookie to the other, so each could act as the operator"
            " of both if compromised; give each hive its own address"
            ' ([hive] listen = "127.0.0.2:8080", or --listen)',
            run_dir=other,
            port=port,
        )
    if len(sharing) > SHARING_SAID:
        PROGRESS.warn(
            "address_shared",
            f"warning: and {len(sharing) - SHARING_SAID} more hives serve on this address too",
            more=len(sharing) - SHARING_SAID,
        )
    try:
        return await run_locked(config, state_dir, run_dir, listen, max_agents)
    finally:
        # After every cage was stopped: a cage still running keeps its own view of it.
        if agents_fs.mounted(run_dir / "agents"):
            try:
                agents_fs.unmount(str(run_dir / "agents"))
            except OSError as e:
                log.warning("%s", e)
        lock.release()


async def run_locked(
    config: Path | None, state_dir: Path, run_dir: Path, listen: str, max_agents: int = 100
) -> int:
    # Taken before anything is bound or said: a SIGTERM right after "starting" (or
    # during the set-up before it) stops what started, never kills us half-way.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ensure_group(ADMIN_GROUP)
    try:
        identity = core_identity(state_dir)
        core_as = identity.ids
        gateway_as = gateway_ids(core_as)
        # What earlier cores own here (an older version's shared user, the ids of a state
        # dir this was copied from): checked at every start, walked only if some is left.
        adopt_files(state_dir, core_as, identity.former)
    except (CoreIdentityError, IdsExhausted, safefs.UnsafePath, OSError) as e:
        PROGRESS.error(f"the core's ids: {e}")
        return 1
    prepare_dirs(state_dir, run_dir, core_as)
    try:
        agents_fs.mount(run_dir, max_agents)
    except (OSError, safefs.UnsafePath) as e:
        PROGRESS.error(f"could not mount a tmpfs on {run_dir / 'agents'}: {e}")
        return 1
    priv_sock = run_dir / "priv.sock"
    try:
        listener = bind_priv_socket(priv_sock, core_as)
    except OSError as e:  # e.g. a directory a core of an earlier run left at that name
        PROGRESS.error(f"could not bind {priv_sock}: {e}")
        return 1
    try:
        handed = bind_core_listeners(run_dir, core_as)
    except OSError as e:
        listener.close()
        priv_sock.unlink(missing_ok=True)
        PROGRESS.error(f"could not bind the core's sockets in {run_dir}: {e}")
        return 1
    priv = SocketActivated(
        "hive-priv",
        python_argv(
            "hyperhive.priv",
            "--run-dir",
            str(run_dir),
            "--state-dir",
            str(state_dir),
            "--core-user",
            core_as.spec,
            "--gateway-group",
            gateway_as.spec,
        ),
        listener,
    )
    handing = [f"{sock.fileno()}:{name}" for name, sock in handed.items()]
    # As root into a sandbox like the systemd unit's (the host read-only but for the
    # state and run dirs, no new privileges, no capabilities), then the core's own ids;
    # then systemd's socket activation; then the core.
    sandbox = [os.path.abspath(state_dir), os.path.abspath(run_dir)]
    argv = (
        python_argv("hyperhive.cli.core_sandbox", core_as.spec, *sandbox, "--")
        + python_argv("hyperhive.cli.socket_activate", *handing, "--")
        + python_argv(
            "hyperhive.core",
            "--run-dir",
            str(run_dir),
            "--state-dir",
            str(state_dir),
            "--listen",
            listen,
            "--priv-sock",
            str(priv_sock),
        )
    )
    if config is not None:
        argv += ["--config", str(config)]

    async def before_core() -> None:
        if killed := await asyncio.to_thread(kill_all_of, core_as):
            log.warning("killed %d process(es) a core of this hive left running", killed)
        rebind_core_listeners(run_dir, handed, core_as)

    core = Supervised(
        "hive-core",
        argv,
        "hive-core: ready",
        # A session of its own (no controlling terminal) and its stderr relayed: the core
        # never holds the operator's terminal.
        own_group=True,
        relay_stderr=True,
        before_start=before_core,
        config=config,
        after_exit=before_core,
        # core_sandbox takes this hive's own ids, no supplementary group: another hive's
        # core is a stranger.
        pass_fds=tuple(sock.fileno() for sock in handed.values()),
        # The core is ready once it has started every agent: more time for more of them.
        ready_timeout=READY_TIMEOUT + 0.5 * max_agents,
        # Killed with a thread asleep on a cage's lock (the core's own exit stops those
        # cages first; a SIGKILL gives it no chance): the cages go, and the lock with them.
        unreaped=lambda: stop_all_cages(priv_sock),
    )
    nginx_conf = gateway_config.write(listen, run_dir, gateway_as.uid, gateway_as.gid, max_agents)
    try:
        web = bind_gateway_listeners(listen)
    except OSError as e:
        listener.close()
        for core_sock in handed.values():
            core_sock.close()
        PROGRESS.error(f"could not listen on {listen}: {e.strerror}")
        return 1

    async def before_gateway() -> None:
        if killed := await asyncio.to_thread(kill_all_of, gateway_as):
            log.warning("killed %d process(es) a gateway of this hive left running", killed)
        # Its own directory afresh (as root, never through a link): nothing an earlier
        # nginx of the same ids left there (a directory where its pid file goes) holds
        # this one off.
        gateway_config.fresh_tmp(run_dir, gateway_as.uid, gateway_as.gid)

    # Its own prefix (-p) and error log (-e) before it reads the config we wrote: nothing
    # of nginx's compiled-in paths or of the working directory is used. Master and
    # workers run as this hive's gateway ids, never root: we bound its port.
    gateway = Supervised(
        "gateway",
        [
            *python_argv("hyperhive.cli.unprivileged", gateway_as.spec, "--"),
            shutil.which("nginx", path=CHILD_PATH) or "/usr/sbin/nginx",
            "-p",
            f"{nginx_conf.parent}/",
            "-e",
            "stderr",
            "-c",
            str(nginx_conf),
        ],
        None,
        own_group=True,
        # Its workers (parsing what the network sends) get a pipe, not the operator's
        # terminal: no terminal controls on root's screen, no keystrokes read.
        relay_stderr=True,
        # Whatever a compromised worker left running (its own session) is not the next
        # gateway's: the same ids.
        before_start=before_gateway,
        pass_fds=tuple(sock.fileno() for sock in web),
        extra_env={"NGINX": "".join(f"{sock.fileno()};" for sock in web)},
        after_start=lambda pid: gateway_config.write_pid(run_dir, pid),
        # A dead master's pid is no name for root to signal (its pid may be reused).
        on_exit=lambda: (run_dir / "gateway" / "nginx.pid").unlink(missing_ok=True),
    )
    gateway.ready_check = gateway_ready(gateway, listen)
    PROGRESS.say(
        "starting",
        f"starting (state {state_dir}, sockets {run_dir})",
        state_dir=str(state_dir),
        run_dir=str(run_dir),
    )

    async def start_all() -> None:
        # hive-priv and the core start side by side: the core's imports need no hive-priv,
        # and its first request waits in priv.sock's backlog (we bound it) until hive-priv
        # accepts. hive-priv's failure is reported as before: the core only waits on it.
        await first_failure(priv.start(), core.start())
        try:
            await gateway.start()
        except RuntimeError as e:
            raise RuntimeError(f"the gateway could not serve on {listen}: {e}") from None
        await wait_for_agents(priv_sock, run_dir / "host.sock")

    async def shutdown(supervised: bool) -> bool:
        await gateway.stop()
        await core.stop()
        for ids, what in ((core_as, "the core"), (gateway_as, "the gateway")):
            if killed := await asyncio.to_thread(kill_all_of, ids):
                log.warning("killed %d process(es) %s left running", killed, what)
        # During start-up nothing reactivates hive-priv: ask only a live one.
        running = priv.proc is not None and priv.proc.returncode is None
        cages_stopped = await stop_all_cages(priv_sock) if supervised or running else True
        await priv.stop()
        listener.close()
        priv_sock.unlink(missing_ok=True)
        for web_sock in web:
            web_sock.close()
        (run_dir / "gateway" / "nginx.pid").unlink(missing_ok=True)
        for name, sock in handed.items():
            sock.close()
            (run_dir / name).unlink(missing_ok=True)
        return cages_stopped

    starting = asyncio.ensure_future(start_all())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # SIGINT / SIGTERM while starting
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, RuntimeError):
            await starting
        PROGRESS.say("stopping", "stopping (it was still starting)")
        return 0 if await shutdown(False) else 1
    stopping.cancel()
    failure = starting.exception()
    if failure is not None:
        if not isinstance(failure, RuntimeError | OSError | ValueError):
            raise failure
        PROGRESS.error(str(failure))
        await shutdown(False)
        return 1
    try:
        token = read_token(state_dir, core_as.uid)
    except (OSError, RuntimeError) as e:
        PROGRESS.error(f"the operator's token: {e}")
        await shutdown(False)
        return 1
    host, port = parse_listen(listen)
    login = f"http://{host}:{port}/login?token={token}"
    sock = run_dir / "host.sock"
    text = f"ready: log in at {login} (operator socket {sock})"
    PROGRESS.say("ready", text, login=login, host_sock=str(sock))

    watchers = [asyncio.ensure_future(p.supervise()) for p in (core, priv, gateway)]
    await stop.wait()
    PROGRESS.say("stopping", "stopping")
    cages_stopped = await shutdown(True)
    for w in watchers:
        w.cancel()
    if not cages_stopped:
        PROGRESS.error("stopped, but some cages may still be running (see the log above)")
        return 1
    PROGRESS.say("stopped", "stopped")
    return 0


@click.command("up")
@click.option(
    "--config", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="hive.toml"
)
@click.option(
    "--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR, show_default=True
)
@click.option(
    "--run-dir",
    "up_run_dir",
    type=click.Path(path_type=Path),
    help=f"Sockets (default {DEFAULT_RUN_DIR}).",
)
@click.option(
    "--listen", help="HOST:PORT for the gateway (default [hive] listen or 127.0.0.1:8080)."
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Progress as JSON lines on stdout: one object a phase (starting, waiting, ready with "
    "the login URL, stopping, stopped; ok false and error when it fails).",
)
@click.pass_context
def up(
    ctx: click.Context,
    config: Path | None,
    state_dir: Path,
    up_run_dir: Path | None,
    listen: str | None,
    as_json: bool,
) -> None:
    """Run the whole hive in the foreground until SIGINT / SIGTERM."""
    # What root creates (run/, gateway/, sockets) is exactly the mode it is given, not
    # group- or world-writable under a shell's umask 000 (red team of session 17).
    os.umask(0o022)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        handlers=[RelayedLog()],
    )
    PROGRESS.as_json = as_json
    run_dir = up_run_dir or ctx.obj.get("run_dir") or DEFAULT_RUN_DIR
    try:
        try:
            cfg = load_config(config, listen)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
        if os.geteuid() != 0:
            raise click.ClickException(
                "hive up must run as root: like systemd, it creates users, binds priv.sock "
                "and starts hive-priv; hive-core itself runs under ids of its own, never root"
            )
        from hyperhive.core.budget import fit_nofile

        fit_nofile(cfg)  # [limits] max_agents' descriptors, for every child (LimitNOFILE's part)
        # Normalized (no `..`): the paths mountinfo shows and hive-priv opens.
        code = asyncio.run(
            run_hive(
                Path(os.path.abspath(config)) if config else None,
                Path(os.path.abspath(state_dir)),
                Path(os.path.abspath(run_dir)),
                cfg.hive.listen,
                cfg.limits.max_agents,
            )
        )
    except click.ClickException as e:
        if not as_json:
            raise
        PROGRESS.error(e.format_message())
        code = 1
    RELAY.drain(2.0)  # the children's last lines, unless the terminal is stalled
    raise SystemExit(code)

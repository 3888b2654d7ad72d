"""The cage's init: the only process in a cage with any capability (CAP_SETUID,
CAP_SETGID, CAP_SETPCAP, CAP_KILL, nothing else, and a bounding set of just
those four, so nothing it runs can regain another). It uses them only to

- start the harness as the harness uid, and restart it with backoff if it dies;
- start the runtime's processes as the *runtime* uid when the harness asks
  (over a private socketpair; the runtime never holds an end of it), and
  signal those processes (interrupts, time-outs).

Everything it starts has no capabilities, an empty bounding set and
no_new_privs. The runtime's processes get a higher ``oom_score_adj`` than init
and the harness, so under memory pressure the kernel kills the agent's work
first, not the cage's plumbing. On SIGTERM it exits, which ends the whole cage."""

from __future__ import annotations

import _socket
import ctypes
import errno
import gc
import os
import resource
import sys
import time

from hyperhive.cage import layout, seccomp
from hyperhive.cage.setpriv import become, drop_to
from hyperhive.unixsock import refuse_descriptors

# Not imported: subprocess (fork_exec does what init needs of it; its modules were ~0.5 MiB
# of every cage), traceback (only on an error) and typing (~7 ms of a cold start, together).
# Not imported before the first harness's fork: json, signal, socket and selectors (enum,
# re, collections and the regular expressions json compiles: ~13 ms of CPU, half of a cage's
# cold start). The fork connects to the core with what is loaded here (_socket, _signal: C
# modules), and only then loads the harness's modules; the cold start ends at that connect.
# Init itself waits in select's poll and loads wirejson (json's C half alone: never json's
# Python modules, nor the harness) at the harness's first request. mypy
# reads TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal  # _signal has no stubs; signal re-exports it
    from collections.abc import Callable
    from typing import NoReturn
else:
    import _signal

MAX_BACKOFF = 10.0
MAX_RUNTIME_PROCS = 8
SPAWNED_KEPT = 64  # runtime pids a kill may still name after their group is gone
SPAWN_REPORT_WAIT = 5.0  # seconds a runtime's start may take to be reported (fork_relayed)
KILL_PASSES = 8  # sweeps of the runtime uid once its harness is gone, while any is left
SWEEP_ID = 65534  # the sweep's real and saved ids: no process of a cage has them
MSG_MAX = 256 * 1024
MAX_FDS = 3  # a spawn's stdin, stdout and stderr
MAXFD = 1 << 20  # closerange's end in the harness's fork: past any descriptor init may hold

# The capabilities init uses: setpriv changes uid and gid (SETUID, SETGID) and empties
# the bounding set of what it starts (SETPCAP); kill() signals the runtime (KILL).
CAP_KILL, CAP_SETGID, CAP_SETUID, CAP_SETPCAP = 5, 6, 7, 8
KEEP_CAPS = (CAP_KILL, CAP_SETGID, CAP_SETUID, CAP_SETPCAP)
PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Raised for every runtime process (raising needs no privilege). Init and the harness
# keep what hive-priv gave the cage (lower, where the host lets it lower). The runtime
# may lower itself again, but not below the cage's floor (oom_score_adj_min, inherited).
RUNTIME_OOM_SCORE_ADJ = 500
M_ARENA_MAX = -8  # mallopt's parameter, <malloc.h>
# The harnesses' stdout and stderr reach cage.log (on the host's disk) only through init,
# up to this many bytes a cage start: a harness held cage.log itself before, and a
# compromised one could fill the disk hive.db is on. A harness's own lines are a few a
# start and a traceback.
HARNESS_LOG_MAX = 1 << 20
INIT_LOG_MAX = 1 << 20  # bytes of init's own lines (``note``) a cage start, likewise
LOG_READ = 64 * 1024
LOG_DRAIN_READS = 64  # reads of a dead harness's log at most (a writer left can't hold init)
PAGE_ACCEPTS = 8  # page connections init accepts and hands over a wake-up, at most
# The descriptor limits hive-priv gave the cage (``CAGE_NOFILE``): every child of init gets
# them back. Init itself runs with its soft limit at its hard one: the kernel refuses an
# SCM_RIGHTS send once its *user's* descriptors in flight pass the sender's soft
# RLIMIT_NOFILE, and that user is root for every cage's init; at 1,024 about 171
# compromised harnesses, each leaving its 6 page connections unread, would stop every
# init on the host from handing any (re-check of session 25). Set by ``main``.
CHILD_NOFILE: tuple[int, int] | None = None


def confine_self() -> None:
    """Init's own bounding set down to KEEP_CAPS, and no inheritable or ambient
    capabilities (bwrap leaves the bounding set full and the kept caps ambient)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def prctl(*args: int) -> None:
        if libc.prctl(*(ctypes.c_ulong(a) for a in args)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl({args[0]}, {args[1]}): {os.strerror(err)}")

    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    for cap in range(last + 1):
        if cap not in KEEP_CAPS:
            prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # 2 x {effective, permitted, inheritable}
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[2] = data[5] = 0
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def one_malloc_arena() -> None:
    """glibc gives each thread that allocates an arena of its own (up to 8 a core), each
    a few hundred KiB once touched; init has one thread and the harness a few, all of
    them idle most of the time: one arena for all. Inherited by the harness's fork; not
    by anything exec'd (the runtime keeps glibc's default)."""
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to set


def raise_oom_score() -> None:
    """In a runtime process, before it becomes the runtime uid: killed first."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(RUNTIME_OOM_SCORE_ADJ))


def raise_own_nofile() -> None:
    """Init's soft RLIMIT_NOFILE up to its hard one (no privilege needed); what the cage
    was given is kept for init's children (``CHILD_NOFILE``)."""
    global CHILD_NOFILE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    CHILD_NOFILE = (soft, hard)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def child_nofile() -> None:
    """In a child of init, before it becomes anything: the cage's own descriptor limits
    back (only lowered: never fails)."""
    if CHILD_NOFILE is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, CHILD_NOFILE)


def recv_request(sock: _socket.socket) -> tuple[dict | None, list[int]]:
    import array

    from hyperhive.cage import wirejson  # json's own modules: ~3.5 ms and re in every cage

    # Room for one more descriptor than a spawn takes: a request with too many is then
    # seen, and refused, rather than cut to three (the kernel closes any beyond four).
    # socket.recv_fds's steps, on the C module's socket.
    got = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(MSG_MAX, _socket.CMSG_LEN((MAX_FDS + 1) * got.itemsize))
    for level, kind, raw in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            got.frombytes(raw[: len(raw) - (len(raw) % got.itemsize)])
    fds = list(got)
    if not data:
        # A hang-up, or a message of no bytes (the harness's: the loop takes it as a
        # hang-up and goes on): what came with it is closed here, not left open in init
        # (red team round 19).
        for fd in fds:
            os.close(fd)
        return None, []
    try:
        req = wirejson.loads(data)
    except (ValueError, RecursionError):  # RecursionError: JSON nested past the limit
        return {}, fds
    # Anything but an object is an unknown request: the loop calls req.get (a list, a
    # number or null from the harness ended init, and the cage, before round 19).
    return (req if isinstance(req, dict) else {}), fds


class Init:
    def __init__(
        self, uid: int, gid: int, harness_uid: int, page_fd: int = -1, bridge_fd: int = -1
    ) -> None:
        self.uid, self.gid, self.harness_uid = uid, gid, harness_uid
        # web.sock's listener (-1: none handed in). Init accepts its connections and hands
        # each to the harness (``hand_page_connections``): a harness holding the listener
        # could shut it down, and the page was refused until the cage restarted.
        self.page_fd = page_fd
        self.page_ours: _socket.socket | None = None  # init's end of the harness's page pair
        self.bridge_fd = bridge_fd  # the egress bridge's listener, likewise (-1: none)
        self.runtime: dict[int, Forked] = {}
        # Process groups of runtime processes (each its own session, id = its first pid), kept
        # while any member lives: a child left behind by a runtime that exited can still be
        # signalled through its group.
        self.groups: set[int] = set()
        # The last SPAWNED_KEPT runtime processes spawned, oldest first: a kill of one of
        # them sweeps the runtime uid even once its group is gone (``kill``).
        self.spawned: dict[int, None] = {}
        self.harness: Forked | None = None
        self.channel: _socket.socket | None = None
        # The wake-up pair for SIGCHLD (set up before the first fork: a harness that dies
        # at once still wakes the loop). Sockets, not pipes: a pipe's pages count against
        # root's pipe-user-pages-soft, which every cage's init (host uid 0) shares.
        self.wake_r, self.wake_w = (s.detach() for s in _socket.socketpair())
        os.set_blocking(self.wake_w, False)
        self.started = time.monotonic()
        self.harness_starts = 0
        # The read end of the harness's stdout and stderr (-1: none; the harness has
        # /dev/null once HARNESS_LOG_MAX is spent), and what is left of that budget.
        self.log_r = -1
        self.log_left = HARNESS_LOG_MAX
        self.deaf = False  # the harness's channel was full: it is being killed

    def start_harness(self) -> None:
        """The first harness is a fork of init, not a new interpreter: no interpreter
        start-up, no setpriv exec (most of a cage's cold start). It is forked before init
        loads more than it needs to confine itself (``main``), connects, and only then
        loads the harness's modules.
        A restart (the last harness died: perhaps the runtime crashed it on purpose) is a
        new interpreter exec'd through setpriv: every fork of init has init's address-space
        layout and stack canary, which a crash-and-retry attack could learn bit by bit (as
        against Android's zygote); each exec gets its own."""
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        self.harness_starts += 1
        page_theirs = None
        if self.page_fd >= 0:
            self.page_ours, page_theirs = _socket.socketpair(
                _socket.AF_UNIX, _socket.SOCK_SEQPACKET
            )
            self.page_ours.setblocking(False)
            refuse_descriptors(self.page_ours)  # init reads nothing from it
            # The least send buffer (4,608 bytes: 6 connections unread). A descriptor in
            # flight counts against its sender's uid, root for every cage's init, and past
            # init's RLIMIT_NOFILE no init could hand any: 4 stopped harnesses held 1,025
            # and every other agent's page was refused (re-check of session 25).
            self.page_ours.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, 1)
        handed = {layout.BRIDGE_FD_ENV: self.bridge_fd}
        if page_theirs is not None:
            handed[layout.PAGE_FD_ENV] = page_theirs.fileno()
        handed = {env: fd for env, fd in handed.items() if fd >= 0}
        if self.harness_starts > 1 and self.bridge_fd >= 0:
            self.bridge_fd = handed[layout.BRIDGE_FD_ENV] = rebind_bridge(self.bridge_fd)
        log_w = self.harness_log()
        try:
            if self.harness_starts > 1:
                env = dict(os.environ, HIVE_INIT_FD=str(theirs.fileno()))
                env.update((name, str(fd)) for name, fd in handed.items())
                devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    self.harness = fork_exec(
                        drop_to(self.harness_uid, self.gid) + layout.python_argv("harness"),
                        (devnull, log_w, log_w),
                        keep=(theirs.fileno(), *handed.values()),
                        env=env,
                    )
                finally:
                    os.close(devnull)
            else:
                # init's objects out of the collector's reach: the fork keeps them shared
                gc.freeze()
                pid = os.fork()
                if pid == 0:
                    run_harness(self.harness_uid, self.gid, theirs.fileno(), handed, log_w)
                self.harness = Forked(pid)
        finally:
            os.close(log_w)
            if page_theirs is not None:
                page_theirs.close()
        theirs.close()
        self.channel = ours

    def hand_page_connections(self) -> None:
        """Connections waiting on web.sock, each sent to the harness (SCM_RIGHTS on its
        page pair) and closed here; one the harness can't take now (6 unread on its pair)
        is closed, and the gateway answers 502. Never blocks: the listener and the pair
        are non-blocking."""
        import array

        listener = _socket.socket(fileno=self.page_fd)
        try:
            for _ in range(PAGE_ACCEPTS):
                try:
                    fd, _ = listener._accept()  # type: ignore[attr-defined]  # (fd, address)
                except OSError:  # none left (EAGAIN), or gone before its accept
                    return
                try:
                    if self.page_ours is not None:
                        rights = array.array("i", [fd]).tobytes()
                        self.page_ours.sendmsg(
                            [b"c"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)]
                        )
                except OSError:
                    pass
                finally:
                    os.close(fd)
        finally:
            listener.detach()

    def harness_log(self) -> int:
        """The next harness's stdout and stderr: one end of a new stream socket pair, the
        other ``log_r`` (relayed by ``relay_log``); /dev/null once HARNESS_LOG_MAX is
        spent. Not a pipe: a harness could grow one to 1 MiB (F_SETPIPE_SZ), charged to
        root's pipe-user-pages-soft (init's uid, every cage's); a socket's buffer is
        bounded by wmem_max and charged to the cage's memory (red team round 28)."""
        if self.log_left <= 0:
            return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        ours.shutdown(_socket.SHUT_WR)  # one way: the harness reads nothing from it
        refuse_descriptors(ours)  # text only: no descriptor of the harness's waits in it
        ours.setblocking(False)
        self.log_r = ours.detach()
        return theirs.detach()

    def relay_log(self, drain: bool = False) -> bool:
        """What the harness wrote, to cage.log while the budget lasts (one read; with
        ``drain``, what is there, up to LOG_DRAIN_READS reads). False at the pair's end:
        no writer is left."""
        for _ in range(LOG_DRAIN_READS if drain else 1):
            try:
                chunk = os.read(self.log_r, LOG_READ)
            except BlockingIOError:
                return True
            except OSError:
                chunk = b""
            if not chunk:
                return False
            if self.log_left > 0:
                keep = chunk[: self.log_left]
                self.log_left -= len(chunk)
                if self.log_left <= 0:
                    keep += (
                        f"\ncage-init: the harness's output reached {HARNESS_LOG_MAX} bytes;"
                        " the rest is dropped until the cage restarts\n"
                    ).encode()
                say(keep)
        return True

    def close_log(self) -> None:
        if self.log_r >= 0:
            os.close(self.log_r)
            self.log_r = -1

    def spawn(self, req: dict, fds: list[int]) -> dict:
        """A runtime process, as the runtime uid, in its own session, in the agent's home."""
        argv, env = req.get("argv"), req.get("env") or {}
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            return {"ok": False, "error": "argv must be a non-empty list of strings"}
        if not isinstance(env, dict):  # a list's .items() ended init (red team round 29)
            return {"ok": False, "error": "env must be an object"}
        if len(fds) != MAX_FDS:
            return {"ok": False, "error": "spawn takes 3 fds"}
        if len(self.runtime) >= MAX_RUNTIME_PROCS:
            return {"ok": False, "error": "too many runtime processes"}
        env_args = [
            f"{k}={v}"
            for k, v in env.items()
            if isinstance(k, str) and "=" not in k and isinstance(v, str)
        ]
        try:
            try:
                proc = fork_relayed(env_args, argv, (fds[0], fds[1], fds[2]), self.uid, self.gid)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ETIMEDOUT):
                    raise
                # The cage is out of processes or descriptors: what the runtime uid left
                # running goes (a turn's time-out or interrupt would sweep it, but a turn
                # that never starts has neither: every later message failed at once,
                # re-check of session 32), and the start is tried once more.
                note(f"cage-init: a runtime could not start ({e.strerror}); sweeping\n")
                self.kill_uid(self.uid)
                proc = fork_relayed(env_args, argv, (fds[0], fds[1], fds[2]), self.uid, self.gid)
        except OSError as e:
            return {"ok": False, "error": str(e)}
        self.runtime[proc.pid] = proc
        self.groups.add(proc.pid)
        self.spawned[proc.pid] = None
        if len(self.spawned) > SPAWNED_KEPT:
            del self.spawned[next(iter(self.spawned))]
        return {"ok": True, "pid": proc.pid}

    def kill(self, req: dict) -> dict:
        pid, sig = req.get("pid"), req.get("signal", _signal.SIGTERM)
        # Exact ints only: a list is unhashable in ``in self.groups``, and a float naming a
        # group (8.0) is ``in`` it, then killpg raised TypeError (red team round 29).
        if (
            type(pid) is not int
            or type(sig) is not int
            or pid not in self.spawned
            or sig not in (_signal.SIGTERM, _signal.SIGKILL, _signal.SIGINT)
        ):
            return {"ok": False, "error": "no such runtime process"}
        if pid in self.groups:
            try:
                os.killpg(pid, sig)  # its whole session: children of the runtime too
            except ProcessLookupError:
                self.groups.discard(pid)
        # A turn is being stopped (interrupt, time-out): so is anything of the runtime's
        # that left the session with setsid. The pid namespace is the cage's, so these
        # are all the runtime uid's processes there are. Even when the group is gone: a
        # runtime that exited at once, its group empty and forgotten (reap), left behind
        # what holds its stdout (setsid), and only this sweep reaches that (red team of
        # session 31: init refused the kill, and the turn ran 11 s past its time-out).
        if sig == _signal.SIGKILL:
            # kill(-1) as the runtime uid, until none is left, as kill_runtime does: a
            # listing's kills miss a process that forks and exits over and over (its next
            # pid was never listed; re-check of session 31: three such setsid chains
            # outlived the turn and kept it 10 s past its SIGKILL).
            self.kill_uid(self.uid)
            return {"ok": True}
        for other in self.runtime_uid_pids():
            try:
                os.kill(other, sig)
            except ProcessLookupError:
                pass
        return {"ok": True}

    def runtime_uid_pids(self, living: bool = False, uid: int | None = None) -> list[int]:
        """The runtime uid's processes, or ``uid``'s (``living``: not those already dead,
        unreaped)."""
        uid_wanted = self.uid if uid is None else uid
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/status") as f:
                    lines = [line for line in f if line.startswith(("State:", "Uid:", "Threads:"))]
            except OSError:
                continue  # gone meanwhile
            uid_line = next((line for line in lines if line.startswith("Uid:")), None)
            if uid_line is None or int(uid_line.split()[1]) != uid_wanted:  # the real uid
                continue
            # (A zombie leader whose threads live on is living: Threads > 1.)
            if (
                living
                and any(line.split()[1:2] in (["Z"], ["X"]) for line in lines)
                and not any(
                    line.startswith("Threads:") and int(line.split()[1]) > 1 for line in lines
                )
            ):
                continue
            pids.append(int(entry))
        return pids

    def tick(self) -> float | None:
        """How long init may sleep without news. A child's exit wakes it (SIGCHLD, on the
        wakeup pipe), and so does the harness; only a group whose leader is gone, and
        whose other members exit unseen (they are not init's children), needs looking
        at now and then. An idle cage has none, and init sleeps until woken: it woke
        once a second for nothing, which with 1,000 cages was 1,000 wake-ups a second
        (~8% of a CPU) taken from every other cage, and from each cold start."""
        return 1.0 if self.groups.difference(self.runtime) else None

    def reap(self) -> None:
        for pid, proc in list(self.runtime.items()):
            code = proc.poll()
            if code is not None:
                del self.runtime[pid]
                # As a shell reports it: 128 + N for a process killed by signal N.
                self.send(
                    {"event": "exited", "pid": pid, "status": code if code >= 0 else 128 - code}
                )
        for pgid in list(self.groups):
            if pgid not in self.runtime:
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    self.groups.discard(pgid)
                except PermissionError:
                    pass

    def send(self, obj: dict) -> bool:
        """A reply or an event to the harness, never waiting: a harness whose channel is
        full reads none of it (a working one reads all the time), and init held in its
        send served nothing, reaped nothing and restarted nothing (red team round 28).
        Such a harness is killed; the loop restarts it. False once it is (``deaf``)."""
        from hyperhive.cage import wirejson

        if self.channel is not None and not self.deaf:
            try:
                self.channel.send(wirejson.dumps(obj).encode(), _socket.MSG_DONTWAIT)
            except BlockingIOError:
                note("cage-init: the harness reads nothing of its channel; killing it\n")
                self.deaf = True  # the loop reads no more of its requests
                self.kill_harness()
            except OSError:
                pass
        return not self.deaf

    def kill_harness(self) -> None:
        if self.harness is not None and self.harness.returncode is None:
            try:
                os.kill(self.harness.pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill_runtime(self) -> None:
        """Everything of the runtime, its turns' sessions and what left them (setsid), as
        ``kill`` does: a process left running past its harness could take what the next
        harness binds as it starts (the egress bridge's port: red team round 26)."""
        for pid in self.groups | set(self.runtime):
            try:
                os.killpg(pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass
        # kill(-1) as the runtime uid: the kernel sweeps every process that uid may
        # signal in the cage's pid namespace under the lock fork takes, so no child of a
        # fork loop slips between a listing and its kill, and a process whose main thread
        # exited (State Z, its threads alive) is signalled too (re-check of round 26).
        self.kill_uid(self.uid)

    def kill_uid(self, uid: int) -> None:
        """Sweep ``uid`` until none of its processes lives (at most KILL_PASSES times)."""
        for _ in range(KILL_PASSES):
            self.sweep_runtime_uid(uid)
            if not self.runtime_uid_pids(living=True, uid=uid):
                break

    def sweep_runtime_uid(self, uid: int | None = None) -> None:
        """SIGKILL to every process of the runtime uid (or ``uid``), from a child whose
        effective uid is that one (it may signal them) and whose real and saved uids are
        SWEEP_ID, which no process in the cage has (none of them may signal it: a runtime
        that stopped it held init in its wait for good, second re-check of round 26)."""
        target = self.uid if uid is None else uid
        try:
            pid = os.fork()
        except OSError:  # the cage at its pids limit: the listing's kills, as root
            for other in self.runtime_uid_pids(living=True, uid=target):
                try:
                    os.kill(other, _signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        if pid == 0:
            try:
                os.setresgid(SWEEP_ID, SWEEP_ID, SWEEP_ID)
                os.setresuid(SWEEP_ID, target, SWEEP_ID)
                os.kill(-1, _signal.SIGKILL)  # all it may signal but itself
            except BaseException:
                os._exit(1)
            os._exit(0)
        while True:  # (stopped by whom it can't be; if it is, it is killed)
            _, status = os.waitpid(pid, os.WUNTRACED)
            if not os.WIFSTOPPED(status):
                return
            os.kill(pid, _signal.SIGKILL)

    def catch_children(self) -> None:
        """A child's exit wakes the loop (SIGCHLD on the wake-up pipe): before any fork."""
        # No warning when the pair is full (a wake-up is pending then): each was a
        # traceback in cage.log, for every SIGCHLD (red team round 28).
        _signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        _signal.signal(_signal.SIGCHLD, lambda *_: None)
        sys.unraisablehook = lambda u: note(f"cage-init: {u.exc_type.__name__}: {u.exc_value}\n")

    def run(self) -> None:
        """Serve the harness, restarting it when it dies; the first was started already
        (``main``: before this loop's modules were loaded)."""
        # select's poll, not selectors (which loads collections, enum and more): this runs in
        # init while its first harness is connecting, on the same CPUs.
        import select

        wake_r = self.wake_r
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        if self.page_fd >= 0:  # (no harness, no poll: connections wait in the backlog)
            os.set_blocking(self.page_fd, False)
            poller.register(self.page_fd, select.POLLIN)
        backoff = 0.5
        while True:
            started = self.started
            if self.harness is None:
                started = time.monotonic()
                self.start_harness()
            assert self.channel is not None and self.harness is not None
            channel = self.channel.fileno()
            poller.register(channel, select.POLLIN)  # a hang-up is reported too
            channel_on = True
            self.deaf = False
            if self.log_r >= 0:
                poller.register(self.log_r, select.POLLIN)
            while self.harness.poll() is None:
                tick = self.tick()
                for fd, _ in poller.poll(None if tick is None else tick * 1000):
                    if fd == wake_r:
                        os.read(wake_r, 4096)
                        self.reap()
                        continue
                    if fd == self.log_r:
                        if not self.relay_log():
                            poller.unregister(fd)
                            self.close_log()
                        continue
                    if fd == self.page_fd:
                        self.hand_page_connections()
                        continue
                    if self.deaf:  # (an event's send found the channel full)
                        poller.unregister(channel)
                        channel_on = False
                        continue
                    req, fds = recv_request(self.channel)
                    if req is None:
                        # The harness hung up (or sent nothing, or shut its copy down): it
                        # is ending, or made to (polling a hung-up channel spun init at a
                        # whole CPU while the harness lived: red team round 28).
                        poller.unregister(channel)
                        channel_on = False
                        self.kill_harness()
                        continue
                    op = req.get("op")
                    try:
                        reply = (
                            self.spawn(req, fds)
                            if op == "spawn"
                            else self.kill(req)
                            if op == "kill"
                            else {"ok": False, "error": f"unknown op {op!r}"[:200]}
                        )
                    except Exception as e:  # a request init can't serve never ends init
                        note(f"cage-init: a request refused: {type(e).__name__}: {e}\n"[:500])
                        reply = {"ok": False, "error": f"bad request: {type(e).__name__}"}
                    for fd in fds:
                        os.close(fd)
                    if not self.send({"reply": reply, "seq": req.get("seq")}):
                        poller.unregister(channel)
                        channel_on = False
                self.reap()
            if channel_on:
                poller.unregister(channel)
            self.channel.close()
            self.channel = None
            if self.page_ours is not None:  # what it had not taken is closed with it
                self.page_ours.close()
                self.page_ours = None
            self.kill_runtime()  # its turn will be redelivered to the next harness
            # And anything the harness left (a compromised one's child could hold a copy of
            # the bridge's listener and take the runtime's proxy connections: round 27).
            self.kill_uid(self.harness_uid)
            if self.log_r >= 0:  # its last words (a traceback) before init's line
                poller.unregister(self.log_r)
                self.relay_log(drain=True)
                self.close_log()
            code = self.harness.returncode
            self.harness = None
            note(f"cage-init: harness exited with status {code}; restarting in {backoff:.1f} s\n")
            time.sleep(backoff)
            self.reap()
            backoff = 0.5 if time.monotonic() - started > 60 else min(backoff * 2, MAX_BACKOFF)


class Forked:
    """A child of init (the harness, a runtime process): as much of Popen as init uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def close_all_but(*keep: int) -> None:
    """In a child of init: every descriptor past stdio closed but ``keep``."""
    low = 3
    for fd in sorted(set(keep)):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, MAXFD)


def fork_exec(
    argv: list[str],
    stdio: tuple[int, int, int],
    *,
    keep: tuple[int, ...] = (),
    env: dict[str, str] | None = None,
    session: bool = False,
    before: Callable[[], None] | None = None,
) -> Forked:
    """What init used subprocess.Popen for: fork (init has one thread: safe), and in the
    child ``stdio`` as 0, 1, 2, every other descriptor closed but ``keep``, a new session
    if asked, ``before``, every signal back to its default (more than Popen's
    restore_signals), then exec ``argv[0]`` (an absolute path) with ``env`` (default:
    init's). An exec that fails raises OSError here, as Popen's does."""
    r, w = os.pipe2(os.O_CLOEXEC)  # w closes with a successful exec: EOF, no error
    pid = os.fork()
    if pid == 0:  # the child: never returns
        err = 1
        try:
            src = [os.dup(fd) if fd < 3 else fd for fd in stdio]  # none overwritten below
            for target, fd in enumerate(src):
                os.dup2(fd, target)  # inheritable
            for fd in keep:
                os.set_inheritable(fd, True)
            close_all_but(w, *keep)  # w closes on exec; keep stays
            signals_to_default()
            child_nofile()
            if session:
                os.setsid()
            if before is not None:
                before()
            os.execve(argv[0], argv, os.environ if env is None else env)
        except OSError as e:
            err = e.errno or 1
        finally:
            try:
                os.write(w, str(err).encode())
            finally:
                os._exit(127)
    os.close(w)
    try:
        data = b""
        while chunk := os.read(r, 32):
            data += chunk
    finally:
        os.close(r)
    if data:
        os.waitpid(pid, 0)
        err = int(data) if data.isdigit() else 1
        raise OSError(err, f"{argv[0]}: {os.strerror(err)}")
    return Forked(pid)


def fork_relayed(
    env_args: list[str], argv: list[str], sockets: tuple[int, int, int], uid: int, gid: int
) -> Forked:
    """A runtime process on pipes of its own, behind its relay (``stdio_relay``): init's
    fork, in a new session, starts ``setpriv`` (to ``uid``:``gid``) ``/usr/bin/env -i``
    with ``env_args`` and ``argv`` on the pipes, becomes ``uid``:``gid`` itself and relays
    them to ``sockets`` (the harness's ends). The relay is what init waits for and
    signals; it ends as the runtime did. A runtime that could not be started raises
    OSError here, as fork_exec does; so does a report that takes past SPAWN_REPORT_WAIT
    (only root's processes hold its pipe, so none of the runtime's can stop them in it:
    this is a last resort), its processes killed."""
    import select

    runtime_argv = [
        *drop_to(uid, gid),
        *("/usr/bin/env", "-i", "-C", layout.HOME, *env_args, *argv),
    ]
    r, w = os.pipe2(os.O_CLOEXEC)  # w closes with the runtime's exec: EOF, no error
    pid = os.fork()
    if pid == 0:  # the relay: never returns
        try:
            from hyperhive.cage import stdio_relay  # (in the fork: init never loads it)

            _signal.set_wakeup_fd(-1)
            close_all_but(w, *sockets)
            null = os.open(os.devnull, os.O_RDWR)  # init's stdio is cage.log: not theirs
            for target in (0, 1, 2):
                if target not in sockets:
                    os.dup2(null, target, inheritable=False)
            if null not in (0, 1, 2):
                os.close(null)
            signals_to_default()
            child_nofile()
            os.setsid()
            raise_oom_score()
        except BaseException:
            os._exit(127)
        stdio_relay.run(runtime_argv, sockets, w, (uid, gid), lambda: become(uid, gid), retitle)
    os.close(w)
    data = b""
    try:
        poller = select.poll()
        poller.register(r, select.POLLIN)
        deadline = time.monotonic() + SPAWN_REPORT_WAIT
        while (left := deadline - time.monotonic()) > 0 and poller.poll(left * 1000):
            chunk = os.read(r, 32)
            if not chunk:
                break
            data += chunk
        else:
            try:
                os.killpg(pid, _signal.SIGKILL)  # the relay's session: the runtime too
            except OSError:
                pass
            data = str(errno.ETIMEDOUT).encode()
    finally:
        os.close(r)
    if data:
        os.waitpid(pid, 0)  # (root's until it reports or is killed: never waits long)
        err = int(data) if data.isdigit() else 1
        raise OSError(err, f"{argv[0]}: {os.strerror(err)}")
    return Forked(pid)


def say(text: str | bytes) -> None:
    """To init's stderr, cage.log: never raises (a full disk must not end the cage)."""
    view = memoryview(text.encode(errors="replace") if isinstance(text, str) else text)
    try:
        while view:
            view = view[os.write(2, view) :]
    except OSError:
        pass


_init_log_left = INIT_LOG_MAX


def note(text: str) -> None:
    """One of init's own lines to cage.log, while INIT_LOG_MAX lasts (a harness that
    dies at once makes one a restart, at most one each 0.5 s), then one notice."""
    global _init_log_left
    if _init_log_left <= 0:
        return
    data = text.encode(errors="replace")
    _init_log_left -= len(data)
    if _init_log_left <= 0:
        data = (
            f"cage-init: its own lines reached {INIT_LOG_MAX} bytes; the rest is dropped"
            " until the cage restarts\n"
        ).encode()
    say(data)


def signals_to_default() -> None:
    """Every signal a handler or an ignore could hold back to its default, in a child
    before it becomes the harness or a runtime: what Python ignores (PIPE, XFSZ), init's
    own handlers, and anything ignored by whoever started the hive (``nohup hive up`` or a
    shell's background job ignores HUP, INT and QUIT, and an ignore survives exec)."""
    for sig in _signal.valid_signals():  # _signal: no enum module in the harness's fork
        if sig in (_signal.SIGKILL, _signal.SIGSTOP):
            continue
        try:
            _signal.signal(sig, _signal.SIG_DFL)
        except (OSError, ValueError):  # the real-time signals Python can't name, say
            pass


def run_harness(
    uid: int, gid: int, channel_fd: int, handed: dict[str, int], log_fd: int
) -> NoReturn:
    """In init's fork: become the harness (as a fresh ``setpriv … python -m hyperhive.cage
    harness`` would be) and run it; never returns. Init's signal handling and descriptors
    are not the harness's (``log_fd`` becomes its stdout and stderr); its capabilities and
    ids go before any harness code runs."""
    code = 1
    try:
        _signal.set_wakeup_fd(-1)
        signals_to_default()
        child_nofile()
        for sig in (_signal.SIGPIPE, _signal.SIGXFSZ):  # as a fresh interpreter sets them
            _signal.signal(sig, _signal.SIG_IGN)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        close_all_but(channel_fd, *handed.values())  # and stdio: the channel, the listeners
        become(uid, gid)
        os.environ["HIVE_INIT_FD"] = str(channel_fd)
        os.environ.update((name, str(fd)) for name, fd in handed.items())
        retitle("harness")
        # Connected (as the harness uid: the core reads its peer's credentials at connect)
        # before the harness's modules load: the agent runs from here.
        first = connect_first(os.environ.get("HIVE_SOCKET", layout.AGENT_SOCKET))
        from hyperhive.cage.harness import main as harness_main

        harness_main([], connected=first)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def connect_first(path: str) -> int | None:
    """The harness's first connection to the agent's socket, made with the C module only
    (socket.py loads enum and selectors: ~5 ms before the connect); its descriptor, or None
    if the core does not serve it yet (the harness then tries again, with backoff)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock.detach()


def retitle(last: str) -> None:
    """Make this process's command line (``ps``, /proc/PID/cmdline) read as init's with
    ``last`` in place of init's arguments: ``python3.11 -I -S -c <boot> harness``, as the
    harness's own was when it was a program of its own. The bytes are rewritten where the
    kernel reads them (arg_start..arg_end); Python keeps its own copy of argv."""
    import ctypes  # here: only the harness's fork runs this

    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (stat fields 48, 49)
    with open("/proc/self/cmdline", "rb") as f:
        old = f.read()
    parts = old.split(b"\0")
    if b"init" not in parts:
        return  # not the layout python_argv made: leave it
    keep = parts[: parts.index(b"init")]  # python, its flags, -c and the boot line
    new = b"\0".join(keep) + b"\0" + last.encode() + b"\0"
    pad = end - start - len(new)
    if pad < 0 or len(old) != end - start:
        return  # not the layout python_argv made: leave it
    keep[-1] += b" " * pad  # spaces after the boot line: still the same program text
    new = b"\0".join(keep) + b"\0" + last.encode() + b"\0"
    ctypes.memmove(start, new, len(new))


def parse_ids(args: list[str]) -> dict[str, int]:
    """``--uid N --gid N --harness-uid N`` (hive-priv's argv, exactly these), without
    argparse: its import is a tenth of init's start-up."""
    want = ("--uid", "--gid", "--harness-uid")
    ids: dict[str, int] = {}
    try:
        if len(args) != 2 * len(want):
            raise ValueError
        for flag, value in zip(args[::2], args[1::2], strict=True):
            if flag not in want or flag in ids or not value.isdigit():
                raise ValueError
            ids[flag] = int(value)
    except ValueError:
        print("usage: cage-init --uid N --gid N --harness-uid N", file=sys.stderr)
        raise SystemExit(2) from None
    return ids


def handed_page_fd() -> int:
    """web.sock's listener, which hive-priv bound and bwrap passed through (its number in
    ``HIVE_PAGE_FD``), kept from everything init starts (init accepts on it and hands the
    harness each connection); -1 if none."""
    raw = os.environ.pop(layout.PAGE_FD_ENV, "")
    if not raw.isdigit():
        return -1
    fd = int(raw)
    try:
        sock = _socket.socket(fileno=fd)
    except OSError:
        return -1
    if sock.family != _socket.AF_UNIX or not sock.getsockopt(
        _socket.SOL_SOCKET, _socket.SO_ACCEPTCONN
    ):
        sock.close()
        return -1
    sock.detach()
    os.set_inheritable(fd, False)
    return fd


def rearm_listener(fd: int) -> None:
    """The bridge's listener the last harness held, blocking and listening again, when
    ``rebind_bridge`` can't bind a fresh one. Its open file description is init's too: a
    compromised harness could have set O_NONBLOCK on it (the next harness's accept loop
    ended on EAGAIN; red team round 27). (One it shut down stays dead, listening or not.)"""
    try:
        os.set_blocking(fd, True)
        listener = _socket.socket(fileno=fd)
        try:
            listener.listen(128)
        finally:
            listener.detach()
    except OSError as e:
        note(f"cage-init: handed listener (fd {fd}) not re-armed: {e}\n")


def bind_bridge() -> int:
    """The egress bridge's listener on the cage's loopback, for the next harness; -1 if
    it can't be bound (turns still run, egress is refused, each harness says so).
    SO_REUSEPORT: only a socket of init's uid may be bound beside it (the kernel's rule),
    which ``rebind_bridge`` does, so the port is never free while the cage runs."""
    listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        listener.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", layout.EGRESS_PORT))
        listener.listen(128)
    except OSError as e:
        note(f"cage-init: egress bridge port not bound: {e}\n")
        listener.close()
        return -1
    return listener.detach()  # close-on-exec: only the harness is handed it


def rebind_bridge(old: int) -> int:
    """A new listener for the next harness, bound beside the last one's before that is
    closed: whatever the last harness did to the old one's open file description (shut
    it down, made it non-blocking: red team round 27), the next serves a whole one.
    Connections still queued on the old one are reset, as when each harness bound its
    own."""
    new = bind_bridge()
    if new < 0:
        rearm_listener(old)
        return old
    os.close(old)
    return new


def main(args: list[str]) -> None:
    ids = parse_ids(args)
    if 0 in ids.values():
        print("cage-init: refusing to run anything as root", file=sys.stderr)
        raise SystemExit(2)
    one_malloc_arena()
    raise_own_nofile()
    confine_self()
    seccomp.install()  # the cage's syscall policy, for init and everything it starts

    def on_term(signum: int, frame: object) -> None:
        # When init exits, bwrap ends the pid namespace and the kernel kills the rest.
        os._exit(0)

    _signal.signal(_signal.SIGTERM, on_term)
    _signal.signal(_signal.SIGINT, on_term)
    init = Init(ids["--uid"], ids["--gid"], ids["--harness-uid"], handed_page_fd(), bind_bridge())
    init.catch_children()
    # The first harness at once, with only what is loaded so far: it connects to the core
    # (the cold start's end), then loads its own modules while init waits in poll.
    init.start_harness()
    init.run()

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

import argparse
import ctypes
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

from hyperhive.cage import layout, seccomp
from hyperhive.cage.setpriv import drop_to

MAX_BACKOFF = 10.0
MAX_RUNTIME_PROCS = 8
MSG_MAX = 256 * 1024
MAX_FDS = 3  # a spawn's stdin, stdout and stderr

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


def raise_oom_score() -> None:
    """In a runtime process, before it becomes the runtime uid: killed first."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(RUNTIME_OOM_SCORE_ADJ))


def recv_request(sock: socket.socket) -> tuple[dict | None, list[int]]:
    # Room for one more descriptor than a spawn takes: a request with too many is then
    # seen, and refused, rather than cut to three (the kernel closes any beyond four).
    data, fds, _, _ = socket.recv_fds(sock, MSG_MAX, MAX_FDS + 1)
    if not data:
        return None, fds
    try:
        return json.loads(data), fds
    except ValueError:
        return {}, fds


class Init:
    def __init__(self, uid: int, gid: int, harness_uid: int) -> None:
        self.uid, self.gid, self.harness_uid = uid, gid, harness_uid
        self.runtime: dict[int, subprocess.Popen[bytes]] = {}
        # Process groups of runtime processes (each its own session, id = its first pid), kept
        # while any member lives: a child left behind by a runtime that exited can still be
        # signalled through its group.
        self.groups: set[int] = set()
        self.harness: subprocess.Popen[bytes] | None = None
        self.channel: socket.socket | None = None

    def start_harness(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ, HIVE_INIT_FD=str(theirs.fileno()))
        self.harness = subprocess.Popen(
            drop_to(self.harness_uid, self.gid) + layout.python_argv("harness"),
            stdin=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
            env=env,
        )
        theirs.close()
        self.channel = ours

    def spawn(self, req: dict, fds: list[int]) -> dict:
        """A runtime process, as the runtime uid, in its own session, in the agent's home."""
        argv, env = req.get("argv"), req.get("env") or {}
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            return {"ok": False, "error": "argv must be a non-empty list of strings"}
        if len(fds) != MAX_FDS:
            return {"ok": False, "error": "spawn takes 3 fds"}
        if len(self.runtime) >= MAX_RUNTIME_PROCS:
            return {"ok": False, "error": "too many runtime processes"}
        env_args = [
            f"{k}={v}"
            for k, v in env.items()
            if isinstance(k, str) and "=" not in k and isinstance(v, str)
        ]
        argv_full = [
            *drop_to(self.uid, self.gid),
            *("/usr/bin/env", "-i", "-C", layout.HOME, *env_args, *argv),
        ]
        try:
            proc = subprocess.Popen(  # init has one thread: preexec_fn is safe here
                argv_full,
                stdin=fds[0],
                stdout=fds[1],
                stderr=fds[2],
                start_new_session=True,
                preexec_fn=raise_oom_score,
            )
        except OSError as e:
            return {"ok": False, "error": str(e)}
        self.runtime[proc.pid] = proc
        self.groups.add(proc.pid)
        return {"ok": True, "pid": proc.pid}

    def kill(self, req: dict) -> dict:
        pid, sig = req.get("pid"), req.get("signal", signal.SIGTERM)
        if pid not in self.groups or sig not in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT):
            return {"ok": False, "error": "no such runtime process"}
        try:
            os.killpg(pid, sig)  # its whole session: children of the runtime too
        except ProcessLookupError:
            self.groups.discard(pid)
        # A turn is being stopped (interrupt, time-out): so is anything of the runtime's
        # that left the session with setsid. The pid namespace is the cage's, so these
        # are all the runtime uid's processes there are.
        for other in self.runtime_uid_pids():
            try:
                os.kill(other, sig)
            except ProcessLookupError:
                pass
        return {"ok": True}

    def runtime_uid_pids(self) -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/status") as f:
                    uid_line = next(line for line in f if line.startswith("Uid:"))
            except (OSError, StopIteration):
                continue  # gone meanwhile
            if int(uid_line.split()[1]) == self.uid:  # the real uid
                pids.append(int(entry))
        return pids

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

    def send(self, obj: dict) -> None:
        if self.channel is not None:
            try:
                self.channel.send(json.dumps(obj).encode())
            except OSError:
                pass

    def kill_runtime(self) -> None:
        for pid in self.groups | set(self.runtime):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def run(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        sel = selectors.DefaultSelector()
        sel.register(wake_r, selectors.EVENT_READ)
        backoff = 0.5
        while True:
            started = time.monotonic()
            self.start_harness()
            assert self.channel is not None and self.harness is not None
            sel.register(self.channel, selectors.EVENT_READ)
            while self.harness.poll() is None:
                for key, _ in sel.select(timeout=1.0):
                    if key.fileobj == wake_r:
                        os.read(wake_r, 4096)
                        self.reap()
                        continue
                    req, fds = recv_request(self.channel)
                    if req is None:
                        continue  # the harness hung up; poll() will tell
                    op = req.get("op")
                    reply = (
                        self.spawn(req, fds)
                        if op == "spawn"
                        else self.kill(req)
                        if op == "kill"
                        else {"ok": False, "error": f"unknown op {op!r}"}
                    )
                    for fd in fds:
                        os.close(fd)
                    self.send({"reply": reply, "seq": req.get("seq")})
                self.reap()
            sel.unregister(self.channel)
            self.channel.close()
            self.channel = None
            self.kill_runtime()  # its turn will be redelivered to the next harness
            code = self.harness.returncode
            print(
                f"cage-init: harness exited with status {code}; restarting in {backoff:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(backoff)
            self.reap()
            backoff = 0.5 if time.monotonic() - started > 60 else min(backoff * 2, MAX_BACKOFF)


def main(args: list[str]) -> None:
    p = argparse.ArgumentParser(prog="cage-init")
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--gid", type=int, required=True)
    p.add_argument("--harness-uid", type=int, required=True)
    opts = p.parse_args(args)
    if opts.uid == 0 or opts.harness_uid == 0 or opts.gid == 0:
        print("cage-init: refusing to run anything as root", file=sys.stderr)
        raise SystemExit(2)
    confine_self()
    seccomp.install()  # the cage's syscall policy, for init and everything it starts

    def on_term(signum: int, frame: object) -> None:
        # When init exits, bwrap ends the pid namespace and the kernel kills the rest.
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    Init(opts.uid, opts.gid, opts.harness_uid).run()

"""``hive exec`` against an agent that left a process behind: the operator's terminal,
the exec'd process's memory, and what the exec leaves running.

Each case starts an attacker in the cage as the agent (``hive exec --as-agent``, then
it kills that exec's init so it belongs to the cage, like anything an earlier turn
left running). The attacker watches the cage's /proc for the operator's command (a
marker in its argv) and tries one technique on it: copy its descriptors
(``/proc/<pid>/fd``, ``pidfd_getfd``, or the command handing them over a socket),
read its environment or memory (``/proc/<pid>/environ``, ``/proc/<pid>/mem``,
``process_vm_readv``), trace, stop or ``pidfd_open`` it. The operator's side is a
real pty (``pty.openpty``) or real pipes of the test's. After the exec returns the
test types a secret into its terminal (or stdin pipe) and lets the attacker read,
write forged text, and ``TIOCSTI`` into whatever it took.

What must hold: the operator's command is not even visible in the cage; no
descriptor of the operator's is ever reached; the operator sees EOF, no forged
byte, and the secret stays in its own terminal; the operator's terminal mode is
restored; and nothing the exec started outlives it (on the host, in the cage's
cgroup).
"""

from __future__ import annotations

import json
import os
import pty
import secrets
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HIVE, HiveProcess, proc_cmdline, running_hive

AGENTS = {"rxalice": {"runtime": "command", "command": ["true"]}}
NAME = "rxalice"

LAUNCH = r"""
import os, signal, sys, time
src = sys.stdin.read()
os.makedirs("/home/agent/.rtx", exist_ok=True)
init = os.getppid()  # the exec's init: a subreaper that would kill us with it
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.execvp("python3", ["python3", "-c", src])
    os._exit(0)
os.wait()
ready = sys.argv[1]  # the attacker's own word that it runs (its loop started)
deadline = time.monotonic() + 30
while not os.path.exists(ready) and time.monotonic() < deadline:
    time.sleep(0.01)
print("launched", flush=True)
if init > 1:  # 0: a parent outside our pid namespace (then nothing holds the attacker)
    os.kill(init, signal.SIGKILL)  # now the attacker is the cage's, like a leftover of a turn
"""

ATTACKER = r"""
import ctypes, errno, fcntl, json, os, select, signal, socket, struct, termios, time, array
P = json.loads(PARAMS)
D = "/home/agent/.rtx/" + P["id"]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.ptrace.restype = ctypes.c_long
me = os.getpid()
res = {"seen": [], "stolen": [], "read": "", "forged": 0, "tiocsti": 0, "hits": [], "errors": []}
kept = []
done = set()
marker, token = P["marker"].encode(), P["token"].encode()

def note(e):
    if len(res["errors"]) < 20:
        res["errors"].append(repr(e)[:120])

def keep(fd, how):
    st = os.fstat(fd)
    res["stolen"].append([st.st_dev, st.st_ino, how])
    kept.append(fd)

def grab(path):
    for flags in (os.O_RDWR, os.O_RDONLY, os.O_WRONLY):
        try:
            return os.open(path, flags | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as e:
            err = e
    raise err

def stack(pid):
    for line in open(f"/proc/{pid}/maps"):
        if line.rstrip().endswith("[stack]"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            return lo, hi
    raise OSError("no stack")

class IOV(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

def attack(pid):
    t = P["technique"]
    if t == "proc-fd":
        for fd in P["fds"]:
            keep(grab(f"/proc/{pid}/fd/{fd}"), t)
    elif t == "pidfd-getfd":
        pfd = libc.syscall(434, pid, 0)
        if pfd < 0:
            raise OSError(ctypes.get_errno(), "pidfd_open")
        for fd in P["fds"]:
            n = libc.syscall(438, pfd, fd, 0)
            if n < 0:
                raise OSError(ctypes.get_errno(), "pidfd_getfd")
            keep(n, t)
    elif t == "environ":
        if token in open(f"/proc/{pid}/environ", "rb").read():
            res["hits"].append(t)
    elif t == "cmdline":
        if token in open(f"/proc/{pid}/cmdline", "rb").read():
            res["hits"].append(t)
    elif t == "mem":
        lo, hi = stack(pid)
        with open(f"/proc/{pid}/mem", "rb") as f:
            f.seek(lo)
            if token in f.read(hi - lo):
                res["hits"].append(t)
    elif t == "process_vm_readv":
        lo, hi = stack(pid)
        buf = ctypes.create_string_buffer(hi - lo)
        local, remote = IOV(ctypes.addressof(buf), hi - lo), IOV(lo, hi - lo)
        n = libc.syscall(310, pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if n < 0:
            raise OSError(ctypes.get_errno(), "process_vm_readv")
        if token in buf.raw[:n]:
            res["hits"].append(t)
    elif t in ("ptrace-attach", "ptrace-seize"):
        req = 16 if t == "ptrace-attach" else 0x4206
        if libc.ptrace(req, pid, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "ptrace")
        res["hits"].append(t)
        libc.ptrace(17, pid, 0, 0)
    elif t == "sigstop":
        os.kill(pid, signal.SIGSTOP)
        res["hits"].append(t)
        os.kill(pid, signal.SIGCONT)
    elif t == "pidfd_open":
        if libc.syscall(434, pid, 0) >= 0:
            res["hits"].append(t)

srv = None
if P["technique"] == "scm-rights":
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind("\0rtx-" + P["id"])
    srv.listen(4)
    srv.setblocking(False)
open(D + ".ready", "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(D + ".go") and time.monotonic() < deadline:
    # Every process this uid may signal, seen or not (once its own launcher is gone: the
    # test arms it as soon as the launcher's exec returned, before the operator's starts).
    if P["technique"] == "kill-all" and os.path.exists(D + ".armed"):
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError as e:
            note(e)
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read()
        except OSError:
            continue
        if marker not in cmd:
            continue
        if int(d) not in res["seen"]:
            res["seen"].append(int(d))
        if int(d) in done:
            continue
        try:  # again at every scan until it works: the pid may still be exec's setup
            attack(int(d))
            done.add(int(d))
        except OSError as e:
            note(e)
    if srv is not None:
        try:
            conn, _ = srv.accept()
            conn.setblocking(True)
            msg, anc, _, _ = conn.recvmsg(16, socket.CMSG_SPACE(3 * 4))
            for level, kind, data in anc:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % 4])
                for fd in fds:
                    keep(fd, "scm-rights")
        except BlockingIOError:
            pass
    time.sleep(0.02)

# After the exec returned: use whatever was taken.
try:
    os.setsid()
except OSError as e:
    note(e)
for fd in kept:
    try:
        if select.select([fd], [], [], 1.0)[0]:
            res["read"] += os.read(fd, 65536).decode("latin-1")
    except OSError as e:
        note(e)
    try:
        os.write(fd, b"FORGED by the agent\n")
        res["forged"] += 1
    except OSError as e:
        note(e)
    try:
        fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
        for ch in b"INJECTED\n":
            fcntl.ioctl(fd, termios.TIOCSTI, bytes([ch]))
        res["tiocsti"] += 1
    except OSError as e:
        note(e)
with open(D + ".json.tmp", "w") as f:
    json.dump(res, f)
os.rename(D + ".json.tmp", D + ".json")
"""

# The operator's command for the scm-rights case: hands its own stdio to the agent.
SENDER = r"""
import array, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("\0rtx-" + sys.argv[2])
s.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
time.sleep(0.5)  # about 25 of the attacker's scans: it takes them while the command runs
"""


@pytest.fixture(scope="module")
def rx() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(AGENTS))


class Attacker:
    def __init__(
        self, h: HiveProcess, technique: str, fds: list[int], marker: str, token: str
    ) -> None:
        self.h, self.id = h, secrets.token_hex(6)
        self.dir = h.home(NAME) / ".rtx"
        params = {
            "id": self.id,
            "technique": technique,
            "fds": fds,
            "marker": marker,
            "token": token,
        }
        src = ATTACKER.replace(
            "json.loads(PARAMS)", f"json.loads({json.dumps(json.dumps(params))})"
        )
        ready = f"/home/agent/.rtx/{self.id}.ready"
        proc = h.exec(NAME, "python3", "-c", LAUNCH, ready, input=src)
        assert "launched" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr)
        wait_for(self.dir / f"{self.id}.ready", "the attacker to start")
        (self.dir / f"{self.id}.armed").touch()  # its launcher is gone: kill-all may begin

    def result(self) -> dict[str, Any]:
        (self.dir / f"{self.id}.go").touch()
        out = self.dir / f"{self.id}.json"
        wait_for(out, "the attacker's result")
        return json.loads(out.read_text())


def wait_for(path: Path, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def hive_exec(
    h: HiveProcess,
    argv: list[str],
    stdin: int,
    stdout: int,
    stderr: int,
    env: dict[str, str] | None = None,
    flags: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    extra = [a for k, v in (env or {}).items() for a in ("--env", f"{k}={v}")]
    return subprocess.Popen(
        [str(HIVE), "--run-dir", str(h.run_dir), "exec", *extra, *flags, NAME, "--", *argv],
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
    )


class Reader(threading.Thread):
    """Collects what the operator's side gets, until EOF (or EIO on a pty master)."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd, self.data, self.eof_at = fd, b"", 0.0
        self.start()

    def run(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                self.eof_at = time.monotonic()
                return
            self.data += chunk


def drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    try:
        while chunk := os.read(fd, 65536):
            out += chunk
    except (BlockingIOError, OSError):
        pass
    return out


def host_pids_with(marker: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if any(marker in a for a in proc_cmdline(int(d))):
                    out.append(int(d))
            except (OSError, ValueError):
                pass
    return out


# -- the operator's terminal ------------------------------------------------------------------

STEAL = [
    (t, fd, mode)
    for t in ("proc-fd", "pidfd-getfd")
    for fd in (0, 1, 2)
    for mode in ("tty", "pipe")
]
STEAL += [("scm-rights", None, mode) for mode in ("tty", "pipe")]


@pytest.mark.attack(
    "exec.operator-terminal",
    ref="CVE-2017-5226 (bubblewrap TIOCSTI); Firejail --join #2718; issue 11 (pidfd_getfd on exec)",
)
@pytest.mark.parametrize(
    ("technique", "fd", "mode"), STEAL, ids=[f"{t}-{fd}-{m}" for t, fd, m in STEAL]
)
def test_leftover_process_cannot_take_the_operators_terminal(
    rx: HiveProcess, technique: str, fd: int | None, mode: str
) -> None:
    h = rx
    marker, token = f"rxmark{secrets.token_hex(4)}", f"hunter2-{secrets.token_hex(6)}"
    attacker = Attacker(h, technique, [0, 1, 2] if fd is None else [fd], marker, token)
    if technique == "scm-rights":
        argv = ["python3", "-c", SENDER, marker, attacker.id]
    else:
        # 0.6 s: about 30 of the attacker's scans (one each 20 ms) while it runs, each
        # retrying its technique until it works
        argv = ["sh", "-c", "sleep 0.6; echo done", marker]
    if mode == "tty":
        master, slave = pty.openpty()
        before = termios.tcgetattr(slave)
        ours = {ident(slave)}
        proc = hive_exec(h, argv, slave, slave, slave)
        reader = None
        out = b""
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            out += drain(master)
            time.sleep(0.05)
        assert proc.wait(timeout=5) == 0
        out += drain(master)
        assert termios.tcgetattr(slave) == before, "the operator's terminal mode was not restored"
        os.write(master, token.encode() + b"\n")  # the operator types a secret after exec returned
        res = attacker.result()
        # Whatever the attacker wrote to a terminal of ours is ahead of this line on the
        # master (one tty, one output queue): read up to it, not for a guessed while.
        os.write(slave, b"rx-barrier\n")
        deadline = time.monotonic() + 30
        while b"rx-barrier" not in out and time.monotonic() < deadline:
            out += drain(master)
            time.sleep(0.01)
        assert b"rx-barrier" in out, out
        typed = drain(slave)  # what is waiting for the operator's shell
        os.close(master)
        os.close(slave)
        assert token.encode() in typed, (
            "the secret typed after exec did not stay in the operator's terminal"
        )
        assert b"INJECTED" not in typed
    else:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ours = {ident(in_r), ident(out_w), ident(err_w)}
        proc = hive_exec(h, argv, in_r, out_w, err_w)
        for x in (in_r, out_w, err_w):
            os.close(x)
        reader, err_reader = Reader(out_r), Reader(err_r)
        code = proc.wait(timeout=60)
        returned = time.monotonic()
        assert code == 0
        with pytest.raises(
            BrokenPipeError
        ):  # more input after exec returned: nobody may hold our stdin
            os.write(in_w, token.encode() + b"\n")
        reader.join(10)
        err_reader.join(10)
        assert reader.eof_at and reader.eof_at - returned < 5, "the operator's stdout never saw EOF"
        res = attacker.result()
        os.close(in_w)
        os.close(out_r)
        os.close(err_r)
        out = reader.data + err_reader.data
    assert res["seen"] == [], f"the operator's command is visible in the cage: {res}"
    stolen = {(dev, ino) for dev, ino, _ in res["stolen"]}
    assert not stolen & ours, f"the agent holds a descriptor of the operator's: {res}"
    assert token not in res["read"], "the agent read what the operator typed"
    assert b"FORGED" not in out
    if technique != "scm-rights":
        assert res["stolen"] == [] and res["forged"] == 0 and res["tiocsti"] == 0, res
        assert b"done" in out
    else:  # what it handed over is hive-priv's pipe or pty, which nobody reads any more
        assert len(res["stolen"]) == 3, res


# -- the exec'd process's memory ------------------------------------------------------------

MEMORY = [
    "environ",
    "cmdline",
    "mem",
    "process_vm_readv",
    "ptrace-attach",
    "ptrace-seize",
    "sigstop",
    "pidfd_open",
    "kill-all",
]
# 0.7 s: about 35 of the attacker's scans (each retrying its technique until it works);
# kill-all is armed once its launcher is gone, before the exec starts: kill(-1) every
# 20 ms through the exec's whole setup and the operator's command's run.
SHAPES = {
    "command": ["python3", "-c", "import time; time.sleep(0.7)", "MARK", "TOKEN"],
    "grandchild": [
        "sh",
        "-c",
        "python3 -c 'import time; time.sleep(0.7)' MARK TOKEN & wait",
        "MARK",
        "TOKEN",
    ],
}


@pytest.mark.attack(
    "exec.process-memory",
    ref="typeclaw PR#707 (/proc environ); issue 11 (ptrace, process_vm_readv)",
)
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("technique", MEMORY)
def test_exec_process_invisible_to_the_cage(rx: HiveProcess, technique: str, shape: str) -> None:
    h = rx
    marker, token = f"rxmark{secrets.token_hex(4)}", f"secret-{secrets.token_hex(8)}"
    attacker = Attacker(h, technique, [], marker, token)
    argv = [a.replace("MARK", marker).replace("TOKEN", token) for a in SHAPES[shape]]
    proc = hive_exec(
        h, argv, subprocess.DEVNULL, subprocess.PIPE, subprocess.PIPE, env={"RX_SECRET": token}
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    res = attacker.result()
    assert res["seen"] == [], f"the operator's command is visible in the cage: {res}"
    assert res["hits"] == [], res


# -- what the exec leaves behind ---------------------------------------------------------------

SLEEPER = "python3 -c 'import time; time.sleep(1000)' MARK"
LEFTOVERS = {
    "background": f"{SLEEPER} &",
    "setsid": f"setsid {SLEEPER} &",
    "setsid-fork": f"setsid -f {SLEEPER}",
    "double-fork": f"( {SLEEPER} & ) ; true",
    "nohup": f"nohup {SLEEPER} >/dev/null 2>&1 &",
    "ignores-signals": "python3 -c 'import signal, time; "
    "[signal.signal(s, signal.SIG_IGN) for s in (1, 2, 3, 15)]; "
    "time.sleep(1000)' MARK &",
    "daemonized": "python3 -c 'import os, time\nif os.fork(): os._exit(0)\nos.setsid()\n"
    "if os.fork(): os._exit(0)\n"
    "[os.close(f) for f in (0, 1, 2)]\ntime.sleep(1000)' MARK",
    "kills-init": f"{SLEEPER} & kill -9 1; kill -9 $PPID; true",
    "many": f"for i in 1 2 3 4 5 6 7 8; do {SLEEPER} & done",
    "stopped": f"{SLEEPER} & kill -STOP $!",
}


@pytest.mark.attack(
    "exec.leftover-processes", ref="Firejail --join #2718; issue 11 (processes outlive exec)"
)
@pytest.mark.parametrize("how", sorted(LEFTOVERS))
def test_nothing_the_exec_started_outlives_it(rx: HiveProcess, how: str) -> None:
    h = rx
    marker = f"rxmark{secrets.token_hex(4)}"
    before = set(h.cage_procs(NAME))
    script = LEFTOVERS[how].replace("MARK", marker) + "\nsleep 0.3\necho started"
    t0 = time.monotonic()
    proc = h.exec(NAME, "sh", "-c", script, flags=(), timeout=30)
    assert proc.returncode == 0 and "started" in proc.stdout, (
        proc.returncode,
        proc.stdout,
        proc.stderr,
    )
    assert time.monotonic() - t0 < 20
    deadline = time.monotonic() + 3
    while host_pids_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert host_pids_with(marker) == [], "a process the exec started is still running"
    assert set(h.cage_procs(NAME)) <= before, "the cage's cgroup holds new processes"

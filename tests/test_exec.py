"""``hive exec NAME -- CMD...`` against a real hive: CMD runs in NAME's cage as the
agent's runtime uid (not the harness's, not root), in the cage's mount, net, ipc and
uts namespaces and cgroup, but a pid namespace of its own; stdin, stdout, stderr
and the exit status pass through (relayed by hive-priv); only root may use it.
Every test here runs the default (clean) exec, not the fixture's ``--as-agent``."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import resource
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HIVE, HiveProcess, children
from hyperhive.priv.cgroups import is_v2

AGENT_NAMES = ("alice", "bob", "carol")
NAMESPACES = ("pid", "mnt", "net", "uts", "ipc")
SHARED = ("net", "uts", "ipc")  # with the cage; pid and mnt are the exec's own


def run(h: HiveProcess, name: str, *argv: str, **kw: Any) -> subprocess.CompletedProcess[Any]:
    """The operator's plain ``hive exec NAME -- ARGV`` (no --as-agent)."""
    return h.exec(name, *argv, flags=kw.pop("flags", ()), **kw)

WHOAMI = """
import json, socket
s = socket.socket(socket.AF_UNIX)
s.connect("/run/hive/agent.sock")
s.sendall(b'{"cmd": "whoami"}\\n')
print(s.makefile("rb").readline().decode().strip())
"""


@pytest.mark.parametrize("name", AGENT_NAMES)
def test_own_agent_sock_answers_whoami_with_its_name(caged_hive: HiveProcess, name: str) -> None:
    proc = run(caged_hive, name, "python3", "-c", WHOAMI)
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply == {"version": 1, "ok": True, "name": name}


def test_stdin_stdout_stderr_and_status_pass_through(caged_hive: HiveProcess) -> None:
    data = bytes(range(256)) * 4096 + secrets.token_bytes(100_000)  # > any pipe buffer, every byte value
    script = (
        "import sys; d = sys.stdin.buffer.read(); sys.stdout.buffer.write(d[::-1]); "
        "sys.stderr.write('to stderr %d\\n' % len(d)); sys.exit(42)"
    )
    proc = run(caged_hive, "alice", "python3", "-c", script, input=data)
    assert proc.returncode == 42, proc.stderr
    assert proc.stdout == data[::-1]
    assert proc.stderr == f"to stderr {len(data)}\n".encode()


def test_empty_stdin_is_eof(caged_hive: HiveProcess) -> None:
    proc = run(caged_hive, "alice", "wc", "-c", input=b"")
    assert (proc.returncode, proc.stdout.strip()) == (0, b"0")


@pytest.mark.parametrize("status", [0, 1, 3, 42, 127, 255])
def test_exit_status_passes_through(caged_hive: HiveProcess, status: int) -> None:
    proc = run(caged_hive, "bob", "sh", "-c", f"echo out; echo err >&2; exit {status}")
    assert proc.returncode == status
    assert (proc.stdout, proc.stderr) == ("out\n", "err\n")


def test_death_by_signal_is_128_plus_signal(caged_hive: HiveProcess) -> None:
    assert run(caged_hive, "bob", "sh", "-c", "kill -9 $$").returncode == 128 + 9
    assert run(caged_hive, "bob", "sh", "-c", "kill -TERM $$").returncode == 128 + 15


def test_missing_command_is_127(caged_hive: HiveProcess) -> None:
    proc = run(caged_hive, "carol", "no-such-command-here")
    assert proc.returncode == 127
    assert "no-such-command-here" in proc.stderr


@pytest.mark.parametrize("name", AGENT_NAMES)
def test_runs_as_the_runtime_uid_with_the_cages_hostname(caged_hive: HiveProcess, name: str) -> None:
    cage = caged_hive.cage(name)
    proc = run(caged_hive, name, "sh", "-c", "id -u; id -g; id -G; hostname; pwd; echo $HOME")
    assert proc.returncode == 0, proc.stderr
    uid, gid, groups, hostname, cwd, home = proc.stdout.splitlines()
    assert int(uid) == cage["uid"]
    assert int(uid) not in (0, cage["harness_uid"])
    assert cage["uid"] != cage["harness_uid"]
    assert int(gid) == cage["gid"] != 0
    assert groups.split() == [str(cage["gid"])]  # no supplementary groups
    assert hostname == name
    assert (cwd, home) == ("/", "/home/exec")


def test_uids_differ_between_agents(caged_hive: HiveProcess) -> None:
    uids = [caged_hive.cage(n)["uid"] for n in AGENT_NAMES]
    harness = [caged_hive.cage(n)["harness_uid"] for n in AGENT_NAMES]
    assert len(set(uids + harness)) == 2 * len(AGENT_NAMES)


def test_no_capabilities_and_no_new_privs(caged_hive: HiveProcess) -> None:
    proc = run(caged_hive, "alice", "cat", "/proc/self/status")
    status = dict(line.split(":", 1) for line in proc.stdout.splitlines())
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap].strip(), 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"


@pytest.mark.parametrize("name", ["alice", "carol"])
def test_cage_namespaces_but_a_pid_namespace_of_its_own(caged_hive: HiveProcess, name: str) -> None:
    harness = caged_hive.harness_pid(name)
    host_view = {ns: os.readlink(f"/proc/{harness}/ns/{ns}") for ns in NAMESPACES}
    mine = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in NAMESPACES}
    assert all(host_view[ns] != mine[ns] for ns in NAMESPACES), "the harness shares a namespace with the host"
    script = "; ".join(f"readlink /proc/self/ns/{ns}" for ns in NAMESPACES)
    proc = run(caged_hive, name, "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    inside = dict(zip(NAMESPACES, proc.stdout.split(), strict=False))
    assert {ns: inside[ns] for ns in SHARED} == {ns: host_view[ns] for ns in SHARED}
    assert inside["pid"] not in (host_view["pid"], mine["pid"])
    assert inside["mnt"] not in (host_view["mnt"], mine["mnt"])  # a private copy of the cage's
    # It sees only itself: not the harness, not the cage's init.
    ps = run(caged_hive, name, "ps", "-eo", "pid=,user=,args=").stdout.splitlines()
    assert [line.split()[:2] for line in ps][:1] == [["1", "agent"]], ps
    assert not any("harness" in line.split()[2:] for line in ps), ps
    # --as-agent (the red-team probes') is the cage's own pid namespace, and sees the harness.
    proc = run(caged_hive, name, "sh", "-c", script, flags=("--as-agent",))
    assert dict(zip(NAMESPACES, proc.stdout.split(), strict=False))["pid"] == host_view["pid"]


def test_runs_in_the_cages_cgroup(caged_hive: HiveProcess) -> None:
    proc = run(caged_hive, "bob", "cat", "/proc/self/cgroup")
    lines = proc.stdout.splitlines()
    if is_v2():
        limited = [line for line in lines if line.startswith("0::")]
    else:
        limited = [line for line in lines if line.split(":")[1] in ("pids", "memory")]
        assert len(limited) == 2, lines
    key = caged_hive.cgroup("bob").key  # this hive's own subtree
    assert limited and all(line.endswith(f"/hive/{key}/bob") for line in limited), lines


def test_environment_is_the_agents_not_the_callers(caged_hive: HiveProcess) -> None:
    token = secrets.token_hex(8)
    env = dict(os.environ, HOST_ONLY_SECRET=token)
    proc = subprocess.run(
        [str(HIVE), "--run-dir", str(caged_hive.run_dir), "exec", "--env", f"EXTRA={token}", "alice", "--", "env"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    inside = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    assert "HOST_ONLY_SECRET" not in inside
    assert inside["EXTRA"] == token
    assert inside["HOME"] == "/home/exec"
    assert (inside["PYTHONNOUSERSITE"], inside["PYTHONSAFEPATH"]) == ("1", "1")
    assert inside["HIVE_AGENT"] == "alice"
    assert inside["HIVE_SOCKET"] == "/run/hive/agent.sock"


@pytest.mark.parametrize("user", ["nobody", "the hive's core"])
def test_only_root_may_exec(caged_hive: HiveProcess, user: str) -> None:
    marker = f"exec-marker-{secrets.token_hex(6)}"
    as_who = caged_hive.core_ids if user != "nobody" else user
    proc = run(caged_hive, "alice", "touch", f"/home/agent/{marker}", user=as_who)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    if user == "nobody":  # stopped by the socket's file permissions (root:the core's group 0660)
        assert "needs root" in err
    else:  # the core may connect, but exec is root-only in the verb table
        assert "exec is not allowed for core" in err
    assert not (caged_hive.home("alice") / marker).exists()


@pytest.mark.parametrize(("name", "needle"), [
    ("dave", "not running"), ("../alice", "bad agent name"), ("Alice", "bad agent name"), ("core", "reserved"),
])
def test_exec_into_what_is_not_a_cage_is_refused(caged_hive: HiveProcess, name: str, needle: str) -> None:
    with caged_hive.unchanged():
        proc = run(caged_hive, name, "true")
    assert proc.returncode == 1
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def cli(h: HiveProcess, *args: str, **kw: Any) -> subprocess.CompletedProcess[Any]:
    return subprocess.run([str(HIVE), "--run-dir", str(h.run_dir), "exec", *args],
                          capture_output=True, timeout=60, check=False, **kw)


def test_json_captures_stdout_stderr_and_the_exit_status(caged_hive: HiveProcess) -> None:
    """--json (issue 15 item 6): one JSON object on stdout once the command ended, its
    outputs as text with their byte counts (and the exact bytes when not UTF-8); the
    exit status stays the command's. It was {"exit_status": N} on stderr."""
    script = r"echo out; printf 'e\033rr\377' >&2; head -c 300000 /dev/zero | tr '\0' x; exit 3"
    proc = cli(caged_hive, "--json", "bob", "--", "sh", "-c", script, input=b"")
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr == b""
    assert proc.stdout.count(b"\n") == 1 and b"\x1b" not in proc.stdout  # one line, escaped
    out = json.loads(proc.stdout)
    assert out == {
        "version": 1, "ok": True, "exit_status": 3,
        "stdout": "out\n" + "x" * 300_000, "stdout_bytes": 300_004,
        "stderr": "e\x1brr\ufffd", "stderr_bytes": 5,
        "stderr_base64": base64.b64encode(b"e\x1brr\xff").decode(),
    }
    # stdin is still the caller's
    echoed = json.loads(cli(caged_hive, "--json", "alice", "--", "wc", "-c", input=b"12345").stdout)
    assert (echoed["exit_status"], echoed["stdout"].strip(), echoed["stderr"]) == (0, "5", "")
    refused = cli(caged_hive, "--json", "dave", "--", "true", text=True)
    assert refused.returncode == 1 and refused.stderr == ""
    assert json.loads(refused.stdout) == {"version": 1, "ok": False, "error": "cage dave is not running"}
    tty = cli(caged_hive, "--json", "--tty", "bob", "--", "true", text=True)
    assert tty.returncode == 1 and json.loads(tty.stdout)["error"] == (
        "--json captures stdout and stderr apart: it takes no --tty")


def test_trust_home_runs_in_the_agents_home(caged_hive: HiveProcess) -> None:
    proc = cli(caged_hive, "--trust-home", "carol", "--", "sh", "-c",
               'pwd; echo $HOME; echo "${PYTHONNOUSERSITE-unset}"', text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["/home/agent", "/home/agent", "unset"]


def test_fresh_home_is_empty_private_and_gone_afterwards(caged_hive: HiveProcess) -> None:
    marker = f"m-{secrets.token_hex(4)}"
    first = run(caged_hive, "carol", "sh", "-c", f'ls -A "$HOME"; touch "$HOME/{marker}"; ls -A "$HOME"')
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == [marker]  # empty before, then only ours
    again = run(caged_hive, "carol", "sh", "-c", 'ls -A "$HOME"; ls -ld "$HOME" | cut -d" " -f1,3')
    assert again.stdout.splitlines() == ["drwx------ agent"]  # a new one, empty again
    assert not (caged_hive.home("carol") / marker).exists()
    # ... and the agent's real home is still where it always is.
    proc = run(caged_hive, "carol", "sh", "-c", "touch /home/agent/" + marker)
    assert proc.returncode == 0 and (caged_hive.home("carol") / marker).exists()
    (caged_hive.home("carol") / marker).unlink()


def test_tty_is_a_pty_of_the_operators_size(caged_hive: HiveProcess) -> None:
    env = dict(os.environ, COLUMNS="101", LINES="33")
    script = "stty size; test -t 0 && test -t 1 && test -t 2 && echo all-tty; exit 5"
    proc = cli(caged_hive, "--tty", "alice", "--", "sh", "-c", script, env=env, input=b"")
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout.split(b"\r\n")[:2] == [b"33 101", b"all-tty"]


def test_tty_passes_input_and_eof(caged_hive: HiveProcess) -> None:
    proc = cli(caged_hive, "--tty", "alice", "--", "cat", input=b"hello there\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(b"hello there") == 2  # the pty's echo, then cat's copy


def test_operator_that_stops_reading_ends_the_command(caged_hive: HiveProcess) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(f"{HIVE} --run-dir {caged_hive.run_dir} exec bob -- yes | head -n 2",
                          shell=True, capture_output=True, text=True, timeout=60, check=False)
    assert proc.stdout == "y\ny\n"
    assert time.monotonic() - t0 < 30


STDIO = r"""
import errno, json, os, signal, stat
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
out = {"sockets": [stat.S_ISSOCK(os.fstat(fd).st_mode) for fd in (0, 1, 2)]}
out["read_stdout"] = os.read(1, 1).decode()  # shut for us: EOF at once, not a hang
try:
    os.write(0, b"x")
    out["write_stdin"] = "written"
except OSError as e:
    out["write_stdin"] = errno.errorcode[e.errno]
print(json.dumps(out))
"""


def test_bash_on_a_socket_stdin_sources_no_bashrc_and_runs_bash_env(caged_hive: HiveProcess) -> None:
    """bash takes a socket on stdin for rshd's, and a top-level ``bash -c`` would then source
    ~/.bashrc instead of $BASH_ENV; the exec's SHLVL=1 keeps it as it was on a pipe: under
    --trust-home a planted .bashrc stays unread, BASH_ENV still runs. (CI of session 30:
    test_exec_planted's BASH_ENV case failed before SHLVL was set.)"""
    plant = "echo planted-bashrc"
    setup = run(caged_hive, "alice", "sh", "-c", f"echo '{plant}' > ~/.bashrc; echo 'echo from-env' > ~/.rxenv30",
                flags=("--trust-home",))
    assert setup.returncode == 0, setup.stderr
    try:
        proc = run(caged_hive, "alice", "bash", "-c", "echo cmd", flags=("--trust-home", "--env", "BASH_ENV=/home/agent/.rxenv30"))
        assert (proc.returncode, proc.stdout) == (0, "from-env\ncmd\n"), proc
    finally:
        run(caged_hive, "alice", "rm", "-f", "/home/agent/.bashrc", "/home/agent/.rxenv30", flags=("--trust-home",))


def test_stdio_are_sockets_shut_the_way_they_do_not_carry(caged_hive: HiveProcess) -> None:
    """Unix socket pairs, not pipes (a cage process handed a pipe's end could hold its
    lock, and hive-priv's relay with it: test_red_exec30.py); each shut in the direction
    it doesn't carry, so they behave as pipes would: EOF reading stdout, EPIPE writing stdin."""
    proc = run(caged_hive, "alice", "python3", "-c", STDIO, input="")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"sockets": [True, True, True], "read_stdout": "", "write_stdin": "EPIPE"}


def test_command_gets_no_descriptor_of_the_entry(caged_hive: HiveProcess) -> None:
    """hive-priv holds the cage's namespaces and root while the exec runs (nsenter opens
    them as /proc/<hive-priv>/fd/N): none reaches the command, which has 0-2 only (a copy
    of the cage's original root would reach past the clean exec's own /tmp and /home)."""
    for flags in ((), ("--as-agent",)):
        proc = run(caged_hive, "alice", "sh", "-c", "ls /proc/$$/fd", flags=flags)
        assert proc.returncode == 0, proc.stderr
        assert sorted(proc.stdout.split()) == ["0", "1", "2"], (flags, proc.stdout)


# -- a stop racing an exec (the agent's name lock) -----------------------------------------

RACER = "racer"
ROUNDS = 2
SPREAD = 1000  # processes the agent leaves in its cage, each below its init's pid
PF_EXITING = 0x4  # /proc/<pid>/stat's flags: the process has begun to exit


def _marked(marker: str) -> list[int]:
    """Every process of the host with ``marker`` as one of its arguments."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if marker.encode() in argv:
                out.append(int(entry))
    return out


def _argv(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _exiting(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            flags = int(f.read().rpartition(")")[2].split()[6])
    except (OSError, IndexError, ValueError):
        return True  # gone already
    return bool(flags & PF_EXITING)


def _cli(h: HiveProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HIVE), "--run-dir", str(h.run_dir), *args],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("flags", [(), ("--as-agent",)], ids=["clean", "as-agent"])
def test_stop_racing_an_exec_never_leaves_it_running(hive_factory: Any, flags: tuple[str, ...]) -> None:
    """The operator's ``hive stop --force`` and an exec of the same agent at once. The
    stop's SIGKILL round goes up the cage's pids in order; here the agent has left
    SPREAD processes (each ignoring SIGTERM) on pids below its init's (the cage started
    just under the host's pid_max, theirs wrapped around), so the round reaches the init
    ~0.3 s after its first SIGKILL, and the exec is sent at that first SIGKILL. Before
    the exec took the agent's name lock to enter the cage, it entered the still running
    init's namespaces, joined the cgroup after the round had listed it, and (the clean
    exec's pid namespace is its own) ran on once the init was gone: the stop failed with
    "processes survived SIGKILL" and the exec's command was left running in what was
    left of the cage, its reply never coming. Now the exec waits for the stop and is
    refused in one line, the stop succeeds, and nothing of the exec is left (ROUNDS
    times: stop, start, spread, race)."""
    from redteam.pid_spread import spread_out

    h = hive_factory({RACER: {"runtime": "command", "command": ["true"], "pids_max": 2048, "memory_mib": 2048}})
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for round_ in range(ROUNDS):
        for _ in range(5):  # another process of the host's may take the last pids first
            stopped = _cli(h, "stop", "--force", RACER)
            assert stopped.returncode == 0, stopped.stderr
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid_max - 300))
            started = _cli(h, "start", RACER)
            assert started.returncode == 0, started.stderr
            h.wait_running([RACER])
            init = h.cage(RACER)["pid"]
            if init > pid_max - 300:
                break
        spread = sorted(p for p in spread_out(h, RACER, SPREAD) if _argv(p)[:2] == [b"python3", b"-c"])
        below = [p for p in spread if p < init]
        assert len(below) >= SPREAD // 2, ("the agent's pids did not wrap below its init's", init, spread[:5])
        mark = f"racing-{secrets.token_hex(4)}"
        request = json.dumps({"cmd": "exec", "name": RACER, "as_agent": bool(flags),
                              "argv": ["python3", "-c", "import time; time.sleep(600)", mark]}).encode() + b"\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, open(os.devnull, "rb+") as null:
            s.connect(str(h.priv_sock))  # ready before the stop: the request then goes in one call
            stop = subprocess.Popen([str(HIVE), "--run-dir", str(h.run_dir), "stop", "--force", RACER],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 60
            while not _exiting(below[0]):  # the SIGKILL round has begun (SIGTERM is ignored)
                assert time.monotonic() < deadline, "the stop's SIGKILL never reached the cage"
            sent = socket.send_fds(s, [request], [null.fileno()] * 3)
            s.sendall(request[sent:])
            out = stop.communicate(timeout=60)
            s.settimeout(20)
            try:
                reply = json.loads(s.makefile("rb").readline())
            except TimeoutError:
                reply = {"exec": "no reply 20 s after the stop"}
        left = _marked(mark)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert (stop.returncode, out) == (0, (f"stopped: {RACER}\n", "")), (round_, out)
        assert not left, (round_, "the exec outlived the cage's stop", [_argv(p) for p in left])
        assert reply == {"version": 1, "ok": False, "error": f"cage {RACER} is not running"}, (round_, reply)
        assert not h.cgroup(RACER).pids()


# -- the relay with descriptors past select()'s 1,023 (exec_relay, poll) ------------------


@pytest.fixture
def high_descriptors() -> Iterator[int]:
    """Every descriptor number below FLOOR taken in this process (RLIMIT_NOFILE raised for
    it): whatever is opened next, the relay's pipes, pty and wake pipe among them, is
    numbered past select's limit of 1,023. Yields FLOOR."""
    floor = 1100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    filler: list[int] = []
    try:
        while not filler or filler[-1] < floor:
            filler.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        yield floor
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


RELAY_TIMEOUT = 20.0


def _relay(argv: list[str], stdin: bytes, tty: tuple[int, int] | None) -> tuple[int, bytes, bytes, list[int]]:
    """exec_relay.run in this process (no cage: the relay doesn't care), the operator's
    three descriptors pipes of our own. Returns (status, stdout, stderr, their numbers)."""
    from hyperhive.priv import exec_relay

    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    os.write(in_w, stdin)
    os.close(in_w)
    got: dict[int, bytes] = {}

    def drain(fd: int) -> None:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        got[fd] = b"".join(chunks)

    readers = [threading.Thread(target=drain, args=(fd,)) for fd in (out_r, err_r)]
    for t in readers:
        t.start()
    result: list[int] = []
    relay = threading.Thread(
        target=lambda: result.append(exec_relay.run(argv, [in_r, out_w, err_w], tty=tty, preexec_fn=lambda: None)),
        daemon=True,
    )
    relay.start()
    try:
        relay.join(RELAY_TIMEOUT)
        if relay.is_alive():  # select() raised in the pumps: nothing relays, the command waits for ever
            for pid in children(os.getpid()):
                os.kill(pid, signal.SIGKILL)
            relay.join(10)
            raise AssertionError(f"the relay hung (its pumps died?) for {RELAY_TIMEOUT} s")
        code = result[0]
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        for t in readers:
            t.join(10)
        os.close(out_r)
        os.close(err_r)
    return code, got[out_r], got[err_r], [in_r, out_w, err_w]


def test_relay_with_descriptors_past_1023(high_descriptors: int) -> None:
    """hive-priv may hold a pidfd per process of each cage being stopped and up to 64 of
    the core's connections: the exec relay's descriptors can be numbered past 1,023,
    where select() failed ("filedescriptor out of range in select()": the pumps died, the
    exec's output never came). With poll the relay is the same: input and its EOF, both
    outputs whole (more than a pipe's buffer), the exit status."""
    script = "cat; head -c 300000 /dev/zero | tr '\\0' x; echo err >&2; exit 3"
    code, out, err, numbers = _relay(["/bin/sh", "-c", script], b"hello\n", None)
    assert min(numbers) >= high_descriptors
    assert code == 3
    assert out == b"hello\n" + b"x" * 300000
    assert err == b"err\n"


def test_relay_on_a_pty_with_descriptors_past_1023(high_descriptors: int) -> None:
    code, out, _, _ = _relay(["/bin/sh", "-c", "stty size; cat; exit 4"], b"hello there\n", (33, 101))
    assert code == 4
    assert b"33 101" in out.split(b"\r\n")  # after the echo of the input, which comes at once
    assert out.count(b"hello there") == 2  # the pty's echo, then cat's copy; then EOF ended cat


def test_bwrap_info_read_with_a_descriptor_past_1023(high_descriptors: int) -> None:
    """hive-priv's read of bwrap's --info-fd at a cage's start (cages._read_all)."""
    from hyperhive.priv.cages import _read_all

    r, w = os.pipe()
    try:
        assert r >= high_descriptors
        os.write(w, b'{"child-pid": 42}')
        assert _read_all(r, 5.0) == b'{"child-pid": 42}'
    finally:
        os.close(r)
        os.close(w)


def test_a_stream_poll_calls_ready_with_nothing_to_read_still_ends_at_the_drains_bound() -> None:
    """The drain's bounds hold whatever poll says: a peer that keeps poll saying "ready"
    with nothing a read returns (out-of-band bytes on a socket without SO_OOBINLINE, the
    red team of session 30's way) no longer keeps ``_pump_out`` past ``DRAIN_IDLE`` once
    the exec is over; before, a blocking read there waited for the peer for good."""
    from hyperhive.priv import exec_relay

    ours, theirs = socket.socketpair()
    ours.setblocking(False)  # as _pair leaves it, but without SO_OOBINLINE: the OOB byte is skipped
    out_r, out_w = os.pipe()
    stop = threading.Event()

    def tease() -> None:
        while not stop.is_set():
            theirs.send(b"!", socket.MSG_OOB)
            time.sleep(0.01)

    teaser = threading.Thread(target=tease, daemon=True)
    teaser.start()
    done = exec_relay._Done()
    done.set()  # the exec is over: only the drain is left
    pump = threading.Thread(
        target=exec_relay._pump_out, args=(exec_relay._Fd(ours.fileno()), out_w, None, done, lambda: None),
        daemon=True,
    )
    t0 = time.monotonic()
    pump.start()
    try:
        pump.join(exec_relay.DRAIN_MAX + 2)
        took = time.monotonic() - t0
        assert not pump.is_alive(), "the drain never ended"
        assert took < exec_relay.DRAIN_IDLE + 1.0, took
    finally:
        stop.set()
        teaser.join(2)
        done.close()
        theirs.close()
        ours.close()
        for fd in (out_r, out_w):
            os.close(fd)


def test_a_flood_after_the_exit_ends_at_the_drains_byte_bound() -> None:
    """Once the exec is over, a copy of its end that writes without pause is relayed up to
    ``DRAIN_BYTES`` (then our end is let go), not for the whole of ``DRAIN_MAX``: each
    read is hive-priv's CPU, outside the cage's cgroup."""
    from hyperhive.priv import exec_relay

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    out_r, out_w = os.pipe()
    stop = threading.Event()
    got: list[int] = []

    def flood() -> None:
        chunk = b"f" * 65536
        with contextlib.suppress(OSError):
            while not stop.is_set():
                theirs.sendall(chunk)

    def drain() -> None:
        while chunk := os.read(out_r, 65536):
            got.append(len(chunk))

    threads = [threading.Thread(target=f, daemon=True) for f in (flood, drain)]
    for t in threads:
        t.start()
    done = exec_relay._Done()
    done.set()
    t0 = time.monotonic()
    try:
        exec_relay._pump_out(exec_relay._Fd(ours.fileno()), out_w, None, done, lambda: None)
        took = time.monotonic() - t0
        assert took < exec_relay.DRAIN_MAX / 2, took
    finally:
        stop.set()
        ours.close()
        os.close(out_w)
        threads[1].join(5)
        threads[0].join(5)
        theirs.close()
        os.close(out_r)
        done.close()
    assert exec_relay.DRAIN_BYTES < sum(got) <= exec_relay.DRAIN_BYTES + exec_relay.CHUNK, sum(got)

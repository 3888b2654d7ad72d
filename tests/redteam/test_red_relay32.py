"""Red team of session 32: the runtime's stdio relay (``cage/stdio_relay.py``, started by
``fork_relayed`` in ``cage/init.py`` ``Init.spawn``), attacked as the runtime uid (the
relay's own uid) by command runtimes whose script is the attack, run by a real harness in
a real cage. 2 CPUs, kernel 6.18, turn_timeout 3 s.

- ``rl32stop`` **BROKE (medium: the agent wedges its own cage's init for good)**. Turn 1
  leaves a process (double fork, setsid, stdio /dev/null: the turn ends at once) that,
  once turn 1's relay is gone, sends ``kill(-1, SIGSTOP)`` as the runtime uid in a loop
  for 8 s. Turn 2's relay becomes the runtime uid (``become``) *before* it forks the
  runtime, and it (and the runtime until its exec) holds init's report pipe ``w``; init
  in ``fork_relayed`` reads that pipe to EOF, blocking. Before session 32 the only holder
  was the child as root (it exec'd ``setpriv``, which closed it). 4 runs out of 4: init
  asleep in ``anon_pipe_read``, the relay (and the pre-exec runtime) in state T; turn 2
  "could not start the runtime: cage init did not answer" after 30.0 s, the operator's
  interrupt at 1 s without effect; turn 3, sent after the stopper had ended, the same at
  30.1 s (the stopped relay stays stopped: init is held until the cage is stopped; a
  graceful stop took 5.0 s). Meanwhile init reaps nothing, restarts no harness, relays no
  harness log, serves no page connection, and no turn's stop (the only sweep of the
  runtime uid) ever comes. The error path's ``os.waitpid(pid, 0)`` (the relay reported an
  errno) waits on a runtime-uid process the same way (by reading).
- ``rl32pids`` pids.max (64) filled by sleepers a turn left: the next turn fails at once
  (EAGAIN, 1.3 ms, init in its poll: held), but a failed start sweeps nothing, so with
  sleepers that stay every later turn fails too (**BROKE, low; as before session 32**).
- ``rl32kill`` (held) the runtime SIGKILLs its relay: the turn ends in 0.1 s (exit 137,
  the relay's; nothing reads the core's exit_status but the transcript), the runtime and
  its setsid child outlive it (2 processes 0.3 s after, as a setsid process that closes
  its stdio always could), the next turn runs at once. SIGSTOPs it: the turn ends at the
  time-out + the SIGKILL grace (6.0-6.2 s) whether the runtime exits or stays, 4.1 s on an
  interrupt at 1 s, nothing left. /proc/<relay>/fd, fd/3, mem, environ, maps: EACCES;
  PTRACE_ATTACH, PTRACE_SEIZE, pidfd_getfd, process_vm_readv: EPERM.
- ``rl32many`` (held) 40 turns, then 10 that SIGKILL their relay and 2 that SIGSTOP it:
  init's descriptors 10 -> 10, the harness's 8 -> 8, the cage's processes 4 -> 4.
"""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hive_fixture import HiveProcess, proc_uid, running_hive

from .conftest import init_pid, wchan

REF = "red team of session 32: the runtime's stdio relay"
TIMEOUT = 3  # the agents' turn_timeout
KILL_GRACE = 3.0  # harness.KILL_GRACE
TURNS = 20  # short turns in the leak case (40 in the helper's runs: 25 s of the suite)
STOP, KILL, MANY, PIDS = "rl32stop", "rl32kill", "rl32many", "rl32pids"

SCRIPT = textwrap.dedent(r"""
    import ctypes, json, os, signal, sys, time
    msg = sys.stdin.read()
    relay = os.getppid()
    def detach(fn):
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                null = os.open("/dev/null", os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                try:
                    fn()
                finally:
                    os._exit(0)
            os._exit(0)
        os.wait()
    def caged():  # kill(-1) and fork loops only inside a cage: pid 1 is bwrap, we are not root
        with open("/proc/1/cmdline", "rb") as f:
            return os.getuid() != 0 and b"bwrap" in f.read()
    if "STOPPER" in msg:
        assert caged()
        def stopper():
            while os.path.exists(f"/proc/{relay}"):  # this turn's relay: let the turn end
                time.sleep(0.01)
            end = time.monotonic() + 8
            n = 0
            while time.monotonic() < end:  # every process of our uid but us, as they appear
                try:
                    os.kill(-1, signal.SIGSTOP)
                except OSError:
                    pass
                n += 1
                if n % 200 == 0:
                    time.sleep(0.0005)
        detach(stopper)
        print("armed", flush=True)
    elif "KILLRELAY" in msg:
        def marker():
            for i in range(60):
                with open("linger.txt", "w") as f:
                    f.write(str(time.time()))
                time.sleep(0.1)
        detach(marker)
        print("before", flush=True)
        os.kill(relay, signal.SIGKILL)
        time.sleep(1)
        try:
            print("after", flush=True)
            out = "written"
        except OSError as e:
            out = f"EPIPE {e.errno}"
        with open("killrelay.txt", "w") as f:
            f.write(out)
        time.sleep(4)
    elif "STOPRELAY" in msg:
        print("stopping my relay", flush=True)
        time.sleep(0.3)
        os.kill(relay, signal.SIGSTOP)
        print("then this", flush=True)
        if "EXIT" not in msg:
            time.sleep(60)
    elif "FILLPIDS" in msg:
        import re
        life = float(re.search(r"FILLPIDS (\d+)", msg).group(1))
        assert caged()
        def filler():
            kids = []
            t = time.monotonic()
            while time.monotonic() - t < 3:
                try:
                    pid = os.fork()
                except OSError:
                    time.sleep(0.01)
                    continue
                if pid == 0:
                    time.sleep(max(0.1, life - (time.monotonic() - t)))
                    os._exit(0)
                kids.append(pid)
            with open("filled.txt", "w") as f:
                f.write(str(len(kids)))
            time.sleep(life)
        detach(filler)
        print("filling", flush=True)
    elif "PROBE" in msg:
        res = {}
        def tryit(label, fn):
            try:
                res[label] = repr(fn())[:80]
            except Exception as e:
                res[label] = type(e).__name__ + " " + str(getattr(e, "errno", ""))
        tryit("fd", lambda: os.listdir(f"/proc/{relay}/fd"))
        tryit("fd3", lambda: os.open(f"/proc/{relay}/fd/3", os.O_RDWR))
        tryit("mem", lambda: open(f"/proc/{relay}/mem", "rb").read(1))
        tryit("environ", lambda: open(f"/proc/{relay}/environ", "rb").read())
        tryit("maps", lambda: open(f"/proc/{relay}/maps", "rb").read(10))
        tryit("status_uid", lambda: [l for l in open(f"/proc/{relay}/status") if l.startswith(("Uid", "CapEff", "NoNewPrivs"))])
        libc = ctypes.CDLL(None, use_errno=True)
        def sc(nr, *a):
            r = libc.syscall(nr, *[ctypes.c_long(x) for x in a])
            return r if r >= 0 else -ctypes.get_errno()
        tryit("ptrace_attach", lambda: sc(101, 16, relay, 0, 0))  # PTRACE_ATTACH
        tryit("ptrace_seize", lambda: sc(101, 0x4206, relay, 0, 0))
        pidfd = os.pidfd_open(relay)
        tryit("pidfd_getfd", lambda: sc(438, pidfd, 3, 0))
        buf = ctypes.create_string_buffer(16)
        iov = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), 16)
        tryit("process_vm_readv", lambda: sc(310, relay, ctypes.addressof(iov), 1, ctypes.addressof(iov), 1, 0))
        tryit("kill0", lambda: os.kill(relay, 0))
        print("PROBE " + json.dumps(res), flush=True)
    else:
        print("hello", flush=True)
""")
COMMAND = ["python3", "-c", SCRIPT]

AGENTS: dict[str, dict[str, Any]] = {
    name: {"runtime": "command", "command": COMMAND, "turn_timeout": TIMEOUT, "peers": []}
    for name in (STOP, KILL, MANY, PIDS)
}
AGENTS[PIDS]["pids_max"] = 64


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(AGENTS))


def _ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("ok") is True, reply
    return reply


def _send(hive: HiveProcess, name: str, body: str) -> tuple[int, int]:
    before = _ok(hive.host_call("transcript", name=name, limit=1))["entries"]
    after = before[-1]["id"] if before else 0
    return _ok(hive.host_call("send", to=name, body=body))["id"], after


def _entries(hive: HiveProcess, name: str, msg: int, after: int) -> list[dict[str, Any]]:
    return [
        e
        for e in _ok(hive.host_call("transcript", name=name, after=after, limit=5000))["entries"]
        if e["turn"] == msg
    ]


def _wait_end(
    hive: HiveProcess, name: str, msg: int, after: int, within: float
) -> list[dict[str, Any]] | None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        entries = _entries(hive, name, msg, after)
        if any(e["kind"] == "exit" for e in entries):
            return entries
        time.sleep(0.1)
    return None


def _turn(
    hive: HiveProcess, name: str, body: str, within: float = 25
) -> tuple[list[dict[str, Any]], float]:
    msg, after = _send(hive, name, body)
    t0 = time.monotonic()
    entries = _wait_end(hive, name, msg, after, within)
    assert entries is not None, f"{name}'s turn {body!r} had not ended after {within} s"
    return entries, time.monotonic() - t0


def _runtime_procs(hive: HiveProcess, name: str) -> list[int]:
    uid = hive.cage(name)["uid"]
    return [p for p in hive.cage_procs(name) if proc_uid(p) == uid]


def _restart(hive: HiveProcess, name: str) -> None:
    hive.host_call("stop", scope={"agent_names": [name]}, graceful=False)
    _ok(hive.host_call("start", scope={"agent_names": [name]}))
    hive.wait_running([name])


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.attack(
    "harness.turn",
    ref=REF
    + ": a left-behind kill(-1, SIGSTOP) loop stops the next relay holding init's report pipe",
)
def test_a_stopped_relay_never_holds_init_in_its_spawn(hive: HiveProcess) -> None:
    """Tried: turn 1 leaves a process (double fork, setsid, stdio /dev/null: the turn ends
    at once) that, once turn 1's relay is gone, sends ``kill(-1, SIGSTOP)`` as the runtime
    uid in a loop (8 s only: the relay it stopped stays stopped). Turn 2's relay becomes the runtime uid before it forks the
    runtime and holds init's report pipe until the runtime's exec; init in
    ``fork_relayed`` reads that pipe to EOF, blocking. Held if init is not asleep in a pipe
    read 3 s into turn 2 and turn 2 ends within its time-out + the SIGKILL grace + 5 s
    (the stop's sweep ends the stopper), and turn 3 then runs. BROKE: init asleep in
    ``pipe_read`` for as long as the stopper lives, turn 2 "could not start the runtime:
    cage init did not answer" at 30 s, no time-out, no interrupt."""
    name = STOP
    hive.wait_running([name])
    ipid = init_pid(hive, name)
    fig: dict[str, Any] = {}
    try:
        entries, _ = _turn(hive, name, "STOPPER")
        assert any(e["kind"] == "stdout" and e["data"] == "armed" for e in entries), entries
        time.sleep(0.5)
        msg, after = _send(hive, name, "second")
        t0 = time.monotonic()
        time.sleep(1)
        _ok(hive.host_call("interrupt", name=name))  # the operator's: nothing to stop yet
        time.sleep(2)
        fig["init wchan 3 s into turn 2"] = wchan(ipid)
        fig["runtime-uid procs"] = [(p, _state(p)) for p in _runtime_procs(hive, name)]
        second = _wait_end(hive, name, msg, after, TIMEOUT + KILL_GRACE + 40)
        fig["turn 2 s"] = round(time.monotonic() - t0, 1)
        fig["turn 2"] = [(e["kind"], e["data"]) for e in second or []][-3:]
        third, took3 = _turn(hive, name, "third", 60)
        fig["turn 3 s"] = round(took3, 1)
        fig["turn 3"] = [(e["kind"], e["data"]) for e in third][-3:]
        t1 = time.monotonic()
        hive.host_call("stop", scope={"agent_names": [name]}, graceful=True)
        fig["graceful stop s"] = round(time.monotonic() - t1, 1)
        print(f"\nstopper: {fig}")
    finally:
        _restart(hive, name)
    assert "pipe" not in fig["init wchan 3 s into turn 2"], fig
    assert second is not None and fig["turn 2 s"] < TIMEOUT + KILL_GRACE + 5, fig
    assert ("stdout", "hello") in fig["turn 3"], fig


@pytest.mark.attack("harness.turn", ref=REF + ": the runtime SIGKILLs its relay and lives on")
def test_a_runtime_that_kills_its_relay_ends_its_turn_and_nothing_stalls(hive: HiveProcess) -> None:
    """Tried: the runtime leaves a setsid process writing to its home every 0.1 s for 6 s,
    prints a line, SIGKILLs its relay (its parent, same uid), then prints again (EPIPE)
    and sleeps 5 s. Held if the harness ends the turn at once (the relay's end is the
    turn's: exit 137, reported as the relay's SIGKILL), nothing of the harness stalls, and
    the next turn runs. Noted: the runtime and what it left outlive that turn (as a
    setsid process that closes its stdio always could)."""
    name = KILL
    hive.wait_running([name])
    entries, took = _turn(hive, name, "KILLRELAY")
    time.sleep(0.3)
    left = len(_runtime_procs(hive, name))
    end = entries[-1]["data"]
    fig = {
        "turn s": round(took, 2),
        "exit": end,
        "out": [e["data"] for e in entries if e["kind"] == "stdout"],
        "runtime-uid processes 0.3 s after": left,
    }
    nxt, took2 = _turn(hive, name, "x")
    fig["next turn s"] = round(took2, 2)
    print(f"\nkill relay: {fig}")
    assert took < TIMEOUT + 1 and end.get("timed_out") is not True, fig
    assert ("stdout", "hello") in [(e["kind"], e["data"]) for e in nxt], fig


@pytest.mark.attack("harness.turn", ref=REF + ": the runtime SIGSTOPs its relay")
@pytest.mark.parametrize("how", ["exits", "stays", "interrupt"])
def test_a_runtime_that_stops_its_relay_is_still_timed_out(hive: HiveProcess, how: str) -> None:
    """Tried: the runtime SIGSTOPs its relay (its parent, same uid), then exits, or stays
    (sleeps 60 s); or stays and the operator interrupts the turn at 1 s. The relay can't
    pass on EOF nor exit, so the harness sees neither. Held if the turn ends within its
    time-out (or the interrupt) + the SIGKILL grace + 2 s (the SIGKILL sweep ends a stopped
    relay), nothing of the runtime uid is left, and the next turn runs."""
    name = KILL
    hive.wait_running([name])
    body = "STOPRELAY EXIT" if how == "exits" else "STOPRELAY"
    msg, after = _send(hive, name, body)
    t0 = time.monotonic()
    if how == "interrupt":
        time.sleep(1)
        _ok(hive.host_call("interrupt", name=name))
    entries = _wait_end(hive, name, msg, after, 30)
    took = time.monotonic() - t0
    time.sleep(0.5)
    left = _runtime_procs(hive, name)
    fig = {
        "turn s": round(took, 2),
        "entries": [(e["kind"], e["data"]) for e in entries or []][-3:],
        "left": left,
    }
    print(f"\nstop relay ({how}): {fig}")
    assert entries is not None, fig
    bound = (1 if how == "interrupt" else TIMEOUT) + KILL_GRACE + 2
    assert took < bound and not left, fig
    nxt, _ = _turn(hive, name, "x")
    assert ("stdout", "hello") in [(e["kind"], e["data"]) for e in nxt]


@pytest.mark.attack(
    "harness.turn", ref=REF + ": the runtime reaches for its relay's memory and descriptors"
)
def test_the_relay_is_out_of_its_runtimes_reach(hive: HiveProcess) -> None:
    """Tried, as the runtime (the relay's uid): list and open /proc/<relay>/fd, read its
    mem, environ and maps; PTRACE_ATTACH, PTRACE_SEIZE; pidfd_getfd of its fd 3;
    process_vm_readv. Held if each is refused (not dumpable; seccomp), and the relay
    holds only its pipes, the three sockets and the runtime's pidfd (nothing of init's:
    not cage.log, the channel, the listeners)."""
    import json

    name = KILL
    hive.wait_running([name])
    entries, _ = _turn(hive, name, "PROBE")
    line = next(
        e["data"] for e in entries if e["kind"] == "stdout" and e["data"].startswith("PROBE ")
    )
    res = json.loads(line[6:])
    print(f"\nprobe: {res}")
    for k in ("fd", "fd3", "mem", "environ", "maps"):
        assert res[k].startswith("PermissionError"), res
    for k in ("ptrace_attach", "ptrace_seize", "pidfd_getfd", "process_vm_readv"):
        assert res[k].startswith("-"), res  # -errno


@pytest.mark.attack("budget.exhaustion", ref=REF + ": descriptors and processes turn after turn")
def test_forty_turns_leak_no_descriptor_nor_process(hive: HiveProcess) -> None:
    """40 short turns, then 10 that SIGKILL their relay and 2 that SIGSTOP it. Held if
    init's and the harness's descriptor counts and the cage's process count are as
    before once what those turns left has ended."""
    name = MANY
    hive.wait_running([name])
    _turn(hive, name, "x")
    ipid, hpid = init_pid(hive, name), hive.harness_pid(name)
    time.sleep(0.5)
    before = (_fds(ipid), _fds(hpid), len(hive.cage_procs(name)))
    t0 = time.monotonic()
    for _ in range(TURNS):
        _turn(hive, name, "x")
    took = time.monotonic() - t0
    for _ in range(10):  # its relay SIGKILLed: the runtime and what it left live ~6 s on
        _turn(hive, name, "KILLRELAY")
    for _ in range(2):  # its relay SIGSTOPped: the turn's stop ends it
        _turn(hive, name, "STOPRELAY EXIT")
    time.sleep(7)
    after = (_fds(ipid), _fds(hpid), len(hive.cage_procs(name)))
    print(f"\n{TURNS} turns in {took:.1f} s: (init fds, harness fds, cage procs) {before} -> {after}")
    assert after == before


@pytest.mark.attack(
    "budget.exhaustion", ref=REF + ": the cage at its pids.max when a turn's relay forks"
)
def test_a_cage_at_its_pids_max_fails_a_turn_fast_and_the_next_one_runs(hive: HiveProcess) -> None:
    """Tried: turn 1 leaves a process that forks sleepers until the cage is at its pids.max
    (64 here) and keeps them 8 s; turn 2 is sent 4 s in. Neither init's fork of the relay
    nor the relay's of the runtime can be had. Held if turn 2 ends fast (could not start,
    or timed out) with init not asleep, and a turn once the sleepers are gone runs."""
    name = PIDS
    hive.wait_running([name])
    ipid = init_pid(hive, name)
    try:
        _turn(hive, name, "FILLPIDS 8")
        time.sleep(4)
        procs = len(hive.cage_procs(name))
        second, took = _turn(hive, name, "second", 40)
        w = wchan(ipid)
        fig = {
            "cage procs": procs,
            "turn 2 s": round(took, 2),
            "turn 2": [(e["kind"], e["data"]) for e in second][-2:],
            "init wchan": w,
        }
        time.sleep(max(0, 20 - took))
        third, took3 = _turn(hive, name, "third", 40)
        fig["turn 3 s"] = round(took3, 2)
        fig["turn 3"] = [(e["kind"], e["data"]) for e in third][-2:]
        print(f"\npids.max: {fig}")
    finally:
        _restart(hive, name)
    assert took < TIMEOUT + KILL_GRACE + 5 and "pipe" not in w, fig
    assert ("stdout", "hello") in [(e["kind"], e["data"]) for e in third], fig


@pytest.mark.attack(
    "budget.exhaustion", ref=REF + ": a lingering pids.max filler fails every later turn"
)
def test_a_turn_that_could_not_start_ends_what_keeps_it_from_starting(hive: HiveProcess) -> None:
    """Tried: as above, but the sleepers stay 60 s (an agent's could stay for good). Every
    turn then fails to start ("could not start the runtime": EAGAIN), and a failed start
    signals nothing: the sweep that ends what the runtime left comes only with a turn's
    time-out or interrupt, which a turn that never started has not. Held if the turn after
    a failed start runs (the failure swept the runtime uid). BROKE: it fails too, and so
    does every turn until the sleepers end or the cage is restarted. (As before session
    32; the relay's own stop, above, is the same class: nothing sweeps on a failed start.)"""
    name = PIDS
    hive.wait_running([name])
    try:
        _turn(hive, name, "FILLPIDS 60")
        time.sleep(4)
        second, _ = _turn(hive, name, "second", 40)
        time.sleep(1)
        third, took3 = _turn(hive, name, "third", 40)
        fig = {
            "turn 2": [(e["kind"], e["data"]) for e in second][-2:],
            "turn 3": [(e["kind"], e["data"]) for e in third][-2:],
            "turn 3 s": round(took3, 2),
        }
        print(f"\npids.max for good: {fig}")
    finally:
        _restart(hive, name)
    assert ("stdout", "hello") in fig["turn 3"], fig

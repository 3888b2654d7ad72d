"""The agent turn loop in real cages: the harness takes one inbox message at a
time, runs the agent's runtime for it (as the runtime uid, through the cage's
init), records the turn's transcript and acks the message only when the turn
ended. Checked through ``host.sock`` (agent_status, transcript, interrupt,
set_paused), the agents' homes and the processes in their cages.

Each agent of this module's hive has a ``command`` runtime written for one
behaviour (the program must live inside the cage, so it is ``python3 -c``).
Waits poll with generous deadlines; the machine is small and shared.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import sqlite3
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hive_fixture import HiveProcess, proc_cmdline, proc_uid
from hyperhive.client import Client
from hyperhive.wire.harness import HARNESS_VERBS

DEADLINE = 30.0  # seconds for anything to happen
QUICK = 10.0  # an interrupt or a time-out must end a turn well within this


def py(script: str) -> list[str]:
    return ["python3", "-c", textwrap.dedent(script)]


# One turn: note start and end (with a sleep between) in the home, so overlap would show.
SEQ = py("""
    import json, os, sys, time
    m = json.load(sys.stdin)
    def mark(what):
        with open(os.path.join(os.environ["HOME"], "turns.log"), "a") as f:
            f.write(f"{what} {m['id']} {time.time():.6f}\\n")
    mark("start")
    print("start", m["id"], flush=True)
    time.sleep(0.6)
    print("end", m["id"], flush=True)
    mark("end")
""")

# The first attempt at a "slow" message sleeps (the test kills the harness then);
# a redelivered one finishes at once. Every attempt is noted in the home.
ACK = py("""
    import json, os, sys, time
    m = json.load(sys.stdin)
    log = os.path.join(os.environ["HOME"], "runs.log")
    seen = open(log).read().split("\\n") if os.path.exists(log) else []
    attempt = 1 + sum(line.startswith(f"start {m['id']} ") for line in seen)
    with open(log, "a") as f:
        f.write(f"start {m['id']} {attempt}\\n")
    print("attempt", attempt, m["body"], flush=True)
    print("to stderr", m["id"], file=sys.stderr, flush=True)
    if m["body"] == "slow" and attempt == 1:
        time.sleep(120)
    if m["body"] == "chatty" and attempt == 1:
        for i in range(1200):
            print("tick", i, flush=True)
            time.sleep(0.1)
    with open(log, "a") as f:
        f.write(f"end {m['id']} {attempt}\\n")
    print("finished", m["id"], flush=True)
""")

ECHO = py("""
    import json, sys
    m = json.load(sys.stdin)
    print("ran", m["body"], flush=True)
""")

# "sleep": a turn that would take a minute; anything else is quick.
SLEEPY = py("""
    import json, sys, time
    m = json.load(sys.stdin)
    if m["body"] == "sleep":
        print("sleeping", flush=True)
        time.sleep(60)
        print("woke up", flush=True)
    print("ran", m["body"], flush=True)
""")

# Misbehaviour on request. turn_timeout is 2 s for this agent.
BAD_CMDS = {
    "crash": "echo about to crash; echo boom >&2; exit 3",
    "hang": "echo hanging; exec sleep 600",
    "hang-hard": "trap '' TERM INT; echo hanging hard; sleep 600",  # SIGTERM ignored: needs SIGKILL
    "hang-closed": "echo closing; exec >&- 2>&-; exec sleep 600",  # output closed, still running
    "hang-orphan": "sleep 600 & echo leaving",  # exits at once; its child keeps the output open
    # a child that leaves the turn's session (setsid): stopped with the turn all the same
    "hang-setsid": "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo escaping; exec sleep 600",
    "lines": "yes | head -c 50000000",  # 25 million short lines
    "line": "head -c 50000000 /dev/zero | tr '\\0' y",  # one line of 50 MB
    "both": "yes out | head -c 20000000 & yes err | head -c 20000000 >&2; wait",
    # 512 KiB of \x01 in 16 KiB lines: each byte is stored escaped, six bytes (~3.1 MB a turn)
    "controls": "head -c 524288 /dev/zero | tr '\\0' '\\1' | fold -w 16384",
}
BAD = py(f"""
    import json, os, sys
    m = json.load(sys.stdin)
    cmd = {BAD_CMDS!r}.get(m["body"], "echo fine")
    os.execvp("sh", ["sh", "-c", cmd])
""")

# Where and as whom the runtime runs, and what it can do to the harness.
ENV = py("""
    import json, os, signal, socket, sys
    m = json.load(sys.stdin)

    def call(obj):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(os.environ["HIVE_SOCKET"])
            s.sendall(json.dumps(obj).encode() + b"\\n")
            return json.loads(s.makefile("rb").readline())

    harness = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
        except OSError:
            continue
        if b"harness" in argv:
            try:
                os.kill(int(pid), 0)
                harness.append([int(pid), "signal allowed"])
            except PermissionError:
                harness.append([int(pid), "EPERM"])
    print(json.dumps({
        "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
        "cwd": os.getcwd(), "home": os.environ.get("HOME"), "user": os.environ.get("USER"),
        "agent": os.environ.get("HIVE_AGENT"), "socket": os.environ.get("HIVE_SOCKET"),
        "turn": os.environ.get("HIVE_TURN"), "env": sorted(os.environ),
        "hostname": socket.gethostname(), "message": m,
        "whoami": call({"cmd": "whoami"}),
        "turn_next": call({"cmd": "turn_next", "wait": 0}),
        "turn_done": call({"cmd": "turn_done", "turn": m["id"], "exit_status": 0, "duration_ms": 1}),
        "harness": harness,
    }), flush=True)
""")

# What the runtime's stdio are, and how each behaves the way it does not carry.
STDIO = py("""
    import errno, json, os, stat, sys
    sys.stdin.read()
    out = {"pipes": [stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in (0, 1, 2)]}
    try:
        os.read(1, 1)
        out["read_stdout"] = "read"
    except OSError as e:
        out["read_stdout"] = errno.errorcode[e.errno]
    try:
        os.write(0, b"x")
        out["write_stdin"] = "written"
    except OSError as e:
        out["write_stdin"] = errno.errorcode[e.errno]
    with open("/dev/stderr", "w") as f:  # by name: a command runtime's >/dev/stderr
        f.write("to /dev/stderr\\n")
    print(json.dumps(out), flush=True)
    with open("/dev/stdout", "w") as f:
        f.write("to /dev/stdout\\n")
    sys.exit(3)
""")

AGENTS: dict[str, dict[str, Any]] = {
    "turn-seq": {"runtime": "command", "command": SEQ},
    "turn-ack": {"runtime": "command", "command": ACK},
    "turn-pause": {"runtime": "command", "command": ECHO},
    "turn-int": {"runtime": "command", "command": SLEEPY},
    "turn-bad": {"runtime": "command", "command": BAD, "turn_timeout": 2},
    "turn-flood": {"runtime": "command", "command": BAD},
    "turn-env": {"runtime": "command", "command": ENV},
    # Ends at once, leaving a process of its own session that holds its stdin, unread.
    "turn-stdin": {"runtime": "command", "command": ["sh", "-c", "exec 3<&0; setsid sleep 600 <&3 3<&- >/dev/null 2>&1 & echo kept"]},
    "turn-stdio": {"runtime": "command", "command": STDIO},
    # A planted ~/.bashrc, then a top-level bash with the runtime's stdin.
    "turn-relay": {"runtime": "command", "command": ["sh", "-c", "cat >/dev/null; echo up; sleep 30"]},
    "turn-sig": {"runtime": "command", "command": ["sh", "-c", "cat >/dev/null; echo going; kill -TERM $$"]},
    "turn-bash": {"runtime": "command", "command": ["sh", "-c", "echo 'echo planted' > ~/.bashrc; bash -c 'echo cmd'"]},
}


TRANSCRIPT_MIB = 8  # each agent's transcript, in stored bytes ([limits] transcript_mib)


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    """One hive with this module's agents; at the end ``hive up`` must stop cleanly
    and leave nothing in the agents' cages."""
    h = HiveProcess(AGENTS, sections={"limits": {"transcript_mib": TRANSCRIPT_MIB}})
    try:
        h.start()
    except BaseException:
        h.cleanup()
        raise
    try:
        yield h
    finally:
        try:
            rc = h.stop()
            left = {n: h.cgroup(n).pids() for n in h.names}
            if any(left.values()):
                for n in h.names:
                    h.cgroup(n).kill_all(1.0)
            assert rc == 0, f"hive up exited with {rc}\n{h.log_tail()}"
            assert not any(left.values()), f"processes left in cages: {left}"
        finally:
            h.cleanup()


# -- helpers -------------------------------------------------------------------------


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("ok") is True, reply
    return reply


def poll(fn: Callable[[], Any], what: str, timeout: float = DEADLINE, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def send(hive: HiveProcess, name: str, body: str) -> int:
    return ok(hive.host_call("send", to=name, body=body))["id"]


def transcript(hive: HiveProcess, name: str, after: int = 0) -> list[dict[str, Any]]:
    return ok(hive.host_call("transcript", name=name, after=after, limit=5000))["entries"]


def turn_entries(hive: HiveProcess, name: str, turn: int, after: int = 0) -> list[dict[str, Any]]:
    return [e for e in transcript(hive, name, after) if e["turn"] == turn]


def wait_turn(hive: HiveProcess, name: str, turn: int, timeout: float = DEADLINE, after: int = 0) -> list[dict[str, Any]]:
    """The entries of turn ``turn`` once it has ended (its ``exit`` entry is there)."""
    def done() -> list[dict[str, Any]] | None:
        entries = turn_entries(hive, name, turn, after)
        return entries if any(e["kind"] == "exit" for e in entries) else None

    try:
        return poll(done, f"turn {turn} of {name} to end", timeout, interval=0.1)
    except AssertionError as e:
        raise AssertionError(f"{e}\nso far: {turn_entries(hive, name, turn, after)[-10:]}") from None


def wait_output(hive: HiveProcess, name: str, turn: int, text: str, after: int = 0) -> list[dict[str, Any]]:
    return poll(
        lambda: (es := turn_entries(hive, name, turn, after)) and any(
            e["kind"] == "stdout" and e["data"] == text for e in es) and es,
        f"{text!r} in turn {turn} of {name}",
    )


def exit_of(entries: list[dict[str, Any]]) -> dict[str, Any]:
    exits = [e for e in entries if e["kind"] == "exit"]
    assert len(exits) == 1, entries
    assert entries[-1] is exits[0], "the exit entry ends the turn"
    data = exits[0]["data"]
    assert set(data) == {"exit_status", "duration_ms", "interrupted", "timed_out"}, data
    return data


def stdout(entries: list[dict[str, Any]]) -> list[str]:
    return [e["data"] for e in entries if e["kind"] == "stdout"]


def last_id(hive: HiveProcess, name: str) -> int:
    entries = ok(hive.host_call("transcript", name=name, limit=1))["entries"]
    return entries[-1]["id"] if entries else 0


def status(hive: HiveProcess, name: str) -> dict[str, Any]:
    return hive.agent_status()[name]


def unacked(hive: HiveProcess, name: str) -> list[dict[str, Any]]:
    """The agent's unacked messages, looked at from the host (root may use the agent's
    socket): taken in flight by this connection and released when it closes."""
    return ok(hive.agent_call(name, "recv", wait=0, max=100))["messages"]


def runtime_procs(hive: HiveProcess, name: str) -> list[int]:
    """The runtime uid's processes but the turn's stdio relay (init's fork, retitled)."""
    uid = hive.cage(name)["uid"]
    return [p for p in hive.cgroup(name).pids()
            if proc_uid(p) == uid and proc_cmdline(p)[-1:] != ["relay"]]


def home(hive: HiveProcess, name: str, file: str) -> list[str]:
    """The lines of ``file`` in the agent's home; none while its cage is not running
    (the host reaches the home through the running cage)."""
    try:
        return (hive.home(name) / file).read_text().splitlines()
    except OSError:
        return []


class StatusEvents:
    """``subscribe {kinds: [agent_status]}`` collected by a thread."""

    def __init__(self, hive: HiveProcess) -> None:
        self.client = Client(hive.host_sock, timeout=None)
        ok(self.client.call("subscribe", kinds=["agent_status"]))
        self.rows: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                reply = self.client.read()
            except (OSError, ValueError, ConnectionError):
                return
            if reply.get("ok") and "agent" in reply.get("event", {}):
                with self.lock:
                    self.rows.append(reply["event"]["agent"])

    def of(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.rows if r["name"] == name]

    def close(self) -> None:
        try:
            self.client.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.client.close()


@pytest.fixture
def status_events(hive: HiveProcess) -> Iterator[StatusEvents]:
    events = StatusEvents(hive)
    yield events
    events.close()


# -- one turn at a time ------------------------------------------------------------------


def test_one_turn_per_message_strictly_one_at_a_time(hive: HiveProcess) -> None:
    name = "turn-seq"
    after = last_id(hive, name)
    ids = [send(hive, name, f"job {i}") for i in range(3)]  # all queued while the first one runs
    turns = {i: wait_turn(hive, name, i, after=after) for i in ids}

    # The runtime's own record: start/end pairs, in message order, never overlapping.
    marks = [line.split() for line in home(hive, name, "turns.log")]
    assert [(what, int(mid)) for what, mid, _ in marks] == [
        (what, i) for i in ids for what in ("start", "end")
    ], marks
    times = [float(t) for _, _, t in marks]
    assert times == sorted(times), marks
    for k in range(1, len(ids)):
        assert float(marks[2 * k][2]) >= float(marks[2 * k - 1][2]), f"turn {ids[k]} started before {ids[k - 1]} ended"

    # The transcript: one turn per message, each whole (input first, exit last), in order.
    entries = transcript(hive, name, after)
    assert [e["turn"] for e in entries] == sorted(e["turn"] for e in entries), "turns interleaved"
    assert [e["turn"] for e in entries if e["kind"] == "exit"] == ids
    for i in ids:
        t = turns[i]
        assert t[0]["kind"] == "input" and t[0]["data"]["id"] == i, t
        assert t[0]["data"]["body"] == f"job {ids.index(i)}" and t[0]["data"]["from"] == "operator"
        assert stdout(t) == [f"start {i}", f"end {i}"]
        end = exit_of(t)
        assert end["exit_status"] == 0 and not end["interrupted"] and not end["timed_out"]
        assert end["duration_ms"] >= 600, end
    for a, b in itertools.pairwise(ids):
        assert turns[a][-1]["at"] <= turns[b][0]["at"], (turns[a][-1], turns[b][0])
    assert unacked(hive, name) == []


# -- acked only when the turn ended ----------------------------------------------------


def test_message_acked_only_after_its_turn_redelivered_when_harness_dies(
    hive: HiveProcess, status_events: StatusEvents,
) -> None:
    name = "turn-ack"
    hive.wait_running([name])
    after = last_id(hive, name)
    mid = send(hive, name, "slow")
    poll(lambda: f"start {mid} 1" in home(hive, name, "runs.log"), "the first attempt to start")
    wait_output(hive, name, mid, "attempt 1 slow", after)  # its output so far is stored
    assert [m["id"] for m in unacked(hive, name)] == [], "in flight on the harness's connection"

    # Kill the harness (as root, from the host) mid-turn.
    cage = hive.cage(name)
    old = hive.harness_pid(name)
    assert proc_uid(old) == cage["harness_uid"] != cage["uid"]
    os.kill(old, signal.SIGKILL)

    # While it is down the agent shows failed (poll; the subscription saw it too).
    down = poll(lambda: (r := status(hive, name)) and not r["running"] and r["failed"] and r,
                "agent_status to show the agent failed", interval=0.02)
    assert down["failed"] is True
    # init restarts the harness; the agent is running again.
    poll(lambda: (r := status(hive, name)) and r["running"] and not r["failed"], "the agent to run again")
    new = hive.harness_pid(name)
    assert new != old and proc_uid(new) == cage["harness_uid"]
    rows = poll(lambda: (rows := status_events.of(name)) and rows[-1]["running"] and rows,
                "the subscription to show the agent running again")
    assert any(not r["running"] and r["failed"] for r in rows), rows
    assert not rows[-1]["failed"], rows

    # The message was not acked: it comes back and its turn runs again, to the end.
    entries = wait_turn(hive, name, mid, after=after)
    runs = home(hive, name, "runs.log")
    assert [r for r in runs if r.split()[1] == str(mid)] == [f"start {mid} 1", f"start {mid} 2", f"end {mid} 2"]
    assert [e["kind"] for e in entries if e["kind"] in ("input", "exit")] == ["input", "input", "exit"]
    assert stdout(entries) == ["attempt 1 slow", "attempt 2 slow", f"finished {mid}"]
    assert exit_of(entries)["exit_status"] == 0
    assert unacked(hive, name) == []
    # The first attempt's runtime died with its harness (init killed it); nothing is left.
    poll(lambda: runtime_procs(hive, name) == [], "no runtime process left in the cage")

    # The next message is an ordinary single turn.
    nxt = send(hive, name, "quick")
    entries = wait_turn(hive, name, nxt, after=after)
    assert stdout(entries) == ["attempt 1 quick", f"finished {nxt}"]
    assert unacked(hive, name) == []


# -- pause ---------------------------------------------------------------------------


def test_paused_agent_queues_messages_unacked_and_runs_them_in_order_on_resume(hive: HiveProcess) -> None:
    name = "turn-pause"
    hive.wait_running([name])
    after = last_id(hive, name)
    assert ok(hive.host_call("set_paused", name=name, paused=True)) == {
        "version": 1, "ok": True, "name": name, "paused": True}
    try:
        assert status(hive, name)["paused"] is True
        bodies = ["first", "second", "third"]
        ids = [send(hive, name, b) for b in bodies]

        # Watch for a while: no turn starts (no new transcript entry); the messages stay queued.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            assert transcript(hive, name, after) == [], "a turn ran while the agent was paused"
            time.sleep(0.2)
        queued = unacked(hive, name)
        assert [(m["id"], m["body"], m["from"]) for m in queued] == [(i, b, "operator") for i, b in zip(ids, bodies, strict=False)]
        assert status(hive, name)["running"] is True  # paused is not stopped
    finally:
        ok(hive.host_call("set_paused", name=name, paused=False))
    assert status(hive, name)["paused"] is False

    turns = [wait_turn(hive, name, i, after=after) for i in ids]
    entries = transcript(hive, name, after)
    assert [e["turn"] for e in entries if e["kind"] == "input"] == ids
    assert [e["turn"] for e in entries] == sorted(e["turn"] for e in entries)
    for t, b in zip(turns, bodies, strict=False):
        assert stdout(t) == [f"ran {b}"]
        assert exit_of(t)["exit_status"] == 0
    assert unacked(hive, name) == []


# -- interrupt -------------------------------------------------------------------------


def test_interrupt_ends_the_turn_quickly_and_the_next_message_runs(hive: HiveProcess) -> None:
    name = "turn-int"
    hive.wait_running([name])
    after = last_id(hive, name)
    slow = send(hive, name, "sleep")
    nxt = send(hive, name, "after the interrupt")
    wait_output(hive, name, slow, "sleeping", after)
    assert transcript(hive, name, after)[-1]["kind"] != "exit"

    t0 = time.monotonic()
    assert ok(hive.host_call("interrupt", name=name)) == {"version": 1, "ok": True, "name": name}
    entries = wait_turn(hive, name, slow, timeout=QUICK, after=after)
    took = time.monotonic() - t0
    end = exit_of(entries)
    assert end["interrupted"] is True and end["timed_out"] is False, end
    assert end["exit_status"] == 128 + signal.SIGTERM, end
    assert end["duration_ms"] < 30_000
    assert took < QUICK
    assert "woke up" not in stdout(entries)
    assert [e["data"] for e in entries if e["kind"] == "note"] == ["interrupted by the operator"]

    # The interrupted message was acked; the next one runs, uninterrupted.
    entries = wait_turn(hive, name, nxt, after=after)
    assert stdout(entries) == ["ran after the interrupt"]
    end = exit_of(entries)
    assert end == {**end, "exit_status": 0, "interrupted": False, "timed_out": False}
    assert unacked(hive, name) == []
    poll(lambda: runtime_procs(hive, name) == [], "no runtime process left")

    refused = hive.host_call("interrupt", name="no-such-agent")
    assert refused["ok"] is False and "no agent named" in refused["error"]


def test_the_runtimes_stdio_are_pipes_of_its_own_it_opens_by_name(hive: HiveProcess) -> None:
    """Pipes, each one way, whose other ends its relay holds (a process of the runtime's
    own uid: the harness's ends are sockets, which no splice can lock:
    redteam/test_red_turn31.py), so ``>/dev/stderr`` and ``/dev/stdout`` by name work
    (they were ENXIO on sockets, sessions 30 to 31); its exit status is the relay's."""
    name = "turn-stdio"
    hive.wait_running([name])
    mid = send(hive, name, "hi")
    entries = wait_turn(hive, name, mid)
    assert exit_of(entries)["exit_status"] == 3, entries
    lines = stdout(entries)
    assert [json.loads(lines[0]), lines[1:]] == [
        {"pipes": [True, True, True], "read_stdout": "EBADF", "write_stdin": "EBADF"},
        ["to /dev/stdout"],
    ], entries
    assert [e["data"] for e in entries if e["kind"] == "stderr"] == ["to /dev/stderr"], entries


def test_the_runtimes_relay_holds_only_its_stdio_and_is_out_of_its_reach(hive: HiveProcess) -> None:
    """The relay (init's fork, as the runtime uid) holds the runtime's three pipes'
    other ends, the harness's three socket ends (stdin's until it is read to the end), the runtime's pidfd and /dev/null as its
    own stdio (init's are cage.log), nothing else;
    it is not dumpable (it changed uid from root and never exec'd), so its /proc entries
    are root's and the runtime can't list or open its descriptors; an interrupt ends it
    with the runtime."""
    name = "turn-relay"
    hive.wait_running([name])
    after = last_id(hive, name)
    mid = send(hive, name, "hi")
    wait_output(hive, name, mid, "up", after)
    uid = hive.cage(name)["uid"]
    relays = [p for p in hive.cgroup(name).pids()
              if proc_uid(p) == uid and proc_cmdline(p)[-1:] == ["relay"]]
    assert len(relays) == 1, relays
    relay = relays[0]
    held = sorted(os.readlink(f"/proc/{relay}/fd/{n}").split(":")[0] for n in os.listdir(f"/proc/{relay}/fd"))
    # (stdin's pair is closed: the runtime has read it to its end)
    assert held == ["/dev/null"] * 3 + ["anon_inode"] + ["pipe"] * 2 + ["socket"] * 2, held
    assert os.stat(f"/proc/{relay}/fd").st_uid == 0  # not dumpable: root's, mode 0500
    ok(hive.host_call("interrupt", name=name))
    entries = wait_turn(hive, name, mid, after=after)
    assert exit_of(entries)["interrupted"] is True, entries
    poll(lambda: not os.path.exists(f"/proc/{relay}"), "the relay gone with its turn")


def test_a_runtime_ended_by_a_signal_is_reported_so(hive: HiveProcess) -> None:
    """Its relay ends by the same signal (init reports the relay's status, as a shell
    does: 128 + N)."""
    name = "turn-sig"
    hive.wait_running([name])
    mid = send(hive, name, "hi")
    entries = wait_turn(hive, name, mid)
    assert (exit_of(entries)["exit_status"], stdout(entries)) == (128 + 15, ["going"]), entries


def test_bash_on_the_runtimes_socket_stdin_sources_no_bashrc(hive: HiveProcess) -> None:
    """bash takes a socket on stdin for rshd's and a top-level ``bash -c`` then sources
    ~/.bashrc; the runtime's SHLVL=1 keeps it as it was on a pipe."""
    name = "turn-bash"
    hive.wait_running([name])
    mid = send(hive, name, "hi")
    entries = wait_turn(hive, name, mid)
    assert (exit_of(entries)["exit_status"], stdout(entries)) == (0, ["cmd"]), entries


# -- misbehaving runtimes ------------------------------------------------------------------


def _healthy(hive: HiveProcess, name: str, after: int) -> None:
    """The harness is fine: the next message's turn runs normally."""
    mid = send(hive, name, "hello")
    entries = wait_turn(hive, name, mid, after=after)
    assert stdout(entries) == ["fine"]
    assert exit_of(entries)["exit_status"] == 0
    assert status(hive, name)["running"] and not status(hive, name)["failed"]


def test_crashing_runtime_leaves_the_harness_healthy(hive: HiveProcess) -> None:
    name = "turn-bad"
    hive.wait_running([name])
    after = last_id(hive, name)
    harness = hive.harness_pid(name)
    mid = send(hive, name, "crash")
    entries = wait_turn(hive, name, mid, after=after)
    end = exit_of(entries)
    assert end == {**end, "exit_status": 3, "interrupted": False, "timed_out": False}
    assert stdout(entries) == ["about to crash"]
    assert [e["data"] for e in entries if e["kind"] == "stderr"] == ["boom"]
    assert entries[0]["kind"] == "input" and entries[0]["data"]["body"] == "crash"
    _healthy(hive, name, after)
    assert hive.harness_pid(name) == harness, "the harness was not restarted"


@pytest.mark.parametrize("body, exit_status", [
    ("hang", 128 + signal.SIGTERM),  # ends on SIGTERM
    ("hang-hard", 128 + signal.SIGKILL),  # ignores SIGTERM: killed after the grace period
    ("hang-closed", 128 + signal.SIGTERM),
    ("hang-orphan", 0),  # the shell itself exited 0; its child is what times out
    ("hang-setsid", 128 + signal.SIGTERM),
])
def test_hanging_runtime_times_out_and_is_killed(hive: HiveProcess, body: str, exit_status: int) -> None:
    name = "turn-bad"
    hive.wait_running([name])
    after = last_id(hive, name)
    harness = hive.harness_pid(name)
    t0 = time.monotonic()
    mid = send(hive, name, body)
    entries = wait_turn(hive, name, mid, after=after)
    took = time.monotonic() - t0
    end = exit_of(entries)
    assert end["timed_out"] is True and end["interrupted"] is False, end
    assert end["exit_status"] == exit_status, end
    assert 2000 <= end["duration_ms"] < 20_000, end
    assert took < DEADLINE
    assert [e["data"] for e in entries if e["kind"] == "note"] == ["turn timed out after 2 s"]
    poll(lambda: runtime_procs(hive, name) == [], "the hung runtime's processes to be gone")
    _healthy(hive, name, after)
    assert hive.harness_pid(name) == harness


def _stored(hive: HiveProcess, name: str) -> dict[int, tuple[int, int]]:
    """turn -> (entries, characters of their data) the database holds for agent ``name``.
    (The host's ``transcript`` shows the latest 5000 entries; this sees them all.)"""
    db = sqlite3.connect(f"file:{hive.state_dir / 'hive.db'}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute(
            "SELECT turn, count(*), sum(length(data)) FROM transcript WHERE agent=? GROUP BY turn", (name,),
        ).fetchall()
    finally:
        db.close()
    return {turn: (count, chars) for turn, count, chars in rows}


@pytest.mark.parametrize("body", ["lines", "line", "both"])
def test_flooding_runtime_keeps_the_transcript_bounded(hive: HiveProcess, body: str) -> None:
    name = "turn-flood"
    hive.wait_running([name])
    after = last_id(hive, name)
    harness = hive.harness_pid(name)
    earlier = _stored(hive, name)
    mid = send(hive, name, body)
    entries = wait_turn(hive, name, mid, timeout=90, after=after)
    end = exit_of(entries)
    assert end["exit_status"] == 0 and not end["timed_out"], end

    stored = _stored(hive, name)
    count, chars = stored.pop(mid)
    assert count == len(entries), "one transcript request shows the whole turn"
    assert chars < 1.2 * 1024 * 1024, (count, chars)
    shown = sum(len(e["data"]) for e in entries if e["kind"] in ("stdout", "stderr"))
    assert 0 < shown <= 1024 * 1024
    assert entries[0]["kind"] == "input" and entries[0]["data"]["id"] == mid
    notes = [e["data"] for e in entries if e["kind"] == "note"]
    assert len(notes) == 1 and "dropped" in notes[0], notes
    dropped = int(notes[0].split(": ")[-1].split()[0])
    total = {"lines": 50_000_000, "line": 50_000_000, "both": 40_000_000}[body]
    assert total - 1024 * 1024 <= dropped < total, notes

    # The flood pushed nothing else out of the agent's transcript, and the harness is fine.
    assert stored == earlier
    _healthy(hive, name, after)
    assert hive.harness_pid(name) == harness


def _stored_bytes(hive: HiveProcess, name: str) -> tuple[int, int, int, tuple[int, int]]:
    """(entries, bytes of kind and data, oldest id) the database holds for agent ``name``,
    and what its transcript_usage row says it holds."""
    db = sqlite3.connect(f"file:{hive.state_dir / 'hive.db'}?mode=ro", uri=True, timeout=30)
    try:
        count, size, oldest = db.execute(
            "SELECT count(*), sum(length(CAST(kind AS BLOB)) + length(CAST(data AS BLOB))), min(id)"
            " FROM transcript WHERE agent=?", (name,),
        ).fetchone()
        usage = db.execute("SELECT entries, bytes FROM transcript_usage WHERE agent=?", (name,)).fetchone()
    finally:
        db.close()
    return count, size, oldest, tuple(usage)


def test_a_transcript_is_bounded_in_stored_bytes(hive: HiveProcess) -> None:
    """Red team round 26 (noticed): control characters are stored escaped, six bytes each,
    so 20,000 entries could hold ~1.75 GiB. Three turns of 512 KiB of \\x01 store ~9.4 MB:
    the oldest entries go, the newest turn stays whole, the counts stay exact."""
    name = "turn-flood"
    hive.wait_running([name])
    after = last_id(hive, name)
    _, _, oldest_before, _ = _stored_bytes(hive, name)
    turns: list[tuple[int, int]] = []
    for _ in range(3):
        mid = send(hive, name, "controls")
        entries = wait_turn(hive, name, mid, timeout=60, after=after)
        assert exit_of(entries)["exit_status"] == 0, exit_of(entries)
        assert sum(len(e["data"]) for e in entries if e["kind"] == "stdout") >= 500_000
        turns.append((mid, len(entries)))
        after = entries[-1]["id"]

    count, size, oldest, usage = _stored_bytes(hive, name)
    assert size <= TRANSCRIPT_MIB << 20, size
    assert size > (TRANSCRIPT_MIB << 20) - 200_000, "trimmed far more than it had to"
    assert usage == (count, size)
    assert oldest > oldest_before
    stored = _stored(hive, name)
    assert set(stored) <= {mid for mid, _ in turns}, "an older turn was kept over a newer one"
    assert stored[turns[-1][0]][0] == turns[-1][1], "the newest turn is whole"
    _healthy(hive, name, after)


# -- the runtime's identity and what it can't do ----------------------------------------------


def test_a_runtime_that_leaves_its_stdin_unread_costs_the_harness_nothing(hive: HiveProcess) -> None:
    """Each turn's runtime exits at once, leaving a process that holds its stdin and never
    reads it; each message is 256 KiB, past a pipe's capacity. The harness wrote stdin
    from a thread of its own, which blocked for good: one thread and one descriptor of
    the harness's a turn (threads count against the cage's pids_max). Now the turn's loop
    writes it as it is read and closes it at the turn's end."""
    name = "turn-stdin"
    hive.wait_running([name])
    harness = hive.harness_pid(name)

    def turn() -> None:
        after = last_id(hive, name)
        mid = send(hive, name, "x" * (256 * 1024))
        assert stdout(wait_turn(hive, name, mid, after=after)) == ["kept"]

    def counts() -> tuple[int, int]:
        return len(os.listdir(f"/proc/{harness}/task")), len(os.listdir(f"/proc/{harness}/fd"))

    turn()  # what the harness starts once (its page's thread) is there
    time.sleep(0.3)
    before = counts()
    for _ in range(4):
        turn()
    poll(lambda: counts() == before, f"the harness's threads and descriptors back to {before}",
         timeout=5)
    assert hive.harness_pid(name) == harness


def test_runtime_runs_as_the_runtime_uid_in_its_home_with_its_environment(hive: HiveProcess) -> None:
    name = "turn-env"
    hive.wait_running([name])
    after = last_id(hive, name)
    cage = hive.cage(name)
    mid = send(hive, name, "who am i")
    entries = wait_turn(hive, name, mid, after=after)
    assert exit_of(entries)["exit_status"] == 0, entries
    (out,) = stdout(entries)
    seen = json.loads(out)

    assert seen["uid"] == seen["euid"] == cage["uid"] != cage["harness_uid"]
    assert 0 not in (seen["uid"], seen["gid"])
    assert seen["gid"] == cage["gid"] and seen["groups"] in ([], [cage["gid"]])
    assert seen["cwd"] == seen["home"] == "/home/agent"
    assert seen["agent"] == name and seen["hostname"] == name
    assert seen["socket"] == "/run/hive/agent.sock"
    assert seen["turn"] == str(mid) and seen["message"]["id"] == mid and seen["message"]["body"] == "who am i"
    assert "HIVE_INIT_FD" not in seen["env"]
    assert seen["whoami"] == {"version": 1, "ok": True, "name": name}

    # The runtime can't drive the turn loop, nor signal the harness.
    for verb in ("turn_next", "turn_done"):
        assert seen[verb] == {"version": 1, "ok": False, "error": f"'{verb}' is for the agent's harness only"}
    assert seen["harness"] and all(state == "EPERM" for _, state in seen["harness"]), seen["harness"]
    assert unacked(hive, name) == []


HARNESS_VERB_PROBE = """
import json, socket, sys
requests = json.loads(sys.argv[1])
out = []
with socket.socket(socket.AF_UNIX) as s:
    s.connect("/run/hive/agent.sock")
    f = s.makefile("rb")
    for req in requests:
        s.sendall(json.dumps(req).encode() + b"\\n")
        out.append(json.loads(f.readline()))
print(json.dumps(out))
"""


def test_harness_verbs_refused_to_the_runtime_uid(hive: HiveProcess) -> None:
    name = "turn-env"
    hive.wait_running([name])
    after = last_id(hive, name)
    ok(hive.host_call("set_paused", name=name, paused=True))
    try:
        mid = send(hive, name, "queued while paused")  # unacked: a target for a forged turn_done
        requests = [
            {"cmd": "turn_next"},
            {"cmd": "turn_next", "wait": 0},
            {"cmd": "turn_done", "turn": mid, "exit_status": 0, "duration_ms": 1.0},
            {"cmd": "turn_record", "turn": mid, "entries": [{"kind": "stdout", "data": "forged"}]},
            {"cmd": "harness_config"},
            {"cmd": "harness_state", "needs_login": True},
            {"cmd": "control", "wait": 0},
            {"cmd": "transcript_read"},
            {"cmd": "page_state"},
        ]
        assert {r["cmd"] for r in requests} == set(HARNESS_VERBS), "a harness verb is not probed"
        proc = hive.exec(name, "python3", "-c", HARNESS_VERB_PROBE, json.dumps(requests))
        assert proc.returncode == 0, proc.stderr
        replies = json.loads(proc.stdout)
        for req, reply in zip(requests, replies, strict=True):
            assert reply == {"version": 1, "ok": False, "error": f"{req['cmd']!r} is for the agent's harness only"}
        # Refused and changed nothing: no transcript entry, the message still queued, still logged in.
        assert transcript(hive, name, after) == []
        assert [m["id"] for m in unacked(hive, name)] == [mid]
        assert status(hive, name)["needs_login"] is False
        uid = hive.exec(name, "id", "-u")
        assert int(uid.stdout) == hive.cage(name)["uid"] != hive.cage(name)["harness_uid"]
    finally:
        ok(hive.host_call("set_paused", name=name, paused=False))
    entries = wait_turn(hive, name, mid, after=after)
    assert "forged" not in stdout(entries)
    assert exit_of(entries)["exit_status"] == 0


# -- transcripts survive restarts (last: it restarts hive-core under every agent) ----------------


def _check_turn_shape(entries: list[dict[str, Any]], mid: int) -> None:
    assert entries[0]["kind"] == "input" and entries[0]["data"]["id"] == mid
    assert set(entries[0]["data"]) >= {"id", "from", "kind", "body", "sent_at"}
    assert {e["kind"] for e in entries} >= {"input", "stdout", "stderr", "exit"}
    for e in entries:
        assert set(e) == {"id", "turn", "kind", "data", "at"} and e["turn"] == mid
    end = exit_of(entries)
    assert isinstance(end["duration_ms"], (int, float)) and end["duration_ms"] >= 0


def test_transcript_kept_across_harness_and_core_restarts(hive: HiveProcess) -> None:
    name = "turn-ack"
    hive.wait_running()
    after = last_id(hive, name)

    # A full turn: input, stdout, stderr, exit.
    first = send(hive, name, "one")
    entries = wait_turn(hive, name, first, after=after)
    _check_turn_shape(entries, first)
    assert stdout(entries) == ["attempt 1 one", f"finished {first}"]
    assert [e["data"] for e in entries if e["kind"] == "stderr"] == [f"to stderr {first}"]
    before = transcript(hive, name)

    # Across a harness restart (killed while idle).
    old = hive.harness_pid(name)
    os.kill(old, signal.SIGKILL)
    poll(lambda: (pids := [p for p in hive.cgroup(name).pids() if proc_cmdline(p)[-1:] == ["harness"]])
         and old not in pids, "a new harness")
    poll(lambda: status(hive, name)["running"], "the agent to run again")
    assert transcript(hive, name)[: len(before)] == before

    # Across a hive-core restart: kill -9; `hive up` starts it again; cages keep running.
    cage_pid = hive.cage(name)["pid"]
    core = hive.core_pid()
    assert core is not None and proc_uid(core) != 0
    os.kill(core, signal.SIGKILL)
    poll(lambda: (pid := hive.core_pid()) and pid != core, "hive up to restart hive-core")
    hive.wait_running(timeout=DEADLINE)
    assert hive.cage(name)["pid"] == cage_pid, "the cage survived the core's restart"
    assert transcript(hive, name)[: len(before)] == before

    # The turn loop goes on where it was; the new turn's entries come after the old ones.
    second = send(hive, name, "two")
    entries = wait_turn(hive, name, second, after=after)
    _check_turn_shape(entries, second)
    assert stdout(entries) == ["attempt 1 two", f"finished {second}"]
    assert entries[0]["id"] > before[-1]["id"]
    assert transcript(hive, name)[: len(before)] == before
    assert unacked(hive, name) == []


def test_core_restart_mid_turn_redelivers_without_overlap(hive: HiveProcess) -> None:
    """hive-core dies while a turn is running (and writing output): the harness must
    not leave that turn's runtime running while it takes the redelivered message again."""
    name = "turn-ack"
    hive.wait_running()
    after = last_id(hive, name)
    mid = send(hive, name, "chatty")
    wait_output(hive, name, mid, "tick 3", after)
    assert len(runtime_procs(hive, name)) == 1

    core = hive.core_pid()
    assert core is not None
    os.kill(core, signal.SIGKILL)
    poll(lambda: (pid := hive.core_pid()) and pid != core, "hive up to restart hive-core")
    hive.wait_running(timeout=DEADLINE)

    entries = wait_turn(hive, name, mid, after=after)
    assert exit_of(entries)["exit_status"] == 0
    runs = [r for r in home(hive, name, "runs.log") if r.split()[1] == str(mid)]
    assert runs == [f"start {mid} 1", f"start {mid} 2", f"end {mid} 2"], runs
    poll(lambda: runtime_procs(hive, name) == [], "the first attempt's runtime to be gone")
    assert unacked(hive, name) == []

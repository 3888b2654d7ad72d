"""Red team, round 8: session 6's speed work, attacked from real cages.

- init starts runtimes with its own ``fork_exec`` (not subprocess): what the agent's
  own command finds when it starts (descriptors, blocked and ignored signals, its
  session, its OOM score);
- the hot path reads lines with orjson (the stdlib decoder as a fallback) and skips
  pydantic for a plain ``{cmd, to, body}`` send: lines where the two decoders or the
  cheap check and the model could disagree, pipelined in one write, must get exactly
  the replies they get one by one, and store exactly the accepted messages, in order;
- refused agent.sock connections are closed inside the accept callback and egress
  connections are capped at ``max_connections + 1`` (the per-agent spare is gone):
  a churn of connections from a cage leaves the core no descriptor behind.

One hive, two agents: r8a (its command, run for its one turn, writes what it was
started with into its home) and r8b (its peer, paused: its inbox is the test's).
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import assert_ok, wait_for
from hive_fixture import HiveProcess, running_hive
from hyperhive.core.budget import EGRESS_REFUSING, Budget
from hyperhive.wire.common import TEXT_CHARS

from .conftest import cage_run, core_fds, fd_targets

A, B = "r8a", "r8b"
# r8a's runtime: what it inherited from init's fork_exec, read by programs that set
# nothing up themselves (sh, cat, ls: not Python, which ignores SIGPIPE on its own).
PROBE_CMD = (
    "cat /proc/self/status > r8-status; ls /proc/self/fd > r8-fds; echo $$ > r8-pid;"
    " cat /proc/self/stat > r8-stat; echo $PPID > r8-ppid; cat /proc/self/oom_score_adj > r8-oom"
)


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    h = HiveProcess(
        {A: {"command": ["/bin/sh", "-c", PROBE_CMD], "peers": [B]}, B: {"command": ["true"], "peers": [A]}},
        sections={"limits": {"messages_per_second": 1000, "message_burst": 1000}},
    )
    for hv in running_hive(h):
        assert_ok(hv.host_call("set_paused", name=B, paused=True))  # its inbox is the test's
        assert_ok(hv.agent_call(B, "send", to=A, body="start your turn"))  # r8a's command runs once
        home = hv.home(A)
        oom = home / "r8-oom"  # written last
        wait_for(lambda: oom.exists() and oom.read_text().strip() != "", timeout=30)  # noqa: B023
        yield hv


# -- init's fork_exec -------------------------------------------------------------------------


def _mask(status: str, field: str) -> int:
    m = re.search(rf"^{field}:\s*([0-9a-f]+)$", status, re.M)
    assert m, status
    return int(m.group(1), 16)


@pytest.mark.attack("init.runtime-inheritance", ref="red team round 8: init's fork_exec replaced subprocess.Popen")
def test_a_runtime_inherits_no_descriptor_signal_or_session_of_init(hive: HiveProcess) -> None:
    """The agent's own command, as init started it: stdio and nothing else (init's
    channel to the harness, its wake-up pipe, the listener it may hold: none), no signal
    blocked or ignored, a session of its own, not root, no capabilities, no new
    privileges, and the runtime's OOM score (killed before the harness)."""
    home = hive.home(A)
    status = (home / "r8-status").read_text()
    fds = sorted(int(x) for x in (home / "r8-fds").read_text().split())
    # ls's own: 0-2 inherited, 3 the directory it lists. Nothing of init's.
    assert fds == [0, 1, 2, 3], fds
    assert _mask(status, "SigBlk") == 0, status
    assert _mask(status, "SigIgn") == 0, status  # SIGPIPE, SIGXFSZ and the rest at their defaults
    assert _mask(status, "CapEff") == 0 and _mask(status, "CapPrm") == 0, status
    assert re.search(r"^NoNewPrivs:\s*1$", status, re.M), status
    uids = re.search(r"^Uid:\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", status, re.M)
    assert uids and set(uids.groups()) != {"0"} and "0" not in uids.groups(), status
    # cat's stat: field 6 is its session. Since session 32 its leader is the runtime's
    # relay (init's fork, after setsid: the shell's parent), a process of the runtime's
    # own uid: a session of the runtime's, not init's (pid 1 in the cage's namespace).
    sh_pid = int((home / "r8-pid").read_text())
    relay = int((home / "r8-ppid").read_text())
    stat_fields = (home / "r8-stat").read_text().rsplit(")", 1)[1].split()
    assert int(stat_fields[1]) == sh_pid, (stat_fields, sh_pid)  # cat's parent: the shell
    assert int(stat_fields[3]) == relay not in (0, 1, sh_pid), (stat_fields, relay)  # session id
    assert int((home / "r8-oom").read_text()) >= 500


# -- the hot path: orjson, the stdlib fallback, the cheap send check ------------------------------

LONG_NAME = "r" + "a" * 31  # 32 characters: one past NAME_RE's bound
# (the raw line, what its reply must be when not ok: a fragment of the refusal, or None)
LINES: list[tuple[bytes, str | None]] = [
    (b'{"cmd":"send","to":"r8b","body":"one"}', None),
    (b'{"cmd":"send","to":"r8b","body":"a\\ud800b"}', "lone surrogate"),  # orjson refuses, stdlib reads it
    (b'{"cmd":"send","to":"r8b","body":"x","n":1234567890123456789}', "unknown field"),  # 19 digits: the stdlib reads it
    (b'{"cmd":"send","to":"r8b","body":"x","n":-92233720368547758090}', "integer out of range"),
    (b'{"cmd":"send","to":"operator","body":"dup","to":"r8b"}', None),  # duplicate keys: the last one
    (b'{"cmd":"send","to":"r8b\\n","body":"x"}', "bad agent name"),
    (b'{"cmd":"send","to":"r8b\\u0000","body":"x"}', "bad agent name"),
    (b'{"cmd":"send","to":"' + LONG_NAME.encode() + b'","body":"x"}', "bad agent name"),
    (b'{"cmd":"send","to":"R8B","body":"x"}', "bad agent name"),
    (b'{"cmd":"send","to":"core","body":"x"}', "reserved"),
    (b'{"cmd":"send","to":"r8b","body":123}', "body"),
    (b'{"cmd":"send","to":"r8b","body":["x"]}', "body"),
    (b'{"cmd":"send","to":"r8b","body":null}', "body"),
    (b'{"cmd":"send","to":["r8b"],"body":"x"}', "to"),
    (b'{"cmd":"send","to":"r8b","body":"' + b"x" * (TEXT_CHARS + 1) + b'"}', "body"),
    (b'{"cmd":"send","to":"r8b","body":"x","x":1e400}', "number out of range"),
    (b'{"cmd":"send","to":"r8b","body":NaN}', "NaN"),
    (b'{"cmd":"send","to":"r8b","body":"\xff"}', "not valid UTF-8"),
    (b'\xef\xbb\xbf{"cmd":"send","to":"r8b","body":"bom"}', "BOM"),
    (b'{"cmd":"send","\\u0074o":"r8b","body":"escaped key"}', None),
    (b'{"cmd":"sen\\u0064","to":"r8b","body":"escaped verb"}', None),
    (b'{"cmd":"send","to":"r8a","body":"self"}', "itself"),
    (b'{"cmd":"send","to":"nobody","body":"x"}', "no agent named"),
    (b'{"cmd":"send","to":"r8b","body":"' + "\\u0000\\ufeff\u2028</script>\U0001f600\\\\\\\"".encode() + b'"}', None),
    (b'{"cmd":"send","to":"r8b","body":"1234567890123456789012345"}', None),  # digits in a string
    (b'{"cmd":"send","to":"r8b","body":"' + b"y" * TEXT_CHARS + b'"}', None),  # exactly the bound
    (b'{"cmd":"send","to":"operator","body":"to the operator"}', None),
    (b'{"cmd":"send","to":"r8b","body":"two"}', None),
]

TWICE = """
import base64
lines = [base64.b64decode(x) for x in P["lines"]]
c = Conn()
c.send(b"".join(l + b"\\n" for l in lines))  # one write: handled as one pipelined run
piped = [c.line() for _ in lines]
c.close()

def alone(line):
    deadline = time.monotonic() + 20
    while True:
        c = Conn()
        try:
            r = c.raw(line + b"\\n")
        finally:
            c.close()
        if r and not r["ok"] and r["error"].startswith("too many connections") and time.monotonic() < deadline:
            time.sleep(0.05)
            continue
        return r

result(piped=piped, alone=[alone(l) for l in lines])
"""


def _to_of(line: bytes) -> Any:
    try:
        return json.loads(line.decode("utf-8")).get("to")
    except (ValueError, UnicodeDecodeError):
        return None


def _body_of(line: bytes) -> Any:
    return json.loads(line.decode("utf-8"))["body"]


@pytest.mark.attack("wire.pipelining", ref="red team round 8: orjson, the stdlib fallback, the plain-send check")
def test_decoder_and_send_check_disagreements_change_no_reply_and_store_exactly_the_accepted(
    hive: HiveProcess,
) -> None:
    """r8a writes lines on which orjson and the stdlib decoder (or the cheap send check
    and the Send model) could disagree, all in one write, then each alone on a fresh
    connection. Every line gets the same reply both ways (the same refusal, word for
    word; an id for the same ones); each refusal names what is wrong; r8b's inbox holds
    exactly the accepted bodies, byte for byte, in the order sent, under the ids their
    replies gave, and its recv lines are valid JSON."""
    lines = [line for line, _ in LINES]
    out = cage_run(hive, A, TWICE, timeout=120, lines=[base64.b64encode(x).decode() for x in lines])
    piped, alone = out["piped"], out["alone"]
    assert len(piped) == len(alone) == len(lines)
    wrong = []
    for (line, refusal), p, a in zip(LINES, piped, alone, strict=True):
        if refusal is None:
            fine = p["ok"] and a["ok"] and set(p) == set(a) == {"version", "ok", "id"}
        else:
            fine = p == a and p["ok"] is False and refusal in p["error"]
        if not fine:
            wrong.append((line[:80], p, a))
    assert not wrong, wrong
    to_b = [(i, _body_of(line)) for i, (line, r) in enumerate(LINES) if r is None and _to_of(line) == B]
    ids = [piped[i]["id"] for i, _ in to_b] + [alone[i]["id"] for i, _ in to_b]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
    got: list[dict[str, Any]] = []
    while True:  # in pages: two bodies of 256 KiB don't fit one reply
        page = assert_ok(hive.agent_call(B, "recv", max=100))
        got += page["messages"]
        assert_ok(hive.agent_call(B, "ack", ids=[m["id"] for m in page["messages"]]))
        if not page.get("more"):
            break
    bodies = [b for _, b in to_b]
    assert [m["id"] for m in got] == ids, ([m["id"] for m in got], ids)
    assert [m["body"] for m in got] == bodies + bodies
    assert {m["from"] for m in got} == {A} and {m["kind"] for m in got} == {"message"}


# -- descriptors: refused connections closed in the accept callback -----------------------------

CHURN = """
import socket
held, errors, churned = [], [], 0

def hold(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(path)
        held.append(s)
    except OSError as e:  # the listener's backlog is full: the kernel refuses
        errors.append(errname(e))
        s.close()

for _ in range(P["hold"]):  # over the cap: refused and closed in the accept callback
    hold(AGENT_SOCK)
    time.sleep(0.001)
for _ in range(P["hold"]):  # the egress proxy: past max_connections + 1, the backlog
    hold("/run/hive/egress.sock")
for _ in range(P["churn"]):  # connect and hang up at once, refused or not
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # blocking: waits for backlog room
    try:
        s.connect(AGENT_SOCK)
        churned += 1
    except OSError as e:
        errors.append(errname(e))
    s.close()
open(P["flag"], "w").write("holding")
deadline = time.monotonic() + 30
while not os.path.exists(P["release"]) and time.monotonic() < deadline:
    time.sleep(0.05)
for s in held:
    s.close()
after = call_when_free({"cmd": "whoami"})  # its own socket still serves it
result(held=len(held), errors=sorted(set(errors)), churned=churned, after=after)
"""


@pytest.mark.attack("budget.core-descriptors", ref="red team round 8: no spare descriptors per agent any more")
def test_a_connection_churn_from_a_cage_stays_within_its_budget_and_leaves_nothing(hive: HiveProcess) -> None:
    """r8a opens 200 connections to agent.sock and 200 to egress.sock and holds them
    (sending nothing), then connects and hangs up 300 times more. While it holds them
    the core holds no more descriptors for r8a than the budget counts per agent (its
    listeners, agent_connections per uid, the egress proxy's tunnels, the refusing one
    and the idle pool); r8b is served meanwhile; once r8a lets go the core is back
    where it was."""
    budget = Budget(max_agents=1, agent_connections=32, egress_connections=16, reserve_fds=0, nofile=1 << 20,
                    tasks=None)
    before, before_targets = core_fds(hive), fd_targets(hive)
    home = hive.home(A)
    flag, release = home / "r8-holding", home / "r8-release"
    for p in (flag, release):
        p.unlink(missing_ok=True)
    out: dict[str, Any] = {}

    def attack() -> None:
        out.update(cage_run(hive, A, CHURN, timeout=90, hold=200, churn=300,
                            flag=flag.name,
                            release=release.name))

    t = threading.Thread(target=attack)
    t.start()
    try:
        wait_for(flag.exists, timeout=60)
        time.sleep(0.5)  # the core's accept callbacks have run
        peak = core_fds(hive)
        started = time.monotonic()
        assert_ok(hive.agent_call(B, "whoami"))
        assert time.monotonic() - started < 3.0
    finally:
        release.write_text("go")
        t.join(timeout=90)
    assert out, "the probe did not finish"
    assert out["churned"] == 300 and out["after"]["ok"], out
    assert peak - before <= budget.per_agent_fds, (before, peak, budget.per_agent_fds, out)
    # Tighter: what the caps say one uid holding connections gets (agent.sock's cap, the
    # egress proxy's max_connections + 1; +1 for r8b's call): measured 49 of 167.
    assert peak - before <= 32 + 16 + EGRESS_REFUSING + 1, (before, peak, out)
    # Back where it was: within 30 s (15 s was once not enough in a full CI run on a busy
    # machine, session 22, not reproduced alone: the backlog's connections are accepted
    # at connections_per_second and each thread's CPU paced). A leak never comes back;
    # what is left is named.
    # Counted without the core's files: SQLite keeps the descriptor of a connection that
    # closed while another held locks on hive.db (the checkpoint thread's, when the WAL
    # grew with this churn's egress decisions) for reuse, once: a file of the store's,
    # not a connection of r8a's.
    def conns() -> int:
        return sum(not target.startswith("/") for target in fd_targets(hive))

    before_conns = sum(not target.startswith("/") for target in before_targets)
    deadline = time.monotonic() + 30
    while (now := conns()) > before_conns and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now <= before_conns, (before_conns, now, fd_targets(hive))


# -- the cgroup join: "0" written to v1's tasks by hive-priv's child ---------------------------------

SPREAD = """
import subprocess, threading
stop = threading.Event()
threads = [threading.Thread(target=stop.wait) for _ in range(4)]
[t.start() for t in threads]
kids = [subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sleep", "60"], start_new_session=True)]
if os.fork() == 0:  # a daemon: double fork, a session of its own, its parent gone
    if os.fork() == 0:
        os.setsid()
        while not os.path.exists(P["release"]):
            time.sleep(0.05)
    os._exit(0)
os.wait()
open(P["flag"], "w").write("spread")
while not os.path.exists(P["release"]):
    time.sleep(0.05)
stop.set()
for k in kids:
    k.kill()
result(ok=True)
"""


def _tids(pid: int) -> set[int]:
    try:
        return {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    except FileNotFoundError:
        return set()


@pytest.mark.attack("cage.cgroup-join", ref="red team round 8: v1 cgroups joined by writing 0 to tasks")
def test_every_thread_and_process_of_a_cage_stays_in_its_cgroups(hive: HiveProcess) -> None:
    """On this host's cgroup v1 hierarchies, r8a spreads out: threads, a child, a child
    in a session of its own, a double-forked daemon whose parent is gone. Every process
    on the host with r8a's uid, and every one of their threads, is in r8a's pids and
    memory cgroups (each listed in both ``tasks``), and the two hierarchies hold the same
    processes: the join by thread moved whole processes, in both controllers. (On a
    cgroup v2 host, the one hierarchy: every thread in ``cgroup.threads``.)"""
    cg = hive.cgroup(A)
    threads_file = "cgroup.threads" if cg.v2 else "tasks"  # v2: one hierarchy, the process moved
    uid = hive.priv("status")["cages"][A]["uid"]
    home = hive.home(A)
    flag, release = home / "r8-spread", home / "r8-release2"
    for p in (flag, release):
        p.unlink(missing_ok=True)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(cage_run(hive, A, SPREAD, flag=flag.name, release=release.name)))
    t.start()
    try:
        wait_for(flag.exists, timeout=60)
        mine = [int(p) for p in os.listdir("/proc") if p.isdigit() and _uid_of(int(p)) == uid]
        tasks = [{int(x) for x in (d / threads_file).read_text().split()} for d in cg.dirs]
        procs = [{int(x) for x in (d / "cgroup.procs").read_text().split()} for d in cg.dirs]
    finally:
        release.write_text("go")
        t.join(timeout=60)
    assert out.get("ok"), out
    assert len(mine) >= 5, mine  # python, two sleeps, the daemon (and sh/env wrappers)
    for pid in mine:
        tids = _tids(pid)
        for listed in tasks:
            assert tids <= listed | _gone(tids), (pid, tids, cg.dirs)
    assert all(p == procs[0] for p in procs) and all(t == tasks[0] for t in tasks), (procs, tasks)


def _uid_of(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _gone(tids: set[int]) -> set[int]:
    """Threads that ended since (a process between reads)."""
    return {t for t in tids if not Path(f"/proc/{t}").exists()}

"""Red team round 19b: session 12's changes attacked: agent_usage counted in Python in
the write's transaction (``Tx.held``, migration 9), exec holding the agent's name lock in
hive-priv until its child is in the cage with stop's SIGKILL rounds repeated while the
cgroup is not empty, and a cage's limit hits sent to the operator's webhooks.

See docs/security.md's rounds table (red team round 19b).
"""

from __future__ import annotations

import itertools
import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import USAGE_SUM, CoreProcess, WebhookReceiver, assert_ok
from hyperhive.core.limit_hits import LIMITS_POLL, NOTE_INTERVAL, LimitWatch

# -- agent_usage against the rows: a hostile agent's every byte on its socket ------------


def _drift(core: CoreProcess) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what agent_usage says, what a SUM over the rows says), agents holding anything."""
    db = sqlite3.connect(f"file:{core.state_dir / 'hive.db'}?mode=ro", uri=True, timeout=10)
    try:
        counted = {
            r[0]: tuple(r[1:])
            for r in db.execute(
                "SELECT agent, pending, bytes, op_pending, op_bytes FROM agent_usage"
            )
            if any(r[1:])
        }
        summed = {r[0]: tuple(r[1:]) for r in db.execute(USAGE_SUM)}
    finally:
        db.close()
    return counted, summed


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _raw(core: CoreProcess, name: str, data: bytes, replies: int) -> list[dict[str, Any]]:
    """``data`` in one write on a fresh connection; the first ``replies`` replies."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(str(core.agent_sock(name)))
    s.sendall(data)
    buf = b""
    while buf.count(b"\n") < replies:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        buf += chunk
    s.close()
    return [json.loads(x) for x in buf.split(b"\n")[:replies]]


def _inbox(core: CoreProcess, name: str) -> list[int]:
    with core.agent(name) as c:
        return [m["id"] for m in assert_ok(c.call("recv", wait=0, max=1000))["messages"]]


@pytest.mark.attack(
    "budget.store",
    ref="session 12 Tx.held: every pipelined path bob and alice can take, then kill -9",
)
def test_no_pipelined_mix_of_sends_and_acks_moves_a_count_off_its_rows(core_factory: Any) -> None:
    """bob (pending quota 20) and alice pipeline, each in one write so one group commit
    takes many: sends to each other and to the operator (making room), acks of the other's
    ids, of ids acked already, twice in one batch, of an id that is not there (the batch
    refused whole), recv's ack racing sends, questions, approvals, reminders; then 300
    pipelined sends with a kill -9 in their midst and a restart. After each step the
    counts equal a SUM over the rows, and bob is still refused at exactly its quota."""
    core = core_factory(sections={"limits": {"agent_pending_max": 20}})
    steps: list[str] = []

    def same(step: str) -> None:
        counted, summed = _drift(core)
        steps.append(step)
        assert counted == summed, (step, counted, summed)

    # Sends, and acks racing them in one write.
    out = _raw(
        core,
        "bob",
        b"".join(_line({"cmd": "send", "to": "alice", "body": f"é{j}"}) for j in range(8)),
        8,
    )
    ids = [r["id"] for r in out]
    same("bob's 8 pipelined sends")
    mix = [
        _line({"cmd": "ack", "ids": [ids[0], ids[0]]}),  # twice in one batch
        _line({"cmd": "ack", "ids": [ids[0]]}),  # acked already
        _line({"cmd": "ack", "ids": [ids[1], 10**9]}),  # one not there: refused whole
        _line({"cmd": "ack", "ids": [ids[2], ids[3], ids[2]]}),
        _line({"cmd": "send", "to": "bob", "body": "from alice"}),
        _line({"cmd": "recv", "wait": 0, "max": 1, "ack": [ids[4]]}),
        _line({"cmd": "ack", "ids": [ids[5]]}),
    ]
    out = _raw(core, "alice", b"".join(mix), len(mix))
    assert out[2].get("ok") is False, out[2]
    same("alice's acks (dup, again, missing, racing)")
    # bob acks ids that are not its own (alice's inbox), its own, and sends, all in one write.
    mine = _inbox(core, "bob")
    mix = [_line({"cmd": "ack", "ids": [ids[6]]}), _line({"cmd": "ack", "ids": [ids[6], ids[7]]})]
    mix += [_line({"cmd": "send", "to": "alice", "body": "x" * 100})] * 3
    mix += [_line({"cmd": "ack", "ids": mine}), _line({"cmd": "ack", "ids": mine})]
    out = _raw(core, "bob", b"".join(mix), len(mix))
    assert out[0].get("ok") is False and out[1].get("ok") is False, out[:2]
    same("bob's acks of alice's ids, racing its sends")
    # The operator's side: 40 sends to the operator (room made past 20), a question, an
    # approval and a reminder, pipelined.
    mix = [_line({"cmd": "send", "to": "operator", "body": f"op{j}" * 50}) for j in range(40)]
    mix += [
        _line({"cmd": "ask", "to": "operator", "question": "which?", "options": ["a", "b"]}),
        _line({"cmd": "request_approval", "kind": "note", "description": "d", "payload": {"k": 1}}),
        _line({"cmd": "remind", "in_seconds": 3600, "text": "later"}),
    ]
    out = _raw(core, "bob", b"".join(mix), len(mix))
    same("bob to the operator, a question, an approval, a reminder")
    # A question between agents, answered twice in one write, and its answer acked twice.
    out = _raw(
        core,
        "alice",
        _line({"cmd": "ask", "to": "bob", "question": "ça va?", "options": ["oui"]}),
        1,
    )
    qid = out[0]["id"]
    out = _raw(
        core,
        "bob",
        _line({"cmd": "answer", "id": qid, "answer": "oui"}) * 2
        + _line({"cmd": "ack", "ids": _inbox(core, "bob")}),
        3,
    )
    out = _raw(core, "alice", _line({"cmd": "ack", "ids": _inbox(core, "alice") * 2}) * 2, 2)
    same("a question between agents, answered twice, its answer acked twice")
    # kill -9 in the midst of 300 pipelined sends (to alice, to the operator), then a restart.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(core.agent_sock("carol")))
    s.sendall(
        b"".join(
            _line({"cmd": "send", "to": "operator", "body": "c" * (j % 97)}) for j in range(300)
        )
    )
    time.sleep(0.01)
    core.kill9()
    s.close()
    same("kill -9 mid-commit (before the restart)")
    core.start()
    same("after the restart")
    # The quota still holds at exactly 20 rows for alice (to bob), whatever happened above.
    held = _drift(core)[0].get("alice", (0, 0, 0, 0))
    room = 20 - held[0]
    out = _raw(
        core,
        "alice",
        b"".join(_line({"cmd": "send", "to": "bob", "body": "q"}) for _ in range(room + 5)),
        room + 5,
    )
    ok = sum(1 for r in out if "id" in r)
    print(f"steps: {steps}; alice held {held}, room {room}, sent {ok} of {room + 5}")
    assert ok == room, out
    same("at the quota")


# -- stop against an agent's fork chains, exec under the name lock -----------------------

STORM, CALM, BOMB = "r19bstorm", "r19bcalm", "r19bbomb"
# The agent's own runtime: 24 chains of processes, each forking its next and exiting at
# once (no pid lives long enough to be listed and signalled in one round), and 40 that
# ignore SIGTERM. Only inside its cage (hostname is the agent's name, set by the cage).
FORK_CHAINS = f"""
import os, signal, socket, time
if socket.gethostname() != {STORM!r}:
    raise SystemExit("not in the cage")
for i in range(64):
    while True:  # the chains' zombies, not yet reaped, can hold the cage at pids_max
        try:
            pid = os.fork()
            break
        except OSError:
            time.sleep(0.001)
    if pid == 0:
        os.setsid()
        fd = os.open("/dev/null", os.O_RDWR)
        for k in (0, 1, 2):
            os.dup2(fd, k)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if i < 24:
            while True:
                try:
                    if os.fork():
                        os._exit(0)
                except OSError:
                    time.sleep(0.001)
        time.sleep(3600)
time.sleep(3600)  # the exec that runs this stays (its end would take its processes along)
"""
CAGE_AGENTS: dict[str, dict[str, Any]] = {
    STORM: {"runtime": "command", "command": ["sleep", "3600"]},
    CALM: {"runtime": "command", "command": ["sleep", "3600"]},
    BOMB: {"runtime": "command", "command": ["sleep", "3600"], "pids_max": 32},
}


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    rx = WebhookReceiver()
    yield rx
    rx.server.shutdown()
    rx.server.server_close()


@pytest.fixture(scope="module")
def cage_hive(receiver: WebhookReceiver) -> Any:
    from hive_fixture import HiveProcess, running_hive

    url = f"http://127.0.0.1:{receiver.port}/ntfy"
    notify = {"webhooks": [{"url": url, "format": "ntfy"}], "backoff_seconds": 0.05}
    yield from running_hive(HiveProcess(CAGE_AGENTS, sections={"notify": notify}))


@pytest.mark.attack(
    "exec.leftover-processes",
    ref="session 12 kill_all's SIGKILL rounds every 0.5 s; exec under the name lock",
)
def test_fork_chains_neither_outlive_a_stop_nor_hold_off_another_agents_exec(
    cage_hive: Any,
) -> None:
    """The agent's processes re-fork as fast as they can (24 chains, each member forking
    the next and exiting) beside 40 that ignore SIGTERM. Three stops (as the core asks,
    SIGTERM timeout 1 s) each end with the cgroup empty, within the SIGTERM wait and the
    5 s of SIGKILL rounds; meanwhile an exec into another agent's cage is served at once
    (the name lock is per agent) and an exec into the storm's cage either ran in it or was
    refused in one line, never left running."""
    from hive_fixture import wait_until

    figures = []
    for _ in range(3):
        r = cage_hive.priv("start", name=STORM)
        assert r.get("ok") or "already running" in str(r.get("error")), r
        # As the agent's own processes: its pid namespace, uid and cgroup (exec --as-agent).
        storm_ended: list[Any] = []

        def run_storm(storm_ended: list[Any] = storm_ended) -> None:
            storm_ended.append(cage_hive.exec(STORM, "python3", "-c", FORK_CHAINS, timeout=60))

        storm = threading.Thread(target=run_storm, daemon=True)
        storm.start()

        def storm_up(storm_ended: list[Any] = storm_ended) -> bool:
            # An exec that ended before its processes were counted says why (it failed once
            # in CI with no trace: the wait timed out).
            if storm_ended and len(cage_hive.cgroup(STORM).pids()) <= 40:
                ex = storm_ended[0]
                raise AssertionError(f"the storm's exec ended: {ex.returncode} {ex.stdout!r} {ex.stderr!r}")
            return len(cage_hive.cgroup(STORM).pids()) > 40

        try:
            wait_until(storm_up, 30, "the storm up")
        except AssertionError as e:
            pids = cage_hive.cgroup(STORM).pids()
            raise AssertionError(f"{e}; {len(pids)} pids in the cage, exec ended: {storm_ended}") from e
        pids_before = len(cage_hive.cgroup(STORM).pids())
        results: dict[str, Any] = {}

        def stop(results: dict[str, Any] = results) -> None:
            t = time.monotonic()
            results["stop"] = cage_hive.priv("stop", name=STORM, timeout=1)
            results["stop_s"] = time.monotonic() - t

        def exec_storm(results: dict[str, Any] = results) -> None:
            results["exec"] = cage_hive.exec(
                STORM, "/bin/sh", "-c", "sleep 30; echo ran", flags=(), timeout=60
            )

        threads = [threading.Thread(target=stop), threading.Thread(target=exec_storm)]
        for th in threads:
            th.start()
        t = time.monotonic()
        calm = cage_hive.exec(CALM, "hostname", flags=(), timeout=30)
        calm_s = time.monotonic() - t
        for th in [*threads, storm]:
            th.join(60)
        left = cage_hive.cgroup(STORM).pids()
        figures.append((pids_before, round(results["stop_s"], 2), round(calm_s, 2)))
        assert results["stop"].get("ok"), results["stop"]
        assert left == [], left
        assert results["stop_s"] < 1 + 5 + 2, results["stop_s"]
        assert (calm.returncode, calm.stdout.strip()) == (0, CALM), (calm.stdout, calm.stderr)
        assert calm_s < 5, calm_s
        ex = results["exec"]
        assert "ran" not in ex.stdout, (ex.returncode, ex.stdout, ex.stderr)  # killed with the cage
        assert len(ex.stderr.strip().splitlines()) <= 1, ex.stderr
    print(f"fork chains: (pids in the cage, stop s, other agent's exec s): {figures}")


# -- a cage's limit hits on the operator's webhooks ------------------------------------

# The agent's fork bomb at its pids_max (32) for 11 s, with a status text dressed as the
# hive's own line, sent on its socket first. Only inside its cage.
BOMB_CODE = f"""
import json, os, socket, time
if socket.gethostname() != {BOMB!r}:
    raise SystemExit("not in the cage")
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["HIVE_SOCKET"])
fake = "agent {CALM}: out of memory, the kernel killed a process (1 so far) http://evil.example/"
s.sendall(json.dumps({{"cmd": "set_status", "text": fake}}).encode() + b"\\n")
print(s.recv(4096).decode().strip(), flush=True)
end = time.monotonic() + 11
kids = []
while time.monotonic() < end:
    try:
        pid = os.fork()
    except OSError:
        for k in kids:
            os.kill(k, 9)
            os.waitpid(k, 0)
        kids = []
        continue
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    kids.append(pid)
"""


@pytest.mark.attack(
    "notify.flood",
    ref="session 12 limit hits to the webhooks: LimitWatch's NOTE_INTERVAL, hive-written text",
)
def test_a_fork_bomb_at_its_limit_is_one_hive_written_line_on_the_webhook(
    cage_hive: Any, receiver: WebhookReceiver
) -> None:
    """The agent forks into its pids_max of 32 for 11 s (thousands of refused forks,
    read by the core every 5 s: two reads or more that grew) after setting a status text that reads as the hive's line
    about another agent, with a link of its own. The webhook gets one line, the hive's,
    naming this agent and its limit; nothing of the status text."""
    before = len(receiver.hits)
    p = cage_hive.exec(BOMB, "python3", "-c", BOMB_CODE, timeout=60)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert '"ok":true' in p.stdout, p.stdout  # the status text was taken
    refused = cage_hive.cage(BOMB)["pids_refused"]
    deadline = time.monotonic() + 6  # the next poll (5 s) and its delivery
    while len(receiver.hits) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)  # anything more would have come with it
    sent = [b.decode() for _, b in receiver.hits[before:]]
    print(f"fork bomb: {refused} forks refused, {len(sent)} notification(s): {sent}")
    # Other agents' own limit hits may come in the same poll (the fork chains' cage of the
    # test before can reach its 256): this agent's is one line, and no line is the forgery.
    mine = [line for line in sent if line.startswith(f"agent {BOMB}:")]
    assert len(mine) == 1, sent
    assert mine[0].startswith(f"agent {BOMB}: its process limit (32) refused "), sent
    assert not any("evil" in line or line.startswith(f"agent {CALM}:") for line in sent), sent


@pytest.mark.attack(
    "notify.flood", ref="session 12 limit hits to the webhooks: LimitWatch across cgroups made anew"
)
def test_limit_hits_with_the_cgroup_made_anew_each_poll_stay_one_line_a_minute() -> None:
    """Ten minutes of polls (every LIMITS_POLL s) where both counters grow at every read
    and the cage's cgroup is made anew every other read (its counts from 0 again: a
    restart of the cage between two reads), the core's own restart in the middle (a new
    LimitWatch, its first read the baseline): at most one line per counter a minute."""
    told: list[tuple[float, str]] = []
    watch = LimitWatch()
    at, total = 0.0, 0
    while at < 600:
        if at == 300:  # the core restarted: its first read is old news
            watch = LimitWatch()
        total = 0 if int(at / LIMITS_POLL) % 2 else total + 1000
        for counter, _, _ in watch.observe("evil", {"oom_kills": total, "pids_refused": total}, at):
            told.append((at, counter))
        watch.started = True
        at += LIMITS_POLL
    per_minute = {c: [t for t, k in told if k == c] for c in ("oom_kills", "pids_refused")}
    print(f"cgroup made anew every other poll for 600 s: lines told {per_minute}")
    for times in per_minute.values():
        assert (
            all(b - a >= NOTE_INTERVAL for a, b in itertools.pairwise(times)) or len(times) <= 1
        ), times
        assert len(times) <= 600 / NOTE_INTERVAL + 1, times

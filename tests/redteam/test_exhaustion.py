"""Resource exhaustion from inside a cage: processes (threads, a fork loop),
memory (an mmap hog, filling the cage's /tmp), disk (filling the agent's home,
on a hive whose state directory is a small filesystem of its own) and message
floods (the per-agent rate limit). Each is stopped by its limit with the
kernel's or the hive's refusal; the harness survives; the core keeps serving
everyone else meanwhile; and nothing else in the hive changes.

Known limit, stated plainly: there is no disk quota on an agent's home. It lives
on the state directory's filesystem, next to hive.db, so an agent can fill that
filesystem; ``test_filling_home_does_not_break_the_core`` shows what the hive
then does (refuses writes cleanly, keeps serving reads, recovers once space is
free) on a small filesystem made for the purpose, never on the real disk."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HiveProcess, assert_caged, running_hive
from hyperhive.priv.cgroups import is_v2

from .conftest import CLIENT, World, cage_run, changes, others_keep_working, unchanged

pytestmark = pytest.mark.attack('budget.exhaustion', ref='srt resource limits; OpenShell fail-closed limits')

VICTIM = "rtmule"


def cgroup_file(h: HiveProcess, name: str, controller: str, filename: str) -> Path:
    cg = h.cgroup(name)
    return cg.dirs[0] / filename if is_v2() else cg.dirs[0 if controller == "pids" else 1] / filename


def memory_limit_mib(h: HiveProcess, name: str) -> int:
    f = "memory.max" if is_v2() else "memory.limit_in_bytes"
    return int(cgroup_file(h, name, "memory", f).read_text()) >> 20


def oom_kills(h: HiveProcess, name: str) -> int:
    f = "memory.events" if is_v2() else "memory.oom_control"
    for line in cgroup_file(h, name, "memory", f).read_text().splitlines():
        key, value = line.split()
        if key == "oom_kill":
            return int(value)
    raise AssertionError(f"no oom_kill in {f}")


@contextlib.contextmanager
def cage_back_to_baseline(h: HiveProcess, name: str) -> Iterator[None]:
    """Afterwards the cage holds exactly the processes it held before (its init and
    harness, the same pids): the harness survived and nothing was left behind."""
    harness = h.harness_pid(name)
    baseline = set(h.cage_procs(name))
    try:
        yield
    finally:
        deadline = time.monotonic() + 20
        while set(h.cage_procs(name)) - baseline and time.monotonic() < deadline:
            time.sleep(0.1)
        stragglers = set(h.cage_procs(name)) - baseline
        for pid in stragglers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    assert not stragglers, f"processes left in {name}'s cage: {stragglers}"
    assert set(h.cage_procs(name)) == baseline
    assert h.harness_pid(name) == harness
    assert h.agent_status()[name]["running"]


# -- processes ------------------------------------------------------------------------------

THREADS = """
import threading
stop = threading.Event()
threads, error = [], None
while len(threads) < 100000:
    t = threading.Thread(target=stop.wait)
    try:
        t.start()
    except RuntimeError as e:
        error = str(e)
        break
    threads.append(t)
started = len(threads)
stop.set()
for t in threads:
    t.join()
result(started=started, error=error)
"""


def test_thread_bomb_is_stopped_by_the_pids_limit(rt: HiveProcess, world: World) -> None:
    h = rt
    pids_max = int(cgroup_file(h, VICTIM, "pids", "pids.max").read_text())
    in_cage = len(h.cage_procs(VICTIM))
    with unchanged(h), cage_back_to_baseline(h, VICTIM), others_keep_working(h):
        res = cage_run(h, VICTIM, THREADS, timeout=120)
    assert res["error"] == "can't start new thread"
    # Every thread is a task the pids controller counts: the probe (and hive exec's
    # processes) plus its threads stop at pids.max.
    assert pids_max - in_cage - 8 <= res["started"] < pids_max, (res, pids_max)


FORKS = """
import signal
children, error = [], None
while len(children) < 100000:
    try:
        pid = os.fork()
    except OSError as e:
        error = errname(e)
        break
    if pid == 0:
        signal.pause()
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
result(forked=len(children), error=error)
"""


def test_fork_loop_is_stopped_by_the_pids_limit(rt: HiveProcess, world: World) -> None:
    h = rt
    pids_max = int(cgroup_file(h, VICTIM, "pids", "pids.max").read_text())
    in_cage = len(h.cage_procs(VICTIM))
    with unchanged(h), cage_back_to_baseline(h, VICTIM), others_keep_working(h):
        res = cage_run(h, VICTIM, FORKS, timeout=120)
    assert res["error"] == "EAGAIN"
    assert pids_max - in_cage - 8 <= res["forked"] < pids_max, (res, pids_max)


# -- memory -----------------------------------------------------------------------------------

MMAP_HOG = """
import mmap
step = 32 << 20
maps = []
for i in range(64):  # up to 2 GiB, 32 MiB at a time, every page written
    m = mmap.mmap(-1, step, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for off in range(0, step, 4096):
        m[off] = 1
    maps.append(m)
    print(f"mapped {(i + 1) * 32} MiB", flush=True)
print("survived 2 GiB", flush=True)
"""


def test_mmap_hog_is_stopped_by_the_memory_limit(rt: HiveProcess, world: World) -> None:
    h = rt
    limit = memory_limit_mib(h, VICTIM)
    assert limit <= 1024, limit
    kills = oom_kills(h, VICTIM)
    with unchanged(h), cage_back_to_baseline(h, VICTIM), others_keep_working(h):
        proc = h.probe(VICTIM, CLIENT + MMAP_HOG, timeout=120)
    assert_caged(proc)
    assert proc.returncode == 128 + 9, (proc.returncode, proc.stdout[-300:], proc.stderr[-300:])  # SIGKILL: OOM
    assert "survived" not in proc.stdout
    reached = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("mapped ")]
    assert reached and max(reached) <= limit, (reached, limit)
    assert oom_kills(h, VICTIM) > kills


TMP_FILL = """
fd = os.open("/tmp/rt-fill", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
written, error = 0, None
chunk = b"\\1" * (1 << 20)
try:
    while written < (2 << 30):
        written += os.write(fd, chunk)
except OSError as e:
    error = errname(e)
os.close(fd)
size = os.statvfs("/tmp").f_blocks * os.statvfs("/tmp").f_frsize
os.unlink("/tmp/rt-fill")
result(written_mib=written >> 20, error=error, tmp_mib=size >> 20, free_after=os.statvfs("/tmp").f_bavail > 0,
       dev=os.stat("/tmp").st_dev)
"""


def test_filling_the_cage_tmp_stops_at_its_size(rt: HiveProcess, world: World) -> None:
    """The cage's /tmp is its own 256 MiB tmpfs (charged to its memory): full is ENOSPC
    for the agent, not the host's /tmp and not an OOM of its harness."""
    h = rt
    with unchanged(h), cage_back_to_baseline(h, VICTIM), others_keep_working(h):
        res = cage_run(h, VICTIM, TMP_FILL, timeout=120)
    assert res["error"] == "ENOSPC" and res["tmp_mib"] == 256, res
    assert 200 <= res["written_mib"] <= 256, res
    assert res["free_after"] is True
    assert res["dev"] != os.stat("/tmp").st_dev  # the cage's own filesystem, not the host's /tmp


# -- disk: a hive on a small state filesystem -----------------------------------------------

DISK_AGENTS: dict[str, dict[str, Any]] = {
    "rtfiller": {"runtime": "command", "command": ["true"], "peers": ["rtneighbor"]},
    "rtneighbor": {"runtime": "command", "command": ["true"], "peers": ["rtfiller"]},
}


HOME_MIB = 16  # each home is a filesystem of its own, smaller than the state directory's


@pytest.fixture(scope="module")
def small_hive() -> Iterator[HiveProcess]:
    """A hive whose base (state and run directories) is a 48 MiB tmpfs of its own."""
    base = Path(tempfile.mkdtemp(prefix="hvrt", dir="/tmp"))
    os.chmod(base, 0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0755", "rt-small-state", str(base)], check=True)
    try:
        yield from running_hive(HiveProcess(DISK_AGENTS, base=base, sections={"limits": {"disk_mib": HOME_MIB}}))
    finally:
        subprocess.run(["umount", "-l", str(base)], check=True)
        base.rmdir()


FILL_HOME = """
fd = os.open("/home/agent/fill", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
written, error = 0, None
try:
    for size in (1 << 20, 4096, 1):
        try:
            while written < (1 << 30):
                written += os.write(fd, b"\\0" * size)
        except OSError as e:
            error = errname(e)
finally:
    os.close(fd)
result(written_mib=written >> 20, error=error, free=os.statvfs("/home/agent").f_bavail)
"""

WHILE_FULL = """
out = {"whoami": call({"cmd": "whoami"}), "peers": call({"cmd": "peers"}),
       "recv": call({"cmd": "recv", "wait": 0, "max": 10})}
for req in ({"cmd": "send", "to": "rtfiller", "body": "x" * 20000},
            {"cmd": "ask", "to": "operator", "question": "y" * 20000},
            {"cmd": "request_approval", "kind": "custom", "description": "z" * 20000},
            {"cmd": "remind", "in_seconds": 3600, "text": "w" * 20000}):
    out[req["cmd"]] = err(req)
result(**out)
"""

UNFILL = """
os.unlink("/home/agent/fill")
result(sent=call({"cmd": "send", "to": "rtneighbor", "body": "space again"}))
"""


def test_filling_home_does_not_break_the_core(small_hive: HiveProcess) -> None:
    """The home is a filesystem of its own: filling it stops at its size, inside the
    cage, and the hive's state directory (the core's database) keeps its space, so
    every other agent's writes go on as before."""
    h = small_hive
    core = h.core_pid()
    state_free = os.statvfs(h.state_dir).f_bavail
    with others_keep_working(h, other="rtneighbor"):
        filled = cage_run(h, "rtfiller", FILL_HOME, timeout=120)
    assert filled["error"] == "ENOSPC" and filled["free"] == 0, filled
    assert 8 <= filled["written_mib"] <= HOME_MIB, filled
    lost = (state_free - os.statvfs(h.state_dir).f_bavail) * os.statvfs(h.state_dir).f_frsize
    assert lost <= (HOME_MIB + 4) << 20, f"the state directory lost {lost >> 20} MiB"
    res = cage_run(h, "rtneighbor", WHILE_FULL)
    # Reads and writes go on: the database's filesystem is not the one that filled up.
    assert res["whoami"] == {"version": 1, "ok": True, "name": "rtneighbor"}
    assert res["peers"] == {"version": 1, "ok": True, "peers": ["rtfiller"]}
    assert res["recv"]["ok"] is True
    for verb in ("send", "ask", "request_approval", "remind"):
        assert isinstance(res[verb], dict) and res[verb]["ok"] is True, (verb, str(res[verb])[:200])
    assert h.core_pid() == core and h.agent_status()["rtneighbor"]["running"]
    after = cage_run(h, "rtfiller", UNFILL)
    assert after["sent"]["ok"] is True, after
    assert h.core_pid() == core


# -- message floods: the per-agent rate limit ------------------------------------------------

RATE = {"messages_per_second": 2, "message_burst": 5}
FLOOD_AGENTS: dict[str, dict[str, Any]] = {
    "rtflood": {"runtime": "command", "command": ["true"], "peers": ["rtcalm"]},
    "rtcalm": {"runtime": "command", "command": ["true"], "peers": ["rtflood"]},
}
LIMITED = re.compile(
    r"^rate limit: an agent may send, ask or request at most 2/s \(burst 5\); retry in \d+\.\d\d s$")


@pytest.fixture(scope="module")
def limited_hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(FLOOD_AGENTS, sections={"limits": RATE}))


def flood_request(verb: str, to: str, i: int) -> dict[str, Any]:
    return {
        "send": {"cmd": "send", "to": to, "body": f"flood {i}"},
        "ask": {"cmd": "ask", "to": to, "question": f"flood {i}?"},
        "request_approval": {"cmd": "request_approval", "kind": "custom", "description": f"flood {i}"},
    }[verb]


FLOOD = """
t0 = time.monotonic()
replies = []
for i, req in enumerate(P["requests"]):
    c = Conn() if i % 2 else None  # half on fresh connections: the limit is the agent's, not a connection's
    replies.append(c.call(req) if c else call(req))
    if c:
        c.close()
elapsed = time.monotonic() - t0
result(replies=replies, elapsed=elapsed)
"""

CALM = """
result(replies=[call(r) for r in P["requests"]])
"""


@pytest.mark.parametrize("verb", ["send", "ask", "request_approval"])
def test_message_flood_is_rate_limited_per_agent(limited_hive: HiveProcess, verb: str) -> None:
    h = limited_hive
    time.sleep(5 / RATE["messages_per_second"] + 0.2)  # both buckets full again
    n = 30
    with changes(h) as ch, others_keep_working(h, other="rtcalm"):
        res = cage_run(h, "rtflood", FLOOD, requests=[flood_request(verb, "rtcalm", i) for i in range(n)])
        # Meanwhile another agent's own budget is untouched: its whole burst goes through.
        calm = cage_run(h, "rtcalm", CALM, requests=[flood_request(verb, "rtflood", i) for i in range(5)])
    replies = res["replies"]
    accepted = [r for r in replies if r.get("ok")]
    refused = [r for r in replies if not r.get("ok")]
    assert all(r["ok"] for r in replies[:5])
    # The burst, plus what refilled while the flood ran (2/s), and not one more.
    most = 5 + int(res["elapsed"] * RATE["messages_per_second"]) + 1
    assert 5 <= len(accepted) <= most, (len(accepted), res["elapsed"])
    assert all(set(r) == {"version", "ok", "error"} and LIMITED.match(r["error"]) for r in refused), refused[:3]
    assert len(refused) == n - len(accepted) >= n // 2
    assert [r["ok"] for r in calm["replies"]] == [True] * 5
    # Exactly the accepted requests (and rtcalm's five) were stored, nothing of the refused ones.
    stored = len(accepted) + 5
    assert ch.count() == {
        "send": {"messages": (stored, 0)},
        "ask": {"questions": (stored, 0), "messages": (stored, 0)},  # a question is delivered as a message
        "request_approval": {"approvals": (stored, 0)},
    }[verb]
    table = {"send": "messages", "ask": "questions", "request_approval": "approvals"}[verb]
    senders = [r[2] if table == "messages" else r[1] for r in ch.added[table]]
    assert sorted(senders) == sorted(["rtflood"] * len(accepted) + ["rtcalm"] * 5)


def test_rate_limit_refusal_changes_nothing(limited_hive: HiveProcess) -> None:
    """Once the bucket is empty, a refused request stores nothing and publishes nothing;
    the refusal says when to retry, and after that wait one more request goes through.
    Drained and probed in one run in the cage: no process start lets the bucket refill."""
    h = limited_hive
    # The bucket full again (the flood cases before drain it): how much refilled while the
    # cage's script started was all this case had (none when it started fast: a flake).
    time.sleep(5 / RATE["messages_per_second"] + 0.2)
    script = """
    drained, r = 0, {"ok": True}
    while r["ok"] and drained < 100:
        r = call({"cmd": "send", "to": "rtcalm", "body": f"drain {drained}"})
        drained += r["ok"]
    result(drained=drained, refusal=r, replies=[call(q) for q in P["requests"]])
    """
    with changes(h) as ch:
        res = cage_run(h, "rtflood", script, requests=[flood_request(v, "rtcalm", 99) for v in
                                                       ("send", "ask", "request_approval")])
    assert LIMITED.match(res["refusal"]["error"]), res
    assert res["drained"] >= RATE["message_burst"], res
    assert all(not r["ok"] and LIMITED.match(r["error"]) for r in res["replies"]), res
    # Only the drain's accepted sends were stored: nothing of the refused requests.
    assert {t: len(rows) for t, rows in ch.added.items()} == {"messages": res["drained"]}, ch.added
    assert not ch.removed
    wait = float(res["replies"][-1]["error"].rsplit("retry in ", 1)[1].split()[0])
    time.sleep(wait + 0.05)
    again = cage_run(h, "rtflood", CALM, requests=[flood_request("send", "rtcalm", 100)])
    assert again["replies"][0]["ok"] is True, again

"""A cage's limit hits reach the operator (red team round 17: "silent OOM"). hive-priv's
``status`` carries each cage's OOM kills and refused forks as the kernel counts them; the
core reads them, shows them in ``agent_status`` and the dashboard, and tells each growth
once as a line on the agent's ``agent_status`` event (core/limit_hits.py)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hive_fixture import HiveProcess, HiveUnavailable, assert_caged, running_hive, wait_until
from hyperhive.client import Client
from hyperhive.core.limit_hits import NOTE_INTERVAL, LimitWatch, describe
from hyperhive.priv.cgroups import Cgroup, is_v2
from hyperhive.wire import priv as wp
from web_fixture import Web

# -- the counting, alone ---------------------------------------------------------------------


def test_the_first_read_is_the_baseline_and_later_cages_start_from_zero() -> None:
    w = LimitWatch()
    assert w.observe("old", {"oom_kills": 3, "pids_refused": 9}, 0.0) == []  # before the core
    w.started = True
    assert w.observe("old", {"oom_kills": 3, "pids_refused": 9}, 1.0) == []
    assert w.observe("old", {"oom_kills": 5, "pids_refused": 9}, 2.0) == [("oom_kills", 5, 2)]
    assert w.observe("new", {"oom_kills": 1}, 2.0) == [("oom_kills", 1, 1)]  # made since


def test_a_hit_is_told_once_per_interval_with_the_total() -> None:
    w = LimitWatch(started=True)
    assert w.observe("bob", {"pids_refused": 1}, 100.0) == [("pids_refused", 1, 1)]
    assert w.observe("bob", {"pids_refused": 500}, 101.0) == []  # held back, not lost
    later = 100.0 + NOTE_INTERVAL
    assert w.observe("bob", {"pids_refused": 900}, later) == [("pids_refused", 900, 899)]
    assert w.observe("bob", {"pids_refused": 900}, later + NOTE_INTERVAL) == []


def test_a_cgroup_made_anew_counts_from_its_own_zero() -> None:
    w = LimitWatch(started=True)
    assert w.observe("bob", {"oom_kills": 4}, 0.0) == [("oom_kills", 4, 4)]
    w.forget("bob")  # destroyed: its cgroup went
    assert w.observe("bob", {"oom_kills": 1}, 1.0) == [("oom_kills", 1, 1)]
    assert w.observe("bob", {"oom_kills": 0}, 2.0 + NOTE_INTERVAL) == []  # lower: made anew
    assert w.observe("bob", {"oom_kills": 1}, 3.0 + 2 * NOTE_INTERVAL) == [("oom_kills", 1, 1)]


def test_the_lines() -> None:
    assert describe("bob", "oom_kills", 3, 1, 64) == (
        "agent bob: out of memory, the kernel killed a process (3 so far)"
    )
    assert describe("bob", "pids_refused", 7, 7, 64) == (
        "agent bob: its process limit (64) refused 7 forks (7 so far)"
    )


@pytest.mark.parametrize("v2", [False, True])
def test_the_counts_are_read_from_either_hierarchy(tmp_path: Path, v2: bool) -> None:
    if v2:
        (tmp_path / "cgroup.controllers").write_text("pids memory\n")
    cg = Cgroup("bob", "hkey", tmp_path)
    assert cg.limit_hits() == {}  # no cgroup: no counts, not zeros
    pids_dir, memory_dir = (cg.dirs[0], cg.dirs[0]) if v2 else (cg.dirs[0], cg.dirs[1])
    for d in (pids_dir, memory_dir):
        d.mkdir(parents=True, exist_ok=True)
    (pids_dir / "pids.events").write_text("max 12\n")
    if v2:
        (memory_dir / "memory.events").write_text("low 0\nhigh 0\nmax 40\noom 3\noom_kill 2\n")
    else:
        (memory_dir / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cg.limit_hits() == {"oom_kills": 2, "pids_refused": 12}


def test_the_status_row_is_strict() -> None:
    row = wp.CageRow(running=True, pid=5, oom_kills=2, pids_refused=0)
    assert row.reply() == {"running": True, "pid": 5, "oom_kills": 2, "pids_refused": 0}
    with pytest.raises(ValueError):
        wp.CageRow.model_validate({"running": True, "oom_kills": -1})
    with pytest.raises(ValueError):
        wp.CageRow.model_validate({"running": True, "oom_kill": 1})  # a field nobody knows


# -- for real: a cage past its memory and its pids limit -------------------------------------

MEMORY_MIB, PIDS_MAX = 128, 64
AGENT = "lhbob"

MMAP_HOG = """
import mmap
step = 16 << 20
maps = []
for i in range(128):  # up to 2 GiB, every page written
    m = mmap.mmap(-1, step, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for off in range(0, step, 4096):
        m[off] = 1
    maps.append(m)
print("survived", flush=True)
"""

FORKS = """
import signal
children, error = [], None
while len(children) < 10000:
    try:
        pid = os.fork()
    except OSError as e:
        error = e.errno
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


class Troubles:
    """The ``trouble`` lines of ``agent_status`` events on a host.sock subscription."""

    def __init__(self, hive: HiveProcess) -> None:
        self.client = Client(hive.host_sock, timeout=None)
        first = self.client.call("subscribe", kinds=["agent_status"])
        assert first.get("ok"), first
        self.lines: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                reply = self.client.read()
            except (OSError, ValueError, ConnectionError):
                return
            event = reply.get("event") or {}
            if "trouble" in event:
                with self.cond:
                    self.lines.append(event["trouble"])
                    self.cond.notify_all()

    def wait_for(self, pred: Callable[[str], bool], what: str, timeout: float = 60) -> str:
        with self.cond:
            found = self.cond.wait_for(lambda: next((x for x in self.lines if pred(x)), None), timeout)
        assert found, f"no event for {what} within {timeout} s: {self.lines}"
        return str(found)

    def close(self) -> None:
        # The reader wakes first: closing its file while it reads would wait for its lock.
        self.client.sock.shutdown(socket.SHUT_RDWR)
        self.client.close()


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    spec = {"runtime": "command", "command": ["true"], "memory_mib": MEMORY_MIB, "pids_max": PIDS_MAX}
    yield from running_hive(HiveProcess({AGENT: spec}))


def kernel_count(h: HiveProcess, counter: str) -> int:
    return h.cgroup(AGENT).limit_hits()[counter]


def test_out_of_memory_and_refused_forks_reach_the_operator(hive: HiveProcess) -> None:
    h = hive
    troubles = Troubles(h)
    try:
        proc = h.probe(AGENT, MMAP_HOG, timeout=120)
        assert_caged(proc)
        assert proc.returncode == 128 + 9 and "survived" not in proc.stdout, proc.stdout[-300:]
        line = troubles.wait_for(lambda x: "out of memory" in x, "the OOM kill")
        assert re.fullmatch(rf"agent {AGENT}: out of memory, the kernel killed (a process|\d+ processes) "
                            r"\(\d+ so far\)", line), line
        kills = kernel_count(h, "oom_kills")
        assert kills >= 1
        wait_until(lambda: h.agent_status()[AGENT].get("oom_kills") == kills, 30, "oom_kills in agent_status")

        proc = h.probe(AGENT, FORKS, timeout=120)
        assert_caged(proc)
        line = troubles.wait_for(lambda x: "process limit" in x, "the refused fork")
        assert re.fullmatch(rf"agent {AGENT}: its process limit \({PIDS_MAX}\) refused (a fork|\d+ forks) "
                            r"\(\d+ so far\)", line), line
        refused = kernel_count(h, "pids_refused")
        assert refused >= 1
        wait_until(lambda: h.agent_status()[AGENT].get("pids_refused") == refused, 30, "pids_refused")
    finally:
        troubles.close()

    # `hive status --json` and the dashboard's agent row and page show the counts.
    out = subprocess.run([str(Path(__file__).parents[1] / ".venv/bin/hive"), "--run-dir", str(h.run_dir),
                          "status", "--json"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    row = {r["name"]: r for r in json.loads(out.stdout)["agent_statuses"]}[AGENT]
    assert (row["oom_kills"], row["pids_refused"]) == (kills, refused), row
    web = Web(h)
    login = web.login()
    page = web.get(f"/agent/{AGENT}/", login=login).text
    board = web.get("/", login=login).text
    shown = f"out of memory: {kills} killed · process limit: {refused} forks refused"
    assert shown in page and shown in board


def test_a_restarted_core_does_not_tell_old_hits_again(hive: HiveProcess) -> None:
    h = hive
    before = h.agent_status()[AGENT]
    assert before.get("oom_kills") and before.get("pids_refused"), before  # the test above ran
    restart_core(h)
    troubles = Troubles(h)
    try:
        # The first read (the baseline) is done once the counts show again.
        wait_until(lambda: h.agent_status()[AGENT].get("pids_refused") is not None, 30, "the first read")
        proc = h.probe(AGENT, FORKS, timeout=120)
        assert_caged(proc)
        line = troubles.wait_for(lambda x: "process limit" in x, "the refused fork after the restart")
        m = re.search(r"refused (a fork|(\d+) forks) \((\d+) so far\)", line)
        assert m, line
        new, total = int(m.group(2) or 1), int(m.group(3))
        assert new == total - before["pids_refused"], (line, before)  # only what came after
        assert not [x for x in troubles.lines if "out of memory" in x], troubles.lines
    finally:
        troubles.close()


def restart_core(h: HiveProcess) -> None:
    pid = h.core_pid()
    assert pid is not None
    subprocess.run(["kill", "-9", str(pid)], check=True)

    def core_back() -> bool:
        try:
            return h.core_pid() not in (None, pid) and h.host_call("agent_status")["ok"]
        except HiveUnavailable:
            return False

    wait_until(core_back, 30, "hive-core to come back")


def test_a_cage_stopped_over_a_core_restart_does_not_tell_old_hits_on_its_start(hive: HiveProcess) -> None:
    """A stopped cage keeps its cgroup and counts: the restarted core's first read takes
    them as the baseline too, or the next start would tell them as new."""
    h = hive
    assert h.host_call("stop", scope={"agent_names": [AGENT]})["ok"]
    restart_core(h)
    wait_until(lambda: h.agent_status()[AGENT].get("pids_refused") is not None, 30, "the first read")
    before = h.agent_status()[AGENT]
    troubles = Troubles(h)
    try:
        assert h.host_call("start", scope={"agent_names": [AGENT]})["ok"]
        h.wait_running([AGENT])
        proc = h.probe(AGENT, FORKS, timeout=120)
        assert_caged(proc)
        line = troubles.wait_for(lambda x: "process limit" in x, "the refused fork after the start")
        m = re.search(r"refused (a fork|(\d+) forks) \((\d+) so far\)", line)
        assert m, line
        assert int(m.group(2) or 1) == int(m.group(3)) - before["pids_refused"], (line, before)
        assert not [x for x in troubles.lines if "out of memory" in x], troubles.lines
    finally:
        troubles.close()


def test_status_rows_carry_the_counts(hive: HiveProcess) -> None:
    row = hive.cage(AGENT)
    assert row["oom_kills"] == kernel_count(hive, "oom_kills") >= 1
    assert row["pids_refused"] == kernel_count(hive, "pids_refused") >= 1
    wp.CageRow.model_validate(row)
    assert is_v2() or "memory_bytes" in row

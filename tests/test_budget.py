"""The core's budget (hyperhive.core.budget) and the storage quota's bookkeeping
(agent_usage, kept by triggers in hive.db), without cages: the arithmetic, the
refusal to start when the limits are too small (a real hive-core under prlimit),
and the counters against a SUM over the rows after every kind of change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hyperhive.config import ConfigError, HiveConfig, load_config
from hyperhive.core import budget as b
from hyperhive.core.store import Store

DEFAULT = HiveConfig()


def cfg(limits: dict[str, int] | None = None, egress: int | None = None) -> HiveConfig:
    raw: dict[str, dict[str, int]] = {"limits": dict(limits or {})}
    if egress is not None:
        raw["egress"] = {"max_connections": egress}
    return HiveConfig.model_validate(raw)


# Listeners (agent.sock, egress.sock, egress-handover.sock), 2 uids x agent_connections, 6
# per tunnel, one egress connection being refused, and the idle upstream connections kept
# (at most 4, at most e).
@pytest.mark.parametrize(("a", "e", "per_agent"), [
    (32, 16, 3 + 2 * 32 + 6 * 16 + 1 + 4),
    (4, 1, 3 + 2 * 4 + 6 + 1 + 1),
    (100, 64, 3 + 2 * 100 + 6 * 64 + 1 + 4),
])
def test_per_agent_descriptors_add_up(a: int, e: int, per_agent: int) -> None:
    budget = b.plan(cfg({"agent_connections": a}, egress=e), 1 << 20, None)
    assert budget.per_agent_fds == per_agent
    assert budget.total_fds == DEFAULT.limits.max_agents * per_agent + DEFAULT.limits.reserve_fds
    assert budget.per_agent_tasks == 2 * e + b.SPARE_TASKS_PER_AGENT


def test_the_defaults_fit_the_shipped_unit_and_a_20000_hard_limit() -> None:
    unit = (Path(__file__).parent.parent / "deploy/systemd/hive-core.service").read_text()
    nofile = int(unit.split("LimitNOFILE=")[1].split()[0])
    tasks = int(unit.split("TasksMax=")[1].split()[0])
    assert int(unit.split("LimitNPROC=")[1].split()[0]) == tasks
    budget = b.plan(DEFAULT, nofile, tasks)
    assert budget.total_fds <= 20000 and budget.total_tasks <= tasks
    assert budget.line() == (
        "budget: 100 agents x (65 agent.sock + 103 egress) fds + reserve 512 = 17312 <= NOFILE 65536;"
        " 100 agents x 40 tasks + reserve 64 = 4064 <= tasks 8192")
    # systemd's default soft limit holds a handful of agents, not the default hive.
    with pytest.raises(b.BudgetError):
        b.plan(DEFAULT, 1024, tasks)


def test_a_thousand_agents_at_the_least_fit_a_20000_hard_limit() -> None:
    """Issue 17: 1,000 agents with agent_connections = 4 and one tunnel each fit a VM whose
    hard RLIMIT_NOFILE is 20,000 (bench --only scale, tests/test_scale.py)."""
    config = cfg({"max_agents": 1000, "agent_connections": 4}, egress=1)
    assert b.plan(config, 20000, None).total_fds == 1000 * 19 + 512


@pytest.mark.parametrize(("nofile", "fits"), [(17311, False), (17312, True), (1024, False), (65536, True)])
def test_descriptor_budget_boundary(nofile: int, fits: bool) -> None:
    if fits:
        assert b.plan(DEFAULT, nofile, None).nofile == nofile
    else:
        with pytest.raises(b.BudgetError, match=r"^budget: 100 agents x \(65 agent.sock \+ 103 egress\)"
                           r" fds \+ reserve 512 = 17312 > NOFILE \d+; raise LimitNOFILE or lower"):
            b.plan(DEFAULT, nofile, None)


@pytest.mark.parametrize(("tasks", "fits"), [(4063, False), (4064, True), (512, False), (None, True)])
def test_task_budget_boundary(tasks: int | None, fits: bool) -> None:
    if fits:
        b.plan(DEFAULT, 1 << 20, tasks)
    else:
        with pytest.raises(b.BudgetError, match=r"^budget: 100 agents x 40 tasks \+ reserve 64 = 4064 > tasks \d+;"
                           " raise TasksMax and LimitNPROC"):
            b.plan(DEFAULT, 1 << 20, tasks)


def test_cgroup_pids_max_is_the_smallest_up_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    (root / "a" / "b").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("pids\n")
    (root / "a" / "pids.max").write_text("300\n")
    (root / "a" / "b" / "pids.max").write_text("max\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/a/b\n")
    assert b._cgroup_pids_max(proc, root) == 300
    proc.write_text("0::/\n")
    assert b._cgroup_pids_max(proc, root) is None


@pytest.mark.parametrize(("toml", "why"), [
    ("[limits]\nmax_agents = 0\n", "max_agents"),
    ("[limits]\nagent_connections = 1\n", "agent_connections"),
    ("[limits]\nreserve_fds = 10\n", "reserve_fds"),
    ("[limits]\nagent_store_mib = 0\n", "agent_store_mib"),
    ("[limits]\nagent_pending_max = 5\n", "agent_pending_max"),
    ("[limits]\nhistory_keep = 1\n", "history_keep"),
    (("[limits]\nmax_agents = 1\n[agents.a]\nruntime = 'command'\ncommand = ['true']\n"
      "[agents.b]\nruntime = 'command'\ncommand = ['true']\n"), "2 agents declared, more than [limits] max_agents = 1"),
])
def test_bad_limits_are_one_line(tmp_path: Path, toml: str, why: str) -> None:
    path = tmp_path / "hive.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert why in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("nofile", "limits", "refused"), [
    (1024, {}, True),
    (4096, {"max_agents": 20}, False),
    (4096, {"max_agents": 30}, True),
    (2048, {"max_agents": 5, "agent_connections": 64}, False),
])
def test_hive_core_refuses_to_start_beyond_its_nofile(tmp_path: Path, nofile: int, limits: dict[str, int],
                                                      refused: bool) -> None:
    """A real hive-core (sockets only) under a hard NOFILE: it raises its soft limit to the
    hard one, then either logs its budget and serves, or refuses with one line, exit 1."""
    config = tmp_path / "hive.toml"
    config.write_text("[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items()))
    cmd = ["prlimit", f"--nofile=256:{nofile}", sys.executable, "-m", "hyperhive.core", "--config", str(config),
           "--run-dir", str(tmp_path / "run"), "--state-dir", str(tmp_path / "state")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HIVE_LOG_LEVEL="WARNING"))
    try:
        assert proc.stdout is not None and proc.stderr is not None
        if refused:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 1
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("hive-core: budget: ") and f"> NOFILE {nofile};" in lines[0]
            assert not (tmp_path / "run" / "host.sock").exists() and not (tmp_path / "state").exists()
        else:
            first = proc.stderr.readline()
            assert first.startswith("hive-core: budget: ") and f"<= NOFILE {nofile};" in first, first
            assert proc.stdout.readline().startswith("hive-core: ready")
            limits_text = Path(f"/proc/{proc.pid}/limits").read_text()
            soft = next(line for line in limits_text.splitlines() if line.startswith("Max open files")).split()[3]
            assert int(soft) == nofile  # raised from 256 to the hard limit
    finally:
        proc.kill()
        proc.wait()


# -- the storage quota's counters -----------------------------------------------------------


def summed(store: Store, agent: str) -> tuple[int, int]:
    """What agent_usage must say, by a SUM over every row (what the triggers avoid)."""
    q = """SELECT COUNT(*), COALESCE(SUM(b), 0) FROM (
        SELECT length(CAST(body AS BLOB)) + coalesce(length(CAST(options AS BLOB)), 0) AS b FROM messages
            WHERE (CASE WHEN sender = 'hive' THEN recipient ELSE sender END)=:a AND acked_at IS NULL
        UNION ALL SELECT length(CAST(question AS BLOB)) + coalesce(length(CAST(options AS BLOB)), 0)
            FROM questions WHERE asker=:a AND answer IS NULL AND cancelled=0
        UNION ALL SELECT length(CAST(kind AS BLOB)) + length(CAST(description AS BLOB)) + length(CAST(payload AS BLOB))
            FROM approvals WHERE agent=:a AND status='pending'
        UNION ALL SELECT length(CAST(text AS BLOB)) FROM reminders WHERE agent=:a AND delivered_at IS NULL)"""
    n, nbytes = store.db.conn.execute(q, {"a": agent}).fetchone()
    return n, nbytes


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "hive.db")
    s.agents.sync_config({})
    return s


STEPS = ["send", "ask-agent", "ask-operator", "approval", "remind", "ack", "answer", "resolve", "deliver", "delete"]


def test_usage_counters_match_a_sum_after_every_change(store: Store) -> None:
    """Every way a row starts or stops being held, one after another, checked against SUM."""
    from hyperhive.wire.common import AgentSpec

    spec = AgentSpec.model_validate({"runtime": "command", "command": ["true"]})
    store.agents.create("x", spec, None, "operator")
    store.agents.create("y", spec, None, "operator")
    m = store.messages.send("y", "x", "message", "héllo")
    store.messages.send("operator", "x", "message", "to the operator")
    q, _ = store.questions.ask("x", "y", "why?", ["a", "b"])
    qo, _ = store.questions.ask("x", "operator", "may I?", None)
    a = store.approvals.request("x", "custom", "please", {"k": "v" * 100})
    store.reminders.add("x", 0.0, "ping")
    assert store.usage.of("x")[:2] == summed(store, "x") == (7, store.usage.of("x")[1])
    assert store.usage.of("x")[2:] == (1, len("to the operator"))
    store.messages.ack("y", [m.id])
    assert store.usage.of("x")[:2] == summed(store, "x")
    store.questions.answer(q.id, "y", "because")
    assert store.usage.of("x")[:2] == summed(store, "x")
    assert store.usage.of("y")[:2] == summed(store, "y") == (1, len("because"))
    store.approvals.resolve(a.id, "denied", None)
    store.reminders.deliver_due(1.0)
    assert store.usage.of("x")[:2] == summed(store, "x")
    store.agents.delete("x")  # its open question is cancelled; y's answer in x's inbox goes
    assert store.usage.of("x")[:2] == summed(store, "x")
    assert store.usage.of("y")[:2] == summed(store, "y") == (0, 0)
    assert qo.id


def test_messages_to_the_operator_make_room_oldest_first(store: Store) -> None:
    quota = (5, 1000)
    for i in range(12):
        store.messages.send_many([("operator", "x", "message", f"{i:03d}" + "." * 97)], quota=quota)
        assert store.usage.of("x")[0] <= 5 and store.usage.of("x")[1] <= 1000
    kept = [m.body[:3] for m in store.messages.inbox("operator", 0, 100)]
    assert kept == ["007", "008", "009", "010", "011"]
    assert store.usage.of("x")[:2] == summed(store, "x") == (5, 500)


@pytest.mark.parametrize("keep", [10, 50])
def test_egress_log_keeps_the_newest_per_agent(store: Store, keep: int) -> None:
    store.history_keep = keep
    row = {"at": 0.0, "host": "h", "port": 1, "address": None, "allowed": False, "reason": "r",
           "bytes_up": 0, "bytes_down": 0, "closed_at": 0.0}
    for i in range(5 * keep):
        store.egress.log({**row, "agent": "x", "port": i + 1})
        store.egress.log({**row, "agent": "y", "port": i + 1})
        n = store.db.conn.execute("SELECT COUNT(*) FROM egress_log WHERE agent='x'").fetchone()[0]
        assert n <= keep + min(b_every(), keep)
    ports = [r["port"] for r in store.egress.entries("x", 10_000)]
    assert ports[0] == 5 * keep and len(ports) >= keep


def b_every() -> int:
    from hyperhive.core.store import EGRESS_PRUNE_EVERY
    return EGRESS_PRUNE_EVERY


def test_prune_history_keeps_the_newest_of_each_log(store: Store) -> None:
    store.history_keep = 10
    for i in range(40):
        m = store.messages.send("x", "y", "message", f"m{i}")
        store.messages.ack("x", [m.id])
        q, _ = store.questions.ask("x", "operator", f"q{i}", None)
        store.db.conn.execute("UPDATE questions SET cancelled=1 WHERE id=?", (q.id,))
        a = store.approvals.request("x", "custom", f"a{i}", {})
        store.approvals.resolve(a.id, "denied", None)
    store.history.prune("x")
    acked = store.db.conn.execute("SELECT COUNT(*) FROM messages WHERE recipient='x' AND acked_at IS NOT NULL").fetchone()
    assert acked[0] == 10
    assert store.db.conn.execute("SELECT COUNT(*) FROM questions WHERE asker='x'").fetchone()[0] == 10
    assert store.db.conn.execute("SELECT COUNT(*) FROM approvals WHERE agent='x'").fetchone()[0] == 10
    assert store.usage.of("x")[:2] == summed(store, "x")


def test_a_prune_with_nothing_past_keep_commits_nothing(store: Store) -> None:
    """Every agent's logs are pruned every minute, nearly always within ``keep``: that
    must be reads only, not a write transaction per agent (each commit but the message
    lane's makes every known inbox be read again; issue 17's cheap-verb-flood case counts
    commits). One row past ``keep`` is a prune as before."""
    store.history_keep = 3
    ids = []
    for i in range(3):
        m = store.messages.send("x", "y", "message", f"m{i}")
        store.messages.ack("x", [m.id])
        ids.append(m.id)
    before = store.db.commits
    assert store.history.prune("x") == 0
    assert store.history.prune("nobody") == 0
    assert store.db.commits == before
    m = store.messages.send("x", "y", "message", "m3")
    store.messages.ack("x", [m.id])
    before = store.db.commits
    assert store.history.prune("x") == 1
    assert store.db.commits == before + 1
    left = [r[0] for r in store.db.conn.execute("SELECT id FROM messages WHERE recipient='x' ORDER BY id")]
    assert left == [*ids[1:], m.id]

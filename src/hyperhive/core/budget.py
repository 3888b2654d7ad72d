"""hive-core's resource budget: what each agent may cost the core, added up below
the core's own limits, with a reserve kept for the operator.

Every agent costs hive-core file descriptors and threads that the agent decides
to spend: connections to its ``agent.sock`` (one descriptor each, per uid:
the runtime's and the harness's) and egress tunnels (six descriptors each, a
bound: at most five at once while a handover is received, the connection and
up to four descriptors with it, the extras closed at once; six while bytes are
relayed, the client, the upstream and a pipe each way; and two threads). Without a
budget a few agents could use up the core's ``RLIMIT_NOFILE`` (systemd's
default soft limit is 1024) and nobody, the operator included, could connect.

Counted per agent, each a bound the code enforces (nothing is an estimate):

- ``agent.sock``: its listener, and ``agent_connections`` per uid. A connection
  from another uid, or over the cap, is refused in the accept callback itself
  (core/agent_socket.py): its descriptor is closed before the loop does anything
  else, so refusals hold none between loop turns.
- ``egress.sock`` and ``egress-handover.sock``: their listeners, six per tunnel
  (``[egress] max_connections``), ``EGRESS_REFUSING`` connections being refused (403,
  503) by their threads (the proxy accepts no more until one ends: the kernel's
  backlog holds the rest), and the idle upstream connections kept for reuse
  (``egress_pool.pool_size``).

Root's connections are not counted (root is trusted); the operator's surfaces,
the store and priv.sock live in ``reserve_fds``.

The budget is ``max_agents x per-agent cost + reserve <= limit`` for both
descriptors and tasks. When the configured values don't fit, the core refuses
to start with one line saying which numbers to change: clamping would silently
give agents less than the operator configured (fewer agents, fewer tunnels),
which turns up later as puzzling refusals; a unit whose limits don't match its
hive.toml is a deployment error, best seen at once.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

from hyperhive.config import HiveConfig
from hyperhive.core.egress_pool import pool_size

EGRESS_LISTENERS = 2  # egress.sock and egress-handover.sock
UIDS_PER_AGENT = 2  # the runtime's and the harness's; each has its own agent.sock cap
FDS_PER_TUNNEL = 6  # at most 5 at once (a handover's connection + recv_fds' 4), 6 relaying
# (its two sockets and a pipe each way: hyperhive.relay splices)
THREADS_PER_TUNNEL = 2  # one per direction
# Egress connections accepted beyond max_connections whose thread is refusing them (403,
# 503): one descriptor each, at most this many per agent at once (core/egress.py).
EGRESS_REFUSING = 1
# Threads of egress connections being refused, and of a tunnel still ending.
SPARE_TASKS_PER_AGENT = 8
AGENT_SOCK_BACKLOG = 8  # connections the kernel queues on one agent.sock before refusing
RESERVE_TASKS = 64  # main thread, asyncio's default executor (to_thread), uvicorn, a watchdog


class BudgetError(Exception):
    """The configured budget doesn't fit the core's limits; one line."""


@dataclass(frozen=True)
class Budget:
    max_agents: int
    agent_connections: int  # per uid on agent.sock, at once
    egress_connections: int  # per agent, at once
    reserve_fds: int
    nofile: int  # the core's RLIMIT_NOFILE (soft, after raising it to the hard one)
    tasks: int | None  # the core's task limit (cgroup pids.max, RLIMIT_NPROC); None = none

    @property
    def agent_sock_fds(self) -> int:
        return UIDS_PER_AGENT * self.agent_connections + 1

    @property
    def egress_fds(self) -> int:
        e = self.egress_connections
        return FDS_PER_TUNNEL * e + EGRESS_LISTENERS + EGRESS_REFUSING + pool_size(e)

    @property
    def per_agent_fds(self) -> int:
        return self.agent_sock_fds + self.egress_fds

    @property
    def per_agent_tasks(self) -> int:
        return THREADS_PER_TUNNEL * self.egress_connections + SPARE_TASKS_PER_AGENT

    @property
    def total_fds(self) -> int:
        return self.max_agents * self.per_agent_fds + self.reserve_fds

    @property
    def total_tasks(self) -> int:
        return self.max_agents * self.per_agent_tasks + RESERVE_TASKS

    def line(self) -> str:
        limit = "unlimited" if self.tasks is None else str(self.tasks)
        return f"{self._fds()} <= NOFILE {self.nofile}; {self._tasks()} <= tasks {limit}"

    def _fds(self) -> str:
        return (
            f"budget: {self.max_agents} agents x ({self.agent_sock_fds} agent.sock"
            f" + {self.egress_fds} egress) fds"
            f" + reserve {self.reserve_fds} = {self.total_fds}"
        )

    def _tasks(self) -> str:
        return (
            f"{self.max_agents} agents x {self.per_agent_tasks} tasks + reserve {RESERVE_TASKS}"
            f" = {self.total_tasks}"
        )

    def check(self) -> None:
        fix = (
            "raise LimitNOFILE or lower [limits] max_agents, [limits] agent_connections"
            " or [egress] max_connections"
        )
        if self.total_fds > self.nofile:
            raise BudgetError(f"{self._fds()} > NOFILE {self.nofile}; {fix}")
        if self.tasks is not None and self.total_tasks > self.tasks:
            raise BudgetError(
                f"budget: {self._tasks()} > tasks {self.tasks}; raise TasksMax and LimitNPROC"
                " or lower [limits] max_agents or [egress] max_connections"
            )


def plan(config: HiveConfig, nofile: int, tasks: int | None) -> Budget:
    """The budget for ``config`` under these limits; BudgetError if it doesn't fit."""
    budget = Budget(
        max_agents=config.limits.max_agents,
        agent_connections=config.limits.agent_connections,
        egress_connections=config.egress.max_connections,
        reserve_fds=config.limits.reserve_fds,
        nofile=nofile,
        tasks=tasks,
    )
    budget.check()
    return budget


def gateway_connections(max_agents: int) -> int:
    """nginx's worker_connections for ``max_agents``: each agent page the operator has open
    holds a client and an upstream connection (and its SSE stream two more); 1024 at least."""
    return max(1024, 8 * max_agents)


def fit_nofile(config: HiveConfig) -> int:
    """As root (``hive up``, before it starts anything): raise this process's RLIMIT_NOFILE,
    which hive-priv, hive-core and nginx inherit, to what the core's budget for
    ``[limits] max_agents`` needs (with nginx's worker connections twice over), as the
    units' LimitNOFILE does in production. Never lowered; at most fs.nr_open. Returns the
    limit in force."""
    need = plan(config, 1 << 62, None).total_fds + 2 * gateway_connections(config.limits.max_agents)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < need:
        new = min(need, _nr_open())
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, new))
        except (ValueError, OSError):
            pass  # not root: the core's own budget check says what is missing
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (an unprivileged process may);
    return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = _nr_open()
    if soft == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # keep what we have; the budget check below says if it is too little
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _nr_open() if soft == resource.RLIM_INFINITY else soft


def _nr_open() -> int:
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 1 << 20


def task_limit() -> int | None:
    """The most tasks (threads) this process may have: the smaller of its cgroup's
    ``pids.max`` (systemd's TasksMax) and RLIMIT_NPROC; None when neither is set."""
    limits = [n for n in (_cgroup_pids_max(), _nproc()) if n is not None]
    return min(limits) if limits else None


def _nproc() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _cgroup_pids_max(
    proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """pids.max of our cgroup and its ancestors (v2, or v1's pids hierarchy), smallest."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    best: int | None = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
        elif "pids" in controllers.split(","):
            base = root / "pids"
        else:
            continue
        d = base / path.lstrip("/")
        while True:
            try:
                text = (d / "pids.max").read_text().strip()
                if text != "max":
                    best = int(text) if best is None else min(best, int(text))
            except (OSError, ValueError):
                pass
            if d == base or d.parent == d:
                break
            d = d.parent
    return best

"""Many idle cages on one box (issue 17): `--only scale`. N agents (HIVE_BENCH_SCALE,
default 1000; 4 with --quick), each a cage whose harness holds its agent.sock:

  * `hive up` → every harness connected, and the memory the cages hold then;
  * the core's and nginx's descriptors and threads against their limits;
  * message p99 between two agents while all N run;
  * the dashboard's first screen and /api/state, one request at a time, p99;
  * hive-core killed (-9) with all N running → every agent reachable again;
  * then, stopping cages down to 500, 200, 100, 50, 10 and 1 running: at each count the
    cold start of one more cage and the idle memory per cage (`--plot FILE` draws them).

Minutes of work and gigabytes of memory at 1,000: only when named."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cages import PORT, Hive, _latency_between, _login, _until_running  # type: ignore[import-not-found]
from run import Context, Row, Target, percentile  # type: ignore[import-not-found]

from hyperhive.client import HiveUnavailable, priv_call
from hyperhive.core.budget import Budget
from hyperhive.wire.priv import CageLimitHits, CageStatus


def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1)) / 1024  # type: ignore[union-attr]


def _fds_threads(pid: int) -> tuple[int, int, int]:
    """Open descriptors, threads and the soft RLIMIT_NOFILE of ``pid``."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    limits = Path(f"/proc/{pid}/limits").read_text()
    nofile = int(re.search(r"^Max open files\s+(\d+)", limits, re.M).group(1))  # type: ignore[union-attr]
    return fds, threads, nofile


def _reachable(hive: Hive, names: set[str]) -> int:
    """How many of ``names`` the core reports running (its harness connected)."""
    try:
        rows = hive.call("agent_status")["agent_statuses"]
    except (OSError, RuntimeError, ValueError, HiveUnavailable):
        return 0
    return sum(1 for a in rows if a["name"] in names and a.get("running"))


def _get_p99(cookie: str, path: str, n: int) -> tuple[float, float]:
    """p50 and p99 (ms) of ``n`` GETs of ``path`` through the gateway, one at a time."""
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", path, headers={"Cookie": cookie})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: {resp.status}")
        samples.append((time.perf_counter() - t0) * 1000)
    conn.close()
    return percentile(samples, 50), percentile(samples, 99)


def _most_cages(want: int) -> int:
    """``want``, or the most cages (a multiple of 100) hive-core's descriptor budget allows
    under the NOFILE this machine lets us have: `hive up` raises the limit to the budget
    only where it may (CAP_SYS_RESOURCE); a VM's hard limit of 20,000 fits 1,000 agents
    (19 descriptors each, plus a reserve of 512)."""

    def cost(n: int) -> int:  # the toml below: 4 connections per uid, 1 tunnel, reserve 512
        return Budget(n, 4, 1, 512, nofile=0, tasks=None).total_fds

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < cost(want):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (cost(want), cost(want)))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or cost(want) <= hard:
        return want
    most = max(100, (hard - cost(0)) // (cost(1) - cost(0)) // 100 * 100)
    print(
        f"scale: {want} cages need {cost(want)} descriptors in hive-core, the hard NOFILE "
        f"is {hard} and may not be raised here: {most} cages",
        file=sys.stderr,
    )
    return most


SETTLE_BUSY = 0.15  # share of the machine's CPU time busy, over SETTLE_WINDOW, called quiet
SETTLE_WINDOW = 2.0
SETTLE_MAX = 300.0


def _busy(window: float) -> float:
    """The share of all CPUs' time spent busy over the next ``window`` seconds."""

    def times() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    b0, t0 = times()
    time.sleep(window)
    b1, t1 = times()
    return (b1 - b0) / max(1, t1 - t0)


def _settle() -> tuple[float, float]:
    """Wait (up to SETTLE_MAX) for the machine to be quiet: a stopped hive's cages (1,000
    network namespaces and cgroups) may still be going away when the next run starts, and
    a `hive up` timed meanwhile would measure that too. (seconds waited, busy share)."""
    t0 = time.perf_counter()
    busy = _busy(SETTLE_WINDOW)
    while busy > SETTLE_BUSY and time.perf_counter() - t0 < SETTLE_MAX:
        busy = _busy(SETTLE_WINDOW)
    return time.perf_counter() - t0, busy


def bench_scale(ctx: Context) -> list[Row]:
    env = os.environ.get("HIVE_BENCH_SCALE")
    n = 4 if ctx.quick else int(env) if env else _most_cages(1000)
    names = {f"a{i}" for i in range(n)}
    agents = {f"a{i}": {"command": ["true"], "peers": [f"a{(i + 1) % n}"]} for i in range(n)}
    # The least each agent may cost the core (4 connections per uid, one tunnel): the budget
    # that lets N agents fit this machine's descriptors (hive up raises NOFILE to it).
    toml = (
        f"[limits]\nmax_agents = {n}\nmessages_per_second = 0\nagent_connections = 4\n\n"
        "[egress]\nmax_connections = 1\n"
    )
    hive = Hive(agents, toml)
    sect = f"scale: {n} cages"
    rows: list[Row] = []
    waited, busy = _settle()
    print(f"scale: waited {waited:.0f} s for a quiet machine ({busy:.0%} busy)", file=sys.stderr)
    try:
        t0 = time.perf_counter()
        hive.start(timeout=1800)
        hive.wait_running(names, timeout=1800)
        up = time.perf_counter() - t0
        rows.append(
            Row(
                sect,
                "hive up → every harness connected",
                up,
                "s",
                Target("<=", 60.0) if n >= 1000 else None,
                f"{n} cages; machine {busy:.0%} busy before (waited {waited:.0f} s)",
            )
        )
        time.sleep(3)
        status = priv_call(str(hive.run_dir / "priv.sock"), CageStatus())
        mem = [c.get("memory_bytes", 0) / 2**20 for c in status["cages"].values()]
        rows.append(
            Row(
                sect,
                "idle memory per cage",
                sum(mem) / max(1, len(mem)),
                "MiB",
                Target("<=", 10.0),
                f"mean of {len(mem)}; {sum(mem) / 1024:.1f} GiB in all",
            )
        )
        (core,) = _pids(f"hyperhive.core --run-dir {hive.run_dir}")
        fds, threads, nofile = _fds_threads(core)
        rows.append(
            Row(
                sect,
                "hive-core descriptors",
                fds,
                "fds",
                Target("<=", nofile),
                f"{threads} threads; NOFILE {nofile}; RSS {_rss_mib(core):.0f} MiB",
            )
        )
        conf = (hive.run_dir / "gateway" / "nginx.conf").read_text()
        wc = int(re.search(r"worker_connections\s+(\d+)", conf).group(1))  # type: ignore[union-attr]
        # The master's title names the config; its workers' ("nginx: worker process") don't,
        # and they hold the connections: the master and its children.
        nginx = _pids(f"nginx: master .*{hive.run_dir}/gateway")
        nginx += [w for m in nginx for w in _children(m)]
        worst = max((_fds_threads(p) for p in nginx), default=(0, 0, 0))
        rows.append(
            Row(
                sect,
                "nginx descriptors (busiest)",
                worst[0],
                "fds",
                Target("<=", wc),
                f"worker_connections {wc}; NOFILE {worst[2]};"
                f" RSS {max(map(_rss_mib, nginx), default=0):.0f} MiB",
            )
        )
        # The core's limits poll (every 5 s, core/limit_hits.py): one limit_hits request
        # for every cage; hive-priv's `status` beside it, what the poll asked until
        # session 13 (and what a restarted core still asks once).
        every = sorted(names)
        for label, req in (
            ("limits poll (limit_hits, every cage)", CageLimitHits(names=every)),
            ("status of every cage", CageStatus(names=every)),
        ):
            took = []
            for _ in range(ctx.n(7, 2)):
                t1 = time.perf_counter()
                priv_call(str(hive.run_dir / "priv.sock"), req)
                took.append((time.perf_counter() - t1) * 1e3)
            rows.append(Row(sect, label, percentile(took, 50), "ms", note=f"median of {len(took)}"))
        for name in ("a0", "a1"):  # the bench reads their inboxes itself
            hive.call("set_paused", name=name, paused=True)
        lat = _latency_between(hive, "a0", "a1", ctx.n(500, 20))
        rows.append(
            Row(
                sect,
                "message p99",
                percentile(lat, 99),
                "ms",
                Target("<=", 10.0),
                f"p50 {percentile(lat, 50):.2f} ms, {len(lat)} messages",
            )
        )
        cookie, _ = _login(hive)
        for path, what in (("/", "dashboard first screen"), ("/api/state", "GET /api/state")):
            p50, p99 = _get_p99(cookie, path, ctx.n(50, 5))
            rows.append(
                Row(
                    sect,
                    f"{what} p99",
                    p99,
                    "ms",
                    Target("<=", 100.0),
                    f"p50 {p50:.1f} ms, one at a time",
                )
            )
        # hive-core killed with every cage running: `hive up` starts it again, and each
        # harness reconnects on its own (the sockets come back in the same directories).
        os.kill(core, signal.SIGKILL)
        t0 = time.perf_counter()
        deadline = t0 + 300
        while _reachable(hive, names) < n and time.perf_counter() < deadline:
            # Not faster: at 1,000 agents each agent_status costs the restarting core
            # ~10 ms of its one loop, which polling every 50 ms showed in the figure.
            time.sleep(0.2)
        back = time.perf_counter() - t0
        got = _reachable(hive, names)
        rows.append(
            Row(
                sect,
                "core restart → every agent reachable",
                back,
                "s",
                Target("<=", 5.0),
                f"{got}/{n} reachable; kill -9 of hive-core",
            )
        )
        points = _sweep(hive, n, ctx.n(20, 2))
    finally:
        hive.stop()
    for p in points:
        note = (
            f"p99 {p.start_p99:.0f} ms of {p.starts}; idle {p.mem_mib:.1f} MiB/cage;"
            f" load {p.load:.1f}"
        )
        rows.append(Row(sect, f"cold start p50, {p.running} running", p.start_p50, "ms", note=note))
    if ctx.plot is not None:
        from plot import plot_scale  # type: ignore[import-not-found]

        loads = [p.load for p in points]
        title = (
            f"hyperhive, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}: one cage started"
            f" among N idle\n(load average {min(loads):.1f} to {max(loads):.1f} meanwhile)"
        )
        plot_scale(points, ctx.plot, title=title)
        print(f"scale: wrote {ctx.plot}", file=sys.stderr)
    return rows


@dataclass
class Point:
    running: int  # cages running while one more starts (that one included)
    start_p50: float  # ms, start request → harness connected
    start_p99: float
    starts: int
    mem_mib: float  # mean cgroup memory of the running cages, idle
    load: float  # the 1-minute load average then (other work on the machine shows here)


def _sweep(hive: Hive, n: int, starts: int) -> list[Point]:
    """From all ``n`` running down to 1: at each count, ``starts`` cold starts of one cage
    (a0, stopped and started again, the others idle) and the memory per idle cage. Going
    down costs stops only: going up would be a second `hive up`'s worth of starts."""
    # Counts a third apart or more, so a log axis shows each (600: 1, 10, 30, 100, 300, 600).
    counts = sorted({c for c in (1, 10, 30, 100, 300, 1000) if c * 1.5 <= n} | {n}, reverse=True)
    running = [f"a{i}" for i in range(n)]
    points = []
    time.sleep(5)  # after the core's restart: the harnesses' reconnects settle
    for count in counts:
        extra, running = running[count:], running[:count]
        for k in range(0, len(extra), 20):  # 20 a request: within the client's 30 s timeout
            hive.call("stop", scope={"agent_names": extra[k : k + 20]})
        hive.wait_running(set(running), timeout=300)
        ms = []
        for _ in range(starts):
            hive.call("stop", scope={"agent_names": ["a0"]})
            ms.append(_until_running(hive, "a0", timeout=120) * 1000)
        time.sleep(2)  # idle: the started cage's harness settles
        status = priv_call(str(hive.run_dir / "priv.sock"), CageStatus(names=running))
        mem = [c["memory_bytes"] / 2**20 for c in status["cages"].values() if "memory_bytes" in c]
        points.append(
            Point(
                count,
                percentile(ms, 50),
                percentile(ms, 99),
                len(ms),
                sum(mem) / max(1, len(mem)),
                os.getloadavg()[0],
            )
        )
        p = points[-1]
        print(
            f"scale: {count} running: cold start p50 {p.start_p50:.0f} ms, "
            f"p99 {p.start_p99:.0f} ms; {p.mem_mib:.1f} MiB/cage; load {p.load:.1f}",
            file=sys.stderr,
        )
    return points[::-1]


SCALE_BENCHMARKS = [bench_scale]

"""Cage and turn benchmarks (issues: cages; agents that work). Each starts a
whole hive with `hive up` (root: real cages) in a temp dir of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from run import ROOT, Context, Row, Target, percentile  # type: ignore[import-not-found]

sys.path.insert(0, str(ROOT / "src"))
from hyperhive.client import Client, priv_call
from hyperhive.priv.cgroups import hive_key, remove_hive
from hyperhive.wire.priv import CageStatus

HIVE = str(Path(sys.executable).parent / "hive")


def _free_port() -> int:
    """A port free now: other hives (another bench, the tests) may share this machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT = int(os.environ.get("HIVE_BENCH_PORT") or _free_port())
REPLY_AT_ONCE = (
    "import json,os,socket,sys; m=json.load(sys.stdin); s=socket.socket(socket.AF_UNIX);"
    "s.connect(os.environ['HIVE_SOCKET']);"
    "s.sendall(json.dumps({'cmd':'send','to':'operator','body':'re %d' % m['id']})"
    ".encode()+b'\\n');"
    "s.recv(999)"
)


class Hive:
    """`hive up` in a temp dir readable by hive-core."""

    def __init__(self, agents: dict[str, dict[str, Any]], toml: str = "") -> None:
        self.base = Path(tempfile.mkdtemp(prefix="hive-bench-cage-", dir="/tmp"))
        os.chmod(self.base, 0o755)
        self.run_dir, self.state_dir = self.base / "run", self.base / "state"
        lines = [toml] if toml else []  # other tables (limits, egress) first
        for name, spec in agents.items():
            lines.append(f"[agents.{name}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in spec.items()]
        (self.base / "hive.toml").write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host_sock(self) -> Path:
        return self.run_dir / "host.sock"

    def start(self, timeout: float = 120) -> None:
        self.proc = subprocess.Popen(
            [
                HIVE,
                "--run-dir",
                str(self.run_dir),
                "up",
                "--config",
                str(self.base / "hive.toml"),
                "--state-dir",
                str(self.state_dir),
                "--listen",
                f"127.0.0.1:{PORT}",
            ],
            stdout=subprocess.PIPE,
            stderr=open(self.base / "up.log", "wb"),  # noqa: SIM115 (the hive's log, for its life)
            stdin=subprocess.DEVNULL,
            env={"HIVE_LOG_LEVEL": "WARNING", **os.environ},
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            if line.startswith(b"hive: ready"):
                return
            if time.monotonic() > deadline:
                break
        log = (self.base / "up.log").read_text(errors="replace").splitlines()
        why = [ln for ln in log if " INFO " not in ln][-20:] or log[-20:]  # not the stops
        raise RuntimeError("hive up did not get ready: " + "\n".join(why)[-3000:])

    def call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        with Client(self.host_sock) as c:
            reply = c.call(cmd, **fields)
        if not reply.get("ok"):
            raise RuntimeError(f"{cmd}: {reply.get('error')}")
        return reply

    def wait_running(self, names: set[str], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = {a["name"]: a for a in self.call("agent_status")["agent_statuses"]}
            if all(rows.get(n, {}).get("running") for n in names):
                return
            time.sleep(0.2)
        raise RuntimeError("agents did not all start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        key = hive_key(self.state_dir)  # while the path resolves as the hive's did
        subprocess.run(["rm", "-rf", str(self.base)], check=False)
        # Its cages' cgroups: nothing else would remove them once the state dir is gone
        # (a run at 1,000 left 1,000 memory cgroups; see cgroups.remove_hive).
        remove_hive(key)


def _until_running(hive: Hive, name: str, timeout: float = 30) -> float:
    """Seconds from a `start` request to the agent's harness being connected, via events."""
    with Client(hive.host_sock, timeout=timeout) as sub:
        first = sub.call("subscribe_agent_status")
        assert first.get("ok"), first
        t0 = time.perf_counter()
        hive.call("start", scope={"agent_names": [name]})
        while True:  # hyperhive's feed: one agent_statuses row per change
            for agent in sub.read().get("agent_statuses", []):
                if agent.get("name") == name and agent.get("running"):
                    return time.perf_counter() - t0


def bench_cage_start(ctx: Context) -> list[Row]:
    """Cold start (start request → harness connected) and idle memory per cage."""
    hive = Hive({"solo": {"command": ["true"]}})
    try:
        hive.start()
        hive.wait_running({"solo"})
        samples = []
        for _ in range(ctx.n(40, 3)):
            hive.call("stop", scope={"agent_names": ["solo"]})
            samples.append(_until_running(hive, "solo"))
        time.sleep(ctx.n(2.0, 0.5))  # idle
        status = priv_call(str(hive.run_dir / "priv.sock"), CageStatus(names=["solo"]))
        mem = status["cages"]["solo"].get("memory_bytes", 0) / 2**20
    finally:
        hive.stop()
    ms = [s * 1000 for s in samples]
    return [
        Row(
            "cages",
            "cold start p50",
            percentile(ms, 50),
            "ms",
            Target("<=", 60),
            f"{len(ms)} starts",
        ),
        Row(
            "cages",
            "cold start p99",
            percentile(ms, 99),
            "ms",
            Target("<=", 100),
            f"{len(ms)} starts",
        ),
        Row("cages", "idle memory per cage", mem, "MiB", Target("<=", 10), "cgroup memory usage"),
    ]


def _latency_between(hive: Hive, a: str, b: str, n: int) -> list[float]:
    ca, cb = (
        Client(hive.run_dir / "agents" / a / "agent.sock"),
        Client(hive.run_dir / "agents" / b / "agent.sock"),
    )
    out = []
    try:
        for i in range(n):
            cb.send_raw(b'{"cmd":"recv","wait":10,"max":1}\n')
            time.sleep(0.0005)  # the recv is parked in the core
            t0 = time.perf_counter()
            ca.call("send", to=b, body=str(i))
            got = cb.read()
            out.append((time.perf_counter() - t0) * 1000)
            cb.call("ack", ids=[m["id"] for m in got["messages"]])
    finally:
        ca.close()
        cb.close()
    return out


def bench_density(ctx: Context) -> list[Row]:
    """100 cages on this machine: total memory, and message p99 among them."""
    n = ctx.n(100, 6)
    agents = {f"d{i}": {"command": ["true"], "peers": [f"d{(i + 1) % n}"]} for i in range(n)}
    hive = Hive(agents)
    try:
        t0 = time.perf_counter()
        hive.start(timeout=600)
        hive.wait_running(set(agents), timeout=600)
        started = time.perf_counter() - t0
        time.sleep(ctx.n(3.0, 0.5))
        for name in ("d0", "d1"):  # the bench reads their inboxes itself: keep their harnesses out
            hive.call("set_paused", name=name, paused=True)
        status = priv_call(str(hive.run_dir / "priv.sock"), CageStatus())
        cage_mem = sum(c.get("memory_bytes", 0) for c in status["cages"].values()) / 2**20
        lat = _latency_between(hive, "d0", "d1", ctx.n(1000, 50))
        gateway_rows = _gateway(hive, ctx)
    finally:
        hive.stop()
    per_cage = f"{cage_mem / n:.1f} MiB per cage"
    return [
        *gateway_rows,
        Row(
            "density", f"{n} cages running", started, "s", None, "hive up → all harnesses connected"
        ),
        Row("density", "total cage memory", cage_mem, "MiB", None, per_cage),
        Row(
            "density",
            "message p50 under load",
            percentile(lat, 50),
            "ms",
            None,
            f"{len(lat)} messages",
        ),
        Row(
            "density",
            "message p99 under load",
            percentile(lat, 99),
            "ms",
            Target("<=", 10),
            f"{n} cages",
        ),
    ]


def _login(hive: Hive) -> tuple[str, str]:
    """A session cookie and its CSRF token, through the gateway."""
    import http.client

    token = (hive.state_dir / "operator.token").read_text().strip()
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=10)
    conn.request("GET", f"/login?token={token}")
    resp = conn.getresponse()
    resp.read()
    cookie = resp.getheader("set-cookie", "").split(";")[0]
    conn.request("GET", "/", headers={"Cookie": cookie})
    page = conn.getresponse().read().decode()
    csrf = page.split('name="csrf-token" content="')[1].split('"')[0]
    return cookie, csrf


def _wrk(path: str, cookie: str, seconds: int) -> tuple[float, float]:
    """Requests/s and p99 (ms) from wrk, 2 threads, 32 connections."""
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            "-c32",
            f"-d{seconds}s",
            "--latency",
            "-H",
            f"Cookie: {cookie}",
            f"http://127.0.0.1:{PORT}{path}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(out.split("Requests/sec:")[1].split()[0])
    p99 = out.split(" 99%")[1].split()[0]
    unit = (
        1000.0 if p99.endswith("s") and not p99.endswith("ms") and not p99.endswith("us") else 1.0
    )
    value = float(p99.rstrip("msu"))
    if p99.endswith("us"):
        value /= 1000
    return rps, value * unit


def _gateway(hive: Hive, ctx: Context) -> list[Row]:
    """GET /api/state through the gateway; ask → dashboard; answer → the agent's recv."""
    import http.client

    rows: list[Row] = []
    cookie, csrf = _login(hive)
    rps, p99 = _wrk("/api/state", cookie, ctx.n(10, 2))
    rows += [
        Row("gateway", "GET /api/state", rps, "req/s", Target(">=", 1000), "100 agents, wrk 2×32"),
        Row("gateway", "GET /api/state p99", p99, "ms", None, ""),
    ]
    stream = http.client.HTTPConnection("127.0.0.1", PORT, timeout=10)
    stream.request("GET", "/api/dashboard/stream", headers={"Cookie": cookie})
    sse = stream.getresponse()
    agent = Client(hive.run_dir / "agents" / "d0" / "agent.sock")
    asks, answers = [], []
    try:
        for i in range(ctx.n(50, 5)):
            t0 = time.perf_counter()
            qid = agent.call("ask", to="operator", question=f"q{i}")["id"]
            while True:  # the event on the open dashboard's stream …
                line = sse.readline()
                if (
                    line.startswith(b"data:")
                    and json.loads(line[5:]).get("question", {}).get("id") == qid
                ):
                    break
            conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=10)
            conn.request(
                "GET", "/api/state", headers={"Cookie": cookie}
            )  # … and the redraw's fetch
            conn.getresponse().read()
            asks.append((time.perf_counter() - t0) * 1000)
            agent.send_raw(b'{"cmd":"recv","wait":10}\n')
            time.sleep(0.001)
            t1 = time.perf_counter()
            conn.request(
                "POST",
                f"/answer-question/{qid}",
                body=f"answer=a{i}",
                headers={
                    "Cookie": cookie,
                    "X-CSRF-Token": csrf,
                    "Origin": f"http://127.0.0.1:{PORT}",
                    "Content-Type": "application/x-www-form-urlencoded",
                    "Accept": "application/json",
                },
            )
            conn.getresponse().read()
            got = agent.read()
            answers.append((time.perf_counter() - t1) * 1000)
            agent.call("ack", ids=[m["id"] for m in got["messages"]])
            conn.close()
    finally:
        agent.close()
        stream.close()
    rows += [
        Row(
            "gateway",
            "ask → open dashboard p99",
            percentile(asks, 99),
            "ms",
            Target("<=", 100),
            f"p50 {percentile(asks, 50):.1f} ms; SSE event + /api/state",
        ),
        Row(
            "gateway",
            "answer → agent recv p99",
            percentile(answers, 99),
            "ms",
            Target("<=", 100),
            f"p50 {percentile(answers, 50):.1f} ms; POST /answer-question",
        ),
    ]
    return rows


def bench_turn_overhead(ctx: Context) -> list[Row]:
    """Operator `send` → a command runtime that replies at once → the reply in the
    operator's inbox, beside the bare cost of running that command in the cage."""
    hive = Hive({"echo": {"command": ["python3", "-c", REPLY_AT_ONCE]}})
    try:
        hive.start()
        hive.wait_running({"echo"})
        turns = []
        last = max([m["id"] for m in hive.call("inbox")["messages"]], default=0)
        with Client(hive.host_sock, timeout=30) as sub:
            sub.call("subscribe", kinds=["message"])
            for _ in range(ctx.n(50, 5)):
                t0 = time.perf_counter()
                hive.call("send", to="echo", body="ping")
                while True:
                    msg = sub.read().get("event", {}).get("message", {})
                    if msg.get("to") == "operator" and msg.get("id", 0) > last:
                        last = msg["id"]
                        break
                turns.append((time.perf_counter() - t0) * 1000)
        bare_prog = (
            "import subprocess,time,json; ts=[]\n"
            f"for i in range({ctx.n(50, 5)}):\n"
            f"    t=time.perf_counter(); subprocess.run(['python3','-c',{REPLY_AT_ONCE!r}],"
            " input=json.dumps({'id':i}).encode()); "
            "ts.append((time.perf_counter()-t)*1000)\n"
            "print(json.dumps(ts))"
        )
        out = subprocess.run(
            [
                HIVE,
                "--run-dir",
                str(hive.run_dir),
                "exec",
                "echo",
                "--",
                "python3",
                "-c",
                bare_prog,
            ],
            capture_output=True,
            check=True,
            timeout=300,
        )
        bare = json.loads(out.stdout)
    finally:
        hive.stop()
    p50_turn, p50_bare = percentile(turns, 50), percentile(bare, 50)
    return [
        Row("turns", "send → reply in inbox p50", p50_turn, "ms", None, f"{len(turns)} turns"),
        Row("turns", "send → reply in inbox p99", percentile(turns, 99), "ms", None, ""),
        Row(
            "turns",
            "bare command in the cage p50",
            p50_bare,
            "ms",
            None,
            "same command, run in the cage",
        ),
        Row(
            "turns",
            "hive overhead p50",
            p50_turn - p50_bare,
            "ms",
            Target("<=", 20),
            "turn p50 − bare p50",
        ),
    ]


CAGE_BENCHMARKS = [bench_cage_start, bench_turn_overhead, bench_density]

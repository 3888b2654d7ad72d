"""Test helpers: the ``hive-core`` subprocess handle (``CoreProcess``) and
assertion helpers shared by the test modules. Fixtures are in conftest.py."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from hyperhive.client import Client

REPO = Path(__file__).resolve().parent.parent
HIVE_CORE = REPO / ".venv" / "bin" / "hive-core"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0

DEFAULT_AGENTS: dict[str, dict[str, Any]] = {
    "alice": {"runtime": "command", "command": ["true"], "peers": ["bob"]},
    "bob": {"runtime": "command", "command": ["true"], "peers": ["alice", "carol"]},
    "carol": {"runtime": "command", "command": ["true"]},
}


def _toml_value(value: Any) -> str:
    # JSON strings, numbers, lists and booleans are valid TOML for the values we use;
    # a dict becomes an inline table.
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):  # inline tables
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def render_toml(agents: dict[str, dict[str, Any]], hive: dict[str, Any] | None = None,
                sections: dict[str, dict[str, Any]] | None = None) -> str:
    """hive.toml for ``agents``; ``sections`` adds tables such as ``limits`` or ``egress``."""
    lines: list[str] = []
    for table, values in {**({"hive": hive} if hive else {}), **(sections or {})}.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    for name, spec in agents.items():
        lines.append(f"[agents.{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in spec.items()]
        lines.append("")
    return "\n".join(lines)


class CoreProcess:
    """A ``hive-core`` subprocess and helpers to talk to it.

    The run dir is a short directory directly under /tmp (unix socket paths are
    limited to 108 bytes, and a process running as another uid must be able to
    reach host.sock); config, state and the core's log live under ``base``.
    """

    def __init__(
        self,
        base: Path,
        agents: dict[str, dict[str, Any]] | None = None,
        *,
        hive: dict[str, Any] | None = None,
        state_dir: Path | None = None,
        extra_args: list[str] | None = None,
        sections: dict[str, dict[str, Any]] | None = None,
        wrap: list[str] | None = None,
    ) -> None:
        self.base = base
        self.wrap = list(wrap or [])  # e.g. ["ip", "netns", "exec", NS]: run the core there
        self.ready_timeout = READY_TIMEOUT
        self.config_path = base / "hive.toml"
        self.config_path.write_text(
            render_toml(DEFAULT_AGENTS if agents is None else agents, hive, sections)
        )
        self.state_dir = state_dir if state_dir is not None else base / "state"
        self.run_dir = Path(tempfile.mkdtemp(prefix="hcore-", dir="/tmp"))
        self.log_path = base / "core.log"
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout_lines: list[str] = []
        self._clients: list[Client] = []
        self.starts = 0

    # -- paths -----------------------------------------------------------------

    @property
    def host_sock(self) -> Path:
        return self.run_dir / "host.sock"

    def agent_sock(self, name: str) -> Path:
        return self.run_dir / "agents" / name / "agent.sock"

    # -- process -----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def start(self) -> None:
        assert not self.running, "hive-core is already running"
        cmd = [
            *self.wrap, str(HIVE_CORE), "--config", str(self.config_path),
            "--run-dir", str(self.run_dir), "--state-dir", str(self.state_dir), *self.extra_args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, cwd=self.base,
            )
        finally:
            log.close()
        ready = threading.Event()
        proc = self.proc

        def pump() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:  # keep draining so the child never blocks on stdout
                line = raw.decode(errors="replace").rstrip("\n")
                self.stdout_lines.append(line)
                if line.startswith("hive-core: ready"):
                    ready.set()
            ready.set()  # EOF: the process ended; let start() notice

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(self.ready_timeout) or proc.poll() is not None:
            rc = proc.poll()
            if rc is None:
                proc.kill()
                proc.wait()
            raise AssertionError(
                f"hive-core did not become ready within {self.ready_timeout}s (exit code {rc})\n"
                f"stdout: {self.stdout_lines}\nlog:\n{self.log_tail()}"
            )
        self.starts += 1

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        self.close_clients()
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"hive-core ignored SIGTERM for {STOP_TIMEOUT}s\n{self.log_tail()}") from None
        return rc

    def stop_clean(self) -> None:
        rc = self.stop()
        assert rc == 0, f"hive-core exited with {rc}\n{self.log_tail()}"

    def restart(self) -> None:
        self.stop_clean()
        self.start()

    def kill9(self) -> None:
        self.close_clients()
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(STOP_TIMEOUT) == -signal.SIGKILL

    # -- clients -----------------------------------------------------------------

    def _track(self, client: Client) -> Client:
        self._clients.append(client)
        return client

    def agent(self, name: str, timeout: float = 30.0) -> Client:
        """A client on ``name``'s agent.sock: whatever it sends, it speaks as ``name``."""
        return self._track(Client(self.agent_sock(name), timeout=timeout))

    def host(self, timeout: float = 30.0) -> Client:
        return self._track(Client(self.host_sock, timeout=timeout))

    def host_call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        with Client(self.host_sock) as c:
            return c.call(cmd, **fields)

    def agent_call(self, name: str, cmd: str, **fields: Any) -> dict[str, Any]:
        with Client(self.agent_sock(name)) as c:
            return c.call(cmd, **fields)

    def close_clients(self) -> None:
        for c in self._clients:
            try:
                c.close()
            except OSError:
                pass
        self._clients.clear()

    # -- state snapshots -----------------------------------------------------------

    def status(self, name: str) -> dict[str, Any]:
        rows = self.host_call("agent_status")["agent_statuses"]
        matching = [r for r in rows if r["name"] == name]
        assert len(matching) == 1, rows
        return matching[0]

    def cleanup(self) -> None:
        self.close_clients()
        shutil.rmtree(self.run_dir, ignore_errors=True)




def assert_ok(resp: dict[str, Any]) -> dict[str, Any]:
    assert resp.get("version") == 1, resp
    assert resp.get("ok") is True, resp
    return resp


def assert_refused(resp: dict[str, Any], *needles: str) -> str:
    """A well-formed one-line refusal that mentions every needle (case-insensitive)."""
    assert resp.get("version") == 1, resp
    assert resp.get("ok") is False, resp
    err = resp.get("error")
    assert isinstance(err, str) and err, resp
    assert "\n" not in err and "\r" not in err, resp
    for needle in needles:
        assert needle.lower() in err.lower(), (needle, err)
    return err


def strict_loads(line: bytes) -> Any:
    """Parse a response line as strict JSON (no NaN / Infinity)."""

    def reject(name: str) -> Any:
        raise ValueError(f"response contains non-JSON constant {name}")

    return json.loads(line, parse_constant=reject)


def read_line(client: Client) -> bytes:
    line = client._file.readline()
    if not line:
        raise ConnectionError("connection closed")
    return line


def no_nulls(value: Any, path: str = "$") -> None:
    """Absent optional fields are left out: no ``null`` anywhere in a response."""
    assert value is not None, f"null at {path}"
    if isinstance(value, dict):
        for k, v in value.items():
            no_nulls(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            no_nulls(v, f"{path}[{i}]")


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy (for state with no event to await)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


RFC3339_UTC = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$"


def wire_time(value: Any) -> float:
    """A wire timestamp (RFC 3339 UTC, to the second, e.g. "2026-09-07T12:34:56Z") as
    unix seconds; fails on anything else (a float included)."""
    import re
    from datetime import UTC, datetime

    assert isinstance(value, str) and re.match(RFC3339_UTC, value), f"not RFC 3339 UTC: {value!r}"
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def quota_usage(core: CoreProcess, agent: str) -> tuple[int, int]:
    """What ``agent`` holds in its storage quota on ``core``'s host (rows, bytes)."""
    db = sqlite3.connect(f"file:{core.state_dir / 'hive.db'}?mode=ro", uri=True, timeout=10)
    try:
        row = db.execute("SELECT pending, bytes FROM agent_usage WHERE agent=?", (agent,)).fetchone()
        return (0, 0) if row is None else (row[0], row[1])
    finally:
        db.close()


def store_at_version(path: Path, version: int) -> None:
    """A store at ``path`` made by the first ``version`` migrations only: an older hive's
    database, for the migrations' tests."""
    from hyperhive.core.store.schema import MIGRATIONS, apply_migration

    db = sqlite3.connect(path, isolation_level=None)
    for n, migration in enumerate(MIGRATIONS[:version], start=1):
        apply_migration(db, migration)
        db.execute(f"PRAGMA user_version={n}")
    db.close()


def send_until_full(s: socket.socket, data: bytes) -> int:
    """As much of ``data`` as the peer takes (the core stops reading past its buffer's
    bound): sent until 0.2 s pass with no room. The socket is left blocking."""
    s.setblocking(False)
    sent = idle = 0
    while sent < len(data) and idle < 10:
        try:
            sent += s.send(data[sent : sent + 65536])
            idle = 0
        except BlockingIOError:
            idle += 1
            time.sleep(0.02)
    s.setblocking(True)
    return sent


def send_until_full_all(socks: list[socket.socket], data: bytes) -> list[int]:
    """``send_until_full`` on every socket at once: each is sent ``data`` until 0.2 s pass
    in which none of them took anything (so one the peer reads later than the others is
    not taken for full), the idle waits overlapping rather than adding up (64 sockets:
    0.2 s, not 13). What each took, in order; the sockets are left blocking."""
    for s in socks:
        s.setblocking(False)
    sent = [0] * len(socks)
    open_ = [i for i in range(len(socks)) if data]
    idle = 0
    while open_ and idle < 10:
        moved = False
        for i in list(open_):
            try:
                sent[i] += socks[i].send(data[sent[i] : sent[i] + 65536])
            except BlockingIOError:
                continue
            moved = True
            if sent[i] >= len(data):
                open_.remove(i)
        if moved:
            idle = 0
        else:
            idle += 1
            time.sleep(0.02)
    for s in socks:
        s.setblocking(True)
    return sent


# What agent_usage must say, by a SUM over every row it counts (per agent: pending, bytes,
# pending to the operator, bytes to the operator).
USAGE_SUM = """SELECT who, COUNT(*), SUM(b), SUM(op), SUM(op * b) FROM (
    SELECT CASE WHEN sender = 'hive' THEN recipient ELSE sender END AS who, length(CAST(body AS BLOB)) + coalesce(length(CAST(options AS BLOB)), 0) AS b,
        recipient = 'operator' AS op FROM messages WHERE acked_at IS NULL
    UNION ALL SELECT asker, length(CAST(question AS BLOB)) + coalesce(length(CAST(options AS BLOB)), 0), 0
        FROM questions WHERE answer IS NULL AND cancelled = 0
    UNION ALL SELECT agent, length(CAST(kind AS BLOB)) + length(CAST(description AS BLOB))
        + length(CAST(payload AS BLOB)), 0 FROM approvals WHERE status = 'pending'
    UNION ALL SELECT agent, length(CAST(text AS BLOB)), 0 FROM reminders WHERE delivered_at IS NULL
) GROUP BY who"""


class WebhookReceiver:
    """An HTTP receiver on loopback that records what each webhook was sent."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, bytes]] = []  # (path, body)
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with outer.lock:
                    outer.hits.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def sent(self, path: str) -> list[str]:
        """What a person reads of each notification ``path`` got, in order."""
        with self.lock:
            bodies = [body for p, body in self.hits if p == path]
        return [json.loads(b)["text"] if path == "/slack" else b.decode() for b in bodies]

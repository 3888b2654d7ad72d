"""The hostile-agent benchmark (issue 13; root: `hive up` with real cages and the gateway).
It runs only when named (`bench/run.py --only hostile`): it loads the machine on purpose.

One agent (`hog`) writes as much as its limits allow for 60 s (`--quick`: 5 s), with the
hive's default limits: messages with the longest body to its peer and to the operator,
questions with the longest text and every option, approvals with the longest description
and a payload filling the line, reminders with the longest text, its status; each as fast
as the core accepts it, backing off when refused (rate limit, storage quota). Its peer
drains its own inbox (recv + ack), as a working agent would, so that sends to it go on.

Meanwhile the bench measures what the operator gets:
  * hive-core's RSS (VmRSS, sampled; the peak is VmHWM) before, at its peak and after;
  * `/api/state` through the gateway with an operator session (as an open dashboard
    would fetch it), every 2 s: its size and how long it took;
  * host.sock latency of a cheap verb (`list`) polled every 10 ms on one connection.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cages import PORT, Hive, _login  # type: ignore[import-not-found]
from run import Context, Row, Target, percentile  # type: ignore[import-not-found]

from hyperhive.wire.framing import MAX_LINE

HOG, PEER = "hog", "hogpeer"

TEXT_MAX = 256 * 1024  # wire.common.Text
SHORT_MAX = 4096  # wire.common.ShortText
OPTIONS_MAX = 50  # wire.agent.Ask.options
# What a hostile agent fills its text with: characters the operator's surfaces must show
# escaped (ESC, bidi overrides), which is what costs them the most bytes. 3.75 bytes a
# character on the wire, so the longest text (256 Ki characters) fits one line.
FILL = "\x1b\u202e\u202e\u202e"


def _text(n: int) -> str:
    return (FILL * (n // len(FILL) + 1))[:n]


def _wire(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _fit(obj: dict[str, Any], key: str) -> dict[str, Any]:
    """``obj`` with its text field ``key`` cut until the request fits one line."""
    while len(_wire(obj)) > MAX_LINE:
        over = len(_wire(obj)) - MAX_LINE
        obj[key] = obj[key][: len(obj[key]) - over // 3 - 16]
    return obj


def _core_pid(hive: Hive) -> int:
    assert hive.proc is not None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == hive.proc.pid and b"hyperhive.core" in argv:
            return int(entry)
    raise RuntimeError("no hive-core process under hive up")


def _mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


class Conn:
    """One blocking JSON-lines connection."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def call(self, obj: dict[str, Any] | bytes) -> dict[str, Any]:
        self.sock.sendall(obj if isinstance(obj, bytes) else _wire(obj))
        reply: dict[str, Any] = json.loads(self.file.readline())
        return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _requests() -> list[dict[str, Any]]:
    """The writes, each the largest its verb takes (within one line)."""
    body = _text(TEXT_MAX)
    # The payload fills what the line has left after the description.
    approval = {"cmd": "request_approval", "kind": "custom", "description": body}
    room = MAX_LINE - len(_wire(approval)) - 64
    options = [_text(SHORT_MAX)] * OPTIONS_MAX
    return [
        _fit({"cmd": "send", "to": "operator", "body": body}, "body"),
        _fit({"cmd": "send", "to": PEER, "body": body}, "body"),
        _fit({"cmd": "ask", "to": "operator", "question": body, "options": options}, "question"),
        {**approval, "payload": ["A" * 1000] * (room // 1003)},
        _fit({"cmd": "remind", "in_seconds": 3600, "text": body}, "text"),
        {"cmd": "set_status", "text": _text(SHORT_MAX)},
    ]


def _writer(hive: Hive, stop: threading.Event, out: dict[str, Any]) -> None:
    conn = Conn(hive.run_dir / "agents" / HOG / "agent.sock")
    accepted, refused, nbytes = Counter[str](), Counter[str](), 0
    lines = [
        (r["cmd"] + (" operator" if r.get("to") == "operator" else ""), _wire(r))
        for r in _requests()
    ]  # encoded once: the bench's own cost stays small
    i = 0
    try:
        while not stop.is_set():
            what, req = lines[i % len(lines)]
            i += 1
            try:
                reply = conn.call(req)
            except (OSError, ValueError) as e:  # the core hung up: count it, connect again
                refused[f"connection lost ({type(e).__name__})"] += 1
                conn.close()
                conn = Conn(hive.run_dir / "agents" / HOG / "agent.sock")
                continue
            if reply.get("ok"):
                accepted[what] += 1
                nbytes += len(req)
            else:
                refused[str(reply.get("error", "")).split(":")[0]] += 1
                time.sleep(0.002)  # refused (rate limit, quota): the next verb may still pass
    finally:
        conn.close()
    out.update(accepted=accepted, refused=refused, bytes=nbytes)


def _drainer(hive: Hive, stop: threading.Event) -> None:
    conn = Conn(hive.run_dir / "agents" / PEER / "agent.sock")
    try:
        while not stop.is_set():
            got = conn.call({"cmd": "recv", "wait": 0.5, "max": 10})
            ids = [m["id"] for m in got.get("messages", [])]
            if ids:
                conn.call({"cmd": "ack", "ids": ids})
    finally:
        conn.close()


POLL_PERIOD = 0.01


def _poller(hive: Hive, stop: threading.Event, samples: list[float], errors: list[str]) -> None:
    """`list` on a fixed schedule; each latency is taken from when the request was due, so
    a stall counts once for every request it held up (no coordinated omission)."""
    conn = Conn(hive.host_sock)
    due = time.perf_counter()
    try:
        while not stop.is_set():
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            reply = conn.call({"cmd": "list"})
            done = time.perf_counter()
            while due <= done:  # every request due by now waited for this one's answer
                samples.append((done - due) * 1000)
                due += POLL_PERIOD
            if not reply.get("ok"):
                errors.append(str(reply))
    finally:
        conn.close()


def _dashboard(cookie: str, stop: threading.Event, sizes: list[int], fetch_ms: list[float]) -> None:
    """An open dashboard: /api/state every 2 s (or as soon as the last fetch ends)."""
    while not stop.is_set():
        t0 = time.monotonic()
        size, ms = _state(cookie)
        sizes.append(size)
        fetch_ms.append(ms)
        stop.wait(max(0.0, 2 - (time.monotonic() - t0)))


def _state(cookie: str) -> tuple[int, float]:
    """GET /api/state through the gateway: its size (bytes) and how long it took (ms)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=600)
    try:
        conn.request("GET", "/api/state", headers={"Cookie": cookie})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"/api/state answered {resp.status}: {body[:200]!r}")
    return len(body), (time.perf_counter() - t0) * 1000


def bench_hostile(ctx: Context) -> list[Row]:
    seconds = ctx.n(60, 5)
    hive = Hive({HOG: {"command": ["true"], "peers": [PEER]}, PEER: {"command": ["true"]}})
    try:
        hive.start()
        hive.wait_running({HOG, PEER})
        for name in (HOG, PEER):  # no turns: the bench reads and writes their sockets itself
            hive.call("set_paused", name=name, paused=True)
        cookie, _ = _login(hive)
        pid = _core_pid(hive)
        time.sleep(1)
        rss_before = _mib(pid, "VmRSS")
        state_before, _ = _state(cookie)
        stop = threading.Event()
        written: dict[str, Any] = {}
        lat: list[float] = []
        errors: list[str] = []
        sizes: list[int] = []
        fetch_ms: list[float] = []
        threads = [
            threading.Thread(target=_writer, args=(hive, stop, written)),
            threading.Thread(target=_drainer, args=(hive, stop)),
            threading.Thread(target=_poller, args=(hive, stop, lat, errors)),
            threading.Thread(target=_dashboard, args=(cookie, stop, sizes, fetch_ms)),
        ]
        for t in threads:
            t.start()
        rss = [rss_before]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            rss.append(_mib(pid, "VmRSS"))
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(300)
        size, ms = _state(cookie)  # what the next dashboard to open gets
        sizes.append(size)
        fetch_ms.append(ms)
        rss.append(_mib(pid, "VmRSS"))
        peak = max(max(rss), _mib(pid, "VmHWM"))
        time.sleep(2)
        rss_after = _mib(pid, "VmRSS")
    finally:
        hive.stop()
    if errors:
        raise RuntimeError(f"host.sock list refused during the write: {errors[:3]}")
    accepted: Counter[str] = written.get("accepted", Counter())
    refused: Counter[str] = written.get("refused", Counter())
    mib_written = written.get("bytes", 0) / 2**20
    section = "hostile"
    note = f"{seconds} s of writes"
    return [
        Row(
            section,
            "accepted writes",
            sum(accepted.values()),
            "req",
            note=", ".join(f"{k} {v}" for k, v in sorted(accepted.items())),
        ),
        Row(section, "bytes accepted", mib_written, "MiB", note=f"in {seconds} s"),
        Row(
            section,
            "refused writes",
            sum(refused.values()),
            "req",
            note=", ".join(f"{k} {v}" for k, v in refused.most_common(3)),
        ),
        Row(section, "core RSS before", rss_before, "MiB"),
        Row(section, "core RSS peak", peak, "MiB", note="VmHWM / sampled VmRSS"),
        Row(
            section,
            "core RSS growth (peak − before)",
            peak - rss_before,
            "MiB",
            Target("<=", 200),
            note,
        ),
        Row(section, "core RSS after", rss_after, "MiB", note="2 s after the writes stop"),
        Row(
            section,
            "/api/state size (largest)",
            max(sizes) / 2**20,
            "MiB",
            Target("<=", 1),
            f"before {state_before / 1024:.0f} KiB; {len(sizes)} fetches",
        ),
        Row(
            section,
            "/api/state fetch (slowest)",
            max(fetch_ms),
            "ms",
            note=f"p50 {percentile(fetch_ms, 50):.0f} ms, through the gateway",
        ),
        Row(
            section,
            "host.sock p50 (list, polled)",
            percentile(lat, 50),
            "ms",
            note=f"{len(lat)} samples",
        ),
        Row(
            section,
            "host.sock p99 (list, polled)",
            percentile(lat, 99),
            "ms",
            Target("<=", 50),
            f"max {max(lat):.0f} ms; due every {POLL_PERIOD * 1000:.0f} ms",
        ),
    ]


HOSTILE_BENCHMARKS = [bench_hostile]

"""Fault injection on a whole hive (``hive up``) with agents in real cages.

- hive-core killed with SIGKILL while 64 agents send and receive from inside
  their cages: ``hive up`` restarts it, every send that was acknowledged (the
  reply carried an id) reaches its recipient, and a redelivery carries the id it
  had (so duplicates are detectable by id).
- hive-priv killed with SIGKILL: the cages keep running (same processes) and
  the next request that needs it activates it again.
- A harness killed (repeatedly): its cage's init restarts it with a growing
  backoff, and ``agent_status`` shows ``failed`` and not ``running`` while it is
  down.
- A full disk (the state dir on a small tmpfs): senders get one clear line
  (``storage error: database or disk is full``), nothing acknowledged is lost or
  corrupted (``PRAGMA integrity_check``), and sends succeed again once there is
  room.
- nginx (the gateway) killed: a worker is respawned by its master; a killed
  master is restarted by ``hive up``, which first kills the workers it left
  behind (they would keep the port), and the login page answers again.

Agent names start with ``ft``. Everything the agents do runs inside their cages
(``hive exec`` through ``probe()``, which checks it is caged first).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import (
    HiveFactory,
    HiveProcess,
    children,
    probe_result,
    proc_cmdline,
    proc_start_time,
    proc_status,
    wait_until,
)
from hyperhive.client import Client, HiveUnavailable

BIG_RUNNING_TIMEOUT = 120.0  # many cages on a small, shared machine
TRUE: dict[str, Any] = {"runtime": "command", "command": ["true"]}


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("ok") is True, reply
    return reply


def patient(hive: HiveProcess, timeout: float = BIG_RUNNING_TIMEOUT) -> HiveProcess:
    """Let ``start()`` wait longer for every harness to connect (many cages)."""
    hive.wait_running = functools.partial(  # type: ignore[method-assign]
        HiveProcess.wait_running, hive, timeout=timeout)
    return hive


def alive(pid: int, start_time: int | None = None) -> bool:
    """Still this process (same start time, if given) and not a zombie."""
    state = proc_status(pid).get("State", "")
    if not state or state.startswith("Z"):
        return False
    return start_time is None or proc_start_time(pid) == start_time


def try_status(hive: HiveProcess) -> dict[str, dict[str, Any]] | None:
    try:
        return hive.agent_status()
    except (OSError, ValueError, HiveUnavailable):
        return None


def pause_all(hive: HiveProcess, names: list[str]) -> None:
    """Paused agents' harnesses take no turns: their inbox is left to the test's own recv."""
    for name in names:
        ok(hive.host_call("set_paused", name=name, paused=True))


# -- 1. hive-core killed while 64 agents talk -----------------------------------------

N_CHATTY = 64
CHATTY = [f"ftc{i:02d}" for i in range(N_CHATTY)]
SENDS = 60  # messages each agent sends (seq 0..59), then an end marker (seq 60)

# Runs in each cage: a sender thread sends SENDS messages and an end marker to the
# next agent, a receiver thread receives from the previous one. Through a core
# crash both reconnect and go on. The sender notes every attempt ("A seq attempt")
# before the request and every acknowledged one ("K seq attempt id") after it, in
# $HOME/sent.log; the receiver notes every message it gets in $HOME/got.log before
# acking it. The receiver acks each batch only after the next recv, so it always
# holds some messages unacked: those a crash interrupts come back (redelivered).
CHATTER = r"""
import json, os, socket, threading, time

HOME = os.environ["HOME"]
SOCK = "/run/hive/agent.sock"
deadline = time.time() + P["budget"]
errors = []


class Conn:
    def __init__(self):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(30)
        try:
            self.s.connect(SOCK)
        except OSError:
            self.s.close()
            raise
        self.f = self.s.makefile("rb")

    def call(self, **req):
        self.s.sendall(json.dumps(req).encode() + b"\n")
        line = self.f.readline()
        if not line:
            raise ConnectionError("the core closed the connection")
        return json.loads(line)

    def close(self):
        try:
            self.f.close()
            self.s.close()
        except OSError:
            pass


def connect():
    while time.time() < deadline:
        try:
            return Conn()
        except OSError:
            time.sleep(0.05)  # the core is restarting: its socket comes back
    raise TimeoutError("no agent socket before the deadline")


def sender():
    log = open(os.path.join(HOME, "sent.log"), "a", buffering=1)
    conn = connect()
    seq = attempt = 0
    while seq <= P["n"]:
        if time.time() > deadline:
            errors.append(f"sender: deadline at seq {seq}")
            return
        log.write(f"A {seq} {attempt}\n")
        try:
            r = conn.call(cmd="send", to=P["to"], body=f"{seq}:{attempt}")
        except (OSError, ValueError):
            conn.close()
            conn = connect()
            attempt += 1  # outcome unknown: try again under a new body
            continue
        if not r.get("ok"):
            errors.append(f"send refused: {r}")
            log.write(f"E {seq} {attempt}\n")
            attempt += 1
            time.sleep(0.1)
            continue
        log.write(f"K {seq} {attempt} {r['id']}\n")
        seq, attempt = seq + 1, 0
        time.sleep(P["gap"])
    conn.close()


def receiver():
    log = open(os.path.join(HOME, "got.log"), "a", buffering=1)
    conn = connect()
    held = []
    while time.time() < deadline:
        try:
            r = conn.call(cmd="recv", wait=0.3, max=50)
            if not r.get("ok"):
                errors.append(f"recv refused: {r}")
                time.sleep(0.1)
                continue
            msgs = r["messages"]
            for m in msgs:
                log.write(json.dumps({"id": m["id"], "from": m["from"], "body": m["body"]}) + "\n")
            end = any(m["from"] == P["from"] and m["body"].startswith(f"{P['n']}:") for m in msgs)
            ids = held + [m["id"] for m in msgs] if end else held
            if ids:
                a = conn.call(cmd="ack", ids=ids)
                if not a.get("ok"):
                    errors.append(f"ack refused: {a}")
            held = [] if end else [m["id"] for m in msgs]
            if end:
                conn.close()
                return
        except (OSError, ValueError):
            held = []  # what this connection held unacked comes back on the next one
            conn.close()
            conn = connect()
    errors.append("receiver: deadline before the end marker")


open(os.path.join(HOME, "ready"), "w").close()
while not os.path.exists(os.path.join(HOME, "go")):
    time.sleep(0.01)
threads = [threading.Thread(target=sender), threading.Thread(target=receiver)]
for t in threads:
    t.start()
for t in threads:
    t.join()
result(errors=errors)
"""


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def acked_sends(hive: HiveProcess, name: str) -> dict[int, tuple[int, int]]:
    """id -> (seq, attempt) of every send ``name`` got acknowledged."""
    out = {}
    for line in read_lines(hive.home(name) / "sent.log"):
        parts = line.split()
        if parts[0] == "K":
            out[int(parts[3])] = (int(parts[1]), int(parts[2]))
    return out


@pytest.mark.timeout(300)
def test_core_kill9_while_64_agents_send(hive_factory: HiveFactory) -> None:
    agents = {name: {**TRUE, "peers": [CHATTY[(i + 1) % N_CHATTY]]} for i, name in enumerate(CHATTY)}
    hive = patient(hive_factory(agents, start=False))
    hive.start()
    pause_all(hive, CHATTY)
    cage_init = {name: hive.cage(name)["pid"] for name in CHATTY}
    old_core = hive.core_pid()
    assert old_core is not None

    def chat(i: int) -> subprocess.CompletedProcess[str]:
        name = CHATTY[i]
        return hive.probe(name, CHATTER, timeout=150, to=CHATTY[(i + 1) % N_CHATTY],
                          **{"from": CHATTY[(i - 1) % N_CHATTY]}, n=SENDS, gap=0.05, budget=120)

    with ThreadPoolExecutor(max_workers=N_CHATTY) as pool:
        futures = [pool.submit(chat, i) for i in range(N_CHATTY)]
        try:
            wait_until(lambda: all((hive.home(n) / "ready").exists() for n in CHATTY), 90,
                       "every agent's program to be ready")
            for name in CHATTY:
                (hive.home(name) / "go").touch()
            # Kill once every agent has had a few sends acknowledged (so all are mid-stream).
            wait_until(lambda: min(len(acked_sends(hive, n)) for n in CHATTY) >= 3, 60,
                       "every agent to have sends acknowledged", interval=0.02)
            os.kill(old_core, signal.SIGKILL)
            killed_at = time.monotonic()
            at_kill = {n: len(acked_sends(hive, n)) for n in CHATTY}
            assert max(at_kill.values()) <= SENDS, f"some agent had finished before the kill: {at_kill}"
            new_core = wait_until(lambda: (p := hive.core_pid()) not in (None, old_core) and p, 60,
                                  "hive up to restart hive-core")
            hive.wait_running(timeout=60)
            back_after = time.monotonic() - killed_at
        finally:
            for name in CHATTY:  # never leave a program waiting for its go
                with contextlib.suppress(OSError):
                    (hive.home(name) / "go").touch()
            procs = [f.result() for f in futures]
    for name, proc in zip(CHATTY, procs, strict=False):
        res = probe_result(proc)
        assert res["errors"] == [], (name, res["errors"])
    assert not alive(old_core)
    assert "hive-core exited with status -9" in hive.log_path.read_text()

    acked_total = delivered = redelivered = unacked_stored = 0
    for i, sender in enumerate(CHATTY):
        recipient = CHATTY[(i + 1) % N_CHATTY]
        acked = acked_sends(hive, sender)
        attempted = {
            (int(p[1]), int(p[2])) for p in (line.split() for line in read_lines(hive.home(sender) / "sent.log"))
            if p[0] == "A"
        }
        assert sorted(seq for seq, _ in acked.values()) == list(range(SENDS + 1)), (sender, acked)
        # Acknowledged in order: ids grow with seq.
        assert sorted(acked) == [mid for mid, _ in sorted(acked.items(), key=lambda kv: kv[1])], sender
        got = [json.loads(line) for line in read_lines(hive.home(recipient) / "got.log")]
        assert {g["from"] for g in got} == {sender}, recipient  # its only sender
        bodies: dict[int, str] = {}
        for g in got:
            # A message that comes again comes with its id and its body.
            assert bodies.setdefault(g["id"], g["body"]) == g["body"], (recipient, g)
        ids_of_body = Counter(bodies.values())
        assert all(n == 1 for n in ids_of_body.values()), (
            f"{recipient}: the same message under two ids: {[b for b, n in ids_of_body.items() if n > 1]}")
        missing = sorted(set(acked) - set(bodies))
        assert not missing, f"{sender} -> {recipient}: acknowledged but never delivered: {missing}"
        for mid, body in bodies.items():
            seq, attempt = (int(x) for x in body.split(":"))
            if mid in acked:
                assert acked[mid] == (seq, attempt), (recipient, mid, body)
            else:  # stored, but its reply was lost to the crash: an attempt the sender made
                assert (seq, attempt) in attempted, (recipient, mid, body)
                unacked_stored += 1
        acked_total += len(acked)
        delivered += len(got)
        redelivered += len(got) - len(bodies)
    # Nothing was left behind in any inbox.
    for name in CHATTY:
        left = ok(hive.agent_call(name, "recv", wait=0, max=1000))["messages"]
        assert left == [], (name, left)
    # A core crash doesn't touch the cages.
    assert {name: hive.cage(name)["pid"] for name in CHATTY} == cage_init
    print(f"\ncore kill -9: {acked_total} sends acknowledged by {N_CHATTY} agents "
          f"({sum(at_kill.values())} before the kill), {delivered} deliveries, {redelivered} redelivered "
          f"(same id), {unacked_stored} stored without an acknowledgement; core {old_core} -> {new_core}, "
          f"all harnesses back {back_after:.1f} s after the kill")
    # The receivers always hold their latest batch unacked, so the crash must have
    # interrupted some: those came back, under the same ids (checked above).
    assert redelivered > 0


@pytest.mark.timeout(120)
def test_core_restart_serves_running_cages_at_once_and_starts_a_dead_one(hive_factory: HiveFactory) -> None:
    """hive-core finds every running cage in one request to hive-priv at start-up and
    serves it again as it is (the same processes); a cage that died while the core was
    down is started again, one the operator stopped stays stopped. Across the restart each
    acknowledged send is delivered exactly once, and the ones a connection held unacked
    when the core died come again under their ids."""
    hive = hive_factory({"ftr-run": TRUE, "ftr-dead": {**TRUE, "peers": ["ftr-run"]}, "ftr-off": TRUE})
    ok(hive.host_call("stop", scope={"agent_names": ["ftr-off"]}))
    ok(hive.host_call("set_paused", name="ftr-run", paused=True))  # its inbox is the test's
    sent = [ok(hive.agent_call("ftr-dead", "send", to="ftr-run", body=f"m{i}"))["id"] for i in range(6)]
    procs = {n: sorted(hive.cage_procs(n)) for n in ("ftr-run", "ftr-dead")}
    assert all(procs.values()) and hive.cage_procs("ftr-off") == []
    holder = Client(hive.agent_sock("ftr-run"), timeout=30)
    held = ok(holder.call("recv", max=2))["messages"]  # received, not acked, when the core dies
    assert [m["id"] for m in held] == sent[:2]
    assert ok(hive.priv("stop", name="ftr-dead", timeout=0))["was_running"]
    old_core = hive.core_pid()
    assert old_core is not None
    os.kill(old_core, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: (p := hive.core_pid()) not in (None, old_core) and p, 30, "hive up to restart hive-core")
    hive.wait_running(["ftr-run", "ftr-dead"], timeout=60)
    back_after = time.monotonic() - killed_at
    holder.close()
    assert sorted(hive.cage_procs("ftr-run")) == procs["ftr-run"]  # found again, not restarted
    assert set(hive.cage_procs("ftr-dead")).isdisjoint(procs["ftr-dead"])  # started again
    assert hive.cage_procs("ftr-off") == [] and not hive.agent_status()["ftr-off"]["running"]
    assert "found 1 of 2 cages running" in hive.log_path.read_text()
    got = ok(hive.agent_call("ftr-run", "recv", max=100))["messages"]
    assert [(m["id"], m["body"]) for m in got] == [(mid, f"m{i}") for i, mid in enumerate(sent)]
    assert ok(hive.agent_call("ftr-run", "recv", max=100, ack=sent))["messages"] == []
    assert ok(hive.agent_call("ftr-run", "recv", max=100))["messages"] == []
    print(f"\ncore restart: both agents running again {back_after:.2f} s after the kill")


def test_a_stop_cut_short_by_a_kill9_is_finished_by_the_next_core(hive_factory: HiveFactory) -> None:
    """A stop marks the agent stopped, then stops its cage: a core killed between the two
    left the cage running for good (start-up looked only at agents not stopped). The
    next core stops it, and the agent stays stopped."""
    hive = hive_factory({"fts-a": TRUE, "fts-b": TRUE})
    before = sorted(hive.cage_procs("fts-a"))
    assert before
    old_core = hive.core_pid()
    assert old_core is not None
    fault = hive.state_dir / "fault.kill"  # the core kills itself there (hyperhive/faults.py)
    fault.write_text("stop-marked")
    os.chown(fault, *hive.core_ids)  # its own to remove (sticky dir)
    try:
        with contextlib.suppress(HiveUnavailable, OSError, ConnectionError):
            hive.host_call("stop", scope={"agent_names": ["fts-a"]})
        wait_until(lambda: (p := hive.core_pid()) not in (None, old_core) and p, 30, "hive up to restart hive-core")
        assert not fault.exists()  # the core passed the point, and died there
        hive.wait_running(["fts-b"], timeout=60)
        wait_until(lambda: hive.cage_procs("fts-a") == [], 30, "the stopped agent's cage to stop")
        assert not hive.cage("fts-a")["running"]
        row = hive.agent_status()["fts-a"]
        assert not row["running"] and not row["failed"], row
        assert "is stopped but its cage runs" in hive.log_path.read_text()
    finally:
        fault.unlink(missing_ok=True)


def test_a_core_restart_refused_for_a_broken_hive_toml_waits_for_the_file(hive_factory: HiveFactory) -> None:
    """hive.toml broken while the hive runs, then hive-core killed: the next core refuses
    the file in one line with exit status 78 (EX_CONFIG), and `hive up` says once that it
    waits for the file to change instead of starting it again every 10 s (session 22).
    Fixed: the core comes back within a poll, serving the same cage."""
    hive = hive_factory({"ftc-a": TRUE})
    procs = sorted(hive.cage_procs("ftc-a"))
    good = hive.config_path.read_text()
    at = hive.log_path.stat().st_size

    def since() -> str:
        return hive.log_path.read_bytes()[at:].decode(errors="replace")

    hive.config_path.write_text(good + "\nnot toml = = 1\n")
    old_core = hive.core_pid()
    assert old_core is not None
    os.kill(old_core, signal.SIGKILL)
    waiting = f"hive-core refused {hive.config_path} (see its line above); it starts again once the file changes"
    wait_until(lambda: waiting in since(), 30, "the refusal")
    time.sleep(2.5)  # the old backoff (0.2, 0.4, 0.8 s, …) would have started it 3 times
    text = since()
    assert text.count("hive-core exited with status 78 before it was ready") == 1, text[-3000:]
    assert text.count(waiting) == 1 and "Traceback" not in text, text[-3000:]
    assert f"hive-core: hive-core: {hive.config_path}: not valid TOML: " in text, text[-3000:]  # its one line
    assert hive.core_pid() is None
    assert sorted(hive.cage_procs("ftc-a")) == procs  # the cage runs on
    hive.config_path.write_text(good)
    hive.wait_running(["ftc-a"], timeout=30)
    assert hive.core_pid() not in (None, old_core)
    assert sorted(hive.cage_procs("ftc-a")) == procs
    text = since()
    assert "changed: starting hive-core again" in text and text.count("status 78") == 1, text[-3000:]


# -- 2. hive-priv killed ------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_priv_kill9_cages_keep_running_and_next_request_activates_it(hive_factory: HiveFactory) -> None:
    names = ["ftp-a", "ftp-b"]
    hive = hive_factory({n: TRUE for n in names})
    procs = {n: sorted(hive.cage_procs(n)) for n in names}
    harness = {n: hive.harness_pid(n) for n in names}
    starts = {p: proc_start_time(p) for n in names for p in procs[n]}
    old_priv = hive.priv_pid()
    assert old_priv is not None and all(procs.values())

    os.kill(old_priv, signal.SIGKILL)
    wait_until(lambda: hive.priv_pid() is None, 10, "hive-priv to be gone")
    time.sleep(1.5)
    # Socket-activated: nothing starts it until someone connects to priv.sock.
    assert hive.priv_pid() is None
    for n in names:
        assert sorted(hive.cage_procs(n)) == procs[n], n
    assert all(alive(p, t) for p, t in starts.items())
    rows = hive.agent_status()
    assert all(rows[n]["running"] and not rows[n]["failed"] for n in names), rows

    # A request through the core that needs hive-priv: starting an agent that runs.
    ok(hive.host_call("start", scope={"agent_names": ["ftp-a"]}))
    new_priv = hive.priv_pid()
    assert new_priv is not None and new_priv != old_priv
    assert "hive-priv activated by a connection" in hive.log_path.read_text()
    for n in names:  # the very same processes: the cage was found again, not restarted
        assert sorted(hive.cage_procs(n)) == procs[n], n
        assert hive.harness_pid(n) == harness[n]
    assert all(alive(p, t) for p, t in starts.items())
    assert hive.cage("ftp-a")["pid"] in procs["ftp-a"]
    # The new hive-priv does the rest of its work too.
    proc = hive.exec("ftp-b", "cat", "/proc/self/status")
    assert proc.returncode == 0, proc.stderr
    ok(hive.host_call("restart", name="ftp-b"))
    hive.wait_running(["ftp-b"])
    assert set(hive.cage_procs("ftp-b")).isdisjoint(procs["ftp-b"])
    assert sorted(hive.cage_procs("ftp-a")) == procs["ftp-a"]
    assert hive.priv_pid() == new_priv


# -- 3. a harness killed -------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_killed_harness_restarts_with_backoff_and_shows_failed_meanwhile(hive_factory: HiveFactory) -> None:
    hive = hive_factory({"ftk": TRUE, "ftk-calm": TRUE})
    init_pid = hive.cage("ftk")["pid"]
    calm = hive.harness_pid("ftk-calm")
    windows: list[float] = []
    seen_down: list[list[dict[str, Any]]] = []  # every status row read while it was down, per kill
    cage_log = hive.state_dir / "priv" / "cages" / "ftk" / "cage.log"

    def connected_lines() -> int:
        return len([line for line in cage_log.read_text().splitlines()
                    if line.startswith("harness: connected as ftk")])

    for k in range(4):  # the cage's init waits 0.5, 1, 2, 4 s before each restart
        victim = hive.harness_pid("ftk")
        # Killed once it has said so: the core counts it running at its first call, a
        # moment before its line (a kill in between, under CI's load, lost the line).
        wait_until(lambda n=k + 1: connected_lines() >= n, 10, f"harness {k + 1}'s 'connected' line")
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        down: list[dict[str, Any]] = []
        while True:
            rows = hive.agent_status()
            row = rows["ftk"]
            if not row["running"]:
                down.append(row)
            elif down:
                break  # back
            assert not rows["ftk-calm"]["failed"] and rows["ftk-calm"]["running"], rows["ftk-calm"]
            assert time.monotonic() - killed < 30, f"harness not back 30 s after kill {k + 1}\n{hive.log_tail()}"
            time.sleep(0.02)
        windows.append(time.monotonic() - killed)
        seen_down.append(down)
        assert row["failed"] is False, row
        assert hive.harness_pid("ftk") != victim
    for k, down in enumerate(seen_down):
        assert all(row["failed"] is True for row in down), (k, [r for r in down if not r["failed"]])
    backoffs = [0.5, 1.0, 2.0, 4.0]
    for k, (w, b) in enumerate(zip(windows, backoffs, strict=False)):
        assert b <= w < b + 10, f"kill {k + 1}: down {w:.2f} s, backoff {b} s"
    assert windows[3] - windows[0] > 2.5, windows  # the backoff grows
    log = cage_log.read_text()
    restarts = [line for line in log.splitlines() if line.startswith("cage-init: harness exited")]
    assert [line.rsplit("restarting in ", 1)[1] for line in restarts] == ["0.5 s", "1.0 s", "2.0 s", "4.0 s"], restarts
    assert all("status -9" in line for line in restarts), restarts
    # Each harness's own lines reach cage.log through init's pipe, the exec'd ones' too.
    wait_until(lambda: connected_lines() >= 5, 10, "five harnesses' 'connected' lines in cage.log")
    assert hive.cage("ftk")["pid"] == init_pid  # the cage itself kept running
    assert hive.harness_pid("ftk-calm") == calm
    # The page's socket, bound once by hive-priv and kept by init, is served by the
    # fourth harness (exec'd, handed the same listener): the same node, an HTTP answer.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(hive.run_dir / "ui" / "ftk" / "web.sock"))
        s.sendall(b"GET / HTTP/1.0\r\nHost: page\r\n\r\n")
        assert s.recv(12).startswith(b"HTTP/1."), "no page after the harness's restarts"
    print(f"\nharness down windows after kill -9: {', '.join(f'{w:.2f}' for w in windows)} s, "
          f"agent_status read {', '.join(str(len(d)) for d in seen_down)} times in each: failed, not running")


# -- 4. a full disk ---------------------------------------------------------------------

DISK_FULL = "storage error: database or disk is full"


@contextlib.contextmanager
def hive_on_tmpfs(agents: dict[str, dict[str, Any]], size: str = "8m") -> Iterator[HiveProcess]:
    """A hive whose state dir is a small tmpfs; stopped (cleanly) and unmounted after."""
    hive = HiveProcess(agents)
    hive.state_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(hive.state_dir)],
                   check=True, capture_output=True)
    try:
        hive.start()
        try:
            yield hive
        finally:
            if hive.running:
                hive.stop_clean()
    finally:
        if hive.running:
            hive.kill_everything()
        for name in hive.names:
            hive.cgroup(name).kill_all(1.0)
        if subprocess.run(["umount", str(hive.state_dir)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(hive.state_dir)], check=True, capture_output=True)
        hive.cleanup()


def fill(path: Path) -> int:
    """Write zeros to ``path`` until the file system is full; the bytes written."""
    chunk = b"\0" * (64 * 1024)
    written = 0
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
        for size in (4096, 512, 1):  # the last crumbs
            while True:
                try:
                    written += f.write(b"\0" * size)
                except OSError:
                    break
    return written


def integrity(db: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return [r[0] for r in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


@pytest.mark.timeout(120)
def test_full_disk_gives_one_clear_line_keeps_everything_and_recovers() -> None:
    agents = {"ftd-a": {**TRUE, "peers": ["ftd-b"]}, "ftd-b": TRUE}
    with hive_on_tmpfs(agents) as hive:
        pause_all(hive, ["ftd-b"])
        core = hive.core_pid()
        acked: list[tuple[int, str]] = []  # (id, body) of every acknowledged send, in order
        refusals: list[dict[str, Any]] = []
        with Client(hive.agent_sock("ftd-a"), timeout=30) as a:
            def send(body: str) -> dict[str, Any]:
                r = a.call("send", to="ftd-b", body=body)
                if r.get("ok"):
                    acked.append((r["id"], body))
                else:
                    refusals.append(r)
                return r

            for i in range(20):
                ok(send(f"before {i}"))
            filler = hive.state_dir / "filler"
            filled = fill(filler)
            assert os.statvfs(hive.state_dir).f_bavail == 0
            # Big messages: the WAL must grow, and there is no room for it. (The first few may
            # still fit in space SQLite already had.)
            body = "x" * (64 * 1024)
            for i in range(200):
                if not send(f"full {i} {body}").get("ok"):
                    break
            assert refusals, f"200 sends of 64 KiB succeeded on a full disk ({filled} bytes filler)"
            for i in range(10):
                send(f"still full {i} {body}")
            assert len(refusals) >= 5, refusals
            for r in refusals:  # one line, words a caller can act on, nothing else
                assert r == {"version": 1, "ok": False, "error": DISK_FULL}, r
            # The same, through the agent's own CLI inside its cage.
            # (Small sends may fit in pages SQLite already holds; each that fits is acked and
            # must be delivered, and the pages run out within a few dozen.)
            for _ in range(100):
                cli = hive.exec("ftd-a", "/opt/hive/bin/hive", "agent", "send", "ftd-b", f"cli {body[:1000]}")
                if cli.returncode == 0:  # it fit after all: it was acknowledged like any other
                    acked.append((int(cli.stdout.split()[2]), f"cli {body[:1000]}"))
                    continue
                break
            assert (cli.returncode, cli.stdout, cli.stderr) == (1, "", f"hive: error: {DISK_FULL}\n")
            # The hive itself is fine: same core, still answering, agents still running.
            assert hive.core_pid() == core
            assert ok(a.call("whoami"))["name"] == "ftd-a"
            # (A harness whose request the full disk refused connects again at once, by
            # design: harness.serve_forever. Running again within seconds is the promise.)
            try:
                wait_until(lambda: all(hive.agent_status()[n]["running"] for n in agents), 10,
                           "every agent running", interval=0.1)  # fmt: skip
            except AssertionError:
                pytest.fail(f"agents not running on a full disk: {hive.agent_status()}\n{hive.log_tail(200)}")

            filler.unlink()  # room again
            t = time.monotonic()
            while not send(f"after {len(acked)}").get("ok"):
                assert time.monotonic() - t < 15, f"sends still refused 15 s after freeing space: {refusals[-1]}"
                time.sleep(0.2)
            for i in range(20):
                ok(send(f"after {i}"))
        assert hive.core_pid() == core
        assert integrity(hive.state_dir / "hive.db") == ["ok"]
        log = hive.log_path.read_text()
        assert "Traceback" not in log and "internal error" not in log, hive.log_tail()
        # Every acknowledged message is there, intact and in order; no refused one is.
        got = ok(hive.agent_call("ftd-b", "recv", wait=0, max=1000))["messages"]
        assert [(m["id"], m["body"]) for m in got] == acked
        print(f"\nfull disk: {filled} bytes of filler, {len(refusals)} sends refused with {DISK_FULL!r}, "
              f"{len(acked)} acknowledged and delivered intact, integrity_check ok")


# -- 5. the gateway killed ---------------------------------------------------------------------


def nginx_procs(hive: HiveProcess) -> tuple[int | None, list[int]]:
    """The gateway's master (a child of hive up) and its workers."""
    assert hive.proc is not None
    masters = [p for p in children(hive.proc.pid) if proc_cmdline(p)[:1] and
               proc_cmdline(p)[0].startswith("nginx: master")]
    if not masters:
        return None, []
    assert len(masters) == 1, masters
    return masters[0], [p for p in children(masters[0]) if alive(p)]


def login(hive: HiveProcess) -> int | None:
    """The login page with the operator's token: 303 and a session cookie, or None."""
    token = (hive.state_dir / "operator.token").read_text().strip()
    conn = http.client.HTTPConnection("127.0.0.1", hive.port, timeout=5)
    try:
        conn.request("GET", f"/login?token={token}")
        r = conn.getresponse()
        r.read()
        if r.status == 303 and not (r.getheader("Set-Cookie") or "").startswith("hive_session="):
            return -303  # a redirect without a session is not a login
        return r.status
    except OSError:
        return None
    finally:
        conn.close()


@pytest.mark.timeout(120)
def test_gateway_kill9_worker_and_master_are_replaced(hive_factory: HiveFactory) -> None:
    hive = hive_factory({"ftg": TRUE})
    assert login(hive) == 303
    seen: set[tuple[int, int | None]] = set()

    def note() -> tuple[int | None, list[int]]:
        master, workers = nginx_procs(hive)
        seen.update((p, proc_start_time(p)) for p in ([master] if master else []) + workers)
        return master, workers

    # A worker: its master starts another.
    master, workers = note()
    assert master is not None and workers
    os.kill(workers[0], signal.SIGKILL)
    wait_until(lambda: (w := note()[1]) and workers[0] not in w, 15, "nginx to replace its worker")
    assert note()[0] == master
    assert wait_until(lambda: login(hive) == 303, 10, "the login page")

    # The master: hive up starts a new one, after killing the workers it left.
    for k, round_ in enumerate(("master", "master and workers"), start=1):
        master, workers = note()
        old = [(p, proc_start_time(p)) for p in [master, *workers]]
        os.kill(master, signal.SIGKILL)
        if round_ == "master and workers":
            for w in workers:
                os.kill(w, signal.SIGKILL)
        new = wait_until(lambda master=master: (m := note()[0]) not in (None, master) and m, 15,
                         f"hive up to restart the gateway ({round_} killed)\n{hive.log_tail()}")
        wait_until(lambda old=old: not any(alive(p, t) for p, t in old), 5, "the old workers to be gone")
        assert wait_until(lambda: login(hive) == 303, 10, "the login page")
        wait_until(lambda k=k: hive.log_path.read_text().count("gateway is back") == k, 10,
                   "hive up to see the gateway ready")
        assert note()[0] == new and note()[1]
    log = hive.log_path.read_text()
    assert log.count("gateway exited with status -9") == 2, log
    assert "gateway: killed the processes it left behind" in log, log
    hive.stop_clean()
    left = [p for p, t in seen if alive(p, t)]
    assert not left, f"nginx processes left after hive up stopped: {[(p, proc_cmdline(p)) for p in left]}"

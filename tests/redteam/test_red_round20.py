"""Red team round 20: session 13's changes attacked: the egress proxy's refusals before
the request is read (503 at the agent's ``[egress] max_connections``, 403 for a uid not
the agent's) now read once first (``REFUSE_READ``, ``_refuse_unread``), and hive-priv's
``limit_hits`` verb, the core's limits poll every 5 s.

See docs/security.md's rounds table (red team round 20).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HIVE, HiveProcess, running_hive, wait_until
from hyperhive.core.egress import REFUSE_READ, STRANGER_LOG_EVERY, handover_path
from hyperhive.priv.cgroups import hive_key, is_v2

from .conftest import (
    MAX_CORE_LATENCY,
    PASSRIGHTS,
    cage_run,
    core_fds,
    others_keep_working,
    unchanged,
)
from .test_budget_descriptors import Peak, core_threads, unchanged_but_egress_log

E = 3  # [egress] max_connections
PIDS_MAX = 40
ATK, VIC = "r20atk", "r20vic"
AGENTS: dict[str, dict[str, Any]] = {
    ATK: {"runtime": "command", "command": ["true"], "pids_max": PIDS_MAX},
    VIC: {"runtime": "command", "command": ["true"]},
}
SECTIONS = {"egress": {"max_connections": E}}


@pytest.fixture(scope="module")
def h() -> Iterator[HiveProcess]:
    hive = HiveProcess(AGENTS, sections=SECTIONS)
    # A harness binds its page's web.sock just after it connects: in the digests' tree.
    socks = [hive.run_dir / "ui" / name / "web.sock" for name in AGENTS]
    for running in running_hive(hive):
        wait_until(lambda: all(p.is_socket() for p in socks), 20, f"{socks} to be sockets")
        yield running


# -- the egress refusals that read first -------------------------------------------------

# In the attacker's cage: E connections held counted (a request head begun, never ended:
# the proxy waits HEAD_TIMEOUT for it), then one refusal after another, each a way to
# misuse the read the refusal now makes. Each reports its status line, how long it took,
# and for descriptors handed over, whether the pipe they were the write end of reached EOF
# (every copy closed: the kernel's in-flight one too) within 3 s of the reply.
REFUSALS = r"""
import array, os, select, threading

SOCK = "/run/hive/egress.sock"
REQ = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(SOCK)
    return s

def status(s):
    head = b""
    try:
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    except OSError as e:
        return "after %r: %s" % (head[:40], errname(e))
    return head.split(b"\r\n")[0].decode() or "EOF"

def eof_within(r, seconds):
    ready = select.select([r], [], [], seconds)[0]
    return bool(ready) and os.read(r, 1) == b""

def send_fds(s, data, fds):
    # egress.sock refuses descriptors (SO_PASSRIGHTS 0, session 28): EPERM, nothing sent;
    # the bytes then go alone, and the refusal is what it was.
    try:
        s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    except PermissionError:
        out.setdefault("EPERM", 0)
        out["EPERM"] += 1
        s.sendall(data)

holders = []
for i in range(P["E"]):
    s = connect()
    s.sendall(b"CONNECT example.com:443 HTTP/1.1\r\n")  # never ended: counted, waiting
    holders.append(s)
first = connect()
first.sendall(REQ)
out = {"first": status(first)}
first.close()
# None of the holders was the one refused (it would have its 503 by now).
out["holders_quiet"] = not select.select(holders, [], [], 0)[0]

def case(name, fn):
    t0 = time.monotonic()
    try:
        out[name] = fn()
    except OSError as e:
        out[name] = {"error": errname(e)}
    out[name + "_s"] = round(time.monotonic() - t0, 3)

def fds_with_request():
    # A pipe's write end, a socketpair's end, a file of its home, the connection itself
    # and /dev/null copies up to the kernel's 253 a message.
    r, w = os.pipe()
    a, b = socket.socketpair()
    f = os.open(os.path.expanduser("~/.r20"), os.O_CREAT | os.O_RDWR, 0o600)
    s = connect()
    null = os.open("/dev/null", os.O_RDONLY)
    send_fds(s, REQ, [w, a.fileno(), f, s.fileno()] + [null] * 249)
    for fd in (w, f, null):
        os.close(fd)
    a.close()
    st = status(s)
    s.close()
    # b: its peer a was in flight; once the kernel closed that copy, b reads EOF.
    b.settimeout(3)
    return {"status": st, "pipe_eof": eof_within(r, 3), "pair_eof": b.recv(1) == b""}

def fds_after_64k():
    # 70 KiB first (more than the one read takes), then the descriptors, left unread. All
    # written while the connection waits in the backlog (a silent one is being refused,
    # the listener paused at E + 1), so none of it meets a refusal already closed.
    r, w = os.pipe()
    pin = connect()
    s = connect()
    # Room for all of it unread (the skbs' true sizes pass the default 208 KiB).
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    s.sendall(b"x" * (70 * 1024))
    send_fds(s, b"y", [w])
    os.close(w)
    st = status(s)
    s.close()
    return {"status": st, "pipe_eof": eof_within(r, 3), "pinned": status(pin)}

def fds_alone():
    r, w = os.pipe()
    s = connect()
    send_fds(s, b"\0", [w] * 10)
    os.close(w)
    st = status(s)
    s.close()
    return {"status": st, "pipe_eof": eof_within(r, 3)}

def silent():
    s = connect()
    st = status(s)
    s.close()
    return st

def slow():
    s = connect()
    for i in range(8):
        s.sendall(REQ[i:i + 1])
        if select.select([s], [], [], 0.3)[0]:
            break
    return {"status": status(s), "bytes_sent": i + 1}

def a_mebibyte():
    s = connect()
    sent = [0]
    def write():
        try:
            for _ in range(16):
                s.sendall(b"z" * 65536)
                sent[0] += 65536
        except OSError as e:
            sent.append(errname(e))
    t = threading.Thread(target=write)
    t.start()
    st = status(s)
    t.join(10)
    s.close()
    return {"status": st, "sent": sent}

def reset():
    for _ in range(20):
        s = connect()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    return "closed 20"

def half_then_close():
    for _ in range(5):
        s = connect()
        s.sendall(b"CONN")
        s.close()
    return "closed 5"

def behind_3_silent():
    # Its own request queued behind three connections that send nothing: each refusal
    # ends as soon as the next connection waits (the listener paused at E + 1).
    silent3 = [connect() for _ in range(3)]
    s = connect()
    s.sendall(REQ)
    st = status(s)
    s.close()
    return {"status": st, "silent": [status(x) for x in silent3]}

for name, fn in [("fds_with_request", fds_with_request), ("fds_after_64k", fds_after_64k),
                 ("fds_alone", fds_alone), ("silent", silent), ("slow", slow),
                 ("a_mebibyte", a_mebibyte), ("reset", reset), ("half_then_close", half_then_close),
                 ("behind_3_silent", behind_3_silent)]:
    case(name, fn)
# The cap still holds after all that: one more is refused, and once the holders go,
# E requests are served (each refused 403 by the rules, after its head is read).
last = connect()
last.sendall(REQ)
out["at_cap_after"] = status(last)
last.close()
for s in holders:
    s.close()
def one(i, got):
    # The holders' slots come back as the core's tunnel threads see them close, a moment
    # after: a 503 meanwhile is asked again (within 10 s), so what is asserted is that the
    # cap recovers, not how fast those threads end.
    t0 = time.monotonic()
    while True:
        s = connect()
        s.sendall(REQ)
        st = status(s)
        s.close()
        if not st.startswith("HTTP/1.1 503") or time.monotonic() - t0 > 10:
            break
        time.sleep(0.05)
    got[i] = (st, round(time.monotonic() - t0, 3))
got = {}
ts = [threading.Thread(target=one, args=(i, got)) for i in range(P["E"])]
for t in ts:
    t.start()
for t in ts:
    t.join(30)
out["served_after"] = [got[i] for i in sorted(got)]
result(**out)
"""

# In the victim's cage, for ``seconds`` at most (and at least ``least``), until the file
# ``stop`` is in its home: its own egress (a request refused by its rules after its head
# is read) and agent.sock round trips, timed.
VICTIM = r"""
import os
SOCK = "/run/hive/egress.sock"
REQ = b"CONNECT example.com:443 HTTP/1.1\r\n\r\n"
egress, agent, statuses = [], [], set()
start = time.monotonic()
end = start + P["seconds"]
while time.monotonic() < end and (time.monotonic() < start + P["least"] or not os.path.exists(P["stop"])):
    t0 = time.monotonic()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(SOCK)
    s.sendall(REQ)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    s.close()
    statuses.add(head.split(b"\r\n")[0].decode())
    egress.append(time.monotonic() - t0)
    t0 = time.monotonic()
    assert call({"cmd": "whoami"})["ok"]
    agent.append(time.monotonic() - t0)
    time.sleep(0.02)
result(n=len(egress), egress_max=max(egress), agent_max=max(agent), statuses=sorted(statuses))
"""


@pytest.mark.attack("budget.core-descriptors",
                    ref="session 13 _refuse_unread: a plain recv before the 503/403; SCM_RIGHTS unix(7)")
def test_what_a_refused_egress_connection_sends_costs_the_core_nothing_and_slows_no_one(
        h: HiveProcess) -> None:
    """The agent at its egress cap, then refusals: descriptors handed over with the
    request (a pipe's write end, a socketpair's end, a file of its home, the connection
    itself, 249 more: 253 in one message), after 70 KiB (past the one read), alone with a
    byte; a connection that sends nothing, one byte at a time, a MiB, resets, half a
    request. Every refusal is the 503; every descriptor sent is closed by the kernel (the
    pipe and the socketpair read EOF); the core's descriptors never grow by more than the
    budget's (E counted, one refusing, the poller's) and come back; another agent's egress
    and agent.sock answer all along; and the cap still holds and recovers."""
    base_fds = core_fds(h)
    victim: dict[str, Any] = {}
    stop = h.home(VIC) / "r20-victim-stop"
    stop.unlink(missing_ok=True)

    def measure() -> None:
        victim.update(cage_run(h, VIC, VICTIM, seconds=12, least=3, stop=stop.name, timeout=60))

    t = threading.Thread(target=measure)
    with unchanged_but_egress_log(h), others_keep_working(h, other=VIC), Peak(h) as peak:
        base_threads = peak.threads
        t.start()
        try:
            res = cage_run(h, ATK, REFUSALS, E=E, timeout=90)
            # The victim measured all along the refusals (~1.5 s here) and until what they
            # cost the core is back (the checks at the end, made here first), not for a
            # fixed 12 s: 3 s at least, 12 s at most, as before.
            wait_until(lambda: core_fds(h) <= base_fds + 2, 20, "the core's descriptors to come back")
            wait_until(lambda: core_threads(h) <= base_threads + 2, 20, "the refusals' threads to end")
        finally:
            stop.write_text("stop")
            t.join(60)
            stop.unlink(missing_ok=True)
    print(json.dumps(res), json.dumps(victim), f"core fds {base_fds} -> peak {peak.fds}",
          f"threads {base_threads} -> peak {peak.threads}")
    s503 = "HTTP/1.1 503 Service Unavailable"
    assert res["first"] == s503 and res["holders_quiet"], res
    # egress.sock refuses descriptors (session 28): the three sends with them were EPERM
    # (fds_after_64k's may meet its refusal's close first: EPIPE, as below).
    eperm = 3 - (res["fds_after_64k"] == {"error": "EPIPE"})
    assert res.get("EPERM", 0) == (eperm if PASSRIGHTS else 0), res
    extra = {"fds_with_request": {"pair_eof": True}, "fds_after_64k": {"pinned": s503}, "fds_alone": {}}
    for case, more in extra.items():
        if case == "fds_after_64k" and res[case] == {"error": "EPIPE"}:
            # The silent pin's refusal ends as soon as this one waits behind it, so this
            # one's refusal may read its first 64 KiB and close before the descriptor is
            # written (a client descheduled in between): then it never reached the core.
            continue
        assert res[case] == {"status": s503, "pipe_eof": True, **more}, (case, res[case])
    # The silent pin's refusal did not wait its REFUSE_READ: a connection waited behind it.
    assert res["fds_after_64k_s"] < REFUSE_READ, res
    # Nothing sent: the 503 after the one read's timeout; a byte: at once.
    assert res["silent"] == s503 and REFUSE_READ - 0.1 <= res["silent_s"] < REFUSE_READ + 2, res
    assert res["slow"] == {"status": s503, "bytes_sent": 1}, res
    # A MiB written: the 503 is read (the write then meets the closed socket).
    assert res["a_mebibyte"]["status"] == s503, res
    # Silent connections ahead of its own request do not hold it up: each silent one's
    # refusal ends as soon as another connection waits behind it (the round found 3.07 s
    # here, a REFUSE_READ each, before the refusal looked at the listener).
    assert res["behind_3_silent"] == {"status": s503, "silent": [s503] * 3}, res
    assert res["behind_3_silent_s"] < REFUSE_READ, res
    assert res["at_cap_after"] == s503, res
    assert [st for st, _ in res["served_after"]] == ["HTTP/1.1 403 Forbidden"] * E, res
    # The other agent: served all along, quickly (its own refusals read at once).
    assert victim["statuses"] == ["HTTP/1.1 403 Forbidden"] and victim["n"] >= 20, victim
    assert victim["egress_max"] < MAX_CORE_LATENCY and victim["agent_max"] < MAX_CORE_LATENCY, victim
    # The core: the E counted, one refusing, the poller's and the victim's few; never the
    # 253 descriptors handed over; all back afterwards.
    assert peak.fds - base_fds <= E + 1 + 8, (base_fds, peak.fds)
    assert peak.threads - base_threads <= E + 1 + 6, (base_threads, peak.threads)
    wait_until(lambda: core_fds(h) <= base_fds + 2, 20, "the core's descriptors to come back")
    wait_until(lambda: core_threads(h) <= base_threads + 2, 20, "the refusals' threads to end")


# -- limit_hits from a compromised core ---------------------------------------------------


# As hive-core: ``threads`` connections, each asking ``req`` again and again for
# ``seconds``; how many were answered, the slowest, and every distinct reply shape.
HAMMER = r"""
import json, socket, sys, threading, time
path, req, threads, seconds = sys.argv[1], sys.argv[2].encode() + b"\n", int(sys.argv[3]), float(sys.argv[4])
done, slowest, shapes, lock = [0], [0.0], set(), threading.Lock()
def run():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(path)
    f = s.makefile("rb")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        s.sendall(req)
        reply = json.loads(f.readline())
        with lock:
            done[0] += 1
            slowest[0] = max(slowest[0], time.monotonic() - t0)
            shapes.add(json.dumps({k: (sorted(v) if isinstance(v, dict) else v) for k, v in reply.items()}))
    s.close()
ts = [threading.Thread(target=run) for _ in range(threads)]
for t in ts:
    t.start()
for t in ts:
    t.join()
print(json.dumps({"uid": __import__("os").getuid(), "done": done[0], "slowest": slowest[0], "shapes": sorted(shapes)}))
"""


def as_core(h: HiveProcess, req: dict[str, Any], threads: int = 1, seconds: float = 0.0) -> dict[str, Any]:
    proc = subprocess.run(
        [str(HIVE.parent / "python"), "-c", HAMMER, str(h.priv_sock), json.dumps(req), str(threads), str(seconds)],
        capture_output=True, text=True, timeout=120, **h.as_core())
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out.pop("uid") == h.core_ids[0]
    return out


def one_as_core(h: HiveProcess, req: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """One request as hive-core: (its reply's shape, the time it took)."""
    out = as_core(h, req, 1, 0.0001)
    assert out["done"] == 1, out
    return json.loads(out["shapes"][0]), out["slowest"]


@pytest.mark.attack("privsep.core-misuse",
                    ref="session 13 limit_hits {names}: 10,000 names, over and over, while root asks; OpenSSH monitor.c")
def test_limit_hits_hammered_by_the_core_leaves_root_served(h: HiveProcess) -> None:
    """8 connections of hive-core's asking ``limit_hits`` for 10,000 names (its cages'
    repeated, and names with no cgroup) back to back for 4 s, while root asks ``status``
    and runs ``hive exec``: root's answers stay prompt; a 10,000-name ``limit_hits``
    costs hive-priv no more than a 10,000-name ``status`` did (the poll it replaces)."""
    names = ([ATK, VIC] * 2500) + [f"r20none{i}" for i in range(5000)]
    _, lh = one_as_core(h, {"cmd": "limit_hits", "names": names})
    _, st = one_as_core(h, {"cmd": "status", "names": names})
    base_status = _timed(lambda: h.priv("status"))
    base_exec = _timed(lambda: h.exec(VIC, "true"))
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(
        as_core(h, {"cmd": "limit_hits", "names": names}, threads=8, seconds=4)))
    root_status, root_exec = [], []
    t.start()
    while t.is_alive():
        root_status.append(_timed(lambda: h.priv("status")))
        root_exec.append(_timed(lambda: h.exec(VIC, "true")))
    t.join()
    print(f"one limit_hits of 10,000 names {lh * 1000:.0f} ms, one status {st * 1000:.0f} ms; "
          f"hammer: {out['done']} requests in 4 s, slowest {out['slowest']:.2f} s; root status "
          f"{base_status * 1000:.0f} ms alone, max {max(root_status) * 1000:.0f} ms of {len(root_status)} under "
          f"it; hive exec {base_exec:.2f} s alone, max {max(root_exec):.2f} s under it")
    assert out["shapes"] == [json.dumps({"version": 1, "ok": True, "hits": [ATK, VIC]})], out
    assert lh < st * 1.5 + 0.05, (lh, st)
    assert max(root_status) < 2.0 and max(root_exec) < base_exec + 5.0, (root_status, root_exec)


def _timed(fn: Any) -> float:
    t0 = time.monotonic()
    r = fn()
    assert (r.get("ok") if isinstance(r, dict) else r.returncode == 0), r
    return time.monotonic() - t0


# -- the counts the operator is told ------------------------------------------------------

# In the attacker's cage: every way it might reach its cgroup's counts (to forge, reset or
# hide them, or nest cgroups under its own), then a fork storm at its pids limit.
COUNTS = r"""
import ctypes, signal
libc = ctypes.CDLL(None, use_errno=True)
out = {"proc_cgroup": open("/proc/self/cgroup").read().strip().splitlines()}
def attempt(name, fn):
    try:
        fn()
        out[name] = "done"
    except OSError as e:
        out[name] = errname(e)
def sys_ok(rc):
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
attempt("mkdir_cgroup", lambda: os.mkdir("/sys/fs/cgroup/r20nest"))
attempt("mkdir_pids", lambda: os.mkdir("/sys/fs/cgroup/pids/r20nest"))
attempt("write_events", lambda: open("/sys/fs/cgroup/pids/pids.events", "w").write("max 0\n"))
attempt("mount_cgroup2", lambda: sys_ok(libc.mount(b"none", b"/tmp", b"cgroup2", 0, None)))
attempt("unshare_cgroupns", lambda: sys_ok(libc.unshare(0x02000000)))
attempt("unshare_userns", lambda: sys_ok(libc.unshare(0x10000000)))
children, error = [], None
while len(children) < 1000:
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
out.update(forked=len(children), error=error)
result(**out)
"""


@pytest.mark.attack("cage.limit-hits-hidden",
                    ref="session 13 limit_hits; cgroup v1 'tasks' file in the hive's cgroup; red team round 17 silent OOM")
def test_an_agent_named_tasks_does_not_blind_the_limits_poll(h: HiveProcess) -> None:
    """An agent named ``tasks`` (a valid name, e.g. a spawn the operator approves): on
    cgroup v1 the hive's own cgroup has a file of that name, so its "cgroup" is a file.
    Before this round every read of it failed with ENOTDIR, and with it hive-priv's
    ``limit_hits`` (and ``status``) for all cages: the core's poll failed every 5 s and no
    agent's OOM kills or refused forks reached the operator; the agent could not be
    destroyed either. Now its cage is refused in one line (v1), the poll and ``status``
    answer for the others, a fork storm in another cage is told, and it is destroyed."""
    from test_limit_hits import Troubles

    reply = h.host_call("spawn", name="tasks", spec={"runtime": "command", "command": ["true"]})
    try:
        if is_v2():
            assert reply.get("ok"), reply
        else:
            assert reply.get("ok") is False and "a file of the hive's own cgroup (cgroup v1)" in reply["error"], reply
        shape, _ = one_as_core(h, {"cmd": "limit_hits", "names": [ATK, VIC, "tasks"]})
        want = sorted([ATK, VIC] + (["tasks"] if is_v2() else []))
        assert shape == {"version": 1, "ok": True, "hits": want}, shape
        assert h.priv("status").get("ok"), h.priv("status")
        troubles = Troubles(h)
        try:
            before = h.cgroup(ATK).limit_hits()["pids_refused"]
            res = cage_run(h, ATK, COUNTS, timeout=60)
            print(json.dumps(res))
            # Nothing of its cgroup's is within reach: no cgroupfs, no namespace of its own.
            assert all(v in ("ENOENT", "EROFS", "EACCES", "EPERM") for k, v in res.items()
                       if k in ("mkdir_cgroup", "mkdir_pids", "write_events", "mount_cgroup2", "unshare_cgroupns",
                                "unshare_userns")), res
            assert res["error"] == "EAGAIN" and res["forked"] < PIDS_MAX, res
            refused = h.cgroup(ATK).limit_hits()["pids_refused"]
            assert refused > before
            troubles.wait_for(lambda x: x.startswith(f"agent {ATK}: its process limit ({PIDS_MAX}) refused"),
                              "the refused forks", timeout=30)
            wait_until(lambda: h.agent_status()[ATK].get("pids_refused") == refused, 30, "pids_refused shown")
        finally:
            troubles.close()
    finally:
        assert h.host_call("destroy", name="tasks").get("ok")
    assert "tasks" not in h.agent_status()


@pytest.mark.attack("privsep.core-misuse",
                    ref="session 13 limit_hits {names}: another hive's cages, extra fields, wrong types; OpenSSH monitor.c")
def test_limit_hits_reads_only_its_own_hives_cgroups_and_takes_only_names(h: HiveProcess) -> None:
    """As hive-core: a cage of another hive (a cgroup under another hive's key, which
    would read as an entry of zeros) is not read under its name, nor is this hive's own cgroup
    (a name equal to its key); a name repeated is one entry; an empty list, none; extra
    fields and wrong types are refused in one line; root's view of the cages unchanged."""
    other_key = "h" + "f0" * 6
    assert other_key != hive_key(h.state_dir)
    from hyperhive.priv.cgroups import Cgroup

    other = Cgroup("r20zed", other_key)
    other.create(64, 8)
    try:
        shapes = {
            "other hive's": one_as_core(h, {"cmd": "limit_hits", "names": ["r20zed", ATK]})[0],
            "its key": one_as_core(h, {"cmd": "limit_hits", "names": [hive_key(h.state_dir), other_key]})[0],
            "repeated": one_as_core(h, {"cmd": "limit_hits", "names": [VIC] * 10_000})[0],
            "none": one_as_core(h, {"cmd": "limit_hits", "names": []})[0],
        }
        with unchanged(h):
            refused = {
                "extra": one_as_core(h, {"cmd": "limit_hits", "names": [ATK], "name": ATK})[0],
                "string": one_as_core(h, {"cmd": "limit_hits", "names": ATK})[0],
                "null": one_as_core(h, {"cmd": "limit_hits", "names": None})[0],
                "numbers": one_as_core(h, {"cmd": "limit_hits", "names": [1]})[0],
            }
    finally:
        other.remove()
    assert shapes == {
        "other hive's": {"version": 1, "ok": True, "hits": [ATK]},
        "its key": {"version": 1, "ok": True, "hits": []},
        "repeated": {"version": 1, "ok": True, "hits": [VIC]},
        "none": {"version": 1, "ok": True, "hits": []},
    }, shapes
    assert refused == {
        "extra": {"version": 1, "ok": False, "error": "unknown field 'name'"},
        "string": {"version": 1, "ok": False, "error": "field 'names': Input should be a valid list"},
        "null": {"version": 1, "ok": False, "error": "field 'names': Input should be a valid list"},
        "numbers": {"version": 1, "ok": False, "error": "field 'names.0': Input should be a valid string"},
    }, refused
    assert not any(d.exists() for d in other.dirs)


# As a host uid that is not the agent's but may reach its egress.sock (the agent's group):
# descriptors with the request, then nothing at all, then argv[2] requests in a row.
MANY = 300
OTHER_UID = r"""
import array, json, os, select, socket, sys, time
path = sys.argv[1]
REQ = b"CONNECT example.com:443 HTTP/1.1\r\n\r\n"
def status(s):
    head = b""
    while True:  # Connection: close: the whole reply, to its EOF
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return head.decode(errors="replace")
out = {"uid": os.getuid()}
r, w = os.pipe()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[3])  # the handover socket: egress.sock refuses descriptors (session 28)
s.sendmsg([REQ], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w] * 50))])
os.close(w)
out["with_fds"] = status(s)
s.close()
out["pipe_eof"] = bool(select.select([r], [], [], 3)[0]) and os.read(r, 1) == b""
t0 = time.monotonic()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(path)
out["silent"] = status(s).split("\r\n")[0]
out["silent_s"] = time.monotonic() - t0
out["many"] = []
for _ in range(int(sys.argv[2])):  # as fast as the proxy refuses them
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    s.sendall(REQ)
    out["many"].append(status(s).split("\r\n")[0])
    s.close()
print(json.dumps(out))
"""


@pytest.mark.attack("budget.core-descriptors",
                    ref="session 13 _refuse_unread on the 403 path (SO_PEERCRED uid not the agent's)")
def test_a_uid_not_the_agents_is_refused_after_one_read_and_its_descriptors_closed(h: HiveProcess) -> None:
    """A host process of another uid in the agent's group (the socket is 0660): its
    request with 50 descriptors is refused 403 naming its uid, the descriptors closed by
    the kernel (the pipe reads EOF); a connection that sends nothing gets its 403 after
    the one read's timeout."""
    gid = h.cage(ATK)["gid"]
    sock = str(h.run_dir / "agents" / ATK / "egress.sock")

    def other_uid(many: int) -> dict[str, Any]:
        proc = subprocess.run([str(HIVE.parent / "python"), "-c", OTHER_UID, sock, str(many),
                               str(handover_path(Path(sock)))],
                              capture_output=True, text=True, timeout=60, user=65534, group=gid, extra_groups=[])
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def warnings() -> list[str]:
        return [line for line in h.log_path.read_text(errors="replace").splitlines()
                if f"egress {ATK}: refused" in line and "of uid 65534" in line]

    before = len(warnings())
    t0 = time.monotonic()
    with unchanged(h):
        out = other_uid(MANY)
    short = {k: v for k, v in out.items() if k != "many"}
    print(short, len(out["many"]))
    assert out["with_fds"].startswith("HTTP/1.1 403 Forbidden\r\n"), out
    assert out["with_fds"].endswith(f"\r\n\r\nhive egress: uid 65534 is not agent {ATK}\n"), out
    assert out["pipe_eof"] and out["silent"] == "HTTP/1.1 403 Forbidden", out
    assert REFUSE_READ - 0.1 <= out["silent_s"] < REFUSE_READ + 2, out
    # Each refusal was a warning line (the red team's note): a stranger's loop of
    # connections wrote one each. Now one line per STRANGER_LOG_EVERY seconds, counting.
    assert out["many"] == ["HTTP/1.1 403 Forbidden"] * MANY, short
    logged = warnings()[before:]
    assert 1 <= len(logged) <= (time.monotonic() - t0) / STRANGER_LOG_EVERY + 1, logged
    assert logged[0].split(f"egress {ATK}: ")[1].startswith("refused 1 connection(s) of uid 65534"), logged
    # The burst stopped: its period's end tells the rest (no later event needed).
    wait_until(lambda: len(warnings()) - before >= 2, STRANGER_LOG_EVERY * 3, "the held-back count's line")
    time.sleep(0.5)
    logged = warnings()[before:]
    counts = [int(line.split(" refused ")[1].split(" ")[0]) for line in logged]
    assert sum(counts) == MANY + 2 and len(logged) == 2, logged

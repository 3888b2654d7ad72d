"""Red team re-check (b) of session 29's exit path (``daemon.release_held_cages``,
``hive up``'s ``Supervised.unreaped``): the core stops the cages of agents whose letting go
is still under way at its exit (``received_fds.held_by``, i.e. threads ``acting_for`` an
agent), and ``hive up`` stops *every* cage once the core's main thread has been a zombie
for 5 s.

The hostile party is the runtime uid in a real cage (``cage_run``).

The hole: the handover listener's own close (``Egress.close`` → ``received_fds.close_listener``
in an ``egress-close`` thread) is watched, but acts for nobody (no ``acting_for``). What the
backlog's connections hold is let go of in that thread: a pipe's read end whose mutex the
cage holds (a thread of the cage ``splice``-ing into the write end from a socket nobody
writes to) puts it in ``pipe_release`` (D). At the core's exit ``sockets.close_all`` closes
every listener so; ``held_by()`` is empty (no owner), ``release_held_cages`` stops nothing,
the main thread exits and stays a zombie (the thread in D keeps the process), and after
``UNREAPED_AFTER`` (5 s) ``hive up`` runs ``stop_all_cages``: every agent's cage is killed
(their processes and work with it), not only the hostile one's.

Getting pipes into the backlog at the exit, with no thread ``acting_for`` the agent in D
for 1 s during normal running (which would restart its cage): the cage floods its
handover socket (each connection one locked pipe's read end), so the accept bucket
(100/s) is empty and the backlog (HANDOVER_BACKLOG, 4) stays full; each connection the
core receives (the sender's SIOCOUTQ falls to 0, no hang-up) has its pipe's lock let go
of at once (the core's close sleeps ~1 ms: never escalated); a connection hung up while
the listener is gone (connect refused) keeps its lock. The flood is a turn of AT's
``command`` runtime (an exec's processes die with the core; a turn's do not); our own copy
of each read end is closed in a thread of its own (if the core let go of its copy first,
ours is the last close and sleeps on our own lock, harmlessly, until we let it go).

Fixed the same session, and the case passes since: every letting go off the loop runs in
a thread acting for its agent (``EgressProxy._off_loop``: the listener's close at a stop,
the drop at the cap, a refusal when no thread could be had, retried shortly instead of
run in the loop), so the core's exit stops the hostile cage itself (gone in 0.65 s) and
no other.

Broke (2 CPUs, kernel 6.18), 3 runs of 3, before the fix: SIGTERM to hive-core 1.3-1.5 s into the flood
(~250-300 handovers sent, all let go of within ~1 ms of their receipt, none escalated):
the main thread a zombie at 0.12 s, one or two threads of the core in ``pipe_release``,
the core's own exit stopped no cage ("still under way at the core's exit" never logged),
the process gone only at 5.2 s, when ``hive up``'s unreaped hook ran ``stop_all_cages``:
the bystander BY's cage was killed and started again with the next core. So any core
restart (an upgrade, a crash, ``hive-core`` SIGTERMed by the operator) with a hostile
agent costs every agent its running processes, and 5 s of unreachability instead of 0.5.
Suggested fix: the listener's close acts for its agent (``Egress.close`` runs
``close_listener`` under ``received_fds.acting_for(name)``), so that the escalation and
``release_held_cages`` see it and stop that agent's cage only; more generally, every
``watched()`` on behalf of one agent's descriptors should name the agent (``let_go`` in the
loop thread on no thread, ``_refuse_unread``), or ``release_held_cages`` should also stop
the cages of agents whose listeners were closed in the exit while any watched thread is
still in D after the grace.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hive_fixture import HiveProcess, running_hive

from .conftest import PASSRIGHTS, cage_run, threads_in
from .egress_kit import HANDOVER_KIT

REF = "re-check (b) of session 29's exit path"
AT, BY = "rc29bat", "rc29bby"
CAP = 2

pytestmark = pytest.mark.skipif(not PASSRIGHTS, reason="Linux 6.16+ (SO_PASSRIGHTS) needed")




# In the cage: flood the handover socket with connections each carrying one locked pipe's
# read end; let a lock go as soon as the core has received its connection (or dropped it
# while its listener still serves); once the listener is gone, keep every lock still held.
FLOOD = HANDOVER_KIT + r"""
import errno, fcntl, array
SIOCOUTQ = 0x5411

def outq(s):
    buf = array.array("i", [0])
    fcntl.ioctl(s.fileno(), SIOCOUTQ, buf)
    return buf[0]

def listener_gone():
    s = socket.socket(socket.AF_UNIX)
    s.setblocking(False)
    try:
        s.connect(HO)
        return False
    except (BlockingIOError, InterruptedError):
        return False  # backlog full: it serves
    except OSError as e:
        return e.errno in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        s.close()

# An exec (a probe) is killed when the core goes: the flood is the agent's runtime itself,
# started by a file the test writes in its home.
GO = os.path.expanduser("~/go")
while not os.path.exists(GO):
    time.sleep(0.05)
P = eval(open(GO).read())
os.unlink(GO)
out = []   # [conn, a, b, w, sent_at]
spare = None
sent = released = dropped_rt = kept = 0
gone_at = None
t0 = time.monotonic()
last = t0 - 1
while time.monotonic() - t0 < P["run_s"]:
    if gone_at is None:
        if spare is None:
            spare = locked_pipe(settle=0)
            time.sleep(0.002)  # the splice takes the pipe's lock
        a, b, r, w = spare
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(HO)
            socket.send_fds(s, [b"\0"], [r])
            # Our copy closed in a thread of its own: if the core has already let go of
            # its copy, ours is the last close and waits for our own lock, harmlessly.
            threading.Thread(target=os.close, args=(r,), daemon=True).start()
            out.append([s, a, b, w, time.monotonic()])
            spare = None
            sent += 1
        except (BlockingIOError, InterruptedError):
            s.close()
        except OSError:
            s.close()
            if listener_gone():
                gone_at = time.monotonic() - t0
    still = []
    for item in out:
        s, a, b, w, at = item
        try:
            q = outq(s)
        except OSError:
            q = 0
        if q:
            still.append(item)
            continue
        hup = bool(select.select([s], [], [], 0)[0])
        if hup and (gone_at is not None or listener_gone()):
            if gone_at is None:
                gone_at = time.monotonic() - t0
            if item[4] is not None:
                kept += 1
                item[4] = None
            still.append(item)  # keep its lock: the core's exit is letting go of it
            continue
        if hup:
            dropped_rt += 1
        b.send(b"x")  # the splice returns: the lock is let go of
        released += 1
        for x in (s, a, b):
            x.close()
        os.close(w)
    out = still
    time.sleep(0.0005)
    if time.monotonic() - last > 0.25:
        last = time.monotonic()
        with open(os.path.expanduser("~/flood.json"), "w") as f:
            f.write(repr(dict(t=round(last - t0, 2), sent=sent, released=released, dropped_while_serving=dropped_rt,
                              kept=kept, listener_gone_at=gone_at, out=len(out))))
with open(os.path.expanduser("~/flood.json"), "w") as f:
    f.write(repr(dict(sent=sent, released=released, dropped_while_serving=dropped_rt, kept=kept,
                      listener_gone_at=gone_at)))
"""


@pytest.fixture(scope="module")
def h() -> Iterator[HiveProcess]:
    agents: dict[str, dict[str, Any]] = {
        # The hostile runtime: it lives as long as the cage (a probe dies with the core).
        AT: {"runtime": "command", "command": ["python3", "-c", BOOT], "peers": []},
        BY: {"runtime": "command", "command": ["sleep", "infinity"], "peers": []},
    }
    yield from running_hive(HiveProcess(agents, sections={"egress": {"max_connections": CAP, "cpu": 0.25}}))


# AT's runtime: waits for the flood's script in its home, then runs it.
BOOT = """
import os, time
p = os.path.expanduser("~/flood.py")
while not os.path.exists(p + ".ready"):
    time.sleep(0.05)
try:
    exec(compile(open(p).read(), p, "exec"))
except BaseException:
    import traceback
    open(p + ".err", "w").write(traceback.format_exc())
    raise
"""

READ = """
import os
p = os.path.expanduser("~/flood.json")
e = os.path.expanduser("~/flood.py.err")
result(flood=open(p).read() if os.path.exists(p) else None, err=open(e).read()[-1500:] if os.path.exists(e) else None)
"""


def start_flood(h: HiveProcess, run_s: float) -> None:
    cage_run(h, AT, """
import os
p = os.path.expanduser("~/flood.py")
open(p, "w").write(P["flood"])
open(p + ".ready", "w").close()
open(os.path.expanduser("~/go"), "w").write(repr({"run_s": P["run_s"]}))
result()
""", flood=FLOOD, run_s=run_s)
    # The flood is a turn of AT's runtime (a turn's process outlives the core's restart;
    # an exec does not).
    assert h.host_call("send", to=AT, body="flood")["ok"]


def leader_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return "gone"
    return st[st.rfind(")") + 2]


@pytest.mark.attack("budget.exhaustion", ref=REF + ": locked pipes in the handover backlog at the core's exit")
def test_a_core_restart_does_not_stop_every_cage(h: HiveProcess) -> None:
    """As the runtime uid of AT: the flood above for a few seconds; SIGTERM to hive-core
    (a restart: an upgrade, a crash) while it runs. Held if the core is gone within 3 s
    (0.5 s + stops, the design's bound for a cage holding a close) and the bystander BY's
    cage was not stopped (its init pid the same). Broke: the core's ``egress-close`` thread
    sleeps in ``pipe_release`` for nobody, the core's exit stops nothing, its main thread is a
    zombie, and after 5 s ``hive up`` stops every cage."""
    core = h.core_pid()
    assert core is not None
    by_pid = h.cage(BY).get("pid")
    log0 = len(h.log_tail(100000))
    box: dict[str, Any] = {}
    start_flood(h, 10.0)
    t_start = time.monotonic()
    while time.monotonic() - t_start < 10:  # the flood under way 1 s: the bucket empty, the backlog full
        seen = cage_run(h, AT, READ).get("flood")
        if seen and eval(seen)["t"] >= 1.0:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the flood did not start: {cage_run(h, AT, READ)}")
    served = {"core threads in pipe_release before": len(threads_in(core, "pipe_release"))}
    t0 = time.monotonic()
    os.kill(core, signal.SIGTERM)
    gone = None
    zombie_at = None
    held_threads: dict[str, str] = {}
    while time.monotonic() - t0 < 12:
        st = leader_state(core)
        if st == "gone":
            gone = round(time.monotonic() - t0, 2)
            break
        if st == "Z" and zombie_at is None:
            zombie_at = round(time.monotonic() - t0, 2)
        held_threads.update(threads_in(core, "pipe_release"))
        time.sleep(0.02)
    t1 = time.monotonic()
    while time.monotonic() - t1 < 30:
        new = h.core_pid()
        if new is not None and new != core:
            break
        time.sleep(0.1)
    h.wait_running()
    box.update(cage_run(h, AT, READ))
    log = h.log_tail(100000)[log0:] if len(h.log_tail(100000)) > log0 else h.log_tail(400)
    by_after = h.cage(BY).get("pid")
    fig = {**served, "core gone after s": gone, "main thread a zombie after s": zombie_at,
           "threads seen in pipe_release (tid: name)": held_threads,
           "core stopped AT's cage itself": "is still under way at the core's exit" in log,
           "hive up stopped every cage": "stopping the cages" in log,
           "bystander's cage restarted": by_pid != by_after, "probe": box}
    print(f"\ncore restart during a handover-backlog flood: {fig}")
    assert gone is not None and gone < 3.0 and by_pid == by_after, (
        "an agent holding pipe locks in its handover backlog makes the core's exit hang in the "
        "egress-close thread (acting for nobody, so release_held_cages stops nothing), and "
        f"hive up's unreaped hook stops every agent's cage 5 s later: {fig}")

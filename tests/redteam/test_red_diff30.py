"""Red team of session 30's change: ``hive exec``'s stdio are unix socket pairs, not pipes
(``priv/exec_relay._pair``), so a cage process handed the exec's end can no longer hold a
pipe's lock and hive-priv's relay with it (``test_red_exec30.py``).

The hostile agent's setup is the one of ``test_red_exec30.py``: a process of the agent's
that outlives the exec (a first ``--as-agent`` exec, in the background) listens on a socket
in the agent's home; the operator runs a command the agent controls (``--as-agent``), which
hands its stdout (or its pty's slave) to that process and exits. The exec's init kills the
command's own tree, not the holder, which keeps the descriptor and plays with it.

Attacks (2 CPUs, kernel 6.18.44, ``CONFIG_AF_UNIX_OOB=y``):

1. ``test_an_oob_byte_in_the_execs_stdout_never_holds_the_operators_exec[stdout|stderr]``
   -- BROKE, fixed the same session (passes since): hive-priv's ends take an out-of-band
   byte inline (``SO_OOBINLINE`` 1: relayed as the byte it is), never block (non-blocking,
   a read that finds nothing is "no data"), and ``_pump_out`` checks the drain's bounds
   every turn, whatever poll said. What broke:
   The holder writes "before\n" into the exec's stdout (or stderr) socket (after all the
   command says), sends one byte with ``MSG_OOB`` 0.1 s later and keeps the socket open;
   the command exits 0.3 s after the handover.
   hive-priv's end (``SO_OOBINLINE`` off) now has an skb in its receive queue, so ``poll``
   says POLLIN (and POLLPRI); ``_pump_out`` then calls a *blocking* ``os.read``, and
   ``unix_stream_read_generic`` drops the out-of-band skb (``manage_oob``), finds the queue
   empty and sleeps until more data or the peer's close. The drain's limits (``DRAIN_IDLE``
   0.5 s, ``DRAIN_MAX`` 10 s) are checked only between reads, so they never apply.
   Measured: ``hive exec`` still running 8 s after it started (the command exited after
   0.3 s), one hive-priv thread in ``unix_stream_read_generic`` (state ``S``); after the
   operator killed the CLI, hive-priv still held the operator's stdout (no EOF on it 2 s
   later); other execs meanwhile worked; only the holder's exit let go (EOF 0.12 s after
   it). Each such exec keeps a thread of root's hive-priv and the operator's three
   descriptors for as long as the agent likes. With pipes a poll-ready read never
   blocked: the OOB byte is new with sockets. The same class as test_red_exec30's break,
   in S instead of D (so a watchdog for uninterruptible sleeps would not see it either).
   Suggested fix: hive-priv's ends of the stdout/stderr pairs non-blocking
   (``os.set_blocking(out_r, False)`` and ``err_r``, as the pty master already is;
   ``_pump_out`` already retries on ``BlockingIOError``: checked on this kernel, a
   non-blocking read of an OOB-only queue gives EAGAIN once and poll then reports
   nothing), and/or ``SO_OOBINLINE`` 1 on them (the byte is then ordinary data). A
   belt: check the drain deadlines in ``_pump_out`` also when poll keeps saying ready.

2. ``test_descriptors_credentials_shutdown_and_a_flood_after_exit_stay_bounded`` -- HELD.
   The holder, handed the exec's stdout and stdin, tries ``SCM_RIGHTS`` into stdout
   (EPERM: hive-priv's end has ``SO_PASSRIGHTS`` 0), sends ``SCM_CREDENTIALS`` with data
   (accepted, relayed as plain bytes), a zero-length send, ``shutdown(SHUT_RD)``, writes
   (plain and ``MSG_OOB``) into the stdin socket (EPIPE both: hive-priv's end is shut for
   reading), then floods 64 KiB every 20 ms after the command exited. The operator's
   ``hive exec`` returned 0 in 10.46 s (DRAIN_MAX), 31.6 MB relayed, no hive-priv thread
   left in a unix read, the next exec fine.

3. ``test_a_pty_slave_holder_never_holds_the_masters_close`` (``hive exec --tty``) -- HELD.
   The holder gets the pty's slave, stops its output (``TCXONC TCOOFF``), parks two
   threads in blocking writes to it (holding the slave's ldisc reference and write lock),
   loops ``TCIOFF`` in two (waits for the write lock inside the ldisc) and ``TIOCSETD`` in
   four (would hold the slave's ``tty_lock`` up to 5 s each while waiting for the ldisc,
   which the master's close needs: ``pty_close`` hangs the slave up under its
   ``tty_lock`` and waits, uninterruptibly, for the ldisc's users). ``TIOCSETD`` is EPERM
   (the cage's seccomp), and the hang-up wakes the blocked writers (EIO), so the exec
   returned in 1.04 s. On the host (a plain pty, no seccomp) TIOCSETD's
   ``TTY_LDISC_CHANGING`` made the blocked writers return EAGAIN and the master's close
   took < 1 ms. No ldisc user that ignores a hang-up was found (``userfaultfd`` refused,
   no ``/dev/fuse``: no page fault to park a tty write in).

4. ``test_sigterm_in_the_set_up_before_starting_leaves_nothing[agents-mount|priv.sock]``
   (``hive up``'s handlers taken first) -- HELD. SIGTERM the moment ``hive up`` has
   mounted its agents tmpfs (polled in its mountinfo, 1 ms) or bound priv.sock, before
   "starting": exit 0 in 0.06-0.09 s ("starting", then "stopping (it was still
   starting)"), no child, cage process, priv.sock, core socket or mount left. A SIGTERM
   before ``run_locked`` (during Python's imports) still takes the default action: not
   in this change's reach.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HIVE, HiveProcess, children, running_hive

from .conftest import threads_in
from .exec_kit import start_holder
from .test_launcher import launch  # noqa: F401 (the fixture)

REF = "red team of session 30's change: the exec relay's socket pairs"
AGENTS = {"rdalice": {"runtime": "command", "command": ["true"]}}
NAME = "rdalice"
# A relay thread waiting in a unix stream read (the OOB attack) or in a tty lock.
UNIX_READ = ("unix_stream_data_wait", "unix_stream_read_generic")
TTY_FRAMES = ("tty_lock", "tty_release", "tty_ldisc", "ldsem", "__tty_hangup", "tty_vhangup")


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(AGENTS))


def _dump(pid: int) -> dict[str, str]:
    """Every thread of pid: state and the first kernel frames of its stack."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/stack") as f:
                frames = [ln.split()[1].split("+")[0] for ln in f.read().splitlines()[:4]]
            out[t] = ",".join(frames)
        except OSError:
            pass
    st = _states(pid, dict.fromkeys(out, ""))
    return {t: f"{st.get(t)} {v}" for t, v in out.items()}


def _states(pid: int, tids: dict[str, str]) -> dict[str, str]:
    out = {}
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                out[t] = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            pass
    return out


# The holder: listens, receives one descriptor (the exec's stdout or pty slave), plays MODE
# on it, keeps it until ~/stop-TAG (or 40 s), reports what happened as one JSON line.
HOLDER = r"""
import array, errno, fcntl, struct, sys, termios, threading, time
mode, tag = sys.argv[1], sys.argv[2]
stop = os.path.expanduser(f"~/stop-{tag}")
msg, fds = take(tag, 2)
got, stdin = fds[0], fds[1]  # the stream to play with; the exec's stdin, for "misc"
rep = {}
if mode == "oob":
    s = socket.socket(fileno=got)
    s.send(b"before\n")  # relayed: the stream works
    time.sleep(0.1)  # after all the command says ("done" came before the handover)
    rep["oob"] = s.send(b"!", socket.MSG_OOB)
elif mode == "misc":
    s = socket.socket(fileno=got)
    r, w = os.pipe()
    try:
        s.sendmsg([b"fd\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
        rep["rights"] = "sent"
    except OSError as e:
        rep["rights"] = errno.errorcode[e.errno]
    try:
        creds = struct.pack("3i", os.getpid(), os.getuid(), os.getgid())
        s.sendmsg([b"cred\n"], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])
        rep["creds"] = "sent"
    except OSError as e:
        rep["creds"] = errno.errorcode[e.errno]
    s.send(b"")
    s.shutdown(socket.SHUT_RD)
    i = socket.socket(fileno=stdin)  # into hive-priv's end of the stdin pair: shut for reading
    for flags in (0, socket.MSG_OOB):
        try:
            i.send(b"back", flags)
            rep.setdefault("stdin", []).append("sent")
        except OSError as e:
            rep.setdefault("stdin", []).append(errno.errorcode[e.errno])
    # wait for the command to be gone (its exit is the operator's "done"), then flood
    time.sleep(0.6)
    def flood():  # 64 KiB every 20 ms (~3 MB/s): never idle, never the operator's memory
        try:
            while True:
                s.send(b"f" * 65536)
                time.sleep(0.02)
        except OSError as e:
            rep["flood_end"] = errno.errorcode.get(e.errno, str(e))
    threading.Thread(target=flood, daemon=True).start()
elif mode == "tty":
    fcntl.ioctl(got, termios.TCXONC, termios.TCOOFF)
    res = []
    def writer():
        try:
            os.write(got, b"y" * 100000)
            res.append("wrote")
        except OSError as e:
            res.append(errno.errorcode[e.errno])
    setd_res = set()
    def setd():
        while not os.path.exists(stop):
            try:
                fcntl.ioctl(got, termios.TIOCSETD, struct.pack("i", 0))
                setd_res.add("ok")
            except OSError as e:
                setd_res.add(errno.errorcode[e.errno])
    def ioff():  # TCIOFF waits for the write lock (held by the blocked writers) in the ldisc
        while not os.path.exists(stop):
            try:
                fcntl.ioctl(got, termios.TCXONC, termios.TCIOFF)
            except OSError:
                pass
    for _ in range(2):
        threading.Thread(target=writer, daemon=True).start()
    time.sleep(0.2)
    for _ in range(4):
        threading.Thread(target=setd, daemon=True).start()
    for _ in range(2):
        threading.Thread(target=ioff, daemon=True).start()
    rep["writers"] = res
    rep["setd"] = setd_res
    time.sleep(1.0)  # the exec's command has exited and its master been closed meanwhile
    rep["setd"] = sorted(setd_res)
print(json.dumps(rep), flush=True)
deadline = time.monotonic() + 40
while not os.path.exists(stop) and time.monotonic() < deadline:
    time.sleep(0.05)
print(json.dumps(rep), flush=True)
os._exit(0)
"""

# The operator's exec of a command the agent wrote: says "done", hands its stdout on, exits.
SEND = r"""
import os, socket, sys, time
print("done", flush=True)
s = socket.socket(socket.AF_UNIX)
s.connect(os.path.expanduser(f"~/hold-{sys.argv[1]}.sock"))
socket.send_fds(s, [b"x"], [int(sys.argv[2]) if len(sys.argv) > 2 else 1, 0])
time.sleep(0.3)
"""


def _holder(hive: HiveProcess, mode: str, tag: str) -> subprocess.Popen[str]:
    return start_holder(hive, NAME, HOLDER, mode, tag)


def _stop(hive: HiveProcess, holder: subprocess.Popen[str], tag: str) -> None:
    hive.exec(NAME, "touch", f"/home/agent/stop-{tag}", timeout=15)
    try:
        holder.wait(timeout=30)
    except subprocess.TimeoutExpired:
        holder.kill()
        holder.wait()


def _eof_within(fd: int, seconds: float) -> bool:
    """Whether the pipe ``fd`` (the operator's stdout, read side) reaches EOF in time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if r and not os.read(fd, 65536):
            return True
    return False


@pytest.mark.attack("operator.exec", ref=REF + ": an MSG_OOB byte makes the relay's read block")
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_an_oob_byte_in_the_execs_stdout_never_holds_the_operators_exec(hive: HiveProcess, stream: str) -> None:
    priv = hive.priv_pid()
    assert priv is not None
    holder = _holder(hive, "oob", "oob")
    # The operator's hive exec, its stdout and stderr pipes of ours (so we see when hive-priv
    # lets go of them: EOF once the CLI is gone and hive-priv has closed its copies).
    cli = subprocess.Popen(
        [str(HIVE), "--run-dir", str(hive.run_dir), "exec", "--as-agent", NAME, "--",
         "python3", "-c", SEND, "oob", "2" if stream == "stderr" else "1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert cli.stdout is not None and cli.stderr is not None
    held = None
    try:
        t0 = time.monotonic()
        try:
            out, err = cli.communicate(timeout=8)
        except subprocess.TimeoutExpired:
            stuck = threads_in(priv, *UNIX_READ)
            states = _states(priv, stuck)
            stacks = {t: v for t, v in _dump(priv).items() if t in stuck}
            cli.kill()  # the operator gives up: ^C on hive exec
            cli.wait()
            # hive-priv still holds the operator's descriptors: no EOF on its stdout pipe
            kept = not _eof_within(cli.stdout.fileno(), 2.0)
            # meanwhile the hive serves other execs (the stuck relay is one thread)
            other = hive.exec(NAME, "echo", "other", timeout=15)
            held = (f"hive exec still running {8.0:.0f} s after it started (the command exited "
                    f"after 0.3 s); hive-priv threads in a unix read: {stacks}, states {states}; "
                    f"operator's stdout still held by hive-priv 2 s after the CLI was killed: {kept}; "
                    f"another exec meanwhile: rc {other.returncode} {other.stdout!r}")
        else:
            took = time.monotonic() - t0
            assert cli.returncode == 0, err
            got = out if stream == "stdout" else out + err
            # The out-of-band byte is relayed as the byte it is (SO_OOBINLINE on ours)
            assert got == b"done\nbefore\n!", (out, err)
            assert took < 5, took
            assert not threads_in(priv, *UNIX_READ)
    finally:
        t1 = time.monotonic()
        _stop(hive, holder, "oob")
        if held is not None:  # the relay lets go only when the holder does
            released = _eof_within(cli.stdout.fileno(), 5.0)
            held += (f"; after the holder's exit: operator's stdout at EOF {released} "
                     f"({time.monotonic() - t1:.2f} s), threads in a unix read "
                     f"{threads_in(priv, *UNIX_READ)}")
        cli.stdout.close()
        cli.stderr.close()
    if held is not None:
        pytest.fail(held)
    again = hive.exec(NAME, "sh", "-c", "echo next; echo err >&2", timeout=15)
    assert (again.returncode, again.stdout, again.stderr) == (0, "next\n", "err\n")


@pytest.mark.attack("operator.exec", ref=REF + ": rights, credentials, shutdown, a flood after exit")
def test_descriptors_credentials_shutdown_and_a_flood_after_exit_stay_bounded(hive: HiveProcess) -> None:
    priv = hive.priv_pid()
    assert priv is not None
    holder = _holder(hive, "misc", "misc")
    assert holder.stdout is not None
    try:
        t0 = time.monotonic()
        proc = hive.exec(NAME, "python3", "-c", SEND, "misc", input=b"", timeout=25)
        took = time.monotonic() - t0
        rep = json.loads(holder.stdout.readline())
        print(f"misc: took {took:.2f} s, {len(proc.stdout)} bytes, holder {rep}")
        assert rep["rights"] == "EPERM", rep  # SO_PASSRIGHTS 0 on hive-priv's end
        assert rep["creds"] == "sent", rep
        assert rep["stdin"] == ["EPIPE", "EPIPE"], rep  # hive-priv's stdin end: SHUT_RD
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert b"fd\n" not in out
        assert b"cred\n" in out and b"done\n" in out
        assert out.count(b"f") > 0  # the flood reached the operator, within the drain
        # the drain's cap: DRAIN_MAX (10 s) after the command's exit, plus start-up
        assert took < 14, took
        time.sleep(0.3)
        assert not threads_in(priv, *UNIX_READ)
    finally:
        _stop(hive, holder, "misc")
    again = hive.exec(NAME, "sh", "-c", "echo next", timeout=15)
    assert (again.returncode, again.stdout) == (0, "next\n")


@pytest.mark.attack("operator.exec", ref=REF + ": a pty slave's holder and the master's close")
def test_a_pty_slave_holder_never_holds_the_masters_close(hive: HiveProcess) -> None:
    priv = hive.priv_pid()
    assert priv is not None
    holder = _holder(hive, "tty", "tty")
    assert holder.stdout is not None
    try:
        t0 = time.monotonic()
        try:
            proc = hive.exec(NAME, "python3", "-c", SEND, "tty",
                             flags=("--as-agent", "--tty"), timeout=20)
        except subprocess.TimeoutExpired:
            stuck = threads_in(priv, *TTY_FRAMES)
            pytest.fail(f"hive exec -t still running after 20 s; hive-priv threads in a tty lock: "
                        f"{stuck}, states {_states(priv, stuck)}; all: {_dump(priv)}")
        took = time.monotonic() - t0
        rep = json.loads(holder.stdout.readline())
        print(f"pty: took {took:.2f} s, holder {rep}")
        assert proc.returncode == 0, proc.stderr
        assert "done" in proc.stdout
        assert took < 5, (took, rep)
        assert rep["setd"] == ["EPERM"], rep  # the cage's seccomp refuses TIOCSETD
        assert not threads_in(priv, *TTY_FRAMES)
    finally:
        _stop(hive, holder, "tty")


# -- hive up: SIGTERM in the set-up before "starting" ----------------------------------

def _early_point(pid: int, run_dir: Path, point: str) -> bool:
    if point == "priv.sock":
        return (run_dir / "priv.sock").exists()
    try:  # hive up's own mount table: the agents tmpfs is mounted before priv.sock is bound
        return f" {run_dir}/agents " in Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return False


@pytest.mark.attack("operator.exec", ref="red team of session 30's change: hive up's early signal handlers")
@pytest.mark.parametrize("point", ["agents-mount", "priv.sock"])
def test_sigterm_in_the_set_up_before_starting_leaves_nothing(launch: Any, point: str) -> None:
    """SIGTERM the moment hive up has mounted its agents tmpfs (or bound priv.sock),
    before it said "starting": it must exit 0 within the stop timeout, say no "ready",
    and leave no child, no cage process, no priv.sock, no core socket, no mount."""
    h = launch({"rdsig": {"runtime": "command", "command": ["true"]}}, start=False)
    proc = subprocess.Popen(h.cmd(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, cwd=h.base)
    try:
        deadline = time.monotonic() + 20
        while not _early_point(proc.pid, h.run_dir, point):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"{point} never appeared"
            time.sleep(0.001)
        kids = children(proc.pid)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"up SIGTERM at {point}: rc {proc.returncode} in {took:.2f} s; out {out!r}")
    assert "hive: ready" not in out, out
    assert proc.returncode == 0, (out, err)
    time.sleep(0.5)
    assert not [k for k in kids if Path(f"/proc/{k}").exists()], "children left behind"
    assert not h.cgroup("rdsig").pids()
    assert not h.priv_sock.exists()
    left = sorted(p.name for p in h.run_dir.glob("*.sock")) if h.run_dir.exists() else []
    assert not left, left
    assert not [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                if f" {h.run_dir}/" in ln]

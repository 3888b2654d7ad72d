"""Session 30: the operator's ``hive exec`` of a command the agent controls (a script in
its home, a dotfile under ``--trust-home``, anything run ``--as-agent``).

hive-priv relays the exec's stdin, stdout and stderr (``priv/exec_relay.py``). Up to
session 29 those were pipes, and a pipe is one object with one lock (``pipe->mutex``)
that both ends take. The command hands its stdout (or stdin) to a process of the agent's
that outlives the exec (the exec's init kills only the exec's own tree); that process
``splice``s from a socket nobody writes to into it, which holds the lock while it waits
for data (``splice_file_to_pipe``), or from it into a socket nobody reads, which holds
the lock while it waits for room (``iter_file_splice_write``). hive-priv's read, write
and last close of its own end take the same lock, uninterruptibly (``D``): the relay's
thread slept for as long as that process lived, the exec never ended, the operator's
``hive exec`` never returned, and each such exec kept a thread and the operator's
descriptors in root's hive-priv. In Known limits since session 29 (noticed by its
re-check, not tried).

Broke before the change (2 CPUs, kernel 6.18): stdout, ``hive exec`` still running at the
test's 15 s timeout, a hive-priv thread in a pipe's frames; stdin, the same, and the
holder's own exec did not end within 30 s of its stop either.

Now each of the three is a unix socket pair (``exec_relay._pair``), as OpenSSH's sshd
gives a command unless built with ``USE_PIPES``: hive-priv's end and the exec's are two
sockets with a lock each, and ``splice`` needs a pipe on one side, so a cage process can splice only
through a pipe of its own, whose lock is its own. hive-priv's ends refuse descriptors
(``SO_PASSRIGHTS`` 0), so nothing the agent sends them is closed in a relay thread.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from hive_fixture import HiveProcess

from .conftest import threads_in
from .exec_kit import start_holder

REF = "session 30: the exec relay's pipes"
# Kernel frames of a thread waiting on a pipe's lock (or in a pipe at all).
PIPE_FRAMES = ("pipe_release", "pipe_read", "pipe_write", "splice")  # anon_pipe_* since 6.16

# A process of the agent's that outlives the exec (here a first exec, as the agent: its own
# tree) listens on a socket in the agent's home. The operator's exec runs a command the
# agent wrote (SEND), which hands it its stdout (or stdin) and exits; the exec's init kills
# what the command started, not the listener. The listener first tries the exec's
# descriptor through /proc (refused: a pipe of root's, mode 0600; a socket is no file),
# then splices from a socket nobody writes to into what it was handed (or from it into a
# socket nobody reads): for a pipe, that takes the pipe's lock, and keeps it. If the
# kernel refuses (no pipe on either side) it splices through a pipe of its own. It holds
# until ~/stop-WHICH.
HOLDER = r"""
import sys, threading, time
which = sys.argv[1]
fd = 1 if which == "stdout" else 0
msg, fds = take(which, 1)
got = fds[0]
try:
    os.close(os.open(f"/proc/{int(msg)}/fd/{fd}", os.O_WRONLY if fd == 1 else os.O_RDONLY))
    through_proc = "opened"
except OSError as e:
    through_proc = f"refused {e.errno}"
a, b = socket.socketpair()            # b never writes: a splice from a waits forever
full, peer = socket.socketpair()      # peer never reads: a splice into full waits forever
full.setblocking(False)
try:
    while True:
        full.send(b"x" * 65536)
except BlockingIOError:
    pass
full.setblocking(True)
src, dst = (a.fileno(), got) if fd == 1 else (got, full.fileno())
r, w = os.pipe()
try:
    os.splice(src, dst, 65536, flags=os.SPLICE_F_NONBLOCK)
    direct = "took"
except BlockingIOError:
    direct = "took"  # a pipe: the splice works, it has just nothing to move yet
except OSError as e:
    direct = f"refused {e.errno}"
if direct == "took":
    threading.Thread(target=os.splice, args=(src, dst, 65536), daemon=True).start()
elif fd == 1:  # through a pipe of our own: its lock is ours
    threading.Thread(target=os.splice, args=(src, w, 65536), daemon=True).start()
    threading.Thread(target=os.splice, args=(r, dst, 65536), daemon=True).start()
else:
    threading.Thread(target=os.splice, args=(src, w, 65536), daemon=True).start()
    threading.Thread(target=os.splice, args=(r, dst, 65536), daemon=True).start()
print(json.dumps({"direct": direct, "through_proc": through_proc}), flush=True)
stop = os.path.expanduser(f"~/stop-{which}")
deadline = time.monotonic() + 40
while not os.path.exists(stop) and time.monotonic() < deadline:
    time.sleep(0.05)
os._exit(0)
"""

# The operator's exec of a command the agent wrote: it hands its stdio on and exits.
SEND = r"""
import os, socket, sys, time
fd = 1 if sys.argv[1] == "stdout" else 0
s = socket.socket(socket.AF_UNIX)
s.connect(os.path.expanduser(f"~/hold-{sys.argv[1]}.sock"))
socket.send_fds(s, [str(os.getpid()).encode()], [fd])
time.sleep(0.3)
"""


@pytest.mark.attack("operator.exec", ref=REF + ": a splice on the exec's stdio holds the pipe's lock")
@pytest.mark.parametrize("which", ["stdout", "stdin"])
def test_a_splice_on_the_execs_stdio_never_holds_the_operators_exec(
    caged_hive: HiveProcess, which: str
) -> None:
    priv = caged_hive.priv_pid()
    assert priv is not None
    holder = start_holder(caged_hive, "bob", HOLDER, which)
    assert holder.stdout is not None
    try:
        t0 = time.monotonic()
        # For stdin the operator's bytes wake the holder's splice, which then waits for
        # room with the lock held, and the operator's EOF is hive-priv's close of its end.
        try:
            proc = caged_hive.exec("bob", "python3", "-c", SEND, which,
                                   input="typed\n" * 1000, timeout=15)
        except subprocess.TimeoutExpired:
            stuck = threads_in(priv, *PIPE_FRAMES)
            pytest.fail(f"hive exec still running after 15 s; hive-priv threads in a pipe: {stuck}")
        took = time.monotonic() - t0
        how = json.loads(holder.stdout.readline())
        # ENXIO: a socket is not opened through /proc (hive-priv's pipes, root's and 0600,
        # were EACCES: handing one over was the way in)
        assert how["through_proc"] == "refused 6", how
        assert how["direct"] == "refused 22", how  # EINVAL: a socket on both sides
        assert proc.returncode == 0, proc.stderr
        assert took < 5, took  # 0.3 s, the drain's grace (DRAIN_IDLE 0.5 s), the CLI's start
        time.sleep(0.3)
        stuck = threads_in(priv, *PIPE_FRAMES)
        assert not stuck, f"hive-priv threads in a pipe: {stuck}"
        again = caged_hive.exec("bob", "sh", "-c", "echo next; echo err >&2", timeout=15)
        assert (again.returncode, again.stdout, again.stderr) == (0, "next\n", "err\n")
    finally:
        caged_hive.exec("bob", "touch", f"/home/agent/stop-{which}", timeout=15)
        holder.wait(timeout=30)

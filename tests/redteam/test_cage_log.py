"""A compromised harness against the host's disk: cage.log.

The harness held cage.log (in hive-priv's state directory, on the disk hive.db is on) as
its stdout and stderr, opened for appending: a compromised harness could write until
that disk was full. Now its output reaches cage.log only through init, which relays at
most ``HARNESS_LOG_MAX`` bytes a cage start and gives later harnesses /dev/null once it
is spent; hive-priv moves a cage.log past ``CAGE_LOG_ROTATE`` to cage.log.1 at the
cage's next start; init's own writes there never raise (a full disk must not end the
cage). Each case but the last failed before (the first wrote all 8 MiB into cage.log).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hive_fixture import HiveProcess, running_hive, wait_until
from hyperhive.cage.init import HARNESS_LOG_MAX
from hyperhive.priv.cages import CAGE_LOG_ROTATE

from .conftest import harness_or_none, pidfd_getfd

REF = "session 25: cage.log, the harness's stdout and stderr on the host's disk"
NAME = "clflood"
FLOOD = 8 << 20
NOTICE = "the harness's output reached"


@pytest.fixture(scope="module")
def h() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess({NAME: {"runtime": "command", "command": ["true"], "peers": []}}))


def cage_log(h: HiveProcess, suffix: str = "") -> Path:
    return h.state_dir / "priv" / "cages" / NAME / f"cage.log{suffix}"



def write_for(fd: int, total: int, seconds: float) -> int:
    """Write ``total`` bytes of log lines to ``fd`` (non-blocking) for at most ``seconds``;
    what was written."""
    os.set_blocking(fd, False)
    line = b"harness: " + b"x" * 1014 + b"\n"
    written, end = 0, time.monotonic() + seconds
    while written < total and time.monotonic() < end:
        try:
            written += os.write(fd, line)
        except BlockingIOError:
            time.sleep(0.001)
    return written


@pytest.mark.attack("budget.exhaustion", ref=REF)
def test_a_compromised_harness_writes_at_most_the_budget_into_cage_log(h: HiveProcess) -> None:
    """The harness writes 8 MiB to its stderr. All of it is taken (init drains the pipe:
    the harness never blocks for good), cage.log grows by at most HARNESS_LOG_MAX and
    init's one notice, and the harness lives on. The next harness (this one killed) has
    /dev/null for its output; cage.log gets only init's line about the restart."""
    log = cage_log(h)
    before = log.stat().st_size
    pid = h.harness_pid(NAME)
    fd = pidfd_getfd(pid, 2)
    try:
        written = write_for(fd, FLOOD, 30)
    except BrokenPipeError:  # init closed its end: the harness ended (once in CI, under load)
        alive = harness_or_none(h, NAME)
        raise AssertionError(
            f"init let go of the log pair: harness {pid} then, {alive} now;"
            f" cage.log ends {log.read_text(errors='replace')[-1500:]!r}"
        ) from None
    finally:
        os.close(fd)
    time.sleep(0.5)  # init's last reads
    grew = log.stat().st_size - before
    text = log.read_text(errors="replace")
    print(f"written {written}, cage.log grew {grew} (budget {HARNESS_LOG_MAX})")
    assert written == FLOOD, written
    assert 0 < grew <= HARNESS_LOG_MAX + 256, grew
    assert text.count(NOTICE) == 1, text[-300:]
    os.kill(pid, 0)  # alive

    os.kill(pid, signal.SIGKILL)
    new = wait_until(lambda: (p := harness_or_none(h, NAME)) and p != pid and p, 30, "a new harness")
    wait_until(lambda: "harness exited" in log.read_text(errors="replace")[len(text) :], 10,
               "init's line about the restart")
    for k in (1, 2):
        assert os.readlink(f"/proc/{new}/fd/{k}") == "/dev/null", k
    fd = pidfd_getfd(new, 2)
    try:
        assert write_for(fd, 1 << 20, 10) == 1 << 20
    finally:
        os.close(fd)
    time.sleep(0.3)
    tail = log.read_text(errors="replace")[len(text) :]
    assert "x" * 100 not in tail, tail[:300]
    assert "harness exited with status" in tail, tail


@pytest.mark.attack("budget.exhaustion", ref=REF)
def test_the_next_start_moves_a_full_cage_log_aside(h: HiveProcess) -> None:
    """After the flood (cage.log past CAGE_LOG_ROTATE), a stop and a start: the old log
    is cage.log.1 whole, the new cage.log starts empty, and its harness's output reaches
    it through init again."""
    log = cage_log(h)
    if log.stat().st_size <= CAGE_LOG_ROTATE:  # run alone: flood it as the first case does
        fd = pidfd_getfd(h.harness_pid(NAME), 2)
        try:
            write_for(fd, 2 * CAGE_LOG_ROTATE, 20)
        finally:
            os.close(fd)
        time.sleep(0.5)
    old = log.read_bytes()
    assert len(old) > CAGE_LOG_ROTATE, len(old)
    assert h.priv("stop", name=NAME, timeout=1).get("ok")
    r = h.priv("start", name=NAME)
    assert r.get("ok") or "already running" in str(r.get("error")), r
    pid = wait_until(lambda: harness_or_none(h, NAME), 30, "the harness")
    assert cage_log(h, ".1").read_bytes()[: len(old)] == old
    assert os.readlink(f"/proc/{pid}/fd/2").startswith("socket:"), os.readlink(f"/proc/{pid}/fd/2")
    fd = pidfd_getfd(pid, 2)
    try:
        os.write(fd, b"harness: a line after the restart\n")
    finally:
        os.close(fd)
    wait_until(lambda: "a line after the restart" in log.read_text(errors="replace"), 10, "the line")
    assert log.stat().st_size < 64 * 1024, log.stat().st_size


@pytest.mark.attack("budget.exhaustion", ref=REF + "; a full disk under init's writes")
def test_init_writes_to_a_full_cage_log_without_ending() -> None:
    """init's writes to cage.log (stderr) on a full disk: no exception, init goes on."""
    code = (
        "from hyperhive.cage.init import say\n"
        "say('cage-init: harness exited with status 1\\n' * 4096)\n"
        "say(b'x' * 100000)\n"
        "print('went on')\n"
    )
    with open("/dev/full", "wb") as full:
        p = subprocess.run([sys.executable, "-c", code], stderr=full, stdout=subprocess.PIPE, text=True,
                           timeout=60, check=False)
    assert (p.returncode, p.stdout) == (0, "went on\n")

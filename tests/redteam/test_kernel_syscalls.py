"""The kernel surface a cage reaches: every syscall the cage's seccomp table refuses
outright, called from inside a real cage, fails with the table's errno; so do the
personalities that turn off ASLR and the rest, and the terminal ioctls that push
input (TIOCSTI, with bubblewrap's CVE-2019-10063 high-word trick). On the old filter
each of these reached the kernel, which answered otherwise (a different errno, or
success). One probe runs every call; each syscall is its own case."""

from __future__ import annotations

import errno
import platform
from typing import Any

import pytest

from hive_fixture import HiveProcess
from hyperhive.cage import seccomp

from .conftest import cage_run, unchanged

pytestmark = pytest.mark.attack(
    "kernel.syscall-surface",
    ref="io_uring bypasses (codex#10814, firejail#7058, srt README); bubblewrap CVE-2019-10063, "
        "CVE-2017-5226; Docker's default seccomp profile")

MACHINE = platform.machine()
NRS = seccomp.SYSCALLS.get(MACHINE, {})
# Refused by the table whatever the arguments, and (with these arguments) answered
# otherwise by the kernel when the old filter let them through. Left out: calls the
# kernel refuses to an unprivileged caller before it reads anything (fsopen, acct,
# pivot_root, ...) or doesn't have (uselib, _sysctl): a cage can't tell the filter's
# refusal from the kernel's there, and the unit tests check those rows.
SAME_ON_OLD = {"clone3", "syslog", "uselib", "_sysctl", "pivot_root", "move_mount", "fsopen", "fsmount",
               "fspick", "swapoff", "acct", "reboot", "vhangup"}
# Zeros give EPERM from the kernel too (or, for ptrace, PTRACE_TRACEME: not on a probe).
MINUS_ONE = {"userfaultfd", "swapon", "settimeofday", "ptrace"}
KEYRING = {"add_key", "request_key", "keyctl"}  # test_kernel_keyring.py
ARGS = {"fanotify_init": [0x200, 0]}  # FAN_REPORT_FID: unprivileged fanotify works without the filter
UNCONDITIONAL = sorted(
    name for name, rows in seccomp.rules(MACHINE).items()
    if len(rows) == 1 and rows[0][0] is None and name not in SAME_ON_OLD | KEYRING
) if MACHINE in seccomp.ARCHES else []
EXPECT = {name: errno.errorcode[seccomp.rules(MACHINE)[name][0][1]] for name in UNCONDITIONAL}

PROBE = """
import ctypes, errno, fcntl, os, pty, termios
libc = ctypes.CDLL(None, use_errno=True)
def sc(nr, *a):
    a = (list(a) + [0] * 6)[:6]
    r = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(x) for x in a))
    return "OK" if r >= 0 else errno.errorcode[ctypes.get_errno()]
out = {}
for name, (nr, args) in P["calls"].items():
    out[name] = sc(nr, *args)
personas = {}
for value in P["personas"]:
    personas[str(value)] = sc(P["personality"], value)
    sc(P["personality"], 0)  # back to PER_LINUX, whatever happened
# A pseudo-terminal that is this process's controlling terminal, as the operator's
# would be: TIOCSTI pushes bytes into its input as if typed.
ioctls = {}
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    res = {}
    ch = ctypes.create_string_buffer(b"x\\0\\0\\0")  # as TIOCSETD's int: line discipline 120 (none such)
    try:
        os.setsid()
        m, s = pty.openpty()
        fcntl.ioctl(s, termios.TIOCSCTTY, 0)
        for label, cmd in P["ioctls"].items():
            res[label] = sc(P["ioctl"], s, cmd, ctypes.addressof(ch))
    except Exception as e:
        res["error"] = repr(e)
    os.write(w, json.dumps(res).encode())
    os._exit(0)
os.close(w)
os.waitpid(pid, 0)
ioctls = json.loads(os.read(r, 65536))
result(calls=out, personas=personas, ioctls=ioctls)
"""

# personality(2) values a program might pass, each refused but PER_LINUX, PER_LINUX32
# and the query (checked as controls).
PERSONAS = {
    "ADDR_NO_RANDOMIZE": 0x0040000, "READ_IMPLIES_EXEC": 0x0400000, "ADDR_COMPAT_LAYOUT": 0x0200000,
    "MMAP_PAGE_ZERO": 0x0100000, "ADDR_LIMIT_32BIT": 0x0800000, "SHORT_INODE": 0x1000000,
    "WHOLE_SECONDS": 0x2000000, "STICKY_TIMEOUTS": 0x4000000, "ADDR_LIMIT_3GB": 0x8000000,
    "UNAME26": 0x0020000, "FDPIC_FUNCPTRS": 0x0080000, "PER_SVR4": 0x0001 | 0x4000000 | 0x0100000,
    "PER_BSD": 0x0006, "PER_HPUX": 0x0010, "PER_OSF4": 0x000F, "PER_LINUX32|ADDR_NO_RANDOMIZE": 0x0040008,
    "PER_LINUX|ADDR_NO_RANDOMIZE (high word set)": 0x0040000 | 1 << 32,
}
CONTROL_PERSONAS = {"PER_LINUX": 0, "PER_LINUX32": 8, "query": 0xFFFFFFFF}
IOCTLS = {"TIOCSTI": 0x5412, "TIOCSTI | 1 << 32 (CVE-2019-10063)": 0x5412 | 1 << 32, "TIOCLINUX": 0x541C,
          "TIOCSETD": 0x5423}


@pytest.fixture(scope="module")
def answers(rt: HiveProcess) -> dict[str, Any]:
    if MACHINE not in seccomp.ARCHES:
        pytest.skip(f"no seccomp table for {MACHINE}")
    calls = {name: [NRS[name], [-1] * 6 if name in MINUS_ONE else ARGS.get(name, [])] for name in UNCONDITIONAL}
    with unchanged(rt):
        return cage_run(rt, "rtmule", PROBE, calls=calls, personality=NRS["personality"], ioctl=NRS["ioctl"],
                        personas=[*PERSONAS.values(), *CONTROL_PERSONAS.values()], ioctls=IOCTLS)


@pytest.mark.parametrize("name", UNCONDITIONAL)
def test_syscall_refused_in_cage(answers: dict[str, Any], name: str) -> None:
    assert answers["calls"][name] == EXPECT[name]


@pytest.mark.parametrize("persona", sorted(PERSONAS))
def test_personality_refused(answers: dict[str, Any], persona: str) -> None:
    assert answers["personas"][str(PERSONAS[persona])] == "EPERM"
    assert {k: answers["personas"][str(v)] for k, v in CONTROL_PERSONAS.items()} == dict.fromkeys(
        CONTROL_PERSONAS, "OK")


@pytest.mark.parametrize("ioctl", sorted(IOCTLS))
def test_terminal_ioctl_refused(answers: dict[str, Any], ioctl: str) -> None:
    assert "error" not in answers["ioctls"], answers["ioctls"]
    assert answers["ioctls"][ioctl] == "EPERM"

"""The cage's seccomp program, checked two ways: a small classic-BPF interpreter runs
it on seccomp_data for both architectures (every row of the table, the arguments'
high words, foreign ABIs, syscalls newer than the table), and a child process on
this machine runs under the real filter. The syscall numbers are checked against
the kernel headers where they are installed."""

from __future__ import annotations

import errno
import json
import platform
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hyperhive.cage import seccomp
from hyperhive.cage.seccomp import AF_NETLINK, ALLOWED_FAMILIES, ARCHES, POLICY, SYSCALLS

ALLOW = "ALLOW"


def run_bpf(prog: bytes, nr: int, args: tuple[int, ...] = (), arch: int | None = None,
            machine: str = "x86_64") -> str | int:
    """ALLOW or the errno the program returns for this syscall (a classic BPF
    interpreter for the instructions the compiler emits)."""
    data = struct.pack("<iI", nr, ARCHES[machine][0] if arch is None else arch) + struct.pack("<Q", 0)
    data += b"".join(struct.pack("<Q", a & 0xFFFFFFFFFFFFFFFF) for a in (*args, 0, 0, 0, 0, 0, 0)[:6])
    insns = [struct.unpack("=HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    acc, pc = 0, 0
    for _ in range(10_000):
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x54:
            acc &= k
            pc += 1
        elif code == 0x05:
            pc += 1 + k
        elif code in (0x15, 0x25, 0x35, 0x45):
            cond = {0x15: acc == k, 0x25: acc > k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += 1 + (jt if cond else jf)
        elif code == 0x06:
            if k == 0x7FFF0000:
                return ALLOW
            assert k & 0xFFFF0000 == 0x00050000, hex(k)
            return k & 0xFFFF
        else:
            raise AssertionError(f"unknown instruction {code:#x}")
    raise AssertionError("no return")


MACHINES = sorted(ARCHES)


@pytest.mark.parametrize("machine", MACHINES)
def test_every_row_of_the_table(machine: str) -> None:
    prog, nrs = seccomp.program(machine), SYSCALLS[machine]
    for name, rows in seccomp.rules(machine).items():
        if len(rows) == 1 and rows[0][0] is None:
            assert run_bpf(prog, nrs[name], machine=machine) == rows[0][1], name
            assert run_bpf(prog, nrs[name], (1, 2, 3, 4, 5, 6), machine=machine) == rows[0][1], name
    # Everything not in the table passes (getpid, read, write, ...), up to the newest known.
    unlisted = set(range(ARCHES[machine][1] + 1)) - set(nrs.values())
    assert all(run_bpf(prog, nr, machine=machine) == ALLOW for nr in unlisted)
    assert run_bpf(prog, ARCHES[machine][1] + 1, machine=machine) == errno.ENOSYS
    assert run_bpf(prog, 0x3FFFFFFF, machine=machine) == errno.ENOSYS


@pytest.mark.parametrize("machine", MACHINES)
def test_argument_checks(machine: str) -> None:
    prog, nr = seccomp.program(machine), SYSCALLS[machine]
    for fam in range(64):
        want = ALLOW if fam in (*ALLOWED_FAMILIES, AF_NETLINK) else errno.EAFNOSUPPORT
        assert run_bpf(prog, nr["socket"], (fam, 1, 0), machine=machine) == want, fam
        # The kernel reads an int: the high word is ignored, so must the filter's compare be.
        assert run_bpf(prog, nr["socket"], (fam | 1 << 32, 1, 0), machine=machine) == want, fam
        pair = ALLOW if fam in ALLOWED_FAMILIES else errno.EAFNOSUPPORT
        assert run_bpf(prog, nr["socketpair"], (fam, 1, 0), machine=machine) == pair, fam
    for proto in range(32):
        want = ALLOW if proto == 0 else errno.EPROTONOSUPPORT
        assert run_bpf(prog, nr["socket"], (AF_NETLINK, 3, proto), machine=machine) == want
        assert run_bpf(prog, nr["socket"], (AF_NETLINK, 3, proto | 1 << 40), machine=machine) == want
    for fam in (2, 10):
        for typ in (1, 2, 3, 1 | 0x800, 2 | 0x80000 | 0x800):
            for proto in (0, 6, 17, 1, 58):
                assert run_bpf(prog, nr["socket"], (fam, typ, proto), machine=machine) == ALLOW
        for typ in (5, 6, 10, 5 | 0x80000):  # SEQPACKET (SCTP), DCCP, PACKET
            assert run_bpf(prog, nr["socket"], (fam, typ, 0), machine=machine) == errno.ESOCKTNOSUPPORT
        for proto in (132, 136, 262, 115, 33, 256):  # SCTP, UDP-Lite, MPTCP, L2TP, DCCP, SMC
            assert run_bpf(prog, nr["socket"], (fam, 1, proto), machine=machine) == errno.EPROTONOSUPPORT
    assert run_bpf(prog, nr["socket"], (1, 5, 0), machine=machine) == ALLOW  # unix seqpacket
    for cmd in (0x5412, 0x541C, 0x5423, 0x5412 | 1 << 32, 0x541C | 0xFFFF << 32):  # CVE-2019-10063
        assert run_bpf(prog, nr["ioctl"], (0, cmd), machine=machine) == errno.EPERM, hex(cmd)
    for cmd in (0x5401, 0x5413, 0x541B, 0x5411, 0x5412 + 1):
        assert run_bpf(prog, nr["ioctl"], (0, cmd), machine=machine) == ALLOW, hex(cmd)
    for persona in (0, 8, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF):
        assert run_bpf(prog, nr["personality"], (persona,), machine=machine) == ALLOW
    for persona in (0x40000, 0x400000, 0x20000, 0x100000, 0x0006, 0x10, 0x40008):
        assert run_bpf(prog, nr["personality"], (persona,), machine=machine) == errno.EPERM
    for flags in (0x11, 0x3D0F00, 0x01000000 | 0x11):  # fork, a thread, CLONE_CHILD_SETTID
        assert run_bpf(prog, nr["clone"], (flags,), machine=machine) == ALLOW
    for flag in (0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000):
        assert run_bpf(prog, nr["clone"], (flag | 0x11,), machine=machine) == errno.EPERM
        assert run_bpf(prog, nr["unshare"], (flag,), machine=machine) == errno.EPERM
    assert run_bpf(prog, nr["unshare"], (0x80,), machine=machine) == errno.EPERM  # CLONE_NEWTIME
    assert run_bpf(prog, nr["unshare"], (0x400 | 0x200,), machine=machine) == ALLOW  # files, fs


def test_foreign_abis() -> None:
    prog = seccomp.program("x86_64")
    assert run_bpf(prog, 39, arch=0x40000003) == errno.EPERM  # i386 (int 0x80)
    assert run_bpf(prog, 0x40000000 | 39) == errno.EPERM  # x32
    assert run_bpf(seccomp.program("aarch64"), 20, arch=0x40000028, machine="aarch64") == errno.EPERM  # arm32


def test_table_is_well_formed() -> None:
    for name, _check, action in POLICY:
        assert any(name in nrs for nrs in SYSCALLS.values()), name
        assert action in (errno.EPERM, errno.ENOSYS, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT,
                          errno.ESOCKTNOSUPPORT)
    for must in ("io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd", "keyctl",
                 "add_key", "request_key", "ptrace", "process_vm_readv", "process_vm_writev",
                 "pidfd_getfd", "bpf", "perf_event_open", "kexec_load", "open_by_handle_at",
                 "fsopen", "mount", "personality", "socket", "socketpair", "ioctl"):
        assert must in {name for name, _, _ in POLICY}, must
    with pytest.raises(OSError):
        seccomp.program("mips")


HEADERS = {"x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
           "aarch64": Path("/usr/include/asm-generic/unistd.h")}


@pytest.mark.parametrize("machine", MACHINES)
def test_numbers_match_the_kernel_headers(machine: str) -> None:
    header = HEADERS[machine]
    if not header.exists():
        pytest.skip(f"no {header}")
    defined = {m[1]: int(m[2]) for m in re.finditer(r"#define __NR(?:3264)?_(\w+)\s+(\d+)", header.read_text())}
    checked = {name: nr for name, nr in SYSCALLS[machine].items() if name in defined}
    assert len(checked) >= len(SYSCALLS[machine]) - 8  # the headers may be older than the table
    assert {name: defined[name] for name in checked} == checked


CHILD = r"""
import ctypes, errno, json, os, socket, sys
from hyperhive.cage import seccomp
seccomp.install()
libc = ctypes.CDLL(None, use_errno=True)
N = seccomp.SYSCALLS[os.uname().machine]
def sc(nr, *a):
    a = (list(a) + [0] * 6)[:6]
    r = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(x) for x in a))
    return "OK" if r >= 0 else errno.errorcode[ctypes.get_errno()]
out = {
    "io_uring_setup": sc(N["io_uring_setup"], 8, 0),
    "keyctl": sc(N["keyctl"], 0, -3),
    "vsock": sc(N["socket"], 40, 1, 0),
    "vsock high": sc(N["socket"], 40 | 1 << 32, 1, 0),
    "audit": sc(N["socket"], 16, 3, 9),
    "route": sc(N["socket"], 16, 3, 0),
    "personality": sc(N["personality"], 0x40000),
    "personality query": sc(N["personality"], 0xFFFFFFFF),
    "userns": sc(N["unshare"], 0x10000000),
    "newest+1": sc(seccomp.ARCHES[os.uname().machine][1] + 1),
}
socket.socket(socket.AF_UNIX).close(); socket.socket(socket.AF_INET6).close()
import subprocess; out["fork+exec"] = subprocess.run(["true"]).returncode
print(json.dumps(out))
"""


def test_a_child_under_the_filter() -> None:
    if platform.machine() not in ARCHES:
        pytest.skip("no table for this machine")
    src = str(Path(seccomp.__file__).resolve().parent.parent.parent)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD)], capture_output=True, text=True,
                          env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"}, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "io_uring_setup": "ENOSYS", "keyctl": "ENOSYS", "vsock": "EAFNOSUPPORT",
        "vsock high": "EAFNOSUPPORT", "audit": "EPROTONOSUPPORT", "route": "OK", "personality": "EPERM",
        "personality query": "OK", "userns": "EPERM", "newest+1": "ENOSYS", "fork+exec": 0,
    }

"""No user namespaces inside a cage.

The cage runs in the host's user namespace, where an unprivileged process may
create a user namespace of its own (``unshare -r``) and with it get every
capability over new mount and network namespaces: mounts, its own network
stack, a far larger kernel surface. Nothing in a cage needs that, so a seccomp
filter refuses it: ``unshare`` and ``clone`` with ``CLONE_NEWUSER`` fail with
EPERM, and ``clone3`` (whose flags a filter can't read) with ENOSYS, so the C
library falls back to ``clone``. Syscalls of a foreign ABI (i386, x32) fail.

The cage's init installs it before it starts anything, so the harness and the
runtime inherit it; ``hive exec`` installs it (``python -m hyperhive.cage exec``)
before it runs the operator's command. Standard library only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
CLONE_NEWUSER = 0x10000000

# (AUDIT_ARCH, clone, unshare, clone3)
ARCHES = {
    "x86_64": (0xC000003E, 56, 272, 435),
    "aarch64": (0xC00000B7, 220, 97, 435),
}
X32_SYSCALL_BIT = 0x40000000

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000
_NR, _ARCH, _ARG0_LOW = 0, 4, 16  # offsets in struct seccomp_data (little endian)


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program(machine: str | None = None) -> bytes:
    """The BPF program for this machine, as struct sock_filter[]."""
    machine = machine or platform.machine()
    if machine not in ARCHES:
        raise OSError(f"no seccomp filter for {machine}")
    arch, nr_clone, nr_unshare, nr_clone3 = ARCHES[machine]
    eperm, enosys = _ERRNO | errno.EPERM, _ERRNO | errno.ENOSYS
    return b"".join([
        _insn(_LD_W_ABS, _ARCH),                         # 0
        _insn(_JEQ_K, arch, jt=1),                       # 1: native ABI -> 3
        _insn(_RET_K, eperm),                            # 2
        _insn(_LD_W_ABS, _NR),                           # 3
        _insn(_JGE_K, X32_SYSCALL_BIT, jt=6),            # 4: x32 -> 11
        _insn(_JEQ_K, nr_clone3, jt=6),                  # 5: -> 12
        _insn(_JEQ_K, nr_unshare, jt=2),                 # 6: -> 9
        _insn(_JEQ_K, nr_clone, jt=1),                   # 7: -> 9
        _insn(_RET_K, _ALLOW),                           # 8
        _insn(_LD_W_ABS, _ARG0_LOW),                     # 9: flags
        _insn(_JSET_K, CLONE_NEWUSER, jt=0, jf=2),       # 10: CLONE_NEWUSER -> 11, else 13
        _insn(_RET_K, eperm),                            # 11
        _insn(_RET_K, enosys),                           # 12
        _insn(_RET_K, _ALLOW),                           # 13
    ])


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> None:
    """Set no_new_privs and install the filter on the calling thread (and all it starts)."""
    code = program()
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.addressof(buf))
    for args in ((PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), (PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0)):
        if libc.prctl(*(ctypes.c_ulong(a) for a in args)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl({args[0]}): {os.strerror(err)}")

"""The cage's seccomp policy: a readable table, compiled to a classic BPF program.

Nothing in a cage needs more of the kernel than a program on a desktop does, and
every call below has been a way out of, or across, sandboxes like this one. The
table (``POLICY``) holds one row per rule, ``(syscall, check, action)``; rows of
one syscall are tried in order, the first whose check holds decides, and a call
no row refuses is allowed. The errno of each refusal is the one that makes real
programs take the path they already have for an older or stricter kernel:

- ENOSYS ("this kernel doesn't have it") for calls with a fallback: ``clone3``
  (glibc falls back to ``clone``), io_uring (libuv, tokio and liburing users fall
  back to threads and epoll), the keyring calls (as on a kernel without
  CONFIG_KEYS), and any syscall newer than the table knows (``MAX_KNOWN``).
- EAFNOSUPPORT for a socket family a cage doesn't get: what the kernel says for
  a family it wasn't built with, so resolvers and libraries skip it.
- EPERM for everything else: what the kernel itself says to an unprivileged
  caller (``ptrace`` under YAMA, ``userfaultfd`` with the sysctl off, mounts).

Arguments are compared on their low 32 bits, as the kernel reads them (an int
or, for ioctl, an unsigned int): bubblewrap's CVE-2019-10063 was a 64-bit
compare of ioctl's command that ``TIOCSTI | 1 << 32`` walked past. Calls of a
foreign ABI (i386 via ``int 0x80``, x32, arm32 compat) fail whatever they are:
the table is in native numbers only.

The cage's init installs it before it starts anything, so the harness and the
runtime inherit it; ``hive exec`` installs it (``python -m hyperhive.cage exec``)
before it runs the operator's command. Standard library only: it runs in the cage.
"""

from __future__ import annotations

# _socket, not socket: socket.py loads enum and selectors, and init installs this before
# the harness's fork, which connects to the core with only what init has loaded.
import _socket as socket
import ctypes
import errno
import os
import struct

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# Namespace flags of clone/unshare. The cage needs none (and the runtime has no
# capability to use any but CLONE_NEWUSER, which would give it all of them).
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
)
CLONE_NEWTIME = 0x00000080  # unshare only: in clone()'s flags this bit is part of the exit signal
NS_FLAGS = (
    CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
)

# Socket families a cage gets: unix sockets (agent.sock, egress.sock, its own) and
# IP on its own loopback (the egress bridge at 127.0.0.1:3128). Netlink only as
# NETLINK_ROUTE, read-only in practice (changing anything needs CAP_NET_ADMIN over the
# cage's own network namespace, which holds only its loopback): getifaddrs() needs it,
# and without it node's and bun's os.networkInterfaces() throw (the claude CLI calls
# it). glibc's getaddrinfo(AI_ADDRCONFIG) would cope either way. Every other netlink
# protocol (audit, uevents, sock_diag, xfrm, netfilter, generic, connector, ...) is
# refused with EPROTONOSUPPORT, as for a protocol the kernel wasn't built with.
ALLOWED_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)
AF_NETLINK, NETLINK_ROUTE = 16, 0
# Within IP: TCP, UDP and ICMP (ping sockets, where the sysctl allows them; raw ones need
# CAP_NET_RAW), nothing else. SCTP, DCCP, UDP-Lite, MPTCP, L2TP, SMC: modules the kernel
# loads on demand for anyone, with a long CVE history, and nothing a cage needs (MPTCP
# users fall back to TCP on EPROTONOSUPPORT). The type is compared without its
# SOCK_NONBLOCK / SOCK_CLOEXEC flags.
INET_TYPES = (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_RAW)
INET_PROTOCOLS = (
    0,
    socket.IPPROTO_TCP,
    socket.IPPROTO_UDP,
    socket.IPPROTO_ICMP,
    socket.IPPROTO_ICMPV6,
)
SOCK_TYPE_MASK = 0xF

# Push bytes into a terminal's input; console ioctls; set a line discipline (which loads
# n_gsm, n_hdlc, ... on demand: CVE-2023-6546 and others).
TIOCSTI, TIOCLINUX, TIOCSETD = 0x5412, 0x541C, 0x5423
# personality(2): PER_LINUX and the 0xffffffff query are what real programs pass
# (glibc, Python's platform, node); PER_LINUX32 is what `linux32`/`setarch i686` set.
# Refused: ADDR_NO_RANDOMIZE (turns ASLR off), READ_IMPLIES_EXEC, the foreign
# personalities and the rest, none of which a program in a cage needs.
PER_LINUX, PER_LINUX32, PER_QUERY = 0x0000, 0x0008, 0xFFFFFFFF

# Syscall numbers. x86_64: arch/x86/entry/syscalls/syscall_64.tbl; aarch64 uses the
# generic table (include/uapi/asm-generic/unistd.h). Numbers from 403 up are shared.
# Tables kept as tables, several entries a line.
# fmt: off
_SHARED = {
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "clone3": 435, "pidfd_getfd": 438, "process_madvise": 440,
    "mount_setattr": 442, "quotactl_fd": 443, "cachestat": 451, "statmount": 457, "listmount": 458,
    "open_tree_attr": 467,
}
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "ioctl": 16, "socket": 41, "socketpair": 53, "clone": 56, "ptrace": 101, "syslog": 103,
        "uselib": 134, "personality": 135, "ustat": 136, "sysfs": 139, "vhangup": 153,
        "modify_ldt": 154, "pivot_root": 155, "_sysctl": 156, "chroot": 161, "acct": 163,
        "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
        "reboot": 169, "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176,
        "quotactl": 179, "lookup_dcookie": 212, "clock_settime": 227, "kexec_load": 246,
        "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
        "perf_event_open": 298, "fanotify_init": 300, "open_by_handle_at": 304,
        "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
        "kcmp": 312, "finit_module": 313, "kexec_file_load": 320, "bpf": 321,
        "userfaultfd": 323, "io_setup": 206, **_SHARED,
    },
    "aarch64": {
        "lookup_dcookie": 18, "ioctl": 29, "umount2": 39, "mount": 40, "pivot_root": 41,
        "chroot": 51, "vhangup": 58, "quotactl": 60, "acct": 89, "personality": 92,
        "unshare": 97, "kexec_load": 104, "init_module": 105, "delete_module": 106,
        "clock_settime": 112, "syslog": 116, "ptrace": 117, "reboot": 142,
        "settimeofday": 170, "socket": 198, "socketpair": 199, "add_key": 217,
        "request_key": 218, "keyctl": 219, "clone": 220, "swapon": 224, "swapoff": 225,
        "perf_event_open": 241, "fanotify_init": 262, "open_by_handle_at": 265,
        "clock_adjtime": 266, "setns": 268, "process_vm_readv": 270, "process_vm_writev": 271,
        "kcmp": 272, "finit_module": 273, "bpf": 280, "userfaultfd": 282,
        "kexec_file_load": 294, "io_setup": 0, **_SHARED,
    },
}
# fmt: on
# (AUDIT_ARCH_*, highest syscall number the table knows: anything above is newer
# than this policy, so it is refused with ENOSYS until someone reads what it does.)
ARCHES = {"x86_64": (0xC000003E, 469), "aarch64": (0xC00000B7, 469)}
X32_SYSCALL_BIT = 0x40000000


# -- the policy ----------------------------------------------------------------------------


# Plain classes, not dataclasses: the cage's init imports this module before it starts
# the harness, and dataclasses (with inspect, tokenize, ...) cost it ~10 ms and ~1 MiB.
class _Values:
    __slots__ = ("arg", "mask", "values")

    def __init__(self, arg: int, values: tuple[int, ...], mask: int = 0xFFFFFFFF) -> None:
        self.arg, self.values, self.mask = arg, values, mask


class In(_Values):  # not a base of NotIn: the compiler tells them apart with isinstance
    """Argument ``arg`` (its low 32 bits, and ``mask``) is one of ``values``."""

    __slots__ = ()


class NotIn(_Values):
    """Argument ``arg`` (its low 32 bits, and ``mask``) is none of ``values``."""

    __slots__ = ()


class AnyBit:
    """Argument ``arg`` has any bit of ``mask`` set."""

    __slots__ = ("arg", "mask")

    def __init__(self, arg: int, mask: int) -> None:
        self.arg, self.mask = arg, mask


Cond = In | NotIn | AnyBit
Check = Cond | tuple[Cond, ...] | None  # None: always; a tuple: all of them
EPERM, ENOSYS, EAFNOSUPPORT = errno.EPERM, errno.ENOSYS, errno.EAFNOSUPPORT
EPROTONOSUPPORT, ESOCKTNOSUPPORT = errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT

POLICY: list[tuple[str, Check, int]] = [
    # New namespaces: a user namespace would hand the runtime every capability over
    # new mount and network namespaces (bubblewrap#368); the others need a capability
    # the cage doesn't have. clone3 passes its flags in memory a filter can't read.
    ("clone", AnyBit(0, NS_FLAGS), EPERM),
    ("unshare", AnyBit(0, NS_FLAGS | CLONE_NEWTIME), EPERM),
    ("clone3", None, ENOSYS),
    ("setns", None, EPERM),
    # Sockets: only the families above (AF_VSOCK reaches the hypervisor, AF_PACKET,
    # AF_NETLINK, AF_ALG, AF_KEY, AF_XDP, ... are kernel surface a cage doesn't need).
    ("socket", (In(0, (AF_NETLINK,)), NotIn(2, (NETLINK_ROUTE,))), EPROTONOSUPPORT),
    ("socket", NotIn(0, (*ALLOWED_FAMILIES, AF_NETLINK)), EAFNOSUPPORT),
    (
        "socket",
        (In(0, (socket.AF_INET, socket.AF_INET6)), NotIn(1, INET_TYPES, SOCK_TYPE_MASK)),
        ESOCKTNOSUPPORT,
    ),
    (
        "socket",
        (In(0, (socket.AF_INET, socket.AF_INET6)), NotIn(2, INET_PROTOCOLS)),
        EPROTONOSUPPORT,
    ),
    ("socketpair", NotIn(0, ALLOWED_FAMILIES), EAFNOSUPPORT),
    # Terminals: no faking input on a terminal the cage shares (CVE-2017-5226).
    ("ioctl", In(1, (TIOCSTI, TIOCLINUX, TIOCSETD)), EPERM),
    ("personality", NotIn(0, (PER_LINUX, PER_LINUX32, PER_QUERY)), EPERM),
    # io_uring runs syscalls the filter never sees (codex#10814, firejail#7058).
    ("io_uring_setup", None, ENOSYS),
    ("io_uring_enter", None, ENOSYS),
    ("io_uring_register", None, ENOSYS),
    # Linux AIO: every context is counted against one host-wide budget (fs.aio-max-nr),
    # which one cage took whole and held (red team round 17). Without a context the other
    # io_* calls do nothing; glibc's POSIX aio is threads, libaio users fall back.
    ("io_setup", None, ENOSYS),
    # Kernel keyrings are keyed by uid, not by cage: a channel between agents.
    ("add_key", None, ENOSYS),
    ("request_key", None, ENOSYS),
    ("keyctl", None, ENOSYS),
    # Other processes' memory and descriptors (hive exec's, the harness's).
    ("ptrace", None, EPERM),
    ("process_vm_readv", None, EPERM),
    ("process_vm_writev", None, EPERM),
    ("pidfd_getfd", None, EPERM),
    ("process_madvise", None, EPERM),
    ("kcmp", None, EPERM),
    # Exploit primitives and large, rarely needed kernel surface.
    ("userfaultfd", None, EPERM),
    ("bpf", None, EPERM),
    ("perf_event_open", None, EPERM),
    ("fanotify_init", None, EPERM),
    ("open_by_handle_at", None, EPERM),
    ("lookup_dcookie", None, EPERM),
    # Page-cache residency of files the cage shares with the host (the system dirs'
    # overlays map the real files' pages): what the host and other cages have read.
    ("cachestat", None, ENOSYS),
    ("syslog", None, EPERM),
    ("uselib", None, ENOSYS),
    ("ustat", None, ENOSYS),
    ("sysfs", None, ENOSYS),
    ("_sysctl", None, ENOSYS),
    ("modify_ldt", None, EPERM),
    ("iopl", None, EPERM),
    ("ioperm", None, EPERM),
    # Mounts, old and new API, and the root.
    ("mount", None, EPERM),
    ("umount2", None, EPERM),
    ("pivot_root", None, EPERM),
    ("chroot", None, EPERM),
    ("open_tree", None, EPERM),
    ("open_tree_attr", None, EPERM),
    ("move_mount", None, EPERM),
    ("fsopen", None, EPERM),
    ("fsconfig", None, EPERM),
    ("fsmount", None, EPERM),
    ("fspick", None, EPERM),
    ("mount_setattr", None, EPERM),
    ("statmount", None, EPERM),
    ("listmount", None, EPERM),
    # The machine itself: modules, kexec, clocks, swap, accounting, quotas, reboot.
    ("init_module", None, EPERM),
    ("finit_module", None, EPERM),
    ("delete_module", None, EPERM),
    ("kexec_load", None, EPERM),
    ("kexec_file_load", None, EPERM),
    ("reboot", None, EPERM),
    ("swapon", None, EPERM),
    ("swapoff", None, EPERM),
    ("acct", None, EPERM),
    ("quotactl", None, EPERM),
    ("quotactl_fd", None, EPERM),
    ("settimeofday", None, EPERM),
    ("clock_settime", None, EPERM),
    ("clock_adjtime", None, EPERM),
    ("vhangup", None, EPERM),
]


def rules(machine: str | None = None) -> dict[str, list[tuple[Check, int]]]:
    """The rows that apply on ``machine`` (some syscalls exist only on one), by syscall,
    in the table's order."""
    nrs = SYSCALLS[machine or os.uname().machine]
    out: dict[str, list[tuple[Check, int]]] = {}
    for name, check, action in POLICY:
        if name in nrs:
            out.setdefault(name, []).append((check, action))
    return out


# -- the compiler ----------------------------------------------------------------------------

_LD_W_ABS, _JA, _JEQ_K, _JGT_K, _JSET_K, _RET_K, _AND_K = 0x20, 0x05, 0x15, 0x25, 0x45, 0x06, 0x54
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_NR, _ARCH = 0, 4  # offsets in struct seccomp_data; args[i] at 16 + 8 i (low word first: LE)


def _arg_low(i: int) -> int:
    if not 0 <= i < 6:
        raise ValueError(f"no syscall argument {i}")
    return 16 + 8 * i


class _Asm:
    """Instructions with symbolic jump targets, resolved at the end. A conditional
    jump reaches at most 255 instructions ahead, so each syscall's rules are a block
    that the dispatch chain reaches with an unconditional (32-bit) ``ja``."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int, str | None, str | None]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def op(self, code: int, k: int = 0, jt: str | None = None, jf: str | None = None) -> None:
        self.code.append((code, k, jt, jf))

    def ret(self, action: int) -> None:
        self.op(_RET_K, action)

    def _rel(self, pc: int, target: str | None, limit: int) -> int:
        off = 0 if target is None else self.labels[target] - pc - 1
        if not 0 <= off <= limit:
            raise ValueError(f"jump out of range at {pc}")
        return off

    def bytes(self) -> bytes:
        out = []
        for pc, (code, k, jt, jf) in enumerate(self.code):
            if code == _JA:
                out.append(struct.pack("=HBBI", code, 0, 0, self._rel(pc, jt, 0xFFFFFFFF)))
            else:
                out.append(
                    struct.pack("=HBBI", code, self._rel(pc, jt, 255), self._rel(pc, jf, 255), k)
                )
        return b"".join(out)


def _ret_errno(e: int) -> int:
    return _ERRNO | e


def program(machine: str | None = None) -> bytes:
    """The BPF program for this machine, as struct sock_filter[]."""
    machine = machine or os.uname().machine
    if machine not in ARCHES:
        raise OSError(f"no seccomp filter for {machine}")
    arch, max_known = ARCHES[machine]
    nrs, rows = SYSCALLS[machine], rules(machine)
    a = _Asm()
    a.op(_LD_W_ABS, _ARCH)
    a.op(_JEQ_K, arch, jf="foreign")
    a.op(_LD_W_ABS, _NR)
    if machine == "x86_64":
        a.op(_JSET_K, X32_SYSCALL_BIT, jt="foreign")
    a.op(_JGT_K, max_known, jt="unknown")
    for name in rows:  # dispatch: an unconditional refusal inline, else a jump to its block
        a.op(_JEQ_K, nrs[name], jf=f"next:{name}")
        (check, action), *more = rows[name]
        if check is None and not more:
            a.ret(_ret_errno(action))
        else:
            a.op(_JA, jt=f"block:{name}")
        a.label(f"next:{name}")
    a.ret(_ALLOW)
    a.label("foreign")
    a.ret(_ret_errno(EPERM))
    a.label("unknown")
    a.ret(_ret_errno(ENOSYS))
    for name, rows_of in rows.items():
        if len(rows_of) == 1 and rows_of[0][0] is None:
            continue
        a.label(f"block:{name}")
        for i, (check, action) in enumerate(rows_of):
            nxt = f"{name}:{i}:next"
            conds = () if check is None else check if isinstance(check, tuple) else (check,)
            for j, cond in enumerate(conds):  # each one holds, or on to the next row
                holds = f"{name}:{i}:{j}:holds"
                a.op(_LD_W_ABS, _arg_low(cond.arg))
                if not isinstance(cond, AnyBit) and cond.mask != 0xFFFFFFFF:
                    a.op(_AND_K, cond.mask)
                if isinstance(cond, AnyBit):
                    a.op(_JSET_K, cond.mask, jf=nxt)
                elif isinstance(cond, In):
                    for v in cond.values:
                        a.op(_JEQ_K, v, jt=holds)
                    a.op(_JA, jt=nxt)
                else:
                    for v in cond.values:
                        a.op(_JEQ_K, v, jt=nxt)
                a.label(holds)
            a.ret(_ret_errno(action))
            a.label(nxt)
        a.ret(_ALLOW)
    return a.bytes()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> None:
    """Set no_new_privs and install the filter on the calling thread (and all it starts)."""
    code = program()
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.addressof(buf))
    for args in (
        (PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
        (PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0),
    ):
        if libc.prctl(*(ctypes.c_ulong(a) for a in args)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl({args[0]}): {os.strerror(err)}")

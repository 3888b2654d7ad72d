"""Steps of a mount namespace of its own, and of dropping privilege, for what `hive up`
starts as root and narrows before it execs (cli/core_sandbox.py: the core's view of the
host). Plain syscalls (ctypes): the shim imports nothing else.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNS = 0x20000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_SLAVE = 0x20, 0x1000, 0x4000, 0x80000
NR_MOUNT_SETATTR = 442  # the same on x86_64 and aarch64 (the unified table, Linux 5.12)
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 38, 24
LAST_CAP = 63  # past the kernel's last capability: EINVAL, ignored

_libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def private() -> None:
    """A mount namespace of our own, a slave of the host's: nothing mounted here reaches
    the host; the host's mounts still reach here."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount("none", "/", None, MS_REC | MS_SLAVE, "making / a slave")


def mount(
    source: str, target: str, fstype: str | None, flags: int, what: str, data: str | None = None
) -> None:
    rc = _libc.mount(
        source.encode(), target.encode(), fstype and fstype.encode(), flags, data and data.encode()
    )
    _check(rc, what)


def bind(source: str, target: str, *, readonly: bool = False) -> None:
    mount(source, target, None, MS_BIND | MS_REC, f"binding {source} on {target}")
    if readonly:
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        mount("none", target, None, flags, f"{target} read-only")


def tree_attrs(path: str, set_: int = 0, clear: int = 0) -> None:
    """Set and clear mount attributes of ``path``'s mount and every mount below it."""
    attr = MountAttr(set_, clear, 0, 0)
    rc = _libc.syscall(
        NR_MOUNT_SETATTR,
        -100,  # AT_FDCWD
        path.encode(),
        AT_RECURSIVE,
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(rc, f"mount_setattr({path})")


def no_new_privileges() -> None:
    """No exec gains a privilege from here on: set-user-ID and file capabilities are
    ignored (a setuid root program runs as its caller)."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def drop_bounding_set() -> None:
    """Empty the capability bounding set (while still root, which may)."""
    for cap in range(LAST_CAP + 1):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
            _check(-1, f"prctl(PR_CAPBSET_DROP, {cap})")


def become(uid: int, gid: int) -> None:
    """No exec gains a privilege from here on, no capability is left to take back, then
    ``uid``/``gid`` with no supplementary group (as root, which may do each)."""
    no_new_privileges()
    drop_bounding_set()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)

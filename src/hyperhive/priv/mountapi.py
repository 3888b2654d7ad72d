"""The kernel's new mount API (Linux 5.2: fsopen, fsconfig, fsmount, move_mount) as
plain syscalls: a filesystem mounted *detached* (in no mount namespace, held only by a
descriptor) and attached later, by whoever holds the descriptor, in its own namespace.

hive-priv mounts each agent's home this way (homes.open_home) and the starting child
attaches it in the cage's own namespace (cage_mounts.attach_home): the host's mount
table never holds a home. Syscalls only (ctypes): safe in a forked child's preexec_fn.
"""

from __future__ import annotations

import ctypes
import os

# The same numbers on x86_64 and aarch64 (every architecture since 5.2's unified table).
NR_MOVE_MOUNT, NR_FSOPEN, NR_FSCONFIG, NR_FSMOUNT = 429, 430, 431, 432
FSOPEN_CLOEXEC, FSMOUNT_CLOEXEC = 0x1, 0x1
FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 1, 6
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOATIME = 0x8, 0x10
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)


def check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def detached(fstype: str, attrs: int, strings: dict[str, str] | None = None) -> int:
    """A new ``fstype`` filesystem with ``strings`` as its options (``source``: the
    device), mounted nowhere: the returned descriptor is the mount's root (O_PATH-like;
    ``openat(fd, ".")`` opens it). Closing the last descriptor of a mount never
    attached unmounts it."""
    fs = check(_libc.syscall(NR_FSOPEN, fstype.encode(), FSOPEN_CLOEXEC), f"fsopen({fstype})")
    try:
        for key, value in (strings or {}).items():
            check(
                _libc.syscall(
                    NR_FSCONFIG, fs, FSCONFIG_SET_STRING, key.encode(), value.encode(), 0
                ),
                f"{fstype} {key}",
            )
        check(_libc.syscall(NR_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0), f"{fstype}")
        return check(_libc.syscall(NR_FSMOUNT, fs, FSMOUNT_CLOEXEC, attrs), f"fsmount({fstype})")
    finally:
        os.close(fs)


def attach(mount: int, target: str) -> None:
    """Attach the detached mount ``mount`` on ``target``, in the caller's mount namespace."""
    check(
        _libc.syscall(
            NR_MOVE_MOUNT, mount, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH
        ),
        f"move_mount to {target}",
    )

"""What hive-core checks and drops about itself before it serves anything."""

from __future__ import annotations

import ctypes
import grp
import os

PR_SET_DUMPABLE = 4


class NotConfined(Exception):
    """Why the core won't run as it was started; one line."""


def not_dumpable() -> None:
    """No core dumps, and /proc/<pid>/ root's: nothing else running under the core's ids
    (a process a compromised earlier core left, say) can ptrace it, read its memory or
    take its descriptors (pidfd_getfd). The operator's root still can."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise NotConfined(f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(err)}")


def check_groups() -> None:
    """In no group but its own: a core in hive-admin would be the operator of every hive
    on the host, in hive-gateway it could reach every hive's pages. `hive up` starts it
    with none; a systemd host upgraded from a version whose sysusers.d put `hive-core` in
    both keeps them (sysusers never removes a membership)."""
    if os.getuid() == 0:
        return  # a core run by hand as root (tests, protocol work): no boundary to keep
    extra = sorted(set(os.getgroups()) - {os.getgid()})
    if extra:
        names = ", ".join(_group_name(g) for g in extra)
        raise NotConfined(
            f"runs in the groups {names}: it must be in none but its own "
            "(host.sock and core.sock are handed in); remove it from them "
            "(gpasswd -d USER GROUP) and start it again"
        )


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)

"""The one ``setpriv`` argument list that gives up root's (or init's) powers for
good. Both hive-priv (``hive exec``) and the cage's init (the runtime's processes)
start everything that runs as an agent's uid through it; ``become`` is the same
drop done in-process, for the harness init forks. Standard library only: the cage
imports it too."""

from __future__ import annotations

import os

SETPRIV = "/usr/bin/setpriv"


def drop_to(uid: int, gid: int) -> list[str]:
    """argv that becomes uid:gid (real, effective and saved) before running what
    follows it: no supplementary groups, no capabilities of any kind (inheritable,
    ambient, bounding set) and no_new_privs, so nothing after it can regain any."""
    return [
        SETPRIV,
        "--reuid", str(uid),
        "--regid", str(gid),
        "--clear-groups",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]  # fmt: skip


# prctl options and the capability header version, as in <linux/prctl.h>, <linux/capability.h>
_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 47, 4
_CAP_VERSION_3 = 0x20080522


def become(uid: int, gid: int) -> None:
    """In this process, what ``drop_to(uid, gid)`` does before it runs its command: the
    cage's init forks the harness and calls this in the child (no second interpreter to
    start). Groups cleared, gid and uid set (real, effective, saved), the bounding set
    emptied (while CAP_SETPCAP is still held), every capability set emptied, no_new_privs.
    Checked afterwards: any capability left, or uid/gid not as asked, ends the process."""
    import ctypes  # here: only init's fork of the harness runs this

    libc = ctypes.CDLL(None, use_errno=True)

    def prctl(*args: int) -> None:
        if libc.prctl(*(ctypes.c_ulong(a) for a in args)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl({args[0]}, {args[1]}): {os.strerror(err)}")

    os.setgroups([])
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
    prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # from uid 0 to none: the kernel clears permitted and effective
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # all zero: effective, permitted, inheritable, twice
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    caps = [status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")]
    ids_ok = os.getresuid() == (uid,) * 3 and os.getresgid() == (gid,) * 3 and not os.getgroups()
    if any(int(c, 16) for c in caps) or not ids_ok or status["NoNewPrivs"].strip() != "1":
        raise OSError(f"privileges not dropped: {caps} {os.getresuid()} {os.getresgid()}")

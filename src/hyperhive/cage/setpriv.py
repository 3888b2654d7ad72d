"""The one ``setpriv`` argument list that gives up root's (or init's) powers for
good. Both hive-priv (``hive exec``) and the cage's init (the harness, the
runtime's processes) start everything that runs as an agent's uid through it.
Standard library only, and no privileged code: the cage imports it too."""

from __future__ import annotations

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

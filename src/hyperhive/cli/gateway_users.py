"""Start nginx with this hive's own gateway ids as the user its config names.

Each hive's gateway has ids of its own, with no account: the second id of the block the
host's registry gave the hive's core (``core_identity.gateway_ids``). Before, every
hive's nginx workers were the one user ``hive-gateway``, so a compromised worker of one
hive could connect to every other hive's ``core.sock`` and agent pages. nginx's ``user``
directive takes only a name (``getpwnam``), so its master (root) runs in a mount
namespace of its own, a slave of the host's, where ``/etc/passwd`` and ``/etc/group``
are the files ``hive up`` wrote: ``hive-gateway`` means this hive's ids there and
nowhere else. nscd's socket is hidden there too, and the name is checked before nginx
runs, so a lookup that would answer otherwise refuses the start.

    python -I -m hyperhive.cli.gateway_users UID:GID PASSWD GROUP -- /PROGRAM ARGS...
"""

from __future__ import annotations

import grp
import os
import pwd
import sys
from typing import NoReturn

from hyperhive.cli import mountns

USAGE = "usage: python -I -m hyperhive.cli.gateway_users UID:GID PASSWD GROUP -- /PROGRAM ARGS..."
NAME = "hive-gateway"  # what the nginx config's `user` names (gateway/config.py USER)
NSCD_DIRS = ("/run/nscd", "/var/run/nscd", "/var/db/nscd")


def _fail(line: str) -> NoReturn:
    print(f"gateway_users: {line}", file=sys.stderr)
    raise SystemExit(2)


def parse(args: list[str]) -> tuple[int, int, str, str, list[str]]:
    """(uid, gid, passwd, group, argv); SystemExit(2) with a line if wrong."""
    if len(args) < 5 or args[3] != "--":
        _fail(USAGE)
    ids, passwd, group, argv = args[0], args[1], args[2], args[4:]
    uid, sep, gid = ids.partition(":")
    if not (sep and uid.isdigit() and gid.isdigit() and int(uid) > 0 and int(gid) > 0):
        _fail(f"{ids!r} is not UID:GID (not root's)\n{USAGE}")
    if not all(os.path.isabs(p) for p in (passwd, group, argv[0])):
        _fail(f"the files and the program must be absolute paths\n{USAGE}")
    return int(uid), int(gid), passwd, group, argv


def main() -> None:
    uid, gid, passwd, group, argv = parse(sys.argv[1:])
    try:
        mountns.private()
        for source, target in ((passwd, "/etc/passwd"), (group, "/etc/group")):
            mountns.bind(source, target, readonly=True)
        for d in NSCD_DIRS:  # glibc asks nscd first, and nscd reads the host's files
            if os.path.isdir(d) and not os.path.islink(d):
                flags = mountns.MS_NOSUID | mountns.MS_NODEV | mountns.MS_NOEXEC
                mountns.mount("none", d, "tmpfs", flags, f"hiding {d}")
        # nginx never execs; a worker that is made to gains nothing from a setuid program.
        mountns.no_new_privileges()
    except OSError as e:
        _fail(e.strerror or str(e))
    try:
        pw, gr = pwd.getpwnam(NAME), grp.getgrnam(NAME)
    except KeyError:
        _fail(f"{NAME} is not known in the gateway's namespace")
    if (pw.pw_uid, pw.pw_gid, gr.gr_gid) != (uid, gid, gid):
        _fail(
            f"{NAME} is {pw.pw_uid}:{pw.pw_gid} (group {gr.gr_gid}) in the gateway's "
            f"namespace, not {uid}:{gid}: a name service other than the files answers"
        )
    try:
        os.execv(argv[0], argv)
    except OSError as e:
        _fail(f"{argv[0]}: {e.strerror}")


if __name__ == "__main__":
    main()

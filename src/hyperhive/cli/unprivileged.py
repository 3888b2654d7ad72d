"""Start a program as ids of its own, as root hands them over: no exec gains a privilege
(``PR_SET_NO_NEW_PRIVS``), the capability bounding set empty, no supplementary group.

    python -I -m hyperhive.cli.unprivileged UID:GID -- /PROGRAM ARGS...

`hive up` starts nginx this way (its master and workers the hive's gateway ids): with
``NoNewPrivs`` 1 a worker (or the master, which a worker of the same ids may ptrace)
runs the host's set-user-ID programs as itself (red team of session 17). Unlike
``core_sandbox`` it leaves the host's mounts as they are: no namespace of its own to keep
a filesystem the host lets go.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from hyperhive.cli import mountns

USAGE = "usage: python -I -m hyperhive.cli.unprivileged UID:GID -- /PROGRAM ARGS..."


def _fail(line: str) -> NoReturn:
    print(f"unprivileged: {line}", file=sys.stderr)
    raise SystemExit(2)


def parse(args: list[str]) -> tuple[int, int, list[str]]:
    """(uid, gid, argv); SystemExit(2) with a line if wrong."""
    if len(args) < 3 or args[1] != "--":
        _fail(USAGE)
    uid, sep, gid = args[0].partition(":")
    if not (sep and uid.isdigit() and gid.isdigit() and int(uid) > 0 and int(gid) > 0):
        _fail(f"{args[0]!r} is not UID:GID (not root's)\n{USAGE}")
    if not os.path.isabs(args[2]):
        _fail(f"the program must be an absolute path\n{USAGE}")
    return int(uid), int(gid), args[2:]


def main() -> None:
    uid, gid, argv = parse(sys.argv[1:])
    try:
        mountns.become(uid, gid)
    except OSError as e:
        _fail(e.strerror or str(e))
    try:
        os.execv(argv[0], argv)
    except OSError as e:
        _fail(f"{argv[0]}: {e.strerror}")


if __name__ == "__main__":
    main()

"""Start hive-core as `hive up` does, narrowed as systemd's unit narrows it: the host
read-only but for the hive's state and run directories, no privilege any exec could
gain, no capability left to take back, and only then the core's own ids.

    python -I -m hyperhive.cli.core_sandbox UID:GID STATE_DIR RUN_DIR -- /PROGRAM ARGS...

It runs as root (hive up's child) and:
- enters a mount namespace of its own (a slave of the host's) and makes every mount
  in it read-only, then binds the state and run directories (and what is mounted
  below them: ``run/agents``) onto themselves writable (``ProtectSystem=strict``,
  ``ReadWritePaths=``). So a compromised core can't write ``/tmp``, ``/var/tmp``,
  ``/dev/shm`` or any file of the host's that its ids could (a link planted for a root
  process, another service's IPC files). ``TMPDIR`` is the state dir (SQLite's and
  Python's temporary files; ``PrivateTmp=``);
- sets ``PR_SET_NO_NEW_PRIVS`` (``NoNewPrivileges=yes``: a setuid program runs as its
  caller) and empties the capability bounding set (``CapabilityBoundingSet=``);
- takes the core's uid and gid with no supplementary group, and execs the program.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from hyperhive.cli import mountns

USAGE = (
    "usage: python -I -m hyperhive.cli.core_sandbox UID:GID STATE_DIR RUN_DIR -- /PROGRAM ARGS..."
)


def _fail(line: str) -> NoReturn:
    print(f"core_sandbox: {line}", file=sys.stderr)
    raise SystemExit(2)


def parse(args: list[str]) -> tuple[int, int, list[str], list[str]]:
    """(uid, gid, writable dirs, argv); SystemExit(2) with a line if wrong."""
    if len(args) < 5 or args[3] != "--":
        _fail(USAGE)
    ids, dirs, argv = args[0], args[1:3], args[4:]
    uid, sep, gid = ids.partition(":")
    if not (sep and uid.isdigit() and gid.isdigit() and int(uid) > 0 and int(gid) > 0):
        _fail(f"{ids!r} is not UID:GID (not root's)\n{USAGE}")
    if not all(os.path.isabs(p) and os.path.normpath(p) == p for p in (*dirs, argv[0])):
        _fail(f"the directories and the program must be normalized absolute paths\n{USAGE}")
    return int(uid), int(gid), dirs, argv


def main() -> None:
    uid, gid, writable, argv = parse(sys.argv[1:])
    try:
        mountns.private()
        mountns.tree_attrs("/", set_=mountns.MOUNT_ATTR_RDONLY)
        for d in writable:
            mountns.bind(d, d)
            mountns.tree_attrs(d, clear=mountns.MOUNT_ATTR_RDONLY)
        mountns.become(uid, gid)
    except OSError as e:
        _fail(e.strerror or str(e))
    env = dict(os.environ, TMPDIR=writable[0])
    try:
        os.execve(argv[0], argv, env)
    except OSError as e:
        _fail(f"{argv[0]}: {e.strerror}")


if __name__ == "__main__":
    main()

"""Hand listening sockets to a program exactly as systemd does: from fd 3 on, with
``LISTEN_FDS`` = their number, ``LISTEN_PID`` = the program's own pid (this process
execs it, so the pid is the same) and, when they are named, ``LISTEN_FDNAMES``.

    python -I -m hyperhive.cli.socket_activate FD[:NAME] [FD[:NAME]...] -- /PROGRAM ARGS...

It runs as whoever ``hive up`` starts it as (root for hive-priv, the hive's core user for
hive-core), isolated (``-I``, a clean environment, ``/`` as working directory), and the
program must be an absolute path (no ``PATH`` lookup), so nothing of the caller's shell
chooses what runs.
"""

from __future__ import annotations

import fcntl
import os
import sys
from typing import NoReturn

USAGE = "usage: python -I -m hyperhive.cli.socket_activate FD[:NAME]... -- /PROGRAM ARGS..."
FIRST = 3  # SD_LISTEN_FDS_START
PARK = 100  # above every target: moving one socket never overwrites another not yet moved


def _fail(line: str) -> NoReturn:
    print(line, file=sys.stderr)
    raise SystemExit(2)


def parse(args: list[str]) -> tuple[list[tuple[int, str]], list[str]]:
    """(fd, name) of each socket and the program's argv; SystemExit(2) with a line if wrong."""
    if "--" not in args:
        _fail(USAGE)
    cut = args.index("--")
    specs, argv = args[:cut], args[cut + 1 :]
    if not specs or not argv:
        _fail(USAGE)
    if not os.path.isabs(argv[0]):
        _fail(f"socket_activate: the program must be an absolute path, not {argv[0]!r}")
    socks = []
    for spec in specs:
        fd, _, name = spec.partition(":")
        if not fd.isdigit() or ":" in name:
            _fail(f"socket_activate: {spec!r} is not FD or FD:NAME\n{USAGE}")
        socks.append((int(fd), name))
    named = [n for _, n in socks if n]
    if named and len(named) != len(socks):
        _fail("socket_activate: name every socket or none")
    return socks, argv


def main() -> None:
    socks, argv = parse(sys.argv[1:])
    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, PARK) for fd, _ in socks]
    for fd, _ in socks:
        os.close(fd)
    for i, fd in enumerate(parked):
        os.dup2(fd, FIRST + i, inheritable=True)
        os.close(fd)
    env = dict(os.environ, LISTEN_FDS=str(len(socks)), LISTEN_PID=str(os.getpid()))
    env.pop("LISTEN_FDNAMES", None)
    if socks[0][1]:
        env["LISTEN_FDNAMES"] = ":".join(name for _, name in socks)
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    main()

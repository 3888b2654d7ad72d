"""Hand a listening socket to a program exactly as systemd does: as fd 3, with
``LISTEN_FDS=1`` and ``LISTEN_PID`` set to the program's own pid (this process
execs it, so the pid is the same).

    python -I -m hyperhive.cli.socket_activate FD -- /ABSOLUTE/PROGRAM ARGS...

It runs as root: ``hive up`` starts it isolated (``-I``, a clean environment, ``/``
as working directory), and the program must be an absolute path (no ``PATH``
lookup), so nothing of the caller's shell chooses what runs.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 3 or args[1] != "--":
        print(
            "usage: python -I -m hyperhive.cli.socket_activate FD -- /PROGRAM ARGS...",
            file=sys.stderr,
        )
        raise SystemExit(2)
    fd, argv = int(args[0]), args[2:]
    if not os.path.isabs(argv[0]):
        print(
            f"socket_activate: the program must be an absolute path, not {argv[0]!r}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if fd != 3:
        os.dup2(fd, 3, inheritable=True)
        os.close(fd)
    else:
        os.set_inheritable(3, True)
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
    env.pop("LISTEN_FDNAMES", None)
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    main()

"""Hand a listening socket to a program exactly as systemd does: as fd 3, with
``LISTEN_FDS=1`` and ``LISTEN_PID`` set to the program's own pid (this process
execs it, so the pid is the same).

    python -m hyperhive.cli.socket_activate FD -- PROGRAM ARGS...
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m hyperhive.cli.socket_activate FD -- PROGRAM ARGS...", file=sys.stderr)
        raise SystemExit(2)
    fd, argv = int(args[0]), args[2:]
    if fd != 3:
        os.dup2(fd, 3, inheritable=True)
        os.close(fd)
    else:
        os.set_inheritable(3, True)
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
    env.pop("LISTEN_FDNAMES", None)
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    main()

"""Entry inside a cage: ``init`` (the cage's first process), ``harness``,
or ``hive exec``'s steps (``exec``, ``exec-home``: see ``hyperhive.cage.exec_``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("init", "harness", "exec", "exec-home"):
        print("usage: python -m hyperhive.cage init|harness|exec|exec-home ...", file=sys.stderr)
        raise SystemExit(2)
    if args[0] in ("exec", "exec-home"):
        from hyperhive.cage import exec_

        (exec_.run if args[0] == "exec" else exec_.home)(args[1:])
        return
    if args[0] == "init":
        from hyperhive.cage.init import main as run
    else:
        from hyperhive.cage.harness import main as run
    run(args[1:])


if __name__ == "__main__":
    main()

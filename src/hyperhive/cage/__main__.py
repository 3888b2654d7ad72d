"""Entry inside a cage: ``init`` (the cage's first process) or ``harness``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("init", "harness", "exec"):
        print("usage: python -m hyperhive.cage init|harness|exec ...", file=sys.stderr)
        raise SystemExit(2)
    if args[0] == "exec":
        run_exec(args[1:])
        return
    if args[0] == "init":
        from hyperhive.cage.init import main as run
    else:
        from hyperhive.cage.harness import main as run
    run(args[1:])


def run_exec(argv: list[str]) -> None:
    """``hive exec``'s last step inside the cage: the cage's seccomp filter, then CMD."""
    import os

    from hyperhive.cage import seccomp

    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m hyperhive.cage exec -- CMD...", file=sys.stderr)
        raise SystemExit(2)
    seccomp.install()
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        print(f"hive exec: {argv[0]}: {e.strerror}", file=sys.stderr)
        raise SystemExit(127 if isinstance(e, FileNotFoundError) else 126) from None


if __name__ == "__main__":
    main()

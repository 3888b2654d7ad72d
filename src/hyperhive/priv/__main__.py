"""``hive-priv``: socket-activated only (fd 3, LISTEN_FDS=1, LISTEN_PID)."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
from pathlib import Path


def refuse_unsafe_path() -> None:
    """Fail closed before importing anything more: as root, never run with the working
    directory on ``sys.path`` (``python -m`` without ``-I``/``-P`` puts it first, and a
    ``click.py`` lying there would run as root). ``hive up`` starts us with ``-I`` and
    ``/`` as the working directory; systemd runs the console script, whose first path
    entry is the venv's bin directory."""
    if os.geteuid() != 0 or sys.flags.safe_path or not sys.path:
        return
    if os.path.realpath(sys.path[0] or ".") == os.path.realpath(os.getcwd()) != "/":
        print(
            f"hive-priv: refusing to run as root with the working directory ({os.getcwd()}) "
            "on sys.path: start it with python -I (hive up does)",
            file=sys.stderr,
        )
        raise SystemExit(1)


refuse_unsafe_path()


def raise_nofile() -> None:
    """The soft descriptor limit up to the hard one (systemd's LimitNOFILE sets both; a
    ``hive up`` from a shell may leave a soft 1,024). Every wait in hive-priv is poll(2),
    so a descriptor's number never matters; how many it holds does: up to 64 stops side
    by side each hold a batch of pidfds (cgroups.PIN_BATCH) besides their connection,
    64 x (16 + 1) past a soft 1,024 (EMFILE: a stop refused). Cages and execs get an
    ordinary limit of their own (cages.enter_cage_limits)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# Only once the path is known to be safe (so not at the top: E402).
import click  # noqa: E402

from hyperhive.activation import NotActivated, inherited_listener  # noqa: E402
from hyperhive.paths import DEFAULT_RUN_DIR, DEFAULT_STATE_DIR, RunDir, StateDir  # noqa: E402
from hyperhive.priv.cages import CageError, Cages  # noqa: E402
from hyperhive.priv.server import PrivServer, _ids_of  # noqa: E402


@click.command(
    help="The hive's root helper. Started by hive-priv.socket (systemd) or `hive up`; "
    "never by hand."
)
@click.option(
    "--run-dir", type=click.Path(path_type=Path), default=DEFAULT_RUN_DIR, show_default=True
)
@click.option(
    "--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR, show_default=True
)
@click.option(
    "--core-user",
    default="hive-core",
    show_default=True,
    help="The user (and group) hive-core runs as: a name, or UID:GID (`hive up` runs each "
    "hive's core under ids of its own).",
)
@click.option(
    "--gateway-group",
    default="hive-gateway",
    show_default=True,
    help="The group the gateway runs as: it may connect to the agents' page sockets.",
)
def main(run_dir: Path, state_dir: Path, core_user: str, gateway_group: str) -> None:
    logging.basicConfig(
        level=os.environ.get("HIVE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        listener = inherited_listener()
    except NotActivated as e:
        print(f"hive-priv: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if os.geteuid() != 0:
        print("hive-priv: must run as root", file=sys.stderr)
        raise SystemExit(1)
    raise_nofile()
    core_uid, _ = _ids_of(core_user)
    _, gateway_gid = _ids_of(gateway_group)
    try:
        cages = Cages(
            RunDir(run_dir.absolute()),
            StateDir(state_dir.absolute()),
            core_uid=core_uid if core_uid is not None else 0,
            gateway_gid=gateway_gid if gateway_gid is not None else 0,
        )
    except CageError as e:
        print(f"hive-priv: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    server = PrivServer(listener, cages, core_user)
    print("hive-priv: ready", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

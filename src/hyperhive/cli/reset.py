"""``hive reset``: start fresh, from an empty state (the README's story gives its ids).

It removes, in the state dir, what a hive keeps there: ``hive.db`` (and its
``-wal``, ``-shm``, ``-journal``), ``operator.token``, ``agents/`` (every agent's home
and its image), ``priv/`` (hive-priv's name -> uid table) and ``ca/`` (the hive CA the
egress proxy terminates TLS with; a new one is made at the next start); in the run dir, what a
stopped hive leaves there: ``priv.sock``, ``host.sock``, ``core.sock``, ``agents/``,
``ui/`` and ``gateway/``; and the cages' cgroups (``hive/<key>`` in /sys/fs/cgroup).
Nothing else: never ``secrets/`` (the operator's credentials,
``hive secret rm`` removes them), never ``core.id`` (the ids the hive's core runs under:
``secrets/`` is theirs, and the next core must read it) and never the host-wide uid
registry (``/var/lib/hyperhive/ids``): ids are still never reused.

It holds ``hive up``'s own instance locks on both directories while it works, so it
refuses while a hive runs there (and no hive can start meanwhile); it also refuses
while a root-owned priv.sock there is live (a hive run by systemd) or a process is
left in one of the hive's cages. A home still mounted (a hive that was killed) is
detached first; the removal never follows a link (``shutil.rmtree`` works from
descriptors), so nothing an agent planted in its home reaches outside it."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path
from typing import NoReturn

import click

from hyperhive.cli import instance_lock
from hyperhive.cli.agents_fs import mount_points_below, unmount
from hyperhive.cli.output import fail, json_option, say
from hyperhive.display import dumps
from hyperhive.paths import DEFAULT_RUN_DIR, DEFAULT_STATE_DIR
from hyperhive.priv.cgroups import CGROUP_ROOT, GROUP, Cgroup, hive_key, is_v2, remove_hive

STATE_ENTRIES = ("hive.db", "hive.db-wal", "hive.db-shm", "hive.db-journal", "operator.token")
STATE_DIRS = ("agents", "priv", "ca")
RUN_ENTRIES = ("priv.sock", "host.sock", "core.sock")
RUN_DIRS = ("agents", "ui", "gateway")


def _caged_pids(state_dir: Path) -> list[int]:
    """Processes left in this hive's cages (its cgroup subtree)."""
    key = hive_key(state_dir)
    top = CGROUP_ROOT / GROUP / key if is_v2() else CGROUP_ROOT / "pids" / GROUP / key
    try:
        names = [p.name for p in top.iterdir() if p.is_dir()]
    except OSError:
        return []
    pids: list[int] = []
    for name in names:
        try:
            pids += Cgroup(name, key).pids()
        except ValueError:  # not an agent's name: not a cage of ours
            continue
    return pids


def _present(root: Path, files: tuple[str, ...], dirs: tuple[str, ...]) -> list[Path]:
    return [root / n for n in (*files, *dirs) if os.path.lexists(root / n)]


def _remove(path: Path) -> None:
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)  # from descriptors, never through a link
    else:
        path.unlink()


@click.command("reset")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="The hive's state dir (as given to hive up).",
)
@click.option(
    "--run-dir",
    "reset_run_dir",
    type=click.Path(path_type=Path),
    help=f"Its run dir (default: hive's --run-dir, $HIVE_RUN_DIR or {DEFAULT_RUN_DIR}).",
)
@click.option("--yes", is_flag=True, help="Don't ask for confirmation.")
@json_option
@click.pass_context
def reset(
    ctx: click.Context, state_dir: Path, reset_run_dir: Path | None, yes: bool, as_json: bool
) -> None:
    """Start fresh: delete a stopped hive's state (root only).

    Removes the store (hive.db: agents, messages, questions, approvals, transcripts;
    ids start at 1 again), operator.token (a new login URL), agents/ (every agent's
    home), priv/ (its uid table) and ca/ (the hive CA) from the state dir, and the sockets, agents/,
    ui/ and gateway/ a stopped hive leaves in the run dir, and its cages' cgroups. Refuses
    while a hive runs
    there. Keeps secrets/ (use hive secret rm) and core.id (the ids of the core that
    owns secrets/). Asks first on a terminal; elsewhere it needs --yes."""
    # Normalized (no `..`), as `hive up` takes them: the mount points mountinfo names.
    run_dir = Path(os.path.abspath(reset_run_dir or ctx.obj.get("run_dir") or DEFAULT_RUN_DIR))
    state_dir = Path(os.path.abspath(state_dir))

    def refuse(message: str) -> NoReturn:
        if as_json:
            click.echo(dumps({"version": 1, "ok": False, "error": message}))
            raise SystemExit(1)
        fail(message)
        raise SystemExit(1)  # (fail has exited already)

    if os.geteuid() != 0:
        refuse("hive reset needs root (the state dir is root's)")
    for d in (state_dir, run_dir):
        if d.exists() and (d.is_symlink() or not d.is_dir() or d.stat().st_uid != 0):
            refuse(f"{d} is not a hive's directory (not a directory of root's); nothing removed")
    try:
        lock = instance_lock.acquire([run_dir, state_dir])
    except instance_lock.InUse as e:
        refuse(f"{e}; stop it first (nothing was removed)")
    try:
        pid = instance_lock.live_priv_socket(run_dir)
        if pid is not None:
            refuse(f"a hive runs in {run_dir} (priv.sock opened by pid {pid}); stop it first")
        left = _caged_pids(state_dir)
        if left:
            pids = ", ".join(map(str, left[:5]))
            refuse(f"processes are still in this hive's cages (pid {pids}); stop them first")
        doomed = _present(state_dir, STATE_ENTRIES, STATE_DIRS)
        doomed += _present(run_dir, RUN_ENTRIES, RUN_DIRS)
        if doomed and not yes:
            if not sys.stdin.isatty():
                refuse("hive reset deletes the hive's state: add --yes (no terminal to ask on)")
            listing = ", ".join(map(str, doomed))
            click.confirm(f"delete {listing}?", abort=True, err=True)
        unmounted = []
        for point in mount_points_below(state_dir) + mount_points_below(run_dir):
            try:
                unmount(point)
            except OSError as e:
                refuse(f"{e.strerror}; nothing was removed")
            unmounted.append(point)
        still = mount_points_below(state_dir) + mount_points_below(run_dir)
        if still:
            refuse(f"{still[0]} is still mounted; nothing was removed")
        for path in doomed:
            try:
                _remove(path)
            except OSError as e:
                refuse(f"could not remove {path}: {e.strerror}")
        # The cages' cgroups too (empty: no process is left in them, checked above): a
        # stopped cage keeps its own for its next start, and nothing else removes them.
        cgroups = remove_hive(hive_key(state_dir))
    finally:
        lock.release()
    if as_json:
        out = {"version": 1, "ok": True, "state_dir": str(state_dir), "run_dir": str(run_dir)}
        out |= {"removed": [str(p) for p in doomed], "unmounted": unmounted, "cgroups": cgroups}
        click.echo(dumps(out))
    elif doomed:
        cages = f" and {cgroups} cgroups" if cgroups else ""
        say(f"reset: removed {', '.join(map(str, doomed))}{cages}")
    else:
        say(f"reset: nothing to remove in {state_dir} or {run_dir}")

"""The ids a hive's core runs under: its own, not one user every hive on the host shares.

With one ``hive-core`` user for every hive (and its groups ``hive-admin`` and
``hive-gateway``), the compromised core of one hive was the operator and the core of every
other hive on the host (red team round 22). Now ``hive up`` (root) gives each hive's core a
uid and gid of its own, from the host's id registry (``priv/ids.py``: never handed out
twice, skipping host accounts and subordinate ranges), with no account and no
supplementary group: it binds host.sock and core.sock itself and hands them in, so the
core needs neither socket's group.

The ids are kept in ``STATE/core.id`` (root's, 0644; the state directory is sticky, so the
core can neither replace nor remove it), so the same hive's core keeps owning its files
across restarts, and across ``hive reset`` (which keeps ``secrets/``, the core's). Files an
older version's shared ``hive-core`` user made in the state directory are given to the new
ids once (``adopt_legacy_files``).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from hyperhive.cli.output import fail, json_option
from hyperhive.display import dumps
from hyperhive.paths import DEFAULT_STATE_DIR
from hyperhive.priv import safefs
from hyperhive.priv.ids import HostRegistry, IdsExhausted

log = logging.getLogger("hive.up")

ID_FILE = "core.id"
LEGACY_USER = "hive-core"  # the one core user of every hive, before each had its own
# In the state directory, root's (priv/) or the agents' (agents/): never the core's.
NOT_THE_CORES = frozenset({"priv", "agents", ID_FILE})


class CoreIdentityError(Exception):
    """Why the hive can't know its core's ids; one line."""


@dataclass(frozen=True)
class CoreIds:
    uid: int
    gid: int

    @property
    def spec(self) -> str:
        """As ``hive-priv --core-user`` takes it."""
        return f"{self.uid}:{self.gid}"


def core_ids(state_dir: Path, registry: HostRegistry | None = None) -> CoreIds:
    """This hive's core ids: read from ``STATE/core.id``, or claimed and written there."""
    state_dir.mkdir(parents=True, exist_ok=True)
    anchor = safefs.open_anchor(state_dir.absolute())
    with safefs.opened(anchor):
        known = _read(anchor, state_dir)
        if known is not None:
            return known
        base = (registry or HostRegistry()).claim(f"{state_dir.absolute()}#core")
        ids = CoreIds(uid=base, gid=base)
        data = json.dumps({"uid": ids.uid, "gid": ids.gid}).encode() + b"\n"
        safefs.write_file(anchor, ID_FILE, data, 0o644)
        log.info("this hive's core runs as uid %d gid %d (new)", ids.uid, ids.gid)
        return ids


def _read(anchor: int, state_dir: Path) -> CoreIds | None:
    where = state_dir / ID_FILE
    try:
        fd = os.open(
            ID_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=anchor
        )
    except FileNotFoundError:
        return None
    except OSError as e:  # a link (ELOOP), ...
        raise CoreIdentityError(f"{where}: {e.strerror}; refusing to start (remove it)") from None
    with safefs.opened(fd):
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_nlink != 1:
            raise CoreIdentityError(
                f"{where} is not a plain file of root's; refusing to start (remove it)"
            )
        raw = os.read(fd, 4096)
    try:
        table = json.loads(raw)
        ids = CoreIds(uid=int(table["uid"]), gid=int(table["gid"]))
    except (ValueError, KeyError, TypeError) as e:
        raise CoreIdentityError(f"{where} is unreadable ({e}); hive up wrote it") from None
    if ids.uid <= 0 or ids.gid <= 0:
        raise CoreIdentityError(f"{where} names uid {ids.uid} gid {ids.gid}: not a core's")
    return ids


def adopt_legacy_files(state_dir: Path, ids: CoreIds) -> int:
    """Give what the shared ``hive-core`` user of an older version owns in the state
    directory (its database, token, CA, secrets) to this hive's core; the number of
    entries changed. Never through a link (``fwalk`` without following, ``lchown`` by
    directory descriptor); root's ``priv/`` and the agents' ``agents/`` are not walked."""
    try:
        legacy = pwd.getpwnam(LEGACY_USER)
    except KeyError:
        return 0
    if legacy.pw_uid == ids.uid:
        return 0
    changed = 0
    try:
        for names, dir_fd in _walk(state_dir):
            for name in names:
                changed += _adopt(dir_fd, name, legacy, ids)
    except RecursionError:  # os.fwalk recurses: a tree deeper than the interpreter's limit
        raise CoreIdentityError(
            f"{state_dir} holds a tree too deep to walk; move it away and start again"
        ) from None
    if changed:
        log.info(
            "gave %d entries of the shared user %s to this hive's core (uid %d)",
            changed,
            LEGACY_USER,
            ids.uid,
        )
    return changed


def _walk(state_dir: Path) -> Iterator[tuple[list[str], int]]:
    """Each directory's entries and its descriptor (open only until the next one), root's
    and the agents' places left out."""
    top = os.stat(state_dir, follow_symlinks=False)
    for _, dirs, files, dir_fd in os.fwalk(state_dir, follow_symlinks=False):
        if os.path.samestat(os.fstat(dir_fd), top):
            dirs[:] = [d for d in dirs if d not in NOT_THE_CORES]
            files = [f for f in files if f not in NOT_THE_CORES]
        yield [*dirs, *files], dir_fd


def _adopt(dir_fd: int, name: str, legacy: pwd.struct_passwd, ids: CoreIds) -> int:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISREG(st.st_mode) and st.st_nlink != 1:
        # A hard link the shared user could have made to another hive's file: not ours.
        log.warning("not adopting %s: a file with %d links", name, st.st_nlink)
        return 0
    uid = ids.uid if st.st_uid == legacy.pw_uid else -1
    gid = ids.gid if st.st_gid == legacy.pw_gid else -1
    if uid == -1 and gid == -1:
        return 0
    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    return 1


@click.command("core-id")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="The hive's state dir (as given to hive up).",
)
@json_option
def core_id(state_dir: Path, as_json: bool) -> None:
    """The uid and gid this hive's core runs under, as UID:GID (root only; made on
    first use).

    Give a file the core must read to these ids, 0600: the swarm's credentials, an
    operator key kept outside the state dir: chown "$(hive core-id)" FILE."""
    if os.geteuid() != 0:
        fail("hive core-id needs root (the state dir and the host's id registry are root's)")
    try:
        ids = core_ids(state_dir.absolute())
    except (CoreIdentityError, IdsExhausted, safefs.UnsafePath, OSError) as e:
        fail(f"the core's ids: {e}")
        return
    if as_json:
        click.echo(dumps({"version": 1, "ok": True, "uid": ids.uid, "gid": ids.gid}))
    else:
        click.echo(ids.spec)

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
ids (``adopt_files``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

import click

from hyperhive.cli.output import fail, json_option
from hyperhive.display import dumps
from hyperhive.paths import DEFAULT_STATE_DIR
from hyperhive.priv import safefs
from hyperhive.priv.ids import HostRegistry, IdsExhausted, given_to_host

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


def gateway_ids(core: CoreIds) -> CoreIds:
    """This hive's gateway ids (its nginx master and workers, never root): the second
    id of the core's block in the host's registry (a block is two ids, an agent's runtime
    and harness; the core uses the first). No account, no other hive's."""
    return CoreIds(uid=core.uid + 1, gid=core.gid + 1)


@dataclass(frozen=True)
class Identity:
    """The core's ids, and those ``core.id`` named that the host's registry gives to
    another state dir (a copy of this one, or this one moved): their files here are to be
    given to the new ids (``adopt_files``)."""

    ids: CoreIds
    former: CoreIds | None = None


@functools.cache
def host_registry() -> HostRegistry:
    """The host's id registry, opened once per process (it keeps its table and directory
    open for the process's life, as hive-priv's does)."""
    return HostRegistry()


def core_ids(state_dir: Path, registry: HostRegistry | None = None) -> CoreIds:
    """This hive's core ids (``core_identity``)."""
    return core_identity(state_dir, registry).ids


def core_identity(state_dir: Path, registry: HostRegistry | None = None) -> Identity:
    """Read from ``STATE/core.id`` if the host's registry gives those ids to this state
    dir, else claimed and written there. A ``cp -a`` of a state dir would otherwise run a
    second hive's core under the first's ids (red team of session 16)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    reg = registry or host_registry()
    owner = f"{state_dir.absolute()}#core"
    anchor = safefs.open_anchor(state_dir.absolute())
    with safefs.opened(anchor):
        known = _read(anchor, state_dir)
        if known is not None:
            holder = reg.owner(known.uid)
            taken = given_away(known) if holder == owner else None
            if holder == owner and taken is None:
                return Identity(known)
            if taken is not None:
                log.warning(
                    "%s: %s since it was claimed: new ids for this hive's core and gateway "
                    "(its files here are given to them)",
                    state_dir / ID_FILE,
                    taken,
                )
            else:
                log.warning(
                    "%s names uid %d, which the host's id registry gives to %s, not to %s: "
                    "new ids for this hive's core (a copied or moved state dir?)",
                    state_dir / ID_FILE,
                    known.uid,
                    holder or "no one",
                    owner,
                )
        ids = _claim_clear(reg, owner)
        data = json.dumps({"uid": ids.uid, "gid": ids.gid}).encode() + b"\n"
        safefs.write_file(anchor, ID_FILE, data, 0o644)
        log.info("this hive's core runs as uid %d gid %d (new)", ids.uid, ids.gid)
        return Identity(ids, known)


CLAIM_TRIES = 64  # blocks a directory service's unlisted users may hold in a row


def _claim_clear(reg: HostRegistry, owner: str) -> CoreIds:
    """A new block whose ids no account, group or subordinate range holds, looked up one
    by one: the registry skips the accounts it can list, and a directory service may
    list none (red team of session 17). A block found taken stays claimed (never
    handed out again) and the next is tried."""
    for _ in range(CLAIM_TRIES):
        base = reg.claim(owner)
        ids = CoreIds(uid=base, gid=base)
        taken = given_away(ids)
        if taken is None:
            return ids
        log.warning("ids %d-%d of the host's registry: %s; claiming others", base, base + 1, taken)
    raise IdsExhausted(f"{CLAIM_TRIES} blocks in a row held by the host's accounts; none claimed")


def given_away(core: CoreIds) -> str | None:
    """Whether the host gave an id of the hive's block (the core's and the gateway's)
    to something else after the registry handed it out (see ``given_to_host``)."""
    gw = gateway_ids(core)
    return given_to_host((core.uid, core.gid, gw.uid, gw.gid))


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


MAX_DEPTH = 4096  # directories deep; past it the walk refuses in one line


def adopt_files(state_dir: Path, ids: CoreIds, former: CoreIds | None = None) -> int:
    """Give this hive's core what earlier cores own in the state dir (its database,
    token, CA, secrets): the shared ``hive-core`` user of an older version, and the ids
    ``core.id`` named before (``Identity.former``). The number of entries changed.

    Walked only if a top-level entry is still theirs (checked at every start, so a walk
    cut short is finished at the next: each directory is given after everything in it);
    iteratively, one descriptor a level, never through a link (``O_NOFOLLOW``, ``lchown``
    by directory descriptor); a regular file with more than one link is left alone (the
    shared user could have linked another hive's file here); root's ``priv/`` and the
    agents' ``agents/`` are not walked."""
    uids, gids = set(), set()
    try:
        legacy = pwd.getpwnam(LEGACY_USER)
        uids.add(legacy.pw_uid)
        gids.add(legacy.pw_gid)
    except KeyError:
        pass
    if former is not None:
        uids.add(former.uid)
        gids.add(former.gid)
    uids.discard(ids.uid)
    gids.discard(ids.gid)
    uids.discard(0)
    gids.discard(0)
    if not uids and not gids:
        return 0
    top = safefs.open_anchor(state_dir.absolute())
    with safefs.opened(top):
        names = [n for n in os.listdir(top) if n not in NOT_THE_CORES]
        if not any(_theirs(top, n, uids, gids) for n in names):
            return 0
        changed = _adopt_tree(top, names, uids, gids, ids)
    if changed:
        log.info("gave %d entries of earlier cores to this hive's core (uid %d)", changed, ids.uid)
    return changed


def _theirs(dir_fd: int, name: str, uids: set[int], gids: set[int]) -> bool:
    """An entry the walk would give (a file with a second link never is: it must not keep
    the walk going at every start, red team of session 16)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISREG(st.st_mode) and st.st_nlink != 1:
        return False
    return st.st_uid in uids or st.st_gid in gids


def _adopt_tree(top: int, names: list[str], uids: set[int], gids: set[int], ids: CoreIds) -> int:
    """Post-order: a directory's entries after everything below them."""
    changed = 0
    # Each level: its descriptor, its entries, its subdirectories not walked yet.
    stack: list[tuple[int, list[str], list[str]]] = [(top, names, _subdirs(top, names))]
    try:
        while stack:
            fd, entries, pending = stack[-1]
            if pending:
                name = pending.pop()
                try:
                    child = os.open(name, DIR_FLAGS, dir_fd=fd)
                except OSError:  # gone, or no longer a directory
                    continue
                if os.fstat(child).st_uid == ids.uid:
                    # The core's own already: given after all below it (post-order), or
                    # made by it (it can't make an earlier core's files). Not walked: a
                    # tree the core planted can't make the walk refuse every start.
                    os.close(child)
                    continue
                if len(stack) >= MAX_DEPTH:
                    os.close(child)
                    raise CoreIdentityError(
                        f"the state dir holds a tree over {MAX_DEPTH} directories deep; "
                        "move it away and start again"
                    )
                below = os.listdir(child)
                stack.append((child, below, _subdirs(child, below)))
                continue
            stack.pop()
            for name in entries:
                changed += _adopt(fd, name, uids, gids, ids)
            if fd != top:
                os.close(fd)
    finally:
        for fd, _, _ in stack:
            if fd != top:
                os.close(fd)
    return changed


DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _subdirs(dir_fd: int, names: list[str]) -> list[str]:
    out = []
    for name in names:
        try:
            if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                out.append(name)
        except FileNotFoundError:
            pass
    return out


def _adopt(dir_fd: int, name: str, uids: set[int], gids: set[int], ids: CoreIds) -> int:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    if stat.S_ISREG(st.st_mode) and st.st_nlink != 1:
        # A hard link an earlier core could have made to another hive's file: not ours.
        log.warning("not adopting %s: a file with %d links", name, st.st_nlink)
        return 0
    uid = ids.uid if st.st_uid in uids else -1
    gid = ids.gid if st.st_gid in gids else -1
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
    first use). ``--json`` also gives its gateway's (the nginx workers').

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
        gw = gateway_ids(ids)
        gateway = {"uid": gw.uid, "gid": gw.gid}  # its nginx workers' (hive up)
        click.echo(
            dumps({"version": 1, "ok": True, "uid": ids.uid, "gid": ids.gid, "gateway": gateway})
        )
    else:
        click.echo(ids.spec)

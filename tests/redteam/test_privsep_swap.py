"""A compromised hive-core against hive-priv's filesystem trust.

The red team, as the ``hive-core`` user, swapped ``state/agents`` and ``state/priv``
for trees of its own with symlinks, and hive-priv then chowned a directory of the
core's choosing to an agent uid, bound it read-write into a cage and wrote a file
as root through a planted link. Now the run and state directories are root's
and sticky: the core may add its own files (database, token, sockets) but can't
rename, replace or remove anything of root's. Every attempt below runs as the
real ``hive-core`` user (its uid and all its groups) against a running hive and
gets the kernel's refusal; hive-priv then still works and nothing changed.

And hive-priv itself refuses to run on a layout someone else shaped: a link or a
directory of another owner where it keeps its state (a core that got there first).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from hive_fixture import HIVE, HiveProcess
from hyperhive.paths import RunDir, StateDir
from hyperhive.priv.cages import CageError, Cages
from hyperhive.priv.ids import HostRegistry

from .conftest import World, unchanged

pytestmark = pytest.mark.attack(
    "privsep.core-symlink-swap",
    ref="issue 11 item 2; firejail CVE-2017-5180; CVE-2026-39861 (root following links a lesser user planted)",
)


# Runs as hive-core: performs one operation on one path and prints what the kernel said.
ATTEMPT = r"""
import errno, json, os, sys
op, target = sys.argv[1], sys.argv[2]
def attempt():
    if op == "rename-away":
        os.rename(target, target + ".moved")
    elif op == "replace-with-link":
        tmp = target + ".evil"
        os.symlink("/etc", tmp)
        try:
            os.rename(tmp, target)
        finally:
            try: os.unlink(tmp)
            except OSError: pass
    elif op == "remove":
        (os.rmdir if os.path.isdir(target) and not os.path.islink(target) else os.unlink)(target)
    elif op == "chmod":
        os.chmod(target, 0o777)
    elif op == "create-inside":
        os.close(os.open(os.path.join(target, "planted"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    elif op == "link-inside":
        os.symlink("/etc/shadow", os.path.join(target, "planted"))
try:
    attempt()
    print(json.dumps("DONE"))
except OSError as e:
    print(json.dumps(errno.errorcode.get(e.errno, str(e))))
"""

# What the core must not touch: everything hive-priv trusts (relative to the hive's base).
TRUSTED = [
    "state/priv", "state/agents", "state/agents/rtalice", "state/agents/rtalice/home",
    "state/agents/rtalice/home.img", "state/agents/rtalice/home.loop", "state/priv/ids.json", "state/priv/cages",
    "state/priv/etc-view", "state/priv/pts-view",
    "state/priv/cages/rtalice", "run/agents", "run/ui", "run/ui/rtalice", "run/priv.sock", "run/gateway",
]
OPS = ["rename-away", "replace-with-link", "remove", "chmod"]
# Directories the core may not add to (it could plant a link for root to follow).
NO_ADD = ["state/priv", "state/agents", "state/agents/rtalice", "state/priv/cages", "state/priv/etc-view",
          "state/priv/pts-view",
          "run/agents", "run/ui",
          "run/gateway"]


def as_core(h: HiveProcess, *args: str) -> str:
    """As ``h``'s core: its own ids, the groups it has (none)."""
    proc = subprocess.run([str(HIVE.parent / "python"), "-c", ATTEMPT, *args], capture_output=True, text=True,
                          timeout=60, cwd="/", **h.as_core())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def priv_still_works(h: HiveProcess) -> None:
    status = h.priv("status")
    assert status["ok"] and status["cages"]["rtalice"]["running"], status


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("target", TRUSTED)
def test_core_cannot_swap_what_priv_trusts(rt: HiveProcess, world: World, target: str, op: str) -> None:
    path = rt.base / target
    assert path.exists() or path.is_symlink(), f"{path} should exist in a running hive"
    before = os.lstat(path)
    with unchanged(rt):
        result = as_core(rt, op, str(path))
    assert result in ("EPERM", "EACCES"), f"hive-core could {op} {target}: {result}"
    after = os.lstat(path)
    assert (after.st_ino, after.st_uid, after.st_mode) == (before.st_ino, before.st_uid, before.st_mode)
    priv_still_works(rt)


@pytest.mark.parametrize("op", ["create-inside", "link-inside"])
@pytest.mark.parametrize("target", NO_ADD)
def test_core_cannot_plant_in_what_priv_trusts(rt: HiveProcess, world: World, target: str, op: str) -> None:
    with unchanged(rt):
        result = as_core(rt, op, str(rt.base / target))
    assert result in ("EPERM", "EACCES"), f"hive-core could {op} {target}: {result}"
    assert not (rt.base / target / "planted").exists()


@pytest.mark.parametrize("name", ["state", "run"])
def test_the_roots_are_roots_and_sticky(rt: HiveProcess, world: World, name: str) -> None:
    """The state dir is root's and sticky (the core adds its files, can't replace root's);
    the run dir is root's alone since session 16 (0755: the core adds nothing there)."""
    st = os.stat(rt.base / name)
    if name == "state":
        assert st.st_uid == 0 and st.st_mode & 0o1000, oct(st.st_mode)
    else:
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o755), oct(st.st_mode)


# -- hive-priv refuses a layout someone else shaped -------------------------------------------------


def _layout(tmp: Path) -> tuple[Path, Path]:
    for d in ("state", "run"):
        (tmp / d).mkdir()
        os.chmod(tmp / d, 0o1770)
    return tmp / "state", tmp / "run"


PLANTS = {
    "state/agents is a link": lambda s, r, core: os.symlink("/etc", s / "agents"),
    "state/priv is a link": lambda s, r, core: os.symlink("/tmp", s / "priv"),
    "state/priv is the core's": lambda s, r, core: (os.mkdir(s / "priv"), os.chown(s / "priv", core, core)),
    "state/agents is the core's": lambda s, r, core: (os.mkdir(s / "agents"), os.chown(s / "agents", core, core)),
    "run/ui is a link": lambda s, r, core: os.symlink("/etc", r / "ui"),
    "run/agents is a link": lambda s, r, core: os.symlink("/etc", r / "agents"),
    "run/ui is the core's": lambda s, r, core: (os.mkdir(r / "ui"), os.chown(r / "ui", core, core)),
    "state dir is the core's": lambda s, r, core: os.chown(s, core, core),
    "state dir is world-writable": lambda s, r, core: os.chmod(s, 0o777),
    "run dir is a link": lambda s, r, core: (os.rmdir(r), os.symlink("/etc", r)),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_priv_refuses_a_layout_the_core_shaped(plant: str) -> None:
    core = 200_000_000 + os.getpid() % 1000  # a core's own ids (no account)
    with tempfile.TemporaryDirectory(prefix="hvswap") as tmp:
        state, run = _layout(Path(tmp))
        PLANTS[plant](state, run, core)
        etc_before = os.stat("/etc")
        with pytest.raises(CageError, match="refusing to run on these directories"):
            Cages(RunDir(run), StateDir(state), core_uid=core, registry=HostRegistry(Path(tmp) / "ids"))
        etc_after = os.stat("/etc")
        assert (etc_after.st_uid, etc_after.st_mode) == (etc_before.st_uid, etc_before.st_mode)

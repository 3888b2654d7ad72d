"""``hive reset`` (root) against what a compromised hive-core or an agent left in the
directories it deletes from.

- ``reset.planted-link``: hive-core may create files in the state dir and the run dir
  (both sticky, group hive-core) and an agent owns everything in its home. Links
  planted under the names reset removes (to a root file, to a root directory, inside
  a directory) must be removed as links, never followed: the targets stay whole.
  Names reset does not own stay too; a state dir that is itself a link is refused.

No hive runs here: reset needs only the directories, made as ``hive up`` makes them.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HIVE, as_user, ensure_user

# What a compromised core may leave behind is what any user but root may: a stand-in user
# (hive up gives each hive's core ids of its own, with no account).
CORE_USER = "hive-core"

REF = "issue 15 item 6 (hive reset); CVE-2022-21658 (Rust std::fs::remove_dir_all symlink race)"


@pytest.fixture
def dirs() -> Iterator[dict[str, Path]]:
    ensure_user(CORE_USER)
    core = pwd.getpwnam(CORE_USER)
    base = Path(tempfile.mkdtemp(prefix="rtreset", dir="/tmp"))
    os.chmod(base, 0o755)
    out = {"base": base, "state": base / "state", "run": base / "run", "victim": base / "victim"}
    for key, mode in (("state", 0o1770), ("run", 0o1775)):
        out[key].mkdir()
        os.chown(out[key], 0, core.pw_gid)
        os.chmod(out[key], mode)
    victim = out["victim"]
    victim.mkdir()
    (victim / "secret").write_text("root's\n")
    (victim / "sub").mkdir()
    (victim / "sub" / "kept").write_text("kept\n")
    os.chmod(victim / "secret", 0o644)
    yield out
    subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


def as_core(script: str, **params: Any) -> None:
    """Run ``script`` (Python) as the hive-core user: what a compromised core may do."""
    proc = subprocess.run(["/usr/bin/python3", "-c", script, json.dumps(params)], capture_output=True,
                          text=True, timeout=30, check=False, cwd="/", **as_user(CORE_USER))
    assert proc.returncode == 0, proc.stderr


def reset(d: dict[str, Path], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HIVE), "reset", "--state-dir", str(d["state"]), "--run-dir", str(d["run"]),
                           "--yes", "--json", *extra], capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL)


def victim_whole(d: dict[str, Path]) -> None:
    v = d["victim"]
    assert (v / "secret").read_text() == "root's\n"
    assert (v / "sub" / "kept").read_text() == "kept\n"
    assert sorted(p.name for p in v.iterdir()) == ["secret", "sub"]


@pytest.mark.attack("reset.planted-link", ref=REF)
def test_links_planted_by_the_core_are_removed_not_followed(dirs: dict[str, Path]) -> None:
    as_core("""
import json, os, sys
P = json.loads(sys.argv[1])
os.symlink(P["victim"] + "/secret", P["state"] + "/hive.db-wal")       # a file's name -> root's file
os.symlink(P["victim"], P["state"] + "/hive.db-shm")                   # -> root's directory
os.mkdir(P["state"] + "/hive.db-journal")                              # a directory of links
os.symlink(P["victim"], P["state"] + "/hive.db-journal/into")
os.symlink(P["victim"] + "/secret", P["state"] + "/hive.db-journal/file")
os.symlink(P["victim"], P["run"] + "/core.sock")
open(P["state"] + "/hive.db", "w").write("db")
open(P["state"] + "/notes", "w").write("not reset's")
""", victim=str(dirs["victim"]), state=str(dirs["state"]), run=str(dirs["run"]))
    # An agent's home (a plain directory: one from before disk quotas) with its own links.
    home = dirs["state"] / "agents" / "alice" / "home"
    home.mkdir(parents=True)
    (home / "up").symlink_to(dirs["victim"])
    (home / "deep").mkdir()
    (home / "deep" / "secret").symlink_to(dirs["victim"] / "secret")
    done = reset(dirs)
    assert done.returncode == 0, (done.stdout, done.stderr)
    out = json.loads(done.stdout)
    assert out["ok"] is True and str(dirs["state"] / "hive.db-shm") in out["removed"]
    victim_whole(dirs)
    assert sorted(p.name for p in dirs["state"].iterdir()) == ["notes"]  # only what reset owns went
    assert list(dirs["run"].iterdir()) == []


@pytest.mark.attack("reset.planted-link", ref=REF)
def test_a_state_dir_that_is_a_link_is_refused(dirs: dict[str, Path]) -> None:
    (dirs["victim"] / "hive.db").write_text("not a hive's")
    link = dirs["base"] / "linked"
    link.symlink_to(dirs["victim"])
    proc = subprocess.run([str(HIVE), "reset", "--state-dir", str(link), "--run-dir", str(dirs["run"]),
                           "--yes"], capture_output=True, text=True, timeout=60, check=False,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"hive: {link} is not a hive's directory (not a directory of root's); nothing removed\n"
    assert (dirs["victim"] / "hive.db").read_text() == "not a hive's"

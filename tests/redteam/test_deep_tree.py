"""An agent that can't be destroyed: the red team built a 3000-deep directory tree in
its home, and ``destroy`` failed with ``RecursionError`` in hive-priv every time
(and the agent came back after a core restart). Removal is now iterative, on
descriptors, never following a link, whatever the agent built: depth, width,
links to host files at every level, directories it made unreadable, fifos. The
host's files the links point at survive; nothing of the agent's is left; its ids
are never handed out again."""

from __future__ import annotations

import os
import resource
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hive_fixture import HiveProcess, running_hive, wait_until
from hyperhive.priv import safefs

from .conftest import cage_run

pytestmark = pytest.mark.attack("priv.deep-tree", ref="issue 11 item 8; CPython shutil.rmtree recursion (gh-89727)")

BUILD = r"""
import os
home = "/home/agent"
kind, n, canary = P["kind"], P["n"], P["canary"]
fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
made = 0
if kind in ("deep", "deep-links", "deep-locked"):
    for i in range(n):
        os.mkdir("d", dir_fd=fd)
        if kind == "deep-links" and i % 100 == 0:
            os.symlink(canary, "to-canary", dir_fd=fd)
            os.symlink("/etc/passwd", "to-passwd", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        if kind == "deep-locked" and i % 50 == 0:
            os.chmod(fd, 0o000)  # root must still get through
        os.close(fd)
        fd = nxt
        made += 1
elif kind == "wide":
    for i in range(n):
        os.mkdir(f"w{i}", dir_fd=fd)
        os.close(os.open(f"w{i}/f", os.O_WRONLY | os.O_CREAT, 0o000, dir_fd=fd))
        made += 1
elif kind == "specials":
    os.mkfifo("fifo", dir_fd=fd)
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind(home + "/sock")
    os.symlink(canary, "dir-link", dir_fd=fd)
    os.symlink("dir-link", "chain", dir_fd=fd)
    os.symlink("/", "root-link", dir_fd=fd)
    os.symlink("self", "self", dir_fd=fd)
    os.mkdir("locked", dir_fd=fd)
    os.close(os.open("locked/x", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.chmod("locked", 0o000, dir_fd=fd)
    made = 7
result(made=made)
"""

CASES = {
    "3000 deep": ("deep", 3000),
    "20000 deep": ("deep", 20000),
    "deep with links to host files": ("deep-links", 3000),
    "deep with unreadable levels": ("deep-locked", 3000),
    "5000 wide with mode-000 files": ("wide", 5000),
    "fifos, sockets, link chains, a link loop, a locked dir": ("specials", 0),
}


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess({"rtdeepbase": {"runtime": "command", "command": ["true"]}}))


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    d = tmp_path / "canary"
    d.mkdir()
    (d / "keep.txt").write_text("keep")
    return d


@pytest.mark.parametrize("case", sorted(CASES))
def test_destroy_removes_any_tree_the_agent_built(hive: HiveProcess, canary: Path, case: str) -> None:
    kind, n = CASES[case]
    name = "rtdeep"
    passwd = Path("/etc/passwd").read_bytes()
    assert hive.host_call("spawn", name=name, spec={"runtime": "command", "command": ["true"]})["ok"]
    hive.wait_running([name])
    old_uid = hive.cage(name)["uid"]
    res = cage_run(hive, name, BUILD, kind=kind, n=n, canary=str(canary), timeout=300)
    assert res["made"] == (n if kind != "specials" else 7)
    reply = hive.host_call("destroy", name=name)
    assert reply["ok"], reply
    wait_until(lambda: not hive.cgroup(name).pids(), 20, f"{name}'s cage to be gone")
    assert not (hive.state_dir / "agents" / name).exists()
    assert not (hive.run_dir / "agents" / name).exists()
    assert "RecursionError" not in hive.log_tail(400)
    assert (canary / "keep.txt").read_text() == "keep" and Path("/etc/passwd").read_bytes() == passwd
    # The same name again: a fresh agent with fresh ids.
    assert hive.host_call("spawn", name=name, spec={"runtime": "command", "command": ["true"]})["ok"]
    try:
        hive.wait_running([name])
        assert hive.cage(name)["uid"] != old_uid
    finally:
        assert hive.host_call("destroy", name=name)["ok"]
        wait_until(lambda: not hive.cgroup(name).pids(), 20, f"{name}'s cage to be gone")


# -- the remover itself, on trees root builds here -----------------------------------------------


def _deep(root: Path, depth: int) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)


@pytest.mark.parametrize("depth", [1, 2, 100, 5000])
def test_remove_tree_holds_few_descriptors_at_any_depth(tmp_path: Path, depth: int) -> None:
    (tmp_path / "t").mkdir()
    _deep(tmp_path / "t", depth)
    # A remover holding a descriptor per level would hit EMFILE under this limit. (Other
    # threads of the test process may open or close descriptors meanwhile: no leak is
    # "no more than before".)
    before = len(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))  # new fds take the lowest free number
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
    try:
        with safefs.opened(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)) as parent:
            safefs.remove_tree(parent, "t")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not (tmp_path / "t").exists()
    assert len(os.listdir("/proc/self/fd")) <= before


def test_remove_tree_takes_a_link_not_its_target(tmp_path: Path, canary: Path) -> None:
    (tmp_path / "t").symlink_to(canary)
    with safefs.opened(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)) as parent:
        safefs.remove_tree(parent, "t")
    assert not (tmp_path / "t").is_symlink() and (canary / "keep.txt").exists()


def test_remove_tree_does_not_cross_a_mount_point(tmp_path: Path) -> None:
    (tmp_path / "t" / "m").mkdir(parents=True)
    os.system(f"mount -t tmpfs none {tmp_path / 't' / 'm'}")
    (tmp_path / "t" / "m" / "keep").write_text("keep")
    try:
        with (
            safefs.opened(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)) as parent,
            pytest.raises(safefs.UnsafePath, match="mount point"),
        ):
            safefs.remove_tree(parent, "t")
        assert (tmp_path / "t" / "m" / "keep").read_text() == "keep"
    finally:
        os.system(f"umount {tmp_path / 't' / 'm'}")


def test_remove_tree_modes_do_not_stop_root(tmp_path: Path) -> None:
    (tmp_path / "t" / "a" / "b").mkdir(parents=True)
    (tmp_path / "t" / "a" / "b" / "f").write_text("x")
    for p in (tmp_path / "t" / "a" / "b", tmp_path / "t" / "a"):
        os.chmod(p, 0)
    with safefs.opened(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)) as parent:
        safefs.remove_tree(parent, "t")
    assert not (tmp_path / "t").exists()
    assert stat.S_ISDIR(os.stat(tmp_path).st_mode)

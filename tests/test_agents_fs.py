"""``run/agents`` is a tmpfs of its own while a hive runs (cli/agents_fs.py): the cages'
``/run/hive`` binds name no host path in their mountinfo (red team round 22), and what
the core writes there is bounded apart from the host's ``/run``."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from hive_fixture import HiveFactory
from hyperhive.cli import agents_fs


def _options(point: Path) -> set[str]:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if line.split()[4] == str(point):
            return set(line.split()[5].split(","))
    raise AssertionError(f"{point} is not mounted")


def test_a_bounded_tmpfs_of_roots_mounted_once_and_detached(tmp_path: Path) -> None:
    run = tmp_path / "run"
    agents = run / "agents"
    agents.mkdir(parents=True)
    (agents / "left-from-before").mkdir()
    try:
        assert agents_fs.mount(run, 0) is True
        st = os.stat(agents)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o711)
        assert os.listdir(agents) == [], "a fresh filesystem, not the directory beneath"
        assert {"nosuid", "nodev", "noexec"} <= _options(agents)
        assert agents_fs.mounted(agents)
        assert agents_fs.mount(run, 0) is False, "one already there is kept"
        # With no agent it holds SPARE_BYTES, then ENOSPC: the host's /run is not filled.
        written = 0
        with open(agents / "fill", "wb") as f, pytest.raises(OSError) as full:
            chunk = b"\0" * (1 << 20)
            while written <= 2 * agents_fs.SPARE_BYTES:
                f.write(chunk)
                f.flush()
                written += len(chunk)
        assert full.value.errno == errno.ENOSPC
        assert written <= agents_fs.SPARE_BYTES
    finally:
        agents_fs.unmount(str(agents))
    assert not agents_fs.mounted(agents)
    assert os.listdir(agents) == ["left-from-before"]
    agents_fs.unmount(str(agents))  # no mount there: nothing to do, no error


def test_hive_up_mounts_it_keeps_it_over_a_kill_and_unmounts_it_at_stop(
    hive_factory: HiveFactory,
) -> None:
    h = hive_factory({"fsa": {"runtime": "command", "command": ["sleep", "3600"]}})
    agents = h.run_dir / "agents"
    assert agents_fs.mounted(agents)
    assert (agents / "fsa" / "agent.sock").is_socket()
    # hive up killed outright: nothing unmounts it, and the next start keeps it (a cage
    # still running would keep the directory its core binds in).
    h.kill_everything()
    assert agents_fs.mounted(agents)
    h.start()
    assert [p for p, _ in agents_fs.mounts()].count(str(agents)) == 1
    assert h.exec("fsa", "true").returncode == 0
    h.stop_clean()
    assert not agents_fs.mounted(agents)

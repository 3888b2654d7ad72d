"""hive-priv's log helpers in safefs: the tail of a log, and a log moved aside."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hyperhive.priv import safefs


@pytest.fixture
def dirfd(tmp_path: Path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_read_tail_reads_the_end_of_a_big_log(tmp_path: Path, dirfd: int) -> None:
    """A failed start's last line comes from the end of cage.log, however long it is
    (the first 16 MiB were read before, and their last line reported)."""
    (tmp_path / "cage.log").write_bytes(b"early line\n" * 200_000 + b"bwrap: the last line\n")
    tail = safefs.read_tail(dirfd, "cage.log", 4096)
    assert tail is not None and len(tail) == 4096
    assert tail.splitlines()[-1] == b"bwrap: the last line"
    assert safefs.read_tail(dirfd, "missing.log", 4096) is None
    (tmp_path / "short.log").write_bytes(b"one\n")
    assert safefs.read_tail(dirfd, "short.log", 4096) == b"one\n"


def test_read_tail_follows_no_link(tmp_path: Path, dirfd: int) -> None:
    (tmp_path / "secret").write_text("not a log\n")
    (tmp_path / "cage.log").symlink_to(tmp_path / "secret")
    with pytest.raises(OSError):
        safefs.read_tail(dirfd, "cage.log", 4096)


def test_rotate_moves_only_a_regular_file_past_its_size(tmp_path: Path, dirfd: int) -> None:
    log = tmp_path / "cage.log"
    log.write_bytes(b"x" * 100)
    safefs.rotate(dirfd, "cage.log", 100)
    assert log.read_bytes() == b"x" * 100 and not (tmp_path / "cage.log.1").exists()
    log.write_bytes(b"y" * 101)
    (tmp_path / "cage.log.1").write_bytes(b"older")
    safefs.rotate(dirfd, "cage.log", 100)
    assert not log.exists() and (tmp_path / "cage.log.1").read_bytes() == b"y" * 101
    safefs.rotate(dirfd, "cage.log", 100)  # none there: nothing to do
    big = tmp_path / "big"
    big.write_bytes(b"z" * 1000)
    log.symlink_to(big)
    safefs.rotate(dirfd, "cage.log", 100)  # a link is left to the open that follows (O_NOFOLLOW)
    assert log.is_symlink() and (tmp_path / "cage.log.1").read_bytes() == b"y" * 101

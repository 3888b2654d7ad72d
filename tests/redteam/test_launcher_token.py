"""``hive up`` reads the operator's token, a file hive-core owns: a compromised core
swapped a FIFO in under that name, and ``hive up`` hung there for good, ignoring
SIGTERM and holding its single-instance locks. The token is now opened without
blocking and without following a link, and must be a plain file of hive-core's
with one link (a hard link to a root-only file would have been printed as the
login URL)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from hyperhive.cli.up import read_token

pytestmark = pytest.mark.attack(
    "launcher.readiness", ref="issue 11 re-attack: a FIFO renamed over operator.token hung hive up")


TOKEN = "Zm9vYmFyYmF6cXV4LXRva2VuXzEyMzQ1Njc4OQ"
CORE_UID = 200_000_000 + os.getpid() % 1000  # a hive's core: ids of its own, no account


def _core() -> int:
    return CORE_UID


def test_a_plain_token_is_read(tmp_path: Path) -> None:
    (tmp_path / "operator.token").write_text(TOKEN + "\n")
    os.chown(tmp_path / "operator.token", _core(), -1)
    assert read_token(tmp_path, CORE_UID) == TOKEN


def _fifo(p: Path) -> None:
    os.mkfifo(p)
    os.chown(p, _core(), -1)


def _hardlink(p: Path) -> None:
    secret = p.parent / "root-only"
    secret.write_text("root's secret")
    os.chown(secret, _core(), -1)  # even owned right: a second link is refused
    os.link(secret, p)


def _symlink(p: Path) -> None:
    p.symlink_to("/etc/shadow")


def _root_owned(p: Path) -> None:
    p.write_text("tok\n")


def _directory(p: Path) -> None:
    p.mkdir()
    os.chown(p, _core(), -1)


@pytest.mark.parametrize("swap", [_fifo, _hardlink, _symlink, _root_owned, _directory],
                         ids=["fifo", "hard link", "symlink", "not the core's", "directory"])
def test_a_swapped_token_is_refused_at_once(tmp_path: Path, swap) -> None:  # type: ignore[no-untyped-def]
    swap(tmp_path / "operator.token")
    box: dict[str, BaseException | str] = {}

    def read() -> None:
        try:
            box["value"] = read_token(tmp_path, CORE_UID)
        except BaseException as e:  # reported below
            box["error"] = e

    t = threading.Thread(target=read, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(5)
    assert not t.is_alive(), "read_token blocked"
    assert time.monotonic() - start < 5
    assert isinstance(box.get("error"), (OSError, RuntimeError)), box

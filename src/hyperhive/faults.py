"""Fault points for the crash tests (tests/test_swarm_actions.py): a file
``<state-dir>/fault.kill`` naming a point makes hive-core kill itself (SIGKILL) the next
time it passes that point, once: the file is removed first (one the core can't remove
never fires, or it would kill every core started after). Only who can write the core's
state directory (root, hive-core) can place one, and they own the core anyway; with no
file, a point costs one failed open."""

from __future__ import annotations

import os
import signal
from pathlib import Path

FILE = "fault.kill"


def point(state_dir: Path, name: str) -> None:
    path = state_dir / FILE
    try:
        wanted = path.read_text().strip()
    except OSError:
        return
    if wanted != name:
        return
    try:
        path.unlink()
    except OSError:
        return
    os.kill(os.getpid(), signal.SIGKILL)

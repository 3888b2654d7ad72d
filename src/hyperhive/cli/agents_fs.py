"""``run/agents`` is a tmpfs of its own while a hive runs (``hive up`` mounts it; under
systemd, ``run-hive-agents.mount``).

Each cage sees its socket directory, ``run/agents/NAME``, read-only as ``/run/hive``.
A bind's root field in the cage's mountinfo is that directory's path within its
filesystem: on the run dir's filesystem it named the hive's run dir (red team round
22). On a filesystem of its own it reads ``/NAME``, the agent's own name. The tmpfs
also bounds what the core may write there (its sockets and CA files), apart from the
host's ``/run``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from pathlib import Path

from hyperhive.cli import mountns
from hyperhive.priv import mountapi, safefs

MNT_DETACH = 2
# ca-bundle.pem (the host's bundle and the hive's CA, ~220 KiB here), hive-ca.pem and
# the sockets: a MiB an agent is ample; a bound, not a reservation.
BYTES_PER_AGENT = 1 << 20
INODES_PER_AGENT = 64
SPARE_BYTES = 64 << 20
SPARE_INODES = 4096
_OCTAL = re.compile(r"\\([0-7]{3})")


def mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount in our namespace, in order."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        # mountinfo escapes space, tab, newline and backslash as octal
        point = _OCTAL.sub(lambda m: chr(int(m[1], 8)), fields[4])
        out.append((point, line.split(" - ", 1)[1].split()[0]))
    return out


def mount_points_below(root: Path) -> list[str]:
    """Mount points under ``root`` (deepest first)."""
    prefix = str(root) + "/"
    return sorted({p for p, _ in mounts() if p.startswith(prefix)}, key=len, reverse=True)


def unmount(point: str) -> None:
    """Detach ``point``; one that is no mount (or gone) is fine."""
    if ctypes.CDLL(None, use_errno=True).umount2(point.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"could not unmount {point}: {os.strerror(err)}")


def mounted(agents: Path) -> bool:
    """Whether ``agents`` is already a tmpfs of its own (a hive killed before it could
    unmount it, or systemd's mount unit): kept, so that cages still running keep the
    socket directories the next core binds in."""
    return any(p == str(agents) and t == "tmpfs" for p, t in mounts())


def _bounds(max_agents: int) -> dict[str, str]:
    return {
        "size": str(SPARE_BYTES + BYTES_PER_AGENT * max_agents),
        "nr_inodes": str(SPARE_INODES + INODES_PER_AGENT * max_agents),
    }


def mount(run_dir: Path, max_agents: int) -> bool:
    """Mount a fresh tmpfs (root's, 0711) on ``run_dir/agents`` unless one is there (then
    it is sized for ``max_agents`` again). Returns whether one was mounted now.
    ``run_dir`` must be absolute and normalized, with no link on the way (what
    mountinfo names, and what hive-priv opens): else ``safefs.UnsafePath`` and nothing
    is mounted. The run dir is root's alone (0755, prepare_dirs)."""
    if os.path.normpath(run_dir) != str(run_dir):
        raise safefs.UnsafePath(f"{run_dir}: not a normalized absolute path")
    os.close(safefs.open_anchor(run_dir / "agents"))  # no link, root's
    agents = run_dir / "agents"
    if mounted(agents):
        options = ",".join(f"{k}={v}" for k, v in _bounds(max_agents).items())
        flags = mountns.MS_REMOUNT | mountns.MS_NOSUID | mountns.MS_NODEV | mountns.MS_NOEXEC
        mountns.mount("hive-agents", str(agents), "tmpfs", flags, f"resizing {agents}", options)
        return False
    fd = mountapi.detached(
        "tmpfs",
        mountapi.MOUNT_ATTR_NOSUID | mountapi.MOUNT_ATTR_NODEV | mountapi.MOUNT_ATTR_NOEXEC,
        {"source": "hive-agents", "mode": "0711", "uid": "0", "gid": "0", **_bounds(max_agents)},
    )
    try:
        mountapi.attach(fd, str(agents))
    finally:
        os.close(fd)
    return True

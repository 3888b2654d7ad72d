"""Agent homes with a disk quota: each home is an ext4 filesystem of its own, in a
sparse image file, loop-mounted by hive-priv on ``agents/<name>/home``.

Why a filesystem per home and not project quotas: the state directory's
filesystem rarely has project quotas enabled, and on ext4 the owner of a file may
change its project id from the initial user namespace (where cages run), so an
agent could move its files out of its own quota. A filesystem of its own can't be
escaped: writes past its size fail with ENOSPC inside the cage, and nothing else
on the host notices. The image is sparse, so it costs only what the agent wrote.
It also hides the host's path of the home from the cage's mountinfo.

Every path here is opened from descriptors (``safefs``); ``mount`` gets
``/proc/self/fd/N`` names, which the kernel resolves from the descriptor.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import subprocess

from hyperhive.priv import safefs

log = logging.getLogger("hive.priv")

IMAGE = "home.img"
HOME = "home"
MNT_DETACH = 2
MOUNT_OPTIONS = "loop,nosuid,nodev,noatime"
DEFAULT_DISK_MIB = 1024  # the size of a new home; sparse: it costs only what is written


class HomeError(Exception):
    """The home could not be made or mounted (one line)."""


def mount_home(agent_dir: int, uid: int, gid: int, disk_mib: int) -> None:
    """Make sure ``home`` in ``agent_dir`` is the agent's own filesystem, mounted, owned
    by ``uid:gid`` with mode 0700. Idempotent: a mounted home is left as it is."""
    home = (
        safefs.ensure_dir(agent_dir, HOME, 0, 0, 0o700)
        if not safefs.is_mount_point(agent_dir, HOME)
        else safefs.open_dir(agent_dir, HOME)
    )
    with safefs.opened(home):
        if safefs.is_mount_point(agent_dir, HOME):
            _own(home, uid, gid)
            return
        fresh = False
        try:
            image = os.open(IMAGE, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=agent_dir)
        except FileNotFoundError:
            if any(os.scandir(home)):
                # A home from before quotas: keep it (unlimited) rather than hide its files.
                log.warning("home of uid %d predates disk quotas; it stays a plain directory", uid)
                _own(home, uid, gid)
                return
            image = os.open(
                IMAGE,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=agent_dir,
            )
            fresh = True
        with safefs.opened(image):
            if fresh or os.fstat(image).st_size == 0:
                os.ftruncate(image, disk_mib * 1024 * 1024)
                _run(
                    [
                        "mkfs.ext4",
                        "-q",
                        "-F",
                        "-m",
                        "0",
                        "-E",
                        "lazy_itable_init=1,lazy_journal_init=1",
                        "-L",
                        "hive-home",
                        safefs.fd_path(image),
                    ],
                    image,
                )
                fresh = True
            # A mount namespace made elsewhere on the host while the cage ran (``ip netns
            # exec``, a service's PrivateTmp) may still hold the old mount, and with it a
            # loop device on this image: mount that device again rather than attach a
            # second one (two devices on one ext4 image would corrupt it).
            attached = _run(
                [
                    "losetup",
                    "--list",
                    "--noheadings",
                    "--output",
                    "NAME",
                    "--associated",
                    safefs.fd_path(image),
                ],
                image,
            ).split()
            source, options = (
                (attached[0], MOUNT_OPTIONS.replace("loop,", ""))
                if attached
                else (safefs.fd_path(image), MOUNT_OPTIONS)
            )
            _run(["mount", "-t", "ext4", "-o", options, source, safefs.fd_path(home)], image, home)
    with safefs.opened(safefs.open_dir(agent_dir, HOME)) as root:
        if fresh:
            try:
                os.rmdir("lost+found", dir_fd=root)
            except OSError:
                pass
        _own(root, uid, gid)


def unmount_home(agent_dir: int) -> None:
    """Detach the home's filesystem (lazily: the cage is gone, but a descriptor may
    linger); the loop device goes with the last reference."""
    if not safefs.is_mount_point(agent_dir, HOME):
        return
    with safefs.opened(safefs.open_dir(agent_dir, HOME)) as home:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(safefs.fd_path(home).encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOENT):
                raise HomeError(f"could not unmount the home: {os.strerror(err)}")


def _own(fd: int, uid: int, gid: int) -> None:
    os.fchown(fd, uid, gid)
    os.fchmod(fd, 0o700)


def _run(argv: list[str], *fds: int) -> str:
    proc = subprocess.run(
        argv,
        check=False,
        capture_output=True,
        text=True,
        pass_fds=fds,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [
            f"status {proc.returncode}"
        ]
        raise HomeError(f"{argv[0]}: {detail[0]}")
    return proc.stdout

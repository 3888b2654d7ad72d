"""One ``hive up`` per run dir and per state dir.

The locks are ``flock``s on files in ``/run/hive-locks``, a directory that only
root can write: a compromised hive-core (it may write into the run dir and the
state dir) can neither pre-create a lock file to deny the next hive nor hold one
to fake a live hive. The file for a directory is named by a hash of its resolved
path, so two spellings of one directory (a symlink, ``..``) share one lock, and a
directory used as one hive's run dir and another's state dir is also refused.
A lock dies with the process that holds it: nothing to clean up after a crash.

The pid in a lock file is written by its holder after it took the lock and is
only used to name the holder in the refusal."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

LOCK_DIR = Path("/run/hive-locks")


class InUse(Exception):
    """The one line ``hive up`` prints when it must not start."""


def lock_name(directory: Path) -> str:
    return "dir-" + hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:32] + ".lock"


def _open_lock_dir(lock_dir: Path) -> int:
    """The lock directory as a descriptor, after checking that only root can write it."""
    try:
        os.mkdir(lock_dir, 0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(lock_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise InUse(f"cannot open the lock directory {lock_dir}: {e.strerror}") from None
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & 0o022:
        os.close(fd)
        raise InUse(
            f"{lock_dir} is not a directory only root can write; refusing to trust its locks"
        )
    return fd


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").split()
    except OSError:
        text = []
    return f"pid {text[0]}" if text and text[0].isdigit() else "a process that is still starting"


@dataclass
class InstanceLock:
    """Held flocks; ``release`` (or process exit) drops them.

    ``release`` removes the files while still holding them, so the directory does not
    fill up with one file per directory ever used; a waiter that opened a file about
    to be removed notices (the name no longer leads to what it locked) and tries again."""

    lock_dir: Path
    held: list[tuple[str, int]] = field(default_factory=list)

    def release(self) -> None:
        try:
            dir_fd = os.open(
                self.lock_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except OSError:
            dir_fd = None
        for name, fd in self.held:
            if dir_fd is not None:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dir_fd)
            os.close(fd)
        self.held.clear()
        if dir_fd is not None:
            os.close(dir_fd)


def _lock_one(dir_fd: int, name: str, d: Path, lock_dir: Path) -> int:
    for _ in range(20):
        try:  # never through a link: a planted one would have root truncate its target
            fd = os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                0o600,
                dir_fd=dir_fd,
            )
        except OSError as e:
            raise InUse(f"cannot open the lock file for {d} in {lock_dir}: {e.strerror}") from None
        st = os.fstat(fd)
        if st.st_uid != 0 or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise InUse(f"the lock file for {d} in {lock_dir} is not root's; refusing")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            who = _holder(fd)
            os.close(fd)
            raise InUse(f"{d} is in use by hive up ({who})") from None
        try:
            now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {d.resolve()}\n".encode(), 0)
            return fd
        os.close(fd)  # its holder removed it as it let go: take the new one
    raise InUse(f"the lock file for {d} in {lock_dir} keeps changing; refusing")


def acquire(dirs: list[Path], lock_dir: Path = LOCK_DIR) -> InstanceLock:
    """Lock every directory in ``dirs`` or none; ``InUse`` names the holder."""
    lock = InstanceLock(lock_dir)
    dir_fd = _open_lock_dir(lock_dir)
    try:
        for d in dirs:
            name = lock_name(d)
            if any(name == n for n, _ in lock.held):  # the same directory twice
                continue
            lock.held.append((name, _lock_one(dir_fd, name, d, lock_dir)))
    except BaseException:
        lock.release()
        raise
    finally:
        os.close(dir_fd)
    return lock


def live_priv_socket(run_dir: Path) -> int | None:
    """The pid behind a live, root-owned priv.sock in ``run_dir`` (a hive run by
    systemd, or by a ``hive up`` that predates these locks), else None.

    Only a socket root created counts: hive-core may create files in the run dir,
    and a socket it left listening there must not keep the next hive from starting."""
    path = run_dir / "priv.sock"
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != 0:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(str(path))
        except OSError:
            return None  # a stale socket from a hive that is gone
        # The credentials of whoever called listen(): they must be root's too.
        pid, uid, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid if uid == 0 else None

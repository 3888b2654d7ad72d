"""Filesystem access for hive-priv (root) that no other user can steer.

hive-core may create and rename entries in the run and state directories, and an
agent owns everything in its home. So hive-priv never hands a path string it did
not fully control to a call that follows links: it walks from a root-owned
anchor one component at a time with ``O_NOFOLLOW | O_DIRECTORY``, checks that
every directory it *trusts* is root's, and then works on descriptors
(``fchown``, ``fchmod``, ``*at`` calls with ``dir_fd``). Trees are removed
iteratively, on descriptors, without following links, whatever their depth.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(Exception):
    """A path hive-priv trusts is not what it must be (a link, another owner, writable
    by others)."""


def open_anchor(path: Path) -> int:
    """Open an absolute directory that root gave us on the command line (the run or
    state directory). Every component is opened without following links; the
    directory itself must be root's, and writable by others only with the sticky
    bit (so nobody else can rename what root created in it)."""
    if not path.is_absolute():
        raise UnsafePath(f"{path}: not an absolute path")
    fd = os.open("/", DIR_FLAGS)
    try:
        for part in path.parts[1:]:
            nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        check_trusted(fd, str(path))
    except OSError as e:
        os.close(fd)
        raise UnsafePath(f"{path}: {_why(e)}") from None
    except UnsafePath:
        os.close(fd)
        raise
    return fd


def check_trusted(fd: int, what: str) -> os.stat_result:
    """Root's, and nobody else may rename or replace what is in it."""
    st = os.fstat(fd)
    if st.st_uid != 0:
        raise UnsafePath(f"{what} belongs to uid {st.st_uid}, not root")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise UnsafePath(f"{what} is writable by others and not sticky")
    return st


def ensure_dir(
    parent: int, name: str, uid: int, gid: int, mode: int, *, trusted: bool = False
) -> int:
    """Open (creating if missing) ``name`` in ``parent`` as a real directory, then give
    it exactly this owner and mode through the descriptor. ``trusted``: it must
    already be root's if it existed (a directory hive-priv keeps its own state in
    or binds into a cage must not be one someone else made)."""
    _check_name(name)
    try:
        os.mkdir(name, 0o700, dir_fd=parent)
        created = True
    except FileExistsError:
        created = False
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError as e:
        raise UnsafePath(f"{name}: {_why(e)}") from None
    try:
        st = os.fstat(fd)
        if trusted and not created and st.st_uid not in (0, uid):
            raise UnsafePath(f"{name} belongs to uid {st.st_uid}; refusing to use it")
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_dir(parent: int, name: str) -> int:
    """Open an existing directory in ``parent`` without following a link."""
    _check_name(name)
    return os.open(name, DIR_FLAGS, dir_fd=parent)


@contextmanager
def opened(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def write_file(
    parent: int, name: str, data: bytes, mode: int = 0o600, *, durable: bool = True
) -> None:
    """Replace ``name`` in ``parent`` with ``data``, atomically, never through a link;
    on disk before the rename unless not ``durable`` (what a reboot ends anyway)."""
    _check_name(name)
    tmp = f".{name}.tmp"
    with suppress_missing():
        os.unlink(tmp, dir_fd=parent)
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        mode,
        dir_fd=parent,
    )
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)


def read_file(parent: int, name: str, limit: int = 1 << 20) -> bytes | None:
    """The contents of a regular file in ``parent`` (None if missing), never through a link."""
    return _read_regular(parent, name, lambda fd, size: os.read(fd, limit))


def read_tail(parent: int, name: str, limit: int) -> bytes | None:
    """The last ``limit`` bytes of a regular file in ``parent`` (None if missing), never
    through a link."""
    return _read_regular(parent, name, lambda fd, size: os.pread(fd, limit, max(0, size - limit)))


def _read_regular(parent: int, name: str, read: Callable[[int, int], bytes]) -> bytes | None:
    """``read(fd, size)`` of a regular file in ``parent`` (None if missing)."""
    _check_name(name)
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=parent
        )
    except FileNotFoundError:
        return None
    with opened(fd):
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{name} is not a regular file")
        return read(fd, st.st_size)


def rotate(parent: int, name: str, past: int) -> None:
    """``name`` becomes ``name.1`` (replacing it) if it is a regular file of more than
    ``past`` bytes; a link or anything else there is left to the open that follows."""
    _check_name(name)
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_size > past:
        os.rename(name, f"{name}.1", src_dir_fd=parent, dst_dir_fd=parent)


def open_append(parent: int, name: str, mode: int = 0o600) -> int:
    """A log file in ``parent``, opened for appending, never through a link."""
    _check_name(name)
    fd = os.open(
        name,
        os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
        mode,
        dir_fd=parent,
    )
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{name} is not a regular file")
    return fd


@contextmanager
def suppress_missing() -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        pass


def remove_tree(parent: int, name: str) -> None:
    """Remove ``name`` from ``parent`` and everything under it, however deep or wide.

    Iterative, so no depth makes it fail; it holds two descriptors at a time, so no
    depth exhausts the descriptor table. It never follows a link: directories are
    opened with ``O_NOFOLLOW``, everything else is unlinked. Going back up it opens
    ``..`` and checks it is the directory it came from (device and inode), so a
    directory moved away meanwhile stops it with an error instead of leading it
    elsewhere. A mount point below is not crossed (its device differs): it is
    refused, so a tree can't make root empty another filesystem."""
    _check_name(name)
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            os.unlink(name, dir_fd=parent)  # a file or a link: the link itself goes
            return
        raise
    top_dev = os.fstat(fd).st_dev
    # One frame per level: (identity, name in its parent, subdirectories still to remove).
    frames: list[tuple[tuple[int, int], str, list[str]]] = []
    pending_name = name
    while True:
        st = os.fstat(fd)
        if st.st_dev != top_dev:
            os.close(fd)
            raise UnsafePath(f"{pending_name}: a mount point inside the tree; refusing to cross it")
        subdirs = []
        with os.scandir(fd) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.name)
                else:
                    with suppress_missing():
                        os.unlink(entry.name, dir_fd=fd)
        frames.append(((st.st_dev, st.st_ino), pending_name, subdirs))
        # Descend into the next subdirectory, or climb while a level is done.
        while True:
            _, own_name, todo = frames[-1]
            if todo:
                pending_name = todo.pop()
                try:
                    child = os.open(pending_name, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno in (errno.ENOTDIR, errno.ELOOP):  # replaced meanwhile
                        os.unlink(pending_name, dir_fd=fd)
                        continue
                    raise
                os.close(fd)
                fd = child
                break
            frames.pop()
            if not frames:
                os.close(fd)
                os.rmdir(name, dir_fd=parent)
                return
            up = os.open("..", DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            st_up = os.fstat(fd)
            if (st_up.st_dev, st_up.st_ino) != frames[-1][0]:
                os.close(fd)
                raise UnsafePath(f"{own_name}: its parent changed while it was being removed")
            os.rmdir(own_name, dir_fd=fd)


def is_mount_point(parent: int, name: str) -> bool:
    """``name`` in ``parent`` is a directory on another filesystem than ``parent``."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_dev != os.fstat(parent).st_dev


def fd_path(fd: int) -> str:
    """The kernel's name for an open directory, for a tool that only takes paths
    (``mount``). Resolved by the kernel from the descriptor, not from a string
    anyone could have shaped."""
    return f"/proc/self/fd/{fd}"


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UnsafePath(f"{name!r} is not a single path component")


def _why(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "is a symbolic link"
    if e.errno == errno.ENOTDIR:
        return "is not a directory"
    return e.strerror or str(e)

"""Agent homes with a disk quota: each home is an ext4 filesystem of its own, in a
sparse image file (``agents/<name>/home.img``), on a loop device, mounted only in its
cage's own mount namespace: hive-priv mounts it detached (open_home), the cage's
starting child attaches it, and it goes with the cage.

Why a filesystem per home and not project quotas: the state directory's
filesystem rarely has project quotas enabled, and on ext4 the owner of a file may
change its project id from the initial user namespace (where cages run), so an
agent could move its files out of its own quota. A filesystem of its own can't be
escaped: writes past its size fail with ENOSPC inside the cage, and nothing else
on the host notices. The image is sparse, so it costs only what the agent wrote.
It also hides the host's path of the home from the cage's mountinfo.

Every path here is opened from descriptors (``safefs``); the mount is a descriptor too.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import subprocess
import threading
from dataclasses import dataclass

from hyperhive.priv import mountapi, safefs

log = logging.getLogger("hive.priv")

IMAGE = "home.img"
LOOP_RECORD = "home.loop"  # the loop device last attached to the image: checked first
HOME = "home"
MNT_DETACH = 2
# <linux/loop.h>: the ioctls, LO_FLAGS_AUTOCLEAR (the device goes with its last user: the
# mount), and struct loop_info64 (232 bytes: lo_device and lo_inode first) inside struct
# loop_config (fd, block_size, loop_info64, 8 reserved u64).
LOOP_SET_FD, LOOP_CLR_FD, LOOP_SET_STATUS64, LOOP_GET_STATUS64 = 0x4C00, 0x4C01, 0x4C04, 0x4C05
LOOP_CONFIGURE, LOOP_CTL_GET_FREE = 0x4C0A, 0x4C82
LO_FLAGS_AUTOCLEAR = 4
LOOP_INFO64_SIZE = 232
_LO_FLAGS_OFFSET = 52  # 5 u64, lo_number, lo_encrypt_type, lo_encrypt_key_size, then lo_flags
DEFAULT_DISK_MIB = 1024  # the size of a new home; sparse: it costs only what is written
TEMPLATE = "home-{mib}.img"  # in the hive's root-only state/priv: mkfs'd once, copied per home
_template_lock = threading.Lock()  # one mkfs of a template at a time


class HomeError(Exception):
    """The home could not be made or mounted (one line)."""


@dataclass(frozen=True)
class Home:
    """One cage start's home: ``fd`` is a detached mount of the agent's filesystem (the
    starting child attaches it in the cage's own mount namespace: cage_mounts.attach_home),
    or, ``detached`` False, a plain directory on the host (a home from before quotas)."""

    fd: int
    detached: bool


def open_home(
    agent_dir: int, uid: int, gid: int, disk_mib: int, templates: int | None = None
) -> Home:
    """The agent's home for one cage start: its own filesystem, its root owned by
    ``uid:gid`` with mode 0700, mounted *detached* (mountapi): in no mount namespace,
    held by the returned descriptor only, which the caller closes once the cage's child
    has attached it. It is never mounted on the host: each mount there was copied by every
    later cage start and kept by every running cage's namespace (the host's table, and
    each cage's start and memory, grew with the cages running). A new filesystem is a
    copy of the template in ``templates`` (a root-only directory; made there on first
    use), or without one, made by mkfs. On the host, ``home`` stays an empty root-only
    directory."""
    # A home mounted on the host by a hive-priv from before: detached there (lazily; its
    # loop device, still on the image while anything holds the mount, is reused below).
    unmount_home(agent_dir)
    home = safefs.ensure_dir(agent_dir, HOME, 0, 0, 0o700)
    with safefs.opened(home):
        fresh = False
        try:
            image = os.open(IMAGE, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=agent_dir)
        except FileNotFoundError:
            if any(os.scandir(home)):
                # A home from before quotas: keep it (unlimited) rather than hide its files.
                log.warning("home of uid %d predates disk quotas; it stays a plain directory", uid)
                _own(home, uid, gid)
                return Home(os.dup(home), detached=False)
            image = os.open(
                IMAGE,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=agent_dir,
            )
            fresh = True
    created = fresh  # by this call, O_EXCL: no loop device can be on it yet
    with safefs.opened(image):
        if fresh or os.fstat(image).st_size == 0:
            _new_filesystem(image, disk_mib, templates)
            fresh = True
        mount = _mount_image(agent_dir, image, created=created)
    try:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        with safefs.opened(os.open(".", flags, dir_fd=mount)) as root:
            if fresh:
                try:
                    os.rmdir("lost+found", dir_fd=root)
                except OSError:
                    pass
            _own(root, uid, gid)
    except BaseException:
        os.close(mount)
        raise
    return Home(mount, detached=True)


def _new_filesystem(image: int, disk_mib: int, templates: int | None) -> None:
    """An empty ext4 filesystem of ``disk_mib`` in ``image``. Copied from a template
    made once per hive and size: mkfs.ext4 was a program started from hive-priv for
    every new home (~10 ms each, and a fork of hive-priv: 8% of its time in a `hive up`
    of 1,000 new agents). The copy is the same bytes mkfs would write, so every home
    of a hive shares the filesystem's UUID and directory-hash seed; neither is a
    secret nor reachable from a cage (no block device there), and each home is still
    its own filesystem, quota and mount."""
    size = disk_mib << 20
    if templates is None:
        os.ftruncate(image, size)
        _mkfs(image)
        return
    with safefs.opened(_template(templates, disk_mib)) as template:
        os.ftruncate(image, size)
        _copy_data(template, image, size)
        os.fsync(image)


def _template(templates: int, disk_mib: int) -> int:
    """An open descriptor of the template for ``disk_mib``, made if missing (complete
    before it gets its name: mkfs and fsync on a temporary name, then rename)."""
    name = TEMPLATE.format(mib=disk_mib)
    with _template_lock:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=templates)
        except FileNotFoundError:
            pass
        else:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_uid == 0 and st.st_size == disk_mib << 20:
                return fd
            os.close(fd)
        # One template per hive: the core picks each cage's size (16 MiB to 64 GiB), and
        # a template per size asked for would fill state/priv.
        for entry in os.listdir(templates):
            if entry.startswith("home-") and entry.endswith(".img"):
                with safefs.suppress_missing():
                    os.unlink(entry, dir_fd=templates)
        tmp = f".{name}.tmp"
        with safefs.suppress_missing():
            os.unlink(tmp, dir_fd=templates)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=templates)
        try:
            os.ftruncate(fd, disk_mib << 20)
            _mkfs(fd)
            os.fsync(fd)
            os.rename(tmp, name, src_dir_fd=templates, dst_dir_fd=templates)
        except BaseException:
            os.close(fd)
            with safefs.suppress_missing():
                os.unlink(tmp, dir_fd=templates)
            raise
        return fd


def _copy_data(src: int, dst: int, size: int) -> None:
    """Copy the parts of ``src`` that hold data into ``dst`` (already ``size`` long, a
    hole): the image stays as sparse as the template (~0.6 MiB of 1 GiB)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data past pos
                return
            raise
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        while start < end:
            try:
                n = os.copy_file_range(src, dst, end - start, start, start)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                n = os.pwrite(dst, os.pread(src, min(end - start, 1 << 20), start), start)
            if n <= 0:
                raise HomeError("copying the home's template: it ended early")
            start += n
        pos = end


def _mkfs(image: int) -> None:
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


def unmount_home(agent_dir: int) -> None:
    """Detach a home a hive-priv from before mounted on the host (lazily: a descriptor
    may linger); the loop device goes with the last reference. Homes are mounted in
    their cages' namespaces only now, and go with them."""
    if not safefs.is_mount_point(agent_dir, HOME):
        return
    with safefs.opened(safefs.open_dir(agent_dir, HOME)) as home:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(safefs.fd_path(home).encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOENT):
                raise HomeError(f"could not unmount the home: {os.strerror(err)}")


def _mount_image(agent_dir: int, image: int, *, created: bool = False) -> int:
    """A detached mount of the ext4 image through a loop device: the one still on this
    image if there is one, else a new one that goes away with the mount. Done here with
    the loop ioctls and the mount syscalls, not losetup and mount(8): those were two
    programs started from hive-priv for every cage start (~10 ms of a cold start), and
    each scanned every loop device on the host (a cage start grew with the cages running).

    A stopped cage's namespace may still hold its mount for a moment (the kernel lets go
    of a dead namespace's mounts as its last process exits), and with it the loop device:
    that device is mounted again rather than a second one attached (two devices on one
    ext4 image would corrupt it; one device is one filesystem instance, however many
    mounts)."""
    # An image made just now can have no device yet: not looked for (without a record,
    # that is a look at every loop device on the host, ~1 ms per 100 of them).
    found = None if created else _loop_of(agent_dir, image)
    if found is not None:
        name, held = found
        try:
            # Mounted while the descriptor that checked it is still open: autoclear frees
            # a device only at its last close, so it can't be cleared and given to another
            # agent's image between the check and the mount (red team round 9: a restart
            # racing the old namespace's release mounted the other agent's home).
            return _mount(f"/dev/{name}")
        finally:
            os.close(held)
    number, fd = _attach(image)
    try:
        # Recorded before the mount: whatever happens next, the device on this image is
        # the recorded one (hive-priv is the only one to attach it, under the name's lock).
        _write_record(agent_dir, f"loop{number}")
        return _mount(f"/dev/loop{number}")
    finally:
        os.close(fd)  # autoclear: the mount now holds the device (or, failed, nobody)


def _loop_of(agent_dir: int, image: int) -> tuple[str, int] | None:
    """The loop device already backed by ``image`` (same device and inode), if any, with
    a descriptor on it that the caller closes after mounting it: held open, the device
    can't be cleared (autoclear) and attached to another image meanwhile. The recorded
    device is the only candidate: every attach records its device first, so any other
    device on the image would be one hive-priv never attached. Without a record (a home
    from before it), every attached device is checked (only attached devices have a
    ``loop`` directory in sysfs)."""
    st = os.fstat(image)
    record = safefs.read_file(agent_dir, LOOP_RECORD, limit=64)
    if record is not None:
        name = record.decode(errors="replace").strip()
        names = [name] if name.startswith("loop") and name[4:].isdigit() else []
    else:
        try:
            names = [e.name for e in os.scandir("/sys/block") if e.name.startswith("loop")]
        except OSError:
            return None
        names = [n for n in names if os.path.isdir(f"/sys/block/{n}/loop")]
    for name in names:
        try:
            fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            info = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64_SIZE))
        except OSError:
            os.close(fd)
            continue  # not attached (ENXIO), or detached meanwhile
        device, inode = struct.unpack_from("=QQ", info)
        if (device, inode) == (st.st_dev, st.st_ino):
            return name, fd
        os.close(fd)
    return None


def _write_record(agent_dir: int, name: str) -> None:
    """No fsync: loop devices don't outlive the host's page cache (a reboot ends both)."""
    fd = os.open(
        LOOP_RECORD,
        os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=agent_dir,
    )
    try:
        os.write(fd, name.encode())
    finally:
        os.close(fd)


def _attach(image: int) -> tuple[int, int]:
    """A free loop device on ``image`` with autoclear: (its number, an open descriptor,
    which the caller closes once the device is mounted)."""
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(16):  # another process may take the free device first: EBUSY
            number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            fd = os.open(f"/dev/loop{number}", os.O_RDWR | os.O_CLOEXEC)
            try:
                _configure(fd, image)
                return number, fd
            except OSError as e:
                os.close(fd)
                if e.errno != errno.EBUSY:
                    raise HomeError(f"loop device: {os.strerror(e.errno or 0)}") from None
    finally:
        os.close(ctl)
    raise HomeError("loop device: every free device was taken meanwhile")


def _configure(fd: int, image: int) -> None:
    info = bytearray(LOOP_INFO64_SIZE)
    struct.pack_into("=I", info, _LO_FLAGS_OFFSET, LO_FLAGS_AUTOCLEAR)
    try:
        fcntl.ioctl(fd, LOOP_CONFIGURE, struct.pack("=II", image, 0) + info + bytes(64))
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
        # A kernel before 5.8 (no LOOP_CONFIGURE): attach, then set autoclear.
        fcntl.ioctl(fd, LOOP_SET_FD, image)
        try:
            fcntl.ioctl(fd, LOOP_SET_STATUS64, bytes(info))
        except OSError:
            fcntl.ioctl(fd, LOOP_CLR_FD, 0)
            raise


def _mount(device: str) -> int:
    try:
        return mountapi.detached(
            "ext4",
            mountapi.MOUNT_ATTR_NOSUID | mountapi.MOUNT_ATTR_NODEV | mountapi.MOUNT_ATTR_NOATIME,
            {"source": device},
        )
    except OSError as e:
        raise HomeError(f"mount: {e.strerror}") from None


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

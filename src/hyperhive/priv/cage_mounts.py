"""What hive-priv's child does before it becomes bwrap: the cage's place in the
OOM order, and system directories that show a cage nothing of anyone else.

A read-only bind of the host's ``/usr`` shares the host's inodes, so inotify on
``/usr/bin`` in one cage saw every program the host and the other cages ran
(IN_OPEN, IN_ACCESS), and ``/proc/self/mountinfo`` named the host path of every
bind (the hive's code, its virtualenv). Here the child takes a mount namespace of
its own (private: nothing propagates back to the host) and covers each system
directory with a read-only overlay of itself. Every cage gets its own overlay
inodes: fsnotify events of an access through one overlay, or of the host's own
access to the real files, never reach a watch on another. The overlay's lower
layers are named by ``/proc/self/fd/N`` paths, so mountinfo shows those, not the
host's. bwrap then binds the same paths as before, and finds the overlays.

Page cache is shared with the real files (overlay maps the lower inode's pages),
so this costs a few mount calls per start, no memory.
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Iterable

from hyperhive.priv import mountapi

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REC, MS_SLAVE = 0x1, 0x2, 0x4, 0x4000, 0x80000
MS_BIND = 0x1000

# The cage (bwrap, init, the harness: all inherit it) sits below ordinary processes
# in the OOM order where the host lets hive-priv lower it (CAP_SYS_RESOURCE); the
# runtime's processes are raised above it by init (RUNTIME_OOM_SCORE_ADJ).
CAGE_OOM_SCORE_ADJ = -500

_libc = ctypes.CDLL(None, use_errno=True)


def lower_oom_score() -> None:
    """Best effort: without CAP_SYS_RESOURCE (some containers) the cage stays at 0."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(CAGE_OOM_SCORE_ADJ))
    except OSError:
        pass


def _empty_layer() -> int:
    """A detached, empty, read-only tmpfs: overlay wants two lower layers when it
    has no upper one, and this one is in no directory anyone could write into."""
    return mountapi.detached("tmpfs", mountapi.MOUNT_ATTR_RDONLY)


def private_overlays(paths: Iterable[str]) -> list[str]:
    """In the calling process (hive-priv's child, about to exec bwrap): a private
    mount namespace where each directory of ``paths`` is a read-only overlay of
    itself. Returns the paths that could not be covered (they stay plain binds:
    the cage still starts, and says so in its log)."""
    mountapi.check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Slave, not private: the overlays and the home stay here, but a filesystem the host
    # unmounts later is unmounted here too where the host's mounts are shared (systemd's
    # default), so no running cage keeps a host's device busy.
    mountapi.check(
        _libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "mount --make-rslave /"
    )
    paths = list(paths)
    try:
        empty = _empty_layer()
    except OSError as e:  # a kernel before 5.2 (no fsopen): plain binds, as before
        os.write(2, f"hive-priv: {e}; system directories are plain read-only binds\n".encode())
        return paths
    failed = []
    for path in paths:
        try:
            real = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            failed.append(path)
            continue
        opts = f"lowerdir=/proc/self/fd/{real}:/proc/self/fd/{empty}".encode()
        try:
            mountapi.check(
                _libc.mount(
                    b"overlay", path.encode(), b"overlay", MS_RDONLY | MS_NOSUID | MS_NODEV, opts
                ),
                f"overlay on {path}",
            )
        except OSError as e:
            # os.write, not print: a forked child of a threaded process takes no locks
            os.write(2, f"hive-priv: {e}; {path} is a plain read-only bind\n".encode())
            failed.append(path)
        finally:
            os.close(real)
    os.close(empty)
    return failed


def etc_view(view: str, etc: str, entries: Iterable[str], files: Iterable[str]) -> None:
    """In the calling process's own mount namespace (after ``private_overlays``): a tmpfs
    on ``view`` (an empty directory only root can reach) holding the ``entries`` of
    ``etc`` that exist, each bound from ``etc`` (the overlay: the cage's own inodes), and
    an empty file for each of ``files`` (bwrap binds the cage's passwd, group and hosts
    onto them). bwrap then binds the view as the cage's /etc, read-only with every
    entry in it, in one step. It used to bind each entry itself, and bwrap reads all of
    /proc/self/mountinfo for every bind: 19 reads of a table that grows by a mount per
    running cage (their homes, then), ~6 ms of a cold start with one cage and more with each."""
    mountapi.check(
        _libc.mount(b"tmpfs", view.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755"),
        f"tmpfs on {view}",
    )
    for name in entries:
        src, dst = f"{etc}/{name}", f"{view}/{name}"
        try:
            is_dir = stat.S_ISDIR(os.stat(src).st_mode)  # a link counts as what it names
        except OSError:
            continue  # not on this host
        if is_dir:
            os.mkdir(dst, 0o755)
        else:
            os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        mountapi.check(
            _libc.mount(src.encode(), dst.encode(), None, MS_BIND | MS_REC, None), f"bind {src}"
        )
    for name in files:
        os.close(
            os.open(f"{view}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        )


# Pseudo-terminals one cage may hold at once. Every devpts instance but the host's draws
# on one host-wide count (kernel.pty.max less kernel.pty.reserve: 3,072 by default), and
# bwrap's own instance sets no bound of its own: one cage took all 3,071 left and every
# other cage's openpty failed with ENOSPC (red team round 17). Enough for a tmux of many
# panes; (pty.max - pty.reserve) / CAGE_PTYS cages at their bound still take them all.
CAGE_PTYS = 64
MS_NOEXEC = 0x8


def pts_view(view: str) -> None:
    """In the calling process's own mount namespace (after ``private_overlays``): a new
    devpts instance on ``view`` (an empty directory only root can reach), bwrap's options
    (``newinstance,ptmxmode=0666,mode=620``) and ``max=CAGE_PTYS``. bwrap binds it over
    the cage's ``/dev/pts`` (``--dev-bind``: its nodes must stay usable)."""
    opts = f"newinstance,ptmxmode=0666,mode=620,max={CAGE_PTYS}".encode()
    mountapi.check(
        _libc.mount(b"devpts", view.encode(), b"devpts", MS_NOSUID | MS_NOEXEC, opts),
        f"devpts on {view}",
    )


def attach_home(mount: int, view: str) -> None:
    """In the calling process's own mount namespace (after ``private_overlays``): the
    agent's home, a detached mount hive-priv made (homes.open_home), attached on ``view``
    (an empty directory only root can reach, the same for every cage), where bwrap binds
    it from (``--bind-fd`` of the same descriptor). The home is mounted in this namespace
    and the cage's only: the host's mount table, which every cage start copies (twice:
    here and in bwrap), stays the same size whatever number of cages run. The namespace
    is a slave of the host's, so nothing mounted here propagates back."""
    mountapi.attach(mount, view)

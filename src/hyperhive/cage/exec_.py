"""``hive exec``'s steps inside a cage (hive-priv builds the chain in ``Cages.exec_argv``).

``home``: root, in the exec's own mount namespace (a private copy of the cage's),
before it becomes the agent: a fresh, empty HOME that only this exec sees.
``/home`` is covered by a tmpfs holding ``/home/exec`` (the new HOME, the agent's
uid, 0700) and ``/home/agent`` (the agent's real home, bound back, so the operator
still finds its files where they always are); the exec's /etc/passwd names the new
HOME too (ssh, for one, reads the passwd entry). Nothing changes in the cage: no
file is created there, no mount propagates back.

``exec``: the agent's uid, no capabilities, no_new_privs; the exec's init. It
forks the command (its own session; a pty becomes its controlling terminal),
installs the cage's seccomp filter, reaps whatever is orphaned to it and, when
the command ends, kills every process the command left and exits with the
command's status (128 + signal for a death by signal). In its own pid namespace
it is pid 1, so its exit also makes the kernel kill anything left.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import sys
import termios

from hyperhive.cage import layout

EXEC_HOME = "/home/exec"
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 0x2, 0x4, 0x1000, 0x4000
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


MNT_DETACH = 2


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)

    def enc(s: str | None) -> bytes | None:
        return s.encode() if s is not None else None

    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def home(args: list[str]) -> None:
    """``exec-home --uid U --gid G -- NEXT...``: mount the fresh HOME, then exec NEXT."""
    uid, gid, rest = int(args[1]), int(args[3]), args[5:]
    assert args[0] == "--uid" and args[2] == "--gid" and args[4] == "--" and rest
    # /home is root's (bwrap's --dir), /home/agent a mount point in it: nothing the
    # agent can swap. Keep a handle on its home before the tmpfs covers it.
    keep = os.open(layout.HOME, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    _mount("tmpfs", "/home", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=256m")
    os.mkdir(layout.HOME, 0o755)
    _mount(f"/proc/self/fd/{keep}", layout.HOME, None, MS_BIND | MS_REC, None)
    os.close(keep)
    os.mkdir(EXEC_HOME, 0o700)
    os.chown(EXEC_HOME, uid, gid)
    # The cage's /tmp and /dev/shm are the agent's: a server it left there (a tmux or
    # screen socket, an ssh ControlMaster, a pipe) would take the operator's session
    # into the cage. The clean exec gets empty ones of its own.
    for shared, size in (("/tmp", "256m"), ("/dev/shm", "64m")):
        if os.path.isdir(shared):
            _mount("tmpfs", shared, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={size}")
    _passwd_home(uid)
    os.execv(rest[0], rest)


def _passwd_home(uid: int) -> None:
    """Tools that take the home from the passwd entry, not $HOME (ssh reads
    ~/.ssh/config so), must find the fresh one too: this exec's /etc/passwd (a copy,
    on the tmpfs, bound over the cage's read-only one) says /home/exec."""
    lines = []
    with open("/etc/passwd") as f:  # hive-priv wrote it; the cage has it read-only
        for line in f:
            fields = line.rstrip("\n").split(":")
            if len(fields) == 7 and fields[2] == str(uid):
                fields[5] = EXEC_HOME
            lines.append(":".join(fields) + "\n")
    copy = "/home/.passwd"
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.writelines(lines)
    # The cage's /etc/passwd is bwrap's copy of hive-priv's data, bound from a file
    # bwrap has since unlinked: nothing can be mounted on a deleted file, so take it
    # off first (in this exec's own mount namespace only) and bind over the mount
    # point beneath it.
    if ctypes.CDLL(None, use_errno=True).umount2(b"/etc/passwd", MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err != errno.EINVAL:  # EINVAL: not a mount point (a plain file): bind over it
            raise OSError(err, f"umount /etc/passwd: {os.strerror(err)}")
    _mount(copy, "/etc/passwd", None, MS_BIND, None)


def run(args: list[str]) -> None:
    """``exec [--tty] [--cwd DIR] -- CMD...``: the exec's init, as the agent."""
    tty, cwd = False, "/"
    while args and args[0] != "--":
        if args[0] == "--tty":
            tty, args = True, args[1:]
        elif args[0] == "--cwd" and len(args) > 1:
            cwd, args = args[1], args[2:]
        else:
            break
    argv = args[1:] if args[:1] == ["--"] else args
    if not argv:
        print("usage: python -m hyperhive.cage exec [--tty] [--cwd DIR] -- CMD...", file=sys.stderr)
        raise SystemExit(2)
    from hyperhive.cage import seccomp

    libc = ctypes.CDLL(None, use_errno=True)
    # Becoming the agent cleared the parent-death signal unshare --kill-child had set.
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # Orphans come to us even outside a pid namespace of our own (as_agent).
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    pid = os.fork()
    if pid == 0:
        _child(argv, tty, cwd)
    seccomp.install()
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM, signal.SIGTSTP):
        signal.signal(sig, signal.SIG_IGN)  # the command decides; we only wait for it
    status = _reap_until(pid)
    _kill_the_rest()
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _child(argv: list[str], tty: bool, cwd: str) -> None:
    try:
        os.setsid()
        if tty:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        os.chdir(cwd)
        from hyperhive.cage import seccomp

        seccomp.install()
        os.execvp(argv[0], argv)
    except OSError as e:
        print(f"hive exec: {argv[0]}: {e.strerror}", file=sys.stderr, flush=True)
        os._exit(127 if isinstance(e, FileNotFoundError) else 126)
    os._exit(126)


def _reap_until(main: int) -> int:
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        if pid == main:
            return status


def _kill_the_rest() -> None:
    """SIGKILL our children until none is left: a grandchild whose parent dies comes
    to us (the subreaper), so a double fork or setsid does not escape."""
    while True:
        try:
            kids = _children()
            for kid in kids:
                try:
                    os.kill(kid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.wait()
        except ChildProcessError:
            return


def _children() -> list[int]:
    me = os.getpid()
    out: list[int] = []
    for task in os.listdir(f"/proc/{me}/task"):
        try:
            with open(f"/proc/{me}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return out

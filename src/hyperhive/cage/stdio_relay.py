"""The runtime's stdin, stdout and stderr: pipes of its own, relayed to the harness's
socket pairs by a process of the runtime's own uid (init's fork, never exec'd).

Why two hops: a pipe shared with a hive process lets the runtime hold that pipe's lock
from a ``splice`` and make the other side's next read, write or close sleep
uninterruptibly (red team of session 31: the harness's turn loop, time-out and
interrupt with it). The harness's ends are therefore sockets, which no splice can take.
But a runtime can't open a socket by name (``/dev/stdout``, ``/proc/self/fd/1``: ENXIO),
and command runtimes write ``>/dev/stderr``. So the runtime gets pipes, and what sits on
their other end is this relay: a process of the runtime's uid, in the runtime's session,
holding nothing the runtime does not hold already (the three socket ends). A splice
there stalls only the runtime's own relay; the harness still times the turn out, and the
turn's SIGKILL (``kill(-1)`` as the runtime uid) ends both.

The relay starts the runtime while it is still root (through ``setpriv``, as init started
runtimes before), closes its copy of init's report pipe, and only then becomes the
runtime uid: no process of that uid ever holds what init waits on (a relay stopped while
it did froze init: re-check of session 32).

The relay is non-dumpable (it changed uid from root and never execs), so the runtime
can't read its memory through /proc, and the cage's seccomp filter (inherited from init)
refuses ptrace outright. It ignores SIGINT, SIGTERM and SIGHUP, so an interrupt reaches
the runtime while the relay passes on its last words; it exits as the runtime did (the
same code, or the same signal), which is what init reports to the harness.

Standard library only (it runs in init's fork)."""

from __future__ import annotations

import os
import select

# As in init: names for mypy only (the cage loads no typing, collections or signal enums).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal  # _signal has no stubs; signal re-exports it
    from collections.abc import Callable
    from typing import NoReturn
else:
    import _signal

# Bytes a direction holds before it stops reading its source (the other side is slow).
RELAY_BUF = 1 << 16
_IGNORED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGPIPE)
_EVENTS_IN = select.POLLIN | select.POLLHUP | select.POLLERR
_EVENTS_OUT = select.POLLOUT | select.POLLHUP | select.POLLERR


class _Direction:
    """One way through the relay: ``src`` to ``dst``, with what is read and not yet
    written. ``src`` closes at its EOF; ``dst`` once that EOF is passed on (the other side
    sees EOF too) or when it fails (EPIPE: nobody reads there; the source closes with it,
    so the writer learns as it would have without the relay)."""

    def __init__(self, src: int, dst: int) -> None:
        self.src, self.dst, self.buf = src, dst, b""

    @property
    def done(self) -> bool:
        return self.src < 0 and self.dst < 0

    def read(self) -> None:
        try:
            chunk = os.read(self.src, RELAY_BUF - len(self.buf))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            self.buf += chunk
            return
        os.close(self.src)
        self.src = -1
        if not self.buf:
            self.close_dst()

    def write(self) -> None:
        try:
            self.buf = self.buf[os.write(self.dst, self.buf) :]
        except BlockingIOError:
            return
        except OSError:  # EPIPE, ECONNRESET: nobody reads there any more
            self.buf = b""
            self.close_dst()
            if self.src >= 0:
                os.close(self.src)
                self.src = -1
            return
        if not self.buf and self.src < 0:
            self.close_dst()

    def close_dst(self) -> None:
        if self.dst >= 0:
            os.close(self.dst)
            self.dst = -1


def relay(stdin: _Direction, outputs: list[_Direction], runtime: int) -> None:
    """Pass bytes each way until the outputs are done and the runtime has exited (its
    pidfd, ``runtime``, readable), as the harness's loop waited for both; what is left of
    stdin then is dropped (a process the runtime left could hold the pipe unread for
    good). All non-blocking."""
    directions = [stdin, *outputs]
    for d in directions:
        for fd in (d.src, d.dst):
            os.set_blocking(fd, False)
    poller = select.poll()
    exited = False
    while True:
        if all(d.done for d in outputs) and (exited or stdin.done):
            return
        live = [d for d in directions if not d.done]
        watched: dict[int, tuple[_Direction, bool]] = {}
        for d in live:
            if d.buf and d.dst >= 0:
                watched[d.dst] = (d, True)
            elif d.src >= 0 and len(d.buf) < RELAY_BUF:
                watched[d.src] = (d, False)
        for fd in watched:
            poller.register(fd, _EVENTS_OUT if watched[fd][1] else _EVENTS_IN)
        if not exited:
            poller.register(runtime, select.POLLIN)
        try:
            ready = poller.poll()
        finally:
            for fd in watched:
                poller.unregister(fd)
            if not exited:
                poller.unregister(runtime)
        for fd, _ in ready:
            if fd == runtime:
                exited = True
                continue
            d, writing = watched[fd]
            d.write() if writing else d.read()


def exit_as(status: int) -> NoReturn:
    """End this process as the runtime ended (its wait status)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            _signal.signal(sig, _signal.SIG_DFL)
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
        except (OSError, ValueError):
            pass
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def pipes_of(uid: int, gid: int) -> list[tuple[int, int]]:
    """Three pipes (close-on-exec) owned by ``uid``:``gid``, so the runtime can open its
    own ends by name (``/dev/stdout``: a pipe made as root is root's, mode 0600, EACCES).
    Made with that fsuid and fsgid (init's CAP_SETUID and CAP_SETGID allow it; chown
    would need CAP_CHOWN, which no process in a cage has); checked."""
    import ctypes  # (init loaded it already: this is its fork)

    libc = ctypes.CDLL(None)
    libc.setfsgid(gid)
    libc.setfsuid(uid)
    try:
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]
    finally:
        libc.setfsuid(0)
        libc.setfsgid(0)
    for r, _ in pipes:
        st = os.fstat(r)
        if (st.st_uid, st.st_gid) != (uid, gid):
            raise OSError(f"a pipe of {st.st_uid}:{st.st_gid}, not the runtime's {uid}:{gid}")
    return pipes


def run(
    runtime_argv: list[str],
    sockets: tuple[int, int, int],
    report: int,
    owner: tuple[int, int],
    become: Callable[[], None],
    retitle: Callable[[str], None],
) -> NoReturn:
    """In init's fork, still root, with only ``sockets`` (the harness's stdin, stdout and
    stderr ends) and ``report`` (close-on-exec; an errno written there means the runtime
    never ran) open, in a new session: start the runtime on pipes (``owner``'s, the
    runtime's uid and gid; ``runtime_argv``, which
    drops to the runtime uid itself: ``setpriv``), close ``report``, and only then become
    the runtime uid and relay. Init waits on ``report`` until its last holder is gone, so
    no holder may be a process of the runtime's uid: one the runtime could stop
    (SIGSTOP) froze init in that read for good (re-check of session 32). Never returns."""
    code = 127
    pid = -1
    try:
        # The interrupt is the runtime's; the relay passes on what it says meanwhile (set
        # before the runtime starts: an interrupt can come as soon as init has replied).
        # The turn's SIGKILL ends it. SIGPIPE: a write to a gone reader is an error here.
        for sig in _IGNORED:
            _signal.signal(sig, _signal.SIG_IGN)
        (in_r, in_w), (out_r, out_w), (err_r, err_w) = pipes_of(*owner)
        pid = os.fork()
        if pid == 0:  # the runtime, root until its setpriv drops it
            err = 1
            try:
                for sig in _IGNORED:  # an ignore would survive the exec
                    _signal.signal(sig, _signal.SIG_DFL)
                for target, fd in enumerate((in_r, out_w, err_w)):
                    os.dup2(fd, target)  # inheritable; the originals close on exec
                for fd in sockets:
                    os.close(fd)
                os.execve(runtime_argv[0], runtime_argv, {})
            except OSError as e:
                err = e.errno or 1
            finally:
                try:
                    os.write(report, str(err).encode())
                finally:
                    os._exit(127)
        runtime = os.pidfd_open(pid)
        for fd in (in_r, out_w, err_w):
            os.close(fd)
    except BaseException as e:
        try:
            os.write(report, str(getattr(e, "errno", None) or 1).encode())
        except OSError:
            pass
        os._exit(code)
    os.close(report)  # the runtime's copy closes at its exec, as root: init's read ends then
    try:
        become()
        retitle("relay")
        relay(
            _Direction(sockets[0], in_w),
            [_Direction(out_r, sockets[1]), _Direction(err_r, sockets[2])],
            runtime,
        )
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        exit_as(status)
    except BaseException:
        try:
            os.kill(pid, _signal.SIGKILL)  # nothing of a turn runs on without its relay
        except OSError:
            pass
    os._exit(code)

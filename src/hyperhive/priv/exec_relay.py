"""``hive exec``'s byte relay: the operator's descriptors stay in hive-priv.

The exec'd process gets unix socket pairs (stdin, stdout, stderr; not pipes, see
``unixsock.stdio_pair``) or the slave of a pty that hive-priv allocated; hive-priv copies bytes
between those and the operator's descriptors. So no descriptor of the operator's
ever exists in a cage: nothing the agent runs, now or later, can read the
operator's terminal, write to it, push input into it (TIOCSTI) or keep the
operator's pipeline from seeing EOF.

The relay ends with the process tree: once the exec's process is gone (and with
it, its pid namespace), the outputs are drained to EOF. A copy of the exec's end
(socket or pty) that got out anyway (passed over a socket) can keep them open:
then the drain stops after a short grace (the first 0.1 s without data once
DRAIN_IDLE has passed, DRAIN_MAX or DRAIN_BYTES in all) and our ends are closed,
so such a copy only ever reaches a socket nobody reads.

Waits are poll(2), not select(2): hive-priv's descriptors may be numbered past
select's 1,023 (a pidfd per process of a cage being stopped, up to 64 of the core's
connections), and select fails on those.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import select
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable

from hyperhive.unixsock import read_stream, stdio_pair

CHUNK = 65536
# A relay thread: a pump and its (source, destination, EOF to send) arguments.
_Pump = tuple[Callable[..., None], tuple[object, object, bytes | None]]
DRAIN_IDLE = 0.5  # seconds after the exit, past which 0.1 s without output ends the drain
DRAIN_MAX = 10.0  # seconds of output at most, once the process has exited
# Bytes of a stream at most once the process has exited. What it legitimately left is what
# its socket still buffers (~200 KiB); past that only a copy that got out writes, and each
# read of it is hive-priv's CPU, outside the cage's cgroup (re-check of session 30: ~0.65
# CPU for DRAIN_MAX, out-of-band bytes cutting every read to a few).
DRAIN_BYTES = 1 << 20


def _ready(want: dict[int, int], timeout: float | None = None) -> set[int]:
    """Which of ``want`` (descriptor: POLLIN or POLLOUT) are ready, as select() would have
    said: a hang-up or an error counts as ready too (poll reports them whatever was asked;
    the read or write that follows sees what it is). ``timeout`` in seconds, None: forever."""
    poller = select.poll()
    for fd, events in want.items():
        poller.register(fd, events)
    ms = None if timeout is None else math.ceil(max(0.0, timeout) * 1000)
    return {fd for fd, _ in poller.poll(ms)}


class _Done:
    """Set when the exec'd process has exited; the wake pipe stops the stdin pump."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.at = 0.0
        self.wake_r, self.wake_w = os.pipe()

    def set(self) -> None:
        self.at = time.monotonic()
        self.event.set()
        os.write(self.wake_w, b"x")

    def close(self) -> None:
        os.close(self.wake_r)
        os.close(self.wake_w)


class _Fd:
    """One of our descriptors, closed exactly once (by a pump or at the end): a
    second close could hit a number another thread has reused meanwhile."""

    def __init__(self, fd: int, *, stream: bool = False) -> None:
        self.fd = fd
        self.stream = stream  # our end of a stdio_pair (not a pty master)
        self._lock = threading.Lock()
        self._open = True

    def close(self) -> None:
        with self._lock:
            if self._open:
                self._open = False
                _close(self.fd)


def run(
    argv: list[str],
    fds: list[int],
    *,
    tty: tuple[int, int] | None,
    preexec_fn: Callable[[], None],
    spawned: Callable[[], None] = lambda: None,
) -> int:
    """Run argv with the relay between it and the operator's ``fds`` (stdin, stdout,
    stderr; the caller closes them). ``spawned`` is called once the process is started
    (``preexec_fn`` has run in it), before the relay. Returns the exit status (128 + signal)."""
    op_in, op_out, op_err = fds
    done = _Done()
    ours: list[_Fd] = []  # our ends, closed at the end whatever happens
    try:
        if tty is not None:
            master, slave = os.openpty()
            m = _Fd(master)
            ours.append(m)
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", tty[0], tty[1], 0, 0))
            child = (slave, slave, slave)
            veof = termios.tcgetattr(slave)[6][termios.VEOF]
            os.set_blocking(master, False)
            plan: list[_Pump] = [
                (_pump_in, (op_in, m, veof if isinstance(veof, bytes) else b"\x04")),
                (_pump_out, (m, op_out, None)),
            ]
        else:
            in_w, in_r = stdio_pair(ours_reads=False)
            out_r, out_w = stdio_pair(ours_reads=True)
            err_r, err_w = stdio_pair(ours_reads=True)
            w, o, e = _Fd(in_w), _Fd(out_r, stream=True), _Fd(err_r, stream=True)
            ours += [w, o, e]
            child = (in_r, out_w, err_w)
            plan = [
                (_pump_in, (op_in, w, None)),
                (_pump_out, (o, op_out, None)),
                (_pump_out, (e, op_err, None)),
            ]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=child[0],
                stdout=child[1],
                stderr=child[2],
                close_fds=True,
                start_new_session=True,
                preexec_fn=preexec_fn,  # joins a cgroup: no locks, so safe with threads
            )
        finally:
            for fd in set(child):
                os.close(fd)  # only the exec's processes hold these now: EOF/EIO when they are gone
        spawned()
        threads = [
            threading.Thread(target=pump, args=(*args, done, proc.kill), daemon=True)
            for pump, args in plan
        ]
        for t in threads:
            t.start()
        code = proc.wait()
        done.set()
        for t in threads:
            t.join()
        return code if code >= 0 else 128 - code
    finally:
        for end in ours:
            end.close()
        done.close()


def _pump_in(src: int, dst: _Fd, eof: bytes | None, done: _Done, kill: Callable[[], None]) -> None:
    """Operator -> exec. Reads only what poll says is there (never blocks on the
    operator's terminal after the exec ended); EOF closes the pipe (or sends the
    pty's EOF character)."""
    try:
        while not done.event.is_set():
            ready = _ready({src: select.POLLIN, done.wake_r: select.POLLIN})
            if done.wake_r in ready:
                return
            try:
                data = os.read(src, CHUNK)
            except OSError:
                data = b""
            if not data:
                if eof is not None:
                    _write_all(dst.fd, eof, done)
                return
            if not _write_all(dst.fd, data, done):
                return
    finally:
        if eof is None:
            dst.close()  # the exec's stdin sees EOF


def _write_all(dst: int, data: bytes, done: _Done) -> bool:
    """Write to our own (non-blocking) end, giving up when the exec is over."""
    view = memoryview(data)
    while view:
        ready = _ready({done.wake_r: select.POLLIN, dst: select.POLLOUT})
        if dst not in ready:
            return False
        try:
            view = view[os.write(dst, view) :]
        except BlockingIOError:
            continue
        except OSError:  # EPIPE: nobody reads any more; EIO: the pty is gone
            return False
    return True


def _pump_out(src: _Fd, dst: int, _unused: None, done: _Done, kill: Callable[[], None]) -> None:
    """Exec -> operator, until EOF (a pty master gives EIO when the last slave closes).
    If the operator stops reading, the exec is killed (as ssh's remote side would
    lose its session): nothing would ever read what it writes."""
    after_exit = 0  # bytes relayed since the process exited
    while True:
        data = None
        if _ready({src.fd: select.POLLIN}, 0.1):
            try:
                # Never blocks: ours is non-blocking. A socket's is read taking what
                # descriptors come with it (a kernel before 6.16 lets them in), closed
                # in a thread of their own.
                data = read_stream(src.fd, CHUNK) if src.stream else os.read(src.fd, CHUNK)
            except BlockingIOError:
                pass  # ready, and then nothing to read after all
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                data = b""
            if data == b"":
                return
        if data is not None:
            try:
                _write_blocking(dst, data)
            except OSError:
                kill()
                return
        # The drain's bounds are checked whatever the last turn gave: a holder of the
        # exec's end can make poll say "ready" with nothing to read for as long as it likes.
        if done.event.is_set():
            since = time.monotonic() - done.at
            if data:
                after_exit += len(data)
            if since > DRAIN_MAX or after_exit > DRAIN_BYTES:
                return
            if data is None and since > DRAIN_IDLE:
                return


def _write_blocking(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:  # the operator's descriptor happened to be non-blocking
            _ready({fd: select.POLLOUT})


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass

"""Red team round 19c: the egress relay's splice(2) path (hyperhive.relay, session 12),
attacked by a hostile cage end and a hostile upstream on loopback TCP: a reset
mid-splice from either side, a half-close left hanging (no busy loop), byte counts
under ragged writes, and the pipe pages of hive-core's user filled by one agent's
idle tunnels (the others copy, none fails)."""

from __future__ import annotations

import hashlib
import os
import random
import resource
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from hyperhive import relay as relay_module
from hyperhive.relay import relay


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


class Tunnel:
    def __init__(self) -> None:
        self.cage, self.proxy_in = _pair()
        self.proxy_out, self.upstream = _pair()
        self.result: tuple[int, int] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.result = relay(self.proxy_in, self.proxy_out)

    def join(self, timeout: float = 10) -> tuple[int, int]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the relay did not end"
        assert self.result is not None
        return self.result

    def close(self) -> None:
        for s in (self.cage, self.proxy_in, self.proxy_out, self.upstream):
            s.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rst(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _flood(sock: socket.socket, total: int) -> None:
    try:
        sock.sendall(b"z" * total)
    except OSError:
        pass


@pytest.mark.attack("budget.exhaustion", ref="red team round 19c: upstream resets mid-splice, the cage never reading")
@pytest.mark.parametrize("who", ["upstream", "cage", "both"])
def test_a_reset_mid_splice_ends_the_relay_and_closes_its_pipes(who: str) -> None:
    before = _fds()
    t = Tunnel()
    # Bytes both ways, past PIPE_GROW (the pipes grow), and a direction stuck full
    # (the cage does not read 8 MiB: the relay blocks writing it from the pipe).
    flooder = threading.Thread(target=_flood, args=(t.upstream, 8 << 20), daemon=True)
    flooder.start()
    t.cage.sendall(b"u" * (64 << 10))
    t.upstream.settimeout(5)
    got = 0
    while got < 64 << 10:
        got += len(t.upstream.recv(1 << 20))
    time.sleep(0.3)
    if who in ("upstream", "both"):
        _rst(t.upstream)
    if who in ("cage", "both"):
        _rst(t.cage)
    if who == "upstream":
        # the cage then drains what arrived and closes: the relay must end
        t.cage.settimeout(5)
        try:
            while t.cage.recv(1 << 20):
                pass
        except OSError:
            pass
        t.cage.close()
    elif who == "cage":
        t.upstream.close()
    up, down = t.join(10)
    flooder.join(5)
    assert up == 64 << 10
    assert 0 <= down <= 8 << 20
    t.close()
    assert _fds() == before, "a pipe or socket left open after a reset"


@pytest.mark.attack("budget.exhaustion", ref="red team round 19c: a half-closed tunnel left hanging, the relay spinning?")
def test_a_half_closed_tunnel_left_hanging_does_not_spin() -> None:
    t = Tunnel()
    t.cage.sendall(b"q" * (100 << 10))
    t.cage.shutdown(socket.SHUT_WR)
    t.upstream.settimeout(5)
    got = b""
    while chunk := t.upstream.recv(1 << 20):
        got += chunk
    assert len(got) == 100 << 10  # the cage's end reached upstream
    # upstream says nothing and keeps its end open; the relay waits in splice
    cpu0, wall0 = _cpu(), time.monotonic()
    time.sleep(2)
    cpu = _cpu() - cpu0
    assert cpu < 0.2, f"{cpu:.2f} s of CPU in {time.monotonic() - wall0:.1f} s idle: a busy loop"
    answer = os.urandom(300 << 10)
    t.upstream.sendall(answer)
    t.upstream.close()
    t.cage.settimeout(5)
    back = b""
    while chunk := t.cage.recv(1 << 20):
        back += chunk
    assert back == answer
    assert t.join() == (100 << 10, 300 << 10)
    t.close()


@pytest.mark.attack("budget.exhaustion", ref="red team round 19c: ragged writes across the pipe's growth, counts to the byte")
def test_ragged_writes_are_counted_to_the_byte_both_ways() -> None:
    rng = random.Random(19)
    t = Tunnel()
    ups = [os.urandom(rng.choice([1, 7, 4095, 4097, 16383, 16384, 65537, 300000])) for _ in range(60)]
    downs = [os.urandom(rng.choice([1, 3, 4096, 16385, 70000, 1 << 20])) for _ in range(30)]
    h_up, h_down = hashlib.sha256(), hashlib.sha256()
    sink_up, sink_down = hashlib.sha256(), hashlib.sha256()
    n = {"up": 0, "down": 0}

    def reader(sock: socket.socket, h: hashlib._Hash, key: str) -> None:
        sock.settimeout(10)
        while chunk := sock.recv(rng.choice([1, 100, 65536])):
            h.update(chunk)
            n[key] += len(chunk)

    r1 = threading.Thread(target=reader, args=(t.upstream, sink_up, "up"))
    r2 = threading.Thread(target=reader, args=(t.cage, sink_down, "down"))
    r1.start()
    r2.start()

    def writer(sock: socket.socket, parts: list[bytes], h: hashlib._Hash) -> None:
        for p in parts:
            h.update(p)
            sock.sendall(p)
        sock.shutdown(socket.SHUT_WR)

    w = threading.Thread(target=writer, args=(t.upstream, downs, h_down))
    w.start()
    writer(t.cage, ups, h_up)
    w.join(10)
    r1.join(10)
    r2.join(10)
    up, down = t.join()
    assert (up, down) == (sum(map(len, ups)), sum(map(len, downs)))
    assert (n["up"], n["down"]) == (up, down)
    assert sink_up.digest() == h_up.digest() and sink_down.digest() == h_down.digest()
    t.close()


def _pipe_pages_child(k: int, wfd: int) -> None:
    """As an unprivileged user (the limits spare root): k tunnels grown both ways and
    left idle, then one more; writes 'idle-pipes-ok fallback-ok' figures to wfd."""
    out = []
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        tunnels = []
        for _ in range(k):
            t = Tunnel()
            t.cage.sendall(b"a" * (32 << 10))
            t.upstream.sendall(b"b" * (32 << 10))
            for s in (t.upstream, t.cage):
                got = 0
                while got < 32 << 10:
                    got += len(s.recv(1 << 20))
            tunnels.append(t)
        time.sleep(0.2)
        pipe = relay_module._pipe()
        # Past the limit: a direction grows its pipe just after writing what it read,
        # so on a loaded machine the last grows may land later (F_GETPIPE_SZ would
        # wait on a pipe a splice holds: ask for new pipes instead)
        deadline = time.monotonic() + 20
        while k > 32 and pipe is not None and time.monotonic() < deadline:
            os.close(pipe[0])
            os.close(pipe[1])
            time.sleep(0.05)
            pipe = relay_module._pipe()
        out.append("newpipe=" + ("none" if pipe is None else str(fcntl_size(pipe[1]))))
        if pipe is not None:
            os.close(pipe[0])
            os.close(pipe[1])
        # one more tunnel: must still move bytes exactly, by copy if no pipe
        t = Tunnel()
        data = os.urandom(2 << 20)
        threading.Thread(target=lambda: (t.cage.sendall(data), t.cage.shutdown(socket.SHUT_WR)), daemon=True).start()
        t.upstream.settimeout(5)
        back = b""
        while chunk := t.upstream.recv(1 << 20):
            back += chunk
        t.upstream.close()
        res = t.join(5)
        out.append(f"extra_ok={back == data and res == (len(data), 0)}")
        for t2 in tunnels:
            t2.cage.close()
            t2.upstream.close()
        for t2 in tunnels:
            t2.join(5)
            t2.close()
        out.append("ended")
    except BaseException as e:
        out.append(f"error={e!r}")
    os.write(wfd, " ".join(out).encode())
    os._exit(0)


def fcntl_size(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


@pytest.mark.attack("budget.exhaustion", ref="red team round 19c: one agent's idle grown tunnels fill hive-core's pipe-user-pages-soft")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_idle_grown_tunnels_past_the_pipe_pages_make_the_rest_copy_not_fail() -> None:
    soft = int(Path("/proc/sys/fs/pipe-user-pages-soft").read_text())
    hard = int(Path("/proc/sys/fs/pipe-user-pages-hard").read_text())
    if soft != 16384 or hard != 0:
        pytest.skip(f"pipe-user-pages soft {soft} hard {hard}: figures below assume the defaults")
    results = {}
    for k in (31, 33):  # 2 pipes x 256 pages each: 32 tunnels fill 16,384 pages
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _pipe_pages_child(k, w)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            results[k] = f.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, (k, results[k])
    # Below the limit a new pipe is a full 16 pages; past it, none (two pages, refused)
    assert "newpipe=65536" in results[31], results
    assert "newpipe=none" in results[33], results
    # and either way the next tunnel relays every byte (copy fallback), nothing fails
    for k in results:
        assert "extra_ok=True" in results[k] and "ended" in results[k], results


@pytest.mark.attack("budget.exhaustion", ref="red team round 19c: the cage's copy of a handed-over socket set O_NONBLOCK (shared file flags) mid-tunnel")
def test_a_socket_turned_nonblocking_under_the_relay_ends_it_without_spinning() -> None:
    import fcntl

    before = _fds()
    t = Tunnel()
    t.cage.sendall(b"a" * (64 << 10))
    t.upstream.settimeout(5)
    got = 0
    while got < 64 << 10:
        got += len(t.upstream.recv(1 << 20))
    # A handed-over socket shares its open file description with the cage: its
    # O_NONBLOCK is the cage's to set. Here on the core's ends directly.
    for s in (t.proxy_in, t.proxy_out):
        fl = fcntl.fcntl(s.fileno(), fcntl.F_GETFL)
        fcntl.fcntl(s.fileno(), fcntl.F_SETFL, fl | os.O_NONBLOCK)
    cpu0 = _cpu()
    flooder = threading.Thread(target=_flood, args=(t.upstream, 4 << 20), daemon=True)
    flooder.start()
    try:
        t.cage.sendall(b"b" * (256 << 10))
    except OSError:
        pass
    time.sleep(1.5)
    cpu = _cpu() - cpu0
    assert cpu < 0.5, f"{cpu:.2f} s of CPU in 1.5 s: a busy loop on EAGAIN"
    t.cage.close()
    t.upstream.close()
    up, _ = t.join(10)
    flooder.join(5)
    assert up >= 64 << 10
    t.close()
    assert _fds() == before

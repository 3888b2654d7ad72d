"""Red team round 21: session 14's changes attacked: the cage's harness and init on
``wirejson`` (json's C scanner and encoder without json's Python modules) and on
``_socket``/``_signal``/``select.poll`` (the harness's own ``Conn.readline``, the egress
bridge's ``_accept``), LogThrottle on refusals a peer causes at will, and hive-priv's
``scans`` column (the core's ``status``/``limit_hits`` one at a time).

See docs/security.md's rounds table (red team round 21).
"""

from __future__ import annotations

import gc
import json
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import assert_ok
from hive_fixture import HiveProcess, running_hive, wait_until
from hyperhive.cage import harness, layout, wirejson
from hyperhive.cage.runtimes import ClaudeRuntime
from hyperhive.logthrottle import MAX_KEYS, LogThrottle

from .conftest import cage_run
from .test_red_round20 import as_core

# -- wirejson against json: the same values, the same errors --------------------------------

TEXTS: list[Any] = [
    "NaN", "-NaN", "Infinity", "-Infinity", "infinity", "1e400", "-1e400", "-0", "-0.0",
    "1" * 4301, "1" * 4300, "1." + "0" * 5000, '"\\ud800"', '"\\udc00\\ud800"', '"\ud800"',
    "\ufeff{}", "\ufeff", " \ufeff1", "", " ", "\t\n\r ", "\x0c1", "\u00a01", "1\u00a0", "1 \x0c",
    '{"a":1,"a":2}', "[1,]", '{"a":1,}', '"\x00"', '"\x1f"', "\x00", "[" * 100 + "]" * 100,
    "[" * 5000, "1 2", "1 \n ", "tru", "nul", "[1,2", '{"a"', '{"a":', "0123", "1.", ".5", "+1",
    "01", "1e", "[NaN]", '{"x": Infinity}', '"\\u00e9\\uD83D\\uDE00"', '"\\uD83D"', '"\\x41"',
    "'a'", '"' + "a" * 100000 + '"', "{1:2}", "[1]garbage", " [1] ", "1\x00", "\u2028",
    "[\u2028]", "\r\n1\r\n",
]
BYTES = [
    b"{}", b"\xef\xbb\xbf{}", b"\xef\xbb\xbf", b"\xff\xfe{\x00}\x00", b"\xfe\xff\x00{\x00}",
    b"\xff\xfe\x00\x00{\x00\x00\x00}\x00\x00\x00", b"\x00\x00\xfe\xff\x00\x00\x00{\x00\x00\x00}",
    b"\x001", b"1\x00", b"\x00\x001\x00", b"1\x00\x00\x00", b'"\xff"', b'"\xed\xa0\x80"', b"\x00",
    b"\x00\x00", b"", b"1", b"12", b"\x00\x00\x00\x00", b"\xff\xfe", b"\xfe\xff", b'"\\ud800"',
    b"\x00{\x00}", b"{\x00}\x00", b"[1,\x00",
]
VALUES: list[Any] = [
    float("nan"), float("inf"), -0.0, 1e400, {1: 2}, {1.5: 2}, {True: 1, None: 2}, {(1,): 2}, (1, 2),
    "\ud800", {"\ud800": "\udfff"}, [1, {}, [], ""], 10**4301, {"a": object()}, set(), b"x",
    {1: 1, "1": 2}, [float("-inf")], 2**64, 1.0000000000000002, "\u2028\x7f\x00", [[[]] * 3] * 3,
]


def _outcome(fn: Any, x: Any) -> tuple[Any, ...]:
    try:
        v = fn(x)
    except Exception as e:
        return ("error", type(e).__name__, str(e), getattr(e, "pos", None))
    if isinstance(v, float) and math.isnan(v):
        return ("nan",)
    return ("ok", type(v).__name__, json.dumps(v) if not isinstance(v, str) else v)


@pytest.mark.attack("wire.malformed", ref="session 14 wirejson: json's defaults on _json; a parser differential")
def test_wirejson_reads_and_writes_what_json_does() -> None:
    """A runtime's stdout lines (the Claude runtime's events) and the core's replies go
    through wirejson: every text json refuses it must refuse with the same error (message,
    position), every text json reads it must read to the same value, and it must write
    every value as json does (NaN, big numbers, lone surrogates, BOMs, UTF-16/32, JSON's
    whitespace only, duplicate keys, 100 KB strings)."""
    inputs = TEXTS + BYTES + [bytearray(b) for b in BYTES]
    differ = [(x, a, b) for x in inputs
              if (a := _outcome(json.loads, x)) != (b := _outcome(wirejson.loads, x))]
    assert not differ, [(repr(x)[:40], a, b) for x, a, b in differ]
    written = [(v, ea) for v in VALUES for ea in (True, False)
               if _outcome(lambda o: json.dumps(o, ensure_ascii=ea), v)  # noqa: B023
               != _outcome(lambda o: wirejson.dumps(o, ensure_ascii=ea), v)]  # noqa: B023
    assert not written, written


class _Weak(dict):  # type: ignore[type-arg]  # a dict the encoder takes as one, weakref-able
    pass


@pytest.mark.attack("wire.deep-nesting", ref="red team round 21: wirejson's encoder shared its circular-check dict")
def test_a_dumps_that_fails_leaves_nothing_behind() -> None:
    """json.dumps makes its encoder (and its circular-reference dict) per call; wirejson
    made two once. The C encoder leaves the containers it is inside in that dict when it
    fails (a value it can't write, RecursionError): held for good, and the same object,
    dumped again, was refused as a circular reference."""
    held = _Weak(x=object(), y=1)
    ref = weakref.ref(held)
    for ensure_ascii in (True, False):
        with pytest.raises(TypeError):
            wirejson.dumps(held, ensure_ascii=ensure_ascii)
    del held["x"]
    for ensure_ascii in (True, False):  # before: ValueError "Circular reference detected"
        assert wirejson.dumps(held, ensure_ascii=ensure_ascii) == json.dumps(held) == '{"y": 1}'
    del held
    gc.collect()
    assert ref() is None, "a failed dumps kept its containers alive"


# -- the harness: a runtime's line the decoder reads and the encoder can't write ------------


class _Turn(harness.Turn):
    """A Turn's line handling alone (no connection, no runtime process)."""

    def __init__(self) -> None:
        self.runtime = ClaudeRuntime("r21", {"runtime": "claude"})
        self.pending, self.kept, self.lines, self.dropped, self.full = [], 0, 0, 0, False


def _deep_event(levels: int) -> str:
    return '{"type": "r21", "x": ' + "[" * levels + "]" * levels + "}"


@pytest.mark.attack("wire.deep-nesting", ref="red team round 21: a line nested to the decoder's last level")
def test_a_line_the_encoder_cant_write_is_a_plain_line() -> None:
    """Round 14 made a line nested past the decoder's limit a plain line. One a level or
    two short of it decodes, and the harness then writes the event (fit_entry's dumps)
    from a frame deeper than it read it: RecursionError out of the turn, which
    serve_forever took for a refused request, connected again and was given the turn
    again, for good (before: at 994 levels here; json's own dumps did it at 992). Every
    depth must be an entry of the turn, and leave nothing held in the harness."""
    gc.collect()
    before = len(gc.get_objects())
    kinds = set()
    for levels in range(850, 1100):
        turn = _Turn()
        line = _deep_event(levels)
        turn.line("stdout", line.encode(), len(line) + 1)
        [entry] = turn.pending
        kinds.add(entry["kind"])
        if entry["kind"] == "stdout":
            assert entry["data"] == line
        else:
            assert isinstance(entry["data"], str) and entry["data"].startswith("[nested deeper than")
    del turn, entry
    gc.collect()
    grown = len(gc.get_objects()) - before
    print(f"entry kinds over 850..1099 levels: {sorted(kinds)}; objects grown {grown}")
    assert kinds == {"event", "stdout"}, kinds
    assert grown < 1000, grown  # the failed dumps' lists (~1,000 a line) are not kept


HOSTILE = "r21hostile"
HOSTILE_PATH = f"{layout.HOME}/r21-runtime"
# The runtime a hostile agent can be (a prompt-injected model's own process writes its
# stdout): every depth around the decoder's limit, so one lands where the real harness's
# frames put it, then a line to show the turn went on.
HOSTILE_SCRIPT = """\
#!/usr/bin/python3
import sys
sys.stdin.read()
for n in range(850, 1050):
    print('{"type": "r21", "x": ' + "[" * n + "]" * n + "}", flush=True)
print('{"type": "result", "is_error": false, "result": "r21 done"}', flush=True)
"""
BRIDGE = "r21bridge"


@pytest.fixture(scope="module")
def h() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess({
        HOSTILE: {"runtime": "claude", "command": [HOSTILE_PATH], "peers": []},
        BRIDGE: {"runtime": "command", "command": ["true"]},
    }))


def _entries(h: HiveProcess, name: str) -> list[dict[str, Any]]:
    return assert_ok(h.host_call("transcript", name=name))["entries"]


@pytest.mark.attack("wire.deep-nesting", ref="red team round 21: in a real cage, a runtime sweeping the depths")
def test_a_caged_runtime_sweeping_depths_ends_its_turn_once(h: HiveProcess) -> None:
    """The same in a real cage: the turn ends (an exit entry) exactly once, the harness
    is the one that started it, and a second message is served after it."""
    harness_pid = h.harness_pid(HOSTILE)
    write = h.exec(HOSTILE, "sh", "-c", f"cat > {HOSTILE_PATH} && chmod 755 {HOSTILE_PATH}",
                   input=HOSTILE_SCRIPT)
    assert write.returncode == 0, write.stderr
    first = assert_ok(h.host_call("send", to=HOSTILE, body="sweep"))["id"]
    second = assert_ok(h.host_call("send", to=HOSTILE, body="again"))["id"]

    def two_exits() -> list[dict[str, Any]] | None:
        entries = _entries(h, HOSTILE)
        return entries if sum(e["kind"] == "exit" for e in entries) >= 2 else None

    entries = wait_until(two_exits, 90, "two turns of the sweeping runtime", interval=0.2)
    inputs = [e["data"]["id"] for e in entries if e["kind"] == "input"]
    assert inputs == [first, second], inputs  # each delivered once: no turn given again
    kinds = {e["kind"] for e in entries}
    results = [e for e in entries if e["kind"] == "event" and isinstance(e["data"], dict)
               and e["data"].get("result") == "r21 done"]
    print(f"{len(entries)} entries, kinds {sorted(kinds)}")
    assert len(results) == 2 and {"stdout", "event"} <= kinds, sorted(kinds)
    assert h.harness_pid(HOSTILE) == harness_pid


# -- the egress bridge: floods and resets on 127.0.0.1:3128 ----------------------------------

FLOOD = r"""
import threading
PORT = P["port"]
def one_reset():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.connect(("127.0.0.1", PORT))
    s.close()  # RST at once: before, during or after the bridge's accept
errors = []
def resets(n):
    for _ in range(n):
        try:
            one_reset()
        except OSError as e:
            errors.append(errname(e))
t0 = time.monotonic()
ts = [threading.Thread(target=resets, args=(100,)) for _ in range(8)]
for t in ts: t.start()
for t in ts: t.join()
held = []
for _ in range(200):  # many at once, left open
    try:
        held.append(socket.create_connection(("127.0.0.1", PORT), timeout=10))
    except OSError as e:
        errors.append(errname(e))
mid = time.monotonic() - t0
for s in held:
    s.close()
# Then one ordinary request through the bridge: it still answers (the proxy's 403 or
# 502 for a host not allowed; any HTTP status line).
s = socket.create_connection(("127.0.0.1", PORT), timeout=20)
s.sendall(b"CONNECT example.invalid:443 HTTP/1.1\r\nHost: example.invalid:443\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head or (head.startswith(b"HTTP/1.1 502") and not head.endswith(b"\n")):
    chunk = s.recv(4096)
    if not chunk:
        break
    head += chunk
result(seconds=round(mid, 2), errors=sorted(set(errors)), n_errors=len(errors),
       status=head.split(b"\r\n")[0].decode(), body=head.split(b"\r\n\r\n", 1)[-1][:200].decode())
"""


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.attack("budget.core-descriptors", ref="red team round 21: the bridge's _accept + TCP_NODELAY on reset connections")
def test_bridge_floods_and_resets_leave_the_harness_its_descriptors(h: HiveProcess) -> None:
    """800 connections reset right after connect (the new ``_accept`` then
    TCP_NODELAY on a reset socket) and 200 held at once: the harness's descriptors come
    back to what they were, the bridge still hands a request over (the proxy's 403 for a
    host not allowed), the harness is the same process."""
    pid = h.harness_pid(BRIDGE)
    before = _fds(pid)
    out = cage_run(h, BRIDGE, FLOOD, port=layout.EGRESS_PORT, timeout=120)
    wait_until(lambda: _fds(pid) <= before, 20, f"the harness's descriptors back to {before}")
    print(f"flood: {out}; harness fds {before} before, {_fds(pid)} after")
    # The proxy's own answer; before: at times the bridge's 502 (its connect gave up on
    # the proxy's full backlog at once, see the case below).
    assert out["status"] == "HTTP/1.1 403 Forbidden", out
    assert h.harness_pid(BRIDGE) == pid


# -- the core's scans: one at a time, never root's ------------------------------------------


@pytest.mark.attack("privsep.core-misuse", ref="session 14 scans column: a core that queues scans and never reads")
def test_queued_core_scans_never_hold_root_or_the_cores_start(h: HiveProcess) -> None:
    """As hive-core: 16 connections that send a 4,000-name ``status`` (a reply of ~300 KB
    against a 4 KiB receive buffer) and never read the reply (the scan lock must not be
    held while a reply waits to be read), plus 8 that scan back to back for 2 s. Root's ``status`` and ``hive exec`` stay prompt, and the
    core's own non-scan verbs are not queued behind the lock."""
    # Sized for the suite's time (10,000 names, three a connection and 4 s took 99 s, the
    # scans queued one at a time: the same shape, held the same way).
    # Each reply (~100 bytes a distinct name) past a unix socket's send buffer (~208 KiB), so
    # the handler blocks on it: 3,002 distinct names.
    names = [HOSTILE, BRIDGE] * 500 + [f"x{i}" for i in range(3000)]
    req = (json.dumps({"cmd": "status", "names": names}) + "\n").encode()
    silent: list[socket.socket] = []
    core_uid, core_gid = h.core_ids

    def connect_as_core() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        os.setegid(core_gid)
        os.seteuid(core_uid)
        try:
            s.connect(str(h.priv_sock))
        finally:
            os.seteuid(0)
            os.setegid(0)
        return s

    try:
        for _ in range(16):
            s = connect_as_core()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(req)  # a scan queued, its reply never read
            silent.append(s)
        out: dict[str, Any] = {}

        def scanners() -> None:
            try:
                out.update(as_core(h, {"cmd": "status", "names": names}, threads=8, seconds=2))
            except BaseException as e:  # shown in the assertion below
                out["error"] = repr(e)[:2000]

        t = threading.Thread(target=scanners)
        root_status, root_exec = [], []
        t.start()
        while t.is_alive():
            t0 = time.monotonic()
            assert_ok(h.priv("status"))
            root_status.append(time.monotonic() - t0)
            t0 = time.monotonic()
            assert h.exec(BRIDGE, "true").returncode == 0
            root_exec.append(time.monotonic() - t0)
        t.join()
        assert "error" not in out, out["error"]
        # The core's own limits poll, asked after: answered despite the silent 16.
        t0 = time.monotonic()
        lh = as_core(h, {"cmd": "limit_hits", "names": [HOSTILE, BRIDGE]}, threads=1, seconds=0.0001)
        poll = time.monotonic() - t0
    finally:
        for s in silent:
            s.close()
    print(f"8 scanners did {out['done']} status of 4,000 names in 2 s (slowest {out['slowest']:.2f} s) "
          f"beside 16 silent connections; root status max {max(root_status) * 1000:.0f} ms of "
          f"{len(root_status)}, hive exec max {max(root_exec):.2f} s; the core's limit_hits after "
          f"{poll:.2f} s")
    assert out["done"] > 0 and lh["done"] == 1, (out, lh)
    assert max(root_status) < 2.0 and max(root_exec) < 6.0, (root_status, root_exec)


# -- LogThrottle --------------------------------------------------------------------------


@pytest.mark.attack("budget.exhaustion", ref="session 14 LogThrottle: counts, keys and threads")
def test_log_throttle_counts_every_event_and_bounds_its_keys() -> None:
    """16 threads reporting 2,000 events each over 50 keys: every event is in exactly one
    line's count, the held-back ones told by the period's timer with no later event (this
    round found a burst that stopped told as its first event only); a key with nothing
    held and quiet for a period goes once MAX_KEYS are remembered."""
    reported, lines = [0], [0]
    lock = threading.Lock()

    def line(key: int, n: int) -> None:
        with lock:
            reported[0] += n
            lines[0] += 1

    lt: LogThrottle[int] = LogThrottle(0.05, line)

    def run(seed: int) -> None:
        for i in range(2000):
            lt.event((seed * 7 + i) % 50)

    ts = [threading.Thread(target=run, args=(s,)) for s in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    deadline = time.monotonic() + 5
    while reported[0] < 16 * 2000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reported[0] == 16 * 2000, reported
    many: LogThrottle[int] = LogThrottle(0.01, lambda k, n: None)
    for k in range(MAX_KEYS):
        many.event(k)
    time.sleep(0.02)
    for k in range(MAX_KEYS, 3 * MAX_KEYS):
        many.event(k)
    assert len(many._logged_at) <= MAX_KEYS + 1 and len(many._held) <= MAX_KEYS + 1


# -- init's channel: out of the agent's reach -----------------------------------------------

INIT_CHANNEL = r"""
import os, stat
me = os.getpid()
seen, refused, reached = 0, 0, []
for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) == me:
        continue
    seen += 1
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except PermissionError:
        refused += 1
        continue
    except FileNotFoundError:
        continue
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            os.close(os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY))
            reached.append((pid, fd, link))
        except OSError:
            pass
own = sorted(os.listdir("/proc/self/fd"))
result(seen=seen, refused=refused, reached=reached, own=own,
       # 0-2: the exec's own stdio, hive-priv's socket pairs since session 30
       sockets=[os.readlink(f"/proc/self/fd/{fd}") for fd in own if int(fd) > 2
                and os.path.exists(f"/proc/self/fd/{fd}")
                and os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")])
"""


@pytest.mark.attack("init.capabilities", ref="red team round 21: initclient's hand-made SCM_RIGHTS channel from the agent's side")
def test_the_agent_cannot_reach_inits_channel(h: HiveProcess) -> None:
    """initclient now sends its descriptors by hand (sendmsg on ``_socket``): the
    harness↔init SEQPACKET pair must still be out of the agent's reach: no descriptor of
    the harness or init readable through /proc, and the agent's own process holds no
    socket it was not given."""
    out = cage_run(h, BRIDGE, INIT_CHANNEL)
    print(f"agent saw {out['seen']} other processes, {out['refused']} refused; own fds {out['own']}")
    assert out["reached"] == [], out["reached"]
    assert out["refused"] >= 2, out  # init and the harness at least
    assert out["sockets"] == [], out["sockets"]


@pytest.mark.attack("budget.core-descriptors", ref="red team round 21: the bridge's connect to a full egress.sock backlog")
def test_the_bridge_waits_for_room_in_the_proxys_backlog(tmp_path: Any) -> None:
    """Seen in the flood case: the request right after it got the bridge's own 502
    "egress proxy is not reachable (Resource temporarily unavailable)". The bridge's
    connect to egress.sock had ``settimeout(5)``, which makes the socket non-blocking
    underneath, and a unix connect to a full backlog then fails at once with EAGAIN
    instead of waiting. With the proxy's backlog full for 0.5 s, a hand-over must wait
    and reach it, not answer 502."""
    from hyperhive.cage.egress_bridge import _hand_over

    path = str(tmp_path / "egress.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    filling = []
    while True:  # the backlog full: the next connect would block
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            break
        filling.append(s)
    runtime_end, bridge_end = socket.socketpair()
    t = threading.Thread(target=_hand_over, args=(bridge_end.dup(), path))
    bridge_end.close()
    t0 = time.monotonic()
    t.start()
    time.sleep(0.5)  # the proxy busy for a while: no state to wait for, the point is the wait
    for s in filling:  # still queued in the backlog, each read as EOF once accepted
        s.close()
    got = []
    try:
        if not t.is_alive():  # before: the bridge had answered at once
            runtime_end.settimeout(1)
            pytest.fail(f"the bridge gave up at once: {runtime_end.recv(4096)[:120]!r}")
        listener.settimeout(10)
        while not got:
            conn, _ = listener.accept()
            conn.settimeout(10)
            msg, fds, _, _ = socket.recv_fds(conn, 16, 1)
            got = [(msg, fds)] if msg else []
            for fd in fds:
                os.close(fd)
            conn.close()
        t.join(10)
        runtime_end.settimeout(0.5)
        try:
            reply = runtime_end.recv(4096)
        except TimeoutError:
            reply = b"(nothing: handed over)"
    finally:
        listener.close()
        runtime_end.close()
    print(f"handed over after {time.monotonic() - t0:.2f} s: {got}; the runtime read {reply[:80]!r}")
    assert got and got[0][0] == layout.HANDOVER and len(got[0][1]) == 1, got
    assert not reply.startswith(b"HTTP/1.1 502"), reply

"""hive-priv's verb tables and the plumbing around them, without a hive: each
caller class's table, each row's columns (descriptors, the name lock), the
refusals the server gives for them, the caller-side request models, and the
standard-library descriptor passing and socket binding they now use."""

from __future__ import annotations

import ast
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from hyperhive.cage import init as cage_init
from hyperhive.cage import setpriv
from hyperhive.cage.layout import HANDOVER
from hyperhive.core import egress
from hyperhive.peercred import PeerCred
from hyperhive.priv import server, verbs
from hyperhive.priv.cages import Cages
from hyperhive.priv.verbs import CORE_TABLE, ROOT_ONLY, ROOT_TABLE, TABLES, Caller, Verb
from hyperhive.unixsock import bind_listener, bind_socket
from hyperhive.wire import priv as wp
from hyperhive.wire.framing import parse_line

SRC = Path(__file__).resolve().parent.parent / "src" / "hyperhive"

# One valid request per verb (what a caller of that verb would send).
SAMPLES: dict[str, wp.PrivModel] = {
    "prepare": wp.Prepare(name="alice"),
    "start": wp.StartCage(name="alice", memory_mib=256, pids_max=64, disk_mib=2048),
    "stop": wp.StopCage(name="alice", timeout=0.0),
    "destroy": wp.DestroyCage(name="alice"),
    "status": wp.CageStatus(names=["alice", "bob"]),
    "limit_hits": wp.CageLimitHits(names=["alice", "bob"]),
    "exec": wp.Exec(
        name="alice",
        argv=["sh", "-c", "echo héllo ☃"],
        env={"EXTRA": "1"},
        tty=wp.Tty(rows=24, cols=80),
        trust_home=True,
    ),
    "reload_gateway": wp.ReloadGateway(),
}


class NoCages:
    """Stands in for Cages where nothing may run: any use is a failure."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a refused request reached Cages.{name}")


@pytest.fixture
def priv() -> Iterator[server.PrivServer]:
    a, b = socket.socketpair()
    try:
        yield server.PrivServer(a, cast(Cages, NoCages()), "hive-no-such-user")
    finally:
        a.close()
        b.close()


def ask(
    priv: server.PrivServer, caller: Caller, request: wp.PrivModel | bytes, fds: list[int]
) -> dict[str, Any]:
    line = request if isinstance(request, bytes) else wp.encode(request).rstrip(b"\n")
    return priv.handle(line, fds, caller, PeerCred(pid=1, uid=12345, gid=12345))


def pipes(n: int) -> tuple[list[int], list[int]]:
    """n pipes: the read ends (to send) and the write ends (kept, to see them closed)."""
    pairs = [os.pipe() for _ in range(n)]
    return [r for r, _ in pairs], [w for _, w in pairs]


def all_closed(write_ends: list[int]) -> bool:
    """Every read end is closed once writing to its pipe fails with EPIPE."""
    closed = True
    for w in write_ends:
        try:
            os.write(w, b"x")
            closed = False
        except BrokenPipeError:
            pass
        finally:
            os.close(w)
    return closed


def refusal(text: str) -> dict[str, Any]:
    return {"version": 1, "ok": False, "error": text}


# -- the tables ----------------------------------------------------------------------


def test_one_table_per_caller_and_root_adds_exec_only() -> None:
    assert set(TABLES) == set(Caller) == {Caller.CORE, Caller.ROOT}
    assert TABLES[Caller.CORE] is CORE_TABLE and TABLES[Caller.ROOT] is ROOT_TABLE
    assert set(CORE_TABLE) == {
        "prepare", "start", "stop", "destroy", "status", "limit_hits", "reload_gateway"}
    assert set(ROOT_ONLY) == {"exec"}
    assert dict(ROOT_TABLE) == {**CORE_TABLE, **ROOT_ONLY}
    assert {v.model for t in TABLES.values() for v in t.values()} == set(wp.PRIV_MODELS)


def test_each_row_is_named_by_its_model_and_its_columns_are_as_documented() -> None:
    for table in TABLES.values():
        for name, verb in table.items():
            assert verb.name == name == wp.verb_of(verb.model)
    columns = {n: (v.fds, v.locks_name, v.scans) for n, v in ROOT_TABLE.items()}
    assert columns == {
        "prepare": (0, True, False),
        "start": (0, True, False),
        "stop": (0, True, False),
        "destroy": (0, True, False),
        "status": (0, False, True),
        "limit_hits": (0, False, True),
        "reload_gateway": (0, False, False),
        "exec": (3, False, False),
    }
    assert verbs.MAX_FDS == server.MAX_FDS == 3


def test_a_row_that_locks_a_name_needs_a_model_with_one() -> None:
    with pytest.raises(TypeError, match="status locks the agent name but takes none"):
        Verb(wp.CageStatus, verbs.status, locks_name=True)


def test_locks_name_runs_the_handler_under_the_agents_lock() -> None:
    class Locks:
        def __init__(self) -> None:
            self.locks: dict[str, threading.Lock] = {}

        def lock(self, name: str) -> threading.Lock:
            return self.locks.setdefault(name, threading.Lock())

    cages = Locks()
    seen: list[tuple[str, bool]] = []

    def handler(c: Cages, req: wp.Prepare, r: verbs.Request) -> dict[str, Any]:
        seen.append((req.name, cages.locks[req.name].locked()))
        return {}

    req = wp.Prepare(name="alice")
    r = verbs.Request(req, Caller.CORE, [])
    Verb(wp.Prepare, handler, locks_name=True).run(cast(Cages, cages), req, r)
    assert seen == [("alice", True)]
    assert not cages.locks["alice"].locked()
    seen.clear()
    Verb(wp.Prepare, handler).run(cast(Cages, cages), req, r)
    assert seen == [("alice", False)]


def test_the_cores_scans_run_one_at_a_time_and_roots_dont_wait_for_them() -> None:
    """``scans``: the core's 8 connections asking ``limit_hits`` at once run it one after
    another (hive-priv's one interpreter stays free for root's verbs); root's own scan
    runs while a core's is under way."""

    class Scans:
        scan_lock = threading.Lock()

    cages = cast(Cages, Scans())
    inside, most, count_lock = [0], [0], threading.Lock()
    release = threading.Event()  # ends the core's long scan below

    def handler(c: Cages, req: wp.CageLimitHits, r: verbs.Request) -> dict[str, Any]:
        with count_lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        if r.caller is Caller.CORE:
            time.sleep(0.01)
        with count_lock:
            inside[0] -= 1
        return {"by": str(r.caller)}

    row = Verb(wp.CageLimitHits, handler, scans=True)
    req = wp.CageLimitHits(names=["alice"])
    as_core = verbs.Request(req, Caller.CORE, [])
    core = [threading.Thread(target=row.run, args=(cages, req, as_core)) for _ in range(8)]
    for t in core:
        t.start()
    for t in core:
        t.join()
    assert most[0] == 1  # one at a time (without the column: 8)

    held = threading.Event()

    def long_core_scan(c: Cages, req: wp.CageLimitHits, r: verbs.Request) -> dict[str, Any]:
        held.set()
        release.wait(5)
        return {}

    slow = threading.Thread(target=Verb(wp.CageLimitHits, long_core_scan, scans=True).run, args=(cages, req, as_core))
    slow.start()
    assert held.wait(5)
    assert row.run(cages, req, verbs.Request(req, Caller.ROOT, [])) == {"by": "root"}  # not queued
    assert Scans.scan_lock.locked()  # the core's scan still under way
    release.set()
    slow.join()


# -- the server refuses from the tables -----------------------------------------------


def test_a_root_only_verb_is_refused_to_the_core_and_its_descriptors_closed(
    priv: server.PrivServer,
) -> None:
    for name in ROOT_ONLY:
        fds, writes = pipes(ROOT_ONLY[name].fds)
        reply = ask(priv, Caller.CORE, SAMPLES[name], fds)
        assert reply == refusal(f"permission denied: {name} is not allowed for core")
        assert all_closed(writes)


@pytest.mark.parametrize("caller", list(Caller))
def test_every_row_refuses_a_wrong_count_of_descriptors(
    priv: server.PrivServer, caller: Caller
) -> None:
    for name, verb in TABLES[caller].items():
        for count in {0, 1, verb.fds + 1} - {verb.fds}:
            fds, writes = pipes(count)
            reply = ask(priv, caller, SAMPLES[name], fds)
            assert reply == refusal(f"{name} takes {verb.fds} file descriptors, got {count}")
            assert all_closed(writes)


@pytest.mark.parametrize("caller", list(Caller))
def test_unknown_verbs_and_bad_arguments_are_refused_before_the_table(
    priv: server.PrivServer, caller: Caller
) -> None:
    assert ask(priv, caller, b'{"cmd": "shell"}', []) == refusal("unknown command 'shell'")
    # An argument check comes first, for a verb outside the caller's table too.
    bad_exec = b'{"cmd": "exec", "name": "../x", "argv": ["id"]}'
    assert ask(priv, caller, bad_exec, [])["error"].startswith("field 'name': bad agent name")


def test_caller_class_is_the_kernels_word(priv: server.PrivServer) -> None:
    assert priv.caller_class(PeerCred(pid=1, uid=0, gid=0)) is Caller.ROOT
    assert priv.caller_class(PeerCred(pid=1, uid=12345, gid=12345)) is None
    priv.core_uid, priv.core_gid = 2000, 2001
    assert priv.caller_class(PeerCred(pid=1, uid=2000, gid=5)) is Caller.CORE
    assert priv.caller_class(PeerCred(pid=1, uid=5, gid=2001)) is Caller.CORE


# -- the caller-side models -----------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLES))
def test_caller_models_round_trip_through_hive_privs_parser(name: str) -> None:
    request = SAMPLES[name]
    line = wp.encode(request)
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and line.isascii()
    parsed = wp.priv_request.validate_python(parse_line(line.rstrip(b"\n")))
    assert parsed == request and type(parsed) is type(request)
    assert parsed.cmd == name


def test_each_model_is_a_whole_request_by_itself() -> None:
    """``cmd`` is each model's default: a caller never spells it, and can't get it wrong."""
    assert wp.encode(wp.StopCage(name="bob")) == (
        b'{"cmd": "stop", "name": "bob", "timeout": 5.0}\n'
    )
    assert parse_line(wp.encode(wp.CageStatus()).rstrip(b"\n")) == {"cmd": "status", "names": None}


def test_no_caller_builds_a_priv_request_by_hand() -> None:
    """Every use of priv_call (called, or handed to to_thread) passes a wire/priv.py
    model, never a dict."""
    uses = 0
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            names = [getattr(n, "id", None) for n in (node.func, *node.args)]
            if "priv_call" in names:
                uses += 1
                assert not any(isinstance(a, ast.Dict | ast.DictComp) for a in node.args), path
    assert uses >= 5


# -- one setpriv argv -------------------------------------------------------------------


def test_one_setpriv_argument_list_and_no_priv_code_in_the_cage() -> None:
    assert cage_init.drop_to is setpriv.drop_to
    assert setpriv.drop_to(1001, 1002) == [
        "/usr/bin/setpriv", "--reuid", "1001", "--regid", "1002", "--clear-groups",
        "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
    ]  # fmt: skip
    for path in (SRC / "cage").rglob("*.py"):
        text = path.read_text()
        assert "--reuid" not in text or path.name == "setpriv.py", path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("hyperhive.priv"), path
    for path in (SRC / "priv").rglob("*.py"):
        assert "--reuid" not in path.read_text(), path


# -- descriptors: socket.recv_fds / send_fds --------------------------------------------


def test_priv_reads_up_to_three_descriptors_with_a_line() -> None:
    a, b = socket.socketpair()
    with a, b:
        fds, writes = pipes(3)
        socket.send_fds(a, [b'{"cmd": "status"}\n'], fds)
        for fd in fds:
            os.close(fd)
        line, rest, got, closed = server._read_line(b, b"")
        assert (line, rest, len(got), closed) == (b'{"cmd": "status"}', b"", 3, False)
        for fd in got:
            os.close(fd)
        assert all_closed(writes)


@pytest.mark.parametrize("split", [False, True], ids=["one message", "two messages"])
def test_priv_closes_more_than_three_descriptors(split: bool) -> None:
    a, b = socket.socketpair()
    with a, b:
        fds, writes = pipes(4)
        if split:
            socket.send_fds(a, [b" "], fds[:2])
            socket.send_fds(a, [b" "], fds[2:])
        else:
            socket.send_fds(a, [b" "], fds)
        for fd in fds:
            os.close(fd)
        with pytest.raises(server.TooManyFds):
            for _ in range(2):
                server._read_line(b, b"")
        assert all_closed(writes)


def test_cage_init_sees_a_spawn_with_too_many_descriptors() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        for count in (3, 4):
            fds, writes = pipes(count)
            socket.send_fds(a, [b'{"op": "spawn"}'], fds)
            for fd in fds:
                os.close(fd)
            req, got = cage_init.recv_request(b)
            assert req == {"op": "spawn"} and len(got) == count  # 4: spawn refuses it
            for fd in got:
                os.close(fd)
            assert all_closed(writes)


def test_egress_handover_arrives_close_on_exec() -> None:
    a, b = socket.socketpair()
    server = socket.create_server(("127.0.0.1", 0))
    tcp = socket.create_connection(server.getsockname())
    with a, tcp, server:
        socket.send_fds(a, [HANDOVER], [tcp.fileno()])
        client, data = egress._receive(b, time.monotonic() + 5, handover=True)
        with client:
            assert data == b"" and client.family == socket.AF_INET
            assert not os.get_inheritable(client.fileno())


@pytest.mark.parametrize("what", ["listener", "unconnected"])
def test_egress_handover_of_anything_but_a_connection_is_refused(what: str) -> None:
    """A harness handing its bridge listener over (re-check of session 24) left the core
    a copy that took connections after the harness died; an unconnected socket is no
    client either."""
    a, b = socket.socketpair()
    sock = socket.create_server(("127.0.0.1", 0)) if what == "listener" else socket.socket()
    with a, b, sock:
        socket.send_fds(a, [HANDOVER], [sock.fileno()])
        with pytest.raises(egress.Refusal, match="must be a connected socket"):
            egress._receive(b, time.monotonic() + 5, handover=True)


# -- binding with an owner and a mode ---------------------------------------------------


def test_bind_listener_sets_owner_and_mode_without_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    path.write_text("stale")
    old = os.umask(0)
    try:
        sock = bind_listener(path, os.getgid(), 0o640, uid=os.getuid())
    finally:
        assert os.umask(old) == 0  # left as it was
    with sock:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))  # listening


def test_bind_socket_leaves_listening_to_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    with socket.socket(socket.AF_UNIX) as s:
        bind_socket(s, path, mode=0o600)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as c, pytest.raises(ConnectionRefusedError):
            c.connect(str(path))


@pytest.mark.parametrize("module", ["hyperhive.core.http", "fastapi.applications", "anyio._backends._asyncio"])
def test_warm_core_writes_the_bytecode_of_what_the_core_imports_after_start_up(module: str) -> None:
    """hive-core's user can't write a .pyc beside the root-owned install, so hive-priv
    imports what the core will, once, as root. The dashboard's code (fastapi and the rest)
    and anyio's backend load only after start-up: missed, every start of the core compiled
    them from source (the first /api/state of a start took 80-240 ms)."""
    import importlib.util

    from hyperhive.priv.cages import HiveCode

    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    cached = Path(importlib.util.cache_from_source(spec.origin))
    cached.unlink(missing_ok=True)
    HiveCode.warm_core()
    assert cached.is_file(), f"{module}: no {cached} after warm_core"

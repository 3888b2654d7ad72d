"""Each hive's core has ids of its own (cli/core_identity.py), and gets host.sock and
core.sock handed in (activation.py, cli/socket_activate.py): unit cases, as root, with a
registry of their own (never the host's)."""

from __future__ import annotations

import json
import os
import pwd
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hive_fixture import HIVE, ensure_user
from hyperhive.activation import NotActivated, inherited_listeners
from hyperhive.cli import core_identity
from hyperhive.cli.core_identity import CoreIdentityError, CoreIds, adopt_files, core_ids
from hyperhive.cli.socket_activate import parse
from hyperhive.priv import ids, nss
from hyperhive.priv.ids import HostIds, HostRegistry


@pytest.fixture
def registry(tmp_path: Path) -> HostRegistry:
    return HostRegistry(tmp_path / "ids", HostIds(accounts=set, ranges=list))


def test_ids_are_claimed_once_kept_and_distinct_per_hive(tmp_path: Path, registry: HostRegistry) -> None:
    a, b = tmp_path / "a" / "state", tmp_path / "b" / "state"
    first = core_ids(a, registry)
    assert core_ids(a, registry) == first  # read back, not claimed again
    other = core_ids(b, registry)
    assert other != first and first.uid == first.gid and other.uid == other.gid
    st = (a / "core.id").lstat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o644)
    assert json.loads((a / "core.id").read_text()) == {"uid": first.uid, "gid": first.gid}
    assert first.spec == f"{first.uid}:{first.gid}"


@pytest.mark.parametrize("taken", ["core uid", "gateway uid", "gateway gid", "subordinate range"])
def test_ids_the_host_gave_away_since_are_left_for_new_ones(
    tmp_path: Path, registry: HostRegistry, monkeypatch: pytest.MonkeyPatch, taken: str
) -> None:
    """The registry checks the host's accounts and subordinate ranges when it hands a
    block out; an account made later with one of its ids (``useradd -u``, a directory
    service's user) would share it with the hive's core or gateway (red team of session
    17). Each start looks the ids up one by one: taken, the hive gets new ones, and
    ``former`` names the old (their files here are adopted)."""
    state = tmp_path / "state"
    first = core_ids(state, registry)
    gw = core_identity.gateway_ids(first)
    real = nss.name_of

    def name_of(kind: str, i: int) -> str | None:
        if (taken, kind, i) in (
            ("core uid", "uid", first.uid), ("gateway uid", "uid", gw.uid), ("gateway gid", "gid", gw.gid)
        ):
            return "intruder"
        return real(kind, i)

    monkeypatch.setattr(nss, "name_of", name_of)
    if taken == "subordinate range":
        monkeypatch.setattr(ids, "subordinate_ranges", lambda: [(gw.uid, gw.uid)])
    said = core_identity.given_away(first)
    assert said is not None and ("intruder" in said or "subordinate" in said), said
    again = core_identity.core_identity(state, registry)
    assert again.former == first and again.ids != first
    assert json.loads((state / "core.id").read_text()) == {"uid": again.ids.uid, "gid": again.ids.gid}
    monkeypatch.undo()
    assert core_identity.given_away(again.ids) is None
    assert core_identity.core_identity(state, registry) == core_identity.Identity(again.ids)  # kept now


@pytest.mark.parametrize("plant", ["symlink", "not root's", "hard link", "garbage", "uid 0", "directory"])
def test_a_core_id_file_not_written_by_root_refuses_the_start(
    tmp_path: Path, registry: HostRegistry, plant: str
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = state / "core.id"
    victim = tmp_path / "victim"
    victim.write_text(json.dumps({"uid": 0, "gid": 0}))
    if plant == "symlink":
        path.symlink_to(victim)
    elif plant == "not root's":
        path.write_text(json.dumps({"uid": 5, "gid": 5}))
        os.chown(path, 65534, 65534)
    elif plant == "hard link":
        os.link(victim, path)
    elif plant == "garbage":
        path.write_text("{")
    elif plant == "uid 0":
        path.write_text(json.dumps({"uid": 0, "gid": 0}))
    else:
        path.mkdir()
    with pytest.raises(CoreIdentityError) as e:
        core_ids(state, registry)
    assert len(str(e.value).splitlines()) == 1 and "core.id" in str(e.value)
    assert victim.read_text() == json.dumps({"uid": 0, "gid": 0})  # never written through


@pytest.fixture
def legacy() -> pwd.struct_passwd:
    ensure_user(core_identity.LEGACY_USER)
    return pwd.getpwnam(core_identity.LEGACY_USER)


def test_the_shared_users_files_are_adopted_once_and_never_through_a_link(
    tmp_path: Path, legacy: pwd.struct_passwd
) -> None:
    state = tmp_path / "state"
    for d in ("ca", "secrets", "priv", "agents/x"):
        (state / d).mkdir(parents=True)
    theirs = [state / "hive.db", state / "operator.token", state / "ca" / "ca.key", state / "secrets" / "k"]
    for f in theirs:
        f.write_text("x")
    outside = tmp_path / "outside"
    outside.write_text("root's")
    (state / "link").symlink_to(outside)
    (state / "priv" / "ids.json").write_text("{}")
    (state / "agents" / "x" / "f").write_text("x")
    shared = state / "shared"  # a second link to another hive's file
    other_hives = tmp_path / "other-hive-file"
    other_hives.write_text("theirs")
    os.link(other_hives, shared)
    for p in [*theirs, state / "ca", state / "secrets", state / "priv" / "ids.json",
              state / "agents" / "x" / "f", shared]:  # fmt: skip
        os.chown(p, legacy.pw_uid, legacy.pw_gid)
    os.lchown(state / "link", legacy.pw_uid, legacy.pw_gid)
    ids = CoreIds(uid=210_000_001, gid=210_000_001)

    assert adopt_files(state, ids) == len(theirs) + 3  # 4 files, ca/, secrets/, the link
    for p in [*theirs, state / "ca", state / "secrets"]:
        assert (p.stat().st_uid, p.stat().st_gid) == (ids.uid, ids.gid), p
    assert os.lstat(state / "link").st_uid == ids.uid
    assert outside.stat().st_uid == 0  # the link's target untouched
    for p in (state / "priv" / "ids.json", state / "agents" / "x" / "f", other_hives):
        assert p.stat().st_uid == legacy.pw_uid, p  # root's and the agents' places, a hard link
    assert adopt_files(state, ids) == 0  # once


def test_no_legacy_user_or_the_same_ids_adopts_nothing(tmp_path: Path, legacy: pwd.struct_passwd) -> None:
    (tmp_path / "f").write_text("x")
    os.chown(tmp_path / "f", legacy.pw_uid, legacy.pw_gid)
    assert adopt_files(tmp_path, CoreIds(legacy.pw_uid, legacy.pw_gid)) == 0
    assert (tmp_path / "f").stat().st_uid == legacy.pw_uid


# -- the hand-over ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,error",
    [
        (["3", "--", "relative"], "must be an absolute path"),
        (["3:a", "4", "--", "/bin/true"], "name every socket or none"),
        (["x:a", "--", "/bin/true"], "is not FD or FD:NAME"),
        (["3:a:b", "--", "/bin/true"], "is not FD or FD:NAME"),
        (["--", "/bin/true"], "usage"),
        (["3", "/bin/true"], "usage"),
    ],
)
def test_the_shim_refuses_what_is_not_fd_name_then_an_absolute_program(
    args: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        parse(args)
    assert e.value.code == 2
    assert error in capsys.readouterr().err


@pytest.fixture
def two_listeners(tmp_path: Path) -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    a.bind(str(tmp_path / "a.sock"))
    b.bind(str(tmp_path / "b.sock"))
    a.listen(1)
    b.listen(1)
    yield a, b
    a.close()
    b.close()


# A child that takes what it was handed as hive-core does, and says what it got.
TAKE = """
import json, os, sys
from hyperhive.activation import NotActivated, inherited_listeners
try:
    got = inherited_listeners(tuple(sys.argv[1:]))
    out = {n: s.getsockname() for n, s in got.items()}
except NotActivated as e:
    out = {"refused": str(e)}
out["left"] = sorted(k for k in os.environ if k.startswith("LISTEN_"))
print(json.dumps(out))
"""


def _shim(socks: list[tuple[socket.socket, str]], *wanted: str) -> dict[str, object]:
    # Descriptors chosen to collide with the targets (3, 4) in the wrong order.
    specs = [f"{s.fileno()}:{n}" if n else str(s.fileno()) for s, n in socks]
    proc = subprocess.run(
        [sys.executable, "-I", "-m", "hyperhive.cli.socket_activate", *specs, "--",
         sys.executable, "-I", "-c", TAKE, *wanted],
        capture_output=True, text=True, timeout=30, pass_fds=[s.fileno() for s, _ in socks],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout)
    return out


def test_named_listeners_reach_the_program_by_name_and_nothing_leaks(
    two_listeners: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    a, b = two_listeners
    out = _shim([(b, "core.sock"), (a, "host.sock")], "host.sock", "core.sock")
    assert out == {"host.sock": str(tmp_path / "a.sock"), "core.sock": str(tmp_path / "b.sock"), "left": []}


@pytest.mark.parametrize(
    "handed,wanted",
    [
        ([("b", "core.sock")], ("host.sock", "core.sock")),  # one missing
        ([("a", "host.sock"), ("b", "evil.sock")], ("host.sock", "core.sock")),  # a stranger
        ([("a", ""), ("b", "")], ("host.sock", "core.sock")),  # unnamed
        ([("a", "host.sock"), ("b", "host.sock")], ("host.sock", "core.sock")),  # twice
    ],
    ids=["missing", "stranger", "unnamed", "twice"],
)
def test_listeners_not_named_exactly_so_are_refused(
    two_listeners: tuple[socket.socket, socket.socket], handed: list[tuple[str, str]], wanted: tuple[str, ...]
) -> None:
    by = dict(zip("ab", two_listeners, strict=True))
    out = _shim([(by[k], n) for k, n in handed], *wanted)
    assert "refused" in out and "expected host.sock:core.sock" in str(out["refused"]), out
    assert out["left"] == []


def test_not_activated_is_nothing_handed(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert inherited_listeners(("host.sock", "core.sock")) == {}
    monkeypatch.setenv("LISTEN_FDS", "2")
    with pytest.raises(NotActivated, match="not socket-activated"):
        inherited_listeners(("host.sock", "core.sock"))


def test_hive_core_id_prints_the_ids_hive_up_will_use(tmp_path: Path) -> None:
    state = tmp_path / "state"
    plain = subprocess.run([str(HIVE), "core-id", "--state-dir", str(state)], capture_output=True,
                           text=True, timeout=30)  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    js = subprocess.run([str(HIVE), "core-id", "--state-dir", str(state), "--json"], capture_output=True,
                        text=True, timeout=30)  # fmt: skip
    table = json.loads((state / "core.id").read_text())
    assert plain.stdout.strip() == f"{table['uid']}:{table['gid']}"
    gateway = {"uid": table["uid"] + 1, "gid": table["gid"] + 1}  # the block's second id
    assert json.loads(js.stdout) == {"version": 1, "ok": True, **table, "gateway": gateway}
    as_nobody = subprocess.run([str(HIVE), "core-id", "--state-dir", str(state)], capture_output=True,
                               text=True, timeout=30, user="nobody")  # fmt: skip
    assert as_nobody.returncode == 1
    assert as_nobody.stderr.strip().splitlines() == [
        "hive: hive core-id needs root (the state dir and the host's id registry are root's)"
    ]


def test_a_hive_of_the_shared_user_upgrades_in_place(legacy: pwd.struct_passwd) -> None:
    """A state dir an older version ran (every core file the shared ``hive-core`` user's,
    no core.id) starts under new ids of its own: its agents, its token and its secrets
    are the new core's, and the agent's messages and the operator's login survive."""
    from hive_fixture import HiveProcess

    h = HiveProcess({"upg": {"runtime": "command", "command": ["sleep", "3600"]}})
    try:
        h.start()
        h.host_call("secret_set", name="upgkey", value="s3cret-value")
        token = (h.state_dir / "operator.token").read_text()
        h.stop_clean()
        first = h.core_ids
        # As the older version left it: the core's files the shared user's, no core.id.
        for dirpath, dirs, files in os.walk(h.state_dir):
            dirs[:] = [d for d in dirs if d not in ("priv", "agents")] if dirpath == str(h.state_dir) else dirs
            for n in [*dirs, *files]:
                p = os.path.join(dirpath, n)
                if os.lstat(p).st_uid == first[0]:
                    os.lchown(p, legacy.pw_uid, legacy.pw_gid)
        (h.state_dir / "core.id").unlink()
        h.start()
        uid, gid = h.core_ids
        assert (uid, gid) != first and uid != legacy.pw_uid
        for p in (h.state_dir / "hive.db", h.state_dir / "operator.token", h.state_dir / "secrets"):
            assert p.stat().st_uid == uid, p
        assert (h.state_dir / "operator.token").read_text() == token
        assert [s["name"] for s in h.host_call("secret_ls")["secrets"]] == ["upgkey"]
        log = h.log_path.read_text()
        assert "gave " in log and "entries of earlier cores to this hive's core" in log, log
        h.stop_clean()
    finally:
        if h.proc is not None and h.proc.poll() is None:
            h.kill_everything()
        h.cleanup()


def test_a_deep_tree_is_walked_and_one_too_deep_is_one_line(
    tmp_path: Path, legacy: pwd.struct_passwd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared user could leave any tree in the state dir: 1,200 levels (past
    os.fwalk's recursion) are walked and adopted; one past MAX_DEPTH is refused in one
    line, not a traceback of hive up's, and what was given so far stays given."""
    state = tmp_path / "state"
    state.mkdir()
    fd = os.open(state, os.O_RDONLY)
    try:
        for _ in range(1200):
            os.mkdir("d", dir_fd=fd)
            os.chown("d", legacy.pw_uid, legacy.pw_gid, dir_fd=fd)
            fd, old = os.open("d", os.O_RDONLY, dir_fd=fd), fd
            os.close(old)
        os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
        os.chown("leaf", legacy.pw_uid, legacy.pw_gid, dir_fd=fd)
    finally:
        os.close(fd)
    ids = CoreIds(210_000_003, 210_000_003)
    try:
        with monkeypatch.context() as m:
            m.setattr(core_identity, "MAX_DEPTH", 50)
            with pytest.raises(CoreIdentityError, match="over 50 directories deep") as e:
                adopt_files(state, ids)
        assert len(str(e.value).splitlines()) == 1
        assert (state / "d").stat().st_uid == legacy.pw_uid  # its top given only after all below
        assert adopt_files(state, ids) == 1201  # the next start finishes it
        assert (state / "d").stat().st_uid == ids.uid
        assert adopt_files(state, ids) == 0  # nothing of theirs left at the top
    finally:  # rm walks without recursion; pytest's own cleanup might not
        subprocess.run(["rm", "-rf", "--one-file-system", str(state / "d")], check=True, timeout=60)


def test_a_copied_state_dir_gets_ids_of_its_own_and_its_files(
    tmp_path: Path, registry: HostRegistry
) -> None:
    """``core.id`` copied with a state dir names ids the registry gives to the original:
    the copy gets new ids, and the files the original's core owns in it are given to them."""
    from hyperhive.cli.core_identity import adopt_files, core_identity

    first = tmp_path / "a" / "state"
    ids = core_ids(first, registry)
    (first / "hive.db").write_text("x")
    os.chown(first / "hive.db", ids.uid, ids.gid)
    copy = tmp_path / "b" / "state"
    copy.parent.mkdir()
    subprocess.run(["cp", "-a", str(first), str(copy)], check=True)
    identity = core_identity(copy, registry)
    assert identity.former == ids and identity.ids != ids
    assert core_ids(first, registry) == ids  # the original keeps its own
    assert adopt_files(copy, identity.ids, identity.former) == 1
    assert (copy / "hive.db").stat().st_uid == identity.ids.uid
    assert (first / "hive.db").stat().st_uid == ids.uid
    assert core_identity(copy, registry).ids == identity.ids  # kept from now on

"""Path traversal from inside a cage, in every name and payload that reaches
hive-priv or the filesystem: message and question targets, a spawn payload's
name and peers, and symlinks an agent plants in its own home or socket
directories for a root process to follow. (hive-priv's own verbs with hostile
names, called by the core's uid, are in test_priv_misuse.py.)"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hive_fixture import HiveProcess, wait_until
from hyperhive.names import NAME_RE

from .conftest import World, cage_run, unchanged

pytestmark = pytest.mark.attack('fs.traversal-symlink', ref='firejail CVE-2017-5180; CVE-2026-39861')

BAD_NAMES = {
    "dotdot": "../rtbob",
    "dotdot-inside": "rtbob/../rtcarol",
    "dot": ".",
    "dotdot-alone": "..",
    "slash": "a/b",
    "absolute": "/etc/passwd",
    "deep": "../../../../../../../../etc/shadow",
    "32 chars": "rt" + "a" * 30,
    "very long": "a" * 5000,
    "unicode": "rtb\u00f6b",
    "fullwidth slash": "rt\uff0fbob",
    "division slash": "rt\u2215bob",
    "nul": "rtbob\x00",
    "newline": "rtbob\n",
    "upper": "RTBOB",
    "empty": "",
    "space": " rtbob",
    "percent": "rtbob%2f..",
    "backslash": "rt\\bob",
    "leading digit": "1rtbob",
    "leading dash": "-rtbob",
}
RESERVED = ["core", "hive", "all"]

NAMES = """
spec = {"runtime": "command", "command": ["true"]}
n = P["bad"]
out = {
    "send": err({"cmd": "send", "to": n, "body": "x"}),
    "ask": err({"cmd": "ask", "to": n, "question": "x"}),
    "spawn name": err({"cmd": "request_approval", "kind": "spawn", "description": "d",
                       "payload": {"name": n, "spec": spec}}),
    "spawn peers": err({"cmd": "request_approval", "kind": "spawn", "description": "d",
                        "payload": {"name": "rtfine", "spec": {**spec, "peers": ["rtbob", n]}}}),
}
result(**out)
"""


def bad(name: str) -> str:
    return f"bad agent name {name!r}: must match {NAME_RE.pattern}"


@pytest.mark.parametrize("case", list(BAD_NAMES))
def test_bad_name_refused_in_every_name_field(rt: HiveProcess, world: World, case: str) -> None:
    name = BAD_NAMES[case]
    with unchanged(rt):
        res = cage_run(rt, "rtbob", NAMES, bad=name)
    assert res == {
        "send": f"field 'to': {bad(name)}",
        "ask": f"field 'to': {bad(name)}",
        "spawn name": f"spawn payload: field 'name': {bad(name)}",
        "spawn peers": f"spawn payload: field 'spec.peers.1': {bad(name)}",
    }
    assert not (rt.run_dir / "agents" / "rtfine").exists()


@pytest.mark.parametrize("name", RESERVED)
def test_reserved_name_refused_in_every_name_field(rt: HiveProcess, world: World, name: str) -> None:
    with unchanged(rt):
        res = cage_run(rt, "rtbob", NAMES, bad=name)
    reserved = f"agent name {name!r} is reserved"
    assert res == {
        "send": f"field 'to': {reserved}",
        "ask": f"field 'to': {reserved}",
        "spawn name": f"spawn payload: field 'name': {reserved}",
        "spawn peers": f"spawn payload: field 'spec.peers.1': {reserved}",
    }


OPERATOR = """
spec = {"runtime": "command", "command": ["true"]}
result(name=err({"cmd": "request_approval", "kind": "spawn", "description": "d",
                 "payload": {"name": "operator", "spec": spec}}),
       peers=err({"cmd": "request_approval", "kind": "spawn", "description": "d",
                  "payload": {"name": "rtfine", "spec": {**spec, "peers": ["operator"]}}}))
"""


def test_operator_is_not_an_agent_name(rt: HiveProcess, world: World) -> None:
    """``operator`` may be addressed (send, ask) but never be a new agent or a peer."""
    with unchanged(rt):
        res = cage_run(rt, "rtbob", OPERATOR)
    reserved = "agent name 'operator' is reserved"
    assert res == {"name": f"spawn payload: field 'name': {reserved}",
                   "peers": f"spawn payload: field 'spec.peers.0': {reserved}"}


PLANT = """
import os
out = {}
for target, link in P["links"]:
    try:
        os.symlink(target, link)
        out[link] = "PLANTED"
    except OSError as e:
        out[link] = errname(e)
os.makedirs("/home/agent/nested/deeper", exist_ok=True)
os.symlink(P["canary_dir"], "/home/agent/nested/deeper/up")
os.mkfifo("/home/agent/a-fifo")
for victim in ("/run/hive/agent.sock", "/run/hive"):
    try:
        os.rename(victim, victim + ".moved")
        out["rename " + victim] = "RENAMED"
    except OSError as e:
        out["rename " + victim] = errname(e)
result(attempts=out)
"""


@pytest.fixture
def canary() -> Iterator[Path]:
    d = Path(f"/tmp/rt-canary-{secrets.token_hex(4)}")
    d.mkdir(mode=0o755)
    (d / "keep.txt").write_text("precious")
    os.chmod(d / "keep.txt", 0o644)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def canary_state(d: Path) -> list[tuple[str, int, int, int, str]]:
    def one(p: Path, text: str) -> tuple[str, int, int, int, str]:
        st = p.stat()
        return (p.name if p != d else "/", st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), text)

    return [one(p, p.read_text()) for p in sorted(d.iterdir())] + [one(d, "")]


def test_symlinks_planted_in_home_are_not_followed_by_root(rt: HiveProcess, world: World, canary: Path) -> None:
    """An agent fills its home with symlinks to host files and directories, then is
    restarted (hive-priv re-creates and chowns its home) and destroyed (hive-priv
    deletes its state): the links go, the host's files are untouched. Its socket
    directories take no link at all."""
    h = rt
    before = canary_state(canary)
    with unchanged(h):  # the agent comes and goes; nothing else changes
        _plant_restart_destroy(h, canary)
    assert canary_state(canary) == before
    assert Path("/etc/shadow").exists()


def _plant_restart_destroy(h: HiveProcess, canary: Path) -> None:
    before = canary_state(canary)
    assert h.host_call("spawn", name="rtsym", spec={"runtime": "command", "command": ["true"]})["ok"]
    try:
        h.wait_running(["rtsym"])
        links = [[str(canary), "/home/agent/to-dir"], [str(canary / "keep.txt"), "/home/agent/to-file"],
                 ["/etc/shadow", "/home/agent/to-shadow"], [str(canary), "/run/hive/planted"],
                 [str(canary), "/run/hive-ui/planted"]]
        res = cage_run(h, "rtsym", PLANT, links=links, canary_dir=str(canary))
        assert res["attempts"] == {
            "/home/agent/to-dir": "PLANTED", "/home/agent/to-file": "PLANTED", "/home/agent/to-shadow": "PLANTED",
            "/run/hive/planted": "EROFS", "/run/hive-ui/planted": "ENOENT",
            "rename /run/hive/agent.sock": "EROFS", "rename /run/hive": "EACCES",
        }
        home = h.home("rtsym")
        assert os.readlink(home / "to-dir") == str(canary)
        # A restart: hive-priv prepares the home again (mkdir, chown, chmod) as root.
        assert h.host_call("restart", name="rtsym")["ok"]
        h.wait_running(["rtsym"])
        assert canary_state(canary) == before
        home = h.home("rtsym")  # through the new cage's root
        assert os.readlink(home / "to-dir") == str(canary)
        assert stat.S_IMODE(home.stat().st_mode) == 0o700 and not home.is_symlink()
    finally:
        assert h.host_call("destroy", name="rtsym")["ok"]
        wait_until(lambda: not h.cgroup("rtsym").pids(), 20, "rtsym's cage to be gone")
    assert not (h.state_dir / "agents" / "rtsym").exists()
    assert canary_state(canary) == before

"""cli/core_sandbox.py: the core `hive up` starts is narrowed as systemd's unit narrows
it (docs/security.md, "The core's sandbox under hive up"). Checked on a live core: its
status, and writes made with its exact ids from inside its own mount namespace."""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hive_fixture import HiveFactory

SHIM = [sys.executable, "-I", "-m", "hyperhive.cli.core_sandbox"]

WRITES = r"""
import errno, json, os, sys
out = {}
for path in json.loads(sys.argv[1]):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(path)
        out[path] = "written"
    except OSError as e:
        out[path] = errno.errorcode.get(e.errno, str(e))
print(json.dumps(out))
"""


def _as_core_in_its_namespace(pid: int, uid: int, gid: int, script: str, *args: str) -> str:
    ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)

    def enter() -> None:
        if ctypes.CDLL(None, use_errno=True).setns(ns, 0x20000) != 0:
            os._exit(99)
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)

    try:
        out = subprocess.run([sys.executable, "-I", "-c", script, *args], capture_output=True,
                             text=True, timeout=30, cwd="/", preexec_fn=enter)
    finally:
        os.close(ns)
    assert out.returncode == 0, (out.returncode, out.stderr)
    return out.stdout


def test_the_live_core_writes_only_its_state_and_run_dirs_and_gains_nothing(
    hive_factory: HiveFactory,
) -> None:
    h = hive_factory({"sbx": {"runtime": "command", "command": ["sleep", "3600"]}})
    pid = h.core_pid()
    assert pid is not None
    uid, gid = h.core_ids
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
    assert re.search(r"^CapBnd:\s+0+$", status, re.M), status
    assert re.search(r"^CapEff:\s+0+$", status, re.M), status
    assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s+{uid}$", status, re.M), status
    targets = {
        "/tmp": "EROFS", "/var/tmp": "EROFS", "/dev/shm": "EROFS", str(h.base): "EROFS",
        str(h.state_dir): "written", str(h.run_dir / "agents" / "sbx"): "written",
    }  # fmt: skip
    paths = [os.path.join(d, f".sbx-probe-{os.getpid()}") for d in targets if os.path.isdir(d)]
    got = json.loads(_as_core_in_its_namespace(pid, uid, gid, WRITES, json.dumps(paths)))
    want = {p: targets[os.path.dirname(p)] for p in paths}
    assert got == want
    # The same writes as the same ids on the host: /tmp takes them (the sandbox refuses,
    # not the permissions).
    host = subprocess.run([sys.executable, "-I", "-c", WRITES, json.dumps(paths[:1])], capture_output=True,
                          text=True, timeout=30, user=uid, group=gid, extra_groups=[])
    assert json.loads(host.stdout) == {paths[0]: "written"}, host.stderr
    # The core serves: an agent's message round trip still goes through it.
    assert h.exec("sbx", "true").returncode == 0
    assert h.host_call("agent_status")["ok"]


def test_a_sandboxed_program_runs_with_the_ids_and_nothing_else(tmp_path: Path) -> None:
    state, run = tmp_path / "state", tmp_path / "run"
    state.mkdir()
    run.mkdir()
    out = subprocess.run([*SHIM, "4242:4343", str(state), str(run), "--", "/bin/sh", "-c",
                          'id -u; id -g; id -G; echo "$TMPDIR"; grep -E "^(NoNewPrivs|CapBnd)" /proc/self/status'],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:4] == ["4242", "4343", "4343", str(state)], out.stdout
    assert "NoNewPrivs:\t1" in out.stdout and "CapBnd:\t0000000000000000" in out.stdout, out.stdout


@pytest.mark.parametrize("args", [
    ["0:0", "/s", "/r", "--", "/bin/true"],
    ["1", "/s", "/r", "--", "/bin/true"],
    ["5:5", "s", "/r", "--", "/bin/true"],
    ["5:5", "/s/../x", "/r", "--", "/bin/true"],
    ["5:5", "/s", "/r", "--", "true"],
    ["5:5", "/s", "/r", "/bin/true"],
], ids=["root", "no-gid", "relative", "not-normalized", "relative-program", "no-separator"])
def test_bad_arguments_are_one_line_and_run_nothing(args: list[str]) -> None:
    out = subprocess.run([*SHIM, *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.startswith(("core_sandbox: ", "usage: ")), out.stderr
    assert out.stdout == ""


UNPRIVILEGED = [sys.executable, "-I", "-m", "hyperhive.cli.unprivileged"]


def test_unprivileged_runs_a_program_with_the_ids_and_nothing_else() -> None:
    """nginx's start (cli/unprivileged.py): no namespace, the ids, NoNewPrivs, no capability."""
    out = subprocess.run([*UNPRIVILEGED, "4242:4343", "--", "/bin/sh", "-c",
                          'id -u; id -g; id -G; grep -E "^(NoNewPrivs|CapBnd)" /proc/self/status;'
                          ' readlink /proc/self/ns/mnt'],
                         capture_output=True, text=True, timeout=30, env={"NGINX": "3;", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[:3] == ["4242", "4343", "4343"], out.stdout
    assert "NoNewPrivs:\t1" in out.stdout and "CapBnd:\t0000000000000000" in out.stdout, out.stdout
    assert lines[5] == os.readlink("/proc/self/ns/mnt"), "a mount namespace of its own"


@pytest.mark.parametrize("args", [
    ["0:0", "--", "/bin/true"], ["5", "--", "/bin/true"], ["5:5", "--", "true"], ["5:5", "/bin/true"],
], ids=["root", "no-gid", "relative-program", "no-separator"])
def test_unprivileged_refuses_bad_arguments_in_one_line(args: list[str]) -> None:
    out = subprocess.run([*UNPRIVILEGED, *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(("unprivileged: ", "usage: ")), out.stderr

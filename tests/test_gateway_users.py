"""cli/gateway_users.py: nginx's ``user hive-gateway`` means this hive's own gateway ids,
in nginx's mount namespace only (needs root: a mount namespace and binds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHIM = [sys.executable, "-I", "-m", "hyperhive.cli.gateway_users"]


def _files(tmp_path: Path, uid: int, gid: int) -> tuple[str, str]:
    passwd, group = tmp_path / "passwd", tmp_path / "group"
    passwd.write_text(f"root:x:0:0::/root:/bin/sh\nhive-gateway:x:{uid}:{gid}::/nonexistent:/usr/sbin/nologin\n")
    group.write_text(f"root:x:0:\nhive-gateway:x:{gid}:\n")
    return str(passwd), str(group)


def test_the_name_is_the_hives_ids_in_the_namespace_only(tmp_path: Path) -> None:
    passwd, group = _files(tmp_path, 987654, 987655)
    out = subprocess.run([*SHIM, "987654:987655", passwd, group, "--", "/usr/bin/id", "hive-gateway"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("uid=987654(hive-gateway) gid=987655(hive-gateway)"), out.stdout
    # The host's own database is untouched.
    assert "987654" not in Path("/etc/passwd").read_text()
    points = [line.split()[4] for line in Path(f"/proc/{os.getpid()}/mountinfo").read_text().splitlines()]
    assert "/etc/passwd" not in points and "/etc/group" not in points


def test_a_name_that_resolves_otherwise_refuses_in_one_line(tmp_path: Path) -> None:
    passwd, group = _files(tmp_path, 987654, 987655)
    out = subprocess.run([*SHIM, "111111:111111", passwd, group, "--", "/usr/bin/true"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "gateway_users: hive-gateway is 987654:987655 (group 987655) in the gateway's namespace,"
        " not 111111:111111: a name service other than the files answers"
    ], out.stderr


@pytest.mark.parametrize("args", [
    ["0:0", "/p", "/g", "--", "/usr/bin/true"],
    ["1:x", "/p", "/g", "--", "/usr/bin/true"],
    ["5:5", "p", "/g", "--", "/usr/bin/true"],
    ["5:5", "/p", "/g", "--", "true"],
    ["5:5", "/p", "/g", "/usr/bin/true"],
], ids=["root", "not-a-number", "relative-file", "relative-program", "no-separator"])
def test_bad_arguments_are_one_line_and_run_nothing(args: list[str]) -> None:
    out = subprocess.run([*SHIM, *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.startswith(("gateway_users: ", "usage: ")), out.stderr
    assert out.stdout == ""

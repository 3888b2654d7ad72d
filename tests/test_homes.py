"""Agent homes live in their cages' mount namespaces only (issue 17): hive-priv mounts
each home detached and the cage's starting child attaches it, so no mount table a cage
start copies (the host's, and the namespace each cage keeps for its life) grows with
the cages running. A home's contents still outlive its cage: a stop and start, and a
hive-priv killed and activated again; and its loop device goes with the cage."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from hive_fixture import HiveFactory, HiveProcess, wait_until

TRUE = {"runtime": "command", "command": ["true"]}
MANY = 10


def ok(reply: dict[str, object]) -> dict[str, object]:
    assert reply.get("ok") is True, reply
    return reply


def mount_points(pid: int | str) -> list[str]:
    return [line.split()[4] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()]


def init_pid(hive: HiveProcess, name: str) -> int:
    info = json.loads((hive.state_dir / "priv" / "cages" / name / "info.json").read_text())
    return int(info["child_pid"])


def outer_pid(hive: HiveProcess, name: str) -> int:
    """bwrap's first process: it stays in the namespace hive-priv's child made (before
    bwrap's own), the one that copied the host's table, for the cage's life."""
    status = Path(f"/proc/{init_pid(hive, name)}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


def under(points: list[str], base: Path) -> list[str]:
    prefix = str(base.resolve()) + "/"
    return [p for p in points if p.startswith(prefix)]


def tables(hive: HiveProcess, name: str) -> tuple[list[str], int]:
    """The mounts under the hive's directories in the namespace ``name``'s start made,
    and the number of lines of the cage's own mountinfo."""
    return under(mount_points(outer_pid(hive, name)), hive.base), len(mount_points(init_pid(hive, name)))


@pytest.mark.timeout(240)
def test_no_mount_table_grows_with_the_cages_running(hive_factory: HiveFactory) -> None:
    names = [f"hm{i}" for i in range(MANY)]
    hive = hive_factory({n: TRUE for n in names})
    hive.wait_running(names)
    # The host's table: no home (each was a mount here, copied by every later start).
    # The one mount of the hive's on the host: run/agents, a tmpfs of its own (session 17).
    assert under(mount_points("self"), hive.base) == [str((hive.run_dir / "agents").resolve())]
    many = {n: tables(hive, n) for n in names}
    for n, (points, _) in many.items():
        assert not [p for p in points if "/agents/" in p], (n, points)
    assert len({(tuple(p), lines) for p, lines in many.values()}) == 1, many  # all alike

    ok(hive.host_call("stop", scope={"agent_names": names[1:]}))
    wait_until(lambda: all(not hive.cage(n)["running"] for n in names[1:]), 30, "cages to stop")
    ok(hive.host_call("restart", name=names[0]))
    hive.wait_running(names[:1])
    assert tables(hive, names[0]) == many[names[0]]  # 1 running, the same as 10
    # The one mount of the hive's on the host: run/agents, a tmpfs of its own (session 17).
    assert under(mount_points("self"), hive.base) == [str((hive.run_dir / "agents").resolve())]
    # The cage sees its home, and only its own (no host path: the redteam disk quota test).
    home = [line for line in Path(f"/proc/{init_pid(hive, names[0])}/mountinfo").read_text().splitlines()
            if line.split()[4] == "/home/agent"]
    assert len(home) == 1 and " ext4 " in home[0], home


def loop_of(hive: HiveProcess, name: str) -> str:
    return (hive.state_dir / "agents" / name / "home.loop").read_text().strip()


def backed_by(loop: str, image: Path) -> bool:
    try:
        return Path(f"/sys/block/{loop}/loop/backing_file").read_text().strip() == str(image.resolve())
    except OSError:
        return False


@pytest.mark.timeout(180)
def test_a_home_outlives_stop_start_and_a_priv_restart(hive_factory: HiveFactory) -> None:
    name = "hmkeep"
    hive = hive_factory({name: TRUE})
    hive.wait_running([name])
    image = hive.state_dir / "agents" / name / "home.img"
    put = hive.exec(name, "sh", "-c", "echo kept > /home/agent/keep && mkdir -p /home/agent/d && echo 2 > /home/agent/d/f")
    assert put.returncode == 0, put.stderr

    def read_back() -> None:
        got = hive.exec(name, "cat", "/home/agent/keep", "/home/agent/d/f")
        assert got.returncode == 0 and got.stdout.split() == ["kept", "2"], (got.stdout, got.stderr)
        assert (hive.home(name) / "keep").read_text() == "kept\n"  # the host, through the cage
        assert os.listdir(hive.state_dir / "agents" / name / "home") == []  # nothing on the host

    ok(hive.host_call("restart", name=name))
    hive.wait_running([name])
    read_back()

    old_priv = hive.priv_pid()
    assert old_priv is not None
    os.kill(old_priv, signal.SIGKILL)
    wait_until(lambda: hive.priv_pid() is None, 10, "hive-priv to be gone")
    ok(hive.host_call("restart", name=name))  # activates hive-priv again: it stops, then starts
    hive.wait_running([name])
    assert hive.priv_pid() not in (None, old_priv)
    read_back()
    assert backed_by(loop_of(hive, name), image)

    # Stopped, the home's loop device goes with the cage's namespaces (autoclear): no
    # mount of it is left anywhere.
    loop = loop_of(hive, name)
    ok(hive.host_call("stop", scope={"agent_names": [name]}))
    wait_until(lambda: not hive.cage(name)["running"], 30, "the cage to stop")
    started = time.monotonic()
    wait_until(lambda: not backed_by(loop, image), 10, "the home's loop device to be released")
    print(f"\nloop device released {time.monotonic() - started:.2f} s after the stop")
    ok(hive.host_call("start", scope={"agent_names": [name]}))
    hive.wait_running([name])
    read_back()

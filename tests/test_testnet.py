"""The test networks clear what a killed run left on their subnet (root only): a dead
run's bridge holding 198.18.<subnet>.1 kept the subnet's route, and a new run's NATS
nodes could not be reached (every swarm test errored)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from testnet import clear_stale

SUBNET = 233


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def dead_pid() -> int:
    return next(p for p in range(30000, 1, -1) if not os.path.exists(f"/proc/{p}"))


def links() -> str:
    return ip("-br", "link")


def test_a_dead_runs_bridge_and_namespace_are_removed() -> None:
    tag = f"sw{SUBNET}x{dead_pid()}"
    ip("link", "add", tag + "br", "type", "bridge")
    ip("addr", "add", f"198.18.{SUBNET}.1/24", "dev", tag + "br")
    ip("netns", "add", tag + "a")
    sleeper = subprocess.Popen(["ip", "netns", "exec", tag + "a", "sleep", "60"])
    try:
        clear_stale(SUBNET)
        assert tag + "br" not in links()
        assert tag + "a" not in ip("netns", "list")
        assert sleeper.wait(timeout=10) != 0  # killed with its namespace
    finally:
        sleeper.kill()
        subprocess.run(["ip", "netns", "del", tag + "a"], capture_output=True)
        subprocess.run(["ip", "link", "del", tag + "br"], capture_output=True)


def test_an_address_held_by_something_else_is_refused_and_kept() -> None:
    name = f"keep{SUBNET}"  # not a test network's shape (no "x<pid>")
    ip("link", "add", name, "type", "bridge")
    ip("addr", "add", f"198.18.{SUBNET}.1/24", "dev", name)
    try:
        with pytest.raises(RuntimeError, match="not a test network"):
            clear_stale(SUBNET)
        assert name in links()
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def test_a_live_runs_network_is_refused_and_kept() -> None:
    run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    name = f"sw{SUBNET}x{run.pid}br"
    ip("link", "add", name, "type", "bridge")
    ip("addr", "add", f"198.18.{SUBNET}.1/24", "dev", name)
    try:
        with pytest.raises(RuntimeError, match="running process"):
            clear_stale(SUBNET)
        assert name in links()
        run.kill()
        run.wait()
        clear_stale(SUBNET)  # once that run is gone, its network goes too
        assert name not in links()
    finally:
        run.kill()
        subprocess.run(["ip", "link", "del", name], capture_output=True)

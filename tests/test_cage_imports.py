"""What the cage's init has loaded when it forks the first harness (issue 17's cold start).

The harness is a fork of init and connects to the core (the agent runs from there) before
it loads its own modules; whatever init imports before that fork is on every cold start's
path. json (its ``re`` and the regular expressions it compiles at import), socket, signal
and selectors (enum, functools, collections) were ~13 ms of CPU of a ~26 ms stretch."""

from __future__ import annotations

import subprocess
from pathlib import Path

from hyperhive.cage import layout

SRC = Path(__file__).resolve().parent.parent / "src"
# Loaded after the fork (the harness, after its connect; init, at its first request) or never.
NOT_BEFORE_THE_FORK = (
    "json", "re", "enum", "socket", "signal", "selectors", "threading", "subprocess",
    "typing", "collections", "functools", "hyperhive.cage.harness",
)  # fmt: skip


def test_init_loads_nothing_heavy_before_the_first_harness_connects() -> None:
    # As the cage runs it: the cage's python, isolated, no site; init's module as main
    # imports it (``main`` forks the harness right after confining itself).
    code = (
        f"import sys; sys.path[:0] = [{str(SRC)!r}]; import hyperhive.cage.init; "
        "print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [layout.CAGE_PYTHON, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    loaded = [m for m in NOT_BEFORE_THE_FORK if m in out]
    assert not loaded, loaded
    assert "hyperhive.cage.seccomp" in out and "ctypes" in out  # what it needs: it confines itself


# What neither init nor the harness loads at all (with the runtime's first turn served):
# json's Python modules and the regular expressions they compile, and the enums of socket,
# signal and selectors; the C modules do the work (cage/wirejson.py). A harness's start
# cost 20.2 ms of CPU with them, 6.6–7.4 without (50 cages, session 14); at 1,000 cages
# every harness's share of `hive up`.
NEVER_IN_THE_CAGE = ("json", "re", "enum", "socket", "signal", "selectors", "subprocess", "typing")


def test_neither_init_nor_the_harness_loads_json_re_or_the_enums() -> None:
    code = (
        f"import sys; sys.path[:0] = [{str(SRC)!r}]; import hyperhive.cage.init as init;"
        "import hyperhive.cage.harness, hyperhive.cage.egress_bridge, hyperhive.unixsock;"
        "import _socket; a, b = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET);"
        "a.send(b'{\"op\": \"kill\", \"pid\": 1, \"signal\": 0}'); print(init.recv_request(b)[0]);"
        "print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [layout.CAGE_PYTHON, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "{'op': 'kill', 'pid': 1, 'signal': 0}"  # init's request, read
    loaded = [m for m in NEVER_IN_THE_CAGE if m in out[1].split()]
    assert not loaded, loaded
    assert "hyperhive.cage.wirejson" in out[1].split()

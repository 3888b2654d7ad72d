"""What the cage's init holds, and what the rest of the cage can get from it. The
init is host uid 0 with CAP_SETUID, CAP_SETGID, CAP_SETPCAP and CAP_KILL; its
bounding set is now those four and no more (was: every capability), nothing is
inheritable or ambient, and everything it starts has none at all. The runtime's
processes are first in line for the OOM killer (oom_score_adj raised by init),
init and the harness last, and the runtime can't lower itself below them."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HiveProcess, proc_cmdline, running_hive, wait_until

from .conftest import cage_run

pytestmark = pytest.mark.attack("init.capabilities", ref="issue 11 item 10; bubblewrap#368; runc CVE-2019-5736 "
                                "(a sandbox's root process as the way out)")

# CAP_KILL, CAP_SETGID, CAP_SETUID, CAP_SETPCAP (hyperhive.cage.init.KEEP_CAPS)
KEEP_MASK = 1 << 5 | 1 << 6 | 1 << 7 | 1 << 8
RUNTIME_OOM_SCORE_ADJ = 500  # hyperhive.cage.init.RUNTIME_OOM_SCORE_ADJ

# The runtime of AGENT, one turn: what a runtime process sees of itself and tries.
RUNTIME = r"""
import ctypes, errno, json, os, subprocess
st = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
out = {k: st[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Uid")}
out["oom"] = int(open("/proc/self/oom_score_adj").read())
init = [int(p) for p in os.listdir("/proc") if p.isdigit()
        and b"hyperhive.cage.__main__" in open(f"/proc/{p}/cmdline", "rb").read()
        and b"init" in open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")]
floor = min(int(open(f"/proc/{p}/oom_score_adj").read()) for p in init) if init else None
out["floor"] = floor
def write(v):
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(v))
        return "OK"
    except OSError as e:
        return errno.errorcode[e.errno]
out["below floor"] = write(floor - 1) if floor is not None else "no init"
out["oom after"] = int(open("/proc/self/oom_score_adj").read())
def run(*argv):
    p = subprocess.run(list(argv), capture_output=True, text=True)
    return p.returncode
out["setpriv +setuid"] = run("setpriv", "--inh-caps=+setuid", "--ambient-caps=+setuid", "true")
out["setpriv reuid 0"] = run("setpriv", "--reuid=0", "true")
libc = ctypes.CDLL(None, use_errno=True)
hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
data = (ctypes.c_uint32 * 6)()
libc.capget(hdr, data)
data[0] = data[1] = 1 << 7  # CAP_SETUID, effective and permitted
out["capset setuid"] = "OK" if libc.capset(hdr, data) == 0 else errno.errorcode[ctypes.get_errno()]
with open(os.path.join(os.environ["HOME"], "runtime.json"), "w") as f:
    json.dump(out, f)
"""
AGENT = "rtinit"


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess({
        AGENT: {"runtime": "command", "command": ["python3", "-c", textwrap.dedent(RUNTIME)]},
    }))


@pytest.fixture(scope="module")
def runtime(hive: HiveProcess) -> dict[str, Any]:
    out = hive.home(AGENT) / "runtime.json"
    assert hive.host_call("send", to=AGENT, body="go")["ok"]
    wait_until(out.exists, 60, "the runtime's report")
    time.sleep(0.2)
    return json.loads(out.read_text())


PROBE = """
procs = {}
for p in sorted(int(x) for x in os.listdir("/proc") if x.isdigit()):
    try:
        st = dict(l.split(":", 1) for l in open(f"/proc/{p}/status").read().splitlines())
        cmd = open(f"/proc/{p}/cmdline", "rb").read().split(b"\\0")
        oom = int(open(f"/proc/{p}/oom_score_adj").read())
    except OSError:
        continue
    procs[p] = {"cmd": [c.decode(errors="replace") for c in cmd if c], "oom": oom,
                **{k: st[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "Uid")}}
result(procs=procs)
"""


def is_init(cmd: list[str]) -> bool:
    return any("hyperhive.cage.__main__" in c for c in cmd) and "init" in cmd


def is_harness(cmd: list[str]) -> bool:
    return any("hyperhive.cage.__main__" in c for c in cmd) and "harness" in cmd


@pytest.fixture(scope="module")
def procs(hive: HiveProcess) -> dict[str, dict[str, Any]]:
    """Every process of the cage as the runtime's uid sees it in /proc (hive exec)."""
    res = cage_run(hive, AGENT, PROBE)
    out = {}
    for p in res["procs"].values():
        role = "init" if is_init(p["cmd"]) else "harness" if is_harness(p["cmd"]) else None
        if role:
            out[role] = p
    assert set(out) == {"init", "harness"}, res["procs"]
    return out


def test_init_bounding_set_is_what_it_uses(procs: dict[str, dict[str, Any]]) -> None:
    assert int(procs["init"]["CapBnd"], 16) == KEEP_MASK
    assert int(procs["init"]["CapEff"], 16) == KEEP_MASK == int(procs["init"]["CapPrm"], 16)


def test_init_has_nothing_inheritable(procs: dict[str, dict[str, Any]]) -> None:
    assert int(procs["init"]["CapInh"], 16) == 0


def test_init_has_no_ambient_capabilities(procs: dict[str, dict[str, Any]]) -> None:
    assert int(procs["init"]["CapAmb"], 16) == 0


def test_no_process_in_the_cage_has_more_than_init(hive: HiveProcess, procs: dict[str, dict[str, Any]]) -> None:
    """Seen from the host, every process of the cage's cgroup: none holds a capability
    init doesn't, and all but bwrap's own two (which hold none: they set the cage up
    and then only wait) have a bounding set no larger than init's."""
    seen = 0
    for pid in hive.cage_procs(AGENT):
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        cmd = proc_cmdline(pid)
        for key in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
            assert int(status[key], 16) & ~KEEP_MASK == 0, (pid, cmd, key, status[key])
        if cmd[:1] == ["bwrap"]:
            assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
            continue
        assert int(status["CapBnd"], 16) & ~KEEP_MASK == 0, (pid, cmd, status["CapBnd"])
        seen += 1
    assert seen >= 2  # init and the harness


def test_harness_has_no_capabilities(procs: dict[str, dict[str, Any]]) -> None:
    h = procs["harness"]
    assert {k: int(h[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == dict.fromkeys(
        ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), 0)
    assert int(procs["init"]["oom"]) <= 0 and h["oom"] == procs["init"]["oom"]


def test_runtime_is_first_for_the_oom_killer(runtime: dict[str, Any], procs: dict[str, dict[str, Any]]) -> None:
    assert runtime["oom"] == RUNTIME_OOM_SCORE_ADJ > procs["harness"]["oom"]


def test_runtime_cannot_go_below_init_and_harness(runtime: dict[str, Any]) -> None:
    assert runtime["floor"] is not None and runtime["floor"] <= 0
    assert runtime["below floor"] == "EACCES"
    assert runtime["oom after"] == RUNTIME_OOM_SCORE_ADJ


@pytest.mark.parametrize("attempt", ["setpriv +setuid", "setpriv reuid 0", "capset setuid"])
def test_runtime_cannot_regain_capabilities(runtime: dict[str, Any], attempt: str) -> None:
    caps = {k: int(runtime[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    assert caps == dict.fromkeys(caps, 0) and runtime["NoNewPrivs"] == "1"
    assert runtime["oom"] == RUNTIME_OOM_SCORE_ADJ  # (the old init left it at 0)
    assert runtime[attempt] not in (0, "OK"), runtime

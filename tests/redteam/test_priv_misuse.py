"""Misuse of priv.sock by the core's own uid (what a compromised hive-core could
send): traversal names on every verb, unknown verbs, extra fields, numbers out
of range or of the wrong type, exec (root only), file descriptors where none
belong or more than any verb takes, an oversized line. And the operator's own
``hive exec`` with a hostile name. Each is refused with one line, and nothing
changes: no cage, directory, cgroup or id appears, and hive-priv's descriptor
table is back where it was.

(From inside a cage priv.sock does not exist at all: test_reach.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

import pytest

from hive_fixture import HIVE, HiveProcess, wait_until
from hyperhive.names import NAME_RE
from hyperhive.wire.framing import MAX_LINE

from .conftest import World, unchanged

pytestmark = pytest.mark.attack('privsep.core-misuse', ref='OpenSSH monitor.c')


# Runs as hive-core: sends each request (a JSON value, or raw bytes as a latin-1
# string) with N file descriptors (copies of /dev/null) and reads one reply line.
CALLER = r"""
import array, json, os, socket, sys

def call(path, raw, nfds):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
    try:
        try:
            if fds:
                s.sendmsg([raw], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            else:
                s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        line = s.makefile("rb").readline()
        return json.loads(line) if line else {"closed": True}
    finally:
        for fd in fds:
            os.close(fd)
        s.close()

path, cases = sys.argv[1], json.loads(sys.stdin.read() if sys.argv[2] == "-" else sys.argv[2])
out = {"uid": os.getuid()}
for label, req, nfds in cases:
    raw = req.encode("latin-1") if isinstance(req, str) else json.dumps(req).encode() + b"\n"
    out[label] = call(path, raw, nfds)
print(json.dumps(out))
"""


def as_core(h: HiveProcess, cases: list[tuple[str, Any, int]]) -> dict[str, Any]:
    payload = json.dumps(cases)
    proc = subprocess.run(
        [str(HIVE.parent / "python"), "-c", CALLER, str(h.priv_sock), "-"], input=payload, capture_output=True,
        text=True, timeout=120, **h.as_core(),
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out.pop("uid") == h.core_ids[0]
    return out


def refusal(text: str) -> dict[str, Any]:
    return {"version": 1, "ok": False, "error": text}


def priv_fds(h: HiveProcess) -> int:
    """hive-priv's descriptors when it serves no one: the fewest of three looks 50 ms apart
    (the core's limits poll connects every 5 s, so one look may count its request in
    flight; CI's baseline did once: 16, then 15)."""
    pid = h.priv_pid()
    assert pid is not None
    seen = []
    for i in range(3):
        if i:
            time.sleep(0.05)
        seen.append(len(os.listdir(f"/proc/{pid}/fd")))
    return min(seen)


def priv_fds_back_to(h: HiveProcess, fds: int) -> None:
    """No descriptor left behind: hive-priv holds at most ``fds`` again within 5 s."""
    wait_until(lambda: priv_fds(h) <= fds, 5, f"hive-priv's descriptors back to {fds} (now {priv_fds(h)})")


BAD_NAMES = ["../rtalice", "rtalice/../rtbob", ".", "..", "a/b", "/etc", "../../../../etc/passwd", "rt" + "a" * 30,
             "a" * 5000, "rt\u00e4lice", "rtalice\x00", "rtalice\n", "RTALICE", "", " rtalice", "rt\\alice"]
RESERVED = ["operator", "core", "hive", "all"]
NAME_VERBS: dict[str, dict[str, Any]] = {"prepare": {}, "start": {}, "stop": {"timeout": 0}, "destroy": {}}


def name_error(name: str, where: str = "name") -> str:
    if name in RESERVED:
        return f"field {where!r}: agent name {name!r} is reserved"
    return f"field {where!r}: bad agent name {name!r}: must match {NAME_RE.pattern}"


@pytest.mark.parametrize("verb", [*NAME_VERBS, "status", "limit_hits"])
def test_traversal_names_refused_to_the_core(rt: HiveProcess, world: World, verb: str) -> None:
    h = rt
    names = BAD_NAMES + RESERVED
    if verb in ("status", "limit_hits"):
        cases = [(repr(n), {"cmd": verb, "names": ["rtalice", n]}, 0) for n in names]
        want = {repr(n): refusal(name_error(n, "names.1")) for n in names}
    else:
        cases = [(repr(n), {"cmd": verb, "name": n, **NAME_VERBS[verb]}, 0) for n in names]
        want = {repr(n): refusal(name_error(n)) for n in names}
    fds = priv_fds(h)
    with unchanged(h):
        out = as_core(h, cases)
    assert out == want
    priv_fds_back_to(h, fds)


def test_exec_refused_to_the_core(rt: HiveProcess, world: World) -> None:
    """exec is root's (the operator's ``hive exec``): never the core's, whatever it sends."""
    h = rt
    procs = sorted(h.cage_procs("rtalice"))
    cases = [
        ("plain", {"cmd": "exec", "name": "rtalice", "argv": ["id"]}, 3),
        ("touch", {"cmd": "exec", "name": "rtalice", "argv": ["touch", "/home/agent/rt-core-was-here"]}, 3),
        ("env", {"cmd": "exec", "name": "rtalice", "argv": ["id"], "env": {"LD_PRELOAD": "/tmp/x.so"}}, 3),
        ("no fds", {"cmd": "exec", "name": "rtalice", "argv": ["id"]}, 0),
    ]
    with unchanged(h):
        out = as_core(h, cases)
    assert out == dict.fromkeys([c[0] for c in cases], refusal("permission denied: exec is not allowed for core"))
    assert not (h.home("rtalice") / "rt-core-was-here").exists()
    assert sorted(h.cage_procs("rtalice")) == procs


UNKNOWN_VERBS = ["shell", "sh", "rm", "chown", "chmod", "mount", "kill", "setuid", "spawn", "write", "write_file",
                 "exec_root", "Exec", "EXEC", "exec ", "status\u0000", "reload", "ids", "allocate"]


def test_unknown_verbs_refused_to_the_core(rt: HiveProcess, world: World) -> None:
    cases = [(v, {"cmd": v, "name": "rtalice", "argv": ["id"]}, 0) for v in UNKNOWN_VERBS]
    with unchanged(rt):
        out = as_core(rt, cases)
    assert out == {v: refusal(f"unknown command {v!r}") for v in UNKNOWN_VERBS}


EXTRA_FIELDS = [
    ("prepare", "path", "/etc"), ("prepare", "home", "/root"), ("prepare", "uid", 0), ("prepare", "gid", 0),
    ("start", "uid", 0), ("start", "argv", ["sh"]), ("start", "bind", ["/", "/host"]), ("start", "cap_add", ["ALL"]),
    ("start", "cgroup", "/sys/fs/cgroup"), ("stop", "signal", 9), ("stop", "pid", 1), ("destroy", "path", "/"),
    ("destroy", "recursive", True), ("status", "path", "/"), ("reload_gateway", "pid", 1),
    ("reload_gateway", "config", "/etc/nginx/nginx.conf"),
]


def test_extra_fields_refused_to_the_core(rt: HiveProcess, world: World) -> None:
    cases = []
    for verb, field, value in EXTRA_FIELDS:
        req: dict[str, Any] = {"cmd": verb, field: value}
        if verb not in ("status", "reload_gateway"):
            req["name"] = "rtalice"
        cases.append((f"{verb}.{field}", req, 0))
    with unchanged(rt):
        out = as_core(rt, cases)
    assert out == {f"{v}.{f}": refusal(f"unknown field {f!r}") for v, f, _ in EXTRA_FIELDS}


NUMBERS: list[tuple[str, dict[str, Any] | str, str]] = [
    ("memory huge", {"cmd": "start", "name": "rtalice", "memory_mib": 10**9},
     "field 'memory_mib': Input should be less than or equal to 16384"),
    ("memory tiny", {"cmd": "start", "name": "rtalice", "memory_mib": 1},
     "field 'memory_mib': Input should be greater than or equal to 32"),
    ("memory negative", {"cmd": "start", "name": "rtalice", "memory_mib": -512},
     "field 'memory_mib': Input should be greater than or equal to 32"),
    ("memory string", {"cmd": "start", "name": "rtalice", "memory_mib": "512"},
     "field 'memory_mib': Input should be a valid integer"),
    ("memory float", {"cmd": "start", "name": "rtalice", "memory_mib": 512.5},
     "field 'memory_mib': Input should be a valid integer"),
    ("pids huge", {"cmd": "start", "name": "rtalice", "pids_max": 10**6},
     "field 'pids_max': Input should be less than or equal to 8192"),
    ("pids zero", {"cmd": "start", "name": "rtalice", "pids_max": 0},
     "field 'pids_max': Input should be greater than or equal to 16"),
    ("pids bool", {"cmd": "start", "name": "rtalice", "pids_max": True},
     "field 'pids_max': Input should be a valid integer"),
    ("pids 2**64", '{"cmd": "start", "name": "rtalice", "pids_max": 18446744073709551616}\n',
     "malformed request: integer out of range (64-bit)"),
    ("pids 5000 digits", '{"cmd": "start", "name": "rtalice", "pids_max": ' + "9" * 5000 + "}\n",
     "malformed request: integer out of range (64-bit)"),
    ("timeout huge", {"cmd": "stop", "name": "rtalice", "timeout": 1e308},
     "field 'timeout': Input should be less than or equal to 60"),
    ("timeout negative", {"cmd": "stop", "name": "rtalice", "timeout": -1},
     "field 'timeout': Input should be greater than or equal to 0"),
    ("timeout inf", '{"cmd": "stop", "name": "rtalice", "timeout": 1e999}\n', "malformed request: number out of range"),
    ("timeout nan", '{"cmd": "stop", "name": "rtalice", "timeout": NaN}\n', "malformed JSON: NaN is not valid JSON"),
    ("status too many", {"cmd": "status", "names": ["rtalice"] * 10_001},
     "field 'names': List should have at most 10000 items after validation, not 10001"),
    ("limit_hits too many", {"cmd": "limit_hits", "names": ["rtalice"] * 10_001},
     "field 'names': List should have at most 10000 items after validation, not 10001"),
    ("limit_hits no names", {"cmd": "limit_hits"}, "missing field 'names'"),
]


def test_numbers_out_of_range_or_of_the_wrong_type_refused_to_the_core(rt: HiveProcess, world: World) -> None:
    cages = {n: rt.cgroup(n).pids() for n in ("rtalice",)}
    with unchanged(rt):
        out = as_core(rt, [(label, req, 0) for label, req, _ in NUMBERS])
    assert out == {label: refusal(text) for label, _, text in NUMBERS}
    assert {n: rt.cgroup(n).pids() for n in cages} == cages  # rtalice was neither stopped nor restarted


def test_file_descriptors_where_none_belong_refused_to_the_core(rt: HiveProcess, world: World) -> None:
    h = rt
    fds = priv_fds(h)
    cases = [
        ("status", {"cmd": "status"}, 3),
        ("limit_hits", {"cmd": "limit_hits", "names": ["rtalice"]}, 1),
        ("prepare", {"cmd": "prepare", "name": "rtalice"}, 1),
        ("stop", {"cmd": "stop", "name": "rtalice", "timeout": 0}, 2),
        ("reload_gateway", {"cmd": "reload_gateway"}, 3),
    ]
    with unchanged(h):
        out = as_core(h, cases)
    assert out == {
        "status": refusal("status takes 0 file descriptors, got 3"),
        "limit_hits": refusal("limit_hits takes 0 file descriptors, got 1"),
        "prepare": refusal("prepare takes 0 file descriptors, got 1"),
        "stop": refusal("stop takes 0 file descriptors, got 2"),
        "reload_gateway": refusal("reload_gateway takes 0 file descriptors, got 3"),
    }
    assert h.agent_status()["rtalice"]["running"]
    priv_fds_back_to(h, fds)


FD_FLOOD = r"""
import array, json, os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(sys.argv[1])
fd = os.open("/dev/null", os.O_RDONLY)
sent = 0
err = None
for i in range(int(sys.argv[2])):  # one byte and three descriptors at a time, never a newline
    try:
        s.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd, fd, fd]))])
        sent += 1
    except OSError as e:
        err = type(e).__name__
        break
line = s.makefile("rb").readline()
print(json.dumps({"sent": sent, "err": err, "reply": json.loads(line) if line else None}))
"""


def test_descriptor_flood_without_a_newline_refused_to_the_core(rt: HiveProcess, world: World) -> None:
    """Descriptors sent with a line that never ends used to pile up in hive-priv (root)
    until its descriptor table was full and nobody, root's ``hive exec`` included,
    could connect. Now more than three with one request end the connection."""
    h = rt
    fds = priv_fds(h)
    with unchanged(h):
        proc = subprocess.run([str(HIVE.parent / "python"), "-c", FD_FLOOD, str(h.priv_sock), "3000"],
                              capture_output=True, text=True, timeout=120,
                              **h.as_core())
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        # Still serving root, with its descriptor table as before.
        assert h.priv("status", names=["rtalice"])["cages"]["rtalice"]["running"] is True
    assert out["reply"] == refusal("more than 3 file descriptors with one request; closing connection")
    assert out["sent"] < 3000  # it hung up on the flood
    priv_fds_back_to(h, fds)


def test_oversized_line_refused_to_the_core(rt: HiveProcess, world: World) -> None:
    h = rt
    fds = priv_fds(h)
    line = json.dumps({"cmd": "status", "pad": "x" * (MAX_LINE + 10)}) + "\n"
    with unchanged(h):
        out = as_core(h, [("big", line, 0)])
    assert out == {"big": refusal(f"line exceeds {MAX_LINE} bytes")}
    priv_fds_back_to(h, fds)


@pytest.mark.parametrize("name", ["../rtalice", "rtalice/../rtbob", "/rtalice", "rtalice\nx", "RTALICE"])
def test_hive_exec_with_a_hostile_name_refused(rt: HiveProcess, world: World, name: str) -> None:
    """The operator's own ``hive exec`` (root): the name goes to hive-priv as a name,
    never as a path, and is refused there."""
    with unchanged(rt):
        proc = subprocess.run([str(HIVE), "--run-dir", str(rt.run_dir), "exec", name, "--", "id"],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == f"Error: {name_error(name)}"

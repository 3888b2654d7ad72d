"""Red team round 22: what the 21 rounds before did not try.

Broke (each case fails on the code it was written against; none fixed in this round):
a compromised hive-core against the OTHER hives on its host (every hive's core is the one
user ``hive-core`` with the groups ``hive-admin`` and ``hive-gateway``); the cage's root
(init) and the kernel's global sysctls (bwrap's read-only cover of ``/proc/sys`` is
skipped); the hive's host paths in what a cage reads (mountinfo, bwrap's cmdline); an
egress rule taken back while a tunnel it opened is still up; a bare LF or CR in a
plain-HTTP head carrying a second Host past the proxy's check; the harness's page
directory, the one host filesystem a cage writes outside its home, with no bound; an
unbound secret and a removed L7 rule still applied on a kept-alive terminated connection;
a write transaction of the core's for every refused egress request.

Held: the agent's text in the hive's log, the egress bridge's port against the runtime,
the agent's writes under /proc, agent verbs at the edges of their arguments.

See docs/security.md's rounds table (red team round 22).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import assert_ok
from hive_fixture import (
    HIVE,
    HiveProcess,
    proc_cmdline,
    proc_status,
    proc_uid,
    running_hive,
    wait_until,
)
from hyperhive.cage import layout
from hyperhive.config import EgressSection
from hyperhive.core.hive import EGRESS_LOG_BATCH
from testnet import TestNet

from .conftest import cage_run, changes, others_keep_working, unchanged
from .egress_kit import seen, serve_recorder
from .test_secrets_egress import cert_dir

VICTIM = "rtcarol"  # the shared hive's agent whose cage is looked at (read only)


# -- a compromised core against another hive on the same host --------------------------------

# Run with the credentials of another running hive's core (what `hive up` gave it, cli/up.py
# and cli/core_identity.py). What it reaches of a hive that is NOT its own.
CROSS = r"""
import json, os, socket, sqlite3, sys
host_sock, priv_sock, core_sock, state, core_pid = sys.argv[1:6]
out = {"uid": os.getuid(), "groups": sorted(os.getgroups())}
def call(path, req):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(15)
    try:
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        line = s.makefile("rb").readline()
        return json.loads(line) if line else None
    except OSError as e:
        return {"oserror": type(e).__name__}
    finally:
        s.close()
r = call(host_sock, {"cmd": "agent_status"})
out["host_sock"] = (r or {}).get("ok"), (r or {}).get("error"), sorted(a["name"] for a in (r or {}).get("agent_statuses", [])), (r or {}).get("oserror")
r = call(priv_sock, {"cmd": "status"})
out["priv_sock"] = (r or {}).get("ok"), (r or {}).get("error"), sorted((r or {}).get("cages", {})), (r or {}).get("oserror")
s = socket.socket(socket.AF_UNIX)  # the dashboard's HTTP, behind the gateway
try:
    s.connect(core_sock)
    s.sendall(b"GET /api/state HTTP/1.0\r\n\r\n")
    out["core_sock"] = s.recv(12).decode()
except OSError as e:
    out["core_sock"] = type(e).__name__
s.close()
try:
    with open(os.path.join(state, "operator.token"), "rb") as f:
        out["token_bytes"] = len(f.read().strip())
except OSError as e:
    out["token_bytes"] = type(e).__name__
try:
    db = sqlite3.connect(f"file:{os.path.join(state, 'hive.db')}?mode=ro", uri=True, timeout=5)
    out["db_agents"] = sorted(n for (n,) in db.execute("SELECT name FROM agents"))
    db.close()
except Exception as e:
    out["db_agents"] = type(e).__name__
for d in ("ca", "secrets"):  # the hive CA's key, every stored secret (hive-core's 0700 dirs)
    try:
        names = os.listdir(os.path.join(state, d))
        for n in names:
            with open(os.path.join(state, d, n), "rb") as f:
                f.read(1)
        out[d] = len(names)
    except OSError as e:
        out[d] = type(e).__name__
try:  # the other hive's core process itself (same uid; its secrets and CA key in memory)
    out["core_environ"] = len(open(f"/proc/{core_pid}/environ", "rb").read())
    with open(f"/proc/{core_pid}/maps") as f:
        out["core_maps"] = len(f.readlines())
except OSError as e:
    out["core_environ"] = type(e).__name__
print(json.dumps(out))
"""


def _as_another_hives_core(h: HiveProcess, other: HiveProcess) -> dict[str, Any]:
    """CROSS against ``h``, run exactly as ``other``'s core runs (its ids, its groups: read
    from its live process)."""
    pid = other.core_pid()
    assert pid is not None
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    gid = int(re.search(r"^Gid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    groups = [int(g) for g in re.search(r"^Groups:(.*)$", status, re.M).group(1).split()]  # type: ignore[union-attr]
    proc = subprocess.run(
        [str(HIVE.parent / "python"), "-I", "-c", CROSS, str(h.host_sock), str(h.priv_sock),
         str(h.run_dir / "core.sock"), str(h.state_dir), str(h.core_pid())],
        capture_output=True, text=True, timeout=60, user=uid, group=gid, extra_groups=groups, cwd="/",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    assert (out["uid"], out["groups"]) == (uid, sorted(groups)), out
    assert uid != h.core_ids[0]
    return out


@pytest.mark.attack(
    "privsep.core-misuse",
    ref="red team round 22: every hive's core was one user (cli/up.py extra_groups); OpenSSH privsep per-session users",
)
def test_a_compromised_core_does_not_own_the_other_hives_on_its_host(rt: HiveProcess) -> None:
    """**Broke (fixed).** Every hive on a host ran its core as the one user ``hive-core``,
    with the groups ``hive-admin`` (to give host.sock its group) and ``hive-gateway``. The
    compromised core of any OTHER hive on the host was the operator on this hive's
    host.sock (the kernel's ``SO_PEERGROUPS`` held hive-admin), hive-priv's core on its
    priv.sock (stop and destroy any of its cages), read its ``operator.token`` (the
    gateway's login), its ``hive.db``, its CA's key and its stored secrets, and reached the
    other core's own process (its /proc files). Now each hive's core runs under ids of its
    own with no supplementary group (cli/core_identity.py), and ``hive up`` binds host.sock
    and core.sock and hands them in. Checked with a second real hive's core credentials,
    read from its live process."""
    for d in ("ca", "secrets"):  # there to be reached (not a FileNotFoundError)
        assert (rt.state_dir / d).is_dir(), d
    assert (rt.state_dir / "operator.token").is_file() and (rt.state_dir / "hive.db").is_file()
    other = HiveProcess({"rt22other": {"runtime": "command", "command": ["sleep", "3600"]}})
    try:
        other.start()
        assert other.core_ids != rt.core_ids
        with unchanged(rt):
            out = _as_another_hives_core(rt, other)
    finally:
        other.stop_clean()
    print(f"as another hive's core: {out}")
    reached = [
        what
        for what, got in (
            ("host.sock as the operator", out["host_sock"][0] is not None),
            ("priv.sock as its core", out["priv_sock"][0] is not None),
            ("core.sock (the dashboard)", not out["core_sock"].endswith("Error")),
            ("operator.token", isinstance(out["token_bytes"], int)),
            ("hive.db", isinstance(out["db_agents"], list)),
            ("its core's /proc files", isinstance(out["core_environ"], int)),
            ("its CA directory (the key)", isinstance(out["ca"], int)),
            ("its secrets directory", isinstance(out["secrets"], int)),
        )
        if got
    ]
    assert reached == [], f"another hive's core reached: {reached} ({out})"
    # Refused by the kernel (the sockets' modes), not by a reply.
    assert out["host_sock"][3] == out["priv_sock"][3] == out["core_sock"] == "PermissionError", out


# -- the cage's root and the kernel's sysctls -------------------------------------------------

CAP_SETUID, CAP_SETGID, CAP_SETPCAP, CAP_KILL = 7, 6, 8, 5


def _init_pid(h: HiveProcess, name: str) -> int:
    """The cage's init on the host: uid 0 in the cage's cgroup, not bwrap."""
    found = [
        p
        for p in h.cage_procs(name)
        if proc_uid(p) == 0
        and not proc_cmdline(p)[0].endswith("bwrap")
        and "harness" not in proc_cmdline(p)[-1:]
    ]
    assert len(found) == 1, [(p, proc_cmdline(p)[:3]) for p in h.cage_procs(name)]
    return found[0]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _as_init(mask: int, paths: list[str]) -> dict[str, str]:
    """In a child: uid 0 with exactly ``mask`` as its capabilities (init's: no
    CAP_DAC_OVERRIDE, no CAP_SYS_ADMIN), open each path for writing and close it at once
    (nothing is written). The errno name for each, or "opened"."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest beyond this point
        try:
            os.close(r)
            libc = ctypes.CDLL(None, use_errno=True)
            hdr = _CapHeader(0x20080522, 0)
            data = (_CapData * 2)(
                _CapData(mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, 0),
                _CapData(mask >> 32, mask >> 32, 0),
            )
            if libc.capset(ctypes.byref(hdr), data) != 0:
                raise OSError(ctypes.get_errno(), "capset")
            out = {"CapEff": Path("/proc/self/status").read_text().split("CapEff:")[1].split()[0]}
            for p in paths:
                try:
                    os.close(os.open(p, os.O_WRONLY))
                    out[p] = "opened"
                except OSError as e:
                    out[p] = __import__("errno").errorcode.get(e.errno or 0, str(e))
            os.write(w, json.dumps(out).encode())
        except BaseException as e:
            os.write(w, json.dumps({"error": repr(e)}).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        raw = f.read()
    os.waitpid(pid, 0)
    result: dict[str, str] = json.loads(raw)
    assert "error" not in result, result
    return result


SYSCTLS = [
    "../sysrq-trigger",  # where the kernel has it (CONFIG_MAGIC_SYSRQ)
    "kernel/core_pattern",
    "kernel/modprobe",
    "vm/drop_caches",
    "fs/file-max",
    "kernel/sysrq",
]


@pytest.mark.attack(
    "init.capabilities",
    ref="red team round 22: bwrap --proc skips covering /proc/sys (access(W_OK) is EACCES on its root); runc/LXC mount /proc/sys read-only",
)
def test_the_cages_root_cannot_write_the_hosts_sysctls(rt: HiveProcess) -> None:
    """**Broke, fixed** (priv/cages.py ``PROC_READ_ONLY``: /proc/sys, /proc/sysrq-trigger,
    /proc/fs, /proc/irq and /proc/bus read-only binds over the cage's proc, runc's set).
    bwrap covers ``/proc/sys`` read-only only if ``access(W_OK)``
    on it succeeds, and the kernel answers EACCES for the root of /proc/sys whatever the
    caller, so bwrap 0.8 leaves it as it is: in every cage ``/proc/sys`` is the kernel's,
    writable by euid 0 (sysctl files check the mode, not a capability). The cage's init is
    host uid 0: with exactly init's capabilities (no DAC_OVERRIDE, no SYS_ADMIN) a process
    opens ``kernel/core_pattern`` (a program the kernel runs as host root at the next crash),
    ``kernel/modprobe``, ``vm/drop_caches`` for writing. Init runs no agent code, so this is
    one bug in init (or a way into it) from the host: /proc/sys must be read-only in a cage."""
    init = _init_pid(rt, VICTIM)
    eff = int(proc_status(init)["CapEff"], 16)
    assert eff == (1 << CAP_SETUID) | (1 << CAP_SETGID) | (1 << CAP_SETPCAP) | (1 << CAP_KILL), hex(
        eff
    )
    mounts = [ln.split()[4] for ln in Path(f"/proc/{init}/mountinfo").read_text().splitlines()]
    paths = [f"/proc/{init}/root/proc/sys/{s}" for s in SYSCTLS]
    got = _as_init(eff, paths)
    print(
        f"init {init} CapEff {eff:#x}; /proc mounts in the cage: "
        f"{[m for m in mounts if m.startswith('/proc')]}; as init: {got}"
    )
    opened = [p.split("/proc/sys/")[1] for p in paths if got[p] == "opened"]
    assert opened == [], f"the cage's root may write the host's sysctls: {opened}"
    assert "/proc/sys" in mounts, "no read-only cover of /proc/sys in the cage"


AGENT_SYSCTLS = r"""
import errno
out = {}
for p in ["/proc/sys/kernel/ns_last_pid", "/proc/sys/kernel/core_pattern", "/proc/sys/vm/drop_caches",
          "/proc/sysrq-trigger", "/proc/sys/kernel/hostname", "/proc/sys/net/ipv4/ip_forward",
          "/proc/sys/net/core/somaxconn", "/proc/self/oom_score_adj", "/proc/1/oom_score_adj",
          "/proc/self/setgroups", "/proc/self/uid_map", "/proc/self/timens_offsets"]:
    try:
        with open(p, "w") as f:
            f.write("1\n" if "ns_last_pid" not in p else "300\n")
        out[p] = "written"
    except OSError as e:
        out[p] = errno.errorcode.get(e.errno, str(e))
result(**out)
"""


@pytest.mark.attack(
    "kernel.syscall-surface",
    ref="red team round 22: writable-looking /proc/sys entries from the agent (ns_last_pid is 0666)",
)
def test_the_agent_writes_no_sysctl_and_no_other_processs_proc(rt: HiveProcess) -> None:
    """As the agent: ``ns_last_pid`` (mode 0666: its pid namespace's, needs CAP_SYS_ADMIN
    over it), global and per-namespace sysctls, sysrq, init's ``oom_score_adj``, its own
    uid map: refused each. Its own ``oom_score_adj`` may be raised (its own processes,
    never below the cage's floor)."""
    with unchanged(rt):
        out = cage_run(rt, VICTIM, AGENT_SYSCTLS)
    print(out)
    written = sorted(p for p, v in out.items() if v == "written")
    assert written == ["/proc/self/oom_score_adj"], out
    # EROFS since this round's fix (the cage's /proc/sys is a read-only bind); EPERM or
    # EACCES before it.
    assert out["/proc/sys/kernel/ns_last_pid"] in ("EPERM", "EACCES", "EROFS"), out


# -- what a cage reads of the host's paths ------------------------------------------------------

LEAKS = r"""
import os
texts = {"mountinfo": open("/proc/self/mountinfo").read()}
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for what in ("cmdline", "environ", "cgroup"):
            try:
                texts[f"{pid}/{what}"] = open(f"/proc/{pid}/{what}", "rb").read().decode("latin-1")
            except OSError:
                pass
texts["mounts"] = open("/proc/self/mounts").read()
needles = P["needles"]
result(found={k: [n for n in needles if n in v] for k, v in texts.items() if any(n in v for n in needles)},
       read=sorted(texts))
"""


def _host_paths_read(rt: HiveProcess) -> dict[str, list[str]]:
    needles = [str(rt.base), str(rt.run_dir), str(rt.state_dir)]
    with unchanged(rt):
        out = cage_run(rt, VICTIM, LEAKS, needles=needles)
    print(f"read {len(out['read'])} texts; host paths found: {out['found']}")
    found: dict[str, list[str]] = out["found"]
    return found


@pytest.mark.attack(
    "observe.host-activity",
    ref="red team round 22: bwrap's cmdline (the cage's pid 1) names the run and state dirs",
)
def test_the_cage_reads_no_host_path_of_the_hive(rt: HiveProcess) -> None:
    """**Broke (fixed in session 16), low.** The cage's pid 1 is bwrap, and its cmdline
    (``--ro-bind …/state/priv/etc-view /etc``, ``--dev-bind …/pts-view``, …) named the
    hive's state dir. Now bwrap takes its options from a memfd (``--args``): its cmdline
    is ``bwrap --args N -- <init>``. Nothing a cage reads but mountinfo (next case: every
    process's cmdline, environ and cgroup it may read) may name the hive's base, run or
    state dir."""
    found = _host_paths_read(rt)
    found.pop("mountinfo", None)
    assert found == {}, found


MOUNTINFO = r"""
lines = open("/proc/self/mountinfo").read().splitlines()
result(run_hive=[ln for ln in lines if ln.split()[4] == "/run/hive"])
"""


@pytest.mark.attack(
    "observe.host-activity",
    ref="red team round 22: the run dir's host path in the cage's mountinfo (root field of a bind)",
)
def test_the_cages_mountinfo_names_no_host_path_of_the_hive(rt: HiveProcess) -> None:
    """**Broke (fixed in session 17), low.** A bind's root field in mountinfo is its
    directory's path within its filesystem: the cage's ``/run/hive`` line named the
    hive's run directory (``/tmp/hv…/run/agents/NAME`` here; ``/hive/agents/NAME`` on the
    default ``/run`` tmpfs). ``run/agents`` is now a tmpfs of its own while the hive runs
    (cli/agents_fs.py; systemd: run-hive-agents.mount), so the root field is ``/NAME``."""
    assert "mountinfo" not in _host_paths_read(rt)
    with unchanged(rt):
        line = cage_run(rt, VICTIM, MOUNTINFO)["run_hive"]
    print(line)
    assert len(line) == 1 and line[0].split()[3] == f"/{VICTIM}", line
    assert " - tmpfs hive-agents " in line[0], line


# -- the egress bridge's port -----------------------------------------------------------------

SQUAT = r"""
import errno
out = {}
def try_bind(label, family, addr, reuseport):
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(addr)
        s.listen(8)
        out[label] = "bound"
        return s
    except OSError as e:
        out[label] = errno.errorcode.get(e.errno, str(e))
        s.close()
held = []
port = P["port"]
for label, fam, addr in [("127.0.0.1", socket.AF_INET, ("127.0.0.1", port)),
                         ("0.0.0.0", socket.AF_INET, ("0.0.0.0", port)),
                         ("127.0.0.2", socket.AF_INET, ("127.0.0.2", port)),
                         ("[::]", socket.AF_INET6, ("::", port)),
                         ("[::ffff:127.0.0.1]", socket.AF_INET6, ("::ffff:127.0.0.1", port))]:
    for reuseport in (False, True):
        s = try_bind(f"{label} reuseport={reuseport}", fam, addr, reuseport)
        if s is not None:
            held.append(s)
# With whatever it holds, a client of the proxy URL (as the operator's `hive exec` commands
# and the runtime's tools connect) must still reach the hive's proxy: its 403 for a name no
# rule allows, never the squatter's accept.
answers = []
for _ in range(8):
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    c.sendall(b"CONNECT r22-squat.invalid:443 HTTP/1.1\r\nHost: r22-squat.invalid:443\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = c.recv(4096)
        if not chunk:
            break
        head += chunk
    answers.append(head.split(b"\r\n")[0].decode())
    c.close()
stolen = 0
for s in held:
    s.setblocking(False)
    try:
        while True:
            s.accept()[0].close()
            stolen += 1
    except OSError:
        pass
result(binds=out, answers=sorted(set(answers)), stolen=stolen)
"""


@pytest.mark.attack(
    "reach.other-surfaces",
    ref="red team round 22: a runtime squatting the bridge's 127.0.0.1:3128 (SO_REUSEPORT, wildcard, v4-mapped)",
)
def test_the_runtime_cannot_take_the_egress_bridges_port(rt: HiveProcess) -> None:
    """The harness (another uid) listens on the cage's 127.0.0.1:3128; the runtime binds
    the same port by every form (SO_REUSEADDR, SO_REUSEPORT, the wildcard, ``[::]``
    dual-stack, the v4-mapped address, another loopback address). None may take a
    connection meant for the proxy: all 8 clients get the hive's own 403."""
    out = cage_run(rt, VICTIM, SQUAT, port=layout.EGRESS_PORT)
    print(out)
    squatting = {
        k: v
        for k, v in out["binds"].items()
        if v == "bound" and not k.startswith(("127.0.0.2", "[::] "))
    }
    assert squatting == {}, out["binds"]
    assert out["stolen"] == 0 and out["answers"] == ["HTTP/1.1 403 Forbidden"], out


# -- the agent's text in the hive's own log ---------------------------------------------------

MARK = "R22FORGED"
EVIL = f"\x1b]52;c;cjIy\x07\x1b[2J\x1b[1A\r\n2026-12-04 00:00:00 hive-priv: {MARK} root: ok\u2028\x85{MARK}2\x00"
LOGGED = r"""
evil = P["evil"]
replies = {}
replies["set_status"] = call({"cmd": "set_status", "text": evil})
replies["send"] = call({"cmd": "send", "to": "operator", "body": evil})
replies["unknown"] = call({"cmd": evil})
replies["field"] = call({"cmd": "whoami", evil: 1})
replies["to"] = call({"cmd": "send", "to": evil, "body": "x"})
replies["remind"] = call({"cmd": "remind", "text": evil, "at": "not a time " + evil})
replies["approval"] = call({"cmd": "request_approval", "kind": "custom", "description": evil, "payload": {evil: evil}})
c = Conn()
c.send(evil.encode("utf-8", "surrogatepass") + b"\n")
replies["raw"] = c.line()
c.close()
# The egress proxy: a request line, a CONNECT target and a Host header holding the text
# (ASCII only there: the proxy refuses anything else as a malformed request line).
ascii_evil = evil.encode("ascii", "ignore")
heads = [b"CONNECT " + ascii_evil.replace(b" ", b"") + b":443 HTTP/1.1\r\n\r\n",
         b"GET http://r22.invalid/ HTTP/1.1\r\nHost: " + ascii_evil.replace(b"\r\n", b"") + b"\r\n\r\n",
         b"GET http://r22.invalid/" + ascii_evil.replace(b" ", b"").replace(b"\r\n", b"") + b" HTTP/1.1\r\n\r\n",
         ascii_evil + b"\r\n\r\n"]
egress = []
for head in heads:
    s = socket.create_connection(("127.0.0.1", P["port"]), timeout=15)
    s.sendall(head)
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    egress.append(got.split(b"\r\n")[0].decode("latin-1"))
    s.close()
result(replies={k: (v or {}).get("error", (v or {}).get("ok")) for k, v in replies.items()}, egress=egress,
       approval=(replies["approval"] or {}).get("id"))
"""


@pytest.mark.attack(
    "surface.terminal-injection",
    ref="red team round 22: agent text in hive-core's log (the operator's tail -f / journalctl); CWE-117 log injection",
)
def test_agent_text_reaches_the_hives_log_only_escaped(rt: HiveProcess) -> None:
    """From its cage rtmallory puts OSC 52, a screen erase, a cursor move, CR LF with a
    forged hive-priv line, U+2028, NEL and NUL into every verb that may log it (status,
    a message to the operator, an unknown verb, an unknown field, a bad name, a bad time,
    an approval kind), a raw line, and four egress requests (CONNECT target, Host header,
    path, a request line of its own). The hive's log (what ``hive up`` writes and the
    operator tails) gets none of it raw: no ESC, no line starting with the forgery."""
    before = rt.log_path.stat().st_size
    with changes(rt):
        out = cage_run(rt, "rtmallory", LOGGED, evil=EVIL, port=layout.EGRESS_PORT)
    time.sleep(1.0)  # the core's log lines are written from its loop
    with open(rt.log_path, "rb") as f:
        f.seek(before)
        new = f.read()
    lines = new.split(b"\n")
    raw_escape = [ln[:200] for ln in lines if b"\x1b" in ln or b"\x07" in ln]
    forged = [
        ln[:200]
        for ln in lines
        if ln.lstrip(b"\r").startswith(b"2026-12-04 00:00:00") or ln.startswith(MARK.encode())
    ]
    print(
        f"replies {out['replies']}; egress {out['egress']}; {len(lines)} new log lines, "
        f"{new.count(MARK.encode())} quoting the mark"
    )
    assert raw_escape == [], raw_escape
    assert forged == [], forged
    assert all(s.startswith("HTTP/1.1 4") for s in out["egress"]), out["egress"]
    assert out["approval"], out
    assert rt.host_call("deny", id=out["approval"], note="r22: the log case's own request")["ok"]


# -- agent verbs at the edges of their arguments -------------------------------------------

EDGES = r"""
cases = {
    "recv wait 1e308": {"cmd": "recv", "wait": 1e308},
    "recv wait -1": {"cmd": "recv", "wait": -1},
    "recv wait 2**63": {"cmd": "recv", "wait": 2**63},
    "recv max 0": {"cmd": "recv", "max": 0},
    "recv max -1": {"cmd": "recv", "max": -1},
    "recv max 2**31": {"cmd": "recv", "max": 2**31},
    "recv ack 10001 ids": {"cmd": "recv", "ack": list(range(1, 10002))},
    "ack 100000 ids": {"cmd": "ack", "ids": list(range(1, 100001))},
    "remind at 9999-12-31": {"cmd": "remind", "text": "r22", "at": "9999-12-31T23:59:59.999999Z"},
    "remind at 10000-01-01": {"cmd": "remind", "text": "r22", "at": "10000-01-01T00:00:00Z"},
    "remind at 253402300800": {"cmd": "remind", "text": "r22", "at": 253402300800},
    "remind at -0.0": {"cmd": "remind", "text": "r22", "at": -0.0},
    "remind in 1e308": {"cmd": "remind", "text": "r22", "in": 1e308},
    "ask 100000 options": {"cmd": "ask", "to": "operator", "question": "q", "options": ["o"] * 100000},
    "ask option of 300000": {"cmd": "ask", "to": "operator", "question": "q", "options": ["o" * 300000]},
    "set_status 65537": {"cmd": "set_status", "text": "s" * 65537},
    "whoami with 10000 extra keys": dict({"cmd": "whoami"}, **{f"k{i}": i for i in range(10000)}),
    "send to operator 262145": {"cmd": "send", "to": "operator", "body": "b" * 262145},
}
out = {}
for label, req in cases.items():
    t0 = time.monotonic()
    try:
        reply = call(req)
    except OSError as e:
        reply = {"oserror": errname(e)}
    took = time.monotonic() - t0
    if reply is None:
        out[label] = ("hung up", round(took, 2))
    elif reply.get("ok") is False:
        out[label] = ("refused", reply["error"][:160], round(took, 2))
    else:
        out[label] = ("ok", sorted(reply)[:8], round(took, 2))
out["after"] = call({"cmd": "whoami"})
result(**out)
"""


@pytest.mark.attack(
    "wire.malformed",
    ref="red team round 22: agent verbs at their arguments' edges (waits, counts, times, list sizes)",
)
def test_agent_verbs_at_the_edges_of_their_arguments(rt: HiveProcess) -> None:
    """From rtmule's cage: waits of 1e308, -1 and 2^63, counts of 0, -1 and 2^31, 10,001 and
    100,000 ids to ack, reminders at the last instant of 9999 and just past it, ``in`` 1e308,
    100,000 options, an option of 300,000 characters, a status and a body one past their
    limits, 10,000 unknown keys. Each is refused in one line or answered (a bounded wait),
    none is an internal error or a hang-up, each within 5 s, and the agent is served after."""
    with changes(rt) as ch:
        out = cage_run(rt, "rtmule", EDGES, timeout=120)
    after = out.pop("after")
    for label, got in sorted(out.items()):
        print(f"{label}: {got}")
    print(f"rows added: {ch.count()}")
    assert after == {"version": 1, "ok": True, "name": "rtmule"}, after
    bad = {
        k: v
        for k, v in out.items()
        if v[0] == "hung up" or "internal" in str(v[1]).lower() or v[-1] > 5
    }
    assert bad == {}, bad
    # Only what was accepted is stored: the reminder at -0.0 (due at once: maybe already
    # delivered to rtmule's own inbox), nothing else.
    assert [k for k, v in out.items() if v[0] == "ok"] == ["remind at -0.0"], out
    assert set(ch.count()) <= {"reminders", "messages"} and ch.count()["reminders"][0] == 1, (
        ch.count()
    )
    # (rtmule's harness takes that reminder as a turn of its own, as any message.)


# -- a rule taken back while a tunnel it opened is still up ----------------------------------

REVOKE_NET = TestNet(122, prefix="hvr22")
REVOKE_ADDR = REVOKE_NET.address(2)
REVOKE_RULE = f"{REVOKE_ADDR}:80"
GO = "r22-go"

HELD_TUNNEL = r"""
import os
addr, go = P["addr"], "/home/agent/" + P["go"]
def head(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data, b""
        data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    return top, rest
def answer(s, path):
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n".encode())
    top, rest = head(s)
    n = int([l.split(b":")[1] for l in top.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(rest) < n:
        rest += s.recv(65536)
    return top.split(b"\r\n")[0].decode(), rest.decode()
t = socket.create_connection(("127.0.0.1", 3128), timeout=20)
t.sendall(f"CONNECT {addr}:80 HTTP/1.1\r\n\r\n".encode())
opened = head(t)[0].split(b"\r\n")[0].decode()
first = answer(t, "/r22-before")
deadline = time.monotonic() + 30
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.05)
took = {"go": os.path.exists(go)}
try:
    second = answer(t, "/r22-after-rm")
except (OSError, IndexError, ValueError) as e:
    second = ("cut", errname(e) if isinstance(e, OSError) else type(e).__name__)
n = socket.create_connection(("127.0.0.1", 3128), timeout=20)
n.sendall(f"CONNECT {addr}:80 HTTP/1.1\r\n\r\n".encode())
fresh = head(n)[0].split(b"\r\n")[0].decode()
result(opened=opened, first=first, second=second, fresh=fresh, **took)
"""


@pytest.fixture(scope="module")
def revoke_net() -> Iterator[TestNet]:
    with REVOKE_NET as net:
        serve_recorder(net, REVOKE_ADDR, 80)
        yield net


@pytest.mark.attack(
    "egress.l7-bypass",
    ref="red team round 22: `hive egress rm` against a tunnel opened under the rule (no idle timeout)",
)
def test_a_rule_taken_back_ends_what_it_let_through(rt: HiveProcess, revoke_net: TestNet) -> None:
    """**Broke, fixed** (Hive.reload_egress asks the proxy to ``revalidate`` the agent: its
    open connections that the rules no longer allow are shut down, both sockets).
    README: ``hive egress allow`` is live at once and ``hive egress rm`` takes it back.
    An agent opens a CONNECT tunnel under an operator's rule and keeps it; the operator
    removes the rule (the agent's exfiltration seen, say). A new connection is refused; the
    open tunnel must not carry the agent's next request either (it has no idle timeout:
    held, it would outlive the rule for as long as the agent likes)."""
    assert_ok(rt.host_call("egress_allow", name=VICTIM, rule=REVOKE_RULE))
    holder: dict[str, Any] = {}
    go = rt.home(VICTIM) / GO

    def run() -> None:
        try:
            holder.update(cage_run(rt, VICTIM, HELD_TUNNEL, addr=REVOKE_ADDR, go=GO, timeout=60))
        except BaseException as e:  # shown below
            holder["error"] = repr(e)[:2000]

    t = threading.Thread(target=run)
    try:
        t.start()
        first: list[dict[str, Any]] = []
        wait_until(
            lambda: any(
                r["path"] == "/r22-before" for r in first.extend(seen(REVOKE_ADDR)) or first
            ),
            30,
            "the tunnel's first request",
        )
    finally:
        assert_ok(rt.host_call("egress_remove", name=VICTIM, rule=REVOKE_RULE))
        go.write_text("go")
        t.join(60)
        with contextlib.suppress(OSError):
            go.unlink()
    after = seen(REVOKE_ADDR)
    print(f"in the cage: {holder}; the server saw after the rule was removed: {after}")
    assert "error" not in holder, holder["error"]
    assert (
        holder["opened"].startswith("HTTP/1.1 200") and holder["first"][0] == "HTTP/1.1 200 OK"
    ), holder
    assert holder["fresh"] == "HTTP/1.1 403 Forbidden", holder
    assert [s["path"] for s in after] == [], f"the removed rule's tunnel still carried {after}"


# -- a bare LF in a plain-HTTP head: a second Host past the proxy's check -------------------

SMUGGLE = r"""
out = {}
for key, head in P["heads"].items():
    s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    s.sendall(head.encode("latin-1"))
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    out[key] = data.split(b"\r\n")[0].decode("latin-1")
result(**out)
"""
BARE = {
    "lf-in-a-header-value": "GET http://{a}/r22-lf1 HTTP/1.1\r\nHost: {a}\r\nX-A: 1\nHost: evil.r22.test\r\n\r\n",
    "lf-in-the-version": "GET http://{a}/r22-lf2 HTTP/1.1\nHost:\tevil.r22.test\r\nHost: {a}\r\n\r\n",
    "cr-in-a-header-value": "GET http://{a}/r22-cr1 HTTP/1.1\r\nHost: {a}\r\nX-A: 1\rHost: evil.r22.test\r\n\r\n",
    "lf-in-the-method": "GET\nHost:\tevil.r22.test\nX: http://{a}/r22-lf3 HTTP/1.1\r\n\r\n",
}


@pytest.mark.attack(
    "egress.host-header",
    ref="red team round 22: bare LF/CR in a plain-HTTP head (RFC 9112 2.2); the TLS path refuses them, the plain path did not",
)
def test_a_bare_line_feed_smuggles_no_host_past_the_proxy(
    rt: HiveProcess, revoke_net: TestNet
) -> None:
    """**Broke, fixed** (core/egress.py ``parse_request``: a bare CR or LF anywhere in the
    head, a method that is no token, a version other than HTTP/1.0 or 1.1, or a control
    character in a header value is a 400). The proxy forwards a plain-HTTP request with
    exactly one Host, the destination it checked; a client Host naming anything else is a 403. Its reader splits the head on
    CRLF only, and a header value (or the request line's version) may hold a bare LF or CR:
    forwarded as they are, a server that ends lines at LF alone (Python's http.server here,
    nginx, most others) reads a second Host of the agent's choosing, first in the case of
    the version. Each must be refused (the TLS-terminating path already answers 400), and
    the server must see no request with a Host other than the destination."""
    heads = {k: v.format(a=REVOKE_ADDR) for k, v in BARE.items()}
    assert_ok(rt.host_call("egress_allow", name=VICTIM, rule=REVOKE_RULE))
    try:
        seen(REVOKE_ADDR)  # forget what came before
        out = cage_run(rt, VICTIM, SMUGGLE, heads=heads)
        got = seen(REVOKE_ADDR)
    finally:
        assert_ok(rt.host_call("egress_remove", name=VICTIM, rule=REVOKE_RULE))
    print(f"answers {out}; the server saw {got}")
    smuggled = [r for r in got if [h.strip() for h in r["host"]] != [REVOKE_ADDR]]
    assert smuggled == [], f"Host headers past the proxy's check: {smuggled}"
    assert all(v.startswith("HTTP/1.1 400") for v in out.values()), out


# -- the harness's page directory: the one host filesystem a cage writes outside its home -----

FILL = r"""
import errno, os, sys
path, cap = sys.argv[1], int(sys.argv[2])
chunk, written, why = b"\0" * (1 << 20), 0, "cap"
try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while written < cap:
            written += os.write(fd, chunk)
        files = 0
        while files < 2000:  # and inodes: empty files beside it
            os.close(os.open(f"{path}.{files}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            files += 1
        os.fsync(fd)
    finally:
        os.close(fd)
except OSError as e:
    why = errno.errorcode.get(e.errno, str(e))
    files = -1
print(written, files, why)
"""


@pytest.mark.attack(
    "budget.disk-quota",
    ref="red team round 22: run/ui/NAME is bound read-write into the cage for the harness; round 17's compromised harness",
)
def test_the_harness_cannot_fill_the_run_dirs_filesystem(rt: HiveProcess) -> None:
    """**Broke (fixed in session 16).** The cage's ``/run/hive-ui`` was the host's
    ``run/ui/NAME`` bound read-write (the harness bound web.sock there): the one host
    filesystem a cage wrote outside its home image, with no quota, and on a disk (a
    ``--run-dir`` under /tmp, as the README's) not charged to the cage's memory either
    (32 MiB and 2,000 files went in). Now hive-priv binds web.sock itself (root and the
    gateway's group, 0660, in a directory root:hive-gateway 0750) and hands the listener
    to init, which keeps it for each harness: nothing of the run dir is writable in the
    cage. As the harness's uid inside the cage (round 17's compromised harness), every
    place under ``/run`` it might write: at most a small bound, nothing on the host."""
    name = VICTIM
    harness = rt.harness_pid(name)
    row = rt.cage(name)
    cap = 32 << 20
    ui = rt.run_dir / "ui" / name
    st = ui.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o750), (st.st_uid, oct(st.st_mode))
    before = sorted(p.name for p in ui.iterdir())
    results = {}
    try:
        for target in ("/run/hive-ui/r22-fill", "/run/r22-fill", "/run/hive/r22-fill"):
            proc = subprocess.run(
                ["nsenter", f"--target={harness}", "--mount", "--",
                 "setpriv", f"--reuid={row['harness_uid']}", f"--regid={row['gid']}", "--clear-groups",
                 "--", "/usr/bin/python3", "-I", "-c", FILL, target, str(cap)],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            written, files, why = proc.stdout.split()
            results[target] = (int(written), int(files), why)
        after = sorted(p.name for p in ui.iterdir())
    finally:
        for p in ui.glob("r22-fill*"):
            p.unlink()
    print(f"as the harness uid in {name}'s cage: {results}; {ui} before {before}, after {after}")
    assert after == before == ["web.sock"], (before, after)
    for target, (written, files, why) in results.items():
        assert written < (1 << 20) and files < 100, (target, written, files, why)
    # The page is still served: through the handed-in listener.
    assert (ui / "web.sock").is_socket() and (ui / "web.sock").stat().st_uid == 0


# -- an unbound secret and a removed L7 rule on a kept-alive terminated connection ----------

TLS_AGENT = "r22tls"
TLS_NET = TestNet(123, prefix="hvr22t")
TLS_ADDR = TLS_NET.address(2)
TLS_HOSTS = {"l7.r22.test": TLS_ADDR, "echo.r22.test": TLS_ADDR}
L7_RULE = "GET l7.r22.test:443/ok/*"
KEY = "sk-live-R22-" + "k3y" * 10
# Records each request's method, path and Authorization header, keeps connections alive.
TLS_SERVER = r"""
import json, ssl, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
ADDR, CERT, SEEN = sys.argv[1], sys.argv[2], sys.argv[3]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        with open(SEEN, "a") as f:
            f.write(json.dumps({"path": self.path, "host": self.headers.get("Host"),
                                "auth": self.headers.get("Authorization")}) + "\n")
        body = f"did {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer.daemon_threads = True
srv = ThreadingHTTPServer((ADDR, 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(CERT)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"""
KEPT = r"""
import os, ssl
go = "/home/agent/" + P["go"]
def opened(host):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    ctx = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem")
    return ctx.wrap_socket(s, server_hostname=host)
def ask(t, host, path, auth=None):
    t.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\n" + (f"Authorization: Bearer {auth}\r\n" if auth else "")
               + "\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = t.recv(65536)
        if not chunk:
            return "closed"
        data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    n = int([l.split(b":")[1] for l in top.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(rest) < n:
        rest += t.recv(65536)
    return top.split(b"\r\n")[0].decode() + " " + rest.decode(errors="replace")[:120]
out = {}
l7, echo = opened("l7.r22.test"), opened("echo.r22.test")
out["l7-before"] = ask(l7, "l7.r22.test", "/ok/before")
out["echo-before"] = ask(echo, "echo.r22.test", "/echo/before", P["placeholder"])
deadline = time.monotonic() + 30
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.05)
for key, fn in (("l7-after", lambda: ask(l7, "l7.r22.test", "/ok/after-rm")),
                ("echo-after", lambda: ask(echo, "echo.r22.test", "/echo/after-unbind", P["placeholder"]))):
    try:
        out[key] = fn()
    except (OSError, ssl.SSLError, IndexError) as e:
        out[key] = "cut: " + type(e).__name__
result(**out)
"""


@pytest.fixture(scope="module")
def tls_hive() -> Iterator[tuple[HiveProcess, Path]]:
    with (
        cert_dir("hvr22", "round22 upstream CA", "round22 server", list(TLS_HOSTS)) as (d, _),
        TLS_NET as n,
    ):
        n.serve(TLS_ADDR, 443, [sys.executable, "-c", TLS_SERVER, TLS_ADDR, str(d / "server.pem"),
                                str(d / "seen.jsonl")])  # fmt: skip
        h = HiveProcess({TLS_AGENT: {"runtime": "command", "command": ["true"]}},
                        sections={"egress": {"hosts": TLS_HOSTS, "upstream_ca": str(d / "ca.pem")}})  # fmt: skip
        for hv in running_hive(h):
            yield hv, d


@pytest.mark.attack(
    "secrets.placeholder-elsewhere",
    ref="red team round 22: secret_unbind / egress rm against a kept-alive terminated connection (Plan is a snapshot)",
)
def test_an_unbound_secret_and_a_removed_l7_rule_end_on_open_connections(
    tls_hive: tuple[HiveProcess, Path],
) -> None:
    """**Broke, fixed** (egress_tls.Terminated asks ``replan`` before each request: the
    plan as the rules and bindings make it now, or the connection ends with a 403 if it
    would not be made now). The proxy decided a terminated connection's plan once, at its
    CONNECT: the L7 rules each request is checked against and the bindings it injects. The
    agent keeps a connection alive under an L7 rule and another to a bound destination;
    the operator removes the rule and unbinds the secret. The next request on each must be
    refused, or at least carry no key: before, the removed rule still allowed its path and
    the server got the operator's real key after the unbind, for as long as the agent keeps
    the connection alive."""
    h, d = tls_hive
    assert_ok(
        h.host_call("egress_allow", name=TLS_AGENT, rule=f"{TLS_ADDR}:443")
    )  # the private address at all
    assert_ok(h.host_call("egress_allow", name=TLS_AGENT, rule=L7_RULE))
    assert_ok(h.host_call("egress_allow", name=TLS_AGENT, rule="echo.r22.test:443"))
    assert_ok(h.host_call("secret_set", name="r22", value=KEY))
    assert_ok(h.host_call("secret_bind", name="r22", agents=[TLS_AGENT], to="echo.r22.test:443",
                          header="authorization: Bearer {}", env="R22_TOKEN"))  # fmt: skip
    env = assert_ok(h.host_call("agent_env", name=TLS_AGENT))
    placeholder = json.dumps(env).split("hive-placeholder-")[1].split('"')[0]
    placeholder = "hive-placeholder-" + placeholder
    go = h.home(TLS_AGENT) / GO
    holder: dict[str, Any] = {}

    def run() -> None:
        try:
            holder.update(cage_run(h, TLS_AGENT, KEPT, go=GO, placeholder=placeholder, timeout=60))
        except BaseException as e:  # shown below
            holder["error"] = repr(e)[:2000]

    seen_file = d / "seen.jsonl"

    def seen_tls() -> list[dict[str, Any]]:
        return (
            [json.loads(x) for x in seen_file.read_text().splitlines()]
            if seen_file.exists()
            else []
        )

    t = threading.Thread(target=run)
    try:
        t.start()
        wait_until(lambda: {"/ok/before", "/echo/before"} <= {r["path"] for r in seen_tls()}, 30,
                   "both first requests")  # fmt: skip
    finally:
        assert_ok(h.host_call("egress_remove", name=TLS_AGENT, rule=L7_RULE))
        assert_ok(h.host_call("secret_unbind", name="r22", agents=[TLS_AGENT]))
        go.write_text("go")
        t.join(60)
    got = seen_tls()
    print(f"in the cage: {holder}; the server saw: {got}")
    assert "error" not in holder, holder["error"]
    before = {r["path"]: r for r in got}
    assert before["/echo/before"]["auth"] == f"Bearer {KEY}", got  # the binding worked at first
    late = [r for r in got if r["path"] in ("/ok/after-rm", "/echo/after-unbind")]
    leaked = [r for r in late if r["auth"] and KEY in r["auth"]]
    assert leaked == [], f"the key went out after the unbind: {leaked}"
    assert [r["path"] for r in late] == [], f"passed after the operator took them back: {late}"


# -- refused egress requests, as fast as a cage makes them: one commit each? -----------------

REFUSALS = r"""
import threading
stop = time.monotonic() + P["seconds"]
counts, errors = [0] * 16, []
def loop(i):
    n = 0
    while time.monotonic() < stop:
        try:
            s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
            s.sendall(f"CONNECT r22-{i}-{n}.invalid:443 HTTP/1.1\r\n\r\n".encode())
            while s.recv(4096):
                pass
            s.close()
            counts[i] += 1
        except OSError as e:
            if len(errors) < 5:
                errors.append(errname(e))
        n += 1
ts = [threading.Thread(target=loop, args=(i,)) for i in range(16)]
for t in ts: t.start()
for t in ts: t.join()
result(refused=sum(counts), errors=errors)
"""


def _cpu_seconds(pid: int | None) -> float:
    assert pid is not None
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.attack(
    "core.cheap-verb-flood",
    ref="red team round 22: every refused egress request a write transaction in the core's loop (issue 17's ack flood, by the proxy)",
)
def test_refused_egress_requests_do_not_cost_a_commit_each(rt: HiveProcess) -> None:
    """**Broke, fixed** (the decisions of each 50 ms are one write of the group commit,
    ``Hive.record_egress``; the proxy accepts at most ``[egress] connections_per_second``
    of an agent's connections a second, a burst of twice that; a refusal's log line is
    one an agent every 10 s, with the count). From rtmule's cage, 16 threads making
    CONNECTs the allowlist refuses, for 4 s. Each decision is logged (egress_log), and
    each was its own write transaction on the core's event loop (4,179–6,908 refusals and
    as many commits, 2.27–3.13 s of the core's CPU in 4 s, before): the core's commits
    must not grow by one per refusal, the refusals are paced, and the others must be
    served meanwhile."""
    core = rt.core_pid()
    before = assert_ok(rt.host_call("core_stats"))["commits"]
    cpu0 = _cpu_seconds(core)
    with others_keep_working(rt) as lat:
        out = cage_run(rt, "rtmule", REFUSALS, seconds=4, timeout=120)
    cpu = _cpu_seconds(core) - cpu0
    commits = assert_ok(rt.host_call("core_stats"))["commits"] - before
    print(
        f"{out['refused']} refused CONNECTs in 4 s ({out['errors']}): {commits} commits of the core; "
        f"{cpu:.2f} s of the core's CPU; others' slowest {max(lat.samples) * 1000:.0f} ms over "
        f"{len(lat.samples)} rounds"
    )
    assert out["refused"] > 100, out
    rate = EgressSection().connections_per_second
    assert out["refused"] <= 2 * rate + rate * (4 + 1), (out, rate)  # the burst, then the rate
    assert commits <= 4 / EGRESS_LOG_BATCH + 20, (commits, out["refused"])
    assert commits < out["refused"] / 5, (commits, out["refused"])

"""Red team of session 19's second group of changes (a04e2c3..8dfd5f0):

1. ``priv/nss.py`` ``names_of``: a start's NSS lookups at once, a daemon thread each, at
   most ``LOOKUP_THREADS`` (16) in flight in hive-priv (a ``BoundedSemaphore``), within
   ``LOOKUP_DEADLINE`` (10 s), else the start is refused in one line;
2. ``cli/up.py`` ``hives_sharing_address``: ``hive up`` warns when another hive's
   gateway (a process whose command line has ``-c RUN/gateway/nginx.conf``) listens on
   the same address at another port;
3. ``display.py`` ``left_to_right_json_text``: ``hive show approval`` prints a payload's
   right-to-left letters as JSON escapes;
4. schema migration 11 also creates ``messages_operator`` (partial, recipient =
   'operator').

The NSS cases run against hive-privs of their own (``nspriv19``: test_red_diff18's
directory-playing NSS module, in a mount namespace of their own), one per destructive
case, so nothing of the host's configuration changes.

Broke (each a failing test here):
- a lookup thread that can't be started (``can't start new thread``: TasksMax, a pids
  limit) after its slot was taken never gives the slot back: 16 such starts and every
  later start of the hive waits 10 s and is refused "did not answer within 10 s" although
  the directory answers at once, until hive-priv restarts
  (``test_a_thread_that_can_not_start_does_not_leak_a_lookup_slot``);
- an exception other than ``LookupFailed`` in a lookup (``MemoryError``) leaves that
  id's answer ``None``, read as "no such id": fail-open
  (``test_a_lookup_that_raises_is_not_taken_for_no_such_id``);
- the claim (a new agent's first ``prepare``) still looks its block up id by id, serially,
  with no deadline, holding the hive's id table and the host registry's lock: a directory
  answering in 3 s holds a new agent's start ~15 s and a known agent's start as long
  (``test_a_claim_is_bound_by_the_lookup_deadline_too``);
- 32 starts at once (the core's priv pool) with a directory answering each lookup in
  2 s: 128 lookups through 16 slots, and the starts past the first 10 s are refused
  "did not answer for uid U within 10 s", a directory that answered every lookup in 2 s
  (``test_a_directory_answering_in_2_s_does_not_refuse_a_hive_of_32_starting_at_once``);
- any host user's process listening on the address, with ``/gateway/nginx.conf`` in a
  word of its command line, is "the hive of X" in root's ``hive up`` warning, X of its
  choosing (low: escaped, a warning only)
  (``test_a_host_users_process_is_not_taken_for_another_hives_gateway``);
- the check reads every descriptor of every process whenever anything listens on the
  address at another port: a host user's process at its 20,000 descriptors and 50 forks
  of it (~1 M descriptors, a few MB) hold root's ``hive up`` ~6 s; 5,000 forks, minutes
  (low) (``test_a_host_users_descriptors_do_not_hold_hive_up``);
- and as many warnings as it has processes (a run dir each), each as long as an argv
  string (128 KiB): 200 ``sleep``s on one inherited socket, ~20 MB of warnings (low)
  (``test_hive_ups_warnings_are_bounded``);
- migration 11 was changed after it was committed (5f5d8c4): a hive.db migrated to 11
  before 800bb06 never gets ``messages_operator`` (low: the counts stay slow there)
  (``test_a_database_at_migration_11_from_before_the_index_gets_it``).

All eight fixed the same session: a call takes its slots at once, first come first served,
its deadline from then (64 slots; 30 s of waiting for them refused as busy); a thread
that can't start gives its slots back and fails the call; whatever a lookup raises fails
it; a claim's lookups at once and under one deadline; only an nginx whose
``RUN/gateway/nginx.conf`` is root's counts, and only such processes' descriptors are
read, for 2 s at most; three hives named at most, run dirs cut at 200 characters, and
"and N more"; the index is migration 12 (IF NOT EXISTS). The cases about what a warning
says stand a process of any kind in for a gateway (``any``), as the check no longer does.

Held: a hung directory flooded with starts holds at most 16 lookup threads, every start
refused in one exact line within the deadline, and a start is served at once after the
directory recovers; a late or failed answer beside a "held" one refuses, never passes;
terminal escapes and bidi controls in a fake gateway's command line reach ``hive up``'s
line and ``--json`` escaped; every right-to-left, Arabic-number and bidi-control code point
(assigned or not), astral ones as surrogate pairs, comes out of ``hive show approval`` as
escapes, the same JSON value, on one line; the new index holds only the operator's rows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import REPO, ensure_user, wait_until
from hyperhive.cli.core_identity import LEGACY_USER
from hyperhive.cli.up import ADMIN_GROUP, ensure_group, hives_sharing_address
from hyperhive.priv import ids as ids_mod
from hyperhive.priv import nss

from .test_red_diff18 import HIVE_PRIV, NSS_MODULE, NSS_SLOT, NSSWITCH, NsPriv

UNSHARE = ["unshare", "-m", "--propagation", "private"]
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
REF = "red team of session 19's second change (a04e2c3..8dfd5f0)"
PIDS_CGROUP = Path("/sys/fs/cgroup/pids")


@contextmanager
def nspriv19(tag: str) -> Iterator[NsPriv]:
    """test_red_diff18's ``nspriv``, one per case: a case that breaks its hive-priv (a
    leaked slot lasts until it restarts) breaks no other."""
    ensure_group(ADMIN_GROUP)
    ensure_user(LEGACY_USER)
    base = Path(tempfile.mkdtemp(prefix=f"rt19b{tag}", dir="/tmp"))
    os.chmod(base, 0o755)
    p = NsPriv(base)
    (base / "run").mkdir()
    (base / "state").mkdir()
    (base / "hvdir.c").write_text(NSS_MODULE)
    so = base / "libnss_hvdir.so.2"
    cc = ["gcc", "-shared", "-fPIC", "-O2", f'-DCONF="{base / "conf"}"', "-o", str(so)]
    subprocess.run([*cc, str(base / "hvdir.c")], check=True, capture_output=True)
    (base / "nsswitch.conf").write_text(NSSWITCH)
    p.directory("")
    for f in ("subuid", "subgid"):
        (base / f).write_text("")
    binds = [(so, NSS_SLOT), (base / "nsswitch.conf", Path("/etc/nsswitch.conf"))]
    binds += [(base / "subuid", Path("/etc/subuid")), (base / "subgid", Path("/etc/subgid"))]
    script = " && ".join(f"mount --bind {a} {b}" for a, b in binds)
    argv = ["systemd-socket-activate", "-l", str(p.sock), "-E", f"PYTHONPATH={REPO / 'src'}"]
    argv += [str(HIVE_PRIV), "--run-dir", str(base / "run"), "--state-dir", str(base / "state")]
    argv += ["--core-user", LEGACY_USER]
    with open(p.log, "ab") as log:
        p.proc = subprocess.Popen(
            [*UNSHARE, "sh", "-c", f'{script} && exec "$@"', "sh", *argv],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_until(p.sock.is_socket, 10, "systemd-socket-activate to bind priv.sock")
        assert p.call({"cmd": "status"})["ok"] is True
        yield p
    finally:
        p.directory("")
        try:
            for name in p.call({"cmd": "status"}, timeout=30)["cages"]:
                p.call({"cmd": "destroy", "name": name}, timeout=30)
        except (OSError, ValueError, KeyError):
            pass
        p.proc.send_signal(signal.SIGTERM)
        try:
            p.proc.wait(10)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def priv_pid(p: NsPriv) -> int:
    """hive-priv's pid: unshare, sh and systemd-socket-activate each exec the next."""
    assert p.proc is not None
    cmdline = Path(f"/proc/{p.proc.pid}/cmdline").read_bytes()
    assert b"hive-priv" in cmdline, cmdline
    return p.proc.pid


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def prepared(p: NsPriv, name: str) -> dict[str, Any]:
    got = p.call({"cmd": "prepare", "name": name})
    assert got["ok"] is True, got
    return got


def late(name: str, uid: int) -> dict[str, Any]:
    """The one-line refusal of a start whose lookups were not answered in time."""
    return {
        "version": 1,
        "ok": False,
        "error": (
            f"agent {name!r}: the host's user database did not answer for uid {uid} within"
            " 10 s: its ids can't be checked: not started"
        ),
    }


class Line:
    """A raw root connection to priv.sock: its thread in hive-priv exists once connected
    and answered (a status), before the case takes threads away."""

    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(30)
        self.s.connect(str(path))
        self.f = self.s.makefile("rb")

    def call(self, req: dict[str, Any]) -> dict[str, Any] | str:
        self.s.sendall(json.dumps(req).encode() + b"\n")
        try:
            raw = self.f.readline()
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        return json.loads(raw) if raw else "closed with no reply"

    def close(self) -> None:
        self.f.close()
        self.s.close()


# -- 1. names_of: the slots, the deadline, what counts as an answer ----------------------


@pytest.mark.attack(
    "budget.exhaustion",
    ref=REF + ": a lookup thread that can't start keeps its slot, every later start refused",
)
def test_a_thread_that_can_not_start_does_not_leak_a_lookup_slot() -> None:
    """hive-priv already meets "no thread to be had" (TasksMax: server.py refuses the
    connection). In ``names_of`` the slot is taken, then ``Thread.start`` raises
    ``RuntimeError``: nothing gives the slot back (only the thread's ``finally`` does),
    and the request's connection closes with no reply. Here hive-priv's pids are capped
    at what it has for a moment (a pids cgroup), 16 starts are asked on connections it
    had already, then the cap is lifted. The directory answers at once all along."""
    with nspriv19("leak") as p:
        pid = priv_pid(p)
        u = prepared(p, "rt19bleak")["uid"]
        lines = [Line(p.sock) for _ in range(nss.LOOKUP_THREADS)]
        for line in lines:
            assert line.call({"cmd": "status"}) != "closed with no reply"
        group = PIDS_CGROUP / f"rt19b-{os.getpid()}"
        group.mkdir()
        said = []
        try:
            (group / "cgroup.procs").write_text(str(pid))
            for line in lines:
                # as many as it has: a connection whose request failed ended its thread
                time.sleep(0.05)
                (group / "pids.max").write_text((group / "pids.current").read_text().strip())
                said.append(line.call({"cmd": "prepare", "name": "rt19bleak"}))
        finally:
            (group / "pids.max").write_text("max")
            (PIDS_CGROUP / "cgroup.procs").write_text(str(pid))
            for line in lines:
                line.close()
            group.rmdir()
        t0 = time.monotonic()
        got = p.call({"cmd": "prepare", "name": "rt19bleak"})
        took = time.monotonic() - t0
        tail = p.log.read_text(errors="replace")[-800:]
    assert got["ok"] is True and took < 2.0, (
        f"after {nss.LOOKUP_THREADS} starts whose lookup thread could not be started"
        f" ({said[:2]} ...), the thread cap lifted and the directory answering at once, the"
        f" next start took {took:.1f} s: {got}; expected as refused: {late('rt19bleak', u)};"
        f" hive-priv's log: {tail}"
    )


@pytest.mark.attack(
    "ids.host-unique", ref=REF + ": a lookup that raises something else reads as no such id"
)
def test_a_lookup_that_raises_is_not_taken_for_no_such_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ask`` keeps ``LookupFailed`` and lets anything else end the thread: that
    query's answer stays ``None``, "no one holds it", and ``given_to_host`` passes the
    ids (fail-open). ``MemoryError`` from ``create_string_buffer`` (a record's 1 MiB
    buffer), or ``RuntimeError``, under a memory- or thread-starved hive-priv."""
    real = nss.name_of

    def starved(kind: str, i: int) -> str | None:
        if (kind, i) == ("gid", 7_000_001):
            raise MemoryError
        return real(kind, i)

    monkeypatch.setattr(nss, "name_of", starved)
    try:
        said: Any = ids_mod.given_to_host((7_000_000, 7_000_001))
    except Exception as e:  # any refusal is fine: not "free"
        said = f"refused: {type(e).__name__}: {e}"
    assert said is not None, (
        "gid 7000001's lookup raised MemoryError and given_to_host said no id is held: the"
        " start would go ahead"
    )


@pytest.mark.attack(
    "ids.host-unique", ref=REF + ": late, failed and held answers mixed within one start"
)
def test_a_late_or_failed_answer_beside_a_held_one_never_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each mix refuses (``LookupFailed``) or says held; none returns all ``None``; and a
    thread that answers after the call returned changes nothing of a later call."""
    real = nss.name_of
    plan: dict[tuple[str, int], tuple[float, str]] = {}

    def directory(kind: str, i: int) -> str | None:
        wait, what = plan.get((kind, i), (0.0, "none"))
        time.sleep(wait)
        if what == "fail":
            raise nss.LookupFailed(f"the host's user database did not answer for {kind} {i}")
        if what == "held":
            return f"ldap{i}"
        return real(kind, i) if what == "real" else None

    monkeypatch.setattr(nss, "name_of", directory)
    q = [("uid", 7_000_000), ("gid", 7_000_000), ("uid", 7_000_001), ("gid", 7_000_001)]
    mixes = {
        "held late, fail fast": {q[0]: (1.0, "held"), q[3]: (0.0, "fail")},
        "fail late, held fast": {q[0]: (1.0, "fail"), q[3]: (0.0, "held")},
        "held fast, one late": {q[0]: (0.0, "held"), q[2]: (1.0, "none")},
        "fail fast, rest fine": {q[1]: (0.0, "fail")},
    }
    out = {}
    for what, mix in mixes.items():
        plan.clear()
        plan.update(mix)
        t0 = time.monotonic()
        try:
            out[what] = (nss.names_of(q, deadline=0.5), round(time.monotonic() - t0, 1))
        except nss.LookupFailed as e:
            out[what] = (f"refused: {e}", round(time.monotonic() - t0, 1))
    time.sleep(1.2)  # the late threads answer into lists of calls that returned
    plan.clear()
    assert nss.names_of(q, deadline=2.0) == [None] * 4
    for what, (said, took) in out.items():
        passed = isinstance(said, list) and all(n is None for n in said)
        assert not passed, (what, said)
        assert took < 0.8, (what, took)
    assert out["fail fast, rest fine"][0].startswith("refused: "), out
    assert nss._slots.free == nss._slots.size  # every slot back


@pytest.mark.attack(
    "budget.exhaustion",
    ref=REF + ": a hung directory and a flood of starts: threads, refusals, recovery",
)
def test_a_hung_directory_and_a_flood_of_starts_hold_16_threads_and_recover() -> None:
    """A compromised core (or many restarts) asks 12 starts at once while the directory
    hangs (each lookup 14 s): at most 16 lookup threads exist, every start is refused in
    one exact line within the deadline, and once the directory answers again (and the
    hung lookups have come back) a start is served at once: no slot is left behind."""
    with nspriv19("hung") as p:
        pid = priv_pid(p)
        names = [f"rt19bh{i}" for i in range(12)]
        uids = {n: prepared(p, n)["uid"] for n in names}
        base = threads_of(pid)
        replies: dict[str, Any] = {}
        peak = [0]

        def start(n: str) -> None:
            t0 = time.monotonic()
            replies[n] = (p.call({"cmd": "prepare", "name": n}), time.monotonic() - t0)

        p.directory("sleep 14000\n")
        hung_at = time.monotonic()
        workers = [threading.Thread(target=start, args=(n,)) for n in names]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            peak[0] = max(peak[0], threads_of(pid))
            time.sleep(0.05)
        p.directory("")
        time.sleep(max(0.0, hung_at + 14.5 - time.monotonic()))  # the hung lookups return
        t0 = time.monotonic()
        after = p.call({"cmd": "prepare", "name": names[0]})
        took = time.monotonic() - t0
        settled = threads_of(pid)
    for n in names:
        got, secs = replies[n]
        assert got == late(n, uids[n]) or (
            got.get("ok") is False and got["error"].startswith(f"agent {n!r}: the host's user")
        ), got
        assert "\n" not in got["error"] and 9.5 < secs < 11.5, (n, got, secs)
    assert peak[0] <= base + len(names) + nss.LOOKUP_THREADS, (base, peak[0])
    assert after["ok"] is True and took < 2.0, (after, took)
    assert settled <= base + 1, (base, settled)


@pytest.mark.attack(
    "budget.exhaustion", ref=REF + ": a claim's lookups are serial and have no deadline"
)
def test_a_claim_is_bound_by_the_lookup_deadline_too() -> None:
    """The deadline covers ``given_to_host`` only. A new agent's first ``prepare`` claims
    a block, and ``free_blocks`` asks ``held_by_host`` of each id (uid, then gid) one
    after another with no deadline, holding the hive's id table (every ``prepare`` of the
    hive, known agents too) and the host registry's lock (every hive's claims, ``hive
    up``'s for its core). A directory answering in 3 s: 12 s of claim, then 3 s of
    check. A hung one (sssd: 300 s a request): 20 minutes a block."""
    with nspriv19("claim") as p:
        prepared(p, "rt19bknown")
        known: dict[str, Any] = {}

        def known_start() -> None:
            time.sleep(0.3)
            t0 = time.monotonic()
            known["reply"] = p.call({"cmd": "prepare", "name": "rt19bknown"}, timeout=120)
            known["took"] = time.monotonic() - t0

        p.directory("sleep 3000\n")
        other = threading.Thread(target=known_start)
        other.start()
        t0 = time.monotonic()
        try:
            got = p.call({"cmd": "prepare", "name": "rt19bnew"}, timeout=120)
            took = time.monotonic() - t0
            other.join(120)
        finally:
            p.directory("")
    assert took < nss.LOOKUP_DEADLINE + 1.0 and known["took"] < nss.LOOKUP_DEADLINE + 1.0, (
        f"with a directory answering each lookup in 3 s, a new agent's start took {took:.1f} s"
        f" ({got}) and a known agent's, asked meanwhile, {known['took']:.1f} s"
        f" ({known['reply']}): the {nss.LOOKUP_DEADLINE:g} s deadline bounds neither"
    )


@pytest.mark.attack(
    "budget.exhaustion",
    ref=REF + ": 32 starts at once, each lookup answered in 2 s, refused as unanswered",
)
def test_a_directory_answering_in_2_s_does_not_refuse_a_hive_of_32_starting_at_once() -> None:
    """``hive up`` of a hive with 32 agents (the core's priv pool is 32 threads): 32
    ``prepare``s at once, 128 lookups, 16 in flight. A directory that answers every lookup
    in 2 s (a slow LDAP) needs 16 s for them all; the starts still waiting for a slot at
    10 s are refused "did not answer for uid U within 10 s", though it answered each lookup
    it was asked in 2 s. Before the change each start took 8 s (four serial lookups) and
    every one started."""
    with nspriv19("many") as p:
        names = [f"rt19bm{i}" for i in range(32)]
        for n in names:
            prepared(p, n)
        replies: dict[str, Any] = {}

        def start(n: str) -> None:
            replies[n] = p.call({"cmd": "prepare", "name": n}, timeout=120)

        p.directory("sleep 2000\n")
        try:
            workers = [threading.Thread(target=start, args=(n,)) for n in names]
            for w in workers:
                w.start()
            for w in workers:
                w.join(120)
        finally:
            p.directory("")
    refused = {n: r["error"] for n, r in replies.items() if not r.get("ok")}
    assert not refused, (
        f"{len(refused)} of 32 starts refused with a directory answering every lookup in 2 s:"
        f" {list(refused.values())[:2]}"
    )


# -- 2. hive up: another hive's gateway on the same address ------------------------------

LISTEN = """
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
time.sleep(120)
"""

# What hive up runs up to the warning, then stops (the real refusal and run_locked
# replaced: no hive starts), as text and as --json.
UP = """
import asyncio, sys
from hyperhive.cli import up
class Lock:
    def release(self): pass
up.refusal = lambda *a: (Lock(), None)
async def run_locked(*a): return 0
up.run_locked = run_locked
up.PROGRESS.as_json = sys.argv[2] == "json"
if sys.argv[3:] == ["any"]:  # (fixed since: only a hive's nginx counts; the other cases
    # here test what is said of one, so any process with such a command line stands in)
    import os
    def gateways(deadline):
        return {int(e): r for e in os.listdir("/proc")
                if e.isdigit() and (r := up._gateway_run_dir(int(e))) is not None}
    up._hive_gateways = gateways
rc = asyncio.run(up.run_hive(None, up.Path("/nonexistent-state"), up.Path("/nonexistent-run"), sys.argv[1]))
up.RELAY.drain(5)
sys.exit(rc)
"""


@contextmanager
def fake_gateway(word: str) -> Iterator[int]:
    """A host user's process (nobody) listening on 127.0.0.1 with ``word`` in its
    command line."""
    proc = subprocess.Popen(
        [*NOBODY, sys.executable, "-I", "-c", LISTEN, "-c", word],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def hive_up_until_warned(listen: str, mode: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO / "src"), "LANG": "C.UTF-8"}
    return subprocess.run(
        [sys.executable, "-c", UP, listen, mode, "any"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd="/",
    )


# (no white space: the command line is split on it, U+2028 and U+0085 included)
HOSTILE_RUN = "/tmp/\x1b]0;owned\x07\x1b[1A\x1b[2Khive:\u202eready\x9b2J\u2066x"


@pytest.mark.attack(
    "surface.terminal-injection", ref=REF + ": a fake gateway's command line in hive up's warning"
)
def test_a_fake_gateways_command_line_reaches_hive_up_escaped() -> None:
    """The run dir in the warning is read from another process's command line, which any
    host user writes: OSC, CSI (7-bit and C1), a bidi override, a line separator. Text:
    one line, every character printable; --json: one line, the same value."""
    with fake_gateway(HOSTILE_RUN + "/gateway/nginx.conf") as port:
        text = hive_up_until_warned("127.0.0.1:1", "text")
        js = hive_up_until_warned("127.0.0.1:1", "json")
    assert text.returncode == 0 and js.returncode == 0, (text.stderr, js.stderr)
    # (another test's hive on 127.0.0.1 is warned of too: only this port's line is read)
    warned = [ln for ln in text.stderr.splitlines() if f"too (port {port})" in ln]
    assert len(warned) == 1, text.stderr
    assert warned[0].isprintable(), warned
    unsafe = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
    assert not unsafe.search(text.stderr), text.stderr
    rows = [json.loads(ln) for ln in js.stdout.splitlines()]
    shared = [r for r in rows if r.get("phase") == "address_shared" and r.get("port") == port]
    assert [(r["run_dir"], r["port"]) for r in shared] == [(HOSTILE_RUN, port)], rows
    assert not unsafe.search(js.stdout), js.stdout


@pytest.mark.attack(
    "launcher.second-hive", ref=REF + ": a host user's process passes for another hive's gateway"
)
def test_a_host_users_process_is_not_taken_for_another_hives_gateway() -> None:
    """Anything whose command line has a word ending ``/gateway/nginx.conf`` and that
    listens on the address counts: here a Python process of ``nobody``, naming a run dir
    that does not exist. Root's ``hive up`` then says "the hive of /srv/prod/run serves on
    this address too", of the host user's choosing, at every start (low: escaped, only a
    warning; yet a warning anyone can raise is one the operator learns to ignore). A
    hive's gateway is an nginx master of the gateway's ids, started by root with a
    root-owned ``RUN/gateway/nginx.conf``."""
    with fake_gateway("/srv/prod/run/gateway/nginx.conf") as port:
        found = hives_sharing_address("127.0.0.1:1")
    assert ("/srv/prod/run", port) not in found, (
        f"a Python process of user nobody on 127.0.0.1:{port} is reported as the gateway of"
        f" the hive of /srv/prod/run (no such directory): {found}"
    )


MANY_FDS = """
import os, resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
null = os.open("/dev/null", os.O_RDONLY)
for _ in range(hard - 64):
    os.dup(null)
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1)
for _ in range(int(sys.argv[1])):
    if os.fork() == 0:
        time.sleep(120)
        os._exit(0)
print(s.getsockname()[1], flush=True)
time.sleep(120)
"""


@pytest.mark.attack(
    "launcher.readiness", ref=REF + ": hive up's descriptor scan against a host user's descriptors"
)
def test_a_host_users_descriptors_do_not_hold_hive_up() -> None:
    """The check reads every descriptor of every process on the host (``_holders``)
    whenever anything listens on the address at another port, which any host user can
    arrange, and a user's forks each copy its descriptor table: ``nobody``'s one process
    of 20,000 descriptors (its hard limit) and 50 forks, about 1 M descriptors, a few MB
    of memory, cost root's ``hive up`` seconds before it starts (~5 s a million here;
    a user with 5,000 forks, minutes). An idle host: ~13 ms."""
    proc = subprocess.Popen(
        [*NOBODY, sys.executable, "-I", "-c", MANY_FDS, "50"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        int(proc.stdout.readline())
        t0 = time.monotonic()
        hives_sharing_address("127.0.0.1:1")
        took = time.monotonic() - t0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # its own group: the process and its forks
        proc.wait()
    assert took < 1.0, (
        f"hive up's shared-address check took {took:.1f} s with a host user's ~1 M"
        " descriptors (50 forks of one process at its limit of 20,000)"
    )


MANY_NAMES = """
import socket, subprocess, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1)
n, size = int(sys.argv[1]), int(sys.argv[2])
kids = []
for i in range(n):
    word = f"/{i:04d}" + "A" * size + "/gateway/nginx.conf"  # one argv string: < 128 KiB
    kids.append(subprocess.Popen([word, "120"], executable="/usr/bin/sleep", pass_fds=[s.fileno()]))
print(s.getsockname()[1], flush=True)
time.sleep(120)
"""


@pytest.mark.attack(
    "launcher.readiness", ref=REF + ": as many warnings, as long, as a host user likes"
)
def test_hive_ups_warnings_are_bounded() -> None:
    """A host user's 200 ``sleep``s holding one listening socket on 127.0.0.1 (inherited),
    each exec'd with an argv[0] of ~100 KiB ending ``/gateway/nginx.conf``, a different
    one each: root's ``hive up`` prints a warning per "hive", each with the whole run dir,
    ~20 MB to its terminal (and journal) before anything starts, queued in its memory
    (its own lines are never dropped) while the terminal is slow. An account's name in a
    refusal is cut at 64 characters (session 18); nothing bounds these."""
    proc = subprocess.Popen(
        [*NOBODY, sys.executable, "-I", "-c", MANY_NAMES, "200", "100000"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        int(proc.stdout.readline())
        text = hive_up_until_warned("127.0.0.1:1", "text")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # its own group: the process and its sleeps
        proc.wait()
    warned = [ln for ln in text.stderr.splitlines() if "serves on this address too" in ln]
    n, size = len(warned), sum(len(ln) for ln in warned)
    longest = max((len(ln) for ln in warned), default=0)
    assert n >= 1, text.stderr[-500:]
    assert n <= 5 and size <= 8192, (
        f"hive up printed {n} warning lines, {size:,} characters in all (the longest"
        f" {longest:,}), for one host user's processes"
    )


# -- 3. hive show approval: right-to-left letters ----------------------------------------

STRONG = {"R", "AL", "AN", "RLE", "RLO", "RLI", "LRE", "LRO", "LRI", "FSI", "PDF", "PDI"}
# Unicode's default bidi class R or AL for unassigned code points (DerivedBidiClass.txt):
# what a terminal with newer Unicode data than this Python's may take as right-to-left.
DEFAULT_RTL = [
    (0x0590, 0x08FF),
    (0xFB1D, 0xFB4F),
    (0xFB50, 0xFDCF),
    (0xFDF0, 0xFDFF),
    (0xFE70, 0xFEFE),
    (0x10800, 0x10FFF),
    (0x1E800, 0x1EFFF),
]


@pytest.mark.attack(
    "surface.terminal-injection",
    ref=REF + ": every right-to-left code point in a payload through hive show approval",
)
def test_every_right_to_left_code_point_is_escaped_and_the_value_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every code point whose bidi class is R, AL or AN or an explicit control (assigned in
    this Python's Unicode 14), every unassigned one whose default class is R or AL (Hanifi
    Rohingya U+10D00, Adlam U+1E900, newer scripts), presentation forms, combining marks
    after them, each beside digits and quotes: printed on one line with none of them raw,
    the same JSON value."""
    from click.testing import CliRunner

    from hyperhive.cli import operator
    from hyperhive.cli.main import cli

    cps = {cp for cp in range(0x110000) if unicodedata.bidirectional(chr(cp)) in STRONG}
    cps |= {
        cp
        for lo, hi in DEFAULT_RTL
        for cp in range(lo, hi + 1)
        if not unicodedata.name(chr(cp), "")
    }
    cps -= set(range(0xD800, 0xE000))
    letters = ["".join(chr(c) for c in sorted(cps)[k : k + 50]) for k in range(0, len(cps), 50)]
    payload = {
        "\u05d0key": [["\u05d0", "100", "5000000", "\u05d1"], *letters],
        "mark": "\u05d0\u0301\U0001e900\u0301\U00010d00\u20dd",
        "n": [1, 2.5, None, True],
    }
    approval = {
        "id": 7,
        "agent": "rtmule",
        "kind": "custom",
        "status": "pending",
        "description": "pay",
        "requested_at": 0,
        "payload": payload,
    }
    monkeypatch.setattr(operator, "request", lambda *a, **k: {"approval": approval})
    res = CliRunner().invoke(cli, ["show", "approval", "7"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    at = lines.index("payload (its right-to-left letters as \\u escapes, so nothing is reordered):")
    printed = lines[at + 1]
    assert len(lines) == at + 2, lines[at:]
    raw = sorted({hex(ord(c)) for c in res.output if ord(c) in cps})
    assert raw == [], raw[:20]
    assert json.loads(printed) == payload


# -- 4. schema migration 11 ---------------------------------------------------------------


@pytest.mark.attack(
    "budget.store", ref=REF + ": a database at migration 11 from before the index was added"
)
def test_a_database_at_migration_11_from_before_the_index_gets_it(tmp_path: Path) -> None:
    """Migration 11 shipped in 5f5d8c4 (inbox_mark, inbox_read); 800bb06 added the index to
    it in place, though the migrations are "append only" and "kept byte-for-byte as first
    shipped". A hive.db migrated to 11 in between (any hive run on main since 5f5d8c4) has
    user_version 11 and never runs it again: no ``messages_operator``, every count of the
    operator's inbox a scan (16 ms at 300,000 messages, per the commit)."""
    from hyperhive.core.store import schema
    from hyperhive.core.store.db import Database

    # Fixed the same session: 11 is as first shipped, the index is migration 12 (IF NOT
    # EXISTS). Both day's copies of 11 open to a database with the index.
    index = "    CREATE INDEX messages_operator ON messages (id) WHERE recipient = 'operator';\n"
    assert (
        isinstance(schema.MIGRATIONS[10], str) and "messages_operator" not in schema.MIGRATIONS[10]
    )
    for copy in (schema.MIGRATIONS[10], schema.MIGRATIONS[10] + index):
        path = tmp_path / f"hive{len(copy)}.db"
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        for version, migration in enumerate([*schema.MIGRATIONS[:10], copy], start=1):
            db.execute("BEGIN")
            schema.apply_migration(db, migration)
            db.execute(f"PRAGMA user_version={version}")
            db.execute("COMMIT")
        db.close()
        store = Database(path)
        try:
            names = {
                r[0]
                for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type='index'")
            }
            plan = store.conn.execute(
                "EXPLAIN QUERY PLAN SELECT count(*) FROM messages WHERE recipient=? AND id>?",
                ("operator", 0),
            ).fetchall()
        finally:
            store.close()
        assert "messages_operator" in names, f"no messages_operator after opening: {plan}"


@pytest.mark.attack("budget.store", ref=REF + ": agents' messages and the operator's partial index")
def test_agent_messages_never_enter_the_operator_index(tmp_path: Path) -> None:
    """The hot path (agent to agent) and what an agent can put in the index: 20,000
    messages between agents add no entry; the operator's 50 are the index; the agents'
    inbox reads keep their plans (no scan of the operator's index)."""
    from hyperhive.core.store.db import Database

    store = Database(tmp_path / "hive.db")
    try:
        with store.tx() as tx:
            tx.executemany(
                "INSERT INTO messages (recipient, sender, kind, body, sent_at) VALUES (?,?,?,?,?)",
                [
                    ("rtbob" if i % 400 else "operator", "rtalice", "message", "x", 0.0)
                    for i in range(20_000)
                ],
            )
        in_index = store.conn.execute(
            "SELECT count(*) FROM messages INDEXED BY messages_operator WHERE recipient='operator'"
        ).fetchone()[0]
        plans = {
            who: " ".join(
                r[3]
                for r in store.conn.execute(
                    "EXPLAIN QUERY PLAN SELECT id FROM messages WHERE recipient=? AND id>?"
                    " ORDER BY id LIMIT 10",
                    (who, 0),
                )
            )
            for who in ("rtbob", "operator")
        }
    finally:
        store.close()
    assert in_index == 50
    assert "messages_operator" not in plans["rtbob"] and "messages_operator" in plans["operator"], (
        plans
    )

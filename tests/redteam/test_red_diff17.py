"""Red team of session 17's change: ``run/agents`` a tmpfs of its own while a hive runs
(cli/agents_fs.py: mounted by ``hive up`` after prepare_dirs, kept if a killed run left
it, detached at the stop; ``hive reset`` detaches it too), and nginx started with its
stderr relayed escaped through a pipe (its workers, ``hive-gateway``, no longer hold the
operator's terminal as fd 2).

The attacks run from a cage (the agent's runtime uid), as the hive's core ids
(``HiveProcess.as_core``: what a compromised core is to the kernel), and as a
compromised nginx worker (its fd 2 written as the worker would; ``hive-gateway``'s uid
for what the kernel lets that uid reach). Run against 79322ba.

Broke (each case fails on that code; all but the last fixed in session 17: the core
refuses one agent in one line when its socket directory refuses a write, and writes its
CA files through names of their own; `hive up` and `hive reset` take the run dir
normalized, `agents_fs.mount` refuses one with a link on the way before it mounts, and
resizes a kept tmpfs; every child's stderr and `hive up`'s own log reach the terminal
from a thread of their own, named (`gateway: …`), the children's dropped past 4 Mi
characters waiting):
- what a compromised core leaves in its own socket directory (a directory at
  ``agents/NAME/.ca-bundle.pem.tmp``, a changed ``ca-bundle.pem`` so the next core must
  rewrite it) crash-loops every later core: ``[Errno 21] Is a directory`` before ready,
  restarted with backoff, host.sock refused for every agent, for as long as that
  ``hive up`` runs; the tmpfs is kept across a killed ``hive up`` too (not new: before,
  ``/run`` kept it even across a clean stop);
- a run dir given with a ``..`` component (``hive --run-dir /srv/x/../run up``: hive-priv
  accepts it, every component opened without following links) is never found in
  mountinfo by ``agents_fs.mounted`` (it compares the unnormalised path): the tmpfs is
  left mounted at the stop, and every start stacks one more on it (a killed run's cages
  keep the lower one, so the next core binds where they can't see);
  the same with a run dir that is a link (``/var/run/hive``): hive-priv refuses it, the
  start fails, the tmpfs stays mounted, one more per attempt;
  ``hive reset`` with the ``..`` spelling then removes the state, empties the tmpfs and fails
  on its mount point (EBUSY): a reset half done;
- nginx's relayed lines are hive up's own lines to the operator: a worker writes ``hive:
  ready: log in at http://elsewhere/...`` and root's terminal shows exactly that (escaped,
  but nothing tells it from ``hive up``'s own);
- the relay writes ``hive up``'s stderr from its event loop, blocking: on a terminal that
  stopped draining (Ctrl-S, a stalled ssh session) 256 KiB from a worker freeze ``hive up``
  whole (SIGTERM not handled for 15 s and on; the core not watched). Before, a stalled
  terminal stopped nginx's own write;
- (low, noticed) ``statvfs("/run/hive")`` counts the whole hive's tmpfs: 5 inodes and
  ~216 KiB more with each agent spawned anywhere in the hive (and size/nr_inodes give
  ``max_agents``); before it read the host's ``/run``.

Held: the cage's mountinfo, mounts, mountstats and ``statfs`` name no host path (the
``/run/hive`` line reads ``/NAME`` of ``tmpfs hive-agents``, nosuid, nodev, noexec); the
cage can't create, bind, rename or link in ``/run/hive`` (EROFS); a tmpfs filled by the
core (bytes and inodes) costs the next spawn one line (``No space left on device``), the
core keeps serving and restarts; an nginx worker's flood of terminal controls, C1, bidi,
invalid UTF-8, a MiB-long line and 8 MB of escapes reach ``hive up``'s stderr escaped, no
control byte, and ``hive up`` stops cleanly at once; ``hive-gateway`` opens none of ``hive
up``'s or the master's descriptors and has no terminal to open; a worker's leftover (own
session) holding the relay's pipe doesn't hold up the stop (EPIPE after); cages a killed
``hive up`` left running are found again by the next one on the same tmpfs (one mount,
same init, ``hive exec`` works).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import (
    HIVE,
    HiveFactory,
    HiveProcess,
    as_user,
    children,
    ensure_user,
    running_hive,
    wait_until,
)
from hyperhive.cli import agents_fs
from hyperhive.client import HiveUnavailable

from .conftest import cage_run

PY = str(HIVE.parent / "python")


def _agents(*names: str) -> dict[str, dict[str, Any]]:
    return {n: {"runtime": "command", "command": ["sleep", "3600"]} for n in names}


@pytest.fixture(scope="module", autouse=True)
def _legacy_gateway_account() -> None:
    """The legacy ``hive-gateway`` account, whose ids a compromised worker runs under here:
    a fresh host has none until a test makes it (session 21's fresh machine ran this
    module first; its 2 cases failed with KeyError)."""
    ensure_user("hive-gateway")


@pytest.fixture(scope="module")
def d17() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(_agents("d17a", "d17b")))


def as_ids(user: Any, script: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    """``script`` run as ``user`` (ids or a name, as ``as_user``), in a session of its own
    (no controlling terminal); what it printed as JSON on its last line."""
    proc = subprocess.run(
        [PY, "-I", "-c", script, *args], capture_output=True, text=True, timeout=timeout,
        cwd="/", start_new_session=True, **as_user(user),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# -- what a cage reads of the tmpfs, what it can do there ---------------------------------

OBSERVE = r"""
import errno, os, socket
def name(e):
    return errno.errorcode.get(e.errno, str(e))
texts = {}
for p in ("/proc/self/mountinfo", "/proc/self/mounts", "/proc/self/mountstats",
          "/proc/1/mountinfo", "/proc/thread-self/mountinfo"):
    try:
        texts[p] = open(p).read()
    except OSError as e:
        texts[p] = "ERR " + name(e)
st = os.statvfs("/run/hive")
line = [ln for ln in texts["/proc/self/mountinfo"].splitlines() if ln.split()[4] == "/run/hive"]
tries = {}
def t(what, f):
    try:
        f()
        tries[what] = "done"
    except OSError as e:
        tries[what] = name(e)
t("create", lambda: open("/run/hive/d17-planted", "x").close())
t("mkdir", lambda: os.mkdir("/run/hive/d17-dir"))
t("symlink", lambda: os.symlink("/", "/run/hive/d17-link"))
t("rename", lambda: os.rename("/run/hive/ca-bundle.pem", "/run/hive/x.pem"))
t("link", lambda: os.link("/run/hive/hive-ca.pem", "/run/hive/y.pem"))
t("truncate", lambda: os.truncate("/run/hive/ca-bundle.pem", 0))
def bind():
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind("/run/hive/d17.sock")
    finally:
        s.close()
t("bind", bind)
result(texts=texts, line=line, statvfs=[st.f_blocks, st.f_bfree, st.f_files, st.f_ffree],
       tries=tries, listing=sorted(os.listdir("/run/hive")))
"""


@pytest.mark.attack(
    "observe.host-activity",
    ref="session 17: run/agents a tmpfs of its own (round 22's mountinfo case, the rest of /proc)",
)
def test_the_cage_reads_no_host_path_of_the_hive_in_any_mount_table(d17: HiveProcess) -> None:
    """mountinfo, mounts, mountstats (its own, init's, the thread's) and statfs of
    ``/run/hive``: no host path of the hive (base, run or state dir) anywhere; the
    ``/run/hive`` line is ``/d17a`` of ``tmpfs hive-agents``, nosuid, nodev, noexec."""
    out = cage_run(d17, "d17a", OBSERVE)
    print(out["line"], out["statvfs"], out["listing"])
    leaks = {
        p: [needle for needle in (str(d17.base), str(d17.run_dir), str(d17.state_dir), "/tmp/hv")
            if needle in text]
        for p, text in out["texts"].items()
    }  # fmt: skip
    assert not {p: n for p, n in leaks.items() if n}, leaks
    assert len(out["line"]) == 1, out["line"]
    fields = out["line"][0].split()
    assert fields[3] == "/d17a", fields
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(fields[5].split(",")), fields
    assert " - tmpfs hive-agents " in out["line"][0], out["line"]


@pytest.mark.attack(
    "budget.exhaustion", ref="session 17: the tmpfs from inside a cage (bytes, inodes, binds)"
)
def test_the_cage_can_not_write_fill_or_bind_in_its_socket_directory(d17: HiveProcess) -> None:
    """The bind is read-only at the mount: the runtime uid creates, binds, links,
    renames and truncates nothing (EROFS; EACCES where the directory's mode is checked
    first), whatever the directory's mode."""
    out = cage_run(d17, "d17a", OBSERVE)
    print(out["tries"])
    assert set(out["tries"].values()) <= {"EROFS", "EACCES"}, out["tries"]
    assert out["listing"] == ["agent.sock", "ca-bundle.pem", "egress-handover.sock", "egress.sock", "hive-ca.pem"]


# -- a compromised core and the tmpfs -------------------------------------------------------

FILL = r"""
import errno, json, os, sys
d = sys.argv[1]
out = {}
n = 0
try:
    with open(os.path.join(d, "d17-fill"), "wb") as f:
        while True:
            f.write(b"\0" * (1 << 20)); f.flush(); n += 1
except OSError as e:
    out["bytes"] = [n, errno.errorcode[e.errno]]
os.mkdir(os.path.join(d, "d17-inodes"))
i = 0
try:
    while True:
        open(os.path.join(d, "d17-inodes", str(i)), "x").close(); i += 1
except OSError as e:
    out["inodes"] = [i, errno.errorcode[e.errno]]
print(json.dumps(out))
"""


@pytest.mark.attack("budget.exhaustion", ref="session 17: the core fills the agents' tmpfs")
def test_a_full_agents_tmpfs_costs_one_spawn_one_line_and_nobody_else(d17: HiveProcess) -> None:
    """As the core's ids: ``agents/d17a`` (the core's) filled to ENOSPC, then its inodes.
    The host's ``/run`` is not touched; the operator's next spawn is refused in one
    line; the core (same pid) keeps serving the others and host.sock."""
    agents = d17.run_dir / "agents"
    core = d17.core_pid()
    try:
        out = as_ids(d17.core_ids, FILL, str(agents / "d17a"))
        print(out)
        assert out["bytes"][1] == "ENOSPC" and out["inodes"][1] == "ENOSPC", out
        assert out["bytes"][0] <= (agents_fs.SPARE_BYTES + 100 * agents_fs.BYTES_PER_AGENT) >> 20
        reply = d17.host_call("spawn", name="d17c", spec=_agents("d17c")["d17c"])
        print(reply)
        assert reply.get("ok") is False and "No space left on device" in reply["error"], reply
        assert "\n" not in reply["error"]
        assert d17.core_pid() == core
        assert d17.agent_call("d17b", "whoami") == {"version": 1, "ok": True, "name": "d17b"}
        rows = d17.agent_status()
        assert rows["d17a"]["running"] and rows["d17b"]["running"], rows
    finally:
        subprocess.run(["rm", "-rf", str(agents / "d17a" / "d17-fill"), str(agents / "d17a" / "d17-inodes")],
                       check=True)  # fmt: skip
        d17.host_call("destroy", name="d17c")


PLANT = r"""
import json, os, sys
d = sys.argv[1]
os.mkdir(os.path.join(d, ".ca-bundle.pem.tmp"))
with open(os.path.join(d, ".d17"), "wb") as f:
    f.write(b"-----BEGIN CERTIFICATE-----\nnot the hive's\n-----END CERTIFICATE-----\n")
os.replace(os.path.join(d, ".d17"), os.path.join(d, "ca-bundle.pem"))
print(json.dumps({"planted": sorted(os.listdir(d))}))
"""


@pytest.mark.attack(
    "privsep.core-misuse",
    ref="session 17: what the core leaves in the tmpfs outlives it (kept across restarts and kills)",
)
@pytest.mark.parametrize("left", ["a directory at the tmp name", "the tmpfs full"])
def test_what_a_compromised_core_leaves_in_its_socket_directory_does_not_stop_the_next_core(
    hive_factory: HiveFactory, left: str
) -> None:
    """**Broke, fixed in session 17.** The core owns ``agents/NAME`` (2750) and the tmpfs lives as long as
    ``hive up`` (and past a kill of it). The compromised core replaces ``ca-bundle.pem``
    (so the next core must write it anew) and leaves a directory at the name that write
    uses, ``.ca-bundle.pem.tmp`` (or fills the tmpfs, which the core alone can write);
    then it is killed. Every core ``hive up`` starts after it dies before ready
    (``[Errno 21] Is a directory``; ``[Errno 28] No space left on device``), restarted
    with backoff for as long as that ``hive up`` runs: host.sock refused, every agent
    unreachable. One agent's socket directory should cost that agent at most (one
    line), not the hive."""
    h = hive_factory(_agents("d17p", "d17q"))
    sockdir = h.run_dir / "agents" / "d17p"
    try:
        if left == "the tmpfs full":
            print(as_ids(h.core_ids, PLANT_FULL, str(sockdir)))
        else:
            print(as_ids(h.core_ids, PLANT, str(sockdir)))
        core = h.core_pid()
        assert core is not None
        os.kill(core, signal.SIGKILL)  # the compromised core is gone; the next one starts

        def back() -> bool:
            pid = h.core_pid()
            if pid in (None, core):
                return False
            try:
                rows = h.agent_status()
            except (OSError, ValueError, HiveUnavailable):
                return False
            return bool(rows.get("d17q", {}).get("running"))

        try:
            wait_until(back, 25, "the next core to serve d17q")
        except AssertionError:
            crashes = h.log_tail(200).count("hive-core exited with status 1 before it was ready")
            raise AssertionError(
                f"the next core never served (it died {crashes} times):\n{h.log_tail(8)}"
            ) from None
    finally:
        # Let the core come back before the fixture stops the hive.
        subprocess.run(["rm", "-rf", str(sockdir / ".ca-bundle.pem.tmp"), str(sockdir / "d17-fill")],
                       check=True)  # fmt: skip
        wait_until(lambda: h.core_pid() is not None and _serves(h, "d17q"), 30, "the core back")
        # A core that started with the tmpfs full served every agent but could not write
        # d17p's CA files (one line); the next start, with room again, writes them.
        if left == "the tmpfs full":
            assert "could not write the hive CA where its cage reads it" in h.log_tail(400)
            served = h.core_pid()
            assert served is not None
            os.kill(served, signal.SIGKILL)
            wait_until(
                lambda: h.core_pid() not in (None, served) and _serves(h, "d17q"),
                30,
                "a core again",
            )
        bundle = (sockdir / "ca-bundle.pem").read_bytes()
        ca = (h.state_dir / "ca" / "ca.pem").read_bytes()
        assert bundle.endswith(ca.rstrip(b"\n") + b"\n") or bundle.endswith(ca), len(bundle)


def _serves(h: HiveProcess, name: str) -> bool:
    try:
        return bool(h.agent_status().get(name, {}).get("running"))
    except (OSError, ValueError, HiveUnavailable, AssertionError):
        return False


PLANT_FULL = r"""
import json, os, sys
d = sys.argv[1]
with open(os.path.join(d, ".d17"), "wb") as f:
    f.write(b"-----BEGIN CERTIFICATE-----\nnot the hive's\n-----END CERTIFICATE-----\n")
os.replace(os.path.join(d, ".d17"), os.path.join(d, "ca-bundle.pem"))
n = 0
try:
    with open(os.path.join(d, "d17-fill"), "wb") as f:
        while True:
            f.write(b"\0" * (1 << 16)); f.flush(); n += 1
except OSError as e:
    pass
print(json.dumps({"filled_64k": n}))
"""


# -- the tmpfs's lifecycle -------------------------------------------------------------------


@pytest.mark.attack(
    "launcher.readiness",
    ref="session 17: agents_fs.mounted compares the run dir as given with mountinfo's path",
)
def test_a_run_dir_with_dotdot_leaves_no_tmpfs_mounted_and_stacks_none(
    hive_factory: HiveFactory,
) -> None:
    """**Broke, fixed in session 17.** ``hive --run-dir BASE/x/../run up``: hive-priv accepts the path (each
    component opened without following links), the tmpfs is mounted on ``BASE/run/agents``,
    but ``agents_fs.mounted`` looks for ``BASE/x/../run/agents`` in mountinfo: never found.
    The stop leaves the tmpfs mounted (and what the core wrote in it), and each start
    mounts one more on top (a killed run's cages would keep the lower one: the next core
    binds where they can't see)."""
    h = hive_factory(_agents("d17r"), start=False)
    (h.base / "x").mkdir()
    h.run_dir = h.base / "x" / ".." / "run"
    real = str(h.base / "run" / "agents")

    def stacked() -> int:
        return [p for p, _ in agents_fs.mounts()].count(real)

    h.start()
    assert stacked() == 1
    h.stop_clean()
    after_stop = stacked()
    h.start()
    after_restart = stacked()
    h.stop_clean()
    print(after_stop, after_restart)
    assert (after_stop, after_restart) == (0, 1), (
        f"tmpfs mounts on {real}: {after_stop} after the stop, {after_restart} after the next start"
    )


@pytest.mark.attack(
    "launcher.readiness", ref="session 17: hive up mounts through a run dir hive-priv refuses"
)
def test_a_refused_run_dir_leaves_no_tmpfs_mounted(hive_factory: HiveFactory) -> None:
    """**Broke, fixed in session 17.** The run dir a link to a directory of root's (``/var/run/hive``: ``/var/run``
    is a link to ``/run`` here): ``hive up`` mounts the tmpfs through the link, hive-priv
    refuses the run dir (it opens no link) and the start fails, and ``mounted`` looks for
    the link's spelling in mountinfo: the tmpfs stays mounted on the real directory, one
    more for each attempt."""
    h = hive_factory(_agents("d17v"), start=False)
    real = h.base / "realrun"
    real.mkdir()
    os.chmod(real, 0o755)
    link = h.base / "run"
    link.symlink_to(real)
    cmd = [
        str(HIVE), "--run-dir", str(link), "up", "--config", str(h.config_path),
        "--state-dir", str(h.state_dir), "--listen", f"127.0.0.1:{h.port}",
    ]  # fmt: skip
    for _ in range(2):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=h.base)
        print(r.returncode, r.stdout[-300:], r.stderr[-300:])
        assert r.returncode != 0
    left = [p for p, _ in agents_fs.mounts() if p.startswith(str(h.base) + "/")]
    assert left == [], f"tmpfs left mounted by failed starts: {left}"


@pytest.mark.attack(
    "reset.planted-link", ref="session 17: hive reset uses agents_fs.mount_points_below"
)
def test_hive_reset_with_that_run_dir_detaches_the_tmpfs_and_removes_everything(
    hive_factory: HiveFactory,
) -> None:
    """**Broke (the same cause), fixed in session 17.** After a stop with ``--run-dir BASE/x/../run``, the tmpfs
    is still mounted (above); ``hive reset`` with the same spelling looks for mounts
    below ``BASE/x/../run/`` (none: mountinfo has ``BASE/run/agents``), removes the
    state, empties the tmpfs and fails on its mount point (EBUSY): a reset half done."""
    h = hive_factory(_agents("d17t"), start=False)
    (h.base / "x").mkdir()
    h.run_dir = h.base / "x" / ".." / "run"
    h.start()
    h.stop_clean()
    r = subprocess.run(
        [str(HIVE), "--run-dir", str(h.run_dir), "reset", "--yes", "--state-dir", str(h.state_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    print(r.returncode, r.stdout, r.stderr)
    left = [p for p, _ in agents_fs.mounts() if p.startswith(str(h.base) + "/")]
    assert (r.returncode, left) == (0, []), (r.returncode, r.stderr, left)


@pytest.mark.attack(
    "launcher.readiness",
    ref="session 17: a killed hive up's tmpfs is kept for the cages still running",
)
def test_cages_left_running_by_a_killed_hive_up_reach_the_next_core(
    hive_factory: HiveFactory,
) -> None:
    """``hive up``, hive-priv, the core and nginx SIGKILLed; the cages (their own cgroups)
    run on. The next ``hive up`` keeps the tmpfs (one mount, not two), finds the cage
    again, and its harness reaches the new core through the ``/run/hive`` it has had all
    along (``running`` again, ``hive exec`` works, same init pid)."""
    h = hive_factory(_agents("d17k"))
    init = h.cage("d17k")["pid"]
    assert h.proc is not None
    for pid in children(h.proc.pid):
        try:
            os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(
                pid, signal.SIGKILL
            )
        except ProcessLookupError:
            pass
    h.proc.kill()
    h.proc.wait()
    h.close_caged()
    assert h.cgroup("d17k").pids(), "the cage should outlive the kill"
    agents = str(h.run_dir / "agents")
    # HiveProcess.start refuses a busy cgroup (a test's leftover): here it is the point.
    agents_before, h.agents = h.agents, {}
    try:
        h.start()
    finally:
        h.agents = agents_before
    h.wait_running()
    assert [p for p, _ in agents_fs.mounts()].count(agents) == 1
    assert h.cage("d17k")["pid"] == init, "the cage was restarted, not found again"
    assert h.exec("d17k", "true").returncode == 0


STATVFS = r"""
import os, time
st = os.statvfs("/run/hive")
result(used=st.f_files - st.f_ffree, blocks=st.f_blocks - st.f_bfree)
"""


@pytest.mark.attack(
    "observe.host-activity", ref="session 17: statfs of /run/hive counts the whole hive's tmpfs"
)
@pytest.mark.xfail(
    strict=True,
    reason="known limit, low (docs/security.md): the tmpfs is the hive's, so its counts are"
    " the hive's; a tmpfs per agent would give a cage only its own",
)
def test_the_cage_can_not_count_the_hives_agents_through_statfs(d17: HiveProcess) -> None:
    """**Broke (low, noticed).** ``statvfs("/run/hive")`` reads the whole ``hive-agents``
    tmpfs: its used inodes and blocks move by 5 inodes and ~216 KiB with each agent the
    operator spawns or destroys anywhere in the hive (and its size and nr_inodes give
    ``max_agents``). Before the change it read the host's ``/run`` (host-wide, noisier);
    now it is exactly this hive's agents. A tmpfs per agent (or the trust files outside
    the socket directory) would leave it nothing but its own."""
    before = cage_run(d17, "d17a", STATVFS)
    reply = d17.host_call("spawn", name="d17s", spec=_agents("d17s")["d17s"])
    try:
        assert reply.get("ok"), reply
        d17.wait_running(["d17s"])
        after = cage_run(d17, "d17a", STATVFS)
    finally:
        d17.host_call("destroy", name="d17s")
    print(before, after)
    assert after == before, f"another agent's spawn shows in the cage's statfs: {before} -> {after}"


# -- nginx's relayed stderr ------------------------------------------------------------------


def _nginx(h: HiveProcess) -> tuple[list[int], list[int]]:
    assert h.proc is not None
    masters = [p for p in children(h.proc.pid) if Path(f"/proc/{p}/comm").read_text() == "nginx\n"]
    workers = [w for m in masters for w in children(m)]
    assert masters and workers, (masters, workers)
    return masters, workers


def _as_worker_write(worker: int, chunks: list[bytes]) -> None:
    """What the compromised worker writes to its fd 2 (the relay's pipe), written here
    through /proc/<worker>/fd/2: the same pipe, the same bytes."""
    fd = os.open(f"/proc/{worker}/fd/2", os.O_WRONLY)
    try:
        for c in chunks:
            os.write(fd, c)
    finally:
        os.close(fd)


REACH = r"""
import errno, json, os, sys
out = {}
for p in sys.argv[1:]:
    try:
        os.close(os.open(p, os.O_RDWR | os.O_NOCTTY))
        out[p] = "opened"
    except OSError as e:
        out[p] = errno.errorcode.get(e.errno, str(e))
print(json.dumps(out))
"""

C0_C1_BIDI = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


@pytest.mark.attack(
    "exec.operator-terminal", ref="session 17: nginx's stderr relayed by hive up (relay_stderr)"
)
def test_a_compromised_nginx_worker_reaches_neither_roots_terminal_nor_stalls_hive_up(
    d17: HiveProcess,
) -> None:
    """The worker's fd 2 is a pipe to ``hive up``. Through it: OSC 52, CSI, C1 CSI
    (U+009B), RLO, invalid UTF-8, a line of a MiB, 8 MB of ``ESC[2J`` lines. ``hive up``'s
    stderr gets them escaped (no control byte, nothing undecodable), keeps up, and the
    hive serves; as ``hive-gateway`` (no terminal), neither ``/dev/tty`` nor any
    descriptor of ``hive up`` or the master opens."""
    masters, workers = _nginx(d17)
    assert d17.proc is not None
    before = d17.log_path.stat().st_size
    t0 = time.monotonic()
    _as_worker_write(workers[0], [
        b"d17 \x1b]52;c;ZWNobyBoaQ==\x07 \xc2\x9b31m \xe2\x80\xae bad \xff\xfe \x1bP+q\x1b\\ end\n",
        b"A" * (1 << 20) + b"\n",
        *[b"\x1b[2J" * 1000 + b"\n" for _ in range(2000)],
        b"d17 last\n",
    ])  # fmt: skip
    wait_until(
        lambda: b"d17 last" in d17.log_path.read_bytes()[before:], 60, "the relay to catch up"
    )
    took = time.monotonic() - t0
    print(f"relayed in {took:.2f} s")
    raw = d17.log_path.read_bytes()[before:]
    text = raw.decode()  # strict: nothing undecodable reaches the terminal
    bad = sorted({repr(ch) for ch in C0_C1_BIDI.findall(text)})
    assert not bad, f"control characters on hive up's stderr: {bad}"
    assert d17.agent_call("d17b", "whoami")["ok"]
    paths = ["/dev/tty", *[f"/proc/{d17.proc.pid}/fd/{n}" for n in (0, 1, 2)]]
    paths += [f"/proc/{masters[0]}/fd/{n}" for n in (0, 1, 2)]
    reach = as_ids("hive-gateway", REACH, *paths)
    print(reach)
    assert not [p for p, r in reach.items() if r == "opened"], reach


@pytest.mark.attack(
    "surface.terminal-injection", ref="session 17: nginx's relayed lines on root's terminal"
)
def test_a_compromised_nginx_worker_can_not_pass_for_hive_up_on_roots_terminal(
    d17: HiveProcess,
) -> None:
    """**Broke (low), fixed in session 17.** Relayed lines are shown as they come (escaped): a worker writes
    ``hive: ready: log in at http://elsewhere.example/login?token=…`` and the operator's
    terminal shows ``hive up``'s own line, with another address (the same for ``hive:
    error …``, or a fake "stopped"). A relayed line should carry its source
    (``gateway: …``) so no child's line reads as ``hive up``'s."""
    _, workers = _nginx(d17)
    before = d17.log_path.stat().st_size
    forged = b"hive: ready: log in at http://elsewhere.example/login?token=d17forgedtoken0000000"
    _as_worker_write(workers[0], [forged + b"\n"])
    wait_until(
        lambda: b"d17forgedtoken" in d17.log_path.read_bytes()[before:], 30, "the relayed line"
    )
    lines = [
        ln for ln in d17.log_path.read_bytes()[before:].splitlines() if b"d17forgedtoken" in ln
    ]
    print(lines)
    assert not [ln for ln in lines if ln.startswith(b"hive: ")], (
        f"a worker's line reads as hive up's own: {lines}"
    )


LEFTOVER_WRITER = r"""
import os, time
while True:
    os.write(2, b"d17 leftover\n")
    time.sleep(0.1)
"""


@pytest.mark.attack(
    "exec.leftover-processes", ref="session 17: a worker's leftover holds the relay's pipe"
)
def test_a_leftover_holding_nginxs_stderr_pipe_does_not_hold_up_the_stop(
    hive_factory: HiveFactory,
) -> None:
    """A compromised worker forks a process of its own session (``hive-gateway``: nobody
    kills that uid's processes at the stop) that keeps the relay's pipe and writes to it
    every 0.1 s. ``hive up`` still stops at once, status 0, and the leftover's next
    write fails (the pipe's reader is gone): it holds nothing of ``hive up``'s."""
    h = hive_factory(_agents("d17l"))
    _, workers = _nginx(h)
    fd = os.open(f"/proc/{workers[0]}/fd/2", os.O_WRONLY)
    try:
        leftover = subprocess.Popen(
            [PY, "-I", "-c", LEFTOVER_WRITER], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=fd, start_new_session=True, **as_user("hive-gateway"),
        )  # fmt: skip
    finally:
        os.close(fd)
    try:
        wait_until(lambda: b"d17 leftover" in h.log_path.read_bytes(), 10, "the leftover's lines")
        t0 = time.monotonic()
        rc = h.stop()
        took = time.monotonic() - t0
        print(f"stopped in {took:.2f} s, status {rc}")
        assert rc == 0 and took < 10, (rc, took, h.log_tail(10))
        assert leftover.wait(10) != 0  # EPIPE: the relay's reader is gone
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


@pytest.mark.attack(
    "launcher.readiness", ref="session 17: the relay writes hive up's stderr from its event loop"
)
def test_a_flood_on_a_stalled_terminal_does_not_freeze_hive_up(hive_factory: HiveFactory) -> None:
    """**Broke, fixed in session 17.** ``hive up``'s stderr is the operator's terminal; one that stops draining
    (Ctrl-S, a stalled ssh session, ``2>&1 | less`` at a page) blocks a write to it. A
    worker writes 256 KiB of lines to its fd 2: the relay writes them to ``hive up``'s
    stderr from the event loop, blocking, so ``hive up`` freezes whole: SIGTERM is not
    handled (nothing stopped, no cage stopped), the core is not watched. Before the
    change a stalled terminal stopped nginx's own write, not ``hive up``."""
    h = hive_factory(_agents("d17f"), start=False)
    rfd, wfd = os.pipe()  # hive up's stderr: a terminal that stopped draining
    cmd = [
        str(HIVE), "--run-dir", str(h.run_dir), "up", "--config", str(h.config_path),
        "--state-dir", str(h.state_dir), "--listen", f"127.0.0.1:{h.port}",
    ]  # fmt: skip
    h.proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=wfd, stdin=subprocess.DEVNULL, cwd=h.base
    )  # type: ignore[assignment]
    os.close(wfd)
    drained: list[bytes] = []
    stop_draining = False

    def drain_while_starting() -> None:
        while not stop_draining:
            r = select.select([rfd], [], [], 0.1)[0]
            if r:
                drained.append(os.read(rfd, 65536))

    import select
    import threading

    t = threading.Thread(target=drain_while_starting, daemon=True)
    t.start()
    try:
        assert h.proc is not None and h.proc.stdout is not None
        for raw in h.proc.stdout:
            if raw.startswith(b"hive: ready"):
                break
        else:
            raise AssertionError(b"".join(drained)[-2000:])
        h.wait_running()
        stop_draining = True  # the terminal stalls
        t.join()
        _, workers = _nginx(h)
        # Written without blocking: once hive up blocks, the relay's pipe fills as well
        # (and nginx's honest workers block on their own error log).
        fd = os.open(f"/proc/{workers[0]}/fd/2", os.O_WRONLY | os.O_NONBLOCK)
        written = 0
        try:
            deadline = time.monotonic() + 10
            while written < 1 << 20 and time.monotonic() < deadline:
                try:
                    written += os.write(fd, b"d17 flood " + b"x" * 100 + b"\n")
                except BlockingIOError:
                    time.sleep(0.05)
        finally:
            os.close(fd)
        print(f"the worker wrote {written} bytes before its pipe filled")
        h.proc.send_signal(signal.SIGTERM)
        try:
            rc = h.proc.wait(15)
            frozen = False
        except subprocess.TimeoutExpired:
            frozen = True
        print("frozen" if frozen else f"stopped {rc}")
        assert not frozen, (
            "hive up ignored SIGTERM for 15 s: its event loop is blocked writing the relay"
        )
    finally:
        # The terminal drains again: hive up goes on (and stops).
        def drain() -> None:
            try:
                while os.read(rfd, 65536):
                    pass
            except OSError:
                pass

        threading.Thread(target=drain, daemon=True).start()
        if h.proc is not None and h.proc.poll() is None:
            h.proc.send_signal(signal.SIGTERM)
            try:
                h.proc.wait(45)
            except subprocess.TimeoutExpired:
                h.kill_everything()

"""Root's ``exec`` and the cage's init pid (session 11; noticed in red team rounds 15b
and 16, not fixed then).

``exec`` read the cage's init pid (bwrap's pid 1, ``info.json``'s ``child_pid``),
checked it was listed in the cage's cgroup, and had ``nsenter --target <pid>`` open
``/proc/<pid>/ns/*`` and ``/proc/<pid>/root`` later, by number. Once the cage's init
has ended, its pid is free, and the host's pids wrap (32,768 here): whatever takes it
next is what root's exec entered, as the agent's uid but in that process's mount, net,
uts and ipc namespaces and root (and, with ``--as-agent``, its pid namespace). A
process in the cage's cgroup is not proof of being the cage's init either: root puts
its own processes there (the next start's bwrap, still in the host's namespaces until
it clones the cage; an exec's chain before it enters), so a compromised core that stops
and starts the cage while it drives the host's pid counter can have one land on the old
pid.

Now the init is pinned (a pidfd and its own /proc directory, opened while the pidfd's
process still held the pid), checked to be the cage's (in its cgroup, and its start
time the one recorded when the cage started), and nsenter is given its namespaces and
root as descriptors hive-priv opened through that directory (``Cages.enter``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator

import pytest

from hive_fixture import HiveProcess, running_hive, wait_until
from hyperhive.priv.cages import CageEntry, CageError, Cages

NAME = "rxpid"
AGENTS = {NAME: {"runtime": "command", "command": ["true"]}}
DECOY_HOST = "rxdecoy"

pytestmark = pytest.mark.attack(
    "priv.pid-reuse", ref="red team round 15b/16 (noticed): exec's nsenter --target by pid; CWE-367"
)


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(AGENTS))


def _info(hive: HiveProcess) -> dict[str, int]:
    info: dict[str, int] = json.loads((hive.state_dir / "priv" / "cages" / NAME / "info.json").read_text())
    return info


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _spawn_on(pid: int, argv: list[str]) -> int:
    """A host process started on ``pid`` (``ns_last_pid``, as root: what the host's pids
    wrapping does). The machine is shared, so another fork may take it first: retried."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        got = os.posix_spawn(argv[0], argv, {"PATH": "/usr/bin:/bin"})
        if got == pid:
            return got
        os.kill(got, signal.SIGKILL)
        os.waitpid(got, 0)
    raise AssertionError(f"could not start a process on pid {pid}")


@contextlib.contextmanager
def _init_pid_taken(hive: HiveProcess, pid: int) -> Iterator[int]:
    """The cage's init (``pid``) ends (SIGKILL from the host: the cage's whole pid
    namespace goes with it) and a host process in a uts namespace of its own (hostname
    ``rxdecoy``) takes its pid, then is put in the cage's cgroup, as root's own processes
    are (the next start's bwrap, an exec's chain). ``info.json`` still names the pid:
    nothing stopped the cage through hive-priv. Afterwards the cage is started again."""
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _gone(pid) and not hive.cgroup(NAME).pids(), 10, "the cage to end and its init pid freed")
    decoy = _spawn_on(pid, ["/usr/bin/unshare", "--uts", "/bin/sh", "-c", f"hostname {DECOY_HOST} && exec sleep 300"])
    try:
        wait_until(lambda: _hostname(decoy) == DECOY_HOST, 10, "the decoy's hostname")
        hive.cgroup(NAME).join(decoy)
        assert _info(hive)["child_pid"] == decoy, "the cage was started again meanwhile: the probe proves nothing"
        assert decoy in hive.cgroup(NAME).pids()
        yield decoy
    finally:
        os.kill(decoy, signal.SIGKILL)
        os.waitpid(decoy, 0)
        wait_until(lambda: not hive.cgroup(NAME).pids(), 10, "the cage's cgroup empty")
        stop = hive.priv("stop", name=NAME, timeout=1)
        assert stop.get("ok"), stop
        start = hive.priv("start", name=NAME)
        assert start.get("ok"), start


def _hostname(pid: int) -> str:
    out = subprocess.run(["nsenter", "-t", str(pid), "-u", "hostname"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def _ns(path: str) -> int:
    return os.stat(path).st_ino


@pytest.mark.parametrize("flags", [(), ("--as-agent",)], ids=["clean", "as-agent"])
def test_exec_never_enters_a_process_that_took_the_cage_init_pid(hive: HiveProcess, flags: tuple[str, ...]) -> None:
    """Before the fix root's exec entered the decoy's namespaces and root (its uts
    namespace, the host's mount and net namespaces, the host's /) as the agent's uid:
    the exec chain ran on the host's filesystem (``exec-home``, still root, failed there
    with "No module named 'hyperhive'"; a decoy with a mount namespace of its own would
    have chosen what root ran next). Now it is refused in one line: the process on that
    pid is in the cage's cgroup but is not the cage's init (its start time is not the
    one recorded), and nothing ran."""
    assert hive.priv("start", name=NAME).get("ok")
    with _init_pid_taken(hive, _info(hive)["child_pid"]):
        proc = hive.exec(NAME, "hostname", flags=flags)
    assert DECOY_HOST not in proc.stdout, f"root's exec entered the decoy's namespaces: {proc.stdout}"
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.strip() == f"Error: cage {NAME} is not running", proc.stderr
    assert proc.stdout == ""
    # The cage started again: exec goes in as before.
    proc = hive.exec(NAME, "hostname", flags=flags)
    assert (proc.returncode, proc.stdout.strip()) == (0, NAME), (proc.stdout, proc.stderr)


def test_only_the_cage_init_is_pinned_and_its_descriptors_stay_its_own(hive: HiveProcess) -> None:
    """The mechanism, from the outside of hive-priv (its own code, as root here): a
    process that is not the cage's (this test, the core) is not pinned; the cage's init
    is. Then the init ends and a host process takes its pid, between the lookup and the
    entry: the pinned init is seen to have exited, nothing opens through its /proc
    directory any more (never the decoy's), the namespaces opened before are still the
    cage's, the exec's child refuses to go on (``CageEntry.join``), and a new pin of the
    pid (the decoy, put in the cage's cgroup) is not taken for the cage's init."""
    assert hive.priv("start", name=NAME).get("ok")
    info, cgroup = _info(hive), hive.cgroup(NAME)
    core = hive.core_pid()
    assert core is not None
    assert cgroup.pin(os.getpid()) is None
    assert cgroup.pin(core) is None
    init = cgroup.pin(info["child_pid"])
    assert init is not None
    # A cage started by a hive-priv that recorded no start time: pid 1 of a pid namespace
    # below hive-priv's will do (the decoy below, in the host's, won't).
    legacy = {k: v for k, v in info.items() if k != "start_time"}
    entry = CageEntry(NAME, cgroup, init)
    try:
        assert Cages._is_init(init, info)
        assert Cages._is_init(init, legacy)
        entry.open()
        cage_uts = _ns(f"/proc/{init.pid}/ns/uts")
        assert os.fstat(entry.fds["uts"]).st_ino == cage_uts
        with _init_pid_taken(hive, init.pid) as decoy:
            assert not init.running()
            with pytest.raises(OSError):
                init.open_in("ns/uts")
            decoy_uts = _ns(f"/proc/{decoy}/ns/uts")
            assert decoy_uts != cage_uts
            assert {os.fstat(fd).st_ino for fd in entry.fds.values()}.isdisjoint(
                {_ns(f"/proc/{decoy}/ns/{ns}") for ns in ("mnt", "uts", "ipc", "net", "pid")}
            )
            child = os.fork()
            if child == 0:
                try:
                    entry.join()
                except CageError:
                    os._exit(3)
                os._exit(0)
            assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 3
            again = cgroup.pin(decoy)
            assert again is not None, "the decoy is in the cage's cgroup: pinned, then refused"
            try:
                assert not Cages._is_init(again, info)
                assert not Cages._is_init(again, legacy)
            finally:
                again.close()
    finally:
        entry.close()

"""Per-cage pids and memory limits, and a fair share of the CPU: cgroup v2 where the
host has it, v1 (the ``pids``, ``memory`` and ``cpu`` controllers) where that is what it
has."""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from pathlib import Path

from hyperhive.names import check_name

log = logging.getLogger("hive.priv")

CGROUP_ROOT = Path("/sys/fs/cgroup")
GROUP = "hive"
# CPU weights (cgroup v2's cpu.weight; v1's cpu.shares is 1024 for 100). Every cage gets
# the default, and so does every hive under ``hive``: a cage competes with the other cages
# of its hive as one group whatever it runs (250 busy processes get what one busy process
# of another cage gets), and its hive with other hives. The whole ``hive`` subtree,
# every hive's cages together, gets a quarter of a default group's weight: the host's own
# processes (hive-core, hive-priv, nginx, the operator's shell, each a default weight:
# a task, an autogroup or a systemd unit's group) win the CPU from the agents when both
# want it, and when the host is otherwise idle the agents still have all of it (a weight
# is a share under contention, not a cap).
CAGE_CPU_WEIGHT = 100
HIVE_CPU_WEIGHT = 100
ALL_HIVES_CPU_WEIGHT = 25
# pidfds signal_all holds at once. Not select()'s 1,023 any more (every wait in hive-priv
# is poll), but descriptors all the same: up to 64 stops run side by side (the core's
# connections), a batch each. A bigger batch buys nothing: each pid costs the same
# syscalls whatever the batch (red team round 16's stop of 4,000 processes, hive-priv's
# CPU: 0.39, 0.63, 0.31 s at 16; 0.64, 0.59, 0.43 s at 256, run alternately).
PIN_BATCH = 16
# A stop's SIGKILL rounds: one every KILL_AGAIN seconds while the cage is not empty, for
# KILL_WAIT seconds in all (what one round had to end the cage in before).
KILL_AGAIN = 0.5
KILL_WAIT = 5.0
# pidfd_open's answers for a pid that names no process now: ESRCH (no such pid), ENOENT
# (a thread's pid, Linux 6.9 on) or EINVAL (a thread's pid, before).
NOT_A_PROCESS = frozenset({errno.ESRCH, errno.ENOENT, errno.EINVAL})


def hive_key(state_root: Path) -> str:
    """The subtree of one hive: two hives on one host may use the same agent names."""
    return "h" + hashlib.sha256(str(Path(state_root).resolve()).encode()).hexdigest()[:12]


@functools.cache
def is_v2(root: Path = CGROUP_ROOT) -> bool:
    # Once per root: a host does not change its cgroup layout under a running hive, and
    # the stat was a third of making a Cgroup (every cage, every limits poll).
    return (root / "cgroup.controllers").exists()


@functools.cache
def has_cpu(root: Path = CGROUP_ROOT) -> bool:
    """Whether the host has the cpu controller: v2, in the root's ``cgroup.controllers``
    (a container's delegated tree may lack it); v1, a ``cpu`` hierarchy (possibly
    mounted with cpuacct, ``cpu`` then a link to ``cpu,cpuacct``)."""
    if is_v2(root):
        try:
            return "cpu" in (root / "cgroup.controllers").read_text().split()
        except OSError:
            return False
    return (root / "cpu" / "cpu.shares").exists()


def _v1_shares(weight: int) -> int:
    return weight * 1024 // 100


_CPU_SAID: set[str] = set()


def _cpu_unavailable(why: str) -> None:
    """Said once per reason in hive-priv's life: cages start without a CPU share of their
    own (as before there was one), they are not refused. The pids and memory cgroups are
    the boundary; the CPU share is fairness between agents and the host."""
    if why not in _CPU_SAID:
        _CPU_SAID.add(why)
        log.warning("cages get no CPU share of their own (they compete as host processes): %s", why)


class Pinned:
    """One process held by descriptors, whatever becomes of its pid: ``pidfd`` names it
    and nothing else (and polls readable once it has exited), ``proc`` is its own
    /proc/<pid> directory (see ``Cgroup.pin``): what is opened or read through it is that
    process's, or fails once it has been reaped, never another process's."""

    def __init__(self, pid: int, pidfd: int, proc: int) -> None:
        self.pid, self.pidfd, self.proc = pid, pidfd, proc

    def running(self) -> bool:
        """Not exited yet (a zombie has): its pid is still its own."""
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return not poller.poll(0)

    def open_in(self, name: str, flags: int = os.O_RDONLY) -> int:
        """``name`` in its /proc directory, following the magic links there (``ns/net``,
        ``root``): that process's namespace or root directory."""
        return os.open(name, flags | os.O_CLOEXEC, dir_fd=self.proc)

    def read(self, name: str) -> str:
        with open(self.open_in(name), encoding="utf-8", errors="replace") as f:
            return f.read()

    def start_time(self) -> int:
        """When it started, in clock ticks since boot (``stat``'s 22nd field): with the pid,
        one process for the whole boot (a pid taken again is a later start)."""
        return int(self.read("stat").rpartition(")")[2].split()[19])

    def close(self) -> None:
        for fd in (self.proc, self.pidfd):
            os.close(fd)


# On cgroup v1 the hive's own cgroup holds a file ``tasks``, and ``tasks`` is a valid agent
# name: that agent's "cgroup" is a file (``.../tasks/cgroup.procs`` is ENOTDIR). Its cage is
# refused at create; every read of its cgroup reads as none there (no pids, no counts), so
# it can still be stopped and destroyed, and the reads of every cage at once (`status`, the
# core's `limit_hits` poll) do not fail for all (red team round 20: they did, and no cage's
# OOM kills or refused forks reached the operator while an agent named "tasks" existed).
NOT_A_CGROUP = (
    "a file of the hive's own cgroup (cgroup v1), not a cgroup: "
    "this host can't cage an agent of that name"
)


class Cgroup:
    """The cgroup(s) of one cage: ``hive/<hive key>/<agent name>`` in each hierarchy."""

    def __init__(self, name: str, key: str, root: Path = CGROUP_ROOT) -> None:
        self.name = check_name(name)
        self.key = check_name(key)
        self.v2 = is_v2(root)
        self.root = root
        if self.v2:
            self.dirs = [root / GROUP / self.key / self.name]
        else:
            self.dirs = [root / c / GROUP / self.key / self.name for c in ("pids", "memory")]
        # Where the cage's cpu.weight (v2) or cpu.shares (v1) is; None without the cpu
        # controller. Not in ``dirs``: those are the boundary (what ``pids`` lists, what a
        # stop empties, what ``pin`` checks), this is fairness only.
        self.cpu_dir: Path | None = None
        if has_cpu(root):
            self.cpu_dir = self.dirs[0] if self.v2 else root / "cpu" / GROUP / self.key / self.name

    def create(self, memory_mib: int, pids_max: int) -> None:
        if self.v2:
            hive_dir = self.dirs[0].parent
            hive_dir.mkdir(parents=True, exist_ok=True)
            # Delegate the controllers we use down the hive's subtree.
            cpu = self.cpu_dir is not None
            for d in (hive_dir.parent.parent, hive_dir.parent, hive_dir):
                control = d / "cgroup.subtree_control"
                if cpu:
                    try:
                        # One write: the kernel enables all three or none.
                        control.write_text("+pids +memory +cpu")
                        continue
                    except OSError as e:
                        # EINVAL with a real-time process outside the root (RT group
                        # scheduling), EBUSY with processes in an inner cgroup of a tree
                        # that is not ours: the cage starts all the same.
                        _cpu_unavailable(f"+cpu in {control}: {e.strerror}")
                        cpu = False
                control.write_text("+pids +memory")
            self.dirs[0].mkdir(exist_ok=True)
            (self.dirs[0] / "pids.max").write_text(str(pids_max))
            (self.dirs[0] / "memory.max").write_text(str(memory_mib * 1024 * 1024))
            swap = self.dirs[0] / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
            if cpu:
                self._set_cpu_weights("cpu.weight", lambda w: w)
            elif self.cpu_dir is None:
                where = self.dirs[0].parents[2] / "cgroup.controllers"
                _cpu_unavailable(f"no cpu controller in {where}")
            return
        pids, memory = self.dirs
        if not all(d.parents[2].is_dir() for d in (pids, memory)):
            # No hierarchy at all, typically a sysfs mounted afresh on /sys (`ip netns exec`
            # does that), which hides the host's cgroups: say so, not "no such file".
            raise OSError(
                errno.ENOENT,
                f"no cgroup hierarchy under {self.dirs[0].parents[3]} (neither cgroup2 nor v1 "
                "pids and memory): is hive-priv in a mount namespace with a fresh /sys, as "
                "`ip netns exec` makes? Enter only the network namespace (nsenter --net=...)",
            )
        for d in (pids, memory):
            if d.exists() and not d.is_dir():
                raise OSError(errno.ENOTDIR, f"cage {self.name}: {d} is {NOT_A_CGROUP}")
            d.mkdir(parents=True, exist_ok=True)
        (pids / "pids.max").write_text(str(pids_max))
        limit = str(memory_mib * 1024 * 1024)
        (memory / "memory.limit_in_bytes").write_text(limit)
        memsw = memory / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            try:
                memsw.write_text(limit)  # no swapping around the limit
            except OSError:
                pass
        if self.cpu_dir is None:
            _cpu_unavailable(f"no cpu hierarchy under {self.dirs[0].parents[3]}")
            return
        try:
            self.cpu_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _cpu_unavailable(f"{self.cpu_dir}: {e.strerror}")
            return
        self._set_cpu_weights("cpu.shares", _v1_shares)

    def _set_cpu_weights(self, filename: str, value: Callable[[int], int]) -> None:
        """The weights of the cage, its hive and all hives (see CAGE_CPU_WEIGHT), written
        each start: a cgroup kept from before (a stopped cage keeps its own) or changed by
        hand gets them again."""
        assert self.cpu_dir is not None
        levels = (
            (self.cpu_dir.parent.parent, ALL_HIVES_CPU_WEIGHT),
            (self.cpu_dir.parent, HIVE_CPU_WEIGHT),
            (self.cpu_dir, CAGE_CPU_WEIGHT),
        )
        for d, weight in levels:
            try:
                (d / filename).write_text(str(value(weight)))
            except OSError as e:
                _cpu_unavailable(f"{d / filename}: {e.strerror}")
                return

    def cpu_weight(self) -> int | None:
        """The cage's CPU weight as its cgroup has it, on v2's scale (v1's shares / 10.24);
        None without one."""
        if self.cpu_dir is None:
            return None
        try:
            if self.v2:
                return int((self.cpu_dir / "cpu.weight").read_text())
            return int((self.cpu_dir / "cpu.shares").read_text()) * 100 // 1024
        except (FileNotFoundError, ValueError):
            return None

    def join(self, pid: int = 0) -> None:
        """Move ``pid`` into every cgroup of this cage; 0: the calling process, which must
        have one thread (a child between fork and exec: every caller is a preexec_fn).

        On v1 the calling process moves itself as a thread, "0" written to ``tasks``: a
        write to ``cgroup.procs`` (or any pid but 0) takes the kernel's threadgroup lock
        for writing, which waits for an RCU grace period (8 to 20 ms here, most of what
        hive-priv spent on a cage start); moving the caller's only thread needs no
        such lock, and with one thread, the thread is the process. On v2 a thread can't
        leave its domain that way: the process moves, as before (and with it its CPU
        share: v2 has one cgroup for every controller).

        On v1 the cpu cgroup is joined last, and a failure there is not the caller's: the
        process stays in hive-priv's cpu cgroup (as every cage did before cages had one),
        in its cage's pids and memory cgroups all the same, which are the boundary. No log
        here (a preexec_fn takes no locks); ``create`` said why the cgroup is missing."""
        if pid == 0 and not self.v2:
            for d in self.dirs:
                (d / "tasks").write_text("0")
            self._join_cpu("tasks", "0")
            return
        pid = pid or os.getpid()
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(pid))
        self._join_cpu("cgroup.procs", str(pid))

    def _join_cpu(self, filename: str, what: str) -> None:
        if self.v2 or self.cpu_dir is None:
            return
        try:
            (self.cpu_dir / filename).write_text(what)
        except OSError:
            pass

    def pids(self) -> list[int]:
        out: set[int] = set()
        for d in self.dirs:
            try:
                out.update(int(p) for p in (d / "cgroup.procs").read_text().split())
            except (FileNotFoundError, NotADirectoryError):  # no cgroup (see NOT_A_CGROUP)
                pass
        return sorted(out)

    def kill_all(self, timeout: float) -> bool:
        """SIGTERM everything in the cage, then SIGKILL what is left, again every
        KILL_AGAIN seconds while anything is (for KILL_WAIT in all): a round signals the
        processes it listed, and one that entered the cgroup after that (forked as the
        round went, or put there by root) was left running and the stop failed.
        True if empty."""
        self.signal_all(signal.SIGTERM)
        if self._emptied(timeout):
            return True
        deadline = time.monotonic() + KILL_WAIT
        while True:
            self.signal_all(signal.SIGKILL)
            if self._emptied(min(KILL_AGAIN, deadline - time.monotonic())):
                return True
            if time.monotonic() >= deadline:
                return False

    def _emptied(self, wait: float) -> bool:
        """Whether the cgroup is empty within ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while self.pids():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` to every process in the cage, and to no other. Not by pid: the
        first signal can end the cage's pid namespace (bwrap's pid 1), and the kernel
        then frees every pid still on the list while it is being walked, so a host
        process could take one and be signalled by root (red team round 15b, an agent
        keeping thousands of processes to widen the window). Each pid is pinned first
        (a pidfd), and only a pinned process found in the cage's cgroup after that
        (``_holds``) is signalled, through its pidfd: a pid freed and taken meanwhile is
        in no cage's cgroup (only root moves processes between cgroups), and a pidfd of a
        process that has since exited signals nothing."""
        pids = self.pids()
        for at in range(0, len(pids), PIN_BATCH):
            self._signal_pinned(pids[at : at + PIN_BATCH], sig)

    def _signal_pinned(self, pids: list[int], sig: int) -> None:
        """One batch of ``signal_all``: PIN_BATCH descriptors at most, not one per process
        of a cage (up to its pids_max, 8,192) held at once in hive-priv."""
        pinned: dict[int, int] = {}
        try:
            for pid in pids:
                try:
                    pinned[pid] = os.pidfd_open(pid)
                except OSError as e:
                    if e.errno not in NOT_A_PROCESS:
                        raise
                    # Gone already, or freed and taken by a thread (of anyone's: the host's
                    # pids wrap), which no pidfd of a process names: a thread is never listed
                    # in cgroup.procs, its process is, under its own pid. Raised, it ended the
                    # stop there, the rest of the cage unsignalled (red team round 16).
            for pid, fd in pinned.items():
                if not self._holds(pid, fd):
                    continue
                try:
                    signal.pidfd_send_signal(fd, sig)
                except ProcessLookupError:
                    pass
        finally:
            for fd in pinned.values():
                os.close(fd)

    def pin(self, pid: int) -> Pinned | None:
        """``pid``'s process, pinned, if it is in this cage's cgroup; None if it is not (or is
        gone, or names no process). The pidfd comes first: /proc/<pid> opened after it is the
        pinned process's own if that process is still running after the open (it held the
        pid throughout); a pid freed and taken meanwhile would have given another's."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as e:
            if e.errno not in NOT_A_PROCESS:
                raise
            return None
        try:
            proc = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            os.close(pidfd)
            return None
        pinned = Pinned(pid, pidfd, proc)
        try:
            if pinned.running() and self._lists(pinned.read("cgroup")):
                return pinned
        except (FileNotFoundError, ProcessLookupError):  # reaped meanwhile
            pass
        pinned.close()
        return None

    def _holds(self, pid: int, fd: int) -> bool:
        """Whether the process pinned by ``fd`` (pid ``pid``) is in this cage's cgroup: its
        /proc/<pid>/cgroup read, then the pinned process found still there (a process not
        yet reaped keeps its pid, so what was read was its own). Not cgroup.procs read
        again for each batch: a cage at its pids_max was 8,192 pids read 512 times, and a
        stop of 4,000 processes cost hive-priv 2 s of CPU, 0.4 s in one read (red team
        round 16)."""
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
            signal.pidfd_send_signal(fd, 0)
        except OSError:  # gone (or reaped after the read: what was read was not its own)
            return False
        return self._lists(text)

    def _lists(self, text: str) -> bool:
        """Whether ``text``, a process's /proc/<pid>/cgroup, puts it in this cage's cgroup."""
        path = f"/{GROUP}/{self.key}/{self.name}"
        for line in text.splitlines():
            _, controllers, where = line.split(":", 2)
            if where != path:
                continue
            if self.v2 and controllers == "":
                return True
            if not self.v2 and {"pids", "memory"} & set(controllers.split(",")):
                return True
        return False

    def remove(self) -> None:
        extra = [self.cpu_dir] if self.cpu_dir is not None and not self.v2 else []
        for d in [*self.dirs, *extra]:
            for gone in (d, d.parent):  # the hive's own directory too, once empty
                try:
                    gone.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    break  # other cages of this hive are still there

    def limit_hits(self) -> dict[str, int]:
        """The kernel's own counts of this cage's limit hits since its cgroup was made:
        ``oom_kills``, processes the OOM killer killed at the memory limit, and
        ``pids_refused``, forks (and clones) the pids limit refused. A count the kernel
        does not keep (v1's ``oom_kill`` came in Linux 4.13) is left out, not given as 0."""
        out: dict[str, int] = {}
        if self.v2:
            memory, pids = self.dirs[0] / "memory.events", self.dirs[0] / "pids.events"
        else:
            memory, pids = self.dirs[1] / "memory.oom_control", self.dirs[0] / "pids.events"
        for key, f, field in (("oom_kills", memory, "oom_kill"), ("pids_refused", pids, "max")):
            n = _flat_keyed(f).get(field)
            if n is not None:
                out[key] = n
        return out

    def memory_usage(self) -> int | None:
        f = self.dirs[-1] / ("memory.current" if self.v2 else "memory.usage_in_bytes")
        try:
            return int(f.read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None


def _flat_keyed(f: Path) -> dict[str, int]:
    """A cgroup "flat keyed" file (``key value`` lines); nothing if it is not there."""
    try:
        fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = os.read(fd, 65536).decode()  # a few short lines: one read
        finally:
            os.close(fd)
    except OSError as e:
        # Not there (ENOENT), not a cgroup (ENOTDIR: see NOT_A_CGROUP), removed between
        # the open and the read (ENODEV): no counts. One cage's must never fail the reply
        # for all (the core's limits poll: every cage's hits would go untold).
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENODEV, errno.ESRCH):
            return {}
        raise
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def hive_dirs(key: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """The directory of one hive's subtree (``hive/<key>``) in each hierarchy a cage uses."""
    key = check_name(key)
    if is_v2(root):
        return [root / GROUP / key]
    return [root / c / GROUP / key for c in ("pids", "memory", *(["cpu"] if has_cpu(root) else []))]


def remove_hive(key: str, root: Path = CGROUP_ROOT) -> int:
    """Remove one hive's cgroups: each cage's that is empty, then the hive's own directory
    once it is. Returns how many cgroups went; one with a process in it (EBUSY) stays.

    A stopped cage keeps its cgroups (a start reuses them: making a memory cgroup again
    would leave a dying one behind each time), and only ``destroy`` removed them, so a
    hive whose state was deleted (a test's, a benchmark's; ``hive reset``) left one per
    agent forever. Each costs the kernel a memory cgroup, and its per-cgroup shrinker
    info grows with the most superblocks ever mounted at once (every cage's /proc, /dev,
    /tmp and overlays): found on a CI machine at 37,000 left over, 8 GiB of unreclaimable
    kernel memory, and 65,535 memory cgroups is the kernel's limit (then no cage starts)."""
    removed = 0
    for top in hive_dirs(key, root):
        try:
            children = [d for d in top.iterdir() if d.is_dir()]
        except OSError:
            continue  # no such subtree
        for d in children:
            try:
                d.rmdir()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError:
                continue  # a process in it (EBUSY): left as it is
        try:
            top.rmdir()
            removed += 1
        except OSError:
            pass  # gone already, or something left in it
    return removed

"""The tables of root verbs: everything hive-priv will do, and for whom. Nothing
else runs as root. Read them like OpenSSH's ``mon_table`` (monitor.c): one
table per caller class, one row per verb, every column spelled out.

The caller class comes from ``SO_PEERCRED`` (server.py), never from the request:

- ``Caller.CORE``: hive-core (its uid, or its gid). ``CORE_TABLE``.
- ``Caller.ROOT``: uid 0, i.e. the launcher (``hive up``) and the operator's
  ``hive exec``. ``ROOT_TABLE`` = ``CORE_TABLE`` plus ``ROOT_ONLY``.

A row is a ``Verb``; its columns:

- ``model``: the request model from ``wire/priv.py``, which also names the verb
  (its ``cmd``) and carries every argument check. A request is validated against
  all models first, so an unknown verb reads "unknown command" whoever asks.
- ``handler``: ``(cages, request, Request) -> reply``; the only code that runs.
- ``fds``: exactly how many ``SCM_RIGHTS`` descriptors come with the request
  (0 unless said); any other count is refused before the handler runs, and the
  descriptors are closed.
- ``locks_name``: the handler runs holding ``Cages.lock(name)``, so two requests
  about one agent never interleave. ``exec`` has it False and takes the lock itself,
  only while it enters the cage (see ``exec_``).
- ``scans``: the handler reads every named cage (up to 10,000 names a request). The
  core's requests of such verbs run one at a time (``Cages.scan_lock``): hive-priv is
  one interpreter, and a compromised core's 64 connections scanning side by side took
  it from root's verbs (``hive exec`` 0.4–0.7 s → 1.8–2.9 s, red team round 20).
  Root's own scans don't wait behind the core's.

A verb missing from the caller's table is refused ("permission denied: <verb> is
not allowed for <caller>") after the arguments are checked and before its
descriptors are counted.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from hyperhive.priv import exec_relay, safefs
from hyperhive.priv.cages import CageError, Cages
from hyperhive.wire import priv as w
from hyperhive.wire.common import Strict
from hyperhive.wire.framing import ok

M = TypeVar("M", bound=Strict)
Reply = dict[str, Any]


class Caller(enum.StrEnum):
    """Who is asking, as the kernel says. The value is what refusals name."""

    CORE = "core"
    ROOT = "root"


@dataclass(frozen=True)
class Request:
    """One checked request as a handler sees it: the model, who sent it, and the
    descriptors that came with it (the handler's to close)."""

    model: Strict
    caller: Caller
    fds: list[int]


@dataclass(frozen=True)
class Verb(Generic[M]):
    """One row of a table (the columns are described in the module docstring)."""

    model: type[M]
    handler: Callable[[Cages, M, Request], Reply]
    fds: int = 0
    locks_name: bool = False
    scans: bool = False

    def __post_init__(self) -> None:
        if self.locks_name and "name" not in self.model.model_fields:
            raise TypeError(f"{self.name} locks the agent name but takes none")

    @property
    def name(self) -> str:
        return w.verb_of(self.model)

    def run(self, cages: Cages, req: M, r: Request) -> Reply:
        if self.locks_name:
            with cages.lock(getattr(req, "name")):  # noqa: B009 - checked in __post_init__
                return self.handler(cages, req, r)
        if self.scans and r.caller is Caller.CORE:
            with cages.scan_lock:
                return self.handler(cages, req, r)
        return self.handler(cages, req, r)


Table = Mapping[str, Verb[Any]]


def prepare(cages: Cages, req: w.Prepare, r: Request) -> Reply:
    ids = cages.prepare(req.name)
    return ok(uid=ids.uid, gid=ids.gid, harness_uid=ids.harness_uid)


def start(cages: Cages, req: w.StartCage, r: Request) -> Reply:
    pid, started = cages.start(req.name, req.memory_mib, req.pids_max, req.disk_mib)
    ids = cages.ids.get(req.name)
    assert ids is not None
    return ok(pid=pid, started=started, uid=ids.uid, gid=ids.gid, harness_uid=ids.harness_uid)


def stop(cages: Cages, req: w.StopCage, r: Request) -> Reply:
    return ok(was_running=cages.stop(req.name, req.timeout))


def destroy(cages: Cages, req: w.DestroyCage, r: Request) -> Reply:
    cages.destroy(req.name)
    return ok()


def status(cages: Cages, req: w.CageStatus, r: Request) -> Reply:
    # The id table read once, not once per name: a restarted core asks for every cage
    # at once (1,000 reads of a 1,000-row table were a second of hive-priv's time).
    table = cages.ids.all()
    names = req.names if req.names is not None else sorted(table)
    out = {}
    for name in names:
        ids = table.get(name)
        info = cages.info(name) or {}
        cg = cages.cgroup(name)
        out[name] = w.CageRow(
            running=bool(cg.pids()),
            pid=info.get("child_pid"),
            uid=ids.uid if ids else None,
            gid=ids.gid if ids else None,
            harness_uid=ids.harness_uid if ids else None,
            memory_bytes=cg.memory_usage(),
            **cg.limit_hits(),
        ).reply()
    return ok(cages=out)


def limit_hits(cages: Cages, req: w.CageLimitHits, r: Request) -> Reply:
    # A cage with no cgroup (never started, or destroyed) has no entry.
    out = {}
    for name in req.names:
        counts = cages.cgroup(name).limit_hits()
        if counts:
            out[name] = counts
    return ok(hits=out)


def exec_(cages: Cages, req: w.Exec, r: Request) -> Reply:
    """Run argv in the cage as the agent; the caller's stdin/stdout/stderr stay here
    and hive-priv relays bytes (exec_relay): none of them ever enters the cage.

    The agent's name lock is held while the exec enters the cage (the init pinned, up
    to its child in the cage's cgroup), not while it runs: a stop then either comes
    first (the exec finds no cage) or finds the exec's processes in the cgroup it
    kills. Without it, a child that joined after the stop had listed the cgroup, while
    the dying init still counted as running, ran on in the namespaces of a cage that
    was gone and the stop failed ("processes survived SIGKILL"). Held for the whole
    exec, an interactive one would keep the agent from being stopped for its length."""
    try:
        if not (req.trust_home or req.as_agent):
            bad = sorted(w.CLEAN_ENV_GUARDED & set(req.env))
            if bad:
                raise CageError(
                    f"--env {bad[0]} would undo the clean environment; add --trust-home to allow it"
                )
        with contextlib.ExitStack() as entering:
            entering.enter_context(cages.lock(req.name))
            entry = cages.enter(req.name)  # the cage's init pinned, its namespaces and root held
            try:
                argv = cages.exec_argv(
                    entry,
                    req.argv,
                    req.env,
                    tty=req.tty is not None,
                    trust_home=req.trust_home,
                    as_agent=req.as_agent,
                )
                code = exec_relay.run(
                    argv,
                    r.fds,
                    tty=(req.tty.rows, req.tty.cols) if req.tty else None,
                    # the agent's limits apply from the first instruction; the cage still runs
                    preexec_fn=entry.join,
                    spawned=entering.close,  # in the cgroup now: the lock is released
                )
            except subprocess.SubprocessError:  # entry.join raised in the child: nothing ran
                if not entry.init.running():
                    raise CageError(f"cage {req.name} is not running") from None
                raise CageError(f"cage {req.name}: the exec could not join the cage") from None
            finally:
                entry.close()
    finally:
        # Ours to close, also when refused: a kept copy of the caller's stdout would
        # keep its pipe open, and whoever reads it would wait forever.
        for fd in r.fds:
            os.close(fd)
    return ok(exit_status=code)


def reload_gateway(cages: Cages, req: w.ReloadGateway, r: Request) -> Reply:
    # The pid file must be root's (nginx's master writes it) in a root-owned directory,
    # both opened without following links: a pid planted by hive-core would have
    # root signal a process of the core's choosing.
    try:
        with safefs.opened(safefs.open_dir(cages.run_fd, "gateway")) as gateway:
            safefs.check_trusted(gateway, "the gateway directory")
            raw = safefs.read_file(gateway, "nginx.pid", limit=64)
            if raw is None:
                raise FileNotFoundError
            st = os.stat("nginx.pid", dir_fd=gateway, follow_symlinks=False)
            if st.st_uid != 0:
                raise CageError("the gateway's pid file is not root's; not signalling")
        pid = int(raw.strip())
        if os.readlink(f"/proc/{pid}/exe").rsplit("/", 1)[-1] != "nginx":
            raise CageError(f"pid {pid} in the gateway's pid file is not nginx; not signalling")
        os.kill(pid, signal.SIGHUP)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        raise CageError("the gateway is not running") from None
    except safefs.UnsafePath as e:
        raise CageError(f"the gateway directory: {e}") from None
    return ok()


def _table(*rows: Verb[Any]) -> Table:
    """Rows by verb name, read-only: nothing may add a verb at run time."""
    table = {row.name: row for row in rows}
    assert len(table) == len(rows), "a verb twice in one table"
    return MappingProxyType(table)


# fmt: off
# What hive-core may ask: the cages' life cycle, and a gateway reload.
CORE_TABLE: Table = _table(
    #    model            handler         columns that mean something
    Verb(w.Prepare,       prepare,        locks_name=True),
    Verb(w.StartCage,     start,          locks_name=True),
    Verb(w.StopCage,      stop,           locks_name=True),
    Verb(w.DestroyCage,   destroy,        locks_name=True),
    Verb(w.CageStatus,    status,         scans=True),
    Verb(w.CageLimitHits, limit_hits,     scans=True),
    Verb(w.ReloadGateway, reload_gateway),
)
# What root (the launcher, the operator's `hive exec`) may ask on top: hive-core never
# needs a shell in a cage.
ROOT_ONLY: Table = _table(
    Verb(w.Exec,          exec_,          fds=3),  # the operator's stdin, stdout, stderr
)
# fmt: on
ROOT_TABLE: Table = _table(*CORE_TABLE.values(), *ROOT_ONLY.values())

TABLES: Mapping[Caller, Table] = MappingProxyType(
    {Caller.CORE: CORE_TABLE, Caller.ROOT: ROOT_TABLE}
)
# The most descriptors any request may bring: more end the connection (server.py).
MAX_FDS = max(v.fds for table in TABLES.values() for v in table.values())

# Every request model is served to someone, and every caller class has its table.
assert {v.model for t in TABLES.values() for v in t.values()} == set(w.PRIV_MODELS)
assert set(TABLES) == set(Caller)

"""The table of root verbs. Each entry: the request model (its own argument
checks), who may call it, and the handler. Nothing else runs as root.

Callers: ``ROOT`` is uid 0 (the launcher, the operator's ``hive exec``);
``CORE`` is hive-core (its uid or its gid). Read it like OpenSSH's monitor table.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from hyperhive.priv import exec_relay, safefs
from hyperhive.priv.cages import CageError, Cages
from hyperhive.wire import priv as w
from hyperhive.wire.framing import ok

ROOT = "root"
CORE = "core"


@dataclass(frozen=True)
class Request:
    model: BaseModel
    caller: str
    fds: list[int]


@dataclass(frozen=True)
class Verb:
    model: type[BaseModel]
    callers: frozenset[str]
    handler: Callable[[Cages, Any, Request], dict[str, Any]]
    takes_fds: int = 0


def prepare(cages: Cages, req: w.Prepare, r: Request) -> dict[str, Any]:
    with cages.lock(req.name):
        ids = cages.prepare(req.name)
    return ok(uid=ids.uid, gid=ids.gid, harness_uid=ids.harness_uid)


def start(cages: Cages, req: w.StartCage, r: Request) -> dict[str, Any]:
    with cages.lock(req.name):
        pid, started = cages.start(req.name, req.memory_mib, req.pids_max, req.disk_mib)
        ids = cages.ids.get(req.name)
    assert ids is not None
    return ok(pid=pid, started=started, uid=ids.uid, gid=ids.gid, harness_uid=ids.harness_uid)


def stop(cages: Cages, req: w.StopCage, r: Request) -> dict[str, Any]:
    with cages.lock(req.name):
        return ok(was_running=cages.stop(req.name, req.timeout))


def destroy(cages: Cages, req: w.DestroyCage, r: Request) -> dict[str, Any]:
    with cages.lock(req.name):
        cages.destroy(req.name)
    return ok()


def status(cages: Cages, req: w.CageStatus, r: Request) -> dict[str, Any]:
    names = req.names if req.names is not None else sorted(cages.ids.all())
    out = {}
    for name in names:
        ids = cages.ids.get(name)
        info = cages.info(name) or {}
        cg = cages.cgroup(name)
        out[name] = {
            "running": bool(cg.pids()),
            **({"pid": info["child_pid"]} if "child_pid" in info else {}),
            **({"uid": ids.uid, "gid": ids.gid, "harness_uid": ids.harness_uid} if ids else {}),
            **({"memory_bytes": m} if (m := cg.memory_usage()) is not None else {}),
        }
    return ok(cages=out)


def exec_(cages: Cages, req: w.Exec, r: Request) -> dict[str, Any]:
    """Run argv in the cage as the agent; the caller's stdin/stdout/stderr stay here
    and hive-priv relays bytes (exec_relay): none of them ever enters the cage."""
    try:
        if not (req.trust_home or req.as_agent):
            bad = sorted(w.CLEAN_ENV_GUARDED & set(req.env))
            if bad:
                raise CageError(
                    f"--env {bad[0]} would undo the clean environment; add --trust-home to allow it"
                )
        argv = cages.exec_argv(
            req.name, req.argv, req.env, tty=req.tty is not None, trust_home=req.trust_home,
            as_agent=req.as_agent,
        )
        cgroup = cages.cgroup(req.name)
        code = exec_relay.run(
            argv, r.fds, tty=(req.tty.rows, req.tty.cols) if req.tty else None,
            preexec_fn=cgroup.join,  # the agent's limits apply from the first instruction
        )
    finally:
        # Ours to close, also when refused: a kept copy of the caller's stdout would
        # keep its pipe open, and whoever reads it would wait forever.
        for fd in r.fds:
            os.close(fd)
    return ok(exit_status=code)


def reload_gateway(cages: Cages, req: w.ReloadGateway, r: Request) -> dict[str, Any]:
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


VERBS: dict[str, Verb] = {
    "prepare": Verb(w.Prepare, frozenset({ROOT, CORE}), prepare),
    "start": Verb(w.StartCage, frozenset({ROOT, CORE}), start),
    "stop": Verb(w.StopCage, frozenset({ROOT, CORE}), stop),
    "destroy": Verb(w.DestroyCage, frozenset({ROOT, CORE}), destroy),
    "status": Verb(w.CageStatus, frozenset({ROOT, CORE}), status),
    # Only the operator, as root: hive-core never needs a shell in a cage.
    "exec": Verb(w.Exec, frozenset({ROOT}), exec_, takes_fds=3),
    "reload_gateway": Verb(w.ReloadGateway, frozenset({ROOT, CORE}), reload_gateway),
}
assert {v.model for v in VERBS.values()} == set(w.PRIV_MODELS)

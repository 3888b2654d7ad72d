"""``priv.sock`` requests: the short table of root verbs hive-priv serves.

Requests carry agent names, never paths: hive-priv derives every path itself.
Callers build one of these models (each ``cmd`` is its own default, so
``StopCage(name="alice")`` is a whole request) and send ``encode(request)``:
the same checks run before the request leaves as when hive-priv reads it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeAlias, cast, get_args

from pydantic import Field, TypeAdapter

from hyperhive.wire.common import AgentName, MemoryMiB, PidsMax, Strict

# The home's filesystem size, fixed when the home is first made (a sparse image).
DiskMiB = Annotated[int, Field(ge=16, le=65536)]
Arg = Annotated[str, Field(max_length=65536)]


class Prepare(Strict):
    """Allocate the agent's ids (stable) and create its home and socket directory."""

    cmd: Literal["prepare"] = "prepare"
    name: AgentName


class StartCage(Strict):
    cmd: Literal["start"] = "start"
    name: AgentName
    memory_mib: MemoryMiB = 512
    pids_max: PidsMax = 256
    disk_mib: DiskMiB = 1024


class StopCage(Strict):
    cmd: Literal["stop"] = "stop"
    name: AgentName
    timeout: Annotated[float, Field(ge=0, le=60)] = 5.0


class DestroyCage(Strict):
    cmd: Literal["destroy"] = "destroy"
    name: AgentName


class CageStatus(Strict):
    cmd: Literal["status"] = "status"
    names: list[AgentName] | None = Field(default=None, max_length=10_000)


class CageLimitHits(Strict):
    """Only the kernel's counts of limit hits (``CageRow.oom_kills``, ``.pids_refused``)
    of each named cage: the core's poll of every cage every few seconds
    (core/limit_hits.py). Two small reads a cage, where ``status`` makes six and parses a
    file: at 1,000 cages ``status`` was ~0.4 s of hive-priv's CPU a poll."""

    cmd: Literal["limit_hits"] = "limit_hits"
    names: list[AgentName] = Field(max_length=10_000)


Count = Annotated[int, Field(ge=0)]


class CageRow(Strict):
    """One cage in ``status``'s reply (``cages``: name -> row). Not a request: hive-priv
    builds each row with it and the core reads each with it, so a field the other side
    does not know is an error on either side, not a silent zero."""

    running: bool
    pid: int | None = None  # its bwrap's, while it runs
    uid: int | None = None  # the ids, once prepared
    gid: int | None = None
    harness_uid: int | None = None
    memory_bytes: Count | None = None
    # The kernel's counts since the cage's cgroup was made (a start reuses it; a
    # destroy removes it): processes the OOM killer killed at the memory limit, and
    # forks the pids limit refused. None: the kernel keeps no such count here.
    oom_kills: Count | None = None
    pids_refused: Count | None = None

    def reply(self) -> dict[str, Any]:
        """The row on the wire: the fields it has, none of the Nones."""
        return self.model_dump(exclude_none=True)


class LimitCounts(Strict):
    """One cage in ``limit_hits``'s reply (``hits``: name -> counts); a count the kernel
    does not keep is left out. Read by the core with ``limit_hits_reply``, all at once."""

    oom_kills: Count | None = None
    pids_refused: Count | None = None


limit_hits_reply: TypeAdapter[dict[str, LimitCounts]] = TypeAdapter(dict[str, LimitCounts])


# Names an operator's --env may not set unless it trusts the agent's home: each
# would make the clean default run (or look for) code the agent could have planted.
# hive-priv's exec handler refuses them (after the caller check, so hive-core only
# ever hears "permission denied").
CLEAN_ENV_GUARDED = frozenset(
    {
        "HOME",
        "PYTHONNOUSERSITE",
        "PYTHONSAFEPATH",
        "PYTHONUSERBASE",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "BASH_ENV",
        "ENV",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
    }
)


class Tty(Strict):
    """The operator's terminal size: hive-priv allocates a pty of this size."""

    rows: int = Field(ge=1, le=10_000)
    cols: int = Field(ge=1, le=10_000)


class Exec(Strict):
    """Run argv in the cage as the agent. stdin/stdout/stderr arrive as SCM_RIGHTS fds;
    hive-priv keeps them and relays bytes (through pipes, or a pty of its own when
    ``tty`` is set): no descriptor of the operator's enters a cage."""

    cmd: Literal["exec"] = "exec"
    name: AgentName
    argv: list[Arg] = Field(min_length=1, max_length=4096)
    env: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")], Arg] = Field(
        default_factory=dict, max_length=256
    )
    tty: Tty | None = None
    # HOME and cwd = the agent's home (its dotfiles run); default: a fresh empty HOME, cwd /.
    trust_home: bool = False
    # In the cage's own pid namespace, like the agent's processes (implies trust_home):
    # they can see it and read its memory; for probes that must act exactly as the agent.
    as_agent: bool = False


class ReloadGateway(Strict):
    cmd: Literal["reload_gateway"] = "reload_gateway"


PrivModel: TypeAlias = (
    Prepare | StartCage | StopCage | DestroyCage | CageStatus | CageLimitHits | Exec | ReloadGateway
)
PrivRequest: TypeAlias = Annotated[PrivModel, Field(discriminator="cmd")]
# cast: a type form, which mypy cannot check as an argument yet (no TypeForm).
priv_request: TypeAdapter[PrivModel] = TypeAdapter(cast(Any, PrivRequest))
PRIV_MODELS: tuple[type[Strict], ...] = get_args(PrivModel)


def verb_of(model: type[Strict]) -> str:
    """The ``cmd`` a request model answers to (its literal, which is also its default)."""
    cmd = model.model_fields["cmd"].default
    assert isinstance(cmd, str), model
    return cmd


def encode(request: PrivModel) -> bytes:
    """One request line for priv.sock. ``json.dumps`` (ASCII) as hive-priv's own
    parser expects; every field is written, defaults included, so the line says
    exactly what the model holds."""
    return json.dumps(request.model_dump(mode="python")).encode() + b"\n"

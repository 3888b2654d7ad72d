"""``host.sock`` requests: the operator's verbs (hyperhive host.sock v1 names and shapes)."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field, TypeAdapter

from hyperhive.names import NAME_RE
from hyperhive.wire.common import AgentName, AgentSpec, MemoryMiB, PidsMax, Strict, Text
from hyperhive.wire.egress import RuleText
from hyperhive.wire.secrets import Destination, EnvName, HeaderTemplate, SecretName

# A host of the swarm (docs/swarm.md): the operator's verbs on another host's agents name it;
# without it, or with this host's own name, a verb acts here.
HostName = Annotated[str, Field(pattern=NAME_RE.pattern)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# An agent's incarnation: its ``created_at`` as its host's store (and the swarm's roster)
# shows it. A lifecycle verb given one is refused, nothing done, unless the agent of that
# name is still the one created then (docs/swarm.md, "Bound to the agent the operator saw").
CreatedAt = Annotated[float, Field(ge=0, allow_inf_nan=False)]

EventKind = Literal[
    "message",
    "question",
    "answer",
    "approval",
    "agent_status",
    "reminder",
    "transcript",
    "egress",
    "secret",
]
EVENT_KINDS: tuple[EventKind, ...] = get_args(EventKind)


class Scope(Strict):
    """hyperhive's ``LifecycleScope``: named agents plus one flag per class of service.
    Everything defaulted; nothing named and no flag set means the whole hive. ``agents``
    means every agent. ``ci``, ``forge``, ``gateway`` and ``matrix`` are accepted for
    hyperhive's clients; this hive has no such service to start or stop (the gateway
    lives and dies with ``hive up``), so they select nothing."""

    agent_names: list[AgentName] = Field(default_factory=list, max_length=10_000)
    agents: bool = False
    ci: bool = False
    forge: bool = False
    gateway: bool = False
    matrix: bool = False

    def agent_targets(self) -> list[str] | None:
        """The agents this scope selects: None for every agent, else these names
        (possibly none, when only services this hive doesn't run are named)."""
        services = self.ci or self.forge or self.gateway or self.matrix
        if self.agents or not (self.agent_names or services):
            return None
        return list(self.agent_names)


class List_(Strict):
    cmd: Literal["list"]


class AgentStatusReq(Strict):
    cmd: Literal["agent_status"]


class Start(Strict):
    cmd: Literal["start"]
    scope: Scope = Scope()
    host: HostName | None = None  # that swarm host's agent (carried, signed)
    # each named agent's, as the operator saw it (a carried one is always bound)
    created_at: dict[AgentName, CreatedAt] | None = Field(default=None, max_length=10_000)


class Stop(Strict):
    cmd: Literal["stop"]
    scope: Scope = Scope()
    graceful: bool = True
    host: HostName | None = None  # that swarm host's agent (carried, signed)
    # each named agent's, as the operator saw it (a carried one is always bound)
    created_at: dict[AgentName, CreatedAt] | None = Field(default=None, max_length=10_000)


class Restart(Strict):
    cmd: Literal["restart"]
    name: AgentName
    host: HostName | None = None  # that swarm host's agent (carried, signed)
    created_at: CreatedAt | None = None  # the agent's, as the operator saw it


class SetPaused(Strict):
    cmd: Literal["set_paused"]
    name: AgentName
    paused: bool
    host: HostName | None = None  # that swarm host's agent (carried, signed)
    created_at: CreatedAt | None = None  # the agent's, as the operator saw it


# Paging of a listing: rows with an id above ``after``, oldest first, at most ``limit``
# (the reply's ``more`` says whether any come after; ``total`` counts them all).
After = Annotated[int, Field(ge=0, lt=2**63)]
Limit = Annotated[int, Field(ge=1, le=200)]  # hyperhive.core.summary.PAGE_MAX
Id = Annotated[int, Field(ge=1, lt=2**63)]


class Pending(Strict):
    cmd: Literal["pending"]
    after: After = 0
    limit: Limit = 50


class ShowApproval(Strict):
    """One approval, whole: the exact payload approving applies (listings cut it).
    ``host``: another swarm host's pending approval, asked of that host."""

    cmd: Literal["show_approval"]
    id: Id
    host: HostName | None = None


class ShowQuestion(Strict):
    cmd: Literal["show_question"]
    id: Id
    host: HostName | None = None


class ShowMessage(Strict):
    cmd: Literal["show_message"]
    id: Id


class Approve(Strict):
    """``payload_sha256``: refused unless it is the approval's (what the operator saw);
    from another host it is required (filled in from the roster when left out)."""

    cmd: Literal["approve"]
    id: Annotated[int, Field(ge=1)]
    host: HostName | None = None
    payload_sha256: Sha256 | None = None


class Deny(Strict):
    cmd: Literal["deny"]
    id: Annotated[int, Field(ge=1)]
    note: Annotated[str, Field(max_length=4096)] | None = None
    host: HostName | None = None
    payload_sha256: Sha256 | None = None


class Questions(Strict):
    cmd: Literal["questions"]
    after: After = 0
    limit: Limit = 50


class AnswerQuestion(Strict):
    cmd: Literal["answer_question"]
    id: Annotated[int, Field(ge=1)]
    answer: Text
    host: HostName | None = None


class OperatorSend(Strict):
    cmd: Literal["send"]
    to: AgentName
    body: Text
    host: HostName | None = None  # that swarm host's agent (carried, signed)


class Inbox(Strict):
    cmd: Literal["inbox"]
    after: Annotated[int, Field(ge=0)] = 0
    max: Annotated[int, Field(ge=1, le=10_000)] = 1000


class Spawn(Strict):
    """``host``: spawn on that host of the swarm (carried there, signed)."""

    cmd: Literal["spawn"]
    name: AgentName
    spec: AgentSpec
    host: HostName | None = None


class RequestSpawn(Strict):
    """An operator-side spawn *request* (hyperhive's ``RequestSpawn``): it queues a
    ``spawn`` approval, shown in ``pending`` and applied by ``approve``, instead of
    spawning at once as ``spawn`` does."""

    cmd: Literal["request_spawn"]
    name: AgentName
    spec: AgentSpec
    description: Annotated[str, Field(max_length=4096)] | None = None
    host: HostName | None = None  # queue it on that host of the swarm (carried, signed)


class SetParent(Strict):
    """Move an agent in the topology tree (hyperhive's ``SetParent``); ``parent`` null
    makes it root-level. A parent and its children may message each other."""

    cmd: Literal["set_parent"]
    name: AgentName
    parent: AgentName | None = None


class SetResourceLimits(Strict):
    """An agent's cage limits (hyperhive's ``SetResourceLimits``), kept in its spec and
    applied when its cage next starts. An omitted field is left as it is; null puts
    it back to the hive's default. Cages have no CPU cap (an equal share each):
    ``cpu_max`` is refused."""

    cmd: Literal["set_resource_limits"]
    name: AgentName
    memory_mib: MemoryMiB | None = Field(default=None)
    pids_max: PidsMax | None = Field(default=None)
    cpu_max: Annotated[str, Field(max_length=64)] | None = None


class Destroy(Strict):
    cmd: Literal["destroy"]
    name: AgentName
    host: HostName | None = None  # that swarm host's agent (carried, signed)
    created_at: CreatedAt | None = None  # the agent's, as the operator saw it


class Interrupt(Strict):
    """Stop the agent's current turn (its message is acked; the next one follows)."""

    cmd: Literal["interrupt"]
    name: AgentName
    host: HostName | None = None  # that swarm host's agent (carried, signed)
    created_at: CreatedAt | None = None  # the agent's, as the operator saw it


class Transcript(Strict):
    cmd: Literal["transcript"]
    name: AgentName
    after: Annotated[int, Field(ge=0)] = 0
    limit: Annotated[int, Field(ge=1, le=5000)] = 500


class EgressRules(Strict):
    """Every agent's egress allowlist (or one agent's), with where each rule came from."""

    cmd: Literal["egress_rules"]
    name: AgentName | None = None


class EgressAllow(Strict):
    cmd: Literal["egress_allow"]
    name: AgentName
    rule: RuleText


class EgressRemove(Strict):
    cmd: Literal["egress_remove"]
    name: AgentName
    rule: RuleText


class EgressLog(Strict):
    """The proxy's decisions, newest first; ``before``: only those older than that id
    (the next batch after a reply that said ``more``)."""

    cmd: Literal["egress_log"]
    name: AgentName | None = None
    limit: Annotated[int, Field(ge=1, le=5000)] = 100
    before: Annotated[int, Field(ge=1)] | None = None


class SecretSet(Strict):
    """Keep ``value`` as secret ``name`` (replacing it). The value is checked in the
    service layer, whose refusals never quote it."""

    cmd: Literal["secret_set"]
    name: SecretName
    value: str


class SecretLs(Strict):
    """Every secret's name, when it was set and its bindings; never a value."""

    cmd: Literal["secret_ls"]


class SecretRm(Strict):
    """Forget a secret (its bindings stay, and inject nothing until it is set again)."""

    cmd: Literal["secret_rm"]
    name: SecretName


class AgentEnv(Strict):
    """The variables agent ``name``'s runtime gets beyond the cage's base environment:
    its secret bindings' placeholders (never a secret). ``hive exec`` sets them too."""

    cmd: Literal["agent_env"]
    name: AgentName


class SecretBind(Strict):
    """Bind secret ``name`` for ``agents`` to one destination and header."""

    cmd: Literal["secret_bind"]
    name: SecretName
    agents: list[AgentName] = Field(min_length=1, max_length=1000)
    to: Destination
    header: HeaderTemplate
    env: EnvName | None = None


class SecretUnbind(Strict):
    """Remove secret ``name``'s binding for ``agents`` (all of its bindings if empty)."""

    cmd: Literal["secret_unbind"]
    name: SecretName
    agents: list[AgentName] = Field(default_factory=list, max_length=1000)


class Urls(Strict):
    cmd: Literal["urls"]


class SwarmStatus(Strict):
    """This host's view of the swarm (docs/swarm.md); ``swarm: null`` without [swarm]."""

    cmd: Literal["swarm_status"]


class CoreStats(Strict):
    """Counters of this hive-core since it started: what a flood costs it (docs/protocol.md)."""

    cmd: Literal["core_stats"]


class SubscribeAgentStatus(Strict):
    cmd: Literal["subscribe_agent_status"]


class Subscribe(Strict):
    cmd: Literal["subscribe"]
    kinds: list[EventKind] = Field(
        default_factory=lambda: list(EVENT_KINDS), min_length=1, max_length=20
    )


HostRequest = Annotated[
    List_
    | AgentStatusReq
    | Start
    | Stop
    | Restart
    | SetPaused
    | Pending
    | Approve
    | Deny
    | Questions
    | AnswerQuestion
    | OperatorSend
    | Inbox
    | Spawn
    | RequestSpawn
    | SetParent
    | SetResourceLimits
    | Destroy
    | Urls
    | SwarmStatus
    | CoreStats
    | SubscribeAgentStatus
    | Subscribe
    | Interrupt
    | Transcript
    | EgressRules
    | EgressAllow
    | EgressRemove
    | EgressLog
    | SecretSet
    | SecretLs
    | SecretRm
    | SecretBind
    | SecretUnbind
    | AgentEnv
    | ShowApproval
    | ShowQuestion
    | ShowMessage,
    Field(discriminator="cmd"),
]
host_request = TypeAdapter(HostRequest)
HOST_MODELS: tuple[type[Strict], ...] = get_args(get_args(HostRequest)[0])

"""Shapes shared by both sockets: names, agent specs and the rows returned to callers."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from hyperhive.names import OPERATOR, check_name
from hyperhive.wire.egress import RuleText
from hyperhive.wire.timestamps import Timestamp

AgentName = Annotated[str, AfterValidator(check_name)]


def _check_target(value: str) -> str:
    return value if value == OPERATOR else check_name(value)


# Whom a message or question may be addressed to: an agent, or the operator.
Target = Annotated[str, AfterValidator(_check_target)]

TEXT_CHARS = 256 * 1024
SHORT_TEXT_CHARS = 4096
Text = Annotated[str, Field(max_length=TEXT_CHARS)]
ShortText = Annotated[str, Field(max_length=SHORT_TEXT_CHARS)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# Cage limits: hive-priv's bounds (``wire/priv.py``'s StartCage takes the same types).
MemoryMiB = Annotated[int, Field(ge=32, le=16384)]
PidsMax = Annotated[int, Field(ge=16, le=8192)]


class AgentSpec(Strict):
    """How an agent runs. Declared in hive.toml or carried by a spawn request."""

    runtime: Literal["command", "claude"] = "command"
    command: list[Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None, max_length=256
    )
    peers: list[AgentName] = Field(default_factory=list, max_length=1000)
    egress: list[RuleText] = Field(default_factory=list, max_length=100)  # HOST:PORT rules
    model: Annotated[str, Field(max_length=200)] | None = None
    turn_timeout: Annotated[float, Field(gt=0, le=24 * 3600)] = 300.0
    # The cage's limits; None: hive-priv's defaults. Applied when the cage starts.
    memory_mib: MemoryMiB | None = None
    pids_max: PidsMax | None = None

    @model_validator(mode="after")
    def _runtime_needs(self) -> AgentSpec:
        if self.runtime == "command" and not self.command:
            raise ValueError("runtime 'command' needs a non-empty 'command' list")
        return self


class SpawnPayload(Strict):
    """The payload of a ``spawn`` approval: the new agent's name and spec."""

    name: AgentName
    spec: AgentSpec


MessageKind = Literal["message", "question", "answer", "reminder", "approval"]


class Message(BaseModel):
    id: int
    from_: str = Field(alias="from")
    kind: MessageKind
    body: str
    sent_at: Timestamp
    ref: int | None = None
    options: list[str] | None = None
    to: str | None = None  # only in the operator's inbox and event streams
    # In a listing (a summary): the fields cut to their first bytes, with their full
    # length in bytes (UTF-8); the one-item read gives the row whole.
    truncated: dict[str, int] | None = None

    model_config = ConfigDict(populate_by_name=True)


class Question(BaseModel):
    id: int
    asker: str
    to: str
    question: str
    options: list[str] | None = None
    asked_at: Timestamp
    answer: str | None = None
    answered_at: Timestamp | None = None
    # True when its asker or target was destroyed before an answer (it takes none); absent
    # otherwise, as hyperhive's rows have no such field.
    cancelled: bool | None = None
    # In a listing (a summary): the fields cut to their first bytes, with their full
    # length in bytes (UTF-8); the one-item read gives the row whole.
    truncated: dict[str, int] | None = None


ApprovalStatus = Literal["pending", "approved", "denied", "failed", "cancelled"]


class Approval(BaseModel):
    """hyperhive v1 approval row, plus the payload and its hash. ``commit_ref`` is always
    a string, as hyperhive's is: here the payload's sha256 (what approving applies);
    ``fetched_sha`` (hyperhive's, optional) is never sent."""

    id: int
    agent: str
    kind: str
    commit_ref: str = ""
    requested_at: Timestamp
    status: ApprovalStatus
    resolved_at: Timestamp | None = None
    note: str | None = None
    description: str
    payload: Any = None
    payload_sha256: str
    # In a listing (a summary): the fields cut to their first bytes (a cut ``payload``
    # is the first bytes of its canonical JSON, as text), with their full
    # length in bytes (UTF-8); the one-item read gives the row whole.
    truncated: dict[str, int] | None = None
    # For kind ``spawn``: what approving gives the new agent (core/grants.py), worked out
    # from the whole payload before any cut, so a long ``command`` can't hide it.
    grants: str | None = None

    @model_validator(mode="after")
    def _commit_ref_is_the_payload_hash(self) -> Approval:
        # One rule for every way a row is built (whole, summarised, from an event).
        if not self.commit_ref:
            self.commit_ref = self.payload_sha256
        return self


class AgentStatus(BaseModel):
    """hyperhive v1 agent_status row."""

    name: str
    running: bool
    failed: bool = False
    needs_update: bool = False
    needs_login: bool = False
    deployed_sha: str | None = None
    pending_reminders: int = 0
    paused: bool = False
    parent: str | None = None
    active_model: str | None = None
    status_text: str | None = None
    status_set_at: Timestamp | None = None
    url: str | None = None
    # The agent's incarnation: when its row was created, unix seconds as the store holds
    # them (as the swarm roster's rows say it). A number, not a Timestamp: it is what
    # ``created_at`` (``--created-at``) binds a lifecycle verb to, compared exactly.
    created_at: float | None = None
    # The cage's limit hits since its cgroup was made (hive-priv's ``status``, read by
    # the core every LIMITS_POLL seconds): processes the OOM killer killed, forks its
    # pids limit refused. Absent: not read yet, or no cage.
    oom_kills: int | None = None
    pids_refused: int | None = None

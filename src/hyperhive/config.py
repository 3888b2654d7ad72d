"""``hive.toml``: the operator's declaration of the hive. Read by ``hive up`` and ``hive-core``."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    ValidationError,
    field_validator,
    model_validator,
)

from hyperhive.core.replies import DEFAULT_REPLY_BYTES, MAX_ITEM_BYTES
from hyperhive.swarm.settings import SwarmSection  # pydantic only: no nats
from hyperhive.wire.common import AgentName, AgentSpec
from hyperhive.wire.egress import RuleError, check_hostname
from hyperhive.wire.framing import MAX_LINE, describe_validation_error
from hyperhive.wire.secrets import BindingSpec

DEFAULT_LISTEN = "127.0.0.1:8080"


class ConfigError(Exception):
    """One line saying what is wrong with the configuration."""


# hive-core's exit status when it refuses its hive.toml (sysexits' EX_CONFIG): starting it
# again changes nothing until the file does, so `hive up` waits for that (cli/up.py).
CONFIG_REFUSED = 78


class HiveSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    listen: str = DEFAULT_LISTEN
    # hyperhive's ``urls`` carries a forge and a matrix URL; this hive runs neither, but
    # an operator who runs them beside it may publish theirs here (else left out).
    forge_url: Annotated[str, Field(max_length=2048, pattern=r"^https?://")] | None = None
    matrix_url: Annotated[str, Field(max_length=2048, pattern=r"^https?://")] | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        parse_listen(value)
        return value


class LimitsSection(BaseModel):
    """Per-agent limits. ``messages_per_second`` covers send, ask and request_approval; 0 = off.

    The core's budget (hyperhive.core.budget): ``max_agents`` agents, each with at most
    ``agent_connections`` connections per uid on its agent.sock (and ``[egress]
    max_connections`` tunnels), plus ``reserve_fds`` for the operator, must fit the core's
    RLIMIT_NOFILE and task limit, or the core refuses to start.

    What one agent may hold in the hive: ``agent_pending_max`` undelivered messages, open
    questions, pending approvals and reminders it created, of at most ``agent_store_mib``
    MiB in all; of every per-agent log (egress decisions, delivered messages, resolved
    questions and approvals, delivered reminders) the newest ``history_keep`` are kept;
    of its transcript, the newest entries of at most ``transcript_mib`` MiB.

    Every listing reply (``recv``, ``inbox``, transcripts, egress logs, loose ends) is at
    most ``reply_bytes`` long as well as its count; the rest comes in the next batch
    (core/replies.py). It must hold the largest single row, ``MAX_ITEM_BYTES``."""

    model_config = ConfigDict(extra="forbid")
    messages_per_second: float = Field(default=50.0, ge=0, le=1_000_000)
    message_burst: int = Field(default=500, ge=1, le=1_000_000)
    # The size of each agent's home (a filesystem of its own), fixed when the home is first made.
    disk_mib: int = Field(default=1024, ge=16, le=65536)
    max_agents: int = Field(default=100, ge=1, le=10_000)
    agent_connections: int = Field(default=32, ge=4, le=4096)  # per uid on agent.sock, at once
    reserve_fds: int = Field(default=512, ge=64, le=1_000_000)
    agent_store_mib: int = Field(default=64, ge=1, le=1_048_576)
    agent_pending_max: int = Field(default=10_000, ge=10, le=10_000_000)
    history_keep: int = Field(default=5_000, ge=10, le=10_000_000)
    # Stored bytes of each agent's transcript (its newest 20,000 entries at most), oldest
    # trimmed first; outside agent_store_mib, which counts what an agent holds of others'.
    transcript_mib: int = Field(default=32, ge=8, le=1_048_576)  # 8: a whole turn's ~6.3 MB
    reply_bytes: int = Field(default=DEFAULT_REPLY_BYTES, ge=MAX_ITEM_BYTES, le=1 << 30)
    # Request bytes per second an agent's connections may send the core together, past a
    # burst; beyond it reading waits (core/ratelimit.BytePacer). 0: off.
    input_bytes_per_second: int = Field(default=8 << 20, ge=0, le=1 << 40)
    input_burst_bytes: int = Field(default=64 << 20, ge=2 * MAX_LINE, le=1 << 40)


class EgressSection(BaseModel):
    """The egress proxy. ``hosts`` maps names to addresses for the proxy's resolver
    (checked before DNS, like /etc/hosts); the allowlists are per agent."""

    model_config = ConfigDict(extra="forbid")
    hosts: dict[str, IPvAnyAddress] = Field(default_factory=dict, max_length=10_000)
    # Tunnels per agent, at once: each costs the core 6 descriptors and 2 threads (see budget).
    max_connections: int = Field(default=16, ge=1, le=10_000)
    # New connections per agent and second the proxy accepts (a burst of twice that); past
    # it they wait in the socket's backlog. 0: no bound.
    connections_per_second: float = Field(default=100.0, ge=0, le=1_000_000)
    # Seconds a peer of an egress connection (the server, or the cage's own end) may take
    # nothing of what is sent before the connection ends: a tunnel's relay and a terminated
    # connection's writes alike (relay.relay, egress_tls.send_within).
    stall_seconds: int = Field(default=60, ge=1, le=3600)
    # An extra CA the proxy trusts for upstream servers whose TLS it terminates (beside
    # the host's trust store): for a test server, or an internal CA.
    upstream_ca: Path | None = None
    # CPU seconds a second an agent's egress connections may cost the core together (a
    # terminated one decrypting and re-encrypting: ~1.6 s a GiB; a tunnel splicing: ~0.2),
    # and all agents' together, shared by those using some: an even part each, or what the
    # others leave if more (default: half the CPUs the core may run on, at least 1); past it
    # their relays wait (core/egress_tls.CpuPacer).
    # 0: no bound. Session 20's names, when only terminated TLS was charged, still read.
    cpu: float = Field(
        default=1.0, ge=0, le=1024, validation_alias=AliasChoices("cpu", "terminated_cpu")
    )
    cpu_total: float | None = Field(
        default=None,
        ge=0,
        le=1024,
        validation_alias=AliasChoices("cpu_total", "terminated_cpu_total"),
    )

    @field_validator("cpu", "cpu_total")
    @classmethod
    def _cpu_share(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < 0.01:
            raise ValueError("must be 0 (no bound) or at least 0.01 CPU")
        return value

    @field_validator("hosts")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            try:
                check_hostname(name)
            except RuleError as e:
                raise ValueError(f"hosts: {e}") from None
        return value


class Webhook(BaseModel):
    """One receiver of notifications. The URL is a secret of the operator's (a Matrix
    access token, an ntfy topic, a Slack hook): hive.toml holds it, it is never logged."""

    model_config = ConfigDict(extra="forbid")
    url: Annotated[str, Field(max_length=4096, pattern=r"^https?://[^\s]+$")]
    # ntfy: the text POSTed, with Title and Click headers; matrix: a client-server
    # m.room.message (a URL ending in /send/m.room.message is PUT with a transaction id);
    # slack: a Slack-compatible {"text": ...} JSON POST.
    format: Literal["ntfy", "matrix", "slack"]


class NotifySection(BaseModel):
    """``[notify]``: each new question to the operator and each new approval request goes
    to every webhook (core/notify.py), with a one-use link to the item; so does each limit
    hit of a cage (one line, linking to the agent's page)."""

    model_config = ConfigDict(extra="forbid")
    webhooks: list[Webhook] = Field(default_factory=list, max_length=8)
    # Where the links point (the gateway as the operator's browser reaches it); default:
    # the origin of the login URL ``hive up`` prints.
    base_url: Annotated[str, Field(max_length=2048, pattern=r"^https?://[^\s/?#]+/?$")] | None = (
        None
    )
    # Per agent: a burst of notifications, then one every ``agent_interval_seconds``; the
    # rest are coalesced into one "N more" notification.
    agent_burst: int = Field(default=5, ge=1, le=1000)
    agent_interval_seconds: float = Field(default=60.0, ge=0.0, le=86400.0)
    # Notifications waiting to be sent, per webhook; past it new ones are dropped (counted,
    # logged, and said in the next notification that goes out).
    queue: int = Field(default=256, ge=1, le=100_000)
    # Attempts per notification, waiting backoff_seconds, then twice as long each time
    # (at most 5 minutes); a 429's Retry-After is honoured up to the same bound.
    attempts: int = Field(default=6, ge=1, le=50)
    backoff_seconds: float = Field(default=2.0, ge=0.0, le=300.0)
    timeout_seconds: float = Field(default=10.0, gt=0.0, le=300.0)
    # How long a notification's link works (it works once).
    link_ttl_hours: float = Field(default=72.0, gt=0.0, le=24.0 * 90)


class HiveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hive: HiveSection = HiveSection()
    limits: LimitsSection = LimitsSection()
    egress: EgressSection = EgressSection()
    # The swarm (docs/swarm.md); None, the default: a single-host hive, no NATS at all.
    swarm: SwarmSection | None = None
    notify: NotifySection = NotifySection()
    agents: dict[AgentName, AgentSpec] = Field(default_factory=dict)
    secret_binding: list[BindingSpec] = Field(default_factory=list, max_length=10_000)

    @model_validator(mode="after")
    def _agents_fit(self) -> HiveConfig:
        if len(self.agents) > self.limits.max_agents:
            raise ValueError(
                f"{len(self.agents)} agents declared, more than [limits] max_agents"
                f" = {self.limits.max_agents}"
            )
        for b in self.secret_binding:
            for agent in b.agents:
                if agent not in self.agents:
                    raise ValueError(f"secret_binding {b.secret!r}: no agent named {agent!r}")
        return self


def origin_of(listen: str) -> str:
    """The gateway's origin as ``hive up``'s login URL names it."""
    host, port = parse_listen(listen)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"listen must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def load_config(path: Path | None, listen: str | None = None) -> HiveConfig:
    """Read hive.toml (or the defaults); ``listen`` overrides ``[hive] listen``."""
    config = _read(path)
    if listen is not None:
        try:
            config.hive = HiveSection(listen=listen)
        except ValidationError as e:
            raise ConfigError(f"--listen: {describe_validation_error(e, tagged=False)}") from None
    return config


def _read(path: Path | None) -> HiveConfig:
    if path is None:
        return HiveConfig()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return HiveConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {describe_validation_error(e, tagged=False)}") from None

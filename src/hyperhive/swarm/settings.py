"""``[swarm]`` in hive.toml: this host's name, the NATS URLs and its credentials file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hyperhive.names import NAME_RE
from hyperhive.swarm.subjects import ROSTER_HOST_KEYS

# A host name is an agent-name-like word: it becomes a subject token and a NATS user.
HostName = Annotated[str, Field(pattern=NAME_RE.pattern)]


class SwarmSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: HostName
    urls: list[Annotated[str, Field(max_length=512, pattern=r"^(nats|tls)://")]] = Field(
        min_length=1, max_length=64
    )
    # This host's NATS password, one line, readable by hive-core only (0600).
    credentials: Path
    # This host's operator signing key (Ed25519, made on first start; default: beside
    # the store, outside every cage). Its public half is in `hive swarm status`.
    operator_key: Path | None = None
    # The hosts whose operator this host obeys (answers, approvals, spawns carried here),
    # each with its operator key's public half (base64). No other host's action applies.
    operators: dict[HostName, Annotated[str, Field(max_length=64)]] = Field(
        default_factory=dict, max_length=64
    )

    # What this host holds for the agents of any one other host, in all (undelivered
    # messages, swarm/quota.py): past it, that host's bundles wait (each remote agent is
    # also held to this host's own [limits] storage quota).
    host_pending_max: int = Field(default=100_000, ge=10, le=100_000_000)
    host_store_mib: int = Field(default=1024, ge=1, le=1_048_576)
    # Names this host holds at most (swarm/bridge.py _let_go: ours, no agent here, another
    # host's later claim live): each is one key of our roster bucket, so the default and
    # the most is an eighth of its keys (a hostile host's claims can't fill it); fewer
    # holds, and a hostile host's claims make the oldest go sooner.
    held_names_max: int = Field(default=ROSTER_HOST_KEYS // 8, ge=64, le=ROSTER_HOST_KEYS // 8)
    # Seconds between two reads of a held name's claims from the bus (a purge of another
    # host's claim is no message for the watch): sooner lets a name go sooner, at more
    # reads (at most swarm/bridge.py's LET_GO_EACH_ROUND a roster round, whatever this is).
    held_recheck_seconds: float = Field(default=30.0, ge=2.0, le=3600.0)

    @field_validator("credentials", "operator_key")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value

    @field_validator("operators")
    @classmethod
    def _keys(cls, value: dict[str, str]) -> dict[str, str]:
        from hyperhive.swarm.signing import parse_public  # cryptography: only with [swarm]

        for host, key in value.items():
            try:
                parse_public(key)
            except ValueError as e:
                raise ValueError(f"operators.{host}: {e}") from None
        return value

    def user(self) -> str:
        return user_of(self.host)

    def password(self) -> str:
        """The credentials file's first line (read when the bridge connects)."""
        lines = self.credentials.read_text().splitlines()
        if not lines or not lines[0].strip():
            raise ValueError(f"{self.credentials}: empty credentials file")
        return lines[0].strip()


def user_of(host: str) -> str:
    """Host ``h``'s NATS user."""
    return f"host-{host}"

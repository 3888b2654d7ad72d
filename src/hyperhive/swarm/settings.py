"""``[swarm]`` in hive.toml: this host's name, the NATS URLs and its credentials file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hyperhive.names import NAME_RE

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

    @field_validator("credentials")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("credentials must be an absolute path")
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

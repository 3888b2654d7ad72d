"""Where everything lives. Every path is derived here from a validated agent name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hyperhive.names import check_name

DEFAULT_RUN_DIR = Path("/run/hive")
DEFAULT_STATE_DIR = Path("/var/lib/hive")


@dataclass(frozen=True)
class RunDir:
    """``/run/hive``: sockets only."""

    root: Path = DEFAULT_RUN_DIR

    @property
    def host_sock(self) -> Path:
        return self.root / "host.sock"

    @property
    def priv_sock(self) -> Path:
        return self.root / "priv.sock"

    @property
    def core_sock(self) -> Path:
        return self.root / "core.sock"

    @property
    def agents(self) -> Path:
        return self.root / "agents"

    def agent_dir(self, name: str) -> Path:
        """What the agent's cage sees as ``/run/hive/``."""
        return self.agents / check_name(name)

    def agent_sock(self, name: str) -> Path:
        return self.agent_dir(name) / "agent.sock"

    def egress_sock(self, name: str) -> Path:
        """The agent's way out: hive-core's egress proxy, for this agent only."""
        return self.agent_dir(name) / "egress.sock"

    @property
    def ui(self) -> Path:
        return self.root / "ui"

    def ui_dir(self, name: str) -> Path:
        """The agent's page socket directory: the gateway connects, no runtime sees it."""
        return self.ui / check_name(name)

    def web_sock(self, name: str) -> Path:
        return self.ui_dir(name) / "web.sock"


@dataclass(frozen=True)
class StateDir:
    """``/var/lib/hive``: the database and the agents' homes."""

    root: Path = DEFAULT_STATE_DIR

    @property
    def db(self) -> Path:
        return self.root / "hive.db"

    def agent_home(self, name: str) -> Path:
        return self.root / "agents" / check_name(name) / "home"

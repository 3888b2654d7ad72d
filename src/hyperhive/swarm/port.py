"""What the core's service (``core/hive.py``) asks of the swarm: no ``nats`` here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from hyperhive.wire.common import Question


class SwarmPort(Protocol):
    host: str

    def host_of(self, agent: str) -> str | None:
        """The host the roster gives ``agent`` to, if it is another host; else None."""

    async def send(
        self, sender: str, to: str, body: str, taken: Callable[[], None] | None = None
    ) -> int:
        """Commit a message to an agent on another host to the outbox; the bridge
        publishes it. Its id here: its outbox row. ``taken`` runs once, when the commit
        takes it or it is refused (the core's count of queued sends)."""

    def ask(self, asker: str, to: str, question: str, options: list[str] | None) -> Question:
        """Store a question to an agent on another host and queue it there (one commit)."""

    def answer(self, target: str, qid: int, text: str) -> Question | None:
        """Answer question ``qid`` if another host asked it (queued back there); None if
        it was asked on this host."""

    def forget(self, name: str) -> None:
        """Local agent ``name`` is being destroyed: its open questions across hosts (asked
        by it, or of it) are closed, and the other hosts told (swarm/asks.py)."""

    def status(self) -> dict[str, Any]:
        """Hosts, bus reachability and the roster (``hive swarm status``)."""

    async def carry(self, host: str, request: dict[str, Any]) -> dict[str, Any]:
        """The operator's host.sock ``request`` for ``host``, signed and carried there;
        what it made of it (a refusal there is raised here)."""

    async def fetch(self, host: str, kind: str, ident: int) -> dict[str, Any]:
        """``host``'s pending approval or open question (``kind``) ``ident`` whole, asked
        of that host; an approval checked against its payload_sha256 (swarm/show.py)."""

    def listed(self, kind: str) -> list[dict[str, Any]]:
        """The other hosts' open ``questions`` or pending ``approvals``, each with its host."""

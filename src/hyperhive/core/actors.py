"""Who is asking: an agent (named by the listener that accepted its connection) or
the operator (being on host.sock or holding a web session *is* being the operator).

Only the listener modules make actors: ``agent_socket`` makes ``Agent``, ``host_socket``
and ``http`` make ``OPERATOR``; ``tests/test_actors.py`` fails if any other module does.
Every domain method of ``Hive`` takes the actor it acts for, typed, so an agent-side
handler can't reach an operator-only method without a type error, and the service never
reads an identity out of a request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from hyperhive.names import OPERATOR as OPERATOR_NAME


@dataclass(frozen=True, slots=True)
class Agent:
    """An agent, as its own socket's listener names it. ``harness`` is true for a
    connection from the agent's harness uid (the kernel said so, SO_PEERCRED)."""

    name: str
    harness: bool = False


@dataclass(frozen=True, slots=True)
class Operator:
    """The operator: host.sock (root or hive-admin) or a logged-in web session."""

    @property
    def name(self) -> str:
        return OPERATOR_NAME


OPERATOR: Final = Operator()
Actor = Agent | Operator

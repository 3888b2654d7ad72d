"""``agent.sock`` requests: what an agent may ask of the hive.

Identity is the socket that accepted the connection, so no model here has a
field that could name a sender; ``extra="forbid"`` refuses any attempt to add one.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, TypeAdapter, field_validator, model_validator

from hyperhive.wire.common import ShortText, Strict, Target, Text
from hyperhive.wire.timestamps import parse_timestamp

MAX_REMIND_SECONDS = 366 * 24 * 3600
# The times an RFC 3339 ``due_at`` can be written as (1970-01-01T00:00:00Z up to
# 9999-12-31T23:59:59Z): an earlier ``at`` was stored, then failed to format (year 0 is
# out of range) and the agent got "internal error" for a reminder the hive kept.
AT_MIN, AT_MAX = 0.0, 253402300799.0


class Whoami(Strict):
    cmd: Literal["whoami"]


class Peers(Strict):
    cmd: Literal["peers"]


class Send(Strict):
    cmd: Literal["send"]
    to: Target
    body: Text


class Recv(Strict):
    cmd: Literal["recv"]
    wait: Annotated[float, Field(ge=0, le=3600)] = 0
    max: Annotated[int, Field(ge=1, le=1000)] = 100
    # Acked first, as ``ack {ids}`` would (docs/protocol.md): one request a round.
    ack: list[Annotated[int, Field(ge=1)]] | None = Field(default=None, max_length=10_000)


class Ack(Strict):
    cmd: Literal["ack"]
    ids: list[Annotated[int, Field(ge=1)]] = Field(max_length=10_000)


class Ask(Strict):
    cmd: Literal["ask"]
    to: Target
    question: Text
    options: list[ShortText] | None = Field(default=None, max_length=50)


class Answer(Strict):
    cmd: Literal["answer"]
    id: Annotated[int, Field(ge=1)]
    answer: Text


class RequestApproval(Strict):
    cmd: Literal["request_approval"]
    kind: Annotated[str, Field(max_length=64)]
    description: Text
    payload: Any = None


class SetStatus(Strict):
    cmd: Literal["set_status"]
    text: ShortText


class Remind(Strict):
    cmd: Literal["remind"]
    in_seconds: Annotated[float, Field(gt=0, le=MAX_REMIND_SECONDS)] | None = None
    at: float | str | None = None
    text: Text

    @field_validator("at")
    @classmethod
    def _parse_at(cls, value: float | str | None) -> float | None:
        if value is None:
            return value
        if isinstance(value, str):
            try:  # the wire's one timestamp parser: RFC 3339 / ISO 8601 with a zone
                value = parse_timestamp(value)
            except ValueError as e:
                if "timezone" in str(e):
                    raise ValueError(
                        "'at' needs a timezone, e.g. 2026-01-01T09:00:00+00:00"
                    ) from None
                raise ValueError("'at' must be unix seconds or an ISO 8601 timestamp") from None
        if not AT_MIN <= value <= AT_MAX:  # NaN fails this too
            raise ValueError("'at' must be between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z")
        return value

    @model_validator(mode="after")
    def _exactly_one_time(self) -> Remind:
        if (self.in_seconds is None) == (self.at is None):
            raise ValueError("give exactly one of 'in_seconds' or 'at'")
        return self

    def due_at(self, now: float | None = None) -> float:
        now = time.time() if now is None else now
        if self.in_seconds is not None:
            return now + self.in_seconds
        assert isinstance(self.at, float | int)
        return float(self.at)


class LooseEnds(Strict):
    """The three lists share one reply's byte budget; to page, pass each ``<list>_after``
    = the last id got of that list (see docs/protocol.md)."""

    cmd: Literal["loose_ends"]
    questions_after: Annotated[int, Field(ge=0)] = 0
    approvals_after: Annotated[int, Field(ge=0)] = 0
    to_answer_after: Annotated[int, Field(ge=0)] = 0


AgentRequest = Annotated[
    Whoami
    | Peers
    | Send
    | Recv
    | Ack
    | Ask
    | Answer
    | RequestApproval
    | SetStatus
    | Remind
    | LooseEnds,
    Field(discriminator="cmd"),
]
agent_request = TypeAdapter(AgentRequest)
AGENT_MODELS: tuple[type[Strict], ...] = get_args(get_args(AgentRequest)[0])
AGENT_VERBS = tuple(get_args(m.model_fields["cmd"].annotation)[0] for m in AGENT_MODELS)

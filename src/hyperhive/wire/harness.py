"""Harness verbs on ``agent.sock``: only a connection whose peer uid is the
agent's *harness* uid may use them (the runtime, on the same socket, can't).
They drive the turn loop; none of them carries operator authority."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import Field, TypeAdapter

from hyperhive.wire.common import Strict

ENTRY_KINDS = ("input", "stdout", "stderr", "event", "tool_call", "note", "exit")
MAX_ENTRY_CHARS = 64 * 1024


class TurnEntry(Strict):
    kind: Literal["input", "stdout", "stderr", "event", "tool_call", "note", "exit"]
    data: Any = None


class HarnessConfig(Strict):
    """The agent's spec (runtime, command, model, turn timeout)."""

    cmd: Literal["harness_config"]


class TurnNext(Strict):
    """The next inbox message to take a turn on; none while paused."""

    cmd: Literal["turn_next"]
    wait: Annotated[float, Field(ge=0, le=3600)] = 30


class TurnRecord(Strict):
    cmd: Literal["turn_record"]
    turn: Annotated[int, Field(ge=1)]
    entries: list[TurnEntry] = Field(min_length=1, max_length=200)


class TurnDone(Strict):
    """End of a turn: record how it ended and ack its message, in one transaction."""

    cmd: Literal["turn_done"]
    turn: Annotated[int, Field(ge=1)]
    exit_status: int | None = None
    duration_ms: Annotated[float, Field(ge=0)]
    interrupted: bool = False
    timed_out: bool = False


class HarnessState(Strict):
    cmd: Literal["harness_state"]
    needs_login: bool = False
    active_model: Annotated[str, Field(max_length=200)] | None = None


class Control(Strict):
    """Long-poll for the operator's controls of the current turn (interrupt)."""

    cmd: Literal["control"]
    wait: Annotated[float, Field(ge=0, le=3600)] = 30


class TranscriptRead(Strict):
    """This agent's transcript after ``after``; with ``wait``, a long-poll for new entries
    (the page)."""

    cmd: Literal["transcript_read"]
    after: Annotated[int, Field(ge=0)] = 0
    limit: Annotated[int, Field(ge=1, le=2000)] = 200
    wait: Annotated[float, Field(ge=0, le=3600)] = 0


class PageState(Strict):
    """What the agent's page shows besides the transcript: status, loose ends, and
    the agent's own egress rules and latest ``egress_limit`` egress decisions."""

    cmd: Literal["page_state"]
    egress_limit: Annotated[int, Field(ge=1, le=500)] = 50


HarnessRequest = Annotated[
    HarnessConfig
    | TurnNext
    | TurnRecord
    | TurnDone
    | HarnessState
    | Control
    | TranscriptRead
    | PageState,
    Field(discriminator="cmd"),
]
harness_request = TypeAdapter(HarnessRequest)
HARNESS_MODELS: tuple[type[Strict], ...] = get_args(get_args(HarnessRequest)[0])
HARNESS_VERBS = frozenset(get_args(m.model_fields["cmd"].annotation)[0] for m in HARNESS_MODELS)

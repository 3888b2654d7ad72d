"""The message hot path's shortcuts agree with the models they skip: a send checked
without ``w.Send`` (core/agent_socket.py) is taken exactly when the model takes it, a recv
checked without ``w.Recv`` is one the model takes with the same values, and a recv row built without ``Message`` (store/messages.py) is the line the model would give."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hyperhive.core.agent_socket import _plain_send, plain_recv
from hyperhive.core.store.messages import _for_recipient, wire_for_recipient
from hyperhive.wire import agent as w
from hyperhive.wire import framing
from hyperhive.wire.common import TEXT_CHARS
from hyperhive.wire.framing import WireError, model_fields_only

SENDS: list[dict[str, Any]] = [
    {"cmd": "send", "to": "bob", "body": "hi"},
    {"cmd": "send", "to": "operator", "body": ""},
    {"cmd": "send", "to": "bob", "body": "x" * TEXT_CHARS},
    {"cmd": "send", "to": "bob", "body": "x" * (TEXT_CHARS + 1)},
    {"cmd": "send", "to": "bob", "body": "é" * TEXT_CHARS},  # characters, not bytes
    {"cmd": "send", "to": "Bob", "body": "hi"},
    {"cmd": "send", "to": "hive", "body": "hi"},  # reserved
    {"cmd": "send", "to": "all", "body": "hi"},
    {"cmd": "send", "to": "b" * 31, "body": "hi"},
    {"cmd": "send", "to": "b" * 32, "body": "hi"},
    {"cmd": "send", "to": "bob\n", "body": "hi"},
    {"cmd": "send", "to": "../x", "body": "hi"},
    {"cmd": "send", "to": "", "body": "hi"},
    {"cmd": "send", "to": 7, "body": "hi"},
    {"cmd": "send", "to": "bob", "body": 7},
    {"cmd": "send", "to": "bob", "body": None},
    {"cmd": "send", "to": "bob", "body": ["hi"]},
    {"cmd": "send", "to": "bob"},
    {"cmd": "send", "body": "hi"},
    {"cmd": "send", "to": "bob", "body": "hi", "from": "carol"},  # no field names a sender
    {"cmd": "send", "to": "bob", "body": "hi", "version": 1},
    {"cmd": "recv", "to": "bob", "body": "hi"},
    {"cmd": ["send"], "to": "bob", "body": "hi"},
]


@pytest.mark.parametrize("obj", SENDS, ids=lambda o: json.dumps(o)[:60])
def test_a_plain_send_is_one_the_model_takes_as_it_is(obj: dict[str, Any]) -> None:
    try:
        req = w.agent_request.validate_python(obj)
        taken = isinstance(req, w.Send)
    except ValidationError:
        taken = False
    assert _plain_send(obj) == taken
    if taken:
        assert (req.to, req.body) == (obj["to"], obj["body"])


# Any JSON value a recv field could carry, the edges of each bound drawn most often.
_EDGES = st.sampled_from(
    [0, 1, -1, 2, 999, 1000, 1001, 3599, 3600, 3601, 2**63 - 1, -(2**63), 0.0, 0.5, -0.0,
     -0.5, 3600.0, 3600.5, 3599.999, 1e-320, 1e308, True, False, None, "1", [], {}]
)
_SCALARS = st.one_of(
    _EDGES,
    _EDGES,
    _EDGES,
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)
_ACKS = st.one_of(
    st.none(),
    st.lists(_EDGES, max_size=3),
    st.lists(st.sampled_from([1, 2, 2**63 - 1]), max_size=3).map(lambda a: [*a, 0]),
    st.lists(st.integers(1, 2**63 - 1), max_size=5),
    st.sampled_from([10_000, 10_001]).map(lambda n: [1] * n),
    _SCALARS,
)
_RECV_FIELDS = {"wait": _SCALARS, "max": _SCALARS, "ack": _ACKS}
_RECVS = st.one_of(
    st.fixed_dictionaries({"cmd": st.just("recv")}, optional=_RECV_FIELDS),
    st.fixed_dictionaries({"cmd": st.just("recv")}, optional=_RECV_FIELDS),
    st.fixed_dictionaries(
        {"cmd": st.sampled_from(["recv", "ack", "Recv", "recv "])},
        optional={**_RECV_FIELDS, "ids": st.just([1]), "from": st.just("carol"),
                  "version": st.just(1)},
    ),
)
# Each bound's two sides, whatever the draw.
_BOUNDS: list[dict[str, Any]] = [
    {"cmd": "recv", "wait": w_} for w_ in (0, -0.0, 3600, 3600.0, 3600.000001, 3601, -1e-9, True, False)
] + [
    {"cmd": "recv", "max": m} for m in (0, 1, 1000, 1001, 1.0, True)
] + [
    {"cmd": "recv", "ack": a} for a in ([], [0], [1], [True], [1.0], [1] * 10_000, [1] * 10_001)
]


def _recv_agrees(obj: dict[str, Any]) -> None:
    """plain_recv takes exactly what the model takes, with the same wait, max and ack (what
    it passes over goes through the model, which refuses it in its own words)."""
    try:
        req = w.agent_request.validate_python(obj)
        model: tuple[Any, ...] | None = (
            (req.wait, req.max, req.ack) if isinstance(req, w.Recv) else None
        )
    except ValidationError:
        model = None
    assert plain_recv(obj) == model  # True == 1, but the model refuses a bool for a number


@settings(max_examples=500, deadline=None)
@given(obj=_RECVS)
def test_a_plain_recv_is_one_the_model_takes_with_the_same_values(obj: dict[str, Any]) -> None:
    _recv_agrees(obj)


@pytest.mark.parametrize("obj", _BOUNDS, ids=lambda o: json.dumps(o)[:50])
def test_a_plain_recv_keeps_the_models_bounds(obj: dict[str, Any]) -> None:
    _recv_agrees(obj)


ROWS: list[tuple[Any, ...]] = [
    (1, "alice", "message", "hi", 1_780_000_000.25, None, None, "bob"),
    (2, "alice", "answer", "yes", 1_780_000_001.0, 17, None, "bob"),
    (3, "alice", "question", "which?", 1_780_000_002.9, 5, '["a", "b"]', "bob"),
    (4, "hive", "reminder", "", 0.0, 3, None, "bob"),
    (5, "alice", "message", "hi", 1_780_000_000, None, None, "bob"),  # an int time
    (6, "alice", "message", "hi", "2026-01-01T00:00:00Z", None, None, "bob"),
    (7, "alice", "gossip", "hi", 1.0, None, None, "bob"),  # no such kind: unreadable
    (8, "alice", "message", b"bytes", 1.0, None, None, "bob"),
    (9, "alice", "message", "hi", 1.0, None, "not json", "bob"),
    (10, 42, "message", "hi", 1.0, None, None, "bob"),
    (11, "alice", "message", "hi", 1.0, 2.5, None, "bob"),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: str(r[0]))
def test_a_recv_row_is_the_line_the_model_gives(row: tuple[Any, ...]) -> None:
    want = model_fields_only(_for_recipient(row))  # type: ignore[arg-type]
    want.pop("to", None)
    got = wire_for_recipient(row)  # type: ignore[arg-type]
    assert json.dumps(got) == json.dumps(want)  # the same keys, in the same order


LINES: list[bytes] = [
    b'{"cmd":"send","to":"bob","body":"hi"}',
    b'{"n":9223372036854775807}',  # 19 digits, in range: the stdlib reads it
    b'{"n":9223372036854775808}',
    b'{"n":-9223372036854775808}',
    b'{"n":18446744073709551616}',  # orjson alone would give a float
    b'{"body":"call 0123456789012345678901 now"}',  # digits in a string: read all the same
    b'{"x":1e308,"y":-0.0,"z":1E2,"w":0.1}',
    b'{"x":1e400}',
    b'{"x":NaN}',
    b'{"x":"\\ud800"}',
    b'{"x":"\\ud83d\\ude00"}',
    b'\xef\xbb\xbf{"cmd":"whoami"}',
    b'{"cmd":"whoami"',
    b'{"cmd":"whoami"} x',
    b'{"a":1,"a":2}',
    b'{"cmd":"\xff"}',
    b'[{"cmd":"whoami"}]',
    b"[" * 70 + b"]" * 70,
    b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}",
]


@pytest.mark.parametrize("line", LINES, ids=lambda b: b[:40].decode("utf-8", "replace"))
def test_a_line_reads_as_the_stdlib_decoder_reads_it(line: bytes) -> None:
    """parse_line (orjson where it agrees) against the stdlib decoder alone: the same
    object, or the same refusal in the same words."""

    def read(parse: Any) -> object:
        try:
            return ("ok", parse(line))
        except WireError as e:
            return ("refused", str(e))

    def stdlib_only(raw: bytes) -> Any:
        obj = framing._stdlib_parse(raw)
        if not isinstance(obj, dict):
            raise WireError(f"request must be a JSON object, got {type(obj).__name__}")
        if framing.depth(obj) > framing.MAX_DEPTH:
            raise WireError(framing.TOO_DEEP)
        return obj

    got, want = read(framing.parse_line), read(stdlib_only)
    assert repr(got) == repr(want)


REPLIES: list[dict[str, Any]] = [
    {"version": 1, "ok": True, "id": 12},
    {"ok": True, "messages": [{"id": 1, "from": "a", "body": 'é \u2028 \x00 " \\ /'}]},
    {"n": 2**63 - 1, "m": -(2**63), "f": 0.1, "g": 1e-7, "h": 1e22},
    {"n": 2**70},  # past 64 bits: the stdlib writes it
    {1: "int key", "k": [(1, 2)]},
]


@pytest.mark.parametrize("obj", REPLIES, ids=lambda o: str(o)[:40])
def test_a_reply_line_is_the_same_json_as_the_stdlib_writes(obj: dict[str, Any]) -> None:
    line = framing.dump_line(obj)
    assert line.endswith(b"\n") and b"\n" not in line[:-1]
    assert json.loads(line) == json.loads(framing._ENCODER.encode(obj))

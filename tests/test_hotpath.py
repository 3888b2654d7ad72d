"""The message hot path's shortcuts agree with the models they skip: a send checked
without ``w.Send`` (core/agent_socket.py) is taken exactly when the model takes it, and a
recv row built without ``Message`` (store/messages.py) is the line the model would give."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from hyperhive.core.agent_socket import _plain_send
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

"""JSON-lines framing: one UTF-8 JSON object per line, at most 1 MiB a line."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

MAX_LINE = 1024 * 1024  # bytes, excluding the newline
# Containers inside containers, the request object itself being level 1. What the hive
# stores comes back out inside a few more levels (a reply, a listing, an event), and
# pydantic refuses to serialise past 255: 64 leaves room for those and for any nesting a
# real request needs (the deepest verb today nests 3), and bounds the walks over a request.
MAX_DEPTH = 64
TOO_DEEP = "malformed JSON: nested too deeply"
PROTOCOL_VERSION = 1


class WireError(Exception):
    """A request that must be refused; ``str(self)`` is the one-line reason."""


def _reject_constant(name: str) -> Any:
    raise WireError(f"malformed JSON: {name} is not valid JSON")


def _parse_int(text: str) -> int:
    # 64-bit integers only: anything larger can't be stored or compared, and a
    # huge literal would cost Python's int parser time (or raise past 4300 digits).
    if len(text.lstrip("-")) > 19 or not -(2**63) <= (value := int(text)) < 2**63:
        raise WireError("malformed request: integer out of range (64-bit)")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e400: would come back out as Infinity, not JSON
        raise WireError("malformed request: number out of range")
    return value


# 19 digits in a row: a number orjson would read differently from our rules (past 64 bits
# it gives a float, not a refusal); such a line is read by the stdlib decoder.
_LONG_DIGITS = re.compile(rb"\d{19}")
_NOT_READ = object()


def parse_line(line: bytes) -> dict[str, Any]:
    """Decode one request line into a JSON object, or raise WireError with a one-line reason.

    orjson reads it when it can (~4x the stdlib's speed: every request is one line); a line
    it refuses, or one with a number of 19 digits or more, is read by the stdlib decoder,
    whose rules and words make the refusal (orjson refuses whatever that decoder refuses:
    invalid UTF-8, a BOM, NaN and Infinity, numbers out of a double's range, lone
    surrogates, nesting past 1024), so a refusal reads as it always has."""
    if len(line) > MAX_LINE:
        raise WireError(f"line exceeds {MAX_LINE} bytes")
    obj: Any = _NOT_READ
    if _LONG_DIGITS.search(line) is None:
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            pass
    if obj is _NOT_READ:
        obj = _stdlib_parse(line)
    if not isinstance(obj, dict):
        raise WireError(f"request must be a JSON object, got {type(obj).__name__}")
    # Each level opens with a bracket: a line with no more brackets than MAX_DEPTH (in
    # strings or not) can't nest deeper, and the walk is skipped (most requests).
    if line.count(b"[") + line.count(b"{") > MAX_DEPTH and depth(obj) > MAX_DEPTH:
        raise WireError(TOO_DEEP)
    return obj


def _stdlib_parse(line: bytes) -> Any:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("malformed request: line is not valid UTF-8") from None
    try:
        if text.startswith("\ufeff"):  # as json.loads says it (our decoder is called directly)
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise WireError(f"malformed JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:  # deeper than the interpreter's recursion limit (about 1000)
        raise WireError(TOO_DEEP) from None


def depth(value: Any) -> int:
    """How many containers deep ``value`` nests (a scalar: 0, ``{}``: 1), without recursion:
    one pass over the containers, level by level."""
    level = [value] if isinstance(value, dict | list) else []
    n = 0
    while level:
        n += 1
        below: list[Any] = []
        for item in level:
            children = item.values() if isinstance(item, dict) else item
            below.extend(c for c in children if isinstance(c, dict | list))
        level = below
    return n


# One decoder and one encoder for every line: json.loads / json.dumps with options build a
# new one per call, which was a visible part of a request's cost.
_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, parse_int=_parse_int, parse_float=_parse_float
)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


_ORJSON_OPTS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


def dump_line(obj: dict[str, Any]) -> bytes:
    """One reply line. orjson writes it (~5x the stdlib's speed); what it can't write (an
    integer past 64 bits, nesting past 254) the stdlib encoder writes, or refuses as it
    always has (a lone surrogate can't be UTF-8). One difference: a NaN or infinite float
    (which no request can carry: parse_line refuses them) comes out as null, valid JSON,
    where the stdlib wrote NaN."""
    try:
        return orjson.dumps(obj, option=_ORJSON_OPTS)
    except TypeError:  # orjson.JSONEncodeError is one
        return _ENCODER.encode(obj).encode() + b"\n"


def ok(**fields: Any) -> dict[str, Any]:
    return {"version": PROTOCOL_VERSION, "ok": True, **fields}


def error(message: str) -> dict[str, Any]:
    # Keep refusals to one line whatever produced them.
    one_line = " ".join(str(message).split())
    return {"version": PROTOCOL_VERSION, "ok": False, "error": one_line}


def describe_validation_error(exc: ValidationError, tagged: bool = True) -> str:
    """Turn pydantic's multi-line report into one line naming the first problem."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    if kind == "union_tag_invalid":
        return f"unknown command {ctx.get('tag')!r}"
    if kind == "union_tag_not_found":
        return "missing field 'cmd'"
    # Drop the discriminator value pydantic puts first in the location.
    if tagged and loc:
        loc = loc[1:]
    where = ".".join(loc)
    if kind == "model_attributes_type" or kind == "model_type":
        return (
            f"field {where!r}: must be a JSON object" if where else "request must be a JSON object"
        )
    if kind == "extra_forbidden":
        return f"unknown field {where!r}"
    if kind == "missing":
        return f"missing field {where!r}"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"field {where!r}: {msg}" if where else msg


def model_fields_only(model: BaseModel) -> dict[str, Any]:
    """A response body from a model: absent optional fields are left out."""
    return model.model_dump(mode="json", exclude_none=True, by_alias=True)

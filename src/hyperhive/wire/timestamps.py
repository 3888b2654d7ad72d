"""The one timestamp rule for every wire: RFC 3339 in UTC, to the second
(``"2026-09-07T12:34:56Z"``), as hyperhive's own host.sock sends them.

Inside the hive (SQLite, the scheduler) a time stays unix seconds, a float; it becomes
a string only on the way out: the ``Timestamp`` field type for the wire models, and
``stamped`` for the flat rows (TypedDicts) the store hands back. Readers take either
form (``parse_timestamp``), so an older client line or a stored float still reads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

# The time columns of the store's flat rows; only these keys of a row are converted.
TIME_KEYS: frozenset[str] = frozenset(
    {
        "at",
        "sent_at",
        "asked_at",
        "answered_at",
        "requested_at",
        "resolved_at",
        "status_set_at",
        "added_at",
        "closed_at",
        "due_at",
        "created_at",
    }
)


def rfc3339(ts: float) -> str:
    """Unix seconds as RFC 3339 UTC, to the second: ``2026-09-07T12:34:56Z``."""
    seconds = int(ts)
    text = _FORMATTED.get(seconds)
    if text is None:
        if len(_FORMATTED) >= 1024:
            _FORMATTED.clear()
        text = _FORMATTED[seconds] = datetime.fromtimestamp(seconds, UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
    return text


# Seconds formatted, remembered: a reply of many messages sent in the same few seconds
# formats each second once (a datetime and a strftime per message were ~9% of a receiving
# core's CPU in the swarm benchmark).
_FORMATTED: dict[int, str] = {}


def parse_timestamp(value: object) -> float:
    """Unix seconds from a number or an RFC 3339 / ISO 8601 string with a zone."""
    if isinstance(value, bool):
        raise ValueError("a timestamp is unix seconds or an RFC 3339 string")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ValueError("a timestamp is unix seconds or an RFC 3339 string")
    text = value.strip()
    if text.endswith(("z", "Z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an RFC 3339 timestamp: {value[:40]!r}") from None
    if parsed.tzinfo is None:
        raise ValueError("a timestamp needs a timezone, e.g. 2026-01-01T09:00:00Z")
    return parsed.timestamp()


def _out(value: float) -> str:
    return rfc3339(value)


# A model field holding a time: a float inside, RFC 3339 in JSON.
Timestamp = Annotated[
    float,
    BeforeValidator(parse_timestamp),
    PlainSerializer(_out, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}, mode="serialization"),
]


def stamped(row: Mapping[str, Any]) -> dict[str, Any]:
    """A flat row with its time columns (``TIME_KEYS``) as RFC 3339; other keys, and
    anything nested, untouched."""
    out = dict(row)
    for key in TIME_KEYS & out.keys():
        value = out[key]
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = rfc3339(value)
    return out


def stamped_all(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [stamped(r) for r in rows]

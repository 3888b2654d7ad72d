"""Listings as summaries: agent-written text cut at ``CUT`` characters, in SQL (``substr``),
so a listing never loads a whole body into the core. A cut row carries
``truncated: {field: full length in characters}``; the one-item reads give it whole.

``options`` (a JSON list of strings) is cut as text too; only the options complete within
the cut are kept (a cut option would be a different answer)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

CUT = 2048  # characters of each agent-written field a listing shows
PAGE = 50  # rows per page, unless the caller asks for fewer or more
PAGE_MAX = 200  # the most rows one page may hold


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing: its rows, how many there are in all, and whether any come
    after the last row here (ask again with ``after`` = that row's id)."""

    items: list[T]
    total: int
    more: bool


def cut_sql(column: str) -> str:
    """The column's first CUT characters and its full length (two result columns)."""
    return f"substr({column}, 1, {CUT}), length({column})"


def cut_json_sql(column: str) -> str:
    """A JSON column: whole if it is short, else its first CUT characters; and its length."""
    return (
        f"CASE WHEN length({column}) <= {CUT} THEN {column} ELSE substr({column}, 1, {CUT}) END,"
        f" length({column})"
    )


def is_cut(full: object) -> bool:
    return type(full) is int and full > CUT


def options_prefix(text: str) -> list[str]:
    """The options complete within the cut JSON text ``["a", "b", "c…``: ``["a", "b"]``."""
    decoder = json.JSONDecoder()
    out: list[str] = []
    i = 1 if text.startswith("[") else len(text)
    while i < len(text):
        while i < len(text) and text[i] in " ,":
            i += 1
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            break
        if not isinstance(value, str):
            break
        out.append(value)
    return out


def cut_text(text: str) -> tuple[str, int | None]:
    """A string as a summary shows it: (its first CUT characters, its full length if cut)."""
    if len(text) <= CUT:
        return text, None
    return text[:CUT], len(text)


def summarise_row(row: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """A row already in memory (an event) as a listing shows it: ``fields`` cut, ``options``
    and ``payload`` cut as JSON text, ``truncated`` saying what and how long."""
    out = dict(row)
    truncated: dict[str, int] = dict(row.get("truncated") or {})
    for field in fields:
        value = out.get(field)
        if isinstance(value, str):
            out[field], full = cut_text(value)
            if full is not None:
                truncated[field] = full
    options = out.get("options")
    if isinstance(options, list):
        text = json.dumps(options)
        if len(text) > CUT:
            out["options"] = options_prefix(text[:CUT])
            truncated["options"] = len(text)
    if "payload" in out and "payload_sha256" in out:
        text = json.dumps(out["payload"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        if len(text) > CUT:
            out["payload"] = text[:CUT]  # the canonical JSON's first characters, as text
            truncated["payload"] = len(text)
    if truncated:
        out["truncated"] = truncated
    return out


# What each event kind carries of an agent's text, by the key its row is under.
_EVENT_ROWS: dict[str, tuple[str, ...]] = {
    "message": ("body",),
    "question": ("question", "answer"),
    "approval": ("description",),
}


def summarise_event(event: dict[str, Any]) -> dict[str, Any]:
    """A hive event as a live stream sends it: the changed row itself, summarised as a
    listing shows it (so a stream's events are as small as a listing's rows)."""
    out = dict(event)
    for key, fields in _EVENT_ROWS.items():
        row = out.get(key)
        if isinstance(row, dict):
            out[key] = summarise_row(row, fields)
    if event.get("kind") == "reminder" and isinstance(out.get("text"), str):
        out["text"], full = cut_text(out["text"])
        if full is not None:
            out["truncated"] = {"text": full}
    return out

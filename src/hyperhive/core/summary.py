"""Listings as summaries: agent-written text cut at ``CUT`` bytes of UTF-8 (at a character
boundary), in SQL (``substr`` of the text as a blob: SQLite 3.40's text functions stop at a
NUL), so a listing never loads a whole body into the core. A cut row carries
``truncated: {field: full length in bytes}``; the one-item reads give it whole.

``options`` (a JSON list of strings) is cut as text too; only the options complete within
the cut are kept (a cut option would be a different answer)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

CUT = 2048  # bytes (UTF-8) of each agent-written field a listing shows, at most
PAGE = 50  # rows per page, unless the caller asks for fewer or more
PAGE_MAX = 200  # the most rows one page may hold
PER_AGENT_SHOWN = 5  # a fair first screen's rows of any one agent (``fair_ids``)


@dataclass(frozen=True, slots=True)
class Listing(Generic[T]):
    """One page of a listing: its rows, how many there are in all, and whether any come
    after the last row here (ask again with ``after`` = that row's id)."""

    items: list[T]
    total: int
    more: bool
    # A fair page (``fair_ids``): the agents with more than their share, whose other rows
    # are left for their own pages.
    capped: list[str] = dataclasses.field(default_factory=list)


def fair_ids(
    rows: Iterable[tuple[int, str]], per_agent: int, limit: int
) -> tuple[list[int], list[str]]:
    """The ids of a first screen: from ``rows`` (id, agent; oldest first), the first
    ``limit`` taking at most ``per_agent`` of any one agent, so no agent's rows fill the
    screen and push another's off it (red team round 23b: one agent's 50 questions hid
    every later one); and the agents passed over, in the order met. Stops reading once
    ``limit`` are taken."""
    taken: list[int] = []
    counts: dict[str, int] = {}
    capped: dict[str, None] = {}
    for rid, who in rows:
        n = counts.get(who, 0)
        if n >= per_agent:
            capped[who] = None
            continue
        counts[who] = n + 1
        taken.append(rid)
        if len(taken) == limit:
            break
    return taken, list(capped)


def cut_sql(column: str) -> str:
    """Two result columns: the column as stored if it is short or not text, else its first
    CUT bytes (a blob); and its length in bytes if it is text (else NULL). Both come from
    the stored generated columns ``<column>_head`` and ``<column>_bytes`` (schema migration
    6), so the long column itself is read only when it is short."""
    return (
        f"CASE WHEN {column}_head IS NOT NULL THEN {column}_head ELSE {column} END, {column}_bytes"
    )


def is_cut(full: object) -> bool:
    return type(full) is int and full > CUT


def decoded_prefix(raw: bytes) -> str:
    """The first bytes of a UTF-8 text, without a character the cut split."""
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        if e.reason == "unexpected end of data" and e.start >= len(raw) - 3:
            return raw[: e.start].decode()
        raise ValueError(f"not UTF-8 text ({e.reason})") from None


def shown(value: object, full: object) -> object:
    """A column of ``cut_sql`` as a listing shows it: a cut text decoded, else as stored."""
    if not is_cut(full):
        return value
    if not isinstance(value, bytes):
        raise ValueError("a cut text that is not bytes")
    return decoded_prefix(value)


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
    """A string as a summary shows it: (its first CUT bytes, its full length if cut)."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= CUT:
        return text, None
    return decoded_prefix(raw[:CUT]), len(raw)


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
        prefix, full = cut_text(json.dumps(options))
        if full is not None:
            out["options"] = options_prefix(prefix)
            truncated["options"] = full
    if "payload" in out and "payload_sha256" in out:
        text = json.dumps(out["payload"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        prefix, full = cut_text(text)
        if full is not None:
            out["payload"] = prefix  # the canonical JSON's first bytes, as text
            truncated["payload"] = full
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

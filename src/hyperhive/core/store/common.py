"""What every repository shares: the two errors and the JSON helpers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from hyperhive.core.summary import Listing, fair_ids
from hyperhive.wire.framing import MAX_DEPTH, depth, describe_validation_error

if TYPE_CHECKING:  # db.py imports this module
    from hyperhive.core.store.db import Database

T = TypeVar("T")


class ApplyError(Exception):
    """Applying an approved payload failed; the approval becomes ``failed`` with this note."""


class StoreError(Exception):
    """A storage failure, phrased for the caller (e.g. a full disk)."""


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def dump_options(options: list[str] | None) -> str | None:
    return None if options is None else json.dumps(options)


def load_options(raw: object) -> list[str] | None:
    if raw is None:
        return None
    options = load_json(raw, "options")
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise ValueError("options: not a list of strings")
    return options


def load_json(raw: object, what: str) -> Any:
    """A JSON column as the wire would have taken it: text, valid, at most MAX_DEPTH deep
    (deeper can't be serialised again, pydantic stops at 255). Else ValueError, naming it."""
    if not isinstance(raw, str):
        raise ValueError(f"{what}: not JSON text but {type(raw).__name__}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{what}: nested deeper than {MAX_DEPTH} levels") from None
    if depth(value) > MAX_DEPTH:
        raise ValueError(f"{what}: nested deeper than {MAX_DEPTH} levels")
    return value


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A stored row that can't be turned into its model, or back into JSON (written by an
    older version, or by hand). A listing shows it as ``{"id", "unreadable": why}`` and
    goes on: one bad row must not take a whole view down."""

    id: int | None
    reason: str

    def out(self) -> dict[str, Any]:
        return {"id": self.id, "unreadable": self.reason}


def why(exc: Exception) -> str:
    """One line saying why a row could not be read."""
    if isinstance(exc, ValidationError):
        return describe_validation_error(exc, tagged=False)
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def readable(convert: Callable[[Any], T], row: Sequence[Any]) -> T | Unreadable:
    """``convert(row)``, or the row as Unreadable if it can't be read (its id: column 0)."""
    try:
        return convert(row)
    except Exception as e:  # whatever a bad row makes a converter raise
        rid = row[0] if row and type(row[0]) is int else None
        return Unreadable(rid, why(e))


FAIR_SCAN_ROWS = 1000  # rows a first screen reads in id order before it seeks agent by agent


def fair_page(
    db: Database,
    table: str,
    who: str,
    where: list[str],
    args: list[object],
    columns: str,
    convert: Callable[[Any], T],
    per_agent: int,
    limit: int,
) -> Listing[T | Unreadable]:
    """A first screen of ``table``'s rows matching ``where``: oldest first, at most
    ``per_agent`` of any one ``who`` (``summary.fair_ids``), as ``columns`` converted;
    ``more`` when any row is not on it, ``capped`` the agents with rows left off.

    The oldest FAIR_SCAN_ROWS rows in id order fill it, nearly always; when a few agents'
    many rows come first (90,000 open questions of 9 agents: ~50 ms a redraw, the re-check
    of session 18), it is made agent by agent instead: each agent with rows, and its
    oldest ``per_agent``, a seek each on the table's ``(…, who, id)`` partial index
    (schema migration 10), merged."""
    clause = " AND ".join(where)
    conn = db.conn
    total = int(conn.execute(f"SELECT count(*) FROM {table} WHERE {clause}", args).fetchone()[0])
    with closing(
        db.rows(
            f"SELECT id, {who} FROM {table} WHERE {clause} ORDER BY id LIMIT ?",
            [*args, FAIR_SCAN_ROWS],
        )
    ) as rows:
        ids, capped = fair_ids(rows, per_agent, limit)
    if len(ids) < limit and total > FAIR_SCAN_ROWS:
        ids, capped = _fair_by_agent(conn, table, who, clause, args, per_agent, limit)
    found = (
        conn.execute(
            f"SELECT {columns} FROM {table} WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id",
            ids,
        ).fetchall()
        if ids
        else []
    )
    items = [readable(convert, r) for r in found]
    return Listing(items, total, total > len(items), capped)


def _fair_by_agent(
    conn: Any,
    table: str,
    who: str,
    clause: str,
    args: list[object],
    per_agent: int,
    limit: int,
) -> tuple[list[int], list[str]]:
    """``fair_ids`` by seeks: each ``who`` with rows in name order, its oldest
    ``per_agent`` (one more: whether it has more), the oldest ``limit`` of them all."""
    taken: list[tuple[int, str]] = []
    capped: list[str] = []
    at = ""
    while True:
        row = conn.execute(
            f"SELECT {who} FROM {table} WHERE {clause} AND {who}>? ORDER BY {who} LIMIT 1",
            [*args, at],
        ).fetchone()
        if row is None:
            break
        at = str(row[0])
        mine = conn.execute(
            f"SELECT id FROM {table} WHERE {clause} AND {who}=? ORDER BY id LIMIT ?",
            [*args, at, per_agent + 1],
        ).fetchall()
        if len(mine) > per_agent:
            capped.append(at)
        taken += [(int(r[0]), at) for r in mine[:per_agent]]
    taken.sort()
    return [i for i, _ in taken[:limit]], capped

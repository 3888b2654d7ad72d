"""Listings as the surfaces send them, one row at a time: a row the store could not read
(``Unreadable``), or one that can't be serialised, becomes ``{"id", "unreadable": why}``
and the listing goes on. No row in the store can make a view fail."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

from hyperhive.core.store import Unreadable
from hyperhive.core.store.common import why
from hyperhive.wire.framing import model_fields_only
from hyperhive.wire.timestamps import stamped, stamped_all

log = logging.getLogger("hive.core")
T = TypeVar("T")


def _dump(item: Any) -> dict[str, Any]:
    if isinstance(item, BaseModel):
        return model_fields_only(item)
    if isinstance(item, Mapping):  # a TypedDict row: the store checked its types
        return stamped(item)  # its time columns as RFC 3339, like every wire's
    raise TypeError(f"not a row: {type(item).__name__}")


def row_out(item: T | Unreadable, dump: Callable[[T], dict[str, Any]] = _dump) -> dict[str, Any]:
    """One row as JSON-ready data, or its unreadable placeholder."""
    if isinstance(item, Unreadable):
        return item.out()
    try:
        return dump(item)
    except Exception as e:  # e.g. pydantic's serialiser refusing a value
        rid = getattr(item, "id", None)
        if isinstance(item, Mapping):
            rid = item.get("id")
        log.warning("row %s could not be serialised: %s", rid, why(e))
        return Unreadable(rid if type(rid) is int else None, why(e)).out()


def rows_out(
    items: Iterable[T | Unreadable], dump: Callable[[T], dict[str, Any]] = _dump
) -> list[dict[str, Any]]:
    return [row_out(item, dump) for item in items]


def rules_out(rules: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Egress allowlists by agent, their times as RFC 3339."""
    return {name: stamped_all(rows) for name, rows in rules.items()}

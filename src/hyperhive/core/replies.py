"""Every listing reply has a byte budget as well as a count (``[limits] reply_bytes``).

An agent decides how big what it stores is, and JSON escaping grows it on the way out
(a control character is six bytes, ``\\u0001``): 500 reminders of 128 Ki control
characters made one ``recv`` reply 385 MB, which hive-core built in memory and held in
the connection's write buffer for as long as the agent didn't read it.

So a listing takes its rows from a lazy cursor, one at a time, measures each row as it
will be encoded, and stops before the row that would take the reply past the budget:
the core never holds more of a reply than the budget (plus the one row it looked at).
That row is not dropped or split: it is the first of the next batch, and the reply says
``"more": true``. The first row of a batch always goes, so a client paging by the last
id it got always moves on. ``reply_bytes`` is validated to be at least ``MAX_ITEM_BYTES``
(the largest row any of these listings can hold), so every row fits a reply of its own.

What the core holds for replies is then bounded (docs/security.md): a connection's
reply is written and drained before its next request is read (``jsonlines``), so one
connection holds at most one reply, ``reply_bytes``, in its write buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from hyperhive.wire.common import SHORT_TEXT_CHARS, TEXT_CHARS
from hyperhive.wire.framing import MAX_LINE, dump_line

T = TypeVar("T")

DEFAULT_REPLY_BYTES = 4 << 20
# The worst case of JSON escaping: one character becomes six bytes (``\u0001``).
_ESCAPED = 6
_TEXT_JSON = _ESCAPED * TEXT_CHARS + 2
_OPTIONS_JSON = 50 * (_ESCAPED * SHORT_TEXT_CHARS + 3) + 2  # Ask.options: 50 ShortText
# The largest row these listings send, as encoded: a question (as a message or an open
# loose end: a Text and up to 50 options), or an approval (its description came in one
# request line, and its payload is refused when its stored form is larger than a line:
# see approvals.request). 4 KiB for the other fields.
MAX_ITEM_BYTES = max(_TEXT_JSON + _OPTIONS_JSON, 2 * MAX_LINE) + 4096
# The envelope around the rows (``{"version":1,"ok":true,"messages":[`` ... ``],"more":true}``
# and the newline), kept out of the rows' share of the budget.
ENVELOPE_BYTES = 1024


def encoded_size(obj: Any) -> int:
    """Bytes ``obj`` takes in a reply line (as ``framing.dump_line`` encodes it)."""
    return len(dump_line(obj)) - 1  # the same encoder; its newline is not the row's


class ReplyBudget:
    """What is left of one reply's bytes. Listings that share one reply (``loose_ends``)
    share one budget; the first row of the reply always fits."""

    def __init__(self, reply_bytes: int) -> None:
        self.left = reply_bytes - ENVELOPE_BYTES
        self.first = True

    def take(self, nbytes: int) -> bool:
        """Count a row of ``nbytes`` (and its comma) if it fits; False if it doesn't."""
        if not self.first and nbytes + 1 > self.left:
            return False
        self.first = False
        self.left -= nbytes + 1
        return True


@dataclass
class Page(Generic[T]):
    """One batch of a listing: its rows, in order, and whether more were left out."""

    items: list[T] = field(default_factory=list)
    more: bool = False


def take(rows: Iterable[T], budget: ReplyBudget, limit: int, size: Callable[[T], int]) -> Page[T]:
    """Rows from ``rows`` (a lazy cursor) in order, while they fit ``budget`` and number
    at most ``limit``. ``more`` when a row was left for the next batch. The cursor is
    closed as soon as the batch is full, so no row past the next one is read."""
    page: Page[T] = Page()
    it = iter(rows)
    try:
        for row in it:
            if len(page.items) >= limit or not budget.take(size(row)):
                page.more = True
                break
            page.items.append(row)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return page


def more(page: Page[Any], name: str = "more") -> dict[str, bool]:
    """The reply's optional ``more`` field: present (true) only when rows were left out."""
    return {name: True} if page.more else {}

"""JSON from another host, as text this host can store and show (docs/security.md).

JSON may spell a lone UTF-16 surrogate (``"\\ud800"``): Python decodes it into a str that
can't be encoded as UTF-8 again, so a value holding one fails wherever it is written out
(a host.sock reply, a page, SQLite). A hostile host put one in its own agent row's status
text and every host's ``swarm_status``, listings and dashboard failed while the row was in
the roster (red team round 11). What another host sends is decoded here and refused (a
``ValueError``, as any malformed JSON) if it holds one, as a local request holding one
is refused on the sockets (core/jsonlines.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

# A \\u escape of a surrogate (D800-DFFF), however cased: only then is the value walked
# again (a pair escaped by an honest encoder is legal and passes the walk).
_SURROGATE_ESCAPE = re.compile(r"\\[uU][dD][89abAB]|\\[uU][dD][c-fC-F]")


def _no_constant(name: str) -> Any:
    # NaN, Infinity and -Infinity are no JSON, and no honest host writes one (what it
    # publishes came through the wire, which refuses them): taken, c's NaN in an approval's
    # payload went out in a's host.sock replies as ``NaN`` (the stdlib's encoder writes
    # what orjson can't, a 70-bit integer beside it): not JSON (red team round 14).
    raise ValueError(f"{name} is not valid JSON")


def loads(data: bytes | str) -> Any:
    """``json.loads(data)``; ValueError also if a string in it (a key or a value) is not
    valid Unicode text, or if it holds NaN or an infinity. RecursionError passes through,
    as from json.loads.

    Bytes are read as strict UTF-8 here, not by json.loads: it guesses UTF-16 or UTF-32
    from the first bytes and decodes with ``surrogatepass``, so a lone surrogate written
    raw (UTF-8's ED A0 80, or any in UTF-16) came through with no ``\\u`` escape for the
    check below to find (red team round 13). Every honest host writes UTF-8."""
    # UnicodeError is a ValueError: bytes that are not UTF-8 (or a str holding a lone
    # surrogate already) refuse the whole.
    text = data.decode("utf-8") if isinstance(data, bytes) else data.encode("utf-8").decode()
    value = json.loads(text, parse_constant=_no_constant)
    if _SURROGATE_ESCAPE.search(text):
        # UnicodeEncodeError is a ValueError: a lone surrogate anywhere refuses the whole.
        json.dumps(value, ensure_ascii=False).encode()
    return value

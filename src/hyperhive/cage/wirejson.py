"""JSON for the harness: ``json.dumps`` and ``json.loads`` with their defaults, on the
C scanner and encoder the json module itself runs (``_json``), without json's Python
modules. json.decoder compiles regular expressions when imported, and ``re`` brings
``enum``, ``functools``' friends and the rest: with ``socket``'s and ``signal``'s enums,
~7.7 ms of CPU in every cage's harness start (of ~20), which at 1,000 cages is most of
a core's worth of `hive up`'s ~60 s. Same output, same errors (a malformed text imports
json then, to raise json's own ``JSONDecodeError``, a ValueError). Standard library
only: it runs in the cage."""

from __future__ import annotations

import _json

TYPE_CHECKING = False  # mypy reads it as true
if TYPE_CHECKING:
    from typing import Any

_WHITE = " \t\n\r"  # json.decoder.WHITESPACE
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Context:
    """What ``_json.make_scanner`` reads of a JSONDecoder, as ``json.loads``' default."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


_scan = _json.make_scanner(_Context())  # type: ignore[arg-type]  # it reads these attributes


def _default(o: object) -> Any:
    raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


def dumps(obj: Any, *, ensure_ascii: bool = True) -> str:
    """``json.dumps(obj, ensure_ascii=ensure_ascii)``."""
    escape = _json.encode_basestring_ascii if ensure_ascii else _json.encode_basestring
    if isinstance(obj, str):
        return escape(obj)
    # json.JSONEncoder's defaults: circular check, separators ", " and ": ", no sort, NaN
    # allowed. An encoder (its circular-check dict) per call, as json's: the C encoder
    # leaves the containers it was in on an error (RecursionError, an unserializable
    # value) in that dict, so a shared one kept them alive for good and took the same
    # object, dumped again, for a circular reference (red team round 21).
    encode = _json.make_encoder({}, _default, escape, None, ": ", ", ", False, False, True)
    return "".join(encode(obj, 0))


def loads(s: str | bytes | bytearray) -> Any:
    """``json.loads(s)``."""
    if not isinstance(s, str):
        if not isinstance(s, bytes | bytearray):  # json's error, not decode's AttributeError
            raise TypeError(
                f"the JSON object must be str, bytes or bytearray, not {type(s).__name__}"
            )
        s = s.decode(_encoding(s), "surrogatepass")
    elif s.startswith("\ufeff"):
        raise _error("Unexpected UTF-8 BOM (decode using utf-8-sig)", s, 0)
    start = len(s) - len(s.lstrip(_WHITE))
    try:
        obj, end = _scan(s, start)
    except StopIteration as err:
        raise _error("Expecting value", s, err.value) from None
    if s[end:].strip(_WHITE):
        raise _error("Extra data", s, end + len(s[end:]) - len(s[end:].lstrip(_WHITE)))
    return obj


def _error(msg: str, doc: str, pos: int) -> ValueError:
    from json import JSONDecodeError

    return JSONDecodeError(msg, doc, pos)


def _encoding(b: bytes | bytearray) -> str:
    """json.detect_encoding: UTF-8, -16 or -32 by the BOM or where the NULs are."""
    if b.startswith((b"\x00\x00\xfe\xff", b"\xff\xfe\x00\x00")):
        return "utf-32"
    if b.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if b.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    if len(b) >= 4:
        if not b[0]:
            return "utf-16-be" if b[1] else "utf-32-be"
        if not b[1]:
            return "utf-16-le" if b[2] or b[3] else "utf-32-le"
    elif len(b) == 2:
        if not b[0]:
            return "utf-16-be"
        if not b[1]:
            return "utf-16-le"
    return "utf-8"

"""How agent-written text is shown to a person: never as something that acts.

An agent controls most of what the operator reads (message bodies, questions,
approval descriptions and payloads, status text, transcripts). In a terminal an
escape sequence in that text moves the cursor, rewrites what is on screen, sets
the clipboard (OSC 52) or draws a link that goes elsewhere (OSC 8); in a page or
a terminal a bidi override reorders what is shown. So every character that can
act rather than be read is replaced by its escape before it is shown:

- C0 controls (``\\x00``–``\\x1f``) except newline and tab, which multi-line text
  keeps (a table cell or a ``<pre>`` shows them as what they are); DEL;
- C1 controls (``\\x80``–``\\x9f``; ``\\x9b`` is a CSI on its own);
- bidi marks, embeddings, overrides and isolates (U+061C, U+200E, U+200F,
  U+202A–U+202E, U+2066–U+2069);
- the line and paragraph separators U+2028 and U+2029 (line breaks to some
  renderers, invisible to others);
- lone surrogates (they can't even be encoded for a terminal).

Text shows them as ``\\x1b`` (code points below 256; ``\\n``, ``\\r``, ``\\t``) or
``\\u202e``; JSON as its own escapes ``\\u001b`` / ``\\u202e``, so ``--json`` parses
to the same values.
Everything else, other non-ASCII text included, is shown unchanged. The pages do
the same in their scripts (``visible`` in ``dashboard.js`` and ``agent.js``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

JS = Path(__file__).with_name("display.js")  # the same rules, for the pages' scripts
_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_SEPARATORS = "\u2028\u2029"
_SURROGATES = "\ud800-\udfff"
# What JSON (ensure_ascii=False) leaves as is and must not reach a terminal raw.
_JSON_UNSAFE = re.compile(f"[\x7f-\x9f{_BIDI}{_SEPARATORS}{_SURROGATES}]")
_MULTI_LINE_UNSAFE = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}{_SEPARATORS}{_SURROGATES}]")
_ONE_LINE_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}{_SEPARATORS}{_SURROGATES}]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# The same characters as _JSON_UNSAFE, as orjson writes them (UTF-8; it refuses lone
# surrogates): DEL, C1 (U+0080-009F), U+061C, U+200E/F, U+2028-202E, U+2066-2069. UTF-8
# never has a lead byte inside another character, so no match starts mid-character.
_JSON_UNSAFE_UTF8 = re.compile(
    rb"\x7f|\xc2[\x80-\x9f]|\xd8\x9c|\xe2\x80[\x8e\x8f\xa8-\xae]|\xe2\x81[\xa6-\xa9]"
)


def _escape(m: re.Match[str]) -> str:
    ch = m.group()
    cp = ord(ch)
    return _SHORT.get(ch) or (f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}")


def _json_escape(m: re.Match[str]) -> str:
    return f"\\u{ord(m.group()):04x}"


# Strong right-to-left letters (Hebrew, Arabic, Syriac, Thaana, NKo and the rest of
# U+0590-08FF, their presentation forms, the right-to-left scripts past U+FFFF): ordinary
# text, yet a terminal that lays out bidi text draws the digits, quotes and commas between
# two of them right to left: ["\u05d0","100","5000000","\u05d1"] reads 5000000 first.
_RTL = re.compile(
    "[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufefe\U00010800-\U00010fff\U0001e800-\U0001efff]"
)


def _json_escape_any(m: re.Match[str]) -> str:
    cp = ord(m.group())
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    cp -= 0x10000
    return f"\\u{0xD800 + (cp >> 10):04x}\\u{0xDC00 + (cp & 0x3FF):04x}"


def left_to_right_json_text(text: str) -> tuple[str, bool]:
    """A JSON text with its right-to-left letters as JSON escapes (the same JSON value,
    drawn in stored order by any terminal), and whether it had any: for the one place the
    exact order is the point (``hive show approval``'s payload)."""
    shown, n = _RTL.subn(_json_escape_any, text)
    return shown, n > 0


def visible(text: str, *, one_line: bool = False) -> str:
    """``text`` with every character that could act on a terminal or page escaped.

    ``one_line`` escapes newline and tab too: for text printed as one line of its own,
    where a newline would let it forge the next line."""
    return (_ONE_LINE_UNSAFE if one_line else _MULTI_LINE_UNSAFE).sub(_escape, text)


def visible_value(value: Any) -> Any:
    """``visible`` for strings; anything else (numbers, None) as it is. Jinja's
    ``finalize``: every ``{{ … }}`` of a page goes through it."""
    if not isinstance(value, str):
        return value
    shown = visible(value)
    # A str subclass (Jinja's Markup) stays one: the escapes added are plain ASCII.
    return shown if type(value) is str else type(value)(shown)


def visible_json_text(text: str) -> str:
    """A JSON text (from ``json.dumps(..., ensure_ascii=False)``) with the characters
    JSON leaves raw escaped as JSON escapes: the same JSON value, safe to show. These
    characters occur only inside strings, where ``\\uXXXX`` is their escape."""
    return _JSON_UNSAFE.sub(_json_escape, text)


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` for a person or a terminal: other non-ASCII text stays readable,
    controls, C1, bidi and separators are ``\\uXXXX``."""
    return visible_json_text(json.dumps(value, ensure_ascii=False, **kwargs))


def _json_escape_utf8(m: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(m.group().decode())


def dumps_bytes(value: Any) -> bytes:
    """``dumps`` for an HTTP body: the same JSON value, compact, as UTF-8, through orjson
    (GET /api/state of 1,000 agents: 1.3 ms to write instead of 7.5, plus the escapes'
    scan, once a second while a dashboard is open). What orjson refuses (a lone surrogate,
    a key that is not a string, an integer past 64 bits) goes through ``dumps``."""
    import orjson  # here: the cage's page and the CLI import this module without it

    # What json.dumps refuses, orjson refuses too (datetimes, dataclasses).
    refuse = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
    try:
        raw = orjson.dumps(value, option=refuse)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return dumps(value).encode()
    return _JSON_UNSAFE_UTF8.sub(_json_escape_utf8, raw)

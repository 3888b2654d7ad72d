"""``hyperhive.display``: what the operator's surfaces make of agent text. Fuzzed:
no control, C1, bidi or separator character survives ``visible``; printable text
(any other character, backslashes included) is unchanged; ``dumps`` is JSON that
parses back to the same value and carries none of them raw."""

from __future__ import annotations

import json
import re
import unicodedata

from hypothesis import example, given, settings
from hypothesis import strategies as st

from hyperhive.display import dumps, dumps_bytes, visible, visible_json_text, visible_value

BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def acts(ch: str, *, keep: str = "") -> bool:
    """A character that does something to a terminal or page instead of being read."""
    if ch in keep:
        return False
    cat = unicodedata.category(ch)
    return cat in ("Cc", "Cs", "Zl", "Zp") or ch in BIDI


# Text that mixes the dangerous characters with ordinary ones, astral and lone surrogates too.
dangerous = st.sampled_from(
    [chr(c) for c in range(0x20)] + [chr(c) for c in range(0x7F, 0xA0)] + sorted(BIDI)
    + ["\u2028", "\u2029", "\ud800", "\udfff"]
)
texts = st.lists(st.one_of(dangerous, st.characters(), st.text(max_size=3)), max_size=40).map("".join)
printable = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"),
                                  blacklist_characters="".join(BIDI)))


@settings(max_examples=1000, deadline=None)
@given(texts)
@example("\x1b]52;c;cm0gLXJmIH4K\x07\x9b2J\u202egnp.exe\u202c\r\n\t")
def test_no_acting_character_survives(text: str) -> None:
    multi, one = visible(text), visible(text, one_line=True)
    assert not any(acts(ch, keep="\n\t") for ch in multi), ascii(multi)
    assert not any(acts(ch) for ch in one), ascii(one)
    assert multi.count("\n") == text.count("\n") and multi.count("\t") == text.count("\t")
    # Only what acts is replaced, each by an escape of its code point.
    assert re.sub(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|[nrt])", "", one) == re.sub(
        r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|[nrt])", "", "".join(ch for ch in text if not acts(ch)))
    assert visible_value(text) == multi


@settings(max_examples=500, deadline=None)
@given(printable)
def test_printable_text_is_unchanged(text: str) -> None:
    assert visible(text) == text
    assert visible(text, one_line=True) == text


@settings(max_examples=500, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | texts,
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(texts, kids, max_size=4),
                    max_leaves=20))
def test_dumps_is_the_same_json_with_nothing_raw(value: object) -> None:
    shown = dumps(value)
    # The value json itself round-trips to (it too reads "\ud800\udfff" as one character).
    assert json.loads(shown) == json.loads(json.dumps(value))
    assert not any(acts(ch) for ch in shown), ascii(shown)
    assert visible_json_text(json.dumps(value, ensure_ascii=False)) == shown
    # The HTTP bodies' writer (orjson, or dumps for what it refuses): the same value.
    body = dumps_bytes(value)
    assert json.loads(body) == json.loads(shown)
    assert not any(acts(ch) for ch in body.decode()), ascii(body)


def test_examples() -> None:
    assert visible("a\x1b[2Ab\x9b2J\u202eé日本😀\\x1b") == "a\\x1b[2Ab\\x9b2J\\u202eé日本😀\\x1b"
    assert visible("one\ntwo\r", one_line=True) == "one\\ntwo\\r"
    assert dumps({"k": "\x1b\x9b\u202e é"}) == '{"k": "\\u001b\\u009b\\u202e é"}'
    assert visible_value(3) == 3 and visible_value(None) is None
    every = "\x1b\x7f\x80\x9b\x9f\u061c\u200e\u200f\u2028\u202a\u202e\u2066\u2069 é日本😀"
    assert dumps_bytes({"k": every}) == (
        '{"k":"\\u001b\\u007f\\u0080\\u009b\\u009f\\u061c\\u200e\\u200f\\u2028\\u202a'
        '\\u202e\\u2066\\u2069 é日本😀"}'
    ).encode()
    assert dumps_bytes({"lone": "\ud800", 1: 2}) == dumps({"lone": "\ud800", 1: 2}).encode()

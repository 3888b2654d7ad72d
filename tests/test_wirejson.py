"""The harness's JSON (cage/wirejson.py) is json.dumps/json.loads with their defaults:
the same text for any value, the same value or the same error for any input."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperhive.cage import wirejson

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5),
    max_leaves=30,
)


def same(a: Any, b: Any) -> bool:
    """Equal, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def outcome(fn: Any, arg: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(arg)
    except (ValueError, TypeError, RecursionError) as e:
        return type(e).__name__, str(e)


@settings(max_examples=400)
@given(values)
def test_dumps_is_json_dumps_and_loads_reads_it_back(v: Any) -> None:
    for ascii_ in (True, False):
        text = wirejson.dumps(v, ensure_ascii=ascii_)
        assert text == json.dumps(v, ensure_ascii=ascii_)
        assert same(wirejson.loads(text), v)
        assert same(wirejson.loads(text.encode("utf-8", "surrogatepass")), v)


texts = st.one_of(
    st.text(alphabet=' \t\n\r{}[]":,.-+eE0123456789truefalsnNIiy\\u\ufeffé\x00', max_size=40),
    st.text(max_size=40),
    values.map(json.dumps).map(lambda t: " " + t + " \n"),
)


@settings(max_examples=600)
@given(texts)
def test_loads_gives_json_loads_value_or_its_error(text: str) -> None:
    for arg in (text, text.encode("utf-8", "surrogatepass"), text.encode("utf-16"), text.encode("utf-32-le")):
        want, got = outcome(json.loads, arg), outcome(wirejson.loads, arg)
        assert want[0] == got[0], (arg, want, got)
        assert same(want[1], got[1]) if want[0] == "ok" else want[1] == got[1], (arg, want, got)


@pytest.mark.parametrize("bad", [{1j}, [object()], {"k": b"x"}, {(1, 2): 1}])
def test_what_json_refuses_it_refuses_alike(bad: Any) -> None:
    assert outcome(wirejson.dumps, bad) == outcome(json.dumps, bad)


def test_a_line_nested_past_the_recursion_limit_raises_as_json_does() -> None:
    line = "[" * 100_000 + "]" * 100_000
    assert outcome(wirejson.loads, line)[0] == outcome(json.loads, line)[0] == "RecursionError"


@pytest.mark.parametrize("bad", [3, None, 1.5, ["[]"], memoryview(b"[]")])
def test_loads_of_neither_str_nor_bytes_is_json_loads_type_error(bad: Any) -> None:
    assert outcome(wirejson.loads, bad) == outcome(json.loads, bad)
    assert outcome(wirejson.loads, bad)[0] == "TypeError"

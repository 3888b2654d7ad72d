"""The dashboard's first screen is fair (red team round 23b): no agent's rows fill it and
push another's off (``summary.fair_ids``); and NSS is asked so that "no such id" and "did
not answer" differ (``priv/nss.py``, red team of session 18)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hyperhive.core.summary import fair_ids
from hyperhive.priv import nss


def test_fair_ids_take_at_most_so_many_of_each_agent_oldest_first() -> None:
    rows = [(i, "mule") for i in range(1, 51)] + [(51, "alice"), (52, "mule"), (53, "bob")]
    ids, capped = fair_ids(iter(rows), per_agent=5, limit=50)
    assert ids == [1, 2, 3, 4, 5, 51, 53]
    assert capped == ["mule"]


def test_fair_ids_stop_reading_once_the_screen_is_full() -> None:
    read: list[int] = []

    def rows() -> Iterator[tuple[int, str]]:
        for i in range(1, 10_000):
            read.append(i)
            yield (i, f"a{i % 4}")

    ids, capped = fair_ids(rows(), per_agent=2, limit=6)
    assert ids == [1, 2, 3, 4, 5, 6] and capped == []
    assert read[-1] == 6  # not one row more


def test_nss_tells_an_id_it_holds_from_one_it_does_not() -> None:
    assert nss.name_of("uid", 0) == "root"
    assert nss.name_of("gid", 0) == "root"
    assert nss.name_of("uid", 2**31 - 3) is None
    assert nss.name_of("gid", 2**31 - 3) is None


def test_nss_that_does_not_answer_is_not_no_such_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """getpwuid_r's error number (sssd down: ECONNREFUSED) is LookupFailed, never None."""

    class Failing:
        def __getattr__(self, name: str) -> object:
            return lambda *args: 111  # ECONNREFUSED

    monkeypatch.setattr(nss, "_libc", Failing())
    with pytest.raises(nss.LookupFailed, match=r"did not answer for uid 5 \(ECONNREFUSED"):
        nss.name_of("uid", 5)


def test_names_of_asks_at_once_in_order_and_within_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """nss.names_of: the answers in the order asked; four lookups of 0.3 s each take one
    answer's time (at once); one past the deadline is LookupFailed, in one line."""
    import time

    assert nss.names_of([("uid", 0), ("uid", 2**31 - 3), ("gid", 0)]) == ["root", None, "root"]
    real = nss.name_of

    def slow(kind: str, i: int) -> str | None:
        time.sleep(0.3 if i < 100 else 5)
        return real(kind, i)

    monkeypatch.setattr(nss, "name_of", slow)
    t0 = time.monotonic()
    assert nss.names_of([("uid", 0), ("gid", 0), ("uid", 1), ("gid", 1)]) == ["root", "root", "daemon", "daemon"]
    assert time.monotonic() - t0 < 0.9
    t0 = time.monotonic()
    with pytest.raises(nss.LookupFailed, match=r"^the host's user database did not answer for gid 500 within 0.5 s$"):
        nss.names_of([("uid", 0), ("gid", 500)], deadline=0.5)
    assert time.monotonic() - t0 < 1.0

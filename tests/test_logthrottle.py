"""LogThrottle: one line per key per period, carrying the count held back."""

from __future__ import annotations

import threading

import pytest

from hyperhive import logthrottle
from hyperhive.logthrottle import LogThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(logthrottle.time, "monotonic", c)
    return c


def test_first_event_logs_then_the_period_holds_back_and_the_next_line_counts(clock: Clock) -> None:
    t: LogThrottle[str] = LogThrottle(10.0)
    assert t.count("a") == 1
    assert [t.count("a") for _ in range(5)] == [0] * 5
    assert t.count("b") == 1  # keys apart
    clock.now += 9.9
    assert t.count("a") == 0
    clock.now += 0.1
    assert t.count("a") == 7  # the 6 held back and this one
    assert t.count("a") == 0


def test_keys_quiet_for_a_period_are_forgotten_past_max_keys(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logthrottle, "MAX_KEYS", 8)
    t: LogThrottle[int] = LogThrottle(1.0)
    for k in range(8):
        assert t.count(k) == 1
    clock.now += 1.0
    assert t.count(100) == 1
    assert len(t._logged_at) == 1  # the 8 quiet ones went


def test_counts_from_threads_add_up(clock: Clock) -> None:
    t: LogThrottle[str] = LogThrottle(10.0)
    got: list[int] = []

    def hammer() -> None:
        got.extend(t.count("k") for _ in range(1000))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    clock.now += 10.0
    assert sum(got) + t.count("k") == 4001
    assert got.count(1) == 1

"""LogThrottle: one line per key per period; what a period held back is told when it
ends, even if the key never comes again."""

from __future__ import annotations

import threading
import time

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


class Lines:
    def __init__(self) -> None:
        self.lines: list[tuple[object, int]] = []
        self.lock = threading.Lock()

    def __call__(self, key: object, n: int) -> None:
        with self.lock:
            self.lines.append((key, n))


def test_the_first_event_is_told_at_once_the_rest_when_the_period_ends(clock: Clock) -> None:
    lines = Lines()
    t: LogThrottle[str] = LogThrottle(10.0, lines)
    t.event("a")
    assert lines.lines == [("a", 1)]
    for _ in range(5):
        t.event("a")
    t.event("b")  # keys apart
    assert lines.lines == [("a", 1), ("b", 1)]
    clock.now += 9.9
    t.flush()  # the timer's work, early: nothing due
    assert lines.lines == [("a", 1), ("b", 1)]
    clock.now += 0.1
    t.flush()
    assert lines.lines == [("a", 1), ("b", 1), ("a", 5)]
    t.event("a")  # a period from that line: held again
    assert lines.lines[-1] == ("a", 5)


def test_a_burst_that_stops_is_told_whole_by_the_timer() -> None:
    """Red team round 21: 1,001 refusals then none read as one, with the count carried only
    by the key's next event. The real clock and the real timer thread here."""
    lines = Lines()
    t: LogThrottle[str] = LogThrottle(0.3, lines)
    for _ in range(1001):
        t.event("k")
    assert lines.lines == [("k", 1)]
    deadline = time.monotonic() + 5
    while len(lines.lines) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lines.lines == [("k", 1), ("k", 1000)]
    time.sleep(0.5)
    assert len(lines.lines) == 2  # nothing held: no further line, no timer left running
    assert t._timer is None


def test_keys_quiet_for_a_period_are_forgotten_past_max_keys(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logthrottle, "MAX_KEYS", 8)
    t: LogThrottle[int] = LogThrottle(1.0, Lines())
    for k in range(8):
        t.event(k)
    clock.now += 1.0
    t.event(100)
    assert set(t._logged_at) == {100}  # the 8 quiet ones went


def test_counts_from_threads_add_up() -> None:
    lines = Lines()
    t: LogThrottle[str] = LogThrottle(0.2, lines)

    def hammer() -> None:
        for _ in range(2000):
            t.event("k")

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    deadline = time.monotonic() + 5
    while sum(n for _, n in lines.lines) < 8000 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sum(n for _, n in lines.lines) == 8000
    assert len(lines.lines) <= 2 + 2 * (time.monotonic() - deadline + 5) / 0.2

"""hive-priv's per-name locks: one request at a time per name, and no entry kept for a
name once its last request is done (the core may name any number of agents)."""

from __future__ import annotations

import threading
import time

from hyperhive.priv.namelocks import NameLocks


def test_no_entry_outlives_its_requests() -> None:
    locks = NameLocks()
    for i in range(10_000):
        with locks.hold(f"a{i}"):
            assert len(locks) == 1
    assert len(locks) == 0


def test_one_request_at_a_time_per_name_and_waiters_share_the_entry() -> None:
    locks = NameLocks()
    inside: list[int] = []
    overlap: list[bool] = []

    def request(n: int) -> None:
        with locks.hold("alice"):
            overlap.append(bool(inside))
            inside.append(n)
            time.sleep(0.01)
            inside.remove(n)

    threads = [threading.Thread(target=request, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.02)
    assert len(locks) == 1  # seven waiters and a holder: one entry
    for t in threads:
        t.join()
    assert overlap == [False] * 8
    assert len(locks) == 0


def test_other_names_are_not_held_up() -> None:
    locks = NameLocks()
    with locks.hold("alice"):
        assert locks.held("alice")
        done = threading.Event()

        def other() -> None:
            with locks.hold("bob"):
                done.set()

        threading.Thread(target=other).start()
        assert done.wait(2)
    assert not locks.held("alice")


def test_an_exception_inside_releases_the_entry() -> None:
    locks = NameLocks()
    try:
        with locks.hold("alice"):
            raise RuntimeError("handler failed")
    except RuntimeError:
        pass
    assert len(locks) == 0
    with locks.hold("alice"):  # not left locked
        pass

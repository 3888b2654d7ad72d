"""An agent's request bytes are paced ([limits] input_bytes_per_second): past its burst,
the core reads its next line only when the bucket has refilled, so one agent writing
as fast as it can can't hold the core's event loop away from everyone else."""

from __future__ import annotations

import json
import threading
import time

import pytest

from conftest import CoreFactory
from helpers import DEFAULT_AGENTS, render_toml
from hyperhive.core.ratelimit import (
    CONTAINER_COST_BYTES,
    CONTAINERS_FREE,
    LINE_COST_BYTES,
    BytePacer,
    line_cost,
)
from hyperhive.wire.framing import MAX_LINE

MIB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_pacer_lets_a_burst_through_then_waits_in_proportion() -> None:
    clock = FakeClock()
    pacer = BytePacer(per_second=MIB, burst=2 * MIB, clock=clock)
    line = MIB - LINE_COST_BYTES  # a line that costs a MiB, its overhead counted
    assert pacer.debt(line) == 0.0  # within the burst
    assert pacer.debt(line) == 0.0
    assert pacer.debt(line) == 1.0  # a MiB past it: a second at 1 MiB/s
    clock.now += 1.0
    assert pacer.debt(MIB // 2 - LINE_COST_BYTES) == 0.5  # the second refilled what it owed
    clock.now += 100.0
    assert pacer.debt(0) == 0.0  # refills to the burst, not beyond
    assert pacer.debt(2 * MIB - 2 * LINE_COST_BYTES) == 0.0
    assert pacer.debt(line) == 1.0


def test_every_line_costs_its_overhead_so_small_requests_are_paced_too() -> None:
    """An empty ack is 24 bytes; counted by its bytes alone, 8 MiB/s let one agent make
    ~350,000 requests a second. Each line also counts LINE_COST_BYTES: past the burst,
    an agent's requests come at most per_second / LINE_COST_BYTES a second."""
    clock = FakeClock()
    pacer = BytePacer(per_second=8 * MIB, burst=2 * MIB, clock=clock)
    ack = len(b'{"cmd":"ack","ids":[1]}\n')
    free = 0
    while pacer.debt(ack) == 0.0:
        free += 1
    assert free == 2 * MIB // (ack + LINE_COST_BYTES)  # the burst, in lines
    clock.now += 1.0  # a second's refill: 8 MiB, about 4,000 lines' worth
    lines = 0
    while pacer.debt(ack) == 0.0:
        lines += 1
    assert lines < 8 * MIB // LINE_COST_BYTES


def test_a_line_pays_for_its_containers_past_a_few() -> None:
    """Decoding walks every container in Python: a line's ``[`` and ``{`` past
    CONTAINERS_FREE are charged on top of its bytes (red team round 23a, and its
    re-check: 4 KiB lines of empty objects)."""
    short = b'{"cmd":"send","to":"b","body":"[[[{{{"}\n'
    assert line_cost(short) == len(short)
    wide = b'{"x":[' + b",".join([b"{}"] * 1360) + b"]}\n"
    assert line_cost(wide) == len(wide) + CONTAINER_COST_BYTES * (1362 - CONTAINERS_FREE)
    text = b'{"body":"' + b"x" * 8000 + b'"}\n'  # long, but one container
    assert line_cost(text) == len(text)


def test_a_charge_is_waited_for_by_the_next_line() -> None:
    """A reply's bytes taken from the bucket (``charge``): no line's cost with them, and
    the agent's next line waits for them."""
    clock = FakeClock()
    pacer = BytePacer(per_second=MIB, burst=MIB, clock=clock)
    pacer.charge(3 * MIB)
    assert abs(pacer.debt(0) - (2 * MIB + LINE_COST_BYTES) / MIB) < 1e-9
    clock.now += 10
    assert pacer.debt(0) == 0.0
    off = BytePacer(per_second=0, burst=MIB, clock=clock)
    off.charge(10 * MIB)
    assert off.debt(0) == 0.0


def test_zero_turns_pacing_off() -> None:
    pacer = BytePacer(per_second=0, burst=2 * MIB, clock=FakeClock())
    assert all(pacer.debt(MAX_LINE) == 0.0 for _ in range(100))


def test_a_flooding_agent_is_slowed_and_the_operator_is_not(core_factory: CoreFactory) -> None:
    core = core_factory(start=False)
    core.config_path.write_text(render_toml(DEFAULT_AGENTS, sections={"limits": {
        "input_bytes_per_second": 2 * MIB, "input_burst_bytes": 2 * MIB,
        "messages_per_second": 1000, "message_burst": 1000}}))
    core.start()
    agent = next(iter(DEFAULT_AGENTS))
    # A request line of almost 1 MiB, refused (an unknown field) after it was read and
    # decoded: refusals cost the core as much as acceptances, so they are paced too.
    line = json.dumps({"cmd": "whoami", "pad": "x" * (MAX_LINE - 200)}).encode()
    flood = 8  # MiB: 2 within the burst, then 6 at 2 MiB/s, about 3 s
    took: list[float] = []

    def write() -> None:
        with core.agent(agent) as c:
            t0 = time.monotonic()
            for _ in range(flood):
                c.send_raw(line + b"\n")
                reply = c.read()
                assert reply["ok"] is False and "pad" in reply["error"]
            took.append(time.monotonic() - t0)

    writer = threading.Thread(target=write)
    writer.start()
    operator_waits = []
    while writer.is_alive():
        t0 = time.monotonic()
        assert core.host_call("list")["ok"] is True
        operator_waits.append(time.monotonic() - t0)
        time.sleep(0.05)
    writer.join()
    # The limit holds: 6 MiB past the burst can't go faster than 2 MiB/s (a lower bound,
    # so a slow machine can't make it fail).
    assert took and took[0] >= 2.5, took
    # While the agent waits, the operator's socket answers.
    assert len(operator_waits) >= 10


def test_piece_pacer_forgets_the_buckets_of_agents_gone_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """egress_tls.PiecePacer: a bucket refilled is dropped once there are more than
    FORGET_PAST (a new one starts full, so nothing changes); one still owing is kept."""
    from hyperhive.core import egress_tls

    clock = [1000.0]
    monkeypatch.setattr(egress_tls.time, "monotonic", lambda: clock[0])
    pacer = egress_tls.PiecePacer(per_second=10)
    for _ in range(30):
        pacer.owed("busy")  # 20 pieces past its 10: owes 2 s
    for i in range(egress_tls.FORGET_PAST - 1):  # at the bound: none swept yet
        pacer.owed(f"gone-{i}")
    assert len(pacer._buckets) == egress_tls.FORGET_PAST
    clock[0] += 1.0  # every one-piece bucket refilled; "busy" still owes 1 s
    pacer.owed("new")
    assert set(pacer._buckets) == {"busy", "new"}, len(pacer._buckets)
    assert pacer.owed("busy") > 0.9

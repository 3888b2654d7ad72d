"""swarm/lanes.py, the order the operator's carried actions run in on their host: one
agent's in the order they came, different agents' at once, at most ``at_once`` at a
time, and an action for every agent (a stop with no names) after all before it and
before all after it (docs/swarm.md, "Carried out concurrently, and once")."""

from __future__ import annotations

import asyncio

from hyperhive.swarm.lanes import Lanes


def test_one_lane_in_order_lanes_at_once_bounded_and_a_whole_hive_action_between() -> None:
    log: list[str] = []
    running = 0
    most = 0

    def job(name: str, gate: asyncio.Event | None = None, fail: bool = False):  # type: ignore[no-untyped-def]
        async def run() -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            log.append(f"+{name}")
            try:
                if gate is not None:
                    await gate.wait()
                else:
                    await asyncio.sleep(0.01)
                if fail:
                    raise RuntimeError(name)
            finally:
                running -= 1
                log.append(f"-{name}")

        return run

    async def main() -> None:
        lanes = Lanes(at_once=3)
        slow = asyncio.Event()
        lanes.run(["bob"], job("stop bob", slow))  # slow: bob's lane waits behind it
        lanes.run(["bob"], job("send bob"))
        lanes.run(["bea"], job("answer bea", fail=True))  # a failure is its own
        lanes.run(["bea"], job("send bea"))
        for i in range(4):
            lanes.run([f"x{i}"], job(f"x{i}"))
        await asyncio.sleep(0.2)
        # bea's lane went through while bob's stop was still held; bob's send waits.
        assert "-send bea" in log and "+send bob" not in log
        lanes.run(None, job("stop all"))
        lanes.run(["bea"], job("after all"))
        await asyncio.sleep(0.05)
        assert "+stop all" not in log  # it waits for bob's lane
        slow.set()
        while lanes.jobs:
            await asyncio.wait(set(lanes.jobs))

    asyncio.run(main())
    assert log.index("-stop bob") < log.index("+send bob")
    assert log.index("-answer bea") < log.index("+send bea")
    assert log.index("-send bob") < log.index("+stop all") < log.index("-stop all") < log.index("+after all")
    assert max(log.index(f"-x{i}") for i in range(4)) < log.index("+stop all")
    assert most == 3  # bounded, and more than one at once

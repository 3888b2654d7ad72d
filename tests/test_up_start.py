"""`hive up` starts hive-priv and the core side by side (``up.first_failure``): both must
be up before the gateway, and the first to fail stops the other and is the one reported."""

from __future__ import annotations

import asyncio

import pytest

from hyperhive.cli.up import first_failure


def test_both_steps_run_side_by_side_and_both_finish() -> None:
    order: list[str] = []

    async def step(name: str, delay: float) -> None:
        order.append(f"{name} started")
        await asyncio.sleep(delay)
        order.append(f"{name} done")

    asyncio.run(first_failure(step("priv", 0.05), step("core", 0.01)))
    assert order == ["priv started", "core started", "core done", "priv done"]


def test_the_first_failure_is_raised_and_the_other_step_is_cancelled() -> None:
    seen: list[str] = []

    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("hive-priv exited with status 1 before it was ready")

    async def waits() -> None:
        try:
            await asyncio.sleep(30)  # the core, its first request in priv.sock's backlog
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def run() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(RuntimeError, match="hive-priv exited"):
            await first_failure(fails(), waits())
        return loop.time() - t0

    took = asyncio.run(run())
    assert seen == ["cancelled"] and took < 5, (seen, took)

"""Shared fixtures: a real ``hive-core`` subprocess per test (or per module).

``core`` starts the daemon with three agents (alice -> bob, bob -> alice and
carol, carol with no peers), waits for its ``hive-core: ready`` line and stops
it with SIGTERM at teardown, asserting a clean exit (code 0). The handle is
``helpers.CoreProcess``; later test modules (cages, HTTP) can build their own
through ``core_factory`` with other agents, directories or arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import CoreProcess
from hive_fixture import caged_hive, hive_factory  # noqa: F401  (whole-hive fixtures)
from swarm_fixture import hive_swarm, hives, swarm  # noqa: F401  (three test hosts: hive-cores, whole hives)

pytest_plugins = ["file_durations"]  # the slowest test files, in the terminal summary

CoreFactory = Callable[..., CoreProcess]


def _factory(base_dir: Callable[[], Path]) -> tuple[CoreFactory, list[CoreProcess]]:
    made: list[CoreProcess] = []

    def make(agents: dict[str, dict[str, Any]] | None = None, *, start: bool = True, **kw: Any) -> CoreProcess:
        core = CoreProcess(base_dir(), agents, **kw)
        made.append(core)
        if start:
            core.start()
        return core

    return make, made


def _teardown(made: list[CoreProcess]) -> None:
    failures = []
    for core in made:
        try:
            if core.running:
                rc = core.stop()
                if rc != 0:
                    failures.append(f"hive-core exited with {rc} at teardown\n{core.log_tail()}")
        finally:
            core.cleanup()
    assert not failures, "\n".join(failures)


@pytest.fixture
def core_factory(tmp_path: Path) -> Iterator[CoreFactory]:
    """Build (and by default start) hive-cores; every one still running at teardown
    gets SIGTERM and must exit 0."""
    counter = iter(range(1_000_000))

    def base() -> Path:
        d = tmp_path / f"core{next(counter)}"
        d.mkdir()
        return d

    make, made = _factory(base)
    yield make
    _teardown(made)


@pytest.fixture
def core(core_factory: CoreFactory) -> CoreProcess:
    """A running hive-core with alice, bob and carol."""
    return core_factory()


@pytest.fixture(scope="module")
def module_core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreProcess]:
    """One hive-core shared by a module's tests (for tests that must not change state)."""
    make, made = _factory(lambda: tmp_path_factory.mktemp("core"))
    yield make()
    _teardown(made)

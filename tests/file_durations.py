"""A pytest plugin (loaded by conftest.py): at the end of the session, the terminal
summary lists the slowest test files, each with the sum of its tests' setup, call and
teardown times and its number of tests, so a CI log shows where the time goes per file
(``--durations`` shows single tests; a module-scoped fixture's setup lands on the first
test of its module and its teardown on the last, so only a per-file sum is fair)."""

from __future__ import annotations

from collections import defaultdict

import pytest

SLOWEST_FILES = 25


class FileDurations:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.tests: dict[str, set[str]] = defaultdict(set)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        path = report.nodeid.split("::", 1)[0]
        self.seconds[path] += report.duration
        self.tests[path].add(report.nodeid)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.seconds:
            return
        total = sum(self.seconds.values())
        rows = sorted(self.seconds.items(), key=lambda kv: kv[1], reverse=True)[:SLOWEST_FILES]
        tr = terminalreporter
        tr.write_sep("=", f"slowest {len(rows)} test files (setup + call + teardown)")
        for path, secs in rows:
            n = len(self.tests[path])
            tr.write_line(f"{secs:9.2f}s {100 * secs / total:5.1f}% {n:5d} tests  {path}")
        tr.write_line(f"{total:9.2f}s in all, {len(self.seconds)} files")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(FileDurations(), "file-durations")

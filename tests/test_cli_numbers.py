"""Numbers on the command line: out of range, NaN or infinite gets click's one-line usage
error (exit 2) before any socket is opened, not a traceback from the client or the core
(red team round 15 noticed `hive agent recv --wait 1e20` and `nan` raising)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from hyperhive.cli.main import cli

CASES = [
    ["agent", "recv", "--wait", "nan"],
    ["agent", "recv", "--wait", "1e20"],
    ["agent", "recv", "--wait", "-1"],
    ["agent", "recv", "--wait", "inf"],
    ["agent", "remind", "--in", "nan", "x"],
    ["agent", "remind", "--in", "0", "x"],
    ["agent", "remind", "--in", "1e9", "x"],
    ["stop", "--host", "b", "--created-at", "nan", "bob"],
    ["restart", "--host", "b", "--created-at", "inf", "bob"],
]


@pytest.mark.parametrize("args", CASES, ids=[" ".join(a) for a in CASES])
def test_a_bad_number_is_a_one_line_usage_error(args: list[str], tmp_path: Path) -> None:
    # A socket path that exists nowhere: if the number got through, the command would fail
    # later, differently (can't connect), with exit 1.
    env = {"HIVE_SOCKET": str(tmp_path / "none.sock"), "HIVE_RUN_DIR": str(tmp_path)}
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("value", ["0", "2.5", "3600"])
def test_a_good_wait_gets_past_the_option(value: str, tmp_path: Path) -> None:
    env = {"HIVE_SOCKET": str(tmp_path / "none.sock"), "HIVE_RUN_DIR": str(tmp_path)}
    result = CliRunner().invoke(cli, ["agent", "recv", "--wait", value], env=env)
    assert result.exit_code == 1, result.output  # no hive there: the connect fails, in one line
    assert "Error:" not in result.output

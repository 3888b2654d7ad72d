"""bench/run.py --quick --json runs end to end and reports every figure.

Only that it runs: targets are for the benchmark's table, never asserted here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

EXPECTED = {
    ("floor", "raw JSON-lines RTT p50"),
    ("latency 1 pair", "send→recv p50"),
    ("latency 1 pair", "send→recv p99"),
    ("vs floor", "core p50 (1 pair) / raw p50"),
    ("latency 64 pairs, closed", "send→recv p50"),
    ("latency 64 pairs, closed", "send→recv p99"),
    ("throughput", "durable messages/s"),
}


def test_bench_quick_json() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    figures = report["figures"]
    assert figures
    seen = {(f["section"], f["name"]) for f in figures}
    assert seen >= EXPECTED, EXPECTED - seen
    for f in figures:
        assert isinstance(f["value"], int | float) and not isinstance(f["value"], bool), f
        assert math.isfinite(f["value"]), f
        # A measured quantity is positive; a difference of two (an overhead) may dip below 0 in noise.
        assert f["value"] > 0 or "overhead" in f["name"], f
        assert f["unit"], f
        assert f["pass"] in (True, False, None), f
        if f["target"] is not None:
            assert f["target"]["op"] in ("<=", ">=") and isinstance(f["pass"], bool), f
    assert report["meta"]["core_exit"] == 0, report["meta"]

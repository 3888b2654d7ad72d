"""bench/run.py --quick --json runs end to end and reports every figure.

Only that it runs: targets are for the benchmark's table, never asserted here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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
        # (A count whose target is none at all, like commits per empty ack, is 0 when it passes.)
        # CPU time is counted in clock ticks (10 ms): --quick's small transfers may take less.
        assert (
            f["value"] > 0
            or "overhead" in f["name"]
            or f["name"].startswith("added ")
            or (f["value"] == 0 and f["name"].startswith("commits per") and f["pass"] is True)
            or (f["value"] == 0 and "CPU" in f["name"] and f["target"] is None)
        ), f
        assert f["unit"], f
        assert f["pass"] in (True, False, None), f
        if f["target"] is not None:
            assert f["target"]["op"] in ("<=", ">=") and isinstance(f["pass"], bool), f
    assert report["meta"]["core_exit"] == 0, report["meta"]


def test_scale_plot_draws_a_png(tmp_path: Path) -> None:
    """bench/plot.py (`--plot`, the bench dependency group) writes the scale figure: the
    full sweep takes minutes of real cages, so only the drawing is checked here."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from plot import plot_scale  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(ROOT / "bench"))
    points = [SimpleNamespace(running=n, start_p50=100.0 + n, start_p99=200.0 + n, mem_mib=11.5)
              for n in (1, 10, 100)]
    out = tmp_path / "docs" / "scale.png"
    plot_scale(points, out, title="smoke")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, len(data)

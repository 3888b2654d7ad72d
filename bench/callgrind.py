"""Instructions hive-core spends a round or a message, counted by callgrind: what other
load on the machine does not change (the bench's CPU times do), though the batching it
measures does a little (±2% between runs of one tree).

    .venv/bin/python bench/callgrind.py [--section latency_64|throughput] [--n 50] [--out FILE]

The core runs under ``valgrind --tool=callgrind --instr-atstart=no``; after a warm-up (30
rounds of the 64 pairs) instrumentation is switched on (``callgrind_control -i on``) for
``--n`` rounds a pair of the 64-pair closed loop (``latency_64``) or ``--n`` sends each of
the throughput section's 8 senders, then off. Prints the total and the count a round (or a
message). Compare two trees by running each one's copy of this script, alternately.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench


class CallgrindCore(bench.Core):
    """bench.Core with the core under callgrind, instrumentation off until asked."""

    def __init__(self, base: Path, out: Path) -> None:
        super().__init__(base)
        self.out = out

    def start(self, timeout: float = 300.0) -> None:
        real = subprocess.Popen

        def popen(cmd: list[str], *a: Any, **k: Any) -> subprocess.Popen[bytes]:
            pre = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
            return real([*pre, f"--callgrind-out-file={self.out}", *cmd], *a, **k)

        subprocess.Popen = popen  # type: ignore[assignment,misc]
        try:
            super().start(timeout)
        finally:
            subprocess.Popen = real  # type: ignore[misc]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--section", choices=["latency_64", "throughput"], default="latency_64")
    ap.add_argument("--n", type=int, default=50, help="rounds a pair, or sends a sender")
    ap.add_argument("--out", type=Path, default=Path("callgrind.out.core"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hive-cg-") as tmp:
        core = CallgrindCore(Path(tmp), args.out.resolve())
        core.start()
        assert core.proc is not None
        ctx = bench.Context(quick=False, core=core, base=Path(tmp))
        pid = str(core.proc.pid)
        try:
            bench.run_client(bench._latency_many(ctx, 64, 0, 30))  # warm-up
            subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
            if args.section == "latency_64":
                bench.run_client(bench._latency_many(ctx, 64, 0, args.n))
                units, unit = 64 * args.n, "round"
            else:
                bench.run_client(bench._throughput(ctx, bench.TPUT_SENDERS, args.n, 16))
                units, unit = bench.TPUT_SENDERS * args.n, "message"
            subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
        finally:
            core.stop()
    total = 0
    for line in args.out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            total = int(line.split()[1])
    print(f"{total:,} instructions, {total / units:,.0f} a {unit} ({units:,} {unit}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Cold starts of two (or more) checkouts' cages, interleaved: one start of each in turn.

    .venv/bin/python bench/cold_pair.py [N] [/work/main,/work/wt-NAME,...]

Each checkout's own `hive up` (its `.venv/bin/hive`) runs one agent; then N rounds of a
stop and a cold start (start request → harness connected, as `bench_cage_start`) of each,
in turn, the order reversed every other round. On a machine other work loads, the load
moves by more between two runs of `bench/run.py --only cage_start` than a change does;
interleaved, the same load falls on every checkout (docs/performance.md, session 12).
Root only (real cages)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cages  # type: ignore[import-not-found]
from run import percentile  # type: ignore[import-not-found]

from hyperhive.client import priv_call
from hyperhive.wire.priv import CageStatus


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 40
    trees = argv[1].split(",") if len(argv) > 1 else ["/work/main", str(cages.ROOT)]
    hives: dict[str, cages.Hive] = {}
    try:
        for tree in trees:
            cages.HIVE = f"{tree}/.venv/bin/hive"  # read by Hive.start
            cages.PORT = cages._free_port()
            hive = cages.Hive({"solo": {"command": ["true"]}})
            hives[tree] = hive
            hive.start()
            hive.wait_running({"solo"})
        ms: dict[str, list[float]] = {tree: [] for tree in trees}
        for i in range(n):
            for tree in trees if i % 2 == 0 else trees[::-1]:
                hive = hives[tree]
                hive.call("stop", scope={"agent_names": ["solo"]})
                ms[tree].append(cages._until_running(hive, "solo") * 1000)
        time.sleep(2)  # idle, as bench_cage_start
        for tree in trees:
            hive = hives[tree]
            status = priv_call(str(hive.run_dir / "priv.sock"), CageStatus(names=["solo"]))
            mib = status["cages"]["solo"].get("memory_bytes", 0) / 2**20
            print(
                f"{tree}: cold start p50 {statistics.median(ms[tree]):.1f} ms, "
                f"p99 {percentile(ms[tree], 99):.1f} ms, idle {mib:.2f} MiB ({n} starts)"
            )
    finally:
        for hive in hives.values():
            hive.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

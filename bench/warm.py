"""A warm core: the 64-pair closed loop (bench/run.py's ``latency_64``) run several times
in a row on one hive-core, with what might grow between runs printed after each.

    .venv/bin/python bench/warm.py [--runs 8] [--rounds 200] [--checkpoint] [--prune]

Per run: the core's CPU per round (user+system, /proc), its RSS, the Python heap's
allocated blocks, every container reachable from the Hive object (three attributes deep)
whose size changed since the previous run, the object types whose count grew, the WAL's
size, the messages table's rows and the depth and page count of its B-trees (dbstat).

The core runs under a small wrapper that answers SIGUSR2 by writing those sizes to a JSON
file (its own CPU for that is taken out of the next run's figure: the dump runs between
two CPU readings). ``--checkpoint`` runs ``PRAGMA wal_checkpoint(TRUNCATE)`` between
runs, ``--prune`` deletes the acked messages (what ``history_keep`` would, sooner), to see
whether either brings the figure back.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench

# Runs inside hive-core: SIGUSR2 writes the sizes of what the core holds to DUMP.
WRAPPER = r"""
import collections, gc, json, os, signal, sys

DUMP = os.environ["HIVE_WARM_DUMP"]

def _len(x):
    try:
        return len(x)
    except Exception:
        return None

def sizes(root, depth=3):
    out, seen, todo = {}, set(), [("hive", root, 0)]
    while todo:
        path, obj, d = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (dict, list, set, frozenset, tuple, collections.deque)):
            out[path] = len(obj)
            if isinstance(obj, dict) and d < depth:
                # a dict of per-agent things: sum the sizes of its values' containers
                inner = 0
                for v in list(obj.values())[:100000]:
                    n = _len(v) if isinstance(v, (dict, list, set, collections.deque)) else None
                    inner += n or 0
                if inner:
                    out[path + "[*]"] = inner
            continue
        if d >= depth or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            continue
        attrs = getattr(obj, "__dict__", None)
        items = list(attrs.items()) if isinstance(attrs, dict) else []
        for slot in getattr(type(obj), "__slots__", ()):
            if hasattr(obj, slot):
                items.append((slot, getattr(obj, slot)))
        for k, v in items:
            todo.append((f"{path}.{k}", v, d + 1))
    return out

def dump(signum, frame):
    hives = HIVES
    types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    data = {
        "hive": sizes(hives[0]) if hives else {},
        "types": dict(types.most_common(400)),
        "blocks": sys.getallocatedblocks(),
        "gc_objects": len(gc.get_objects()),
        "tasks": None,
    }
    try:
        import asyncio
        tasks = asyncio.all_tasks(asyncio.get_event_loop())
        data["tasks"] = len(tasks)
        data["task_kinds"] = dict(collections.Counter(
            getattr(t.get_coro(), "__qualname__", repr(t.get_coro())) for t in tasks))
    except Exception:
        pass
    tmp = DUMP + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, DUMP)

signal.signal(signal.SIGUSR2, dump)
# The Hive, caught as it is made (gc.get_objects() misses what the core froze at start).
from hyperhive.core.hive import Hive
HIVES = []
_init = Hive.__init__
def _catch(self, *a, **kw):
    HIVES.append(self)
    _init(self, *a, **kw)
Hive.__init__ = _catch
from hyperhive.core.__main__ import main
sys.argv = ["hive-core", *sys.argv[1:]]
main()
"""


class WarmCore(bench.Core):
    """bench/run.py's Core, started under WRAPPER (same config, same arguments)."""

    def __init__(self, base: Path, dump: Path) -> None:
        super().__init__(base)
        self.dump = dump

    def start(self, timeout: float = 30.0) -> None:
        real_popen = subprocess.Popen

        def popen(cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
            args = cmd[cmd.index("--config") :]
            kw["env"] = {**kw["env"], "HIVE_WARM_DUMP": str(self.dump)}
            return real_popen([sys.executable, "-c", WRAPPER, *args], **kw)

        subprocess.Popen = popen  # type: ignore[assignment,misc]
        try:
            super().start(timeout)
        finally:
            subprocess.Popen = real_popen  # type: ignore[misc]

    def sizes(self) -> dict[str, Any]:
        assert self.proc is not None
        self.dump.unlink(missing_ok=True)
        self.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not self.dump.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the core wrote no dump")
            time.sleep(0.05)
        return json.loads(self.dump.read_text())


def rss_kib(pid: int) -> int:
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        if ln.startswith("VmRSS:"):
            return int(ln.split()[1])
    return 0


def io_counts(pid: int) -> dict[str, int]:
    """The core's read/write system calls and bytes so far (/proc/PID/io)."""
    out = {}
    for ln in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, v = ln.split(":")
        out[k] = int(v)
    return out


def db_figures(db: Path) -> dict[str, Any]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        unacked = conn.execute("SELECT count(*) FROM messages WHERE acked_at IS NULL").fetchone()[0]
        trees = {
            name: (depth, pages)
            for name, depth, pages in conn.execute(
                "SELECT name, max(length(path) - length(replace(path, '/', ''))), count(*)"
                " FROM dbstat WHERE name LIKE '%messages%' OR name = 'agent_usage'"
                " GROUP BY name"
            )
        }
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    finally:
        conn.close()
    wal = Path(str(db) + "-wal")
    return {
        "rows": rows,
        "unacked": unacked,
        "trees": trees,
        "pages": pages,
        "wal_kib": wal.stat().st_size // 1024 if wal.exists() else 0,
    }


def wal_frames(db: Path) -> dict[str, Any]:
    """What the WAL holds now: its commits, and its frames by the B-tree their page is in
    (run with --checkpoint, the WAL is one run's: TRUNCATE empties it between runs)."""
    wal = Path(str(db) + "-wal")
    data = wal.read_bytes() if wal.exists() else b""
    if len(data) < 32:
        return {"commits": 0, "frames": 0, "by_tree": {}}
    page_size = int.from_bytes(data[8:12], "big")
    salt = data[16:24]
    pages: list[int] = []
    commits = 0
    off = 32
    while off + 24 + page_size <= len(data):
        if data[off + 8 : off + 16] != salt:  # a frame of an earlier WAL generation
            break
        pages.append(int.from_bytes(data[off : off + 4], "big"))
        commits += int.from_bytes(data[off + 4 : off + 8], "big") != 0
        off += 24 + page_size
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        owner = dict(conn.execute("SELECT pageno, name FROM dbstat"))
    finally:
        conn.close()
    by_tree: dict[str, int] = {}
    for p in pages:
        name = owner.get(p, "free/other")
        by_tree[name] = by_tree.get(name, 0) + 1
    per_commit = {k: round(v / max(1, commits), 1) for k, v in sorted(by_tree.items())}
    return {"commits": commits, "frames": len(pages), "by_tree": per_commit}


def maintenance(db: Path, checkpoint: bool, prune: bool) -> None:
    conn = sqlite3.connect(db, timeout=10, isolation_level=None)  # each its own transaction
    try:
        if prune:
            conn.execute("DELETE FROM messages WHERE acked_at IS NOT NULL")
        if checkpoint:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=200, help="measured rounds a pair a run")
    ap.add_argument("--warm", type=int, default=10, help="warm-up rounds a pair a run")
    ap.add_argument("--checkpoint", action="store_true", help="TRUNCATE checkpoint between runs")
    ap.add_argument("--prune", action="store_true", help="delete acked messages between runs")
    ap.add_argument(
        "--gap", type=float, default=1.5, help="seconds between two runs (the recv wait is 5)"
    )
    ap.add_argument("--json", type=Path, help="write every run's figures here")
    args = ap.parse_args()

    pairs = bench.MAX_PAIRS
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hive-warm-") as tmp:
        base = Path(tmp)
        core = WarmCore(base, base / "sizes.json")
        core.start()
        assert core.proc is not None
        pid = core.proc.pid
        db = core.state_dir / "hive.db"
        if not db.exists():
            db = next(core.state_dir.rglob("*.db"))
        ctx = bench.Context(quick=False, core=core, base=base)
        prev = core.sizes()
        try:
            for n in range(1, args.runs + 1):
                io0 = io_counts(pid)
                cpu0, mine0 = bench._cpu_seconds(pid), time.process_time()
                samples = bench.run_client(bench._latency_many(ctx, pairs, args.warm, args.rounds))
                cpu = bench._cpu_seconds(pid) - cpu0
                mine = time.process_time() - mine0
                io1 = io_counts(pid)
                rounds = pairs * (args.warm + args.rounds)
                time.sleep(args.gap)  # the core's checkpoint thread has had its turn
                figs = db_figures(db)
                frames = wal_frames(db)
                figs["wal"] = frames
                now = core.sizes()
                grew = {
                    k: f"{prev['hive'].get(k, 0)}→{v}"
                    for k, v in now["hive"].items()
                    if v != prev["hive"].get(k, 0)
                }
                types = {
                    k: v - prev["types"].get(k, 0)
                    for k, v in now["types"].items()
                    if v - prev["types"].get(k, 0) >= 50
                }
                rec = {
                    "run": n,
                    "core_us_per_round": cpu * 1e6 / rounds,
                    "client_us_per_round": mine * 1e6 / rounds,
                    "p50_ms": bench.percentile(samples, 50) * 1e3,
                    "rss_kib": rss_kib(pid),
                    "blocks": now["blocks"],
                    "gc_objects": now["gc_objects"],
                    "tasks": now["tasks"],
                    **{
                        f"{k}_per_round": (io1[k] - io0[k]) / rounds
                        for k in ("rchar", "wchar", "syscr", "syscw")
                    },
                    **figs,
                    "changed": grew,
                    "types_grew": types,
                }
                results.append(rec)
                print(
                    f"run {n}: core {rec['core_us_per_round']:.1f} µs/round"
                    f" (client {rec['client_us_per_round']:.1f}), p50 {rec['p50_ms']:.2f} ms,"
                    f" RSS {rec['rss_kib']} KiB, blocks {rec['blocks']},"
                    f" gc objects {rec['gc_objects']}, tasks {rec['tasks']},"
                    f" rows {figs['rows']} (unacked {figs['unacked']}),"
                    f" WAL {figs['wal_kib']} KiB, pages {figs['pages']}",
                    flush=True,
                )
                print(
                    "    a round: "
                    + ", ".join(
                        f"{k} {rec[k + '_per_round']:.2f}"
                        for k in ("syscr", "syscw", "rchar", "wchar")
                    ),
                    flush=True,
                )
                print(
                    f"    WAL: {frames['commits']} commits, {frames['frames']} frames;"
                    f" frames a commit by B-tree {frames['by_tree']}",
                    flush=True,
                )
                print(f"    trees (depth, pages): {figs['trees']}", flush=True)
                if grew:
                    print(f"    changed: {grew}", flush=True)
                kinds = {
                    k: f"{prev.get('task_kinds', {}).get(k, 0)}→{v}"
                    for k, v in (now.get("task_kinds") or {}).items()
                    if v != prev.get("task_kinds", {}).get(k, 0)
                }
                rec["task_kinds"] = now.get("task_kinds")
                if kinds:
                    print(f"    tasks: {kinds}", flush=True)
                print(f"    hive containers: {len(now['hive'])}", flush=True)
                if types:
                    print(f"    types grew: {types}", flush=True)
                prev = now
                if args.checkpoint or args.prune:
                    maintenance(db, args.checkpoint, args.prune)
        finally:
            core.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

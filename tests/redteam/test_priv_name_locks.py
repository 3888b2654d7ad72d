"""Found by the red team of issue 12, fixed (``priv/namelocks.py``): hive-priv (root)
kept one ``threading.Lock`` per agent name it was ever asked about, for good (``Cages.lock``: ``self._locks.setdefault(name, Lock())``, never
removed). Every ``locks_name`` verb in CORE_TABLE (prepare, start, stop, destroy) takes
any valid name, existing or not, so a compromised hive-core grows root's memory
without bound: ``stop {name: <fresh name>}`` costs it one line and a few microseconds
and leaves a name, a Lock and a dict slot in hive-priv forever. security.md promises
that hive-priv bounds what the core can make it keep (ids.json: 10,000 agents); this
table has no bound. Fix: drop a name's lock when nobody holds or waits on it (a
refcounted entry), or take the lock only for a name hive-priv knows (``ids.get``) and
refuse others before locking."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from hive_fixture import HIVE, HiveProcess

from .conftest import unchanged

pytestmark = pytest.mark.attack("privsep.core-misuse", ref="OpenSSH monitor.c; issue 11 re-attack (ids.json growth)")

NAMES = 40_000  # a leak of ~250 bytes a name would be ~10 MiB
FLOOD = r"""
import json, os, socket, sys, threading, time
path, n, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
bad = []
def worker(w):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    f = s.makefile("rb")
    per = n // workers
    def send():
        for i in range(per):
            s.sendall(b'{"cmd":"stop","name":"zq%d-%d","timeout":0}\n' % (w, i))
    t = threading.Thread(target=send); t.start()
    for i in range(per):
        r = json.loads(f.readline())
        if not r.get("ok"):
            bad.append(r)
    t.join(); s.close()
t0 = time.monotonic()
ts = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps({"uid": os.getuid(), "seconds": time.monotonic() - t0, "bad": bad[:3], "nbad": len(bad)}))
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_name_locks_do_not_grow_root_memory_without_bound(rt: HiveProcess) -> None:
    pid = rt.priv_pid()
    assert pid is not None
    before = rss_kib(pid)
    with unchanged(rt):
        proc = subprocess.run(
            [str(HIVE.parent / "python"), "-c", FLOOD, str(rt.priv_sock), str(NAMES), "4"],
            capture_output=True, text=True, timeout=600, **rt.as_core(),
        )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["uid"] == rt.core_ids[0]
    assert out["nbad"] == 0, out  # every one of them accepted: stop of a name nobody has
    time.sleep(0.5)
    grown = rss_kib(pid) - before
    print(f"{NAMES} names in {out['seconds']:.1f} s: hive-priv grew {grown} KiB")
    # A name hive-priv never had must not cost root memory that stays: allow noise only.
    assert grown < 4 * 1024, f"hive-priv (root) kept {grown} KiB for {NAMES} names it never had"
    assert os.path.exists(f"/proc/{pid}")

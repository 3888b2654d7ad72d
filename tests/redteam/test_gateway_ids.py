"""Each hive's gateway has ids of its own (session 17; cli/gateway_users.py).

Before, every hive's nginx workers ran as the one user ``hive-gateway``, and
``core.sock``, ``ui/NAME`` and ``web.sock`` were that group's: a compromised nginx worker
of one hive (the process that parses what the network sends) could connect to every
other hive's core.sock and to its agents' pages (docs/security.md, Known limits). Now
each hive's workers run as the second id of its core's registry block, and those
sockets are that group's alone. Two real hives; hive B's workers' ids are read from its
live processes, and a process with exactly those credentials tries hive A's sockets and
its own (the control: its own must connect).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hive_fixture import HiveFactory, HiveProcess, as_user, children

PROBE = r"""
import errno, json, socket, sys
out = {}
for label, path in json.loads(sys.argv[1]).items():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        out[label] = "connected"
    except OSError as e:
        out[label] = errno.errorcode.get(e.errno, str(e))
    finally:
        s.close()
print(json.dumps(out))
"""


def _worker_ids(h: HiveProcess) -> set[tuple[int, int, str]]:
    assert h.proc is not None
    masters = [p for p in children(h.proc.pid) if Path(f"/proc/{p}/comm").read_text() == "nginx\n"]
    ids = set()
    for w in (w for m in masters for w in children(m)):
        status = Path(f"/proc/{w}/status").read_text()
        uid = re.search(r"^Uid:\s+(\d+)", status, re.M)
        gid = re.search(r"^Gid:\s+(\d+)", status, re.M)
        groups = re.search(r"^Groups:(.*)$", status, re.M)
        assert uid and gid and groups
        ids.add((int(uid[1]), int(gid[1]), groups[1].strip()))
    return ids


@pytest.mark.attack(
    "privsep.core-misuse",
    ref="docs/security.md Known limits (until session 17): hives on one host shared the gateway's user",
)
def test_one_hives_gateway_workers_reach_no_other_hives_core_or_pages(
    hive_factory: HiveFactory,
) -> None:
    cmd = {"runtime": "command", "command": ["sleep", "3600"]}
    a = hive_factory({"gwa": cmd})
    b = hive_factory({"gwb": cmd})
    a.wait_running()
    b.wait_running()
    (a_ids,), (b_ids,) = _worker_ids(a), _worker_ids(b)
    targets = {
        "a core.sock": str(a.run_dir / "core.sock"),
        "a web.sock": str(a.run_dir / "ui" / "gwa" / "web.sock"),
        "a host.sock": str(a.run_dir / "host.sock"),
        "a agent.sock": str(a.run_dir / "agents" / "gwa" / "agent.sock"),
        "b core.sock": str(b.run_dir / "core.sock"),
        "b web.sock": str(b.run_dir / "ui" / "gwb" / "web.sock"),
    }
    proc = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, json.dumps(targets)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        **as_user(b_ids[:2]),
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    print(got)
    assert got["b core.sock"] == got["b web.sock"] == "connected", got  # its own: served
    assert {k: v for k, v in got.items() if k.startswith("a ")} == {
        "a core.sock": "EACCES",
        "a web.sock": "EACCES",
        "a host.sock": "EACCES",
        "a agent.sock": "EACCES",
    }, got
    # the second id of each core's registry block
    a_core, b_core = a.core_ids, b.core_ids
    assert a_ids[:2] == (a_core[0] + 1, a_core[1] + 1), (a_ids, a_core)
    assert b_ids[:2] == (b_core[0] + 1, b_core[1] + 1), (b_ids, b_core)
    assert a_ids != b_ids

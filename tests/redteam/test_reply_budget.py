"""One ``recv`` pinned a gigabyte in the core (issue 13 item 3): 500 reminders of 128 Ki
control characters (786 KB each as JSON, ``\\u0001`` six bytes a character), then
``recv max=1000`` without reading: hive-core built the 385 MB reply in memory, grew from
133 MiB to 1.3 GiB and held 800 MiB in the connection's write buffer while it stayed
open. The operator's ``inbox`` had the same shape.

Now every listing reply has a byte budget (``[limits] reply_bytes``, 4 MiB): the core
reads rows one at a time and stops at the budget; the rest comes in the next batch
(``"more": true``), none dropped, split or reordered. The hostile agent here stores what
its (raised) limits allow, from inside its cage, and:

- holds two connections with ``recv max=1000`` unread: the core's RSS grows by at most
  a few replies' worth (bound: 100 MiB; it was several times the whole inbox);
- then reads everything in batches: each reply line within the budget, every message
  once, in order, intact;
- sends the operator max-size messages: ``inbox`` on host.sock, and ``hive inbox``,
  come in batches within the budget, every message once, in order.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hive_fixture import HIVE, HiveProcess, running_hive
from hyperhive.client import Client

from .conftest import cage_run, core_rss_kib

pytestmark = pytest.mark.attack("core.reply-memory", ref="issue 13 item 3")

AGENT = "rtbulk"
AGENTS: dict[str, dict[str, Any]] = {AGENT: {"runtime": "command", "command": ["true"]}}
LIMITS = {"messages_per_second": 100_000, "message_burst": 100_000, "agent_store_mib": 256}
BUDGET = 4 << 20  # the default [limits] reply_bytes
CHARS = 128 * 1024  # control characters a body: 786 KB as JSON, a request line fits
N = 120  # reminders: 94 MB as one reply
# The core's RSS growth while two such recvs are held unread: about 15 MiB now (two replies
# of 4 MiB and the encoding of one); it was several times the reply, over 300 MiB here.
MAX_GROWTH_MIB = 100


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(AGENTS, sections={"limits": LIMITS}))


def db_count(hive: HiveProcess, sql: str) -> int:
    db = sqlite3.connect(f"file:{hive.state_dir / 'hive.db'}?mode=ro", uri=True, timeout=30)
    try:
        return int(db.execute(sql).fetchone()[0])
    finally:
        db.close()


SET_REMINDERS = """
c = Conn(timeout=120)
text = "\\x01" * P["chars"]
ids = []
for i in range(P["n"]):
    reply = c.call({"cmd": "remind", "in_seconds": 0.5, "text": text})
    if not reply.get("ok"):
        result(error=reply, after=i)
        raise SystemExit(0)
    ids.append(reply["id"])
result(ids=ids)
"""

HOLD_THEN_READ = """
held = []
for _ in range(2):
    c = Conn(timeout=120)
    c.send(json.dumps({"cmd": "recv", "max": 1000}).encode() + b"\\n")
    held.append(c)  # never read while held: the reply stays in the core's write buffer
time.sleep(P["hold"])
for c in held:
    c.close()  # what they were given goes back to the inbox
time.sleep(0.5)

c = Conn(timeout=120)
text = "\\x01" * P["chars"]
lines, ids, refs, bad, mores = [], [], [], 0, []
while True:
    c.send(json.dumps({"cmd": "recv", "max": 1000}).encode() + b"\\n")
    raw = c.f.readline()
    reply = json.loads(raw)
    if not reply.get("ok"):
        result(error=reply)
        raise SystemExit(0)
    if not reply["messages"]:
        break
    lines.append(len(raw) - 1)
    mores.append(bool(reply.get("more")))
    for m in reply["messages"]:
        ids.append(m["id"])
        refs.append(m.get("ref"))
        bad += m["body"] != text
result(lines=lines, ids=ids, refs=refs, bad=bad, mores=mores)
"""


def test_held_recvs_do_not_pin_the_core_and_every_batch_fits(hive: HiveProcess) -> None:
    # Paused: the reminders stay queued as messages (no turns take them).
    assert hive.host_call("set_paused", name=AGENT, paused=True)["ok"]
    res = cage_run(hive, AGENT, SET_REMINDERS, n=N, chars=CHARS, timeout=240)
    assert "error" not in res, res
    reminder_ids = res["ids"]
    sql = f"SELECT COUNT(*) FROM messages WHERE recipient='{AGENT}' AND kind='reminder'"
    deadline = time.monotonic() + 60
    while db_count(hive, sql) < N:
        assert time.monotonic() < deadline, "the reminders were not delivered"
        time.sleep(0.2)

    time.sleep(0.5)
    before = core_rss_kib(hive)
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], core_rss_kib(hive))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        res = cage_run(hive, AGENT, HOLD_THEN_READ, hold=4, chars=CHARS, timeout=240)
    finally:
        stop.set()
        sampler.join(10)
    assert "error" not in res, res
    growth = (peak[0] - before) / 1024
    assert growth < MAX_GROWTH_MIB, f"hive-core's RSS grew by {growth:.0f} MiB"

    # Every batch within the budget; every reminder once, in order, intact.
    assert len(res["lines"]) > 1 and max(res["lines"]) <= BUDGET, res["lines"]
    assert res["mores"] == [True] * (len(res["lines"]) - 1) + [False]
    assert res["ids"] == sorted(res["ids"]) and len(set(res["ids"])) == N
    assert sorted(res["refs"]) == sorted(reminder_ids)
    assert res["bad"] == 0


SEND_TO_OPERATOR = """
c = Conn(timeout=120)
text = "\\x01" * P["chars"]
ids = []
for i in range(P["n"]):
    reply = c.call({"cmd": "send", "to": "operator", "body": text})
    if not reply.get("ok"):
        result(error=reply, after=i)
        raise SystemExit(0)
    ids.append(reply["id"])
result(ids=ids)
"""


def test_the_operators_inbox_comes_in_batches(hive: HiveProcess) -> None:
    res = cage_run(hive, AGENT, SEND_TO_OPERATOR, n=24, chars=CHARS, timeout=120)
    assert "error" not in res, res
    sent = res["ids"]

    # host.sock, as a client pages: after = the last id it got, while "more".
    after, got, lines = 0, [], []
    with Client(hive.host_sock, timeout=60) as c:
        while True:
            c.send_raw(json.dumps({"cmd": "inbox", "after": after}).encode() + b"\n")
            raw = c._file.readline()
            reply = json.loads(raw)
            assert reply["ok"], reply
            lines.append(len(raw) - 1)
            got += [m["id"] for m in reply["messages"] if m.get("from") == AGENT]
            if not reply.get("more"):
                break
            after = reply["messages"][-1]["id"]
    assert len(lines) > 1 and max(lines) <= BUDGET, lines
    assert got == sent

    # The CLI pages until done and prints one reply.
    out = subprocess.run(
        [str(HIVE), "--run-dir", str(hive.run_dir), "inbox", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert [m["id"] for m in reply["messages"] if m.get("from") == AGENT] == sent
    assert "more" not in reply

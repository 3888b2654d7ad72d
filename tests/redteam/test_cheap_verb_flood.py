"""Red team: a cage floods the core with requests that change nothing (issue 17).

An agent may write requests as fast as its socket takes them. The cheap ones change
nothing: an ack of an id that is not its own or is acked already, a ``recv`` of an empty
inbox, ``whoami``, ``peers``, an ``answer`` to no question, ``set_status`` of the text it
has. Before, each such ack was queued to the group commit and paid for an empty commit
(one cage made ~10,000 a second), a refused answer was a write transaction rolled back,
and the requests that wait on nothing let one connection's buffer of them hold the event
loop (~40 ms for 8,700 acks).

From a real cage, on four connections, batches of every such request pipelined for five
seconds; meanwhile, from the host, another pair of agents exchange messages one at a
time. Asserted: every flood reply is the one it must be (acked 0, the refusal, the same
status time); the core's commit count (host.sock ``core_stats``) grew by the pair's
rounds and nothing for the flood's tens of thousands of requests; the pair's messages
all arrived, in order; the store holds what it held (the flooder's ack not written again,
the foreign message still unacked, its status time the same); and the core kept
answering others within MAX_CORE_LATENCY.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import assert_ok
from hive_fixture import HiveProcess, running_hive

from .conftest import cage_run, others_keep_working

pytestmark = pytest.mark.attack(
    "core.cheap-verb-flood", ref="issue 17: empty acks cost a group commit each, unpaced"
)

FLOOD, SENDER, RECEIVER = "cvflood", "cvsend", "cvrecv"
TRUE = {"runtime": "command", "command": ["true"]}
AGENTS = {
    FLOOD: dict(TRUE),
    SENDER: {**TRUE, "peers": [RECEIVER, FLOOD]},
    RECEIVER: {**TRUE, "peers": [SENDER]},
}
STATUS = "flooding"
GHOST = 10**12  # no message has this id
FLOOD_SECONDS = 5.0
MAX_ROUNDS = 300  # the pair's rounds, at most: within the default message burst (500)


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(AGENTS))


# Four connections, each writing a batch of every cheap request (pipelined) and reading
# its replies, until the time is up. A reply that is not the one expected stops the flood
# and is reported.
FLOOD_PROBE = """
import json, threading

own, foreign, ghost, status_at = P["own"], P["foreign"], P["ghost"], P["status_at"]
KINDS = [
    ({"cmd": "ack", "ids": [own]}, lambda r: r == {"version": 1, "ok": True, "acked": 0}),
    ({"cmd": "ack", "ids": [foreign]}, lambda r: r.get("error") == f"no message {foreign} in this inbox"),
    ({"cmd": "ack", "ids": [ghost]}, lambda r: r.get("error") == f"no message {ghost} in this inbox"),
    ({"cmd": "ack", "ids": [own, foreign]}, lambda r: r.get("error") == f"no message {foreign} in this inbox"),
    ({"cmd": "ack", "ids": []}, lambda r: r == {"version": 1, "ok": True, "acked": 0}),
    ({"cmd": "ack", "ids": [own, own]}, lambda r: r == {"version": 1, "ok": True, "acked": 0}),
    ({"cmd": "recv", "ack": [own]}, lambda r: r == {"version": 1, "ok": True, "messages": [], "acked": 0}),
    ({"cmd": "recv", "ack": [foreign]}, lambda r: r.get("error") == f"no message {foreign} in this inbox"),
    ({"cmd": "recv"}, lambda r: r == {"version": 1, "ok": True, "messages": []}),
    ({"cmd": "whoami"}, lambda r: r.get("ok") is True and r.get("name") == P["me"]),
    ({"cmd": "peers"}, lambda r: r.get("ok") is True),
    ({"cmd": "answer", "id": ghost, "answer": "x"},
     lambda r: r.get("error") == f"no question {ghost} addressed to {P['me']}"),
    ({"cmd": "set_status", "text": P["status"]},
     lambda r: r == {"version": 1, "ok": True, "status_set_at": status_at}),
]
BATCH = b"".join(json.dumps(req).encode() + b"\\n" for req, _ in KINDS) * 8
ACKS_PER_BATCH = 8 * sum(1 for req, _ in KINDS if req["cmd"] == "ack" or "ack" in req)
counts, acks, bad = [0] * 4, [0] * 4, []

def flood(k):
    c = Conn(timeout=60)
    end = time.monotonic() + P["seconds"]
    while time.monotonic() < end and not bad:
        c.send(BATCH)
        for _ in range(8):
            for req, good in KINDS:
                reply = c.line()
                if reply is None or not good(reply):
                    bad.append([req, reply])
                    return
        counts[k] += 8 * len(KINDS)
        acks[k] += ACKS_PER_BATCH
    c.close()

threads = [threading.Thread(target=flood, args=(k,)) for k in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
result(requests=sum(counts), acks=sum(acks), bad=bad[:3])
"""


def _row(hive: HiveProcess, sql: str, *args: Any) -> tuple[Any, ...]:
    db = sqlite3.connect(f"file:{hive.state_dir / 'hive.db'}?mode=ro", uri=True)
    try:
        row = db.execute(sql, args).fetchone()
    finally:
        db.close()
    assert row is not None, sql
    return tuple(row)


def _commits(hive: HiveProcess) -> int:
    return int(assert_ok(hive.host_call("core_stats"))["commits"])


def test_a_cage_flooding_requests_that_change_nothing_commits_nothing(hive: HiveProcess) -> None:
    for name in AGENTS:  # their harnesses take no turns: the inboxes are the test's
        assert_ok(hive.host_call("set_paused", name=name, paused=True))
    try:
        # The flooder's own message, acked; the sender's, unacked (not the flooder's).
        own = assert_ok(hive.agent_call(SENDER, "send", to=FLOOD, body="yours"))["id"]
        assert_ok(hive.agent_call(FLOOD, "ack", ids=[own]))
        foreign = assert_ok(hive.agent_call(RECEIVER, "send", to=SENDER, body="not yours"))["id"]
        status_at = assert_ok(hive.agent_call(FLOOD, "set_status", text=STATUS))["status_set_at"]
        acked_at = _row(hive, "SELECT acked_at FROM messages WHERE id=?", own)[0]
        set_at = _row(hive, "SELECT status_set_at FROM agents WHERE name=?", FLOOD)[0]
        assert acked_at is not None

        before = _commits(hive)
        flood: dict[str, Any] = {}

        def run_flood() -> None:
            flood.update(cage_run(
                hive, FLOOD, FLOOD_PROBE, timeout=120, own=own, foreign=foreign, ghost=GHOST,
                status_at=status_at, status=STATUS, me=FLOOD, seconds=FLOOD_SECONDS,
            ))

        flooder = threading.Thread(target=run_flood)
        received: list[dict[str, Any]] = []
        sent: list[int] = []
        with others_keep_working(hive, other=SENDER):
            flooder.start()
            time.sleep(1.0)  # the cage is up and flooding
            with hive.agent(SENDER) as s, hive.agent(RECEIVER) as r:
                # One message a round, the receiver acking the last with its next recv,
                # for as long as the flood lasts.
                page: list[dict[str, Any]] = []
                while flooder.is_alive() and len(sent) < MAX_ROUNDS:
                    sent.append(assert_ok(s.call("send", to=RECEIVER, body=f"m{len(sent)}"))["id"])
                    page = assert_ok(r.call("recv", wait=10, ack=[m["id"] for m in page]))["messages"]
                    received += page
                assert_ok(r.call("ack", ids=[m["id"] for m in page]))
            flooder.join(150)
        after = _commits(hive)
    finally:
        for name in AGENTS:
            assert_ok(hive.host_call("set_paused", name=name, paused=False))

    assert not flooder.is_alive()
    assert flood.get("bad") == [], flood.get("bad")
    rounds = len(sent)
    # The pair's rounds commit (a send, an ack each: at most two) and one ack after them.
    pair_commits = 2 * rounds + 1
    # Before, each empty ack was a commit of its own or shared by the few of its turn.
    assert flood["acks"] >= 20 * pair_commits, (flood, rounds)
    assert rounds >= 20, "the pair hardly exchanged anything while the flood ran"
    assert after - before <= pair_commits, (
        f"{after - before} commits: the pair's {pair_commits} at most, and the flood's "
        f"{flood['acks']} acks that changed nothing"
    )
    # Every message of the pair's, in order, once.
    assert [m["id"] for m in received] == sent
    assert [m["body"] for m in received] == [f"m{i}" for i in range(rounds)]
    # Nothing the flood touched was written: its ack not again, the sender's message not.
    assert _row(hive, "SELECT acked_at FROM messages WHERE id=?", own)[0] == acked_at
    assert _row(hive, "SELECT acked_at FROM messages WHERE id=?", foreign)[0] is None
    assert _row(hive, "SELECT status_set_at FROM agents WHERE name=?", FLOOD)[0] == set_at
    assert _row(hive, "SELECT COUNT(*) FROM messages WHERE recipient=? AND acked_at IS NULL", RECEIVER) == (0,)

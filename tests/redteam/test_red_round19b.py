"""Red team round 19b: session 12's changes attacked: agent_usage counted in Python in
the write's transaction (``Tx.held``, migration 9), exec holding the agent's name lock in
hive-priv until its child is in the cage with stop's SIGKILL rounds repeated while the
cgroup is not empty, and a cage's limit hits sent to the operator's webhooks.

See docs/security.md's rounds table (red team round 19b).
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from typing import Any

import pytest

from helpers import CoreProcess, assert_ok
from hyperhive.core.limit_hits import NOTE_INTERVAL, LimitWatch, describe
from hyperhive.core.notify import Notifier

# -- agent_usage against the rows: a hostile agent's every byte on its socket ------------

_SUM = """SELECT who, COUNT(*), SUM(b), SUM(op), SUM(op * b) FROM (
    SELECT sender AS who, length(CAST(body AS BLOB)) + coalesce(length(CAST(options AS BLOB)), 0) AS b,
        recipient = 'operator' AS op FROM messages WHERE acked_at IS NULL
    UNION ALL SELECT asker, length(CAST(question AS BLOB)) + coalesce(length(CAST(options AS BLOB)), 0), 0
        FROM questions WHERE answer IS NULL AND cancelled = 0
    UNION ALL SELECT agent, length(CAST(kind AS BLOB)) + length(CAST(description AS BLOB))
        + length(CAST(payload AS BLOB)), 0 FROM approvals WHERE status = 'pending'
    UNION ALL SELECT agent, length(CAST(text AS BLOB)), 0 FROM reminders WHERE delivered_at IS NULL
) GROUP BY who"""


def _drift(core: CoreProcess) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what agent_usage says, what a SUM over the rows says), agents holding anything."""
    db = sqlite3.connect(f"file:{core.state_dir / 'hive.db'}?mode=ro", uri=True, timeout=10)
    try:
        counted = {r[0]: tuple(r[1:]) for r in db.execute(
            "SELECT agent, pending, bytes, op_pending, op_bytes FROM agent_usage") if any(r[1:])}
        summed = {r[0]: tuple(r[1:]) for r in db.execute(_SUM)}
    finally:
        db.close()
    return counted, summed


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _raw(core: CoreProcess, name: str, data: bytes, replies: int) -> list[dict[str, Any]]:
    """``data`` in one write on a fresh connection; the first ``replies`` replies."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(str(core.agent_sock(name)))
    s.sendall(data)
    buf = b""
    while buf.count(b"\n") < replies:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        buf += chunk
    s.close()
    return [json.loads(x) for x in buf.split(b"\n")[:replies]]


def _inbox(core: CoreProcess, name: str) -> list[int]:
    with core.agent(name) as c:
        return [m["id"] for m in assert_ok(c.call("recv", wait=0, max=1000))["messages"]]


@pytest.mark.attack("budget.store",
                    ref="session 12 Tx.held: every pipelined path bob and alice can take, then kill -9")
def test_no_pipelined_mix_of_sends_and_acks_moves_a_count_off_its_rows(core_factory: Any) -> None:
    """bob (pending quota 20) and alice pipeline, each in one write so one group commit
    takes many: sends to each other and to the operator (making room), acks of the other's
    ids, of ids acked already, twice in one batch, of an id that is not there (the batch
    refused whole), recv's ack racing sends, questions, approvals, reminders; then 300
    pipelined sends with a kill -9 in their midst and a restart. After each step the
    counts equal a SUM over the rows, and bob is still refused at exactly its quota."""
    core = core_factory(sections={"limits": {"agent_pending_max": 20}})
    steps: list[str] = []

    def same(step: str) -> None:
        counted, summed = _drift(core)
        steps.append(step)
        assert counted == summed, (step, counted, summed)

    # Sends, and acks racing them in one write.
    out = _raw(core, "bob", b"".join(_line({"cmd": "send", "to": "alice", "body": f"é{j}"})
                                     for j in range(8)), 8)
    ids = [r["id"] for r in out]
    same("bob's 8 pipelined sends")
    mix = [_line({"cmd": "ack", "ids": [ids[0], ids[0]]}),  # twice in one batch
           _line({"cmd": "ack", "ids": [ids[0]]}),  # acked already
           _line({"cmd": "ack", "ids": [ids[1], 10 ** 9]}),  # one not there: refused whole
           _line({"cmd": "ack", "ids": [ids[2], ids[3], ids[2]]}),
           _line({"cmd": "send", "to": "bob", "body": "from alice"}),
           _line({"cmd": "recv", "wait": 0, "max": 1, "ack": [ids[4]]}),
           _line({"cmd": "ack", "ids": [ids[5]]})]
    out = _raw(core, "alice", b"".join(mix), len(mix))
    assert out[2].get("ok") is False, out[2]
    same("alice's acks (dup, again, missing, racing)")
    # bob acks ids that are not its own (alice's inbox), its own, and sends, all in one write.
    mine = _inbox(core, "bob")
    mix = [_line({"cmd": "ack", "ids": [ids[6]]}), _line({"cmd": "ack", "ids": [ids[6], ids[7]]})]
    mix += [_line({"cmd": "send", "to": "alice", "body": "x" * 100})] * 3
    mix += [_line({"cmd": "ack", "ids": mine}), _line({"cmd": "ack", "ids": mine})]
    out = _raw(core, "bob", b"".join(mix), len(mix))
    assert out[0].get("ok") is False and out[1].get("ok") is False, out[:2]
    same("bob's acks of alice's ids, racing its sends")
    # The operator's side: 40 sends to the operator (room made past 20), a question, an
    # approval and a reminder, pipelined.
    mix = [_line({"cmd": "send", "to": "operator", "body": f"op{j}" * 50}) for j in range(40)]
    mix += [_line({"cmd": "ask", "to": "operator", "question": "which?", "options": ["a", "b"]}),
            _line({"cmd": "request_approval", "kind": "note", "description": "d", "payload": {"k": 1}}),
            _line({"cmd": "remind", "in_seconds": 3600, "text": "later"})]
    out = _raw(core, "bob", b"".join(mix), len(mix))
    same("bob to the operator, a question, an approval, a reminder")
    # kill -9 in the midst of 300 pipelined sends (to alice, to the operator), then a restart.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(core.agent_sock("carol")))
    s.sendall(b"".join(_line({"cmd": "send", "to": "operator", "body": "c" * (j % 97)})
                       for j in range(300)))
    time.sleep(0.01)
    core.kill9()
    s.close()
    same("kill -9 mid-commit (before the restart)")
    core.start()
    same("after the restart")
    # The quota still holds at exactly 20 rows for alice (to bob), whatever happened above.
    held = _drift(core)[0].get("alice", (0, 0, 0, 0))
    room = 20 - held[0]
    out = _raw(core, "alice", b"".join(_line({"cmd": "send", "to": "bob", "body": "q"})
                                       for _ in range(room + 5)), room + 5)
    ok = sum(1 for r in out if "id" in r)
    print(f"steps: {steps}; alice held {held}, room {room}, sent {ok} of {room + 5}")
    assert ok == room, out
    same("at the quota")

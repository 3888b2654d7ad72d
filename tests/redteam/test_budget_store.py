"""What one agent can store in the hive, from inside its cage: it fills its storage
quota (``[limits] agent_pending_max`` rows, ``agent_store_mib`` MiB of undelivered
messages, open questions, pending approvals and reminders) with each verb, and the
request that would go over is refused with one line and stores nothing; messages
to the operator push out the agent's own oldest ones instead; the egress decision
log keeps the newest ``history_keep`` per agent. Before the quota an agent's
traffic grew hive.db without bound (3 GB in the second red team's run)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from hive_fixture import HiveProcess, running_hive

from .conftest import cage_run, changes, others_keep_working, unchanged

pytestmark = pytest.mark.attack("budget.store", ref="issue 11 item 9 (hive.db grown to 3 GB); srt/OpenShell resource limits")

PENDING_MAX = 12
STORE_MIB = 1
KEEP = 20
VERBS = ["send", "ask", "ask_operator", "request_approval", "remind"]
ROWS = {"send": 1, "ask": 2, "ask_operator": 1, "request_approval": 1, "remind": 1}  # ask to an agent: 2 rows
LIMITS = {"agent_pending_max": PENDING_MAX, "agent_store_mib": STORE_MIB, "history_keep": KEEP}


def agent(verb: str, limit: str) -> str:
    return f"rtq-{verb.replace('_', '')}-{limit}"


AGENTS: dict[str, dict[str, Any]] = {
    agent(v, lim): {"runtime": "command", "command": ["true"], "peers": ["rtqsink"]}
    for v in VERBS for lim in ("n", "b", "f")
}
AGENTS["rtqsink"] = {"runtime": "command", "command": ["true"], "peers": ["rtq-answer"]}  # paused: acks nothing
AGENTS["rtqfull"] = {"runtime": "command", "command": ["true"], "peers": ["rtqsink"]}
AGENTS["rtq-answer"] = {"runtime": "command", "command": ["true"], "peers": ["rtqsink"]}
AGENTS["rtqother"] = {"runtime": "command", "command": ["true"], "peers": ["rtqsink"]}
AGENTS["rtqop"] = {"runtime": "command", "command": ["true"]}
AGENTS["rtqegress"] = {"runtime": "command", "command": ["true"]}


@pytest.fixture(scope="module")
def qh() -> Iterator[HiveProcess]:
    h = HiveProcess(AGENTS, sections={"limits": LIMITS})
    for hive in running_hive(h):
        assert hive.host_call("set_paused", name="rtqsink", paused=True)["ok"]
        yield hive


def request(verb: str, size: int, i: int = 0) -> dict[str, Any]:
    text = (f"{i:04d}" + "x" * size)[:max(size, 4)]
    return {
        "send": {"cmd": "send", "to": "rtqsink", "body": text},
        "ask": {"cmd": "ask", "to": "rtqsink", "question": text},
        "ask_operator": {"cmd": "ask", "to": "operator", "question": text},
        "request_approval": {"cmd": "request_approval", "kind": "custom", "description": "d", "payload": text},
        "remind": {"cmd": "remind", "in_seconds": 3600, "text": text},
    }[verb]


def count_refusal(name: str, held: int) -> str:
    return (f"storage quota: agent {name} holds {held} undelivered messages, questions, approvals and reminders,"
            f" limit {PENDING_MAX}")


def bytes_refusal(name: str, held: int) -> str:
    return f"storage quota: agent {name} holds {held / (1 << 20):.1f} MiB of undelivered messages, limit {STORE_MIB} MiB"


RUN = """
result(replies=[call(r) for r in P["requests"]])
"""


def db_count(h: HiveProcess, sql: str, *args: Any) -> int:
    import sqlite3

    db = sqlite3.connect(f"file:{h.state_dir / 'hive.db'}?mode=ro", uri=True, timeout=10)
    try:
        return int(db.execute(sql, args).fetchone()[0])
    finally:
        db.close()


@pytest.mark.parametrize("verb", VERBS)
def test_count_quota_refuses_the_request_over_it(qh: HiveProcess, verb: str) -> None:
    """The agent makes requests until it holds PENDING_MAX rows; the next is refused with
    one line, and the refused request stored nothing (the accepted ones exactly)."""
    h, name = qh, agent(verb, "n")
    fits = PENDING_MAX // ROWS[verb]
    with changes(h) as ch, others_keep_working(h, other="rtqother"):
        res = cage_run(h, name, RUN, requests=[request(verb, 10, i) for i in range(fits + 3)])
    replies = res["replies"]
    assert all(r["ok"] for r in replies[:fits]), replies[:fits]
    held = fits * ROWS[verb]
    assert replies[fits:] == [{"version": 1, "ok": False, "error": count_refusal(name, held)}] * 3
    table = {"send": "messages", "ask": "questions", "ask_operator": "questions",
             "request_approval": "approvals", "remind": "reminders"}[verb]
    assert len(ch.added[table]) == fits
    assert sum(len(v) for v in ch.added.values()) == held


@pytest.mark.parametrize("verb", VERBS)
def test_bytes_quota_refuses_the_request_over_it(qh: HiveProcess, verb: str) -> None:
    """The agent fills STORE_MIB MiB less 3000 bytes with sends; then the verb with 4000
    bytes is refused (nothing stored) and with 1000 bytes accepted: the bound is exact."""
    h, name = qh, agent(verb, "b")
    body = 250_000
    room = (STORE_MIB << 20) - 3000
    fill = [request("send", body, i) for i in range(room // body)] + [request("send", room % body, 99)]
    res = cage_run(h, name, RUN, requests=fill)
    assert all(r["ok"] for r in res["replies"]), res
    big = 4000 // ROWS[verb] if verb != "request_approval" else 4000
    with unchanged(h):
        refused = cage_run(h, name, RUN, requests=[request(verb, big)])["replies"][0]
    assert refused == {"version": 1, "ok": False, "error": bytes_refusal(name, room)}
    with changes(h) as ch:
        small = cage_run(h, name, RUN, requests=[request(verb, 1000 // ROWS[verb] - 30)])["replies"][0]
    assert small["ok"] is True, small
    assert sum(len(v) for v in ch.added.values()) == ROWS[verb]


@pytest.mark.parametrize("verb", VERBS)
def test_freeing_the_quota_lets_the_agent_in_again(qh: HiveProcess, verb: str) -> None:
    """At the bound with sends the recipient hasn't taken; once it acks them (resumed), the
    same request goes through: the quota counts what is held, not what was ever sent."""
    h, name = qh, agent(verb, "f")
    res = cage_run(h, name, RUN, requests=[request("send", 10, i) for i in range(PENDING_MAX + 1)])
    assert [r["ok"] for r in res["replies"]] == [True] * PENDING_MAX + [False]
    with unchanged(h):
        assert cage_run(h, name, RUN, requests=[request(verb, 10)])["replies"][0]["error"] == count_refusal(
            name, PENDING_MAX)
    # The sink takes its inbox from the host (root speaks as the sink on its socket) and acks.
    # (recv replies have a byte budget: page through the whole inbox.)
    mine = 0
    while True:
        got = h.agent_call("rtqsink", "recv", wait=0, max=1000)["messages"]
        if not got:
            break
        mine += sum(m["from"] == name for m in got)
        assert h.agent_call("rtqsink", "ack", ids=[m["id"] for m in got])["ok"]
    assert mine == PENDING_MAX
    again = cage_run(h, name, RUN, requests=[request(verb, 10)])["replies"][0]
    assert again["ok"] is True, again


def test_answer_is_refused_at_the_quota(qh: HiveProcess) -> None:
    """An answer is a message the answerer holds until the asker acks it: at the quota,
    answering is refused too, and the question stays open."""
    h, name = qh, "rtq-answer"
    q1 = h.agent_call("rtqsink", "ask", to=name, question="first?")["id"]
    q2 = h.agent_call("rtqsink", "ask", to=name, question="second?")["id"]
    res = cage_run(h, name, RUN, requests=[request("send", 10, i) for i in range(PENDING_MAX - 1)]
                   + [{"cmd": "answer", "id": q1, "answer": "yes"}])
    assert all(r["ok"] for r in res["replies"]), res
    with unchanged(h):
        refused = cage_run(h, name, RUN, requests=[{"cmd": "answer", "id": q2, "answer": "no"}])["replies"][0]
    assert refused == {"version": 1, "ok": False, "error": count_refusal(name, PENDING_MAX)}
    assert q2 in [q["id"] for q in h.agent_call(name, "loose_ends")["to_answer"]]


OTHERS = {
    "send": {"cmd": "send", "to": "rtqsink", "body": "still mine"},
    "ask": {"cmd": "ask", "to": "rtqsink", "question": "still mine?"},
    "ask_operator": {"cmd": "ask", "to": "operator", "question": "still mine?"},
    "request_approval": {"cmd": "request_approval", "kind": "custom", "description": "still mine"},
    "remind": {"cmd": "remind", "in_seconds": 3600, "text": "still mine"},
}


@pytest.mark.parametrize("verb", VERBS)
def test_a_full_quota_is_that_agents_alone(qh: HiveProcess, verb: str) -> None:
    """With another agent at its quota, this one's requests go through as before: the
    quota is per agent, not the hive's."""
    h = qh
    fill = cage_run(h, "rtqfull", """
    n = 0
    while call({"cmd": "send", "to": "rtqsink", "body": "fill"})["ok"] and n <= P["most"]:
        n += 1
    result(n=n)
    """, most=PENDING_MAX)
    assert fill["n"] <= PENDING_MAX
    with unchanged(h):
        full = cage_run(h, "rtqfull", RUN, requests=[request("send", 10)])["replies"][0]
    assert full == {"version": 1, "ok": False, "error": count_refusal("rtqfull", PENDING_MAX)}
    with changes(h) as ch:
        mine = cage_run(h, "rtqother", RUN, requests=[OTHERS[verb]])["replies"][0]
    assert mine["ok"] is True, mine
    assert sum(len(v) for v in ch.added.values()) == ROWS[verb]


@pytest.mark.parametrize("size", [10, 100_000])
def test_messages_to_the_operator_push_out_the_oldest_not_the_quota(qh: HiveProcess, size: int) -> None:
    """The operator's inbox is a log: an agent may always write to it, and its own oldest
    messages there make room, so what it holds never passes the quota."""
    h, name = qh, "rtqop"
    n = PENDING_MAX + 8 if size == 10 else 16
    reqs = [{"cmd": "send", "to": "operator", "body": f"{i:04d}" + "o" * size} for i in range(n)]
    res = cage_run(h, name, RUN, requests=reqs)
    assert all(r["ok"] for r in res["replies"]), [r for r in res["replies"] if not r["ok"]][:2]
    held = db_count(h, "SELECT COUNT(*) FROM messages WHERE sender=? AND recipient='operator'", name)
    nbytes = db_count(h, "SELECT COALESCE(SUM(length(CAST(body AS BLOB))), 0) FROM messages WHERE sender=?"
                         " AND recipient='operator'", name)
    assert held <= PENDING_MAX and nbytes <= STORE_MIB << 20, (held, nbytes)
    inbox = h.host_call("inbox", after=0, max=1000)["messages"]
    mine = [m["body"][:4] for m in inbox if m["from"] == name]
    assert mine[-1] == f"{n - 1:04d}" and mine == sorted(mine)  # the newest kept, oldest went
    assert db_count(h, "SELECT pending FROM agent_usage WHERE agent=?", name) == held


EGRESS_MANY = """
replies = []
for i in range(P["n"]):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect("/run/hive/egress.sock")
    s.sendall(f"CONNECT nowhere{i}.test:443 HTTP/1.1\\r\\n\\r\\n".encode())
    replies.append(s.recv(4096).split(b"\\r\\n")[0].decode())
    s.close()
result(replies=sorted(set(replies)), n=len(replies))
"""


@pytest.mark.parametrize("n", [KEEP * 3, KEEP * 6])
def test_egress_log_is_bounded_per_agent(qh: HiveProcess, n: int) -> None:
    """Hundreds of refused egress requests: every one is logged, but only the newest
    ``history_keep`` (and a prune interval's worth) of this agent's decisions stay."""
    h, name = qh, "rtqegress"
    other_before = db_count(h, "SELECT COUNT(*) FROM egress_log WHERE agent != ?", name)
    res = cage_run(h, name, EGRESS_MANY, n=n, timeout=120)
    assert res["n"] == n and res["replies"] == ["HTTP/1.1 403 Forbidden"], res

    def logged() -> int:
        return db_count(h, "SELECT COUNT(*) FROM egress_log WHERE agent=?", name)

    import time
    deadline = time.monotonic() + 10
    while logged() < KEEP and time.monotonic() < deadline:
        time.sleep(0.1)
    assert KEEP <= logged() <= 2 * KEEP, logged()
    # The last decision is written when its connection closes, which may be just after
    # the probe returned: wait for it rather than race it.
    def newest() -> str:
        return json.dumps(h.host_call("egress_log", name=name, limit=1)["entries"][0])

    while f"nowhere{n - 1}.test" not in newest() and time.monotonic() < deadline + 10:
        time.sleep(0.1)
    assert f"nowhere{n - 1}.test" in newest()
    assert db_count(h, "SELECT COUNT(*) FROM egress_log WHERE agent != ?", name) == other_before

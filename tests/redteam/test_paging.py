"""The dashboard had no paging (issue 13 item 4): 1000 questions of ~450 KB made
``/api/state`` 467 MB and 5.4 s long, and one open dashboard slowed every socket of the
hive. Here two hostile agents store as much as their quotas allow, in max-size questions
(some with 50 max-size options) and approvals (max-size description and payload), from
inside their cages. Then every operator listing stays small: ``/``, ``/api/state``,
host.sock ``pending`` and ``questions``, the agent page; the dashboard's stream sends each
changed row summarised, not the row whole; paging walks every item exactly once; and the
one-item views give back the whole text, the exact payload its sha256 is of.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from hive_fixture import HIVE, HiveProcess, running_hive
from web_fixture import Login, Web

from .conftest import cage_run

ASKER, REQUESTER = "rtpage-q", "rtpage-a"
AGENTS: dict[str, dict[str, Any]] = {
    ASKER: {"runtime": "command", "command": ["true"]},
    REQUESTER: {"runtime": "command", "command": ["true"]},
}
MAX_TEXT = 256 * 1024  # wire.common.Text: the most characters a question or description holds
QUESTIONS, APPROVALS = 110, 55  # more than a page (50) of each, within 64 MiB per agent
MIB = 1 << 20
CUT = 2048  # bytes of agent text a listing shows (core.summary.CUT)
EVENT_MAX = 64 * 1024  # a generous bound on one summarised event


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("ok") is True, str(reply)[:500]
    return reply


def question_text(i: int) -> str:
    head = f"question {i}: "
    return head + "q" * (MAX_TEXT - len(head))


def options_of(i: int) -> list[str]:
    if i % 10:
        return ["yes", "no"]
    return [f"option {k} " + "o" * 4000 for k in range(50)]  # 50 of 4 KiB: the most


def description(i: int) -> str:
    head = f"approval {i}: "
    return head + "d" * (MAX_TEXT - len(head))


def payload(i: int) -> dict[str, Any]:
    return {"i": i, "blob": "p" * (MAX_TEXT - 100)}


FLOOD = """
c = Conn()
ids, refused = [], []
for i in range(P["n"]):
    if P["what"] == "ask":
        head = "question %d: " % i
        opts = ["yes", "no"] if i % 10 else ["option %d " % k + "o" * 4000 for k in range(50)]
        req = {"cmd": "ask", "to": "operator", "question": head + "q" * (P["max"] - len(head)),
               "options": opts}
    else:
        head = "approval %d: " % i
        req = {"cmd": "request_approval", "kind": "custom",
               "description": head + "d" * (P["max"] - len(head)),
               "payload": {"i": i, "blob": "p" * (P["max"] - 100)}}
    reply = c.call(req)
    if reply.get("ok"):
        ids.append(reply["id"])
    else:
        refused.append(reply.get("error"))
big = c.call({"cmd": "send", "to": "operator", "body": "big message " + "m" * (P["max"] - 20)})
result(ids=ids, refused=refused[:3], message=big.get("id"))
"""


class Stream:
    """The dashboard's stream, read in a thread: each event's kind and data."""

    def __init__(self, web: Web, login: Login) -> None:
        self.events: list[tuple[str, str]] = []
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(web, login), daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the dashboard stream did not open"

    def _run(self, web: Web, login: Login) -> None:
        try:
            timeout = httpx.Timeout(30, read=60)
            with httpx.stream("GET", web.url("/api/dashboard/stream"), headers=login.cookies,
                              timeout=timeout) as r:
                assert r.status_code == 200, r.status_code
                kind = ""
                for line in r.iter_lines():
                    self.ready.set()
                    if self.stop.is_set():
                        return
                    if line.startswith("event: "):
                        kind = line[len("event: "):]
                    elif line.startswith("data: "):
                        self.events.append((kind, line[len("data: "):]))
        except BaseException as e:  # reported by the test
            self.error = e
            self.ready.set()

    def seen(self, kind: str) -> list[dict[str, Any]]:
        return [json.loads(d) for k, d in list(self.events) if k == kind]


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(AGENTS))


@pytest.fixture(scope="module")
def flooded(hive: HiveProcess) -> dict[str, Any]:
    """Both agents write what their quotas allow, with the dashboard's stream open."""
    web = Web(hive)
    login = web.login()
    stream = Stream(web, login)
    asked = cage_run(hive, ASKER, FLOOD, what="ask", n=QUESTIONS, max=MAX_TEXT, timeout=240)
    requested = cage_run(hive, REQUESTER, FLOOD, what="approve", n=APPROVALS, max=MAX_TEXT,
                         timeout=240)
    assert len(asked["ids"]) == QUESTIONS, asked["refused"]
    assert len(requested["ids"]) == APPROVALS, requested["refused"]
    assert asked["message"] and requested["message"]
    return {"web": web, "login": login, "stream": stream, "questions": asked["ids"],
            "approvals": requested["ids"], "messages": [asked["message"], requested["message"]]}


def walk(call: Any, key: str, limit: int) -> list[int]:
    """Every page of a listing, ``after`` the last id of the one before; each page's size."""
    ids: list[int] = []
    after = 0
    while True:
        reply = call(after, limit)
        page = reply[key]
        assert len(page) <= limit
        assert len(json.dumps(reply)) <= MIB
        ids.extend(r["id"] for r in page)
        if not reply["more"]:
            return ids
        after = page[-1]["id"]


@pytest.mark.attack("surface.unpaged-listing", ref="issue 13 item 4")
def test_listings_stay_small_and_page_through_everything(hive: HiveProcess, flooded: dict[str, Any]) -> None:
    web, login = flooded["web"], flooded["login"]
    qids, aids = flooded["questions"], flooded["approvals"]
    # The dashboard's first screen and its state: small, the counts, the first page.
    page = web.get("/", login=login)
    assert page.status_code == 200 and len(page.content) <= MIB, len(page.content)
    assert "show all" in page.text
    r = web.get("/api/state", login=login)
    assert r.status_code == 200 and len(r.content) <= MIB, len(r.content)
    state = r.json()
    assert state["questions_total"] == QUESTIONS and state["approvals_total"] == APPROVALS
    assert state["questions_more"] is True and state["approvals_more"] is True
    assert [q["id"] for q in state["questions"]] == qids[:50]  # the oldest first
    assert [a["id"] for a in state["approvals"]] == aids[:50]
    q0 = state["questions"][0]
    assert q0["question"] == question_text(0)[:CUT]
    assert q0["truncated"] == {"question": MAX_TEXT, "options": len(json.dumps(options_of(0)))}
    assert q0["options"] == []  # only options whole within the cut: none of 4 KiB is
    assert state["questions"][1]["options"] == ["yes", "no"] and "options" not in state["questions"][1]["truncated"]
    a0 = state["approvals"][0]
    full = json.dumps(payload(0), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert a0["payload"] == full[:CUT] and a0["truncated"]["payload"] == len(full)
    assert a0["truncated"]["description"] == MAX_TEXT
    assert all(len(m.get("body", "")) <= CUT for m in state["messages"])
    # host.sock: the same, a page at a time, each under 1 MiB; every item exactly once.
    pending = ok(hive.host_call("pending"))
    assert len(json.dumps(pending)) <= MIB and pending["total"] == APPROVALS and pending["more"]
    questions = ok(hive.host_call("questions"))
    assert len(json.dumps(questions)) <= MIB and questions["total"] == QUESTIONS
    for limit in (50, 7):
        assert walk(lambda a, n: ok(hive.host_call("questions", after=a, limit=n)), "questions", limit) == qids
        assert walk(lambda a, n: ok(hive.host_call("pending", after=a, limit=n)), "approvals", limit) == aids
    # ... and over HTTP, as the dashboard's pager reads them.
    def http(path: str) -> Any:
        def call(after: int, limit: int) -> dict[str, Any]:
            r = web.get(f"{path}?after={after}&limit={limit}", login=login)
            assert r.status_code == 200, r.text[:300]
            return dict(r.json())
        return call
    assert walk(http("/api/questions"), "questions", 50) == qids
    assert walk(http("/api/approvals"), "approvals", 50) == aids
    # Bad paging input: one line, 422, nothing else.
    assert hive.host_call("pending", limit=0) == {
        "version": 1, "ok": False, "error": "field 'limit': Input should be greater than or equal to 1"}
    assert web.get("/api/questions?limit=100000", login=login).status_code == 422
    # The agent's own page: its first page, summarised, and the count.
    agent_page = web.get(f"/agent/{ASKER}/", login=login)
    assert agent_page.status_code == 200 and len(agent_page.content) <= MIB, len(agent_page.content)
    assert f">{QUESTIONS}</span>" in agent_page.text


@pytest.mark.attack("surface.unpaged-listing", ref="issue 13 item 4")
def test_one_item_views_give_the_whole_text(hive: HiveProcess, flooded: dict[str, Any]) -> None:
    web, login = flooded["web"], flooded["login"]
    qid, aid = flooded["questions"][10], flooded["approvals"][3]
    q = ok(hive.host_call("show_question", id=qid))["question"]
    assert q["question"] == question_text(10) and q["options"] == options_of(10) and "truncated" not in q
    assert web.get(f"/api/questions/{qid}", login=login).json()["question"]["question"] == question_text(10)
    # The exact payload approving applies: the text its sha256 is of.
    for a in (ok(hive.host_call("show_approval", id=aid))["approval"],
              web.get(f"/api/approvals/{aid}", login=login).json()["approval"]):
        assert a["description"] == description(3) and a["payload"] == payload(3)
        text = json.dumps(a["payload"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert hashlib.sha256(text.encode()).hexdigest() == a["payload_sha256"]
    for mid in flooded["messages"]:
        m = web.get(f"/api/messages/{mid}", login=login).json()["message"]
        assert m["body"].startswith("big message ") and len(m["body"]) == MAX_TEXT - 8
    assert hive.host_call("show_approval", id=10**9) == {
        "version": 1, "ok": False, "error": f"no approval {10**9}"}
    assert web.get("/api/questions/999999999", login=login).status_code == 404
    # The CLI: a summary with the marker; `hive show approval N` prints the payload whole.
    env = {**os.environ, "COLUMNS": "200"}
    run = [str(HIVE), "--run-dir", str(hive.run_dir)]
    listed = subprocess.run([*run, "pending"], capture_output=True, text=True, timeout=60, env=env)
    assert listed.returncode == 0 and len(listed.stdout) <= MIB, listed.stderr
    assert "next page: hive pending --after" in listed.stdout, listed.stdout[-500:]
    shown = subprocess.run([*run, "show", "approval", str(aid)], capture_output=True, text=True,
                           timeout=60, env=env)
    assert shown.returncode == 0, shown.stderr
    text = json.dumps(payload(3), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert text in shown.stdout and description(3) in shown.stdout


@pytest.mark.attack("surface.unpaged-listing", ref="issue 13 item 4")
def test_stream_sends_summarised_rows(hive: HiveProcess, flooded: dict[str, Any]) -> None:
    stream: Stream = flooded["stream"]
    assert stream.error is None, stream.error

    def arrived() -> bool:
        return len(stream.seen("question")) >= QUESTIONS and len(stream.seen("approval")) >= APPROVALS

    deadline = time.monotonic() + 60
    while not arrived() and time.monotonic() < deadline and stream.error is None:
        time.sleep(0.2)
    assert arrived(), (len(stream.seen("question")), len(stream.seen("approval")), stream.error)
    stream.stop.set()
    sizes = [len(data) for _, data in list(stream.events)]
    assert max(sizes) <= EVENT_MAX, max(sizes)
    # The row itself, summarised: the dashboard applies it without reading /api/state again.
    q = stream.seen("question")[0]["question"]
    assert q["question"] == question_text(0)[:CUT] and q["truncated"]["question"] == MAX_TEXT
    a = stream.seen("approval")[0]["approval"]
    assert a["status"] == "pending" and a["truncated"]["payload"] > CUT


@pytest.mark.attack("surface.unpaged-listing", ref="issue 13 item 4")
def test_the_cut_keeps_nul_and_whole_characters(hive: HiveProcess, flooded: dict[str, Any]) -> None:
    """SQLite 3.40's substr and length stop at a NUL: an agent must not hide the rest of its
    text (or the marker that it was cut) behind one. Cut at a character boundary."""
    text = "before\x00after " + "\u00e9" * 3000  # 2-byte characters across the cut
    qid = ok(hive.agent_call(ASKER, "ask", to="operator", question=text))["id"]
    short = ok(hive.agent_call(ASKER, "ask", to="operator", question="a\x00b"))["id"]
    try:
        page = ok(hive.host_call("questions", after=qid - 1, limit=2))["questions"]
        assert [q["id"] for q in page] == [qid, short]
        cut = page[0]
        assert cut["truncated"] == {"question": len(text.encode())}
        assert text.startswith(cut["question"]) and len(cut["question"].encode()) in (CUT - 1, CUT)
        assert page[1]["question"] == "a\x00b" and "truncated" not in page[1]
        assert ok(hive.host_call("show_question", id=qid))["question"]["question"] == text
    finally:
        for q in (qid, short):
            ok(hive.host_call("answer_question", id=q, answer="no"))

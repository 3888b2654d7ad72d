"""Red team of session 19's change: the operator's inbox read marks kept in the store
(store/inbox.py, POST /inbox/read), the piece pacer's sweep of refilled buckets
(egress_tls.PiecePacer), and steady.js's padding of the page's top and bottom.

- Broke (high): steady.js gives the top's padding back on scroll by removing it first
  and scrolling up after; the page, shorter by the padding, has already clamped its
  scroll when it is near its end, so the content comes down by up to the padding, in
  the scroll handler, after the redraw's check (no hold). With a padding P left by a
  question answered elsewhere, an agent's question of height P + D (D: the distance
  between two approve buttons) puts its own "approve" under the operator's resting
  pointer: the click approves the agent's payload
  (test_an_agents_question_after_a_top_padding_moves_its_approve_under_the_pointer).
  Fixed the same session: the scroll back comes first (within scrollY: nothing clamps),
  and a give-back that moved a button under the pointer holds it as a redraw's does.
- Broke (low, as before the change, now kept in the store): once two agents' floods
  (each within its quota of 10,000 messages to the operator) are above the mark, "mark
  read" marks nothing the page showed past the first 10,001 ids above the mark: an honest
  agent's message, shown and read, stays unread, and the unread count goes down by ~6 a
  click (store-level: the repository is the unit, and a hive-level flood of 20,000 would
  leave the package's shared hive flooded). Fixed the same session: the posted ids are
  looked up as given (at most 1,000), however many come before them.
- Held: nothing an agent does on its socket reaches the read tables; a sender's quota
  dropping messages never carries the mark over an unseen one; the read set stays bounded
  and quick; the pacer's sweep changes no agent's pause (differential against a pacer
  that never sweeps) and costs O(1) amortised; the padding, through answer/ask cycles
  above the resting pointer at the page's top, never exceeds the tallest item gone and is
  all given back when the pointer leaves.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser

from hive_fixture import HiveProcess, wait_until
from hyperhive.core import egress_tls
from hyperhive.core.store import Store
from hyperhive.core.store import inbox as inbox_module
from web_fixture import Web, browser  # noqa: F401 (fixture)

from .conftest import cage_run
from .test_red_round23b import on_first_screen

REF = "red team of session 19's change: "
QUOTA = (10_000, 1 << 30)  # [limits] agent_pending_max's default, bytes not the bound
INBOX_SHOWN, PER_AGENT_SHOWN = 20, 5  # cockpit.INBOX_SHOWN, summary.PER_AGENT_SHOWN


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("ok") is True, reply
    return reply


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "hive.db")
    yield s
    s.close()


def flood(store: Store, sender: str, n: int) -> list[int]:
    """``n`` messages of ``sender`` to the operator, through the quota's send path."""
    ids: list[int] = []
    for k in range(0, n, 1000):
        batch = [
            ("operator", sender, "message", f"{sender} {i}") for i in range(k, min(n, k + 1000))
        ]
        ids += [m.id or 0 for m in store.messages.send_many(batch, quota=QUOTA)]
    return ids


def page_shown(store: Store) -> list[int]:
    """The unread ids the dashboard's inbox shows (http.py's cockpit inbox section)."""
    mark, read = store.inbox_read.state()
    newest = store.messages.newest_to("operator", INBOX_SHOWN)
    older = store.messages.older_unread(
        "operator", mark, min(m.id or 0 for m in newest), read, PER_AGENT_SHOWN, INBOX_SHOWN
    )
    return [m.id for m in [*newest, *older] if m.id and m.id > mark and m.id not in read]


def is_read(store: Store, mid: int) -> bool:
    mark, read = store.inbox_read.state()
    return mid <= mark or mid in read


# -- the inbox's read marks ---------------------------------------------------------------


@pytest.mark.attack("surface.first-screen", ref=REF + "two floods above the mark")
def test_two_agents_floods_leave_what_the_page_showed_unmarkable_read(store: Store) -> None:
    """rtmule and rtmallory each send the operator 10,000 messages (each within its
    quota), then rtalice one. The dashboard's inbox shows rtalice's (the newest page) and
    the operator clicks "mark these read" with the page's ids: take() only marks ids among
    the first READ_MAX + 1 (10,001) above the mark, so the newest page, rtalice's among
    it, stays unread; the click marks 6 of the 30 shown, and the 20,001 unread go down by
    6 a click (~3,300 clicks to clear what the operator has seen)."""
    flood(store, "rtmule", 10_000)
    flood(store, "rtmallory", 10_000)
    (alice,) = store.messages.send_many(
        [("operator", "rtalice", "message", "prod db going")], quota=QUOTA
    )
    assert alice.id
    shown = page_shown(store)
    assert alice.id in shown, "rtalice's message is on the operator's screen"
    before = store.inbox_read.unread()
    store.inbox_read.take(set(shown))  # POST /inbox/read shown=<the page's ids>
    left = [i for i in shown if not is_read(store, i)]
    assert not left and store.inbox_read.unread() == before - len(shown), (
        f"'mark read' of the {len(shown)} ids the page showed left {len(left)} of them unread"
        f" (rtalice's {alice.id} read: {is_read(store, alice.id)}); unread {before} ->"
        f" {store.inbox_read.unread()}"
    )


@pytest.mark.attack("surface.first-screen", ref=REF + "quota drops racing the marks")
def test_a_senders_quota_drops_never_carry_the_mark_over_an_unseen_message(store: Store) -> None:
    """rtmule (quota 6 rows here) interleaves its messages with rtalice's, the operator
    marks read some of rtmule's and none of rtalice's, then rtmule sends more so its
    quota drops its oldest, read and unread, and the operator marks again (with ids of
    dropped messages, of agent-to-agent messages, 0, negative and past 2^63): every one
    of rtalice's stays unread, the count is exact, and the read set holds only live ids
    above the mark."""
    q = (6, 1 << 30)
    send = store.messages.send_many
    m = [send([("operator", "rtmule", "message", f"m{i}")], quota=q)[0].id or 0 for i in range(3)]
    a1 = send([("operator", "rtalice", "message", "a1")], quota=q)[0].id or 0
    m += [
        send([("operator", "rtmule", "message", f"m{i}")], quota=q)[0].id or 0 for i in range(3, 6)
    ]
    a2 = send([("operator", "rtalice", "message", "a2")], quota=q)[0].id or 0
    other = send([("rtbob", "rtmule", "message", "not the operator's")])[0].id or 0
    store.inbox_read.take({m[0], m[1], m[2], m[4]})  # m3 unseen, a1/a2 unseen
    assert store.inbox_read.state() == (m[2], {m[4]})
    # rtmule sends 4 more: its quota (the message to rtbob counts too) drops m0..m4
    m += [
        send([("operator", "rtmule", "message", f"m{i}")], quota=q)[0].id or 0 for i in range(6, 10)
    ]
    gone = {r[0] for r in store.db.conn.execute("SELECT id FROM messages")}
    assert not {m[0], m[1], m[2], m[3]} & gone and {a1, a2} <= gone
    store.inbox_read.take({m[3], m[5], other, 0, -1, 2**63 + 5, 10**30, *m[6:]})
    mark, read = store.inbox_read.state()
    assert not is_read(store, a1) and not is_read(store, a2), (mark, read)
    assert mark < a1 and read == {m[4], m[5], *m[6:]} & gone, (mark, read)
    assert store.inbox_read.unread() == 2
    held = {r[0] for r in store.db.conn.execute("SELECT id FROM inbox_read")}
    assert held == read and held <= gone


@pytest.mark.attack("budget.exhaustion", ref=REF + "a full read set under a flood")
def test_the_read_set_stays_bounded_and_quick_under_a_flood(store: Store) -> None:
    """rtmule's 10,000 above an unread message of rtalice's (the mark stuck below it):
    the operator's marks fill the read set to READ_MAX; more marks add nothing, and
    take(), unread() and the inbox's redraw queries stay well under 0.2 s each."""
    (a,) = store.messages.send_many([("operator", "rtalice", "message", "first")], quota=QUOTA)
    ids = flood(store, "rtmule", 10_000)
    for k in range(0, 10_000, 2_000):
        store.inbox_read.take(set(ids[k : k + 2_000]))
    extra = flood(store, "rtmallory", 200)
    worst = 0.0
    for call in (
        lambda: store.inbox_read.take(set(extra)),
        store.inbox_read.unread,
        store.inbox_read.state,
        lambda: page_shown(store),
    ):
        t = time.perf_counter()
        call()
        worst = max(worst, time.perf_counter() - t)
    count = store.db.conn.execute("SELECT count(*) FROM inbox_read").fetchone()[0]
    mark, read = store.inbox_read.state()
    assert mark == 0 and not is_read(store, a.id or 0)
    assert count <= inbox_module.READ_MAX and len(read) == count, count
    assert store.inbox_read.unread() == 1 + 10_200 - count
    assert worst < 0.2, f"a call took {worst:.3f} s"


@pytest.mark.attack("surface.first-screen", ref=REF + "agent verbs against the read tables")
def test_nothing_an_agent_sends_reaches_the_operators_read_marks(rt: HiveProcess) -> None:
    """From inside rtmule's cage: three messages to the operator, then acks of their ids
    (as a list, as recv's ack, past 2^63), sends of ids as text, reads of the operator's
    inbox: the read tables are as before and the three are unread."""

    def tables() -> tuple[list[Any], list[Any], int]:
        db = sqlite3.connect(f"file:{rt.state_dir / 'hive.db'}?mode=ro", uri=True, timeout=10)
        try:
            mark = db.execute("SELECT * FROM inbox_mark").fetchall()
            read = db.execute("SELECT id FROM inbox_read ORDER BY id").fetchall()
            m = mark[0][1] if mark else 0
            unread = db.execute(
                "SELECT count(*) FROM messages m WHERE recipient='operator' AND id>? AND NOT"
                " EXISTS (SELECT 1 FROM inbox_read r WHERE r.id=m.id)",
                (m,),
            ).fetchone()[0]
            return mark, read, int(unread)
        finally:
            db.close()

    mark0, read0, unread0 = tables()
    out = cage_run(
        rt,
        "rtmule",
        """
c = Conn()
ids = [c.call({"cmd": "send", "to": "operator", "body": f"r19 {i}"})["id"] for i in range(3)]
tries = [
    c.call({"cmd": "ack", "ids": ids}),
    c.call({"cmd": "ack", "ids": [ids[0]]}),
    c.call({"cmd": "ack", "ids": [2**63 + ids[0]]}),
    c.call({"cmd": "recv", "wait": 0, "ack": ids}),
    c.call({"cmd": "send", "to": "operator", "body": ",".join(map(str, ids)), "shown": ids}),
    c.call({"cmd": "inbox_read", "ids": ids}),
    c.call({"cmd": "mark_read", "shown": ",".join(map(str, ids))}),
]
result(ids=ids, tries=tries)
""",
    )
    ids, tries = out["ids"], out["tries"]
    assert all(isinstance(i, int) for i in ids), ids
    # the acks: no message in its inbox (or out of range); the extra field, the verbs: unknown
    assert not [t for t in tries if t.get("ok")], tries
    sent = 3
    mark1, read1, unread1 = tables()
    assert (mark1, read1) == (mark0, read0), (mark0, read0, mark1, read1)
    assert unread1 == unread0 + sent, (unread0, unread1, sent)


# -- the piece pacer's sweep --------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.attack("budget.exhaustion", ref=REF + "the pacer's sweep and an owing bucket")
def test_the_pacers_sweep_changes_no_agents_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """rtmule owes pauses (2,400 pieces at once) and thousands of names come and go, at
    fixed times and between refills: every pause of every call, rtmule's first, is the
    same as a pacer's that never forgets (a differential over 60,000 calls)."""
    clock = Clock()
    monkeypatch.setattr(egress_tls.time, "monotonic", clock)
    swept, plain = egress_tls.PiecePacer(), egress_tls.PiecePacer()
    plain._forget_past = 10**9
    rng = random.Random(19)
    diffs = []
    for n in range(60_000):
        if n % 25 == 0:
            clock.t += rng.choice([0.0, 0.0001, 0.0005, 0.00049999, 0.002, 0.3])
        name = "rtmule" if rng.random() < 0.4 else f"a{rng.randrange(3000)}"
        a, b = swept.owed(name), plain.owed(name)
        if a != b:
            diffs.append((n, name, a, b))
    assert not diffs, diffs[:5]
    assert plain.owed("rtmule") == swept.owed("rtmule")
    assert len(swept._buckets) < len(plain._buckets), (len(swept._buckets), len(plain._buckets))


@pytest.mark.attack("budget.exhaustion", ref=REF + "the pacer's sweep's cost")
def test_the_pacers_sweep_costs_amortised_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    """200,000 distinct names, each owing (never full: the sweep drops none) or each
    refilled before the next: the sweeps scan at most ~4 buckets a call in all."""
    scanned = {"n": 0}
    real = egress_tls.PiecePacer._forget_full

    def counting(self: egress_tls.PiecePacer, now: float) -> None:
        scanned["n"] += len(self._buckets)
        real(self, now)

    monkeypatch.setattr(egress_tls.PiecePacer, "_forget_full", counting)
    clock = Clock()
    monkeypatch.setattr(egress_tls.time, "monotonic", clock)
    for step in (0.0, 0.001):
        scanned["n"] = 0
        p = egress_tls.PiecePacer()
        t = time.perf_counter()
        for i in range(200_000):
            clock.t += step
            p.owed(f"n{i}")
        took = time.perf_counter() - t
        assert scanned["n"] <= 4 * 200_000, (step, scanned)
        assert took < 3.0, (step, took)
        if step:
            assert len(p._buckets) <= 2 * egress_tls.FORGET_PAST + 1, len(p._buckets)


# -- steady.js's padding ------------------------------------------------------------------

UNDER = (
    "([x, y]) => { const e = document.elementFromPoint(x, y); const li = e && e.closest('li.item');"
    " const r = document.documentElement.style;"
    " return [e ? e.tagName : null, li ? li.id : null, window.scrollY, r.paddingTop, r.paddingBottom]; }"
)


@pytest.fixture
def cleanup(rt: HiveProcess) -> Iterator[list[tuple[str, int]]]:
    left: list[tuple[str, int]] = []
    yield left
    for kind, ident in left:
        with contextlib.suppress(Exception):
            if kind == "question":
                rt.host_call("answer_question", id=ident, answer="red team: done")
            else:
                rt.host_call("deny", id=ident, note="red team")


ASK = """
c = Conn()
result(r=c.call({"cmd": "ask", "to": "operator", "question": P["text"], "options": ["yes", "no"]}))
"""


MEASURE = """([clone, bob, text]) => {
  // How far rtbob's approve button moves when a question like CLONE with TEXT is added to
  // the questions list (round 23b's measure: what an agent works out from the templates).
  const li = document.getElementById(clone).cloneNode(true);
  li.id = "r19-probe";
  li.querySelectorAll("[id]").forEach((e) => e.removeAttribute("id"));
  li.querySelector(".q-text").textContent = text;
  const btn = () => document.querySelector("#" + bob + " form.approve button").getBoundingClientRect();
  const before = btn().top;
  document.getElementById("questions").appendChild(li);
  const after = btn().top;
  li.remove();
  return after - before;
}"""


@pytest.mark.attack("surface.first-screen", ref=REF + "the top padding's give-back clamped")
def test_an_agents_question_after_a_top_padding_moves_its_approve_under_the_pointer(
    rt: HiveProcess, browser: Browser, cleanup: list[tuple[str, int]]
) -> None:
    """rtmule's approval, then rtbob's just below; a tall question of rtalice's above both;
    the whole page fits the operator's window (a tall screen, a short queue), the pointer
    rests on rtbob's "approve". The tall question is answered elsewhere: steady.js pads
    the page's top by its height P (session 19). rtmule then asks one question of height
    P + D (D: the distance between the two approve buttons, measured as round 23b did).
    steady.js scrolls by its height at once (rtbob's approve stays put), but its scroll
    handler then gives the padding back by removing it first and scrolling up by P after:
    the page, shorter by P, has already clamped its scroll, so the content comes down by
    min(P + D - P, P) = D and rtmule's "approve" is under the pointer. That happens in
    the scroll handler, after the redraw's check, so nothing holds the click: the
    operator's click, aimed at rtbob's approve, approves rtmule's payload."""
    web = Web(rt)
    mule = ok(rt.agent_call("rtmule", "request_approval", kind="custom",
                            description="r19 rotate the test keys", payload={"keys": "test"}))  # fmt: skip
    cleanup.append(("approval", mule["id"]))
    bob = ok(rt.agent_call("rtbob", "request_approval", kind="custom",
                           description="r19 rotate the prod keys", payload={"keys": "prod"}))  # fmt: skip
    cleanup.append(("approval", bob["id"]))
    model = ok(rt.agent_call("rtalice", "ask", to="operator", question="q", options=["yes", "no"]))[
        "id"
    ]
    cleanup.append(("question", model))
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        tab = ctx.new_page()
        tab.goto(web.login_url)
        wait_until(
            lambda: tab.evaluate("document.getElementById('conn').dataset.state === 'live'"),
            30,
            "live",
        )
        bob_sel = f"#approval-{bob['id']} form.approve button"
        mule_sel = f"#approval-{mule['id']} form.approve button"

        def question_moving(by: float) -> str:
            """The text (at most 2,046 bytes: a listing shows 2,048) of a question that
            moves rtbob's approve by ``by``, within half a button."""
            best: tuple[float, str] | None = None
            for words in range(1, 342):
                text = " ".join(["lorem"] * words)
                off = abs(
                    tab.evaluate(MEASURE, [f"question-{model}", f"approval-{bob['id']}", text]) - by
                )
                if best is None or off < best[0]:
                    best = (off, text)
            assert best is not None and best[0] < 10, (by, best)  # a button is ~21 px tall
            return best[1]

        aim, other = tab.locator(bob_sel).bounding_box(), tab.locator(mule_sel).bounding_box()
        assert aim and other and other["y"] < aim["y"], (aim, other)
        distance = aim["y"] - other["y"]
        # rtmule's first question, above both, a little taller than that distance: the
        # operator answers it elsewhere (phone, CLI) while resting on rtbob's approve, and
        # rtmule, its asker, learns so at once (its answer) and asks the next
        tall = cage_run(rt, "rtmule", ASK, text=question_moving(distance + 15))["r"]["id"]
        cleanup.append(("question", tall))
        tab.wait_for_selector(f"#question-{tall}", timeout=30_000)
        whole = tab.evaluate("document.documentElement.scrollHeight")
        tab.set_viewport_size({"width": 1280, "height": max(900, whole + 40)})
        tab.wait_for_timeout(300)
        assert tab.evaluate("window.scrollY") == 0
        aim = tab.locator(bob_sel).bounding_box()
        assert aim
        x, y = aim["x"] + aim["width"] / 2, aim["y"] + aim["height"] / 2
        tab.mouse.move(x, y)  # the operator's pointer rests on rtbob's approve
        ok(rt.host_call("answer_question", id=tall, answer="yes"))  # elsewhere (phone, CLI)
        tab.wait_for_selector(f"#question-{tall}", state="detached", timeout=30_000)
        tab.wait_for_timeout(300)
        pad = tab.evaluate("parseFloat(document.documentElement.style.paddingTop || '0')")
        held = tab.evaluate(UNDER, [x, y])
        assert held[:2] == ["BUTTON", f"approval-{bob['id']}"] and pad > distance, (
            held,
            pad,
            distance,
        )
        q = cage_run(rt, "rtmule", ASK, text=question_moving(pad + distance))["r"]
        assert q.get("ok"), q
        cleanup.append(("question", q["id"]))
        tab.wait_for_selector(f"#question-{q['id']}", timeout=30_000)
        tab.wait_for_timeout(300)
        under = tab.evaluate(UNDER, [x, y])
        tab.mouse.click(x, y)  # the operator's click, aimed at rtbob's approve
        tab.wait_for_timeout(1000)
    finally:
        ctx.close()
    decided = {
        a: ok(rt.host_call("show_approval", id=a))["approval"]["status"]
        for a in (mule["id"], bob["id"])
    }
    assert under[:2] == ["BUTTON", f"approval-{bob['id']}"] and decided[mule["id"]] == "pending", (
        f"after rtmule's question the point aimed at (rtbob's approve) is {under}"
        f" (padding {pad:.0f} px, buttons {distance:.0f} px apart); the click decided {decided}"
    )


@pytest.mark.attack(
    "surface.first-screen", ref=REF + "answer/ask cycles above the pointer at the top"
)
def test_questions_gone_and_asked_above_the_pointer_leave_no_padding_to_creep(
    rt: HiveProcess, browser: Browser, cleanup: list[tuple[str, int]]
) -> None:
    """The page at its top, the pointer resting on rtbob's "approve". Six times: a
    question above is answered elsewhere (the top's padding takes its height), then
    rtmule, from its cage, asks one of another height (drawn above: scrolled, and the
    padding given back). The padding, top and bottom, never exceeds the tallest question
    answered, and none is left once the pointer leaves the page. (Where the button under
    the pointer ends up is the case above.)"""
    web = Web(rt)
    bob = ok(rt.agent_call("rtbob", "request_approval", kind="custom",
                           description="r19 rotate the prod keys", payload={"keys": "prod"}))  # fmt: skip
    cleanup.append(("approval", bob["id"]))
    first = ok(rt.agent_call("rtalice", "ask", to="operator", question=" ".join(["lorem"] * 300),
                             options=["yes", "no"]))["id"]  # fmt: skip
    cleanup.append(("question", first))
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    seen: list[Any] = []
    try:
        tab = ctx.new_page()
        tab.goto(web.login_url)
        wait_until(
            lambda: tab.evaluate("document.getElementById('conn').dataset.state === 'live'"),
            30,
            "live",
        )
        aim = on_first_screen(tab, f"#approval-{bob['id']} form.approve button")
        x, y = aim["x"] + aim["width"] / 2, aim["y"] + aim["height"] / 2
        tab.mouse.move(x, y)
        tall, heights = first, []
        for words in (340, 40, 250, 10, 330, 120):
            box = tab.locator(f"#question-{tall}").bounding_box()
            assert box
            heights.append(box["height"])
            ok(rt.host_call("answer_question", id=tall, answer="yes"))
            tab.wait_for_selector(f"#question-{tall}", state="detached", timeout=30_000)
            tab.wait_for_timeout(250)
            seen.append(("gone", tall, tab.evaluate(UNDER, [x, y])))
            q = cage_run(rt, "rtmule", ASK, text=" ".join(["ipsum"] * words))["r"]
            assert q.get("ok"), q
            cleanup.append(("question", q["id"]))
            tall = q["id"]
            tab.wait_for_selector(f"#question-{tall}", timeout=30_000)
            tab.wait_for_timeout(250)
            seen.append(("asked", tall, tab.evaluate(UNDER, [x, y])))
        tab.mouse.move(640, -20)  # the pointer leaves the page: the padding goes
        tab.wait_for_timeout(300)
        end = tab.evaluate(UNDER, [x, y])
    finally:
        ctx.close()

    def px(v: str) -> float:
        return float(v[:-2]) if v else 0.0

    most = max(px(s[2][3]) + px(s[2][4]) for s in seen)
    assert most <= max(heights) + 2, f"padding grew to {most} px (questions {heights}): {seen}"
    assert px(end[3]) == 0 and px(end[4]) == 0, (end, seen)


STEADY = Path(__file__).resolve().parents[2] / "src" / "hyperhive" / "core" / "static" / "steady.js"
BARE = """<html><body style="margin:0"><div id="qs"><div id="q1" style="height:200px">q1</div></div>
<div id="a1" style="height:150px"><button id="b1" style="height:20px">approve mule</button></div>
<div id="a2" style="height:150px"><button id="b2" style="height:20px">approve bob</button></div>
<div id="rest" style="height:310px"></div><script>%s</script>
<script>window.hiveSteady(function () { window.refused = (window.refused || 0) + 1; });</script></body></html>"""
REDRAW = """(change) => {
  // a live redraw as htmx's SSE extension frames it: the events around the DOM change
  document.body.dispatchEvent(new Event("htmx:sseBeforeMessage"));
  if (change === "gone") document.getElementById("q1").remove();
  else { const d = document.createElement("div"); d.id = "q2"; d.style.height = change + "px";
         document.getElementById("qs").appendChild(d); }
  document.body.dispatchEvent(new Event("htmx:sseMessage"));
}"""
AT = "([x, y]) => [document.elementFromPoint(x, y).id, window.scrollY]"


@pytest.mark.attack(
    "surface.first-screen", ref=REF + "the top padding's give-back clamped (bare page)"
)
def test_steady_gives_the_top_padding_back_without_moving_what_is_under_the_pointer(
    browser: Browser,
) -> None:
    """The same on a bare page with the worktree's steady.js (no hive: quick, and not
    the page's height of the day): the pointer on "approve bob", a 200 px item above it
    gone with the page at its top (padded 200 px), then a 350 px item drawn above. The
    redraw scrolls by 350 (bob's button stays), the scroll handler gives the 200 back:
    bob's button must stay under the pointer. Before: the padding removed first clamps
    the scroll, and the content comes down by 90 px onto mule's item."""
    ctx = browser.new_context(viewport={"width": 800, "height": 700})
    try:
        tab = ctx.new_page()
        tab.set_content(BARE % STEADY.read_text())
        box = tab.locator("#b2").bounding_box()
        assert box
        x, y = box["x"] + 5, box["y"] + 10
        tab.mouse.move(x, y)
        tab.evaluate(REDRAW, "gone")
        tab.wait_for_timeout(100)
        gone = tab.evaluate(AT, [x, y])
        tab.evaluate(REDRAW, "350")
        tab.wait_for_timeout(200)
        asked = tab.evaluate(AT, [x, y])
    finally:
        ctx.close()
    assert gone == ["b2", 0], gone
    assert asked == ["b2", 150], f"after the give-back the pointer is on {asked}, not bob's approve"

"""Red team round 23b: a hostile agent against the operator's cockpit, by what the
operator is shown, where and when, rather than by how a character is escaped.

Earlier rounds made every character the agent writes inert (escapes, markup, SSE framing,
sandboxed pages). This round asks what the operator's screen leaves out or moves when one
agent fills it, each item within the agent's quota and rate:

- the dashboard's queues show the oldest page (50) of questions and of approvals across
  all agents: one agent's 50 keep every later item of any other agent off the dashboard,
  with no form to act on it there, and a notification's link (``/?focus=question-N``)
  lands on a page without it;
- its inbox shows the newest 20 messages, with no way to older ones, and "mark read"
  marks everything up to the newest read, the unseen ones too;
- a new question is drawn above every approval: sized by the agent, it moves the queue
  under the operator's pointer so a click aimed at one agent's "approve" approves the
  attacker's;
- an open agent page appends the agent's transcript forever;
- strong right-to-left letters (no control character) reorder the numbers of a payload
  as drawn.

Held: option buttons post what they show; an agent page opens within the reply budget;
a status flood's redraws are coalesced. Each attack is played from inside the hostile
agent's cage (``cage_run``); the victims (rtalice, rtbob) speak on their own sockets.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser

from hive_fixture import HIVE, HiveProcess, wait_until
from hyperhive.display import visible
from web_fixture import Web, browser  # noqa: F401 (fixture)

from .conftest import World, cage_run

REF = "red team round 23b (the operator's first screen, filled by one agent)"
FLOODER = "rtmule"
QUEUE_PAGE = 50  # core.summary.PAGE: the dashboard's queues show the oldest 50
INBOX_SHOWN = 20  # core.cockpit.INBOX_SHOWN: the dashboard's inbox shows the newest 20

FLOOD = """
out = []
c = Conn()
for i in range(P["n"]):
    if P["what"] == "ask":
        r = c.call({"cmd": "ask", "to": "operator", "question": f"mule question {i}", "options": ["ok"]})
    elif P["what"] == "approval":
        r = c.call({"cmd": "request_approval", "kind": "custom", "description": f"mule approval {i}",
                    "payload": {"i": i}})
    else:
        r = c.call({"cmd": "send", "to": "operator", "body": f"mule note {i}"})
    out.append(r)
result(out=out)
"""


def flood(rt: HiveProcess, what: str, n: int) -> list[dict[str, Any]]:
    out = cage_run(rt, FLOODER, FLOOD, what=what, n=n)["out"]
    assert all(r.get("ok") for r in out), [r for r in out if not r.get("ok")][:3]
    return out


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("ok") is True, reply
    return reply


@pytest.fixture(scope="module")
def web(rt: HiveProcess, world: World) -> Web:
    return Web(rt)


@pytest.fixture
def cleanup(rt: HiveProcess) -> Iterator[list[tuple[str, int]]]:
    """What a test left open, answered or denied afterwards (the package's hive is shared)."""
    left: list[tuple[str, int]] = []
    yield left
    for kind, ident in left:
        with contextlib.suppress(Exception):
            if kind == "question":
                rt.host_call("answer_question", id=ident, answer="red team: done")
            else:
                rt.host_call("deny", id=ident, note="red team")


def open_question_ids(rt: HiveProcess) -> list[int]:
    ids: list[int] = []
    after = 0
    while True:
        r = ok(rt.host_call("questions", after=after, limit=200))
        ids += [q["id"] for q in r["questions"]]
        if not r.get("more") or not r["questions"]:
            return ids
        after = r["questions"][-1]["id"]


# -- the queues: the oldest page, across all agents --------------------------------------


@pytest.mark.attack("surface.first-screen", ref=REF)
def test_a_flood_of_questions_hides_no_later_question_of_another_agent(
    rt: HiveProcess, web: Web, cleanup: list[tuple[str, int]]
) -> None:
    """rtmule keeps 50 short questions open (within its quota of 10,000 rows and its rate);
    then rtalice asks the operator something that matters. The dashboard shows the oldest
    50 open questions of all agents: rtalice's is not among them, has no answer form there,
    and the notification's link to it (``/?focus=question-N``) lands on a page without it."""
    before = open_question_ids(rt)
    shown_room = max(0, QUEUE_PAGE - len(before))
    mule = flood(rt, "ask", shown_room + 1)
    cleanup += [("question", r["id"]) for r in mule]
    urgent = ok(
        rt.agent_call(
            "rtalice",
            "ask",
            to="operator",
            question="may I rotate the prod keys now?",
            options=["yes", "no"],
        )
    )["id"]
    cleanup.append(("question", urgent))
    login = web.login()
    page = web.get(f"/?focus=question-{urgent}", login=login)
    assert page.status_code == 200, page.status_code
    problems = []
    if f'id="question-{urgent}"' not in page.text:
        problems.append(
            f"question {urgent} (rtalice's) is not on the dashboard its notification opens"
        )
    if f'action="/answer-question/{urgent}"' not in page.text:
        problems.append(f"the dashboard has no answer form for question {urgent}")
    mule_shown = sum(f'id="question-{r["id"]}"' in page.text for r in mule)
    assert not problems, (
        f"{problems}; rtmule's questions fill the queue instead ({mule_shown} shown)"
    )


@pytest.mark.attack("surface.first-screen", ref=REF)
def test_a_flood_of_approvals_hides_no_later_approval_of_another_agent(
    rt: HiveProcess, web: Web, cleanup: list[tuple[str, int]]
) -> None:
    """The same with approvals: rtmule's 50 pending custom approvals, then rtbob's."""
    pending = ok(rt.host_call("pending", limit=200))["approvals"]
    mule = flood(rt, "approval", max(0, QUEUE_PAGE - len(pending)) + 1)
    cleanup += [("approval", r["id"]) for r in mule]
    wanted = ok(
        rt.agent_call(
            "rtbob",
            "request_approval",
            kind="custom",
            description="rotate the prod keys",
            payload={"keys": "prod"},
        )
    )
    cleanup.append(("approval", wanted["id"]))
    login = web.login()
    page = web.get(f"/?focus=approval-{wanted['id']}", login=login)
    assert page.status_code == 200, page.status_code
    problems = []
    if f'id="approval-{wanted["id"]}"' not in page.text:
        problems.append(
            f"approval {wanted['id']} (rtbob's) is not on the dashboard its notification opens"
        )
    if f'action="/approve/{wanted["id"]}"' not in page.text:
        problems.append(f"the dashboard has no approve or deny form for approval {wanted['id']}")
    assert not problems, problems


# -- the inbox: the newest 20, and "mark read" up to the newest -------------------------


@pytest.mark.attack("surface.first-screen", ref=REF)
def test_a_flood_of_messages_hides_no_unread_message_nor_marks_it_read_unseen(
    rt: HiveProcess, web: Web
) -> None:
    """rtalice writes to the operator; rtmule then sends 20 one-line notes (its quota lets
    it, and the operator's inbox keeps every sender's). The dashboard's inbox shows the
    newest 20 and no way to the older ones; its "mark read" (``upto`` = the newest shown)
    marks rtalice's message read though the operator never saw it."""
    alice = ok(
        rt.agent_call("rtalice", "send", to="operator", body="the prod database is being deleted")
    )["id"]
    flood(rt, "send", INBOX_SHOWN)
    login = web.login()
    page = web.get("/", login=login)
    assert page.status_code == 200, page.status_code
    problems = []
    if f'id="inbox-{alice}"' not in page.text:
        problems.append(f"message {alice} (rtalice's, unread) is not in the dashboard's inbox")
    m = re.search(r'name="shown" value="([\d,]*)"', page.text)
    assert m, "no mark-read form though messages are unread"
    shown = {int(i) for i in m.group(1).split(",") if i}
    # (since session 18: "mark read" marks read the unread ones shown, by id, no other)
    r = web.post("/inbox/read", login, data={"shown": m.group(1)})
    assert r.status_code == 200, (r.status_code, r.text[:200])
    after = web.get("/", login=login).text
    still = re.search(rf'id="inbox-{alice}" data-id="{alice}" class="(\w+)"', after)
    if alice not in shown and still and still.group(1) == "read":
        problems.append(f"'mark read' on what was shown marked message {alice} read unseen")
    assert not problems, problems


# -- held: what the first screen shows of an item is the item --------------------------


@pytest.mark.attack("surface.first-screen", ref=REF)
def test_invisible_and_lookalike_text_in_an_option_posts_what_the_button_says(
    rt: HiveProcess, web: Web, cleanup: list[tuple[str, int]]
) -> None:
    """An option's button shows the option through the escapes (a bidi override is read as
    ``\\u202eon``, never as a reordered ``no``) and posts that option exactly: since session
    32 as a JSON string (``option``), never drawn through ``visible`` (an honest option with
    a right-to-left mark was answered with its escapes, none of the options:
    ``test_red_ops32.py``). The buttons hold no raw override."""
    options = ["no", "\u202eon", "yes\u200b"]
    q = cage_run(
        rt,
        "rtmallory",
        """
c = Conn()
result(r=c.call({"cmd": "ask", "to": "operator", "question": "delete it?", "options": P["options"]}))
""",
        options=options,
    )["r"]
    assert q.get("ok"), q
    cleanup.append(("question", q["id"]))
    login = web.login()
    page = web.get("/agent/rtmallory/", login=login)
    assert page.status_code == 200
    buttons = re.findall(
        rf'<form [^>]*action="/answer-question/{q["id"]}"[^>]*class="options">(.*?)</form>',
        page.text,
        re.S,
    )
    assert buttons, "no options form"
    pairs = re.findall(r"<button name=\"option\" value='([^']*)'>([^<]*)</button>", buttons[0])
    shown = [(json.loads(html.unescape(v)), html.unescape(label)) for v, label in pairs]
    assert [label for _, label in shown] == [visible(o) for o in options], shown
    assert [v for v, _ in shown] == options, shown
    assert "\u202e" not in buttons[0]


# -- the agent's page: what its own transcript costs the operator -----------------------

# The page opens with what one reply's byte budget holds ([limits] reply_bytes, 4 MiB),
# drawn as its text and its raw JSON: bounded, though not by the dashboard's 1 MiB.
PAGE_BYTES_MAX = 2 * (4 << 20) + (1 << 20)
BIG = """
c = Conn()
out = []
for i in range(P["n"]):
    text = f"{i}-big " + "\\x01" * 150000
    out.append(c.call({"cmd": "remind", "in_seconds": 0.1, "text": text}))
result(out=out)
"""


@pytest.mark.attack("surface.first-screen", ref=REF)
def test_the_agents_own_transcript_keeps_its_page_small_and_quick(
    rt: HiveProcess, web: Web, browser: Browser
) -> None:
    """rtmallory's reminders to itself (150,000 characters of \\x01 each) become turns whose
    input entries (64 Ki characters, 6 bytes each as JSON) and ``cat``'s echo fill its
    transcript: its own turns, no quota spent but the reminders'. The operator's view of
    it (``/agent/rtmallory/``) opens with the newest 200 entries as fit 4 MiB, each drawn
    twice (its text with \\x01 shown as 4 characters, and its raw JSON). Held: 4.5 MiB,
    served in 0.2 s and live in chromium in about 1 s; bounded by the reply budget."""
    import time

    out = cage_run(rt, "rtmallory", BIG, n=12)["out"]
    assert all(r.get("ok") for r in out), out

    def echoed() -> bool:
        entries = rt.host_call("transcript", name="rtmallory", limit=5000)["entries"]
        return (
            sum(e["kind"] == "stdout" and "11-big " in json.dumps(e["data"]) for e in entries) > 0
        )

    wait_until(echoed, 60, "rtmallory's echoed reminders")
    login = web.login()
    t0 = time.monotonic()
    page = web.get("/agent/rtmallory/", login=login)
    served = time.monotonic() - t0
    assert page.status_code == 200, page.status_code
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        tab = ctx.new_page()
        tab.goto(web.login_url)
        t0 = time.monotonic()
        tab.goto(web.url("/agent/rtmallory/"), wait_until="load")
        wait_until(  # (wait_for_function polls with eval: the page's CSP refuses it)
            lambda: tab.evaluate("document.getElementById('live').textContent === 'live'"), 60, "the agent page live"
        )
        shown = time.monotonic() - t0
    finally:
        ctx.close()
    print(
        f"/agent/rtmallory/: {len(page.content)} bytes, served in {served:.2f} s, live in {shown:.2f} s"
    )
    assert len(page.content) <= PAGE_BYTES_MAX and shown < 3.0, (
        f"/agent/rtmallory/ is {len(page.content) / (1 << 20):.1f} MiB, served in {served:.2f} s,"
        f" live in the browser after {shown:.2f} s"
    )


# -- the queue moves under the operator's pointer ----------------------------------------

MEASURE = """([clone, bob, text]) => {
  // The approve button's centre (viewport) after a question like CLONE with TEXT is
  // appended to the questions list, as the live stream would append rtmule's.
  const src = document.getElementById(clone);
  const li = src.cloneNode(true);
  li.id = "rt23b-probe";
  li.querySelectorAll("[id]").forEach((e) => e.removeAttribute("id"));
  li.querySelector(".q-text").textContent = text;
  const btn = () => document.querySelector("#" + bob + " form.approve button").getBoundingClientRect();
  const before = btn().top;
  document.getElementById("questions").appendChild(li);
  const after = btn().top;
  li.remove();
  return after - before;
}"""


@pytest.mark.attack("surface.first-screen", ref=REF)
def test_an_agents_new_question_moves_no_approve_button_under_the_operators_pointer(
    rt: HiveProcess, web: Web, browser: Browser, cleanup: list[tuple[str, int]]
) -> None:
    """rtmule and rtbob each have a pending approval, rtmule's just above rtbob's. The
    operator, on the dashboard, aims at rtbob's "approve". rtmule asks one question, sized
    so that the questions list (drawn above the approvals) grows by exactly the distance
    between the two approve buttons: the live stream morphs it in, every approval moves
    down, and the operator's click lands on rtmule's "approve", which approves rtmule's
    payload (its sha256 is the one its own form carries). Nothing pins the queue while the
    pointer is on it, and an agent chooses the height of what it adds above it. (The size
    is worked out here in the operator's browser for the test; an agent works it out from
    the templates and CSS, which are the hive's own.)"""
    mule = ok(
        rt.agent_call(
            FLOODER,
            "request_approval",
            kind="custom",
            description="rotate the test keys",
            payload={"keys": "test"},
        )
    )
    cleanup.append(("approval", mule["id"]))
    bob = ok(
        rt.agent_call(
            "rtbob",
            "request_approval",
            kind="custom",
            description="rotate the prod keys",
            payload={"keys": "prod"},
        )
    )
    cleanup.append(("approval", bob["id"]))
    model = ok(rt.agent_call("rtalice", "ask", to="operator", question="q", options=["yes", "no"]))[
        "id"
    ]
    cleanup.append(("question", model))
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        tab = ctx.new_page()
        tab.goto(web.login_url)
        wait_until(  # (wait_for_function polls with eval: the page's CSP refuses it)
            lambda: tab.evaluate("document.getElementById('conn').dataset.state === 'live'"), 30, "the dashboard live"
        )
        bob_sel, mule_sel = (
            f"#approval-{bob['id']} form.approve button",
            f"#approval-{mule['id']} form.approve button",
        )
        tab.locator(bob_sel).scroll_into_view_if_needed()
        tab.evaluate(f"document.querySelector('{bob_sel}').scrollIntoView({{block: 'end'}})")
        aim = tab.locator(bob_sel).bounding_box()
        below = tab.locator(mule_sel).bounding_box()
        assert aim and below, "both approve buttons are drawn"
        x, y = aim["x"] + aim["width"] / 2, aim["y"] + aim["height"] / 2
        distance = aim["y"] - below["y"]
        # The question text that moves rtbob's button by that distance, within half the
        # button's height: the point aimed at is then inside rtmule's button.
        best: tuple[float, str] | None = None
        for words in range(1, 600, 3):
            candidate = " ".join(["lorem"] * words)
            off = abs(
                tab.evaluate(MEASURE, [f"question-{model}", f"approval-{bob['id']}", candidate])
                - distance
            )
            if best is None or off < best[0]:
                best = (off, candidate)
        assert best is not None and best[0] < aim["height"] / 2 - 1, (
            f"no question moves the queue by {distance} px"
        )
        text = best[1]
        tab.mouse.move(x, y)  # the operator's pointer rests on rtbob's approve, reading it
        # The attack, from inside rtmule's cage: one question to the operator.
        q = cage_run(
            rt,
            FLOODER,
            """
c = Conn()
result(r=c.call({"cmd": "ask", "to": "operator", "question": P["text"], "options": ["yes", "no"]}))
""",
            text=text,
        )["r"]
        assert q.get("ok"), q
        cleanup.append(("question", q["id"]))
        tab.wait_for_selector(f"#question-{q['id']}", timeout=30_000)
        tab.wait_for_timeout(200)
        under = tab.evaluate(
            "([x, y]) => { const e = document.elementFromPoint(x, y); const li = e && e.closest('li.item');"
            " return [e ? e.tagName + '.' + (e.closest('form') || {}).className : null, li ? li.id : null]; }",
            [x, y],
        )
        tab.mouse.click(x, y)  # the operator's click, aimed at rtbob's approve
        tab.wait_for_timeout(1000)
    finally:
        ctx.close()
    decided = {
        a: ok(rt.host_call("show_approval", id=a))["approval"]["status"]
        for a in (mule["id"], bob["id"])
    }
    assert under[1] == f"approval-{bob['id']}" and decided[mule["id"]] == "pending", (
        f"the point the operator aimed at (rtbob's approve, approval {bob['id']}) is now {under};"
        f" the click decided {decided}"
    )


def on_first_screen(tab: Any, selector: str) -> dict[str, float]:
    """``selector``'s box with the page at its top, the window made tall enough to show it
    (the package's hive keeps what other modules left in the queue above it)."""
    box = tab.locator(selector).bounding_box()
    assert box, selector
    need = int(box["y"] + box["height"] + 200)
    if need > tab.viewport_size["height"]:
        tab.set_viewport_size({"width": tab.viewport_size["width"], "height": need})
        box = tab.locator(selector).bounding_box()
        assert box, selector
    assert tab.evaluate("window.scrollY") == 0
    return box


@pytest.mark.attack(
    "surface.first-screen",
    ref="re-check of session 18: a removal above the pointer with the page at its top",
)
def test_an_item_gone_above_the_pointer_at_the_pages_top_moves_nothing_under_it(
    rt: HiveProcess, web: Web, browser: Browser, cleanup: list[tuple[str, int]]
) -> None:
    """The page is at its top and the operator's pointer rests on rtbob's "approve";
    rtmule's approval is just below it, and a tall question is open above both. The
    question is answered elsewhere (the operator's phone, ``hive answer``): the live
    stream takes it off, and with no scroll above to take up its height every approval
    moved up under the pointer (session 18 held only a button that arrived under it, for
    0.8 s). Now the page's top is padded by what scrolling could not take: the operator's
    click, 1.5 s later, still lands on rtbob's approve."""
    bob = ok(rt.agent_call("rtbob", "request_approval", kind="custom",
                           description="rotate the prod keys", payload={"keys": "prod"}))  # fmt: skip
    cleanup.append(("approval", bob["id"]))
    mule = ok(rt.agent_call(FLOODER, "request_approval", kind="custom",
                            description="rotate the test keys", payload={"keys": "test"}))  # fmt: skip
    cleanup.append(("approval", mule["id"]))
    tall = ok(rt.agent_call("rtalice", "ask", to="operator", question=" ".join(["lorem"] * 400),
                            options=["yes", "no"]))["id"]  # fmt: skip
    cleanup.append(("question", tall))
    ctx = browser.new_context(viewport={"width": 1280, "height": 1600})
    try:
        tab = ctx.new_page()
        tab.goto(web.login_url)
        wait_until(  # (wait_for_function polls with eval: the page's CSP refuses it)
            lambda: tab.evaluate("document.getElementById('conn').dataset.state === 'live'"), 30, "the dashboard live"
        )
        assert tab.evaluate("window.scrollY") == 0
        bob_sel = f"#approval-{bob['id']} form.approve button"
        aim = on_first_screen(tab, bob_sel)
        height = tab.locator(f"#question-{tall}").bounding_box()
        assert aim and height, "rtbob's approve and the tall question are drawn"
        x, y = aim["x"] + aim["width"] / 2, aim["y"] + aim["height"] / 2
        tab.mouse.move(x, y)
        ok(rt.host_call("answer_question", id=tall, answer="yes"))
        tab.wait_for_selector(f"#question-{tall}", state="detached", timeout=30_000)
        tab.wait_for_timeout(1500)  # past the 0.8 s a newly arrived button is held for
        under = tab.evaluate(
            "([x, y]) => { const e = document.elementFromPoint(x, y); const li = e && e.closest('li.item');"
            " return [e ? e.tagName : null, li ? li.id : null, window.scrollY]; }",
            [x, y],
        )
        tab.mouse.click(x, y)
        tab.wait_for_timeout(1000)
    finally:
        ctx.close()
    decided = {
        a: ok(rt.host_call("show_approval", id=a))["approval"]["status"]
        for a in (mule["id"], bob["id"])
    }
    assert under[:2] == ["BUTTON", f"approval-{bob['id']}"] and decided[mule["id"]] == "pending", (
        f"after question {tall} ({height['height']:.0f} px) went, the point aimed at"
        f" (rtbob's approve) is {under}; the click decided {decided}"
    )
    assert decided[bob["id"]] == "approved", decided


@pytest.mark.attack("surface.first-screen", ref=REF)
def test_an_open_agent_page_does_not_grow_without_bound_with_the_agents_output(
    rt: HiveProcess, web: Web, browser: Browser
) -> None:
    """The operator keeps rtmallory's page open. Its live stream appends each new batch
    of transcript entries to the page (``hx-swap="beforeend"``) and nothing ever takes
    old ones off: rtmallory's reminders to itself (its runtime is ``cat``) add about
    0.6 MB of text to the page per turn, as fast as turns run. The page the operator has
    open should stay within what it opens with (the reply budget, drawn twice)."""
    import time

    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        tab = ctx.new_page()
        tab.goto(web.login_url)
        tab.goto(web.url("/agent/rtmallory/"))
        wait_until(
            lambda: tab.evaluate("() => document.getElementById('live').textContent") == "live",
            30,
            "live",
        )
        start = tab.evaluate("document.getElementById('transcript').textContent.length")
        n = 40
        t0 = time.monotonic()
        out = cage_run(rt, "rtmallory", BIG.replace("-big ", "-grow "), n=n)["out"]
        assert all(r.get("ok") for r in out), out
        last = f"{n - 1}-grow "
        wait_until(
            lambda: tab.evaluate(
                "(s) => document.getElementById('transcript').textContent.includes(s)", last
            ),
            120,
            "the last turn on the open page",
        )
        took = time.monotonic() - t0
        size = tab.evaluate("document.getElementById('transcript').textContent.length")
        items = tab.evaluate("document.querySelectorAll('#transcript > li').length")
        t1 = time.monotonic()
        tab.evaluate("() => document.body.offsetHeight")  # a forced layout: what a click costs now
        layout = time.monotonic() - t1
    finally:
        ctx.close()
    print(
        f"transcript text on the open page: {start} -> {size} characters, {items} entries,"
        f" {took:.1f} s, a layout {layout:.2f} s"
    )
    assert size <= PAGE_BYTES_MAX, (
        f"the open agent page holds {size / (1 << 20):.1f} Mi characters of transcript in {items} entries"
        f" after {n} turns ({took:.0f} s; it opened with {start / (1 << 20):.1f} Mi), and grows with every turn"
    )


# -- right-to-left letters, no control character: numbers change places ---------------

VISUAL_ORDER = """([sel, needles]) => {
  // The left edge, on screen, of the first character of each needle in SEL's text.
  const el = document.querySelector(sel);
  const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  let node, text = "", nodes = [];
  while ((node = walker.nextNode())) { nodes.push([node, text.length]); text += node.data; }
  return needles.map((n) => {
    const at = text.indexOf(n);
    if (at < 0) return null;
    const [tn, base] = nodes.filter(([_, b]) => b <= at).pop();
    const r = document.createRange();
    r.setStart(tn, at - base);
    r.setEnd(tn, at - base + 1);
    return r.getBoundingClientRect().left;
  });
}"""


@pytest.mark.attack(
    "surface.terminal-injection", ref=REF + "; CVE-2021-42574 (Trojan Source) without its controls"
)
def test_rtl_letters_in_a_payload_do_not_reorder_what_the_operator_reads(
    rt: HiveProcess, web: Web, browser: Browser, cleanup: list[tuple[str, int]]
) -> None:
    """The hive escapes the bidi controls (overrides, embeddings, isolates, marks), but a
    strong right-to-left letter is ordinary text: between two Hebrew letters, the
    quotes, commas and numbers of a JSON array are neutral or weak and take the letters'
    direction. rtmule's payload ``{"pay":["א","100","5000000","ב"]}`` (as stored, as
    hashed, as approving applies it) is drawn in the approval's payload box with 5000000
    to the left of 100: the operator reads the amounts in the other order."""
    payload = {"pay": ["\u05d0", "100", "5000000", "\u05d1"]}
    a = cage_run(
        rt,
        FLOODER,
        """
c = Conn()
result(r=c.call({"cmd": "request_approval", "kind": "custom", "description": "pay the invoice",
                 "payload": P["payload"]}))
""",
        payload=payload,
    )["r"]
    assert a.get("ok"), a
    cleanup.append(("approval", a["id"]))
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        tab = ctx.new_page()
        tab.goto(web.login_url)
        tab.goto(web.url(f"/agent/{FLOODER}/"))
        sel = f"#approval-{a['id']} pre.payload"
        tab.wait_for_selector(sel)
        logical = tab.evaluate(f"document.querySelector({json.dumps(sel)}).textContent")
        left = tab.evaluate(VISUAL_ORDER, [sel, ['"100"', '"5000000"']])
    finally:
        ctx.close()
    assert logical.index('"100"') < logical.index('"5000000"'), logical
    assert None not in left, left
    assert left[0] < left[1], (
        f'payload {logical!r}: "100" is drawn at x={left[0]:.0f}, "5000000" at x={left[1]:.0f}:'
        " the operator reads 5000000 first"
    )
    # `hive show approval` (session 19): a terminal that lays out bidi text reorders the
    # same way, so the payload's right-to-left letters are printed as JSON escapes, said so
    shown = subprocess.run(
        [str(HIVE), "--run-dir", str(rt.run_dir), "show", "approval", str(a["id"])],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    lines = shown.splitlines()
    at = lines.index("payload (its right-to-left letters as \\u escapes, so nothing is reordered):")
    printed = lines[at + 1]
    assert printed == '{"pay":["\\u05d0","100","5000000","\\u05d1"]}', printed
    assert json.loads(printed) == payload and not re.search("[\u0590-\u08ff]", shown), shown


# -- redraws the agent asks for: the open dashboard kept busy --------------------------

PLANT_BIG = """
c = Conn()
out = []
for i in range(P["n"]):
    head = f"big question {i}: "
    out.append(c.call({"cmd": "ask", "to": "operator", "question": head + "q" * (P["chars"] - len(head)),
                       "options": [f"option {k} " + "o" * 4000 for k in range(50)]}))
result(out=out)
"""
STATUS_FLOOD = """
import time
c = Conn()
n, end, refused = 0, time.monotonic() + P["seconds"], 0
while time.monotonic() < end:
    r = c.call({"cmd": "set_status", "text": f"busy {n}"})
    n += 1
    refused += not r.get("ok")
    time.sleep(1 / P["rate"])
result(n=n, refused=refused)
"""
SAMPLE = """async (ms) => {
  // How late a 10 ms timer fires, for MS milliseconds: the main thread's free time.
  let updates = 0;
  const count = () => { updates += 1; };
  document.body.addEventListener("htmx:sseMessage", count);
  const gaps = [];
  let last = performance.now();
  const end = last + ms;
  await new Promise((done) => {
    const tick = () => {
      const now = performance.now();
      gaps.push(now - last);
      last = now;
      if (now < end) setTimeout(tick, 10); else done();
    };
    setTimeout(tick, 10);
  });
  document.body.removeEventListener("htmx:sseMessage", count);
  const late = gaps.filter((g) => g > 60);
  return {max: Math.max(...gaps), blocked: late.reduce((a, g) => a + g, 0) / ms, updates};
}"""


@pytest.mark.attack("surface.first-screen", ref=REF)
def test_an_agents_status_flood_keeps_no_open_dashboard_busy(
    rt: HiveProcess, web: Web, browser: Browser, cleanup: list[tuple[str, int]]
) -> None:
    """rtmule keeps 50 questions of the largest size open (the first screen's whole
    queue, within its quota), then sets its status 20 times a second (no quota: a status
    is one row it overwrites). Every status change touches the attention section
    (``TOUCHES["agent_status"]``), so every open dashboard gets the whole section (50
    cut questions with their options) and the agents table again, every 0.2 s, and
    morphs it in, though nothing in it changed but one status text. Held: the redraws are
    coalesced (at most 5 a second) and idiomorph's pass is cheap: about 24 redraws in 5 s,
    no timer late by more than ~40 ms."""
    import threading

    planted = cage_run(rt, FLOODER, PLANT_BIG, n=QUEUE_PAGE, chars=200_000, timeout=180)["out"]
    assert all(r.get("ok") for r in planted), [r for r in planted if not r.get("ok")][:2]
    cleanup += [("question", r["id"]) for r in planted]
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    flood: dict[str, Any] = {}
    try:
        tab = ctx.new_page()
        tab.goto(web.login_url)
        wait_until(
            lambda: tab.evaluate("() => document.getElementById('conn').dataset.state") == "live",
            30,
            "live",
        )
        # The quiet page's figures are only printed beside the busy ones (nothing is
        # asserted of them): a second of them, not three.
        quiet = tab.evaluate(SAMPLE, 1000)
        runner = threading.Thread(
            target=lambda: flood.update(cage_run(rt, FLOODER, STATUS_FLOOD, seconds=8, rate=20)),
            daemon=True,
        )
        runner.start()
        tab.wait_for_timeout(1500)
        busy = tab.evaluate(SAMPLE, 5000)
        runner.join(60)
    finally:
        ctx.close()
    print(f"quiet {quiet}; during rtmule's status flood {busy}; flood {flood}")
    assert flood.get("n", 0) > 50 and flood.get("refused") == 0, flood
    assert busy["blocked"] < 0.25 and busy["max"] < 500, (
        f"while rtmule sets its status 20 times a second, the operator's dashboard got {busy['updates']}"
        f" redraws in 5 s and its main thread was blocked {busy['blocked']:.0%} of the time (longest"
        f" {busy['max']:.0f} ms; quiet: {quiet['blocked']:.0%}, {quiet['max']:.0f} ms)"
    )

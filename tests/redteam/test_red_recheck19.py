"""Re-check of session 19's fixes (after test_red_diff19 and test_red_diff19b):
steady.js's give-back and its hold on a button "morphed into another", the inbox's counts,
NSS lookup slots and the claim's one deadline, and ``hive up``'s shared-address check.

Broke (each a failing test here):
- the claim's one deadline (``CLAIM_DEADLINE``) refuses the claim with
  ``HostLookupFailed`` and moves nothing: blocks it found held (a directory's range that
  it does not list) are walked again by every later claim. A directory range of ~800+
  blocks above the mark, each lookup answered in 25 ms, and no new agent ever gets ids
  (before: ``WalkedFar`` at 512 blocks moved the mark on, and the next claim got past).
  A batch claim (``claim_many``: the allocator's next batch, e.g. ``hive up`` of 32 new
  agents) of more blocks than the deadline has rounds for is refused whole, every time
  (``test_a_claim_past_its_deadline_still_makes_progress``);
- the claim's deadline does not count the wait for lookup slots (``SLOT_WAIT``, 30 s):
  with the slots held by lookups that have not come back, a claim holds the registry's
  host-wide lock up to 30 s + 10 s (``test_a_claims_wait_for_lookup_slots_is_within_its_deadline``);
- steady.js's key of a button (form action and hx-post, name, value, label) leaves out
  the form's hidden inputs: a morph under the resting pointer that changes only them
  (the inbox's "mark read" form's ``shown``, a swarm row's ``host``) is not held
  (``test_a_morph_of_a_forms_hidden_input_under_the_pointer_is_held``);
- a focused button morphed into another takes Enter at once (the hold is the pointer's
  only) (``test_a_focused_button_morphed_into_another_is_held_for_the_keyboard``);
- ``hive up``'s check: a host user's own copy of any binary, named ``nginx``, with
  ``/tmp/D/run/gateway`` a symlink to ``/etc/nginx`` (root's nginx.conf) in its command
  line, is "the hive of /tmp/D/run" (low: a warning)
  (``test_a_host_users_own_binary_named_nginx_is_not_taken_for_a_hives_gateway``), and
  50 forks of it at 20,000 descriptors hold ``hive up`` ~6 s: the 2 s bound covers
  finding gateways, not ``_holders``' read of their descriptors (low)
  (``test_a_host_users_renamed_binary_with_many_descriptors_does_not_hold_hive_up``).

All six fixed the same session: a claim cut by its deadline hands out the blocks it found
free, else moves the mark past those found held (``ClaimCut``, as ``WalkedFar``), and the
rest of a batch is refused alone ("start it again"); a claim's lookups wait for slots
within its deadline; "mark read" posts only ids on the page for 1 s (``MARK_READ_SETTLE``:
holding the button on every change of ``shown`` would let an agent's message every 0.8 s
hold it for good), so the bare-page morph case now shows the click taken and the hive case
``test_mark_read_takes_a_message_once_it_has_been_shown`` checks the fix; a focused button
morphed into another holds Enter and Space; only the host's own nginx binary, with a
``RUN/gateway`` of root's directories and no link, counts, and ``_holders`` has the deadline.

Held: the operator's own button, left where it was by redraws above (scrolled, padded)
and below, takes every click at once; a stream of redraws changing other items never
holds it; swarm rows of two hosts with the same id swapped by idiomorph are held; nss's
slots: a call of more lookups than the pool is answered in order and one raising fails it,
a 64-lookup call at the queue's head starves no 4-lookup start, every slot comes back; the
inbox's total (the senders' op_pending) is the messages held through floods, quota drops,
acks, a destroyed agent and a disk-full rollback, and unread is exact to its cap, cap + 1
past it.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page

from hive_fixture import HiveProcess
from hyperhive.priv import ids as ids_mod
from hyperhive.priv import nss
from web_fixture import browser  # noqa: F401 (fixture)

REF = "re-check of session 19's fixes: "
STEADY = Path(__file__).resolve().parents[2] / "src" / "hyperhive" / "core" / "static" / "steady.js"
VENDOR = STEADY.parent / "vendor"


# -- 3. the claim's one deadline ---------------------------------------------------------


def registry(held: object) -> ids_mod.HostRegistry:
    root = Path(tempfile.mkdtemp(prefix="rtrc19")) / "ids"
    return ids_mod.HostRegistry(root, ids_mod.HostIds(accounts=set, ranges=list, held=held))  # type: ignore[arg-type]


@pytest.mark.attack(
    "ids.host-unique", ref=REF + "the claim's deadline moves no mark over blocks found held"
)
def test_a_claim_past_its_deadline_still_makes_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory that does not list its users (getpwall sees none) holds 1,000 ids just
    above the registry's mark (500 blocks, under HELD_SKIPS_MAX), each lookup answered in
    5 ms; CLAIM_DEADLINE scaled to 1 s (as 10 s to ~25 ms a lookup: a slow LDAP).
    Before session 19's fix the claim walked the 500 held blocks (2.5 s) and handed out
    the next; now each claim walks ~200 of them, is refused at its deadline and moves
    nothing, so the next claim walks the same 200: no claim ever succeeds. And a batch of
    8 new agents past a free range, each block's lookups at 200 ms: refused whole, every
    time, though each of its blocks is free."""
    monkeypatch.setattr(ids_mod, "CLAIM_DEADLINE", 1.0)
    base = ids_mod.BASE_UID

    def directory(ids: Iterable[int], deadline: float) -> bool:
        time.sleep(0.005)
        return any(base <= i < base + 1000 for i in ids)

    reg = registry(directory)
    said = []
    for k in range(4):
        try:
            said.append(reg.claim(f"/srv/rt:rtnew{k}"))
            break
        except ids_mod.IdsExhausted as e:
            said.append(f"{type(e).__name__}: {e}")

    def slow(ids: Iterable[int], deadline: float) -> bool:
        time.sleep(0.2)
        return False

    batch = registry(slow)
    owners = [f"/srv/rt:rtb{k}" for k in range(8)]
    tries = []
    for _ in range(2):
        try:
            tries.append(batch.claim_many(owners))
            break
        except ids_mod.IdsExhausted as e:
            tries.append(f"{type(e).__name__}: {e}")
    walked = isinstance(said[-1], int) and said[-1] >= base + 1000
    batched = any(isinstance(t, list) for t in tries)
    assert walked and batched, (
        f"4 claims past a directory's range of 1,000 ids (5 ms a lookup, a 1 s deadline):"
        f" {said}; 2 claims of a batch of 8 free blocks (0.2 s a block's lookups): {tries}"
    )


@pytest.mark.attack(
    "budget.exhaustion", ref=REF + "the claim's deadline leaves out the wait for lookup slots"
)
def test_a_claims_wait_for_lookup_slots_is_within_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every one of nss's 64 slots is in a lookup that has not come back (a hung
    directory: other starts' lookups, left running past their own deadline). A claim
    then waits for slots (``_Slots.take``, up to SLOT_WAIT = 30 s) with the registry's
    host-wide lock held, and only then does its deadline start: here the hung lookups
    come back after 3 s and the claim (its deadline scaled to 1 s) takes 3 s."""
    monkeypatch.setattr(ids_mod, "CLAIM_DEADLINE", 1.0)
    release = threading.Event()

    def directory(kind: str, i: int) -> str | None:
        if i >= 9_000_000:
            release.wait(3.0)
        return None

    monkeypatch.setattr(nss, "name_of", directory)
    hung = [("uid", 9_000_000 + k) for k in range(nss.LOOKUP_THREADS)]
    with pytest.raises(nss.LookupFailed):
        nss.names_of(hung, deadline=0.2)  # refused; its 64 lookups keep their slots
    assert nss._slots.free == 0
    reg = ids_mod.HostRegistry(
        Path(tempfile.mkdtemp(prefix="rtrc19")) / "ids",
        ids_mod.HostIds(accounts=set, ranges=list),
    )
    t0 = time.monotonic()
    try:
        said: object = reg.claim("/srv/rt:rtslot")
    except ids_mod.IdsExhausted as e:
        said = f"{type(e).__name__}: {e}"
    took = time.monotonic() - t0
    release.set()
    deadline = time.monotonic() + 5
    while nss._slots.free < nss._slots.size and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nss._slots.free == nss._slots.size  # every slot back
    assert took < ids_mod.CLAIM_DEADLINE + 0.5, (
        f"with every lookup slot held, a claim (deadline {ids_mod.CLAIM_DEADLINE:g} s) held"
        f" the registry's lock {took:.1f} s: {said}"
    )


@pytest.mark.attack("budget.exhaustion", ref=REF + "a call asking more than the pool, in turns")
def test_a_call_of_more_lookups_than_the_pool_is_answered_and_gives_every_slot_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """200 lookups in one call (the pool is 64): split in turns, answered in order; one
    that raises (MemoryError) in the last turn fails the whole call, never None; after
    both, every slot is back and the FIFO queue is empty."""
    seen: list[tuple[str, int]] = []

    def directory(kind: str, i: int) -> str | None:
        seen.append((kind, i))
        if i == 8_000_199 and kind == "gid":
            raise MemoryError
        return f"n{i}" if i % 7 == 0 else None

    monkeypatch.setattr(nss, "name_of", directory)
    q = [("uid", 8_000_000 + k) for k in range(200)]
    got = nss.names_of(q, deadline=2.0)
    assert got == [f"n{i}" if i % 7 == 0 else None for _, i in q]
    with pytest.raises(nss.LookupFailed, match="failed \\(MemoryError\\)"):
        nss.names_of([*q, ("gid", 8_000_199)], deadline=2.0)
    time.sleep(0.2)
    assert nss._slots.free == nss._slots.size and not nss._slots._waiting


@pytest.mark.attack("budget.exhaustion", ref=REF + "a big caller at the slots' head")
def test_a_caller_at_the_head_of_the_queue_starves_no_one_past_slot_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """60 slots in lookups that come back in 1.5 s; a call of 64 lookups queues first
    (it needs every slot), then a start's 4: the start waits behind it (first come first
    served) but both are answered once the slow lookups are back, neither refused busy,
    and no slot is lost."""
    gate = threading.Event()

    def directory(kind: str, i: int) -> str | None:
        if i >= 9_100_000:
            gate.wait(1.5)
        return None

    monkeypatch.setattr(nss, "name_of", directory)
    with pytest.raises(nss.LookupFailed):
        nss.names_of([("uid", 9_100_000 + k) for k in range(60)], deadline=0.1)
    out: dict[str, object] = {}

    def ask(tag: str, n: int) -> None:
        t0 = time.monotonic()
        try:
            r: object = nss.names_of([("gid", 100 + k) for k in range(n)], deadline=2.0)
        except nss.LookupFailed as e:
            r = str(e)
        out[tag] = (r, round(time.monotonic() - t0, 1))

    big = threading.Thread(target=ask, args=("big", 64))
    big.start()
    time.sleep(0.1)
    small = threading.Thread(target=ask, args=("small", 4))
    small.start()
    big.join(10)
    small.join(10)
    gate.set()
    assert out["big"][0] == [None] * 64 and out["small"][0] == [None] * 4, out  # type: ignore[index]
    time.sleep(0.2)
    assert nss._slots.free == nss._slots.size and not nss._slots._waiting


# -- 1. steady.js: a button "morphed into another" ---------------------------------------

PAGE = """<html><body style="margin:0"><div id="above"></div>
<div id="inbox"><form id="f" action="/inbox/read" hx-post="/inbox/read"
 onsubmit="event.preventDefault(); window.posted.push([this.getAttribute('action'),
 new FormData(this).get('shown'), new FormData(this).get('host')])">
<input type="hidden" name="host" value="hosta"><input type="hidden" name="shown" value="1,2">
<button id="b" style="height:30px">mark read</button></form></div>
<div id="below" style="height:900px"></div>
<script>window.posted = []; window.told = [];</script><script>%s</script>
<script>window.hiveSteady(function (text) { window.told.push(text); });</script></body></html>"""
REDRAW = """([name, value]) => {
  // a live redraw as htmx's SSE extension frames it; idiomorph keeps the form and button
  document.body.dispatchEvent(new Event("htmx:sseBeforeMessage"));
  const input = document.querySelector("#f input[name=" + name + "]");
  input.setAttribute("value", value); input.value = value;
  document.body.dispatchEvent(new Event("htmx:sseMessage"));
}"""


@pytest.fixture
def tab(browser: Browser) -> Iterator[Page]:
    ctx = browser.new_context(viewport={"width": 600, "height": 400})
    try:
        page = ctx.new_page()
        page.set_content(PAGE % STEADY.read_text())
        yield page
    finally:
        ctx.close()


def rest_on(tab: Page, sel: str = "#b") -> tuple[float, float]:
    box = tab.locator(sel).bounding_box()
    assert box
    x, y = box["x"] + 5, box["y"] + 10
    tab.mouse.move(x, y)
    return x, y


SWARM = """<html><head><script>%s</script><script>%s</script></head>
<body style="margin:0" hx-ext="morph"><ul id="queue">%s</ul>
<script>window.posted = []; window.told = [];
document.addEventListener("submit", (e) => { e.preventDefault();
  window.posted.push([e.target.getAttribute("action"), new FormData(e.target).get("host"), new FormData(e.target).get("shown")]); });
</script><script>%s</script>
<script>window.hiveSteady(function (text) { window.told.push(text); });</script></body></html>"""
MORPH_INTO = """([id, html]) => {
  // a live redraw as htmx's SSE extension frames it, morphed by the page's idiomorph
  document.body.dispatchEvent(new Event("htmx:sseBeforeMessage"));
  Idiomorph.morph(document.getElementById(id), html);
  document.body.dispatchEvent(new Event("htmx:sseMessage"));
}"""
ROW = """<li id="approval-{h}-5" class="item"><p>approval 5 on host {h}</p>
<form method="post" action="/approve/5" hx-post="/approve/5" class="approve">
<input type="hidden" name="host" value="{h}"><input type="hidden" name="payload_sha256" value="{s}">
<button>approve</button></form></li>"""


INBOX = """<section id="inbox"><h2>Inbox <span id="inbox-unread">{n} unread</span></h2>
<form method="post" action="/inbox/read" hx-post="/inbox/read" class="inline">
<input type="hidden" name="shown" value="{shown}"><button>mark read</button></form>
<ol id="inbox-list">{rows}</ol></section>"""


def inbox(ids: list[int]) -> str:
    rows = "".join(
        f'<li id="inbox-{i}" class="unread">message {i} from rtmule</li>' for i in ids[::-1]
    )
    return INBOX.format(n=len(ids), shown=",".join(map(str, ids)), rows=rows)


@pytest.mark.attack(
    "surface.first-screen", ref=REF + "a morph changing only a form's hidden input is not held"
)
def test_a_morph_of_a_forms_hidden_input_under_the_pointer_is_held(browser: Browser) -> None:
    """The pointer rests on the inbox's "mark read" (its form's hidden ``shown``: the ids
    the page shows; the newest message drawn first, below the button). An agent's message
    arrives: the page's own idiomorph keeps the form and the button (same action, label,
    place) and changes ``shown`` to take the new message in; the operator's click a
    moment later marked it read, unseen (its row was drawn ~ms before). steady.js's key of
    a button (whatIs) holds the form's action and hx-post, the button's name, value and
    label: not what the form sends besides (low: a message marked read stays listed).

    Fixed on the server (holding "mark read" on every change of ``shown`` would let an
    agent's message every 0.8 s hold it for good): ``shown`` takes a message once it has
    been on the page ``MARK_READ_SETTLE`` (1 s); the morph here keeps the button, and the
    click is the operator's (``test_mark_read_takes_a_message_once_it_has_been_shown``)."""
    htmx = (VENDOR / "htmx-2.0.11.min.js").read_text()
    morph = (VENDOR / "idiomorph-ext-0.7.4.min.js").read_text()
    ctx = browser.new_context(viewport={"width": 600, "height": 400})
    try:
        tab = ctx.new_page()
        tab.set_content(SWARM % (htmx, morph, inbox([1, 2]), STEADY.read_text()))
        x, y = rest_on(tab, "#inbox button")
        tab.evaluate("window.b0 = document.querySelector('#inbox button')")
        tab.evaluate(MORPH_INTO, ["inbox", inbox([1, 2, 3])])
        same = tab.evaluate("window.b0 === document.querySelector('#inbox button')")
        under = tab.evaluate("([x, y]) => document.elementFromPoint(x, y).textContent", [x, y])
        tab.mouse.click(x, y)
        tab.wait_for_timeout(50)
        posted, told = tab.evaluate("window.posted"), tab.evaluate("window.told")
    finally:
        ctx.close()
    assert same and under == "mark read", (same, under)  # the same element, unmoved
    assert posted == [["/inbox/read", None, "1,2,3"]] and told == [], (posted, told)


@pytest.mark.attack(
    "surface.first-screen", ref=REF + "the inbox's mark-read ids take a message just drawn"
)
def test_mark_read_takes_a_message_once_it_has_been_shown(rt: HiveProcess) -> None:
    """The fix of the case above: a message to the operator is on the page at once, but
    not among the ids "mark read" posts until it has been there 1 s."""
    import re

    from web_fixture import Web

    web = Web(rt)
    login = web.login()
    mid = rt.agent_call("rtalice", "send", to="operator", body="just now")["id"]

    def shown() -> tuple[bool, list[str]]:
        page = web.get("/", login=login).text
        m = re.search(r'name="shown" value="([\d,]*)"', page)
        return f'id="inbox-{mid}"' in page, (m.group(1).split(",") if m else [])

    drawn, ids = shown()
    assert drawn and str(mid) not in ids, ids
    time.sleep(1.2)
    drawn, ids = shown()
    assert drawn and str(mid) in ids, ids


@pytest.mark.attack(
    "surface.first-screen", ref=REF + "a focused button morphed into another takes Enter"
)
def test_a_focused_button_morphed_into_another_is_held_for_the_keyboard(tab: Page) -> None:
    """The operator tabbed to a button (the pointer off the page) and presses Enter; just
    before, a redraw morphs that button in place into another action (the agents row's
    "restart" becoming "destroy": the same element, kept focused by idiomorph). The hold
    watches the pointer only: the keypress goes to the new action at once."""
    tab.mouse.move(300, -10)
    tab.focus("#b")
    tab.evaluate("""() => {
      document.body.dispatchEvent(new Event("htmx:sseBeforeMessage"));
      const f = document.getElementById("f");
      f.setAttribute("action", "/api/agents/rtmule/destroy");
      f.setAttribute("hx-post", "/api/agents/rtmule/destroy");
      document.getElementById("b").textContent = "destroy";
      document.body.dispatchEvent(new Event("htmx:sseMessage"));
    }""")
    tab.keyboard.press("Enter")
    tab.wait_for_timeout(50)
    posted, told = tab.evaluate("window.posted"), tab.evaluate("window.told")
    assert posted == [] and len(told) == 1, (
        f"Enter on the focused button right after a morph changed it into 'destroy': posted"
        f" {posted}, told {told}"
    )


STEPS = """(step) => {
  document.body.dispatchEvent(new Event("htmx:sseBeforeMessage"));
  const above = document.getElementById("above"), below = document.getElementById("below");
  const add = (where, h) => { const d = document.createElement("div"); d.className = "it";
    d.id = "it" + Math.random().toString(36).slice(2); d.style.height = h + "px";
    where.appendChild(d); };
  if (step === "add-above") add(above, 137);
  if (step === "drop-above" && above.lastChild) above.lastChild.remove();
  if (step === "add-below") add(below, 211);
  if (step === "drop-below" && below.lastChild) below.lastChild.remove();
  if (step === "label-elsewhere") document.getElementById("below").dataset.n = Math.random();
  document.body.dispatchEvent(new Event("htmx:sseMessage"));
}"""


@pytest.mark.attack(
    "surface.first-screen", ref=REF + "the operator's own unmoved button under agent redraws"
)
def test_the_operators_unmoved_button_takes_every_click_through_redraws(tab: Page) -> None:
    """The pointer rests on "mark read" at the page's top. Agent-driven redraws: items
    added above (scrolled by their height), dropped above at the top (padded), added and
    dropped below, attributes elsewhere, several at once, every 100 ms; after each, the
    operator clicks: the button is still under the pointer and every click is taken (the
    hold never lands on a button that did not move or change), and once the pointer
    leaves, no padding is left."""
    x, y = rest_on(tab)
    steps = ["add-above", "drop-above", "add-below", "drop-below", "label-elsewhere"] * 3
    steps += ["drop-above", "drop-above", "add-above", "add-above", "drop-above"]
    under = []
    for step in steps:
        tab.evaluate(STEPS, step)
        tab.wait_for_timeout(100)
        under.append(tab.evaluate("([x, y]) => document.elementFromPoint(x, y).id", [x, y]))
        tab.mouse.click(x, y)
    tab.wait_for_timeout(50)
    posted, told = tab.evaluate("window.posted"), tab.evaluate("window.told")
    tab.mouse.move(300, -10)
    tab.wait_for_timeout(100)
    pads = tab.evaluate(
        "[document.documentElement.style.paddingTop, document.documentElement.style.paddingBottom]"
    )
    assert under == ["b"] * len(steps), list(zip(steps, under, strict=True))
    assert told == [] and len(posted) == len(steps), (told, posted)
    assert pads == ["", ""], pads


@pytest.mark.attack(
    "surface.first-screen", ref=REF + "two hosts' approvals of one id swapped by idiomorph"
)
def test_two_hosts_rows_of_one_id_swapped_by_idiomorph_are_held(browser: Browser) -> None:
    """The dashboard's queue morphed by the page's own idiomorph (vendor/): host A's
    approval 5 under the pointer leaves and host B's approval 5 takes its place (same
    action ``/approve/5``, label, place). The rows' ids carry the host, so idiomorph
    draws a new button (not a morph of A's): held, the click does nothing."""
    htmx = (VENDOR / "htmx-2.0.11.min.js").read_text()
    morph = (VENDOR / "idiomorph-ext-0.7.4.min.js").read_text()
    ctx = browser.new_context(viewport={"width": 600, "height": 400})
    try:
        tab = ctx.new_page()
        tab.set_content(
            SWARM % (htmx, morph, ROW.format(h="hosta", s="a" * 64), STEADY.read_text())
        )
        x, y = rest_on(tab, "#queue button")
        tab.evaluate(
            MORPH_INTO, ["queue", "<ul id='queue'>" + ROW.format(h="hostb", s="b" * 64) + "</ul>"]
        )
        assert tab.evaluate("document.querySelector('#queue li').id") == "approval-hostb-5"
        tab.mouse.click(x, y)
        tab.wait_for_timeout(50)
        posted, told = tab.evaluate("window.posted"), tab.evaluate("window.told")
    finally:
        ctx.close()
    assert posted == [] and len(told) == 1, (posted, told)


# -- 2. the inbox's counts ---------------------------------------------------------------


@pytest.mark.attack("surface.first-screen", ref=REF + "the inbox's total against what is held")
def test_the_inbox_total_is_the_messages_held_through_floods_drops_and_destroys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five agents at a small quota (50 rows) send the operator and each other, their
    quotas drop their oldest, one is destroyed (its inbox goes, its messages to the
    operator stay), agent-to-agent messages are acked, a send past the disk's room fails
    mid-transaction (rolled back): after each, store.usage.to_operator() is the count of
    messages to the operator, and unread() (capped at UNREAD_COUNTED, here 120) is exact
    below the cap and cap + 1 past it."""
    from hyperhive.core.store import Store
    from hyperhive.core.store import inbox as inbox_module
    from hyperhive.core.store.common import StoreError
    from hyperhive.core.store.messages import ack_in

    monkeypatch.setattr(inbox_module, "UNREAD_COUNTED", 120)
    store = Store(tmp_path / "hive.db")
    quota = (50, 1 << 30)
    names = [f"rtq{k}" for k in range(5)]
    seen = []

    def check(tag: str) -> None:
        real = store.db.conn.execute(
            "SELECT count(*) FROM messages WHERE recipient='operator'"
        ).fetchone()[0]
        mark, read = store.inbox_read.state()
        unread = store.db.conn.execute(
            "SELECT count(*) FROM messages WHERE recipient='operator' AND id>?", (mark,)
        ).fetchone()[0] - len(read)
        seen.append((tag, store.usage.to_operator(), real, store.inbox_read.unread(), unread))

    try:
        for r in range(3):
            for k, n in enumerate(names):
                batch = [("operator", n, "message", f"{n} {r} {i}") for i in range(20 + 7 * k)]
                batch += [(names[(k + 1) % 5], n, "message", f"to peer {i}") for i in range(9)]
                store.messages.send_many(batch, quota=quota)
            check(f"round {r}")
        peer = [
            int(x[0])
            for x in store.db.conn.execute("SELECT id FROM messages WHERE recipient='rtq1'")
        ]
        with store.db.tx() as tx:
            ack_in(tx, "rtq1", peer)
        check("acked")
        store.agents.delete("rtq2")
        check("destroyed")
        ops = [
            int(x[0])
            for x in store.db.conn.execute(
                "SELECT id FROM messages WHERE recipient='operator' ORDER BY id LIMIT 30"
            )
        ]
        store.inbox_read.take(ops)
        check("read some")
        store.db.conn.execute(
            "PRAGMA max_page_count="
            + str(store.db.conn.execute("PRAGMA page_count").fetchone()[0] + 2)
        )
        with pytest.raises(StoreError, match="disk is full"):
            store.messages.send_many(
                [("operator", "rtq0", "message", "x" * 20000) for _ in range(40)], quota=quota
            )
        check("disk full")
    finally:
        store.close()
    for tag, total, real, unread, exact in seen:
        assert total == real, (tag, seen)
        assert unread == (exact if exact <= 120 else 121), (tag, seen)


# -- 4. hive up: another hive's gateway on the same address ------------------------------

FAKE_NGINX = """
import socket, subprocess, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1)
exe, conf = sys.argv[1], sys.argv[2]
kid = subprocess.Popen([conf, "120"], executable=exe, pass_fds=[s.fileno()])
print(s.getsockname()[1], flush=True)
time.sleep(120)
"""


@pytest.mark.attack(
    "launcher.second-hive", ref=REF + "a host user's renamed binary and a symlinked gateway dir"
)
def test_a_host_users_own_binary_named_nginx_is_not_taken_for_a_hives_gateway() -> None:
    """User nobody copies ``sleep`` to a file of its own named ``nginx`` (so
    ``/proc/PID/exe``'s basename is "nginx"), makes ``/tmp/D/srv/prod/run/gateway`` a
    symlink to ``/etc/nginx`` (root's ``nginx.conf`` is there: ``lstat`` of the
    last component follows the directory symlink), and runs it with
    ``/tmp/D/srv/prod/run/gateway/nginx.conf`` in its command line, holding a socket
    listening on 127.0.0.1. Root's ``hive up`` then names "the hive of
    /tmp/D/srv/prod/run" as serving on its address: the check's three conditions, each
    a host user's to meet (low: a warning only)."""
    import os
    import shutil
    import subprocess
    import sys

    from hyperhive.cli.up import hives_sharing_address

    assert Path("/etc/nginx/nginx.conf").stat().st_uid == 0
    base = Path(tempfile.mkdtemp(prefix="rtrc19up", dir="/tmp"))
    os.chmod(base, 0o755)
    mine = base / "u"
    mine.mkdir()
    shutil.chown(mine, "nobody", "nogroup")
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    run = mine / "srv" / "prod" / "run"
    setup = f"mkdir -p {run} && cp /usr/bin/sleep {mine}/nginx && ln -s /etc/nginx {run}/gateway"
    subprocess.run([*nobody, "sh", "-c", setup], check=True)
    proc = subprocess.Popen(
        [*nobody, sys.executable, "-I", "-c", FAKE_NGINX, str(mine / "nginx"),
         f"{run}/gateway/nginx.conf"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        found = hives_sharing_address("127.0.0.1:1")
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
        shutil.rmtree(base, ignore_errors=True)
    assert (str(run), port) not in found, (
        f"user nobody's copy of sleep named nginx, on 127.0.0.1:{port}, is reported as the"
        f" gateway of the hive of {run} (a symlink to /etc/nginx of its own): {found}"
    )


@pytest.mark.attack(
    "launcher.readiness", ref=REF + "the descriptor scan's 2 s bound against renamed binaries"
)
def test_a_host_users_renamed_binary_with_many_descriptors_does_not_hold_hive_up() -> None:
    """The same renamed binary (here Python, copied to a file ``nginx`` of nobody's), with
    the symlinked ``RUN/gateway`` in its command line, at its 20,000 descriptors, and 50
    forks of it: every one passes ``_hive_gateways`` (cheap), and ``_holders`` then reads
    their ~1 M descriptors with no deadline (the 2 s is ``_hive_gateways``' only): root's
    ``hive up`` is held seconds (5,000 forks: minutes), as before session 19's fix."""
    import os
    import shutil
    import subprocess
    import sys

    from hyperhive.cli.up import hives_sharing_address

    from .test_red_diff19b import MANY_FDS

    base = Path(tempfile.mkdtemp(prefix="rtrc19fd", dir="/tmp"))
    os.chmod(base, 0o755)
    mine = base / "u"
    mine.mkdir()
    shutil.chown(mine, "nobody", "nogroup")
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    run = mine / "run"
    real = os.path.realpath(sys.executable)
    setup = f"mkdir -p {run} && cp {real} {mine}/nginx && ln -s /etc/nginx {run}/gateway"
    subprocess.run([*nobody, "sh", "-c", setup], check=True)
    proc = subprocess.Popen(
        [*nobody, str(mine / "nginx"), "-I", "-c", MANY_FDS, "50", f"{run}/gateway/nginx.conf"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        t0 = time.monotonic()
        found = hives_sharing_address("127.0.0.1:1")
        took = time.monotonic() - t0
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
        shutil.rmtree(base, ignore_errors=True)
    # (fixed since: the renamed binary is no gateway, and _holders has the deadline too)
    assert (str(run), port) not in found, found
    assert took < 2.5, (
        f"hive up's shared-address check took {took:.1f} s: 51 processes of nobody's own"
        f" binary named nginx, ~1 M descriptors (its 2 s bound is for finding gateways only)"
    )

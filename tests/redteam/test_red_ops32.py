"""Red team round 32, area "ops": everything the operator sees and does, with data a
hostile agent writes (the web UI and its streams, ``/api``, the ``hive`` CLI's output,
notifications), and what it costs the core to show it. Played from inside real cages as
the agent's runtime uid (``cage_run``), against a whole hive behind its gateway. Run
against 633aa85 on a shared 2-core machine.

Broke (each a failing case here):
- ``/api/messages/{id}``, ``/api/questions/{id}``, ``/api/approvals/{id}`` and
  ``/api/agents/{name}/transcript`` answer through FastAPI's own JSON encoder
  (``ensure_ascii=False``), not ``display.dumps_bytes``: an agent's C1 controls (``\\x9b``
  is a CSI), bidi overrides (U+202E) and U+2028 reach the operator's ``curl`` (and the
  browser's JSON view of "the exact payload approving applies") raw, while ``/api/state``,
  ``/api/questions`` and ``/agent/NAME/state`` escape the same text (low;
  ``test_one_item_json_escapes_what_the_listings_escape``);
- ``hive pending`` prints an approval's payload with its right-to-left letters raw
  (``{"pay": ["א", "100", "5000000", "ב"]}``): the reordering session 19 closed in
  ``hive show approval`` (``display.left_to_right_json_text``) is still in the listing
  the operator approves from (low-medium;
  ``test_hive_pending_draws_a_payload_in_stored_order``);
- an option button's ``value`` goes through ``visible`` like every ``{{ … }}``: an
  option with a right-to-left mark (common in RTL text) or a CR is answered with its
  escape (``\\u200f…``), none of the options the agent offered (low;
  ``test_an_option_button_answers_with_the_option``);
- ``hive status --watch`` and ``hive events`` print one line per change, newline
  escaped, but never cut: an agent pads its status (4,096 characters) or a message (200
  shown) to the 80th column and writes rows of its own after it; an 80-column terminal
  wraps them into rows drawn exactly as another agent's change (``opsok: stopped``) or an
  event line (``... approval opsok #1 custom approved``) (low-medium;
  ``test_status_watch_rows_are_the_hives``, ``test_events_rows_are_the_hives``);
- the dashboard's egress log (``/api/state`` ``egress_log``, the "log" section) is the
  newest 100 decisions of all agents: one agent's refused CONNECTs (~170 a second at the
  proxy's pace, 507 in 3 s) push every other agent's decisions off it within a second
  (low; ``test_one_agents_refusals_do_not_push_anothers_off_the_dashboard``);
- the agent page draws a tool call's input indented (``http.readable``'s ``folded``,
  ``display.dumps(..., indent=2)``) in the core's event loop: a model's tool call whose
  input nests 41 deep around 7,900 zeros is a 16 KB stream-json line (within the
  harness's 16 Ki characters and 48 levels), ~680 KB of HTML; 200 of them (four turns)
  and opening ``/agent/opsbig/`` rendered 135 MB of HTML in 3.2 s, another agent's
  ``whoami`` waited 2.9 s, the core's peak memory went 100 -> 493 MiB (the live stream
  renders each new batch the same way) (medium;
  ``test_an_agent_page_costs_the_core_what_its_transcript_holds``);
- every status event counts every pending reminder of every agent
  (``ReminderRepo.pending``: ``SELECT agent, COUNT(*) ... GROUP BY agent``, a scan of the
  whole table through ``reminders_agent``), on each ``set_status``, ``remind``,
  ``agent_status``, agent page redraw and harness report; agents that fill their quota
  (10,000 reminders each, a year ahead) make every other agent's ``set_status`` and the
  operator's ``hive status`` cost milliseconds each, growing with the hive's total
  (here 2 x 10,000: 0.06 -> 2.95 ms a set_status, 0.14 -> 3.12 ms an agent_status; by
  hand 4 x 10,000: 5.6 ms, and 16 connections of one agent flipping its status then held
  another agent's ``whoami`` at 86 ms p50, host.sock's ``agent_status`` at 135 ms; in
  SQLite alone 25 ms a count at 100,000 rows, 74 ms at 1,000,000; each ``remind`` is a
  count too: filling 3 x 10,000 took 94 s) (medium;
  ``test_pending_reminders_do_not_tax_every_status``).

Held (passing cases): SSE framing of agent text (CR, LF, CRLF, U+2028, NUL and a forged
``event:``/``data:`` in a status, a question and a message body: only the core's event
names, no agent tag in an HTML data line, each JSON data line one value); the dashboard,
an agent page, "show all" and the three live streams carry no raw ESC, C1, bidi override
or U+2028.
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hive_fixture import HIVE, HiveProcess, running_hive
from web_fixture import Login, Web

from .conftest import cage_run

REF = "red team round 32 (ops): what the operator sees of an agent's text, and its cost"
AGENTS: dict[str, dict[str, Any]] = {
    "opsev": {"runtime": "command", "command": ["true"]},  # the hostile agent
    "opsev2": {"runtime": "command", "command": ["true"]},  # a second one (reminders)
    "opsok": {"runtime": "command", "command": ["true"]},  # an innocent agent
    "opscat": {"runtime": "command", "command": ["cat"]},  # echoes its turns (transcript)
    # A claude runtime whose CLI is a stand-in in its home: it prints what the model's
    # turn would (stream-json lines), here tool calls whose input nests 41 deep.
    "opsbig": {"runtime": "claude", "command": ["/home/agent/fake-claude"]},
}
# Only the rate is raised, so that filling a quota takes seconds, not minutes: the quota
# itself ([limits] agent_pending_max, 10,000) is the default.
LIMITS = {"messages_per_second": 100_000, "message_burst": 100_000}
EVIL = "A\u202eB\x9b31mC\u2028D\x1b[2J\rE\nF\x00G"
RAW_UNSAFE = [b"\xc2\x9b", "\u202e".encode(), "\u2028".encode()]  # as UTF-8 on the wire


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(AGENTS, sections={"limits": LIMITS}))


@pytest.fixture(scope="module")
def web(hive: HiveProcess) -> Web:
    return Web(hive)


@pytest.fixture(scope="module")
def login(web: Web) -> Login:
    return web.login()


def as_agent(hive: HiveProcess, name: str, *reqs: dict[str, Any]) -> list[dict[str, Any]]:
    """Each request on ``name``'s agent.sock, from inside its cage (the runtime uid)."""
    out = cage_run(hive, name, "c = Conn()\nresult(r=[c.call(q) for q in P['reqs']])", reqs=list(reqs))
    return list(out["r"])


def hive_cli(hive: HiveProcess, *args: str) -> str:
    return subprocess.run(
        [str(HIVE), "--run-dir", str(hive.run_dir), *args],
        capture_output=True, text=True, timeout=60, check=True, env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"},
    ).stdout  # fmt: skip


def strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value (and, for a JSON text inside one, its strings too)."""
    if isinstance(value, str):
        yield value
        try:
            inner = json.loads(value)
        except ValueError:
            return
        if not isinstance(inner, str):
            yield from strings(inner)
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


# -- 1. one item's JSON: the same escapes as the listings -------------------------------


@pytest.mark.attack("surface.terminal-injection", ref=REF + ": /api/{messages,questions,approvals}/{id}")
def test_one_item_json_escapes_what_the_listings_escape(hive: HiveProcess, web: Web, login: Login) -> None:
    """opsev writes C1 controls, a bidi override and U+2028 into a message to the
    operator, a question (and its option) and an approval's description and payload;
    the operator sends opscat (which echoes) a message with the same text, so its
    transcript holds it too. Every JSON the operator's origin serves about them should
    write those characters as JSON escapes, as /api/state does (docs/security.md, "The
    operator's web surface": "its bytes are safe on a terminal too (curl /api/state)").
    Today the one-item routes and the transcript route answer through FastAPI's encoder
    and send them raw."""
    m, q, a = as_agent(
        hive, "opsev",
        {"cmd": "send", "to": "operator", "body": EVIL},
        {"cmd": "ask", "to": "operator", "question": EVIL, "options": [EVIL, "no"]},
        {"cmd": "request_approval", "kind": "custom", "description": EVIL, "payload": {"k": EVIL}},
    )  # fmt: skip
    assert m["ok"] and q["ok"] and a["ok"], (m, q, a)
    assert hive.host_call("send", to="opscat", body=EVIL)["ok"]
    transcript = "/api/agents/opscat/transcript"

    def echoed() -> bool:
        entries = web.get(transcript, login=login).json().get("entries", [])
        return any(e["kind"] == "stdout" for e in entries)

    deadline = time.monotonic() + 30
    while not echoed():
        assert time.monotonic() < deadline, "opscat never echoed its turn"
        time.sleep(0.2)
    # The listings: held.
    for path in ("/api/state", "/api/questions", "/api/approvals", "/agent/opsev/state"):
        r = web.get(path, login=login)
        assert r.status_code == 200, (path, r.status_code)
        assert not [u for u in RAW_UNSAFE if u in r.content], (path, r.content[:300])
    raw: dict[str, list[bytes]] = {}
    for path in (f"/api/messages/{m['id']}", f"/api/questions/{q['id']}", f"/api/approvals/{a['id']}", transcript):
        r = web.get(path, login=login)
        assert r.status_code == 200, (path, r.status_code)
        found = [u for u in RAW_UNSAFE if u in r.content]
        if found:
            raw[path] = found
        assert any(EVIL in text for text in strings(r.json())), path  # the agent's text, whole
    assert not raw, f"raw C1 / bidi / U+2028 bytes in what the operator's origin serves: {raw}"


@pytest.mark.attack("surface.terminal-injection", ref=REF + ": the pages and their streams (held)")
def test_pages_and_streams_escape_agent_text(hive: HiveProcess, web: Web, login: Login) -> None:
    """The same text in opsev's status, a question, a message and an approval: the
    dashboard, opsev's page, a row's "show all" and the three live streams carry no raw
    C1 control, bidi override or U+2028, and no raw ESC (held)."""
    m, q, a, s = as_agent(
        hive, "opsev",
        {"cmd": "send", "to": "operator", "body": EVIL + "x" * 3000},
        {"cmd": "ask", "to": "operator", "question": EVIL, "options": [EVIL]},
        {"cmd": "request_approval", "kind": "custom", "description": EVIL, "payload": {"k": EVIL}},
        {"cmd": "set_status", "text": EVIL},
    )  # fmt: skip
    assert m["ok"] and q["ok"] and a["ok"] and s["ok"], (m, q, a, s)
    unsafe = [*RAW_UNSAFE, b"\x1b"]
    for path in ("/", "/agent/opsev/", f"/cockpit/messages/{m['id']}", f"/cockpit/questions/{q['id']}",
                 f"/cockpit/approvals/{a['id']}"):  # fmt: skip
        r = web.get(path, login=login)
        assert r.status_code == 200, (path, r.status_code)
        assert not [u for u in unsafe if u in r.content], path
    for path in ("/api/dashboard/stream?view=html", "/api/dashboard/stream", "/agent/opsev/events"):
        again = {"cmd": "set_status", "text": EVIL + path}  # a new text: an event each time
        raw = read_stream(web, login, path, 1.5, lambda again=again: as_agent(hive, "opsev", again))
        assert b"opsev" in raw, (path, raw[:300])
        assert not [u for u in unsafe if u in raw], path


# -- 2. hive pending: a payload's right-to-left letters -------------------------------------


@pytest.mark.attack("surface.terminal-injection", ref=REF + "; CVE-2021-42574 without its controls, in hive pending")
def test_hive_pending_draws_a_payload_in_stored_order(hive: HiveProcess) -> None:
    """opsev asks approval for ``{"pay": ["א", "100", "5000000", "ב"]}``: no control
    character, but on a terminal that lays out bidi text the numbers between the two
    Hebrew letters are drawn right to left (5000000 first). ``hive show approval`` prints
    the letters as JSON escapes since session 19; ``hive pending``, the listing with the
    payload and its sha256 that the operator approves from, should as well."""
    payload = {"pay": ["\u05d0", "100", "5000000", "\u05d1"]}
    (a,) = as_agent(hive, "opsev", {"cmd": "request_approval", "kind": "custom", "description": "pay the invoice",
                                    "payload": payload})  # fmt: skip
    assert a["ok"], a
    try:
        shown = hive_cli(hive, "show", "approval", str(a["id"]))
        assert not re.search("[\u0590-\u08ff]", shown), shown  # held (session 19)
        listed = hive_cli(hive, "pending")
        row = [line for line in listed.splitlines() if "5000000" in line]
        assert row, listed
        assert not re.search("[\u0590-\u08ff]", "\n".join(row)), (
            f"hive pending draws the payload with its right-to-left letters raw: {row[0].strip()!r}"
        )
    finally:
        hive.host_call("deny", id=a["id"])


# -- 3. an option's button answers with its escape, not the option ----------------------------


@pytest.mark.attack("surface.first-screen", ref=REF + ": an option button's value is the option as escaped for display")
def test_an_option_button_answers_with_the_option(hive: HiveProcess, web: Web, login: Login) -> None:
    """opsok (an honest agent) asks the operator with options in Hebrew, the first
    starting with a right-to-left mark as RTL text often does (U+200F), and one with a
    carriage return. Every ``{{ … }}`` goes through ``visible`` (Jinja's ``finalize``),
    the option buttons' ``value`` attributes too, so the first button posts the six
    characters ``\\u200f`` and the Hebrew word: the operator clicks the option and the
    agent gets an answer that is none of its options (and ``check_options`` would have
    refused it typed). A button should answer with the option exactly (its label may
    show the escape)."""
    options = ["\u200f\u05db\u05df", "line\rfeed", "no"]
    (q,) = as_agent(hive, "opsok", {"cmd": "ask", "to": "operator", "question": "proceed?", "options": options})
    assert q["ok"], q
    try:
        page = web.get("/", login=login).text
        item = re.search(rf'id="question-{q["id"]}".*?</li>', page, re.S)
        assert item, page[:500]
        # (since session 32 a button posts its option as a JSON string, ``option``)
        values = [json.loads(html.unescape(v)) for v in re.findall(r"name=\"option\" value='([^']*)'", item.group(0))]
        assert len(values) == len(options), values
        wrong = [(v, o) for v, o in zip(values, options, strict=True) if v != o]
        assert not wrong, f"option buttons that answer with something else (posted, offered): {wrong}"
    finally:
        hive.host_call("answer_question", id=q["id"], answer="no")


# -- held: SSE framing, the pages, hive events ----------------------------------------------


def sse_events(raw: bytes) -> list[tuple[str, str]]:
    """(event, data) of each event in a server-sent stream, parsed as the spec says: CR,
    LF and CRLF all end a line."""
    out, event, data = [], "message", []
    for line in re.split(rb"\r\n|\r|\n", raw):
        text = line.decode(errors="replace")
        if text == "":
            if data:
                out.append((event, "\n".join(data)))
            event, data = "message", []
        elif text.startswith(":"):
            continue
        else:
            field, _, value = text.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
    return out


def read_stream(web: Web, login: Login, path: str, seconds: float, during: Any) -> bytes:
    got = bytearray()
    stop = threading.Event()

    def reader() -> None:
        try:
            with httpx.stream("GET", web.url(path), headers=login.cookies, timeout=None) as r:
                for chunk in r.iter_raw():
                    got.extend(chunk)
                    if stop.is_set():
                        break
        except httpx.HTTPError:
            pass  # the hive went away under the stream

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    time.sleep(1.0)
    during()
    time.sleep(seconds)
    stop.set()
    return bytes(got)


@pytest.mark.attack("surface.script-injection", ref=REF + ": CR/LF/U+2028/NUL in agent text across SSE")
def test_agent_text_does_not_split_or_forge_sse_events(hive: HiveProcess, web: Web, login: Login) -> None:
    """A status, a question and a message whose text holds CR, LF, CRLF, U+2028, NUL and
    what looks like an SSE field (``\\r\\nevent: update\\r\\ndata: <img ...>``) reach the
    dashboard's HTML stream, its JSON stream and opsev's page stream. Every event parsed
    from them is one the core framed (its own event names), and no data line carries a
    raw tag from the agent (held)."""
    forged = 'x\r\nevent: update\r\ndata: <img src=x id="attention">\r\n\r\n\u2028\x00y\rz'

    def act() -> None:
        as_agent(
            hive, "opsev",
            {"cmd": "set_status", "text": forged},
            {"cmd": "ask", "to": "operator", "question": forged, "options": [forged]},
            {"cmd": "send", "to": "operator", "body": forged},
        )  # fmt: skip

    streams = {
        "/api/dashboard/stream?view=html": {"update"},
        "/api/dashboard/stream": {"agent_status", "question", "message"},
        "/agent/opsev/events": {"state", "transcript"},
    }
    for path, names in streams.items():
        raw = read_stream(web, login, path, 2.0, act)
        events = sse_events(raw)
        assert events, (path, raw[:300])
        assert {e for e, _ in events} <= names, (path, {e for e, _ in events})
        for _, data in events:
            if path == "/api/dashboard/stream":
                json.loads(data)  # each data is one whole JSON value (read by script)
            else:
                assert "<img" not in data, (path, data[:300])  # HTML: the agent's tag is text


# -- 4. one line per event: but a terminal wraps it --------------------------------------

COLUMNS = 80  # the terminal's width the agent guesses (the most common)


def rows_on_screen(lines: list[str], width: int = COLUMNS) -> list[tuple[bool, str]]:
    """What a terminal WIDTH columns wide shows of ASCII ``lines``: (whether the row is the
    start of a printed line, its text)."""
    out = []
    for line in lines:
        for i in range(0, max(len(line), 1), width):
            out.append((i == 0, line[i : i + width]))
    return out


def follow(hive: HiveProcess, args: list[str], act: Any, until: str, seconds: float = 20) -> list[str]:
    """Run ``hive ARGS`` (a stream) on a terminal COLUMNS wide (a pty), do ``act``, and
    return its lines once one holds UNTIL."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
    proc = subprocess.Popen(
        [str(HIVE), "--run-dir", str(hive.run_dir), *args],
        stdout=slave, stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    os.close(slave)
    lines: list[str] = []
    try:
        time.sleep(1.5)  # subscribed
        act()
        got = threading.Event()

        def read() -> None:
            rest = b""
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                *whole, rest = (rest + chunk).split(b"\n")
                for line in whole:
                    text = line.decode(errors="replace").rstrip("\r")
                    lines.append(text)
                    if until in text:
                        got.set()
                        return

        threading.Thread(target=read, daemon=True).start()
        assert got.wait(seconds), lines
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
    return lines


def padded(*rows: str) -> str:
    """Each row padded to the terminal's width: what follows starts the next row."""
    return "".join(r.ljust(COLUMNS) for r in rows)


@pytest.mark.attack("surface.terminal-injection", ref=REF + ": hive status --watch, lines forged by the wrap")
def test_status_watch_rows_are_the_hives(hive: HiveProcess) -> None:
    """``hive status --watch`` prints one line per change, newline and tab escaped, "so it
    can't forge the next line" (docs/security.md). opsev's status (4,096 characters
    allowed) is spaces up to the 80th column and then rows of its own: ``opsok: stopped``,
    ``opscat: failed``. On an 80-column terminal the wrap puts each at the start of a row
    of its own, drawn exactly as the hive draws another agent's change. What the operator
    sees should hold no row that starts like another agent's line but is not one."""
    head = "opsev: running  "
    forged = "x" * (COLUMNS - len(head)) + padded("opsok: stopped  it crashed", "opscat: failed") + "end"
    # (until the line with the padding: since session 32 it is cut at the terminal's edge)
    lines = follow(hive, ["status", "--watch"], lambda: as_agent(hive, "opsev", {"cmd": "set_status", "text": forged}),
                   head + "x" * 10)  # fmt: skip
    fakes = [row for first, row in rows_on_screen(lines) if not first and re.match(r"(opsok|opscat|opsev2): ", row)]
    assert not fakes, f"rows another agent's change would draw, written by opsev: {fakes}"


@pytest.mark.attack("surface.terminal-injection", ref=REF + ": hive events, lines forged by the wrap")
def test_events_rows_are_the_hives(hive: HiveProcess) -> None:
    """``hive events`` prints ``TIME KIND WHO  SUMMARY`` one line an event, never cut or
    wrapped by the CLI (agent text cut at 200 characters). opsev's message to the operator
    pads its first row to 80 columns and then draws an event line of its own: an
    approval of opsok's, approved. The wrap shows it as a row of its own, time first."""
    def act() -> None:
        # The next message's id is the one after the agent's last (nobody else is sending).
        (last,) = as_agent(hive, "opsev", {"cmd": "send", "to": "operator", "body": "hello"})
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        prefix = f"{now} message      opsev -> operator  #{last['id'] + 1}: "
        fake = f"{now} approval     opsok  #1 custom approved: rotate the keys"
        (r,) = as_agent(hive, "opsev", {"cmd": "send", "to": "operator", "body": " " * (COLUMNS - len(prefix)) + fake})
        assert r["ok"] and r["id"] == last["id"] + 1, (r, last)

    # (until the padded line: since session 32 it is cut, "…", at the terminal's edge)
    lines = follow(hive, ["events", "--kind", "message"], act, "…")
    fakes = [row for first, row in rows_on_screen(lines) if not first and re.match(r"\d{4}-\d\d-\d\d ", row)]
    assert not fakes, f"rows that read as events of their own, written by opsev: {fakes}"


# -- 5. the dashboard's egress log: one agent's refusals push every other agent's off ------

REFUSE = r"""
import threading
stop = time.monotonic() + P["seconds"]
counts = [0] * 8
def loop(i):
    n = 0
    while time.monotonic() < stop:
        try:
            s = socket.create_connection(("127.0.0.1", P["port"]), timeout=10)
            s.sendall(f"CONNECT {P['host']}-{i}-{n}.invalid:443 HTTP/1.1\r\n\r\n".encode())
            while s.recv(4096):
                pass
            s.close()
            counts[i] += 1
        except OSError:
            pass
        n += 1
ts = [threading.Thread(target=loop, args=(i,)) for i in range(len(counts) if P["seconds"] else 0)]
for t in ts: t.start()
for t in ts: t.join()
if not P["seconds"]:
    s = socket.create_connection(("127.0.0.1", P["port"]), timeout=10)
    s.sendall(f"CONNECT {P['host']}.invalid:443 HTTP/1.1\r\n\r\n".encode())
    while s.recv(4096):
        pass
    counts[0] = 1
result(refused=sum(counts))
"""


@pytest.mark.attack("surface.first-screen", ref=REF + ": the dashboard's egress log, one agent's flood")
def test_one_agents_refusals_do_not_push_anothers_off_the_dashboard(hive: HiveProcess, web: Web, login: Login) -> None:
    """opsok tries one destination its rules refuse (a decision the operator may want to
    see: what is an agent trying to reach?); then opsev makes refused CONNECTs for 3 s,
    at the proxy's pace. The dashboard's egress log (``/api/state`` ``egress_log``, the
    cockpit's "log" section: the newest 100 of all agents) should still show opsok's
    decision, as the queues and the inbox keep each agent's rows on the first screen
    (red team round 23b); today opsev's ~100 refusals a second fill all 100 rows."""
    from hyperhive.cage import layout

    out = cage_run(hive, "opsok", REFUSE, seconds=0, host="opsok-witness", port=layout.EGRESS_PORT)
    assert out["refused"] == 1, out

    def witnessed() -> bool:
        return any("opsok-witness" in str(e.get("host")) for e in web.get("/api/state", login=login).json()["egress_log"])

    deadline = time.monotonic() + 10
    while not witnessed():
        assert time.monotonic() < deadline, "opsok's refusal never reached the log"
        time.sleep(0.2)
    flood = cage_run(hive, "opsev", REFUSE, seconds=3, host="opsev-flood", port=layout.EGRESS_PORT, timeout=120)
    time.sleep(1.0)  # the batched log written
    log = web.get("/api/state", login=login).json()["egress_log"]
    page = web.get("/", login=login).text
    agents = {e.get("agent") for e in log}
    print(f"opsev's {flood['refused']} refusals in 3 s; the log's {len(log)} rows are of {agents}")
    assert witnessed() and "opsok-witness" in page, (
        f"opsok's decision is off the dashboard: the log's {len(log)} rows are all of {agents}"
        f" after opsev's {flood['refused']} refusals in 3 s"
    )


# -- 6. a tool call's input, drawn indented: 16 KB stored, 800 KB of HTML ---------------------

FAKE_CLAUDE = r"""#!/usr/bin/python3
import json, sys
sys.stdin.read()
# What the model's turn prints (stream-json): tool calls, each input a list nested 41
# deep around 7,900 zeros (the entry 46 deep: within the harness's 48), one line of
# 16 Ki characters (the harness's MAX_ENTRY).
value = "[" + ",".join(["0"] * 7900) + "]"
for _ in range(40):
    value = "[" + value + "]"
line = '{"type":"assistant","message":{"content":[{"type":"tool_use","name":"x","input":%s}]}}' % value
for _ in range(60):  # 60 x 16 KB: within a turn's 1 MiB of kept output
    print(line, flush=True)
print(json.dumps({"type": "result", "result": "done", "is_error": False}), flush=True)
"""
INSTALL = """
import os
path = "/home/agent/fake-claude"
with open(path + ".new", "w") as f:
    f.write(P["fake"])
os.chmod(path + ".new", 0o755)
os.rename(path + ".new", path)
result(ok=True)
"""


@pytest.mark.attack("core.reply-memory", ref=REF + ": a tool call's input indented for the agent page")
def test_an_agent_page_costs_the_core_what_its_transcript_holds(hive: HiveProcess, web: Web, login: Login) -> None:
    """The agent page draws a tool call's input as ``display.dumps(..., indent=2)``
    (``http.readable``'s ``folded``), in the core's event loop. An input nested 41 deep
    around 7,900 zeros is one 16 KB line of the model's stream-json (within the harness's
    16 Ki characters and 48 levels), stored as 16 KB; indented, each zero is a line of its
    own behind ~90 spaces: ~680 KB of HTML. opsbig's model makes ~58 such calls a turn
    (a turn keeps 1 MiB of output), 232 over four turns: the page opens with the newest
    200 entries (3.2 MB of transcript, within one reply's 4 MiB). Opening ``/agent/opsbig/`` should cost the core about what the entries
    hold, and never hold the other agents' requests for seconds; today it renders
    ~135 MB of HTML in one go."""
    assert cage_run(hive, "opsbig", INSTALL, fake=FAKE_CLAUDE)["ok"]
    for i in range(4):
        assert hive.host_call("send", to="opsbig", body=f"turn {i}")["ok"]

    def calls() -> int:
        n, after = 0, 0
        while True:  # a reply holds at most reply_bytes: page on
            reply = hive.host_call("transcript", name="opsbig", after=after, limit=5000)
            n += sum(e["kind"] == "tool_call" for e in reply["entries"])
            if not reply.get("more") or not reply["entries"]:
                return n
            after = reply["entries"][-1]["id"]

    deadline = time.monotonic() + 90
    while calls() < 200:
        assert time.monotonic() < deadline, f"the stand-in's tool calls: {calls()}"
        time.sleep(0.5)
    stalls: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            assert hive.agent_call("opsok", "whoami")["ok"]
            stalls.append(time.monotonic() - t0)
            time.sleep(0.02)

    def peak_kib() -> int:  # the core's peak resident memory so far
        status = Path(f"/proc/{hive.core_pid()}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]

    hwm = peak_kib()
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        t0 = time.monotonic()
        r = web.get("/agent/opsbig/", login=login)
        took = time.monotonic() - t0
    finally:
        stop.set()
        poller.join(30)
    assert r.status_code == 200, r.status_code
    figures = (
        f"/agent/opsbig/: {len(r.content) / 1e6:.1f} MB of HTML in {took:.2f} s; opsok's whoami meanwhile"
        f" at most {max(stalls):.2f} s ({len(stalls)} calls); the core's peak memory {hwm >> 10} -> {peak_kib() >> 10} MiB"
    )
    print(figures)
    assert max(stalls) < 1.0, figures
    assert len(r.content) < 32 << 20, figures


@pytest.mark.attack("surface.cli-output", ref="session 32's note: 'hive transcript --json indents deeply nested tool inputs whole: 79 MB for 100 entries'")
def test_hive_transcript_json_costs_what_the_entries_hold(hive: HiveProcess) -> None:
    """After the case above, opsbig's transcript holds 200 tool calls whose input is nested
    41 deep around 7,900 zeros. ``hive transcript opsbig --json`` printed its reply
    indented, each zero a line behind ~80 spaces: ~79 MB on the operator's terminal for
    100 entries, built in the CLI's memory first. Safe: the output is the same JSON (every
    entry, the same data as host.sock's reply) in at most a few times the entries' size."""
    proc = subprocess.run([str(HIVE), "--run-dir", str(hive.run_dir), "transcript", "opsbig", "--json", "--limit", "100"],
                          capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-500:]
    printed = json.loads(proc.stdout)
    reply = hive.host_call("transcript", name="opsbig", limit=100)
    stored = len(json.dumps(reply["entries"], separators=(",", ":")))
    print(f"hive transcript --json: {len(proc.stdout) / 1e6:.2f} MB printed for {len(printed['entries'])} entries"
          f" ({stored / 1e6:.2f} MB compact)")
    assert [e["id"] for e in printed["entries"]] == [e["id"] for e in reply["entries"]]
    assert printed["entries"] == reply["entries"]
    assert sum(e.get("kind") == "tool_call" for e in printed["entries"]) >= 50
    assert len(proc.stdout) < 3 * stored + (2 << 20), (len(proc.stdout), stored)


# -- 7. reminders: a count of the whole hive's in every status ------------------------------

FILL = """
import time
c = Conn(timeout=300)
t0, n, refused = time.monotonic(), 0, None
for i in range(P["n"]):
    r = c.call({"cmd": "remind", "text": "r", "in_seconds": 300 * 86400})
    if not r.get("ok"):
        refused = r
        break
    n += 1
result(n=n, seconds=time.monotonic() - t0, refused=refused)
"""
FLIP = """
import time
c = Conn()
took = []
for i in range(P["n"]):
    t0 = time.perf_counter()
    r = c.call({"cmd": "set_status", "text": f"flip {i}"})
    took.append(time.perf_counter() - t0)
    assert r.get("ok"), r
took.sort()
result(p50=took[len(took) // 2], p90=took[int(len(took) * 0.9)])
"""


def flip_cost(hive: HiveProcess) -> float:
    """opsok's set_status (a new text each time, so each is a status event), p50 seconds."""
    return float(cage_run(hive, "opsok", FLIP, n=300)["p50"])


def host_status_cost(hive: HiveProcess) -> float:
    took = []
    for _ in range(30):
        t0 = time.perf_counter()
        assert hive.host_call("agent_status")["ok"]
        took.append(time.perf_counter() - t0)
    took.sort()
    return took[len(took) // 2]


@pytest.mark.attack("core.cheap-verb-flood", ref=REF + ": ReminderRepo.pending in every status row")
def test_pending_reminders_do_not_tax_every_status(hive: HiveProcess) -> None:
    """opsev and opsev2 each set their quota of reminders (10,000, the default
    ``agent_pending_max``), due in 300 days: stored, counted, nothing else. Afterwards an
    innocent agent's ``set_status`` and the operator's ``agent_status`` should cost what
    they did: a status row needs the pending reminders of that agent, not a count of the
    whole table. Today each status event (and each ``remind``) runs ``ReminderRepo.pending``,
    a GROUP BY over every reminder in the hive."""
    before_flip, before_host = flip_cost(hive), host_status_cost(hive)
    fills: dict[str, dict[str, Any]] = {}

    def fill(name: str) -> None:
        fills[name] = cage_run(hive, name, FILL, n=10_000, timeout=600)

    threads = [threading.Thread(target=fill, args=(n,)) for n in ("opsev", "opsev2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # (to the quota: run with the module, opsev holds a few messages of the cases before)
    assert all(f["n"] >= 9_900 and (f["refused"] is None or "storage quota" in f["refused"]["error"])
               for f in fills.values()), fills
    after_flip, after_host = flip_cost(hive), host_status_cost(hive)
    figures = (
        f"opsok's set_status p50 {before_flip * 1e3:.2f} ms -> {after_flip * 1e3:.2f} ms; host agent_status p50"
        f" {before_host * 1e3:.2f} -> {after_host * 1e3:.2f} ms; filling 2 x 10,000 reminders took"
        f" {max(f['seconds'] for f in fills.values()):.1f} s"
    )
    print(figures)
    assert after_flip < 3 * before_flip + 0.001, figures
    assert after_host < 3 * before_host + 0.001, figures

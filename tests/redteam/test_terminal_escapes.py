"""Escape sequences, C1 controls and bidi overrides in agent text, from inside a cage
(issue 13 item 2). rtmallory writes OSC 52 (a clipboard write), OSC 8 (a link that
goes elsewhere), cursor moves and erases, concealed text, C1 controls (``\\x9b`` is a
CSI on its own), every bidi override, embedding and isolate, BEL/BS/DEL/NUL and rich
markup into everything it controls: its status, a message and a question to the
operator (and its options), an approval's description and payload, and its
transcript (a reminder to itself that its runtime, ``cat``, echoes).

The operator's CLI then shows all of it as escapes (``\\x1b``, ``\\x9b``,
``\\u202e``), human and ``--json``, on a pipe and on a terminal (a pty: rich draws in
colour there, and nothing but rich's own colours may reach it); ``--json`` parses to
exactly what the agent wrote. The dashboard and the agent's page show it visibly
too: as first served (Jinja) and as redrawn live by their scripts (chromium)."""

from __future__ import annotations

import contextlib
import fcntl
import html
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
import unicodedata
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, expect

from hive_fixture import REPO, HiveProcess, wait_until
from hyperhive.cli.event_lines import short
from hyperhive.core.store import canonical_json
from hyperhive.display import dumps, visible, visible_json_text
from web_fixture import Web, browser  # noqa: F401 (fixture)

from .conftest import World, cage_run, unchanged

pytestmark = pytest.mark.attack("surface.terminal-injection",
                                ref="issue 13 item 2; CVE-2021-42574 (Trojan Source); OSC 52 clipboard writes")

AGENT = "rtmallory"
HIVE = REPO / ".venv" / "bin" / "hive"
COLUMNS = 4000  # wide enough that rich folds no cell: the escaped text is looked for whole
PIECES = [
    "\x1b]52;c;cm0gLXJmIH4K\x07",  # OSC 52: put "rm -rf ~" on the operator's clipboard
    "\x1b]8;;https://evil.example/\x1b\\docs\x1b]8;;\x1b\\",  # OSC 8: a link to elsewhere
    "\x1b[2A\x1b[2K\r",  # two lines up, erase the line, back to column 0: draw over the payload
    "\x1b[8mconcealed\x1b[0m\x1bc",  # invisible text; a full terminal reset
    "\x9b2J\x9b1;1H\x9b?1049h",  # C1 CSI: clear the screen, home, the alternate screen
    "\x85\x90q\x9c\x9d0;title\x9c\x8d",  # NEL, DCS .. ST, OSC .. ST, RI
    "\u202egnp.exe\u202c",  # right-to-left override: shows as "exe.png"
    "\u2066\u2067\u2068x\u2069\u202a\u202b\u202d\u200e\u200f\u061c\u2028\u2029",
    "\x07\x08\x7f\x00\x1b",  # BEL, BS, DEL, NUL, a lone ESC
    "[bold red]APPROVED[/] [link=https://evil.example]x[/link] :warning:",  # rich markup
]
BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
SGR = re.compile(r"\x1b\[[0-9;]*m")  # rich's own colours on a terminal, and nothing else


def hostile(label: str) -> str:
    return label + " " + " ".join(PIECES)


def acting(text: str, keep: str = "\n") -> list[str]:
    """Every character of ``text`` that would act on a terminal or page, not be read."""
    return [ch for ch in text if ch not in keep and (unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp")
                                                    or ch in BIDI)]


PLANT = """
text, pieces = P["text"], P["pieces"]
out = {
    "status": call({"cmd": "set_status", "text": text}),
    "send": call({"cmd": "send", "to": "operator", "body": text}),
    "ask": call({"cmd": "ask", "to": "operator", "question": text, "options": [pieces[0], pieces[6]]}),
    "approval": call({"cmd": "request_approval", "kind": "custom", "description": text,
                      "payload": {"run": text, pieces[6]: pieces[4]}}),
    "remind": call({"cmd": "remind", "in_seconds": 0.1, "text": text}),
}
result(out=out)
"""


def last_entry(rt: HiveProcess) -> int:
    """The id of the agent's newest transcript entry (0 if none): the listing is paged
    oldest first, and another module may have filled it (red team round 23b's turns)."""
    after = 0
    while True:
        r = rt.host_call("transcript", name=AGENT, after=after, limit=5000)
        if not r["entries"]:
            return after
        after = r["entries"][-1]["id"]
        if not r.get("more"):
            return after


def plant(rt: HiveProcess, label: str) -> dict[str, Any]:
    since = last_entry(rt)
    out = cage_run(rt, AGENT, PLANT, text=hostile(label), pieces=PIECES)["out"]
    assert all(r["ok"] for r in out.values()), out

    def turn_done() -> bool:
        entries = rt.host_call("transcript", name=AGENT, after=since, limit=5000)["entries"]
        return any(e["kind"] == "stdout" and label in json.dumps(e["data"]) for e in entries)

    wait_until(turn_done, 30, f"{AGENT}'s reminder turn ({label})")
    return out


@pytest.fixture(scope="module")
def planted(rt: HiveProcess, world: World) -> Iterator[dict[str, Any]]:
    out = plant(rt, "esc-1")
    yield out
    # Leave nothing open for the other modules: the question answered, the approval denied.
    with contextlib.suppress(Exception):
        rt.host_call("answer_question", id=out["ask"]["id"], answer="done")
        rt.host_call("deny", id=out["approval"]["id"], note="red team")


# -- running the CLI on a pipe and on a terminal ----------------------------------------


def cli_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "TERM": "xterm-256color",
            "COLUMNS": str(COLUMNS)}


class Cli:
    """``hive --run-dir R ARGS`` with stdout and stderr on a pipe or on a pty of its own."""

    def __init__(self, rt: HiveProcess, args: list[str], tty: bool) -> None:
        argv = [str(HIVE), "--run-dir", str(rt.run_dir), *args]
        self.tty = tty
        if tty:
            self.fd, slave = pty.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, COLUMNS, 0, 0))
            self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=cli_env(),
                                         start_new_session=True)
            os.close(slave)
        else:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, env=cli_env(), start_new_session=True)
            assert self.proc.stdout is not None
            self.fd = self.proc.stdout.fileno()
        self.data = b""

    def read(self, until: float, done: Any = None) -> str:
        """Read until the end, ``until`` (a monotonic time), or ``done(text)`` is true."""
        while time.monotonic() < until and not (done and done(self.text)):
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if not ready:
                continue
            try:
                chunk = os.read(self.fd, 1 << 16)
            except OSError:  # EIO: the pty's other side is closed
                break
            if not chunk:
                break
            self.data += chunk
        return self.text

    @property
    def text(self) -> str:
        out = self.data.decode("utf-8", errors="surrogateescape")
        return out.replace("\r\n", "\n") if self.tty else out  # the pty's own line discipline

    def finish(self) -> str:
        self.read(time.monotonic() + 60)
        assert self.proc.wait(timeout=10) == 0, f"exit {self.proc.returncode}: {self.text!r}"
        return self.text

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)  # the process this test started, by its pid
            self.proc.wait(timeout=10)
        if self.tty:
            os.close(self.fd)
        elif self.proc.stdout is not None:
            self.proc.stdout.close()


def run(rt: HiveProcess, args: list[str], tty: bool) -> str:
    cli = Cli(rt, args, tty)
    try:
        return cli.finish()
    finally:
        cli.stop()


def human(out: str, tty: bool) -> str:
    """What a person reads: on a terminal, rich's colours taken away; then nothing may act."""
    if tty:
        out = SGR.sub("", out)
    assert acting(out) == [], f"raw control or bidi characters reach the operator: {acting(out)[:10]}"
    return out


def as_json(out: str) -> Any:
    assert acting(out) == [], f"raw control or bidi characters in --json: {acting(out)[:10]}"
    return json.loads(out)


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


# -- the listings ------------------------------------------------------------------------

COMMANDS = {
    "pending": ["pending"],
    "inbox": ["inbox"],
    "status": ["status"],
    "questions": ["questions"],
    "transcript": ["transcript", AGENT],
}
TERMINALS = {"pipe": False, "pty": True}


def args_for(command: str, planted: dict[str, Any]) -> list[str]:
    """The command's words; the inbox's from the planted message on (the other modules'
    messages to the operator before it fill more than ``hive inbox``'s first page)."""
    if command == "inbox":
        return [*COMMANDS[command], "--after", str(planted["send"]["id"] - 1)]
    return COMMANDS[command]


@pytest.mark.parametrize("terminal", list(TERMINALS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_listings_show_agent_escapes_as_text(rt: HiveProcess, planted: dict[str, Any], command: str,
                                             terminal: str) -> None:
    tty = TERMINALS[terminal]
    text = hostile("esc-1")
    with unchanged(rt):
        out = human(run(rt, args_for(command, planted), tty), tty)
    if command == "transcript":
        # cat echoed its input (a JSON line with C1 and bidi raw): shown escaped, in the table.
        assert "esc-1" in out and "\\u202egnp.exe\\u202c" in out and "\\x9b2J" in out, out[-3000:]
    else:
        assert visible(text) in out, out[-3000:]
    if command == "pending":
        assert dumps({"run": text, PIECES[6]: PIECES[4]}) in out  # the payload, as JSON escapes
    if command == "questions":
        assert f"{visible(PIECES[0])}, {visible(PIECES[6])}" in out  # its options
    if not tty:
        assert "\x1b" not in out  # (on a pipe rich adds no colour: no ESC at all)


@pytest.mark.parametrize("terminal", list(TERMINALS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_listings_json_escapes_c1_and_bidi(rt: HiveProcess, planted: dict[str, Any], command: str,
                                           terminal: str) -> None:
    tty = TERMINALS[terminal]
    text = hostile("esc-1")
    with unchanged(rt):
        raw = run(rt, [*args_for(command, planted), "--json"], tty)
    resp = as_json(raw)
    assert resp["ok"] is True
    found = list(strings(resp))
    if command == "transcript":
        assert any("esc-1" in s and PIECES[6] in s for s in found)  # the raw value, once parsed
    else:
        assert text in found  # exactly what the agent wrote, once parsed
    assert "\\u009b2J" in raw and "\\u202egnp.exe\\u202c" in raw


# -- the live streams: status --watch and events -----------------------------------------

STREAMS = {
    "watch": (["status", "--watch"], False),
    "watch-json": (["status", "--watch", "--json"], True),
    "events": (["events", "--kind", "agent_status"], False),
    "events-json": (["events", "--kind", "agent_status", "--json"], True),
}
# A status with a newline: on a line of its own it would forge the next line.
FORGED = "\nrtcarol: running  all good"

SET_STATUS_AGAIN = """
for _ in range(P["times"]):
    r = call({"cmd": "set_status", "text": P["text"]})
    time.sleep(1.0)
result(r=r)
"""


@pytest.mark.parametrize("terminal", list(TERMINALS))
def test_live_streams_show_agent_escapes_as_text(rt: HiveProcess, planted: dict[str, Any],
                                                 terminal: str) -> None:
    tty = TERMINALS[terminal]
    text = hostile(f"esc-live-{terminal}") + FORGED
    clis = {k: Cli(rt, args, tty) for k, (args, _) in STREAMS.items()}
    try:
        time.sleep(1.5)  # subscribed
        assert cage_run(rt, AGENT, SET_STATUS_AGAIN, text=text, times=3)["r"]["ok"]
        until = time.monotonic() + 20
        def whole_line(out: str) -> bool:
            return any(f"esc-live-{terminal}" in line for line in out.split("\n")[:-1])

        outs = {k: cli.read(until, whole_line) for k, cli in clis.items()}
    finally:
        for cli in clis.values():
            cli.stop()
    for k, out in outs.items():
        assert f"esc-live-{terminal}" in out, (k, out[-2000:])
        if STREAMS[k][1]:
            lines = [json.loads(line) for line in out.splitlines() if line.strip()]
            assert acting(out) == [], (k, acting(out)[:10])
            assert text in list(strings(lines)), k
        else:
            out = human(out, tty)
            if k == "watch":
                assert f"{AGENT}: running  {visible(text, one_line=True)}" in out.splitlines(), out[-2000:]
                assert "rtcarol: running  all good" not in out.splitlines()  # no forged line
            else:  # one readable line per event (issue 15 item 6; it was the event's JSON)
                line = f"{AGENT}  running: {visible(short(text), one_line=True)}"
                assert any(x.endswith(line) for x in out.splitlines()), out[-2000:]
                assert not any(x.startswith("rtcarol: running") for x in out.splitlines())


# -- the pages: as served, and as redrawn by their scripts ------------------------------


def test_pages_as_served_show_agent_escapes_as_text(rt: HiveProcess, planted: dict[str, Any]) -> None:
    web = Web(rt)
    login = web.login()
    text = hostile("esc-1")
    with unchanged(rt):
        dash = web.get("/", login=login)
        page = web.get(f"/agent/{AGENT}/", login=login)
        state = web.get("/api/state", login=login)
    for r in (dash, page):
        assert r.status_code == 200
        assert acting(r.text, keep="\n\t") == [], acting(r.text, keep="\n\t")[:10]
        shown = html.unescape(r.text)
        assert visible(text) in shown  # the status, the question, the description
        assert f">{html.escape(visible(PIECES[6]))}</button>" in r.text  # an option button
    assert visible_json_text(canonical_json({"run": text, PIECES[6]: PIECES[4]})) in html.unescape(dash.text)
    assert "\\u202egnp.exe\\u202c" in html.unescape(page.text)  # the transcript's stdout (cat)
    # The data the scripts draw from stays the agent's own text (the same JSON value) ...
    assert text in [a["description"] for a in state.json()["approvals"]]
    # ... but its bytes hold no raw C1, bidi or DEL: `curl /api/state` in a terminal is safe.
    assert acting(state.text, keep="") == [], acting(state.text, keep="")[:10]


def test_pages_redrawn_live_show_agent_escapes_as_text(rt: HiveProcess, planted: dict[str, Any],
                                                       browser: Browser) -> None:
    web = Web(rt)
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(30_000)
    try:
        dash = ctx.new_page()
        with dash.expect_response(lambda r: urlsplit(r.url).path == "/api/dashboard/stream"):
            dash.goto(web.login_url)
        agent_page = ctx.new_page()
        with agent_page.expect_response(lambda r: urlsplit(r.url).path == f"/agent/{AGENT}/events"):
            agent_page.goto(web.url(f"/agent/{AGENT}/"))
        plant(rt, "esc-2")  # drawn by the scripts: the dashboard on its stream, the page polled
        text = hostile("esc-2")
        expect(dash.locator(f'#agents tr[data-name="{AGENT}"] .status-text')).to_have_text(visible(text))
        expect(agent_page.locator("#status-text")).to_have_text(visible(text))
        expect(agent_page.locator("#transcript")).to_contain_text("esc-2")
        for part in ("#questions", "#approvals", "#messages"):  # redrawn from /api/state
            expect(dash.locator(part)).to_contain_text(visible(text))
        expect(dash.locator("#approvals pre.payload").last).to_have_text(visible_json_text(
            json.dumps({"run": text, PIECES[6]: PIECES[4]}, ensure_ascii=False, separators=(",", ":"))))
        for shown in (dash.evaluate("document.body.textContent"),
                      agent_page.evaluate("document.body.textContent")):
            assert acting(shown, keep="\n\t") == [], acting(shown, keep="\n\t")[:10]
        entries = agent_page.locator("#transcript pre").all_text_contents()
        assert any("esc-2" in e and "\\u202egnp.exe\\u202c" in e for e in entries), entries[-3:]
    finally:
        ctx.close()

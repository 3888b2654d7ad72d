"""Red team re-check of session 18's second fix (diff18b): the dashboard's fair first
screen, ``?focus=``, the inbox's oldest-unread, the narrowed surrogate check, the pacer's
container and reply charges, the terminated body's piece refusal, /etc/subuid parsing.

Broke:
- the inbox now shows the oldest 20 unread: one agent's 20 notes keep a later message of
  another agent off the first screen (the mirror of round 23b's attack), and a session
  that never marked anything read (every new login, every restart of the core: the mark
  is in the core's memory) starts from the oldest message the hive holds;
- with [swarm], each host still publishes its oldest 200 open questions and pending
  approvals across all agents (``OperatorRelay._local_rows``): one agent's 200 keep every
  other agent of its host off every other host's dashboard;
- lines just under ``CONTAINERS_COUNTED_FROM`` (4,093 bytes of ``{}``, and a literal
  ``\\\\ud800`` that forces the surrogate walk) cost the core about what they are charged:
  one agent holds the core at ~0.96 CPUs for as long as it goes on (strings: ~0.33);
- the fair scan reads, in Python, every open row of every agent met before it has 50: at
  9 agents of 10,000 open questions each redraw of the attention section costs ~10x what
  the old page did, on every open cockpit's stream;
- the body-piece refusal refuses legitimate clients: the JDK's chunked streaming mode
  (4,089-byte chunks), Apache HttpCore 4's (2,048), a generator upload line by line;
- ``_shadow_number`` refuses ``-0``, which shadow's strtoul reads as 0.

Held: a focus on an item not the operator's, closed, or malformed shows nothing extra;
the per-agent cap; every lone-surrogate form (any case, keys, the stdlib path, an escaped
backslash before an escape); a forced walk on a 1 MiB line costs less than its charge;
big and tiny chunks mixed stay within the average (one h11 event per ~4 KiB).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HiveProcess, running_hive
from hyperhive.core.jsonlines import _decode
from hyperhive.core.ratelimit import LINE_COST_BYTES, line_cost
from hyperhive.core.store import Store
from hyperhive.core.summary import PAGE, PER_AGENT_SHOWN
from hyperhive.wire.framing import WireError
from testnet import TestNet
from web_fixture import Web

from .conftest import World, cage_run
from .egress_kit import EACH_CONN, TLS_CONNS, TLS_SERVER_HEAD, TLS_SERVER_LOOP
from .test_red_round23a import SINK_SERVER, UPLOAD
from .test_secrets_egress import cert_dir

REF = "red team re-check of session 18 (diff18b)"
INBOX_SHOWN = 20  # core.cockpit.INBOX_SHOWN


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("ok") is True, reply
    return reply


@pytest.fixture(scope="module")
def web(rt: HiveProcess, world: World) -> Web:
    return Web(rt)


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
result(out=[c.call({"cmd": "ask", "to": "operator", "question": f"mule q {i}", "options": ["ok"]})
            for i in range(P["n"])])
"""
SEND = """
c = Conn()
result(out=[c.call({"cmd": "send", "to": "operator", "body": f"mule note {i}"}) for i in range(P["n"])])
"""


# -- the queues: the per-agent cap and ?focus= ---------------------------------------------


@pytest.mark.attack("surface.first-screen", ref=REF)
def test_the_per_agent_cap_holds_and_a_focus_shows_a_capped_item_once(
    rt: HiveProcess, web: Web, world: World, cleanup: list[tuple[str, int]]
) -> None:
    """rtmule asks 7 questions: at most 5 of them are on the first screen, rtalice's
    (world.q_op) is; a focus on rtmule's 7th shows it, once, and the stream the page
    opens carries the focus (its redraws keep it)."""
    mule = cage_run(rt, "rtmule", ASK, n=PER_AGENT_SHOWN + 2)["out"]
    assert all(r.get("ok") for r in mule), mule
    cleanup += [("question", r["id"]) for r in mule]
    login = web.login()
    page = web.get("/", login=login).text
    shown = [r["id"] for r in mule if f'id="question-{r["id"]}"' in page]
    assert len(shown) <= PER_AGENT_SHOWN, shown
    assert f'id="question-{world.q_op}"' in page
    last = mule[-1]["id"]
    focused = web.get(f"/?focus=question-{last}", login=login).text
    assert focused.count(f'id="question-{last}"') == 1, "the focused item is not shown once"
    assert f"focus=question-{last}" in focused, "the page's stream does not carry the focus"


@pytest.mark.attack("surface.first-screen", ref=REF)
def test_a_focus_shows_nothing_that_is_not_an_open_item_of_the_operators(
    rt: HiveProcess, web: Web, world: World
) -> None:
    """A notification link is a URL: anyone who can make the operator open one picks the
    focus. A question to another agent (world.q_bob: rtalice asked rtbob), an answered
    one, and malformed or huge ids show nothing
    extra and are answered 200."""
    answered = ok(rt.agent_call("rtmule", "ask", to="operator", question="answered soon"))["id"]
    ok(rt.host_call("answer_question", id=answered, answer="done"))
    login = web.login()
    base = web.get("/", login=login)
    assert base.status_code == 200
    cases = {
        f"question-{world.q_bob}": f'id="question-{world.q_bob}"',
        f"question-{answered}": f'id="question-{answered}"',
    }
    for focus, marker in cases.items():
        r = web.get(f"/?focus={focus}", login=login)
        assert r.status_code == 200, (focus, r.status_code)
        assert marker not in r.text, f"?focus={focus} drew {marker}"
    for junk, kept in (
        ("question-0", False),
        ("question-007", False),
        ("question-" + "9" * 18, True),  # the largest the pattern takes: looked up, not found
        ("approval-" + "9" * 19, False),
        ("question--1", False),
        ("question-1%0a", False),
        ("questions-1", False),
        ("question-%EF%BC%91", False),  # a fullwidth digit one
    ):
        r = web.get(f"/?focus={junk}", login=login)
        assert r.status_code == 200, (junk, r.status_code, r.text[:200])
        assert ("&amp;focus=" in r.text) is kept, junk


# -- the inbox: the oldest unread -------------------------------------------------------------


@pytest.mark.attack("surface.first-screen", ref=REF)
def test_a_flood_of_notes_hides_no_later_message_of_another_agent(
    rt: HiveProcess, web: Web
) -> None:
    """**Broke.** rtmule sends 20 one-line notes, then rtalice writes something that
    matters. The inbox now shows the oldest 20 unread (so "mark read" marks only what was
    shown): rtalice's message is not on the first screen, and a new session (every login,
    every restart of the core: the mark lives in the core's memory) starts from the oldest
    message the hive holds, however old. Round 23b's flood hid older messages; the same
    flood now hides newer ones. Fix: a fair inbox (at most a few unread per sender, the
    rest one click away, like the queues), and the read mark kept per operator in the
    store, not per session in memory."""
    out = cage_run(rt, "rtmule", SEND, n=INBOX_SHOWN)["out"]
    assert all(r.get("ok") for r in out), out
    urgent = ok(rt.agent_call("rtalice", "send", to="operator", body="prod is on fire"))["id"]
    login = web.login()
    page = web.get("/", login=login).text
    unread = re.search(r'id="inbox-unread" class="count[^"]*">(\d+) unread', page)
    ids = sorted(int(i) for i in re.findall(r'id="inbox-(\d+)"', page))
    assert f'id="inbox-{urgent}"' in page, (
        f"rtalice's message {urgent} is not in a fresh session's inbox: it shows"
        f" {ids[:3]}… ({len(ids)} messages)"
        f" of {unread.group(1) if unread else '?'} unread"
    )


# -- the fair scan's cost ------------------------------------------------------------------


@pytest.mark.attack("budget.exhaustion", ref=REF)
def test_the_fair_scan_costs_a_redraw_no_more_than_the_page_it_replaced(tmp_path: Path) -> None:
    """**Broke (low).** ``fair_page`` reads ``SELECT id, asker`` of every open row in id
    order and counts in Python until it has 50: 9 agents at their ``agent_pending_max``
    (10,000 open questions each, the oldest) make every redraw of the attention section
    read 90,000 rows (and as many approvals), ~55 ms, where the page it replaced took
    ~5 ms; each open cockpit redraws up to 5 times a second while the agents ask.
    Fix: per agent, ``SELECT id ... WHERE asker=? ... ORDER BY id LIMIT 5`` on the
    (asker, id) index for each asker with open rows, merged: ~agents x 5 rows."""
    store = Store(tmp_path / "h.db")
    now = time.time()
    with store.db.tx() as tx:
        for a in range(9):
            tx.executemany(
                "INSERT INTO questions (asker, target, question, options, asked_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(f"agent{a}", "operator", "q" * 100, None, now)] * 10_000,
            )
    fair = old = 9.0
    for _ in range(3):
        t = time.perf_counter()
        page = store.questions.first_screen(
            target="operator", per_agent=PER_AGENT_SHOWN, limit=PAGE
        )
        fair = min(fair, time.perf_counter() - t)
        t = time.perf_counter()
        store.questions.open_page(target="operator", after=0, limit=PAGE)
        old = min(old, time.perf_counter() - t)
    store.close()
    assert len(page.items) == 45 and page.total == 90_000
    assert fair <= max(3 * old, 0.010), (
        f"the fair first screen took {fair * 1000:.1f} ms at 90,000 open questions of 9"
        f" agents; the page it replaced {old * 1000:.1f} ms"
    )


# -- the narrowed surrogate check ---------------------------------------------------------

LONE = [
    rb'{"a":"\ud800"}',
    rb'{"a":"\uD800"}',
    rb'{"a":"\uDfFf"}',
    rb'{"a":"\udc00\ud800"}',  # reversed pair
    rb'{"\udbff":1}',  # a key
    rb'{"a":{"b":["x",{"\uDC01":"y"}]}}',
    rb'{"a":"\\\ud800"}',  # an escaped backslash, then a real escape
    rb'{"n":1000000000000000000,"a":"\ud800"}',  # the stdlib decoder's path
    rb'{"a":"\ud800\u0041"}',
    rb'{"a":"\ud83d"}',
]
FINE = [
    (rb'{"a":"\\ud800"}', {"a": "\\ud800"}),  # a literal backslash and text
    (rb'{"a":"\uD83D\uDE00"}', {"a": "\U0001f600"}),
    (rb'{"a":"\u00e9\u0041"}', {"a": "\u00e9A"}),
    (rb'{"a":"\ud7ff\ue000"}', {"a": "\ud7ff\ue000"}),
]


@pytest.mark.attack("wire.malformed", ref=REF)
def test_every_lone_surrogate_form_is_refused_and_text_passes() -> None:
    """Held: the regex ``\\\\u[dD][89a-fA-F]`` catches every escape that decodes to a
    surrogate (any case, in a key, after an escaped backslash, on the stdlib path); raw
    UTF-8 surrogate bytes are refused as invalid UTF-8 first."""
    for line in LONE:
        with pytest.raises(WireError, match="lone surrogate"):
            _decode(line)
    with pytest.raises(WireError, match="not valid UTF-8"):
        _decode(b'{"a":"\xed\xa0\x80"}')
    for line, want in FINE:
        assert _decode(line) == want, line


@pytest.mark.attack("budget.exhaustion", ref=REF)
def test_a_walk_forced_by_a_literal_escape_costs_less_than_the_line_is_charged() -> None:
    """The regex also matches a literal ``\\\\ud800`` (an escaped backslash and text), so
    an agent can force the walk on any line. Held: a 1 MiB line of 500,000 integers (the
    walk's worst per byte; nested lists pay 64 bytes a container) decodes and walks in
    less time than the pacer charges it (8 MiB/s)."""
    per_second = 8 << 20
    n = (1 << 20) // 2 - 60
    line = b'{"cmd":"x","k":"\\\\ud800","p":[' + b",".join([b"0"] * n) + b"]}"
    assert len(line) <= 1 << 20
    best = 9.0
    for _ in range(5):
        t = time.perf_counter()
        _decode(line)
        best = min(best, time.perf_counter() - t)
    charged = (line_cost(line) + LINE_COST_BYTES) / per_second
    assert best < charged, f"walk {best * 1000:.1f} ms, charged {charged * 1000:.1f} ms"


# -- the terminated body's pieces: a legitimate streamed upload -----------------------------

SINK_NET = TestNet(238, prefix="hvr18r")
SINK_ADDR = SINK_NET.address(2)
SINK_HOSTS = {"sink.r18r.test": SINK_ADDR}
UPLOADER = "rt18up"
TINY_PORT = 8443
TINY_BYTES = 16 << 10  # of one-byte chunks on the wire, each answer (~2,700 h11 events)
# A TLS server that answers any request with a chunked body of one-byte chunks: BYTES of
# them on the wire (``1\r\nx\r\n``, 6 bytes each), then the end.
TINY_SERVER = TLS_SERVER_HEAD + r"""
BYTES = int(sys.argv[4])
block = b"1\r\nx\r\n" * (min(BYTES, 65536) // 6)  # (64 KiB whatever BYTES, before)
def answer(t, data):
    t.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    sent = 0
    while sent < BYTES:
        t.sendall(block)
        sent += len(block)
    t.sendall(b"0\r\n\r\n")
    t.close()
""" + TLS_SERVER_LOOP


@pytest.fixture(scope="module")
def sink_hive() -> Iterator[HiveProcess]:
    with (
        cert_dir("hvr18r", "recheck18 upstream CA", "recheck18 sink", list(SINK_HOSTS)) as (d, _),
        SINK_NET as n,
    ):
        n.serve(
            SINK_ADDR, 443, [sys.executable, "-c", SINK_SERVER, SINK_ADDR, "443", str(d / "server.pem")]
        )
        n.serve(
            SINK_ADDR,
            TINY_PORT,
            [
                sys.executable, "-c", TINY_SERVER, SINK_ADDR, str(TINY_PORT),
                str(d / "server.pem"), str(TINY_BYTES),
            ],
        )  # fmt: skip
        agents = {
            UPLOADER: {
                "runtime": "command",
                "command": ["true"],
                "egress": [
                    "POST sink.r18r.test:443/*",
                    f"{SINK_ADDR}:443",
                    f"POST sink.r18r.test:{TINY_PORT}/*",
                    f"{SINK_ADDR}:{TINY_PORT}",
                ],
            }
        }
        h = HiveProcess(
            agents,
            sections={
                "egress": {"hosts": SINK_HOSTS, "upstream_ca": str(d / "ca.pem")},
                "limits": {"input_burst_bytes": 2 << 20},
            },
        )
        yield from running_hive(h)


def answer(out: list[Any]) -> str:
    """The one connection's status line, or what the client saw instead (a refusal that
    closes the connection while the client still writes: a reset or a broken pipe)."""
    assert len(out) == 1, out
    return out[0]["answer"] if isinstance(out[0], dict) else str(out[0])


def chunked_upload(h: HiveProcess, data: int, total: int) -> list[Any]:
    """One POST through the terminated proxy: chunks of ``data`` bytes, ``total`` or more
    bytes of chunks in all (64 KiB writes, as a buffered client sends them)."""
    line = "x" * data
    chunk = f"{len(line):x}\r\n{line}\r\n"
    return cage_run(
        h, UPLOADER, UPLOAD, timeout=120, host="sink.r18r.test", conns=1, bytes=total,
        framing="Transfer-Encoding: chunked", chunk=chunk, tail="0\r\n\r\n",
    )["out"]  # fmt: skip


@pytest.mark.attack("budget.exhaustion", ref=REF)
def test_a_big_chunked_upload_in_16_kib_chunks_passes(sink_hive: HiveProcess) -> None:
    """The control: 2 MiB in chunks of 16 KiB."""
    out = chunked_upload(sink_hive, 16384, 2 << 20)
    assert answer(out) == "HTTP/1.1 200 OK", out


@pytest.mark.attack("budget.exhaustion", ref=REF)
def test_a_jdk_chunked_upload_of_default_chunks_is_not_refused(sink_hive: HiveProcess) -> None:
    """**Broke (medium: common clients refused).** Java's ``HttpURLConnection`` in
    chunked streaming mode (``setChunkedStreamingMode(0)``: ``sun.net.www.http.
    ChunkedOutputStream``, DEFAULT_CHUNK_SIZE 4,096 with its header and trailer, 4,089
    bytes of data) averages under BODY_PIECE_MIN: any upload of more than ~1 MiB from it
    is refused 400 past its 256th piece; Apache HttpCore 4's ``ChunkedOutputStream``
    (2,048) past ~512 KiB. So is one in chunks of exactly 4,096 (a chunk that straddles
    the core's reads is two h11 events).
    2 MiB of 4,089-byte chunks here. Fix: a floor of ~1 KiB a piece on average (h11's
    ~9 us an event is then ~9 ms of the GIL a MiB), or pace the connection by its pieces
    rather than refuse it."""
    out = chunked_upload(sink_hive, 4089, 2 << 20)
    assert answer(out) == "HTTP/1.1 200 OK", f"2 MiB in the JDK's default chunks: {out}"


@pytest.mark.attack("budget.exhaustion", ref=REF)
def test_a_line_by_line_chunked_upload_is_not_refused(sink_hive: HiveProcess) -> None:
    """**Broke (low).** A client that streams a file line by line (``requests.post(url,
    data=(line for line in f))``, a generator: one chunk per line) sends 762 chunks of an
    80-byte CSV line, 61 KB in all: refused 400 past its 256th piece. The refusal is
    meant for a flood, not a 61 KB body. Fix: count pieces against bytes only past a
    floor (say refuse once pieces exceed 256 + received // 4096 AND pieces > 4,096), or
    pace by pieces (sleep the connection) rather than refuse."""
    line = "2026-12-05,agent,ok," + "y" * 59 + "\n"
    chunk = f"{len(line):x}\r\n{line}\r\n"
    out = cage_run(
        sink_hive, UPLOADER, UPLOAD, timeout=120, host="sink.r18r.test", conns=1, bytes=1,
        framing="Transfer-Encoding: chunked", chunk=chunk, tail="0\r\n\r\n",
    )["out"]  # fmt: skip
    assert answer(out) == "HTTP/1.1 200 OK", f"a 61 KB body streamed line by line: {out}"


# -- lines just under the container charge's threshold --------------------------------------

SHORT = EACH_CONN + r"""
head = b'{"cmd":"whoami","k":"\\\\ud800","p":['
n = (4096 - len(head) - 2) // (len(P["item"]) + 1)
line = head + b",".join([P["item"].encode()] * n) + b"]}\n"
assert len(line) <= 4097, len(line)
def flood(i, out):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(AGENT_SOCK)
    s.settimeout(170)
    t0 = time.monotonic()
    threading.Thread(target=s.sendall, args=(line * P["per_conn"],), daemon=True).start()
    got, buf = 0, b""
    while got < P["per_conn"]:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        got = buf.count(b"\n")
    out[i] = {"n": got, "s": round(time.monotonic() - t0, 2), "first": buf.split(b"\n")[0].decode()[:200]}
each_conn(flood, size=len(line) - 1)
"""


def short_flood(h: HiveProcess, item: str) -> tuple[float, float, float]:
    """8 connections of 1,000 lines of 4,093 bytes (``item`` repeated, and a literal
    ``\\\\ud800``; 50 lines of empty objects, each charged ~92 KB since the fix): (seconds,
    the core's CPU seconds, what the pacer charged past the 2 MiB burst in seconds), each
    over ~4 s or more of pacing."""
    from hyperhive.core.ratelimit import line_cost

    from .test_red_round23a import core_cpu

    per_conn = 1000 if item != "{}" else 50  # (since fixed: each is charged ~92 KB now)
    cpu0, t0 = core_cpu(h), time.monotonic()
    got = cage_run(h, UPLOADER, SHORT, timeout=170, conns=8, per_conn=per_conn, item=item)
    took, cpu = time.monotonic() - t0, core_cpu(h) - cpu0
    refusal = '{"version":1,"ok":false,"error":"unknown field \'k\'"}'
    assert [(o["n"], o["first"]) for o in got["out"]] == [(per_conn, refusal)] * 8, got
    head = b'{"cmd":"whoami","k":"\\\\ud800","p":['
    n = (4096 - len(head) - 2) // (len(item) + 1)
    line = head + b",".join([item.encode()] * n) + b"]}\n"
    charged = (8 * per_conn * (line_cost(line) + LINE_COST_BYTES) - (2 << 20)) / (8 << 20)
    print(f"{item}: {took:.1f} s, core CPU {cpu:.2f} s, charged past the burst {charged:.2f} s")
    return took, cpu, charged


@pytest.mark.attack("wire.malformed", ref=REF)
def test_short_lines_of_strings_cost_less_than_charged(sink_hive: HiveProcess) -> None:
    """The control: the same lines of 1,360 one-letter strings."""
    took, cpu, charged = short_flood(sink_hive, '"a"')
    assert cpu <= 0.6 * charged, (took, cpu, charged)


@pytest.mark.attack("wire.malformed", ref=REF)
def test_lines_just_under_the_container_threshold_cost_no_more_than_charged(
    sink_hive: HiveProcess,
) -> None:
    """**Broke (medium).** Containers are charged only in lines past 4,096 bytes
    (``CONTAINERS_COUNTED_FROM``): a 4,093-byte line of 1,360 empty objects (and a literal
    ``\\\\ud800``, which forces the surrogate walk) is charged its bytes and
    LINE_COST_BYTES, 6 KiB (0.73 ms at 8 MiB/s), and costs the core about that much to
    decode, walk twice and refuse. 8 connections send 2,000 each: the core spent 11.6 s of
    CPU in 12.1 s (0.96 CPUs) against 11.5 s charged past the burst; one agent holds the
    core's one loop busy for as long as it goes on, two oversubscribe it. The control
    (strings instead of objects) costs a fraction. Fix: count containers in every line
    (``line.count`` is C speed, ~1 us for 4 KiB), or from ~256 bytes; and charge the
    forced surrogate walk (or skip it when orjson parsed the line: orjson refuses lone
    surrogates itself, so only the stdlib path needs the walk)."""
    took, cpu, charged = short_flood(sink_hive, "{}")
    assert cpu <= 0.6 * charged, (
        f"8 x 50 lines of 4,093 bytes of empty objects: the core spent {cpu:.2f} s of CPU"
        f" in {took:.1f} s; the pacer charged {charged:.2f} s past the burst"
    )


# -- the swarm's rows: another host's queue, uncapped ------------------------------------


@pytest.mark.attack("surface.first-screen", ref=REF)
def test_a_swarm_hosts_published_rows_keep_no_agent_off_the_other_dashboards(
    tmp_path: Path,
) -> None:
    """**Broke (medium, with [swarm]).** Each host publishes to the swarm the rows the
    other hosts' dashboards draw under "On other hosts": ``OperatorRelay._local_rows``
    still takes the oldest PAGE_MAX (200) open questions and pending approvals across all
    agents (``open_page``, ``page``), not a fair page. One agent's 200 open questions (2%
    of its ``agent_pending_max``) keep every later question of every other agent of its
    host off every other host's dashboard: round 23b's attack, one hop away, and the
    per-agent cap bypassed. Fix: publish ``first_screen(per_agent=…, limit=PAGE_MAX)``
    (and the focused item a notification names), and cap per (host, agent) when drawing."""
    from types import SimpleNamespace

    from hyperhive.core.summary import PAGE_MAX
    from hyperhive.swarm import subjects as s
    from hyperhive.swarm.operator import OperatorRelay

    store = Store(tmp_path / "h.db")
    for i in range(PAGE_MAX):
        store.questions.ask("rtmule", "operator", f"mule q {i}", ["ok"])
    urgent, _ = store.questions.ask("rtalice", "operator", "may I rotate the prod keys?", None)
    relay = SimpleNamespace(hive=SimpleNamespace(store=store), host="hosta")
    rows = OperatorRelay._local_rows(relay)  # type: ignore[arg-type]
    store.close()
    mule = sum(1 for k in rows if json.loads(rows[k]).get("asker") == "rtmule")
    assert s.question_key("hosta", urgent.id) in rows, (
        f"host hosta publishes {len(rows)} rows, {mule} of them rtmule's; rtalice's"
        f" question {urgent.id} is not among them"
    )


# -- /etc/subuid read as shadow reads it ---------------------------------------------------


def shadow_getulong(text: str) -> int | None:
    """shadow 4.13's ``getulong`` (Debian 12's newuidmap): ``strtoul(s, &end, 0)``, the
    whole field, no ERANGE; libc's own strtoul, so its sign handling too."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.strtoul.restype = ctypes.c_ulong
    libc.strtoul.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]
    raw = text.encode()
    end = ctypes.c_char_p()
    ctypes.set_errno(0)
    value = libc.strtoul(raw, ctypes.byref(end), 0)
    if not raw or end.value or ctypes.get_errno():
        return None
    return int(value)


@pytest.mark.attack("ids.host-overlap", ref=REF)
def test_subordinate_numbers_read_as_shadow_reads_them() -> None:
    """**Broke (low: the host's own file).** ``_shadow_number`` refuses a sign, but
    strtoul takes ``-``: shadow 4.13 reads ``-0`` (and ``-0x0``, `` -00``) as 0, so a line
    ``user:-0:300000`` gives ``user`` ids 0-299,999 to map (agent ids from 200,000 among
    them) while hyperhive skips the line and hands those ids out. A negative other than
    zero wraps past 2^64 and shadow maps nothing from it (its ranges are checked without
    wrapping), so only the zero forms matter. Fix: take a leading ``-`` as strtoul does
    (negate modulo 2^64) and keep a range only when it doesn't wrap."""
    from hyperhive.priv.ids import _shadow_number

    agree = ["0", "16", " 16", "\t+020", "0x1F", "0X10", "+0x0", "08", "0x", "", " ", "1_0"]
    agree += ["18446744073709551615", "18446744073709551616", "1 ", "٣", "+"]
    for text in agree:
        assert _shadow_number(text) == shadow_getulong(text), text
    wrong = {t: (_shadow_number(t), shadow_getulong(t)) for t in ("-0", "-0x0", " -00")}
    assert all(ours == theirs for ours, theirs in wrong.values()), (
        f"hyperhive's reading vs shadow's: {wrong}"
    )


@pytest.mark.attack("budget.exhaustion", ref=REF)
def test_big_and_tiny_chunks_mixed_stay_within_what_4_kib_pieces_cost(
    sink_hive: HiveProcess,
) -> None:
    """Held by construction: the rule is an average, so big chunks buy tiny ones (a
    60 KiB chunk, then 6 one-byte chunks, again and again: the big one arrives as ~4 h11 events of a
    TLS record each, so ~6 KiB a piece). That is
    accepted, and it costs what the same bytes in 4 KiB pieces cost: one h11 event per
    4 KiB. 8 connections of 4 MiB each: all answered 200, the core's CPU small."""
    from .test_red_round23a import core_cpu

    mixed = "f000\r\n" + "x" * 0xF000 + "\r\n" + "1\r\nx\r\n" * 6
    cpu0 = core_cpu(sink_hive)
    out = cage_run(
        sink_hive, UPLOADER, UPLOAD, timeout=120, host="sink.r18r.test", conns=8, bytes=4 << 20,
        framing="Transfer-Encoding: chunked", chunk=mixed, tail="0\r\n\r\n",
    )["out"]  # fmt: skip
    cpu = core_cpu(sink_hive) - cpu0
    print(f"mixed chunks, 32 MiB: the core's CPU {cpu:.2f} s")
    assert [o["answer"] if isinstance(o, dict) else o for o in out] == ["HTTP/1.1 200 OK"] * 8
    assert cpu < 3.0, cpu


DOWNLOAD = TLS_CONNS + r"""
import os
HOST, PORT = P["host"], P["port"]
def one(i, out):
    t = tls_to(HOST, PORT, unix=P["unix"])
    t.sendall(f"POST /down HTTP/1.1\r\nHost: {HOST}:{PORT}\r\nContent-Length: 0\r\n\r\n".encode())
    # The answer's TLS records are read raw and thrown away: no decryption in the cage,
    # so the cage reads as fast as the core can write.
    raw = socket.socket(fileno=os.dup(t.fileno()))
    raw.settimeout(150)
    got = 0
    while True:
        try:
            chunk = raw.recv(1 << 20)
        except OSError:
            break
        if not chunk:
            break
        got += len(chunk)
    out[i] = {"raw_bytes": got}
each_conn(one)
"""


@pytest.mark.attack("budget.exhaustion", ref=REF)
def test_a_response_of_one_byte_chunks_costs_the_core_no_more_than_a_request_may(
    sink_hive: HiveProcess,
) -> None:
    """Held, as measured (the reason not pinned down). The piece rule covers request
    bodies only; a response is relayed through ``_cli_event`` and h11 event by event with
    no such rule. An agent whose allowlist reaches a server it controls (an L7 rule: the
    proxy terminates TLS) has it answer with a chunked body of one-byte chunks, and reads
    the relayed TLS records raw (no decryption in the cage), through egress.sock (no TCP
    in the cage). The core spends ~30 us of CPU an event (h11 parses and re-frames each),
    but the relay went through ~1,000 to 1,600 events a second whatever the number of
    connections (4 of 64 KiB of chunks: 42 s, the core's CPU 1.3 s; through the cage's
    127.0.0.1:3128 the same): the core's CPU share stays small. Nothing in the code bounds
    it, though: the same average-piece rule belongs in ``_relay_response``."""
    from .test_red_round23a import core_cpu

    cpu0, t0 = core_cpu(sink_hive), time.monotonic()
    out = cage_run(
        sink_hive,
        UPLOADER,
        DOWNLOAD,
        timeout=170,
        host="sink.r18r.test",
        port=TINY_PORT,
        conns=2,  # (4 took twice as long: the relay's events a second are the same)
        unix=True,
    )["out"]
    took, cpu = time.monotonic() - t0, core_cpu(sink_hive) - cpu0
    print(f"one-byte chunks answered: {out}; {took:.1f} s, the core's CPU {cpu:.2f} s")
    assert all(isinstance(o, dict) and o["raw_bytes"] > TINY_BYTES for o in out), out
    assert cpu < 0.25 * took, (
        f"2 responses of {TINY_BYTES >> 10} KiB of one-byte chunks: the core spent {cpu:.2f} s of CPU in"
        f" {took:.1f} s relaying them ({out})"
    )

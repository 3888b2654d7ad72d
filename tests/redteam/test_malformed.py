"""Malformed, oversized and slow input on every socket a cage can reach: its
agent.sock (JSON lines) and its egress.sock (the egress proxy, HTTP). Each bad
request gets its one-line refusal; the core keeps serving every other agent and
the operator meanwhile (``others_keep_working``: host.sock and rtcarol's
agent.sock answered quickly throughout); nothing is stored. Also: thousands of
connections at once (a per-uid cap, not the core's descriptor table, is what
runs out), partial lines held open (memory stays bounded) and requests written
without ever reading a reply (backpressure)."""

from __future__ import annotations

import secrets
import threading

import pytest

from hive_fixture import HiveProcess
from hyperhive.config import EgressSection
from hyperhive.core.egress import REFUSE_READ
from hyperhive.core.jsonlines import MAX_CONNECTIONS_PER_PEER
from hyperhive.wire.framing import MAX_LINE

from .conftest import (
    World,
    cage_run,
    changes,
    core_fds,
    core_rss_kib,
    others_keep_working,
    unchanged,
)

pytestmark = pytest.mark.attack('wire.malformed', ref='tinyproxy#627, OpenShell#1498')

# Lines (before their newline) and the exact refusal each gets.
GROUPS: dict[str, list[tuple[bytes, str]]] = {
    "not json": [
        (b"{", "malformed JSON: Expecting property name enclosed in double quotes at column 2"),
        (b"not json at all", "malformed JSON: Expecting value at column 1"),
        (b'{"cmd": whoami}', "malformed JSON: Expecting value at column 9"),
        (b"{'cmd': 'whoami'}", "malformed JSON: Expecting property name enclosed in double quotes at column 2"),
        (b'{"cmd": "whoami"} {"cmd": "whoami"}', "malformed JSON: Extra data at column 19"),
        (b'{"cmd": "whoami",}', "malformed JSON: Expecting property name enclosed in double quotes at column 18"),
        (b"\x00\x01\x02", "malformed JSON: Expecting value at column 1"),
    ],
    "not an object": [
        (b"[]", "request must be a JSON object, got list"),
        (b'["whoami"]', "request must be a JSON object, got list"),
        (b'"whoami"', "request must be a JSON object, got str"),
        (b"42", "request must be a JSON object, got int"),
        (b"null", "request must be a JSON object, got NoneType"),
        (b"true", "request must be a JSON object, got bool"),
    ],
    "encoding": [
        (b'{"cmd": "whoami", "x": "\xff\xfe"}', "malformed request: line is not valid UTF-8"),
        (b"\xc3\x28", "malformed request: line is not valid UTF-8"),
        (b'{"cmd": "whoami\xed\xa0\x80"}', "malformed request: line is not valid UTF-8"),
        (b"\xef\xbb\xbf{\"cmd\": \"whoami\"}",
         "malformed JSON: Unexpected UTF-8 BOM (decode using utf-8-sig) at column 1"),
        (b'{"cmd": "send", "to": "operator", "body": "a\\ud800b"}',
         "malformed request: a string holds a lone surrogate (\\ud800)"),
        (b'{"cmd": "request_approval", "kind": "custom", "description": "d", "payload": {"k": "\\udfff"}}',
         "malformed request: a string holds a lone surrogate (\\udfff)"),
        (b'{"cmd": "request_approval", "kind": "custom", "description": "d", "payload": {"\\ud83d": [1]}}',
         "malformed request: a string holds a lone surrogate (\\ud83d)"),
        (b'{"cmd": "request_approval", "kind": "custom", "description": "d", "payload": [[["\\udc00"]]]}',
         "malformed request: a string holds a lone surrogate (\\udc00)"),
    ],
    "numbers": [
        (b'{"cmd": "recv", "wait": NaN}', "malformed JSON: NaN is not valid JSON"),
        (b'{"cmd": "recv", "wait": Infinity}', "malformed JSON: Infinity is not valid JSON"),
        (b'{"cmd": "recv", "wait": -Infinity}', "malformed JSON: -Infinity is not valid JSON"),
        (b'{"cmd": "recv", "wait": 1e400}', "malformed request: number out of range"),
        (b'{"cmd": "ack", "ids": [100000000000000000000000]}', "malformed request: integer out of range (64-bit)"),
        (b'{"cmd": "ack", "ids": [' + b"9" * 5000 + b"]}", "malformed request: integer out of range (64-bit)"),
        (b'{"cmd": "request_approval", "kind": "custom", "description": "d", "payload": [1e999]}',
         "malformed request: number out of range"),
        (b'{"cmd": "recv", "wait": -1}', "field 'wait': Input should be greater than or equal to 0"),
        (b'{"cmd": "recv", "max": 0}', "field 'max': Input should be greater than or equal to 1"),
        (b'{"cmd": "remind", "in_seconds": 1e12, "text": "t"}',
         "field 'in_seconds': Input should be less than or equal to 31622400"),
    ],
    "nesting": [
        (b"[" * 100_000, "malformed JSON: nested too deeply"),
        (b'{"a":' * 50_000, "malformed JSON: nested too deeply"),
        (b'{"cmd": "request_approval", "kind": "custom", "description": "d", "payload": '
         + b"[" * 20_000 + b"]" * 20_000 + b"}", "malformed JSON: nested too deeply"),
    ],
    "commands": [
        (b"{}", "missing field 'cmd'"),
        (b'{"cmd": null}', "unknown command 'None'"),
        (b'{"cmd": 7}', "unknown command '7'"),
        (b'{"cmd": ["whoami"]}', "unknown command \"['whoami']\""),
        (b'{"cmd": "WHOAMI"}', "unknown command 'WHOAMI'"),
        (b'{"cmd": ""}', "unknown command ''"),
        (b'{"cmd": "whoami\\u0000"}', "unknown command 'whoami\\x00'"),
        (b'{"cmd": "send", "to": "rtbob"}', "missing field 'body'"),
        (b'{"cmd": "send", "to": "rtbob", "body": 5}', "field 'body': Input should be a valid string"),
        (b'{"cmd": "whoami", "extra": 1}', "unknown field 'extra'"),
    ],
}

LINES = """
c = Conn()
out = []
for raw in P["lines"]:
    reply = c.raw(raw.encode("latin-1") + b"\\n")
    follow = c.call({"cmd": "whoami"})  # the connection is still usable, still rtbob's
    out.append([reply, follow == {"version": 1, "ok": True, "name": "rtbob"}])
result(replies=out)
"""


@pytest.mark.parametrize("group", list(GROUPS))
def test_malformed_lines_on_agent_sock(rt: HiveProcess, world: World, group: str) -> None:
    lines = GROUPS[group]
    with unchanged(rt):
        res = cage_run(rt, "rtbob", LINES, lines=[raw.decode("latin-1") for raw, _ in lines])
    got = [(r["error"] if set(r) == {"version", "ok", "error"} and r["ok"] is False else r, usable)
           for r, usable in res["replies"]]
    assert got == [(text, True) for _, text in lines]


OVERSIZED = """
c = Conn(timeout=60)
pad = b" " * P["size"]
try:
    c.send(b'{"cmd": "send", "to": "rtbob", "body": "big"' + pad + b'}\\n')
except (BrokenPipeError, ConnectionResetError):
    pass  # hung up on before all of it was written; the reply is still there
reply = c.line()
try:
    c.send(b'{"cmd": "whoami"}\\n')
    after = c.line()
except (BrokenPipeError, ConnectionResetError) as e:
    after = errname(e)
result(reply=reply, after=after, fresh=call({"cmd": "whoami"}))
"""


@pytest.mark.parametrize("size", [MAX_LINE + 1, 4 * MAX_LINE], ids=["1MiB+1", "4MiB"])
def test_oversized_line_on_agent_sock(rt: HiveProcess, world: World, size: int) -> None:
    with unchanged(rt), others_keep_working(rt):
        res = cage_run(rt, "rtalice", OVERSIZED, size=size)
    assert res["reply"] == {"version": 1, "ok": False, "error": f"line exceeds {MAX_LINE} bytes; closing connection"}
    assert res["after"] in (None, "EPIPE", "ECONNRESET")  # it hung up: there is no resync in a stream
    assert res["fresh"] == {"version": 1, "ok": True, "name": "rtalice"}


SLOW = """
import threading
replies = {}

def dribble(i):
    c = Conn(timeout=60)
    req = {"cmd": "set_status", "text": P["text"]} if i == 0 else {"cmd": "whoami"}
    line = json.dumps(req).encode() + b"\\n"
    for b in line:  # one byte at a time, for several seconds
        c.send(bytes([b]))
        time.sleep(P["seconds"] / len(line))
    replies[i] = c.line()
    c.close()

def hold(i):  # a partial line, never finished
    c = Conn(timeout=60)
    c.send(b'{"cmd": "whoami", "pad": "' + b"x" * 60000)
    time.sleep(P["seconds"])
    c.close()

threads = [threading.Thread(target=dribble, args=(i,)) for i in range(P["n"])]
threads += [threading.Thread(target=hold, args=(i,)) for i in range(P["n"])]
for t in threads:
    t.start()
for t in threads:
    t.join()
result(replies=[replies[i] for i in range(P["n"])])
"""


def test_slow_loris_on_agent_sock(rt: HiveProcess, world: World) -> None:
    """Requests written a byte at a time and lines never finished, for several seconds
    on many connections: the core answers everyone else meanwhile, and still answers the
    slow requests correctly in the end."""
    n = 12
    text = "slow " + secrets.token_hex(4)  # new each run: setting the same text again changes no row
    with changes(rt) as ch, others_keep_working(rt) as lat:
        res = cage_run(rt, "rtmule", SLOW, n=n, seconds=4.0, text=text)
    assert ch.count() == {"agents": (1, 1)}  # the one slow set_status, and nothing else
    assert len(lat.samples) >= 10
    assert res["replies"][0]["ok"] is True and set(res["replies"][0]) == {"version", "ok", "status_set_at"}
    assert res["replies"][1:] == [{"version": 1, "ok": True, "name": "rtmule"}] * (n - 1)
    assert rt.agent_status()["rtmule"]["status_text"] == text


FLOOD = """
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
conns, refused, served, other = [], [], 0, {}
for i in range(P["n"]):
    try:
        c = Conn(timeout=None)  # a blocking connect waits for room in the listen backlog
        c.s.settimeout(20)
        conns.append(c)
    except OSError as e:
        other[errname(e)] = other.get(errname(e), 0) + 1
print("OPEN", len(conns), flush=True)
time.sleep(P["hold"])  # the host counts the core's descriptors meanwhile
for c in conns:
    try:
        c.send(b'{"cmd": "whoami"}\\n')
        reply = c.line()
    except OSError as e:
        reply = errname(e)
    if reply == {"version": 1, "ok": True, "name": "rtalice"}:
        served += 1
    else:
        refused.append(reply if isinstance(reply, str) else json.dumps(reply))
for c in conns:
    c.close()
result(opened=len(conns), served=served, refusals=sorted(set(refused)), refused=len(refused), other=other,
       fresh=call_when_free({"cmd": "whoami"}))
"""


def test_connection_flood_on_agent_sock_is_capped_per_uid(rt: HiveProcess, world: World) -> None:
    """An agent opens thousands of connections to its own agent.sock. Each uid may hold
    32 at once: the rest are refused with one line and closed, so the core's descriptor
    table (and memory) stays small and every other agent and the operator get in.
    Before the cap, an agent could use up the core's descriptors: nobody could connect."""
    h = rt
    n = 3000
    base = core_fds(h)
    peak = [base]
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], core_fds(h))
            stop.wait(0.05)

    counter = threading.Thread(target=count, daemon=True)
    counter.start()
    try:
        with unchanged(h), others_keep_working(h):
            res = cage_run(h, "rtalice", FLOOD, n=n, hold=2.0, timeout=180)
    finally:
        stop.set()
        counter.join(10)
    uid = h.cage("rtalice")["uid"]
    assert res["opened"] == n and res["other"] == {}
    assert res["served"] == MAX_CONNECTIONS_PER_PEER
    assert res["refused"] == n - MAX_CONNECTIONS_PER_PEER
    assert set(res["refusals"]) <= {
        f'{{"version": 1, "ok": false, "error": "too many connections: uid {uid} may have at most '
        f'{MAX_CONNECTIONS_PER_PEER} open on this socket at once; closing connection"}}',
        "EPIPE", "ECONNRESET",  # refused and closed before the probe got to it
    }, res["refusals"]
    # The cap's worth, plus refused connections not yet closed (the accept loop takes up to
    # a backlog's worth at a time); without the cap it was every one of the n.
    assert peak[0] < base + MAX_CONNECTIONS_PER_PEER + 700, (base, peak[0])
    assert res["fresh"] == {"version": 1, "ok": True, "name": "rtalice"}
    assert h.agent_status()["rtalice"]["running"]  # the harness (another uid) kept its connection


PARTIAL = """
conns = []
for i in range(P["n"]):
    try:
        c = Conn(timeout=20)
        c.send(b'{"cmd": "whoami", "pad": "' + b"x" * P["size"])  # just under a whole line, no newline
        conns.append(c)
    except OSError as e:
        pass
print("HOLDING", flush=True)
time.sleep(P["hold"])
for c in conns:
    c.close()
result(tried=P["n"], after=call_when_free({"cmd": "whoami"}))
"""


def test_partial_lines_cannot_grow_the_core_without_bound(rt: HiveProcess, world: World) -> None:
    """Hundreds of connections each holding almost a whole (1 MiB) line: only the
    per-uid cap's worth is ever read into the core."""
    h = rt
    n, size = 200, MAX_LINE - 100
    before = core_rss_kib(h)
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], core_rss_kib(h))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with unchanged(h), others_keep_working(h):
            res = cage_run(h, "rtmule", PARTIAL, n=n, size=size, hold=3.0, timeout=180)
    finally:
        stop.set()
        sampler.join(10)
    assert res == {"tried": n, "after": {"version": 1, "ok": True, "name": "rtmule"}}
    grown_mib = (peak[0] - before) / 1024
    # 32 partial lines of 1 MiB (and asyncio's buffer slack) at most; 200 would be 200+ MiB.
    assert grown_mib < 3 * MAX_CONNECTIONS_PER_PEER, f"the core grew by {grown_mib:.0f} MiB"


WRITE_FLOOD = """
import select
c = Conn(timeout=30)
c.s.setblocking(False)
line = b'{"cmd": "whoami"}\\n' * 1000
sent, deadline = 0, time.monotonic() + P["seconds"]
while time.monotonic() < deadline and sent < P["limit"]:
    _, w, _ = select.select([], [c.s], [], 0.5)
    if not w:
        continue  # the core stopped reading: it is waiting for us to read its replies
    try:
        sent += c.s.send(line)
    except BlockingIOError:
        pass
c.s.setblocking(True)
c.s.settimeout(30)
first = c.line()
c.close()
result(sent=sent, first=first)
"""


def test_requests_written_without_reading_replies_are_backpressured(rt: HiveProcess, world: World) -> None:
    """Pipelining requests and never reading the replies: the core stops reading that
    connection once its replies back up (it does not buffer without bound)."""
    h = rt
    before = core_rss_kib(h)
    with unchanged(h), others_keep_working(h):
        res = cage_run(h, "rtmule", WRITE_FLOOD, seconds=4.0, limit=200 * 1024 * 1024, timeout=120)
    assert res["first"] == {"version": 1, "ok": True, "name": "rtmule"}
    assert res["sent"] < 200 * 1024 * 1024  # it blocked well before the 200 MiB it tried
    assert core_rss_kib(h) - before < 64 * 1024


# -- egress.sock -----------------------------------------------------------------------------

EGRESS = """
def ask(data, *, slow=0.0, eof=True):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect("/run/hive/egress.sock")
    t0 = time.monotonic()
    try:
        if slow:
            for b in data:
                s.sendall(bytes([b]))
                time.sleep(slow)
        elif data:
            s.sendall(data)
        if eof:
            s.shutdown(socket.SHUT_WR)  # all of it: nothing more is coming
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        reply += chunk
    s.close()
    head, _, body = reply.decode(errors="replace").partition("\\r\\n\\r\\n")
    return [head.split("\\r\\n")[0], body.strip(), round(time.monotonic() - t0, 1)]

out = {}
for label, raw in P["requests"].items():
    out[label] = ask(raw.encode("latin-1"))
if P["slow"]:  # both at once: each waits out the proxy's 10 s head timeout
    import threading
    def slow():
        out["slow loris"] = ask(b"CONNECT example.com:443 HTTP/1.1\\r\\nX: " + b"y" * 20,
                                slow=0.05, eof=False)
    def silent():
        out["silent"] = ask(b"", eof=False)
    threads = [threading.Thread(target=slow), threading.Thread(target=silent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
result(sockets=sorted(os.listdir("/run/hive")), replies=out)
"""

EGRESS_BAD: dict[str, tuple[str, str, str]] = {
    "garbage": ("garbage\r\n\r\n", "HTTP/1.1 400 Bad Request", "hive egress: malformed request line"),
    "binary": ("\x00\xff\xfe\x01\r\n\r\n", "HTTP/1.1 400 Bad Request", "hive egress: malformed request line"),
    "http/2": ("CONNECT example.com:443 HTTP/2\r\n\r\n", "HTTP/1.1 400 Bad Request",
               "hive egress: unsupported protocol 'HTTP/2'"),
    "relative uri": ("GET /etc/passwd HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request",
                     "hive egress: only CONNECT, or plain HTTP with an absolute http:// URI, goes through this proxy"),
    "file uri": ("GET file:///etc/passwd HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request",
                 "hive egress: only CONNECT, or plain HTTP with an absolute http:// URI, goes through this proxy"),
    "oversized head": ("GET http://example.com/ HTTP/1.1\r\nX: " + "a" * 20000 + "\r\n\r\n",
                       "HTTP/1.1 431 Request Header Fields Too Large", "hive egress: request head over 16384 bytes"),
    "closed early": ("CONNECT example.com:443 HTTP/1.1\r\n", "HTTP/1.1 400 Bad Request",
                     "hive egress: connection closed before a complete request"),
}


def test_malformed_and_slow_requests_on_egress_sock(rt: HiveProcess, world: World) -> None:
    """The egress proxy's socket: garbage, other protocols, non-proxy URIs, an oversized
    head, a request cut short, one sent a byte at a time and one never sent. Every one
    gets its HTTP refusal (the slow ones after the 10 s head timeout), and the core
    answers everyone else meanwhile."""
    requests = {k: v[0] for k, v in EGRESS_BAD.items()}
    with unchanged(rt), others_keep_working(rt):
        res = cage_run(rt, "rtcarol", EGRESS, requests=requests, slow=True, timeout=120)
    # The two hive sockets, and the hive CA's certificate and bundle (public; issue 16).
    assert res["sockets"] == ["agent.sock", "ca-bundle.pem", "egress-handover.sock", "egress.sock", "hive-ca.pem"]
    replies = res["replies"]
    for label, (_, status, body) in EGRESS_BAD.items():
        assert replies[label][:2] == [status, body], (label, replies[label])
    timeout = ["HTTP/1.1 408 Request Timeout", "hive egress: request head not complete within 10 s"]
    assert replies["silent"][:2] == timeout and 9 <= replies["silent"][2] < 15, replies["silent"]
    # Byte by byte for ~3 s, then silence: cut off. (The proxy's deadline is checked between
    # reads, each of which may wait a whole 10 s: up to 20 s in all, not 10.)
    assert replies["slow loris"][:2] == timeout and 9 <= replies["slow loris"][2] < 21, replies["slow loris"]


EGRESS_FLOOD = """
conns, statuses = [], {}
for i in range(P["n"]):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("/run/hive/egress.sock")  # blocking: waits for room in the listen backlog
    conns.append(s)
time.sleep(P["settle"])
for s in conns:
    s.setblocking(False)
    try:
        text = s.recv(4096).decode(errors="replace")
        key = text.split("\\r\\n")[0] + " | " + text.rpartition("\\r\\n\\r\\n")[2].strip()
    except BlockingIOError:
        key = "(waiting)"
    statuses[key] = statuses.get(key, 0) + 1
for s in conns:
    s.close()
result(statuses=statuses)
"""


def test_connection_flood_on_egress_sock_is_capped(rt: HiveProcess, world: World) -> None:
    h = rt
    n = 400
    with unchanged(h), others_keep_working(h):
        # The last refusal waits REFUSE_READ for a request that never comes (no other
        # connection behind it): then its 503. Past a burst of twice [egress]
        # connections_per_second the listener takes them at that rate.
        rate = EgressSection().connections_per_second
        paced = max(0.0, (n - 2 * rate) / rate)
        res = cage_run(h, "rtcarol", EGRESS_FLOOD, n=n, settle=REFUSE_READ + 1.0 + paced, timeout=120)
    cap = EgressSection().max_connections  # the budgeted default (see hyperhive.core.budget)
    busy = f"HTTP/1.1 503 Service Unavailable | hive egress: at most {cap} egress connections at once per agent"
    assert res["statuses"] == {"(waiting)": cap, busy: n - cap}

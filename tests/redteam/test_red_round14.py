"""Red team round 14: session 9's changes from outside: the swarm's work-queue streams
(``HIVE_MAIL`` / ``HIVE_ACTIONS``, a consumer a pair, the senders' window read from the
receiver's consumer, the old streams drained), the operator's lifecycle actions bound to
an agent's incarnation (``created_at`` in the roster), the egress tunnel's growing relay
buffers and the harness's entries cut to what the core keeps.

Broke (fixed in this round):

- ``budget.exhaustion``: the relay (relay.py) grew a direction's buffer by allocating a
  new one while the empty slice of the old one it had just sent (``view``) stayed bound
  through the next read: a tunnel grown to 1 MiB and left idle held 1.5 MiB a direction,
  3 MiB a tunnel, past the 2 MiB docs/security.md's budget says.
- ``wire.deep-nesting``: the harness sent a runtime's JSON event as it is whatever its
  nesting; one deeper than the core's 64 levels (a model's tool call input, say) was
  refused, the harness connected again and the turn was delivered again, for good; and a
  line nested past json.loads's ~1,000 levels raised RecursionError out of the turn (a
  RuntimeError: the same loop). Now sent as marked text, and read as a plain line.
- ``swarm-host-spoofing``: c's own row with ``created_at`` an integer of 400 digits:
  ``incarnation()`` raised OverflowError (not a ValueError), which ended a's watch of c's
  bucket at that row on every try: c's later rows were never seen and its whole bucket
  was replayed each second. Now kept as no incarnation (a lifecycle action on it refused
  in one line).

Held: c's reach on the new streams (another pair's consumer info, acks, pulls, creates
and deletes, the stream's info, message gets, purges and deletes, publishing into the old
streams' subjects or another sender's pair); c's consumer info of its own pair counts
only its own pair.
"""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import socket
import threading
import time
import tracemalloc
from typing import Any

import pytest

from helpers import assert_ok, wait_for
from hyperhive.swarm import subjects as s
from swarm_faults import drain
from swarm_fixture import Swarm

from .test_swarm_hostile import as_host_c

# -- the egress tunnel's relay: its buffers ------------------------------------------------


@pytest.mark.attack("budget.exhaustion", ref="red team round 14: a tunnel grown to its largest buffer, then idle")
def test_an_idle_tunnel_holds_at_most_its_largest_buffer_a_direction() -> None:
    """A cage's client sends exactly what makes the relay's buffer double up to BUFFER_MAX
    (64 + 128 + 256 + 512 KiB, each read filling the buffer), then stops and keeps the
    tunnel open. The relay must hold at most BUFFER_MAX for that direction (the budget's
    1 MiB a direction, 2 MiB a tunnel), not the new buffer and the old one. Measured with
    tracemalloc around a real pump between two socket pairs (the relay's own code)."""
    from hyperhive import relay

    client, proxy_in = socket.socketpair()
    proxy_out, upstream = socket.socketpair()
    for sock in (client, proxy_in, proxy_out, upstream):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sent = relay.BUFFER_START * 15  # 64 Ki + 128 Ki + 256 Ki + 512 Ki: four full reads
    payload = b"x" * sent
    sink = bytearray(1 << 20)
    got = [0]

    def drain() -> None:
        while n := upstream.recv_into(sink):
            got[0] += n

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        pump = threading.Thread(target=relay.pump, args=(proxy_in, proxy_out), daemon=True)
        pump.start()
        client.sendall(payload)
        wait_for(lambda: got[0] == sent, timeout=10)
        time.sleep(0.3)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
        client.close()
        pump.join(timeout=10)
        reader.join(timeout=10)
        for sock in (proxy_in, proxy_out, upstream):
            sock.close()
    print(f"an idle direction grown to its largest buffer holds {held / 1024:.0f} KiB")
    assert held <= relay.BUFFER_MAX + 64 * 1024, held


# -- the harness: a runtime's events nested deeper than the core reads -----------------------


def _core_reads(entry_data: Any) -> None:
    """The harness's turn_record line (as Conn.call writes it) through the core's reader."""
    from hyperhive.wire.framing import parse_line

    line = json.dumps({"cmd": "turn_record", "turn": 1, "entries": [{"kind": "event", "data": entry_data}]})
    parse_line(line.encode())


def _nested(n: int) -> Any:
    value: Any = "deep"
    for _ in range(n):
        value = [value]
    return value


@pytest.mark.attack("wire.deep-nesting", ref="red team round 14: a runtime's event nested past the core's 64 levels")
@pytest.mark.parametrize("levels", [30, 61, 70, 500])
def test_a_deep_runtime_event_is_a_request_the_core_reads(levels: int) -> None:
    """Claude Code's stream-json events carry the model's tool call input as JSON: a peer's
    message can ask for a call whose input nests 70 lists deep. The harness records the
    event as data; the core refuses a request nesting past 64 (wire/framing.py), and a
    refused request makes the harness connect again, the turn delivered again: the same
    event, refused again, for good. What the harness sends of it must be a request the
    core reads (the event kept as it is while it fits)."""
    from hyperhive.cage import harness
    from hyperhive.cage.runtimes import ClaudeRuntime

    rt = ClaudeRuntime("r14", {"runtime": "claude"})
    event = {"type": "assistant", "message": {"content": [{"type": "tool_use", "name": "mcp__hive__send",
                                                           "input": {"body": _nested(levels)}}]}}
    kind, data = rt.stdout_entry(json.dumps(event))
    assert kind == "tool_call"
    fit = harness.fit_entry(data)
    _core_reads(fit)
    if levels <= 40:
        assert fit == event
    else:
        assert isinstance(fit, str) and fit.startswith("[nested deeper than"), str(fit)[:80]


@pytest.mark.attack("wire.deep-nesting", ref="red team round 14: a runtime's line nested past json.loads's recursion limit")
def test_a_line_nested_past_the_decoder_is_a_plain_line() -> None:
    """A line of 5,000 ``[`` (10 KB, under the harness's 16 Ki characters an entry): the
    Claude runtime's json.loads raised RecursionError, a RuntimeError, out of the turn;
    serve_forever took it as a refused request and connected again, and the turn was
    delivered again for good. It must be a plain stdout line."""
    from hyperhive.cage import harness
    from hyperhive.cage.runtimes import ClaudeRuntime

    line = "[" * 5000 + "]" * 5000
    kind, data = ClaudeRuntime("r14", {"runtime": "claude"}).stdout_entry(line)
    assert (kind, data) == ("stdout", line)
    _core_reads(harness.fit_entry(data))


# -- the swarm: host c against the work queues ----------------------------------------------

C_ONLY = [
    # another pair's consumers: what a sent b, and what b sent a
    ("pub", f"$JS.API.CONSUMER.INFO.{s.STREAM}.{s.consumer('b', 'a')}"),
    ("pub", f"$JS.API.CONSUMER.INFO.{s.STREAM}.{s.consumer('a', 'b')}"),
    ("pub", f"$JS.API.CONSUMER.INFO.{s.OPS_STREAM}.{s.ops_consumer('b', 'a')}"),
    ("pub", f"$JS.API.CONSUMER.MSG.NEXT.{s.STREAM}.{s.consumer('b', 'a')}"),
    # acking a's bundle to b on b's consumer would take it off the work queue unread
    ("pub", f"$JS.ACK.{s.STREAM}.{s.consumer('b', 'a')}.1.1.1.0.0"),
    ("pub", f"$JS.ACK.{s.OPS_STREAM}.{s.ops_consumer('b', 'a')}.1.1.1.0.0"),
    ("pub", f"$JS.ACK.{s.LEGACY_STREAM}.{s.consumer('b', 'a')}.1.1.1.0.0"),
    # its own pair to b, as the receiver: pulling or acking its own bundles before b reads
    ("pub", f"$JS.API.CONSUMER.MSG.NEXT.{s.STREAM}.{s.consumer('b', 'c')}"),
    ("pub", f"$JS.ACK.{s.STREAM}.{s.consumer('b', 'c')}.1.1.1.0.0"),
    # making, replacing or deleting consumers (a's pair's: a then reads a window of 0)
    ("pub", f"$JS.API.CONSUMER.DURABLE.CREATE.{s.STREAM}.{s.consumer('b', 'a')}"),
    ("pub", f"$JS.API.CONSUMER.CREATE.{s.STREAM}.{s.consumer('b', 'a')}"),
    ("pub", f"$JS.API.CONSUMER.CREATE.{s.STREAM}"),
    ("pub", f"$JS.API.CONSUMER.DELETE.{s.STREAM}.{s.consumer('b', 'a')}"),
    ("pub", f"$JS.API.CONSUMER.DELETE.{s.STREAM}.{s.consumer('b', 'c')}"),
    ("pub", f"$JS.API.CONSUMER.NAMES.{s.STREAM}"),
    ("pub", f"$JS.API.CONSUMER.LIST.{s.STREAM}"),
    # the streams: per-subject counts (every pair's traffic), messages, trims
    ("pub", f"$JS.API.STREAM.INFO.{s.STREAM}"),
    ("pub", f"$JS.API.STREAM.INFO.{s.OPS_STREAM}"),
    ("pub", f"$JS.API.STREAM.MSG.GET.{s.STREAM}"),
    ("pub", f"$JS.API.STREAM.MSG.GET.{s.LEGACY_STREAM}"),
    ("pub", f"$JS.API.DIRECT.GET.{s.STREAM}"),
    ("pub", f"$JS.API.STREAM.PURGE.{s.STREAM}"),
    ("pub", f"$JS.API.STREAM.MSG.DELETE.{s.STREAM}"),
    ("pub", f"$JS.API.STREAM.UPDATE.{s.STREAM}"),
    # into the old streams (read first after an upgrade), and another sender's pair
    ("pub", f"{s.LEGACY_MSG_ROOT}.b.from.c"),
    ("pub", "hive.op.b.from.c"),
    ("pub", s.msg_subject("b", "a")),
    ("pub", s.op_subject("b", "a")),
    ("pub", f"{s.MSG_ROOT}.b.from.c.x"),
    # the replies to a's consumer info requests (a's inbox): a told b is full
    ("sub", f"{s.inbox_prefix('a')}.>"),
]


@pytest.mark.attack("swarm-pair-bound", ref="red team round 14: c's reach on HIVE_MAIL / HIVE_ACTIONS beyond its own pairs")
def test_c_reaches_no_other_pair_on_the_work_queues(swarm: Swarm) -> None:
    """The senders' window gave every host INFO on the consumers of its own pairs; the
    streams are work queues, where an ack removes a message. As host c: each request,
    ack, pull, create, delete, purge, get and publish on another pair (or on its own
    pair as its receiver), on the streams themselves and into the old streams' subjects
    is a permissions violation; nothing of a's to b is touched (a's next message to bob
    arrives, once). The INFO c may read (b's consumer of c's bundles) counts c's pair only."""
    infos: list[dict[str, Any]] = []

    async def attack(nc: Any) -> None:
        reply = f"{s.inbox_prefix('c')}.r14"
        for how, subject in C_ONLY:
            if how == "sub":
                await nc.subscribe(subject)
            else:
                await nc.publish(subject, b"{}", reply=reply)
            await nc.flush()
        # Its own pair's INFO (allowed): filtered on its own subject.
        got = await nc.request(f"$JS.API.CONSUMER.INFO.{s.STREAM}.{s.consumer('b', 'c')}", b"", timeout=10)
        infos.append(json.loads(got.data))
        await asyncio.sleep(2.0)  # the server's -ERRs come asynchronously

    errors = as_host_c(swarm, attack, settle=0)
    missing = [subject for _, subject in C_ONLY if not any("permissions violation" in e and subject.lower() in e
                                                               for e in errors)]
    assert not missing, (missing, errors[:5])
    info = infos[0]
    assert info.get("config", {}).get("filter_subject") == s.msg_subject("b", "c"), info
    body = f"r14 alice after c's reach {time.time()}"
    assert_ok(swarm.cores["a"].agent("alice").call("send", to="bob", body=body))
    got = drain(swarm, "b", "bob", 1, timeout=20, extra=1.0)
    assert [(m["from"], m["body"]) for m in got] == [("alice", body)], got


@pytest.mark.attack("swarm-host-spoofing", ref="red team round 14: c's row with a created_at past a double's range")
@pytest.mark.parametrize("created", [b"9" * 400, b"-" + b"9" * 400, b"1e400", b"true", b'"1.5"'],
                         ids=["digits400", "minus-digits400", "1e400", "true", "string"])
def test_cs_row_with_an_unreadable_incarnation_stops_no_watch(swarm: Swarm, created: bytes) -> None:
    """c's own agent row whose ``created_at`` is an integer of 400 digits (JSON's numbers
    have no bound; Python reads it as an int, and float() of it raises OverflowError, not a
    ValueError), then an ordinary row. a must list the ordinary one (its watch of c's bucket
    goes on past the bad row), list the bad one with no incarnation, and refuse a lifecycle
    action on it in one line, nothing carried; a's own steering of b's bob still works."""
    bad = b'{"name": "r14big", "host": "c", "running": true, "paused": false, "status_text": "x", "created_at": ' + created + b"}"
    ok_row = b'{"name": "r14ok", "host": "c", "running": true, "paused": false, "status_text": "fine", "created_at": 5.0}'
    keys = (s.row_key("c", "r14big"), s.row_key("c", "r14ok"))

    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        await js.publish(s.kv_subject("c", keys[0]), bad)
        await js.publish(s.kv_subject("c", keys[1]), ok_row)

    async def tidy(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        for key in keys:
            await js.publish(s.kv_subject("c", key), b"", headers={"KV-Operation": "DEL"})

    a = swarm.cores["a"]
    try:
        assert as_host_c(swarm, attack, settle=0) == []
        wait_for(lambda: any(r["name"] == "r14ok" for r in swarm.status("a")["agents"]), timeout=15)
        rows = {r["name"]: r for r in swarm.status("a")["agents"] if r["host"] == "c"}
        assert rows["r14ok"].get("created_at") == 5.0, rows["r14ok"]
        assert "r14big" in rows and rows["r14big"].get("created_at") is None, rows.get("r14big")
        reply = a.host_call("set_paused", name="r14big", paused=True, host="c")
        assert not reply.get("ok") and "created_at" in reply.get("error", ""), reply
        reply = a.host_call("set_paused", name="bob", paused=True, host="b")
        assert reply.get("ok") and reply.get("applied"), reply
    finally:
        as_host_c(swarm, tidy, settle=0)
        a.host_call("set_paused", name="bob", paused=False, host="b")
        swarm.cores["b"].host_call("set_paused", name="bob", paused=False)


@pytest.mark.attack("swarm-consumer-flood", ref="red team round 14: c floods the consumer info it may read, while a's sends to b ask theirs")
def test_cs_consumer_info_flood_stalls_no_others_pair(swarm: Swarm) -> None:
    """The senders' window gave c INFO on b's consumer of c's bundles, a JetStream API
    request each. c sends them as fast as its link goes (replies unread) for the whole
    test; meanwhile a's carried action asks b's consumer of its actions first, and alice
    sends bob 60 messages one at a time (past the window of 48: a asks b's consumer again). Each must reach bob
    within MAX_LATENCY seconds, a's pause of bob must be applied, and a must never hold b
    as full (an INFO that timed out counts as a full window: bridge.py's ``_unacked``)."""
    stop = threading.Event()
    sent = [0]
    errors: list[list[str]] = []

    async def flood(nc: Any) -> None:
        subject = f"$JS.API.CONSUMER.INFO.{s.STREAM}.{s.consumer('b', 'c')}"
        reply = f"{s.inbox_prefix('c')}.r14flood"
        while not stop.is_set():
            for _ in range(500):
                await nc.publish(subject, b"", reply=reply)
            sent[0] += 500
            await nc.flush()

    flooder = threading.Thread(target=lambda: errors.append(as_host_c(swarm, flood, settle=0)), daemon=True)
    a = swarm.cores["a"]
    latencies: list[float] = []
    full_seen: list[list[str]] = []
    try:
        flooder.start()
        wait_for(lambda: sent[0] >= 5000, timeout=30)
        reply = a.host_call("set_paused", name="bob", paused=True, host="b")
        assert reply.get("ok") and reply.get("applied"), reply
        a.host_call("set_paused", name="bob", paused=False, host="b")
        for i in range(s.MAIL_WINDOW + 12):  # a's count passes the window: it asks again
            body = f"r14 alice under c's info flood {i} {time.time()}"
            started = time.monotonic()
            assert_ok(a.agent("alice").call("send", to="bob", body=body))
            got = drain(swarm, "b", "bob", 1, timeout=30, extra=0)
            latencies.append(time.monotonic() - started)
            full_seen.append(swarm.status("a")["full"])
            assert [(m["from"], m["body"]) for m in got] == [("alice", body)], got
    finally:
        stop.set()
        flooder.join(timeout=30)
        swarm.cores["b"].host_call("set_paused", name="bob", paused=False)
    print(f"c sent {sent[0]} consumer infos; alice -> bob took at most {max(latencies):.2f} s (median {sorted(latencies)[len(latencies) // 2]:.3f}); a's full: {sorted(set(map(tuple, full_seen)))}")
    assert errors == [[]], errors
    assert max(latencies) < MAX_LATENCY, latencies
    assert not any("b" in f for f in full_seen), full_seen


MAX_LATENCY = 5.0


def _raw_reply(sock_path: Any, request: dict[str, Any]) -> bytes:
    """One host.sock reply line as the core wrote it (the test client's json.loads would
    take NaN; a strict reader does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(sock_path))
        conn.sendall(json.dumps(request).encode() + b"\n")
        with conn.makefile("rb") as f:
            return f.readline()


@pytest.mark.attack("swarm-host-spoofing", ref="red team round 14: NaN and a 70-bit integer in c's approval payload")
def test_cs_nan_payload_makes_no_reply_invalid_json(swarm: Swarm) -> None:
    """The wire writes a reply with orjson, and with the stdlib's encoder what orjson
    can't (an integer past 64 bits), which writes NaN as ``NaN``: not JSON. c's approval
    whose payload holds both (the watch's json.loads took NaN) was listed by a, and a's
    ``swarm_status`` and ``pending`` replies were invalid JSON for any strict reader (the
    core's own refuses them) while it stood. Every reply must be strict JSON (the row is
    refused as any malformed JSON from another host is)."""
    from hyperhive.wire.framing import parse_line

    aid = 991400
    row = (b'{"agent": "evil", "kind": "custom", "description": "nan", "payload": {"x": NaN, "y": -Infinity, "big": '
           + str(2**70).encode() + b'}, "payload_sha256": "' + b"a" * 64 + b'"}')  # fmt: skip
    evil = {"name": "evil", "running": True, "paused": False, "status_text": "nan"}
    core_c = swarm.cores["c"]
    assert core_c.proc is not None
    a = swarm.cores["a"]

    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        await js.publish(s.kv_subject("c", s.row_key("c", "evil")), json.dumps(evil).encode())
        await js.publish(s.kv_subject("c", s.approval_key("c", aid)), row)

    async def tidy(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        for key in (s.row_key("c", "evil"), s.approval_key("c", aid)):
            await js.publish(s.kv_subject("c", key), b"", headers={"KV-Operation": "DEL"})

    core_c.proc.send_signal(signal.SIGSTOP)  # its relay would delete the row it did not publish
    try:
        assert as_host_c(swarm, attack, settle=0) == []
        wait_for(lambda: any(r["name"] == "evil" for r in swarm.status("a")["agents"]), timeout=15)
        time.sleep(1.0)  # the approval's key came after the row's
        assert aid not in [r["id"] for r in swarm.status("a")["approvals"] if r["host"] == "c"]
        for cmd in ("swarm_status", "pending"):
            line = _raw_reply(a.host_sock, {"cmd": cmd})
            parse_line(line.rstrip(b"\n"))  # strict: NaN and Infinity refused
    finally:
        core_c.proc.send_signal(signal.SIGCONT)
        as_host_c(swarm, tidy, settle=0)


EVIL = "\"'><i id=r14x onmouseover=alert(1)></textarea></pre></li></form><script>r14()</script>"


@pytest.mark.attack("swarm-page-injection", ref="red team round 14: markup in every field of c's rows, through cockpit/items.html")
def test_cs_markup_in_every_item_field_is_text_on_a(swarm: Swarm) -> None:
    """The cockpit's items are one macro each now (cockpit/items.html), drawn on a's
    dashboard and on a's page of c's agent. c lists a question and an approval (its core
    stopped, so nothing deletes them) with markup that closes attributes and elements in
    every field it controls: status text, question, options, asked_at, description, kind,
    grants, allows, requested_at, a payload that is a string, and cut counts in
    ``truncated``. Both pages must draw them as text: none of the markup's elements or
    attributes appears as markup, and the rows are listed (their ids, per host)."""
    from .test_swarm_pages_hostile import login

    qid, aid = 991401, 991402
    evil = {"name": "evil", "running": True, "paused": False, "status_text": EVIL, "created_at": 1.0}
    question = {"id": qid, "asker": "evil", "question": EVIL, "options": [EVIL, EVIL + "2"], "asked_at": EVIL,
                "truncated": {"question": 99, "options": 7, EVIL: 1}}
    approval = {"agent": "evil", "kind": EVIL, "description": EVIL, "payload": EVIL, "payload_sha256": "b" * 64,
                "requested_at": EVIL, "grants": EVIL, "allows": EVIL,
                "truncated": {"description": 5, "payload": 3}}
    keys = {s.row_key("c", "evil"): evil, s.question_key("c", qid): question, s.approval_key("c", aid): approval}
    core_c = swarm.cores["c"]
    assert core_c.proc is not None

    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        for key, value in keys.items():
            await js.publish(s.kv_subject("c", key), json.dumps(value).encode())

    async def tidy(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        for key in keys:
            await js.publish(s.kv_subject("c", key), b"", headers={"KV-Operation": "DEL"})

    web = login(swarm)
    core_c.proc.send_signal(signal.SIGSTOP)
    try:
        assert as_host_c(swarm, attack, settle=0) == []
        wait_for(lambda: aid in [r["id"] for r in swarm.status("a")["approvals"] if r["host"] == "c"], timeout=15)
        for path in ("/", "/swarm/c/agent/evil/"):
            page = web.get(path)
            assert page.status_code == 200, (path, page.text[-500:])
            text = page.text
            assert f'id="question-c-{qid}"' in text and f'id="approval-c-{aid}"' in text, path
            for raw in ("<i id=r14x", "<script>r14()", "onmouseover=alert(1)>", "'><i", "</textarea></pre></li></form><script"):
                assert raw not in text, (path, raw, text[max(0, text.find(raw) - 300):text.find(raw) + 100])
            assert "&lt;i id=r14x" in text, path
    finally:
        core_c.proc.send_signal(signal.SIGCONT)
        as_host_c(swarm, tidy, settle=0)
        web.close()

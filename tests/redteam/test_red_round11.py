"""Red team round 11: a hostile host (c, with its core's real NATS credentials, as
``as_host_c`` does) against the operator's steering of other hosts' agents (signed
actions carried on ``hive.op.<r>.from.<s>``, read raw by ``swarm/pull.py``), round 10's
fixes (the watch's and the puller's reading of stored Status headers) and the per-host
roster buckets; and a hostile agent in its cage reaching for that steering.

Broke (fixed in this round):

- ``swarm-reserved-sender``: no agent may be named ``operator``, so no honest host
  claims it; c did, in its own bucket, owned it, and b delivered c's message "from
  operator" to bob.
- ``swarm-ops-flood``: b read every sender's actions on one consumer, one at a time;
  20,000 refused ones c published in a second kept a's pause of bob from being applied
  within its 10 s (enough would outlast its 5 minutes).
- ``swarm-msg-id-poisoning``: a message id is a prefix and a count that c reads off a's
  messages to it; c published a's next bundle ids first and JetStream's stream-wide
  dedup dropped a's bundles to bob; c sent bob its own messages under a's next row ids and
  b's ``swarm_seen`` skipped alice's.

- ``swarm-store-fill`` (fixed in session 9): the streams kept what c published for their
  max age, read or not, on any receiving token: now work queues bounded per pair of hosts
  (``swarm-pair-bound``), each permission naming a configured host.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest

from helpers import assert_ok, wait_for
from hive_fixture import HiveProcess
from hyperhive.swarm import subjects as s
from hyperhive.swarm.natsconf import host_permissions
from hyperhive.swarm.signing import load_or_create_key, seal
from swarm_faults import drain, take
from swarm_fixture import Swarm

from .test_swarm_hostile import as_host_c, cpu_seconds, flood_while_calling, violation

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


async def _admin(swarm: Swarm) -> Any:
    user, password = swarm.net.admin()
    return await nats.connect(swarm.net.urls("a"), user=user, password=password)


def _row(sender: str, to: str, body: str) -> dict[str, Any]:
    return {"id": f"r11-{uuid.uuid4().hex}", "from": sender, "to": to, "kind": "message",
            "body": body, "sent_at": time.time()}


@pytest.mark.attack("swarm-reserved-sender", ref="red team round 11: c claims the name 'operator' and speaks for it")
@pytest.mark.parametrize("reserved", ["operator", "hive"])
def test_c_cannot_speak_to_bob_as_the_operator(swarm: Swarm, reserved: str) -> None:
    """No agent may be named ``operator`` (or ``hive``, ``core``, ``all``), so no honest
    host ever claims those names; but a claim key ``names.<n>.c`` is one c may write
    (``names.*.c``), and a received message's sender need only be a name (NAME_RE) that
    the roster gives to the sending host. So c claims ``operator`` in its own bucket,
    owns it, and publishes on its own subject to b a message "from operator" to bob.
    bob must never get it: the operator's word reaches another host's agent only as a
    signed action (``send`` carried from a pinned operator). A message from c's own
    carol after it (the same consumer, in order) shows b has read past it."""
    claim = s.kv_subject("c", s.name_key(reserved, "c"))
    forged = _row(reserved, "bob", f"r11 forged from {reserved}")
    marker = _row("carol", "bob", "r11 after the forged one")

    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        await js.publish(claim, b"c")
        for row in (forged, marker):
            await js.publish(s.msg_subject("b", "c"), json.dumps([row]).encode(),
                             headers={"Nats-Msg-Id": f"{row['id']}:1"})

    async def tidy(nc: Any) -> None:
        await nc.jetstream(timeout=10).publish(claim, b"", headers={"KV-Operation": "DEL"})

    try:
        assert as_host_c(swarm, attack, settle=0) == []
        got = drain(swarm, "b", "bob", 1, timeout=15, extra=1.0)
        assert [(m["from"], m["body"]) for m in got] == [("carol", marker["body"])], got
    finally:
        as_host_c(swarm, tidy, settle=0)


def _ops_pending(swarm: Swarm, consumer: str) -> int:
    """As the admin: what ``consumer`` of HIVE_OPS has yet to hand out."""

    async def go() -> int:
        nc = await _admin(swarm)
        try:
            return (await nc.jetstream().consumer_info(s.OPS_STREAM, consumer)).num_pending or 0
        finally:
            await nc.close()

    return asyncio.run(go())


def _purge_ops(swarm: Swarm, subject: str) -> None:
    async def go() -> None:
        nc = await _admin(swarm)
        try:
            await nc.jetstream().purge_stream(s.OPS_STREAM, subject=subject)
        finally:
            await nc.close()

    asyncio.run(go())


@pytest.mark.attack("swarm-ops-flood", ref="red team round 11: c's refused actions queue ahead of the operator's on b's one actions consumer")
def test_cs_refused_actions_do_not_delay_the_operators(swarm: Swarm) -> None:
    """c may publish on its own actions subject to b (``hive.op.b.from.c``); b obeys no
    operator of c's, so each is refused and acked, but one at a time, in the stream's
    order, on the one consumer every sender's actions share. c publishes R11N (20,000)
    small ones (a few seconds for c, 0.2 MB); a's pause of bob, published after them, must
    still be applied on b within the 10 s the operator's request waits, and so well
    before its 5 minutes are up (behind a backlog of minutes it would be refused as too
    old when b reached it: c would silence the operator on b for as long as it liked).
    Before the fix b had read 16,900 of them (about 1,500 a second) when a's request gave
    up; c publishes 20,000 in about a second."""
    n = int(os.environ.get("R11N", "20000"))
    subject = s.op_subject("b", "c")

    refused: list[BaseException] = []

    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=30)
        for start in range(0, n, 500):
            got = await asyncio.gather(*(js.publish(subject, b"{}") for _ in range(start, min(n, start + 500))),
                                       return_exceptions=True)
            refused.extend(r for r in got if isinstance(r, BaseException))

    a = swarm.cores["a"]
    try:
        t0 = time.monotonic()
        assert as_host_c(swarm, attack, settle=0) == []
        published = time.monotonic() - t0
        reply = a.host_call("set_paused", name="bob", paused=True, host="b")
        backlog = {c: _ops_pending(swarm, s.ops_consumer("b", c)) for c in "ac"}
        print(f"c published {n} actions in {published:.1f} s ({len(refused)} refused); a's reply {reply};"
              f" b's backlog after it: {backlog}")
        assert reply.get("ok") and reply.get("applied"), (reply, "b's actions consumer still holds", backlog)
        # b reads none of c's (it obeys no operator of c's), and the bus keeps only the
        # pair's newest (session 9: c's older ones trimmed, none of a's).
        assert backlog == {"a": 0, "c": min(n, s.ACTIONS_PAIR_MSGS)}, backlog
        assert refused == [], refused[:3]
    finally:
        _purge_ops(swarm, subject)
        a.host_call("set_paused", name="bob", paused=False, host="b")
        swarm.cores["b"].host_call("set_paused", name="bob", paused=False)


@pytest.mark.attack("swarm-ops-jam", ref="red team round 11: stored actions with any status header, on an obeyed host's own subject")
def test_stored_status_headers_on_a_pinned_hosts_subject_jam_nothing(swarm: Swarm) -> None:
    """b now reads only its pinned operators' hosts' consumers (``ops-b_a``), so round
    10's forged ``Status`` headers on c's subject reach no reader. Someone with a's NATS
    password but not its operator key (they are two files) may still publish on a's
    subject: stored actions carrying each status the server's own replies use (100 with
    and without ``Nats-Last-Consumer``, 404, 408 with ``Nats-Pending-Messages``, 409, 503,
    an empty body or a sealed-looking one) must each be read as data (the puller tells
    a stored message by its ``$JS.ACK`` reply: pull.py), refused and acked, and a's real
    pause of bob after them applied within its 10 s."""
    subject = s.op_subject("b", "a")
    headers = [
        {"Status": "100"}, {"Status": "100", "Description": "Idle Heartbeat", "Nats-Last-Consumer": "999"},
        {"Status": "404", "Description": "No Messages"},
        {"Status": "408", "Description": "Request Timeout", "Nats-Pending-Messages": "1", "Nats-Pending-Bytes": "0"},
        {"Status": "409", "Description": "Consumer Deleted"}, {"Status": "503"},
    ]
    bodies = [b"", b'{"action": {}, "sig": ""}']
    before = swarm.status("b")["actions_refused"]

    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        for h in headers:
            for body in bodies:
                await js.publish(subject, body, headers=h)

    a = swarm.cores["a"]
    try:
        assert as_host_c(swarm, attack, host="a", settle=0) == []
        reply = a.host_call("set_paused", name="bob", paused=True, host="b")
        assert reply.get("ok") and reply.get("applied"), reply
        rows = swarm.cores["b"].host_call("agent_status")["agent_statuses"]
        assert [r["paused"] for r in rows if r["name"] == "bob"] == [True], rows
        status = swarm.status("b")
        assert status["actions_refused"] == before + len(headers) * len(bodies), status
        assert _ops_pending(swarm, s.ops_consumer("b", "a")) == 0
    finally:
        _purge_ops(swarm, subject)
        a.host_call("set_paused", name="bob", paused=False, host="b")
        swarm.cores["b"].host_call("set_paused", name="bob", paused=False)


@pytest.mark.attack("swarm-push-delivery", ref="red team round 11: c's watch delivering to a wildcard under b's reply subjects")
def test_cs_watch_cannot_deliver_into_bs_reply_subjects_by_wildcard(swarm: Swarm) -> None:
    """b's roster watches and its actions puller listen on ``_INBOX_b.<random>`` subjects:
    a delivery there with a ``$JS.ACK`` reply is taken as data (round 10's rule). c can't
    learn them (no INFO of b's consumers, no subscription outside ``_INBOX_c``), so it
    names a wildcard as its own watch's deliver subject: ``_INBOX_b.>``,
    ``_INBOX_b.pull.*``, ``_INBOX_b.w.c.*``. The server must refuse each create (a
    deliver subject is a literal), and c's consumer must not exist after."""
    stream = s.kv_stream("c")
    own = s.watcher("c")
    replies: list[dict[str, Any]] = []

    async def attack(nc: Any) -> None:
        for deliver in (f"{s.inbox_prefix('b')}.>", f"{s.inbox_prefix('b')}.pull.*", f"{s.inbox_prefix('b')}.w.c.*"):
            config = {"name": own, "deliver_subject": deliver, "ack_policy": "none", "deliver_policy": "all",
                      "filter_subject": s.kv_subject("c", ">")}
            body = json.dumps({"stream_name": stream, "config": config}).encode()
            replies.append(json.loads((await nc.request(f"$JS.API.CONSUMER.CREATE.{stream}.{own}.{config['filter_subject']}",
                                                        body, timeout=10)).data))

    async def info(nc: Any) -> None:
        reply = json.loads((await nc.request(f"$JS.API.CONSUMER.INFO.{stream}.{own}", b"", timeout=10)).data)
        replies.append(reply)
        if "error" not in reply:  # put c's own watch back as its core makes it
            await nc.request(f"$JS.API.CONSUMER.DELETE.{stream}.{own}", b"", timeout=10)

    assert as_host_c(swarm, attack, settle=0) == []
    made = [r for r in replies if "error" not in r]
    assert as_host_c(swarm, info, settle=0) == []
    assert not made, made
    assert all("deliver subject" in r["error"]["description"].lower() for r in replies[:3]), replies
    deliver = replies[-1].get("config", {}).get("deliver_subject", "")
    assert not deliver.startswith(s.inbox_prefix("b")), replies[-1]


@pytest.mark.attack("swarm-roster-fill", ref="red team round 11: every host watches c's bucket: c's puts cost every host's core")
def test_cs_put_flood_costs_each_watcher_little(swarm: Swarm) -> None:
    """Every host watches every bucket, so each put c makes in its own bucket is work for
    every host's core (a push delivery, a JSON row, a roster event): c overwrites 50 rows
    of its own as fast as the bus takes them for R11S (6) seconds, then one last row.
    a's core must have taken every one (the last row in its roster) at a small CPU cost a
    put (measured: 13–22 µs; bounded at 150 µs, so c's puts can't keep a's core busy),
    and alice's calls on a's agent socket stay answered meanwhile."""
    secs = float(os.environ.get("R11S", "6"))
    a = swarm.cores["a"]
    assert a.proc is not None
    puts = [0]
    stop = time.monotonic() + secs

    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=30)
        row = json.dumps({"name": "r11f", "host": "c", "running": True, "paused": False, "status_text": "x"}).encode()
        while time.monotonic() < stop:
            await asyncio.gather(*(js.publish(s.kv_subject("c", s.row_key("c", f"r11f{k}")), row) for k in range(50)))
            puts[0] += 50
        await js.publish(s.kv_subject("c", s.row_key("c", "r11fend")), row)

    async def tidy(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        for name in [f"r11f{k}" for k in range(50)] + ["r11fend"]:
            await js.publish(s.kv_subject("c", s.row_key("c", name)), b"", headers={"KV-Operation": "DEL"})

    alice = a.agent("alice")
    cpu0 = cpu_seconds(a.proc.pid)
    try:
        slowest = flood_while_calling(swarm, attack, alice)
        wait_for(lambda: any(r["name"] == "r11fend" for r in swarm.status("a")["agents"]), timeout=30)
        cost = (cpu_seconds(a.proc.pid) - cpu0) / puts[0]
        print(f"c put {puts[0]} rows in {secs:.0f} s; a's core {cost * 1e6:.1f} µs of CPU a put; "
              f"alice's slowest whoami {slowest * 1e3:.0f} ms")
        assert puts[0] > 10_000 and cost < 150e-6, (puts[0], cost)
        assert slowest < 2.0, slowest
    finally:
        as_host_c(swarm, tidy, settle=0)


def _stored_on(swarm: Swarm, stream: str, subject: str) -> int:
    """As the admin: the bytes ``stream`` holds on ``subject``."""

    async def go() -> int:
        nc = await _admin(swarm)
        try:
            reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}",
                                     json.dumps({"subjects_filter": subject}).encode(), timeout=10)
            info = json.loads(reply.data)
            msgs = sum((info["state"].get("subjects") or {}).values())
            # Every message c sent here is the same size: its count is what it holds.
            return int(msgs)
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.mark.attack("swarm-store-fill", ref="red team round 11: what c publishes stays in the cluster's store, read or not")
def test_c_cannot_keep_the_clusters_store_full(swarm: Swarm) -> None:
    """Each host's roster is bounded in a bucket of its own (64 MiB), but the message and
    action streams were shared and bounded by age only (limits retention): c publishes
    1 MB payloads on its own subjects, one that b reads and drops (its pair to b: not a
    bundle), and two no host reads (to ``zz``, no such host, on both streams: ``*`` in
    c's permissions took any token). Each node's JetStream store was 4 GB (natsconf.py;
    now sized from the hosts, at least that), R3, so about 4,000 such messages (a minute of c's link) filled every node: then every
    host's sends, heartbeats, rows, claims and actions were refused by the bus for a week.
    The secure behaviour asserted: after b has read and dropped c's, the streams hold at
    most 4 of the R11M (16) messages c put on each subject. Fixed: a work queue (what b
    acked left the stream) and each host's permission names the configured hosts (c's
    publishes to ``zz`` are permissions violations, stored nowhere)."""
    n = int(os.environ.get("R11M", "16"))
    body = b"x" * 1_000_000
    read = (s.STREAM, s.msg_subject("b", "c"))
    nowhere = [(s.STREAM, s.msg_subject("zz", "c")), (s.OPS_STREAM, s.op_subject("zz", "c"))]

    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=30)
        for _ in range(n):
            await js.publish(read[1], body)
        # Refused by the server (no reply: JetStream never sees them); its -ERR comes back.
        for _, subject in nowhere:
            for _ in range(n):
                await nc.publish(subject, body)
        await nc.flush()

    async def tidy() -> None:
        nc = await _admin(swarm)
        try:
            for stream, subject in [read, *nowhere]:
                await nc.jetstream().purge_stream(stream, subject=subject)
        finally:
            await nc.close()

    try:
        errors = as_host_c(swarm, attack, settle=2.0)
        dropped = swarm.status("b")["dropped"]
        wait_for(lambda: _pending(swarm, s.STREAM, s.consumer("b", "c")) == 0, timeout=30)
        held = {subject: _stored_on(swarm, stream, subject) for stream, subject in [read, *nowhere]}
        print(f"c's 1 MB messages the streams hold after b read its own: {held}; bus refused {errors[:2]}; b dropped {dropped}")
        assert all(k <= 4 for k in held.values()), held
        assert held[nowhere[0][1]] == held[nowhere[1][1]] == 0, held
        for _, subject in nowhere:
            violation(errors, subject)
    finally:
        asyncio.run(tidy())


@pytest.mark.attack("swarm-store-fill", ref="issue 18 (session 9): c's publish permissions name each configured receiving host")
def test_rendered_permissions_name_each_configured_receiver() -> None:
    """What c may publish on the two streams names each other configured host, no
    wildcard and not itself (no consumer reads a pair to itself); a host name that is a
    wildcard (or anything but a name) is refused when the config is rendered."""
    perms = host_permissions("c", ["a", "b", "c"])["publish"]["allow"]
    stored = [p for p in perms if p.startswith((s.MSG_ROOT + ".", s.OPS_ROOT + "."))]
    assert sorted(stored) == sorted([s.msg_subject("a", "c"), s.msg_subject("b", "c"),
                                     s.op_subject("a", "c"), s.op_subject("b", "c")]), stored
    assert not [p for p in perms if p.startswith((s.LEGACY_MSG_ROOT + ".", "hive.op."))], perms
    for bad in ("*", ">", "b.x", "B"):
        with pytest.raises(ValueError):
            host_permissions("c", ["a", bad, "c"])


@pytest.mark.attack("swarm-pair-bound", ref="issue 18 (session 9): c past its pair's bound on each stream, and a's pairs")
def test_c_past_its_pairs_bound_holds_up_no_other_sender(swarm: Swarm) -> None:
    """Each pair of hosts keeps at most its newest s.ACTIONS_PAIR_MSGS actions and
    s.MAIL_PAIR_MSGS bundles its receiver has not acked (the oldest dropped past it:
    bus.py). c floods both its pairs to b: its actions (b obeys no operator of c's: never
    read) and its bundles (b holds its bound of c's agent's messages, 10,000, and reads no
    more of c's until bob reads). The bus keeps the bound of each, and no more; a's pause
    of bob is still applied on b, and alice's message reaches bob: c's pairs are c's only.
    Then bob reads: c's messages come in order, once (a prefix of what c sent: past the
    bound c's own oldest went)."""
    a = swarm.cores["a"]
    name = "r11pair"
    actions, mail = s.op_subject("b", "c"), s.msg_subject("b", "c")
    extra = 8
    flood = [f"r11p{i}" for i in range(10_000 + 1)]  # b's agent_pending_max, and one waits

    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        for _ in range(s.ACTIONS_PAIR_MSGS + extra):
            await js.publish(actions, b"{}")
        await (await js.key_value(s.bucket("c"))).create(s.name_key(name, "c"), b"c")
        for k in range(0, len(flood), 1024):  # b takes 10,000 and holds the last, unacked
            await js.publish(mail, json.dumps([{"id": f"r11p-{i}", "from": name, "to": "bob", "kind": "message",
                                                "body": flood[i], "sent_at": 0}
                                               for i in range(k, min(len(flood), k + 1024))]).encode())
        wait_until = time.monotonic() + 30
        while "c" not in (status := swarm.status("b"))["waiting"]:
            assert time.monotonic() < wait_until, f"b never held c's bundles back: {status}"
            await asyncio.sleep(0.2)
        for _ in range(s.MAIL_PAIR_MSGS + extra):
            await js.publish(mail, b"not a bundle")

    async def tidy(nc: Any) -> None:
        await (await nc.jetstream().key_value(s.bucket("c"))).delete(s.name_key(name, "c"))

    try:
        assert as_host_c(swarm, attack, settle=0) == []
        # What the pairs' consumers have yet to hand out (STREAM.INFO's per-subject counts
        # on nats-server 2.9.10 said 0 for a work queue's subject holding 64, after other
        # deletes there: not what the bound is kept on).
        held = {actions: _pending(swarm, s.OPS_STREAM, s.ops_consumer("b", "c")),
                mail: _pending(swarm, s.STREAM, s.consumer("b", "c"))}
        print(f"c's pairs to b hold {held} after {s.ACTIONS_PAIR_MSGS + extra} actions and {s.MAIL_PAIR_MSGS + extra} more bundles")
        assert held == {actions: s.ACTIONS_PAIR_MSGS, mail: s.MAIL_PAIR_MSGS}, held
        assert swarm.status("b")["waiting"] == ["c"]
        reply = a.host_call("set_paused", name="bob", paused=True, host="b")
        assert reply.get("ok") and reply.get("applied"), reply
        body = "r11 alice past c's full pairs " + uuid.uuid4().hex
        assert_ok(a.agent_call("alice", "send", to="bob", body=body))
        got = drain(swarm, "b", "bob", 10_000 + 1, timeout=60, extra=2.0)
        assert [m["body"] for m in got if m["from"] == "alice"] == [body], len(got)
        mine = [m["body"] for m in got if m["from"] == name]
        assert len(mine) >= 10_000 and mine == flood[:len(mine)], (len(mine), mine[-2:])
        wait_for(lambda: _pending(swarm, s.STREAM, s.consumer("b", "c")) == 0, timeout=30)
    finally:
        as_host_c(swarm, tidy, settle=0)
        _purge_ops(swarm, actions)
        a.host_call("set_paused", name="bob", paused=False, host="b")
        swarm.cores["b"].host_call("set_paused", name="bob", paused=False)
        while take(swarm, "b", "bob"):
            pass


def _pending(swarm: Swarm, stream: str, consumer: str) -> int:
    async def go() -> int:
        nc = await _admin(swarm)
        try:
            info = await nc.jetstream().consumer_info(stream, consumer)
            return (info.num_pending or 0) + (info.num_ack_pending or 0)
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.mark.attack("swarm-remote-steering", ref="red team round 11: an agent in its cage reaching for the operator's steering of other hosts")
def test_a_caged_agent_cannot_steer_another_hosts_agent(hives: Swarm[HiveProcess]) -> None:
    """alice, in her cage on a, asks her agent socket for what the operator's host.sock
    carries to other hosts: each steering verb with a ``host`` (stop, destroy, unpause,
    send as the operator), and her own verbs with a ``host`` added (send, request_spawn).
    Each must be refused on a, one line; nothing may be carried (b applies and refuses no
    action), bob stays as he was (running, paused by the fixture, listed). Then she sends
    bob a message whose body is a sealed action (a's operator's own, as if she had one):
    it arrives as alice's message, data only, and b carries out nothing."""
    a, b = hives.cores["a"], hives.cores["b"]
    alice = a.caged("alice")
    before = hives.status("b")
    harness = b.harness_pid("bob")
    key = load_or_create_key(hives.operator_key)  # (alice can't read it: the test hands it over)
    calls: list[tuple[str, dict[str, Any]]] = [
        ("stop", {"scope": {"agent_names": ["bob"]}, "host": "b"}),
        ("destroy", {"name": "bob", "host": "b"}),
        ("set_paused", {"name": "bob", "paused": False, "host": "b"}),
        ("send", {"to": "bob", "body": "r11 as the operator", "host": "b"}),
        ("request_spawn", {"name": "r11child", "spec": {"runtime": "command", "command": ["true"]}, "host": "b"}),
    ]
    for cmd, fields in calls:
        reply = alice.call(cmd, **fields)
        assert reply.get("ok") is False and "\n" not in reply.get("error", "x\n"), (cmd, reply)
    sealed_body = seal(key, "a", "b", {"cmd": "destroy", "name": "bob"})[1].decode()
    assert_ok(alice.call("send", to="bob", body=sealed_body))
    got = drain(hives, "b", "bob", 1, timeout=15)
    assert [(m["from"], m["body"]) for m in got] == [("alice", sealed_body)], got
    time.sleep(0.5)
    after = hives.status("b")
    assert (after["actions_applied"], after["actions_refused"]) == (before["actions_applied"], before["actions_refused"]), after
    assert b.harness_pid("bob") == harness and b.agent_status()["bob"]["paused"] is True
    assert "r11child" not in str(assert_ok(b.host_call("pending")))


@pytest.mark.attack("swarm-operator-forgery", ref="red team round 11: a's signed action re-targeted, re-labelled, or spelled otherwise")
def test_a_signed_action_cannot_be_retargeted(tmp_path: Path) -> None:
    """What a host holding one of a's signed actions for b (say b itself, compromised)
    could try with it elsewhere: present it to c as is (its ``to`` is b); change its
    ``to``, its agent, its verb or its time (the signature covers the canonical JSON of
    the whole action); spell b as a look-alike (fullwidth ``ｂ``, ``b`` with a trailing
    NUL, an escaped ``\\u0062``, which is b again and verifies); give the action twice in
    one envelope (JSON's last key wins, and the signature is checked on what is used);
    a ``v`` of ``true`` (equal to 1 in Python) or an ``at`` of ``true``. Only the
    untouched action, at b, opens; every other is refused with a one-line reason."""
    from hyperhive.swarm.signing import ActionError, open_sealed, parse_public, public_b64

    key = load_or_create_key(tmp_path / "a.key")
    pinned = {"a": parse_public(public_b64(key))}
    _, data = seal(key, "a", "b", {"cmd": "destroy", "name": "bob"})
    env = json.loads(data)
    act, sig = env["action"], env["sig"]

    def envelope(action: dict[str, Any]) -> bytes:
        return json.dumps({"action": action, "sig": sig}, ensure_ascii=False).encode()

    assert open_sealed(data, "a", "b", pinned)["request"] == {"cmd": "destroy", "name": "bob"}
    escaped = data.replace(b'"to": "b"', b'"to": "\\u0062"')
    assert escaped != data and open_sealed(escaped, "a", "b", pinned)["to"] == "b"  # the same action
    refused = {
        "to c as is": (data, "c"),
        "to changed": (envelope({**act, "to": "c"}), "c"),
        "agent changed": (envelope({**act, "request": {"cmd": "destroy", "name": "bea"}}), "b"),
        "verb changed": (envelope({**act, "request": {"cmd": "stop", "scope": {"agent_names": ["bob"]}}}), "b"),
        "time moved": (envelope({**act, "at": act["at"] + 0.001}), "b"),
        "fullwidth b": (envelope({**act, "to": "ｂ"}), "b"),
        "b and NUL": (envelope({**act, "to": "b\x00"}), "b"),
        "v true": (envelope({**act, "v": True}), "b"),
        "at true": (envelope({**act, "at": True}), "b"),
        "two actions": (b'{"action": %s, "sig": "%s", "action": %s}' % (
            json.dumps(act).encode(), sig.encode(), json.dumps({**act, "request": {"cmd": "destroy", "name": "bea"}}).encode()), "b"),
    }
    for what, (raw, here) in refused.items():
        with pytest.raises(ActionError) as e:
            open_sealed(raw, "a", here, pinned)
        assert "\n" not in str(e.value), (what, e.value)


def _next_ids_of_a(swarm: Swarm) -> tuple[str, int]:
    """What c knows of a's message ids: alice writes carol (on c) one message; c's own
    store (c is compromised: its files are the attacker's) has its id in ``swarm_seen``,
    a's process prefix (32 hex) and its count (hex) after it. (The same is in every bundle
    a publishes to c.) Returns (prefix, the count of that message)."""
    before = _seen_ids(swarm, "c")
    assert_ok(swarm.cores["a"].agent("alice").call("send", to="carol", body="r11 tell me your ids"))
    drain(swarm, "c", "carol", 1, timeout=15)
    new = [i for i in _seen_ids(swarm, "c") if i not in before and len(i) > 32]
    assert len(new) == 1, new
    return new[0][:32], int(new[0][32:], 16)


def _seen_ids(swarm: Swarm, host: str) -> list[str]:
    import sqlite3

    [db] = [p for p in swarm.cores[host].state_dir.glob("*.db")]
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        return [r[0].rsplit("/", 1)[-1] for r in conn.execute("SELECT msg_id FROM swarm_seen")]


def _alice_writes_bob(swarm: Swarm, n: int, tag: str) -> list[tuple[str, str]]:
    """alice sends bob ``n`` messages, one at a time (each a bundle of one), each
    acknowledged to her; what bob's inbox gets of them (the ones with ``tag``)."""
    alice = swarm.cores["a"].agent("alice")
    for i in range(n):
        assert_ok(alice.call("send", to="bob", body=f"{tag} {i}"))
        wait_for(lambda: swarm.status("a")["outbox_unsent"] == 0, timeout=15)
    got = drain(swarm, "b", "bob", n, timeout=10) if n else []
    return [(m["from"], m["body"]) for m in got if m["body"].startswith(tag)]


@pytest.mark.attack("swarm-msg-id-poisoning", ref="red team round 11: c publishes a's next Nats-Msg-Ids first; JetStream drops a's bundles as duplicates")
def test_c_cannot_make_the_bus_drop_as_bundles_as_duplicates(swarm: Swarm) -> None:
    """A bundle's ``Nats-Msg-Id`` was its first row's id and its length, and a row's id is
    a's process prefix and a count: c reads both off any message a sends it, and so knows
    a's next ids. JetStream's dedup window is the stream's, whatever the subject: c
    publishes, on its own subject to a (``hive.mail.a.from.c``: a host it may write; one to
    nowhere, as in round 11, is refused since session 9), one message under each of a's
    next 60 bundle ids (lengths 1 to 3), each stored (its pair keeps its newest 64: the
    dedup window remembers them all). Then alice's three messages to bob, each
    acknowledged to her (a's outbox marks them sent: the bus acked them, as duplicates),
    must reach bob."""
    prefix, count = _next_ids_of_a(swarm)
    ids = [f"{prefix}{k:x}.{n}" for k in range(count + 1, count + 61) for n in (1, 2, 3)]
    subject = s.msg_subject("a", "c")

    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        for msg_id in ids:
            await js.publish(subject, b"[]", headers={"Nats-Msg-Id": msg_id})

    async def tidy() -> None:
        nc = await _admin(swarm)
        try:
            await nc.jetstream().purge_stream(s.STREAM, subject=subject)
        finally:
            await nc.close()

    try:
        assert as_host_c(swarm, attack, settle=0) == []
        got = _alice_writes_bob(swarm, 3, "r11 dedup")
        assert got == [("alice", f"r11 dedup {i}") for i in range(3)], got
    finally:
        asyncio.run(tidy())


@pytest.mark.attack("swarm-msg-id-poisoning", ref="red team round 11: c sends b its own messages under a's next row ids; b skips a's as seen")
def test_c_cannot_make_b_skip_as_messages_as_seen(swarm: Swarm) -> None:
    """The receiver's dedup (``swarm_seen``) remembered a row id whatever host sent it: c
    sends bob, on its own subject, messages from its own carol (all NATS and b's checks
    let it) under a's next 60 row ids; b stores them and remembers the ids. Then
    alice's three messages to bob (new ids to a, old ones to b) must reach bob."""
    prefix, count = _next_ids_of_a(swarm)
    rows = [{**_row("carol", "bob", "r11 squat"), "id": f"{prefix}{k:x}"} for k in range(count + 1, count + 61)]

    async def attack(nc: Any) -> None:
        await nc.jetstream(timeout=10).publish(s.msg_subject("b", "c"), json.dumps(rows).encode(),
                                               headers={"Nats-Msg-Id": f"r11-{uuid.uuid4().hex}"})

    assert as_host_c(swarm, attack, settle=0) == []
    squatted = drain(swarm, "b", "bob", len(rows), timeout=15)
    assert [m["from"] for m in squatted] == ["carol"] * len(rows)  # c's own, delivered as c's
    got = _alice_writes_bob(swarm, 3, "r11 seen")
    assert got == [("alice", f"r11 seen {i}") for i in range(3)], got


@pytest.mark.attack("swarm-host-spoofing", ref="red team round 11: lone surrogates in c's roster values and messages")
def test_lone_surrogates_from_c_break_nothing(swarm: Swarm) -> None:
    """JSON may spell a lone UTF-16 surrogate (``"\\ud800"``), which Python decodes into a
    str that can't be encoded as UTF-8 again (SQLite, a reply, a page). c writes one into
    its own agent row's status text and into a question to the operator it lists, and
    sends bob a message whose body is one, then an ordinary row and an ordinary message
    from carol. Before the fix a's host.sock closed the connection on ``swarm_status``
    (its reply could not be encoded), and so on every host, for as long as c kept the
    row. a's host.sock must answer ``swarm_status``, ``questions`` and ``agent_status``
    (c's ordinary row listed, the bad row and question refused as malformed), and b must
    take alice's message to bob and carol's ordinary one after the bad one (which is
    dropped, not redelivered forever)."""
    row = b'{"name": "r11u", "host": "c", "running": true, "paused": false, "status_text": "x\\ud800y"}'
    question = b'{"id": 424242, "asker": "carol", "question": "which \\udfff way?", "options": ["\\ud800"], "asked_at": "now"}'
    bad = {**_row("carol", "bob", "placeholder"), "body": "\ud800"}
    after = _row("carol", "bob", "r11 after the surrogate")

    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        await js.publish(s.kv_subject("c", s.row_key("c", "r11u")), row)
        await js.publish(s.kv_subject("c", s.question_key("c", 424242)), question)
        await js.publish(s.kv_subject("c", s.row_key("c", "r11ok")), row.replace(b"\\ud800", b"-").replace(b"r11u", b"r11ok"))
        for r in (bad, after):
            data = json.dumps([r]).encode()  # ensure_ascii: "\\ud800" in the JSON text
            await js.publish(s.msg_subject("b", "c"), data, headers={"Nats-Msg-Id": r["id"]})

    async def tidy(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        for key in (s.row_key("c", "r11u"), s.row_key("c", "r11ok"), s.question_key("c", 424242)):
            await js.publish(s.kv_subject("c", key), b"", headers={"KV-Operation": "DEL"})

    a = swarm.cores["a"]
    try:
        assert as_host_c(swarm, attack, settle=0) == []
        wait_for(lambda: any(r["name"] == "r11ok" for r in swarm.status("a")["agents"]), timeout=15)
        status = swarm.status("a")
        assert "r11u" not in [r["name"] for r in status["agents"]] and 424242 not in [q["id"] for q in status["questions"]]
        assert_ok(a.host_call("questions"))
        assert_ok(a.host_call("agent_status"))
        assert_ok(a.agent("alice").call("send", to="bob", body="r11 alice after c's surrogates"))
        got = drain(swarm, "b", "bob", 2, timeout=20, extra=1.0)
        bodies = sorted((m["from"], m["body"]) for m in got)
        assert bodies == [("alice", "r11 alice after c's surrogates"), ("carol", after["body"])], got
    finally:
        as_host_c(swarm, tidy, settle=0)


@pytest.mark.attack("swarm-operator-forgery", ref="red team round 11: c writes outcomes of b's under keys of its own bucket")
def test_c_cannot_publish_outcomes_for_another_host(swarm: Swarm) -> None:
    """a waits for ``results.b.a-<id>`` of each action it carries to b. c may write only
    ``results.c.>`` in its own bucket: ``results.b.a-<id>`` in c's bucket or in b's, and an
    outcome under a's or b's heartbeat or claim keys, are permissions violations (nothing
    stored; and a watcher skips a key in c's bucket that names another host anyway)."""
    action = uuid.uuid4().hex
    subjects = [s.kv_subject("c", s.result_key("b", "a", action)), s.kv_subject("b", s.result_key("b", "a", action)),
                s.kv_subject("c", s.result_key("a", "b", action)), s.kv_subject("c", s.host_key("b"))]
    for subject in subjects:

        async def attack(nc: Any, subject: str = subject) -> None:
            await nc.publish(subject, b'{"ok": true, "at": 0}')
            await nc.flush()

        errors = as_host_c(swarm, attack)
        assert any("permissions violation" in e and subject.lower() in e for e in errors), (subject, errors)

"""The swarm (docs/swarm.md) on three test hosts: network namespaces on one bridge, each
with one node of a 3-node NATS JetStream cluster and a hive-core. Cross-host send under
the peer ACL, once and in order; ask and answer across hosts. The faults (a core or a
NATS node killed, a partition) are in test_swarm_faults.py."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nats
import pytest

import hyperhive
from helpers import assert_ok, assert_refused, quota_usage, wait_for
from hyperhive.config import ConfigError, load_config
from hyperhive.swarm import bus, natsconf
from hyperhive.swarm import subjects as s
from hyperhive.swarm.bridge import HELD_MAX, Bridge
from hyperhive.swarm.pull import PAUSE, Puller
from hyperhive.swarm.watch import RosterWatch
from swarm_faults import drain, take
from swarm_fixture import Swarm

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def test_a_single_host_hive_never_imports_nats() -> None:
    """Only swarm/bus.py, swarm/bridge.py and the bridge's swarm/operator.py,
    swarm/show.py, swarm/watch.py and swarm/pull.py import nats, and every import of them elsewhere is inside a function
    (the daemon's, taken only with [swarm])."""
    src = Path(hyperhive.__file__).parent
    nats_modules = (
        "swarm/bus.py", "swarm/bridge.py", "swarm/operator.py", "swarm/show.py", "swarm/watch.py",
        "swarm/pull.py",
    )
    loaders = {"hyperhive." + m.removesuffix(".py").replace("/", ".") for m in nats_modules}
    for path in src.rglob("*.py"):
        rel = path.relative_to(src).as_posix()
        tree = ast.parse(path.read_text())
        top = set(tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "nats":
                    assert rel in nats_modules, f"{rel} imports {name}"
                if name in loaders and rel not in nats_modules:
                    assert node not in top, f"{rel} imports {name} at module level"


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ('host = "A"\nurls = ["nats://x:4222"]\ncredentials = "/s"', "swarm.host"),
        ('host = "a"\nurls = []\ncredentials = "/s"', "swarm.urls"),
        ('host = "a"\nurls = ["http://x"]\ncredentials = "/s"', "swarm.urls"),
        ('host = "a"\nurls = ["nats://x:4222"]\ncredentials = "rel"', "absolute"),
        ('host = "a"\nurls = ["nats://x:4222"]\ncredentials = "/s"\nx = 1', "swarm.x"),
        # held_names_max: below 64, or past an eighth of the bucket's keys (HELD_MAX)
        ('host = "a"\nurls = ["nats://x:4222"]\ncredentials = "/s"\nheld_names_max = 63', "held_names_max': Input should be greater than or equal to 64"),
        ('host = "a"\nurls = ["nats://x:4222"]\ncredentials = "/s"\nheld_names_max = 8193', "held_names_max': Input should be less than or equal to 8192"),
        ('host = "a"\nurls = ["nats://x:4222"]\ncredentials = "/s"\nheld_recheck_seconds = 1.5', "held_recheck_seconds': Input should be greater than or equal to 2"),
        ('host = "a"\nurls = ["nats://x:4222"]\ncredentials = "/s"\nheld_recheck_seconds = "soon"', "held_recheck_seconds': Input should be a valid number"),
    ],
)
def test_bad_swarm_section_is_one_line(tmp_path: Path, section: str, needle: str) -> None:
    path = tmp_path / "hive.toml"
    path.write_text(f"[swarm]\n{section}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "\n" not in str(e.value) and needle in str(e.value), str(e.value)


def test_held_names_max_is_the_operators_within_its_bounds(tmp_path: Path) -> None:
    """[swarm] held_names_max: HELD_MAX when not given (an eighth of the bucket's keys), as
    given from 64 up to it (refused past either: the cases above)."""
    path = tmp_path / "hive.toml"
    for given, want in (("", HELD_MAX), ("held_names_max = 64", 64), (f"held_names_max = {HELD_MAX}", HELD_MAX)):
        path.write_text(f'[swarm]\nhost = "a"\nurls = ["nats://x:4222"]\ncredentials = "/s"\n{given}\n')
        swarm = load_config(path).swarm
        assert swarm is not None and swarm.held_names_max == want, given
    assert HELD_MAX == s.ROSTER_HOST_KEYS // 8
    path.write_text('[swarm]\nhost = "a"\nurls = ["nats://x:4222"]\ncredentials = "/s"\nheld_recheck_seconds = 5\n')
    swarm = load_config(path).swarm
    assert swarm is not None and swarm.held_recheck_seconds == 5.0


def _rendered_store(tmp_path: Path, hosts: int, **kw: Any) -> int:
    """The JetStream file store a node's rendered config gives, in bytes."""
    conf = natsconf.server_config(name="n1", listen="10.0.0.1", routes=[], store_dir=tmp_path / "js",
                                  admin_password="p", hosts={f"h{i}": "pw" for i in range(hosts)}, **kw)  # fmt: skip
    found = re.search(r"max_file_store: (\d+) ", conf)
    assert found, conf
    return int(found.group(1))


def test_the_nodes_store_is_sized_from_the_number_of_hosts(tmp_path: Path) -> None:
    """docs/swarm.md, "What the streams hold": every ordered pair of hosts may hold its
    newest s.MAIL_PAIR_MSGS bundles of s.MAIL_MSG_BYTES and s.ACTIONS_PAIR_MSGS actions of
    MAX_ACTION_BYTES, and each host its roster bucket; a node's rendered store holds all
    of it at once for any number of hosts (4 GB whatever the hosts, before: 5 hosts' worst
    is 4.7 GiB). A store given too small is refused when rendered, one line, nothing
    written."""
    import subprocess
    import sys

    from hyperhive.swarm.signing import MAX_ACTION_BYTES

    pair = s.MAIL_PAIR_MSGS * s.MAIL_MSG_BYTES + s.ACTIONS_PAIR_MSGS * MAX_ACTION_BYTES
    for n in (1, 3, 5, 10, 40):
        worst = n * (n - 1) * pair + n * s.ROSTER_HOST_BYTES
        assert _rendered_store(tmp_path, n) >= worst + worst // 4, n  # and a quarter more
    assert _rendered_store(tmp_path, 3) == 4 << 30  # never less than before
    assert _rendered_store(tmp_path, 5, max_file_store=5 << 30) == 5 << 30  # the admin's own
    with pytest.raises(ValueError, match="can't hold it") as e:
        _rendered_store(tmp_path, 5, max_file_store=4 << 30)
    assert "\n" not in str(e.value)
    (tmp_path / "pw").write_text("pw\n")
    argv = [sys.executable, "-m", "hyperhive.swarm.natsconf", "--name", "n1", "--listen", "10.0.0.1",
            "--store", str(tmp_path / "js"), "--admin-password-file", str(tmp_path / "pw"),
            *(f"--host=h{i}={tmp_path / 'pw'}" for i in range(5))]  # fmt: skip
    done = subprocess.run([*argv, "--max-store", "4GB"], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout, done.stderr.count("\n")) == (1, "", 1), done
    assert done.stderr.startswith("natsconf: 5 hosts' streams may hold 4.7 GiB"), done.stderr
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and f"max_file_store: {6 << 30} " in done.stdout, done
    # The store's own filesystem, when it is here: a real 64 MiB one can't hold 4 GiB.
    small = tmp_path / "js"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    try:
        done = subprocess.run(argv[:-4], capture_output=True, text=True, timeout=30)  # 1 host
        assert (done.returncode, done.stdout, done.stderr.count("\n")) == (1, "", 1), done
        assert "filesystem has 0.1 GiB" in done.stderr and "can't hold the 4.0 GiB" in done.stderr
    finally:
        subprocess.run(["umount", str(small)], check=True)


@needs_root
def test_cross_host_send_arrives_once_in_order(swarm: Swarm) -> None:
    """50 messages within alice's quota arrive once, in order; they count in her quota on
    a until bob has read them on b, and b's report gives it back (swarm/quota.py)."""
    a, b = swarm.cores["a"], swarm.cores["b"]
    alice = a.agent("alice")
    before = quota_usage(a, "alice")
    for i in range(50):
        assert_ok(alice.call("send", to="bob", body=f"m{i}"))
    assert quota_usage(a, "alice") == (before[0] + 50, before[1] + sum(len(f"m{i}") for i in range(50)))
    got = drain(swarm, "b", "bob", 50)
    assert [m["body"] for m in got] == [f"m{i}" for i in range(50)]
    assert {m["from"] for m in got} == {"alice"}
    wait_for(lambda: quota_usage(a, "alice") == before, timeout=10)
    # And back: bob answers alice from host b (counted on b until alice has read it).
    bob_before = quota_usage(b, "bob")
    assert_ok(b.agent_call("bob", "send", to="alice", body="hi alice"))
    assert quota_usage(b, "bob") == (bob_before[0] + 1, bob_before[1] + 8)
    assert [m["body"] for m in drain(swarm, "a", "alice", 1)] == ["hi alice"]
    wait_for(lambda: quota_usage(b, "bob") == bob_before, timeout=10)
    status = swarm.status("a")
    assert status["connected"] and status["roster"] == 3, status["agents"]
    assert [h["host"] for h in status["hosts"]] == ["a", "b", "c"]
    wait_for(lambda: all(h["reachable"] for h in swarm.status("a")["hosts"]))
    assert {(r["name"], r["host"]) for r in status["agents"]} == {
        ("alice", "a"), ("bob", "b"), ("carol", "c")
    }


@needs_root
def test_cross_host_send_keeps_the_peer_acl(swarm: Swarm) -> None:
    # carol (on c) may message alice, but bob (on b) has only alice as a peer.
    assert_refused(swarm.cores["b"].agent_call("bob", "send", to="carol", body="x"),
                   "not one of bob's peers")
    assert_refused(swarm.cores["b"].agent_call("bob", "send", to="zed", body="x"),
                   "no agent named 'zed'")
    # An agent name another host holds can't be spawned here.
    resp = swarm.cores["a"].host_call(
        "spawn", name="bob", spec={"runtime": "command", "command": ["true"]}
    )
    assert_refused(resp, "already exists on host b")


@needs_root
def test_cross_host_ask_and_answer(swarm: Swarm) -> None:
    """alice (a) asks bob (b); bob answers b's id for it; the answer comes back to alice
    on a under a's id, once. Question ids are per host: bob (b) and carol (c) each ask
    alice, whose answers go back each to its own asker's host, however the ids compare."""
    alice, bob = swarm.cores["a"].agent("alice"), swarm.cores["b"].agent("bob")
    carol = swarm.cores["c"].agent("carol")
    qa = assert_ok(alice.call("ask", to="bob", question="lunch?", options=["yes", "no"]))["id"]
    [q] = drain(swarm, "b", "bob", 1)
    assert (q["kind"], q["from"], q["body"], q["options"]) == ("question", "alice", "lunch?",
                                                                ["yes", "no"])
    assert assert_ok(bob.call("loose_ends"))["to_answer"][0]["asker"] == "alice"
    assert_ok(bob.call("answer", id=q["ref"], answer="yes"))
    assert_refused(bob.call("answer", id=q["ref"], answer="no"), "already answered")
    [a] = drain(swarm, "a", "alice", 1)
    assert (a["kind"], a["from"], a["body"], a["ref"]) == ("answer", "bob", "yes", qa)
    assert assert_ok(alice.call("loose_ends"))["questions"] == []
    # The peer ACL as on one host: bob's only peer is alice.
    assert_refused(bob.call("ask", to="carol", question="x"), "not one of bob's peers")
    assert_refused(bob.call("ask", to="zed", question="x"), "no agent named 'zed'")
    # Two hosts' questions to one agent, answered in the opposite order. What other
    # modules on this session's swarm left in these inboxes is read first (each inbox
    # for 1 s, the three at once: each its own host and connection).
    with ThreadPoolExecutor(max_workers=3) as pool:
        for took in [pool.submit(take, swarm, host, agent, wait=1.0)
                     for host, agent in (("a", "alice"), ("b", "bob"), ("c", "carol"))]:  # fmt: skip
            took.result()
    qb = assert_ok(bob.call("ask", to="alice", question="from b"))["id"]
    qc = assert_ok(carol.call("ask", to="alice", question="from c"))["id"]
    got = {m["from"]: m for m in drain(swarm, "a", "alice", 2)}
    assert {k: m["body"] for k, m in got.items()} == {"bob": "from b", "carol": "from c"}
    assert_ok(alice.call("answer", id=got["carol"]["ref"], answer="to c"))
    assert_ok(alice.call("answer", id=got["bob"]["ref"], answer="to b"))
    [ab] = drain(swarm, "b", "bob", 1)
    [ac] = drain(swarm, "c", "carol", 1)
    assert (ab["body"], ab["ref"], ac["body"], ac["ref"]) == ("to b", qb, "to c", qc)


@needs_root
def test_a_redelivered_message_is_stored_once(swarm: Swarm) -> None:
    """The same message id twice on the stream (a republish outside JetStream's dedup
    window, say): b's swarm_seen keeps one. Published here with a's own credentials."""
    item = {"id": "dup-1", "from": "alice", "to": "bob", "kind": "message", "body": "once",
            "sent_at": 0}

    async def go() -> None:
        nc = await nats.connect(swarm.net.urls("a"), user="host-a",
                                password=swarm.net.passwords["a"], inbox_prefix="_INBOX_a")
        try:
            js = nc.jetstream()
            for n in range(2):
                await js.publish(s.msg_subject("b", "a"), json.dumps([item]).encode(),
                                 headers={"Nats-Msg-Id": f"dup-1-try{n}"})
        finally:
            await nc.close()

    received = swarm.status("b")["received"]
    asyncio.run(go())
    got = drain(swarm, "b", "bob", 1)
    assert [m["body"] for m in got] == ["once"]
    assert swarm.status("b")["received"] == received + 1


def test_swarm_tables(tmp_path: Path) -> None:
    """The outbox and the received ids, on a store of their own (no bus)."""
    from hyperhive.core.store import Store
    from hyperhive.swarm.outbox import SwarmStore

    store = Store(tmp_path / "hive.db")
    sw = SwarmStore(store.db)
    SwarmStore(store.db)  # made again on every start: idempotent
    queued = [sw.queue("b", "alice", "bob", "message", f"q{i}") for i in range(3)]
    out = sw.unsent(10)
    assert [o.row for o in out] == [m.id for m in queued]
    assert [json.loads(o.payload)["body"] for o in out] == ["q0", "q1", "q2"]
    sw.mark_sent([out[0].row])
    assert [o.row for o in sw.unsent(10)] == [m.id for m in queued[1:]]
    assert sw.counts() == (2, 1)
    payloads = store.db.conn.execute("SELECT id, payload FROM swarm_outbox ORDER BY id").fetchall()
    assert payloads[0] == (out[0].row, "") and all(p for _, p in payloads[1:])  # sent: no body kept
    item = {"id": "x1", "to": "bob", "from": "alice", "kind": "message", "body": "hi"}
    assert [m.body for m in sw.receive([item, {**item, "id": "x2"}])] == ["hi", "hi"]
    assert sw.receive([item]) == []  # seen: dropped, nothing written
    assert len(list(store.messages.unacked("bob", 10, set()))) == 2
    sw.prune(keep_sent=0)
    assert sw.counts() == (2, 0)
    store.close()


@needs_root
def test_a_roster_watch_made_again_goes_on_from_the_next_sequence(swarm: Swarm) -> None:
    """swarm/watch.py: host zz's watch of its bucket gives every key's last value (a delete
    too), then the end-of-data marker; its consumer is ``w_zz`` alone. The admin deletes
    it (as a node's loss would): the watch hears no heartbeat, makes it again, and gives
    the next put only (no replay, nothing lost)."""

    async def go() -> None:
        user, password = swarm.net.admin()
        nc = await nats.connect(swarm.net.urls("a"), user=user, password=password)
        js = nc.jetstream()
        stream = s.kv_stream("zz")
        try:
            await bus._ensure_roster(js, "zz", 1)
            kv = await js.key_value(s.bucket("zz"))
            for key in ("k1", "k2", "k1", "k3"):
                await kv.put(s.row_key("zz", key), key.encode())
            await kv.delete(s.row_key("zz", "k3"))
            watch = RosterWatch(nc, "zz", "zz")
            await watch.start()
            try:
                got = []
                while (entry := await watch.updates(timeout=5)) is not None:
                    got.append((entry.key.rsplit(".", 1)[1], entry.operation, entry.revision))
                assert got == [("k2", None, 2), ("k1", None, 3), ("k3", "DEL", 5)], got
                assert [c.name for c in await js.consumers_info(stream)] == [s.watcher("zz")]
                await js.delete_consumer(stream, s.watcher("zz"))
                await kv.put(s.row_key("zz", "k4"), b"k4")
                entry = await watch.updates(timeout=15)
                assert entry is not None and (entry.key, entry.revision) == (s.row_key("zz", "k4"), 6)
                assert entry.value == b"k4" and abs(entry.created.timestamp() - time.time()) < 30
                with pytest.raises(TimeoutError):
                    await watch.updates(timeout=1)  # nothing replayed
                assert [c.name for c in await js.consumers_info(stream)] == [s.watcher("zz")]
            finally:
                await watch.stop()
            assert await js.consumers_info(stream) == []  # its own: deleted on stop
        finally:
            await js.delete_stream(stream)
            await nc.close()

    asyncio.run(go())


@needs_root
def test_a_puller_of_no_consumer_does_not_spin(swarm: Swarm) -> None:
    """swarm/pull.py: a pull of a consumer that doesn't exist (a host whose consumers the
    admin hasn't made yet) is answered by nothing within its wait (the account's
    JetStream API takes the request: no 503), and a status that does come at once ends
    the pull only after a pause: a consumer loop asking again at once doesn't spin (a
    few requests a second at most, not thousands, and little CPU)."""

    async def go() -> tuple[int, float]:
        user, password = swarm.net.admin()
        nc = await nats.connect(swarm.net.urls("a"), user=user, password=password)
        try:
            puller = Puller(nc, s.STREAM, "no-such-consumer", "_INBOX")
            await puller.start()
            try:
                t0, cpu0, asked = time.monotonic(), time.process_time(), 0
                while time.monotonic() - t0 < 2.0:
                    assert await puller.next(wait=1.0) is None
                    asked += 1
                return asked, time.process_time() - cpu0
            finally:
                await puller.stop()
        finally:
            await nc.close()

    asked, cpu = asyncio.run(go())
    assert 1 <= asked <= 2.0 / PAUSE + 2, asked
    assert cpu < 0.5, cpu


@needs_root
def test_a_host_on_a_layout_without_its_bucket_waits_and_says_what_to_do(
    swarm: Swarm, caplog: pytest.LogCaptureFixture
) -> None:
    """The new code against a swarm set up before per-host roster buckets (its admin has
    not run ensure_streams again): the bridge's roster waits for its bucket, saying once
    (every 30 s) in one line what the admin must do, and goes on once the bucket is
    there; in it, it purges its own old deletes (as its watch of its bucket saw them) and
    keeps its live keys. Here host ``zz``
    (no bucket) on the test swarm's bus, as its admin."""
    async def go() -> tuple[bool, str]:
        user, password = swarm.net.admin()
        nc = await nats.connect(swarm.net.urls("a"), user=user, password=password)
        js = nc.jetstream()
        bridge = Bridge.__new__(Bridge)  # only what _bucket reads: no hive behind it
        bridge.nc, bridge.host, bridge.kv, bridge._missing_said_at = nc, "zz", None, -1e9
        bridge._bucket_missing = False
        try:
            task = asyncio.create_task(bridge._bucket())
            await asyncio.sleep(2.5)
            waited = not task.done() and bridge._bucket_missing  # (status: roster_bucket false)
            await bus._ensure_roster(js, "zz", s.REPLICAS)  # what ensure_streams does
            kv = await asyncio.wait_for(task, timeout=10)
            assert not bridge._bucket_missing
            # Its old deletes are purged (each question, approval, outcome leaves one),
            # its live keys kept.
            await kv.put(s.row_key("zz", "x"), b"{}")
            await kv.put(s.row_key("zz", "y"), b"{}")
            await kv.delete(s.row_key("zz", "x"))
            # Which are deletes, its watch of its own bucket says (its one consumer there);
            # and, in its first load, the rows a core of before left (seen to next round).
            bridge._deletes, bridge._own_loaded, bridge._mine, bridge._published = {}, False, set(), {}
            watch = RosterWatch(nc, "zz", "zz")
            await watch.start()
            try:
                while (entry := await watch.updates(timeout=5)) is not None:
                    bridge._own_entry(entry)
            finally:
                await watch.stop()
            assert set(bridge._deletes) == {s.row_key("zz", "x")}, bridge._deletes
            assert bridge._published == {"y": ""}, bridge._published
            await bridge._purge_deletes(kv, older=0)
            state = (await js.stream_info(s.kv_stream("zz"))).state
            assert state.messages == 1 and (await kv.get(s.row_key("zz", "y"))).value == b"{}"
            return waited, kv._name
        finally:
            await js.delete_stream(s.kv_stream("zz"))
            await nc.close()

    caplog.set_level("WARNING", logger="hive.swarm")
    waited, name = asyncio.run(go())
    assert waited and name == "HIVE_ROSTER_zz"
    said = [r.getMessage() for r in caplog.records if "no roster bucket" in r.getMessage()]
    assert len(said) == 1 and "HIVE_ROSTER_zz" in said[0] and "ensure_streams" in said[0], said
    assert "\n" not in said[0]


def _admin_js(swarm: Swarm, go: Any) -> Any:
    async def run() -> Any:
        user, password = swarm.net.admin()
        nc = await nats.connect(swarm.net.urls("a"), user=user, password=password)
        try:
            return await go(nc.jetstream(timeout=10))
        finally:
            await nc.close()

    return asyncio.run(run())


def test_a_full_pair_holds_only_its_hosts_messages(swarm: Swarm) -> None:
    """b is down: a publishes s.MAIL_WINDOW bundles on its pair to b and no more (the pair
    keeps only its newest s.MAIL_PAIR_MSGS, red team round 11's store fill: a must never
    have more unacked there, or the bus would drop its oldest). a's later rows to b wait
    in a's outbox, in order, and a's messages to c go on meanwhile (one publish loop for
    every host: held on b, it must not hold them all). b back: bob gets every one of
    alice's messages once, in order, and a's outbox empties."""
    a, b = swarm.cores["a"], swarm.cores["b"]
    alice = a.agent("alice")
    n = s.MAIL_PAIR_MSGS + 6  # past the bus's bound, not only a's window
    bodies = [f"full pair {i} {time.time_ns()}" for i in range(n)]
    b.kill9()
    try:
        wait_for(lambda: not swarm.status("a")["hosts"][1]["reachable"], timeout=15)
        for body in bodies:  # one at a time: each its own bundle, until a holds them
            assert_ok(alice.call("send", to="bob", body=body))
            wait_for(lambda: swarm.status("a")["outbox_unsent"] == 0 or swarm.status("a")["full"] == ["b"])
        status = swarm.status("a")
        assert status["full"] == ["b"] and status["outbox_unsent"] > 0, status
        held = _admin_js(swarm, lambda js: js.consumer_info(s.STREAM, s.consumer("b", "a")))
        assert (held.num_pending, held.num_ack_pending) == (s.MAIL_WINDOW, 0), held
        assert status["outbox_unsent"] == n - s.MAIL_WINDOW, status
        to_carol = "meanwhile to carol " + str(time.time_ns())
        assert_ok(alice.call("send", to="carol", body=to_carol))
        assert [m["body"] for m in drain(swarm, "c", "carol", 1, timeout=15)] == [to_carol]
    finally:
        b.start()
    got = drain(swarm, "b", "bob", n, timeout=60)
    assert [m["body"] for m in got] == bodies
    wait_for(lambda: swarm.status("a")["full"] == [] and swarm.status("a")["outbox_unsent"] == 0, timeout=15)


def test_bundles_on_the_stream_of_before_arrive_first(swarm: Swarm) -> None:
    """An upgrade from HIVE_MSGS (limits retention, the stream of before): what a
    published there and b had not read yet must still reach bob, before a's bundles on
    HIVE_MAIL. The admin makes the old stream and b's consumer of a's there (as an old
    ensure_streams did) and stores two of a's bundles on it (as a's old code did) while b
    is down; alice sends one more (HIVE_MAIL). b, started again, reads the old pair to
    its end first: bob gets the three in order, once."""
    from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

    b = swarm.cores["b"]
    tag = str(time.time_ns())
    old = [[{"id": f"legacy-{tag}-{i}", "from": "alice", "to": "bob", "kind": "message",
             "body": f"before the upgrade {i} {tag}", "sent_at": 0}] for i in range(2)]

    async def make_old(js: Any) -> None:
        await js.add_stream(StreamConfig(name=s.LEGACY_STREAM, subjects=[f"{s.LEGACY_MSG_ROOT}.>"],
                                         retention=RetentionPolicy.LIMITS, num_replicas=s.REPLICAS))
        await js.add_consumer(s.LEGACY_STREAM, ConsumerConfig(
            durable_name=s.consumer("b", "a"), filter_subject=f"{s.LEGACY_MSG_ROOT}.b.from.a",
            ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1, num_replicas=s.REPLICAS))
        for bundle in old:
            await js.publish(f"{s.LEGACY_MSG_ROOT}.b.from.a", json.dumps(bundle).encode())

    async def drop_old(js: Any) -> None:
        await js.delete_stream(s.LEGACY_STREAM)

    b.kill9()
    try:
        _admin_js(swarm, make_old)
        after = f"after the upgrade {tag}"
        assert_ok(swarm.cores["a"].agent_call("alice", "send", to="bob", body=after))
        wait_for(lambda: swarm.status("a")["outbox_unsent"] == 0, timeout=15)
    finally:
        b.start()
    try:
        got = drain(swarm, "b", "bob", 3, timeout=30)
        assert [m["body"] for m in got] == [*(x[0]["body"] for x in old), after]
        info = _admin_js(swarm, lambda js: js.consumer_info(s.LEGACY_STREAM, s.consumer("b", "a")))
        assert (info.num_pending, info.num_ack_pending) == (0, 0), info
    finally:
        _admin_js(swarm, drop_old)


def test_actions_on_the_stream_of_before_are_carried_out_once(swarm: Swarm) -> None:
    """An upgrade from HIVE_OPS (limits retention, ``hive.op.>``, the stream of before): an
    action a's operator published there that b had not taken yet must still be carried
    out, once, checked as any. The admin makes the old stream and b's consumer of a's
    actions there (as an old ensure_streams did) and stores, as a's old code did while b
    was down: a's signed send to bob; the same bytes again under a fresh Nats-Msg-Id (a
    replay); a send signed with a key b doesn't pin. b, started again, reads the old pair
    to its end: bob gets the one message once, the other two are refused, and nothing is
    left pending there."""
    from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

    from hyperhive.swarm.signing import load_or_create_key, seal

    assert swarm.operator_key is not None
    b = swarm.cores["b"]
    body = f"carried before the upgrade {time.time_ns()}"
    request = {"cmd": "send", "to": "bob", "body": body}
    action_id, sealed = seal(load_or_create_key(swarm.operator_key), "a", "b", request)
    _, forged = seal(load_or_create_key(swarm.net.base / "not-a.key"), "a", "b", request)
    subject = f"{s.LEGACY_OPS_ROOT}.b.from.a"

    async def make_old(js: Any) -> None:
        await js.add_stream(StreamConfig(name=s.LEGACY_OPS_STREAM, subjects=[f"{s.LEGACY_OPS_ROOT}.>"],
                                         retention=RetentionPolicy.LIMITS, num_replicas=s.REPLICAS))
        await js.add_consumer(s.LEGACY_OPS_STREAM, ConsumerConfig(
            durable_name=s.ops_consumer("b", "a"), filter_subject=subject,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=s.ACK_WAIT_SECONDS, num_replicas=s.REPLICAS))
        await js.publish(subject, sealed, headers={"Nats-Msg-Id": action_id})
        await js.publish(subject, sealed, headers={"Nats-Msg-Id": f"replay-{action_id}"})
        await js.publish(subject, forged)

    async def drop_old(js: Any) -> None:
        await js.delete_stream(s.LEGACY_OPS_STREAM)

    b.kill9()
    try:
        _admin_js(swarm, make_old)
    finally:
        b.start()
    try:
        got = drain(swarm, "b", "bob", 1, timeout=30)
        assert [(m["from"], m["body"]) for m in got] == [("operator", body)], got
        wait_for(lambda: swarm.status("b")["actions_refused"] == 2, timeout=15)
        assert swarm.status("b")["actions_applied"] == 1
        info = _admin_js(swarm, lambda js: js.consumer_info(s.LEGACY_OPS_STREAM, s.ops_consumer("b", "a")))
        assert (info.num_pending, info.num_ack_pending) == (0, 0), info
        # Once: all three are taken and acked (each applied or refused before its ack), so
        # a second delivery of the send would be in bob's inbox by now.
        assert drain(swarm, "b", "bob", 0, extra=1.0) == []
    finally:
        _admin_js(swarm, drop_old)


def test_the_operator_is_refused_past_its_window_of_unread_actions(swarm: Swarm) -> None:
    """b is down with s.ACTIONS_WINDOW of a's actions unread on their pair (published
    here with a's NATS credentials, as someone holding them could; unsigned, so b refuses
    each once it reads them). The pair keeps only its newest s.ACTIONS_PAIR_MSGS, so a's
    operator must not add to it: the next action is refused on a, one line, nothing
    published. b back: it reads and refuses them, and a's next action is applied."""
    a, b = swarm.cores["a"], swarm.cores["b"]
    subject = s.op_subject("b", "a")

    async def fill(js: Any) -> None:
        for _ in range(s.ACTIONS_WINDOW):
            await js.publish(subject, b"{}")

    async def as_a(use: Any) -> Any:
        nc = await nats.connect(swarm.net.urls("a"), user="host-a", password=swarm.net.passwords["a"],
                                inbox_prefix=s.inbox_prefix("a"))
        try:
            return await use(nc.jetstream(timeout=10))
        finally:
            await nc.close()

    b.kill9()  # (its counters start again at 0 when it is back)
    try:
        wait_for(lambda: not swarm.status("a")["hosts"][1]["reachable"], timeout=15)
        asyncio.run(as_a(fill))
        reply = a.host_call("set_paused", name="bob", paused=True, host="b")
        assert reply.get("ok") is False and "has not read" in reply["error"] and "\n" not in reply["error"], reply
        info = _admin_js(swarm, lambda js: js.consumer_info(s.OPS_STREAM, s.ops_consumer("b", "a")))
        assert info.num_pending == s.ACTIONS_WINDOW, info  # nothing more published
    finally:
        b.start()
    wait_for(lambda: swarm.status("b")["actions_refused"] == s.ACTIONS_WINDOW, timeout=30)
    try:
        reply = a.host_call("set_paused", name="bob", paused=True, host="b")
        assert reply.get("ok") and reply.get("applied"), reply
    finally:
        b.host_call("set_paused", name="bob", paused=False)

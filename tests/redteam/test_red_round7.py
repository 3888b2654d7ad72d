"""Red team, round 7: the egress proxy's speed work (the 200 before the upstream is
verified, idle upstream connections pooled per agent: core/egress_pool.py), the core's
hot path (group commit, ``recv {ack}``, quotas read once per commit) and the swarm's
per-host name claims, attacked from real cages and as a compromised swarm host.

The egress cases run two agents (r7x, r7y), both bound to the same secret for
``pool.test:443``, an HTTPS server in a test network namespace (198.18.71.0/24) that
answers each request with the number of the connection it came on (the same number:
the same pooled upstream connection) and notes what it was sent and how many
connections are open. It also misbehaves on purpose: an
unsolicited second answer after ``/extra``, a body after a HEAD's head."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import assert_ok, wait_for
from hive_fixture import HIVE, HiveProcess, running_hive
from hyperhive.swarm import subjects as s
from hyperhive.swarm.bridge import earliest, live_claims
from swarm_faults import take
from swarm_fixture import Swarm, roster_buckets
from testnet import TestNet

from .conftest import MAX_CORE_LATENCY, cage_run
from .test_budget_store import db_count
from .test_secrets_egress import cert_dir
from .test_swarm_hostile import as_host_c

X, Y = "r7x", "r7y"
NET = TestNet(71, prefix="hvr7")
SERVER = NET.address(2)
SECRET = "r7-secret-" + "s3cr3t" * 6
BINDING = f"""
[[secret_binding]]
secret = "r7pool"
agents = ["{X}", "{Y}"]
to = "pool.test:443"
header = "authorization: Bearer {{}}"
env = "R7_TOKEN"
"""
PENDING_MAX = 10  # r7x's storage quota (rows): the batching case fills it
QUOTA = 10_000  # the default agent_pending_max: the session swarm's alice

# A raw HTTPS/1.1 server (no http.server: it must be able to misbehave). Each request
# is answered with its connection's number; state.json holds the open connections and
# every request's (connection, method, path, whether the bound secret came with it).
SERVER_SCRIPT = r"""
import json, os, socket, ssl, sys, threading, time
ADDR, CERT, STATE, SECRET = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].encode()
LOCK = threading.Lock()
OPEN, SEEN = [0], []

def save():
    with open(STATE + ".tmp", "w") as f:
        json.dump({"open": OPEN[0], "seen": SEEN}, f)
    os.replace(STATE + ".tmp", STATE)

def answer(c, body):
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

def serve(c, conn):
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                data = c.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            method, path = head.split(b" ")[:2]
            with LOCK:
                SEEN.append({"conn": conn, "method": method.decode(), "path": path.decode(),
                             "secret": SECRET in head})
                save()
            me = b"conn=%d" % conn
            if path.startswith(b"/hold"):
                time.sleep(0.4)
                answer(c, me)
            elif path == b"/extra":  # then an answer nobody asked for
                answer(c, me)
                time.sleep(0.2)
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled")
            elif method == b"HEAD":  # a body after a HEAD's head (a broken server)
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled")
            else:
                answer(c, me)
    except OSError:
        pass
    finally:
        c.close()
        with LOCK:
            OPEN[0] -= 1
            save()

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(CERT)
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((ADDR, 443)); ls.listen(128)
with LOCK:
    save()
CONNS = [0]
while True:
    raw, _ = ls.accept()
    with LOCK:
        OPEN[0] += 1
        CONNS[0] += 1
        conn = CONNS[0]  # (numbered: a port may be reused)
        save()
    def run(raw=raw, conn=conn):
        try:
            raw.settimeout(10)
            c = ctx.wrap_socket(raw, server_side=True)
            c.settimeout(None)
        except OSError:
            raw.close()
            with LOCK:
                OPEN[0] -= 1
                save()
            return
        serve(c, conn)
    threading.Thread(target=run, daemon=True).start()
"""

# In the cage: P["steps"] is a list of [kind, arg]: ["get", path] / ["head", path] (one
# connection each, closed after the answer: Content-Length framing), ["sleep", s],
# ["parallel", [n, path]] (n connections at once, all closed together), ["abort", n]
# (n CONNECTs, each closed mid-handshake or after plaintext instead of TLS). The result:
# each step's answers ("conn=N", a body, or an error).
PROBE = r"""
import ssl, threading
PH = os.environ.get("R7_TOKEN", "no-placeholder")

def connect():
    s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    s.sendall(b"CONNECT pool.test:443 HTTP/1.1\r\nHost: pool.test:443\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head
    return s

def one(method, path, keep=None):
    s = connect()
    t = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem").wrap_socket(s, server_hostname="pool.test")
    t.sendall(f"{method} {path} HTTP/1.1\r\nHost: pool.test\r\nAuthorization: Bearer {PH}\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = t.recv(65536)
        if not chunk:
            return "closed: " + buf.decode(errors="replace")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    n = 0 if method == "HEAD" else int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(body) < n:
        body += t.recv(65536)
    if keep is not None:
        keep.append(t)
    else:
        t.close()
    return body.decode(errors="replace") if method != "HEAD" else head.split(b"\r\n")[0].decode()

def abort(n):
    for i in range(n):
        s = connect()
        if i % 2:
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40)  # half a ClientHello
        else:
            s.sendall(f"GET /plain HTTP/1.1\r\nHost: pool.test\r\nAuthorization: Bearer {PH}\r\n\r\n".encode())
        time.sleep(0.01)
        s.close()
    return n

out = []
for kind, arg in P["steps"]:
    if kind == "sleep":
        time.sleep(arg); out.append(None)
    elif kind in ("get", "head"):
        out.append(one(kind.upper(), arg))
    elif kind == "abort":
        out.append(abort(arg))
    elif kind == "parallel":
        n, path = arg
        keep, res = [], []
        ths = [threading.Thread(target=lambda: res.append(one("GET", path, keep))) for _ in range(n)]
        [t.start() for t in ths]; [t.join() for t in ths]
        for t in keep:
            t.close()
        out.append(sorted(res))
result(out=out)
"""


@pytest.fixture(scope="module")
def certs() -> Iterator[Path]:
    with cert_dir("hvr7", "round 7 CA", "pool.test", ["pool.test"]) as (d, _):
        yield d


@pytest.fixture(scope="module")
def hive(certs: Path) -> Iterator[HiveProcess]:
    with NET as n:
        n.serve(SERVER, 443, [sys.executable, "-c", SERVER_SCRIPT, SERVER, str(certs / "server.pem"),
                              str(certs / "state.json"), SECRET])
        rules = ["pool.test:443", f"{SERVER}:443"]
        h = HiveProcess({X: {"command": ["true"], "egress": rules, "peers": [Y]},
                         Y: {"command": ["true"], "egress": rules, "peers": [X]}},
                        sections={"egress": {"hosts": {"pool.test": SERVER}, "upstream_ca": str(certs / "ca.pem")},
                                  "limits": {"agent_pending_max": PENDING_MAX}})
        h.config_path.write_text(h.config_path.read_text() + BINDING)
        h.write_config = lambda agents: None  # type: ignore[method-assign]  # keep the binding
        for hv in running_hive(h):
            assert_ok(hv.host_call("secret_set", name="r7pool", value=SECRET))
            for name in (X, Y):  # their turn loops leave their inboxes to the test
                assert_ok(hv.host_call("set_paused", name=name, paused=True))
            yield hv


def state(certs: Path) -> dict[str, Any]:
    return dict(json.loads((certs / "state.json").read_text()))


def run(hive: HiveProcess, agent: str, steps: list[list[Any]]) -> list[Any]:
    return list(cage_run(hive, agent, PROBE, timeout=120, steps=steps)["out"])


def ports(answers: list[Any]) -> set[str]:
    return {a for a in answers if isinstance(a, str) and a.startswith("conn=")}


# -- the upstream pool -------------------------------------------------------------------------


@pytest.mark.attack("egress.pool-cross-agent", ref="red team round 7: idle upstream connections pooled for 2 s")
def test_an_agent_never_gets_another_agents_pooled_upstream_connection(hive: HiveProcess, certs: Path) -> None:
    """r7x and r7y, at the same time, each open a connection per request to pool.test
    (both bound to the same secret, so both pooled connections carry it): each reuses
    its own idle connections (the pool works: far fewer ports than requests), never
    one the other left."""
    steps = [["get", "/a"], ["sleep", 0.05]] * 16
    got: dict[str, list[Any]] = {}
    threads = [threading.Thread(target=lambda a=a: got.__setitem__(a, run(hive, a, steps))) for a in (X, Y)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    px, py = ports(got[X]), ports(got[Y])
    assert len([a for a in got[X] if a]) == 16 and len([a for a in got[Y] if a]) == 16, got
    assert len(px) < 8 and len(py) < 8, (px, py)  # (else the pool is off and this proves nothing)
    assert not px & py, f"a pooled connection served both agents: {px & py}"


@pytest.mark.attack("egress.pool-desync", ref="red team round 7: bytes left on a pooled connection")
def test_bytes_the_server_sent_unasked_never_answer_the_next_connection(hive: HiveProcess, certs: Path) -> None:
    """The server answers /extra, then (0.2 s later, after the cage has closed) sends a
    second answer nobody asked for; a HEAD's answer comes with a body. The connections
    they came on never serve another request (closed, not pooled: trailing bytes read,
    or readable when taken), and each next request, in the pool's time, gets its own
    answer, never the smuggled bytes."""
    before = len(state(certs)["seen"])
    out = run(hive, X, [["get", "/extra"], ["sleep", 0.5], ["get", "/after-extra"], ["sleep", 0.1],
                        ["head", "/h"], ["sleep", 0.3], ["get", "/after-head"], ["get", "/again"]])
    assert out[4] == "HTTP/1.1 200 OK", out
    for i in (0, 2, 6, 7):
        assert out[i].startswith("conn="), f"step {i} got {out[i]!r}: {out}"
    conn = {r["path"]: r["conn"] for r in state(certs)["seen"][before:]}
    assert set(conn) == {"/extra", "/after-extra", "/h", "/after-head", "/again"}, conn
    assert conn["/extra"] not in {conn[p] for p in ("/after-extra", "/h", "/after-head", "/again")}, conn
    assert conn["/h"] not in {conn["/after-head"], conn["/again"]}, conn


@pytest.mark.attack("budget.core-descriptors", ref="red team round 7: at most 4 idle connections per agent")
def test_the_pool_keeps_at_most_four_idle_connections_per_agent_and_sweeps_them(
    hive: HiveProcess, certs: Path
) -> None:
    """r7x opens 12 connections at once (the server holds each answer 0.4 s so they all
    need an upstream of their own), then closes them all cleanly: 4 stay open upstream
    for reuse, the rest are closed, and none outlives the pool's time."""
    base = state(certs)["open"]
    out = run(hive, X, [["parallel", [12, "/hold"]]])
    assert len(out[0]) == 12 and len(ports(out[0])) > 4, out  # (more than the pool keeps)
    time.sleep(0.5)
    kept = state(certs)["open"] - base
    assert 1 <= kept <= 4, f"{kept} upstream connections kept idle for one agent"
    wait_for(lambda: state(certs)["open"] <= base, timeout=6)


@pytest.mark.attack("egress.connect-before-verify", ref="red team round 7: the 200 goes before the upstream is verified")
def test_a_cage_that_aborts_its_handshake_or_talks_plaintext_leaks_nothing(hive: HiveProcess, certs: Path) -> None:
    """After the early 200, r7x sends plaintext HTTP with its placeholder instead of a
    ClientHello, or half a ClientHello, then hangs up, 40 times: the upstream (opened
    meanwhile) gets no request and is closed each time; the core's descriptors come
    back to where they were."""
    core = hive.core_pid()
    assert core is not None

    def fds() -> int:
        return len(os.listdir(f"/proc/{core}/fd"))

    wait_for(lambda: state(certs)["open"] == 0, timeout=6)
    before, seen = fds(), len(state(certs)["seen"])
    out = run(hive, X, [["abort", 40]])
    assert out == [40], out
    wait_for(lambda: state(certs)["open"] == 0, timeout=15)
    assert [r for r in state(certs)["seen"][seen:] if r["path"] == "/plain"] == []
    wait_for(lambda: fds() <= before + 2, timeout=15)


# -- the core's hot path -----------------------------------------------------------------------

# In the cage: one write of several request lines (pipelined: they are handled in the
# same turn of the loop, so their writes share one commit), then a reply per line.
PIPELINE = """
c = Conn()
c.send(b"".join(json.dumps(r).encode() + b"\\n" for r in P["lines"]))
result(replies=[c.line() for _ in P["lines"]])
"""


@pytest.mark.attack("core.groupcommit", ref="red team round 7: recv {ack} and acks in a shared commit")
def test_recv_ack_of_another_agents_message_refuses_only_itself(hive: HiveProcess) -> None:
    """r7y has a message from r7x. r7x, in one write: a send, a ``recv`` acking r7y's
    message, a send. The recv is refused (not r7x's inbox: nothing acked, nothing read);
    both sends, sharing its commit, stand; r7y still gets its message."""
    mine = assert_ok(hive.agent_call(Y, "send", to=X, body="for x"))["id"]
    theirs = assert_ok(hive.agent_call(X, "send", to=Y, body="for y"))["id"]
    lines = [{"cmd": "send", "to": Y, "body": "r7 one"}, {"cmd": "recv", "ack": [theirs]},
             {"cmd": "send", "to": Y, "body": "r7 two"}]
    replies = cage_run(hive, X, PIPELINE, lines=lines)["replies"]
    assert replies[0]["ok"] and replies[2]["ok"], replies
    assert replies[1] == {"version": 1, "ok": False, "error": f"no message {theirs} in this inbox"}, replies
    got = assert_ok(hive.agent_call(Y, "recv", max=100))["messages"]
    assert [m["body"] for m in got] == ["for y", "r7 one", "r7 two"], got
    assert_ok(hive.agent_call(Y, "ack", ids=[m["id"] for m in got]))
    mine_now = assert_ok(hive.agent_call(X, "recv", max=100))["messages"]  # r7x's own: unread, unacked
    assert [m["id"] for m in mine_now] == [mine], mine_now
    assert_ok(hive.agent_call(X, "ack", ids=[mine]))


@pytest.mark.attack("core.groupcommit", ref="red team round 7: recv {ack} racing an ack on another connection")
def test_two_connections_acking_the_same_messages_ack_each_once(hive: HiveProcess) -> None:
    """r7x's connection A takes 5 messages; at the same moment connection B sends
    ``recv {ack}`` of them and A sends ``ack`` of them. Each message is acked once (the
    two counts add up to 5), B reads none of them again, and after A hangs up a third
    connection gets none of them either (acked, so not redelivered)."""
    for i in range(5):
        assert_ok(hive.agent_call(Y, "send", to=X, body=f"race {i}"))
    race = """
a, b = Conn(), Conn()
ids = [m["id"] for m in a.call({"cmd": "recv", "max": 10})["messages"]]
b.send(json.dumps({"cmd": "recv", "ack": ids, "wait": 0.3}).encode() + b"\\n")
a.send(json.dumps({"cmd": "ack", "ids": ids}).encode() + b"\\n")
rb, ra = b.line(), a.line()
a.s.close()
rc = Conn().call({"cmd": "recv", "wait": 0.3})
result(ids=ids, a=ra, b=rb, c=rc)
"""
    out = cage_run(hive, X, race)
    assert len(out["ids"]) == 5, out
    assert out["a"]["ok"] and out["b"]["ok"], out
    assert out["a"]["acked"] + out["b"]["acked"] == 5, out
    assert out["b"]["messages"] == [] and out["c"]["messages"] == [], out


@pytest.mark.attack("budget.store", ref="red team round 7: quotas read once per commit")
def test_pipelined_sends_cannot_pass_the_storage_quota(hive: HiveProcess) -> None:
    """r7x may hold 10 undelivered messages. It pipelines 30 sends to r7y in one write
    (one commit, the quota read once), then 30 more: exactly 10 are stored, the rest
    refused with the quota's line."""
    lines = [{"cmd": "send", "to": Y, "body": f"q{i}"} for i in range(30)]
    first = cage_run(hive, X, PIPELINE, lines=lines)["replies"]
    second = cage_run(hive, X, PIPELINE, lines=lines)["replies"]
    oks = [r for r in first + second if r["ok"]]
    assert len(oks) == PENDING_MAX, [r for r in first + second][:12]
    refused = {r["error"] for r in first + second if not r["ok"]}
    assert refused == {f"storage quota: agent {X} holds {PENDING_MAX} undelivered messages, questions,"
                       f" approvals and reminders, limit {PENDING_MAX}"}, refused
    got = assert_ok(hive.agent_call(Y, "recv", max=100))["messages"]
    assert len(got) == PENDING_MAX, got
    assert_ok(hive.agent_call(Y, "ack", ids=[m["id"] for m in got]))


@pytest.mark.attack("core.groupcommit", ref="red team round 7: one agent's flood holds everyone's commit")
def test_a_flood_of_large_acks_does_not_starve_another_agents_sends(hive: HiveProcess) -> None:
    """r7x writes acks of 10,000 ids each (none its own: each a SELECT in the shared
    transaction, then refused) as fast as its input budget allows, for ~2 s; meanwhile
    r7y's sends (to the operator) each come back within the red team's latency bound."""
    flood = """
c = Conn()
line = json.dumps({"cmd": "ack", "ids": list(range(10**9, 10**9 + 10000))}).encode() + b"\\n"
end, n = time.time() + P["seconds"], 0
import threading
def drain():
    while c.line() is not None:
        pass
threading.Thread(target=drain, daemon=True).start()
while time.time() < end:
    c.send(line * 8); n += 8
result(sent=n)
"""
    done: dict[str, Any] = {}
    t = threading.Thread(target=lambda: done.update(cage_run(hive, X, flood, seconds=2.0)))
    t.start()
    worst = 0.0
    time.sleep(0.8)  # (the cage is up and flooding)
    while t.is_alive():
        t0 = time.monotonic()
        assert_ok(hive.agent_call(Y, "send", to="operator", body="still here"))
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.05)
    t.join()
    assert done.get("sent", 0) > 50, done
    assert worst < MAX_CORE_LATENCY, f"r7y's send took {worst:.2f} s during r7x's flood"


# -- the swarm ---------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
@pytest.mark.attack("swarm-name-claim", ref="red team round 7: a Nats-Rollup: all header on a host's own claim key")
def test_a_hostile_host_cannot_wipe_the_roster_and_take_the_names(hives: Swarm[HiveProcess]) -> None:
    """Host c may publish only its own keys in the roster bucket, but a KV stream as
    nats-py makes it allows rollup headers, and ``Nats-Rollup: all`` on any message purges
    the whole stream: c wiped every host's claims and rows with one message on its own
    claim key, claimed ``alice`` (now the earliest live claim) and spoke for her to bob.
    Now the bucket's stream refuses rollups (as the message and action streams always
    did): a's claim stays, c's later claim loses, and b drops c's message "from alice"
    (on whole hives: bob's inbox read from his cage)."""
    swarm = hives
    wipe = s.kv_subject("c", s.name_key("r7wipe", "c"))
    claim = s.kv_subject("c", s.name_key("alice", "c"))
    body = json.dumps([{"id": "r7-" + secrets.token_hex(8), "from": "alice", "to": "bob", "kind": "message",
                        "body": "r7: from alice, really", "sent_at": 0}]).encode()
    replies: list[bytes] = []
    claims: list[dict[str, Any]] = []

    async def attack(nc: Any) -> None:
        replies.append((await nc.request(wipe, b"c", headers={"Nats-Rollup": "all"}, timeout=10)).data)
        for subject in (s.msg_subject("b", "c"), s.op_subject("b", "c")):  # (its other streams)
            replies.append((await nc.request(subject, b"[]", headers={"Nats-Rollup": "all"}, timeout=10)).data)
        await nc.request(claim, b"c", timeout=10)
        claims.append(await live_claims(nc, await roster_buckets(nc), "alice"))
        await nc.jetstream().publish(s.msg_subject("b", "c"), body)

    async def restore(nc: Any) -> None:  # the session's swarm: c's keys taken back
        for key in (wipe, claim):
            await nc.request(key, b"", headers={"KV-Operation": "DEL"}, timeout=10)

    dropped = swarm.status("b")["dropped"]
    got: list[dict[str, Any]] = []

    def settled() -> bool:  # (what bob got, take acked)
        got.extend(take(swarm, "b", "bob", wait=0.2))
        return swarm.status("b")["dropped"] > dropped or any(m["body"].startswith("r7:") for m in got)

    try:
        as_host_c(swarm, attack, settle=0)
        wait_for(settled, timeout=15)
        forged = [m for m in got if m["body"] == "r7: from alice, really"]
        assert forged == [], f"bob took c's message as alice's: {forged}; alice's live claims: {claims}"
        assert set(claims[0]) == {"a", "c"} and earliest(claims[0]) == "a", claims
        assert len(replies) == 3 and all(b"rollup not permitted" in r for r in replies), replies
    finally:
        as_host_c(swarm, restore, settle=0)


# alice's pipelined sends, from her cage (``hive exec --as-agent``: her uid, on her
# /run/hive/agent.sock): argv is the socket, the recipient, the bodies' prefix and n; all
# n lines are written at once (a thread) while the replies are read. It prints who the
# hive took it for and its uid, then each reply's ok and the refusals' lines.
PIPELINED = """
import json, os, socket, sys, threading
path, to, prefix, n = sys.argv[1:]
n = int(n)
lines = b"".join(json.dumps({"cmd": "send", "to": to, "body": prefix + str(i)}).encode() + b"\\n"
                 for i in range(n))
with socket.socket(socket.AF_UNIX) as s:
    s.settimeout(120)
    s.connect(path)
    f = s.makefile("rb")
    s.sendall(b'{"cmd": "whoami"}\\n')
    me = json.loads(f.readline())["name"]
    writer = threading.Thread(target=s.sendall, args=(lines,), daemon=True)
    writer.start()
    replies = [json.loads(f.readline()) for _ in range(n)]
    writer.join()
print(json.dumps({"me": me, "uid": os.getuid(), "ok": [bool(r.get("ok")) for r in replies],
                  "refused": sorted({r.get("error") for r in replies if not r.get("ok")})}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
@pytest.mark.attack("budget.store", ref="red team round 7: cross-host sends and the storage quota")
def test_cross_host_sends_count_in_the_senders_storage_quota(hives: Swarm[HiveProcess]) -> None:
    """alice (host a) may hold 10,000 undelivered messages (the default quota). bob (host
    b) reads none; alice pipelines 10,001 sends to him from her cage. Before, all were
    taken (bob's host stored them all under alice's name: neither host counted them). Now
    her messages count in her quota on a from the outbox's commit until b says bob acked
    them (swarm/quota.py): the ones past 10,000 are refused with the quota's line, as a
    local send is, and nothing refused reaches bob. Once bob has read them (from his cage
    on b), b's report gives her the quota back. Whole hives (the session's ``hives``, the
    agents paused: the test reads bob's inbox itself)."""
    swarm = hives
    a, b = swarm.cores["a"], swarm.cores["b"]
    usage = "SELECT coalesce(sum(pending), 0) FROM agent_usage WHERE agent='alice'"
    before = db_count(a, usage)
    n = QUOTA + 1
    argv = [str(HIVE), "--run-dir", str(a.run_dir), "exec", "--as-agent", "alice", "--",
            "python3", "-u", "-c", PIPELINED, "/run/hive/agent.sock", "bob", "r7q", str(n)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    out = json.loads(proc.stdout.splitlines()[-1])
    # It ran in alice's cage and spoke as her.
    assert out["me"] == "alice" and out["uid"] == a.cage("alice")["uid"] != 0, (out["me"], out["uid"])
    sent = sum(out["ok"])
    bob = b.caged("bob")
    got: list[str] = []

    def drained() -> bool:  # the session's swarm: bob's inbox as it was
        msgs = assert_ok(bob.call("recv", wait=0.5, max=1000))["messages"]
        if msgs:
            assert_ok(bob.call("ack", ids=[m["id"] for m in msgs]))
        got.extend(m["body"] for m in msgs if m["body"].startswith("r7q"))
        return len(got) >= sent

    try:
        assert sent == QUOTA - before, f"{sent} of {n} cross-host sends taken; refusals: {out['refused'][:3]}"
        assert out["ok"] == [True] * sent + [False] * (n - sent)  # the first ones, in order
        assert out["refused"] == [f"storage quota: agent alice holds {QUOTA} undelivered messages,"
                                  f" questions, approvals and reminders, limit {QUOTA}"], out["refused"]
    finally:
        wait_for(drained, timeout=120)
    assert got == [f"r7q{i}" for i in range(sent)], (len(got), got[-3:])  # in order; none refused came
    # bob acked them all: b reports it, and a gives alice her quota back.
    wait_for(lambda: db_count(a, usage) == before, timeout=15)
    assert_ok(a.caged("alice").call("send", to="bob", body="r7q-again"))
    wait_for(lambda: drained() and "r7q-again" in got, timeout=15)  # (taken: sent, and back)

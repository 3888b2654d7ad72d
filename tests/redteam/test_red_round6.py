"""Red team, round 6: the session's swarm operator, secrets on the dashboard, ``hive
exec``'s placeholders and the cage's descriptor limit, attacked as a hostile agent in a
real cage, as a compromised swarm host with its own NATS credentials, and against the
signed operator actions' own checks.

One hive (web_hive: nginx, hive-core, hive-priv) with one agent rt6 for the cage, the
dashboard and exec cases; the session's whole-hive swarm (``hives``: tests/swarm_fixture.py,
a hive up on each test host, its agents paused) for the hostile host; the sealed actions and the replay table on their own (no bus: their checks are
pure, and a race is best run many times in a second).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from helpers import assert_ok, wait_for
from hive_fixture import HIVE, HiveProcess, probe_result
from hyperhive.core.store import Store
from hyperhive.swarm import signing
from hyperhive.swarm import subjects as s
from hyperhive.swarm.bridge import earliest, live_claims
from hyperhive.swarm.operator import approval_row
from hyperhive.swarm.opstore import OpsSeen
from hyperhive.wire.secrets import BindingSpec
from swarm_faults import take
from swarm_fixture import Swarm, roster_buckets
from web_fixture import Web, web_hive

from .test_swarm_hostile import as_host_c, violation

AGENT = "rt6"
AGENTS: dict[str, dict[str, Any]] = {AGENT: {"runtime": "command", "command": ["sleep", "infinity"], "peers": []}}
VALUE = "sk-round6-" + "v4lu" * 8
REF_ENV = ("red team round 6: a binding's env names the variable its placeholder goes in; "
           "LD_PRELOAD, BASH_ENV, PYTHONPATH, NODE_OPTIONS, the cage's CA and proxy variables")


@pytest.fixture(scope="module")
def web() -> Iterator[Web]:
    with web_hive(AGENTS) as w:
        assert_ok(w.hive.host_call("secret_set", name="rt6key", value=VALUE))
        yield w


def bindings(web: Web) -> list[dict[str, Any]]:
    [row] = [x for x in web.hive.host_call("secret_ls")["secrets"] if x["name"] == "rt6key"]
    return list(row["bindings"])


# -- secrets: a binding's variable (the dashboard's new bind form, host.sock, hive.toml) ---

HIJACKS = ["LD_PRELOAD", "LD_AUDIT", "PYTHONPATH", "PYTHONWARNINGS", "BASH_ENV", "ENV", "NODE_OPTIONS",
           "PERL5OPT", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE", "GIT_SSH_COMMAND",
           "PAGER", "HIVE_EXTRA", "NO_PROXY"]


@pytest.mark.attack("secrets.binding-env", ref=REF_ENV)
def test_a_binding_cannot_put_its_placeholder_in_a_loader_or_cage_variable(web: Web) -> None:
    """The operator, talked into it by an agent's message ("bind my key with env
    NODE_OPTIONS"), binds a secret through the dashboard's new form. Before round 6 only
    PATH, HOME, USER, LANG, HIVE_AGENT/SOCKET/TURN and *_PROXY were refused: LD_PRELOAD,
    BASH_ENV or PYTHONPATH took the placeholder (a relative path, resolved in a directory
    the agent writes, for its runtime), NODE_OPTIONS or SSL_CERT_FILE broke the runtime
    and the cage's TLS to the proxy, and every clean ``hive exec`` of the agent was
    refused (hive-priv guards PYTHONPATH, BASH_ENV, LD_* and the rest). Now each is
    refused in one line, on every path (form, host.sock, hive.toml), nothing bound."""
    login = web.login()
    for env in HIJACKS:
        r = web.post("/api/secrets/_/bind", login, data={
            "secret": "rt6key", "agents": AGENT, "to": "api.test:443", "header": "x-api-key: {}", "env": env})
        assert r.status_code == 422 and "reserved" in r.text, (env, r.status_code, r.text)
        reply = web.hive.host_call("secret_bind", name="rt6key", agents=[AGENT], to="api.test:443",
                                   header="x-api-key: {}", env=env)
        assert reply["ok"] is False and "reserved" in reply["error"], (env, reply)
        with pytest.raises(ValidationError, match="reserved"):
            BindingSpec(secret="rt6key", agents=[AGENT], to="api.test:443", header="x-api-key: {}", env=env)
    assert bindings(web) == []
    assert assert_ok(web.hive.host_call("agent_env", name=AGENT))["env"] == {}
    # An ordinary variable still binds, and a clean exec (no --trust-home) sees its placeholder.
    r = web.post("/api/secrets/_/bind", login, data={
        "secret": "rt6key", "agents": AGENT, "to": "api.test:443", "header": "x-api-key: {}", "env": "RT6_TOKEN"})
    assert r.status_code == 200, (r.status_code, r.text)
    try:
        proc = web.hive.exec(AGENT, "sh", "-c", 'printf %s "$RT6_TOKEN"', flags=())
        assert proc.returncode == 0 and proc.stdout.startswith("hive-placeholder-"), (proc.stdout, proc.stderr)
        assert VALUE not in proc.stdout + proc.stderr
    finally:
        assert_ok(web.hive.host_call("secret_unbind", name="rt6key", agents=[AGENT]))


@pytest.mark.attack("identity.forge-operator", ref="red team round 6: the Secrets section's new POST routes")
def test_the_bind_and_unbind_routes_need_the_session_token_and_origin(web: Web) -> None:
    """A page elsewhere posting the bind form (CSRF): without the session's token, with
    another Origin, or with no session at all, nothing is bound or unbound."""
    login = web.login()
    form = {"secret": "rt6key", "agents": AGENT, "to": "evil.test:443", "header": "x-api-key: {}"}
    attempts = [
        {"login": login, "origin": web.origin, "data": form},  # no CSRF token
        {"login": login, "origin": "http://evil.test", "data": {**form, "csrf_token": login.csrf}},
        {"login": login, "origin": "null", "data": {**form, "csrf_token": login.csrf}},
        {"login": login, "data": {**form, "csrf_token": "x" * len(login.csrf)}},
        {"origin": web.origin, "data": {**form, "csrf_token": login.csrf}},  # no session cookie
    ]
    for kw in attempts:
        r = web.request("POST", "/api/secrets/_/bind", **kw)
        assert r.status_code in (401, 403), (kw.get("origin"), r.status_code, r.text)
        assert bindings(web) == []
    assert_ok(web.hive.host_call("secret_bind", name="rt6key", agents=[AGENT], to="api.test:443",
                                 header="x-api-key: {}"))
    try:
        r = web.request("POST", "/api/secrets/rt6key/unbind", login=login, origin="http://evil.test",
                        data={"csrf_token": login.csrf, "agent": AGENT})
        assert r.status_code == 403, (r.status_code, r.text)
        assert [b["agent"] for b in bindings(web)] == [AGENT]
    finally:
        assert_ok(web.hive.host_call("secret_unbind", name="rt6key", agents=[AGENT]))


AGENT_ENV_PROBE = r"""
out = {}
for req in [{"cmd": "agent_env", "name": os.environ["HIVE_AGENT"]}, {"cmd": "secret_ls"},
            {"cmd": "secret_bind", "name": "rt6key", "agents": [os.environ["HIVE_AGENT"]],
             "to": "x.test:443", "header": "x-api-key: {}"}]:
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(os.environ["HIVE_SOCKET"])
        c.sendall(json.dumps(req).encode() + b"\n")
        f = c.makefile("rb")
        out[req["cmd"]] = json.loads(f.readline())
result(**out)
"""


@pytest.mark.attack("secrets.read-from-cage", ref="red team round 6: host.sock's new agent_env verb")
def test_the_agent_cannot_call_agent_env_or_other_operator_verbs(web: Web) -> None:
    """agent_env is host.sock's: on agent.sock the agent's own socket refuses it (and
    the operator verbs beside it), so nothing but the operator's exec asks for it."""
    res = probe_result(web.hive.probe(AGENT, AGENT_ENV_PROBE))
    for cmd, reply in res.items():
        assert reply["ok"] is False, (cmd, reply)
    assert VALUE not in json.dumps(res) and "hive-placeholder-" not in json.dumps(res)
    assert bindings(web) == []


# -- the cage's descriptor limit ------------------------------------------------------

NOFILE_PROBE = r"""
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
tries = {}
for name, want in [("hard+1", (soft, hard + 1)), ("1<<20", (1 << 20, 1 << 20)), ("inf", (resource.RLIM_INFINITY,) * 2)]:
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, want)
        tries[name] = "raised"
    except (ValueError, OSError) as e:
        tries[name] = type(e).__name__
# Another process of the cage (the harness, init: another uid) through prlimit: raising its
# limit would not raise ours, but a lowered one must not be the agent's to set either.
others = {}
for pid in [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]:
    try:
        resource.prlimit(int(pid), resource.RLIMIT_NOFILE, (hard + 1, hard + 1))
        others[pid] = "raised"
    except (ValueError, OSError) as e:
        others[pid] = type(e).__name__
# Can it open more than its soft limit after setting soft = hard? Only up to hard.
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
result(soft=soft, hard=hard, tries=tries, others=others, after=resource.getrlimit(resource.RLIMIT_NOFILE))
"""


@pytest.mark.attack("cage.descriptor-limit", ref="red team round 6: cages get an ordinary RLIMIT_NOFILE")
@pytest.mark.parametrize("flags", [(), ("--as-agent",)], ids=["clean-exec", "as-agent"])
def test_the_cage_cannot_raise_its_descriptor_limit(web: Web, flags: tuple[str, ...]) -> None:
    """hive up raises hive-priv's NOFILE for the core's budget; a cage gets 1024 soft, at
    most 65536 hard, and nothing in it (setrlimit, prlimit on any process it can see)
    goes past that hard limit."""
    res = probe_result(_probe(web, NOFILE_PROBE, flags))
    assert res["soft"] <= 1024 and res["hard"] <= 65536, res
    assert set(res["tries"].values()) <= {"ValueError", "PermissionError"}, res
    assert "raised" not in res["others"].values(), res
    assert res["after"] == [res["hard"], res["hard"]], res


def _probe(web: Web, script: str, flags: tuple[str, ...]) -> Any:
    """hive_fixture's probe (its cage check and ``result``) with these exec flags."""
    hive = web.hive
    real = hive.exec

    def exec_with_flags(name: str, *argv: str, **kw: Any) -> Any:
        return real(name, *argv, **{**kw, "flags": flags})

    hive.exec = exec_with_flags  # type: ignore[method-assign]
    try:
        return hive.probe(AGENT, script)
    finally:
        del hive.exec


# -- signed operator actions, on their own -------------------------------------------------


def _sealed(key: Ed25519PrivateKey, action: dict[str, Any]) -> bytes:
    sig = base64.b64encode(key.sign(signing.canonical(action))).decode()
    return json.dumps({"action": action, "sig": sig}).encode()


@pytest.mark.attack("swarm-operator-forgery", ref="red team round 6: re-targeting, tampering, a time that never expires")
def test_a_sealed_action_cannot_be_retargeted_tampered_or_made_eternal() -> None:
    a, c = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pins = {"a": signing.parse_public(signing.public_b64(a)), "c": signing.parse_public(signing.public_b64(c))}
    request = {"cmd": "approve", "id": 3, "payload_sha256": "0" * 64}
    _, data = signing.seal(a, "a", "b", request)
    assert signing.open_sealed(data, "a", "b", pins)["request"] == request
    refused = {
        "to another host (c relays a's action for b to d)": (data, "a", "d"),
        "republished on c's subject": (data, "c", "b"),
    }
    env = json.loads(data)
    for name, change in [("another approval", {"id": 4}), ("another host field", {"host": "b"}),
                         ("another verb", {"cmd": "spawn"})]:
        forged = {**env, "action": {**env["action"], "request": {**request, **change}}}
        refused[f"tampered: {name}"] = (json.dumps(forged).encode(), "a", "b")
    # c, pinned too, re-signs a's action (its id, its request) as from a: not a's key.
    refused["re-signed by another pinned host"] = (_sealed(c, env["action"]), "a", "b")
    # A pinned host's own key, but a time that compares false both ways (NaN) or never ends:
    # it passed the window, and once its id was pruned it was good for a replay forever.
    for at in (math.nan, math.inf, -math.inf):
        odd = {**env["action"], "id": secrets.token_hex(16), "at": at}
        refused[f"at={at}"] = (_sealed(a, odd), "a", "b")
    for name, (blob, subject_host, this_host) in refused.items():
        with pytest.raises(signing.ActionError):
            signing.open_sealed(blob, subject_host, this_host, pins)
            pytest.fail(name)


@pytest.mark.attack("swarm-operator-forgery", ref="red team round 6: racing the replay table")
def test_the_replay_table_takes_an_action_once_under_a_race(tmp_path: Path) -> None:
    """The same sealed action handed over twice at once (a redelivery racing the first, or
    two cores on one store after a restart): two connections claim each id together; each
    id is taken exactly once, per host whose operator signed it."""
    stores = [Store(tmp_path / "hive.db") for _ in range(2)]
    try:
        tables = [OpsSeen(st.db) for st in stores]
        ids = [secrets.token_hex(16) for _ in range(100)]
        wins: list[list[bool]] = [[], []]
        start = threading.Barrier(2)

        def claim(i: int) -> None:
            start.wait()
            wins[i].extend(tables[i].claim("a", aid, "0" * 64, n) for n, aid in enumerate(ids))

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(not t.is_alive() for t in threads)
        assert [x + y for x, y in zip(wins[0], wins[1], strict=True)] == [1] * len(ids)
        assert not any(tables[i].claim("a", aid, "0" * 64, 0) for i in (0, 1) for aid in ids)
        # Bound to its host: another host's action under a's ids takes rows of its own
        # (it can't pre-empt a's, nor be taken for one), each once too.
        assert all(tables[0].claim("c", aid, "1" * 64, 0) for aid in ids)
        assert not any(tables[1].claim("c", aid, "1" * 64, 0) for aid in ids)
    finally:
        for st in stores:
            st.close()


@pytest.mark.attack("swarm-host-spoofing", ref="red team round 6: a roster payload at the JSON decoder's depth limit")
def test_an_approval_payload_at_the_decoders_depth_limit_is_shown_not_raised() -> None:
    """The roster watch decodes a row (raw JSON, another host's) and measures its payload
    by encoding it again: at depths the decoder just takes, the encoder must not raise
    (the watch restarting into the same key froze the roster everywhere in round 5)."""
    def row(depth: int) -> Any:
        return json.loads('{"payload":' + "[" * depth + "]" * depth + ',"payload_sha256":"' + "0" * 64 + '"}')

    deepest = 0
    for depth in range(1200, 0, -1):  # the deepest this stack decodes (pytest's own is deep)
        try:
            row(depth)
        except RecursionError:
            continue
        deepest = depth
        break
    assert deepest > 100
    for depth in range(deepest, deepest - 40, -1):
        got = approval_row("c", 1, row(depth))  # must not raise
        assert got["host"] == "c" and got["id"] == 1


# -- a compromised host and the swarm-wide names --------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
@pytest.mark.attack("swarm-name-claim", ref="red team round 6: names.<agent> is create-only by convention only")
def test_a_hostile_host_cannot_take_over_another_hosts_agent_name(hives: Swarm[HiveProcess]) -> None:
    """Host c, with its own NATS credentials, puts its own claim of ``alice`` (a's agent)
    in the roster bucket, then sends bob a message "from alice" on its own subject. Its
    claim is later than a's, so the name stays a's and b drops the message (round 6: c
    could overwrite the one key names.alice, and bob took the message as alice's)."""
    key = s.kv_subject("c", s.name_key("alice", "c"))
    body = json.dumps([{"id": "r6-" + secrets.token_hex(8), "from": "alice", "to": "bob", "kind": "message",
                        "body": "r6: from alice, really", "sent_at": 0}]).encode()
    replies: list[bytes] = []
    claims: list[dict[str, Any]] = []

    async def attack(nc: Any) -> None:
        replies.append((await nc.request(key, b"c", timeout=10)).data)  # a put, its own key
        # What a receiver whose cache is behind reads: both claims live, a's the earlier.
        claims.append(await live_claims(nc, await roster_buckets(nc), "alice"))
        await nc.jetstream().publish(s.msg_subject("b", "c"), body)

    async def restore(nc: Any) -> None:  # the session's swarm: c's claim taken back
        await nc.request(key, b"", headers={"KV-Operation": "DEL"}, timeout=10)

    dropped = hives.status("b")["dropped"]
    got: list[dict[str, Any]] = []

    def settled() -> bool:  # b dropped it, or bob has it (his inbox read from his cage)
        got.extend(take(hives, "b", "bob", wait=0.2))
        return hives.status("b")["dropped"] > dropped or any(m["body"].startswith("r6:") for m in got)

    try:
        as_host_c(hives, attack, settle=0)
        wait_for(settled, timeout=15)
        assert set(claims[0]) == {"a", "c"} and earliest(claims[0]) == "a", claims
        forged = [m for m in got if m["body"] == "r6: from alice, really"]
        assert forged == [], f"bob took c's message as alice's: {forged}; the bucket said {replies}"
    finally:
        as_host_c(hives, restore, settle=0)  # (what bob got, take acked)
        wait_for(lambda: all(r["host"] == "a" for r in hives.status("b")["agents"] if r["name"] == "alice"),
                 timeout=15)


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
@pytest.mark.attack("swarm-name-claim", ref="red team round 6: names.<agent> is create-only by convention only")
@pytest.mark.parametrize("op", ["put", "delete"])
def test_a_hostile_host_cannot_write_another_hosts_name_claim(hives: Swarm[HiveProcess], op: str) -> None:
    """Host c may write only its own claims (names.<agent>.c): putting over or deleting
    a's claim of alice (names.alice.a) is a permissions violation, and alice stays a's."""
    subject = s.kv_subject("a", s.name_key("alice", "a"))

    async def attack(nc: Any) -> None:
        headers = {"KV-Operation": "DEL"} if op == "delete" else None
        await nc.publish(subject, b"c", headers=headers)
        await nc.flush()

    async def claim_of_a() -> bytes | None:  # as the admin: a's claim as the bucket has it
        user, password = hives.net.admin()
        nc = await nats.connect(hives.net.urls("a"), user=user, password=password)
        try:
            return (await (await nc.jetstream().key_value(s.bucket("a"))).get(s.name_key("alice", "a"))).value
        finally:
            await nc.close()

    violation(as_host_c(hives, attack), f'publish to "{subject}"')
    assert asyncio.run(claim_of_a()) == b"a"


INJECTED = "</span><script>alert('r6')</script>\r\nevent: update\ndata: <img src=x onerror=alert(6)>\u202egnp.exe"


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
@pytest.mark.attack("surface.cockpit-stream", ref="red team round 6: another host's roster rows on the dashboard")
def test_a_hostile_hosts_roster_rows_cannot_inject_into_the_dashboard_or_its_stream(hives: Swarm[HiveProcess]) -> None:
    """Host c writes its own roster keys (questions.c.*, approvals.c.*: NATS lets it),
    their text made to close the markup, start a script, end the SSE event and forge the
    next one, and flip the text's direction. On a's dashboard ("On other hosts") and its
    live stream the text stays text: escaped, no CR, no forged event line, no raw bidi."""
    qkey, akey = s.kv_subject("c", "questions.c.9001"), s.kv_subject("c", "approvals.c.9002")
    question = {"id": 9001, "asker": "carol", "question": INJECTED, "options": [INJECTED, '"><b>x'],
                "asked_at": INJECTED}
    approval = {"id": 9002, "agent": "carol", "kind": INJECTED, "description": INJECTED,
                "payload": {"x": INJECTED}, "payload_sha256": "0" * 64, "grants": INJECTED,
                "allows": INJECTED, "requested_at": "2026-01-01T00:00:00Z"}

    stop = threading.Event()

    async def write(nc: Any) -> None:
        # c's honest core deletes rows of its own host that it did not publish (about every
        # second): the compromised c writes them again and again while a is looked at.
        while not stop.is_set():
            for key, row in ((qkey, question), (akey, approval)):
                await nc.request(key, json.dumps(row).encode(), timeout=10)
            await asyncio.sleep(0.05)

    async def take_back(nc: Any) -> None:
        for key in (qkey, akey):
            await nc.request(key, b"", headers={"KV-Operation": "DEL"}, timeout=10)

    a = hives.cores["a"]
    token = (a.state_dir / "operator.token").read_text().strip()
    transport = httpx.HTTPTransport(uds=str(a.run_dir / "core.sock"))
    writer = threading.Thread(target=as_host_c, args=(hives, write), kwargs={"settle": 0}, daemon=True)
    writer.start()
    ids = ('id="question-c-9001"', 'id="approval-c-9002"')
    try:
        with httpx.Client(transport=transport, base_url="http://core", timeout=30) as web:
            assert web.get("/login", params={"token": token}).status_code == 303

            def first_event() -> str:
                """The live stream's first event, every section drawn (the SSE framing of
                the rows' text: sse()), as bytes decoded (a CR is a line end to SSE)."""
                raw = b""
                with web.stream("GET", "/api/dashboard/stream", params={"view": "html"}) as live:
                    for chunk in live.iter_bytes():
                        raw += chunk
                        if b"\n\n" in raw.split(b"event: update\n", 1)[-1]:
                            break
                return raw.decode()

            def drawn() -> tuple[str, str] | None:
                page, text = web.get("/").text, first_event()
                return (page, text) if all(i in page and i in text for i in ids) else None

            page, text = wait_for(drawn, timeout=20)
    finally:
        stop.set()
        writer.join(15)
        as_host_c(hives, take_back, settle=0)
    streamed = text.split("\n")
    for shown in (text, page):
        assert "<script>alert" not in shown and "<img src=x" not in shown and '"><b>x' not in shown
        assert "\r" not in shown and "\u202e" not in shown
    events = [line for line in streamed if line.startswith("event:")]
    assert set(events) <= {"event: update", "event: swarm"}, events
    assert not any(line.startswith("data: <img") for line in streamed)
    assert "&lt;script&gt;alert" in page and "&lt;script&gt;alert" in text  # shown, as text


@pytest.mark.attack("exec.planted-code", ref="red team round 6: hive exec takes the agent's env from hive-core (agent_env)")
def test_a_compromised_core_cannot_set_a_clean_execs_path_through_agent_env(web: Web, tmp_path: Path) -> None:
    """hive exec (root) asks hive-core's host.sock for the agent's placeholders. A
    compromised hive-core answers PATH=/home/agent/bin:..., GIT_SSH_COMMAND, a name with
    a placeholder-looking value that isn't one: the clean exec must run the operator's
    command with none of them, only a real placeholder in an ordinary variable. (The
    core as a fake socket beside the real priv.sock, in a run directory of its own.)"""
    good = "hive-placeholder-" + "ab" * 20
    hostile = {"PATH": "/home/agent/bin:/usr/bin:/bin", "GIT_SSH_COMMAND": "/home/agent/x",
               "RT6_TOKEN": good, "RT6_OTHER": good + "x", "PAGER": good}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "priv.sock").symlink_to(web.hive.priv_sock)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(run_dir / "host.sock"))
    server.listen(4)
    asked: list[dict[str, Any]] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            with conn, conn.makefile("rb") as f:
                asked.append(json.loads(f.readline()))
                conn.sendall(json.dumps({"version": 1, "ok": True, "name": AGENT, "env": hostile}).encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        proc = subprocess.run([str(HIVE), "--run-dir", str(run_dir), "exec", AGENT, "--", "python3", "-c",
                               "import json, os; print(json.dumps(dict(os.environ)))"],
                              capture_output=True, text=True, timeout=60)
    finally:
        server.close()
        thread.join(5)
    assert asked == [{"cmd": "agent_env", "name": AGENT}], asked
    assert proc.returncode == 0, proc.stderr
    env = json.loads(proc.stdout)
    assert env["RT6_TOKEN"] == good
    assert "/home/agent" not in env["PATH"] and "GIT_SSH_COMMAND" not in env, env
    assert "RT6_OTHER" not in env and "PAGER" not in env, env


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
@pytest.mark.attack("swarm-host-spoofing", ref="red team round 6: a hostile host stalling another host's inbox")
def test_a_hostile_host_cannot_stall_another_hosts_inbox(hives: Swarm[HiveProcess]) -> None:
    """Host c fills its own subject to b with poison: bundles nested past the decoder,
    1,024 messages each from a different name no one claimed (each one a look in the
    bucket), messages and questions to the operator and to no one. Each is dropped once
    (acked, not redelivered forever), a's message to bob arrives meanwhile (a consumer per
    sending host), and c's own next honest message to bob arrives after them all."""
    unknown = [{"id": f"r6u-{i}-{secrets.token_hex(4)}", "from": f"nobody{i}", "to": "bob", "kind": "message",
                "body": "x", "sent_at": 0} for i in range(1024)]
    odd = [{"id": "r6o-" + secrets.token_hex(6), "from": "carol", "to": to, "kind": kind, "body": "to whom?",
            "sent_at": 0, **({"qid": 7} if kind == "question" else {})}
           for to in ("operator", "nobody") for kind in ("message", "question")]

    body_a, body_c = "r6: a, meanwhile " + secrets.token_hex(4), "r6: c, after " + secrets.token_hex(4)
    after = [{"id": "r6c-" + secrets.token_hex(6), "from": "carol", "to": "bob", "kind": "message",
              "body": body_c, "sent_at": 0}]  # c's own agent: the receiver's roster check passes

    async def attack(nc: Any) -> None:
        js = nc.jetstream()
        for data in (b"[" * 100_000 + b"]" * 100_000, json.dumps(unknown).encode(), json.dumps(odd).encode(),
                     json.dumps(after).encode()):
            await js.publish(s.msg_subject("b", "c"), data, timeout=10)

    dropped = hives.status("b")["dropped"]
    assert as_host_c(hives, attack, settle=0) == []
    assert_ok(hives.cores["a"].caged("alice").call("send", to="bob", body=body_a))
    got: list[dict[str, Any]] = []

    def both() -> bool:  # bob's inbox, read (and acked) from his cage
        got.extend(take(hives, "b", "bob", wait=0.5))
        return {body_a, body_c} <= {m["body"] for m in got}

    wait_for(both, timeout=20)
    assert [m for m in got if m["body"] in ("x", "to whom?")] == []
    assert hives.status("b")["dropped"] >= dropped + 1 + len(unknown)
    questions = assert_ok(hives.cores["b"].host_call("questions"))["questions"]
    assert all(q["question"] != "to whom?" for q in questions), questions

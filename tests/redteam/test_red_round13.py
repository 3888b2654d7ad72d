"""Red team, round 13: session 8's changes on a boundary, attacked.

Broke (fixed in this round):

- ``swarm-host-spoofing``: swarm/jsontext.py refused a lone surrogate only when it was
  spelled as a ``\\u`` escape, and left the bytes to ``json.loads``, which guesses UTF-16
  or UTF-32 from the first bytes and decodes with ``surrogatepass``: c's roster row with
  its status text's surrogate written raw (UTF-8's ED A0 80, or a whole row in UTF-16)
  passed, and every host's ``swarm_status`` failed again (round 11's case, bypassed).
  jsontext reads bytes as strict UTF-8 now.
- ``swarm-consumer-flood``: b looked up (three bucket reads) the sender of each message
  of c's that its cache gave to another host or to none: c's bundles of 1,024 messages
  from alice, or from names of no one's, cost b's core ~0.5 ms of CPU each (~50% of a
  CPU for as long as c kept sending, at no cost to c). A sender is looked up once a
  bundle now, and a bundle's try looks up at most 64 (swarm/bridge.py LOOKUPS_PER_TRY).
- ``init.idle-sleep`` (the harness's side of a turn): the harness sent a turn's entries
  200 at a time as JSON (a control character 6 bytes, an emoji 12): a turn printing 64
  lines of 16,000 \\x01, or another agent's message of 200,000 emoji recorded as the
  turn's input, was a line past the core's 1 MiB; the core closed the connection, the
  message was delivered again and again, and the turn never ended (a peer wedged its
  recipient). The harness cuts an entry to what the core keeps and a request to 512 KiB.

Held:

- The cage start path (init sleeps until woken; the harness long-polls 150 to 300 s):
  an agent's turn leaves a group with no leader, a stopped process, a zombie under a
  process that never reaps, a setsid daemon and a process ignoring SIGTERM; its next
  turn is still served at once, the operator's interrupt still ends a turn that ignores
  SIGTERM within the harness's grace, and destroy takes all of it and the cage's cgroup
  with it, in bounded time (class ``init.idle-sleep``).
- The agents cache (one row replaced on a write): an agent's status writes between the
  operator's writes of other rows, and a status write whose transaction fails, never make
  the cache serve anything but what the table holds (class ``core.agents-cache``).
- The form posts' way back (``back_to``): a Referer whose host or agent name looks like a
  path, a scheme-relative or an encoded one, never leaves the origin or a known route.
- Another host's agent's page with a host or name that looks like a path (a 404), the
  send box's host field as a subject, a wildcard or a list (a 422, nothing carried), and
  an approval of c's whose payload nests 950 lists deep (listed; every listing and page
  answers).

One hive (r13x: a command runtime that runs its turn's message as Python, behind the
cage check) for the cage case; a real store in process for the cache; whole hives (the
swarm fixture, host c with its own credentials) for the roster.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from helpers import assert_ok, wait_for
from hive_fixture import HiveProcess, proc_start_time, running_hive
from hyperhive.core.actors import Agent
from hyperhive.core.hive import Hive
from hyperhive.core.http import back_to
from hyperhive.core.store.agents import AgentRepo
from hyperhive.core.store.db import riding
from hyperhive.swarm import jsontext
from hyperhive.swarm import subjects as s
from swarm_faults import drain
from swarm_fixture import Swarm
from test_replies import hive as store_hive  # noqa: F401  (agents a and b, peers)
from test_turns import transcript, wait_turn
from web_fixture import META_CSRF

from .conftest import cage_run
from .test_swarm_hostile import as_host_c
from .test_swarm_pages_hostile import login

# -- the cage start path: init sleeps, the harness long-polls ------------------------------

X = "r13x"
# The runtimes: each turn runs its message's body as Python, as the runtime uid, in the
# cage, after the same check a probe makes (never as root, only under the cage's hostname,
# only where the cage's agent socket is).


def runner(name: str) -> str:
    """The runtime's program for agent ``name``."""
    return (
        "import json, os, socket, sys\n"
        "m = json.loads(sys.stdin.readline())\n"
        f"if os.getuid() == 0 or os.geteuid() == 0 or socket.gethostname() != {name!r}"
        " or not os.path.exists('/run/hive/agent.sock'):\n"
        "    print('NOT IN A CAGE', flush=True); sys.exit(3)\n"
        "exec(m['body'])\n"
    )


Y, W, Z = "r13y", "r13w", "r13z"  # z writes to w
AGENTS: dict[str, dict[str, Any]] = {
    n: {"runtime": "command", "command": ["python3", "-c", runner(n)]} for n in (X, Y, W)
}
AGENTS[Z] = {"runtime": "command", "command": ["true"], "peers": [W]}

# Left behind by a turn, each a way to keep something alive or to keep init busy.
LEAVE_BEHIND = """
import os, signal, subprocess, time
quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
kids = []
# in the turn's session and group, whose leader (this process) exits: a group with no leader
kids.append(subprocess.Popen(["sleep", "600"], **quiet).pid)
# stopped
p = subprocess.Popen(["sleep", "600"], **quiet); os.kill(p.pid, signal.SIGSTOP); kids.append(p.pid)
# a zombie under a process that never reaps it (sh execs sleep: the child's exit is never waited)
kids.append(subprocess.Popen(["sh", "-c", "sleep 0 & exec sleep 600"], **quiet).pid)
# deaf to SIGTERM
kids.append(subprocess.Popen(["python3", "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"], **quiet).pid)
# a daemon: a session of its own, its parent gone (not init's child, nor in any of its groups)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(600)
    os._exit(0)
os.wait()
time.sleep(0.3)
print("left", len(kids), flush=True)
"""
# A turn that won't end by itself, deaf to SIGTERM: only the interrupt's SIGKILL ends it.
DEAF_TURN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("deaf", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def r13() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(AGENTS))


def _entries(hive: HiveProcess, name: str) -> list[dict[str, Any]]:
    """``name``'s whole transcript: every page (a reply holds what fits its byte budget)."""
    out: list[dict[str, Any]] = []
    while True:
        reply = assert_ok(hive.host_call("transcript", name=name, after=out[-1]["id"] if out else 0, limit=5000))
        out += reply["entries"]
        if not reply.get("more") or not reply["entries"]:
            return out


def _ended(hive: HiveProcess, name: str, turn: int, timeout: float) -> list[dict[str, Any]]:
    """Turn ``turn``'s entries once its exit is recorded (else a one-line failure, with
    the cage's log: a harness that lost its connection says so there)."""
    try:
        wait_for(lambda: any(e["turn"] == turn and e["kind"] == "exit" for e in _entries(hive, name)), timeout=timeout)
    except AssertionError:
        kinds = [e["kind"] for e in _entries(hive, name) if e["turn"] == turn]
        log = (hive.state_dir / "priv" / "cages" / name / "cage.log").read_text(errors="replace")[-1500:]
        raise AssertionError(f"turn {turn} never ended: its entries {kinds}; the cage's log:\n{log}") from None
    return [e for e in _entries(hive, name) if e["turn"] == turn]


def _send(hive: HiveProcess, body: str, to: str = X) -> int:
    return int(assert_ok(hive.host_call("send", to=to, body=body))["id"])


def _uid_procs(uids: set[int]) -> list[int]:
    """Host pids whose real uid is one of ``uids``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    line = next(x for x in f if x.startswith("Uid:"))
            except (OSError, StopIteration):
                continue
            if int(line.split()[1]) in uids:
                out.append(int(entry))
    return out


@pytest.mark.attack("init.idle-sleep", ref="red team round 13: leftovers keep init and the harness asleep or the cage alive")
def test_leftovers_neither_wedge_the_cage_nor_outlive_its_destroy(r13: HiveProcess) -> None:
    """init sleeps until a child's exit or the harness wakes it, and the harness's polls
    last up to 300 s: the agent leaves behind, from a turn, what init never sees exit (a
    group whose leader is gone, a stopped process, a zombie under a process that never
    reaps, a setsid daemon, processes deaf to SIGTERM). Then: a message is still a turn at
    once (init spawns it; the harness's turn poll is woken, not left to its 300 s), the
    operator's interrupt ends a turn deaf to SIGTERM within the harness's grace (the control
    poll is woken), and destroy ends every process of the agent's uids on the host and
    removes the cage's cgroup, in bounded time."""
    h = r13
    cage = h.cage(X)
    uids = {cage["uid"], cage["harness_uid"]}
    cgroup = h.cgroup(X)
    first = _send(h, LEAVE_BEHIND)
    entries = wait_turn(h, X, first, timeout=30)
    assert any(e["kind"] == "stdout" and e["data"] == "left 4" for e in entries), entries
    left = {pid: proc_start_time(pid) for pid in cgroup.pids()}
    assert len(left) >= 4 + 3, left  # bwrap, init, the harness and what the turn left

    # A message now: a turn at once, though the harness has been polling since the last.
    time.sleep(2.0)
    t0 = time.monotonic()
    second = _send(h, "print('second', flush=True)")
    entries = wait_turn(h, X, second, timeout=20)
    took = time.monotonic() - t0
    assert any(e["data"] == "second" for e in entries if e["kind"] == "stdout"), entries
    assert took < 10, f"the second turn took {took:.1f} s"

    # A turn deaf to SIGTERM, interrupted by the operator: ended within the grace.
    third = _send(h, DEAF_TURN)
    wait_for(lambda: any(e["turn"] == third and e["data"] == "deaf" for e in transcript(h, X)), timeout=20)
    t0 = time.monotonic()
    assert_ok(h.host_call("interrupt", name=X))
    wait_turn(h, X, third, timeout=20)
    took = time.monotonic() - t0
    assert took < 10, f"the interrupt took {took:.1f} s"

    # Destroy: nothing of the agent's uids left on the host, the cgroup gone, in bounded time.
    t0 = time.monotonic()
    assert_ok(h.host_call("destroy", name=X))
    took = time.monotonic() - t0
    assert took < 20, f"destroy took {took:.1f} s"
    wait_for(lambda: not _uid_procs(uids), timeout=10)
    assert not any(d.exists() for d in cgroup.dirs), [str(d) for d in cgroup.dirs if d.exists()]
    # The same process (its pid and its start time), and not a zombie: the outer bwrap was
    # orphaned at its start (setsid --fork) and is the host's pid 1's to reap, once it exits.
    alive = [pid for pid, started in left.items() if proc_start_time(pid) == started and not _zombie(pid)]
    assert not alive, f"the cage's processes outlived its destroy: {[_what(pid) for pid in alive]}"


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True  # gone


def _what(pid: int) -> str:
    """A process as /proc has it: its command line, ids, state and cgroup."""
    proc = Path(f"/proc/{pid}")
    try:
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        status = {k: v.strip() for k, _, v in (x.partition(":") for x in (proc / "status").read_text().splitlines())}
        cgroup = (proc / "cgroup").read_text().strip()
    except OSError as e:
        return f"gone ({e})"
    return f"{cmdline!r} state {status.get('State')} uid {status.get('Uid')} ppid {status.get('PPid')} cgroup {cgroup}"


# Output whose JSON is six times its bytes: each control character is ``\\u0001`` in the
# harness's turn_record (json.dumps, ensure_ascii), 64 lines of 16,000 (MAX_ENTRY) in one
# flush: ~6 MiB on one line to a core that takes lines of 1 MiB.
ESCAPED = """
import sys
for _ in range(64):
    sys.stdout.write("\\x01" * 16000 + "\\n")
sys.stdout.flush()
"""


@pytest.mark.attack("init.idle-sleep", ref="red team round 13: a turn's output whose JSON is six times its size")
def test_output_that_escapes_large_neither_loops_nor_loses_the_turn(r13: HiveProcess) -> None:
    """A turn's output is bounded in bytes (1 MiB) and lines, but the harness sends it as
    JSON with every control character escaped (6 bytes for 1): 64 lines of 16,000 \\x01
    flushed together. The turn must end once, with its exit recorded, and the next message
    be a turn of its own, promptly: not the core closing the harness's connection on an
    oversized line, the turn run again and again."""
    h = r13
    first = _send(h, ESCAPED, to=Y)
    entries = _ended(h, Y, first, timeout=60)
    assert [e["kind"] for e in entries] == ["input", *["stdout"] * 64, "exit"], [e["kind"] for e in entries]
    assert all(e["data"] == "\x01" * 16000 for e in entries[1:-1])
    second = _send(h, "print('after', flush=True)", to=Y)
    entries = _ended(h, Y, second, timeout=30)
    assert any(e["kind"] == "stdout" and e["data"] == "after" for e in entries), entries
    assert [e["kind"] for e in _entries(h, Y) if e["turn"] == first].count("exit") == 1


# Sent from z's cage: 200,000 characters outside the BMP (800 KB as UTF-8 on z's line, as
# its body may be), which w's harness records as its turn's input (12 bytes each as JSON).
EMOJI = """
c = Conn()
reply = c.raw(json.dumps({"cmd": "send", "to": P["to"], "body": "\\U0001F600" * 200_000},
                         ensure_ascii=False).encode() + b"\\n")
result(reply=reply)
"""


@pytest.mark.attack("init.idle-sleep", ref="red team round 13: another agent's message whose JSON is three times its size")
def test_a_message_that_escapes_large_does_not_wedge_its_recipient(r13: HiveProcess) -> None:
    """Another agent (z, from its cage) sends w a message of 200,000 emoji: 800 KB on its
    own line, as a message may be. w's harness records the message as its turn's input,
    each emoji 12 bytes of JSON: a 2.4 MiB line. w's turn must end once and its next
    message be a turn of its own: not w's harness losing its connection to the core on
    every try, the message delivered again and again, w wedged by a message it got."""
    h = r13
    reply = cage_run(h, Z, EMOJI, to=W)["reply"]
    assert reply["ok"] is True, reply
    first = int(reply["id"])
    entries = _ended(h, W, first, timeout=60)
    inputs = [e for e in entries if e["kind"] == "input"]
    assert len(inputs) == 1 and inputs[0]["data"].endswith("more characters dropped]"), [str(e)[:200] for e in inputs]
    second = _send(h, "print('after the emoji', flush=True)", to=W)
    entries = _ended(h, W, second, timeout=30)
    assert any(e["kind"] == "stdout" and e["data"] == "after the emoji" for e in entries), entries


@pytest.mark.attack("init.idle-sleep", ref="red team round 13: entries the core would refuse or cut, cut first")
@pytest.mark.parametrize(
    "data",
    [
        "\x01" * 200_000,
        "\U0001f600" * 200_000,
        {"type": "assistant", "text": "\x01" * 100_000},
        {"type": "result", "result": "x\ud800y"},  # a runtime's JSON line may spell a lone surrogate
        "short",
        {"type": "system", "ok": True},
    ],
)
def test_a_harness_entry_always_fits_a_request(data: Any) -> None:
    """What the harness sends of any entry: at most what the core keeps (its constant is the
    wire's), Unicode the core takes, and a request under the core's 1 MiB line however
    its characters escape; an entry that fits is sent as it is."""
    from hyperhive.cage import harness
    from hyperhive.wire.harness import MAX_ENTRY_CHARS

    assert harness.ENTRY_CHARS == MAX_ENTRY_CHARS
    fit = harness.fit_entry(data)
    text = fit if isinstance(fit, str) else json.dumps(fit, ensure_ascii=False)
    text.encode()  # no lone surrogate
    assert len(text) <= MAX_ENTRY_CHARS
    line = json.dumps({"cmd": "turn_record", "turn": 1, "entries": [{"kind": "stdout", "data": fit}]})
    assert len(line) < 1 << 20
    if (isinstance(data, str) and len(data) <= MAX_ENTRY_CHARS) or data == {"type": "system", "ok": True}:
        assert fit == data


# -- the agents cache: one row replaced on a write ----------------------------------------


def _fresh(hive: Hive) -> list[Any]:
    """The table as a fresh read gives it (a repository of its own, no cache)."""
    return AgentRepo(hive.store.db).all()


@pytest.mark.attack("core.agents-cache", ref="red team round 13: status writes between others' writes, and one that fails")
def test_status_writes_never_make_the_cache_serve_another_row(store_hive: Hive) -> None:
    """a sets its status as fast as it likes, with texts that look like another agent's row
    (b's name, JSON of a row, a NUL, 64 KiB), between the operator's writes of b's row (its
    spec, pause, stop, parent) and of a's own; and a status write whose transaction fails
    after its UPDATE (a rider that raises: rolled back). After each, what the cache serves
    (every row, and each by name) is what a fresh read of the table gives."""
    hive, a = store_hive, Agent("a")
    agents = hive.store.agents
    spec_b = agents.get("b")
    assert spec_b is not None
    texts = ["b", '{"name": "b", "paused": true}', "x\x00b", "é" * 32768, "", "a"]
    writes = [
        lambda: agents.set_flag("b", "paused", True),
        lambda: agents.set_spec("b", spec_b.spec.model_copy(update={"peers": ["a", "c"]})),
        lambda: agents.set_flag("b", "stopped", True),
        lambda: agents.set_parent("b", "a"),
        lambda: agents.set_flag("a", "paused", True),
        lambda: agents.set_flag("b", "paused", False),
    ]
    for text, write in zip(texts, writes, strict=True):
        agents.all()  # the cache filled
        hive.set_status(a, text)
        assert agents.all() == _fresh(hive)
        write()
        assert agents.all() == _fresh(hive)
        hive.set_status(a, text + "!")
        assert [agents.get(n) for n in ("a", "b")] == _fresh(hive)

    def fail(tx: Any) -> None:
        raise RuntimeError("the rider fails: the transaction rolls back")

    agents.all()
    before = _fresh(hive)
    with riding(fail), pytest.raises(RuntimeError):
        hive.set_status(a, "never committed")
    assert agents.all() == before == _fresh(hive)
    assert agents.get("a") is not None and agents.get("a").status_text == "a!"  # type: ignore[union-attr]


# -- the form posts' way back --------------------------------------------------------------


@pytest.mark.attack("surface.open-redirect", ref="red team round 13: a Referer naming a swarm page that looks like a path")
@pytest.mark.parametrize(
    ("referer", "expected"),
    [
        ("https://a.example/swarm/b/agent/bob/", "/swarm/b/agent/bob/"),
        ("//evil.example/swarm/b/agent/bob/", "/swarm/b/agent/bob/"),
        ("https://a.example/swarm/../agent/bob/", "/"),
        ("https://a.example/swarm/b/agent/..%2f..%2fevil/", "/"),
        ("https://a.example/swarm/%2f%2fevil.example/agent/bob/", "/"),
        ("https://a.example/swarm/b/agent/bob%0d%0aLocation:%20//evil/", "/"),
        ("https://a.example/swarm/b/agent/b@evil.example/", "/"),
        ("https://a.example/swarm/b/agent", "/"),
        ("https://a.example/swarm//agent/bob/", "/"),
        ("https://a.example/swarm/b/agent/bob/../../../../evil", "/swarm/b/agent/bob/"),
        ("https://a.example/swarm/B.x/agent/bob/", "/"),
        ("http://[::1/swarm/b/agent/bob/", "/"),
    ],
)
def test_back_to_never_leaves_the_known_routes(referer: str, expected: str) -> None:
    to = back_to(referer)
    assert to == expected
    assert to.startswith("/") and not to.startswith("//") and "\\" not in to and "%" not in to


# -- the swarm: JSON from another host ------------------------------------------------------


@pytest.mark.attack("swarm-host-spoofing", ref="red team round 13: a lone surrogate written raw, not escaped")
@pytest.mark.parametrize(
    "data",
    [
        b'{"status_text": "x\xed\xa0\x80y"}',  # UTF-8's spelling of U+D800 (not UTF-8)
        b'{"status_text": "x\xed\xbf\xbfy"}',  # U+DFFF
        '{"status_text": "x\\ud800y"}'.encode("utf-16-le"),
        '{"status_text": "ok"}'.encode("utf-16"),
        '{"status_text": "ok"}'.encode("utf-32"),
        b'\xef\xbb\xbf{"status_text": "ok"}',  # a BOM
    ],
)
def test_jsontext_reads_only_utf8(data: bytes) -> None:
    """A value from another host is UTF-8 JSON or refused (ValueError, as any malformed
    JSON): json.loads of bytes would guess UTF-16 or UTF-32 and decode with surrogatepass."""
    with pytest.raises(ValueError):
        jsontext.loads(data)
    assert jsontext.loads('{"t": "\\ud83d\\ude00 é"}'.encode()) == {"t": "\U0001f600 é"}


@pytest.mark.attack("swarm-host-spoofing", ref="red team round 13: a lone surrogate written raw in c's row, question and message")
def test_raw_surrogates_from_c_break_nothing(swarm: Swarm) -> None:
    """Round 11's case with the surrogate written raw instead of escaped: c's own agent row
    with ED A0 80 in its status text, a row in UTF-16, a question to the operator it lists
    with one, and a message to bob whose body holds one, then an ordinary row and an
    ordinary message from carol. a's host.sock must answer ``swarm_status``, ``questions``
    and ``agent_status`` (c's ordinary row listed, the bad ones not), and b must take
    alice's message to bob and carol's ordinary one (the bad one dropped, not redelivered)."""
    raw = "\ud800".encode("utf-8", "surrogatepass")
    row = b'{"name": "r13u", "host": "c", "running": true, "paused": false, "status_text": "x' + raw + b'y"}'
    wide = '{"name": "r13w", "host": "c", "running": true, "paused": false, "status_text": "x\\ud800y"}'.encode("utf-16")
    question = b'{"id": 434343, "asker": "carol", "question": "which ' + raw + b' way?", "asked_at": "now"}'
    ok_row = b'{"name": "r13ok", "host": "c", "running": true, "paused": false, "status_text": "fine"}'
    bad_id, after = f"r13-{uuid.uuid4().hex}", f"r13-{uuid.uuid4().hex}"
    bad = (b'[{"id": "' + bad_id.encode() + b'", "from": "carol", "to": "bob", "kind": "message", "body": "'
           + raw + b'", "sent_at": ' + str(time.time()).encode() + b"}]")
    good = {"id": after, "from": "carol", "to": "bob", "kind": "message", "body": "r13 after the raw surrogate",
            "sent_at": time.time()}
    keys = (s.row_key("c", "r13u"), s.row_key("c", "r13w"), s.row_key("c", "r13ok"), s.question_key("c", 434343))

    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        await js.publish(s.kv_subject("c", s.row_key("c", "r13u")), row)
        await js.publish(s.kv_subject("c", s.row_key("c", "r13w")), wide)
        await js.publish(s.kv_subject("c", s.question_key("c", 434343)), question)
        await js.publish(s.kv_subject("c", s.row_key("c", "r13ok")), ok_row)
        await js.publish(s.msg_subject("b", "c"), bad, headers={"Nats-Msg-Id": bad_id})
        await js.publish(s.msg_subject("b", "c"), json.dumps([good]).encode(), headers={"Nats-Msg-Id": after})

    async def tidy(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        for key in keys:
            await js.publish(s.kv_subject("c", key), b"", headers={"KV-Operation": "DEL"})

    a = swarm.cores["a"]
    try:
        assert as_host_c(swarm, attack, settle=0) == []
        wait_for(lambda: any(r["name"] == "r13ok" for r in swarm.status("a")["agents"]), timeout=15)
        status = swarm.status("a")
        names = [r["name"] for r in status["agents"]]
        assert "r13u" not in names and "r13w" not in names, names
        assert 434343 not in [q["id"] for q in status["questions"]]
        assert_ok(a.host_call("questions"))
        assert_ok(a.host_call("agent_status"))
        assert_ok(a.agent("alice").call("send", to="bob", body="r13 alice after c's raw surrogates"))
        got = drain(swarm, "b", "bob", 2, timeout=20, extra=1.0)
        bodies = sorted((m["from"], m["body"]) for m in got)
        assert bodies == [("alice", "r13 alice after c's raw surrogates"), ("carol", good["body"])], got
    finally:
        as_host_c(swarm, tidy, settle=0)


# -- another host's agent's page: names that look like paths, the host field ---------------


@pytest.mark.attack("swarm-page-injection", ref="red team round 13: an agent or host name that looks like a path; the host field")
def test_remote_pages_take_only_names_and_the_host_field_only_a_host(swarm: Swarm) -> None:
    """``/swarm/HOST/agent/NAME/`` with a HOST or NAME that looks like a path (dots, an
    encoded slash or NUL, upper case, a name of this host's own that would redirect) is a
    404 on a, never a redirect elsewhere nor another agent's page; and the send box's host
    field spelled as a NATS wildcard, a subject, with white space or as a list is refused
    (422) and carries nothing: bob on b gets only the one message sent with host b."""
    web = login(swarm)
    try:
        wait_for(lambda: web.get("/swarm/b/agent/bob/").status_code == 200, timeout=20)
        for host, name in [("b", ".."), ("b", "%2e%2e"), ("b", "bob%2f..%2f..%2fa"), ("b", "Bob"),
                           ("b", "bob%00"), ("b", "-x"), ("..", "bob"), ("B", "bob"), ("b%2fagent", "bob"),
                           ("a", "..%2f..%2fevil.example"), ("a", "%2f%2fevil.example"), ("*", "bob"), ("b", "*")]:
            r = web.get(f"/swarm/{host}/agent/{name}/", follow_redirects=False)
            assert r.status_code == 404, (host, name, r.status_code, r.headers.get("location"))
        r = web.get("/swarm/a/agent/alice/", follow_redirects=False)  # this host's own: its page
        assert r.status_code == 303 and r.headers["location"] == "/agent/alice/"
        m = META_CSRF.search(web.get("/").text)
        assert m, "no CSRF token on a's dashboard"
        posted = {"Origin": "http://core", "X-CSRF-Token": m.group(1), "Accept": "application/json"}
        for host in ["b\n", " b", "b ", "b.>", "*", ">", "b.bob", "b,c", "b/../c", "hive.op.b.from.a", "b\x00"]:
            r = web.post("/api/agents/bob/send", data={"body": "r13 never", "host": host}, headers=posted)
            assert r.status_code == 422 and r.json()["ok"] is False, (host, r.text)
        r = web.post("/api/agents/bob/send", data={"body": "r13 the one", "host": "b"}, headers=posted)
        assert r.status_code == 200 and r.json()["ok"] is True, r.text
        got = drain(swarm, "b", "bob", 1, timeout=20, extra=2.0)
        assert [(m["from"], m["body"]) for m in got] == [("operator", "r13 the one")], got
    finally:
        web.close()


# -- the swarm: what c's messages from names not its own cost b ----------------------------


def _cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user and system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spoofed(senders: list[str]) -> bytes:
    """A bundle of c's: one message to bob from each of ``senders`` (none of them c's)."""
    rows = [{"id": f"r13-{uuid.uuid4().hex}", "from": who, "to": "bob", "kind": "message", "body": "r13 spoof",
             "sent_at": time.time()} for who in senders]  # fmt: skip
    return json.dumps(rows).encode()


def _publish_as_c(swarm: Swarm, bundles: list[bytes]) -> None:
    async def attack(nc: Any) -> None:
        js = nc.jetstream(timeout=10)
        for data in bundles:
            await js.publish(s.msg_subject("b", "c"), data, headers={"Nats-Msg-Id": uuid.uuid4().hex})

    assert as_host_c(swarm, attack, settle=0) == []


def _purge_msgs(swarm: Swarm, subject: str) -> None:
    """As the admin: drop what is stored on ``subject`` of HIVE_MSGS."""

    async def go() -> None:
        user, password = swarm.net.admin()
        nc = await nats.connect(swarm.net.urls("a"), user=user, password=password)
        try:
            await nc.jetstream().purge_stream(s.STREAM, subject=subject)
        finally:
            await nc.close()

    asyncio.run(go())


BUNDLES, PER_BUNDLE = 5, 1024  # c's: 5 publishes of 1,024 messages (BATCH), ~60 KB each


@pytest.mark.attack("swarm-consumer-flood", ref="red team round 13: c's messages from names not its own, each a bucket lookup on b")
def test_cs_spoofed_senders_cost_b_little(swarm: Swarm) -> None:
    """b checks a received message's sender against the buckets (three reads, one a host)
    whenever its cache gives the name to another host: c, at no cost to itself, sends
    bundles of 1,024 messages from alice (a's) or from 1,024 names of no one's. Each was
    a lookup: ~0.5 ms of b's core's CPU a message (5,120 of them in 5 publishes: 2.7 s of
    CPU; a lane kept ~50% of b's core busy for as long as c kept sending). Now a sender is
    looked up once a bundle (the 5,120 from alice: under 0.1 ms each), and a bundle's try
    looks up at most LOOKUPS_PER_TRY (c's distinct names: b's core under a quarter of a
    CPU meanwhile), and alice's messages to bob go on at once."""
    b = swarm.cores["b"]
    assert b.proc is not None
    pid = b.proc.pid
    dropped = swarm.status("b")["dropped"]

    # The same sender, alice (a's), 5,120 times.
    cpu0 = _cpu_seconds(pid)
    _publish_as_c(swarm, [_spoofed(["alice"] * PER_BUNDLE) for _ in range(BUNDLES)])
    wait_for(lambda: swarm.status("b")["dropped"] >= dropped + BUNDLES * PER_BUNDLE, timeout=60, interval=0.25)
    per_message = (_cpu_seconds(pid) - cpu0) / (BUNDLES * PER_BUNDLE)
    print(f"\nb's core: {per_message * 1e6:.0f} us of CPU per message from alice sent by c")
    assert per_message < 150e-6, f"{per_message * 1e6:.0f} us of b's CPU per spoofed message"

    # 5,120 names of no one's: b's core's share of a CPU while it works through them.
    _publish_as_c(swarm, [_spoofed([f"r13n{k}x{i}" for i in range(PER_BUNDLE)]) for k in range(BUNDLES)])
    try:
        time.sleep(1.0)  # under way
        cpu0, t0 = _cpu_seconds(pid), time.monotonic()
        sent = time.monotonic()
        assert_ok(swarm.cores["a"].agent("alice").call("send", to="bob", body="r13 alice meanwhile"))
        got = drain(swarm, "b", "bob", 1, timeout=20, extra=0)
        latency = time.monotonic() - sent
        time.sleep(max(0.0, 5.0 - (time.monotonic() - t0)))
        share = (_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        print(f"b's core: {share:.0%} of a CPU while c's spoofed senders are looked up;"
              f" alice's message took {latency:.2f} s")
        assert [(m["from"], m["body"]) for m in got] == [("alice", "r13 alice meanwhile")], got
        assert share < 0.25, f"b's core took {share:.0%} of a CPU on c's spoofed senders"
        assert latency < 5.0
    finally:
        _purge_msgs(swarm, s.msg_subject("b", "c"))


@pytest.mark.attack("swarm-page-injection", ref="red team round 13: an approval's payload nested deep in c's roster")
@pytest.mark.parametrize("depth", [300, 950])
def test_cs_deeply_nested_payload_breaks_no_listing(swarm: Swarm, depth: int) -> None:
    """An approval's payload is the one free-form JSON value in another host's roster rows:
    c lists one (its core stopped, so its relay doesn't delete it) whose payload nests
    ``depth`` lists deep, well under MAX_PAYLOAD_SHOWN's 8 KiB, 950 just under what a's
    watch's json.loads takes (980 is refused there) and past orjson's 254. a's host.sock must answer ``swarm_status`` and ``pending``, and a's dashboard
    and evil's page on a must draw, the approval listed on both."""
    aid = 990300 + depth
    payload = b"[" * depth + b"]" * depth
    row = (b'{"agent": "evil", "kind": "custom", "description": "deep", "payload": ' + payload
           + b', "payload_sha256": "' + b"a" * 64 + b'"}')  # fmt: skip
    evil = {"name": "evil", "running": True, "paused": False, "status_text": "deep"}
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

    web = login(swarm)
    core_c.proc.send_signal(signal.SIGSTOP)
    try:
        assert as_host_c(swarm, attack, settle=0) == []
        time.sleep(2.0)  # a's watch has it by now, if it keeps it
        status = a.host_call("swarm_status")
        assert status.get("ok"), status
        listed = [r["id"] for r in status["swarm"]["approvals"] if r["host"] == "c"]
        assert aid in listed, listed  # taken, as deep as it is
        assert_ok(a.host_call("pending"))
        page = web.get("/")
        assert page.status_code == 200, page.text[-500:]
        assert f'id="approval-c-{aid}"' in page.text
        remote = web.get("/swarm/c/agent/evil/")
        assert remote.status_code == 200, remote.text[-500:]
        assert f'id="approval-c-{aid}"' in remote.text
    finally:
        core_c.proc.send_signal(signal.SIGCONT)
        as_host_c(swarm, tidy, settle=0)
        web.close()

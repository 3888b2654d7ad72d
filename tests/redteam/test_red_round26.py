"""Red team round 26: the runtime against its own harness and what the harness reports.

The hostile party is the agent's runtime: every byte it writes on its stdout (a Claude Code
runtime's stream-json events are parsed by the harness, ``ClaudeRuntime.stdout_entry``),
its home, its processes and their timing, inside a real cage. Whether the runtime is a
compromised CLI, a stand-in, or a tool the model ran writing into the CLI's stdout
(``/proc/PID/fd/1`` of a process of its own uid), the harness reads what comes.

What the harness promises: the runtime can't end it, can't keep a turn from ending (every
message gets one turn that ends and is acked), and what it reports (transcript entries,
the state it gives the core) is what the core takes, and can't pass for the operator's.

Broke (each case below fails until fixed; found at 80f2125):
- one stream-json line whose ``message`` is no object (or ``content``/``errors`` a number)
  raises AttributeError/TypeError out of ``stdout_entry``, which ``serve_forever`` doesn't
  catch: the harness process exits, init restarts it (0.5 s doubling to 10 s), the turn is
  given to each new harness and run again, the next message never served;
- one line holding NaN, ±Infinity, 1e400 or an integer past 64 bits: json reads and writes
  it, the core's wire refuses the turn_record (``malformed JSON: NaN is not valid JSON``),
  the harness connects again and is given the turn again, ~2.5 times a second, for good;
  nothing of the turn (not even the operator's input) is recorded;
- an init event's ``session_id`` or ``model`` of another type (or a model past 200
  characters) is kept: every later turn's argv is refused by init (the message acked unrun),
  or every such turn's ``harness_state`` is refused (the harness connects again);
- the agent page draws a runtime event's ``type`` as the entry's bold ``who``, exactly as a
  genuine input's ``from operator (message N)`` or the turn's end (``turn ended``);
- a process the runtime leaves in a session of its own outlives a harness that dies
  (``Init.kill_runtime`` signals the turns' process groups only) and takes the egress
  bridge's 127.0.0.1:3128 before the next harness binds it: the proxy URL is then the
  runtime's listener.

See docs/security.md's rounds table (red team round 26) and the report of this round.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import assert_ok
from hive_fixture import HiveProcess, running_hive, wait_until
from hyperhive.cage import harness, layout, wirejson
from hyperhive.cage.runtimes import ClaudeRuntime
from hyperhive.core.http import readable
from hyperhive.wire.framing import WireError, parse_line
from hyperhive.wire.harness import harness_request

from .conftest import cage_run

REF = "red team round 26: the runtime against its harness"


# -- in process: a Claude runtime's lines through Turn.line ---------------------------------


class _Turn(harness.Turn):
    """A Turn's line handling alone (no connection, no runtime process), as round 21's."""

    def __init__(self, runtime: ClaudeRuntime | None = None) -> None:
        self.runtime = runtime or ClaudeRuntime("r26", {"runtime": "claude"})
        self.pending, self.kept, self.lines, self.dropped, self.full = [], 0, 0, 0, False


def _core_takes(entries: list[dict[str, Any]]) -> str | None:
    """None if the core takes a turn_record of ``entries`` (its line parser, then the
    harness verbs' models), else why not. The harness writes the request as here
    (``Conn.call``: wirejson.dumps, one line)."""
    line = wirejson.dumps({"cmd": "turn_record", "turn": 1, "entries": entries}).encode()
    try:
        harness_request.validate_python(parse_line(line))
    except (WireError, ValueError) as e:
        return f"{type(e).__name__}: {' '.join(str(e).splitlines()[:3])}"
    return None


# Lines a runtime may print. Each is one JSON object (a Claude Code event's shape: a
# "type" and fields), which the harness reads with wirejson (json's defaults).
HOSTILE_LINES = {
    # Shapes stdout_entry walks without checking their types: an exception out of
    # Turn.line, out of the turn, out of serve_forever (which catches only OSError,
    # ConnectionError, ValueError and RuntimeError): the harness process ends.
    "assistant-message-a-string": '{"type": "assistant", "message": "r26"}',
    "assistant-message-a-list": '{"type": "assistant", "message": [1, 2]}',
    "assistant-content-a-number": '{"type": "assistant", "message": {"content": 5}}',
    "result-errors-a-number": '{"type": "result", "is_error": true, "result": "r26", "errors": 5}',
    # Values json reads and writes but the core's wire refuses (framing.parse_line): the
    # turn_record is refused, serve_forever connects again, the turn is given again.
    "nan": '{"type": "r26", "n": NaN}',
    "infinity": '{"type": "r26", "n": Infinity}',
    "minus-infinity": '{"type": "r26", "n": -Infinity}',
    "1e400": '{"type": "r26", "n": 1e400}',
    "2**64": '{"type": "r26", "n": 18446744073709551616}',
    "-2**63-1": '{"type": "r26", "n": [-9223372036854775809]}',
}


@pytest.mark.attack("wire.malformed", ref=REF + "; ClaudeRuntime.stdout_entry's unchecked shapes, json's NaN and big ints")
@pytest.mark.parametrize("name", sorted(HOSTILE_LINES))
def test_a_runtime_line_is_an_entry_the_core_takes(name: str) -> None:
    """Each hostile line is an entry of the turn (as an event, or kept as text), never an
    exception out of ``Turn.line``, and the turn_record carrying it is one the core takes:
    else the harness dies, or its turn is given again for good (rounds 13, 14 and 21 closed
    other lines that did the second)."""
    line = HOSTILE_LINES[name]
    turn = _Turn()
    try:
        turn.line("stdout", line.encode(), len(line) + 1)
    except Exception as e:  # what the harness's serve_forever does not catch
        raised: str | None = f"{type(e).__name__}: {e}"
    else:
        raised = None
    why = None if raised else _core_takes(turn.pending)
    print(f"{name}: raised {raised}; pending {turn.pending!r:.200}; core: {why}")
    assert raised is None, f"Turn.line raised out of the turn: {raised}"
    assert len(turn.pending) == 1, turn.pending
    assert why is None, f"the core refuses the turn's record: {why}"


# What a runtime's init event sets in the harness, and the state the harness then uses.
STATE_LINES = {
    "session-id-a-list": '{"type": "system", "subtype": "init", "session_id": ["r26"]}',
    "session-id-a-number": '{"type": "system", "subtype": "init", "session_id": 26}',
    "model-an-object": '{"type": "system", "subtype": "init", "session_id": "s", "model": {"r26": 1}}',
    "model-300-chars": '{"type": "system", "subtype": "init", "session_id": "s", "model": "' + "m" * 300 + '"}',
}


@pytest.mark.attack("wire.malformed", ref=REF + "; the runtime's session_id and model kept as they came")
@pytest.mark.parametrize("name", sorted(STATE_LINES))
def test_a_runtime_init_event_leaves_a_state_the_harness_can_use(name: str) -> None:
    """What an init event sets (``session_id``, ``active_model``) is used later: the
    session as the next turn's ``--resume`` argument (init refuses an argv that is not all
    strings: every later turn would be "could not start the runtime", its message acked
    unrun, until the harness connects again), the model in ``harness_state`` (refused past
    200 characters or not a string: the harness connects again after every such turn).
    After any init event, the next argv is all strings and the state is one the core takes."""
    rt = ClaudeRuntime("r26", {"runtime": "claude"})
    turn = _Turn(rt)
    line = STATE_LINES[name]
    turn.line("stdout", line.encode(), len(line) + 1)
    argv = rt.argv({"id": 2, "kind": "message", "from": "operator", "body": "next"})
    bad_argv = [a for a in argv if not isinstance(a, str)]
    state: dict[str, Any] = {"cmd": "harness_state", "needs_login": rt.needs_login}
    if rt.active_model:
        state["active_model"] = rt.active_model
    try:
        harness_request.validate_python(state)
        refused = None
    except ValueError as e:
        refused = " ".join(str(e).splitlines()[1:3])
    print(f"{name}: argv items not strings {bad_argv!r}; harness_state refused: {refused}")
    assert not bad_argv, f"the next turn's argv holds {bad_argv!r}: init refuses every later turn"
    assert refused is None, f"harness_state is refused: {refused}"


# -- in process: what the operator's page makes of a runtime's event -------------------------


@pytest.mark.attack("identity.forge-operator", ref=REF + "; core/http.py readable(): an event's 'who' is its type, the runtime's text")
def test_a_runtime_event_does_not_read_as_the_operators_input_or_the_turns_end() -> None:
    """The agent page (``/agent/NAME/``) draws an entry's ``who`` in bold beside its kind:
    for an input, ``from operator (message N)`` (the hive's); for a runtime's event, the
    event's own ``type``, which the runtime writes. An event whose type is the operator's
    line, or "turn ended", must not be drawn as that (the only other mark is the grey kind
    word, "event" for "input")."""
    genuine_input = readable({"kind": "input", "data": {
        "id": 7, "kind": "message", "from": "operator", "body": "stop everything"}})
    genuine_end = readable({"kind": "exit", "data": {"exit_status": 0, "duration_ms": 5.0}})
    forged_input = readable({"kind": "event", "data": {
        "type": genuine_input["who"],
        "message": {"content": [{"type": "text", "text": "approve rtbob's spawn, it is fine"}]}}})
    forged_end = readable({"kind": "event", "data": {
        "type": "turn ended", "message": {"content": [{"type": "text", "text": genuine_end["text"]}]}}})
    print(f"genuine input {genuine_input}\nforged input {forged_input}\n"
          f"genuine end {genuine_end}\nforged end {forged_end}")
    assert forged_input["who"] != genuine_input["who"], forged_input
    assert not forged_input["who"].startswith("from "), forged_input
    assert forged_end["who"] != genuine_end["who"], forged_end


# -- real cages: the same lines from a caged runtime -----------------------------------------

CRASH, WEDGE, PORT = "r26crash", "r26wedge", "r26port"
RUNTIME_PATH = f"{layout.HOME}/r26-runtime"
RUNS_PATH = f"{layout.HOME}/r26-runs"
# A Claude-runtime stand-in (the harness runs it with claude's argv; it reads the prompt
# on stdin): it notes each run's body, prints the line its body names, then a result.
RUNTIME_SCRIPT = """\
#!/usr/bin/python3
import json, sys
body = json.loads(sys.stdin.read()).get("body", "")
with open(RUNS, "a") as f:
    f.write(body + "\\n")
lines = {
    "crash": '{"type": "assistant", "message": "r26"}',
    "nan": '{"type": "r26", "n": NaN}',
}
if body in lines:
    print(lines[body], flush=True)
print('{"type": "result", "is_error": false, "result": "r26 done"}', flush=True)
""".replace("RUNS", repr(RUNS_PATH))
# A turn of PORT's: leaves a process in a session of its own (setsid: out of the turn's
# process group) that tries, every 2 ms for 2 minutes, to listen on the egress bridge's
# port, and answers whatever connects there as a proxy would not.
SQUATTER_PATH = f"{layout.HOME}/r26-squatter"
SQUATTED_PATH = f"{layout.HOME}/r26-squatted"
SQUATTER_SCRIPT = """\
#!/usr/bin/python3
import os, socket, sys, time
sys.stdin.read()
if os.fork() == 0:
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    end = time.monotonic() + 120
    while True:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", PORT))
            s.listen(16)
            break
        except OSError:
            s.close()
            if time.monotonic() > end:
                os._exit(0)
            time.sleep(0.002)
    with open(SQUATTED, "w") as f:
        f.write("squatted")
    while True:
        c, _ = s.accept()
        c.recv(65536)
        c.sendall(b"HTTP/1.1 200 r26 squatter\\r\\nContent-Length: 0\\r\\n\\r\\n")
        c.close()
print("r26 squatter started", flush=True)
""".replace("PORT", str(layout.EGRESS_PORT)).replace("SQUATTED", repr(SQUATTED_PATH))
WAIT = 15.0  # seconds for both turns: ~1-2 s when each message gets one turn


@pytest.fixture(scope="module")
def h() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess({
        CRASH: {"runtime": "claude", "command": [RUNTIME_PATH], "peers": []},
        WEDGE: {"runtime": "claude", "command": [RUNTIME_PATH], "peers": []},
        PORT: {"runtime": "command", "command": [SQUATTER_PATH], "peers": []},
    }))


def _harness_pids(h: HiveProcess, name: str) -> list[int]:
    try:
        return [h.harness_pid(name)]
    except (AssertionError, OSError):  # none (restarting), more than one, or gone meanwhile
        return []


def _two_turns(h: HiveProcess, name: str, hostile: str) -> dict[str, Any]:
    """Install the stand-in, send ``hostile`` then an ordinary message as the operator,
    and wait (up to WAIT s) for two turns to end. What happened: the message ids, the
    inputs and exits recorded, the bodies the runtime ran, the harness's pids seen."""
    write = h.exec(name, "sh", "-c", f"cat > {RUNTIME_PATH} && chmod 755 {RUNTIME_PATH}",
                   input=RUNTIME_SCRIPT)
    assert write.returncode == 0, write.stderr
    pids = set(_harness_pids(h, name))
    first = assert_ok(h.host_call("send", to=name, body=hostile))["id"]
    second = assert_ok(h.host_call("send", to=name, body="after"))["id"]
    t0 = time.monotonic()
    entries: list[dict[str, Any]] = []
    while time.monotonic() - t0 < WAIT:
        entries = assert_ok(h.host_call("transcript", name=name, limit=500))["entries"]
        pids.update(_harness_pids(h, name))
        if sum(e["kind"] == "exit" for e in entries) >= 2:
            break
        time.sleep(0.2)
    took = time.monotonic() - t0
    runs = h.exec(name, "cat", RUNS_PATH).stdout.split()
    out = {
        "sent": [first, second],
        "inputs": [e["data"]["id"] for e in entries if e["kind"] == "input"],
        "exits": [e["turn"] for e in entries if e["kind"] == "exit"],
        "runs": runs,
        "harness_pids": sorted(pids),
        "seconds": round(took, 1),
        "kinds": sorted({e["kind"] for e in entries}),
    }
    log = (h.state_dir / "priv" / "cages" / name / "cage.log").read_text(errors="replace")
    print(json.dumps(out) + f"\n{name}'s cage.log ({len(log.splitlines())} lines), its last:\n"
          + "\n".join(log.splitlines()[-6:]))
    return out


@pytest.mark.attack("wire.malformed", ref=REF + "; a stream-json event whose message is no object, from a caged runtime")
def test_a_caged_runtime_cannot_end_its_harness(h: HiveProcess) -> None:
    """The runtime prints one event whose ``message`` is a string. The harness stays the
    same process, the turn ends once, the next message (the operator's) is served.
    Before: AttributeError out of the turn ended the harness (init restarts it after
    0.5 s, doubling to 10 s); the message, never acked, was given to each new harness,
    which ran the runtime on it again: the operator's next message waited for good."""
    got = _two_turns(h, CRASH, "crash")
    assert got["exits"] == got["sent"], got  # each turn ended once, in order
    assert got["inputs"] == got["sent"], got  # each message delivered once
    assert got["runs"] == ["crash", "after"], got
    assert len(got["harness_pids"]) == 1, got  # the harness never ended


@pytest.mark.attack("wire.malformed", ref=REF + "; NaN in a stream-json event: json writes it, the core's wire refuses it")
def test_a_caged_runtime_cannot_keep_its_turn_from_ending(h: HiveProcess) -> None:
    """The runtime prints one event holding NaN. The turn ends once (the entry kept in a
    form the core takes), the next message is served, the runtime ran once per message.
    Before: the core refused the turn_record, the harness connected again and was given
    the turn again, and again (the runtime run each time), the next message never served."""
    got = _two_turns(h, WEDGE, "nan")
    assert got["exits"] == got["sent"], got
    assert got["inputs"] == got["sent"], got
    assert got["runs"] == ["nan", "after"], got
    assert len(got["harness_pids"]) == 1, got


BRIDGE_ANSWER = r"""
s = socket.create_connection(("127.0.0.1", P["port"]), timeout=10)
s.sendall(b"CONNECT r26-squat.invalid:443 HTTP/1.1\r\nHost: r26-squat.invalid:443\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    chunk = s.recv(4096)
    if not chunk:
        break
    head += chunk
result(status=head.split(b"\r\n")[0].decode(errors="replace"),
       squatted=os.path.exists(P["squatted"]))
"""


def _harness_or_none(h: HiveProcess, name: str) -> int | None:
    found = _harness_pids(h, name)
    return found[0] if found else None


@pytest.mark.attack("reach.other-surfaces", ref=REF + "; init.kill_runtime signals the turns' process groups only (setsid escapes)")
def test_nothing_of_the_runtime_outlives_its_harness_to_take_the_bridges_port(h: HiveProcess) -> None:
    """Round 22: the runtime can't bind the bridge's 127.0.0.1:3128 while the harness
    listens there. A harness dies (a crash above, the OOM killer: the runtime may lower its
    ``oom_score_adj`` to the harness's); init kills the runtime's processes and starts a new
    one 0.5 s later, which binds the port again. A process the runtime left in a session of
    its own (the turn ended normally) must not outlive the old harness to take the port in
    between: a client of the proxy URL (the runtime's tools, the operator's ``hive exec``
    commands in the cage) must still get the hive's proxy (its 403 for a name no rule
    allows), never the runtime's listener."""
    write = h.exec(PORT, "sh", "-c", f"cat > {SQUATTER_PATH} && chmod 755 {SQUATTER_PATH}",
                   input=SQUATTER_SCRIPT)
    assert write.returncode == 0, write.stderr
    before = cage_run(h, PORT, BRIDGE_ANSWER, port=layout.EGRESS_PORT, squatted=SQUATTED_PATH)
    assert before == {"status": "HTTP/1.1 403 Forbidden", "squatted": False}, before  # the control
    turn = assert_ok(h.host_call("send", to=PORT, body="leave a squatter"))["id"]
    wait_until(lambda: any(e["kind"] == "exit" and e["turn"] == turn for e in
                           assert_ok(h.host_call("transcript", name=PORT))["entries"]),
               30, "the squatter's turn to end", interval=0.2)
    old = h.harness_pid(PORT)
    os.kill(old, signal.SIGKILL)  # as the OOM killer would
    wait_until(lambda: (p := _harness_or_none(h, PORT)) and p != old, 30, "init to start a new harness")
    time.sleep(1.0)  # the new harness binds the port as it starts, before its first turn
    after = cage_run(h, PORT, BRIDGE_ANSWER, port=layout.EGRESS_PORT, squatted=SQUATTED_PATH)
    print(f"before the harness died: {before}; after: {after}")
    # (``squatted``: the runtime's listener had the port at some moment; shown, not asserted:
    # what matters is who answers the proxy URL now.)
    assert after["status"] == "HTTP/1.1 403 Forbidden", after

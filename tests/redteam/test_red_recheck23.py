"""Re-check of red team round 26's fixes: the runtime against its harness, again.

The hostile party is still the agent's runtime (every byte of its stdout, its processes
and their timing), now against the round's fixes: ``Turn.line`` keeping any line it can't
take as a plain stdout entry, ``fit_entry`` keeping an event holding a number the wire has
no room for as marked text (``_shape``/``_number_fits``), ``_state_text`` taking only a
session id or model of 1 to 200 characters, ``readable`` naming any event type but Claude
Code's as ``runtime event '…'``, and ``Init.kill_runtime`` killing every living process
of the runtime uid (up to 8 passes) before a new harness starts.

Broke (each case below fails until fixed; found at 6258922):
- ``_number_fits`` takes integers up to 2**64 - 1, the core's wire (framing._parse_int)
  those below 2**63 only: one event holding 9223372036854775808 (or any integer up to
  18446744073709551615) is refused in its turn_record, the harness connects again and is
  given the turn again, for good, as NaN was before round 26;
- ``_state_text`` takes any string: an init event's ``session_id`` of "\\u0000" (or a lone
  surrogate) is the next turn's ``--resume`` argument, which execve can't take (init's
  fork_exec fails): every later turn is "could not start the runtime", its message acked
  unrun, until the harness reconnects; one beginning with "-" is taken by the CLI as an
  option of its own (``--resume --dangerously-skip-permissions``); a lone surrogate as the
  ``model`` makes the core refuse ``harness_state`` (the harness connects again);
- ``kill_runtime``'s passes skip a process whose State is Z: a process whose main thread
  exited (``syscall(SYS_exit)``) while another thread runs reads as a zombie, and lives on;
  a process that forks and exits in a loop (a new pid every ~0.1 ms) is never where a pass
  listed it (the first pass finds nothing living and ends the loop). Either, left in a
  session of its own, outlives its harness, and so can take the egress bridge's
  127.0.0.1:3128 before the next harness binds it (round 26's squatter; shown here on
  Init.kill_runtime itself, with processes of an unused uid: no cage was run, the
  machine being CI's until 05:50).

Held: floats (-0.0, 5e-324, 1.7976931348623157e308, 1e-400), integers -2**63 and
2**63 - 1, lone surrogates in keys and values, depth 49 to ~900 (kept as text), a line too
deep to decode; the worst 1 MiB of lines costs the harness ~0.15 s of CPU; no event type
reads as the hive's ``from operator (…)`` or ``turn ended``.

See docs/security.md's rounds table and the report of this re-check.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyperhive.cage import harness, wirejson
from hyperhive.cage import init as cage_init
from hyperhive.cage.runtimes import ClaudeRuntime
from hyperhive.core.http import RUNTIME_EVENT_TYPES, readable
from hyperhive.wire.framing import WireError, parse_line
from hyperhive.wire.harness import harness_request

REF = "re-check of red team round 26's fixes: the runtime against its harness"


# -- in process: a Claude runtime's lines through Turn.line ---------------------------------


class _Turn(harness.Turn):
    """A Turn's line handling alone (no connection, no runtime process), as round 26's."""

    def __init__(self, runtime: ClaudeRuntime | None = None) -> None:
        self.runtime = runtime or ClaudeRuntime("rc23", {"runtime": "claude"})
        self.pending, self.kept, self.lines, self.dropped, self.full = [], 0, 0, 0, False


def _core_refuses(request: dict[str, Any]) -> str | None:
    """None if the core takes ``request`` as the harness writes it (``Conn.call``:
    wirejson.dumps, one line) through its line parser and the harness verbs' models."""
    line = wirejson.dumps(request).encode()
    try:
        harness_request.validate_python(parse_line(line))
    except (WireError, ValueError) as e:
        return f"{type(e).__name__}: {' '.join(str(e).splitlines()[:3])}"
    return None


def _through_turn(line: bytes) -> tuple[str | None, list[dict[str, Any]], str | None]:
    """What Turn.line raised (None), the entries it kept, and why the core refuses them."""
    turn = _Turn()
    try:
        turn.line("stdout", line, len(line) + 1)
    except Exception as e:  # what serve_forever does not catch
        return f"{type(e).__name__}: {e}", turn.pending, None
    refused = _core_refuses({"cmd": "turn_record", "turn": 1, "entries": turn.pending})
    return None, turn.pending, refused


# Integers json reads and writes that _number_fits takes (it allows up to 2**64 - 1) and
# the core's wire refuses (framing._parse_int: -2**63 to 2**63 - 1).
WIDE_INTS = {
    "2**63": '{"type": "rc23", "n": 9223372036854775808}',
    "2**64-1": '{"type": "rc23", "n": 18446744073709551615}',
    "10**19": '{"type": "rc23", "n": [10000000000000000000]}',
    "in-a-tool-call": '{"type": "assistant", "message": {"content": [{"type": "tool_use", '
    '"name": "x", "input": {"n": 12345678901234567890}}]}}',
}


@pytest.mark.attack("wire.malformed", ref=REF + "; _number_fits takes integers to 2**64 - 1, the wire to 2**63 - 1")
@pytest.mark.parametrize("name", sorted(WIDE_INTS))
def test_an_integer_past_63_bits_is_an_entry_the_core_takes(name: str) -> None:
    """One event holding an integer from 2**63 to 2**64 - 1: an entry of the turn the core
    takes (as an event or as marked text). Before: kept as it was, the turn_record refused
    (``integer out of range (64-bit)``), the harness connected again and was given the
    turn again, and again: the runtime run again each time, the next message never served."""
    raised, pending, refused = _through_turn(WIDE_INTS[name].encode())
    print(f"{name}: raised {raised}; pending {pending!r:.160}; core: {refused}")
    assert raised is None, raised
    assert len(pending) == 1, pending
    assert refused is None, f"the core refuses the turn's record: {refused}"


# A property over lines a runtime may print: any JSON the stdlib writes (NaN, infinities,
# integers of any width, lone surrogates, control characters, nesting to 60), as UTF-8 or
# with raw surrogates (invalid UTF-8), whatever the event's type.
_INTS = st.integers(-(2**70), 2**70) | st.sampled_from(
    [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**19, 0]
)
_FLOATS = st.floats() | st.sampled_from(
    [-0.0, 5e-324, 1.7976931348623157e308, 0.0001234567890123456, 1e16]
)
_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=6) | st.sampled_from(
    ["\ud800", "\udc80", "\x00", "\u2028", "from operator (message 7)"]
)
_VALUES = st.recursive(
    st.none() | st.booleans() | _INTS | _FLOATS | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=16,
)


@st.composite
def _runtime_lines(draw: st.DrawFn) -> bytes:
    value = draw(_VALUES)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 47, 50, 60]))):
        value = [value]
    event = {"type": draw(st.sampled_from(["assistant", "result", "user", "system", "rc23"])),
             draw(st.sampled_from(["message", "result", "errors", "n", "input"])): value}
    if draw(st.booleans()):
        event["message"] = {"content": [{"type": "tool_use", "name": "x", "input": value}]}
    text = json.dumps(event, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


@pytest.mark.attack("wire.malformed", ref=REF + "; a property: any JSON line against the core's own parser")
@settings(max_examples=250, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(line=_runtime_lines())
def test_any_runtime_line_is_an_entry_the_core_takes(line: bytes) -> None:
    """Whatever JSON line the runtime prints: Turn.line raises nothing, keeps one entry,
    and the turn_record carrying it is one the core's real parser and models take."""
    raised, pending, refused = _through_turn(line)
    assert raised is None, f"{line[:200]!r}: {raised}"
    assert len(pending) == 1, pending
    assert refused is None, f"{line[:200]!r}: the core refuses the turn's record: {refused}"


# -- in process: what an init event leaves for the next turn ---------------------------------

STATE_LINES = {
    "session-id-nul": '{"type": "system", "subtype": "init", "session_id": "\\u0000"}',
    "session-id-lone-surrogate": '{"type": "system", "subtype": "init", "session_id": "\\ud800"}',
    "session-id-an-option": '{"type": "system", "subtype": "init", '
    '"session_id": "--dangerously-skip-permissions"}',
    "model-lone-surrogate": '{"type": "system", "subtype": "init", "session_id": "s", "model": "\\udfff"}',
}


@pytest.mark.attack("wire.malformed", ref=REF + "; _state_text takes any string of 1 to 200 characters")
@pytest.mark.parametrize("name", sorted(STATE_LINES))
def test_an_init_event_leaves_an_argv_init_can_start_and_a_state_the_core_takes(name: str) -> None:
    """After any init event: the next turn's argv is one init's ``fork_exec`` can exec
    (run here with /bin/true in the CLI's place: execve refuses a NUL and can't encode a
    lone surrogate, so init's spawn fails and every later turn is "could not start the
    runtime", its message acked unrun); ``--resume``'s value is no option of the CLI's
    (an optional option-argument beginning with "-" is parsed as the next option); and
    the ``harness_state`` the harness then sends is one the core takes."""
    rt = ClaudeRuntime("rc23", {"runtime": "claude"})
    line = STATE_LINES[name].encode()
    _Turn(rt).line("stdout", line, len(line) + 1)
    argv = rt.argv({"id": 2, "kind": "message", "from": "operator", "body": "next"})
    null = os.open(os.devnull, os.O_RDWR)
    try:
        proc = cage_init.fork_exec(["/bin/true", *argv[1:]], (null, null, null))
        os.waitpid(proc.pid, 0)
        exec_error = None
    except OSError as e:
        exec_error = str(e)
    finally:
        os.close(null)
    resume = argv[argv.index("--resume") + 1] if "--resume" in argv else None
    state: dict[str, Any] = {"cmd": "harness_state", "needs_login": rt.needs_login}
    if rt.active_model:
        state["active_model"] = rt.active_model
    refused = _core_refuses(state)
    print(f"{name}: --resume {resume!r}; exec: {exec_error}; harness_state refused: {refused}")
    assert exec_error is None, f"init can't start the next turn's argv: {exec_error}"
    assert resume is None or not resume.startswith("-"), f"--resume {resume!r}: read as an option"
    assert refused is None, f"harness_state is refused: {refused}"


# -- in process: the operator's page ---------------------------------------------------------

FORGED_TYPES = [
    "from operator (message 7)", "turn ended", "runtime event", " from operator (message 7)",
    "\u202efrom operator", "from\u00a0operator (message 7)", "SYSTEM", "system ", "note",
    "input", "exit", ["from operator (message 7)"], {"from": "operator"}, 7, True, None, "",
]


@pytest.mark.attack("identity.forge-operator", ref=REF + "; readable(): only Claude Code's event types shown as named")
def test_no_event_type_reads_as_the_hives_own_line() -> None:
    """Every event type the runtime may write is drawn as Claude Code's own name or as
    ``runtime event …``: never the hive's ``from operator (…)`` or ``turn ended``."""
    whos = []
    for kind in ("event", "tool_call"):
        for t in FORGED_TYPES:
            who = readable({"kind": kind, "data": {"type": t, "message": {
                "content": [{"type": "text", "text": "approve rtbob's spawn"}]}}})["who"]
            whos.append(who)
            assert who in RUNTIME_EVENT_TYPES or who.startswith("runtime event"), (t, who)
            assert "from " not in who.split("'")[0] and who != "turn ended", (t, who)
    print(sorted(set(whos)))


# -- in process: what a harness's line costs it ----------------------------------------------


@pytest.mark.attack("wire.malformed", ref=REF + "; _shape's walk and the marked-text fallback, per line")
def test_the_widest_lines_of_a_turn_cost_the_harness_little() -> None:
    """A turn's 1 MiB of output as 64 lines of 16 KiB of the widest shapes (8,100 numbers,
    4,090 empty containers, 1e308s): each decoded, walked, encoded and bounded. Held at
    ~0.15 s of CPU for the worst: asserted under 2 s."""
    shapes = {
        "zeros": "[" + ",".join(["0"] * 8100) + "]",
        "lists": "[" + ",".join(["[]"] * 4090) + "]",
        "floats": "[" + ",".join(["1e308"] * 2700) + "]",
        "deep47": "[" * 46 + ",".join(["[]"] * 4000) + "]" * 46,
    }
    costs = {}
    for name, body in shapes.items():
        line = ('{"type": "rc23", "a": ' + body + "}").encode()[: harness.MAX_ENTRY]
        turn = _Turn()
        t0 = time.process_time()
        for _ in range(64):
            turn.line("stdout", line, len(line) + 1)
        costs[name] = round(time.process_time() - t0, 3)
        assert _core_refuses({"cmd": "turn_record", "turn": 1, "entries": turn.pending[:1]}) is None
    print(f"CPU seconds for 64 lines of 16 KiB: {costs}")
    assert max(costs.values()) < 2.0, costs


# -- in process: Init.kill_runtime against processes of an unused uid -------------------------


def _unused_uid() -> int:
    """A uid no process on this machine has: kill_runtime kills every process of its uid."""
    used = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/status") as f:
                used.update(int(x) for line in f if line.startswith("Uid:") for x in line.split()[1:])
        except (OSError, ValueError):
            continue
    uid = 3_923_900 + os.getpid() % 97
    while uid in used:
        uid += 1
    return uid


SYS_EXIT = {"x86_64": 60, "aarch64": 93}[os.uname().machine]


@pytest.mark.attack("reach.other-surfaces", ref=REF + "; kill_runtime skips State Z: a process whose main thread exited")
def test_kill_runtime_kills_a_process_whose_main_thread_exited() -> None:
    """A runtime process in a session of its own (not in init's groups) starts a thread,
    then its main thread exits alone (``syscall(SYS_exit)``: not exit_group). /proc/PID/
    status then says ``State: Z (zombie)``, ``Threads: 2``: the process lives on in its
    thread. kill_runtime must kill it. Before: its passes skipped it as dead (the first
    found nothing living and ended), and it lived on past the harness."""
    uid = _unused_uid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the runtime's process
        try:
            os.close(r)
            os.setsid()
            os.setgid(uid)
            os.setuid(uid)

            def beat() -> None:
                for _ in range(500):  # 5 s at most
                    os.write(w, b".")
                    time.sleep(0.01)
                os._exit(0)

            threading.Thread(target=beat, daemon=True).start()
            ctypes.CDLL(None).syscall(SYS_EXIT, 0)  # the main thread only
        finally:
            os._exit(1)
    os.close(w)
    try:
        time.sleep(0.1)
        with open(f"/proc/{pid}/status") as f:
            status = [ln.strip() for ln in f if ln.startswith(("State:", "Threads:"))]
        init = cage_init.Init(uid, uid, uid + 1)
        init.kill_runtime()
        time.sleep(0.05)
        os.set_blocking(r, False)
        try:
            os.read(r, 1 << 16)  # what it wrote before
        except BlockingIOError:
            pass
        time.sleep(0.2)
        try:
            after = len(os.read(r, 1 << 16))
        except BlockingIOError:
            after = 0
        except OSError:
            after = 0
        print(f"before kill_runtime: {status}; heartbeats in 0.2 s after it: {after}")
        assert after == 0, f"alive after kill_runtime ({status}): {after} heartbeats in 0.2 s"
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# Forks and exits in a loop for 0.5 s, then says it lived to the end.
HOP = """
import os, sys, time
end = time.monotonic() + 0.5
while time.monotonic() < end:
    if os.fork():
        os._exit(0)
os.write(int(sys.argv[1]), b"E")
"""


@pytest.mark.attack("reach.other-surfaces", ref=REF + "; kill_runtime lists /proc then kills: a process hopping pids")
def test_kill_runtime_kills_a_process_that_keeps_changing_its_pid() -> None:
    """Two runtime processes, each in a session of its own, fork and exit in a loop for
    0.5 s (each a new pid every ~0.1 ms; a reaper of root's reaps them as the cage's pid 1
    would). kill_runtime must end both chains. Before: each pass listed /proc, then
    signalled pids gone meanwhile (the first pass found nothing living and ended the
    loop): both chains ran to their end, 4 times in 4."""
    uid = _unused_uid()
    r, w = os.pipe()
    reaper = os.fork()
    if reaper == 0:
        try:
            os.close(r)
            ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
            for _ in range(2):
                if os.fork() == 0:  # a runtime process: a small interpreter of its own
                    os.setsid()
                    os.setgid(uid)
                    os.setuid(uid)
                    os.set_inheritable(w, True)
                    os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", HOP, str(w)])
            end = time.monotonic() + 3
            while time.monotonic() < end:
                try:
                    if os.waitpid(-1, os.WNOHANG) == (0, 0):
                        time.sleep(0.0005)
                except ChildProcessError:
                    break
        finally:
            os._exit(0)
    os.close(w)
    try:
        time.sleep(0.15)  # the chains started
        init = cage_init.Init(uid, uid, uid + 1)
        listings = 0
        listing = init.runtime_uid_pids

        def counted(living: bool = False, uid: int | None = None) -> list[int]:
            nonlocal listings
            listings += 1
            return listing(living, uid)

        init.runtime_uid_pids = counted  # type: ignore[method-assign]
        init.kill_runtime()
        os.waitpid(reaper, 0)
        survived = os.read(r, 16).count(b"E")
    finally:
        os.close(r)
    print(f"kill_runtime listed /proc {listings} times; chains alive to their end: {survived} of 2")
    assert survived == 0, f"{survived} of 2 chains outlived kill_runtime ({listings} listings)"


# Loops kill(-1, SIGSTOP) as the runtime uid for 2 s: whatever of init's it may signal stops.
STOPPER = """
import os, signal, time
end = time.monotonic() + 2
while time.monotonic() < end:
    try:
        os.kill(-1, signal.SIGSTOP)
    except OSError:
        pass
"""


@pytest.mark.attack("reach.other-surfaces", ref=REF + "; the sweep's child had the runtime's uid: a runtime could stop it")
def test_a_runtime_cannot_stop_the_sweep_and_hold_init() -> None:
    """Second re-check of round 26's fixes. A runtime process loops ``kill(-1, SIGSTOP)``
    while init sweeps the runtime uid, 10 times. The sweep must return (init is the only
    one to restart the harness) and the stopper must be dead. Before: the sweep's child
    took the runtime's uid, the runtime stopped it, and init waited on it for good (15 of
    20 trials; in 3 more the stopper outlived the sweep)."""
    uid = _unused_uid()

    class Hung(Exception):
        pass

    def on_alarm(*_: Any) -> None:
        raise Hung

    old = signal.signal(signal.SIGALRM, on_alarm)
    hung = survived = 0
    try:
        for _ in range(10):
            stopper = os.fork()
            if stopper == 0:
                try:
                    os.setgid(uid)
                    os.setuid(uid)
                    os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", STOPPER])
                finally:
                    os._exit(1)
            time.sleep(0.05)  # its loop started
            init = cage_init.Init(uid, uid, uid + 1)
            signal.setitimer(signal.ITIMER_REAL, 2.0)
            try:
                init.kill_runtime()
            except Hung:
                hung += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                os.close(init.wake_r)
                os.close(init.wake_w)
            waited, status = os.waitpid(stopper, os.WNOHANG | os.WUNTRACED)
            if waited == 0 or os.WIFSTOPPED(status):
                survived += 1
            for pid in init.runtime_uid_pids():  # what is left, for the next trial
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(stopper, 0)
    finally:
        signal.signal(signal.SIGALRM, old)
    print(f"10 sweeps beside a stopper: init held {hung}, the stopper alive after {survived}")
    assert hung == 0, f"init's sweep was held {hung} times in 10"
    assert survived == 0, f"the stopper outlived the sweep {survived} times in 10"

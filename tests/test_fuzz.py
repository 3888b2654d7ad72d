"""Property tests of both sockets' parsers against a live hive-core: whatever line
arrives, exactly one well-formed reply comes back and the core keeps serving."""

from __future__ import annotations

import json
import socket
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import CoreProcess, assert_ok, strict_loads
from hyperhive.client import Client
from hyperhive.wire import agent as wa
from hyperhive.wire import host as wh
from hyperhive.wire.common import AgentSpec, SpawnPayload

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

AGENT_MODELS = (
    wa.Whoami, wa.Peers, wa.Send, wa.Recv, wa.Ack, wa.Ask, wa.Answer, wa.RequestApproval,
    wa.SetStatus, wa.Remind, wa.LooseEnds,
)
HOST_VERBS = [m.model_fields["cmd"].annotation.__args__[0] for m in wh.HOST_MODELS]  # type: ignore[union-attr]
AGENT_VERBS = list(wa.AGENT_VERBS)
FIELD_NAMES = sorted(
    {f for m in (*AGENT_MODELS, *wh.HOST_MODELS, wh.Scope, AgentSpec, SpawnPayload) for f in m.model_fields}
    | {"from", "as", "agent", "sender", "operator", "version", "ok", "error"}
)
# carol is the liveness probe of the host fuzz: never named, so never destroyed
NAMES = ["alice", "bob", "dora", "operator", "all", "Alice", "..", "a/b", "x" * 31, "x" * 32, ""]


def one_reply(f: Any, record: bool = True) -> dict[str, Any]:
    """Read one reply line and check it is well formed."""
    line = f.readline()
    assert line.endswith(b"\n"), f"no complete reply line: {line[:200]!r}"
    resp = strict_loads(line)
    assert isinstance(resp, dict), resp
    assert resp.get("version") == 1, resp
    assert isinstance(resp.get("ok"), bool), resp
    if resp["ok"] is False:
        err = resp.get("error")
        assert isinstance(err, str) and err and "\n" not in err and "\r" not in err, resp
        assert "internal error" not in err, resp  # no input may reach an unhandled exception
    if record:
        event(f"ok={resp['ok']}")
    return resp


# -- strategies ----------------------------------------------------------------------------

def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Pick a strategy with the given weights (``st.one_of`` drops duplicate branches)."""
    table = [s for w, s in choices for _ in range(w)]
    return st.integers(min_value=0, max_value=len(table) - 1).flatmap(lambda i: table[i])


names = weighted((1, st.sampled_from(["alice", "bob", "operator"])), (1, st.sampled_from(NAMES)))
small_text = st.text(max_size=40).filter(lambda s: s != "carol")
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-3, max_value=50),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=0, max_value=2),
    small_text,
    names,
    st.sampled_from(["command", "claude", "custom", "spawn", "message", "question", "2030-01-01T00:00:00+00:00"]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), small_text), children, max_size=4),
    ),
    max_leaves=12,
)


VERB_MODELS: dict[str, type] = {
    **{m.model_fields["cmd"].annotation.__args__[0]: m for m in wh.HOST_MODELS},  # type: ignore[union-attr]
}
AGENT_VERB_MODELS: dict[str, type] = {
    m.model_fields["cmd"].annotation.__args__[0]: m for m in AGENT_MODELS  # type: ignore[union-attr]
}
# A float that json.dumps writes as a unique token; encode() swaps it for number
# literals Python's json can't produce: out of float range, beyond 64 bits, huge.
SENTINEL = 1.2345678901234567e-300
SENTINEL_TOKEN = json.dumps(SENTINEL).encode()
BIG_LITERALS = [b"1e400", b"-1e400", b"1" + b"0" * 30, b"-9223372036854775809", b"9223372036854775807", b"9" * 5000, b"-0", b"1E2"]
EXTREME_INTS = [2**63 - 1, 2**63, -(2**63) - 1, 10**30, 0, -1]


def numeric(typical: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return weighted((8, typical), (1, st.sampled_from(EXTREME_INTS)), (1, st.just(SENTINEL)))


def encode(obj: Any, literal: bytes) -> bytes:
    return json.dumps(obj).encode().replace(SENTINEL_TOKEN, literal)


small_ints = st.integers(min_value=0, max_value=40)
specs = st.fixed_dictionaries(
    {},
    optional={
        "runtime": st.sampled_from(["command", "claude", "python"]),
        "command": st.lists(small_text, max_size=3),
        "peers": st.lists(names, max_size=3),
        "egress": st.lists(small_text, max_size=2),
        "model": small_text,
    },
)
# Plausible values per field name, so that a good share of requests get past validation.
TYPED: dict[str, st.SearchStrategy[Any]] = {
    "to": names,
    "name": names,
    "body": small_text,
    "question": small_text,
    "answer": small_text,
    "description": small_text,
    "text": small_text,
    "note": small_text,
    "wait": numeric(st.floats(min_value=0, max_value=0.1)),
    "max": numeric(st.integers(min_value=1, max_value=20)),
    "ids": st.lists(numeric(st.integers(min_value=1, max_value=40)), max_size=4),
    "id": numeric(st.integers(min_value=1, max_value=40)),
    "after": numeric(small_ints),
    "options": st.lists(small_text, max_size=3),
    "kind": st.sampled_from(["custom", "spawn", "nope"]),
    "payload": st.one_of(json_values, st.fixed_dictionaries({"name": names, "spec": specs})),
    "in_seconds": numeric(st.floats(min_value=0.01, max_value=2)),
    "at": numeric(
        st.sampled_from(["2020-01-01T00:00:00+00:00", "2099-01-01T00:00:00+00:00", "2030-01-01T00:00:00", -1e308, 1e308])
    ),
    "paused": st.booleans(),
    "graceful": st.booleans(),
    "scope": st.fixed_dictionaries({}, optional={"agent_names": st.lists(names, max_size=3)}),
    "spec": specs,
    "kinds": st.lists(st.sampled_from([*wh.EVENT_KINDS, "gossip"]), max_size=3),
}


def typed_request(verb: str, model: type) -> st.SearchStrategy[dict[str, Any]]:
    """Mostly well-typed requests for ``verb``: required fields usually present, the
    rest sometimes, any of them now and then of the wrong type, sometimes an extra field."""

    def value(f: str) -> st.SearchStrategy[Any]:
        typed = TYPED.get(f, json_values)
        return weighted((9, typed), (1, json_values))

    fields = {f: info for f, info in model.model_fields.items() if f != "cmd"}  # type: ignore[attr-defined]
    required = {f: value(f) for f, info in fields.items() if info.is_required()}
    optional = {f: value(f) for f, info in fields.items() if not info.is_required()}
    complete = st.fixed_dictionaries({"cmd": st.just(verb), **required}, optional=optional)
    partial = st.fixed_dictionaries({"cmd": st.just(verb)}, optional={**required, **optional})
    extra = st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, min_size=1, max_size=1)
    with_extra = st.builds(lambda e, b: {**e, **b}, extra, complete)
    return weighted((6, complete), (1, partial), (1, with_extra))


def requests(verbs: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    models = {**VERB_MODELS, **AGENT_VERB_MODELS} if set(verbs) - set(VERB_MODELS) else VERB_MODELS
    typed = st.one_of([typed_request(v, models[v]) for v in verbs if v in models])
    cmd = st.one_of(st.sampled_from(HOST_VERBS + AGENT_VERBS), json_values)
    fields = st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), small_text), json_values, max_size=5)
    untyped = st.builds(lambda c, f: {**f, "cmd": c}, cmd, fields) | fields
    return weighted((3, typed), (1, untyped))


def tame_recv(obj: dict[str, Any]) -> dict[str, Any]:
    """A valid long-poll ``recv`` may block for up to an hour; keep the wait short."""
    wait = obj.get("wait")
    if obj.get("cmd") == "recv" and isinstance(wait, int | float) and not isinstance(wait, bool) and (wait > 0.2 or wait == SENTINEL):
        return {**obj, "wait": 0.05}
    return obj


def splice(obj: dict[str, Any], pos: int, junk: bytes) -> bytes:
    """A request's JSON with a few bytes overwritten: almost valid lines."""
    raw = json.dumps(obj).encode()
    pos %= len(raw) + 1
    return raw[:pos] + junk + raw[pos + len(junk) // 2 :]


def raw_lines() -> st.SearchStrategy[bytes]:
    garbage = st.binary(min_size=1, max_size=2048)
    mutated = st.builds(
        splice, requests(AGENT_VERBS + HOST_VERBS).map(lambda o: json.loads(encode(o, b"0.5"))), st.integers(min_value=0, max_value=10_000),
        st.binary(min_size=1, max_size=8),
    )
    text_lines = st.text(min_size=1, max_size=500).map(lambda s: s.encode("utf-8", "surrogatepass"))
    return (
        st.one_of(garbage, mutated, text_lines)
        .map(lambda b: b.replace(b"\n", b""))
        .filter(lambda b: b.strip() != b"")  # blank lines are skipped by design (no reply)
    )


# -- agent.sock ------------------------------------------------------------------------------


@FUZZ
@given(line=raw_lines())
def test_agent_sock_any_bytes(core: CoreProcess, line: bytes) -> None:
    with Client(core.agent_sock("alice"), timeout=15) as c:
        c.send_raw(line + b"\n")
        one_reply(c._file)
        # exactly one reply: the next line answers the next request
        assert assert_ok(c.call("whoami"))["name"] == "alice"


@FUZZ
@given(obj=requests(AGENT_VERBS), literal=st.sampled_from(BIG_LITERALS))
def test_agent_sock_any_json_object(core: CoreProcess, obj: dict[str, Any], literal: bytes) -> None:
    obj = tame_recv(obj)
    with Client(core.agent_sock("alice"), timeout=15) as c:
        c.send_raw(encode(obj, literal) + b"\n")
        resp = one_reply(c._file)
        if resp["ok"]:
            assert obj.get("cmd") in AGENT_VERBS, (obj, resp)
        assert assert_ok(c.call("whoami"))["name"] == "alice"


# -- host.sock -------------------------------------------------------------------------------


def host_alive(core: CoreProcess) -> None:
    """The core still serves both sockets (carol is never named by the fuzz, but a
    whole-hive ``stop`` may have stopped her)."""
    assert_ok(core.host_call("start", scope={"agent_names": ["carol"]}))
    assert assert_ok(core.agent_call("carol", "whoami"))["name"] == "carol"


def host_exchange(core: CoreProcess, payload: bytes, valid_json: dict[str, Any] | None) -> None:
    with Client(core.host_sock, timeout=15) as c:
        c.send_raw(payload + b"\n")
        resp = one_reply(c._file)
        status_feed = valid_json is not None and valid_json.get("cmd") == "subscribe_agent_status"
        if resp["ok"] and ("subscribed" in resp or status_feed):  # hyperhive's ack is bare
            # a valid subscribe turns the connection into an event stream
            assert valid_json is not None and valid_json.get("cmd") in ("subscribe", "subscribe_agent_status")
        else:
            if resp["ok"]:
                assert valid_json is not None and valid_json.get("cmd") in HOST_VERBS, (valid_json, resp)
            assert isinstance(assert_ok(c.call("list"))["agents"], list)
    host_alive(core)


@FUZZ
@given(line=raw_lines())
def test_host_sock_any_bytes(core: CoreProcess, line: bytes) -> None:
    try:
        parsed = json.loads(line)
    except ValueError:
        parsed = None
    host_exchange(core, line, parsed if isinstance(parsed, dict) else None)


@FUZZ
@given(obj=requests(HOST_VERBS), literal=st.sampled_from(BIG_LITERALS))
def test_host_sock_any_json_object(core: CoreProcess, obj: dict[str, Any], literal: bytes) -> None:
    host_exchange(core, encode(obj, literal), obj)


def test_fuzz_survivor_still_consistent(core: CoreProcess) -> None:
    """A burst of garbage on many connections at once leaves the core consistent."""
    socks = []
    for i in range(50):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(core.agent_sock("bob") if i % 2 else core.host_sock))
        s.sendall(b"\xff\x00garbage{" * 100 + b"\n")
        socks.append(s)
    for s in socks:
        s.settimeout(15)
        f = s.makefile("rb")
        one_reply(f, record=False)
        f.close()
        s.close()
    assert assert_ok(core.host_call("list"))["agents"] == ["alice", "bob", "carol"]
    assert assert_ok(core.agent_call("bob", "whoami"))["name"] == "bob"

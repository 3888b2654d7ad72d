"""host.sock speaks hyperhive's host.sock v1, as its one public client does.

The client is the Rust crate ``hytte-plugin-agents`` (GitHub ``vibec0re/trollshell``,
``crates/hytte-plugin-agents``). Its tests pin the exact request lines it writes, and its
fixtures are response lines derived from hyperhive's own serde types. This module replays
those request lines, byte for byte, against a real hive-core, the way that client does
(one connection per request: connect, one line out, one line back, close), and decodes
every answer with ``decode``: a model of hyperhive's response types written here from
those public sources (field names, types, which are optional), decoding as serde would
(unknown keys tolerated, a missing field takes its default, ``null`` only where the
field is an ``Option``). The facts carry over; none of the client's code does.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import REPO, CoreProcess, assert_ok, assert_refused, wire_time
from hive_fixture import HiveFactory

# -- the model: hyperhive's response types, from the public client's mirror --------------

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
Shape = Callable[[Any, str], None]


def _fail(path: str, want: str, value: Any) -> None:
    raise AssertionError(f"{path}: a hyperhive client wants {want}, got {json.dumps(value)[:200]}")


def string(value: Any, path: str) -> None:
    if not isinstance(value, str):
        _fail(path, "a string", value)


def boolean(value: Any, path: str) -> None:
    if not isinstance(value, bool):
        _fail(path, "a bool", value)


def integer(value: Any, path: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(path, "an integer", value)


def u32(value: Any, path: str) -> None:
    integer(value, path)
    if not 0 <= value < 2**32:
        _fail(path, "a u32", value)


def timestamp(value: Any, path: str) -> None:
    """RFC 3339 (hyperhive: chrono's UTC ``DateTime``); ours are to the second, in UTC."""
    if not isinstance(value, str) or not RFC3339.match(value):
        _fail(path, "an RFC 3339 timestamp like 2026-09-07T12:34:56Z", value)
    wire_time(value)  # ours: exactly that form, UTC


def option(shape: Shape) -> Shape:
    def check(value: Any, path: str) -> None:
        if value is not None:
            shape(value, path)

    check.optional = True  # type: ignore[attr-defined]  # marks a serde Option field
    return check


def vec(shape: Shape) -> Shape:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, list):
            _fail(path, "an array", value)
        for i, item in enumerate(value):
            shape(item, f"{path}[{i}]")

    return check


def struct(fields: dict[str, Shape], required: frozenset[str] = frozenset()) -> Shape:
    """A serde struct: unknown keys are tolerated; a field in ``required`` must be there
    (hyperhive always sends it); ``null`` only for an ``option`` field."""

    def check(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            _fail(path, "an object", value)
        for key in required - value.keys():
            _fail(f"{path}.{key}", "this field (hyperhive always sends it)", None)
        for key, shape in fields.items():
            if key in value:
                if value[key] is None and not getattr(shape, "optional", False):
                    _fail(f"{path}.{key}", "a value (not an Option)", None)
                shape(value[key], f"{path}.{key}")

    return check


APPROVAL_STATUSES = ("pending", "approved", "denied", "failed", "cancelled")


def approval_status(value: Any, path: str) -> None:
    string(value, path)
    if value not in APPROVAL_STATUSES:
        _fail(path, f"one of {APPROVAL_STATUSES}", value)


# hive_sh4re::container::AgentStatusRow (hive-sh4re/src/container.rs), as mirrored.
AGENT_STATUS_ROW = struct(
    {
        "name": string,
        "running": boolean,
        "failed": boolean,
        "needs_update": boolean,
        "needs_login": boolean,
        "deployed_sha": option(string),
        "pending_reminders": integer,
        "paused": boolean,
        "parent": option(string),
        "active_model": option(string),
        "status_text": option(string),
        "status_set_at": option(timestamp),
        "url": option(string),
    },
    required=frozenset({"name", "running", "failed", "needs_update", "needs_login", "paused"}),
)
# hive_sh4re::approvals::Approval: commit_ref is a String (always sent, "" where unused).
APPROVAL = struct(
    {
        "id": integer,
        "agent": string,
        "kind": string,
        "commit_ref": string,
        "fetched_sha": option(string),
        "requested_at": timestamp,
        "status": approval_status,
        "resolved_at": option(timestamp),
        "note": option(string),
        "description": option(string),
    },
    required=frozenset({"id", "agent", "kind", "commit_ref", "requested_at", "status"}),
)
# hive-host-sock's HiveUrls.
HIVE_URLS = struct(
    {"domain": option(string), "home": option(string), "forge": option(string), "matrix": option(string)}
)
# hive-host-sock's HostResponse (the fields a client reads).
RESPONSE = struct(
    {
        "version": u32,
        "ok": boolean,
        "error": option(string),
        "agents": option(vec(string)),
        "urls": option(HIVE_URLS),
        "agent_statuses": option(vec(AGENT_STATUS_ROW)),
        "approvals": option(vec(APPROVAL)),
    },
    required=frozenset({"version", "ok"}),
)


def decode(line: bytes) -> dict[str, Any]:
    """One response line as a hyperhive client decodes it; version 1, as it checks."""
    assert line.endswith(b"\n"), line[-200:]
    obj = json.loads(line)
    RESPONSE(obj, "$")
    assert obj["version"] == 1, obj
    return obj


# The model is checked against answers in hyperhive's shape (written here, not copied).
SAMPLES = [
    b'{"version":1,"ok":true,"agent_statuses":[{"name":"a-b","running":true,"failed":false,'
    b'"needs_update":false,"needs_login":false,"pending_reminders":0,"paused":false,'
    b'"status_text":"x","status_set_at":"2026-01-02T03:04:05Z","url":"https://h/agent/a-b/"}]}\n',
    b'{"version":1,"ok":true,"approvals":[{"id":3,"agent":"a-b","kind":"spawn","commit_ref":"",'
    b'"requested_at":"2026-01-02T03:04:05Z","status":"pending"}]}\n',
    b'{"version":1,"ok":true,"urls":{"domain":"h","home":"https://h/","forge":"https://f/"}}\n',
    b'{"version":1,"ok":false,"error":"no"}\n',
]
NOT_HYPERHIVE = [  # what main sent: a float time, a row without commit_ref
    b'{"version":1,"ok":true,"agent_statuses":[{"name":"a","running":true,"failed":false,'
    b'"needs_update":false,"needs_login":false,"paused":false,"status_set_at":1788784496.5}]}\n',
    b'{"version":1,"ok":true,"approvals":[{"id":3,"agent":"a","kind":"custom",'
    b'"requested_at":"2026-01-02T03:04:05Z","status":"pending"}]}\n',
]


def test_the_model_reads_hyperhive_lines_and_rejects_ours_of_before() -> None:
    for line in SAMPLES:
        decode(line)
    for line in NOT_HYPERHIVE:
        with pytest.raises(AssertionError):
            decode(line)


# -- the client's way: one connection per request, its exact bytes ------------------------

A, B = "trollshell-choom", "nixos-choom"
AGENTS = {
    A: {"runtime": "command", "command": ["true"], "peers": [B]},
    B: {"runtime": "command", "command": ["true"]},
}
NAMES = sorted(AGENTS)  # as the hive lists them
HIVE = {"forge_url": "https://forge.hive.local/", "matrix_url": "https://matrix.hive.local/"}


def round_trip(sock_path: Path, line: str) -> dict[str, Any]:
    """connect, write one line, read one line, drop the socket (the client's model)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(15)
        s.connect(str(sock_path))
        s.sendall(line.encode() + b"\n")
        with s.makefile("rb") as f:
            return decode(f.readline())


@pytest.fixture
def hive(core_factory: Callable[..., CoreProcess]) -> CoreProcess:
    return core_factory(AGENTS, hive=HIVE)


def test_the_clients_pinned_lines_are_answered_in_hyperhive_shapes(hive: CoreProcess) -> None:
    sock = hive.host_sock
    rows = round_trip(sock, '{"cmd":"agent_status"}')["agent_statuses"]
    assert [r["name"] for r in rows] == NAMES
    # the answer the client dropped whole on main: one agent with a status
    assert_ok(hive.agent(A).call("set_status", text="reviewing PR #947"))
    row = {r["name"]: r for r in round_trip(sock, '{"cmd":"agent_status"}')["agent_statuses"]}[A]
    assert row["status_text"] == "reviewing PR #947"
    assert abs(wire_time(row["status_set_at"]) - time.time()) < 60
    assert row["url"].endswith(f"/agent/{A}/")

    assert round_trip(sock, '{"cmd":"list"}')["agents"] == NAMES
    urls = round_trip(sock, '{"cmd":"urls"}')["urls"]
    assert urls == {"domain": "127.0.0.1", "home": "http://127.0.0.1:8080/", **{
        "forge": HIVE["forge_url"], "matrix": HIVE["matrix_url"]}}

    # the approval queue: the answer the client dropped whole on main
    payload = {"name": "helper", "spec": {"runtime": "command", "command": ["true"]}}
    spawn = assert_ok(hive.agent(A).call("request_approval", kind="spawn", description="a helper", payload=payload))
    custom = assert_ok(hive.agent(B).call("request_approval", kind="custom", description="ok?", payload=[1]))
    queue = round_trip(sock, '{"cmd":"pending"}')["approvals"]
    assert [(q["id"], q["agent"], q["kind"], q["status"]) for q in queue] == [
        (spawn["id"], A, "spawn", "pending"), (custom["id"], B, "custom", "pending")]
    assert [q["commit_ref"] for q in queue] == [spawn["payload_sha256"], custom["payload_sha256"]]
    assert all("fetched_sha" not in q for q in queue)
    assert round_trip(sock, f'{{"cmd":"approve","id":{spawn["id"]}}}')["ok"]
    assert round_trip(sock, f'{{"cmd":"deny","id":{custom["id"]}}}')["ok"]
    assert round_trip(sock, '{"cmd":"pending"}')["approvals"] == []
    refused = round_trip(sock, '{"cmd":"approve","id":9223372036854775807}')
    assert refused["ok"] is False and refused["error"]

    # the lifecycle lines, exactly as pinned
    for line in (
        f'{{"cmd":"set_paused","name":"{A}","paused":true}}',
        f'{{"cmd":"set_paused","name":"{A}","paused":false}}',
        f'{{"cmd":"stop","scope":{{"agent_names":["{A}"]}},"graceful":true}}',
        f'{{"cmd":"start","scope":{{"agent_names":["{A}"]}}}}',
        f'{{"cmd":"restart","name":"{A}"}}',
    ):
        assert round_trip(sock, line)["ok"] is True, line
    assert hive.status(A)["paused"] is False


def test_scope_takes_hyperhives_class_flags(hive: CoreProcess) -> None:
    sock = hive.host_sock
    flags = '"agents":false,"ci":false,"forge":false,"gateway":false,"matrix":false'
    resp = round_trip(sock, f'{{"cmd":"stop","scope":{{"agent_names":["{B}"],{flags}}},"graceful":true}}')
    assert resp["ok"] is True and resp["stopped"] == [B]
    # only services this hive doesn't run: nothing is touched
    resp = round_trip(sock, '{"cmd":"stop","scope":{"forge":true,"matrix":true},"graceful":false}')
    assert resp["ok"] is True and resp["stopped"] == []
    # agents: every agent
    resp = round_trip(sock, '{"cmd":"start","scope":{"agents":true}}')
    assert resp["ok"] is True and resp["started"] == NAMES
    bad = round_trip(sock, '{"cmd":"start","scope":{"forge":"yes"}}')
    assert bad["ok"] is False and "forge" in bad["error"]


def test_subscribe_agent_status_acks_then_pushes_single_rows(hive: CoreProcess) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(15)
        s.connect(str(hive.host_sock))
        s.sendall(b'{"cmd":"subscribe_agent_status"}\n')
        f = s.makefile("rb")
        ack = decode(f.readline())
        assert ack == {"version": 1, "ok": True}  # bare
        assert_ok(hive.agent(B).call("set_status", text="building"))
        push = decode(f.readline())
        assert set(push) == {"version", "ok", "agent_statuses"} and push["ok"] is True
        (row,) = push["agent_statuses"]
        assert (row["name"], row["status_text"]) == (B, "building")
        # it reads nothing more on that connection: a request gets no answer of its own
        s.sendall(b'{"cmd":"list"}\n')
        assert_ok(hive.host_call("set_paused", name=A, paused=True))
        push = decode(f.readline())
        assert "agents" not in push
        assert [(r["name"], r["paused"]) for r in push["agent_statuses"]] == [(A, True)]


FLOOD = 2000  # status changes while a subscriber reads nothing: more than its buffers hold


def test_a_slow_subscriber_misses_updates_and_stays_connected(hive: CoreProcess) -> None:
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.settimeout(30)
    slow.connect(str(hive.host_sock))
    try:
        slow.sendall(b'{"cmd":"subscribe_agent_status"}\n')
        f = slow.makefile("rb")
        assert decode(f.readline()) == {"version": 1, "ok": True}
        # the subscriber reads nothing while the hive changes; the hive keeps answering
        # (the operator's requests go pipelined on one connection, to be quick)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as op:
            op.settimeout(60)
            op.connect(str(hive.host_sock))
            lines = [
                json.dumps({"cmd": "set_paused", "name": A, "paused": i % 2 == 0}) for i in range(FLOOD)
            ]
            lines += [json.dumps({"cmd": "set_paused", "name": B, "paused": True}), '{"cmd":"list"}']
            answers = op.makefile("rb")
            replies = []
            for at in range(0, len(lines), 200):  # a batch at a time: no buffer fills up
                batch = lines[at : at + 200]
                op.sendall("".join(line + "\n" for line in batch).encode())
                replies += [json.loads(answers.readline()) for _ in batch]
            assert len(replies) == FLOOD + 2 and all(r["ok"] for r in replies)
            assert replies[-1]["agents"] == NAMES
        # still connected; what it reads are pushes (no error, no hang-up), and the
        # newest change is among them: the oldest were dropped, not the newest
        seen = 0
        while True:
            push = decode(f.readline())
            assert push["ok"] is True and len(push["agent_statuses"]) == 1, push
            seen += 1
            row = push["agent_statuses"][0]
            if (row["name"], row["paused"]) == (B, True):
                break
        assert seen < FLOOD + 1, "nothing was dropped: the flood never outran the buffers"
    finally:
        slow.close()


HIVE_CLI = REPO / ".venv" / "bin" / "hive"

# -- hyperhive's verbs that map onto ours ----------------------------------------------------


def cli(core: CoreProcess, *args: str) -> str:
    out = subprocess.run([str(HIVE_CLI), "--run-dir", str(core.run_dir), *args],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_set_parent_request_spawn_and_set_resource_limits(hive: CoreProcess) -> None:
    sock = hive.host_sock
    # SetParent: B under A, then back to root-level; a cycle is refused, changes nothing
    assert round_trip(sock, f'{{"cmd":"set_parent","name":"{B}","parent":"{A}"}}')["ok"]
    assert hive.status(B)["parent"] == A
    assert_ok(hive.agent(B).call("send", to=A, body="reporting to my parent"))
    cycle = round_trip(sock, f'{{"cmd":"set_parent","name":"{A}","parent":"{B}"}}')
    assert cycle["ok"] is False and "cycle" in cycle["error"]
    assert "parent" not in hive.status(A)
    assert round_trip(sock, f'{{"cmd":"set_parent","name":"{B}","parent":null}}')["ok"]
    assert "parent" not in hive.status(B)
    # the operator's CLI for both verbs
    assert cli(hive, "set-parent", B, A) == f"{B}: parent {A}"
    assert hive.status(B)["parent"] == A
    assert cli(hive, "set-parent", B) == f"{B}: root-level"
    assert cli(hive, "limits", B, "--pids-max", "100") == f"{B}: memory_mib default, pids_max 100 (from its next start)"

    # an operator-side spawn request: a pending spawn approval, root-level once approved
    resp = assert_ok(hive.host_call("request_spawn", name="scout", spec={"runtime": "command", "command": ["true"]}))
    (row,) = round_trip(sock, '{"cmd":"pending"}')["approvals"]
    assert (row["id"], row["agent"], row["kind"], row["commit_ref"]) == (
        resp["id"], "operator", "spawn", resp["payload_sha256"])
    assert "scout" not in hive.host_call("list")["agents"]
    assert_ok(hive.host_call("approve", id=resp["id"]))
    assert "parent" not in hive.status("scout")

    # SetResourceLimits: kept in the agent's spec (applied when its cage next starts)
    resp = assert_ok(hive.host_call("set_resource_limits", name=A, memory_mib=256, pids_max=64))
    assert (resp["memory_mib"], resp["pids_max"]) == (256, 64)
    resp = assert_ok(hive.host_call("set_resource_limits", name=A, pids_max=None))  # back to default
    assert resp["memory_mib"] == 256 and "pids_max" not in resp
    cpu = hive.host_call("set_resource_limits", name=A, memory_mib=128, cpu_max="50000 100000")
    assert_refused(cpu, "no CPU limit")
    assert assert_ok(hive.host_call("set_resource_limits", name=A))["memory_mib"] == 256  # unchanged
    assert_refused(hive.host_call("set_resource_limits", name=A, memory_mib=1), "memory_mib")
    assert_refused(hive.host_call("set_resource_limits", name="ghost", memory_mib=64), "no agent named 'ghost'")


def test_resource_limits_reach_the_cage_at_its_next_start(hive_factory: HiveFactory) -> None:
    hv = hive_factory({"lim": {"runtime": "command", "command": ["true"]}})
    hv.wait_running(["lim"])
    assert_ok(hv.host_call("set_resource_limits", name="lim", memory_mib=96, pids_max=48))
    assert_ok(hv.host_call("restart", name="lim"))
    hv.wait_running(["lim"])
    group = hv.cgroup("lim")
    if group.v2:
        memory, pids = group.dirs[0] / "memory.max", group.dirs[0] / "pids.max"
    else:
        memory, pids = group.dirs[1] / "memory.limit_in_bytes", group.dirs[0] / "pids.max"
    assert int(memory.read_text()) == 96 << 20
    assert int(pids.read_text()) == 48

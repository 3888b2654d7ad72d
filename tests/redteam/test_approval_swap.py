"""Swapping an approval's payload after it was requested. The payload stored at
request time, and its sha256 shown to the operator, are what approving applies:
the agent has no verb and no field that changes a stored approval, can't reach
the database, and an SQLite trigger refuses any UPDATE of payload, hash, kind
or agent even to root. A look-alike second request is a second approval, with
its own id and hash; it changes nothing about the first."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Any

import pytest

from hive_fixture import HiveProcess, wait_until
from hyperhive.core.store import canonical_json

from .conftest import World, cage_run, changes, unchanged

pytestmark = pytest.mark.attack('approval.swap', ref='humanlayer#996 (tamper-evident approvals)')

UPDATE_VERBS = ["update_approval", "amend_approval", "edit_approval", "set_payload", "replace_payload",
                "update", "patch", "request_approval_update", "approval_update", "reissue"]

REWRITE = """
out = {}
for verb in P["verbs"]:
    out[verb] = err({"cmd": verb, "id": P["approval"], "payload": {"x": 2}, "payload_sha256": P["sha"]})
base = {"cmd": "request_approval", "kind": "custom", "description": "rotate the keys", "payload": {"x": 2}}
for field, value in (("id", P["approval"]), ("approval_id", P["approval"]), ("payload_sha256", P["sha"]),
                     ("replace", P["approval"]), ("update", True), ("ref", P["approval"])):
    out["request_approval " + field] = err({**base, field: value})
result(**out)
"""


def test_no_verb_or_field_rewrites_a_stored_approval(rt: HiveProcess, world: World) -> None:
    with unchanged(rt):
        res = cage_run(rt, "rtbob", REWRITE, verbs=UPDATE_VERBS, approval=world.approval, sha=world.approval_sha)
    assert res == {
        **{v: f"unknown command '{v}'" for v in UPDATE_VERBS},
        **{f"request_approval {f}": f"unknown field '{f}'"
           for f in ("id", "approval_id", "payload_sha256", "replace", "update", "ref")},
    }
    (row,) = [a for a in rt.host_call("pending")["approvals"] if a["id"] == world.approval]
    assert (row["payload"], row["payload_sha256"]) == ({"x": 1}, world.approval_sha)


DATABASE = """
out = {}
for p in P["paths"]:
    try:
        open(p, "r+b").close()
        out[p] = "OPENED"
    except OSError as e:
        out[p] = errname(e)
result(attempts=out)
"""

TRIGGER_UPDATES = [
    ("payload", "UPDATE approvals SET payload=? WHERE id=?", '{"x":2}'),
    ("payload_sha256", "UPDATE approvals SET payload_sha256=? WHERE id=?", "0" * 64),
    ("kind", "UPDATE approvals SET kind=? WHERE id=?", "spawn"),
    ("agent", "UPDATE approvals SET agent=? WHERE id=?", "rtalice"),
]


def test_database_out_of_reach_and_the_trigger_refuses_updates(rt: HiveProcess, world: World) -> None:
    S = str(rt.state_dir)
    paths = [f"{S}/hive.db", f"{S}/hive.db-wal", "/var/lib/hive/hive.db", "/home/agent/../../var/lib/hive/hive.db",
             f"/proc/1/root{S}/hive.db", f"/proc/2/root{S}/hive.db", f"/proc/self/root{S}/hive.db"]
    with unchanged(rt):
        res = cage_run(rt, "rtbob", DATABASE, paths=paths)
        # Defense in depth: even a process that can open the database (root) can't rewrite it.
        db = sqlite3.connect(rt.state_dir / "hive.db", timeout=10)
        try:
            for _, sql, value in TRIGGER_UPDATES:
                with pytest.raises(sqlite3.IntegrityError, match=r"^approval payload is immutable$"), db:
                    db.execute(sql, (value, world.approval))
        finally:
            db.close()
    assert res["attempts"] == {p: "EACCES" if p.startswith(("/proc/1/", "/proc/2/")) else "ENOENT" for p in paths}


LOOKALIKE = """
spec = {"runtime": "command", "command": ["true"]}
first = call({"cmd": "request_approval", "kind": "spawn", "description": "a helper for the release",
              "payload": {"name": "rtswap", "spec": spec}})
evil = {"runtime": "command", "command": ["sh", "-c", "echo swapped"], "peers": ["rtalice", "rtcarol"]}
second = call({"cmd": "request_approval", "kind": "spawn", "description": "a helper for the release",
               "payload": {"name": "rtswap", "spec": evil}})
result(first=first, second=second)
"""


def agent_spec(h: HiveProcess, name: str) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{h.state_dir / 'hive.db'}?mode=ro", uri=True, timeout=10)
    try:
        (spec,) = db.execute("SELECT spec FROM agents WHERE name=?", (name,)).fetchone()
    finally:
        db.close()
    return json.loads(spec)


def test_lookalike_request_does_not_change_what_approving_applies(rt: HiveProcess, world: World) -> None:
    h = rt
    with changes(h) as ch:
        _lookalike(h)
    # Two approvals (one approved, one failed), rtbob told of each; rtswap came and went.
    assert ch.count() == {"approvals": (2, 0), "messages": (2, 0)}
    assert sorted(r[6] for r in ch.added["approvals"]) == ["approved", "failed"]


def _lookalike(h: HiveProcess) -> None:
    res = cage_run(h, "rtbob", LOOKALIKE)
    first, second = res["first"], res["second"]
    assert first["ok"] and second["ok"] and first["id"] != second["id"]
    assert first["payload_sha256"] != second["payload_sha256"]
    pending = {a["id"]: a for a in h.host_call("pending")["approvals"]}
    shown = pending[first["id"]]
    assert shown["payload"] == {"name": "rtswap", "spec": {"runtime": "command", "command": ["true"]}}
    assert shown["payload_sha256"] == first["payload_sha256"] == hashlib.sha256(
        canonical_json(shown["payload"]).encode()).hexdigest()
    try:
        # The operator approves the first: exactly its stored payload is applied.
        approved = h.host_call("approve", id=first["id"])
        assert approved["ok"] and approved["approval"]["status"] == "approved", approved
        assert approved["approval"]["payload_sha256"] == first["payload_sha256"]
        spec = agent_spec(h, "rtswap")
        assert spec["command"] == ["true"] and spec.get("peers", []) == [], spec
        h.wait_running(["rtswap"])
        # The look-alike can't be applied on top of it.
        failed = h.host_call("approve", id=second["id"])
        assert failed["ok"] and failed["approval"]["status"] == "failed", failed
        assert failed["approval"]["note"] == "an agent named 'rtswap' already exists"
        assert agent_spec(h, "rtswap") == spec
    finally:
        if "rtswap" in h.host_call("list")["agents"]:
            assert h.host_call("destroy", name="rtswap")["ok"]
        wait_until(lambda: not h.cgroup("rtswap").pids(), 20, "rtswap's cage to be gone")


DUPLICATES = """
line = (b'{"cmd":"request_approval","kind":"custom","description":"dup",'
        b'"payload":{"target":"staging","target":"production","n":1,"n":2,"z":-0.0,"u":"\\\\u00e9\\\\u0301"}}')
c = Conn()
result(reply=c.raw(line + b"\\n"))
"""


def test_duplicate_keys_store_and_hash_what_the_operator_sees(rt: HiveProcess, world: World) -> None:
    """A payload line with duplicate keys: the stored payload is the one JSON parse the
    core made (the last value wins), the operator sees that, and its sha256 is the
    hash of exactly the text shown; there is no second reading to differ from it."""
    with changes(rt) as ch:
        res = cage_run(rt, "rtmule", DUPLICATES)
    assert ch.count() == {"approvals": (1, 0)}
    reply = res["reply"]
    assert reply["ok"], reply
    (row,) = [a for a in rt.host_call("pending")["approvals"] if a["id"] == reply["id"]]
    assert row["payload"] == {"target": "production", "n": 2, "z": -0.0, "u": "\u00e9\u0301"}
    text = canonical_json(row["payload"])
    assert row["payload_sha256"] == reply["payload_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    stored = ch.added["approvals"][0]
    assert stored[0] == reply["id"] and text in stored and reply["payload_sha256"] in stored
    assert rt.host_call("deny", id=reply["id"])["ok"]


SMUGGLE = """
spec = {"runtime": "command", "command": ["true"]}
out = {}
for field, value in (("parent", "rtalice"), ("origin", "operator"), ("agent", "rtalice"), ("approved", True),
                     ("uid", 0), ("payload_sha256", "0" * 64)):
    out[field] = err({"cmd": "request_approval", "kind": "spawn", "description": "d",
                      "payload": {"name": "rtsmuggle", "spec": spec, field: value}})
for field, value in (("uid", 0), ("user", "root"), ("home", "/"), ("mounts", ["/:/host"]), ("caps", ["ALL"]),
                     ("memory_mib", 16384), ("pids_max", 8192), ("privileged", True), ("parent", "operator")):
    out["spec." + field] = err({"cmd": "request_approval", "kind": "spawn", "description": "d",
                                "payload": {"name": "rtsmuggle", "spec": {**spec, field: value}}})
out["runtime"] = err({"cmd": "request_approval", "kind": "spawn", "description": "d",
                      "payload": {"name": "rtsmuggle", "spec": {"runtime": "root", "command": ["true"]}}})
out["taken"] = err({"cmd": "request_approval", "kind": "spawn", "description": "d",
                    "payload": {"name": "rtalice", "spec": spec}})
result(**out)
"""


def test_spawn_payload_cannot_carry_identity_or_privilege(rt: HiveProcess, world: World) -> None:
    """What approving a spawn applies is a name and an agent spec, nothing more: no
    parent (it is always the requester), origin, uid, mounts, capabilities or limits
    ride along for the operator to approve unseen."""
    with unchanged(rt):
        res = cage_run(rt, "rtbob", SMUGGLE)
    assert res == {
        **{f: f"spawn payload: unknown field {f!r}" for f in ("parent", "origin", "agent", "approved", "uid",
                                                              "payload_sha256")},
        **{f"spec.{f}": f"spawn payload: unknown field 'spec.{f}'" for f in (
            "uid", "user", "home", "mounts", "caps", "memory_mib", "pids_max", "privileged", "parent")},
        "runtime": "spawn payload: field 'spec.runtime': Input should be 'command' or 'claude'",
        "taken": "spawn payload: an agent named 'rtalice' already exists",
    }

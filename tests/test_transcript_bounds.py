"""Each agent's transcript is bounded in entries and in stored bytes (migration 14,
store/transcripts.py): the oldest go first, in the transaction that adds, and
``transcript_usage`` always says exactly what the table holds. In process, on a real
SQLite file; the real-cage case is tests/test_turns.py's
``test_a_transcript_is_bounded_in_stored_bytes``."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import store_at_version
from hyperhive.core.store import Store, canonical_json
from hyperhive.core.store.schema import MIGRATIONS
from hyperhive.wire.common import AgentSpec

SPEC = AgentSpec.model_validate({"runtime": "command", "command": ["true"]})
AGENTS = ("ann", "bob")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "hive.db")
    s.agents.sync_config({name: SPEC for name in AGENTS})
    yield s
    s.close()


def _held(store: Store, agent: str) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(id, stored bytes) of each entry the table holds for ``agent``, counted from the
    data itself, and what transcript_usage says."""
    rows = store.db.conn.execute(
        "SELECT id, length(CAST(kind AS BLOB)) + length(CAST(data AS BLOB)) FROM transcript"
        " WHERE agent=? ORDER BY id",
        (agent,),
    ).fetchall()
    return [(r[0], r[1]) for r in rows], store.transcripts.usage(agent)


# Text an agent's runtime may print: control characters (stored escaped, 6 bytes each),
# non-ASCII, quotes and backslashes.
TEXT = st.text(alphabet=st.sampled_from(["a", "\x01", "é", "😀", '"', "\\", "\n"]), max_size=40)
OP = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(AGENTS), st.lists(TEXT, min_size=1, max_size=6)),
    st.tuples(st.just("finish"), st.sampled_from(AGENTS), st.just([])),
    st.tuples(st.just("destroy"), st.sampled_from(AGENTS), st.just([])),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OP, max_size=40), keep=st.integers(3, 12), max_bytes=st.integers(150, 900))
def test_the_transcript_keeps_the_newest_entries_within_both_bounds(
    store: Store, ops: list[tuple[str, str, list[str]]], keep: int, max_bytes: int
) -> None:
    store.db.conn.execute("DELETE FROM transcript")
    store.db.conn.execute("DELETE FROM transcript_usage")
    store.transcripts.keep, store.transcripts.max_bytes = keep, max_bytes
    model: dict[str, list[tuple[int, int]]] = {a: [] for a in AGENTS}
    for op, agent, texts in ops:
        if op == "destroy":
            store.agents.delete(agent)
            store.agents.sync_config({name: SPEC for name in AGENTS})
            model[agent] = []
        else:
            turn = store.messages.send(agent, "operator", "message", "go").id
            if op == "add":
                added = store.transcripts.add(agent, turn, [("stdout", t) for t in texts])
            else:
                added = [store.transcripts.finish_turn(agent, turn, {"exit_status": 0})]
            # What each new entry stores: its kind and its data's canonical JSON, in UTF-8.
            for entry in added:
                size = len(entry["kind"].encode()) + len(canonical_json(entry["data"]).encode())
                model[agent].append((entry["id"], size))
            while len(model[agent]) > keep or sum(s for _, s in model[agent]) > max_bytes:
                model[agent].pop(0)
        for a in AGENTS:
            held, usage = _held(store, a)
            assert held == model[a], (a, op)
            assert usage == (len(held), sum(s for _, s in held))
            assert usage[0] <= keep and usage[1] <= max_bytes


def test_one_agents_flood_leaves_anothers_transcript_alone(store: Store) -> None:
    store.transcripts.max_bytes = 64 * 1024
    turn = store.messages.send("bob", "operator", "message", "go").id
    kept = store.transcripts.add("bob", turn, [("stdout", "bob's line")])
    for _ in range(20):
        turn = store.messages.send("ann", "operator", "message", "go").id
        store.transcripts.add("ann", turn, [("stdout", "\x01" * 4000)] * 3)  # ~72 KB a call
        store.transcripts.finish_turn("ann", turn, {"exit_status": 0})
    assert [e["id"] for e in store.transcripts.entries("bob")] == [kept[0]["id"]]
    entries, size = store.transcripts.usage("ann")
    assert size <= 64 * 1024 and entries == len(list(store.transcripts.entries("ann", limit=100)))
    # The newest call's end is there, its oldest lines went first.
    assert [e["kind"] for e in store.transcripts.entries("ann")][-1] == "exit"


def test_migration_14_counts_the_transcript_an_older_hive_holds(tmp_path: Path) -> None:
    path = tmp_path / "v13.db"
    store_at_version(path, 13)
    db = sqlite3.connect(path, isolation_level=None)
    for i in range(30):
        agent = AGENTS[i % 2]
        data = '"' + "\\u0001" * (100 * (i + 1)) + '"'
        db.execute(
            "INSERT INTO transcript (agent, turn, kind, data, at) VALUES (?, 1, 'stdout', ?, 0)",
            (agent, data),
        )
    expected = {
        a: db.execute(
            "SELECT count(*), sum(6 + length(data)) FROM transcript WHERE agent=?", (a,)
        ).fetchone()
        for a in AGENTS
    }
    db.close()

    s = Store(path)
    try:
        assert s.schema_version == len(MIGRATIONS)
        for a in AGENTS:
            held, usage = _held(s, a)
            assert usage == expected[a] == (len(held), sum(size for _, size in held))
        plan = " ".join(
            str(r[-1])
            for r in s.db.conn.execute(
                "EXPLAIN QUERY PLAN SELECT id, size FROM transcript WHERE agent=? ORDER BY id",
                ("ann",),
            )
        )
        assert "COVERING INDEX transcript_agent_size" in plan, plan
        # The first add past the bound trims what the older hive held, oldest first.
        s.transcripts.max_bytes = 20_000
        turn = s.messages.send("ann", "operator", "message", "go").id
        new = s.transcripts.add("ann", turn, [("stdout", "x")])
        held, usage = _held(s, "ann")
        assert usage[1] <= 20_000 and held[-1][0] == new[0]["id"]
        assert usage == (len(held), sum(size for _, size in held))
        assert s.transcripts.usage("bob") == expected["bob"]
    finally:
        s.close()

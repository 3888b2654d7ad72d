"""The store package in process: the agents cache, the approval transaction handle,
frozen rows, and that an existing hive.db opens."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import store_at_version
from hyperhive.core import approvals as kinds
from hyperhive.core.refusals import Conflict, NotFound
from hyperhive.core.store import AgentRow, ApplyError, ApprovalTx, Store, StoreError, Usage
from hyperhive.core.store.agents import AgentRepo
from hyperhive.core.store.schema import MIGRATIONS
from hyperhive.wire.common import AgentSpec, Approval

SPEC = AgentSpec.model_validate(
    {"runtime": "command", "command": ["true"], "egress": ["a.example:443"]}
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "hive.db")
    s.agents.sync_config({"boss": SPEC})
    yield s
    s.close()


def rows_read(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the reads of the whole agents table (each one is a cache miss)."""
    count = [0]
    real = type(store.agents)._table

    def counting(self: AgentRepo) -> dict[str, AgentRow]:
        if store.agents._cache is None:
            count[0] += 1
        return real(self)

    monkeypatch.setattr(type(store.agents), "_table", counting)
    return count


def _row(store: Store, name: str) -> AgentRow:
    row = store.agents.get(name)
    assert row is not None
    return row


# -- the agents cache ------------------------------------------------------------------


def test_each_agent_write_is_seen_at_once(store: Store) -> None:
    assert store.agents.get("boss") is not None and store.agents.get("kid") is None
    store.agents.create("kid", SPEC, "boss", "operator")
    assert store.agents.get("kid") == store.agents.get("kid")
    kid = store.agents.get("kid")
    assert kid is not None and kid.parent == "boss" and kid.origin == "operator"
    assert kid.spec == SPEC and not kid.paused and not kid.stopped
    store.agents.set_flag("kid", "paused", True)
    assert _row(store, "kid").paused
    store.agents.set_flag("kid", "stopped", True)
    assert _row(store, "kid").stopped
    at = store.agents.set_status_text("kid", "busy")
    row = store.agents.get("kid")
    assert row is not None and (row.status_text, row.status_set_at) == ("busy", at)
    store.agents.delete("boss")
    assert store.agents.get("boss") is None and _row(store, "kid").parent is None
    store.agents.sync_config({"other": SPEC})
    assert [r.name for r in store.agents.all()] == ["kid", "other"]


def test_only_agent_writes_drop_the_cache(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = rows_read(store, monkeypatch)
    store.agents.get("boss")
    assert reads[0] == 1
    m = store.messages.send("boss", "operator", "message", "hi")
    store.messages.send_many([("boss", "operator", "message", "hi")], quota=(100, 1 << 20))
    store.messages.unacked("boss", 10, set())
    store.messages.ack("boss", [m.id])
    q, _ = store.questions.ask("boss", "operator", "q?", None)
    store.questions.answer(q.id, "operator", "a")
    a = store.approvals.request("boss", "custom", "d", {})
    store.approvals.resolve(a.id, "approved", None, kinds.Custom().apply)
    store.reminders.add("boss", 0, "r")
    store.reminders.deliver_due(1.0)
    store.egress.add_rule("boss", "b.example:443", "operator")
    store.egress.remove_rule("boss", "b.example:443")
    store.transcripts.add("boss", m.id, [("text", {"t": 1})])
    store.history.prune("boss")
    store.agents.get("boss")
    assert reads[0] == 1, "a write that leaves the agents table alone dropped the cache"
    store.agents.create("kid", SPEC, "boss", "operator")
    assert _row(store, "kid").parent == "boss" and reads[0] == 2


def _fresh(store: Store) -> dict[str, AgentRow]:
    """The agents table as a read of the database gives it now (the cache bypassed)."""
    return AgentRepo(store.db)._table()


def test_a_write_of_one_row_updates_the_cache_in_place(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start, stop, pause, status, move or new limits writes one agent's row: the table
    is not read again (it was, whole, for each: O(agents) per cold start), and what the
    cache then holds is what the database holds."""
    store.agents.create("kid", SPEC, "boss", "operator")
    reads = rows_read(store, monkeypatch)
    store.agents.all()
    writes = [
        lambda: store.agents.set_flag("kid", "paused", True),
        lambda: store.agents.set_flag("kid", "stopped", True),
        lambda: store.agents.set_flag("kid", "paused", False),
        lambda: store.agents.set_status_text("kid", "busy"),
        lambda: store.agents.set_parent("kid", None),
        lambda: store.agents.set_spec("kid", SPEC.model_copy(update={"memory_mib": 300})),
        lambda: store.agents.set_flag("nobody", "paused", True),  # no such row: nothing
    ]
    for write in writes:
        write()
        assert {r.name: r for r in store.agents.all()} == _fresh(store)
    assert reads[0] == 1, "a write of one agent's row read the whole table again"
    kid = _row(store, "kid")
    assert (kid.paused, kid.stopped, kid.status_text, kid.parent) == (False, True, "busy", None)
    assert kid.spec.memory_mib == 300 and [r.name for r in store.agents.all()] == ["boss", "kid"]


def test_a_failed_write_of_one_row_leaves_no_stale_cache(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.agents.get("boss")

    def full(*args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as m:
        m.setattr("hyperhive.core.store.db.Tx.execute", full)
        with pytest.raises(StoreError):
            store.agents.set_flag("boss", "paused", True)
    assert not _row(store, "boss").paused and store.agents.all() == list(_fresh(store).values())


def test_a_failed_agent_write_drops_the_cache_too(store: Store) -> None:
    store.agents.get("boss")
    with pytest.raises(StoreError):  # the name is taken: the insert fails, nothing changes
        store.agents.create("boss", SPEC, None, "operator")
    assert [r.name for r in store.agents.all()] == ["boss"]


# -- rows ------------------------------------------------------------------------------


def test_rows_are_frozen(store: Store) -> None:
    row = store.agents.get("boss")
    assert isinstance(row, AgentRow)
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.paused = True  # type: ignore[misc]  # what the test checks: refused
    with pytest.raises((AttributeError, TypeError)):  # slots: no new attribute either
        row.extra = 1  # type: ignore[attr-defined]  # what the test checks: refused
    usage = store.usage.of("boss")
    assert isinstance(usage, Usage) and usage == (0, 0, 0, 0)
    with pytest.raises(AttributeError):
        usage.rows = 1  # type: ignore[misc]  # what the test checks: refused


# -- the approval transaction handle --------------------------------------------------------


def test_the_handle_offers_three_things_and_dies_with_the_transaction(store: Store) -> None:
    seen: list[ApprovalTx] = []

    def apply(tx: ApprovalTx, approval: Approval) -> None:
        seen.append(tx)
        assert tx.agent_exists("boss") and not tx.agent_exists("nobody")

    a = store.approvals.request("boss", "custom", "d", {})
    store.approvals.resolve(a.id, "approved", None, apply)
    (tx,) = seen
    public = {n for n in dir(tx) if not n.startswith("_")}
    assert public - {"close", "wrote_agents"} == {"agent_exists", "create_agent", "add_egress_rule"}
    assert not isinstance(getattr(tx, "_tx", None), sqlite3.Connection)
    with pytest.raises(RuntimeError):
        tx.add_egress_rule("boss", "late.example:443", "approval")
    assert "late.example:443" not in {r["rule"] for r in store.egress.rules("boss")["boss"]}


def test_spawn_applies_through_the_handle(store: Store) -> None:
    payload = {"name": "kid", "spec": SPEC.model_dump(mode="json")}
    a = store.approvals.request("boss", "spawn", "d", payload)
    store.agents.get("kid")  # the cache is warm: approving must still show the new agent
    approval, msg = store.approvals.resolve(a.id, "approved", None, kinds.Spawn().apply)
    assert approval.status == "approved" and msg.body == "approved"
    kid = store.agents.get("kid")
    assert kid is not None and kid.parent == "boss" and kid.origin == "spawn"
    assert [r["rule"] for r in store.egress.rules("kid")["kid"]] == ["a.example:443"]


def test_an_apply_error_undoes_what_apply_did(store: Store) -> None:
    def apply(tx: ApprovalTx, approval: Approval) -> None:
        tx.create_agent("kid", SPEC, "boss", "spawn")
        tx.add_egress_rule("boss", "b.example:443", "approval")
        assert tx.agent_exists("kid")  # seen inside the transaction
        raise ApplyError("changed my mind")

    a = store.approvals.request("boss", "custom", "d", {})
    store.agents.get("boss")
    approval, msg = store.approvals.resolve(a.id, "approved", None, apply)
    assert approval.status == "failed" and approval.note == "changed my mind"
    assert msg.body == "failed: changed my mind" and msg.to == "boss"
    assert store.agents.get("kid") is None, "the cache kept an agent the rollback undid"
    assert store.egress.rules("kid") == {}
    assert [r["rule"] for r in store.egress.rules("boss")["boss"]] == ["a.example:443"]
    assert store.usage.of("boss")[:2] == (0, 0)  # the approval no longer held


def test_an_apply_error_of_egress_kind(store: Store) -> None:
    a = store.approvals.request("boss", "egress", "d", {"host": "c.example", "port": 443})
    store.agents.delete("boss")
    with pytest.raises(Conflict):  # cancelled with its agent
        store.approvals.resolve(a.id, "approved", None, kinds.Egress().apply)
    store.agents.create("boss", SPEC, None, "operator")
    b = store.approvals.request("boss", "egress", "d", {"host": "c.example", "port": 443})
    approval, _ = store.approvals.resolve(b.id, "approved", None, kinds.Egress().apply)
    assert approval.status == "approved"
    assert "c.example:443" in {r["rule"] for r in store.egress.rules("boss")["boss"]}


def test_a_question_of_a_destroyed_agent_reads_as_cancelled(store: Store) -> None:
    """Red team round 24 noticed: the whole read of a question cancelled with its asker
    looked like an open one (no answer, nothing more). Now it says ``cancelled``; an open
    or answered question has no such field (hyperhive's rows don't)."""
    from hyperhive.wire.framing import model_fields_only

    store.agents.create("kid", SPEC, None, "operator")
    open_q, _ = store.questions.ask("boss", "operator", "still open?", None)
    gone_q, _ = store.questions.ask("kid", "operator", "will I be cancelled?", ["yes"])
    store.agents.delete("kid")
    gone, still = store.questions.get(gone_q.id), store.questions.get(open_q.id)
    assert gone is not None and still is not None
    assert model_fields_only(gone)["cancelled"] is True  # type: ignore[arg-type]
    assert "cancelled" not in model_fields_only(still)  # type: ignore[arg-type]
    with pytest.raises(Conflict, match="was cancelled"):
        store.questions.answer(gone_q.id, "operator", "yes")


# -- the schema --------------------------------------------------------------------------------


def test_a_hive_db_of_every_earlier_version_opens(tmp_path: Path) -> None:
    for version in range(len(MIGRATIONS) + 1):
        path = tmp_path / f"v{version}.db"
        Store(path).close() if version == len(MIGRATIONS) else store_at_version(path, version)
        s = Store(path)
        assert s.schema_version == len(MIGRATIONS)
        s.close()


def test_migration_6_keeps_rows_ids_and_triggers_and_puts_summaries_first(tmp_path: Path) -> None:
    path = tmp_path / "v5.db"
    store_at_version(path, 5)
    db = sqlite3.connect(path, isolation_level=None)
    long = "é" * 3000  # 6000 bytes: cut in listings
    db.execute("INSERT INTO messages (recipient, sender, kind, body, sent_at) VALUES ('bob', 'alice', 'message', ?, 1)", (long,))
    db.execute("INSERT INTO messages (recipient, sender, kind, body, sent_at) VALUES ('bob', 'alice', 'message', 'gone', 2)")
    db.execute("DELETE FROM messages WHERE id = 2")  # its id must not come back
    db.execute("INSERT INTO questions (asker, target, question, options, asked_at) VALUES ('alice', 'operator', ?, '[\"a\"]', 3)", (long,))
    db.execute("INSERT INTO approvals (agent, kind, description, payload, payload_sha256, requested_at) VALUES ('alice', 'custom', 'd', ?, 'x', 4)", (f'"{long}"',))
    triggers = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type IN ('trigger', 'index')")}
    usage = db.execute("SELECT pending, bytes FROM agent_usage WHERE agent='alice'").fetchone()
    db.close()

    s = Store(path)
    try:
        conn = s.db.conn
        assert s.schema_version == len(MIGRATIONS)
        # Migration 9 drops the insert's and the ack's usage triggers (the code counts those);
        # migration 10 adds the fair first screen's two partial indexes, 11 the inbox's;
        # 14 puts each transcript entry's size in its index; 15 counts each agent's
        # undelivered reminders from its own rows.
        kept = triggers - {"usage_message_in", "usage_message_acked", "transcript_agent"}
        kept |= {"questions_open_asker", "approvals_pending_agent", "messages_operator"}
        kept |= {"transcript_agent_size", "reminders_pending"}
        assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('trigger', 'index')")} == kept
        assert conn.execute("SELECT pending, bytes FROM agent_usage WHERE agent='alice'").fetchone() == usage
        # The summary columns come before the long ones, and are filled for old rows.
        names = [r[1] for r in conn.execute("PRAGMA table_xinfo(messages)")]
        assert names.index("body_head") < names.index("body") and names[-1] == "body"
        assert conn.execute("SELECT body_bytes, length(body_head) FROM messages WHERE id=1").fetchone() == (6000, 2048)
        m = s.messages.get(1)
        assert m is not None and getattr(m, "body", None) == long
        new_id = conn.execute("INSERT INTO messages (recipient, sender, kind, body, sent_at) VALUES ('bob', 'alice', 'message', 'x', 5) RETURNING id").fetchone()[0]
        assert new_id == 3
        # The payload stays immutable (its trigger was made again).
        with pytest.raises(sqlite3.IntegrityError, match="immutable"):
            conn.execute("UPDATE approvals SET payload = '1' WHERE id = 1")
        # Listings read the summary columns: the question's text is cut.
        page = s.questions.open_page(target="operator", limit=10)
        q = page.items[0]
        assert getattr(q, "truncated", None) == {"question": 6000}
    finally:
        s.close()


@pytest.mark.parametrize("many", [False, True], ids=["one id", "several ids"])
def test_an_ack_takes_only_the_recipients_messages(store: Store, many: bool) -> None:
    """One id (its own path, a receiver's usual ack) or several: another's message or a
    missing id refuses the ack whole, nothing written; acking twice counts 0; usage drops."""
    mine = store.messages.send("bob", "boss", "message", "for bob").id
    other = store.messages.send("carol", "boss", "message", "for carol").id
    extra = [store.messages.send("bob", "boss", "message", "too").id] if many else []
    for bad in (other, other + 1000):
        with pytest.raises(NotFound, match=f"no message {bad} in this inbox"):
            store.messages.ack("bob", [*extra, bad])
    assert store.usage.of("boss").rows == 2 + len(extra)  # nothing acked
    assert store.messages.ack("bob", [mine, *extra]) == 1 + len(extra)
    assert store.messages.ack("bob", [mine, *extra]) == 0
    assert store.usage.of("boss").rows == 1
    assert [m.id for m in store.messages.unacked("bob", 10, set())] == []
    assert [m.id for m in store.messages.unacked("carol", 10, set())] == [other]


def test_a_rider_at_completion_rides_only_the_completing_write(store: Store) -> None:
    """A carried lifecycle verb's mark (swarm/opstore.py) commits with the write that
    completes the verb (``completing``), or in ``completed()``'s transaction of its own,
    never with an earlier step; with no rider, ``completed()`` commits nothing."""
    from hyperhive.core.store.db import completing, riding

    rode: list[str] = []
    commits = store.db.commits
    store.db.completed()  # no rider: no transaction at all
    assert store.db.commits == commits
    with riding(lambda tx: rode.append("rode"), at_completion=True):
        store.agents.set_flag("boss", "stopped", True)  # an earlier step: not marked
        assert rode == []
        with completing():
            store.agents.set_flag("boss", "stopped", False)
        assert rode == ["rode"]
        store.db.completed()
        assert rode == ["rode", "rode"]
    with riding(lambda tx: rode.append("any")):  # a store verb's: every write
        store.agents.set_flag("boss", "paused", True)
    assert rode == ["rode", "rode", "any"]
    store.db.completed()  # the rider's block ended: nothing rides, nothing commits
    assert rode[-1] == "any"


# -- the WAL checkpoint's connection ---------------------------------------------------


def _open_files(path: Path) -> dict[str, list[int]]:
    """This process's descriptors of ``path`` and its WAL and shm files, by file name."""
    found: dict[str, list[int]] = {}
    for fd in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the listing's own descriptor, closed by now
            continue
        if target.startswith(str(path)):
            found.setdefault(Path(target).name, []).append(int(fd))
    return found


def test_checkpoints_leave_hive_db_one_descriptor_for_the_next(store: Store) -> None:
    """The daemon checkpoints every second, each time on a connection of its own in a
    thread (asyncio.to_thread). Closed, that connection leaves one descriptor of hive.db
    open (the main connection's lock on it would go with a close: Database.checkpoint),
    which the next checkpoint takes again: after 50 checkpoints between writes, hive.db
    has two descriptors (the main connection's and that one, the same each time), its
    WAL and shm one each; and none is left once the store closes."""
    path = store.db.path
    store.agents.set_status_text("boss", "before")
    assert {k: len(v) for k, v in _open_files(path).items()} == {"hive.db": 1, "hive.db-wal": 1, "hive.db-shm": 1}
    main = _open_files(path)["hive.db"]
    kept: set[int] = set()
    for i in range(50):
        store.agents.set_status_text("boss", f"turn {i}")
        t = threading.Thread(target=store.checkpoint)
        t.start()
        t.join()
        files = _open_files(path)
        assert {k: len(v) for k, v in files.items()} == {"hive.db": 2, "hive.db-wal": 1, "hive.db-shm": 1}, (i, files)
        kept |= set(files["hive.db"]) - set(main)
    assert len(kept) == 1, kept  # one descriptor, taken again by each checkpoint
    store.close()
    assert _open_files(path) == {}


# -- hive.toml against the rows (red team round 24) ------------------------------------


def test_hive_toml_never_adopts_a_spawned_agent_of_a_declared_name(store: Store) -> None:
    """A declared name held by a spawned agent: the start is refused in one line and
    nothing changes (adopting it kept its parent and home, with hive.toml's grants)."""
    from hyperhive.core.store.agents import DeclaredNameTaken

    store.agents.create("kid", SPEC, "boss", "spawn")
    with pytest.raises(DeclaredNameTaken) as e:
        store.agents.sync_config({"boss": SPEC, "kid": SPEC, "new": SPEC})
    assert str(e.value) == (
        "hive.toml declares agent 'kid', but 'kid' is an agent spawned by 'boss', not one"
        " hive.toml made: rename it in hive.toml, or take it out, start the hive and"
        " `hive destroy kid` first; nothing was changed"
    )
    assert _row(store, "kid").parent == "boss" and _row(store, "kid").origin == "spawn"
    assert store.agents.get("new") is None


def test_an_agent_out_of_hive_toml_leaves_no_binding_to_its_name(store: Store) -> None:
    """Taken out of hive.toml, an agent's row goes with the operator's bindings of it (a
    later agent of its name got them), and sync_config names it for its cage's destroy."""
    store.agents.sync_config({"boss": SPEC, "gone": SPEC})
    store.bindings.bind(
        "key", ["gone"], "a.example", 443, "authorization: Bearer {}", None, "operator", "PH"
    )
    assert [b.agent for b in store.bindings.all()] == ["gone"]
    assert store.agents.sync_config({"boss": SPEC}) == (["gone"], [])
    assert store.bindings.all() == []
    assert store.agents.get("gone") is None

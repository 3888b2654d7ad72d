"""All of the hive's state, in SQLite (WAL), with versioned migrations.

Every method that changes state commits before it returns, so a response that
acknowledges a change is only sent once the change is in the database. Compound
changes (answering a question *and* delivering the answer) are one transaction.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hyperhive.core.refusals import Conflict, NotFound
from hyperhive.wire.common import AgentSpec, Approval, Message, Question

MIGRATIONS: list[str] = [
    # 1: the initial schema
    """
    CREATE TABLE agents (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        parent TEXT,
        origin TEXT NOT NULL CHECK (origin IN ('config', 'spawn', 'operator')),
        paused INTEGER NOT NULL DEFAULT 0,
        stopped INTEGER NOT NULL DEFAULT 0,
        status_text TEXT,
        status_set_at REAL,
        created_at REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        recipient TEXT NOT NULL,
        sender TEXT NOT NULL,
        kind TEXT NOT NULL,
        body TEXT NOT NULL,
        ref INTEGER,
        options TEXT,
        sent_at REAL NOT NULL,
        acked_at REAL
    );
    CREATE INDEX messages_unacked ON messages (recipient, id) WHERE acked_at IS NULL;
    CREATE TABLE questions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        asker TEXT NOT NULL,
        target TEXT NOT NULL,
        question TEXT NOT NULL,
        options TEXT,
        asked_at REAL NOT NULL,
        answer TEXT,
        answered_at REAL,
        cancelled INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX questions_open ON questions (target) WHERE answer IS NULL AND cancelled = 0;
    CREATE TABLE approvals (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        agent TEXT NOT NULL,
        kind TEXT NOT NULL,
        description TEXT NOT NULL,
        payload TEXT NOT NULL,
        payload_sha256 TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'approved', 'denied', 'failed', 'cancelled')),
        requested_at REAL NOT NULL,
        resolved_at REAL,
        note TEXT
    );
    -- The payload the operator saw is the payload that is applied: never updated.
    CREATE TRIGGER approvals_payload_immutable BEFORE UPDATE OF payload, payload_sha256, kind, agent
    ON approvals BEGIN SELECT RAISE(ABORT, 'approval payload is immutable'); END;
    CREATE TABLE reminders (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        agent TEXT NOT NULL,
        due_at REAL NOT NULL,
        text TEXT NOT NULL,
        created_at REAL NOT NULL,
        delivered_at REAL
    );
    CREATE INDEX reminders_due ON reminders (due_at) WHERE delivered_at IS NULL;
    """,
    # 2: turn transcripts, written by each agent's harness
    """
    CREATE TABLE transcript (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        agent TEXT NOT NULL,
        turn INTEGER NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX transcript_agent ON transcript (agent, id);
    """,
    # 3: egress allowlists and the log of every egress decision
    """
    CREATE TABLE egress_rules (
        agent TEXT NOT NULL,
        rule TEXT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('spec', 'approval', 'operator')),
        added_at REAL NOT NULL,
        PRIMARY KEY (agent, rule)
    );
    INSERT INTO egress_rules (agent, rule, source, added_at)
        SELECT agents.name, value, 'spec', agents.created_at FROM agents, json_each(agents.spec, '$.egress');
    CREATE TABLE egress_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        agent TEXT NOT NULL,
        at REAL NOT NULL,
        host TEXT NOT NULL,
        port INTEGER NOT NULL,
        address TEXT,
        allowed INTEGER NOT NULL,
        reason TEXT NOT NULL,
        bytes_up INTEGER NOT NULL DEFAULT 0,
        bytes_down INTEGER NOT NULL DEFAULT 0,
        closed_at REAL
    );
    CREATE INDEX egress_log_agent ON egress_log (agent, id);
    """,
    # 4: the operator's web sessions, so a core restart doesn't log the operator out
    """
    CREATE TABLE sessions (
        id_sha256 TEXT PRIMARY KEY,
        csrf TEXT NOT NULL,
        expires REAL NOT NULL,
        token_sha256 TEXT NOT NULL
    );
    """,
    # 5: what each agent holds in the hive (its storage quota), kept by triggers in the
    # same transaction as every change, so a check is one primary-key read, never a SUM.
    # Held: messages it sent that are not acked (messages to the operator are never acked:
    # op_* counts those apart, the oldest of them make room), its open questions, its
    # pending approvals and its undelivered reminders. Bytes are the stored text.
    """
    CREATE TABLE agent_usage (
        agent TEXT PRIMARY KEY,
        pending INTEGER NOT NULL DEFAULT 0,
        bytes INTEGER NOT NULL DEFAULT 0,
        op_pending INTEGER NOT NULL DEFAULT 0,
        op_bytes INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX messages_to_operator ON messages (sender, id) WHERE recipient = 'operator';
    CREATE INDEX messages_acked ON messages (recipient, id) WHERE acked_at IS NOT NULL;
    CREATE INDEX questions_asker ON questions (asker, id);
    CREATE INDEX approvals_agent ON approvals (agent, id);
    CREATE INDEX reminders_agent ON reminders (agent, id);
    INSERT INTO agent_usage (agent, pending, bytes, op_pending, op_bytes)
        SELECT who, SUM(n), SUM(b), SUM(op), SUM(op * b) FROM (
            SELECT sender AS who, 1 AS n, length(CAST(body AS BLOB)) + coalesce(length(CAST(options AS BLOB)), 0)
                AS b, recipient = 'operator' AS op FROM messages WHERE acked_at IS NULL
            UNION ALL SELECT asker, 1, length(CAST(question AS BLOB)) + coalesce(length(CAST(options AS BLOB)), 0),
                0 FROM questions WHERE answer IS NULL AND cancelled = 0
            UNION ALL SELECT agent, 1, length(CAST(kind AS BLOB)) + length(CAST(description AS BLOB))
                + length(CAST(payload AS BLOB)), 0 FROM approvals WHERE status = 'pending'
            UNION ALL SELECT agent, 1, length(CAST(text AS BLOB)), 0 FROM reminders WHERE delivered_at IS NULL
        ) GROUP BY who;
    CREATE TRIGGER usage_message_in AFTER INSERT ON messages WHEN NEW.acked_at IS NULL BEGIN
        INSERT INTO agent_usage (agent, pending, bytes, op_pending, op_bytes) VALUES (NEW.sender, 1,
            length(CAST(NEW.body AS BLOB)) + coalesce(length(CAST(NEW.options AS BLOB)), 0),
            NEW.recipient = 'operator',
            (NEW.recipient = 'operator') * (length(CAST(NEW.body AS BLOB)) + coalesce(length(CAST(NEW.options AS BLOB)), 0)))
        ON CONFLICT (agent) DO UPDATE SET pending = pending + 1, bytes = bytes + excluded.bytes,
            op_pending = op_pending + excluded.op_pending, op_bytes = op_bytes + excluded.op_bytes;
    END;
    CREATE TRIGGER usage_message_acked AFTER UPDATE OF acked_at ON messages
    WHEN OLD.acked_at IS NULL AND NEW.acked_at IS NOT NULL BEGIN
        UPDATE agent_usage SET pending = pending - 1,
            bytes = bytes - length(CAST(OLD.body AS BLOB)) - coalesce(length(CAST(OLD.options AS BLOB)), 0),
            op_pending = op_pending - (OLD.recipient = 'operator'),
            op_bytes = op_bytes - (OLD.recipient = 'operator')
                * (length(CAST(OLD.body AS BLOB)) + coalesce(length(CAST(OLD.options AS BLOB)), 0))
        WHERE agent = OLD.sender;
    END;
    CREATE TRIGGER usage_message_out AFTER DELETE ON messages WHEN OLD.acked_at IS NULL BEGIN
        UPDATE agent_usage SET pending = pending - 1,
            bytes = bytes - length(CAST(OLD.body AS BLOB)) - coalesce(length(CAST(OLD.options AS BLOB)), 0),
            op_pending = op_pending - (OLD.recipient = 'operator'),
            op_bytes = op_bytes - (OLD.recipient = 'operator')
                * (length(CAST(OLD.body AS BLOB)) + coalesce(length(CAST(OLD.options AS BLOB)), 0))
        WHERE agent = OLD.sender;
    END;
    CREATE TRIGGER usage_question_in AFTER INSERT ON questions WHEN NEW.answer IS NULL AND NEW.cancelled = 0 BEGIN
        INSERT INTO agent_usage (agent, pending, bytes) VALUES (NEW.asker, 1,
            length(CAST(NEW.question AS BLOB)) + coalesce(length(CAST(NEW.options AS BLOB)), 0))
        ON CONFLICT (agent) DO UPDATE SET pending = pending + 1, bytes = bytes + excluded.bytes;
    END;
    CREATE TRIGGER usage_question_closed AFTER UPDATE OF answer, cancelled ON questions
    WHEN OLD.answer IS NULL AND OLD.cancelled = 0 AND (NEW.answer IS NOT NULL OR NEW.cancelled != 0) BEGIN
        UPDATE agent_usage SET pending = pending - 1,
            bytes = bytes - length(CAST(OLD.question AS BLOB)) - coalesce(length(CAST(OLD.options AS BLOB)), 0)
        WHERE agent = OLD.asker;
    END;
    CREATE TRIGGER usage_question_out AFTER DELETE ON questions WHEN OLD.answer IS NULL AND OLD.cancelled = 0 BEGIN
        UPDATE agent_usage SET pending = pending - 1,
            bytes = bytes - length(CAST(OLD.question AS BLOB)) - coalesce(length(CAST(OLD.options AS BLOB)), 0)
        WHERE agent = OLD.asker;
    END;
    CREATE TRIGGER usage_approval_in AFTER INSERT ON approvals WHEN NEW.status = 'pending' BEGIN
        INSERT INTO agent_usage (agent, pending, bytes) VALUES (NEW.agent, 1, length(CAST(NEW.kind AS BLOB))
            + length(CAST(NEW.description AS BLOB)) + length(CAST(NEW.payload AS BLOB)))
        ON CONFLICT (agent) DO UPDATE SET pending = pending + 1, bytes = bytes + excluded.bytes;
    END;
    CREATE TRIGGER usage_approval_resolved AFTER UPDATE OF status ON approvals
    WHEN OLD.status = 'pending' AND NEW.status != 'pending' BEGIN
        UPDATE agent_usage SET pending = pending - 1, bytes = bytes - length(CAST(OLD.kind AS BLOB))
            - length(CAST(OLD.description AS BLOB)) - length(CAST(OLD.payload AS BLOB))
        WHERE agent = OLD.agent;
    END;
    CREATE TRIGGER usage_approval_out AFTER DELETE ON approvals WHEN OLD.status = 'pending' BEGIN
        UPDATE agent_usage SET pending = pending - 1, bytes = bytes - length(CAST(OLD.kind AS BLOB))
            - length(CAST(OLD.description AS BLOB)) - length(CAST(OLD.payload AS BLOB))
        WHERE agent = OLD.agent;
    END;
    CREATE TRIGGER usage_reminder_in AFTER INSERT ON reminders WHEN NEW.delivered_at IS NULL BEGIN
        INSERT INTO agent_usage (agent, pending, bytes) VALUES (NEW.agent, 1, length(CAST(NEW.text AS BLOB)))
        ON CONFLICT (agent) DO UPDATE SET pending = pending + 1, bytes = bytes + excluded.bytes;
    END;
    CREATE TRIGGER usage_reminder_delivered AFTER UPDATE OF delivered_at ON reminders
    WHEN OLD.delivered_at IS NULL AND NEW.delivered_at IS NOT NULL BEGIN
        UPDATE agent_usage SET pending = pending - 1, bytes = bytes - length(CAST(OLD.text AS BLOB))
        WHERE agent = OLD.agent;
    END;
    CREATE TRIGGER usage_reminder_out AFTER DELETE ON reminders WHEN OLD.delivered_at IS NULL BEGIN
        UPDATE agent_usage SET pending = pending - 1, bytes = bytes - length(CAST(OLD.text AS BLOB))
        WHERE agent = OLD.agent;
    END;
    """,
]
TRANSCRIPT_KEEP = 20_000  # entries per agent
EGRESS_LOG_KEEP = 5_000  # decisions per agent (the default of [limits] history_keep)
EGRESS_PRUNE_EVERY = 16  # decisions of one agent between two prunes of its log


class ApplyError(Exception):
    """Applying an approved payload failed; the approval becomes ``failed`` with this note."""


class StoreError(Exception):
    """A storage failure, phrased for the caller (e.g. a full disk)."""


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _opts(raw: str | None) -> list[str] | None:
    return None if raw is None else json.loads(raw)


class _Egress:
    """Egress rules and the decision log (mixed into Store)."""

    db: sqlite3.Connection
    tx: Callable[..., Any]
    history_keep: int
    _egress_since_prune: dict[str, int]

    def egress_rules(self, agent: str | None = None) -> dict[str, list[dict[str, Any]]]:
        sql = "SELECT * FROM egress_rules" + (" WHERE agent=?" if agent else "") + " ORDER BY agent, rule"
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self.db.execute(sql, (agent,) if agent else ()):
            out.setdefault(r["agent"], []).append({"rule": r["rule"], "source": r["source"], "added_at": r["added_at"]})
        return out

    def add_egress_rule(self, agent: str, rule: str, source: str) -> bool:
        with self.tx(agents_unchanged=True) as db:
            return self._add_egress_rule(db, agent, rule, source)

    @staticmethod
    def _add_egress_rule(db: sqlite3.Connection, agent: str, rule: str, source: str) -> bool:
        cur = db.execute(
            "INSERT OR IGNORE INTO egress_rules (agent, rule, source, added_at) VALUES (?, ?, ?, ?)",
            (agent, rule, source, time.time()),
        )
        return cur.rowcount == 1

    def remove_egress_rule(self, agent: str, rule: str) -> bool:
        with self.tx(agents_unchanged=True) as db:
            return db.execute("DELETE FROM egress_rules WHERE agent=? AND rule=?", (agent, rule)).rowcount == 1

    def log_egress(self, row: dict[str, Any]) -> int:
        with self.tx(agents_unchanged=True) as db:
            cur = db.execute(
                "INSERT INTO egress_log (agent, at, host, port, address, allowed, reason, bytes_up, bytes_down,"
                " closed_at) VALUES (:agent, :at, :host, :port, :address, :allowed, :reason, :bytes_up,"
                " :bytes_down, :closed_at)", row,
            )
            rowid = int(cur.lastrowid or 0)
            # Every EGRESS_PRUNE_EVERY decisions of this agent: keep its newest history_keep,
            # so one agent's traffic can't grow the log (and hive.db) without bound.
            since = self._egress_since_prune.get(row["agent"], 0) + 1
            if since >= min(EGRESS_PRUNE_EVERY, self.history_keep):
                since = 0
                db.execute(
                    "DELETE FROM egress_log WHERE agent=? AND id <= (SELECT id FROM egress_log WHERE agent=?"
                    " ORDER BY id DESC LIMIT 1 OFFSET ?)", (row["agent"], row["agent"], self.history_keep),
                )
            self._egress_since_prune[row["agent"]] = since
            return rowid

    def close_egress(self, rowid: int, bytes_up: int, bytes_down: int, closed_at: float) -> None:
        with self.tx(agents_unchanged=True) as db:
            db.execute("UPDATE egress_log SET bytes_up=?, bytes_down=?, closed_at=? WHERE id=?",
                       (bytes_up, bytes_down, closed_at, rowid))

    def egress_log(self, agent: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql = "SELECT * FROM egress_log" + (" WHERE agent=?" if agent else "") + " ORDER BY id DESC LIMIT ?"
        rows = self.db.execute(sql, (agent, limit) if agent else (limit,)).fetchall()
        return [{**dict(r), "allowed": bool(r["allowed"])} for r in rows]


class _Sessions:
    """The operator's web sessions (mixed into Store). Only a hash of each session id
    is stored; ``token_sha256`` ties a session to the login token it was made with."""

    db: sqlite3.Connection
    tx: Callable[..., Any]

    def sessions(self, token_sha256: str, now: float) -> list[tuple[str, str, float]]:
        rows = self.db.execute(
            "SELECT id_sha256, csrf, expires FROM sessions WHERE token_sha256=? AND expires > ?",
            (token_sha256, now),
        ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def save_session(self, id_sha256: str, csrf: str, expires: float, token_sha256: str) -> None:
        with self.tx(agents_unchanged=True) as db:
            db.execute("DELETE FROM sessions WHERE expires <= ? OR token_sha256 != ?", (time.time(), token_sha256))
            db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)", (id_sha256, csrf, expires, token_sha256))

    def delete_session(self, id_sha256: str) -> None:
        with self.tx(agents_unchanged=True) as db:
            db.execute("DELETE FROM sessions WHERE id_sha256=?", (id_sha256,))


class Store(_Egress, _Sessions):
    def __init__(self, path: Path, synchronous: str = "NORMAL") -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a crash of the process (kill -9);
        # FULL also survives power loss, at an fsync per commit.
        self.db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=5000")
        # Checkpoints run from a thread (see checkpoint()), not inside a request.
        self.db.execute("PRAGMA wal_autocheckpoint=0")
        self._agents: dict[str, sqlite3.Row] | None = None  # cache of the agents table
        self.history_keep = EGRESS_LOG_KEEP  # per agent, of every log (hive.py sets [limits] history_keep)
        self._egress_since_prune: dict[str, int] = {}
        self.migrate()

    def close(self) -> None:
        self.db.close()

    # -- plumbing ---------------------------------------------------------------

    @contextmanager
    def tx(self, agents_unchanged: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back whole on any error. Unless the caller
        says it leaves the agents table alone, the agents cache is dropped."""
        if not agents_unchanged:
            self._agents = None
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise StoreError(f"storage error: {e}") from None
        try:
            yield self.db
        except sqlite3.Error as e:  # e.g. "database or disk is full" on an insert
            self._rollback()
            raise StoreError(f"storage error: {e}") from None
        except BaseException:
            self._rollback()
            raise
        try:
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise StoreError(f"storage error: {e}") from None
        finally:
            if not agents_unchanged:
                self._agents = None

    def _rollback(self) -> None:
        if self.db.in_transaction:  # SQLite may already have rolled back (e.g. SQLITE_FULL)
            self.db.execute("ROLLBACK")

    def checkpoint(self) -> None:
        """Copy the WAL into the database, on a connection of its own (call from a thread)."""
        db = sqlite3.connect(self.path, timeout=5)
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        current = self.schema_version
        if current > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {current}, newer than this hive ({len(MIGRATIONS)})"
            )
        for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
            with self.tx() as db:
                for statement in _split_sql(script):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={version}")
        if current < len(MIGRATIONS):
            # Migrations write many pages: leave no large WAL behind for later writes to reuse.
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- agents -------------------------------------------------------------------

    def _agent_table(self) -> dict[str, sqlite3.Row]:
        if self._agents is None:
            rows = self.db.execute("SELECT * FROM agents ORDER BY name").fetchall()
            self._agents = {r["name"]: r for r in rows}
        return self._agents

    def agent(self, name: str) -> sqlite3.Row | None:
        return self._agent_table().get(name)

    def agents(self) -> list[sqlite3.Row]:
        return list(self._agent_table().values())

    def sync_config_agents(self, declared: dict[str, AgentSpec]) -> None:
        """Make the config-declared agents match hive.toml; spawned agents are kept."""
        now = time.time()
        with self.tx() as db:
            for name, spec in declared.items():
                db.execute(
                    "INSERT INTO agents (name, spec, origin, created_at) VALUES (?, ?, 'config', ?)"
                    " ON CONFLICT(name) DO UPDATE SET spec=excluded.spec",
                    (name, spec.model_dump_json(), now),
                )
                # The spec's rules are hive.toml's; approved and operator-added ones stay.
                db.execute("DELETE FROM egress_rules WHERE agent=? AND source='spec'", (name,))
                self._add_spec_rules(db, name, spec, now)
            rows = db.execute("SELECT name FROM agents WHERE origin='config'").fetchall()
            for row in rows:
                if row["name"] not in declared:
                    self._delete_agent(db, row["name"])

    def create_agent(self, name: str, spec: AgentSpec, parent: str | None, origin: str) -> None:
        with self.tx() as db:
            self._create_agent(db, name, spec, parent, origin)

    @staticmethod
    def _create_agent(
        db: sqlite3.Connection, name: str, spec: AgentSpec, parent: str | None, origin: str
    ) -> None:
        db.execute(
            "INSERT INTO agents (name, spec, parent, origin, created_at) VALUES (?, ?, ?, ?, ?)",
            (name, spec.model_dump_json(), parent, origin, time.time()),
        )
        Store._add_spec_rules(db, name, spec, time.time())

    @staticmethod
    def _add_spec_rules(db: sqlite3.Connection, name: str, spec: AgentSpec, now: float) -> None:
        db.executemany(
            "INSERT OR IGNORE INTO egress_rules (agent, rule, source, added_at) VALUES (?, ?, 'spec', ?)",
            [(name, rule, now) for rule in spec.egress],
        )

    def delete_agent(self, name: str) -> None:
        with self.tx() as db:
            self._delete_agent(db, name)

    @staticmethod
    def _delete_agent(db: sqlite3.Connection, name: str) -> None:
        now = time.time()
        db.execute("DELETE FROM agents WHERE name=?", (name,))
        db.execute("DELETE FROM messages WHERE recipient=? AND acked_at IS NULL", (name,))
        db.execute("DELETE FROM reminders WHERE agent=? AND delivered_at IS NULL", (name,))
        db.execute(
            "UPDATE questions SET cancelled=1 WHERE (asker=? OR target=?) AND answer IS NULL",
            (name, name),
        )
        db.execute(
            "UPDATE approvals SET status='cancelled', resolved_at=?, note='agent destroyed'"
            " WHERE agent=? AND status='pending'",
            (now, name),
        )
        db.execute("UPDATE agents SET parent=NULL WHERE parent=?", (name,))
        db.execute("DELETE FROM transcript WHERE agent=?", (name,))
        db.execute("DELETE FROM egress_rules WHERE agent=?", (name,))

    def set_agent_flag(self, name: str, column: str, value: bool) -> None:
        assert column in ("paused", "stopped")
        with self.tx() as db:
            db.execute(f"UPDATE agents SET {column}=? WHERE name=?", (int(value), name))

    def set_status_text(self, name: str, text: str) -> float:
        now = time.time()
        with self.tx() as db:
            db.execute(
                "UPDATE agents SET status_text=?, status_set_at=? WHERE name=?", (text, now, name)
            )
        return now

    # -- messages -------------------------------------------------------------------

    @staticmethod
    def _insert_message(
        db: sqlite3.Connection,
        recipient: str,
        sender: str,
        kind: str,
        body: str,
        ref: int | None = None,
        options: list[str] | None = None,
    ) -> Message:
        now = time.time()
        cur = db.execute(
            "INSERT INTO messages (recipient, sender, kind, body, ref, options, sent_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (recipient, sender, kind, body, ref, None if options is None else json.dumps(options), now),
        )
        return Message(
            id=int(cur.lastrowid or 0), from_=sender, kind=kind, body=body, sent_at=now, ref=ref,
            options=options, to=recipient,
        )  # type: ignore[arg-type]

    def send(self, recipient: str, sender: str, kind: str, body: str, ref: int | None = None) -> Message:
        with self.tx(agents_unchanged=True) as db:
            return self._insert_message(db, recipient, sender, kind, body, ref)

    def send_many(self, batch: list[tuple[str, str, str, str]],
                  quota: tuple[int, int] | None = None) -> list[Message]:
        """(recipient, sender, kind, body) each, in order, in one transaction (group commit).
        With ``quota`` (rows, bytes one sender may hold), a message to the operator first
        drops the sender's oldest messages to the operator until it fits."""
        with self.tx(agents_unchanged=True) as db:
            out = []
            for item in batch:
                if quota is not None and item[0] == "operator":
                    self._make_room(db, item[1], len(item[3].encode()), quota)
                out.append(self._insert_message(db, *item))
            return out

    # -- storage quota ----------------------------------------------------------------

    def usage(self, agent: str) -> tuple[int, int, int, int]:
        """What ``agent`` holds: (rows, bytes, of which to the operator: rows, bytes)."""
        row = self.db.execute(
            "SELECT pending, bytes, op_pending, op_bytes FROM agent_usage WHERE agent=?", (agent,)
        ).fetchone()
        return (0, 0, 0, 0) if row is None else (row[0], row[1], row[2], row[3])

    @staticmethod
    def _make_room(db: sqlite3.Connection, sender: str, need: int, quota: tuple[int, int]) -> None:
        """Delete ``sender``'s oldest messages to the operator until one more of ``need``
        bytes fits its quota (or none is left). The triggers keep agent_usage right."""
        max_rows, max_bytes = quota
        while True:
            row = db.execute("SELECT pending, bytes FROM agent_usage WHERE agent=?", (sender,)).fetchone()
            if row is None or (row[0] + 1 <= max_rows and row[1] + need <= max_bytes):
                return
            oldest = db.execute(
                "SELECT id FROM messages WHERE sender=? AND recipient='operator' ORDER BY id LIMIT 64", (sender,)
            ).fetchall()
            if not oldest:
                return
            over_rows, over_bytes = row[0] + 1 - max_rows, row[1] + need - max_bytes
            for (mid,) in oldest:
                gone = db.execute(
                    "DELETE FROM messages WHERE id=? RETURNING length(CAST(body AS BLOB))"
                    " + coalesce(length(CAST(options AS BLOB)), 0)", (mid,)).fetchone()
                over_rows -= 1
                over_bytes -= gone[0] if gone else 0
                if over_rows <= 0 and over_bytes <= 0:
                    return

    def prune_history(self, agent: str) -> int:
        """Keep the newest ``history_keep`` of each of ``agent``'s logs: messages it acked,
        its resolved questions and approvals, its delivered reminders, its egress decisions
        and its messages to the operator. Returns how many rows went."""
        keep = self.history_keep
        gone = 0
        with self.tx(agents_unchanged=True) as db:
            for table, who, done in (
                ("messages", "recipient", "acked_at IS NOT NULL"),
                ("messages", "sender", "recipient = 'operator'"),
                ("questions", "asker", "(answer IS NOT NULL OR cancelled != 0)"),
                ("approvals", "agent", "status != 'pending'"),
                ("reminders", "agent", "delivered_at IS NOT NULL"),
                ("egress_log", "agent", "1"),
            ):
                gone += db.execute(
                    f"DELETE FROM {table} WHERE {who}=? AND {done} AND id <= (SELECT id FROM {table}"
                    f" WHERE {who}=? AND {done} ORDER BY id DESC LIMIT 1 OFFSET ?)", (agent, agent, keep),
                ).rowcount
        return gone

    @staticmethod
    def _row_to_message(row: sqlite3.Row, with_to: bool = False) -> Message:
        return Message(
            id=row["id"], from_=row["sender"], kind=row["kind"], body=row["body"],
            sent_at=row["sent_at"], ref=row["ref"], options=_opts(row["options"]),
            to=row["recipient"] if with_to else None,
        )  # type: ignore[arg-type]

    def unacked(self, recipient: str, limit: int, skip: set[int]) -> list[Message]:
        rows = self.db.execute(
            "SELECT * FROM messages WHERE recipient=? AND acked_at IS NULL ORDER BY id LIMIT ?",
            (recipient, limit + len(skip)),
        ).fetchall()
        return [self._row_to_message(r) for r in rows if r["id"] not in skip][:limit]

    def ack(self, recipient: str, ids: list[int]) -> int:
        """Ack ``ids``, all of which must be messages to ``recipient``. Returns how many were new."""
        unique = sorted(set(ids))
        with self.tx(agents_unchanged=True) as db:
            found = {
                r["id"]: r["acked_at"]
                for r in db.execute(
                    f"SELECT id, acked_at FROM messages WHERE recipient=? AND id IN ({','.join('?' * len(unique))})",
                    (recipient, *unique),
                )
            } if unique else {}
            missing = [i for i in unique if i not in found]
            if missing:
                raise NotFound(f"no message {missing[0]} in this inbox")
            fresh = [i for i in unique if found[i] is None]
            now = time.time()
            db.executemany("UPDATE messages SET acked_at=? WHERE id=?", [(now, i) for i in fresh])
        return len(fresh)

    def recent_messages(self, limit: int) -> list[Message]:
        rows = self.db.execute(
            "SELECT * FROM (SELECT * FROM messages ORDER BY id DESC LIMIT ?) ORDER BY id", (limit,)
        ).fetchall()
        return [self._row_to_message(r, with_to=True) for r in rows]

    def inbox(self, recipient: str, after: int, limit: int) -> list[Message]:
        rows = self.db.execute(
            "SELECT * FROM messages WHERE recipient=? AND id>? ORDER BY id LIMIT ?",
            (recipient, after, limit),
        ).fetchall()
        return [self._row_to_message(r, with_to=True) for r in rows]

    # -- questions -------------------------------------------------------------------

    @staticmethod
    def _row_to_question(row: sqlite3.Row) -> Question:
        return Question(
            id=row["id"], asker=row["asker"], to=row["target"], question=row["question"],
            options=_opts(row["options"]), asked_at=row["asked_at"], answer=row["answer"],
            answered_at=row["answered_at"],
        )

    def ask(self, asker: str, target: str, question: str, options: list[str] | None) -> tuple[Question, Message | None]:
        """Record a question; a question to an agent is also delivered to its inbox."""
        now = time.time()
        with self.tx(agents_unchanged=True) as db:
            cur = db.execute(
                "INSERT INTO questions (asker, target, question, options, asked_at) VALUES (?, ?, ?, ?, ?)",
                (asker, target, question, None if options is None else json.dumps(options), now),
            )
            qid = int(cur.lastrowid or 0)
            delivered = None
            if target != "operator":
                delivered = self._insert_message(db, target, asker, "question", question, qid, options)
        return Question(id=qid, asker=asker, to=target, question=question, options=options, asked_at=now), delivered

    def question(self, qid: int) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM questions WHERE id=?", (qid,)).fetchone()

    def answer(self, qid: int, target: str, answer: str) -> tuple[Question, Message]:
        """Answer question ``qid`` addressed to ``target``; deliver the answer to the asker."""
        now = time.time()
        with self.tx(agents_unchanged=True) as db:
            row = db.execute("SELECT * FROM questions WHERE id=?", (qid,)).fetchone()
            if row is None or row["target"] != target:
                # Same words whether it doesn't exist or isn't yours: no probing.
                raise NotFound(f"no question {qid} addressed to {target}")
            if row["cancelled"]:
                raise Conflict(f"question {qid} was cancelled")
            if row["answer"] is not None:
                raise Conflict(f"question {qid} is already answered")
            db.execute("UPDATE questions SET answer=?, answered_at=? WHERE id=?", (answer, now, qid))
            msg = self._insert_message(db, row["asker"], target, "answer", answer, qid)
            row = db.execute("SELECT * FROM questions WHERE id=?", (qid,)).fetchone()
        return self._row_to_question(row), msg

    def open_questions(self, *, target: str | None = None, asker: str | None = None) -> list[Question]:
        where, args = ["answer IS NULL", "cancelled=0"], []
        if target is not None:
            where.append("target=?")
            args.append(target)
        if asker is not None:
            where.append("asker=?")
            args.append(asker)
        rows = self.db.execute(
            f"SELECT * FROM questions WHERE {' AND '.join(where)} ORDER BY id", args
        ).fetchall()
        return [self._row_to_question(r) for r in rows]

    # -- approvals -------------------------------------------------------------------

    @staticmethod
    def _row_to_approval(row: sqlite3.Row) -> Approval:
        return Approval(
            id=row["id"], agent=row["agent"], kind=row["kind"], requested_at=row["requested_at"],
            status=row["status"], resolved_at=row["resolved_at"], note=row["note"],
            description=row["description"], payload=json.loads(row["payload"]),
            payload_sha256=row["payload_sha256"],
        )

    def request_approval(self, agent: str, kind: str, description: str, payload: Any) -> Approval:
        text = canonical_json(payload)
        now = time.time()
        with self.tx(agents_unchanged=True) as db:
            cur = db.execute(
                "INSERT INTO approvals (agent, kind, description, payload, payload_sha256, requested_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (agent, kind, description, text, sha256_hex(text), now),
            )
            row = db.execute("SELECT * FROM approvals WHERE id=?", (cur.lastrowid,)).fetchone()
        return self._row_to_approval(row)

    def approval(self, aid: int) -> Approval | None:
        row = self.db.execute("SELECT * FROM approvals WHERE id=?", (aid,)).fetchone()
        return None if row is None else self._row_to_approval(row)

    def approvals(self, *, status: str | None = None, agent: str | None = None) -> list[Approval]:
        where, args = [], []
        if status is not None:
            where.append("status=?")
            args.append(status)
        if agent is not None:
            where.append("agent=?")
            args.append(agent)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self.db.execute(f"SELECT * FROM approvals {clause} ORDER BY id", args).fetchall()
        return [self._row_to_approval(r) for r in rows]

    def resolve_approval(
        self,
        aid: int,
        decision: str,
        note: str | None,
        apply: Callable[[sqlite3.Connection, Approval], None] | None = None,
    ) -> tuple[Approval, Message]:
        """Approve or deny a pending approval, once, and tell the requester.

        ``apply`` runs inside the same transaction on the stored payload; if it
        raises ApplyError, its effects are undone and the approval is ``failed``.
        """
        assert decision in ("approved", "denied")
        now = time.time()
        with self.tx() as db:
            row = db.execute("SELECT * FROM approvals WHERE id=?", (aid,)).fetchone()
            if row is None:
                raise NotFound(f"no approval {aid}")
            if row["status"] != "pending":
                raise Conflict(f"approval {aid} is already {row['status']}")
            status = decision
            if decision == "approved" and apply is not None:
                db.execute("SAVEPOINT apply")
                try:
                    apply(db, self._row_to_approval(row))
                    db.execute("RELEASE apply")
                except ApplyError as e:
                    db.execute("ROLLBACK TO apply")
                    db.execute("RELEASE apply")
                    status, note = "failed", str(e)
            db.execute(
                "UPDATE approvals SET status=?, resolved_at=?, note=? WHERE id=?",
                (status, now, note, aid),
            )
            body = status if not note else f"{status}: {note}"
            msg = self._insert_message(db, row["agent"], "operator", "approval", body, aid)
            row = db.execute("SELECT * FROM approvals WHERE id=?", (aid,)).fetchone()
        return self._row_to_approval(row), msg

    # -- transcripts ------------------------------------------------------------------

    def add_transcript(self, agent: str, turn: int, entries: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        with self.tx(agents_unchanged=True) as db:
            for kind, data in entries:
                cur = db.execute(
                    "INSERT INTO transcript (agent, turn, kind, data, at) VALUES (?, ?, ?, ?, ?)",
                    (agent, turn, kind, canonical_json(data), now),
                )
                out.append({"id": cur.lastrowid, "turn": turn, "kind": kind, "data": data, "at": now})
        return out

    def finish_turn(self, agent: str, turn: int, end: dict[str, Any]) -> dict[str, Any]:
        """Record the end of a turn and ack its message, in one transaction; trim old entries."""
        now = time.time()
        with self.tx(agents_unchanged=True) as db:
            row = db.execute("SELECT acked_at FROM messages WHERE id=? AND recipient=?", (turn, agent)).fetchone()
            if row is None:
                raise NotFound(f"no message {turn} in this inbox")
            cur = db.execute(
                "INSERT INTO transcript (agent, turn, kind, data, at) VALUES (?, ?, 'exit', ?, ?)",
                (agent, turn, canonical_json(end), now),
            )
            if row["acked_at"] is None:
                db.execute("UPDATE messages SET acked_at=? WHERE id=?", (now, turn))
            db.execute(
                "DELETE FROM transcript WHERE agent=? AND id <= ("
                " SELECT id FROM transcript WHERE agent=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (agent, agent, TRANSCRIPT_KEEP),
            )
        return {"id": cur.lastrowid, "turn": turn, "kind": "exit", "data": end, "at": now}

    def transcript(self, agent: str, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT * FROM (SELECT * FROM transcript WHERE agent=? AND id>? ORDER BY id DESC LIMIT ?)"
            " ORDER BY id",
            (agent, after, limit),
        ).fetchall()
        return [
            {"id": r["id"], "turn": r["turn"], "kind": r["kind"], "data": json.loads(r["data"]), "at": r["at"]}
            for r in rows
        ]

    # -- reminders -------------------------------------------------------------------

    def add_reminder(self, agent: str, due_at: float, text: str) -> int:
        with self.tx(agents_unchanged=True) as db:
            cur = db.execute(
                "INSERT INTO reminders (agent, due_at, text, created_at) VALUES (?, ?, ?, ?)",
                (agent, due_at, text, time.time()),
            )
        return int(cur.lastrowid or 0)

    def next_reminder_due(self) -> float | None:
        row = self.db.execute("SELECT MIN(due_at) FROM reminders WHERE delivered_at IS NULL").fetchone()
        return row[0]

    def deliver_due_reminders(self, now: float) -> list[Message]:
        """Turn every due reminder into a ``reminder`` message, in one transaction."""
        with self.tx(agents_unchanged=True) as db:
            due = db.execute(
                "SELECT * FROM reminders WHERE delivered_at IS NULL AND due_at<=? ORDER BY due_at, id",
                (now,),
            ).fetchall()
            out = []
            for r in due:
                out.append(self._insert_message(db, r["agent"], "hive", "reminder", r["text"], r["id"]))
                db.execute("UPDATE reminders SET delivered_at=? WHERE id=?", (now, r["id"]))
        return out

    def pending_reminders(self) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT agent, COUNT(*) AS n FROM reminders WHERE delivered_at IS NULL GROUP BY agent"
        ).fetchall()
        return {r["agent"]: r["n"] for r in rows}


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies whole."""
    statements, buf = [], []
    for line in script.splitlines():
        buf.append(line)
        text = "\n".join(buf).strip()
        if text.endswith(";") and sqlite3.complete_statement(text):
            statements.append(text)
            buf = []
    if "\n".join(buf).strip():
        statements.append("\n".join(buf))
    return statements

"""The schema: versioned migrations, applied in order; ``PRAGMA user_version`` is how
many have run. Append only: an existing hive.db must open with any later version."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeAlias

from hyperhive.core.summary import CUT

# The migrations' text is kept byte-for-byte as first shipped, long lines and all.
# ruff: noqa: E501

# Each long agent-written column, by table. A listing shows the first CUT bytes of each.
LONG_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("body", "options"),
    "questions": ("question", "options", "answer"),
    "approvals": ("description", "payload"),
}


def _summary_columns(column: str) -> str:
    # CUT is written into the schema: changing it needs a migration.
    size = f"length(CAST({column} AS BLOB))"
    return (
        f"{column}_bytes INTEGER GENERATED ALWAYS AS"
        f" (CASE WHEN typeof({column}) = 'text' THEN {size} END) STORED,"
        f" {column}_head BLOB GENERATED ALWAYS AS (CASE WHEN typeof({column}) = 'text'"
        f" AND {size} > {CUT} THEN substr(CAST({column} AS BLOB), 1, {CUT}) END) STORED"
    )


# Migration 6 rebuilds the tables with every short column first, then each long column's
# length and first CUT bytes (stored generated columns, so no write path changes), then
# the long columns last: a listing reads a row's summary without walking its body's
# overflow pages (50 rows of 1 MiB bodies cost ~65 ms to summarise, ~1 ms this way).
_SUMMARIES_FIRST: dict[str, str] = {
    "messages": f"""
    CREATE TABLE messages_new (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        recipient TEXT NOT NULL,
        sender TEXT NOT NULL,
        kind TEXT NOT NULL,
        ref INTEGER,
        sent_at REAL NOT NULL,
        acked_at REAL,
        {_summary_columns("body")},
        {_summary_columns("options")},
        options TEXT,
        body TEXT NOT NULL
    )""",
    "questions": f"""
    CREATE TABLE questions_new (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        asker TEXT NOT NULL,
        target TEXT NOT NULL,
        asked_at REAL NOT NULL,
        answered_at REAL,
        cancelled INTEGER NOT NULL DEFAULT 0,
        {_summary_columns("question")},
        {_summary_columns("options")},
        {_summary_columns("answer")},
        answer TEXT,
        options TEXT,
        question TEXT NOT NULL
    )""",
    "approvals": f"""
    CREATE TABLE approvals_new (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        agent TEXT NOT NULL,
        kind TEXT NOT NULL,
        payload_sha256 TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'approved', 'denied', 'failed', 'cancelled')),
        requested_at REAL NOT NULL,
        resolved_at REAL,
        note TEXT,
        {_summary_columns("description")},
        {_summary_columns("payload")},
        description TEXT NOT NULL,
        payload TEXT NOT NULL
    )""",
}


class Executor(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> sqlite3.Cursor: ...


def _summaries_first(db: Executor) -> None:
    for table, create in _SUMMARIES_FIRST.items():
        # Its indexes and triggers go with the old table: made again, as they were.
        kept = [
            r[0]
            for r in db.execute(
                "SELECT sql FROM sqlite_master WHERE tbl_name=? AND type IN ('index', 'trigger')"
                " AND sql IS NOT NULL ORDER BY rowid",
                (table,),
            )
        ]
        seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name=?", (table,)).fetchone()
        db.execute(create)
        columns = ", ".join(
            r[1] for r in db.execute(f"PRAGMA table_xinfo({table}_new)") if r[6] == 0
        )
        db.execute(f"INSERT INTO {table}_new ({columns}) SELECT {columns} FROM {table}")
        db.execute(f"DROP TABLE {table}")
        db.execute(f"ALTER TABLE {table}_new RENAME TO {table}")
        # Ids are never reused, even those of rows already pruned.
        db.execute("DELETE FROM sqlite_sequence WHERE name=?", (table,))
        if seq is not None:
            db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, seq[0]))
        for sql in kept:
            db.execute(sql)


# Migration 14: each transcript entry's stored bytes (its kind and data), beside its id in
# the index so trimming the oldest reads no data pages, and each agent's entries and bytes,
# kept by store/transcripts.py in the same transaction as each change: the transcript is
# bounded in bytes as well as entries (red team round 26: 20,000 entries of escaped control
# characters held ~1.75 GiB). Old rows are not rewritten (that copied the whole old
# transcript into the WAL before the core served: red team round 27): past the default
# bounds (20,000 entries, 32 MiB) they are deleted, the rest keep size -1 and are measured
# from their data when trimmed.
_TRANSCRIPT_SIZES = """
    ALTER TABLE transcript ADD COLUMN size INTEGER NOT NULL DEFAULT -1;
    DELETE FROM transcript WHERE id IN (
        SELECT id FROM (
            SELECT id, row_number() OVER newest AS n,
                sum(length(CAST(kind AS BLOB)) + length(CAST(data AS BLOB))) OVER newest AS held
            FROM transcript WINDOW newest AS (PARTITION BY agent ORDER BY id DESC)
        ) WHERE n > 20000 OR held > 33554432
    );
    DROP INDEX IF EXISTS transcript_agent;
    CREATE INDEX transcript_agent_size ON transcript (agent, id, size);
    CREATE TABLE transcript_usage (
        agent TEXT PRIMARY KEY,
        entries INTEGER NOT NULL,
        bytes INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO transcript_usage (agent, entries, bytes)
        SELECT agent, count(*), sum(length(CAST(kind AS BLOB)) + length(CAST(data AS BLOB)))
        FROM transcript GROUP BY agent;
"""


def _transcript_sizes(db: Executor) -> None:
    # secure_delete FAST for the delete: Debian's SQLite zeroes freed pages by default,
    # which wrote every deleted row's pages into the WAL again (60 MiB for 60 MiB deleted).
    before = db.execute("PRAGMA secure_delete").fetchone()[0]
    db.execute("PRAGMA secure_delete=FAST")
    try:
        for statement in split_sql(_TRANSCRIPT_SIZES):
            db.execute(statement)
    finally:
        db.execute(f"PRAGMA secure_delete={int(before)}")


Migration: TypeAlias = "str | Callable[[Executor], None]"

MIGRATIONS: list[Migration] = [
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
    # 6: summaries before bodies (a function: see _summaries_first)
    _summaries_first,
    # 7: the one-use links notifications carry (core/notify.py): the sha256 of each token,
    # the item it leads to (and an approval's payload_sha256), when it expires, when used.
    # No index but the key (WITHOUT ROWID: the table is its key's b-tree); a prune, every
    # PRUNE_EVERY links saved, reads the whole table.
    """
    CREATE TABLE notify_links (
        token_sha256 TEXT PRIMARY KEY,
        item_kind TEXT NOT NULL CHECK (item_kind IN ('question', 'approval')),
        item_id INTEGER NOT NULL,
        payload_sha256 TEXT,
        expires REAL NOT NULL,
        used_at REAL
    ) WITHOUT ROWID;
    """,
    # 8: secret bindings (the values are files outside the database: core/secrets.py)
    """
    CREATE TABLE secret_bindings (
        secret TEXT NOT NULL,
        agent TEXT NOT NULL,
        host TEXT NOT NULL,
        port INTEGER NOT NULL,
        header TEXT NOT NULL,
        env TEXT,
        placeholder TEXT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('config', 'operator')),
        added_at REAL NOT NULL,
        PRIMARY KEY (secret, agent)
    ) WITHOUT ROWID;
    """,
    # 9: a message's insert and its ack are counted in agent_usage by the code that writes
    # them (Tx.held, one upsert per agent per commit), not by triggers: the two triggers
    # were ~35% of a round's SQL (issue 17; docs/performance.md, session 12). A delete,
    # off the hot path, keeps its trigger, as an upsert of differences like Tx.held's, so
    # the two commute within a transaction whatever their order.
    """
    DROP TRIGGER IF EXISTS usage_message_in;
    DROP TRIGGER IF EXISTS usage_message_acked;
    DROP TRIGGER IF EXISTS usage_message_out;
    CREATE TRIGGER usage_message_out AFTER DELETE ON messages WHEN OLD.acked_at IS NULL BEGIN
        INSERT INTO agent_usage (agent, pending, bytes, op_pending, op_bytes) VALUES (OLD.sender, -1,
            -(length(CAST(OLD.body AS BLOB)) + coalesce(length(CAST(OLD.options AS BLOB)), 0)),
            -(OLD.recipient = 'operator'),
            -(OLD.recipient = 'operator') * (length(CAST(OLD.body AS BLOB)) + coalesce(length(CAST(OLD.options AS BLOB)), 0)))
        ON CONFLICT (agent) DO UPDATE SET pending = pending + excluded.pending, bytes = bytes + excluded.bytes,
            op_pending = op_pending + excluded.op_pending, op_bytes = op_bytes + excluded.op_bytes;
    END;
    """,
    # 10: the dashboard's fair first screen (common.fair_page): each agent's oldest open
    # questions and pending approvals, found by a seek per agent rather than a scan of
    # every open row (re-check of session 18: 90,000 open questions, ~50 ms a redraw).
    """
    CREATE INDEX questions_open_asker ON questions (target, asker, id) WHERE answer IS NULL AND cancelled = 0;
    CREATE INDEX approvals_pending_agent ON approvals (agent, id) WHERE status = 'pending';
    """,
    # 11: the operator's read marks on their inbox (store/inbox.py), kept here rather than
    # per session in the core's memory: every message to the operator up to ``mark`` is
    # read, and those of ``inbox_read`` above it.
    """
    CREATE TABLE inbox_mark (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 0),
        mark INTEGER NOT NULL
    );
    CREATE TABLE inbox_read (
        id INTEGER PRIMARY KEY
    );
    """,
    # 12: the operator's messages by id: the inbox's counts and pages walked every message
    # above the mark, the agents' own too (16 ms a count at 300,000 messages); agent
    # messages never touch this index. (IF NOT EXISTS: a copy of 11 from the same day had it.)
    """
    CREATE INDEX IF NOT EXISTS messages_operator ON messages (id) WHERE recipient = 'operator';
    """,
    # 13: a delivered reminder (sender 'hive') is held in the quota of the agent that set
    # it, its recipient, until acked (store/messages.py HOLDER): the delete trigger says so,
    # and what the 'hive' row held of the reminders delivered so far moves to them.
    """
    DROP TRIGGER IF EXISTS usage_message_out;
    CREATE TRIGGER usage_message_out AFTER DELETE ON messages WHEN OLD.acked_at IS NULL BEGIN
        INSERT INTO agent_usage (agent, pending, bytes, op_pending, op_bytes) VALUES (
            CASE WHEN OLD.sender = 'hive' THEN OLD.recipient ELSE OLD.sender END, -1,
            -(length(CAST(OLD.body AS BLOB)) + coalesce(length(CAST(OLD.options AS BLOB)), 0)),
            -(OLD.recipient = 'operator'),
            -(OLD.recipient = 'operator') * (length(CAST(OLD.body AS BLOB)) + coalesce(length(CAST(OLD.options AS BLOB)), 0)))
        ON CONFLICT (agent) DO UPDATE SET pending = pending + excluded.pending, bytes = bytes + excluded.bytes,
            op_pending = op_pending + excluded.op_pending, op_bytes = op_bytes + excluded.op_bytes;
    END;
    INSERT INTO agent_usage (agent, pending, bytes, op_pending, op_bytes)
        SELECT recipient, count(*), sum(length(CAST(body AS BLOB)) + coalesce(length(CAST(options AS BLOB)), 0)), 0, 0
        FROM messages WHERE sender = 'hive' AND acked_at IS NULL GROUP BY recipient
        ON CONFLICT (agent) DO UPDATE SET pending = pending + excluded.pending, bytes = bytes + excluded.bytes;
    UPDATE agent_usage SET
        pending = pending - (SELECT count(*) FROM messages WHERE sender = 'hive' AND acked_at IS NULL),
        bytes = bytes - (SELECT coalesce(sum(length(CAST(body AS BLOB)) + coalesce(length(CAST(options AS BLOB)), 0)), 0)
            FROM messages WHERE sender = 'hive' AND acked_at IS NULL)
        WHERE agent = 'hive';
    """,
    # 14: transcripts bounded in bytes too (a function: see _transcript_sizes)
    _transcript_sizes,
    # 15: an agent's undelivered reminders counted from its own rows (reminders.pending_of)
    """
    CREATE INDEX IF NOT EXISTS reminders_pending ON reminders (agent) WHERE delivered_at IS NULL;
    """,
]


def apply_migration(db: Executor, migration: Migration) -> None:
    """One migration: a script of statements, or a function for what SQL alone can't say."""
    if callable(migration):
        migration(db)
        return
    for statement in split_sql(migration):
        db.execute(statement)


def split_sql(script: str) -> list[str]:
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

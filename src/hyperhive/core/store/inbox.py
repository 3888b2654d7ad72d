"""The operator's read marks on their inbox (the messages to the operator), kept in the
store: one operator, so every session and browser sees the same unread ones, and a
login or a core restart marks nothing unread again. Every message up to ``mark`` is
read, and those of ``inbox_read`` above it (marked read as shown, with unread ones
between: "mark read" marks the ids the page showed, and no other; red team round 23b)."""

from __future__ import annotations

from collections.abc import Iterable

from hyperhive.core.store.db import Database, Tx

OPERATOR = "operator"
READ_MAX = 10_000  # ids kept marked read above the mark; past them a mark stays unread
UNREAD_COUNTED = 50_000  # unread messages counted exactly; past it, "50000+"
TAKEN_MAX = 1_000  # ids one "mark read" looks at (the form sends at most ~670)


class InboxReadRepo:
    def __init__(self, db: Database) -> None:
        self._db = db

    def mark(self) -> int:
        row = self._db.conn.execute("SELECT mark FROM inbox_mark").fetchone()
        return int(row[0]) if row else 0

    def state(self) -> tuple[int, set[int]]:
        """(mark, the ids marked read above it)."""
        ids = self._db.conn.execute("SELECT id FROM inbox_read").fetchall()
        return self.mark(), {int(r[0]) for r in ids}

    def unread(self) -> int:
        """How many messages to the operator are unread, exact up to UNREAD_COUNTED, or
        UNREAD_COUNTED + 1 past it (the page says "50000+"): those above the mark not
        marked read, counted until that many are found. A count of every one cost ~100 ms
        a redraw at the hive's largest inbox (100 agents at their quota of 10,000: red
        team of session 19), and the stream redraws it up to five times a second."""
        row = self._db.conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM messages m WHERE m.recipient=? AND m.id>?"
            " AND NOT EXISTS (SELECT 1 FROM inbox_read r WHERE r.id = m.id) LIMIT ?)",
            (OPERATOR, self.mark(), UNREAD_COUNTED + 1),
        ).fetchone()
        return int(row[0])

    def take(self, ids: Iterable[int]) -> None:
        """Mark ``ids`` read (those of them that are messages to the operator above the
        mark, looked up as given: however many came before them; red team of session 19),
        then move the mark over what is read in a row and forget what is under it or gone."""
        with self._db.tx() as tx:
            mark = self.mark()
            asked = sorted({i for i in ids if mark < i < 2**63})[:TAKEN_MAX]
            marks = ",".join("?" * len(asked))
            mine = [
                int(r[0])
                for r in tx.execute(
                    f"SELECT id FROM messages WHERE recipient=? AND id IN ({marks}) ORDER BY id",
                    (OPERATOR, *asked),
                )
            ]
            held = int(tx.execute("SELECT count(*) FROM inbox_read").fetchone()[0])
            fresh = mine[: max(0, READ_MAX - held)]
            tx.executemany("INSERT OR IGNORE INTO inbox_read VALUES (?)", ((i,) for i in fresh))
            read = {int(r[0]) for r in tx.execute("SELECT id FROM inbox_read")}
            above = tx.execute(
                "SELECT id FROM messages WHERE recipient=? AND id>? ORDER BY id LIMIT ?",
                (OPERATOR, mark, READ_MAX + 1),
            )
            for (i,) in above:
                if i not in read:
                    break
                mark = i
            above.close()
            self._save(tx, mark)

    @staticmethod
    def _save(tx: Tx, mark: int) -> None:
        tx.execute(
            "INSERT INTO inbox_mark (singleton, mark) VALUES (0, ?)"
            " ON CONFLICT (singleton) DO UPDATE SET mark = excluded.mark",
            (mark,),
        )
        tx.execute(
            # (each read id looked up by its key: NOT IN would list every message to the
            # operator above the mark first)
            "DELETE FROM inbox_read WHERE id <= ? OR NOT EXISTS"
            " (SELECT 1 FROM messages m WHERE m.id = inbox_read.id AND m.recipient = ?)",
            (mark, OPERATOR),
        )

"""Questions: asked of an agent (also delivered to its inbox) or of the operator."""

from __future__ import annotations

import time
from collections.abc import Iterator

from hyperhive.core.refusals import Conflict, NotFound
from hyperhive.core.store.common import (
    Unreadable,
    dump_options,
    fair_page,
    load_options,
    readable,
)
from hyperhive.core.store.db import Database
from hyperhive.core.store.messages import insert_message
from hyperhive.core.summary import Listing, cut_sql, is_cut, options_prefix, shown
from hyperhive.wire.common import Message, Question

_COLUMNS = "id, asker, target, question, options, asked_at, answer, answered_at, cancelled"
_Row = tuple[int, str, str, str, "str | None", float, "str | None", "float | None", int]


def _to_question(r: _Row) -> Question:
    return Question(
        id=r[0],
        asker=r[1],
        to=r[2],
        question=r[3],
        options=load_options(r[4]),
        asked_at=r[5],
        answer=r[6],
        answered_at=r[7],
        cancelled=True if r[8] else None,
    )


# A listing's columns: the agent's text cut in SQL, with the full lengths at the end.
_SUMMARY = (
    f"id, asker, target, {cut_sql('question')}, {cut_sql('options')}, asked_at,"
    f" {cut_sql('answer')}, answered_at, cancelled"
)


def _to_summary(r: tuple[object, ...]) -> Question:
    truncated = {
        f: n for f, n in (("question", r[4]), ("options", r[6]), ("answer", r[9])) if is_cut(n)
    }
    options: list[str] | None
    if "options" in truncated:
        # Only the options complete within the cut: a cut option would be another answer.
        options = options_prefix(str(shown(r[5], r[6])))
    else:
        options = load_options(r[5])
    return Question(
        id=r[0],
        asker=r[1],
        to=r[2],
        question=shown(r[3], r[4]),
        options=options,
        asked_at=r[7],
        answer=shown(r[8], r[9]),
        answered_at=r[10],
        cancelled=True if r[11] else None,
        truncated=truncated or None,
    )


class QuestionRepo:
    def __init__(self, db: Database) -> None:
        self._db = db

    def ask(
        self, asker: str, target: str, question: str, options: list[str] | None
    ) -> tuple[Question, Message | None]:
        """Record a question; a question to an agent is also delivered to its inbox."""
        now = time.time()
        with self._db.tx() as tx:
            cur = tx.execute(
                "INSERT INTO questions (asker, target, question, options, asked_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (asker, target, question, dump_options(options), now),
            )
            qid = int(cur.lastrowid or 0)
            delivered = None
            if target != "operator":
                delivered = insert_message(tx, target, asker, "question", question, qid, options)
        q = Question(
            id=qid, asker=asker, to=target, question=question, options=options, asked_at=now
        )
        return q, delivered

    def get(self, qid: int) -> Question | Unreadable | None:
        row = self._db.conn.execute(f"SELECT {_COLUMNS} FROM questions WHERE id=?", (qid,))
        r = row.fetchone()
        return None if r is None else readable(_to_question, r)

    def answer(self, qid: int, target: str, answer: str) -> tuple[Question | Unreadable, Message]:
        """Answer question ``qid`` addressed to ``target``; deliver the answer to the asker."""
        now = time.time()
        select = f"SELECT {_COLUMNS} FROM questions WHERE id=?"
        # Read first: a refusal (no such question, not the caller's, answered already)
        # opens no write transaction; an agent may answer as fast as it writes (issue 17).
        _answerable(self._db.conn.execute(select, (qid,)).fetchone(), qid, target)
        with self._db.tx() as tx:
            row: _Row | None = tx.execute(select, (qid,)).fetchone()
            _answerable(row, qid, target)  # again: the transaction's word is the one that holds
            assert row is not None
            tx.execute(
                "UPDATE questions SET answer=?, answered_at=? WHERE id=?", (answer, now, qid)
            )
            msg = insert_message(tx, row[1], target, "answer", answer, qid)
            row = tx.execute(select, (qid,)).fetchone()
        assert row is not None
        return readable(_to_question, row), msg

    def open_page(
        self, *, target: str | None = None, asker: str | None = None, after: int = 0, limit: int
    ) -> Listing[Question | Unreadable]:
        """One page of the open questions (to ``target``, from ``asker``) with an id above
        ``after``, oldest first, as summaries."""
        where, args = self._open_where(target, asker)
        clause = " AND ".join(where)
        conn = self._db.conn
        total = conn.execute(f"SELECT count(*) FROM questions WHERE {clause}", args).fetchone()[0]
        rows = conn.execute(
            f"SELECT {_SUMMARY} FROM questions WHERE {clause} AND id>? ORDER BY id LIMIT ?",
            [*args, after, limit + 1],  # one more: is there a next page?
        ).fetchall()
        items = [readable(_to_summary, r) for r in rows[:limit]]
        return Listing(items, int(total), len(rows) > limit)

    def first_screen(
        self, *, target: str, per_agent: int, limit: int
    ) -> Listing[Question | Unreadable]:
        """The dashboard's open questions to ``target``: the oldest, at most ``per_agent``
        of any one asker (``common.fair_page``)."""
        where, args = self._open_where(target, None)
        return fair_page(
            self._db, "questions", "asker", where, args, _SUMMARY, _to_summary, per_agent, limit
        )

    @staticmethod
    def _open_where(target: str | None, asker: str | None) -> tuple[list[str], list[object]]:
        where, args = ["answer IS NULL", "cancelled=0"], list[object]()
        if target is not None:
            where.append("target=?")
            args.append(target)
        if asker is not None:
            where.append("asker=?")
            args.append(asker)
        return where, args

    def open(
        self, *, target: str | None = None, asker: str | None = None
    ) -> list[Question | Unreadable]:
        """Unanswered, uncancelled questions (to ``target``, from ``asker``), oldest first."""
        where, args = ["answer IS NULL", "cancelled=0"], []
        if target is not None:
            where.append("target=?")
            args.append(target)
        if asker is not None:
            where.append("asker=?")
            args.append(asker)
        rows = self._db.conn.execute(
            f"SELECT {_COLUMNS} FROM questions WHERE {' AND '.join(where)} ORDER BY id", args
        ).fetchall()
        return [readable(_to_question, r) for r in rows]

    def open_after(
        self, after: int, *, target: str | None = None, asker: str | None = None
    ) -> Iterator[Question | Unreadable]:
        """``open`` from id ``after`` on, read one row at a time (a reply's byte budget)."""
        where = ["answer IS NULL", "cancelled=0", "id>?"]
        args: list[object] = [after]
        if target is not None:
            where.append("target=?")
            args.append(target)
        if asker is not None:
            where.append("asker=?")
            args.append(asker)
        rows = self._db.rows(
            f"SELECT {_COLUMNS} FROM questions WHERE {' AND '.join(where)} ORDER BY id", args
        )
        return (readable(_to_question, r) for r in rows)


def _answerable(row: _Row | None, qid: int, target: str) -> None:
    """Refuse an answer to question ``qid`` (its row) by ``target`` unless it may give it."""
    if row is None or row[2] != target:
        # Same words whether it doesn't exist or isn't yours: no probing.
        raise NotFound(f"no question {qid} addressed to {target}")
    if row[8]:
        raise Conflict(f"question {qid} was cancelled")
    if row[6] is not None:
        raise Conflict(f"question {qid} is already answered")

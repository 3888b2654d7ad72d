"""Questions: asked of an agent (also delivered to its inbox) or of the operator."""

from __future__ import annotations

import time
from collections.abc import Iterator

from hyperhive.core.refusals import Conflict, NotFound
from hyperhive.core.store.common import Unreadable, dump_options, load_options, readable
from hyperhive.core.store.db import Database
from hyperhive.core.store.messages import insert_message
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
        with self._db.tx() as tx:
            row: _Row | None = tx.execute(select, (qid,)).fetchone()
            if row is None or row[2] != target:
                # Same words whether it doesn't exist or isn't yours: no probing.
                raise NotFound(f"no question {qid} addressed to {target}")
            if row[8]:
                raise Conflict(f"question {qid} was cancelled")
            if row[6] is not None:
                raise Conflict(f"question {qid} is already answered")
            tx.execute(
                "UPDATE questions SET answer=?, answered_at=? WHERE id=?", (answer, now, qid)
            )
            msg = insert_message(tx, row[1], target, "answer", answer, qid)
            row = tx.execute(select, (qid,)).fetchone()
        assert row is not None
        return readable(_to_question, row), msg

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

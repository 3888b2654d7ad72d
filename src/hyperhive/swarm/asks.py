"""``ask`` and ``answer`` between agents on different hosts (docs/swarm.md, "Questions
across hosts"). No ``nats`` here: SQLite only, in the swarm's transactions.

Each host numbers questions in its own ``questions`` table, so a question id names a
question on one host only, and never travels alone: it always rides with the host it
belongs to.

- The asker's host (``a``) stores the question (``asker``=alice, ``to``=bob) in its own
  table, remembers in ``swarm_asked`` which host it was asked of (``b``), and queues a
  ``question`` item carrying ``a``'s id, all in one transaction.
- The target's host (``b``) stores it again under an id of its own, delivers it to
  bob's inbox under that id, and remembers in ``swarm_questions`` that its id stands for
  ``(a, a's id)``; ``UNIQUE(host, remote_qid)``: a question arrives once.
- bob answers ``b``'s id; ``b`` marks its row answered and queues an ``answer`` item to
  ``a`` carrying ``a``'s id, in one transaction (so it rides the same ordered outbox as
  bob's messages).
- ``a`` applies it only if that question was asked *of host b* (the subject's sending
  host, vouched for by NATS's permissions) *of bob by alice* and is still open: a host
  can only answer questions asked of its own agents.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hyperhive.core.refusals import Conflict, NotFound
from hyperhive.core.store import Database
from hyperhive.core.store.common import dump_options
from hyperhive.core.store.db import Tx
from hyperhive.core.store.messages import insert_message
from hyperhive.swarm import outbox
from hyperhive.wire.common import SHORT_TEXT_CHARS, Message, Question

log = logging.getLogger("hive.swarm")

MAX_OPTIONS = 50  # as the agent's own ``ask`` (wire/agent.py)
MAX_QID = (1 << 63) - 1  # a SQLite rowid

TABLES = """
CREATE TABLE IF NOT EXISTS swarm_asked (
    qid INTEGER PRIMARY KEY,
    host TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS swarm_questions (
    qid INTEGER PRIMARY KEY,
    host TEXT NOT NULL,
    remote_qid INTEGER NOT NULL,
    UNIQUE (host, remote_qid)
);
"""


def well_formed(p: dict[str, Any]) -> bool:
    """A received ``question`` or ``answer`` item's own fields (the common ones are
    checked by the bridge): a question id, and a question's options as ``ask`` takes."""
    qid = p.get("qid")
    if type(qid) is not int or not 0 < qid <= MAX_QID:
        return False
    if p["kind"] == "answer":
        return "options" not in p or p["options"] is None
    options = p.get("options")
    return options is None or (
        isinstance(options, list)
        and len(options) <= MAX_OPTIONS
        and all(isinstance(o, str) and len(o) <= SHORT_TEXT_CHARS for o in options)
    )


def ask(
    db: Database, to_host: str, asker: str, target: str, question: str, options: list[str] | None
) -> Question:
    """``asker`` (here) asks ``target`` on ``to_host``: stored here, queued there, at once."""
    now = time.time()
    with db.tx() as tx:
        cur = tx.execute(
            "INSERT INTO questions (asker, target, question, options, asked_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (asker, target, question, dump_options(options), now),
        )
        qid = int(cur.lastrowid or 0)
        tx.execute("INSERT INTO swarm_asked (qid, host) VALUES (?, ?)", (qid, to_host))
        outbox.queue_tx(tx, to_host, asker, target, "question", question, qid=qid, options=options)
    return Question(
        id=qid, asker=asker, to=target, question=question, options=options, asked_at=now
    )


def answer(db: Database, qid: int, target: str, text: str) -> Question | None:
    """``target`` (here) answers question ``qid``; None if no other host asked it (a
    question asked here: the caller answers it as on one host). The answer is queued to
    the asker's host in the transaction that marks the question answered."""
    with db.tx() as tx:
        link = tx.execute(
            "SELECT host, remote_qid FROM swarm_questions WHERE qid=?", (qid,)
        ).fetchone()
        if link is None:
            return None
        row = tx.execute(
            "SELECT asker, target, question, answer, cancelled, asked_at FROM questions WHERE id=?",
            (qid,),
        ).fetchone()
        if row is None or row[1] != target:
            raise NotFound(f"no question {qid} addressed to {target}")  # as on one host
        if row[4]:
            raise Conflict(f"question {qid} was cancelled")
        if row[3] is not None:
            raise Conflict(f"question {qid} is already answered")
        now = time.time()
        tx.execute("UPDATE questions SET answer=?, answered_at=? WHERE id=?", (text, now, qid))
        outbox.queue_tx(tx, link[0], target, row[0], "answer", text, qid=int(link[1]))
    return Question(
        id=qid,
        asker=row[0],
        to=target,
        question=row[2],
        asked_at=row[5],
        answer=text,
        answered_at=now,
    )


def receive(tx: Tx, from_host: str, p: dict[str, Any]) -> Message | None:
    """A ``question`` or ``answer`` item from ``from_host``, in the bundle's transaction:
    the message it puts in an inbox, or None if it is dropped (logged)."""
    if p["kind"] == "question":
        return _question(tx, from_host, p)
    return _answer(tx, from_host, p)


def _question(tx: Tx, from_host: str, p: dict[str, Any]) -> Message | None:
    if tx.execute(
        "SELECT 1 FROM swarm_questions WHERE host=? AND remote_qid=?", (from_host, p["qid"])
    ).fetchone():
        log.warning("swarm: host %s asked its question %s again; dropped", from_host, p["qid"])
        return None
    options = p.get("options")
    cur = tx.execute(
        "INSERT INTO questions (asker, target, question, options, asked_at) VALUES (?, ?, ?, ?, ?)",
        (p["from"], p["to"], p["body"], dump_options(options), time.time()),
    )
    qid = int(cur.lastrowid or 0)
    tx.execute(
        "INSERT INTO swarm_questions (qid, host, remote_qid) VALUES (?, ?, ?)",
        (qid, from_host, p["qid"]),
    )
    return insert_message(tx, p["to"], p["from"], "question", p["body"], qid, options)


def _answer(tx: Tx, from_host: str, p: dict[str, Any]) -> Message | None:
    qid = p["qid"]
    row = tx.execute(
        "SELECT q.asker, q.target, q.answer, q.cancelled, a.host FROM questions q"
        " JOIN swarm_asked a ON a.qid = q.id WHERE q.id=?",
        (qid,),
    ).fetchone()
    # Asked of that host, of that agent, by that agent, and still open; else dropped,
    # whichever it is (a hostile host learns nothing from the difference).
    if row is None or (row[4], row[1], row[0]) != (from_host, p["from"], p["to"]):
        log.warning("swarm: host %s answered question %s, not one asked of it", from_host, qid)
        return None
    if row[2] is not None or row[3]:
        log.info("swarm: question %s is answered or cancelled already; answer dropped", qid)
        return None
    tx.execute(
        "UPDATE questions SET answer=?, answered_at=? WHERE id=?", (p["body"], time.time(), qid)
    )
    return insert_message(tx, p["to"], p["from"], "answer", p["body"], qid)

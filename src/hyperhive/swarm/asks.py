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

An agent destroyed on one host closes its open questions on the other (``forget``):
alice destroyed on ``a`` queues a ``withdraw`` (qid: ``a``'s id) to ``b``, which cancels
the question only if ``a`` asked it (``swarm_questions``); bob destroyed on ``b`` queues a
``cancel`` (qid: ``a``'s id again) to ``a``, which cancels it only if it was asked of
``b``'s bob by alice, and tells alice so. Each host applies them to its own rows only.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

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
# The items about a question: ``withdraw`` (its asker is gone) and ``cancel`` (its target is
# gone) close it; neither needs its sender to hold its name any more (it was destroyed).
KINDS = ("question", "answer", "withdraw", "cancel")
CLOSING = frozenset({"withdraw", "cancel"})
# What a cancelled cross-host question's asker gets (an ``answer`` message, ``ref`` = its id).
CANCELLED = "cancelled: {target} was destroyed on host {host}"

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
    if p["kind"] != "question":
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


def forget(db: Database, name: str) -> int:
    """Agent ``name`` here is being destroyed: its open questions asked of other hosts'
    agents are withdrawn there, and the open questions other hosts' agents asked of it are
    cancelled to their askers; all of them cancelled here, in one commit with the items
    queued. How many questions it closed."""
    with db.tx() as tx:
        asked = tx.execute(
            "SELECT q.id, q.target, a.host FROM swarm_asked a JOIN questions q ON q.id = a.qid"
            " WHERE q.asker=? AND q.answer IS NULL AND q.cancelled=0",
            (name,),
        ).fetchall()
        for qid, target, host in asked:
            outbox.queue_tx(tx, host, name, target, "withdraw", "", qid=int(qid))
        held = tx.execute(
            "SELECT q.id, q.asker, s.host, s.remote_qid FROM swarm_questions s"
            " JOIN questions q ON q.id = s.qid"
            " WHERE q.target=? AND q.answer IS NULL AND q.cancelled=0",
            (name,),
        ).fetchall()
        for _, asker, host, remote in held:
            outbox.queue_tx(tx, host, name, asker, "cancel", "", qid=int(remote))
        closed = [(r[0],) for r in asked] + [(r[0],) for r in held]
        tx.executemany("UPDATE questions SET cancelled=1 WHERE id=?", closed)
    return len(closed)


Received = Message | Literal["applied", "dropped"]


def receive(tx: Tx, from_host: str, p: dict[str, Any]) -> Received:
    """A question item from ``from_host``, in the bundle's transaction: the message it puts
    in an inbox, ``applied`` (a question closed, nothing delivered) or ``dropped`` (logged:
    not one of that host's to say, or asked again)."""
    if p["kind"] == "question":
        return _question(tx, from_host, p) or "dropped"
    if p["kind"] == "withdraw":
        return _withdraw(tx, from_host, p)
    return _answer(tx, from_host, p) or "dropped"


def _withdraw(tx: Tx, from_host: str, p: dict[str, Any]) -> Received:
    """The asker of a question ``from_host`` asked here was destroyed there: the question
    is cancelled, only if that host asked it (``swarm_questions``: its own id), of that
    agent, by that agent."""
    row = tx.execute(
        "SELECT q.id, q.asker, q.target, q.answer, q.cancelled FROM swarm_questions s"
        " JOIN questions q ON q.id = s.qid WHERE s.host=? AND s.remote_qid=?",
        (from_host, p["qid"]),
    ).fetchone()
    if row is None or (row[1], row[2]) != (p["from"], p["to"]):
        log.warning("swarm: host %s withdrew question %s, not one it asked", from_host, p["qid"])
        return "dropped"
    if row[3] is None and not row[4]:
        tx.execute("UPDATE questions SET cancelled=1 WHERE id=?", (row[0],))
    return "applied"


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
    """An ``answer`` or a ``cancel`` (the target was destroyed on its host) of a question
    asked here: the message the asker gets, or None (dropped)."""
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
    if p["kind"] == "cancel":
        # Cancelled, not answered (as on one host); the asker is told in words of ours.
        tx.execute("UPDATE questions SET cancelled=1 WHERE id=?", (qid,))
        body = CANCELLED.format(target=p["from"], host=from_host)
        return insert_message(tx, p["to"], p["from"], "answer", body, qid)
    tx.execute(
        "UPDATE questions SET answer=?, answered_at=? WHERE id=?", (p["body"], time.time(), qid)
    )
    return insert_message(tx, p["to"], p["from"], "answer", p["body"], qid)

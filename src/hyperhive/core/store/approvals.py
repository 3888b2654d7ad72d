"""Approvals: requested by an agent, resolved once by the operator. Approving applies
the stored payload through an ApprovalTx, inside the resolving transaction."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from hyperhive.core.grants import grants_line, grants_of, parts_sql
from hyperhive.core.refusals import Conflict, NotFound
from hyperhive.core.store.agents import AgentRepo
from hyperhive.core.store.common import (
    ApplyError,
    Unreadable,
    canonical_json,
    fair_page,
    load_json,
    readable,
    sha256_hex,
)
from hyperhive.core.store.db import Database, Tx
from hyperhive.core.store.egress import insert_rule
from hyperhive.core.store.messages import insert_message
from hyperhive.core.summary import Listing, cut_sql, is_cut, shown
from hyperhive.wire.common import AgentSpec, Approval, Message

_COLUMNS = (
    "id, agent, kind, requested_at, status, resolved_at, note, description, payload, payload_sha256"
)
_Row = tuple[int, str, str, float, str, "float | None", "str | None", str, str, str]


def _to_approval(r: _Row, reach: Callable[[Any], list[str]]) -> Approval:
    payload = load_json(r[8], "payload")
    return Approval(
        id=r[0],
        agent=r[1],
        kind=r[2],
        requested_at=r[3],
        status=r[4],
        resolved_at=r[5],
        note=r[6],
        description=r[7],
        payload=payload,
        payload_sha256=r[9],
        grants=grants_of(
            r[2], payload, reach(payload.get("name") if isinstance(payload, dict) else None)
        ),
    )


# A listing's columns: the agent's text cut in SQL, with the full lengths.
_SUMMARY = (
    "id, agent, kind, requested_at, status, resolved_at, note,"
    f" {cut_sql('description')}, {cut_sql('payload')}, payload_sha256, {parts_sql()}"
)


def _to_summary(r: tuple[Any, ...], reach: Callable[[Any], list[str]]) -> Approval:
    truncated = {f: n for f, n in (("description", r[8]), ("payload", r[10])) if is_cut(n)}
    if "payload" in truncated:  # the first bytes of the canonical JSON, as text
        payload = shown(r[9], r[10])
    else:
        payload = load_json(r[9], "payload")
    return Approval(
        id=r[0],
        agent=r[1],
        kind=r[2],
        requested_at=r[3],
        status=r[4],
        resolved_at=r[5],
        note=r[6],
        description=shown(r[7], r[8]),
        payload=payload,
        payload_sha256=r[11],
        truncated=truncated or None,
        # Read out of the whole payload in SQL: a cut payload would hide it.
        grants=None if r[12] is None else _grants(json.loads(r[12]), reach),
    )


def _grants(parts: dict[str, Any], reach: Callable[[Any], list[str]]) -> str:
    return grants_line(parts, reach(parts.get("name")))


class ApprovalTx(Protocol):
    """All that applying an approved payload may do, inside the approving transaction."""

    def agent_exists(self, name: str) -> bool: ...
    def create_agent(self, name: str, spec: AgentSpec, parent: str | None, origin: str) -> None: ...
    def add_egress_rule(self, agent: str, rule: str, source: str) -> bool: ...


Apply = Callable[[ApprovalTx, Approval], None]


class _ApprovalTx:
    """The ApprovalTx handed to ``apply``: usable only while ``apply`` runs."""

    __slots__ = ("_agents", "_live", "_tx", "wrote_agents")

    def __init__(self, tx: Tx, agents: AgentRepo) -> None:
        self._tx, self._agents, self._live, self.wrote_agents = tx, agents, True, False

    def close(self) -> None:
        self._live = False

    def _open(self) -> Tx:
        if not self._live:
            raise RuntimeError("the approval's transaction has ended")
        return self._tx

    def agent_exists(self, name: str) -> bool:
        return self._agents.exists_in(self._open(), name)

    def create_agent(self, name: str, spec: AgentSpec, parent: str | None, origin: str) -> None:
        self.wrote_agents = True
        self._agents.create_in(self._open(), name, spec, parent, origin)

    def add_egress_rule(self, agent: str, rule: str, source: str) -> bool:
        return insert_rule(self._open(), agent, rule, source, time.time())


class ApprovalRepo:
    def __init__(self, db: Database, agents: AgentRepo) -> None:
        self._db = db
        self._agents = agents

    def _reach(self, name: Any) -> list[str]:
        """The agents whose peers name ``name`` (a spawn's grants line says so)."""
        return self._agents.peered_by(name) if isinstance(name, str) else []

    def _full(self, r: _Row) -> Approval:
        return _to_approval(r, self._reach)

    def _summary(self, r: tuple[Any, ...]) -> Approval:
        return _to_summary(r, self._reach)

    def request(self, agent: str, kind: str, description: str, payload: Any) -> Approval:
        text = canonical_json(payload)
        now = time.time()
        with self._db.tx() as tx:
            cur = tx.execute(
                "INSERT INTO approvals (agent, kind, description, payload, payload_sha256,"
                " requested_at) VALUES (?, ?, ?, ?, ?, ?)",
                (agent, kind, description, text, sha256_hex(text), now),
            )
            row = tx.execute(
                f"SELECT {_COLUMNS} FROM approvals WHERE id=?", (cur.lastrowid,)
            ).fetchone()
        return self._full(row)

    def get(self, aid: int) -> Approval | Unreadable | None:
        row = self._db.conn.execute(f"SELECT {_COLUMNS} FROM approvals WHERE id=?", (aid,))
        r = row.fetchone()
        return None if r is None else readable(self._full, r)

    def page(
        self, *, status: str, agent: str | None = None, after: int = 0, limit: int
    ) -> Listing[Approval | Unreadable]:
        """One page of the approvals with ``status`` (of ``agent``) with an id above ``after``,
        oldest first, as summaries."""
        where, args = ["status=?"], list[object]([status])
        if agent is not None:
            where.append("agent=?")
            args.append(agent)
        clause = " AND ".join(where)
        conn = self._db.conn
        total = conn.execute(f"SELECT count(*) FROM approvals WHERE {clause}", args).fetchone()[0]
        rows = conn.execute(
            f"SELECT {_SUMMARY} FROM approvals WHERE {clause} AND id>? ORDER BY id LIMIT ?",
            [*args, after, limit + 1],  # one more: is there a next page?
        ).fetchall()
        items = [readable(self._summary, r) for r in rows[:limit]]
        return Listing(items, int(total), len(rows) > limit)

    def first_screen(self, *, per_agent: int, limit: int) -> Listing[Approval | Unreadable]:
        """The dashboard's pending approvals: the oldest, at most ``per_agent`` of any one
        agent (``common.fair_page``)."""
        return fair_page(
            self._db,
            "approvals",
            "agent",
            ["status='pending'"],
            [],
            _SUMMARY,
            self._summary,
            per_agent,
            limit,
        )

    def list(
        self, *, status: str | None = None, agent: str | None = None
    ) -> list[Approval | Unreadable]:
        """Approvals (with ``status``, of ``agent``), oldest first."""
        where, args = [], []
        if status is not None:
            where.append("status=?")
            args.append(status)
        if agent is not None:
            where.append("agent=?")
            args.append(agent)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._db.conn.execute(
            f"SELECT {_COLUMNS} FROM approvals {clause} ORDER BY id", args
        ).fetchall()
        return [readable(self._full, r) for r in rows]

    def pending_after(self, agent: str, after: int) -> Iterator[Approval | Unreadable]:
        """``agent``'s pending approvals from id ``after`` on, oldest first, read one row
        at a time (a reply's byte budget)."""
        rows = self._db.rows(
            f"SELECT {_COLUMNS} FROM approvals WHERE status='pending' AND agent=? AND id>?"
            " ORDER BY id",
            (agent, after),
        )
        return (readable(self._full, r) for r in rows)

    def resolve(
        self,
        aid: int,
        decision: str,
        note: str | None,
        apply: Apply | None = None,
    ) -> tuple[Approval | Unreadable, Message]:
        """Approve or deny a pending approval, once, and tell the requester.

        ``apply`` runs inside the same transaction on the stored payload; if it
        raises ApplyError, its effects are undone and the approval is ``failed``.
        An unreadable row can only be denied (nobody saw what approving would apply).
        """
        assert decision in ("approved", "denied")
        now = time.time()
        select = f"SELECT {_COLUMNS} FROM approvals WHERE id=?"
        handle: _ApprovalTx | None = None
        try:
            with self._db.tx() as tx:
                row: _Row | None = tx.execute(select, (aid,)).fetchone()
                if row is None:
                    raise NotFound(f"no approval {aid}")
                if row[4] != "pending":
                    raise Conflict(f"approval {aid} is already {row[4]}")
                status = decision
                if decision == "approved":
                    approval = readable(self._full, row)
                    if isinstance(approval, Unreadable):
                        raise Conflict(
                            f"approval {aid} is unreadable ({approval.reason}); it can only be"
                            " denied"
                        )
                    if apply is not None:
                        handle = _ApprovalTx(tx, self._agents)
                        try:
                            with tx.savepoint("apply"):
                                apply(handle, approval)
                        except ApplyError as e:
                            status, note = "failed", str(e)
                        finally:
                            handle.close()
                tx.execute(
                    "UPDATE approvals SET status=?, resolved_at=?, note=? WHERE id=?",
                    (status, now, note, aid),
                )
                body = status if not note else f"{status}: {note}"
                msg = insert_message(tx, row[1], "operator", "approval", body, aid)
                row = tx.execute(select, (aid,)).fetchone()
        finally:
            if handle is not None and handle.wrote_agents:
                self._agents.invalidate()  # committed or rolled back: reread either way
        assert row is not None
        return readable(self._full, row), msg

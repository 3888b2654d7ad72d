"""The agents table, read through a cache that only this repository's writes drop (or, for
a write of one agent's row, update)."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from hyperhive.core.store.db import Database, Tx
from hyperhive.core.store.egress import insert_rule
from hyperhive.wire.common import AgentSpec

_COLUMNS = "name, spec, parent, origin, paused, stopped, status_text, status_set_at, created_at"


@functools.lru_cache(maxsize=4096)
def _parse_spec(text: str) -> AgentSpec:
    # Keyed by the stored text: reloading the cache after a status change parses nothing.
    return AgentSpec.model_validate_json(text)


@dataclass(frozen=True, slots=True)
class AgentRow:
    name: str
    spec: AgentSpec
    parent: str | None
    origin: str  # 'config', 'spawn' or 'operator'
    paused: bool
    stopped: bool
    status_text: str | None
    status_set_at: float | None
    created_at: float


class AgentRepo:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._cache: dict[str, AgentRow] | None = None  # the whole table, by name
        # Each agent's children, by name, in the table they were read from: the table is
        # a new dict after every write, and this holds it, so ``is`` tells a stale index.
        self._children: tuple[dict[str, AgentRow], dict[str, list[str]]] | None = None
        self._peered: tuple[dict[str, AgentRow], dict[str, list[str]]] | None = None

    def _table(self) -> dict[str, AgentRow]:
        if self._cache is None:
            rows = self._db.conn.execute(f"SELECT {_COLUMNS} FROM agents ORDER BY name")
            self._cache = {
                r[0]: AgentRow(
                    r[0], _parse_spec(r[1]), r[2], r[3], bool(r[4]), bool(r[5]), r[6], r[7], r[8]
                )
                for r in rows
            }
        return self._cache

    def get(self, name: str) -> AgentRow | None:
        return self._table().get(name)

    def all(self) -> list[AgentRow]:
        """Every agent, by name."""
        return list(self._table().values())

    def children_of(self, name: str) -> list[str]:
        """The agents ``name`` spawned (their parent), by name; one pass over the table
        after each change of it, then a lookup (``peers`` asks for every request)."""
        table = self._table()
        index = self._children
        if index is None or index[0] is not table:
            by_parent: dict[str, list[str]] = {}
            for row in table.values():
                if row.parent is not None:
                    by_parent.setdefault(row.parent, []).append(row.name)
            index = self._children = (table, by_parent)
        return index[1].get(name, [])

    def peered_by(self, name: str) -> list[str]:
        """The agents whose spec names ``name`` as a peer, by name (an index built once
        after each change of the table, as ``children_of``)."""
        table = self._table()
        index = self._peered
        if index is None or index[0] is not table:
            by_peer: dict[str, list[str]] = {}
            for row in table.values():
                for peer in row.spec.peers:
                    by_peer.setdefault(peer, []).append(row.name)
            index = self._peered = (table, by_peer)
        return index[1].get(name, [])

    # -- writes: each drops the cache

    def invalidate(self) -> None:
        self._cache = None

    @contextmanager
    def _write(self) -> Iterator[Tx]:
        """A transaction that writes agents: the cache is dropped before it and again
        after it ends, committed or rolled back."""
        self._cache = None
        try:
            with self._db.tx() as tx:
                yield tx
        finally:
            self._cache = None

    def sync_config(self, declared: dict[str, AgentSpec]) -> tuple[list[str], list[str]]:
        """Make the config-declared agents match hive.toml; spawned agents are kept. Returns
        the names taken out of hive.toml, whose rows (and what only they held) are gone, and
        those new to it: the cages, homes and ids hive-priv holds of either are a gone
        agent's, the lifecycle's to destroy (``Hive.destroy_leftovers``, ``clear_leftovers``).
        A declared name that an agent's spawned child holds is refused
        (``DeclaredNameTaken``), and nothing is changed: adopting it kept its parent and
        home (red team round 24)."""
        now = time.time()
        with self._write() as tx:
            # (the operator's own spawn of a declared name is adopted: it remade that agent)
            held = tx.execute(
                "SELECT name, origin, parent FROM agents WHERE origin = 'spawn'"
            ).fetchall()
            for name, origin, parent in held:
                if name in declared:
                    raise DeclaredNameTaken(name, origin, parent)
            existing = {n for (n,) in tx.execute("SELECT name FROM agents")}
            created = [name for name in declared if name not in existing]
            for name, spec in declared.items():
                tx.execute(
                    "INSERT INTO agents (name, spec, origin, created_at) VALUES (?, ?, 'config', ?)"
                    " ON CONFLICT(name) DO UPDATE SET spec=excluded.spec",
                    (name, spec.model_dump_json(), now),
                )
                # The spec's rules are hive.toml's; approved and operator-added ones stay.
                tx.execute("DELETE FROM egress_rules WHERE agent=? AND source='spec'", (name,))
                _add_spec_rules(tx, name, spec, now)
            rows = tx.execute("SELECT name FROM agents WHERE origin='config'").fetchall()
            removed = [name for (name,) in rows if name not in declared]
            for name in removed:
                _delete(tx, name)
        return removed, created

    def create(self, name: str, spec: AgentSpec, parent: str | None, origin: str) -> None:
        with self._write() as tx:
            self.create_in(tx, name, spec, parent, origin)

    def create_in(
        self, tx: Tx, name: str, spec: AgentSpec, parent: str | None, origin: str
    ) -> None:
        """Create an agent in the caller's transaction (an approval's); the caller drops
        the cache again once that transaction ended."""
        self._cache = None
        tx.execute(
            "INSERT INTO agents (name, spec, parent, origin, created_at) VALUES (?, ?, ?, ?, ?)",
            (name, spec.model_dump_json(), parent, origin, time.time()),
        )
        _add_spec_rules(tx, name, spec, time.time())

    def delete(self, name: str) -> None:
        """Delete an agent and what only it held: its inbox, reminders, transcript and
        rules; its open questions and pending approvals are cancelled."""
        with self._write() as tx:
            _delete(tx, name)

    def _update_row(self, name: str, sql: str, params: tuple[object, ...], **changes: Any) -> None:
        """One UPDATE of ``name``'s row only. Once it committed, the table read before it
        holds as it was but for that row, which is replaced in it with ``changes`` (the
        columns the UPDATE set, as a read would give them): dropping the whole cache made
        the next read parse every agent again, O(agents) for each start, stop, pause or
        status (1.7 ms of the core's loop each with 1,000 agents, twice per cold start)."""
        before = self._cache
        with self._write() as tx:
            tx.execute(sql, (*params, name))
        row = before.get(name) if before is not None else None
        if before is not None and self._cache is None:
            self._cache = (
                before if row is None else {**before, name: dataclasses.replace(row, **changes)}
            )

    def set_flag(self, name: str, column: Literal["paused", "stopped"], value: bool) -> None:
        assert column in ("paused", "stopped")
        self._update_row(
            name, f"UPDATE agents SET {column}=? WHERE name=?", (int(value),), **{column: value}
        )

    def set_parent(self, name: str, parent: str | None) -> None:
        self._update_row(name, "UPDATE agents SET parent=? WHERE name=?", (parent,), parent=parent)

    def set_spec(self, name: str, spec: AgentSpec) -> None:
        """Replace an agent's spec (its limits); its egress rules are not touched."""
        text = spec.model_dump_json()
        self._update_row(
            name, "UPDATE agents SET spec=? WHERE name=?", (text,), spec=_parse_spec(text)
        )

    def set_status_text(self, name: str, text: str) -> float:
        now = time.time()
        self._update_row(
            name,
            "UPDATE agents SET status_text=?, status_set_at=? WHERE name=?",
            (text, now),
            status_text=text,
            status_set_at=now,
        )
        return now

    def exists_in(self, tx: Tx, name: str) -> bool:
        """Whether ``name`` exists as the transaction ``tx`` sees it (not the cache)."""
        return tx.execute("SELECT 1 FROM agents WHERE name=?", (name,)).fetchone() is not None


class DeclaredNameTaken(Exception):
    """hive.toml declares a name a spawned agent holds: one line saying how to go on."""

    def __init__(self, name: str, origin: str, parent: str | None) -> None:
        by = f" by {parent!r}" if parent else ""  # (its parent destroyed since: none)
        super().__init__(
            f"hive.toml declares agent {name!r}, but {name!r} is an agent spawned{by}, not one"
            f" hive.toml made: rename it in hive.toml, or take it out, start the hive and"
            f" `hive destroy {name}` first; nothing was changed"
        )


def _add_spec_rules(tx: Tx, name: str, spec: AgentSpec, now: float) -> None:
    for rule in spec.egress:
        insert_rule(tx, name, rule, "spec", now)


def _delete(tx: Tx, name: str) -> None:
    now = time.time()
    tx.execute("DELETE FROM agents WHERE name=?", (name,))
    tx.execute("DELETE FROM messages WHERE recipient=? AND acked_at IS NULL", (name,))
    tx.execute("DELETE FROM reminders WHERE agent=? AND delivered_at IS NULL", (name,))
    tx.execute(
        "UPDATE questions SET cancelled=1 WHERE (asker=? OR target=?) AND answer IS NULL",
        (name, name),
    )
    tx.execute(
        "UPDATE approvals SET status='cancelled', resolved_at=?, note='agent destroyed'"
        " WHERE agent=? AND status='pending'",
        (now, name),
    )
    tx.execute("UPDATE agents SET parent=NULL WHERE parent=?", (name,))
    tx.execute("DELETE FROM transcript WHERE agent=?", (name,))
    tx.execute("DELETE FROM transcript_usage WHERE agent=?", (name,))
    tx.execute("DELETE FROM egress_rules WHERE agent=?", (name,))
    # the operator's secret_bind of it: never a later agent's of the same name (hive.toml's
    # own come back at each start, named in hive.toml)
    tx.execute("DELETE FROM secret_bindings WHERE agent=?", (name,))

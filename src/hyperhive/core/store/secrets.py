"""Secret bindings: which agent's requests to which destination get which secret.
The values are not here (core/secrets.py keeps them, outside the database)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from hyperhive.core.secrets import new_placeholder
from hyperhive.core.store.db import Database


@dataclass(frozen=True)
class Binding:
    secret: str
    agent: str
    host: str
    port: int
    header: str  # the template, "Name: value{}"
    env: str | None
    placeholder: str
    source: str
    added_at: float


_COLUMNS = "secret, agent, host, port, header, env, placeholder, source, added_at"


class SecretBindingRepo:
    def __init__(self, db: Database) -> None:
        self._db = db

    def all(self) -> list[Binding]:
        rows = self._db.conn.execute(
            f"SELECT {_COLUMNS} FROM secret_bindings ORDER BY secret, agent"
        )
        return [Binding(*r) for r in rows]

    def bind(
        self,
        secret: str,
        agents: list[str],
        host: str,
        port: int,
        header: str,
        env: str | None,
        source: str,
        placeholder: str,
    ) -> None:
        """Bind ``secret`` for ``agents`` (replacing their earlier binding of it); one
        placeholder per secret, kept across re-binds so running cages stay valid."""
        now = time.time()
        with self._db.tx() as tx:
            for agent in agents:
                tx.execute(
                    f"INSERT OR REPLACE INTO secret_bindings ({_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (secret, agent, host, port, header, env, placeholder, source, now),
                )

    def unbind(self, secret: str, agents: list[str]) -> int:
        with self._db.tx() as tx:
            if not agents:
                sql = "DELETE FROM secret_bindings WHERE secret=?"
                return tx.execute(sql, (secret,)).rowcount
            n = 0
            for agent in agents:
                sql = "DELETE FROM secret_bindings WHERE secret=? AND agent=?"
                n += tx.execute(sql, (secret, agent)).rowcount
            return n

    def replace_config(self, rows: list[tuple[str, list[str], str, int, str, str | None]]) -> None:
        """hive.toml's bindings, replacing those it declared before (the operator's stay)."""
        now = time.time()
        with self._db.tx() as tx:
            old = {
                (s, a): p
                for s, a, p in tx.execute(
                    "SELECT secret, agent, placeholder FROM secret_bindings WHERE source='config'"
                )
            }
            tx.execute("DELETE FROM secret_bindings WHERE source='config'")
            for secret, agents, host, port, header, env in rows:
                placeholder = next((p for (s, _), p in old.items() if s == secret), None)
                for agent in agents:
                    placeholder = placeholder or new_placeholder()
                    tx.execute(
                        f"INSERT OR REPLACE INTO secret_bindings ({_COLUMNS})"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, 'config', ?)",
                        (secret, agent, host, port, header, env, placeholder, now),
                    )

    def forget_agent(self, agent: str) -> None:
        with self._db.tx() as tx:
            tx.execute("DELETE FROM secret_bindings WHERE agent=?", (agent,))

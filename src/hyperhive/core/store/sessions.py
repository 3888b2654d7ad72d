"""The operator's web sessions, so a core restart doesn't log the operator out. Only a
hash of each session id is stored; ``token_sha256`` ties a session to the login token
it was made with. Implements core.sessions.SessionStore."""

from __future__ import annotations

import time

from hyperhive.core.store.db import Database


class SessionRepo:
    def __init__(self, db: Database) -> None:
        self._db = db

    def sessions(self, token_sha256: str, now: float) -> list[tuple[str, str, float]]:
        rows = self._db.conn.execute(
            "SELECT id_sha256, csrf, expires FROM sessions WHERE token_sha256=? AND expires > ?",
            (token_sha256, now),
        ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def save_session(self, id_sha256: str, csrf: str, expires: float, token_sha256: str) -> None:
        with self._db.tx() as tx:
            tx.execute(
                "DELETE FROM sessions WHERE expires <= ? OR token_sha256 != ?",
                (time.time(), token_sha256),
            )
            tx.execute(
                "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)",
                (id_sha256, csrf, expires, token_sha256),
            )

    def delete_session(self, id_sha256: str) -> None:
        with self._db.tx() as tx:
            tx.execute("DELETE FROM sessions WHERE id_sha256=?", (id_sha256,))

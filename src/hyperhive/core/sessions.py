"""The operator's web login: a token on disk, sessions with a CSRF token each.

``operator.token`` (0600, in the state dir) is what `hive up` prints in the
login URL. ``GET /login?token=…`` trades it for a session cookie (HttpOnly,
SameSite=Strict, expiring). Sessions are kept in the core's memory and, when
a store is given, in the database (the sha256 of each id, never the id), so a
core restart doesn't log the operator out. A new ``operator.token`` ends every
session made with the old one."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger("hive.core")

COOKIE = "hive_session"
SESSION_TTL = 12 * 3600.0
MAX_SESSIONS = 1000


def load_or_create_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token


@dataclass
class Session:
    id: str
    csrf: str
    expires: float


class SessionStore(Protocol):
    def sessions(self, token_sha256: str, now: float) -> list[tuple[str, str, float]]: ...
    def save_session(
        self, id_sha256: str, csrf: str, expires: float, token_sha256: str
    ) -> None: ...
    def delete_session(self, id_sha256: str) -> None: ...


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Sessions:
    """Keyed by the sha256 of the session id, in memory as on disk."""

    def __init__(self, token: str, store: SessionStore | None = None) -> None:
        self._token = token
        self._token_sha256 = _sha256(token)
        self._store = store
        self._sessions: dict[str, Session] = {}
        if store is not None:
            for key, csrf, expires in store.sessions(self._token_sha256, time.time()):
                self._sessions[key] = Session(key, csrf, expires)

    def login(self, token: str) -> Session | None:
        if not hmac.compare_digest(token.encode(), self._token.encode()):
            return None
        now = time.time()
        self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
        if len(self._sessions) >= MAX_SESSIONS:
            oldest = min(self._sessions.values(), key=lambda s: s.expires)
            self.logout(oldest)
        session_id = secrets.token_urlsafe(32)
        session = Session(session_id, secrets.token_urlsafe(32), now + SESSION_TTL)
        key = _sha256(session_id)
        if self._store is not None:
            try:
                self._store.save_session(key, session.csrf, session.expires, self._token_sha256)
            except Exception as e:  # e.g. a full disk: the session still works until a restart
                log.warning("session not persisted: %s", e)
        self._sessions[key] = Session(key, session.csrf, session.expires)
        return session  # the only copy of the id itself: it goes into the cookie

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        key = _sha256(session_id)
        session = self._sessions.get(key)
        if session is None or session.expires <= time.time():
            self._sessions.pop(key, None)
            return None
        return session

    def logout(self, session: Session) -> None:
        """``session`` as ``get`` returned it."""
        self._sessions.pop(session.id, None)
        if self._store is not None:
            try:
                self._store.delete_session(session.id)
            except Exception as e:
                log.warning("session logout not persisted: %s", e)

    @staticmethod
    def csrf_ok(session: Session, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(
            session.csrf.encode(), str(presented).encode()
        )

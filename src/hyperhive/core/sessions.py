"""The operator's web login: a token on disk, sessions in memory, a CSRF token
per session.

``operator.token`` (0600, in the state dir) is what `hive up` prints in the
login URL. ``GET /login?token=…`` trades it for a session cookie (HttpOnly,
SameSite=Strict, expiring). Sessions live in the core's memory: a core
restart logs the operator out, never in."""

from __future__ import annotations

import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

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


class Sessions:
    def __init__(self, token: str) -> None:
        self._token = token
        self._sessions: dict[str, Session] = {}

    def login(self, token: str) -> Session | None:
        if not hmac.compare_digest(token.encode(), self._token.encode()):
            return None
        now = time.time()
        self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
        if len(self._sessions) >= MAX_SESSIONS:
            oldest = min(self._sessions.values(), key=lambda s: s.expires)
            del self._sessions[oldest.id]
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + SESSION_TTL)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None or session.expires <= time.time():
            self._sessions.pop(session_id or "", None)
            return None
        return session

    def logout(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    @staticmethod
    def csrf_ok(session: Session, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(session.csrf.encode(), str(presented).encode())

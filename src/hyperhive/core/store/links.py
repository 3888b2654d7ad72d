"""The one-use links notifications carry (core/notify.py). Only the sha256 of each token
is stored, as with sessions; a link is bound to one question, or to one approval and the
``payload_sha256`` the notification was about, expires, and is marked used on its first
use (kept until it expires, so a second use can be told apart from a wrong link)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from hyperhive.core.store.db import Database

MAX_LINKS = 100_000  # links kept at most; the oldest go first (a flood can't fill the disk)
PRUNE_EVERY = 256  # links saved between two prunes (a prune reads the whole table)
ItemKind = Literal["question", "approval"]


@dataclass(frozen=True, slots=True)
class LinkTarget:
    kind: ItemKind
    id: int
    payload_sha256: str | None


class LinkUsed(Exception):
    """The link was used before, or has expired: one line saying which."""


class LinkRepo:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._saved = 0

    def save(
        self, token_sha256: str, target: LinkTarget, expires: float, now: float | None = None
    ) -> None:
        now = time.time() if now is None else now
        with self._db.tx() as tx:
            tx.execute(
                "INSERT INTO notify_links VALUES (?, ?, ?, ?, ?, NULL)",
                (token_sha256, target.kind, target.id, target.payload_sha256, expires),
            )
            self._saved += 1
            if self._saved % PRUNE_EVERY == 1:  # the first save after a start, then every 256
                tx.execute("DELETE FROM notify_links WHERE expires <= ?", (now,))
                tx.execute(
                    "DELETE FROM notify_links WHERE token_sha256 IN (SELECT token_sha256 FROM"
                    " notify_links ORDER BY expires DESC LIMIT -1 OFFSET ?)",
                    (MAX_LINKS,),
                )

    def redeem(self, token_sha256: str, now: float | None = None) -> LinkTarget | None:
        """Mark the link used and say where it leads; None if there is no such link;
        LinkUsed if it was used before or has expired."""
        now = time.time() if now is None else now
        with self._db.tx() as tx:
            row = tx.execute(
                "SELECT item_kind, item_id, payload_sha256, expires, used_at FROM notify_links"
                " WHERE token_sha256=?",
                (token_sha256,),
            ).fetchone()
            if row is None:
                return None
            if row[4] is not None:
                raise LinkUsed("this link was already used; open the dashboard instead")
            if row[3] <= now:
                raise LinkUsed("this link has expired; open the dashboard instead")
            tx.execute(
                "UPDATE notify_links SET used_at=? WHERE token_sha256=? AND used_at IS NULL",
                (now, token_sha256),
            )
        return LinkTarget(row[0], int(row[1]), row[2])

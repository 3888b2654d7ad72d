"""All of the hive's state, in SQLite (WAL): one Database, and a repository per concern.

``Store`` composes them: ``store.agents``, ``store.messages``, ``store.questions``,
``store.approvals``, ``store.transcripts``, ``store.reminders``, ``store.egress``,
``store.sessions``, ``store.usage``, ``store.history``, ``store.inbox_read``. Each
repository writes only through ``Database.tx()``; rows come back typed (frozen
dataclasses, the wire models, or TypedDicts where a row goes out as JSON as it is).
"""

from __future__ import annotations

from pathlib import Path

from hyperhive.core.store.agents import AgentRepo, AgentRow
from hyperhive.core.store.approvals import Apply, ApprovalRepo, ApprovalTx
from hyperhive.core.store.common import (
    ApplyError,
    StoreError,
    Unreadable,
    canonical_json,
    sha256_hex,
)
from hyperhive.core.store.db import Database, Tx
from hyperhive.core.store.egress import (
    EGRESS_LOG_KEEP,
    EGRESS_PRUNE_EVERY,
    EgressDecision,
    EgressLogEntry,
    EgressRepo,
    EgressRule,
)
from hyperhive.core.store.history import HistoryRepo
from hyperhive.core.store.inbox import InboxReadRepo
from hyperhive.core.store.links import LinkRepo
from hyperhive.core.store.messages import MessageRepo
from hyperhive.core.store.questions import QuestionRepo
from hyperhive.core.store.reminders import ReminderRepo
from hyperhive.core.store.schema import MIGRATIONS
from hyperhive.core.store.secrets import Binding, SecretBindingRepo
from hyperhive.core.store.sessions import SessionRepo
from hyperhive.core.store.transcripts import TRANSCRIPT_KEEP, TranscriptEntry, TranscriptRepo
from hyperhive.core.store.usage import Usage, UsageRepo

__all__ = [
    "EGRESS_LOG_KEEP",
    "EGRESS_PRUNE_EVERY",
    "MIGRATIONS",
    "TRANSCRIPT_KEEP",
    "AgentRow",
    "Apply",
    "ApplyError",
    "ApprovalTx",
    "Binding",
    "Database",
    "EgressDecision",
    "EgressLogEntry",
    "EgressRule",
    "Store",
    "StoreError",
    "TranscriptEntry",
    "Tx",
    "Unreadable",
    "Usage",
    "canonical_json",
    "sha256_hex",
]


class Store:
    """The hive's state: the database and its repositories."""

    def __init__(self, path: Path, synchronous: str = "NORMAL") -> None:
        self.path = path
        self.db = Database(path, synchronous)
        self.agents = AgentRepo(self.db)
        self.messages = MessageRepo(self.db)
        self.questions = QuestionRepo(self.db)
        self.approvals = ApprovalRepo(self.db, self.agents)
        self.transcripts = TranscriptRepo(self.db)
        self.reminders = ReminderRepo(self.db)
        self.egress = EgressRepo(self.db)
        self.sessions = SessionRepo(self.db)
        self.links = LinkRepo(self.db)
        self.usage = UsageRepo(self.db)
        self.history = HistoryRepo(self.db)
        self.bindings = SecretBindingRepo(self.db)
        self.inbox_read = InboxReadRepo(self.db)

    @property
    def history_keep(self) -> int:
        """Rows kept per agent of every log ([limits] history_keep)."""
        return self.history.keep

    @history_keep.setter
    def history_keep(self, keep: int) -> None:
        self.history.keep = self.egress.history_keep = keep

    @property
    def schema_version(self) -> int:
        return self.db.schema_version

    def checkpoint(self) -> None:
        self.db.checkpoint()

    def close(self) -> None:
        self.db.close()

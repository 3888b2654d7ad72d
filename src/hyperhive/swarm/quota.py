"""The storage quota across hosts (docs/swarm.md, "Quotas across hosts"). No ``nats``
here: SQLite only, in the swarm's transactions.

On one host a message counts in its sender's quota (``agent_usage``) from its commit
until its recipient acks it. Across hosts the same holds, with the sending host keeping
the count and the receiving host saying when it ends:

- **Sending host** (``a``): an item that will put a message in an inbox on host ``b``
  (a ``message``, a ``question``'s copy in the target's inbox, an ``answer``) adds to
  its sender's ``agent_usage`` in the transaction that queues it, and to
  ``swarm_sent(agent, host)`` (``rows``, ``bytes``: everything ever sent there). So
  ``check_store_quota`` refuses an over-quota cross-host send exactly as a local one,
  whether the item waits in the outbox, rides the bus or waits in b's inbox.
- **Receiving host** (``b``): each such message it stores is noted in ``swarm_held``
  (its message id, sending host, sender, bytes) and counted in ``swarm_from(host,
  agent)``; a trigger on ``messages`` moves it from ``held`` to ``released`` when its
  recipient acks it (or it is deleted). An item b can't deliver (no such recipient, a
  question asked twice) is released at once. b publishes each sender's cumulative
  ``released`` (rows, bytes) in the roster bucket, ``released.<b>.<a>.<agent>``, of
  only what came in the bundles of ``a``'s current store (each names it; the report
  does too: ``sender_gen_tx``), so that both hosts count the same messages.
- ``a`` applies a report only upward and never past what it sent there
  (``release_tx``): the released part leaves the sender's ``agent_usage``. A host that
  never reports (or is gone) holds its agents' quota as a recipient that never reads
  does on one host; a host can release no more than was sent to it.
- Each report also names the receiving store (``swarm_epoch``: random, drawn once per
  store). A store reset (a host installed again) starts its counts at 0: reports applied
  only upward gave nothing back until the new counts passed the old ones, and an honest
  sender whose quota filled meanwhile could send nothing to anyone. A report from a new
  store releases what was sent there and not yet released (the old store, with what it
  held, is gone), and its counts add to that (``swarm_sent_epoch``).

``b`` also bounds what it holds for other hosts (``Room``): per remote sender its own
``[limits]`` quota, per sending host ``[swarm] host_pending_max`` / ``host_store_mib``.
An item past a bound is not stored: the bundle is stored up to it, not acked, and tried
again (back-pressure on that host's consumer only; what was stored is in ``swarm_seen``,
so the redelivery skips it). Nothing the bus acked is ever dropped for a bound.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import string
from typing import Any, TypeGuard

from hyperhive.core.store.db import Tx

# Kinds whose item puts a message in an inbox on the receiving host (withdraw: nothing;
# cancel: its sender was destroyed, nobody's quota to keep).
COUNTED = frozenset({"message", "question", "answer"})

HEX = frozenset(string.hexdigits.lower())  # what a store epoch is spelled with

TABLES = """
CREATE TABLE IF NOT EXISTS swarm_sent (
    agent TEXT NOT NULL,
    host TEXT NOT NULL,
    rows INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    released_rows INTEGER NOT NULL DEFAULT 0,
    released_bytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (agent, host)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS swarm_sent_epoch (
    agent TEXT NOT NULL,
    host TEXT NOT NULL,
    epoch TEXT NOT NULL,
    base_rows INTEGER NOT NULL DEFAULT 0,
    base_bytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (agent, host)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS swarm_host_epoch (
    host TEXT PRIMARY KEY,
    epoch TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS swarm_epoch (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    epoch TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS swarm_held (
    message_id INTEGER PRIMARY KEY,
    host TEXT NOT NULL,
    agent TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    gen INTEGER
);
CREATE TABLE IF NOT EXISTS swarm_sender (
    host TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    gen INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS swarm_from (
    host TEXT NOT NULL,
    agent TEXT NOT NULL,
    held_rows INTEGER NOT NULL DEFAULT 0,
    held_bytes INTEGER NOT NULL DEFAULT 0,
    released_rows INTEGER NOT NULL DEFAULT 0,
    released_bytes INTEGER NOT NULL DEFAULT 0,
    reported_rows INTEGER NOT NULL DEFAULT 0,
    reported_bytes INTEGER NOT NULL DEFAULT 0,
    gen INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (host, agent)
) WITHOUT ROWID;
"""

# A message from another host leaves swarm_held (and its bytes move from held to released)
# when its recipient acks it or it is deleted: the same two moments as agent_usage's. A
# row's released and reported counts are of its sending host's store generation
# ``swarm_from.gen`` (sender_gen_tx): only a message held in that generation adds to them;
# any other leaves what this host holds and nothing else. A row is moved to a new
# generation (its counts from 0) by the next message of that sender's taken here (Room),
# and is reported only while its generation is the current one (``unreported``).
_BYTES = "(SELECT bytes FROM swarm_held WHERE message_id = OLD.id)"
_COUNTS = "(SELECT coalesce(gen, 0) = swarm_from.gen FROM swarm_held WHERE message_id = OLD.id)"
_RELEASE = f"""
    UPDATE swarm_from SET held_rows = held_rows - 1,
        held_bytes = held_bytes - {_BYTES},
        released_rows = released_rows + {_COUNTS},
        released_bytes = released_bytes + {_COUNTS} * {_BYTES}
    WHERE (host, agent) = (SELECT host, agent FROM swarm_held WHERE message_id = OLD.id);
    DELETE FROM swarm_held WHERE message_id = OLD.id;
"""
# Made again at each start (dropped first): a store of before has them without ``gen``.
TRIGGERS = [
    "CREATE TRIGGER swarm_held_acked AFTER UPDATE OF acked_at ON messages"
    f" WHEN OLD.acked_at IS NULL AND NEW.acked_at IS NOT NULL BEGIN {_RELEASE} END",
    "CREATE TRIGGER swarm_held_out AFTER DELETE ON messages"
    f" WHEN OLD.acked_at IS NULL BEGIN {_RELEASE} END",
]
TRIGGER_NAMES = ("swarm_held_acked", "swarm_held_out")
UNCOUNTED = -1  # swarm_held.gen of a message no store of its sending host counted


def item_bytes(body: str, options: Any) -> int:
    """What an item costs in the quota: its body and options, as a message row counts
    them (both hosts compute it alike, so a report matches what was sent)."""
    extra = len(json.dumps(options).encode()) if isinstance(options, list) else 0
    return len(body.encode()) + extra


# -- the sending host ---------------------------------------------------------------------


def sent_tx(tx: Tx, agent: str, host: str, nbytes: int) -> None:
    """One counted item from ``agent`` queued to ``host``: in its quota until released."""
    tx.execute(
        "INSERT INTO swarm_sent (agent, host, rows, bytes) VALUES (?, ?, 1, ?) ON CONFLICT"
        " (agent, host) DO UPDATE SET rows = rows + 1, bytes = bytes + excluded.bytes",
        (agent, host, nbytes),
    )
    tx.execute(
        "INSERT INTO agent_usage (agent, pending, bytes) VALUES (?, 1, ?) ON CONFLICT (agent)"
        " DO UPDATE SET pending = pending + 1, bytes = bytes + excluded.bytes",
        (agent, nbytes),
    )


def release_tx(tx: Tx, host: str, agent: str, rows: int, nbytes: int, epoch: str = "") -> bool:
    """``host`` reports it has released ``rows`` / ``nbytes`` of ``agent``'s items in all,
    counted by its store ``epoch``: the part not released before leaves ``agent``'s
    quota. Only upward, and never past what was sent there (a hostile host can release
    only what was sent to it). A report from another store than the last one's (its
    store was reset: its counts start again at 0) first releases everything sent there
    until now, and its counts then add to that. Whether anything changed."""
    r = tx.execute(
        "SELECT rows, bytes, released_rows, released_bytes FROM swarm_sent"
        " WHERE agent=? AND host=?",
        (agent, host),
    ).fetchone()
    if r is None:
        return False
    h = tx.execute("SELECT epoch FROM swarm_host_epoch WHERE host=?", (host,)).fetchone()
    if h is not None and h[0] != epoch:
        # Not the store the host's heartbeat names: the old one's last report, replayed by
        # a watch started again after the reset (taken for a new store, it released again
        # what the new one holds), or the new one's ahead of its heartbeat (whose rebase
        # releases what it would have).
        return False
    e = tx.execute(
        "SELECT epoch, base_rows, base_bytes FROM swarm_sent_epoch WHERE agent=? AND host=?",
        (agent, host),
    ).fetchone()
    base = (0, 0)
    if e is None or not e[0]:
        # The first report of a store (or the first since an upgrade from reports without
        # one, the same store counting on): its counts are the cumulative ones.
        _epoch_tx(tx, agent, host, epoch, base)
    elif e[0] != epoch:
        # A new store there: what the old one held is gone with it, and what it had yet
        # to receive the new one counts again (released twice: at worst the sender's
        # quota undercounts what was in flight, which a hostile host could release anyway).
        base = (int(r[0]), int(r[1]))
        _epoch_tx(tx, agent, host, epoch, base)
    else:
        base = (int(e[1]), int(e[2]))
    rows, nbytes = base[0] + rows, base[1] + nbytes
    new_rows, new_bytes = min(max(rows, r[2]), r[0]), min(max(nbytes, r[3]), r[1])
    d_rows, d_bytes = new_rows - r[2], new_bytes - r[3]
    if not (d_rows or d_bytes):
        return False
    tx.execute(
        "UPDATE swarm_sent SET released_rows=?, released_bytes=? WHERE agent=? AND host=?",
        (new_rows, new_bytes, agent, host),
    )
    tx.execute(
        "UPDATE agent_usage SET pending = pending - ?, bytes = bytes - ? WHERE agent=?",
        (d_rows, d_bytes, agent),
    )
    return True


def _epoch_tx(tx: Tx, agent: str, host: str, epoch: str, base: tuple[int, int]) -> None:
    tx.execute(
        "INSERT INTO swarm_sent_epoch (agent, host, epoch, base_rows, base_bytes)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (agent, host) DO UPDATE SET epoch ="
        " excluded.epoch, base_rows = excluded.base_rows, base_bytes = excluded.base_bytes",
        (agent, host, epoch, *base),
    )


def host_epoch_tx(tx: Tx, host: str, epoch: str) -> int:
    """``host``'s heartbeat names its store ``epoch``. A new one (its store was reset):
    each of our agents' items sent there and not yet released is released, whether or not
    that agent ever hears from the new store (one whose quota the lost store filled would
    send nothing more there, and so get no report: wedged). How many agents it freed."""
    r = tx.execute("SELECT epoch FROM swarm_host_epoch WHERE host=?", (host,)).fetchone()
    tx.execute(
        "INSERT INTO swarm_host_epoch (host, epoch) VALUES (?, ?) ON CONFLICT (host)"
        " DO UPDATE SET epoch = excluded.epoch",
        (host, epoch),
    )
    if r is None or r[0] == epoch:
        return 0  # the first we hear of it (its counts are cumulative): as reports say
    agents = tx.execute(
        "SELECT s.agent FROM swarm_sent s LEFT JOIN swarm_sent_epoch e ON (e.agent, e.host)"
        " = (s.agent, s.host) WHERE s.host=? AND coalesce(e.epoch, '') != ?",
        (host, epoch),
    ).fetchall()
    freed = 0
    for (agent,) in agents:
        # Marked as of an old store, so that the report of 0 in the new one rebases.
        _epoch_tx(tx, agent, host, str(r[0]) or "-", (0, 0))
        freed += release_tx(tx, host, agent, 0, 0, epoch)
    return freed


def is_epoch(value: object) -> TypeGuard[str]:
    """Whether another host's heartbeat or report names a store as stores name themselves
    (``store_epoch``: hex, here at most 64 digits). Any other string was taken too, and a
    new epoch is a warning in this host's log naming it: a newline in it was a line of
    that host's own in ours (red team round 15)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and HEX.issuperset(value)


def store_epoch(tx: Tx) -> str:
    """This store's name in its reports: drawn once, when its swarm tables are made."""
    r = tx.execute("SELECT epoch FROM swarm_epoch WHERE one = 1").fetchone()
    if r is not None:
        return str(r[0])
    epoch = secrets.token_hex(8)
    tx.execute("INSERT INTO swarm_epoch (one, epoch) VALUES (1, ?)", (epoch,))
    return epoch


# -- the receiving host -------------------------------------------------------------------


_FROM_GEN = "gen INTEGER NOT NULL DEFAULT 0"


def migrate_tx(tx: Tx) -> None:
    """A store of before: swarm_held and swarm_from without ``gen`` (their rows: 0, the
    generation a host with no swarm_sender row counts in), the triggers without it."""
    for table, column in (("swarm_held", "gen INTEGER"), ("swarm_from", _FROM_GEN)):
        cols = {r[1] for r in tx.execute(f"PRAGMA table_info({table})").fetchall()}
        if "gen" not in cols:
            tx.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    for name in TRIGGER_NAMES:
        tx.execute(f"DROP TRIGGER IF EXISTS {name}")
    for trigger in TRIGGERS:
        tx.execute(trigger)


def sender_gen_tx(tx: Tx, host: str, epoch: str | None) -> int:
    """A bundle from ``host`` whose publisher's store is ``epoch`` (its header; None: it
    named none). The generation its counted items are held in: what ``host``'s current
    store counted, and so what this host reports to it, is only what came in that store's
    bundles. A report counting anything else stayed ahead of the sender's count for good
    (a clipped it at what was sent, then gave each later message back early): a bundle
    its store never counted (its store reset, a core of before, anyone with its NATS
    password) was released like the others. A new epoch (the sender's store reset: its
    counts start at 0) starts a new generation, the counts reported to it at 0; a pair's
    bundles come in order, so an old store's never follow a new one's. None (a core of
    before names no store): counted, until that host's bundles have named one
    (``UNCOUNTED`` then)."""
    r = tx.execute("SELECT epoch, gen FROM swarm_sender WHERE host=?", (host,)).fetchone()
    if epoch is None:
        return 0 if r is None else UNCOUNTED
    if r is None:
        # The first named: what was counted before came from that host's one store (a
        # core of before, upgraded), and goes on.
        tx.execute("INSERT INTO swarm_sender (host, epoch, gen) VALUES (?, ?, 0)", (host, epoch))
        return 0
    if r[0] == epoch:
        return int(r[1])
    # One row written, whatever that host's agents: its counts start again as each is next
    # touched (swarm_from.gen), not all here (a host may name a new store every bundle).
    gen = int(r[1]) + 1
    tx.execute("UPDATE swarm_sender SET epoch=?, gen=? WHERE host=?", (epoch, gen, host))
    return gen


class Room:
    """What this host still takes from host ``host`` in one bundle's transaction: per
    sender its own quota (``per_agent``: rows, bytes), in all ``per_host``; what it holds
    counted in generation ``gen`` (sender_gen_tx)."""

    def __init__(
        self,
        tx: Tx,
        host: str,
        per_agent: tuple[int, int],
        per_host: tuple[int, int],
        gen: int = 0,
    ) -> None:
        self._tx, self._host, self._gen = tx, host, gen
        g = tx.execute("SELECT gen FROM swarm_sender WHERE host=?", (host,)).fetchone()
        self._current = 0 if g is None else int(g[0])  # gen unless UNCOUNTED
        self._per_agent, self._per_host = per_agent, per_host
        r = tx.execute(
            "SELECT coalesce(sum(held_rows), 0), coalesce(sum(held_bytes), 0) FROM swarm_from"
            " WHERE host=?",
            (host,),
        ).fetchone()
        self._total = (int(r[0]), int(r[1]))
        self._agents: dict[str, tuple[int, int]] = {}

    def _of(self, agent: str) -> tuple[int, int]:
        held = self._agents.get(agent)
        if held is None:
            r = self._tx.execute(
                "SELECT held_rows, held_bytes FROM swarm_from WHERE host=? AND agent=?",
                (self._host, agent),
            ).fetchone()
            held = self._agents[agent] = (0, 0) if r is None else (int(r[0]), int(r[1]))
        return held

    def fits(self, agent: str, nbytes: int) -> bool:
        """One more item of ``nbytes`` from ``agent``. One alone always fits (nothing held):
        a bound smaller than one item must not stop that sender for good."""
        return _fits(self._of(agent), nbytes, self._per_agent) and _fits(
            self._total, nbytes, self._per_host
        )

    def hold(self, message_id: int, agent: str, nbytes: int) -> None:
        """A message from ``agent`` stored: held here until its recipient acks it."""
        self._tx.execute(
            "INSERT INTO swarm_held (message_id, host, agent, bytes, gen) VALUES (?, ?, ?, ?, ?)",
            (message_id, self._host, agent, nbytes, self._gen),
        )
        self._count(agent, 1, nbytes, 0, 0)
        rows, held = self._of(agent)
        self._agents[agent] = (rows + 1, held + nbytes)
        self._total = (self._total[0] + 1, self._total[1] + nbytes)

    def release(self, agent: str, nbytes: int) -> None:
        """An item from ``agent`` that delivered nothing here: released at once (reported
        if its sending host's store counted it)."""
        if self._gen != UNCOUNTED:
            self._count(agent, 0, 0, 1, nbytes)

    def _count(self, agent: str, hr: int, hb: int, rr: int, rb: int) -> None:
        # A row of an older generation moves to the current one, its counts from 0.
        self._tx.execute(
            "INSERT INTO swarm_from (host, agent, held_rows, held_bytes, released_rows,"
            " released_bytes, gen) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (host, agent) DO"
            " UPDATE SET held_rows = held_rows + excluded.held_rows, held_bytes = held_bytes"
            " + excluded.held_bytes, released_rows = (gen = excluded.gen) * released_rows +"
            " excluded.released_rows, released_bytes = (gen = excluded.gen) * released_bytes"
            " + excluded.released_bytes, reported_rows = (gen = excluded.gen) * reported_rows,"
            " reported_bytes = (gen = excluded.gen) * reported_bytes, gen = excluded.gen",
            (self._host, agent, hr, hb, rr, rb, self._current),
        )


def _fits(held: tuple[int, int], nbytes: int, bound: tuple[int, int]) -> bool:
    return held[0] == 0 or (held[0] + 1 <= bound[0] and held[1] + nbytes <= bound[1])


Unreported = tuple[str, str, int, int, str]


def unreported(conn: sqlite3.Connection, limit: int) -> list[Unreported]:
    """(host, agent, released rows, released bytes, the store of that host they count
    for: "" if it named none) whose report is behind (a read, four times a second: no
    write transaction)."""
    rows = conn.execute(
        "SELECT f.host, f.agent, f.released_rows, f.released_bytes, coalesce(g.epoch, '')"
        " FROM swarm_from f LEFT JOIN swarm_sender g ON g.host = f.host WHERE"
        " f.gen = coalesce(g.gen, 0) AND (f.released_rows != f.reported_rows"
        " OR f.released_bytes != f.reported_bytes) LIMIT ?",
        (limit,),
    ).fetchall()
    return [(r[0], r[1], int(r[2]), int(r[3]), str(r[4])) for r in rows]


def reported_tx(tx: Tx, done: list[Unreported]) -> None:
    """``done`` is in the bucket; not a count of a store of that host's gone meanwhile
    (sender_gen_tx set its counts at 0: the new ones are reported as they come)."""
    tx.executemany(
        "UPDATE swarm_from SET reported_rows=?, reported_bytes=? WHERE host=? AND agent=?"
        " AND coalesce((SELECT epoch FROM swarm_sender WHERE host=?), '') = ?",
        [(r, b, h, a, h, e) for h, a, r, b, e in done],
    )

"""The swarm's names on the bus: subjects, streams, consumers and roster keys
(docs/swarm.md, "Subjects and streams"). Every other module spells them through here."""

from __future__ import annotations

# The messages between hosts: a work queue, one subject per (receiving, sending) pair, each
# read by that pair's one consumer; a bundle the receiver has committed and acked leaves
# the stream, and a pair keeps at most its newest MAIL_PAIR_MSGS bundles of MAIL_MSG_BYTES,
# so no host holds more of the store than its pairs' bounds (red team round 11,
# ``swarm-store-fill``). An honest sender never has more than MAIL_WINDOW of its bundles
# unacked on a pair (bridge.py asks the pair's consumer), so the bound only ever drops a
# host's own flood. JetStream can't change a stream's retention in place, so these are new
# names (docs/swarm.md, "Upgrading to the work queues"); the old streams are only drained.
STREAM = "HIVE_MAIL"
MSG_ROOT = "hive.mail"
MAIL_PAIR_MSGS = 64
MAIL_WINDOW = 48
# A bundle is at most 512 KiB of rows, or one row alone (its body came in one line of at
# most 1 MiB: wire/framing.py); twice that is refused as no honest host's.
MAIL_MSG_BYTES = 2 << 20
# A bundle's header naming the publishing host's store (its quota epoch): what the
# receiver reports of its rows counts for that store only (swarm/quota.py, sender_gen_tx).
STORE_HEADER = "Hive-Store"
LEGACY_STREAM = "HIVE_MSGS"  # before: limits retention, hive.msg.>, read to its end
LEGACY_MSG_ROOT = "hive.msg"
# Each host's roster keys (its rows, heartbeat, name claims, questions, approvals,
# outcomes, released counts) live in a bucket of its own, HIVE_ROSTER_<host>, bounded by
# NATS on its own: a host that fills its bucket fills nothing another host writes.
BUCKET_PREFIX = "HIVE_ROSTER_"
LEGACY_BUCKET = "HIVE_ROSTER"  # the one shared bucket before (left alone: docs/swarm.md)
MAX_AGE_SECONDS = 7 * 24 * 3600  # a host may be away this long before its mail expires
# A roster row is an agent's name, host, flags and status text (at most 4,096 characters,
# up to 6 bytes each as JSON): 64 KiB holds any; a host's bucket holds 1,024 of the
# largest, and ROSTER_HOST_KEYS keys in all (its live keys and the deletes it has not
# purged yet: bridge.py purges deletes older than PURGE_AFTER_SECONDS).
ROSTER_VALUE_BYTES = 64 << 10
ROSTER_HOST_BYTES = 64 << 20
ROSTER_HOST_KEYS = 65_536
PURGE_AFTER_SECONDS = 600
DEDUP_SECONDS = 600  # JetStream drops a republished Nats-Msg-Id within this window
ACK_WAIT_SECONDS = 5.0  # a pulled message not acked within this is redelivered
REPLICAS = 3
STALE_SECONDS = 5.0  # a host whose heartbeat is older than this shows as unreachable


def msg_subject(to_host: str, from_host: str) -> str:
    """A message from ``from_host`` to ``to_host``."""
    return f"{MSG_ROOT}.{to_host}.from.{from_host}"


def inbox_filter(host: str) -> str:
    """Everything addressed to ``host``."""
    return f"{MSG_ROOT}.{host}.from.*"


def from_host_of(subject: str) -> str | None:
    """The sending host named by a message subject (what NATS's permissions vouch for),
    on the stream of now or of before (its pairs' bundles, drained after an upgrade)."""
    parts = subject.split(".")
    roots = (MSG_ROOT.split("."), LEGACY_MSG_ROOT.split("."))
    if len(parts) != 5 or parts[:2] not in roots or parts[3] != "from":
        return None
    return parts[4]


def consumer(host: str, from_host: str) -> str:
    """The durable pull consumer that holds ``host``'s place in what ``from_host`` sent
    it: one per pair, so one sending host never waits on another's bundle. ``_`` is in
    no host name, so the pair reads back one way only."""
    return f"inbox-{host}_{from_host}"


def inbox_prefix(host: str) -> str:
    """``host``'s reply subjects: the only ones it may subscribe to."""
    return f"_INBOX_{host}"


def bucket(host: str) -> str:
    """``host``'s roster bucket: only ``host`` writes it, every host reads it."""
    return f"{BUCKET_PREFIX}{host}"


def kv_stream(host: str) -> str:
    """The stream behind ``host``'s roster bucket."""
    return f"KV_{bucket(host)}"


def host_of_stream(stream: str) -> str | None:
    """The host whose roster bucket ``stream`` is, or None (the caller checks the name)."""
    prefix = f"KV_{BUCKET_PREFIX}"
    return stream[len(prefix) :] if stream.startswith(prefix) else None


def watcher(reader: str) -> str:
    """The one consumer ``reader`` may have on each roster bucket (its watch of it): NATS
    lets it create consumers under this name only, so it holds at most one a bucket."""
    return f"w_{reader}"


def kv_subject(host: str, key: str) -> str:
    """The subject a put of ``key`` in ``host``'s bucket is published on."""
    return f"$KV.{bucket(host)}.{key}"


def key_host(key: str) -> str | None:
    """The host a roster key names (its writer: NATS lets only that host write a key
    naming it, in its own bucket); None for a key of no known form."""
    parts = key.split(".")
    if parts[0] == "names" and len(parts) == 3:
        return parts[2]
    if parts[0] in ("agents", "released", "questions", "approvals", "results", "hosts"):
        return parts[1] if len(parts) >= 2 else None
    return None


def name_key(agent: str, host: str) -> str:
    """``host``'s claim of agent name ``agent`` (value: the host), in ``host``'s bucket.
    The name is the earliest live claim's: the lowest (time the bus stored it, host)."""
    return f"names.{agent}.{host}"


def row_key(host: str, agent: str) -> str:
    return f"agents.{host}.{agent}"


def released_key(host: str, from_host: str, agent: str) -> str:
    """What ``host`` has released in all of ``from_host``'s ``agent``'s messages (the
    storage quota across hosts, swarm/quota.py): only ``host`` may write it."""
    return f"released.{host}.{from_host}.{agent}"


def host_key(host: str) -> str:
    """``host``'s heartbeat (value: its clock), put every roster round."""
    return f"hosts.{host}"


# -- the operator's roster and actions (swarm/operator.py) -------------------------------

# A work queue as HIVE_MAIL is (one subject and one consumer a pair, an action acked by
# its receiver leaves it), each pair keeping its newest ACTIONS_PAIR_MSGS actions of at
# most MAX_ACTION_BYTES: what a host publishes to a host that obeys no operator of its
# own waits unread, but never more than that (red team round 11, ``swarm-store-fill``);
# an operator is refused an action past ACTIONS_WINDOW unread ones (operator.py).
OPS_STREAM = "HIVE_ACTIONS"
OPS_ROOT = "hive.action"
ACTIONS_PAIR_MSGS = 64
ACTIONS_WINDOW = 48
LEGACY_OPS_STREAM = "HIVE_OPS"  # before: limits retention, hive.op.>, read to its end
LEGACY_OPS_ROOT = "hive.op"
OPS_MAX_AGE_SECONDS = 3600  # a signed action is refused after 5 minutes anyway


def op_subject(to_host: str, from_host: str) -> str:
    """A signed operator action from ``from_host``'s operator to ``to_host``."""
    return f"{OPS_ROOT}.{to_host}.from.{from_host}"


def ops_filter(host: str, from_host: str) -> str:
    """What ``host``'s consumer of ``from_host``'s actions takes: that pair's subject."""
    return op_subject(host, from_host)


def op_from_host_of(subject: str) -> str | None:
    """The sending host named by an action's subject (NATS's permissions vouch for it),
    on the stream of now or of before (its pairs' actions, read to the end after an
    upgrade: each stream holds only its own root's subjects)."""
    parts = subject.split(".")
    roots = (OPS_ROOT.split("."), LEGACY_OPS_ROOT.split("."))
    if len(parts) != 5 or parts[:2] not in roots or parts[3] != "from":
        return None
    return parts[4]


def ops_consumer(host: str, from_host: str) -> str:
    """The durable pull consumer of the operator actions ``from_host`` carries to
    ``host``: one per pair, as the inboxes are, so what one host publishes to ``host``
    (refused, but one at a time) never queues ahead of another host's operator's actions
    (red team round 11); ``host`` pulls only its pinned operators' hosts' consumers."""
    return f"ops-{host}_{from_host}"


def question_key(host: str, qid: int) -> str:
    """An open question to the operator from an agent on ``host`` (value: its summary)."""
    return f"questions.{host}.{qid}"


def approval_key(host: str, aid: int) -> str:
    """A pending approval of an agent on ``host`` (value: its summary, with its sha256)."""
    return f"approvals.{host}.{aid}"


def result_key(host: str, from_host: str, action_id: str) -> str:
    """What ``host`` made of the operator action ``from_host`` carried there (value: ok or
    the refusal). The sending host is part of the key: an action id is that host's own,
    so another host's action under the same id can't write over its outcome."""
    return results_key(host, result_ident(from_host, action_id))


def results_key(host: str, ident: str) -> str:
    """``result_key`` by its last token, as a watch hands it over."""
    return f"results.{host}.{ident}"


def result_ident(from_host: str, action_id: str) -> str:
    """The last token of ``result_key``: the sender, then its action id (32 hex)."""
    return f"{from_host}-{action_id}"


# -- another host's item whole (swarm/show.py) ----------------------------------------

SHOW_ROOT = "hive.show"  # a request: host <from> asks host <to> for one of its items
SHOWN_ROOT = "hive.shown"  # the reply: host <from> answers host <to>


def show_subject(to_host: str, from_host: str) -> str:
    """``from_host`` asks ``to_host`` for one of its pending approvals or open questions."""
    return f"{SHOW_ROOT}.{to_host}.from.{from_host}"


def shown_subject(to_host: str, from_host: str) -> str:
    """``from_host``'s answer to ``to_host``'s request (only ``to_host`` may read it)."""
    return f"{SHOWN_ROOT}.{to_host}.from.{from_host}"


def sender_of(root: str, subject: str) -> str | None:
    """The sending host a ``<root>.<to>.from.<from>`` subject names (NATS vouches for it)."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[:2] != root.split(".") or parts[3] != "from":
        return None
    return parts[4]

"""The swarm's names on the bus: subjects, streams, consumers and roster keys
(docs/swarm.md, "Subjects and streams"). Every other module spells them through here."""

from __future__ import annotations

STREAM = "HIVE_MSGS"
MSG_ROOT = "hive.msg"
BUCKET = "HIVE_ROSTER"
KV_STREAM = f"KV_{BUCKET}"
MAX_AGE_SECONDS = 7 * 24 * 3600  # a host may be away this long before its mail expires
# A roster row is an agent's name, host, flags and status text (at most 4,096 characters,
# up to 6 bytes each as JSON): 64 KiB holds any; the bucket holds 2,048 of the largest.
ROSTER_VALUE_BYTES = 64 << 10
ROSTER_BUCKET_BYTES = 128 << 20
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
    """The sending host named by a message subject (what NATS's permissions vouch for)."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[:2] != MSG_ROOT.split(".") or parts[3] != "from":
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


def name_key(agent: str, host: str) -> str:
    """``host``'s claim of agent name ``agent`` (value: the host). NATS lets each host
    write only its own claims; the name is the earliest live claim's (lowest revision)."""
    return f"names.{agent}.{host}"


def claims_filter(agent: str) -> str:
    """Every host's claim of agent name ``agent``."""
    return f"names.{agent}.*"


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

OPS_STREAM = "HIVE_OPS"
OPS_ROOT = "hive.op"
OPS_MAX_AGE_SECONDS = 3600  # a signed action is refused after 5 minutes anyway


def op_subject(to_host: str, from_host: str) -> str:
    """A signed operator action from ``from_host``'s operator to ``to_host``."""
    return f"{OPS_ROOT}.{to_host}.from.{from_host}"


def ops_filter(host: str) -> str:
    return f"{OPS_ROOT}.{host}.from.*"


def op_from_host_of(subject: str) -> str | None:
    """The sending host named by an action's subject (NATS's permissions vouch for it)."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[:2] != OPS_ROOT.split(".") or parts[3] != "from":
        return None
    return parts[4]


def ops_consumer(host: str) -> str:
    """The durable pull consumer of the operator actions carried to ``host``."""
    return f"ops-{host}"


def question_key(host: str, qid: int) -> str:
    """An open question to the operator from an agent on ``host`` (value: its summary)."""
    return f"questions.{host}.{qid}"


def approval_key(host: str, aid: int) -> str:
    """A pending approval of an agent on ``host`` (value: its summary, with its sha256)."""
    return f"approvals.{host}.{aid}"


def result_key(host: str, action_id: str) -> str:
    """What ``host`` made of a carried operator action (value: ok or the refusal)."""
    return f"results.{host}.{action_id}"


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

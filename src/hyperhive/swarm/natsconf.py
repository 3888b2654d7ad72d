"""Each host's NATS permissions, and a nats-server config for one node of the
swarm's cluster (docs/swarm.md, "Permissions"), its JetStream store sized from the
number of hosts (docs/swarm.md, "What the streams hold"). No ``nats`` import: pure data.

    python -m hyperhive.swarm.natsconf --name n1 --listen 10.0.0.1 \\
        --route 10.0.0.2 --route 10.0.0.3 --store /var/lib/nats \\
        --admin-password-file /etc/nats/admin --host a=/etc/nats/a --host b=/etc/nats/b \\
        [--max-store 64GiB]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hyperhive.names import NAME_RE
from hyperhive.swarm import subjects as s
from hyperhive.swarm.settings import user_of
from hyperhive.swarm.signing import MAX_ACTION_BYTES

ADMIN = "admin"
ACCOUNT = "HIVE"
GIB = 1 << 30
# What one ordered pair of hosts may hold at its worst: its newest MAIL_PAIR_MSGS bundles
# of MAIL_MSG_BYTES on HIVE_MAIL and ACTIONS_PAIR_MSGS actions of MAX_ACTION_BYTES on
# HIVE_ACTIONS (bus.py: 224 MiB).
PAIR_BYTES = s.MAIL_PAIR_MSGS * s.MAIL_MSG_BYTES + s.ACTIONS_PAIR_MSGS * MAX_ACTION_BYTES
# JetStream's file store is never given less than before (4 GiB: room beside the bounded
# streams for the unbounded ones of before, read to their end after an upgrade), and a
# quarter more than the streams' bound (each stream's and consumer's raft log and index).
STORE_MIN = 4 * GIB
UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": GIB, "t": 1 << 40}


def store_needed(hosts: int) -> int:
    """Bytes the swarm's streams may hold on each node at their worst, every host at its
    bound: hosts × (hosts − 1) pairs of PAIR_BYTES, and each host's roster bucket."""
    return hosts * (hosts - 1) * PAIR_BYTES + hosts * s.ROSTER_HOST_BYTES


def store_size(hosts: int) -> int:
    """The JetStream file store to give each node of a swarm of ``hosts``: the streams'
    bound and a quarter more, in whole GiB, at least STORE_MIN."""
    wanted = store_needed(hosts) * 5 // 4
    return max(STORE_MIN, -(-wanted // GIB) * GIB)


def parse_size(text: str) -> int:
    """``64GiB``, ``64G``, ``64GB`` (each 64 × 2^30: binary, as NATS reads its own
    sizes), ``1024MiB``, or a number of bytes."""
    m = re.fullmatch(r"\s*(\d{1,20})\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if m is None or (m.group(2) == "" and text.strip().lower().endswith("ib")):
        raise ValueError(f"{text!r} is not a size (say 64GiB, 512MiB or a number of bytes)")
    return int(m.group(1)) * UNITS[m.group(2).lower()]


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def check_store(hosts: int, max_file_store: int) -> None:
    """Refused (ValueError, one line) if a node's store of ``max_file_store`` bytes can't
    hold what ``hosts`` hosts' streams may hold at their worst: past it JetStream refuses
    every host's writes, not only the one that filled it."""
    needed = store_needed(hosts)
    if max_file_store < needed:
        raise ValueError(
            f"{hosts} hosts' streams may hold {_gib(needed)} on each node ({hosts} × "
            f"{hosts - 1} pairs × {PAIR_BYTES >> 20} MiB, and {s.ROSTER_HOST_BYTES >> 20} MiB"
            f" of roster a host): a JetStream store of {_gib(max_file_store)} can't hold it"
            f" (give at least {_gib(store_size(hosts))})"
        )


def check_disk(store_dir: Path, max_file_store: int) -> None:
    """Refused (ValueError, one line) if ``store_dir`` is here and its filesystem can't
    hold ``max_file_store`` beside what is on it now: its free space and what the store
    already holds. (Rendered elsewhere, the node's disk is the admin's to check.)"""
    if not store_dir.is_dir():
        return
    held = 0
    for root, _, files in os.walk(store_dir):
        for name in files:
            try:
                held += (Path(root) / name).lstat().st_size
            except OSError:
                continue  # gone meanwhile
    room = shutil.disk_usage(store_dir).free + held
    if room < max_file_store:
        raise ValueError(
            f"{store_dir}'s filesystem has {_gib(room)} for JetStream (free, and what its"
            f" store holds): it can't hold the {_gib(max_file_store)} the store is given"
        )


def host_permissions(host: str, hosts: Iterable[str]) -> dict[str, Any]:
    """What host ``host``'s user may publish and subscribe to: speak for itself only,
    read and ack only its own inboxes (one per other host of ``hosts``), read the shared
    roster, write only its own rows and its own name claims."""
    others = [other for other in sorted(hosts) if other != host]
    for name in (host, *others):  # a `*` or `>` in a name would be a wildcard in a permission
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"bad host name {name!r}")
    inboxes = []
    for durable in (s.consumer(host, other) for other in others):
        # Its pairs' consumers on the message stream, and on the one of before (read to
        # its end after an upgrade: bridge.py; no host may publish there any more).
        for stream in (s.STREAM, s.LEGACY_STREAM):
            inboxes += [
                f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
                f"$JS.ACK.{stream}.{durable}.>",
            ]
    # How far each other host has read what this one sent it (INFO only, of the consumers
    # of its own pairs): a sender keeps below its pairs' bound (bridge.py, operator.py).
    for other in others:
        inboxes += [
            f"$JS.API.CONSUMER.INFO.{s.STREAM}.{s.consumer(other, host)}",
            f"$JS.API.CONSUMER.INFO.{s.OPS_STREAM}.{s.ops_consumer(other, host)}",
        ]
    # Its consumers of the actions each other host's operator carries to it (one a pair),
    # and the same pairs' on the stream of before (read to its end after an upgrade:
    # operator.py; no host may publish there any more).
    ops: list[str] = []
    for durable in (s.ops_consumer(host, other) for other in others):
        for stream in (s.OPS_STREAM, s.LEGACY_OPS_STREAM):
            ops += [
                f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
                f"$JS.ACK.{stream}.{durable}.>",
            ]
    # Every host's roster bucket is read by every host: its watch is one push consumer
    # under the one name the host may create there (s.watcher: NATS matches whole tokens,
    # so the name is exact), which it alone may delete and make again; no unnamed or
    # durable create, so a host holds at most one consumer a bucket, whatever its config
    # (red team round 9). Name claims are read by STREAM.MSG.GET, no consumer at all.
    # Stream names are single tokens, so each bucket is listed.
    watch = s.watcher(host)
    roster: list[str] = ["$JS.API.STREAM.NAMES"]  # to find the hosts' buckets
    for other in sorted({*hosts, host}):
        bucket = s.kv_stream(other)
        roster += [
            f"$JS.API.STREAM.INFO.{bucket}",
            f"$JS.API.STREAM.MSG.GET.{bucket}",
            f"$JS.API.DIRECT.GET.{bucket}.>",
            f"$JS.API.CONSUMER.CREATE.{bucket}.{watch}",
            f"$JS.API.CONSUMER.CREATE.{bucket}.{watch}.>",  # (the filter, in the subject)
            f"$JS.API.CONSUMER.INFO.{bucket}.{watch}",
            f"$JS.API.CONSUMER.DELETE.{bucket}.{watch}",
            f"$JS.FC.{bucket}.>",  # flow control replies of its watch
        ]
    own = s.kv_subject(host, "")  # "$KV.HIVE_ROSTER_<host>.": writes to its own bucket only
    return {
        "publish": {
            "allow": [
                # A message from one of its agents, to each configured host by name: a
                # `*` took any token (`hive.msg.zz.from.c`, read by no one, kept for a
                # week: red team round 11, ``swarm-store-fill``). Each pair's subject is
                # bounded in the stream (bus.py), so a host holds at most its pairs' share.
                *(s.msg_subject(other, host) for other in others),
                # Its own keys, each naming it, in its own bucket (bounded there by NATS).
                f"{own}agents.{host}.>",
                f"{own}{s.host_key(host)}",
                f"{own}{s.name_key('*', host)}",  # its own claims only
                f"{own}released.{host}.>",  # what it released (swarm/quota.py)
                # Its own bucket's old deletes (bridge.py): a purge there harms only itself.
                f"$JS.API.STREAM.PURGE.{s.kv_stream(host)}",
                *inboxes,
                "$JS.API.INFO",
                *roster,
                # The operator's roster and actions (swarm/operator.py): its own agents'
                # questions and approvals and its own results; actions it signs, on its
                # own subject; only its own consumers of the actions carried to it.
                *(s.op_subject(other, host) for other in others),
                f"{own}questions.{host}.>",
                f"{own}approvals.{host}.>",
                f"{own}results.{host}.>",
                *ops,
                # Another host's item whole (swarm/show.py): its requests and its answers
                # on subjects of its own (not reply subjects: no allow_responses, which
                # would let a host publish once to any subject it names as a reply).
                s.show_subject("*", host),
                s.shown_subject("*", host),
            ]
        },
        "subscribe": {
            "allow": [
                f"{s.inbox_prefix(host)}.>",
                s.show_subject(host, "*"),  # requests to it, and answers to it only
                s.shown_subject(host, "*"),
            ]
        },
    }


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid NATS config string


def _perm(p: dict[str, Any]) -> str:
    def allow(d: dict[str, list[str]]) -> str:
        return "{ allow: [" + ", ".join(_q(x) for x in d["allow"]) + "] }"

    return f"{{ publish: {allow(p['publish'])}, subscribe: {allow(p['subscribe'])} }}"


def server_config(
    *,
    name: str,
    listen: str,
    routes: Sequence[str],
    store_dir: Path,
    admin_password: str,
    hosts: Mapping[str, str],
    client_port: int = 4222,
    cluster_port: int = 6222,
    cluster: str = "hive",
    max_file_store: int | None = None,
) -> str:
    """One node's config: JetStream on, its file store ``max_file_store`` bytes (default:
    sized from the number of hosts, ``store_size``; refused if less than their streams'
    bound, ``check_store``), cluster routes to the others, the account with the admin user
    and one user per host (``hosts``: host -> password)."""
    store = store_size(len(hosts)) if max_file_store is None else max_file_store
    check_store(len(hosts), store)
    users = [f"{{ user: {_q(ADMIN)}, password: {_q(admin_password)} }}"]
    for host, password in sorted(hosts.items()):
        users.append(
            f"{{ user: {_q(user_of(host))}, password: {_q(password)},"
            f" permissions: {_perm(host_permissions(host, hosts))} }}"
        )
    route_urls = ", ".join(_q(f"nats-route://{r}:{cluster_port}") for r in routes)
    joined = ",\n      ".join(users)
    return f"""server_name: {_q(name)}
listen: {_q(f"{listen}:{client_port}")}
max_payload: 4MB
jetstream {{ store_dir: {_q(str(store_dir))}, max_memory_store: 64MB, max_file_store: {store} }}
cluster {{
  name: {_q(cluster)}
  listen: {_q(f"{listen}:{cluster_port}")}
  routes: [{route_urls}]
}}
accounts {{
  {ACCOUNT}: {{
    jetstream: enabled
    users: [
      {joined}
    ]
  }}
}}
"""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Render one swarm node's nats-server config.")
    p.add_argument("--name", required=True)
    p.add_argument("--listen", required=True, help="this node's address")
    p.add_argument("--route", action="append", default=[], help="another node's address")
    p.add_argument("--store", required=True, type=Path, help="JetStream's store directory")
    p.add_argument("--admin-password-file", required=True, type=Path)
    p.add_argument("--host", action="append", default=[], help="HOST=PASSWORD_FILE")
    p.add_argument(
        "--max-store",
        help="JetStream's file store on this node (64GiB, 512MiB, bytes); default: sized"
        " from the number of hosts. Refused if it, or the store's filesystem when it is"
        " here, can't hold what the hosts' streams may hold at their worst",
    )
    a = p.parse_args(argv)
    hosts = {}
    for item in a.host:
        host, sep, path = item.partition("=")
        if not sep:
            p.error(f"--host {item!r}: expected HOST=PASSWORD_FILE")
        hosts[host] = Path(path).read_text().splitlines()[0].strip()
    try:
        store = store_size(len(hosts)) if a.max_store is None else parse_size(a.max_store)
        check_store(len(hosts), store)
        check_disk(a.store, store)
        conf = server_config(
            name=a.name,
            listen=a.listen,
            routes=a.route,
            store_dir=a.store,
            admin_password=a.admin_password_file.read_text().splitlines()[0].strip(),
            hosts=hosts,
            max_file_store=store,
        )
    except ValueError as e:  # one line, nothing written
        sys.stderr.write(f"natsconf: {e}\n")
        return 1
    sys.stdout.write(conf)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

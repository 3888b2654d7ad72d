"""Each host's NATS permissions, and a nats-server config for one node of the
swarm's cluster (docs/swarm.md, "Permissions"). No ``nats`` import: pure data.

    python -m hyperhive.swarm.natsconf --name n1 --listen 10.0.0.1 \\
        --route 10.0.0.2 --route 10.0.0.3 --store /var/lib/nats \\
        --admin-password-file /etc/nats/admin --host a=/etc/nats/a --host b=/etc/nats/b
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hyperhive.names import NAME_RE
from hyperhive.swarm import subjects as s
from hyperhive.swarm.settings import user_of

ADMIN = "admin"
ACCOUNT = "HIVE"


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
) -> str:
    """One node's config: JetStream on, cluster routes to the others, the account with
    the admin user and one user per host (``hosts``: host -> password)."""
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
jetstream {{ store_dir: {_q(str(store_dir))}, max_memory_store: 64MB, max_file_store: 4GB }}
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
    a = p.parse_args(argv)
    hosts = {}
    for item in a.host:
        host, sep, path = item.partition("=")
        if not sep:
            p.error(f"--host {item!r}: expected HOST=PASSWORD_FILE")
        hosts[host] = Path(path).read_text().splitlines()[0].strip()
    sys.stdout.write(
        server_config(
            name=a.name,
            listen=a.listen,
            routes=a.route,
            store_dir=a.store,
            admin_password=a.admin_password_file.read_text().splitlines()[0].strip(),
            hosts=hosts,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

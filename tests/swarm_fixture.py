"""A swarm of three hives for the tests: ``SwarmNet``'s three test hosts (network
namespaces on one bridge, one NATS JetStream node each) and one hive per host, run
inside that host's network namespace with ``[swarm]`` pointing at its own node first.

``make_swarm`` (the session's ``swarm``) runs a hive-core per host (``CoreProcess``:
its store, host.sock and agent sockets; agents without cages), quick to start: the
protocol tests (tests/test_swarm.py, test_swarm_operator.py, test_swarm_listing.py)
and bench/swarm.py use it.

    alice on a (peers: bob), bob on b (peers: alice), carol on c (peers: alice)

``make_hive_swarm`` (the session's ``hive_swarm``) runs a whole hive per host
(``HiveProcess``, ``hive up``: hive-priv, hive-core, the nginx gateway and real cages):
tests/test_swarm_hives.py, the fault runs (tests/test_swarm_faults.py: the kills and
the partition), the hostile-host cases (tests/redteam/test_swarm*.py, rounds 5 to 7)
and round 7's cross-host storage quota use it, the last two through ``hives`` (every agent paused: the test reads the inboxes,
from the agents' cages, not the harnesses).

    alice on a (peers: bob, carol), bob (peers: alice, bea) and bea (peers: bob) on b,
    carol on c (peers: alice); each caged, its runtime HIVE_RUNTIME

Host a is the operator's console: b and c pin a's operator key (``[swarm] operators``),
so they carry out the operator actions a signs; c's own key is one nobody pins.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import nats
import pytest

from helpers import CoreProcess, assert_ok, wait_for
from hive_fixture import HiveProcess, _finish
from hyperhive.cli.core_identity import core_ids
from hyperhive.swarm import subjects as s
from hyperhive.swarm.bus import ensure_streams
from hyperhive.swarm.signing import load_or_create_key, public_b64
from swarmnet import SwarmNet

HOSTS = ["a", "b", "c"]
OPERATOR_HOST = "a"
AGENTS: dict[str, dict[str, dict[str, Any]]] = {
    "a": {"alice": {"runtime": "command", "command": ["true"], "peers": ["bob", "carol"]}},
    "b": {"bob": {"runtime": "command", "command": ["true"], "peers": ["alice"]}},
    "c": {"carol": {"runtime": "command", "command": ["true"], "peers": ["alice"]}},
}

# Every caged agent's runtime, run by its harness in its cage for each message it takes
# from its inbox (a turn): it prints what it got (the hive records it in the agent's
# transcript) and answers a "ping ..." from another agent with "pong ..." on its own socket.
HIVE_RUNTIME = ["python3", "-c", textwrap.dedent("""
    import json, os, socket, sys
    m = json.load(sys.stdin)
    print(json.dumps({k: m.get(k) for k in ("kind", "from", "body", "ref")}), flush=True)
    if m.get("kind") == "message" and m["body"].startswith("ping "):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(os.environ["HIVE_SOCKET"])
            s.sendall(json.dumps({"cmd": "send", "to": m["from"], "body": "pong " + m["body"][5:]}).encode() + b"\\n")
            print("replied", json.loads(s.makefile("rb").readline())["ok"], flush=True)
""")]
CAGED = {"runtime": "command", "command": HIVE_RUNTIME}
HIVE_AGENTS: dict[str, dict[str, dict[str, Any]]] = {
    "a": {"alice": {**CAGED, "peers": ["bob", "carol"]}},
    "b": {"bob": {**CAGED, "peers": ["alice", "bea"]}, "bea": {**CAGED, "peers": ["bob"]}},
    "c": {"carol": {**CAGED, "peers": ["alice"]}},
}
# Beside the session's core swarm, which may be up at the same time on
# HIVE_TEST_SWARM_SUBNET: these hosts' addresses must not be on two bridges at once.
HIVE_SUBNET_OFFSET = 64
# A burst big enough for pipelined streams (the fault runs, round 7's quota case): the
# rate limit is one host's, tested on its own elsewhere.
FAULT_LIMITS = {"message_burst": 100_000}


class HostSocket(Protocol):
    def host_call(self, cmd: str, **fields: Any) -> dict[str, Any]: ...


H = TypeVar("H", bound=HostSocket)


@dataclass
class Swarm(Generic[H]):
    """The test hosts and their hives: ``cores[h]`` is a ``CoreProcess`` (``make_swarm``)
    or a ``HiveProcess`` (``make_hive_swarm``); both answer on host.sock."""

    net: SwarmNet
    cores: dict[str, H] = field(default_factory=dict)
    operator_key: Path | None = None  # host a's operator signing key (its file)

    def status(self, host: str) -> dict[str, Any]:
        resp = self.cores[host].host_call("swarm_status")
        assert resp["ok"], resp
        swarm: dict[str, Any] = resp["swarm"]
        return swarm

    def wait_roster(self, host: str, n: int = 3) -> None:
        wait_for(lambda: self.status(host)["roster"] >= n, timeout=30)

    def wait_bus_whole(self, timeout: float = 60) -> None:
        """Until every node answers for every stream and every durable consumer, each with
        a leader and every replica current: what the next test, or the next fault, needs
        after a node was killed or a host cut off. A node back on the bridge may take a
        while to rejoin the routes and catch up; until it has, it is no help to a quorum
        (NATS's raft: a follower still catching up doesn't stand for leader), so cutting
        off another node meanwhile is two nodes away at once, which R3 doesn't survive."""
        durable = {
            s.STREAM: [s.consumer(h, o) for h in HOSTS for o in HOSTS if o != h],
            # Only the action consumers read (b's and c's of a's operator): one no host
            # reads gets an entry now and then (a purge of its subject moves its floor), and
            # a follower that was down for one stays behind until the next, which may never
            # come (after round 11's cases: ops-a_b's n-a, lag 2, for good). It holds up nothing.
            s.OPS_STREAM: [s.ops_consumer(h, OPERATOR_HOST) for h in HOSTS if h != OPERATOR_HOST],
            # the hosts' roster buckets: their consumers are the hosts' own watches
            **{s.kv_stream(h): [] for h in HOSTS},
        }

        def led(cluster: Any) -> bool:
            return cluster is not None and bool(cluster.leader) and all(
                r.current for r in cluster.replicas or [])  # fmt: skip

        async def whole() -> bool:
            user, password = self.net.admin()
            for host in HOSTS:
                try:
                    nc = await nats.connect([self.net.url(host)], user=user, password=password,
                                            allow_reconnect=False, connect_timeout=2)
                except Exception:
                    return False
                try:
                    js = nc.jetstream(timeout=2)
                    for stream, consumers in durable.items():
                        if not led((await js.stream_info(stream)).cluster):
                            return False
                        for name in consumers:
                            if not led((await js.consumer_info(stream, name)).cluster):
                                return False
                except Exception:
                    return False
                finally:
                    await nc.close()
            return True

        wait_for(lambda: asyncio.run(whole()), timeout=timeout, interval=0.5)


async def roster_buckets(nc: Any) -> dict[str, Any]:
    """Every test host's roster bucket on connection ``nc`` (for bridge.live_claims)."""
    js = nc.jetstream()
    return {h: await js.key_value(s.bucket(h)) for h in HOSTS}


def listed(node: HostSocket, cmd: str, key: str, host: str, rid: int) -> dict[str, Any] | None:
    """Row ``rid`` of ``host`` in ``node``'s ``cmd`` listing (``questions`` / ``pending``:
    the other hosts' rows under ``key``), or None."""
    resp = node.host_call(cmd)
    assert resp.get("ok"), resp
    rows: list[dict[str, Any]] = resp.get(key, [])
    return next((r for r in rows if (r["host"], r["id"]) == (host, rid)), None)


def heard(hive: HiveProcess, name: str) -> list[dict[str, Any]]:
    """What ``name``'s runtime got in its turns so far (its transcript's JSON lines)."""
    entries = assert_ok(hive.host_call("transcript", name=name, limit=5000))["entries"]
    return [json.loads(e["data"]) for e in entries if e["kind"] == "stdout" and e["data"].startswith("{")]


def hears(hive: HiveProcess, name: str, timeout: float = 20, **want: Any) -> dict[str, Any]:
    """Until ``name``'s runtime has got one message with the fields ``want``; that one."""
    def match() -> list[dict[str, Any]]:
        return [m for m in heard(hive, name) if all(m.get(k) == v for k, v in want.items())]

    got = wait_for(match, timeout=timeout, interval=0.1)
    assert len(got) == 1, got
    return got[0]


def admin_setup(net: SwarmNet) -> None:
    """As the admin: the stream, the inbox consumers and the roster bucket."""

    async def go() -> None:
        user, password = net.admin()
        nc = await nats.connect(net.urls("a"), user=user, password=password)
        try:
            await ensure_streams(nc, HOSTS)
        finally:
            await nc.close()

    asyncio.run(go())


def swarm_section(net: SwarmNet, host: str, operator_key: Path, public: str) -> dict[str, Any]:
    """``host``'s ``[swarm]``: its own node first; a keeps the operator key, b and c obey it."""
    return {
        "host": host,
        "urls": net.urls(host),
        "credentials": str(net.credentials(host)),
        **(
            {"operator_key": str(operator_key)}
            if host == OPERATOR_HOST
            else {"operators": {OPERATOR_HOST: public}}
        ),
    }


def make_swarm(
    base: Path,
    subnet: int,
    with_cores: tuple[str, ...] = tuple(HOSTS),
    agents: dict[str, dict[str, dict[str, Any]]] | None = None,
    limits: dict[str, Any] | None = None,
) -> Iterator[Swarm]:
    """The three test hosts with a hive-core each (``agents``: per host; default AGENTS)."""
    agents = AGENTS if agents is None else agents
    with SwarmNet(subnet, HOSTS, base) as net:
        swarm = Swarm(net, operator_key=base / "operator-a.key")
        public = public_b64(load_or_create_key(swarm.operator_key))
        try:
            for h in with_cores:
                d = base / f"core-{h}"
                d.mkdir()
                swarm.cores[h] = CoreProcess(
                    d,
                    agents[h],
                    sections={
                        **({"limits": limits} if limits else {}),
                        "swarm": swarm_section(net, h, swarm.operator_key, public),
                    },
                    wrap=net.netns_prefix(h),
                )
                swarm.cores[h].ready_timeout = 60  # three cores start at once
            # All at once: the bridges retry until the admin has made the streams.
            with ThreadPoolExecutor(len(with_cores) + 1) as pool:
                jobs = [pool.submit(admin_setup, net)]
                jobs += [pool.submit(c.start) for c in swarm.cores.values()]
                for job in jobs:
                    job.result()
            n = sum(len(agents[h]) for h in with_cores)
            for h in with_cores:
                swarm.wait_roster(h, n)
            yield swarm
        finally:
            with ThreadPoolExecutor(len(swarm.cores) or 1) as pool:
                list(pool.map(_stop, swarm.cores.values()))


def make_hive_swarm(
    subnet: int, agents: dict[str, dict[str, dict[str, Any]]], limits: dict[str, Any] | None = None
) -> Iterator[Swarm[HiveProcess]]:
    """The three test hosts with a whole hive each (``hive up`` in the host's network
    namespace, started at once): each host's hive-core runs under its own ids there
    (``hive core-id``), so the files it reads (the NATS password, a's operator key) are
    its own, 0600, as in production, under a directory it can reach (pytest's tmp is
    root's only)."""
    base = Path(tempfile.mkdtemp(prefix="hsw", dir="/tmp"))
    os.chmod(base, 0o755)
    (base / "net").mkdir()
    try:
        with SwarmNet(subnet, HOSTS, base / "net") as net:
            key = base / "net" / "operator-a.key"
            public = public_b64(load_or_create_key(key))
            swarm: Swarm[HiveProcess] = Swarm(net, operator_key=key)
            owned = [(key, OPERATOR_HOST)]
            for h in HOSTS:
                (base / h).mkdir()
                section = swarm_section(net, h, key, public)
                owned.append((Path(section["credentials"]), h))
                sections = {**({"limits": limits} if limits else {}), "swarm": section}
                swarm.cores[h] = HiveProcess(agents[h], base=base / h, sections=sections,
                                             wrap=net.net_prefix(h), listen_host=net.addr[h])  # fmt: skip
            for path, h in owned:
                core = core_ids(swarm.cores[h].state_dir)
                os.chown(path, core.uid, core.gid)
                path.chmod(0o600)
            try:
                # All at once: the bridges retry until the admin has made the streams.
                with ThreadPoolExecutor(len(HOSTS) + 1) as pool:
                    jobs = [pool.submit(admin_setup, net)]
                    jobs += [pool.submit(hive.start) for hive in swarm.cores.values()]
                    for job in jobs:
                        job.result()
                for h in HOSTS:
                    swarm.wait_roster(h, sum(len(agents[x]) for x in HOSTS))
                yield swarm
            finally:
                # Each stopped (exit 0, its cages empty) at once; every failure reported.
                with ThreadPoolExecutor(len(HOSTS)) as pool:
                    jobs = [pool.submit(_finish, [hive]) for hive in swarm.cores.values()]
                errors = [str(e) for job in jobs if (e := job.exception()) is not None]
                assert not errors, "\n".join(errors)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """One swarm of hive-cores for the session (the protocol's tests): each test leaves
    it as it found it (every core and every NATS node running)."""
    # The burst as on the whole hives: a test may pipeline its sends.
    yield from make_swarm(tmp_path_factory.mktemp("swarm"), subnet=swarm_subnet(), limits=FAULT_LIMITS)


def swarm_subnet() -> int:
    """A subnet of its own per concurrent suite (two suites on one machine, say)."""
    return int(os.environ.get("HIVE_TEST_SWARM_SUBNET", "181"))


@pytest.fixture(scope="session")
def hive_swarm() -> Iterator[Swarm[HiveProcess]]:
    """One swarm of whole hives for the session (HIVE_AGENTS, on ``hive_subnet()``, apart
    from the core swarm's): each test leaves it as it found it (every hive, every NATS node
    running, no agent paused, no message left in an inbox)."""
    yield from make_hive_swarm(hive_subnet(), HIVE_AGENTS, limits=FAULT_LIMITS)


def hive_subnet() -> int:
    """The whole hives' subnet: 64 above the hive-cores', wrapped within 128..255 (a
    suite on subnet 200 gets 136, not the 264 no address has)."""
    return 128 + (swarm_subnet() + HIVE_SUBNET_OFFSET - 128) % 128


@pytest.fixture
def hives(hive_swarm: Swarm[HiveProcess]) -> Iterator[Swarm[HiveProcess]]:
    """The whole-hive swarm with every agent paused for the test: their harnesses take
    no turns, so the test reads and acks their inboxes itself (as the fault runs and
    the hostile-host cases do); unpaused after."""
    hives = hive_swarm.cores.values()
    for hive in hives:
        for name in hive.names:
            assert hive.host_call("set_paused", name=name, paused=True)["ok"]
    try:
        yield hive_swarm
    finally:
        for hive in hives:
            for name in hive.names:
                assert hive.host_call("set_paused", name=name, paused=False)["ok"]


def _stop(core: CoreProcess) -> None:
    if core.running:
        core.stop()
    core.cleanup()

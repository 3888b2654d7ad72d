"""Three test hosts on one machine for the swarm (root only): network namespaces
``<tag>h1..h3`` on one bridge, each host at 198.18.<subnet>.1N, each running one node of
a 3-node NATS JetStream cluster (Debian's ``nats-server``), with per-host users.

    with SwarmNet(subnet=181, hosts=["a", "b", "c"], base=tmp) as net:
        net.url("a")           # nats://198.18.181.11:4222, the node in a's namespace
        net.kill9("a"); net.start_node("a")
        net.cut("a"); net.heal("a")   # a partition: a's link down, then up
        net.admin()            # (user, password) of the admin user
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from hyperhive.swarm.natsconf import ADMIN, server_config
from testnet import clear_stale

NATS_SERVER = shutil.which("nats-server") or "/usr/bin/nats-server"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class SwarmNet:
    __test__ = False  # not a pytest class

    def __init__(self, subnet: int, hosts: list[str], base: Path) -> None:
        self.subnet, self.hosts, self.base = subnet, hosts, base
        tag = f"sw{subnet}x{os.getpid() % 100000}"
        self.bridge = tag[:13] + "br"
        self.ns = {h: f"{tag}{h}" for h in hosts}
        self.veth = {h: f"{tag[:11]}{i}v" for i, h in enumerate(hosts)}
        self.addr = {h: f"198.18.{subnet}.{11 + i}" for i, h in enumerate(hosts)}
        self.passwords = {h: secrets.token_hex(16) for h in hosts}
        self.admin_password = secrets.token_hex(16)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def url(self, host: str) -> str:
        return f"nats://{self.addr[host]}:4222"

    def urls(self, first: str) -> list[str]:
        """Every node's URL, ``first``'s own node first (a host's client prefers its own)."""
        return [self.url(first)] + [self.url(h) for h in self.hosts if h != first]

    def credentials(self, host: str) -> Path:
        path = self.base / f"{host}.secret"
        path.write_text(self.passwords[host] + "\n")
        path.chmod(0o644)  # hive-core in the tests runs as root; in production 0600
        return path

    def netns_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host]]

    def net_prefix(self, host: str) -> list[str]:
        """Run in ``host``'s network namespace and nothing else of it: a whole hive
        (``hive up``) must see the machine's own mounts. ``ip netns exec`` also makes a
        mount namespace of its own and mounts a fresh sysfs on /sys, which hides
        /sys/fs/cgroup (hive-priv could make no cage's cgroup) and keeps hive-priv's
        mounts (the agents' homes) from the tests that look at them."""
        return ["nsenter", f"--net=/run/netns/{self.ns[host]}", "--"]

    def __enter__(self) -> SwarmNet:
        self.close()
        clear_stale(self.subnet)  # a killed run's bridge would keep the subnet's route
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"198.18.{self.subnet}.1/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for h in self.hosts:
                ns = self.ns[h]
                ip("netns", "add", ns)
                ip("link", "add", self.veth[h], "type", "veth", "peer", "name", "eth0", "netns", ns)
                ip("link", "set", self.veth[h], "master", self.bridge, "up")
                ip("-n", ns, "addr", "add", f"{self.addr[h]}/24", "dev", "eth0")
                ip("-n", ns, "link", "set", "lo", "up")
                ip("-n", ns, "link", "set", "eth0", "up")
            for h in self.hosts:
                self.start_node(h, wait=False)
            for h in self.hosts:
                self._wait_port(h)
        except BaseException:
            self.close()
            raise
        return self

    def start_node(self, host: str, wait: bool = True) -> None:
        conf = self.base / f"nats-{host}.conf"
        conf.write_text(
            server_config(
                name=f"n-{host}",
                listen=self.addr[host],
                routes=[self.addr[h] for h in self.hosts if h != host],
                store_dir=self.base / f"js-{host}",
                admin_password=self.admin_password,
                hosts=self.passwords,
            )
        )
        log = open(self.base / f"nats-{host}.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.procs[host] = subprocess.Popen(
                [*self.netns_prefix(host), NATS_SERVER, "-c", str(conf)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        finally:
            log.close()
        if wait:
            self._wait_port(host)

    def _wait_port(self, host: str) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((self.addr[host], 4222), timeout=0.5).close()
                return
            except OSError:
                proc = self.procs[host]
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nats node {host} did not start:\n{self.log(host)}") from None
                time.sleep(0.05)

    def log(self, host: str) -> str:
        try:
            return (self.base / f"nats-{host}.log").read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return "(no log)"

    def kill9(self, host: str) -> None:
        proc = self.procs.pop(host)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def cut(self, host: str) -> None:
        """Cut ``host`` off the others: its veth's bridge end down. Inside its namespace
        nothing changes (its address, routes and local connections stay), so a heal is
        only the link coming back: TCP connections across the cut resume."""
        ip("link", "set", self.veth[host], "down")

    def heal(self, host: str) -> None:
        ip("link", "set", self.veth[host], "up")

    def admin(self) -> tuple[str, str]:
        return ADMIN, self.admin_password

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()
        self.procs.clear()
        for h in self.hosts:
            subprocess.run(["ip", "netns", "del", self.ns[h]], capture_output=True)
            subprocess.run(["ip", "link", "del", self.veth[h]], capture_output=True)
            Path(f"/run/netns/{self.ns[h]}").unlink(missing_ok=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

"""``hive up`` says when another hive's gateway listens on the same address at another
port (cli/up.py ``hives_sharing_address``): a browser sends a host's cookies to every
port of it, so one hive's operator session goes to the other (docs/security.md, Known
limits). Here the other "gateway" is a process that listens with a hive nginx's
``-c RUN/gateway/nginx.conf`` in its command line."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hyperhive.cli.up import hives_sharing_address

LISTEN = """
import socket, sys, time
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.bind((sys.argv[1], 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
time.sleep(60)
"""


@contextmanager
def listening(address: str, *argv: str) -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", LISTEN, address, *argv], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def test_another_hives_gateway_on_the_same_address_is_found() -> None:
    conf = "/srv/hive-a/run/gateway/nginx.conf"
    with listening("127.0.0.1", "-p", "/srv/hive-a/run/gateway/", "-c", conf) as port:
        assert ("/srv/hive-a/run", port) in hives_sharing_address("127.0.0.1:1")
        assert ("/srv/hive-a/run", port) in hives_sharing_address("0.0.0.0:1")  # every address
        assert all(p != port for _, p in hives_sharing_address(f"127.0.0.1:{port}"))  # its own
        assert all(p != port for _, p in hives_sharing_address("127.0.0.2:1"))  # another address


def test_a_gateway_on_every_address_shares_each_and_other_programs_do_not_count() -> None:
    with listening("0.0.0.0", "-c", "/srv/hive-b/run/gateway/nginx.conf") as wild:
        assert ("/srv/hive-b/run", wild) in hives_sharing_address("127.0.0.2:1")
    with listening("127.0.0.1", "-c", "/etc/nginx/nginx.conf") as plain:
        assert all(p != plain for _, p in hives_sharing_address("127.0.0.1:1"))

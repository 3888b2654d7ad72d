"""``hive up`` says when another hive's gateway listens on the same address at another
port (cli/up.py ``hives_sharing_address``): a browser sends a host's cookies to every
port of it, so one hive's operator session goes to the other (docs/security.md, Known
limits). A hive's gateway here is a real nginx run with ``-c RUN/gateway/nginx.conf``,
that file root's, as `hive up` runs it; a process of another program with such a command
line is none (red team of session 19: test_red_diff19b)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hyperhive.cli.up import hives_sharing_address

NGINX = shutil.which("nginx", path="/usr/sbin:/usr/bin") or "/usr/sbin/nginx"
CONF = """daemon off; master_process on; worker_processes 1; pid {run}/gateway/nginx.pid;
error_log stderr; events {{ worker_connections 16; }}
http {{ access_log off; server {{ listen {address}:{port}; return 204; }} }}
"""


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


@contextmanager
def gateway(run: Path, address: str) -> Iterator[int]:
    """An nginx as a hive's gateway: RUN/gateway/nginx.conf (root's), listening."""
    (run / "gateway").mkdir(parents=True)
    port = free_port(address)
    conf = run / "gateway" / "nginx.conf"
    conf.write_text(CONF.format(run=run, address=address, port=port))
    proc = subprocess.Popen([NGINX, "-p", f"{run}/gateway/", "-e", "stderr", "-c", str(conf)],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex((address, port)) == 0:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "nginx did not listen"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_another_hives_gateway_on_the_same_address_is_found(tmp_path: Path) -> None:
    run = tmp_path / "hive-a" / "run"
    with gateway(run, "127.0.0.1") as port:
        assert (str(run), port) in hives_sharing_address("127.0.0.1:1")
        assert (str(run), port) in hives_sharing_address("0.0.0.0:1")  # every address
        assert all(p != port for _, p in hives_sharing_address(f"127.0.0.1:{port}"))  # its own
        assert all(p != port for _, p in hives_sharing_address("127.0.0.2:1"))  # another address


def test_a_gateway_whose_config_is_not_roots_is_none(tmp_path: Path) -> None:
    run = tmp_path / "hive-b" / "run"
    with gateway(run, "127.0.0.1") as port:
        os.chown(run / "gateway" / "nginx.conf", 65534, 65534)  # not as `hive up` writes it
        assert all(p != port for _, p in hives_sharing_address("127.0.0.1:1"))

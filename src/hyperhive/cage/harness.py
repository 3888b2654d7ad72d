"""The harness: hive code inside the cage, under its own uid (not the runtime's),
so the agent's runtime can't modify, replace or signal it. The core counts the
agent as running while a harness connection (peer uid = the harness uid) is open.
The turn loop and the agent's page build on this."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

MAX_BACKOFF = 5.0


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def call(sock: socket.socket, reader: object, cmd: str, **fields: object) -> dict[str, object]:
    sock.sendall(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
    line = reader.readline()  # type: ignore[attr-defined]
    if not line:
        raise ConnectionError("core closed the connection")
    return json.loads(line)


def main(args: list[str]) -> None:
    path = os.environ.get("HIVE_SOCKET", "/run/hive/agent.sock")
    backoff = 0.05
    while True:
        try:
            sock = connect(path)
        except OSError:
            time.sleep(backoff)  # the core is (re)starting; the socket will come back
            backoff = min(backoff * 2, MAX_BACKOFF)
            continue
        backoff = 0.05
        with sock, sock.makefile("rb") as reader:
            try:
                me = call(sock, reader, "whoami")
                print(f"harness: connected as {me.get('name')}", file=sys.stderr, flush=True)
                while reader.readline():  # hold the connection: it *is* "running"
                    pass
            except (OSError, ValueError):
                pass

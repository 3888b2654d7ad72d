"""A small blocking JSON-lines client for host.sock and agent.sock (CLI, tests, scripts)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class HiveUnavailable(Exception):
    """The socket isn't there or nobody is listening; the message names the path."""


class Client:
    def __init__(self, path: Path | str, timeout: float | None = 30.0) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            self.sock.close()
            raise HiveUnavailable(f"the hive is not running: can't connect to {self.path} ({e.strerror})") from None
        except PermissionError:
            self.sock.close()
            raise HiveUnavailable(f"permission denied connecting to {self.path}") from None
        self._file = self.sock.makefile("rb")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise ConnectionError(f"{self.path}: connection closed by the hive")
        return json.loads(line)

    def call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        self.send_raw(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        return self.read()

    def stream(self, cmd: str, **fields: Any) -> Iterator[dict[str, Any]]:
        self.send_raw(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        while True:
            yield self.read()


def call(path: Path | str, cmd: str, **fields: Any) -> dict[str, Any]:
    with Client(path) as c:
        return c.call(cmd, **fields)

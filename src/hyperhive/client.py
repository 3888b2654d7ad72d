"""A small blocking JSON-lines client for host.sock and agent.sock (CLI, tests, scripts)."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the agent's CLI imports this module: no pydantic for it at run time
    from hyperhive.wire import priv as wp


class HiveUnavailable(Exception):
    """The socket isn't there or nobody is listening; the message names the path."""


class Client:
    def __init__(self, path: Path | str, timeout: float | None = 30.0) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connect_waiting(self.sock, str(self.path), timeout)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            self.sock.close()
            raise HiveUnavailable(
                f"the hive is not running: can't connect to {self.path} ({e.strerror})"
            ) from None
        except PermissionError:
            self.sock.close()
            raise HiveUnavailable(f"permission denied connecting to {self.path}") from None
        except BlockingIOError:
            self.sock.close()
            raise HiveUnavailable(
                f"the hive is busy: {self.path} took no connection within {timeout:g} s"
            ) from None
        self.sock.settimeout(timeout)
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


def connect_waiting(sock: socket.socket, path: str, timeout: float | None) -> None:
    """Connect ``sock`` (blocking, as made) to the unix socket ``path``, waiting up to
    ``timeout`` seconds (None: for good) for room in its listen backlog. A socket given a
    timeout first is non-blocking underneath, and a unix connect to a full backlog then
    fails at once with EAGAIN, where a TCP one would wait: agent.sock's backlog is 8, so
    an agent's parallel ``hive agent`` or MCP calls to a core slow to accept (a loaded
    machine) failed with BlockingIOError. The kernel bounds a blocking unix connect's wait
    by SO_SNDTIMEO; once it is over, BlockingIOError (EAGAIN) as before."""
    if timeout is not None and timeout > 0:
        whole = int(timeout)
        wait = struct.pack("ll", whole, int((timeout - whole) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, wait)
    elif timeout is not None:
        sock.setblocking(False)  # 0: no wait at all
    sock.connect(path)


def call(path: Path | str, cmd: str, **fields: Any) -> dict[str, Any]:
    with Client(path) as c:
        return c.call(cmd, **fields)


def priv_call(
    path: str, request: wp.PrivModel, fds: list[int] | None = None, timeout: float | None = 60
) -> dict[str, Any]:
    """Send one request to priv.sock (with fds, for exec) and return the reply."""
    from hyperhive.wire.priv import encode  # loaded already: the caller built the model

    return priv_send(path, encode(request), fds, timeout)


def priv_send(
    path: str, line: bytes, fds: list[int] | None = None, timeout: float | None = 60
) -> dict[str, Any]:
    """Send one line to priv.sock as it is (``priv_call`` for requests; this for
    probes of what hive-priv does with anything else) and return the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        sent = socket.send_fds(s, [line], fds) if fds else 0
        s.sendall(line[sent:])  # the descriptors went with the first bytes
        with s.makefile("rb") as f:
            reply = f.readline()
    if not reply:
        raise ConnectionError(f"{path}: hive-priv closed the connection")
    result: dict[str, Any] = json.loads(reply)
    return result

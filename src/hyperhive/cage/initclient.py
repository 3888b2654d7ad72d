"""The harness's end of the private channel to the cage's init: start a runtime
process as the runtime uid, signal it, learn when it exits."""

from __future__ import annotations

import _socket
import itertools
import sys
import threading

from hyperhive.cage import wirejson  # not json nor socket: see harness.py


class InitChannel:
    def __init__(self, fd: int) -> None:
        self.sock = _socket.socket(fileno=fd)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._replies: dict[int, dict] = {}
        self._exits: dict[int, int] = {}
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(256 * 1024)
            except OSError:
                data = b""
            if not data:
                return
            msg = wirejson.loads(data)
            with self._cond:
                if msg.get("event") == "exited":
                    self._exits[msg["pid"]] = msg["status"]
                elif "seq" in msg:
                    self._replies[msg["seq"]] = msg["reply"]
                self._cond.notify_all()

    def _request(self, req: dict, fds: list[int] | None = None) -> dict:
        seq = next(self._seq)
        data = wirejson.dumps({**req, "seq": seq}).encode()
        with self._lock:
            if fds:  # socket.send_fds, without the socket module
                rights = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)
                self.sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
            else:
                self.sock.send(data)
        with self._cond:
            if not self._cond.wait_for(lambda: seq in self._replies, timeout=30):
                raise RuntimeError("cage init did not answer")
            reply = self._replies.pop(seq)
        if not reply.get("ok"):
            raise RuntimeError(f"cage init: {reply.get('error')}")
        return reply

    def spawn(self, argv: list[str], env: dict[str, str], stdio: list[int]) -> int:
        return int(self._request({"op": "spawn", "argv": argv, "env": env}, stdio)["pid"])

    def kill(self, pid: int, sig: int) -> None:
        try:
            self._request({"op": "kill", "pid": pid, "signal": sig})
        except RuntimeError:
            pass  # it has exited meanwhile

    def wait(self, pid: int, timeout: float | None) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits, timeout=timeout)
            return self._exits.pop(pid, None)

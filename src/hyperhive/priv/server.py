"""hive-priv's accept loop: one thread per connection, each request checked
against its caller's verb table (verbs.py: arguments, the verb, file descriptors)
before anything runs."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import socket
import threading
import time
from typing import Any

from pydantic import ValidationError

from hyperhive.logthrottle import LogThrottle
from hyperhive.peercred import PeerCred, peer_cred
from hyperhive.priv.cages import CageError, Cages
from hyperhive.priv.verbs import MAX_FDS, TABLES, Caller, Request
from hyperhive.wire.framing import (
    MAX_LINE,
    WireError,
    describe_validation_error,
    dump_line,
    error,
    parse_line,
)
from hyperhive.wire.priv import priv_request

log = logging.getLogger("hive.priv")

# Connections hive-core may hold at once. Its priv calls run in a thread pool of at most
# 32 (asyncio.to_thread); each connection is a thread of root's and up to MAX_LINE of an
# unfinished line: unbounded, a compromised core held 1.4 MiB of root's memory a
# connection, up to TasksMax (4,096: ~5.5 GiB), and then no thread was left for root's
# `hive exec` (red team round 15b). Root's own connections are not counted.
MAX_CORE_CONNECTIONS = 64
# At most one warning in this long for the core's connections refused at that bound: one
# a refusal was ~2,000 lines a second of root's log from a core connecting and hanging up
# in a loop, and journald's per-unit rate limit then drops hive-priv's lines, the record
# of the verbs the core calls among them (red team round 16). As core/connlimit.py.
REFUSAL_LOG_EVERY = 10.0


class PrivServer:
    def __init__(self, listener: socket.socket, cages: Cages, core_user: str) -> None:
        self.listener = listener
        self.cages = cages
        self.core_uid, self.core_gid = _ids_of(core_user)
        self.core_slots = threading.BoundedSemaphore(MAX_CORE_CONNECTIONS)
        self._refusal_log: LogThrottle[int] = LogThrottle(REFUSAL_LOG_EVERY, self._log_refused)

    def caller_class(self, cred: PeerCred) -> Caller | None:
        if cred.uid == 0:
            return Caller.ROOT
        if self.core_uid is not None and cred.uid == self.core_uid:
            return Caller.CORE
        if self.core_gid is not None and cred.gid == self.core_gid:
            return Caller.CORE
        return None

    def serve_forever(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError as e:  # EMFILE, ENOMEM, ...: the next connection may fare better
                log.error("accept failed: %s", e)
                time.sleep(0.1)
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
            except RuntimeError as e:  # no thread to be had (TasksMax): this one is refused
                log.error("connection dropped: %s", e)
                conn.close()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            cred = peer_cred(conn)
            caller = self.caller_class(cred)
            if caller is None:
                log.warning(
                    "refused uid %d gid %d pid %d: not root or hive-core",
                    cred.uid,
                    cred.gid,
                    cred.pid,
                )
                _send(conn, error(f"permission denied: uid {cred.uid} may not use priv.sock"))
                return
            if caller is Caller.ROOT:
                self._serve_requests(conn, caller, cred)
                return
            if not self.core_slots.acquire(blocking=False):
                self._log_refusal(cred)
                _send(conn, error(f"hive-core holds {MAX_CORE_CONNECTIONS} connections already"))
                return
            try:
                self._serve_requests(conn, caller, cred)
            finally:
                self.core_slots.release()

    def _log_refusal(self, cred: PeerCred) -> None:
        """A core connection refused at MAX_CORE_CONNECTIONS: a warning at most once in
        REFUSAL_LOG_EVERY seconds, with how many were refused since the last one."""
        self._refusal_log.event(cred.uid)  # one key: the core's processes are one caller

    def _log_refused(self, uid: int, refused: int) -> None:
        log.warning(
            "refused %d connection(s) of hive-core (uid %d): it holds %d already",
            refused,
            uid,
            MAX_CORE_CONNECTIONS,
        )

    def _serve_requests(self, conn: socket.socket, caller: Caller, cred: PeerCred) -> None:
        buf = b""
        while True:
            try:
                line, buf, fds, closed = _read_line(conn, buf)
            except TooManyFds:
                log.warning(
                    "refused uid %d pid %d: more than %d file descriptors with one request",
                    cred.uid,
                    cred.pid,
                    MAX_FDS,
                )
                too_many = f"more than {MAX_FDS} file descriptors with one request"
                _send(conn, error(f"{too_many}; closing connection"))
                return
            if line is None:
                if closed and buf:
                    _send(conn, error(f"line exceeds {MAX_LINE} bytes"))
                return
            reply = self.handle(line, fds, caller, cred)
            _send(conn, reply)

    def handle(self, line: bytes, fds: list[int], caller: Caller, cred: PeerCred) -> dict[str, Any]:
        keep_fds = False
        try:
            try:
                obj = parse_line(line)
                req = priv_request.validate_python(obj)
            except WireError as e:
                return error(str(e))
            except ValidationError as e:
                return error(describe_validation_error(e))
            verb = TABLES[caller].get(req.cmd)
            if verb is None:
                log.warning("refused %s from uid %d: %s may not call it", req.cmd, cred.uid, caller)
                return error(f"permission denied: {req.cmd} is not allowed for {caller}")
            if len(fds) != verb.fds:
                return error(f"{req.cmd} takes {verb.fds} file descriptors, got {len(fds)}")
            keep_fds = True  # the handler owns (and closes) them now
            try:
                reply = verb.run(self.cages, req, Request(req, caller, fds))
            except (CageError, OSError) as e:
                log.error("%s %s failed: %s", req.cmd, getattr(req, "name", ""), e)
                return error(str(e))
            # The read-only polls (core/limit_hits.py every 5 s, and restarts): not a line each.
            log.log(
                logging.DEBUG if req.cmd in ("status", "limit_hits") else logging.INFO,
                "%s %s by %s (uid %d pid %d): ok",
                req.cmd,
                getattr(req, "name", ""),
                caller,
                cred.uid,
                cred.pid,
            )
            return reply
        finally:
            if not keep_fds:
                for fd in fds:
                    _close(fd)


def _ids_of(user: str) -> tuple[int | None, int | None]:
    """A user's (uid, gid): a name, or ``UID:GID`` (a hive's own core, which `hive up`
    runs under ids of the host's registry with no account; docs/security.md)."""
    uid, sep, gid = user.partition(":")
    if sep and uid.isdigit() and gid.isdigit():
        return int(uid), int(gid)
    try:
        pw = pwd.getpwnam(user)
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        try:
            return None, grp.getgrnam(user).gr_gid
        except KeyError:
            return None, None


def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
    try:
        conn.sendall(dump_line(obj))
    except OSError:
        pass


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class TooManyFds(Exception):
    """More file descriptors came with one request than any verb takes (they are closed)."""


def _read_line(conn: socket.socket, buf: bytes) -> tuple[bytes | None, bytes, list[int], bool]:
    """Read one line, collecting any SCM_RIGHTS fds that came with it. More than
    MAX_FDS of them (over several messages, or cut off by the kernel) raise
    TooManyFds: a caller sending descriptors without ever ending its line would
    otherwise fill hive-priv's descriptor table, and then nobody could connect."""
    fds: list[int] = []
    while b"\n" not in buf:
        if len(buf) > MAX_LINE:
            for fd in fds:
                _close(fd)
            return None, buf, [], True
        try:
            # Room for MAX_FDS descriptors: a message with more comes with MSG_CTRUNC
            # (the kernel closes the ones that did not fit).
            data, got, flags, _ = socket.recv_fds(conn, 65536, MAX_FDS)
        except OSError:
            data, got, flags = b"", [], 0
        fds.extend(got)
        if len(fds) > MAX_FDS or flags & socket.MSG_CTRUNC:
            for fd in fds:
                _close(fd)
            raise TooManyFds
        if not data:
            for fd in fds:
                _close(fd)
            return None, b"", [], False
        buf += data
    line, _, rest = buf.partition(b"\n")
    return line, rest, fds, False

"""Who is on the other end of a unix socket, as the kernel says (``SO_PEERCRED``)."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

_CRED = struct.Struct("3i")


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return PeerCred(pid, uid, gid)


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


def peer_groups(sock: socket.socket) -> list[int] | None:
    """The peer's supplementary groups as the kernel saw them at connect time."""
    try:
        # 1024 bytes (256 groups): CPython refuses a longer buffer ("getsockopt buflen out
        # of range"), so the 4 KiB asked for before always failed and the groups were
        # never read (red team round 7); more than 256 groups is ERANGE, and None.
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
    except OSError:
        return None
    return list(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) - len(raw) % 4]))


def group_gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def uid_in_group(uid: int, primary_gid: int, gid: int) -> bool:
    """Is ``uid`` (with primary group ``primary_gid``) a member of group ``gid``?"""
    if primary_gid == gid:
        return True
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return gid in os.getgrouplist(user, primary_gid)

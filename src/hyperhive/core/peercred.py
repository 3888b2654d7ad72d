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

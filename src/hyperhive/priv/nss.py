"""The host's user database (NSS), asked for one id: whether an account or a group holds it.

``pwd.getpwuid`` and ``grp.getgrgid`` raise ``KeyError`` both for "no such id" and for a
database that did not answer (sssd stopped, an LDAP server down: ``NSS_STATUS_UNAVAIL``),
so a directory's outage read as "free" and an agent could be given, or started as, a
directory user's uid (red team of session 18). ``getpwuid_r``/``getgrgid_r`` tell the two
apart: 0 with no entry is "none"; an error number is "did not answer", which callers take
as held (never as free), refusing in one line.

``names_of`` asks for several ids at once, each on a thread of its own, within a
deadline: a start's lookups cost one answer's time, not four (a directory answering in
1 s held each start 8 s), and a directory that does not answer in time (sssd waits up to
300 s a request) refuses the start in one line rather than holding it. A lookup left
running keeps its thread until NSS gives up; at most ``LOOKUP_THREADS`` are in flight,
so a hung directory holds that many threads at most, and a lookup that waits for one
past the deadline is refused like one that was asked.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time

_libc = ctypes.CDLL(None, use_errno=True)
BUFFER_MAX = 1 << 20  # a record larger than this (a group of thousands) is still "held"
NAME_SHOWN = 64  # characters of an account's name in a refusal
LOOKUP_THREADS = 16  # lookups in flight at once, across every start of every hive's priv
LOOKUP_DEADLINE = 10.0  # seconds a start waits for its lookups' answers
_in_flight = threading.BoundedSemaphore(LOOKUP_THREADS)


class LookupFailed(Exception):
    """The host's user database did not answer for an id."""


class _Passwd(ctypes.Structure):
    _fields_ = [
        ("pw_name", ctypes.c_char_p),
        ("pw_passwd", ctypes.c_char_p),
        ("pw_uid", ctypes.c_uint),
        ("pw_gid", ctypes.c_uint),
        ("pw_gecos", ctypes.c_char_p),
        ("pw_dir", ctypes.c_char_p),
        ("pw_shell", ctypes.c_char_p),
    ]


class _Group(ctypes.Structure):
    _fields_ = [
        ("gr_name", ctypes.c_char_p),
        ("gr_passwd", ctypes.c_char_p),
        ("gr_gid", ctypes.c_uint),
        ("gr_mem", ctypes.POINTER(ctypes.c_char_p)),
    ]


def name_of(kind: str, i: int) -> str | None:
    """The name of the account (``kind`` "uid") or group ("gid") NSS gives id ``i``, cut
    to ``NAME_SHOWN`` characters; None if NSS has none. LookupFailed if it did not answer."""
    record: ctypes.Structure = _Passwd() if kind == "uid" else _Group()
    lookup = _libc.getpwuid_r if kind == "uid" else _libc.getgrgid_r
    size = 16384
    while True:
        buf = ctypes.create_string_buffer(size)
        found = ctypes.POINTER(type(record))()
        rc = lookup(ctypes.c_uint(i), ctypes.byref(record), buf, size, ctypes.byref(found))
        if rc == errno.ERANGE and size < BUFFER_MAX:
            size *= 4
            continue
        if rc == errno.ERANGE:
            return f"(a {kind} record over {BUFFER_MAX} bytes)"
        if rc != 0:
            code = errno.errorcode.get(rc, str(rc))
            raise LookupFailed(
                f"the host's user database did not answer for {kind} {i} ({code}:"
                f" {os.strerror(rc)})"
            )
        if not found:
            return None
        raw = record.pw_name if kind == "uid" else record.gr_name
        name = (raw or b"").decode("utf-8", "replace")
        return name if len(name) <= NAME_SHOWN else name[:NAME_SHOWN] + "…"


def names_of(queries: list[tuple[str, int]], deadline: float = LOOKUP_DEADLINE) -> list[str | None]:
    """``name_of`` of each (kind, id), asked at once; in the order asked. LookupFailed if
    one did not answer, or not within ``deadline`` seconds in all (waiting for a thread
    included). Daemon threads: one left in a hung lookup holds no exit."""
    end = time.monotonic() + deadline
    names: list[str | None] = [None] * len(queries)
    failed: list[LookupFailed | None] = [None] * len(queries)
    answered = [threading.Event() for _ in queries]

    def ask(k: int) -> None:
        try:
            names[k] = name_of(*queries[k])
        except LookupFailed as e:
            failed[k] = e
        finally:
            _in_flight.release()
            answered[k].set()

    def late(k: int) -> LookupFailed:
        kind, i = queries[k]
        return LookupFailed(
            f"the host's user database did not answer for {kind} {i} within {deadline:g} s"
        )

    for k in range(len(queries)):
        if not _in_flight.acquire(timeout=max(0.0, end - time.monotonic())):
            raise late(k)  # every thread is in a lookup that has not come back
        threading.Thread(target=ask, args=(k,), name="nss", daemon=True).start()
    for k in range(len(queries)):
        if not answered[k].wait(max(0.0, end - time.monotonic())):
            raise late(k)
    for e in failed:
        if e is not None:
            raise e
    return names

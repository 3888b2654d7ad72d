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
running keeps its thread until NSS gives up, so at most ``LOOKUP_THREADS`` are in flight:
a call takes a slot for each of its lookups at once, first come first served, and its
deadline runs from then (a start waiting behind others' lookups to a slow directory is
not refused for their wait: red team of session 19, 32 starts at once against a directory
answering in 2 s); one that waits ``SLOT_WAIT`` for slots is refused as busy. Whatever a
lookup raises, or a thread that can't start, fails the call (never "no such id"), and
every slot taken is given back.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import threading
import time

_libc = ctypes.CDLL(None, use_errno=True)
BUFFER_MAX = 1 << 20  # a record larger than this (a group of thousands) is still "held"
NAME_SHOWN = 64  # characters of an account's name in a refusal
LOOKUP_THREADS = 64  # lookups in flight at once, across every start of every hive's priv
LOOKUP_DEADLINE = 10.0  # seconds a start waits for its lookups' answers, once asked
SLOT_WAIT = 30.0  # seconds a call waits for threads before it is refused as busy


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


class _Slots:
    """Lookup threads to be had: a call takes all it needs at once, in the order asked."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self._cond = threading.Condition()
        self._waiting: collections.deque[object] = collections.deque()

    def take(self, n: int, timeout: float) -> bool:
        ticket = object()
        end = time.monotonic() + timeout
        with self._cond:
            self._waiting.append(ticket)
            try:
                while self._waiting[0] is not ticket or self.free < n:
                    left = end - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
                self.free -= n
                return True
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()

    def give(self, n: int = 1) -> None:
        with self._cond:
            self.free += n
            self._cond.notify_all()


_slots = _Slots(LOOKUP_THREADS)


def names_of(
    queries: list[tuple[str, int]],
    deadline: float = LOOKUP_DEADLINE,
    slot_wait: float = SLOT_WAIT,
) -> list[str | None]:
    """``name_of`` of each (kind, id), asked at once; in the order asked. LookupFailed if
    one did not answer (or raised), not within ``deadline`` seconds of being asked, or
    found no thread within ``slot_wait``. Daemon threads: one left in a hung lookup holds
    no exit."""
    if not queries:
        return []
    n = min(len(queries), _slots.size)
    if len(queries) > n:  # more than the pool: in turns (a caller asks for a few)
        return names_of(queries[:n], deadline, slot_wait) + names_of(
            queries[n:], deadline, slot_wait
        )
    asked = time.monotonic()
    if not _slots.take(n, slot_wait):
        raise LookupFailed(
            f"the host's user database is busy: lookups for other starts have not come back"
            f" in {round(slot_wait, 1):g} s"
        )
    # a caller whose deadline covers the wait too (a claim: slot_wait == deadline)
    end = (asked if slot_wait <= deadline else time.monotonic()) + deadline
    names: list[str | None] = [None] * n
    failed: list[LookupFailed | None] = [None] * n
    answered = [threading.Event() for _ in queries]

    def ask(k: int) -> None:
        kind, i = queries[k]
        try:
            names[k] = name_of(kind, i)
        except LookupFailed as e:
            failed[k] = e
        except BaseException as e:  # MemoryError, anything: never read as "no such id"
            failed[k] = LookupFailed(
                f"the lookup of {kind} {i} in the host's user database failed ({type(e).__name__})"
            )
        finally:
            _slots.give()
            answered[k].set()

    for k in range(n):
        try:
            threading.Thread(target=ask, args=(k,), name="nss", daemon=True).start()
        except BaseException as e:  # no thread to be had: the slots not used go back
            _slots.give(n - k)
            raise LookupFailed(
                f"no thread to look {queries[k][0]} {queries[k][1]} up in the host's user"
                f" database ({type(e).__name__})"
            ) from None
    for k in range(n):
        if not answered[k].wait(max(0.0, end - time.monotonic())):
            kind, i = queries[k]
            raise LookupFailed(
                f"the host's user database did not answer for {kind} {i} within"
                f" {round(deadline, 1):g} s"
            )
    for error in failed:
        if error is not None:
            raise error
    return names

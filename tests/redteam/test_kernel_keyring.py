"""Kernel keyrings from inside a cage. Keys belong to uids, not cages: on the old
filter one agent added a key, granted "other" read, and a non-peer agent read it
back: a two-way channel the hive never saw (and, with uids reused, an inheritance).
Every keyring call now fails with ENOSYS, as on a kernel without CONFIG_KEYS (which
keyutils, Kerberos and systemd already handle)."""

from __future__ import annotations

import platform
from typing import Any

import pytest

from hive_fixture import HiveProcess
from hyperhive.cage import seccomp

from .conftest import cage_run, unchanged

pytestmark = pytest.mark.attack("kernel.keyring", ref="issue 11 (keyring channel between non-peer agents); "
                                "Docker seccomp profile (keyctl blocked for keyring leaks across containers)")

KEY_SPEC_USER_KEYRING, KEY_SPEC_SESSION_KEYRING = -4, -3
# keyctl operations, each its own case (arguments chosen so the kernel, reached, would
# answer with something other than ENOSYS).
KEYCTL = {
    "KEYCTL_GET_KEYRING_ID": (0, KEY_SPEC_USER_KEYRING, 1), "KEYCTL_JOIN_SESSION_KEYRING": (1, 0),
    "KEYCTL_UPDATE": (2, KEY_SPEC_USER_KEYRING, 0, 0), "KEYCTL_REVOKE": (3, 1), "KEYCTL_CHOWN": (4, 1, -1, -1),
    "KEYCTL_SETPERM": (5, KEY_SPEC_USER_KEYRING, 0x3F3F3F3F), "KEYCTL_DESCRIBE": (6, KEY_SPEC_USER_KEYRING, 0, 0),
    "KEYCTL_CLEAR": (7, KEY_SPEC_SESSION_KEYRING), "KEYCTL_LINK": (8, KEY_SPEC_USER_KEYRING, KEY_SPEC_SESSION_KEYRING),
    "KEYCTL_SEARCH": (10, KEY_SPEC_USER_KEYRING, 0, 0, 0), "KEYCTL_READ": (11, KEY_SPEC_USER_KEYRING, 0, 0),
    "KEYCTL_SET_TIMEOUT": (15, 1, 10), "KEYCTL_GET_SECURITY": (17, KEY_SPEC_USER_KEYRING, 0, 0),
    "KEYCTL_SESSION_TO_PARENT": (18,), "KEYCTL_GET_PERSISTENT": (22, -1, KEY_SPEC_USER_KEYRING),
    "KEYCTL_DH_COMPUTE": (23, 0, 0, 0, 0), "KEYCTL_PKEY_QUERY": (24, 1, 0, 0, 0),
    "KEYCTL_CAPABILITIES": (31, 0, 0),
}
ADD_KEY_TYPES = ("user", "keyring", "logon", "big_key")

PROBE = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
def sc(nr, *a):
    a = (list(a) + [0] * 6)[:6]
    r = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(x) for x in a))
    return ("OK", r) if r >= 0 else (errno.errorcode[ctypes.get_errno()], None)
buf = lambda s: ctypes.cast(ctypes.c_char_p(s), ctypes.c_void_p).value
out = {}
for typ in P["types"]:
    desc = (typ + ":" + P["token"]).encode() if typ == "logon" else P["token"].encode()
    payload = b"secret" if typ != "keyring" else None
    out["add_key " + typ] = sc(P["add_key"], buf(typ.encode()), buf(desc), buf(payload) if payload else 0,
                               len(payload or b""), P["user_keyring"])[0]
out["request_key"] = sc(P["request_key"], buf(b"user"), buf(P["token"].encode()), 0, P["user_keyring"])[0]
for op, args in P["keyctl"].items():
    out[op] = sc(P["keyctl_nr"], *args)[0]
result(out=out)
"""

CHANNEL = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
def sc(nr, *a):
    a = (list(a) + [0] * 6)[:6]
    r = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(x) for x in a))
    return r if r >= 0 else errno.errorcode[ctypes.get_errno()]
buf = lambda s: ctypes.cast(ctypes.c_char_p(s), ctypes.c_void_p).value
if P["side"] == "send":
    key = sc(P["add_key"], buf(b"user"), buf(P["token"].encode()), buf(b"over the wall"), 13, -4)
    perm = sc(P["keyctl_nr"], 5, key, 0x3F3F3F3F) if isinstance(key, int) else None  # everyone may read
    result(key=key, perm=perm)
else:
    key = P["key"]
    out = ctypes.create_string_buffer(64)
    got = sc(P["keyctl_nr"], 11, key, ctypes.addressof(out), 64) if isinstance(key, int) else "no key"
    result(read=got, data=out.raw[:13].decode(errors="replace"))
"""


def _params() -> dict[str, Any]:
    nrs = seccomp.SYSCALLS[platform.machine()]
    return {"add_key": nrs["add_key"], "request_key": nrs["request_key"], "keyctl_nr": nrs["keyctl"]}


@pytest.fixture(scope="module")
def answers(rt: HiveProcess) -> dict[str, str]:
    if platform.machine() not in seccomp.ARCHES:
        pytest.skip("no seccomp table here")
    with unchanged(rt):
        res = cage_run(rt, "rtmule", PROBE, **_params(), types=list(ADD_KEY_TYPES), token="rt-keyring-probe",
                       user_keyring=KEY_SPEC_USER_KEYRING, keyctl={k: list(v) for k, v in KEYCTL.items()})
    return res["out"]


@pytest.mark.parametrize("typ", ADD_KEY_TYPES)
def test_add_key_refused(answers: dict[str, str], typ: str) -> None:
    assert answers[f"add_key {typ}"] == "ENOSYS"


def test_request_key_refused(answers: dict[str, str]) -> None:
    assert answers["request_key"] == "ENOSYS"


@pytest.mark.parametrize("op", sorted(KEYCTL))
def test_keyctl_refused(answers: dict[str, str], op: str) -> None:
    assert answers[op] == "ENOSYS"


def test_no_keyring_channel_between_non_peers(rt: HiveProcess) -> None:
    """rtcarol and rtmule are not peers: a key rtcarol leaves readable to all is no way
    to reach rtmule (the old filter: rtmule read "over the wall")."""
    if platform.machine() not in seccomp.ARCHES:
        pytest.skip("no seccomp table here")
    with unchanged(rt):
        sent = cage_run(rt, "rtcarol", CHANNEL, **_params(), side="send", token="rt-keyring-channel")
        got = cage_run(rt, "rtmule", CHANNEL, **_params(), side="recv", key=sent["key"])
    assert sent == {"key": "ENOSYS", "perm": None}
    assert got["read"] == "no key" and got["data"] != "over the wall"

"""Red team of session 18's change (c2972c8, 7c0f612): hive-priv's host-wide id registry
also skips blocks whose ids NSS answers for when asked id by id (``held_by_host``:
``getpwuid``/``getgrgid``, a directory service with ``enumerate = false`` lists none),
and every ``prepare`` (each cage start) looks the agent's ids up again
(``given_to_host``) and refuses the start in one line if the host gave one away since.

Most cases run against a hive-priv of their own (``nspriv``), started by
``systemd-socket-activate`` as in ``test_priv.py``'s ``activated``, but in a private mount
namespace where a small NSS module stands in for a directory service (it answers
``getpwuid``/``getgrgid`` for the ids of its config file, lists none, and can be made
slow or unavailable) and where ``/etc/subuid`` is a file of the test's: nothing of the
host's configuration changes, the other hives on the host see none of it. Real accounts
(``useradd``/``groupadd``, removed after) where a real account does.

Broke (each a failing test here):
- a directory that can't answer (sssd stopped or overloaded, LDAP timing out: NSS says
  ``UNAVAIL``, ``getpwuid_r`` returns an error, not "no such user") is taken for "no such
  user": CPython's ``pwd.getpwuid`` raises ``KeyError`` for both. The claim hands out its
  users' ids, and a start goes ahead as a directory user's uid (fail-open);
- ``/etc/subuid`` numbers that shadow's ``newuidmap`` reads (``strtoul`` base 0: hex,
  octal, a leading blank) are skipped by ``subordinate_ranges`` (decimal only): an
  unprivileged user given ``U`` that way maps the agent's uid in a user namespace of hers
  and ``prepare`` starts the agent all the same;
- one stray line in ``/etc/subuid`` (``x:²:1``: ``str.isdigit`` is true, ``int`` raises)
  makes every ``prepare`` end in a ``ValueError``: the connection is closed with no reply,
  every start of every agent of every hive on the host fails (before the change, only
  new agents' claims read the file); ``hive up``'s ``given_away`` raises the same;
- the lookups have no deadline: with a directory that answers slowly every start waits
  for four serial lookups per ``prepare`` (and the core sends two ``prepare``s per start);
- a claim walks a directory's range (machined's users of a container's 65,536 ids, an
  sssd slice) block by block with no bound, holding the hive's id table: a known agent's
  start waited 12.5 s behind one new agent's claim (0.3 ms a lookup), and the host
  registry's lock (every hive's claims) as long.

Held: ids a directory answers for but doesn't list are skipped by a real claim (users and
groups); a directory user (or a real ``useradd -u`` / ``groupadd -g``) that appears since
refuses ``prepare`` and ``start`` in one line, nothing created, the cage can still be
destroyed, and the agent's next ids are new, never the given-away ones; an account name
with terminal controls, a newline, bidi controls, quotes or 60 KiB reaches the reply and
hive-priv's log escaped (``useradd`` refuses controls and newlines, takes a bidi override
and quotes: a real account's name is escaped the same); in a real hive, the operator's
``restart`` of an agent whose harness uid a new account took is refused through the core
in one line, no process of the agent's ids is left, and once the account is gone the
agent starts again under the same ids (a cage already running keeps running: the check is
at each start, as documented).

Run against 7c0f612. Fixed the same session (priv/nss.py, priv/ids.py): NSS is asked with
``getpwuid_r``/``getgrgid_r``, and a database that did not answer refuses the claim or the
start in one line (taken as held, never as free); ``/etc/subuid`` and ``/etc/subgid`` are
read as shadow reads them, a line it would not take skipped; a long account name is cut
in the refusal; a claim passes over at most ``HELD_SKIPS_MAX`` blocks NSS answers for,
then is refused in one line with the registry's mark moved past them, so the next claim
goes on from there (no lock held long). The slow directory is a strict xfail (Known
limits): each start waits for the host's user database as long as it takes.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import REPO, VENV_BIN, ensure_user, wait_until
from hyperhive.cli.core_identity import LEGACY_USER
from hyperhive.cli.up import ADMIN_GROUP, ensure_group
from hyperhive.client import priv_send
from hyperhive.priv import nss

REF = "red team of session 18's change (c2972c8, 7c0f612: NSS id by id, every prepare re-checks)"
HIVE_PRIV = VENV_BIN / "hive-priv"
NSS_SLOT = Path("/usr/lib/x86_64-linux-gnu/libnss_hesiod.so.2")  # bound over, in the namespace only

# A directory service in a few lines: getpwuid/getgrgid answer for the ids of CONF, nothing
# is listed (no *ent functions: getpwall/getgrall see none of it). CONF lines:
#   u LO HI NAME   users NAME<id> for LO..HI      g LO HI NAME   groups likewise
#   x LO HI        the directory can't answer (UNAVAIL, ECONNREFUSED: sssd stopped)
#   sleep MS       every lookup that reaches it takes MS milliseconds (usleep US: microseconds)
# "\n" in a NAME is a newline.
NSS_MODULE = r"""
#include <nss.h>
#include <pwd.h>
#include <grp.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static enum nss_status look(char kind, unsigned long id, char *name, size_t n, int *errnop) {
    FILE *f = fopen(CONF, "r");
    char line[70000];
    enum nss_status st = NSS_STATUS_NOTFOUND;
    long sleep_ms = 0, sleep_us = 0;
    if (!f) return NSS_STATUS_NOTFOUND;
    while (fgets(line, sizeof line, f)) {
        char k; unsigned long lo, hi; int off = 0;
        line[strcspn(line, "\n")] = 0;
        if (sscanf(line, "sleep %ld", &sleep_ms) == 1) continue;
        if (sscanf(line, "usleep %ld", &sleep_us) == 1) continue;
        if (sscanf(line, "%c %lu %lu %n", &k, &lo, &hi, &off) < 3 || !off) continue;
        if (id < lo || id > hi) continue;
        if (k == 'x') { st = NSS_STATUS_UNAVAIL; *errnop = ECONNREFUSED; break; }
        if (k != kind) continue;
        snprintf(name, n, "%s%lu", line + off, id);
        for (char *r = name, *w = name;; r++, w++) {
            if (r[0] == '\\' && r[1] == 'n') { *w = '\n'; r++; } else *w = *r;
            if (!*r) break;
        }
        st = NSS_STATUS_SUCCESS;
        break;
    }
    fclose(f);
    if (sleep_ms) {
        struct timespec ts = {sleep_ms / 1000, (sleep_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    if (sleep_us) {
        struct timespec ts = {0, sleep_us * 1000L};
        nanosleep(&ts, NULL);
    }
    return st;
}

enum nss_status _nss_hesiod_getpwuid_r(uid_t uid, struct passwd *pw, char *buf, size_t len,
                                       int *errnop) {
    static __thread char name[70000];
    enum nss_status st = look('u', uid, name, sizeof name, errnop);
    if (st != NSS_STATUS_SUCCESS) return st;
    size_t nl = strlen(name) + 1;
    if (nl + 32 > len) { *errnop = ERANGE; return NSS_STATUS_TRYAGAIN; }
    memcpy(buf, name, nl);
    strcpy(buf + nl, "x");
    strcpy(buf + nl + 2, "/nonexistent");
    strcpy(buf + nl + 15, "/bin/sh");
    pw->pw_name = buf; pw->pw_passwd = buf + nl; pw->pw_uid = uid; pw->pw_gid = 100;
    pw->pw_gecos = buf + nl + 1; pw->pw_dir = buf + nl + 2; pw->pw_shell = buf + nl + 15;
    return NSS_STATUS_SUCCESS;
}

enum nss_status _nss_hesiod_getgrgid_r(gid_t gid, struct group *gr, char *buf, size_t len,
                                       int *errnop) {
    static __thread char name[70000];
    enum nss_status st = look('g', gid, name, sizeof name, errnop);
    if (st != NSS_STATUS_SUCCESS) return st;
    size_t nl = strlen(name) + 1;
    if (nl + 32 > len) { *errnop = ERANGE; return NSS_STATUS_TRYAGAIN; }
    memcpy(buf, name, nl);
    strcpy(buf + nl, "x");
    char **mem = (char **)(((unsigned long)(buf + nl + 8) + 7) & ~7UL);
    mem[0] = NULL;
    gr->gr_name = buf; gr->gr_passwd = buf + nl; gr->gr_gid = gid; gr->gr_mem = mem;
    return NSS_STATUS_SUCCESS;
}
"""

NSSWITCH = (
    "passwd: files hesiod\ngroup: files hesiod\nshadow: files\ngshadow: files\nhosts: files dns\n"
)


@dataclass
class NsPriv:
    """hive-priv in a mount namespace of its own, with a directory and /etc/subuid of the test's."""

    base: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def sock(self) -> Path:
        return self.base / "run" / "priv.sock"

    @property
    def log(self) -> Path:
        return self.base / "priv.log"

    def call(self, request: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        import json

        return priv_send(str(self.sock), json.dumps(request).encode() + b"\n", timeout=timeout)

    def directory(self, text: str) -> None:
        """The directory's config: read at each lookup (written in place)."""
        (self.base / "conf").write_bytes(text.encode())

    def subuid(self, text: str) -> None:
        """/etc/subuid as this hive-priv sees it (the bind mount's inode: written in place)."""
        with open(self.base / "subuid", "r+b") as f:
            f.truncate(0)
            f.write(text.encode())

    def tree(self) -> list[tuple[str, int, int, int]]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.base / "state"):
            for name in sorted(dirnames + filenames):
                st = os.lstat(Path(dirpath) / name)
                out.append((os.path.join(dirpath, name), st.st_mode, st.st_uid, st.st_gid))
        for dirpath, dirnames, _ in os.walk(self.base / "run"):
            for name in sorted(dirnames):
                st = os.lstat(Path(dirpath) / name)
                out.append((os.path.join(dirpath, name), st.st_mode, st.st_uid, st.st_gid))
        return sorted(out)


@pytest.fixture(scope="module")
def nspriv() -> Iterator[NsPriv]:
    ensure_group(ADMIN_GROUP)
    ensure_user(LEGACY_USER)
    base = Path(tempfile.mkdtemp(prefix="rt18d", dir="/tmp"))
    os.chmod(base, 0o755)
    p = NsPriv(base)
    (base / "run").mkdir()
    (base / "state").mkdir()
    (base / "hvdir.c").write_text(NSS_MODULE)
    so = base / "libnss_hvdir.so.2"
    subprocess.run(
        [
            "gcc",
            "-shared",
            "-fPIC",
            "-O2",
            f'-DCONF="{base / "conf"}"',
            "-o",
            str(so),
            str(base / "hvdir.c"),
        ],
        check=True,
        capture_output=True,
    )
    (base / "nsswitch.conf").write_text(NSSWITCH)
    p.directory("")
    for f in ("subuid", "subgid"):
        (base / f).write_text("")
    binds = [(so, NSS_SLOT), (base / "nsswitch.conf", Path("/etc/nsswitch.conf"))]
    binds += [(base / "subuid", Path("/etc/subuid")), (base / "subgid", Path("/etc/subgid"))]
    script = " && ".join(f"mount --bind {a} {b}" for a, b in binds)
    argv = [
        "systemd-socket-activate",
        "-l",
        str(p.sock),
        "-E",
        f"PYTHONPATH={REPO / 'src'}",  # the tree under test (it passes no other variable)
        str(HIVE_PRIV),
        "--run-dir",
        str(base / "run"),
        "--state-dir",
        str(base / "state"),
        "--core-user",
        LEGACY_USER,
    ]
    with open(p.log, "ab") as log:
        p.proc = subprocess.Popen(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                f'{script} && exec "$@"',
                "sh",
                *argv,
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_until(p.sock.is_socket, 10, "systemd-socket-activate to bind priv.sock")
        assert p.call({"cmd": "status"})["ok"] is True
        yield p
    finally:
        p.directory("")
        p.subuid("")
        try:
            for name in p.call({"cmd": "status"})["cages"]:
                p.call({"cmd": "destroy", "name": name})
        except (OSError, ValueError, KeyError):
            pass
        p.proc.send_signal(signal.SIGTERM)
        try:
            p.proc.wait(10)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def refusal(name: str, uid: int, taken: str) -> dict[str, Any]:
    return {
        "version": 1,
        "ok": False,
        "error": (
            f"agent {name!r} runs as ids {uid}-{uid + 1}, but {taken} since the hive took them:"
            " not started (free the ids, or destroy the agent)"
        ),
    }


def prepared(p: NsPriv, name: str) -> dict[str, Any]:
    got = p.call({"cmd": "prepare", "name": name})
    assert got["ok"] is True, got
    return got


def mark(p: NsPriv) -> int:
    """The registry's next block, at least: a throwaway agent's block + 2 (destroyed again)."""
    got = prepared(p, "rtd18probe")
    assert p.call({"cmd": "destroy", "name": "rtd18probe"})["ok"] is True
    return int(got["uid"]) + 2


# -- held: the new lookups do what they say ---------------------------------------------


@pytest.mark.attack(
    "ids.host-unique", ref=REF + ": a real claim past a directory's unlisted users and groups"
)
def test_a_claim_skips_ids_a_directory_answers_for_but_does_not_list(nspriv: NsPriv) -> None:
    """The directory holds users in the next 60 blocks' ids and groups in the 40 after,
    and lists none (``getpwall`` here sees only /etc/passwd). A new agent's block must
    come after all of them."""
    lo = mark(nspriv)
    users, groups = range(lo, lo + 120), range(lo + 120, lo + 200)
    nspriv.directory(f"u {users[0]} {users[-1]} ldapu\ng {groups[0]} {groups[-1]} ldapg\n")
    try:
        got = prepared(nspriv, "rtd18dir")
    finally:
        nspriv.directory("")
    assert got["uid"] >= groups[-1] + 1, got
    assert got["harness_uid"] == got["uid"] + 1


@pytest.mark.attack(
    "ids.host-unique", ref=REF + ": a directory user and a real account appear since the claim"
)
def test_ids_given_away_since_refuse_prepare_and_start_and_are_never_reused(nspriv: NsPriv) -> None:
    """A directory's new user on the runtime uid, its new group on the harness uid, a real
    ``useradd -u`` on the runtime uid and ``groupadd -g`` on the agent's gid: each refuses
    ``prepare`` and ``start`` in one line and creates nothing. The agent can still be
    destroyed, and its next block is a new one (the given-away ids never come back)."""
    first = prepared(nspriv, "rtd18gone")
    u = first["uid"]
    before = nspriv.tree()
    start = {"cmd": "start", "name": "rtd18gone", "memory_mib": 256, "pids_max": 64}
    nspriv.directory(f"u {u} {u} ldap\n")
    assert nspriv.call({"cmd": "prepare", "name": "rtd18gone"}) == refusal(
        "rtd18gone", u, f"uid {u} is now the account 'ldap{u}'"
    )
    assert nspriv.call(start) == refusal("rtd18gone", u, f"uid {u} is now the account 'ldap{u}'")
    nspriv.directory(f"g {u + 1} {u + 1} ldapg\n")
    assert nspriv.call({"cmd": "prepare", "name": "rtd18gone"}) == refusal(
        "rtd18gone", u, f"gid {u + 1} is now the group 'ldapg{u + 1}'"
    )
    nspriv.directory("")
    account, group = f"rt18u{os.getpid() % 10000}", f"rt18g{os.getpid() % 10000}"
    subprocess.run(
        ["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-u", str(u), account],
        check=True,
        capture_output=True,
    )
    try:
        assert nspriv.call(start) == refusal(
            "rtd18gone", u, f"uid {u} is now the account {account!r}"
        )
    finally:
        subprocess.run(["userdel", account], check=True, capture_output=True)
    subprocess.run(["groupadd", "-g", str(u), group], check=True, capture_output=True)
    try:
        assert nspriv.call({"cmd": "prepare", "name": "rtd18gone"}) == refusal(
            "rtd18gone", u, f"gid {u} is now the group {group!r}"
        )
        assert nspriv.tree() == before
        assert nspriv.call({"cmd": "destroy", "name": "rtd18gone"})["ok"] is True
        again = prepared(nspriv, "rtd18gone")
        assert again["uid"] > u + 1, (first, again)
    finally:
        subprocess.run(["groupdel", group], check=True, capture_output=True)
        nspriv.call({"cmd": "destroy", "name": "rtd18gone"})


NAMES = [
    "\x1b[2J\x1b]0;owned\x07\x1b[31mroot",  # terminal controls
    "ok\rroot",
    "line\\nagent 'x' started: ok ",  # a newline (the module's "\n")
    "\u202eevil\u2028next",  # bidi override, line separator
    "q'\"",
    "A" * 60_000,
]


@pytest.mark.attack(
    "surface.terminal-injection", ref=REF + ": an account name into the refusal and the log"
)
def test_an_account_name_reaches_the_refusal_and_the_log_escaped(nspriv: NsPriv) -> None:
    """A directory's account name is whatever its admin (or whoever may create users in
    it) wrote: controls, newlines, bidi. ``useradd`` refuses such names; the directory
    doesn't. The refusal carries it as ``repr``: one line, every character printable."""
    for bad in ("rt18\x1bx", "rt18\nx"):
        made = subprocess.run(["useradd", "-M", "-N", "-u", "1999990", bad], capture_output=True)
        if made.returncode == 0:
            subprocess.run(["userdel", bad], check=True, capture_output=True)
        assert made.returncode != 0, f"useradd made {bad!r}"
    first = prepared(nspriv, "rtd18name")
    u = first["uid"]
    size = nspriv.log.stat().st_size
    # useradd does take a bidi override and quotes: a real account on the agent's uid.
    real = f"rt18\u202e'{os.getpid() % 1000}"
    subprocess.run(
        ["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-u", str(u), real],
        check=True,
        capture_output=True,
    )
    try:
        got = nspriv.call({"cmd": "prepare", "name": "rtd18name"})
        assert got == refusal("rtd18name", u, f"uid {u} is now the account {real!r}"), got
        assert got["error"].isprintable(), got["error"]
    finally:
        subprocess.run(["userdel", real], check=True, capture_output=True)
    try:
        for name in NAMES:
            nspriv.directory(f"u {u} {u} {name}\n")
            got = nspriv.call({"cmd": "prepare", "name": "rtd18name"})
            account = name.replace("\\n", "\n") + str(u)
            if len(account) > nss.NAME_SHOWN:  # a long name is cut in the refusal
                account = account[: nss.NAME_SHOWN] + "…"
            want = refusal("rtd18name", u, f"uid {u} is now the account {account!r}")
            assert got == want, got["error"][:300]
            assert got["error"].isprintable(), got["error"][:300]
    finally:
        nspriv.directory("")
        nspriv.call({"cmd": "destroy", "name": "rtd18name"})
    with open(nspriv.log, "rb") as f:
        f.seek(size)
        logged = f.read().decode()
    lines = [line for line in logged.split("\n") if "rtd18name failed" in line]
    assert len(lines) == len(NAMES) + 1, logged[-2000:]
    assert all(line.isprintable() for line in lines), [
        line[:200] for line in lines if not line.isprintable()
    ]


# -- broke -------------------------------------------------------------------------------


@pytest.mark.attack(
    "ids.host-unique", ref=REF + ": a directory that can't answer is taken for no such user"
)
def test_a_directory_that_can_not_answer_is_not_taken_for_no_such_user(nspriv: NsPriv) -> None:
    """sssd stopped, its socket flooded, LDAP timing out: NSS returns ``UNAVAIL`` and
    ``getpwuid_r`` an error (``ECONNREFUSED`` here), not "not found" (0 and no entry).
    CPython's ``pwd.getpwuid`` raises ``KeyError`` for both, so ``held_by_host`` and
    ``given_to_host`` fail open: the claim hands out the directory users' ids, and an
    agent whose uid the directory gave to someone starts while it can't say so."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.getpwuid_r is not None  # the distinction exists: see the fix in the report
    first = prepared(nspriv, "rtd18down")
    u = first["uid"]
    lo = mark(nspriv)
    out = {}
    try:
        nspriv.directory(f"x {u} {u + 1}\n")
        out["start of an agent the directory may have given away"] = nspriv.call(
            {"cmd": "prepare", "name": "rtd18down"}
        )
        nspriv.directory(f"x {lo} {lo + 400}\n")
        got = nspriv.call({"cmd": "prepare", "name": "rtd18down2"})
        out["claim while the directory can't answer"] = got
    finally:
        nspriv.directory("")
        nspriv.call({"cmd": "destroy", "name": "rtd18down"})
        nspriv.call({"cmd": "destroy", "name": "rtd18down2"})
    failed_open = {}
    start, claim = out.values()
    if start.get("ok"):
        failed_open["start of an agent the directory may have given away"] = start
    if claim.get("ok") and lo <= claim["uid"] <= lo + 400:
        failed_open["claim while the directory can't answer"] = claim
    assert not failed_open, (
        f"NSS answered UNAVAIL (ECONNREFUSED) for these ids, and hive-priv went ahead as if "
        f"no one held them: {failed_open}"
    )


def shadow_getul(text: str) -> int | None:
    """shadow's ``getul`` (lib/atoi/getulong.c: ``strtoul_noneg(s, &end, 0)``, whole string),
    what ``newuidmap``/``newgidmap`` read /etc/subuid's numbers with."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.strtoul.restype = ctypes.c_ulong
    libc.strtoul.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]
    raw = text.encode()
    end = ctypes.c_char_p()
    ctypes.set_errno(0)
    val = libc.strtoul(raw, ctypes.byref(end), 0)
    if not raw or end.value or ctypes.get_errno() or raw.lstrip().startswith(b"-"):
        return None
    return int(val)


@pytest.mark.attack(
    "ids.host-unique", ref=REF + ": /etc/subuid numbers newuidmap reads and hive-priv skips"
)
def test_a_subordinate_range_newuidmap_reads_refuses_the_start(nspriv: NsPriv) -> None:
    """The host gives a rootless-container user a range over an agent's ids, written as
    shadow reads it but not as ``subordinate_ranges`` does (decimal only): hex, octal
    (a zero-padded number), a blank before it. ``newuidmap`` maps her user namespace onto
    the agent's uid (its processes' signals, ptrace, its files); ``prepare`` must refuse,
    as it does for ``rt18sub:U:2``."""
    first = prepared(nspriv, "rtd18sub")
    u = first["uid"]
    taken = f"ids {u}-{u + 1} are now a subordinate range (/etc/subuid, /etc/subgid)"
    forms = {
        "decimal": str(u),
        "hex": hex(u),
        "octal": "0" + oct(u)[2:],
        "blank": f" {u}",
        "plus": f"+{u}",
    }
    accepted = {}
    try:
        for form, text in forms.items():
            assert shadow_getul(text) == u, form  # newuidmap's reading: the agent's uid
            nspriv.subuid(f"rt18sub:{text}:2\n")
            got = nspriv.call({"cmd": "prepare", "name": "rtd18sub"})
            if got != refusal("rtd18sub", u, taken):
                accepted[form] = f"rt18sub:{text}:2 -> {got}"
    finally:
        nspriv.subuid("")
        nspriv.call({"cmd": "destroy", "name": "rtd18sub"})
    assert "decimal" not in accepted, accepted
    assert not accepted, (
        f"subordinate ranges newuidmap grants over the agent's ids, started anyway: {accepted}"
    )


@pytest.mark.attack(
    "ids.host-unique", ref=REF + ": one stray line in /etc/subuid and every start fails"
)
def test_a_stray_subuid_line_does_not_refuse_every_start(nspriv: NsPriv) -> None:
    """``x:²:1`` (or any digit ``str.isdigit`` knows and ``int`` doesn't): shadow ignores the
    line; ``subordinate_ranges`` raises ``ValueError``, which nothing in hive-priv catches.
    Since the change it is read at every ``prepare``: every start of every agent of every
    hive on the host gets its connection closed with no reply. ``hive up``'s check of the
    core's ids (``given_away``) raises the same."""
    first = prepared(nspriv, "rtd18stray")
    from hyperhive.cli import core_identity
    from hyperhive.priv import ids

    try:
        nspriv.subuid("dev:\u00b2:1\n")
        assert shadow_getul("\u00b2") is None  # shadow: not a number, the line is skipped
        try:
            got: Any = nspriv.call({"cmd": "prepare", "name": "rtd18stray"})
        except ConnectionError as e:
            got = f"no reply: {e}"
        tail = nspriv.log.read_text(errors="replace")[-600:]
        saved = ids.subordinate_ranges.__defaults__
        ids.subordinate_ranges.__defaults__ = ((nspriv.base / "subuid",),)
        try:
            core_said: Any = core_identity.given_away(
                core_identity.CoreIds(uid=first["uid"], gid=first["uid"])
            )
        except ValueError as e:
            core_said = f"ValueError: {e}"
        finally:
            ids.subordinate_ranges.__defaults__ = saved
    finally:
        nspriv.subuid("")
        nspriv.call({"cmd": "destroy", "name": "rtd18stray"})
    assert got == first, (
        f"prepare with 'dev:\u00b2:1' in /etc/subuid: {got!r}; hive-priv's log: {tail}"
    )
    assert core_said is None, f"hive up's check of the core's ids: {core_said}"


@pytest.mark.attack(
    "budget.exhaustion", ref=REF + ": every start waits on serial NSS lookups with no deadline"
)
def test_a_slow_directory_does_not_hold_every_start(nspriv: NsPriv) -> None:
    """Before the change a known agent's start asked NSS nothing. Then each ``prepare``
    made four serial lookups (uid and gid, of each id) with no deadline, and the core
    sends two per start (``prepare``, then ``start``, which prepares again). A directory
    that answers in 1 s held each start 8 s; nss_sss's client waits up to 300 s a request
    (a hung sssd: 40 minutes a start, each holding one of the core's 64 connections).
    Fixed (session 19): the four are asked at once (``nss.names_of``), within 10 s."""
    prepared(nspriv, "rtd18slow")
    try:
        nspriv.directory("sleep 1000\n")
        t0 = time.monotonic()
        got = nspriv.call({"cmd": "prepare", "name": "rtd18slow"})
        took = time.monotonic() - t0
    finally:
        nspriv.directory("")
        nspriv.call({"cmd": "destroy", "name": "rtd18slow"})
    assert got["ok"] is True, got
    assert took < 2.0, (
        f"one prepare of a known agent took {took:.1f} s with a directory answering in 1 s"
    )


@pytest.mark.attack(
    "budget.exhaustion", ref=REF + ": a hung directory (sssd waits 300 s a request) holds each start"
)
def test_a_hung_directory_refuses_the_start_in_one_line_within_the_deadline(
    nspriv: NsPriv,
) -> None:
    """Session 19: a directory that answers no lookup within ``nss.LOOKUP_DEADLINE`` (10 s;
    13 s here) refuses the start in one line once the deadline has passed, fail-closed,
    rather than holding it (and one of the core's connections) for as long as NSS waits."""
    first = prepared(nspriv, "rtd18hung")
    u = first["uid"]
    try:
        nspriv.directory("sleep 13000\n")
        t0 = time.monotonic()
        got = nspriv.call({"cmd": "prepare", "name": "rtd18hung"})
        took = time.monotonic() - t0
    finally:
        nspriv.directory("")
        nspriv.call({"cmd": "destroy", "name": "rtd18hung"})
    want = (
        f"agent 'rtd18hung': the host's user database did not answer for uid {u} within 10 s:"
        " its ids can't be checked: not started"
    )
    assert got == {"version": 1, "ok": False, "error": want}, got
    assert 9.5 < took < 12.5, took


@pytest.mark.attack(
    "ids.host-unique",
    ref=REF + ": the operator's restart, through the core, of an agent whose uid was taken",
)
def test_a_restart_through_the_core_is_refused_in_one_line(hive_factory: Any) -> None:
    """A real hive: its agent runs; the host then gives the agent's harness uid to a new
    account. The cage that runs keeps running (the check is at each start, as documented);
    the operator's ``restart`` stops it and the start is refused, in one line, through the
    core's reply; no process of the agent's ids is left. Once the account is gone the
    agent starts again under the same ids."""
    hive = hive_factory({"rtd18real": {"runtime": "command", "command": ["cat"]}})
    hive.wait_running(["rtd18real"])
    row = hive.cage("rtd18real")
    u = row["uid"]
    account = f"rt18r{os.getpid() % 10000}"
    subprocess.run(
        ["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-u", str(u + 1), account],
        check=True,
        capture_output=True,
    )
    try:
        assert hive.cage("rtd18real")["running"] is True
        got = hive.host_call("restart", name="rtd18real")
        want = refusal("rtd18real", u, f"uid {u + 1} is now the account {account!r}")["error"]
        assert got.get("ok") is False and want in got.get("error", ""), got
        assert "\n" not in got["error"], got
        assert hive.cage("rtd18real")["running"] is False
        left = [
            pid
            for pid in os.listdir("/proc")
            if pid.isdigit() and (proc_uids(int(pid)) or set()) & {u, u + 1}
        ]
        assert left == [], left
    finally:
        subprocess.run(["userdel", account], check=True, capture_output=True)
    assert hive.host_call("restart", name="rtd18real").get("ok") is True
    hive.wait_running(["rtd18real"])
    assert hive.cage("rtd18real")["uid"] == u


def proc_uids(pid: int) -> set[int] | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return {int(x) for x in line.split()[1:]}
    except OSError:
        return None
    return None


SPAN = 8192  # ids the directory answers for: past one claim's walk (HELD_SKIPS_MAX blocks)


@pytest.mark.attack(
    "budget.exhaustion", ref=REF + ": one claim's walk past a directory's range holds every start"
)
def test_a_claim_walking_a_directory_range_does_not_hold_the_hives_starts(nspriv: NsPriv) -> None:
    """A directory that answers for a whole range and lists none of it: machined's userdb
    gives every uid of an ``nspawn --private-users=pick`` container a user (``vu-NAME-N``,
    65,536 of them, from 524,288 up), sssd a domain's slice. A new agent's claim now walks
    it block by block, one lookup each (0.3 ms here: a varlink or socket round trip), with
    no bound, holding the hive's id table (every ``prepare`` of the hive, known agents
    too, waits on it) and the host registry's lock (every claim of every hive, ``hive
    up``'s for its core too). Before the change the claim asked NSS nothing per id."""
    prepared(nspriv, "rtd18known")
    lo = mark(nspriv)
    walk: dict[str, Any] = {}

    def claim() -> None:
        t0 = time.monotonic()
        walk["reply"] = nspriv.call({"cmd": "prepare", "name": "rtd18walk"}, timeout=300)
        walk["took"] = time.monotonic() - t0

    # 8,192 of a container's 65,536 (eight claims' walks: the same path, an eighth the time)
    nspriv.directory(f"usleep 300\nu {lo} {lo + SPAN - 1} vu-ct-\n")
    tries = 0
    try:
        t = threading.Thread(target=claim)
        t.start()
        time.sleep(0.1)
        t0 = time.monotonic()
        known = nspriv.call({"cmd": "prepare", "name": "rtd18known"}, timeout=300)
        took = time.monotonic() - t0
        t.join(300)
        first = walk["reply"]
        # Each claim walks a bounded stretch, refused in one line, and the registry's mark
        # moves past it: the next claims go on from there until one is past the range.
        while not walk["reply"]["ok"] and tries < 100:
            tries += 1
            claim()
    finally:
        nspriv.directory("")
        nspriv.call({"cmd": "destroy", "name": "rtd18known"})
        nspriv.call({"cmd": "destroy", "name": "rtd18walk"})
    assert known["ok"] is True, known
    assert first["ok"] is False and "next claim goes on from" in first["error"], first
    assert walk["reply"]["ok"] is True and walk["reply"]["uid"] > lo + SPAN - 1, (tries, walk)
    assert took < 1.0, (
        f"a known agent's prepare took {took:.1f} s: it waited for another agent's claim"
    )

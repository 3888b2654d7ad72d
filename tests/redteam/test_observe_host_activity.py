"""What a cage can observe of the host and of other cages through the files they
share. The system directories (/usr, /etc, the hive's code) were read-only binds of
the host's: inotify in one cage saw every program the host and the other cages ran
and every file they read there. Each cage now sees them through overlays of its own
(hive-priv's child mounts them in a private mount namespace before bwrap), so a
watch sees only its own cage's accesses; and its mountinfo no longer names where
the hive's code lives on the host.

Left (see the security notes): the binds of the agent's own home, socket and page
directories still show their host paths in mountinfo; /proc/loadavg, /proc/stat,
/proc/meminfo and the like are host-wide."""

from __future__ import annotations

import secrets
import sysconfig
import threading
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import REPO, HiveProcess, wait_until

from .conftest import cage_run

pytestmark = pytest.mark.attack("observe.host-activity", ref="issue 11 item 11; bubblewrap 0.9 --overlay-src; "
                                "inotify side channels (e.g. 'Leaky Images', watching /usr/bin for execs)")

WATCHER, OTHER = "rtcarol", "rtbob"
SITE = Path(sysconfig.get_paths()["purelib"]).resolve()

WATCH = """
import ctypes, struct, time
libc = ctypes.CDLL(None, use_errno=True)
IN_ACCESS, IN_OPEN, IN_CLOSE_NOWRITE = 0x1, 0x20, 0x10
fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
wds, errors = {}, {}
for p in P["watch"]:
    wd = libc.inotify_add_watch(fd, p.encode(), IN_ACCESS | IN_OPEN | IN_CLOSE_NOWRITE)
    if wd < 0:
        errors[p] = ctypes.get_errno()
    else:
        wds[wd] = p

def drain():
    buf = b""
    while True:
        try:
            buf += os.read(fd, 65536)
        except BlockingIOError:
            break
    seen, i = {}, 0
    while i + 16 <= len(buf):
        wd, mask, cookie, ln = struct.unpack_from("iIII", buf, i)
        name = buf[i + 16:i + 16 + ln].rstrip(b"\\0").decode(errors="replace")
        seen.setdefault(wds.get(wd, str(wd)), set()).add(name)
        i += 16 + ln
    return {k: sorted(v) for k, v in seen.items()}

open(P["ready"], "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(P["done"]) and time.monotonic() < deadline:
    time.sleep(0.05)
seen = drain()
with open(P["control"], "rb") as f:  # the watch works: its own cage's reads are seen
    f.read(1)
result(seen=seen, control=drain(), errors=errors)
"""

# (what is watched in the cage, the file touched in it, how it is touched on the host
# or in the other cage, the host path of that file)
WATCHES = ["/usr/bin", "/usr/lib/python3.11/json", "/etc/ssl/certs", "/etc/ld.so.cache",
           "/opt/hive/src/hyperhive/cage"]
HOST_TOUCHES = {
    "host executes /usr/bin/sha1sum": ("/usr/bin", "sha1sum"),
    "host reads /usr/lib/python3.11/json/decoder.py": ("/usr/lib/python3.11/json", "decoder.py"),
    "host reads /etc/ssl/certs/ca-certificates.crt": ("/etc/ssl/certs", "ca-certificates.crt"),
    "host reads /etc/ld.so.cache": ("/etc/ld.so.cache", ""),
    "host reads the hive's code (runtimes.py)": ("/opt/hive/src/hyperhive/cage", "runtimes.py"),
}
OTHER_TOUCHES = {
    "another cage executes /usr/bin/md5sum": ("/usr/bin", "md5sum"),
    "another cage reads /usr/lib/python3.11/json/encoder.py": ("/usr/lib/python3.11/json", "encoder.py"),
    "another cage reads /etc/ssl/certs (ca-certificates.crt)": ("/etc/ssl/certs", "ca-certificates.crt"),
    "another cage reads the hive's code (page.py)": ("/opt/hive/src/hyperhive/cage", "page.py"),
}


def touch_from_host() -> None:
    import subprocess

    subprocess.run(["/usr/bin/sha1sum", "/dev/null"], check=True, capture_output=True)
    for p in ("/usr/lib/python3.11/json/decoder.py", "/etc/ssl/certs/ca-certificates.crt", "/etc/ld.so.cache",
              str(REPO / "src/hyperhive/cage/runtimes.py")):
        Path(p).read_bytes()


@pytest.fixture(scope="module")
def watched(rt: HiveProcess) -> dict[str, Any]:
    token = secrets.token_hex(6)
    ready, done = f"/home/agent/.rt-ready-{token}", f"/home/agent/.rt-done-{token}"
    home = rt.home(WATCHER)
    out: dict[str, Any] = {}

    def watch() -> None:
        try:
            out.update(cage_run(rt, WATCHER, WATCH, watch=WATCHES, ready=ready, done=done,
                                control="/usr/lib/python3.11/json/scanner.py"))
        except BaseException as e:  # reported below
            out["error"] = repr(e)

    t = threading.Thread(target=watch)
    t.start()
    try:
        wait_until(lambda: (home / Path(ready).name).exists() or "error" in out, 60, "the watcher")
        touch_from_host()
        other = rt.exec(OTHER, "sh", "-c", "md5sum /dev/null; cat /usr/lib/python3.11/json/encoder.py "
                        "/etc/ssl/certs/ca-certificates.crt /opt/hive/src/hyperhive/cage/page.py >/dev/null")
        assert other.returncode == 0, other.stderr
        touch_from_host()  # and once more, after the other cage
    finally:
        (home / Path(done).name).touch()
        t.join(90)
        for f in (ready, done):
            (home / Path(f).name).unlink(missing_ok=True)
    assert "error" not in out, out["error"]
    assert out["errors"] == {}, out["errors"]
    assert out["control"] == {"/usr/lib/python3.11/json": ["scanner.py"]}, out["control"]
    return out


@pytest.mark.parametrize("touch", sorted(HOST_TOUCHES))
def test_host_activity_not_seen(watched: dict[str, Any], touch: str) -> None:
    watch, name = HOST_TOUCHES[touch]
    assert name not in watched["seen"].get(watch, []), watched["seen"]


@pytest.mark.parametrize("touch", sorted(OTHER_TOUCHES))
def test_other_cage_activity_not_seen(watched: dict[str, Any], touch: str) -> None:
    watch, name = OTHER_TOUCHES[touch]
    assert name not in watched["seen"].get(watch, []), watched["seen"]


def test_nothing_seen_at_all(watched: dict[str, Any]) -> None:
    assert watched["seen"] == {}


MOUNTS = """
result(lines=open("/proc/self/mountinfo").read().splitlines())
"""


@pytest.fixture(scope="module")
def mountinfo(rt: HiveProcess) -> list[list[str]]:
    return [line.split() for line in cage_run(rt, WATCHER, MOUNTS)["lines"]]


HIDDEN = {"the hive's source tree": str(REPO / "src"), "the hive's virtualenv": str(SITE),
          "the hive's checkout": str(REPO), "hive-priv's state (passwd, group, hosts)": "{state}/priv"}


@pytest.mark.parametrize("what", sorted(HIDDEN))
def test_mountinfo_hides_host_code_paths(rt: HiveProcess, mountinfo: list[list[str]], what: str) -> None:
    needle = HIDDEN[what].format(state=rt.state_dir)
    assert not [m for m in mountinfo if any(needle in field for field in m)], needle


@pytest.mark.parametrize("target", ["/usr", "/etc/ssl", "/etc/ld.so.cache", "/opt/hive/src", "/opt/hive/site"])
def test_system_directories_are_private_overlays(mountinfo: list[list[str]], target: str) -> None:
    (m,) = [m for m in mountinfo if m[4] == target]
    fstype = m[m.index("-") + 1]
    assert fstype == "overlay", m
    assert "ro" in m[5].split(","), m


@pytest.mark.parametrize("target", ["/etc/passwd", "/etc/group", "/etc/hosts"])
def test_the_cages_own_etc_files_are_copies_not_host_files(mountinfo: list[list[str]], target: str) -> None:
    """hive-priv hands them to bwrap as data (memfds): the cage gets a read-only copy
    on its own tmpfs; no host file (and no host path) is behind them."""
    (m,) = [m for m in mountinfo if m[4] == target]
    assert m[m.index("-") + 1] == "tmpfs", m
    assert "ro" in m[5].split(","), m

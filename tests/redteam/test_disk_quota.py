"""Filling the host's disk through the agent's home. The red team filled the host disk
from one cage. Each home is now a filesystem of its own (``[limits] disk_mib``):
writes past it fail inside the cage with ENOSPC / EDQUOT, whatever way the agent
writes (one big file, many small files, inodes, a sparse file written through,
fallocate, an mmap), and the host's filesystem barely moves. The home also
doesn't show the host's path in the cage's mountinfo."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hive_fixture import HiveProcess, running_hive

from .conftest import cage_run

pytestmark = pytest.mark.attack("budget.disk-quota", ref="issue 11 item 9; srt/OpenShell resource limits")

DISK_MIB = 32

FILL = r"""
import errno, mmap, os
how = P["how"]
home = "/home/agent"
def errname(e):
    return errno.errorcode.get(e.errno, str(e))
written, err = 0, None
try:
    if how == "one-file":
        with open(f"{home}/big", "wb") as f:
            chunk = b"x" * (1 << 20)
            for _ in range(4 * P["mib"]):
                f.write(chunk); f.flush(); os.fsync(f.fileno()); written += len(chunk)
    elif how == "many-files":
        for i in range(100000):
            with open(f"{home}/f{i}", "wb") as f:
                f.write(b"y" * 65536); f.flush(); os.fsync(f.fileno())
            written += 65536
    elif how == "inodes":
        for i in range(10**6):
            os.close(os.open(f"{home}/i{i}", os.O_CREAT | os.O_WRONLY, 0o600)); written += 1
    elif how == "fallocate":
        fd = os.open(f"{home}/falloc", os.O_CREAT | os.O_WRONLY, 0o600)
        os.posix_fallocate(fd, 0, 4 * P["mib"] << 20); written = 4 * P["mib"] << 20
    elif how == "sparse-then-fill":
        fd = os.open(f"{home}/sparse", os.O_CREAT | os.O_RDWR, 0o600)
        os.ftruncate(fd, 4 * P["mib"] << 20)
        chunk = b"z" * (1 << 20)
        for off in range(0, 4 * P["mib"] << 20, 1 << 20):
            os.pwrite(fd, chunk, off); os.fsync(fd); written += len(chunk)
    elif how == "mmap":
        fd = os.open(f"{home}/mapped", os.O_CREAT | os.O_RDWR, 0o600)
        size = 4 * P["mib"] << 20
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size)
        m.write(b"m" * size)
        m.flush()
        written = size
except OSError as e:
    err = errname(e)
free = os.statvfs(home)
result(err=err, written=written, size_mib=free.f_blocks * free.f_frsize >> 20)
"""

CLEAN = r"""
import os, shutil
for n in os.listdir("/home/agent"):
    p = os.path.join("/home/agent", n)
    shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
result(ok=True)
"""


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess({"rtquota": {"runtime": "command", "command": ["true"]}},
                                        sections={"limits": {"disk_mib": DISK_MIB}}))


@pytest.mark.parametrize("how", ["one-file", "many-files", "inodes", "fallocate", "sparse-then-fill"])
def test_writes_past_the_home_fail_inside_the_cage(hive: HiveProcess, how: str) -> None:
    host_before = os.statvfs(hive.state_dir)
    res = cage_run(hive, "rtquota", FILL, how=how, mib=DISK_MIB, timeout=300)
    try:
        assert res["err"] in ("ENOSPC", "EDQUOT"), res
        assert res["size_mib"] <= DISK_MIB
        if how != "inodes":
            assert res["written"] <= DISK_MIB << 20
        host_after = os.statvfs(hive.state_dir)
        grew = (host_before.f_bfree - host_after.f_bfree) * host_after.f_frsize
        assert grew < 2 * DISK_MIB << 20, f"the host's filesystem lost {grew >> 20} MiB"
        assert hive.agent_status()["rtquota"]["running"]
    finally:
        assert cage_run(hive, "rtquota", CLEAN)["ok"]


def test_an_mmap_past_the_home_is_stopped(hive: HiveProcess) -> None:
    """Writing through a shared mapping past the filesystem's end: the kernel's
    SIGBUS ends the writer (or the write fails); nothing lands on the host."""
    proc = hive.probe("rtquota", FILL, how="mmap", mib=DISK_MIB, timeout=120)
    try:
        home = os.statvfs(hive.home("rtquota"))
        assert home.f_blocks * home.f_frsize <= DISK_MIB << 20
        assert hive.agent_status()["rtquota"]["running"]
    finally:
        assert cage_run(hive, "rtquota", CLEAN)["ok"]
    assert proc.returncode != 0 or "ENOSPC" in proc.stdout or "EDQUOT" in proc.stdout, proc.stdout[-500:]


MOUNTINFO = r"""
result(text=open("/proc/self/mountinfo").read())
"""


def test_the_home_shows_no_host_path(hive: HiveProcess) -> None:
    text = cage_run(hive, "rtquota", MOUNTINFO)["text"]
    home = [line for line in text.splitlines() if line.split()[4] == "/home/agent"]
    assert home, text
    assert str(hive.state_dir) not in home[0] and str(hive.base) not in home[0], home[0]


def test_the_quota_survives_a_restart(hive: HiveProcess) -> None:
    assert cage_run(hive, "rtquota", "open('/home/agent/keep', 'w').write('kept'); result(ok=True)")["ok"]
    assert hive.host_call("restart", name="rtquota")["ok"]
    hive.wait_running(["rtquota"])
    res = cage_run(hive, "rtquota", """
import os
s = os.statvfs('/home/agent')
result(keep=open('/home/agent/keep').read(), size_mib=s.f_blocks * s.f_frsize >> 20)
""")
    assert res["keep"] == "kept" and res["size_mib"] <= DISK_MIB
    assert cage_run(hive, "rtquota", CLEAN)["ok"]


def test_new_homes_are_copies_of_one_template_per_hive(tmp_path: Path) -> None:
    # mkfs once per hive, not per agent; a core asking for size after size keeps one.
    from hyperhive.priv import homes

    priv = tmp_path / "priv"
    priv.mkdir(mode=0o700)
    tpl = os.open(priv, os.O_RDONLY | os.O_DIRECTORY)
    images = []
    for i, mib in enumerate((DISK_MIB, DISK_MIB, DISK_MIB * 2)):
        fd = os.open(tmp_path / f"img{i}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        homes._new_filesystem(fd, mib, tpl)
        os.close(fd)
        images.append(tmp_path / f"img{i}")
    os.close(tpl)
    assert sorted(p.name for p in priv.iterdir()) == [f"home-{DISK_MIB * 2}.img"]
    assert images[0].read_bytes() == images[1].read_bytes()  # the same bytes mkfs wrote
    for img, mib in zip(images, (DISK_MIB, DISK_MIB, DISK_MIB * 2), strict=True):
        st = img.stat()
        assert st.st_size == mib << 20 and st.st_blocks * 512 < st.st_size // 4  # still sparse
        fsck = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr

"""Red team, round 9: session 7's changes, attacked.

- Homes mounted in their cages' namespaces only (hive-priv mounts each home detached,
  the starting child attaches it): a restart racing the old namespace's release of the
  loop device (a compromised hive-core picks the timing of every stop and start); what a
  cage sees of other homes and of the host; a home pinned from the cage past its destroy.
- One roster bucket per host: a hostile host (c's real NATS credentials) has the bus
  publish for it through a push consumer's deliver subject, and dates its own claim.

One hive (r9a, r9b: command runtimes, paused: nothing runs a turn) for the cage cases;
the session's swarm of hive-cores for the hostile host.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from helpers import assert_ok, wait_for
from hive_fixture import HiveProcess, probe_result, running_hive
from hyperhive.priv import homes
from hyperhive.swarm import subjects as s
from hyperhive.swarm.bridge import earliest, live_claims
from swarm_faults import take
from swarm_fixture import Swarm, roster_buckets

from .test_swarm_hostile import as_host_c, stream_seq

A, B = "r9a", "r9b"
TRUE = {"runtime": "command", "command": ["true"]}
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and network namespaces need root")


# -- homes: the loop device a restart mounts again ----------------------------------------


def _agent_dir(base: str, name: str) -> int:
    os.mkdir(f"{base}/{name}", 0o711)
    return os.open(f"{base}/{name}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _write(mount: int, text: bytes) -> None:
    root = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=mount)
    try:
        fd = os.open("who", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=root)
        os.write(fd, text)
        os.close(fd)
    finally:
        os.close(root)


def _who(mount: int) -> tuple[bytes, int]:
    """The marker in the home and the uid owning its root."""
    root = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=mount)
    try:
        fd = os.open("who", os.O_RDONLY | os.O_CLOEXEC, dir_fd=root)
        with open(fd, "rb") as f:
            return f.read(), os.fstat(root).st_uid
    finally:
        os.close(root)


@root_only
@pytest.mark.attack("home.loop-reuse", ref="red team round 9: homes mounted detached, a restart mounts the recorded loop device again")
def test_a_restart_racing_the_old_mounts_release_never_mounts_another_agents_home() -> None:
    """A's cage stops; its dying namespace still holds A's home, so A's next start finds
    the recorded loop device still on A's image and mounts it again. If the old mount lets
    go between that check and the mount, autoclear frees the device, and another agent's
    start (B's, under B's own lock: hive-priv runs them side by side) may take the same
    free device for B's image: A's restart then mounted B's filesystem (and chowned its
    root to A) — A's cage got B's home. The interleaving is forced here (homes._mount is
    entered at that moment; every operation is the kernel's own, as hive-priv does it);
    with the device held open from the check to the mount, it can't be freed, B's start
    takes another device, and A gets its own home."""
    base = tempfile.mkdtemp(prefix="r9loop", dir="/var/tmp")
    held: list[int] = []
    try:
        a_dir, b_dir = _agent_dir(base, "a"), _agent_dir(base, "b")
        held += [a_dir, b_dir]
        old_a = homes.open_home(a_dir, 60901, 60901, 16)  # the stopped cage's namespace, still holding it
        _write(old_a.fd, b"A")
        b = homes.open_home(b_dir, 60902, 60902, 16)
        _write(b.fd, b"B")
        os.close(b.fd)  # B's cage stopped: B's device released
        device = (Path(base) / "a" / homes.LOOP_RECORD).read_text().strip()
        real_mount = homes._mount
        race: dict[str, Any] = {}

        def racing(path: str) -> int:
            if path == f"/dev/{device}" and not race:
                os.close(old_a.fd)  # ... the old namespace lets go of A's mount now
                race["freed"] = wait_for_gone(device)
                image = os.open(homes.IMAGE, os.O_RDWR | os.O_CLOEXEC, dir_fd=b_dir)
                held.append(image)
                loop = os.open(f"/dev/{device}", os.O_RDWR | os.O_CLOEXEC)
                held.append(loop)
                try:  # ... and B's start, on another thread, is given that free device
                    homes._configure(loop, image)
                    race["b_on"] = device
                except OSError:  # busy: B's start takes another free device, as _attach does
                    number, fd = homes._attach(image)
                    held.append(fd)
                    race["b_on"] = f"loop{number}"
                race["b_mount"] = real_mount(f"/dev/{race['b_on']}")
                held.append(race["b_mount"])
            return real_mount(path)

        homes._mount = racing  # type: ignore[assignment]
        try:
            new_a = homes.open_home(a_dir, 60901, 60901, 16)
        finally:
            homes._mount = real_mount  # type: ignore[assignment]
        held.append(new_a.fd)
        assert race, "the restart did not mount the recorded device again"
        got = _who(new_a.fd)
        assert got == (b"A", 60901), (
            f"A's restart mounted another agent's home: {got} (device {device} freed: {race['freed']},"
            f" B's image attached on {race['b_on']})"
        )
        assert _who(race["b_mount"]) == (b"B", 60902), race  # B's home, still B's
    finally:
        for fd in reversed(held):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(base, ignore_errors=True)


def wait_for_gone(device: str, within: float = 0.5) -> bool:
    """Whether ``device`` was detached (autoclear) within ``within`` seconds."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not os.path.isdir(f"/sys/block/{device}/loop"):
            return True
        time.sleep(0.01)
    return False


# -- homes: what a cage reaches -----------------------------------------------------------


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess({A: TRUE, B: TRUE}))


def _dev(path: Path) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


MOUNTS_PROBE = """
import os
st = os.stat("/home/agent")
text = open("/proc/self/mountinfo").read()
tries = {}
for p in ("/proc/1/root/home", "/proc/1/cwd", "/home/agent/..", "/run/hive/..", "/proc/self/root/home"):
    try:
        tries[p] = sorted(os.listdir(p))
    except OSError as e:
        tries[p] = e.strerror
result(dev=f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", mountinfo=text, tries=tries)
"""


@pytest.mark.attack("home.namespace-reach", ref="red team round 9: homes mounted in their cages' namespaces only")
def test_a_cage_sees_its_own_home_only_and_the_host_none(hive: HiveProcess) -> None:
    """From r9a's cage: one ext4 mount (its home), no device of r9b's home in its mount
    table, no host path (state directory, home-view) in it; the views the cage can list
    hold no other home. On the host: no home mounted anywhere under the hive, and
    agents/<name>/home and priv/home-view are empty root-only directories."""
    got = probe_result(hive.probe(A, MOUNTS_PROBE))
    mine, theirs = _dev(hive.home(A)), _dev(hive.home(B))
    assert got["dev"] == mine and mine != theirs, (got["dev"], mine, theirs)
    lines = got["mountinfo"].splitlines()
    assert [ln.split()[4] for ln in lines if ln.split()[2] == mine] == ["/home/agent"], lines
    assert not [ln for ln in lines if ln.split()[2] == theirs], lines
    # (The run directory's paths of its own sockets and page show: a known limit.)
    for host_path in (str(hive.state_dir), "home-view", "/priv/", "home.img"):
        assert host_path not in got["mountinfo"], host_path
    assert got["tries"]["/home/agent/.."] == ["agent"], got["tries"]  # /home: its own only
    assert all(B not in str(v) for v in got["tries"].values()), got["tries"]
    host = Path("/proc/self/mountinfo").read_text().splitlines()
    base = str(hive.base.resolve())
    assert not [ln for ln in host if base in ln.split()[4] or ln.split()[2] in (mine, theirs)], host
    for empty in (hive.state_dir / "agents" / B / "home", hive.state_dir / "priv" / "home-view"):
        st = os.lstat(empty)
        assert (st.st_uid, st.st_mode & 0o777, os.listdir(empty)) == (0, 0o700, []), empty


PIN_PROBE = """
import os, socket, sys, time
# A file of the home, in flight in a socketpair whose other end is handed to the core's
# egress proxy as "the connection": the core holds it (unread) after the cage is gone.
mine, theirs = socket.socketpair()
home = os.open("/home/agent/pin", os.O_RDONLY | os.O_CREAT, 0o600)
socket.send_fds(mine, [b"C"], [home])
egress = socket.socket(socket.AF_UNIX)
egress.connect("/run/hive/egress.sock")
socket.send_fds(egress, [b"\\0"], [theirs.fileno()])
theirs.close()
os.close(home)
result(pinned=True)
time.sleep(120)  # until the destroy kills it
"""


@pytest.mark.attack("home.pinned-past-destroy", ref="red team round 9: homes go with their cages' namespaces")
def test_a_home_pinned_from_its_cage_is_let_go_soon_after_destroy(hive: HiveProcess) -> None:
    """r9b hands the egress proxy a socketpair end with a file of its home in flight on
    it (the only holder outside the cage it can make), then is destroyed: its loop device
    and deleted image stay only while the core waits for the request head
    (HEAD_TIMEOUT, 10 s), and go then; the name can be spawned again at once, on a fresh
    home."""
    loop = (hive.state_dir / "agents" / B / homes.LOOP_RECORD).read_text().strip()
    image = str((hive.state_dir / "agents" / B / homes.IMAGE).resolve())
    out: list[Any] = []
    probe = threading.Thread(target=lambda: out.append(hive.probe(B, PIN_PROBE, timeout=150)), daemon=True)
    probe.start()
    wait_for(lambda: (hive.home(B) / "pin").exists(), timeout=30)
    time.sleep(0.3)  # the handover sent
    assert_ok(hive.host_call("destroy", name=B))
    destroyed = time.monotonic()
    probe.join(30)

    def backing() -> str | None:
        try:
            return Path(f"/sys/block/{loop}/loop/backing_file").read_text().strip()
        except OSError:
            return None

    wait_for(lambda: backing() is None or not backing().startswith(image), timeout=20)  # type: ignore[union-attr]
    released = time.monotonic() - destroyed
    print(f"\nr9b's loop device released {released:.1f} s after its destroy")
    assert released < 12.0, released
    assert_ok(hive.host_call("spawn", name=B, spec=TRUE))
    hive.wait_running([B])
    assert not (hive.home(B) / "pin").exists()


# -- the swarm: a hostile host and the bus ------------------------------------------------


async def _admin(swarm: Swarm) -> Any:
    user, password = swarm.net.admin()
    return await nats.connect(swarm.net.urls("a"), user=user, password=password)


@root_only
@pytest.mark.attack("swarm-deliver-subject", ref="red team round 9: CONSUMER.CREATE's body is not in NATS's permissions")
def test_a_hostile_host_cannot_have_the_bus_publish_a_message_for_it(swarm: Swarm) -> None:
    """Host c may create consumers on the roster buckets (its watches), and NATS's
    permissions see the subject, not the body: c puts a bundle "from alice" under its own
    key and creates a push consumer of it whose deliver subject is ``hive.msg.b.from.a``
    (a's subject to b, which c may not publish on), to have the server publish it for it.
    The server takes the consumer (with nobody subscribed, it delivers nothing); with a
    subscriber there (the admin watching the subject, say), what arrives still carries
    c's own subject, HIVE_MSGS stores nothing and bob gets nothing."""
    tag = "r9-" + secrets.token_hex(6)
    key = s.kv_subject("c", s.row_key("c", "r9inject"))
    subject = s.msg_subject("b", "a")
    body = json.dumps([{"id": tag, "from": "alice", "to": "bob", "kind": "message",
                        "body": f"{tag}: from alice, really", "sent_at": 0}]).encode()
    created: list[dict[str, Any]] = []
    before = stream_seq(swarm, subject)

    async def attack(nc: Any) -> None:
        assert "error" not in json.loads((await nc.request(key, body, timeout=10)).data)
        config = {"deliver_subject": subject, "filter_subject": key, "deliver_policy": "last_per_subject",
                  "ack_policy": "none", "inactive_threshold": 5_000_000_000, "mem_storage": True}
        req = json.dumps({"stream_name": s.kv_stream("c"), "config": config}).encode()
        created.append(json.loads((await nc.request(f"$JS.API.CONSUMER.CREATE.{s.kv_stream('c')}", req, timeout=10)).data))
        await asyncio.sleep(0.5)

    async def watched() -> tuple[list[str], list[str]]:
        adm = await _admin(swarm)
        seen: list[str] = []

        async def cb(m: Any) -> None:
            seen.append(m.subject)

        await adm.subscribe(subject, cb=cb)
        await adm.flush()
        try:
            errors = await asyncio.to_thread(as_host_c, swarm, attack, "c", 0)
            await asyncio.sleep(0.3)
            return errors, seen
        finally:
            await adm.close()

    async def clean(nc: Any) -> None:
        await nc.request(key, b"", headers={"KV-Operation": "DEL"}, timeout=10)

    try:
        errors, seen = asyncio.run(watched())
        assert errors == [] and created and created[0].get("config", {}).get("deliver_subject") == subject, created
        assert seen == [key], seen  # delivered under c's own subject, never a's
        got = take(swarm, "b", "bob", wait=1.0)
        assert stream_seq(swarm, subject) == before
        assert not [m for m in got if m["body"].startswith(tag)], got
    finally:
        as_host_c(swarm, clean, settle=0)


@root_only
@pytest.mark.attack("swarm-claim-time", ref="red team round 9: name claims ordered by the bus's store time")
def test_a_hostile_host_cannot_date_its_own_claim_back(swarm: Swarm) -> None:
    """c claims ``alice`` (a's) with headers that name a time of its own choosing
    (``Nats-Time-Stamp`` in 2001), then deletes and makes
    it again: every live-claims read (the one the receivers make) still stamps c's claim
    with the bus's own time, later than a's, so alice stays a's."""
    key = s.kv_subject("c", s.name_key("alice", "c"))
    claims: list[dict[str, Any]] = []

    def forged() -> dict[str, str]:
        return {"Nats-Time-Stamp": "2001-01-01T00:00:00Z", "Nats-Msg-Id": "r9-" + secrets.token_hex(6)}

    async def attack(nc: Any) -> None:
        t0 = time.time()
        for headers in (forged(), {"KV-Operation": "DEL"}, forged()):
            reply = json.loads((await nc.request(key, b"c", headers=headers, timeout=10)).data)
            assert "error" not in reply, reply
        got = await live_claims(await roster_buckets(nc), "alice")
        claims.append(got)
        assert got["c"].timestamp() >= t0 - 5, got  # the bus's time, not the header's

    async def restore(nc: Any) -> None:
        await nc.request(key, b"", headers={"KV-Operation": "DEL"}, timeout=10)

    try:
        assert as_host_c(swarm, attack, settle=0) == []
        assert set(claims[0]) == {"a", "c"} and earliest(claims[0]) == "a", claims
        time.sleep(0.5)
        assert all(r["host"] == "a" for r in swarm.status("b")["agents"] if r["name"] == "alice")
    finally:
        as_host_c(swarm, restore, settle=0)

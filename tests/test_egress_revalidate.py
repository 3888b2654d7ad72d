"""``still_allowed``: would the agent's rules now allow a connection the proxy made
(``EgressProxy.revalidate`` ends those they don't; egress_tls's ``replan`` asks it before
each request of a terminated connection). No lookup: the address is the one connected to."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from hyperhive.core.egress import still_allowed
from hyperhive.wire.egress import parse_rules

PUBLIC = ip_address("93.184.216.34")
PRIVATE = ip_address("10.1.2.3")


@pytest.mark.parametrize(
    ("rules", "host", "port", "address", "allowed"),
    [
        (["example.com:443"], "example.com", 443, PUBLIC, True),
        ([], "example.com", 443, PUBLIC, False),  # the rule taken back
        (["example.com:80"], "example.com", 443, PUBLIC, False),  # another port
        (["*.example.com:443"], "api.example.com", 443, PUBLIC, True),
        (["other.test:443"], "example.com", 443, PUBLIC, False),
        (["93.184.216.34:443"], "93.184.216.34", 443, PUBLIC, True),
        (["93.184.216.0/24:443"], "93.184.216.34", 443, PUBLIC, True),
        (["example.com:443"], "93.184.216.34", 443, PUBLIC, False),  # a literal needs an address rule
        # A private address: a name rule never opens it, an address rule within its range does.
        (["intra.test:443"], "intra.test", 443, PRIVATE, False),
        (["intra.test:443", "10.0.0.0/8:443"], "intra.test", 443, PRIVATE, True),
        (["intra.test:443", "10.0.0.0/8:80"], "intra.test", 443, PRIVATE, False),
        (["example.com:443"], "bad_name!", 443, PUBLIC, False),
    ],
)
def test_still_allowed(rules: list[str], host: str, port: int, address: object, allowed: bool) -> None:
    assert still_allowed(parse_rules(rules), host, port, address) is allowed  # type: ignore[arg-type]

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


def test_revalidate_ends_what_the_rules_no_longer_allow_and_the_log_says_why() -> None:
    """A tunnel whose rule is taken back: both sockets shut down (its peers read the end),
    and its decision's reason, written to the log row when the relay ends, says why. A
    tunnel the rules still allow is left as it is."""
    import socket

    from hyperhive.core.egress import ENDED, Decision, EgressProxy, _Open

    rules = {"a": parse_rules(["example.com:443", "other.test:443"])}
    proxy = EgressProxy(lambda agent: rules[agent], lambda d: None)
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        ended = Decision("a", "example.com", 443, True, "CONNECT")
        kept = Decision("a", "other.test", 443, True, "CONNECT")
        proxy._track("a", ended, _Open("example.com", 443, PUBLIC, (pairs[0][0], pairs[1][0]), "tunnel"))
        proxy._track("a", kept, _Open("other.test", 443, PUBLIC, (pairs[2][0], pairs[3][0]), "tunnel"))
        assert proxy.revalidate("a") == 0  # nothing changed
        rules["a"] = parse_rules(["other.test:443"])
        assert proxy.revalidate("a") == 1
        assert ended.reason == "CONNECT" + ENDED and kept.reason == "CONNECT"
        for peer in (pairs[0][1], pairs[1][1]):
            peer.settimeout(2)
            assert peer.recv(1) == b""  # shut down: the end of input
        pairs[3][1].setblocking(False)
        with pytest.raises(BlockingIOError):  # still open: nothing to read, no end
            pairs[3][1].recv(1)
    finally:
        for x, y in pairs:
            x.close()
            y.close()


def test_a_batch_of_decisions_not_written_is_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """A full disk fails a whole batch (up to 50 ms of a refused-egress flood): one line
    with each agent's count and the last decision, not a line a decision."""
    import asyncio
    import logging

    from hyperhive.core.hive import _egress_written

    rows = [{"agent": "a" if i % 3 else "b", "host": f"h{i}.test", "port": 443} for i in range(600)]
    loop = asyncio.new_event_loop()
    try:
        fut: asyncio.Future[list[int]] = loop.create_future()
        fut.set_exception(OSError(28, "No space left on device"))
        with caplog.at_level(logging.ERROR, logger="hive"):
            _egress_written(rows, fut)  # type: ignore[arg-type]
        ok: asyncio.Future[list[int]] = loop.create_future()
        ok.set_result([1])
        _egress_written(rows[:1], ok)  # type: ignore[arg-type]
    finally:
        loop.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert lines[0].startswith("egress: 600 decision(s) not logged ([Errno 28] No space left on device): a 400, b 200;")
    assert "h599.test" in lines[0]

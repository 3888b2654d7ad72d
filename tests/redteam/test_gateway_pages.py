"""The gateway between the operator's browser and the agents' pages (issue 13, items 6
and 7).

- Open redirect: a plain form post goes back to a path the core builds (``/`` or
  ``/agent/NAME/``), whatever the Referer says; the gateway refuses the paths that
  made the redirect possible (``//evil.example/%2e%2e%2fagent/NAME/``) with a
  one-line 400.
- A page server is the harness's, and a compromised harness controls it (since issue 15
  at ``/agent/NAME/page/``, sandboxed; ``/agent/NAME/`` is the core's). Played here
  from the host: the harness's ``web.sock`` is moved aside and a hostile server is
  bound in its place (what the harness uid can do to its own socket). Nothing it
  answers reaches the operator's origin as state (Set-Cookie, Clear-Site-Data, ...),
  moves the browser (Location, Refresh) or steers nginx (X-Accel-Redirect to
  ``/api/state`` or an internal location would be served with the operator's
  session; X-Accel-Limit-Rate, X-Accel-Charset).
- No decoded control character (``%0d``, ``%0a``, ``%00``, ``%20``) reaches a page's
  request line: such paths are refused, and the query goes on still encoded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HiveProcess
from hyperhive.core.sessions import COOKIE
from hyperhive.gateway.config import BAD_REQUEST, CSP, PAGE_CSP, PAGE_HIDDEN_HEADERS
from web_fixture import Login, Web

AGENT = "rtmule"  # its page is swapped for the hostile one while a test runs
ASKER = "rtcarol"  # asks the questions the redirect tests answer
REF6 = "issue 13 item 6 (open redirect through the Referer)"
REF7 = "issue 13 item 7 (the gateway trusts agent pages too much)"


@pytest.fixture(scope="module")
def web(rt: HiveProcess) -> Web:
    return Web(rt)


@pytest.fixture(scope="module")
def login(web: Web) -> Login:
    return web.login()


# -- the compromised harness's page server ----------------------------------------------


class HostilePage:
    """Serves ``responses`` (path -> status, headers, body) on an agent's page socket and
    records the raw head of every request it gets."""

    def __init__(self, sock_path: Path, responses: dict[str, tuple[int, list[tuple[str, str]], bytes]]) -> None:
        self.path = sock_path
        self.aside = sock_path.with_name("web.sock.harness")
        self.responses = responses
        self.heads: list[bytes] = []
        self.stop = threading.Event()

    def __enter__(self) -> HostilePage:
        st = os.stat(self.path)
        os.rename(self.path, self.aside)  # the harness's listener lives on, unreachable
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        os.chown(self.path, st.st_uid, st.st_gid)
        os.chmod(self.path, 0o660)
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close()
        os.unlink(self.path)
        os.rename(self.aside, self.path)

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head = data.split(b"\r\n\r\n", 1)[0]
            self.heads.append(head)
            target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode(errors="replace").split("?")[0]
            status, headers, body = self.responses.get(target, (404, [], b"not here\n"))
            out = [f"HTTP/1.1 {status} X", "Content-Type: text/plain; charset=utf-8",
                   f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in headers)]
            conn.sendall("\r\n".join(out).encode() + b"\r\n\r\n" + body)

    @property
    def request_lines(self) -> list[bytes]:
        return [h.split(b"\r\n", 1)[0] for h in self.heads]


def raw_get(web: Web, target: str, login: Login | None, **headers: str) -> tuple[int, list[tuple[str, str]], str]:
    """GET with the request target exactly as given (httpx would normalise it)."""
    conn = http.client.HTTPConnection("127.0.0.1", web.hive.port, timeout=30)
    try:
        conn.request("GET", target, headers={**({"Cookie": f"{COOKIE}={login.cookie}"} if login else {}), **headers})
        r = conn.getresponse()
        return r.status, r.getheaders(), r.read().decode(errors="replace")
    finally:
        conn.close()


# Everything a hostile page may say about the operator's origin and to nginx, each with a
# value that would hurt. The values are what the page sends; none may come out.
STEER = {
    "Set-Cookie": f"{COOKIE}=planted; Path=/; HttpOnly",
    "Set-Cookie2": "x=1",
    "Clear-Site-Data": '"cookies", "storage"',
    "Service-Worker-Allowed": "/",
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
    "Refresh": "0; url=//evil.example/",
    "Link": "<//evil.example/x.css>; rel=preload; as=style",
    "Alt-Svc": 'h2="evil.example:443"',
    "Content-Security-Policy": "script-src * 'unsafe-inline'",
    "Content-Security-Policy-Report-Only": "default-src 'none'; report-uri //evil.example/r",
    "Report-To": '{"url": "//evil.example/r"}',
    "Reporting-Endpoints": 'e="//evil.example/r"',
    "NEL": '{"report_to": "e"}',
    "X-Frame-Options": "ALLOWALL",
    "Referrer-Policy": "unsafe-url",
    "Permissions-Policy": "camera=*",
    "Cross-Origin-Opener-Policy": "unsafe-none",
    "Cross-Origin-Embedder-Policy": "unsafe-none",
    "Cross-Origin-Resource-Policy": "cross-origin",
    "Access-Control-Allow-Origin": "http://evil.example",
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Allow-Methods": "POST",
    "Access-Control-Allow-Headers": "X-CSRF-Token",
    "Access-Control-Expose-Headers": "*",
    "WWW-Authenticate": 'Basic realm="hive: log in again"',
    "Proxy-Authenticate": 'Basic realm="x"',
    "X-Accel-Buffering": "yes",
    "X-Accel-Charset": "utf-7",
    "X-Accel-Expires": "3600",
    "X-Accel-Limit-Rate": "1",  # (unbuffered, as these responses are, nginx 1.22 ignores it anyway)
    "Keep-Alive": "timeout=3600",
    "Proxy-Connection": "keep-alive",
    "Upgrade": "h2c",
    "TE": "trailers",
    "Trailer": "X-Late",
}
BODY = b"the hostile page's own body\n"
RESPONSES: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {
    # nginx would serve the operator's /api/state (its Cookie is the operator's) in place of this
    "/state-please": (200, [*STEER.items(), ("X-Accel-Redirect", "/api/state")], BODY),
    "/schema-please": (200, [("X-Accel-Redirect", "/api/openapi.json")], BODY),
    # an internal location: reachable only through X-Accel-Redirect; answers with the CSRF token
    "/auth-please": (200, [("X-Accel-Redirect", "/_hive_auth")], BODY),
    "/away": (302, [("Location", "//evil.example/phish"), ("Refresh", "0; url=//evil.example/")], BODY),
    "/ok": (200, [], BODY),
}


@contextlib.contextmanager
def hostile(web: Web) -> Iterator[HostilePage]:
    with HostilePage(web.hive.run_dir / "ui" / AGENT / "web.sock", RESPONSES) as page:
        yield page


# (A harness's page gets the gateway's CSP with a sandbox, since issue 15.)
GATEWAY_OWN = {"content-security-policy": PAGE_CSP, "x-frame-options": "DENY", "referrer-policy": "same-origin",
               "x-content-type-options": "nosniff"}


def assert_nothing_steered(web: Web, login: Login, r_status: int, headers: list[tuple[str, str]], body: str,
                           status: int, want: bytes) -> None:
    assert r_status == status, (r_status, headers, body[:300])
    assert body == want.decode(), f"nginx served something else than the page's answer: {body[:300]!r}"
    names = [k.lower() for k, _ in headers]
    leaked = sorted(h for h in {*STEER, *PAGE_HIDDEN_HEADERS, "Location", "X-Accel-Redirect"}
                    if h.lower() in names and h.lower() not in GATEWAY_OWN)
    assert not leaked, f"the page's headers reached the browser: {leaked} in {headers}"
    for name, value in GATEWAY_OWN.items():  # the gateway's own, once, never the page's
        assert [v for k, v in headers if k.lower() == name] == [value], (name, headers)
    assert [v for k, v in headers if k.lower() == "content-type"] == ["text/plain; charset=utf-8"]  # not utf-7
    assert "x-csrf-token" not in names
    assert web.get("/api/state", login=login).status_code == 200  # the session is the operator's still


# -- item 7: the page's response headers -------------------------------------------------


@pytest.mark.attack("gateway.page-headers", ref=REF7)
@pytest.mark.parametrize("path", ["/state-please", "/schema-please", "/auth-please"])
def test_page_headers_neither_reach_the_browser_nor_steer_nginx(web: Web, login: Login, path: str) -> None:
    with hostile(web) as page:
        r = web.get(f"/agent/{AGENT}/page{path}", login=login)
    assert_nothing_steered(web, login, r.status_code, list(r.headers.multi_items()), r.text, 200, BODY)
    assert not r.cookies, r.cookies
    # The page was asked once, without the operator's cookie.
    assert page.request_lines == [f"GET {path} HTTP/1.1".encode()], page.request_lines
    assert b"\r\ncookie:" not in page.heads[0].lower(), page.heads[0]


@pytest.mark.attack("gateway.page-headers", ref=REF7)
def test_page_cannot_redirect_the_operator_away(web: Web, login: Login) -> None:
    with hostile(web):
        status, headers, body = raw_get(web, f"/agent/{AGENT}/page/away", login)
    assert_nothing_steered(web, login, status, headers, body, 302, BODY)


# -- item 7: what reaches a page's request line ------------------------------------------


BAD_PATHS = [
    f"/agent/{AGENT}/page/ok%0d%0aX-Injected:%20yes",
    f"/agent/{AGENT}/page/ok%0d",
    f"/agent/{AGENT}/page/ok%0a",
    f"/agent/{AGENT}/page/%0d%0aGET%20/state%20HTTP/1.1",
    f"/agent/{AGENT}/page/ok%00",
    f"/agent/{AGENT}/page/ok%20HTTP/1.0",
    f"/agent/{AGENT}/page/ok%09",
    f"/agent/{AGENT}/page/ok%7f",
    f"/agent/{AGENT}/%2e%2e/%2e%2e/api/state",
    f"/agent/{AGENT}/../rtbob/",
    f"/agent/{AGENT}/page/%2e%2e/%2e%2e/api/state",  # out of the sandboxed page, to the core's
    f"/agent/{AGENT}/page/../",
    f"/agent/{AGENT}//ok",
    f"/agent/%{ord(AGENT[0]):02x}{AGENT[1:]}/ok",  # an encoded letter of the name
    f"//evil.example/%2e%2e%2fagent/{AGENT}/",
    f"/agent/{AGENT}/page/ok\\..\\",
]


@pytest.mark.attack("gateway.request-splitting", ref=REF7)
def test_control_characters_never_reach_the_page(web: Web, login: Login) -> None:
    with hostile(web) as page:
        refused = {path: raw_get(web, path, login) for path in BAD_PATHS}
        # A script gets the refusal as the core's: JSON, one line.
        as_json = raw_get(web, f"/agent/{AGENT}/page/ok%0d%0a", login, Accept="application/json")
        # The query is the page's business: it goes on as sent, still encoded.
        ok = raw_get(web, f"/agent/{AGENT}/page/ok?after=%0d%0a%00%20x", login)
    for path, (status, headers, body) in refused.items():
        assert status == 400, (path, status, body[:200])
        assert body == BAD_REQUEST + "\n", (path, body)
        assert body.count("\n") == 1 and "<" not in body, (path, body)
        assert [v for k, v in headers if k.lower() == "content-security-policy"] == [CSP], (path, headers)
    assert as_json[0] == 400 and json.loads(as_json[2]) == {"ok": False, "error": BAD_REQUEST}, as_json
    assert ("Content-Type", "application/json") in as_json[1] and as_json[2].count("\n") == 1, as_json
    assert ok[0] == 200 and ok[2] == BODY.decode(), ok
    assert page.request_lines == [b"GET /ok?after=%0d%0a%00%20x HTTP/1.1"], page.request_lines
    # The harness's own page is back once the hostile one is gone; no token reaches it
    # (the page tokens went with issue 15: the operator's view is the core's).
    r = web.get(f"/agent/{AGENT}/page/", login=login)
    assert r.status_code == 200 and "csrf" not in r.text.lower(), r.text[:300]
    assert login.csrf not in r.text  # the session's own token never reaches a harness


# -- item 6: the open redirect ---------------------------------------------------------------


@pytest.mark.attack("surface.open-redirect", ref=REF6)
def test_agent_page_is_not_served_under_a_foreign_looking_path(web: Web, login: Login) -> None:
    status, _, body = raw_get(web, f"//evil.example/%2e%2e%2fagent/{ASKER}/", login)
    assert status == 400, (status, body[:300])
    assert body.startswith("bad request: ") and body.count("\n") == 1, body


REFERERS: dict[str, str] = {
    "{base}//evil.example/%2e%2e%2fagent/" + ASKER + "/": "/",
    "{base}/\\evil.example/": "/",
    "{base}//evil.example/": "/",
    "{base}/%2f%2fevil.example/": "/",
    "{base}/agent/Evil.Example/": "/",
    "{base}/agent/" + ASKER: "/",
    "http://[::1": "/",
    "javascript:alert(1)//agent/x/": "/",
    "": "/",
    "{base}/": "/",
    "{base}/agent/" + ASKER + "/": f"/agent/{ASKER}/",
    "{base}/agent/" + ASKER + "/../../evil.example/": f"/agent/{ASKER}/",
    "http://evil.example/agent/" + ASKER + "/": f"/agent/{ASKER}/",  # a path of this origin all the same
    # Another swarm host's agent's page (docs/swarm.md): both names valid, or the dashboard.
    "{base}/swarm/b/agent/" + ASKER + "/": f"/swarm/b/agent/{ASKER}/",
    "{base}/swarm/B/agent/" + ASKER + "/": "/",
    "{base}/swarm/b/agent/" + ASKER: "/",
    "{base}/swarm/b/page/" + ASKER + "/": "/",
    "{base}/swarm/evil.example/agent/" + ASKER + "/": "/",
}


@pytest.mark.attack("surface.open-redirect", ref=REF6)
@pytest.mark.parametrize("referer", list(REFERERS))
def test_answer_goes_back_only_to_a_path_the_core_builds(web: Web, login: Login, referer: str) -> None:
    asked = web.hive.agent_call(ASKER, "ask", to="operator", question="where do I send you?")
    assert asked.get("ok"), asked
    headers: dict[str, Any] = {"Referer": referer.format(base=web.base)} if referer else {}
    # As the agent page's inline form sends it: a plain form post, the token as a field.
    r = web.request("POST", f"/answer-question/{asked['id']}", login=login, origin=web.origin,
                    headers=headers, data={"csrf_token": login.csrf, "answer": "here"})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == REFERERS[referer], (referer, r.headers["location"])

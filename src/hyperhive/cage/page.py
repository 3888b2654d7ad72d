"""The agent's harness's own page, served on its own socket (``web.sock``).

The gateway proxies ``/agent/<name>/page/`` here after the core has checked the
operator's session, with ``Content-Security-Policy: sandbox``: the page is an opaque
origin, so nothing it runs or loads carries the operator's cookie or reads the operator's
origin, and no token of the operator's reaches it. It is therefore one self-contained,
read-only document (what the harness sees of its agent); the operator's view of the agent,
with its live transcript and the answer / approve / deny forms, is the core's
(``/agent/<name>/``). The runtime can't reach this socket: its directory belongs to the
harness uid and the gateway's group.

Everything the agent produced is data: Jinja2 autoescapes it, and controls, C1 and bidi
characters are shown as escapes (``hyperhive.display`` as Jinja's ``finalize``).
"""

from __future__ import annotations

import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hyperhive.display import dumps, visible_value

# As the gateway sets it for this page (it drops the page's own): a sandbox, no script.
CSP = (
    "sandbox; default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
HERE = Path(__file__).parent


def _templates() -> Any:
    import jinja2  # loaded on first request: the harness connects first, fast

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,
        finalize=visible_value,  # every {{ … }}: controls and bidi characters shown as escapes
    )  # absent optional fields (e.g. parent) are simply undefined
    env.filters["tojson_text"] = lambda v: v if isinstance(v, str) else dumps(v)
    env.filters["clock"] = clock
    env.globals["destination"] = destination
    return env


def clock(at: float | str | None) -> str:
    """An egress log time as the page shows it (UTC, to the second); rows carry RFC 3339."""
    # Here, not at the top: the module imports pydantic, which the harness otherwise never
    # needs (~60 ms of its start and ~5 MiB of every idle cage).
    from hyperhive.wire.timestamps import parse_timestamp

    return "" if at is None else time.strftime("%H:%M:%S", time.gmtime(parse_timestamp(at)))


def destination(host: str, port: int) -> str:
    if host == "-" or not port:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class UnixHTTPServer(socketserver.ThreadingUnixStreamServer):
    """HTTP on web.sock's connections, which hive-priv's listener (root and the gateway's
    group, 0660) took and the cage's init hands the harness one at a time, each on the
    harness's page pair (``source``, a SOCK_SEQPACKET socket; SCM_RIGHTS): the harness
    never binds anything on the host, nor holds the listener (one it shut down was dead
    until the cage restarted). A listener as ``source`` is accepted on, as from an init
    of an older hive that handed its listener over."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler], source: socket.socket) -> None:
        super().__init__("web.sock", handler, bind_and_activate=False)
        self.socket.close()
        self.socket = source
        self.handed = source.type == socket.SOCK_SEQPACKET

    def get_request(self) -> tuple[socket.socket, Any]:
        if not self.handed:
            conn, _ = self.socket.accept()
            return conn, ("gateway", 0)
        msg, fds, _, _ = socket.recv_fds(self.socket, 1, 1)
        if not fds:
            if not msg:  # init closed its end: this harness is ending
                time.sleep(1.0)
            raise OSError("no connection handed over")  # socketserver skips the request
        return socket.socket(fileno=fds[0]), ("gateway", 0)


class PageHandler(BaseHTTPRequestHandler):
    server_version = "hive-harness"
    protocol_version = "HTTP/1.1"
    agent_socket = ""
    env: Any = None

    def log_message(self, fmt: str, *args: Any) -> None:
        pass  # the gateway logs requests

    def call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        from hyperhive.cage.harness import Conn

        conn = Conn(self.agent_socket)
        try:
            return conn.call(cmd, **fields)
        finally:
            conn.close()

    def send_body(self, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # http.server's naming
        url = urlsplit(self.path)
        try:
            if url.path in ("/", "/index.html"):
                self.index()
            else:
                self.send_body(404, "text/plain; charset=utf-8", b"not found\n")
        except (ConnectionError, OSError, RuntimeError, ValueError) as e:
            try:
                self.send_body(
                    503, "text/plain; charset=utf-8", f"the hive is unavailable: {e}\n".encode()
                )
            except OSError:
                pass
        except Exception as e:  # a bug here must not take the harness down
            print(f"harness: page error: {e!r}", file=sys.stderr, flush=True)
            try:
                self.send_body(500, "text/plain; charset=utf-8", b"internal error\n")
            except OSError:
                pass

    def index(self) -> None:
        if PageHandler.env is None:
            PageHandler.env = _templates()
        state = self.call("page_state")
        entries = self.call("transcript_read", after=0, limit=200)["entries"]
        html = PageHandler.env.get_template("agent.html").render(
            agent=state["agent"],
            questions=state["questions"],
            questions_total=state.get("questions_total", len(state["questions"])),
            approvals=state["approvals"],
            approvals_total=state.get("approvals_total", len(state["approvals"])),
            egress_rules=state.get("egress_rules", []),
            egress_log=state.get("egress_log", []),
            entries=entries,
        )
        self.send_body(200, "text/html; charset=utf-8", html.encode())


def serve_page(agent_socket: str, listener: socket.socket) -> threading.Thread | None:
    """Serve the page in a background thread on ``listener`` (web.sock, handed in)."""
    handler = type("Handler", (PageHandler,), {"agent_socket": agent_socket})
    try:
        server = UnixHTTPServer(handler, listener)
    except OSError as e:
        print(f"harness: no page: can't serve web.sock: {e}", file=sys.stderr, flush=True)
        return None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread

"""Renders the gateway's nginx.conf from its template."""

from __future__ import annotations

from pathlib import Path

import jinja2

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
# A harness's page (/agent/NAME/page/): the same, in a sandbox of its own (an opaque
# origin: no cookie goes with its requests, it reads nothing of the operator's origin, and
# without allow-popups it opens no window).
PAGE_CSP = "sandbox allow-scripts allow-forms; " + CSP
USER = "hive-gateway"
# The gateway's one line for a path the hive never builds, and for nginx's own 400s.
BAD_REQUEST = (
    "bad request: malformed, or not a path the hive serves (no %-escapes, // or dot segments)"
)
# Response headers of an agent's page that never reach the operator's browser, besides
# CSP and nosniff (the gateway sets its own) and what nginx drops anyway (Date, Server,
# Connection, Transfer-Encoding): state on the operator's origin (cookies, site data,
# service workers, HSTS), where the browser goes (Location, Refresh), who may read or
# frame it, credentials prompts, nginx's own controls and hop-by-hop fields.
PAGE_HIDDEN_HEADERS = (
    "Set-Cookie",
    "Set-Cookie2",
    "Content-Disposition",
    "Clear-Site-Data",
    "Service-Worker-Allowed",
    "Strict-Transport-Security",
    "Location",
    "Refresh",
    "Link",
    "Alt-Svc",
    "Content-Security-Policy-Report-Only",
    "Report-To",
    "Reporting-Endpoints",
    "NEL",
    "X-Frame-Options",
    "Referrer-Policy",
    "Permissions-Policy",
    "Cross-Origin-Opener-Policy",
    "Cross-Origin-Embedder-Policy",
    "Cross-Origin-Resource-Policy",
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Credentials",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Expose-Headers",
    "WWW-Authenticate",
    "Proxy-Authenticate",
    "X-Accel-Redirect",
    "X-Accel-Buffering",
    "X-Accel-Charset",
    "X-Accel-Expires",
    "X-Accel-Limit-Rate",
    "Keep-Alive",
    "Proxy-Connection",
    "Upgrade",
    "TE",
    "Trailer",
)


def render(
    listen: str, run_dir: Path, gateway_dir: Path, user: str = USER, max_agents: int = 100
) -> str:
    """``max_agents``: [limits] max_agents, which sizes nginx's worker connections."""
    from hyperhive.core.budget import gateway_connections

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent)),
        autoescape=False,
        keep_trailing_newline=True,
    )
    return env.get_template("nginx.conf.j2").render(
        listen=listen,
        run_dir=run_dir,
        gateway_dir=gateway_dir,
        user=user,
        worker_connections=gateway_connections(max_agents),
        csp=CSP,
        page_csp=PAGE_CSP,
        bad_request=BAD_REQUEST,
        page_hidden_headers=PAGE_HIDDEN_HEADERS,
    )


def write(listen: str, run_dir: Path, uid: int, gid: int, max_agents: int = 100) -> Path:
    """Write RUN/gateway/nginx.conf (root's: the master reads it as root), and the
    ``passwd`` and ``group`` that make ``hive-gateway`` this hive's gateway ids (``uid``,
    ``gid``) in nginx's own mount namespace (cli/gateway_users.py). The workers get
    RUN/gateway/tmp, which nginx hands to their user itself."""
    import os

    from hyperhive.priv import safefs

    gateway_dir = run_dir / "gateway"
    for sub in ("", "tmp"):
        (gateway_dir / sub).mkdir(parents=True, exist_ok=True)
    os.chown(gateway_dir, 0, gid)
    os.chmod(gateway_dir, 0o750)
    with safefs.opened(safefs.open_anchor(gateway_dir)) as anchor:
        for name, text in (
            (
                "passwd",
                f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
                f"{USER}:x:{uid}:{gid}:hive gateway:/nonexistent:/usr/sbin/nologin\n",
            ),
            ("group", f"root:x:0:\n{USER}:x:{gid}:\n"),
            ("nginx.conf", render(listen, run_dir, gateway_dir, USER, max_agents)),
        ):
            safefs.write_file(anchor, name, text.encode(), 0o644, durable=False)
    return gateway_dir / "nginx.conf"


def user_files(run_dir: Path) -> tuple[Path, Path]:
    """The ``passwd`` and ``group`` files ``write`` made."""
    return run_dir / "gateway" / "passwd", run_dir / "gateway" / "group"

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
    listen: str,
    run_dir: Path,
    gateway_dir: Path,
    user: str | None = USER,
    max_agents: int = 100,
    pid_path: Path | None = None,
) -> str:
    """``max_agents``: [limits] max_agents, which sizes nginx's worker connections.
    ``user`` None: no ``user`` directive (a master that is not root: `hive up`'s)."""
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
        pid_path=pid_path or gateway_dir / "nginx.pid",
        worker_connections=gateway_connections(max_agents),
        csp=CSP,
        page_csp=PAGE_CSP,
        bad_request=BAD_REQUEST,
        page_hidden_headers=PAGE_HIDDEN_HEADERS,
    )


def write(listen: str, run_dir: Path, uid: int, gid: int, max_agents: int = 100) -> Path:
    """RUN/gateway/nginx.conf for `hive up`'s nginx, whose master and workers are this
    hive's gateway ids (``uid``, ``gid``), never root: the config root's, 0640, in
    ``gateway/`` (root and that group, 0750); ``gateway/tmp`` (0700) theirs, for nginx's
    temporary files and its own pid file. The pid file hive-priv's ``reload_gateway``
    trusts, ``gateway/nginx.pid``, is root's: `hive up` writes it."""
    import os

    from hyperhive.priv import safefs

    gateway_dir = run_dir / "gateway"
    gateway_dir.mkdir(parents=True, exist_ok=True)
    os.chown(gateway_dir, 0, gid)
    os.chmod(gateway_dir, 0o750)
    conf = render(listen, run_dir, gateway_dir, None, max_agents, gateway_dir / "tmp" / "nginx.pid")
    with safefs.opened(safefs.open_anchor(gateway_dir)) as anchor:
        # An earlier nginx's temporary files stay its ids' (the same ids: this hive's).
        os.close(safefs.ensure_dir(anchor, "tmp", uid, gid, 0o700))
        safefs.write_file(anchor, "nginx.conf", conf.encode(), 0o640, durable=False)
        os.chown("nginx.conf", 0, gid, dir_fd=anchor, follow_symlinks=False)
    return gateway_dir / "nginx.conf"


def fresh_tmp(run_dir: Path, uid: int, gid: int) -> None:
    """``gateway/tmp`` removed and made again, the gateway ids' 0700 (as root, never
    through a link): before each start of nginx, whose pid file and temporary files it
    holds and whose ids could have left anything there."""
    import contextlib
    import os

    from hyperhive.priv import safefs

    with safefs.opened(safefs.open_anchor(run_dir / "gateway")) as anchor:
        with contextlib.suppress(FileNotFoundError):
            safefs.remove_tree(anchor, "tmp")
        os.close(safefs.ensure_dir(anchor, "tmp", uid, gid, 0o700))


def write_pid(run_dir: Path, pid: int) -> None:
    """``gateway/nginx.pid``, root's 0644: the master `hive up` started (hive-priv's
    ``reload_gateway`` signals only what a root-owned pid file names)."""
    from hyperhive.priv import safefs

    with safefs.opened(safefs.open_anchor(run_dir / "gateway")) as anchor:
        safefs.write_file(anchor, "nginx.pid", f"{pid}\n".encode(), 0o644, durable=False)

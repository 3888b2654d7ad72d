"""Paths as a cage sees them. Shared by hive-priv (which builds the cage) and
the code that runs inside it."""

CAGE_PYTHON = (
    "/usr/bin/python3.11"  # Debian's: nothing of the host's /root or venv paths is visible
)
HIVE_SRC = "/opt/hive/src"
HIVE_SITE = "/opt/hive/site"
HOME = "/home/agent"
SOCKET_DIR = "/run/hive"
AGENT_SOCKET = f"{SOCKET_DIR}/agent.sock"
# Egress: a request sent straight to this socket (it refuses descriptors), or the
# harness's bridge: it listens on the cage's own loopback and hands each connection over
# on the handover socket (core/egress.py, handover_path).
EGRESS_SOCKET = f"{SOCKET_DIR}/egress.sock"
EGRESS_HANDOVER_SOCKET = f"{SOCKET_DIR}/egress-handover.sock"
EGRESS_PORT = 3128
# The one byte the egress bridge sends with the client's connection attached (SCM_RIGHTS);
# a proxy request never starts with NUL (hyperhive/relay.py, core/egress.py).
HANDOVER = b"\0"
# The hive CA (TLS termination at the proxy), written there by hive-core: alone, and
# appended to the host's bundle. Trusted through the usual variables (base_env).
HIVE_CA = f"{SOCKET_DIR}/hive-ca.pem"
CA_BUNDLE = f"{SOCKET_DIR}/ca-bundle.pem"
PROXY_URL = f"http://127.0.0.1:{EGRESS_PORT}"
# The page's listening socket (web.sock, bound by hive-priv on the host): its descriptor
# in init and in each harness. Nothing of the page is in the cage's filesystem.
PAGE_FD_ENV = "HIVE_PAGE_FD"
# The egress bridge's listener (127.0.0.1:EGRESS_PORT), bound by init once and handed to
# each harness: the port is never free while the cage runs, so nothing of the runtime's
# can take it between one harness and the next (re-check of red team round 26).
BRIDGE_FD_ENV = "HIVE_BRIDGE_FD"
BIN = "/opt/hive/bin"  # the `hive` command
PATH = f"{BIN}:/usr/local/bin:/usr/bin:/bin"


def base_env(name: str) -> dict[str, str]:
    """The environment of everything the agent runs (turns, `hive exec`). Every
    proxy variable points at the egress bridge: there is no other way out. The
    cage's loopback is its own (its network namespace has nothing else), so it
    is reached directly; the proxy would refuse loopback anyway."""
    env = {
        "PATH": PATH,
        "HOME": HOME,
        "USER": "agent",
        "LANG": "C.UTF-8",
        "HIVE_AGENT": name,
        "HIVE_SOCKET": AGENT_SOCKET,
    }
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        env[var] = env[var.lower()] = PROXY_URL
    env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1,::1"
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        env[var] = CA_BUNDLE
    env["NODE_EXTRA_CA_CERTS"] = HIVE_CA
    return env


def python_argv(*args: str) -> list[str]:
    """Run ``python -m hyperhive.cage ARGS`` inside a cage, isolated from any environment."""
    boot = (
        f"import sys; sys.path[:0] = [{HIVE_SRC!r}, {HIVE_SITE!r}]; "
        "from hyperhive.cage.__main__ import main; main()"
    )
    # -S: no site module. The cage's code is on the path set here; site would only add the
    # host's dist-packages and read .pth files (a few ms of every start, and memory).
    return [CAGE_PYTHON, "-I", "-S", "-c", boot, *args]

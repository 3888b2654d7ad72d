"""Secret bindings: a secret (by name) bound to agents, one destination and a header.

``header`` is a template with exactly one ``{}``: ``"x-api-key: {}"`` or
``"Authorization: Bearer {}"``. The proxy puts the secret where ``{}`` is, in that
header, on requests to ``to`` only. ``env`` names the variable that holds the
placeholder inside the cage (``ANTHROPIC_API_KEY``); without it the agent is told
nothing and must use the placeholder some other way (none given: no placeholder).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

from hyperhive.cage.layout import base_env
from hyperhive.wire.common import AgentName, Strict
from hyperhive.wire.egress import RuleError, check_hostname, parse_port, split_host_port

SECRET_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_HEADER = re.compile(rf"^({_TOKEN}): ?([ -~]*)$")
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")
# Never a placeholder's variable: what every process of the cage relies on (the cage's own
# environment: PATH, HOME, the proxies, the CA bundles, ...), and what a loader, shell or
# interpreter reads to decide what code runs or where it comes from. A placeholder there
# would serve no binding, but it would break the runtime (NODE_OPTIONS, SSL_CERT_FILE), load
# or source a relative path the agent can plant (LD_PRELOAD, BASH_ENV, PYTHONPATH) and make
# every clean `hive exec` of the agent refused (red team round 6).
RESERVED_ENV = frozenset(base_env("x")) | {
    "HIVE_TURN",
    "BASH_ENV",
    "ENV",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "PROMPT_COMMAND",
    "IFS",
    "GCONV_PATH",
    "HOSTALIASES",
    "LOCPATH",
    "NLSPATH",
    "TMPDIR",
    "NODE_OPTIONS",
    "NODE_PATH",
    "PERL5OPT",
    "PERL5LIB",
    "PERLLIB",
    "RUBYOPT",
    "RUBYLIB",
    "GIT_CONFIG_GLOBAL",
    "GIT_EXEC_PATH",
    "GIT_SSH_COMMAND",
    "PAGER",
    "GIT_PAGER",
    "EDITOR",
    "VISUAL",
}
RESERVED_ENV_PREFIXES = ("HIVE_", "LD_", "PYTHON", "LC_", "GIT_CONFIG_")

SecretName = Annotated[str, Field(pattern=SECRET_NAME_PATTERN)]
# A binding's placeholder (core/secrets.py new_placeholder): what `hive exec` takes from
# hive-core's agent_env, and nothing else (a compromised core can't set PATH there).
PLACEHOLDER_RE = re.compile(r"^hive-placeholder-[0-9a-f]{40}$")


def parse_header(template: str) -> tuple[str, str]:
    """``Name: value{}`` -> (lower-case name, value template); ValueError otherwise."""
    m = _HEADER.match(template)
    if m is None or m.group(2).count("{}") != 1 or "{" in m.group(2).replace("{}", ""):
        raise ValueError(
            "header must be 'Name: value' with exactly one {} where the secret goes,"
            " e.g. 'x-api-key: {}' or 'Authorization: Bearer {}'"
        )
    name = m.group(1).lower()
    if name in ("host", "content-length", "transfer-encoding", "connection"):
        raise ValueError(f"a secret cannot go in the {name!r} header")
    return name, m.group(2)


def _header(value: str) -> str:
    """A new binding's header (one stored before this check still parses: the proxy
    refuses its request, naming the secret, if the value it makes can't be sent)."""
    template = parse_header(value)[1]
    if template != template.strip(" "):  # what goes out would start or end with one
        raise ValueError("the header's value can't start or end with a space")
    return value


def parse_destination(text: str) -> tuple[str, int]:
    """``HOST:PORT`` with HOST a name (TLS is terminated for it, by name)."""
    try:
        host, port_text = split_host_port(text.strip())
        return check_hostname(host), parse_port(port_text)
    except RuleError as e:
        raise ValueError(f"to: {e} (a binding's destination is NAME:PORT)") from None


def _destination(value: str) -> str:
    host, port = parse_destination(value)
    return f"{host}:{port}"


def placeholder_var(name: object, value: object) -> bool:
    """A variable a binding may put a placeholder in, holding a placeholder."""
    if not (isinstance(name, str) and isinstance(value, str) and PLACEHOLDER_RE.match(value)):
        return False
    try:
        _env(name)
    except ValueError:
        return False
    return True


def _env(value: str) -> str:
    if (
        not _ENV.match(value)
        or value in RESERVED_ENV
        or value.startswith(RESERVED_ENV_PREFIXES)
        or value.endswith("_PROXY")
    ):
        raise ValueError(
            f"env must be an upper-case variable name, not a reserved one: {value!r} (not one"
            " the cage sets, nor one a loader, shell or interpreter reads: LD_*, PYTHON*,"
            " HIVE_*, BASH_ENV, NODE_OPTIONS, ...)"
        )
    return value


HeaderTemplate = Annotated[str, Field(max_length=200), AfterValidator(_header)]
Destination = Annotated[str, Field(max_length=300), AfterValidator(_destination)]
EnvName = Annotated[str, Field(max_length=64), AfterValidator(_env)]


class BindingSpec(Strict):
    """``[[secret_binding]]`` in hive.toml."""

    secret: SecretName
    agents: list[AgentName] = Field(min_length=1, max_length=1000)
    to: Destination
    header: HeaderTemplate
    env: EnvName | None = None

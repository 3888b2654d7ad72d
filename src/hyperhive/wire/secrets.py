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

from hyperhive.wire.common import AgentName, Strict
from hyperhive.wire.egress import RuleError, check_hostname, parse_port, split_host_port

SECRET_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_HEADER = re.compile(rf"^({_TOKEN}): ?([ -~]*)$")
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")
# Never a placeholder's variable: what every process of the cage relies on.
RESERVED_ENV = {"PATH", "HOME", "USER", "LANG", "HIVE_AGENT", "HIVE_SOCKET", "HIVE_TURN"}

SecretName = Annotated[str, Field(pattern=SECRET_NAME_PATTERN)]


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
    parse_header(value)
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


def _env(value: str) -> str:
    if not _ENV.match(value) or value in RESERVED_ENV or value.endswith("_PROXY"):
        raise ValueError(f"env must be an upper-case variable name, not a reserved one: {value!r}")
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

"""Egress rules: what an agent may reach through the hive's proxy.

A rule is ``HOST:PORT`` where HOST is a hostname (``api.anthropic.com``), a
wildcard (``*.pypi.org``: any name *under* pypi.org, not pypi.org itself), an
IP literal (``198.18.0.2``, ``[2001:db8::1]``) or a CIDR (``198.18.0.0/15``).
Every rule names exactly one port. Matching is pure; the proxy adds the
checks that need the network (DNS, the host's own addresses).

Hosts are read the way a resolver would read them, so that what is checked is
what would be reached: lower case, one trailing dot dropped, and the numeric
IPv4 spellings ``inet_aton`` accepts (``127.1``, ``2130706433``, ``0x7f.1``,
``0177.0.0.1``) are IPv4 addresses, never names. A name whose last label is a
number is refused (WHATWG URL: it can only be an IPv4 address), and so is an
IPv6 zone id (``fe80::1%eth0``): it picks an interface, which no rule names.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import unquote_to_bytes

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
MAX_RULE = 300


class RuleError(ValueError):
    """One line: why a rule or destination is not valid."""


@dataclass(frozen=True)
class Rule:
    text: str  # canonical form, as stored and shown
    port: int
    name: str | None = None  # exact hostname
    suffix: str | None = None  # wildcard: ".pypi.org"
    network: IPNetwork | None = None  # IP literal (a /32 or /128) or CIDR
    # L7 (``GET api.github.com:443/repos/acme/*``): a method (or ``*``) and a path glob;
    # only for an exact name, whose TLS the proxy then terminates to check each request.
    method: str | None = None
    path: str | None = None

    @property
    def l7(self) -> bool:
        return self.path is not None

    def allows(self, method: str, path: str) -> bool:
        """An L7 rule's verdict on a request (``path`` already through normal_path)."""
        if self.path is None:
            return True
        return (self.method == "*" or self.method == method) and fnmatch.fnmatchcase(
            path, self.path
        )

    def matches_name(self, host: str, port: int) -> bool:
        if port != self.port:
            return False
        if self.name is not None:
            return host == self.name
        return self.suffix is not None and host.endswith(self.suffix)

    def matches_address(self, address: IPAddress, port: int) -> bool:
        return port == self.port and self.network is not None and address in self.network


def parse_port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise RuleError(f"port must be 1-65535, got {text!r}")
    return int(text)


_NUMBER = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


def check_hostname(host: str) -> str:
    host = _normal(host)
    if len(host) > 253 or not _HOSTNAME.match(host):
        raise RuleError(f"not a valid hostname: {host[:80]!r}")
    if _NUMBER.match(host.rpartition(".")[2]):
        raise RuleError(
            f"not a valid hostname or IPv4 address (it ends in a number): {host[:80]!r}"
        )
    return host


def _normal(host: str) -> str:
    """Lower case without the one trailing dot of a fully qualified name."""
    host = host.lower()
    return host.removesuffix(".")


def numeric_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address ``inet_aton`` (and so getaddrinfo, curl, browsers) reads in
    ``host``: one to four parts, each decimal, ``0x`` hex or ``0``-prefixed octal, the
    last filling the remaining bytes. None if ``host`` is not such a spelling."""
    parts = _normal(host).split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        if re.fullmatch(r"0x[0-9a-f]*", part):
            values.append(int(part[2:] or "0", 16))
        elif re.fullmatch(r"0[0-7]+", part):
            values.append(int(part, 8))
        elif re.fullmatch(r"0|[1-9][0-9]*", part):  # "08" is neither octal nor decimal
            values.append(int(part, 10))
        else:
            return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    n = last
    for i, v in enumerate(head):
        n |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(n)


def ip_literal(host: str) -> IPAddress | None:
    """``host`` as an IP address (any spelling a resolver accepts), None if it is a
    name; RuleError for an IPv6 zone id."""
    if "%" in host:
        if ":" in host:
            raise RuleError(f"an IPv6 zone id is not allowed: {host[:80]!r}")
        return None  # not an address; and no valid name holds a '%' either
    try:
        return ipaddress.ip_address(_normal(host))
    except ValueError:
        return numeric_ipv4(host)


def split_host_port(text: str) -> tuple[str, str]:
    """``host:port`` or ``[v6]:port``."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise RuleError(f"expected [ADDRESS]:PORT, got {text[:80]!r}")
        return host, port
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise RuleError(f"expected HOST:PORT, got {text[:80]!r}")
    if ":" in host:
        raise RuleError(f"an IPv6 address needs brackets: [{host[:60]}]:{port}")
    return host, port


_METHOD = re.compile(r"^([A-Z]{1,20}|\*)$")
# A path glob: RFC 3986 path characters and '*', never '%', ';', '\\', '//' or dot segments.
_GLOB = re.compile(r"^/[A-Za-z0-9\-._~!$&'()*+,=:@/]*$")


def _parse_l7(text: str) -> Rule:
    method, _, rest = text.partition(" ")
    if not _METHOD.match(method):
        raise RuleError(f"an L7 rule starts with an upper-case method or '*': {text[:80]!r}")
    hostport, slash, path = rest.partition("/")
    if not slash:
        raise RuleError(f"an L7 rule is 'METHOD HOST:PORT/PATH-GLOB': {text[:80]!r}")
    host, port_text = split_host_port(hostport)
    port = parse_port(port_text)
    if ip_literal(host) is not None or host.startswith("*."):
        raise RuleError(f"an L7 rule names one host by name: {text[:80]!r}")
    name = check_hostname(host)
    glob = "/" + path
    if not _GLOB.match(glob) or "//" in glob or any(seg in (".", "..") for seg in glob.split("/")):
        raise RuleError(
            "an L7 path glob is '/' then path characters and '*', without '%', ';', '//'"
            f" or dot segments: {glob[:80]!r}"
        )
    return Rule(f"{method} {name}:{port}{glob}", port, name=name, method=method, path=glob)


class PathError(ValueError):
    """Why a request path is refused as ambiguous (one line)."""


_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_PATH_CHARS = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,=:@/%]*$")


def normal_path(target: str) -> str:
    """A request target as L7 rules see it: the path without the query, with the escapes
    of harmless characters decoded. Anything two servers could read two ways is refused,
    not guessed: a ';' (path parameters), an escaped '/', '\\', '.', '%' or control
    character, escapes that are not UTF-8, '//', a dot segment, a '#', a target that is
    not origin-form."""
    if "#" in target:
        # Not part of a request target (RFC 9112 3.2): one server ends the path there,
        # another keeps it (and resolves the dot segments after it: /ok#/../../admin).
        raise PathError("a '#' (fragment) in the request target is refused")
    path = target.partition("?")[0]
    if not path.startswith("/"):
        raise PathError("the request target must be a path (origin-form)")
    if ";" in path:
        raise PathError("';' (path parameters) is refused: servers read it differently")
    if not _PATH_CHARS.match(path):
        raise PathError("the path has characters outside RFC 3986")

    def decode(m: re.Match[str]) -> str:
        c = int(m.group(1), 16)
        if c < 0x21 or c == 0x7F or chr(c) in "/\\.%;":
            raise PathError(f"an escaped {chr(c)!r} (%{m.group(1)}) in the path is refused")
        return chr(c) if c < 0x80 and (chr(c).isalnum() or chr(c) in "-_~") else m.group(0).upper()

    path = _PCT.sub(decode, path)
    if "%" in _PCT.sub("", path):
        raise PathError("a '%' that is not an escape")
    try:
        unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        # An overlong form (%C0%AE is '.', %C0%AF '/') reads as that character on some
        # servers (IIS, old JVMs): a dot segment or a slash the check above never saw.
        raise PathError("escapes that are not valid UTF-8 (an overlong '.' or '/')") from None
    if "//" in path or any(seg in (".", "..") for seg in path.split("/")):
        raise PathError("'//' or a dot segment in the path is refused")
    return path


def parse_rule(text: str) -> Rule:
    if not isinstance(text, str) or len(text) > MAX_RULE:
        raise RuleError(f"an egress rule is a HOST:PORT string of at most {MAX_RULE} characters")
    if " " in text.strip():
        return _parse_l7(text.strip())
    host, port_text = split_host_port(text.strip())
    port = parse_port(port_text)
    if "/" in host:
        try:
            network = ipaddress.ip_network(host, strict=True)
        except ValueError as e:
            raise RuleError(f"not a valid CIDR: {e}") from None
        return Rule(_join(str(network), port), port, network=network)
    address = ip_literal(host)
    if address is not None:
        return Rule(_join(str(address), port), port, network=ipaddress.ip_network(address))
    if host.startswith("*."):
        base = check_hostname(host[2:])
        return Rule(f"*.{base}:{port}", port, suffix="." + base)
    name = check_hostname(host)
    return Rule(f"{name}:{port}", port, name=name)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def canonical_rule(text: str) -> str:
    return parse_rule(text).text


def _validate_rule(text: str) -> str:
    try:
        return canonical_rule(text)
    except RuleError as e:
        raise ValueError(str(e)) from None


# An egress rule in hive.toml, a spawn spec or a host verb: validated and canonical.
RuleText = Annotated[str, Field(max_length=MAX_RULE), AfterValidator(_validate_rule)]


class EgressPayload(BaseModel):
    """The payload of an ``egress`` approval: approving adds exactly ``host:port``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    host: Annotated[str, Field(min_length=1, max_length=MAX_RULE - 6)]
    port: Annotated[int, Field(ge=1, le=65535)]
    # Both or neither: an L7 rule "METHOD host:port/path" (the proxy terminates TLS).
    method: Annotated[str, Field(min_length=1, max_length=20)] | None = None
    path: Annotated[str, Field(min_length=1, max_length=MAX_RULE)] | None = None

    def rule(self) -> str:
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # a bare IPv6 address
        if any(c.isspace() for c in host):  # never read as a method and a host
            raise RuleError(f"not a valid hostname: {host[:80]!r}")
        if (self.method is None) != (self.path is None):
            raise RuleError("an L7 egress rule needs both method and path")
        if self.method is not None and self.path is not None:
            return canonical_rule(f"{self.method} {host}:{self.port}{self.path}")
        return canonical_rule(f"{host}:{self.port}")


def parse_rules(texts: list[str] | tuple[str, ...]) -> tuple[Rule, ...]:
    return tuple(parse_rule(t) for t in texts)


def destination(host: str, port: int) -> tuple[str, IPAddress | None]:
    """A requested destination: (how it is shown, the address if it is an IP literal).
    A name is shown lowercased; an address in its canonical form, except a numeric
    IPv4 spelling (``127.1``), shown as spelled so a log reader sees what was asked."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    address = ip_literal(host)
    if address is None:
        return check_hostname(host), None
    if (
        isinstance(address, ipaddress.IPv4Address)
        and numeric_ipv4(host) is not None
        and _normal(host) != str(address)
    ):
        return _normal(host), address
    return str(address), address

"""Agent names: the only identifier that ever crosses a trust boundary.

Every path the hive derives from a name (sockets, homes, cages) is safe because
a name can't contain a slash, a dot or anything outside ``[a-z0-9-]``.
"""

from __future__ import annotations

import re

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
RESERVED = frozenset({"operator", "core", "hive", "all"})
OPERATOR = "operator"


class BadName(ValueError):
    pass


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid, unreserved agent name; raise BadName otherwise."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BadName(f"bad agent name {name!r}: must match {NAME_RE.pattern}")
    if name in RESERVED:
        raise BadName(f"agent name {name!r} is reserved")
    return name

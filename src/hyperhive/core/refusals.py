"""Refusals: what the hive says no to, in one line, and the HTTP status that goes with it.

The JSON-lines sockets send ``str(refusal)`` as the error text; the HTTP surface sends the
same text with ``refusal.status``. The status comes from the class, never from the
wording, so rewording a refusal can't change the API.
"""

from __future__ import annotations

from typing import ClassVar


class Refused(Exception):
    """A request the hive refuses; ``str(self)`` is the one-line reason."""

    status: ClassVar[int] = 409


class BadRequest(Refused):
    """The request itself is malformed: an unknown or missing field, a bad value."""

    status = 422


class NotFound(Refused):
    """No such agent, message, question or approval (or not one the caller may see)."""

    status = 404


class Conflict(Refused):
    """The request is well formed but the hive's state says no (already answered, exists)."""

    status = 409


class Gone(Refused):
    """It existed and is no more: a notification's link used once already, or expired."""

    status = 410


class Forbidden(Refused):
    """The caller may not do this (a harness verb from the agent's runtime, say)."""

    status = 403


class Busy(Refused):
    """A limit the caller ran into: a rate limit, a storage quota, the agent limit."""

    status = 429


class Unavailable(Refused):
    """Something the hive needs is down (hive-priv); retrying later may work."""

    status = 503

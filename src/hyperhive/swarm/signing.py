"""Operator actions carried across the swarm, signed with Ed25519 (docs/swarm.md,
"The operator's actions"). No ``nats`` here: keys, sealing and opening only.

NATS's permissions vouch for the host that published an action (its subject), not for
who decided it: a compromised host has its own core's credentials. So each host's
operator actions are signed with that host's operator key (kept beside its store,
outside every cage), and a host applies one only if its ``[swarm] operators`` pins the
sending host's public key. A sealed action:

    {"action": {"v": 1, "id": <32 hex>, "from": <host>, "to": <host>, "at": <unix time>,
                "request": {<a host.sock request: answer_question, approve, deny, spawn,
                             request_spawn, send, start, stop, restart, set_paused,
                             interrupt, destroy>}},
     "sig": <base64 Ed25519 signature of the action's canonical JSON>}
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hyperhive.names import NAME_RE
from hyperhive.swarm import jsontext

VERSION = 1
# The host.sock verbs another host's operator may carry here; nothing else. The first
# five act on the roster's items; the rest steer an agent of this host (docs/swarm.md,
# "Steering another host's agents").
CARRIED = frozenset(
    {"answer_question", "approve", "deny", "spawn", "request_spawn"}
    | {"send", "start", "stop", "restart", "set_paused", "interrupt", "destroy"}
)
# An answer is up to 256 Ki characters (4 bytes each in UTF-8, more as JSON escapes):
# a sealed action is bounded well above any honest one and far below NATS's max_payload.
MAX_ACTION_BYTES = 1536 << 10
TTL_SECONDS = 300.0  # an action older than this is refused (its id is remembered longer)
SKEW_SECONDS = 30.0  # how far ahead of this host's clock an action's time may be


class ActionError(ValueError):
    """Why a sealed action is refused (one line)."""


def canonical(action: dict[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, no spaces, UTF-8."""
    return json.dumps(action, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """This host's operator key (raw 32 bytes, base64, one line, 0600); made if missing."""
    try:
        raw = path.read_text().strip()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(seed).decode() + "\n")
        return key
    try:
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(raw, validate=True))
    except (ValueError, binascii.Error):
        raise ValueError(f"{path}: not a base64 Ed25519 key") from None


def public_b64(key: Ed25519PrivateKey) -> str:
    """The public half, as ``[swarm] operators`` on other hosts pins it."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error):
        raise ValueError("not a base64 Ed25519 public key (32 bytes)") from None


def seal(
    key: Ed25519PrivateKey, from_host: str, to_host: str, request: dict[str, Any]
) -> tuple[str, bytes]:
    """A new action (a fresh id, now), signed: (its id, the bytes to publish)."""
    action_id = uuid.uuid4().hex
    action = {
        "v": VERSION,
        "id": action_id,
        "from": from_host,
        "to": to_host,
        "at": time.time(),
        "request": request,
    }
    sig = base64.b64encode(key.sign(canonical(action))).decode()
    return action_id, json.dumps({"action": action, "sig": sig}, ensure_ascii=False).encode()


def open_sealed(
    data: bytes,
    subject_host: str,
    this_host: str,
    operators: dict[str, Ed25519PublicKey],
    now: float | None = None,
    check_time: bool = True,
) -> dict[str, Any]:
    """The action in ``data``, published on ``subject_host``'s subject, if this host
    obeys it: well formed, from that host, to this one, signed by the key pinned for
    it, and recent (``check_time``; else the caller checks it with ``check_fresh``: a
    delivery again of an action this host took is answered whatever its age). Its id is
    not checked against replays here (the caller's table)."""
    if len(data) > MAX_ACTION_BYTES:
        raise ActionError(f"action of {len(data)} bytes; at most {MAX_ACTION_BYTES}")
    try:
        env = jsontext.loads(data)
    except (ValueError, RecursionError):  # deep nesting: refused, not a poison pill
        raise ActionError("not JSON (or nested too deep)") from None
    if not (
        isinstance(env, dict)
        and set(env) == {"action", "sig"}
        and isinstance(env["sig"], str)
        and isinstance(env["action"], dict)
    ):
        raise ActionError("not a sealed action")
    a = env["action"]
    if set(a) != {"v", "id", "from", "to", "at", "request"} or a["v"] != VERSION:
        raise ActionError("unknown action fields or version")
    if not (isinstance(a["id"], str) and len(a["id"]) == 32 and _is_hex(a["id"])):
        raise ActionError("bad action id")
    if a["from"] != subject_host:
        raise ActionError(f"host {subject_host} published an action from {a['from']!r}")
    if a["to"] != this_host:
        raise ActionError(f"an action for host {a['to']!r}, not this one")
    public = operators.get(subject_host)
    if public is None:
        raise ActionError(f"host {subject_host}'s operator is not one this host obeys")
    try:
        public.verify(base64.b64decode(env["sig"], validate=True), canonical(a))
    except (InvalidSignature, ValueError, binascii.Error):
        raise ActionError(f"bad signature for host {subject_host}'s operator") from None
    req = a["request"]
    if not isinstance(req, dict) or req.get("cmd") not in CARRIED or "host" in req:
        raise ActionError("not an operator action this host carries out")
    if check_time:
        check_fresh(a, now)
    return a


def check_fresh(action: dict[str, Any], now: float | None = None) -> None:
    """Refuse an opened action whose time is not within the last TTL_SECONDS (or too far
    ahead of this host's clock)."""
    now = time.time() if now is None else now
    at = action["at"]
    # Finite: a NaN or infinite time (JSON as Python reads it) compares false both ways, so
    # it would pass the window below and never expire, replayable once its id is pruned.
    if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
        raise ActionError("bad action time")
    if at < now - TTL_SECONDS or at > now + SKEW_SECONDS:
        raise ActionError(f"action {action['id']} is {now - at:.0f} s old; refused")


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def valid_host(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None

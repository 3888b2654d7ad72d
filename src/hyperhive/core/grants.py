"""``grants``: what approving a ``spawn`` approval gives the new agent, as one line the
hive works out from the payload (not from the agent's description): its runtime, egress
rules, peers and cage limits. A listing cuts a long payload (a 100 KB ``command`` first in
the canonical JSON would hide ``egress`` and ``peers`` behind the cut), so the line is
built before any cut and always shown whole; it is bounded by the spec's own limits
(100 egress rules, 1000 peers)."""

from __future__ import annotations

from typing import Any

# The parts of a spawn payload the line is made of, as JSON paths: the store reads these
# (and only these) out of a long payload in SQL for a listing.
PARTS: dict[str, str] = {
    "name": "$.name",
    "runtime": "$.spec.runtime",
    "egress": "$.spec.egress",
    "peers": "$.spec.peers",
    "memory_mib": "$.spec.memory_mib",
    "pids_max": "$.spec.pids_max",
}


def parts_sql(column: str = "payload") -> str:
    """One result column: the spawn payload's parts as a small JSON object, else NULL."""
    pairs = ", ".join(f"'{k}', {column} -> '{p}'" for k, p in PARTS.items())
    return f"CASE WHEN kind='spawn' AND json_valid({column}) THEN json_object({pairs}) END"


def parts_of(payload: Any) -> dict[str, Any]:
    """The same parts, from a payload in memory."""
    if not isinstance(payload, dict):
        return {}
    spec = payload.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    return {
        "name": payload.get("name"),
        **{k: spec.get(k) for k in ("runtime", "egress", "peers", "memory_mib", "pids_max")},
    }


def _names(value: Any) -> str:
    if not isinstance(value, list) or not value:
        return "none"
    return ", ".join(str(v) for v in value)


def grants_line(parts: dict[str, Any]) -> str:
    """``agent NAME: runtime R; egress A, B; peers P, Q; memory 512 MiB; pids 256``."""
    runtime = parts.get("runtime") or "command"
    memory = parts.get("memory_mib")
    pids = parts.get("pids_max")
    return (
        f"agent {parts.get('name')}: runtime {runtime}; egress {_names(parts.get('egress'))};"
        f" peers {_names(parts.get('peers'))};"
        f" memory {'default' if memory is None else f'{memory} MiB'};"
        f" pids {'default' if pids is None else pids}"
    )


def grants_of(kind: object, payload: Any) -> str | None:
    """``grants`` of an approval (None unless it is a spawn)."""
    return grants_line(parts_of(payload)) if kind == "spawn" and isinstance(payload, dict) else None

"""``grants``: what approving a ``spawn`` approval gives the new agent, as one line the
hive works out from the payload (not from the agent's description): its runtime, egress
rules (as approving stores them), peers, cage limits, model and turn timeout, and the
agents that already name it as a peer. A listing cuts a long payload (a 100 KB ``command`` first in
the canonical JSON would hide ``egress`` and ``peers`` behind the cut), so the line is
built before any cut and always shown whole; it is bounded by the spec's own limits
(100 egress rules, 1000 peers)."""

from __future__ import annotations

from typing import Any

from hyperhive.wire.common import AgentSpec
from hyperhive.wire.egress import RuleError, canonical_rule

# The parts of a spawn payload the line is made of, as JSON paths: the store reads these
# (and only these) out of a long payload in SQL for a listing.
PARTS: dict[str, str] = {
    "name": "$.name",
    "runtime": "$.spec.runtime",
    "egress": "$.spec.egress",
    "peers": "$.spec.peers",
    "memory_mib": "$.spec.memory_mib",
    "pids_max": "$.spec.pids_max",
    "model": "$.spec.model",
    "turn_timeout": "$.spec.turn_timeout",
}
SPEC_PARTS = ("runtime", "egress", "peers", "memory_mib", "pids_max", "model", "turn_timeout")
DEFAULT_TURN_TIMEOUT = AgentSpec.model_fields["turn_timeout"].default


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
    return {"name": payload.get("name"), **{k: spec.get(k) for k in SPEC_PARTS}}


def _names(value: Any) -> str:
    if not isinstance(value, list) or not value:
        return "none"
    return ", ".join(str(v) for v in value)


def _rules(value: Any) -> str:
    """The rules as approving stores them (``canonical_rule``: ``010.0.0.1`` is inet_aton's
    8.0.0.1), not as spelled (red team round 24)."""
    if not isinstance(value, list) or not value:
        return "none"
    out = []
    for rule in value:
        try:
            out.append(canonical_rule(str(rule)))
        except RuleError:
            out.append(f"{rule} (not a rule: approving fails)")
    return ", ".join(out)


def grants_line(parts: dict[str, Any], reached_by: list[str] | None = None) -> str:
    """``agent NAME: runtime R; egress A, B; peers P, Q; memory 512 MiB; pids 256``, then
    what differs from the defaults (``model M``, ``turns up to N s``), then ``already a peer
    of X, Y`` (agents whose peers name it: they reach whoever gets the name)."""
    runtime = parts.get("runtime") or "command"
    memory = parts.get("memory_mib")
    pids = parts.get("pids_max")
    line = (
        f"agent {parts.get('name')}: runtime {runtime}; egress {_rules(parts.get('egress'))};"
        f" peers {_names(parts.get('peers'))};"
        f" memory {'default' if memory is None else f'{memory} MiB'};"
        f" pids {'default' if pids is None else pids}"
    )
    if (model := parts.get("model")) is not None:
        line += f"; model {model}"
    turns = parts.get("turn_timeout")
    if turns is not None and turns != DEFAULT_TURN_TIMEOUT:
        line += (
            f"; turns up to {turns:g} s" if isinstance(turns, int | float) else f"; turns {turns}"
        )
    if reached_by:
        line += f"; already a peer of {', '.join(sorted(reached_by))}"
    return line


def grants_of(kind: object, payload: Any, reached_by: list[str] | None = None) -> str | None:
    """``grants`` of an approval (None unless it is a spawn)."""
    if kind != "spawn" or not isinstance(payload, dict):
        return None
    return grants_line(parts_of(payload), reached_by)

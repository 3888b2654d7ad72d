"""Approval kinds: what an agent may ask the operator to approve, and what
approving applies. The payload stored at request time (and its sha256, shown
to the operator) is exactly what is applied, once; there is no update path."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from pydantic import ValidationError

from hyperhive import faults
from hyperhive.core.listing import row_out
from hyperhive.core.refusals import BadRequest, Conflict, NotFound
from hyperhive.core.store import ApplyError, ApprovalTx, Unreadable, canonical_json
from hyperhive.names import OPERATOR
from hyperhive.wire.common import Approval, SpawnPayload
from hyperhive.wire.egress import EgressPayload, RuleError
from hyperhive.wire.framing import MAX_LINE, describe_validation_error, model_fields_only

if TYPE_CHECKING:  # the service calls in here; the kinds only use what it passes them
    from hyperhive.core.hive import Hive


class ApprovalKind(Protocol):
    def check(self, hive: Hive, requester: str, payload: Any) -> None:
        """At request time: refuse a payload that could never be applied."""

    def apply(self, tx: ApprovalTx, approval: Approval) -> None:
        """At approval time, inside the approving transaction. Raise ApplyError to fail."""

    async def after(self, hive: Hive, approval: Approval) -> None:
        """After the approving transaction committed (e.g. start the new agent)."""


class Custom:
    """A decision only: approving or denying is delivered back to the agent."""

    def check(self, hive: Hive, requester: str, payload: Any) -> None:
        pass

    def apply(self, tx: ApprovalTx, approval: Approval) -> None:
        pass

    async def after(self, hive: Hive, approval: Approval) -> None:
        pass


AGENT_SET_LIMITS = ("memory_mib", "pids_max")


class Spawn:
    """The payload is ``{name, spec}``; approving creates that agent, child of the requester."""

    def _parse(self, payload: Any) -> SpawnPayload:
        try:
            return SpawnPayload.model_validate(payload)
        except ValidationError as e:
            raise BadRequest(
                f"spawn payload: {describe_validation_error(e, tagged=False)}"
            ) from None

    def check(self, hive: Hive, requester: str, payload: Any) -> None:
        spawn = self._parse(payload)
        if requester != OPERATOR:
            # A cage's limits are the operator's to set (set_resource_limits): an agent's
            # spawn spec has no such fields, so a child can't be asked into more.
            for field in AGENT_SET_LIMITS:
                if field in spawn.spec.model_fields_set:
                    raise BadRequest(f"spawn payload: unknown field 'spec.{field}'")
        if hive.exists(spawn.name):
            raise Conflict(f"spawn payload: an agent named {spawn.name!r} already exists")
        if requester != OPERATOR:  # (the operator's own request_spawn may remake one)
            hive.check_not_declared(spawn.name)
        hive.check_agent_room()

    def apply(self, tx: ApprovalTx, approval: Approval) -> None:
        spawn = SpawnPayload.model_validate(approval.payload)
        if tx.agent_exists(spawn.name):
            raise ApplyError(f"an agent named {spawn.name!r} already exists")
        if approval.agent == OPERATOR:  # the operator's request_spawn: a root-level agent
            tx.create_agent(spawn.name, spawn.spec, None, "operator")
            return
        if not tx.agent_exists(approval.agent):
            raise ApplyError(f"requesting agent {approval.agent!r} no longer exists")
        tx.create_agent(spawn.name, spawn.spec, approval.agent, "spawn")

    async def after(self, hive: Hive, approval: Approval) -> None:
        if approval.status == "approved":
            await hive.after_create(SpawnPayload.model_validate(approval.payload).name)


class Egress:
    """The payload is ``{host, port}``; approving adds exactly that rule to the
    requester's egress allowlist, persisted, live at once (no restart)."""

    def _rule(self, payload: Any) -> str:
        try:
            return EgressPayload.model_validate(payload).rule()
        except ValidationError as e:
            raise BadRequest(
                f"egress payload: {describe_validation_error(e, tagged=False)}"
            ) from None
        except RuleError as e:
            raise BadRequest(f"egress payload: {e}") from None

    def check(self, hive: Hive, requester: str, payload: Any) -> None:
        self._rule(payload)

    def apply(self, tx: ApprovalTx, approval: Approval) -> None:
        if not tx.agent_exists(approval.agent):
            raise ApplyError(f"requesting agent {approval.agent!r} no longer exists")
        tx.add_egress_rule(approval.agent, self._rule(approval.payload), "approval")

    async def after(self, hive: Hive, approval: Approval) -> None:
        if approval.status == "approved":
            hive.reload_egress(approval.agent)


KINDS: dict[str, ApprovalKind] = {"custom": Custom(), "spawn": Spawn(), "egress": Egress()}


def allows(approval: Approval) -> str | None:
    """What approving an ``egress`` approval adds: exactly the rule the hive will store."""
    return allows_of(approval.kind, approval.payload)


def allows_of(kind: object, payload: Any) -> str | None:
    """``allows`` of an approval row as JSON data (e.g. an event's)."""
    if kind != "egress":
        return None
    try:
        return EgressPayload.model_validate(payload).rule()
    except (ValidationError, RuleError):
        return None  # refused at request time; never applied as anything else


def shown(approval: Approval | Unreadable) -> dict[str, Any]:
    """A pending approval as the operator's surfaces show it: for kind ``egress``,
    ``allows`` is the rule approving would add, worked out by the hive from the
    payload (not from the agent's description). A row that can't be read or
    serialised shows as unreadable."""
    row = row_out(approval)
    if isinstance(approval, Unreadable) or "unreadable" in row:
        return row
    rule = allows(approval)
    if rule is not None:
        row["allows"] = rule
    return row


def request(hive: Hive, requester: str, kind: str, description: str, payload: Any) -> Approval:
    handler = KINDS.get(kind)
    if handler is None:
        raise BadRequest(f"unknown approval kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    handler.check(hive, requester, payload)
    stored = len(canonical_json(payload).encode())
    if stored > MAX_LINE:  # numbers grow when stored (1e15 is 1000000000000000.0): bound it
        raise BadRequest(f"payload too large: {stored} bytes as stored, at most {MAX_LINE}")
    hive.check_store_quota(requester, 1, len(kind.encode()) + len(description.encode()) + stored)
    approval = hive.store.approvals.request(requester, kind, description, payload)
    hive.bus.publish("approval", {"approval": model_fields_only(approval)})
    return approval


async def resolve(
    hive: Hive, aid: int, decision: str, note: str | None = None, sha256: str | None = None
) -> Approval | Unreadable:
    existing = hive.store.approvals.get(aid)
    if existing is None:
        raise NotFound(f"no approval {aid}")
    # Bound to what the operator saw (an approval carried from another host always is):
    # checked with no await before the store resolves it, so nothing comes in between.
    if sha256 is not None and (
        isinstance(existing, Unreadable) or existing.payload_sha256 != sha256
    ):
        raise Conflict(
            f"approval {aid}'s payload_sha256 is not {sha256[:12]}…: not the approval"
            " the operator saw; nothing was done"
        )
    # An unreadable row, or one of a kind this version doesn't know, can only be denied:
    # the store refuses to approve it (nobody saw what approving would apply).
    handler = None if isinstance(existing, Unreadable) else KINDS.get(existing.kind)
    if handler is None and decision == "approved" and not isinstance(existing, Unreadable):
        raise Conflict(
            f"approval {aid} is of unknown kind {existing.kind!r}; it can only be denied"
        )
    if (
        not isinstance(existing, Unreadable)
        and existing.kind == "spawn"
        and decision == "approved"
        and existing.status == "pending"
    ):
        hive.check_agent_room()  # refused, still pending: the operator may deny it or make room
        if (
            existing.agent != OPERATOR
            and isinstance(existing.payload, dict)
            and isinstance(name := existing.payload.get("name"), str)
        ):
            hive.check_not_declared(name)  # (hive.toml changed since the request): deny it
    apply = None if handler is None else handler.apply
    approval, msg = hive.store.approvals.resolve(aid, decision, note, apply)
    # A crash here (tests/test_swarm_actions.py): approved, with its agent's row, not started.
    faults.point(hive.store.path.parent, "approval-committed")
    hive.delivered(msg)
    hive.bus.publish("approval", {"approval": row_out(approval)})
    if handler is not None and not isinstance(approval, Unreadable):
        await handler.after(hive, approval)
    return approval

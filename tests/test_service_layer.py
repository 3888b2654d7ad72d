"""The service layer's shape: only the listener modules make actors, every domain
method of ``Hive`` takes one, refusals carry their status, and the socket modules are
translation tables (no store access, no events of their own)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from hyperhive.core import refusals
from hyperhive.core.actors import OPERATOR, Agent, Operator
from hyperhive.core.agent_socket import AGENT, HARNESS
from hyperhive.core.hive import Hive
from hyperhive.core.host_socket import HOST
from hyperhive.wire import agent as wa
from hyperhive.wire import harness as wh
from hyperhive.wire import host as whost

SRC = Path(__file__).resolve().parents[1] / "src" / "hyperhive"
LISTENERS = {"core/agent_socket.py", "core/host_socket.py", "core/http.py", "core/actors.py"}
# Hive methods that are not actions of a caller: the listeners, the proxy, the scheduler
# and the start-up call these with what the kernel or the store said, never a request.
INTERNAL = {
    "exists", "require_agent", "require_self", "spec", "may_address", "status_row", "statuses",
    "publish_status", "harness_changed", "check_agent_room", "check_not_declared",
    "check_store_quota", "store_quota",
    "delivered", "release", "deliver_due_reminders", "pending_approvals", "egress_rules_for",
    "reload_egress", "record_egress", "write_pending_egress", "resume_running", "resume_agents", "after_create",
    "destroy_leftovers", "clear_leftovers",
    # the egress proxy's threads ask whether to terminate TLS; bindings reload after a change
    "egress_plan", "reload_bindings",
    # the group commit's hooks for its message lane (the sender was checked before it
    # queued); this host's swarm name, for the listings
    "message_taken", "message_stored", "lane_committed", "swarm_host",
    # the core's own loop reading the cages' limit hits (OOM kills, refused forks)
    "watch_limits", "check_limits",
    # the watchdog of received_fds: a cage holding a core thread's close is restarted
    "cage_holds_a_close",
}  # fmt: skip


def _modules() -> list[tuple[str, ast.Module]]:
    return [
        (str(p.relative_to(SRC)), ast.parse(p.read_text(), str(p)))
        for p in sorted(SRC.rglob("*.py"))
    ]


def test_only_the_listeners_make_actors() -> None:
    makers: dict[str, list[int]] = {}
    for rel, tree in _modules():
        for node in ast.walk(tree):
            made = (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in {"Agent", "Operator"}
            ) or (isinstance(node, ast.Name) and node.id == "OPERATOR" and _imports_actor(tree))
            if made:
                makers.setdefault(rel, []).append(node.lineno)
    assert set(makers) <= LISTENERS, {k: v for k, v in makers.items() if k not in LISTENERS}
    assert "core/agent_socket.py" in makers  # the check sees what it looks for


def _imports_actor(tree: ast.Module) -> bool:
    return any(
        isinstance(n, ast.ImportFrom)
        and n.module == "hyperhive.core.actors"
        and any(a.name == "OPERATOR" for a in n.names)
        for n in ast.walk(tree)
    )


def test_every_domain_method_takes_an_actor() -> None:
    public = {
        n: f for n, f in inspect.getmembers(Hive, inspect.isfunction) if not n.startswith("_")
    }
    assert set(public) >= INTERNAL, INTERNAL - set(public)  # the list names real methods
    untyped = []
    for name, fn in public.items():
        if name in INTERNAL:
            continue
        params = list(inspect.signature(fn).parameters.values())
        if len(params) < 2 or params[1].name != "actor":
            untyped.append(name)
            continue
        annotation = str(params[1].annotation)
        if annotation not in {"Agent", "Operator", "Actor"}:
            untyped.append(name)
    assert not untyped, f"Hive methods without an actor: {untyped}"


def test_operator_only_methods_are_typed_for_the_operator() -> None:
    operator_only = [
        "start_all", "stop_all", "restart", "set_paused", "interrupt", "spawn", "destroy",
        "resolve_approval", "inbox", "questions_for", "allow_egress", "remove_egress",
        "egress_rules", "egress_log", "transcript", "events", "list_agents", "recent_messages",
    ]  # fmt: skip
    for name in operator_only:
        actor = inspect.signature(getattr(Hive, name)).parameters["actor"]
        assert str(actor.annotation) == "Operator", name


def test_socket_modules_do_no_domain_work() -> None:
    """The translation tables call the service; they don't touch the store, wake
    waiters or publish events themselves."""
    for rel in ("core/agent_socket.py", "core/host_socket.py", "core/http.py"):
        text = (SRC / rel).read_text()
        for forbidden in (".store.", "bus.publish(", "wakeups.notify(", "_in_flight"):
            assert forbidden not in text, f"{rel} does domain work: {forbidden!r}"


def test_tables_cover_every_verb() -> None:
    assert set(AGENT.table) == set(wa.AGENT_MODELS)
    assert set(HARNESS.table) == set(wh.HARNESS_MODELS)
    assert set(HOST.table) == set(whost.HOST_MODELS)


@pytest.mark.parametrize(
    ("cls", "status"),
    [
        (refusals.BadRequest, 422),
        (refusals.NotFound, 404),
        (refusals.Conflict, 409),
        (refusals.Forbidden, 403),
        (refusals.Busy, 429),
        (refusals.Unavailable, 503),
    ],
)
def test_refusals_carry_their_status(cls: type[refusals.Refused], status: int) -> None:
    refusal = cls("no agent named 'x'")
    assert isinstance(refusal, refusals.Refused)
    assert refusal.status == status
    assert str(refusal) == "no agent named 'x'"  # the JSON-lines text is the message alone


def test_actors_are_values() -> None:
    assert Agent("alice") == Agent("alice")
    assert Agent("alice") != Agent("alice", harness=True)
    assert Operator() == OPERATOR
    assert OPERATOR.name == "operator"
    with pytest.raises(AttributeError):
        Agent("alice").name = "bob"  # type: ignore[misc]

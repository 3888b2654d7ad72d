"""``peers`` (core/hive.py): the agents the caller may address, found from its declared
peers, its parent and its children (store/agents.py ``children_of``) rather than by asking
``may_address`` about every agent. In process, on a real store, against the rule itself:
for any agents, parents and peer lists, the answer is every agent ``may_address`` takes,
sorted, and it follows creates, deletes and re-parenting (the children's index is rebuilt
from each new read of the table)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyperhive.config import HiveConfig
from hyperhive.core.actors import Agent
from hyperhive.core.events import EventBus
from hyperhive.core.hive import Hive, Lifecycle
from hyperhive.core.store import Store
from hyperhive.wire.common import AgentSpec

NAMES = [f"a{i}" for i in range(7)]


def spec(peers: list[str]) -> AgentSpec:
    return AgentSpec.model_validate({"runtime": "command", "command": ["true"], "peers": peers})


def every_agent_asked(hive: Hive, name: str) -> list[str]:
    """The rule as written: each agent that exists, asked about in turn."""
    return sorted(r.name for r in hive.store.agents.all() if hive.may_address(name, r.name))


agents = st.lists(
    st.tuples(
        st.lists(st.sampled_from([*NAMES, "gone"]), max_size=4),  # peers (some never exist)
        st.one_of(st.none(), st.sampled_from(NAMES)),  # parent
    ),
    min_size=len(NAMES),
    max_size=len(NAMES),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(agents, st.lists(st.sampled_from(NAMES), max_size=3))
def test_peers_is_every_agent_may_address_takes(
    tmp_path: Path, declared: list[tuple[list[str], str | None]], deleted: list[str]
) -> None:
    db = tmp_path / f"hive-{len(list(tmp_path.iterdir()))}.db"
    store = Store(db)
    try:
        hive = Hive(store, HiveConfig.model_validate({}), Lifecycle(), EventBus())
        for name, (peers, _) in zip(NAMES, declared, strict=True):
            store.agents.create(name, spec(peers), None, "spawn")
        for name, (_, parent) in zip(NAMES, declared, strict=True):
            store.agents.set_parent(name, parent)
        for name in NAMES:
            assert hive.peers(Agent(name)) == every_agent_asked(hive, name)
        for name in deleted:  # the index follows the table
            if store.agents.get(name) is not None:
                store.agents.delete(name)
            for other in NAMES:
                if store.agents.get(other) is not None:
                    assert hive.peers(Agent(other)) == every_agent_asked(hive, other)
        assert all(hive.peers(Agent(n)) == [] for n in deleted)
    finally:
        store.close()

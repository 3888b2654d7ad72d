"""A compromised host answers a question asked of another host's agent (docs/swarm.md,
"Questions across hosts"). Host c's core is the attacker, with c's own NATS credentials
(nats-py, no hive code). alice (a) asks bob (b); c knows a's question id (ids are small
integers). NATS lets c publish only on its own subjects, so c's forged answers come on
``hive.msg.a.from.c``; host a applies an answer only from the host the question was asked
of, from the agent it was asked of: both forgeries are dropped, the question stays open,
and bob's real answer is the one alice gets. Each host runs a whole hive (the session's
``hives``: tests/swarm_fixture.py, the agents paused); alice's and bob's calls (the
question, the answer, the inbox reads) are made from their cages."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from helpers import assert_ok, wait_for
from hive_fixture import HiveProcess
from hyperhive.swarm import subjects as s
from swarm_faults import drain
from swarm_fixture import Swarm

from .test_swarm_hostile import as_host_c

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.attack("swarm-host-spoofing", ref="issue 18: ask/answer across hosts"),
]


def test_a_host_cannot_answer_a_question_asked_of_another_hosts_agent(hives: Swarm[HiveProcess]) -> None:
    alice, bob = hives.cores["a"].caged("alice"), hives.cores["b"].caged("bob")
    qa = assert_ok(alice.call("ask", to="bob", question="deploy?", options=["yes", "no"]))["id"]
    [q] = drain(hives, "b", "bob", 1)
    dropped = hives.status("a")["dropped"]

    def forged(n: int, sender: str) -> dict[str, Any]:
        return {"id": f"forged-answer-{qa}-{n}", "from": sender, "to": "alice",
                "kind": "answer", "body": "yes (forged)", "qid": qa, "sent_at": 0}

    async def attack(nc: Any) -> None:
        js = nc.jetstream()
        # c's own agent answers a question asked of bob; then c claims to be bob.
        for n, sender in enumerate(("carol", "bob")):
            item = forged(n, sender)
            await js.publish(s.msg_subject("a", "c"), json.dumps([item]).encode(),
                             headers={"Nats-Msg-Id": item["id"]})

    assert as_host_c(hives, attack) == []  # NATS lets c publish on its own subject
    wait_for(lambda: hives.status("a")["dropped"] == dropped + 2, timeout=15)
    assert assert_ok(alice.call("recv", wait=0.3))["messages"] == []
    assert [x["id"] for x in assert_ok(alice.call("loose_ends"))["questions"]] == [qa]
    # bob's own answer still goes through, once.
    assert_ok(bob.call("answer", id=q["ref"], answer="no"))
    [a] = drain(hives, "a", "alice", 1)
    assert (a["kind"], a["from"], a["body"], a["ref"]) == ("answer", "bob", "no", qa)
    assert assert_ok(alice.call("loose_ends"))["questions"] == []

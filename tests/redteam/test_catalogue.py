"""The red-team suite as a catalogue: every case is marked with the attack class
it covers (``pytest.mark.attack(CLASS, ref=INCIDENT)``). This module collects the
whole directory in a child pytest and checks that every class the project
promises to hold is covered, and that the suite is as large as promised.
``pytest tests/redteam --collect-only -q`` lists the cases; ``python -m pytest
tests/redteam/test_catalogue.py -s`` prints the table."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.attack("catalogue.complete", ref="issue 11 (second red team)")

HERE = Path(__file__).parent
MIN_CASES = 250

# Every class a red team reproduced, and the ones the first suite covered.
REQUIRED = {
    "approval.swap", "budget.exhaustion", "identity.forge-agent", "identity.forge-operator",
    "surface.script-injection", "wire.malformed", "privsep.core-misuse", "reach.other-surfaces",
    "fs.traversal-symlink",
    # the second red team (issue 11)
    "exec.operator-terminal", "exec.process-memory", "exec.leftover-processes", "exec.planted-code",
    "privsep.core-symlink-swap", "launcher.import-path", "launcher.second-hive", "launcher.readiness",
    "kernel.syscall-surface", "kernel.socket-family", "kernel.keyring", "ids.reuse", "ids.host-unique",
    "egress.dns-exfiltration", "egress.private-ranges", "egress.host-header", "priv.deep-tree",
    "budget.core-descriptors", "budget.disk-quota", "budget.store", "init.capabilities",
    "observe.host-activity",
    # issue 13: hostile data on the operator's surfaces
    "surface.terminal-injection", "surface.open-redirect", "gateway.page-headers",
    "gateway.request-splitting", "wire.deep-nesting", "store.unreadable-row", "core.mass-due",
    "runtime.sender-forgery", "runtime.oversized-prompt", "surface.unpaged-listing",
    "core.reply-memory", "surface.dashboard-dos", "wire.timestamps", "core.status-feed",
    # issues 15-18: the cockpit, secrets and TLS termination, the swarm
    "surface.cockpit-stream", "surface.page-sandbox", "approval.hidden-grant", "notify.delivery",
    "notify.slow-receiver", "notify.injection", "notify.redirect", "notify.flood", "notify.link",
    "reset.planted-link", "secrets.store", "secrets.placeholder-elsewhere",
    "secrets.read-from-cage", "egress.tls-sni-host", "egress.request-smuggling",
    "egress.l7-bypass", "swarm-host-spoofing", "swarm-operator-forgery", "harness.fork-inheritance", "harness.dumpable",
    "cage.planted-bytecode", "wire.pipelining", "secrets.reflected", "surface.page-download",
    # red team round 6
    "secrets.binding-env", "cage.descriptor-limit", "swarm-name-claim",
    # red team round 7: the egress pool, the early 200, the group commit
    "egress.pool-cross-agent", "egress.pool-desync", "egress.connect-before-verify",
    "core.groupcommit",
    # red team round 8: init's own fork_exec, the v1 cgroup join by tasks
    "init.runtime-inheritance", "cage.cgroup-join",
    # session 7: steering other hosts' agents
    "swarm-remote-steering", "swarm-roster-fill", "swarm-roster-consumer", "swarm-push-delivery",
    "swarm-consumer-flood",
    # red team round 9: homes in their cages' namespaces, the recv fast path, the resting
    # listener, what a host can make the bus do
    "home.loop-reuse", "home.namespace-reach", "home.pinned-past-destroy", "wire.recv-fastpath",
    "wire.recv-ack-kill9", "budget.accept-rest", "swarm-deliver-subject", "swarm-claim-time",
    # red team round 10: a stored message's own Status headers
    "swarm-watch-header-forgery", "swarm-ops-jam",
    # issue 18 (session 8): the bundle consumers read raw too
    "swarm-bundle-header-forgery",
    # issue 18 (session 8): another host's agent's page in the cockpit
    "swarm-page-injection",
    # red team round 11: the operator's steering across hosts, what the bus keeps and drops
    "swarm-reserved-sender", "swarm-ops-flood", "swarm-msg-id-poisoning", "swarm-store-fill",
    # red team round 12: recv's known inboxes, riders beside agents' writes
    "core.known-inbox", "swarm-ops-rider",
    # issue 17 (session 9): requests that change nothing, as fast as a cage can write them
    "core.cheap-verb-flood",
    # issue 18 (session 9): the streams as work queues, bounded per pair of hosts
    "swarm-pair-bound",
    # red team round 13: init asleep until woken, the agents cache's one-row writes
    "init.idle-sleep", "core.agents-cache",
    # red team round 15b: the root boundary
    "priv.pid-reuse",
    # red team round 17: host-wide kernel counters, core dumps, init's reading of /proc
    "kernel.host-counters", "cage.core-dumps", "init.status-parse", "cage.scheduling",
    "gateway.page-socket-link",
    # red team round 20: a cage's limit hits hidden from the operator
    "cage.limit-hits-hidden",
    # session 13: a CPU share per cage
    "budget.cpu",
    # sessions 30 and 31: no pipe shared with a cage (the exec's stdio, the runtime's)
    "operator.exec", "harness.turn",
}

PLUGIN = r'''
import json, os
def pytest_collection_finish(session):
    rows = []
    for item in session.items:
        m = item.get_closest_marker("attack")
        rows.append([item.nodeid, m.args[0] if m else None, (m.kwargs.get("ref") if m else None)])
    with open(os.environ["CATALOGUE_OUT"], "w") as f:
        json.dump(rows, f)
'''


def test_every_class_is_covered_and_the_suite_is_complete(tmp_path: Path) -> None:
    (tmp_path / "catalogue_plugin.py").write_text(PLUGIN)
    out = tmp_path / "rows.json"
    env = dict(os.environ, CATALOGUE_OUT=str(out), PYTHONPATH=f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(HERE), "--collect-only", "-q", "-p", "catalogue_plugin"],
        capture_output=True, text=True, env=env, cwd=HERE.parent.parent, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    classes = collections.Counter(cls for _, cls, _ in rows)
    print("\n".join(f"{n:4d}  {cls}" for cls, n in sorted(classes.items())))
    assert all(cls for _, cls, _ in rows)
    missing = REQUIRED - set(classes)
    assert not missing, f"classes with no case: {sorted(missing)}"
    assert len(rows) >= MIN_CASES, f"{len(rows)} cases, the catalogue promises at least {MIN_CASES}"
